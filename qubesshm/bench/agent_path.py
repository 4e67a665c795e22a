"""The agent path a benchmark measures: ``qubesshm agent`` + ``qubesshm guid-emulator``.

``start_agent_path`` starts, in a benchmark's private directory, the agent (the
apps' Wayland compositor, its windows sent as grant refs on a socket vchan, on
the simulated hypervisor with a Qubes VM's kernel parameters) and the GUI-daemon
emulator showing them on an X display, as the separate processes they are in
use; it returns once the emulator is connected, with the agent's Wayland socket
and the pids whose CPU time a benchmark reads. Each process writes its output
to a log in the directory; one that fails is reported with its last lines.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..headless import compositor_is_running
from ..relay.control import StatsError, read_stats

AGENT_DOMID = 1  # the VM's domain; the emulator is the GUI domain, 0
GUI_DOMID = 0
START_TIMEOUT = 30.0
POLL = 0.05


@dataclass(frozen=True)
class AgentPath:
    socket: Path  # the agent's Wayland socket
    agent_pid: int
    emulator_pid: int
    refresh: float

    def describe(self, x_display: str) -> str:
        return (f"qubesshm agent (--refresh {self.refresh:g}, simulated grants with a Qubes "
                f"VM's kernel parameters, socket vchan) + qubesshm guid-emulator on "
                f"{x_display}")

    def stats(self) -> dict[str, Any]:
        return read_stats(str(self.socket))


@dataclass
class _Logged:
    name: str
    proc: subprocess.Popen[bytes]
    log: Path

    def failure(self) -> str:
        try:
            lines = self.log.read_text(errors="replace").strip().splitlines()
        except OSError:
            lines = []
        tail = f": {' / '.join(lines[-3:])}" if lines else ""
        return f"{self.name} exited with status {self.proc.returncode}{tail}"


@contextlib.contextmanager
def _logged(name: str, args: list[str], env: dict[str, str], log: Path) -> Iterator[_Logged]:
    with open(log, "wb") as out:
        proc = subprocess.Popen(args, env=env, stdin=subprocess.DEVNULL, stdout=out,
                                stderr=subprocess.STDOUT, process_group=0)
    try:
        yield _Logged(name, proc, log)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def _wait(condition: Any, what: str, *procs: _Logged) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while not condition():
        for p in procs:
            if p.proc.poll() is not None:
                raise RuntimeError(p.failure())
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out after {START_TIMEOUT:g} s waiting for {what}")
        time.sleep(POLL)


def _connected(socket: Path) -> bool:
    try:
        daemon = read_stats(str(socket))["daemon"]
    except StatsError:
        return False
    return bool(daemon["connected"])


def start_agent_path(stack: contextlib.ExitStack, env: dict[str, str], workdir: Path,
                     x_display: str, *, refresh: float) -> AgentPath:
    """The agent and the emulator on ``x_display``, both ending with ``stack``."""
    vchan_dir = workdir / "vchan"
    vchan_dir.mkdir(mode=0o700, exist_ok=True)
    socket = workdir / "qubesshm-agent"
    base = {k: v for k, v in env.items()
            if k not in ("VCHAN_DOMAIN", "VCHAN_SOCKET_DIR", "WAYLAND_DISPLAY",
                         "WAYLAND_SOCKET", "QUBESSHM_SIM_ROOT")}
    agent = stack.enter_context(_logged(
        "qubesshm agent",
        [sys.executable, "-m", "qubesshm", "agent", "--socket", str(socket),
         "--vchan", "socket", "--vchan-dir", str(vchan_dir), "--domid", str(AGENT_DOMID),
         "--gui-domid", str(GUI_DOMID), "--grants", "sim", "--refresh", f"{refresh:g}"],
        base, workdir / "agent.log"))
    _wait(lambda: compositor_is_running(str(socket)), f"the agent's socket {socket}", agent)
    emulator = stack.enter_context(_logged(
        "qubesshm guid-emulator",
        [sys.executable, "-m", "qubesshm", "guid-emulator", "--domid", str(AGENT_DOMID),
         "--display", x_display],
        dict(base, VCHAN_SOCKET_DIR=str(vchan_dir), VCHAN_DOMAIN=str(GUI_DOMID),
             DISPLAY=x_display),
        workdir / "emulator.log"))
    _wait(lambda: _connected(socket), "the emulator to connect to the agent", agent, emulator)
    return AgentPath(socket, agent.proc.pid, emulator.proc.pid, refresh)
