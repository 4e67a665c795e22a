"""``qubesshm bench frames --mode agent``: an animation through the agent, against Weston.

In one run, ``frames_client`` draws ``--size`` frames (1920x1080 unless given)
with full damage, paced by frame callbacks and unpaced, on two paths: straight
on the benchmark's compositor (its own headless Weston, unless ``--upstream``):
the baseline; and on ``qubesshm agent`` (``--refresh`` Hz, 60 unless given)
whose windows ``qubesshm guid-emulator`` shows on a private Xvfb, all started
by the benchmark. The paths alternate within each of ``--repeats`` runs. For
each case it reports the median frame rate and its ratio to the direct path,
and the compositor's CPU time per frame on each path (Weston's, found by its
socket's peer credentials; the agent's), against a plain copy of the damaged
bytes measured in the same run (``frames.plain_copy_ms``), with the ratio; and
separately what dom0 would spend: the emulator and the X server. A frame is
one the client committed after warm-up; the agent's own count of the commits it
rendered is read too, and a shortfall is reported, since a frame it skipped
would flatter both its rate and its CPU per frame.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..grants.files import write_output
from .agent_path import AgentPath, start_agent_path
from .frames import (
    Case,
    _fmt,
    _median,
    frame_size,
    plain_copy_ms,
    timed_run,
)
from .machine import describe_machine, load_line, weston_version
from .private_x import private_xvfb, xvfb_command
from .processes import compositor, cpu_seconds, listener_pid

DEFAULT_REFRESH = 60.0
GOAL_FPS = 0.9  # at least this times the direct path's frame rate
GOAL_CPU = 2.0  # at most this times a plain copy of the damaged bytes


@dataclass
class PathRuns:
    """One path's figures over the runs of one case (per run: one value each)."""

    fps: list[float] = field(default_factory=list)
    compositor_ms_per_frame: list[float] = field(default_factory=list)
    emulator_ms_per_frame: list[float] = field(default_factory=list)
    xserver_ms_per_frame: list[float] = field(default_factory=list)
    frames_rendered: list[int] = field(default_factory=list)
    frames: int = 0


@dataclass(frozen=True)
class Route:
    """Where the client connects, and whose CPU is read."""

    name: str
    display: Path
    compositor_pid: int | None
    emulator_pid: int | None = None
    xserver_pid: int | None = None
    agent: AgentPath | None = None


def _cpu(pid: int | None) -> float:
    return cpu_seconds([pid]) if pid is not None else 0.0


def _rendered(path: Route) -> int:
    return int(path.agent.stats()["commits"]) if path.agent is not None else 0


def run_once(path: Route, env: dict[str, str], case: Case, args: argparse.Namespace,
             runs: PathRuns) -> None:
    pids = (path.compositor_pid, path.emulator_pid, path.xserver_pid)
    result, (before, rendered_before), (after, rendered_after) = timed_run(
        path.display, env, case, args, lambda: ([_cpu(pid) for pid in pids], _rendered(path)))
    rendered = rendered_after - rendered_before
    frames = int(result["frames"])
    runs.frames = frames
    runs.fps.append(frames / float(result["seconds"]))
    spent = [(a - b) * 1000 / frames for a, b in zip(after, before, strict=True)]
    for value, pid, into in zip(spent, pids, (runs.compositor_ms_per_frame,
                                              runs.emulator_ms_per_frame,
                                              runs.xserver_ms_per_frame), strict=True):
        if pid is not None:
            into.append(value)
    if path.agent is not None:
        runs.frames_rendered.append(rendered)


