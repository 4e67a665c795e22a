"""``wl_shm``, ``wl_shm_pool`` and ``wl_buffer``: client memory the compositor reads.

Pools and buffers are checked by ``shm.clientpool`` (libwayland's checks and
error codes). A pool is mapped only when the mapping can never fault (sealed
against shrinking, long enough), else its buffers are read with ``preadv``
(the idea of ``ClientPool.mapped``, kept here because this module's mappings
must outlive a pool's growth while the agent still holds arrays over them: an
old mapping is dropped, never closed, and goes when its last view does).

A buffer is *held* from each commit that shows it until the agent rendered
that commit or another buffer replaced it; ``wl_buffer.release`` goes out when
the last hold ends. A pool's fd stays open while the pool, a buffer object, or
any committed surface state needs it, and a moment after (``Compositor.spent``).
"""

from __future__ import annotations

import fcntl
import mmap
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from numpy.typing import NDArray

from ..objects.objectmap import DISPLAY_ID, WaylandObject
from ..pixels.formats import ARGB8888, XRGB8888
from ..shm.clientpool import (
    INVALID_FD,
    INVALID_STRIDE,
    ClientBuffer,
    ClientPool,
    make_buffer,
    open_pool,
    resize_pool,
)
from ..shm.errors import ShmError
from ..wire.codec import ArgValue, ErrorCode, WireError
from .scene import BufferView

if TYPE_CHECKING:
    from .client import ClientCore, Handler

FORMATS = (ARGB8888, XRGB8888)
# Each pool holds an fd; libwayland's fd buffer bounds a client to about this many.
MAX_POOLS_PER_CLIENT = 1024
_F_GET_SEALS = getattr(fcntl, "F_GET_SEALS", 1034)
_F_SEAL_SHRINK = getattr(fcntl, "F_SEAL_SHRINK", 0x0002)


class ShmPool:
    """A client's pool: its fd (``ClientPool``), a mapping when safe, its users."""

    def __init__(self, client: ClientCore, pool: ClientPool) -> None:
        self.client = client
        self.pool = pool
        self.alive = True  # the wl_shm_pool object exists
        self.buffers = 0  # ShmBuffers that still need the fd
        self.closed = False
        self._mapping: mmap.mmap | None = None
        self._mapped_size = -1
        self._unmappable_at = -1

    def mapping(self) -> mmap.mmap | None:
        """A read-only mapping of the whole pool if it can never fault, else None."""
        size = self.pool.size
        if self._mapping is not None and self._mapped_size == size:
            return self._mapping
        if self._unmappable_at == size or self.closed:
            return None
        try:
            seals = fcntl.fcntl(self.pool.fd, _F_GET_SEALS)
            length = os.fstat(self.pool.fd).st_size
        except OSError:
            seals, length = 0, 0
        if not seals & _F_SEAL_SHRINK or length < size:
            self._unmappable_at = size
            return None
        # The old mapping (if any) is left to the arrays still viewing it.
        self._mapping = mmap.mmap(self.pool.fd, size, mmap.MAP_SHARED, mmap.PROT_READ)
        self._mapped_size = size
        return self._mapping

    def release_if_unused(self) -> None:
        """Nothing needs the pool any more: its fd goes to ``Compositor.spent``, to be
        closed once the replies of the request that let go of it went."""
        if not self.alive and self.buffers == 0 and not self.closed:
            self.closed = True
            self._mapping = None
            self.client.compositor.spent.add(self.pool)

    def close(self) -> None:
        self.closed = True
        self._mapping = None
        self.pool.close()


