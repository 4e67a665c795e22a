"""The split proxy as three processes: Weston, ``qubesshm host`` and ``qubesshm serve --remote``.

The VM side (serve, domain 1 of its own simulated kernel) starts the host half
(domain 0, another process) with ``--remote``, the stream on the host's stdin and
stdout; the host maps the VM's grants through the kernel's hypercalls and hands
Weston their pages. What the proxy shows must be what it shows unsplit: the exact
pattern on screen, windows churned with nothing left behind, and when the host
half dies, every client told and every grant ended on both sides.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from procs import RunningProxy, start_proxy, wait_for_file
from test_buffer_scenarios import run_client as run_scenario

from qubesshm.headless import HeadlessWeston
from qubesshm.relay.control import read_stats

REPO = Path(__file__).resolve().parent.parent
CHURN = REPO / "examples" / "churn_client.py"
PATTERN = REPO / "examples" / "pattern_client.py"
BIG_LIMIT = "1073741824"
DEADLINE = 60.0


def wait_until(condition: Callable[[], bool], what: str, timeout: float = DEADLINE,
               message: Callable[[], object] = lambda: "") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what} {message()}")
        time.sleep(0.02)


@pytest.fixture
def sim_env(weston: HeadlessWeston, tmp_path: Path) -> dict[str, str]:
    root = tmp_path / "sim"
    root.mkdir(mode=0o700)
    return dict(weston.env(), QUBESSHM_SIM_ROOT=str(root), QUBESSHM_GRANTS="sim")


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
    ready = tmp_path / "ready"
    drawing = subprocess.Popen([sys.executable, str(PATTERN), "--frames", "1000000",
                                "--ready-file", str(ready)], env=proxy.env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for_file(ready, drawing)
        wait_until(lambda: grants(proxy)["live"] > 0, "grants in use")
        assert weston.process is not None
        host = host_pid(proxy)
        wait_until(lambda: bool(mapped_grants(weston.process.pid)), "Weston mapping grants")
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
    assert not mapped_grants(weston.process.pid)
    assert weston.process.poll() is None
