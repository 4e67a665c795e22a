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
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from ..objects.objectmap import DISPLAY_ID, ObjectMap, WaylandObject
from ..wire.codec import (
    DEFAULT_MAX_MESSAGE_SIZE,
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

# A message may wait for fds that a later sendmsg carries, but only this far:
# every real sender passes the fds no later than the following few messages.
FD_WAIT_LIMIT_BYTES = 64 * 1024
# Fds received ahead of the messages that claim them; libwayland's own fd buffer
# holds 1024, and every unclaimed one is an open file in the proxy.
MAX_UNCLAIMED_FDS = 1024


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


@dataclass(slots=True)
class _Global:
    interface: InterfaceSpec
    version: int


class RelaySession:
    """The protocol state of one proxied client connection."""

    def __init__(
        self,
        protocol: ProtocolTable,
        *,
        max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE,
        tracer: Callable[[Relayed], None] | None = None,
        on_hidden_global: Callable[[str, int], None] | None = None,
    ) -> None:
        self.protocol = protocol
        self.objects = ObjectMap(protocol["wl_display"])
        self.tracer = tracer
        self.on_hidden_global = on_hidden_global
        self._requests = WireReader(max_message_size)
        self._events = WireReader(max_message_size)
        self._globals: dict[int, _Global] = {}
        self._hidden_globals: set[int] = set()
        self._display_error = protocol["wl_display"].events[0]
        self._delete_id = protocol["wl_display"].events[1]
        self.closed = False

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

    # -- the pump ------------------------------------------------------------

    def _pump(self, direction: Direction, *, at_eof: bool) -> Step:
        step = Step()
        if self.closed:
            return step
        reader = self._requests if direction is Direction.REQUEST else self._events
        upstream, downstream = Outbox(), Outbox()
        out = upstream if direction is Direction.REQUEST else downstream
        fds: list[int] = []
        try:
            while True:
                head = reader.peek()
                if head is None:
                    if at_eof and reader.buffered_bytes:
                        raise WireError(
                            f"connection closed inside a message "
                            f"({reader.buffered_bytes} bytes left over)"
                        )
                    break
                object_id, opcode, size = head
                obj, spec = self._resolve(direction, object_id, opcode)
                taken = reader.take(size, spec.fd_count)
                if taken is None:
                    if at_eof or reader.buffered_bytes > FD_WAIT_LIMIT_BYTES:
                        raise WireError(
                            f"{obj}.{spec.name} needs {spec.fd_count} fd(s) but only "
                            f"{reader.buffered_fds} arrived",
                            object_id=object_id,
                        )
                    break
                frame, fds = taken
                if direction is Direction.REQUEST:
                    self._relay_request(obj, spec, frame, fds, out)
                else:
                    self._relay_event(obj, spec, frame, fds, out)
                fds = []
            if reader.buffered_fds > MAX_UNCLAIMED_FDS:
                raise WireError(f"more than {MAX_UNCLAIMED_FDS} file descriptors sent ahead "
                                "of their messages", ErrorCode.NO_MEMORY)
        except WireError as err:
            self.closed = True
            step.discarded_fds = fds
            step.error = err
            step.client_at_fault = direction is Direction.REQUEST
            if not step.client_at_fault:
                err = WireError(f"qubesshm: the compositor broke the protocol: {err.message}",
                                ErrorCode.IMPLEMENTATION, DISPLAY_ID)
            data, _ = encode_message(DISPLAY_ID, self._display_error,
                                     [err.object_id, int(err.code),
                                      abridge(err.message, ERROR_MESSAGE_LIMIT)])
            downstream.add(data, [])
        step.to_compositor = upstream.take()
        step.to_client = downstream.take()
        return step

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

    def _relay_request(self, obj: WaylandObject, spec: MessageSpec, frame: Frame,
                       fds: list[int], out: Outbox) -> None:
        args = self._decode(obj, spec, frame, fds)
        for arg, value in zip(spec.args, args, strict=True):
            if arg.kind is ArgKind.OBJECT and value is not None:
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
        if spec.destructor:
            self.objects.destroyed(obj, by_compositor=False)
        if self.tracer is not None:
            self.tracer(Relayed(Direction.REQUEST, obj, spec, args))
        out.add(frame.data, fds)

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
                    self.tracer(Relayed(Direction.EVENT, obj, spec, args,
                                        "dropped: interface unknown to qubesshm"))
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
        if obj.id == DISPLAY_ID and spec is self._delete_id:
            deleted = args[0]
            assert isinstance(deleted, int)
            self.objects.delete_id(deleted)
        if spec.destructor:
            self.objects.destroyed(obj, by_compositor=True)
        if self.tracer is not None:
            self.tracer(Relayed(Direction.EVENT, obj, spec, args, note))
        out.add(data, fds)

    def _registry_event(self, spec: MessageSpec, args: list[ArgValue]) -> list[ArgValue] | None:
        """The event to forward (``args`` itself when unchanged), or None to hide it."""
        if spec.name == "global":
            name, iface_name, version = args
            assert isinstance(name, int) and isinstance(iface_name, str)
            assert isinstance(version, int)
            iface = self.protocol.get(iface_name)
            if iface is None:
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
