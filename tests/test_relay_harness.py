"""The proxy end to end, waypipe-style: the test is both the client and the compositor.

Every test starts ``python3 -m qubesshm serve`` as a subprocess with a private
``XDG_RUNTIME_DIR`` and ``--upstream`` pointing at a listening Unix socket the test
owns (the fake compositor). A test connects as a client, accepts the proxy's
upstream connection on the fake compositor socket and then drives both ends with
real ``sendmsg``/``recvmsg`` calls, fds included. Every read has a timeout, so a
broken proxy fails a test instead of hanging it. There are no wall-clock
performance thresholds: only generous deadlines for things that must happen.
"""

from __future__ import annotations

import array
import contextlib
import fcntl
import os
import re
import select
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import termios
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pytest

from qubesshm.relay.server import ahead
from qubesshm.wire.codec import HEADER, ArgValue, UntypedNewId, decode_args, encode_message
from qubesshm.wire.protocol import MessageSpec, load_protocols

REPO = Path(__file__).resolve().parent.parent
PROTOCOL = load_protocols()

# Every blocking socket operation of the test gives up after this long.
IO_TIMEOUT = 10.0
# How long the proxy may take to start up or to exit after a signal.
PROCESS_TIMEOUT = 30.0
# The kernel's SCM_MAX_FD: the most fds one sendmsg may carry.
SCM_MAX_FD = 253
# What libwayland passes (and sizes its receive buffer for) per sendmsg.
LIBWAYLAND_MAX_FDS = 28
ANCILLARY_SPACE = socket.CMSG_SPACE(SCM_MAX_FD * 4)
RECV_SIZE = 256 * 1024


# -- messages ------------------------------------------------------------------


def request_spec(interface: str, name: str) -> MessageSpec:
    return next(m for m in PROTOCOL[interface].requests if m.name == name)


def event_spec(interface: str, name: str) -> MessageSpec:
    return next(m for m in PROTOCOL[interface].events if m.name == name)


def req(object_id: int, interface: str, name: str, *args: ArgValue) -> bytes:
    data, fds = encode_message(object_id, request_spec(interface, name), args)
    assert not fds, "use encode_message directly for messages with fds"
    return data


def evt(object_id: int, interface: str, name: str, *args: ArgValue) -> bytes:
    data, fds = encode_message(object_id, event_spec(interface, name), args)
    assert not fds, "use encode_message directly for messages with fds"
    return data


def global_event(registry: int, name: int, interface: str, version: int) -> bytes:
    return evt(registry, "wl_registry", "global", name, interface, version)


def memfd_with(marker: bytes) -> int:
    fd = os.memfd_create("qubesshm-test", os.MFD_CLOEXEC)
    os.write(fd, marker)
    return fd


def read_marker(fd: int, length: int) -> bytes:
    return os.pread(fd, length, 0)


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def vm_rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmRSS in /proc/{pid}/status")


def unread_outgoing(sock: socket.socket) -> int:
    """Bytes this socket sent that its peer has not read yet (SIOCOUTQ)."""
    raw = fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, struct.pack("i", 0))
    return int(struct.unpack("i", raw)[0])


