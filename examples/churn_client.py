#!/usr/bin/env python3
"""A Wayland client that opens and closes windows: the load of window churn.

Over one connection it maps ``--windows`` xdg toplevels one after another, each
with its own memfd pool and buffer of ``--size``, draws ``--frames`` frames in
each (waiting for the compositor's frame callback, so each frame was
presented; with ``--unpaced`` only for one ``wl_display.sync`` round trip after the
window's last commit, so each window costs the compositor its requests and not a
repaint), and destroys the window again. At most ``--concurrency`` windows are
open at once (the oldest is closed first); ``--rate`` caps how many are opened a
second. This is what menus, tooltips and dialogs do to a compositor, and what
makes grants pile up on a kernel's deferred list in a qube.

Usage::

    churn_client.py [--windows N] [--size WxH] [--frames F] [--concurrency C]
                    [--rate R] [--unpaced] [--timeout S] [--progress]

Prints one line at the end, ``churn: N windows in S s (R windows/s), client CPU C s``
(its own CPU over the same span, this process's user and system time); with
``--progress`` also ``opened I`` as each window has been presented. Exit status
0 on success, 1 on a protocol error, a lost connection or a timeout, 2 on bad
arguments.
"""

from __future__ import annotations

import argparse
import mmap
import os
import sys
import time
from collections import deque
from typing import Any

from pattern_client import BYTES_PER_PIXEL, FORMATS, ClientError, PatternClient, pattern_pixels


class Window:
    """One toplevel with its own pool and buffer, drawn with the pattern."""

    def __init__(self, client: PatternClient, number: int) -> None:
        self.client = client
        width, height = client.width, client.height
        stride = width * BYTES_PER_PIXEL
        size = stride * height
        self.memfd = os.memfd_create("qubesshm-churn", os.MFD_CLOEXEC)
        os.ftruncate(self.memfd, size)
        with mmap.mmap(self.memfd, size) as view:
            view[:] = pattern_pixels(width, height)
        self.pool = client.shm.create_pool(self.memfd, size)
        self.buffer = self.pool.create_buffer(0, width, height, stride, client.shm_format)
        self.configure_serial: int | None = None
        self.surface = client.compositor.create_surface()
        self.xdg_surface = client.wm_base.get_xdg_surface(self.surface)
        self.xdg_surface.dispatcher["configure"] = self._on_configure
        self.toplevel = self.xdg_surface.get_toplevel()
        self.toplevel.set_title(f"qubesshm churn {number}")
        self.toplevel.set_app_id("qubesshm.churn")
        self.surface.commit()
        client.wait_until(lambda: self.configure_serial is not None,
                          "the first xdg_surface.configure")

    def _on_configure(self, xdg_surface: Any, serial: int) -> None:
        self.configure_serial = serial

    def draw(self, paced: bool = True) -> None:
        """Commit the buffer whole; paced, wait until the compositor presented it."""
        if self.configure_serial is not None:
            self.xdg_surface.ack_configure(self.configure_serial)
            self.configure_serial = None
        self.surface.attach(self.buffer, 0, 0)
        self.surface.damage_buffer(0, 0, self.client.width, self.client.height)
        if paced:
            self.client.present(self.surface)
        else:
            self.surface.commit()

    def close(self) -> None:
        self.toplevel.destroy()
        self.xdg_surface.destroy()
        self.surface.destroy()
        self.buffer.destroy()
        self.pool.destroy()
        os.close(self.memfd)


def _size(text: str) -> tuple[int, int]:
    try:
        width, height = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not WIDTHxHEIGHT") from None
    if width < 2 or height < 2:
        raise argparse.ArgumentTypeError(f"{text!r}: at least 2x2 pixels")
    return width, height


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not at least 1")
    return value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--windows", type=_positive, default=100)
    parser.add_argument("--size", type=_size, default=(256, 192), metavar="WxH")
    parser.add_argument("--frames", type=_positive, default=1)
    parser.add_argument("--concurrency", type=_positive, default=1)
    parser.add_argument("--rate", type=float, default=0.0,
                        help="windows opened per second at most (default: as fast as it can)")
    parser.add_argument("--unpaced", action="store_true",
                        help="no frame callbacks: after a window's last commit, one "
                        "wl_display.sync round trip before it is closed")
    parser.add_argument("--timeout", type=float, default=30.0,
                        help="seconds to wait for any one event")
    parser.add_argument("--progress", action="store_true")
    args = parser.parse_args(argv)
    width, height = args.size
    client = PatternClient(width, height, FORMATS["xrgb8888"], args.timeout)
    start = time.monotonic()
    cpu_start = time.process_time()
    try:
        client.connect()
        open_windows: deque[Window] = deque()
        for number in range(args.windows):
            if args.rate > 0:
                client.idle(start + number / args.rate - time.monotonic())
            if len(open_windows) >= args.concurrency:
                open_windows.popleft().close()
            window = Window(client, number)
            for _ in range(args.frames):
                window.draw(paced=not args.unpaced)
            if args.unpaced:
                client.roundtrip()
            open_windows.append(window)
            if args.progress:
                print(f"opened {number + 1}", flush=True)
        while open_windows:
            open_windows.popleft().close()
        client.roundtrip()
    except ClientError as exc:
        print(f"churn_client: {exc}", file=sys.stderr)
        # Disconnect before the interpreter finalizes the proxies: left to garbage
        # collection after a protocol error, libwayland crashed (SIGSEGV).
        client.display.disconnect()
        return 1
    elapsed = time.monotonic() - start
    cpu = time.process_time() - cpu_start
    print(f"churn: {args.windows} windows in {elapsed:.2f} s "
          f"({args.windows / elapsed:.1f} windows/s), client CPU {cpu:.3f} s", flush=True)
    client.display.disconnect()
    return 0


if __name__ == "__main__":
    sys.exit(main())
