#!/usr/bin/env python3
"""A Wayland client that shows the pattern client's test pattern in tricky ways.

Each scenario gets the pixels of ``pattern_client.pattern_pixels(W, H)`` onto
the screen by a different route through ``wl_shm`` and ``wl_surface`` state, so
that a correct compositor (or a correct proxy in front of one) shows exactly
that pattern as the window's W x H content, and a copy that gets the route
wrong shows something else:

``static``
    one buffer, one commit, full damage.
``transform-0`` .. ``transform-7``
    the buffer holds the pattern pre-transformed (H x W for odd values) and
    ``wl_surface.set_buffer_transform(N)`` turns it upright again.
``scale-2``
    a 2W x 2H buffer of 2x2 blocks with ``set_buffer_scale(2)``.
``viewport``
    a (W+40) x (H+30) buffer of noise with the pattern at (17, 11), cut out by
    ``wp_viewport.set_source`` and shown at W x H.
``resized-pool``
    a decoy in a pool sized for one buffer, then ``wl_shm_pool.resize`` to
    twice that and the pattern in a buffer past the pool's old end.
``sync-subsurface``
    the pattern with a hole, covered by a synchronized subsurface that commits
    a decoy and then the missing part before the parent commits; the client
    scribbles over every child buffer released by then, which it may.
``double-buffered``
    two buffers used alternately, ``--frames`` frames of the pattern with a
    small rectangle moving over it, each frame repainting only what changed in
    its buffer and damaging only what changed since the previous frame; the
    last frame shows :func:`double_buffered_pixels` (not the bare pattern).

The client binds ``wl_compositor`` (version 4 or later), ``wl_shm``,
``xdg_wm_base`` and, for the scenarios that need them, ``wp_viewporter`` and
``wl_subcompositor``; maps one ``xdg_toplevel``; never writes into a buffer the
compositor has not released; and once the compositor has presented the final
frame (the frame callback of the last commit is done) writes "ready" to
``--ready-file``, stays mapped ``--hold`` seconds (SIGTERM or SIGINT ends the
hold early) and exits.

Usage::

    scenario_client.py --scenario NAME [--width W] [--height H] [--frames N]
                       [--hold S] [--ready-file PATH] [--timeout S] [--quiet]

Exit status 0 on success, 1 on a protocol error, a lost connection, a missing
global or a timeout (the reason goes to stderr), 2 on bad arguments.
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import mmap
import os
import random
import signal
import sys
import time
from array import array
from collections.abc import Callable, Sequence
from pathlib import Path
from types import FrameType, ModuleType
from typing import TYPE_CHECKING, Any

from pywayland.protocol.viewporter import WpViewporter
from pywayland.protocol.wayland import WlShm, WlSubcompositor

HERE = Path(__file__).resolve().parent


def _load_sibling(name: str) -> ModuleType:
    """``examples/<name>.py`` as a module (examples/ is not a package)."""
    loaded = sys.modules.get(name)
    if loaded is not None and getattr(loaded, "__file__", None) == str(HERE / f"{name}.py"):
        return loaded
    spec = importlib.util.spec_from_file_location(name, HERE / f"{name}.py")
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load {HERE / f'{name}.py'}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


if TYPE_CHECKING:  # mypy finds the sibling file; at run time it is loaded by path
    import pattern_client as pc
else:
    pc = _load_sibling("pattern_client")

ClientError = pc.ClientError

BPP = pc.BYTES_PER_PIXEL
XRGB8888: int = WlShm.format.xrgb8888.value
VIEWPORTER_VERSION = 1
SUBCOMPOSITOR_VERSION = 1

TRANSFORM_SCENARIOS = tuple(f"transform-{n}" for n in range(8))
SCENARIOS: tuple[str, ...] = (
    "static",
    *TRANSFORM_SCENARIOS,
    "scale-2",
    "viewport",
    "resized-pool",
    "sync-subsurface",
    "double-buffered",
)
DEFAULT_FRAMES = 12

# viewport: where the pattern sits in the larger, noisy buffer
VIEWPORT_PAD = (40, 30)
VIEWPORT_OFFSET = (17, 11)

# double-buffered: the moving rectangle, a colour the pattern does not contain
RECT_SIZE = (24, 16)
RECT_COLOUR = bytes((0x12, 0x34, 0x56, 0xFF))  # B, G, R, A

# decoys and fillers, all opaque (B, G, R, A)
HOLE_COLOUR = bytes((0x20, 0xA0, 0x60, 0xFF))
CHILD_DECOY_COLOUR = bytes((0x99, 0x11, 0xCC, 0xFF))
DECOY_FIRST_ROW = bytes((0x80, 0x80, 0x80, 0xFF))

Rect = tuple[int, int, int, int]  # x, y, width, height
Canvas = bytearray | mmap.mmap  # anything pixels can be written into by slice


# -- pixels (pure functions) ---------------------------------------------------


@functools.cache
def pattern(width: int, height: int) -> bytes:
    """The pattern client's pattern: B, G, R, A bytes, stride ``4 * width``."""
    return pc.pattern_pixels(width, height)


