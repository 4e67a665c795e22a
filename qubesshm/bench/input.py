"""``qubesshm bench input``: how long a key press takes to reach a Wayland client.

Two paths, each on a private Xvfb of its own, each with the same client
(``input_client``, pywayland) mapped and given the keyboard: the baseline,
Weston (its x11 backend, pixman renderer) showing the client in its X window;
and agent mode, ``qubesshm agent`` whose window ``qubesshm guid-emulator``
shows as an X window. The benchmark gives the X window showing the client the
X input focus, then presses and releases one key (``KEY_A``, X key code 38)
``--presses`` times per path through XTest, alternating between the paths,
``--gap`` s apart. A press's latency is the client's receipt of its
``wl_keyboard.key`` (the time its handler ran) minus the moment just before the
XTest request went to the X server, both CLOCK_MONOTONIC on this machine. It
prints each path's median, 90th percentile and extremes, and the median the
agent path adds; ``--json`` writes every latency too. A press that does not
reach a client within ``--timeout`` s ends that path's measurement and the
run's status is 1.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import select
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from ..grants.files import write_output
from .agent_path import start_agent_path
from .machine import describe_machine, load_line, weston_version
from .private_x import PrivateX, private_xvfb, xvfb_command
from .processes import exited, process, wait_for_socket
from .xtest import XTest, XTestError

KEY_A = 30  # evdev; X key code = evdev + 8
X_OFFSET = 8
TITLE = "qubesshm bench input"
CLIENT_SIZE = (320, 240)
WESTON_SIZE = (640, 480)
X_SIZE = (1024, 768)
START_TIMEOUT = 30.0
GOAL_ADDED_MS = 1.0
WESTON_INI = """\
[core]
idle-time=0
[shell]
startup-animation=none
close-animation=none
animation=none
focus-animation=none
"""


class Client:
    """``input_client`` running on one path: its event lines, read as they come."""

    def __init__(self, proc: subprocess.Popen[bytes], what: str, log: Path) -> None:
        self.proc = proc
        self.what = what
        self.log = log
        assert proc.stdout is not None
        self.out: IO[bytes] = proc.stdout
        self.buffer = b""
        self.lines: list[dict[str, Any]] = []
        # Whether its window has the keyboard, after every line read so far (an enter
        # can come before the lines a caller waits for, and be dropped with them).
        self.keyboard = False

    def _read(self, timeout: float) -> None:
        ready, _, _ = select.select([self.out], [], [], max(timeout, 0.0))
        if not ready:
            return
        chunk = os.read(self.out.fileno(), 65536)
        if not chunk:
            self.proc.wait()
            raise RuntimeError(exited(f"the input client on the {self.what} path", self.proc,
                                      self.log))
        self.buffer += chunk
        *complete, self.buffer = self.buffer.split(b"\n")
        for raw in complete:
            if not raw:
                continue
            line = json.loads(raw)
            if line["ev"] in ("kb_enter", "kb_leave") and line.get("surface") == "main":
                self.keyboard = line["ev"] == "kb_enter"
            self.lines.append(line)

    def next(self, want: Callable[[dict[str, Any]], bool], timeout: float,
             what: str) -> dict[str, Any] | None:
        """The first event line (dropping the ones before it) for which ``want`` is
        true, or None when none comes within ``timeout`` s."""
        deadline = time.monotonic() + timeout
        while True:
            while self.lines:
                line = self.lines.pop(0)
                if want(line):
                    return line
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            self._read(remaining)

    def expect(self, want: Callable[[dict[str, Any]], bool], timeout: float,
               what: str) -> dict[str, Any]:
        line = self.next(want, timeout, what)
        if line is None:
            raise RuntimeError(f"the input client on the {self.what} path: no {what} within "
                               f"{timeout:g} s")
        return line

    def quit(self) -> None:
        if self.proc.poll() is None and self.proc.stdin is not None:
            with contextlib.suppress(BrokenPipeError):
                self.proc.stdin.write(b"quit\n")
                self.proc.stdin.flush()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=10)


@contextlib.contextmanager
def input_client(env: dict[str, str], display: Path, what: str,
                 workdir: Path) -> Iterator[Client]:
    log = workdir / f"client-{what}.log"
    with open(log, "ab") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "qubesshm.bench.input_client", "--title", TITLE,
             "--size", "x".join(map(str, CLIENT_SIZE))],
            env=dict(env, WAYLAND_DISPLAY=str(display)), stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, stderr=err)
    client = Client(proc, what, log)
    try:
        yield client
    finally:
        client.quit()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for pipe in (proc.stdin, proc.stdout):
            if pipe is not None:
                with contextlib.suppress(OSError):
                    pipe.close()


@contextlib.contextmanager
def weston_on_x(env: dict[str, str], workdir: Path, screen: PrivateX) -> Iterator[Path]:
    """Weston with its x11 backend (pixman) on ``screen``: its socket."""
    weston = shutil.which("weston")
    if weston is None:
        raise RuntimeError("weston is not installed (Debian package 'weston'); it is the "
                           "baseline")
    config = workdir / "weston.ini"
    config.write_text(WESTON_INI)
    socket = workdir / "wayland-bench-input"
    log = workdir / "weston.log"
    width, height = WESTON_SIZE
    with process([weston, f"--config={config}", "--backend=x11-backend.so", "--use-pixman",
                  f"--width={width}", f"--height={height}", f"--socket={socket.name}",
                  "--idle-time=0"],
                 dict(env, DISPLAY=screen.display), log) as proc:
        wait_for_socket(socket, proc, "weston (x11 backend)", log)
        yield socket


@dataclass
class InputPath:
    """One path being measured: its X server, the X window showing the client, the
    client, and the latencies so far."""

    name: str
    x: XTest
    client: Client
    window: int = 0
    latencies_ms: list[float] = field(default_factory=list)
    missed: bool = False

    def press(self, timeout: float) -> bool:
        """One press and release; False (and ``missed``) if the press never arrived."""
        code = KEY_A + X_OFFSET
        sent = self.x.key(code, True)
        got = self.client.next(lambda e: e["ev"] == "key" and e["key"] == KEY_A
                               and e["state"] == 1, timeout, "key press")
        self.x.key(code, False)
        if got is None:
            self.missed = True
            return False
        self.latencies_ms.append((int(got["t"]) - sent) / 1e6)
        released = self.client.next(lambda e: e["ev"] == "key" and e["key"] == KEY_A
                                    and e["state"] == 0, timeout, "key release")
        if released is None:
            self.missed = True
            return False
        return True


def _focus(path: InputPath, window_name: bytes, timeout: float) -> None:
    """X focus to the window showing the client; returns once the client has the
    keyboard (its wl_keyboard.enter, which may have come before the client said it was
    ready)."""
    path.window = path.x.find_window(window_name, timeout)
    path.x.focus(path.window, timeout)
    _keyboard(path, timeout)


def _keyboard(path: InputPath, timeout: float) -> None:
    """Returns once the client's window has the keyboard."""
    if not path.client.keyboard:
        path.client.expect(lambda e: e["ev"] == "kb_enter" and e["surface"] == "main",
                           timeout, "wl_keyboard.enter after the X focus")


