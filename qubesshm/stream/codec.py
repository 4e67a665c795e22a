"""The codec of the stream between a split proxy's two halves: bytes <-> typed frames.

Sans-IO. ``encode`` turns a frame into bytes and refuses (``ValueError``) anything the
other side's decoder would refuse, so that a bug on this side never puts on the stream
what the peer must reject; ``encode_data`` and ``encode_ack`` are its hot paths.
``Decoder.feed`` turns bytes as they arrive into whole frames, keeping a partial one
for the next feed, and raises ``StreamError`` on the first thing that is not well formed
(then refuses all further input). Every header is checked in full as soon as its 12
bytes are in, so no unchecked length is ever buffered.

Protocol version 1, little-endian. A frame is a header (``HEADER``: body length u32,
kind u16, flags u16 that must be 0, conn u32) and a body laid out by its ``Kind``.
Stream-level kinds carry conn 0, the others a connection id (1..0xFFFFFFFF). The
stateful rules (HELLO first, nothing after ERROR, connection ids and credits) are not
the codec's: each frame is checked on its own.
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar, TypeAlias, assert_never

VERSION = 1
MAGIC = b"QSHM"
MAX_DATA = 64 * 1024
MAX_FILE = 4 * 1024 * 1024
# The longest body of any kind: a FILE's bytes, or a POOL of MAX_REFS refs (16 + 4 MiB).
MAX_BODY = MAX_FILE + 64
MAX_REFS = 1 << 20
MAX_REASON = 1024
PAGE = 4096
# Xen's first reserved domain id (DOMID_FIRST_RESERVED): no real domain has it or above.
DOMID_FIRST_RESERVED = 0x7FF0
HEADER = struct.Struct("<IHHI")
HEADER_SIZE = HEADER.size
U16_MAX = 0xFFFF
U32_MAX = 0xFFFFFFFF

_U32 = struct.Struct("<I")
_U32_PAIR = struct.Struct("<II")
_HELLO = struct.Struct("<4sHHI")
_POOL = struct.Struct("<IIII")
_PIPE = struct.Struct("<IB")
_ACK = struct.Struct("<IHHII")
_UNPACK_HEADER = HEADER.unpack_from
_DATA_KIND = 5  # Kind.DATA as a plain int, for the decoder's hot path
# The longest run of peer bytes an error message quotes.
_QUOTE_LIMIT = 64


class Kind(enum.IntEnum):
    """A frame's kind (the header's u16)."""

    HELLO = 1
    CHANNEL = 2
    OPEN = 3
    CLOSE = 4
    DATA = 5
    ACK = 6
    POOL = 7
    UNMAP = 8
    FILE = 9
    PIPE = 10
    PIPE_DATA = 11
    PIPE_END = 12
    PIPE_ACK = 13
    ERROR = 14


class PipeEnd(enum.IntEnum):
    """Which end of a pipe the fd a PIPE frame stands for was."""

    READ = 0
    WRITE = 1


class StreamError(Exception):
    """The stream is not well formed: one line naming the frame kind and what is wrong."""


@dataclass(frozen=True, slots=True)
class Hello:
    """Both ways, first: the versions the sender speaks and its own domain id."""

    KIND: ClassVar[Kind] = Kind.HELLO
    version_min: int
    version_max: int
    domid: int


@dataclass(frozen=True, slots=True)
class Channel:
    """VM to host: the VM's unbound event-channel port for the host's domain."""

    KIND: ClassVar[Kind] = Kind.CHANNEL
    port: int


@dataclass(frozen=True, slots=True)
class Open:
    """VM to host: a new client connection."""

    KIND: ClassVar[Kind] = Kind.OPEN
    conn: int


@dataclass(frozen=True, slots=True)
class Close:
    """Both ways: the connection is over (the reason may be empty)."""

    KIND: ClassVar[Kind] = Kind.CLOSE
    conn: int
    reason: str


@dataclass(frozen=True, slots=True)
class Data:
    """Both ways: Wayland bytes of a connection (1..MAX_DATA)."""

    KIND: ClassVar[Kind] = Kind.DATA
    conn: int
    data: bytes


@dataclass(frozen=True, slots=True)
class Ack:
    """Both ways: credit returned for DATA bytes the sender of the ACK consumed."""

    KIND: ClassVar[Kind] = Kind.ACK
    conn: int
    count: int


@dataclass(frozen=True, slots=True)
class Pool:
    """VM to host: stands where an shm fd travels; the grant refs of its pages."""

    KIND: ClassVar[Kind] = Kind.POOL
    conn: int
    domid: int
    pool_id: int
    size: int
    notify_offset: int
    refs: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class Unmap:
    """VM to host: the pool is gone."""

    KIND: ClassVar[Kind] = Kind.UNMAP
    conn: int
    pool_id: int


@dataclass(frozen=True, slots=True)
class File:
    """Both ways: stands where a read-only file's fd travels; its bytes (0..MAX_FILE)."""

    KIND: ClassVar[Kind] = Kind.FILE
    conn: int
    data: bytes


