"""Grant lifetimes against a real headless Weston: recycling, unmap notify, late releases.

Real clients (``examples/churn_client.py``, ``examples/pattern_client.py``) run
through ``qubesshm serve`` on the simulated grant layer, each test with a
simulated kernel of its own (``QUBESSHM_SIM_ROOT``), so the parameters it sets
reach no other test. Weston's own munmaps fire the unmap notifies. Progress is
waited on through ``qubesshm stats``, never through sleeps.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from procs import RunningProxy, start_proxy, wait_for_file, wait_until

from qubesshm.grants.params import FREE_PER_ITERATION, ModuleParams
from qubesshm.grants.simkernels import running_kernels
from qubesshm.headless import HeadlessWeston
from qubesshm.relay.control import read_stats

REPO = Path(__file__).resolve().parent.parent
CHURN = REPO / "examples" / "churn_client.py"
PATTERN = REPO / "examples" / "pattern_client.py"
DEADLINE = 60.0
BIG_LIMIT = "1073741824"

HOLDER = """
import mmap, os, sys
held = []
for line in sys.stdin:
    word, *rest = line.split()
    if word == "grab":
        fd_dir = f"/proc/{rest[0]}/fd"
        for name in os.listdir(fd_dir):
            try:
                target = os.readlink(f"{fd_dir}/{name}")
            except OSError:
                continue
            if target.startswith("/memfd:qubesshm-grant"):
                fd = os.open(f"{fd_dir}/{name}", os.O_RDWR)
                held.append(mmap.mmap(fd, os.fstat(fd).st_size))
                os.close(fd)
        print(f"held {len(held)}", flush=True)
    elif word == "release":
        for m in held:
            m.close()
        held.clear()
        print("released", flush=True)
