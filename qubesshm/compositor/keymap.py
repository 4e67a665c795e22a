"""The keyboard's keymap and modifier state, compiled and tracked by xkbcommon.

``Keymap`` compiles RMLVO names (``from_names``, or Qubes' ``layout+variant+options``
string with ``parse``) into the text ``wl_keyboard.keymap`` sends, kept in a sealed
memfd that every client maps read-only (``fd`` opens it afresh for each). ``KeyState``
follows the keys held down and gives the serialized modifiers and group for
``wl_keyboard.modifiers``. Key codes here are evdev codes (X key code - 8).
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

from xkbcommon import xkb

from ..stream.fds import sealed_file

# An xkb key code is the evdev code + 8 (the X key code).
EVDEV_OFFSET = 8
DEFAULT_RULES = "evdev"
DEFAULT_MODEL = "pc105"


class KeymapError(ValueError):
    """A layout (or variant, or option) xkbcommon cannot compile."""


@dataclass(frozen=True, slots=True)
class KeymapNames:
    """The RMLVO names a keymap was compiled from."""

    layout: str = "us"
    variant: str = ""
    options: str = ""
    model: str = DEFAULT_MODEL
    rules: str = DEFAULT_RULES

    def __str__(self) -> str:
        spec = "+".join((self.layout, self.variant, self.options)).rstrip("+")
        return spec or self.layout


def _describe(names: KeymapNames) -> str:
    parts = [f"layout {names.layout!r}"]
    if names.variant:
        parts.append(f"variant {names.variant!r}")
    if names.options:
        parts.append(f"options {names.options!r}")
    return ", ".join(parts)


class Keymap:
    """A compiled keymap, its text in a sealed memfd."""

    def __init__(self, names: KeymapNames, compiled: xkb.Keymap, text: bytes) -> None:
        self.names = names
        self.xkb_keymap = compiled
        # wl_keyboard.keymap's size counts the terminating NUL, as libwayland servers send it.
        self.text = text
        self.size = len(text) + 1
        self._fd = sealed_file(text + b"\0", "qubesshm-keymap")

    @classmethod
    def from_names(cls, layout: str = "us", variant: str = "", options: str = "",
                   model: str = DEFAULT_MODEL, rules: str = DEFAULT_RULES) -> Keymap:
        """Compile RMLVO names; a ``KeymapError`` names what xkbcommon could not use."""
        names = KeymapNames(layout.strip(), variant.strip(), options.strip(), model.strip(),
                            rules.strip())
        if not names.layout:
            raise KeymapError("no keyboard layout given")
        for what, value in (("layout", names.layout), ("variant", names.variant),
                            ("options", names.options), ("model", names.model),
                            ("rules", names.rules)):
            if any(c.isspace() or not c.isprintable() for c in value):
                raise KeymapError(f"keyboard {what} {value!r} has a space or a control "
                                  "character")
        messages: list[str] = []
        context = xkb.Context(no_environment_names=True)

        def log(_context: object, _level: object, message: str) -> None:
            messages.append(message.strip())

        context.set_log_fn(log)
        try:
            compiled = context.keymap_new_from_names(
                rules=names.rules, model=names.model, layout=names.layout,
                variant=names.variant or None, options=names.options or None)
        except xkb.XKBKeymapCreationFailure:
            detail = next((m for m in messages if "include" in m or "find" in m),
                          messages[0] if messages else "")
            raise KeymapError(f"keyboard {_describe(names)} does not compile"
                              + (f": {detail}" if detail else "")) from None
        ignored = [m for m in messages if "Unrecognized RMLVO option" in m]
        if ignored:
            raise KeymapError(f"keyboard {_describe(names)}: {ignored[0]}")
        text = compiled.get_as_bytes()
        assert isinstance(text, bytes)
        return cls(names, compiled, text.rstrip(b"\0"))

    @classmethod
    def parse(cls, spec: str) -> Keymap:
        """Qubes' keyboard layout string: ``layout[+variant[+options]]``, as the
        ``/keyboard-layout`` QubesDB entry and ``qubes.SetKeyboardLayout`` carry it (the
        agent's qubes-keymap script cuts fields 1, 2 and 3 at ``+``); empty means ``us``."""
        if spec.count("+") > 2:
            raise KeymapError(f"keyboard layout {spec!r} has more than three '+' fields "
                              "(layout+variant+options)")
        layout, variant, options = (spec.strip() + "++").split("+")[:3]
        return cls.from_names(layout or "us", variant, options)

    def fd(self) -> int:
        """A new read-only descriptor of the sealed keymap text, for one client (the
        caller owns it). Each has its own file offset, so no client moves another's."""
        try:
            return os.open(f"/proc/self/fd/{self._fd}", os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            return os.dup(self._fd)

    @classmethod
    def default(cls) -> Keymap:
        """The ``us`` keymap, compiled once per process."""
        global _default
        if _default is None:
            _default = cls.from_names()
        return _default

    def state(self) -> KeyState:
        return KeyState(self)

    def close(self) -> None:
        if self._fd >= 0:
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = -1

    def __del__(self) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<Keymap {self.names}>"


_default: Keymap | None = None


Modifiers = tuple[int, int, int, int]  # depressed, latched, locked, group


class KeyState:
    """The keys held and the modifier state they make, for one keymap."""

    def __init__(self, keymap: Keymap, held: tuple[int, ...] = ()) -> None:
        self.keymap = keymap
        self._state = keymap.xkb_keymap.state_new()
        self.held: list[int] = []
        for code in held:
            self.press(code)

    def press(self, code: int) -> bool:
        """Key ``code`` (evdev) went down; False if it was down already (a repeat)."""
        if code in self.held:
            return False
        self.held.append(code)
        self._state.update_key(code + EVDEV_OFFSET, xkb.KeyDirection.XKB_KEY_DOWN)
        return True

    def release(self, code: int) -> bool:
        """Key ``code`` went up; False if it was not down."""
        if code not in self.held:
            return False
        self.held.remove(code)
        self._state.update_key(code + EVDEV_OFFSET, xkb.KeyDirection.XKB_KEY_UP)
        return True

    def modifiers(self) -> Modifiers:
        state = self._state
        return (int(state.serialize_mods(xkb.StateComponent.XKB_STATE_MODS_DEPRESSED)),
                int(state.serialize_mods(xkb.StateComponent.XKB_STATE_MODS_LATCHED)),
                int(state.serialize_mods(xkb.StateComponent.XKB_STATE_MODS_LOCKED)),
                int(state.serialize_layout(xkb.StateComponent.XKB_STATE_LAYOUT_EFFECTIVE)))

    def text(self, code: int) -> str:
        """What key ``code`` types in the current state (for tests and logs)."""
        out = self._state.key_get_string(code + EVDEV_OFFSET)
        return out if isinstance(out, str) else ""
