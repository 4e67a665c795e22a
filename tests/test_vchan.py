"""The vchan floor: addresses, the socket vchan both ends (against itself and against
the real QubesOS/qubes-core-vchan-socket library), and the libvchan driver (on the
socket library's identical API, since Xen is absent; plus the missing-library error)."""

from __future__ import annotations

import asyncio
import faulthandler
import hashlib
import os
import socket
import stat
import sys
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any, TypeVar

import pytest

from qubesshm.vchan import (
    GUI_PORT,
    VchanAddress,
    VchanClosed,
    VchanError,
    VchanListener,
    VchanStream,
    connect_socket,
    default_gui_domid,
    default_socket_dir,
    load_libvchan,
    open_xen_server,
    own_domid_from_env,
    serve_socket,
    serve_xen,
    socket_path,
)

REAL_LIB = Path("/tmp/guid/prefix/lib/libvchan-socket.so")
needs_real_lib = pytest.mark.skipif(
    not REAL_LIB.exists(),
    reason=f"{REAL_LIB} is not built (see ../shared/tools/qubes-guid/README.md)")
DEADLINE = 60.0
T = TypeVar("T")


Runner = Callable[[Coroutine[Any, Any, T]], T]


@pytest.fixture(params=["asyncio", "uvloop"])
def run(request: pytest.FixtureRequest) -> Runner[Any]:
    """Run a coroutine on a fresh loop of each kind the agent may use (uvloop when
    installed), failing (not hanging) after a generous deadline."""
    factory: Callable[[], asyncio.AbstractEventLoop] = asyncio.new_event_loop
    if request.param == "uvloop":
        factory = pytest.importorskip("uvloop").new_event_loop

    def runner(coro: Coroutine[Any, Any, T]) -> T:
        with asyncio.Runner(loop_factory=factory) as loop_runner:
            return loop_runner.run(asyncio.wait_for(coro, DEADLINE))

    return runner


def payload(size: int, seed: bytes) -> bytes:
    return hashlib.shake_256(seed).digest(size)


async def read_exactly(stream: VchanStream, size: int) -> bytes:
    got = bytearray()
    while len(got) < size:
        chunk = await stream.read(size - len(got))
        assert chunk, f"EOF after {len(got)} of {size} bytes"
        got += chunk
    return bytes(got)


async def write_all(stream: VchanStream, data: bytes, piece: int = 100_000) -> None:
    for start in range(0, len(data), piece):
        stream.write(data[start:start + piece])
        await stream.drain()


async def exchange(a: VchanStream, b: VchanStream, size: int) -> None:
    """``size`` bytes each way at once (neither side waits for the other to finish)."""
    to_b, to_a = payload(size, b"a->b"), payload(size, b"b->a")
    got_b, got_a, _, _ = await asyncio.gather(read_exactly(b, size), read_exactly(a, size),
                                              write_all(a, to_b), write_all(b, to_a))
    assert got_b == to_b
    assert got_a == to_a


@pytest.fixture
def sockdir(tmp_path: Path) -> Path:
    directory = tmp_path / "vchan"
    directory.mkdir(mode=0o700)
    return directory


# --- addresses -------------------------------------------------------------------------

def test_socket_path_names_server_then_client() -> None:
    assert socket_path("/d", 7, 0, 6000) == Path("/d/vchan.7.0.6000.sock")
    agent = VchanAddress(domid=7, remote_domid=0)
    daemon = VchanAddress(domid=0, remote_domid=7)
    assert agent.port == GUI_PORT == 6000
    assert agent.server_socket("/d") == daemon.client_socket("/d") == Path(
        "/d/vchan.7.0.6000.sock")


def test_address_errors_are_one_clear_line() -> None:
    for make in (lambda: socket_path("/d", -1, 0, 1), lambda: VchanAddress(0, 0x7FF0),
                 lambda: socket_path("/" + "x" * 100, 1, 2, 3)):
        with pytest.raises(VchanError) as info:
            make()
        assert "\n" not in str(info.value)
    with pytest.raises(VchanError, match="longer than 107 bytes"):
        socket_path("/" + "x" * 100, 1, 2, 3)


