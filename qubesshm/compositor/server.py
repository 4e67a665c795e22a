"""The compositor's I/O: one listening socket, one non-blocking transport per client.

Drives the sans-IO ``Compositor`` from an asyncio loop: accepts on a
``relay.listener.Listener`` (the same socket and lock rules as ``serve``),
reads each client with ``recvmsg`` (bytes and SCM_RIGHTS fds) into its
``ClientCore``, writes what it queued with ``sendmsg``, and runs
``Compositor.tick`` when the clock says frame callbacks are due. A client that
stops reading is no longer read from once a backlog builds, and dropped once
the backlog is absurd; nothing one client does stalls the others. The pipe
writes the compositor owes (``Compositor.transfers``: the text of a selection
it owns) are written non-blocking as the pipes take them, each closed when
written, when its reader is gone, or at its deadline (``transfer_timeout``).
The fds of pools the clients are done with (``Compositor.spent``) are closed
``SPENT_POOL_DELAY`` after the replies went.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import logging
import os
import socket
import struct
import time
from collections.abc import Callable

from ..relay.listener import Listener
from ..relay.transport import RECV_SIZE, FdsTruncated, PeerClosed, Transport
from ..shm.clientpool import SPENT_POOL_DELAY
from ..wire.codec import ErrorCode
from .client import ClientCore
from .core import Compositor
from .transfers import TRANSFER_TIMEOUT

log = logging.getLogger("qubesshm.compositor")

# Reads handled for one client before others get a turn.
READS_PER_WAKE = 8
# Output queued for a client that does not read: past the first, its requests wait;
# past the second, it is disconnected.
BACKLOG_PAUSE = 256 * 1024
BACKLOG_DROP = 16 * 1024 * 1024
# How long a client that broke the protocol has to read its error.
ERROR_LINGER = 2.0


def peer_pid(sock: socket.socket) -> int | None:
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    except OSError:
        return None
    pid, _, _ = struct.unpack("3i", raw)
    return pid or None


class Connection:
    """One client's socket and core."""

    def __init__(self, server: CompositorServer, core: ClientCore,
                 transport: Transport) -> None:
        self.server = server
        self.core = core
        self.transport = transport
        self.reading = False
        self.writing = False
        self.ended = False

    def readable(self) -> None:
        core = self.core
        try:
            for _ in range(READS_PER_WAKE):
                if core.closed:
                    break
                received = self.transport.receive()
                if received is None:
                    break
                data, fds = received
                core.feed(data, fds)
                if len(data) < RECV_SIZE:
                    # A short read: the socket held no more (or the kernel stopped at
                    # a message's fds, and the loop calls again). The replies go now,
                    # not after one more read that would find nothing.
                    break
        except PeerClosed:
            core.eof()
            core.close()
        except FdsTruncated as exc:
            core.post_error(1, ErrorCode.NO_MEMORY, f"qubesshm: {exc}")
        except Exception:
            log.exception("%s: internal error; disconnecting it", core)
            core.post_error(1, ErrorCode.IMPLEMENTATION, "qubesshm: internal error")
        self.server.service()

    def writable(self) -> None:
        self.flush()
        self.server.service()

    def flush(self) -> None:
        """Send what the core queued; pause or end the client as its backlog says."""
        if self.ended:
            return
        try:
            segments = self.core.take_output()
            done = self.transport.send(segments) if segments else self.transport.flush()
        except PeerClosed:
            self.core.close()
            self.end()
            return
        backlog = self.transport.queued_bytes
        if backlog > BACKLOG_DROP:
            log.info("%s: does not read its socket (%d bytes waiting); disconnecting it",
                     self.core, backlog)
            self.core.close()
            self.end()
            return
        self._want_write(not done)
        if self.core.closed:
            if done:
                self.end()
            else:
                self.server.loop.call_later(ERROR_LINGER, self.end)
            return
        self.want_read(backlog <= BACKLOG_PAUSE)

    def want_read(self, on: bool) -> None:
        if on != self.reading:
            loop = self.server.loop
            if on:
                loop.add_reader(self.transport.fileno(), self.readable)
            else:
                loop.remove_reader(self.transport.fileno())
            self.reading = on

    def _want_write(self, on: bool) -> None:
        if on != self.writing:
            loop = self.server.loop
            if on:
                loop.add_writer(self.transport.fileno(), self.writable)
            else:
                loop.remove_writer(self.transport.fileno())
            self.writing = on

    def end(self) -> None:
        if self.ended:
            return
        self.want_read(False)
        self._want_write(False)
        self.ended = True
        self.core.close()
        self.transport.close()
        self.server.connections.pop(self.core, None)


