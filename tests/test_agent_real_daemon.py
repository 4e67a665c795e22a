"""``qubesshm agent`` against the real qubes-guid (invisible mode, socket vchan), real clients.

The agent runs as its own process (``python3 -m qubesshm agent``), as the vchan server
of a real qubes-guid built against the socket vchan (``realguid``), which checks every
message exactly as on Qubes, and ACKs each dump without mapping it. The daemon sits
behind a ``realguid.GuidTap`` that records both directions unchanged. Clients:
weston-simple-shm, weston-simple-damage (viewport, flipped-90, scale 2), GTK 3 and GTK 4
(Wayland backend), every scenario of ``examples/scenario_client.py`` at once, and a churn
of a few hundred windows (``examples/churn_client.py`` at two sizes, and this module's
own client: toplevels of varied sizes that resize and retitle, with popups and nested
popups). For each run:

- the daemon never complains (``realguid.daemon_problems``: the lines of xside.c that
  mean the VM did something wrong) and never exits while the agent runs;
- every dump is ACKed: the agent's counters, the daemon's log and the wire agree
  (``acks == dumps + barriers``; ``pending_acks`` 0 once the clients are done);
- nothing leaks: no page leaked or deferred, every release confirmed, and once the
  clients are gone only the barrier window's one page is live;
- the windows the daemon created are the ones it destroyed plus those still open, and
  the titles the clients set are the titles of the daemon's X windows;
- the agent exits cleanly, with nothing pending, and the daemon then exits 0 ("agent EOF").

A daemon frozen (SIGSTOP) until dumps await its ACKs, then killed (SIGKILL) in the middle
of a churn, and a new one started: what awaited the dead one's ACKs goes the late path,
the new one is given every open window (CREATE, dump, MAP, a full image), the clients
never notice, and it all keeps working. (A daemon older than 1.4 cannot be had from the
real one, which always answers 1.8: the emulator's tests cover the agent's refusal.)

Window management from the app, which the agent sends of its own accord (issue 17):
xdg_toplevel.set_fullscreen before the first buffer (WINDOW_FLAGS before MAP), then
unset_fullscreen, set_fullscreen and set_minimized (one WINDOW_FLAGS each), each seen
taken in the ``_NET_WM_STATE`` the daemon writes on its X window; a move and resize of the
daemon's X window by another X client, as dom0's window manager does (the daemon's
CONFIGURE, the agent's echo, the app's new size as a new dump and CONFIGURE, and a
second CONFIGURE the daemon sends only because the echo was right); and, with the
pointer warped into the daemon's window (mapped by that X client: invisible mode never
maps it), every wp_cursor_shape_v1 shape and wl_pointer.set_cursor with an image and
with none, each change one MSG_CURSOR the daemon logs as taken, and the cursor sent
before MAP to a daemon that comes after. Invisible mode checks all of these as on Qubes
(see the comment above those tests); a malformed one (a wrong length, flags both set and
unset, a glyph past the font, a wrong echo) fails them, with the daemon's own line.

Run as a script, the module is a Wayland client for the tests (``churn``, ``hold``).
"""

from __future__ import annotations

import argparse
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

import pytest

if __name__ != "__main__":
    from realguid import (
        GuidDaemon,
        RealGuid,
        TapConnection,
        XPeer,
        created_windows,
        daemon_problems,
        destroyed_windows,
        dumps_read,
        locate_runner,
        start_daemon,
        x_window_names,
    )

    from qubesshm.guiproto import messages as gm
    from qubesshm.relay.control import read_stats

REPO = Path(__file__).resolve().parent.parent
EXAMPLES = REPO / "examples"
AGENT = [sys.executable, "-m", "qubesshm"]
SOCKET = "h10-agent"
READY = "qubesshm: agent for Wayland apps on "
TIMEOUT = 60.0
POLL = 0.05
BARRIER_PAGES = 1  # the agent's barrier window: one page, while a daemon is connected
SCREEN = (1280, 1024)  # run_guid.sh's Xvfb, the daemon's msg_xconf

T = TypeVar("T")


# -- processes ---------------------------------------------------------------------


