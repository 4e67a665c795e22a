"""``qubesshm bench churn``: window churn under each reclaim policy, side by side.

``examples/churn_client.py`` opens, draws and closes windows at a given rate,
size and concurrency, straight to the compositor (*direct*) and through a
``qubesshm serve`` per policy on the simulated grant layer (gntalloc limit 2^30
for all, so no window is refused):

- *kernel-default*: grants ended as each window's buffer goes, left to the
  kernel's deferred reclaim at ``free_per_iteration`` 10 (``--reclaim at-once``);
- *qubes*: the same at 1000, as Qubes sets it in dom0;
- *notify*: unmap notify, batched fallback, ``free_per_iteration`` raised as
  needed (``--cache-pages 0``);
- *recycle*: notify and the cache (qubesshm's default);
- *agent*: no Weston: ``qubesshm agent`` is the client's compositor and sends its
  windows to ``qubesshm guid-emulator`` as the GUI domain, on a private Xvfb
  (``churn_agent``); its areas are released by the daemon's ACK order.

``--unpaced`` (each window drawn once and closed after one round trip, as fast as
they go) starts every path of a run at once and has one client take turns of
``--block`` windows between them, timing each path apart (``churn_client.py
--displays``), so that the machine's drift falls on every path alike; ``--block 0``
runs them one after the other, each with its own client.

``--remote`` runs each proxy policy chosen twice: as above, and through the split
proxy (``serve --remote`` starting ``qubesshm host``, with the same options; the
row ``POLICY split``), its figures read from the VM side's stats as the unsplit
proxy's are.

``--hold S`` makes the GUI domain keep every area mapped S seconds after it is let
go (the proxy's ``--sim-hold``, the emulator's ``--hold``): the late releases that
fill the deferred list; ``--ack-delay S`` makes the emulator write its ACKs late.
``--late-timeout`` is how long qubesshm waits for a release before the deferred
path. While each run goes, the live grant pages and the deferred backlog are
sampled from qubesshm's stats socket (for the agent also the ACKs the daemon
owes); after the last window closes sampling goes on until the backlog is empty
or ``--drain-wait`` seconds pass, after which the time left is estimated from the
backlog and ``free_per_iteration`` (the kernel frees that many entries a second).
Where a policy has a late path (notify, recycle, agent) its drain is held against
``--late-timeout`` + 1 s: once nothing is mapped late, the backlog is empty that
soon after the last close.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any

from ..grants.api import PAGE_SIZE
from ..grants.files import write_output
from ..relay.control import StatsError, read_stats
from . import churn_agent
from .private_x import xvfb_command
from .processes import (
    compositor,
    cpu_seconds,
    listener_pid,
    process,
    report_log,
    start_split,
    wait_for_socket,
)

CHURN_CLIENT = Path(__file__).resolve().parents[2] / "examples" / "churn_client.py"
AGENT = "agent"
POLICIES = ("kernel-default", "qubes", "notify", "recycle", AGENT, "direct")
# The policies whose areas go to deferred reclaim only when released late.
LATE_PATH = ("notify", "recycle", AGENT)
# A proxy policy through the split proxy (--remote): "recycle split".
SPLIT_SUFFIX = " split"
DRAIN_MARGIN = 1.0  # seconds past --late-timeout within which such a backlog is empty
BIG_LIMIT = str(1 << 30)
_POLICY_OPTIONS = {
    "kernel-default": ["--kernel", "stock", "--reclaim", "at-once"],
    "qubes": ["--kernel", "qubes", "--reclaim", "at-once"],
    "notify": ["--kernel", "stock", "--cache-pages", "0"],
    "recycle": ["--kernel", "stock"],
}
_FREE_PER_ITERATION = {"kernel-default": 10, "qubes": 1000, "notify": 10, "recycle": 10,
                       AGENT: churn_agent.KERNEL.free_per_iteration}
SAMPLE_INTERVAL = 0.1
PACED_SIZE = "1280x720"
# --unpaced: what a window costs on each path, not what a repaint does.
UNPACED_SIZE = "400x300"
UNPACED_WINDOWS = 300
UNPACED_REPEATS = 3
UNPACED_POLICIES = ("recycle", AGENT, "direct")
# --unpaced: windows a turn of the one client that takes turns between the paths.
UNPACED_BLOCK = 25
# Past these spreads between runs the medians get a warning (``spread_warnings``): a
# policy's ratio to direct (0.10 apart), direct's own rate (1.2x).
RATIO_SPREAD = 0.10
DIRECT_SPREAD = 1.2
_RESULT = re.compile(r"churn: (\d+) windows in ([\d.]+) s(?: \([\d.]+ windows/s\), "
                     r"client CPU ([\d.]+) s(?: on (\S+))?)?")
# The processes whose CPU a window is shown, in this order.
CPU_SIDES = ("client", "qubesshm", "compositor", "emulator", "X server")
_OPENED = re.compile(r"^opened (\d+)$", re.MULTILINE)


@dataclass
class PolicyResult:
    policy: str
    windows: int = 0
    seconds: float = 0.0
    windows_per_second: float = 0.0
    ratio_to_direct: float | None = None
    grants_per_window: float | None = None
    # Output buffers served from the cache (no new grant): hits over hits and misses.
    cache_hits: int | None = None
    from_cache: float | None = None
    waits_for_room: int | None = None
    peak_live: int | None = None
    final_live: int | None = None
    peak_deferred: int | None = None
    final_deferred: int | None = None
    drain_seconds: float | None = None
    drain_estimated: bool = False
    leaked: int | None = None
    peak_grant_mib: float | None = None
    # Policies with a late path: --late-timeout + 1 s, and whether the backlog was
    # empty for good that soon after the last close.
    drain_bound_seconds: float | None = None
    drained_in_bound: bool | None = None
    late_releases: int | None = None
    defer_batches: int | None = None
    fpi_raises: int | None = None
    fpi_restores: int | None = None
    # The agent's: WINDOW_DUMPs sent (windows', barriers), ACKs received, the most
    # owed at a sample, their latency (ms: count, p50, p99, max), releases confirmed
    # by the ACK order, and those the kernel then found still mapped.
    dumps: int | None = None
    barriers: int | None = None
    acks: int | None = None
    peak_pending_acks: int | None = None
    ack_latency_ms: dict[str, float | None] | None = None
    confirmed_releases: int | None = None
    wrong_releases: int | None = None
    # The agent's: windows it sent to the GUI daemon (MSG_CREATE).
    windows_sent: int | None = None
    # Why the client stopped early (the proxy's error to it), None if it finished.
    failed: str | None = None
    # CPU a window (ms) while the client ran, of each process on the path (``CPU_SIDES``):
    # the client's own (from its line), qubesshm's (serve, with the host half when split;
    # the agent, which is the client's compositor), the compositor's (Weston, with its
    # shell client), and in agent mode the GUI domain's: the emulator and its X server.
    cpu_ms_per_window: dict[str, float] = field(default_factory=dict)
    # Seconds since the client started, live pages, deferred pages (the agent's
    # also ACKs pending: "pending_acks").
    series: dict[str, list[float]] = field(
        default_factory=lambda: {"t": [], "live": [], "deferred": []})


def _policies(text: str) -> list[str]:
    chosen = [p.strip() for p in text.split(",") if p.strip()]
    unknown = [p for p in chosen if p not in POLICIES]
    if unknown or not chosen:
        raise ValueError(f"unknown policy {', '.join(unknown) or '(none)'}: choose from "
                         f"{', '.join(POLICIES)}")
    return chosen


def base_policy(name: str) -> str:
    """The policy a result's name is of: "recycle" for "recycle split"."""
    return name.removesuffix(SPLIT_SUFFIX)


