"""Sans-IO relay core for one client: validates, tracks and forwards every message.

Bytes and fds from either peer go in; what to send to each peer comes out.
Requests are checked as strictly as a libwayland server checks them, so a bad
client gets a ``wl_display.error`` from the proxy and the compositor never sees
its garbage. Registry globals whose interface the proxy cannot decode are hidden
from the client, and advertised versions are capped at what the XML knows.
Messages are forwarded byte for byte unless the proxy had to rewrite them.
"""

from __future__ import annotations

import enum
import struct
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ..grants.ledger import ClientCounters
from ..objects.idmap import UpstreamIds
from ..objects.objectmap import DISPLAY_ID, ObjectMap, WaylandObject
from ..shm.bridge import OwnObject, ShmBridge, ShmHandler, Verdict
from ..wire.codec import (
    DEFAULT_MAX_MESSAGE_SIZE,
    HEADER,
    HEADER_SIZE,
    ArgValue,
    ErrorCode,
    Frame,
    UntypedNewId,
    WireError,
    WireReader,
    decode_args,
    encode_message,
)
from ..wire.protocol import ArgKind, InterfaceSpec, MessageSpec, ProtocolTable
from .fastpath import Relay, select_fast_path

# A message header's first word: the object id, as the codec writes it.
_OBJECT_ID = struct.Struct("=I")

if TYPE_CHECKING:
    from ..grants.lifetimes import GrantLifetimes

# A message may wait for fds that a later sendmsg carries, but only this far:
# every real sender passes the fds no later than the following few messages.
FD_WAIT_LIMIT_BYTES = 64 * 1024
# Fds received ahead of the messages that claim them; libwayland's own fd buffer
# holds 1024, and every unclaimed one is an open file in the proxy.
MAX_UNCLAIMED_FDS = 1024


# Globals a VM's compositor connection cannot use: dma-buf cannot cross a VM boundary,
# so toolkits that do not see it fall back to wl_shm.
DMABUF_INTERFACES = frozenset({"zwp_linux_dmabuf_v1"})

# The error text quotes client input, so it is cut to keep the event well under
# any peer's maximum message size.
ERROR_MESSAGE_LIMIT = 1024


def abridge(text: str, limit: int) -> str:
    raw = text.encode("utf-8", "surrogateescape")
    if len(raw) <= limit:
        return text
    return raw[: limit - 3].decode("utf-8", "ignore") + "..."


class Direction(enum.Enum):
    REQUEST = "->"
    EVENT = "<-"


@dataclass(frozen=True, slots=True)
class Relayed:
    """One message the session handled, for the protocol log."""

    direction: Direction
    obj: WaylandObject
    spec: MessageSpec
    args: Sequence[ArgValue]
    note: str = ""
    # The ids are the compositor connection's (a request the proxy made itself).
    upstream: bool = False


Segment = tuple[bytes, list[int]]


class Outbox:
    """Outgoing bytes in segments whose fds must be sent with (or before) their bytes."""

    def __init__(self) -> None:
        self._segments: list[tuple[bytearray, list[int]]] = []

    def add(self, data: bytes, fds: list[int]) -> None:
        if fds or not self._segments:
            self._segments.append((bytearray(data), list(fds)))
        else:
            self._segments[-1][0].extend(data)

    def __bool__(self) -> bool:
        return bool(self._segments)

    def take(self) -> list[Segment]:
        out = [(bytes(data), fds) for data, fds in self._segments]
        self._segments = []
        return out


@dataclass(slots=True)
class Step:
    """What one input produced."""

    to_compositor: list[Segment] = field(default_factory=list)
    to_client: list[Segment] = field(default_factory=list)
    # Set when the session is over: flush ``to_client`` (it ends with the error
    # for the client when the client was at fault), then close both sides.
    error: WireError | None = None
    client_at_fault: bool = False
    # Fds of the rejected message: taken off the wire, forwarded nowhere.
    discarded_fds: list[int] = field(default_factory=list)
    # The proxy's own events, in the order made: the delete_ids of the objects it kept
    # (pools and buffers) and the early releases of the buffers it copied. The I/O layer
    # sends them with its next write to the client, ahead of what that write carries.
    own_events: list[Segment] = field(default_factory=list)
    # Whether ``own_events`` may wait for the compositor's answer to this step (at most
    # the I/O layer's bound) and go to the client in one write with it: the step went
    # upstream with nothing else for the client, and if it released a buffer, a client
    # could wait for that release, so the step must carry a ``wl_display.sync``, which
    # the compositor answers at once (a frame callback may wait for the next repaint).
    own_events_wait: bool = False


