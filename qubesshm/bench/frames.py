"""``qubesshm bench frames``: frame rate and copy cost through the proxy, against baselines.

In one run, over one compositor, ``frames_client`` draws 1920x1080 frames with
full damage, with a 64x64 region that stays in place, and with one that moves
every frame; each paced by frame callbacks and unpaced; straight to the
compositor, through ``qubesshm serve`` (on the simulated grant layer with the
gntalloc limit Qubes sets) and through waypipe. For every case it reports the
median frame rate over ``--repeats`` runs (paths interleaved), the relaying
processes' CPU time per frame, a plain copy of the same damaged bytes measured
in the same run (numpy, one memcpy per row: the physical limit of any copying
proxy), and, from the proxy's own counters, bytes copied per byte damaged in
steady state (after ``--warmup`` frames, when the surface's output buffers
exist). ``--size`` changes the frame size; ``--mode agent`` measures agent mode
instead (``frames_agent``).

``--remote`` adds the split proxy (*qubesshm split*: ``serve --remote`` starting
``qubesshm host``) and counts the bytes that cross each path's stream, both ways,
over the timed frames: the split proxy's between serve and the host half, and
waypipe's between ``waypipe server`` and ``waypipe client``, each through a
counting pass-through (``meter``) that both paths then have on their stream (its
own CPU is left out of theirs). The split stream carries Wayland messages and
grant references, never pixels; waypipe's carries the damaged pixels. The check
of the split proxy's goal (bytes per frame at most 1% of waypipe's, full damage)
is printed.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import mmap
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from ..grants.files import write_output
from ..relay.control import read_stats
from .machine import describe_machine, load_line, versions_line
from .processes import (
    QUBES_GNTALLOC_LIMIT,
    Meter,
    compositor,
    cpu_seconds,
    own_cpu_seconds,
    report_log,
    start_qubesshm,
    start_split,
    start_waypipe,
)

WIDTH, HEIGHT = 1920, 1080
DAMAGES = ("full", "static", "moving")
SPLIT = "qubesshm split"
# The split proxy's goal: bytes over its stream per frame, full damage, at most this
# share of waypipe's.
STREAM_GOAL = 0.01


@dataclass
class Case:
    damage: str
    paced: bool

    @property
    def name(self) -> str:
        return f"{self.damage}, {'paced' if self.paced else 'unpaced'}"


@dataclass
class Runs:
    fps: list[float] = field(default_factory=list)
    cpu_ms_per_frame: list[float] = field(default_factory=list)
    copied_per_damaged: list[float] = field(default_factory=list)
    damaged_bytes_per_frame: float = 0.0


@dataclass
class StreamRuns:
    """``--remote``: a metered path's stream over the runs of one case."""

    # Bytes over the stream per frame, both ways, as the meter counted them.
    bytes_per_frame: list[float] = field(default_factory=list)
    # The split proxy's: the same as serve's own stream counters (qubesshm stats) say.
    by_serve: list[float] = field(default_factory=list)
    # The meter's own CPU per frame, left out of the path's.
    meter_cpu_ms_per_frame: list[float] = field(default_factory=list)


def frame_size(args: argparse.Namespace) -> tuple[int, int]:
    """``--size WxH`` (1920x1080 unless given)."""
    text = getattr(args, "size", None)
    if text is None:
        return WIDTH, HEIGHT
    width, height = text.split("x")
    return int(width), int(height)


def check_frames(args: argparse.Namespace) -> str | None:
    """``bench frames``' usage mistakes, before anything starts."""
    width, height = frame_size(args)
    if 2 * args.region > min(width, height):
        return (f"qubesshm bench frames: --region {args.region} does not fit twice in "
                f"{width}x{height} frames: give at most {min(width, height) // 2}")
    if getattr(args, "mode", "proxy") != "agent" and getattr(args, "refresh", None) is not None:
        return "qubesshm bench frames: --refresh is the agent's: add --mode agent"
    if getattr(args, "mode", "proxy") == "agent" and getattr(args, "remote", False):
        return ("qubesshm bench frames: --remote measures the split proxy (the proxy mode): "
                "not with --mode agent")
    return None