def resolve(args: argparse.Namespace) -> None:
    """Fill in the defaults that depend on ``--unpaced``: paced runs open ``--rate``
    windows a second for ``--seconds`` (10 and 10) of 1280x720, once; unpaced ones
    ``--windows`` (300) of 400x300 as fast as they go, ``--repeats`` (3) times, of the
    policies recycle, agent and direct."""
    unpaced = bool(getattr(args, "unpaced", False))
    if getattr(args, "size", None) is None:
        args.size = UNPACED_SIZE if unpaced else PACED_SIZE
    if getattr(args, "repeats", None) is None:
        args.repeats = UNPACED_REPEATS if unpaced else 1
    if unpaced:
        args.windows = args.windows or UNPACED_WINDOWS
        if getattr(args, "block", None) is None:
            args.block = UNPACED_BLOCK
        args.rate = 0.0
        args.seconds = None
        if args.policies is None:
            args.policies = ",".join(UNPACED_POLICIES)
    else:
        args.rate = 10.0 if args.rate is None else args.rate
        args.seconds = 10.0 if args.seconds is None else args.seconds
        args.windows = max(1, round(args.rate * args.seconds))


def check_churn(args: argparse.Namespace) -> str | None:
    """What cannot go together, said before anything starts; then ``resolve``."""
    unpaced = bool(getattr(args, "unpaced", False))
    if unpaced and (args.rate is not None or args.seconds is not None):
        return ("qubesshm bench churn: --rate and --seconds pace the windows; --unpaced opens "
                "--windows of them as fast as they go: give one or the other")
    if not unpaced and getattr(args, "windows", None) is not None:
        return ("qubesshm bench churn: --windows counts the windows of --unpaced; paced "
                "runs open --rate a second for --seconds")
    if not unpaced and getattr(args, "block", None) is not None:
        return ("qubesshm bench churn: --block takes turns between the paths of --unpaced "
                "runs; paced runs go one path after the other")
    resolve(args)
    return check_remote(args) if getattr(args, "remote", False) else None


def check_remote(args: argparse.Namespace) -> str | None:
    """``--remote`` needs a policy that runs qubesshm serve."""
    try:
        chosen = _policies(args.policies or ",".join(POLICIES))
    except ValueError:
        return None  # said by the run, as without --remote
    if not any(p in _POLICY_OPTIONS for p in chosen):
        return ("qubesshm bench churn: --remote runs the proxy policies through the split "
                f"proxy: choose at least one of {', '.join(_POLICY_OPTIONS)}")
    return None


