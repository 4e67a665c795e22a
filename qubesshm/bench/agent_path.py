"""The agent path a benchmark measures: ``qubesshm agent`` + ``qubesshm guid-emulator``.

``start_agent_path`` starts, in a benchmark's private directory, the agent (the
apps' Wayland compositor, its windows sent as grant refs on a socket vchan, on
the simulated hypervisor with a Qubes VM's kernel parameters) and the GUI-daemon
emulator showing them on an X display, as the separate processes they are in
use; it returns once the emulator is connected, with the agent's Wayland socket
and the pids whose CPU time a benchmark reads (``bench frames``); ``bench
churn``'s agent policy starts the same path with its own options. Each process
writes its output to a log in the directory; one that fails is reported with the
last line it wrote.
"""

from __future__ import annotations

import contextlib
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..relay.control import StatsError, read_stats
from .processes import exited, process, wait_for_socket

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
    agent_log: Path  # what the agent writes

    def describe(self, x_display: str) -> str:
        return (f"qubesshm agent (--refresh {self.refresh:g}, simulated grants with a Qubes "
                f"VM's kernel parameters, socket vchan) + qubesshm guid-emulator on "
                f"{x_display}")

    def stats(self) -> dict[str, Any]:
        return read_stats(str(self.socket))


def _connected(socket: Path) -> bool:
    try:
        return bool(read_stats(str(socket))["daemon"]["connected"])
    except (StatsError, KeyError):
        return False


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        # If it lingers, the process() context kills it.
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=30)


def start_agent_path(stack: contextlib.ExitStack, env: dict[str, str], workdir: Path,
                     x_display: str, *, refresh: float = 60.0,
                     agent_args: Sequence[str] = (),
                     emulator_args: Sequence[str] = ()) -> AgentPath:
    """The agent (with ``agent_args``) and the emulator (with ``emulator_args``) on
    ``x_display``, both ending with ``stack``: the agent first, so that the emulator
    sees it hang up and lets go of every dump, as it does in use. Returns once the
    emulator is connected; a process that fails is a ``RuntimeError`` with the last
    line it wrote."""
    vchan_dir = workdir / "vchan"
    vchan_dir.mkdir(mode=0o700, exist_ok=True)
    socket = workdir / "qubesshm-agent"
    base = {k: v for k, v in env.items()
            if k not in ("VCHAN_DOMAIN", "VCHAN_SOCKET_DIR", "WAYLAND_DISPLAY",
                         "WAYLAND_SOCKET", "QUBESSHM_SIM_ROOT")}
    agent_log, emulator_log = workdir / "agent.log", workdir / "emulator.log"
    agent = stack.enter_context(process(
        [sys.executable, "-m", "qubesshm", "agent", "--socket", str(socket),
         "--vchan", "socket", "--vchan-dir", str(vchan_dir), "--domid", str(AGENT_DOMID),
         "--gui-domid", str(GUI_DOMID), "--grants", "sim", "--refresh", f"{refresh:g}",
         *agent_args], base, agent_log))
    wait_for_socket(socket, agent, "qubesshm agent", agent_log)
    emulator = stack.enter_context(process(
        [sys.executable, "-m", "qubesshm", "guid-emulator", "--domid", str(AGENT_DOMID),
         "--display", x_display, *emulator_args],
        dict(base, VCHAN_SOCKET_DIR=str(vchan_dir), VCHAN_DOMAIN=str(GUI_DOMID),
             DISPLAY=x_display), emulator_log))
    stack.callback(_stop, agent)  # unwound before the emulator's context
    deadline = time.monotonic() + START_TIMEOUT
    while not _connected(socket):
        for proc, what, log in ((agent, "qubesshm agent", agent_log),
                                (emulator, "qubesshm guid-emulator", emulator_log)):
            if proc.poll() is not None:
                raise RuntimeError(exited(what, proc, log))
        if time.monotonic() > deadline:
            raise RuntimeError(f"qubesshm guid-emulator did not connect to the agent within "
                               f"{START_TIMEOUT:g} s (its log: {emulator_log})")
        time.sleep(POLL)
    return AgentPath(socket, agent.pid, emulator.pid, refresh, agent_log)
