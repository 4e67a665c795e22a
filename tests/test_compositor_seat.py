"""The seat against libwayland clients (pywayland): keyboard, pointer, popup grabs, cursors.

The agent's calls (``compositor.seat``) are made in the server's thread, as the
agent makes them; what each client's wl_keyboard and wl_pointer receive is
checked event by event. Typed text is proven with the client's own xkbcommon
state built from the keymap it was sent and the modifiers it was told.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
from compositor_clients import PyWindow, solid
from compositor_server import RunningCompositor, serving
from compositor_shell import wait_until
from pywayland.protocol.xdg_shell import XdgPositioner
from seat_clients import EXPECTED_SEALS, SeatClient, keys_of
from xkbcommon import xkb

from qubesshm.compositor.keymap import Keymap
from qubesshm.compositor.seat import Seat
from qubesshm.compositor.shell import ShellWindow

T = TypeVar("T")

KEY_LEFTSHIFT, KEY_A, KEY_Y, KEY_Z, KEY_ESC = 42, 30, 21, 44, 1
BTN_LEFT, BTN_RIGHT = 0x110, 0x111
SHIFT_MASK = 1


@pytest.fixture
def served() -> Iterator[RunningCompositor]:
    with serving(RunningCompositor) as running:
        yield running


@pytest.fixture
def client(served: RunningCompositor) -> Iterator[SeatClient]:
    c = SeatClient(served.path)
    yield c
    c.disconnect()


def on_seat(served: RunningCompositor, fn: Callable[[Seat], T]) -> T:
    return served.call(lambda: fn(served.compositor.seat))


def mapped(served: RunningCompositor, client: SeatClient, title: str,
           size: tuple[int, int] = (100, 80), colour: int = 0xFF336699,
           before_commit: Callable[[PyWindow], None] | None = None,
           ) -> tuple[PyWindow, ShellWindow]:
    """A mapped toplevel and the agent's ShellWindow of it."""
    window = client.toplevel(title, before_commit=before_commit)
    client.show(window.surface, client.buffer(solid(*size, colour)))
    client.roundtrip()
    w = wait_until(lambda: next((s for s in served.shell.mapped_windows()
                                 if s.title == title), None), f"{title!r} mapped")
    return window, w


def client_xkb(c: SeatClient) -> Any:
    """The client's own xkb state, from the latest keymap it received."""
    text = c.keymaps[-1].text.rstrip(b"\0")
    return xkb.Context().keymap_new_from_buffer(text).state_new()


def typed(c: SeatClient) -> str:
    """What the client's key and modifier events type, decoded as a client does."""
    state = client_xkb(c)
    out = []
    for name, args in c.events:
        if name == "kb.modifiers":
            _, dep, lat, lock, group = args
            state.update_mask(dep, lat, lock, 0, 0, group)
        elif name == "kb.key" and args[3] == 1:
            out.append(state.key_get_string(args[2] + 8))
    return "".join(out)


# -- the seat and the keyboard -------------------------------------------------------


def test_the_seat_is_seat0_with_a_keyboard_and_a_pointer(client: SeatClient) -> None:
    assert client.seat_names == ["seat0"]
    assert client.seat_caps == [3]
    assert client.names("kb.") == ["kb.keymap", "kb.repeat_info"]
    assert client.take("kb.repeat_info")[0][1] == (25, 600)


def test_the_keymap_is_a_sealed_readable_xkb_v1_memfd(served: RunningCompositor,
                                                    client: SeatClient) -> None:
    second = client.make_keyboard()
    client.roundtrip()
    assert len(client.keymaps) == 2
    expected = Keymap.default().text + b"\0"
    for received in client.keymaps:
        assert received.format == 1
        assert received.size == len(expected)
        assert received.seals & EXPECTED_SEALS == EXPECTED_SEALS
        assert received.write_refused
        assert received.text == expected
    assert b"xkb_keycodes" in expected and b"xkb_symbols" in expected
    second.release()


