"""The simulated hypervisor serving a foreign domain in another process (``hypercalls``).

The hypervisor and the sharing domain (the VM, 1) live in the test process, its
clock injected; the mapping domain (the GUI domain, 0) is a separate Python
process that finds the kernel, maps through its socket, mmaps what it got and
answers one line per command. The test drives the server from its own loop
while it waits for those lines, as the agent's asyncio loop would.
"""

from __future__ import annotations

import asyncio
import errno
import os
import select
import shutil
import signal
import socket
import struct
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from kernels import Clock, DomainProcess, serve_until

from qubesshm.grants.api import PAGE_SIZE, Unshared
from qubesshm.grants.hypercalls import (
    MAX_FRAME,
    NOTIFY_CLEAR_BYTE,
    NOTIFY_SEND_EVENT,
    ForeignKernelError,
    HypercallServer,
    HypercallSession,
    Op,
    connect_foreign,
    encode_request,
    find_kernel,
    serve_hypercalls,
)
from qubesshm.grants.simkernels import HYPERCALL_SOCKET, KernelDir, running_kernels
from qubesshm.grants.simulated import SimBackend, SimHypervisor, _Port

REPO = Path(__file__).resolve().parent.parent
VM, GUI = 1, 0
DEADLINE = 30.0

# The foreign domain: one command a line on stdin, one answer a line on stdout.
FOREIGN = r"""
import errno, mmap, os, subprocess, sys
from pathlib import Path
from qubesshm.grants.hypercalls import ForeignKernelError, connect_foreign

HOLDER = "import mmap, sys; m = mmap.mmap(int(sys.argv[1]), int(sys.argv[2]), " \
    "prot=mmap.PROT_READ); print('held', flush=True); sys.stdin.read()"

def say(*words):
    print(*words, flush=True)

domid, granter, base = int(sys.argv[1]), int(sys.argv[2]), Path(sys.argv[3])
try:
    foreign = connect_foreign(domid, granter_domid=granter, base=base)
except ForeignKernelError as exc:
    say("refused", exc)
    sys.exit(0)
say("ready")
mappings, views, holders = {}, {}, {}
for line in sys.stdin:
    command, *args = line.split()
    try:
        if command == "map":
            mapping = foreign.map(granter, [int(a) for a in args[1:]],
                                  writable=args[0] == "rw")
            mappings[mapping.id] = mapping
            prot = mmap.PROT_READ | (mmap.PROT_WRITE if args[0] == "rw" else 0)
            views[mapping.id] = mmap.mmap(mapping.fd, mapping.size, prot=prot)
            say("mapped", mapping.id, mapping.size)
        elif command == "read":
            say("bytes", views[int(args[0])][:int(args[1])].hex())
        elif command == "poke":
            views[int(args[0])][:len(args[1])] = args[1].encode()
            say("ok")
        elif command == "try-write":
            fd = mappings[int(args[0])].fd
            outcomes = []
            try:
                mmap.mmap(fd, PAGE, prot=mmap.PROT_READ | mmap.PROT_WRITE)
                outcomes.append("mmap-writable")
            except OSError as exc:
                outcomes.append(errno.errorcode[exc.errno])
            try:
                os.pwrite(fd, b"x", 0)
                outcomes.append("written")
            except OSError as exc:
                outcomes.append(errno.errorcode[exc.errno])
            say("write", *outcomes)
        elif command == "munmap":
            views.pop(int(args[0])).close()
            say("ok")
        elif command == "unmap":
            foreign.unmap(mappings.pop(int(args[0])))
            say("ok")
        elif command == "hold":
            mapping = mappings[int(args[0])]
            holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(mapping.fd),
                                       str(mapping.size)], pass_fds=[mapping.fd],
                                      stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
            holder.stdout.readline()
            holders[holder.pid] = holder
            say("holder", holder.pid)
        elif command == "watch":
            foreign.watch(int(args[0]))
            say("ok")
        elif command == "let-go":
            holder = holders.pop(int(args[0]))
            holder.stdin.close()
            holder.wait()
            say("ok")
        elif command == "close":
            foreign.close()
            say("ok")
        else:
            say("unknown", command)
    except OSError as exc:
        say("oserror", errno.errorcode.get(exc.errno, exc.errno), exc.strerror)
"""



@dataclass
class World:
    base: Path
    kernel: KernelDir
    hv: SimHypervisor
    vm: SimBackend
    server: HypercallServer
    clock: Clock

    def pump_until(self, done: Callable[[], bool], what: str,
                   extra: tuple[int, ...] = ()) -> None:
        """Serve hypercalls until ``done()``; ``extra`` fds also wake the wait."""
        serve_until(self.server, done, what, extra)