"""




def serve(weston: HeadlessWeston, tmp_path: Path, env: dict[str, str],
          *extra: str, prefix: tuple[str, ...] = (), split: bool = False) -> RunningProxy:
    return start_proxy(weston, tmp_path / "qubesshm.log", *extra,
                       socket_name=f"qsl-{os.getpid()}", env=env, prefix=prefix, split=split)


@pytest.fixture(params=[False, True], ids=["one-process", "split"])
def split(request: pytest.FixtureRequest) -> bool:
    """Run the test on the proxy in one process, and split (serve --remote with its
    host half in another process): the VM side keeps every rule of the lifetimes."""
    value: bool = request.param
    return value


@pytest.fixture
def stopped() -> Iterator[list[RunningProxy]]:
    """Proxies to stop at the end: each must exit 0, without a traceback."""
    proxies: list[RunningProxy] = []
    yield proxies
    for proxy in proxies:
        assert proxy.stop() == 0, proxy.log()
        assert "Traceback" not in proxy.log(), proxy.log()


def stats(proxy: RunningProxy) -> dict[str, Any]:
    return read_stats(str(Path(proxy.env["XDG_RUNTIME_DIR"]) / proxy.socket_name))


def grants(proxy: RunningProxy) -> dict[str, Any]:
    value = stats(proxy)["grants"]
    assert isinstance(value, dict)
    return value


def lifetimes(proxy: RunningProxy) -> dict[str, Any]:
    value = stats(proxy)["lifetimes"]
    assert isinstance(value, dict)
    return value


def client(proxy: RunningProxy, script: Path, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, str(script), *args], env=proxy.env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(process: subprocess.Popen[str]) -> tuple[int, str, str]:
    out, err = process.communicate(timeout=300)
    return process.returncode, out, err


def all_let_go(proxy: RunningProxy) -> bool:
    g = grants(proxy)
    return bool(g["live"] == 0 and g["awaiting_unmap"] == 0 and g["deferred"] == 0
                and g["in_use"] == 0)


def test_window_churn_reuses_grants_and_leaves_nothing(
        weston: HeadlessWeston, tmp_path: Path, sim_env: dict[str, str],
        stopped: list[RunningProxy]) -> None:
    proxy = serve(weston, tmp_path, sim_env, "--gntalloc-limit", BIG_LIMIT)
    stopped.append(proxy)
    windows = 500
    code, out, err = finish(client(proxy, CHURN, "--windows", str(windows),
                                   "--size", "200x150"))
    assert code == 0, err
    assert out.startswith(f"churn: {windows} windows"), out
    life = lifetimes(proxy)
    # Each window needs one output buffer; only a handful were not in the cache.
    assert life["cache_hits"] + life["cache_misses"] >= windows
    assert life["cache_misses"] < 0.05 * windows, life
    # The client is gone: Weston unmaps its pools, and every notify ends its grant.
    wait_until(lambda: all_let_go(proxy), "every grant of the churn ended")
    g, life = grants(proxy), lifetimes(proxy)
    assert g["leaked"] == 0 and g["deferred"] == 0
    assert g["ended_total"] == g["shared_total"] > 0
    assert life["deferred_areas"] == 0 and life["late_releases"] == 0
    assert life["ended_by_notify"] == life["cache_misses"]


@pytest.mark.parametrize("windows", [30, 1])
def test_evicted_areas_end_on_westons_munmap_without_deferral(
        weston: HeadlessWeston, tmp_path: Path, sim_env: dict[str, str],
        stopped: list[RunningProxy], windows: int) -> None:
    # No cache: every window's area is evicted while the client still runs, so its
    # pool is destroyed on a live connection and Weston's munmap fires the notify.
    # serve trims the cache once a batch's output went, not at the next commit: the
    # last (or only) window's area goes too, while the client waits for its sync.
    proxy = serve(weston, tmp_path, sim_env, "--gntalloc-limit", BIG_LIMIT,
                  "--cache-pages", "0")
    stopped.append(proxy)
    code, _, err = finish(client(proxy, CHURN, "--windows", str(windows),
                                   "--size", "100x100"))
    assert code == 0, err
    wait_until(lambda: all_let_go(proxy), "every evicted area ended")
    life, g = lifetimes(proxy), grants(proxy)
    assert (life["cache_hits"], life["evictions"]) == (0, windows), life
    assert life["ended_by_notify"] == life["cache_misses"] == windows
    assert life["deferred_areas"] == 0 and g["deferred"] == 0 and g["leaked"] == 0
    assert life["unmap_latency_ms"]["count"] >= windows


class Holder:
    """A process of the GUI domain that maps the proxy's grant pages and lets go
    when told: the simulated kernel counts its mmaps (``--sim-watch``)."""

    def __init__(self, prefix: tuple[str, ...] = ()) -> None:
        self.process = subprocess.Popen([*prefix, sys.executable, "-c", HOLDER],
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    def tell(self, line: str) -> str:
        assert self.process.stdin is not None and self.process.stdout is not None
        self.process.stdin.write(line + "\n")
        self.process.stdin.flush()
        return self.process.stdout.readline()

    def close(self) -> None:
        self.process.kill()
        self.process.wait()


def kernel_params(proxy: RunningProxy) -> ModuleParams:
    """The parameter files of the proxy's own simulated kernel."""
    wanted = str(Path(proxy.env["XDG_RUNTIME_DIR"]) / proxy.socket_name)
    found = [k for k in running_kernels(Path(proxy.env["QUBESSHM_SIM_ROOT"]))
             if k.socket == wanted]
    assert len(found) == 1, found
    return ModuleParams(found[0].root)