@dataclass(frozen=True, slots=True)
class Pipe:
    """Both ways: stands where a pipe's fd travels; the pipe's id and which end it was."""

    KIND: ClassVar[Kind] = Kind.PIPE
    conn: int
    pipe_id: int
    end: PipeEnd


@dataclass(frozen=True, slots=True)
class PipeData:
    """Both ways: bytes that went into a pipe (1..MAX_DATA)."""

    KIND: ClassVar[Kind] = Kind.PIPE_DATA
    pipe_id: int
    data: bytes


@dataclass(frozen=True, slots=True)
class PipeClosed:
    """Both ways (kind PIPE_END): no more data on the pipe, or its other end closed."""

    KIND: ClassVar[Kind] = Kind.PIPE_END
    pipe_id: int


@dataclass(frozen=True, slots=True)
class PipeAck:
    """Both ways: credit returned for PIPE_DATA bytes the sender of the ack consumed."""

    KIND: ClassVar[Kind] = Kind.PIPE_ACK
    pipe_id: int
    count: int


@dataclass(frozen=True, slots=True)
class Error:
    """Both ways: fatal; the stream ends after it."""

    KIND: ClassVar[Kind] = Kind.ERROR
    text: str


Frame: TypeAlias = (
    Hello | Channel | Open | Close | Data | Ack | Pool | Unmap | File | Pipe | PipeData
    | PipeClosed | PipeAck | Error
)


def _quote(raw: bytes | bytearray | memoryview, limit: int = _QUOTE_LIMIT) -> str:
    """Peer bytes for an error message: repr-escaped (one line), at most ``limit`` of them."""
    text = repr(bytes(raw[:limit]))
    return text + "..." if len(raw) > limit else text


# -- the rules both sides apply ------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Spec:
    """A kind's header-level rules, and how its body is read."""

    kind: Kind
    stream_level: bool
    min_body: int
    max_body: int
    shape: str
    parse: Callable[[int, memoryview], Frame]

    def header_problem(self, length: int, flags: int, conn: int) -> str | None:
        if flags:
            return f"flags {flags:#06x}, must be 0"
        if self.stream_level:
            if conn:
                return f"conn {conn}, must be 0 (a stream-level frame)"
        elif not conn:
            return f"conn 0, must be a connection id (1..{U32_MAX})"
        if (
            length < self.min_body or length > self.max_body
            or (self.kind is Kind.POOL and (length - _POOL.size) % 4)
        ):
            if self.min_body == self.max_body:
                return f"body of {length} bytes, must be {self.min_body} ({self.shape})"
            return (f"body of {length} bytes, must be {self.min_body}..{self.max_body}"
                    f" ({self.shape})")
        return None


def _domid_problem(domid: int) -> str | None:
    if domid >= DOMID_FIRST_RESERVED:
        return f"domid {domid:#x} is reserved, must be below {DOMID_FIRST_RESERVED:#x}"
    return None


def _count_problem(count: int) -> str | None:
    return f"count {count}, must be at least 1" if count < 1 else None


def _end_problem(end: int) -> str | None:
    if end not in (PipeEnd.READ, PipeEnd.WRITE):
        return f"end {end}, must be 0 (READ) or 1 (WRITE)"
    return None


