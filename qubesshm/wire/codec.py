"""Sans-IO Wayland wire codec: bytes and fds in, messages out, and back.

``WireReader`` frames a byte stream into messages and hands out the file
descriptors that travelled beside it (SCM_RIGHTS may deliver them before or after
the bytes of their message). ``decode_args`` and ``encode_message`` turn one
message body into argument values and back, validating what libwayland validates.
Nothing here touches a socket.
"""

from __future__ import annotations

import enum
import struct
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

from .protocol import Arg, ArgKind, MessageSpec

HEADER = struct.Struct("=II")
HEADER_SIZE = HEADER.size
# libwayland servers refuse anything longer than their 4096-byte connection buffer.
DEFAULT_MAX_MESSAGE_SIZE = 4096
_U32 = struct.Struct("=I")
_I32 = struct.Struct("=i")


class ErrorCode(enum.IntEnum):
    """``wl_display.error`` codes."""

    INVALID_OBJECT = 0
    INVALID_METHOD = 1
    NO_MEMORY = 2
    IMPLEMENTATION = 3


class WireError(Exception):
    """The peer broke the protocol; ``code`` and ``object_id`` go into ``wl_display.error``.

    ``code`` is a ``wl_display`` error, or an interface's own error code (an int)
    when ``object_id`` is an object of that interface.
    """

    def __init__(self, message: str, code: ErrorCode | int = ErrorCode.INVALID_METHOD,
                 object_id: int = 1) -> None:
        super().__init__(message)
        self.message = message
        self.code = code
        self.object_id = object_id


@dataclass(frozen=True, slots=True)
class UntypedNewId:
    """The (interface, version, id) triple ``wl_registry.bind`` sends for its new_id."""

    interface: str
    version: int
    id: int


@dataclass(frozen=True, slots=True)
class Fixed:
    """A 24.8 signed fixed-point number, kept as its raw 32-bit value for exactness."""

    raw: int

    def __float__(self) -> float:
        return self.raw / 256.0


ArgValue = int | str | bytes | None | Fixed | UntypedNewId


@dataclass(frozen=True, slots=True)
class Frame:
    """One message as it came off the wire, before its arguments are decoded."""

    object_id: int
    opcode: int
    data: bytes  # header and body, exactly as received


def _pad4(n: int) -> int:
    return (n + 3) & ~3


class WireReader:
    """Frames one direction of a connection into messages, holding fds until claimed."""

    def __init__(self, max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE) -> None:
        self.max_message_size = max_message_size
        # Immutable bytes: slicing a message out is then a single copy.
        self._buf = b""
        self._pos = 0
        self._fds: deque[int] = deque()

    def feed(self, data: bytes, fds: Sequence[int] = ()) -> None:
        if self._pos >= len(self._buf):
            self._buf = bytes(data)
        else:
            self._buf = self._buf[self._pos :] + data
        self._pos = 0
        self._fds.extend(fds)

    @property
    def buffered_bytes(self) -> int:
        return len(self._buf) - self._pos

    @property
    def buffered_fds(self) -> int:
        return len(self._fds)

    def peek(self) -> tuple[int, int, int] | None:
        """(object id, opcode, size) of the next message once its whole body is here."""
        avail = len(self._buf) - self._pos
        if avail < HEADER_SIZE:
            return None
        object_id, word = HEADER.unpack_from(self._buf, self._pos)
        size, opcode = word >> 16, word & 0xFFFF
        if size < HEADER_SIZE:
            raise WireError(f"message size {size} is below the 8-byte header", object_id=1)
        if size % 4:
            raise WireError(f"message size {size} is not a multiple of 4", object_id=1)
        if size > self.max_message_size:
            raise WireError(
                f"message size {size} exceeds the maximum of {self.max_message_size}",
                object_id=1,
            )
        if avail < size:
            return None
        return object_id, opcode, size

    def take(self, size: int, fd_count: int) -> tuple[Frame, list[int]] | None:
        """Consume the message ``peek`` described, with its fds; None while fds are owed."""
        taken = self.take_bytes(size, fd_count)
        if taken is None:
            return None
        data, fds = taken
        object_id, word = HEADER.unpack_from(data)
        return Frame(object_id, word & 0xFFFF, data), fds

    def take_bytes(self, size: int, fd_count: int) -> tuple[bytes, list[int]] | None:
        """``take`` without the ``Frame``: the message's bytes (header included)."""
        fds = self._fds
        if len(fds) < fd_count:
            return None
        start = self._pos
        self._pos = end = start + size
        return self._buf[start:end], [fds.popleft() for _ in range(fd_count)] if fd_count else []

    def unread(self) -> tuple[bytes, int]:
        """The buffer and the offset of its first unread byte, for a caller that frames
        messages itself (the relay's fast path) and then calls ``skip_to``."""
        return self._buf, self._pos

    def skip_to(self, pos: int) -> None:
        """Everything before ``pos`` in the ``unread`` buffer has been handled."""
        if not self._pos <= pos <= len(self._buf):
            raise ValueError(f"cannot skip to {pos}: the unread bytes are "
                             f"{self._pos}..{len(self._buf)}")
        self._pos = pos

    def drain_fds(self) -> list[int]:
        """Hand back every fd not yet claimed, so the caller can close them."""
        fds = list(self._fds)
        self._fds.clear()
        return fds


