"""Real applications against qubesshm's own compositor (no Weston anywhere).

The project's scenario client (pixel-exact for every content route: transforms,
scale, viewport, resized pool, synchronized subsurface, double buffering with
partial damage), weston-simple-shm and weston-simple-damage (frames keep
coming, paced by frame callbacks), GTK 3 and GTK 4 (a window of the right
title and size, with real pixels, that follows the agent's configure).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from compositor_server import RunningCompositor, serving
from compositor_shell import Commit, rgb, wait_until
from screenshots import example

from qubesshm.pixels.region import Rect

REPO = Path(__file__).resolve().parent.parent
EXAMPLES = REPO / "examples"
pc = example("pattern_client")
sc = example("scenario_client")


@pytest.fixture
def served() -> Iterator[RunningCompositor]:
    with serving(RunningCompositor) as running:
        yield running


class App:
    """An application process connected to the compositor under test."""

    def __init__(self, served: RunningCompositor, *argv: str, **env: str) -> None:
        environment = served.env()
        environment.update(env)
        self.log = tempfile.TemporaryFile()  # noqa: SIM115 - lives as long as the app
        self.process = subprocess.Popen(argv, env=environment, stdin=subprocess.DEVNULL,
                                        stdout=self.log, stderr=subprocess.STDOUT)

    def output(self) -> str:
        self.log.seek(0)
        return self.log.read().decode(errors="replace")

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode

    def wait_exit(self, timeout: float = 60) -> int:
        return self.process.wait(timeout)


def words(pixels: bytes, width: int, height: int) -> np.ndarray:
    return np.frombuffer(pixels, dtype=np.uint32).reshape(height, width)


def commits_of(served: RunningCompositor, title: str) -> list[Commit]:
    return served.shell.read(lambda s: [c for c in s.commits if c.window.title == title])


# -- the scenario client: pixel-exact --------------------------------------------


@pytest.mark.parametrize("scenario", [s for s in sc.SCENARIOS])
def test_scenario_client_pixels_are_exact(served: RunningCompositor, scenario: str,
                                          tmp_path: Path) -> None:
    width, height, frames = 160, 120, 6
    ready = tmp_path / "ready"
    app = App(served, sys.executable, str(EXAMPLES / "scenario_client.py"),
              "--scenario", scenario, "--width", str(width), "--height", str(height),
              "--frames", str(frames), "--ready-file", str(ready), "--hold", "60", "--quiet")
    try:
        # Ready: the last frame was presented (its frame callback is done).
        wait_until(lambda: ready.exists() or app.process.poll() is not None,
                   "the client to present its last frame")
        commit = served.shell.last_commit(f"qubesshm scenario {scenario}")
        assert ready.exists(), app.output()
    finally:
        assert app.stop() == 0, app.output()
    assert commit is not None, served.shell.names()
    assert commit.geometry == Rect(0, 0, width, height)
    if scenario == "double-buffered":
        expected = sc.double_buffered_pixels(width, height, frames)
    else:
        expected = pc.pattern_pixels(width, height)
    want = rgb(words(expected, width, height))
    got = rgb(commit.image)
    assert (got == want).all(), f"{int((got != want).sum())} pixels differ"


def test_partial_damage_is_what_changed(served: RunningCompositor, tmp_path: Path) -> None:
    """Frames after the first damage only the moving rectangle's old and new place."""
    width, height = 160, 120
    app = App(served, sys.executable, str(EXAMPLES / "scenario_client.py"),
              "--scenario", "double-buffered", "--width", str(width), "--height",
              str(height), "--frames", "6", "--ready-file", str(tmp_path / "r"), "--quiet")
    try:
        assert app.wait_exit() == 0, app.output()
    finally:
        app.stop()
    commits = commits_of(served, "qubesshm scenario double-buffered")
    assert len(commits) >= 6
    for commit in commits[2:]:
        damage = [r for rects in commit.damage.values() for r in rects]
        assert damage and sum(r.area for r in damage) < width * height // 2, damage


# -- weston's simple clients ------------------------------------------------------


