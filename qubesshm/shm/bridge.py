"""Sans-IO core of grant-backed buffers for one client: shm requests in, messages out.

The relay session hands every ``wl_shm``, ``wl_shm_pool``, ``wl_buffer``,
``wl_surface``, ``wp_viewport`` and ``wl_subsurface`` request here first. Client
pools and shm buffers stay in the proxy (the compositor never sees a client
fd); on commit the damaged pixels are copied into a released output buffer in
grant pages, which is attached upstream in the client buffer's place, and the
client's buffer is released at once (into ``own``, the proxy's own events, which the
session orders with its delete_ids). The compositor's releases of output
buffers come back here and are never forwarded. Grants come from the injected
``GrantLifetimes`` (which recycles them); messages go only to the outboxes the
session passes in, or to ``later`` for what the proxy sends on its own.
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from fractions import Fraction
from typing import Protocol

from ..grants.api import PAGE_SIZE
from ..grants.ledger import ClientCounters
from ..grants.lifetimes import Area, GrantLifetimes, GrantLimit, NoRoom
from ..objects.idmap import UpstreamIds
from ..objects.objectmap import DISPLAY_ID, WaylandObject
from ..pixels.copy import (
    Layout,
    ShortRead,
    copy_region,
    copy_region_mapped,
    damaged_bytes,
)
from ..pixels.formats import ARGB8888, XRGB8888, bytes_per_pixel, single_plane
from ..pixels.region import MAX_RECTS, TRANSFORMS, Rect, Region
from ..wire.codec import ArgValue, ErrorCode, Fixed, WireError, encode_message
from ..wire.protocol import InterfaceSpec, MessageSpec, ProtocolTable
from .clientpool import (
    INVALID_FD,
    ClientBuffer,
    ClientPool,
    SpentPools,
    make_buffer,
    open_pool,
    resize_pool,
)
from .errors import ShmError
from .outputs import OutputBuffer, OutputState
from .surfaces import Attach, Surface, ViewportRequests

log = logging.getLogger("qubesshm.shm")

# Upstream pools are whole pages and their size an int32.
MAX_POOL_SIZE = (2**31 - 1) // PAGE_SIZE * PAGE_SIZE

# Each client pool holds an open fd in the proxy until the client destroys it and
# its buffers; libwayland's own fd buffer bounds a client to about this many.
MAX_POOLS_PER_CLIENT = 1024

# wl_surface.error
INVALID_SCALE = 0
INVALID_TRANSFORM = 1
# wl_surface.error since version 5
INVALID_OFFSET = 3
# wp_viewport.error
VIEWPORT_BAD_VALUE = 0
VIEWPORT_NO_SURFACE = 3


class Verdict(enum.Enum):
    FORWARD = "forward"  # the session relays it, ids translated
    CONSUMED = "consumed"  # handled here; anything to send is in the outboxes
    BLOCKED = "blocked"  # no output buffer free: retry once the compositor releases one


class Outbox(Protocol):
    """Where the bridge puts messages: the session's outbox towards one peer."""

    def add(self, data: bytes, fds: list[int]) -> None: ...


# A request the bridge takes: (object, args, fds, to the compositor, to the client).
ShmHandler = Callable[[WaylandObject, list[ArgValue], list[int], Outbox, Outbox], Verdict]


@dataclass(eq=False)
class OwnObject:
    """An object the proxy created upstream."""

    interface: InterfaceSpec
    output: OutputBuffer | None = None

    def __str__(self) -> str:
        return self.interface.name


