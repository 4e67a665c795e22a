"""Fds across a split proxy, end to end: keymaps, clipboard pipes, refusals, back-pressure.

Between the proxy's halves there is one byte stream, so where a Wayland message
carries an fd the stream carries what it stands for: a keymap from the compositor
as its bytes (the VM side hands its client a sealed, read-only memfd of them), a
pipe as a relayed byte stream with credit (at most ``PIPE_WINDOW`` bytes in
flight per pipe), and anything else is refused with a protocol error naming it.

Real peers: Weston with a seat (its X11 backend on a private Xvfb, see
``split_clients``: the headless backend of Weston 10 has no ``wl_seat`` at all,
hence no keyboard, no keymap and no keyboard focus, without which Weston offers
no client the selection), pywayland (libwayland-client) clients, and a client
speaking bytes for the fds no toolkit sends. Each test has a split proxy of its
own (``serve --remote 'qubesshm host'``, a simulated kernel of its own) that must
exit 0 without a traceback. Progress is waited on with deadlines, never sleeps.
"""

from __future__ import annotations

import errno
import os
import random
import select
import socket
import statistics
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from messages import PROTO, RawClient, request
from procs import RunningProxy, start_proxy
from split_clients import (
    DEADLINE,
    WRITE_CHUNK,
    ClipClient,
    KeymapClient,
    SeatWeston,
    pipe_size,
    read_to_end,
    seat_weston,
    unread,
    wait_until,
)

from qubesshm.relay.control import read_stats
from qubesshm.stream.fds import SEALS
from qubesshm.stream.pipes import PIPE_WINDOW
from qubesshm.wire.codec import ErrorCode, decode_args

BIG_LIMIT = "1073741824"
MIME = "text/plain;charset=utf-8"
OTHER_MIME = "text/plain"
XKB_V1 = 1
REFUSED = "only pipes and readable files can cross to the GUI domain"


def payload(size: int, seed: int) -> bytes:
    """Bytes that do not repeat at any window's period (a misordered chunk shows)."""
    return random.Random(seed).randbytes(size)


@pytest.fixture(scope="module")
def seat_compositor() -> Iterator[SeatWeston]:
    with seat_weston(f"wayland-seat-{os.getpid()}") as compositor:
        yield compositor


@pytest.fixture
def split(seat_compositor: SeatWeston, tmp_path: Path) -> Iterator[RunningProxy]:
    """A split proxy to the seat's Weston, on a simulated kernel of its own; it must
    exit 0 on SIGTERM, without a traceback."""
    root = tmp_path / "sim"
    root.mkdir(mode=0o700)
    env = dict(seat_compositor.env(), QUBESSHM_SIM_ROOT=str(root), QUBESSHM_GRANTS="sim")
    env.pop("DISPLAY")
    running = start_proxy(seat_compositor, tmp_path / "qubesshm.log", "--gntalloc-limit",
                          BIG_LIMIT, socket_name=f"qsf-{os.getpid()}", env=env, split=True)
    yield running
    assert running.stop() == 0, running.log()
    assert "Traceback" not in running.log(), running.log()


@pytest.fixture
def clients(split: RunningProxy) -> Iterator[list[ClipClient | KeymapClient]]:
    """pywayland clients to disconnect (before the proxy stops)."""
    made: list[ClipClient | KeymapClient] = []
    yield made
    for client in made:
        client.disconnect()


def path_of(proxy: RunningProxy) -> Path:
    return Path(proxy.env["XDG_RUNTIME_DIR"]) / proxy.socket_name


def live_clients(proxy: RunningProxy) -> int:
    value = read_stats(str(path_of(proxy)))["clients"]
    assert isinstance(value, int)
    return value


# -- keymaps ------------------------------------------------------------------------------