def test_weston_simple_shm_keeps_drawing(served: RunningCompositor) -> None:
    app = App(served, "weston-simple-shm")
    try:
        wait_until(lambda: len(commits_of(served, "simple-shm")) >= 30,
                   "30 frames of simple-shm")
        commits = commits_of(served, "simple-shm")
        first, last = commits[0], commits[-1]
        assert first.geometry == Rect(0, 0, 250, 250)
        assert len(np.unique(last.image)) > 10
        assert not (first.image == last.image).all()  # it animates
    finally:
        assert app.stop() in (0, -15), app.output()


@pytest.mark.parametrize("options", [
    (), ("--use-damage-buffer",), ("--scale=2",), ("--transform=flipped-90",),
    ("--use-viewport",), ("--rotating-transform",), ("--version=1",),
])
def test_weston_simple_damage(served: RunningCompositor, options: tuple[str, ...]) -> None:
    app = App(served, "weston-simple-damage", *options)
    try:
        wait_until(lambda: len(commits_of(served, "simple-damage")) >= 20,
                   "20 frames of simple-damage")
        commits = commits_of(served, "simple-damage")
        assert "error" not in app.output().lower(), app.output()
        last = commits[-1]
        assert last.geometry.width > 0 and last.geometry.height > 0
        assert len(np.unique(last.image)) > 2
        damaged = [r for rects in last.damage.values() for r in rects]
        assert damaged
    finally:
        assert app.stop() in (0, -15), app.output()


# -- GTK -------------------------------------------------------------------------


@pytest.mark.parametrize(("argv", "env", "title", "default"), [
    (("gtk3-demo",), {}, "Application Class", (800, 647)),
    (("gtk4-demo",), {"GSK_RENDERER": "cairo"}, "GTK Demo", (800, 600)),
], ids=["gtk3", "gtk4"])
def test_gtk_maps_a_window_of_the_right_title_and_size(
        served: RunningCompositor, argv: tuple[str, ...], env: dict[str, str], title: str,
        default: tuple[int, int]) -> None:
    if shutil.which(argv[0]) is None:
        pytest.fail(f"{argv[0]} is not installed (.ci/install installs it)")
    app = App(served, *argv, NO_AT_BRIDGE="1", **env)
    try:
        commit = wait_until(lambda: served.shell.last_commit(title), f"a {title!r} window")
        assert (commit.geometry.width, commit.geometry.height) == default
        assert commit.window.kind == "toplevel" and commit.window.app_id
        assert len(np.unique(commit.image)) > 10, "the window is blank"
        # The agent sizes the window: GTK follows.
        window = commit.window
        served.call(lambda: served.compositor.configure(window, 640, 480))
        resized = wait_until(lambda: next(
            (c for c in commits_of(served, title)
             if (c.geometry.width, c.geometry.height) == (640, 480)), None),
            f"{title!r} at 640x480")
        assert len(np.unique(resized.image)) > 10
        served.call(lambda: served.compositor.close(window))
        assert app.wait_exit() == 0, app.output()
    finally:
        app.stop()
    wait_until(lambda: served.shell.mapped_windows() == [], "the window to go")


def test_foot_maps_its_window_and_closes_when_asked(served: RunningCompositor) -> None:
    """foot requires wl_seat and wl_data_device_manager at start (it exits without
    them): it maps a terminal, and ends cleanly when the agent closes it (it hangs up
    on its shell and exits with the shell's status)."""
    if shutil.which("foot") is None:
        pytest.fail("foot is not installed (.ci/install installs it)")
    app = App(served, "foot", "--", "sh", "-c", "echo ready; exec cat")
    try:
        commit = wait_until(lambda: served.shell.last_commit("foot"), "foot's window")
        assert commit.window.kind == "toplevel" and commit.window.app_id == "foot"
        assert commit.geometry.width > 100 and commit.geometry.height > 50
        window = commit.window
        served.call(lambda: served.compositor.close(window))
        # foot ends its shell (SIGHUP) and exits with a status of its shell's: not a
        # crash, and its own goodbye.
        assert app.wait_exit() >= 0 and "goodbye" in app.output(), app.output()
    finally:
        app.stop()
    wait_until(lambda: served.client_count() == 0, "foot's connection to close")
