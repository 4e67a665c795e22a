"""Building Wayland messages by interface and message name, for the sans-IO tests."""

from __future__ import annotations

import array
import contextlib
import socket
import struct
from collections.abc import Iterator, Sequence
from pathlib import Path

from qubesshm.relay.session import Step
from qubesshm.wire.codec import (
    HEADER,
    ArgValue,
    ErrorCode,
    Frame,
    UntypedNewId,
    WireReader,
    decode_args,
    encode_message,
)
from qubesshm.wire.protocol import ArgKind, MessageSpec, load_protocols

PROTO = load_protocols()


def req(interface: str, name: str) -> MessageSpec:
    return next(m for m in PROTO[interface].requests if m.name == name)


def ev(interface: str, name: str) -> MessageSpec:
    return next(m for m in PROTO[interface].events if m.name == name)


def request(object_id: int, interface: str, name: str, *args: ArgValue) -> tuple[bytes, list[int]]:
    return encode_message(object_id, req(interface, name), list(args))


def event(object_id: int, interface: str, name: str, *args: ArgValue) -> tuple[bytes, list[int]]:
    return encode_message(object_id, ev(interface, name), list(args))


# How ``break_tail`` spoils a message's first string or array.
TAIL_BREAKS = ["unterminated", "interior nul", "padding", "long", "huge", "null", "short"]


def break_tail(spec: MessageSpec, data: bytes, how: str) -> bytes | None:
    """``data``, a message of ``spec``, with its first string or array spoilt ``how``
    (``TAIL_BREAKS``; "padding" makes a valid message with non-zero padding), the
    header's size kept true; None where ``how`` does not apply to it."""
    pos = 8
    for arg in spec.args:
        if arg.kind in (ArgKind.STRING, ArgKind.ARRAY):
            break
        if arg.kind is ArgKind.NEW_ID and arg.interface is None:
            return None
        if arg.kind is not ArgKind.FD:
            pos += 4
    else:
        return None
    is_string = arg.kind is ArgKind.STRING
    out = bytearray(data)
    (length,) = struct.unpack_from("=I", out, pos)
    body = pos + 4
    padded = (length + 3) & ~3
    if how == "unterminated" and is_string and length:
        out[body + length - 1] = ord("z")
    elif how == "interior nul" and is_string and length >= 2:
        out[body] = 0
    elif how == "padding" and padded > length:
        out[body + length] = 1
    elif how == "long":
        struct.pack_into("=I", out, pos, len(out) - body + 1)
    elif how == "huge":
        struct.pack_into("=I", out, pos, 0xFFFFFFFF)
    elif how == "null" and is_string and length:
        out[pos:body + padded] = b"\0\0\0\0"
    elif how == "short" and len(out) > body:
        del out[-4:]
    else:
        return None
    object_id, word = HEADER.unpack_from(out)
    HEADER.pack_into(out, 0, object_id, len(out) << 16 | (word & 0xFFFF))
    return bytes(out)


def joined(segments: Sequence[tuple[bytes, list[int]]]) -> tuple[bytes, list[int]]:
    """The bytes and fds of a Step's segments, concatenated."""
    return b"".join(d for d, _ in segments), [fd for _, f in segments for fd in f]


def frames_of(segments: Sequence[tuple[bytes, list[int]]]) -> list[Frame]:
    """The whole messages of a Step's output towards one peer (which carries no fd)."""
    data, fds = joined(segments)
    assert fds == []
    reader = WireReader()
    reader.feed(data)
    frames = []
    while (head := reader.peek()) is not None:
        taken = reader.take(head[2], 0)
        assert taken is not None
        frames.append(taken[0])
    assert reader.buffered_bytes == 0, "the output holds a partial message"
    return frames


def parse_error(to_client: Sequence[tuple[bytes, list[int]]]) -> list[ArgValue]:
    """The args of the wl_display.error that ``to_client`` must end with."""
    frames = frames_of(to_client)
    assert frames, "no wl_display.error sent to the client"
    last = frames[-1]
    assert (last.object_id, last.opcode) == (1, 0)
    args = decode_args(PROTO["wl_display"].events[0], last.data, [])
    assert isinstance(args[2], str) and args[2].isprintable() and args[2]
    return args


def assert_client_error(step: Step, code: ErrorCode, *, object_id: int | None = None) -> str:
    """The session ended on the client's fault and told it ``code``; the message text."""
    assert step.error is not None, "expected a protocol error"
    assert step.client_at_fault is True
    assert step.error.code is code
    err_object, err_code, message = parse_error(step.to_client)
    assert err_code == int(code)
    if object_id is not None:
        assert err_object == object_id
    assert isinstance(message, str)
    return message


class RawClient:
    """A Wayland client speaking bytes, for what no toolkit would send (and for the few
    requests a screenshot needs); its registry's globals are read at once, the first of
    each interface kept. Fds the compositor sends are dropped unread."""

    def __init__(self, path: str | Path, timeout: float = 30.0) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(str(path))
        self.reader = WireReader(1 << 16)
        self.next_id = 2
        self.globals: dict[str, tuple[int, int]] = {}
        self.registry = self.new_id()
        self.send(request(1, "wl_display", "get_registry", self.registry))
        self.roundtrip()

    def new_id(self) -> int:
        self.next_id += 1
        return self.next_id - 1

    def send(self, message: tuple[bytes, list[int]]) -> None:
        data, fds = message
        rights = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())]
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            self.sock.sendmsg([data], rights if fds else [])

    def messages(self) -> Iterator[tuple[int, int, bytes]]:
        """(object, opcode, message) until the proxy hangs up."""
        while True:
            head = self.reader.peek()
            if head is not None:
                taken = self.reader.take(head[2], 0)
                assert taken is not None
                yield head[0], head[1], taken[0].data
                continue
            try:
                # recv, not recvmsg: the kernel drops the fds passed (keymaps, say).
                data = self.sock.recv(1 << 16)
            except ConnectionResetError:
                return
            if not data:
                return
            self.reader.feed(data)

    def roundtrip(self) -> list[tuple[int, int, bytes]]:
        """Everything up to a sync's done (or a wl_display.error)."""
        callback = self.new_id()
        self.send(request(1, "wl_display", "sync", callback))
        seen = []
        for object_id, opcode, data in self.messages():
            seen.append((object_id, opcode, data))
            if (object_id, opcode) == (self.registry, 0):
                name, iface, version = decode_args(PROTO["wl_registry"].events[0], data, [])
                assert isinstance(iface, str) and isinstance(name, int)
                assert isinstance(version, int)
                self.globals.setdefault(iface, (name, version))  # the first of each
            if object_id == callback or (object_id, opcode) == (1, 0):
                break
        return seen

    def bind(self, interface: str, version: int) -> int:
        name, _ = self.globals[interface]
        new = self.new_id()
        self.send(request(self.registry, "wl_registry", "bind", name,
                          UntypedNewId(interface, version, new)))
        return new

    def close(self) -> None:
        self.sock.close()
