"""Agent mode usable end to end: real apps driven through the GUI-daemon emulator with XTest.

``qubesshm agent`` serves the apps; ``qubesshm guid-emulator`` shows their windows
on a private Xvfb and turns X input on them into the daemon's messages, as
``qubesshm run --agent --emulator`` runs them. The test presses keys and buttons
with XTest (``tests/xinput``) on the emulator's X windows, given the X focus as a
window manager would, and reads the results back from the apps themselves:

- typing: a shell command typed into ``foot`` writes a file the test reads (Shift
  and symbols included; with ``--keyboard-layout de`` the ``z`` and ``y`` keys
  swap, as a German keyboard has them); text typed into a GTK 3 and a GTK 4 entry
  (``gtk3-demo``, ``gtk4-demo``) and into Qt 5's ``application`` example comes back
  through the clipboard (select all, copy in the app, Ctrl+Shift+C on the
  emulator's window: the emulator's clipboard file);
- clicks: Qt 5's ``calculator`` (which takes no keys: its buttons have no
  shortcuts), clicked ``1 2 x 3 =``, shows the same display as one clicked ``3 6``
  (pixels);
- pointer events at exact surface-local coordinates through a subsurface and a
  popup, buttons and wheel (``qubesshm.bench.input_client``, which reports each);
  a grabbing popup dismissed by a press outside it;
- a menu of GTK 3, GTK 4 (the demos' application demo) and Qt 5 (its
  ``application`` example) opens as an override-redirect window placed under its
  menu item and closes on a click outside;
- resizing the X window resizes the app: its next frame has the new size,
  pixel-exact on the emulator's window; closing the X window (WM_DELETE_WINDOW)
  ends the app with status 0;
- the clipboard both ways: text put in the emulator's clipboard and pasted with
  Ctrl+Shift+V then the app's paste key reaches the app; text copied in the app
  reaches the emulator's clipboard file with Ctrl+Shift+C; the same with a pywayland
  client's own data source and offer.

Every step waits on a condition (a file's content, an event line, pixels), never
on time alone. A missing app is a skip that names it.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import re
import select
import shutil
import signal
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import xcffib
import xcffib.xproto as xp
import xinput
from agent_world import (
    REPO,
    Agent,
    Proc,
    Screen,
    World,
    Xvfb,
    XWindow,
    daemon_connected,
    new_world,
    private_xvfb,
    start_agent,
    start_client,
    start_emulator,
    wait_until,
)
from compositor_clients import PyClient, solid
from numpy.typing import NDArray
from pywayland.protocol.wayland import WlDataDeviceManager, WlSeat

from qubesshm.bench import input_client

pytestmark = pytest.mark.skipif(shutil.which("Xvfb") is None,
                                reason="needs Xvfb (the emulator shows windows on X)")

QT_EXAMPLES = Path("/usr/lib/x86_64-linux-gnu/qt5/examples/widgets")
CALCULATOR = QT_EXAMPLES / "widgets/calculator/calculator"
QT_APPLICATION = QT_EXAMPLES / "mainwindows/application/application"
CLIPBOARD = "qubes-clipboard.bin"
BTN_LEFT, BTN_RIGHT, BTN_MIDDLE, BTN_SIDE, BTN_EXTRA = 0x110, 0x111, 0x112, 0x113, 0x114
GTK_MENU_SHELL_TIMEOUT = 0.6  # s: GTK's 500 ms and a margin (see the menu test)
COPY_RETRY = 0.5  # s between Ctrl+Shift+C presses waiting for an app's copy
RED = 0xFF0000  # the frame the emulator draws inside override-redirect windows
BORDER = 2


def need(program: str | Path) -> str:
    """``program``'s path, or a skip naming it."""
    found = shutil.which(str(program))
    if found is None:
        pytest.skip(f"{program} is not installed (.ci/install installs it)")
    return found


# -- the session: agent, emulator, X ---------------------------------------------------------


@pytest.fixture(scope="module")
def xvfb() -> Iterator[Xvfb]:
    with private_xvfb() as server:
        yield server