def wait_until(condition: Callable[[], bool], what: str | Callable[[], str],
               timeout: float = 20.0) -> None:
    """Poll ``condition`` until it holds; fail the test after ``timeout`` s, saying
    ``what`` did not happen (a callable is asked for the text only then)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            text = what() if callable(what) else what
            pytest.fail(f"{text} did not happen within {timeout:g} s")
        time.sleep(0.01)


# -- sockets -------------------------------------------------------------------


class Endpoint:
    """One end of a Unix stream connection: bytes and SCM_RIGHTS fds, with timeouts."""

    def __init__(self, sock: socket.socket) -> None:
        sock.settimeout(IO_TIMEOUT)
        self.sock = sock
        self.buf = bytearray()
        self.fds: list[int] = []
        # How many fds each recvmsg delivered (for the libwayland 28-fd limit).
        self.fds_per_recv: list[int] = []
        self.closed = False

    def send(self, data: bytes, fds: Sequence[int] = ()) -> None:
        ancillary = (
            [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())]
            if fds else []
        )
        sent = self.sock.sendmsg([data], ancillary)
        if sent < len(data):
            self.sock.sendall(data[sent:])

    def _recv(self) -> bytes:
        data, ancdata, flags, _ = self.sock.recvmsg(
            RECV_SIZE, ANCILLARY_SPACE, socket.MSG_CMSG_CLOEXEC)
        fds: list[int] = []
        for level, kind, payload in ancdata:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                received = array.array("i")
                received.frombytes(payload[: len(payload) - len(payload) % 4])
                fds.extend(received)
        assert not flags & socket.MSG_CTRUNC, "fds were truncated"
        if fds:
            self.fds_per_recv.append(len(fds))
        self.fds.extend(fds)
        self.buf += data
        return data

    def recv_exact(self, size: int) -> bytes:
        while len(self.buf) < size:
            if not self._recv():
                raise AssertionError(f"EOF after {len(self.buf)} of {size} expected bytes")
        out = bytes(self.buf[:size])
        del self.buf[:size]
        return out

    def expect(self, data: bytes) -> None:
        got = self.recv_exact(len(data))
        assert got == data

    def recv_message(self) -> tuple[int, int, bytes]:
        """(object id, opcode, whole message) of the next message."""
        while len(self.buf) < HEADER.size:
            if not self._recv():
                raise AssertionError(f"EOF with {len(self.buf)} bytes of a header")
        object_id, word = HEADER.unpack_from(self.buf)
        data = self.recv_exact(word >> 16)
        return object_id, word & 0xFFFF, data

    def take_fds(self, count: int) -> list[int]:
        assert len(self.fds) >= count, f"expected {count} fds, have {len(self.fds)}"
        fds, self.fds = self.fds[:count], self.fds[count:]
        return fds

    def expect_eof(self, *, reset_ok: bool = False) -> None:
        """The peer hung up, with nothing (more) in flight.

        ``reset_ok``: a Unix socket closed with unread data in its receive queue
        makes its peer's recv fail with ECONNRESET instead of returning b"".
        """
        assert not self.buf, f"{len(self.buf)} unexpected bytes before EOF"
        try:
            data = self._recv()
        except ConnectionResetError:
            if reset_ok:
                return
            raise
        assert data == b"", f"expected EOF, got {len(data)} more bytes"
        assert not self.fds, f"{len(self.fds)} unexpected fds"

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        for fd in self.fds:
            os.close(fd)
        self.fds = []
        self.sock.close()


class Pair:
    """A client connected through the proxy and the compositor side of it."""

    def __init__(self, client: Endpoint, compositor: Endpoint) -> None:
        self.client = client
        self.compositor = compositor
        self._next_id = 2
        self._serial = 1000

    def new_id(self) -> int:
        object_id = self._next_id
        self._next_id += 1
        return object_id

    def request(self, data: bytes, fds: Sequence[int] = ()) -> None:
        """The client sends; the compositor receives exactly these bytes."""
        self.client.send(data, fds)
        self.compositor.expect(data)

    def events(self, data: bytes) -> None:
        """The compositor sends; the client receives exactly these bytes."""
        self.compositor.send(data)
        self.client.expect(data)

    def roundtrip(self) -> None:
        """wl_display.sync through the proxy and back."""
        callback = self.new_id()
        self.request(req(1, "wl_display", "sync", callback))
        self._serial += 1
        self.events(evt(callback, "wl_callback", "done", self._serial)
                    + evt(1, "wl_display", "delete_id", callback))

    def get_registry(self) -> int:
        registry = self.new_id()
        self.request(req(1, "wl_display", "get_registry", registry))
        return registry

    def bind(self, registry: int, name: int, interface: str, version: int) -> int:
        """Advertise a global, then bind it."""
        self.events(global_event(registry, name, interface, version))
        object_id = self.new_id()
        self.request(req(registry, "wl_registry", "bind", name,
                         UntypedNewId(interface, version, object_id)))
        return object_id

    def close(self) -> None:
        self.client.close()
        self.compositor.close()


# -- the proxy -----------------------------------------------------------------


class Proxy:
    def __init__(self, process: subprocess.Popen[bytes], path: Path, log: Path) -> None:
        self.process = process
        self.path = path
        self.lock_path = Path(f"{path}.lock")
        self.log_path = log
        self.stopped = False

    @property
    def pid(self) -> int:
        return self.process.pid

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, sig: signal.Signals = signal.SIGTERM) -> int:
        """Signal the proxy and return its exit status."""
        self.stopped = True
        self.process.send_signal(sig)
        try:
            return self.process.wait(timeout=PROCESS_TIMEOUT)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            pytest.fail(f"the proxy did not exit within {PROCESS_TIMEOUT:g} s of {sig.name}; "
                        f"log:\n{self.log()}")

    def assert_stopped_cleanly(self, status: int) -> None:
        assert status == 0, f"the proxy exited with {status}; log:\n{self.log()}"
        assert not self.path.exists(), "the proxy left its socket behind"
        assert not self.lock_path.exists(), "the proxy left its lock file behind"


def probe_closed(sock: socket.socket) -> bool:
    """Whether an accepted connection is already closed by its peer, unread."""
    try:
        return sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
    except BlockingIOError:
        return False


class Harness:
    """A private runtime dir, a fake compositor socket and the proxies under test."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.run_dir = root / "run"
        self.run_dir.mkdir(mode=0o700)
        self.run_dir.chmod(0o700)
        self.upstream = root / "fake-compositor"
        self.compositor = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.compositor.bind(str(self.upstream))
        self.compositor.listen(64)
        self.compositor.settimeout(IO_TIMEOUT)
        self.proxies: list[Proxy] = []
        self.pairs: list[Pair] = []

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env["XDG_RUNTIME_DIR"] = str(self.run_dir)
        env.pop("WAYLAND_DISPLAY", None)
        env.pop("WAYLAND_SOCKET", None)
        env.pop("QUBESSHM_DEBUG", None)
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
        return env

    def command(self, name: str, *extra: str) -> list[str]:
        return [sys.executable, "-m", "qubesshm", "serve", "--socket", name,
                "--upstream", str(self.upstream), *extra]

    def start_proxy(self, *extra: str, name: str = "qs-test") -> Proxy:
        log_path = self.root / f"proxy-{len(self.proxies)}.log"
        with log_path.open("wb") as log:
            process = subprocess.Popen(
                self.command(name, *extra), env=self.env(), cwd=REPO,
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
        proxy = Proxy(process, self.run_dir / name, log_path)
        self.proxies.append(proxy)
        deadline = time.monotonic() + PROCESS_TIMEOUT
        while not proxy.path.exists():
            if process.poll() is not None:
                pytest.fail(f"the proxy exited with {process.returncode}:\n{proxy.log()}")
            if time.monotonic() > deadline:
                pytest.fail(f"{proxy.path} did not appear; log:\n{proxy.log()}")
            time.sleep(0.01)
        # A session set up and torn down proves the event loop (and with it the
        # signal handlers) is running, not just that the socket file exists.
        probe = self.connect(proxy, track=False)
        probe.client.close()
        probe.compositor.expect_eof()
        probe.compositor.close()
        return proxy

    def connect(self, proxy: Proxy, *, track: bool = True) -> Pair:
        """Connect as a client and accept the proxy's connection to the compositor."""
        deadline = time.monotonic() + PROCESS_TIMEOUT
        while True:
            client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                client.connect(str(proxy.path))
                break
            except (ConnectionRefusedError, FileNotFoundError):
                # Between bind() and listen(), or a stale socket not yet replaced.
                client.close()
                if proxy.process.poll() is not None:
                    pytest.fail(f"the proxy exited with {proxy.process.returncode}:\n"
                                f"{proxy.log()}")
                if time.monotonic() > deadline:
                    pytest.fail(f"cannot connect to {proxy.path}; log:\n{proxy.log()}")
                time.sleep(0.01)
        try:
            upstream, _ = self.compositor.accept()
            # qubesshm serve checks at start that a compositor answers, with a
            # connection it closes at once: that one is not this client's.
            while probe_closed(upstream):
                upstream.close()
                upstream, _ = self.compositor.accept()
        except TimeoutError:
            client.close()
            pytest.fail(f"the proxy did not connect upstream; log:\n{proxy.log()}")
        pair = Pair(Endpoint(client), Endpoint(upstream))
        if track:
            self.pairs.append(pair)
        return pair

    def close(self) -> None:
        for pair in self.pairs:
            pair.close()
        self.compositor.close()
        for proxy in self.proxies:
            if not proxy.stopped:
                proxy.assert_stopped_cleanly(proxy.stop(signal.SIGTERM))


@pytest.fixture
def harness(tmp_path: Path) -> Iterator[Harness]:
    root = tmp_path
    if len(os.fsencode(root / "run" / "qs-test.lock")) > 100:
        root = Path(tempfile.mkdtemp(prefix="qs-"))  # sun_path holds 108 bytes
    h = Harness(root)
    try:
        yield h
    finally:
        h.close()


@pytest.fixture
def proxy(harness: Harness) -> Proxy:
    return harness.start_proxy()


def decode_display_error(data: bytes) -> tuple[int, int, str]:
    object_id, code, message = decode_args(event_spec("wl_display", "error"), data, [])
    assert isinstance(object_id, int) and isinstance(code, int)
    assert isinstance(message, str)
    return object_id, code, message


# -- 1. byte-exact passthrough ----------------------------------------------------


@pytest.mark.parametrize("debug", [False, True], ids=["quiet", "debug"])
def test_passthrough_is_byte_exact_both_ways(harness: Harness, debug: bool) -> None:
    proxy = harness.start_proxy(*(["--debug"] if debug else []))
    pair = harness.connect(proxy)

    registry, callback = pair.new_id(), pair.new_id()
    requests = (req(1, "wl_display", "get_registry", registry)
                + req(1, "wl_display", "sync", callback))
    pair.client.send(requests)
    pair.compositor.expect(requests)

    events = b"".join([
        global_event(registry, 1, "wl_compositor", PROTOCOL["wl_compositor"].version),
        global_event(registry, 2, "wl_shm", PROTOCOL["wl_shm"].version),
        global_event(registry, 3, "wl_seat", min(5, PROTOCOL["wl_seat"].version)),
        global_event(registry, 4, "xdg_wm_base", 1),
        global_event(registry, 5, "wl_output", PROTOCOL["wl_output"].version),
        evt(callback, "wl_callback", "done", 4242),
        evt(1, "wl_display", "delete_id", callback),
    ])
    pair.compositor.send(events)
    pair.client.expect(events)

    # The freed callback id is usable again, and nothing else was in flight.
    sync_again = req(1, "wl_display", "sync", callback)
    pair.request(sync_again)
    pair.events(evt(callback, "wl_callback", "done", 4243)
                + evt(1, "wl_display", "delete_id", callback))
    pair.roundtrip()

    if debug:
        wait_until(lambda: "wl_display@1.get_registry" in proxy.log(), "protocol log")
        log = proxy.log()
        assert f"wl_registry@{registry}.global" in log
        assert f"wl_callback@{callback}.done" in log


# -- 2. fds both ways ---------------------------------------------------------------


# wl_shm pools stay in the proxy (it copies their pixels into grant pages), so the
# fd-carrying request these tests relay is zwp_linux_buffer_params_v1.add, which the
# proxy relays unchanged once --allow-dmabuf stops hiding zwp_linux_dmabuf_v1.
FD_RELAY_OPTIONS = ("--allow-dmabuf",)


def fd_params(pair: Pair) -> int:
    """A zwp_linux_buffer_params_v1 whose ``add`` requests carry one fd each."""
    registry = pair.get_registry()
    dmabuf = pair.bind(registry, 1, "zwp_linux_dmabuf_v1", 3)
    params = pair.new_id()
    pair.request(req(dmabuf, "zwp_linux_dmabuf_v1", "create_params", params))
    return params


def add_fd(params: int, fd: int, plane: int = 0) -> bytes:
    data, fds = encode_message(params, request_spec("zwp_linux_buffer_params_v1", "add"),
                               [fd, plane, 0, 4096, 0, 0])
    assert fds == [fd]
    return data


def test_fd_reaches_compositor_and_proxy_closes_its_copies(harness: Harness) -> None:
    proxy = harness.start_proxy(*FD_RELAY_OPTIONS)
    pair = harness.connect(proxy)
    params = fd_params(pair)

    def send_pools(count: int) -> None:
        data = bytearray()
        fds: list[int] = []
        markers: list[bytes] = []
        for plane in range(count):
            marker = f"plane {plane} marker".encode()
            fd = memfd_with(marker)
            data += add_fd(params, fd, plane)
            fds.append(fd)
            markers.append(marker)
        inodes = [os.fstat(fd).st_ino for fd in fds]
        pair.client.send(bytes(data), fds)
        for fd in fds:
            os.close(fd)
        pair.compositor.expect(bytes(data))
        got = pair.compositor.take_fds(count)
        assert not pair.compositor.fds, f"{len(pair.compositor.fds)} fds more than sent"
        for fd, marker, inode in zip(got, markers, inodes, strict=True):
            assert read_marker(fd, len(marker)) == marker
            assert os.fstat(fd).st_ino == inode
            os.close(fd)

    # Taken before any fd went through the proxy, so that a copy it kept of the very
    # first one counts too.
    pair.roundtrip()
    baseline = fd_count(proxy.pid)
    send_pools(1)
    for _ in range(10):
        send_pools(20)
    # The round trip orders us after the proxy finished with the last batch.
    pair.roundtrip()
    assert fd_count(proxy.pid) <= baseline, "the proxy keeps copies of forwarded fds"
    assert not pair.compositor.fds and not pair.client.fds


def test_fd_from_compositor_event_reaches_client(harness: Harness, proxy: Proxy) -> None:
    pair = harness.connect(proxy)
    registry = pair.get_registry()
    seat = pair.bind(registry, 7, "wl_seat", min(7, PROTOCOL["wl_seat"].version))
    keyboard = pair.new_id()
    pair.request(req(seat, "wl_seat", "get_keyboard", keyboard))
    keymap = event_spec("wl_keyboard", "keymap")

    def send_keymap(n: int) -> None:
        marker = f"xkb keymap #{n}".encode()
        fd = memfd_with(marker)
        inode = os.fstat(fd).st_ino
        data, fds = encode_message(keyboard, keymap, [1, fd, len(marker)])
        pair.compositor.send(data, fds)
        os.close(fd)
        pair.client.expect(data)
        [got] = pair.client.take_fds(1)
        assert read_marker(got, len(marker)) == marker
        assert os.fstat(got).st_ino == inode
        os.close(got)

    # Taken before any fd went through the proxy, so that a copy it kept of the very
    # first one counts too.
    pair.roundtrip()
    baseline = fd_count(proxy.pid)
    for n in range(51):
        send_keymap(n)
    pair.roundtrip()
    assert fd_count(proxy.pid) <= baseline, "the proxy keeps copies of forwarded fds"


# -- 3. 100 fds in one burst ----------------------------------------------------------


# (messages, fds) per client sendmsg. "skewed" sends some fds ahead of their
# messages and some messages ahead of their fds, as a stream socket may deliver them.
BURSTS = {
    "4-sendmsg": [(25, 25)] * 4,
    "1-sendmsg": [(100, 100)],
    "skewed": [(10, 25), (50, 25), (20, 25), (20, 25)],
}


@pytest.mark.parametrize("burst", BURSTS, ids=list(BURSTS))
def test_hundred_fds_in_one_burst_arrive_in_order(harness: Harness, burst: str) -> None:
    calls = BURSTS[burst]
    assert all(n_fds <= SCM_MAX_FD for _, n_fds in calls)
    proxy = harness.start_proxy(*FD_RELAY_OPTIONS)
    pair = harness.connect(proxy)
    params = fd_params(pair)

    count = 100
    messages: list[bytes] = []
    fds: list[int] = []
    for i in range(count):
        fd = memfd_with(f"marker {i:03d}".encode())
        messages.append(add_fd(params, fd, i))
        fds.append(fd)
    assert sum(n for n, _ in calls) == sum(n for _, n in calls) == count
    message_at = fd_at = 0
    for n_messages, n_fds in calls:
        pair.client.send(b"".join(messages[message_at:message_at + n_messages]),
                         fds[fd_at:fd_at + n_fds])
        message_at += n_messages
        fd_at += n_fds
    for fd in fds:
        os.close(fd)

    pair.compositor.expect(b"".join(messages))
    got = pair.compositor.take_fds(count)
    assert [read_marker(fd, 10) for fd in got] == [
        f"marker {i:03d}".encode() for i in range(count)]
    for fd in got:
        os.close(fd)
    assert sum(pair.compositor.fds_per_recv) == count
    assert max(pair.compositor.fds_per_recv) <= LIBWAYLAND_MAX_FDS, (
        f"fds per recvmsg: {pair.compositor.fds_per_recv}")
    pair.roundtrip()


# -- 4. globals the proxy cannot decode are hidden ----------------------------------------


def test_unknown_global_hidden_and_version_capped(harness: Harness, proxy: Proxy) -> None:
    assert "weston_screenshooter" not in PROTOCOL
    xml_version = PROTOCOL["wl_compositor"].version
    assert xml_version < 99
    pair = harness.connect(proxy)
    registry = pair.get_registry()
    callback = pair.new_id()
    pair.request(req(1, "wl_display", "sync", callback))

    pair.compositor.send(
        global_event(registry, 1, "weston_screenshooter", 1)
        + global_event(registry, 2, "wl_compositor", 99)
        + evt(callback, "wl_callback", "done", 7)
        + evt(1, "wl_display", "delete_id", callback))
    pair.client.expect(
        global_event(registry, 2, "wl_compositor", xml_version)
        + evt(callback, "wl_callback", "done", 7)
        + evt(1, "wl_display", "delete_id", callback))

    # The capped version is what the client may bind.
    compositor = pair.new_id()
    pair.request(req(registry, "wl_registry", "bind", 2,
                     UntypedNewId("wl_compositor", xml_version, compositor)))
    # Removing the hidden global is hidden too; removing the visible one is not.
    pair.compositor.send(evt(registry, "wl_registry", "global_remove", 1))
    pair.events(evt(registry, "wl_registry", "global_remove", 2))
    pair.roundtrip()


def test_binding_a_hidden_global_is_an_error(harness: Harness, proxy: Proxy) -> None:
    pair = harness.connect(proxy)
    registry = pair.get_registry()
    pair.compositor.send(global_event(registry, 1, "weston_screenshooter", 1))
    pair.roundtrip()
    pair.client.send(req(registry, "wl_registry", "bind", 1,
                         UntypedNewId("weston_screenshooter", 1, pair.new_id())))
    object_id, opcode, data = pair.client.recv_message()
    assert (object_id, opcode) == (1, 0)
    _, code, message = decode_display_error(data)
    assert code == 0, message  # INVALID_OBJECT
    pair.client.expect_eof()
    pair.compositor.expect_eof()


# -- 5. protocol violations cost only the offender -------------------------------------------

GARBAGE = {
    # A request to an object that does not exist: INVALID_OBJECT on wl_display.
    "unknown-object": (HEADER.pack(77, 8 << 16 | 0), {0}),
    # An opcode wl_display does not have: INVALID_METHOD.
    "unknown-opcode": (HEADER.pack(1, 8 << 16 | 9), {1}),
    # A header claiming 5 bytes, less than the header itself.
    "size-5": (HEADER.pack(1, 5 << 16 | 0), {0, 1}),
}


@pytest.mark.parametrize("garbage", GARBAGE, ids=list(GARBAGE))
def test_protocol_violation_ends_only_that_client(harness: Harness, proxy: Proxy,
                                                 garbage: str) -> None:
    data, codes = GARBAGE[garbage]
    before = harness.connect(proxy)
    before.roundtrip()

    bad = harness.connect(proxy)
    bad.get_registry()
    bad.roundtrip()
    bad.client.send(data)
    object_id, opcode, message_data = bad.client.recv_message()
    assert (object_id, opcode) == (1, 0), "expected a wl_display.error event"
    error_object, code, message = decode_display_error(message_data)
    assert error_object == 1
    assert code in codes, message
    assert message and message.isprintable()
    bad.client.expect_eof()
    # The compositor saw none of the garbage, only the end of the connection.
    assert bad.compositor.sock.recv(RECV_SIZE) == b""

    after = harness.connect(proxy)
    after.roundtrip()
    before.roundtrip()
    after.get_registry()
    after.roundtrip()


# -- 6. hang-ups travel to the other side --------------------------------------------------


def test_client_hangup_reaches_compositor(harness: Harness, proxy: Proxy) -> None:
    pair = harness.connect(proxy)
    pair.roundtrip()
    last = req(1, "wl_display", "sync", pair.new_id())
    pair.client.send(last)
    pair.client.close()
    pair.compositor.expect(last)
    pair.compositor.expect_eof()


def test_compositor_hangup_reaches_client_after_its_last_words(harness: Harness,
                                                               proxy: Proxy) -> None:
    pair = harness.connect(proxy)
    registry = pair.get_registry()
    pair.roundtrip()
    last_words = (
        global_event(registry, 1, "wl_output", 2)
        + evt(1, "wl_display", "error", registry, 0, "the compositor says goodbye"))
    pair.compositor.send(last_words)
    pair.compositor.close()
    pair.client.expect(last_words)
    pair.client.expect_eof()


def backlog_size() -> int:
    """Bytes enough to fill a client's socket buffer without pausing the proxy.

    The kernel takes about ``wmem_default`` bytes into a client's socket; the proxy
    queues the rest and stops reading its compositor only above 256 KiB, so 96 KiB
    more than that stays queued inside the proxy, well below the pause.
    """
    try:
        wmem = int(Path("/proc/sys/net/core/wmem_default").read_text())
    except (OSError, ValueError):
        wmem = 212992
    return wmem + 96 * 1024


def globals_blob(registry: int, size: int, first_name: int = 1) -> bytes:
    one = len(global_event(registry, 1, "wl_output", 2))
    return b"".join(global_event(registry, first_name + i, "wl_output", 2)
                    for i in range(size // one + 1))


def wait_for_upstream_closed(pair: Pair, after: str, proxy: Proxy) -> None:
    """Wait, without reading the client's side, until the proxy has closed its
    compositor connection: it has handled ``after`` and ended the session there.

    A proxy that dropped what it still had queued for the client and hung up on it
    did so by then, in the same step; the client's side cannot be waited on, as a
    correct proxy keeps it open, unread, until the client has read its queue.
    """
    sock = pair.compositor.sock
    poller = select.poll()
    poller.register(sock.fileno(), select.POLLIN | select.POLLRDHUP)
    if not poller.poll(IO_TIMEOUT * 1000):
        pytest.fail(f"the proxy did not close its compositor connection within "
                    f"{IO_TIMEOUT:g} s of {after}; log:\n{proxy.log()}")
    pair.compositor.expect_eof()


def test_compositor_hangup_with_backlog_keeps_all_bytes(harness: Harness,
                                                         proxy: Proxy) -> None:
    pair = harness.connect(proxy)
    registry = pair.get_registry()
    pair.roundtrip()
    last_words = (
        globals_blob(registry, backlog_size())
        + evt(1, "wl_display", "error", registry, 0, "the compositor says goodbye"))
    pair.compositor.send(last_words)
    # The proxy reads the end of the stream as it would a close, and the test can
    # still see the proxy end its side.
    pair.compositor.sock.shutdown(socket.SHUT_WR)
    wait_for_upstream_closed(pair, "the compositor hanging up", proxy)
    pair.client.expect(last_words)
    pair.client.expect_eof()


def test_protocol_error_reaches_client_behind_backlog(harness: Harness,
                                                      proxy: Proxy) -> None:
    pair = harness.connect(proxy)
    registry = pair.get_registry()
    pair.roundtrip()
    backlog = globals_blob(registry, backlog_size())
    pair.compositor.send(backlog)
    wait_until(lambda: unread_outgoing(pair.compositor.sock) == 0,
               "the proxy reading the compositor's events")
    pair.client.send(HEADER.pack(77, 8 << 16 | 0))
    # The compositor gets none of the bad request, only the end of the session.
    wait_for_upstream_closed(pair, "the client's protocol error", proxy)
    pair.client.expect(backlog)
    object_id, opcode, data = pair.client.recv_message()
    assert (object_id, opcode) == (1, 0)
    assert decode_display_error(data)[1] == 0
    pair.client.expect_eof()


# -- 7. backpressure -----------------------------------------------------------------------


FLOOD_LIMIT = 64 * 1024 * 1024
DONE_SIZE = 12  # wl_callback.done: header and one uint


def flood(compositor: Endpoint, callback: int) -> tuple[int, bytes]:
    """Send wl_callback.done events (serials 0, 1, ...) until the proxy stops reading.

    Stops once the socket stays unwritable for two seconds, the proxy hangs up, or
    at FLOOD_LIMIT. Returns the number of bytes sent and the rest of the message a
    partial send cut (empty if none), which the caller may send later.
    """
    word = DONE_SIZE << 16 | 0
    batch = 4096
    sock = compositor.sock
    sock.setblocking(False)
    sent_total = 0
    serial = 0
    pending = b""
    try:
        while sent_total < FLOOD_LIMIT:
            if not pending:
                values = array.array("I")
                for s in range(serial, serial + batch):
                    values.extend((callback, word, s))
                serial += batch
                pending = values.tobytes()
            try:
                n = sock.send(pending)
            except BlockingIOError:
                _, writable, _ = select.select([], [sock], [], 2.0)
                if not writable:
                    break
                continue
            except (BrokenPipeError, ConnectionResetError):
                break
            sent_total += n
            pending = pending[n:]
    finally:
        sock.settimeout(IO_TIMEOUT)
    return sent_total, pending[: -sent_total % DONE_SIZE]


def test_backpressure_bounds_memory_and_loses_nothing(harness: Harness) -> None:
    proxy = harness.start_proxy("--stall-timeout", "300")
    pair = harness.connect(proxy)
    callback = pair.new_id()
    pair.request(req(1, "wl_display", "sync", callback))
    pair.roundtrip()
    rss_before = vm_rss_kib(proxy.pid)

    sent, tail = flood(pair.compositor, callback)
    rss_after = vm_rss_kib(proxy.pid)
    assert sent < FLOOD_LIMIT, "the proxy never stopped reading the compositor"
    # More than the kernel buffers alone hold: the proxy did queue and then pause.
    assert sent > 256 * 1024
    assert (rss_after - rss_before) * 1024 < 64 * 1024 * 1024, (
        f"proxy RSS grew from {rss_before} KiB to {rss_after} KiB")

    # The client catches up and gets every event, in order.
    whole = sent - sent % DONE_SIZE
    received = pair.client.recv_exact(whole)
    if tail:
        pair.compositor.send(tail)
        received += pair.client.recv_exact(DONE_SIZE)
    sent = len(received)
    values = array.array("I")
    values.frombytes(received)
    count = sent // DONE_SIZE
    assert list(values[0::3]) == [callback] * count
    assert list(values[1::3]) == [DONE_SIZE << 16] * count
    assert list(values[2::3]) == list(range(count))
    pair.roundtrip()


def test_stalled_client_is_dropped_others_keep_working(harness: Harness) -> None:
    proxy = harness.start_proxy("--stall-timeout", "1")
    other = harness.connect(proxy)
    other.roundtrip()

    stalled = harness.connect(proxy)
    callback = stalled.new_id()
    stalled.request(req(1, "wl_display", "sync", callback))
    flood(stalled.compositor, callback)
    other.roundtrip()  # most likely while the stalled session is paused
    stalled.compositor.sock.settimeout(20.0)
    try:
        stalled.compositor.expect_eof(reset_ok=True)
    except TimeoutError:
        pytest.fail(f"the stalled session was not dropped; log:\n{proxy.log()}")

    other.roundtrip()
    later = harness.connect(proxy)
    later.roundtrip()
    other.roundtrip()


def test_compositor_that_stops_reading_is_dropped(harness: Harness) -> None:
    proxy = harness.start_proxy("--stall-timeout", "1")
    other = harness.connect(proxy)
    other.roundtrip()

    stalled = harness.connect(proxy)
    registry = stalled.get_registry()
    compositor = stalled.bind(registry, 1, "wl_compositor", 4)
    surface = stalled.new_id()
    stalled.request(req(compositor, "wl_compositor", "create_surface", surface))
    rss_before = vm_rss_kib(proxy.pid)
    # The client floods wl_surface.commit; the compositor reads none of it.
    commit = req(surface, "wl_surface", "commit")
    commits = commit * 8192
    sock = stalled.client.sock
    sock.setblocking(False)
    sent = 0
    try:
        while sent < FLOOD_LIMIT:
            try:
                sent += sock.send(commits)
            except BlockingIOError:
                _, writable, _ = select.select([], [sock], [], 2.0)
                if not writable:
                    break
            except (BrokenPipeError, ConnectionResetError):
                break
    finally:
        sock.settimeout(20.0)
    assert sent < FLOOD_LIMIT, "the proxy never stopped reading the client"
    assert (vm_rss_kib(proxy.pid) - rss_before) * 1024 < 64 * 1024 * 1024
    try:
        stalled.client.expect_eof(reset_ok=True)
    except TimeoutError:
        pytest.fail(f"the stalled session was not dropped; log:\n{proxy.log()}")
    # Whatever reached the compositor were whole commits, then the end.
    stalled.compositor.sock.settimeout(20.0)
    received = b""
    try:
        while chunk := stalled.compositor.sock.recv(RECV_SIZE):
            received += chunk
    except ConnectionResetError:
        pass
    assert len(received) % len(commit) == 0
    assert received == commit * (len(received) // len(commit))

    other.roundtrip()


# -- 8. signals and the socket lock -------------------------------------------------------


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_signal_stops_proxy_cleanly(harness: Harness, proxy: Proxy,
                                    sig: signal.Signals) -> None:
    pair = harness.connect(proxy)
    pair.roundtrip()
    proxy.assert_stopped_cleanly(proxy.stop(sig))
    # Its sessions went with it.
    pair.client.expect_eof()
    pair.compositor.expect_eof()


def test_second_serve_on_same_name_fails_naming_the_lock(harness: Harness,
                                                         proxy: Proxy) -> None:
    result = subprocess.run(
        harness.command("qs-test"), env=harness.env(), cwd=REPO, stdin=subprocess.DEVNULL,
        capture_output=True, text=True, timeout=PROCESS_TIMEOUT, check=False)
    assert result.returncode != 0
    assert "qs-test.lock" in result.stderr, result.stderr
    # The first one still owns its socket and serves.
    assert proxy.path.exists() and proxy.lock_path.exists()
    pair = harness.connect(proxy)
    pair.roundtrip()


def test_stale_socket_is_replaced(harness: Harness) -> None:
    path = harness.run_dir / "qs-test"
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(path))
    stale.close()
    Path(f"{path}.lock").touch()  # a lock file nobody holds

    proxy = harness.start_proxy()
    # A stale socket refuses connections; this one relays.
    pair = harness.connect(proxy)
    pair.roundtrip()


# -- 9. fd accounting and resource limits (review findings) -------------------------------


def asleep(pid: int) -> bool:
    """Every thread of ``pid`` is blocked (state S), none running or runnable. A
    writer's send wakes its reader before it returns, so once a test's last send
    has returned, a proxy found asleep has done all it will do with that input."""
    states = {Path(f"/proc/{pid}/task/{task}/stat").read_text().rsplit(")", 1)[1].split()[0]
              for task in os.listdir(f"/proc/{pid}/task")}
    return states == {"S"}


def proxy_cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def assert_idle(proxy: Proxy, state: str) -> None:
    """A proxy with nothing it can do must sleep, not spin: a CPU-time bound, which
    a spinning proxy (about 2 s in 2 s) misses whatever the machine's load."""
    wait_until(lambda: asleep(proxy.pid), f"the proxy going to sleep while {state}")
    before = proxy_cpu_seconds(proxy.pid)
    time.sleep(2)
    used = proxy_cpu_seconds(proxy.pid) - before
    assert used < 0.5, f"the proxy used {used:.2f} s of CPU in 2 s while {state}"


def shm_pair(harness: Harness, proxy: Proxy) -> tuple[Pair, int]:
    pair = harness.connect(proxy)
    registry = pair.get_registry()
    return pair, pair.bind(registry, 1, "wl_shm", PROTOCOL["wl_shm"].version)


def idle_fd_count(proxy: Proxy) -> int:
    """The fds of a proxy with no session, taken once it has finished with the last
    one (start-up's probe, for a fresh proxy): what it must come back to."""
    wait_until(lambda: asleep(proxy.pid), "the proxy going to sleep")
    return fd_count(proxy.pid)


def test_fds_of_rejected_messages_are_closed(harness: Harness, proxy: Proxy) -> None:
    baseline = idle_fd_count(proxy)
    create_pool = request_spec("wl_shm", "create_pool")
    for _ in range(20):
        pair, shm = shm_pair(harness, proxy)
        fd = memfd_with(b"rejected")
        # A pool reusing the live wl_shm id: rejected after its fd was taken.
        data, _ = encode_message(shm, create_pool, [shm, fd, 4096])
        pair.client.send(data, [fd])
        os.close(fd)
        object_id, opcode, _ = pair.client.recv_message()
        assert (object_id, opcode) == (1, 0)
        pair.client.expect_eof()
        pair.compositor.expect_eof(reset_ok=True)
        pair.close()
    wait_until(lambda: fd_count(proxy.pid) <= baseline,
               lambda: f"the proxy closing rejected fds (back to {baseline} fds; it holds "
                       f"{fd_count(proxy.pid)})")


def held_inodes(pid: int) -> set[int]:
    """The inodes of the files process ``pid`` holds open."""
    inodes = set()
    for name in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(FileNotFoundError):
            inodes.add(os.stat(f"/proc/{pid}/fd/{name}").st_ino)
    return inodes


def test_a_destroyed_pool_is_closed_with_nothing_more_from_the_client(
        harness: Harness, proxy: Proxy) -> None:
    """The proxy closes a pool the client destroyed (its pages go with the last fd) a
    moment after relaying that batch, with no further request or event to prompt it."""
    pair, shm = shm_pair(harness, proxy)
    pool = pair.new_id()
    fd = memfd_with(b"\x01" * 8192)
    inode = os.fstat(fd).st_ino
    pair.client.send(*encode_message(shm, request_spec("wl_shm", "create_pool"),
                                     [pool, fd, 8192]))
    os.close(fd)
    wait_until(lambda: inode in held_inodes(proxy.pid), "the proxy taking the pool")
    pair.client.send(req(pool, "wl_shm_pool", "destroy"))
    # The proxy kept the pool, so it retires the id itself.
    assert pair.client.recv_message()[:2] == (1, 1)
    wait_until(lambda: inode not in held_inodes(proxy.pid),
               "the proxy closing the destroyed pool's fd")


def test_fds_sent_ahead_of_any_message_are_bounded(harness: Harness, proxy: Proxy) -> None:
    baseline = idle_fd_count(proxy)
    pair = harness.connect(proxy)
    sync = request_spec("wl_display", "sync")
    hit_limit = False
    for _ in range(8):
        fds = [memfd_with(b"x") for _ in range(200)]
        try:
            pair.client.send(encode_message(1, sync, [pair.new_id()])[0], fds)
        except OSError:
            hit_limit = True  # the proxy already hung up on us
        for fd in fds:
            os.close(fd)
        if hit_limit:
            break
    object_id, opcode, data = pair.client.recv_message()
    assert (object_id, opcode) == (1, 0)
    assert decode_display_error(data)[1] == 2  # NO_MEMORY
    pair.client.expect_eof(reset_ok=True)
    wait_until(lambda: fd_count(proxy.pid) <= baseline,
               lambda: f"the proxy closing the unclaimed fds and the session (back to "
                       f"{baseline} fds; it holds {fd_count(proxy.pid)})")
    other = harness.connect(proxy)
    other.roundtrip()


def test_queued_fds_towards_a_stuck_compositor_are_bounded(harness: Harness) -> None:
    proxy = harness.start_proxy(*FD_RELAY_OPTIONS)
    pair = harness.connect(proxy)
    params = fd_params(pair)
    pair.roundtrip()
    baseline = fd_count(proxy.pid)
    pair.client.sock.setblocking(False)
    sent = 0
    # The compositor side reads nothing; the client pushes fds until the proxy
    # stops reading it.
    for _ in range(4000):
        fd = memfd_with(b"p")
        data = add_fd(params, fd)
        try:
            pair.client.sock.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                               array.array("i", [fd]).tobytes())])
            sent += 1
        except BlockingIOError:
            os.close(fd)
            break
        os.close(fd)
    assert sent < 4000, "the proxy read every pool although the compositor reads nothing"
    wait_until(lambda: asleep(proxy.pid), "the proxy handling what it read")
    held = fd_count(proxy.pid) - baseline
    # Queued fds (high water 256) plus what sits in the proxy's read path.
    assert held < 600, f"proxy holds {held} extra fds after {sent} pools"


