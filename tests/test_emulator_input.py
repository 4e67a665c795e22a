"""Input on the emulator's windows, and the XTest helpers (tests/xinput.py) the input tests use.

The helpers are proven on a private Xvfb against a plain X window of the test's own: the
key events they cause, read back with xcffib and decoded with xkbcommon's "us" keymap
(not with the X server's mapping the helpers used), spell the text typed; clicks,
motion and scrolling arrive at the root coordinates asked for.

Then the emulator (its own process, as dom0's daemon is) on that Xvfb, with the tiny
agent of ``test_emulator_x`` at the other end of the vchan: XTest input on its window
reaches the agent as exactly the messages qubes-guid sends, in order (field values
written out here from ``gui-daemon/xside.c``); the clipboard keys move text through
the clipboard file both ways; ``WM_DELETE_WINDOW``, a resize through X and
``_NET_WM_STATE`` become ``CLOSE``, ``CONFIGURE`` and ``WINDOW_FLAGS``; ``CURSOR``
shows the X cursor font's cursor.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import xcffib
import xcffib.xfixes
import xcffib.xproto as xp
import xinput
from test_emulator_x import (
    CLIPBOARD_LINE,
    DEADLINE,
    HEIGHT,
    REPO,
    WIDTH,
    Agent,
    World,
    find_window,
    new_world,
    serving,
    start_emulator,
)
from xkbcommon import xkb

from qubesshm.bench.private_x import private_xvfb
from qubesshm.emulator.clipboard import CLIPBOARD_FILE, Metadata
from qubesshm.guiproto import messages as gm

pytestmark = pytest.mark.skipif(shutil.which("Xvfb") is None, reason="needs Xvfb")


@pytest.fixture(scope="module")
def display() -> Iterator[str]:
    with private_xvfb(WIDTH, HEIGHT) as server:
        yield server.display


@pytest.fixture
def world() -> Iterator[World]:
    with new_world() as found:
        yield found


def plain_window(conn: Any, x: int, y: int, width: int, height: int) -> int:
    """A mapped override-redirect window selecting key, button and motion events."""
    screen = conn.get_setup().roots[0]
    xid = conn.generate_id()
    mask = (xp.EventMask.KeyPress | xp.EventMask.KeyRelease | xp.EventMask.ButtonPress
            | xp.EventMask.ButtonRelease | xp.EventMask.PointerMotion)
    conn.core.CreateWindow(screen.root_depth, xid, screen.root, x, y, width, height, 0,
                           xp.WindowClass.InputOutput, screen.root_visual,
                           xp.CW.BackPixel | xp.CW.OverrideRedirect | xp.CW.EventMask,
                           [0, 1, mask])
    conn.core.MapWindow(xid)
    xinput.sync(conn)  # mapped and viewable
    return int(xid)


def drain(conn: Any) -> list[Any]:
    """The events already queued (after a round trip: all the ones it caused)."""
    found = []
    while (event := conn.poll_for_event()) is not None:
        found.append(event)
    return found


def spelled(keys: list[Any]) -> str:
    """What the key events type in xkbcommon's "us" keymap (X key code == xkb key code)."""
    state = xkb.Context().keymap_new_from_names(layout="us").state_new()
    text = ""
    for event in keys:
        press = isinstance(event, xp.KeyPressEvent)
        if press:
            text += state.key_get_string(event.detail)
        state.update_key(event.detail, xkb.XKB_KEY_DOWN if press else xkb.XKB_KEY_UP)
    return text


