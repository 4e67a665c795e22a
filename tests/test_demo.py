"""The README's main command, ``examples/demo.py``, as a newcomer runs it (no compositor
running: it starts its own headless Weston)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from PIL import Image

DEMO = Path(__file__).resolve().parent.parent / "examples" / "demo.py"


def test_the_demo_runs_both_clients_prints_the_report_and_saves_the_figure(
        tmp_path: Path) -> None:
    runtime = tmp_path / "runtime"
    runtime.mkdir(mode=0o700)
    env = {k: v for k, v in os.environ.items() if k not in ("WAYLAND_DISPLAY",
                                                              "WAYLAND_SOCKET")}
    env["XDG_RUNTIME_DIR"] = str(runtime)
    figure = tmp_path / "demo.png"
    result = subprocess.run(
        [sys.executable, str(DEMO), "--seconds", "2", "--windows", "3", "--screenshot",
         str(figure)], env=env, capture_output=True, text=True, timeout=180, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "starting a headless Weston" in result.stdout
    assert "churn: 3 windows" in result.stdout
    assert "qubesshm report (" in result.stderr and ", 2 client(s)):" in result.stderr
    assert "on a stock kernel" in result.stderr
    assert "the screen and the report's key figures saved" in result.stdout
    with Image.open(figure) as image:
        # The screen and the panel of figures side by side.
        assert image.format == "PNG" and image.size[0] > 2 * image.size[1]