def test_typed_keys_with_shift_give_modifiers(served: RunningCompositor,
                                              client: SeatClient) -> None:
    window, w = mapped(served, client, "typing")
    client.take()
    on_seat(served, lambda s: s.keyboard_focus(w))
    enter = client.wait_for("kb.enter")[0]
    assert enter[1] is window.surface and keys_of(enter[2]) == []
    assert client.names("kb.") == ["kb.enter", "kb.modifiers"]

    def type_keys(seat: Seat) -> None:
        t = 1000
        for code, down in ((KEY_A, True), (KEY_A, False), (KEY_LEFTSHIFT, True),
                           (KEY_A, True), (KEY_A, False), (KEY_LEFTSHIFT, False),
                           (KEY_Z, True), (KEY_Z, False)):
            t += 10
            seat.key(code, down, t)

    on_seat(served, type_keys)
    client.wait_for("kb.key", 8)
    kb = client.take("kb.")
    names = [n for n, _ in kb]
    assert names == ["kb.enter", "kb.modifiers", "kb.key", "kb.key", "kb.key", "kb.modifiers",
                     "kb.key", "kb.key", "kb.key", "kb.modifiers", "kb.key", "kb.key"]
    keys = [(a[2], a[3]) for n, a in kb if n == "kb.key"]
    assert keys == [(KEY_A, 1), (KEY_A, 0), (KEY_LEFTSHIFT, 1), (KEY_A, 1), (KEY_A, 0),
                    (KEY_LEFTSHIFT, 0), (KEY_Z, 1), (KEY_Z, 0)]
    mods = [a[1:] for n, a in kb if n == "kb.modifiers"]
    assert mods == [(0, 0, 0, 0), (SHIFT_MASK, 0, 0, 0), (0, 0, 0, 0)]
    times = [a[1] for n, a in kb if n == "kb.key"]
    assert times == list(range(1010, 1090, 10))
    serials = [a[0] for n, a in kb if n in ("kb.key", "kb.modifiers", "kb.enter")]
    assert serials[0] == serials[1]  # enter, and its modifiers
    assert serials[1:] == sorted(set(serials[1:]))
    client.events = kb
    assert typed(client) == "aAz"


def test_a_repeated_press_is_not_sent_twice(served: RunningCompositor,
                                            client: SeatClient) -> None:
    _, w = mapped(served, client, "repeat")
    on_seat(served, lambda s: s.keyboard_focus(w))

    def keys(seat: Seat) -> None:
        seat.key(KEY_A, True, 1)
        seat.key(KEY_A, True, 2)  # X's autorepeat: the client repeats by itself
        seat.key(KEY_A, False, 3)
        seat.key(KEY_A, False, 4)

    on_seat(served, keys)
    client.roundtrip()
    assert [(a[1], a[3]) for n, a in client.take() if n == "kb.key"] == [(1, 1), (3, 0)]


def test_a_de_layout_swaps_z_and_y(served: RunningCompositor, client: SeatClient) -> None:
    _, w = mapped(served, client, "layout")
    on_seat(served, lambda s: s.keyboard_focus(w))
    on_seat(served, lambda s: s.set_keymap(Keymap.parse("de")))
    client.wait(lambda: len(client.keymaps) == 2, "the new keymap")
    assert client.keymaps[0].text != client.keymaps[1].text
    state = client_xkb(client)
    assert (state.key_get_string(KEY_Y + 8), state.key_get_string(KEY_Z + 8)) == ("z", "y")

    def keys(seat: Seat) -> None:
        for code in (KEY_Z, KEY_Y):
            seat.key(code, True, 5)
            seat.key(code, False, 6)

    client.take()
    on_seat(served, keys)
    client.wait_for("kb.key", 4)
    assert typed(client) == "yz"
    # A keyboard made afterwards gets the new keymap at once.
    client.make_keyboard()
    client.roundtrip()
    assert client.keymaps[-1].text == client.keymaps[1].text


def test_enter_carries_the_keys_held_and_their_modifiers(served: RunningCompositor,
                                                         client: SeatClient) -> None:
    window, w = mapped(served, client, "held")
    client.take()
    on_seat(served, lambda s: s.keyboard_focus(w, pressed=[KEY_LEFTSHIFT, KEY_A]))
    enter = client.wait_for("kb.enter")[0]
    assert enter[1] is window.surface
    assert keys_of(enter[2]) == [KEY_LEFTSHIFT, KEY_A]
    names = client.names("kb.")
    assert names == ["kb.enter", "kb.modifiers"]
    modifiers = client.take("kb.modifiers")[0][1]
    assert modifiers[0] == enter[0]  # the same serial, as libwayland compositors send
    assert modifiers[1:] == (SHIFT_MASK, 0, 0, 0)
    client.take()
    # Releasing the held keys is sent (the client was told they were down).
    on_seat(served, lambda s: s.key(KEY_LEFTSHIFT, False, 9))
    client.wait_for("kb.modifiers")
    assert [a[1:] for n, a in client.take() if n.startswith("kb.")] == [
        (9, KEY_LEFTSHIFT, 0), (0, 0, 0, 0)]


def test_focus_moves_between_clients_with_leave_and_enter(served: RunningCompositor,
                                                          client: SeatClient) -> None:
    other = SeatClient(served.path)
    try:
        first, w1 = mapped(served, client, "first")
        second, w2 = mapped(served, other, "second")
        heard: list[object] = []
        on_seat(served, lambda s: s.focus_listeners.append(
            lambda c: heard.append(None if c is None else c.number)))
        on_seat(served, lambda s: s.keyboard_focus(w1))
        client.wait_for("kb.enter")
        client.take()
        on_seat(served, lambda s: s.keyboard_focus(w2))
        leave = client.wait_for("kb.leave")[0]
        assert leave[1] is first.surface
        assert other.wait_for("kb.enter")[0][1] is second.surface
        on_seat(served, lambda s: s.key(KEY_A, True, 1))
        other.wait_for("kb.key")
        client.roundtrip()
        assert client.names("kb.key") == []
        assert on_seat(served, lambda s: s.keyboard_client is not None
                       and s.keyboard_client.number) == w2.client
        on_seat(served, lambda s: s.keyboard_focus(None))
        other.wait_for("kb.leave")
        assert heard == [w1.client, w2.client, None]
    finally:
        other.disconnect()


