"""``qubesshm bench churn`` end to end on a small configuration, against Weston."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from PIL import Image

from qubesshm.bench.churn import PolicyResult, plot
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
    assert policies["direct"]["ratio_to_direct"] == 1.0
    assert "kernel-default" in result.stdout and "x direct" in result.stdout
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


def test_an_unknown_policy_is_one_clean_line(weston: HeadlessWeston) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "qubesshm", "bench", "churn", "--upstream", weston.socket_name,
         "--policies", "recycle,fastest"], env=weston.env(), capture_output=True, text=True,
        timeout=60, check=False)
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
