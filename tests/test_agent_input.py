"""The daemon's input messages through the agent to libwayland clients (pywayland).

Sans-IO on the agent's side: messages as the GUI daemon sends them go into
``AgentInput`` (and ``AgentWindows`` for the window ids), in the thread of a
real compositor served on a socket; what the client's wl_keyboard, wl_pointer
and xdg_toplevel receive is checked event by event.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from compositor_clients import PyWindow, solid
from compositor_server import ServedCompositor, serving
from compositor_shell import wait_until
from seat_clients import SeatClient, keys_of
from test_agent_windows import FakeArea, FakeAreas
from test_compositor_seat import typed

from qubesshm.agent.input import AgentInput, pressed_keys
from qubesshm.agent.windows import AgentWindows
from qubesshm.compositor.core import Compositor
from qubesshm.guiproto import messages as gm

# X events and modes (X11/X.h), as the daemon copies them into its messages.
KEY_PRESS, KEY_RELEASE, BUTTON_PRESS, BUTTON_RELEASE = 2, 3, 4, 5
ENTER, LEAVE, FOCUS_IN, FOCUS_OUT = 7, 8, 9, 10
NORMAL, GRAB, UNGRAB = 0, 1, 2
# X key codes (evdev + 8)
X_SHIFT, X_A, X_B, X_Z = 50, 38, 56, 52
KEY_LEFTSHIFT, KEY_A, KEY_B = 42, 30, 48
ACTIVATED = 4


def keymap_bits(*x_codes: int) -> bytes:
    bits = bytearray(32)
    for code in x_codes:
        bits[code // 8] |= 1 << (code % 8)
    return bytes(bits)


class AgentServed(ServedCompositor):
    """A compositor whose shell is the agent's windows, served from a thread, and the
    agent's input; ``send`` gives them a daemon message in that thread."""

    def __init__(self, runtime: Path) -> None:
        self.now = 100.0
        self.agent: AgentWindows[FakeArea] = AgentWindows(FakeAreas(), clock=lambda: self.now)
        comp = Compositor(self.agent, clock=lambda: self.now, screen=(1280, 1024))
        self.agent.wm = comp
        self.agent.connect(gm.VERSION, gm.Xconf.for_screen(1280, 1024))
        self.input = AgentInput(comp.seat, comp, self.agent.window_by_id,
                                clock=lambda: self.now)
        super().__init__(comp, runtime, "qs-agent-input")

    def send(self, window: int, body: gm.Body, *, advance: float = 0.001) -> None:
        def deliver() -> None:
            self.now += advance
            self.input.on_message(gm.Message.of(window, body))

        self.call(deliver)

    def window_id(self, title: str) -> int:
        """The daemon's id of the window titled ``title``, once shown."""
        def find() -> int | None:
            return next((win.id for win in self.agent.shown() if win.shell.title == title),
                        None)

        return wait_until(lambda: self.call(find), f"{title!r} shown to the daemon")


@pytest.fixture
def served() -> Iterator[AgentServed]:
    with serving(AgentServed) as running:
        yield running


@pytest.fixture
def client(served: AgentServed) -> Iterator[SeatClient]:
    c = SeatClient(served.path)
    yield c
    c.disconnect()


def shown(served: AgentServed, client: SeatClient, title: str, size: tuple[int, int] = (120, 90),
          before_commit: Callable[[PyWindow], None] | None = None) -> tuple[PyWindow, int]:
    window = client.toplevel(title, before_commit=before_commit)
    states: list[tuple[int, ...]] = []

    def on_configure(_: Any, width: int, height: int, raw: Any) -> None:
        data = bytes(raw) if not isinstance(raw, list) else struct.pack(
            f"={len(raw)}I", *raw)
        states.append(struct.unpack(f"={len(data) // 4}I", data))
        window.configures.append((width, height))

    window.role.dispatcher["configure"] = on_configure
    window.states = states  # type: ignore[attr-defined]
    client.show(window.surface, client.buffer(solid(*size, 0xFF336699)))
    client.roundtrip()
    return window, served.window_id(title)


def toplevel_states(window: PyWindow) -> list[tuple[int, ...]]:
    states: list[tuple[int, ...]] = window.states  # type: ignore[attr-defined]
    return states


# -- the keyboard ---------------------------------------------------------------------