# -- the pointer -------------------------------------------------------------------


def subsurface_scene(served: RunningCompositor, client: SeatClient
                     ) -> tuple[PyWindow, Any, ShellWindow]:
    """A 100x80 root with window geometry (10, 5, 80, 70) and a 40x30 subsurface at
    (20, 30) whose input region is its left half (0, 0, 20, 30)."""
    def geometry(window: PyWindow) -> None:
        window.xdg_surface.set_window_geometry(10, 5, 80, 70)

    window = client.toplevel("pointer", before_commit=geometry)
    child = client.compositor.create_surface()
    sub = client.subcompositor.get_subsurface(child, window.surface)
    sub.set_position(20, 30)
    sub.set_desync()
    region = client.compositor.create_region()
    region.add(0, 0, 20, 30)
    child.set_input_region(region)
    region.destroy()
    client.show(child, client.buffer(solid(40, 30, 0xFF00FF00)))
    client.show(window.surface, client.buffer(solid(100, 80, 0xFF0000FF)))
    client.roundtrip()
    w = wait_until(lambda: next((s for s in served.shell.mapped_windows()
                                 if s.title == "pointer" and s.geometry.width == 80), None),
                   "the pointer window mapped")
    return window, child, w


def pointer_events(c: SeatClient) -> list[tuple[str, tuple[Any, ...]]]:
    return c.take("ptr.")


def test_motion_reaches_a_subsurface_through_its_input_region(served: RunningCompositor,
                                                              client: SeatClient) -> None:
    window, child, w = subsurface_scene(served, client)
    client.take()
    # Window (15.5, 35.25) is root (25.5, 40.25): in the subsurface at (5.5, 10.25).
    on_seat(served, lambda s: s.pointer_motion(w, 15.5, 35.25, 100))
    client.wait_for("ptr.frame")
    events = pointer_events(client)
    assert [n for n, _ in events] == ["ptr.enter", "ptr.frame"]
    _, surface, sx, sy = events[0][1]
    assert (surface, sx, sy) == (child, 5.5, 10.25)
    # Within it: motion, in its coordinates.
    on_seat(served, lambda s: s.pointer_motion(w, 20.0, 40.0, 110))
    client.wait_for("ptr.motion")
    assert pointer_events(client) == [("ptr.motion", (110, 10.0, 15.0)), ("ptr.frame", ())]
    # Its right half is outside its input region: the root surface below takes it.
    on_seat(served, lambda s: s.pointer_motion(w, 40.0, 40.0, 120))
    client.wait_for("ptr.enter")
    events = pointer_events(client)
    assert [n for n, _ in events] == ["ptr.leave", "ptr.enter", "ptr.frame"]
    assert events[0][1][1] is child
    assert events[1][1][1:] == (window.surface, 50.0, 45.0)
    # The window geometry's origin is the daemon window's top-left.
    on_seat(served, lambda s: s.pointer_motion(w, 0.0, 0.0, 130))
    client.wait_for("ptr.motion")
    assert pointer_events(client) == [("ptr.motion", (130, 10.0, 5.0)), ("ptr.frame", ())]
    on_seat(served, lambda s: s.pointer_leave(w))
    client.wait_for("ptr.leave")
    events = pointer_events(client)
    assert [n for n, _ in events] == ["ptr.leave", "ptr.frame"]
    assert events[0][1][1] is window.surface
    hit = on_seat(served, lambda s: s.surface_at(w, 15.0, 35.0))
    assert hit is not None and hit[1:] == (5.0, 10.0)


def test_a_held_button_keeps_the_pointer_on_its_surface(served: RunningCompositor,
                                                        client: SeatClient) -> None:
    _, child, w = subsurface_scene(served, client)
    on_seat(served, lambda s: s.pointer_motion(w, 15.0, 35.0, 1))
    serial = on_seat(served, lambda s: s.pointer_button(w, 15.0, 35.0, BTN_LEFT, True, 2))
    assert isinstance(serial, int)
    client.wait_for("ptr.button")
    client.take()
    # Dragged out of the subsurface (and out of the window): still the subsurface's.
    on_seat(served, lambda s: s.pointer_motion(w, 60.0, -10.0, 3))
    on_seat(served, lambda s: s.pointer_leave(w))
    client.wait_for("ptr.motion")
    client.roundtrip()
    assert pointer_events(client) == [("ptr.motion", (3, 50.0, -35.0)), ("ptr.frame", ())]
    on_seat(served, lambda s: s.pointer_button(w, 60.0, -10.0, BTN_LEFT, False, 4))
    client.wait_for("ptr.leave")
    events = pointer_events(client)
    assert [n for n, _ in events] == ["ptr.button", "ptr.frame", "ptr.leave", "ptr.frame"]
    assert events[0][1][1:] == (4, BTN_LEFT, 0)
    assert events[2][1][1] is child