def test_default_socket_dir_follows_env() -> None:
    assert default_socket_dir({}) == Path("/var/run/vchan")
    assert default_socket_dir({"VCHAN_SOCKET_DIR": "/x/y"}) == Path("/x/y")
    with pytest.raises(VchanError, match="empty"):
        default_socket_dir({"VCHAN_SOCKET_DIR": ""})


def test_own_domid_reads_vchan_domain_as_the_socket_vchan_does() -> None:
    assert own_domid_from_env({}) == 0
    assert own_domid_from_env({"VCHAN_DOMAIN": "12"}) == 12
    with pytest.raises(VchanError, match=r"would read it as 12\)"):
        own_domid_from_env({"VCHAN_DOMAIN": "12abc"})
    with pytest.raises(VchanError, match=r"would read it as 0\)"):
        own_domid_from_env({"VCHAN_DOMAIN": "gui"})
    with pytest.raises(VchanError, match="not a domain id"):
        own_domid_from_env({"VCHAN_DOMAIN": "40000"})


def test_default_gui_domid(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # no qubesdb-read: not a Qubes VM
    assert default_gui_domid() == 0
    fake = tmp_path / "qubesdb-read"
    fake.write_text('#!/bin/sh\n[ "$1" = /qubes-gui-domain-xid ] && echo 3\n')
    fake.chmod(0o755)
    assert default_gui_domid() == 3
    fake.write_text("#!/bin/sh\necho 'Failed to read' >&2\nexit 1\n")
    with pytest.raises(VchanError, match=r"cannot read /qubes-gui-domain-xid .*--gui-domid"):
        default_gui_domid(str(fake))


# --- socket vchan, both ends ours ------------------------------------------------------

def test_bytes_both_ways_large_writes_and_eof_both_directions(sockdir: Path,
                                                              run: Runner[Any]) -> None:
    path = VchanAddress(5, 0).server_socket(sockdir)

    async def main() -> None:
        listener: VchanListener = await serve_socket(path)
        client: VchanStream = await connect_socket(path, timeout=DEADLINE)
        server = await listener.accept()
        await exchange(server, client, 8 << 20)
        client.close()  # client -> server EOF
        assert await server.read() == b""
        for _ in range(1000):  # the peer is gone: drain says so, sooner or later
            try:
                server.write(b"x" * 65536)
                await server.drain()
            except VchanClosed:
                break
        else:
            pytest.fail("drain never reported the closed peer")
        server.close()
        with pytest.raises(VchanClosed):
            server.write(b"late")

        client = await connect_socket(path, timeout=DEADLINE)
        server = await listener.accept()
        server.write(b"last words")
        await server.drain()
        server.close()  # server -> client EOF, after the data
        assert await read_exactly(client, 10) == b"last words"
        assert await client.read() == b""
        client.close()
        listener.close()

    run(main())
    assert not path.exists(), "close leaves no socket file"


def test_second_connection_waits_for_the_first_to_close(sockdir: Path, run: Runner[Any]) -> None:
    path = sockdir / "vchan.1.0.6000.sock"

    async def main() -> None:
        async with await serve_socket(path) as listener:
            first_client = await connect_socket(path, timeout=DEADLINE)
            first = await listener.accept()
            second_client = await connect_socket(path, timeout=DEADLINE)
            second_client.write(b"second")
            await second_client.drain()
            pending = asyncio.ensure_future(listener.accept())
            await exchange(first, first_client, 1 << 20)  # the loop runs on meanwhile
            assert not pending.done(), "accept handed out a second daemon while one is on"
            first.close()
            second = await pending
            assert await read_exactly(second, 6) == b"second"
            assert await first_client.read() == b""
            second.close()
            first_client.close()
            second_client.close()

    run(main())


def test_socket_mode_and_close_only_removes_our_own_file(sockdir: Path, run: Runner[Any]) -> None:
    path = sockdir / "vchan.2.0.6000.sock"

    async def main() -> None:
        listener = await serve_socket(path)
        assert stat.S_IMODE(os.lstat(path).st_mode) == 0o600
        listener.close()
        assert not path.exists()
        listener = await serve_socket(path, mode=0o660)
        assert stat.S_IMODE(os.lstat(path).st_mode) == 0o660
        os.unlink(path)
        path.write_text("someone else's")  # replaced behind our back: not ours to remove
        listener.close()
        assert path.read_text() == "someone else's"

    run(main())


def test_stale_socket_replaced_live_one_refused(sockdir: Path, run: Runner[Any]) -> None:
    path = sockdir / "vchan.3.0.6000.sock"
    leftover = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    leftover.bind(str(path))  # bound, never listening, as a dead server leaves it
    leftover.close()
    assert stat.S_ISSOCK(os.lstat(path).st_mode)

    async def main() -> None:
        listener = await serve_socket(path)
        with pytest.raises(VchanError, match="another vchan server is listening"):
            await serve_socket(path)
        client = await connect_socket(path, timeout=DEADLINE)
        server = await listener.accept()
        await exchange(server, client, 1000)
        client.close()
        server.close()
        listener.close()

    run(main())


def test_non_socket_at_path_refused(sockdir: Path, run: Runner[Any]) -> None:
    path = sockdir / "vchan.4.0.6000.sock"
    path.write_text("precious")
    with pytest.raises(VchanError) as info:
        run(serve_socket(path))
    assert str(info.value) == (f"{path} is a file, not a socket: qubesshm replaces only a "
                               "stale vchan socket; move it away or choose another "
                               "VCHAN_SOCKET_DIR")
    assert path.read_text() == "precious"
    path.unlink()
    path.symlink_to(sockdir / "elsewhere")
    with pytest.raises(VchanError, match="is a symlink, not a socket"):
        run(serve_socket(path))


def test_unsafe_directories_refused(tmp_path: Path, run: Runner[Any]) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    with pytest.raises(VchanError, match=r"has mode 0777: others may replace the socket"):
        run(serve_socket(shared / "vchan.1.0.6000.sock"))
    assert not any(shared.iterdir())
    real = tmp_path / "real"
    real.mkdir(mode=0o700)
    link = tmp_path / "link"
    link.symlink_to(real)
    with pytest.raises(VchanError, match="is not a directory"):
        run(serve_socket(link / "vchan.1.0.6000.sock"))
    with pytest.raises(VchanError, match="cannot create the vchan socket directory"):
        run(serve_socket(tmp_path / "no" / "such" / "vchan.1.0.6000.sock"))
    if os.geteuid() == 0:
        foreign = tmp_path / "foreign"
        foreign.mkdir(mode=0o755)
        os.chown(foreign, 65534, 65534)
        with pytest.raises(VchanError, match="belongs to uid 65534, neither you nor root"):
            run(serve_socket(foreign / "vchan.1.0.6000.sock"))


def test_missing_directory_is_created_private(tmp_path: Path, run: Runner[Any]) -> None:
    path = tmp_path / "fresh" / "vchan.1.0.6000.sock"

    async def main() -> None:
        (await serve_socket(path)).close()

    run(main())
    assert stat.S_IMODE(os.lstat(path.parent).st_mode) == 0o700


def test_client_retries_until_the_server_appears_or_the_deadline(sockdir: Path,
                                                                 run: Runner[Any]) -> None:
    path = sockdir / "vchan.6.0.6000.sock"

    async def main() -> None:
        with pytest.raises(VchanError, match=r"no vchan server answered .* within 0\.2 s"):
            await connect_socket(path, timeout=0.2)
        with pytest.raises(VchanError, match="no vchan server answered"):
            await connect_socket(path, retry=False)
        connecting = asyncio.ensure_future(connect_socket(path, timeout=DEADLINE))
        await asyncio.sleep(0)  # it has tried at least once: nothing there yet
        assert not connecting.done()
        listener = await serve_socket(path)
        client = await connecting
        server = await listener.accept()
        await exchange(server, client, 4096)
        client.close()
        server.close()
        listener.close()

    run(main())


# --- socket vchan against the real library ------------------------------------------------

REAL_PEER = r'''
import hashlib, sys
import cffi
ffi = cffi.FFI()
ffi.cdef("""
typedef struct libvchan libvchan_t;
libvchan_t *libvchan_server_init(int domain, int port, size_t read_min, size_t write_min);
libvchan_t *libvchan_client_init(int domain, int port);
int libvchan_write(libvchan_t *ctrl, const char *data, size_t size);
int libvchan_read(libvchan_t *ctrl, char *data, size_t size);
int libvchan_wait(libvchan_t *ctrl);
int libvchan_is_open(libvchan_t *ctrl);
void libvchan_close(libvchan_t *ctrl);
""")
path, role, peer, port, send_len, recv_len, ending = sys.argv[1:]
lib = ffi.dlopen(path)
if role == "client":
    ctrl = lib.libvchan_client_init(int(peer), int(port))
    assert ctrl != ffi.NULL, "client_init failed"
else:
    ctrl = lib.libvchan_server_init(int(peer), int(port), 4096, 4096)
    assert ctrl != ffi.NULL, "server_init failed"
    print("listening", flush=True)
    while lib.libvchan_is_open(ctrl) == 2:
        lib.libvchan_wait(ctrl)
out = hashlib.shake_256(b"real->ours").digest(int(send_len))
pos = 0
while pos < len(out):
    n = lib.libvchan_write(ctrl, out[pos:pos + 65536], min(65536, len(out) - pos))
    assert n > 0, f"write failed after {pos} bytes"
    pos += n
buf = ffi.new("char[]", 65536)
got = bytearray()
while len(got) < int(recv_len):
    n = lib.libvchan_read(ctrl, buf, min(65536, int(recv_len) - len(got)))
    assert n > 0, f"EOF after {len(got)} bytes"
    got += ffi.buffer(buf, n)
print("received", hashlib.sha256(got).hexdigest(), flush=True)
if ending == "wait-eof":
    n = lib.libvchan_read(ctrl, buf, 1)
    print("eof" if n < 0 and lib.libvchan_is_open(ctrl) == 0 else f"not eof: {n}", flush=True)
lib.libvchan_close(ctrl)
print("closed", flush=True)
'''
TO_REAL, FROM_REAL = 3 << 20, 2 << 20


async def real_peer(sockdir: Path, own_domid: int, role: str, peer: int, ending: str
                    ) -> asyncio.subprocess.Process:
    env = dict(os.environ, VCHAN_SOCKET_DIR=str(sockdir), VCHAN_DOMAIN=str(own_domid))
    return await asyncio.create_subprocess_exec(
        sys.executable, "-c", REAL_PEER, str(REAL_LIB), role, str(peer), str(GUI_PORT),
        str(FROM_REAL), str(TO_REAL), ending, env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)


async def talk_to_real_peer(stream: VchanStream, proc: asyncio.subprocess.Process,
                            ending: str) -> None:
    """Bytes both ways at once; then whichever side ``ending`` says closes first."""
    ours = hashlib.shake_256(b"ours->real").digest(TO_REAL)
    got, _ = await asyncio.gather(read_exactly(stream, FROM_REAL), write_all(stream, ours))
    assert got == hashlib.shake_256(b"real->ours").digest(FROM_REAL)
    assert proc.stdout is not None and proc.stderr is not None
    line = (await proc.stdout.readline()).decode().split()
    assert line == ["received", hashlib.sha256(ours).hexdigest()], line
    if ending == "close":  # the real peer closes: we read EOF
        assert await stream.read() == b""
        stream.close()
    else:  # we close: the real peer sees EOF
        stream.close()
        assert (await proc.stdout.readline()).decode().strip() == "eof"
    assert (await proc.stdout.readline()).decode().strip() == "closed"
    assert await proc.wait() == 0, (await proc.stderr.read()).decode()


@needs_real_lib
def test_real_client_against_our_server_twice(sockdir: Path, run: Runner[Any]) -> None:
    """The real library as the vchan client (as qubes-guid is), our server; a second
    client after the first one left, as a restarted daemon."""
    agent = VchanAddress(domid=7, remote_domid=3)

    async def main() -> None:
        async with await serve_socket(agent.server_socket(sockdir)) as listener:
            for ending in ("close", "wait-eof"):
                proc = await real_peer(sockdir, 3, "client", 7, ending)
                await talk_to_real_peer(await listener.accept(), proc, ending)

    run(main())


@needs_real_lib
@pytest.mark.parametrize("ending", ["close", "wait-eof"])
def test_our_client_against_real_server(sockdir: Path, ending: str, run: Runner[Any]) -> None:
    daemon = VchanAddress(domid=3, remote_domid=7)

    async def main() -> None:
        proc = await real_peer(sockdir, 7, "server", 3, ending)
        assert proc.stdout is not None
        assert (await proc.stdout.readline()).decode().strip() == "listening"
        stream = await connect_socket(daemon.client_socket(sockdir), timeout=DEADLINE)
        await talk_to_real_peer(stream, proc, ending)

    run(main())


# --- the libvchan driver (xenvchan) ------------------------------------------------------

def test_missing_libvchan_xen_is_one_clear_line(run: Runner[Any]) -> None:
    try:
        load_libvchan()
    except VchanError as exc:
        message = str(exc)
    else:
        pytest.skip("libvchan-xen is installed here")
    assert "\n" not in message
    assert message.startswith("cannot load libvchan-xen.so.1 or libvchan-xen.so: ")
    assert "libvchan-xen1 (Debian) or qubes-libvchan-xen (Fedora)" in message
    with pytest.raises(VchanError, match="cannot load libvchan-xen"):
        run(open_xen_server(0))


@needs_real_lib
def test_libvchan_driver_on_the_socket_library(sockdir: Path, monkeypatch: pytest.MonkeyPatch,
                                               run: Runner[Any]) -> None:
    """``serve_xen`` drives any libvchan from asyncio; the socket library shares the API
    (server_init, fd_for_select, wait, data_ready, buffer_space, is_open, read, write),
    so our socket client can be its peer: bytes both ways, EOF both ways, a reconnect."""
    monkeypatch.setenv("VCHAN_SOCKET_DIR", str(sockdir))
    monkeypatch.setenv("VCHAN_DOMAIN", "9")
    lib = load_libvchan([str(REAL_LIB)])
    path = VchanAddress(domid=9, remote_domid=0).server_socket(sockdir)

    async def connect_later() -> VchanStream:
        return await connect_socket(path, timeout=DEADLINE)

    async def pair(listener: VchanListener) -> tuple[VchanStream, VchanStream]:
        server, client = await asyncio.gather(listener.accept(), connect_later())
        return server, client

    async def main() -> None:
        listener = serve_xen(0, GUI_PORT, lib=lib)
        server, client = await pair(listener)
        await exchange(server, client, 2 << 20)
        client.close()
        assert await server.read() == b""
        with pytest.raises(VchanClosed):
            server.write(b"x")
            await server.drain()
        server.close()

        server, client = await pair(listener)
        await exchange(server, client, 100_000)
        server.write(b"bye")
        await server.drain()
        server.close()
        assert await read_exactly(client, 3) == b"bye"
        assert await client.read() == b""
        client.close()
        listener.close()

    # A libvchan call that blocks stops the loop, and with it the deadline: end the
    # whole run with every thread's traceback rather than hang.
    faulthandler.dump_traceback_later(DEADLINE, exit=True)
    try:
        run(main())
    finally:
        faulthandler.cancel_dump_traceback_later()
