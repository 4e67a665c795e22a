"""``qubesshm bench churn`` end to end on a small configuration, against Weston."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from qubesshm.bench.churn import PolicyResult, plot, set_ratios
from qubesshm.headless import HeadlessWeston

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


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


def test_an_unknown_policy_is_one_clean_line(weston: HeadlessWeston) -> None:
    result = churn_against(weston, "--policies", "recycle,fastest")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "qubesshm bench churn: unknown policy fastest: choose from kernel-default, qubes, "
        "notify, recycle, direct"]


def test_bad_numbers_are_refused_when_parsing() -> None:
    for option, value in (("--rate", "0"), ("--seconds", "-1"), ("--size", "12"),
                          ("--concurrency", "0"), ("--hold", "nan")):
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
