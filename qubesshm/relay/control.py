"""The control socket beside the Wayland socket: ``qubesshm stats`` reads counters there.

A running proxy listens on ``NAME.stats`` next to its socket ``NAME`` (it holds
``NAME.lock``, so a file left there by a dead proxy is stale). Each connection
gets one JSON document, the proxy's counters now, and is closed. ``snapshot``
builds that document from the grant ledger; ``read_stats`` is the client side.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..grants.halves import GrantHalves
from ..grants.ledger import ClientCounters, GrantLedger
from ..grants.lifetimes import LifetimesCore
from .listener import Listener, runtime_path

log = logging.getLogger("qubesshm.relay")

SUFFIX = ".stats"
# Stats readers served at once; more are refused rather than queued.
MAX_PENDING_REPLIES = 32
_MAX_REPLY = 16 << 20


def stats_path(socket_path: Path) -> Path:
    return Path(f"{socket_path}{SUFFIX}")


def _grants(counters: ClientCounters, deferred: int | None, leaked: int | None,
            *, total: bool) -> dict[str, int | None]:
    pages = counters.pages
    if total and deferred is not None:
        # Pages unshared while still mapped and not yet reclaimed by the kernel.
        ended = pages.unshared_total - deferred - (leaked or 0)
    elif total:
        # The kernel hides its deferred list (real Xen): what the proxy saw at unshare.
        ended = pages.unshared_total - pages.deferred_at_unshare
    else:
        # The kernel's list is not per client: count what this client handed to it.
        deferred = pages.deferred_at_unshare
        ended = pages.unshared_total - pages.deferred_at_unshare
    return {
        "live": pages.live,
        "in_use": pages.in_use,
        "cached": pages.cached,
        "awaiting_unmap": pages.awaiting_unmap,
        "deferred": deferred,
        "leaked": leaked if total else None,
        "peak_live": pages.peak_live,
        "shared_total": pages.shared_total,
        "ended_total": ended,
    }


def _counters(counters: ClientCounters) -> dict[str, Any]:
    return {
        "commits": counters.commits,
        "bytes_damaged": counters.bytes_damaged,
        "bytes_copied": counters.bytes_copied,
        "early_releases": counters.early_releases,
        "client_pools": counters.client_pools,
        "client_buffers": counters.client_buffers,
        "upstream_pools": counters.upstream_pools,
        "upstream_buffers": counters.upstream_buffers,
        # Commits held back for an output buffer, by the compositor or by a limit.
        "commit_waits_ms": counters.commit_waits.summary(),
        "waits_for_room": counters.waits_for_room,
        "refills_in_place": counters.refills_in_place,
        "orphans_timed_out": counters.orphans_timed_out,
    }


def _lifetimes(lifetimes: LifetimesCore[Any, Any] | None) -> dict[str, Any] | None:
    if lifetimes is None:
        return None
    c = lifetimes.counters
    return {
        "cache_hits": c.cache_hits,
        "cache_misses": c.cache_misses,
        "evictions": c.evictions,
        "ended_by_notify": c.ended_by_notify,
        "late_releases": c.late_releases,
        "defer_batches": c.defer_batches,
        "deferred_areas": c.deferred_areas,
        "deferred_for_room": c.deferred_for_room,
        "refused": c.refused,
        "no_room": c.no_room,
        "peak_pages_wanted": c.peak_wanted,
        "peak_deferred_backlog": c.peak_backlog,
        "free_per_iteration": lifetimes.free_per_iteration(),
        "free_per_iteration_raises": c.fpi_raises,
        "free_per_iteration_restores": c.fpi_restores,
        "unmap_latency_ms": c.unmap_latency.summary(),
        "unmap_latency_histogram_ms": c.unmap_latency.histogram(),
        "retired_while_held": {str(k): v for k, v in sorted(c.retired_while_held.items())},
        "seconds": round(lifetimes.clock() - lifetimes.started, 3),
    }


def snapshot(ledger: GrantLedger, grants: GrantHalves | None,
             lifetimes: LifetimesCore[Any, Any] | None = None) -> dict[str, Any]:
    """The counters as ``qubesshm stats --json`` prints them."""
    deferred = grants.deferred_pages() if grants is not None else None
    leaked = grants.leaked_pages() if grants is not None else None
    per_client = []
    for number, counters in sorted(ledger.clients.items()):
        per_client.append({
            "client": number,
            **_counters(counters),
            "grants": _grants(counters, None, None, total=False),
            "release_latency_ms": counters.release_latency.summary(),
        })
    return {
        "backend": grants.name if grants is not None else None,
        "clients": len(ledger.clients),
        "clients_served": ledger.clients_served,
        **_counters(ledger.total),
        "grants": _grants(ledger.total, deferred, leaked, total=True),
        "release_latency_ms": ledger.total.release_latency.summary(),
        "release_latency_histogram_ms": ledger.total.release_latency.histogram(),
        "lifetimes": _lifetimes(lifetimes),
        "per_client": per_client,
    }


class ControlSocket:
    """Serves ``snapshot()`` to whoever connects; never blocks the proxy."""

    def __init__(self, path: Path, report: Callable[[], dict[str, Any]]) -> None:
        self.path = path
        self.report = report
        self.loop = asyncio.get_running_loop()
        # Named and locked as a Wayland socket is (NAME.stats.lock): a proxy serving a
        # socket called NAME.stats and this one exclude each other instead of
        # replacing each other's files.
        self.listener = Listener(str(path), backlog=64)
        try:
            # Counters are nobody else's business: owner only (connecting needs write).
            os.chmod(path, 0o600)
        except OSError:
            self.listener.close()
            raise
        self._replies: dict[socket.socket, memoryview] = {}
        self.loop.add_reader(self.listener.fileno(), self._accept)

    def _accept(self) -> None:
        try:
            conn, _ = self.listener.sock.accept()
        except OSError:
            return
        if len(self._replies) >= MAX_PENDING_REPLIES:
            conn.close()  # readers that do not read do not get to pile up
            return
        conn.setblocking(False)
        self._replies[conn] = memoryview(json.dumps(self.report()).encode() + b"\n")
        self.loop.add_writer(conn.fileno(), self._write, conn)

    def _write(self, conn: socket.socket) -> None:
        data = self._replies[conn]
        try:
            sent = conn.send(data[:65536])
        except BlockingIOError:
            return
        except OSError as exc:
            log.info("stats reader went away: %s", exc)
            sent = len(data)
        if sent < len(data):
            self._replies[conn] = data[sent:]
            return
        self._finish(conn)

    def _finish(self, conn: socket.socket) -> None:
        self.loop.remove_writer(conn.fileno())
        del self._replies[conn]
        conn.close()

    def close(self) -> None:
        for conn in list(self._replies):
            self._finish(conn)
        self.loop.remove_reader(self.listener.fileno())
        self.listener.close()


class StatsError(RuntimeError):
    """No proxy answers on that socket name."""


def read_stats(name: str, timeout: float = 5.0) -> dict[str, Any]:
    """The counters of the proxy serving socket ``name``."""
    path = stats_path(runtime_path(name))
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        try:
            sock.connect(str(path))
        except (BlockingIOError, TimeoutError) as exc:
            raise StatsError(f"the qubesshm proxy at {path} is too busy to answer (its "
                             "backlog is full); try again") from exc
        except OSError as exc:
            raise StatsError(f"no qubesshm proxy is serving {name}: cannot connect to {path} "
                             f"({exc.strerror or exc}); is `qubesshm serve --socket {name}` "
                             "running?") from exc
        chunks = []
        size = 0
        try:
            while chunk := sock.recv(65536):
                chunks.append(chunk)
                size += len(chunk)
                if size > _MAX_REPLY:
                    raise StatsError(f"{path} sent more than {_MAX_REPLY} bytes")
        except TimeoutError as exc:
            raise StatsError(f"the qubesshm proxy at {path} did not answer within "
                             f"{timeout:g} s") from exc
        except OSError as exc:
            raise StatsError(f"reading counters from {path} failed: "
                             f"{exc.strerror or exc}") from exc
    try:
        data = json.loads(b"".join(chunks))
    except ValueError as exc:
        raise StatsError(f"{path} did not answer with qubesshm's counters: {exc}") from exc
    if not isinstance(data, dict):
        raise StatsError(f"{path} did not answer with qubesshm's counters")
    return data


def format_table(stats: dict[str, Any]) -> str:
    """A readable table of ``snapshot()``."""

    def mib(n: int) -> str:
        return f"{n / (1 << 20):.1f} MiB"

    def show(value: object) -> str:
        return "n/a" if value is None else str(value)

    if stats.get("half") == "host":
        return _host_table(stats, show)
    lines = [f"backend        {show(stats.get('backend'))}",
             f"clients        {stats['clients']}",
             f"commits        {stats['commits']}",
             f"damaged        {mib(stats['bytes_damaged'])}",
             f"copied         {mib(stats['bytes_copied'])}",
             f"early releases {stats['early_releases']}"]
    grants = stats["grants"]
    lines.append("grant pages    " + "  ".join(f"{k}={show(v)}" for k, v in grants.items()))
    latency = stats["release_latency_ms"]
    lines.append("release (ms)   " + "  ".join(f"{k}={show(v)}" for k, v in latency.items()))
    lifetimes = stats.get("lifetimes")
    if lifetimes:
        unmap = lifetimes["unmap_latency_ms"]
        lines.append("unmap (ms)     " + "  ".join(f"{k}={show(v)}" for k, v in unmap.items()))
        lines.append("lifetimes      " + "  ".join(
            f"{k}={show(v)}" for k, v in lifetimes.items()
            if not k.startswith("unmap_") and k != "retired_while_held"
            and not isinstance(v, dict)))
        for key in ("confirm_latency_ms", "ack_latency_ms"):
            timing = lifetimes.get(key)
            if timing:  # agent mode: from let-go to release, from dump to ACK
                name = key.removesuffix("_latency_ms") + " (ms)"
                lines.append(f"{name:<15}" + "  ".join(f"{k}={show(v)}"
                                                     for k, v in timing.items()))
    daemon = stats.get("daemon")
    if daemon:
        lines.append("daemon         " + "  ".join(f"{k}={show(v)}" for k, v in daemon.items()))
    stream = stats.get("stream")
    if stream:
        lines.append("stream         " + "  ".join(
            f"{k}={show(v)}" for k, v in stream.items() if not isinstance(v, dict)))
    if stats["per_client"]:
        lines.append("")
        lines.append(f"{'client':>6} {'commits':>8} {'damaged':>12} {'copied':>12} "
                     f"{'live pages':>10} {'in use':>7} {'p50 ms':>7}")
        for c in stats["per_client"]:
            lines.append(f"{c['client']:>6} {c['commits']:>8} {mib(c['bytes_damaged']):>12} "
                         f"{mib(c['bytes_copied']):>12} {c['grants']['live']:>10} "
                         f"{c['grants']['in_use']:>7} "
                         f"{show(c['release_latency_ms']['p50']):>7}")
    return "\n".join(lines)


def _host_table(stats: dict[str, Any], show: Callable[[object], str]) -> str:
    """The host half of a split proxy: its connections, mappings and stream."""
    lines = [f"half           host (of domain {show(stats['vm_domid'])}, protocol "
             f"{show(stats['version'])}, backend {show(stats['backend'])}, compositor "
             f"{stats['upstream']})",
             f"connections    {stats['connections']} (served {stats['connections_served']}, "
             f"refused {stats['refused']})"]
    for key in ("pools", "pages", "pipes", "stream"):
        lines.append(f"{key:<15}" + "  ".join(f"{k}={show(v)}"
                                             for k, v in stats[key].items()))
    lines.append(f"files          {stats['files']}")
    return "\n".join(lines)


def summary_line(stats: dict[str, Any]) -> str:
    """One line for the log at exit."""
    grants = {k: "n/a" if v is None else v for k, v in stats["grants"].items()}
    return (f"{stats['commits']} commits, {stats['bytes_damaged'] / (1 << 20):.1f} MiB "
            f"damaged, {stats['bytes_copied'] / (1 << 20):.1f} MiB copied, "
            f"{stats['early_releases']} early releases; grant pages: "
            f"{grants['shared_total']} shared, {grants['ended_total']} ended, "
            f"{grants['deferred']} deferred, {grants['live']} live, peak {grants['peak_live']}"
            + _waits_line(stats) + _lifetimes_line(stats.get("lifetimes")))


def _waits_line(stats: dict[str, Any]) -> str:
    waits = stats["commit_waits_ms"]
    if not waits["count"] and not stats["refills_in_place"]:
        return ""
    return (f"; {waits['count']} commits waited for an output buffer ({stats['waits_for_room']} "
            f"for grant room, longest {waits['max'] or 0:.1f} ms), "
            f"{stats['refills_in_place']} re-filled the one on screen")


def _lifetimes_line(lifetimes: dict[str, Any] | None) -> str:
    if not lifetimes:
        return ""
    unmap = lifetimes["unmap_latency_ms"]
    timing = (f" (p50 {unmap['p50']} ms, max {unmap['max']} ms)" if unmap["count"] else "")
    return (f"; cache {lifetimes['cache_hits']} hits, {lifetimes['cache_misses']} misses, "
            f"{lifetimes['evictions']} evictions; {lifetimes['ended_by_notify']} ended on "
            f"unmap notify{timing}, "
            f"{lifetimes['late_releases']} late, {lifetimes['deferred_areas']} handed to "
            f"deferred reclaim in {lifetimes['defer_batches']} batches (peak backlog "
            f"{lifetimes['peak_deferred_backlog']} pages); free_per_iteration "
            f"raised {lifetimes['free_per_iteration_raises']}x, restored "
            f"{lifetimes['free_per_iteration_restores']}x")
