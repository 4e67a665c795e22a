"""Grant lifetimes: recycle the grants of output buffers, end them only once unmapped.

Sans-IO core over the two grant halves, with an injected clock; the I/O layer
calls it when a buffer is needed or let go, when the event channel fires, and on
a timer. An *area* is one grant of whole pages and its mapping, with the
compositor's ``wl_shm_pool`` over it. Its life:

- **in use** by an output buffer of some surface;
- **cached** when no surface needs it (surface gone, resized, queue trimmed): the
  upstream pool and the mapping stay, and the next buffer that fits, of any
  surface of the same compositor connection, gets it instead of a new grant. The
  cache is bounded in pages and evicts the least recently used;
- **awaiting unmap** once evicted (or its connection closed): the upstream pool
  is destroyed and the mapping half lets go, but the compositor may still map
  the pages. Each mapping carries an unmap notify that clears a byte of the area
  (the last byte of the last page, which no buffer may use) and signals the
  connection's one event channel; an event means "scan the areas' bytes", and
  each cleared one is **ended** at once, never deferred;
- **deferred**: an area still mapped ``late_timeout`` after it was let go is
  handed to the kernel's deferred reclaim, in batches of at most ``defer_batch``
  pages a second. While the backlog the proxy caused is not empty,
  ``free_per_iteration`` is raised so it drains within ``drain_target`` seconds,
  and the value found is written back once it is empty (and at exit).

Limits: a client holds at most ``client_pages`` (in use and cached); the proxy's
pages stay under the gntalloc limit by evicting, then by handing the oldest
awaiting areas to deferred reclaim (which the kernel no longer counts). A request
that does not fit now raises ``NoRoom``: the caller waits, and ``on_room`` is
called whenever pages are given back or ended, so it can try again. Only a
request that can never fit (one buffer larger than the client's cap or the
gntalloc limit) is refused with ``GrantLimit``.

The cache, the limits, the late path (batches, ``free_per_iteration``) and the
counters are ``LifetimesCore``'s; ``GrantLifetimes`` adds what proxy mode has: the
mapping half, the compositor's pools and the unmap notify. Agent mode, where the
mapping side is the Qubes GUI daemon and the release signal is its ACK order, is
``agentareas.AgentLifetimes`` on the same core.
"""

from __future__ import annotations

import enum
import errno
import logging
import math
from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Concatenate, Generic, ParamSpec, Protocol, TypeVar

from .api import PAGE_SIZE, Unshared
from .ledger import ClientCounters, Latency
from .mapping import Mapping, MappingHalf
from .sharing import Grant, GrantUnavailable, SharingHalf

log = logging.getLogger("qubesshm.grants")

