"""The host half's grant backend in the simulation: dom0 maps through the VM's hypervisor.

When the proxy is split in two processes, the simulated hypervisor lives in the
VM side's process (domain 1, which boots it and serves ``hypercalls`` on
``<kernel dir>/hypervisor.sock``); the host side (domain 0) is another process, as
dom0 is another domain. ``ForeignBackend`` is that host's ``GrantBackend``: the
mapping side only, over a ``ForeignMapper`` connection. It maps the VM's grants
with gntdev's semantics (a fresh fd per mapping, mmappable at offset 0, that the
compositor is handed as a pool), arms gntdev's unmap notify (clear a byte, signal
an event channel bound to the port the VM left unbound), and tells the hypervisor
which process is the compositor (``watch``), whose mmaps then hold the grants too.

What it cannot do says so: sharing pages, allocating unbound ports and tuning are
the VM side's (``EOPNOTSUPP``); and no event reaches this domain in the split (the
VM never signals the host), so its event fd never fires. Closing it closes the
connection, and the hypervisor lets go of all it mapped and bound.
"""

from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import Sequence
from pathlib import Path

from .api import GrantBackend, MappedArea, ReclaimStatus, SharedArea, UnmapNotify, Unshared
from .hypercalls import (
    ForeignKernelError,
    ForeignMapper,
    ForeignMapping,
    connect_foreign,
    connect_path,
)


def _vm_side(what: str) -> OSError:
    return OSError(errno.EOPNOTSUPP, f"{what} is the VM side's: the host only maps")


class ForeignBackend(GrantBackend):
    """The mapping side of a domain in this process, through another process's
    simulated hypervisor."""

    name = "sim"

    def __init__(self, mapper: ForeignMapper) -> None:
        self.mapper = mapper
        self.domid = mapper.domid
        # By fd, as gntdev's fds are this backend's handles; the area must match too.
        self._mappings: dict[int, tuple[MappedArea, ForeignMapping]] = {}
        # Never written: no event reaches the host in the split.
        self._event_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._closed = False

    # -- sharing side: the VM's ---------------------------------------------------------

    def share(self, domid: int, count: int, *, writable: bool = True) -> SharedArea:
        raise _vm_side("sharing pages")

    def set_share_notify(self, area: SharedArea, notify: UnmapNotify) -> None:
        raise _vm_side("a shared area's unmap notify")

    def unshare(self, area: SharedArea) -> Unshared:
        raise _vm_side("ending shared pages")

    # -- mapping side ----------------------------------------------------------------------

    def map(self, grants: Sequence[tuple[int, int]], *, writable: bool = True) -> MappedArea:
        """Map the grants (of one domain, the leading pages of one of its shares, in
        order); the area's ``fd`` is the fresh fd the hypervisor sent, index 0."""
        pairs = tuple((int(domid), int(ref)) for domid, ref in grants)
        if not pairs:
            raise OSError(errno.EINVAL, "no grants to map")
        granters = sorted({domid for domid, _ in pairs})
        if len(granters) != 1:
            raise OSError(errno.EINVAL, "one mapping takes the grants of one domain, not "
                          f"of domains {', '.join(map(str, granters))}")
        mapping = self.mapper.map(granters[0], [ref for _, ref in pairs], writable)
        area = MappedArea(0, pairs, mapping.fd, writable)
        self._mappings[mapping.fd] = (area, mapping)
        return area

    def _own_mapping(self, area: MappedArea) -> ForeignMapping:
        found = self._mappings.get(area.fd)
        # Fd numbers are reused: the area itself must be the one mapped there.
        if found is None or found[0] is not area or area.released:
            raise OSError(errno.EINVAL, "not a live mapping of this backend")
        return found[1]

    def set_map_notify(self, area: MappedArea, notify: UnmapNotify) -> None:
        """Once the mapping is unmapped here and munmapped by every watched process,
        clear the byte and signal the port (bound here); replaces an earlier notify."""
        mapping = self._own_mapping(area)
        self.mapper.set_notify(mapping, clear_byte=notify.clear_byte,
                               event_port=notify.event_port)
        area.notify = notify

    def unmap(self, area: MappedArea) -> None:
        """Close the area's fd, then let go of the mapping (what a process still has
        mmapped stays mapped until it munmaps, as with gntdev)."""
        mapping = self._own_mapping(area)
        del self._mappings[area.fd]
        area.released = True
        self.mapper.unmap(mapping)

    def watch(self, pid: int) -> None:
        """The compositor's process: its mmaps of granted pages count as this domain's
        mappings (until this backend closes and that process maps none)."""
        self.mapper.watch(pid)

    # -- event channels --------------------------------------------------------------------

    def bind_unbound_port(self, remote_domid: int) -> int:
        raise _vm_side("allocating an unbound port")

    def bind_interdomain(self, remote_domid: int, remote_port: int) -> int:
        return self.mapper.bind_interdomain(remote_domid, remote_port)

    def unbind(self, port: int) -> None:
        self.mapper.unbind(port)

    def notify(self, port: int) -> None:
        self.mapper.notify(port)

    def event_fd(self) -> int:
        return self._event_fd

    def fired_ports(self) -> list[int]:
        return []

    def unmask(self, ports: Sequence[int]) -> None:
        pass

    # -- tuning: the VM's kernel's -----------------------------------------------------------

    def status(self) -> ReclaimStatus:
        return ReclaimStatus(None, None, None, None)

    def set_free_per_iteration(self, value: int) -> None:
        raise _vm_side("tuning free_per_iteration")

    def set_gntalloc_limit(self, value: int) -> None:
        raise _vm_side("tuning the gntalloc limit")

    def close(self) -> None:
        """Close the connection: everything mapped and bound through it goes."""
        if self._closed:
            return
        self._closed = True
        for area, _ in self._mappings.values():
            area.released = True
        self._mappings.clear()
        with contextlib.suppress(OSError):
            self.mapper.close()
        os.close(self._event_fd)


def connect_sim_host(own_domid: int, granter_domid: int, path: Path | None) -> ForeignBackend:
    """Domain ``own_domid``'s backend for mapping the grants of ``granter_domid``: through
    the hypercall socket ``path`` when given, else through the running simulated kernel
    that hosts ``granter_domid``. Failures are one-line ``ForeignKernelError``s."""
    if path is not None:
        try:
            mapper = connect_path(path, own_domid)
        except OSError as exc:
            raise ForeignKernelError(
                f"cannot reach the simulated hypervisor of domain {granter_domid} at {path}: "
                f"{exc.strerror or exc}") from exc
    else:
        try:
            mapper = connect_foreign(own_domid, granter_domid=granter_domid)
        except (OSError, ValueError) as exc:  # e.g. XDG_RUNTIME_DIR unusable
            raise ForeignKernelError(
                f"cannot look for the simulated kernel hosting domain {granter_domid}: "
                f"{exc}") from exc
    try:
        return ForeignBackend(mapper)
    except BaseException:
        mapper.close()
        raise
