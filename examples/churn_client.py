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

With ``--unpaced --displays A,B,...`` it runs ``--windows`` windows on each of
those displays, taking turns of ``--block`` windows (one connection each, every
turn's windows closed before the next display's turn), and times each display
apart: paths compared this way share whatever the machine does meanwhile.

Usage::

    churn_client.py [--windows N] [--size WxH] [--frames F] [--concurrency C]
                    [--rate R] [--unpaced] [--displays A,B,... [--block B]]
                    [--timeout S] [--progress]

Prints one line at the end, ``churn: N windows in S s (R windows/s), client CPU C s``
(its own CPU over the same span, this process's user and system time), with
``--displays`` one per display ending `` on NAME``; with ``--progress`` also
``opened I`` (`` on NAME``) as each window has been presented. Exit status
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


def _displays(text: str) -> list[str]:
    names = [name for name in text.split(",") if name]
    if not names or len(set(names)) != len(names):
        raise argparse.ArgumentTypeError(f"{text!r}: one or more displays, each once")
    return names


class Tally:
    """What one display's windows took: wall time and this process's CPU time."""

    def __init__(self, name: str | None) -> None:
        self.name = name
        self.on = "" if name is None else f" on {name}"  # what its lines end with
        self.windows = 0
        self.seconds = 0.0
        self.cpu = 0.0

    def line(self) -> str:
        return (f"churn: {self.windows} windows in {self.seconds:.2f} s "
                f"({self.windows / self.seconds:.1f} windows/s), client CPU {self.cpu:.3f} s"
                f"{self.on}")


def _run(client: PatternClient, tally: Tally, count: int, args: argparse.Namespace,
         start: float, first: int) -> None:
    """``count`` windows on ``client``, all closed at the end, timed into ``tally``."""
    began, cpu_began = time.monotonic(), time.process_time()
    open_windows: deque[Window] = deque()
    for number in range(first, first + count):
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
            print(f"opened {number + 1}{tally.on}", flush=True)
    while open_windows:
        open_windows.popleft().close()
    client.roundtrip()
    tally.windows += count
    tally.seconds += time.monotonic() - began
    tally.cpu += time.process_time() - cpu_began


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
    parser.add_argument("--displays", type=_displays, metavar="NAME,NAME,...",
                        help="with --unpaced: --windows windows on each of these displays "
                        "(names or paths), in turns of --block windows, each display "
                        "timed apart: paths compared under the same machine")
    parser.add_argument("--block", type=_positive, default=25,
                        help="windows a turn with --displays (default %(default)s)")
    parser.add_argument("--timeout", type=float, default=30.0,
                        help="seconds to wait for any one event")
    parser.add_argument("--progress", action="store_true")
    args = parser.parse_args(argv)
    if args.displays is not None and (not args.unpaced or args.rate > 0):
        parser.error("--displays takes turns between unpaced runs: give --unpaced, "
                     "not --rate")
    width, height = args.size
    names: list[str | None] = list(args.displays) if args.displays else [None]
    clients = [PatternClient(width, height, FORMATS["xrgb8888"], args.timeout, name)
               for name in names]
    tallies = [Tally(name) for name in names]
    start = time.monotonic()
    client = clients[0]
    try:
        for client in clients:
            client.connect()
        if args.displays is None:
            _run(clients[0], tallies[0], args.windows, args, start, 0)
        else:
            for first in range(0, args.windows, args.block):
                count = min(args.block, args.windows - first)
                for client, tally in zip(clients, tallies, strict=True):
                    _run(client, tally, count, args, start, first)
    except ClientError as exc:
        where = ("" if args.displays is None or client.display_name in str(exc)
                 else f" (on {client.display_name})")
        print(f"churn_client: {exc}{where}", file=sys.stderr)
        # Disconnect before the interpreter finalizes the proxies: left to garbage
        # collection after a protocol error, libwayland crashed (SIGSEGV).
        for each in clients:
            if each.connected:
                each.display.disconnect()
        return 1
    for tally in tallies:
        print(tally.line(), flush=True)
    for client in clients:
        client.display.disconnect()
    return 0


if __name__ == "__main__":
    sys.exit(main())
