"""``qubesshm bench relay``: when its ratios are not to be trusted (``trust_warnings``,
inputs to warnings), its client's round trip against a fake compositor, what it
reads of the machine, and the bench itself on a short configuration against the
session's Weston, as a user runs it.

No test holds a figure to a time: the end-to-end tests check that every line is
there with numbers of the right sign.
"""

from __future__ import annotations

import re
import shutil
import socket
import struct
import subprocess
import sys
import threading
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import pytest

from qubesshm.bench import machine
from qubesshm.bench.relay import (
    DIRECT_SPREAD,
    LOAD_PER_CPU,
    OTHERS_SHARE,
    RATIO_SPREAD,
    SyncClient,
    trust_warnings,
)
from qubesshm.headless import HeadlessWeston
from qubesshm.wire.protocol import load_protocols

REPO = Path(__file__).resolve().parent.parent
NUMBER = r"(-?\d+\.\d+)"
KEY = "qubesshm / waypipe, added round-trip latency"

# -- trust_warnings -----------------------------------------------------------------------


def warnings(load: float = 0.0, cpus: int = 2, others: tuple[float, ...] = (0.0, 0.0, 0.0),
             ratios: Mapping[str, Sequence[float | None]] | None = None,
             added: Mapping[str, Sequence[float]] | None = None,
             direct: Mapping[str, Sequence[float]] | None = None) -> list[str]:
    """trust_warnings of three runs that agree, but for what is given."""
    return trust_warnings(
        load, cpus, list(others),
        {KEY: [0.8, 0.82, 0.85], "qubesshm / waypipe, relay CPU per message": [6.5, 6.8, 7.0],
         **(ratios or {})},
        {"qubesshm added round-trip latency": [48e-6, 50e-6, 49e-6],
         "waypipe added round-trip latency": [60e-6, 61e-6, 58e-6], **(added or {})},
        {"round trip": [19e-6, 19.5e-6, 20e-6], "burst": [30e-3, 31e-3, 33e-3],
         **(direct or {})})


def test_runs_that_agree_on_an_idle_machine_have_no_warning() -> None:
    assert warnings() == []
    assert warnings(load=LOAD_PER_CPU * 2 - 0.01, others=(OTHERS_SHARE - 0.01,) * 3) == []


def test_a_load_average_of_half_a_cpu_per_cpu_before_the_run_is_a_warning() -> None:
    found = warnings(load=LOAD_PER_CPU * 2)
    assert len(found) == 1 and found[0].startswith("load average 1.00 before the run"), found
    assert "2 CPUs" in found[0]
    # The threshold scales with the CPUs this process may use.
    assert warnings(load=1.0, cpus=4) == []


def test_other_processes_busy_during_a_run_name_that_run() -> None:
    found = warnings(others=(0.0, OTHERS_SHARE, 0.02))
    assert len(found) == 1 and "run 2 10%" in found[0] and "run 1" not in found[0], found


def test_a_ratio_that_spreads_between_runs_is_named() -> None:
    spread = [1.0, 1.1, RATIO_SPREAD + 0.05]
    found = warnings(ratios={KEY: spread})
    assert len(found) == 1, found
    assert found[0].startswith(f"{KEY}: the runs' ratios spread from 1.00 to 1.35"), found
    assert warnings(ratios={KEY: [1.0, 1.1, RATIO_SPREAD - 0.01]}) == []


def test_an_added_time_not_above_zero_is_noise_and_its_ratio_meaningless() -> None:
    found = warnings(added={"waypipe added burst time": [2e-3, -1e-3, 0.0]})
    assert len(found) == 1, found
    assert found[0].startswith("waypipe added burst time not above zero (run 2 -1000.0 µs, "
                               "run 3 0.0 µs)"), found
    negative = warnings(ratios={KEY: [0.8, -0.5, 0.8]})
    assert len(negative) == 1 and negative[0].startswith(f"{KEY}: a ratio not above zero")


def test_a_run_without_a_ratio_is_counted() -> None:
    found = warnings(ratios={KEY: [0.8, None, 0.82]})
    assert found == [f"{KEY}: no ratio in 1 of 3 runs (the second path added nothing "
                     "measurable)"]


def test_a_direct_path_that_moved_between_runs_is_a_warning() -> None:
    found = warnings(direct={"round trip": [19e-6, 19e-6 * DIRECT_SPREAD + 1e-6, 20e-6]})
    assert len(found) == 1 and found[0].startswith(
        "the direct path's median round trip moved from 19.0 to 23.8 µs"), found
    found = warnings(direct={"burst": [30e-3, 45e-3, 31e-3]})
    assert len(found) == 1 and "median burst moved from 30.0 to 45.0 ms" in found[0], found


def test_one_run_has_no_spread() -> None:
    assert trust_warnings(0.0, 2, [0.0], {KEY: [0.5]}, {}, {"round trip": [19e-6]}) == []