def test_focus_in_gives_keyboard_focus_with_the_held_keys_and_the_activated_state(
        served: AgentServed, client: SeatClient) -> None:
    window, wid = shown(served, client, "focus")
    client.take()
    # The daemon sends KEYMAP_NOTIFY (window 0) right before each FOCUS in.
    served.send(0, gm.KeymapNotify(keymap_bits(X_SHIFT)))
    served.send(wid, gm.Focus(FOCUS_IN, NORMAL, 3))
    (enter,) = client.wait_for("kb.enter")
    assert keys_of(enter[2]) == [KEY_LEFTSHIFT]
    mods = client.wait_for("kb.modifiers")
    assert mods[-1][1] & 1  # shift is down
    client.wait(lambda: bool(toplevel_states(window)) and ACTIVATED in toplevel_states(
        window)[-1], "the activated state")
    served.send(wid, gm.Focus(FOCUS_OUT, NORMAL, 3))
    client.wait_for("kb.leave")
    client.wait(lambda: ACTIVATED not in toplevel_states(window)[-1], "activated taken away")


def test_a_window_mapped_again_is_not_activated_until_focused_again(
        served: AgentServed, client: SeatClient) -> None:
    window, wid = shown(served, client, "again")
    served.send(0, gm.KeymapNotify(bytes(32)))
    served.send(wid, gm.Focus(FOCUS_IN, NORMAL, 3))
    client.wait(lambda: bool(toplevel_states(window)) and ACTIVATED in toplevel_states(
        window)[-1], "the activated state")
    # The client unmaps its window (a null buffer), then maps it again: a new initial
    # commit, answered with a configure. Its focus went with the unmap; so did activated.
    client.show(window.surface, None)
    client.roundtrip()
    seen = len(toplevel_states(window))
    window.surface.commit()
    client.wait(lambda: len(toplevel_states(window)) > seen, "the new initial configure")
    assert ACTIVATED not in toplevel_states(window)[-1]


def test_keypresses_type_text_and_a_repeated_press_is_left_to_the_client(
        served: AgentServed, client: SeatClient) -> None:
    _window, wid = shown(served, client, "typing")
    served.send(0, gm.KeymapNotify(bytes(32)))
    served.send(wid, gm.Focus(FOCUS_IN, NORMAL, 3))
    client.wait_for("kb.enter")
    client.take()
    for x_code, kind in ((X_A, KEY_PRESS), (X_A, KEY_PRESS), (X_A, KEY_RELEASE),
                         (X_SHIFT, KEY_PRESS), (X_B, KEY_PRESS), (X_B, KEY_RELEASE),
                         (X_SHIFT, KEY_RELEASE), (X_Z, KEY_RELEASE)):
        served.send(wid, gm.Keypress(kind, 5, 5, 0, x_code))
    client.wait_for("kb.key", 6)
    client.roundtrip()
    keys = [(args[2], args[3]) for name, args in client.events if name == "kb.key"]
    assert keys == [(KEY_A, 1), (KEY_A, 0), (KEY_LEFTSHIFT, 1), (KEY_B, 1), (KEY_B, 0),
                    (KEY_LEFTSHIFT, 0)]  # no second press, no release of a key never down
    assert typed(client) == "aB"
    times = [args[1] for name, args in client.events if name == "kb.key"]
    # Stamped by the agent's clock (a millisecond a message here).
    assert times == sorted(times) and abs(times[-1] - int(served.now * 1000)) <= 2


def test_caps_lock_follows_the_state_dom0_sends_with_each_key(served: AgentServed,
                                                             client: SeatClient) -> None:
    _window, wid = shown(served, client, "caps")
    served.send(0, gm.KeymapNotify(bytes(32)))
    served.send(wid, gm.Focus(FOCUS_IN, NORMAL, 3))
    client.wait_for("kb.enter")
    client.take()
    lock = 2  # X's LockMask: Caps Lock is on in dom0
    for x_code, kind, state in ((X_A, KEY_PRESS, lock), (X_A, KEY_RELEASE, lock),
                                (X_B, KEY_PRESS, lock), (X_B, KEY_RELEASE, lock),
                                (X_A, KEY_PRESS, 0), (X_A, KEY_RELEASE, 0)):
        served.send(wid, gm.Keypress(kind, 5, 5, state, x_code))
    client.wait_for("kb.key", 10)
    client.roundtrip()
    keys = [(args[2], args[3]) for name, args in client.events if name == "kb.key"]
    caps = [(58, 1), (58, 0)]
    assert keys == [*caps, (KEY_A, 1), (KEY_A, 0), (KEY_B, 1), (KEY_B, 0),
                    *caps, (KEY_A, 1), (KEY_A, 0)]
    assert typed(client) == "ABa"
    # Num Lock on in dom0 (Mod2Mask): the keypad's 1 is a 1, not End.
    client.take()
    served.send(wid, gm.Keypress(KEY_PRESS, 5, 5, 0x10, 87))
    client.wait_for("kb.key", 3)
    assert typed(client) == "1"