def _pixels(data: bytes) -> array[int]:
    words = array("I")
    if words.itemsize != BPP:
        raise RuntimeError("array('I') is not 32-bit on this platform")
    words.frombytes(data)
    return words


def transformed_pixels(pixels: bytes, width: int, height: int, transform: int) -> tuple[
        bytes, int, int]:
    """The buffer that shows ``pixels`` (``width`` x ``height``) upright under
    ``wl_surface.set_buffer_transform(transform)``.

    Returns the buffer's bytes, width and height (``height`` x ``width`` for odd
    transforms). The surface pixel (x, y) lands on the buffer pixel the
    compositor samples for it; for transform 1, say, a surface point (sx, sy)
    maps to the buffer point (sy, W - sx), so buffer row ``W - 1 - x`` holds
    surface column x.
    """
    if transform not in range(8):
        raise ValueError(f"wl_output.transform {transform} is not 0..7")
    if len(pixels) != width * height * BPP:
        raise ValueError(f"{len(pixels)} bytes are not {width}x{height} pixels")
    src = _pixels(pixels)
    if transform % 2 == 0:
        rows = [src[y * width : (y + 1) * width] for y in range(height)]
        buffer_width, buffer_height = width, height
        flip_x, flip_y = transform in (2, 4), transform in (2, 6)
    else:
        # Buffer row by holds surface column x, read top to bottom or bottom to top.
        rows = [src[x::width] for x in range(width)]
        buffer_width, buffer_height = height, width
        flip_x, flip_y = transform in (3, 7), transform in (1, 7)
    if flip_x:
        rows = [row[::-1] for row in rows]
    if flip_y:
        rows.reverse()
    return b"".join(row.tobytes() for row in rows), buffer_width, buffer_height


def scaled_pixels(pixels: bytes, width: int, height: int, scale: int) -> bytes:
    """``pixels`` with each pixel made a ``scale`` x ``scale`` block."""
    if scale < 1:
        raise ValueError(f"scale {scale} is not positive")
    src = _pixels(pixels)
    out = bytearray()
    for y in range(height):
        row = src[y * width : (y + 1) * width]
        wide = array("I", bytes(width * scale * BPP))
        for i in range(scale):
            wide[i::scale] = row
        out += wide.tobytes() * scale
    return bytes(out)


def blit(dst: Canvas, dst_offset: int, dst_stride: int, x: int, y: int,
         src: bytes, src_stride: int, rect: Rect) -> None:
    """Copy ``rect`` of ``src`` to (``x``, ``y``) of the image at ``dst_offset`` in ``dst``."""
    sx, sy, w, h = rect
    for row in range(h):
        s = (sy + row) * src_stride + sx * BPP
        d = dst_offset + (y + row) * dst_stride + x * BPP
        dst[d : d + w * BPP] = src[s : s + w * BPP]


def fill(dst: Canvas, dst_offset: int, dst_stride: int, rect: Rect, colour: bytes) -> None:
    """Fill ``rect`` of the image at ``dst_offset`` in ``dst`` with one pixel value."""
    x, y, w, h = rect
    line = colour * w
    for row in range(h):
        d = dst_offset + (y + row) * dst_stride + x * BPP
        dst[d : d + w * BPP] = line