@pytest.mark.parametrize(("version", "expected"), [
    (4, ["ptr.axis"]),
    (5, ["ptr.axis_source", "ptr.axis_discrete", "ptr.axis", "ptr.frame"]),
    (7, ["ptr.axis_source", "ptr.axis_discrete", "ptr.axis", "ptr.frame"]),
    (8, ["ptr.axis_source", "ptr.axis_value120", "ptr.axis", "ptr.frame"]),
])
def test_wheel_clicks_by_version(served: RunningCompositor, version: int,
                                 expected: list[str]) -> None:
    c = SeatClient(served.path, seat_version=version)
    try:
        _, w = mapped(served, c, f"wheel {version}")
        on_seat(served, lambda s: s.pointer_motion(w, 5.0, 5.0, 1))
        c.roundtrip()
        c.take()
        on_seat(served, lambda s: s.pointer_axis(w, 5.0, 5.0, 0, 2, 7))
        on_seat(served, lambda s: s.pointer_axis(w, 5.0, 5.0, 1, -1, 8))
        c.wait_for("ptr.axis", 2)
        c.roundtrip()
        events = pointer_events(c)
        assert [n for n, _ in events] == expected * 2
        by_name = [dict(events[: len(expected)]), dict(events[len(expected):])]
        assert by_name[0]["ptr.axis"] == (7, 0, 30.0)
        assert by_name[1]["ptr.axis"] == (8, 1, -15.0)
        if version >= 5:
            assert by_name[0]["ptr.axis_source"] == (0,)
        if 5 <= version < 8:
            assert by_name[0]["ptr.axis_discrete"] == (0, 2)
            assert by_name[1]["ptr.axis_discrete"] == (1, -1)
        if version >= 8:
            assert by_name[0]["ptr.axis_value120"] == (0, 240)
            assert by_name[1]["ptr.axis_value120"] == (1, -120)
    finally:
        c.disconnect()


def test_set_cursor_tells_the_shell(served: RunningCompositor, client: SeatClient) -> None:
    _, w = mapped(served, client, "cursor")
    on_seat(served, lambda s: s.pointer_motion(w, 5.0, 5.0, 1))
    enter = client.wait_for("ptr.enter")[0]
    cursor = client.compositor.create_surface()
    client.show(cursor, client.buffer(solid(16, 16, 0xFF000000)))
    client.pointer.set_cursor(enter[0] - 1, cursor, 0, 0)  # a stale serial: ignored
    client.roundtrip()
    assert served.shell.read(lambda s: list(s.cursors)) == []
    client.pointer.set_cursor(enter[0], cursor, 3, 3)
    client.pointer.set_cursor(enter[0], None, 0, 0)
    client.roundtrip()
    assert served.shell.read(lambda s: list(s.cursors)) == [(w.id, "default"), (w.id, None)]
    # A cursor surface's frame callbacks run (nothing shows it, nothing holds them).
    done = client.show(cursor, client.buffer(solid(16, 16, 0xFF000000)), frame=True)
    client.wait(lambda: bool(done), "the cursor surface's frame callback")


def test_set_cursor_from_a_client_without_the_pointer_is_ignored(
        served: RunningCompositor, client: SeatClient) -> None:
    other = SeatClient(served.path)
    try:
        _, w = mapped(served, client, "has pointer")
        mapped(served, other, "has not")
        on_seat(served, lambda s: s.pointer_motion(w, 5.0, 5.0, 1))
        serial = client.wait_for("ptr.enter")[0][0]
        other.pointer.set_cursor(serial, None, 0, 0)
        other.roundtrip()
        assert served.shell.read(lambda s: list(s.cursors)) == []
    finally:
        other.disconnect()


# -- popup grabs -------------------------------------------------------------------


def positioner(c: SeatClient, x: int = 10, y: int = 10) -> Any:
    p = c.wm_base.create_positioner()
    p.set_size(50, 40)
    p.set_anchor_rect(x, y, 1, 1)
    p.set_anchor(XdgPositioner.anchor.top_left)
    p.set_gravity(XdgPositioner.gravity.bottom_right)
    return p


