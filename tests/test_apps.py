"""Real applications through qubesshm, with no options, on Weston as users run it.

Every app runs on the ``desktop_weston`` fixture (1920x1080, the desktop shell with
its shipped animations) twice: through ``qubesshm run -- APP`` and as a client of
one ``qubesshm serve`` shared by the module. Each test waits on progress, never on
time: commits in the proxy's counters, then the app's first frame on screen (a
shot showing its window where the empty desktop was). It then checks that the
app is still running, ends it with SIGTERM and wants the status that signal
gives (nothing else ended it), every connection it made closed by hanging up (not
by a protocol error, which the proxy logs with -v), and no Wayland or X fatal
error in the app's output. Rootful Xwayland, a Wayland client of the proxy,
shows an X11 client (xlogo); its screen must equal the direct run's pixel for
pixel.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pytest
from desktop_shots import (
    PANEL_HEIGHT,
    Box,
    Screen,
    covered,
    desktop_is_clear,
    settled_desktop,
    shoot,
    wait_until,
    what_is_on,
    window_box,
)
from procs import RunningProxy, start_proxy

from qubesshm.headless import HeadlessWeston
from qubesshm.relay.control import StatsError, read_stats

QT5_EXAMPLES = Path("/usr/lib/x86_64-linux-gnu/qt5/examples")
# What a toolkit, libwayland or an X server prints when its display connection
# failed: GTK's "Error 71 (Protocol error) dispatching to Wayland display", Qt's
# "The Wayland connection experienced a fatal error", libwayland's
# "wl_display@1: error 1: ...", Xwayland's "Fatal server error", Xlib's
# "XIO:  fatal IO error".
FATAL = re.compile(r"error \d+ \(|fatal|protocol error|@\d+: error \d+:|"
                   r"error communicating with|cannot open display", re.IGNORECASE)
CONNECTED = re.compile(r"client#(\d+): connected")
CLOSED = re.compile(r"client#(\d+): closed \(([^)]*)\)")
SIGTERM_STATUS = 128 + signal.SIGTERM
Mode = Literal["run", "serve"]
_names = itertools.count()


@dataclass(frozen=True)
class App:
    argv: tuple[str, ...]
    env: dict[str, str] = field(default_factory=dict)
    # "window": placed by the shell, smaller than the screen; "maximized": the area
    # below the panel; "fullscreen": the whole output, panel hidden.
    shape: Literal["window", "maximized", "fullscreen"] = "window"
    # A library the app must have loaded: proof of the rendering path under test.
    maps: str | None = None


GTK = {"GDK_BACKEND": "wayland",
       # No session bus here: GTK 3's accessibility bridge would look for one.
       "NO_AT_BRIDGE": "1",
       # GTK 4's accessibility backend, which also wants the session bus.
       "GTK_A11Y": "none"}
TERMINAL = ("weston-terminal", "--shell=/bin/sh")

APPS = {
    "weston-terminal": App(TERMINAL),
    "weston-terminal-maximized": App((*TERMINAL, "--maximized"), shape="maximized"),
    "weston-terminal-fullscreen": App((*TERMINAL, "--fullscreen"), shape="fullscreen"),
    "weston-scaler": App(("weston-scaler",)),
    # gtk3-demo's main window, a GtkApplication that runs without a session bus
    # (G_APPLICATION_NON_UNIQUE). Headless Weston has no wl_seat, so GTK 3 prints
    # "gdk_seat_get_keyboard: assertion 'GDK_IS_SEAT (seat)' failed", direct too.
    "gtk3-demo": App(("gtk3-demo",), GTK),
    # GTK 4 needs no GPU nor GSK_RENDERER=cairo: its default GL renderer runs on
    # Mesa's llvmpipe (libgl1-mesa-dri), whose EGL, finding no GPU (no render node;
    # qubesshm also hides zwp_linux_dmabuf_v1), takes its software path on Wayland and
    # presents through wl_shm buffers of its own. Both renderers run here: Mesa's
    # buffers, and GDK's own with GSK_RENDERER=cairo.
    "gtk4-demo-gl": App(("gtk4-demo",), GTK, maps="swrast_dri.so"),
    "gtk4-demo-cairo": App(("gtk4-demo",), {**GTK, "GSK_RENDERER": "cairo"}),
    # Qt's Wayland platform plugin (qtwayland5) draws widgets into wl_shm buffers.
    "qt5-calculator": App((str(QT5_EXAMPLES / "widgets/widgets/calculator/calculator"),),
                          {"QT_QPA_PLATFORM": "wayland"}),
}

# Variables of the developer's session an app must not see: no X display, no
# session bus, no toolkit or debug choices, config under the test's own HOME.
DROPPED = {"DISPLAY", "WAYLAND_SOCKET", "DBUS_SESSION_BUS_ADDRESS", "GDK_BACKEND",
           "GSK_RENDERER", "QT_QPA_PLATFORM", "WAYLAND_DEBUG", "QUBESSHM_DEBUG",
           "XDG_CONFIG_HOME", "XDG_CACHE_HOME", "XDG_DATA_HOME", "XDG_STATE_HOME",
           "XAUTHORITY"}


def app_env(base: dict[str, str], home: Path, extra: dict[str, str]) -> dict[str, str]:
    """``base`` (the compositor's or the proxy's) for one app with its own HOME."""
    home.mkdir(exist_ok=True)
    env = {k: v for k, v in base.items() if k not in DROPPED}
    return {**env, "HOME": str(home), **extra}


# -- launching through either proxy ------------------------------------------------------


@dataclass
class Launched:
    """An app started through qubesshm run, or as a client of the shared serve."""

    process: subprocess.Popen[bytes]
    socket: str  # the proxy's socket path, for its counters
    output_path: Path  # the app's stdout and stderr (with run: the proxy's log too)
    proxy_log: Callable[[], str]  # what the proxy logged since the app started
    commits_before: int
    report_path: Path | None = None  # qubesshm run --report-json

    def output(self) -> str:
        return self.output_path.read_text(errors="replace")

    def commits(self) -> int:
        try:
            value = read_stats(self.socket)["commits"]
        except StatsError:
            return 0  # qubesshm run's proxy is not listening yet
        assert isinstance(value, int)
        return value - self.commits_before

    def running(self) -> bool:
        return self.process.poll() is None

    def stop(self) -> int:
        """SIGTERM (qubesshm run passes it on to the app); the exit status."""
        if self.running():
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            raise

    def pids(self) -> set[int]:
        """The process and its descendants (with run: the proxy, the app and its own)."""
        found, todo = set(), [self.process.pid]
        while todo:
            pid = todo.pop()
            found.add(pid)
            try:
                tasks = os.listdir(f"/proc/{pid}/task")
            except FileNotFoundError:
                continue
            for task in tasks:
                try:
                    children = Path(f"/proc/{pid}/task/{task}/children").read_text()
                except FileNotFoundError:
                    continue
                todo.extend(int(child) for child in children.split())
        return found


class Proxies:
    """Starts apps through ``qubesshm run`` or the module's ``qubesshm serve``."""

    def __init__(self, weston: HeadlessWeston, serve: RunningProxy) -> None:
        self.weston = weston
        self.serve = serve

    def launch(self, mode: Mode, argv: tuple[str, ...], extra_env: dict[str, str],
               workdir: Path) -> Launched:
        out = workdir / f"{mode}.out"
        runtime = Path(self.weston.env()["XDG_RUNTIME_DIR"])
        if mode == "run":
            name = f"qs-app-{os.getpid()}-{next(_names)}"
            report = workdir / f"{mode}-report.json"
            env = app_env(self.weston.env(), workdir / "home", extra_env)
            command = [sys.executable, "-m", "qubesshm", "-v", "run", "--socket", name,
                       "--report-json", str(report), "--", *argv]
            with open(out, "wb") as sink:
                process = subprocess.Popen(command, env=env, stdin=subprocess.DEVNULL,
                                           stdout=sink, stderr=subprocess.STDOUT)
            return Launched(process, str(runtime / name), out,
                            lambda: out.read_text(errors="replace"), 0, report)
        socket = str(runtime / self.serve.socket_name)
        before = read_stats(socket)["commits"]
        offset = len(self.serve.log())
        env = app_env(self.serve.env, workdir / "home", extra_env)
        with open(out, "wb") as sink:
            process = subprocess.Popen(list(argv), env=env, stdin=subprocess.DEVNULL,
                                       stdout=sink, stderr=subprocess.STDOUT)
        return Launched(process, socket, out, lambda: self.serve.log()[offset:], before)