class Agent:
    """``qubesshm agent`` serving a private runtime dir, the vchan server of ``guid``."""

    def __init__(self, guid: RealGuid, workdir: Path, *extra: str,
                 command: Sequence[str] = AGENT) -> None:
        # A short directory: Unix socket paths are limited to 107 bytes.
        self.runtime = Path(tempfile.mkdtemp(prefix="h10a-"))
        self.log_path = workdir / "agent.log"
        self.env = {k: v for k, v in os.environ.items() if k != "WAYLAND_DISPLAY"}
        self.env["XDG_RUNTIME_DIR"] = str(self.runtime)
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(
                [*command, "agent", "--socket", SOCKET, "--vchan", "socket",
                 "--vchan-dir", str(guid.sockdir), "--domid", str(guid.domid),
                 "--gui-domid", "0", "-v", *extra],
                cwd=REPO, env=self.env, stdin=subprocess.DEVNULL, stdout=log,
                stderr=subprocess.STDOUT)

    @property
    def socket_path(self) -> Path:
        return self.runtime / SOCKET

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def client_env(self, **more: str) -> dict[str, str]:
        return {**self.env, "WAYLAND_DISPLAY": SOCKET, "NO_AT_BRIDGE": "1", **more}

    def stats(self) -> dict[str, Any]:
        return read_stats(str(self.socket_path))

    def stats_cli(self) -> dict[str, Any]:
        """The counters as ``qubesshm stats --json`` prints them."""
        import json

        done = subprocess.run([*AGENT, "stats", "--socket", str(self.socket_path), "--json"],
                              cwd=REPO, env=self.env, capture_output=True, text=True,
                              timeout=TIMEOUT, check=False)
        assert done.returncode == 0, done.stderr
        data: dict[str, Any] = json.loads(done.stdout)
        return data

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(TIMEOUT)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
                raise AssertionError(f"the agent did not stop on SIGTERM:\n{self.log()}"
                                     ) from None
        return self.process.returncode

    def cleanup(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        shutil.rmtree(self.runtime, ignore_errors=True)


class App:
    """A client process of the agent; its output in a file."""

    def __init__(self, agent: Agent, name: str, argv: Sequence[str], **env: str) -> None:
        self.name = name
        self.log_path = agent.log_path.with_name(f"app.{name}.log")
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(list(argv), env=agent.client_env(**env), cwd=REPO,
                                            stdin=subprocess.DEVNULL, stdout=log,
                                            stderr=subprocess.STDOUT)

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> int:
        """SIGTERM (if still running) and its exit status."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(TIMEOUT)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode

    def wait_exit(self, timeout: float = TIMEOUT) -> int:
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"{self.name} did not finish:\n{self.output()}") from None


class Session:
    """One agent, the daemons that served it (the newest is current), its clients."""

    def __init__(self, guid: RealGuid, workdir: Path, command: Sequence[str] = AGENT) -> None:
        self.guid = guid
        self.workdir = workdir
        self.agent = Agent(guid, workdir, command=command)
        self.daemons: list[GuidDaemon] = []
        self.killed: list[GuidDaemon] = []  # by the test: their exit is no failure
        self.apps: list[App] = []
        try:
            wait_for(lambda: READY in self.agent.log(), "the agent to start", self)
        except BaseException:
            self.close()
            raise

    @property
    def daemon(self) -> GuidDaemon:
        return self.daemons[-1]

    def start_daemon(self) -> GuidDaemon:
        self.daemons.append(start_daemon(self.guid, tap=True))
        connections = len(self.daemons)
        wait_for(lambda: self.daemon_state()["connected"]
                 and self.daemon_state()["connections"] == connections,
                 f"daemon {connections} to connect", self)
        return self.daemon

    def kill_daemon(self) -> GuidDaemon:
        """SIGKILL the current daemon (until ``start_daemon``, there is none)."""
        self.killed.append(self.daemon)
        self.daemon.kill()
        return self.daemon

    def daemon_state(self) -> dict[str, Any]:
        state: dict[str, Any] = self.agent.stats()["daemon"]
        return state

    def app(self, name: str, *argv: str, **env: str) -> App:
        app = App(self.agent, name, argv, **env)
        self.apps.append(app)
        return app

    def tap(self, daemon: GuidDaemon | None = None) -> TapConnection:
        """What passed between the agent and ``daemon`` (the current one)."""
        relay = (daemon or self.daemon).tap
        assert relay is not None
        (connection,) = relay.snapshot()
        return connection

    def check_alive(self) -> None:
        """The agent and the current daemon are running, and the agent withheld nothing
        its own checks found the daemon would refuse (raise with their logs if not)."""
        if self.agent.process.poll() is not None:
            raise AssertionError(f"the agent exited ({self.agent.process.returncode}):\n"
                                 f"{self.agent.log()[-4000:]}")
        withheld = [line for line in self.agent.log().splitlines()
                    if "not sent to the GUI daemon" in line]
        if withheld:
            raise AssertionError("the agent withheld a message the daemon would refuse:\n"
                                 + "\n".join(withheld[:10]))
        if self.daemons and self.daemon not in self.killed and not self.daemon.running():
            raise AssertionError(
                f"qubes-guid exited ({self.daemon.process.returncode}) while the agent "
                f"ran:\n{self.daemon.stderr()[-4000:]}\nagent:\n{self.agent.log()[-2000:]}")

    def diagnostics(self) -> str:
        parts = [f"agent log:\n{self.agent.log()[-3000:]}"]
        if self.daemons:
            parts.append(f"daemon log:\n{self.daemon.stderr()[-3000:]}")
        try:
            parts.append(f"agent stats: {self.agent.stats()['daemon']}")
        except Exception as exc:  # only for the message
            parts.append(f"no stats: {exc}")
        parts += [f"{app.name}: {app.output()[-1000:]}" for app in self.apps]
        return "\n".join(parts)

    def close(self) -> None:
        for app in self.apps:
            app.stop()
        self.agent.cleanup()
        for daemon in self.daemons:
            daemon.stop()


def wait_for(condition: Callable[[], T | None], what: str, session: Session,
             timeout: float = TIMEOUT) -> T:
    """Poll ``condition`` until it is true (its value); fail after ``timeout`` s, or as
    soon as the agent or the daemon exits."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        session.check_alive()
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}\n"
                                 + session.diagnostics())
        time.sleep(POLL)


@pytest.fixture(scope="module")
def guid(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RealGuid]:
    real = RealGuid(locate_runner(), tmp_path_factory.mktemp("guid"))
    yield real
    real.close()


@pytest.fixture
def session(guid: RealGuid, tmp_path: Path) -> Iterator[Session]:
    running = Session(guid, tmp_path)
    try:
        running.start_daemon()
        yield running
    finally:
        running.close()


# -- what every run must show --------------------------------------------------------


def titles_on_screen(session: Session) -> dict[int, str]:
    """The title of each window the current daemon has, by the agent's window id."""
    names = x_window_names(session.guid.display)
    return {remote: names[local] for local, remote in created_windows(session.daemon.stderr())
            if local in names}


def wait_titles(session: Session, titles: Sequence[str]) -> dict[int, str]:
    """Once the daemon has windows of all ``titles``: its windows' titles."""
    def shown() -> dict[int, str] | None:
        now = titles_on_screen(session)
        return now if set(titles) <= set(now.values()) else None

    return wait_for(shown, f"the daemon's windows titled {sorted(titles)}", session)


def window_titled(shown: dict[int, str], title: str) -> int:
    (window,) = [w for w, name in shown.items() if name == title]
    return window


def settle(session: Session, open_windows: int = 0) -> dict[str, Any]:
    """The agent's counters once nothing is in flight: ``open_windows`` windows on the
    daemon, every dump ACKed, every area let go confirmed released."""
    def settled() -> dict[str, Any] | None:
        stats = session.agent.stats()
        daemon, lifetimes = stats["daemon"], stats["lifetimes"]
        done = (daemon["connected"] and daemon["windows"] == open_windows
                and daemon["pending_acks"] == 0 and lifetimes["pending_releases"] == 0)
        return stats if done else None

    return wait_for(settled, f"{open_windows} windows and nothing in flight", session)


def check_wire(connection: TapConnection, log: str,
               daemon_sent: frozenset[str] = frozenset()) -> Counter[str]:
    """The wire agrees with the daemon's log: each dump read is on the wire, and ACKed
    once; each DESTROY echoed; the agent's stream decodes whole; the daemon sent nothing
    but ACKs, DESTROY echoes and ``daemon_sent``. The agent's messages by type."""
    sent = connection.agent_messages()
    replies = connection.daemon_messages()
    kinds = Counter(m.type.name for m in sent)
    answers = Counter(m.type.name for m in replies)
    assert kinds["WINDOW_DUMP"] == len(dumps_read(log)) == answers["WINDOW_DUMP_ACK"], (
        kinds, answers)
    assert answers["DESTROY"] == kinds["DESTROY"], (kinds, answers)
    # Each title and class the agent sent was taken (invisible windows are never mapped,
    # so a class is never refused as set too late).
    assert kinds["WMNAME"] == len(re.findall(r"^set title for window ", log, re.M)), kinds
    assert kinds["WMCLASS"] == len(re.findall(r"^set class hint for window ", log, re.M))
    assert set(answers) <= {"WINDOW_DUMP_ACK", "DESTROY", *daemon_sent}, answers
    return kinds