def late_areas(weston: HeadlessWeston, tmp_path: Path, sim_env: dict[str, str],
               stopped: list[RunningProxy], holder: Holder, *extra: str,
               prefix: tuple[str, ...] = (), read_only_fpi: bool = False,
               split: bool = False) -> tuple[RunningProxy, int, ModuleParams]:
    """A proxy whose kernel has free_per_iteration 1 (any backlog raises it), and whose
    only client drew and was killed while ``holder`` maps its pages: (the proxy, the
    pages now late, its kernel's parameters)."""
    proxy = serve(weston, tmp_path, sim_env, "--gntalloc-limit", BIG_LIMIT, "--sim-watch",
                  str(holder.process.pid), "--late-timeout", "1", *extra, prefix=prefix,
                  split=split)
    stopped.append(proxy)
    # As an administrator would, with sysfs: qubesshm tune on the running kernel.
    tuned = subprocess.run([sys.executable, "-m", "qubesshm", "tune", "--socket",
                            proxy.socket_name, "--free-per-iteration", "1"], env=proxy.env,
                           capture_output=True, text=True, timeout=60, check=False)
    assert tuned.returncode == 0, tuned.stderr
    params = kernel_params(proxy)
    assert params.free_per_iteration == 1
    if read_only_fpi:
        params.path(FREE_PER_ITERATION).chmod(0o444)
    ready = tmp_path / "ready"
    # Ready once its last frame was presented: every area it will have exists before
    # the holder maps them (ready at the first, a later frame's area could come after).
    drawing = client(proxy, PATTERN, "--frames", "3", "--hold", "120",
                     "--ready-file", str(ready), "--ready-after", "last")
    wait_for_file(ready, drawing)
    assert holder.tell(f"grab {proxy.process.pid}").startswith("held ")
    live = grants(proxy)["live"]
    drawing.kill()
    drawing.wait()
    wait_until(lambda: grants(proxy)["deferred"] == live,
               f"the late areas deferred ({live} pages)", message=lambda: stats(proxy))
    return proxy, live, params


