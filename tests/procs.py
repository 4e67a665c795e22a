"""Processes the tests start: qubesshm serve, and waiting on clients."""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from qubesshm.headless import HeadlessWeston, compositor_is_running

REPO = Path(__file__).resolve().parent.parent


@dataclass
class RunningProxy:
    process: subprocess.Popen[bytes]
    socket_name: str
    env: dict[str, str]
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode


def host_command(weston: HeadlessWeston, *extra: str) -> str:
    """``serve --remote``'s command: the host half, relaying to ``weston``."""
    return shlex.join([sys.executable, "-m", "qubesshm", "-v", "host", "--upstream",
                       weston.socket_name, *extra])


def start_proxy(weston: HeadlessWeston, log_path: Path, *extra: str,
                socket_name: str = "qubesshm-test",
                env: dict[str, str] | None = None,
                prefix: tuple[str, ...] = (), split: bool = False,
                upstream: bool = True) -> RunningProxy:
    """``qubesshm serve`` relaying to ``weston``; ``split``: as a split proxy, its host
    half (``qubesshm host``) started by ``--remote`` over a pipe; ``upstream=False``:
    ``extra`` says how to reach the compositor."""
    env = weston.env() if env is None else env
    log = open(log_path, "wb")  # noqa: SIM115 - lives as long as the process
    # The compositor: through the host half (split), at --upstream, or as ``extra`` says.
    to = (["--remote", host_command(weston)] if split
          else ["--upstream", weston.socket_name] if upstream else [])
    process = subprocess.Popen(
        [*prefix, sys.executable, "-m", "qubesshm", "-v", "serve", "--socket", socket_name,
         *to, *extra],
        env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
    )
    log.close()
    path = Path(env["XDG_RUNTIME_DIR"]) / socket_name
    deadline = time.monotonic() + 20
    # Ready once it said where it is: its stats socket is up and a signal ends it
    # cleanly (the Wayland socket answers a little earlier).
    while not (compositor_is_running(str(path))
               and b"qubesshm: listening on " in log_path.read_bytes()):
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            raise RuntimeError(f"qubesshm serve did not start: {log_path.read_text()}")
        time.sleep(0.05)
    return RunningProxy(process, socket_name, dict(env, WAYLAND_DISPLAY=socket_name), log_path)


def wait_until(condition: Callable[[], bool], what: str, timeout: float = 60.0,
               message: Callable[[], object] = lambda: "") -> None:
    """Wait for ``condition``, failing the test with ``what`` (and ``message()``) after
    ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what} {message()}")
        time.sleep(0.02)


def wait_for_file(path: Path, process: subprocess.Popen[str], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if process.poll() is not None:
            _, err = process.communicate()
            pytest.fail(f"client exited with {process.returncode} before ready: {err}")
        if time.monotonic() > deadline:
            pytest.fail(f"{path} did not appear within {timeout} s")
        time.sleep(0.02)


def run_bench(tmp_path: Path, *args: str,
              path: str | None = None) -> subprocess.CompletedProcess[str]:
    """``qubesshm bench ARGS`` with a private runtime directory under ``tmp_path`` and
    no session of the caller's (no Wayland, X, vchan or simulated kernel of its
    environment); ``path``: its PATH instead."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("WAYLAND_DISPLAY", "WAYLAND_SOCKET", "QUBESSHM_SIM_ROOT",
                        "VCHAN_SOCKET_DIR", "VCHAN_DOMAIN", "DISPLAY")}
    runtime = tmp_path / "rt"
    runtime.mkdir(mode=0o700, exist_ok=True)
    env.update(XDG_RUNTIME_DIR=str(runtime), PYTHONPATH=str(REPO))
    if path is not None:
        env["PATH"] = path
    # The timeout only guards against a hang; a passing run takes seconds.
    return subprocess.run([sys.executable, "-m", "qubesshm", "bench", *args], env=env,
                          cwd=REPO, capture_output=True, text=True, timeout=600, check=False)