def check_windows(log: str, open_windows: int) -> tuple[int, int]:
    """Windows the daemon created are those it destroyed, the barrier (never destroyed
    while connected) and ``open_windows``. Returns (created, destroyed), barrier aside."""
    created = created_windows(log)
    destroyed = destroyed_windows(log)
    assert len({local for local, _ in created}) == len(created)
    assert set(destroyed) <= {local for local, _ in created}
    assert len(set(destroyed)) == len(destroyed)
    assert len(created) == len(destroyed) + 1 + open_windows, (len(created), len(destroyed))
    assert created[0][1] == 1, "the barrier window comes first"
    return len(created) - 1, len(destroyed)


def check_quiet(session: Session) -> None:
    """No daemon complained; the agent logged no error and withheld nothing."""
    for number, daemon in enumerate(session.daemons, 1):
        problems = daemon_problems(daemon.stderr())
        assert problems == [], f"daemon {number} complained:\n" + "\n".join(problems[:20])
    bad = [line for line in session.agent.log().splitlines()
           if re.search(r"Traceback|Error|not sent to the GUI daemon|broke the protocol|"
                        r"failed|refused", line)]
    assert bad == [], "\n".join(bad[:20])


def check_clean_grants(stats: dict[str, Any]) -> None:
    grants, lifetimes = stats["grants"], stats["lifetimes"]
    assert grants["leaked"] == 0, grants
    assert grants["deferred"] == 0, grants
    assert grants["awaiting_unmap"] == 0, grants
    assert lifetimes["wrong_releases"] == 0, lifetimes
    assert lifetimes["pending_releases"] == 0, lifetimes


def finish(session: Session, *, connections: int = 1,
           daemon_sent: frozenset[str] = frozenset()) -> dict[str, Any]:
    """Every client has gone: the whole account, then the agent's exit and the daemon's.
    The counters before the exit. ``daemon_sent``: kinds of message the daemon may have
    sent beside ACKs and DESTROY echoes (what X events on its windows made it send)."""
    stats = settle(session)
    daemon = stats["daemon"]
    log = session.daemon.stderr()
    assert daemon["connections"] == connections
    assert daemon["acks"] == daemon["dumps"] + daemon["barriers"] or connections > 1, daemon
    check_clean_grants(stats)
    assert stats["grants"]["in_use"] == BARRIER_PAGES, stats["grants"]
    # The areas of clients that are gone end once released: they are not kept cached.
    assert stats["grants"]["live"] == BARRIER_PAGES, (
        "pages still live once every client is gone (only the barrier's may be): "
        f"{stats['grants']}")
    assert stats["clients"] == 0, "the ledger still counts clients that are gone"
    created, destroyed = check_windows(log, 0)
    kinds = check_wire(session.tap(), log, daemon_sent)
    if connections == 1:
        assert stats["lifetimes"]["forced_late"] == 0, stats["lifetimes"]
        assert (created, destroyed) == (daemon["created"], daemon["destroyed"]), daemon
        assert len(dumps_read(log)) == daemon["dumps"] + daemon["barriers"]
        assert kinds["CREATE"] == created + 1 and kinds["DESTROY"] == destroyed
    check_quiet(session)
    assert session.agent.stats_cli()["daemon"] == session.agent.stats()["daemon"]
    # The agent exits with nothing pending, ends every grant, and hangs up: the daemon
    # (GUID_ON_EOF=exit) then ends cleanly.
    assert session.agent.stop() == 0, session.agent.log()
    summary = session.agent.log().splitlines()[-1]
    assert re.search(r", 0 pending, 0 ACKs pending", summary), summary
    match = re.search(r"grant pages: (\d+) shared, (\d+) ended, 0 deferred, 0 leaked, 0 live",
                      summary)
    assert match and match[1] == match[2], summary
    assert session.daemon.wait_exit() == 0, session.daemon.stderr()[-3000:]
    assert "qubes-guid: agent EOF, restart suppressed" in session.daemon.stderr()
    assert daemon_problems(session.daemon.stderr()) == []
    return stats


def stop_apps(session: Session, *expected: int) -> None:
    """SIGTERM every client still running; each must exit with one of ``expected``."""
    for app in session.apps:
        code = app.stop()
        assert code in expected, f"{app.name} exited {code}:\n{app.output()}"


def test_the_log_check_sees_what_the_daemon_complains_of(guid: RealGuid) -> None:
    """``daemon_problems`` against the real daemon's own words: what it warns of and goes
    on (bad hints, a zero-size CONFIGURE, a popup too big to stay override-redirect), and
    what ends it; a valid stream of the same windows gives no line at all."""
    from qubesshm.guiproto.codec import encode

    window, popup = 0x10, 0x11
    valid = (encode(window, gm.Create(10, 10, 100, 80)) + encode(window, gm.WmName(b"ok"))
             + encode(window, gm.WindowDump(100, 80, tuple(range(8))))
             + encode(window, gm.Map()) + encode(window, gm.ShmImage(0, 0, 100, 80)))
    warned = (encode(window, gm.WindowHints(gm.HINT_P_MAX_SIZE, max_width=0, max_height=9))
              + encode(window, gm.Configure(10, 10, 0, 80))
              + encode(popup, gm.Create(0, 0, *SCREEN, 0, 1)) + encode(popup, gm.Map(0, 1))
              + encode(window, gm.WindowDump(100, 80, tuple(range(8)))))
    with guid.session() as run:
        run.send(valid)
        run.receive_until(1)
        assert daemon_problems(run.stderr()) == [], run.stderr()
        run.send(warned)
        run.receive_until(2)
        assert run.hang_up() == 0
        problems = daemon_problems(run.stderr())
    expected = [r"invalid PMaxSize for 0x[0-9a-f]+ \(0/9\)",
                r"Verify failed: width > 0 && height > 0",
                r"validate_override_redirect unset override_redirect for .* w=1280 h=1024.*"]
    assert len(problems) == len(expected), problems
    assert all(re.fullmatch(e, p) for e, p in zip(expected, problems, strict=True)), problems
    with guid.session() as run:
        run.send(valid + encode(window + 5, gm.Unmap()))
        assert run.wait_exit() == 1
        assert daemon_problems(run.stderr()) == [
            f"msg {int(gm.MsgType.UNMAP):#x} without CREATE for {window + 5:#x}"]