def test_late_release_goes_to_deferred_reclaim_and_drains_when_let_go(
        weston: HeadlessWeston, tmp_path: Path, sim_env: dict[str, str],
        stopped: list[RunningProxy], split: bool) -> None:
    holder = Holder()
    try:
        # Weston lets go at once; the holder does not, so the areas are late. Split,
        # the deferred list and free_per_iteration are the VM side's (its kernel's).
        proxy, live, params = late_areas(weston, tmp_path, sim_env, stopped, holder,
                                         split=split)
        assert live > 0
        life = lifetimes(proxy)
        assert life["late_releases"] >= 1 and life["defer_batches"] >= 1
        assert life["free_per_iteration_raises"] >= 1
        assert life["free_per_iteration"] == -(-live // 2), "drains within the 2 s target"
        assert holder.tell("release") == "released\n"
        wait_until(lambda: all_let_go(proxy), "the backlog drained")
        wait_until(lambda: lifetimes(proxy)["free_per_iteration_restores"] >= 1,
                   "free_per_iteration restored")
        assert lifetimes(proxy)["free_per_iteration"] == 1
        assert params.free_per_iteration == 1
        assert grants(proxy)["leaked"] == 0
    finally:
        holder.close()


def test_free_per_iteration_is_restored_on_sigterm(
        weston: HeadlessWeston, tmp_path: Path, sim_env: dict[str, str]) -> None:
    holder = Holder()
    proxies: list[RunningProxy] = []
    try:
        proxy, _, params = late_areas(weston, tmp_path, sim_env, proxies, holder)
        wait_until(lambda: params.free_per_iteration > 1, "free_per_iteration raised")
        assert proxy.stop() == 0, proxy.log()
        # The simulated kernel ends with its process (its files with it); the summary
        # counts the write of the value found, made before the kernel went.
        assert "restored 1x" in proxy.log(), proxy.log()
        assert not params.root.exists()
    finally:
        holder.close()


def test_a_free_per_iteration_it_may_not_write_is_said_once(
        weston: HeadlessWeston, tmp_path: Path, sim_env: dict[str, str],
        stopped: list[RunningProxy]) -> None:
    # Root writes through any mode bits: run without capabilities (CAP_DAC_OVERRIDE).
    prefix = ("setpriv", "--bounding-set=-all", "--") if os.geteuid() == 0 else ()
    holder = Holder(prefix)  # a proxy may only watch processes it may look at
    try:
        proxy, live, params = late_areas(weston, tmp_path, sim_env, stopped, holder,
                                         prefix=prefix, read_only_fpi=True)
        assert holder.tell("release") == "released\n"
        # Two kernel ticks later the proxy has looked at the backlog many times.
        wait_until(lambda: grants(proxy)["deferred"] <= live - 2, "the kernel reclaiming")
        said = [line for line in proxy.log().splitlines()
                if "cannot set free_per_iteration" in line]
        assert len(said) == 1, proxy.log()
        assert "qubesshm tune --free-per-iteration" in said[0]
        assert params.free_per_iteration == 1
    finally:
        holder.close()


def test_clients_killed_mid_frame_leave_nothing(
        weston: HeadlessWeston, tmp_path: Path, sim_env: dict[str, str],
        stopped: list[RunningProxy], split: bool) -> None:
    proxy = serve(weston, tmp_path, sim_env, "--gntalloc-limit", BIG_LIMIT, split=split)
    stopped.append(proxy)
    drawing = [client(proxy, PATTERN, "--frames", "100000", "--damage", "partial",
                      "--width", str(120 + 40 * i), "--height", "90") for i in range(3)]
    try:
        wait_until(lambda: stats(proxy)["clients"] == 3 and stats(proxy)["commits"] >= 60,
                   "three clients drawing")
    finally:
        for process in drawing:
            process.send_signal(signal.SIGKILL)
        for process in drawing:
            process.wait()
    wait_until(lambda: all_let_go(proxy) and stats(proxy)["clients"] == 0,
               "the killed clients' grants ended")
    g, life = grants(proxy), lifetimes(proxy)
    assert g["leaked"] == 0 and g["cached"] == 0
    assert life["deferred_areas"] == 0


def client_stats(proxy: RunningProxy, number: int) -> dict[str, Any]:
    found = [c for c in stats(proxy)["per_client"] if c["client"] == number]
    assert found, f"client#{number} is not connected"
    value: dict[str, Any] = found[0]
    return value


def only_client(proxy: RunningProxy) -> int:
    """The number of the one client connected now."""
    wait_until(lambda: len(stats(proxy)["per_client"]) == 1, "one client connected",
               message=lambda: stats(proxy)["per_client"])
    number: int = stats(proxy)["per_client"][0]["client"]
    return number


def keeps_presenting(proxy: RunningProxy, number: int, frames: int = 10) -> None:
    """Client ``number`` presents ``frames`` more frames (it commits only after the
    frame callback of the one before): it carries on."""
    start = client_stats(proxy, number)["commits"]
    wait_until(lambda: client_stats(proxy, number)["commits"] >= start + frames,
               f"client#{number} presenting {frames} more frames")


def test_a_client_over_its_cap_keeps_presenting_beside_one_under_it(
        desktop_weston: HeadlessWeston, tmp_path: Path, stopped: list[RunningProxy],
        split: bool) -> None:
    """The cap is each client's: a 1920x1080 window with room for one and a half
    buffers falls back to one and keeps presenting frames; a small window beside it is
    not held back by it, though both together pass the cap."""
    root = tmp_path / "sim"
    root.mkdir(mode=0o700)
    env = dict(desktop_weston.env(), QUBESSHM_SIM_ROOT=str(root), QUBESSHM_GRANTS="sim")
    one_buffer = -(-(1920 * 1080 * 4 + 1) // 4096)  # 2026 pages with the notify byte
    cap = one_buffer * 3 // 2
    proxy = serve(desktop_weston, tmp_path, env, "--client-pages", str(cap), split=split)
    stopped.append(proxy)
    small_ready, big_ready = tmp_path / "small", tmp_path / "big"
    # 1024x600 is 601 pages a buffer; drawing, it keeps two.
    small = client(proxy, PATTERN, "--width", "1024", "--height", "600", "--seconds", "600",
                   "--damage", "partial", "--ready-file", str(small_ready))
    wait_for_file(small_ready, small)
    small_number = only_client(proxy)
    big = client(proxy, PATTERN, "--width", "1920", "--height", "1080", "--frames", "40",
                 "--damage", "partial", "--ready-file", str(big_ready),
                 "--ready-after", "last")
    try:
        wait_for_file(big_ready, big)  # its 40th frame was presented
        code, out, err = finish(big)
        assert code == 0, err
        assert "40 frames" in out or "40 frames" in err, (out, err)
        keeps_presenting(proxy, small_number)  # still drawing after the big one went
    finally:
        small.send_signal(signal.SIGTERM)
        small.wait()
    log = proxy.log()
    assert "protocol error" not in log, log
    # The per-client figures were read while it ran: the exit summary has the totals.
    total = stats(proxy)
    held_back = total["refills_in_place"] + total["commit_waits_ms"]["count"]
    assert held_back >= 30, total
    assert total["grants"]["peak_live"] > cap, "both clients together passed one cap"
    assert lifetimes(proxy)["refused"] == 0
    wait_until(lambda: all_let_go(proxy), "every grant ended")
    assert grants(proxy)["leaked"] == 0


def test_gntalloc_limit_refuses_only_a_buffer_that_never_fits(
        weston: HeadlessWeston, tmp_path: Path, sim_env: dict[str, str],
        stopped: list[RunningProxy], split: bool) -> None:
    proxy = serve(weston, tmp_path, sim_env, "--gntalloc-limit", "700",
                  "--client-pages", "700", split=split)
    stopped.append(proxy)
    first_ready, second_ready = tmp_path / "first", tmp_path / "second"
    first = client(proxy, PATTERN, "--width", "320", "--height", "240", "--seconds", "600",
                   "--damage", "partial", "--ready-file", str(first_ready))
    wait_for_file(first_ready, first)
    first_number = only_client(proxy)
    try:
        # 1024x768 is 769 pages: no limit of 700 can ever hold it.
        code, _, err = finish(client(proxy, PATTERN, "--width", "1024", "--height", "768"))
        assert code == 1
        assert "more than the gntalloc limit of 700 pages" in err, err
        assert "--gntalloc-limit" in err, err
        assert lifetimes(proxy)["refused"] == 1
        keeps_presenting(proxy, first_number)  # the client that drew carries on
        # 960x720 is 676 pages: it fits alone, not beside the first client's buffers.
        # It waits (the first keeps drawing) until the first goes, then draws.
        second = client(proxy, PATTERN, "--width", "960", "--height", "720", "--frames",
                        "3", "--ready-file", str(second_ready), "--ready-after", "last")
        wait_until(lambda: lifetimes(proxy)["no_room"] >= 1, "the second client waiting")
        assert not second_ready.exists() and second.poll() is None
        keeps_presenting(proxy, first_number)
    finally:
        first.send_signal(signal.SIGTERM)
        first.wait()
    wait_for_file(second_ready, second)
    code, _, err = finish(second)
    assert code == 0, err
    assert stats(proxy)["waits_for_room"] >= 1
    wait_until(lambda: all_let_go(proxy), "every grant ended")


@pytest.mark.skipif(os.geteuid() != 0, reason="needs a process it may not look at: as root, "
                    "one with capabilities it lacks")
def test_sim_watch_of_a_process_it_cannot_see_is_one_clear_line(
        weston: HeadlessWeston, sim_env: dict[str, str]) -> None:
    result = subprocess.run(
        ["setpriv", "--bounding-set=-all", "--", sys.executable, "-m", "qubesshm", "serve",
         "--socket", f"qsw-{os.getpid()}", "--upstream", weston.socket_name,
         "--sim-watch", "1"], env=sim_env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1, result.stderr
    assert "cannot see the mappings of process 1" in result.stderr