_SCALAR_KINDS = frozenset({ArgKind.INT, ArgKind.UINT, ArgKind.FIXED, ArgKind.OBJECT,
                           ArgKind.NEW_ID, ArgKind.FD})


@dataclass(frozen=True, slots=True)
class _ScalarPlan:
    """How to decode a signature made only of 32-bit words (and fds) in one unpack."""

    layout: struct.Struct
    size: int
    plain: bool  # nothing but int/uint: the unpacked tuple is the answer
    # No fd and no fixed: the values, a null object as 0, are the words to pack.
    words: bool = False
    # With ``words``: the object and new_id arguments, whose 0 is checked (a null).
    ids: tuple[int, ...] = ()
    # With ``words``: header and words in one layout, for ``encode_message``.
    message: struct.Struct | None = None


def _plan(spec: MessageSpec) -> _ScalarPlan | bool:
    """The precompiled plan for ``spec``, or False when it needs the general decoder."""
    plan = spec.codec_plan
    if plan is None:
        if all(a.kind in _SCALAR_KINDS and not a.untyped_new_id for a in spec.args):
            words = "".join("i" if a.kind in (ArgKind.INT, ArgKind.FIXED) else "I"
                            for a in spec.args if a.kind is not ArgKind.FD)
            layout = struct.Struct("=" + words)
            plan = _ScalarPlan(layout, HEADER_SIZE + layout.size,
                               all(a.kind in (ArgKind.INT, ArgKind.UINT) for a in spec.args),
                               all(a.kind not in (ArgKind.FD, ArgKind.FIXED)
                                   for a in spec.args),
                               tuple(i for i, _ in spec.id_args),
                               struct.Struct("=II" + words))
        else:
            plan = False
        object.__setattr__(spec, "codec_plan", plan)
    assert isinstance(plan, _ScalarPlan | bool)
    return plan


def decode_args(spec: MessageSpec, data: bytes, fds: Sequence[int]) -> list[ArgValue]:
    """Argument values of one framed message (header included in ``data``)."""
    plan = spec.codec_plan
    if plan is None:
        plan = _plan(spec)
    if plan and isinstance(plan, _ScalarPlan) and len(data) == plan.size:
        if plan.words:
            values: list[ArgValue] = list(plan.layout.unpack_from(data, HEADER_SIZE))
            for index in plan.ids:
                if values[index] == 0:
                    values[index] = _word_value(spec, spec.args[index], 0)
            return values
        return _finish_scalars(spec, plan.layout.unpack_from(data, HEADER_SIZE), fds)
    # The general decoder also says precisely what is wrong with a bad message.
    out: list[ArgValue] = []
    pos = HEADER_SIZE
    end = len(data)
    fd_iter = iter(fds)
    for arg in spec.args:
        kind = arg.kind
        if kind is ArgKind.FD:
            out.append(next(fd_iter))
            continue
        if kind is ArgKind.NEW_ID and arg.interface is None:
            iface_name, pos = _read_string(spec, arg.name, data, pos, end, nullable=False)
            assert iface_name is not None
            if pos + 8 > end:
                raise _truncated(spec, arg.name)
            version, new_id = struct.unpack_from("=II", data, pos)
            pos += 8
            if new_id == 0:
                raise _bad(spec, arg.name, "null new_id")
            out.append(UntypedNewId(iface_name, version, new_id))
            continue
        if pos + 4 > end:
            raise _truncated(spec, arg.name)
        if kind is ArgKind.STRING:
            text, pos = _read_string(spec, arg.name, data, pos, end, nullable=arg.nullable)
            out.append(text)
        elif kind is ArgKind.ARRAY:
            length = _U32.unpack_from(data, pos)[0]
            pos += 4
            if pos + _pad4(length) > end or length > end:
                raise _truncated(spec, arg.name)
            out.append(bytes(data[pos : pos + length]))
            pos += _pad4(length)
        else:  # a 32-bit word
            word = _I32 if kind is ArgKind.INT or kind is ArgKind.FIXED else _U32
            out.append(_word_value(spec, arg, word.unpack_from(data, pos)[0]))
            pos += 4
    if pos != end:
        raise _bad(spec, None, f"{end - pos} trailing bytes")
    return out


