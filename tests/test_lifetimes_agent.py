"""Agent-mode grant lifetimes (qubesshm/grants/agentareas.py) on the simulated hypervisor.

The VM's sharing half is domain 1; a second ``SimBackend``, domain 0, plays the
GUI daemon and maps areas read-only as a dump would, so "still mapped" is the
hypervisor's own answer: ending a grant it maps defers it. Time is an injected
clock. Fixed scenarios pin down each rule of the module docstring; a hypothesis
state machine drives windows, a daemon that processes messages in order and
ACKs dumps (through the agent's real ``AckOrder``), restarts, daemons without
ACKs and the timer, and checks after every step that no area is ever both
reusable and possibly mapped, that the ledger matches the grant table, and at
the end that everything ended or drained and nothing leaked.
"""

from __future__ import annotations

import contextlib
import math
import shutil
import tempfile
from collections.abc import Callable, Iterator
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

from qubesshm.agent.acks import AckOrder
from qubesshm.grants.agentareas import (
    AWAITING_RELEASE,
    AgentArea,
    AgentLifetimes,
    image_pages,
    image_size,
    release_summary,
)
from qubesshm.grants.api import PAGE_SIZE, MappedArea
from qubesshm.grants.halves import GUI_DOMID, VM_DOMID, GrantHalves, sim_halves
from qubesshm.grants.ledger import ClientCounters
from qubesshm.grants.lifetimes import (
    AreaState,
    GrantLimit,
    LifetimePolicy,
    NoRoom,
)
from qubesshm.grants.simulated import SimBackend, SimHypervisor, _Entry

T0 = 100.0
LIVE = (AreaState.IN_USE, AreaState.CACHED, AWAITING_RELEASE)
HELD = (AreaState.IN_USE, AreaState.CACHED)
DONE = (AreaState.ENDED, AreaState.DEFERRED)
# A 64x64 window: 16384 bytes, exactly four pages (no notify byte in agent mode).
SIDE = 64
FOUR = image_size(SIDE, SIDE)


