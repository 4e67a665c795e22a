"""``qubesshm bench churn`` end to end on a small configuration, against Weston, and
its agent policy against the GUI-daemon emulator on a private Xvfb."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from qubesshm.bench.churn import (
    PolicyResult,
    _client,
    plot,
    record,
    set_ratios,
    spread_warnings,
)
from qubesshm.bench.churn_agent import not_shown
from qubesshm.bench.processes import listener_pid
from qubesshm.headless import HeadlessWeston

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
needs_xvfb = pytest.mark.skipif(shutil.which("Xvfb") is None,
                                reason="the agent policy's emulator shows windows on Xvfb")


def test_bench_churn_writes_its_table_json_and_plot(weston: HeadlessWeston,
                                                    tmp_path: Path) -> None:
    out_json, out_png = tmp_path / "churn.json", tmp_path / "churn.png"
    result = subprocess.run(
        [sys.executable, "-m", "qubesshm", "bench", "churn", "--upstream", weston.socket_name,
         "--rate", "10", "--seconds", "1", "--size", "200x150", "--hold", "0.5",
         "--drain-wait", "1", "--policies", "kernel-default,recycle,direct",
         "--json", str(out_json), "--plot", str(out_png)],
        env=weston.env(), capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stderr
    data = json.loads(out_json.read_text())
    assert data["windows"] == 10
    policies = data["policies"]
    assert set(policies) == {"kernel-default", "recycle", "direct"}
    for name in ("kernel-default", "recycle"):
        p = policies[name]
        assert p["windows"] == 10 and p["windows_per_second"] > 0
        assert p["leaked"] == 0
        assert len(p["series"]["t"]) == len(p["series"]["live"]) == len(p["series"]["deferred"])
        assert p["series"]["t"] == sorted(p["series"]["t"])
    # Ending grants while the GUI domain still maps them fills the deferred list;
    # recycling and unmap notify keep it empty.
    assert policies["kernel-default"]["peak_deferred"] > policies["recycle"]["peak_deferred"]
    assert policies["recycle"]["peak_deferred"] == 0
    recycled, at_once = (policies[p]["grants_per_window"] for p in ("recycle", "kernel-default"))
    assert recycled < at_once
    # Recycling: every window after the first served from the cache (animations off).
    assert policies["recycle"]["cache_hits"] == 9 and policies["kernel-default"]["cache_hits"] == 0
    direct = policies["direct"]["windows_per_second"]
    for name in ("kernel-default", "recycle"):
        p = policies[name]
        assert p["ratio_to_direct"] == pytest.approx(p["windows_per_second"] / direct)
        # The table shows the JSON's figures: windows/s, the ratio, grants per window.
        row = next(line.split() for line in result.stdout.splitlines()
                   if line.startswith(name + " "))
        assert row[1:4] == [f"{p['windows_per_second']:.1f}", f"{p['ratio_to_direct']:.2f}",
                            f"{p['grants_per_window']:.1f}"], row
    assert data["compositor"] == f"compositor {weston.socket_name}"
    assert f"compositor: {weston.socket_path} (given with --upstream" in result.stdout
    assert out_png.read_bytes()[:8] == PNG_SIGNATURE
    with Image.open(out_png) as image:
        assert image.format == "PNG" and image.size[0] > 300


def test_the_plot_has_one_line_per_proxied_policy() -> None:
    results = {}
    for number, name in enumerate(["kernel-default", "qubes", "notify", "recycle"]):
        r = PolicyResult(name)
        r.series = {"t": [0.0, 1.0], "live": [0, 10 * number], "deferred": [0, number]}
        results[name] = r
    results["direct"] = PolicyResult("direct")
    args = argparse.Namespace(size="200x150", rate=10.0, seconds=1.0, hold=0.0)
    figure = plot(results, args)
    live, deferred = figure.axes
    assert [line.get_label() for line in live.lines] == list(results)[:4]
    assert [line.get_label() for line in deferred.lines] == list(results)[:4]


def churn_against(weston: HeadlessWeston, *args: str) -> subprocess.CompletedProcess[str]:
    """``bench churn --upstream`` the test Weston, with ``args``."""
    return subprocess.run(
        [sys.executable, "-m", "qubesshm", "bench", "churn", "--upstream", weston.socket_name,
         *args], env=weston.env(), capture_output=True, text=True, timeout=60, check=False)


def test_listener_pid_names_the_process_on_a_socket(tmp_path: Path) -> None:
    path = tmp_path / "listening"
    listener = subprocess.Popen(
        [sys.executable, "-c", "import socket, sys, time\n"
         "s = socket.socket(socket.AF_UNIX)\ns.bind(sys.argv[1])\ns.listen()\n"
         "print('up', flush=True)\ntime.sleep(60)", str(path)],
        stdout=subprocess.PIPE, text=True)
    try:
        assert listener.stdout is not None and listener.stdout.readline() == "up\n"
        assert listener_pid(path) == listener.pid
    finally:
        listener.kill()
        listener.wait()
    assert listener_pid(path) is None  # nobody answers any more
    assert listener_pid(tmp_path / "absent") is None


def test_the_churn_clients_output_cannot_stop_it_however_long_the_run() -> None:
    # A progress line a window: 1500 windows on three paths wrote more than a pipe holds,
    # and a pipe nobody read while the bench sampled stopped the client mid-run.
    lines = 40_000  # about 1.3 MB, twenty pipes' worth
    with _client([sys.executable, "-c", "import sys\n"
                  f"for n in range({lines}): print(f'opened {{n + 1}} on /some/display')\n"
                  "print('churn: done', file=sys.stderr)"], dict(os.environ)) as client:
        assert client.process.wait(timeout=120) == 0
        out, err = client.output()
    assert out.count("\n") == lines and out.endswith(f"opened {lines} on /some/display\n")
    assert err == "churn: done\n"


def test_an_unknown_policy_is_one_clean_line(weston: HeadlessWeston) -> None:
    result = churn_against(weston, "--policies", "recycle,fastest")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "qubesshm bench churn: unknown policy fastest: choose from kernel-default, qubes, "
        "notify, recycle, agent, direct"]


def test_bad_numbers_are_refused_when_parsing() -> None:
    for option, value in (("--rate", "0"), ("--seconds", "-1"), ("--size", "12"),
                          ("--concurrency", "0"), ("--hold", "nan"), ("--block", "-1"),
                          ("--block", "two")):
        result = subprocess.run(
            [sys.executable, "-m", "qubesshm", "bench", "churn", option, value],
            capture_output=True, text=True, timeout=60, check=False)
        assert result.returncode == 2, (option, result.stderr)
        assert f"argument {option}:" in result.stderr and "Traceback" not in result.stderr


def test_bench_churn_starts_its_own_weston_with_its_animations(weston: HeadlessWeston,
                                                               tmp_path: Path) -> None:
    """Not whatever $WAYLAND_DISPLAY names: a Weston of its own, as users run it (its
    close animation keeps each closed window's last buffer about a second), said in
    its first line; windows closed under the animation are still recycled."""
    out_json = tmp_path / "churn.json"
    result = subprocess.run(
        [sys.executable, "-m", "qubesshm", "bench", "churn", "--rate", "10", "--seconds",
         "4", "--size", "320x240", "--drain-wait", "3", "--policies", "recycle,direct",
         "--json", str(out_json)],
        env=weston.env(), capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[0] == (
        "compositor: a headless Weston started for this run (pixman renderer, 1920x1080, "
        "desktop shell with its shipped animations)")
    data = json.loads(out_json.read_text())
    assert data["compositor"] == "headless Weston, animations on"
    recycle = data["policies"]["recycle"]
    assert recycle["windows"] == 40 and recycle["leaked"] == 0
    # Released at the end of their fade-out, closed windows' buffers went to the cache
    # and later windows took them.
    assert recycle["cache_hits"] >= 1, recycle
    assert recycle["final_deferred"] == 0 and recycle["final_live"] == 0


def test_bench_churn_unpaced_runs_each_policy_repeatedly_and_prints_the_medians(
        weston: HeadlessWeston, tmp_path: Path) -> None:
    """--unpaced: windows drawn once and closed after one round trip, as fast as they
    go, the paths taking turns of --block windows; every run of every path is printed,
    then the medians and their ratios."""
    out_json = tmp_path / "churn.json"
    result = churn_against(weston, "--unpaced", "--windows", "20", "--repeats", "2",
                           "--block", "8", "--policies", "recycle,direct",
                           "--drain-wait", "3", "--json", str(out_json))
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "run 1 of 2:" in out and "run 2 of 2:" in out
    assert out.count("20 windows of 400x300 unpaced (no frame callbacks: one "
                     "wl_display.sync round trip a window, the paths taking turns of 8)") == 2
    assert ("medians of 2 runs (in each run one client took turns of 8 windows between the "
            "paths):") in out
    data = json.loads(out_json.read_text())
    assert data["windows"] == 20 and data["config"]["unpaced"] is True
    runs = data["runs"]
    assert len(runs) == 2
    for run in runs:
        recycle = run["recycle"]
        assert recycle["windows"] == 20 and recycle["failed"] is None
        assert recycle["leaked"] == 0 and recycle["final_deferred"] == 0
        # Each window's buffer is destroyed with it: its output goes back to the cache
        # at once, so every window after the first reuses one.
        assert recycle["cache_hits"] >= 19, recycle
    rates = [run["recycle"]["windows_per_second"] for run in runs]
    ratios = [run["recycle"]["ratio_to_direct"] for run in runs]
    medians = data["medians"]["recycle"]
    assert medians["windows_per_second"] == pytest.approx(sorted(rates)[0] / 2
                                                          + sorted(rates)[1] / 2)
    assert medians["ratio_to_direct"] == pytest.approx(sum(ratios) / 2)
    line = next(line for line in out.splitlines() if line.startswith("  recycle: "))
    assert line == (f"  recycle: {medians['windows_per_second']:.1f} windows/s, "
                    f"{medians['ratio_to_direct']:.2f} x direct (runs: "
                    + " ".join(f"{r:.1f}" for r in rates) + " windows/s; "
                    + " ".join(f"{r:.2f}" for r in ratios) + " x direct)")
    # Whatever the runs' spread, the JSON's warnings are the ones printed.
    printed = [line.removeprefix("warning: ") for line in out.splitlines()
               if line.startswith("warning: ")]
    assert printed == data["warnings"]
    # CPU a window of each process on each path, while the client ran: the client's own
    # (at most its wall time a window), serve's; not the test's Weston's, which works for
    # both paths in each turn.
    cpu_lines = lines_starting(out, "CPU a window, ms (the scheduler's")
    assert len(cpu_lines) == 2
    for run, cpu_line in zip(runs, cpu_lines, strict=True):
        for name, sides in {"recycle": ["client", "qubesshm"], "direct": ["client"]}.items():
            cpu = run[name]["cpu_ms_per_window"]
            assert list(cpu) == sides, cpu
            assert all(ms > 0 for ms in cpu.values()), cpu
            wall = run[name]["seconds"] * 1000 / run[name]["windows"]
            assert cpu["client"] <= wall, (cpu, wall)
            shown = ", ".join(f"{side} {ms:.2f}" for side, ms in cpu.items())
            assert f"{name}: {shown}" in cpu_line, cpu_line
    median_line = lines_starting(out, "  CPU a window, ms (medians of the runs")
    serve_cpu = sorted(run["recycle"]["cpu_ms_per_window"]["qubesshm"] for run in runs)
    assert len(median_line) == 1
    assert f"qubesshm {sum(serve_cpu) / 2:.2f}" in median_line[0], median_line


def test_unpaced_paths_one_after_the_other_count_the_compositors_cpu_too(
        weston: HeadlessWeston, tmp_path: Path) -> None:
    """--block 0: each path alone with its own client, so the compositor's CPU is the
    path's."""
    out_json = tmp_path / "churn.json"
    result = churn_against(weston, "--unpaced", "--windows", "10", "--repeats", "1",
                           "--block", "0", "--policies", "recycle,direct",
                           "--drain-wait", "3", "--json", str(out_json))
    assert result.returncode == 0, result.stderr
    assert "the paths taking turns" not in result.stdout
    policies = json.loads(out_json.read_text())["policies"]
    for name, sides in {"recycle": ["client", "qubesshm", "compositor"],
                        "direct": ["client", "compositor"]}.items():
        cpu = policies[name]["cpu_ms_per_window"]
        assert list(cpu) == sides and all(ms > 0 for ms in cpu.values()), cpu


def test_unpaced_and_paced_options_do_not_mix() -> None:
    for options, said in (
            (["--unpaced", "--rate", "5"], "--rate and --seconds pace the windows"),
            (["--unpaced", "--seconds", "5"], "--rate and --seconds pace the windows"),
            (["--windows", "5"], "--windows counts the windows of --unpaced"),
            (["--block", "5"], "--block takes turns between the paths of --unpaced")):
        result = subprocess.run(
            [sys.executable, "-m", "qubesshm", "bench", "churn", *options],
            capture_output=True, text=True, timeout=60, check=False)
        assert result.returncode == 2, (options, result.stderr)
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and said in lines[0], (options, lines)
        assert "compositor:" not in result.stdout, "checked before any work"


def test_output_files_are_checked_before_the_run(tmp_path: Path) -> None:
    for option in ("--json", "--plot"):
        result = subprocess.run(
            [sys.executable, "-m", "qubesshm", "bench", "churn", option,
             str(tmp_path / "nodir" / "x.png")],
            capture_output=True, text=True, timeout=60, check=False)
        assert result.returncode == 2, result.stderr
        assert result.stderr.splitlines()[-1] == (
            f"qubesshm bench churn: error: argument {option}: {tmp_path / 'nodir'} does not "
            "exist (or is not a directory): make it first")
        assert "compositor:" not in result.stdout, "checked before any work"


def test_animations_go_with_the_bench_own_weston_only(weston: HeadlessWeston) -> None:
    result = churn_against(weston, "--animations", "off")
    assert result.returncode == 2
    assert "--animations sets up the Weston the benchmark starts" in result.stderr


def test_ratios_are_each_policys_rate_over_directs() -> None:
    results = {name: PolicyResult(name, windows_per_second=rate)
               for name, rate in (("direct", 8.0), ("recycle", 6.0), ("kernel-default", 0.5))}
    set_ratios(results)
    assert [r.ratio_to_direct for r in results.values()] == [1.0, 0.75, 0.0625]
    alone = {"recycle": PolicyResult("recycle", windows_per_second=6.0)}
    set_ratios(alone)
    assert alone["recycle"].ratio_to_direct is None, "no direct run: no ratio"


# -- the agent policy: qubesshm agent + qubesshm guid-emulator on a private Xvfb ---------------


def churn_agent(tmp_path: Path, *args: str) -> tuple[subprocess.CompletedProcess[str],
                                                   dict[str, Any]]:
    """``bench churn --policies agent`` with ``args``: its output and its JSON."""
    out_json = tmp_path / "churn.json"
    result = subprocess.run(
        [sys.executable, "-m", "qubesshm", "bench", "churn", "--policies", "agent",
         "--json", str(out_json), *args],
        capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    data: dict[str, Any] = json.loads(out_json.read_text())
    return result, data


def lines_starting(text: str, start: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith(start)]


@needs_xvfb
def test_the_agent_policy_drains_within_late_timeout_plus_one_second(tmp_path: Path) -> None:
    """A daemon that lets go and ACKs at once: grants bounded, every area released by
    the ACK order, the deferred backlog empty within --late-timeout + 1 s of the last
    close, as the bench measures it; the table, the agent's line and the plot show it."""
    out_png = tmp_path / "churn.png"
    result, data = churn_agent(tmp_path, "--rate", "10", "--seconds", "2", "--size", "320x240",
                               "--late-timeout", "1", "--drain-wait", "5", "--plot", str(out_png))
    assert data["config"]["late_timeout"] == 1.0 and data["config"]["ack_delay"] == 0.0
    assert data["compositor"] == "none (the agent alone)"
    agent = data["policies"]["agent"]
    assert agent["windows"] == 20 and agent["failed"] is None
    series = agent["series"]
    assert len(series["t"]) == len(series["live"]) == len(series["deferred"]) \
        == len(series["pending_acks"]) > 10
    # Bounded: a few windows' areas at most (320x240: 75 pages), however many windows.
    assert 75 <= agent["peak_live"] <= 4 * 75, agent["peak_live"]
    assert agent["final_live"] == 0 and agent["leaked"] == 0
    assert agent["final_deferred"] == 0 and not agent["drain_estimated"]
    assert agent["drain_bound_seconds"] == 2.0
    assert agent["drain_seconds"] <= agent["drain_bound_seconds"]
    assert agent["drained_in_bound"] is True
    # Every dump (20 windows' and the barriers) ACKed, each ACK timed.
    assert agent["dumps"] >= 20 and agent["acks"] == agent["dumps"] + agent["barriers"]
    assert agent["ack_latency_ms"]["count"] == agent["acks"]
    assert series["pending_acks"][-1] == 0
    assert agent["wrong_releases"] == 0 and agent["late_releases"] == 0
    assert agent["confirmed_releases"] >= 20
    # The agent is the client's compositor; the GUI domain's work is the emulator's and
    # its X server's, each counted apart.
    cpu = agent["cpu_ms_per_window"]
    assert list(cpu) == ["client", "qubesshm", "emulator", "X server"], cpu
    assert all(ms > 0 for ms in cpu.values()), cpu
    row = lines_starting(result.stdout, "agent ")
    # Final live, peak deferred, final deferred, and the drain in seconds.
    assert len(row) == 1 and row[0].split()[6:10] == ["0", "0", "0", "0.0"], row
    assert lines_starting(result.stdout, "deferred backlog empty within") == [
        "deferred backlog empty within --late-timeout + 1 s = 2 s of the last close: agent"]
    summary = lines_starting(result.stdout, "agent: ")[-1]
    assert summary.startswith(f"agent: {agent['acks']} ACKs of {agent['dumps']} dumps + "
                              f"{agent['barriers']} barriers"), summary
    assert "0 late" in summary and "0 of them wrongly" in summary
    assert result.stdout.splitlines()[0] == (
        "compositor: none (the agent policy serves its client itself)")
    assert "private Xvfb" in lines_starting(result.stdout, "agent: ")[0]
    assert out_png.read_bytes()[:8] == PNG_SIGNATURE


@needs_xvfb
def test_a_late_daemon_defers_the_agents_areas_in_batches_then_drains(tmp_path: Path) -> None:
    """A daemon that keeps let-go dumps mapped 3 s (the emulator's --hold; its ACKs,
    which say the X server let go, wait as long): what is unconfirmed after
    --late-timeout 1 s goes to deferred reclaim in batches, free_per_iteration is
    raised while the backlog lasts and restored after, and the backlog drains once the
    daemon lets go; the bench's drain figure says it took longer than --late-timeout
    + 1 s."""
    result, data = churn_agent(tmp_path, "--rate", "10", "--seconds", "2", "--size", "800x600",
                               "--hold", "3", "--late-timeout", "1", "--drain-wait", "15")
    agent = data["policies"]["agent"]
    deferred = agent["series"]["deferred"]
    assert agent["windows"] == 20 and agent["failed"] is None
    assert agent["peak_deferred"] > 0 and agent["final_deferred"] == 0
    first = next(i for i, d in enumerate(deferred) if d > 0)
    assert deferred[-1] == 0 and any(d == 0 for d in deferred[first:])
    assert not agent["drain_estimated"] and agent["drained_in_bound"] is False
    assert agent["drain_seconds"] > agent["drain_bound_seconds"] == 2.0
    assert agent["late_releases"] > 0 and agent["defer_batches"] >= 2
    assert agent["fpi_raises"] >= 1 and agent["fpi_restores"] >= 1
    assert agent["leaked"] == 0 and agent["final_live"] == 0 and agent["wrong_releases"] == 0
    assert agent["peak_pending_acks"] > 2
    assert lines_starting(result.stdout, "deferred backlog empty within") == [
        "deferred backlog empty within --late-timeout + 1 s = 2 s of the last close: none; "
        "not: agent"]
    summary = lines_starting(result.stdout, "agent: ")[-1]
    assert (f"free_per_iteration raised {agent['fpi_raises']}x, restored "
            f"{agent['fpi_restores']}x") in summary
    assert "mappings held 3 s after let go" in result.stdout


@needs_xvfb
def test_late_acks_alone_make_areas_late_but_defer_nothing(tmp_path: Path) -> None:
    """A daemon that lets go at once but writes its ACKs 3 s late (--ack-delay): its
    areas are late after --late-timeout 1 s, and ending them defers nothing, since
    nothing maps them: the backlog stays empty, within the bound."""
    result, data = churn_agent(tmp_path, "--rate", "10", "--seconds", "2", "--size", "320x240",
                               "--ack-delay", "3", "--late-timeout", "1", "--drain-wait", "15")
    agent = data["policies"]["agent"]
    assert agent["windows"] == 20 and agent["leaked"] == 0 and agent["final_live"] == 0
    assert agent["ack_latency_ms"]["p50"] >= 3000 * 0.99
    assert agent["late_releases"] > 0 and agent["peak_pending_acks"] > 2
    assert agent["peak_deferred"] == 0 and agent["drained_in_bound"] is True
    assert "ACKs written 3 s late" in result.stdout


def test_bench_churn_help_names_the_agent_policy_and_its_options() -> None:
    result = subprocess.run([sys.executable, "-m", "qubesshm", "bench", "churn", "--help"],
                            capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    text = " ".join(result.stdout.split())
    assert "kernel-default, qubes, notify, recycle, agent, direct" in text
    assert "qubesshm guid-emulator" in text and "Xvfb" in text
    for option in ("--late-timeout S", "--ack-delay S", "--hold S"):
        assert option in text, option


def test_the_agent_policy_without_xvfb_is_one_line_before_anything_starts(
        tmp_path: Path) -> None:
    empty = tmp_path / "bin"
    empty.mkdir()
    result = subprocess.run(
        [sys.executable, "-m", "qubesshm", "bench", "churn", "--policies", "recycle,agent"],
        env=dict(os.environ, PATH=str(empty)), capture_output=True, text=True, timeout=60,
        check=False)
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(
        "qubesshm bench churn: Xvfb is not installed"), result.stderr
    assert "compositor:" not in result.stdout, "said before any work"


def agent_stats(live: int, deferred: int, barriers: int, pending: int) -> dict[str, Any]:
    return {"grants": {"live": live, "deferred": deferred},
            "daemon": {"barriers": barriers, "pending_acks": pending}}


def test_agent_samples_count_window_areas_not_the_barrier() -> None:
    """The agent keeps its one-page barrier area once it sent a barrier dump: the
    series count the windows' areas, so that they end at 0 as the proxies' do."""
    r = PolicyResult("agent")
    r.series["pending_acks"] = []
    record(agent_stats(0, 0, 0, 0), 0.0, r)
    record(agent_stats(151, 0, 0, 2), 0.1, r)
    record(agent_stats(301, 300, 4, 3), 0.2, r)
    record(agent_stats(1, 0, 5, 0), 0.3, r)
    assert r.series == {"t": [0.0, 0.1, 0.2, 0.3], "live": [0, 151, 300, 0],
                        "deferred": [0, 0, 300, 0], "pending_acks": [0, 2, 3, 0]}
    proxy = PolicyResult("recycle")
    record(agent_stats(301, 0, 4, 3) | {"daemon": {}}, 0.0, proxy)
    assert proxy.series == {"t": [0.0], "live": [301], "deferred": [0]}


def test_the_plot_adds_pending_acks_for_the_agent() -> None:
    results = {}
    for name in ("recycle", "agent"):
        r = PolicyResult(name)
        r.series = {"t": [0.0, 1.0], "live": [0, 10], "deferred": [0, 1]}
        results[name] = r
    agent = results["agent"]
    agent.series["pending_acks"] = [0, 3]
    agent.ack_latency_ms = {"count": 3, "p50": 12.0, "p99": 30.0, "max": 31.0}
    args = argparse.Namespace(size="200x150", rate=10.0, seconds=1.0, hold=0.0,
                              late_timeout=2.0, ack_delay=0.5)
    figure = plot(results, args)
    live, deferred, acks = figure.axes
    assert [line.get_label() for line in live.lines] == ["recycle", "agent"]
    assert [line.get_label() for line in deferred.lines] == ["recycle", "agent"]
    assert [line.get_label() for line in acks.lines] == [
        "agent (ACK latency p50 12 ms, max 31 ms)"]
    assert list(acks.lines[0].get_ydata()) == [0, 3]
    assert "ACKs 0.5 s late" in live.get_title()


def test_windows_the_agent_did_not_send_are_a_failure_with_its_reason(tmp_path: Path) -> None:
    """The churn client sees no error when the agent keeps a window from the daemon
    (it says why in its log): the bench must not count such a run as a good one."""
    log = tmp_path / "agent.log"
    log.write_text("qubesshm: agent for Wayland apps on ...\nqubesshm: window <toplevel 3> is "
                   "not shown: a window image of 900 pages is more than what a client may "
                   "hold (512 pages); raise --client-pages\n\n")
    stats = {"daemon": {"created": 2}}
    assert not_shown(stats, 3, log) == (
        "the agent sent 2 of the client's 3 windows to the GUI daemon (qubesshm: window "
        "<toplevel 3> is not shown: a window image of 900 pages is more than what a client "
        "may hold (512 pages); raise --client-pages)")
    assert not_shown({"daemon": {"created": 3}}, 3, log) is None


def _runs(direct: list[float], recycle: list[float]) -> list[dict[str, PolicyResult]]:
    runs = []
    for d, r in zip(direct, recycle, strict=True):
        run = {"recycle": PolicyResult("recycle", windows_per_second=r),
               "direct": PolicyResult("direct", windows_per_second=d)}
        set_ratios(run)
        runs.append(run)
    return runs


def test_medians_that_spread_get_a_warning_naming_the_spread() -> None:
    """Runs whose ratios to direct lie more than 0.1 apart, or whose direct rate moved
    by more than a fifth, make medians not to quote alone: each is said."""
    assert spread_warnings(_runs([240, 245, 250], [210, 215, 220])) == []
    assert spread_warnings(_runs([240], [150])) == []  # one run: no spread
    spread = spread_warnings(_runs([240, 240, 240], [220, 180, 210]))
    assert len(spread) == 1 and spread[0].startswith(
        "recycle: the runs' ratios to direct spread from 0.75 to 0.92, more than 0.1")
    moved = spread_warnings(_runs([150, 240, 240], [135, 216, 216]))
    assert moved == ["direct's rate moved from 150.0 to 240.0 windows/s between runs, more "
                     "than 1.2x: the machine changed under the run"]