def progress(launched: Launched, condition: Callable[[], bool], what: str) -> None:
    """Wait for ``condition`` while the app runs; an app that exits first fails."""
    wait_until(lambda: not launched.running() or condition(), what)
    assert launched.running(), (
        f"exited with {launched.process.returncode} before {what}:\n{launched.output()}")


def check_ended_cleanly(launched: Launched, status: int, expected: int) -> None:
    """The exit status our SIGTERM gives; every connection hung up; nothing fatal."""
    output = launched.output()
    assert status == expected, f"exit status {status}, wanted {expected}:\n{output}"
    # serve logs the end of a session once it sees the hang-up; run has exited.
    wait_until(lambda: set(CONNECTED.findall(launched.proxy_log()))
               <= {n for n, _ in CLOSED.findall(launched.proxy_log())},
               "the proxy to see every connection of the app close")
    log = launched.proxy_log()
    connected = CONNECTED.findall(log)
    assert connected, f"the app never connected to the proxy:\n{log}"
    reasons = dict(CLOSED.findall(log))
    assert all(reasons[n] == "client hung up" for n in connected), log
    assert "protocol error" not in log, log
    assert "Traceback" not in log, log
    assert not FATAL.search(output), output
    if launched.report_path is not None:
        report: dict[str, Any] = json.loads(launched.report_path.read_text())
        assert report["commits"] >= 1, report
        assert report["grant_pages_leaked"] == 0, report


