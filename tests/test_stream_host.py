"""The host half of a split proxy against what a hostile VM side may send it.

``HostHalf`` runs in this process against the session's real Weston, with a real
``SimHypervisor``: the VM (domain 1) shares real pages, the host maps them as
domain 0, and the stream is a socketpair whose other end this test writes frames
to and reads the host's frames from. Scenarios: a well-formed session (a registry
answered, a pool mapped, handed to Weston, unmapped, and its notify firing once
Weston let go), each kind of hostile frame refused with a reason, and a fuzzed
stream of VM-side frames. After each, once the stream is closed, nothing is left
mapped, the host holds no connection, and Weston still serves a fresh client.

The real ``qubesshm host`` process is tested for what it says on the faults it
meets first: garbage, no simulated kernel to reach, a terminal for its stream.

Faults of the host are tested too: the VM's ERROR text kept to one line in the
host's log, more fds than the next bytes can carry, fds piling up ahead of their
bytes, running out of fds, bytes past the credit when the compositor stops reading
(a stub compositor stands in: Weston always reads), and a fault of the host's own
not blamed on the VM side.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import pty
import resource
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import qubesshm.stream.host as host_module
from qubesshm.grants.api import Unshared
from qubesshm.grants.hypercalls import ForeignKernelError
from qubesshm.grants.simulated import SimBackend, SimHypervisor
from qubesshm.headless import HeadlessWeston
from qubesshm.stream.codec import (
    HEADER,
    MAGIC,
    MAX_DATA,
    U16_MAX,
    VERSION,
    Ack,
    Channel,
    Close,
    Data,
    Decoder,
    Error,
    File,
    Frame,
    Hello,
    Kind,
    Open,
    Pipe,
    PipeAck,
    PipeClosed,
    PipeData,
    PipeEnd,
    Pool,
    StreamError,
    Unmap,
    encode,
)
from qubesshm.stream.connections import WINDOW
from qubesshm.stream.host import DEFAULT_MAX_PAGES, HostHalf
from qubesshm.wire.codec import ArgValue, UntypedNewId, encode_message
from qubesshm.wire.protocol import load_protocols

VM = 1
HOST = 0
PAGE = 4096
STEP = 0.002  # how long one turn of the loop may wait for I/O
DEADLINE = 15.0
REPO = Path(__file__).resolve().parent.parent

PROTOCOLS = load_protocols()


# -- Wayland bytes a client would send, and the events that come back -------------------------


def request(object_id: int, interface: str, name: str, *args: ArgValue) -> bytes:
    """One request's bytes (an fd argument travels beside them: a POOL, FILE or PIPE)."""
    spec = next(m for m in PROTOCOLS[interface].requests if m.name == name)
    data, _ = encode_message(object_id, spec, list(args))
    return data


def bind(name: int, interface: str, version: int, new_id: int) -> bytes:
    return request(2, "wl_registry", "bind", name, UntypedNewId(interface, version, new_id))


def registry_and_sync(callback: int = 3) -> bytes:
    return (request(1, "wl_display", "get_registry", 2)
            + request(1, "wl_display", "sync", callback))


def events(data: bytes) -> list[tuple[int, int, bytes]]:
    """(object, opcode, body) of each whole event in ``data``."""
    found = []
    pos = 0
    while pos + 8 <= len(data):
        object_id, word = struct.unpack_from("<II", data, pos)
        size = word >> 16
        if size < 8 or pos + size > len(data):
            break
        found.append((object_id, word & 0xFFFF, data[pos + 8:pos + size]))
        pos += size
    return found


def globals_of(data: bytes, registry: int = 2) -> dict[str, int]:
    """wl_registry.global events: interface -> name."""
    found = {}
    for object_id, opcode, body in events(data):
        if object_id == registry and opcode == 0:
            name, length = struct.unpack_from("<II", body)
            found[body[8:8 + length - 1].decode()] = name
    return found


def done_callbacks(data: bytes) -> set[int]:
    return {object_id for object_id, opcode, _ in events(data) if opcode == 0
            and object_id not in (1, 2)}


def display_errors(data: bytes) -> list[str]:
    errors = []
    for object_id, opcode, body in events(data):
        if object_id == 1 and opcode == 0:
            _, code, length = struct.unpack_from("<III", body)
            errors.append(f"{code}: {body[12:12 + length - 1].decode(errors='replace')}")
    return errors


# -- the rig: a host half on a socketpair, a simulated hypervisor, the session's Weston --------