def run_agent_frames_bench(args: argparse.Namespace) -> int:
    xvfb_command()  # a missing Xvfb is said before anything starts
    width, height = frame_size(args)
    refresh = args.refresh if args.refresh is not None else DEFAULT_REFRESH
    cases = [Case("full", paced) for paced in (True, False)]
    results: dict[str, dict[str, PathRuns]] = {c.name: {} for c in cases}
    print(describe_machine())
    with contextlib.ExitStack() as stack:
        upstream = stack.enter_context(compositor(
            args.upstream, width=width, height=height, animations=args.animations != "off"))
        if args.upstream is None:
            print(f"weston: {weston_version() or 'version unknown'}")
        screen = stack.enter_context(private_xvfb(max(width, 1920), max(height, 1080)))
        workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="qsbench-")))
        workdir.chmod(0o700)
        env = {k: v for k, v in os.environ.items() if k != "QUBESSHM_SIM_ROOT"}
        env.update(XDG_RUNTIME_DIR=str(workdir), QUBESSHM_GRANTS="sim")
        agent = start_agent_path(stack, env, workdir, screen.display, refresh=refresh)
        print(f"agent path: {agent.describe(screen.describe())}")
        weston_pid = listener_pid(upstream)
        if weston_pid is None:
            print("direct path: the compositor's pid cannot be read (SO_PEERCRED); its CPU "
                  "is not reported")
        paths = [Route("direct", upstream, weston_pid),
                 Route("agent", agent.socket, agent.agent_pid, agent.emulator_pid,
                       screen.pid, agent)]
        for case in cases:
            for _ in range(args.repeats):
                for path in paths:
                    runs = results[case.name].setdefault(path.name, PathRuns())
                    run_once(path, env, case, args, runs)
    copies = {}
    for c in cases:
        direct_fps = _median(results[c.name]["direct"].fps)
        interval = 1.0 / direct_fps if c.paced and direct_fps else 0.0
        copies[c.name] = plain_copy_ms(c, args.region, interval, width=width, height=height)
    report(cases, results, copies, args)
    print(f"\n{load_line()} after the run")
    if args.json:
        data = {"mode": "agent", "size": [width, height], "refresh": refresh,
                **{c.name: {"plain_copy_ms": copies[c.name],
                            **{p: asdict(r) for p, r in results[c.name].items()}}
                   for c in cases}}
        write_output(Path(args.json), json.dumps(data, indent=2) + "\n")
    return 0


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def report(cases: list[Case], results: dict[str, dict[str, PathRuns]],
           copies: dict[str, float], args: argparse.Namespace) -> None:
    width, height = frame_size(args)
    pool = "an unsealed memfd" if args.unsealed else "a sealed memfd"
    print(f"\n{width}x{height} xrgb8888 frames with full damage from {pool}, {args.frames} "
          f"frames per run after {args.warmup} warm-up frames, median of {args.repeats} runs; "
          "'paced' waits for frame callbacks; compositor CPU = user+system time per frame of "
          "Weston (direct) or of qubesshm agent (agent); plain copy = numpy copy of the "
          "damaged bytes in this process, one per frame interval of the direct path for "
          "paced cases, back to back for unpaced ones; emulator and X server: dom0's share, "
          "apart:")
    print(f"{'case':<15} {'path':<7} {'fps':>7} {'x direct':>9} {'comp. ms/fr':>12} "
          f"{'copy ms':>8} {'x copy':>7} {'emulator ms/fr':>15} {'X ms/fr':>8}")
    for case in cases:
        runs = results[case.name]
        direct_fps = _median(runs["direct"].fps)
        copy = copies[case.name]
        for name, r in runs.items():
            fps = _median(r.fps)
            cpu = _median(r.compositor_ms_per_frame)
            print(f"{case.name:<15} {name:<7} {_fmt(fps, 1):>7} "
                  f"{_fmt(_ratio(fps, direct_fps)):>9} {_fmt(cpu, 3):>12} {_fmt(copy, 3):>8} "
                  f"{_fmt(_ratio(cpu, copy)):>7} "
                  f"{_fmt(_median(r.emulator_ms_per_frame), 3):>15} "
                  f"{_fmt(_median(r.xserver_ms_per_frame), 3):>8}")
    print("unpaced: Weston composites at its own repaint rate and lets the commits in "
          "between go unread; so does the agent, which draws each window at most once a "
          "refresh (--refresh) and gives superseded buffers back unread")
    for case in cases:
        agent = results[case.name]["agent"]
        short = [n for n in agent.frames_rendered if n != agent.frames]
        if short:
            print(f"note: {case.name}: the agent drew {short} of {agent.frames} frames in "
                  "some runs (the others were superseded before its next refresh)")
    print("\ngoals (agent mode):")
    for case in cases:
        agent, direct = results[case.name]["agent"], results[case.name]["direct"]
        fps_ratio = _ratio(_median(agent.fps), _median(direct.fps))
        cpu_ratio = _ratio(_median(agent.compositor_ms_per_frame), copies[case.name])
        print(f"  {case.name:<15} fps {_fmt(fps_ratio)}x direct (goal >= {GOAL_FPS}); agent "
              f"CPU per frame {_fmt(cpu_ratio)}x the plain copy (goal <= {GOAL_CPU:g})")
