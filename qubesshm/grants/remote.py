"""The mapping half seen from the VM when it lives in another domain (a split proxy).

In a split proxy (``serve --remote``) the VM side shares pages and the host side,
beside the compositor, maps them. The VM side keeps every decision (which area
backs which buffer, the cache, the limits, when to end a grant); what it would
have mapped becomes a *pool*: ``(domid, refs, size, notify offset)``, sent on the
stream where the compositor's pool fd would travel. ``RemoteMappingHalf`` stands
in for ``MappingHalf`` on that side: each mapping is such a pool, with a
placeholder fd (an empty memfd) that the session passes around as the pool fd and
the stream recognises by its inode and replaces with the pool's description.
Unmapping a pool tells the host, on that pool's connection, to let go of it.

All areas of the stream share one event channel: the VM side allocates one port
for the host's domain at start, the host binds it and arms every mapping's notify
with it and the area's notify byte (``RemoteLifetimes``).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from .api import PAGE_SIZE, MappedArea
from .ledger import ClientCounters
from .lifetimes import Area, GrantLifetimes, Halves, LifetimePolicy, _Connection
from .mapping import Mapping, MappingHalf

FileKey = tuple[int, int]


@dataclass(eq=False)
class RemotePool(Mapping):
    """A pool the host maps: the placeholder fd is ``area.fd``."""

    pool_id: int = 0
    domid: int = 0
    notify_offset: int = 0
    # The connection its description was sent on, once it was.
    conn: int = 0

    @property
    def refs(self) -> tuple[int, ...]:
        return tuple(ref for _, ref in self.area.grants)


class RemoteMappingHalf(MappingHalf):
    """Mappings made by the host, on the VM side: pools described, not mapped."""

    def __init__(self) -> None:
        self._next_id = 1
        self._pools: dict[FileKey, RemotePool] = {}
        # Told when a pool is let go (the stream sends UNMAP on its connection).
        self.on_unmap: Callable[[RemotePool], None] | None = None

    @property
    def pools(self) -> int:
        return len(self._pools)

    def map(self, domid: int, refs: Sequence[int], *, notify_byte: int | None = None,
            notify_port: int | None = None) -> Mapping:
        pages = len(refs)
        if notify_byte is None or not 0 <= notify_byte < pages * PAGE_SIZE:
            raise OSError(22, "a pool for the host needs a notify byte inside it")
        placeholder = os.memfd_create("qubesshm-remote-pool", os.MFD_CLOEXEC)
        st = os.fstat(placeholder)
        pool = RemotePool(MappedArea(0, tuple((domid, ref) for ref in refs), placeholder,
                                     True), pages, pool_id=self._next_id, domid=domid,
                          notify_offset=notify_byte)
        self._next_id += 1
        self._pools[(st.st_dev, st.st_ino)] = pool
        return pool

    def describe(self, fd: int) -> RemotePool | None:
        """The pool whose placeholder ``fd`` is a copy of, if it is one."""
        if not self._pools:
            return None
        st = os.fstat(fd)
        return self._pools.get((st.st_dev, st.st_ino))

    def unmap(self, mapping: Mapping) -> None:
        assert isinstance(mapping, RemotePool)
        st = os.fstat(mapping.area.fd)
        self._pools.pop((st.st_dev, st.st_ino), None)
        os.close(mapping.area.fd)
        mapping.area.released = True
        if self.on_unmap is not None:
            self.on_unmap(mapping)

    def connect_channel(self, domid: int, port: int) -> int:
        raise AssertionError("the host binds the stream's one event channel")

    def close_channel(self, port: int) -> None:
        """The host's port is the stream's, unbound when the stream ends."""

    def close(self) -> None:
        for pool in list(self._pools.values()):
            os.close(pool.area.fd)
            pool.area.released = True
        self._pools.clear()


class RemoteLifetimes(GrantLifetimes):
    """``GrantLifetimes`` whose connections all notify on the stream's one port."""

    def __init__(self, halves: Halves, port: int, policy: LifetimePolicy | None = None, *,
                 clock: Callable[[], float]) -> None:
        super().__init__(halves, policy, clock=clock)
        self.port = port

    def open_connection(self, owner: int, destroy_upstream: Callable[[Area], None],
                        counters: Sequence[ClientCounters]) -> None:
        self._connections[owner] = _Connection(
            owner, tuple(counters), destroy_upstream=destroy_upstream, vm_port=self.port,
            gui_port=0)

    def _forgotten(self, conn: _Connection) -> None:
        """The stream's port outlives each connection: closed with the stream."""
