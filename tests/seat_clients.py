"""pywayland clients with a seat: what their wl_keyboard and wl_pointer receive.

``SeatClient`` is a ``PyClient`` that binds ``wl_seat`` (at the version asked) and
makes a keyboard and a pointer; every event they get is recorded in order as
``(name, args)`` in ``events``, with surfaces named by their proxy and fixed
numbers as floats. The keymap event's descriptor is checked (sealed, readable)
and its text kept; the descriptor itself is closed.
"""

from __future__ import annotations

import fcntl
import mmap
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from compositor_clients import PyClient
from pywayland.protocol.wayland import WlSeat

EXPECTED_SEALS = (fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE
                  | fcntl.F_SEAL_SEAL)


@dataclass
class KeymapReceived:
    format: int
    size: int
    seals: int
    text: bytes
    write_refused: bool


class SeatClient(PyClient):
    """A client with a ``wl_seat``, a ``wl_keyboard`` and a ``wl_pointer``."""

    def __init__(self, path: Path, *, seat_version: int = 8, keyboard: bool = True,
                 pointer: bool = True, timeout: float = 20.0) -> None:
        super().__init__(path, timeout=timeout)
        self.events: list[tuple[str, tuple[Any, ...]]] = []
        self.seat_caps: list[int] = []
        self.seat_names: list[str] = []
        self.keymaps: list[KeymapReceived] = []
        self.seat = self.bind(WlSeat, seat_version)
        self.seat.dispatcher["capabilities"] = lambda _, caps: self.seat_caps.append(caps)
        self.seat.dispatcher["name"] = lambda _, name: self.seat_names.append(name)
        self.roundtrip()
        self.keyboard: Any = None
        self.pointer: Any = None
        if keyboard:
            self.keyboard = self.make_keyboard()
        if pointer:
            self.pointer = self.make_pointer()
        self.roundtrip()

    def make_keyboard(self) -> Any:
        keyboard = self.seat.get_keyboard()
        for name in ("enter", "leave", "key", "modifiers", "repeat_info"):
            keyboard.dispatcher[name] = self._recorder("kb." + name)
        keyboard.dispatcher["keymap"] = self._on_keymap
        return keyboard

    def make_pointer(self) -> Any:
        pointer = self.seat.get_pointer()
        for name in ("enter", "leave", "motion", "button", "axis", "frame", "axis_source",
                     "axis_stop", "axis_discrete", "axis_value120"):
            pointer.dispatcher[name] = self._recorder("ptr." + name)
        return pointer

    def _recorder(self, name: str) -> Any:
        def record(_: Any, *args: Any) -> None:
            self.events.append((name, args))
        return record

    def _on_keymap(self, _: Any, fmt: int, fd: int, size: int) -> None:
        try:
            seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
            with mmap.mmap(fd, size, mmap.MAP_PRIVATE, mmap.PROT_READ) as memory:
                text = bytes(memory[:size])
            try:
                os.write(fd, b"x")
                refused = False
            except OSError:
                refused = True
            self.keymaps.append(KeymapReceived(fmt, size, seals, text, refused))
        finally:
            os.close(fd)
        self.events.append(("kb.keymap", (fmt, size)))

    # -- reading the record ----------------------------------------------------

    def take(self, prefix: str = "") -> list[tuple[str, tuple[Any, ...]]]:
        """The events recorded (those whose name starts with ``prefix``), forgotten."""
        out = [e for e in self.events if e[0].startswith(prefix)]
        self.events = [e for e in self.events if not e[0].startswith(prefix)]
        return out

    def names(self, prefix: str = "") -> list[str]:
        return [name for name, _ in self.events if name.startswith(prefix)]

    def wait_for(self, name: str, count: int = 1) -> list[tuple[Any, ...]]:
        self.wait(lambda: sum(1 for n, _ in self.events if n == name) >= count,
                  f"{count} {name} event(s)")
        return [args for n, args in self.events if n == name]

    def sync(self) -> None:
        self.roundtrip()


def keys_of(array: Any) -> list[int]:
    """The key codes of a ``wl_keyboard.enter`` keys array (pywayland gives bytes or a
    list)."""
    if isinstance(array, (bytes, bytearray, memoryview)):
        raw = bytes(array)
        return list(struct.unpack(f"={len(raw) // 4}I", raw))
    return [int(k) for k in array]
