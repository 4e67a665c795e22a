"""Grant-backed buffers against a real headless Weston: what the compositor holds.

Real clients (Weston's demo clients, a raw-socket hostile client) run through
``qubesshm serve`` on the simulated grant layer. The checks look at Weston
itself: its ``/proc/<pid>/fd`` and ``/proc/<pid>/maps`` never hold a client's
pool (compared by inode with the client's own fds), and the pools it maps are
grant pages; ``qubesshm stats --json`` reports what happened, with its schema.
Progress is waited on through those counters, never through sleeps.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from messages import PROTO, RawClient, request
from procs import RunningProxy, start_proxy

from qubesshm.headless import HeadlessWeston
from qubesshm.relay.control import read_stats
from qubesshm.wire.codec import decode_args

DEADLINE = 30.0
INVALID_FD = 2


def wait_until(condition: Callable[[], bool], what: str, timeout: float = DEADLINE) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.02)


def socket_path(proxy: RunningProxy) -> str:
    return str(Path(proxy.env["XDG_RUNTIME_DIR"]) / proxy.socket_name)


def stats(proxy: RunningProxy) -> dict[str, Any]:
    return read_stats(socket_path(proxy))


def commits(proxy: RunningProxy) -> int:
    value = stats(proxy)["commits"]
    assert isinstance(value, int)
    return value


def weston_pid(weston: HeadlessWeston) -> int:
    assert weston.process is not None
    return weston.process.pid


def inodes_of_fds(pid: int) -> set[tuple[int, int]]:
    found = set()
    for name in os.listdir(f"/proc/{pid}/fd"):
        try:
            st = os.stat(f"/proc/{pid}/fd/{name}")
        except OSError:
            continue
        found.add((st.st_dev, st.st_ino))
    return found


def mapped_files(pid: int) -> dict[tuple[int, int], str]:
    found = {}
    with open(f"/proc/{pid}/maps") as maps:
        for line in maps:
            fields = line.split(maxsplit=5)
            if len(fields) < 6 or fields[4] == "0":
                continue
            major, minor = fields[3].split(":")
            found[(os.makedev(int(major, 16), int(minor, 16)), int(fields[4]))] = fields[5]
    return found


@pytest.fixture
def big_proxy(weston: HeadlessWeston, tmp_path: Path) -> Iterator[RunningProxy]:
    """A proxy with the gntalloc limit Qubes sets, for windows larger than 4 MiB."""
    running = start_proxy(weston, tmp_path / "qubesshm.log", "--gntalloc-limit", "1073741824",
                          socket_name=f"qsb-{os.getpid()}")
    yield running
    assert running.stop() == 0, running.log()
    assert "Traceback" not in running.log(), running.log()


def run_client(proxy: RunningProxy, command: list[str], frames: int) -> str:
    """Run a drawing client until the proxy has seen ``frames`` more commits from it."""
    start = commits(proxy)
    process = subprocess.Popen(command, env=proxy.env, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    try:
        wait_until(lambda: commits(proxy) >= start + frames or process.poll() is not None,
                   f"{frames} commits from {command[0]}")
        assert process.poll() is None, process.communicate()
    finally:
        process.terminate()
        _, err = process.communicate(timeout=20)
    return err


# -- real clients ----------------------------------------------------------------------


@pytest.mark.parametrize("command", [
    ["weston-simple-damage", "--use-viewport"],
    ["weston-simple-damage", "--transform=flipped-90"],
    ["weston-simple-damage", "--scale=2"],
    ["weston-simple-damage", "--use-damage-buffer"],
    ["weston-simple-shm"],
], ids=["damage-viewport", "damage-flipped-90", "damage-scale-2", "damage-buffer", "shm"])
def test_demo_clients_draw_through_grant_buffers(big_proxy: RunningProxy,
                                                 command: list[str]) -> None:
    err = run_client(big_proxy, command, frames=30)
    assert "error" not in err.lower(), err
    assert "protocol error" not in big_proxy.log()
    counters = stats(big_proxy)
    assert isinstance(counters["early_releases"], int) and counters["early_releases"] >= 29


def test_weston_terminal_through_the_proxy(big_proxy: RunningProxy) -> None:
    err = run_client(big_proxy, ["weston-terminal", "--shell=/bin/sh"], frames=2)
    assert "protocol error" not in big_proxy.log()
    assert "error" not in err.lower(), err


SHARED_MEMORY = ("/memfd:", "/dev/shm/", "/tmp/", "/run/")


def pool_files(pid: int) -> set[tuple[int, int]]:
    """Inodes of the shared-memory files process ``pid`` has open or mapped (its pools;
    weston-simple-shm keeps only the mapping)."""
    found = {f for f, name in mapped_files(pid).items() if name.startswith(SHARED_MEMORY)}
    for name in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{name}")
            st = os.stat(f"/proc/{pid}/fd/{name}")
        except OSError:
            continue
        if target.startswith(SHARED_MEMORY):
            found.add((st.st_dev, st.st_ino))
    return found


def test_weston_never_holds_a_client_pool(weston: HeadlessWeston,
                                          big_proxy: RunningProxy) -> None:
    start = commits(big_proxy)
    client = subprocess.Popen(["weston-simple-shm"], env=big_proxy.env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        wait_until(lambda: commits(big_proxy) >= start + 10, "10 commits")
        client_pools = pool_files(client.pid)
        assert client_pools, "weston-simple-shm has its pool open"
        pid = weston_pid(weston)
        weston_maps = mapped_files(pid)
        assert not client_pools & inodes_of_fds(pid), "Weston holds a client's pool fd"
        assert not client_pools & set(weston_maps), "Weston maps a client's pool"
        grant_maps = [name for name in weston_maps.values() if "qubesshm-grant" in name]
        assert grant_maps, "Weston maps no grant pages"
    finally:
        client.terminate()
        client.communicate(timeout=20)


def test_direct_clients_pools_are_seen_by_the_check(weston: HeadlessWeston) -> None:
    """The check above can fail: without the proxy, Weston maps the client's pool."""
    client = subprocess.Popen(["weston-simple-shm"], env=weston.env(),
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        pid = weston_pid(weston)
        wait_until(lambda: bool(pool_files(client.pid) & set(mapped_files(pid))),
                   "Weston mapping the direct client's pool")
    finally:
        client.terminate()
        client.communicate(timeout=20)


# -- stats ----------------------------------------------------------------------------------

GRANT_KEYS = {"live", "in_use", "cached", "awaiting_unmap", "deferred", "leaked", "peak_live",
              "shared_total", "ended_total"}
COUNTER_KEYS = {"commits", "bytes_damaged", "bytes_copied", "early_releases"}


def test_stats_json_schema_against_a_running_proxy(big_proxy: RunningProxy) -> None:
    start = commits(big_proxy)
    client = subprocess.Popen(["weston-simple-shm"], env=big_proxy.env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_until(lambda: commits(big_proxy) >= start + 5, "5 commits")
        result = subprocess.run(
            [sys.executable, "-m", "qubesshm", "stats", "--socket", socket_path(big_proxy),
             "--json"], capture_output=True, text=True, timeout=30, check=False)
        table = subprocess.run(
            [sys.executable, "-m", "qubesshm", "stats", "--socket", socket_path(big_proxy)],
            capture_output=True, text=True, timeout=30, check=False)
    finally:
        client.terminate()
        client.communicate(timeout=20)
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert {"clients", "grants", "release_latency_ms", "per_client"} | COUNTER_KEYS <= set(data)
    assert data["clients"] == 1
    assert set(data["grants"]) == GRANT_KEYS
    assert set(data["release_latency_ms"]) == {"count", "p50", "p99", "max"}
    assert data["commits"] >= 5 and data["early_releases"] >= 4
    assert data["bytes_copied"] > 0 and data["bytes_damaged"] > 0
    grants = data["grants"]
    assert grants["live"] > 0 and grants["peak_live"] >= grants["live"]
    assert grants["shared_total"] >= grants["live"]
    assert grants["cached"] == 0
    [client_stats] = data["per_client"]
    assert COUNTER_KEYS | {"client", "grants", "release_latency_ms"} <= set(client_stats)
    assert set(client_stats["grants"]) == GRANT_KEYS
    assert client_stats["commits"] == data["commits"] - start
    assert table.returncode == 0 and "early releases" in table.stdout, table.stderr


def test_stats_without_a_proxy_is_one_clear_line(tmp_path: Path) -> None:
    env = dict(os.environ, XDG_RUNTIME_DIR=str(tmp_path))
    result = subprocess.run([sys.executable, "-m", "qubesshm", "stats", "--socket", "nothing"],
                            capture_output=True, text=True, env=env, timeout=30, check=False)
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert "no qubesshm proxy is serving nothing" in result.stderr


# -- a hostile client, and the others carry on -----------------------------------------------


@pytest.mark.parametrize("attack", ["truncated", "bad-stride", "past-pool", "shrink"])
def test_hostile_pool_gets_an_error_and_others_carry_on(weston: HeadlessWeston,
                                                        big_proxy: RunningProxy,
                                                        attack: str) -> None:
    bystander = subprocess.Popen(["weston-simple-shm"], env=big_proxy.env,
                                 stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        start = commits(big_proxy)
        wait_until(lambda: commits(big_proxy) >= start + 3, "the bystander drawing")
        hostile = RawClient(socket_path(big_proxy))
        compositor = hostile.bind("wl_compositor", 4)
        shm = hostile.bind("wl_shm", 1)
        fd = os.memfd_create("hostile", os.MFD_CLOEXEC)
        os.ftruncate(fd, 64 * 64 * 4)
        pool, surface, buffer = hostile.new_id(), hostile.new_id(), hostile.new_id()
        hostile.send(request(shm, "wl_shm", "create_pool", pool, fd, 64 * 64 * 4))
        stride, offset = {"bad-stride": (16, 0), "past-pool": (256, 4096)}.get(attack, (256, 0))
        hostile.send(request(compositor, "wl_compositor", "create_surface", surface))
        hostile.send(request(pool, "wl_shm_pool", "create_buffer", buffer, offset, 64, 64,
                             stride, 1))
        if attack == "shrink":
            hostile.send(request(pool, "wl_shm_pool", "resize", 4096))
        if attack == "truncated":
            os.ftruncate(fd, 100)
        hostile.send(request(surface, "wl_surface", "attach", buffer, 0, 0))
        hostile.send(request(surface, "wl_surface", "damage_buffer", 0, 0, 64, 64))
        hostile.send(request(surface, "wl_surface", "commit"))
        os.close(fd)
        errors = [m for m in hostile.roundtrip() if m[:2] == (1, 0)]
        assert errors, "the hostile client got no error"
        about, code, text = decode_args(PROTO["wl_display"].events[0], errors[0][2], [])
        expected = {"truncated": (buffer, INVALID_FD), "bad-stride": (pool, 1),
                    "past-pool": (pool, 1), "shrink": (pool, INVALID_FD)}[attack]
        assert (about, code) == expected, text
        assert list(hostile.messages()) == [], "the proxy hangs up after the error"
        hostile.sock.close()
        # The bystander keeps drawing, and the hostile client's grants are gone.
        after = commits(big_proxy)
        wait_until(lambda: commits(big_proxy) >= after + 3, "the bystander after the attack")
        assert bystander.poll() is None
        wait_until(lambda: stats(big_proxy)["clients"] == 1, "the hostile client's session end")
    finally:
        bystander.terminate()
        _, err = bystander.communicate(timeout=20)
    assert "error" not in err.lower(), err
    assert "Traceback" not in big_proxy.log()


@pytest.mark.parametrize(("damage", "region", "most"), [
    ("static", 1, 1.0),  # one pixel of a 1920x1080 frame: those 4 bytes, not a frame
    ("moving", 64, 2.2),
])
def test_only_damaged_bytes_are_copied(big_proxy: RunningProxy, damage: str, region: int,
                                       most: float) -> None:
    """After warm-up (output buffers exist), bytes copied stay within ``most`` times the
    bytes the client damaged, by the proxy's own counters, and never fall below them:
    the output buffer each commit fills lacks at least that commit's damage."""
    client = subprocess.Popen(
        [sys.executable, "-m", "qubesshm.bench.frames_client", "--damage", damage,
         "--region", str(region), "--frames", "30", "--wait-frame"],
        env=big_proxy.env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True)
    assert client.stdin is not None and client.stdout is not None
    try:
        assert json.loads(client.stdout.readline()) == {"warm": True}, client.stderr
        before = stats(big_proxy)
        client.stdin.write("\n")
        client.stdin.flush()
        result = json.loads(client.stdout.readline())
        after = stats(big_proxy)
        client.stdin.write("\n")
        client.stdin.flush()
        assert client.wait(timeout=30) == 0
    finally:
        if client.poll() is None:
            client.kill()
        client.communicate()
    copied = int(after["bytes_copied"]) - int(before["bytes_copied"])
    damaged = int(after["bytes_damaged"]) - int(before["bytes_damaged"])
    assert damaged == result["bytes_damaged"], "the proxy counts what the client damaged"
    assert damaged > 0
    assert copied >= damaged, f"{copied} bytes copied for {damaged} damaged: damage left out"
    assert copied <= most * damaged, f"{copied} bytes copied for {damaged} damaged"
    if damage == "static":
        assert copied == damaged == 30 * 4
