"""A raw Wayland client for the compositor tests: requests by name, events decoded.

``WireClient`` keeps the client's side of the object table (what interface each
id is), encodes requests with qubesshm's codec and decodes whatever comes back.
``CoreClient`` drives a sans-IO ``ClientCore`` directly; ``SocketClient`` talks
to a real server over its socket. Neither is libwayland: they can send what a
well-behaved client never would, to test the compositor's errors.
"""

from __future__ import annotations

import array
import os
import select
import socket
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from qubesshm.compositor.client import ClientCore
from qubesshm.compositor.core import Compositor
from qubesshm.wire.codec import (
    ArgValue,
    Fixed,
    UntypedNewId,
    WireReader,
    decode_args,
    encode_message,
)
from qubesshm.wire.protocol import InterfaceSpec, ProtocolTable, load_protocols

PROTO = load_protocols()


@dataclass(frozen=True)
class Event:
    object_id: int
    interface: str
    name: str
    args: tuple[ArgValue, ...]


class DisplayError(Exception):
    """The compositor sent ``wl_display.error``."""

    def __init__(self, object_id: int, code: int, message: str) -> None:
        super().__init__(f"error on object {object_id}, code {code}: {message}")
        self.object_id = object_id
        self.code = code
        self.message = message


class WireClient:
    """The client side of the object table, and the events received."""

    def __init__(self, protocol: ProtocolTable = PROTO) -> None:
        self.protocol = protocol
        self.objects: dict[int, InterfaceSpec] = {1: protocol["wl_display"]}
        self.free: list[int] = []
        self.next_id = 2
        self.events: list[Event] = []
        self.error: DisplayError | None = None
        self.globals: dict[str, tuple[int, int]] = {}  # interface -> (name, version)
        self._reader = WireReader(1 << 20)
        self._sync_done: set[int] = set()
        self.registry = 0

    # -- requests --------------------------------------------------------------

    def new_id(self, interface: str) -> int:
        object_id = self.free.pop(0) if self.free else self.next_id
        if object_id == self.next_id:
            self.next_id += 1
        self.objects[object_id] = self.protocol[interface]
        return object_id

    def encode(self, object_id: int, name: str, *args: ArgValue) -> tuple[bytes, list[int]]:
        iface = self.objects[object_id]
        spec = next(m for m in iface.requests if m.name == name)
        data, fds = encode_message(object_id, spec, list(args))
        return data, fds

    def send_bytes(self, data: bytes, fds: Sequence[int] = ()) -> None:
        raise NotImplementedError

    def receive(self, timeout: float) -> bool:
        """Take in what the compositor sent; False if nothing came."""
        raise NotImplementedError

    def request(self, object_id: int, name: str, *args: ArgValue,
                fds: Sequence[int] = ()) -> None:
        data, _ = self.encode(object_id, name, *args)
        self.send_bytes(data, fds)

    def create(self, object_id: int, name: str, interface: str, *args: ArgValue,
               fds: Sequence[int] = ()) -> int:
        """A request whose first argument is a new ``interface`` object; its id."""
        new = self.new_id(interface)
        self.request(object_id, name, new, *args, fds=fds)
        return new

    def destroy(self, object_id: int, name: str = "destroy") -> None:
        self.request(object_id, name)

    # -- events ----------------------------------------------------------------

    def feed(self, data: bytes) -> None:
        reader = self._reader
        reader.feed(data)
        while (head := reader.peek()) is not None:
            object_id, opcode, size = head
            iface = self.objects.get(object_id)
            if iface is None:
                raise AssertionError(f"event for unknown object {object_id}")
            spec = iface.events[opcode]
            taken = reader.take(size, spec.fd_count)
            assert taken is not None
            frame, _ = taken
            args = tuple(decode_args(spec, frame.data, [-1] * spec.fd_count))
            event = Event(object_id, iface.name, spec.name, args)
            self.events.append(event)
            if object_id == 1 and spec.name == "error":
                err_obj, code, message = args
                assert isinstance(err_obj, int) and isinstance(code, int)
                assert isinstance(message, str)
                self.error = DisplayError(err_obj, code, message)
            elif object_id == 1 and spec.name == "delete_id":
                deleted = args[0]
                assert isinstance(deleted, int)
                self.objects.pop(deleted, None)
                self.free.append(deleted)
            elif iface.name == "wl_registry" and spec.name == "global":
                name, interface, version = args
                assert isinstance(name, int) and isinstance(interface, str)
                assert isinstance(version, int)
                self.globals[interface] = (name, version)
            elif iface.name == "wl_callback" and spec.name == "done":
                self._sync_done.add(object_id)

    def take(self, interface: str | None = None, name: str | None = None,
             object_id: int | None = None) -> list[Event]:
        """The events received so far that match, removed from ``events``."""
        picked = [e for e in self.events if (interface is None or e.interface == interface)
                  and (name is None or e.name == name)
                  and (object_id is None or e.object_id == object_id)]
        self.events = [e for e in self.events if e not in picked]
        return picked

    # -- conveniences ----------------------------------------------------------

    def roundtrip(self, timeout: float = 10.0) -> None:
        """``wl_display.sync`` and wait for its callback; raises on a protocol error."""
        callback = self.create(1, "sync", "wl_callback")
        deadline = time.monotonic() + timeout
        while callback not in self._sync_done:
            if self.error is not None:
                raise self.error
            if time.monotonic() > deadline:
                raise TimeoutError("no answer to wl_display.sync")
            self.receive(max(deadline - time.monotonic(), 0.0))
        self._sync_done.discard(callback)
        self.events = [e for e in self.events if e.object_id != callback
                       and not (e.name == "delete_id" and e.args == (callback,))]
        if self.error is not None:
            raise self.error

    def expect_error(self, timeout: float = 10.0) -> DisplayError:
        """Wait for ``wl_display.error`` (after a sync that cannot be answered)."""
        deadline = time.monotonic() + timeout
        while self.error is None:
            if time.monotonic() > deadline:
                raise AssertionError("no wl_display.error came")
            if not self.receive(max(deadline - time.monotonic(), 0.0)) and self.closed():
                break
        if self.error is None:
            raise AssertionError("the compositor hung up without wl_display.error")
        return self.error

    def closed(self) -> bool:
        return False

    def setup(self) -> None:
        """get_registry and a roundtrip: ``globals`` is filled."""
        self.registry = self.create(1, "get_registry", "wl_registry")
        self.roundtrip()

    def bind(self, interface: str, version: int | None = None) -> int:
        name, offered = self.globals[interface]
        version = offered if version is None else version
        new = self.new_id(interface)
        self.request(self.registry, "bind", name, UntypedNewId(interface, version, new))
        return new

    def memfd(self, data: bytes, *, seal: bool = True) -> int:
        fd = os.memfd_create("compositor-test", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        os.write(fd, data)
        if seal:
            import fcntl

            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK)
        return fd