def grabbing_popup(c: SeatClient, parent: PyWindow, serial: int, name: str) -> PyWindow:
    """A popup that asks for a grab before its initial commit; its popup_done is
    recorded in ``c.events`` as ``popup_done`` with ``name``."""
    surface = c.compositor.create_surface()
    xdg_surface = c.wm_base.get_xdg_surface(surface)
    window = PyWindow(surface, xdg_surface, None)
    xdg_surface.dispatcher["configure"] = lambda _, s: window.serials.append(s)
    window.role = xdg_surface.get_popup(parent.xdg_surface, positioner(c))

    def done(_: Any) -> None:
        window.popup_done = True
        c.events.append(("popup_done", (name,)))

    window.role.dispatcher["popup_done"] = done
    window.role.dispatcher["configure"] = lambda _, *a: window.configures.append(a)
    window.role.grab(c.seat, serial)
    surface.commit()
    c.wait(lambda: bool(window.serials) or window.popup_done, f"{name}'s configure")
    if window.popup_done:
        return window
    window.ack_latest()
    c.show(surface, c.buffer(solid(50, 40, 0xFFFFFFFF)))
    c.roundtrip()
    return window


def shell_window(served: RunningCompositor, popup_count: int) -> list[ShellWindow]:
    return wait_until(lambda: (lambda ws: ws if len(ws) >= popup_count else None)(
        [s for s in served.shell.mapped_windows() if s.kind.value == "popup"]),
        f"{popup_count} popup(s) mapped")


def test_a_button_serial_grants_a_popup_grab_and_keyboard_focus(
        served: RunningCompositor, client: SeatClient) -> None:
    top, w = mapped(served, client, "menus", (200, 150))
    on_seat(served, lambda s: s.keyboard_focus(w))
    on_seat(served, lambda s: s.pointer_motion(w, 15.0, 15.0, 1))
    serial = on_seat(served, lambda s: s.pointer_button(w, 15.0, 15.0, BTN_RIGHT, True, 2))
    on_seat(served, lambda s: s.pointer_button(w, 15.0, 15.0, BTN_RIGHT, False, 3))
    assert isinstance(serial, int)
    client.wait_for("ptr.button", 2)
    client.take()
    menu = grabbing_popup(client, top, serial, "menu")
    assert not menu.popup_done
    client.wait_for("kb.enter")
    kb = client.take("kb.")
    assert [n for n, _ in kb] == ["kb.leave", "kb.enter", "kb.modifiers"]
    assert kb[0][1][1] is top.surface and kb[1][1][1] is menu.surface
    # Keys go to the menu's surface.
    on_seat(served, lambda s: s.key(KEY_ESC, True, 4))
    client.wait_for("kb.key")
    # A nested menu grabs with a press serial on the first menu.
    pw = shell_window(served, 1)[0]
    on_seat(served, lambda s: s.pointer_motion(pw, 5.0, 5.0, 5))
    serial2 = on_seat(served, lambda s: s.pointer_button(pw, 5.0, 5.0, BTN_LEFT, True, 6))
    on_seat(served, lambda s: s.pointer_button(pw, 5.0, 5.0, BTN_LEFT, False, 7))
    assert isinstance(serial2, int)
    submenu = grabbing_popup(client, menu, serial2, "submenu")
    assert not submenu.popup_done
    client.wait(lambda: client.names("kb.enter") != [], "focus on the submenu")
    assert client.take("kb.enter")[0][1][1] is submenu.surface
    # Only the topmost grabbing popup may be destroyed.
    assert on_seat(served, lambda s: len(s.popup_chain)) == 2
    # Focus leaving the window ends the chain, topmost first.
    client.take()
    on_seat(served, lambda s: s.keyboard_focus(None))
    client.wait(lambda: len(client.names("popup_done")) == 2, "both popups done")
    assert [a[0] for n, a in client.events if n == "popup_done"] == ["submenu", "menu"]
    assert on_seat(served, lambda s: s.popup_chain) == []


def test_a_press_on_another_client_dismisses_the_chain(served: RunningCompositor,
                                                       client: SeatClient) -> None:
    other = SeatClient(served.path)
    try:
        top, w = mapped(served, client, "with menu", (200, 150))
        _, w2 = mapped(served, other, "elsewhere")
        on_seat(served, lambda s: s.keyboard_focus(w))
        on_seat(served, lambda s: s.pointer_motion(w, 15.0, 15.0, 1))
        serial = on_seat(served, lambda s: s.pointer_button(w, 15.0, 15.0, BTN_LEFT, True, 2))
        assert isinstance(serial, int)
        menu = grabbing_popup(client, top, serial, "menu")
        on_seat(served, lambda s: s.pointer_button(w, 15.0, 15.0, BTN_LEFT, False, 3))
        assert not menu.popup_done
        # A press on the client's own toplevel is delivered, the menu stays.
        on_seat(served, lambda s: s.pointer_button(w, 150.0, 100.0, BTN_LEFT, True, 4))
        on_seat(served, lambda s: s.pointer_button(w, 150.0, 100.0, BTN_LEFT, False, 5))
        client.roundtrip()
        assert not menu.popup_done
        other.take()
        on_seat(served, lambda s: s.pointer_motion(w2, 5.0, 5.0, 6))
        sent = on_seat(served, lambda s: s.pointer_button(w2, 5.0, 5.0, BTN_LEFT, True, 7))
        client.wait(lambda: menu.popup_done, "popup_done")
        assert isinstance(sent, int)
        assert other.wait_for("ptr.button")[0][1:] == (7, BTN_LEFT, 1)
    finally:
        other.disconnect()