def _field_problem(frame: Frame) -> str | None:
    """What is wrong with a frame's fields beyond their layout (both sides check it)."""
    if isinstance(frame, Hello):
        if frame.version_min > frame.version_max:
            return f"version_min {frame.version_min} > version_max {frame.version_max}"
        return _domid_problem(frame.domid)
    if isinstance(frame, Ack | PipeAck):
        return _count_problem(frame.count)
    if isinstance(frame, Pool):
        if frame.pool_id == 0:
            return "pool_id 0, must be nonzero"
        count = len(frame.refs)
        if frame.size != count * PAGE:
            return f"size {frame.size}, must be {PAGE} per ref ({count} refs: {count * PAGE})"
        if frame.notify_offset >= frame.size:
            return f"notify_offset {frame.notify_offset}, must be below size {frame.size}"
        return _domid_problem(frame.domid)
    if isinstance(frame, Unmap):
        return "pool_id 0, must be nonzero" if frame.pool_id == 0 else None
    if isinstance(frame, Pipe):
        return _end_problem(frame.end)
    return None


# -- decoding ------------------------------------------------------------------------------


def _refused(kind: Kind, problem: str) -> StreamError:
    return StreamError(f"{kind.name} frame: {problem}")


def _checked(frame: Frame) -> Frame:
    problem = _field_problem(frame)
    if problem is not None:
        raise _refused(frame.KIND, problem)
    return frame


def _text(kind: Kind, name: str, body: memoryview) -> str:
    try:
        return str(body, "utf-8")
    except UnicodeDecodeError as error:
        raise _refused(kind, f"{name} is not valid UTF-8 ({error.reason} at byte {error.start}:"
                             f" {_quote(body[error.start:], 16)})") from None


def _parse_hello(conn: int, body: memoryview) -> Frame:
    magic, version_min, version_max, domid = _HELLO.unpack(body)
    if magic != MAGIC:
        raise _refused(Kind.HELLO, f"magic {_quote(magic)}, must be {MAGIC!r}")
    return _checked(Hello(version_min, version_max, domid))


def _parse_channel(conn: int, body: memoryview) -> Frame:
    return Channel(_U32.unpack(body)[0])


def _parse_open(conn: int, body: memoryview) -> Frame:
    return Open(conn)


def _parse_close(conn: int, body: memoryview) -> Frame:
    return Close(conn, _text(Kind.CLOSE, "reason", body))


def _parse_data(conn: int, body: memoryview) -> Frame:
    return Data(conn, body.tobytes())


def _parse_ack(conn: int, body: memoryview) -> Frame:
    return _checked(Ack(conn, _U32.unpack(body)[0]))


def _parse_pool(conn: int, body: memoryview) -> Frame:
    domid, pool_id, size, notify_offset = _POOL.unpack_from(body)
    count = (len(body) - _POOL.size) // 4
    refs: tuple[int, ...] = struct.unpack_from(f"<{count}I", body, _POOL.size)
    return _checked(Pool(conn, domid, pool_id, size, notify_offset, refs))


def _parse_unmap(conn: int, body: memoryview) -> Frame:
    return _checked(Unmap(conn, _U32.unpack(body)[0]))


def _parse_file(conn: int, body: memoryview) -> Frame:
    return File(conn, body.tobytes())


def _parse_pipe(conn: int, body: memoryview) -> Frame:
    pipe_id, end = _PIPE.unpack(body)
    problem = _end_problem(end)
    if problem is not None:
        raise _refused(Kind.PIPE, problem)
    return Pipe(conn, pipe_id, PipeEnd(end))


def _parse_pipe_data(conn: int, body: memoryview) -> Frame:
    return PipeData(_U32.unpack_from(body)[0], body[4:].tobytes())


def _parse_pipe_end(conn: int, body: memoryview) -> Frame:
    return PipeClosed(_U32.unpack(body)[0])


def _parse_pipe_ack(conn: int, body: memoryview) -> Frame:
    pipe_id, count = _U32_PAIR.unpack(body)
    return _checked(PipeAck(pipe_id, count))


def _parse_error(conn: int, body: memoryview) -> Frame:
    return Error(_text(Kind.ERROR, "text", body))