def test_paused_client_does_not_spin_the_proxy(harness: Harness) -> None:
    proxy = harness.start_proxy("--stall-timeout", "300")
    pair = harness.connect(proxy)
    callback = pair.new_id()
    pair.request(req(1, "wl_display", "sync", callback))
    flood(pair.compositor, callback)
    # One more request that the proxy must not keep waking up for.
    pair.client.send(req(1, "wl_display", "sync", pair.new_id()))
    assert_idle(proxy, "paused on a client that does not read")


def test_accept_survives_running_out_of_fds(harness: Harness) -> None:
    proxy = harness.start_proxy()
    # Let the proxy open almost no files: it lifts its soft limit to the hard one.
    subprocess.run(["prlimit", f"--pid={proxy.pid}", "--nofile=24:24"], check=True)
    clients = []
    for _ in range(12):
        client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        client.settimeout(PROCESS_TIMEOUT)
        client.connect(str(proxy.path))  # completes in the backlog even if never accepted
        clients.append(client)
    upstreams = []
    harness.compositor.settimeout(1.0)
    try:
        while True:
            upstreams.append(harness.compositor.accept()[0])
    except TimeoutError:
        pass
    assert 0 < len(upstreams) < len(clients), "the fd limit was never reached"
    assert_idle(proxy, "out of fds")
    assert "cannot accept a client" in proxy.log()
    served = [Pair(Endpoint(c), Endpoint(u)) for c, u in zip(clients, upstreams, strict=False)]
    for pair in served:
        pair.roundtrip()
        pair.close()
    # With fds free again, the waiting clients are served in order, none lost.
    harness.compositor.settimeout(PROCESS_TIMEOUT)
    for client in clients[len(upstreams):]:
        late = Pair(Endpoint(client), Endpoint(harness.compositor.accept()[0]))
        late.roundtrip()
        late.close()


