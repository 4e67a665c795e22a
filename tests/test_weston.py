"""Real clients through ``qubesshm serve`` and ``qubesshm run`` against a real Weston."""

from __future__ import annotations

import os
import re
import signal
import socket
import struct
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from procs import RunningProxy, wait_for_file
from screenshots import (
    PATTERN_CLIENT,
    changing_rgb,
    crop,
    expected_rgb,
    mismatch_summary,
    wait_for_no_pattern,
    wait_for_pattern,
)

from qubesshm.bench.relay import SyncClient
from qubesshm.headless import HeadlessWeston
from qubesshm.wire.protocol import load_protocols

if TYPE_CHECKING:
    from _typeshed import ReadableBuffer

GLOBAL_LINE = re.compile(r"interface: '(\w+)',\s+version:\s+(\d+),\s+name:\s+(\d+)")


def wayland_info(env: dict[str, str]) -> dict[str, tuple[int, int]]:
    result = subprocess.run(["wayland-info"], env=env, capture_output=True, text=True,
                            timeout=60, check=True)
    return {m[1]: (int(m[2]), int(m[3])) for m in GLOBAL_LINE.finditer(result.stdout)}


def test_wayland_info_matches_direct_except_hidden(weston: HeadlessWeston,
                                                   proxy: RunningProxy) -> None:
    direct = wayland_info(weston.env())
    proxied = wayland_info(proxy.env)
    protocol = load_protocols()
    hidden = {name for name in direct if name not in protocol}
    expected = {name: (min(version, protocol[name].version), global_name)
                for name, (version, global_name) in direct.items() if name not in hidden}
    assert proxied == expected
    # Weston advertises its private protocols, which have no XML in protocols/.
    assert "weston_screenshooter" in hidden
    # Every wayland-protocols interface it offers is relayed, unstable ones included.
    assert {"zwp_input_timestamps_manager_v1", "zwp_input_panel_v1"} <= set(proxied)
    assert "wl_compositor" in proxied
    for name in hidden:
        assert f"hiding global {name}" in proxy.log()
    # Logged once per interface, not once per client.
    wayland_info(proxy.env)
    assert proxy.log().count("hiding global weston_screenshooter") == 1


# weston-simple-shm and weston-simple-damage through the proxy: see
# test_grant_buffers_weston.py, which waits for their commits rather than for time.


def test_screenshot_through_proxy_equals_direct(weston: HeadlessWeston, proxy: RunningProxy,
                                               tmp_path: Path) -> None:
    """Partial damage through the proxy shows what the client drew. Each frame after the
    first changes only its damage rectangle (to a mark of its own), the two buffers hold
    different frames, and the shot is taken once the last frame was presented: a proxy
    that copied less than the damage would leave an older frame's pixels on screen."""
    width, height, frames = 301, 187, 6
    expected = changing_rgb(width, height, frames)
    # The marks stay inside the 1-pixel border, so the window is found by the pattern's
    # first and last rows whatever the proxy got wrong inside it.
    assert expected[: width * 3] == expected_rgb(width, height)[: width * 3]
    assert expected[-width * 3:] == expected_rgb(width, height)[-width * 3:]
    # Every frame left a mark that a frame before it did not have.
    for frame in range(1, frames):
        assert changing_rgb(width, height, frame) != expected
    crops = {}
    for label, env in (("direct", weston.env()), ("proxied", proxy.env)):
        ready = tmp_path / f"ready-{label}"
        client = subprocess.Popen(
            [sys.executable, str(PATTERN_CLIENT), f"--width={width}", f"--height={height}",
             f"--frames={frames}", "--damage=partial", "--content=changing", "--hold=60",
             f"--ready-file={ready}", "--ready-after=last"],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            wait_for_file(ready, client)
            # Screenshots always go straight to Weston: weston_screenshooter is hidden.
            shot, x, y = wait_for_pattern(weston.env(), tmp_path / label, width, height,
                                          expected=expected)
            crops[label] = crop(shot, x, y, width, height)
        finally:
            client.terminate()
            client.communicate(timeout=20)
        # The next shot must not find this client's window instead of the next one's.
        wait_for_no_pattern(weston.env(), tmp_path / f"{label}-gone", width, height, expected)
    assert crops["direct"] == expected, mismatch_summary(crops["direct"], expected, width)
    assert crops["proxied"] == expected, mismatch_summary(crops["proxied"], expected, width)


def qubesshm(*args: str, env: dict[str, str],
             timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "qubesshm", *args], env=env,
                          capture_output=True, text=True, timeout=timeout, check=False)