@dataclass(eq=False)
class Session:
    """An agent, the emulator showing its windows, and the test's X connection."""

    world: World
    agent: Agent
    emulator: Proc
    screen: Screen
    clipboard_dir: Path
    apps: list[Proc] = field(default_factory=list)

    @property
    def conn(self) -> Any:
        return self.screen.conn

    def check_healthy(self) -> None:
        assert self.emulator.running, f"the emulator exited: {self.emulator.output()[-3000:]}"
        assert self.agent.running, f"the agent exited: {self.agent.output()[-3000:]}"
        assert not self.agent.problems(), self.agent.problems()

    def app(self, argv: list[str], **env: str) -> Proc:
        """``argv`` on the agent. gtk3-demo shows its main window (titled "Application
        Class", 800 wide) beside the demo run: it is waited for too, so that it is not
        mapped over the window under test later."""
        proc = start_client(self.agent, argv, **env)
        self.apps.append(proc)
        if Path(argv[0]).name == "gtk3-demo" and any(a.startswith("--run") for a in argv):
            self.window(proc, name=b"Application Class",
                        pick=lambda w: self.screen.geometry(w.xid)[2] >= 800)
        return proc

    def window(self, proc: Proc, *, name: bytes | None = None,
               pick: Callable[[XWindow], bool] | None = None) -> XWindow:
        """The mapped window of the emulator's named ``name`` (the one ``pick`` likes
        when several are), once it is there."""
        def found() -> XWindow | None:
            assert proc.running, f"{proc.name} exited: {proc.output()[-3000:]}"
            for window in self.screen.windows():
                if name is not None and self.screen.prop(window.xid, "WM_NAME") != name:
                    continue
                if pick is None or pick(window):
                    return window
            return None

        return wait_until(found, f"{proc.name}'s window {name!r}", detail=self.describe)

    def describe(self) -> str:
        return str([(w.gui_id, self.screen.prop(w.xid, "WM_NAME"),
                     self.screen.geometry(w.xid)) for w in self.screen.windows()])

    def focus(self, window: XWindow) -> None:
        """``window`` raised and given the X input focus, as a window manager does on a
        click (raised: pixels read back and clicks are the window's own, not those of
        another app window the emulator placed over it)."""
        self.conn.core.ConfigureWindow(window.xid, xp.ConfigWindow.StackMode,
                                       [xp.StackMode.Above])
        self.conn.core.SetInputFocus(xp.InputFocus.PointerRoot, window.xid,
                                     xp.Time.CurrentTime)
        xinput.sync(self.conn)
        assert int(self.conn.core.GetInputFocus().reply().focus) == window.xid

    def origin(self, window: XWindow) -> tuple[int, int]:
        x, y, _, _ = self.screen.geometry(window.xid)
        return x, y

    def pixels(self, window: XWindow) -> NDArray[np.uint32]:
        _, _, width, height = self.screen.geometry(window.xid)
        return self.screen.image(window.xid, width, height)

    def drawn(self, window: XWindow, colours: int = 10) -> bool:
        """The window shows more than ``colours`` colours (an app's drawing, not a
        blank area)."""
        try:
            return len(np.unique(self.pixels(window))) > colours
        except xcffib.XcffibException:
            return False

    # the clipboard the emulator keeps, as qubes-guid does in /run/qubes

    def clipboard(self) -> bytes | None:
        path = self.clipboard_dir / CLIPBOARD
        return path.read_bytes() if path.exists() else None

    def put_clipboard(self, text: bytes) -> None:
        """Text in the global clipboard, as a copy in another VM leaves it."""
        (self.clipboard_dir / CLIPBOARD).write_bytes(text)
        (self.clipboard_dir / (CLIPBOARD + ".source")).write_bytes(b"dom0")

    def copy_to_dom0(self, window: XWindow, text: bytes) -> None:
        """Select all and copy in the app (Ctrl+A, Ctrl+C), then Ctrl+Shift+C on
        ``window``, until ``text`` is in the clipboard file. An app sets its selection
        once it has handled the keys, and takes a paste in its own time, neither of
        which anything outside it tells; the agent answers each Ctrl+Shift+C with the
        selection of that moment (as a person's later press would find it), so the
        three are repeated, at most twice a second, until the app's text has come."""
        self.focus(window)
        pressed = [0.0]

        def copied() -> bool:
            if self.clipboard() == text:
                return True
            if time.monotonic() - pressed[0] >= COPY_RETRY:
                xinput.chord(self.conn, "Control_L", "a")
                xinput.chord(self.conn, "Control_L", "c")
                xinput.chord(self.conn, "Control_L", "Shift_L", "c")
                pressed[0] = time.monotonic()
            return False

        wait_until(copied, f"{text!r} in the emulator's clipboard",
                   detail=lambda: (self.clipboard(), self.emulator.output()[-2000:]))

    def close(self, window: XWindow) -> None:
        """What a window manager's close button does: WM_DELETE_WINDOW."""
        protocols, delete = atom(self.conn, "WM_PROTOCOLS"), atom(self.conn, "WM_DELETE_WINDOW")
        event = struct.pack("=BBHII5I", 33, 32, 0, window.xid, protocols, delete, 0, 0, 0, 0)
        self.conn.core.SendEvent(False, window.xid, 0, event)
        xinput.sync(self.conn)


def atom(conn: Any, name: str) -> int:
    return int(conn.core.InternAtom(False, len(name), name).reply().atom)


StartSession = Callable[..., Session]


@pytest.fixture
def start_session(xvfb: Xvfb) -> Iterator[StartSession]:
    """``start_session(*agent_args)``: an agent and an emulator (with a clipboard
    directory of the test's) connected; what is left running at the end is stopped."""
    with contextlib.ExitStack() as stack:

        def start(*agent_args: str) -> Session:
            world = stack.enter_context(new_world(xvfb.display))
            clipboard_dir = world.top / "clip"
            clipboard_dir.mkdir(mode=0o700)
            screen = Screen(xvfb.display)
            stack.callback(screen.close)
            wait_until(lambda: not screen.windows(), "an earlier emulator's windows to go")
            agent = start_agent(world, "-v", *agent_args)
            stack.callback(agent.stop, signal.SIGKILL)
            emulator = start_emulator(world, "--clipboard-dir", str(clipboard_dir))
            stack.callback(emulator.stop, signal.SIGKILL)
            session = Session(world, agent, emulator, screen, clipboard_dir)
            stack.callback(lambda: [app.stop(signal.SIGKILL) for app in session.apps])
            wait_until(lambda: daemon_connected(agent), "the emulator to connect")
            return session

        yield start