# What the cache and one client may hold by default: the cache 64 MiB, a client three
# 3840x2160 ARGB buffers in use and the cache's 64 MiB besides (40 687 pages, 159 MiB);
# where the gntalloc limit is smaller, a quarter of it and half of it, so that no
# client can take the whole limit from the others.
DEFAULT_CACHE_PAGES = 16384
UHD_BUFFER_PAGES = -(-(3840 * 2160 * 4 + 1) // PAGE_SIZE)  # with the notify byte: 8101
DEFAULT_CLIENT_PAGES = 3 * UHD_BUFFER_PAGES + DEFAULT_CACHE_PAGES
CACHE_SHARE = 0.25
CLIENT_SHARE = 0.5
# A cached area serves a buffer needing at least this share of its pages.
FIT_SHARE = 0.5
DEFER_INTERVAL = 1.0  # seconds between batches: the kernel's reclaim tick
KERNEL_TICK = 1.0


class AreaState(enum.Enum):
    IN_USE = "in_use"
    CACHED = "cached"
    # Let go, the other side may still map it (agent mode: its release is not yet
    # confirmed; ``agentareas.AWAITING_RELEASE`` names it so).
    AWAITING_UNMAP = "awaiting_unmap"
    DEFERRED = "deferred"  # handed to the kernel's deferred reclaim
    ENDED = "ended"


class GrantLimit(Exception):
    """The area can never be had within the limits (one buffer is larger than the
    client's cap or the gntalloc limit); the text names the limit and its option."""


class NoRoom(Exception):
    """No area can be had within the limits now; one may be once pages are given back
    or ended (``GrantLifetimes.on_room`` says when to try again)."""


@dataclass(eq=False)
class GrantArea:
    """One grant of whole pages and where it is in its life."""

    grant: Grant
    owner: int
    state: AreaState = AreaState.IN_USE
    since: float = 0.0  # when it entered its state
    late: bool = False
    # Late now, whatever its age (agent mode: the daemon that could release it is gone).
    forced_late: bool = False
    # Taken from the cache (not freshly shared) the last time it was taken.
    reused: bool = False
    # Counted in retired_while_held since it last backed a buffer (once per buffer).
    held_when_freed: bool = False

    @property
    def pages(self) -> int:
        return self.grant.pages

    def __str__(self) -> str:
        return f"area of {self.pages} pages (refs {self.grant.refs[0]}..)"


@dataclass(eq=False, kw_only=True)
class Area(GrantArea):
    """Proxy mode's area: the grant, its mapping, and the compositor's pool over it."""

    mapping: Mapping
    # The compositor's wl_shm_pool over the mapping, on the owner's connection.
    pool_id: int = 0

    @property
    def notify_offset(self) -> int:
        return self.pages * PAGE_SIZE - 1

    @property
    def capacity(self) -> int:
        """Bytes a buffer may use: all but the notify byte."""
        return self.pages * PAGE_SIZE - 1


def pages_for(size: int) -> int:
    """Pages of an area holding ``size`` bytes of pixels and the notify byte."""
    return -(-(size + 1) // PAGE_SIZE)


def default_cache_pages(limit: int | None) -> int:
    """The cache's bound when ``--cache-pages`` is not given."""
    if limit is None:
        return DEFAULT_CACHE_PAGES
    return min(DEFAULT_CACHE_PAGES, int(limit * CACHE_SHARE))


def default_client_pages(limit: int | None) -> int:
    """One client's cap when ``--client-pages`` is not given."""
    if limit is None:
        return DEFAULT_CLIENT_PAGES
    return min(DEFAULT_CLIENT_PAGES, int(limit * CLIENT_SHARE))


@dataclass
class LifetimePolicy:
    # None: the defaults above, or a share of a gntalloc limit smaller than they need.
    cache_pages: int | None = None
    client_pages: int | None = None
    late_timeout: float = 2.0
    defer_batch: int = 2048
    drain_target: float = 2.0
    # End an area's grants the moment it stops backing a buffer, mapped or not, keep
    # no cache and leave free_per_iteration alone: what a GUI agent without unmap
    # notify does (the churn benchmark's kernel-default and qubes policies).
    end_at_once: bool = False
    # The simulated GUI domain keeps each area mapped this long after the proxy lets
    # it go: a compositor that releases late (simulated grants only).
    hold: float = 0.0


@dataclass
class LifetimeCounters:
    """What the lifetimes did, for ``qubesshm stats`` and the exit summary."""

    cache_hits: int = 0
    cache_misses: int = 0  # fresh areas shared: no cached one fitted
    evictions: int = 0
    ended_by_notify: int = 0
    late_releases: int = 0
    defer_batches: int = 0
    deferred_areas: int = 0  # handed to deferred reclaim: late, at exit or for room
    deferred_for_room: int = 0  # of those, to stay under the gntalloc limit
    refused: int = 0  # GrantLimit raised
    no_room: int = 0  # NoRoom raised: a request told to wait (each retry counts)
    # Most pages backing buffers at once, counting requests refused for want of pages:
    # the smallest gntalloc limit the run needed (the cache gives way under it).
    peak_wanted: int = 0
    fpi_raises: int = 0
    fpi_restores: int = 0
    peak_backlog: int = 0  # most pages seen on the deferred list for this proxy
    # Evicted or left by its connection -> the unmap notify, in milliseconds.
    unmap_latency: Latency = field(default_factory=Latency)
    # Pages of areas that stopped backing a buffer while the compositor still held
    # them (their pool kept for the cache, or still mapped when let go), by the
    # second of the run: what a GUI agent that ends grants as soon as a buffer goes,
    # with no unmap notify, hands to deferred reclaim. The run report models that.
    retired_while_held: dict[int, int] = field(default_factory=dict)
    # Agent mode (``agentareas``): the release signal is the GUI daemon's ACK order.
    ended_on_release: int = 0  # release confirmed: ended at once
    recycled_on_release: int = 0  # release confirmed: cached for another window
    # Release confirmed (or cached after one), yet the kernel deferred its grants:
    # the GUI domain still mapped it, so the confirmation was wrong.
    wrong_releases: int = 0
    # Confirmed once it had already ended or gone to deferred reclaim (late, for
    # room, or at close).
    late_confirms: int = 0
    forced_late: int = 0  # made late at once: the daemon restarted or sends no ACKs
    peak_pending_releases: int = 0  # most areas awaiting their release at once
    # Let go -> its release confirmed, in milliseconds.
    confirm_latency: Latency = field(default_factory=Latency)
    # A dump sent -> its ACK, in milliseconds (the agent adds these).
    ack_latency: Latency = field(default_factory=Latency)


class SharingSide(Protocol):
    """What the core needs of the grant layer: the sharing half, and the kernel's
    deferred list where it is visible (``GrantHalves`` is one)."""

    sharing: SharingHalf

    def deferred_pages(self) -> int | None: ...


class Halves(SharingSide, Protocol):
    mapping: MappingHalf


A = TypeVar("A", bound=GrantArea)


@dataclass(eq=False)
class Owner(Generic[A]):
    """One client's areas and the counters they report into."""

    owner: int
    counters: tuple[ClientCounters, ...]
    open: bool = True
    areas: set[A] = field(default_factory=set)

    def held_pages(self) -> int:
        return sum(a.pages for a in self.areas
                   if a.state in (AreaState.IN_USE, AreaState.CACHED))


@dataclass(eq=False, kw_only=True)
class _Connection(Owner[Area]):
    """A compositor connection: one event channel for all its areas' notifies."""

    destroy_upstream: Callable[[Area], None]
    vm_port: int
    gui_port: int


C = TypeVar("C", bound=Owner[Any])
P = ParamSpec("P")
R = TypeVar("R")
Core = TypeVar("Core", bound="LifetimesCore[Any, Any]")


def reads_limit_once(method: Callable[Concatenate[Core, P], R]
                     ) -> Callable[Concatenate[Core, P], R]:
    """Within one call of ``method`` the gntalloc limit is read once (a file: sysfs on
    Xen, the simulated kernel's on the simulation), not once for each bound derived from
    it; every call reads it afresh, so an admin's change counts from the next one."""
    def once(self: Core, /, *args: P.args, **kwargs: P.kwargs) -> R:
        if self._in_call:
            return method(self, *args, **kwargs)  # within an outer call
        self._in_call = True
        try:
            return method(self, *args, **kwargs)
        finally:
            self._in_call = False
            self._limit_read = None
    once.__name__, once.__doc__ = method.__name__, method.__doc__
    return once


class LifetimesCore(ABC, Generic[A, C]):
    """The cache, the limits, the late path and ``free_per_iteration``, whatever
    signals that the other side let go of an area."""

    # A cached area serves a request of any owner (agent mode), or only of its own
    # (proxy mode: the compositor's pool over it is on its owner's connection).
    shared_cache = False
    # The lifetimes count pages.in_use themselves (agent mode); the proxy's bridge
    # counts them as buffers are attached and released.
    counts_in_use = False
    # What an area holds, in messages: "a buffer of 12 pages is more than ...".
    holds = "buffer"

    def __init__(self, side: SharingSide, policy: LifetimePolicy | None = None, *,
                 clock: Callable[[], float]) -> None:
        self.side = side
        self.policy = policy or LifetimePolicy()
        self.clock = clock
        self.counters = LifetimeCounters()
        self.started = clock()
        self._connections: dict[int, C] = {}
        self._cache: OrderedDict[A, None] = OrderedDict()  # least recently used first
        self._awaiting: OrderedDict[A, None] = OrderedDict()  # oldest first
        self._live = 0  # pages shared and not yet ended or deferred: gntalloc's count
        self._next_batch = 0.0
        # Called when pages are given back or ended: a request that met NoRoom may fit.
        self.on_room: Callable[[], None] | None = None
        self._found_fpi: int | None = None  # free_per_iteration before we raised it
        self._tune_refused = False
        self._estimate = 0.0  # backlog where the kernel does not show it
        self._estimated_at = clock()
        # The gntalloc limit as read in the current call (``reads_limit_once``).
        self._in_call = False
        self._limit_read: tuple[int | None] | None = None
        # A ``give_back(trim=False)`` left the cache for ``trim`` to bring within bound.
        self.trim_due = False

    # -- what each mode does -----------------------------------------------------

    @abstractmethod
    def close_connection(self, owner: int) -> None:
        """The owner is gone: let go of its areas."""

    @abstractmethod
    def _new_area(self, conn: C, pages: int) -> A:
        """A fresh area of ``pages`` pages for ``conn``, counted as shared."""

    @abstractmethod
    def _evicted(self, area: A) -> None:
        """``area`` left the cache to make room: let go of it."""

    @abstractmethod
    def _maybe_mapped(self, area: A) -> bool:
        """Whether the other side may still map ``area``, asked before its grants end
        (where the kernel does not say whether they ended or were deferred)."""

    def _pages_for(self, size: int) -> int:
        return pages_for(size)

    def _adopt(self, area: A, conn: C) -> None:
        """A cached ``area`` of another owner serves ``conn`` (shared cache only)."""
        raise AssertionError("the cache is not shared between owners")

    def _settle(self) -> None:
        """Before making room: take in releases that may have happened unseen."""

    def _before_poll(self, now: float) -> None:
        """Timer work of the mode, before late areas are looked at."""

    def _after_close(self) -> None:
        """Last work of the mode at close, once every awaiting area was ended."""

    def _forgotten(self, conn: C) -> None:
        """``conn`` is closed and has no area left."""

    # -- areas ---------------------------------------------------------------------

    @reads_limit_once
    def take(self, owner: int, size: int) -> A:
        """An area for ``size`` bytes: from the cache if one fits, else freshly shared.
        ``NoRoom`` when the limits leave no room now, ``GrantLimit`` when they never
        will."""
        conn = self._connections[owner]
        need = self._pages_for(size)
        if self.trim_due:
            self._trim_cache()  # an area given back in this batch is cached within bound
        found = self._cached_fit(conn, need)
        if found is not None:
            del self._cache[found]
            if found.owner != conn.owner:
                self._adopt(found, conn)
            self._move(found, AreaState.IN_USE)
            found.held_when_freed = False
            found.reused = True
            self.counters.cache_hits += 1
            self.counters.peak_wanted = max(self.counters.peak_wanted, self._in_use_pages())
            return found
        try:
            self._make_room(conn, need)
            area = self._new_area(conn, need)
        except GrantLimit:
            self.counters.refused += 1
            raise
        except NoRoom:
            self.counters.no_room += 1
            raise
        # A miss is a fresh grant: a request that waits or is refused made none.
        self.counters.cache_misses += 1
        return area

    def poll(self) -> None:
        """Timer work: hand late areas to deferred reclaim, keep the backlog draining."""
        now = self.clock()
        self._before_poll(now)
        late = []
        for area in self._awaiting:
            if not area.forced_late and now - area.since < self.policy.late_timeout:
                break  # oldest first: the rest are younger
            if not area.late:
                area.late = True
                self.counters.late_releases += 1
            late.append(area)
        if late and now >= self._next_batch:
            self._next_batch = now + DEFER_INTERVAL
            self.counters.defer_batches += 1
            handed = 0
            for area in late:
                if handed and handed + area.pages > self.policy.defer_batch:
                    break
                handed += area.pages
                self._end(area)
        self._tune()

    @property
    def awaiting(self) -> int:
        """Areas let go and waiting for the other side to let go of them too."""
        return len(self._awaiting)

    def close(self) -> None:
        """The proxy stops: whatever still waits goes to deferred reclaim, and
        free_per_iteration gets the value it had."""
        for owner in list(self._connections):
            self.close_connection(owner)
        self._settle()
        for area in list(self._awaiting):
            self._end(area)
        self._after_close()
        for conn in list(self._connections.values()):
            self._forget_if_done(conn)
        self._restore_fpi()

    # -- internals ---------------------------------------------------------------------

    def room_for(self, pages: int) -> str | None:
        """Why one area of ``pages`` pages could never be had (the limit it passes and
        the option that raises it), or None when it could."""
        limit = self._limit()
        if limit is not None and pages > limit:
            return (f"the gntalloc limit is {limit} pages, less than the {pages} pages "
                    "of")
        bound = self._client_bound()
        if pages > bound:
            return (f"one client may hold {bound} pages (--client-pages), less than the "
                    f"{pages} pages of")
        return None

    def _limit(self) -> int | None:
        if self._limit_read is not None:
            return self._limit_read[0]
        try:
            limit = self.side.sharing.backend.gntalloc_limit()
        except OSError:
            limit = None
        if self._in_call:
            self._limit_read = (limit,)
        return limit

    def _cache_bound(self) -> int:
        if self.policy.cache_pages is not None:
            return self.policy.cache_pages
        return default_cache_pages(self._limit())

    def _client_bound(self) -> int:
        if self.policy.client_pages is not None:
            return self.policy.client_pages
        return default_client_pages(self._limit())

    def _cached_fit(self, conn: C, need: int) -> A | None:
        best: A | None = None
        # An area of another owner counts for this one once taken: only within its cap.
        room = self._client_bound() - conn.held_pages() if self.shared_cache else 0
        for area in reversed(self._cache):  # most recently used first
            mine = area.owner == conn.owner
            if ((mine or (self.shared_cache and area.pages <= room))
                    and need <= area.pages and need >= area.pages * FIT_SHARE
                    and (best is None or area.pages < best.pages)):
                best = area
        return best

    def _live_pages(self) -> int:
        """Pages gntalloc counts for this proxy: shared and not yet ended or deferred."""
        return self._live

    def _make_room(self, conn: C, need: int) -> None:
        # What the gntalloc limit must allow for this buffer to be had without evicting
        # or deferring anything (the report's "needs a limit of at least").
        self.counters.peak_wanted = max(self.counters.peak_wanted,
                                        self._in_use_pages() + need)
        bound = self._client_bound()
        limit = self._limit()
        over_limit = limit is not None and need > limit
        if need > bound or over_limit:
            # Name every limit it passes: raising one alone would not make it fit.
            passed, fixes = [], []
            if over_limit:
                passed.append(f"the gntalloc limit of {limit} pages")
                fixes.append("raise the limit with --gntalloc-limit N (or qubesshm tune "
                             "--gntalloc-limit N)")
            if need > bound:
                passed.append(f"what a client may hold ({bound} pages)")
                fixes.append("raise --client-pages")
            raise GrantLimit(f"a {self.holds} of {need} pages is more than "
                             f"{' and '.join(passed)}; {' and '.join(fixes)}")
        for area in [a for a in self._cache if a.owner == conn.owner]:
            if conn.held_pages() + need <= bound:
                break
            self._evict(area)
        if conn.held_pages() + need > bound:
            raise NoRoom(f"the client holds {conn.held_pages()} pages of grants and {need} "
                         f"more would pass its limit of {bound} (--client-pages)")
        if limit is None:
            return
        if self._in_use_pages() + need > limit:
            # Nothing evicted or deferred could make room: wait before touching them.
            raise NoRoom(self._over_limit(need, limit))
        # Areas whose release nobody took in yet (an unmap notify's byte may be clear).
        self._settle()
        for area in list(self._cache):
            if self._live_pages() + need <= limit:
                break
            self._evict(area)
        for area in list(self._awaiting):
            if self._live_pages() + need <= limit:
                break
            # The kernel does not count deferred grants against gntalloc's limit.
            self.counters.deferred_for_room += 1
            self._end(area)
        if self._live_pages() + need > limit:
            raise NoRoom(self._over_limit(need, limit))

    def _in_use_pages(self) -> int:
        """Pages of areas buffers use: the only ones no eviction or deferral frees."""
        return (self._live - sum(a.pages for a in self._cache)
                - sum(a.pages for a in self._awaiting))

    def _over_limit(self, need: int, limit: int) -> str:
        return (f"{self._live_pages()} pages of grants are in use and {need} more would "
                f"pass the gntalloc limit of {limit} pages (--gntalloc-limit)")

    def _shared(self, conn: C, area: A) -> None:
        """A fresh ``area`` of ``conn``: count it."""
        conn.areas.add(area)
        self._live += area.pages
        for c in conn.counters:
            c.pages.shared(area.pages)
            if self.counts_in_use:
                c.pages.in_use += area.pages

    def _trim_cache(self) -> None:
        self.trim_due = False
        bound = self._cache_bound()
        while self._cache and sum(a.pages for a in self._cache) > bound:
            self._evict(next(iter(self._cache)))

    def _evict(self, area: A) -> None:
        """Out of the cache, to make room."""
        del self._cache[area]
        self.counters.evictions += 1
        self._evicted(area)

    def _retired_while_held(self, area: A) -> None:
        if area.held_when_freed:
            return  # counted when the app let go of its buffer
        area.held_when_freed = True
        second = int(self.clock() - self.started)
        held = self.counters.retired_while_held
        held[second] = held.get(second, 0) + area.pages

    def _end(self, area: A) -> None:
        """End the grant: at once when unmapped, else through deferred reclaim."""
        self._awaiting.pop(area, None)
        conn = self._connections[area.owner]
        mapped = self._maybe_mapped(area)
        try:
            outcome = self.side.sharing.end(area.grant)
        except OSError as exc:
            log.error("cannot end the grants of %s: %s", area, exc)
            outcome = Unshared.DEFERRED
        deferred = outcome is Unshared.DEFERRED or (
            outcome is Unshared.UNREPORTED and mapped)
        if deferred:
            self.counters.deferred_areas += 1
            self._drain_estimate()
            self._estimate += area.pages
        self._move(area, AreaState.DEFERRED if deferred else AreaState.ENDED)
        self._live -= area.pages
        self._room()
        for c in conn.counters:
            c.pages.unshared(area.pages, deferred=deferred)
        conn.areas.discard(area)
        self._forget_if_done(conn)

    def _forget_if_done(self, conn: C) -> None:
        if conn.open or conn.areas or self._connections.get(conn.owner) is not conn:
            return
        del self._connections[conn.owner]
        self._forgotten(conn)

    def _room(self) -> None:
        if self.on_room is not None:
            self.on_room()

    def _move(self, area: A, state: AreaState) -> None:
        if area.state is AreaState.IN_USE:
            self._room()  # given back: cached, evictable, or on its way to ending
        conn = self._connections[area.owner]
        for c in conn.counters:
            if area.state is AreaState.CACHED:
                c.pages.cached -= area.pages
            elif area.state is AreaState.AWAITING_UNMAP:
                c.pages.awaiting_unmap -= area.pages
            elif area.state is AreaState.IN_USE and self.counts_in_use:
                c.pages.in_use -= area.pages
            if state is AreaState.CACHED:
                c.pages.cached += area.pages
            elif state is AreaState.AWAITING_UNMAP:
                c.pages.awaiting_unmap += area.pages
            elif state is AreaState.IN_USE and self.counts_in_use:
                c.pages.in_use += area.pages
        area.state = state
        area.since = self.clock()

    # -- free_per_iteration ------------------------------------------------------------

    def backlog(self) -> int:
        """Pages this proxy has on the kernel's deferred list (estimated where the
        kernel does not show it: handed over, minus free_per_iteration a second)."""
        shown = self.side.deferred_pages()
        if shown is not None:
            return shown
        self._drain_estimate()
        return math.ceil(self._estimate)

    def _drain_estimate(self) -> None:
        """What the kernel reclaimed since the estimate was last brought up to date."""
        now = self.clock()
        fpi = self._fpi()
        elapsed, self._estimated_at = now - self._estimated_at, now
        if fpi == 0:
            self._estimate = 0.0
        elif fpi is not None:
            self._estimate = max(0.0, self._estimate - fpi * elapsed / KERNEL_TICK)

    def free_per_iteration(self) -> int | None:
        return self._fpi()

    def _fpi(self) -> int | None:
        try:
            return self.side.sharing.backend.status().free_per_iteration
        except OSError:
            return None

    def _tune(self) -> None:
        backlog = self.backlog()
        self.counters.peak_backlog = max(self.counters.peak_backlog, backlog)
        if self.policy.end_at_once:
            return  # as an agent without unmap notify: free_per_iteration as found
        current = self._fpi()
        if current is None:
            return
        if backlog == 0:
            self._restore_fpi()
            return
        if current == 0:
            return  # no limit per tick: it drains on the next tick
        if self._found_fpi is None:
            self._found_fpi = current
        want = max(self._found_fpi, math.ceil(backlog * KERNEL_TICK / self.policy.drain_target))
        if want > current and self._write_fpi(want, backlog):
            self.counters.fpi_raises += 1

    def _restore_fpi(self) -> None:
        found, self._found_fpi = self._found_fpi, None
        if found is None or self._fpi() == found:
            return
        if self._write_fpi(found, 0):
            self.counters.fpi_restores += 1

    def _write_fpi(self, value: int, backlog: int) -> bool:
        if self._tune_refused:
            return False
        try:
            self.side.sharing.backend.set_free_per_iteration(value)
        except OSError as exc:
            if exc.errno not in (errno.EACCES, errno.EPERM, errno.EROFS):
                raise
            self._tune_refused = True
            log.warning("cannot set free_per_iteration to %d (%s): %d deferred grants drain "
                        "at the kernel's pace; let the proxy do it, or run as a user who "
                        "may: qubesshm tune --free-per-iteration %d", value,
                        exc.strerror or exc, backlog, value)
            return False
        log.info("free_per_iteration set to %d (deferred backlog %d pages)", value, backlog)
        return True


class GrantLifetimes(LifetimesCore[Area, _Connection]):
    """Every area of the proxy, across its compositor connections."""

    def __init__(self, halves: Halves, policy: LifetimePolicy | None = None, *,
                 clock: Callable[[], float]) -> None:
        super().__init__(halves, policy, clock=clock)
        self.halves = halves
        # Mappings the simulated GUI domain still holds (``policy.hold``): when each
        # goes, with its area.
        self._holding: list[tuple[float, Area]] = []

    # -- connections -----------------------------------------------------------

    def open_connection(self, owner: int, destroy_upstream: Callable[[Area], None],
                        counters: Sequence[ClientCounters]) -> None:
        """A compositor connection: one event channel for all its areas' notifies.
        ``destroy_upstream`` destroys an evicted area's pool on that connection."""
        sharing = self.halves.sharing
        vm_port = sharing.open_channel()
        try:
            gui_port = self.halves.mapping.connect_channel(sharing.own_domid, vm_port)
        except OSError:
            sharing.close_channel(vm_port)
            raise
        self._connections[owner] = _Connection(owner, tuple(counters),
                                               destroy_upstream=destroy_upstream,
                                               vm_port=vm_port, gui_port=gui_port)

    def close_connection(self, owner: int) -> None:
        """The connection is gone, and with it the compositor's pools: every area of it
        waits for its unmap notify."""
        conn = self._connections.get(owner)
        if conn is None or not conn.open:
            return
        conn.open = False
        for area in sorted(conn.areas, key=lambda a: a.since):
            if area.state in (AreaState.IN_USE, AreaState.CACHED):
                self._let_go(area)
        # Each armed notify holds the mapping side's port until it has fired.
        self.halves.mapping.close_channel(conn.gui_port)
        self._forget_if_done(conn)

    # -- areas for output buffers -------------------------------------------------

    def take(self, owner: int, size: int) -> Area:
        """An area for a buffer of ``size`` bytes: from the owner's cache if one fits
        (its ``pool_id`` is set), else freshly shared and mapped (``pool_id`` 0).
        ``NoRoom`` when the limits leave no room now, ``GrantLimit`` when they never
        will."""
        return super().take(owner, size)

    @reads_limit_once
    def give_back(self, area: Area, *, trim: bool = True) -> None:
        """No buffer uses ``area`` now (its upstream buffer is destroyed, its pool kept).

        It is cached at once, for the next buffer that fits. With ``trim`` False the
        cache may pass its bound until ``trim()``: the proxy calls that once the batch
        that gave the area back has gone on, as the bound comes from the gntalloc limit
        (a file read) and eviction is nothing the client or the compositor waits for."""
        if area.state is not AreaState.IN_USE:
            return
        conn = self._connections[area.owner]
        if not conn.open or self.policy.end_at_once:
            self._drop(area)
            return
        # The compositor keeps the pool (and its mapping) while the area is cached.
        self._retired_while_held(area)
        self._move(area, AreaState.CACHED)
        self._cache[area] = None
        if trim:
            self._trim_cache()
        else:
            self.trim_due = True

    @reads_limit_once
    def trim(self) -> None:
        """Bring the cache within its bound, if a ``give_back(trim=False)`` left it
        to do (the gntalloc limit read afresh)."""
        if self.trim_due:
            self._trim_cache()

    def let_go(self, area: Area) -> None:
        """No buffer uses ``area`` and it must not be reused: the compositor may still
        show what it holds (a buffer it never released). Its pool is destroyed upstream
        and it waits for its unmap notify, or goes to deferred reclaim when late."""
        if area.state is AreaState.IN_USE:
            self._drop(area)

    def freed_while_held(self, area: Area) -> None:
        """The app let go of the buffer ``area`` backs while the compositor still holds
        it (a window closed under a close animation): the moment an agent that ends
        grants as buffers go would end this one, and defer it."""
        self._retired_while_held(area)

    # -- the event channel ------------------------------------------------------------

    @property
    def event_fd(self) -> int:
        return self.halves.sharing.event_fd()

    def on_event(self) -> None:
        """The event channel fired: end every awaiting area whose byte was cleared."""
        ports = self.halves.sharing.fired_ports()
        self.scan()
        # A connection whose last area just ended has closed its port.
        bound = {conn.vm_port for conn in self._connections.values()}
        ports = [port for port in ports if port in bound]
        if ports:
            self.halves.sharing.unmask(ports)

    def scan(self) -> None:
        for area in list(self._awaiting):
            self._end_if_unmapped(area)

    def _end_if_unmapped(self, area: Area) -> None:
        """End ``area`` if its unmap notify has cleared its byte."""
        if self.halves.sharing.notify_byte_cleared(area.grant, area.notify_offset):
            self.counters.ended_by_notify += 1
            self.counters.unmap_latency.add((self.clock() - area.since) * 1000.0)
            self._end(area)

    # -- the core's hooks -----------------------------------------------------------------

    def _new_area(self, conn: _Connection, pages: int) -> Area:
        sharing, mapping = self.halves.sharing, self.halves.mapping
        try:
            grant = sharing.share(pages * PAGE_SIZE)
        except GrantUnavailable as exc:
            raise (NoRoom if exc.transient else GrantLimit)(str(exc)) from exc
        offset = pages * PAGE_SIZE - 1
        sharing.set_notify_byte(grant, offset)
        try:
            mapped = mapping.map(grant.granter, grant.refs, notify_byte=offset,
                                 notify_port=conn.gui_port)
        except OSError as exc:
            sharing.end(grant)
            raise GrantLimit(f"cannot map the grants of a {pages}-page buffer: "
                             f"{exc.strerror or exc}") from exc
        area = Area(grant, conn.owner, mapping=mapped, since=self.clock())
        self._shared(conn, area)
        return area

    def _evicted(self, area: Area) -> None:
        """Destroy its upstream pool, let the mapping go."""
        self._drop(area)

    def _maybe_mapped(self, area: Area) -> bool:
        return not self.halves.sharing.notify_byte_cleared(area.grant, area.notify_offset)

    def _settle(self) -> None:
        # Areas whose notify was missed by nobody yet: their byte may already be clear.
        self.scan()

    def _before_poll(self, now: float) -> None:
        self._let_held_go(now)

    def _after_close(self) -> None:
        self._let_held_go(math.inf)

    def _forgotten(self, conn: _Connection) -> None:
        try:
            self.halves.sharing.close_channel(conn.vm_port)
        except OSError as exc:
            log.error("cannot close the event channel of client#%d: %s", conn.owner, exc)

    # -- letting go -------------------------------------------------------------------------

    def _drop(self, area: Area) -> None:
        """Destroy the area's pool upstream (if its connection is still open) and let
        the mapping go."""
        conn = self._connections[area.owner]
        if conn.open:
            conn.destroy_upstream(area)
        self._let_go(area)

    def _let_go(self, area: Area) -> None:
        was_in_use = area.state is AreaState.IN_USE
        self._cache.pop(area, None)
        self._move(area, AreaState.AWAITING_UNMAP)
        self._awaiting[area] = None
        if self.policy.hold > 0:
            self._holding.append((self.clock() + self.policy.hold, area))
        else:
            self._unmap(area)
        if self.policy.end_at_once:
            if was_in_use and not self.halves.sharing.notify_byte_cleared(
                    area.grant, area.notify_offset):
                self._retired_while_held(area)
            self._end(area)
            return
        # The notify may have fired at once (nothing else mapped it).
        self._end_if_unmapped(area)
        if was_in_use and area.state is AreaState.AWAITING_UNMAP:
            self._retired_while_held(area)

    def _unmap(self, area: Area) -> None:
        try:
            self.halves.mapping.unmap(area.mapping)
        except OSError as exc:
            log.error("cannot unmap %s: %s", area, exc)

    def _let_held_go(self, now: float) -> None:
        """The simulated GUI domain unmaps what it held past ``policy.hold``."""
        while self._holding and self._holding[0][0] <= now:
            _, area = self._holding.pop(0)
            self._unmap(area)
            if area.state is AreaState.AWAITING_UNMAP:
                self._end_if_unmapped(area)
