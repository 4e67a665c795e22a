"""Grant lifetimes in agent mode: window areas the GUI daemon releases by its ACK order.

In agent mode the mapping side is the Qubes GUI daemon, in another domain: this
VM only shares pages (gntalloc), the daemon maps the refs of each ``WINDOW_DUMP``
read-only, and nothing tells the VM when it unmaps them. There is no unmap
notify: the daemon sets none, and gntdev refuses to clear a byte of a read-only
mapping. The agent works out from the daemon's ACK order
(``qubesshm.agent.acks``) that an area can no longer be mapped, and says so here.
Sans-IO, on ``LifetimesCore`` with an injected clock, like proxy mode. An *area*
is one grant of whole pages holding one window's image as the daemon reads it:
XRGB8888, stride 4·width, from page 0 (``take(owner, 4 * width * height)``; no
notify byte, so no extra page). Its life:

- **in use**: the image of one window of client ``owner``;
- **awaiting release** once the window moved to another area, or was unmapped or
  destroyed (``let_go``; ``give_back`` to have it recycled): the daemon may
  still map it, until the agent confirms its release (``confirm_released``);
- then **ended** at once: the grant must end, never be deferred. If the kernel
  defers it after all, the daemon still mapped it and the confirmation was wrong:
  ``wrong_releases`` counts it;
- or, if it was given back, **cached** when its release is confirmed, and taken
  by the next window of any client that fits in it (``reused`` is then set: it
  holds the previous window's pixels, which the agent overwrites in full before
  the area's first dump). The cache is bounded in pages and evicts the least
  recently used, which then end at once;
- **deferred**: still awaiting ``late_timeout`` after it was let go, or made late
  at once by ``all_late`` (the daemon restarted, or it is older than protocol 1.7
  and sends no ACK): the core's late path hands it to the kernel's deferred
  reclaim in batches of at most ``defer_batch`` pages a second, with
  ``free_per_iteration`` raised while the backlog lasts and restored after.

**When an area may be cached.** In proxy mode an area is cached as soon as no
buffer uses it: the compositor's pool over it stays, and the proxy decides what
it shows. In agent mode an area that has stopped being a window's image may still
be the daemon's mapping of that window (on screen, and redrawn on every expose)
until its release is confirmed; writing another window's image into it before
then would show that image in the wrong window, or tear it. So an area enters the
cache only from *awaiting release*, at the moment its release is confirmed, never
straight from *in use*; a late area goes to deferred reclaim, never to the cache;
and an area of a client that is gone is ended, not cached. Given confirmations
that are right, no area is ever both reusable (cached, or taken from the cache)
and possibly mapped by the daemon. A wrong confirmation of an area that is then
cached cannot be seen at that moment (gntalloc says nothing about foreign
mappings until a grant ends); it is counted in ``wrong_releases`` when the area
ends (evicted, or at close) and its grant is deferred.

Limits are the core's: a client holds at most ``client_pages`` (its areas in use
and the cached areas it used last; taking a cached area of another client makes
it this one's, in the ledger too); the agent's pages stay under the gntalloc limit
by evicting, then by handing the oldest areas awaiting release to deferred
reclaim. ``NoRoom`` means wait for ``on_room`` (called when pages are given back,
cached or ended), ``GrantLimit`` that the window can never fit.

The lifetimes count the ledger's ``in_use`` pages themselves here (proxy mode's
bridge does it there). ``policy.end_at_once`` models today's agents: an area's
grant ends the moment it is let go, mapped or not, and nothing is cached.
``policy.hold`` does not apply (the daemon, or the emulator's ``--hold``, holds).
"""

from __future__ import annotations

import contextlib
import logging
import mmap
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Final

from .api import PAGE_SIZE
from .ledger import ClientCounters
from .lifetimes import (
    AreaState,
    GrantArea,
    GrantLimit,
    LifetimesCore,
    NoRoom,
    Owner,
    reads_limit_once,
)
from .sharing import GrantUnavailable

log = logging.getLogger("qubesshm.grants")

BYTES_PER_PIXEL = 4  # XRGB8888, as the daemon reads a dump
# Agent mode's name for the state between let go and confirmed released.
AWAITING_RELEASE: Final = AreaState.AWAITING_UNMAP


def image_size(width: int, height: int) -> int:
    """Bytes of a window image as the daemon reads it: stride 4·width, no padding."""
    return BYTES_PER_PIXEL * width * height