# -- the input client ---------------------------------------------------------------------------


class InputClient:
    """``qubesshm.bench.input_client`` on the agent: its event lines, and its commands."""

    def __init__(self, session: Session, *args: str) -> None:
        self.session = session
        self.log = session.world.top / f"input-client.{time.monotonic_ns()}.log"
        self.err = self.log.with_suffix(".err")
        with open(self.log, "wb") as out, open(self.err, "wb") as err:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "qubesshm.bench.input_client", *args],
                env=session.agent.client_env(), cwd=REPO, stdin=subprocess.PIPE,
                stdout=out, stderr=err)
        self.seen = 0  # events before this index have been matched

    def events(self) -> list[dict[str, Any]]:
        text = self.log.read_text()
        return [json.loads(line) for line in text.splitlines(keepends=True)
                if line.endswith("\n")]

    def output(self) -> str:
        return self.log.read_text()[-3000:] + self.err.read_text()[-2000:]

    def next(self, what: str, **fields: Any) -> dict[str, Any]:
        """The next event (after the last one matched) of kind ``what`` with ``fields``."""
        def found() -> dict[str, Any] | None:
            assert self.process.poll() is None or self.seen < len(self.events()), \
                f"the input client exited: {self.output()}"
            events = self.events()
            for index in range(self.seen, len(events)):
                event = events[index]
                if event["ev"] == what and all(event.get(k) == v for k, v in fields.items()):
                    self.seen = index + 1
                    return event
            return None

        return wait_until(found, f"the input client's {what} {fields}",
                          detail=lambda: self.events()[self.seen:][-20:])

    def since(self) -> list[dict[str, Any]]:
        """The events not matched yet."""
        return self.events()[self.seen:]

    def command(self, line: str) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write(line.encode() + b"\n")
        self.process.stdin.flush()

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()


# -- typing: foot ------------------------------------------------------------------------------


def start_foot(session: Session, cwd: Path) -> XWindow:
    """foot running /bin/sh in ``cwd``, with its config of the test's (Ctrl+V pastes,
    since the emulator keeps Ctrl+Shift+V as the daemon does), drawn and focused."""
    foot = need("foot")
    config = session.world.top / "cfg" / "foot"
    config.mkdir(parents=True, exist_ok=True)
    (config / "foot.ini").write_text("[key-bindings]\nclipboard-paste=Control+v\n")
    cwd.mkdir(exist_ok=True)
    app = session.app([foot, "--app-id", "qsfoot", "--title", "qsfoot",
                       f"--working-directory={cwd}", "/bin/sh"],
                      XDG_CONFIG_HOME=str(session.world.top / "cfg"), SHELL="/bin/sh",
                      HOME=str(session.world.top), ENV="/dev/null", PS1="$ ")
    window = session.window(app, name=b"qsfoot")
    wait_until(lambda: session.drawn(window, 1), "foot's first drawing")
    session.focus(window)
    return window


def file_says(path: Path, text: str) -> bool:
    return path.exists() and path.read_text() == text


def test_typing_into_foot_runs_the_command_with_shift_and_symbols(
        start_session: StartSession) -> None:
    session = start_session()
    cwd = session.world.top / "work"
    start_foot(session, cwd)
    xinput.type_text(session.conn, "echo 'Hello Zy: A&B, 1+2=3!' > typed.txt\n")
    wait_until(lambda: file_says(cwd / "typed.txt", "Hello Zy: A&B, 1+2=3!\n"),
               "the command's file", detail=lambda: sorted(p.name for p in cwd.iterdir()))
    session.check_healthy()


def test_a_german_layout_swaps_z_and_y(start_session: StartSession) -> None:
    session = start_session("--keyboard-layout", "de")
    cwd = session.world.top / "work"
    start_foot(session, cwd)
    # The X server's keyboard is a US one: the keys typed are those of "Zy" there, which
    # a German keymap reads as "Yz" (letters and space are where they are on both).
    xinput.type_text(session.conn, "touch Zy\n")
    wait_until(lambda: (cwd / "Yz").exists(), "a file named Yz",
               detail=lambda: sorted(p.name for p in cwd.iterdir()))
    assert not (cwd / "Zy").exists()
    session.check_healthy()


# -- typing: GTK 3 and Qt 5, read back through the clipboard --------------------------------


@pytest.mark.parametrize(("demo", "env", "name"), [
    ("gtk3-demo --run=entry_buffer", {}, b"Entry Buffer"),
    ("gtk4-demo --run=entry_undo", {"GSK_RENDERER": "cairo"}, b"Undo and Redo"),
], ids=["gtk3", "gtk4"])
def test_typing_into_a_gtk_entry_and_copying_it_to_dom0(
        start_session: StartSession, demo: str, env: dict[str, str], name: bytes) -> None:
    program, run = demo.split()
    session = start_session()
    app = session.app([need(program), run], **env)
    window = session.window(app, name=name)
    session.focus(window)  # the (first) entry has GTK's focus in its window
    wait_until(lambda: session.drawn(window), "the entry demo's drawing")
    text = "Typed in GTK: Zy & QUBES 42!"
    xinput.type_text(session.conn, text)
    session.copy_to_dom0(window, text.encode())
    session.check_healthy()