@pytest.mark.parametrize("seat_version", [5, 7])
def test_keymap_arrives_as_a_sealed_read_only_memfd_of_the_compositors_bytes(
        seat_compositor: SeatWeston, split: RunningProxy,
        clients: list[ClipClient | KeymapClient], seat_version: int) -> None:
    """Weston hands out its keymap as a read-only memfd (seat version 7) or a private
    copy (before 7); through the split proxy the client gets a sealed, read-only memfd
    of exactly the bytes a client connected to Weston itself gets, at the size
    announced."""
    direct = KeymapClient(seat_compositor.socket_path, seat_version)
    clients.append(direct)
    through = KeymapClient(path_of(split), seat_version)
    clients.append(through)
    expected, got = direct.keymap(), through.keymap()
    assert expected.format == got.format == XKB_V1
    assert got.size == expected.size > 1000
    assert got.data == expected.data
    assert got.data.startswith(b"xkb_keymap") and got.data.endswith(b"\0")
    assert got.link.startswith("/memfd:qubesshm-remote-file"), got.link
    assert got.access == os.O_RDONLY
    assert got.seals == SEALS
    assert got.file_size == got.size
    assert got.write_refused and got.shared_writable_map_refused
    # One keymap event, as from Weston itself.
    direct.roundtrip()
    through.roundtrip()
    assert len(direct.keymaps) == len(through.keymaps) == 1


# -- the clipboard ------------------------------------------------------------------------


@pytest.mark.parametrize(("copy_split", "paste_split"),
                         [(True, True), (True, False), (False, True)],
                         ids=["both-split", "paste-direct", "copy-direct"])
def test_clipboard_crosses_relayed_pipes_exactly(
        seat_compositor: SeatWeston, split: RunningProxy,
        clients: list[ClipClient | KeymapClient], copy_split: bool,
        paste_split: bool) -> None:
    """Client A copies 300 KiB (more than a pipe's window, so credit goes back and
    forth), client B pastes it. Each through the split proxy crosses a relayed pipe:
    A writes into a pipe that is not B's (the proxy's stand-in), and B reads every
    byte, in order, to the end."""
    data = payload(300 * 1024, seed=18)
    assert len(data) > PIPE_WINDOW * 4
    direct, through = seat_compositor.socket_path, path_of(split)
    copier = ClipClient(through if copy_split else direct, "copier")
    clients.append(copier)
    offered = copier.offer({MIME: data})
    paster = ClipClient(through if paste_split else direct, "paster")
    clients.append(paster)
    # Weston's clipboard manager has read a copy of it already (a transfer of its own,
    # through the same relayed pipes when the copier is split).
    read_end = paster.ask(paster.selection(MIME), MIME)
    st = os.fstat(read_end)
    pasters_pipe = (st.st_dev, st.st_ino)
    writer = copier.served(offered, 2)
    assert read_to_end(read_end) == data
    writer.join(DEADLINE)
    assert writer.error is None
    assert writer.written == len(data)
    assert writer.inode != pasters_pipe, "the copier got the paster's own pipe"
    copier.roundtrip()
    assert len(offered.writers) == 2
    assert not offered.cancelled


def test_the_copy_weston_keeps_after_its_owner_left_crosses_too(
        split: RunningProxy, clients: list[ClipClient | KeymapClient]) -> None:
    """Weston's clipboard manager read the selection's first type when it was set; once
    its owner disconnects, Weston itself serves a paste, writing into the host half's
    stand-in pipe: the paster through the split proxy reads every byte."""
    data = payload(300 * 1024, seed=4)
    through = path_of(split)
    owner = ClipClient(through, "owner")
    offered = owner.offer({MIME: data})
    owner.disconnect()
    wait_until(lambda: live_clients(split) == 0, "the owner's session to end")
    paster = ClipClient(through, "paster")
    clients.append(paster)
    read_end = paster.ask(paster.selection(MIME), MIME)
    assert read_to_end(read_end) == data
    assert len(offered.writers) == 1


# -- a refused fd -------------------------------------------------------------------------