@pytest.mark.parametrize("allow", [False, True], ids=["default", "allow-dmabuf"])
def test_dmabuf_is_hidden_unless_allowed(harness: Harness, allow: bool) -> None:
    """dma-buf cannot cross a VM boundary: clients must not see it, so they use wl_shm."""
    proxy = harness.start_proxy(*(["--allow-dmabuf"] if allow else []))
    pair = harness.connect(proxy)
    registry = pair.get_registry()
    dmabuf = global_event(registry, 1, "zwp_linux_dmabuf_v1", 3)
    shm = global_event(registry, 2, "wl_shm", 1)
    pair.compositor.send(dmabuf + shm)
    pair.client.expect(dmabuf + shm if allow else shm)
    pair.roundtrip()


def drain_until_eof(endpoint: Endpoint) -> None:
    """Read whatever the proxy still sends until it hangs up."""
    try:
        while endpoint._recv():
            pass
    except ConnectionResetError:
        pass
    for fd in endpoint.fds:
        os.close(fd)
    endpoint.fds.clear()
    endpoint.buf.clear()


def buffer_and_surface(pair: Pair) -> tuple[int, int, int]:
    """On a new connection: a 4x4 shm buffer in a pool the proxy keeps, and a surface
    (whose creation goes upstream); their ids and wl_compositor's."""
    registry = pair.get_registry()
    compositor = pair.bind(registry, 1, "wl_compositor", 4)
    shm = pair.bind(registry, 2, "wl_shm", 1)
    pool, buffer, surface = pair.new_id(), pair.new_id(), pair.new_id()
    fd = memfd_with(b"\x01" * 64)
    pair.client.send(*encode_message(shm, request_spec("wl_shm", "create_pool"),
                                     [pool, fd, 64]))
    os.close(fd)
    pair.client.send(req(pool, "wl_shm_pool", "create_buffer", buffer, 0, 4, 4, 16, 1)
                     + req(compositor, "wl_compositor", "create_surface", surface))
    return compositor, buffer, surface