class ShmBridge:
    """Client pools, surfaces and output buffers of one client connection."""

    def __init__(self, protocol: ProtocolTable, ids: UpstreamIds, lifetimes: GrantLifetimes,
                 owner: int, counters: Sequence[ClientCounters], clock: Callable[[], float],
                 later: Outbox, own: Outbox,
                 trace: Callable[[int, MessageSpec, list[ArgValue]], None] | None = None,
                 ) -> None:
        self.protocol = protocol
        # Logs the requests the proxy itself makes upstream (--debug).
        self.trace = trace
        self.ids = ids
        self.lifetimes = lifetimes
        self.owner = owner
        self.counters = tuple(counters)
        # Requests the proxy makes upstream outside a client's request (a cached
        # area evicted for another client, or on a timer), and whom to tell.
        self.later = later
        # The proxy's own events for the client (the early releases), in one ordered
        # stream with the session's own delete_ids.
        self.own = own
        # Set when a commit released the client's buffer early; the session reads and
        # clears it once a step is done.
        self.released_early = False
        self.wake: Callable[[], None] | None = None
        self.clock = clock
        self.pools: dict[int, ClientPool] = {}
        # Pools the client has not destroyed, or whose buffers it still has: the fds
        # the proxy holds for it (``_held_pools``), counted.
        self._needed_pools = 0
        self.buffers: dict[int, ClientBuffer] = {}
        self.surfaces: dict[int, Surface] = {}
        self.viewports: dict[int, int] = {}  # wp_viewport id -> surface id
        self.formats: set[int] = {ARGB8888, XRGB8888}
        # Set when the compositor released an output buffer: a blocked commit may go on.
        self.released_since_block = False
        # A commit waits for the limits to have room (tried again when pages free up).
        self.waiting_for_room = False
        # The compositor released a buffer while it was the one attached: it does not
        # read shm buffers while showing them, so waiting for a release never stalls.
        self.compositor_releases_shown = False
        self._waiting_since: float | None = None
        self._waited_for_room = False
        # Output buffers of destroyed surfaces that the compositor still holds.
        self._orphans: set[OutputBuffer] = set()
        # Pools nothing needs any more; the I/O layer closes their fds after it has sent
        # what their batch produced.
        self.spent = SpentPools()
        self._req = {
            (iface.name, m.name): m for iface in protocol.interfaces.values()
            for m in iface.requests
        }
        handlers: dict[tuple[str, str], ShmHandler] = {
            ("wl_shm", "create_pool"): self._create_pool,
            ("wl_shm_pool", "create_buffer"): self._create_buffer,
            ("wl_shm_pool", "resize"): self._resize_pool,
            ("wl_shm_pool", "destroy"): self._destroy_pool,
            ("wl_buffer", "destroy"): self._destroy_buffer,
            ("wl_surface", "attach"): self._attach,
            ("wl_surface", "damage"): self._damage,
            ("wl_surface", "damage_buffer"): self._damage_buffer,
            ("wl_surface", "set_buffer_transform"): self._set_transform,
            ("wl_surface", "set_buffer_scale"): self._set_scale,
            ("wl_surface", "commit"): self._commit,
            ("wl_surface", "destroy"): self._destroy_surface,
            ("wp_viewporter", "get_viewport"): self._get_viewport,
            ("wp_viewport", "set_source"): self._set_source,
            ("wp_viewport", "set_destination"): self._set_destination,
            ("wp_viewport", "destroy"): self._destroy_viewport,
        }
        assert handlers.keys() == INTERCEPTED_REQUESTS
        self._handlers = handlers
        self._wl_shm_pool = protocol["wl_shm_pool"]
        self._wl_buffer = protocol["wl_buffer"]
        lifetimes.open_connection(owner, self._destroy_upstream_pool, self.counters)

    # -- what the session calls ----------------------------------------------

    def handler(self, spec: MessageSpec) -> ShmHandler | None:
        """What takes ``spec``'s requests first, or None: the session relays them as
        they are (``Verdict.FORWARD``)."""
        return self._handlers.get((spec.interface, spec.name))

    def observe_event(self, obj: WaylandObject, spec: MessageSpec,
                      args: list[ArgValue]) -> bool:
        """Learn the compositor's shm formats; False for an event the client must not
        see (a format the proxy cannot copy)."""
        if obj.interface.name == "wl_shm" and spec.name == "format":
            value = args[0]
            assert isinstance(value, int)
            if not single_plane(value):
                return False
            self.formats.add(value)
        return True

    def own_event(self, own: OwnObject, spec: MessageSpec, args: list[ArgValue],
                  up: Outbox) -> None:
        out = own.output
        if out is None or spec.name != "release":
            return
        if out.state is not OutputState.BUSY:
            return  # a release after retirement, or a duplicate: nothing to do
        latency = (self.clock() - out.attached_at) * 1000.0
        for c in self.counters:
            c.pages.in_use -= out.pages
            c.release_latency.add(latency)
        out.state = OutputState.RELEASED
        if out.shown:
            self.compositor_releases_shown = True
        self.released_since_block = True
        if out.orphaned:
            self._retire(out, up)

    def own_deleted(self, own: OwnObject) -> None:
        """The compositor is done with an upstream id of ours (``delete_id``): the
        grants behind it are the lifetimes' business, ended on their unmap notify."""

    def close(self) -> None:
        """The session is over: every area goes to wait for the compositor to let go,
        and every client fd is closed."""
        busy = [out for surface in self.surfaces.values() for out in surface.outputs.buffers
                if out.state is OutputState.BUSY]
        busy += [out for out in self._orphans if out.state is OutputState.BUSY]
        for out in busy:
            for c in self.counters:
                c.pages.in_use -= out.pages
        for surface in self.surfaces.values():
            surface.outputs.buffers.clear()
        self.surfaces.clear()
        self._orphans.clear()
        self.lifetimes.close_connection(self.owner)
        for pool in self._held_pools():
            pool.close()
        self.spent.close()
        self.pools.clear()
        self.buffers.clear()
        self._needed_pools = 0

    # -- pools and buffers -----------------------------------------------------

    def _held_pools(self) -> list[ClientPool]:
        """Every pool whose fd the proxy holds: live ones, and destroyed ones that
        buffers still use."""
        pools = {id(p): p for p in self.pools.values()}
        pools.update((id(b.pool), b.pool) for b in self.buffers.values())
        return list(pools.values())

    def _create_pool(self, obj: WaylandObject, args: list[ArgValue], fds: list[int],
                     up: Outbox, down: Outbox) -> Verdict:
        new_id, fd, size = args
        assert isinstance(new_id, int) and isinstance(fd, int) and isinstance(size, int)
        if self._needed_pools >= MAX_POOLS_PER_CLIENT:
            raise WireError(f"qubesshm: too many wl_shm pools: a client may hold "
                            f"{MAX_POOLS_PER_CLIENT} at once", ErrorCode.NO_MEMORY, DISPLAY_ID)
        pool = open_pool(new_id, fd, size, obj.id)
        fds.clear()  # the pool owns the fd now
        self.pools[new_id] = pool
        self._needed_pools += 1
        for c in self.counters:
            c.client_pools += 1
        return Verdict.CONSUMED

    def _create_buffer(self, obj: WaylandObject, args: list[ArgValue], fds: list[int],
                       up: Outbox, down: Outbox) -> Verdict:
        new_id, offset, width, height, stride, format_code = args
        assert isinstance(new_id, int)
        assert isinstance(offset, int) and isinstance(width, int) and isinstance(height, int)
        assert isinstance(stride, int) and isinstance(format_code, int)
        pool = self.pools[obj.id]
        self.buffers[new_id] = make_buffer(pool, new_id, offset, width, height, stride,
                                           format_code, self.formats)
        for c in self.counters:
            c.client_buffers += 1
        return Verdict.CONSUMED

    def _resize_pool(self, obj: WaylandObject, args: list[ArgValue], fds: list[int],
                     up: Outbox, down: Outbox) -> Verdict:
        size = args[0]
        assert isinstance(size, int)
        resize_pool(self.pools[obj.id], size)
        return Verdict.CONSUMED

    def _destroy_pool(self, obj: WaylandObject, args: list[ArgValue], fds: list[int],
                      up: Outbox, down: Outbox) -> Verdict:
        pool = self.pools.pop(obj.id)
        pool.alive = False
        if not pool.needed:
            self._spend(pool)
        return Verdict.CONSUMED

    def _spend(self, pool: ClientPool) -> None:
        """Nothing needs ``pool`` any more: its fd is closed with the spent pools."""
        self._needed_pools -= 1
        self.spent.add(pool)

    def _destroy_buffer(self, obj: WaylandObject, args: list[ArgValue], fds: list[int],
                        up: Outbox, down: Outbox) -> Verdict:
        buffer = self.buffers.pop(obj.id, None)
        if buffer is None:
            return Verdict.FORWARD  # not an shm buffer: the compositor owns it
        buffer.alive = False
        buffer.pool.buffers.discard(buffer.client_id)
        if not buffer.pool.needed:
            self._spend(buffer.pool)
        for out in [o for o in self._orphans if o.source is buffer]:
            # The compositor shows a closed window's output, which stands for this
            # buffer: without the proxy it would now lose the buffer, so it loses the
            # output (destroyed upstream in this batch, its area cached at once).
            self._give_back_busy(out, up)
        for surface in self.surfaces.values():
            # A destroyed pending buffer means a null attach, as in libwayland compositors.
            if surface.pending.attach is buffer:
                surface.pending.attach = Attach.OTHER
                self._send(up, obj_upstream(self.ids, surface.client_id), "wl_surface",
                           "attach", [None, surface.pending.dx, surface.pending.dy])
            if surface.buffer is buffer:
                surface.buffer = None
        return Verdict.CONSUMED

    # -- surface state -----------------------------------------------------------

    def _surface(self, client_id: int) -> Surface:
        surface = self.surfaces.get(client_id)
        if surface is None:
            surface = self.surfaces[client_id] = Surface(client_id)
        return surface

    def _attach(self, obj: WaylandObject, args: list[ArgValue], fds: list[int],
                up: Outbox, down: Outbox) -> Verdict:
        buffer_id, dx, dy = args
        assert isinstance(dx, int) and isinstance(dy, int)
        if obj.version >= 5 and (dx or dy):
            raise WireError(f"attach offset ({dx}, {dy}) is not allowed since version 5: use "
                            "wl_surface.offset", INVALID_OFFSET, obj.id)
        pending = self._surface(obj.id).pending
        shm = self.buffers.get(buffer_id) if isinstance(buffer_id, int) else None
        if shm is None:
            pending.attach = Attach.OTHER
            return Verdict.FORWARD
        pending.attach, pending.dx, pending.dy = shm, dx, dy
        return Verdict.CONSUMED

    def _damage(self, obj: WaylandObject, args: list[ArgValue], fds: list[int],
                up: Outbox, down: Outbox) -> Verdict:
        _add_damage(self._surface(obj.id).pending.surface_damage, _rect(args))
        return Verdict.FORWARD

    def _damage_buffer(self, obj: WaylandObject, args: list[ArgValue], fds: list[int],
                       up: Outbox, down: Outbox) -> Verdict:
        _add_damage(self._surface(obj.id).pending.buffer_damage, _rect(args))
        return Verdict.FORWARD

    def _set_transform(self, obj: WaylandObject, args: list[ArgValue], fds: list[int],
                       up: Outbox, down: Outbox) -> Verdict:
        transform = args[0]
        assert isinstance(transform, int)
        if transform not in TRANSFORMS:
            raise WireError(f"buffer transform value {transform} is invalid",
                            INVALID_TRANSFORM, obj.id)
        self._surface(obj.id).pending.transform = transform
        return Verdict.FORWARD

    def _set_scale(self, obj: WaylandObject, args: list[ArgValue], fds: list[int],
                   up: Outbox, down: Outbox) -> Verdict:
        scale = args[0]
        assert isinstance(scale, int)
        if scale < 1:
            raise WireError(f"buffer scale must be at least one ({scale} specified)",
                            INVALID_SCALE, obj.id)
        self._surface(obj.id).pending.scale = scale
        return Verdict.FORWARD

    def _destroy_surface(self, obj: WaylandObject, args: list[ArgValue], fds: list[int],
                         up: Outbox, down: Outbox) -> Verdict:
        surface = self.surfaces.pop(obj.id, None)
        if surface is not None:
            for out in surface.outputs.buffers:
                self._let_go(out, up)
        for viewport, surface_id in list(self.viewports.items()):
            if surface_id == obj.id:
                del self.viewports[viewport]
        return Verdict.FORWARD

    # -- viewports -----------------------------------------------------------------

    def _get_viewport(self, obj: WaylandObject, args: list[ArgValue], fds: list[int],
                      up: Outbox, down: Outbox) -> Verdict:
        new_id, surface_id = args
        assert isinstance(new_id, int) and isinstance(surface_id, int)
        self.viewports[new_id] = surface_id
        surface = self._surface(surface_id)
        if not surface.viewport_gone or surface.viewport_requests is None:
            surface.viewport_requests = ViewportRequests()
        # else: the destroyed viewport's unsets stay pending (the compositor keeps them),
        # and the new viewport's requests override them.
        surface.viewport_gone = False
        return Verdict.FORWARD

    def _viewport_surface(self, viewport_id: int) -> Surface | None:
        surface_id = self.viewports.get(viewport_id)
        return None if surface_id is None else self.surfaces.get(surface_id)

    def _live_viewport_surface(self, viewport_id: int) -> Surface:
        if viewport_id not in self.viewports:
            raise WireError("wl_surface for this viewport no longer exists", VIEWPORT_NO_SURFACE,
                            viewport_id)
        return self._surface(self.viewports[viewport_id])

    def _set_source(self, obj: WaylandObject, args: list[ArgValue], fds: list[int],
                    up: Outbox, down: Outbox) -> Verdict:
        surface = self._live_viewport_surface(obj.id)
        values = [Fraction(a.raw, 256) for a in args if isinstance(a, Fixed)]
        if all(v == -1 for v in values):
            source = None
        elif values[0] < 0 or values[1] < 0 or values[2] <= 0 or values[3] <= 0:
            raise WireError("source rectangle out of bounds", VIEWPORT_BAD_VALUE, obj.id)
        else:
            source = (values[0], values[1], values[2], values[3])
        if surface.viewport_requests is not None:
            surface.viewport_requests.source = source
            surface.viewport_requests.source_set = True
        return Verdict.FORWARD

    def _set_destination(self, obj: WaylandObject, args: list[ArgValue], fds: list[int],
                         up: Outbox, down: Outbox) -> Verdict:
        surface = self._live_viewport_surface(obj.id)
        width, height = args
        assert isinstance(width, int) and isinstance(height, int)
        if width == -1 and height == -1:
            destination = None
        elif width <= 0 or height <= 0:
            raise WireError("destination size is not integer or not positive",
                            VIEWPORT_BAD_VALUE, obj.id)
        else:
            destination = (width, height)
        if surface.viewport_requests is not None:
            surface.viewport_requests.destination = destination
            surface.viewport_requests.destination_set = True
        return Verdict.FORWARD

    def _destroy_viewport(self, obj: WaylandObject, args: list[ArgValue], fds: list[int],
                          up: Outbox, down: Outbox) -> Verdict:
        surface = self._viewport_surface(obj.id)
        self.viewports.pop(obj.id, None)
        if surface is not None and surface.viewport_requests is not None:
            surface.viewport_requests = ViewportRequests(None, None, True, True)
            surface.viewport_gone = True
        return Verdict.FORWARD

    # -- commit: copy into an output buffer ------------------------------------

    def _commit(self, obj: WaylandObject, args: list[ArgValue], fds: list[int],
                up: Outbox, down: Outbox) -> Verdict:
        surface = self._surface(obj.id)
        for c in self.counters:
            c.commits += 1
        buffer = surface.next_buffer()
        newly = isinstance(surface.pending.attach, ClientBuffer)
        pending = surface.pending
        has_damage = bool(pending.surface_damage or pending.buffer_damage)
        if buffer is None or not buffer.alive or not (newly or has_damage):
            surface.apply()
            if surface.buffer is None:
                # Something other than our copy is shown now (nothing, or a non-shm
                # buffer): the next shm buffer is copied whole.
                surface.shown_key = None
                surface.outputs.show(None)
            return Verdict.FORWARD
        # Output buffers of another shape (the window was resized, or changed format)
        # are not needed any more: they go once the compositor has let go of them.
        for other in [o for o in surface.outputs.buffers if o.key != buffer.key]:
            surface.outputs.buffers.remove(other)
            self._let_go(other, up)
        out = surface.outputs.pick(buffer.key)
        area: Area | None = None
        if out is None:
            if surface.outputs.full:
                return self._wait(for_room=False)
            try:
                area = self._take_area(surface, buffer, up)
            except NoRoom:
                # A compositor that has released a buffer it was showing (one that
                # copies shm buffers to the screen) will release this one too: wait.
                out = (None if self.compositor_releases_shown
                       else surface.outputs.refillable(buffer.key))
                if out is None:
                    return self._wait(for_room=True)
                for c in self.counters:
                    c.refills_in_place += 1
        self._waited()
        damage = surface.commit_damage(buffer)
        geometry_changed = surface.apply()
        if geometry_changed or (newly and buffer.key != surface.shown_key):
            surface.outputs.make_stale()
        surface.outputs.add_damage(damage)
        surface.shown_key = buffer.key
        if out is None:
            assert area is not None
            out = self._new_output(buffer, area, up)
            surface.outputs.buffers.append(out)
        layout = Layout(buffer.offset, buffer.width, buffer.height, buffer.stride,
                        bytes_per_pixel(buffer.format))
        try:
            mapped = buffer.pool.mapped()
            with memoryview(out.area.grant.area.memory) as memory:
                if mapped is not None:
                    with memoryview(mapped) as source:
                        written = copy_region_mapped(source, layout, out.stale, memory)
                else:
                    written = copy_region(buffer.pool.fd, layout, out.stale, memory)
        except ShortRead as exc:
            raise ShmError(buffer.client_id, INVALID_FD,
                           f"error accessing SHM buffer: the client's file is shorter than "
                           f"its buffer ({exc})") from exc
        except OSError as exc:
            raise ShmError(buffer.client_id, INVALID_FD,
                           f"error accessing SHM buffer: {exc.strerror or exc}") from exc
        out.stale = Region()
        out.source = buffer
        was_busy = out.state is OutputState.BUSY  # filled again in place
        out.state = OutputState.BUSY
        out.attached_at = self.clock()
        surface.outputs.show(out)
        surface_up = obj_upstream(self.ids, obj.id)
        dx, dy = (pending.dx, pending.dy) if newly else (0, 0)
        self._send(up, surface_up, "wl_surface", "attach", [out.upstream_id, dx, dy])
        self._send(up, surface_up, "wl_surface", "commit", [])
        damaged = damaged_bytes(layout, damage)
        for c in self.counters:
            if not was_busy:
                c.pages.in_use += out.pages
            c.bytes_damaged += damaged
            c.bytes_copied += written
        if newly:
            data, _ = encode_message(buffer.client_id, self._wl_buffer.events[0], [])
            self.own.add(data, [])
            self.released_early = True
            for c in self.counters:
                c.early_releases += 1
        return Verdict.CONSUMED

    def _take_area(self, surface: Surface, buffer: ClientBuffer, up: Outbox) -> Area:
        """Grant pages for a new output of ``buffer``'s shape; ``NoRoom`` if the limits
        have none now (the commit waits), a ``no_memory`` error if they never will."""
        width, height, stride = buffer.width, buffer.height, buffer.stride
        if stride * height > MAX_POOL_SIZE - PAGE_SIZE:
            # wl_shm.create_pool's size is an int32: no pool of the compositor can hold it.
            raise WireError(f"qubesshm: a {width}x{height} buffer of stride {stride} does not "
                            f"fit a wl_shm pool ({MAX_POOL_SIZE - PAGE_SIZE} bytes at most)",
                            ErrorCode.NO_MEMORY, DISPLAY_ID)
        try:
            try:
                return self.lifetimes.take(self.owner, stride * height)
            except NoRoom:
                if not self._shed(surface, up):
                    raise
                return self.lifetimes.take(self.owner, stride * height)
        except GrantLimit as exc:
            raise WireError(f"qubesshm: {exc}", ErrorCode.NO_MEMORY, DISPLAY_ID) from exc

    def _shed(self, surface: Surface, up: Outbox) -> bool:
        """Make room for ``surface``'s new output out of this client's own outputs: the
        ones the compositor released (their surfaces fall back to fewer, and copy whole
        next time), and the old-shaped one this surface still shows. True if any went."""
        shed = False
        for other in self.surfaces.values():
            outputs = other.outputs
            for out in [o for o in outputs.buffers if o.state is OutputState.RELEASED]:
                outputs.buffers.remove(out)
                if outputs.current is out:
                    outputs.show(None)  # released: the compositor keeps no need of it
                self._retire(out, up)
                shed = True
        # The window changed shape and the compositor still shows its old buffer, which
        # it lets go of only once another is attached: give that one back (destroyed
        # upstream in the batch that attaches its successor, its area cached, reused if
        # it fits or evicted for room) rather than wait for the release this commit brings.
        old = surface.outputs.current
        if old is not None and old.orphaned and old.state is OutputState.BUSY:
            self._give_back_busy(old, up)
            surface.outputs.show(None)
            shed = True
        return shed

    def _wait(self, *, for_room: bool) -> Verdict:
        """The commit waits for the compositor to release an output buffer, or for the
        limits to have room for one; the session parks it and tries again."""
        self.released_since_block = False
        self.waiting_for_room = for_room
        if self._waiting_since is None:
            self._waiting_since = self.clock()
        self._waited_for_room = self._waited_for_room or for_room
        for c in self.counters:
            c.commits -= 1  # counted again when it goes through
        return Verdict.BLOCKED

    def _waited(self) -> None:
        """A commit that waited goes through: count how long it waited."""
        if self._waiting_since is None:
            return
        waited = (self.clock() - self._waiting_since) * 1000.0
        for c in self.counters:
            c.commit_waits.add(waited)
            if self._waited_for_room:
                c.waits_for_room += 1
        self._waiting_since = None
        self._waited_for_room = self.waiting_for_room = False

    def _new_output(self, buffer: ClientBuffer, area: Area, up: Outbox) -> OutputBuffer:
        width, height, stride = buffer.width, buffer.height, buffer.stride
        if not area.pool_id:
            area.pool_id = self.ids.add_own_object(OwnObject(self._wl_shm_pool))
            shm_up = obj_upstream(self.ids, buffer.pool.shm_id)
            # The pool lives as long as the area is ours, so a later buffer of any
            # surface can be made in it without a new grant or a new mmap.
            self._send(up, shm_up, "wl_shm", "create_pool",
                       [area.pool_id, area.mapping.pool_fd(), area.mapping.size])
            for c in self.counters:
                c.upstream_pools += 1
        out = OutputBuffer(buffer.key, area, 0, Region.full(width, height))
        out.upstream_id = self.ids.add_own_object(OwnObject(self._wl_buffer, out))
        self._send(up, area.pool_id, "wl_shm_pool", "create_buffer",
                   [out.upstream_id, 0, width, height, stride, buffer.format])
        for c in self.counters:
            c.upstream_buffers += 1
        return out

    # -- retiring output buffers -------------------------------------------------

    def _let_go(self, out: OutputBuffer, up: Outbox) -> None:
        """A surface no longer needs ``out``: retire it now, or when it is released.

        One the compositor holds waits for that release, as the client's buffer would
        have been held, unless the client already destroyed the buffer it stands for
        (then the compositor would have lost it: so it loses the output now), or until
        the client destroys that buffer (``_destroy_buffer``)."""
        if out.state is OutputState.RELEASED:
            self._retire(out, up)
        elif out.state is OutputState.BUSY and out.source is not None and not out.source.alive:
            self._give_back_busy(out, up)
        elif out.state is OutputState.BUSY:
            out.orphaned = True
            out.orphaned_at = self.clock()
            self._orphans.add(out)
            self.lifetimes.freed_while_held(out.area)

    def poll(self, up: Outbox) -> None:
        """Timer work: a compositor may keep a closed window's last buffer a while (a
        close animation) and release it later, to be cached as usual; one it still holds
        ``late_timeout`` seconds on is destroyed upstream and its area let go, never
        reused (the compositor may still show it), to end on its unmap notify or go to
        deferred reclaim."""
        timeout = self.lifetimes.policy.late_timeout
        now = self.clock()
        for out in [o for o in self._orphans if now - o.orphaned_at >= timeout]:
            self._orphans.discard(out)
            if out.state is not OutputState.BUSY:
                continue
            out.state = OutputState.RETIRED
            for c in self.counters:
                c.pages.in_use -= out.pages
                c.orphans_timed_out += 1
            self._send(up, out.upstream_id, "wl_buffer", "destroy", [])
            self.ids.destroyed(out.upstream_id)
            self.lifetimes.let_go(out.area)

    def _retire(self, out: OutputBuffer, up: Outbox) -> None:
        """Destroy a released output buffer upstream; its area goes back to the cache."""
        self._orphans.discard(out)
        out.state = OutputState.RETIRED
        self._send(up, out.upstream_id, "wl_buffer", "destroy", [])
        self.ids.destroyed(out.upstream_id)
        # Cached now; trimmed to the cache's bound once the batch went on (the I/O
        # layer calls ``lifetimes.trim``), off the path of the replies the client awaits.
        self.lifetimes.give_back(out.area, trim=False)

    def _give_back_busy(self, out: OutputBuffer, up: Outbox) -> None:
        """Retire an output the compositor has not released (it shows it): destroyed
        upstream, as a client may destroy a buffer it attached, in the same batch as the
        commit that replaces it, so no repaint falls between."""
        for c in self.counters:
            c.pages.in_use -= out.pages
        self._retire(out, up)

    def _destroy_upstream_pool(self, area: Area) -> None:
        """The lifetimes evicted ``area``: its pool goes, and the compositor's mmap
        with it once the compositor has handled that."""
        self._send(self.later, area.pool_id, "wl_shm_pool", "destroy", [])
        self.ids.destroyed(area.pool_id)
        area.pool_id = 0
        if self.wake is not None:
            self.wake()

    # -- encoding ----------------------------------------------------------------

    def _send(self, out: Outbox, object_id: int, interface: str, name: str,
              args: list[ArgValue]) -> None:
        spec = self._req[(interface, name)]
        data, fds = encode_message(object_id, spec, args)
        if self.trace is not None:
            self.trace(object_id, spec, args)
        out.add(data, fds)