def refused_fd(kind: str, tmp_path: Path) -> tuple[list[int], str]:
    """(fds to close, the first being the one sent; the words the error names it by)."""
    if kind == "socket":
        one, two = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        return [one.detach(), two.detach()], "a Unix stream socket"
    if kind == "eventfd":
        return [os.eventfd(0, os.EFD_CLOEXEC)], "an eventfd"
    directory = tmp_path / "a-directory"
    directory.mkdir()
    return [os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)], \
        f"a directory ({directory})"


def raw_selection_offer(raw: RawClient) -> int:
    """Map a 64x64 toplevel (so Weston gives it keyboard focus), with a data device;
    the id of the selection offer Weston then sends."""
    compositor = raw.bind("wl_compositor", 4)
    shm = raw.bind("wl_shm", 1)
    wm_base = raw.bind("xdg_wm_base", 1)
    seat = raw.bind("wl_seat", 5)
    manager = raw.bind("wl_data_device_manager", 3)
    # New ids in the order they are used, as the protocol wants them.
    keyboard, device = raw.new_id(), raw.new_id()
    raw.send(request(seat, "wl_seat", "get_keyboard", keyboard))
    raw.send(request(manager, "wl_data_device_manager", "get_data_device", device, seat))
    surface, xdg_surface, toplevel = raw.new_id(), raw.new_id(), raw.new_id()
    raw.send(request(compositor, "wl_compositor", "create_surface", surface))
    raw.send(request(wm_base, "xdg_wm_base", "get_xdg_surface", xdg_surface, surface))
    raw.send(request(xdg_surface, "xdg_surface", "get_toplevel", toplevel))
    raw.send(request(surface, "wl_surface", "commit"))
    configure = PROTO["xdg_surface"].events[0]
    data_offer, selection = PROTO["wl_data_device"].events[0], PROTO["wl_data_device"].events[5]
    assert (data_offer.name, selection.name) == ("data_offer", "selection")
    offers: set[int] = set()
    chosen: list[int] = []
    mapped = False
    deadline = time.monotonic() + DEADLINE
    while not chosen:
        assert time.monotonic() < deadline, "no selection offer came"
        for object_id, opcode, data in raw.roundtrip():
            assert (object_id, opcode) != (1, 0), decode_args(PROTO["wl_display"].events[0],
                                                              data, [])
            if (object_id, opcode) == (wm_base, 0):  # ping
                serial = decode_args(PROTO["xdg_wm_base"].events[0], data, [])[0]
                raw.send(request(wm_base, "xdg_wm_base", "pong", serial))
            elif (object_id, opcode) == (xdg_surface, 0) and not mapped:
                serial = decode_args(configure, data, [])[0]
                raw.send(request(xdg_surface, "xdg_surface", "ack_configure", serial))
                fd = os.memfd_create("raw-client", os.MFD_CLOEXEC)
                os.ftruncate(fd, 64 * 64 * 4)
                pool, buffer = raw.new_id(), raw.new_id()
                raw.send(request(shm, "wl_shm", "create_pool", pool, fd, 64 * 64 * 4))
                os.close(fd)
                raw.send(request(pool, "wl_shm_pool", "create_buffer", buffer, 0, 64, 64,
                                 256, 1))
                raw.send(request(surface, "wl_surface", "attach", buffer, 0, 0))
                raw.send(request(surface, "wl_surface", "damage_buffer", 0, 0, 64, 64))
                raw.send(request(surface, "wl_surface", "commit"))
                mapped = True
            elif (object_id, opcode) == (device, 0):
                offer = decode_args(data_offer, data, [])[0]
                assert isinstance(offer, int)
                offers.add(offer)
            elif (object_id, opcode) == (device, 5):
                offer = decode_args(selection, data, [])[0]
                if isinstance(offer, int) and offer in offers:
                    chosen.append(offer)
    return chosen[0]