def viewport_buffer(width: int, height: int, seed: int = 1) -> tuple[bytes, int, int]:
    """The noisy buffer of ``viewport``, the pattern at VIEWPORT_OFFSET; bytes, w, h."""
    bw, bh = width + VIEWPORT_PAD[0], height + VIEWPORT_PAD[1]
    out = bytearray(random.Random(seed).randbytes(bw * bh * BPP))
    out[3::4] = b"\xff" * (bw * bh)
    blit(out, 0, bw * BPP, *VIEWPORT_OFFSET, pattern(width, height), width * BPP,
         (0, 0, width, height))
    return bytes(out), bw, bh


def inverted_decoy(width: int, height: int) -> bytes:
    """The pattern with inverted colours and a plain grey first row (not a checker row)."""
    out = bytearray(pattern(width, height).translate(bytes(255 - v for v in range(256))))
    out[3::4] = b"\xff" * (width * height)
    out[: width * BPP] = DECOY_FIRST_ROW * width
    return bytes(out)


def subsurface_rect(width: int, height: int) -> Rect:
    """Where the ``sync-subsurface`` child sits on its parent, and its size."""
    return width // 4, height // 4, max(1, width // 2), max(1, height // 2)


def rect_position(frame: int) -> tuple[int, int]:
    """Top-left corner of the moving rectangle in frame ``frame`` (1-based)."""
    return 20 + 9 * frame, 30 + 5 * frame


def moving_rect(frame: int) -> Rect:
    x, y = rect_position(frame)
    return x, y, RECT_SIZE[0], RECT_SIZE[1]


def max_frames(width: int, height: int) -> int:
    """The most frames for which the rectangle stays in rows 1..H-2 and columns 1..W-2."""
    frames = 0
    while True:
        x, y, w, h = moving_rect(frames + 1)
        if x + w > width - 1 or y + h > height - 1:
            return frames
        frames += 1


def double_buffered_pixels(width: int, height: int, frame: int) -> bytes:
    """What frame ``frame`` of ``double-buffered`` shows: the pattern with the rectangle."""
    out = bytearray(pattern(width, height))
    fill(out, 0, width * BPP, moving_rect(frame), RECT_COLOUR)
    return bytes(out)


def paint_double_buffered(dst: Canvas, dst_offset: int, width: int, height: int, frame: int,
                          drawn: int | None) -> None:
    """Make the buffer at ``dst_offset`` show frame ``frame``.

    ``drawn`` is the frame the buffer last showed (None: never drawn, so all of it
    is painted); otherwise only the rectangles of the last two frames are restored
    to the pattern and the new one is drawn (buffer age 2).
    """
    stride = width * BPP
    base = pattern(width, height)
    if drawn is None:
        dst[dst_offset : dst_offset + stride * height] = base
    else:
        for old in range(max(1, frame - 2), frame):
            rect = moving_rect(old)
            blit(dst, dst_offset, stride, rect[0], rect[1], base, stride, rect)
    fill(dst, dst_offset, stride, moving_rect(frame), RECT_COLOUR)


def double_buffered_damage(width: int, height: int, frame: int) -> list[Rect]:
    """What changed on screen since the previous frame, in buffer pixels."""
    if frame == 1:
        return [(0, 0, width, height)]
    return [moving_rect(frame), moving_rect(frame - 1)]


# -- the client ----------------------------------------------------------------


class ShmPool:
    """A memfd, our mapping of it and the ``wl_shm_pool`` made from it."""

    def __init__(self, shm: Any, size: int, name: str) -> None:
        self.fd = os.memfd_create(name, os.MFD_CLOEXEC)
        os.ftruncate(self.fd, size)
        self.size = size
        self.map = mmap.mmap(self.fd, size)
        self.proxy: Any = shm.create_pool(self.fd, size)

    def resize(self, size: int) -> None:
        """Grow the file, our mapping and (``wl_shm_pool.resize``) the compositor's."""
        os.ftruncate(self.fd, size)
        self.map.close()
        self.map = mmap.mmap(self.fd, size)
        self.size = size
        self.proxy.resize(size)

    def close(self) -> None:
        if not self.proxy.destroyed:
            self.proxy.destroy()
        self.map.close()
        os.close(self.fd)