@pytest.fixture
def world() -> Iterator[World]:
    # A short base: the socket path must fit a sockaddr_un.
    top = Path(tempfile.mkdtemp(prefix="hc", dir="/tmp"))
    base = top / "sim"
    kernel = KernelDir.create(base)
    clock = Clock()
    hv = SimHypervisor(kernel.root, clock=clock)
    vm = SimBackend(hv, VM)
    server = serve_hypercalls(kernel, hv)
    yield World(base, kernel, hv, vm, server, clock)
    server.close()
    vm.close()
    kernel.close()
    shutil.rmtree(top, ignore_errors=True)


class Foreign(DomainProcess):
    """A foreign domain's process, spoken to a line at a time while the server runs."""

    def __init__(self, world: World, domid: int = GUI, granter: int = VM) -> None:
        self.world = world
        super().__init__(world.server, [sys.executable, "-c", f"PAGE = {PAGE_SIZE}\n" + FOREIGN,
                                        str(domid), str(granter), str(world.base)],
                         "the foreign domain", cwd=REPO)

    def map(self, refs: tuple[int, ...], mode: str = "ro") -> int:
        answer = self.ask("map", mode, *refs).split()
        assert answer[0] == "mapped", answer
        assert int(answer[2]) == len(refs) * PAGE_SIZE
        return int(answer[1])

    def read(self, mapping: int, count: int) -> bytes:
        answer = self.ask("read", mapping, count).split()
        assert answer[0] == "bytes", answer
        return bytes.fromhex(answer[1])

    def end(self) -> None:
        if self.proc.poll() is None:
            assert self.proc.stdin is not None
            self.proc.stdin.close()
        self.proc.wait(timeout=DEADLINE)
        for pipe in (self.proc.stdout, self.proc.stderr):
            if pipe is not None:
                pipe.close()


@pytest.fixture
def foreign(world: World) -> Iterator[Foreign]:
    domain = Foreign(world)
    assert domain.greeting == "ready"
    yield domain
    domain.end()


def holds(world: World) -> int:
    return sum(entry.holds for entry in world.hv._entries.values())


# -- mapping across processes ------------------------------------------------------------------


def test_the_foreign_domain_sees_the_shared_pages_read_only(world: World,
                                                            foreign: Foreign) -> None:
    area = world.vm.share(GUI, 2)
    area.memory[:8] = b"granted!"
    area.memory[PAGE_SIZE:PAGE_SIZE + 8] = b"page two"
    mapping = foreign.map(area.refs)
    assert foreign.read(mapping, 8) == b"granted!"
    # The same pages, not a copy: what the sharer writes next is seen there.
    area.memory[:8] = b"changed!"
    assert foreign.read(mapping, 8) == b"changed!"
    assert holds(world) == 2
    # Neither a writable mmap nor a write through the fd reaches the pages.
    assert foreign.ask("try-write", mapping) == "write EACCES EBADF"
    assert area.memory[:8] == b"changed!"
    assert foreign.ask("munmap", mapping) == "ok"
    assert foreign.ask("unmap", mapping) == "ok"
    assert holds(world) == 0
    assert world.vm.unshare(area) is Unshared.ENDED
    assert world.hv.counters.live_refs == 0 and world.hv.counters.open_memfds == 0


def test_a_writable_grant_mapped_writable_is_written_through(world: World,
                                                             foreign: Foreign) -> None:
    area = world.vm.share(GUI, 1)
    mapping = foreign.map(area.refs, "rw")
    assert foreign.ask("poke", mapping, "hello") == "ok"
    assert area.memory[:5] == b"hello"
    assert foreign.ask("munmap", mapping) == "ok"
    assert foreign.ask("unmap", mapping) == "ok"
    assert world.vm.unshare(area) is Unshared.ENDED


def test_ending_a_mapped_grant_defers_and_drains_per_free_per_iteration(
        world: World, foreign: Foreign) -> None:
    world.hv.params.free_per_iteration = 2
    area = world.vm.share(GUI, 5)
    mapping = foreign.map(area.refs)
    assert world.vm.unshare(area) is Unshared.DEFERRED
    assert world.hv.counters.deferred_count == 5
    world.clock.now += 1.0
    assert world.hv.advance() == 1
    assert world.hv.counters.deferred_count == 5  # still mapped: retried and re-queued

    assert foreign.ask("munmap", mapping) == "ok"
    assert foreign.ask("unmap", mapping) == "ok"
    for _ in range(3):
        world.clock.now += 1.0
        assert world.hv.advance() == 1
    assert world.hv.counters.history == [0, 2, 2, 1]
    assert world.hv.counters.deferred_count == 0 and world.hv.timer_due is None
    assert world.hv.counters.live_refs == 0 and world.hv.counters.open_memfds == 0


def test_the_foreign_process_own_mmap_holds_the_grant_after_unmap(world: World,
                                                                  foreign: Foreign) -> None:
    """As with gntdev: the unmap call lets go, the pages stay mapped while mmapped."""
    area = world.vm.share(GUI, 1)
    mapping = foreign.map(area.refs)
    assert foreign.ask("unmap", mapping) == "ok"
    assert holds(world) == 0
    assert world.vm.unshare(area) is Unshared.DEFERRED
    assert foreign.ask("munmap", mapping) == "ok"
    world.clock.now += 1.0
    world.hv.advance()
    assert world.hv.counters.deferred_count == 0 and world.hv.counters.live_refs == 0