def _runs(policies: list[str], remote: bool) -> list[str]:
    """What runs, in order: the baseline first (so that the progress of the others can
    show the ratio), then each policy, with --remote each proxy policy split after it."""
    out = []
    for policy in sorted(policies, key=lambda p: p != "direct"):
        out.append(policy)
        if remote and policy in _POLICY_OPTIONS:
            out.append(policy + SPLIT_SUFFIX)
    return out


def run_churn_bench(args: argparse.Namespace) -> int:
    """The bench, with ``args`` as ``check_churn`` left them (defaults resolved)."""
    try:
        policies = _policies(args.policies or ",".join(POLICIES))
    except ValueError as exc:
        print(f"qubesshm bench churn: {exc}", file=sys.stderr)
        return 2
    if not CHURN_CLIENT.is_file():
        print(f"qubesshm bench churn: {CHURN_CLIENT} is missing; run it from a source "
              "checkout of qubesshm", file=sys.stderr)
        return 1
    if AGENT in policies:
        try:
            xvfb_command()
        except RuntimeError as exc:
            if args.policies:
                raise  # asked for by name: one line, before anything starts
            print(f"{AGENT}: skipped: {exc}")
            policies.remove(AGENT)
    windows = args.windows
    runs: list[dict[str, PolicyResult]] = []
    with contextlib.ExitStack() as stack:
        upstream: Path | None = None
        compositor_pid: int | None = None
        if any(p != AGENT for p in policies):
            upstream = stack.enter_context(compositor(
                args.upstream, width=1920, height=1080, animations=args.animations != "off"))
            compositor_pid = listener_pid(upstream)
        else:
            print("compositor: none (the agent policy serves its client itself)")
        names = _runs(policies, bool(getattr(args, "remote", False)))
        for index in range(args.repeats):
            results: dict[str, PolicyResult] = {}
            if getattr(args, "unpaced", False) and getattr(args, "block", 0):
                results = _run_in_turns(names, upstream, windows, args, compositor_pid)
            else:
                for name in names:
                    results[name] = _run_policy(name, upstream, windows, args,
                                                compositor_pid)
            set_ratios(results)
            if args.repeats > 1:
                print(f"\nrun {index + 1} of {args.repeats}:")
            _print_table(results, windows, args)
            runs.append(results)
    medians = median_rates(runs)
    warnings = spread_warnings(runs)
    if len(runs) > 1:
        _print_medians(medians, runs, args)
        for warning in warnings:
            print(f"warning: {warning}")
    results = runs[-1]
    if args.json:
        data = {"config": {k: getattr(args, k) for k in ("rate", "seconds", "size",
                                                          "concurrency", "frames", "hold",
                                                          "late_timeout", "ack_delay",
                                                          "unpaced", "repeats")},
                "compositor": compositor_label(args, policies),
                **({"remote": True} if getattr(args, "remote", False) else {}),
                "windows": windows,
                "policies": {name: asdict(r) for name, r in results.items()},
                **({"runs": [{name: asdict(r) for name, r in run.items()} for run in runs],
                    "medians": medians, "warnings": warnings} if len(runs) > 1 else {})}
        write_output(Path(args.json), json.dumps(data, indent=2) + "\n")
    if args.plot:
        figure = plot(results, args)
        png = io.BytesIO()
        figure.savefig(png, format="png", dpi=110)
        write_output(Path(args.plot), png.getvalue())
    return 0


def median_rates(runs: list[dict[str, PolicyResult]]) -> dict[str, dict[str, float | None]]:
    """Per policy, the median over ``runs`` of its windows a second and of its ratio to
    direct's in the same run (None where direct did not run)."""
    out: dict[str, dict[str, float | None]] = {}
    for name in runs[0]:
        rates = [run[name].windows_per_second for run in runs if name in run]
        ratios = [r for run in runs if name in run
                  and (r := run[name].ratio_to_direct) is not None]
        out[name] = {"windows_per_second": statistics.median(rates),
                     "ratio_to_direct": statistics.median(ratios) if ratios else None}
    return out


def spread_warnings(runs: list[dict[str, PolicyResult]]) -> list[str]:
    """Why the medians of ``runs`` are not figures to quote, one sentence each (none:
    no reason found): a policy's ratios to direct that spread by more than
    ``RATIO_SPREAD`` between runs, or direct's own rate by more than
    ``DIRECT_SPREAD`` times."""
    out: list[str] = []
    if len(runs) < 2:
        return out
    for name in runs[0]:
        ratios = [r for run in runs if name in run
                  and (r := run[name].ratio_to_direct) is not None]
        if name != "direct" and len(ratios) > 1 and max(ratios) - min(ratios) > RATIO_SPREAD:
            out.append(f"{name}: the runs' ratios to direct spread from {min(ratios):.2f} to "
                       f"{max(ratios):.2f}, more than {RATIO_SPREAD}: the median moves by "
                       "hundredths from one invocation to the next; quote it only with "
                       "another invocation's (more --repeats, a quieter machine)")
    rates = [run["direct"].windows_per_second for run in runs if "direct" in run]
    if len(rates) > 1 and min(rates) > 0 and max(rates) > DIRECT_SPREAD * min(rates):
        out.append(f"direct's rate moved from {min(rates):.1f} to {max(rates):.1f} windows/s "
                   f"between runs, more than {DIRECT_SPREAD}x: the machine changed under "
                   "the run")
    return out