# -- weston's simple clients -----------------------------------------------------------


def test_weston_simple_shm(session: Session) -> None:
    app = session.app("simple-shm", "weston-simple-shm")
    shown = wait_titles(session, ["simple-shm"])
    start = session.daemon_state()["shmimages"]
    wait_for(lambda: session.daemon_state()["shmimages"] >= start + 60,
             "60 more frames of simple-shm", session)
    window = window_titled(shown, "simple-shm")
    assert (window, 250, 250) in dumps_read(session.daemon.stderr())
    assert session.daemon.running()
    stop_apps(session, 0, -signal.SIGTERM)
    stats = finish(session)
    assert stats["daemon"]["created"] == 1 and stats["daemon"]["dumps"] == 1, app.output()


@pytest.mark.parametrize("options", [
    (), ("--use-viewport",), ("--transform=flipped-90",), ("--scale=2",),
], ids=["plain", "viewport", "flipped-90", "scale-2"])
def test_weston_simple_damage(session: Session, options: tuple[str, ...]) -> None:
    app = session.app("simple-damage", "weston-simple-damage", *options)
    wait_titles(session, ["simple-damage"])
    start = session.daemon_state()["shmimages"]
    wait_for(lambda: session.daemon_state()["shmimages"] >= start + 40,
             "40 more damaged rectangles of simple-damage", session)
    dumps = [d for d in dumps_read(session.daemon.stderr()) if d[0] != 1]
    assert dumps and all(w > 0 and h > 0 for _, w, h in dumps), dumps
    stop_apps(session, 0, -signal.SIGTERM)
    assert "error" not in app.output().lower(), app.output()
    finish(session)


# -- GTK ------------------------------------------------------------------------------


@pytest.mark.parametrize(("argv", "env", "title"), [
    (("gtk3-demo",), {"GDK_BACKEND": "wayland"}, "Application Class"),
    (("gtk4-demo",), {"GDK_BACKEND": "wayland", "GSK_RENDERER": "cairo"}, "GTK Demo"),
], ids=["gtk3", "gtk4"])
def test_gtk(session: Session, argv: tuple[str, ...], env: dict[str, str], title: str) -> None:
    if shutil.which(argv[0]) is None:
        pytest.fail(f"{argv[0]} is not installed (.ci/install installs it)")
    app = session.app(argv[0], *argv, **env)
    shown = wait_titles(session, [title])
    window = window_titled(shown, title)

    def dumps() -> list[tuple[int, int]]:
        return [(w, h) for remote, w, h in dumps_read(session.daemon.stderr())
                if remote == window]

    # The daemon logs the title before it reads the dump that follows it.
    wait_for(lambda: bool(dumps()), f"{title}'s first dump in the daemon's log", session)
    assert all(w >= 200 and h >= 200 for w, h in dumps()), dumps()
    assert re.search(r"set class hint for window 0x[0-9a-f]+ to \(testvm:\S+, testvm:\S+\)",
                     session.daemon.stderr())
    stop_apps(session, 0, -signal.SIGTERM)
    # (Gdk-CRITICAL about a missing seat is expected: wl_seat arrives with input.)
    assert not re.search(r"Lost connection|protocol error|Error (reading|flushing)",
                         app.output(), re.I), app.output()
    finish(session)


# -- window management from the app: WINDOW_FLAGS, CURSOR, CONFIGURE echoes ----------------
#
# What the agent sends of its own accord besides a window's life, checked by the real
# daemon. In invisible mode (-I) the daemon handles each of these messages exactly as on
# Qubes (xside.c at the commit in the tool's SOURCES.txt): ``handle_message`` checks the
# length of every one (CHECK_LEN) and that its window was created, for every mode;
# ``handle_cursor`` and ``handle_wmflags`` do not look at ``g->invisible`` at all (the
# same VERIFY()s, then XDefineCursor, and for a window the daemon has not mapped, which
# in invisible mode is every window, ``_NET_WM_STATE`` written on its X window);
# ``handle_configure_from_vm`` neither (the same clamps and VERIFY, then
# XMoveResizeWindow). Only MAP (``handle_map`` returns after reading it), dumps and
# images skip their X side there.
#
# Input: the daemon sends what X tells it of its windows, and in invisible mode it never
# maps them, so nothing reaches them by itself. Another X client on its display
# (``realguid.XPeer``) plays dom0's window manager and user: it maps the daemon's window
# (the daemon then tells the agent MAP, as when a WM maps it), warps the pointer into it
# (the daemon sends KEYMAP_NOTIFY, CROSSING and MOTION from the real EnterNotify and
# MotionNotify) and moves and resizes it (the daemon's CONFIGURE from the real
# ConfigureNotify). The daemon's events are its own, produced by its own code.

# Upstream's guid.conf (the tool's) leaves allow_fullscreen false: the daemon asks the WM
# for a maximize in place of a fullscreen (and would answer the WM's maximize as
# fullscreen, a window it has mapped only).
FULLSCREEN_ON_X = ["_NET_WM_STATE_MAXIMIZED_VERT", "_NET_WM_STATE_MAXIMIZED_HORZ"]

# The agent with wp_cursor_shape_v1's XML loaded (the compositor offers the global only
# then; the bundled wayland-protocols 1.31 predates it, and ``qubesshm agent`` has no
# --protocol-dir): ``qubesshm agent`` itself, in its own process, with the compositor's
# protocol table loaded as test_compositor_seat loads it.
AGENT_WITH_XML = """\
import sys
from qubesshm.compositor import core
from qubesshm.wire.protocol import load_protocols
extra = sys.argv.pop(1)
core.load_protocols = lambda: load_protocols([extra])
from qubesshm.cli import main
raise SystemExit(main(sys.argv[1:]))
"""


def pumping(session: Session, client: Any, condition: Callable[[], T | None]
            ) -> Callable[[], T | None]:
    """``condition``, which first lets the in-test client read its events, and fails at
    once if the daemon complained (a VERIFY() it failed leaves it running)."""
    def check() -> T | None:
        problems = daemon_problems(session.daemon.stderr())
        if problems:
            raise AssertionError("qubes-guid complained:\n" + "\n".join(problems[:10]))
        client.dispatch(0.0)
        return condition()
    return check


