"""The compositor's I/O layer: its socket, fds over SCM_RIGHTS, errors, fairness.

Raw socket clients send what libwayland never would; the server must answer
each with its ``wl_display.error``, hang up on that client only, pace frames on
the real clock, and keep serving everyone while one client does not read.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import struct
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from compositor_clients import PyClient, solid
from compositor_server import RunningCompositor
from compositor_shell import wait_until
from compositor_wire import App, SocketClient

from qubesshm.relay.listener import AddressError, Listener
from qubesshm.wire.codec import ErrorCode


@pytest.fixture
def runtime() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="qsc-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def served(runtime: Path) -> Iterator[RunningCompositor]:
    running = RunningCompositor(runtime)
    yield running
    running.stop()


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_the_socket_is_taken_as_serve_takes_it(served: RunningCompositor,
                                               runtime: Path) -> None:
    assert served.path.is_socket()
    assert (runtime / f"{served.name}.lock").exists()
    with pytest.raises(AddressError, match="in use"):
        Listener(str(served.path))
    served.stop()
    assert not served.path.exists()


def test_a_pool_fd_travels_by_scm_rights(served: RunningCompositor) -> None:
    c = SocketClient(str(served.path))
    app = App(c)
    surface, _, _ = app.toplevel("fd")
    app.show(surface, app.buffer(solid(8, 8, 0xFF123456)))
    c.roundtrip()
    commit = wait_until(lambda: served.shell.last_commit("fd"), "the commit")
    assert commit is not None
    assert (commit.image == 0xFF123456).all()
    c.close()


def held_inodes() -> set[int]:
    """Inodes of the files this process (the compositor's thread with it) holds open."""
    found = set()
    for name in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):  # the listing's own fd, gone by now
            found.add(os.stat(f"/proc/self/fd/{name}").st_ino)
    return found


def test_a_pool_let_go_of_is_closed_with_nothing_more_from_the_client(
        served: RunningCompositor) -> None:
    """Closing a pool's last fd frees its pages, so the server does it a moment after
    the replies went (``SPENT_POOL_DELAY``), not while the client waits, and not only
    when the client does something more."""
    c = SocketClient(str(served.path))
    app = App(c)
    fd = c.memfd(bytes(4096))
    inode = os.fstat(fd).st_ino
    pool = c.create(app.shm, "create_pool", "wl_shm_pool", fd, 4096, fds=[fd])
    os.close(fd)
    c.roundtrip()
    assert inode in held_inodes()  # the compositor's copy
    c.destroy(pool)
    c.roundtrip()
    wait_until(lambda: inode not in held_inodes(), "the compositor closing the pool's fd")
    assert not c.closed()
    c.close()


@pytest.mark.parametrize(("case", "object_is", "code"), [
    ("bad object", "display", ErrorCode.INVALID_OBJECT),
    ("bad scale", "surface", 0),
    ("fd missing", "display", ErrorCode.INVALID_METHOD),
])
def test_errors_reach_the_client_then_it_is_hung_up_on(served: RunningCompositor, case: str,
                                                       object_is: str, code: int) -> None:
    other = PyClient(served.path)
    bad = SocketClient(str(served.path))
    app = App(bad)
    surface = app.surface()
    if case == "bad object":
        bad.send_bytes(struct.pack("=II", 999, 8 << 16))  # a request to no object
    elif case == "bad scale":
        bad.request(surface, "set_buffer_scale", -3)
    else:
        # create_pool with its fd never sent, then the connection ends.
        new = bad.new_id("wl_shm_pool")
        data, _ = bad.encode(app.shm, "create_pool", new, 0, 4096)
        bad.send_bytes(data)
        bad.sock.shutdown(socket.SHUT_WR)
    err = bad.expect_error()
    assert err.code == code
    assert err.object_id == (1 if object_is == "display" else surface)
    wait_until(lambda: bad.receive(0.1) is False and bad.closed(), "the hang-up")
    bad.close()
    # The other client never noticed.
    window = other.toplevel("other")
    done = other.show(window.surface, other.buffer(solid(8, 8, 0xFF00FF00)), frame=True)
    other.wait(lambda: bool(done), "the other client's frame")
    other.disconnect()