_SPECS: dict[int, _Spec] = {spec.kind: spec for spec in (
    _Spec(Kind.HELLO, True, 12, 12, "magic, u16 version_min, u16 version_max, u32 domid",
          _parse_hello),
    _Spec(Kind.CHANNEL, True, 4, 4, "u32 port", _parse_channel),
    _Spec(Kind.OPEN, False, 0, 0, "empty", _parse_open),
    _Spec(Kind.CLOSE, False, 0, MAX_REASON, "UTF-8 reason", _parse_close),
    _Spec(Kind.DATA, False, 1, MAX_DATA, "Wayland bytes", _parse_data),
    _Spec(Kind.ACK, False, 4, 4, "u32 count", _parse_ack),
    _Spec(Kind.POOL, False, 16 + 4, 16 + 4 * MAX_REFS,
          f"4 u32 fields, then a u32 per ref, 1..{MAX_REFS} refs", _parse_pool),
    _Spec(Kind.UNMAP, False, 4, 4, "u32 pool_id", _parse_unmap),
    _Spec(Kind.FILE, False, 0, MAX_FILE, "file bytes", _parse_file),
    _Spec(Kind.PIPE, False, 5, 5, "u32 pipe_id, u8 end", _parse_pipe),
    _Spec(Kind.PIPE_DATA, True, 4 + 1, 4 + MAX_DATA, f"u32 pipe_id, then 1..{MAX_DATA} bytes",
          _parse_pipe_data),
    _Spec(Kind.PIPE_END, True, 4, 4, "u32 pipe_id", _parse_pipe_end),
    _Spec(Kind.PIPE_ACK, True, 8, 8, "u32 pipe_id, u32 count", _parse_pipe_ack),
    _Spec(Kind.ERROR, True, 0, MAX_REASON, "UTF-8 text", _parse_error),
)}
assert max(spec.max_body for spec in _SPECS.values()) <= MAX_BODY


def _parse(view: memoryview, frames: list[Frame]) -> int:
    """Append the whole frames at the start of ``view``; return how many bytes they took."""
    pos = 0
    end = len(view)
    unpack = _UNPACK_HEADER
    append = frames.append
    specs = _SPECS
    while end - pos >= HEADER_SIZE:
        length, kind, flags, conn = unpack(view, pos)
        start = pos + HEADER_SIZE
        stop = start + length
        if kind == _DATA_KIND and not flags and conn and 0 < length <= MAX_DATA:
            # the hot path, checked in full by the line above
            if stop > end:
                break
            append(Data(conn, view[start:stop].tobytes()))
        else:
            spec = specs.get(kind)
            if spec is None:
                raise StreamError(f"frame of unknown kind {kind} (flags {flags:#06x},"
                                  f" conn {conn}, body of {length} bytes)")
            problem = spec.header_problem(length, flags, conn)
            if problem is not None:
                raise _refused(spec.kind, problem)
            if stop > end:
                break
            append(spec.parse(conn, view[start:stop]))
        pos = stop
    return pos


class Decoder:
    """Bytes of the stream in, whole frames out; a partial frame waits for the next feed.

    After a ``StreamError`` (from ``feed`` or ``eof``) the decoder holds nothing and
    refuses everything with ``StreamError``.
    """

    __slots__ = ("_buffer", "_failure")

    def __init__(self) -> None:
        self._buffer = bytearray()
        self._failure: str | None = None

    @property
    def pending(self) -> int:
        """Bytes buffered: the start of a frame not yet whole."""
        return len(self._buffer)

    def _check_alive(self) -> None:
        if self._failure is not None:
            raise StreamError(f"the stream already failed: {self._failure}")

    def _fail(self, error: StreamError) -> None:
        self._failure = str(error)
        self._buffer = bytearray()

    def feed(self, data: bytes | bytearray | memoryview) -> list[Frame]:
        """The whole frames that ``data`` completes, in order."""
        self._check_alive()
        frames: list[Frame] = []
        buffer = self._buffer
        try:
            if buffer:
                buffer += data
                with memoryview(buffer) as view:
                    used = _parse(view, frames)
                # CPython moves the start of a bytearray rather than copying it.
                del buffer[:used]
            else:
                # Nothing buffered: frames come straight out of data, its tail is kept.
                with memoryview(data) as given, given.cast("B") as view:
                    used = _parse(view, frames)
                    if used < len(view):
                        buffer += view[used:]
        except StreamError as error:
            self._fail(error)
            raise
        return frames

    def eof(self) -> None:
        """The stream ended: ``StreamError`` if it ended inside a frame."""
        self._check_alive()
        buffer = self._buffer
        if not buffer:
            return
        kind = None
        if len(buffer) >= 6:
            spec = _SPECS.get(int.from_bytes(buffer[4:6], "little"))
            kind = None if spec is None else spec.kind
        if len(buffer) < HEADER_SIZE:
            where = f"its header ({len(buffer)} of {HEADER_SIZE} bytes)"
        else:
            length = HEADER.unpack_from(buffer)[0]
            where = f"its body ({len(buffer) - HEADER_SIZE} of {length} bytes)"
        error = StreamError(f"{'a' if kind is None else kind.name} frame: EOF inside {where}")
        self._fail(error)
        raise error