def test_a_client_hanging_up_while_its_commit_waits_is_noticed(harness: Harness,
                                                             proxy: Proxy) -> None:
    """Past the per-surface cap a commit waits for the compositor's release; the
    client leaving meanwhile still ends the session (and its grants) at once."""
    pair = harness.connect(proxy)
    _, buffer, surface = buffer_and_surface(pair)
    frame = (req(surface, "wl_surface", "attach", buffer, 0, 0)
             + req(surface, "wl_surface", "commit"))
    for _ in range(4):  # the fourth waits: the fake compositor releases nothing
        pair.client.send(frame)
    callback = pair.new_id()
    pair.client.send(req(1, "wl_display", "sync", callback))
    # Three early releases reach the client; the sync behind the waiting commit does not
    # reach the compositor (it would answer it).
    for _ in range(3):
        object_id, opcode, _ = pair.client.recv_message()
        if (object_id, opcode) == (1, 1):  # delete_id of the kept pool or buffer
            object_id, opcode, _ = pair.client.recv_message()
        assert (object_id, opcode) == (buffer, 0)
    pair.client.close()
    drain_until_eof(pair.compositor)
    pair.compositor.closed = True
    other = harness.connect(proxy)
    other.roundtrip()


def test_the_proxys_own_delete_ids_go_with_the_compositors_answer(harness: Harness,
                                                                   proxy: Proxy) -> None:
    """The delete_ids the proxy sends itself (for a pool and a buffer it kept) go ahead
    of the compositor's answer to the same batch; with no answer, a moment later."""
    pair = harness.connect(proxy)
    registry = pair.get_registry()
    compositor = pair.bind(registry, 1, "wl_compositor", 4)
    shm = pair.bind(registry, 2, "wl_shm", 1)
    pool, buffer, callback = (pair.new_id() for _ in range(3))
    fd = memfd_with(b"\x01" * 64)
    pair.client.send(*encode_message(shm, request_spec("wl_shm", "create_pool"),
                                     [pool, fd, 64]))
    os.close(fd)
    pair.client.send(req(pool, "wl_shm_pool", "create_buffer", buffer, 0, 4, 4, 16, 1)
                     + req(buffer, "wl_buffer", "destroy")
                     + req(pool, "wl_shm_pool", "destroy")
                     + req(1, "wl_display", "sync", callback))
    object_id, opcode, data = pair.compositor.recv_message()
    assert (object_id, opcode) == (1, 0)  # the sync: the pool and buffer stayed here
    (upstream_callback,) = struct.unpack_from("=I", data, 8)
    pair.compositor.send(evt(upstream_callback, "wl_callback", "done", 7)
                         + evt(1, "wl_display", "delete_id", upstream_callback))
    deleted = [struct.unpack_from("=I", pair.client.recv_message()[2], 8)[0]
               for _ in range(2)]
    assert deleted == [buffer, pool]
    assert pair.client.recv_message()[:2] == (callback, 0)  # wl_callback.done
    assert pair.client.recv_message()[:2] == (1, 1)  # its delete_id
    # A batch the compositor does not answer: the delete_id comes all the same.
    pool, surface = pair.new_id(), pair.new_id()
    fd = memfd_with(b"\x01" * 64)
    pair.client.send(*encode_message(shm, request_spec("wl_shm", "create_pool"),
                                     [pool, fd, 64]))
    os.close(fd)
    pair.client.send(req(pool, "wl_shm_pool", "destroy")
                     + req(compositor, "wl_compositor", "create_surface", surface))
    assert pair.compositor.recv_message()[:2] == (compositor, 0)
    object_id, opcode, data = pair.client.recv_message()
    assert (object_id, opcode) == (1, 1) and struct.unpack_from("=I", data, 8)[0] == pool