def test_run_exits_with_the_commands_status(weston: HeadlessWeston) -> None:
    env = weston.env()
    assert qubesshm("run", "--", "sh", "-c", "exit 7", env=env).returncode == 7
    killed = qubesshm("run", "--", "sh", "-c", "kill -TERM $$", env=env)
    assert killed.returncode == 128 + 15
    missing = qubesshm("run", "--", "no-such-command-qubesshm", env=env)
    assert missing.returncode == 127
    assert "cannot start" in missing.stderr


@pytest.mark.parametrize("loop", ["uvloop", "asyncio"])
def test_run_works_on_either_event_loop_and_names_it(weston: HeadlessWeston, loop: str) -> None:
    env = weston.env()
    result = qubesshm("-v", "run", "--event-loop", loop, "--", "wayland-info", env=env)
    assert result.returncode == 0, result.stderr
    assert "interface: 'wl_compositor'" in result.stdout
    assert re.search(rf"event loop: {loop}( \d|$)", result.stderr, re.MULTILINE), result.stderr
    # The command's status comes back through either loop's wait on its pidfd.
    assert qubesshm("run", "--event-loop", loop, "--", "sh", "-c", "exit 7",
                    env=env).returncode == 7
    assert qubesshm("run", "--event-loop", loop, "--", "sh", "-c", "kill -TERM $$",
                    env=env).returncode == 128 + 15


def test_without_uvloop_auto_says_so_and_asking_for_it_is_an_error(
        weston: HeadlessWeston, tmp_path: Path) -> None:
    blocker = tmp_path / "no-uvloop"
    blocker.mkdir()
    (blocker / "uvloop.py").write_text("raise ImportError('hidden for this test')\n")
    env = dict(weston.env(), PYTHONPATH=str(blocker))
    asked = qubesshm("run", "--event-loop", "uvloop", "--", "true", env=env)
    assert asked.returncode == 1
    assert asked.stderr.splitlines() == [
        "qubesshm: --event-loop uvloop: uvloop is not installed (hidden for this test); "
        "install it with 'python3 -m pip install uvloop', or use --event-loop asyncio"]
    auto = qubesshm("-v", "run", "--", "wayland-info", env=env)
    assert auto.returncode == 0, auto.stderr
    assert "event loop: asyncio (uvloop is not installed)" in auto.stderr


def test_run_relays_a_real_client(weston: HeadlessWeston) -> None:
    result = qubesshm("run", "--debug", "--", sys.executable, str(PATTERN_CLIENT),
                      "--frames=3", env=weston.env())
    assert result.returncode == 0, result.stderr
    assert "3 frames" in result.stdout
    # The protocol log names each relayed message as WAYLAND_DEBUG does.
    assert re.search(r"^\[ *\d+\.\d{3}\]  -> wl_display@1\.get_registry\(new id "
                     r"wl_registry@2\)  # client#1$", result.stderr, re.MULTILINE), \
        result.stderr[:2000]
    assert re.search(r"^\[ *\d+\.\d{3}\] wl_registry@2\.global\(\d+, \"wl_compositor\", "
                     r"\d+\)  # client#1$", result.stderr, re.MULTILINE)
    assert re.search(r"-> wl_shm@\d+\.create_pool\(new id wl_shm_pool@\d+, fd \d+, \d+\)",
                     result.stderr)
    # Private sockets are cleaned up.
    runtime = Path(weston.env()["XDG_RUNTIME_DIR"])
    assert not list(runtime.glob("qubesshm-run-*"))