@pytest.mark.parametrize("kind", ["socket", "eventfd", "directory"])
def test_an_fd_that_cannot_cross_is_refused_by_name_and_others_carry_on(
        split: RunningProxy, clients: list[ClipClient | KeymapClient], tmp_path: Path,
        kind: str) -> None:
    """A client asks for the selection into something that is neither a pool, a pipe
    nor a readable file: it gets a wl_display.error naming what it sent and is
    disconnected; the selection's owner, and a client that pastes afterwards through
    the same proxy (over a relayed pipe), carry on."""
    through = path_of(split)
    owner = ClipClient(through, "owner")
    clients.append(owner)
    offered = owner.offer({MIME: b"still here \xe2\x9c\x93\n"})
    raw = RawClient(through)
    try:
        offer = raw_selection_offer(raw)
        fds, words = refused_fd(kind, tmp_path)
        try:
            raw.send(request(offer, "wl_data_offer", "receive", MIME, fds[0]))
        finally:
            for fd in fds:
                os.close(fd)
        errors = [data for object_id, opcode, data in raw.roundtrip()
                  if (object_id, opcode) == (1, 0)]
        assert errors, "the client got no error"
        _, code, text = decode_args(PROTO["wl_display"].events[0], errors[0], [])
        assert code == ErrorCode.IMPLEMENTATION
        assert isinstance(text, str)
        assert words in text and REFUSED in text, text
        assert list(raw.messages()) == [], "the proxy hangs up after the error"
    finally:
        raw.close()
    wait_until(lambda: live_clients(split) == 1, "the refused client's session to end")
    # Weston never asked the owner for the refused request.
    owner.roundtrip()
    assert len(offered.writers) == 1
    later = ClipClient(through, "later")
    clients.append(later)
    read_end = later.ask(later.selection(MIME), MIME)
    owner.served(offered, 2)
    assert read_to_end(read_end) == "still here ✓\n".encode()
    log = split.log()
    assert words in log, log


# -- back-pressure ------------------------------------------------------------------------


def test_a_pipe_nobody_reads_stalls_only_its_own_transfer(
        split: RunningProxy, clients: list[ClipClient | KeymapClient]) -> None:
    """B asks for 2 MiB and does not read: A's writes stop once B's pipe, each relay's
    window and the pipes between are full (never more in flight); meanwhile another
    client through the same proxy maps a window, makes prompt round trips and pastes
    100 KiB of the same selection over its own pipe, and A and B keep talking to
    Weston. Then B reads, and gets every byte."""
    big, small = payload(2 << 20, seed=1), payload(100 * 1024, seed=2)
    through = path_of(split)
    owner = ClipClient(through, "owner")
    clients.append(owner)
    # The small one first: Weston's clipboard manager copies that one for itself.
    offered = owner.offer({MIME: small, OTHER_MIME: big})
    slow = ClipClient(through, "slow")
    clients.append(slow)
    stalled = slow.ask(slow.selection(OTHER_MIME), OTHER_MIME)
    writer = owner.served(offered, 2)
    assert writer.mime == OTHER_MIME
    # What can be in flight: the owner's pipe (the VM side's stand-in), the host's
    # stand-in pipe to Weston, the slow client's pipe, and one window per relay.
    kernel_pipe = pipe_size(stalled)
    in_flight = writer.pipe_size + kernel_pipe + kernel_pipe + 2 * PIPE_WINDOW
    wait_until(lambda: unread(stalled) >= kernel_pipe - WRITE_CHUNK
               and writer.written >= in_flight - 2 * PIPE_WINDOW,
               lambda: f"the transfer to fill its pipes (unread {unread(stalled)}, "
               f"written {writer.written} of {in_flight} that fit)")

    quick = ClipClient(through, "quick")
    clients.append(quick)
    times = []
    for _ in range(20):
        start = time.monotonic()
        quick.roundtrip()
        times.append(time.monotonic() - start)
    assert max(times) < 2.0, times
    read_end = quick.ask(quick.selection(MIME), MIME)
    assert owner.served(offered, 3).mime == MIME
    assert read_to_end(read_end) == small
    owner.roundtrip()
    slow.roundtrip()

    stalled_at = writer.written
    assert writer.is_alive(), "the stalled transfer finished without its reader"
    assert stalled_at <= in_flight, (stalled_at, in_flight)
    assert unread(stalled) >= kernel_pipe - WRITE_CHUNK
    got = read_to_end(stalled, timeout=60.0)
    writer.join(DEADLINE)
    assert writer.error is None
    assert len(got) == len(big) and got == big
    print(f"round trips while stalled: median {statistics.median(times) * 1000:.1f} ms, "
          f"max {max(times) * 1000:.1f} ms; stalled at {stalled_at} of {len(big)} bytes "
          f"(at most {in_flight} fit)")