def test_type_text_spells_the_text_in_the_us_layout(display: str) -> None:
    conn = xcffib.connect(display=display)
    try:
        xid = plain_window(conn, 0, 0, 200, 100)
        xinput.move(conn, 50, 40)
        conn.core.SetInputFocus(xp.InputFocus.PointerRoot, xid, xp.Time.CurrentTime)
        drain(conn)
        text = "Hello Zy\n!@ ~q"
        xinput.type_text(conn, text)
        keys = [e for e in drain(conn) if isinstance(e, xp.KeyPressEvent | xp.KeyReleaseEvent)]
        assert spelled(keys) == text.replace("\n", "\r")
        assert {(e.event, e.event_x, e.event_y) for e in keys} == {(xid, 50, 40)}
        shift = xinput.KeyboardMapping.read(conn).keycode(xinput.NAMED_KEYSYMS["Shift_L"])
        capital = next(e for e in keys if isinstance(e, xp.KeyPressEvent) and e.detail != shift)
        assert capital.state & xp.ModMask.Shift  # "H": Shift held, as X reports it
        assert not keys[-1].state & xp.ModMask.Shift  # "q": released again

        xinput.chord(conn, "Control_L", "Shift_L", "c")
        chord = drain(conn)
        mapping = xinput.KeyboardMapping.read(conn)
        codes = [mapping.keycode(xinput.named_keysym(n)) for n in ("Control_L", "Shift_L", "c")]
        assert [(type(e), e.detail) for e in chord] == (
            [(xp.KeyPressEvent, c) for c in codes]
            + [(xp.KeyReleaseEvent, c) for c in reversed(codes)])
        assert chord[2].state & (xp.ModMask.Control | xp.ModMask.Shift) == (
            xp.ModMask.Control | xp.ModMask.Shift)

        xinput.key(conn, codes[2], True)
        xinput.key(conn, codes[2], False)
        assert [(type(e), e.detail) for e in drain(conn)] == [
            (xp.KeyPressEvent, codes[2]), (xp.KeyReleaseEvent, codes[2])]
        with pytest.raises(KeyError, match="0x10020ac"):
            xinput.type_text(conn, "€")  # not on the us keyboard: nothing typed
        assert drain(conn) == []
    finally:
        conn.disconnect()


def test_pointer_helpers_reach_the_root_coordinates_asked_for(display: str) -> None:
    conn = xcffib.connect(display=display)
    try:
        xid = plain_window(conn, 100, 50, 300, 200)
        drain(conn)
        xinput.move(conn, 130, 70)
        assert xinput.pointer(conn) == (130, 70)
        motion = drain(conn)
        assert [(type(e), e.event, e.event_x, e.event_y, e.root_x, e.root_y)
                for e in motion] == [(xp.MotionNotifyEvent, xid, 30, 20, 130, 70)]

        xinput.click(conn, 150, 90, 3)
        got = [(type(e).__name__, e.detail, e.event_x, e.event_y) for e in drain(conn)]
        assert got == [("MotionNotifyEvent", 0, 50, 40), ("ButtonPressEvent", 3, 50, 40),
                       ("ButtonReleaseEvent", 3, 50, 40)]

        xinput.scroll(conn, 160, 100, -2)
        xinput.scroll(conn, 160, 100, 1, horizontal=True)
        got = [(type(e).__name__, e.detail, e.event_x, e.event_y) for e in drain(conn)]
        motion = [("MotionNotifyEvent", 0, 60, 50)]  # each helper moves first, even in place
        assert got == motion + [
            ("ButtonPressEvent", 4, 60, 50), ("ButtonReleaseEvent", 4, 60, 50)] * 2 + motion + [
            ("ButtonPressEvent", 7, 60, 50), ("ButtonReleaseEvent", 7, 60, 50)]

        xinput.button(conn, 1, True)
        xinput.move(conn, 500, 400)  # outside: the implicit grab keeps the pointer
        xinput.button(conn, 1, False)
        moved = [(type(e).__name__, e.event_x, e.event_y) for e in drain(conn)]
        assert moved == [("ButtonPressEvent", 60, 50), ("MotionNotifyEvent", 400, 350),
                       ("ButtonReleaseEvent", 400, 350)]
    finally:
        conn.disconnect()


# -- the emulator: X input to the agent's messages ----------------------------------------------

Expect = list[tuple[int, gm.Body]]  # (window, body) of each message, in order
NO_KEYS = bytes(32)
WIN = 1  # the agent's window id
LEFT, TOP = 100, 100  # where the window is on the screen


async def received(agent: Agent, count: int) -> Expect:
    return [(m.window, m.body) for m in [await agent.next() for _ in range(count)]]


async def expect(agent: Agent, want: Expect) -> None:
    """The next messages the emulator sends are exactly these."""
    assert await received(agent, len(want)) == want


async def until(condition: Callable[[], object], what: str) -> None:
    deadline = time.monotonic() + DEADLINE
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


