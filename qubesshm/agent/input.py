"""The daemon's input messages as calls on the compositor's seat.

Sans-IO: ``AgentInput.on_message`` takes ``KEYPRESS``, ``BUTTON``, ``MOTION``,
``CROSSING``, ``FOCUS`` and ``KEYMAP_NOTIFY`` and calls the injected ``Seat``
(``compositor.seat``) and ``WindowManager`` (the toplevel's activated state),
stamping each event with the injected clock. What each message does follows
today's X agent (qubes-gui-agent-linux ``vmside.c``):

- ``KEYPRESS``: X key code - 8 is the evdev code (Xorg's evdev offset); the
  window is not looked at (keys go to the focused window, as there). A press of
  a key already down (the daemon's autorepeat) is dropped: Wayland clients repeat
  keys themselves (``repeat_info``). Caps Lock and Num Lock follow dom0's: when
  the event's state (dom0's modifiers) and the seat's locked modifiers disagree
  on Lock or Mod2, a Caps Lock or Num Lock press and release comes first, as
  vmside syncs them (its default syncs Lock; Num Lock too here, as the seat
  starts each focus with no lock on, where vmside's X server keeps its own).
  dom0's other modifiers arrive as their own keys.
- ``BUTTON``: X buttons 1, 2, 3, 8, 9 are ``BTN_LEFT``, ``BTN_MIDDLE``,
  ``BTN_RIGHT``, ``BTN_SIDE``, ``BTN_EXTRA``; 4/5 are one wheel step up/down,
  6/7 left/right (their releases carry nothing); at the message's window
  coordinates, which are the window geometry's.
- ``MOTION``: the pointer at (x, y) of the window.
- ``CROSSING``: only ``NotifyNormal`` ones count (vmside ignores the crossings
  of grabs); an enter is a motion to its point, a leave leaves the window.
- ``FOCUS``: in (``NotifyNormal`` or ``NotifyUngrab``) gives the window keyboard
  focus and the activated state, with the keys the last ``KEYMAP_NOTIFY`` said
  are held; out takes both away. The daemon sends ``KEYMAP_NOTIFY`` (window 0)
  right before each focus in and pointer enter.
- ``KEYMAP_NOTIFY`` while a window has focus: keys the agent holds down that
  are up in dom0 are released (their release went elsewhere); none is pressed,
  as vmside does.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import Protocol

from ..compositor.frames import timestamp_ms
from ..compositor.shell import ShellWindow, ToplevelState
from ..guiproto import messages as gm
from .windows import WindowManager

log = logging.getLogger("qubesshm.agent")

# X protocol constants (X11/X.h).
KEY_PRESS = 2
KEY_RELEASE = 3
BUTTON_PRESS = 4
BUTTON_RELEASE = 5
ENTER_NOTIFY = 7
LEAVE_NOTIFY = 8
FOCUS_IN = 9
FOCUS_OUT = 10
NOTIFY_NORMAL = 0
NOTIFY_GRAB = 1
NOTIFY_UNGRAB = 2
KEY_CAPSLOCK = 58
KEY_NUMLOCK = 69
# X's LockMask and Mod2Mask (Num Lock), the same bits in an evdev keymap's modifiers,
# and the key that toggles each.
LOCKS = ((1 << 1, KEY_CAPSLOCK), (1 << 4, KEY_NUMLOCK))

EVDEV_OFFSET = 8  # X key code = evdev code + 8
# linux/input-event-codes.h
BTN_LEFT = 0x110
BTN_RIGHT = 0x111
BTN_MIDDLE = 0x112
BTN_SIDE = 0x113
BTN_EXTRA = 0x114
BUTTONS = {1: BTN_LEFT, 2: BTN_MIDDLE, 3: BTN_RIGHT, 8: BTN_SIDE, 9: BTN_EXTRA}
AXIS_VERTICAL = 0
AXIS_HORIZONTAL = 1
# X wheel buttons: (axis, steps)
WHEEL = {4: (AXIS_VERTICAL, -1), 5: (AXIS_VERTICAL, 1), 6: (AXIS_HORIZONTAL, -1),
         7: (AXIS_HORIZONTAL, 1)}

INPUT_MESSAGES = frozenset({gm.MsgType.KEYPRESS, gm.MsgType.BUTTON, gm.MsgType.MOTION,
                            gm.MsgType.CROSSING, gm.MsgType.FOCUS, gm.MsgType.KEYMAP_NOTIFY})


class _KeyState(Protocol):
    def modifiers(self) -> tuple[int, int, int, int]:
        """Depressed, latched and locked modifiers, and the group."""
        ...


class _Keyboard(Protocol):
    @property
    def state(self) -> _KeyState: ...


class Seat(Protocol):
    """What the agent calls on the compositor's seat (``compositor.seat``)."""

    @property
    def keyboard(self) -> _Keyboard: ...

    def keyboard_focus(self, w: ShellWindow | None, pressed: Iterable[int] = ()) -> None: ...

    def key(self, code: int, pressed: bool, time_ms: int) -> None: ...

    def pointer_motion(self, w: ShellWindow, x: float, y: float, time_ms: int) -> None: ...

    def pointer_leave(self, w: ShellWindow) -> None: ...

    def pointer_button(self, w: ShellWindow, x: float, y: float, button: int, pressed: bool,
                       time_ms: int) -> int | None: ...

    def pointer_axis(self, w: ShellWindow, x: float, y: float, axis: int, steps: int,
                     time_ms: int) -> None: ...


