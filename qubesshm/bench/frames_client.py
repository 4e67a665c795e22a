"""The client ``qubesshm bench frames`` runs: draws frames as fast as it is allowed.

One xdg_toplevel of ``--width`` x ``--height`` xrgb8888 pixels, ``--buffers``
wl_shm buffers in one pool. Each frame it takes a released buffer (waiting for
``wl_buffer.release`` when none is; the pool is a memfd sealed against shrinking,
as Weston's clients make it, unless ``--unsealed``, as GTK's are), really writes
the damaged pixels (the whole
buffer for ``full``; a ``--region`` square that stays put for ``static`` or
jumps by its own width every frame for ``moving``, repainting where it was),
damages exactly what changed since that buffer's previous frame, and commits.
With ``--wait-frame`` it waits for each frame callback, as a well-behaved
animating client does. After ``--warmup`` frames it times ``--frames`` frames
and prints one JSON line: frames, seconds, and the damaged bytes it declared.

Run as ``python3 -m qubesshm.bench.frames_client``.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import mmap
import os
import select
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

from pywayland.client.display import Display
from pywayland.protocol.wayland import WlCompositor, WlShm
from pywayland.protocol.xdg_shell import XdgWmBase

XRGB8888 = 1
BPP = 4
Rect = tuple[int, int, int, int]


class FramesError(RuntimeError):
    pass


class FramesClient:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.width, self.height = args.width, args.height
        self.stride = self.width * BPP
        self.display = Display()
        self.compositor: Any = None
        self.shm: Any = None
        self.wm_base: Any = None
        self.configured = False
        self.busy: list[bool] = []
        self.buffers: list[Any] = []
        # What each buffer lacks compared with the newest frame.
        self.stale: list[list[Rect]] = []
        self.done = True
        self.errors: list[str] = []

    def wait(self, condition: Callable[[], bool], what: str) -> None:
        deadline = time.monotonic() + self.args.timeout
        while not condition():
            if self.errors:
                raise FramesError("; ".join(self.errors))
            if self.display.dispatch(block=False) < 0:
                raise FramesError(f"connection lost waiting for {what}")
            if condition():
                return
            self.display.flush()
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise FramesError(f"timed out waiting for {what}")
            readable, _, _ = select.select([self.display.get_fd()], [], [], remaining)
            if readable:
                try:
                    self.display.read()
                except RuntimeError as exc:
                    raise FramesError(f"connection lost waiting for {what}") from exc

    def connect(self) -> None:
        try:
            self.display.connect()
        except ValueError as exc:
            raise FramesError("cannot connect to the Wayland display") from exc
        registry = self.display.get_registry()
        registry.dispatcher["global"] = self._on_global
        self.display.roundtrip()
        if None in (self.compositor, self.shm, self.wm_base):
            raise FramesError("the compositor lacks wl_compositor 4, wl_shm or xdg_wm_base")

    def _on_global(self, registry: Any, name: int, interface: str, version: int) -> None:
        if interface == WlCompositor.name and version >= 4:
            self.compositor = registry.bind(name, WlCompositor, 4)
        elif interface == WlShm.name:
            self.shm = registry.bind(name, WlShm, 1)
        elif interface == XdgWmBase.name:
            self.wm_base = registry.bind(name, XdgWmBase, 1)
            self.wm_base.dispatcher["ping"] = lambda base, serial: base.pong(serial)

    def setup(self) -> None:
        count = self.args.buffers
        size = self.stride * self.height
        self.memfd = os.memfd_create("qubesshm-frames", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        os.ftruncate(self.memfd, size * count)
        if not self.args.unsealed:
            # As libwayland's os_create_anonymous_file and GTK do: the pool can never
            # shrink, which lets a compositor (or qubesshm) map it without SIGBUS risk.
            fcntl.fcntl(self.memfd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK)
        self.map = mmap.mmap(self.memfd, size * count)
        self.background = bytes([0x40, 0x60, 0x80, 0xFF]) * (self.width * self.height)
        pool = self.shm.create_pool(self.memfd, size * count)
        for index in range(count):
            self.map[index * size:(index + 1) * size] = self.background
            buffer = pool.create_buffer(index * size, self.width, self.height, self.stride,
                                        XRGB8888)
            buffer.dispatcher["release"] = self._on_release
            buffer.user_data = index
            self.buffers.append(buffer)
            self.busy.append(False)
            self.stale.append([(0, 0, self.width, self.height)])
        pool.destroy()
        self.surface = self.compositor.create_surface()
        xdg_surface = self.wm_base.get_xdg_surface(self.surface)
        xdg_surface.dispatcher["configure"] = self._on_configure
        toplevel = xdg_surface.get_toplevel()
        toplevel.set_title("qubesshm bench frames")
        self.surface.commit()
        self.wait(lambda: self.configured, "the first configure")

    def _on_configure(self, xdg_surface: Any, serial: int) -> None:
        xdg_surface.ack_configure(serial)
        self.configured = True

    def _on_release(self, buffer: Any) -> None:
        self.busy[buffer.user_data] = False

    def region(self, frame: int) -> Rect:
        side = self.args.region
        if self.args.damage == "static":
            return (self.width // 3, self.height // 3, side, side)
        columns = max(1, (self.width - side) // side)
        x = (frame % columns) * side
        return (x, self.height // 3, side, side)

    def fill(self, index: int, rect: Rect, value: int) -> None:
        x, y, w, h = rect
        base = index * self.stride * self.height
        row = bytes([value, 0x20, 0xA0, 0xFF]) * w
        for line in range(y, y + h):
            at = base + line * self.stride + x * BPP
            self.map[at:at + w * BPP] = row

    def restore(self, index: int, rect: Rect) -> None:
        x, y, w, h = rect
        base = index * self.stride * self.height
        for line in range(y, y + h):
            at = base + line * self.stride + x * BPP
            self.map[at:at + w * BPP] = self.background[:w * BPP]

    def draw(self, frame: int) -> tuple[int, list[Rect]]:
        """Draw frame ``frame`` into a released buffer; its index and the damage."""
        self.wait(lambda: not all(self.busy), "a released buffer")
        index = self.busy.index(False)
        value = frame & 0xFF
        if self.args.damage == "full":
            base = index * self.stride * self.height
            self.map[base:base + self.stride * self.height] = (
                bytes([value, value, value, 0xFF]) * (self.width * self.height))
            changed = [(0, 0, self.width, self.height)]
        else:
            new = self.region(frame)
            old = self.region(frame - 1)
            changed = [new] if old == new else [old, new]
            # Bring this buffer up to date where it lags, then draw the new square.
            for rect in self.stale[index]:
                self.restore(index, rect)
            self.fill(index, new, value)
        for other in range(len(self.buffers)):
            if other != index:
                self.stale[other] = self.stale[other] + changed
        self.stale[index] = []
        return index, changed

    def commit(self, frame: int) -> int:
        index, changed = self.draw(frame)
        if self.args.wait_frame:
            self.wait(lambda: self.done, "the frame callback")
            self.done = False
            callback = self.surface.frame()
            callback.dispatcher["done"] = self._on_done
        self.surface.attach(self.buffers[index], 0, 0)
        self.busy[index] = True
        for x, y, w, h in changed:
            self.surface.damage_buffer(x, y, w, h)
        self.surface.commit()
        self.display.flush()
        return sum(w * h * BPP for _, _, w, h in changed)

    def _on_done(self, callback: Any, time_ms: int) -> None:
        self.done = True


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--width", type=int, default=1920)
    parser.add_argument("--height", type=int, default=1080)
    parser.add_argument("--damage", choices=("full", "static", "moving"), default="full")
    parser.add_argument("--region", type=int, default=64)
    parser.add_argument("--buffers", type=int, default=3)
    parser.add_argument("--wait-frame", action="store_true")
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--frames", type=int, default=100)
    parser.add_argument("--timeout", type=float, default=20.0)
    parser.add_argument("--unsealed", action="store_true",
                        help="do not seal the pool against shrinking (qubesshm then reads it "
                        "with preadv instead of mapping it)")
    args = parser.parse_args(argv)
    if args.region * 2 > min(args.width, args.height):
        parser.error("--region must fit twice in the window")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    client = FramesClient(args)
    try:
        client.connect()
        client.setup()
        for frame in range(args.warmup):
            client.commit(frame)
        # A mark the driver sees before timing starts (it reads proxy counters here).
        print(json.dumps({"warm": True}), flush=True)
        sys.stdin.readline()
        damaged = 0
        start = time.perf_counter()
        for frame in range(args.warmup, args.warmup + args.frames):
            damaged += client.commit(frame)
        # The last frame counts once the compositor has it.
        if client.display.roundtrip() < 0:
            raise FramesError("connection lost after the last frame")
        seconds = time.perf_counter() - start
    except FramesError as exc:
        print(f"frames_client: {exc}", file=sys.stderr)
        return 1
    print(json.dumps({"frames": args.frames, "seconds": seconds, "bytes_damaged": damaged}),
          flush=True)
    sys.stdin.readline()
    client.display.disconnect()
    return 0


if __name__ == "__main__":
    sys.exit(main())