def start_client(display: Path, env: dict[str, str], case: Case,
                 args: argparse.Namespace) -> subprocess.Popen[str]:
    """``frames_client`` for ``case`` on ``display``, driven by ``read_result``/``tell``."""
    width, height = frame_size(args)
    command = [sys.executable, "-m", "qubesshm.bench.frames_client", "--damage", case.damage,
               "--width", str(width), "--height", str(height), "--region", str(args.region),
               "--frames", str(args.frames), "--warmup", str(args.warmup)]
    if case.paced:
        command.append("--wait-frame")
    if args.unsealed:
        command.append("--unsealed")
    return subprocess.Popen(command, env=dict(env, WAYLAND_DISPLAY=str(display)),
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def read_result(proc: subprocess.Popen[str]) -> dict[str, Any]:
    """The client's next JSON line: its warm-up mark, then the timed run's figures."""
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line:
        _, err = proc.communicate(timeout=30)
        raise RuntimeError(f"frames_client failed: {err.strip()}")
    data: dict[str, Any] = json.loads(line)
    return data


def tell(proc: subprocess.Popen[str]) -> None:
    """Let the client go on: time its frames, or (after them) exit."""
    assert proc.stdin is not None
    proc.stdin.write("\n")
    proc.stdin.flush()


T = TypeVar("T")


def timed_run(display: Path, env: dict[str, str], case: Case, args: argparse.Namespace,
              sample: Callable[[], T]) -> tuple[dict[str, Any], T, T]:
    """One timed run of ``frames_client``: warmed up, ``sample()`` taken, its timed
    frames, ``sample()`` again; the client's figures and both samples."""
    proc = start_client(display, env, case, args)
    try:
        read_result(proc)  # warmed up: the output buffers exist
        before = sample()
        tell(proc)
        result = read_result(proc)
        after = sample()
        tell(proc)
        _, err = proc.communicate(timeout=30)
        if proc.returncode != 0:
            raise RuntimeError(f"frames_client exited with {proc.returncode}: {err.strip()}")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    return result, before, after


def _counters(proxy_socket: Path | None) -> tuple[int, int, int]:
    """The proxy's bytes copied and damaged, and (a split proxy's VM side) the bytes
    its stream link read and wrote; zeros without a proxy."""
    if proxy_socket is None:
        return 0, 0, 0
    stats = read_stats(str(proxy_socket))
    stream = stats.get("stream") or {}
    return (int(stats["bytes_copied"]), int(stats["bytes_damaged"]),
            int(stream.get("bytes_in", 0)) + int(stream.get("bytes_out", 0)))


def run_once(display: Path, env: dict[str, str], case: Case, args: argparse.Namespace,
             relay_pids: list[int], proxy_socket: Path | None, runs: Runs,
             meter: Meter | None = None, stream: StreamRuns | None = None) -> None:
    """One timed run on a path; with ``meter`` (and ``stream`` to note them in), the
    bytes over its stream per frame, and the meter's own CPU, which is left out of the
    path's."""
    meter_pid = meter.pid() if meter is not None else 0
    exclude = [meter_pid] if meter is not None else []
    result, before, after = timed_run(
        display, env, case, args,
        lambda: (cpu_seconds(relay_pids, exclude), *_counters(proxy_socket),
                 meter.bytes() if meter is not None else 0,
                 own_cpu_seconds(meter_pid) if meter is not None else 0.0))
    cpu_before, copied_before, damaged_before, own_before, stream_before, meter_before = before
    cpu_after, copied_after, damaged_after, own_after, stream_after, meter_after = after
    cpu = cpu_after - cpu_before
    frames = result["frames"]
    runs.fps.append(frames / result["seconds"])
    runs.damaged_bytes_per_frame = result["bytes_damaged"] / frames
    if relay_pids:
        runs.cpu_ms_per_frame.append(cpu * 1000 / frames)
    if proxy_socket is not None and damaged_after > damaged_before:
        runs.copied_per_damaged.append((copied_after - copied_before)
                                       / (damaged_after - damaged_before))
    if meter is not None and stream is not None:
        stream.bytes_per_frame.append((stream_after - stream_before) / frames)
        stream.meter_cpu_ms_per_frame.append((meter_after - meter_before) * 1000 / frames)
        if own_after:  # a split proxy's own count
            stream.by_serve.append((own_after - own_before) / frames)


def plain_copy_ms(case: Case, region: int, interval: float, repeats: int = 30, *,
                  width: int = WIDTH, height: int = HEIGHT) -> float:
    """CPU milliseconds to copy one frame's damaged bytes with numpy, row by row, one
    copy every ``interval`` seconds: a copy after the CPU idled costs about twice one
    that follows another (caches, clock), so paced frames get a paced baseline."""
    size = width * height * 4
    fds = [os.memfd_create("qubesshm-bench-copy", os.MFD_CLOEXEC) for _ in range(2)]
    maps = []
    try:
        for fd in fds:
            os.ftruncate(fd, size)
            maps.append(mmap.mmap(fd, size))
        src = np.frombuffer(maps[0], dtype=np.uint32).reshape(height, width)
        dst = np.frombuffer(maps[1], dtype=np.uint32).reshape(height, width)
        src[:] = 0x11223344
        dst[:] = 0
        if case.damage == "full":
            rects = [(0, 0, width, height)]
        elif case.damage == "static":
            rects = [(width // 3, height // 3, region, region)]
        else:  # the square where it was and where it is now
            rects = [(0, height // 3, region, region), (region, height // 3, region, region)]
        samples = []
        for _ in range(repeats):
            if interval:
                time.sleep(interval)
            start = time.process_time()
            for x, y, w, h in rects:
                np.copyto(dst[y:y + h, x:x + w], src[y:y + h, x:x + w])
            samples.append(time.process_time() - start)
        # process_time ticks coarsely: time a batch when one copy is below its resolution.
        if statistics.median(samples) == 0.0:
            start = time.process_time()
            for _ in range(1000):
                for x, y, w, h in rects:
                    np.copyto(dst[y:y + h, x:x + w], src[y:y + h, x:x + w])
            return (time.process_time() - start)
        return statistics.median(samples) * 1000
    finally:
        del src, dst
        for m in maps:
            m.close()
        for fd in fds:
            os.close(fd)


def run_frames_bench(args: argparse.Namespace) -> int:
    if getattr(args, "mode", "proxy") == "agent":
        from .frames_agent import run_agent_frames_bench

        return run_agent_frames_bench(args)
    width, height = frame_size(args)
    cases = [Case(d, paced) for d in DAMAGES for paced in (True, False)]
    results: dict[str, dict[str, Runs]] = {c.name: {} for c in cases}
    remote = bool(getattr(args, "remote", False))
    # --remote: each metered path's stream, by case and path.
    stream: dict[str, dict[str, StreamRuns]] = {c.name: {} for c in cases}
    if remote:
        print(describe_machine())
    with contextlib.ExitStack() as stack, compositor(
            args.upstream, width=width, height=height,
            animations=args.animations != "off") as upstream:
        if remote:
            print(versions_line(args.upstream is None))
        workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="qubesshm-bench-")))
        workdir.chmod(0o700)
        env = dict(os.environ, XDG_RUNTIME_DIR=str(workdir), QUBESSHM_GRANTS="sim")
        env.pop("QUBESSHM_SIM_ROOT", None)
        paths: dict[str, tuple[Path, list[int]]] = {"direct": (upstream, [])}
        # The stats socket of each proxy path, and the meter on each metered stream.
        stats_of: dict[str, Path] = {}
        meters: dict[str, Meter] = {}
        limit = ("--gntalloc-limit", str(QUBES_GNTALLOC_LIMIT))
        proxy_socket, proxy_pid = start_qubesshm(stack, env, workdir, upstream, *limit)
        paths["qubesshm"] = (proxy_socket, [proxy_pid])
        stats_of["qubesshm"] = proxy_socket
        if remote:
            log = workdir / "split.log"
            stack.callback(report_log, SPLIT, log)  # once it has stopped
            meters[SPLIT] = Meter(workdir / "split.counters")
            split_socket, split_pid = start_split(stack, env, workdir, upstream, *limit,
                                                  meter=meters[SPLIT], log=log)
            paths[SPLIT] = (split_socket, [split_pid])
            stats_of[SPLIT] = split_socket
        waypipe_meter = Meter(workdir / "waypipe.counters") if remote else None
        waypipe = start_waypipe(stack, env, workdir, upstream, args.no_waypipe, waypipe_meter)
        if waypipe is not None:
            paths["waypipe"] = waypipe
            if waypipe_meter is not None:
                meters["waypipe"] = waypipe_meter
        if remote:
            print(f"{SPLIT}: serve --remote 'qubesshm host', the stream between them through "
                  "a counting pass-through" + (", as waypipe's between its server and client"
                                               if "waypipe" in meters else ""))
        for case in cases:
            for _ in range(args.repeats):
                for name, (display, pids) in paths.items():
                    runs = results[case.name].setdefault(name, Runs())
                    meter = meters.get(name)
                    run_once(display, env, case, args, pids, stats_of.get(name), runs, meter,
                             stream[case.name].setdefault(name, StreamRuns()) if meter else None)
    copies = {}
    for c in cases:
        direct_fps = _median(results[c.name]["direct"].fps)
        interval = 1.0 / direct_fps if c.paced and direct_fps else 0.0
        copies[c.name] = plain_copy_ms(c, args.region, interval, width=width, height=height)
    _report(cases, results, copies, args)
    if remote:
        _report_stream(cases, results, stream, args)
        print(f"\n{load_line()} after the run")
    if args.json:
        data = {c.name: {"plain_copy_ms": copies[c.name],
                         **{p: asdict(r) for p, r in results[c.name].items()}} for c in cases}
        if remote:
            for c in cases:
                data[c.name]["stream"] = {p: asdict(r) for p, r in stream[c.name].items()}
        write_output(Path(args.json), json.dumps(data, indent=2) + "\n")
    return 0


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def _fmt(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _report(cases: list[Case], results: dict[str, dict[str, Runs]], copies: dict[str, float],
            args: argparse.Namespace) -> None:
    pool = "unsealed memfd (read with preadv)" if args.unsealed else "sealed memfd (mapped)"
    width, height = frame_size(args)
    print(f"\n{width}x{height} xrgb8888 from a {pool}, {args.frames} frames per run after "
          f"{args.warmup} warm-up frames, median of {args.repeats} runs; 'paced' waits for "
          "frame callbacks; CPU = user+system time of the relaying processes per frame; "
          "plain copy = numpy copy of the same damaged bytes in this process, one per frame "
          "interval of the direct path for paced cases, back to back for unpaced ones:")
    width = max([9] + [len(name) for runs in results.values() for name in runs])
    print(f"{'case':<18} {'path':<{width}} {'fps':>8} {'x direct':>9} {'CPU ms/fr':>10} "
          f"{'copy ms':>8} {'CPU/copy':>9} {'copied/damaged':>15}")
    for case in cases:
        runs = results[case.name]
        direct_fps = _median(runs["direct"].fps)
        for name, r in runs.items():
            fps = _median(r.fps)
            cpu = _median(r.cpu_ms_per_frame)
            ratio = fps / direct_fps if fps and direct_fps else None
            copy = copies[case.name]
            cpu_copy = cpu / copy if cpu is not None and copy > 0 else None
            print(f"{case.name:<18} {name:<{width}} {_fmt(fps, 1):>8} {_fmt(ratio):>9} "
                  f"{_fmt(cpu, 3):>10} {_fmt(copy, 3):>8} {_fmt(cpu_copy, 1):>9} "
                  f"{_fmt(_median(r.copied_per_damaged)):>15}")
    for proxy in ("qubesshm", SPLIT):
        if proxy in results[cases[0].name]:
            _report_goals(proxy, cases, results, copies)


def _report_goals(proxy: str, cases: list[Case], results: dict[str, dict[str, Runs]],
                  copies: dict[str, float]) -> None:
    print(f"\ngoals ({proxy}):")
    for case in cases:
        q, d = results[case.name][proxy], results[case.name]["direct"]
        fps_ratio = (_median(q.fps) or 0) / (_median(d.fps) or 1)
        line = f"  {case.name:<18} fps {fps_ratio:.2f}x direct"
        if case.damage == "full":
            cpu = _median(q.cpu_ms_per_frame)
            line += (f" (goal >= 0.9); CPU per frame {_fmt((cpu or 0) / copies[case.name], 1)}"
                     "x the plain copy (goal <= 2)")
        else:
            goal = 1.1 if case.damage == "static" else 2.2
            line += (f"; bytes copied/damaged {_fmt(_median(q.copied_per_damaged))} "
                     f"(goal <= {goal})")
        print(line)


def _report_stream(cases: list[Case], results: dict[str, dict[str, Runs]],
                   stream: dict[str, dict[str, StreamRuns]], args: argparse.Namespace) -> None:
    """Bytes over the stream per frame, split proxy and waypipe, the meter's CPU on each,
    and the split proxy's goal with full damage."""
    width, height = frame_size(args)
    print(f"\nbytes over the stream per frame, both ways, over the timed frames (median of "
          f"{args.repeats} runs; {SPLIT}: serve <-> qubesshm host, as the pass-through counted "
          "them and as serve's stream counters (qubesshm stats) did; waypipe: server <-> "
          "client, --compress none); the pass-through's own CPU per frame on each stream "
          "(not in the paths' CPU above; on a stream of pixels it slows unpaced frames):")
    print(f"{'case':<18} {'damaged B/fr':>13} {SPLIT + ' B/fr':>20} {'by serve':>9} "
          f"{'waypipe B/fr':>14} {'split/waypipe':>14} {'meter ms/fr split, waypipe':>28}")
    shares: dict[str, float | None] = {}
    empty = StreamRuns()
    for case in cases:
        split_runs = stream[case.name].get(SPLIT, empty)
        waypipe_runs = stream[case.name].get("waypipe", empty)
        split = _median(split_runs.bytes_per_frame)
        waypipe = _median(waypipe_runs.bytes_per_frame)
        share = split / waypipe if split is not None and waypipe else None
        shares[case.name] = share
        damaged = results[case.name]["direct"].damaged_bytes_per_frame
        meters = (f"{_fmt(_median(split_runs.meter_cpu_ms_per_frame), 3)}, "
                  f"{_fmt(_median(waypipe_runs.meter_cpu_ms_per_frame), 3)}")
        print(f"{case.name:<18} {damaged:>13.0f} {_fmt(split, 1):>20} "
              f"{_fmt(_median(split_runs.by_serve), 1):>9} {_fmt(waypipe, 1):>14} "
              f"{_fmt(share, 6):>14} {meters:>28}")
    for case in cases:
        if case.damage != "full":
            continue
        share = shares[case.name]
        if share is None:
            print(f"goal ({SPLIT}), {case.name}: bytes per {width}x{height} frame over the "
                  "stream at most 1% of waypipe's: not measured (no waypipe baseline)")
            continue
        verdict = "met" if share <= STREAM_GOAL else "NOT met"
        print(f"goal ({SPLIT}), {case.name}: bytes per {width}x{height} frame over the stream "
              f"{share:.4%} of waypipe's (goal <= {STREAM_GOAL:.0%}): {verdict}")