@dataclass(eq=False)
class ShmBuffer:
    """A ``wl_buffer`` of a client pool."""

    client: ClientCore
    id: int
    pool: ShmPool
    data: ClientBuffer
    alive: bool = True  # the wl_buffer object exists
    holds: int = 0  # committed states that have not released it
    uses: int = 0  # committed states showing it (released or not)
    _pool_let_go: bool = False

    def committed(self) -> None:
        """A commit shows this buffer: held until released."""
        self.holds += 1
        self.uses += 1

    def release(self) -> None:
        """One commit that showed it is done with it (rendered or replaced)."""
        self.holds -= 1
        assert self.holds >= 0
        if self.holds == 0 and self.alive:
            self.client.send(self.id, "release")

    def forget(self) -> None:
        """A committed state that showed it shows something else now."""
        self.uses -= 1
        assert self.uses >= 0
        self._let_go_of_pool()

    def destroyed(self) -> None:
        self.alive = False
        self._let_go_of_pool()

    def _let_go_of_pool(self) -> None:
        if not self.alive and self.uses == 0 and not self._pool_let_go:
            self._pool_let_go = True
            self.pool.buffers -= 1
            self.pool.release_if_unused()

    def view(self) -> BufferView:
        data = self.data
        return BufferView(data.width, data.height, data.stride, data.format, self._pixels)

    def _pixels(self) -> NDArray[np.uint32]:
        data = self.data
        words = data.height * data.stride // 4
        shape = (data.height, data.stride // 4)
        if self.pool.closed:
            # The client is gone, or moved on long ago: nothing to read any more.
            empty = np.zeros(shape, dtype=np.uint32)
            empty.flags.writeable = False
            return empty
        mapped = self.pool.mapping()
        if mapped is not None:
            return np.frombuffer(mapped, dtype=np.uint32, count=words,
                                 offset=data.offset).reshape(shape)
        copy = np.zeros(words, dtype=np.uint32)
        want = words * 4
        try:
            got = os.preadv(self.pool.pool.fd, [copy.data.cast("B")], data.offset)
        except OSError as exc:
            got = want
            self._fault(f"error accessing SHM buffer: {exc.strerror or exc}")
        if got < want:
            self._fault(f"error accessing SHM buffer: the client's file is shorter than "
                        f"its buffer ({got} of {want} bytes)")
        copy.flags.writeable = False
        return copy.reshape(shape)

    def _fault(self, message: str) -> None:
        # libwayland-server's answer to a SIGBUS in a shm buffer, on the buffer.
        obj = self.id if self.alive else DISPLAY_ID
        code = INVALID_FD if self.alive else ErrorCode.INVALID_METHOD
        self.client.compositor.fault(self.client, obj, code, message)


# -- requests -------------------------------------------------------------------


def bind_shm(client: ClientCore, object_id: int, version: int) -> None:
    for code in FORMATS:
        client.send(object_id, "format", code)


def create_pool(client: ClientCore, obj: WaylandObject, args: list[ArgValue],
                fds: list[int]) -> None:
    new_id, fd, size = args
    assert isinstance(new_id, int) and isinstance(fd, int) and isinstance(size, int)
    client.pools = {p for p in client.pools if not p.closed}
    if len(client.pools) >= MAX_POOLS_PER_CLIENT:
        raise WireError(f"qubesshm: too many wl_shm pools: a client may hold "
                        f"{MAX_POOLS_PER_CLIENT} at once", ErrorCode.NO_MEMORY, DISPLAY_ID)
    pool = open_pool(new_id, fd, size, obj.id)
    fds.remove(fd)  # the pool owns it now
    shm_pool = ShmPool(client, pool)
    client.resources[new_id] = shm_pool
    client.pools.add(shm_pool)


def create_buffer(client: ClientCore, obj: WaylandObject, args: list[ArgValue],
                  fds: list[int]) -> None:
    new_id, offset, width, height, stride, format_code = args
    assert isinstance(new_id, int) and isinstance(offset, int) and isinstance(width, int)
    assert isinstance(height, int) and isinstance(stride, int)
    assert isinstance(format_code, int)
    pool = client.resource(obj.id, ShmPool)
    data = make_buffer(pool.pool, new_id, offset, width, height, stride, format_code,
                       set(FORMATS))
    if stride % 4:
        # Every format offered has 32-bit pixels: rows must start on a pixel.
        raise ShmError(obj.id, INVALID_STRIDE, f"invalid stride {stride}: not a multiple "
                       "of 4 for a 32-bit format")
    pool.buffers += 1
    client.resources[new_id] = ShmBuffer(client, new_id, pool, data)


def resize(client: ClientCore, obj: WaylandObject, args: list[ArgValue],
           fds: list[int]) -> None:
    size = args[0]
    assert isinstance(size, int)
    resize_pool(client.resource(obj.id, ShmPool).pool, size)


def destroy_pool(client: ClientCore, obj: WaylandObject, args: list[ArgValue],
                 fds: list[int]) -> None:
    pool = client.resource(obj.id, ShmPool)
    pool.alive = False
    pool.release_if_unused()


def destroy_buffer(client: ClientCore, obj: WaylandObject, args: list[ArgValue],
                   fds: list[int]) -> None:
    buffer = client.resource(obj.id, ShmBuffer)
    client.compositor.buffer_destroyed(client, buffer)
    buffer.destroyed()


def release_shm(client: ClientCore, obj: WaylandObject, args: list[ArgValue],
                fds: list[int]) -> None:
    """``wl_shm.release`` (version 2): the object goes; its pools stay."""


def close_client_pools(client: ClientCore) -> None:
    """The client is gone: every pool fd it had is closed (its spent ones too)."""
    for pool in client.pools:
        if not pool.closed:
            pool.close()
    client.pools.clear()
    client.compositor.spent.close()


HANDLERS: dict[tuple[str, str], Handler] = {
    ("wl_shm", "create_pool"): create_pool,
    ("wl_shm", "release"): release_shm,
    ("wl_shm_pool", "create_buffer"): create_buffer,
    ("wl_shm_pool", "resize"): resize,
    ("wl_shm_pool", "destroy"): destroy_pool,
    ("wl_buffer", "destroy"): destroy_buffer,
}