def test_a_grab_without_a_press_serial_is_denied(served: RunningCompositor,
                                                 client: SeatClient) -> None:
    top, w = mapped(served, client, "no press", (200, 150))
    on_seat(served, lambda s: s.pointer_motion(w, 15.0, 15.0, 1))
    enter_serial = client.wait_for("ptr.enter")[0][0]
    menu = grabbing_popup(client, top, enter_serial, "menu")
    assert menu.popup_done and not menu.serials


def test_destroying_a_grabbing_popup_below_the_topmost_is_an_error(
        served: RunningCompositor, client: SeatClient) -> None:
    top, w = mapped(served, client, "order", (200, 150))
    on_seat(served, lambda s: s.pointer_motion(w, 15.0, 15.0, 1))
    serial = on_seat(served, lambda s: s.pointer_button(w, 15.0, 15.0, BTN_LEFT, True, 2))
    assert isinstance(serial, int)
    menu = grabbing_popup(client, top, serial, "menu")
    submenu = grabbing_popup(client, menu, serial, "submenu")
    assert not submenu.popup_done
    menu.role.destroy()
    assert client.broken()



def test_a_menu_opened_by_a_press_takes_the_release(served: RunningCompositor,
                                                    client: SeatClient) -> None:
    """Press, drag onto the menu, release: the menu's surface gets the release (the
    popup grab replaces the implicit one), though X reports the drag to the window
    the press was in."""
    top, w = mapped(served, client, "press-drag", (200, 150))
    on_seat(served, lambda s: s.pointer_motion(w, 10.0, 10.0, 1))
    serial = on_seat(served, lambda s: s.pointer_button(w, 10.0, 10.0, BTN_RIGHT, True, 2))
    assert isinstance(serial, int)
    menu = grabbing_popup(client, top, serial, "menu")  # at (10, 10) on the screen
    shell_window(served, 1)
    client.take()
    on_seat(served, lambda s: s.pointer_motion(w, 30.0, 25.0, 3))
    client.wait_for("ptr.enter")
    events = pointer_events(client)
    assert [n for n, _ in events] == ["ptr.leave", "ptr.enter", "ptr.frame"]
    assert events[0][1][1] is top.surface
    assert events[1][1][1:] == (menu.surface, 20.0, 15.0)
    on_seat(served, lambda s: s.pointer_button(w, 30.0, 25.0, BTN_RIGHT, False, 4))
    client.wait_for("ptr.button")
    assert pointer_events(client)[0][1][1:] == (4, BTN_RIGHT, 0)
    # Off every surface of the client's: the pointer leaves, the menu stays.
    on_seat(served, lambda s: s.pointer_motion(w, 500.0, 500.0, 5))
    client.wait_for("ptr.leave")
    assert not menu.popup_done


CURSOR_SHAPE_XML = """<?xml version="1.0" encoding="UTF-8"?>
<protocol name="cursor_shape_v1">
  <interface name="wp_cursor_shape_manager_v1" version="1">
    <request name="destroy" type="destructor"/>
    <request name="get_pointer">
      <arg name="cursor_shape_device" type="new_id" interface="wp_cursor_shape_device_v1"/>
      <arg name="pointer" type="object" interface="wl_pointer"/>
    </request>
    <request name="get_tablet_tool_v2">
      <arg name="cursor_shape_device" type="new_id" interface="wp_cursor_shape_device_v1"/>
      <arg name="tablet_tool" type="object" interface="zwp_tablet_tool_v2"/>
    </request>
  </interface>
  <interface name="wp_cursor_shape_device_v1" version="1">
    <enum name="error">
      <entry name="invalid_shape" value="1"/>
    </enum>
    <request name="destroy" type="destructor"/>
    <request name="set_shape">
      <arg name="serial" type="uint"/>
      <arg name="shape" type="uint"/>
    </request>
  </interface>
</protocol>
"""


