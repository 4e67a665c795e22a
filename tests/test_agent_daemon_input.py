"""The agent's input, window management and clipboard as one process, through the emulator.

``qubesshm agent`` and ``qubesshm guid-emulator`` run as the separate processes they
are, on a private Xvfb; XTest makes the input on the emulator's X windows, as a person
at dom0's screen would. What reaches the clients proves the agent's whole path (the
daemon's messages dispatched to the seat, the windows and the clipboard, the pipes read
on the loop): typed text, a click and a wheel step at surface-local coordinates, a
resize from X that the app's next frame follows, a close from X that ends it, and text
copied both ways through the emulator's clipboard files.
"""

from __future__ import annotations

import json
import os
import select
import shutil
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import xcffib.xproto as xp
import xinput
from agent_world import (
    REPO,
    Agent,
    Proc,
    Screen,
    World,
    Xvfb,
    daemon_connected,
    new_world,
    private_xvfb,
    start_agent,
    start_emulator,
    wait_until,
)
from compositor_clients import PyClient, solid
from pywayland.protocol.wayland import WlDataDeviceManager, WlSeat

pytestmark = pytest.mark.skipif(shutil.which("Xvfb") is None,
                                reason="needs Xvfb (the emulator shows windows on X)")

TEXT = "Grüße aus der VM — 世界\n"


@dataclass
class Setup:
    world: World
    agent: Agent
    emulator: Proc
    screen: Screen
    clipboard: Path


@pytest.fixture(scope="module")
def xvfb() -> Iterator[Xvfb]:
    with private_xvfb() as server:
        yield server


@pytest.fixture
def setup(xvfb: Xvfb) -> Iterator[Setup]:
    with new_world(xvfb.display) as world:
        clipboard = world.top / "clip"
        agent = start_agent(world)
        emulator = start_emulator(world, "--clipboard-dir", str(clipboard))
        screen = Screen(xvfb.display)
        try:
            wait_until(lambda: daemon_connected(agent), "the emulator connected")
            yield Setup(world, agent, emulator, screen, clipboard)
        finally:
            screen.close()
            emulator.stop()
            agent.stop()


def events(client: Proc) -> list[dict[str, Any]]:
    out = []
    for line in client.output().splitlines():
        if line.startswith("{"):
            out.append(json.loads(line))
    return out


def focus(setup: Setup, xid: int) -> None:
    """X input focus to the emulator's window (Xvfb has no window manager to do it)."""
    conn = setup.screen.conn
    conn.core.SetInputFocus(xp.InputFocus.PointerRoot, xid, xp.Time.CurrentTime)
    conn.core.GetInputFocus().reply()


def input_client(setup: Setup, title: str) -> Proc:
    """``bench/input_client.py`` on the agent: its stdin kept open (it ends at EOF)."""
    log = setup.world.top / f"input_client.{time.monotonic_ns()}.log"
    with open(log, "wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "qubesshm.bench.input_client", "--size", "200x150",
             "--title", title], env=setup.agent.client_env(), cwd=REPO,
            stdin=subprocess.PIPE, stdout=out, stderr=subprocess.STDOUT)
    return Proc("input_client", process, log)


def test_typing_clicking_scrolling_resizing_and_closing_from_x(setup: Setup) -> None:
    client = input_client(setup, "e2e-input")
    try:
        check_input(setup, client)
    finally:
        client.stop()


def check_input(setup: Setup, client: Proc) -> None:
    window = wait_until(lambda: setup.screen.find(name=b"e2e-input"), "the client's window",
                        detail=lambda: client.output()[-2000:])
    wait_until(lambda: setup.screen.viewable(window.xid), "the window mapped")
    x, y, width, height = setup.screen.geometry(window.xid)
    assert (width, height) == (200, 150)
    conn = setup.screen.conn
    focus(setup, window.xid)
    wait_until(lambda: any(e["ev"] == "kb_enter" for e in events(client)), "keyboard focus")
    xinput.type_text(conn, "Zy!\n")
    wait_until(lambda: "".join(e.get("utf8", "") for e in events(client)
                               if e["ev"] == "key" and e["state"] == 1) == "Zy!\r",
               "the typed text")
    xinput.click(conn, x + 30, y + 40, 3)
    xinput.scroll(conn, x + 30, y + 40, 1)
    wait_until(lambda: [e for e in events(client) if e["ev"] == "axis"], "the wheel step")
    got = events(client)
    buttons = [(e["button"], e["state"], e["x"], e["y"]) for e in got if e["ev"] == "button"]
    assert buttons == [(0x111, 1, 30.0, 40.0), (0x111, 0, 30.0, 40.0)]
    axes = [(e["axis"], e["value"]) for e in got if e["ev"] == "axis"]
    assert axes == [(0, 15.0)]
    # A resize in dom0 (here: straight on the X window, as a window manager would).
    conn.core.ConfigureWindow(window.xid, xp.ConfigWindow.Width | xp.ConfigWindow.Height,
                              [260, 170])
    conn.flush()
    wait_until(lambda: [e for e in events(client) if e["ev"] == "drawn"
                        and (e["width"], e["height"]) == (260, 170)], "the app's next frame")
    assert setup.screen.geometry(window.xid)[2:] == (260, 170)
    # Closing it (WM_DELETE_WINDOW, as dom0's window manager sends) ends the app cleanly.
    protocols = conn.core.InternAtom(False, 12, "WM_PROTOCOLS").reply().atom
    delete = conn.core.InternAtom(False, 16, "WM_DELETE_WINDOW").reply().atom
    event = struct.pack("=BBHII5I", 33, 32, 0, window.xid, protocols, delete, 0, 0, 0, 0)
    conn.core.SendEvent(False, window.xid, 0, event)
    conn.flush()
    assert client.wait_exit() == 0
    assert any(e["ev"] == "close" for e in events(client))