class PipeWrite:
    """One transfer: ``data`` into the pipe ``fd``, then close it (or at ``deadline``)."""

    def __init__(self, server: CompositorServer, fd: int, data: bytes) -> None:
        self.server = server
        self.fd = fd
        self.data = memoryview(data)
        self.watching = False
        self.done = False
        self.timer: asyncio.TimerHandle | None = None

    def start(self, timeout: float) -> None:
        try:
            flags = fcntl.fcntl(self.fd, fcntl.F_GETFL)
            fcntl.fcntl(self.fd, fcntl.F_SETFL, flags | os.O_NONBLOCK)
        except OSError as exc:
            log.debug("a transfer's fd is unusable: %s", exc)
            self.finish()
            return
        self.write()
        if not self.done:
            loop = self.server.loop
            self.timer = loop.call_later(timeout, self.expired)
            loop.add_writer(self.fd, self.write)
            self.watching = True

    def write(self) -> None:
        while self.data and not self.done:
            try:
                written = os.write(self.fd, self.data[:256 * 1024])
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno != errno.EPIPE:
                    log.debug("a transfer failed: %s", exc)
                break
            self.data = self.data[written:]
        self.finish()

    def expired(self) -> None:
        self.timer = None
        if not self.done:
            log.info("a client did not read a transfer (%d bytes left) in time; closed it",
                     len(self.data))
            self.finish()

    def finish(self) -> None:
        if self.done:
            return
        self.done = True
        if self.watching:
            self.server.loop.remove_writer(self.fd)
            self.watching = False
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self.server.compositor.transfers.finished(self.fd)
        with contextlib.suppress(OSError):
            os.close(self.fd)
        self.server.transfers.discard(self)


class CompositorServer:
    """Serves ``compositor`` on ``listener`` from the running asyncio loop."""

    def __init__(self, compositor: Compositor, listener: Listener, *,
                 clock: Callable[[], float] = time.monotonic,
                 transfer_timeout: float = TRANSFER_TIMEOUT) -> None:
        self.compositor = compositor
        self.listener = listener
        self.clock = clock
        # How long a pipe write may take before its fd is closed anyway.
        self.transfer_timeout = transfer_timeout
        self.transfers: set[PipeWrite] = set()
        self.loop = asyncio.get_running_loop()
        self.connections: dict[ClientCore, Connection] = {}
        self._service_soon = False
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at: float | None = None
        self._spent_timer: asyncio.TimerHandle | None = None
        self.closed = False
        compositor.wake = self._wake
        self.loop.add_reader(listener.fileno(), self._accept)

    def _accept(self) -> None:
        for _ in range(16):
            try:
                sock, _ = self.listener.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                log.warning("cannot accept a client on %s: %s", self.listener.path, exc)
                return
            sock.setblocking(False)
            core = self.compositor.connect(pid=peer_pid(sock))
            connection = Connection(self, core, Transport(sock))
            self.connections[core] = connection
            connection.want_read(True)
            log.debug("%s connected", core)

    def _wake(self) -> None:
        if not self._service_soon and not self.closed:
            self._service_soon = True
            self.loop.call_soon(self._serviced)

    def _serviced(self) -> None:
        self._service_soon = False
        self.service()

    def service(self) -> None:
        """Flush every client with output, end closed ones, and time the next tick."""
        if self.closed:
            return
        compositor = self.compositor
        for fd, data in compositor.transfers.take():
            transfer = PipeWrite(self, fd, data)
            self.transfers.add(transfer)
            transfer.start(self.transfer_timeout)
        while compositor.dirty:
            core = compositor.dirty.pop()
            connection = self.connections.get(core)
            if connection is not None:
                connection.flush()
        for connection in [c for c in self.connections.values() if c.core.closed]:
            connection.flush()
        if compositor.spent and self._spent_timer is None:
            # The replies went: the pools let go of are closed a moment later.
            self._spent_timer = self.loop.call_later(SPENT_POOL_DELAY, self._close_spent)
        self._schedule()

    def _close_spent(self) -> None:
        self._spent_timer = None
        self.compositor.spent.close()

    def _schedule(self) -> None:
        try:
            due = self.compositor.tick(self.clock())
        except Exception:
            log.exception("internal error running frame callbacks")
            due = None
        if self.compositor.dirty and not self._service_soon:
            self._wake()
        if due is None:
            return
        if self._timer is not None and self._timer_at is not None and self._timer_at <= due:
            return
        if self._timer is not None:
            self._timer.cancel()
        self._timer_at = due
        self._timer = self.loop.call_later(max(due - self.clock(), 0.0), self._timed)

    def _timed(self) -> None:
        self._timer = self._timer_at = None
        self.service()

    def close(self) -> None:
        """Disconnect every client and stop listening."""
        if self.closed:
            return
        self.closed = True
        if self._timer is not None:
            self._timer.cancel()
        if self._spent_timer is not None:
            self._spent_timer.cancel()
            self._spent_timer = None
        self.loop.remove_reader(self.listener.fileno())
        for connection in list(self.connections.values()):
            connection.end()
        for transfer in list(self.transfers):
            transfer.finish()
        self.compositor.transfers.close()
        self.compositor.spent.close()
        self.listener.close()
        if self.compositor.wake == self._wake:
            self.compositor.wake = None


async def serve(compositor: Compositor, listener: Listener, stop: asyncio.Event, *,
                clock: Callable[[], float] = time.monotonic) -> None:
    """Serve until ``stop`` is set, then disconnect everyone."""
    server = CompositorServer(compositor, listener, clock=clock)
    try:
        await stop.wait()
    finally:
        server.close()
