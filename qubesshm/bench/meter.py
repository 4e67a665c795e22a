"""A byte-counting pass-through for the benchmarks: what crosses a stream, both ways.

``python3 -m qubesshm.bench.meter --counters FILE -- CMD...`` starts CMD and
passes its own stdin on to CMD's stdin and CMD's stdout on to its own stdout: as
``serve --remote`` runs it, the split proxy's stream goes through this process.
``--counters FILE --listen A --connect B`` accepts connections on the Unix socket A
and joins each to a new connection to B (between ``waypipe server`` and ``waypipe
client``, which opens one link connection per application). Bytes move with
``splice`` through a pipe per direction, never through this process's memory, and
are counted in FILE as they are delivered: three native unsigned 64-bit numbers,
this process's pid, the bytes *forward* (stdin to CMD, A to B: towards the
compositor) and *back*. ``read_counters`` reads them.

Only bytes cross: a stream that carries fds (SCM_RIGHTS) cannot go through it.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import fcntl
import mmap
import os
import selectors
import signal
import socket
import struct
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

COUNTERS = struct.Struct("=QQQ")  # pid, bytes forward, bytes back
FORWARD, BACK = 1, 2
PIPE_SIZE = 1 << 20
_FLAGS = os.SPLICE_F_NONBLOCK | os.SPLICE_F_MOVE
# Errors that mean the other end went away.
_GONE = (errno.EPIPE, errno.ECONNRESET, errno.ENOTCONN)


def read_counters(path: Path) -> tuple[int, int, int]:
    """The meter's (pid, bytes forward, bytes back) now; zeros before it started."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return 0, 0, 0
    if len(data) < COUNTERS.size:
        return 0, 0, 0
    pid, forward, back = COUNTERS.unpack_from(data)
    return pid, forward, back


class Counters:
    """FILE, mapped: this process's pid and the bytes each way."""

    def __init__(self, path: Path) -> None:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            os.ftruncate(fd, COUNTERS.size)
            self.map = mmap.mmap(fd, COUNTERS.size)
        finally:
            os.close(fd)
        self.values = [os.getpid(), 0, 0]
        COUNTERS.pack_into(self.map, 0, *self.values)

    def add(self, index: int, count: int) -> None:
        self.values[index] += count
        struct.pack_into("=Q", self.map, 8 * index, self.values[index])


class Pump:
    """One direction: bytes from ``src`` to ``dst`` through a pipe of its own."""

    def __init__(self, meter: Meter, src: int, dst: int, index: int,
                 on_done: Callable[[Pump, bool], None]) -> None:
        self.meter = meter
        self.src, self.dst, self.index = src, dst, index
        self.on_done = on_done  # (this pump, whether dst is gone) once it has ended
        self.mid_r, self.mid_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        with contextlib.suppress(OSError):
            fcntl.fcntl(self.mid_w, fcntl.F_SETPIPE_SZ, PIPE_SIZE)
        self.pending = 0  # bytes in the pipe, read from src, not yet written to dst
        self.eof = False
        self.done = False
        self.watching: tuple[int, int] | None = None
        self.watch()

    def watch(self) -> None:
        want = (self.dst, selectors.EVENT_WRITE) if self.pending else (
            self.src, selectors.EVENT_READ)
        if want == self.watching:
            return
        self.unwatch()
        self.meter.register(want[0], want[1], self)
        self.watching = want

    def unwatch(self) -> None:
        if self.watching is not None:
            self.meter.unregister(self.watching[0], self.watching[1])
            self.watching = None

    def ready(self) -> None:
        try:
            if not self.pending:
                count = os.splice(self.src, self.mid_w, PIPE_SIZE, flags=_FLAGS)
                if count == 0:
                    self.eof = True
                    self.finish(False)
                    return
                self.pending += count
            while self.pending:
                count = os.splice(self.mid_r, self.dst, self.pending, flags=_FLAGS)
                self.pending -= count
                self.meter.counters.add(self.index, count)
        except BlockingIOError:
            pass
        except OSError as exc:
            self.finish(exc.errno in _GONE)
            return
        self.watch()

    def finish(self, dst_gone: bool) -> None:
        if self.done:
            return
        self.done = True
        self.unwatch()
        os.close(self.mid_r)
        os.close(self.mid_w)
        self.on_done(self, dst_gone)