class Copier:
    """A pywayland client of the agent (in the test's process: the agent is another
    one) with a window and a data device: copies a text, and reads what is pasted."""

    def __init__(self, agent: Agent) -> None:
        self.c = PyClient(agent.socket_path)
        self.seat = self.c.bind(WlSeat, 5)
        self.keyboard = self.seat.get_keyboard()
        self.enters: list[int] = []

        def enter(_: Any, serial: int, surface: Any, keys: Any) -> None:
            self.enters.append(serial)

        def keymap(_: Any, fmt: int, fd: int, size: int) -> None:
            os.close(fd)

        self.keyboard.dispatcher["enter"] = enter
        self.keyboard.dispatcher["keymap"] = keymap
        self.manager = self.c.bind(WlDataDeviceManager, 3)
        self.device = self.manager.get_data_device(self.seat)
        self.mimes: dict[Any, list[str]] = {}
        self.selections: list[Any] = []

        def data_offer(_: Any, offer: Any) -> None:
            mimes: list[str] = []
            self.mimes[offer] = mimes

            def on_offer(_: Any, mime: str) -> None:
                mimes.append(mime)

            offer.dispatcher["offer"] = on_offer

        def selection(_: Any, offer: Any) -> None:
            self.selections.append(offer)

        self.device.dispatcher["data_offer"] = data_offer
        self.device.dispatcher["selection"] = selection
        self.window = self.c.toplevel("e2e-clipboard")
        self.c.show(self.window.surface, self.c.buffer(solid(120, 80, 0xFF208040)))
        self.c.roundtrip()
        self.sent = 0

    def copy(self, data: bytes) -> None:
        source = self.manager.create_data_source()

        def send(_: Any, mime: str, fd: int) -> None:
            try:
                os.write(fd, data)
            finally:
                os.close(fd)
            self.sent += 1

        def cancelled(_: Any) -> None:
            pass

        source.dispatcher["send"] = send
        source.dispatcher["cancelled"] = cancelled
        source.offer("text/plain;charset=utf-8")
        self.device.set_selection(source, self.enters[-1])
        self.c.roundtrip()
        self.source = source

    def paste(self, offer: Any) -> bytes:
        read_end, write_end = os.pipe2(os.O_CLOEXEC)
        offer.receive("text/plain;charset=utf-8", write_end)
        os.close(write_end)
        self.c.display.flush()
        out = bytearray()
        try:
            while True:
                ready, _, _ = select.select([read_end], [], [], 10)
                assert ready, "no EOF of the pasted text"
                chunk = os.read(read_end, 65536)
                if not chunk:
                    return bytes(out)
                out += chunk
        finally:
            os.close(read_end)


def test_text_copied_both_ways_through_the_emulators_clipboard(setup: Setup) -> None:
    app = Copier(setup.agent)
    try:
        window = wait_until(lambda: setup.screen.find(name=b"e2e-clipboard"), "the window")
        wait_until(lambda: setup.screen.viewable(window.xid), "the window mapped")
        x, y, _w, _h = setup.screen.geometry(window.xid)
        focus(setup, window.xid)
        app.c.wait(lambda: bool(app.enters), "keyboard focus")
        app.copy(TEXT.encode())
        conn = setup.screen.conn
        xinput.move(conn, x + 5, y + 5)
        xinput.chord(conn, "Control_L", "Shift_L", "c")  # copy to the global clipboard
        copied = setup.clipboard / "qubes-clipboard.bin"
        app.c.wait(lambda: copied.exists() and copied.read_bytes() == TEXT.encode(),
                   "the VM's text in dom0's clipboard file")
        assert app.sent == 1
        # dom0's text pasted into the VM (Ctrl+Shift+V): offered to the focused client.
        copied.write_bytes("aus dom0 ✓".encode())
        (setup.clipboard / "qubes-clipboard.bin.source").write_bytes(b"dom0")
        seen = len(app.selections)
        xinput.chord(conn, "Control_L", "Shift_L", "v")
        app.c.wait(lambda: len(app.selections) > seen and app.selections[-1] is not None,
                   "the pasted selection offer")
        offer = app.selections[-1]
        assert "text/plain;charset=utf-8" in app.mimes[offer]
        assert app.paste(offer) == "aus dom0 ✓".encode()
    finally:
        app.c.disconnect()
