"""What a local fd stands for on the stream, and the local fd that stands for an item.

Both halves meet fds the same two ways. Going out, an fd their local Wayland peer
passed becomes an item: a readable file its bytes (``FILE``), a pipe end a relayed
pipe (``PIPE``, the end kept by ``PipeRelays``); anything else is refused
(``UnsupportedFd``, or ``TooManyPipes``). Coming in, an item becomes a fresh local
fd for the peer: a sealed read-only memfd of the file's bytes, or a stand-in pipe
end. (Pools are the VM side's own: ``vmside`` and ``host`` handle them.)
"""

from __future__ import annotations

import os

from .codec import MAX_FILE, File, Pipe
from .fds import FdKind, classify, read_file, sealed_file
from .pipes import PipeRelays

STAND_IN_FILE_NAME = "qubesshm-remote-file"


def item_for(conn: int, fd: int, pipes: PipeRelays) -> File | Pipe:
    """The item standing for ``fd`` on ``conn`` (the caller still closes ``fd``)."""
    kind = classify(fd)
    if kind is FdKind.FILE:
        return File(conn, read_file(fd, MAX_FILE))
    pipe_id, end = pipes.adopt(os.dup(fd), kind)
    return Pipe(conn, pipe_id, end)


def fd_for(item: File | Pipe, pipes: PipeRelays) -> int:
    """A fresh local fd standing for ``item``, for the local peer (the caller owns it)."""
    if isinstance(item, File):
        return sealed_file(item.data, STAND_IN_FILE_NAME)
    return pipes.stand_in(item.pipe_id, item.end)