# -- encoding ------------------------------------------------------------------------------


_SPEC_OF_TYPE: dict[type, _Spec] = {
    Hello: _SPECS[Kind.HELLO], Channel: _SPECS[Kind.CHANNEL], Open: _SPECS[Kind.OPEN],
    Close: _SPECS[Kind.CLOSE], Data: _SPECS[Kind.DATA], Ack: _SPECS[Kind.ACK],
    Pool: _SPECS[Kind.POOL], Unmap: _SPECS[Kind.UNMAP], File: _SPECS[Kind.FILE],
    Pipe: _SPECS[Kind.PIPE], PipeData: _SPECS[Kind.PIPE_DATA],
    PipeClosed: _SPECS[Kind.PIPE_END], PipeAck: _SPECS[Kind.PIPE_ACK],
    Error: _SPECS[Kind.ERROR],
}
# The int fields of each type, and their widths: only the encoder needs to check them.
_WIDTHS: dict[type, tuple[tuple[str, int], ...]] = {
    Hello: (("version_min", U16_MAX), ("version_max", U16_MAX), ("domid", U32_MAX)),
    Channel: (("port", U32_MAX),),
    Open: (("conn", U32_MAX),),
    Close: (("conn", U32_MAX),),
    Data: (("conn", U32_MAX),),
    Ack: (("conn", U32_MAX), ("count", U32_MAX)),
    Pool: (("conn", U32_MAX), ("domid", U32_MAX), ("pool_id", U32_MAX), ("size", U32_MAX),
           ("notify_offset", U32_MAX)),
    Unmap: (("conn", U32_MAX), ("pool_id", U32_MAX)),
    File: (("conn", U32_MAX),),
    Pipe: (("conn", U32_MAX), ("pipe_id", U32_MAX), ("end", 0xFF)),
    PipeData: (("pipe_id", U32_MAX),),
    PipeClosed: (("pipe_id", U32_MAX),),
    PipeAck: (("pipe_id", U32_MAX), ("count", U32_MAX)),
    Error: (),
}


def _width_problem(frame: Frame) -> str | None:
    for name, limit in _WIDTHS[type(frame)]:
        value = getattr(frame, name)
        if not isinstance(value, int) or not 0 <= value <= limit:
            return f"{name} {value!r}, must be an int in 0..{limit}"
    if isinstance(frame, Pool) and frame.refs and not (
        all(isinstance(ref, int) for ref in frame.refs)
        and min(frame.refs) >= 0 and max(frame.refs) <= U32_MAX
    ):
        return f"refs must be ints in 0..{U32_MAX}"
    if isinstance(frame, Data | File | PipeData) and not isinstance(
            frame.data, bytes | bytearray | memoryview):
        return f"data of type {type(frame.data).__name__}, must be bytes"
    if isinstance(frame, Close | Error):
        text = frame.reason if isinstance(frame, Close) else frame.text
        if not isinstance(text, str):
            return f"{'reason' if isinstance(frame, Close) else 'text'} must be a str"
    return None


def _raw(data: bytes | bytearray | memoryview) -> bytes | bytearray | memoryview:
    """``data`` as a run of bytes, whatever the format of a memoryview."""
    if isinstance(data, memoryview) and (data.format != "B" or data.ndim != 1):
        return data.cast("B")
    return data


