"""The sharing half: grant pages for output buffers, and end them when done.

This is the VM's side (gntalloc). It knows client buffers and grant refs, never
the compositor: it hands the mapping half only ``(domid, refs)``. A grant that
cannot be made (the gntalloc ``limit``, a full grant table) is a
``GrantUnavailable`` whose text names the limit and how to raise it.
"""

from __future__ import annotations

import errno
import logging
from collections.abc import Sequence
from dataclasses import dataclass

from .api import PAGE_SIZE, GrantBackend, SharedArea, Unshared

log = logging.getLogger("qubesshm.grants")


class GrantUnavailable(Exception):
    """Pages could not be granted; the message says which limit and how to raise it.
    ``transient``: a limit that pages ended later make room under (``ENOSPC``)."""

    def __init__(self, message: str, *, transient: bool = False) -> None:
        super().__init__(message)
        self.transient = transient


@dataclass(eq=False)
class Grant:
    """Pages this side granted for one output buffer."""

    area: SharedArea
    pages: int
    granter: int  # the sharing domain: the mapping half maps (granter, ref)

    @property
    def refs(self) -> tuple[int, ...]:
        return self.area.refs


class SharingHalf:
    """Grants pages to the mapping domain and ends them."""

    def __init__(self, backend: GrantBackend, own_domid: int, peer_domid: int) -> None:
        self.backend = backend
        self.own_domid = own_domid
        self.peer_domid = peer_domid

    def share(self, size: int) -> Grant:
        """Writable pages covering ``size`` bytes, granted to the mapping domain."""
        pages = max(1, -(-size // PAGE_SIZE))
        try:
            area = self.backend.share(self.peer_domid, pages, writable=True)
        except OSError as exc:
            if exc.errno == errno.ENOSPC:
                limit = self._limit()
                # gntalloc says ENOSPC for its own limit and for a full grant table.
                raise GrantUnavailable(
                    f"cannot grant {pages} pages ({size} bytes) for a buffer: "
                    f"{exc.strerror}; either the gntalloc limit ({limit} pages) is reached "
                    "(raise it with --gntalloc-limit N or qubesshm tune --gntalloc-limit N) "
                    "or the domain's grant table is full (grants waiting on the deferred "
                    "list keep their entries)", transient=True) from exc
            raise GrantUnavailable(f"cannot grant {pages} pages for a buffer: "
                                   f"{exc.strerror or exc}") from exc
        return Grant(area, pages, self.own_domid)

    def _limit(self) -> str:
        try:
            value = self.backend.status().gntalloc_limit
        except OSError:
            value = None
        return "unknown" if value is None else str(value)

    # -- the unmap-notify byte and event channel ---------------------------------

    @staticmethod
    def set_notify_byte(grant: Grant, offset: int) -> None:
        """Arm the byte the mapping side's unmap notify will clear."""
        grant.area.memory[offset] = 1

    @staticmethod
    def notify_byte_cleared(grant: Grant, offset: int) -> bool:
        """The mapping side let go of ``grant``: its notify cleared the byte."""
        return grant.area.memory[offset] == 0

    def open_channel(self) -> int:
        """A local event channel port the mapping domain binds its notifies to."""
        return self.backend.bind_unbound_port(self.peer_domid)

    def close_channel(self, port: int) -> None:
        self.backend.unbind(port)

    def event_fd(self) -> int:
        return self.backend.event_fd()

    def fired_ports(self) -> list[int]:
        return self.backend.fired_ports()

    def unmask(self, ports: Sequence[int]) -> None:
        self.backend.unmask(ports)

    def end(self, grant: Grant) -> Unshared:
        """Let go of the pages: they end now, or go to the kernel's deferred reclaim."""
        outcome = self.backend.unshare(grant.area)
        if outcome is Unshared.DEFERRED:
            log.debug("grants %d..: %d pages still mapped, deferred", grant.refs[0], grant.pages)
        return outcome