def cpu_line(results: dict[str, PolicyResult], median: bool = False) -> str | None:
    """The CPU a window of each process on each path, one line (None: none measured)."""
    parts = []
    for r in results.values():
        if r.cpu_ms_per_window:
            sides = ", ".join(f"{side} {ms:.2f}" for side, ms in r.cpu_ms_per_window.items())
            parts.append(f"{r.policy}: {sides}")
    if not parts:
        return None
    what = "medians of the runs" if median else "the scheduler's run time while the client ran"
    return f"CPU a window, ms ({what}; the client's its own): " + "; ".join(parts)


def median_cpu(runs: list[dict[str, PolicyResult]]) -> dict[str, PolicyResult]:
    """Per policy, the median over ``runs`` of each side's CPU a window (as results)."""
    out: dict[str, PolicyResult] = {}
    for name in runs[0]:
        measured = [run[name].cpu_ms_per_window for run in runs if name in run]
        sides = [side for side in CPU_SIDES if all(side in m for m in measured)]
        out[name] = PolicyResult(name, cpu_ms_per_window={
            side: statistics.median(m[side] for m in measured) for side in sides})
    return out


def _print_medians(medians: dict[str, dict[str, float | None]],
                   runs: list[dict[str, PolicyResult]], args: argparse.Namespace) -> None:
    how = (f"in each run one client took turns of {args.block} windows between the paths"
           if getattr(args, "unpaced", False) and getattr(args, "block", 0)
           else "each run's policies one after the other")
    print(f"\nmedians of {len(runs)} runs ({how}):")
    for name, median in medians.items():
        each = " ".join(f"{run[name].windows_per_second:.1f}" for run in runs if name in run)
        ratio = median["ratio_to_direct"]
        shown = "" if name == "direct" or ratio is None else f", {ratio:.2f} x direct"
        ratios = " ".join(f"{r:.2f}" for run in runs if name in run
                          and (r := run[name].ratio_to_direct) is not None)
        print(f"  {name}: {median['windows_per_second']:.1f} windows/s{shown} "
              f"(runs: {each} windows/s" + (f"; {ratios} x direct)" if shown else ")"))
        failed = [run[name].failed for run in runs if name in run and run[name].failed]
        if failed:
            print(f"  {name}: {len(failed)} of {len(runs)} runs stopped early: {failed[0]}")
    line = cpu_line(median_cpu(runs), median=True)
    if line is not None:
        print(f"  {line}")


def set_ratios(results: dict[str, PolicyResult]) -> None:
    """Each policy's windows a second over the direct path's, when direct ran."""
    direct = results.get("direct")
    for result in results.values():
        if direct is not None and direct.windows_per_second:
            result.ratio_to_direct = result.windows_per_second / direct.windows_per_second


def compositor_label(args: argparse.Namespace, policies: list[str] | None = None) -> str:
    """Which compositor the figures are of, in a few words."""
    if policies is not None and all(p == AGENT for p in policies):
        return "none (the agent alone)"
    if getattr(args, "upstream", None):
        return f"compositor {args.upstream}"
    animations = getattr(args, "animations", None) or "on"
    return f"headless Weston, animations {animations}"


def expected_seconds(args: argparse.Namespace) -> float:
    """How long a run should take: --seconds, or for --unpaced its windows at 10 a
    second (every path here goes much faster)."""
    return float(args.seconds) if args.seconds is not None else args.windows / 10.0


def _client_command(windows: int, args: argparse.Namespace) -> list[str]:
    return [sys.executable, str(CHURN_CLIENT), "--windows", str(windows), "--size", args.size,
            "--rate", str(args.rate), "--concurrency", str(args.concurrency), "--frames",
            str(args.frames), "--timeout", str(expected_seconds(args) * 3 + 60), "--progress",
            *(["--unpaced"] if getattr(args, "unpaced", False) else [])]


@dataclass
class _Path:
    """One path under way: where its client connects, what to sample, whose CPU counts."""

    name: str
    policy: str
    result: PolicyResult
    display: Path
    socket_path: Path | None  # qubesshm's, for its stats (None: direct)
    agent: churn_agent.AgentUnderTest | None
    # Whose CPU is counted while the client runs: side -> process (and descendants).
    sides: dict[str, int]
    env: dict[str, str]  # the path's environment (its runtime dir, simulated grants)
    found_fpi: int | None = None  # free_per_iteration as qubesshm found it
    cpu_before: dict[str, float] = field(default_factory=dict)


