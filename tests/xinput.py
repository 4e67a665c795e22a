"""Input for tests: key presses, clicks, motion and scrolling through XTest, with xcffib.

Each helper sends XTest ``FakeInput`` requests on an xcffib connection and then makes
one round trip (``GetInputFocus``), so that when it returns the X server has processed
the input and queued the events it caused (a client that selected them may still have
to read them). Coordinates are root-window coordinates of the connection's first
screen.

Text is typed with the X server's own keyboard mapping (``GetKeyboardMapping``): each
character's keysym is looked up among the key codes' keysyms; at level 1 it is typed
alone, at level 2 with Shift held. A character the mapping does not have is a
``KeyError`` naming it (the helpers never change the server's mapping).

    type_text(conn, "Hello Zy\\n")
    key(conn, keycode, True); key(conn, keycode, False)
    chord(conn, "Control_L", "Shift_L", "c")   # press in order, release in reverse
    move(conn, 100, 200); click(conn, 100, 200, button=3); scroll(conn, 100, 200, -2)
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import xcffib.xtest

# Core event types as XTest takes them (X.h).
KEY_PRESS, KEY_RELEASE, BUTTON_PRESS, BUTTON_RELEASE, MOTION_NOTIFY = 2, 3, 4, 5, 6

# Keysyms of the keys that are not characters (X11/keysymdef.h), by name.
NAMED_KEYSYMS: dict[str, int] = {
    "BackSpace": 0xFF08, "Tab": 0xFF09, "Return": 0xFF0D, "Escape": 0xFF1B,
    "Delete": 0xFFFF, "Home": 0xFF50, "Left": 0xFF51, "Up": 0xFF52, "Right": 0xFF53,
    "Down": 0xFF54, "Page_Up": 0xFF55, "Page_Down": 0xFF56, "End": 0xFF57,
    "Shift_L": 0xFFE1, "Shift_R": 0xFFE2, "Control_L": 0xFFE3, "Control_R": 0xFFE4,
    "Caps_Lock": 0xFFE5, "Alt_L": 0xFFE9, "Alt_R": 0xFFEA, "Super_L": 0xFFEB,
    "F1": 0xFFBE, "F2": 0xFFBF, "F3": 0xFFC0, "F4": 0xFFC1, "F5": 0xFFC2,
    "F10": 0xFFC7, "F11": 0xFFC8, "F12": 0xFFC9,
}
# Control characters typed as the key that makes them.
_CONTROL_KEYSYMS = {"\n": 0xFF0D, "\r": 0xFF0D, "\t": 0xFF09, "\b": 0xFF08, "\x1b": 0xFF1B}

SHIFT_L = NAMED_KEYSYMS["Shift_L"]


def keysym_of(char: str) -> int:
    """The keysym of one character: Latin-1 keysyms are the code point, other Unicode
    characters ``0x01000000 + code point`` (keysymdef.h); ``\\n``, ``\\t``, ``\\b`` and
    escape are Return, Tab, BackSpace and Escape."""
    if len(char) != 1:
        raise ValueError(f"one character expected, not {char!r}")
    if char in _CONTROL_KEYSYMS:
        return _CONTROL_KEYSYMS[char]
    point = ord(char)
    if 0x20 <= point <= 0x7E or 0xA0 <= point <= 0xFF:
        return point
    return 0x01000000 + point


def named_keysym(name: str) -> int:
    """A keysym by its keysymdef.h name (``NAMED_KEYSYMS``) or as a one-character name."""
    if name in NAMED_KEYSYMS:
        return NAMED_KEYSYMS[name]
    if len(name) == 1:
        return keysym_of(name)
    raise KeyError(f"no keysym named {name!r} here (tests/xinput.NAMED_KEYSYMS)")


@dataclass(frozen=True)
class Stroke:
    """How to type a keysym: its key code, and whether Shift is held (level 2)."""

    keycode: int
    shift: bool


@dataclass(frozen=True)
class KeyboardMapping:
    """The X server's keysyms by key code (``GetKeyboardMapping``)."""

    min_keycode: int
    per_keycode: int
    keysyms: tuple[int, ...]

    @classmethod
    def read(cls, conn: Any) -> KeyboardMapping:
        setup = conn.get_setup()
        first, last = setup.min_keycode, setup.max_keycode
        reply = conn.core.GetKeyboardMapping(first, last - first + 1).reply()
        return cls(first, reply.keysyms_per_keycode, tuple(reply.keysyms))

    def levels(self, keycode: int) -> tuple[int, int]:
        """The keysyms of ``keycode`` at levels 1 and 2 of group 1, with the core
        protocol's rule for a key listing one keysym: a letter's level 2 is its upper
        case, another keysym is the same at both levels."""
        start = (keycode - self.min_keycode) * self.per_keycode
        row = self.keysyms[start:start + self.per_keycode]
        first = row[0] if row else 0
        second = row[1] if len(row) > 1 else 0
        if second == 0:
            second = _upper(first)
        return first, second

    def stroke(self, keysym: int) -> Stroke:
        """The key (and level) that types ``keysym``; the lowest key code wins, and an
        unshifted level beats a shifted one."""
        codes = range(self.min_keycode, self.min_keycode + len(self.keysyms) // self.per_keycode)
        for level in (0, 1):
            for code in codes:
                if keysym != 0 and self.levels(code)[level] == keysym:
                    return Stroke(code, level == 1)
        raise KeyError(f"keysym {keysym:#x} is on no key of the X server's keyboard mapping")

    def keycode(self, keysym: int) -> int:
        return self.stroke(keysym).keycode


def _upper(keysym: int) -> int:
    if 0x61 <= keysym <= 0x7A or (0xE0 <= keysym <= 0xFE and keysym != 0xF7):
        return keysym - 0x20
    return keysym


# -- the requests ------------------------------------------------------------------------------


def _root(conn: Any) -> int:
    return int(conn.get_setup().roots[0].root)


def _fake(conn: Any, kind: int, detail: int, x: int = 0, y: int = 0, root: int = 0) -> None:
    conn(xcffib.xtest.key).FakeInput(kind, detail, 0, root, x, y, 0)


def sync(conn: Any) -> None:
    """One round trip: every request sent before it has been processed."""
    conn.core.GetInputFocus().reply()


def key(conn: Any, keycode: int, press: bool) -> None:
    """Press (or release) the key with X key code ``keycode`` (evdev code + 8)."""
    _fake(conn, KEY_PRESS if press else KEY_RELEASE, keycode)
    sync(conn)


def type_text(conn: Any, text: str, mapping: KeyboardMapping | None = None) -> None:
    """Type ``text``: each character pressed and released (with Shift around it where
    its keysym is at level 2), one round trip after each character."""
    if mapping is None:
        mapping = KeyboardMapping.read(conn)
    strokes = [mapping.stroke(keysym_of(char)) for char in text]  # all found before typing
    shift = mapping.keycode(SHIFT_L) if any(s.shift for s in strokes) else 0
    for stroke in strokes:
        if stroke.shift:
            _fake(conn, KEY_PRESS, shift)
        _fake(conn, KEY_PRESS, stroke.keycode)
        _fake(conn, KEY_RELEASE, stroke.keycode)
        if stroke.shift:
            _fake(conn, KEY_RELEASE, shift)
        sync(conn)


def chord(conn: Any, *names: str, mapping: KeyboardMapping | None = None) -> None:
    """Press the keys named (``NAMED_KEYSYMS`` names or single characters, each typed at
    its level-1 key) in order, then release them in reverse: ``chord(conn, "Control_L",
    "Shift_L", "c")``."""
    if mapping is None:
        mapping = KeyboardMapping.read(conn)
    codes = [mapping.keycode(named_keysym(name)) for name in names]
    for code in codes:
        _fake(conn, KEY_PRESS, code)
    for code in reversed(codes):
        _fake(conn, KEY_RELEASE, code)
    sync(conn)


def move(conn: Any, x: int, y: int) -> None:
    """Move the pointer to root coordinates (``x``, ``y``)."""
    _fake(conn, MOTION_NOTIFY, 0, x, y, _root(conn))
    sync(conn)


def button(conn: Any, number: int, press: bool) -> None:
    """Press (or release) pointer button ``number`` where the pointer is."""
    _fake(conn, BUTTON_PRESS if press else BUTTON_RELEASE, number)
    sync(conn)


def click(conn: Any, x: int, y: int, button: int = 1) -> None:
    """Move to (``x``, ``y``), then press and release ``button`` there."""
    _fake(conn, MOTION_NOTIFY, 0, x, y, _root(conn))
    _fake(conn, BUTTON_PRESS, button)
    _fake(conn, BUTTON_RELEASE, button)
    sync(conn)


def scroll(conn: Any, x: int, y: int, steps: int, horizontal: bool = False) -> None:
    """Move to (``x``, ``y``) and turn the wheel ``abs(steps)`` clicks: negative up (or
    left), positive down (or right) — X buttons 4/5 (6/7 horizontal), pressed and
    released once per click."""
    number = (6 if steps < 0 else 7) if horizontal else (4 if steps < 0 else 5)
    _fake(conn, MOTION_NOTIFY, 0, x, y, _root(conn))
    for _ in range(abs(steps)):
        _fake(conn, BUTTON_PRESS, number)
        _fake(conn, BUTTON_RELEASE, number)
    sync(conn)


def release_all(conn: Any, keycodes: Iterable[int] = (), buttons: Iterable[int] = ()) -> None:
    """Release keys and buttons a test may have left down (harmless when they are up)."""
    for code in keycodes:
        _fake(conn, KEY_RELEASE, code)
    for number in buttons:
        _fake(conn, BUTTON_RELEASE, number)
    sync(conn)


def pointer(conn: Any) -> tuple[int, int]:
    """Where the pointer is, in root coordinates."""
    reply = conn.core.QueryPointer(_root(conn)).reply()
    return int(reply.root_x), int(reply.root_y)