def fixed(value: float) -> Fixed:
    return Fixed(round(value * 256))


class CoreClient(WireClient):
    """Speaks to a sans-IO ``ClientCore``: every request is handled at once."""

    def __init__(self, compositor: Compositor, protocol: ProtocolTable = PROTO) -> None:
        super().__init__(protocol)
        self.core: ClientCore = compositor.connect(pid=os.getpid())

    def send_bytes(self, data: bytes, fds: Sequence[int] = ()) -> None:
        # As SCM_RIGHTS would: the compositor gets its own copies of the fds.
        self.core.feed(data, [os.dup(fd) for fd in fds])
        self.receive(0)

    def receive(self, timeout: float) -> bool:
        out = self.core.take_output()
        for data, fds in out:
            for fd in fds:
                os.close(fd)
            self.feed(data)
        return bool(out)

    def closed(self) -> bool:
        return self.core.closed


class SocketClient(WireClient):
    """Speaks to a running server over its Unix socket."""

    def __init__(self, path: str, protocol: ProtocolTable = PROTO) -> None:
        super().__init__(protocol)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        self.sock.connect(path)
        self._eof = False

    def send_bytes(self, data: bytes, fds: Sequence[int] = ()) -> None:
        ancillary = ([(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())]
                     if fds else [])
        self.sock.sendmsg([data], ancillary)

    def receive(self, timeout: float) -> bool:
        ready, _, _ = select.select([self.sock], [], [], timeout)
        if not ready:
            return False
        data = self.sock.recv(1 << 16)
        if not data:
            self._eof = True
            return False
        self.feed(data)
        return True

    def closed(self) -> bool:
        return self._eof

    def close(self) -> None:
        self.sock.close()


class App:
    """A raw client with the usual globals bound, making toplevels from numpy pixels."""

    def __init__(self, client: WireClient) -> None:
        self.c = client
        client.setup()
        self.compositor = client.bind("wl_compositor")
        self.shm = client.bind("wl_shm")
        self.wm_base = client.bind("xdg_wm_base")
        self.subcompositor = client.bind("wl_subcompositor")
        self.viewporter = client.bind("wp_viewporter")
        client.roundtrip()
        client.take()

    def surface(self) -> int:
        return self.c.create(self.compositor, "create_surface", "wl_surface")

    def buffer(self, pixels: np.ndarray, fmt: int = 1, *, seal: bool = True) -> int:
        height, width = pixels.shape
        data = np.ascontiguousarray(pixels, dtype=np.uint32).tobytes()
        fd = self.c.memfd(data, seal=seal)
        pool = self.c.create(self.shm, "create_pool", "wl_shm_pool", fd, len(data), fds=[fd])
        os.close(fd)
        buffer = self.c.create(pool, "create_buffer", "wl_buffer", 0, width, height,
                               width * 4, fmt)
        self.c.destroy(pool)
        return buffer

    def toplevel(self, title: str = "test") -> tuple[int, int, int]:
        """(surface, xdg_surface, xdg_toplevel), configured and acknowledged."""
        surface = self.surface()
        xdg = self.c.create(self.wm_base, "get_xdg_surface", "xdg_surface", surface)
        top = self.c.create(xdg, "get_toplevel", "xdg_toplevel")
        self.c.request(top, "set_title", title)
        self.c.request(surface, "commit")
        self.c.roundtrip()
        self.ack(xdg)
        return surface, xdg, top

    def ack(self, xdg: int) -> int:
        """Acknowledge the latest configure of ``xdg``; its serial."""
        serials = [e.args[0] for e in self.c.take("xdg_surface", "configure", xdg)]
        assert serials, f"no configure for xdg_surface@{xdg}"
        serial = serials[-1]
        assert isinstance(serial, int)
        self.c.request(xdg, "ack_configure", serial)
        return serial

    def show(self, surface: int, buffer: int | None, *, frame: bool = False,
             damage: bool = True) -> int | None:
        """Attach, damage all, commit; the frame callback's id when ``frame``."""
        self.c.request(surface, "attach", buffer, 0, 0)
        if damage and buffer is not None:
            self.c.request(surface, "damage_buffer", 0, 0, 1 << 30, 1 << 30)
        callback = self.c.create(surface, "frame", "wl_callback") if frame else None
        self.c.request(surface, "commit")
        return callback
