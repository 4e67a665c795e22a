"""A ``qubesshm serve`` whose simulated kernel the tests can see, without a compositor.

``serve`` only checks at start that something accepts connections upstream, so a
listening socket stands in for the compositor where no client connects.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from qubesshm.grants.hypercalls import HypercallServer
from qubesshm.grants.simkernels import RunningKernel, running_kernels

DEADLINE = 30.0


class Clock:
    """A simulated hypervisor's clock: its deferred timer runs when the test says so."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def serve_until(server: HypercallServer, done: Callable[[], bool], what: str,
                extra: tuple[int, ...] = (), timeout: float = DEADLINE) -> None:
    """Serve hypercalls until ``done()``; ``extra`` fds also wake the wait."""
    deadline = time.monotonic() + timeout
    while not done():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        ready, _, _ = select.select([server.fileno(), *extra], [], [], 0.5)
        if server.fileno() in ready:
            server.on_readable()


def sim_env(runtime: Path, **extra: str) -> dict[str, str]:
    """A private runtime directory (made if missing), simulated grants, no debug."""
    runtime.mkdir(mode=0o700, exist_ok=True)
    env = {k: v for k, v in os.environ.items()
           if k not in ("QUBESSHM_SIM_ROOT", "QUBESSHM_DEBUG", "WAYLAND_DISPLAY")}
    env.update(XDG_RUNTIME_DIR=str(runtime), QUBESSHM_GRANTS="sim", **extra)
    return env


def qubesshm(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "qubesshm", *args], env=env,
                          capture_output=True, text=True, timeout=60, check=False)


@contextlib.contextmanager
def listening(path: Path) -> Iterator[Path]:
    """A socket that accepts connections, as a compositor's does."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.bind(str(path))
        sock.listen(16)
        try:
            yield path
        finally:
            path.unlink()


def base_of(env: dict[str, str]) -> Path:
    return Path(env.get("QUBESSHM_SIM_ROOT") or Path(env["XDG_RUNTIME_DIR"]) / "qubesshm-sim")


@contextlib.contextmanager
def serving(env: dict[str, str], name: str, *extra: str) -> Iterator[RunningKernel]:
    """``qubesshm serve --socket NAME`` against a stand-in compositor; its kernel."""
    runtime = Path(env["XDG_RUNTIME_DIR"])
    with listening(runtime / f"{name}-upstream") as upstream:
        proc = subprocess.Popen(
            [sys.executable, "-m", "qubesshm", "serve", "--socket", name, "--upstream",
             str(upstream), *extra], env=env, stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        try:
            wanted = str(runtime / name)
            deadline = time.monotonic() + 20
            while True:
                found = [k for k in running_kernels(base_of(env)) if k.socket == wanted]
                if found:
                    break
                if proc.poll() is not None or time.monotonic() > deadline:
                    proc.kill()
                    pytest.fail(f"qubesshm serve did not start: {proc.communicate()[1]}")
                time.sleep(0.02)
            yield found[0]
        finally:
            proc.send_signal(signal.SIGTERM)
            _, err = proc.communicate(timeout=20)
            assert proc.returncode == 0, err
            assert "Traceback" not in err, err
