"""Non-blocking Unix stream socket that carries bytes and SCM_RIGHTS fds in order.

Receiving collects whatever fds came with the bytes. Sending keeps a queue of
segments whose fds must leave no later than their bytes, passes at most 28 fds
per ``sendmsg`` (libwayland's limit, which its receivers size their buffers for)
and closes our copies of fds once the kernel has taken them.
"""

from __future__ import annotations

import array
import asyncio
import os
import socket
from collections import deque
from collections.abc import Callable
from typing import Protocol

# What libwayland puts in one sendmsg; its receive buffers are sized for it.
MAX_FDS_PER_SENDMSG = 28
# The kernel's SCM_MAX_FD: what a single recvmsg can ever carry.
MAX_FDS_PER_RECVMSG = 253
RECV_SIZE = 64 * 1024
_ANCILLARY_SPACE = socket.CMSG_SPACE(MAX_FDS_PER_RECVMSG * 4)
# Bytes coalesced into one sendmsg.
SEND_SIZE = 256 * 1024
# Plain ints: operators on the socket module's IntFlag members are slow in a hot path.
_MSG_CTRUNC = int(socket.MSG_CTRUNC)
_MSG_CMSG_CLOEXEC = int(socket.MSG_CMSG_CLOEXEC)
_SOL_SOCKET = int(socket.SOL_SOCKET)
_SCM_RIGHTS = int(socket.SCM_RIGHTS)


def _rights(fds: list[int]) -> list[tuple[int, int, bytes]]:
    """The SCM_RIGHTS ancillary data passing ``fds``."""
    return [(_SOL_SOCKET, _SCM_RIGHTS, array.array("i", fds).tobytes())] if fds else []


class PeerClosed(Exception):
    """The peer hung up."""


class PeerEnded(PeerClosed):
    """The peer ended the connection for a reason its other end must hear (the host
    half of a split proxy refusing what the client sent, or gone)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class FdRefused(Exception):
    """An fd that this transport cannot carry; the text names it."""


class Peer(Protocol):
    """What a session's I/O needs of one side's connection: a ``Transport``, or a
    connection carried on a split proxy's stream."""

    closed: bool
    queued_fds: int

    @property
    def queued_bytes(self) -> int: ...

    def receive(self, size: int) -> tuple[bytes, list[int]] | None: ...

    def send(self, segments: list[tuple[bytes, list[int]]]) -> bool: ...

    def flush(self) -> bool: ...

    def close(self) -> None: ...

    def watch_readable(self, loop: asyncio.AbstractEventLoop,
                       callback: Callable[[], None]) -> None: ...

    def unwatch_readable(self, loop: asyncio.AbstractEventLoop) -> None: ...

    def watch_writable(self, loop: asyncio.AbstractEventLoop,
                       callback: Callable[[], None]) -> None: ...

    def unwatch_writable(self, loop: asyncio.AbstractEventLoop) -> None: ...


class FdsTruncated(Exception):
    """The kernel dropped fds that did not fit the ancillary buffer."""


