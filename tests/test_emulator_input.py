"""Input on the emulator's windows, and the XTest helpers (tests/xinput.py) the input tests use.

The helpers are proven on a private Xvfb against a plain X window of the test's own: the
key events they cause, read back with xcffib and decoded with xkbcommon's "us" keymap
(not with the X server's mapping the helpers used), spell the text typed; clicks,
motion and scrolling arrive at the root coordinates asked for.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from typing import Any

import pytest
import xcffib
import xcffib.xproto as xp
import xinput
from xkbcommon import xkb

from qubesshm.bench.private_x import private_xvfb

WIDTH, HEIGHT = 640, 480

pytestmark = pytest.mark.skipif(shutil.which("Xvfb") is None, reason="needs Xvfb")


@pytest.fixture(scope="module")
def display() -> Iterator[str]:
    with private_xvfb(WIDTH, HEIGHT) as server:
        yield server.display


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
