"""The run report: what an app did with shared memory, and what that means in a qube.

``qubesshm run`` prints it at exit (and writes it with ``--report-json``). It is made
from the proxy's own counters (the ``qubesshm stats`` snapshot) and two kernel
parameter sets, and nothing else, so every figure can be checked against the
counters. The findings model one thing the proxy did not do: a GUI agent that ends
its grants when the app frees its buffers, with no unmap notify. Each page the
compositor still mapped at that moment goes on the kernel's deferred list, which
frees ``free_per_iteration`` entries a second; the list is assumed to free an entry
at its first try (the compositor let go within the run's unmap latencies).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from .grants.api import PAGE_SIZE
from .grants.params import KERNELS as KERNELS
from .grants.params import Kernel

KERNEL_CHOICES = ("stock", "qubes", "both")


def kernels_for(choice: str) -> list[Kernel]:
    return list(KERNELS.values()) if choice == "both" else [KERNELS[choice]]


@dataclass(frozen=True, slots=True)
class Backlog:
    """The deferred list under a stream of pages, drained ``free_per_iteration`` a second."""

    added: int  # pages put on the list
    peak: int  # most pages on it at once
    at_exit: int  # still on it when the run ended
    drain_seconds: int  # from the end of the run until it is empty


def deferred_backlog(added_by_second: dict[int, int], free_per_iteration: int,
                     seconds: float) -> Backlog:
    """The list when ``added_by_second[s]`` pages join it during second ``s`` of a run
    of ``seconds``, and the kernel frees up to ``free_per_iteration`` at the end of
    every second."""
    # The list second by second up to the end of the run (nothing joins it later, so
    # its peak is within the run), and what the run's last free left.
    sizes = deferred_list_by_second(added_by_second, free_per_iteration, seconds,
                                    cap_seconds=0)
    at_exit = sizes[-1]
    return Backlog(sum(added_by_second.values()), max(sizes), at_exit,
                   math.ceil(at_exit / free_per_iteration))


def build_report(stats: dict[str, Any], kernels: list[Kernel],
                 late_timeout: float) -> dict[str, Any]:
    """The report of a run whose counters are ``stats`` (``relay.control.snapshot``)."""
    grants = stats["grants"]
    lifetimes = stats.get("lifetimes") or {}
    held = {int(k): v for k, v in lifetimes.get("retired_while_held", {}).items()}
    seconds = float(lifetimes.get("seconds", 0.0))
    # Pages backing buffers at once at the peak, counting buffers refused for want of
    # pages (cached pages give way under a smaller limit, so they are not needed).
    peak_pages = lifetimes.get("peak_pages_wanted", grants["peak_live"])
    report: dict[str, Any] = {
        "seconds": seconds,
        "clients": stats["clients_served"],
        "commits": stats["commits"],
        "bytes_damaged": stats["bytes_damaged"],
        "bytes_copied": stats["bytes_copied"],
        "early_releases": stats["early_releases"],
        "client_pools": stats["client_pools"],
        "client_buffers": stats["client_buffers"],
        "upstream_pools": stats["upstream_pools"],
        "upstream_buffers": stats["upstream_buffers"],
        "pages_needed": peak_pages,
        "peak_grant_pages": grants["peak_live"],
        "grant_pages_shared": grants["shared_total"],
        "grant_pages_deferred": grants["deferred"],
        "grant_pages_leaked": grants["leaked"],
        "cache_hits": lifetimes.get("cache_hits"),
        "release_latency_ms": stats["release_latency_ms"],
        "unmap_latency_ms": lifetimes.get("unmap_latency_ms"),
        "late_releases": lifetimes.get("late_releases"),
        "commit_waits_ms": stats["commit_waits_ms"],
        "waits_for_room": stats["waits_for_room"],
        "refills_in_place": stats["refills_in_place"],
        "pages_retired_while_held": sum(held.values()),
        "kernels": {},
        "findings": [],
    }
    agent_mode = stats.get("mode") == "agent"
    if agent_mode:
        report["mode"] = "agent"
        report["daemon"] = stats.get("daemon", {})
        report["ack_latency_ms"] = lifetimes.get("ack_latency_ms")
        report["release_confirm_latency_ms"] = lifetimes.get("confirm_latency_ms")
        report["wrong_releases"] = lifetimes.get("wrong_releases", 0)
    findings: list[str] = report["findings"]
    if not grants["shared_total"] and not lifetimes.get("refused") and not peak_pages:
        # No shm buffer was asked for: no grant was made, nothing to model.
        findings.append("the app drew nothing through qubesshm (no wl_shm buffer was "
                        "committed), so it needed no grant pages and there is nothing to "
                        "say about gntalloc limits or deferred lists"
                        + ("" if stats["clients_served"] else
                           "; no client connected at all: did it find WAYLAND_DISPLAY?"))
        return report
    findings.append(f"needs a gntalloc limit of at least {peak_pages} pages "
                    f"({peak_pages * PAGE_SIZE / (1 << 20):.1f} MiB of grant pages at once)")
    waits = stats["commit_waits_ms"]
    if stats["waits_for_room"] or stats["refills_in_place"]:
        findings.append(
            f"the client cap or the gntalloc limit left room for fewer output buffers than "
            f"it could use: {stats['waits_for_room']} commit(s) waited for room (longest "
            f"{_duration(waits['max'] or 0.0)}) and {stats['refills_in_place']} re-filled the "
            "buffer on screen in place (a frame may tear); more room (--client-pages, "
            "--gntalloc-limit) avoids it")
    confirm = lifetimes.get("confirm_latency_ms") or {}
    if agent_mode and confirm.get("max") is not None:
        findings.append(f"the GUI daemon let go of areas up to {_duration(confirm['max'])} "
                        f"after qubesshm did, as its ACK order showed (median "
                        f"{_duration(confirm['p50'])}, {confirm['count']} released)")
    if agent_mode and lifetimes.get("wrong_releases"):
        findings.append(f"{lifetimes['wrong_releases']} area(s) were still mapped by the GUI "
                        "domain when the ACK order said they were not (a daemon that keeps "
                        "dumps mapped past its ACKs): their grants went to deferred reclaim")
    unmap = lifetimes.get("unmap_latency_ms") or {}
    if unmap.get("max") is not None:
        findings.append(f"the compositor held mappings up to {_duration(unmap['max'])} after "
                        f"the proxy let them go (median {_duration(unmap['p50'])}, "
                        f"{unmap['count']} let go)")
    if lifetimes.get("late_releases"):
        findings.append(f"{lifetimes['late_releases']} area(s) stayed mapped past the "
                        f"{late_timeout:g} s late timeout and went to deferred reclaim")
    if lifetimes.get("refused"):
        findings.append(f"{lifetimes['refused']} buffer(s) were refused with no_memory for "
                        "lack of grant pages")
    if grants["leaked"]:
        findings.append(f"{grants['leaked']} grant pages leaked")
    for kernel in kernels:
        agent = deferred_backlog(held, kernel.free_per_iteration, seconds)
        fits = peak_pages <= kernel.gntalloc_limit
        report["kernels"][kernel.name] = {
            "gntalloc_limit": kernel.gntalloc_limit,
            "free_per_iteration": kernel.free_per_iteration,
            "fits_gntalloc_limit": fits,
            "agent_deferred_pages": agent.added,
            "agent_peak_backlog": agent.peak,
            "agent_backlog_at_exit": agent.at_exit,
            "agent_drain_seconds": agent.drain_seconds,
        }
        where = (f"on a {kernel.name} kernel (gntalloc limit {kernel.gntalloc_limit}, "
                 f"free_per_iteration {kernel.free_per_iteration})")
        if not fits:
            findings.append(f"{where}: the {peak_pages} pages it needs exceed the gntalloc "
                            "limit; buffers past it get no_memory unless the limit is "
                            "raised (Qubes VMs set 1073741824)")
        today = ("ending a window's grants as soon as it lets go of them, as today's GUI "
                 "agents do," if agent_mode else
                 "ending grants when the app frees its buffers, as an agent without unmap "
                 "notify does,")
        if agent.added == 0:
            findings.append(f"{where}: no buffer's pages were still held by the compositor "
                            "when it went, so ending grants at once would have deferred "
                            "nothing")
        elif agent.at_exit:
            findings.append(
                f"{where}: {today} would put {agent.added} pages on the deferred list "
                f"(peak {agent.peak}) and leave {agent.at_exit} there at exit, draining for "
                f"{agent.drain_seconds} s more")
        else:
            findings.append(
                f"{where}: {today.split(', as ')[0]} would put "
                f"{agent.added} pages on the deferred list (peak {agent.peak}), drained "
                "within the run")
    report["pages_retired_while_held_by_second"] = {str(s): n for s, n in sorted(held.items())}
    return report


def _duration(milliseconds: float) -> str:
    return f"{milliseconds:.1f} ms" if milliseconds < 1000 else f"{milliseconds / 1000:.2f} s"


def format_report(report: dict[str, Any]) -> str:
    """The report as the lines ``qubesshm run`` prints."""

    def mib(n: int) -> str:
        return f"{n / (1 << 20):.1f} MiB"

    def latency(summary: dict[str, Any] | None) -> str:
        if not summary or summary.get("p50") is None:
            return "none"
        return (f"median {summary['p50']:.1f} ms, p99 {summary['p99']:.1f} ms, "
                f"max {summary['max']:.1f} ms ({summary['count']})")

    def waited(report: dict[str, Any]) -> str:
        waits = report["commit_waits_ms"]
        text = (f"{waits['count']} ({report['waits_for_room']} for grant room)"
                + (f", longest {_duration(waits['max'])}" if waits["count"] else ""))
        return text + f"; re-filled in place {report['refills_in_place']}"

    pages = (f"  grant pages: needed {report['pages_needed']}, peak with the cache "
             f"{report['peak_grant_pages']}, shared "
             f"{report['grant_pages_shared']}, deferred {report['grant_pages_deferred']}, "
             f"leaked {report['grant_pages_leaked']}; cache hits {report['cache_hits']}")
    lines = [
        f"qubesshm report ({report['seconds']:.1f} s, {report['clients']} client(s)):",
        f"  commits {report['commits']}; damaged {mib(report['bytes_damaged'])}, copied "
        f"{mib(report['bytes_copied'])}; early releases {report['early_releases']}",
    ]
    if report.get("mode") == "agent":
        daemon = report.get("daemon") or {}
        lines += [
            f"  GUI daemon: {daemon.get('created', 0)} windows, {daemon.get('dumps', 0)} dumps "
            f"(+{daemon.get('barriers', 0)} barriers), {daemon.get('acks', 0)} ACKs, "
            f"{daemon.get('shmimages', 0)} SHMIMAGEs",
            pages,
            f"  ACK after dump: {latency(report.get('ack_latency_ms'))}",
            f"  released (ACK order) after let go: "
            f"{latency(report.get('release_confirm_latency_ms'))}; late releases "
            f"{report['late_releases']}; wrong releases {report.get('wrong_releases', 0)}",
        ]
    else:
        lines += [
            f"  pools/buffers: the app's {report['client_pools']}/{report['client_buffers']}, "
            f"the compositor's {report['upstream_pools']}/{report['upstream_buffers']}",
            pages,
            f"  compositor release after attach: {latency(report['release_latency_ms'])}",
            f"  unmap after let go: {latency(report['unmap_latency_ms'])}; late releases "
            f"{report['late_releases']}",
            f"  commits that waited for an output buffer: {waited(report)}",
        ]
    lines += ["findings:", *(f"  - {finding}" for finding in report["findings"])]
    return "\n".join(lines)


def deferred_list_by_second(added_by_second: dict[int, int], free_per_iteration: int,
                            seconds: float, *, cap_seconds: int = 3600) -> list[int]:
    """The deferred list of ``deferred_backlog``'s model, second by second.

    Element ``s`` is the pages on the list during second ``s``: what the free at the
    end of second ``s - 1`` left, plus the ``added_by_second[s]`` pages joining it
    during second ``s`` (counted from the start of that second), before the kernel
    frees up to ``free_per_iteration`` at its end. The list goes on past the run, with
    nothing added, up to and including the first second in which it is empty, for at
    most ``cap_seconds`` seconds past the run. With ``end`` the run's seconds rounded
    up (or the second after the last one with pages, if later), its maximum is
    ``deferred_backlog``'s peak, element ``end`` its ``at_exit``, and it has
    ``end + drain_seconds + 1`` elements unless the cap cut it short.
    """
    if free_per_iteration <= 0:
        raise ValueError("free_per_iteration must be positive")
    if cap_seconds < 0:
        raise ValueError("cap_seconds must not be negative")
    end = max(math.ceil(seconds), max(added_by_second, default=-1) + 1)
    sizes: list[int] = []
    backlog = 0
    for second in range(end + cap_seconds + 1):
        backlog += added_by_second.get(second, 0)
        sizes.append(backlog)
        if second >= end and backlog == 0:
            break
        backlog = max(0, backlog - free_per_iteration)
    return sizes