def _start_path(stack: contextlib.ExitStack, name: str, upstream: Path | None,
                args: argparse.Namespace, compositor_pid: int | None) -> _Path:
    """Start what ``name`` needs (serve, the split proxy, or the agent with its daemon);
    it all ends with ``stack``."""
    result = PolicyResult(name)
    policy = base_policy(name)
    workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="qubesshm-churn-")))
    workdir.chmod(0o700)
    env = dict(os.environ, XDG_RUNTIME_DIR=str(workdir), QUBESSHM_GRANTS="sim")
    env.pop("QUBESSHM_SIM_ROOT", None)
    socket_path: Path | None = None
    agent: churn_agent.AgentUnderTest | None = None
    sides: dict[str, int] = {}
    if policy == AGENT:
        agent = churn_agent.start_agent(stack, env, workdir, args)
        print(f"{AGENT}: {agent.describe()}", flush=True)
        socket_path = display = agent.socket
        result.series["pending_acks"] = []
        sides = {"qubesshm": agent.agent_pid, "emulator": agent.emulator_pid,
                 "X server": agent.x.pid}
    elif policy == "direct":
        assert upstream is not None
        display = upstream
    else:
        assert upstream is not None
        log = workdir / "serve.log"
        options = ["--gntalloc-limit", BIG_LIMIT, "--sim-hold", str(args.hold),
                   "--late-timeout", f"{args.late_timeout:g}", *_POLICY_OPTIONS[policy]]
        if name != policy:
            stack.callback(report_log, name, log)  # once it has stopped
            socket_path, sides["qubesshm"] = start_split(stack, env, workdir, upstream,
                                                         *options, log=log)
        else:
            socket_path = workdir / "qubesshm-churn"
            proc = stack.enter_context(process(
                [sys.executable, "-m", "qubesshm", "serve", "--socket", str(socket_path),
                 "--upstream", str(upstream), *options], env, log))
            wait_for_socket(socket_path, proc, "qubesshm serve", log)
            sides["qubesshm"] = proc.pid
        display = socket_path
    if policy != AGENT and compositor_pid is not None:
        sides["compositor"] = compositor_pid
    return _Path(name, policy, result, display, socket_path, agent, sides, env)


def _begin(path: _Path) -> None:
    path.cpu_before = {side: cpu_seconds([pid]) for side, pid in path.sides.items()}


def _client_done(path: _Path, windows: int, seconds: float, client_cpu: float | None) -> None:
    """The client finished ``path``'s windows: its rate, and each side's CPU a window."""
    result = path.result
    cpu_after = {side: cpu_seconds([pid]) for side, pid in path.sides.items()}
    result.windows, result.seconds = windows, seconds
    if windows:
        before = dict(path.cpu_before)
        if client_cpu is not None:
            cpu_after["client"], before["client"] = client_cpu, 0.0
        result.cpu_ms_per_window = {
            side: (cpu_after[side] - before[side]) * 1000.0 / windows
            for side in CPU_SIDES if side in cpu_after}


def _run_policy(name: str, upstream: Path | None, windows: int,
                args: argparse.Namespace, compositor_pid: int | None = None) -> PolicyResult:
    """One row: ``name`` is a policy, or a proxy policy and " split"."""
    with contextlib.ExitStack() as stack:
        path = _start_path(stack, name, upstream, args, compositor_pid)
        result, policy = path.result, path.policy
        client_env = dict(path.env, WAYLAND_DISPLAY=str(path.display))
        _begin(path)
        start = time.monotonic()
        client = stack.enter_context(_client(_client_command(windows, args), client_env))
        behind = _watch(client.process, [path], start, expected_seconds(args), name, args)
        out, err = client.output()
        match = _RESULT.search(out)
        if client.process.returncode == 0 and match is not None:
            _client_done(path, int(match[1]), float(match[2]),
                         None if match[3] is None else float(match[3]))
        elif behind:
            opened = _OPENED.findall(out)
            result.windows = int(opened[-1]) if opened else 0
            result.seconds = time.monotonic() - start
            result.failed = (f"fell behind: stopped at {result.seconds:.0f} s, twice the "
                             "run's time, with its windows still to come")
            if policy == "direct":
                raise RuntimeError(f"direct: the churn client did not finish in "
                                   f"{result.seconds:.0f} s")
        else:
            # The policy could not carry the load (a full grant table, say): what it
            # managed until then, and why it stopped.
            opened = _OPENED.findall(out)
            result.windows = int(opened[-1]) if opened else 0
            result.seconds = time.monotonic() - start
            reasons = [line for line in err.splitlines() if "error" in line.lower()]
            result.failed = (reasons[0] if reasons else
                             f"the churn client exited with {client.process.returncode}").strip()
            if policy == "direct":
                raise RuntimeError(f"direct: the churn client failed: {result.failed}")
        result.windows_per_second = result.windows / result.seconds if result.seconds else 0.0
        _drain(path, start, args)
        if sys.stderr.isatty():
            print(file=sys.stderr)
    return result


