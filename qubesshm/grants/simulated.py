"""A simulated Xen grant table that follows the kernel's rules and is real where it can be.

Granted pages are memfd shared memory, so the fd the mapping side hands out can be
mmapped by a real compositor, and what it shows is the granted memory. A grant is
*mapped* while the mapping side holds it (``map`` until ``unmap``) or while any
watched process has its pages mmapped, as ``/proc/<pid>/maps`` shows. Ending a
mapped grant fails as ``gnttab_end_foreign_access_ref`` does, and ``unshare`` then
puts it on a deferred list drained by a 1-second timer, ``free_per_iteration``
entries per tick (0: all), exactly as ``drivers/xen/grant-table.c`` since Linux 6.5.
Time comes from an injected clock and the timer runs only in ``advance``, so a test
can run ten minutes of ticks in milliseconds.

One ``SimHypervisor`` holds the shared state (grant table, deferred list, event
channels, parameter files); each ``SimBackend`` is one domain's ``GrantBackend``.
Domains in other processes map its grants through ``hypercalls``.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import mmap
import os
import re
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from .api import (
    PAGE_SIZE,
    GrantBackend,
    MappedArea,
    ReclaimStatus,
    SharedArea,
    UnmapNotify,
    Unshared,
)
from .files import write_file
from .params import DEFAULT_FREE_PER_ITERATION, Kernel, ModuleParams

log = logging.getLogger("qubesshm.grants")

# Grant-table v1 entries are 8 bytes: 512 per 4 KiB frame.
ENTRIES_PER_FRAME = 512
DEFAULT_MAX_GRANT_FRAMES = 64
# Linux keeps the first refs for itself (GNTTAB_NR_RESERVED_ENTRIES).
RESERVED_REFS = 8
TICK = 1.0  # HZ jiffies: the deferred timer's period, in seconds

FileId = tuple[int, int]  # (st_dev, st_ino) of a memfd
MapsReader = Callable[[int], set[FileId]]


# Every granted page lives in a memfd of this name; /proc/PID/maps shows a mapping of
# one (through any fd or reopening) as "/memfd:qubesshm-grant (deleted)".
GRANT_MEMFD = "qubesshm-grant"
_GRANT_MAPPING = re.compile(
    rb"^[^ \n]+ [^ \n]+ [^ \n]+ ([0-9a-f]+):([0-9a-f]+) ([0-9]+) +/memfd:"
    + GRANT_MEMFD.encode() + rb"[ \n]", re.MULTILINE)


def read_proc_maps(pid: int) -> set[FileId]:
    """Granted pages' memfds that process ``pid`` has mmapped, by device and inode; none
    once it is gone. (The kernel writing out the maps is most of the cost; the lines of
    other files are skipped in C: a busy X server maps hundreds.)"""
    try:
        with open(f"/proc/{pid}/maps", "rb") as maps:
            text = maps.read()
    except (FileNotFoundError, ProcessLookupError):
        return set()
    if GRANT_MEMFD.encode() not in text:
        return set()
    return {(os.makedev(int(major, 16), int(minor, 16)), int(inode))
            for major, minor, inode in set(_GRANT_MAPPING.findall(text))}


@dataclass(eq=False)
class _Pages:
    """One share's memfd: the pages behind its grants."""

    fd: int
    file_id: FileId
    count: int
    live_refs: int


@dataclass(eq=False)
class _Entry:
    ref: int
    granter: int
    grantee: int
    writable: bool
    pages: _Pages
    page: int
    holds: int = 0  # mapping-side maps (gntdev)
    deferred: bool = False


@dataclass(eq=False)
class _Port:
    domid: int
    port: int
    remote_domid: int
    remote: _Port | None = None
    masked: bool = False
    pending: bool = False
    # An unmap notify holds the channel (evtchn_get in the kernel): unbinding it
    # then only marks it closing, and it closes once the notify has been sent.
    holds: int = 0
    closing: bool = False


@dataclass(eq=False)
class _Mapping:
    area: MappedArea
    entries: list[_Entry]
    pages: _Pages
    # Set once the mapping side let go while a watched process still maps it.
    waiting_for_processes: bool = False
    notify_port: _Port | None = None


@dataclass
class SimCounters:
    deferred_count: int = 0
    leaked_count: int = 0
    gntalloc_pages: int = 0
    live_refs: int = 0
    open_memfds: int = 0
    ticks: int = 0
    freed_by_ticks: int = 0
    history: list[int] = field(default_factory=list)  # entries freed per tick