def test_closing_the_connection_unmaps_everything_it_mapped(world: World,
                                                            foreign: Foreign) -> None:
    first, second = world.vm.share(GUI, 1), world.vm.share(GUI, 3)
    one, two = foreign.map(first.refs), foreign.map(second.refs)
    assert holds(world) == 4
    for mapping in (one, two):
        assert foreign.ask("munmap", mapping) == "ok"
    assert foreign.ask("close") == "ok"
    world.pump_until(lambda: world.server.connections == 0, "the connection to close")
    assert holds(world) == 0 and world.hv.watched == frozenset()
    assert world.vm.unshare(first) is Unshared.ENDED
    assert world.vm.unshare(second) is Unshared.ENDED


def test_pages_still_mmapped_after_the_connection_closed_stay_mapped(
        world: World, foreign: Foreign) -> None:
    area = world.vm.share(GUI, 2)
    mapping = foreign.map(area.refs)
    assert foreign.ask("close") == "ok"
    world.pump_until(lambda: world.server.connections == 0, "the connection to close")
    assert holds(world) == 0
    assert world.vm.unshare(area) is Unshared.DEFERRED
    assert foreign.ask("munmap", mapping) == "ok"
    world.hv.refresh()  # the owner's timer looks again: that process maps no grant now
    assert world.hv.watched == frozenset()
    world.clock.now += 1.0
    world.hv.advance()
    assert world.hv.counters.deferred_count == 0 and world.hv.counters.live_refs == 0


def test_killing_the_foreign_process_unmaps(world: World, foreign: Foreign) -> None:
    area = world.vm.share(GUI, 2)
    foreign.map(area.refs)
    assert holds(world) == 2
    foreign.proc.send_signal(signal.SIGKILL)
    foreign.proc.wait(timeout=DEADLINE)
    world.pump_until(lambda: world.server.connections == 0, "the dead domain's connection")
    assert holds(world) == 0 and world.hv.watched == frozenset()
    assert world.vm.unshare(area) is Unshared.ENDED


def test_a_watched_process_holds_the_grant_until_it_lets_go(world: World,
                                                            foreign: Foreign) -> None:
    """An X server given the fd (MIT-SHM) maps the pages: asked, the hypervisor counts it."""
    area = world.vm.share(GUI, 1)
    mapping = foreign.map(area.refs)
    answer = foreign.ask("hold", mapping).split()
    assert answer[0] == "holder", answer
    holder = int(answer[1])
    assert foreign.ask("watch", holder) == "ok"
    assert holder in world.hv.watched
    assert foreign.ask("munmap", mapping) == "ok"
    assert foreign.ask("unmap", mapping) == "ok"
    assert world.vm.unshare(area) is Unshared.DEFERRED
    world.clock.now += 1.0
    world.hv.advance()
    assert world.hv.counters.deferred_count == 1
    assert foreign.ask("let-go", holder) == "ok"
    world.clock.now += 1.0
    world.hv.advance()
    assert world.hv.counters.deferred_count == 0 and world.hv.counters.live_refs == 0


def test_watching_a_process_that_does_not_exist_is_refused(world: World,
                                                          foreign: Foreign) -> None:
    assert foreign.ask("watch", 0).startswith("oserror ESRCH")
    assert foreign.ask("watch", 2**31 - 1).startswith("oserror ESRCH")


# -- refusals ----------------------------------------------------------------------------------


def test_a_domain_that_is_not_the_grantee_is_refused(world: World) -> None:
    area = world.vm.share(GUI, 1)
    other = Foreign(world, domid=2)
    try:
        assert other.greeting == "ready"
        answer = other.ask("map", "ro", *area.refs)
        assert answer.startswith("oserror EPERM"), answer
        assert "is for domain 0, not 2" in answer
        assert holds(world) == 0
    finally:
        other.end()
    assert world.vm.unshare(area) is Unshared.ENDED


def test_refs_the_granter_never_gave_are_refused(world: World, foreign: Foreign) -> None:
    area = world.vm.share(GUI, 1)
    assert foreign.ask("map", "ro", 4000).startswith("oserror EINVAL")
    assert foreign.ask("map", "ro", *area.refs, 4000).startswith("oserror EINVAL")
    read_only = world.vm.share(GUI, 1, writable=False)
    assert foreign.ask("map", "rw", *read_only.refs).startswith("oserror EPERM")
    assert holds(world) == 0
    world.vm.unshare(area)
    world.vm.unshare(read_only)


def test_no_kernel_hosting_the_domain_is_one_clear_line(world: World) -> None:
    other = Foreign(world, granter=7)
    other.end()
    assert other.greeting.startswith("refused no running simulated kernel under")
    assert "hosts domain 7" in other.greeting