def test_every_reason_is_its_own_warning() -> None:
    found = warnings(load=5.0, others=(0.5, 0.0, 0.0), ratios={KEY: [0.5, 1.0, 0.8]},
                     direct={"burst": [30e-3, 60e-3, 30e-3]})
    assert [w.split(" ")[0] for w in found] == ["load", "other", "qubesshm", "the"], found


# -- the sync client ---------------------------------------------------------------------


def answering(tmp_path: Path, answer: Callable[[socket.socket, int], None]) -> Path:
    """A socket where a thread answers each sync it reads with ``answer``(connection,
    callback id) until the client hangs up."""
    path = tmp_path / "fake-compositor"
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    server.listen(1)

    def serve() -> None:
        conn, _ = server.accept()
        with conn, server:
            while (request := conn.recv(12)):
                answer(conn, struct.unpack("=III", request)[2])

    threading.Thread(target=serve, daemon=True).start()
    return path


def done(callback: int) -> bytes:
    return struct.pack("=III", callback, 12 << 16, 7)


def delete_id(callback: int) -> bytes:
    return struct.pack("=III", 1, 12 << 16 | 1, callback)


def test_a_round_trip_takes_its_answer_in_one_read_or_in_pieces(tmp_path: Path) -> None:
    def in_pieces(conn: socket.socket, callback: int) -> None:
        if callback == 2:  # the first: done, then delete_id a byte at a time
            conn.sendall(done(callback))
            for byte in delete_id(callback):
                conn.sendall(bytes([byte]))
        else:
            conn.sendall(done(callback) + delete_id(callback))

    client = SyncClient(answering(tmp_path, in_pieces),
                        load_protocols()["wl_display"].requests[0])
    try:
        for _ in range(3):
            assert client.round_trip() > 0
            # Every answer freed its callback: the next sync reuses id 2.
            assert client.free_ids == [2] and client.next_id == 3
    finally:
        client.close()


def test_a_round_trip_ends_in_an_error_when_the_compositor_says_one(tmp_path: Path) -> None:
    def error(conn: socket.socket, callback: int) -> None:
        message = b"bad\0"
        conn.sendall(struct.pack("=IIIII", 1, (20 + len(message)) << 16, 1, 1, len(message))
                     + message)

    client = SyncClient(answering(tmp_path, error), load_protocols()["wl_display"].requests[0])
    try:
        with pytest.raises(ConnectionError, match="protocol error"):
            client.round_trip()
    finally:
        client.close()


# -- the machine --------------------------------------------------------------------------


def test_cpu_lists_as_sysfs_writes_them() -> None:
    assert machine.parse_cpu_list("0-3,6\n") == {0, 1, 2, 3, 6}
    assert machine.parse_cpu_list("0") == {0}