def _run_in_turns(names: list[str], upstream: Path | None, windows: int,
                  args: argparse.Namespace, compositor_pid: int | None
                  ) -> dict[str, PolicyResult]:
    """--unpaced: every path started at once and one client taking turns of --block
    windows between them, each path timed apart (``examples/churn_client.py
    --displays``), so that what the machine does meanwhile falls on all of them alike."""
    with contextlib.ExitStack() as stack:
        paths = [_start_path(stack, name, upstream, args, compositor_pid) for name in names]
        # A compositor that serves two paths (direct's Weston is also serve's upstream)
        # works for both in each turn: its CPU is no one path's.
        shared = sum(1 for p in paths if p.policy != AGENT) > 1
        for path in paths:
            if shared:
                path.sides.pop("compositor", None)
            _begin(path)
        command = [*_client_command(windows, args), "--block", str(args.block),
                   "--displays", ",".join(str(p.display) for p in paths)]
        start = time.monotonic()
        client = stack.enter_context(_client(command, dict(os.environ)))
        behind = _watch(client.process, paths, start, expected_seconds(args) * len(paths),
                        "in turns", args)
        out, err = client.output()
        lines = {Path(m[4]): m for m in _RESULT.finditer(out) if m[4] is not None}
        if client.process.returncode != 0 or len(lines) != len(paths):
            # In turns one path's failure stops them all: the run is refused, not half
            # measured (--block 0 measures each path apart, failures included).
            reasons = [line for line in err.splitlines() if line.strip()]
            why = (f"it did not finish in {time.monotonic() - start:.0f} s, twice the run's "
                   "time" if behind else reasons[-1] if reasons else
                   f"it exited with {client.process.returncode}")
            raise RuntimeError(f"the churn client taking turns between the paths stopped: "
                               f"{why}; --block 0 measures each path apart")
        for path in paths:
            match = lines[path.display]
            _client_done(path, int(match[1]), float(match[2]),
                         None if match[3] is None else float(match[3]))
            result = path.result
            result.windows_per_second = (result.windows / result.seconds if result.seconds
                                         else 0.0)
        for path in paths:
            _drain(path, start, args)
        if sys.stderr.isatty():
            print(file=sys.stderr)
    return {path.name: path.result for path in paths}


@dataclass
class _Client:
    """The churn client, its stdout and stderr going to files (``_client``)."""

    process: subprocess.Popen[str]
    out: IO[str]
    err: IO[str]

    def output(self) -> tuple[str, str]:
        """Its stdout and stderr, once it has exited."""
        self.process.wait()
        texts = []
        for file in (self.out, self.err):
            file.seek(0)
            texts.append(file.read())
        return texts[0], texts[1]


@contextlib.contextmanager
def _client(command: list[str], env: dict[str, str]) -> Iterator[_Client]:
    """Run the churn client with its output in files: it prints a line a window, which
    would fill a pipe that nobody reads while ``_watch`` samples (about 1000 windows) and
    stop it there. Killed on the way out if still running."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        process = subprocess.Popen(command, env=env, stdout=out, stderr=err, text=True)
        try:
            yield _Client(process, out, err)
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()


def _watch(client: subprocess.Popen[str], paths: list[_Path], start: float, seconds: float,
           label: str, args: argparse.Namespace) -> bool:
    """Sample each path's stats while ``client`` runs; True if it fell behind. A path that
    cannot keep up is slowed, not refused (a commit waits for grant room): the client
    gets twice the run's ``seconds``, at least 10 s more, then is stopped."""
    deadline = start + max(2 * seconds, seconds + 10)
    while client.poll() is None:
        for path in paths:
            stats = _sample(path.socket_path, start, path.result)
            if path.found_fpi is None and stats is not None:
                path.found_fpi = stats["lifetimes"]["free_per_iteration"]
        _progress(label, start, args, paths[0].result)
        if time.monotonic() > deadline:
            client.terminate()
            return True
        time.sleep(SAMPLE_INTERVAL)
    return False


def _drain(path: _Path, start: float, args: argparse.Namespace) -> None:
    """After the client: watch ``path``'s backlog drain (at most --drain-wait seconds),
    then its final figures."""
    result, socket_path, agent = path.result, path.socket_path, path.agent
    if socket_path is None:
        return
    closed = time.monotonic()
    stats = _sample(socket_path, start, result)
    while (time.monotonic() - closed < args.drain_wait
           and not settled(stats, result, path.found_fpi)):
        _progress(path.name, start, args, result)
        time.sleep(SAMPLE_INTERVAL)
        stats = _sample(socket_path, start, result)
    _finish(result, stats, closed - start, _FREE_PER_ITERATION[path.policy])
    if agent is not None and stats is not None:
        result.windows_sent = churn_agent.windows_sent(stats)
        if result.failed is None and not getattr(args, "unpaced", False):
            # Unpaced, a window closed before the agent's next refresh is never
            # sent, as a compositor never shows it: counted, not a failure.
            result.failed = churn_agent.not_shown(stats, result.windows, agent.log)
    if path.policy in LATE_PATH:
        set_drain_bound(result, args.late_timeout)


def _sample(socket_path: Path | None, start: float,
            result: PolicyResult) -> dict[str, Any] | None:
    if socket_path is None:
        return None
    try:
        stats = read_stats(str(socket_path))
    except StatsError:
        return None
    record(stats, round(time.monotonic() - start, 3), result)
    return stats


