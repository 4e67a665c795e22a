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
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from ..headless import HeadlessWeston, compositor_is_running
from ..relay.listener import upstream_path
from ..wire.codec import WireReader, encode_message
from ..wire.protocol import MessageSpec, load_protocols

_FIRST_ID = 2


@dataclass
class PathResult:
    name: str
    round_trips: list[float] = field(default_factory=list)
    bursts: list[float] = field(default_factory=list)

    def rtt(self) -> float:
        return statistics.median(self.round_trips)

    def rtt_p90(self) -> float:
        return statistics.quantiles(self.round_trips, n=10)[-1]

    def burst(self) -> float:
        return statistics.median(self.bursts)


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


def _wait_for_socket(path: Path, process: subprocess.Popen[bytes], what: str) -> None:
    deadline = time.monotonic() + 20
    while not compositor_is_running(str(path)):
        if process.poll() is not None:
            raise RuntimeError(f"{what} exited with status {process.returncode}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} did not open {path}")
        time.sleep(0.05)


@contextlib.contextmanager
def _process(args: list[str], env: dict[str, str]) -> Iterator[subprocess.Popen[bytes]]:
    proc = subprocess.Popen(args, env=env, stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextlib.contextmanager
def _compositor(upstream: str | None) -> Iterator[Path]:
    if upstream is not None or compositor_is_running():
        path = upstream_path(upstream)
        if not compositor_is_running(str(path)):
            raise RuntimeError(f"no compositor answers at {path}")
        print(f"compositor: {path}")
        yield path
        return
    with HeadlessWeston(debug=False) as weston:
        print("compositor: a headless Weston started for this run (pixman renderer)")
        yield weston.socket_path


def run_relay_bench(args: argparse.Namespace) -> int:
    sync = load_protocols()["wl_display"].requests[0]
    with contextlib.ExitStack() as stack, _compositor(args.upstream) as compositor:
        workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="qubesshm-bench-")))
        env = dict(os.environ)
        env["XDG_RUNTIME_DIR"] = str(workdir)
        paths: dict[str, Path] = {"direct": compositor}

        proxy_socket = workdir / "qubesshm-bench"
        proxy = stack.enter_context(_process(
            [sys.executable, "-m", "qubesshm", "serve", "--socket", str(proxy_socket),
             "--upstream", str(compositor)], env))
        _wait_for_socket(proxy_socket, proxy, "qubesshm serve")
        paths["qubesshm"] = proxy_socket

        waypipe = shutil.which("waypipe")
        if args.no_waypipe:
            print("waypipe: skipped (--no-waypipe)")
        elif waypipe is None:
            print("waypipe: not installed (Debian package 'waypipe'); baseline skipped")
        else:
            link = workdir / "waypipe.sock"
            display = workdir / "waypipe-display"
            wp_env = dict(env, WAYLAND_DISPLAY=str(compositor))
            wp_client = stack.enter_context(_process(
                [waypipe, "--compress", "none", "--no-gpu", "--socket", str(link), "client"],
                wp_env))
            deadline = time.monotonic() + 20
            while (not link.exists() and wp_client.poll() is None
                   and time.monotonic() < deadline):
                time.sleep(0.05)
            wp_server = stack.enter_context(_process(
                [waypipe, "--compress", "none", "--no-gpu", "--socket", str(link),
                 "--display", str(display), "server", "--", "sleep", "86400"], env))
            _wait_for_socket(display, wp_server, "waypipe server")
            paths["waypipe"] = display

        results = {name: PathResult(name) for name in paths}
        clients = {name: SyncClient(path, sync) for name, path in paths.items()}
        try:
            for client in clients.values():
                for _ in range(100):  # warm-up: first connections, page faults, caches
                    client.round_trip()
            per_round = max(1, args.round_trips // args.repeats)
            for _ in range(args.repeats):
                for name, client in clients.items():
                    results[name].round_trips.extend(
                        client.round_trip() for _ in range(per_round))
                    results[name].bursts.append(client.burst(args.burst))
        finally:
            for client in clients.values():
                client.close()
    _report(results, args)
    return 0


def _report(results: dict[str, PathResult], args: argparse.Namespace) -> None:
    direct = results["direct"]
    print(f"\nwl_display.sync round trip, {len(direct.round_trips)} per path "
          f"(median, p90), and a burst of {args.burst} syncs answered "
          f"(median of {args.repeats}):")
    print(f"{'path':<10} {'rtt µs':>9} {'p90 µs':>9} {'added µs':>9} "
          f"{'burst ms':>9} {'added ms':>9}")
    for res in results.values():
        added_rtt = (res.rtt() - direct.rtt()) * 1e6
        added_burst = (res.burst() - direct.burst()) * 1e3
        print(f"{res.name:<10} {res.rtt() * 1e6:9.1f} {res.rtt_p90() * 1e6:9.1f} "
              f"{added_rtt:9.1f} {res.burst() * 1e3:9.2f} {added_burst:9.2f}")
    if "waypipe" in results:
        q, w = results["qubesshm"], results["waypipe"]
        q_added, w_added = q.rtt() - direct.rtt(), w.rtt() - direct.rtt()
        qb_added, wb_added = q.burst() - direct.burst(), w.burst() - direct.burst()
        print(f"\nadded round-trip latency, qubesshm / waypipe: {_ratio(q_added, w_added)}")
        print(f"added burst time, qubesshm / waypipe:         {_ratio(qb_added, wb_added)}")
    print(f"round trip through qubesshm / direct:          "
          f"{results['qubesshm'].rtt() / direct.rtt():.2f}x")


def _ratio(ours: float, theirs: float) -> str:
    if theirs <= 0:
        return f"n/a (waypipe added {theirs * 1e6:.1f} µs, not above direct)"
    return f"{ours / theirs:.2f}"
