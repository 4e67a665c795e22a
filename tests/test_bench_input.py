"""``qubesshm bench input``: a short real run, its table, its JSON, every press received.

The benchmark is run as a user runs it (the ``qubesshm`` command, its own two
private Xvfbs, Weston's x11 backend, the agent and the emulator) with a few
presses; the test checks that both paths received every press, that the table
prints the figures the JSON holds, and that the added milliseconds are the
difference of the medians. No figure is held to a threshold: speed is the
benchmark's to report. A missing Xvfb is one clear line.
"""

from __future__ import annotations

import json
import re
import shutil
import statistics
import struct
from pathlib import Path

import pytest
from procs import run_bench

PRESSES = 6
NUMBER = r"(\d+\.\d{3})"


@pytest.mark.skipif(shutil.which("Xvfb") is None or shutil.which("weston") is None,
                    reason="needs Xvfb and weston")
def test_both_paths_receive_every_press_and_the_figures_add_up(tmp_path: Path) -> None:
    figures = tmp_path / "input.json"
    result = run_bench(tmp_path, "input", "--presses", str(PRESSES), "--gap", "0.01",
                       "--json", str(figures))
    out = result.stdout
    assert result.returncode == 0, out + result.stderr
    assert "Traceback" not in out + result.stderr
    assert re.search(r"^machine: \d+ CPUs \(.+\), load average [\d.]+, [\d.]+, [\d.]+ before "
                     r"the run$", out, re.M), out
    assert re.search(r"^weston: weston \d+\.\d+", out, re.M), out
    assert re.search(r"^weston path: Weston's x11 backend \(pixman renderer, a 640x480 output, "
                     r"desktop shell\) on a private Xvfb on :\d+ \(1024x768x24\)$", out, re.M)
    assert re.search(r"^agent path: qubesshm agent \(--refresh 60, .*\) \+ qubesshm "
                     r"guid-emulator on a private Xvfb on :\d+ \(1024x768x24\)$", out, re.M), out
    assert re.search(r"^load average [\d.]+, [\d.]+, [\d.]+ after the run$", out, re.M), out
    data = json.loads(figures.read_text())
    assert data["presses"] == PRESSES
    for name in ("weston", "agent"):
        latencies = data[name]["latencies_ms"]
        # Every press reached the client, each after it was sent (same clock).
        assert data[name]["received"] == PRESSES == len(latencies), data
        assert all(value > 0 for value in latencies), latencies
        median = statistics.median(latencies)
        assert data[name]["median_ms"] == pytest.approx(median)
        row = re.search(rf"^{name}\s+{PRESSES}/{PRESSES}\s+{NUMBER}\s+{NUMBER}\s+{NUMBER}\s+"
                        rf"{NUMBER}$", out, re.M)
        assert row is not None, (name, out)
        shown_median, p90, low, high = (float(row[i]) for i in range(1, 5))
        assert shown_median == pytest.approx(median, abs=0.0006)
        assert low == pytest.approx(min(latencies), abs=0.0006)
        assert high == pytest.approx(max(latencies), abs=0.0006)
        assert low <= shown_median <= p90 <= high
    added = data["agent"]["median_ms"] - data["weston"]["median_ms"]
    assert data["added_ms"] == pytest.approx(added)
    line = re.search(r"^added by the agent path \(median agent - median weston\): "
                     r"(-?\d+\.\d{3}) ms \(goal <= 1 ms\)$", out, re.M)
    assert line is not None, out
    assert float(line[1]) == pytest.approx(added, abs=0.0006)


def test_a_missing_xvfb_is_one_line_before_anything_starts(tmp_path: Path) -> None:
    empty = tmp_path / "bin"
    empty.mkdir()
    result = run_bench(tmp_path, "input", "--presses", "3", path=str(empty))
    assert result.returncode == 1, result.stdout + result.stderr
    assert result.stderr == ("qubesshm bench input: Xvfb is not installed (Debian package "
                             "'xvfb'); agent mode shows the emulator's windows on a private "
                             "one\n")
    assert result.stdout == ""


@pytest.mark.parametrize(("args", "why"), [
    (["--presses", "0"], "--presses: "),
    (["--timeout", "0"], "--timeout: "),
    (["--gap", "-1"], "--gap: "),
])
def test_usage_mistakes(tmp_path: Path, args: list[str], why: str) -> None:
    result = run_bench(tmp_path, "input", *args)
    assert result.returncode == 2, result.stdout + result.stderr
    assert why in result.stderr
    assert "Traceback" not in result.stderr


def test_the_clients_log_gives_toplevel_states_as_numbers() -> None:
    from qubesshm.bench.input_client import xdg_states

    # activated (4) and fullscreen (2), as the compositor sends them: native u32s
    assert xdg_states(struct.pack("=2I", 4, 2)) == [4, 2]
    assert xdg_states(None) == [] and xdg_states(b"") == []