def window_shown(weston: HeadlessWeston, desktop: Screen, condition: Callable[[Screen, Box], bool],
                 seen: list[tuple[Screen, Box]]) -> Callable[[], bool]:
    """A probe: does a shot show a window for which ``condition`` holds? (kept in ``seen``)"""
    def probe() -> bool:
        screen = shoot(weston)
        box = window_box(screen, desktop)
        if box is None or not condition(screen, box):
            return False
        seen.append((screen, box))
        return True
    return probe


# -- fixtures ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def desktop(desktop_weston: HeadlessWeston) -> Screen:
    """The empty desktop, once the start-up fade is over."""
    return settled_desktop(desktop_weston)


@pytest.fixture(scope="module")
def serve(desktop_weston: HeadlessWeston,
          tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningProxy]:
    """One ``qubesshm serve`` with no options for every app of the module."""
    log = tmp_path_factory.mktemp("serve") / "qubesshm.log"
    running = start_proxy(desktop_weston, log, socket_name=f"qs-apps-{os.getpid()}")
    yield running
    assert running.stop() == 0, running.log()
    assert "Traceback" not in running.log(), running.log()


@pytest.fixture
def proxies(desktop_weston: HeadlessWeston, desktop: Screen,
            serve: RunningProxy) -> Proxies:
    # Each test starts on an empty desktop: the last app's window has faded out.
    wait_until(lambda: desktop_is_clear(desktop_weston, desktop),
               "the desktop to be clear of windows",
               message=lambda: f"(it differs from the empty desktop in "
               f"{what_is_on(desktop_weston, desktop)})")
    return Proxies(desktop_weston, serve)


# -- Wayland apps --------------------------------------------------------------------------


def shown(app: App, desktop: Screen) -> Callable[[Screen, Box], bool]:
    """Whether a shot's window is the app's first frame, in the app's shape."""
    height, width = desktop.shape[:2]
    work_area = Box(0, PANEL_HEIGHT, width, height)

    def check(screen: Screen, box: Box) -> bool:
        if app.shape == "window":
            return box.width >= 100 and box.height >= 100
        return box == work_area and covered(screen, desktop, work_area) > 0.95
    return check


@pytest.mark.parametrize("mode", ["run", "serve"])
@pytest.mark.parametrize("name", list(APPS))
def test_app(name: str, mode: Mode, proxies: Proxies, desktop_weston: HeadlessWeston,
             desktop: Screen, tmp_path: Path) -> None:
    app = APPS[name]
    launched = proxies.launch(mode, app.argv, app.env, tmp_path)
    try:
        progress(launched, lambda: launched.commits() >= 1, f"{name}'s first commit")
        seen: list[tuple[Screen, Box]] = []
        progress(launched, window_shown(desktop_weston, desktop, shown(app, desktop), seen),
                 f"{name}'s first frame on screen ({app.shape})")
        [(screen, box)] = seen
        assert covered(screen, desktop, box) > 0.5, box  # a window, not a stray pixel
        work_area = Box(0, PANEL_HEIGHT, desktop_weston.width, desktop_weston.height)
        if app.shape == "window":
            assert box != work_area, "a plain window fills the screen"
        if app.shape == "fullscreen":
            panel = Box(0, 0, desktop_weston.width, PANEL_HEIGHT)
            assert covered(screen, desktop, panel) > 0.9, "the panel is still shown"
        if app.maps is not None:
            maps = "".join(Path(f"/proc/{pid}/maps").read_text()
                           for pid in launched.pids() if Path(f"/proc/{pid}/maps").exists())
            loaded = app.maps in maps
            assert loaded, f"{name} has not loaded {app.maps}"
        assert launched.running(), launched.output()
    finally:
        status = launched.stop()
    check_ended_cleanly(launched, status, -signal.SIGTERM if mode == "serve"
                        else SIGTERM_STATUS)


# -- rootful Xwayland with an X11 client ----------------------------------------------------

# -displayfd 1: Xwayland picks a free display and writes its number to stdout.
# -noreset: one X session (and one window) however many X clients come and go.
# -shm: wl_shm buffers, as on a qube (no GPU), wherever the test runs.
# Xwayland 22.1 has no -geometry: its root window takes the output's size, 1920x1080,
# and the shell places that window below the panel, so its last 32 rows are off screen.
XWAYLAND = ("Xwayland", "-displayfd", "1", "-noreset", "-shm")
XLOGO_BG = (255, 255, 255)
XLOGO = ("xlogo", "-render", "-fg", "red", "-bg", "white", "-geometry", "400x300+200+150")