class Rig:
    """One ``HostHalf`` in this process, fed frames by the test as the VM side."""

    def __init__(self, weston: HeadlessWeston, root: Path, *,
                 max_pages: int = DEFAULT_MAX_PAGES, peer_domid: int | None = None,
                 backend_fails: Exception | None = None) -> None:
        assert weston.process is not None
        self.weston = weston
        self.fds_before = open_fds()
        self.finished = False
        self.loop = asyncio.new_event_loop()
        self.errors: list[dict[str, Any]] = []
        self.loop.set_exception_handler(lambda _loop, context: self.errors.append(context))
        self.hv = SimHypervisor(root)
        self.vm = SimBackend(self.hv, VM)
        # The host's backend watches the compositor when it can (ForeignBackend.watch);
        # SimBackend has no watch, so the test does what the hypercall would.
        self.hv.watch(weston.process.pid)
        self.asked: list[int] = []  # the domains open_backend was asked for
        self.backend: SimBackend | None = None
        self.backend_fails = backend_fails
        self.ours, self.theirs = socket.socketpair()
        self.ours.setblocking(False)
        self.half = HostHalf(self.loop, self.theirs.fileno(), self.theirs.fileno(),
                             upstream=weston.socket_path, own_domid=HOST,
                             open_backend=self._open_backend, max_pages=max_pages,
                             peer_domid=peer_domid)
        self.decoder = Decoder()
        self.received: list[Frame] = []
        self.malformed: str | None = None  # what the host sent that does not decode
        self.wayland: dict[int, bytearray] = {}  # per connection, the compositor's bytes
        self._out = bytearray()
        self._eof_wanted = False
        self.eof_sent = False
        self.closed = False

    def _open_backend(self, domid: int) -> SimBackend:
        self.asked.append(domid)
        if self.backend_fails is not None:
            raise self.backend_fails
        self.backend = SimBackend(self.hv, HOST)
        return self.backend

    # -- driving ----------------------------------------------------------------------------

    def send(self, *frames: Frame | bytes) -> None:
        """Queue frames (or raw bytes) for the host; they go as the loop turns."""
        for frame in frames:
            self._out += frame if isinstance(frame, bytes) else encode(frame)
        self._write()

    def end(self) -> None:
        """EOF on the stream once what is queued was written."""
        self._eof_wanted = True
        self._write()

    def _write(self) -> None:
        if self.half.done.done() or self.half.link.ended:
            self._out.clear()  # nobody reads it any more
        while self._out:
            try:
                sent = self.ours.send(self._out[:256 * 1024])
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                self._out.clear()
                break
            del self._out[:sent]
        if self._eof_wanted and not self._out and not self.eof_sent:
            self.eof_sent = True
            with contextlib.suppress(OSError):
                self.ours.shutdown(socket.SHUT_WR)

    def _read(self) -> None:
        while True:
            try:
                data = self.ours.recv(1 << 20)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return
            if not data:
                return
            if self.malformed is not None:
                continue
            try:
                frames = self.decoder.feed(data)
            except StreamError as exc:
                self.malformed = str(exc)
                continue
            for frame in frames:
                self.received.append(frame)
                if isinstance(frame, Data):
                    self.wayland.setdefault(frame.conn, bytearray()).extend(frame.data)

    def turn(self) -> None:
        self._write()
        self.loop.run_until_complete(asyncio.sleep(STEP))
        self._read()

    def until(self, condition: Callable[[], object], what: str,
              timeout: float = DEADLINE) -> None:
        deadline = time.monotonic() + timeout
        while True:
            self._read()
            if condition():
                return
            if time.monotonic() > deadline:
                sent = [f if isinstance(f, Close | Error) else type(f).__name__
                        for f in self.received]
                done = self.half.done.result() if self.half.done.done() else "-"
                said = [display_errors(bytes(data)) for data in self.wayland.values()]
                pytest.fail(f"timed out waiting for {what}; the host sent {sent}, ended "
                            f"{done}; Weston's errors: {said}")
            self.turn()

    # -- what the host said ---------------------------------------------------------------

    def of(self, kind: type) -> list[Any]:
        return [frame for frame in self.received if isinstance(frame, kind)]

    def closes(self, conn: int) -> list[str]:
        return [frame.reason for frame in self.of(Close) if frame.conn == conn]

    def answered(self, conn: int, callback: int) -> bool:
        return callback in done_callbacks(bytes(self.wayland.get(conn, b"")))

    @property
    def reason(self) -> str | None:
        assert self.half.done.done()
        return self.half.done.result()

    # -- the end ----------------------------------------------------------------------------

    def nothing_mapped(self) -> bool:
        """No mapping left in the hypervisor (the notifies waiting on Weston's munmap
        fire here), and no grant held."""
        self.hv.refresh()
        return not self.hv._mappings and all(
            entry.holds == 0 for entry in self.hv._entries.values())

    def finish(self) -> str | None:
        """Close the stream, wait for the host to end, check it let go of everything;
        the reason it ended with."""
        self.end()
        self.until(lambda: self.half.done.done(), "the host to end")
        self.until(self.nothing_mapped, "every mapping to go")
        assert self.half.connections == {}, self.half.connections
        assert not self.half.conns.live
        assert self.half.pipes.live == 0
        assert self.half.counters.pages_mapped == 0
        assert self.malformed is None, f"the host sent a malformed frame: {self.malformed}"
        assert not self.errors, self.errors
        self.finished = True
        reason = self.reason
        assert reason is None or "\n" not in reason, reason
        return reason

    def close(self) -> dict[int, str]:
        """Close everything; the fds opened since the rig was made and still open
        (checked by the callers once the host has finished)."""
        if not self.closed:
            self.closed = True
            self.half.close()
            self.vm.close()
            self.ours.close()
            self.theirs.close()
            self.loop.close()
        leaked = {fd: target for fd, target in open_fds().items()
                  if self.fds_before.get(fd) != target}
        if self.finished:
            assert not leaked, f"fds left open: {leaked}"
        return leaked


def open_fds() -> dict[int, str]:
    found = {}
    for name in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            found[int(name)] = os.readlink(f"/proc/self/fd/{name}")
    return found


@pytest.fixture
def rig(weston: HeadlessWeston, tmp_path: Path) -> Iterator[Rig]:
    made = Rig(weston, tmp_path)
    yield made
    made.close()
    assert not made.errors, made.errors


def weston_serves(weston: HeadlessWeston) -> None:
    """Weston is alive and a fresh client gets its globals."""
    assert weston.process is not None and weston.process.poll() is None
    done = subprocess.run(["wayland-info"], env=weston.env(), capture_output=True,
                          timeout=30, check=False)
    assert done.returncode == 0, done.stderr
    assert b"wl_compositor" in done.stdout


def hello(domid: int = VM) -> Hello:
    return Hello(VERSION, VERSION, domid)


def start(rig: Rig, conn: int = 1) -> int:
    """HELLO, CHANNEL (a port the VM left unbound for the host) and OPEN; the VM's port."""
    port = rig.vm.bind_unbound_port(HOST)
    rig.send(hello(), Channel(port), Open(conn))
    rig.until(lambda: conn in rig.half.connections
              and rig.half.connections[conn].transport is not None, "the connection")
    assert rig.asked == [VM]
    return port


# -- a well-formed session -------------------------------------------------------------------


def test_a_well_formed_session_maps_hands_over_and_lets_go(rig: Rig,
                                                           weston: HeadlessWeston) -> None:
    port = start(rig)
    assert rig.half.port is not None
    rig.send(Data(1, registry_and_sync(3)))
    rig.until(lambda: rig.answered(1, 3), "the registry's globals")
    names = globals_of(bytes(rig.wayland[1]))
    assert {"wl_compositor", "wl_shm"} <= set(names)

    area = rig.vm.share(HOST, 4)
    notify = 4 * PAGE - 1
    area.memory[notify] = 1
    rig.send(Pool(1, VM, 7, 4 * PAGE, notify, area.refs),
             Data(1, bind(names["wl_shm"], "wl_shm", 1, 4)
                  + request(4, "wl_shm", "create_pool", 5, -1, 4 * PAGE)
                  + request(1, "wl_display", "sync", 6)))
    rig.until(lambda: rig.answered(1, 6), "Weston to take the pool")
    assert display_errors(bytes(rig.wayland[1])) == []
    assert rig.half.counters.pools_mapped == 1
    assert [entry.holds for entry in rig.hv._entries.values()] == [1] * 4
    file_id = rig.hv._mappings[0].pages.file_id
    assert file_id in rig.hv._mapped_by_processes(), "Weston does not map the pool"

    rig.send(Unmap(1, 7))
    rig.until(lambda: rig.half.counters.pools_unmapped == 1, "the UNMAP")
    # The host let go; Weston still maps the pages: no notify yet.
    assert [entry.holds for entry in rig.hv._entries.values()] == [0] * 4
    rig.hv.refresh()
    assert len(rig.hv._mappings) == 1 and rig.hv._mappings[0].waiting_for_processes
    assert area.memory[notify] == 1
    assert rig.vm.fired_ports() == []

    rig.send(Data(1, request(5, "wl_shm_pool", "destroy") + request(1, "wl_display", "sync", 7)))
    rig.until(lambda: rig.answered(1, 7), "the pool's destroy")
    rig.until(rig.nothing_mapped, "the notify after Weston's munmap")
    assert area.memory[notify] == 0
    assert rig.vm.fired_ports() == [port]

    rig.send(Close(1, ""))
    assert rig.finish() is None
    assert rig.closes(1) == []  # the VM closed it: nothing to answer
    assert display_errors(bytes(rig.wayland[1])) == []
    assert rig.of(Hello) == [Hello(VERSION, VERSION, HOST)]
    assert rig.vm.unshare(area) is Unshared.ENDED
    weston_serves(weston)



def serves(rig: Rig, conn: int) -> None:
    """The stream goes on: a new connection gets Weston's globals."""
    rig.send(Open(conn), Data(conn, registry_and_sync(3)))
    rig.until(lambda: rig.answered(conn, 3), f"connection {conn}'s globals")