class ShmBuffer:
    """A ``wl_buffer`` in a pool, busy from attach until ``wl_buffer.release``."""

    def __init__(self, pool: ShmPool, offset: int, width: int, height: int) -> None:
        self.pool = pool
        self.offset = offset
        self.width = width
        self.height = height
        self.stride = width * BPP
        self.busy = False
        self.releases = 0
        self.proxy: Any = pool.proxy.create_buffer(offset, width, height, self.stride, XRGB8888)
        self.proxy.dispatcher["release"] = self._on_release

    def _on_release(self, proxy: Any) -> None:
        self.busy = False
        self.releases += 1

    @property
    def full(self) -> Rect:
        return 0, 0, self.width, self.height

    def canvas(self) -> Canvas:
        """The pool's memory, to draw at ``self.offset``; only while not busy."""
        if self.busy:
            raise ClientError(f"internal error: drawing into busy {self}")
        return self.pool.map

    def write(self, pixels: bytes) -> None:
        if len(pixels) != self.stride * self.height:
            raise ValueError(f"{len(pixels)} bytes do not fill {self}")
        self.canvas()[self.offset : self.offset + len(pixels)] = pixels

    def __str__(self) -> str:
        return f"{self.width}x{self.height} buffer at offset {self.offset}"


class _Closed(Exception):
    """The compositor closed the toplevel: stop drawing and exit quietly."""