@dataclass(slots=True)
class _Global:
    interface: InterfaceSpec
    version: int


class RelaySession:
    """The protocol state of one proxied client connection."""

    # Off only in tests that hold the fast path to the full path's output.
    fast_path_enabled = True

    def __init__(
        self,
        protocol: ProtocolTable,
        *,
        max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE,
        tracer: Callable[[Relayed], None] | None = None,
        on_hidden_global: Callable[[str, int], None] | None = None,
        grants: GrantLifetimes | None = None,
        owner: int = 1,
        counters: Sequence[ClientCounters] = (),
        clock: Callable[[], float] = time.monotonic,
        hidden_interfaces: frozenset[str] = frozenset(),
    ) -> None:
        self.protocol = protocol
        # The plain relay (no grants: the codec and session tests) leaves skipped new
        # ids to the compositor to refuse; with grants the id spaces differ, a skipped
        # id would be renumbered rather than refused, so the proxy refuses it itself.
        self.objects = ObjectMap(protocol["wl_display"], refuse_skipped_ids=grants is not None)
        self.ids = UpstreamIds()
        # Without grants the session is the plain validating relay (the codec and
        # session tests use it so); the proxy always gives it grants.
        # What the proxy sends upstream on its own, outside any client request.
        self._later = Outbox()
        # The proxy's own events of the pump under way (delete_ids of objects it kept, the
        # bridge's early releases), in the order made.
        self._own_events = Outbox()
        self.shm = (ShmBridge(protocol, self.ids, grants, owner, counters, clock, self._later,
                              self._own_events, self._trace_own if tracer is not None else None)
                    if grants is not None else None)
        self.hidden_interfaces = hidden_interfaces
        # A commit waiting for an output buffer, and the requests behind it.
        self._parked: tuple[WaylandObject, MessageSpec, Frame, list[ArgValue]] | None = None
        self._inflight_fds: list[int] = []
        self._faulting = Direction.REQUEST
        self.tracer = tracer
        self.on_hidden_global = on_hidden_global
        self._requests = WireReader(max_message_size)
        self._events = WireReader(max_message_size)
        self._globals: dict[int, _Global] = {}
        # The bridge's handler of each request kind (None: relayed as it is), by id of
        # its (long-lived) MessageSpec.
        self._shm_handlers: dict[int, ShmHandler | None] = {}
        self._hidden_globals: set[int] = set()
        self._display_error = protocol["wl_display"].events[0]
        self._delete_id = protocol["wl_display"].events[1]
        self.closed = False
        # The protocol log needs every message decoded, so it turns the fast path off.
        # The fast path is the compiled core's unless QUBESSHM_PURE_PYTHON=1 (or it is
        # not built): serve's start line says which.
        self._fast: Relay | None = None
        if self.fast_path_enabled and tracer is None:
            factory, _ = select_fast_path()
            self._fast = factory(protocol, self.objects, self.ids,
                                 intercepting=self.shm is not None,
                                 max_message_size=max_message_size)

    def _trace_own(self, upstream_id: int, spec: MessageSpec, args: list[ArgValue]) -> None:
        """Log a request the proxy made upstream; its ids are the compositor's."""
        assert self.tracer is not None
        obj = WaylandObject(upstream_id, self.protocol[spec.interface], 1)
        self.tracer(Relayed(Direction.REQUEST, obj, spec, args, "by qubesshm, upstream ids",
                            upstream=True))

    @property
    def request_backlog(self) -> int:
        """Bytes of requests received and not yet handled."""
        return self._requests.buffered_bytes

    @property
    def blocked(self) -> bool:
        """A commit waits for the compositor to release an output buffer: the I/O
        layer should stop reading the client meanwhile."""
        return self._parked is not None

    # -- inputs -------------------------------------------------------------

    def from_client(self, data: bytes, fds: Sequence[int] = ()) -> Step:
        self._requests.feed(data, fds)
        return self._pump(Direction.REQUEST, at_eof=False)

    def from_compositor(self, data: bytes, fds: Sequence[int] = ()) -> Step:
        self._events.feed(data, fds)
        return self._pump(Direction.EVENT, at_eof=False)

    def client_eof(self) -> Step:
        """The client will send no more: anything half-sent is a violation."""
        return self._pump(Direction.REQUEST, at_eof=True)

    def compositor_eof(self) -> Step:
        return self._pump(Direction.EVENT, at_eof=True)

    def unclaimed_fds(self) -> list[int]:
        """Fds received but never forwarded; the owner closes them."""
        return self._requests.drain_fds() + self._events.drain_fds()

    def end(self) -> None:
        """The connection is gone: release every grant and client fd the session holds."""
        self.closed = True
        if self.shm is not None:
            self.shm.close()

    @property
    def spent(self) -> bool:
        """The client is done with pools whose fds are still open: ``close_spent``
        closes them (the I/O layer does, a moment after it has sent the step)."""
        return self.shm is not None and bool(self.shm.spent)

    def close_spent(self) -> None:
        if self.shm is not None:
            self.shm.spent.close()

    @property
    def waiting_for_room(self) -> bool:
        """The parked commit waits for the grant limits to have room, which pages freed
        anywhere in the proxy may bring: try it again with ``retry``."""
        return self._parked is not None and self.shm is not None and self.shm.waiting_for_room

    def retry(self) -> Step:
        """Try the parked commit again (the limits may have room now), and the requests
        behind it if it goes through."""
        if self._parked is None:
            return Step()
        return self._pump(Direction.REQUEST, at_eof=False)

    def poll(self) -> Step:
        """Timer work of the buffer path (output buffers the compositor holds too long)."""
        if self.shm is None or self.closed:
            return Step()
        upstream = Outbox()
        self.shm.poll(upstream)
        self._add_later(upstream)
        return Step(to_compositor=upstream.take())

    def flush(self) -> Step:
        """What the proxy sends upstream on its own (a cached area evicted meanwhile)."""
        upstream = Outbox()
        self._add_later(upstream)
        return Step(to_compositor=upstream.take())

    def _add_later(self, upstream: Outbox) -> None:
        if self._later and not self.closed:
            for data, fds in self._later.take():
                upstream.add(data, fds)

    # -- the pump ------------------------------------------------------------

    def _pump(self, direction: Direction, *, at_eof: bool) -> Step:
        step = Step()
        if self.closed:
            return step
        upstream, downstream = Outbox(), Outbox()
        self._inflight_fds = []
        self._faulting = direction
        try:
            if direction is Direction.REQUEST:
                self._pump_requests(at_eof, upstream, downstream)
            else:
                self._pump_events(at_eof, upstream, downstream)
                if (self._parked is not None and self.shm is not None
                        and self.shm.released_since_block):
                    self._pump_requests(False, upstream, downstream)
        except WireError as err:
            self.closed = True
            step.discarded_fds = self._inflight_fds
            step.error = err
            step.client_at_fault = self._faulting is Direction.REQUEST
            if not step.client_at_fault and err.code is not ErrorCode.NO_MEMORY:
                err = WireError(f"qubesshm: the compositor broke the protocol: {err.message}",
                                ErrorCode.IMPLEMENTATION, DISPLAY_ID)
            data, _ = encode_message(DISPLAY_ID, self._display_error,
                                     [err.object_id, int(err.code),
                                      abridge(err.message, ERROR_MESSAGE_LIMIT)])
            downstream.add(data, [])
        self._inflight_fds = []
        self._add_later(upstream)
        step.to_compositor = upstream.take()
        step.to_client = downstream.take()
        if self._own_events:
            step.own_events = self._own_events.take()
            if step.error is not None:  # the last write to the client: they go first
                step.to_client = step.own_events + step.to_client
                step.own_events = []
            else:
                step.own_events_wait = bool(step.to_compositor) and not step.to_client and (
                    not (self.shm is not None and self.shm.released_early)
                    or carries_sync(step.to_compositor))
        if self.shm is not None:
            self.shm.released_early = False
        return step

    def _next_frame(self, reader: WireReader, at_eof: bool) -> tuple[int, int, int] | None:
        head = reader.peek()
        if head is None and at_eof and reader.buffered_bytes:
            raise WireError(f"connection closed inside a message "
                            f"({reader.buffered_bytes} bytes left over)")
        return head

    def _after_fast_path(self, reader: WireReader,
                         fast: Callable[[bytes, int, Outbox], int] | None, out: Outbox,
                         at_eof: bool) -> tuple[int, int, int] | None:
        """The next message for the full path, once the fast path (if on) has relayed
        into ``out`` every message before it that it could."""
        if fast is not None:
            buf, pos = reader.unread()
            reader.skip_to(fast(buf, pos, out))
        return self._next_frame(reader, at_eof)

    def _take(self, reader: WireReader, obj: WaylandObject, spec: MessageSpec, size: int,
              at_eof: bool) -> Frame | None:
        taken = reader.take(size, spec.fd_count)
        if taken is None:
            if at_eof or reader.buffered_bytes > FD_WAIT_LIMIT_BYTES:
                raise WireError(
                    f"{obj}.{spec.name} needs {spec.fd_count} fd(s) but only "
                    f"{reader.buffered_fds} arrived",
                    object_id=obj.id,
                )
            return None
        frame, self._inflight_fds = taken
        return frame

    def _check_unclaimed(self, reader: WireReader) -> None:
        if reader.buffered_fds > MAX_UNCLAIMED_FDS:
            raise WireError(f"more than {MAX_UNCLAIMED_FDS} file descriptors sent ahead "
                            "of their messages", ErrorCode.NO_MEMORY)

    def _pump_requests(self, at_eof: bool, up: Outbox, down: Outbox) -> None:
        self._faulting = Direction.REQUEST
        if self._parked is not None:
            if at_eof:
                return  # the client left; its parked commit goes with it
            self._check_unclaimed(self._requests)
            parked_obj, parked_spec, parked_frame, parked_args = self._parked
            self._parked = None
            if not self._dispatch_request(parked_obj, parked_spec,
                                          self._shm_handler(parked_spec), parked_frame,
                                          parked_args, [], up, down):
                return
        reader = self._requests
        fast = None if self._fast is None else self._fast.requests
        while (head := self._after_fast_path(reader, fast, up, at_eof)) is not None:
            object_id, opcode, size = head
            obj, spec = self._resolve(Direction.REQUEST, object_id, opcode)
            frame = self._take(reader, obj, spec, size, at_eof)
            if frame is None:
                break
            if not self._relay_request(obj, spec, frame, self._inflight_fds, up, down):
                self._inflight_fds = []
                return
            self._inflight_fds = []
        self._check_unclaimed(reader)

    def _pump_events(self, at_eof: bool, up: Outbox, down: Outbox) -> None:
        reader = self._events
        fast = None if self._fast is None else self._fast.events
        while (head := self._after_fast_path(reader, fast, down, at_eof)) is not None:
            upstream_id, opcode, size = head
            own = self.ids.owner(upstream_id)
            if isinstance(own, OwnObject):
                if not self._own_event(reader, upstream_id, own, opcode, size, at_eof, up):
                    break
                continue
            client_id = self.ids.client(upstream_id)
            if client_id is None:
                raise WireError(f"event for unknown object {upstream_id}")
            obj, spec = self._resolve(Direction.EVENT, client_id, opcode)
            frame = self._take(reader, obj, spec, size, at_eof)
            if frame is None:
                break
            self._relay_event(obj, spec, frame, self._inflight_fds, down)
            self._inflight_fds = []
        self._check_unclaimed(reader)

    def _own_event(self, reader: WireReader, upstream_id: int, own: OwnObject, opcode: int,
                   size: int, at_eof: bool, up: Outbox) -> bool:
        """An event for an object the proxy made upstream: it stays in the proxy."""
        assert self.shm is not None
        obj = WaylandObject(upstream_id, own.interface, 1)
        if opcode >= len(own.interface.events):
            raise WireError(f"invalid event {opcode} of {obj}")
        spec = own.interface.events[opcode]
        frame = self._take(reader, obj, spec, size, at_eof)
        if frame is None:
            return False
        args = self._decode(obj, spec, frame, self._inflight_fds)
        if self.tracer is not None:
            self.tracer(Relayed(Direction.EVENT, obj, spec, args, "to qubesshm"))
        self.shm.own_event(own, spec, args, up)
        self._inflight_fds = []
        return True

    def _resolve(self, direction: Direction, object_id: int,
                 opcode: int) -> tuple[WaylandObject, MessageSpec]:
        if direction is Direction.REQUEST:
            obj = self.objects.live(object_id)
            if obj is None:
                raise WireError(f"invalid object {object_id}", ErrorCode.INVALID_OBJECT,
                                DISPLAY_ID)
            messages = obj.interface.requests
        else:
            found = self.objects.get(object_id)
            if found is None:
                raise WireError(f"event for unknown object {object_id}")
            obj = found
            messages = obj.interface.events
        if opcode >= len(messages):
            raise WireError(f"invalid {'method' if direction is Direction.REQUEST else 'event'} "
                            f"{opcode} of {obj}", ErrorCode.INVALID_METHOD, object_id)
        spec = messages[opcode]
        if direction is Direction.REQUEST and spec.since > obj.version:
            raise WireError(f"invalid method {opcode} ({spec.name}) of {obj}: since "
                            f"{spec.since} > object version {obj.version}",
                            ErrorCode.INVALID_METHOD, object_id)
        return obj, spec

    def _decode(self, obj: WaylandObject, spec: MessageSpec, frame: Frame,
                fds: list[int]) -> list[ArgValue]:
        try:
            return decode_args(spec, frame.data, fds)
        except WireError as err:
            err.object_id = obj.id
            raise

    # -- requests ------------------------------------------------------------

    def _shm_handler(self, spec: MessageSpec) -> ShmHandler | None:
        key = id(spec)
        if key in self._shm_handlers:
            return self._shm_handlers[key]
        handler = self._shm_handlers[key] = (None if self.shm is None
                                             else self.shm.handler(spec))
        return handler

    def _relay_request(self, obj: WaylandObject, spec: MessageSpec, frame: Frame,
                       fds: list[int], up: Outbox, down: Outbox) -> bool:
        """Validate, track and relay one request; False if it must wait (parked)."""
        args = self._decode(obj, spec, frame, fds)
        for index, arg in spec.object_args:
            value = args[index]
            if value is not None:
                # libwayland reports bad object arguments as invalid arguments, on
                # wl_display.
                assert isinstance(value, int)
                target = self.objects.live(value)
                if target is None:
                    raise WireError(f"invalid arguments for {obj}.{spec.name}: argument "
                                    f"{arg.name} is invalid object {value}",
                                    ErrorCode.INVALID_METHOD, DISPLAY_ID)
                if arg.interface is not None and target.interface.name != arg.interface:
                    raise WireError(
                        f"invalid arguments for {obj}.{spec.name}: argument {arg.name} must "
                        f"be a {arg.interface}, got {target}",
                        ErrorCode.INVALID_METHOD, DISPLAY_ID)
        if spec.new_id_index is not None:
            self._create_from_request(obj, spec, args)
        return self._dispatch_request(obj, spec, self._shm_handler(spec), frame, args, fds,
                                      up, down)

    def _dispatch_request(self, obj: WaylandObject, spec: MessageSpec,
                          handler: ShmHandler | None, frame: Frame, args: list[ArgValue],
                          fds: list[int], up: Outbox, down: Outbox) -> bool:
        verdict = Verdict.FORWARD
        if handler is not None:
            verdict = handler(obj, args, fds, up, down)
            if verdict is Verdict.BLOCKED:
                self._parked = (obj, spec, frame, args)
                if self.tracer is not None:
                    self.tracer(Relayed(Direction.REQUEST, obj, spec, args,
                                        "waiting for the compositor to release a buffer"))
                return False
        if verdict is Verdict.CONSUMED:
            if spec.new_id_index is not None:
                created = args[spec.new_id_index]
                assert isinstance(created, int)
                self.ids.add_local(created)
            if spec.destructor:
                self.objects.destroyed(obj, by_compositor=False)
                if self.ids.upstream(obj.id) is None:
                    # The compositor never knew it: the proxy retires the id itself.
                    self.ids.remove_local(obj.id)
                    self.objects.delete_id(obj.id)
                    data, _ = encode_message(DISPLAY_ID, self._delete_id, [obj.id])
                    self._own_events.add(data, [])
            if self.tracer is not None:
                self.tracer(Relayed(Direction.REQUEST, obj, spec, args, "kept by qubesshm"))
            return True
        if spec.destructor:
            self.objects.destroyed(obj, by_compositor=False)
        self._forward_request(obj, spec, frame, args, fds, up)
        return True

    def _forward_request(self, obj: WaylandObject, spec: MessageSpec, frame: Frame,
                         args: list[ArgValue], fds: list[int], up: Outbox) -> None:
        ids = self.ids
        target = ids.upstream(obj.id)
        if target is None:
            raise WireError(f"{obj} is kept by qubesshm; the compositor cannot take "
                            f"{obj}.{spec.name}", ErrorCode.INVALID_OBJECT, obj.id)
        # Only the sender's id differs: the message is the client's with a new header.
        renumbered = target != obj.id
        changed = False  # an argument differs
        translated: list[ArgValue] = list(args)
        for index, arg in spec.id_args:
            value = args[index]
            kind = arg.kind
            if kind is ArgKind.OBJECT and value is not None:
                assert isinstance(value, int)
                upstream = ids.upstream(value)
                if upstream is None:
                    raise WireError(
                        f"invalid arguments for {obj}.{spec.name}: qubesshm copies "
                        f"wl_shm buffers into grant pages and cannot hand "
                        f"{self.objects.get(value)} itself to the compositor",
                        ErrorCode.INVALID_METHOD, DISPLAY_ID)
                if upstream != value:
                    translated[index] = upstream
                    changed = True
            elif kind is ArgKind.NEW_ID:
                if isinstance(value, UntypedNewId):
                    upstream = ids.add_client_object(value.id)
                    if upstream != value.id:
                        translated[index] = UntypedNewId(value.interface, value.version,
                                                         upstream)
                        changed = True
                else:
                    assert isinstance(value, int)
                    upstream = ids.add_client_object(value)
                    if upstream != value:
                        translated[index] = upstream
                        changed = True
        if spec.destructor:
            ids.destroyed(target)
        if not changed and not renumbered:
            if self.tracer is not None:
                self.tracer(Relayed(Direction.REQUEST, obj, spec, args))
            up.add(frame.data, fds)
            return
        if changed:
            data, _ = encode_message(target, spec, translated)
        else:
            data = _OBJECT_ID.pack(target) + frame.data[_OBJECT_ID.size:]
        if self.tracer is not None:
            self.tracer(Relayed(Direction.REQUEST, obj, spec, args,
                                "upstream: " + _upstream_note(spec, target, translated)))
        up.add(data, fds)

    def _create_from_request(self, obj: WaylandObject, spec: MessageSpec,
                             args: list[ArgValue]) -> None:
        index = spec.new_id_index
        assert index is not None
        value = args[index]
        if isinstance(value, UntypedNewId):
            iface, version = self._check_untyped(obj, spec, args, value)
            self.objects.create_by_client(value.id, iface, version)
            return
        interface = spec.args[index].interface
        assert isinstance(value, int) and interface is not None
        created = self.protocol.get(interface)
        if created is None:
            raise WireError(f"{obj}.{spec.name} creates a {interface}, an interface "
                            "qubesshm has no definition for", ErrorCode.INVALID_METHOD, obj.id)
        self.objects.create_by_client(value, created, obj.version)

    def _check_untyped(self, obj: WaylandObject, spec: MessageSpec, args: list[ArgValue],
                       value: UntypedNewId) -> tuple[InterfaceSpec, int]:
        """Interface and version of an object made by ``wl_registry.bind`` (or alike)."""
        where = f"{obj}.{spec.name}"
        if obj.interface.name == "wl_registry":
            name = args[0]
            assert isinstance(name, int)
            known = self._globals.get(name)
            if known is None:
                raise WireError(f"{where}: invalid global {value.interface} ({name})",
                                ErrorCode.INVALID_OBJECT, obj.id)
            if known.interface.name != value.interface:
                raise WireError(f"{where}: global {name} is a {known.interface.name}, "
                                f"not a {value.interface}", ErrorCode.INVALID_OBJECT, obj.id)
            if not 1 <= value.version <= known.version:
                raise WireError(f"{where}: invalid version for global {value.interface} "
                                f"({name}): have {known.version}, wanted {value.version}",
                                ErrorCode.INVALID_OBJECT, obj.id)
            return known.interface, value.version
        iface = self.protocol.get(value.interface)
        if iface is None or not 1 <= value.version <= iface.version:
            raise WireError(f"{where}: cannot create {value.interface} version "
                            f"{value.version}", ErrorCode.INVALID_OBJECT, obj.id)
        return iface, value.version

    # -- events --------------------------------------------------------------

    def _relay_event(self, obj: WaylandObject, spec: MessageSpec, frame: Frame,
                     fds: list[int], out: Outbox) -> None:
        args = self._decode(obj, spec, frame, fds)
        data = frame.data
        note = ""
        if obj.interface.name == "wl_registry":
            rewritten = self._registry_event(spec, args)
            if rewritten is None:
                if self.tracer is not None:
                    why = ("dma-buf cannot cross a VM boundary (--allow-dmabuf relays it)"
                           if spec.name == "global" and args[1] in self.hidden_interfaces
                           else "interface unknown to qubesshm")
                    self.tracer(Relayed(Direction.EVENT, obj, spec, args, f"dropped: {why}"))
                return
            if rewritten is not args:
                args = rewritten
                data, _ = encode_message(obj.id, spec, args)
                note = "version capped"
        if spec.new_id_index is not None:
            value = args[spec.new_id_index]
            iface_name = spec.args[spec.new_id_index].interface
            iface = self.protocol.get(iface_name or "")
            if iface is None or not isinstance(value, int):
                raise WireError(f"{obj}.{spec.name} creates an object of unknown interface")
            self.objects.create_by_server(value, iface, obj.version)
        if obj.id == DISPLAY_ID:
            if spec is self._delete_id:
                upstream_deleted = args[0]
                assert isinstance(upstream_deleted, int)
                if not self._delete_id_event(args, out):
                    return
                if args[0] != upstream_deleted:
                    data, _ = encode_message(DISPLAY_ID, spec, args)
                    note = f"upstream delete_id({upstream_deleted})"
            elif spec is self._display_error:
                rewritten_error = self._display_error_event(args)
                if rewritten_error is not args:
                    args = rewritten_error
                    data, _ = encode_message(DISPLAY_ID, spec, args)
                    note = "about an object of qubesshm's"
        if self.shm is not None and not self.shm.observe_event(obj, spec, args):
            if self.tracer is not None:
                self.tracer(Relayed(Direction.EVENT, obj, spec, args,
                                    "dropped: a multi-planar format qubesshm cannot copy"))
            return
        if spec.destructor:
            self.objects.destroyed(obj, by_compositor=True)
        upstream_id = frame.object_id
        translated = self._translate_event_args(obj, spec, args)
        if translated is not args:
            data, _ = encode_message(obj.id, spec, translated)
            note = note or f"upstream @{upstream_id}"
            args = translated
        elif upstream_id != obj.id:  # only the sender's id: a new header
            data = _OBJECT_ID.pack(obj.id) + data[_OBJECT_ID.size:]
            note = note or f"upstream @{upstream_id}"
        if self.tracer is not None:
            self.tracer(Relayed(Direction.EVENT, obj, spec, args, note))
        out.add(data, fds)

    def _delete_id_event(self, args: list[ArgValue], out: Outbox) -> bool:
        """Retire an upstream id; True if the client must hear of it (args rewritten)."""
        deleted = args[0]
        assert isinstance(deleted, int)
        if self.ids.live_own(deleted):
            # Freeing the id would let the proxy hand it out while still using it.
            raise WireError(f"compositor sent delete_id for {deleted}, an object of the "
                            "proxy's it has not destroyed")
        slot = self.ids.delete_id(deleted)
        if slot is None:
            # An id the proxy does not know: libwayland clients log and ignore it. While
            # the id spaces agree it means the same to the client; once they differ it
            # could name another of the client's objects, so it goes no further.
            if not self.ids.identical():
                return False
            self.objects.delete_id(deleted)
            return True
        if slot.client_id is None:
            if self.shm is not None and isinstance(slot.owner, OwnObject):
                self.shm.own_deleted(slot.owner)
            return False
        self.objects.delete_id(slot.client_id)
        args[0] = slot.client_id
        return True

    def _display_error_event(self, args: list[ArgValue]) -> list[ArgValue]:
        about, code, message = args
        assert isinstance(about, int) and isinstance(code, int) and isinstance(message, str)
        own = self.ids.owner(about)
        if own is not None:
            # The compositor refused something the proxy made: the client cannot know
            # that object, so it hears of it on wl_display.
            return [DISPLAY_ID, int(ErrorCode.IMPLEMENTATION),
                    f"qubesshm: the compositor refused the proxy's {own}@{about}: {message}"]
        client = self.ids.client(about)
        target = self.objects.get(client) if client is not None else None
        if target is None:
            return [DISPLAY_ID, code, message]
        if target.interface.name == "wl_shm":
            # Every wl_shm request upstream is the proxy's (client pools stay here).
            return [DISPLAY_ID, int(ErrorCode.IMPLEMENTATION),
                    f"qubesshm: the compositor refused a pool of the proxy's: {message}"]
        return args if target.id == about else [target.id, code, message]

    def _translate_event_args(self, obj: WaylandObject, spec: MessageSpec,
                              args: list[ArgValue]) -> list[ArgValue]:
        """Object arguments in client ids (``args`` itself when nothing changes)."""
        if self.ids.identical():
            return args
        translated: list[ArgValue] | None = None
        for index, _ in spec.object_args:
            value = args[index]
            if value is None:
                continue
            assert isinstance(value, int)
            if obj.id == DISPLAY_ID and spec is self._display_error:
                continue  # already in client ids
            client = self.ids.client(value)
            if client is None:
                raise WireError(f"{obj}.{spec.name} refers to object {value}, which the "
                                "client does not know")
            if client != value:
                if translated is None:
                    translated = list(args)
                translated[index] = client
        return args if translated is None else translated

    def _registry_event(self, spec: MessageSpec, args: list[ArgValue]) -> list[ArgValue] | None:
        """The event to forward (``args`` itself when unchanged), or None to hide it."""
        if spec.name == "global":
            name, iface_name, version = args
            assert isinstance(name, int) and isinstance(iface_name, str)
            assert isinstance(version, int)
            iface = self.protocol.get(iface_name)
            if iface is None or iface_name in self.hidden_interfaces:
                self._hidden_globals.add(name)
                if self.on_hidden_global is not None:
                    self.on_hidden_global(iface_name, version)
                return None
            capped = min(version, iface.version)
            self._globals[name] = _Global(iface, capped)
            return args if capped == version else [name, iface_name, capped]
        if spec.name == "global_remove":
            name = args[0]
            assert isinstance(name, int)
            # Global names are never reused, and every registry hears the removal.
            if name in self._hidden_globals:
                return None
        return args


def _upstream_note(spec: MessageSpec, target: int, args: Sequence[ArgValue]) -> str:
    parts = []
    for arg, value in zip(spec.args, args, strict=True):
        if isinstance(value, UntypedNewId):
            parts.append(f"new id @{value.id}")
        elif arg.kind is ArgKind.NEW_ID and isinstance(value, int):
            parts.append(f"new id @{value}")
        elif arg.kind is ArgKind.OBJECT:
            parts.append("nil" if not isinstance(value, int) else f"@{value}")
        else:
            parts.append("_")
    return f"@{target}({', '.join(parts)})"


def carries_sync(segments: list[Segment]) -> bool:
    """Whether these messages to the compositor (whole ones, as a step's are) hold a
    ``wl_display.sync``: the display is object 1 upstream too, and sync its request 0."""
    for data, _ in segments:
        pos, end = 0, len(data)
        while pos + HEADER_SIZE <= end:
            object_id, word = HEADER.unpack_from(data, pos)
            if object_id == DISPLAY_ID and word & 0xFFFF == 0:
                return True
            pos += max(word >> 16, HEADER_SIZE)
    return False
