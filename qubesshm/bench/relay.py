"""``qubesshm bench relay``: what the proxy adds to a round trip, against baselines.

In one run, over the same compositor, it measures the ``wl_display.sync`` round
trip and the time to get answers to a burst of small requests on three paths:
straight to the compositor, through ``qubesshm serve`` and through waypipe
(``waypipe client`` + ``waypipe server`` on this machine, no compression). The
paths are measured in interleaved rounds so drift in machine load spreads over
all of them, and the figures printed are medians with the ratios between paths.
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

from ..wire.codec import WireReader, encode_message
from ..wire.protocol import MessageSpec, load_protocols
from .processes import compositor, cpu_seconds, start_qubesshm, start_waypipe

_FIRST_ID = 2


# Round trips per path before moving to the next, so drift hits all paths alike.
_BLOCK = 25
# Every sync is answered by wl_callback.done and wl_display.delete_id.
_MESSAGES_PER_SYNC = 3


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
        disconnects a client that lets its events pile up unread."""
        pending = set(ids)
        view = memoryview(data)
        start = time.perf_counter()
        while pending:
            want_write = [self.sock] if view else []
            readable, writable, _ = select.select([self.sock], want_write, [], 30)
            if not readable and not writable:
                raise TimeoutError("no answer within 30 s")
            if writable:
                view = view[self.sock.send(view[:65536]):]
            if readable:
                self._receive(pending)
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
    with contextlib.ExitStack() as stack, compositor(args.upstream) as upstream:
        workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="qubesshm-bench-")))
        env = dict(os.environ)
        env["XDG_RUNTIME_DIR"] = str(workdir)
        paths: dict[str, Path] = {"direct": upstream}
        proxy_socket, proxy_pid = start_qubesshm(stack, env, workdir, upstream)
        paths["qubesshm"] = proxy_socket
        relay_pids = {"qubesshm": [proxy_pid]}
        waypipe = start_waypipe(stack, env, workdir, upstream, args.no_waypipe)
        if waypipe is not None:
            paths["waypipe"], relay_pids["waypipe"] = waypipe

        results = {name: PathResult(name, relay_pids.get(name, [])) for name in paths}
        clients = {name: SyncClient(path, sync) for name, path in paths.items()}
        try:
            for client in clients.values():
                for _ in range(100):  # warm-up: first connections, page faults, caches
                    client.round_trip()
            for _ in range(max(1, args.round_trips // _BLOCK)):
                for name, client in clients.items():
                    res = results[name]
                    before = res.cpu_seconds()
                    res.round_trips.extend(client.round_trip() for _ in range(_BLOCK))
                    res.rtt_cpu += res.cpu_seconds() - before
            for _ in range(args.repeats):
                for name, client in clients.items():
                    res = results[name]
                    before = res.cpu_seconds()
                    res.bursts.append(client.burst(args.burst))
                    res.burst_cpu += res.cpu_seconds() - before
        finally:
            for client in clients.values():
                client.close()
    _report(results, args)
    return 0


def _report(results: dict[str, PathResult], args: argparse.Namespace) -> None:
    direct = results["direct"]
    print(f"\nwl_display.sync round trips, {len(direct.round_trips)} per path in interleaved "
          f"blocks of {_BLOCK} (median, p90); bursts of {args.burst} syncs (median of "
          f"{args.repeats}); relay CPU = user+system time of the relaying processes per "
          "relayed message:")
    print(f"{'path':<10} {'rtt µs':>9} {'p90 µs':>9} {'added µs':>9} {'burst ms':>9} "
          f"{'added ms':>9} {'CPU µs/msg':>11}")
    for res in results.values():
        added_rtt = (res.rtt() - direct.rtt()) * 1e6
        added_burst = (res.burst() - direct.burst()) * 1e3
        print(f"{res.name:<10} {res.rtt() * 1e6:9.1f} {res.rtt_p90() * 1e6:9.1f} "
              f"{added_rtt:9.1f} {res.burst() * 1e3:9.2f} {added_burst:9.2f} "
              f"{_cpu_per_message(res, args):>11}")
    if "waypipe" in results:
        q, w = results["qubesshm"], results["waypipe"]
        print("\nqubesshm / waypipe:")
        print(f"  added round-trip latency: "
              f"{_ratio(q.rtt() - direct.rtt(), w.rtt() - direct.rtt())}")
        print(f"  added burst time:         "
              f"{_ratio(q.burst() - direct.burst(), w.burst() - direct.burst())}")
        print(f"  relay CPU per message:    {_ratio(_cpu(q, args), _cpu(w, args))}")
    print(f"round trip through qubesshm / direct: {results['qubesshm'].rtt() / direct.rtt():.2f}x")


def _cpu(res: PathResult, args: argparse.Namespace) -> float:
    messages: int = _MESSAGES_PER_SYNC * (len(res.round_trips) + args.burst * len(res.bursts))
    return (res.rtt_cpu + res.burst_cpu) / messages


def _cpu_per_message(res: PathResult, args: argparse.Namespace) -> str:
    return f"{_cpu(res, args) * 1e6:.2f}" if res.relay_pids else "-"


def _ratio(ours: float, theirs: float) -> str:
    if theirs <= 0:
        return f"n/a (waypipe's figure {theirs * 1e6:.1f} µs is not above zero)"
    return f"{ours / theirs:.2f}"