def create_pool(names: dict[str, int], size: int, *, shm: int = 4, pool: int = 5,
                callback: int = 6) -> bytes:
    """Bind wl_shm, make a pool of the fd that came before, sync."""
    return (bind(names["wl_shm"], "wl_shm", 1, shm)
            + request(shm, "wl_shm", "create_pool", pool, -1, size)
            + request(1, "wl_display", "sync", callback))


def with_globals(rig: Rig, conn: int = 1) -> dict[str, int]:
    rig.send(Data(conn, registry_and_sync(3)))
    rig.until(lambda: rig.answered(conn, 3), "the registry's globals")
    return globals_of(bytes(rig.wayland[conn]))


# -- hostile frames that end their connection --------------------------------------------------


def _another_domain(rig: Rig) -> tuple[list[Frame], str]:
    area = rig.vm.share(HOST, 1)
    return [Pool(1, 2, 7, PAGE, 0, area.refs)], "pool 7 names domain 2, not the VM's (1)"


def _never_granted(rig: Rig) -> tuple[list[Frame], str]:
    return [Pool(1, VM, 7, 2 * PAGE, 0, (4000, 4001))], \
        "cannot map pool 7 (2 pages): domain 1 has no grant 4000"


def _reserved_ref(rig: Rig) -> tuple[list[Frame], str]:
    return [Pool(1, VM, 7, PAGE, 0, (0,))], "cannot map pool 7 (1 pages): domain 1 has no grant 0"


def _granted_elsewhere(rig: Rig) -> tuple[list[Frame], str]:
    area = rig.vm.share(5, 1)
    ref = area.refs[0]
    return [Pool(1, VM, 7, PAGE, 0, area.refs)], \
        f"cannot map pool 7 (1 pages): grant {ref} of domain 1 is for domain 5, not 0"


def _read_only(rig: Rig) -> tuple[list[Frame], str]:
    area = rig.vm.share(HOST, 1, writable=False)
    return [Pool(1, VM, 7, PAGE, 0, area.refs)], "is read-only"


def _not_leading(rig: Rig) -> tuple[list[Frame], str]:
    area = rig.vm.share(HOST, 3)
    return [Pool(1, VM, 7, 2 * PAGE, 0, area.refs[1:])], "maps only the leading pages"


def _some_refs_good(rig: Rig) -> tuple[list[Frame], str]:
    area = rig.vm.share(HOST, 2)
    return [Pool(1, VM, 7, 3 * PAGE, 0, (*area.refs, 4000))], "domain 1 has no grant 4000"


def _pool_id_twice(rig: Rig) -> tuple[list[Frame], str]:
    names = with_globals(rig)
    area = rig.vm.share(HOST, 2)
    return [Pool(1, VM, 7, 2 * PAGE, 0, area.refs), Data(1, create_pool(names, 2 * PAGE)),
            Pool(1, VM, 7, PAGE, 0, area.refs[:1])], "pool 7 is already mapped"


def _unknown_unmap(rig: Rig) -> tuple[list[Frame], str]:
    return [Unmap(1, 9)], "UNMAP of pool 9, which this connection has not mapped"


def _unmap_twice(rig: Rig) -> tuple[list[Frame], str]:
    names = with_globals(rig)
    area = rig.vm.share(HOST, 1)
    return [Pool(1, VM, 7, PAGE, 0, area.refs), Data(1, create_pool(names, PAGE)),
            Unmap(1, 7), Unmap(1, 7)], "UNMAP of pool 7, which this connection has not mapped"


def _past_max_pages(rig: Rig) -> tuple[list[Frame], str]:
    area = rig.vm.share(HOST, 5)
    return [Pool(1, VM, 7, 5 * PAGE, 0, area.refs)], \
        "pool 7 of 5 pages would pass the 4 pages this host maps for one VM"


def _past_max_pages_together(rig: Rig) -> tuple[list[Frame], str]:
    names = with_globals(rig)
    area = rig.vm.share(HOST, 3)
    return [Pool(1, VM, 7, 3 * PAGE, 0, area.refs), Data(1, create_pool(names, 3 * PAGE)),
            Pool(1, VM, 8, 2 * PAGE, 0, area.refs[:2])], \
        "pool 8 of 2 pages would pass the 4 pages this host maps for one VM"


@pytest.mark.parametrize("hostile", [
    _another_domain, _never_granted, _reserved_ref, _granted_elsewhere, _read_only,
    _not_leading, _some_refs_good, _pool_id_twice, _unknown_unmap, _unmap_twice,
    _past_max_pages, _past_max_pages_together,
], ids=lambda f: f.__name__.strip("_"))
def test_a_refused_pool_ends_its_connection_with_the_reason(
        hostile: Callable[[Rig], tuple[list[Frame], str]], weston: HeadlessWeston,
        tmp_path: Path) -> None:
    rig = Rig(weston, tmp_path, max_pages=4)
    try:
        start(rig)
        frames, reason = hostile(rig)
        rig.send(*frames)
        rig.until(lambda: rig.closes(1), "the connection's CLOSE")
        assert len(rig.closes(1)) == 1 and reason in rig.closes(1)[0], rig.closes(1)
        assert 1 not in rig.half.connections
        assert rig.half.counters.refused == 1
        # What the VM side sends on it after that crossed the CLOSE: dropped.
        rig.send(Data(1, request(1, "wl_display", "sync", 9)), Unmap(1, 7), Ack(1, 5),
                 Close(1, "bye"))
        # Nothing of the refused connection stays mapped; the stream goes on.
        rig.until(rig.nothing_mapped, "the refused connection's mappings to go")
        serves(rig, 2)
        assert rig.of(Error) == []
        assert rig.finish() is None
        assert len(rig.closes(1)) == 1
    finally:
        rig.close()
    weston_serves(weston)


# -- hostile frames that end the stream ------------------------------------------------------


def header(length: int, kind: int, conn: int = 0, flags: int = 0) -> bytes:
    return HEADER.pack(length, kind, flags, conn)


def _before_hello(rig: Rig) -> tuple[list[Frame | bytes], str]:
    return [Open(1)], "OPEN before HELLO"


def _channel_before_hello(rig: Rig) -> tuple[list[Frame | bytes], str]:
    return [Channel(rig.vm.bind_unbound_port(HOST))], "CHANNEL before HELLO"


def _second_hello(rig: Rig) -> tuple[list[Frame | bytes], str]:
    return [hello(), Channel(rig.vm.bind_unbound_port(HOST)), hello()], "a second HELLO"


def _no_common_version(rig: Rig) -> tuple[list[Frame | bytes], str]:
    return [Hello(VERSION + 1, VERSION + 5, VM)], "no common version"


def _reserved_domid(rig: Rig) -> tuple[list[Frame | bytes], str]:
    return [header(12, Kind.HELLO) + struct.pack("<4sHHI", MAGIC, 1, 1, 0x7FF0)], \
        "HELLO frame: domid 0x7ff0 is reserved"


def _port_for_another_domain(rig: Rig) -> tuple[list[Frame | bytes], str]:
    port = rig.vm.bind_unbound_port(5)
    return [hello(), Channel(port)], \
        f"CHANNEL: cannot bind port {port} of domain 1: port {port} of domain 1 is not an " \
        "unbound port for domain 0"


