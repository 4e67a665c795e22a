"""Pipes relayed over the stream: clipboard and drag-and-drop transfers across the halves.

Where a Wayland message carries a pipe end (``wl_data_offer.receive``,
``wl_data_source.send``, their primary-selection twins), the side that got it keeps
it and sends ``PIPE`` (an id and which end it was); the other side makes a pipe of
its own, hands its local peer the same kind of end, and keeps the other. From then
on the side holding a read end reads it and sends ``PIPE_DATA``; the side holding a
write end writes that data into it and gives credit back with ``PIPE_ACK``, so a
reader that stops reading stops only its own transfer (``PIPE_WINDOW`` bytes at
most in flight). ``PIPE_END`` says the data is over, or that the reader went away.
Ids are allocated by the side sending ``PIPE``: even on the VM side, odd on the host.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from .codec import MAX_DATA, PipeAck, PipeClosed, PipeData, PipeEnd, StreamError, encode
from .fds import FdKind, pipe_for

log = logging.getLogger("qubesshm.stream")

PIPE_WINDOW = 64 * 1024
MAX_PIPES = 256


class TooManyPipes(Exception):
    """More transfers at once than one stream carries."""


@dataclass(eq=False)
class _Pipe:
    pipe_id: int
    fd: int
    reads: bool  # we read the local fd and send; else we write what comes into it
    credit: int = PIPE_WINDOW
    buffer: deque[memoryview] = field(default_factory=deque)
    buffered: int = 0
    ending: bool = False  # the peer said the data is over: close once written
    watching: bool = False


class PipeRelays:
    """Every pipe relayed on one stream, on one side."""

    def __init__(self, loop: asyncio.AbstractEventLoop, send: Callable[[list[bytes]], None],
                 *, vm_side: bool) -> None:
        self.loop = loop
        self._send = send
        self._parity = 0 if vm_side else 1
        self._next = 2 if vm_side else 1
        self._pipes: dict[int, _Pipe] = {}
        self._peer_highest = -1
        self.transfers = 0
        self.bytes_relayed = 0

    @property
    def live(self) -> int:
        return len(self._pipes)

    # -- pipe ends met on this side or announced by the peer ---------------------------

    def adopt(self, fd: int, kind: FdKind) -> tuple[int, PipeEnd]:
        """Our local peer passed ``fd`` (a pipe end, which we now own): its id and end
        for the ``PIPE`` item that stands for it."""
        if len(self._pipes) >= MAX_PIPES:
            os.close(fd)
            raise TooManyPipes(f"more than {MAX_PIPES} pipe transfers at once")
        pipe_id = self._next
        self._next += 2
        reads = kind is FdKind.PIPE_READ
        os.set_blocking(fd, False)
        self._add(_Pipe(pipe_id, fd, reads))
        return pipe_id, PipeEnd.READ if reads else PipeEnd.WRITE

    def stand_in(self, pipe_id: int, end: PipeEnd) -> int:
        """The peer's ``PIPE``: a local pipe end of the same kind for our local peer
        (the caller hands it over and closes its copy)."""
        if pipe_id % 2 == self._parity:
            raise StreamError(f"PIPE {pipe_id}: that id is one this side allocates")
        if pipe_id <= self._peer_highest:
            raise StreamError(f"PIPE {pipe_id}: ids only grow (the last was "
                              f"{self._peer_highest})")
        if len(self._pipes) >= MAX_PIPES:
            raise StreamError(f"PIPE {pipe_id}: more than {MAX_PIPES} pipe transfers at once")
        self._peer_highest = pipe_id
        kind = FdKind.PIPE_READ if end is PipeEnd.READ else FdKind.PIPE_WRITE
        give, keep = pipe_for(kind)
        # The peer reads its end when it got a read end: then we write into ours.
        self._add(_Pipe(pipe_id, keep, reads=end is PipeEnd.WRITE))
        return give

    def _add(self, pipe: _Pipe) -> None:
        self._pipes[pipe.pipe_id] = pipe
        self.transfers += 1
        self._watch(pipe)

    # -- frames from the peer ------------------------------------------------------------

    def frame(self, frame: PipeData | PipeClosed | PipeAck) -> None:
        pipe = self._pipes.get(frame.pipe_id)
        if pipe is None:
            if not self._known(frame.pipe_id):
                raise StreamError(f"{_name(frame)} for pipe {frame.pipe_id}, which was "
                                  "never announced")
            return  # it crossed our PIPE_END on the way
        if isinstance(frame, PipeClosed):
            if pipe.reads or not pipe.buffer:
                self._close(pipe, tell_peer=False)
            else:
                pipe.ending = True
            return
        if isinstance(frame, PipeAck):
            if not pipe.reads or pipe.credit + frame.count > PIPE_WINDOW:
                raise StreamError(f"PIPE_ACK of {frame.count} bytes for pipe {pipe.pipe_id}: "
                                  "more than was sent")
            pipe.credit += frame.count
            self._watch(pipe)
            return
        if pipe.reads:
            raise StreamError(f"PIPE_DATA for pipe {pipe.pipe_id}, whose data goes the "
                              "other way")
        if pipe.ending or pipe.buffered + len(frame.data) > PIPE_WINDOW:
            raise StreamError(f"PIPE_DATA for pipe {pipe.pipe_id} past its credit or end")
        pipe.buffer.append(memoryview(frame.data))
        pipe.buffered += len(frame.data)
        self._watch(pipe)

    def _known(self, pipe_id: int) -> bool:
        if pipe_id % 2 == self._parity:
            return pipe_id < self._next
        return pipe_id <= self._peer_highest

    # -- I/O on the local ends -----------------------------------------------------------

    def _watch(self, pipe: _Pipe) -> None:
        want = (pipe.credit > 0) if pipe.reads else bool(pipe.buffer)
        if want and not pipe.watching:
            pipe.watching = True
            if pipe.reads:
                self.loop.add_reader(pipe.fd, self._readable, pipe)
            else:
                self.loop.add_writer(pipe.fd, self._writable, pipe)
        elif not want and pipe.watching:
            self._unwatch(pipe)

    def _unwatch(self, pipe: _Pipe) -> None:
        if pipe.watching:
            pipe.watching = False
            if pipe.reads:
                self.loop.remove_reader(pipe.fd)
            else:
                self.loop.remove_writer(pipe.fd)

    def _readable(self, pipe: _Pipe) -> None:
        try:
            data = os.read(pipe.fd, min(pipe.credit, MAX_DATA))
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            self._close(pipe, tell_peer=True)
            return
        pipe.credit -= len(data)
        self.bytes_relayed += len(data)
        self._send([encode(PipeData(pipe.pipe_id, data))])
        self._watch(pipe)

    def _writable(self, pipe: _Pipe) -> None:
        written_total = 0
        while pipe.buffer:
            head = pipe.buffer[0]
            try:
                written = os.write(pipe.fd, head)
            except (BlockingIOError, InterruptedError):
                break
            except OSError as exc:
                if exc.errno != errno.EPIPE:
                    log.info("pipe %d: %s", pipe.pipe_id, exc.strerror or exc)
                # The reader went away: the sender stops.
                self._close(pipe, tell_peer=True)
                return
            written_total += written
            if written == len(head):
                pipe.buffer.popleft()
            else:
                pipe.buffer[0] = head[written:]
        pipe.buffered -= written_total
        self.bytes_relayed += written_total
        if written_total:
            self._send([encode(PipeAck(pipe.pipe_id, written_total))])
        if pipe.ending and not pipe.buffer:
            self._close(pipe, tell_peer=False)
            return
        self._watch(pipe)

    def _close(self, pipe: _Pipe, *, tell_peer: bool) -> None:
        self._unwatch(pipe)
        del self._pipes[pipe.pipe_id]
        with contextlib.suppress(OSError):
            os.close(pipe.fd)
        if tell_peer:
            self._send([encode(PipeClosed(pipe.pipe_id))])

    def discard(self, pipe_id: int) -> None:
        """Let go of a pipe this side adopted but never announced (its message was
        refused): its local end closes, and the peer is told nothing."""
        pipe = self._pipes.get(pipe_id)
        if pipe is not None:
            self._close(pipe, tell_peer=False)

    def close(self) -> None:
        """The stream is gone: every local end closes (its reader sees the end)."""
        for pipe in list(self._pipes.values()):
            self._close(pipe, tell_peer=False)


def _name(frame: PipeData | PipeClosed | PipeAck) -> str:
    return {PipeData: "PIPE_DATA", PipeClosed: "PIPE_END", PipeAck: "PIPE_ACK"}[type(frame)]
