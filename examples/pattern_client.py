#!/usr/bin/env python3
"""A Wayland client that shows a fixed, deterministic test pattern.

It is the reference client for the qubesshm tests and benchmarks: run it
directly against a compositor, or through the proxy, take a screenshot of
each, and compare them with each other and with :func:`pattern_pixels`.

The client binds ``wl_compositor``, ``wl_shm`` and ``xdg_wm_base``, maps one
``xdg_toplevel`` titled "qubesshm pattern", acks the first configure and then
commits frames of a pattern of its own fixed size (it ignores the size the
compositor suggests).  Pixels live in a ``wl_shm`` pool backed by a memfd that
holds two buffers, the second at a non-zero offset, used alternately.

The pattern is a 1-pixel black/white checker border around colour bars (top
half) and a gradient that varies in x and y (bottom half), so an off-by-one in
any copy (row, column, stride, offset) changes visible pixels.

By default every frame holds that same pattern, so what is shown never depends
on damage.  With ``--content changing`` each frame after the first changes
exactly its damage rectangle, and nothing else, from the frame before: that
rectangle becomes the pattern with its colours flipped by a key of the frame's
own (:func:`mark_key`).  The client draws each frame whole into the buffer it
attaches, so its two buffers hold different frames, and what a compositor
shows after frame N is :func:`changing_pixels` only if every frame's damage
reached the screen.

Usage::

    pattern_client.py [--width W] [--height H] [--format {xrgb8888,argb8888}]
                      [--frames N] [--seconds S] [--damage {full,partial}]
                      [--content {static,changing}] [--hold S] [--ready-file PATH]
                      [--ready-after {first,last}] [--timeout S] [--quiet]

Exit status 0 on success, 1 on a protocol error, a lost connection, a missing
global or a timeout (the reason goes to stderr), 2 on bad arguments.
"""

from __future__ import annotations

import argparse
import mmap
import os
import select
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from pywayland import lib
from pywayland.client.display import Display
from pywayland.protocol.wayland import WlCompositor, WlShm
from pywayland.protocol.xdg_shell import XdgWmBase

TITLE = "qubesshm pattern"
APP_ID = "qubesshm.pattern"
DEFAULT_WIDTH = 320
DEFAULT_HEIGHT = 240
BYTES_PER_PIXEL = 4

# Versions bound at most: wl_surface.damage_buffer needs wl_compositor 4.
COMPOSITOR_VERSION = 4
SHM_VERSION = 1
XDG_WM_BASE_VERSION = 2

FORMATS = {
    "xrgb8888": WlShm.format.xrgb8888.value,
    "argb8888": WlShm.format.argb8888.value,
}

# Colour bars as (B, G, R): white, yellow, cyan, green, magenta, red, blue, black.
_BARS: tuple[tuple[int, int, int], ...] = (
    (0xFF, 0xFF, 0xFF),
    (0x00, 0xFF, 0xFF),
    (0xFF, 0xFF, 0x00),
    (0x00, 0xFF, 0x00),
    (0xFF, 0x00, 0xFF),
    (0x00, 0x00, 0xFF),
    (0xFF, 0x00, 0x00),
    (0x00, 0x00, 0x00),
)
_WHITE = b"\xff\xff\xff\xff"
_BLACK = b"\x00\x00\x00\xff"


class ClientError(RuntimeError):
    """The compositor went away, refused us, or did not answer in time."""


def _checker(x: int, y: int) -> bytes:
    return _WHITE if (x + y) % 2 == 0 else _BLACK


