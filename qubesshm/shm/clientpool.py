"""The client's ``wl_shm`` pools and buffers, as the proxy holds them.

A client pool is an fd and a size, mapped lazily at its second commit (a pool
that is never attached, as Xwayland makes many, costs one fd; one drawn into once,
as a churning window's or a popup's, is read once: a mapping, its page faults and
its unmapping cost more than one ``preadv``) and only when the mapping can never
fault: the file is sealed against shrinking and long enough for the pool. Any
other file is read with ``preadv``, since a client may truncate it at any moment
and a mapping would then kill the proxy with SIGBUS.
The checks are libwayland's, with its error codes and wording.
"""

from __future__ import annotations

import fcntl
import mmap
import os
import stat
from dataclasses import dataclass, field

from ..pixels.formats import bytes_per_pixel, single_plane
from .errors import ShmError

# wl_shm.error
INVALID_FORMAT = 0
INVALID_STRIDE = 1
INVALID_FD = 2
_INT32_MAX = 2**31 - 1
# Pools nothing needs any more have their fds closed this long after the batch that
# let go of them, off the path of the replies the client waits for: closing the last
# fd of a pool's file frees its pages (60-100 us for a 400x300 window's pool). At most
# this many wait; at this many they are closed at once.
SPENT_POOL_DELAY = 0.002
MAX_SPENT_POOLS = 64
# fcntl.F_GET_SEALS and F_SEAL_SHRINK, where the fcntl module lacks them.
_F_GET_SEALS = getattr(fcntl, "F_GET_SEALS", 1034)
_F_SEAL_SHRINK = getattr(fcntl, "F_SEAL_SHRINK", 0x0002)


@dataclass(eq=False)
class ClientPool:
    """A client's ``wl_shm_pool``: its fd, its size, and who still needs it."""

    client_id: int
    fd: int
    size: int
    shm_id: int  # the client's wl_shm it came from: output pools are made on it too
    alive: bool = True  # the client has not destroyed it
    buffers: set[int] = field(default_factory=set)  # client ids of its live buffers

    @property
    def needed(self) -> bool:
        return self.alive or bool(self.buffers)

    mapping: mmap.mmap | None = None
    # Whether the file was found unmappable (not sealed, or too short) at this size.
    unmappable_at: int = -1
    # A commit was copied from the pool: the next ones may map it.
    copied: bool = False

    def mapped(self) -> mmap.mmap | None:
        """A read-only mapping of the pool for a commit's copy, if it can never fault
        and a commit was copied from the pool before; else None: read it."""
        if self.mapping is not None:
            return self.mapping
        if not self.copied:
            self.copied = True
            return None
        if self.unmappable_at == self.size:
            return None
        try:
            seals = fcntl.fcntl(self.fd, _F_GET_SEALS)
            length = os.fstat(self.fd).st_size
        except OSError:
            seals, length = 0, 0
        if not seals & _F_SEAL_SHRINK or length < self.size:
            self.unmappable_at = self.size
            return None
        self.mapping = mmap.mmap(self.fd, self.size, mmap.MAP_SHARED, mmap.PROT_READ)
        return self.mapping

    def grow(self, size: int) -> None:
        self.size = size
        if self.mapping is not None:
            self.mapping.close()
            self.mapping = None

    def close(self) -> None:
        if self.mapping is not None:
            self.mapping.close()
            self.mapping = None
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


@dataclass(eq=False)
class ClientBuffer:
    """A ``wl_buffer`` the client made from one of its pools."""

    client_id: int
    pool: ClientPool
    offset: int
    width: int
    height: int
    stride: int
    format: int
    alive: bool = True

    @property
    def key(self) -> tuple[int, int, int, int]:
        """What an output buffer must match to take this buffer's pixels."""
        return self.width, self.height, self.stride, self.format


class SpentPools:
    """Pools nothing needs any more, fds still open. Closing a pool's last fd frees its
    pages, which no reply should wait for: the I/O layer calls ``close``
    ``SPENT_POOL_DELAY`` after the replies went; at ``MAX_SPENT_POOLS`` they are closed
    at once."""

    def __init__(self) -> None:
        self.pools: list[ClientPool] = []

    def __bool__(self) -> bool:
        return bool(self.pools)

    def add(self, pool: ClientPool) -> None:
        self.pools.append(pool)
        if len(self.pools) >= MAX_SPENT_POOLS:
            self.close()

    def close(self) -> None:
        pools, self.pools = self.pools, []
        for pool in pools:
            pool.close()


def open_pool(client_id: int, fd: int, size: int, shm_id: int) -> ClientPool:
    """``wl_shm.create_pool``; takes ownership of ``fd`` unless it raises."""
    if size <= 0:
        raise ShmError(shm_id, INVALID_STRIDE, f"invalid size ({size})")
    try:
        st = os.fstat(fd)
    except OSError as exc:
        raise ShmError(shm_id, INVALID_FD, f"failed mmap fd {fd}: {exc.strerror}") from exc
    # The proxy reads with preadv, which works on files and shared memory only.
    if not stat.S_ISREG(st.st_mode):
        raise ShmError(shm_id, INVALID_FD, f"failed mmap fd {fd}: not a regular file "
                       "or shared memory object")
    flags = fcntl.fcntl(fd, fcntl.F_GETFL)
    if flags & os.O_ACCMODE == os.O_WRONLY:
        raise ShmError(shm_id, INVALID_FD, f"failed mmap fd {fd}: not open for reading")
    return ClientPool(client_id, fd, size, shm_id)


def resize_pool(pool: ClientPool, size: int) -> None:
    """``wl_shm_pool.resize``: a pool may only grow."""
    if size < pool.size:
        raise ShmError(pool.client_id, INVALID_FD, "shrinking pool invalid")
    pool.grow(size)


def make_buffer(pool: ClientPool, client_id: int, offset: int, width: int, height: int,
                stride: int, format_code: int, formats: set[int]) -> ClientBuffer:
    """``wl_shm_pool.create_buffer``, checked as libwayland checks it."""
    if format_code not in formats or not single_plane(format_code):
        raise ShmError(pool.client_id, INVALID_FORMAT, f"invalid format 0x{format_code:x}")
    if (offset < 0 or width <= 0 or height <= 0 or stride < width
            or _INT32_MAX // stride <= height or offset > pool.size - stride * height):
        raise ShmError(pool.client_id, INVALID_STRIDE, f"invalid width, height or stride "
                       f"({width}x{height}, {stride})")
    bpp = bytes_per_pixel(format_code)
    # libwayland leaves this to the renderer; a row longer than the stride would
    # make the proxy read past the buffer.
    if bpp is not None and stride < width * bpp:
        raise ShmError(pool.client_id, INVALID_STRIDE, f"invalid stride {stride} for "
                       f"{width} pixels of {bpp} bytes")
    buffer = ClientBuffer(client_id, pool, offset, width, height, stride, format_code)
    pool.buffers.add(client_id)
    return buffer
