"""The pattern client shows exactly its pattern in a headless Weston.

This checks the reference client and the screenshot helpers on their own, so a
later direct-versus-proxied comparison can trust both.
"""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
from pathlib import Path

import pytest
from procs import wait_for_file
from screenshots import (  # tests/ is on sys.path (pytest's rootdir-less "prepend" import)
    PATTERN_CLIENT,
    crop,
    expected_rgb,
    mismatch_summary,
    pattern_client,
    wait_for_pattern,
)

from qubesshm.headless import HeadlessWeston


def test_pattern_pixels_shows_off_by_one() -> None:
    width, height = 320, 240
    pixels = pattern_client().pattern_pixels(width, height)
    assert len(pixels) == width * height * 4
    assert pixels == pattern_client().pattern_pixels(width, height)
    stride = width * 4
    rows = [pixels[y * stride : (y + 1) * stride] for y in range(height)]
    columns = [b"".join(row[x * 4 : x * 4 + 4] for row in rows) for x in range(width)]
    # A copy shifted by one row or one column never reproduces the pattern.
    assert all(a != b for a, b in itertools.pairwise(rows))
    assert all(a != b for a, b in itertools.pairwise(columns))
    assert rows[0][:8] == b"\xff\xff\xff\xff\x00\x00\x00\xff"  # white, black, ...
    assert all(pixels[i] == 0xFF for i in range(3, len(pixels), 4))  # opaque


def test_client_fails_without_compositor(tmp_path: Path) -> None:
    env = dict(os.environ, XDG_RUNTIME_DIR=str(tmp_path), WAYLAND_DISPLAY="no-such-display")
    result = subprocess.run(
        [sys.executable, str(PATTERN_CLIENT)],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 1
    assert "cannot connect" in result.stderr


@pytest.mark.parametrize(
    ("width", "height", "extra"),
    [
        (320, 240, ["--format", "xrgb8888"]),
        # odd sizes catch stride mistakes; partial damage after the first frame
        (257, 131, ["--format", "argb8888", "--damage", "partial"]),
    ],
    ids=["xrgb8888-320x240", "argb8888-257x131-partial"],
)
def test_screenshot_shows_exact_pattern(
    weston: HeadlessWeston, tmp_path: Path, width: int, height: int, extra: list[str]
) -> None:
    ready = tmp_path / "ready"
    command = [
        sys.executable,
        str(PATTERN_CLIENT),
        f"--width={width}",
        f"--height={height}",
        "--frames=5",
        "--hold=5",
        f"--ready-file={ready}",
        *extra,
    ]
    client = subprocess.Popen(
        command, env=weston.env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        wait_for_file(ready, client)
        assert ready.read_text() == "ready\n"
        shot, x, y = wait_for_pattern(weston.env(), tmp_path / "shots", width, height)
        actual = crop(shot, x, y, width, height)
        expected = expected_rgb(width, height)
        assert actual == expected, f"{shot} at ({x}, {y}): " + mismatch_summary(
            actual, expected, width
        )
        out, err = client.communicate(timeout=30)
    finally:
        if client.poll() is None:
            client.kill()
            client.communicate()
    assert client.returncode == 0, err
    assert "5 frames" in out