def settled(stats: dict[str, Any] | None, result: PolicyResult, found_fpi: int | None) -> bool:
    """Nothing left after the last close: no live grant pages, an empty backlog, and
    free_per_iteration back to what qubesshm found (it restores it once the backlog is
    gone, on its next timer)."""
    series = result.series
    if stats is None or not series["t"] or series["deferred"][-1] > 0 or series["live"][-1] > 0:
        return False
    fpi = stats["lifetimes"]["free_per_iteration"]
    return found_fpi is None or fpi is None or fpi == found_fpi


def record(stats: dict[str, Any], t: float, result: PolicyResult) -> None:
    """One sample of qubesshm's counters ``stats``, taken ``t`` s into the run."""
    grants = stats["grants"]
    series = result.series
    series["t"].append(t)
    if result.policy == AGENT:
        series["live"].append(churn_agent.window_pages(stats))
        series["pending_acks"].append(churn_agent.pending_acks(stats))
    else:
        series["live"].append(grants["live"])
    series["deferred"].append(grants["deferred"] or 0)


def _finish(result: PolicyResult, stats: dict[str, Any] | None, closed_at: float,
            free_per_iteration: int) -> None:
    series = result.series
    if stats is None or not series["t"]:
        raise RuntimeError(f"{result.policy}: no counters could be read from the proxy")
    grants = stats["grants"]
    result.grants_per_window = grants["shared_total"] / max(1, result.windows)
    lifetimes = stats["lifetimes"]
    result.cache_hits = lifetimes["cache_hits"]
    result.from_cache = lifetimes["cache_hits"] / max(1, lifetimes["cache_hits"]
                                                      + lifetimes["cache_misses"])
    result.waits_for_room = stats["waits_for_room"]
    result.late_releases = lifetimes["late_releases"]
    result.defer_batches = lifetimes["defer_batches"]
    result.fpi_raises = lifetimes["free_per_iteration_raises"]
    result.fpi_restores = lifetimes["free_per_iteration_restores"]
    if result.policy == AGENT:
        for name, value in churn_agent.figures(stats).items():
            setattr(result, name, value)
        result.peak_pending_acks = max(int(v) for v in series["pending_acks"])
    if result.failed is not None and result.waits_for_room:
        result.failed += (f"; {result.waits_for_room} commits waited for grant room "
                          f"(longest {stats['commit_waits_ms']['max'] or 0:.0f} ms)")
    result.peak_live = max(int(v) for v in series["live"])
    result.final_live = int(series["live"][-1])
    result.peak_deferred = max(int(v) for v in series["deferred"])
    result.final_deferred = int(series["deferred"][-1])
    result.leaked = grants["leaked"]
    result.peak_grant_mib = round(max(
        live + deferred for live, deferred in zip(series["live"], series["deferred"],
                                                  strict=True)) * PAGE_SIZE / (1 << 20), 1)
    # Drained: the first sample after the last close from which the backlog stays
    # empty (areas still held at the close may join it later).
    after = [(t, d) for t, d in zip(series["t"], series["deferred"], strict=True)
             if t >= closed_at]
    empty_from = None
    for t, deferred in after:
        if deferred == 0 and empty_from is None:
            empty_from = t
        elif deferred > 0:
            empty_from = None
    if empty_from is not None and result.final_live == 0:
        result.drain_seconds = round(max(0.0, empty_from - closed_at), 2)
    else:
        # Still draining: the kernel frees free_per_iteration entries a second.
        last_t = series["t"][-1]
        result.drain_seconds = round(last_t - closed_at + math.ceil(
            result.final_deferred / free_per_iteration), 1)
        result.drain_estimated = True


def set_drain_bound(result: PolicyResult, late_timeout: float) -> None:
    """Whether the backlog was empty for good within ``late_timeout`` + 1 s of the last
    close (measured, not estimated)."""
    result.drain_bound_seconds = late_timeout + DRAIN_MARGIN
    result.drained_in_bound = (not result.drain_estimated and result.drain_seconds is not None
                               and result.drain_seconds <= result.drain_bound_seconds)


def pace(args: argparse.Namespace) -> str:
    """How the windows came: "at 10/s for 10 s", or unpaced."""
    if getattr(args, "unpaced", False):
        turns = (f", the paths taking turns of {args.block}" if getattr(args, "block", 0)
                 else "")
        return ("unpaced (no frame callbacks: one wl_display.sync round trip a window"
                f"{turns})")
    return f"at {args.rate:g}/s for {args.seconds:g} s"


def _progress(policy: str, start: float, args: argparse.Namespace,
              result: PolicyResult) -> None:
    if not sys.stderr.isatty():
        return
    elapsed = time.monotonic() - start
    done = min(1.0, elapsed / max(expected_seconds(args), 0.001))
    bar = "#" * int(done * 30)
    live = result.series["live"][-1] if result.series["live"] else 0
    deferred = result.series["deferred"][-1] if result.series["deferred"] else 0
    print(f"\r{policy:<15} [{bar:<30}] {elapsed:6.1f} s  live {int(live):>8}  "
          f"deferred {int(deferred):>8}", end="", file=sys.stderr, flush=True)


