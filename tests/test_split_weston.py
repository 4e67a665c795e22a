"""The split proxy as three processes: Weston, ``qubesshm host`` and ``qubesshm serve --remote``.

The VM side (serve, domain 1 of its own simulated kernel) starts the host half
(domain 0, another process) with ``--remote``, the stream on the host's stdin and
stdout; the host maps the VM's grants through the kernel's hypercalls and hands
Weston their pages. What the proxy shows must be what it shows unsplit: the exact
pattern on screen, windows churned with nothing left behind, and when the host
half dies, every client told and every grant ended on both sides.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from procs import RunningProxy, host_command, start_proxy, wait_for_file, wait_until
from test_buffer_scenarios import run_client as run_scenario

from qubesshm.headless import HeadlessWeston
from qubesshm.relay.control import read_stats

REPO = Path(__file__).resolve().parent.parent
CHURN = REPO / "examples" / "churn_client.py"
PATTERN = REPO / "examples" / "pattern_client.py"
BIG_LIMIT = "1073741824"
DEADLINE = 60.0




@pytest.fixture
def split(weston: HeadlessWeston, tmp_path: Path,
          sim_env: dict[str, str]) -> Iterator[RunningProxy]:
    """A split proxy that must exit 0 on SIGTERM, without a traceback."""
    running = start_proxy(weston, tmp_path / "qubesshm.log", "--gntalloc-limit", BIG_LIMIT,
                          socket_name=f"qss-{os.getpid()}", env=sim_env, split=True)
    yield running
    assert running.stop() == 0, running.log()
    assert "Traceback" not in running.log(), running.log()


def stats(proxy: RunningProxy) -> dict[str, Any]:
    return read_stats(str(Path(proxy.env["XDG_RUNTIME_DIR"]) / proxy.socket_name))


def grants(proxy: RunningProxy) -> dict[str, Any]:
    value = stats(proxy)["grants"]
    assert isinstance(value, dict)
    return value


def all_let_go(proxy: RunningProxy) -> bool:
    g = grants(proxy)
    return bool(g["live"] == 0 and g["awaiting_unmap"] == 0 and g["deferred"] == 0
                and g["in_use"] == 0)


def host_pid(proxy: RunningProxy) -> int:
    """The host half's process: serve names it when it starts."""
    for line in proxy.log().splitlines():
        if "relaying through the host half" in line:
            return int(line.split("process ", 1)[1].split(")", 1)[0])
    raise AssertionError(proxy.log())


def mapped_grants(pid: int) -> list[str]:
    """The simulated kernel's grant pages process ``pid`` has mmapped."""
    try:
        with open(f"/proc/{pid}/maps") as maps:
            return [line for line in maps if "qubesshm-grant" in line]
    except FileNotFoundError:
        return []


