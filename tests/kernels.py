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
from typing import Any

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
            # serve is ready once it says where it listens: only then does a signal end
            # it cleanly (its kernel is running a moment before).
            said = ""
            while "qubesshm: listening on" not in said:
                assert proc.stderr is not None
                left = deadline - time.monotonic()
                if proc.poll() is not None or left <= 0:
                    proc.kill()
                    pytest.fail(f"qubesshm serve did not start: {said}"
                                f"{proc.communicate()[1]}")
                if select.select([proc.stderr], [], [], left)[0]:
                    said += proc.stderr.readline()
            found = [k for k in running_kernels(base_of(env)) if k.socket == wanted]
            assert found, f"serve listens, yet no kernel serves {wanted}: {said}"
            yield found[0]
        finally:
            proc.send_signal(signal.SIGTERM)
            _, err = proc.communicate(timeout=20)
            assert proc.returncode == 0, err
            assert "Traceback" not in err, err


class DomainProcess:
    """Another domain's process, spoken to a line at a time (a request, then its
    answer) while this process serves the hypercalls it waits on; ``greeting`` is its
    first line."""

    def __init__(self, server: HypercallServer, args: list[str], what: str,
                 **popen: Any) -> None:
        self.server = server
        self.what = what
        self.proc = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, bufsize=0, **popen)
        self._pending = b""
        self.greeting = self.line()

    def line(self) -> str:
        assert self.proc.stdout is not None
        out = self.proc.stdout.fileno()
        got: list[str] = []

        def arrived() -> bool:
            ready, _, _ = select.select([out], [], [], 0)
            if ready:
                data = os.read(out, 65536)
                if not data and b"\n" not in self._pending:
                    assert self.proc.stderr is not None
                    pytest.fail(f"{self.what} exited: {self.proc.stderr.read()!r}")
                self._pending += data
            if b"\n" in self._pending:
                head, self._pending = self._pending.split(b"\n", 1)
                got.append(head.decode())
                return True
            return False

        serve_until(self.server, arrived, f"{self.what}'s answer", (out,))
        return got[0]

    def ask(self, *words: object) -> str:
        assert self.proc.stdin is not None
        self.proc.stdin.write(" ".join(str(w) for w in words).encode() + b"\n")
        return self.line()