def _print_table(results: dict[str, PolicyResult], windows: int,
                 args: argparse.Namespace) -> None:
    acks = (f", ACKs written {args.ack_delay:g} s late" if AGENT in results and args.ack_delay
            else "")
    print(f"\n{windows} windows of {args.size} {pace(args)}, "
          f"{args.concurrency} open at once, {args.frames} frame(s) each, mappings held "
          f"{args.hold:g} s after let go{acks}, late after {args.late_timeout:g} s; grant "
          "counts in pages (one grant each):")
    width = max([15] + [len(name) for name in results])
    print(f"{'policy':<{width}} {'win/s':>7} {'x direct':>8} {'grants/win':>10} "
          f"{'from cache':>10} {'peak live':>9} "
          f"{'final live':>10} {'peak deferred':>13} {'final deferred':>14} "
          f"{'drain s':>9} {'leaked':>6} {'peak MiB':>8}")

    def show(value: object, fmt: str = "") -> str:
        return "-" if value is None else format(value, fmt)

    for r in results.values():
        drain = show(r.drain_seconds, ".1f") + ("~" if r.drain_estimated else "")
        print(f"{r.policy:<{width}} {r.windows_per_second:>7.1f} "
              f"{show(r.ratio_to_direct, '.2f'):>8} "
              f"{show(r.grants_per_window, '.1f'):>10} {show(r.from_cache, '.0%'):>10} "
              f"{show(r.peak_live):>9} "
              f"{show(r.final_live):>10} {show(r.peak_deferred):>13} "
              f"{show(r.final_deferred):>14} {drain:>9} {show(r.leaked):>6} "
              f"{show(r.peak_grant_mib):>8}")
    for r in results.values():
        if r.failed is not None and r.windows == windows:
            print(f"{r.policy}: {r.failed}")  # the client went through, not its windows
        elif r.failed is not None:
            print(f"{r.policy}: stopped after {r.windows} of {windows} windows: {r.failed}")
    if any(r.drain_estimated for r in results.values()):
        print("~ estimated: the backlog left after --drain-wait, at the policy's "
              "free_per_iteration entries a second")
    bounded = [r for r in results.values() if r.drain_bound_seconds is not None]
    if bounded:
        within = [r.policy for r in bounded if r.drained_in_bound]
        beyond = [r.policy for r in bounded if not r.drained_in_bound]
        print(f"deferred backlog empty within --late-timeout + {DRAIN_MARGIN:g} s = "
              f"{bounded[0].drain_bound_seconds:g} s of the last close: "
              f"{', '.join(within) or 'none'}" + (f"; not: {', '.join(beyond)}" if beyond else ""))
    line = cpu_line(results)
    if line is not None:
        print(line)
    if AGENT in results and results[AGENT].acks is not None:
        print(churn_agent.summary(results[AGENT], args.late_timeout))


def plot(results: dict[str, PolicyResult], args: argparse.Namespace) -> Any:
    """Live grant pages and deferred backlog over time, one line per policy with grants;
    with the agent, a third panel: the ACKs the GUI daemon owes."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot
    from matplotlib.ticker import MaxNLocator

    acking = [r for r in results.values() if r.series.get("pending_acks")]
    rows = 3 if acking else 2
    figure, axes_list = pyplot.subplots(rows, 1, sharex=True, figsize=(9, 3.25 * rows))
    live_axes, deferred_axes = axes_list[0], axes_list[1]
    # kernel-default and qubes run alike until the first tick: tell them apart by style.
    styles = {"kernel-default": "--", "qubes": ":"}
    for r in results.values():
        if not r.series["t"]:
            continue  # direct: no grants
        label = r.policy if r.failed is None else f"{r.policy} (stopped after {r.windows} windows)"
        for axes, values in ((live_axes, r.series["live"]), (deferred_axes, r.series["deferred"])):
            axes.plot(r.series["t"], values, styles.get(base_policy(r.policy), "-"),
                      label=label, linewidth=1.6)
    live_axes.set_ylabel("live grant pages")
    deferred_axes.set_ylabel("deferred backlog (pages)")
    for r in acking:
        latency = r.ack_latency_ms or {}
        label = r.policy + (f" (ACK latency p50 {latency['p50']:.0f} ms, max "
                            f"{latency['max']:.0f} ms)" if latency.get("p50") is not None
                            and latency.get("max") is not None else "")
        axes_list[2].plot(r.series["t"], r.series["pending_acks"], "-", label=label,
                          linewidth=1.6)
    if acking:
        axes_list[2].set_ylabel("ACKs pending")
        axes_list[2].yaxis.set_major_locator(MaxNLocator(integer=True))
    axes_list[-1].set_xlabel("seconds since the first window")
    delay = float(getattr(args, "ack_delay", 0.0))
    acks = f", ACKs {delay:g} s late" if acking and delay else ""
    late = getattr(args, "late_timeout", None)
    late_text = f", late after {late:g} s" if late is not None else ""
    live_axes.set_title(f"window churn: {args.size} {pace(args)}, "
                        f"mappings held {args.hold:g} s{acks}{late_text}; "
                        f"{compositor_label(args, list(results))}", fontsize="medium")
    for axes in axes_list:
        axes.grid(True, alpha=0.3)
        axes.legend(loc="upper right", fontsize="small")
    figure.tight_layout()
    return figure
