"""Grant-backed buffers in the sans-IO session: what the compositor and the client get.

A ``RelaySession`` with both grant halves on a simulated hypervisor (fake clock,
fake ``/proc/<pid>/maps``) is driven with encoded messages; a ``FakeCompositor``
decodes what it sends upstream (tracking the upstream ids it creates) and reads
the pools it is given, so every check is on bytes: the pixels in grant pages,
the ids on each connection, the errors a hostile client gets, and the grant
counters through an output buffer's life.
"""

from __future__ import annotations

import fcntl
import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from messages import PROTO, assert_client_error, frames_of, joined, parse_error, request

from qubesshm.grants.api import PAGE_SIZE
from qubesshm.grants.halves import sim_halves
from qubesshm.grants.ledger import GrantLedger
from qubesshm.grants.lifetimes import GrantLifetimes
from qubesshm.grants.simulated import SimHypervisor
from qubesshm.objects.objectmap import SERVER_ID_MIN
from qubesshm.pixels.region import MAX_RECTS
from qubesshm.relay.session import RelaySession, Step, carries_sync
from qubesshm.shm import bridge
from qubesshm.shm.clientpool import MAX_SPENT_POOLS
from qubesshm.shm.outputs import MAX_OUTPUTS_PER_SURFACE
from qubesshm.wire.codec import (
    ArgValue,
    ErrorCode,
    Fixed,
    UntypedNewId,
    WireReader,
    decode_args,
    encode_message,
)
from qubesshm.wire.protocol import (
    ArgKind,
    InterfaceSpec,
    MessageSpec,
    ProtocolTable,
    parse_protocol_file,
)

# Every test here holds for the relay's fast path and for its full path.
pytestmark = pytest.mark.usefixtures("both_relay_paths")

COMPOSITOR_PID = 4242
XRGB = 1
INVALID_STRIDE, INVALID_FD = 1, 2
FileId = tuple[int, int]


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def ev_spec(interface: str, name: str) -> MessageSpec:
    return next(m for m in PROTO[interface].events if m.name == name)


def event(object_id: int, interface: str, name: str, *args: ArgValue) -> bytes:
    data, fds = encode_message(object_id, ev_spec(interface, name), list(args))
    assert not fds
    return data


def req(object_id: int, interface: str, name: str, *args: ArgValue) -> tuple[bytes, list[int]]:
    return request(object_id, interface, name, *args)


@dataclass
class Received:
    object_id: int
    interface: str
    name: str
    args: list[ArgValue]


@dataclass
class FakeCompositor:
    """Decodes the proxy's upstream stream as a libwayland server would see it."""

    objects: dict[int, InterfaceSpec] = field(default_factory=dict)
    reader: WireReader = field(default_factory=lambda: WireReader(1 << 16))
    pools: dict[int, tuple[int, int]] = field(default_factory=dict)  # id -> (fd, size)
    buffers: dict[int, tuple[int, int, int, int, int, int]] = field(default_factory=dict)
    next_fresh: int = 2  # libwayland's count: a new id may not go past it

    def __post_init__(self) -> None:
        self.objects[1] = PROTO["wl_display"]

    def take(self, step: Step) -> list[Received]:
        data, fds = joined(step.to_compositor)
        self.reader.feed(data, fds)
        out = []
        while (head := self.reader.peek()) is not None:
            object_id, opcode, size = head
            iface = self.objects[object_id]
            spec = iface.requests[opcode]
            taken = self.reader.take(size, spec.fd_count)
            assert taken is not None
            frame, msg_fds = taken
            args = decode_args(spec, frame.data, msg_fds)
            for arg, value in zip(spec.args, args, strict=True):
                if arg.kind is ArgKind.NEW_ID:
                    new = value.id if isinstance(value, UntypedNewId) else value
                    name = value.interface if isinstance(value, UntypedNewId) else arg.interface
                    assert isinstance(new, int) and name is not None
                    assert new not in self.objects, f"id {new} reused while live upstream"
                    assert new <= self.next_fresh, f"id {new} skips past {self.next_fresh}"
                    self.next_fresh = max(self.next_fresh, new + 1)
                    self.objects[new] = PROTO[name]
            if (iface.name, spec.name) == ("wl_shm", "create_pool"):
                new_id, fd, pool_size = args
                assert isinstance(new_id, int) and isinstance(fd, int)
                assert isinstance(pool_size, int)
                self.pools[new_id] = (fd, pool_size)
            if (iface.name, spec.name) == ("wl_shm_pool", "create_buffer"):
                new_id, *geometry = args
                assert isinstance(new_id, int)
                self.buffers[new_id] = (object_id, *geometry)  # type: ignore[assignment]
            out.append(Received(object_id, iface.name, spec.name, args))
        return out

    def pixels(self, buffer_id: int) -> bytes:
        pool_id, offset, _width, height, stride, _ = self.buffers[buffer_id]
        fd, _ = self.pools[pool_id]
        return os.pread(fd, stride * height, offset)

    def pool_file(self, buffer_id: int) -> FileId:
        fd, _ = self.pools[self.buffers[buffer_id][0]]
        st = os.fstat(fd)
        return st.st_dev, st.st_ino

    def close(self) -> None:
        for fd, _ in self.pools.values():
            os.close(fd)
        self.pools.clear()