def test_keymap_notify_while_focused_releases_keys_let_go_elsewhere(
        served: AgentServed, client: SeatClient) -> None:
    _window, wid = shown(served, client, "keymap")
    served.send(0, gm.KeymapNotify(keymap_bits(X_A, X_B)))
    served.send(wid, gm.Focus(FOCUS_IN, NORMAL, 3))
    (enter,) = client.wait_for("kb.enter")
    assert sorted(keys_of(enter[2])) == [KEY_A, KEY_B]
    client.take()
    # The pointer entered again: the daemon says which keys are down now.
    served.send(0, gm.KeymapNotify(keymap_bits(X_B, X_Z)))
    client.wait_for("kb.key")
    client.roundtrip()
    assert [(a[2], a[3]) for n, a in client.events if n == "kb.key"] == [(KEY_A, 0)]


def test_focus_changes_of_dom0_grabs_are_ignored(served: AgentServed,
                                                 client: SeatClient) -> None:
    _window, wid = shown(served, client, "grabs")
    client.take()
    served.send(wid, gm.Focus(FOCUS_IN, GRAB, 3))
    client.roundtrip()
    served.send(wid, gm.Focus(FOCUS_IN, UNGRAB, 3))
    client.wait_for("kb.enter")
    client.take()
    served.send(wid, gm.Focus(FOCUS_OUT, GRAB, 3))
    served.send(wid, gm.Keypress(KEY_PRESS, 1, 1, 0, X_A))
    client.wait_for("kb.key")
    assert "kb.leave" not in client.names()


def test_focus_moves_between_windows_of_two_clients(served: AgentServed,
                                                    client: SeatClient) -> None:
    other = SeatClient(served.path)
    try:
        first, first_id = shown(served, client, "first")
        second, second_id = shown(served, other, "second")
        served.send(first_id, gm.Focus(FOCUS_IN, NORMAL, 3))
        client.wait_for("kb.enter")
        served.send(first_id, gm.Focus(FOCUS_OUT, NORMAL, 3))
        served.send(second_id, gm.Focus(FOCUS_IN, NORMAL, 3))
        client.wait_for("kb.leave")
        other.wait_for("kb.enter")
        served.send(second_id, gm.Keypress(KEY_PRESS, 1, 1, 0, X_A))
        other.wait_for("kb.key")
        client.roundtrip()
        assert "kb.key" not in client.names()
        other.wait(lambda: ACTIVATED in toplevel_states(second)[-1], "second activated")
        client.wait(lambda: ACTIVATED not in toplevel_states(first)[-1], "first deactivated")
    finally:
        other.disconnect()


# -- the pointer --------------------------------------------------------------------


def pointer(c: SeatClient) -> list[tuple[str, tuple[Any, ...]]]:
    c.roundtrip()
    return [(n[4:], a) for n, a in c.take("ptr.")]