def image_pages(size: int) -> int:
    """Pages of an area holding ``size`` bytes (at least one)."""
    return max(1, -(-size // PAGE_SIZE))


@dataclass(eq=False)
class AgentArea(GrantArea):
    """One window image's grant."""

    # Let go to be cached once its release is confirmed (``give_back``).
    recycle: bool = False
    # Its release was confirmed since it was last let go.
    confirmed: bool = False

    @property
    def refs(self) -> tuple[int, ...]:
        """The grant refs a ``WINDOW_DUMP`` sends, page 0 first."""
        return self.grant.refs

    @property
    def capacity(self) -> int:
        """Bytes an image may use: every page."""
        return self.pages * PAGE_SIZE

    @property
    def memory(self) -> mmap.mmap:
        """The VM's writable view of the pages. Any memoryview (or numpy array) over
        it must be gone before the area's grant ends: closing a mapping with exported
        buffers raises ``BufferError``. ``pixels()`` makes that easy."""
        return self.grant.area.memory

    @contextlib.contextmanager
    def pixels(self) -> Iterator[memoryview]:
        """A writable memoryview of the whole area, released on leaving the block
        (whatever was made over it must not outlive the block)."""
        view = memoryview(self.grant.area.memory)
        try:
            yield view
        finally:
            view.release()


class AgentLifetimes(LifetimesCore[AgentArea, Owner[AgentArea]]):
    """Every window area of the agent, across its Wayland clients."""

    shared_cache = True
    counts_in_use = True
    holds = "window image"

    # -- clients ---------------------------------------------------------------------

    def open_connection(self, owner: int, counters: Sequence[ClientCounters]) -> None:
        """A Wayland client whose windows will take areas; its pages are counted in
        ``counters`` (its own and the agent's totals, say)."""
        if owner in self._connections:
            raise ValueError(f"client#{owner} already has areas")
        self._connections[owner] = Owner(owner, tuple(counters))

    def close_connection(self, owner: int) -> None:
        """The client is gone. Its windows' areas should have been let go as their
        ``UNMAP``/``DESTROY`` went out; any still in use is let go now (not to be
        recycled), and its cached areas end."""
        conn = self._connections.get(owner)
        if conn is None or not conn.open:
            return
        conn.open = False
        for area in sorted(conn.areas, key=lambda a: a.since):
            if area.state is AreaState.IN_USE:
                self._let_go(area, recycle=False)
            elif area.state is AreaState.CACHED:
                del self._cache[area]
                self._end_released(area)
        self._forget_if_done(conn)

    # -- areas for window images -------------------------------------------------------

    @reads_limit_once
    def take(self, owner: int, size: int) -> AgentArea:
        """An area for a window image of ``size`` bytes (``image_size``): a cached one
        of any client if one fits (``reused`` set), else freshly shared. ``NoRoom``
        when the limits leave no room now, ``GrantLimit`` when they never will."""
        return super().take(owner, size)

    @reads_limit_once
    def give_back(self, area: AgentArea) -> None:
        """``area`` is no window's image any more and may serve another window once
        the daemon can no longer map it: ``let_go(area, recycle=True)``."""
        self.let_go(area, recycle=True)

    def let_go(self, area: AgentArea, *, recycle: bool = False) -> None:
        """``area`` stopped being its window's image (a newer dump, ``UNMAP`` or
        ``DESTROY`` was just sent): it awaits ``confirm_released``, then ends, or is
        cached with ``recycle``; late, it goes to deferred reclaim. A no-op for an
        area not in use."""
        if area.state is AreaState.IN_USE:
            self._let_go(area, recycle=recycle)

    @reads_limit_once
    def confirm_released(self, area: AgentArea) -> AreaState:
        """The daemon can no longer map ``area`` (the ACK order says so): it ends at
        once, or is cached if it was given back and its client is still there.
        Returns its state now. An area the late path already took stays as it is
        (``late_confirms`` counts it); one in use or cached is a caller's bug."""
        state = area.state
        if state in (AreaState.DEFERRED, AreaState.ENDED):
            self.counters.late_confirms += 1
            return state
        if state is not AWAITING_RELEASE:
            raise ValueError(f"{area} is {state.value}: only an area let go can be "
                             "released")
        self.counters.confirm_latency.add((self.clock() - area.since) * 1000.0)
        area.confirmed = True
        conn = self._connections[area.owner]
        if (area.recycle and conn.open and not self.policy.end_at_once
                and area.pages <= self._cache_bound() and self._room_to_hold(conn, area)):
            del self._awaiting[area]
            self._move(area, AreaState.CACHED)
            self._cache[area] = None
            self.counters.recycled_on_release += 1
            self._trim_cache()
            self._room()
        else:
            self._end_released(area)
            if area.state is AreaState.ENDED:
                self.counters.ended_on_release += 1
        return area.state

    def _room_to_hold(self, conn: Owner[AgentArea], area: AgentArea) -> bool:
        """Whether ``conn`` may hold ``area`` again, cached, within its cap: its older
        cached areas make way (least recently used first), its areas in use do not."""
        bound = self._client_bound()
        in_use = sum(a.pages for a in conn.areas if a.state is AreaState.IN_USE)
        if in_use + area.pages > bound:
            return False
        for old in [a for a in self._cache if a.owner == conn.owner]:
            if conn.held_pages() + area.pages <= bound:
                break
            self._evict(old)
        return True

    def all_late(self) -> int:
        """Nothing awaiting release will be confirmed (the daemon restarted, or sends
        no ACK): every such area is late now, and goes to deferred reclaim from the
        next ``poll`` on, in batches. Returns how many were made late."""
        made = 0
        for area in self._awaiting:
            if not area.forced_late:
                area.forced_late = True
                made += 1
        self.counters.forced_late += made
        return made

    def note_ack(self, waited: float | None) -> None:
        """A dump's ACK arrived ``waited`` seconds after the dump (None: unknown)."""
        if waited is not None:
            self.counters.ack_latency.add(waited * 1000.0)

    @property
    def pending_releases(self) -> int:
        """Areas let go whose release is not confirmed yet."""
        return len(self._awaiting)

    @property
    def pending_release_pages(self) -> int:
        return sum(a.pages for a in self._awaiting)

    def stats(self, pending_acks: int | None = None) -> dict[str, Any]:
        """Agent mode's counters, beside the core's in ``qubesshm stats``'s
        ``lifetimes`` section (``relay.control``)."""
        c = self.counters
        return {
            "pending_acks": pending_acks,
            "pending_releases": self.pending_releases,
            "pending_release_pages": self.pending_release_pages,
            "peak_pending_releases": c.peak_pending_releases,
            "ended_on_release": c.ended_on_release,
            "recycled_on_release": c.recycled_on_release,
            "wrong_releases": c.wrong_releases,
            "late_confirms": c.late_confirms,
            "forced_late": c.forced_late,
            "confirm_latency_ms": c.confirm_latency.summary(),
            "confirm_latency_histogram_ms": c.confirm_latency.histogram(),
            "ack_latency_ms": c.ack_latency.summary(),
            "ack_latency_histogram_ms": c.ack_latency.histogram(),
        }

    # -- the core's hooks ----------------------------------------------------------------

    def _pages_for(self, size: int) -> int:
        return image_pages(size)

    def _new_area(self, conn: Owner[AgentArea], pages: int) -> AgentArea:
        try:
            grant = self.side.sharing.share(pages * PAGE_SIZE)
        except GrantUnavailable as exc:
            raise (NoRoom if exc.transient else GrantLimit)(str(exc)) from exc
        area = AgentArea(grant, conn.owner, since=self.clock())
        self._shared(conn, area)
        return area

    def _adopt(self, area: AgentArea, conn: Owner[AgentArea]) -> None:
        """A cached area of another client becomes ``conn``'s, in the ledger too."""
        old = self._connections[area.owner]
        old.areas.discard(area)
        for c in old.counters:
            c.pages.cached -= area.pages
            c.pages.hand_over(area.pages)
        area.owner = conn.owner
        conn.areas.add(area)
        for c in conn.counters:
            c.pages.take_over(area.pages)
            c.pages.cached += area.pages
        self._forget_if_done(old)

    def _evicted(self, area: AgentArea) -> None:
        # Cached, so released: it ends at once.
        self._end_released(area)

    def _maybe_mapped(self, area: AgentArea) -> bool:
        return not area.confirmed

    # -- letting go ----------------------------------------------------------------------

    def _let_go(self, area: AgentArea, *, recycle: bool) -> None:
        # What an agent that ends grants as windows let go of them defers: the
        # daemon holds every dump until a later message of that window.
        self._retired_while_held(area)
        area.recycle = recycle and not self.policy.end_at_once
        area.confirmed = False
        area.forced_late = False
        area.late = False
        self._move(area, AWAITING_RELEASE)
        self._awaiting[area] = None
        self.counters.peak_pending_releases = max(self.counters.peak_pending_releases,
                                                  len(self._awaiting))
        if self.policy.end_at_once:
            self._end(area)

    def _end_released(self, area: AgentArea) -> None:
        """End an area whose release was confirmed: a deferral means it was not."""
        self._end(area)
        if area.state is AreaState.DEFERRED:
            self.counters.wrong_releases += 1
            log.warning("%s was said to be released, yet the GUI domain still maps it: "
                        "its grant went to deferred reclaim", area)


def release_summary(lifetimes: dict[str, Any] | None) -> str:
    """A fragment of the exit summary line for ``AgentLifetimes.stats()`` merged into
    the ``lifetimes`` section (empty in proxy mode)."""
    if not lifetimes or "pending_releases" not in lifetimes:
        return ""
    confirm = lifetimes["confirm_latency_ms"]
    ack = lifetimes["ack_latency_ms"]
    timing = (f" (p50 {confirm['p50']} ms, max {confirm['max']} ms)"
              if confirm["count"] else "")
    acks = (f"; ACKs p50 {ack['p50']} ms, max {ack['max']} ms" if ack["count"] else "")
    pending = ("" if lifetimes.get("pending_acks") is None
               else f", {lifetimes['pending_acks']} ACKs pending")
    return (f"; releases: {lifetimes['ended_on_release']} ended and "
            f"{lifetimes['recycled_on_release']} recycled on confirm{timing}, "
            f"{lifetimes['wrong_releases']} wrong, {lifetimes['forced_late']} made late, "
            f"{lifetimes['pending_releases']} pending{pending}{acks}")