def _no_such_port(rig: Rig) -> tuple[list[Frame | bytes], str]:
    return [hello(), Channel(0xFFFFFFFF)], "CHANNEL: cannot bind port 4294967295 of domain 1"


def _bound_port(rig: Rig) -> tuple[list[Frame | bytes], str]:
    port = rig.vm.bind_unbound_port(HOST)
    rig.hv.bind_interdomain(HOST, VM, port)  # something else in domain 0 took it
    return [hello(), Channel(port)], f"CHANNEL: cannot bind port {port} of domain 1"


def _second_channel(rig: Rig) -> tuple[list[Frame | bytes], str]:
    return [hello(), Channel(rig.vm.bind_unbound_port(HOST)),
            Channel(rig.vm.bind_unbound_port(HOST))], "a second CHANNEL"


def _started(frames: list[Frame | bytes], rig: Rig) -> list[Frame | bytes]:
    return [hello(), Channel(rig.vm.bind_unbound_port(HOST)), Open(1), *frames]


def _data_never_opened(rig: Rig) -> tuple[list[Frame | bytes], str]:
    return _started([Data(9, b"x")], rig), "DATA for connection 9, which was never opened"


def _pool_never_opened(rig: Rig) -> tuple[list[Frame | bytes], str]:
    area = rig.vm.share(HOST, 1)
    return _started([Pool(9, VM, 1, PAGE, 0, area.refs)], rig), \
        "POOL for connection 9, which was never opened"


def _open_again(rig: Rig) -> tuple[list[Frame | bytes], str]:
    return _started([Open(1)], rig), "OPEN of connection 1: ids only grow (the last was 1)"


def _open_lower(rig: Rig) -> tuple[list[Frame | bytes], str]:
    return _started([Open(5), Open(3)], rig), "OPEN of connection 3: ids only grow"


def _ack_unearned(rig: Rig) -> tuple[list[Frame | bytes], str]:
    return _started([Ack(1, 1)], rig), "ACK of 1 bytes for connection 1: more than was sent"


def _pipe_host_parity(rig: Rig) -> tuple[list[Frame | bytes], str]:
    return _started([Pipe(1, 1, PipeEnd.READ), Data(1, b"\0" * 8)], rig), \
        "PIPE 1: that id is one this side allocates"


def _pipe_not_growing(rig: Rig) -> tuple[list[Frame | bytes], str]:
    return _started([Pipe(1, 4, PipeEnd.READ), Pipe(1, 2, PipeEnd.WRITE)], rig), \
        "PIPE 2: ids only grow"


def _pipe_data_unknown(rig: Rig) -> tuple[list[Frame | bytes], str]:
    return _started([PipeData(4, b"x")], rig), "PIPE_DATA for pipe 4, which was never announced"


def _pipe_ack_unknown(rig: Rig) -> tuple[list[Frame | bytes], str]:
    return _started([PipeAck(3, 1)], rig), "PIPE_ACK for pipe 3, which was never announced"


def _pipe_end_unknown(rig: Rig) -> tuple[list[Frame | bytes], str]:
    return _started([PipeClosed(6)], rig), "PIPE_END for pipe 6, which was never announced"


def _pipe_data_wrong_way(rig: Rig) -> tuple[list[Frame | bytes], str]:
    # The fd was a WRITE end: the compositor gets one too, and its data flows to the VM.
    return _started([Pipe(1, 2, PipeEnd.WRITE), PipeData(2, b"x")], rig), \
        "PIPE_DATA for pipe 2, whose data goes the other way"


def _garbage(rig: Rig) -> tuple[list[Frame | bytes], str]:
    return [hello(), b"\xde\xad\xbe\xef" * 8], "frame of unknown kind 44510 (flags 0xefbe"


def _garbage_first(rig: Rig) -> tuple[list[Frame | bytes], str]:
    return [b"GET / HTTP/1.1\r\n\r\n"], "frame of unknown kind"


def _huge_data(rig: Rig) -> tuple[list[Frame | bytes], str]:
    return _started([header(0xFFFFFFFF, Kind.DATA, 1)], rig), \
        "DATA frame: body of 4294967295 bytes, must be 1..65536"


def _huge_pool(rig: Rig) -> tuple[list[Frame | bytes], str]:
    return _started([header(0xFFFFFFF0, Kind.POOL, 1)], rig), \
        "POOL frame: body of 4294967280 bytes, must be 20..4194320"


def _huge_file(rig: Rig) -> tuple[list[Frame | bytes], str]:
    return _started([header(4 * 1024 * 1024 + 1, Kind.FILE, 1)], rig), \
        "FILE frame: body of 4194305 bytes, must be 0..4194304"


def _flags(rig: Rig) -> tuple[list[Frame | bytes], str]:
    return _started([header(1, Kind.DATA, 1, flags=1) + b"x"], rig), \
        "DATA frame: flags 0x0001, must be 0"


def _conn_zero(rig: Rig) -> tuple[list[Frame | bytes], str]:
    return _started([header(0, Kind.OPEN, 0)], rig), "OPEN frame: conn 0, must be a connection id"


def _pool_bad_size(rig: Rig) -> tuple[list[Frame | bytes], str]:
    body = struct.pack("<IIIII", VM, 1, 2 * PAGE, 0, 8)
    return _started([header(len(body), Kind.POOL, 1) + body], rig), \
        "POOL frame: size 8192, must be 4096 per ref (1 refs: 4096)"


def _pool_notify_outside(rig: Rig) -> tuple[list[Frame | bytes], str]:
    body = struct.pack("<IIIII", VM, 1, PAGE, PAGE, 8)
    return _started([header(len(body), Kind.POOL, 1) + body], rig), \
        "POOL frame: notify_offset 4096, must be below size 4096"


def _pool_id_zero(rig: Rig) -> tuple[list[Frame | bytes], str]:
    body = struct.pack("<IIIII", VM, 0, PAGE, 0, 8)
    return _started([header(len(body), Kind.POOL, 1) + body], rig), \
        "POOL frame: pool_id 0, must be nonzero"


def _close_not_utf8(rig: Rig) -> tuple[list[Frame | bytes], str]:
    return _started([header(2, Kind.CLOSE, 1) + b"\xff\xfe"], rig), \
        "CLOSE frame: reason is not valid UTF-8"


def _with_a_pool_handed_over(rig: Rig) -> tuple[list[Frame | bytes], str]:
    """A fatal frame while Weston maps a pool: everything still goes."""
    port = rig.vm.bind_unbound_port(HOST)
    rig.send(hello(), Channel(port), Open(1))
    names = with_globals(rig)
    area = rig.vm.share(HOST, 2)
    rig.send(Pool(1, VM, 1, 2 * PAGE, 0, area.refs), Data(1, create_pool(names, 2 * PAGE)))
    rig.until(lambda: rig.answered(1, 6), "Weston to take the pool")
    assert rig.half.counters.pools_mapped == 1
    return [header(3, Kind.DATA) + b"abc"], "DATA frame: conn 0, must be a connection id"


