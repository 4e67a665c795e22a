"""The grant layer's one interface: sharing pages, mapping them, event channels, tuning.

Two roles meet here. The *sharing* side (what ``/dev/xen/gntalloc`` does in a VM)
grants pages to another domain and later ends the grants; a grant that is still
mapped cannot end and goes to the kernel's deferred reclaim. The *mapping* side
(what ``/dev/xen/gntdev`` does in the GUI domain) maps granted pages and hands out
a fresh fd, mmappable at offset 0, that a compositor can take as a ``wl_shm``
pool. Nothing above this module knows whether a simulated hypervisor or real Xen
is underneath; failures are ``OSError`` with the errno the kernel would give.
"""

from __future__ import annotations

import enum
import mmap
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass

PAGE_SIZE = mmap.PAGESIZE


class Unshared(enum.Enum):
    """What ending a shared area's grants did."""

    ENDED = "ended"  # every grant ended at once; the pages are free
    DEFERRED = "deferred"  # some were still mapped and went to deferred reclaim
    # Real gntalloc ends or defers on its own and does not say which.
    UNREPORTED = "unreported"


@dataclass(frozen=True, slots=True)
class UnmapNotify:
    """What to do when a side's last mapping of an area goes away."""

    clear_byte: int | None = None  # offset in the area of a byte to zero
    event_port: int | None = None  # local event channel port to signal


@dataclass(eq=False)
class SharedArea:
    """Pages this domain granted to ``domid``; ``memory`` is our writable view."""

    index: int
    domid: int
    refs: tuple[int, ...]
    writable: bool
    memory: mmap.mmap
    notify: UnmapNotify | None = None
    released: bool = False

    @property
    def size(self) -> int:
        return len(self.refs) * PAGE_SIZE


@dataclass(eq=False)
class MappedArea:
    """Foreign pages mapped here; ``fd`` maps them at offset 0 in any process."""

    index: int
    grants: tuple[tuple[int, int], ...]  # (domid, ref) per page
    fd: int
    writable: bool
    notify: UnmapNotify | None = None
    released: bool = False

    @property
    def size(self) -> int:
        return len(self.grants) * PAGE_SIZE


@dataclass(frozen=True, slots=True)
class ReclaimStatus:
    """Module parameters and counters, None where the kernel does not show them."""

    free_per_iteration: int | None
    gntalloc_limit: int | None
    deferred_count: int | None
    leaked_count: int | None
    deferred_pages_bytes: int | None = None


class GrantBackend(ABC):
    """One domain's view of grant tables and event channels."""

    name: str

    # -- sharing side (gntalloc) ------------------------------------------------

    @abstractmethod
    def share(self, domid: int, count: int, *, writable: bool = True) -> SharedArea:
        """Grant ``count`` fresh pages to ``domid``."""

    @abstractmethod
    def set_share_notify(self, area: SharedArea, notify: UnmapNotify) -> None:
        """Act when this side's mapping of ``area`` goes (at ``unshare``)."""

    @abstractmethod
    def unshare(self, area: SharedArea) -> Unshared:
        """Let go of ``area``: its grants end now, or go to deferred reclaim."""

    # -- mapping side (gntdev) --------------------------------------------------

    @abstractmethod
    def map(self, grants: Sequence[tuple[int, int]], *, writable: bool = True) -> MappedArea:
        """Map foreign pages; the result's ``fd`` is a fresh fd mmappable at offset 0."""

    @abstractmethod
    def set_map_notify(self, area: MappedArea, notify: UnmapNotify) -> None:
        """Act when the last mapping of ``area`` goes, in any process."""

    @abstractmethod
    def unmap(self, area: MappedArea) -> None:
        """Drop this side's hold on ``area`` and close its fd."""

    @abstractmethod
    def watch(self, pid: int) -> None:
        """Count process ``pid``'s mmaps of this domain's mappings (a compositor given
        their fds) as mappings. Only a simulated kernel must be told: Xen's gntdev sees
        them itself."""

    # -- event channels -----------------------------------------------------------

    @abstractmethod
    def bind_unbound_port(self, remote_domid: int) -> int:
        """A fresh local port that ``remote_domid`` may bind to."""

    @abstractmethod
    def bind_interdomain(self, remote_domid: int, remote_port: int) -> int:
        """A local port connected to ``remote_port`` of ``remote_domid``."""

    @abstractmethod
    def unbind(self, port: int) -> None: ...

    @abstractmethod
    def notify(self, port: int) -> None:
        """Signal the other end of local ``port``."""

    @abstractmethod
    def event_fd(self) -> int:
        """Readable when a local port has fired."""

    @abstractmethod
    def fired_ports(self) -> list[int]:
        """Ports that fired since the last call; each stays masked until ``unmask``."""

    @abstractmethod
    def unmask(self, ports: Sequence[int]) -> None: ...

    # -- tuning -------------------------------------------------------------------

    @abstractmethod
    def status(self) -> ReclaimStatus: ...

    def gntalloc_limit(self) -> int | None:
        """``status().gntalloc_limit`` alone: the one parameter read as each buffer
        is made, without reading the others."""
        return self.status().gntalloc_limit

    @abstractmethod
    def set_free_per_iteration(self, value: int) -> None: ...

    @abstractmethod
    def set_gntalloc_limit(self, value: int) -> None: ...

    @abstractmethod
    def close(self) -> None: ...