class FakeClock:
    def __init__(self, start: float = T0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now


@dataclass
class World:
    """The agent's lifetimes over domain 1, and domain 0 mapping as the daemon."""

    root: Path
    clock: FakeClock
    hv: SimHypervisor
    halves: GrantHalves
    vm: SimBackend
    gui: SimBackend
    life: AgentLifetimes
    total: ClientCounters = field(default_factory=ClientCounters)
    clients: dict[int, ClientCounters] = field(default_factory=dict)
    # The daemon's mappings of each area, as it maps dumps.
    maps: dict[AgentArea, list[MappedArea]] = field(default_factory=dict)
    rooms: list[float] = field(default_factory=list)  # when on_room was called

    def open(self, owner: int) -> ClientCounters:
        counters = self.clients[owner] = ClientCounters()
        self.life.open_connection(owner, (counters, self.total))
        return counters

    def dump(self, area: AgentArea) -> MappedArea:
        """The daemon maps a dump of ``area``, read-only, as the GUI domain."""
        mapped = self.gui.map([(VM_DOMID, ref) for ref in area.refs], writable=False)
        self.maps.setdefault(area, []).append(mapped)
        return mapped

    def detach(self, area: AgentArea) -> None:
        for mapped in self.maps.pop(area, []):
            self.gui.unmap(mapped)

    def mapped(self, area: AgentArea) -> bool:
        return bool(self.maps.get(area))

    def tick(self, seconds: float = 1.0) -> None:
        """The timer: the kernel's deferred-reclaim ticks, then ``poll``."""
        self.clock.now += seconds
        self.hv.advance()
        self.life.poll()

    def fpi(self) -> int:
        return self.hv.params.free_per_iteration


def make_world(root: Path, policy: LifetimePolicy, *, fpi: int = 10,
               limit: int = 1 << 20) -> World:
    clock = FakeClock()
    hv = SimHypervisor(root, clock=clock, maps_reader=lambda pid: set())
    hv.params.free_per_iteration = fpi
    hv.params.gntalloc_limit = limit
    halves = sim_halves(hv)
    vm, gui = halves.backends
    assert isinstance(vm, SimBackend) and isinstance(gui, SimBackend)
    assert (vm.domid, gui.domid) == (VM_DOMID, GUI_DOMID)
    # The agent has the sharing half only (GrantHalves' mapping half goes unused).
    life = AgentLifetimes(halves, policy, clock=clock)
    world = World(root, clock, hv, halves, vm, gui, life)
    life.on_room = lambda: world.rooms.append(clock())
    return world


def finish(world: World) -> None:
    """Close, let the daemon go, drain: nothing may be left anywhere."""
    world.life.close()
    assert all(a.state in DONE for a in world.maps), "an area outlived close()"
    for area in list(world.maps):
        world.detach(area)
    for _ in range(64):
        if not world.hv.deferred_pages:
            break
        world.clock.now += 1
        world.hv.advance()
    c = world.hv.counters
    assert (c.deferred_count, c.live_refs, c.gntalloc_pages, c.open_memfds,
            c.leaked_count) == (0, 0, 0, 0, 0)
    for counters in [world.total, *world.clients.values()]:
        p = counters.pages
        assert (p.live, p.in_use, p.cached, p.awaiting_unmap) == (0, 0, 0, 0)
    assert world.life._connections == {}


Maker = Callable[..., World]


@pytest.fixture
def make(tmp_path: Path) -> Iterator[Maker]:
    worlds: list[World] = []

    def build(policy: LifetimePolicy | None = None, **kwargs: int) -> World:
        root = tmp_path / f"sim{len(worlds)}"
        root.mkdir(mode=0o700)
        world = make_world(root, policy or LifetimePolicy(), **kwargs)
        worlds.append(world)
        return world

    yield build
    for world in worlds:
        with contextlib.suppress(Exception):
            world.halves.close()


# -- areas of window images -----------------------------------------------------------------


def test_an_area_is_whole_pages_of_the_image_and_nothing_more(make: Maker) -> None:
    world = make()
    world.open(1)
    assert image_size(SIDE, SIDE) == 4 * SIDE * SIDE == 4 * PAGE_SIZE
    area = world.life.take(1, FOUR)
    assert area.pages == 4 == len(area.refs), "no notify byte: no extra page"
    assert area.capacity == FOUR and not area.reused
    odd = world.life.take(1, image_size(33, 17))  # 2244 bytes
    assert odd.pages == 1 == image_pages(2244)
    with area.pixels() as view:
        view[0:4] = b"\x01\x02\x03\x04"  # XRGB from page 0: the daemon sees it
        view[-1] = 0xFF
    mapped = world.dump(area)
    with open(mapped.fd, "rb", closefd=False) as seen:
        assert seen.read(4) == b"\x01\x02\x03\x04"
    assert mapped.size == 4 * PAGE_SIZE and not mapped.writable
    assert world.total.pages.in_use == 5 == world.total.pages.live
    assert world.hv.counters.gntalloc_pages == 5
    finish(world)


def test_confirmed_and_unmapped_ends_at_once(make: Maker) -> None:
    world = make()
    counters = world.open(1)
    area = world.life.take(1, FOUR)
    world.dump(area)
    world.clock.now += 0.5
    world.life.let_go(area)
    assert area.state is AWAITING_RELEASE is AreaState.AWAITING_UNMAP
    assert world.life.pending_releases == 1 and world.life.pending_release_pages == 4
    assert (counters.pages.in_use, counters.pages.awaiting_unmap) == (0, 4)
    world.detach(area)  # the daemon's next message let go of it ...
    world.clock.now += 0.04
    assert world.life.confirm_released(area) is AreaState.ENDED  # ... and its ACK came
    c = world.life.counters
    assert (c.ended_on_release, c.wrong_releases, c.deferred_areas) == (1, 0, 0)
    assert c.confirm_latency.samples == [pytest.approx(40.0)]
    assert world.hv.deferred_pages == 0 and world.hv.counters.live_refs == 0
    assert (counters.pages.live, counters.pages.unshared_total,
            counters.pages.deferred_at_unshare) == (0, 4, 0)
    assert world.life.pending_releases == 0
    # An ACK for an area already settled changes nothing.
    assert world.life.confirm_released(area) is AreaState.ENDED
    assert c.late_confirms == 1 and c.ended_on_release == 1
    finish(world)


def test_a_wrong_confirm_is_deferred_and_counted(make: Maker) -> None:
    world = make(fpi=1)
    counters = world.open(1)
    area = world.life.take(1, FOUR)
    world.dump(area)
    world.life.let_go(area)
    # The agent says released, but the daemon still maps it.
    assert world.life.confirm_released(area) is AreaState.DEFERRED
    c = world.life.counters
    assert (c.wrong_releases, c.deferred_areas, c.ended_on_release) == (1, 1, 0)
    assert counters.pages.deferred_at_unshare == 4
    assert world.hv.deferred_pages == 4
    stats = world.life.stats(pending_acks=0)
    assert stats["wrong_releases"] == 1 and stats["pending_releases"] == 0
    assert "1 wrong" in release_summary(stats)
    world.tick()
    assert world.fpi() == 2, "raised to drain 4 pages within drain_target"
    world.tick()
    assert world.hv.deferred_pages == 4, "still mapped: the kernel keeps it"
    world.detach(area)
    world.tick()
    world.tick()
    assert world.hv.deferred_pages == 0
    assert world.fpi() == 1 and c.fpi_restores == 1
    finish(world)


def test_never_confirmed_goes_to_deferred_after_late_timeout_in_batches(
        make: Maker) -> None:
    world = make(LifetimePolicy(late_timeout=2.0, defer_batch=8, drain_target=2.0), fpi=2)
    world.open(1)
    areas = [world.life.take(1, FOUR) for _ in range(5)]
    for area in areas:
        world.dump(area)
    for area in areas:
        world.life.let_go(area)
    c = world.life.counters
    world.tick(1.9)
    assert c.late_releases == 0 and all(a.state is AWAITING_RELEASE for a in areas)
    world.tick(0.1)  # late now: one batch of at most 8 pages a second
    assert c.late_releases == 5 and c.defer_batches == 1
    assert [a.state for a in areas] == [AreaState.DEFERRED] * 2 + [AWAITING_RELEASE] * 3
    assert world.hv.deferred_pages == 8 and world.fpi() == 4 and c.fpi_raises == 1
    world.life.poll()  # within the second: no second batch
    assert c.defer_batches == 1
    world.tick()
    assert c.defer_batches == 2 and world.hv.deferred_pages == 16 and world.fpi() == 8
    world.tick()
    assert c.defer_batches == 3 and all(a.state is AreaState.DEFERRED for a in areas)
    assert c.deferred_areas == 5 and c.peak_backlog == 20 and c.fpi_raises == 3
    assert world.fpi() == 10
    assert world.life.pending_releases == 0
    for area in areas:
        world.detach(area)  # the daemon lets go at last
    seconds = 0
    while world.hv.deferred_pages:
        world.tick()
        seconds += 1
    assert seconds <= 2, "the backlog drains within drain_target"
    world.tick()
    assert world.fpi() == 2 and c.fpi_restores == 1, "free_per_iteration as found"
    # An ACK that comes after all that changes nothing.
    assert world.life.confirm_released(areas[0]) is AreaState.DEFERRED
    assert c.late_confirms == 1 and c.wrong_releases == 0
    finish(world)


def test_all_late_sends_every_awaiting_area_to_the_late_path_at_the_next_poll(
        make: Maker) -> None:
    world = make(LifetimePolicy(late_timeout=30.0, defer_batch=4))
    world.open(1)
    areas = [world.life.take(1, FOUR) for _ in range(4)]
    for area in areas:
        world.dump(area)
    for area in areas[:3]:
        world.life.let_go(area)
    # The daemon restarted: the old one's mappings went with it, but one hung.
    for area in areas[:2]:
        world.detach(area)
    world.clock.now += 0.1
    assert world.life.all_late() == 3
    assert world.life.all_late() == 0, "already late"
    world.life.let_go(areas[3])  # let go after the restart: not late
    c = world.life.counters
    assert c.forced_late == 3
    for _ in range(3):
        world.tick()
    assert [a.state for a in areas] == [AreaState.ENDED, AreaState.ENDED,
                                        AreaState.DEFERRED, AWAITING_RELEASE]
    assert (c.late_releases, c.defer_batches, c.deferred_areas) == (3, 3, 1)
    assert world.life.pending_releases == 1
    world.detach(areas[3])
    assert world.life.confirm_released(areas[3]) is AreaState.ENDED
    world.detach(areas[2])
    finish(world)


# -- recycling -------------------------------------------------------------------------------


def test_recycling_across_clients_only_after_confirm(make: Maker) -> None:
    world = make()
    one, two = world.open(1), world.open(2)
    area = world.life.take(1, FOUR)
    world.dump(area)
    world.life.give_back(area)
    assert area.state is AWAITING_RELEASE, "never cached straight from in use"
    assert not world.life._cache
    other = world.life.take(2, FOUR)
    assert other is not area and not other.reused, "not reusable before its release"
    world.detach(area)
    assert world.life.confirm_released(area) is AreaState.CACHED
    assert world.life.counters.recycled_on_release == 1
    assert (one.pages.cached, one.pages.live) == (4, 4)
    again = world.life.take(2, FOUR)
    assert again is area and area.reused and area.owner == 2
    c = world.life.counters
    assert (c.cache_hits, c.cache_misses) == (1, 2)
    assert (one.pages.live, one.pages.cached, one.pages.handed_over) == (0, 0, 4)
    assert (two.pages.live, two.pages.in_use, two.pages.taken_over) == (8, 8, 4)
    assert world.total.pages.live == 8 == world.hv.counters.gntalloc_pages
    assert world.total.pages.in_use == 8 and world.total.pages.cached == 0
    # A smaller window takes a cached area at least half its size; a tiny one does not.
    world.life.give_back(other)
    world.life.confirm_released(other)
    tiny = world.life.take(1, image_size(8, 8))
    assert tiny is not other and tiny.pages == 1
    small = world.life.take(1, image_size(SIDE, SIDE // 2))  # two pages
    assert small is other and small.pages == 4 and small.owner == 1
    finish(world)


def test_a_client_gone_ends_its_areas_instead_of_caching_them(make: Maker) -> None:
    world = make()
    world.open(1)
    cached, awaiting, in_use = (world.life.take(1, FOUR) for _ in range(3))
    for area in (cached, awaiting, in_use):
        world.dump(area)
    world.life.give_back(cached)
    world.detach(cached)
    world.life.confirm_released(cached)
    world.life.give_back(awaiting)
    world.life.close_connection(1)
    assert cached.state is AreaState.ENDED
    assert in_use.state is AWAITING_RELEASE and not in_use.recycle
    world.detach(awaiting)
    assert world.life.confirm_released(awaiting) is AreaState.ENDED, "its client is gone"
    world.detach(in_use)
    assert world.life.confirm_released(in_use) is AreaState.ENDED
    assert world.life._connections == {}
    finish(world)


def test_a_wrong_confirm_of_a_cached_area_is_counted_when_it_ends(make: Maker) -> None:
    """gntalloc cannot tell that a grant is mapped without ending it: a wrong
    confirmation of an area given back shows only when the area ends."""
    world = make(LifetimePolicy(cache_pages=4))
    world.open(1)
    first, second = world.life.take(1, FOUR), world.life.take(1, FOUR)
    world.dump(first)
    world.life.give_back(first)
    assert world.life.confirm_released(first) is AreaState.CACHED  # wrongly
    assert world.life.counters.wrong_releases == 0
    world.life.give_back(second)
    world.life.confirm_released(second)  # right: nothing mapped it
    assert first.state is AreaState.DEFERRED, "evicted for the second, and deferred"
    c = world.life.counters
    assert (c.evictions, c.wrong_releases, c.deferred_areas) == (1, 1, 1)
    world.detach(first)
    finish(world)


def test_confirming_an_area_in_use_or_cached_is_a_bug(make: Maker) -> None:
    world = make()
    world.open(1)
    area = world.life.take(1, FOUR)
    with pytest.raises(ValueError, match="in_use: only an area let go"):
        world.life.confirm_released(area)
    world.life.give_back(area)
    world.life.confirm_released(area)
    with pytest.raises(ValueError, match="cached"):
        world.life.confirm_released(area)
    world.life.let_go(area)  # not in use: a no-op
    assert area.state is AreaState.CACHED
    with pytest.raises(ValueError, match="already has areas"):
        world.life.open_connection(1, ())
    finish(world)


def test_end_at_once_is_what_agents_without_a_release_rule_do(make: Maker) -> None:
    world = make(LifetimePolicy(end_at_once=True))
    world.open(1)
    mapped, unmapped = world.life.take(1, FOUR), world.life.take(1, FOUR)
    world.dump(mapped)
    world.life.give_back(mapped)
    world.life.give_back(unmapped)
    assert (mapped.state, unmapped.state) == (AreaState.DEFERRED, AreaState.ENDED)
    assert not world.life._cache and world.life.pending_releases == 0
    assert sum(world.life.counters.retired_while_held.values()) == 8
    world.tick()
    assert world.fpi() == 10, "free_per_iteration left as found"
    world.detach(mapped)
    finish(world)


# -- limits --------------------------------------------------------------------------------------


def test_the_client_cap_makes_a_window_wait_until_an_area_is_let_go(make: Maker) -> None:
    world = make(LifetimePolicy(client_pages=12))
    world.open(1)
    first, second, third = (world.life.take(1, FOUR) for _ in range(3))
    with pytest.raises(NoRoom, match="--client-pages"):
        world.life.take(1, FOUR)
    assert world.life.counters.no_room == 1
    world.dump(first)
    world.life.give_back(first)
    assert world.rooms, "on_room: an area left its window"
    fourth = world.life.take(1, FOUR)
    assert fourth is not first, "not before its release is confirmed"
    world.detach(first)
    # Cached, it would count for the client again, past its cap: it ends.
    assert world.life.confirm_released(first) is AreaState.ENDED
    world.life.give_back(second)
    world.rooms.clear()
    assert world.life.confirm_released(second) is AreaState.CACHED
    assert world.rooms, "on_room: a cached area may serve a waiting window"
    with pytest.raises(GrantLimit, match="what a client may hold"):
        world.life.take(1, image_size(SIDE, 4 * SIDE))
    assert world.life.take(1, FOUR) is second
    assert third.state is fourth.state is AreaState.IN_USE
    finish(world)


def test_a_confirmed_area_makes_older_cached_ones_of_its_client_give_way(
        make: Maker) -> None:
    world = make(LifetimePolicy(client_pages=6))
    world.open(1)
    two = image_size(SIDE, SIDE // 2)
    kept = world.life.take(1, two)
    newer = world.life.take(1, FOUR)
    world.life.give_back(newer)
    older = world.life.take(1, two)
    world.life.give_back(older)
    assert world.life.confirm_released(older) is AreaState.CACHED
    # Cached too, newer would pass the cap (2 in use + 2 + 4 cached): older goes.
    assert world.life.confirm_released(newer) is AreaState.CACHED
    assert older.state is AreaState.ENDED and world.life.counters.evictions == 1
    assert kept.state is AreaState.IN_USE
    assert world.clients[1].pages.cached == 4
    finish(world)


def test_a_foreign_cached_area_is_taken_only_within_the_cap(make: Maker) -> None:
    world = make(LifetimePolicy(client_pages=4))
    world.open(1)
    world.open(2)
    area = world.life.take(1, FOUR)
    world.life.give_back(area)
    world.life.confirm_released(area)
    other = world.life.take(2, image_size(16, 16))  # one page: the cached one is too big
    assert other is not area
    with pytest.raises(NoRoom):
        world.life.take(2, FOUR)  # the foreign one would pass client 2's cap
    assert area.state is AreaState.CACHED and area.owner == 1
    world.life.let_go(other)
    world.life.confirm_released(other)
    assert world.life.take(2, FOUR) is area
    finish(world)


def test_the_gntalloc_limit_waits_for_a_release_then_defers_for_room(
        make: Maker) -> None:
    world = make(LifetimePolicy(client_pages=100), limit=12)
    world.open(1)
    areas = [world.life.take(1, FOUR) for _ in range(3)]
    for area in areas:
        world.dump(area)
    with pytest.raises(NoRoom, match="gntalloc limit of 12 pages"):
        world.life.take(1, FOUR)
    with pytest.raises(GrantLimit, match="gntalloc limit of 12 pages"):
        world.life.take(1, image_size(SIDE, 4 * SIDE))
    world.life.let_go(areas[0])
    assert world.rooms, "on_room when an area leaves its window"
    world.detach(areas[0])
    world.rooms.clear()
    world.life.confirm_released(areas[0])
    assert world.rooms, "on_room on the release"
    fresh = world.life.take(1, FOUR)
    assert world.life.counters.deferred_for_room == 0
    # Still mapped and let go: it goes to deferred reclaim to make room.
    world.life.let_go(areas[1])
    late = world.life.take(1, FOUR)
    assert areas[1].state is AreaState.DEFERRED
    assert world.life.counters.deferred_for_room == 1
    assert world.hv.counters.gntalloc_pages == 12
    assert fresh.state is late.state is AreaState.IN_USE
    world.detach(areas[1])
    finish(world)


def test_close_ends_or_defers_everything_and_restores_fpi(make: Maker) -> None:
    world = make(LifetimePolicy(late_timeout=1.0), fpi=1)
    world.open(1)
    world.open(2)
    areas = [world.life.take(owner, FOUR) for owner in (1, 1, 2, 2, 2)]
    for area in areas:
        world.dump(area)
    world.life.give_back(areas[0])
    world.detach(areas[0])
    world.life.confirm_released(areas[0])  # cached
    world.life.let_go(areas[1])  # awaiting, mapped
    world.life.give_back(areas[2])
    world.detach(areas[2])  # awaiting, unmapped
    world.life.let_go(areas[3])
    world.tick(1.0)  # late: one deferred, fpi raised
    assert world.fpi() > 1
    world.life.close()
    assert [a.state for a in areas] == [AreaState.ENDED, AreaState.DEFERRED,
                                        AreaState.ENDED, AreaState.DEFERRED,
                                        AreaState.DEFERRED]
    assert world.fpi() == 1, "restored at exit"
    assert world.life.counters.wrong_releases == 0
    finish(world)


# -- the state machine ----------------------------------------------------------------------------

STEP = 2.0**-8
SIZES = st.sampled_from([1, 1, 2, 2, 3, 4, 6])  # pages of a window image


@dataclass
class Window:
    wid: int
    owner: int
    area: AgentArea | None = None


@dataclass(frozen=True)
class Dump:
    wid: int
    area: AgentArea
    generation: int  # the area's take this dump is of


@dataclass(frozen=True)
class Unmap:
    wid: int


@dataclass(frozen=True)
class Barrier:
    pass


@dataclass
class DaemonMapping:
    mapped: MappedArea
    area: AgentArea
    generation: int  # the area's take this dump was of


class AgentVersusDaemon(RuleBasedStateMachine):
    """Windows of a few clients through a daemon that processes messages in order and
    ACKs each dump; the agent confirms releases by the ACK order."""

    def __init__(self) -> None:
        super().__init__()
        self.root = Path(tempfile.mkdtemp(prefix="qubesshm-agent-lifetimes-"))
        self.world: World | None = None
        self.windows: dict[int, Window] = {}
        self.next_wid = 1
        self.next_owner = 1
        self.owners: set[int] = set()
        self.generation: dict[AgentArea, int] = {}
        self.entries: dict[AgentArea, list[_Entry]] = {}
        self.areas: list[AgentArea] = []
        # Agent -> daemon messages not yet processed; daemon -> agent ACKs not yet read.
        self.to_daemon: list[Dump | Unmap | Barrier] = []
        self.acks_in_flight = 0
        self.daemon_acks = True
        self.shown: dict[int, DaemonMapping] = {}  # the daemon's current dump per window
        self.hung: list[DaemonMapping] = []  # kept by an old daemon that hangs
        self.order: AckOrder[AgentArea] = AckOrder()
        self.initial_fpi = 0
        self.sync_at_exit = False
        self.healthy = False

    @property
    def w(self) -> World:
        assert self.world is not None
        return self.world

    @initialize(fpi=st.sampled_from([1, 2, 10]), limit=st.sampled_from([12, 24, 1 << 20]),
                cache_pages=st.none() | st.sampled_from([0, 4, 12]),
                client_pages=st.sampled_from([None, 4, 8]),
                late_timeout=st.sampled_from([0.5, 2.0, 10.0]),
                defer_batch=st.sampled_from([1, 4, 2048]),
                acks=st.sampled_from([True, True, True, False]), sync_at_exit=st.booleans())
    def setup(self, fpi: int, limit: int, cache_pages: int | None, client_pages: int | None,
              late_timeout: float, defer_batch: int, acks: bool, sync_at_exit: bool) -> None:
        policy = LifetimePolicy(cache_pages=cache_pages, client_pages=client_pages,
                                late_timeout=late_timeout, defer_batch=defer_batch)
        self.world = make_world(self.root, policy, fpi=fpi, limit=limit)
        self.initial_fpi = fpi
        self.daemon_acks = acks
        self.sync_at_exit = sync_at_exit
        self.order = AckOrder(acks=acks)
        for _ in range(2):  # two clients with a window each
            self._open()
            self._new_window(self.next_owner - 1, 2)

    def _begin(self) -> None:
        self.healthy = False
        self.w.clock.now += STEP

    def _open(self) -> None:
        self.w.open(self.next_owner)
        self.owners.add(self.next_owner)
        self.next_owner += 1

    # -- the agent -------------------------------------------------------------------------

    def _send_dump(self, window: Window) -> None:
        assert window.area is not None
        self.to_daemon.append(Dump(window.wid, window.area, self.generation[window.area]))
        self.order.dump_sent(self.w.clock())

    def _let_go(self, area: AgentArea, recycle: bool) -> None:
        self.order.let_go(area)
        if recycle:
            self.w.life.give_back(area)
        else:
            self.w.life.let_go(area)

    def _take(self, owner: int, pages: int) -> AgentArea | None:
        size = pages * PAGE_SIZE - 3
        try:
            area = self.w.life.take(owner, size)
        except (NoRoom, GrantLimit):
            return None
        assert area.state is AreaState.IN_USE and area.owner == owner
        assert area.capacity >= size
        if area.reused:
            assert area in self.generation, "a reused area no take gave before"
        else:
            assert area not in self.generation
            self.areas.append(area)
            self.entries[area] = [self.w.hv._entries[r] for r in area.refs]
        self.generation[area] = self.generation.get(area, 0) + 1
        return area

    @rule(close=st.sampled_from([False, False, True]), data=st.data())
    def client(self, close: bool, data: st.DataObject) -> None:
        """A client connects (at most three), or one goes: its windows are destroyed
        first, as the agent does."""
        self._begin()
        if not close and len(self.owners) < 3:
            self._open()
            return
        if not self.owners:
            return
        owner = data.draw(st.sampled_from(sorted(self.owners)), label="owner")
        for window in [w for w in self.windows.values() if w.owner == owner]:
            self._destroy(window, recycle=data.draw(st.booleans(), label="recycle"))
        self.w.life.close_connection(owner)
        self.owners.discard(owner)

    @precondition(lambda self: bool(self.owners))
    @rule(data=st.data(), pages=SIZES)
    def new_window(self, data: st.DataObject, pages: int) -> None:
        self._begin()
        self._new_window(data.draw(st.sampled_from(sorted(self.owners)), label="owner"),
                         pages)

    def _new_window(self, owner: int, pages: int) -> None:
        area = self._take(owner, pages)
        if area is not None:
            window = Window(self.next_wid, owner, area)
            self.next_wid += 1
            self.windows[window.wid] = window
            self._send_dump(window)

    @precondition(lambda self: bool(self.windows))
    @rule(data=st.data(), pages=SIZES, recycle=st.booleans())
    def resize(self, data: st.DataObject, pages: int, recycle: bool) -> None:
        """A window changes size: a new area and dump; the old one is let go."""
        self._begin()
        window = data.draw(st.sampled_from(sorted(self.windows.values(),
                                                  key=lambda w: w.wid)), label="window")
        old = window.area
        area = self._take(window.owner, pages)
        if area is None:
            return
        window.area = area
        self._send_dump(window)
        if old is not None:
            self._let_go(old, recycle)

    def _destroy(self, window: Window, recycle: bool) -> None:
        self.to_daemon.append(Unmap(window.wid))
        if window.area is not None:
            self._let_go(window.area, recycle)
        del self.windows[window.wid]

    @precondition(lambda self: bool(self.windows))
    @rule(data=st.data(), recycle=st.booleans())
    def destroy(self, data: st.DataObject, recycle: bool) -> None:
        self._begin()
        window = data.draw(st.sampled_from(sorted(self.windows.values(),
                                                  key=lambda w: w.wid)), label="window")
        self._destroy(window, recycle)

    @precondition(lambda self: bool(self.windows))
    @rule(data=st.data(), sync=st.sampled_from([True, True, False]))
    def churn(self, data: st.DataObject, sync: bool) -> None:
        """A window closes and another of the same size opens, for the same client or
        another: the closed one's area may serve it only once its release came."""
        self._begin()
        window = data.draw(st.sampled_from(sorted(self.windows.values(),
                                                  key=lambda w: w.wid)), label="window")
        assert window.area is not None
        pages = window.area.pages
        self._destroy(window, recycle=True)
        if sync:
            self.round_trip()
        if self.owners:
            self._new_window(data.draw(st.sampled_from(sorted(self.owners)), label="owner"),
                             pages)

    @rule()
    def barrier(self) -> None:
        """Nothing follows a let-go: a barrier dump, whose only use is its ACK."""
        self._begin()
        if self.order.needs_barrier:
            self.to_daemon.append(Barrier())
            self.order.dump_sent(self.w.clock())

    @precondition(lambda self: self.acks_in_flight > 0)
    @rule(count=st.integers(1, 4))
    def read_acks(self, count: int) -> None:
        self._begin()
        for _ in range(min(count, self.acks_in_flight)):
            self.acks_in_flight -= 1
            released, waited = self.order.ack(self.w.clock())
            self.w.life.note_ack(waited)
            for area in released:
                state = self.w.life.confirm_released(area)
                assert state in (AreaState.ENDED, AreaState.CACHED, AreaState.DEFERRED)

    # -- the daemon ------------------------------------------------------------------------

    def _detach(self, wid: int) -> None:
        shown = self.shown.pop(wid, None)
        if shown is not None:
            self.w.gui.unmap(shown.mapped)

    @precondition(lambda self: bool(self.to_daemon))
    @rule(count=st.integers(1, 5))
    def daemon(self, count: int) -> None:
        """The daemon processes messages in order: a dump lets go of the window's
        previous one, maps the new one and is ACKed; UNMAP lets go of the current."""
        self._begin()
        for _ in range(min(count, len(self.to_daemon))):
            message = self.to_daemon.pop(0)
            if isinstance(message, Unmap):
                self._detach(message.wid)
                continue
            if isinstance(message, Dump):
                self._detach(message.wid)
                # A dump of an area the late path already ended fails to map, as an
                # ended grant does on Xen; the ACK comes all the same.
                area = message.area
                if all(self.w.hv._entries.get(e.ref) is e for e in self.entries[area]):
                    mapped = self.w.gui.map([(VM_DOMID, r) for r in area.refs],
                                            writable=False)
                    self.shown[message.wid] = DaemonMapping(mapped, area, message.generation)
            if self.daemon_acks:
                self.acks_in_flight += 1

    @rule()
    def round_trip(self) -> None:
        """The agent is idle: a barrier if a let-go waits for one, the daemon catches
        up with every message, and the agent reads every ACK."""
        self._begin()
        self.barrier()
        self.daemon(len(self.to_daemon))
        self.read_acks(self.acks_in_flight)

    @rule(go=st.sampled_from([False, False, False, True]), acks=st.booleans(),
          hang=st.booleans())
    def restart_daemon(self, go: bool, acks: bool, hang: bool) -> None:
        """A new daemon (with ACKs or without): the old one's mappings go with it, but
        those of areas already let go may linger while it hangs; nothing pending will
        be ACKed. Every window is sent again."""
        self._begin()
        if not go:
            return
        for wid in list(self.shown):
            shown = self.shown[wid]
            current = self.windows.get(wid)
            if hang and (current is None or current.area is not shown.area):
                self.hung.append(self.shown.pop(wid))
            else:
                self._detach(wid)
        self.to_daemon.clear()
        self.acks_in_flight = 0
        self.daemon_acks = acks
        late = self.order.reset(acks=acks)
        awaiting = [a for a in self.areas if a.state is AWAITING_RELEASE]
        assert all(a.state in (AWAITING_RELEASE, *DONE) for a in late)
        # Every area awaiting release waited for this daemon, or was made late before.
        assert {a for a in awaiting if not a.forced_late} <= set(late)
        expected = sum(not a.forced_late for a in awaiting)
        assert self.w.life.all_late() == expected
        assert all(a.forced_late for a in awaiting)
        for window in sorted(self.windows.values(), key=lambda w: w.wid):
            if window.area is not None:
                self._send_dump(window)

    @precondition(lambda self: bool(self.hung))
    @rule()
    def hung_daemon_exits(self) -> None:
        self._begin()
        for shown in self.hung:
            self.w.gui.unmap(shown.mapped)
        self.hung.clear()

    @rule(seconds=st.sampled_from([0.25, 0.5, 1.0, 2.5]))
    def tick(self, seconds: float) -> None:
        self._begin()
        self.w.tick(seconds)
        if self.w.hv.deferred_pages == 0:
            assert self.w.fpi() == self.initial_fpi, "free_per_iteration not restored"

    # -- invariants --------------------------------------------------------------------------

    def _daemon_maps(self) -> list[DaemonMapping]:
        return list(self.shown.values()) + self.hung

    @invariant()
    def no_area_is_both_reusable_and_possibly_mapped(self) -> None:
        if self.world is None:
            return
        for shown in self._daemon_maps():
            area = shown.area
            assert area.state is not AreaState.CACHED, f"{area} cached while the daemon maps it"
            if area.state is AreaState.IN_USE:
                assert shown.generation == self.generation[area], (
                    f"{area} serves a new window while the daemon maps its old image")
            assert area.state is not AreaState.ENDED, f"{area} ended while mapped"
        assert self.w.life.counters.wrong_releases == 0

    @invariant()
    def ledger_matches_the_grant_table(self) -> None:
        if self.world is None:
            return
        w = self.w
        live = [a for a in self.areas if a.state in LIVE]
        pages = sum(a.pages for a in live)
        assert w.hv.counters.gntalloc_pages == pages == w.life._live_pages()
        assert w.total.pages.live == pages
        for state, got in ((AreaState.IN_USE, w.total.pages.in_use),
                           (AreaState.CACHED, w.total.pages.cached),
                           (AWAITING_RELEASE, w.total.pages.awaiting_unmap)):
            assert got == sum(a.pages for a in live if a.state is state), state
        for owner, counters in w.clients.items():
            assert counters.pages.live == sum(a.pages for a in live if a.owner == owner)
        assert w.hv.counters.leaked_count == 0
        for area in self.areas:
            present = [w.hv._entries.get(e.ref) is e for e in self.entries[area]]
            if area.state in LIVE:
                assert all(present) and not any(e.deferred for e in self.entries[area])
            elif area.state is AreaState.ENDED:
                assert not any(present) and not any(e.deferred for e in self.entries[area])
            else:
                assert all(e.deferred for e in self.entries[area])
        policy = w.life.policy
        if policy.client_pages is not None:
            for owner in self.owners:
                held = sum(a.pages for a in live if a.owner == owner and a.state in HELD)
                assert held <= policy.client_pages
        if policy.cache_pages is not None:
            assert w.total.pages.cached <= policy.cache_pages
        self.healthy = True

    # -- the end ---------------------------------------------------------------------------------

    def teardown(self) -> None:
        try:
            if self.healthy and self.world is not None:
                w = self.w
                if self.sync_at_exit:  # the daemon catches up before the agent stops
                    self.round_trip()
                    self.no_area_is_both_reusable_and_possibly_mapped()
                    self.ledger_matches_the_grant_table()
                w.life.close()
                assert all(a.state in DONE for a in self.areas), "an area outlived close()"
                assert w.fpi() == self.initial_fpi
                for shown in self._daemon_maps():
                    w.gui.unmap(shown.mapped)
                self.shown.clear()
                self.hung.clear()
                backlog = w.hv.deferred_pages
                w.clock.now += math.ceil(backlog / self.initial_fpi) + 1
                w.hv.advance()
                c = w.hv.counters
                assert (c.deferred_count, c.live_refs, c.gntalloc_pages, c.open_memfds,
                        c.leaked_count) == (0, 0, 0, 0, 0), "something leaked"
                for counters in [w.total, *w.clients.values()]:
                    p = counters.pages
                    assert (p.live, p.in_use, p.cached, p.awaiting_unmap) == (0, 0, 0, 0)
                    assert p.shared_total + p.taken_over - p.handed_over == p.unshared_total
        finally:
            if self.world is not None:
                with contextlib.suppress(Exception):
                    self.world.halves.close()
            shutil.rmtree(self.root, ignore_errors=True)


AgentVersusDaemon.TestCase.settings = settings(
    max_examples=100, stateful_step_count=60, deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
TestAgentVersusDaemon = AgentVersusDaemon.TestCase