def test_finding_the_kernel_by_the_domains_it_hosts(world: World) -> None:
    [listed] = [k for k in running_kernels(world.base) if k.root == world.kernel.root]
    assert listed.domains == (VM,) and listed.hypercalls == world.server.path
    assert find_kernel(VM, world.base).root == world.kernel.root
    # A kernel that notes the domain but serves no hypercalls is not a candidate.
    quiet = KernelDir.create(world.base)
    try:
        quiet.note_domains([VM, 3])
        assert find_kernel(VM, world.base).root == world.kernel.root
        with pytest.raises(ForeignKernelError, match="hosts domain 3"):
            find_kernel(3, world.base)
        # Two serving kernels with the same domain: which one is meant cannot be told.
        hv = SimHypervisor(quiet.root)
        second = serve_hypercalls(quiet, hv, [VM])
        try:
            with pytest.raises(ForeignKernelError, match=r"^2 running simulated kernels .* "
                               r"host domain 1 \(processes \d+, \d+\): give each agent"):
                connect_foreign(GUI, granter_domid=VM, base=world.base)
        finally:
            second.close()
        assert [k.hypercalls for k in running_kernels(world.base)
                if k.root == quiet.root] == [None]
    finally:
        quiet.close()


def test_the_socket_is_the_users_alone(world: World) -> None:
    st_mode = os.lstat(world.server.path).st_mode
    assert world.server.path.name == HYPERCALL_SOCKET
    assert st_mode & 0o777 == 0o600


# -- malformed requests ------------------------------------------------------------------------


class Raw:
    """A client in this process speaking bytes, for requests no ForeignMapper sends."""

    def __init__(self, world: World) -> None:
        self.world = world
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(str(world.server.path))
        self.sock.setblocking(False)
        self.buffer = b""
        self.closed = False

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def reply(self) -> tuple[int, bytes] | None:
        """The next reply's errno and rest; None if the server closed the connection."""

        def have() -> bool:
            try:
                data = self.sock.recv(65536)
            except BlockingIOError:
                data = None
            if data == b"":
                self.closed = True
            elif data:
                self.buffer += data
            return self.closed or _whole(self.buffer)

        self.world.pump_until(have, "a reply", (self.sock.fileno(),))
        if not _whole(self.buffer):
            return None
        (length,) = struct.unpack_from("<I", self.buffer)
        payload, self.buffer = self.buffer[4:4 + length], self.buffer[4 + length:]
        (status,) = struct.unpack_from("<I", payload)
        return status, payload[4:]

    def call(self, op: int, body: bytes = b"") -> tuple[int, bytes] | None:
        self.send(struct.pack("<II", 4 + len(body), op) + body)
        return self.reply()

    def close(self) -> None:
        self.sock.close()


def _whole(buffer: bytes) -> bool:
    return len(buffer) >= 4 and len(buffer) >= 4 + struct.unpack_from("<I", buffer)[0]


def status_of(reply: tuple[int, bytes] | None) -> int:
    assert reply is not None, "the server dropped the connection"
    return reply[0]


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_malformed_requests_get_an_error_and_hurt_nothing(world: World) -> None:
    area = world.vm.share(GUI, 2)
    fds = open_fds()
    raw = Raw(world)
    try:
        assert status_of(raw.call(Op.MAP, struct.pack("<IB", VM, 0) + bytes(4))) == errno.EPROTO
        assert status_of(raw.call(Op.HELLO, b"\0")) == errno.EINVAL
        assert status_of(raw.call(Op.HELLO, struct.pack("<I", 0x7FF0))) == errno.EINVAL
        assert status_of(raw.call(Op.HELLO, struct.pack("<I", GUI))) == 0
        assert status_of(raw.call(Op.HELLO, struct.pack("<I", GUI))) == errno.EPROTO
        assert status_of(raw.call(99)) == errno.ENOSYS
        raw.send(struct.pack("<I", 0))  # a frame with no operation at all
        assert status_of(raw.reply()) == errno.EINVAL
        assert status_of(raw.call(Op.MAP, b"\1\0\0")) == errno.EINVAL
        assert status_of(raw.call(Op.MAP, struct.pack("<IB", VM, 0))) == errno.EINVAL
        assert status_of(raw.call(Op.MAP, struct.pack("<IB", VM, 7)
                                  + struct.pack("<I", area.refs[0]))) == errno.EINVAL
        assert status_of(raw.call(Op.UNMAP, struct.pack("<Q", 12345))) == errno.EINVAL
        assert status_of(raw.call(Op.UNMAP, b"\0")) == errno.EINVAL
        assert status_of(raw.call(Op.WATCH, b"")) == errno.EINVAL
        assert status_of(raw.call(Op.WATCH, struct.pack("<I", os.getpid()))) == errno.EINVAL
        # A well-formed map on the same connection still works (the fd comes and goes).
        reply = raw.call(Op.MAP, struct.pack("<IB", VM, 0) + struct.pack("<2I", *area.refs))
        assert status_of(reply) == 0
        assert holds(world) == 2
        # A frame longer than any request: the connection is dropped, its mappings go.
        raw.send(struct.pack("<I", MAX_FRAME + 1))
        assert raw.reply() is None
        assert world.server.connections == 0 and holds(world) == 0
    finally:
        raw.close()
    assert open_fds() == fds  # the server kept no fd of the mapping it sent
    assert world.vm.unshare(area) is Unshared.ENDED


