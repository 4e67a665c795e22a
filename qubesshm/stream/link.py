"""The I/O of the stream itself: frames read from one fd, frames written to another.

Both halves drive one ``StreamLink`` on the event loop: on the VM side the pipes
of the command that reaches the other half (or a connected socket), on the host
side its stdin and stdout (so it can be a qrexec service). Bytes read are decoded
(``codec.Decoder``) and each frame goes to the side's handler; frames to send are
queued and written as the fd takes them. A malformed stream ends it: the peer is
sent an ``ERROR`` frame naming the fault, and the handler is told why.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
from collections import deque
from collections.abc import Callable

from .codec import Decoder, Error, Frame, StreamError, encode, fit_text

log = logging.getLogger("qubesshm.stream")

READ_SIZE = 256 * 1024
READS_PER_WAKE = 8
WRITE_SIZE = 1024 * 1024


class StreamLink:
    """One end of the stream between the halves."""

    def __init__(self, loop: asyncio.AbstractEventLoop, read_fd: int, write_fd: int, *,
                 on_frame: Callable[[Frame], None],
                 on_end: Callable[[str | None], None]) -> None:
        """``on_frame`` gets each frame; ``on_end`` once, with None at a clean end of
        the stream or the one-line reason it ended otherwise."""
        self.loop = loop
        self.read_fd = read_fd
        self.write_fd = write_fd
        os.set_blocking(read_fd, False)
        os.set_blocking(write_fd, False)
        self.on_frame = on_frame
        self.on_end = on_end
        self._decoder = Decoder()
        self._out: deque[memoryview] = deque()
        self.queued = 0  # bytes waiting to be written
        self.bytes_in = 0
        self.bytes_out = 0
        self.frames_in = 0
        self.ended = False
        self._writing = False
        self._mid_frame = False  # the head of the queue is the rest of a frame
        # The peer closed its reading end: nothing more is written, and what it wrote
        # before is still read (it may say why it went, or break the protocol).
        self._peer_gone = False
        self._in_readable = False
        loop.add_reader(read_fd, self._readable)

    # -- writing -------------------------------------------------------------------

    def send(self, frames: list[bytes]) -> None:
        """Queue encoded frames and write what the fd takes now."""
        if self.ended or not frames:
            return
        for data in frames:
            self._out.append(memoryview(data))
            self.queued += len(data)
        self._flush()

    def send_frame(self, frame: Frame) -> None:
        self.send([encode(frame)])

    def _flush(self) -> None:
        if self._peer_gone:
            self._out.clear()
            self.queued = 0
            return
        while self._out:
            chunks: list[memoryview] = []
            size = 0
            for chunk in self._out:
                chunks.append(chunk)
                size += len(chunk)
                if size >= WRITE_SIZE or len(chunks) >= 512:
                    break
            try:
                written = os.writev(self.write_fd, chunks)
            except (BlockingIOError, InterruptedError):
                break
            except (BrokenPipeError, ConnectionResetError):
                # The peer closed its end: an end of the stream, once what it wrote
                # before it went has been read (a host that exits at once may have
                # written its reason, or garbage, first).
                self._peer_gone = True
                self._out.clear()
                self.queued = 0
                if self._writing:
                    self._writing = False
                    self.loop.remove_writer(self.write_fd)
                if not self._in_readable:  # else the read in progress goes on to EOF
                    self._read_rest()
                return
            except OSError as exc:
                self._end(f"the stream cannot be written: {exc.strerror or exc}")
                return
            self.bytes_out += written
            self.queued -= written
            while written:
                head = self._out[0]
                if written >= len(head):
                    self._out.popleft()
                    written -= len(head)
                    self._mid_frame = False
                else:
                    self._out[0] = head[written:]
                    self._mid_frame = True
                    written = 0
        if self._out and not self._writing:
            self._writing = True
            self.loop.add_writer(self.write_fd, self._flush)
        elif not self._out and self._writing:
            self._writing = False
            self.loop.remove_writer(self.write_fd)

    # -- reading -------------------------------------------------------------------

    def _read_rest(self) -> None:
        """Read what the peer left in the stream, then end (at its EOF, or now)."""
        self._in_readable = True
        try:
            while not self.ended:
                before = self.bytes_in
                self._read_some()
                if not self.ended and self.bytes_in == before:
                    self._end(None)
        finally:
            self._in_readable = False

    def _readable(self) -> None:
        self._in_readable = True
        try:
            self._read_some()
        finally:
            self._in_readable = False
        if self._peer_gone and not self.ended:
            self._read_rest()

    def _read_some(self) -> None:
        for _ in range(READS_PER_WAKE):
            if self.ended:
                return
            try:
                data = os.read(self.read_fd, READ_SIZE)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno == errno.ECONNRESET:
                    data = b""
                else:
                    self._end(f"the stream cannot be read: {exc.strerror or exc}")
                    return
            if not data:
                try:
                    self._decoder.eof()
                except StreamError as exc:
                    self._end(f"the stream ended inside a frame: {exc}")
                    return
                self._end(None)
                return
            self.bytes_in += len(data)
            try:
                frames = self._decoder.feed(data)
            except StreamError as exc:
                self.fail(str(exc))
                return
            for frame in frames:
                if self.ended:
                    return
                self.frames_in += 1
                try:
                    self.on_frame(frame)
                except StreamError as exc:
                    self.fail(str(exc))
                    return
            if len(data) < READ_SIZE:
                return

    # -- ending ---------------------------------------------------------------------

    def fail(self, reason: str) -> None:
        """The peer broke the protocol: tell it (best effort) and end."""
        self.abort(reason, f"the other half broke the protocol: {reason}")

    def abort(self, reason: str, ending: str | None = None) -> None:
        """This side cannot go on: tell the peer ``reason`` (best effort) and end with
        ``ending`` (default: the same reason)."""
        if self.ended:
            return
        self._out.clear()
        if not self._mid_frame:
            with contextlib.suppress(OSError):
                os.write(self.write_fd, encode(Error(fit_text(reason))))
        self._end(reason if ending is None else ending)

    def _end(self, reason: str | None) -> None:
        if self.ended:
            return
        self.ended = True
        self.loop.remove_reader(self.read_fd)
        if self._writing:
            self.loop.remove_writer(self.write_fd)
            self._writing = False
        self.on_end(reason)

    def close(self) -> None:
        """Stop: nothing more is read or written (what is queued is dropped)."""
        if not self.ended:
            self.ended = True
            self.loop.remove_reader(self.read_fd)
            if self._writing:
                self.loop.remove_writer(self.write_fd)
        self._out.clear()
        self.queued = 0

    async def drain(self, timeout: float) -> None:
        """Wait (at most ``timeout`` s) for what is queued to be written."""
        deadline = self.loop.time() + timeout
        while self._out and not self.ended and self.loop.time() < deadline:
            await asyncio.sleep(0.01)