def shown_window(session: Session, client: Any, title: str) -> tuple[int, int]:
    """``(local X window, agent's window id)`` of the window titled ``title``, once the
    daemon has read its first dump."""
    window = window_titled(wait_for(pumping(session, client, lambda: (
        shown if title in (shown := titles_on_screen(session)).values() else None)),
        f"the daemon's window titled {title!r}", session), title)
    wait_for(pumping(session, client, lambda: any(r == window for r, _, _ in
                                         dumps_read(session.daemon.stderr()))),
             f"{title}'s first dump in the daemon's log", session)
    (local,) = [lo for lo, r in created_windows(session.daemon.stderr()) if r == window]
    return local, window


def sent_to(connection: TapConnection, window: int) -> list[gm.Body]:
    return [m.body for m in connection.agent_messages() if m.window == window]


def cursors_logged(log: str) -> list[int]:
    """The value of each MSG_CURSOR the daemon took (``handle_cursor`` logs it after its
    checks, before XDefineCursor)."""
    return [int(v, 16) for v in re.findall(r"^handle_cursor, cursor = 0x([0-9a-f]+)$",
                                           log, re.M)]


def test_fullscreen_and_minimize_reach_the_daemon_as_window_flags(session: Session) -> None:
    """set_fullscreen before the first buffer goes out as WINDOW_FLAGS before MAP;
    unset_fullscreen, set_fullscreen and set_minimized of a shown window each as one
    WINDOW_FLAGS. The daemon takes each (none is refused, it never exits), and shows it
    took it: the ``_NET_WM_STATE`` it writes on its X window follows every message
    (fullscreen as maximize, guid.conf's default; minimize writes no state for a window
    it has not mapped, and drops the fullscreen)."""
    from compositor_clients import PyClient, gradient

    client = PyClient(session.agent.socket_path, timeout=TIMEOUT)
    peer = XPeer(session.guid.display)
    try:
        top = client.toplevel("h17 flags", before_commit=lambda w: w.role.set_fullscreen(None))
        client.roundtrip()
        top.ack_latest()
        client.show(top.surface, client.buffer(gradient(240, 160)))
        client.roundtrip()
        local, window = shown_window(session, client, "h17 flags")
        steps: list[tuple[str, Callable[[], None], list[str]]] = [
            ("before the first buffer", lambda: None, FULLSCREEN_ON_X),
            ("unset_fullscreen", top.role.unset_fullscreen, []),
            ("set_fullscreen", lambda: top.role.set_fullscreen(None), FULLSCREEN_ON_X),
            ("set_minimized", top.role.set_minimized, []),
        ]

        def has_state(state: list[str]) -> Callable[[], bool]:
            return lambda: peer.net_wm_state(local) == state

        for what, request, state in steps:
            request()
            client.roundtrip()
            top.ack_latest()
            wait_for(pumping(session, client, has_state(state)),
                     f"_NET_WM_STATE {state} on the daemon's window after {what}", session)
        sent = sent_to(session.tap(), window)
        flags = [b for b in sent if isinstance(b, gm.WindowFlags)]
        fullscreen, minimize = gm.WINDOW_FLAG_FULLSCREEN, gm.WINDOW_FLAG_MINIMIZE
        assert flags == [gm.WindowFlags(fullscreen, 0), gm.WindowFlags(0, fullscreen),
                         gm.WindowFlags(fullscreen, 0), gm.WindowFlags(minimize, 0)], sent
        kinds = [b.TYPE for b in sent]
        assert kinds.index(gm.MsgType.WINDOW_DUMP) < kinds.index(gm.MsgType.WINDOW_FLAGS) \
            < kinds.index(gm.MsgType.MAP), kinds
        assert session.daemon.running()
        _close(top)
        client.roundtrip()
    finally:
        peer.close()
        client.disconnect()
    finish(session)


def test_a_move_and_resize_in_dom0_is_echoed_as_the_daemon_wants(session: Session) -> None:
    """The daemon's CONFIGURE (its window moved and resized by another X client, as a WM
    does) is echoed; the app, configured to the new size, draws it, and the new area goes
    out as WINDOW_DUMP and CONFIGURE. The daemon takes all of it (its own log shows each
    CONFIGURE of the agent's with the size it expects), and it sends its next CONFIGURE,
    a move, only because the echo cleared the one it had queued (xside.c sends no other
    while one is unacknowledged)."""
    from compositor_clients import PyClient, gradient

    client = PyClient(session.agent.socket_path, timeout=TIMEOUT)
    peer = XPeer(session.guid.display)
    try:
        top = client.toplevel("h17 configure")
        client.show(top.surface, client.buffer(gradient(200, 150)))
        client.roundtrip()
        local, window = shown_window(session, client, "h17 configure")
        peer.configure(local, 100, 120, 320, 200)
        wait_for(pumping(session, client, lambda: (320, 200) in top.configures),
                 "the app to be configured to dom0's size", session)
        top.ack_latest()
        client.show(top.surface, client.buffer(gradient(320, 200, 5)))
        client.roundtrip()
        wait_for(pumping(session, client, lambda: (window, 320, 200) in
                         dumps_read(session.daemon.stderr())),
                 "the daemon to read the dump of the new size", session)
        peer.configure(local, 140, 90, 320, 200)
        echo = gm.Configure(140, 90, 320, 200, 0)
        wait_for(pumping(session, client, lambda: echo in sent_to(session.tap(), window)),
                 "the echo of the daemon's second CONFIGURE (a move)", session)
        connection = session.tap()
        asked = [m.body for m in connection.daemon_messages()
                 if m.type == gm.MsgType.CONFIGURE]
        assert asked == [gm.Configure(100, 120, 320, 200, 0), echo], asked
        configures = [b for b in sent_to(connection, window) if isinstance(b, gm.Configure)]
        # The echo, the new area's CONFIGURE, the echo of the move.
        assert configures == [gm.Configure(100, 120, 320, 200, 0)] * 2 + [echo], configures

        def taken() -> list[tuple[str, ...]]:
            found: list[tuple[str, ...]] = re.findall(
                r"^handle_configure_from_vm, local 0x[0-9a-f]+ remote "
                rf"{window:#x}, (\d+)/(\d+), was (\d+)/(\d+), ovr=0 \(ignored\), "
                r"xy (-?\d+)/(-?\d+), was (-?\d+)/(-?\d+)$", session.daemon.stderr(), re.M)
            return found

        # The echo is on the wire; the daemon may not have read it yet.
        wait_for(pumping(session, client, lambda: len(taken()) >= 3),
                 "the daemon to take the agent's three CONFIGUREs", session)
        assert taken() == [("320", "200", "320", "200", "100", "120", "100", "120")] * 2 + [
            ("320", "200", "320", "200", "140", "90", "140", "90")], taken()
        assert session.daemon.running()
        _close(top)
        client.roundtrip()
    finally:
        peer.close()
        client.disconnect()
    finish(session, daemon_sent=frozenset({"CONFIGURE"}))