# The (interface, request) pairs the bridge acts on; every other request of those
# interfaces is forwarded as the plain relay would (the relay's fast path may take it).
INTERCEPTED_REQUESTS = frozenset({
    ("wl_shm", "create_pool"), ("wl_shm_pool", "create_buffer"), ("wl_shm_pool", "resize"),
    ("wl_shm_pool", "destroy"), ("wl_buffer", "destroy"), ("wl_surface", "attach"),
    ("wl_surface", "damage"), ("wl_surface", "damage_buffer"),
    ("wl_surface", "set_buffer_transform"), ("wl_surface", "set_buffer_scale"),
    ("wl_surface", "commit"), ("wl_surface", "destroy"), ("wp_viewporter", "get_viewport"),
    ("wp_viewport", "set_source"), ("wp_viewport", "set_destination"),
    ("wp_viewport", "destroy"),
})


def obj_upstream(ids: UpstreamIds, client_id: int) -> int:
    upstream = ids.upstream(client_id)
    if upstream is None:
        raise WireError(f"object {client_id} is not known to the compositor",
                        ErrorCode.IMPLEMENTATION)
    return upstream


def _add_damage(rects: list[Rect], rect: Rect) -> None:
    """Add to a commit's damage; past MAX_RECTS rectangles it becomes their bounding box,
    so a flood of damage requests costs the proxy nothing more than one rectangle."""
    if rect.empty:
        return
    rects.append(rect)
    if len(rects) > MAX_RECTS:
        box = Region(rects).bounds()
        rects[:] = [box]


def _rect(args: Sequence[ArgValue]) -> Rect:
    x, y, width, height = args
    assert isinstance(x, int) and isinstance(y, int)
    assert isinstance(width, int) and isinstance(height, int)
    return Rect(x, y, width, height)
