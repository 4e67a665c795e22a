"""Grant accounting: how many pages are in each stage of an output buffer's life.

Stages, in pages of 4 KiB: *live* (shared by the sharing half and not yet
unshared), of which *in_use* (attached upstream and not yet released by the
compositor) and *awaiting_unmap* (retired, waiting for the compositor to let go
before the grants are ended); then *ended* or *deferred* (handed to the kernel's
deferred reclaim while still mapped). One ``GrantLedger`` counts for the whole
proxy and one per client; both halves report into it.

In agent mode the same stages hold, *awaiting_unmap* meaning "let go, its release
not yet confirmed by the GUI daemon's ACK order"; an area recycled from one client
to another is *handed over* (it leaves the first client's live pages and joins the
second's without being unshared or shared again).
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field


@dataclass
class PageCounts:
    live: int = 0
    in_use: int = 0
    cached: int = 0  # kept with their upstream pool for later buffers
    awaiting_unmap: int = 0
    peak_live: int = 0
    shared_total: int = 0
    unshared_total: int = 0  # ended at once or handed to deferred reclaim
    deferred_at_unshare: int = 0  # of those, pages that were still mapped
    # Pages of areas recycled to another client (agent mode): live = shared_total
    # + taken_over - handed_over - unshared_total.
    handed_over: int = 0
    taken_over: int = 0

    def shared(self, pages: int) -> None:
        self.live += pages
        self.shared_total += pages
        self.peak_live = max(self.peak_live, self.live)

    def unshared(self, pages: int, *, deferred: bool) -> None:
        self.live -= pages
        self.unshared_total += pages
        if deferred:
            self.deferred_at_unshare += pages

    def hand_over(self, pages: int) -> None:
        """Live pages that now count for another client."""
        self.live -= pages
        self.handed_over += pages

    def take_over(self, pages: int) -> None:
        """Live pages another client counted until now."""
        self.live += pages
        self.taken_over += pages
        self.peak_live = max(self.peak_live, self.live)


# Upper bounds of the histogram's buckets, in milliseconds; the last is open.
HISTOGRAM_BOUNDS_MS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000)


@dataclass
class Latency:
    """How long something took, in milliseconds (attach upstream -> the compositor's
    release; let go -> unmap notify; let go -> its release confirmed by the ACK order;
    a dump -> its ACK)."""

    samples: list[float] = field(default_factory=list)
    limit: int = 4096  # the most recent ones; percentiles of a long run stay cheap
    count_total: int = 0
    max_total: float = 0.0
    # Every sample of the run: counts per HISTOGRAM_BOUNDS_MS bucket, then the rest.
    buckets: list[int] = field(default_factory=lambda: [0] * (len(HISTOGRAM_BOUNDS_MS) + 1))

    def add(self, milliseconds: float) -> None:
        self.buckets[bisect.bisect_left(HISTOGRAM_BOUNDS_MS, milliseconds)] += 1
        self.samples.append(milliseconds)
        if len(self.samples) > 2 * self.limit:
            del self.samples[: len(self.samples) - self.limit]
        self.count_total += 1
        self.max_total = max(self.max_total, milliseconds)

    def histogram(self) -> dict[str, int]:
        """Samples per bucket, keyed by the bucket's upper bound ("<=5", ">5000")."""
        keys = [f"<={b}" for b in HISTOGRAM_BOUNDS_MS] + [f">{HISTOGRAM_BOUNDS_MS[-1]}"]
        return dict(zip(keys, self.buckets, strict=True))

    def summary(self) -> dict[str, float | int | None]:
        if not self.samples:
            return {"count": 0, "p50": None, "p99": None, "max": None}
        ordered = sorted(self.samples)

        def pick(q: float) -> float:
            return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))], 3)

        return {"count": self.count_total, "p50": pick(0.5), "p99": pick(0.99),
                "max": round(self.max_total, 3)}


@dataclass
class ClientCounters:
    """What one client cost; the proxy's totals have the same shape."""

    commits: int = 0
    bytes_damaged: int = 0
    bytes_copied: int = 0
    early_releases: int = 0
    # The client's own wl_shm pools and buffers, and the proxy's upstream ones.
    client_pools: int = 0
    client_buffers: int = 0
    upstream_pools: int = 0
    upstream_buffers: int = 0
    pages: PageCounts = field(default_factory=PageCounts)
    release_latency: Latency = field(default_factory=Latency)
    # Commits held back until the compositor released an output buffer or the limits
    # had room for one, and how long each waited (ms); of those, the ones a limit held.
    commit_waits: Latency = field(default_factory=Latency)
    waits_for_room: int = 0
    # Commits that re-filled the output buffer on screen, for want of room for another.
    refills_in_place: int = 0
    # Output buffers of closed windows the compositor still held at the late timeout:
    # destroyed upstream, their grants let go instead of cached.
    orphans_timed_out: int = 0


class GrantLedger:
    """Totals for the proxy, and the counters of each connected client."""

    def __init__(self) -> None:
        self.total = ClientCounters()
        self.clients: dict[int, ClientCounters] = {}
        self.clients_served = 0  # connected ones and gone ones

    def client(self, number: int) -> ClientCounters:
        counters = self.clients.get(number)
        if counters is None:
            counters = self.clients[number] = ClientCounters()
            self.clients_served += 1
        return counters

    def forget(self, number: int) -> None:
        self.clients.pop(number, None)