class SimHypervisor:
    """Grant table, deferred reclaim, event channels and parameters of the model."""

    def __init__(
        self,
        root: Path,
        *,
        clock: Callable[[], float] = time.monotonic,
        maps_reader: MapsReader = read_proc_maps,
        max_grant_frames: int = DEFAULT_MAX_GRANT_FRAMES,
        kernel: Kernel | None = None,
    ) -> None:
        """``kernel``: boot with those parameters; None keeps the files found under
        ``root`` and lays out Linux's defaults for missing ones."""
        self.root = root
        self.params = ModuleParams(root)
        if kernel is None:
            self.params.create_defaults()
        else:
            self.params.boot(kernel)
        self.clock = clock
        self.maps_reader = maps_reader
        self.table_size = max_grant_frames * ENTRIES_PER_FRAME
        self._entries: dict[int, _Entry] = {}
        self._free_refs: list[int] = []
        self._next_ref = RESERVED_REFS
        self._deferred: deque[_Entry] = deque()
        self._timer_due: float | None = None
        self._watched: dict[int, int] = {}  # pid -> how many watchers asked
        self._lingering: list[int] = []  # watches to drop once their pid maps no grant
        self._mappings: list[_Mapping] = []
        self._ports: dict[tuple[int, int], _Port] = {}
        self._backends: dict[int, SimBackend] = {}
        self.counters = SimCounters()
        self._publish()

    # -- observed processes -------------------------------------------------------

    def watch(self, pid: int) -> None:
        """Count ``pid``'s mmaps of granted pages as foreign mappings. A process the
        model cannot look at is refused: it could never tell that one lets go. Watches
        are counted: a pid stays watched until each ``watch`` has had its ``unwatch``."""
        try:
            self.maps_reader(pid)
        except PermissionError as exc:
            raise PermissionError(
                exc.errno, f"the simulated kernel cannot see the mappings of process {pid} "
                f"({exc.filename}: {exc.strerror}); run it as a user who may read them "
                "(the same user, with no fewer capabilities)") from exc
        self._watched[pid] = self._watched.get(pid, 0) + 1

    def unwatch(self, pid: int) -> None:
        left = self._watched.get(pid, 0) - 1
        if left > 0:
            self._watched[pid] = left
        else:
            self._watched.pop(pid, None)

    def unwatch_when_unmapped(self, pid: int) -> None:
        """Drop one watch of ``pid`` once it maps no granted page: the mappings of a
        closed gntdev live on in the process's mmaps. Checked now and at ``refresh``."""
        self._lingering.append(pid)
        self._prune_lingering()

    def _prune_lingering(self) -> None:
        if not self._lingering:
            return
        live = {entry.pages.file_id for entry in self._entries.values()}
        for pid in list(self._lingering):
            try:
                mapped = self.maps_reader(pid) & live
            except OSError:
                mapped = set()  # no longer ours to look at: not the process we watched
            if not mapped:
                self._lingering.remove(pid)
                self.unwatch(pid)

    @property
    def watched(self) -> frozenset[int]:
        return frozenset(self._watched)

    def _mapped_by_processes(self) -> set[FileId]:
        found: set[FileId] = set()
        for pid in self._watched:
            found |= self.maps_reader(pid)
        return found

    def _is_mapped(self, entry: _Entry, by_processes: set[FileId]) -> bool:
        return entry.holds > 0 or entry.pages.file_id in by_processes

    def refresh(self) -> None:
        """Look at the watched processes again: fire unmap notifies that are due, and
        drop the watches that were to last only while their process maps grants."""
        self._prune_lingering()
        waiting = [m for m in self._mappings if m.waiting_for_processes]
        if not waiting:
            return
        by_processes = self._mapped_by_processes()
        for mapping in waiting:
            if mapping.pages.file_id not in by_processes:
                self._mapping_gone(mapping)

    # -- the grant table -----------------------------------------------------------

    def _alloc_refs(self, count: int) -> list[int]:
        available = len(self._free_refs) + (self.table_size - self._next_ref)
        if count > available:
            raise OSError(errno.ENOSPC, f"grant table full: {count} refs wanted, "
                          f"{available} free of {self.table_size}")
        refs = []
        for _ in range(count):
            if self._free_refs:
                refs.append(self._free_refs.pop())
            else:
                refs.append(self._next_ref)
                self._next_ref += 1
        return refs

    def _try_end(self, entry: _Entry, by_processes: set[FileId]) -> bool:
        """``gnttab_end_foreign_access_ref``: fails while the grant is mapped."""
        if self._is_mapped(entry, by_processes):
            return False
        del self._entries[entry.ref]
        self._free_refs.append(entry.ref)
        self.counters.live_refs -= 1
        entry.pages.live_refs -= 1
        if entry.pages.live_refs == 0:
            os.close(entry.pages.fd)
            self.counters.open_memfds -= 1
        return True

    def share(self, granter: int, grantee: int, count: int,
              writable: bool) -> tuple[list[int], _Pages]:
        if count < 1:
            raise OSError(errno.EINVAL, f"cannot share {count} pages")
        limit = self.params.gntalloc_limit
        if self.counters.gntalloc_pages + count > limit:
            raise OSError(errno.ENOSPC, f"gntalloc limit: {self.counters.gntalloc_pages} "
                          f"pages granted, {count} more would pass the limit of {limit}")
        refs = self._alloc_refs(count)
        fd = os.memfd_create(GRANT_MEMFD, os.MFD_CLOEXEC)
        os.ftruncate(fd, count * PAGE_SIZE)
        st = os.fstat(fd)
        pages = _Pages(fd, (st.st_dev, st.st_ino), count, count)
        for page, ref in enumerate(refs):
            self._entries[ref] = _Entry(ref, granter, grantee, writable, pages, page)
        self.counters.gntalloc_pages += count
        self.counters.live_refs += count
        self.counters.open_memfds += 1
        self._publish()
        return refs, pages

    def unshare(self, refs: Sequence[int]) -> Unshared:
        """gntalloc let go: end each grant now, or defer it."""
        by_processes = self._mapped_by_processes()
        self.counters.gntalloc_pages -= len(refs)
        deferred = False
        for ref in refs:
            entry = self._entries[ref]
            if not self._try_end(entry, by_processes):
                self._defer(entry)
                deferred = True
        self._publish()
        return Unshared.DEFERRED if deferred else Unshared.ENDED

    def _defer(self, entry: _Entry) -> None:
        """``gnttab_add_deferred``: queue it and arm the timer if it is not pending."""
        entry.deferred = True
        self._deferred.append(entry)
        self.counters.deferred_count += 1
        if self._timer_due is None:
            self._timer_due = self.clock() + TICK

    # -- the deferred timer --------------------------------------------------------

    def advance(self) -> int:
        """Run every timer tick due by now; the number of ticks run."""
        ran = 0
        now = self.clock()
        while self._timer_due is not None and self._timer_due <= now:
            self._tick()
            ran += 1
            self._timer_due = self._timer_due + TICK if self._deferred else None
        if ran:
            self._publish()
        return ran

    def _tick(self) -> None:
        """``gnttab_handle_deferred``: retry up to free_per_iteration entries, in order,
        re-queueing the still-mapped ones at the tail, and stop on meeting the first
        re-queued one again."""
        try:
            budget = self.params.free_per_iteration
        except (OSError, ValueError):
            # No readable parameter (as before Linux 6.5): the compiled-in default.
            budget = DEFAULT_FREE_PER_ITERATION
        unlimited = budget == 0
        by_processes = self._mapped_by_processes()
        first: _Entry | None = None
        freed = 0
        while (unlimited or budget > 0) and self._deferred:
            if not unlimited:
                budget -= 1
            entry = self._deferred[0]
            if entry is first:
                break
            self._deferred.popleft()
            if self._try_end(entry, by_processes):
                self.counters.deferred_count -= 1
                freed += 1
            else:
                if first is None:
                    first = entry
                self._deferred.append(entry)
        self.counters.ticks += 1
        self.counters.freed_by_ticks += freed
        self.counters.history.append(freed)

    @property
    def timer_due(self) -> float | None:
        return self._timer_due

    @property
    def deferred_pages(self) -> int:
        return len(self._deferred)

    # -- the mapping side ----------------------------------------------------------

    def map(self, mapper: int, grants: Sequence[tuple[int, int]],
            writable: bool) -> tuple[list[_Entry], _Pages]:
        if not grants:
            raise OSError(errno.EINVAL, "no grants to map")
        entries = []
        for domid, ref in grants:
            entry = self._entries.get(ref)
            if entry is None or entry.granter != domid:
                raise OSError(errno.EINVAL, f"domain {domid} has no grant {ref}")
            if entry.grantee != mapper:
                raise OSError(errno.EPERM, f"grant {ref} of domain {domid} is for domain "
                              f"{entry.grantee}, not {mapper}")
            if writable and not entry.writable:
                raise OSError(errno.EPERM, f"grant {ref} of domain {domid} is read-only")
            entries.append(entry)
        pages = entries[0].pages
        if any(e.pages is not pages or e.page != i for i, e in enumerate(entries)):
            # Xen maps any list of pages; memfd can only show a file's pages in order.
            raise OSError(errno.EINVAL, "the simulated hypervisor maps only the leading "
                          "pages of one shared area, in order")
        for entry in entries:
            entry.holds += 1
        return entries, pages

    def open_mapping(self, mapper: int, grants: Sequence[tuple[int, int]],
                     writable: bool) -> _Mapping:
        """gntdev's map: hold the grants and open a fresh fd whose offset 0 is the first
        granted page, read-only unless ``writable``; the mapping counts until
        ``release_mapping``."""
        entries, pages = self.map(mapper, grants, writable)
        try:
            # A fresh open file description: its offset 0 is the first granted page.
            fd = os.open(f"/proc/self/fd/{pages.fd}",
                         (os.O_RDWR if writable else os.O_RDONLY) | os.O_CLOEXEC)
        except OSError:
            for entry in entries:
                entry.holds -= 1
            raise
        mapping = _Mapping(MappedArea(0, tuple(grants), fd, writable), entries, pages)
        self.add_mapping(mapping)
        return mapping

    def add_mapping(self, mapping: _Mapping) -> None:
        self._mappings.append(mapping)

    def release_mapping(self, mapping: _Mapping) -> None:
        """The mapping side unmapped; the notify waits for watched processes too."""
        for entry in mapping.entries:
            entry.holds -= 1
        # With no notify armed nothing waits on the processes: whether a grant is still
        # mapped is asked of them when it is ended (``_try_end``).
        if mapping.area.notify is not None and mapping.pages.file_id in self._mapped_by_processes():
            mapping.waiting_for_processes = True
        else:
            self._mapping_gone(mapping)

    def _mapping_gone(self, mapping: _Mapping) -> None:
        self._mappings.remove(mapping)
        notify = mapping.area.notify
        if notify is None:
            return
        if notify.clear_byte is not None:
            self._clear_byte(mapping.pages, notify.clear_byte)
        if mapping.notify_port is not None:
            self.send_and_release(mapping.notify_port)
            mapping.notify_port = None

    def _clear_byte(self, pages: _Pages, offset: int) -> None:
        # Once every grant has ended the pages are gone and nobody can see the byte.
        if pages.live_refs:
            os.pwrite(pages.fd, b"\0", offset)

    # -- event channels ------------------------------------------------------------

    def register(self, backend: SimBackend) -> None:
        if backend.domid in self._backends:
            raise OSError(errno.EEXIST, f"domain {backend.domid} already has a backend")
        self._backends[backend.domid] = backend

    @property
    def domains(self) -> list[int]:
        """The domains with a backend on this hypervisor (in this process)."""
        return sorted(self._backends)

    def unregister(self, backend: SimBackend) -> None:
        self._backends.pop(backend.domid, None)

    def bind_unbound(self, domid: int, remote_domid: int) -> int:
        port = 1 + max((p for d, p in self._ports if d == domid), default=0)
        self._ports[(domid, port)] = _Port(domid, port, remote_domid)
        return port

    def bind_interdomain(self, domid: int, remote_domid: int, remote_port: int) -> int:
        remote = self._ports.get((remote_domid, remote_port))
        if remote is None or remote.remote is not None or remote.remote_domid != domid:
            raise OSError(errno.EINVAL, f"port {remote_port} of domain {remote_domid} is "
                          f"not an unbound port for domain {domid}")
        port = self.bind_unbound(domid, remote_domid)
        local = self._ports[(domid, port)]
        local.remote, remote.remote = remote, local
        return port

    def _live_port(self, domid: int, port: int) -> _Port:
        local = self._ports.get((domid, port))
        if local is None or local.closing:
            raise OSError(errno.ENOTCONN, f"port {port} is not bound")
        return local

    def unbind(self, domid: int, port: int) -> None:
        local = self._live_port(domid, port)
        if local.holds:
            local.closing = True
        else:
            self._close_port(local)

    def _close_port(self, local: _Port) -> None:
        del self._ports[(local.domid, local.port)]
        if local.remote is not None:
            local.remote.remote = None

    def hold_port(self, domid: int, port: int) -> _Port:
        local = self._live_port(domid, port)
        local.holds += 1
        return local

    def release_port(self, local: _Port) -> None:
        local.holds -= 1
        if local.closing and local.holds == 0:
            self._close_port(local)

    def send_and_release(self, local: _Port) -> None:
        self._send(local)
        self.release_port(local)

    def notify(self, domid: int, port: int) -> None:
        self._send(self._live_port(domid, port))

    def _send(self, local: _Port) -> None:
        remote = local.remote
        if remote is None or remote.closing:
            return  # sending on an unconnected port does nothing, as in Xen
        if remote.masked:
            remote.pending = True
            return
        remote.masked = True
        backend = self._backends.get(remote.domid)
        if backend is not None:
            backend.deliver(remote.port)

    def unmask(self, domid: int, port: int) -> None:
        local = self._live_port(domid, port)
        local.masked = False
        if local.pending:
            local.pending = False
            local.masked = True
            self._backends[domid].deliver(port)

    # -- what tune shows -------------------------------------------------------------

    def status(self) -> ReclaimStatus:
        return ReclaimStatus(
            free_per_iteration=self.params.free_per_iteration,
            gntalloc_limit=self.params.gntalloc_limit,
            deferred_count=self.counters.deferred_count,
            leaked_count=self.counters.leaked_count,
            deferred_pages_bytes=len(self._deferred) * PAGE_SIZE,
        )

    def _publish(self) -> None:
        """Counters for ``qubesshm tune`` in another process, as sysfs would show them."""
        status = {
            "deferred_count": self.counters.deferred_count,
            "leaked_count": self.counters.leaked_count,
            "deferred_pages_bytes": len(self._deferred) * PAGE_SIZE,
        }
        path = self.root / COUNTERS_FILE
        # Each process its own temporary name: proxies sharing a root must not race.
        tmp = path.with_name(f".{COUNTERS_FILE}.{os.getpid()}.{id(self)}.tmp")
        try:
            tmp.unlink(missing_ok=True)
            write_file(tmp, json.dumps(status), create=True)
            tmp.replace(path)
        except OSError as exc:
            # What tune shows is a courtesy; the grant table itself is already right.
            log.warning("cannot publish the simulated kernel's counters to %s: %s", path, exc)


