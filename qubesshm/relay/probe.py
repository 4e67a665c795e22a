"""What the proxy asks the compositor once, at start-up: the size of its outputs.

A window the size of an output is the largest buffer an ordinary app makes (a
maximized or fullscreen window), so the grant limits are checked against it before
any client comes. ``OutputProbe`` is the sans-IO part (requests out, events in, the
outputs' current modes found); ``output_sizes`` drives it over a socket.
"""

from __future__ import annotations

import socket
import time
from pathlib import Path

from ..wire.codec import ArgValue, UntypedNewId, WireReader, decode_args, encode_message
from ..wire.protocol import ProtocolTable

REGISTRY, FIRST_SYNC = 2, 3
MODE_CURRENT = 0x1


class OutputProbe:
    """Registry, one round trip, bind every wl_output, another round trip: done."""

    def __init__(self, protocol: ProtocolTable) -> None:
        self.protocol = protocol
        self._reader = WireReader(1 << 16)
        self._outputs: dict[int, tuple[int, int] | None] = {}  # our id -> current mode
        self._names: list[tuple[int, int]] = []  # wl_output globals: (name, version)
        self._second_sync = 0  # its id, once sent (ids follow each other, as libwayland's)
        self.done = False

    def _request(self, object_id: int, interface: str, name: str, *args: ArgValue) -> bytes:
        spec = next(m for m in self.protocol[interface].requests if m.name == name)
        data, _ = encode_message(object_id, spec, list(args))
        return data

    def start(self) -> bytes:
        return (self._request(1, "wl_display", "get_registry", REGISTRY)
                + self._request(1, "wl_display", "sync", FIRST_SYNC))

    def feed(self, data: bytes) -> bytes:
        """Events in; the requests they call for."""
        self._reader.feed(data)
        out = b""
        while (head := self._reader.peek()) is not None:
            object_id, opcode, size = head
            taken = self._reader.take(size, 0)
            if taken is None:
                break
            frame, _ = taken
            out += self._event(object_id, opcode, frame.data)
        return out

    def _event(self, object_id: int, opcode: int, data: bytes) -> bytes:
        if object_id == REGISTRY and opcode == 0:  # wl_registry.global
            name, interface, version = decode_args(
                self.protocol["wl_registry"].events[0], data, [])
            if interface == "wl_output":
                assert isinstance(name, int) and isinstance(version, int)
                self._names.append((name, version))
        elif object_id == FIRST_SYNC:  # wl_callback.done: every global was announced
            out = b""
            new_id = FIRST_SYNC + 1
            for name, version in self._names:
                self._outputs[new_id] = None
                out += self._request(REGISTRY, "wl_registry", "bind", name,
                                     UntypedNewId("wl_output", min(version, 2), new_id))
                new_id += 1
            self._second_sync = new_id
            return out + self._request(1, "wl_display", "sync", new_id)
        elif object_id == self._second_sync:
            self.done = True
        elif object_id in self._outputs and opcode == 1:  # wl_output.mode
            flags, width, height, _ = decode_args(
                self.protocol["wl_output"].events[1], data, [])
            assert isinstance(flags, int) and isinstance(width, int)
            assert isinstance(height, int)
            if flags & MODE_CURRENT:
                self._outputs[object_id] = (width, height)
        return b""

    @property
    def sizes(self) -> list[tuple[int, int]]:
        return [size for size in self._outputs.values() if size is not None]


def output_sizes(path: Path, protocol: ProtocolTable, timeout: float = 5.0) -> list[
        tuple[int, int]]:
    """The current modes of the compositor's outputs; empty if it did not say in time."""
    probe = OutputProbe(protocol)
    deadline = time.monotonic() + timeout
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC) as sock:
        sock.settimeout(timeout)
        try:
            sock.connect(str(path))
            sock.sendall(probe.start())
            while not probe.done and time.monotonic() < deadline:
                data = sock.recv(1 << 16)
                if not data:
                    break
                reply = probe.feed(data)
                if reply:
                    sock.sendall(reply)
        except OSError:
            return []
    return probe.sizes
