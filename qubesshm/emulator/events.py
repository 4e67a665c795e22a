"""The X events the emulator's model takes, as plain values (no X library in sight).

``xwindows.py`` reads them from the X server and fills these in; ``daemon.GuiDaemon``
decides what qubes-guid would send for each. Fields keep the X protocol's values and
names (Xlib's ``XKeyEvent``, ``XCrossingEvent`` ... as ``gui-daemon/xside.c`` reads
them): ``window`` is the GUI window (the agent's id) whose X window got the event,
``x``/``y`` are relative to that X window, ``state`` is the key-and-button mask,
``time`` the X server's millisecond time.
"""

from __future__ import annotations

from dataclasses import dataclass

from qubesshm.pixels.region import Rect

# Core event codes (X.h), the ``type`` fields the daemon copies into its messages.
KEY_PRESS, KEY_RELEASE, BUTTON_PRESS, BUTTON_RELEASE = 2, 3, 4, 5
ENTER_NOTIFY, LEAVE_NOTIFY, FOCUS_IN, FOCUS_OUT = 7, 8, 9, 10

# Crossing and focus modes (X.h)
NOTIFY_NORMAL, NOTIFY_GRAB, NOTIFY_UNGRAB, NOTIFY_WHILE_GRABBED = 0, 1, 2, 3

# Modifier masks (X.h)
SHIFT_MASK, LOCK_MASK, CONTROL_MASK = 1 << 0, 1 << 1, 1 << 2
MOD1_MASK, MOD2_MASK, MOD3_MASK, MOD4_MASK, MOD5_MASK = 1 << 3, 1 << 4, 1 << 5, 1 << 6, 1 << 7

KEYMAP_BYTES = 32  # QueryKeymap: one bit per key code


@dataclass(frozen=True, slots=True)
class Exposed:
    """An Expose event on a GUI window (window coordinates)."""

    window: int
    rect: Rect


@dataclass(frozen=True, slots=True)
class Configured:
    """A ConfigureNotify of a GUI window, in root coordinates."""

    window: int
    rect: Rect


@dataclass(frozen=True, slots=True)
class Key:
    """KeyPress (``type`` 2) or KeyRelease (3)."""

    window: int
    type: int
    x: int
    y: int
    state: int
    keycode: int
    time: int


@dataclass(frozen=True, slots=True)
class Button:
    """ButtonPress (``type`` 4) or ButtonRelease (5)."""

    window: int
    type: int
    x: int
    y: int
    state: int
    button: int
    time: int


@dataclass(frozen=True, slots=True)
class Motion:
    window: int
    x: int
    y: int
    state: int
    is_hint: int


@dataclass(frozen=True, slots=True)
class Crossing:
    """EnterNotify (``type`` 7) or LeaveNotify (8). ``keys``: the X server's key bitmap
    (QueryKeymap) read when the event was taken, as qubes-guid reads it on an enter."""

    window: int
    type: int
    x: int
    y: int
    state: int
    mode: int
    detail: int
    focus: int
    keys: bytes = bytes(KEYMAP_BYTES)


@dataclass(frozen=True, slots=True)
class Focus:
    """FocusIn (``type`` 9) or FocusOut (10); ``keys`` as for ``Crossing``."""

    window: int
    type: int
    mode: int
    detail: int
    keys: bytes = bytes(KEYMAP_BYTES)


@dataclass(frozen=True, slots=True)
class DeleteRequest:
    """A ClientMessage whose first 32-bit word is ``WM_DELETE_WINDOW`` (a window manager's
    or a user's "close")."""

    window: int


@dataclass(frozen=True, slots=True)
class WmStateChanged:
    """PropertyNotify of ``_NET_WM_STATE``: the states it now lists by name (names the
    emulator does not know are left out), or None when it was deleted."""

    window: int
    states: tuple[str, ...] | None


@dataclass(frozen=True, slots=True)
class MapNotified:
    """MapNotify of a GUI window's X window; ``viewable``: its map state right after."""

    window: int
    override_redirect: bool
    viewable: bool


@dataclass(frozen=True, slots=True)
class KeyboardMapped:
    """The X server's keyboard mapping (at start and after each MappingNotify): the key
    codes ``XKeysymToKeycode`` gives for the clipboard keys' keysyms (0: none)."""

    copy_keycode: int
    paste_keycode: int


Input = Key | Button | Motion | Crossing | Focus | DeleteRequest | WmStateChanged | MapNotified
XEvent = Exposed | Configured | Input | KeyboardMapped