def test_a_paste_given_up_midway_ends_the_copiers_writes(
        split: RunningProxy, clients: list[ClipClient | KeymapClient]) -> None:
    """B reads 100 KiB of 2 MiB and closes its pipe: the end travels back across both
    relayed pipes, and A's next writes fail (EPIPE) instead of blocking for ever."""
    big = payload(2 << 20, seed=3)
    through = path_of(split)
    owner = ClipClient(through, "owner")
    clients.append(owner)
    offered = owner.offer({MIME: b"kept by Weston", OTHER_MIME: big})
    quitter = ClipClient(through, "quitter")
    clients.append(quitter)
    read_end = quitter.ask(quitter.selection(OTHER_MIME), OTHER_MIME)
    writer = owner.served(offered, 2)
    assert writer.mime == OTHER_MIME
    got = b""
    try:
        while len(got) < 100 * 1024:
            ready, _, _ = select.select([read_end], [], [], DEADLINE)
            assert ready, f"no data after {len(got)} bytes"
            chunk = os.read(read_end, 100 * 1024 - len(got))
            assert chunk
            got += chunk
    finally:
        os.close(read_end)
    assert got == big[:len(got)]
    writer.join(DEADLINE)
    assert not writer.is_alive(), f"the writer still blocks after {writer.written} bytes"
    assert writer.error is not None and writer.error.errno == errno.EPIPE, writer.error
    assert writer.written < len(big)
    owner.roundtrip()
    quitter.roundtrip()


def test_a_pipe_sent_with_a_refused_fd_is_not_kept_open(
        split: RunningProxy, clients: list[ClipClient | KeymapClient]) -> None:
    """A client sends, in one go, a paste into a pipe and one into a socket: it is
    refused and disconnected, and the proxy keeps no end of its pipe (the pipe's
    reader sees its end: whatever was relayed, then EOF)."""
    through = path_of(split)
    owner = ClipClient(through, "owner")
    clients.append(owner)
    owner.offer({MIME: b"to the pipe"})
    raw = RawClient(through)
    read_end, write_end = os.pipe2(os.O_CLOEXEC)
    one, two = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        offer = raw_selection_offer(raw)
        first, _ = request(offer, "wl_data_offer", "receive", MIME, write_end)
        second, _ = request(offer, "wl_data_offer", "receive", MIME, one.fileno())
        raw.send((first + second, [write_end, one.fileno()]))
        os.close(write_end)
        one.close()
        two.close()
        errors = [data for object_id, opcode, data in raw.roundtrip()
                  if (object_id, opcode) == (1, 0)]
        assert errors, "the client got no error"
        text = decode_args(PROTO["wl_display"].events[0], errors[0], [])[2]
        assert isinstance(text, str) and "a Unix stream socket" in text, text
    finally:
        raw.close()
    # Dispatch the owner meanwhile: Weston may have asked it for the first paste.
    got = b""
    deadline = time.monotonic() + 10.0
    while True:
        owner.dispatch(0.05)
        ready, _, _ = select.select([read_end], [], [], 0)
        if ready:
            chunk = os.read(read_end, 65536)
            if not chunk:
                break
            got += chunk
        assert time.monotonic() < deadline, \
            f"the pipe never ended ({got!r} read): the proxy holds its write end"
    os.close(read_end)
    assert got in (b"", b"to the pipe")
