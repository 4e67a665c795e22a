"""Grant lifetimes against a reference model, on the simulated hypervisor.

``GrantLifetimes`` (sans-IO) is driven by a hypothesis state machine through an
output buffer's whole life: connections open and close, areas are taken and given
back, the compositor mmaps and munmaps their pools (a fake ``maps_reader``), unmap
notifies arrive (``refresh`` then ``on_event`` when the event fd is readable, as the
server's reader does), time passes (the kernel's deferred-reclaim ticks, then
``poll``) and the gntalloc limit changes. A reference model written from the module's
docstring predicts every area's state, the cache and awaiting orders, the pool
destructions, the refusals, the counters and ``free_per_iteration``; after every step
the hypervisor's grant table is checked against it: no grant is ever ended while the
compositor maps it, none is lost, the page counters balance, and whatever was
deferred drains once nothing maps it. A few fixed scenarios pin down the simulated
hypervisor's behaviour that the lifetimes rely on.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import select
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from qubesshm.grants.api import PAGE_SIZE, Unshared
from qubesshm.grants.halves import GrantHalves, sim_halves
from qubesshm.grants.ledger import ClientCounters
from qubesshm.grants.lifetimes import (
    CACHE_SHARE,
    CLIENT_SHARE,
    DEFAULT_CACHE_PAGES,
    DEFAULT_CLIENT_PAGES,
    DEFER_INTERVAL,
    FIT_SHARE,
    Area,
    AreaState,
    GrantLifetimes,
    GrantLimit,
    LifetimeCounters,
    LifetimePolicy,
    NoRoom,
    pages_for,
)
from qubesshm.grants.mapping import Mapping
from qubesshm.grants.sharing import Grant
from qubesshm.grants.simulated import (
    ENTRIES_PER_FRAME,
    RESERVED_REFS,
    SimBackend,
    SimHypervisor,
    _Entry,
)

FileId = tuple[int, int]
COMPOSITOR_PID = 4242
T0 = 100.0
# One grant frame: 504 usable refs, so that deferred grants can fill the table.
TABLE_REFS = ENTRIES_PER_FRAME - RESERVED_REFS
LIVE = (AreaState.IN_USE, AreaState.CACHED, AreaState.AWAITING_UNMAP)
HELD = (AreaState.IN_USE, AreaState.CACHED)
DONE = (AreaState.ENDED, AreaState.DEFERRED)


class FakeClock:
    def __init__(self, start: float = T0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now


def file_id(fd: int) -> FileId:
    st_ = os.fstat(fd)
    return (st_.st_dev, st_.st_ino)


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def sim_backends(halves: GrantHalves) -> tuple[SimBackend, SimBackend]:
    vm, gui = halves.backends
    assert isinstance(vm, SimBackend) and isinstance(gui, SimBackend)
    return vm, gui


def readable(fd: int) -> bool:
    return bool(select.select([fd], [], [], 0)[0])


# -- the reference model -------------------------------------------------------------------


@dataclass(eq=False)
class MArea:
    area: Area
    fid: FileId
    owner: int
    entries: list[_Entry]  # the hypervisor's table entries of its grants
    since: float
    state: AreaState = AreaState.IN_USE
    late: bool = False
    let_go: bool = False  # the mapping side unmapped it
    notified: bool = False  # its unmap notify fired (byte cleared, port signalled)

    @property
    def pages(self) -> int:
        return len(self.entries)

    def __repr__(self) -> str:
        return (f"<area of client#{self.owner}, {self.pages} pages, refs {self.entries[0].ref}.., "
                f"{self.state.value}, inode {self.fid[1]}>")


@dataclass(eq=False)
class MConn:
    owner: int
    counters: ClientCounters
    open: bool = True
    areas: set[MArea] = field(default_factory=set)


def pages_in(areas: list[MArea], *states: AreaState) -> int:
    return sum(a.pages for a in areas if a.state in states)


class Reference:
    """The lifetimes' rules, from the module docstring: what each call must do."""

    def __init__(self, policy: LifetimePolicy, clock: FakeClock, mapped: set[FileId],
                 limit: int, fpi: int) -> None:
        self.policy = policy
        self.clock = clock
        self.mapped = mapped  # the compositor's mmaps, shared with the hypervisor
        self.limit = limit
        self.fpi = fpi
        self.found: int | None = None  # free_per_iteration before it was raised
        self.areas: list[MArea] = []
        self.conns: dict[int, MConn] = {}  # not yet forgotten
        self.all_conns: list[MConn] = []
        self.cache: list[MArea] = []  # least recently used first
        self.awaiting: list[MArea] = []  # oldest first
        self.destroyed: list[MArea] = []  # expected destroy_upstream calls, in order
        self.counters = LifetimeCounters()
        self.started = clock()
        self.next_batch = 0.0
        self.deferred_now = 0  # pages deferred during the current call

    # -- helpers ---------------------------------------------------------------------------

    def live(self) -> int:
        return pages_in(self.areas, *LIVE)

    def held(self, conn: MConn) -> int:
        return sum(a.pages for a in conn.areas if a.state in HELD)

    def client_bound(self) -> int:
        if self.policy.client_pages is not None:
            return self.policy.client_pages
        return min(DEFAULT_CLIENT_PAGES, int(self.limit * CLIENT_SHARE))

    def cache_bound(self) -> int:
        if self.policy.cache_pages is not None:
            return self.policy.cache_pages
        return min(DEFAULT_CACHE_PAGES, int(self.limit * CACHE_SHARE))

    def move(self, area: MArea, state: AreaState) -> None:
        area.state = state
        area.since = self.clock()

    # -- what each call does -----------------------------------------------------------

    def open(self, owner: int, counters: ClientCounters) -> None:
        conn = MConn(owner, counters)
        self.conns[owner] = conn
        self.all_conns.append(conn)

    def add(self, area: MArea) -> None:
        self.areas.append(area)
        self.conns[area.owner].areas.add(area)

    def let_go(self, area: MArea) -> None:
        was_in_use = area.state is AreaState.IN_USE
        if area in self.cache:
            self.cache.remove(area)
        self.move(area, AreaState.AWAITING_UNMAP)
        self.awaiting.append(area)
        area.let_go = True
        if area.fid not in self.mapped:  # nothing else maps it: the notify fires at once
            area.notified = True
            self.counters.ended_by_notify += 1
            self.end(area)
        elif was_in_use:
            self.retired_while_held(area)

    def retired_while_held(self, area: MArea) -> None:
        """An area stopped backing a buffer while the compositor held it (kept for
        the cache, or still mapped when let go)."""
        second = int(self.clock() - self.started)
        held = self.counters.retired_while_held
        held[second] = held.get(second, 0) + area.pages

    def end(self, area: MArea) -> None:
        self.awaiting.remove(area)
        deferred = area.fid in self.mapped
        if deferred:
            self.counters.deferred_areas += 1
            self.deferred_now += area.pages
        self.move(area, AreaState.DEFERRED if deferred else AreaState.ENDED)
        conn = self.conns[area.owner]
        conn.areas.discard(area)
        self.forget_if_done(conn)

    def forget_if_done(self, conn: MConn) -> None:
        if not conn.open and not conn.areas and self.conns.get(conn.owner) is conn:
            del self.conns[conn.owner]

    def evict(self, area: MArea) -> None:
        self.cache.remove(area)
        self.counters.evictions += 1
        if self.conns[area.owner].open:
            self.destroyed.append(area)
        self.let_go(area)

    def scan(self) -> None:
        for area in list(self.awaiting):
            if area.notified:
                self.counters.ended_by_notify += 1
                self.end(area)

    def cached_fit(self, owner: int, need: int) -> MArea | None:
        best: MArea | None = None
        for area in reversed(self.cache):
            if (area.owner == owner and area.pages * FIT_SHARE <= need <= area.pages
                    and (best is None or area.pages < best.pages)):
                best = area
        return best

    def take(self, owner: int, size: int, deferred_before: int) -> MArea | str:
        """The cached area it must return, "new" for a fresh one, "refused" for a
        buffer that can never fit, or "wait" when the limits have no room now."""
        self.deferred_now = 0
        conn = self.conns[owner]
        need = pages_for(size)
        found = self.cached_fit(owner, need)
        if found is not None:
            self.cache.remove(found)
            self.move(found, AreaState.IN_USE)
            self.counters.cache_hits += 1
            self.counters.peak_wanted = max(self.counters.peak_wanted,
                                            pages_in(self.areas, AreaState.IN_USE))
            return found
        outcome = self.make_room(conn, need)
        if outcome == "new" and (self.live() + deferred_before + self.deferred_now + need
                                 > TABLE_REFS):
            # Deferred grants keep their refs: the table may be full, until they end.
            outcome = "wait"
        if outcome == "refused":
            self.counters.refused += 1
        elif outcome == "wait":
            self.counters.no_room += 1
        else:
            self.counters.cache_misses += 1  # a fresh area
        return outcome

    def make_room(self, conn: MConn, need: int) -> str:
        """ "new" once there is room, "refused" if there never can be, "wait" if not now."""
        self.counters.peak_wanted = max(self.counters.peak_wanted,
                                        pages_in(self.areas, AreaState.IN_USE) + need)
        bound = self.client_bound()
        if need > bound or need > self.limit:
            return "refused"
        for area in [a for a in self.cache if a.owner == conn.owner]:
            if self.held(conn) + need <= bound:
                break
            self.evict(area)
        if self.held(conn) + need > bound:
            return "wait"
        if pages_in(self.areas, AreaState.IN_USE) + need > self.limit:
            return "wait"  # before anything is evicted or deferred
        self.scan()
        for area in list(self.cache):
            if self.live() + need <= self.limit:
                break
            self.evict(area)
        for area in list(self.awaiting):
            if self.live() + need <= self.limit:
                break
            self.counters.deferred_for_room += 1
            self.end(area)
        return "new" if self.live() + need <= self.limit else "wait"
    def give_back(self, area: MArea) -> None:
        if area.state is not AreaState.IN_USE:
            return
        if not self.conns[area.owner].open:
            self.let_go(area)
            return
        self.retired_while_held(area)
        self.move(area, AreaState.CACHED)
        self.cache.append(area)
        while self.cache and sum(a.pages for a in self.cache) > self.cache_bound():
            self.evict(self.cache[0])

    def close_connection(self, owner: int, order: list[MArea]) -> None:
        """``order``: its areas by ``since`` (ties as the implementation meets them)."""
        conn = self.conns.get(owner)
        if conn is None or not conn.open:
            return
        assert set(order) == conn.areas
        conn.open = False
        for area in order:
            if area.state in HELD:
                self.let_go(area)
        self.forget_if_done(conn)

    def refresh(self) -> None:
        for area in self.areas:
            if area.let_go and not area.notified and area.fid not in self.mapped:
                area.notified = True

    def poll(self, backlog: int) -> None:
        """``backlog``: the kernel's deferred list once poll had ended what it ends."""
        now = self.clock()
        late = []
        for area in self.awaiting:
            if now - area.since < self.policy.late_timeout:
                break
            if not area.late:
                area.late = True
                self.counters.late_releases += 1
            late.append(area)
        if late and now >= self.next_batch:
            self.next_batch = now + DEFER_INTERVAL
            self.counters.defer_batches += 1
            handed = 0
            for area in late:
                if handed and handed + area.pages > self.policy.defer_batch:
                    break
                handed += area.pages
                self.end(area)
        self.tune(backlog)

    def tune(self, backlog: int) -> None:
        self.counters.peak_backlog = max(self.counters.peak_backlog, backlog)
        if backlog == 0:
            self.restore()
            return
        if self.fpi == 0:
            return
        if self.found is None:
            self.found = self.fpi
        want = max(self.found, math.ceil(backlog / self.policy.drain_target))
        if want > self.fpi:
            self.fpi = want
            self.counters.fpi_raises += 1

    def restore(self) -> None:
        found, self.found = self.found, None
        if found is None or self.fpi == found:
            return
        self.fpi = found
        self.counters.fpi_restores += 1

    def close(self, orders: dict[int, list[MArea]]) -> None:
        for owner in list(self.conns):
            self.close_connection(owner, orders.get(owner, []))
        self.scan()
        for area in list(self.awaiting):
            self.end(area)
        for conn in list(self.conns.values()):
            self.forget_if_done(conn)
        self.restore()


