"""Screenshot helpers for tests that look at what a headless Weston shows.

``weston-screenshooter`` (needs Weston's ``--debug``) captures the whole
output as an RGB PNG: the desktop shell's background and panel, with client
windows at places the shell picks at random.  :func:`find_pattern` finds the
window of ``examples/pattern_client.py`` in such a shot by the pattern's first
row, and :func:`crop` cuts it out for a byte-for-byte comparison with
:func:`expected_rgb` (or :func:`changing_rgb`, what the client shows after its
frames of ``--content changing``).
"""

from __future__ import annotations

import functools
import importlib.util
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from types import ModuleType

from PIL import Image

from qubesshm.headless import take_screenshot

REPO = Path(__file__).resolve().parent.parent
PATTERN_CLIENT = REPO / "examples" / "pattern_client.py"

@functools.cache
def example(name: str) -> ModuleType:
    """``examples/<name>.py`` as a module (examples/ is not a package)."""
    path = REPO / "examples" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load {path}")
    module = importlib.util.module_from_spec(spec)
    # Registered before it runs, so dataclasses in it can resolve their module.
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def pattern_client() -> ModuleType:
    """``examples/pattern_client.py`` as a module."""
    return example("pattern_client")


def argb_to_rgb(pixels: bytes, width: int, height: int) -> bytes:
    """Packed ARGB8888 little-endian rows as packed RGB bytes, as a screenshot shows them."""
    # ARGB8888 little-endian is B, G, R, A in memory; alpha is dropped.
    return Image.frombytes("RGB", (width, height), pixels, "raw", "BGRX").tobytes()


@functools.cache
def expected_rgb(width: int, height: int) -> bytes:
    """The pattern client's pixels as packed RGB bytes, as a screenshot shows them."""
    pixels: bytes = pattern_client().pattern_pixels(width, height)
    return argb_to_rgb(pixels, width, height)


def changing_rgb(width: int, height: int, frames: int) -> bytes:
    """What the pattern client shows after ``frames`` frames of ``--content changing
    --damage partial``, as packed RGB bytes."""
    pixels: bytes = pattern_client().changing_pixels(width, height, frames, "partial")
    return argb_to_rgb(pixels, width, height)


def _rgb(png_path: Path) -> Image.Image:
    with Image.open(png_path) as image:
        return image.convert("RGB")


def find_pattern(png_path: Path, width: int, height: int,
                 expected: bytes | None = None) -> tuple[int, int]:
    """Top-left corner of the pattern client's ``width`` x ``height`` window in a shot.

    Searches for the first row of ``expected`` (packed RGB; the pattern by
    default, whose first row is a black/white checker line) and confirms a hit
    by its last row.  Raises LookupError when it is not there.
    """
    image = _rgb(png_path)
    shot_w, shot_h = image.size
    data = image.tobytes()
    if expected is None:
        expected = expected_rgb(width, height)
    row_len = width * 3
    first, last = expected[:row_len], expected[-row_len:]
    start = 0
    while (hit := data.find(first, start)) >= 0:
        start = hit + 1
        if hit % 3:
            continue
        y, x = divmod(hit // 3, shot_w)
        if x + width > shot_w or y + height > shot_h:
            continue
        offset = ((y + height - 1) * shot_w + x) * 3
        if data[offset : offset + row_len] == last:
            return x, y
    raise LookupError(f"no {width}x{height} pattern window in {png_path}")


def wait_for_pattern(
    env: Mapping[str, str], workdir: Path, width: int, height: int, timeout: float = 10.0,
    expected: bytes | None = None,
) -> tuple[Path, int, int]:
    """Take screenshots until one shows the pattern window (found by the first and
    last rows of ``expected``, the pattern by default); return it and the corner."""
    deadline = time.monotonic() + timeout
    while True:
        shot = take_screenshot(env, workdir)
        try:
            x, y = find_pattern(shot, width, height, expected)
        except LookupError:
            if time.monotonic() >= deadline:
                raise
            time.sleep(0.1)
            continue
        return shot, x, y


def wait_for_no_pattern(
    env: Mapping[str, str], workdir: Path, width: int, height: int, expected: bytes,
    timeout: float = 10.0,
) -> None:
    """Take screenshots until none shows the window ``expected`` (a client gone)."""
    deadline = time.monotonic() + timeout
    while True:
        shot = take_screenshot(env, workdir)
        try:
            find_pattern(shot, width, height, expected)
        except LookupError:
            return
        if time.monotonic() >= deadline:
            raise AssertionError(f"a closed window still shows in {shot} after {timeout} s")
        time.sleep(0.1)


def crop(png_path: Path, x: int, y: int, w: int, h: int) -> bytes:
    """The RGB bytes (packed rows) of the ``w`` x ``h`` rectangle at ``(x, y)``."""
    return _rgb(png_path).crop((x, y, x + w, y + h)).tobytes()


def mismatch_summary(actual: bytes, expected: bytes, width: int) -> str:
    """How many pixels differ, and where the first one is, for assertion messages."""
    if len(actual) != len(expected):
        return f"size differs: {len(actual)} != {len(expected)} bytes"
    bad = [i for i in range(0, len(expected), 3) if actual[i : i + 3] != expected[i : i + 3]]
    if not bad:
        return "identical"
    y, x = divmod(bad[0] // 3, width)
    return (
        f"{len(bad)} pixels differ; first at ({x}, {y}): "
        f"got {tuple(actual[bad[0] : bad[0] + 3])}, want {tuple(expected[bad[0] : bad[0] + 3])}"
    )
