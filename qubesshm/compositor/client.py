"""Sans-IO core of one client connection: requests in, events out, as libwayland-server.

Bytes and fds go in with ``feed``; each whole request is checked as
libwayland-server checks it (a live target object, an opcode its version has,
arguments that decode, object arguments of the right interface, new ids in
order) and handed to the handler of its interface's module. Events the
handlers send collect in the outbox, which the I/O layer takes. A protocol
error sends ``wl_display.error`` and closes the connection once that is out;
nothing a client does reaches any other client. Client objects the compositor
destroys are retired with ``wl_display.delete_id``; objects the compositor
creates take ids from 0xff000000.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple, TypeVar

from ..objects.objectmap import DISPLAY_ID, SERVER_ID_MAX, SERVER_ID_MIN, ObjectMap, WaylandObject
from ..wire.codec import (
    DEFAULT_MAX_MESSAGE_SIZE,
    ArgValue,
    ErrorCode,
    WireError,
    WireReader,
    decode_args,
    encode_message,
)
from ..wire.protocol import InterfaceSpec, MessageSpec, ProtocolTable

if TYPE_CHECKING:
    from .core import Compositor
    from .shm import ShmPool
    from .surfaces import Surface
    from .windows import Window

log = logging.getLogger("qubesshm.compositor")

# A request may wait for fds that a later sendmsg brings, but only this far.
FD_WAIT_LIMIT_BYTES = 64 * 1024
# Fds sent ahead of their requests: libwayland buffers 1024, each an open file here.
MAX_UNCLAIMED_FDS = 1024
# The error text quotes client input: cut to stay well within a message.
ERROR_MESSAGE_LIMIT = 1024
# Live objects one client may have (libwayland allows 15 million, each costing
# memory here): far above what any toolkit makes.
MAX_OBJECTS = 256 * 1024

Handler = Callable[["ClientCore", WaylandObject, list[ArgValue], list[int]], None]
Segment = tuple[bytes, list[int]]
T = TypeVar("T")


class _Route(NamedTuple):
    """How one kind of request is handled once it decoded (``ClientCore._route``)."""

    handler: Handler | None
    new_id: tuple[int, InterfaceSpec] | None  # the argument index and interface it creates


class _Queueing:
    """``ClientCore.queueing``'s context, one per client (it nests: a depth)."""

    __slots__ = ("_client",)

    def __init__(self, client: ClientCore) -> None:
        self._client = client

    def __enter__(self) -> None:
        self._client._queueing += 1

    def __exit__(self, *exc: object) -> None:
        self._client._queueing -= 1


def abridge(text: str, limit: int = ERROR_MESSAGE_LIMIT) -> str:
    raw = text.encode("utf-8", "surrogateescape")
    if len(raw) <= limit:
        return text
    return raw[: limit - 3].decode("utf-8", "ignore") + "..."