def _finish_scalars(spec: MessageSpec, words: tuple[int, ...],
                    fds: Sequence[int]) -> list[ArgValue]:
    word = iter(words)
    fd = iter(fds)
    return [next(fd) if arg.kind is ArgKind.FD else _word_value(spec, arg, next(word))
            for arg in spec.args]


def _word_value(spec: MessageSpec, arg: Arg, value: int) -> ArgValue:
    """The argument a 32-bit word stands for, refusing nulls where not allowed."""
    kind = arg.kind
    if kind is ArgKind.FIXED:
        return Fixed(value)
    if value == 0:
        if kind is ArgKind.NEW_ID:
            raise _bad(spec, arg.name, "null new_id")
        if kind is ArgKind.OBJECT:
            if not arg.nullable:
                raise _bad(spec, arg.name, "null object")
            return None
    return value


def _read_string(spec: MessageSpec, name: str, data: bytes, pos: int, end: int,
                 *, nullable: bool) -> tuple[str | None, int]:
    """The string at ``pos`` and the position after it."""
    if pos + 4 > end:
        raise _truncated(spec, name)
    length = _U32.unpack_from(data, pos)[0]
    start = pos + 4
    if length == 0:
        if not nullable:
            raise _bad(spec, name, "null string")
        return None, start
    if length > end or start + _pad4(length) > end:
        raise _truncated(spec, name)
    raw = data[start : start + length]
    if raw[-1] != 0:
        raise _bad(spec, name, "string is not NUL-terminated")
    if 0 in raw[:-1]:
        raise _bad(spec, name, "string has an interior NUL")
    return bytes(raw[:-1]).decode("utf-8", "surrogateescape"), start + _pad4(length)


def _truncated(spec: MessageSpec, arg: str) -> WireError:
    return _bad(spec, arg, "message too short")


def _bad(spec: MessageSpec, arg: str | None, why: str) -> WireError:
    where = f" (argument {arg})" if arg else ""
    return WireError(f"invalid arguments for {spec}{where}: {why}")


def encode_message(object_id: int, spec: MessageSpec,
                   args: Sequence[ArgValue]) -> tuple[bytes, list[int]]:
    """Bytes and fds of one message; the inverse of ``decode_args``."""
    if len(args) != len(spec.args):
        raise ValueError(f"{spec} takes {len(spec.args)} arguments, got {len(args)}")
    plan = spec.codec_plan
    if plan is None:
        plan = _plan(spec)
    if plan and isinstance(plan, _ScalarPlan) and plan.words:
        # 32-bit words only: one pack, as ``decode_args`` reads them with one unpack.
        words = args if plan.plain else [0 if value is None else value for value in args]
        assert plan.message is not None
        return plan.message.pack(object_id, plan.size << 16 | spec.opcode, *words), []
    body = bytearray()
    fds: list[int] = []
    for arg, value in zip(spec.args, args, strict=True):
        kind = arg.kind
        if kind is ArgKind.FD:
            assert isinstance(value, int)
            fds.append(value)
        elif kind is ArgKind.NEW_ID and arg.interface is None:
            assert isinstance(value, UntypedNewId)
            _write_string(body, value.interface)
            body += struct.pack("=II", value.version, value.id)
        elif kind is ArgKind.STRING:
            assert value is None or isinstance(value, str)
            _write_string(body, value)
        elif kind is ArgKind.ARRAY:
            assert isinstance(value, bytes)
            body += _U32.pack(len(value)) + value + bytes(_pad4(len(value)) - len(value))
        elif kind is ArgKind.INT:
            assert isinstance(value, int)
            body += _I32.pack(value)
        elif kind is ArgKind.FIXED:
            assert isinstance(value, Fixed)
            body += _I32.pack(value.raw)
        else:
            assert value is None or isinstance(value, int)
            body += _U32.pack(value or 0)
    size = HEADER_SIZE + len(body)
    if size > 0xFFFF:
        raise ValueError(f"{spec} message of {size} bytes does not fit the 16-bit size field")
    return HEADER.pack(object_id, size << 16 | spec.opcode) + bytes(body), fds


def _write_string(body: bytearray, value: str | None) -> None:
    if value is None:
        body += _U32.pack(0)
        return
    raw = value.encode("utf-8", "surrogateescape") + b"\0"
    body += _U32.pack(len(raw)) + raw + bytes(_pad4(len(raw)) - len(raw))