async def shown_window(agent: Agent, conn: Any, width: int = 200, height: int = 150) -> int:
    """A mapped (viewable) toplevel ``WIN`` at (LEFT, TOP), the pointer away from it."""
    xinput.move(conn, 5, 5)
    await agent.accept()
    await agent.send(WIN, gm.Create(LEFT, TOP, width, height, 0, 0))
    await agent.send(WIN, gm.Map(0, 0))

    def viewable() -> int | None:
        xid = find_window(conn, WIN)
        if xid is None or conn.core.GetWindowAttributes(xid).reply().map_state != 2:
            return None
        return xid

    await until(viewable, "the window on screen")
    xid = viewable()
    assert xid is not None
    return xid


def press(keycode: int, x: int, y: int, state: int = 0, release: bool = False) -> gm.Keypress:
    return gm.Keypress(3 if release else 2, x, y, state, keycode)


def run_emulator(world: World, display: str, scenario: Callable[[Agent, Any], Any]) -> str:
    """``scenario(agent, conn)`` against a fresh emulator; what the emulator said."""
    emulator = start_emulator(world, display)
    conn = xcffib.connect(display=display)

    async def body(agent: Agent) -> None:
        await scenario(agent, conn)

    try:
        asyncio.run(serving(world, body))
        assert asyncio.run(emulator.exited()) == 0, emulator.output()
        return emulator.everything()
    finally:
        emulator.stop()
        conn.disconnect()


