"""A split proxy's mistakes: one clean line each, checked before work starts.

The VM side (``serve --remote``, ``run --remote``) and the host half (``qubesshm
host``) are run as users run them; every mistake ends with one line naming the
cause and its fix, never a traceback, and leaves no socket behind.
"""

from __future__ import annotations

import os
import pty
import subprocess
import sys
from pathlib import Path

import pytest


def qubesshm(*args: str, env: dict[str, str], timeout: float = 60,
             stdin: int | None = subprocess.DEVNULL) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "qubesshm", *args], env=env, stdin=stdin,
                          capture_output=True, text=True, timeout=timeout, check=False)


@pytest.fixture
def env(sim_env: dict[str, str]) -> dict[str, str]:
    return sim_env


def one_line(result: subprocess.CompletedProcess[str]) -> str:
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    return lines[0]


@pytest.mark.parametrize(("args", "code", "says"), [
    (["--remote", "qubesshm host", "--remote-socket", "/x"], 2, "not both"),
    (["--remote", "   "], 2, "--remote needs a command"),
    (["--remote", "'unclosed"], 2, "No closing quotation"),
    (["--remote", "qubesshm host", "--upstream", "wayland-9"], 2,
     "qubesshm host --upstream NAME"),
    (["--remote", "qubesshm host", "--allow-dmabuf"], 2, "a dma-buf cannot cross"),
])
def test_usage_mistakes_of_serve_remote(env: dict[str, str], args: list[str], code: int,
                                        says: str) -> None:
    result = qubesshm("serve", "--socket", f"qsc-{os.getpid()}", *args, env=env)
    assert result.returncode == code
    assert says in one_line(result)


def test_a_remote_command_that_does_not_exist(env: dict[str, str]) -> None:
    result = qubesshm("serve", "--socket", f"qsc-{os.getpid()}", "--remote",
                      "/nonexistent/qrexec-client-vm gui qubesshm.Host", env=env)
    assert result.returncode == 1
    line = one_line(result)
    assert "cannot start the host half" in line and "No such file" in line, line
    assert not (Path(env["XDG_RUNTIME_DIR"]) / f"qsc-{os.getpid()}").exists()


def test_a_remote_that_exits_at_once(env: dict[str, str]) -> None:
    result = qubesshm("serve", "--socket", f"qsc-{os.getpid()}", "--remote", "true", env=env)
    assert result.returncode == 1
    line = one_line(result)
    assert "closed the stream" in line, line


def test_a_remote_that_never_answers(env: dict[str, str]) -> None:
    result = qubesshm("serve", "--socket", f"qsc-{os.getpid()}", "--remote", "sleep 30",
                      "--remote-timeout", "0.5", env=env)
    assert result.returncode == 1
    line = one_line(result)
    assert "did not answer within 0.5 s" in line, line


def test_a_remote_that_speaks_something_else(env: dict[str, str]) -> None:
    result = qubesshm("serve", "--socket", f"qsc-{os.getpid()}", "--remote",
                      "echo hello world, this is not the stream", env=env)
    assert result.returncode == 1
    line = one_line(result)
    assert "broke the protocol" in line or "ended inside a frame" in line, line


def test_a_remote_socket_nobody_serves(env: dict[str, str], tmp_path: Path) -> None:
    result = qubesshm("serve", "--socket", f"qsc-{os.getpid()}", "--remote-socket",
                      str(tmp_path / "nothing"), env=env)
    assert result.returncode == 1
    line = one_line(result)
    assert "cannot reach the host half at" in line and "--remote CMD" in line, line


def test_run_refuses_agent_and_remote_together(env: dict[str, str]) -> None:
    result = qubesshm("run", "--agent", "--remote", "qubesshm host", "--", "true", env=env)
    assert result.returncode == 2
    assert "drop one of them" in one_line(result)


def test_host_on_a_terminal_says_how_to_start_it(env: dict[str, str]) -> None:
    controller, terminal = pty.openpty()
    try:
        result = subprocess.run([sys.executable, "-m", "qubesshm", "host"], env=env,
                                stdin=terminal, stdout=terminal, stderr=subprocess.PIPE,
                                text=True, timeout=60, check=False)
    finally:
        os.close(controller)
        os.close(terminal)
    assert result.returncode == 2
    line = result.stderr.strip()
    assert "\n" not in line and "serve --remote" in line and "qrexec" in line, line


def test_host_without_a_compositor(env: dict[str, str], tmp_path: Path) -> None:
    result = qubesshm("host", "--upstream", str(tmp_path / "no-compositor"), env=env,
                      stdin=subprocess.PIPE)
    assert result.returncode == 1
    assert "no compositor answers at" in one_line(result)


def test_host_on_xen_needs_the_vms_domain(env: dict[str, str]) -> None:
    result = qubesshm("host", "--grants", "xen", env=env, stdin=subprocess.PIPE)
    assert result.returncode == 1
    assert "--peer-domid" in one_line(result)