@pytest.fixture
def shapes_session(guid: RealGuid, tmp_path: Path) -> Iterator[Session]:
    """A session whose agent offers wp_cursor_shape_v1 (its XML loaded)."""
    from test_compositor_seat import CURSOR_SHAPE_XML

    xml = tmp_path / "xml"
    xml.mkdir()
    (xml / "cursor-shape-v1.xml").write_text(CURSOR_SHAPE_XML)
    running = Session(guid, tmp_path, command=[sys.executable, "-c", AGENT_WITH_XML, str(xml)])
    try:
        running.start_daemon()
        yield running
    finally:
        running.close()


def test_cursor_shapes_reach_the_daemon_as_msg_cursor(shapes_session: Session) -> None:
    """With the pointer in the window (the daemon's CROSSING and MOTION from a real
    pointer warp), every wp_cursor_shape_v1 shape, then set_cursor with a surface of the
    app's, a shape again, and set_cursor with none (hidden): each change of glyph is one
    MSG_CURSOR, an X cursor-font glyph or the default, and the daemon takes every one
    (``handle_cursor`` logs each value after its checks, in the order sent). A daemon
    that comes after gets the window's cursor before its MAP."""
    from compositor_clients import PyClient, gradient
    from pywayland.protocol.cursor_shape_v1 import WpCursorShapeManagerV1
    from pywayland.protocol.wayland import WlSeat

    from qubesshm.agent.cursors import cursor_message
    from qubesshm.compositor.cursor import SHAPES

    session = shapes_session
    client = PyClient(session.agent.socket_path, timeout=TIMEOUT)
    peer = XPeer(session.guid.display)
    try:
        assert "wp_cursor_shape_manager_v1" in client.globals
        seat = client.bind(WlSeat, 5)
        capabilities: list[int] = []
        seat.dispatcher["capabilities"] = lambda _, caps: capabilities.append(caps)
        client.roundtrip()
        assert capabilities and capabilities[-1] & WlSeat.capability.pointer.value
        pointer = seat.get_pointer()
        enters: list[int] = []
        pointer.dispatcher["enter"] = lambda _, serial, surface, x, y: enters.append(serial)
        device = client.bind(WpCursorShapeManagerV1, 1).get_pointer(pointer)
        top = client.toplevel("h17 cursors")
        client.show(top.surface, client.buffer(gradient(200, 150)))
        client.roundtrip()
        local, window = shown_window(session, client, "h17 cursors")
        peer.warp(0, 0, 0)
        peer.map(local)
        wait_for(lambda: peer.viewable(local), "the daemon's window to be mapped", session)
        peer.warp(local, 20, 30)
        wait_for(pumping(session, client, lambda: enters), "the pointer to enter the app's window",
                 session)
        serial = enters[-1]
        text = next(number for number, name in SHAPES.items() if name == "text")
        expected: list[int] = []
        current = gm.CURSOR_DEFAULT

        def expect(shape: str | None) -> None:
            nonlocal current
            value = cursor_message(shape).cursor
            if value != current:
                expected.append(value)
                current = value

        for number, name in sorted(SHAPES.items()):
            device.set_shape(serial, number)
            expect(name)
        shapes = len(expected)
        # From a glyph each time, so that each of these is a change: the app's own image
        # and a hidden cursor are the default cursor.
        image = client.compositor.create_surface()
        device.set_shape(serial, text)
        expect("text")
        pointer.set_cursor(serial, image, 4, 4)
        client.show(image, client.buffer(gradient(16, 16, 9)))
        expect("default")
        device.set_shape(serial, text)
        expect("text")
        pointer.set_cursor(serial, None, 0, 0)
        expect(None)
        device.set_shape(serial, text)
        expect("text")
        client.roundtrip()
        assert shapes >= 20 and gm.CURSOR_DEFAULT in expected[:shapes], expected
        glyph = cursor_message("text").cursor
        assert expected[shapes:] == [glyph, gm.CURSOR_DEFAULT] * 2 + [glyph], expected
        wait_for(pumping(session, client, lambda: len(cursors_logged(session.daemon.stderr()))
                         >= len(expected)),
                 f"the daemon to take {len(expected)} MSG_CURSOR", session)
        assert cursors_logged(session.daemon.stderr()) == expected
        sent = [b.cursor for b in sent_to(session.tap(), window) if isinstance(b, gm.Cursor)]
        assert sent == expected
        assert session.daemon.running()
        first = session.daemon
        # A new daemon: the window's cursor (text) before its MAP.
        session.kill_daemon()
        wait_for(lambda: not session.daemon_state()["connected"],
                 "the agent to see the daemon go", session)
        session.start_daemon()
        local, window = shown_window(session, client, "h17 cursors")
        wait_for(pumping(session, client, lambda: cursors_logged(session.daemon.stderr())),
                 "the new daemon to take the window's cursor", session)
        assert cursors_logged(session.daemon.stderr()) == [expected[-1]]
        kinds = wait_for(lambda: (k if gm.MsgType.MAP in (k := [
            b.TYPE for b in sent_to(session.tap(), window)]) else None),
            "the window's MAP to the new daemon", session)
        assert kinds.index(gm.MsgType.WINDOW_DUMP) < kinds.index(gm.MsgType.CURSOR) \
            < kinds.index(gm.MsgType.MAP), kinds
        assert daemon_problems(first.stderr()) == []
        _close(top)
        image.destroy()
        client.roundtrip()
    finally:
        peer.close()
        client.disconnect()
    finish(session, connections=2,
           daemon_sent=frozenset({"MAP", "KEYMAP_NOTIFY", "CROSSING", "MOTION"}))


# -- the scenario client: every route to the screen, at once ------------------------------


