"""The benchmarks' split-proxy path (``--remote``): relay, frames and churn on small
configurations, and the byte-counting pass-through the frames benchmark puts on
each stream.

Each benchmark runs as a user runs it (the ``qubesshm`` command) against the
session's Weston; the tests check that the split proxy's lines are printed with
sane figures, and, as a ratio of bytes rather than any time, that the split
proxy's stream carries far fewer bytes per full-damage frame than waypipe's.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from qubesshm.bench.meter import read_counters
from qubesshm.headless import HeadlessWeston

REPO = Path(__file__).resolve().parent.parent
NUMBER = r"(-?\d+\.\d+)"
needs_waypipe = pytest.mark.skipif(shutil.which("waypipe") is None,
                                   reason="the baseline is waypipe (Debian package 'waypipe')")


def bench(weston: HeadlessWeston, *args: str) -> subprocess.CompletedProcess[str]:
    """``qubesshm bench ARGS --upstream`` the session's Weston."""
    env = {k: v for k, v in weston.env().items() if k != "QUBESSHM_SIM_ROOT"}
    env["PYTHONPATH"] = str(REPO)
    # The timeout only guards against a hang; a passing run takes seconds.
    result = subprocess.run(
        [sys.executable, "-m", "qubesshm", "bench", *args, "--upstream",
         str(weston.socket_path)],
        env=env, cwd=REPO, capture_output=True, text=True, timeout=600, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    return result


def row(out: str, start: str) -> list[str]:
    """The one line of ``out`` that starts with ``start``, after it, split."""
    found = [line[len(start):].split() for line in out.splitlines() if line.startswith(start)]
    assert len(found) == 1, (start, out)
    return found[0]


# -- the meter ------------------------------------------------------------------------------


def test_the_meter_passes_a_commands_stdin_and_stdout_through_and_counts_both(
        tmp_path: Path) -> None:
    counters = tmp_path / "counters"
    data = os.urandom(3_000_000)
    meter = subprocess.Popen(
        [sys.executable, "-m", "qubesshm.bench.meter", "--counters", str(counters), "--",
         "cat"], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    out, _ = meter.communicate(data, timeout=60)
    assert meter.returncode == 0
    assert out == data
    pid, forward, back = read_counters(counters)
    assert (pid, forward, back) == (meter.pid, len(data), len(data))


def read_all(sock: socket.socket, into: bytearray) -> None:
    while chunk := sock.recv(65536):
        into.extend(chunk)


def test_the_meter_joins_each_connection_to_the_far_socket_and_counts_both_ways(
        tmp_path: Path) -> None:
    near, far = tmp_path / "near", tmp_path / "far"
    echo = socket.socket(socket.AF_UNIX)
    echo.bind(str(far))
    echo.listen()

    def serve_echo() -> None:  # answers every byte with two
        for _ in range(2):
            conn, _ = echo.accept()
            with conn:
                while chunk := conn.recv(65536):
                    conn.sendall(chunk + chunk)

    threading.Thread(target=serve_echo, daemon=True).start()
    counters = tmp_path / "counters"
    meter = subprocess.Popen(
        [sys.executable, "-m", "qubesshm.bench.meter", "--counters", str(counters),
         "--listen", str(near), "--connect", str(far)])
    try:
        deadline = time.monotonic() + 30
        while not near.exists():
            assert meter.poll() is None and time.monotonic() < deadline
            time.sleep(0.02)
        sent = 0
        for size in (100_000, 2_000_000):  # two connections, one after the other
            data = os.urandom(size)
            got = bytearray()
            with socket.socket(socket.AF_UNIX) as client:
                client.connect(str(near))
                reader = threading.Thread(target=read_all, args=(client, got))
                reader.start()
                client.sendall(data)
                client.shutdown(socket.SHUT_WR)  # passed on: the echo ends, then the meter
                reader.join(timeout=60)
            assert len(got) == 2 * size
            sent += size
        assert read_counters(counters)[1:] == (sent, 2 * sent)
    finally:
        meter.terminate()
        meter.wait(timeout=30)
        echo.close()


# -- bench relay --remote -----------------------------------------------------------------


def test_bench_relay_remote_prints_the_split_path_and_its_ratios(weston: HeadlessWeston) -> None:
    result = bench(weston, "relay", "--remote", "--round-trips", "50", "--burst", "1000",
                   "--bursts", "1", "--repeats", "2")
    out = result.stdout
    assert re.search(r"^machine: \d+ CPUs \(.+\), load average .* before the run$", out, re.M)
    assert re.search(r"^versions: Python \d+\.\d+\.\d+, ", out, re.M), out
    assert "qubesshm split: serve --remote 'qubesshm host'" in out
    assert out.count("run 1 of 2") == 1 and out.count("run 2 of 2") == 1
    # Every path's row in both runs: rtt, p90, added, burst, added burst, CPU per message.
    split_rows = [line for line in out.splitlines() if line.startswith("qubesshm split ")
                  and re.match(r"qubesshm split +" + r" +".join([NUMBER] * 6) + "$", line)]
    assert len(split_rows) == 2, out
    for line in split_rows:
        rtt, p90, added, burst, _, cpu = (float(v) for v in line.split()[2:])
        assert 0 < rtt <= p90 and burst > 0 and cpu > 0
        assert added > 0, "the split path adds two processes and a stream to a round trip"
    compared = ["qubesshm split / qubesshm"]
    if shutil.which("waypipe") is not None:
        compared.append("qubesshm split / waypipe")
    for pair in compared:
        lines = [line for line in out.splitlines() if line.startswith(pair + ": ")]
        assert len(lines) == 2, (pair, out)
        assert re.match(pair + r": added round-trip latency \d+\.\d\d, added burst time "
                        r"(-?\d+\.\d\d|n/a), relay CPU per message \d+\.\d\d$", lines[0])
        for key in ("added round-trip latency", "added burst time", "relay CPU per message"):
            assert re.search(rf"^  {pair}, {key}: (-?\d+\.\d\d|n/a) \(runs: ", out, re.M), out
    assert re.search(r"^  round trip through qubesshm split / direct: \d+\.\d\dx$", out, re.M)
    # The other paths keep their lines.
    assert re.search(r"^qubesshm +" + r" +".join([NUMBER] * 6) + "$", out, re.M), out
    assert re.search(r"^  round trip through qubesshm / direct: \d+\.\d\dx$", out, re.M)
    assert "qubesshm split: no warnings or errors in its log" in out, out
    assert re.search(r"^load average [\d.]+, [\d.]+, [\d.]+ after the run$", out, re.M)


# -- bench frames --remote ----------------------------------------------------------------

CASES = ("full, paced", "full, unpaced", "static, paced", "static, unpaced",
         "moving, paced", "moving, unpaced")


@needs_waypipe
def test_bench_frames_remote_counts_the_bytes_over_each_stream(weston: HeadlessWeston,
                                                               tmp_path: Path) -> None:
    figures = tmp_path / "frames.json"
    result = bench(weston, "frames", "--remote", "--size", "320x240", "--frames", "10",
                   "--warmup", "4", "--repeats", "1", "--json", str(figures))
    out = result.stdout
    data: dict[str, Any] = json.loads(figures.read_text())
    damaged = {"full": 320 * 240 * 4, "static": 64 * 64 * 4}
    for case in CASES:
        for path in ("direct", "qubesshm", "qubesshm split", "waypipe"):
            fields = row(out, f"{case:<18} {path:<14} ")  # the path column fits the longest
            assert float(fields[0]) > 0, (case, path, fields)  # fps
        split_cpu = row(out, f"{case:<18} qubesshm split ")[2]
        assert float(split_cpu) > 0, "serve and the host half relayed"
        stream = data[case]["stream"]
        split = stream["qubesshm split"]["bytes_per_frame"][0]
        waypipe = stream["waypipe"]["bytes_per_frame"][0]
        assert split > 0 and waypipe > 0, stream
        by_serve = stream["qubesshm split"]["by_serve"][0]
        assert stream["waypipe"]["by_serve"] == [], "waypipe has no stats of its own"
        meter_cpu = [stream[p]["meter_cpu_ms_per_frame"][0] for p in ("qubesshm split",
                                                                      "waypipe")]
        assert all(ms >= 0 for ms in meter_cpu), meter_cpu
        # The table shows the JSON's figures.
        printed = row(out.split("\nbytes over the stream per frame")[1], f"{case:<18} ")
        assert printed == [f"{data[case]['direct']['damaged_bytes_per_frame']:.0f}",
                           f"{split:.1f}", f"{by_serve:.1f}", f"{waypipe:.1f}",
                           f"{split / waypipe:.6f}", f"{meter_cpu[0]:.3f},",
                           f"{meter_cpu[1]:.3f}"]
        # The pass-through counts what serve's own stream counters count (within a frame
        # or two of messages still on their way when a count was read).
        assert abs(split - by_serve) * 10 <= split, (case, split, by_serve)
        kind = case.split(",")[0]
        if kind in damaged:
            # The split stream carries messages and grant refs, never the pixels.
            assert split < damaged[kind] / 10, (case, split)
        if kind == "full":
            # waypipe sends every changed pixel (it diffs: a moving square's old place,
            # repainted as it was three frames ago, may not count).
            assert waypipe >= damaged[kind], (case, waypipe)
    for case in ("full, paced", "full, unpaced"):
        stream = data[case]["stream"]
        share = (stream["qubesshm split"]["bytes_per_frame"][0]
                 / stream["waypipe"]["bytes_per_frame"][0])
        assert share < 0.01, (case, share)
        assert f"goal (qubesshm split), {case}: bytes per 320x240 frame over the stream " \
            f"{share:.4%} of waypipe's (goal <= 1%): met" in out, out
    assert "goals (qubesshm split):" in out and "goals (qubesshm):" in out
    assert "qubesshm split: no warnings or errors in its log" in out, out


def test_frames_remote_is_not_for_agent_mode(weston: HeadlessWeston) -> None:
    env = dict(weston.env(), PYTHONPATH=str(REPO))
    result = subprocess.run(
        [sys.executable, "-m", "qubesshm", "bench", "frames", "--remote", "--mode", "agent"],
        env=env, capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == (
        "qubesshm bench frames: --remote measures the split proxy (the proxy mode): not "
        "with --mode agent")


# -- bench churn --remote -----------------------------------------------------------------


def test_bench_churn_remote_runs_each_proxy_policy_split_too(weston: HeadlessWeston,
                                                             tmp_path: Path) -> None:
    out_json = tmp_path / "churn.json"
    result = bench(weston, "churn", "--remote", "--rate", "10", "--seconds", "1", "--size",
                   "200x150", "--drain-wait", "1", "--policies", "recycle,direct", "--json",
                   str(out_json))
    data = json.loads(out_json.read_text())
    assert data["remote"] is True
    policies = data["policies"]
    assert list(policies) == ["direct", "recycle", "recycle split"]
    for name in ("recycle", "recycle split"):
        p = policies[name]
        assert p["windows"] == 10 and p["failed"] is None, p
        assert p["leaked"] == 0 and p["final_live"] == 0 and p["final_deferred"] == 0
        assert p["series"]["t"], "sampled from the VM side's stats"
        assert p["peak_live"] > 0 and p["grants_per_window"] > 0
        assert p["ratio_to_direct"] == pytest.approx(
            p["windows_per_second"] / policies["direct"]["windows_per_second"])
        printed = row(result.stdout, f"{name:<15} ")  # the policy column: 15 wide
        assert printed[:3] == [f"{p['windows_per_second']:.1f}", f"{p['ratio_to_direct']:.2f}",
                               f"{p['grants_per_window']:.1f}"], printed
    # Animations off: the split proxy recycles as the unsplit one does.
    assert policies["recycle split"]["cache_hits"] == policies["recycle"]["cache_hits"] == 9
    assert "recycle split: no warnings or errors in its log" in result.stdout


def test_churn_remote_needs_a_proxy_policy(weston: HeadlessWeston) -> None:
    env = dict(weston.env(), PYTHONPATH=str(REPO))
    result = subprocess.run(
        [sys.executable, "-m", "qubesshm", "bench", "churn", "--remote", "--policies",
         "direct"], env=env, capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == (
        "qubesshm bench churn: --remote runs the proxy policies through the split proxy: "
        "choose at least one of kernel-default, qubes, notify, recycle")
