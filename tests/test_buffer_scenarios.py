"""Every route ``examples/scenario_client.py`` takes to the screen shows the exact pattern.

Each scenario runs twice against the session's headless Weston: directly (which
checks the client and these tests) and through ``qubesshm serve`` (which checks
that the proxy's copies into its own buffers honour buffer transforms, scales,
viewports, grown pools, synchronized subsurfaces and partial damage). Both
screenshots must show the expected pixels byte for byte.
"""

from __future__ import annotations

import math
import subprocess
import sys
from array import array
from collections.abc import Callable, Mapping
from pathlib import Path
from types import ModuleType

import pytest
from PIL import Image
from procs import RunningProxy, wait_for_file
from screenshots import (  # tests/ is on sys.path (pytest's rootdir-less "prepend" import)
    REPO,
    crop,
    example,
    expected_rgb,
    mismatch_summary,
    wait_for_pattern,
)

from qubesshm.headless import HeadlessWeston

SCENARIO_CLIENT = REPO / "examples" / "scenario_client.py"
WIDTH, HEIGHT = 320, 240
FRAMES = 12  # of double-buffered
# The client holds its window until the screenshots are taken and it is sent
# SIGTERM; this only bounds a run whose test died without stopping it.
HOLD = 120.0


def scenario_client() -> ModuleType:
    """``examples/scenario_client.py`` as a module."""
    return example("scenario_client")


def to_rgb(pixels: bytes, width: int, height: int) -> bytes:
    """B, G, R, A pixel bytes as packed RGB, as a screenshot shows them."""
    return Image.frombytes("RGB", (width, height), pixels, "raw", "BGRX").tobytes()


def expected_screen(scenario: str) -> bytes:
    if scenario == "double-buffered":
        pixels = scenario_client().double_buffered_pixels(WIDTH, HEIGHT, FRAMES)
        return to_rgb(pixels, WIDTH, HEIGHT)
    return expected_rgb(WIDTH, HEIGHT)


# -- pure helpers: no compositor ----------------------------------------------------

# Where Weston samples the buffer for a surface point (sx, sy) of a W x H surface.
SURFACE_TO_BUFFER: dict[int, Callable[[float, float, int, int], tuple[float, float]]] = {
    0: lambda sx, sy, w, h: (sx, sy),
    1: lambda sx, sy, w, h: (sy, w - sx),
    2: lambda sx, sy, w, h: (w - sx, h - sy),
    3: lambda sx, sy, w, h: (h - sy, sx),
    4: lambda sx, sy, w, h: (w - sx, sy),
    5: lambda sx, sy, w, h: (sy, sx),
    6: lambda sx, sy, w, h: (sx, h - sy),
    7: lambda sx, sy, w, h: (h - sy, w - sx),
}


def numbered(width: int, height: int) -> bytes:
    """An image whose every pixel is different: its own index."""
    return array("I", range(width * height)).tobytes()


@pytest.mark.parametrize("transform", range(8))
@pytest.mark.parametrize(("width", "height"), [(7, 5), (4, 9), (WIDTH, HEIGHT)])
def test_transformed_pixels_inverts_the_buffer_transform(
    transform: int, width: int, height: int
) -> None:
    module = scenario_client()
    data, buffer_width, buffer_height = module.transformed_pixels(
        numbered(width, height), width, height, transform
    )
    if transform % 2:
        assert (buffer_width, buffer_height) == (height, width)
    else:
        assert (buffer_width, buffer_height) == (width, height)
    buffer = array("I")
    buffer.frombytes(data)
    assert len(buffer) == width * height
    to_buffer = SURFACE_TO_BUFFER[transform]
    for y in range(height):
        for x in range(width):
            bx, by = (math.floor(v) for v in to_buffer(x + 0.5, y + 0.5, width, height))
            assert 0 <= bx < buffer_width and 0 <= by < buffer_height
            assert buffer[by * buffer_width + bx] == y * width + x, (x, y, bx, by)