class Transport:
    """One side of a relayed connection."""

    def __init__(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        self.sock = sock
        self._out: deque[tuple[memoryview, list[int]]] = deque()
        self.queued_bytes = 0
        self.queued_fds = 0
        self.closed = False

    def fileno(self) -> int:
        return self.sock.fileno()

    # -- readiness: the loop watches the socket ---------------------------------------

    def watch_readable(self, loop: asyncio.AbstractEventLoop,
                       callback: Callable[[], None]) -> None:
        loop.add_reader(self.sock.fileno(), callback)

    def unwatch_readable(self, loop: asyncio.AbstractEventLoop) -> None:
        loop.remove_reader(self.sock.fileno())

    def watch_writable(self, loop: asyncio.AbstractEventLoop,
                       callback: Callable[[], None]) -> None:
        loop.add_writer(self.sock.fileno(), callback)

    def unwatch_writable(self, loop: asyncio.AbstractEventLoop) -> None:
        loop.remove_writer(self.sock.fileno())

    def receive(self, size: int = RECV_SIZE) -> tuple[bytes, list[int]] | None:
        """Bytes and fds available now; None if nothing is ready; raises PeerClosed at EOF."""
        try:
            data, ancdata, flags, _ = self.sock.recvmsg(size, _ANCILLARY_SPACE,
                                                        _MSG_CMSG_CLOEXEC)
        except (BlockingIOError, InterruptedError):
            return None
        except ConnectionResetError as exc:
            raise PeerClosed(str(exc)) from exc
        fds: list[int] = []
        for level, kind, payload in ancdata:
            if level == _SOL_SOCKET and kind == _SCM_RIGHTS:
                received = array.array("i")
                received.frombytes(payload[: len(payload) - len(payload) % 4])
                fds.extend(received)
        if flags & _MSG_CTRUNC:
            for fd in fds:
                os.close(fd)
            raise FdsTruncated(f"more than {MAX_FDS_PER_RECVMSG} fds in one message")
        if not data:
            for fd in fds:
                os.close(fd)
            raise PeerClosed("end of stream")
        return data, fds

    def send(self, segments: list[tuple[bytes, list[int]]]) -> bool:
        """Queue ``segments`` and send what the socket takes now; True once all went.

        The usual case, one segment and nothing queued before it, costs one
        ``sendmsg`` and no queueing.
        """
        if not self._out and len(segments) == 1:
            data, fds = segments[0]
            if data and len(fds) <= MAX_FDS_PER_SENDMSG:
                try:
                    sent = self.sock.sendmsg([data], _rights(fds))
                except (BlockingIOError, InterruptedError):
                    sent = 0
                except OSError as exc:
                    # Not queued, so ours to close. Any failure but EAGAIN ends the
                    # connection: EPIPE, ECONNRESET, ETOOMANYREFS, ENOBUFS...
                    for fd in fds:
                        os.close(fd)
                    raise PeerClosed(str(exc)) from exc
                if sent:
                    for fd in fds:
                        os.close(fd)
                    if sent == len(data):
                        return True
                    self.queue(data[sent:], [])
                else:
                    self.queue(data, fds)
                return False
        for data, fds in segments:
            self.queue(data, fds)
        return self.flush()

    def queue(self, data: bytes, fds: list[int]) -> None:
        if not data:
            raise ValueError("fds cannot travel without bytes on a stream socket")
        self._out.append((memoryview(data), fds))
        self.queued_bytes += len(data)
        self.queued_fds += len(fds)

    def flush(self) -> bool:
        """Send what the socket takes now; True once the queue is empty."""
        while self._out:
            chunks: list[memoryview] = []
            fds: list[int] = []
            size = 0
            taken = 0
            for data, seg_fds in self._out:
                if taken and (len(fds) + len(seg_fds) > MAX_FDS_PER_SENDMSG
                              or size >= SEND_SIZE):
                    break
                if len(seg_fds) > MAX_FDS_PER_SENDMSG:
                    # A segment with more fds than one sendmsg may carry: send its
                    # first byte with the first 28, the rest with the following bytes.
                    self._split_fd_heavy_head()
                    break
                chunks.append(data)
                fds.extend(seg_fds)
                size += len(data)
                taken += 1
            if not chunks:
                continue
            try:
                sent = self.sock.sendmsg(chunks, _rights(fds))
            except (BlockingIOError, InterruptedError):
                return False
            except OSError as exc:
                # The queue, fds included, is released by close().
                raise PeerClosed(str(exc)) from exc
            self._consume(sent, taken)
        return True

    def _split_fd_heavy_head(self) -> None:
        data, seg_fds = self._out[0]
        head_len = 1
        rest_fds = seg_fds[MAX_FDS_PER_SENDMSG:]
        if len(data) <= head_len:
            raise ValueError(
                f"{len(seg_fds)} fds ride on {len(data)} byte(s): at most "
                f"{MAX_FDS_PER_SENDMSG} per byte can be sent")
        self._out.popleft()
        self._out.appendleft((data[head_len:], rest_fds))
        self._out.appendleft((data[:head_len], seg_fds[:MAX_FDS_PER_SENDMSG]))

    def _consume(self, sent: int, segments: int) -> None:
        # The kernel attaches every fd of a sendmsg to its first byte, so all fds of
        # the call's segments are gone even when only part of the bytes went out.
        for i in range(segments):
            data, fds = self._out[i]
            for fd in fds:
                os.close(fd)
            self.queued_fds -= len(fds)
            self._out[i] = (data, [])
        while sent:
            data, _ = self._out[0]
            if sent >= len(data):
                self._out.popleft()
                sent -= len(data)
                self.queued_bytes -= len(data)
            else:
                self._out[0] = (data[sent:], [])
                self.queued_bytes -= sent
                sent = 0

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        for _, fds in self._out:
            for fd in fds:
                os.close(fd)
        self._out.clear()
        self.queued_bytes = self.queued_fds = 0
        self.sock.close()