def pattern_pixels(width: int, height: int) -> bytes:
    """The exact ARGB8888 little-endian bytes (B, G, R, A per pixel) the client draws.

    Alpha is always 0xff, so the same bytes are right for XRGB8888.  The rows
    are packed (stride = 4 * width).
    """
    if width < 2 or height < 2:
        raise ValueError(f"pattern needs at least 2x2 pixels, got {width}x{height}")
    stride = width * BYTES_PER_PIXEL
    xs = range(width)

    bar_row = b"".join(bytes((*_BARS[x * len(_BARS) // width], 0xFF)) for x in xs)
    grad_b = bytes(x & 0xFF for x in xs)
    grad_r = bytes(x * 255 // (width - 1) for x in xs)
    alpha = b"\xff" * width

    out = bytearray(stride * height)
    for y in range(height):
        if y == 0 or y == height - 1:
            row: bytes | bytearray = b"".join(_checker(x, y) for x in xs)
        elif y < height // 2:
            row = bytearray(bar_row)
        else:
            row = bytearray(stride)
            row[0::4] = grad_b.translate(bytes((v ^ y) & 0xFF for v in range(256)))
            row[1::4] = bytes((y * 255 // (height - 1),)) * width
            row[2::4] = grad_r
            row[3::4] = alpha
        if isinstance(row, bytearray):
            row[0:4] = _checker(0, y)
            row[stride - 4 : stride] = _checker(width - 1, y)
        out[y * stride : (y + 1) * stride] = row
    return bytes(out)


Rect = tuple[int, int, int, int]


def partial_damage_rect(width: int, height: int, frame: int) -> Rect:
    """A quarter-size rectangle that walks around the buffer, frame by frame."""
    w, h = max(1, width // 4), max(1, height // 4)
    x = (frame * 37) % (width - w + 1)
    y = (frame * 23) % (height - h + 1)
    return x, y, w, h


def frame_damage(width: int, height: int, frame: int, damage: str) -> Rect:
    """What frame ``frame`` damages: all of the buffer for frame 0 or ``full``
    damage, else :func:`partial_damage_rect`."""
    if frame == 0 or damage == "full":
        return 0, 0, width, height
    return partial_damage_rect(width, height, frame)


def mark_key(frame: int) -> bytes:
    """The (B, G, R, A) bytes frame ``frame`` flips its rectangle with: distinct for
    frames below 65536, never zero in red, so a marked pixel differs from the
    pattern and from every other frame's mark; alpha stays."""
    return bytes((frame & 0xFF, ((frame >> 8) & 0xFF) ^ 0x5A, 0xA5, 0x00))


def mark(image: bytearray, pattern: bytes, width: int, rect: Rect, frame: int) -> None:
    """Make ``rect`` of ``image`` the ``pattern`` flipped by frame ``frame``'s key."""
    x, y, w, h = rect
    stride = width * BYTES_PER_PIXEL
    key = int.from_bytes(mark_key(frame) * w, "little")
    for row in range(y, y + h):
        start = row * stride + x * BYTES_PER_PIXEL
        end = start + w * BYTES_PER_PIXEL
        flipped = int.from_bytes(pattern[start:end], "little") ^ key
        image[start:end] = flipped.to_bytes(end - start, "little")


def changing_pixels(width: int, height: int, frames: int, damage: str = "partial") -> bytes:
    """What the client shows after ``frames`` frames with ``--content changing``
    (the same ARGB8888 layout as :func:`pattern_pixels`)."""
    pattern = pattern_pixels(width, height)
    image = bytearray(pattern)
    for frame in range(1, frames):
        mark(image, pattern, width, frame_damage(width, height, frame, damage), frame)
    return bytes(image)


def _bind_version(offered: int, wanted: int, minimum: int, name: str) -> int:
    if offered < minimum:
        raise ClientError(f"{name} version {offered} is too old, need {minimum}")
    return min(offered, wanted)


class PatternClient:
    """One connection, one toplevel, two shm buffers that start with the pattern."""

    def __init__(
        self,
        width: int,
        height: int,
        shm_format: int,
        timeout: float,
        display_name: str | None = None,
    ) -> None:
        self.width = width
        self.height = height
        self.shm_format = shm_format
        self.timeout = timeout
        self.display_name = display_name or os.environ.get("WAYLAND_DISPLAY", "wayland-0")
        self.display = Display(display_name)
        self.connected = False
        self.compositor: Any = None
        self.shm: Any = None
        self.wm_base: Any = None
        self.shm_formats: set[int] = set()
        self.configure_serial: int | None = None
        self.configured = False
        self.closed = False
        self.frames_presented = 0
        self.errors: list[str] = []
        self.buffers: list[Any] = []
        self.busy: list[bool] = []
        self.next_buffer = 0
        self.surface: Any = None
        self.xdg_surface: Any = None
        self.toplevel: Any = None
        self._pool: Any = None
        self._memfd = -1
        self._map: mmap.mmap | None = None

    # -- event loop -------------------------------------------------------

    def _check(self) -> None:
        # pywayland prints and swallows exceptions raised in handlers; they
        # record what went wrong in self.errors instead.
        if self.errors:
            raise ClientError("; ".join(self.errors))

    def roundtrip(self) -> None:
        if self.display.roundtrip() < 0:
            raise ClientError(self._connection_error("roundtrip failed"))
        self._check()

    def _display_error(self) -> int:
        """The errno of the fatal error the connection is in, 0 while it is healthy."""
        if not self.connected:
            return 0
        ptr = self.display._ptr
        assert ptr is not None
        return int(lib.wl_display_get_error(ptr))

    def _connection_error(self, what: str) -> str:
        err = self._display_error()
        return f"{what}: {os.strerror(err) if err else 'connection lost'} (errno {err})"

    def dispatch_once(self, timeout: float) -> None:
        """Dispatch what is queued, then wait at most ``timeout`` s for more events."""
        try:
            self.display.dispatch(block=False)
            # flush fails harmlessly with EAGAIN when the socket is full; any
            # other failure puts the display into a fatal error state.
            if self.display.flush() < 0 and self._display_error():
                raise ClientError(self._connection_error("flush failed"))
            readable, _, _ = select.select([self.display.get_fd()], [], [], max(timeout, 0.0))
            if readable:
                self.display.read()
                self.display.dispatch(block=False)
        except RuntimeError as exc:
            if isinstance(exc, ClientError):
                raise
            raise ClientError(self._connection_error(str(exc))) from exc
        self._check()

    def wait_until(self, condition: Callable[[], bool], what: str) -> None:
        deadline = time.monotonic() + self.timeout
        while not condition():
            if self.closed:
                return
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise ClientError(f"timed out after {self.timeout} s waiting for {what}")
            self.dispatch_once(remaining)

    def idle(self, seconds: float) -> None:
        """Keep dispatching events (answering pings) for ``seconds``."""
        deadline = time.monotonic() + seconds
        while not self.closed:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            self.dispatch_once(remaining)

    # -- set-up -----------------------------------------------------------

    def connect(self) -> None:
        try:
            self.display.connect()
        except ValueError as exc:
            # pywayland leaves a NULL pointer behind: never touch the display again.
            raise ClientError(f"cannot connect to Wayland display {self.display_name!r}") from exc
        self.connected = True
        registry = self.display.get_registry()
        registry.dispatcher["global"] = self._on_global
        self.roundtrip()
        missing = [
            iface.name
            for iface, proxy in (
                (WlCompositor, self.compositor),
                (WlShm, self.shm),
                (XdgWmBase, self.wm_base),
            )
            if proxy is None
        ]
        if missing:
            raise ClientError(f"compositor does not offer {', '.join(missing)}")
        self.roundtrip()  # collect wl_shm.format events
        if self.shm_format not in self.shm_formats:
            raise ClientError(f"wl_shm format {self.shm_format:#x} not supported")

    def _on_global(self, registry: Any, name: int, interface: str, version: int) -> None:
        try:
            if interface == WlCompositor.name and self.compositor is None:
                v = _bind_version(version, COMPOSITOR_VERSION, 4, interface)
                self.compositor = registry.bind(name, WlCompositor, v)
            elif interface == WlShm.name and self.shm is None:
                self.shm = registry.bind(
                    name, WlShm, _bind_version(version, SHM_VERSION, 1, interface)
                )
                self.shm.dispatcher["format"] = self._on_shm_format
            elif interface == XdgWmBase.name and self.wm_base is None:
                v = _bind_version(version, XDG_WM_BASE_VERSION, 1, interface)
                self.wm_base = registry.bind(name, XdgWmBase, v)
                self.wm_base.dispatcher["ping"] = self._on_ping
        except ClientError as exc:
            self.errors.append(str(exc))

    def _on_shm_format(self, shm: Any, fmt: int) -> None:
        self.shm_formats.add(fmt)

    def _on_ping(self, wm_base: Any, serial: int) -> None:
        wm_base.pong(serial)

    def create_buffers(self, count: int = 2) -> None:
        stride = self.width * BYTES_PER_PIXEL
        size = stride * self.height
        pixels = pattern_pixels(self.width, self.height)
        self._memfd = os.memfd_create("qubesshm-pattern", os.MFD_CLOEXEC)
        os.ftruncate(self._memfd, size * count)
        self._map = mmap.mmap(self._memfd, size * count)
        self._pool = self.shm.create_pool(self._memfd, size * count)
        for index in range(count):
            self._map[index * size : (index + 1) * size] = pixels
            buffer = self._pool.create_buffer(
                index * size, self.width, self.height, stride, self.shm_format
            )
            buffer.user_data = index
            buffer.dispatcher["release"] = self._on_release
            self.buffers.append(buffer)
            self.busy.append(False)

    def _on_release(self, buffer: Any) -> None:
        self.busy[buffer.user_data] = False

    def map_window(self) -> None:
        self.surface = self.compositor.create_surface()
        self.xdg_surface = self.wm_base.get_xdg_surface(self.surface)
        self.xdg_surface.dispatcher["configure"] = self._on_configure
        self.toplevel = self.xdg_surface.get_toplevel()
        self.toplevel.dispatcher["close"] = self._on_close
        self.toplevel.set_title(TITLE)
        self.toplevel.set_app_id(APP_ID)
        self.surface.commit()  # initial commit without a buffer asks for a configure
        self.wait_until(lambda: self.configured, "the first xdg_surface.configure")

    def _on_configure(self, xdg_surface: Any, serial: int) -> None:
        self.configure_serial = serial
        self.configured = True

    def _on_close(self, toplevel: Any) -> None:
        self.closed = True

    # -- drawing ----------------------------------------------------------

    def commit_frame(self, damage: tuple[int, int, int, int] | None,
                     pixels: bytes | None = None) -> None:
        """Attach a free buffer, damage it (all of it when ``damage`` is None),
        commit, and wait for the compositor's frame callback.  With ``pixels``
        (packed rows of the window's size) the buffer is drawn with them first."""
        self.wait_until(lambda: not all(self.busy), "a wl_buffer.release")
        index = self.next_buffer
        while self.busy[index]:
            index = (index + 1) % len(self.buffers)
        self.next_buffer = (index + 1) % len(self.buffers)
        if pixels is not None:
            size = self.width * BYTES_PER_PIXEL * self.height
            if len(pixels) != size or self._map is None:
                raise ValueError(f"a frame of {len(pixels)} bytes for {size}-byte buffers")
            self._map[index * size : (index + 1) * size] = pixels

        if self.configure_serial is not None:
            self.xdg_surface.ack_configure(self.configure_serial)
            self.configure_serial = None
        self.surface.attach(self.buffers[index], 0, 0)
        self.busy[index] = True
        x, y, w, h = damage if damage is not None else (0, 0, self.width, self.height)
        self.surface.damage_buffer(x, y, w, h)
        self.present(self.surface, f"the frame callback of frame {self.frames_presented + 1}")
        if not self.closed:
            self.frames_presented += 1

    def present(self, surface: Any, what: str = "a frame callback") -> None:
        """Commit ``surface`` with a frame callback and wait until it was shown."""
        done = [False]

        def on_done(callback: Any, time_ms: int) -> None:
            done[0] = True

        callback = surface.frame()
        callback.dispatcher["done"] = on_done
        surface.commit()
        self.wait_until(lambda: done[0], what)

    def partial_damage(self, frame: int) -> tuple[int, int, int, int]:
        """A quarter-size rectangle that walks around the buffer, frame by frame."""
        return partial_damage_rect(self.width, self.height, frame)

    def close(self) -> None:
        for proxy in (self.toplevel, self.xdg_surface, self.surface):
            if proxy is not None and not proxy.destroyed:
                proxy.destroy()
        for buffer in self.buffers:
            if not buffer.destroyed:
                buffer.destroy()
        if self._pool is not None and not self._pool.destroyed:
            self._pool.destroy()
        if self.connected:
            # No roundtrip: a hung compositor must not hang the exit.  Weston
            # frees whatever the flushed destroys did not on disconnect anyway.
            self.display.flush()
            self.display.disconnect()
            self.connected = False
        if self._map is not None:
            self._map.close()
        if self._memfd >= 0:
            os.close(self._memfd)


def write_ready_file(path: Path) -> None:
    """Write "ready" to ``path`` atomically, so a poller never sees it half-written."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text("ready\n")
    tmp.replace(path)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--width", type=int, default=DEFAULT_WIDTH)
    parser.add_argument("--height", type=int, default=DEFAULT_HEIGHT)
    parser.add_argument("--format", choices=sorted(FORMATS), default="xrgb8888")
    parser.add_argument(
        "--frames", type=int, default=1, help="commit at least N frames (default 1)"
    )
    parser.add_argument(
        "--seconds", type=float, default=0.0, help="keep committing frames for at least S seconds"
    )
    parser.add_argument(
        "--damage",
        choices=("full", "partial"),
        default="full",
        help="damage of frames after the first: the whole buffer, or a moving quarter",
    )
    parser.add_argument(
        "--content",
        choices=("static", "changing"),
        default="static",
        help="static: every frame is the pattern; changing: each frame after the first "
        "changes its damage rectangle (and only that) with a mark of its own",
    )
    parser.add_argument(
        "--hold", type=float, default=0.0, help="stay mapped S seconds after the last frame"
    )
    parser.add_argument(
        "--ready-file",
        type=Path,
        help='write "ready" here once the first (or with --ready-after last, the last) '
        "frame has been presented",
    )
    parser.add_argument(
        "--ready-after",
        choices=("first", "last"),
        default="first",
        help="which presented frame --ready-file waits for (default: the first)",
    )
    parser.add_argument(
        "--timeout", type=float, default=10.0, help="give up waiting for any one event after S s"
    )
    parser.add_argument("--quiet", action="store_true", help="no summary line on stdout")
    args = parser.parse_args(argv)
    if args.width < 2 or args.height < 2:
        parser.error("--width and --height must be at least 2")
    if args.frames < 1:
        parser.error("--frames must be at least 1")
    return args


def run(args: argparse.Namespace) -> int:
    client = PatternClient(args.width, args.height, FORMATS[args.format], args.timeout)
    changing = args.content == "changing"
    pattern = pattern_pixels(args.width, args.height) if changing else b""
    image = bytearray(pattern)
    try:
        client.connect()
        client.create_buffers()
        client.map_window()
        started = time.monotonic()
        frame = 0
        while not client.closed:
            elapsed = time.monotonic() - started
            if frame >= args.frames and elapsed >= args.seconds:
                break
            damage = None if frame == 0 or args.damage == "full" else client.partial_damage(frame)
            pixels = None
            if changing:
                if frame:
                    rect = frame_damage(args.width, args.height, frame, args.damage)
                    mark(image, pattern, args.width, rect, frame)
                pixels = bytes(image)
            client.commit_frame(damage, pixels)
            frame += 1
            if (frame == 1 and args.ready_after == "first" and args.ready_file is not None
                    and not client.closed):
                write_ready_file(args.ready_file)
        if args.ready_after == "last" and args.ready_file is not None and not client.closed:
            write_ready_file(args.ready_file)
        elapsed = time.monotonic() - started
        if not args.quiet:
            rate = client.frames_presented / elapsed if elapsed > 0 else 0.0
            print(
                f"pattern_client: {client.frames_presented} frames of "
                f"{args.width}x{args.height} in {elapsed:.3f} s ({rate:.1f} fps)",
                flush=True,
            )
        client.idle(args.hold)
    except ClientError as exc:
        print(f"pattern_client: {exc}", file=sys.stderr)
        return 1
    finally:
        client.close()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run(parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
