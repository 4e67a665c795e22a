"""``qubesshm agent`` and ``qubesshm run --agent [--emulator]`` as a user meets them:
usage mistakes are one line before anything starts, and an app run through the agent
and the emulator shows its window, exits with its own status and leaves nothing."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest


def qubesshm(*args: str, env: dict[str, str] | None = None,
             timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "qubesshm", *args], capture_output=True,
                          text=True, timeout=timeout, check=False, env=env)


@pytest.fixture(autouse=True)
def short_runtime_dir(tmp_path: Path) -> Iterator[None]:
    """A socket path has 107 bytes at most, and pytest's tmp_path is long: the runtime
    directory ``tmp_path/run`` is a link to a short one in /tmp."""
    short = Path(tempfile.mkdtemp(prefix="qsr-"))
    short.chmod(0o700)
    (tmp_path / "run").symlink_to(short)
    try:
        yield
    finally:
        shutil.rmtree(short, ignore_errors=True)


def private_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    runtime = (tmp_path / "run").resolve()
    env = dict(os.environ, XDG_RUNTIME_DIR=str(runtime))
    for name in ("QUBESSHM_DEBUG", "VCHAN_DOMAIN", "VCHAN_SOCKET_DIR", "WAYLAND_DISPLAY"):
        env.pop(name, None)
    env.update(extra)
    return env


@pytest.mark.parametrize(("args", "why"), [
    (["run", "--emulator", "--", "true"], "--emulator goes with --agent"),
    (["run", "--domid", "3", "--", "true"], "--domid is an agent mode option: add --agent"),
    (["run", "--agent", "--upstream", "wayland-9", "--", "true"],
     "--upstream is a proxy option; it does nothing with --agent"),
    (["agent", "--domid", "0", "--gui-domid", "0", "--vchan", "socket"],
     "this VM's domain id and the GUI daemon's are both 0"),
    (["agent", "--vchan", "xen", "--grants", "sim"],
     "a GUI daemon on real Xen cannot map the simulated grant layer's pages"),
    (["agent", "--vchan", "xen", "--grants", "xen", "--vchan-dir", "/tmp"],
     "--vchan-dir is for the socket vchan"),
    (["agent", "--domid", "3", "--keyboard-layout", "xx"],
     "--keyboard-layout xx: keyboard layout 'xx' does not compile"),
    (["agent", "--domid", "3", "--keyboard-layout", "us+nosuchvariant"],
     "variant 'nosuchvariant' does not compile"),
    (["run", "--agent", "--keyboard-layout", "de++nosuch:option", "--", "true"],
     "options 'nosuch:option'"),
    (["run", "--agent", "--keyboard-layout", "de+nodeadkeys+ctrl:nocaps+more", "--", "true"],
     "more than three '+' fields"),
    (["run", "--keyboard-layout", "de", "--", "true"],
     "--keyboard-layout is an agent mode option: add --agent"),
])
def test_agent_usage_mistakes_are_one_line_before_anything_starts(
        tmp_path: Path, args: list[str], why: str) -> None:
    result = qubesshm(*args, env=private_env(tmp_path))
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and why in lines[0], result.stderr
    assert not list((tmp_path / "run").iterdir())  # nothing was started


def test_a_bad_keyboard_layout_says_how_to_give_one(tmp_path: Path) -> None:
    result = qubesshm("agent", "--domid", "3", "--keyboard-layout", "qq",
                      env=private_env(tmp_path))
    assert result.returncode == 2
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("qubesshm agent: --keyboard-layout qq: ")
    assert "LAYOUT[+VARIANT[+OPTIONS]]" in line and "e.g. de or fr+azerty" in line


def test_run_emulator_without_a_display_is_refused(tmp_path: Path) -> None:
    env = private_env(tmp_path)
    env.pop("DISPLAY", None)
    result = qubesshm("run", "--agent", "--emulator", "--", "true", env=env)
    assert result.returncode == 2
    assert "$DISPLAY is not set" in result.stderr and "Traceback" not in result.stderr


def test_run_emulator_without_a_runtime_directory_names_the_socket(tmp_path: Path) -> None:
    env = private_env(tmp_path, DISPLAY=":0")
    env.pop("XDG_RUNTIME_DIR")
    result = qubesshm("run", "--agent", "--emulator", "--", "true", env=env)
    (line,) = result.stderr.strip().splitlines()
    assert result.returncode != 0 and "XDG_RUNTIME_DIR is not set" in line
    assert "the socket name 'qubesshm-agent-" in line, line  # not a placeholder's name


def test_domain_ids_are_checked_when_parsed(tmp_path: Path) -> None:
    result = qubesshm("agent", "--domid", "40000", env=private_env(tmp_path))
    assert result.returncode == 2 and "--domid: 40000 is not between 0 and 32751" in (
        result.stderr)


def test_a_vchan_directory_open_to_others_is_refused_with_one_line(tmp_path: Path) -> None:
    vchan = tmp_path / "vchan"
    vchan.mkdir()
    vchan.chmod(0o777)
    result = qubesshm("agent", "--socket", "qs-agent-test", "--domid", "3", "--vchan",
                      "socket", "--vchan-dir", str(vchan), "--grants", "sim",
                      env=private_env(tmp_path))
    assert result.returncode == 1, result.stderr
    lines = [line for line in result.stderr.strip().splitlines() if line]
    assert len(lines) == 1 and str(vchan) in lines[0] and "Traceback" not in result.stderr


@pytest.fixture
def display(tmp_path: Path) -> Iterator[str]:
    xvfb = shutil.which("Xvfb")
    if xvfb is None:
        pytest.skip("Xvfb is not installed (.ci/install installs xvfb)")
    read, write = os.pipe()
    proc = subprocess.Popen([xvfb, "-displayfd", str(write), "-screen", "0", "1280x1024x24",
                             "-nolisten", "tcp"], pass_fds=(write,),
                            stderr=subprocess.DEVNULL)
    os.close(write)
    with os.fdopen(read) as pipe:
        number = pipe.readline().strip()
    try:
        assert number, "Xvfb said no display number"
        yield f":{number}"
    finally:
        proc.terminate()
        proc.wait(10)


def test_run_agent_emulator_shows_the_app_and_exits_with_its_status(
        tmp_path: Path, display: str) -> None:
    env = private_env(tmp_path, DISPLAY=display)
    # weston-simple-shm draws until it is killed; timeout ends it with status 124.
    result = qubesshm("run", "--agent", "--emulator", "--report-json",
                      str(tmp_path / "report.json"), "--", "timeout", "3",
                      "weston-simple-shm", env=env, timeout=90)
    assert result.returncode == 124, result.stderr
    summary = [line for line in result.stderr.splitlines()
               if line.startswith("qubesshm: ") and " windows, " in line]
    assert len(summary) == 1, result.stderr
    line = summary[0]
    assert line.startswith("qubesshm: 1 windows, 1 dumps"), line
    assert "0 deferred, 0 leaked, 0 live" in line, line
    assert "0 pending" in line, line
    assert "qubesshm report" in result.stderr
    import json

    report = json.loads((tmp_path / "report.json").read_text())
    assert report["commits"] > 10 and report["grant_pages_leaked"] == 0
    assert report["grant_pages_deferred"] == 0
    # Nothing is left behind: the private vchan directory and the simulated kernel.
    leftovers = [p.name for p in (tmp_path / "run").iterdir()]
    assert not [name for name in leftovers if name.startswith("qs-vchan-")], leftovers


def test_run_agent_says_when_the_emulator_cannot_start(tmp_path: Path) -> None:
    env = private_env(tmp_path, DISPLAY=":65000")  # nobody is there
    result = qubesshm("run", "--agent", "--emulator", "--", "true", env=env)
    assert result.returncode == 1, result.stderr
    assert "the GUI-daemon emulator exited with status 1 before connecting" in result.stderr
    assert "Traceback" not in result.stderr


def test_limits_too_small_for_a_screen_sized_window_are_said_once_the_daemon_connects(
        tmp_path: Path, display: str) -> None:
    env = private_env(tmp_path, DISPLAY=display)
    result = qubesshm("run", "--agent", "--emulator", "--kernel", "stock", "--quiet", "--",
                      "true", env=env, timeout=90)
    assert result.returncode == 0, result.stderr
    assert ("qubesshm: the gntalloc limit is 1024 pages, less than the 1280 pages of one "
            "window the size of the GUI daemon's 1280x1024 screen: such a window will not "
            "be shown; raise it (--gntalloc-limit 1073741824") in result.stderr
    raised = qubesshm("run", "--agent", "--emulator", "--kernel", "stock", "--quiet",
                      "--gntalloc-limit", "100000", "--", "true", env=env, timeout=90)
    assert raised.returncode == 0 and "gntalloc limit" not in raised.stderr, raised.stderr


KEYMAP_PROBE = """
import mmap, os, sys
from pywayland.client.display import Display
from pywayland.protocol.wayland import WlSeat
display = Display()
display.connect()
registry = display.get_registry()
found = {}
registry.dispatcher["global"] = lambda r, name, iface, version: found.setdefault(iface, name)
display.roundtrip()
seat = registry.bind(found["wl_seat"], WlSeat, 1)
keyboard = seat.get_keyboard()
text = []
def keymap(_, fmt, fd, size):
    with mmap.mmap(fd, size, mmap.MAP_PRIVATE, mmap.PROT_READ) as m:
        text.append(bytes(m[:size]))
    os.close(fd)
keyboard.dispatcher["keymap"] = keymap
display.roundtrip()
display.roundtrip()
from xkbcommon import xkb
state = xkb.Context().keymap_new_from_buffer(text[0].rstrip(b"\\0")).state_new()
# X key codes 52, 29 and 20: z, y and minus on a US keyboard
open(sys.argv[1], "w").write("".join(state.key_get_string(c) for c in (52, 29, 20)))
display.disconnect()
"""


def test_the_keyboard_layout_is_the_keymap_apps_get(tmp_path: Path, display: str) -> None:
    env = private_env(tmp_path, DISPLAY=display)
    out = tmp_path / "symbols.txt"
    result = qubesshm("run", "--agent", "--emulator", "--quiet", "--keyboard-layout",
                      "de+nodeadkeys", "--", sys.executable, "-c", KEYMAP_PROBE, str(out),
                      env=env, timeout=90)
    assert result.returncode == 0, result.stderr
    assert out.read_text() == "yzß"  # German: z and y swapped, sharp s