def test_typing_into_qt5_and_copying_it_to_dom0(start_session: StartSession) -> None:
    program = need(QT_APPLICATION)
    session = start_session()
    app = session.app([program], QT_QPA_PLATFORM="wayland")
    window = session.window(app, pick=lambda w: session.screen.prop(w.xid, "WM_NAME")
                            not in (None, b""))
    session.focus(window)  # the text edit has Qt's focus in its window
    wait_until(lambda: session.drawn(window), "the Qt window's drawing")
    text = "Typed in Qt: Zy & QUBES 42!"
    xinput.type_text(session.conn, text)
    session.copy_to_dom0(window, text.encode())
    session.check_healthy()


# -- clicks: Qt 5's calculator ------------------------------------------------------------------

# Where the calculator's buttons are in its window, as fractions of its size (its grid
# of 6 columns and 6 rows under the display, measured on its default layout).
CALC_BUTTONS = {
    "7": (1, 1), "8": (2, 1), "9": (3, 1), "4": (1, 2), "5": (2, 2), "6": (3, 2),
    "1": (1, 3), "2": (2, 3), "3": (3, 3), "0": (1, 4), "*": (4, 2), "=": (5, 4),
}


def calculator_display(session: Session, window: XWindow) -> NDArray[np.uint32]:
    """The top sixth of the calculator's window: its display (the buttons start
    below)."""
    pixels = session.pixels(window)
    return pixels[: pixels.shape[0] // 6]


def click_calculator(session: Session, window: XWindow, keys: str) -> None:
    x, y, width, height = session.screen.geometry(window.xid)
    # Below the display (a fifth of the height): the Backspace row, then 4 rows of
    # buttons in 6 columns.
    top = height // 5
    row_height = (height - top) / 5
    column_width = width / 6
    for key in keys:
        column, row = CALC_BUTTONS[key]
        bx = x + int((column + 0.5) * column_width)
        by = y + top + int((row + 0.5) * row_height)
        xinput.click(session.conn, bx, by)


def test_clicks_in_the_qt5_calculator(start_session: StartSession) -> None:
    program = need(CALCULATOR)
    session = start_session()
    sums, reference = (session.app([program], QT_QPA_PLATFORM="wayland") for _ in range(2))
    first = session.window(sums, name=b"Calculator")
    second = session.window(reference, name=b"Calculator",
                            pick=lambda w: w.xid != first.xid)
    # Side by side, not overlapping: each is clicked where it is.
    _, _, width, _ = session.screen.geometry(first.xid)
    session.conn.core.ConfigureWindow(second.xid, xp.ConfigWindow.X | xp.ConfigWindow.Y,
                                      [width + 40, 0])
    session.conn.core.ConfigureWindow(first.xid, xp.ConfigWindow.X | xp.ConfigWindow.Y, [0, 0])
    xinput.sync(session.conn)
    for window in (first, second):
        wait_until(functools.partial(session.drawn, window), "the calculator's drawing")
    zero = calculator_display(session, first)
    click_calculator(session, first, "12*3=")
    click_calculator(session, second, "36")

    def same_display() -> bool:
        a, b = calculator_display(session, first), calculator_display(session, second)
        return bool(a.shape == b.shape and np.array_equal(a, b) and not np.array_equal(a, zero))

    wait_until(same_display, "12 x 3 = to show what 36 shows")
    session.check_healthy()


# -- the pointer: a subsurface and a popup ------------------------------------------------------

CLIENT_SIZE = (400, 300)
SUB = (50, 60, 100, 80)  # x, y, width, height in the toplevel
POPUP = (200, 40, 120, 90)


def start_input_client(session: Session, *args: str,
                       title: str = "pointer test") -> tuple[InputClient, XWindow]:
    client = InputClient(session, "--title", title, "--size", "x".join(map(str, CLIENT_SIZE)),
                         *args)
    session.apps.append(Proc("input client", client.process, client.log))
    client.next("ready")
    window = session.window(session.apps[-1], name=title.encode())
    return client, window


def test_pointer_events_land_at_surface_local_coordinates(start_session: StartSession) -> None:
    session = start_session()
    client, window = start_input_client(session, "--subsurface", ",".join(map(str, SUB)))
    want = solid(*CLIENT_SIZE, input_client.MAIN_COLOUR)
    sx, sy, sw, sh = SUB
    want[sy:sy + sh, sx:sx + sw] = input_client.SUB_COLOUR
    wait_until(lambda: session.screen.shows(name=b"pointer test", want=want),
               "the client's pixels")
    x, y = session.origin(window)
    conn = session.conn

    # Into the toplevel, then onto the subsurface: enter, leave, enter at local points.
    xinput.move(conn, x + 20, y + 30)
    event = client.next("enter")
    assert (event["surface"], event["x"], event["y"]) == ("main", 20.0, 30.0)
    xinput.move(conn, x + 21, y + 33)
    event = client.next("motion")
    assert (event["surface"], event["x"], event["y"]) == ("main", 21.0, 33.0)
    xinput.move(conn, x + sx + 7, y + sy + 9)
    client.next("leave", surface="main")
    event = client.next("enter")
    assert (event["surface"], event["x"], event["y"]) == ("sub", 7.0, 9.0)

    # Buttons on the subsurface: X 1, 2, 3 (and 8, 9 where the X pointer has them).
    buttons = [(1, BTN_LEFT), (2, BTN_MIDDLE), (3, BTN_RIGHT)]
    if len(conn.core.GetPointerMapping().reply().map) >= 9:
        buttons += [(8, BTN_SIDE), (9, BTN_EXTRA)]
    for number, code in buttons:
        xinput.click(conn, x + sx + 7, y + sy + 9, button=number)
        for state in (1, 0):
            event = client.next("button", button=code, state=state)
            assert (event["surface"], event["x"], event["y"]) == ("sub", 7.0, 9.0), event

    # The wheel: two clicks down, one left, each one axis step of 15 with its discrete
    # value (value120 on a version 8 seat), in frames.
    xinput.scroll(conn, x + sx + 7, y + sy + 9, 2)
    xinput.scroll(conn, x + sx + 7, y + sy + 9, -1, horizontal=True)
    down = [client.next("axis", axis=0) for _ in range(2)]
    left = client.next("axis", axis=1)
    assert [e["value"] for e in down] == [15.0, 15.0] and left["value"] == -15.0
    assert all(e["surface"] == "sub" and (e["x"], e["y"]) == (7.0, 9.0)
               for e in (*down, left))
    events = client.events()
    discrete = [(e["axis"], e["value"]) for e in events
                if e["ev"] in ("axis_discrete", "axis_value120")]
    assert discrete in ([(0, 1), (0, 1), (1, -1)], [(0, 120), (0, 120), (1, -120)]), discrete
    assert [e["source"] for e in events if e["ev"] == "axis_source"] == [0, 0, 0]  # wheel

    # A popup (no grab): its own X window; the pointer on it is on the popup surface.
    px, py, pw, ph = POPUP
    client.command(f"popup {px} {py} {pw} {ph}")
    client.next("drawn", surface="popup")
    where = (x + px, y + py, pw, ph)
    popup = wait_until(lambda: override_redirect_at(session.screen, where),
                       f"the popup at {where}", detail=session.describe)
    xinput.click(conn, x + px + 10, y + py + 12, button=1)
    event = client.next("enter", surface="popup")
    assert (event["x"], event["y"]) == (10.0, 12.0)
    for state in (1, 0):
        event = client.next("button", button=BTN_LEFT, state=state)
        assert (event["surface"], event["x"], event["y"]) == ("popup", 10.0, 12.0), event
    xinput.move(conn, x + px + pw - 1 - BORDER, y + py + ph - 1 - BORDER)
    event = client.next("motion", surface="popup")
    assert (event["x"], event["y"]) == (pw - 1.0 - BORDER, ph - 1.0 - BORDER)
    client.command("unpopup")
    wait_until(lambda: override_redirect_at(session.screen, where) is None, "the popup to go")
    assert popup.xid not in [w.xid for w in session.screen.windows()]
    session.check_healthy()


def override_redirect_at(screen: Screen, where: tuple[int, int, int, int]) -> XWindow | None:
    for window in screen.windows():
        try:
            if screen.override_redirect(window.xid) and screen.geometry(window.xid) == where:
                return window
        except xcffib.XcffibException:
            pass
    return None


def test_a_grabbing_popup_is_dismissed_by_a_press_outside(start_session: StartSession) -> None:
    session = start_session()
    client, window = start_input_client(session, title="grab test")
    wait_until(lambda: session.drawn(window, 0), "the client's drawing")
    x, y = session.origin(window)
    conn = session.conn
    session.focus(window)
    # A press gives the serial the grab needs; the popup opens holding the grab.
    xinput.click(conn, x + 20, y + 30)
    client.next("button", button=BTN_LEFT, state=0)
    px, py, pw, ph = POPUP
    client.command(f"popup {px} {py} {pw} {ph} grab")
    client.next("drawn", surface="popup")
    where = (x + px, y + py, pw, ph)
    wait_until(lambda: override_redirect_at(session.screen, where), f"the popup at {where}",
               detail=session.describe)
    # The keyboard goes to the grabbing popup.
    client.next("kb_enter", surface="popup")
    # Inside the popup: delivered there, the popup stays.
    xinput.click(conn, x + px + 10, y + py + 10)
    client.next("button", surface="popup", button=BTN_LEFT, state=1)
    assert not [e for e in client.since() if e["ev"] == "popup_done"]
    # A press on another window (another app's, moved clear of this one): popup_done,
    # and the popup's window goes. (A press on the popup's own toplevel is the app's to
    # judge, as with wlroots: the grab keeps the pointer on the app's surfaces.)
    other, other_window = start_input_client(session, title="another app")
    session.conn.core.ConfigureWindow(other_window.xid, xp.ConfigWindow.X | xp.ConfigWindow.Y,
                                      [x + CLIENT_SIZE[0] + 50, y])
    xinput.sync(conn)
    ox, oy = session.origin(other_window)
    assert ox > x + CLIENT_SIZE[0], (ox, x)
    xinput.click(conn, ox + 30, oy + 40)
    other.next("button", button=BTN_LEFT, state=1)
    client.next("popup_done")
    wait_until(lambda: override_redirect_at(session.screen, where) is None, "the popup to go")
    session.check_healthy()


# -- menus ---------------------------------------------------------------------------


# The apps with a menu bar: their command, environment, window title, and where the
# menu bar's first item is in the window ("Preferences" in GTK 3, "Application" in GTK
# 4: under GTK's own title bar, 36 pixels high; "File" in Qt, which has no title bar
# here: the agent offers server-side decorations).
MENU_APPS = {
    "gtk3": (["gtk3-demo", "--run=application_demo"], {}, b"Application Class", (40, 50)),
    "gtk4": (["gtk4-demo", "--run=application_demo"], {"GSK_RENDERER": "cairo"},
             b"Application Class", (40, 50)),
    "qt5": ([str(QT_APPLICATION)], {"QT_QPA_PLATFORM": "wayland"}, b"untitled.txt",
            (20, 10)),
}


@pytest.mark.parametrize("which", list(MENU_APPS))
def test_a_menu_opens_placed_and_closes_on_a_click_outside(start_session: StartSession,
                                                             which: str) -> None:
    argv, env, name, (item_x, item_y) = MENU_APPS[which]
    session = start_session()
    app = session.app([need(argv[0]), *argv[1:]], **env)

    # The app's window (a menu bar, a tool bar, a text view); gtk3-demo shows its main
    # window too, both titled "Application Class": the smaller one.
    def small(window: XWindow) -> bool:
        width = session.screen.geometry(window.xid)[2]
        return width < 500 and not session.screen.override_redirect(window.xid)

    window = session.window(app, name=name, pick=small)
    session.focus(window)
    wait_until(lambda: session.drawn(window), "the app's drawing")
    x, y, width, height = session.screen.geometry(window.xid)
    before = {w.xid for w in session.screen.windows()}
    item = (x + item_x, y + item_y)
    xinput.click(session.conn, *item)
    opened_at = time.monotonic()

    def menu() -> XWindow | None:
        for found in session.screen.windows():
            if found.xid not in before and session.screen.override_redirect(found.xid):
                return found
        return None

    opened = wait_until(menu, "the menu's override-redirect window", detail=session.describe)
    mx, my, mw, mh = session.screen.geometry(opened.xid)
    # Placed under the item it belongs to: its top at the menu bar's bottom, its left
    # edge at (or just left of, for its shadow) the item's.
    assert x - 20 <= mx <= item[0] and item[1] < my <= y + 100, ((mx, my), (x, y))
    wait_until(lambda: session.drawn(opened, 3), "the menu's drawing")
    # A click outside the menu, in the window below it or else to its right: the menu
    # closes.
    below = my + mh < y + height - 4
    outside = (x + 20, y + height - 4) if below else (x + width - 8, my + 20)
    assert not (mx <= outside[0] < mx + mw and my <= outside[1] < my + mh), \
        ((mx, my, mw, mh), (x, y, width, height))
    assert x <= outside[0] < x + width and y <= outside[1] < y + height
    # GTK 3 takes a release within MENU_SHELL_TIMEOUT (500 ms, gtkmenushell.c) of the
    # opening press as the end of the opening click, not as a click outside; a person's
    # click outside comes later, and so does this one (for every app alike).
    time.sleep(max(0.0, opened_at + GTK_MENU_SHELL_TIMEOUT - time.monotonic()))
    xinput.click(session.conn, *outside)
    wait_until(lambda: opened.xid not in [w.xid for w in session.screen.windows()],
               "the menu to close", detail=session.describe)
    session.check_healthy()


# -- resize and close from X ------------------------------------------------------------------


def test_resizing_the_x_window_resizes_the_app_pixel_exact(start_session: StartSession) -> None:
    session = start_session()
    client, window = start_input_client(session, title="resize test")
    name = b"resize test"
    wait_until(lambda: session.screen.shows(name=name, want=solid(*CLIENT_SIZE,
                                                                   input_client.MAIN_COLOUR)),
               "the client's pixels")
    for width, height in ((520, 410), (233, 177)):
        session.conn.core.ConfigureWindow(window.xid,
                                          xp.ConfigWindow.Width | xp.ConfigWindow.Height,
                                          [width, height])
        xinput.sync(session.conn)
        client.next("configure", width=width, height=height)
        client.next("drawn", surface="main", width=width, height=height)
        want = solid(width, height, input_client.MAIN_COLOUR)
        wait_until(functools.partial(session.screen.shows, name=name, want=want),
                   f"the window at {width}x{height}, every pixel the client's",
                   detail=lambda: session.screen.geometry(window.xid))
    session.check_healthy()


def test_resizing_foot_redraws_it_at_the_new_size(start_session: StartSession) -> None:
    session = start_session()
    window = start_foot(session, session.world.top / "work")
    pixels = session.pixels(window)
    background = int(pixels[-1, -1])
    _, _, width, height = session.screen.geometry(window.xid)
    new = (width + 97, height + 61)
    session.conn.core.ConfigureWindow(window.xid, xp.ConfigWindow.Width | xp.ConfigWindow.Height,
                                      list(new))
    xinput.sync(session.conn)

    def redrawn() -> bool:
        got = session.pixels(window)
        # foot's background to the new right and bottom edges: the app drew that size.
        return bool(got.shape == (new[1], new[0]) and (got[-1, :] == background).all()
                    and (got[:, -1] == background).all())

    wait_until(redrawn, f"foot redrawn at {new}")
    session.check_healthy()


# Apps whose main window a resize test drives: (argv, env, WM_NAME).
RESIZE_APPS = {
    "gtk3-demo": (["gtk3-demo"], {}, b"Application Class"),
    "gtk4-demo": (["gtk4-demo"], {"GSK_RENDERER": "cairo"}, b"GTK Demo"),
    "qt5": ([str(QT_APPLICATION)], {"QT_QPA_PLATFORM": "wayland"}, None),
}


@pytest.mark.parametrize("which", list(RESIZE_APPS))
def test_resizing_the_x_window_resizes_each_app(start_session: StartSession,
                                                 which: str) -> None:
    # The app itself says what size it drew (its own protocol log: the window geometry it
    # sets with the commit of the new size), and the X window shows a dump of that size:
    # its bottom row and right column are the app's, not the emulator's white.
    argv, env, name = RESIZE_APPS[which]
    argv = [need(argv[0]), *argv[1:]]
    session = start_session()
    app = session.app(argv, WAYLAND_DEBUG="client", **env)
    window = session.window(app, name=name, pick=None if name is not None else
                            lambda w: session.screen.prop(w.xid, "WM_NAME") not in (None, b""))
    wait_until(lambda: session.drawn(window), f"{which}'s drawing")
    _, _, width, height = session.screen.geometry(window.xid)
    new = (width + 120, height + 64)
    session.conn.core.ConfigureWindow(window.xid, xp.ConfigWindow.Width | xp.ConfigWindow.Height,
                                      list(new))
    xinput.sync(session.conn)
    geometry = re.compile(rf"set_window_geometry\(-?\d+, -?\d+, {new[0]}, {new[1]}\)")
    wait_until(lambda: geometry.search(app.output()) is not None,
               f"{which} to set a {new[0]}x{new[1]} window geometry",
               detail=lambda: re.findall(r"set_window_geometry\([^)]*\)", app.output())[-3:])

    def drawn_to_the_edges() -> bool:
        got = session.pixels(window)
        return bool(got.shape == (new[1], new[0])
                    and (got[-1, :] & 0xFFFFFF != 0xFFFFFF).any()
                    and (got[:, -1] & 0xFFFFFF != 0xFFFFFF).any())

    wait_until(drawn_to_the_edges, f"{which} shown at {new[0]}x{new[1]}")
    session.check_healthy()


@pytest.mark.parametrize("app_name",
                         ["input-client", "calculator", "gtk4-demo", "gtk3-demo", "foot"])
def test_closing_the_x_window_ends_the_app_cleanly(start_session: StartSession,
                                                   app_name: str) -> None:
    session = start_session()
    if app_name == "input-client":
        client, window = start_input_client(session, title="close test")
        session.close(window)
        client.next("close")
        assert client.process.wait(timeout=60) == 0, client.output()
    elif app_name == "foot":
        window = start_foot(session, session.world.top / "work")
        foot = session.apps[-1]
        session.close(window)
        # foot hangs up on its shell and exits with a status of the shell's: its own
        # goodbye says it ended by itself, not by a crash.
        assert foot.wait_exit() >= 0 and "goodbye" in foot.output(), foot.output()[-3000:]
    else:
        if app_name == "calculator":
            argv, env, name = [need(CALCULATOR)], {"QT_QPA_PLATFORM": "wayland"}, b"Calculator"
        elif app_name == "gtk4-demo":
            argv, env, name = [need("gtk4-demo")], {"GSK_RENDERER": "cairo"}, b"GTK Demo"
        else:
            argv, env, name = [need("gtk3-demo")], {}, b"Application Class"
        app = session.app(argv, **env)
        window = session.window(app, name=name)
        wait_until(lambda: session.drawn(window), f"{app_name}'s drawing")
        session.close(window)
        status = app.wait_exit()
        assert status == 0, app.output()[-3000:]
    wait_until(lambda: not session.screen.windows(), "the window to go")
    session.check_healthy()


# -- the clipboard both ways ------------------------------------------------------------------


def test_text_from_dom0_pastes_into_foot(start_session: StartSession) -> None:
    session = start_session()
    cwd = session.world.top / "work"
    start_foot(session, cwd)
    # The pasted text ends the command (nothing is typed after the paste, which the
    # app takes in its own time).
    session.put_clipboard(b"Pasted from dom0: Zy 42' > pasted.txt\n")
    xinput.type_text(session.conn, "echo '")
    # The daemon's paste key sends the text to the agent (the V is not forwarded); then
    # foot's own paste key (Ctrl+V here) asks the agent, now the selection's owner.
    xinput.chord(session.conn, "Control_L", "Shift_L", "v")
    xinput.chord(session.conn, "Control_L", "v")
    wait_until(lambda: file_says(cwd / "pasted.txt", "Pasted from dom0: Zy 42\n"),
               "the pasted text in the file",
               detail=lambda: ((cwd / "pasted.txt").read_text()
                               if (cwd / "pasted.txt").exists() else None))
    # A paste empties dom0's clipboard, as in Qubes.
    assert session.clipboard() == b""
    session.check_healthy()


def password_dots(session: Session, window: XWindow) -> int:
    """How many characters the entry demo holds, counted in its second entry, which
    shares the first one's text and shows each character as a dark dot: the most
    dark runs along one pixel row of the window's bottom quarter."""
    pixels = session.pixels(window)
    red, green, blue = (pixels >> 16) & 255, (pixels >> 8) & 255, pixels & 255
    dark = (red < 0x50) & (green < 0x50) & (blue < 0x50)
    most = 0
    for row in dark[dark.shape[0] * 3 // 4:]:
        starts = np.flatnonzero(np.diff(row.astype(np.int8)) == 1)
        most = max(most, len(starts) + int(row[0]))
    return most


def test_text_from_dom0_pastes_into_gtk3_and_back(start_session: StartSession) -> None:
    demo = need("gtk3-demo")
    session = start_session()
    app = session.app([demo, "--run=entry_buffer"])
    window = session.window(app, name=b"Entry Buffer")
    session.focus(window)
    wait_until(lambda: session.drawn(window), "the entry demo's drawing")
    # Typed first, then the paste at the cursor: only GTK's own copy of its entry can
    # hold both (the agent's selection from dom0 holds only the pasted part).
    xinput.type_text(session.conn, "GTK says: ")
    session.copy_to_dom0(window, b"GTK says: ")
    xinput.chord(session.conn, "End")  # the cursor after the text, nothing selected
    session.put_clipboard(b"from dom0")
    xinput.chord(session.conn, "Control_L", "Shift_L", "v")
    xinput.chord(session.conn, "Control_L", "v")
    # GTK reads a paste in its own time; keys that change its selection meanwhile lose
    # or misplace it, so the copy waits until the paste has landed: 19 characters.
    wait_until(lambda: password_dots(session, window) == 19, "the paste in the entry",
               detail=lambda: password_dots(session, window))
    session.copy_to_dom0(window, b"GTK says: from dom0")
    session.check_healthy()


# -- a test client through every kind of input, and the clipboard with a pywayland client ----


def test_typing_clicking_scrolling_resizing_and_closing_from_x(
        start_session: StartSession) -> None:
    session = start_session()
    client = InputClient(session, "--size", "200x150", "--title", "e2e-input")
    session.apps.append(Proc("input client", client.process, client.log))
    window = wait_until(lambda: session.screen.find(name=b"e2e-input"), "the client's window",
                        detail=client.output)
    wait_until(lambda: session.screen.viewable(window.xid), "the window mapped")
    x, y, width, height = session.screen.geometry(window.xid)
    assert (width, height) == (200, 150)
    conn = session.conn
    session.focus(window)
    client.next("kb_enter")
    xinput.type_text(conn, "Zy!\n")
    wait_until(lambda: "".join(e.get("utf8", "") for e in client.events()
                               if e["ev"] == "key" and e["state"] == 1) == "Zy!\r",
               "the typed text")
    xinput.click(conn, x + 30, y + 40, 3)
    xinput.scroll(conn, x + 30, y + 40, 1)
    wait_until(lambda: [e for e in client.events() if e["ev"] == "axis"], "the wheel step")
    got = client.events()
    buttons = [(e["button"], e["state"], e["x"], e["y"]) for e in got if e["ev"] == "button"]
    assert buttons == [(BTN_RIGHT, 1, 30.0, 40.0), (BTN_RIGHT, 0, 30.0, 40.0)]
    axes = [(e["axis"], e["value"]) for e in got if e["ev"] == "axis"]
    assert axes == [(0, 15.0)]
    # A resize in dom0 (here: straight on the X window, as a window manager would).
    conn.core.ConfigureWindow(window.xid, xp.ConfigWindow.Width | xp.ConfigWindow.Height,
                              [260, 170])
    conn.flush()
    wait_until(lambda: [e for e in client.events() if e["ev"] == "drawn"
                        and (e["width"], e["height"]) == (260, 170)], "the app's next frame")
    assert session.screen.geometry(window.xid)[2:] == (260, 170)
    # Closing it (WM_DELETE_WINDOW, as dom0's window manager sends) ends the app cleanly.
    session.close(window)
    assert client.process.wait(timeout=60) == 0
    assert any(e["ev"] == "close" for e in client.events())


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


CLIPBOARD_TEXT = "Grüße aus der VM — 世界\n"


def test_text_copied_both_ways_through_the_emulators_clipboard(
        start_session: StartSession) -> None:
    session = start_session()
    app = Copier(session.agent)
    try:
        window = wait_until(lambda: session.screen.find(name=b"e2e-clipboard"), "the window")
        wait_until(lambda: session.screen.viewable(window.xid), "the window mapped")
        x, y, _w, _h = session.screen.geometry(window.xid)
        session.focus(window)
        app.c.wait(lambda: bool(app.enters), "keyboard focus")
        app.copy(CLIPBOARD_TEXT.encode())
        conn = session.conn
        xinput.move(conn, x + 5, y + 5)
        xinput.chord(conn, "Control_L", "Shift_L", "c")  # copy to the global clipboard
        app.c.wait(lambda: session.clipboard() == CLIPBOARD_TEXT.encode(),
                   "the VM's text in dom0's clipboard file")
        assert app.sent == 1
        # dom0's text pasted into the VM (Ctrl+Shift+V): offered to the focused client.
        session.put_clipboard("aus dom0 ✓".encode())
        seen = len(app.selections)
        xinput.chord(conn, "Control_L", "Shift_L", "v")
        app.c.wait(lambda: len(app.selections) > seen and app.selections[-1] is not None,
                   "the pasted selection offer")
        offer = app.selections[-1]
        assert "text/plain;charset=utf-8" in app.mimes[offer]
        assert app.paste(offer) == "aus dom0 ✓".encode()
    finally:
        app.c.disconnect()