def test_debug_from_environment(weston: HeadlessWeston) -> None:
    env = dict(weston.env(), QUBESSHM_DEBUG="1")
    result = qubesshm("run", "--", "wayland-info", env=env)
    assert result.returncode == 0, result.stderr
    assert "wl_registry@2.global(" in result.stderr
    assert "; dropped: interface unknown to qubesshm" in result.stderr


def test_no_compositor_at_start_is_one_clean_line_and_runs_nothing(tmp_path: Path) -> None:
    env = {"XDG_RUNTIME_DIR": str(tmp_path), "PATH": "/usr/bin:/bin"}
    tmp_path.chmod(0o700)
    marker = tmp_path / "ran"
    result = qubesshm("run", "--upstream", "nothing-here", "--", "touch", str(marker), env=env)
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1, result.stderr
    assert re.match(r"qubesshm: no compositor answers at \S+nothing-here ", result.stderr)
    assert not marker.exists(), "the command ran although the proxy could not start"


class RecordingSocket(socket.socket):
    """A connected socket that keeps every byte it sent and received."""

    def __init__(self, fileno: int) -> None:
        super().__init__(fileno=fileno)
        self.setblocking(False)
        self.sent = bytearray()
        self.received = bytearray()

    def send(self, data: ReadableBuffer, flags: int = 0, /) -> int:
        count = super().send(data, flags)
        self.sent += memoryview(data).cast("B")[:count]
        return count

    def recv(self, bufsize: int, flags: int = 0, /) -> bytes:
        data = super().recv(bufsize, flags)
        self.received += data
        return data


def recording_sync_client(path: Path) -> tuple[SyncClient, RecordingSocket]:
    """The benchmark's sync client on ``path``, with its traffic recorded."""
    client = SyncClient(path, load_protocols()["wl_display"].requests[0])
    recorder = RecordingSocket(client.sock.detach())
    client.sock = recorder
    return client, recorder


def wire_messages(data: bytes | bytearray) -> list[tuple[int, int, bytes]]:
    """(object id, opcode, arguments) of each whole Wayland message in ``data``."""
    out = []
    at = 0
    while at < len(data):
        object_id, word = struct.unpack_from("=II", data, at)
        size = word >> 16
        assert size >= 8 and at + size <= len(data), f"a cut message at byte {at}"
        out.append((object_id, word & 0xFFFF, bytes(data[at + 8 : at + size])))
        at += size
    return out


def assert_every_sync_answered_in_order(recorder: RecordingSocket, count: int) -> None:
    """``count`` wl_display.sync went out, and each was answered, in the order sent, by
    its wl_callback.done and the wl_display.delete_id of its callback, and nothing else."""
    sent = wire_messages(recorder.sent)
    assert len(sent) == count, f"{len(sent)} requests sent, not {count}"
    assert {(object_id, opcode) for object_id, opcode, _ in sent} == {(1, 0)}, "only syncs"
    callbacks = [struct.unpack("=I", args)[0] for _, _, args in sent]
    answers = wire_messages(recorder.received)
    answered = len(answers)
    assert answered == 2 * count, f"{answered} events came for {count} syncs, not {2 * count}"
    for index, callback in enumerate(callbacks):
        done, delete = answers[2 * index], answers[2 * index + 1]
        assert (done[:2], delete) == ((callback, 0), (1, 1, struct.pack("=I", callback))), (
            f"sync #{index} (callback {callback}) was answered by {done} then {delete}")