class ScenarioClient(pc.PatternClient):
    """One connection and one toplevel; the scenarios are its ``scenario_*`` methods."""

    def __init__(self, width: int, height: int, timeout: float, *,
                 viewporter: bool = False, subcompositor: bool = False) -> None:
        super().__init__(width, height, XRGB8888, timeout)
        self.want_viewporter = viewporter
        self.want_subcompositor = subcompositor
        self.viewporter: Any = None
        self.subcompositor: Any = None
        self.pools: list[ShmPool] = []
        self.shm_buffers: list[ShmBuffer] = []
        self.extra: list[Any] = []  # roles and surfaces we made, destroyed in reverse
        self.stop_requested = False
        self.commits = 0
        self.scribbled = 0

    # -- set-up --------------------------------------------------------------

    def _on_global(self, registry: Any, name: int, interface: str, version: int) -> None:
        super()._on_global(registry, name, interface, version)
        if interface == WpViewporter.name and self.want_viewporter and self.viewporter is None:
            self.viewporter = registry.bind(name, WpViewporter,
                                            min(version, VIEWPORTER_VERSION))
        elif (interface == WlSubcompositor.name and self.want_subcompositor
              and self.subcompositor is None):
            self.subcompositor = registry.bind(name, WlSubcompositor,
                                               min(version, SUBCOMPOSITOR_VERSION))

    def connect(self) -> None:
        super().connect()
        missing = [
            iface.name
            for iface, wanted, proxy in (
                (WpViewporter, self.want_viewporter, self.viewporter),
                (WlSubcompositor, self.want_subcompositor, self.subcompositor),
            )
            if wanted and proxy is None
        ]
        if missing:
            raise ClientError(f"compositor does not offer {', '.join(missing)}")

    def map_toplevel(self, title: str) -> None:
        self.map_window()
        self.toplevel.set_title(title)  # applied with the first buffer

    def new_pool(self, size: int) -> ShmPool:
        pool = ShmPool(self.shm, size, "qubesshm-scenario")
        self.pools.append(pool)
        return pool

    def new_buffer(self, pool: ShmPool, offset: int, width: int, height: int) -> ShmBuffer:
        buffer = ShmBuffer(pool, offset, width, height)
        self.shm_buffers.append(buffer)
        return buffer

    def buffer_with(self, pixels: bytes, width: int, height: int) -> ShmBuffer:
        """A buffer in a pool of its own, holding ``pixels``."""
        buffer = self.new_buffer(self.new_pool(len(pixels)), 0, width, height)
        buffer.write(pixels)
        return buffer

    # -- waiting and committing ------------------------------------------------

    def wait_for(self, condition: Callable[[], bool], what: str) -> None:
        self.wait_until(condition, what)
        if not condition():
            raise _Closed

    def wait_released(self, buffer: ShmBuffer) -> None:
        self.wait_for(lambda: not buffer.busy, f"the release of the {buffer}")

    def commit(self, surface: Any, buffer: ShmBuffer | None, damage: Sequence[Rect],
               *, presented: bool = True) -> None:
        """Attach ``buffer`` (if any), damage, commit; wait for the frame callback
        unless ``presented`` is False."""
        if buffer is not None:
            if buffer.busy:
                raise ClientError(f"internal error: attaching busy {buffer}")
            surface.attach(buffer.proxy, 0, 0)
            buffer.busy = True
        for rect in damage:
            surface.damage_buffer(*rect)
        done = [False]
        if presented:
            def on_done(callback: Any, time_ms: int) -> None:
                done[0] = True

            callback = surface.frame()
            callback.dispatcher["done"] = on_done
        if surface is self.surface and self.configure_serial is not None:
            self.xdg_surface.ack_configure(self.configure_serial)
            self.configure_serial = None
        surface.commit()
        self.commits += 1
        if presented:
            self.wait_for(lambda: done[0], f"the frame callback of commit {self.commits}")

    def show(self, pixels: bytes, width: int, height: int) -> ShmBuffer:
        """One buffer holding ``pixels`` on the toplevel, full damage, presented."""
        buffer = self.buffer_with(pixels, width, height)
        self.commit(self.surface, buffer, [buffer.full])
        return buffer

    def hold(self, seconds: float) -> None:
        """Stay mapped, answering pings, until ``seconds`` pass or SIGTERM/SIGINT."""
        deadline = time.monotonic() + seconds
        while not self.closed and not self.stop_requested:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            self.dispatch_once(min(remaining, 0.1))

    # -- scenarios -------------------------------------------------------------

    def run_scenario(self, name: str, frames: int) -> None:
        if name in TRANSFORM_SCENARIOS:
            self.scenario_transform(int(name.rsplit("-", 1)[1]))
        elif name == "double-buffered":
            self.scenario_double_buffered(frames)
        else:
            getattr(self, "scenario_" + name.replace("-", "_"))()

    def scenario_static(self) -> None:
        self.show(pattern(self.width, self.height), self.width, self.height)

    def scenario_transform(self, transform: int) -> None:
        pixels, width, height = transformed_pixels(
            pattern(self.width, self.height), self.width, self.height, transform)
        self.surface.set_buffer_transform(transform)
        self.show(pixels, width, height)

    def scenario_scale_2(self) -> None:
        w, h = self.width, self.height
        self.surface.set_buffer_scale(2)
        self.show(scaled_pixels(pattern(w, h), w, h, 2), 2 * w, 2 * h)

    def scenario_viewport(self) -> None:
        pixels, width, height = viewport_buffer(self.width, self.height)
        viewport = self.viewporter.get_viewport(self.surface)
        self.extra.append(viewport)
        viewport.set_source(*VIEWPORT_OFFSET, self.width, self.height)
        viewport.set_destination(self.width, self.height)
        self.show(pixels, width, height)

    def scenario_resized_pool(self) -> None:
        w, h = self.width, self.height
        size = w * h * BPP
        pool = self.new_pool(size)
        decoy = self.new_buffer(pool, 0, w, h)
        decoy.write(inverted_decoy(w, h))
        self.commit(self.surface, decoy, [decoy.full])
        # A compositor that reads shm buffers when it renders (Weston) keeps the
        # decoy until another buffer replaces it; a copying proxy releases it at
        # once. Growing the pool does not need it back, so wait for one round trip.
        self.roundtrip()
        pool.resize(2 * size)
        buffer = self.new_buffer(pool, size, w, h)  # wholly past the old end
        buffer.write(pattern(w, h))
        self.commit(self.surface, buffer, [buffer.full])

    def scenario_sync_subsurface(self) -> None:
        w, h = self.width, self.height
        hole = subsurface_rect(w, h)
        hx, hy, hw, hh = hole
        base = pattern(w, h)
        parent = bytearray(base)
        fill(parent, 0, w * BPP, hole, HOLE_COLOUR)

        child_surface = self.compositor.create_surface()
        subsurface = self.subcompositor.get_subsurface(child_surface, self.surface)
        self.extra += [child_surface, subsurface]
        subsurface.set_position(hx, hy)
        subsurface.set_sync()
        self.show(bytes(parent), w, h)  # maps the parent, and places the child

        decoy = self.buffer_with(CHILD_DECOY_COLOUR * (hw * hh), hw, hh)
        part = bytearray(hw * hh * BPP)
        blit(part, 0, hw * BPP, 0, 0, base, w * BPP, hole)
        right = self.buffer_with(bytes(part), hw, hh)
        # Both child commits are cached until the parent commits.
        self.commit(child_surface, decoy, [decoy.full], presented=False)
        self.commit(child_surface, right, [right.full], presented=False)
        self.roundtrip()
        noise = random.Random(2)
        for buffer in (decoy, right):
            if not buffer.busy:
                buffer.write(noise.randbytes(buffer.stride * buffer.height))
                self.scribbled += 1
        self.commit(self.surface, None, [])

    def scenario_double_buffered(self, frames: int) -> None:
        w, h = self.width, self.height
        size = w * h * BPP
        pool = self.new_pool(2 * size)
        buffers = [self.new_buffer(pool, i * size, w, h) for i in range(2)]
        drawn: list[int | None] = [None, None]
        for frame in range(1, frames + 1):
            index = (frame - 1) % 2
            buffer = buffers[index]
            self.wait_released(buffer)
            paint_double_buffered(buffer.canvas(), buffer.offset, w, h, frame, drawn[index])
            drawn[index] = frame
            self.commit(self.surface, buffer, double_buffered_damage(w, h, frame))

    # -- tear-down -------------------------------------------------------------

    def close(self) -> None:
        for proxy in reversed(self.extra):
            if not proxy.destroyed:
                proxy.destroy()
        for buffer in self.shm_buffers:
            if not buffer.proxy.destroyed:
                buffer.proxy.destroy()
        pools, self.pools = self.pools, []
        try:
            super().close()
        finally:
            for pool in pools:
                pool.close()


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="scenarios: " + ", ".join(SCENARIOS),
    )
    parser.add_argument("--scenario", required=True, choices=SCENARIOS, metavar="NAME",
                        help="which route the pattern takes to the screen (see below)")
    parser.add_argument("--width", type=int, default=pc.DEFAULT_WIDTH,
                        help=f"pattern width W (default {pc.DEFAULT_WIDTH})")
    parser.add_argument("--height", type=int, default=pc.DEFAULT_HEIGHT,
                        help=f"pattern height H (default {pc.DEFAULT_HEIGHT})")
    parser.add_argument("--frames", type=int, default=DEFAULT_FRAMES,
                        help=f"frames of double-buffered (default {DEFAULT_FRAMES})")
    parser.add_argument("--hold", type=float, default=0.0,
                        help="stay mapped S seconds after the final frame "
                        "(SIGTERM or SIGINT ends it early, exit status 0)")
    parser.add_argument("--ready-file", type=Path,
                        help='write "ready" here once the final frame has been presented')
    parser.add_argument("--timeout", type=float, default=10.0,
                        help="give up waiting for any one event after S s (default 10)")
    parser.add_argument("--quiet", action="store_true", help="no summary line on stdout")
    args = parser.parse_args(argv)
    if args.width < 2 or args.height < 2:
        parser.error("--width and --height must be at least 2")
    if args.hold < 0 or args.timeout <= 0:
        parser.error("--hold must not be negative and --timeout must be positive")
    if args.scenario == "double-buffered":
        most = max_frames(args.width, args.height)
        if not 1 <= args.frames <= most:
            parser.error(f"--frames must be 1..{most} for {args.width}x{args.height}: the "
                         "rectangle must stay inside rows 1..H-2 and columns 1..W-2")
    return args


def run(args: argparse.Namespace) -> int:
    scenario: str = args.scenario
    client = ScenarioClient(
        args.width, args.height, args.timeout,
        viewporter=scenario == "viewport", subcompositor=scenario == "sync-subsurface",
    )

    def stop(signum: int, frame: FrameType | None) -> None:
        client.stop_requested = True

    try:
        client.connect()
        client.map_toplevel(f"qubesshm scenario {scenario}")
        try:
            client.run_scenario(scenario, args.frames)
        except _Closed:
            return 0
        # From here on SIGTERM and SIGINT only end the hold (before, they kill as usual).
        signal.signal(signal.SIGTERM, stop)
        signal.signal(signal.SIGINT, stop)
        if args.ready_file is not None:
            pc.write_ready_file(args.ready_file)
        if not args.quiet:
            releases = sum(b.releases for b in client.shm_buffers)
            print(f"scenario_client: {scenario} {args.width}x{args.height} presented after "
                  f"{client.commits} commits ({releases} releases, {client.scribbled} "
                  "released buffers scribbled over)", flush=True)
        client.hold(args.hold)
    except ClientError as exc:
        print(f"scenario_client: {scenario}: {exc}", file=sys.stderr)
        return 1
    finally:
        client.close()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run(parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