@pytest.mark.parametrize("hostile", [
    _before_hello, _channel_before_hello, _second_hello, _no_common_version, _reserved_domid,
    _port_for_another_domain, _no_such_port, _bound_port, _second_channel,
    _data_never_opened, _pool_never_opened, _open_again, _open_lower, _ack_unearned,
    _pipe_host_parity, _pipe_not_growing, _pipe_data_unknown, _pipe_ack_unknown,
    _pipe_end_unknown, _pipe_data_wrong_way, _garbage, _garbage_first, _huge_data,
    _huge_pool, _huge_file, _flags, _conn_zero, _pool_bad_size, _pool_notify_outside,
    _pool_id_zero, _close_not_utf8, _with_a_pool_handed_over,
], ids=lambda f: f.__name__.strip("_"))
def test_a_malformed_stream_ends_with_an_error_naming_the_fault(
        hostile: Callable[[Rig], tuple[list[Frame | bytes], str]], weston: HeadlessWeston,
        tmp_path: Path) -> None:
    rig = Rig(weston, tmp_path)
    try:
        frames, fault = hostile(rig)
        rig.send(*frames)
        rig.until(lambda: rig.half.done.done(), "the host to end the stream")
        rig.turn()
        errors = rig.of(Error)
        assert len(errors) == 1 and rig.received[-1] == errors[0], rig.received
        assert fault in errors[0].text, errors[0].text
        assert rig.reason == f"the other half broke the protocol: {errors[0].text}"
        assert rig.half.link.ended
        # The host holds nothing for the stream any more, and reads no more of it.
        assert rig.half.link._decoder.pending == 0
        assert rig.finish() == rig.reason
        if rig.backend is not None:
            assert rig.half.port is None
    finally:
        rig.close()
    weston_serves(weston)


# -- endings that let go of what was handed to Weston ------------------------------------------


def _handed_over(rig: Rig, pages: int = 2) -> tuple[int, Any]:
    """A pool mapped and made a wl_shm_pool by Weston; the VM's port and its area."""
    port = start(rig)
    names = with_globals(rig)
    area = rig.vm.share(HOST, pages)
    area.memory[0] = 1
    rig.send(Pool(1, VM, 1, pages * PAGE, 0, area.refs), Data(1, create_pool(names, pages * PAGE)))
    rig.until(lambda: rig.answered(1, 6), "Weston to take the pool")
    assert display_errors(bytes(rig.wayland[1])) == []
    file_id = rig.hv._mappings[0].pages.file_id
    assert file_id in rig.hv._mapped_by_processes(), "Weston does not map the pool"
    return port, area


@pytest.mark.parametrize("ending", ["vm-closes", "stream-ends", "weston-refuses", "vm-error"])
def test_every_ending_lets_go_of_the_pools_handed_to_weston(
        rig: Rig, weston: HeadlessWeston, ending: str) -> None:
    port, area = _handed_over(rig)
    if ending == "vm-closes":
        rig.send(Close(1, "the client left"))
    elif ending == "stream-ends":
        rig.end()
    elif ending == "weston-refuses":
        # Bytes Weston cannot take: it ends the client, and the host tells the VM.
        rig.send(Data(1, struct.pack("<II", 1, 8 << 16 | 9)))  # wl_display has no request 9
        rig.until(lambda: rig.closes(1), "the host to close the connection")
        assert rig.closes(1) == [""]
        assert display_errors(bytes(rig.wayland[1])), "Weston said nothing"
    elif ending == "vm-error":
        rig.send(Error("the VM side gives up"))
        rig.until(lambda: rig.half.done.done(), "the host to end")
        assert rig.reason == "the VM side reported an error: the VM side gives up"
    rig.until(rig.nothing_mapped, "the pool to go")
    assert area.memory[0] == 0
    assert rig.vm.fired_ports() == [port]
    reason = rig.finish()
    assert reason == (None if ending != "vm-error" else rig.reason)
    assert rig.of(Error) == []
    assert rig.half.counters.pools_unmapped == 1
    weston_serves(weston)


def test_pools_and_files_never_followed_by_bytes_hold_nothing(rig: Rig) -> None:
    """What stands for an fd waits for the next bytes; a CLOSE before them lets it go."""
    start(rig)
    area = rig.vm.share(HOST, 3)
    rig.send(Pool(1, VM, 1, 3 * PAGE, 0, area.refs), File(1, b"keymap"),
             Pool(1, VM, 2, PAGE, 0, area.refs[:1]), Pipe(1, 2, PipeEnd.WRITE))
    rig.until(lambda: len(rig.half.connections[1].pending_fds) == 4, "the fds to wait")
    assert rig.half.counters.pages_mapped == 4
    rig.send(Close(1, ""))
    rig.until(rig.nothing_mapped, "the pools to go")
    assert rig.finish() is None
    assert rig.half.counters.pools_unmapped == 2


def test_the_stream_ending_inside_a_frame_is_a_fault(rig: Rig) -> None:
    start(rig)
    rig.send(encode(Data(1, request(1, "wl_display", "sync", 3)))[:-3])
    reason = rig.finish()
    assert reason == ("the stream ended inside a frame: DATA frame: EOF inside its body "
                      "(9 of 12 bytes)")


def test_an_error_from_the_vm_side_ends_the_stream_without_an_answer(rig: Rig) -> None:
    start(rig)
    rig.send(Error("the client side is shutting down"))
    assert rig.finish() == "the VM side reported an error: the client side is shutting down"
    assert rig.of(Error) == []


def test_a_hello_from_another_domain_than_the_pinned_one_ends_the_stream(
        weston: HeadlessWeston, tmp_path: Path) -> None:
    rig = Rig(weston, tmp_path, peer_domid=3)
    try:
        rig.send(hello(VM), Channel(rig.vm.bind_unbound_port(HOST)), Open(1))
        reason = rig.finish()
        assert rig.of(Error)[0].text == "HELLO from domain 1, but this host serves domain 3"
        assert reason == f"the other half broke the protocol: {rig.of(Error)[0].text}"
        assert rig.asked == []
    finally:
        rig.close()


def test_a_mapping_side_that_cannot_open_ends_the_stream_saying_why(
        weston: HeadlessWeston, tmp_path: Path) -> None:
    rig = Rig(weston, tmp_path, backend_fails=ForeignKernelError(
        "no running simulated kernel under /nowhere hosts domain 1"))
    try:
        rig.send(hello(), Channel(rig.vm.bind_unbound_port(HOST)), Open(1))
        reason = rig.finish()
        assert rig.asked == [VM]
        text = ("cannot open the mapping side for domain 1: no running simulated kernel "
                "under /nowhere hosts domain 1")
        assert rig.of(Error) == [Error(text)]
        assert reason is not None and reason.endswith(text)
    finally:
        rig.close()


# -- faults found here: the tests say what the host should do (patches in the report) ---------


def test_the_vm_side_cannot_write_lines_into_the_hosts_log(rig: Rig) -> None:
    start(rig)
    rig.send(Error("bye\nqubesshm host: a forged line"))
    rig.until(lambda: rig.half.done.done(), "the host to end")
    reason = rig.reason
    assert reason is not None and "\n" not in reason and "bye" in reason, reason
    rig.finish()


def test_a_fault_of_the_host_is_not_blamed_on_the_vm_side(weston: HeadlessWeston,
                                                          tmp_path: Path) -> None:
    rig = Rig(weston, tmp_path, backend_fails=ForeignKernelError("no gntdev here"))
    try:
        rig.send(hello())
        reason = rig.finish()
        assert reason == "cannot open the mapping side for domain 1: no gntdev here", reason
    finally:
        rig.close()


