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
"""

from __future__ import annotations

import argparse
import contextlib
import os
import select
import socket
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..relay.eventloop import loop_factory
from ..wire.codec import WireReader, encode_message
from ..wire.protocol import MessageSpec, load_protocols
from .machine import describe_machine, load_line, versions_line
from .processes import (
    compositor,
    cpu_seconds,
    report_log,
    start_qubesshm,
    start_split,
    start_waypipe,
)

_FIRST_ID = 2
SPLIT = "qubesshm split"
# What the ratios compare: (ours, theirs), when both ran.
_COMPARED = (("qubesshm", "waypipe"), (SPLIT, "waypipe"), (SPLIT, "qubesshm"))
_RATIO_KEYS = ("added round-trip latency", "added burst time", "relay CPU per message")


# Round trips per path before moving to the next, so drift hits all paths alike.
_BLOCK = 25
# Every sync is answered by wl_callback.done and wl_display.delete_id.
_MESSAGES_PER_SYNC = 3
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

    def rtt(self) -> float:
        return statistics.median(self.round_trips)

    def rtt_p90(self) -> float:
        return statistics.quantiles(self.round_trips, n=10)[-1]

    def burst(self) -> float:
        return statistics.median(self.bursts)

    def cpu_seconds(self) -> float:
        return cpu_seconds(self.relay_pids)


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
        data = self.sock.recv(65536)
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
        return self._exchange(*self._request(1))

    def burst(self, count: int) -> float:
        return self._exchange(*self._request(count))

    def close(self) -> None:
        self.sock.close()


def run_relay_bench(args: argparse.Namespace) -> int:
    sync = load_protocols()["wl_display"].requests[0]
    remote = bool(getattr(args, "remote", False))
    if remote:
        print(describe_machine())
    with contextlib.ExitStack() as stack, compositor(
            args.upstream, animations=args.animations != "off") as upstream:
        if remote:
            print(versions_line(args.upstream is None))
        workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="qubesshm-bench-")))
        env = dict(os.environ)
        env["XDG_RUNTIME_DIR"] = str(workdir)
        paths: dict[str, Path] = {"direct": upstream}
        print(f"qubesshm: serve on the {loop_factory(args.event_loop)[1]} event loop")
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

        clients = {name: SyncClient(path, sync) for name, path in paths.items()}
        runs: list[dict[str, PathResult]] = []
        try:
            for client in clients.values():
                for _ in range(100):  # warm-up: first connections, page faults, caches
                    client.round_trip()
            for index in range(args.repeats):
                results = {name: PathResult(name, relay_pids.get(name, [])) for name in paths}
                _measure(results, clients, args)
                _report(results, args, f"run {index + 1} of {args.repeats}")
                runs.append(results)
        finally:
            for client in clients.values():
                client.close()
    if len(runs) > 1:
        _report_medians(runs, args)
    if remote:
        print(f"\n{load_line()} after the run")
    return 0


def _measure(results: dict[str, PathResult], clients: dict[str, SyncClient],
             args: argparse.Namespace) -> None:
    for _ in range(max(1, args.round_trips // _BLOCK)):
        for name, client in clients.items():
            res = results[name]
            before = res.cpu_seconds()
            res.round_trips.extend(client.round_trip() for _ in range(_BLOCK))
            res.rtt_cpu += res.cpu_seconds() - before
    for _ in range(args.bursts):
        for name, client in clients.items():
            res = results[name]
            before = res.cpu_seconds()
            res.bursts.append(client.burst(args.burst))
            res.burst_cpu += res.cpu_seconds() - before


def _ratios(results: dict[str, PathResult], args: argparse.Namespace,
            ours_name: str = "qubesshm", theirs_name: str = "waypipe") -> dict[str, float]:
    """``ours_name`` / ``theirs_name`` (qubesshm / waypipe unless given): added latency,
    added burst time, relay CPU per message."""
    direct, q, w = results["direct"], results[ours_name], results[theirs_name]
    out = {}
    for key, ours, theirs in (
            ("added round-trip latency", q.rtt() - direct.rtt(), w.rtt() - direct.rtt()),
            ("added burst time", q.burst() - direct.burst(), w.burst() - direct.burst()),
            ("relay CPU per message", _cpu(q, args), _cpu(w, args))):
        if theirs > 0:
            out[key] = ours / theirs
    return out


def _report(results: dict[str, PathResult], args: argparse.Namespace, title: str) -> None:
    direct = results["direct"]
    width = max(10, max(len(name) for name in results) + 1)
    print(f"\n{title}: wl_display.sync round trips, {len(direct.round_trips)} per path in "
          f"interleaved blocks of {_BLOCK} (median, p90); bursts of {args.burst} syncs "
          f"(median of {args.bursts}, at most {WINDOW} ahead of their answers); relay CPU = "
          "scheduler run time of the relaying processes per relayed message:")
    print(f"{'path':<{width}} {'rtt µs':>9} {'p90 µs':>9} {'added µs':>9} {'burst ms':>9} "
          f"{'added ms':>9} {'CPU µs/msg':>11}")
    for res in results.values():
        added_rtt = (res.rtt() - direct.rtt()) * 1e6
        added_burst = (res.burst() - direct.burst()) * 1e3
        print(f"{res.name:<{width}} {res.rtt() * 1e6:9.1f} {res.rtt_p90() * 1e6:9.1f} "
              f"{added_rtt:9.1f} {res.burst() * 1e3:9.2f} {added_burst:9.2f} "
              f"{_cpu_per_message(res, args):>11}")
    for ours, theirs in _COMPARED:
        if ours in results and theirs in results:
            ratios = _ratios(results, args, ours, theirs)
            print(f"{ours} / {theirs}: " + ", ".join(
                f"{key} {ratios[key]:.2f}" if key in ratios else f"{key} n/a"
                for key in _RATIO_KEYS))
    print(f"round trip through qubesshm / direct: {results['qubesshm'].rtt() / direct.rtt():.2f}x")
    if SPLIT in results:
        print(f"round trip through {SPLIT} / direct: "
              f"{results[SPLIT].rtt() / direct.rtt():.2f}x")


def _report_medians(runs: list[dict[str, PathResult]], args: argparse.Namespace) -> None:
    print(f"\nmedians over {len(runs)} runs:")
    for ours, theirs in _COMPARED:
        if ours not in runs[0] or theirs not in runs[0]:
            continue
        per_run = [_ratios(results, args, ours, theirs) for results in runs]
        for key in _RATIO_KEYS:
            values = [r[key] for r in per_run if key in r]
            shown = " ".join(f"{v:.2f}" for v in values)
            median = f"{statistics.median(values):.2f}" if values else "n/a"
            print(f"  {ours} / {theirs}, {key}: {median} (runs: {shown or 'n/a'})")
    for name in ("qubesshm", SPLIT):
        if name in runs[0]:
            ratios = [results[name].rtt() / results["direct"].rtt() for results in runs]
            print(f"  round trip through {name} / direct: {statistics.median(ratios):.2f}x")


def _cpu(res: PathResult, args: argparse.Namespace) -> float:
    messages: int = _MESSAGES_PER_SYNC * (len(res.round_trips) + args.burst * len(res.bursts))
    return (res.rtt_cpu + res.burst_cpu) / messages


def _cpu_per_message(res: PathResult, args: argparse.Namespace) -> str:
    return f"{_cpu(res, args) * 1e6:.2f}" if res.relay_pids else "-"