def test_crossing_and_motion_are_at_window_geometry_coordinates(
        served: AgentServed, client: SeatClient) -> None:
    def geometry(window: PyWindow) -> None:
        window.xdg_surface.set_window_geometry(10, 5, 100, 80)

    _window, wid = shown(served, client, "pointer", size=(120, 90), before_commit=geometry)
    client.take()
    served.send(0, gm.KeymapNotify(bytes(32)))
    served.send(wid, gm.Crossing(ENTER, 20, 30, 0, NORMAL, 0, 0))
    client.wait_for("ptr.enter")
    served.send(wid, gm.Motion(21, 32, 0, 0))
    client.wait_for("ptr.motion")
    events = pointer(client)
    enter = next(a for n, a in events if n == "enter")
    assert (enter[2], enter[3]) == (30.0, 35.0)  # the window geometry's offset added
    motion = next(a for n, a in events if n == "motion")
    assert (motion[1], motion[2]) == (31.0, 37.0)
    # A crossing of a grab is not the pointer leaving (vmside ignores those).
    served.send(wid, gm.Crossing(LEAVE, 20, 30, 0, GRAB, 0, 0))
    served.send(wid, gm.Crossing(LEAVE, 200, 30, 0, NORMAL, 0, 0))
    client.wait_for("ptr.leave")
    assert [n for n, _ in pointer(client)].count("leave") == 1


def test_a_daemon_gone_takes_keyboard_focus_and_the_pointer_away(
        served: AgentServed, client: SeatClient) -> None:
    window, wid = shown(served, client, "gone")
    served.send(0, gm.KeymapNotify(keymap_bits(X_A)))
    served.send(wid, gm.Focus(FOCUS_IN, NORMAL, 3))
    served.send(wid, gm.Motion(10, 10, 0, 0))
    client.wait_for("ptr.enter")
    client.wait_for("kb.enter")
    client.take()
    served.call(served.input.reset)
    client.wait_for("kb.leave")
    client.wait_for("ptr.leave")
    client.wait(lambda: ACTIVATED not in toplevel_states(window)[-1], "deactivated")
    assert served.call(lambda: served.input.pressed) == set()


@pytest.mark.parametrize(("x_button", "code"), [(1, 0x110), (2, 0x112), (3, 0x111),
                                                (8, 0x113), (9, 0x114)])
def test_x_buttons_are_linux_buttons(served: AgentServed, client: SeatClient, x_button: int,
                                     code: int) -> None:
    _window, wid = shown(served, client, "buttons")
    served.send(wid, gm.Motion(10, 10, 0, 0))
    client.wait_for("ptr.enter")
    client.take()
    served.send(wid, gm.Button(BUTTON_PRESS, 10, 10, 0, x_button))
    served.send(wid, gm.Button(BUTTON_RELEASE, 10, 10, 0, x_button))
    client.wait_for("ptr.button", 2)
    buttons = [(a[2], a[3]) for n, a in pointer(client) if n == "button"]
    assert buttons == [(code, 1), (code, 0)]


def test_wheel_buttons_are_axis_steps_and_their_releases_nothing(
        served: AgentServed, client: SeatClient) -> None:
    _window, wid = shown(served, client, "wheel")
    served.send(wid, gm.Motion(10, 10, 0, 0))
    client.wait_for("ptr.enter")
    client.take()
    for x_button in (4, 5, 6, 7):
        served.send(wid, gm.Button(BUTTON_PRESS, 10, 10, 0, x_button))
        served.send(wid, gm.Button(BUTTON_RELEASE, 10, 10, 0, x_button))
    client.wait_for("ptr.axis", 4)
    events = pointer(client)
    axes = [(a[1], a[2]) for n, a in events if n == "axis"]
    assert axes == [(0, -15.0), (0, 15.0), (1, -15.0), (1, 15.0)]
    assert [(a[0], a[1]) for n, a in events if n == "axis_value120"] == [
        (0, -120), (0, 120), (1, -120), (1, 120)]
    assert "button" not in [n for n, _ in events]


def test_messages_for_unknown_windows_are_dropped(served: AgentServed,
                                                 client: SeatClient) -> None:
    shown(served, client, "known")
    client.take()
    for body in (gm.Motion(1, 1, 0, 0), gm.Button(BUTTON_PRESS, 1, 1, 0, 1),
                 gm.Focus(FOCUS_IN, NORMAL, 3), gm.Crossing(ENTER, 1, 1, 0, NORMAL, 0, 0)):
        served.send(0x7777, body)
    served.send(0x7777, gm.Keypress(KEY_PRESS, 1, 1, 0, X_A))  # no window has focus
    client.roundtrip()
    assert client.take() == []


def test_pressed_keys_of_a_keymap_bitmap_are_evdev_codes() -> None:
    assert pressed_keys(keymap_bits(9, 50, 255)) == [1, 42, 247]
    assert pressed_keys(keymap_bits(0, 7)) == []  # below the evdev offset: no key