class ClientCore:
    """The objects and protocol state of one client connection."""

    def __init__(self, compositor: Compositor, number: int, protocol: ProtocolTable,
                 handlers: dict[tuple[str, str], Handler], *, pid: int | None = None,
                 max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE) -> None:
        self.compositor = compositor
        self.number = number
        self.pid = pid
        self.protocol = protocol
        self.handlers = handlers
        self.objects = ObjectMap(protocol["wl_display"])
        # What each live object is, for the handlers: Surface, ShmPool, ...
        self.resources: dict[int, Any] = {}
        self.surfaces: set[Surface] = set()
        self.pools: set[ShmPool] = set()
        self.windows: list[Window] = []  # live toplevels and popups, in creation order
        self._reader = WireReader(max_message_size)
        self._out: list[tuple[bytearray, list[int]]] = []
        self._next_server_id = SERVER_ID_MIN
        self._events: dict[tuple[str, str], MessageSpec | None] = {}
        self._routes: dict[int, _Route] = {}  # by id() of a request's MessageSpec
        self._queueing = 0
        self._queueing_context = _Queueing(self)
        self.closed = False
        self.error: WireError | None = None
        # Called whenever output is queued (the I/O layer flushes it).
        self.on_output: Callable[[ClientCore], None] | None = None

    def __str__(self) -> str:
        pid = f", pid {self.pid}" if self.pid is not None else ""
        return f"client {self.number}{pid}"

    # -- input -----------------------------------------------------------------

    def feed(self, data: bytes, fds: Sequence[int] = ()) -> None:
        """Bytes and fds read from the client; handles every whole request."""
        if self.closed:
            _close_all(fds)
            return
        self._reader.feed(data, fds)
        self._pump(at_eof=False)

    def eof(self) -> None:
        """The client hung up."""
        if not self.closed:
            self._pump(at_eof=True)

    def _pump(self, *, at_eof: bool) -> None:
        reader = self._reader
        routes = self._routes
        inflight: list[int] = []
        try:
            while not self.closed:
                head = reader.peek()
                if head is None:
                    if at_eof and reader.buffered_bytes:
                        raise WireError(f"connection closed inside a message "
                                        f"({reader.buffered_bytes} bytes left over)")
                    break
                object_id, opcode, size = head
                obj, spec = self._resolve(object_id, opcode)
                route = routes.get(id(spec))
                if route is None:
                    route = self._route(spec)
                taken = reader.take_bytes(size, spec.fd_count)
                if taken is None:
                    if at_eof or reader.buffered_bytes > FD_WAIT_LIMIT_BYTES:
                        raise WireError(f"{obj}.{spec.name} needs {spec.fd_count} fd(s) but "
                                        f"only {reader.buffered_fds} arrived")
                    break
                data, inflight = taken
                args = decode_args(spec, data, inflight)
                if spec.object_args:
                    self._check_objects(obj, spec, args)
                self._dispatch(obj, spec, route, args, inflight)
                inflight = []
            if reader.buffered_fds > MAX_UNCLAIMED_FDS:
                raise WireError(f"more than {MAX_UNCLAIMED_FDS} file descriptors sent ahead "
                                "of their requests", ErrorCode.NO_MEMORY)
        except WireError as err:
            _close_all(inflight)
            self.post_error(err.object_id, err.code, err.message)

    def _resolve(self, object_id: int, opcode: int) -> tuple[WaylandObject, MessageSpec]:
        obj = self.objects.live(object_id)
        if obj is None:
            raise WireError(f"invalid object {object_id}", ErrorCode.INVALID_OBJECT)
        requests = obj.interface.requests
        if opcode >= len(requests):
            raise WireError(f"invalid method {opcode}, object {obj}", ErrorCode.INVALID_METHOD)
        spec = requests[opcode]
        if spec.since > obj.version:
            raise WireError(f"invalid method {opcode} (since {spec.since} < {obj.version}), "
                            f"object {obj}", ErrorCode.INVALID_METHOD)
        return obj, spec

    def _route(self, spec: MessageSpec) -> _Route:
        """What handling ``spec`` takes, worked out once per request kind."""
        new_id = None
        index = spec.new_id_index
        if index is not None:
            interface = spec.args[index].interface
            # None: wl_registry.bind's untyped new id, which its handler checks and makes.
            if interface is not None:
                new_id = (index, self.protocol[interface])
        route = _Route(self.handlers.get((spec.interface, spec.name)), new_id)
        self._routes[id(spec)] = route
        return route

    def _check_objects(self, obj: WaylandObject, spec: MessageSpec,
                       args: list[ArgValue]) -> None:
        for index, arg in spec.object_args:
            value = args[index]
            if value is None:
                continue
            assert isinstance(value, int)
            target = self.objects.live(value)
            if target is None or (arg.interface is not None
                                  and target.interface.name != arg.interface):
                what = f"invalid object {value}" if target is None else str(target)
                raise WireError(f"invalid arguments for {obj}.{spec.name}: argument "
                                f"{arg.name} is {what}, not a {arg.interface}")

    def _dispatch(self, obj: WaylandObject, spec: MessageSpec, route: _Route,
                  args: list[ArgValue], fds: list[int]) -> None:
        if spec.new_id_index is not None:
            if len(self.objects) >= MAX_OBJECTS:
                raise WireError(f"qubesshm: too many objects: a client may have {MAX_OBJECTS}",
                                ErrorCode.NO_MEMORY)
            if route.new_id is not None:
                index, interface = route.new_id
                value = args[index]
                assert isinstance(value, int)
                self.objects.create_by_client(value, interface, obj.version)
        handler = route.handler
        if handler is not None:
            # A handler that keeps an fd takes it out of ``fds``; the rest are closed.
            handler(self, obj, args, fds)
        if fds:
            _close_all(fds)
            fds.clear()
        if spec.destructor and self.objects.live(obj.id) is obj:
            self.destroy(obj.id)

    # -- output ----------------------------------------------------------------

    def _event_spec(self, interface: str, name: str) -> MessageSpec | None:
        key = (interface, name)
        if key not in self._events:
            self._events[key] = next(
                (m for m in self.protocol[interface].events if m.name == name), None)
        return self._events[key]

    def send(self, object_id: int, name: str, *args: ArgValue) -> bool:
        """Send event ``name`` to a live object; False (nothing sent) when the object
        is gone, or its version predates the event (or the protocol XML loaded has
        no such event: a newer version's)."""
        if self.closed:
            return False
        obj = self.objects.live(object_id)
        if obj is None:
            return False
        spec = self._event_spec(obj.interface.name, name)
        if spec is None or spec.since > obj.version:
            return False
        data, fds = encode_message(object_id, spec, args)
        self._queue(data, fds)
        return True

    def _queue(self, data: bytes, fds: list[int], *, post: bool = False) -> None:
        if fds or not self._out:
            self._out.append((bytearray(data), list(fds)))
        else:
            self._out[-1][0].extend(data)
        if self.on_output is not None and (post or not self._queueing):
            self.on_output(self)

    def queueing(self) -> _Queueing:
        """Events sent meanwhile are queued, not posted: written with the next posted
        event, as libwayland-server's ``wl_resource_queue_event``.

        For events that only report what the client's own request did. Qt 5.15's
        Wayland plugin (Debian 12's 5.15.8 with KDE's patches; Qt 6 alike) deadlocks
        on exit when bytes arrive while ``~QWaylandDisplay`` stops its two event
        threads: a read the main thread prepared for the first one is never read
        nor cancelled when that thread sees ``m_quitting`` first, so the frame-queue
        thread, woken by the bytes, waits in ``wl_display_read_events`` for it
        forever. The answers to its last requests (the window's teardown) are the
        bytes a compositor may send then."""
        return self._queueing_context

    def take_output(self) -> list[Segment]:
        out = [(bytes(data), fds) for data, fds in self._out]
        self._out = []
        return out

    @property
    def has_output(self) -> bool:
        return bool(self._out)

    # -- objects ---------------------------------------------------------------

    def resource(self, object_id: int, kind: type[T]) -> T:
        """The handler state of object ``object_id``, which must be a ``kind``."""
        found = self.resources.get(object_id)
        if not isinstance(found, kind):
            raise WireError(f"qubesshm: object {object_id} has no {kind.__name__}",
                            ErrorCode.IMPLEMENTATION)
        return found

    def version(self, object_id: int) -> int:
        obj = self.objects.live(object_id)
        return 0 if obj is None else obj.version

    def alive(self, object_id: int) -> bool:
        return self.objects.live(object_id) is not None

    def create(self, object_id: int, interface: InterfaceSpec, version: int) -> WaylandObject:
        """A client object created by a request whose handler makes it (bind)."""
        return self.objects.create_by_client(object_id, interface, version)

    def new_server_object(self, interface: str, version: int) -> int:
        """A new object of the compositor's, with an id from 0xff000000 up."""
        object_id = self._next_server_id
        while self.objects.live(object_id) is not None:
            object_id = SERVER_ID_MIN if object_id >= SERVER_ID_MAX else object_id + 1
            if object_id == self._next_server_id:
                raise WireError("qubesshm: no server object id left", ErrorCode.NO_MEMORY)
        self._next_server_id = SERVER_ID_MIN if object_id >= SERVER_ID_MAX else object_id + 1
        self.objects.create_by_server(object_id, self.protocol[interface], version)
        return object_id

    def destroy(self, object_id: int) -> None:
        """The compositor is done with an object: a client id is retired with
        ``delete_id`` (it may be used again at once), a server id freed."""
        obj = self.objects.live(object_id)
        self.resources.pop(object_id, None)
        if obj is None:
            return
        self.objects.destroyed(obj, by_compositor=True)
        if object_id < SERVER_ID_MIN:
            self.objects.delete_id(object_id)
            with self.queueing():  # as libwayland-server does
                self.send(DISPLAY_ID, "delete_id", object_id)

    # -- errors and the end ----------------------------------------------------

    def post_error(self, object_id: int, code: ErrorCode | int, message: str) -> None:
        """``wl_display.error`` about ``object_id``; the connection closes after it."""
        if self.closed:
            return
        self.error = WireError(message, code, object_id)
        spec = self._event_spec("wl_display", "error")
        assert spec is not None
        data, _ = encode_message(DISPLAY_ID, spec, [object_id, int(code), abridge(message)])
        self._queue(data, [], post=True)
        log.info("%s: protocol error on object %d, code %d: %s", self, object_id, int(code),
                 message)
        self.close()

    def close(self) -> None:
        """No more requests are handled; the compositor forgets the client's windows
        and files. Queued output (an error) may still be flushed."""
        if self.closed:
            return
        self.closed = True
        _close_all(self._reader.drain_fds())
        self.compositor.client_gone(self)


def _close_all(fds: Sequence[int]) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)