def test_an_early_release_goes_with_the_answer_to_a_sync_and_alone_without_one(
        harness: Harness, proxy: Proxy) -> None:
    """A commit and a sync in one batch: the client's buffer is released in the write
    that carries the compositor's answer, ahead of it. A commit the compositor does not
    answer: the release comes all the same."""
    pair = harness.connect(proxy)
    compositor, buffer, surface = buffer_and_surface(pair)
    callback = pair.new_id()
    assert pair.compositor.recv_message()[:2] == (compositor, 0)
    frame = (req(surface, "wl_surface", "attach", buffer, 0, 0)
             + req(surface, "wl_surface", "damage_buffer", 0, 0, 4, 4)
             + req(surface, "wl_surface", "commit"))
    pair.client.send(frame + req(1, "wl_display", "sync", callback))
    upstream_callback = None
    while upstream_callback is None:  # the proxy's pool and buffer, then the frame
        object_id, opcode, data = pair.compositor.recv_message()
        if (object_id, opcode) == (1, 0):
            (upstream_callback,) = struct.unpack_from("=I", data, 8)
    pair.compositor.send(evt(upstream_callback, "wl_callback", "done", 7)
                         + evt(1, "wl_display", "delete_id", upstream_callback))
    assert pair.client.recv_message()[:2] == (buffer, 0)  # wl_buffer.release
    assert pair.client.recv_message()[:2] == (callback, 0)  # wl_callback.done
    assert pair.client.recv_message()[:2] == (1, 1)  # its delete_id
    # No sync: the compositor answers nothing, and the release still comes.
    pair.client.send(frame)
    assert pair.client.recv_message()[:2] == (buffer, 0)