def test_the_governor_is_read_from_every_cpu_or_said_not_readable(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(machine, "_CPU_DIR", tmp_path)
    assert machine.governor() == "not readable"
    for cpu, name in ((0, "performance"), (1, "performance")):
        (tmp_path / f"cpu{cpu}" / "cpufreq").mkdir(parents=True)
        (tmp_path / f"cpu{cpu}" / "cpufreq" / "scaling_governor").write_text(name + "\n")
    assert machine.governor() == "performance"
    (tmp_path / "cpu1" / "cpufreq" / "scaling_governor").write_text("powersave\n")
    assert machine.governor() == "performance (cpu0), powersave (cpu1)"


def test_cpu_times_of_some_cpus_add_up_to_the_whole_machines() -> None:
    total = machine.CpuTimes.now()
    parts = machine.CpuTimes.now(range(machine.online_cpus()))
    # Read a moment apart, the whole machine's can only be the same or later.
    assert total.busy > 0 and parts.busy > 0
    later = machine.CpuTimes.now()
    assert later.busy >= total.busy


# -- the bench, end to end ----------------------------------------------------------------


def bench(weston: HeadlessWeston, *args: str) -> str:
    """``qubesshm bench relay ARGS --upstream`` the session's Weston: its output."""
    env = {k: v for k, v in weston.env().items() if k != "QUBESSHM_SIM_ROOT"}
    env["PYTHONPATH"] = str(REPO)
    # The timeout only guards against a hang; a passing run takes seconds.
    result = subprocess.run(
        [sys.executable, "-m", "qubesshm", "bench", "relay", *args, "--upstream",
         str(weston.socket_path)],
        env=env, cwd=REPO, capture_output=True, text=True, timeout=600, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    return result.stdout


def assert_machine_described(out: str) -> None:
    assert re.search(r"^machine: \d+ CPUs \(.+\), load average [\d.]+, [\d.]+, [\d.]+ before "
                     r"the run$", out, re.M), out
    assert re.search(r"^machine: CPUs: \d+ available to this process, \d+ online; cpufreq "
                     r"governor: .+; .+; cpuidle: .+$", out, re.M), out
    assert re.search(r"^versions: Python \d+\.\d+\.\d+, ", out, re.M), out
    assert re.search(r"^qubesshm: serve on the .+ event loop, fast path: compiled$", out,
                     re.M), out
    assert re.search(r"^placement: this client, the relays and the compositor it started all "
                     r"on CPU \d+", out, re.M), out
    assert re.search(r"^load average [\d.]+, [\d.]+, [\d.]+ after the run$", out, re.M), out
    assert all(line.startswith("warning: ") for line in out.splitlines()
               if line.startswith("warning")), out


def test_bench_relay_prints_every_run_and_the_medians(weston: HeadlessWeston) -> None:
    out = bench(weston, "--round-trips", "50", "--burst", "2000", "--bursts", "1",
                "--repeats", "2", "--no-waypipe")
    assert_machine_described(out)
    assert "run 1 of 2" in out and "run 2 of 2" in out
    assert "medians over 2 runs" in out
    assert re.search(r"qubesshm +[\d.]+ +[\d.]+ +[-\d.]+ +[\d.]+ +[-\d.]+ +[\d.]+\n", out), out
    assert len(re.findall(r"^other processes used \d+% of the CPU time of CPU \d+ during the "
                          r"run, the hypervisor stole \d+%$", out, re.M)) == 2, out


@pytest.mark.skipif(shutil.which("waypipe") is None,
                    reason="the baseline is waypipe (Debian package 'waypipe')")
def test_bench_relay_prints_the_machine_every_paths_figures_and_the_ratios(
        weston: HeadlessWeston) -> None:
    out = bench(weston, "--round-trips", "50", "--burst", "1000", "--bursts", "1",
                "--repeats", "2")
    assert_machine_described(out)
    assert out.count("run 1 of 2") == 1 and out.count("run 2 of 2") == 1
    for path in ("direct", "qubesshm", "waypipe"):
        rows = re.findall(rf"^{path} +" + r" +".join([NUMBER] * 5) + r" +(-|\d+\.\d\d)$",
                          out, re.M)
        assert len(rows) == 2, (path, out)
        for rtt, p90, _, burst, _, cpu in rows:
            assert 0 < float(rtt) <= float(p90) and float(burst) > 0
            assert (cpu == "-") == (path == "direct"), "relay CPU is the relays'"
    rtt_cpu = re.findall(r"^relay CPU per message in round trips, µs: qubesshm (\d+\.\d\d), "
                         r"waypipe (\d+\.\d\d)$", out, re.M)
    assert len(rtt_cpu) == 2 and all(float(v) > 0 for pair in rtt_cpu for v in pair), out
    ratio_lines = re.findall(r"^qubesshm / waypipe: added round-trip latency (-?\d+\.\d\d|n/a), "
                             r"added burst time (-?\d+\.\d\d|n/a), relay CPU per message "
                             r"(\d+\.\d\d|n/a)$", out, re.M)
    assert len(ratio_lines) == 2, out
    assert len(re.findall(r"^qubesshm / waypipe in round trips: relay CPU per message "
                          r"(\d+\.\d\d|n/a)$", out, re.M)) == 2, out
    for key in ("added round-trip latency", "added burst time", "relay CPU per message",
                "relay CPU per message in round trips"):
        assert re.search(rf"^  qubesshm / waypipe, {key}: (-?\d+\.\d\d|n/a) \(runs: ", out,
                         re.M), (key, out)


def test_bench_relay_can_leave_placement_to_the_scheduler(weston: HeadlessWeston) -> None:
    out = bench(weston, "--round-trips", "50", "--burst", "500", "--bursts", "1",
                "--repeats", "1", "--no-waypipe", "--placement", "free")
    assert re.search(r"^placement: left to the scheduler \(CPUs? [\d, ]+\): a round trip "
                     r"then depends on whether its wake-ups crossed CPUs$", out, re.M), out
    assert re.search(r"^direct +[\d.]+", out, re.M), out


def test_cpu_seconds_counts_descendants_and_skips_processes_that_are_gone() -> None:
    from qubesshm.bench.processes import cpu_seconds, descendants
    # A child whose own child burns 0.3 s of CPU, then waits: that CPU counts for the
    # child; a pid that does not exist counts nothing and raises nothing.
    burn = ("import sys, time\nt = time.process_time()\n"
            "while time.process_time() - t < 0.3: pass\nprint(1, flush=True)\n"
            "sys.stdin.read()\n")
    child = subprocess.Popen([sys.executable, "-c",
                              "import subprocess, sys; subprocess.run([sys.executable, '-c', "
                              f"{burn!r}])"],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    assert child.stdout is not None and child.stdin is not None
    try:
        assert child.stdout.readline().strip() == b"1"
        assert cpu_seconds([child.pid]) >= 0.3
        assert len(descendants(child.pid)) == 1  # the grandchild, still waiting
    finally:
        child.stdin.close()
        child.wait()
    assert cpu_seconds([child.pid]) == 0.0
