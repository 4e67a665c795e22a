"""The command line a user meets first: checked arguments, one clean line per mistake.

Every case runs ``python3 -m qubesshm`` as a user would and checks the exit status
(2 for usage errors, as argparse; 1 for other errors), that stderr is one line
naming the cause, and that no traceback escapes.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import kernels
import pytest

from qubesshm import __version__
from qubesshm.cli import UsageError, env_flag


def qubesshm(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "qubesshm", *args], capture_output=True,
                          text=True, timeout=60, check=False, env=env)


def private_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    runtime = tmp_path / "run"
    runtime.mkdir(mode=0o700, exist_ok=True)
    env = dict(os.environ, XDG_RUNTIME_DIR=str(runtime), **extra)
    env.pop("QUBESSHM_DEBUG", None)
    env.update(extra)
    return env


def test_version() -> None:
    result = qubesshm("--version")
    assert result.returncode == 0 and result.stdout.strip() == f"qubesshm {__version__}"


@pytest.mark.parametrize(("args", "why"), [
    (["serve", "--max-message-size", "0"], "--max-message-size: 0 is not between"),
    (["serve", "--max-message-size", "-5"], "--max-message-size: -5 is not between"),
    (["serve", "--max-message-size", "70000"], "not between 16 and 65532"),
    (["serve", "--stall-timeout", "-1"], "--stall-timeout: -1 is not a positive"),
    (["serve", "--stall-timeout", "0"], "--stall-timeout: 0 is not a positive"),
    (["serve", "--stall-timeout", "nan"], "--stall-timeout: nan is not a positive"),
    (["run", "--stall-timeout", "inf", "--", "true"], "inf is not a positive"),
    (["bench", "frames", "--frames", "0"], "--frames: 0 is not at least 1"),
    (["bench", "frames", "--region", "600"], "does not fit twice"),
    # No internal names (argparse's "invalid _positive value"), and status 2 for each.
    (["serve", "--client-pages", "1e6"], "--client-pages: '1e6' is not a whole number of "
     "pages"),
    (["serve", "--gntalloc-limit", "-5"], "--gntalloc-limit: -5 is not between 1 and "
     "4294967295"),
    (["tune", "--free-per-iteration", "-1"], "--free-per-iteration: -1 is not between 0 and "
     "4294967295"),
    (["run", "--sim-watch", "pid1", "--", "true"], "--sim-watch: 'pid1' is not a process id"),
    (["bench", "churn", "--rate", "fast"], "--rate: 'fast' is not a positive number a second"),
])
def test_ranges_are_checked_when_parsing(tmp_path: Path, args: list[str], why: str) -> None:
    result = qubesshm(*args, env=private_env(tmp_path))
    assert result.returncode == 2, result.stderr
    assert why in result.stderr
    assert "Traceback" not in result.stderr and "invalid" not in result.stderr


def test_an_unknown_option_shows_the_subcommands_usage(tmp_path: Path) -> None:
    result = qubesshm("serve", "--bogus", env=private_env(tmp_path))
    assert result.returncode == 2
    assert result.stderr.startswith("usage: qubesshm serve ")
    assert "qubesshm serve: error: unrecognized arguments: --bogus" in result.stderr


def test_verbose_before_and_after_the_subcommand(tmp_path: Path) -> None:
    for args in (["-v", "tune", "--grants", "sim"], ["tune", "--grants", "sim", "-v"]):
        result = qubesshm(*args, env=private_env(tmp_path))
        assert result.returncode == 0, result.stderr


@pytest.mark.parametrize(("value", "on"), [
    ("1", True), ("true", True), ("YES", True), ("on", True),
    ("0", False), ("false", False), ("no", False), ("off", False), ("", False),
])
def test_boolean_environment_variables(monkeypatch: pytest.MonkeyPatch, value: str,
                                       on: bool) -> None:
    monkeypatch.setenv("QUBESSHM_DEBUG", value)
    assert env_flag("QUBESSHM_DEBUG") is on


def test_a_non_boolean_environment_variable_is_a_usage_error(tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch,
                                                             ) -> None:
    monkeypatch.setenv("QUBESSHM_DEBUG", "maybe")
    with pytest.raises(UsageError):
        env_flag("QUBESSHM_DEBUG")
    result = qubesshm("tune", "--grants", "sim", env=private_env(tmp_path,
                                                                 QUBESSHM_DEBUG="maybe"))
    assert result.returncode == 2
    assert "QUBESSHM_DEBUG='maybe' is not a boolean" in result.stderr


def test_a_socket_in_a_missing_directory_is_one_clean_line(tmp_path: Path) -> None:
    env = private_env(tmp_path)
    upstream = tmp_path / "run" / "upstream"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as compositor:
        compositor.bind(str(upstream))
        compositor.listen(8)
        result = qubesshm("serve", "--grants", "sim", "--socket", str(tmp_path / "no" / "sock"),
                          "--upstream", str(upstream), env=env)
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert f"cannot listen on {tmp_path / 'no' / 'sock'}" in result.stderr


# -- where the simulated kernel writes --------------------------------------------------


def sim_env(**values: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("XDG_RUNTIME_DIR", "QUBESSHM_SIM_ROOT", "QUBESSHM_DEBUG")}
    env.update(values, QUBESSHM_GRANTS="sim")
    return env


def test_a_missing_runtime_dir_is_refused_not_created(tmp_path: Path) -> None:
    missing = tmp_path / "nonexistent"
    for args in (["serve"], ["tune"], ["tune", "--free-per-iteration", "7"]):
        result = qubesshm(*args, env=sim_env(XDG_RUNTIME_DIR=str(missing)))
        assert result.returncode == 1, result.stderr
        assert result.stderr.count("\n") == 1 and "does not exist" in result.stderr
        assert not missing.exists()


def test_a_runtime_dir_open_to_others_is_refused(tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir(mode=0o755)
    shared.chmod(0o755)
    result = qubesshm("tune", env=sim_env(XDG_RUNTIME_DIR=str(shared)))
    assert result.returncode == 1
    assert f"chmod 0700 {shared}" in result.stderr
    assert not (shared / "qubesshm-sim").exists()


@pytest.mark.parametrize("mode", [0o1777, 0o777, 0o775])
def test_a_shared_runtime_dir_gets_no_advice_to_chmod_it(tmp_path: Path, mode: int) -> None:
    # XDG_RUNTIME_DIR=/tmp: following "chmod 0700 /tmp" would break the system.
    shared = tmp_path / "tmp"
    shared.mkdir()
    shared.chmod(mode)
    for args in (["tune"], ["serve"], ["run", "--", "true"]):
        result = qubesshm(*args, env=sim_env(XDG_RUNTIME_DIR=str(shared)))
        assert result.returncode == 1, result.stderr
        assert result.stderr.count("\n") == 1, result.stderr
        assert "chmod" not in result.stderr
        assert "shared with other users" in result.stderr
        assert "a directory of your own, mode 0700" in result.stderr
    assert list(shared.iterdir()) == []


def test_no_runtime_dir_means_no_predictable_path_in_tmp() -> None:
    result = qubesshm("tune", "--free-per-iteration", "7", env=sim_env())
    assert result.returncode == 1
    assert "XDG_RUNTIME_DIR is not set" in result.stderr and "QUBESSHM_SIM_ROOT" in result.stderr


def test_reading_the_parameters_creates_nothing(tmp_path: Path) -> None:
    runtime = tmp_path / "run"
    runtime.mkdir(mode=0o700)
    result = qubesshm("tune", env=sim_env(XDG_RUNTIME_DIR=str(runtime)))
    assert result.returncode == 0, result.stderr
    assert "free_per_iteration    1000" in result.stdout
    assert list(runtime.iterdir()) == []


def test_writes_do_not_follow_symlinks(tmp_path: Path) -> None:
    env = kernels.sim_env(tmp_path / "run")
    with kernels.serving(env, "qs") as kernel:
        param = kernel.root / "sys/module/grant_table/parameters/free_per_iteration"
        victim = tmp_path / "victim"
        victim.write_text("precious\n")
        param.unlink()
        param.symlink_to(victim)
        result = qubesshm("tune", "--free-per-iteration", "7", env=env)
        assert result.returncode == 1
        assert "symlink" in result.stderr and "Traceback" not in result.stderr
        assert victim.read_text() == "precious\n"


@pytest.mark.parametrize("name", ["", "dir/", "."])
def test_a_socket_name_that_is_no_file_name_is_refused(tmp_path: Path, name: str) -> None:
    env = private_env(tmp_path)
    result = qubesshm("serve", "--grants", "sim", "--socket", name, env=env)
    assert result.returncode == 1
    assert "is not a socket name" in result.stderr and "Traceback" not in result.stderr
    assert not list(tmp_path.glob("*.lock"))


def test_the_compositors_own_socket_is_called_so(tmp_path: Path) -> None:
    env = private_env(tmp_path)
    runtime = Path(env["XDG_RUNTIME_DIR"])
    with kernels.listening(runtime / "wayland-1"):
        result = qubesshm("serve", "--grants", "sim", "--socket", "wayland-1", "--upstream",
                          "wayland-1", env=env)
    assert result.returncode == 1
    assert result.stderr.strip() == (
        f"qubesshm: {runtime / 'wayland-1'} is the compositor's socket (a compositor answers "
        "there), so qubesshm cannot listen on it: give qubesshm a name of its own with "
        "--socket (serve's default is qubesshm-0)")
    # Nothing answers there: then it is the upstream that is wrong.
    lone = qubesshm("serve", "--grants", "sim", "--socket", "qubesshm-0", "--upstream",
                    "qubesshm-0", env=env)
    assert lone.returncode == 1
    assert "no compositor answers there: give the compositor's socket with --upstream" \
        in lone.stderr