def drawing_client(proxy: RunningProxy, tmp_path: Path) -> subprocess.Popen[str]:
    """The pattern client drawing through ``proxy`` until stopped, once it has
    presented its first frame."""
    ready = tmp_path / "ready"
    drawing = subprocess.Popen([sys.executable, str(PATTERN), "--frames", "1000000",
                                "--ready-file", str(ready)], env=proxy.env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for_file(ready, drawing)
    except BaseException:
        drawing.kill()
        drawing.communicate()
        raise
    return drawing


@pytest.mark.parametrize("scenario", ["static", "transform-5", "viewport", "double-buffered"])
def test_split_shows_the_exact_pattern(weston: HeadlessWeston, split: RunningProxy,
                                       tmp_path: Path, scenario: str) -> None:
    problem = run_scenario(scenario, split.env, weston.env(), tmp_path / "split")
    assert not problem, f"{problem}\nproxy log:\n{split.log()[-4000:]}"
    log = split.log()
    assert "protocol error" not in log.lower(), log
    # The pixels came through grant pages the host mapped, not through the stream.
    assert stats(split)["bytes_copied"] > 0


def test_split_churn_of_500_windows_leaves_nothing(weston: HeadlessWeston,
                                                   split: RunningProxy) -> None:
    windows = 500
    churn = subprocess.run([sys.executable, str(CHURN), "--windows", str(windows), "--size",
                            "200x150"], env=split.env, capture_output=True, text=True,
                           timeout=600, check=False)
    assert churn.returncode == 0, churn.stderr
    assert churn.stdout.startswith(f"churn: {windows} windows"), churn.stdout
    life = stats(split)["lifetimes"]
    # Recycling is the VM side's: few windows needed a fresh grant (and a new pool on
    # the host).
    assert life["cache_hits"] + life["cache_misses"] >= windows
    assert life["cache_misses"] < 0.05 * windows, life
    wait_until(lambda: all_let_go(split), "every grant of the churn ended",
               message=lambda: stats(split))
    g, life = grants(split), stats(split)["lifetimes"]
    assert g["leaked"] == 0 and g["deferred"] == 0
    assert g["ended_total"] == g["shared_total"] > 0
    # Every area ended on the host's unmap notify, across the processes.
    assert life["ended_by_notify"] == life["cache_misses"]
    assert life["deferred_areas"] == 0 and life["late_releases"] == 0


def test_killing_the_host_ends_every_client_and_leaves_nothing(
        weston: HeadlessWeston, tmp_path: Path, sim_env: dict[str, str]) -> None:
    proxy = start_proxy(weston, tmp_path / "qubesshm.log", "--gntalloc-limit", BIG_LIMIT,
                        socket_name=f"qsk-{os.getpid()}", env=sim_env, split=True)
    drawing = drawing_client(proxy, tmp_path)
    try:
        wait_until(lambda: grants(proxy)["live"] > 0, "grants in use")
        assert weston.process is not None
        weston_pid = weston.process.pid
        host = host_pid(proxy)
        wait_until(lambda: bool(mapped_grants(weston_pid)), "Weston mapping grants")
        os.kill(host, signal.SIGKILL)
        # The client is told, in one line naming the GUI domain's half.
        _, err = drawing.communicate(timeout=60)
        assert drawing.returncode != 0
        assert "GUI domain's half is gone" in err, err
        # The VM side ends: its grants all ended (Weston let go of the dead host's
        # connections, so each notify fired), nothing deferred.
        assert proxy.process.wait(timeout=60) == 1, proxy.log()
    finally:
        if drawing.poll() is None:
            drawing.kill()
            drawing.communicate()
        proxy.stop()
    log = proxy.log()
    assert "Traceback" not in log, log
    assert "qubesshm: the host half" in log.splitlines()[-1], log
    summary = next(line for line in log.splitlines() if "qubesshm: summary:" in line)
    assert " 0 deferred, 0 live" in summary, summary
    assert "0 handed to deferred reclaim" in summary, summary
    # Nothing of it is left in the GUI domain either: Weston maps no grant page.
    assert not mapped_grants(weston_pid)
    assert weston.process.poll() is None


def test_remote_socket_reaches_a_host_started_elsewhere(
        weston: HeadlessWeston, tmp_path: Path, sim_env: dict[str, str]) -> None:
    """``--remote-socket``: the host half is started by whoever accepts the stream
    (as inetd or systemd socket activation would), and finds the VM's simulated
    kernel on its own."""
    path = tmp_path / "host.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen(1)
    hosts: list[subprocess.Popen[bytes]] = []

    def serve_one() -> None:
        conn, _ = listener.accept()
        with conn:
            hosts.append(subprocess.Popen(
                [sys.executable, "-m", "qubesshm", "-v", "host", "--upstream",
                 weston.socket_name], stdin=conn.fileno(), stdout=conn.fileno(),
                env=sim_env))

    acceptor = threading.Thread(target=serve_one)
    acceptor.start()
    proxy = start_proxy(weston, tmp_path / "qubesshm.log", "--remote-socket", str(path),
                        "--gntalloc-limit", BIG_LIMIT, socket_name=f"qsr-{os.getpid()}",
                        env=sim_env, split=False, upstream=False)
    try:
        acceptor.join(timeout=30)
        problem = run_scenario("static", proxy.env, weston.env(), tmp_path / "shot")
        assert not problem, problem
        wait_until(lambda: all_let_go(proxy), "every grant ended")
    finally:
        assert proxy.stop() == 0, proxy.log()
        listener.close()
    assert hosts and hosts[0].wait(timeout=30) == 0
    assert "Traceback" not in proxy.log(), proxy.log()


def test_killing_the_vm_side_leaves_nothing_in_the_gui_domain(
        weston: HeadlessWeston, tmp_path: Path, sim_env: dict[str, str]) -> None:
    proxy = start_proxy(weston, tmp_path / "qubesshm.log", "--gntalloc-limit", BIG_LIMIT,
                        socket_name=f"qsv-{os.getpid()}", env=sim_env, split=True)
    drawing = drawing_client(proxy, tmp_path)
    try:
        assert weston.process is not None
        weston_pid = weston.process.pid
        wait_until(lambda: bool(mapped_grants(weston_pid)), "Weston mapping grants")
        host = host_pid(proxy)
        proxy.process.kill()
        proxy.process.wait()
        # The host sees the stream end, closes Weston's connections and unmaps all.
        wait_until(lambda: not os.path.exists(f"/proc/{host}") or _zombie(host),
                   "the host half exiting")
        wait_until(lambda: not mapped_grants(weston_pid),
                   "Weston letting go of every grant page")
        assert weston.process.poll() is None
    finally:
        drawing.kill()
        drawing.communicate()
    log = proxy.log()
    assert "qubesshm host: " in log and "Traceback" not in log, log


def _zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split(") ", 1)[1].startswith("Z")
    except FileNotFoundError:
        return True


def test_a_client_that_stops_reading_stops_only_its_own_connection(
        split: RunningProxy) -> None:
    """Back-pressure is per connection: a client that sends requests and never reads
    the events they cause fills its own connection's credit; another client's round
    trips go on meanwhile."""
    path = str(Path(split.env["XDG_RUNTIME_DIR"]) / split.socket_name)
    greedy = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    greedy.connect(path)
    # Once nothing is taken for a second, it has filled every queue on the way.
    greedy.settimeout(1.0)
    sync = struct.Struct("<IHHI")
    sent = 0
    # Each sync makes a done and a delete_id (24 bytes of events) that it never reads:
    # far more than its socket, the VM side's high-water mark and the stream's window.
    with contextlib.suppress(TimeoutError, BrokenPipeError, ConnectionResetError):
        while sent < 200000:
            greedy.sendall(b"".join(sync.pack(1, 0, 12, 2 + sent + i) for i in range(1000)))
            sent += 1000
    assert sent >= 10000, sent
    bystander = subprocess.run([sys.executable, "-c", ROUND_TRIPS], env=split.env,
                               capture_output=True, text=True, timeout=120, check=False)
    assert bystander.returncode == 0, bystander.stderr
    assert bystander.stdout.strip() == "200 round trips", bystander.stdout
    # The greedy client was held back, not dropped: it is still connected.
    assert stats(split)["clients"] == 1
    greedy.close()
    wait_until(lambda: stats(split)["clients"] == 0, "the greedy client's session end")


ROUND_TRIPS = """
from pywayland.client import Display
display = Display()
display.connect()
for _ in range(200):
    display.roundtrip()
display.disconnect()
print("200 round trips")
"""


def test_stats_on_each_side_show_their_half(split: RunningProxy, tmp_path: Path) -> None:
    drawing = drawing_client(split, tmp_path)
    try:
        vm = stats(split)
        assert vm["half"] == "vm"
        assert vm["stream"]["pools_sent"] >= 1 and vm["stream"]["bytes_out"] > 0
        assert vm["stream"]["connections"] == 1
        line = next(line for line in split.log().splitlines()
                    if "counters: qubesshm stats --socket " in line)
        host_socket = line.rsplit(" ", 1)[1]
        shown = subprocess.run([sys.executable, "-m", "qubesshm", "stats", "--socket",
                                host_socket, "--json"], env=split.env, capture_output=True,
                               text=True, timeout=60, check=True)
        host = json.loads(shown.stdout)
        assert host["half"] == "host" and host["vm_domid"] == 1
        assert host["connections"] == 1
        assert host["pools"]["mapped"] == host["pools"]["mapped_total"] >= 1
        # The host maps exactly the pages the VM side has live for its buffers.
        assert host["pages"]["mapped"] == grants(split)["live"]
        table = subprocess.run([sys.executable, "-m", "qubesshm", "stats", "--socket",
                                host_socket], env=split.env, capture_output=True, text=True,
                               timeout=60, check=True).stdout
        assert table.startswith("half           host (of domain 1"), table
    finally:
        drawing.terminate()
        drawing.communicate(timeout=60)


def test_run_remote_reports_the_vm_sides_grants(weston: HeadlessWeston,
                                                sim_env: dict[str, str],
                                                tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "qubesshm", "run", "--remote", host_command(weston),
         "--report-json", str(tmp_path / "report.json"), "--", sys.executable, str(PATTERN),
         "--frames", "5"], env=sim_env, capture_output=True, text=True, timeout=120,
        check=False)
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    assert "qubesshm report" in result.stderr, result.stderr
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["commits"] >= 5 and report["upstream_pools"] >= 1, report
    assert report["grant_pages_shared"] > 0
    assert report["grant_pages_deferred"] == 0 and report["grant_pages_leaked"] == 0