class World:
    """A client session through the proxy core, with both grant halves simulated."""

    def __init__(self, root: Path, protocol: ProtocolTable = PROTO) -> None:
        self.clock = FakeClock()
        self.mapped: set[FileId] = set()  # what the "compositor process" has mmapped
        self.hv = SimHypervisor(root, clock=self.clock, maps_reader=lambda pid: self.mapped)
        self.hv.params.gntalloc_limit = 1 << 20
        self.halves = sim_halves(self.hv)
        self.halves.watch_compositor(COMPOSITOR_PID)
        self.ledger = GrantLedger()
        self.lifetimes = GrantLifetimes(self.halves, clock=self.clock)
        self.session = RelaySession(protocol, grants=self.lifetimes, clock=self.clock,
                                    counters=(self.ledger.client(1), self.ledger.total))
        self.comp = FakeCompositor()
        self.memfds: list[int] = []
        self.sealed = False
        self._next = 2

    # -- the client side ---------------------------------------------------------------

    def new_id(self) -> int:
        value = self._next
        self._next += 1
        return value

    def send(self, *messages: tuple[bytes, list[int]]) -> tuple[Step, list[Received]]:
        data = b"".join(m[0] for m in messages)
        fds = [fd for m in messages for fd in m[1]]
        step = self.session.from_client(data, fds)
        return step, self.comp.take(step) + self.after(step)

    def events(self, data: bytes) -> Step:
        step = self.session.from_compositor(data)
        self.after(step)
        return step

    def after(self, step: Step) -> list[Received]:
        """What serve does once a step's output went: trim the grant cache, and send
        what that made (the pools of evicted areas destroyed upstream)."""
        self.lifetimes.trim()
        if step.error is not None or self.session.closed:
            return []
        return self.comp.take(self.session.flush())

    def setup(self) -> None:
        registry = self.new_id()
        self.send(req(1, "wl_display", "get_registry", registry))
        self.events(event(registry, "wl_registry", "global", 1, "wl_compositor", 4)
                    + event(registry, "wl_registry", "global", 2, "wl_shm", 1)
                    + event(registry, "wl_registry", "global", 3, "wp_viewporter", 1))
        self.compositor, self.shm, self.viewporter = self.new_id(), self.new_id(), self.new_id()
        self.send(req(registry, "wl_registry", "bind", 1,
                      UntypedNewId("wl_compositor", 4, self.compositor)),
                  req(registry, "wl_registry", "bind", 2, UntypedNewId("wl_shm", 1, self.shm)),
                  req(registry, "wl_registry", "bind", 3,
                      UntypedNewId("wp_viewporter", 1, self.viewporter)))

    def memfd(self, size: int, fill: bytes = b"") -> int:
        fd = os.memfd_create("client-pool", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        os.ftruncate(fd, size)
        if fill:
            os.pwrite(fd, fill, 0)
        if self.sealed:
            # As Weston's clients do: the proxy may then map the pool.
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK)
        self.memfds.append(fd)
        return fd

    def pool(self, size: int, fill: bytes = b"") -> tuple[int, int]:
        """(pool id, memfd): the proxy gets a duplicate, as over a socket."""
        fd = self.memfd(size, fill)
        pool = self.new_id()
        step, got = self.send(req(self.shm, "wl_shm", "create_pool", pool, os.dup(fd), size))
        assert step.error is None, step.error
        assert got == [], "a client pool must not reach the compositor"
        return pool, fd

    def buffer(self, pool: int, offset: int, width: int, height: int, stride: int,
               fmt: int = XRGB) -> tuple[Step, int]:
        buffer = self.new_id()
        step, got = self.send(req(pool, "wl_shm_pool", "create_buffer", buffer, offset,
                                  width, height, stride, fmt))
        assert got == []
        return step, buffer

    def surface(self) -> int:
        surface = self.new_id()
        self.send(req(self.compositor, "wl_compositor", "create_surface", surface))
        return surface

    def commit(self, surface: int, buffer: int | None, *damage: tuple[int, int, int, int],
               surface_damage: bool = False) -> tuple[Step, list[Received]]:
        messages = []
        if buffer is not None:
            messages.append(req(surface, "wl_surface", "attach", buffer, 0, 0))
        for rect in damage:
            name = "damage" if surface_damage else "damage_buffer"
            messages.append(req(surface, "wl_surface", name, *rect))
        messages.append(req(surface, "wl_surface", "commit"))
        return self.send(*messages)

    def close(self) -> None:
        self.session.end()
        self.comp.close()
        for fd in self.memfds:
            os.close(fd)
        self.halves.close()