def test_scaled_pixels_are_blocks() -> None:
    width, height, scale = 5, 3, 2
    buffer = array("I")
    buffer.frombytes(scenario_client().scaled_pixels(numbered(width, height), width, height,
                                                     scale))
    assert len(buffer) == width * height * scale * scale
    for by in range(height * scale):
        for bx in range(width * scale):
            assert buffer[by * width * scale + bx] == (by // scale) * width + bx // scale


def test_viewport_buffer_holds_the_pattern_at_the_source() -> None:
    module = scenario_client()
    data, bw, bh = module.viewport_buffer(WIDTH, HEIGHT)
    assert (bw, bh) == (WIDTH + 40, HEIGHT + 30)
    x0, y0 = module.VIEWPORT_OFFSET
    cut = b"".join(
        data[((y0 + y) * bw + x0) * 4 : ((y0 + y) * bw + x0 + WIDTH) * 4] for y in range(HEIGHT)
    )
    assert cut == module.pattern(WIDTH, HEIGHT)
    assert all(data[i] == 0xFF for i in range(3, len(data), 4))


def test_double_buffered_expected_image() -> None:
    module = scenario_client()
    base = module.pattern(WIDTH, HEIGHT)
    assert module.max_frames(WIDTH, HEIGHT) >= FRAMES
    for frame in range(1, FRAMES + 1):
        x, y, w, h = module.moving_rect(frame)
        assert (x, y) == (20 + 9 * frame, 30 + 5 * frame)
        assert x >= 1 and x + w <= WIDTH - 1 and y >= 1 and y + h <= HEIGHT - 1
    image = module.double_buffered_pixels(WIDTH, HEIGHT, FRAMES)
    x, y, w, h = module.moving_rect(FRAMES)
    stride = WIDTH * 4
    for row in range(HEIGHT):
        got = image[row * stride : (row + 1) * stride]
        want = base[row * stride : (row + 1) * stride]
        if y <= row < y + h:
            assert got[: x * 4] == want[: x * 4]
            assert got[x * 4 : (x + w) * 4] == bytes((0x12, 0x34, 0x56, 0xFF)) * w
            assert got[(x + w) * 4 :] == want[(x + w) * 4 :]
        else:
            assert got == want
    # the first and last rows stay the pattern's, so find_pattern finds the window
    assert to_rgb(image, WIDTH, HEIGHT)[: WIDTH * 3] == expected_rgb(WIDTH, HEIGHT)[: WIDTH * 3]


def test_double_buffered_repaint_and_damage_reproduce_every_frame() -> None:
    """The client's buffer-age-2 repaints, shown through only the damage it reports,
    give exactly the expected image at every frame, and its damage covers all changes."""
    module = scenario_client()
    stride, size = WIDTH * 4, WIDTH * HEIGHT * 4
    buffers = [bytearray(b"\xee" * size) for _ in range(2)]  # garbage before first use
    drawn: list[int | None] = [None, None]
    screen = bytearray(size)
    previous = bytes(screen)
    for frame in range(1, FRAMES + 1):
        index = (frame - 1) % 2
        module.paint_double_buffered(buffers[index], 0, WIDTH, HEIGHT, frame, drawn[index])
        drawn[index] = frame
        expected = module.double_buffered_pixels(WIDTH, HEIGHT, frame)
        assert bytes(buffers[index]) == expected, f"buffer content of frame {frame}"
        damage = module.double_buffered_damage(WIDTH, HEIGHT, frame)
        for rect in damage:
            module.blit(screen, 0, stride, rect[0], rect[1], bytes(buffers[index]), stride, rect)
        assert bytes(screen) == expected, f"screen after the damage of frame {frame}"
        if frame > 1:
            assert len(damage) == 2 and module.moving_rect(frame) in damage
            assert module.moving_rect(frame - 1) in damage
        previous = bytes(screen)
    assert previous == module.double_buffered_pixels(WIDTH, HEIGHT, FRAMES)


def test_bad_arguments_exit_2(tmp_path: Path) -> None:
    for args in (["--scenario=nope"], ["--scenario=double-buffered", "--frames=1000"], []):
        result = subprocess.run([sys.executable, str(SCENARIO_CLIENT), *args],
                                capture_output=True, text=True, timeout=60, check=False)
        assert result.returncode == 2, (args, result.stderr)


# -- real compositor ---------------------------------------------------------------


def test_client_exits_0_after_hold(weston: HeadlessWeston, tmp_path: Path) -> None:
    ready = tmp_path / "ready"
    result = subprocess.run(
        [sys.executable, str(SCENARIO_CLIENT), "--scenario=static", "--hold=0",
         f"--ready-file={ready}"],
        env=weston.env(), capture_output=True, text=True, timeout=60, check=False,
    )
    assert result.returncode == 0, result.stderr
    assert ready.read_text() == "ready\n"
    assert "static 320x240 presented after 1 commits" in result.stdout


def run_client(scenario: str, env: Mapping[str, str], shot_env: Mapping[str, str],
               workdir: Path) -> str:
    """Run the client until it has presented, screenshot it, stop it.

    Returns "" when the screen showed the expected pixels, else what differed.
    """
    workdir.mkdir(parents=True)
    ready = workdir / "ready"
    client = subprocess.Popen(
        [sys.executable, str(SCENARIO_CLIENT), f"--scenario={scenario}", f"--frames={FRAMES}",
         f"--hold={HOLD}", f"--ready-file={ready}", "--quiet"],
        env=dict(env), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        wait_for_file(ready, client)
        assert ready.read_text() == "ready\n"
        expected = expected_screen(scenario)
        try:
            shot, x, y = wait_for_pattern(shot_env, workdir / "shots", WIDTH, HEIGHT)
        except LookupError as exc:
            problem = str(exc)  # names the last shot taken
        else:
            actual = crop(shot, x, y, WIDTH, HEIGHT)
            problem = "" if actual == expected else (
                f"{shot} at ({x}, {y}): " + mismatch_summary(actual, expected, WIDTH))
        client.terminate()  # ends the hold: the client cleans up and exits 0
        _, err = client.communicate(timeout=60)
    finally:
        if client.poll() is None:
            client.kill()
            client.communicate()
    assert client.returncode == 0, f"client exited with {client.returncode}: {err}"
    return problem


@pytest.mark.parametrize("scenario", scenario_client().SCENARIOS)
def test_scenario_shows_exact_pattern(
    weston: HeadlessWeston, proxy: RunningProxy, tmp_path: Path, scenario: str
) -> None:
    direct = run_client(scenario, weston.env(), weston.env(), tmp_path / "direct")
    proxied = run_client(scenario, proxy.env, weston.env(), tmp_path / "proxied")
    log = proxy.log()
    assert not direct and not proxied, (
        f"direct: {direct or 'exact'}; proxied: {proxied or 'exact'}\nproxy log:\n{log[-4000:]}"
    )
    assert "Traceback" not in log, log
    assert "protocol error" not in log.lower(), log
