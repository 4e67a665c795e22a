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
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qubesshm.grants.api import PAGE_SIZE, Unshared
from qubesshm.grants.hypercalls import (
    MAX_FRAME,
    ForeignKernelError,
    HypercallServer,
    Op,
    connect_foreign,
    encode_request,
    find_kernel,
    serve_hypercalls,
)
from qubesshm.grants.simkernels import HYPERCALL_SOCKET, KernelDir, running_kernels
from qubesshm.grants.simulated import SimBackend, SimHypervisor

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


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


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
        deadline = time.monotonic() + DEADLINE
        while not done():
            if time.monotonic() > deadline:
                pytest.fail(f"timed out waiting for {what}")
            ready, _, _ = select.select([self.server.fileno(), *extra], [], [], 0.5)
            if self.server.fileno() in ready:
                self.server.on_readable()


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


class Foreign:
    """A foreign domain's process, spoken to a line at a time while the server runs."""

    def __init__(self, world: World, domid: int = GUI, granter: int = VM) -> None:
        self.world = world
        self.proc = subprocess.Popen(
            [sys.executable, "-c", f"PAGE = {PAGE_SIZE}\n" + FOREIGN, str(domid), str(granter),
             str(world.base)], cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, bufsize=0)
        self._pending = b""
        self.greeting = self.line()

    def line(self) -> str:
        assert self.proc.stdout is not None
        out = self.proc.stdout.fileno()
        got: list[str] = []

        def arrived() -> bool:
            ready, _, _ = select.select([out], [], [], 0)
            if ready:
                data = os.read(out, 65536)
                if not data and b"\n" not in self._pending:
                    assert self.proc.stderr is not None
                    pytest.fail(f"the foreign domain exited: {self.proc.stderr.read()!r}")
                self._pending += data
            if b"\n" in self._pending:
                head, self._pending = self._pending.split(b"\n", 1)
                got.append(head.decode())
                return True
            return False

        self.world.pump_until(arrived, "the foreign domain's answer", (out,))
        return got[0]

    def ask(self, *words: object) -> str:
        assert self.proc.stdin is not None
        self.proc.stdin.write(" ".join(str(w) for w in words).encode() + b"\n")
        return self.line()

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