@pytest.fixture(params=["preadv", "sealed"])
def world(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[World]:
    """Pools of plain memfds (read with preadv) and of sealed ones (mapped)."""
    w = World(tmp_path / "sim")
    w.sealed = request.param == "sealed"
    w.setup()
    yield w
    w.close()


@pytest.fixture
def plain_world(tmp_path: Path) -> Iterator[World]:
    w = World(tmp_path / "sim")
    w.setup()
    yield w
    w.close()


def attached(got: list[Received]) -> int:
    """The output buffer an upstream commit sequence attached."""
    attaches = [m for m in got if (m.interface, m.name) == ("wl_surface", "attach")]
    assert attaches, got
    buffer = attaches[-1].args[0]
    assert isinstance(buffer, int)
    return buffer


def client_events(step: Step) -> list[tuple[int, int, bytes]]:
    """What the step has for the client: the proxy's own delete_ids, then the rest."""
    return [(f.object_id, f.opcode, f.data)
            for f in frames_of(step.own_events + step.to_client)]


def released(step: Step, buffer: int) -> bool:
    return (buffer, 0) in [(o, op) for o, op, _ in client_events(step)]


def pattern(width: int, height: int, seed: int = 0) -> bytes:
    return bytes((x * 7 + y * 13 + seed) & 0xFF for y in range(height) for x in range(width * 4))


# -- the copy ----------------------------------------------------------------------------


def test_commit_copies_into_grant_pages_and_releases_the_client_at_once(world: World) -> None:
    width, height = 61, 17
    stride = width * 4 + 12  # padded rows
    image = pattern(stride // 4, height)
    pool, fd = world.pool(stride * height + 100, b"\x00" * 100 + image)
    _, buffer = world.buffer(pool, 100, width, height, stride)
    surface = world.surface()
    step, got = world.commit(surface, buffer, (0, 0, width, height))
    assert step.error is None, step.error
    names = [(m.interface, m.name) for m in got]
    assert names == [("wl_surface", "damage_buffer"), ("wl_shm", "create_pool"),
                     ("wl_shm_pool", "create_buffer"),
                     ("wl_surface", "attach"), ("wl_surface", "commit")]
    out = attached(got)
    # The upstream pool is a grant mapping of whole pages, and holds the client's pixels.
    pool_fd, pool_size = world.comp.pools[world.comp.buffers[out][0]]
    assert pool_size % PAGE_SIZE == 0 and pool_size >= stride * height
    assert os.fstat(pool_fd).st_size >= pool_size
    shown, drawn = world.comp.pixels(out), os.pread(fd, stride * height, 100)
    for y in range(height):  # the padding at the end of each row is nobody's pixels
        row = slice(y * stride, y * stride + width * 4)
        assert shown[row] == drawn[row], f"row {y}"
    assert released(step, buffer), "the client's buffer is released right after the copy"
    counters = world.ledger.total
    assert counters.early_releases == 1 and counters.commits == 1
    assert counters.bytes_copied == counters.bytes_damaged == width * 4 * height
    assert counters.pages.live == counters.pages.in_use == pool_size // PAGE_SIZE


def test_no_client_fd_reaches_the_compositor(world: World) -> None:
    pool, fd = world.pool(4 * 8 * 8, pattern(8, 8))
    _, buffer = world.buffer(pool, 0, 8, 8, 32)
    _, _got = world.commit(world.surface(), buffer, (0, 0, 8, 8))
    client_file = (os.fstat(fd).st_dev, os.fstat(fd).st_ino)
    assert world.comp.pools, "an upstream pool was made"
    for pool_fd, _ in world.comp.pools.values():
        st = os.fstat(pool_fd)
        assert (st.st_dev, st.st_ino) != client_file


def test_only_damage_is_copied_in_steady_state(world: World) -> None:
    width, height = 1920, 1080
    stride = width * 4
    pool, fd = world.pool(stride * height, pattern(width, 8) * (height // 8))
    _, buffer = world.buffer(pool, 0, width, height, stride)
    surface = world.surface()
    outputs: list[int] = []
    for frame in range(6):
        x, y = 100 + frame, 200 + frame
        os.pwrite(fd, bytes([frame + 1]) * 4, y * stride + x * 4)
        before = world.ledger.total.bytes_copied
        _, got = world.commit(surface, buffer, (x, y, 1, 1))
        out = attached(got)
        copied = world.ledger.total.bytes_copied - before
        if out in outputs:
            # This output last held the frame before the previous one: it lacks the
            # last two 1-pixel changes, and nothing else.
            assert copied == 2 * 4, f"frame {frame}: {copied} bytes copied"
        outputs.append(out)
        assert world.comp.pixels(out) == os.pread(fd, stride * height, 0)
        # The compositor lets go of the output shown before this one.
        if len(outputs) >= 2:
            world.events(event(outputs[-2], "wl_buffer", "release"))
    assert len(set(outputs)) == 2, "two output buffers suffice when releases come"
    assert world.ledger.total.bytes_damaged == 6 * 4


def test_damage_in_surface_coordinates_goes_through_scale_and_transform(world: World) -> None:
    width, height = 40, 20  # buffer; scale 2, transform 90: the surface is 10 x 20
    stride = width * 4
    pool, fd = world.pool(stride * height, pattern(width, height))
    _, buffer = world.buffer(pool, 0, width, height, stride)
    surface = world.surface()
    world.send(req(surface, "wl_surface", "set_buffer_scale", 2),
               req(surface, "wl_surface", "set_buffer_transform", 1))
    _, got = world.commit(surface, buffer, (0, 0, 10, 20), surface_damage=True)
    first = attached(got)
    _, got = world.commit(surface, buffer, (0, 0, 10, 20), surface_damage=True)
    second = attached(got)
    world.events(event(first, "wl_buffer", "release"))
    # Surface pixel (3, 5) with transform 90 on a 10x20 surface is buffer (5, 10-3-1) x2.
    os.pwrite(fd, b"\x01\x02\x03\x04", 14 * stride + 10 * 4)
    before = world.ledger.total.bytes_copied
    _, got = world.commit(surface, buffer, (3, 5, 1, 1), surface_damage=True)
    assert attached(got) == first
    assert world.comp.pixels(first) == os.pread(fd, stride * height, 0)
    # 2x2 buffer pixels for this commit, and the second commit's full damage.
    assert world.ledger.total.bytes_damaged >= 2 * width * height * 4
    assert world.ledger.total.bytes_copied - before == width * height * 4
    assert second != first


def test_later_client_writes_do_not_change_what_was_committed(world: World) -> None:
    pool, fd = world.pool(4 * 16 * 16, b"\x11" * 1024)
    _, buffer = world.buffer(pool, 0, 16, 16, 64)
    surface = world.surface()
    step, got = world.commit(surface, buffer, (0, 0, 16, 16))
    assert released(step, buffer)
    os.pwrite(fd, b"\x99" * 1024, 0)  # the client reuses its released buffer
    assert world.comp.pixels(attached(got)) == b"\x11" * 1024


# -- output buffers: cap, release, retirement --------------------------------------------


def test_commit_waits_for_a_release_past_the_cap(world: World) -> None:
    pool, _ = world.pool(4 * 4 * 4, b"\x22" * 64)
    _, buffer = world.buffer(pool, 0, 4, 4, 16)
    surface = world.surface()
    outs = []
    for _ in range(MAX_OUTPUTS_PER_SURFACE):
        _, got = world.commit(surface, buffer, (0, 0, 4, 4))
        outs.append(attached(got))
    step, got = world.commit(surface, buffer, (0, 0, 4, 4))
    # The damage went ahead (it is pending state); the commit waits.
    assert [m.name for m in got] == ["damage_buffer"] and world.session.blocked
    assert not released(step, buffer)
    # Requests behind the waiting commit wait with it, in order.
    callback = world.new_id()
    _, got = world.send(req(1, "wl_display", "sync", callback))
    assert got == []
    step = world.events(event(outs[1], "wl_buffer", "release"))
    got = world.comp.take(step)
    assert [m.name for m in got] == ["attach", "commit", "sync"]
    assert attached(got) == outs[1]
    assert released(step, buffer) and not world.session.blocked


def test_release_of_an_output_buffer_is_not_forwarded(world: World) -> None:
    pool, _ = world.pool(64, b"\x01" * 64)
    _, buffer = world.buffer(pool, 0, 4, 4, 16)
    _, got = world.commit(world.surface(), buffer, (0, 0, 4, 4))
    step = world.events(event(attached(got), "wl_buffer", "release"))
    assert step.error is None and client_events(step) == []
    latency = world.ledger.total.release_latency.summary()
    assert latency["count"] == 1


def commit_64x64(world: World, surface: int | None = None) -> tuple[int, int]:
    """(surface, output buffer) of a full 64x64 commit: 16 KiB of pixels, 5 pages with
    the unmap-notify byte."""
    pool, _ = world.pool(4 * 64 * 64, b"\x05" * (4 * 64 * 64))
    _, buffer = world.buffer(pool, 0, 64, 64, 256)
    surface = world.surface() if surface is None else surface
    _, got = world.commit(surface, buffer, (0, 0, 64, 64))
    return surface, attached(got)


def test_a_destroyed_surfaces_outputs_are_cached_and_reused_by_the_next_surface(
        world: World) -> None:
    surface, out = commit_64x64(world)
    pool_up = world.comp.buffers[out][0]
    world.mapped.add(world.comp.pool_file(out))  # the compositor maps the pool
    world.events(event(out, "wl_buffer", "release"))
    _, got = world.send(req(surface, "wl_surface", "destroy"))
    # The buffer goes; the pool, and so the compositor's mapping, stays.
    assert [(m.interface, m.name) for m in got] == [("wl_buffer", "destroy"),
                                                    ("wl_surface", "destroy")]
    pages = world.ledger.total.pages
    assert pages.cached == pages.live == 5 and pages.awaiting_unmap == 0
    _, got = world.commit(world.surface(), commit_64x64_buffer(world), (0, 0, 64, 64))
    names = [(m.interface, m.name) for m in got]
    assert ("wl_shm", "create_pool") not in names
    created = [m for m in got if m.name == "create_buffer"]
    assert [m.object_id for m in created] == [pool_up], "a new buffer in the cached pool"
    assert pages.cached == 0 and pages.live == pages.shared_total == 5
    assert world.lifetimes.counters.cache_hits == 1


def commit_64x64_buffer(world: World) -> int:
    pool, _ = world.pool(4 * 64 * 64, b"\x06" * (4 * 64 * 64))
    return world.buffer(pool, 0, 64, 64, 256)[1]


def test_an_evicted_area_ends_on_its_unmap_notify_without_deferral(world: World) -> None:
    world.lifetimes.policy.cache_pages = 0  # nothing is kept: every let-go area is evicted
    surface, out = commit_64x64(world)
    pool_up = world.comp.buffers[out][0]
    world.mapped.add(world.comp.pool_file(out))
    world.events(event(out, "wl_buffer", "release"))
    _, got = world.send(req(surface, "wl_surface", "destroy"))
    assert [(m.interface, m.name, m.object_id) for m in got
            if m.interface == "wl_shm_pool"] == [("wl_shm_pool", "destroy", pool_up)]
    pages = world.ledger.total.pages
    assert pages.awaiting_unmap == pages.live == 5 and world.lifetimes.awaiting == 1
    world.hv.refresh()  # still mapped: no notify
    world.lifetimes.on_event()
    assert pages.live == 5
    world.mapped.clear()  # the compositor unmaps when it destroys the pool
    world.clock.now += 0.01
    world.hv.refresh()
    world.lifetimes.on_event()
    assert pages.live == 0 and pages.awaiting_unmap == 0
    assert pages.unshared_total == 5 and pages.deferred_at_unshare == 0
    assert world.hv.deferred_pages == 0 and world.hv.counters.deferred_count == 0
    assert world.lifetimes.counters.ended_by_notify == 1
    assert world.lifetimes.counters.unmap_latency.summary()["max"] == pytest.approx(10.0)


def end_with_one_output_mapped(world: World) -> None:
    """A 64x64 output buffer (5 pages) the compositor still maps when the session ends."""
    _, out = commit_64x64(world)
    world.mapped.add(world.comp.pool_file(out))
    world.session.end()


def test_grants_still_mapped_late_go_to_deferred_reclaim_and_drain(world: World) -> None:
    world.hv.params.free_per_iteration = 1
    end_with_one_output_mapped(world)
    pages = world.ledger.total.pages
    assert pages.awaiting_unmap == pages.live == 5 and world.hv.deferred_pages == 0
    world.clock.now += 1.9
    world.lifetimes.poll()
    assert world.hv.deferred_pages == 0, "not late yet"
    world.clock.now += 0.2
    world.lifetimes.poll()
    assert pages.live == 0 and pages.deferred_at_unshare == 5
    assert world.hv.deferred_pages == 5
    # 5 pages to drain within 2 s: 3 a tick, raised from the 1 found.
    assert world.hv.params.free_per_iteration == 3
    counters = world.lifetimes.counters
    assert counters.late_releases == 1 and counters.defer_batches == 1
    assert counters.fpi_raises == 1
    world.mapped.clear()
    world.clock.now += 1
    world.hv.advance()
    assert world.hv.deferred_pages == 2
    world.clock.now += 1
    world.hv.advance()
    world.lifetimes.poll()
    assert world.hv.deferred_pages == 0
    assert world.hv.params.free_per_iteration == 1 and counters.fpi_restores == 1


# -- id translation ------------------------------------------------------------------------


def test_ids_diverge_and_are_translated_both_ways(world: World) -> None:
    pool, _ = world.pool(64, b"\x01" * 64)
    _, _buffer = world.buffer(pool, 0, 4, 4, 16)  # two client objects the compositor lacks
    surface = world.surface()
    assert world.session.ids.upstream(surface) == surface - 2
    callback = world.new_id()
    _, got = world.send(req(surface, "wl_surface", "frame", callback))
    assert got[0].object_id == surface - 2 and got[0].args == [callback - 2]
    step = world.events(event(callback - 2, "wl_callback", "done", 7)
                        + event(1, "wl_display", "delete_id", callback - 2))
    events = client_events(step)
    assert [(o, op) for o, op, _ in events] == [(callback, 0), (1, 1)]
    assert decode_args(ev_spec("wl_display", "delete_id"), events[1][2], []) == [callback]


def test_destroying_a_kept_object_gets_delete_id_from_the_proxy(world: World) -> None:
    pool, _ = world.pool(64, b"\x01" * 64)
    step, got = world.send(req(pool, "wl_shm_pool", "destroy"))
    assert got == []
    assert step.to_client == []  # its own: the I/O layer may send it with the next
    events = client_events(step)
    assert [(o, op) for o, op, _ in events] == [(1, 1)]
    assert decode_args(ev_spec("wl_display", "delete_id"), events[0][2], []) == [pool]
    # The id is free again for the client.
    again, _ = world.send(req(world.shm, "wl_shm", "create_pool", pool,
                              os.dup(world.memfd(64)), 64))
    assert again.error is None


ICONS_XML = """<protocol name="test_icons">
  <interface name="test_icon_manager_v1" version="1">
    <request name="create_icon"><arg name="id" type="new_id" interface="test_icon_v1"/></request>
  </interface>
  <interface name="test_icon_v1" version="1">
    <request name="add_buffer"><arg name="buffer" type="object" interface="wl_buffer"/></request>
  </interface>
</protocol>
"""


def test_a_kept_buffer_handed_to_another_interface_is_refused(tmp_path: Path) -> None:
    """A protocol given with --protocol-dir may pass a wl_buffer elsewhere than attach
    (as xdg-toplevel-icon does); the client's buffers stay in the proxy, so that is
    refused with a reason rather than relayed with an id the compositor never saw."""
    xml = tmp_path / "test-icons.xml"
    xml.write_text(ICONS_XML)
    table = ProtocolTable([*PROTO.interfaces.values(), *parse_protocol_file(xml)])
    w = World(tmp_path / "sim", protocol=table)
    try:
        w.setup()
        w.events(event(2, "wl_registry", "global", 9, "test_icon_manager_v1", 1))
        pool, _ = w.pool(4 * 4 * 4)
        _, buffer = w.buffer(pool, 0, 4, 4, 16)
        manager, icon = w.new_id(), w.new_id()
        # Straight into the session: the fake compositor knows only the bundled XML.
        bind = req(2, "wl_registry", "bind", 9, UntypedNewId("test_icon_manager_v1", 1,
                                                             manager))[0]
        assert w.session.from_client(bind).error is None
        create_icon = table["test_icon_manager_v1"].requests[0]
        add_buffer = table["test_icon_v1"].requests[0]
        step = w.session.from_client(encode_message(manager, create_icon, [icon])[0]
                                     + encode_message(icon, add_buffer, [buffer])[0])
        message = assert_client_error(step, ErrorCode.INVALID_METHOD)
        assert f"cannot hand wl_buffer@{buffer} itself to the compositor" in message
    finally:
        w.close()


def test_server_ids_pass_unchanged(world: World) -> None:
    """An object the compositor creates (a wl_data_offer, ids from 0xff000000) keeps its
    id on both connections, in events and in requests, while the client's ids, pushed
    off the compositor's by a pool the proxy keeps, are translated around it."""
    world.pool(64, b"\x01" * 64)  # a client object the compositor never sees: ids diverge
    world.events(event(2, "wl_registry", "global", 8, "wl_seat", 7)
                 + event(2, "wl_registry", "global", 9, "wl_data_device_manager", 3))
    seat, manager, device = world.new_id(), world.new_id(), world.new_id()
    world.send(req(2, "wl_registry", "bind", 8, UntypedNewId("wl_seat", 7, seat)),
               req(2, "wl_registry", "bind", 9,
                   UntypedNewId("wl_data_device_manager", 3, manager)))
    _, got = world.send(req(manager, "wl_data_device_manager", "get_data_device", device, seat))
    [get_device] = got
    device_up, seat_up = get_device.args
    assert isinstance(device_up, int) and (device_up, seat_up) != (device, seat), (
        "the client's ids are translated")
    surface = world.surface()
    surface_up = world.session.ids.upstream(surface)
    assert surface_up is not None and surface_up != surface

    offer = SERVER_ID_MIN  # the first id a libwayland compositor gives out
    x, y = Fixed(10 * 256), Fixed(20 * 256)
    step = world.events(event(device_up, "wl_data_device", "data_offer", offer)
                        + event(offer, "wl_data_offer", "offer", "text/plain")
                        + event(device_up, "wl_data_device", "enter", 5, surface_up, x, y, offer)
                        + event(device_up, "wl_data_device", "selection", offer))
    assert step.error is None, step.error
    assert joined(step.to_client) == (
        event(device, "wl_data_device", "data_offer", offer)
        + event(offer, "wl_data_offer", "offer", "text/plain")
        + event(device, "wl_data_device", "enter", 5, surface, x, y, offer)
        + event(device, "wl_data_device", "selection", offer), [])

    world.comp.objects[offer] = PROTO["wl_data_offer"]  # the fake compositor made it
    passed = os.dup(world.memfd(0))  # the proxy's copy of the fd, as over a socket
    step, got = world.send(req(offer, "wl_data_offer", "set_actions", 1, 1),
                           req(offer, "wl_data_offer", "accept", 5, "text/plain"),
                           req(offer, "wl_data_offer", "receive", "text/plain", passed),
                           req(device, "wl_data_device", "set_selection", None, 6),
                           req(offer, "wl_data_offer", "destroy"))
    assert step.error is None, step.error
    assert got == [Received(offer, "wl_data_offer", "set_actions", [1, 1]),
                   Received(offer, "wl_data_offer", "accept", [5, "text/plain"]),
                   Received(offer, "wl_data_offer", "receive", ["text/plain", passed]),
                   Received(device_up, "wl_data_device", "set_selection", [None, 6]),
                   Received(offer, "wl_data_offer", "destroy", [])]
    os.close(passed)


# -- hostile clients -----------------------------------------------------------------------


def shm_error(step: Step, object_id: int, code: int) -> str:
    assert step.error is not None and step.client_at_fault
    about, err_code, message = parse_error(step.to_client)
    assert (about, err_code) == (object_id, code), message
    assert isinstance(message, str)
    return message


def test_truncated_memfd_is_invalid_fd_not_a_crash(plain_world: World) -> None:
    world = plain_world
    pool, fd = world.pool(4 * 32 * 32, b"\x01" * 4096)
    _, buffer = world.buffer(pool, 0, 32, 32, 128)
    os.ftruncate(fd, 100)  # after create_pool: a mapping would now SIGBUS
    step, got = world.commit(world.surface(), buffer, (0, 0, 32, 32))
    message = shm_error(step, buffer, INVALID_FD)
    assert "shorter" in message
    assert not any(m.name == "commit" for m in got)


@pytest.mark.parametrize(("offset", "width", "height", "stride", "code"), [
    (0, 16, 16, 16, INVALID_STRIDE),  # stride shorter than a row of 4-byte pixels
    (0, 0, 16, 64, INVALID_STRIDE),
    (-4, 16, 16, 64, INVALID_STRIDE),
    (64, 16, 16, 64, INVALID_STRIDE),  # past the pool's end
    (0, 16, 1 << 30, 64, INVALID_STRIDE),  # stride * height overflows
], ids=["short-stride", "zero-width", "negative-offset", "past-end", "overflow"])
def test_bad_buffer_geometry(world: World, offset: int, width: int, height: int,
                             stride: int, code: int) -> None:
    pool, _ = world.pool(64 * 16)
    step, _ = world.buffer(pool, offset, width, height, stride)
    shm_error(step, pool, code)


def test_unknown_format(world: World) -> None:
    pool, _ = world.pool(64 * 16)
    step, _ = world.buffer(pool, 0, 16, 16, 64, fmt=0x12345678)
    assert "invalid format" in shm_error(step, pool, 0)


def test_pool_of_size_zero_and_shrinking_pools(world: World) -> None:
    pool = world.new_id()
    step, _ = world.send(req(world.shm, "wl_shm", "create_pool", pool,
                             os.dup(world.memfd(64)), 0))
    shm_error(step, world.shm, INVALID_STRIDE)


def test_shrinking_a_pool(world: World) -> None:
    pool, _ = world.pool(4096)
    step, _ = world.send(req(pool, "wl_shm_pool", "resize", 1024))
    assert "shrinking" in shm_error(step, pool, INVALID_FD)


def test_a_pipe_is_not_a_pool(world: World) -> None:
    read_end, write_end = os.pipe()
    os.close(write_end)
    step, _ = world.send(req(world.shm, "wl_shm", "create_pool", world.new_id(), read_end,
                             4096))
    shm_error(step, world.shm, INVALID_FD)
    for fd in step.discarded_fds:
        os.close(fd)


def test_resized_pool_serves_buffers_past_the_old_end(world: World) -> None:
    pool, fd = world.pool(64)
    os.ftruncate(fd, 128)
    os.pwrite(fd, b"\x42" * 64, 64)
    step, _ = world.send(req(pool, "wl_shm_pool", "resize", 128))
    assert step.error is None
    _, buffer = world.buffer(pool, 64, 4, 4, 16)
    step, got = world.commit(world.surface(), buffer, (0, 0, 4, 4))
    assert step.error is None
    assert world.comp.pixels(attached(got)) == b"\x42" * 64


def test_grant_limit_is_a_clear_no_memory_error(world: World) -> None:
    world.hv.params.gntalloc_limit = 3
    world.lifetimes.policy.client_pages = 100
    pool, _ = world.pool(4 * 64 * 64)
    _, buffer = world.buffer(pool, 0, 64, 64, 256)
    step, _ = world.commit(world.surface(), buffer, (0, 0, 64, 64))
    assert step.error is not None and step.error.code is ErrorCode.NO_MEMORY
    _, code, message = parse_error(step.to_client)
    assert code == ErrorCode.NO_MEMORY
    assert isinstance(message, str)
    assert "gntalloc limit of 3 pages" in message and "--gntalloc-limit" in message
    assert world.ledger.total.pages.live == 0


def test_the_per_client_cap_evicts_the_clients_own_cache_first(world: World) -> None:
    world.lifetimes.policy.client_pages = 6
    surface, out = commit_64x64(world)
    world.events(event(out, "wl_buffer", "release"))
    world.send(req(surface, "wl_surface", "destroy"))  # 5 pages cached
    pool, _ = world.pool(4 * 16 * 64)
    # 2 pages: the cached 5 would waste more than half, and 5 + 2 pass the cap of 6.
    _, buffer = world.buffer(pool, 0, 16, 64, 64)
    step, _ = world.commit(world.surface(), buffer, (0, 0, 16, 64))
    assert step.error is None, step.error
    assert world.lifetimes.counters.evictions == 1
    assert world.ledger.total.pages.cached == 0


def test_a_given_back_area_is_trimmed_once_the_batch_went(world: World) -> None:
    """The area of a destroyed surface is cached at once, but held to the cache's
    bound (the gntalloc limit read afresh) only by ``lifetimes.trim``, which serve calls
    once the step's output went; a take in the same batch trims first."""
    life = world.lifetimes
    life.policy.cache_pages = 0  # nothing is kept
    surface, out = commit_64x64(world)
    pool_up = world.comp.buffers[out][0]
    world.events(event(out, "wl_buffer", "release"))
    step = world.session.from_client(*req(surface, "wl_surface", "destroy"))
    names = [(m.interface, m.name) for m in world.comp.take(step)]
    assert names == [("wl_buffer", "destroy"), ("wl_surface", "destroy")]
    assert life.trim_due and life.counters.evictions == 0
    assert world.ledger.total.pages.cached == 5
    got = world.after(step)
    assert [(m.interface, m.name, m.object_id) for m in got] == [
        ("wl_shm_pool", "destroy", pool_up)]
    assert not life.trim_due and life.counters.evictions == 1
    assert world.ledger.total.pages.cached == 0
    # Given back and taken in one batch: the take trims first, so nothing is reused.
    surface, out = commit_64x64(world)
    world.events(event(out, "wl_buffer", "release"))
    pool, _ = world.pool(4 * 64 * 64)
    _, buffer = world.buffer(pool, 0, 64, 64, 256)
    other = world.surface()
    step = world.session.from_client(*joined([
        req(surface, "wl_surface", "destroy"),
        req(other, "wl_surface", "attach", buffer, 0, 0),
        req(other, "wl_surface", "damage_buffer", 0, 0, 64, 64),
        req(other, "wl_surface", "commit")]))
    assert step.error is None, step.error
    assert life.counters.evictions == 2 and life.counters.cache_hits == 0
    assert life.counters.cache_misses == 3


def test_a_spent_pool_is_closed_by_close_spent(world: World) -> None:
    """A pool the client is done with (destroyed, and its buffers too) keeps its fd
    until ``close_spent``, which the I/O layer calls once the batch's replies went."""
    pool, _ = world.pool(4 * 16 * 16)
    _, buffer = world.buffer(pool, 0, 16, 16, 64)
    shm = world.session.shm
    assert shm is not None
    kept = shm.pools[pool]
    world.send(req(pool, "wl_shm_pool", "destroy"))
    assert not world.session.spent and kept.fd >= 0  # its buffer still needs it
    world.send(req(buffer, "wl_buffer", "destroy"))
    assert world.session.spent and kept.fd >= 0
    world.session.close_spent()
    assert not world.session.spent and kept.fd == -1


def test_spent_pools_are_bounded(world: World) -> None:
    """However long the I/O layer waits, at most MAX_SPENT_POOLS pools stay open."""
    shm = world.session.shm
    assert shm is not None
    kept = []
    for _ in range(MAX_SPENT_POOLS + 1):
        pool, _ = world.pool(4096)
        kept.append(shm.pools[pool])
        world.send(req(pool, "wl_shm_pool", "destroy"))
        assert len(shm.spent.pools) < MAX_SPENT_POOLS
    assert [p.fd for p in kept[:MAX_SPENT_POOLS]] == [-1] * MAX_SPENT_POOLS
    assert kept[-1].fd >= 0
    world.session.end()
    assert kept[-1].fd == -1


def test_the_pools_a_client_may_hold_are_counted_until_nothing_needs_them(
        world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    """A pool holds an fd in the proxy while the client has it or a buffer of it: past
    the bound a new pool is no_memory. A destroyed pool whose buffer lives still counts;
    once its buffer goes too, it no longer does."""
    monkeypatch.setattr(bridge, "MAX_POOLS_PER_CLIENT", 3)
    first, _ = world.pool(4096)
    _, buffer = world.buffer(first, 0, 16, 16, 64)
    world.send(req(first, "wl_shm_pool", "destroy"))  # its buffer keeps it
    second, _ = world.pool(4096)
    world.pool(4096)
    world.send(req(second, "wl_shm_pool", "destroy"))  # nothing needs it: room for one
    world.pool(4096)
    world.send(req(buffer, "wl_buffer", "destroy"))  # the first is spent: room for one
    world.pool(4096)
    step, _ = world.send(req(world.shm, "wl_shm", "create_pool", world.new_id(),
                             os.dup(world.memfd(4096)), 4096))
    assert step.error is not None and step.error.code is ErrorCode.NO_MEMORY
    assert "too many wl_shm pools: a client may hold 3 at once" in step.error.message


def test_everything_is_released_at_the_end(world: World) -> None:
    before = len(os.listdir("/proc/self/fd"))
    pool, _ = world.pool(4 * 32 * 32, b"\x07" * 4096)
    _, buffer = world.buffer(pool, 0, 32, 32, 128)
    world.send(req(pool, "wl_shm_pool", "destroy"))  # the buffer keeps the pool's fd
    world.commit(world.surface(), buffer, (0, 0, 32, 32))
    world.session.end()
    world.comp.close()
    for fd in world.memfds:
        os.close(fd)
    world.memfds.clear()
    assert len(os.listdir("/proc/self/fd")) <= before - 0
    assert world.ledger.total.pages.live == 0


def test_sealed_pool_shorter_than_it_claims_is_read_not_mapped(tmp_path: Path) -> None:
    """A sealed file shorter than the pool would fault if mapped: it is read instead."""
    world = World(tmp_path / "sim")
    world.sealed = True
    world.setup()
    try:
        fd = world.memfd(1024, b"\x03" * 1024)
        pool = world.new_id()
        world.send(req(world.shm, "wl_shm", "create_pool", pool, os.dup(fd), 4 * 32 * 32))
        _, buffer = world.buffer(pool, 0, 32, 32, 128)
        step, _ = world.commit(world.surface(), buffer, (0, 0, 32, 32))
        assert "shorter" in shm_error(step, buffer, INVALID_FD)
    finally:
        world.close()


def test_a_sealed_pool_is_read_at_its_first_commit_and_mapped_from_its_second(
        tmp_path: Path) -> None:
    """Mapping a pool costs more than reading it once, and many pools are drawn into
    once (a churning window's, a popup's): the first commit reads it, later ones map
    it, and both copy what the client drew."""
    world = World(tmp_path / "sim")
    world.sealed = True
    world.setup()
    try:
        pool, fd = world.pool(64, b"\x01" * 64)
        _, buffer = world.buffer(pool, 0, 4, 4, 16)
        surface = world.surface()
        _, got = world.commit(surface, buffer, (0, 0, 4, 4))
        shm = world.session.shm
        assert shm is not None
        assert shm.pools[pool].mapping is None
        assert world.comp.pixels(attached(got)) == b"\x01" * 64
        os.pwrite(fd, b"\x02" * 64, 0)
        _, got = world.commit(surface, buffer, (0, 0, 4, 4))
        assert shm.pools[pool].mapping is not None
        assert world.comp.pixels(attached(got)) == b"\x02" * 64
    finally:
        world.close()


def test_a_resized_surface_lets_go_of_its_old_outputs(world: World) -> None:
    pool, _ = world.pool(4 * 64 * 64 * 2, b"\x05" * (4 * 64 * 64 * 2))
    _, small = world.buffer(pool, 0, 32, 32, 128)
    _, large = world.buffer(pool, 4 * 64 * 64, 64, 64, 256)
    surface = world.surface()
    _, got = world.commit(surface, small, (0, 0, 32, 32))
    first = attached(got)
    _, got = world.commit(surface, small, (0, 0, 32, 32))
    second = attached(got)
    world.events(event(first, "wl_buffer", "release"))
    _, got = world.commit(surface, large, (0, 0, 64, 64))
    # The released small output goes at once; the busy one once it is released.
    assert ("wl_buffer", "destroy") in [(m.interface, m.name) for m in got]
    assert [m.object_id for m in got if m.name == "destroy" and m.interface == "wl_buffer"] \
        == [first]
    step = world.events(event(second, "wl_buffer", "release"))
    assert [m.object_id for m in world.comp.take(step)] == [second]
    pages = world.ledger.total.pages
    # Both small areas (2 pages each: 4 KiB of pixels and the notify byte) are cached;
    # the 64x64 one (5 pages) is new.
    assert pages.live == 9 and pages.cached == 4 and pages.unshared_total == 0


# -- regressions found in review: what libwayland + Weston do with the same sequence -------


def fx(value: float) -> Fixed:
    return Fixed(int(value * 256))


def test_display_error_about_a_renumbered_object_names_the_client_id(world: World) -> None:
    world.pool(64, b"\x01" * 64)  # a kept object: the spaces diverge
    surface = world.surface()
    upstream = world.session.ids.upstream(surface)
    assert upstream is not None and upstream != surface
    step = world.events(event(1, "wl_display", "error", upstream, 2, "bad size"))
    assert parse_error(step.to_client)[:2] == [surface, 2]


def test_display_error_about_wl_shm_is_the_proxys_fault(world: World) -> None:
    step = world.events(event(1, "wl_display", "error", world.shm, 2, "failed mmap"))
    about, code, message = parse_error(step.to_client)
    assert (about, code) == (1, ErrorCode.IMPLEMENTATION)
    assert isinstance(message, str) and "failed mmap" in message and "qubesshm" in message


def test_attach_with_an_offset_is_invalid_offset_since_version_5(tmp_path: Path) -> None:
    world = World(tmp_path / "sim")
    try:
        registry = world.new_id()
        world.send(req(1, "wl_display", "get_registry", registry))
        world.events(event(registry, "wl_registry", "global", 1, "wl_compositor", 5)
                     + event(registry, "wl_registry", "global", 2, "wl_shm", 1))
        world.compositor, world.shm = world.new_id(), world.new_id()
        world.send(req(registry, "wl_registry", "bind", 1,
                       UntypedNewId("wl_compositor", 5, world.compositor)),
                   req(registry, "wl_registry", "bind", 2, UntypedNewId("wl_shm", 1, world.shm)))
        pool, _ = world.pool(64, b"\x01" * 64)
        _, buffer = world.buffer(pool, 0, 4, 4, 16)
        surface = world.surface()
        step, _ = world.send(req(surface, "wl_surface", "attach", buffer, 5, 7))
        assert parse_error(step.to_client)[:2] == [surface, 3]
    finally:
        world.close()


def test_a_viewport_destroyed_then_recreated_unsets_at_the_next_commit(world: World) -> None:
    size = stride = 16 * 4
    pool, fd = world.pool(stride * 16, b"\x10" * (stride * 16))
    _, buffer = world.buffer(pool, 0, 16, 16, stride)
    surface, viewport = world.surface(), world.new_id()
    world.send(req(world.viewporter, "wp_viewporter", "get_viewport", viewport, surface),
               req(viewport, "wp_viewport", "set_source", fx(8), fx(8), fx(8), fx(8)))
    _, got = world.commit(surface, buffer, (0, 0, 16, 16))
    world.events(event(attached(got), "wl_buffer", "release"))
    os.pwrite(fd, b"\xff" * 4, stride + 4)  # buffer pixel (1, 1): outside the old source
    second = world.new_id()
    _, got = world.send(req(viewport, "wp_viewport", "destroy"),
                        req(world.viewporter, "wp_viewporter", "get_viewport", second, surface),
                        req(surface, "wl_surface", "damage", 1, 1, 1, 1),
                        req(surface, "wl_surface", "commit"))
    assert world.comp.pixels(attached(got)) == os.pread(fd, size * 16, 0)


def test_viewport_of_a_destroyed_surface_is_no_surface_first(world: World) -> None:
    surface, viewport = world.surface(), world.new_id()
    world.send(req(world.viewporter, "wp_viewporter", "get_viewport", viewport, surface))
    world.send(req(surface, "wl_surface", "destroy"))
    step, _ = world.send(req(viewport, "wp_viewport", "set_destination", 0, 0))
    assert parse_error(step.to_client)[:2] == [viewport, 3]


NV12 = 0x3231564E


def test_multi_planar_formats_are_neither_advertised_nor_accepted(world: World) -> None:
    step = world.events(event(world.shm, "wl_shm", "format", NV12)
                        + event(world.shm, "wl_shm", "format", 0x34325258))
    formats = [decode_args(ev_spec("wl_shm", "format"), data, [])[0]
               for _, _, data in client_events(step)]
    assert formats == [0x34325258], "NV12 keeps planes past stride x height: hidden"
    pool, _ = world.pool(64 * 64 * 2)
    step, _ = world.buffer(pool, 0, 64, 64, 64, fmt=NV12)
    assert "invalid format" in shm_error(step, pool, 0)


def test_a_flood_of_damage_costs_one_rectangle(world: World) -> None:
    width, height = 4, 16384
    pool, _ = world.pool(width * 4 * height)
    _, buffer = world.buffer(pool, 0, width, height, width * 4)
    surface = world.surface()
    world.send(req(surface, "wl_surface", "attach", buffer, 0, 0),
               *[req(surface, "wl_surface", "damage_buffer", i % 4, (i * 7919) % height, 1, 1)
                 for i in range(5000)])
    assert world.session.shm is not None
    assert len(world.session.shm.surfaces[surface].pending.buffer_damage) <= MAX_RECTS


def test_after_a_null_attach_the_next_shm_buffer_is_copied_whole(world: World) -> None:
    stride = 16 * 4
    pool, fd = world.pool(stride * 16, b"\x11" * (stride * 16))
    _, buffer = world.buffer(pool, 0, 16, 16, stride)
    surface = world.surface()
    _, got = world.commit(surface, buffer, (0, 0, 16, 16))
    first = attached(got)
    world.send(req(surface, "wl_surface", "attach", None, 0, 0),
               req(surface, "wl_surface", "commit"))
    world.events(event(first, "wl_buffer", "release"))
    os.pwrite(fd, b"\x22" * (stride * 16), 0)
    _, got = world.commit(surface, buffer, (0, 0, 1, 1))
    assert world.comp.pixels(attached(got)) == b"\x22" * (stride * 16)


def test_a_skipped_new_id_is_refused(world: World) -> None:
    step, _ = world.send(req(world.shm, "wl_shm", "create_pool", world._next + 50,
                             os.dup(world.memfd(64)), 64))
    for fd in step.discarded_fds:
        os.close(fd)
    assert parse_error(step.to_client)[:2] == [1, ErrorCode.INVALID_METHOD]


def test_an_early_release_waits_for_the_compositors_answer_only_to_a_sync(
        world: World) -> None:
    """The early release is one of the proxy's own events: it may wait for the answer to
    its batch (and reach the client in one write with it) only when the batch carries a
    ``wl_display.sync``, which the compositor answers at once; after a commit alone, or
    with a frame callback (answered at the next repaint), it goes at once."""
    pool, _ = world.pool(4 * 4 * 4, b"\x01" * 64)
    _, buffer = world.buffer(pool, 0, 4, 4, 16)
    for tail, waits in (("sync", True), ("frame", False), (None, False)):
        surface = world.surface()
        messages = [req(surface, "wl_surface", "attach", buffer, 0, 0),
                    req(surface, "wl_surface", "damage_buffer", 0, 0, 4, 4),
                    req(surface, "wl_surface", "commit")]
        if tail == "sync":
            messages.append(req(1, "wl_display", "sync", world.new_id()))
        elif tail == "frame":
            messages.insert(2, req(surface, "wl_surface", "frame", world.new_id()))
        step, _ = world.send(*messages)
        assert step.error is None and step.to_client == []
        assert [(f.object_id, f.opcode) for f in frames_of(step.own_events)] == [(buffer, 0)]
        assert step.own_events_wait is waits, tail
    # Delete_ids alone still wait whenever the batch went upstream: no client waits for
    # one (a surface made in the same batch takes it upstream).
    other, _ = world.pool(64, b"\x01" * 64)
    step, _ = world.send(req(other, "wl_shm_pool", "destroy"),
                         req(world.compositor, "wl_compositor", "create_surface",
                             world.new_id()))
    assert [(f.object_id, f.opcode) for f in frames_of(step.own_events)] == [(1, 1)]
    assert step.own_events_wait is True


def test_a_release_goes_ahead_of_its_buffers_delete_id(world: World) -> None:
    """A buffer committed and destroyed in one batch: its early release, then its
    delete_id, in the order made (an event for an id the client was told is free would
    be read as one for whatever reuses it)."""
    pool, _ = world.pool(64, b"\x01" * 64)
    _, buffer = world.buffer(pool, 0, 4, 4, 16)
    surface = world.surface()
    step, _ = world.send(req(surface, "wl_surface", "attach", buffer, 0, 0),
                         req(surface, "wl_surface", "damage_buffer", 0, 0, 4, 4),
                         req(surface, "wl_surface", "commit"),
                         req(buffer, "wl_buffer", "destroy"))
    events = [(f.object_id, f.opcode, f.data[8:]) for f in frames_of(step.own_events)]
    assert events == [(buffer, 0, b""), (1, 1, struct.pack("=I", buffer))]


def test_carries_sync_finds_a_sync_among_whole_messages() -> None:
    sync = req(1, "wl_display", "sync", 5)[0]
    registry = req(1, "wl_display", "get_registry", 6)[0]
    other_zero = req(7, "wl_surface", "destroy")[0]  # opcode 0 of another object
    assert carries_sync([(registry + other_zero + sync, [])])
    assert carries_sync([(registry, []), (sync, [3])])
    assert not carries_sync([(registry + other_zero, [])])
    assert not carries_sync([])


def test_the_proxys_own_events_go_ahead_of_an_error(world: World) -> None:
    """A batch that ends in a protocol error: its delete_ids are in the client's last
    write, ahead of the error."""
    pool, _ = world.pool(64, b"\x01" * 64)
    step, _ = world.send(req(pool, "wl_shm_pool", "destroy"), req(4242, "wl_surface", "commit"))
    assert step.error is not None and step.own_events == []
    events = [(o, op) for o, op, _ in client_events(step)]
    assert events == [(1, 1), (1, 0)]  # delete_id, then wl_display.error


def test_delete_id_for_a_live_output_buffer_is_the_compositors_error(world: World) -> None:
    pool, _ = world.pool(64, b"\x01" * 64)
    _, buffer = world.buffer(pool, 0, 4, 4, 16)
    _, got = world.commit(world.surface(), buffer, (0, 0, 4, 4))
    step = world.events(event(1, "wl_display", "delete_id", attached(got)))
    assert step.error is not None and not step.client_at_fault
    assert parse_error(step.to_client)[1] == ErrorCode.IMPLEMENTATION


def test_reclaim_goes_on_without_the_parameter_file(world: World) -> None:
    """Before Linux 6.5 there is no free_per_iteration file: the timer uses 10, and the
    proxy has nothing to raise."""
    from qubesshm.grants.params import FREE_PER_ITERATION

    end_with_one_output_mapped(world)
    world.hv.params.path(FREE_PER_ITERATION).unlink()
    world.clock.now += 3
    world.lifetimes.poll()
    assert world.hv.deferred_pages == 5
    world.mapped.clear()
    world.clock.now += 1
    world.hv.advance()
    assert world.hv.deferred_pages == 0
    assert world.lifetimes.counters.fpi_raises == 0


def test_late_areas_go_to_deferred_reclaim_in_batches(world: World) -> None:
    world.lifetimes.policy.defer_batch = 5  # pages a second: one 64x64 area
    for _ in range(3):
        _, out = commit_64x64(world)
        world.mapped.add(world.comp.pool_file(out))
    world.session.end()
    world.clock.now += 2.5
    world.lifetimes.poll()
    assert world.hv.deferred_pages == 5 and world.lifetimes.awaiting == 2
    world.clock.now += 0.5
    world.lifetimes.poll()
    assert world.hv.deferred_pages == 5, "one batch a second"
    world.clock.now += 0.5
    world.lifetimes.poll()
    assert world.hv.deferred_pages == 10
    counters = world.lifetimes.counters
    assert counters.late_releases == 3 and counters.defer_batches == 2
    # The last area's mapping goes before its turn: it ends on its notify instead.
    world.mapped.clear()
    world.hv.refresh()
    world.lifetimes.on_event()
    assert world.lifetimes.awaiting == 0 and counters.ended_by_notify == 1
    assert world.ledger.total.pages.deferred_at_unshare == 10


def test_where_the_kernel_hides_its_deferred_list_the_backlog_is_estimated(
        world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    """Real Xen shows no deferred list: the proxy counts the pages it handed over
    with their notify byte still set, drained at free_per_iteration a second."""
    monkeypatch.setattr(world.halves, "deferred_pages", lambda: None)
    world.hv.params.free_per_iteration = 1
    end_with_one_output_mapped(world)  # 5 pages
    world.clock.now += 2.5
    world.lifetimes.poll()
    assert world.lifetimes.backlog() == 5
    assert world.hv.params.free_per_iteration == 3  # 5 pages within 2 s
    world.clock.now += 1
    world.lifetimes.poll()
    assert world.lifetimes.backlog() == 2
    world.clock.now += 1
    world.lifetimes.poll()
    assert world.lifetimes.backlog() == 0
    assert world.hv.params.free_per_iteration == 1
    assert world.lifetimes.counters.fpi_restores == 1


def test_a_request_that_cannot_fit_evicts_nothing(world: World) -> None:
    """Pages in use cannot be freed: when they alone leave no room, the request waits
    before any cached area is evicted or awaiting one deferred, and goes on once the
    compositor releases what was in use."""
    world.hv.params.gntalloc_limit = 14
    world.lifetimes.policy.client_pages = 100
    world.lifetimes.policy.cache_pages = 10
    _, in_use = commit_64x64(world)  # 5 pages in use
    surface, out = commit_64x64(world)
    world.events(event(out, "wl_buffer", "release"))
    world.send(req(surface, "wl_surface", "destroy"))  # 5 pages cached
    pool, _ = world.pool(4 * 128 * 80)
    _, buffer = world.buffer(pool, 0, 128, 80, 512)  # 11 pages
    step, _ = world.commit(world.surface(), buffer, (0, 0, 128, 80))
    assert step.error is None and world.session.waiting_for_room
    assert world.lifetimes.counters.evictions == 0
    assert world.ledger.total.pages.cached == 5
    step = world.events(event(in_use, "wl_buffer", "release"))
    assert step.error is None and not world.session.blocked
    assert world.lifetimes.counters.evictions >= 1