def test_x_input_reaches_the_agent_as_qubes_guid_sends_it(display: str, world: World) -> None:
    async def scenario(agent: Agent, conn: Any) -> None:
        xid = await shown_window(agent, conn)
        keys = xinput.KeyboardMapping.read(conn)
        a, shift = keys.keycode(ord("a")), keys.keycode(xinput.NAMED_KEYSYMS["Shift_L"])
        # Into the window: which keys are down, the crossing (from the root: detail
        # NotifyAncestor; the focus is PointerRoot, so "focus" is 1), the motion.
        xinput.move(conn, LEFT + 30, TOP + 20)
        await expect(agent, [(0, gm.KeymapNotify(NO_KEYS)),
                             (WIN, gm.Crossing(7, 30, 20, 0, 0, 0, 1)),
                             (WIN, gm.Motion(30, 20, 0, 0))])
        xinput.type_text(conn, "aA")
        await expect(agent, [(WIN, press(a, 30, 20)), (WIN, press(a, 30, 20, release=True)),
                             (WIN, press(shift, 30, 20)), (WIN, press(a, 30, 20, 1)),
                             (WIN, press(a, 30, 20, 1, release=True)),
                             (WIN, press(shift, 30, 20, 1, release=True))])
        xinput.click(conn, LEFT + 40, TOP + 25, 3)
        xinput.scroll(conn, LEFT + 40, TOP + 25, 1)
        await expect(agent, [(WIN, gm.Motion(40, 25, 0, 0)),
                             (WIN, gm.Button(4, 40, 25, 0, 3)),
                             (WIN, gm.Button(5, 40, 25, 0x400, 3)),  # Button3Mask
                             (WIN, gm.Motion(40, 25, 0, 0)),
                             (WIN, gm.Button(4, 40, 25, 0, 5)),
                             (WIN, gm.Button(5, 40, 25, 0x1000, 5))])
        # Focus given to it: out of PointerRoot (NotifyPointer), in (NotifyNonlinear),
        # the key bitmap first; a keyboard grab and its end are not told.
        conn.core.SetInputFocus(xp.InputFocus.PointerRoot, xid, xp.Time.CurrentTime)
        xinput.sync(conn)
        await expect(agent, [(WIN, gm.Focus(10, 0, 5)), (0, gm.KeymapNotify(NO_KEYS)),
                             (WIN, gm.Focus(9, 0, 3))])
        root = conn.get_setup().roots[0].root
        grab = conn.core.GrabKeyboard(False, root, xp.Time.CurrentTime,
                                      xp.GrabMode.Async, xp.GrabMode.Async).reply()
        assert grab.status == xp.GrabStatus.Success
        conn.core.UngrabKeyboard(xp.Time.CurrentTime)
        # Out of the window with the focus still there: keys are the window's, at
        # coordinates outside it.
        xinput.move(conn, 500, 400)
        xinput.key(conn, a, True)
        xinput.key(conn, a, False)
        await expect(agent, [(WIN, gm.Crossing(8, 400, 300, 0, 0, 0, 1)),
                             (WIN, press(a, 400, 300)),
                             (WIN, press(a, 400, 300, release=True))])
        # Back in with Shift held: the enter's bitmap (read as the emulator takes the
        # enter, as the daemon reads it) has Shift's key.
        xinput.key(conn, shift, True)
        xinput.move(conn, LEFT + 1, TOP + 2)
        held = bytearray(32)
        held[shift // 8] |= 1 << (shift % 8)
        await expect(agent, [(WIN, press(shift, 400, 300)), (0, gm.KeymapNotify(bytes(held))),
                             (WIN, gm.Crossing(7, 1, 2, 1, 0, 0, 1)),
                             (WIN, gm.Motion(1, 2, 1, 0))])
        xinput.key(conn, shift, False)
        await expect(agent, [(WIN, press(shift, 1, 2, 1, release=True))])
        assert agent.received == []
        conn.core.SetInputFocus(xp.InputFocus._None, xp.InputFocus.PointerRoot,
                                xp.Time.CurrentTime)
        xinput.sync(conn)
        await expect(agent, [(WIN, gm.Focus(10, 0, 3)), (0, gm.KeymapNotify(NO_KEYS)),
                             (WIN, gm.Focus(9, 0, 5))])  # PointerRoot: the pointer's
        xinput.move(conn, LEFT + 2, TOP + 2)  # a marker: nothing came before it
        await expect(agent, [(WIN, gm.Motion(2, 2, 0, 0))])
        assert agent.stream is not None
        agent.stream.close()

    run_emulator(world, display, scenario)


def clipboard_file(world: World, suffix: str = "") -> Path:
    return world.clipboard / (CLIPBOARD_FILE + suffix)


def test_the_clipboard_keys_move_text_through_the_clipboard_file(display: str,
                                                                 world: World) -> None:
    copied = "from the VM: grüße ✓".encode()
    pasted = b"from dom0\n\tsecond line"

    async def scenario(agent: Agent, conn: Any) -> None:
        await shown_window(agent, conn)
        keys = xinput.KeyboardMapping.read(conn)
        ctrl = keys.keycode(xinput.NAMED_KEYSYMS["Control_L"])
        shift = keys.keycode(xinput.NAMED_KEYSYMS["Shift_L"])
        xinput.move(conn, LEFT + 10, TOP + 10)
        await received(agent, 3)  # the enter and the motion
        # Ctrl+Shift+C: the agent is asked; the C key's events are not forwarded.
        xinput.chord(conn, "Control_L", "Shift_L", "c")
        await expect(agent, [(WIN, press(ctrl, 10, 10)), (WIN, press(shift, 10, 10, 4)),
                             (WIN, gm.ClipboardReq()),
                             (WIN, press(shift, 10, 10, 5, release=True)),
                             (WIN, press(ctrl, 10, 10, 4, release=True))])
        await agent.send(WIN, gm.ClipboardData(copied))
        await until(lambda: clipboard_file(world).exists()
                    and clipboard_file(world).read_bytes() == copied, "the copied text")
        assert clipboard_file(world, ".source").read_bytes() == b"vm5"
        metadata = Metadata.parse(clipboard_file(world, ".metadata").read_text())
        assert metadata is not None and metadata.copy_action and metadata.successful
        assert metadata.sent_size == len(copied) and metadata.vmname == "vm5"

        # Ctrl+Shift+V: the file's text (put there by "dom0") is sent, then emptied.
        clipboard_file(world).write_bytes(pasted)
        clipboard_file(world, ".source").write_bytes(b"dom0")
        xinput.chord(conn, "Control_L", "Shift_L", "v")
        await expect(agent, [(WIN, press(ctrl, 10, 10)), (WIN, press(shift, 10, 10, 4)),
                             (WIN, gm.ClipboardData(pasted)),
                             (WIN, press(shift, 10, 10, 5, release=True)),
                             (WIN, press(ctrl, 10, 10, 4, release=True))])
        assert clipboard_file(world).read_bytes() == b""
        assert clipboard_file(world, ".source").read_bytes() == b""
        # Pasted once: a second paste has nothing to send.
        xinput.chord(conn, "Control_L", "Shift_L", "v")
        await expect(agent, [(WIN, press(ctrl, 10, 10)), (WIN, press(shift, 10, 10, 4)),
                             (WIN, press(shift, 10, 10, 5, release=True)),
                             (WIN, press(ctrl, 10, 10, 4, release=True))])
        assert agent.stream is not None
        agent.stream.close()

    said = run_emulator(world, display, scenario)
    assert said.startswith(f"{CLIPBOARD_LINE}{clipboard_file(world)} "), said


def client_message(window: int, type_atom: int, words: list[int]) -> bytes:
    return struct.pack("=BBHII5I", 33, 32, 0, window, type_atom, *words, *[0] * (5 - len(words)))


def atom(conn: Any, name: str) -> int:
    return int(conn.core.InternAtom(False, len(name), name).reply().atom)


def test_close_resize_and_states_from_x(display: str, world: World) -> None:
    async def scenario(agent: Agent, conn: Any) -> None:
        xid = await shown_window(agent, conn)
        protocols = conn.core.GetProperty(False, xid, atom(conn, "WM_PROTOCOLS"), xp.Atom.ATOM,
                                          0, 8).reply()
        assert struct.unpack("=2I", protocols.value.buf()) == (
            atom(conn, "WM_DELETE_WINDOW"), atom(conn, "_NET_WM_PING"))
        # A window manager's close (ICCCM WM_DELETE_WINDOW): CLOSE.
        conn.core.SendEvent(False, xid, 0, client_message(
            xid, atom(conn, "WM_PROTOCOLS"), [atom(conn, "WM_DELETE_WINDOW"), 0]))
        xinput.sync(conn)
        await expect(agent, [(WIN, gm.Close())])
        # Resized and moved through X: CONFIGURE with the new geometry. Until the agent
        # answers, another change is not told; an answer that is not the geometry now is
        # answered with it (whichever of the two the emulator reads first, the agent
        # next hears the latest geometry, once).
        mask = (xp.ConfigWindow.X | xp.ConfigWindow.Y | xp.ConfigWindow.Width
                | xp.ConfigWindow.Height)
        conn.core.ConfigureWindow(xid, mask, [150, 160, 320, 240])
        xinput.sync(conn)
        await expect(agent, [(WIN, gm.Configure(150, 160, 320, 240, 0))])
        conn.core.ConfigureWindow(xid, xp.ConfigWindow.Width | xp.ConfigWindow.Height,
                                  [330, 250])
        xinput.sync(conn)
        await agent.send(WIN, gm.Configure(150, 160, 320, 240, 0))  # the agent's answer
        await expect(agent, [(WIN, gm.Configure(150, 160, 330, 250, 0))])
        await agent.send(WIN, gm.Configure(150, 160, 330, 250, 0))
        geometry = conn.core.GetGeometry(xid).reply()
        assert (geometry.x, geometry.y, geometry.width, geometry.height) == (150, 160, 330, 250)
        # _NET_WM_STATE (as a window manager sets it): WINDOW_FLAGS of what changed (the
        # property is read when the emulator takes the event, as the daemon reads it).
        state = atom(conn, "_NET_WM_STATE")
        fullscreen = atom(conn, "_NET_WM_STATE_FULLSCREEN")
        conn.core.ChangeProperty(xp.PropMode.Replace, xid, state, xp.Atom.ATOM, 32, 2,
                                 struct.pack("=2I", atom(conn, "_NET_WM_STATE_ABOVE"),
                                             fullscreen))
        xinput.sync(conn)
        await expect(agent, [(WIN, gm.WindowFlags(gm.WINDOW_FLAG_FULLSCREEN, 0))])
        conn.core.DeleteProperty(xid, state)
        xinput.sync(conn)
        await expect(agent, [(WIN, gm.WindowFlags(0, gm.WINDOW_FLAG_FULLSCREEN))])
        # A window manager's ping is answered to the root window; the agent hears nothing.
        root = conn.get_setup().roots[0].root
        conn.core.ChangeWindowAttributes(root, xp.CW.EventMask,
                                         [xp.EventMask.SubstructureNotify])
        conn.core.SendEvent(False, xid, 0, client_message(
            xid, atom(conn, "WM_PROTOCOLS"), [atom(conn, "_NET_WM_PING"), 1234, xid]))
        xinput.sync(conn)

        def pong() -> Any:
            event = conn.poll_for_event()
            while event is not None and not isinstance(event, xp.ClientMessageEvent):
                event = conn.poll_for_event()
            return event

        answer = None

        def answered() -> bool:
            nonlocal answer
            answer = pong()
            return answer is not None

        await until(answered, "the ping's answer")
        assert answer is not None
        assert (answer.window, list(answer.data.data32)[:3]) == (
            root, [atom(conn, "_NET_WM_PING"), 1234, xid])
        conn.core.ChangeWindowAttributes(root, xp.CW.EventMask, [0])
        xinput.move(conn, 150 + 3, 160 + 3)  # a marker: nothing came before it
        await expect(agent, [(0, gm.KeymapNotify(NO_KEYS)),
                             (WIN, gm.Crossing(7, 3, 3, 0, 0, 0, 1)),
                             (WIN, gm.Motion(3, 3, 0, 0))])
        assert agent.stream is not None
        agent.stream.close()

    run_emulator(world, display, scenario)


def cursor_image(conn: Any) -> tuple[int, int, int, int, tuple[int, ...]]:
    reply = conn(xcffib.xfixes.key).GetCursorImage().reply()
    return (reply.width, reply.height, reply.xhot, reply.yhot, tuple(reply.cursor_image))


def test_cursor_x11_shows_the_x_cursor_fonts_cursor(display: str, world: World) -> None:
    xc_xterm, xc_watch = 152, 150  # X11/cursorfont.h

    async def scenario(agent: Agent, conn: Any) -> None:
        conn(xcffib.xfixes.key).QueryVersion(4, 0).reply()
        xid = await shown_window(agent, conn)
        default = cursor_image(conn)  # over the root window
        # What XCreateFontCursor makes: the glyph and the next one as its mask from the
        # "cursor" font, black on white; shown by a window of the test's own.
        font, reference = conn.generate_id(), conn.generate_id()
        conn.core.OpenFont(font, len(b"cursor"), b"cursor")
        images = {}
        screen = conn.get_setup().roots[0]
        for glyph in (xc_xterm, xc_watch):
            cursor = conn.generate_id()
            conn.core.CreateGlyphCursor(cursor, font, font, glyph, glyph + 1, 0, 0, 0,
                                        0xFFFF, 0xFFFF, 0xFFFF)
            conn.core.CreateWindow(screen.root_depth, reference, screen.root, 600, 600, 50, 50,
                                   0, xp.WindowClass.InputOutput, screen.root_visual,
                                   xp.CW.OverrideRedirect | xp.CW.Cursor, [1, cursor])
            conn.core.MapWindow(reference)
            xinput.move(conn, 610, 610)
            images[glyph] = cursor_image(conn)
            conn.core.DestroyWindow(reference)
            xinput.move(conn, 5, 5)
        assert images[xc_xterm] != images[xc_watch] != default
        cases: list[tuple[int | None, tuple[int, int, int, int, tuple[int, ...]]]] = [
            (xc_xterm, images[xc_xterm]), (xc_watch, images[xc_watch]),
            (xc_xterm + 1, default), (None, default)]  # an odd glyph: the default
        for shape, want in cases:
            cursor = gm.CURSOR_DEFAULT if shape is None else gm.CURSOR_X11 + shape
            await agent.send(WIN, gm.Cursor(cursor))
            xinput.move(conn, LEFT + 50, TOP + 50)

            def shows(want: tuple[int, int, int, int, tuple[int, ...]] = want) -> bool:
                return cursor_image(conn) == want

            await until(shows, f"cursor {cursor:#x} over the window")
            xinput.move(conn, 5, 5)
        assert find_window(conn, WIN) == xid
        assert agent.stream is not None
        agent.stream.close()

    run_emulator(world, display, scenario)


def test_a_clipboard_dir_that_is_not_private_is_refused(display: str, world: World) -> None:
    shared = world.top / "shared"
    shared.mkdir(mode=0o755)
    os.chmod(shared, 0o755)
    result = subprocess.run(
        [sys.executable, "-m", "qubesshm.emulator.main", "--domid", "5", "--display", display,
         "--clipboard-dir", str(shared)], capture_output=True, text=True, cwd=REPO,
        env=world.env(None), timeout=60, check=False)
    assert result.returncode == 1
    assert result.stderr.splitlines() == [
        f"qubesshm guid-emulator: no clipboard directory: the clipboard directory {shared} "
        f"has mode 0755; others may read it: chmod 0700 {shared}"]