def test_every_scenario_at_once(session: Session, tmp_path: Path) -> None:
    from screenshots import example

    scenarios: list[str] = list(example("scenario_client").SCENARIOS)
    ready = {name: tmp_path / f"ready.{name}" for name in scenarios}
    for number, name in enumerate(scenarios):
        session.app(name, sys.executable, str(EXAMPLES / "scenario_client.py"),
                    "--scenario", name, "--width", str(120 + 8 * number), "--height", "90",
                    "--frames", "6", "--ready-file", str(ready[name]), "--hold", "120",
                    "--quiet")
    wait_for(lambda: all(path.exists() for path in ready.values())
             or any(app.process.poll() is not None for app in session.apps),
             "every scenario client to present its last frame", session)
    for app in session.apps:
        assert app.process.poll() is None, f"{app.name}: {app.output()}"
    shown = wait_titles(session, [f"qubesshm scenario {name}" for name in scenarios])
    settle(session, open_windows=len(scenarios))
    sizes = {remote: (w, h) for remote, w, h in dumps_read(session.daemon.stderr())}
    for number, name in enumerate(scenarios):
        window = window_titled(shown, f"qubesshm scenario {name}")
        assert sizes[window] == (120 + 8 * number, 90), name
    check_windows(session.daemon.stderr(), len(scenarios))
    stop_apps(session, 0)
    finish(session)


# -- window churn -------------------------------------------------------------------------


def test_churn_of_windows_and_popups(session: Session) -> None:
    churn = str(EXAMPLES / "churn_client.py")
    clients = [
        session.app("churn-small", sys.executable, churn, "--windows", "80", "--size",
                    "64x48", "--concurrency", "3"),
        session.app("churn-big", sys.executable, churn, "--windows", "30", "--size",
                    "900x700", "--frames", "2", "--concurrency", "2"),
        session.app("churn-popups", sys.executable, __file__, "churn", "--windows", "90",
                    "--seed", "16"),
    ]
    for app in clients:
        assert app.wait_exit() == 0, f"{app.name}:\n{app.output()}"
        session.check_alive()
    connection = session.tap()
    titles = Counter(m.body.name.decode() for m in connection.agent_messages()
                     if isinstance(m.body, gm.WmName))
    assert {f"qubesshm churn {n}" for n in range(80)} <= set(titles)
    assert {f"h10 churn {n}" for n in range(90)} <= set(titles)
    assert any(title.endswith(" renamed") for title in titles)
    creates = [m.body for m in connection.agent_messages() if isinstance(m.body, gm.Create)]
    popups = [c for c in creates if c.override_redirect]
    assert len(popups) >= 30 and len(creates) >= 80 + 30 + 90 + len(popups)
    sizes = {(c.width, c.height) for c in creates}
    assert len(sizes) >= 50, sizes
    stats = finish(session)
    assert stats["daemon"]["created"] >= 200
    configures = sum(1 for m in connection.agent_messages()
                     if m.type == gm.MsgType.CONFIGURE)
    assert configures >= 10


# -- the daemon restarts ------------------------------------------------------------------


def test_a_daemon_killed_mid_run_is_replaced_and_shown_every_window(
        session: Session, tmp_path: Path) -> None:
    ready, held = tmp_path / "ready", tmp_path / "held"
    session.app("simple-shm", "weston-simple-shm")
    session.app("scenario", sys.executable, str(EXAMPLES / "scenario_client.py"),
                "--scenario", "static", "--ready-file", str(ready), "--hold", "120",
                "--quiet")
    session.app("holder", sys.executable, __file__, "hold", "--ready-file", str(held))
    stable = ["simple-shm", "qubesshm scenario static", "h10 holder"]
    wait_for(lambda: ready.exists() and held.exists(), "the clients", session)
    wait_titles(session, stable)
    settle(session, open_windows=4)  # three toplevels and a popup
    # Windows come and go throughout; the daemon stops answering (SIGSTOP) until dumps
    # await their ACKs, then dies with them unanswered (SIGKILL).
    churn = session.app("churn", sys.executable, str(EXAMPLES / "churn_client.py"),
                        "--windows", "200", "--size", "96x64", "--concurrency", "2",
                        "--rate", "80", "--progress")
    wait_for(lambda: "opened 20\n" in churn.output(), "the churn to start", session)
    first = session.daemon
    first.freeze()
    wait_for(lambda: session.daemon_state()["pending_acks"] >= 3,
             "dumps awaiting the frozen daemon's ACKs", session)
    session.kill_daemon()
    wait_for(lambda: not session.daemon_state()["connected"], "the agent to see the daemon go",
             session)
    late_before = session.agent.stats()["lifetimes"]["forced_late"]
    assert late_before > 0, "the areas awaiting the dead daemon's ACKs went the late path"
    assert all(app.process.poll() is None for app in session.apps[:3])

    second = session.start_daemon()
    # Areas let go while no daemon was there went late too; from now on, none does.
    late_after = session.agent.stats()["lifetimes"]["forced_late"]
    assert late_after >= late_before
    # Every open window again (after the barrier): CREATE, the dump of its current
    # area, MAP, one full SHMIMAGE; the same titles on the new daemon's X windows.
    shown = wait_titles(session, stable)
    connection = session.tap()
    sent = connection.agent_messages()
    assert [m.window for m in sent[:1]] == [1] and sent[0].type == gm.MsgType.CREATE
    for title in stable:
        window = window_titled(shown, title)
        kinds = [m.type for m in sent if m.window == window]
        assert kinds[0] == gm.MsgType.CREATE, kinds
        assert kinds.index(gm.MsgType.WINDOW_DUMP) < kinds.index(gm.MsgType.MAP) < \
            kinds.index(gm.MsgType.SHMIMAGE), kinds
    popups = [m.window for m in sent
              if isinstance(m.body, gm.Create) and m.body.override_redirect]
    assert popups, "the holder's popup was not given to the new daemon"
    popup_kinds = [m.type for m in sent if m.window == popups[0]]
    assert popup_kinds[:1] == [gm.MsgType.CREATE] and gm.MsgType.MAP in popup_kinds
    assert {r for r, _, _ in dumps_read(second.stderr())} >= set(shown)
    # ... and it keeps working: simple-shm draws on, the churn ends, a new client shows.
    start = session.daemon_state()["shmimages"]
    wait_for(lambda: session.daemon_state()["shmimages"] >= start + 30,
             "simple-shm to keep drawing on the new daemon", session)
    assert churn.wait_exit() == 0, churn.output()
    session.app("simple-damage", "weston-simple-damage")
    wait_titles(session, ["simple-damage"])
    settle(session, open_windows=5)
    stop_apps(session, 0, -signal.SIGTERM)
    stats = settle(session)
    # Across both daemons the wire and the counters agree: the dead one's last dumps
    # were never ACKed, every one sent to the new one was. (The agent may have sent the
    # dead one a few more than the tap read from it before it died.)
    assert first.tap is not None
    (old,) = first.tap.snapshot()
    old_sent = Counter(m.type.name for m in old.agent_messages())
    old_acks = Counter(m.type.name for m in old.daemon_messages())["WINDOW_DUMP_ACK"]
    new_sent = Counter(m.type.name for m in session.tap().agent_messages())
    daemon = stats["daemon"]
    assert old_acks < old_sent["WINDOW_DUMP"]
    assert daemon["dumps"] + daemon["barriers"] >= old_sent["WINDOW_DUMP"] + \
        new_sent["WINDOW_DUMP"]
    assert daemon["acks"] == old_acks + new_sent["WINDOW_DUMP"]
    assert stats["lifetimes"]["forced_late"] == late_after
    assert daemon_problems(first.stderr()) == []
    finish(session, connections=2)