class Meter:
    """The selector loop the pumps share."""

    def __init__(self, counters: Counters) -> None:
        self.counters = counters
        self.selector = selectors.DefaultSelector()
        # fd -> {event: what to call}; a fd may be one pump's source and another's sink.
        self.handlers: dict[int, dict[int, Callable[[], None]]] = {}
        self.running = True

    def register(self, fd: int, event: int, pump: Pump | Callable[[], None]) -> None:
        callback = pump.ready if isinstance(pump, Pump) else pump
        events = self.handlers.setdefault(fd, {})
        events[event] = callback
        mask = 0
        for key in events:
            mask |= key
        if len(events) == 1:
            self.selector.register(fd, mask)
        else:
            self.selector.modify(fd, mask)

    def unregister(self, fd: int, event: int) -> None:
        events = self.handlers.get(fd)
        if events is None or event not in events:
            return
        del events[event]
        if events:
            self.selector.modify(fd, next(iter(events)))
        else:
            del self.handlers[fd]
            self.selector.unregister(fd)

    def run(self) -> None:
        while self.running and self.handlers:
            for key, mask in self.selector.select():
                for event in (selectors.EVENT_READ, selectors.EVENT_WRITE):
                    callback = self.handlers.get(key.fd, {}).get(event)
                    if mask & event and callback is not None:
                        callback()


def run_command(counters: Counters, command: list[str]) -> int:
    """CMD with this process's stdin and stdout passed through, counted."""
    child = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    assert child.stdin is not None and child.stdout is not None
    child_in, child_out = child.stdin.fileno(), child.stdout.fileno()
    for fd in (0, 1, child_in, child_out):
        os.set_blocking(fd, False)
    meter = Meter(counters)
    # SIGTERM (the proxy's group ended) ends the child with us.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    def done(pump: Pump, dst_gone: bool) -> None:
        # Passed the end on: the next reader sees it once nothing else holds its fd.
        with contextlib.suppress(OSError):
            os.close(pump.dst)
        if pump.src == child_out or dst_gone:
            meter.running = False

    Pump(meter, 0, child_in, FORWARD, done)
    Pump(meter, child_out, 1, BACK, done)
    try:
        meter.run()
    finally:
        with contextlib.suppress(OSError):
            os.close(child_in)
        child.stdin = None  # closed above; Popen must not close it again
        status = child.wait()
    return status if status >= 0 else 128 - status


def run_sockets(counters: Counters, listen: Path, connect: Path) -> int:
    """Each connection on ``listen`` joined to a new one to ``connect``, counted."""
    meter = Meter(counters)
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    with contextlib.suppress(FileNotFoundError):
        listen.unlink()
    server.bind(str(listen))
    server.listen(16)
    server.setblocking(False)

    def accept() -> None:
        try:
            near, _ = server.accept()
        except BlockingIOError:
            return
        far = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            far.connect(str(connect))
        except OSError as exc:
            print(f"meter: cannot connect to {connect}: {exc}", file=sys.stderr, flush=True)
            near.close()
            far.close()
            return
        near.setblocking(False)
        far.setblocking(False)
        ended: set[int] = set()

        def done(pump: Pump, dst_gone: bool) -> None:
            ended.add(pump.index)
            if dst_gone:
                for each in pumps:
                    each.finish(True)
            else:
                with contextlib.suppress(OSError):
                    (far if pump.dst == far.fileno() else near).shutdown(socket.SHUT_WR)
            if len(ended) == 2 or dst_gone:
                near.close()
                far.close()

        pumps: list[Pump] = []
        pumps.append(Pump(meter, near.fileno(), far.fileno(), FORWARD, done))
        pumps.append(Pump(meter, far.fileno(), near.fileno(), BACK, done))

    meter.register(server.fileno(), selectors.EVENT_READ, accept)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        meter.run()
    finally:
        server.close()
        with contextlib.suppress(FileNotFoundError):
            listen.unlink()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--counters", type=Path, required=True,
                        help="file of the counters (pid, bytes forward, bytes back)")
    parser.add_argument("--listen", type=Path, help="Unix socket to accept connections on")
    parser.add_argument("--connect", type=Path, help="Unix socket each one is joined to")
    parser.add_argument("command", nargs="*", help="command whose stdin and stdout to pass")
    args = parser.parse_args(argv)
    if (args.listen is None) != (args.connect is None):
        parser.error("--listen and --connect go together")
    if (args.listen is None) == (not args.command):
        parser.error("give a command (after --) or --listen and --connect")
    counters = Counters(args.counters)
    if args.command:
        return run_command(counters, args.command)
    return run_sockets(counters, args.listen, args.connect)


if __name__ == "__main__":
    sys.exit(main())
