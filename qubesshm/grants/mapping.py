"""The mapping half: map granted pages and give the compositor a pool fd for them.

This is the GUI domain's side (gntdev). It receives only ``(domid, refs)`` from
the sharing half, maps them to a fresh fd that a compositor can mmap at offset 0
(exactly ``pages x 4096`` bytes: a gntdev mapping can never grow), and keeps that
mapping until the upstream pool and buffer made from it are gone.
"""

from __future__ import annotations

import os
import socket
import struct
from collections.abc import Sequence
from dataclasses import dataclass

from .api import PAGE_SIZE, GrantBackend, MappedArea, UnmapNotify


@dataclass(eq=False)
class Mapping:
    area: MappedArea
    pages: int

    @property
    def size(self) -> int:
        return self.pages * PAGE_SIZE

    def pool_fd(self) -> int:
        """A new fd for the compositor's ``wl_shm.create_pool`` (the transport closes it)."""
        return os.dup(self.area.fd)


class MappingHalf:
    """Maps refs granted by the sharing domain."""

    def __init__(self, backend: GrantBackend) -> None:
        self.backend = backend

    def map(self, domid: int, refs: Sequence[int], *, notify_byte: int | None = None,
            notify_port: int | None = None) -> Mapping:
        """Map the refs; with a notify, the byte is cleared and the port signalled
        once this side's hold and every process's mmap of them are gone."""
        area = self.backend.map([(domid, ref) for ref in refs], writable=True)
        if notify_byte is not None or notify_port is not None:
            try:
                self.backend.set_map_notify(area, UnmapNotify(notify_byte, notify_port))
            except OSError:
                self.backend.unmap(area)
                raise
        return Mapping(area, len(refs))

    def connect_channel(self, domid: int, port: int) -> int:
        """A local port connected to the sharing domain's ``port``."""
        return self.backend.bind_interdomain(domid, port)

    def close_channel(self, port: int) -> None:
        self.backend.unbind(port)

    def unmap(self, mapping: Mapping) -> None:
        self.backend.unmap(mapping.area)

    def close(self) -> None:
        """Nothing of its own to let go: its mappings are the backend's."""


def peer_pid(sock: socket.socket) -> int | None:
    """The pid of the process at the other end of a Unix socket (SO_PEERCRED)."""
    try:
        creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    except OSError:
        return None
    pid, _, _ = struct.unpack("3i", creds)
    return pid or None
