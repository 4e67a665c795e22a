"""``qubesshm bench frames --mode agent``: a short real run, its figures and ratios.

The benchmark is run as a user runs it (the ``qubesshm`` command, its own
headless Weston, private Xvfb, agent and emulator) at a small size with one run
per case; the test checks that every figure is printed, that the ratios printed
are the ones the figures give (from ``--json``), and that the agent rendered
every timed frame. No figure is held to a threshold: speed is the benchmark's to
report. Usage mistakes and a missing Xvfb are one clear line each.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
from procs import run_bench

FRAMES = 20
CASES = ("full, paced", "full, unpaced")
NUMBER = r"(\d+\.\d+)"


@pytest.mark.skipif(shutil.which("Xvfb") is None or shutil.which("weston") is None,
                    reason="needs Xvfb and weston")
def test_agent_mode_prints_rates_cpu_and_their_ratios(tmp_path: Path) -> None:
    figures = tmp_path / "frames.json"
    result = run_bench(tmp_path, "frames", "--mode", "agent", "--size", "320x240",
                       "--repeats", "1", "--frames", str(FRAMES), "--warmup", "4",
                       "--animations", "off", "--json", str(figures))
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert "Traceback" not in out + result.stderr
    assert re.search(r"^machine: \d+ CPUs \(.+\), load average [\d.]+, [\d.]+, [\d.]+ before "
                     r"the run$", out, re.M), out
    assert re.search(r"^weston: weston \d+\.\d+", out, re.M), out
    assert re.search(r"^load average [\d.]+, [\d.]+, [\d.]+ after the run$", out, re.M), out
    assert "headless Weston started for this run (pixman renderer, 320x240, desktop shell, " \
        "animations off)" in out
    assert re.search(r"^agent path: qubesshm agent \(--refresh 60, .*\) \+ qubesshm "
                     r"guid-emulator on a private Xvfb on :\d+ \(1920x1080x24\)$", out, re.M), out
    data = json.loads(figures.read_text())
    assert data["mode"] == "agent" and data["size"] == [320, 240] and data["refresh"] == 60
    for case in CASES:
        direct, agent = data[case]["direct"], data[case]["agent"]
        copy = data[case]["plain_copy_ms"]
        assert copy > 0
        # Paced, every timed frame was one the agent drew (copied and sent to the
        # emulator); unpaced, it drew at most one a refresh, the newest.
        if "unpaced" in case:
            assert 1 <= agent["frames_rendered"][0] <= FRAMES, agent
        else:
            assert agent["frames_rendered"] == [FRAMES], agent
        for runs in (direct, agent):
            assert len(runs["fps"]) == 1 and runs["fps"][0] > 0, runs
        # The agent copies every frame: it spends CPU on each; so do the emulator and X.
        for key in ("compositor_ms_per_frame", "emulator_ms_per_frame",
                    "xserver_ms_per_frame"):
            assert len(agent[key]) == 1 and agent[key][0] > 0, (key, agent)
        assert direct["emulator_ms_per_frame"] == [] == direct["xserver_ms_per_frame"]
        fps_ratio = agent["fps"][0] / direct["fps"][0]
        cpu_ratio = agent["compositor_ms_per_frame"][0] / copy
        # The table: both paths, every column a number (the direct path has no dom0 share).
        for path, runs in (("direct", direct), ("agent", agent)):
            row = re.search(rf"^{re.escape(case)}\s+{path}\s+{NUMBER}\s+{NUMBER}\s+{NUMBER}\s+"
                            rf"{NUMBER}\s+{NUMBER}\s+(\S+)\s+(\S+)$", out, re.M)
            assert row is not None, (case, path, out)
            assert float(row[1]) == pytest.approx(runs["fps"][0], abs=0.051)
            if path == "agent":
                assert float(row[2]) == pytest.approx(fps_ratio, abs=0.0051)
                assert float(row[5]) == pytest.approx(cpu_ratio, abs=0.0051)
                assert row[6] != "-" and row[7] != "-"
            else:
                assert row[2] == "1.00" and row[6] == "-" == row[7]
        # The goals line: both ratios, agent against direct and against the plain copy.
        goal = re.search(rf"^  {re.escape(case)}\s+fps {NUMBER}x direct \(goal >= 0\.9\); "
                         rf"agent CPU per frame {NUMBER}x the plain copy \(goal <= 2\)$",
                         out, re.M)
        assert goal is not None, out
        assert float(goal[1]) == pytest.approx(fps_ratio, abs=0.0051)
        assert float(goal[2]) == pytest.approx(cpu_ratio, abs=0.0051)


def test_a_missing_xvfb_is_one_line_before_anything_starts(tmp_path: Path) -> None:
    empty = tmp_path / "bin"
    empty.mkdir()
    result = run_bench(tmp_path, "frames", "--mode", "agent", "--size", "320x240",
                       path=str(empty))
    assert result.returncode == 1, result.stdout + result.stderr
    assert result.stderr == ("qubesshm bench frames: Xvfb is not installed (Debian package "
                             "'xvfb'); agent mode shows the emulator's windows on a private "
                             "one\n")
    assert "compositor:" not in result.stdout  # no Weston was started


@pytest.mark.parametrize(("args", "why"), [
    (["--refresh", "30"], "qubesshm bench frames: --refresh is the agent's: add --mode agent"),
    (["--mode", "agent", "--size", "100x100"],
     "qubesshm bench frames: --region 64 does not fit twice in 100x100 frames: give at most "
     "50"),
    (["--mode", "agent", "--refresh", "0"], "--refresh: "),
    (["--mode", "bogus"], "--mode: invalid choice: 'bogus'"),
])
def test_usage_mistakes(tmp_path: Path, args: list[str], why: str) -> None:
    result = run_bench(tmp_path, "frames", *args)
    assert result.returncode == 2, result.stdout + result.stderr
    assert why in result.stderr
    assert "Traceback" not in result.stderr