# -- the state machine -------------------------------------------------------------------

STEP = 2.0**-10  # seconds each step takes (exact in binary)
SIZES = st.sampled_from([1, 1, 2, 2, 3, 4, 4, 6, 8, 12, 48])  # pages of a buffer
# Large buffers under a high limit: deferred grants fill the one-frame grant table.
LARGE_SIZES = st.sampled_from([1, 2, 4, 8, 48, 100, 150])
LIMITS = st.sampled_from([None] * 6 + [0, 6, 16, 40, 120, 600])  # new gntalloc limits
MMAP = st.sampled_from([True, True, True, False])  # the compositor mmaps a new pool
SLACKS = st.sampled_from([0, 1, PAGE_SIZE // 2, PAGE_SIZE - 2])  # bytes short of them


class LifetimesVersusReference(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.fds_at_start = open_fds()
        self.root = Path(tempfile.mkdtemp(prefix="qubesshm-lifetimes-"))
        self.clock = FakeClock()
        self.mapped: set[FileId] = set()  # what the compositor process has mmapped
        self.hv = SimHypervisor(self.root, clock=self.clock,
                                maps_reader=lambda pid: self.mapped, max_grant_frames=1)
        self.halves = sim_halves(self.hv)
        self.halves.watch_compositor(COMPOSITOR_PID)
        self.vm, self.gui = sim_backends(self.halves)
        self.total = ClientCounters()
        self.lt: GrantLifetimes | None = None
        self.model: Reference | None = None
        self.by_area: dict[Area, MArea] = {}
        self.destroyed: list[Area] = []  # destroy_upstream calls, in order
        self.next_owner = 1
        self.initial_fpi = 0
        self.exit_mapped = False
        self.closed = False
        self.sizes = SIZES
        # Set by the invariant after a step's checks pass; cleared when a step starts.
        self.healthy = False

    # -- setup -------------------------------------------------------------------------

    @initialize(fpi=st.sampled_from([0, 1, 1, 2, 10]),
                limit=st.sampled_from([16, 40, 40, 120, 600]),
                cache_pages=st.none() | st.sampled_from([0, 3, 12]),
                client_pages=st.sampled_from([None, None, 6, 20]),
                late_timeout=st.sampled_from([0.0, 1.0, 2.0, 4.5]),
                defer_batch=st.sampled_from([1, 5, 2048]),
                drain_target=st.sampled_from([0.5, 2.0, 3.0]),
                exit_mapped=st.booleans(),
                large=st.sampled_from([False, False, False, True]))
    def setup(self, fpi: int, limit: int, cache_pages: int | None, client_pages: int | None,
              late_timeout: float, defer_batch: int, drain_target: float,
              exit_mapped: bool, large: bool) -> None:
        if large:
            limit, client_pages, self.sizes = 4 * limit, None, LARGE_SIZES
        # Before the lifetimes exist: from here on only they write free_per_iteration.
        self.hv.params.free_per_iteration = fpi
        self.hv.params.gntalloc_limit = limit
        self.initial_fpi = fpi
        self.exit_mapped = exit_mapped
        policy = LifetimePolicy(cache_pages=cache_pages, client_pages=client_pages,
                                late_timeout=late_timeout, defer_batch=defer_batch,
                                drain_target=drain_target)
        self.lt = GrantLifetimes(self.halves, policy, clock=self.clock)
        self.model = Reference(policy, self.clock, self.mapped, limit, fpi)
        self._open()

    @property
    def life(self) -> GrantLifetimes:
        assert self.lt is not None
        return self.lt

    @property
    def ref(self) -> Reference:
        assert self.model is not None
        return self.model

    def _begin(self) -> None:
        """A step starts: a little time passes, so that no two areas are taken or
        given back at the same instant (``close_connection`` lets go of its areas in
        the order of ``since``; ties would be broken by the areas' memory addresses)."""
        self.healthy = False
        self.clock.now += STEP

    def _open(self) -> None:
        owner = self.next_owner
        self.next_owner += 1
        counters = ClientCounters()
        self.life.open_connection(owner, self.destroyed.append, (counters, self.total))
        self.ref.open(owner, counters)

    def _order(self, owner: int) -> list[MArea]:
        """A connection's areas as ``close_connection`` lets them go: oldest first."""
        conn = self.ref.conns.get(owner)
        if conn is None:
            return []
        held = [a.since for a in conn.areas if a.state in HELD]
        assert len(set(held)) == len(held)
        return sorted(conn.areas, key=lambda a: a.since)

    def _open_owners(self) -> list[int]:
        return sorted(o for o, c in self.ref.conns.items() if c.open)

    def _in(self, *states: AreaState) -> list[MArea]:
        return [a for a in self.ref.areas if a.state in states]

    # -- connections ---------------------------------------------------------------------

    @rule(data=st.data(), close=st.sampled_from([False, False, True]))
    def connection(self, data: st.DataObject, close: bool) -> None:
        """A client connects (at most three at once), or one goes; closing one that is
        already closed is a no-op."""
        self._begin()
        if not close and len(self._open_owners()) < 3:
            self._open()
            return
        owner = data.draw(st.integers(1, self.next_owner - 1), label="owner")
        order = self._order(owner)
        self.life.close_connection(owner)
        self.ref.close_connection(owner, order)

    # -- areas ---------------------------------------------------------------------------

    def _take(self, owner: int, pages: int, slack: int, mmap: bool) -> None:
        size = pages * PAGE_SIZE - 1 - slack
        assert pages_for(size) == pages
        expected = self.ref.take(owner, size, self.hv.deferred_pages)
        try:
            area = self.life.take(owner, size)
        except GrantLimit as exc:
            assert expected == "refused", f"refused, the model expected {expected}: {exc}"
            assert str(exc)
            return
        except NoRoom as exc:
            assert expected == "wait", f"told to wait, the model expected {expected}: {exc}"
            assert str(exc)
            return
        assert expected not in ("refused", "wait"), f"the model expected {expected}"
        assert area.state is AreaState.IN_USE and area.owner == owner
        assert area.capacity >= size and area.notify_offset == area.pages * PAGE_SIZE - 1
        if isinstance(expected, MArea):
            assert area is expected.area, "a cache hit, but not the best-fitting area"
            return
        assert area not in self.by_area, "a fresh area was expected, a known one came back"
        assert area.pages == pages
        assert self.hv.counters.gntalloc_pages <= self.ref.limit
        entries = [self.hv._entries[r] for r in area.grant.refs]
        new = MArea(area, file_id(area.mapping.area.fd), owner, entries, since=self.clock())
        self.by_area[area] = new
        self.ref.add(new)
        if mmap:  # the compositor mmaps the new pool as it creates it
            self.mapped.add(new.fid)

    @rule(data=st.data(), slack=SLACKS, mmap=MMAP, resize=st.booleans())
    def take(self, data: st.DataObject, slack: int, mmap: bool, resize: bool) -> None:
        """An output buffer needs an area (a client connects first if none is);
        ``resize``: a surface of that client gives its area back first."""
        self._begin()
        if not self._open_owners():
            self._open()
        owner = data.draw(st.sampled_from(self._open_owners()), label="owner")
        pages = data.draw(self.sizes, label="pages")
        own = [a for a in self._in(AreaState.IN_USE) if a.owner == owner]
        if resize and own:
            old = data.draw(st.sampled_from(own), label="resized")
            self.life.give_back(old.area)
            self.ref.give_back(old)
            self.clock.now += STEP
        self._take(owner, pages, slack, mmap)

    @precondition(lambda self: bool(self.ref.areas))
    @rule(data=st.data(), mmap=st.booleans())
    def compositor(self, data: st.DataObject, mmap: bool) -> None:
        """The compositor mmaps the pool of an area it has a pool of, or munmaps one."""
        self._begin()
        if mmap:
            candidates = [a.fid for a in self._in(*HELD) if a.fid not in self.mapped]
        else:  # in the order the areas were taken: inode numbers need not grow
            candidates = list(dict.fromkeys(
                a.fid for a in self.ref.areas if a.fid in self.mapped))
        if not candidates:
            return
        fid = data.draw(st.sampled_from(candidates))
        if mmap:
            self.mapped.add(fid)
        else:
            self.mapped.discard(fid)

    @precondition(lambda self: bool(self.ref.areas))
    @rule(data=st.data(), again=st.sampled_from([False, False, False, True]))
    def give_back(self, data: st.DataObject, again: bool) -> None:
        """An area no buffer uses any more; ``again``: one not in use (a no-op)."""
        self._begin()
        in_use = self._in(AreaState.IN_USE)
        area = data.draw(st.sampled_from(in_use if in_use and not again else self.ref.areas))
        state = area.state
        self.life.give_back(area.area)
        self.ref.give_back(area)
        if state is AreaState.IN_USE:
            assert area.area.state in (AreaState.CACHED, AreaState.AWAITING_UNMAP,
                                       AreaState.ENDED)
            assert sum(a.pages for a in self.ref.cache) <= self.ref.cache_bound()
        else:
            assert area.area.state is state

    # -- notifies and time ---------------------------------------------------------------

    @rule(refresh=st.booleans(), handle=st.booleans())
    def notify(self, refresh: bool, handle: bool) -> None:
        """The kernel fires the notifies that are due; the server's reader runs
        ``on_event`` when the event fd is readable (now, or in a later step)."""
        self._begin()
        if refresh:
            self.hv.refresh()
            self.ref.refresh()
        fired = readable(self.life.event_fd)
        if any(a.notified for a in self.ref.awaiting):
            assert fired, "an unmap notify fired but the event fd is not readable"
        if not handle:
            return
        before = set(self._in(AreaState.AWAITING_UNMAP))
        if fired:
            self.life.on_event()
            self.ref.scan()
        for area in before:
            if area.state is not AreaState.AWAITING_UNMAP:
                assert area.state is AreaState.ENDED, "the notify path deferred a grant"
        if refresh:
            for area in self._in(AreaState.AWAITING_UNMAP):
                assert area.fid in self.mapped, "unmapped and notified, yet still awaiting"

    @rule(seconds=st.sampled_from([0.0, 0.25, 0.5, 1.0, 1.75, 2.0, 3.0, 10.0]),
          refresh=st.booleans(), limit=LIMITS)
    def advance(self, seconds: float, refresh: bool, limit: int | None) -> None:
        """The server's timer: the kernel's ticks (and, as ``GrantHalves.tick`` does,
        its look at the compositor's mmaps), then ``poll``; ``limit``: the admin
        changes the gntalloc limit first."""
        self._begin()
        if limit is not None:
            self.hv.params.gntalloc_limit = limit
            self.ref.limit = limit
        self.clock.now += seconds
        if refresh:
            self.halves.tick()
            self.ref.refresh()
        else:
            self.hv.advance()
        self.life.poll()
        backlog = self.hv.deferred_pages
        self.ref.poll(backlog)
        fpi = self.hv.params.free_per_iteration
        if backlog == 0:
            assert fpi == self.initial_fpi
        elif self.initial_fpi:
            assert fpi >= max(self.initial_fpi,
                              math.ceil(backlog / self.ref.policy.drain_target))

    # -- invariants ----------------------------------------------------------------------

    @invariant()
    def matches_reference(self) -> None:
        self.check()
        self.healthy = True

    def check(self) -> None:
        ref, life = self.ref, self.life
        for area in ref.areas:
            a = area.area
            assert (a.state, a.since, a.late) == (area.state, area.since, area.late), area
        assert list(life._cache) == [a.area for a in ref.cache]
        assert list(life._awaiting) == [a.area for a in ref.awaiting]
        assert life.awaiting == len(ref.awaiting)
        assert set(life._connections) == set(ref.conns)
        for owner, conn in ref.conns.items():
            real = life._connections[owner]
            assert real.open == conn.open
            assert real.areas == {a.area for a in conn.areas}
        assert self.destroyed == [a.area for a in ref.destroyed]
        self.check_counters()
        self.check_grant_table()
        assert self.hv.params.free_per_iteration == ref.fpi
        if ref.policy.client_pages is not None:
            for conn in ref.conns.values():
                assert ref.held(conn) <= ref.policy.client_pages
        if ref.policy.cache_pages is not None:
            assert pages_in(ref.areas, AreaState.CACHED) <= ref.policy.cache_pages

    def check_counters(self) -> None:
        ref, life = self.ref, self.life
        for f in dataclasses.fields(LifetimeCounters):
            if f.name != "unmap_latency":
                assert getattr(life.counters, f.name) == getattr(ref.counters, f.name), f.name
        latency = life.counters.unmap_latency
        assert latency.count_total == sum(latency.buckets) == ref.counters.ended_by_notify
        ledgers = [(self.total, ref.areas)] + [
            (c.counters, [a for a in ref.areas if a.owner == c.owner]) for c in ref.all_conns]
        for counters, areas in ledgers:
            p = counters.pages
            assert p.live == pages_in(areas, *LIVE)
            assert p.cached == pages_in(areas, AreaState.CACHED)
            assert p.awaiting_unmap == pages_in(areas, AreaState.AWAITING_UNMAP)
            assert p.shared_total == sum(a.pages for a in areas)
            assert p.shared_total - p.unshared_total == p.live
            assert p.deferred_at_unshare == pages_in(areas, AreaState.DEFERRED)

    def check_grant_table(self) -> None:
        """No grant ended while mapped, none lost: each area's entries in the table."""
        hv, ref = self.hv, self.ref
        live = ref.live()
        assert hv.counters.gntalloc_pages == live == self.total.pages.live
        assert self.life._live_pages() == live
        assert hv.counters.live_refs == live + hv.deferred_pages
        assert hv.counters.leaked_count == 0
        on_list = {id(e) for e in hv._deferred}
        ours = 0
        for area in ref.areas:
            for e in area.entries:
                present = hv._entries.get(e.ref) is e
                if area.state in LIVE:
                    assert present and not e.deferred
                    assert e.holds == (area.state in HELD)
                elif area.state is AreaState.ENDED:
                    assert not present, "ENDED, but its grant is still in the table"
                    assert not e.deferred, "ENDED, but its grant went to deferred reclaim"
                    assert area.fid not in self.mapped, "ended while the compositor maps it"
                else:
                    assert e.deferred, "DEFERRED, but the kernel ended its grant at once"
                    assert (id(e) in on_list) == present
                    ours += id(e) in on_list
        assert ours == len(hv._deferred), "a deferred grant of no area"
        assert {id(a.area.grant.area) for a in ref.areas if a.state in LIVE} == {
            id(shared) for shared, _ in self.vm._shared.values()}
        assert {id(a.area.mapping.area) for a in ref.areas if a.state in HELD} == {
            id(m.area) for m in self.gui._mappings.values()}
        waiting = {id(a.area.mapping.area): a.let_go for a in ref.areas if not a.notified}
        assert {id(m.area): m.waiting_for_processes for m in hv._mappings} == waiting
        assert len(self.vm._ports) == len(ref.conns)
        assert len(self.gui._ports) == len(self._open_owners())

    # -- the end -------------------------------------------------------------------------

    def teardown(self) -> None:
        try:
            if self.healthy and self.lt is not None:
                if self.exit_mapped:
                    self.exit_while_mapped()
                else:
                    self.drain_then_exit()
                self.check_all_gone()
        finally:
            self.cleanup()
        if self.healthy:
            assert open_fds() == self.fds_at_start

    def _orders(self) -> dict[int, list[MArea]]:
        return {owner: self._order(owner) for owner in self.ref.conns}

    def _close(self) -> None:
        orders = self._orders()
        self.life.close()
        self.closed = True
        self.ref.close(orders)
        self.check()
        assert all(a.state in DONE for a in self.ref.areas), "an area outlived close()"
        assert self.total.pages.live == 0
        assert self.hv.params.free_per_iteration == self.initial_fpi

    def drain_then_exit(self) -> None:
        """The compositor lets go of everything: the backlog drains in drain_target."""
        self.mapped.clear()
        self.hv.refresh()
        self.ref.refresh()
        if readable(self.life.event_fd):
            self.life.on_event()
            self.ref.scan()
        assert self.life.awaiting == 0
        self.life.poll()
        self.ref.poll(self.hv.deferred_pages)
        self.check()
        for _ in range(math.ceil(self.ref.policy.drain_target)):
            self.clock.now += 1.0
            self.hv.advance()
            self.life.poll()
            self.ref.poll(self.hv.deferred_pages)
            self.check()
        assert self.hv.deferred_pages == 0, "the backlog outlived drain_target"
        assert self.hv.params.free_per_iteration == self.initial_fpi
        self._close()
        assert self.hv.deferred_pages == 0

    def exit_while_mapped(self) -> None:
        """The proxy stops first; the kernel then drains at the restored pace."""
        self._close()
        self.hv.advance()  # a tick the steps' little times made due
        backlog = self.hv.deferred_pages
        self.mapped.clear()
        self.hv.refresh()
        self.ref.refresh()
        if backlog:
            fpi = self.initial_fpi
            ticks = 1 if fpi == 0 else math.ceil(backlog / fpi)
            per_tick = [backlog] if fpi == 0 else (
                [fpi] * (ticks - 1) + [backlog - fpi * (ticks - 1)])
            before = len(self.hv.counters.history)
            self.clock.now += ticks
            assert self.hv.advance() == ticks
            assert self.hv.counters.history[before:] == per_tick
        assert self.hv.deferred_pages == 0

    def check_all_gone(self) -> None:
        c = self.hv.counters
        assert (c.deferred_count, c.live_refs, c.gntalloc_pages, c.open_memfds,
                c.leaked_count) == (0, 0, 0, 0, 0)
        assert self.hv.timer_due is None
        assert self.hv._mappings == []
        assert self.hv._ports == {}
        assert not self.vm._shared and not self.gui._mappings
        for counters in [self.total] + [conn.counters for conn in self.ref.all_conns]:
            assert counters.pages.live == counters.pages.cached == 0
            assert counters.pages.awaiting_unmap == 0

    def cleanup(self) -> None:
        with contextlib.suppress(Exception):
            if self.lt is not None and not self.closed:
                self.lt.close()
        self.mapped.clear()
        with contextlib.suppress(Exception):
            self.hv.refresh()
        with contextlib.suppress(Exception):
            self.halves.close()
        with contextlib.suppress(Exception):
            self.hv.params.free_per_iteration = 0
            self.clock.now += 2
            self.hv.advance()
        shutil.rmtree(self.root, ignore_errors=True)


LifetimesVersusReference.TestCase.settings = settings(
    max_examples=150, stateful_step_count=40, deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
TestLifetimesVersusReference = LifetimesVersusReference.TestCase


# -- the simulated hypervisor as the lifetimes use it ---------------------------------------

PIDS = (4101, 4102)


@dataclass
class Rig:
    """Both halves on a simulated hypervisor, two watched compositor processes."""

    clock: FakeClock
    maps: dict[int, set[FileId]]
    hv: SimHypervisor
    halves: GrantHalves
    vm_port: int = 0
    gui_port: int = 0

    def area(self, pages: int) -> tuple[Grant, int, FileId, Mapping]:
        """A grant with its notify byte armed, mapped with a notify on the one port."""
        grant = self.halves.sharing.share(pages * PAGE_SIZE)
        offset = pages * PAGE_SIZE - 1
        self.halves.sharing.set_notify_byte(grant, offset)
        mapping = self.halves.mapping.map(grant.granter, grant.refs, notify_byte=offset,
                                          notify_port=self.gui_port)
        return grant, offset, file_id(mapping.area.fd), mapping

    def cleared(self, grant: Grant, offset: int) -> bool:
        return self.halves.sharing.notify_byte_cleared(grant, offset)


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[Rig]:
    clock = FakeClock()
    maps: dict[int, set[FileId]] = {}
    hv = SimHypervisor(tmp_path, clock=clock, maps_reader=lambda pid: set(maps.get(pid, ())))
    halves = sim_halves(hv)
    for pid in PIDS:
        halves.watch_compositor(pid)
    r = Rig(clock, maps, hv, halves)
    r.vm_port = halves.sharing.open_channel()
    r.gui_port = halves.mapping.connect_channel(halves.sharing.own_domid, r.vm_port)
    yield r
    maps.clear()
    hv.refresh()
    halves.close()
    hv.params.free_per_iteration = 0
    clock.now += 2
    hv.advance()
    assert hv.counters.live_refs == 0 and hv.counters.open_memfds == 0


# Covered in test_sim_model.py, so not repeated here: a mapping's notify waiting for
# every watched process once the mapping side has let go
# (test_map_notify_waits_for_watched_processes), explicit notifies on a masked port
# coalescing (test_fired_port_stays_masked_until_unmask), backlogs draining by whole
# multiples of free_per_iteration (test_backlog_drains_tick_by_tick).


def test_notify_waits_for_the_mapping_side_after_the_processes(rig: Rig) -> None:
    """The other order: every process munmaps first, then the mapping side lets go."""
    grant, offset, fid, mapping = rig.area(2)
    for pid in PIDS:
        rig.maps[pid] = {fid}
    rig.maps[PIDS[0]].clear()
    rig.hv.refresh()
    rig.maps[PIDS[1]].clear()
    rig.hv.refresh()  # nothing maps it but the mapping side: no notify yet
    assert not rig.cleared(grant, offset)
    assert rig.halves.sharing.fired_ports() == []
    assert not readable(rig.halves.sharing.event_fd())
    rig.halves.mapping.unmap(mapping)  # the last one: it fires at once
    assert rig.cleared(grant, offset)
    assert readable(rig.halves.sharing.event_fd())
    assert rig.halves.sharing.fired_ports() == [rig.vm_port]
    rig.halves.sharing.unmask([rig.vm_port])
    rig.hv.refresh()
    assert rig.halves.sharing.fired_ports() == []
    assert rig.halves.sharing.end(grant) is Unshared.ENDED


def test_one_port_for_many_unmap_notifies(rig: Rig) -> None:
    """The lifetimes' layout: every mapping's notify on one port. While it is masked
    notifies coalesce into one delivery at unmask; unmasked, each notify is delivered
    once; the bytes are cleared regardless, which is what a scan reads."""
    sharing = rig.halves.sharing
    areas = [rig.area(n) for n in (1, 2, 3, 1)]
    unmap = [lambda m=m: rig.halves.mapping.unmap(m) for _, _, _, m in areas]
    unmap[0]()
    assert sharing.fired_ports() == [rig.vm_port]  # delivered, and now masked
    unmap[1]()
    unmap[2]()
    assert not readable(sharing.event_fd())
    assert sharing.fired_ports() == []
    assert all(rig.cleared(g, off) for g, off, _, _ in areas[:3])
    sharing.unmask([rig.vm_port])  # the two coalesced: one delivery
    assert readable(sharing.event_fd())
    assert sharing.fired_ports() == [rig.vm_port]
    sharing.unmask([rig.vm_port])  # nothing more pending
    assert not readable(sharing.event_fd())
    assert sharing.fired_ports() == []
    rig.hv.refresh()
    assert sharing.fired_ports() == []  # no notify fires twice
    unmap[3]()  # unmasked: delivered at once, once
    assert rig.cleared(*areas[3][:2])
    assert sharing.fired_ports() == [rig.vm_port]
    sharing.unmask([rig.vm_port])
    assert sharing.fired_ports() == []
    for grant, _, _, _ in areas:
        assert sharing.end(grant) is Unshared.ENDED


def test_deferred_grants_drain_free_per_iteration_per_tick(rig: Rig) -> None:
    """25 pages the compositor still mmaps when they are ended: none freed while it
    maps them, then 10, 10 and 5 at free_per_iteration 10, one tick a second."""
    assert rig.hv.params.free_per_iteration == 10
    areas = [rig.area(n) for n in (7, 9, 9)]
    for grant, _, fid, mapping in areas:
        rig.maps.setdefault(PIDS[0], set()).add(fid)
        rig.halves.mapping.unmap(mapping)
        assert rig.halves.sharing.end(grant) is Unshared.DEFERRED
    assert rig.hv.deferred_pages == 25
    assert rig.hv.counters.gntalloc_pages == 0  # gntalloc no longer counts them
    rig.clock.now += 1
    assert rig.hv.advance() == 1
    assert rig.hv.counters.history == [0]  # still mmapped: retried, kept
    rig.maps[PIDS[0]].clear()
    for n in range(1, 4):
        rig.clock.now += 0.5
        assert rig.hv.advance() == 0
        rig.clock.now += 0.5
        assert rig.hv.advance() == 1
        assert rig.hv.deferred_pages == 25 - sum(rig.hv.counters.history)
        assert rig.hv.timer_due == (None if n == 3 else rig.clock.now + 1)
    assert rig.hv.counters.history == [0, 10, 10, 5]
    assert rig.hv.counters.live_refs == 0 and rig.hv.counters.open_memfds == 0


def test_ending_after_munmap_before_refresh(rig: Rig) -> None:
    """The kernel looks at the mmaps when a grant is ended, not only at refresh: an
    area the compositor munmapped ends at once though its notify has not fired yet;
    the notify still arrives later and writes nothing into the freed pages."""
    grant, offset, fid, mapping = rig.area(3)
    rig.maps[PIDS[1]] = {fid}
    rig.halves.mapping.unmap(mapping)  # waits for the compositor
    rig.maps[PIDS[1]].clear()  # no refresh yet
    assert not rig.cleared(grant, offset)
    assert rig.halves.sharing.end(grant) is Unshared.ENDED
    assert rig.hv.deferred_pages == 0
    assert rig.hv.counters.live_refs == 0 and rig.hv.counters.open_memfds == 0
    assert rig.halves.sharing.fired_ports() == []
    rig.hv.refresh()
    assert rig.halves.sharing.fired_ports() == [rig.vm_port]
    assert rig.hv._mappings == []