def test_frames_run_at_the_refresh_rate_on_the_real_clock(runtime: Path) -> None:
    served = RunningCompositor(runtime, refresh=20.0)
    try:
        client = PyClient(served.path)
        window = client.toplevel("paced")
        buffer = client.buffer(solid(16, 16, 0xFF0000FF))
        stamps: list[float] = []
        for _ in range(8):
            done = client.show(window.surface, buffer, frame=True)
            client.wait(lambda: bool(done), "a frame")  # noqa: B023 - waited on at once
            stamps.append(time.monotonic())
        # Frames keep to a 20 Hz grid: eight of them span at least seven periods (less
        # what the client's own wake-ups may shift the first and last by).
        span = stamps[-1] - stamps[0]
        assert span > 7 * 0.05 * 0.8, np.diff(stamps)
        client.disconnect()
    finally:
        served.stop()


def test_a_client_that_does_not_read_is_paused_not_served_at_others_cost(
        served: RunningCompositor) -> None:
    flood = SocketClient(str(served.path))
    flood.sock.setblocking(False)
    sync = flood.encode(1, "sync", 2)[0]
    sent = 0
    # Requests whose answers it never reads, until the compositor stops reading it.
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            flood.sock.send(sync * 256)
        except BlockingIOError:
            break
        sent += 256
    else:
        pytest.fail("the compositor kept reading a client that never reads")
    flood.sock.setblocking(True)
    # Everyone else is served meanwhile.
    other = PyClient(served.path)
    window = other.toplevel("served")
    done = other.show(window.surface, other.buffer(solid(8, 8, 0xFF00FF00)), frame=True)
    other.wait(lambda: bool(done), "a frame while another client floods")
    assert served.client_count() == 2  # the flooder is paused, not dropped
    other.disconnect()
    flood.close()
    wait_until(lambda: served.client_count() == 0, "the flooder's connection to close")
    assert sent > 0


def test_no_fd_is_left_behind_by_clients(served: RunningCompositor) -> None:
    for _ in range(3):  # warm up: the loop's own fds, numpy, ...
        PyClient(served.path).disconnect()
    wait_until(lambda: served.client_count() == 0, "the warm-up clients to go")
    before = open_fds()
    for index in range(10):
        c = SocketClient(str(served.path))
        app = App(c)
        surface, _, _ = app.toplevel(f"leak {index}")
        app.show(surface, app.buffer(solid(8, 8, 0xFF000000 | index)))
        c.roundtrip()
        if index % 2:
            app.c.request(surface, "set_buffer_scale", 0)  # ends in an error
            c.expect_error()
        c.close()
    wait_until(lambda: served.client_count() == 0, "every client to go")
    assert open_fds() == before


def test_a_window_torn_down_by_its_client_wakes_it_with_nothing(
        served: RunningCompositor) -> None:
    """What only answers the client's own teardown (its surface leaving the output,
    the pointer leaving it, each ``delete_id``) is queued, as libwayland-server queues
    ``delete_id``: written with the next event posted to it, in order, not on its own.
    Qt 5 can deadlock on exit when bytes arrive while it stops its event threads."""
    c = SocketClient(str(served.path))
    app = App(c)
    output = c.bind("wl_output")
    seat = c.bind("wl_seat")
    pointer = c.create(seat, "get_pointer", "wl_pointer")
    surface, xdg, top = app.toplevel("teardown")
    app.show(surface, app.buffer(solid(8, 8, 0xFF123456)))
    c.roundtrip()
    wait_until(lambda: served.shell.last_commit("teardown"), "the commit")
    window = served.shell.read(lambda s: s.mapped_windows())[0]
    served.call(lambda: served.compositor.seat.pointer_motion(window, 2, 2, 0))
    c.roundtrip()
    assert c.take("wl_surface", "enter", surface) and c.take("wl_pointer", "enter", pointer)
    c.take()

    c.destroy(top)
    c.destroy(xdg)
    c.destroy(surface)
    wait_until(lambda: not served.shell.read(lambda s: s.mapped_windows()), "the unmap")
    assert not c.receive(0.3), [(e.interface, e.name) for e in c.events]

    c.roundtrip()
    got = [(e.interface, e.name, e.args) for e in c.take()]
    assert got[:3] == [("wl_surface", "leave", (output,)),
                       ("wl_pointer", "leave", (got[1][2][0], surface)),
                       ("wl_pointer", "frame", ())]
    assert got[3:] == [("wl_display", "delete_id", (object_id,))
                       for object_id in (top, xdg, surface)]
    c.close()
