"""``bench churn``'s ``agent`` policy: the churn through ``qubesshm agent`` to a GUI daemon.

The churn client's windows go to ``qubesshm agent`` (the apps' compositor and a
Qubes VM's GUI agent, on the simulated hypervisor with a Qubes VM's kernel
parameters) and from it, as grant refs on a socket vchan, to ``qubesshm
guid-emulator`` as the GUI domain, showing them on a private Xvfb the benchmark
starts itself: separate processes, as VM and dom0 are. ``--late-timeout`` goes
to the agent, ``--hold`` and ``--ack-delay`` to the emulator (a daemon that
keeps let-go dumps mapped longer, or writes its ACKs late).

From the agent's counters (``qubesshm stats --json``) each sample takes the
window areas' live grant pages (not the agent's one-page barrier area, which it
keeps for good once it has sent a barrier dump), the kernel's deferred backlog,
and the ACKs the daemon owes; at the end come the ACKs, their latency and how
the releases went.
"""

from __future__ import annotations

import argparse
import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..grants.params import KERNELS
from .agent_path import start_agent_path
from .private_x import PrivateX, private_xvfb
from .processes import last_line

SCREEN = (1920, 1080)  # the daemon's screen, as big as the other policies' Weston
KERNEL = KERNELS["qubes"]  # the agent's simulated kernel: a Qubes VM's parameters
BARRIER_PAGES = 1  # the area of the agent's barrier window (never mapped on screen)


@dataclass(frozen=True)
class AgentUnderTest:
    """Where the churn client connects, and what the emulator shows on."""

    socket: Path  # the agent's Wayland socket; its counters at NAME.stats
    x: PrivateX
    log: Path  # what the agent writes
    agent_pid: int
    emulator_pid: int

    def describe(self) -> str:
        return (f"qubesshm agent (simulated grants, a Qubes VM's kernel: free_per_iteration "
                f"{KERNEL.free_per_iteration}) with qubesshm guid-emulator as its GUI "
                f"domain on {self.x.describe()}")


def emulator_options(args: argparse.Namespace) -> list[str]:
    return ["--hold", f"{args.hold:g}", "--ack-delay", f"{args.ack_delay:g}"]


def start_agent(stack: contextlib.ExitStack, env: dict[str, str], workdir: Path,
                args: argparse.Namespace) -> AgentUnderTest:
    """Xvfb, the agent and the emulator (``agent_path``), all ending with ``stack``;
    returns once the emulator is connected."""
    x = stack.enter_context(private_xvfb(*SCREEN))
    path = start_agent_path(
        stack, env, workdir, x.display,
        agent_args=["--kernel", KERNEL.name, "--late-timeout", f"{args.late_timeout:g}"],
        emulator_args=emulator_options(args))
    return AgentUnderTest(path.socket, x, path.agent_log, path.agent_pid, path.emulator_pid)


def window_pages(stats: dict[str, Any]) -> int:
    """Live grant pages of window areas: the agent's, less its barrier area."""
    live = int(stats["grants"]["live"])
    return live - BARRIER_PAGES if stats["daemon"]["barriers"] else live


def pending_acks(stats: dict[str, Any]) -> int:
    return int(stats["daemon"]["pending_acks"])


def figures(stats: dict[str, Any]) -> dict[str, Any]:
    """What ``PolicyResult`` takes from the agent's last counters."""
    daemon = stats["daemon"]
    lifetimes = stats["lifetimes"]
    return {
        "dumps": daemon["dumps"],
        "barriers": daemon["barriers"],
        "acks": daemon["acks"],
        "ack_latency_ms": lifetimes["ack_latency_ms"],
        "confirmed_releases": lifetimes["ended_on_release"] + lifetimes["recycled_on_release"],
        "wrong_releases": lifetimes["wrong_releases"],
    }


def windows_sent(stats: dict[str, Any]) -> int:
    """Windows the agent created at the daemon."""
    return int(stats["daemon"]["created"])


def not_shown(stats: dict[str, Any], windows: int, log: Path) -> str | None:
    """Why fewer than the client's ``windows`` reached the daemon (the agent says why
    in its log: a window image past its limits, say), or None if every one did."""
    created = windows_sent(stats)
    if created >= windows:
        return None
    said = last_line(log)
    return (f"the agent sent {created} of the client's {windows} windows to the GUI daemon"
            + (f" ({said})" if said else ""))


def summary(r: Any, late_timeout: float) -> str:
    """One line of the agent's own figures under the table (``r``: a ``PolicyResult``)."""
    latency = r.ack_latency_ms or {}

    def ms(value: float | None) -> str:
        return "-" if value is None else f"{value:.1f}"

    sent = ("" if r.windows_sent is None or r.windows_sent >= r.windows else
            f"{r.windows_sent} of its {r.windows} windows sent to the daemon (the others "
            "closed before its next refresh); ")
    return (f"{r.policy}: {sent}{r.acks} ACKs of {r.dumps} dumps + {r.barriers} barriers, at most "
            f"{r.peak_pending_acks} pending; ACK latency p50 {ms(latency.get('p50'))} ms, "
            f"p99 {ms(latency.get('p99'))} ms, max {ms(latency.get('max'))} ms; areas: "
            f"{r.late_releases} late (unconfirmed after --late-timeout {late_timeout:g} s), "
            f"{r.confirmed_releases} ended or cached on the ACK order's word, "
            f"{r.wrong_releases} of them wrongly (still mapped); free_per_iteration raised "
            f"{r.fpi_raises}x, restored {r.fpi_restores}x")