def test_a_client_that_never_reads_its_replies_is_dropped(world: World) -> None:
    raw = Raw(world)
    try:
        assert status_of(raw.call(Op.HELLO, struct.pack("<I", GUI))) == 0
        request = encode_request(Op.UNMAP, struct.pack("<Q", 1)) * 4096
        deadline = time.monotonic() + DEADLINE
        while world.server.connections:
            assert time.monotonic() < deadline, "the server kept a client that never reads"
            try:
                raw.sock.send(request)
            except BlockingIOError:
                pass
            except (BrokenPipeError, ConnectionResetError):
                break
            world.server.on_readable()
        world.pump_until(lambda: world.server.connections == 0, "the drop")
    finally:
        raw.close()


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.binary(max_size=40), max_size=6), st.booleans())
def test_random_frames_never_hurt_the_hypervisor(world: World, frames: list[bytes],
                                                 hello: bool) -> None:
    area = world.vm.share(GUI, 1)
    raw = Raw(world)
    try:
        if hello:
            assert status_of(raw.call(Op.HELLO, struct.pack("<I", 5))) == 0
        for data in frames:
            raw.send(struct.pack("<I", len(data)) + data)
            if raw.reply() is None:
                break
    finally:
        raw.close()
    world.pump_until(lambda: world.server.connections == 0, "the connection to close")
    assert holds(world) == 0
    assert world.vm.unshare(area) is Unshared.ENDED
    assert world.hv.counters.live_refs == 0


def test_the_server_still_serves_a_real_domain_after_garbage(world: World) -> None:
    raw = Raw(world)
    raw.send(b"\xff" * 64)
    assert raw.reply() is None
    raw.close()
    area = world.vm.share(GUI, 1)
    area.memory[:4] = b"ok!!"
    domain = Foreign(world)
    try:
        assert domain.greeting == "ready"
        assert domain.read(domain.map(area.refs), 4) == b"ok!!"
    finally:
        domain.end()
    world.pump_until(lambda: world.server.connections == 0, "the connection to close")
    assert world.vm.unshare(area) is Unshared.ENDED


def test_closing_the_server_unmaps_and_removes_its_socket(world: World,
                                                          foreign: Foreign) -> None:
    area = world.vm.share(GUI, 1)
    foreign.map(area.refs)
    path = world.server.path
    world.server.close()
    assert not path.exists() and holds(world) == 0
    world.server.close()  # twice is harmless


def test_an_asyncio_loop_drives_the_server(world: World) -> None:
    area = world.vm.share(GUI, 1)

    async def exchange() -> tuple[bytes, int]:
        world.server.start(asyncio.get_running_loop())
        reader, writer = await asyncio.open_unix_connection(str(world.server.path))
        writer.write(encode_request(Op.HELLO, struct.pack("<I", GUI)))
        hello = await reader.readexactly(8)
        writer.write(encode_request(Op.MAP, struct.pack("<IBI", VM, 0, area.refs[0])))
        await reader.readexactly(8 + 16)
        mapped = holds(world)
        writer.close()
        await writer.wait_closed()
        while world.server.connections:
            await asyncio.sleep(0.01)
        world.server.close()  # takes the server off the loop as well
        return hello, mapped

    hello, mapped = asyncio.run(asyncio.wait_for(exchange(), DEADLINE))
    assert hello == struct.pack("<II", 4, 0) and mapped == 1
    assert holds(world) == 0
    assert world.vm.unshare(area) is Unshared.ENDED


# -- event channels and unmap notifies, sans-IO (HypercallSession) ----------------------------


@dataclass
class SansIO:
    """A hypervisor whose view of processes' mmaps the test sets (``maps``), the VM's
    backend on it, and the VM's port left unbound for the GUI domain."""

    hv: SimHypervisor
    vm: SimBackend
    vm_port: int
    maps: dict[int, set[tuple[int, int]]]


@pytest.fixture
def sansio(tmp_path: Path) -> Iterator[SansIO]:
    maps: dict[int, set[tuple[int, int]]] = {}
    hv = SimHypervisor(tmp_path, clock=Clock(), maps_reader=lambda pid: set(maps.get(pid, ())))
    vm = SimBackend(hv, VM)
    yield SansIO(hv, vm, vm.bind_unbound_port(GUI), maps)
    vm.close()