def test_a_proxy_never_replaces_another_proxys_stats_socket(harness: Harness) -> None:
    """NAME.stats is locked as a Wayland socket is: a proxy serving a socket of that
    name and a proxy serving NAME exclude each other, neither replaces the other."""
    first = harness.start_proxy(name="qs.stats")
    inode = first.path.stat().st_ino
    result = subprocess.run(harness.command("qs"), env=harness.env(), cwd=REPO,
                            capture_output=True, text=True, timeout=PROCESS_TIMEOUT,
                            check=False)
    assert result.returncode == 1, result.stderr
    assert result.stderr.count("\n") == 1 and "is in use" in result.stderr, result.stderr
    assert first.path.stat().st_ino == inode
    assert not (harness.run_dir / "qs").exists(), "the refused proxy left its socket"
    harness.connect(first).roundtrip()


def test_a_compositor_gone_after_start_is_reported_to_the_client(harness: Harness,
                                                                proxy: Proxy) -> None:
    harness.compositor.close()
    harness.upstream.unlink()
    client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    client.settimeout(IO_TIMEOUT)
    client.connect(str(proxy.path))
    endpoint = Endpoint(client)
    object_id, opcode, data = endpoint.recv_message()
    assert (object_id, opcode) == (1, 0)
    _, code, message = decode_display_error(data)
    assert code == 3 and message.startswith("qubesshm: cannot reach the compositor at ")
    endpoint.close()
    wait_until(lambda: "cannot reach" in proxy.log(), "the proxy's log line")
    assert re.search(r"^qubesshm: client#\d+: cannot reach the compositor", proxy.log(),
                     re.MULTILINE), proxy.log()
    assert not re.search(r"client#\d+: qubesshm:", proxy.log())