def test_more_fds_than_their_bytes_can_carry_end_the_connection(rig: Rig) -> None:
    start(rig)
    rig.send(*[File(1, b"x") for _ in range(29)], Data(1, b"\0"))
    rig.until(lambda: rig.closes(1) or rig.errors, "the connection to be refused")
    errors, rig.errors[:] = list(rig.errors), []
    assert not errors, errors
    assert "29" in rig.closes(1)[0], rig.closes(1)
    serves(rig, 2)
    assert rig.finish() is None


def test_fds_waiting_for_their_bytes_are_bounded(rig: Rig) -> None:
    start(rig)
    rig.send(*[File(1, b"") for _ in range(1100)])
    rig.until(lambda: rig.closes(1) or 1 not in rig.half.connections
              or len(rig.half.connections[1].pending_fds) == 1100, "the files to be taken")
    assert rig.closes(1), f"{len(rig.half.connections[1].pending_fds)} fds held"
    serves(rig, 2)
    assert rig.finish() is None


def test_connections_at_once_are_bounded(rig: Rig, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(host_module, "MAX_CONNECTIONS", 2)
    start(rig)
    rig.send(Open(2), Open(3))
    rig.until(lambda: rig.closes(3), "the third connection to be refused")
    assert "more than 2 clients of this VM at once" in rig.closes(3)[0]
    assert 2 in rig.half.connections and 3 not in rig.half.connections
    rig.send(Close(2, ""))
    serves(rig, 4)
    assert rig.finish() is None


@contextlib.contextmanager
def fd_limit(spare: int) -> Iterator[None]:
    """This process may open only ``spare`` more fds."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (len(os.listdir("/proc/self/fd")) + spare, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


@pytest.mark.parametrize("what", ["open", "file", "pipe", "pool"])
def test_running_out_of_fds_refuses_connections(rig: Rig, what: str) -> None:
    start(rig)
    area = rig.vm.share(HOST, 1)
    # A pool takes two fds (the mapping's, and the compositor's copy): an odd and an
    # even number to spare make each of them the one that fails.
    for conn, spare in ((2, 20), (50, 21)):
        rig.send(Open(conn))
        items: list[Frame]
        if what == "open":
            items = [Open(conn + n) for n in range(1, 40)]
        elif what == "file":
            items = [File(conn, b"x") for _ in range(40)]
        elif what == "pipe":
            items = [Pipe(conn, 2 * n + 100 * conn, PipeEnd.WRITE) for n in range(1, 40)]
        else:
            items = [Pool(conn, VM, n + 100 * conn, PAGE, 0, area.refs) for n in range(1, 40)]

        def refused(before: int = len(rig.of(Close))) -> bool:
            return bool(rig.errors) or len(rig.of(Close)) > before

        with fd_limit(spare):
            rig.send(*items)
            rig.until(refused, "a connection to be refused")
        errors, rig.errors[:] = list(rig.errors), []
        assert not errors, errors
        assert "Too many open files" in rig.of(Close)[-1].reason, rig.of(Close)
        rig.send(Close(conn, ""))
    serves(rig, 100)
    assert rig.finish() is None


# -- fuzz: a valid start, then frames of every kind near the edges, and raw mutations ----------

# Fixed by a fresh hypervisor: what the VM shares in each example, before the stream starts.
SHARED = (8, 9, 10)  # 3 pages for the host
ELSEWHERE = (11,)  # 1 page for domain 5
READ_ONLY = (12,)  # 1 page for the host, read-only
FUZZ_MAX_PAGES = 6
U32 = 0xFFFFFFFF

# Wayland requests as tokens, made into bytes with the ids the connection has in use.
Token = tuple[Any, ...]

conns = st.sampled_from([1, 1, 1, 1, 2, 3, U32])
texts = st.text(st.characters(codec="utf-8", exclude_characters="\n"), max_size=40)
sizes = st.sampled_from([0, 1, PAGE - 1, PAGE, 2 * PAGE, 3 * PAGE, 4 * PAGE, 0x7FFFFFFF,
                         -1, -PAGE])
small = st.sampled_from([0, 1, 2, 7, 64, 0x7FFFFFFF, -1])
tokens: st.SearchStrategy[Token] = st.one_of(
    st.tuples(st.just("sync")),
    st.tuples(st.just("create_pool"), sizes),
    st.tuples(st.just("create_buffer"), st.integers(0, 3), small, small, small, small),
    st.tuples(st.just("resize"), st.integers(0, 3), sizes),
    st.tuples(st.just("destroy"), st.integers(0, 3)),
    st.tuples(st.just("raw"), st.sampled_from([1, 2, 3, 99]), st.integers(0, 10),
              st.binary(max_size=24)),
)
ref_lists = st.one_of(
    st.integers(1, 3).map(lambda n: SHARED[:n]),
    st.just(SHARED[1:]), st.just(ELSEWHERE), st.just(READ_ONLY),
    st.just((SHARED[0], SHARED[0])), st.just((*SHARED, 999)),
    st.lists(st.sampled_from([0, 7, 8, 13, 4095, 0x7FFFFFFF, U32]), min_size=1, max_size=4)
    .map(tuple),
    st.integers(FUZZ_MAX_PAGES + 1, 3000).map(lambda n: tuple(range(8, 8 + n))),
)
pool_ids = st.sampled_from([1, 2, 3, 7, U32])
pipe_ids = st.sampled_from([1, 2, 3, 4, 6, 8, U32 - 1, U32])


@st.composite
def pools(draw: st.DrawFn) -> Pool:
    refs = draw(ref_lists)
    size = len(refs) * PAGE
    notify = draw(st.sampled_from([0, size - 1, PAGE, size // 2]).filter(lambda n: n < size))
    domid = draw(st.sampled_from([VM, VM, VM, HOST, 5, 0x7FEF]))
    return Pool(draw(conns), domid, draw(pool_ids), size, notify, refs)


hostile_frames: st.SearchStrategy[Any] = st.one_of(
    st.builds(lambda conn, toks: ("data", conn, toks, False), conns,
              st.lists(tokens, min_size=1, max_size=4)),
    pools(),
    st.builds(Unmap, conns, pool_ids),
    st.builds(Open, st.sampled_from([1, 2, 3, 4, U32])),
    st.builds(Close, conns, texts),
    st.builds(Ack, conns, st.sampled_from([1, 4096, 1 << 19, U32])),
    st.builds(File, conns, st.binary(max_size=64)),
    st.builds(Pipe, conns, pipe_ids, st.sampled_from(PipeEnd)),
    st.builds(PipeData, pipe_ids, st.binary(min_size=1, max_size=64)),
    st.builds(PipeClosed, pipe_ids),
    st.builds(PipeAck, pipe_ids, st.sampled_from([1, 64 * 1024, U32])),
    st.builds(Error, texts),
    st.builds(Hello, st.sampled_from([0, 1, 2]), st.sampled_from([1, 2, U16_MAX]),
              st.sampled_from([VM, HOST, 5])).filter(lambda h: h.version_min <= h.version_max),
    st.builds(Channel, st.sampled_from([0, 1, 2, U32])),
    st.builds(lambda length, kind, flags, conn, body: header(length, kind, conn, flags) + body,
              st.sampled_from([0, 1, 4, 12, 20, 24, 0x10000, 0x10001, U32]),
              st.integers(0, 16), st.sampled_from([0, 0, 0, 1, 0x8000]),
              st.sampled_from([0, 1, 2, U32]), st.binary(max_size=32)),
)
# What a VM side would send, mostly: a pool handed to Weston, released, requests.
likely_frames: st.SearchStrategy[Any] = st.one_of(
    st.builds(lambda pages, notify: ("handover", pages, notify), st.integers(1, 3),
              st.sampled_from([0, 1, -1])),
    st.builds(lambda index: ("release", index), st.integers(0, 3)),
    st.builds(lambda conn, toks: ("data", conn, toks, True), st.sampled_from([1, 1, 2]),
              st.lists(tokens, min_size=1, max_size=4)),
    st.builds(File, st.just(1), st.binary(max_size=16)),
    st.builds(lambda end: ("pipe", end), st.sampled_from(PipeEnd)),
    st.just(("open",)),
    st.builds(lambda text: ("close", text), texts),
)




@st.composite
def frames(draw: st.DrawFn) -> Any:
    """One frame in seven hostile: most examples get a few frames in, to where pools
    are mapped and handed over, before something breaks."""
    return draw(hostile_frames if draw(st.integers(0, 6)) == 6 else likely_frames)


mutations = st.lists(st.tuples(st.sampled_from(["flip", "u32", "cut", "drop", "repeat"]),
                               st.floats(0, 1), st.sampled_from([0, 1, 0xFF, 0x7FFF, U32])),
                     max_size=3)


@st.composite
def maybe_mutations(draw: st.DrawFn) -> list[tuple[str, float, int]]:
    """Raw edits of one stream in three."""
    return draw(mutations) if draw(st.integers(0, 2)) == 2 else []


class Client:
    """Wayland ids in use on one connection, to make tokens into plausible requests."""

    def __init__(self, shm_name: int) -> None:
        self.shm_name = shm_name
        self.next_id = 2
        self.shm: int | None = None
        self.pools: list[int] = []

    def new(self) -> int:
        self.next_id += 1
        return self.next_id

    def start(self) -> bytes:
        self.next_id = 2
        self.shm = self.new()
        return (request(1, "wl_display", "get_registry", 2)
                + bind(self.shm_name, "wl_shm", 1, self.shm))

    def render(self, token: Token) -> bytes:
        name = token[0]
        if name == "raw":  # a message of any object, opcode and body
            body = bytes(token[3]) + bytes(-len(token[3]) % 4)
            return struct.pack("<II", token[1], (8 + len(body)) << 16 | token[2]) + body
        if name == "sync":
            return request(1, "wl_display", "sync", self.new())
        if name == "create_pool":
            first = self.start() if self.shm is None else b""
            assert self.shm is not None
            pool = self.new()
            self.pools.append(pool)
            return first + request(self.shm, "wl_shm", "create_pool", pool, -1, token[1])
        pool = self.pools[token[1] % len(self.pools)] if self.pools else 99
        if name == "create_buffer":
            return request(pool, "wl_shm_pool", "create_buffer", self.new(), *token[2:], 1)
        if name == "resize":
            return request(pool, "wl_shm_pool", "resize", token[2])
        assert name == "destroy"
        return request(pool, "wl_shm_pool", "destroy")


def render(stream: list[Any], shm_name: int, port: int) -> tuple[bytes, int]:
    """The stream's bytes, ending with a sync on the first connection; its callback."""
    clients: dict[int, Client] = {1: Client(shm_name)}
    handed: list[tuple[int, int]] = []  # wl_shm_pool and pool id, of the first connection
    next_pool = 0
    next_pipe = 0
    out = bytearray(encode(hello()) + encode(Channel(port)) + encode(Open(1))
                    + encode(Data(1, clients[1].start())))
    for frame in stream:
        if isinstance(frame, tuple) and frame[0] == "handover":
            _, pages, notify = frame
            size = pages * PAGE
            pool_id = next_pool = next_pool + 1
            out += encode(Pool(1, VM, pool_id, size, notify % size, SHARED[:pages]))
            out += encode(Data(1, clients[1].render(("create_pool", size))
                               + clients[1].render(("sync",))))
            handed.append((clients[1].pools[-1], pool_id))
        elif isinstance(frame, tuple) and frame[0] == "pipe":
            next_pipe += 2
            out += encode(Pipe(1, next_pipe, frame[1]))
        elif isinstance(frame, tuple) and frame[0] == "open":
            if max(clients) < U32:
                conn = max(clients) + 1
                clients[conn] = Client(shm_name)
                out += encode(Open(conn))
        elif isinstance(frame, tuple) and frame[0] == "close":
            if max(clients) > 1:  # the newest connection but the first
                out += encode(Close(max(clients), frame[1]))
        elif isinstance(frame, tuple) and frame[0] == "release":
            if handed:
                wl_pool, pool_id = handed.pop(frame[1] % len(handed))
                out += encode(Data(1, request(wl_pool, "wl_shm_pool", "destroy")))
                out += encode(Unmap(1, pool_id))
        elif isinstance(frame, tuple):
            _, conn, toks, likely = frame
            if likely and conn > max(clients):
                out += encode(Open(conn))  # what a VM side would have sent first
            client = clients.setdefault(conn, Client(shm_name))
            data = b"" if client.shm is not None else client.start()
            data += b"".join(client.render(token) for token in toks)
            out += encode(Data(conn, data[:MAX_DATA]))
        elif isinstance(frame, bytes):
            out += frame
        else:
            if isinstance(frame, Open):
                clients.setdefault(frame.conn, Client(shm_name))
            out += encode(frame)
    last = clients[1].new()
    out += encode(Data(1, request(1, "wl_display", "sync", last)))
    return bytes(out), last


def mutate(data: bytes, edits: list[tuple[str, float, int]], keep: int) -> bytes:
    """Raw edits past the first ``keep`` bytes (or anywhere, for a few)."""
    out = bytearray(data)
    for op, where, value in edits:
        start = 0 if value == 0 else keep
        if len(out) <= start:
            break
        pos = start + int(where * (len(out) - start - 1))
        if op == "flip":
            out[pos] ^= (value & 0xFF) or 0x80
        elif op == "u32":
            out[pos:pos + 4] = struct.pack("<I", value)
        elif op == "cut":
            del out[pos:]
        elif op == "drop":
            del out[pos:pos + 1 + value % 16]
        else:
            out[pos:pos] = out[pos:pos + 1 + value % 64]
    return bytes(out)


def decoded(data: bytes) -> list[Frame]:
    """The frames at the start of ``data`` that decode."""
    decoder = Decoder()
    found: list[Frame] = []
    for at in range(0, len(data), 1):
        try:
            found += decoder.feed(data[at:at + 1])
        except StreamError:
            break
    return found


_SHM_NAME: list[int] = []


def shm_name(weston: HeadlessWeston) -> int:
    """wl_shm's global name in the session's Weston (asked once)."""
    if not _SHM_NAME:
        root = Path(tempfile.mkdtemp(prefix="qshm-host-"))
        rig = Rig(weston, root)
        try:
            start(rig)
            _SHM_NAME.append(with_globals(rig)["wl_shm"])
            rig.finish()
        finally:
            rig.close()
            shutil.rmtree(root, ignore_errors=True)
    return _SHM_NAME[0]


def test_a_fuzzed_stream_never_harms_the_host(weston: HeadlessWeston) -> None:
    name = shm_name(weston)
    stats = {"examples": 0, "refused": 0, "fatal": 0, "mapped": 0, "weston refused": 0}

    @settings(max_examples=150, deadline=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(st.lists(frames(), max_size=40), maybe_mutations())
    def run(stream: list[Any], edits: list[tuple[str, float, int]]) -> None:
        root = Path(tempfile.mkdtemp(prefix="qshm-host-"))
        rig = Rig(weston, root, max_pages=FUZZ_MAX_PAGES)
        try:
            assert rig.vm.share(HOST, 3).refs == SHARED
            assert rig.vm.share(5, 1).refs == ELSEWHERE
            assert rig.vm.share(HOST, 1, writable=False).refs == READ_ONLY
            port = rig.vm.bind_unbound_port(HOST)
            prefix = len(render([], name, port)[0]) - 24  # the start, less its sync
            data, last = render(stream, name, port)
            data = mutate(data, edits, prefix)
            rig.send(data)
            if not edits:
                # Weston answers the last sync, or the first connection or the stream
                # ended first: then all that came before it was handed over.
                rig.until(lambda: rig.answered(1, last) or rig.half.done.done() or (
                    rig.half.counters.connections and 1 not in rig.half.connections),
                    "the last sync")
            reason = rig.finish()  # one line
            # The host speaks only of connections the VM side opened.
            opened = {frame.conn for frame in decoded(data) if isinstance(frame, Open)}
            assert {frame.conn for frame in rig.received
                    if isinstance(frame, Close | Data | Ack | File | Pipe)} <= opened
            stats["examples"] += 1
            stats["refused"] += rig.half.counters.refused
            stats["fatal"] += reason is not None
            stats["weston refused"] += any(display_errors(bytes(said))
                                           for said in rig.wayland.values())
            stats["mapped"] += rig.half.counters.pools_mapped
        finally:
            rig.close()
            shutil.rmtree(root, ignore_errors=True)
        assert weston.process is not None and weston.process.poll() is None

    run()
    print(f"fuzz: {stats}")
    # The strategies reach what they are for: pools mapped and handed to Weston, refused
    # connections, streams that end well and streams that break.
    assert stats["examples"] >= 100 and stats["mapped"] >= 5, stats
    assert stats["fatal"] >= 5 and stats["examples"] - stats["fatal"] >= 5, stats
    weston_serves(weston)


# -- the real process ---------------------------------------------------------------------------


def host_env(weston: HeadlessWeston, root: Path) -> dict[str, str]:
    """Weston's environment, with a private simulated-kernel root holding no kernel."""
    env = weston.env()
    env.pop("QUBESSHM_SIM_HYPERVISOR", None)
    env["QUBESSHM_SIM_ROOT"] = str(root)
    env["QUBESSHM_GRANTS"] = "sim"
    env["PYTHONPATH"] = str(REPO)
    return env


@pytest.fixture
def sim_root() -> Iterator[Path]:
    # Short and private: the simulated kernels' directory (none is running there).
    root = Path(tempfile.mkdtemp(prefix="qshm-"))
    root.chmod(0o700)
    yield root
    shutil.rmtree(root, ignore_errors=True)


def run_host(weston: HeadlessWeston, root: Path, stdin: bytes | int,
             *extra: str) -> tuple[int, bytes, str]:
    """``qubesshm host``'s exit status, what it wrote on the stream, and its stderr."""
    command = [sys.executable, "-m", "qubesshm", "host", "--upstream", weston.socket_name,
               *extra]
    if isinstance(stdin, int):
        done = subprocess.run(command, stdin=stdin, capture_output=True, env=host_env(
            weston, root), timeout=60, check=False)
    else:
        done = subprocess.run(command, input=stdin, capture_output=True, env=host_env(
            weston, root), timeout=60, check=False)
    return done.returncode, done.stdout, done.stderr.decode(errors="replace")


def stream_frames(data: bytes) -> list[Frame]:
    decoder = Decoder()
    frames = decoder.feed(data)
    decoder.eof()
    return frames


def test_the_host_process_refuses_garbage_in_one_line(weston: HeadlessWeston,
                                                      sim_root: Path) -> None:
    status, out, err = run_host(weston, sim_root, b"GET / HTTP/1.1\r\nHost: qubes\r\n\r\n")
    assert status == 1, err
    assert "Traceback" not in err
    assert err.count("\n") == 1 and err.startswith("qubesshm host: "), err
    assert "frame of unknown kind" in err, err
    frames = stream_frames(out)
    assert frames[0] == Hello(VERSION, VERSION, HOST)
    assert isinstance(frames[-1], Error) and "frame of unknown kind" in frames[-1].text
    weston_serves(weston)


def test_the_host_process_says_it_finds_no_simulated_kernel(weston: HeadlessWeston,
                                                            sim_root: Path) -> None:
    status, out, err = run_host(weston, sim_root, encode(hello()))
    assert status == 1, err
    assert "Traceback" not in err
    assert err.count("\n") == 1 and err.startswith("qubesshm host: "), err
    assert "no running simulated kernel" in err and "domain 1" in err, err
    assert str(sim_root) in err, err
    frames = stream_frames(out)
    assert frames[0] == Hello(VERSION, VERSION, HOST)
    weston_serves(weston)


def test_the_host_process_refuses_a_terminal_for_its_stream(weston: HeadlessWeston,
                                                            sim_root: Path) -> None:
    controller, terminal = pty.openpty()
    try:
        status, out, err = run_host(weston, sim_root, terminal)
    finally:
        os.close(controller)
        os.close(terminal)
    assert status == 2, err
    assert "Traceback" not in err
    assert err.count("\n") == 1, err
    assert "terminal" in err and "serve --remote" in err, err
    assert out == b""


def test_a_vm_side_past_its_credit_cannot_fill_the_host(weston: HeadlessWeston,
                                                          tmp_path: Path) -> None:
    """A compositor that stops reading (a stub here: Weston always reads) must not let the
    VM side put more than its window in the host."""
    stub = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stub.bind(str(tmp_path / "stub"))
    stub.listen()
    root = tmp_path / "sim"
    root.mkdir(mode=0o700)
    rig = Rig(weston, root)
    rig.half.upstream = tmp_path / "stub"
    try:
        start(rig)
        accepted, _ = stub.accept()
        chunk = request(1, "wl_display", "sync", 3) * (MAX_DATA // 12)
        held = 0
        for _ in range(64):  # 4 MiB, with no credit back past the first window
            rig.send(Data(1, chunk))
            rig.turn()
            connection = rig.half.connections.get(1)
            if connection is not None and connection.transport is not None:
                held = max(held, connection.transport.queued_bytes)
        rig.until(lambda: rig.half.done.done() or not rig._out, "the VM side's bytes to go")
        assert held <= WINDOW, f"the host held {held} bytes for the compositor"
        assert rig.half.done.done() and rig.of(Error), rig.received
        assert "past its credit" in rig.of(Error)[0].text
        accepted.close()
        rig.finish()
    finally:
        rig.close()
        stub.close()
