"""Pipe writes the compositor owes its clients: sans-IO, the I/O layer carries them out.

When the compositor itself owns a selection (text from the GUI daemon's
clipboard), a client's ``receive`` hands it the write end of a pipe: the
compositor must write the whole text into it and close it. ``Transfers``
queues such (fd, bytes) pairs; the fd is the queue's from then on. The I/O
layer (``server``) takes them and writes each non-blocking, closing the fd when
all is written, when the reader went away, or at a deadline, so a reader that
never reads holds neither the loop nor the fd. A reader (a client) has at most
``MAX_PER_READER`` transfers open at once: past that its pipes are closed at
once, so a client cannot make the compositor hold its fds by the thousand.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Hashable

log = logging.getLogger("qubesshm.compositor")

# How long one transfer may take before its fd is closed, written or not.
TRANSFER_TIMEOUT = 5.0
# Transfers one reader may have open at once (queued or being written).
MAX_PER_READER = 16


class Transfers:
    """Pipe writes waiting for the I/O layer."""

    def __init__(self, wake: Callable[[], None] | None = None) -> None:
        self._queued: list[tuple[int, bytes]] = []
        self._reader_of: dict[int, Hashable] = {}  # open transfers' fds -> their reader
        self._open: dict[Hashable, int] = {}  # reader -> transfers open
        # Called when a transfer is queued (the I/O layer takes them).
        self.wake = wake

    def queue(self, fd: int, data: bytes, reader: Hashable | None = None) -> bool:
        """Write ``data`` into ``fd`` (ours from now on), then close it. False (``fd``
        closed at once) when ``reader`` already has ``MAX_PER_READER`` open."""
        if reader is not None:
            if self._open.get(reader, 0) >= MAX_PER_READER:
                log.info("%s has %d transfers open: another one is refused", reader,
                         MAX_PER_READER)
                _close(fd)
                return False
            self._open[reader] = self._open.get(reader, 0) + 1
            self._reader_of[fd] = reader
        self._queued.append((fd, bytes(data)))
        if self.wake is not None:
            self.wake()
        return True

    def finished(self, fd: int) -> None:
        """The I/O layer is done with transfer ``fd`` (call before closing it)."""
        reader = self._reader_of.pop(fd, None)
        if reader is not None:
            left = self._open.get(reader, 0) - 1
            if left > 0:
                self._open[reader] = left
            else:
                self._open.pop(reader, None)

    def open_for(self, reader: Hashable) -> int:
        """How many transfers ``reader`` has open."""
        return self._open.get(reader, 0)

    def take(self) -> list[tuple[int, bytes]]:
        """The queued transfers, each to write in full and then close."""
        out, self._queued = self._queued, []
        return out

    @property
    def pending(self) -> int:
        return len(self._queued)

    def close(self) -> None:
        """Drop every queued transfer, closing its fd."""
        for fd, _ in self.take():
            self.finished(fd)
            _close(fd)


def _close(fd: int) -> None:
    with contextlib.suppress(OSError):
        os.close(fd)