class Session:
    """A ``HypercallSession`` driven with request bytes, as the server would."""

    def __init__(self, hv: SimHypervisor, pid: int | None = None, domid: int = GUI) -> None:
        self.session = HypercallSession(hv, pid)
        self.fds: list[int] = []
        if domid >= 0:
            assert self.call(Op.HELLO, struct.pack("<I", domid)) == (0, b"")

    def call(self, op: int, body: bytes = b"") -> tuple[int, bytes]:
        reply = self.session.handle(struct.pack("<I", op) + body)
        if reply.fd is not None:
            self.fds.append(reply.fd)
        (length,) = struct.unpack_from("<I", reply.data)
        assert length == len(reply.data) - 4
        (status,) = struct.unpack_from("<I", reply.data, 4)
        return status, reply.data[8:]

    def status(self, op: int, body: bytes = b"") -> int:
        return self.call(op, body)[0]

    def bind(self, remote_port: int, remote_domid: int = VM) -> int:
        status, body = self.call(Op.BIND_INTERDOMAIN, struct.pack("<II", remote_domid,
                                                                  remote_port))
        assert status == 0, body
        (port,) = struct.unpack("<I", body)
        return int(port)

    def map(self, refs: tuple[int, ...], writable: bool = True) -> int:
        status, body = self.call(Op.MAP, struct.pack("<IB", VM, int(writable))
                                 + struct.pack(f"<{len(refs)}I", *refs))
        assert status == 0, body
        return int(struct.unpack("<QQ", body)[0])

    def set_notify(self, mapping: int, flags: int, offset: int = 0, port: int = 0) -> int:
        return self.status(Op.SET_NOTIFY, struct.pack("<QIII", mapping, flags, offset, port))

    def close(self) -> None:
        self.session.close()
        for fd in self.fds:
            os.close(fd)
        self.fds.clear()


BOTH = NOTIFY_CLEAR_BYTE | NOTIFY_SEND_EVENT


def holds_of(hv: SimHypervisor) -> int:
    return sum(entry.holds for entry in hv._entries.values())


def port_of(hv: SimHypervisor, domid: int, port: int) -> _Port | None:
    return hv._ports.get((domid, port))


def fired(vm: SimBackend) -> list[int]:
    """The VM's ports that fired, if its event fd says any did; unmasked again."""
    ready, _, _ = select.select([vm.event_fd()], [], [], 0)
    ports = vm.fired_ports() if ready else []
    vm.unmask(ports)
    return ports


def test_a_session_binds_to_the_vms_unbound_port_notifies_and_unbinds(sansio: SansIO) -> None:
    host = Session(sansio.hv)
    port = host.bind(sansio.vm_port)
    assert host.session.ports == {port}
    ours, theirs = port_of(sansio.hv, GUI, port), port_of(sansio.hv, VM, sansio.vm_port)
    assert ours is not None and theirs is not None and ours.remote is theirs
    assert host.call(Op.NOTIFY, struct.pack("<I", port)) == (0, b"")
    assert fired(sansio.vm) == [sansio.vm_port]
    assert host.call(Op.UNBIND, struct.pack("<I", port)) == (0, b"")
    assert port_of(sansio.hv, GUI, port) is None and theirs.remote is None
    assert host.status(Op.NOTIFY, struct.pack("<I", port)) == errno.ENOTCONN
    assert host.status(Op.UNBIND, struct.pack("<I", port)) == errno.ENOTCONN
    assert host.session.ports == set()
    host.close()


def test_event_channel_requests_are_checked(sansio: SansIO) -> None:
    bare = Session(sansio.hv, domid=-1)
    for op in (Op.BIND_INTERDOMAIN, Op.UNBIND, Op.SET_NOTIFY, Op.NOTIFY):
        assert bare.status(op, bytes(24)) == errno.EPROTO
    host, other = Session(sansio.hv), Session(sansio.hv)
    bind = Op.BIND_INTERDOMAIN
    for body in (b"", bytes(4), bytes(12)):
        assert host.status(bind, body) == errno.EINVAL
    for body in (b"", bytes(3), bytes(8)):
        assert host.status(Op.UNBIND, body) == errno.EINVAL
        assert host.status(Op.NOTIFY, body) == errno.EINVAL
    assert host.status(bind, struct.pack("<II", 0x7FF0, sansio.vm_port)) == errno.EINVAL
    assert host.status(bind, struct.pack("<II", VM, 99)) == errno.EINVAL  # no such port
    assert host.status(bind, struct.pack("<II", 2, sansio.vm_port)) == errno.EINVAL
    for_domain_2 = sansio.vm.bind_unbound_port(2)
    status, text = host.call(bind, struct.pack("<II", VM, for_domain_2))
    assert status == errno.EINVAL and b"not an unbound port for domain 0" in text
    port = host.bind(sansio.vm_port)
    # Bound already: no second connection to it.
    assert other.status(bind, struct.pack("<II", VM, sansio.vm_port)) == errno.EINVAL
    # Another connection's port (of the same domain) is not this one's to use.
    others = other.bind(sansio.vm.bind_unbound_port(GUI))
    assert others != port
    for op in (Op.UNBIND, Op.NOTIFY):
        assert other.status(op, struct.pack("<I", port)) == errno.ENOTCONN
        assert host.status(op, struct.pack("<I", others)) == errno.ENOTCONN
    assert port_of(sansio.hv, GUI, port) is not None
    for session in (bare, host, other):
        session.close()
    assert port_of(sansio.hv, GUI, port) is None and port_of(sansio.hv, GUI, others) is None