def test_two_proxies_relaying_to_each_other_refuse_the_loop(harness: Harness) -> None:
    """A -> B -> A would make connections without end; each proxy refuses a client
    that is the very process it relays to, and both carry on."""
    link = harness.root / "upstream-link"
    link.symlink_to(harness.upstream)  # A's compositor at start: the fake one
    a = harness.start_proxy("--upstream", str(link), name="qa")
    b = harness.start_proxy("--upstream", str(a.path), name="qb")
    link.unlink()
    link.symlink_to(b.path)  # now A relays to B, which relays to A
    # Before any refused connection could leave an fd behind; both are idle (start-up's
    # probe sessions closed) once asleep.
    wait_until(lambda: asleep(a.pid) and asleep(b.pid), "both proxies idle after start-up")
    baselines = {"A": fd_count(a.pid), "B": fd_count(b.pid)}
    for attempt in range(3):
        client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        client.settimeout(IO_TIMEOUT)
        client.connect(str(a.path))
        endpoint = Endpoint(client)
        with contextlib.suppress(BrokenPipeError):
            # The refusal may come and the proxy close before the request is sent; a
            # libwayland client whose write fails reads the error all the same.
            endpoint.send(req(1, "wl_display", "sync", 2))
        object_id, opcode, data = endpoint.recv_message()
        assert (object_id, opcode) == (1, 0), attempt
        assert "proxy loop" in decode_display_error(data)[2]
        endpoint.close()
    assert a.process.poll() is None and b.process.poll() is None
    wait_until(lambda: fd_count(a.pid) <= baselines["A"] and fd_count(b.pid) <= baselines["B"],
               lambda: f"both proxies back to the fds they held before the loop (A "
                       f"{baselines['A']}, B {baselines['B']}; A holds {fd_count(a.pid)}, "
                       f"B {fd_count(b.pid)})")


def test_the_proxys_own_events_go_ahead_in_the_same_segment() -> None:
    """Held own events (no fds) join the first segment of the answer they wait for: one
    segment, one sendmsg; an fd of that segment travels with bytes before its message,
    which is allowed. Own events with fds (none today) would stay segments of their own."""
    own: list[tuple[bytes, list[int]]] = [(b"delete_id", []), (b"release", [])]
    assert ahead(own, [(b"done", [7]), (b"later", [8])]) == [
        (b"delete_idreleasedone", [7]), (b"later", [8])]
    assert ahead(own, [(b"done", [])]) == [(b"delete_idreleasedone", [])]
    assert ahead(own, []) == own
    assert ahead([(b"odd", [3])], [(b"done", [])]) == [(b"odd", [3]), (b"done", [])]
