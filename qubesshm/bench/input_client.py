"""A Wayland client that reports every input event it receives, as it receives it.

It maps one xdg_toplevel (``--size``, a solid colour in a wl_shm buffer; redrawn
at the size of each configure that names one), optionally with a subsurface
(``--subsurface X,Y,W,H``, another colour) and a popup (``--popup X,Y,W,H``,
anchored at X,Y of the toplevel, a third colour), binds ``wl_seat`` (pointer and
keyboard) and writes one JSON object a line to stdout, flushed, for each event:
``"ev"`` (``key``, ``modifiers``, ``keymap``, ``kb_enter``, ``kb_leave``,
``repeat_info``, ``enter``, ``leave``, ``motion``, ``button``, ``axis``,
``axis_source``, ``axis_discrete``, ``axis_value120``, ``axis_stop``, ``frame``,
``configure``, ``drawn``, ``popup_configure``, ``popup_done``, ``close``,
``ready``) and ``"t"``, the CLOCK_MONOTONIC nanoseconds at which its handler ran
(the same clock ``time.monotonic_ns`` reads in any process on the machine), then
the event's own fields: a key's evdev ``key`` and ``state`` (1 pressed, 0
released) and the text it types (``utf8``, from the compositor's keymap and
modifiers through xkbcommon); a pointer event's ``surface`` (``main``, ``sub``,
``popup``) and surface-local ``x``, ``y`` (a button or axis event carries the
latest ones), ``button`` (a ``BTN_*`` code), ``axis`` (0 vertical, 1 horizontal)
and ``value``.

Commands on stdin, one a line: ``popup X Y W H [grab]`` opens a popup (``grab``:
with an xdg_popup grab on the serial of the latest button or key press),
``unpopup`` destroys it, ``quit`` ends the client. ``xdg_toplevel.close`` ends
it too (status 0, after a ``close`` line). Run as
``python3 -m qubesshm.bench.input_client``; ``qubesshm bench input`` uses it
for the latency of key presses, the tests for where pointer events land.
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import select
import struct
import sys
import time
from collections.abc import Sequence
from typing import Any

from pywayland.client.display import Display
from pywayland.protocol.wayland import WlCompositor, WlSeat, WlShm, WlSubcompositor
from pywayland.protocol.xdg_shell import XdgPositioner, XdgWmBase

XRGB8888 = 1
MAIN_COLOUR = 0x3060A0
SUB_COLOUR = 0x20A040
POPUP_COLOUR = 0xC04020
SEAT_VERSION = 8  # axis_value120
XKB_V1 = 1
Rect = tuple[int, int, int, int]



def xdg_states(states: Any) -> list[int]:
    """``xdg_toplevel.configure``'s states: an array of native-endian u32 values."""
    data = bytes(states) if states is not None else b""
    return [value for (value,) in struct.iter_unpack("=I", data[: len(data) // 4 * 4])]

class InputClientError(RuntimeError):
    pass


def emit(ev: str, t: int | None = None, **fields: Any) -> None:
    """One event line: its kind, when its handler ran, its fields."""
    line = {"ev": ev, "t": time.monotonic_ns() if t is None else t, **fields}
    sys.stdout.write(json.dumps(line, separators=(",", ":")) + "\n")
    sys.stdout.flush()


class Keymap:
    """The compositor's keymap and modifier state, to say what text a key types."""

    def __init__(self, text: str) -> None:
        from xkbcommon import xkb  # an optional nicety: without it no "utf8" field
        self.keymap = xkb.Context().keymap_new_from_string(text)
        self.state = self.keymap.state_new()

    def modifiers(self, depressed: int, latched: int, locked: int, group: int) -> None:
        self.state.update_mask(depressed, latched, locked, 0, 0, group)

    def text(self, key: int) -> str:
        return str(self.state.key_get_string(key + 8))


class Part:
    """A surface of the client's, its colour and size, and its buffer."""

    def __init__(self, name: str, surface: Any, colour: int, width: int, height: int) -> None:
        self.name = name
        self.surface = surface
        self.colour = colour
        self.width = width
        self.height = height
        self.buffer: Any = None
        self.memory: mmap.mmap | None = None


class InputClient:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.display = Display()
        self.globals: dict[str, tuple[int, int]] = {}
        self.parts: dict[Any, Part] = {}  # by wl_surface
        self.pointer_at: tuple[str | None, float, float] = (None, 0.0, 0.0)
        self.press_serial = 0
        self.keymap: Keymap | None = None
        self.configured: tuple[int, int] | None = None
        self.pending_size: tuple[int, int] = (0, 0)
        self.closed = False
        self.popup: Any = None
        self.popup_xdg: Any = None
        self.popup_part: Part | None = None

    # -- set-up ----------------------------------------------------------------------

    def connect(self) -> None:
        try:
            self.display.connect()
        except ValueError as exc:
            raise InputClientError("cannot connect to the Wayland display") from exc
        self.registry = self.display.get_registry()
        self.registry.dispatcher["global"] = (
            lambda _, name, interface, version: self.globals.__setitem__(interface,
                                                                         (name, version)))
        self.display.roundtrip()
        for kind in (WlCompositor, WlShm, XdgWmBase, WlSeat):
            if kind.name not in self.globals:
                raise InputClientError(f"the compositor offers no {kind.name}")
        self.compositor = self.bind(WlCompositor, 4)
        self.shm = self.bind(WlShm, 1)
        self.wm_base = self.bind(XdgWmBase, 2)
        self.wm_base.dispatcher["ping"] = lambda base, serial: base.pong(serial)
        self.seat = self.bind(WlSeat, SEAT_VERSION)
        self.seat.dispatcher["capabilities"] = self._on_capabilities
        self.pointer: Any = None
        self.keyboard: Any = None

    def bind(self, kind: Any, version: int) -> Any:
        name, offered = self.globals[kind.name]
        return self.registry.bind(name, kind, min(version, offered))

    def _on_capabilities(self, seat: Any, caps: int) -> None:
        emit("capabilities", caps=caps)
        if caps & WlSeat.capability.pointer and self.pointer is None:
            self.pointer = seat.get_pointer()
            for name in ("enter", "leave", "motion", "button", "axis", "frame",
                         "axis_source", "axis_stop", "axis_discrete", "axis_value120"):
                self.pointer.dispatcher[name] = getattr(self, f"_on_{name}")
        if caps & WlSeat.capability.keyboard and self.keyboard is None:
            self.keyboard = seat.get_keyboard()
            self.keyboard.dispatcher["keymap"] = self._on_keymap
            self.keyboard.dispatcher["enter"] = self._on_kb_enter
            self.keyboard.dispatcher["leave"] = self._on_kb_leave
            self.keyboard.dispatcher["key"] = self._on_key
            self.keyboard.dispatcher["modifiers"] = self._on_modifiers
            self.keyboard.dispatcher["repeat_info"] = self._on_repeat_info

    def fill(self, part: Part, width: int, height: int) -> None:
        """A new buffer of ``width`` x ``height`` in ``part``'s colour, attached."""
        size = width * height * 4
        fd = os.memfd_create("qubesshm-input", os.MFD_CLOEXEC)
        try:
            os.ftruncate(fd, size)
            memory = mmap.mmap(fd, size)
            pool = self.shm.create_pool(fd, size)
        finally:
            os.close(fd)
        memory.write(part.colour.to_bytes(4, "little") * (width * height))
        buffer = pool.create_buffer(0, width, height, width * 4, XRGB8888)
        pool.destroy()
        buffer.dispatcher["release"] = lambda proxy: proxy.destroy()
        if part.memory is not None:
            part.memory.close()
        part.buffer, part.memory = buffer, memory
        part.width, part.height = width, height
        part.surface.attach(buffer, 0, 0)
        part.surface.damage_buffer(0, 0, width, height)

    def setup(self) -> None:
        width, height = self.args.size
        surface = self.compositor.create_surface()
        self.main = Part("main", surface, MAIN_COLOUR, width, height)
        self.parts[surface] = self.main
        self.xdg_surface = self.wm_base.get_xdg_surface(surface)
        self.xdg_surface.dispatcher["configure"] = self._on_xdg_configure
        self.toplevel = self.xdg_surface.get_toplevel()
        self.toplevel.set_title(self.args.title)
        self.toplevel.set_app_id("qubesshm-input-client")
        self.toplevel.dispatcher["configure"] = self._on_toplevel_configure
        self.toplevel.dispatcher["close"] = self._on_close
        if self.args.subsurface is not None:
            x, y, w, h = self.args.subsurface
            if "wl_subcompositor" not in self.globals:
                raise InputClientError("the compositor offers no wl_subcompositor")
            subcompositor = self.bind(WlSubcompositor, 1)
            sub_surface = self.compositor.create_surface()
            sub = Part("sub", sub_surface, SUB_COLOUR, w, h)
            self.parts[sub_surface] = sub
            self.subsurface = subcompositor.get_subsurface(sub_surface, surface)
            self.subsurface.set_position(x, y)
            self.subsurface.set_desync()
            self.fill(sub, w, h)
            sub_surface.commit()
        surface.commit()
        self.wait(lambda: self.configured is not None, "the first configure")
        if self.args.popup is not None:
            self.open_popup(*self.args.popup, grab=False)
        self.display.roundtrip()
        emit("ready", width=self.main.width, height=self.main.height)

    # -- the toplevel ----------------------------------------------------------------

    def _on_toplevel_configure(self, _: Any, width: int, height: int, states: Any) -> None:
        self.pending_size = (width, height)
        emit("configure", width=width, height=height,
             states=xdg_states(states))

    def _on_xdg_configure(self, xdg_surface: Any, serial: int) -> None:
        xdg_surface.ack_configure(serial)
        width, height = self.pending_size
        if width <= 0 or height <= 0:
            width, height = (self.main.width, self.main.height)
        if (width, height) != self.configured or self.main.buffer is None:
            self.fill(self.main, width, height)
            self.main.surface.commit()
            emit("drawn", surface="main", width=width, height=height)
        else:
            self.main.surface.commit()
        self.configured = (width, height)

    def _on_close(self, _: Any) -> None:
        emit("close")
        self.closed = True

    # -- the popup -------------------------------------------------------------------

    def open_popup(self, x: int, y: int, width: int, height: int, *, grab: bool) -> None:
        self.close_popup()
        positioner = self.wm_base.create_positioner()
        positioner.set_size(width, height)
        positioner.set_anchor_rect(x, y, 1, 1)
        positioner.set_anchor(XdgPositioner.anchor.top_left)
        positioner.set_gravity(XdgPositioner.gravity.bottom_right)
        surface = self.compositor.create_surface()
        part = Part("popup", surface, POPUP_COLOUR, width, height)
        self.parts[surface] = part
        xdg = self.wm_base.get_xdg_surface(surface)
        popup = xdg.get_popup(self.xdg_surface, positioner)
        positioner.destroy()
        popup.dispatcher["configure"] = (
            lambda _, px, py, w, h: emit("popup_configure", x=px, y=py, width=w, height=h))
        popup.dispatcher["popup_done"] = self._on_popup_done
        first = [True]

        def on_configure(xdg_surface: Any, serial: int) -> None:
            xdg_surface.ack_configure(serial)
            if first[0]:
                first[0] = False
                self.fill(part, width, height)
                emit("drawn", surface="popup", width=width, height=height)
            surface.commit()

        xdg.dispatcher["configure"] = on_configure
        if grab:
            popup.grab(self.seat, self.press_serial)
        surface.commit()
        self.popup, self.popup_xdg, self.popup_part = popup, xdg, part

    def close_popup(self) -> None:
        if self.popup is None or self.popup_part is None:
            return
        self.popup.destroy()
        self.popup_xdg.destroy()
        self.popup_part.surface.destroy()
        del self.parts[self.popup_part.surface]
        self.popup = self.popup_xdg = self.popup_part = None

    def _on_popup_done(self, _: Any) -> None:
        emit("popup_done")
        self.close_popup()

    # -- the pointer -----------------------------------------------------------------

    def _name(self, surface: Any) -> str | None:
        part = self.parts.get(surface)
        return part.name if part is not None else None

    def _on_enter(self, _: Any, serial: int, surface: Any, x: float, y: float) -> None:
        t = time.monotonic_ns()
        self.pointer_at = (self._name(surface), x, y)
        emit("enter", t, surface=self.pointer_at[0], x=x, y=y, serial=serial)

    def _on_leave(self, _: Any, serial: int, surface: Any) -> None:
        t = time.monotonic_ns()
        emit("leave", t, surface=self._name(surface), serial=serial)
        self.pointer_at = (None, 0.0, 0.0)

    def _on_motion(self, _: Any, time_ms: int, x: float, y: float) -> None:
        t = time.monotonic_ns()
        self.pointer_at = (self.pointer_at[0], x, y)
        emit("motion", t, surface=self.pointer_at[0], x=x, y=y, time=time_ms)

    def _on_button(self, _: Any, serial: int, time_ms: int, button: int, state: int) -> None:
        t = time.monotonic_ns()
        if state:
            self.press_serial = serial
        name, x, y = self.pointer_at
        emit("button", t, surface=name, x=x, y=y, button=button, state=state, serial=serial,
             time=time_ms)

    def _on_axis(self, _: Any, time_ms: int, axis: int, value: float) -> None:
        t = time.monotonic_ns()
        name, x, y = self.pointer_at
        emit("axis", t, surface=name, x=x, y=y, axis=axis, value=value, time=time_ms)

    def _on_frame(self, _: Any) -> None:
        emit("frame")

    def _on_axis_source(self, _: Any, source: int) -> None:
        emit("axis_source", source=source)

    def _on_axis_stop(self, _: Any, time_ms: int, axis: int) -> None:
        emit("axis_stop", axis=axis, time=time_ms)

    def _on_axis_discrete(self, _: Any, axis: int, discrete: int) -> None:
        emit("axis_discrete", axis=axis, value=discrete)

    def _on_axis_value120(self, _: Any, axis: int, value120: int) -> None:
        emit("axis_value120", axis=axis, value=value120)

    # -- the keyboard ----------------------------------------------------------------

    def _on_keymap(self, _: Any, fmt: int, fd: int, size: int) -> None:
        try:
            if fmt == XKB_V1 and size > 0:
                with mmap.mmap(fd, size, prot=mmap.PROT_READ, flags=mmap.MAP_PRIVATE) as data:
                    text = bytes(data[:size]).rstrip(b"\0").decode()
                try:
                    self.keymap = Keymap(text)
                except Exception as exc:  # said on the line, not fatal
                    emit("keymap", format=fmt, size=size, error=str(exc))
                    return
        finally:
            os.close(fd)
        emit("keymap", format=fmt, size=size)

    def _on_kb_enter(self, _: Any, serial: int, surface: Any, keys: Any) -> None:
        pressed = list(memoryview(bytes(keys)).cast("I")) if keys else []
        emit("kb_enter", surface=self._name(surface), keys=pressed, serial=serial)

    def _on_kb_leave(self, _: Any, serial: int, surface: Any) -> None:
        emit("kb_leave", surface=self._name(surface), serial=serial)

    def _on_key(self, _: Any, serial: int, time_ms: int, key: int, state: int) -> None:
        t = time.monotonic_ns()
        if state:
            self.press_serial = serial
        fields: dict[str, Any] = {}
        if self.keymap is not None:
            fields["utf8"] = self.keymap.text(key)
        emit("key", t, key=key, state=state, serial=serial, time=time_ms, **fields)

    def _on_modifiers(self, _: Any, serial: int, depressed: int, latched: int, locked: int,
                      group: int) -> None:
        if self.keymap is not None:
            self.keymap.modifiers(depressed, latched, locked, group)
        emit("modifiers", depressed=depressed, latched=latched, locked=locked, group=group)

    def _on_repeat_info(self, _: Any, rate: int, delay: int) -> None:
        emit("repeat_info", rate=rate, delay=delay)

    # -- the loop --------------------------------------------------------------------

    def dispatch(self, timeout: float | None, stdin: bool = False) -> list[str]:
        """Events until ``timeout`` s pass with nothing to read; stdin's lines if asked."""
        self.display.dispatch(block=False)
        self.display.flush()
        fds = [self.display.get_fd()] + ([sys.stdin.fileno()] if stdin else [])
        ready, _, _ = select.select(fds, [], [], timeout)
        lines: list[str] = []
        if self.display.get_fd() in ready:
            try:
                self.display.read()
            except RuntimeError as exc:
                raise InputClientError("the connection to the compositor broke") from exc
            if self.display.dispatch(block=False) < 0:
                raise InputClientError("the connection to the compositor broke")
        if stdin and sys.stdin.fileno() in ready:
            line = sys.stdin.readline()
            lines.append(line if line else "quit")
        self.display.flush()
        return lines

    def wait(self, condition: Any, what: str) -> None:
        deadline = time.monotonic() + self.args.timeout
        while not condition():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise InputClientError(f"timed out waiting for {what}")
            self.dispatch(remaining)

    def command(self, line: str) -> bool:
        """Carry out one stdin command; False to end."""
        words = line.split()
        if not words:
            return True
        if words[0] == "quit":
            return False
        if words[0] == "popup" and len(words) in (5, 6):
            x, y, w, h = (int(v) for v in words[1:5])
            self.open_popup(x, y, w, h, grab=words[5:] == ["grab"])
        elif words[0] == "unpopup":
            self.close_popup()
        else:
            emit("error", message=f"unknown command {line.strip()!r}")
        return True

    def run(self) -> None:
        while not self.closed:
            for line in self.dispatch(None, stdin=True):
                if not self.command(line):
                    return

    def finish(self) -> None:
        self.close_popup()
        self.toplevel.destroy()
        self.xdg_surface.destroy()
        self.display.roundtrip()
        self.display.disconnect()


def _rect(text: str) -> Rect:
    try:
        x, y, w, h = (int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected X,Y,W,H, got {text!r}") from None
    if w <= 0 or h <= 0:
        raise argparse.ArgumentTypeError(f"an empty rectangle: {text!r}")
    return x, y, w, h


def _size(text: str) -> tuple[int, int]:
    try:
        w, h = (int(v) for v in text.split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected WxH, got {text!r}") from None
    if w <= 0 or h <= 0:
        raise argparse.ArgumentTypeError(f"an empty size: {text!r}")
    return w, h


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=_size, default=(320, 240), metavar="WxH")
    parser.add_argument("--title", default="qubesshm input client")
    parser.add_argument("--subsurface", type=_rect, metavar="X,Y,W,H")
    parser.add_argument("--popup", type=_rect, metavar="X,Y,W,H")
    parser.add_argument("--timeout", type=float, default=20.0)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    client = InputClient(args)
    try:
        client.connect()
        client.setup()
        client.run()
        client.finish()
    except InputClientError as exc:
        print(f"input_client: {exc}", file=sys.stderr)
        sys.stderr.flush()
        # Straight out: libwayland's objects must not be freed after the display is.
        os._exit(1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