# -- this module as a Wayland client -----------------------------------------------------


def _client_path() -> Path:
    return Path(os.environ["XDG_RUNTIME_DIR"]) / os.environ["WAYLAND_DISPLAY"]


def _close(window: Any, buffers: Sequence[Any] = ()) -> None:
    """Destroy a window (its role first), then its buffers."""
    window.role.destroy()
    window.xdg_surface.destroy()
    window.surface.destroy()
    for buffer in buffers:
        buffer.proxy.destroy()
        buffer.memory.close()


def churn_client(windows: int, seed: int, concurrency: int) -> int:
    """Toplevels of varied sizes, some resized and retitled, half with popups (some
    nested), opened and closed with up to ``concurrency`` open at once."""
    from collections import deque

    from compositor_clients import PyClient, gradient
    from pywayland.protocol.xdg_shell import XdgPositioner

    rng = random.Random(seed)
    client = PyClient(_client_path(), timeout=TIMEOUT)
    buffers: dict[int, list[Any]] = {}  # by window (id of its surface proxy)

    def show(window: Any, width: int, height: int) -> None:
        buffer = client.buffer(gradient(width, height, rng.randrange(256)))
        buffers.setdefault(id(window.surface), []).append(buffer)
        done = client.show(window.surface, buffer, frame=True)
        client.wait(lambda: bool(done), "a frame callback")
        window.ack_latest()

    def size() -> tuple[int, int]:
        kind = rng.random()
        if kind < 0.2:
            return rng.randrange(1, 17), rng.randrange(1, 17)
        if kind < 0.7:
            return rng.randrange(17, 300), rng.randrange(17, 300)
        if kind < 0.95:
            return rng.randrange(300, 900), rng.randrange(200, 700)
        return rng.randrange(900, 1500), rng.randrange(700, 1100)

    adjust = XdgPositioner.constraint_adjustment
    adjustments = [adjust.none, adjust.slide_x | adjust.slide_y,
                   adjust.flip_x | adjust.flip_y | adjust.slide_y,
                   adjust.resize_x | adjust.resize_y, adjust.slide_x | adjust.resize_y]

    def popup(parent: Any, parent_size: tuple[int, int]) -> Any:
        positioner = client.wm_base.create_positioner()
        width, height = rng.randrange(1, 300), rng.randrange(1, 250)
        positioner.set_size(width, height)
        positioner.set_anchor_rect(rng.randrange(parent_size[0]), rng.randrange(parent_size[1]),
                                   1, 1)
        positioner.set_anchor(rng.choice(list(XdgPositioner.anchor)).value)
        positioner.set_gravity(rng.choice(list(XdgPositioner.gravity)).value)
        positioner.set_constraint_adjustment(rng.choice(adjustments).value)
        window = client.popup(parent, positioner)
        positioner.destroy()
        _, _, w, h = window.configures[-1]
        show(window, max(w, 1), max(h, 1))
        return window, (max(w, 1), max(h, 1))

    def close(family: list[Any]) -> None:
        for window in reversed(family):  # popups first, the topmost first
            _close(window, buffers.pop(id(window.surface), []))

    open_windows: deque[list[Any]] = deque()
    for number in range(windows):
        if len(open_windows) >= concurrency:
            close(open_windows.popleft())
        toplevel = client.toplevel(
            f"h10 churn {number}",
            before_commit=lambda w: w.role.set_app_id("h10.churn"))
        width, height = size()
        show(toplevel, width, height)
        family = [toplevel]
        if rng.random() < 0.3:
            width, height = size()
            show(toplevel, width, height)
        if rng.random() < 0.3:
            toplevel.role.set_title(f"h10 churn {number} renamed")
        if rng.random() < 0.5:
            window, place = popup(toplevel, (width, height))
            family.append(window)
            if rng.random() < 0.4:
                family.append(popup(window, place)[0])
        open_windows.append(family)
    while open_windows:
        close(open_windows.popleft())
    client.roundtrip()
    client.disconnect()
    return 0


def hold_client(ready_file: Path) -> int:
    """A toplevel with a popup, shown until SIGTERM (frames and pings answered)."""
    from compositor_clients import PyClient, gradient
    from pywayland.protocol.xdg_shell import XdgPositioner

    stop: list[int] = []
    signal.signal(signal.SIGTERM, lambda number, frame: stop.append(number))
    client = PyClient(_client_path(), timeout=TIMEOUT)
    toplevel = client.toplevel("h10 holder")
    done = client.show(toplevel.surface, client.buffer(gradient(300, 200)), frame=True)
    client.wait(lambda: bool(done), "the holder's frame")
    positioner = client.wm_base.create_positioner()
    positioner.set_size(120, 80)
    positioner.set_anchor_rect(150, 100, 1, 1)
    positioner.set_anchor(XdgPositioner.anchor.bottom_right.value)
    positioner.set_gravity(XdgPositioner.gravity.bottom_right.value)
    popup = client.popup(toplevel, positioner)
    done = client.show(popup.surface, client.buffer(gradient(120, 80, 7)), frame=True)
    client.wait(lambda: bool(done), "the popup's frame")
    ready_file.write_text("ready\n")
    while not stop:
        client.dispatch(0.2)
    _close(popup)
    _close(toplevel)
    client.roundtrip()
    client.disconnect()
    return 0


def client_main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(description="Wayland clients of this test module")
    sub = parser.add_subparsers(dest="mode", required=True)
    churn = sub.add_parser("churn")
    churn.add_argument("--windows", type=int, default=100)
    churn.add_argument("--seed", type=int, default=0)
    churn.add_argument("--concurrency", type=int, default=4)
    hold = sub.add_parser("hold")
    hold.add_argument("--ready-file", type=Path, required=True)
    args = parser.parse_args(argv)
    if args.mode == "churn":
        return churn_client(args.windows, args.seed, args.concurrency)
    return hold_client(args.ready_file)


if __name__ == "__main__":
    sys.exit(client_main(sys.argv[1:]))