def test_set_notify_requests_are_checked_and_a_refused_one_changes_nothing(
        sansio: SansIO) -> None:
    area = sansio.vm.share(GUI, 2)
    read_only = sansio.vm.share(GUI, 1, writable=False)
    host, other = Session(sansio.hv), Session(sansio.hv)
    port = host.bind(sansio.vm_port)
    others = other.bind(sansio.vm.bind_unbound_port(GUI))
    mapping = host.map(area.refs)
    frozen = host.map(read_only.refs, writable=False)
    assert host.set_notify(mapping, BOTH, 2 * PAGE_SIZE - 1, port) == 0
    last = 2 * PAGE_SIZE - 1
    for body in (b"", bytes(19), bytes(21)):
        assert host.status(Op.SET_NOTIFY, body) == errno.EINVAL
    refused = [
        (99, NOTIFY_CLEAR_BYTE, 0, 0),  # no such mapping
        (mapping, 4, 0, 0),  # unknown flags
        (mapping, 0x80000000 | NOTIFY_CLEAR_BYTE, 0, 0),
        (mapping, NOTIFY_CLEAR_BYTE, 2 * PAGE_SIZE, 0),  # outside the mapping
        (mapping, NOTIFY_CLEAR_BYTE, 0xFFFFFFFF, 0),
        (mapping, NOTIFY_SEND_EVENT, 5, port),  # a byte without its flag
        (mapping, NOTIFY_CLEAR_BYTE, 0, port),  # a port without its flag
        (mapping, NOTIFY_SEND_EVENT, 0, others),  # another connection's
        (mapping, NOTIFY_SEND_EVENT, 0, 77),  # no port
        (frozen, NOTIFY_CLEAR_BYTE, 0, 0),  # gntdev: a read-only mapping clears no byte
    ]
    for mapping_id, flags, offset, notify_port in refused:
        assert host.set_notify(mapping_id, flags, offset, notify_port) == errno.EINVAL, \
            (mapping_id, flags, offset, notify_port)
    # Another connection can neither see this one's mapping nor use its port.
    assert other.set_notify(mapping, NOTIFY_CLEAR_BYTE, 0) == errno.EINVAL
    other_mapping = other.map(area.refs)
    assert other.set_notify(other_mapping, NOTIFY_SEND_EVENT, 0, port) == errno.EINVAL
    # A read-only mapping may still signal.
    assert host.set_notify(frozen, NOTIFY_SEND_EVENT, 0, port) == 0
    assert host.set_notify(frozen, 0) == 0
    held = port_of(sansio.hv, GUI, port)
    assert held is not None and held.holds == 1
    # The first notify is still the one armed.
    area.memory[last] = 1
    other.close()
    assert host.status(Op.UNMAP, struct.pack("<Q", mapping)) == 0
    assert area.memory[last] == 0 and fired(sansio.vm) == [sansio.vm_port]
    assert held.holds == 0
    # Gone: nothing to arm.
    assert host.set_notify(mapping, NOTIFY_CLEAR_BYTE, 0) == errno.EINVAL
    host.close()
    assert sansio.vm.unshare(area) is Unshared.ENDED
    assert sansio.vm.unshare(read_only) is Unshared.ENDED


def test_unbinding_an_armed_port_keeps_it_until_the_notify_is_sent(sansio: SansIO) -> None:
    area = sansio.vm.share(GUI, 1)
    area.memory[7] = 1
    host = Session(sansio.hv)
    port = host.bind(sansio.vm_port)
    mapping = host.map(area.refs)
    assert host.set_notify(mapping, BOTH, 7, port) == 0
    assert host.call(Op.UNBIND, struct.pack("<I", port)) == (0, b"")
    # Closing, as evtchn_get keeps it: no longer the connection's, still connected.
    held = port_of(sansio.hv, GUI, port)
    assert held is not None and held.closing and held.holds == 1
    assert held.remote is port_of(sansio.hv, VM, sansio.vm_port)
    assert host.status(Op.NOTIFY, struct.pack("<I", port)) == errno.ENOTCONN
    assert host.set_notify(mapping, NOTIFY_SEND_EVENT, 0, port) == errno.EINVAL
    assert fired(sansio.vm) == []
    assert host.status(Op.UNMAP, struct.pack("<Q", mapping)) == 0
    assert fired(sansio.vm) == [sansio.vm_port] and area.memory[7] == 0
    assert port_of(sansio.hv, GUI, port) is None
    vm_port = port_of(sansio.hv, VM, sansio.vm_port)
    assert vm_port is not None and vm_port.remote is None
    host.close()
    assert sansio.vm.unshare(area) is Unshared.ENDED