def test_cursor_shapes_when_the_protocol_is_loaded(monkeypatch: pytest.MonkeyPatch,
                                                   tmp_path: Path) -> None:
    from pywayland.protocol.cursor_shape_v1 import WpCursorShapeManagerV1

    from qubesshm.compositor import core
    from qubesshm.wire.protocol import load_protocols

    (tmp_path / "cursor-shape-v1.xml").write_text(CURSOR_SHAPE_XML)
    monkeypatch.setattr(core, "load_protocols", lambda: load_protocols([tmp_path]))
    with serving(RunningCompositor) as served:
        c = SeatClient(served.path)
        try:
            assert c.globals["wp_cursor_shape_manager_v1"][1] == 1
            manager = c.bind(WpCursorShapeManagerV1, 1)
            device = manager.get_pointer(c.pointer)
            _, w = mapped(served, c, "shapes")
            on_seat(served, lambda s: s.pointer_motion(w, 5.0, 5.0, 1))
            serial = c.wait_for("ptr.enter")[0][0]
            device.set_shape(serial, 9)  # text
            device.set_shape(serial + 100, 4)  # not the enter's serial: ignored
            device.set_shape(serial, 29)  # nwse_resize
            c.roundtrip()
            assert served.shell.read(lambda s: list(s.cursors)) == [(w.id, "text"),
                                                                    (w.id, "nwse-resize")]
            device.set_shape(serial, 99)
            assert c.broken()
        finally:
            c.disconnect()


def test_the_cursor_shape_global_is_not_offered_without_its_xml(client: SeatClient) -> None:
    assert "wp_cursor_shape_manager_v1" not in client.globals
    assert client.globals["wl_seat"][1] == 8


def test_stacking_decides_who_takes_the_pointer(served: RunningCompositor,
                                                client: SeatClient) -> None:
    """Top down: a subsurface above its parent, the parent, one below it; a subsurface
    without a buffer (and so its children) takes nothing."""
    window = client.toplevel("stacking")
    root = window.surface
    below, above, hidden, grandchild = (client.compositor.create_surface() for _ in range(4))
    subs = {}
    for surface, parent, position in ((below, root, (-10, 0)), (above, root, (30, 0)),
                                      (hidden, root, (0, 40)), (grandchild, hidden, (0, 0))):
        subs[surface] = client.subcompositor.get_subsurface(surface, parent)
        subs[surface].set_position(*position)
        subs[surface].set_desync()
    subs[below].place_below(root)
    for surface in (below, above, grandchild):
        client.show(surface, client.buffer(solid(40, 20, 0xFF00FF00)))
    client.show(root, client.buffer(solid(60, 60, 0xFF0000FF)))
    client.roundtrip()
    w = wait_until(lambda: next((s for s in served.shell.mapped_windows()
                                 if s.title == "stacking" and s.geometry.width == 80), None),
                   "the stacking window")
    assert (w.geometry.x, w.geometry.y) == (-10, 0)

    current: list[Any] = [None]
    for t, ((x, y), expected) in enumerate(cases_of(root, below, above).items()):
        def move(seat: Seat, x: float = x, y: float = y, t: int = t) -> None:
            seat.pointer_motion(w, x + 10, y, t)

        on_seat(served, move)
        client.roundtrip()
        for name, args in pointer_events(client):
            if name == "ptr.enter":
                current[0] = (args[1], args[2], args[3])
            elif name == "ptr.motion":
                current[0] = (current[0][0], args[1], args[2])
            elif name == "ptr.leave":
                current[0] = None
        assert current[0] == expected, (x, y)


def cases_of(root: Any, below: Any, above: Any) -> dict[tuple[float, float], Any]:
    return {(5.0, 5.0): (root, 5.0, 5.0),  # the root covers the one below it
            (-5.0, 5.0): (below, 5.0, 5.0),
            (35.0, 5.0): (above, 5.0, 5.0),  # above the root
            (65.0, 5.0): (above, 35.0, 5.0),
            (5.0, 45.0): (root, 5.0, 45.0),  # the hidden one's child: not shown
            (5.0, 65.0): None}


# -- focus and the objects' lives ---------------------------------------------------


def test_devices_made_after_focus_get_enter_at_once(served: RunningCompositor) -> None:
    c = SeatClient(served.path, keyboard=False, pointer=False)
    try:
        window, w = mapped(served, c, "late")
        on_seat(served, lambda s: s.keyboard_focus(w, pressed=[KEY_LEFTSHIFT]))
        on_seat(served, lambda s: s.pointer_motion(w, 7.0, 8.0, 1))
        c.roundtrip()
        assert c.events == []
        c.keyboard = c.make_keyboard()
        c.pointer = c.make_pointer()
        c.roundtrip()
        assert c.names() == ["kb.keymap", "kb.repeat_info", "kb.enter", "kb.modifiers",
                             "ptr.enter", "ptr.frame"]
        kb_enter = c.take("kb.enter")[0][1]
        assert kb_enter[1] is window.surface and keys_of(kb_enter[2]) == [KEY_LEFTSHIFT]
        assert c.take("ptr.enter")[0][1][1:] == (window.surface, 7.0, 8.0)
    finally:
        c.disconnect()