def percentile(values: list[float], share: float) -> float:
    """The nearest-rank percentile (``share`` 0.9: the 90th)."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(share * len(ordered)) - 1)]


def run_input_bench(args: argparse.Namespace) -> int:
    xvfb_command()  # a missing Xvfb or Weston is said before anything starts
    if shutil.which("weston") is None:
        raise RuntimeError("weston is not installed (Debian package 'weston'); it is the "
                           "baseline")
    print(describe_machine())
    print(f"weston: {weston_version() or 'version unknown'}")
    paths: list[InputPath] = []
    with contextlib.ExitStack() as stack:
        workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="qsbench-")))
        workdir.chmod(0o700)
        env = {k: v for k, v in os.environ.items()
               if k not in ("QUBESSHM_SIM_ROOT", "WAYLAND_DISPLAY", "WAYLAND_SOCKET",
                            "DISPLAY")}
        env.update(XDG_RUNTIME_DIR=str(workdir), QUBESSHM_GRANTS="sim")
        # The baseline: Weston in an X window of its own Xvfb.
        weston_x = stack.enter_context(private_xvfb(*X_SIZE))
        weston_socket = stack.enter_context(weston_on_x(env, workdir, weston_x))
        print(f"weston path: Weston's x11 backend (pixman renderer, a {WESTON_SIZE[0]}x"
              f"{WESTON_SIZE[1]} output, desktop shell) on {weston_x.describe()}")
        # Weston's window has the X focus before the client maps: the X focus moving to
        # it later can take the keyboard from the toplevel Weston's shell gave it to
        # (a leave, and no enter again), about 1 start in 3 on a loaded 2-core machine.
        weston_xtest = stack.enter_context(_xtest(weston_x.display))
        weston_window = weston_xtest.find_window(b"Weston Compositor - screen0",
                                                 START_TIMEOUT)
        weston_xtest.focus(weston_window, START_TIMEOUT)
        weston = InputPath("weston", weston_xtest,
                           stack.enter_context(input_client(env, weston_socket, "weston",
                                                            workdir)), weston_window)
        weston.client.expect(lambda e: e["ev"] == "ready", START_TIMEOUT, "ready line")
        _keyboard(weston, START_TIMEOUT)
        paths.append(weston)
        # Agent mode: the agent and the emulator, the client's window on the emulator's X.
        agent_x = stack.enter_context(private_xvfb(*X_SIZE))
        agent_dir = workdir / "agent"
        agent_dir.mkdir(mode=0o700)
        agent_path = start_agent_path(stack, env, agent_dir, agent_x.display)
        print(f"agent path: {agent_path.describe(agent_x.describe())}")
        agent = InputPath("agent", stack.enter_context(_xtest(agent_x.display)),
                      stack.enter_context(input_client(env, agent_path.socket, "agent",
                                                       workdir)))
        agent.client.expect(lambda e: e["ev"] == "ready", START_TIMEOUT, "ready line")
        _focus(agent, TITLE.encode(), START_TIMEOUT)
        paths.append(agent)
        print(f"client: python3 -m qubesshm.bench.input_client (pywayland), "
              f"{CLIENT_SIZE[0]}x{CLIENT_SIZE[1]}, with the keyboard focus on both paths")
        for _ in range(args.presses):
            for path in paths:
                if not path.missed:
                    path.press(args.timeout)
            time.sleep(args.gap)
    report(paths, args)
    print(f"\n{load_line()} after the run")
    if args.json:
        data = {"presses": args.presses, "gap": args.gap,
                **{p.name: {"latencies_ms": p.latencies_ms, "received": len(p.latencies_ms),
                            "median_ms": _median(p.latencies_ms)} for p in paths},
                "added_ms": _added(paths)}
        write_output(Path(args.json), json.dumps(data, indent=2) + "\n")
    return 1 if any(p.missed for p in paths) else 0


@contextlib.contextmanager
def _xtest(display: str) -> Iterator[XTest]:
    try:
        x = XTest(display)
    except XTestError as exc:
        raise RuntimeError(str(exc)) from exc
    try:
        yield x
    finally:
        x.close()


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def _added(paths: list[InputPath]) -> float | None:
    medians = {p.name: _median(p.latencies_ms) for p in paths}
    agent, weston = medians.get("agent"), medians.get("weston")
    return agent - weston if agent is not None and weston is not None else None


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def report(paths: list[InputPath], args: argparse.Namespace) -> None:
    print(f"\n{args.presses} presses of KEY_A (X key code {KEY_A + X_OFFSET}) per path through "
          f"XTest, alternating between the paths, {args.gap * 1000:g} ms apart; latency = the "
          "client's wl_keyboard.key (pressed) handler minus the moment before the XTest "
          "request was sent (CLOCK_MONOTONIC), in ms:")
    print(f"{'path':<8} {'received':>9} {'median':>8} {'p90':>8} {'min':>8} {'max':>8}")
    for p in paths:
        values = p.latencies_ms
        print(f"{p.name:<8} {f'{len(values)}/{args.presses}':>9} {_fmt(_median(values)):>8} "
              f"{_fmt(percentile(values, 0.9) if values else None):>8} "
              f"{_fmt(min(values) if values else None):>8} "
              f"{_fmt(max(values) if values else None):>8}")
    for p in paths:
        if p.missed:
            print(f"{p.name}: press {len(p.latencies_ms) + 1} did not reach the client within "
                  f"{args.timeout:g} s; that path's measurement ended there")
    print(f"added by the agent path (median agent - median weston): {_fmt(_added(paths))} ms "
          f"(goal <= {GOAL_ADDED_MS:g} ms)")
