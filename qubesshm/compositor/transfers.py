"""Pipe writes the compositor owes its clients: sans-IO, the I/O layer carries them out.

When the compositor itself owns a selection (text from the GUI daemon's
clipboard), a client's ``receive`` hands it the write end of a pipe: the
compositor must write the whole text into it and close it. ``Transfers``
queues such (fd, bytes) pairs; the fd is the queue's from then on. The I/O
layer (``server``) takes them and writes each non-blocking, closing the fd when
all is written, when the reader went away, or at a deadline, so a reader that
never reads holds neither the loop nor the fd.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable

# How long one transfer may take before its fd is closed, written or not.
TRANSFER_TIMEOUT = 5.0


class Transfers:
    """Pipe writes waiting for the I/O layer."""

    def __init__(self, wake: Callable[[], None] | None = None) -> None:
        self._queued: list[tuple[int, bytes]] = []
        # Called when a transfer is queued (the I/O layer takes them).
        self.wake = wake

    def queue(self, fd: int, data: bytes) -> None:
        """Write ``data`` into ``fd`` (ours from now on), then close it."""
        self._queued.append((fd, bytes(data)))
        if self.wake is not None:
            self.wake()

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
            with contextlib.suppress(OSError):
                os.close(fd)
