"""``qubesshm bench relay``: what the proxy adds to a round trip, against baselines.

In one run, over the same compositor, it measures the ``wl_display.sync`` round
trip and the time to get answers to a burst of small requests on three paths:
straight to the compositor, through ``qubesshm serve`` and through waypipe
(``waypipe client`` + ``waypipe server`` on this machine, no compression); with
``--remote`` also through the split proxy (*qubesshm split*: ``serve --remote``
starting ``qubesshm host``, the stream between them over the pipes ``--remote``
makes), with its ratios to waypipe and to the unsplit proxy. The paths are
measured in interleaved rounds so drift in machine load spreads over all of them,
and the figures printed are medians with the ratios between paths.

Relay CPU per message is reported apart for the round trips (each message wakes
the relay: mostly the cost of waking up) and for the bursts (the relay's cost per
message when it is busy). Where the processes run decides a round trip more than
the relaying does on a small VM (a wake-up on another, idle CPU costs tens of µs
there), so by default the client, the relays and the compositor the bench started
all run on one CPU (``--placement one-cpu``, when the command offers it; ``free``
leaves them to the scheduler). The machine is printed with the figures, and
``trust_warnings`` says which ratio not to trust: one measured on a busy machine,
one that moved between runs, one of an added time that was not there.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import select
import socket
import statistics
import struct
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ..grants.mapping import peer_pid
from ..relay.eventloop import loop_factory
from ..relay.fastpath import select_fast_path
from ..wire.codec import WireReader, encode_message
from ..wire.protocol import MessageSpec, load_protocols
from . import processes
from .machine import (
    CpuTimes,
    available_cpus,
    describe_machine,
    load_average,
    load_line,
    machine_details,
    versions_line,
)
from .processes import (
    compositor,
    report_log,
    start_qubesshm,
    start_split,
    start_waypipe,
)

_FIRST_ID = 2
SPLIT = "qubesshm split"
# What the ratios compare: (ours, theirs), when both ran.
_COMPARED = (("qubesshm", "waypipe"), (SPLIT, "waypipe"), (SPLIT, "qubesshm"))
# The ratios on a pair's line; "relay CPU per message" is in the bursts.
_RATIO_KEYS = ("added round-trip latency", "added burst time", "relay CPU per message")
RTT_CPU = "relay CPU per message in round trips"
_ALL_RATIO_KEYS = (*_RATIO_KEYS, RTT_CPU)

# When a ratio is not to be trusted (see trust_warnings).
# The one-minute load average before the run, per CPU this process may use: none of
# the benchmark's processes exist yet, so it is others' work. At half a CPU each,
# a wake-up often finds its CPU taken and waits for a scheduler slice (milliseconds,
# against round trips of tens of µs).
LOAD_PER_CPU = 0.5
# The share of the measuring CPUs' time that other processes took during a run (from
# /proc/stat, less the benchmark's own processes and the compositor's), with what the
# hypervisor stole. The paths' processes keep those CPUs busy between them, so what
# others take comes out of the measured chain: a tenth moves the figures by as much
# as the spread flagged below.
OTHERS_SHARE = 0.1
# Spread of a ratio between runs (largest / smallest) beyond which it says more
# about the runs than about the paths.
RATIO_SPREAD = 1.3
# Spread of the direct path's median round trip or burst between runs: the machine
# changed under the run.
DIRECT_SPREAD = 1.2


# Round trips per path before moving to the next, so drift hits all paths alike. Not
# fewer: after each switch of path serve starts cold (on one CPU its CPU per round
# trip was about 45 µs in blocks of 25, 33 µs in blocks of 1000), and in blocks of
# 25, 100, 250 and 1000 qubesshm / waypipe's added latency came out 1.11-1.21, 1.03,
# 0.96-0.99 and 0.93-0.94: the block size, not the relays, moved the ratio.
_BLOCK = 250
# Every sync is answered by wl_callback.done and wl_display.delete_id.
_MESSAGES_PER_SYNC = 3
# A sync's usual answer in one read: wl_callback.done (callback id, size 12 and opcode
# 0, serial) and wl_display.delete_id (object 1, size 12 and opcode 1, callback id).
_ANSWER = struct.Struct("=6I")
_DONE_WORD = 12 << 16
_DELETE_WORD = 12 << 16 | 1
# Syncs a client sends ahead of their answers: Weston drops a client whose events
# back up (its buffer holds 4 KiB), so a client that only writes gets dropped.
WINDOW = 256


@dataclass
class PathResult:
    name: str
    # Processes relaying on this path, whose CPU time is the relay's cost.
    relay_pids: list[int] = field(default_factory=list)
    round_trips: list[float] = field(default_factory=list)
    bursts: list[float] = field(default_factory=list)
    rtt_cpu: float = 0.0
    burst_cpu: float = 0.0
    burst_size: int = 0

    def rtt(self) -> float:
        return statistics.median(self.round_trips)

    def rtt_p90(self) -> float:
        return statistics.quantiles(self.round_trips, n=10)[-1]

    def burst(self) -> float:
        return statistics.median(self.bursts)

    def cpu_seconds(self) -> float:
        return processes.cpu_seconds(self.relay_pids)

    def rtt_cpu_per_message(self) -> float:
        """Relay CPU per relayed message in the round trips, seconds."""
        return self.rtt_cpu / (_MESSAGES_PER_SYNC * len(self.round_trips))

    def burst_cpu_per_message(self) -> float:
        """Relay CPU per relayed message in the bursts, seconds."""
        return self.burst_cpu / (_MESSAGES_PER_SYNC * self.burst_size * len(self.bursts))


class SyncClient:
    """A minimal raw Wayland client that only sends ``wl_display.sync``."""

    def __init__(self, path: Path, sync: MessageSpec) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(str(path))
        self.sock.setblocking(False)
        self.sync = sync
        self.reader = WireReader()
        # Every sync answers with callback.done and delete_id, so ids recycle.
        self.free_ids: list[int] = []
        self.next_id = _FIRST_ID

    def _request(self, count: int) -> tuple[bytes, set[int]]:
        ids = set()
        chunks = []
        for _ in range(count):
            if self.free_ids:
                new_id = self.free_ids.pop()
            else:
                new_id = self.next_id
                self.next_id += 1
            ids.add(new_id)
            chunks.append(encode_message(1, self.sync, [new_id])[0])
        return b"".join(chunks), ids

    def _exchange(self, data: bytes, ids: set[int]) -> float:
        """Send ``data`` while reading answers, as a real client must: a compositor
        disconnects a client that lets its events pile up unread. At most
        ``WINDOW`` syncs are sent ahead of their answers."""
        pending = set(ids)
        view = memoryview(data)
        answered = 0
        sent_bytes = 0
        message = len(data) // max(1, len(ids))
        start = time.perf_counter()
        while pending:
            room = (WINDOW - (sent_bytes // message - answered)) * message
            want_write = [self.sock] if view and room > 0 else []
            readable, writable, _ = select.select([self.sock], want_write, [], 30)
            if not readable and not writable:
                raise TimeoutError("no answer within 30 s")
            if writable:
                written = self.sock.send(view[:min(65536, room)])
                view = view[written:]
                sent_bytes += written
            if readable:
                before = len(pending)
                self._receive(pending)
                answered += before - len(pending)
        return time.perf_counter() - start

    def _receive(self, pending: set[int]) -> None:
        self._parse(self.sock.recv(65536), pending)

    def _parse(self, data: bytes, pending: set[int]) -> None:
        if not data:
            raise ConnectionError("the compositor closed the connection")
        self.reader.feed(data)
        while (head := self.reader.peek()) is not None:
            object_id, opcode, size = head
            taken = self.reader.take(size, 0)
            assert taken is not None
            frame = taken[0]
            if object_id == 1 and opcode == 1:  # wl_display.delete_id
                deleted = int.from_bytes(frame.data[8:12], sys.byteorder)
                pending.discard(deleted)
                self.free_ids.append(deleted)
            elif object_id == 1 and opcode == 0:
                raise ConnectionError(f"protocol error: {frame.data[16:]!r}")

    def round_trip(self) -> float:
        """One sync until its wl_display.delete_id, timed, with as little of this
        client's own work inside as it takes: a client's work per round trip shows in
        what a relay seems to add, and unevenly (on one CPU, trimming this client's
        work per round trip took several µs off qubesshm's added latency and none off
        waypipe's). The usual answer, callback.done then delete_id in one read, is
        checked where it lies; anything else goes through the reader."""
        data, ids = self._request(1)
        (callback,) = ids
        start = time.perf_counter()
        if self.sock.send(data) != len(data):  # 12 bytes into an idle connection
            raise ConnectionError("the sync did not fit into the socket")
        pending = {callback}
        while pending:
            readable, _, _ = select.select([self.sock], [], [], 30)
            if not readable:
                raise TimeoutError("no answer within 30 s")
            chunk = self.sock.recv(65536)
            if len(chunk) == _ANSWER.size and not self.reader.buffered_bytes:
                done_id, done_word, _, display, delete_word, deleted = _ANSWER.unpack(chunk)
                if ((done_id, done_word, display, delete_word, deleted)
                        == (callback, _DONE_WORD, 1, _DELETE_WORD, callback)):
                    self.free_ids.append(callback)
                    break
            self._parse(chunk, pending)
        return time.perf_counter() - start

    def burst(self, count: int) -> float:
        return self._exchange(*self._request(count))

    def close(self) -> None:
        self.sock.close()


def run_relay_bench(args: argparse.Namespace) -> int:
    sync = load_protocols()["wl_display"].requests[0]
    remote = bool(getattr(args, "remote", False))
    placement = getattr(args, "placement", "one-cpu")
    print(describe_machine())
    print(f"machine: {machine_details()}")
    load_before, cpus = load_average(), available_cpus()
    with contextlib.ExitStack() as stack, compositor(
            args.upstream, animations=args.animations != "off") as upstream:
        print(versions_line(args.upstream is None))
        workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="qubesshm-bench-")))
        env = dict(os.environ)
        env["XDG_RUNTIME_DIR"] = str(workdir)
        paths: dict[str, Path] = {"direct": upstream}
        # serve runs with this environment: it picks the same fast path.
        print(f"qubesshm: serve on the {loop_factory(args.event_loop)[1]} event loop, fast "
              f"path: {select_fast_path()[1]}")
        proxy_socket, proxy_pid = start_qubesshm(stack, env, workdir, upstream,
                                                 "--event-loop", args.event_loop)
        paths["qubesshm"] = proxy_socket
        relay_pids = {"qubesshm": [proxy_pid]}
        if remote:
            log = workdir / "split.log"
            # Said once the processes have stopped (the log then has their last words).
            stack.callback(report_log, SPLIT, log)
            print(f"{SPLIT}: serve --remote 'qubesshm host' (the stream over the pipes to "
                  "the host half's stdin and stdout, simulated grants), both on the "
                  f"{loop_factory(args.event_loop)[1]} event loop")
            loop_option = ("--event-loop", args.event_loop)
            paths[SPLIT], split_pid = start_split(stack, env, workdir, upstream, *loop_option,
                                                  host_extra=loop_option, log=log)
            relay_pids[SPLIT] = [split_pid]
        waypipe = start_waypipe(stack, env, workdir, upstream, args.no_waypipe)
        if waypipe is not None:
            paths["waypipe"], relay_pids["waypipe"] = waypipe
        # Before the clients connect: waypipe forks a process for each connection.
        measured_on, said = place(placement)
        print(f"placement: {said}")

        clients = {name: SyncClient(path, sync) for name, path in paths.items()}
        # The compositor's CPU is the benchmark's too, whoever started it.
        compositor_pid = peer_pid(clients["direct"].sock)
        ours = [os.getpid(), *([compositor_pid] if compositor_pid is not None else [])]
        runs: list[dict[str, PathResult]] = []
        others: list[float] = []
        try:
            for client in clients.values():
                for _ in range(100):  # warm-up: first connections, page faults, caches
                    client.round_trip()
                # A first burst is slower (waypipe's by tens of ms): buffers grow.
                client.burst(args.burst)
            for index in range(args.repeats):
                results = {name: PathResult(name, relay_pids.get(name, []),
                                            burst_size=args.burst) for name in paths}
                meter = OthersMeter(ours, measured_on)
                _measure(results, clients, args)
                other, stolen = meter.shares()
                others.append(other + stolen)
                _report(results, args, f"run {index + 1} of {args.repeats}")
                print(f"other processes used {other:.0%} of the CPU time of "
                      f"{_cpu_names(measured_on)} during the run, the hypervisor stole "
                      f"{stolen:.0%}")
                runs.append(results)
        finally:
            for client in clients.values():
                client.close()
    if len(runs) > 1:
        _report_medians(runs)
    print(f"\n{load_line()} after the run")
    for warning in trust_warnings(load_before, cpus, others, *_trust_inputs(runs)):
        print(f"warning: {warning}")
    return 0


def pin(pids: list[int], cpu: int) -> None:
    """Every thread of ``pids`` to ``cpu`` (what they start later inherits it)."""
    for pid in pids:
        for task in Path(f"/proc/{pid}/task").glob("*"):
            with contextlib.suppress(OSError, ValueError):
                os.sched_setaffinity(int(task.name), {cpu})


def place(placement: str) -> tuple[set[int], str]:
    """Put this process and what it started (the compositor when it started it, the
    relays) where ``placement`` says: the CPUs they then run on, and what it did."""
    available = os.sched_getaffinity(0)
    if placement == "free":
        return available, (f"left to the scheduler ({_cpu_names(available)}): a round trip "
                           "then depends on whether its wake-ups crossed CPUs")
    cpu = max(available)
    pin([os.getpid(), *processes.descendants(os.getpid())], cpu)
    return {cpu}, (f"this client, the relays and the compositor it started all on CPU {cpu}, "
                   "so that no path's wake-ups cross CPUs (on a VM a wake-up on another, "
                   "idle CPU costs more than the relaying); a compositor given with "
                   "--upstream is not moved")


def _cpu_names(cpus: set[int]) -> str:
    return ("CPU " if len(cpus) == 1 else "CPUs ") + ", ".join(str(cpu) for cpu in sorted(cpus))


class OthersMeter:
    """From its making on: the CPU time of ``cpus`` that went to other processes than
    ``ours`` (pids, with their descendants)."""

    def __init__(self, ours: list[int], cpus: set[int]) -> None:
        self.ours, self.cpus = ours, cpus
        times = CpuTimes.now(cpus)
        self.start, self.busy, self.steal, self.own = (time.monotonic(), times.busy,
                                                       times.steal, processes.cpu_seconds(ours))

    def shares(self) -> tuple[float, float]:
        """So far, as shares of the time of ``cpus`` (0.1: a tenth): what other
        processes used, and what the hypervisor stole (gave the vCPUs' host CPUs to
        others while they had work). A compositor given with --upstream counts as ours
        even when it ran on other CPUs, which can only make the first share smaller."""
        elapsed = (time.monotonic() - self.start) * len(self.cpus)
        if elapsed <= 0:
            return 0.0, 0.0
        now = CpuTimes.now(self.cpus)
        others = (now.busy - self.busy) - (processes.cpu_seconds(self.ours) - self.own)
        return max(0.0, others) / elapsed, max(0.0, now.steal - self.steal) / elapsed


def _measure(results: dict[str, PathResult], clients: dict[str, SyncClient],
             args: argparse.Namespace) -> None:
    block = _block(args)
    for _ in range(max(1, args.round_trips // block)):
        for name, client in clients.items():
            res = results[name]
            before = res.cpu_seconds()
            res.round_trips.extend(client.round_trip() for _ in range(block))
            res.rtt_cpu += res.cpu_seconds() - before
    for _ in range(args.bursts):
        for name, client in clients.items():
            res = results[name]
            before = res.cpu_seconds()
            res.bursts.append(client.burst(args.burst))
            res.burst_cpu += res.cpu_seconds() - before


def _block(args: argparse.Namespace) -> int:
    """Round trips per path in a row: _BLOCK, or all of them when fewer."""
    rounds: int = args.round_trips
    return min(_BLOCK, rounds)


def _ratios(results: dict[str, PathResult], ours_name: str = "qubesshm",
            theirs_name: str = "waypipe") -> dict[str, float]:
    """``ours_name`` / ``theirs_name`` (qubesshm / waypipe unless given): added latency,
    added burst time, relay CPU per message in the bursts and in the round trips; a
    ratio is left out when the second path's figure is not above zero."""
    direct, q, w = results["direct"], results[ours_name], results[theirs_name]
    out = {}
    for key, ours, theirs in (
            ("added round-trip latency", q.rtt() - direct.rtt(), w.rtt() - direct.rtt()),
            ("added burst time", q.burst() - direct.burst(), w.burst() - direct.burst()),
            ("relay CPU per message", q.burst_cpu_per_message(), w.burst_cpu_per_message()),
            (RTT_CPU, q.rtt_cpu_per_message(), w.rtt_cpu_per_message())):
        if theirs > 0:
            out[key] = ours / theirs
    return out


def _report(results: dict[str, PathResult], args: argparse.Namespace, title: str) -> None:
    direct = results["direct"]
    width = max(10, max(len(name) for name in results) + 1)
    print(f"\n{title}: wl_display.sync round trips, {len(direct.round_trips)} per path in "
          f"interleaved blocks of {_block(args)} (median, p90); bursts of {args.burst} syncs "
          f"(median of {args.bursts}, at most {WINDOW} ahead of their answers); relay CPU = "
          "scheduler run time of the relaying processes per relayed message, in the bursts "
          "(the table and 'relay CPU per message') and in the round trips (the line after):")
    print(f"{'path':<{width}} {'rtt µs':>9} {'p90 µs':>9} {'added µs':>9} {'burst ms':>9} "
          f"{'added ms':>9} {'CPU µs/msg':>11}")
    for res in results.values():
        added_rtt = (res.rtt() - direct.rtt()) * 1e6
        added_burst = (res.burst() - direct.burst()) * 1e3
        cpu = f"{res.burst_cpu_per_message() * 1e6:.2f}" if res.relay_pids else "-"
        print(f"{res.name:<{width}} {res.rtt() * 1e6:9.1f} {res.rtt_p90() * 1e6:9.1f} "
              f"{added_rtt:9.1f} {res.burst() * 1e3:9.2f} {added_burst:9.2f} {cpu:>11}")
    print(f"{RTT_CPU}, µs: " + ", ".join(
        f"{res.name} {res.rtt_cpu_per_message() * 1e6:.2f}"
        for res in results.values() if res.relay_pids))
    for ours, theirs in _COMPARED:
        if ours in results and theirs in results:
            ratios = _ratios(results, ours, theirs)
            print(f"{ours} / {theirs}: " + ", ".join(
                f"{key} {ratios[key]:.2f}" if key in ratios else f"{key} n/a"
                for key in _RATIO_KEYS))
            shown = f"{ratios[RTT_CPU]:.2f}" if RTT_CPU in ratios else "n/a"
            print(f"{ours} / {theirs} in round trips: relay CPU per message {shown}")
    print(f"round trip through qubesshm / direct: {results['qubesshm'].rtt() / direct.rtt():.2f}x")
    if SPLIT in results:
        print(f"round trip through {SPLIT} / direct: "
              f"{results[SPLIT].rtt() / direct.rtt():.2f}x")


def _report_medians(runs: list[dict[str, PathResult]]) -> None:
    print(f"\nmedians over {len(runs)} runs:")
    for ours, theirs in _COMPARED:
        if ours not in runs[0] or theirs not in runs[0]:
            continue
        per_run = [_ratios(results, ours, theirs) for results in runs]
        for key in _ALL_RATIO_KEYS:
            values = [r[key] for r in per_run if key in r]
            shown = " ".join(f"{v:.2f}" for v in values)
            median = f"{statistics.median(values):.2f}" if values else "n/a"
            print(f"  {ours} / {theirs}, {key}: {median} (runs: {shown or 'n/a'})")
    for name in ("qubesshm", SPLIT):
        if name in runs[0]:
            ratios = [results[name].rtt() / results["direct"].rtt() for results in runs]
            print(f"  round trip through {name} / direct: {statistics.median(ratios):.2f}x")


def _trust_inputs(runs: list[dict[str, PathResult]]) -> tuple[
        dict[str, list[float | None]], dict[str, list[float]], dict[str, list[float]]]:
    """What ``trust_warnings`` judges, from the runs: each ratio's value per run (None
    where it had none), each path's added times per run, the direct path's figures."""
    ratios: dict[str, list[float | None]] = {}
    for ours, theirs in _COMPARED:
        if runs and ours in runs[0] and theirs in runs[0]:
            per_run = [_ratios(results, ours, theirs) for results in runs]
            for key in _ALL_RATIO_KEYS:
                ratios[f"{ours} / {theirs}, {key}"] = [r.get(key) for r in per_run]
    added: dict[str, list[float]] = {}
    direct: dict[str, list[float]] = {"round trip": [], "burst": []}
    for results in runs:
        base = results["direct"]
        direct["round trip"].append(base.rtt())
        direct["burst"].append(base.burst())
        for name, res in results.items():
            if name != "direct":
                added.setdefault(f"{name} added round-trip latency", []).append(
                    res.rtt() - base.rtt())
                added.setdefault(f"{name} added burst time", []).append(
                    res.burst() - base.burst())
    return ratios, added, direct


def trust_warnings(load_before: float, cpus: int, others: Sequence[float],
                   ratios: Mapping[str, Sequence[float | None]],
                   added: Mapping[str, Sequence[float]],
                   direct: Mapping[str, Sequence[float]]) -> list[str]:
    """Why a figure of the run is not to be trusted, one sentence each (none: no reason
    found). ``load_before``: the one-minute load average before the run, on a machine
    where this process may use ``cpus`` CPUs; ``others``: the share of the measuring
    CPUs' time other processes took during each run, or the hypervisor stole;
    ``ratios``: each ratio's value in each run (None: it had none, the second path's
    figure was not above zero);
    ``added``: each path's added time per run, seconds; ``direct``: the direct path's
    median round trip and burst per run."""
    out = []
    if load_before >= LOAD_PER_CPU * cpus:
        out.append(f"load average {load_before:.2f} before the run, at least {LOAD_PER_CPU} "
                   f"per CPU ({cpus} CPUs): other work was running (or a run ended in the "
                   "last minutes: the one-minute average takes a few to decay); every figure "
                   "may be off")
    busy = [(index, value) for index, value in enumerate(others, 1) if value >= OTHERS_SHARE]
    if busy:
        shown = ", ".join(f"run {index} {value:.0%}" for index, value in busy)
        out.append(f"other processes (or the hypervisor) took at least {OTHERS_SHARE:.0%} of "
                   f"the measuring CPUs' time during a run ({shown}): its figures are partly "
                   "their waiting")
    for key, values in added.items():
        short = [(index, value) for index, value in enumerate(values, 1) if value <= 0]
        if short:
            shown = ", ".join(f"run {index} {value * 1e6:.1f} µs" for index, value in short)
            out.append(f"{key} not above zero ({shown}): the path looked no slower than "
                       "direct, so the difference is noise; ratios with it mean nothing")
    for key, maybe in ratios.items():
        values = [value for value in maybe if value is not None]
        if len(values) < len(maybe):
            out.append(f"{key}: no ratio in {len(maybe) - len(values)} of {len(maybe)} runs "
                       "(the second path added nothing measurable)")
        if any(value <= 0 for value in values):
            out.append(f"{key}: a ratio not above zero "
                       f"({' '.join(f'{v:.2f}' for v in values)}): the first path's added "
                       "figure was noise")
        elif len(values) > 1 and max(values) > RATIO_SPREAD * min(values):
            out.append(f"{key}: the runs' ratios spread from {min(values):.2f} to "
                       f"{max(values):.2f}, more than {RATIO_SPREAD}x: the median is not a "
                       "reproducible figure")
    for key, values in direct.items():
        if len(values) > 1 and min(values) > 0 and max(values) > DIRECT_SPREAD * min(values):
            unit, scale = ("µs", 1e6) if key == "round trip" else ("ms", 1e3)
            out.append(f"the direct path's median {key} moved from {min(values) * scale:.1f} "
                       f"to {max(values) * scale:.1f} {unit} between runs, more than "
                       f"{DIRECT_SPREAD}x: the machine changed under the run")
    return out