def pressed_keys(bitmap: bytes) -> list[int]:
    """The evdev codes of the keys a ``KEYMAP_NOTIFY`` bitmap says are down (bit n of
    the 256: X key code n)."""
    return [code - EVDEV_OFFSET for code in range(EVDEV_OFFSET, 256)
            if bitmap[code // 8] >> (code % 8) & 1]


class AgentInput:
    """One daemon connection's input, for one seat."""

    def __init__(self, seat: Seat, wm: WindowManager,
                 window_of: Callable[[int], ShellWindow | None],
                 clock: Callable[[], float]) -> None:
        self.seat = seat
        self.wm = wm
        self.window_of = window_of
        self.clock = clock
        self.focused: ShellWindow | None = None
        self.pressed: set[int] = set()  # evdev codes down, as the seat was told
        self.pointed: ShellWindow | None = None  # where the daemon last said the pointer is
        self._keymap: list[int] = []  # the last KEYMAP_NOTIFY's keys

    def _now(self) -> int:
        return timestamp_ms(self.clock())

    def reset(self) -> None:
        """The daemon went away: no window has focus, keys held or the pointer any more."""
        self._unfocus()
        self._keymap = []
        if self.pointed is not None:
            self.seat.pointer_leave(self.pointed)
            self.pointed = None

    def window_gone(self, w: ShellWindow) -> None:
        """``w`` unmapped (the seat forgets its own focus)."""
        if self.focused is w:
            self.focused = None
            self.pressed.clear()
        if self.pointed is w:
            self.pointed = None

    def on_message(self, msg: gm.Message) -> None:
        body = msg.body
        if isinstance(body, gm.KeymapNotify):
            self._keymap_notify(body.keys)
        elif isinstance(body, gm.Keypress):
            self._key(body)
        elif isinstance(body, gm.Focus):
            self._focus(msg.window, body)
        else:
            w = self.window_of(msg.window)
            if w is None:
                return  # a window gone meanwhile (or the ACK barrier's)
            if isinstance(body, gm.Motion):
                self.pointed = w
                self.seat.pointer_motion(w, body.x, body.y, self._now())
            elif isinstance(body, gm.Button):
                self._button(w, body)
            elif isinstance(body, gm.Crossing):
                self._crossing(w, body)

    # -- keyboard ----------------------------------------------------------------

    def _key(self, body: gm.Keypress) -> None:
        code = body.keycode - EVDEV_OFFSET
        if code < 0 or self.focused is None:
            return
        if body.type == KEY_PRESS:
            if code in self.pressed:
                return  # autorepeat: the client repeats by itself
            self._sync_locks(code, body.state)
            self.pressed.add(code)
            self.seat.key(code, True, self._now())
        elif body.type == KEY_RELEASE:
            if code not in self.pressed:
                return  # pressed before the window had focus: the client never saw it
            self.pressed.discard(code)
            self.seat.key(code, False, self._now())

    def _sync_locks(self, code: int, state: int) -> None:
        """Before key ``code``: toggle the locks dom0's ``state`` has and the seat not
        (or the other way round); not before the lock key itself, which toggles."""
        locked = self.seat.keyboard.state.modifiers()[2]
        for mask, lock_key in LOCKS:
            if (state ^ locked) & mask and code != lock_key and lock_key not in self.pressed:
                now = self._now()
                self.seat.key(lock_key, True, now)
                self.seat.key(lock_key, False, now)

    def _keymap_notify(self, bitmap: bytes) -> None:
        keys = pressed_keys(bitmap)
        self._keymap = keys
        if self.focused is None:
            return
        held = set(keys)
        for code in sorted(self.pressed - held):
            self.pressed.discard(code)
            self.seat.key(code, False, self._now())

    def _focus(self, window: int, body: gm.Focus) -> None:
        if body.mode not in (NOTIFY_NORMAL, NOTIFY_UNGRAB):
            return
        w = self.window_of(window)
        if body.type == FOCUS_IN:
            if w is None:
                return
            if self.focused is not None and self.focused is not w:
                self._unfocus()
            self.focused = w
            self.pressed = set(self._keymap)
            self.seat.keyboard_focus(w, sorted(self.pressed))
            self.wm.set_states(w, add=(ToplevelState.ACTIVATED,))
        elif body.type == FOCUS_OUT and w is not None and w is self.focused:
            self._unfocus()

    def _unfocus(self) -> None:
        w, self.focused = self.focused, None
        self.pressed.clear()
        if w is None:
            return
        self.seat.keyboard_focus(None)
        self.wm.set_states(w, remove=(ToplevelState.ACTIVATED,))

    # -- pointer ----------------------------------------------------------------

    def _button(self, w: ShellWindow, body: gm.Button) -> None:
        if body.type not in (BUTTON_PRESS, BUTTON_RELEASE):
            return
        pressed = body.type == BUTTON_PRESS
        wheel = WHEEL.get(body.button)
        if wheel is not None:
            if pressed:
                self.seat.pointer_axis(w, body.x, body.y, wheel[0], wheel[1], self._now())
            return
        button = BUTTONS.get(body.button)
        if button is None:
            log.debug("X button %d has no Wayland button: ignored", body.button)
            return
        self.seat.pointer_button(w, body.x, body.y, button, pressed, self._now())

    def _crossing(self, w: ShellWindow, body: gm.Crossing) -> None:
        if body.mode != NOTIFY_NORMAL:
            return  # the crossings of a grab in dom0, as vmside ignores them
        if body.type == ENTER_NOTIFY:
            self.pointed = w
            self.seat.pointer_motion(w, body.x, body.y, self._now())
        elif body.type == LEAVE_NOTIFY:
            if self.pointed is w:
                self.pointed = None
            self.seat.pointer_leave(w)