COUNTERS_FILE = "counters.json"


def read_published_counters(root: Path) -> dict[str, int] | None:
    try:
        data = json.loads((root / COUNTERS_FILE).read_text())
    except (FileNotFoundError, ValueError):
        return None
    return {k: int(v) for k, v in data.items()}


class SimBackend(GrantBackend):
    """One domain of a ``SimHypervisor``."""

    name = "sim"

    def __init__(self, hypervisor: SimHypervisor, domid: int) -> None:
        self.hv = hypervisor
        self.domid = domid
        self._next_index = 0
        self._shared: dict[int, tuple[SharedArea, _Pages]] = {}
        self._share_ports: dict[int, _Port] = {}  # area index -> port its notify holds
        self._mappings: dict[int, _Mapping] = {}
        self._event_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._fired: list[int] = []
        self._ports: set[int] = set()
        self._watching: list[int] = []
        hypervisor.register(self)

    # -- sharing side -----------------------------------------------------------------

    def share(self, domid: int, count: int, *, writable: bool = True) -> SharedArea:
        refs, pages = self.hv.share(self.domid, domid, count, writable)
        memory = mmap.mmap(pages.fd, count * PAGE_SIZE, mmap.MAP_SHARED,
                           mmap.PROT_READ | mmap.PROT_WRITE)
        index = self._next_index
        self._next_index += count * PAGE_SIZE
        area = SharedArea(index, domid, tuple(refs), writable, memory)
        self._shared[index] = (area, pages)
        return area

    def _own_share(self, area: SharedArea) -> _Pages:
        found = self._shared.get(area.index)
        if found is None or found[0] is not area or area.released:
            raise OSError(errno.EINVAL, f"no shared area at index {area.index}")
        return found[1]

    def set_share_notify(self, area: SharedArea, notify: UnmapNotify) -> None:
        self._own_share(area)
        _check_notify(notify, area.size, self._ports)
        held = self._rehold(notify, self._share_ports.pop(area.index, None))
        if held is not None:
            self._share_ports[area.index] = held
        area.notify = notify

    def _rehold(self, notify: UnmapNotify, previous: _Port | None) -> _Port | None:
        """Hold the port ``notify`` will signal, then release the one it replaces."""
        held = (self.hv.hold_port(self.domid, notify.event_port)
                if notify.event_port is not None else None)
        if previous is not None:
            self.hv.release_port(previous)
        return held

    def unshare(self, area: SharedArea) -> Unshared:
        self._own_share(area)
        del self._shared[area.index]
        area.released = True
        notify = area.notify
        # gntalloc acts on its notify when it lets go of the pages, before ending them.
        if notify is not None and notify.clear_byte is not None:
            area.memory[notify.clear_byte] = 0
        area.memory.close()
        outcome = self.hv.unshare(area.refs)
        held = self._share_ports.pop(area.index, None)
        if held is not None:
            self.hv.send_and_release(held)
        return outcome

    # -- mapping side -----------------------------------------------------------------

    def map(self, grants: Sequence[tuple[int, int]], *, writable: bool = True) -> MappedArea:
        mapping = self.hv.open_mapping(self.domid, grants, writable)
        self._mappings[mapping.area.fd] = mapping
        return mapping.area

    def _own_mapping(self, area: MappedArea) -> _Mapping:
        mapping = self._mappings.get(area.fd)
        # Fd numbers are reused: the area itself must be the one mapped there.
        if mapping is None or mapping.area is not area or area.released:
            raise OSError(errno.EINVAL, "not a live mapping of this backend")
        return mapping

    def set_map_notify(self, area: MappedArea, notify: UnmapNotify) -> None:
        mapping = self._own_mapping(area)
        _check_notify(notify, area.size, self._ports)
        mapping.notify_port = self._rehold(notify, mapping.notify_port)
        area.notify = notify

    def watch(self, pid: int) -> None:
        self.hv.watch(pid)
        self._watching.append(pid)

    def unmap(self, area: MappedArea) -> None:
        mapping = self._own_mapping(area)
        del self._mappings[area.fd]
        area.released = True
        os.close(area.fd)
        self.hv.release_mapping(mapping)

    # -- event channels ---------------------------------------------------------------

    def bind_unbound_port(self, remote_domid: int) -> int:
        port = self.hv.bind_unbound(self.domid, remote_domid)
        self._ports.add(port)
        return port

    def bind_interdomain(self, remote_domid: int, remote_port: int) -> int:
        port = self.hv.bind_interdomain(self.domid, remote_domid, remote_port)
        self._ports.add(port)
        return port

    def unbind(self, port: int) -> None:
        self.hv.unbind(self.domid, port)
        self._ports.discard(port)

    def notify(self, port: int) -> None:
        self.hv.notify(self.domid, port)

    def deliver(self, port: int) -> None:
        self._fired.append(port)
        os.eventfd_write(self._event_fd, 1)

    def event_fd(self) -> int:
        return self._event_fd

    def fired_ports(self) -> list[int]:
        with contextlib.suppress(BlockingIOError):
            os.eventfd_read(self._event_fd)
        fired, self._fired = self._fired, []
        return fired

    def unmask(self, ports: Sequence[int]) -> None:
        for port in ports:
            self.hv.unmask(self.domid, port)

    # -- tuning -------------------------------------------------------------------------

    def status(self) -> ReclaimStatus:
        return self.hv.status()

    def gntalloc_limit(self) -> int | None:
        return self.hv.params.gntalloc_limit

    def set_free_per_iteration(self, value: int) -> None:
        self.hv.params.free_per_iteration = value

    def set_gntalloc_limit(self, value: int) -> None:
        self.hv.params.gntalloc_limit = value

    def close(self) -> None:
        for area, _ in list(self._shared.values()):
            self.unshare(area)
        for mapping in list(self._mappings.values()):
            self.unmap(mapping.area)
        # What the processes it watched still map stays mapped until they let go.
        for pid in self._watching:
            self.hv.unwatch_when_unmapped(pid)
        self._watching.clear()
        for port in list(self._ports):
            self.unbind(port)
        os.close(self._event_fd)
        self.hv.unregister(self)


def _check_notify(notify: UnmapNotify, size: int, ports: set[int]) -> None:
    if notify.clear_byte is not None and not 0 <= notify.clear_byte < size:
        raise OSError(errno.EINVAL, f"notify byte {notify.clear_byte} is outside the "
                      f"{size}-byte area")
    if notify.event_port is not None and notify.event_port not in ports:
        raise OSError(errno.EINVAL, f"event channel port {notify.event_port} is not bound")