def _layout(frame: Frame) -> tuple[int, bytes | bytearray | memoryview]:
    """A frame's conn and body (its fields already checked for width)."""
    if isinstance(frame, Hello):
        return 0, _HELLO.pack(MAGIC, frame.version_min, frame.version_max, frame.domid)
    if isinstance(frame, Channel):
        return 0, _U32.pack(frame.port)
    if isinstance(frame, Open):
        return frame.conn, b""
    if isinstance(frame, Close):
        return frame.conn, frame.reason.encode("utf-8")
    if isinstance(frame, Data | File):
        return frame.conn, _raw(frame.data)
    if isinstance(frame, Ack):
        return frame.conn, _U32.pack(frame.count)
    if isinstance(frame, Pool):
        return frame.conn, (
            _POOL.pack(frame.domid, frame.pool_id, frame.size, frame.notify_offset)
            + struct.pack(f"<{len(frame.refs)}I", *frame.refs))
    if isinstance(frame, Unmap):
        return frame.conn, _U32.pack(frame.pool_id)
    if isinstance(frame, Pipe):
        return frame.conn, _PIPE.pack(frame.pipe_id, frame.end)
    if isinstance(frame, PipeData):
        return 0, _U32.pack(frame.pipe_id) + _raw(frame.data)
    if isinstance(frame, PipeClosed):
        return 0, _U32.pack(frame.pipe_id)
    if isinstance(frame, PipeAck):
        return 0, _U32_PAIR.pack(frame.pipe_id, frame.count)
    if isinstance(frame, Error):
        return 0, frame.text.encode("utf-8")
    assert_never(frame)


def encode(frame: Frame) -> bytes:
    """A frame's bytes; ``ValueError`` for any frame the peer's decoder would refuse."""
    spec = _SPEC_OF_TYPE.get(type(frame))
    if spec is None:
        raise TypeError(f"not a stream frame: {frame!r}")
    problem = _width_problem(frame)
    if problem is None:
        try:
            conn, body = _layout(frame)
        except UnicodeEncodeError as error:
            name = "reason" if isinstance(frame, Close) else "text"
            problem = (f"{name} is not valid UTF-8 ({error.reason} at character"
                       f" {error.start})")
        else:
            problem = spec.header_problem(len(body), 0, conn) or _field_problem(frame)
            if problem is None:
                return HEADER.pack(len(body), spec.kind, 0, conn) + body
    raise ValueError(f"{spec.kind.name} frame: {problem}")


def encode_data(conn: int, data: bytes | bytearray | memoryview) -> bytes:
    """``encode(Data(conn, data))``, fast."""
    length = data.nbytes if isinstance(data, memoryview) else len(data)
    if 0 < length <= MAX_DATA and 0 < conn <= U32_MAX:
        return HEADER.pack(length, Kind.DATA, 0, conn) + data
    return encode(Data(conn, bytes(data)))  # raises the ValueError that says why


def encode_ack(conn: int, count: int) -> bytes:
    """``encode(Ack(conn, count))``, fast."""
    if 0 < conn <= U32_MAX and 0 < count <= U32_MAX:
        return _ACK.pack(4, Kind.ACK, 0, conn, count)
    return encode(Ack(conn, count))  # raises the ValueError that says why


def fit_text(text: str) -> str:
    """``text`` made fit to send as a CLOSE reason or an ERROR text: lone surrogates
    backslash-escaped, then cut to MAX_REASON bytes at a character boundary."""
    try:
        raw = text.encode("utf-8")
    except UnicodeEncodeError:
        raw = text.encode("utf-8", "backslashreplace")
    else:
        if len(raw) <= MAX_REASON:
            return text
    return raw[:MAX_REASON].decode("utf-8", "ignore")


def negotiate(ours_min: int, ours_max: int, theirs: Hello) -> int:
    """The highest version both sides speak; ``StreamError`` if they share none."""
    if not 0 <= ours_min <= ours_max <= U16_MAX:
        raise ValueError(f"our versions {ours_min}..{ours_max} are not a u16 range")
    low = max(ours_min, theirs.version_min)
    high = min(ours_max, theirs.version_max)
    if low > high:
        raise StreamError(f"HELLO frame: no common version: ours {ours_min}..{ours_max},"
                          f" theirs {theirs.version_min}..{theirs.version_max}")
    return high