def test_setting_the_notify_again_replaces_it(sansio: SansIO) -> None:
    second_vm_port = sansio.vm.bind_unbound_port(GUI)
    area = sansio.vm.share(GUI, 2)
    area.memory[0] = area.memory[PAGE_SIZE] = 1
    host = Session(sansio.hv)
    first, second = host.bind(sansio.vm_port), host.bind(second_vm_port)
    mapping = host.map(area.refs)
    held_first, held_second = port_of(sansio.hv, GUI, first), port_of(sansio.hv, GUI, second)
    assert held_first is not None and held_second is not None
    assert host.set_notify(mapping, BOTH, 0, first) == 0
    assert host.set_notify(mapping, BOTH, 0, first) == 0  # the same port: held once
    assert held_first.holds == 1
    assert host.set_notify(mapping, BOTH, PAGE_SIZE, second) == 0
    assert (held_first.holds, held_second.holds) == (0, 1)
    # The replaced port is free: unbinding it closes it at once.
    assert host.status(Op.UNBIND, struct.pack("<I", first)) == 0
    assert port_of(sansio.hv, GUI, first) is None
    assert host.status(Op.UNMAP, struct.pack("<Q", mapping)) == 0
    assert fired(sansio.vm) == [second_vm_port]
    assert (area.memory[0], area.memory[PAGE_SIZE]) == (1, 0)
    # Flags 0 disarm: nothing happens when the mapping goes.
    again = host.map(area.refs)
    assert host.set_notify(again, BOTH, 0, second) == 0
    assert host.set_notify(again, 0) == 0
    assert held_second.holds == 0
    assert host.status(Op.UNMAP, struct.pack("<Q", again)) == 0
    assert fired(sansio.vm) == [] and area.memory[0] == 1
    host.close()
    assert sansio.vm.unshare(area) is Unshared.ENDED


def test_closing_a_session_fires_its_due_notifies_then_unbinds(sansio: SansIO) -> None:
    spare_vm_port = sansio.vm.bind_unbound_port(GUI)
    first, second = sansio.vm.share(GUI, 1), sansio.vm.share(GUI, 3)
    first.memory[10] = second.memory[3 * PAGE_SIZE - 1] = 1
    host = Session(sansio.hv)
    port, spare = host.bind(sansio.vm_port), host.bind(spare_vm_port)
    one, two = host.map(first.refs), host.map(second.refs)
    assert host.set_notify(one, BOTH, 10, port) == 0
    assert host.set_notify(two, BOTH, 3 * PAGE_SIZE - 1, port) == 0
    assert port_of(sansio.hv, GUI, spare) is not None
    host.close()
    assert first.memory[10] == 0 and second.memory[3 * PAGE_SIZE - 1] == 0
    # Both reached the VM: the second waited (pending) while the port was masked.
    assert fired(sansio.vm) == [sansio.vm_port]
    assert fired(sansio.vm) == [sansio.vm_port]
    assert [key for key in sansio.hv._ports if key[0] == GUI] == []
    for vm_port in (sansio.vm_port, spare_vm_port):
        local = port_of(sansio.hv, VM, vm_port)
        assert local is not None and local.remote is None
    assert sansio.hv._mappings == []
    assert host.session.handle(struct.pack("<I", Op.NOTIFY)).data[4:8] == \
        struct.pack("<I", errno.EBADF)
    assert sansio.vm.unshare(first) is Unshared.ENDED
    assert sansio.vm.unshare(second) is Unshared.ENDED


def test_a_notify_waiting_on_a_process_keeps_its_port_past_the_session(sansio: SansIO) -> None:
    """The connection's process still has the pages mmapped when the connection closes:
    the mapping lasts until it munmaps, and the notify's port until the notify is sent."""
    area = sansio.vm.share(GUI, 1)
    area.memory[0] = 1
    host = Session(sansio.hv, pid=4242)
    assert sansio.hv.watched == {4242}
    port = host.bind(sansio.vm_port)
    mapping = host.map(area.refs)
    st = os.fstat(host.fds[0])
    sansio.maps[4242] = {(st.st_dev, st.st_ino)}  # the process mmaps the fd
    assert host.set_notify(mapping, BOTH, 0, port) == 0
    host.close()
    held = port_of(sansio.hv, GUI, port)
    assert held is not None and held.closing and held.holds == 1
    sansio.hv.refresh()
    assert fired(sansio.vm) == [] and area.memory[0] == 1
    assert holds_of(sansio.hv) == 0 and len(sansio.hv._mappings) == 1
    sansio.maps.clear()  # it munmapped
    sansio.hv.refresh()
    assert fired(sansio.vm) == [sansio.vm_port] and area.memory[0] == 0
    assert port_of(sansio.hv, GUI, port) is None and sansio.hv.watched == frozenset()
    assert sansio.hv._mappings == []
    assert sansio.vm.unshare(area) is Unshared.ENDED