def test_an_unmapped_window_loses_the_focus(served: RunningCompositor,
                                            client: SeatClient) -> None:
    window, w = mapped(served, client, "unmapping")
    on_seat(served, lambda s: s.keyboard_focus(w))
    on_seat(served, lambda s: s.pointer_motion(w, 5.0, 5.0, 1))
    client.wait_for("ptr.enter")
    client.take()
    client.show(window.surface, None)
    client.roundtrip()
    client.wait_for("kb.leave")
    client.wait_for("ptr.leave")
    assert on_seat(served, lambda s: (s.keyboard.focus, s.pointer.focus)) == (None, None)
    on_seat(served, lambda s: s.key(KEY_A, True, 2))
    client.roundtrip()
    assert client.names("kb.key") == []


def test_a_destroyed_pointer_focus_gets_no_leave(served: RunningCompositor,
                                                 client: SeatClient) -> None:
    window, child, w = subsurface_scene(served, client)
    on_seat(served, lambda s: s.pointer_motion(w, 15.0, 35.0, 1))
    assert client.wait_for("ptr.enter")[0][1] is child
    client.take()
    child.destroy()  # its wl_subsurface goes inert
    client.roundtrip()
    assert on_seat(served, lambda s: s.pointer.focus) is None
    assert client.names("ptr.") == []
    on_seat(served, lambda s: s.pointer_motion(w, 16.0, 36.0, 2))
    assert client.wait_for("ptr.enter")[0][1:] == (window.surface, 26.0, 41.0)


def test_a_retired_window_loses_the_focus_and_listeners_hear(served: RunningCompositor,
                                                             client: SeatClient) -> None:
    other: SeatClient | None = SeatClient(served.path)
    assert other is not None
    try:
        window, w = mapped(served, client, "going")
        heard: list[object] = []
        on_seat(served, lambda s: s.focus_listeners.append(heard.append))
        on_seat(served, lambda s: s.keyboard_focus(w))
        client.wait_for("kb.enter")
        client.take()
        window.role.destroy()
        client.roundtrip()
        assert client.take("kb.leave")[0][1][1] is window.surface
        assert on_seat(served, lambda s: s.keyboard.focus) is None
        assert heard[-1] is None
        on_seat(served, lambda s: s.key(KEY_A, True, 2))
        client.roundtrip()
        assert client.names("kb.") == []
        _, w2 = mapped(served, other, "staying")
        on_seat(served, lambda s: s.keyboard_focus(w2))
        other.wait_for("kb.enter")
        on_seat(served, lambda s: s.key(KEY_Z, True, 3))
        assert other.wait_for("kb.key")[0][2:] == (KEY_Z, 1)
        assert on_seat(served, lambda s: s.keyboard_client is not None)
        assert heard[-1] is not None
        # The focused client going: the listeners hear of no focus.
        other.disconnect()
        other = None
        wait_until(lambda: heard[-1] is None, "the listeners to hear the client went")
    finally:
        if other is not None:
            other.disconnect()


def test_touch_is_a_missing_capability(client: SeatClient) -> None:
    client.seat.get_touch()
    assert client.broken()


def test_a_cursor_surface_may_have_no_other_role(served: RunningCompositor,
                                                 client: SeatClient) -> None:
    window, w = mapped(served, client, "roles")
    on_seat(served, lambda s: s.pointer_motion(w, 5.0, 5.0, 1))
    serial = client.wait_for("ptr.enter")[0][0]
    client.pointer.set_cursor(serial, window.surface, 0, 0)
    assert client.broken()


def test_an_old_keyboard_gets_no_repeat_info(served: RunningCompositor) -> None:
    c = SeatClient(served.path, seat_version=1)
    try:
        assert c.names("kb.") == ["kb.keymap"]
        assert c.seat_names == []  # wl_seat.name is version 2's
        assert c.seat_caps == [3]
    finally:
        c.disconnect()


def test_focus_moving_away_from_a_menu_goes_straight_to_the_new_window(
        served: RunningCompositor, client: SeatClient) -> None:
    other = SeatClient(served.path)
    try:
        top, w = mapped(served, client, "menu owner", (200, 150))
        _, w2 = mapped(served, other, "next")
        on_seat(served, lambda s: s.keyboard_focus(w))
        on_seat(served, lambda s: s.pointer_motion(w, 15.0, 15.0, 1))
        serial = on_seat(served, lambda s: s.pointer_button(w, 15.0, 15.0, BTN_LEFT, True, 2))
        assert isinstance(serial, int)
        menu = grabbing_popup(client, top, serial, "menu")
        client.wait(lambda: "kb.enter" in client.names() and
                    client.take("kb.enter")[-1][1][1] is menu.surface, "focus on the menu")
        client.take()
        on_seat(served, lambda s: s.keyboard_focus(w2))
        other.wait_for("kb.enter")
        client.wait(lambda: menu.popup_done, "the menu's popup_done")
        client.roundtrip()
        kb = client.take("kb.")
        assert [n for n, _ in kb] == ["kb.leave"]
        assert kb[0][1][1] is menu.surface
    finally:
        other.disconnect()