def test_a_burst_of_requests_survives_the_compositors_buffer_limits(
        weston: HeadlessWeston, proxy: RunningProxy) -> None:
    """10 000 syncs at once make 20 000 events; Weston drops a client that lets its
    events back up, so the proxy must keep draining the compositor while relaying."""
    client, recorder = recording_sync_client(
        Path(weston.env()["XDG_RUNTIME_DIR"]) / proxy.socket_name)
    try:
        for _ in range(3):
            client.burst(10_000)
    finally:
        client.close()
    assert "closed (compositor hung up)" not in proxy.log()
    assert_every_sync_answered_in_order(recorder, 30_000)


def test_a_direct_client_survives_a_50000_sync_burst(weston: HeadlessWeston) -> None:
    """The benchmark's client reads while it writes and keeps a bounded window of
    syncs in flight; one that only wrote was dropped by Weston mid-burst."""
    client, recorder = recording_sync_client(weston.socket_path)
    try:
        client.burst(50_000)
        client.round_trip()
    finally:
        client.close()
    assert_every_sync_answered_in_order(recorder, 50_001)


CHILD_COUNTING_SIGINT = """
import os, signal
from pywayland.client import Display
count = 0
woken_r, woken_w = os.pipe()
def on_int(signum, frame):
    global count
    count += 1
    os.write(woken_w, b"!")
signal.signal(signal.SIGINT, on_int)
display = Display()
display.connect()
print("ready", flush=True)
os.read(woken_r, 1)
# A duplicate would come from the proxy's SIGINT handler. The group-wide kill made
# the signal pending on the proxy before this child took its first, so the proxy's
# loop runs that handler within one iteration of its next wake-up; two round trips
# through the proxy span that.
display.roundtrip()
display.roundtrip()
display.disconnect()
print(f"SIGINT {count}", flush=True)
"""


def test_run_passes_a_group_wide_sigint_on_once(weston: HeadlessWeston) -> None:
    # A terminal's Ctrl-C goes to the whole foreground process group.
    process = subprocess.Popen(
        [sys.executable, "-m", "qubesshm", "run", "--", sys.executable, "-c",
         CHILD_COUNTING_SIGINT],
        env=weston.env(), stdout=subprocess.PIPE, text=True, start_new_session=True)
    assert process.stdout is not None
    assert process.stdout.readline() == "ready\n"
    os.killpg(process.pid, signal.SIGINT)
    out, _ = process.communicate(timeout=60)
    assert out == "SIGINT 1\n"
    assert process.returncode == 0


TIMESTAMP = re.compile(r"^\[ *\d+\.\d{3}\] ")


def test_protocol_log_lines_up_with_wayland_debug(weston: HeadlessWeston) -> None:
    """Each line the proxy logs is, up to its '  #' suffix, the line libwayland prints
    for the same message in the client with WAYLAND_DEBUG=1 (timestamps aside)."""
    env = dict(weston.env(), WAYLAND_DEBUG="1")
    env.pop("QUBESSHM_DEBUG", None)
    result = qubesshm("run", "--debug", "--", "wayland-info", env=env)
    assert result.returncode == 0, result.stderr
    client_lines, proxy_lines = [], []
    for line in result.stderr.splitlines():
        if not TIMESTAMP.match(line):
            assert line.startswith("qubesshm: ") or not line.startswith("["), line
            continue
        body = re.sub(r"fd \d+", "fd N", TIMESTAMP.sub("", line))
        if "  # client#" in body:
            if "dropped:" not in body:  # what the proxy kept from the client
                proxy_lines.append(body.split("  # client#")[0])
        else:
            client_lines.append(body)
    client_count, proxy_count = Counter(client_lines), Counter(proxy_lines)
    assert client_lines and not proxy_count - client_count, proxy_count - client_count
    # libwayland prints a request when it is queued: the ones wayland-info queued and
    # never flushed before it disconnected never reached the proxy.
    assert all(line.startswith(" -> ") for line in client_count - proxy_count)
    assert any(re.search(r'\.bind\(\d+, "wl_shm", 1, new id \[unknown\]@\d+\)$', line)
               for line in proxy_lines)