@dataclass(frozen=True)
class XShot:
    box: Box
    pixels: Screen


def x11_env(base: dict[str, str], home: Path, display: str) -> dict[str, str]:
    env = app_env(base, home, {"DISPLAY": f":{display}"})
    env.pop("WAYLAND_DISPLAY", None)
    return env


def display_number(launched: Launched) -> str | None:
    """What Xwayland wrote to -displayfd 1, once it did: the display it listens on."""
    match = re.search(r"^(\d+)$", launched.output(), re.MULTILINE)
    return None if match is None else match[1]


def xwayland_with_xlogo(weston: HeadlessWeston, desktop: Screen, launched: Launched,
                        workdir: Path, *, proxied: bool = True) -> XShot:
    """Start xlogo on the Xwayland that ``launched`` runs; the screen once it is drawn."""
    progress(launched, lambda: display_number(launched) is not None,
             "Xwayland's display number")
    display = display_number(launched)
    assert display is not None
    with open(workdir / "xlogo.out", "wb") as sink:
        xlogo = subprocess.Popen(XLOGO, env=x11_env(weston.env(), workdir / "home", display),
                                 stdin=subprocess.DEVNULL, stdout=sink,
                                 stderr=subprocess.STDOUT)
    try:
        shots: list[Screen] = [shoot(weston)]

        def drawn() -> bool:
            # xlogo's window is up (enough of its background) and nothing changes.
            shots.append(shoot(weston))
            box = window_box(shots[-1], desktop)
            if box is None or not np.array_equal(shots[-1], shots[-2]):
                return False
            return int(np.all(box.crop(shots[-1]) == XLOGO_BG, axis=2).sum()) > 400 * 300 // 2

        if proxied:
            progress(launched, lambda: launched.commits() >= 1, "Xwayland's first commit")
        progress(launched, drawn, "xlogo drawn in Xwayland's window")
        assert xlogo.poll() is None, (workdir / "xlogo.out").read_text()
    finally:
        xlogo.terminate()
        xlogo.wait(timeout=30)
    box = window_box(shots[-1], desktop)
    assert box is not None
    xlogo_output = (workdir / "xlogo.out").read_text(errors="replace")
    assert not FATAL.search(xlogo_output), xlogo_output
    return XShot(box, box.crop(shots[-1]))


@pytest.fixture(scope="module")
def direct_xwayland(desktop_weston: HeadlessWeston, desktop: Screen,
                    tmp_path_factory: pytest.TempPathFactory) -> XShot:
    """Xwayland and xlogo straight to Weston."""
    workdir = tmp_path_factory.mktemp("direct-xwayland")
    wait_until(lambda: desktop_is_clear(desktop_weston, desktop),
               "the desktop to be clear of windows",
               message=lambda: f"(it differs from the empty desktop in "
               f"{what_is_on(desktop_weston, desktop)})")
    out = workdir / "xwayland.out"
    env = app_env(desktop_weston.env(), workdir / "home", {})
    with open(out, "wb") as sink:
        process = subprocess.Popen(XWAYLAND, env=env, stdin=subprocess.DEVNULL, stdout=sink,
                                   stderr=subprocess.STDOUT)
    launched = Launched(process, "", out, lambda: "", 0)  # no proxy, no counters
    try:
        shot = xwayland_with_xlogo(desktop_weston, desktop, launched, workdir, proxied=False)
    finally:
        status = launched.stop()
    assert status == 0, launched.output()
    assert not FATAL.search(launched.output()), launched.output()
    return shot


@pytest.mark.parametrize("mode", ["run", "serve"])
def test_rootful_xwayland_matches_the_direct_run(mode: Mode, proxies: Proxies,
                                                 direct_xwayland: XShot,
                                                 desktop_weston: HeadlessWeston,
                                                 desktop: Screen, tmp_path: Path) -> None:
    launched = proxies.launch(mode, XWAYLAND, {}, tmp_path)
    try:
        shot = xwayland_with_xlogo(desktop_weston, desktop, launched, tmp_path)
        assert launched.running(), launched.output()
    finally:
        status = launched.stop()
    # Xwayland ends on SIGTERM with status 0.
    check_ended_cleanly(launched, status, 0)
    assert shot.box == direct_xwayland.box
    differ = np.any(shot.pixels != direct_xwayland.pixels, axis=2)
    where = np.argwhere(differ)
    assert not where.size, (
        f"{len(where)} pixels differ from the direct run; the first at "
        f"({shot.box.left + where[0][1]}, {shot.box.top + where[0][0]})")
