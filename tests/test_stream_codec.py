"""The codec of the stream between a split proxy's halves: frames <-> bytes, and refusals.

Every kind round-trips (whole, in arbitrary pieces, a byte at a time); every rule of
the protocol is refused with its own message, by the decoder as soon as the offending
byte is in (a header as soon as its 12 bytes are) and by the encoder before anything
reaches the stream; random bytes and mutated valid streams only ever raise
``StreamError``, and whatever the decoder accepts re-encodes to the very same bytes.
"""

from __future__ import annotations

import array
import re
import struct
from collections.abc import Sequence
from dataclasses import replace
from typing import Any, cast

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qubesshm.stream.codec import (
    DOMID_FIRST_RESERVED,
    HEADER,
    MAGIC,
    MAX_BODY,
    MAX_DATA,
    MAX_FILE,
    MAX_REASON,
    MAX_REFS,
    PAGE,
    VERSION,
    Ack,
    Channel,
    Close,
    Data,
    Decoder,
    Error,
    File,
    Frame,
    Hello,
    Kind,
    Open,
    Pipe,
    PipeAck,
    PipeClosed,
    PipeData,
    PipeEnd,
    Pool,
    StreamError,
    Unmap,
    encode,
    encode_ack,
    encode_data,
    fit_text,
    negotiate,
)

U16 = 0xFFFF
U32 = 0xFFFFFFFF
STREAM_LEVEL = (Kind.HELLO, Kind.CHANNEL, Kind.PIPE_DATA, Kind.PIPE_END, Kind.PIPE_ACK,
                Kind.ERROR)
PER_CONNECTION = tuple(kind for kind in Kind if kind not in STREAM_LEVEL)


def header(length: int, kind: int, conn: int = 0, flags: int = 0) -> bytes:
    """A header packed by hand (no checks), as a peer could send it."""
    return struct.pack("<IHHI", length, kind, flags, conn)


def raw(kind: int, body: bytes, conn: int = 0, flags: int = 0) -> bytes:
    return header(len(body), kind, conn, flags) + body


def pool_body(domid: int, pool_id: int, size: int, notify: int, refs: Sequence[int]) -> bytes:
    return struct.pack(f"<IIII{len(refs)}I", domid, pool_id, size, notify, *refs)


def feed_in_pieces(decoder: Decoder, stream: bytes, cuts: Sequence[int]) -> list[Frame]:
    """Feed ``stream`` cut at ``cuts``, every other piece as a memoryview."""
    frames: list[Frame] = []
    start = 0
    for index, cut in enumerate([*sorted(cuts), len(stream)]):
        piece = stream[start:cut]
        frames += decoder.feed(memoryview(piece) if index % 2 else piece)
        start = cut
    return frames


def decode(stream: bytes) -> list[Frame]:
    decoder = Decoder()
    frames = decoder.feed(stream)
    decoder.eof()
    return frames


# -- strategies ----------------------------------------------------------------------------

u16s = st.integers(0, U16)
u32s = st.integers(0, U32)
conns = st.integers(1, U32)
nonzero = st.integers(1, U32)
domids = st.integers(0, DOMID_FIRST_RESERVED - 1)
# at most 4 bytes a character: 200 of them always fit in MAX_REASON
texts = st.text(max_size=200)
payloads = st.binary(min_size=1, max_size=300)


@st.composite
def hellos(draw: st.DrawFn) -> Hello:
    low, high = sorted((draw(u16s), draw(u16s)))
    return Hello(low, high, draw(domids))


@st.composite
def pools(draw: st.DrawFn) -> Pool:
    count = draw(st.integers(1, 40))
    refs = tuple(draw(st.lists(u32s, min_size=count, max_size=count)))
    size = count * PAGE
    return Pool(draw(conns), draw(domids), draw(nonzero), size, draw(st.integers(0, size - 1)),
                refs)


STRATEGIES: dict[Kind, st.SearchStrategy[Frame]] = {
    Kind.HELLO: hellos(),
    Kind.CHANNEL: st.builds(Channel, u32s),
    Kind.OPEN: st.builds(Open, conns),
    Kind.CLOSE: st.builds(Close, conns, texts),
    Kind.DATA: st.builds(Data, conns, payloads),
    Kind.ACK: st.builds(Ack, conns, nonzero),
    Kind.POOL: pools(),
    Kind.UNMAP: st.builds(Unmap, conns, nonzero),
    Kind.FILE: st.builds(File, conns, st.binary(max_size=300)),
    Kind.PIPE: st.builds(Pipe, conns, u32s, st.sampled_from(PipeEnd)),
    Kind.PIPE_DATA: st.builds(PipeData, u32s, payloads),
    Kind.PIPE_END: st.builds(PipeClosed, u32s),
    Kind.PIPE_ACK: st.builds(PipeAck, u32s, nonzero),
    Kind.ERROR: st.builds(Error, texts),
}
frames = st.one_of(*STRATEGIES.values())
streams = st.lists(frames, max_size=8).map(lambda fs: b"".join(encode(f) for f in fs))

# One valid frame of each kind, for the rules stated against a single field.
VALID: dict[Kind, Frame] = {
    Kind.HELLO: Hello(1, 1, 0),
    Kind.CHANNEL: Channel(77),
    Kind.OPEN: Open(1),
    Kind.CLOSE: Close(1, "bye"),
    Kind.DATA: Data(1, b"wayland"),
    Kind.ACK: Ack(1, 7),
    Kind.POOL: Pool(1, 3, 9, 2 * PAGE, 0, (10, 11)),
    Kind.UNMAP: Unmap(1, 9),
    Kind.FILE: File(1, b"keymap"),
    Kind.PIPE: Pipe(1, 2, PipeEnd.WRITE),
    Kind.PIPE_DATA: PipeData(2, b"text"),
    Kind.PIPE_END: PipeClosed(2),
    Kind.PIPE_ACK: PipeAck(2, 4),
    Kind.ERROR: Error("broken"),
}


def test_constants() -> None:
    assert (VERSION, MAGIC, MAX_DATA, MAX_FILE, MAX_REFS, MAX_REASON, PAGE) == (
        1, b"QSHM", 65536, 4 << 20, 1 << 20, 1024, 4096)
    assert HEADER.format == "<IHHI" and HEADER.size == 12
    assert MAX_BODY == MAX_FILE + 64
    assert [(kind.name, kind.value) for kind in Kind] == [
        ("HELLO", 1), ("CHANNEL", 2), ("OPEN", 3), ("CLOSE", 4), ("DATA", 5), ("ACK", 6),
        ("POOL", 7), ("UNMAP", 8), ("FILE", 9), ("PIPE", 10), ("PIPE_DATA", 11),
        ("PIPE_END", 12), ("PIPE_ACK", 13), ("ERROR", 14)]
    assert set(STRATEGIES) == set(VALID) == set(Kind)
    assert all(frame.KIND is kind for kind, frame in VALID.items())


def test_layout_of_each_kind() -> None:
    """The bytes of the plan, spelled out by hand."""
    assert encode(Hello(1, 2, 5)) == header(12, 1) + b"QSHM" + struct.pack("<HHI", 1, 2, 5)
    assert encode(Channel(77)) == header(4, 2) + struct.pack("<I", 77)
    assert encode(Open(3)) == header(0, 3, 3)
    assert encode(Close(3, "é")) == header(2, 4, 3) + "é".encode()
    assert encode(Data(3, b"ab")) == header(2, 5, 3) + b"ab"
    assert encode(Ack(3, 9)) == header(4, 6, 3) + struct.pack("<I", 9)
    assert encode(Pool(3, 4, 5, 2 * PAGE, 100, (7, 8))) == header(24, 7, 3) + pool_body(
        4, 5, 2 * PAGE, 100, (7, 8))
    assert encode(Unmap(3, 5)) == header(4, 8, 3) + struct.pack("<I", 5)
    assert encode(File(3, b"")) == header(0, 9, 3)
    assert encode(Pipe(3, 6, PipeEnd.READ)) == header(5, 10, 3) + struct.pack("<IB", 6, 0)
    assert encode(PipeData(6, b"x")) == header(5, 11) + struct.pack("<I", 6) + b"x"
    assert encode(PipeClosed(6)) == header(4, 12) + struct.pack("<I", 6)
    assert encode(PipeAck(6, 1)) == header(8, 13) + struct.pack("<II", 6, 1)
    assert encode(Error("no")) == header(2, 14) + b"no"


# -- round trips ---------------------------------------------------------------------------


@pytest.mark.parametrize("kind", list(Kind), ids=lambda kind: kind.name)
@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_round_trip_of_each_kind(kind: Kind, data: st.DataObject) -> None:
    frame = data.draw(STRATEGIES[kind])
    encoded = encode(frame)
    assert HEADER.unpack_from(encoded)[:3] == (len(encoded) - 12, kind, 0)
    (decoded,) = decode(encoded)
    assert decoded == frame
    assert type(decoded) is type(frame)
    if isinstance(decoded, Data | File | PipeData):
        assert type(decoded.data) is bytes
    if isinstance(decoded, Pipe):
        assert type(decoded.end) is PipeEnd


@settings(max_examples=300, deadline=None)
@given(sent=st.lists(frames, max_size=10), data=st.data())
def test_round_trip_in_arbitrary_pieces(sent: list[Frame], data: st.DataObject) -> None:
    stream = b"".join(encode(frame) for frame in sent)
    cuts = data.draw(st.lists(st.integers(0, len(stream)), max_size=12))
    decoder = Decoder()
    assert feed_in_pieces(decoder, stream, cuts) == sent
    assert decoder.pending == 0
    decoder.eof()


@settings(max_examples=60, deadline=None)
@given(sent=st.lists(frames, min_size=1, max_size=5))
def test_round_trip_one_byte_at_a_time(sent: list[Frame]) -> None:
    stream = b"".join(encode(frame) for frame in sent)
    decoder = Decoder()
    got: list[Frame] = []
    boundaries = set()
    end = 0
    for frame in sent:
        end += len(encode(frame))
        boundaries.add(end)
    for index in range(len(stream)):
        out = decoder.feed(stream[index:index + 1])
        # a frame comes out with its last byte, never before
        assert len(out) == (1 if index + 1 in boundaries else 0)
        got += out
        assert decoder.pending == (0 if index + 1 in boundaries else decoder.pending)
    assert got == sent
    decoder.eof()


def test_round_trip_at_the_limits() -> None:
    biggest_pool = (1 << 32) // PAGE - 1  # MAX_REFS - 1: the most whose size fits a u32
    at_limits: list[Frame] = [
        Data(U32, bytes(range(256)) * (MAX_DATA // 256)),
        Data(1, b"\x00"),
        File(U32, b"\xaa" * MAX_FILE),
        File(1, b""),
        PipeData(U32, b"\x01" * MAX_DATA),
        Close(1, "é" * (MAX_REASON // 2)),
        Close(1, ""),
        Error("x" * MAX_REASON),
        Error("\U0001f600" * (MAX_REASON // 4)),
        Hello(0, U16, DOMID_FIRST_RESERVED - 1),
        Hello(VERSION, VERSION, 0),
        Pool(U32, DOMID_FIRST_RESERVED - 1, U32, biggest_pool * PAGE, biggest_pool * PAGE - 1,
             tuple(range(biggest_pool))),
        Pool(1, 0, 1, PAGE, PAGE - 1, (U32,)),
        Ack(1, U32),
        PipeAck(0, U32),
        Pipe(U32, U32, PipeEnd.READ),
        Channel(0),
        Channel(U32),
    ]
    stream = b"".join(encode(frame) for frame in at_limits)
    assert decode(stream) == at_limits
    decoder = Decoder()
    assert feed_in_pieces(decoder, stream, range(0, len(stream), 65536 - 5)) == at_limits


def test_feed_takes_any_bytes_like() -> None:
    ack = encode(Ack(5, 6))  # 16 bytes: four u32s
    words = array.array("I")
    words.frombytes(ack)
    assert Decoder().feed(memoryview(words)) == [Ack(5, 6)]
    assert Decoder().feed(bytearray(ack)) == [Ack(5, 6)]
    decoder = Decoder()
    assert decoder.feed(memoryview(words)[:1]) == []
    assert decoder.feed(memoryview(words)[1:]) == [Ack(5, 6)]


def test_fed_buffers_are_not_kept() -> None:
    """The decoder copies what it keeps: the caller may reuse its buffer at once."""
    sent = [Data(1, b"abcdef"), Data(2, b"ghijkl")]
    stream = b"".join(encode(frame) for frame in sent)  # two frames of 18 bytes
    # nothing buffered: a whole frame and the start of the next straight from the buffer
    decoder = Decoder()
    given = bytearray(stream[:20])
    assert decoder.feed(memoryview(given)) == sent[:1] and decoder.pending == 2
    given[:] = b"\xff" * 20
    # something buffered: the fed bytes go behind it
    given = bytearray(stream[20:30])
    assert decoder.feed(memoryview(given)) == [] and decoder.pending == 12
    given[:] = b"\xff" * 10
    assert decoder.feed(stream[30:]) == sent[1:]
    assert sent == [Data(1, b"abcdef"), Data(2, b"ghijkl")]


def test_pending_counts_the_partial_frame() -> None:
    stream = encode(Data(1, b"x" * 100)) + encode(Open(2))
    decoder = Decoder()
    assert decoder.feed(stream[:5]) == [] and decoder.pending == 5
    assert decoder.feed(stream[5:112]) == [Data(1, b"x" * 100)] and decoder.pending == 0
    assert decoder.feed(stream[112:120]) == [] and decoder.pending == 8
    assert decoder.feed(stream[120:]) == [Open(2)] and decoder.pending == 0


def test_encode_data_and_ack_are_encode() -> None:
    payload = bytes(range(200))
    assert encode_data(9, payload) == encode(Data(9, payload))
    assert encode_data(9, memoryview(payload)) == encode(Data(9, payload))
    assert encode_data(9, bytearray(payload)) == encode(Data(9, payload))
    words = array.array("H", [1, 2, 3])
    assert encode_data(9, memoryview(words)) == encode(Data(9, words.tobytes()))
    assert encode(Data(9, cast(bytes, memoryview(words)))) == encode(Data(9, words.tobytes()))
    assert encode_ack(9, 4) == encode(Ack(9, 4))
    assert type(encode_data(9, memoryview(payload))) is bytes


# -- refusals ------------------------------------------------------------------------------


def fixed_length(kind: Kind) -> int:
    return len(encode(VALID[kind])) - 12


# (id, peer bytes that must be refused exactly at their last byte, the message, and the
#  frame that asks the encoder for the same thing, where a frame can)
Refusal = tuple[str, bytes, str, Frame | None]
REFUSALS: list[Refusal] = [
    ("unknown kind 0", header(0, 0), "frame of unknown kind 0 (flags 0x0000, conn 0,"
     " body of 0 bytes)", None),
    ("unknown kind 15", header(3, 15, conn=2, flags=1), "frame of unknown kind 15"
     " (flags 0x0001, conn 2, body of 3 bytes)", None),
    ("unknown kind 0xffff", header(U32, U16), "frame of unknown kind 65535 (flags 0x0000,"
     " conn 0, body of 4294967295 bytes)", None),
    ("flags on DATA", header(1, Kind.DATA, conn=1, flags=1),
     "DATA frame: flags 0x0001, must be 0", None),
    ("flags on HELLO", header(12, Kind.HELLO, flags=0x8000),
     "HELLO frame: flags 0x8000, must be 0", None),
    *[(f"conn on {kind.name}", header(fixed_length(kind), kind, conn=1),
       f"{kind.name} frame: conn 1, must be 0 (a stream-level frame)", None)
      for kind in STREAM_LEVEL],
    *[(f"no conn on {kind.name}", header(fixed_length(kind), kind, conn=0),
       f"{kind.name} frame: conn 0, must be a connection id (1..4294967295)",
       replace(cast(Any, VALID[kind]), conn=0))
      for kind in PER_CONNECTION],
    # lengths: refused from the header alone
    *[(f"{kind.name} body of {length}", header(length, kind, conn=0 if kind in STREAM_LEVEL
                                               else 1),
       f"{kind.name} frame: body of {length} bytes, must be {fixed_length(kind)} ({shape})",
       None)
      for kind, shape in [
          (Kind.HELLO, "magic, u16 version_min, u16 version_max, u32 domid"),
          (Kind.CHANNEL, "u32 port"), (Kind.OPEN, "empty"), (Kind.ACK, "u32 count"),
          (Kind.UNMAP, "u32 pool_id"), (Kind.PIPE, "u32 pipe_id, u8 end"),
          (Kind.PIPE_END, "u32 pipe_id"), (Kind.PIPE_ACK, "u32 pipe_id, u32 count")]
      for length in (fixed_length(kind) - 1, fixed_length(kind) + 1)
      if length >= 0],
    ("DATA body of 0", header(0, Kind.DATA, conn=1),
     "DATA frame: body of 0 bytes, must be 1..65536 (Wayland bytes)", Data(1, b"")),
    ("DATA body of MAX_DATA + 1", header(MAX_DATA + 1, Kind.DATA, conn=1),
     "DATA frame: body of 65537 bytes, must be 1..65536 (Wayland bytes)",
     Data(1, bytes(MAX_DATA + 1))),
    ("PIPE_DATA without data", header(4, Kind.PIPE_DATA),
     "PIPE_DATA frame: body of 4 bytes, must be 5..65540 (u32 pipe_id, then 1..65536 bytes)",
     PipeData(1, b"")),
    ("PIPE_DATA of MAX_DATA + 1", header(4 + MAX_DATA + 1, Kind.PIPE_DATA),
     "PIPE_DATA frame: body of 65541 bytes, must be 5..65540 (u32 pipe_id, then 1..65536"
     " bytes)", PipeData(1, bytes(MAX_DATA + 1))),
    ("FILE of MAX_FILE + 1", header(MAX_FILE + 1, Kind.FILE, conn=1),
     "FILE frame: body of 4194305 bytes, must be 0..4194304 (file bytes)",
     File(1, bytes(MAX_FILE + 1))),
    ("FILE of 2**32 - 1", header(U32, Kind.FILE, conn=1),
     "FILE frame: body of 4294967295 bytes, must be 0..4194304 (file bytes)", None),
    ("DATA of 2**32 - 1", header(U32, Kind.DATA, conn=1),
     "DATA frame: body of 4294967295 bytes, must be 1..65536 (Wayland bytes)", None),
    ("reason of MAX_REASON + 1", header(MAX_REASON + 1, Kind.CLOSE, conn=1),
     "CLOSE frame: body of 1025 bytes, must be 0..1024 (UTF-8 reason)",
     Close(1, "x" * (MAX_REASON + 1))),
    ("reason of 513 two-byte characters", header(1026, Kind.CLOSE, conn=1),
     "CLOSE frame: body of 1026 bytes, must be 0..1024 (UTF-8 reason)", Close(1, "é" * 513)),
    ("text of MAX_REASON + 1", header(MAX_REASON + 1, Kind.ERROR),
     "ERROR frame: body of 1025 bytes, must be 0..1024 (UTF-8 text)",
     Error("x" * (MAX_REASON + 1))),
    *[(f"POOL body of {length}", header(length, Kind.POOL, conn=1),
       f"POOL frame: body of {length} bytes, must be 20..4194320 (4 u32 fields, then a u32"
       " per ref, 1..1048576 refs)", frame)
      for length, frame in [(16, Pool(1, 0, 1, 0, 0, ())), (0, None), (19, None), (21, None),
                            (22, None), (16 + 4 * MAX_REFS + 4, None), (U32, None)]],
    # fields
    ("HELLO magic", raw(Kind.HELLO, b"QSHN" + struct.pack("<HHI", 1, 1, 0)),
     "HELLO frame: magic b'QSHN', must be b'QSHM'", None),
    ("HELLO binary magic", raw(Kind.HELLO, b"\n\x00'\xff" + struct.pack("<HHI", 1, 1, 0)),
     "HELLO frame: magic b\"\\n\\x00'\\xff\", must be b'QSHM'", None),
    ("HELLO versions", raw(Kind.HELLO, b"QSHM" + struct.pack("<HHI", 2, 1, 0)),
     "HELLO frame: version_min 2 > version_max 1", Hello(2, 1, 0)),
    ("HELLO reserved domid", raw(Kind.HELLO, b"QSHM" + struct.pack("<HHI", 1, 1, 0x7FF0)),
     "HELLO frame: domid 0x7ff0 is reserved, must be below 0x7ff0", Hello(1, 1, 0x7FF0)),
    ("HELLO domid ~0", raw(Kind.HELLO, b"QSHM" + struct.pack("<HHI", 1, 1, U32)),
     "HELLO frame: domid 0xffffffff is reserved, must be below 0x7ff0", Hello(1, 1, U32)),
    ("CLOSE invalid start byte", raw(Kind.CLOSE, b"ok\xff", conn=1),
     "CLOSE frame: reason is not valid UTF-8 (invalid start byte at byte 2: b'\\xff')", None),
    ("CLOSE overlong NUL", raw(Kind.CLOSE, b"\xc0\x80", conn=1),
     "CLOSE frame: reason is not valid UTF-8 (invalid start byte at byte 0:"
     " b'\\xc0\\x80')", None),
    ("CLOSE encoded surrogate", raw(Kind.CLOSE, b"a\xed\xa0\x80b", conn=1),
     "CLOSE frame: reason is not valid UTF-8 (invalid continuation byte at byte 1:"
     " b'\\xed\\xa0\\x80b')", None),
    ("ERROR cut character", raw(Kind.ERROR, b"abc\xe2\x82"),
     "ERROR frame: text is not valid UTF-8 (unexpected end of data at byte 3:"
     " b'\\xe2\\x82')", None),
    ("ERROR long invalid tail", raw(Kind.ERROR, b"\xff" * 1000),
     "ERROR frame: text is not valid UTF-8 (invalid start byte at byte 0: b'"
     + "\\xff" * 16 + "'...)", None),
    ("ACK count 0", raw(Kind.ACK, struct.pack("<I", 0), conn=1),
     "ACK frame: count 0, must be at least 1", Ack(1, 0)),
    ("PIPE_ACK count 0", raw(Kind.PIPE_ACK, struct.pack("<II", 5, 0)),
     "PIPE_ACK frame: count 0, must be at least 1", PipeAck(5, 0)),
    ("POOL pool_id 0", raw(Kind.POOL, pool_body(0, 0, PAGE, 0, [1]), conn=1),
     "POOL frame: pool_id 0, must be nonzero", Pool(1, 0, 0, PAGE, 0, (1,))),
    ("POOL size short", raw(Kind.POOL, pool_body(0, 1, PAGE, 0, [1, 2]), conn=1),
     "POOL frame: size 4096, must be 4096 per ref (2 refs: 8192)",
     Pool(1, 0, 1, PAGE, 0, (1, 2))),
    ("POOL size long", raw(Kind.POOL, pool_body(0, 1, 3 * PAGE, 0, [1, 2]), conn=1),
     "POOL frame: size 12288, must be 4096 per ref (2 refs: 8192)",
     Pool(1, 0, 1, 3 * PAGE, 0, (1, 2))),
    ("POOL size of a page and a bit", raw(Kind.POOL, pool_body(0, 1, PAGE + 1, 0, [1]), conn=1),
     "POOL frame: size 4097, must be 4096 per ref (1 refs: 4096)",
     Pool(1, 0, 1, PAGE + 1, 0, (1,))),
    ("POOL notify at size", raw(Kind.POOL, pool_body(0, 1, PAGE, PAGE, [1]), conn=1),
     "POOL frame: notify_offset 4096, must be below size 4096", Pool(1, 0, 1, PAGE, PAGE, (1,))),
    ("POOL notify ~0", raw(Kind.POOL, pool_body(0, 1, PAGE, U32, [1]), conn=1),
     "POOL frame: notify_offset 4294967295, must be below size 4096",
     Pool(1, 0, 1, PAGE, U32, (1,))),
    ("POOL reserved domid", raw(Kind.POOL, pool_body(0x7FF2, 1, PAGE, 0, [1]), conn=1),
     "POOL frame: domid 0x7ff2 is reserved, must be below 0x7ff0",
     Pool(1, 0x7FF2, 1, PAGE, 0, (1,))),
    ("POOL of MAX_REFS refs", raw(Kind.POOL, pool_body(0, 1, U32 - PAGE + 1, 0,
                                                      [0] * MAX_REFS), conn=1),
     "POOL frame: size 4294963200, must be 4096 per ref (1048576 refs: 4294967296)", None),
    ("UNMAP pool_id 0", raw(Kind.UNMAP, struct.pack("<I", 0), conn=1),
     "UNMAP frame: pool_id 0, must be nonzero", Unmap(1, 0)),
    *[(f"PIPE end {end}", raw(Kind.PIPE, struct.pack("<IB", 4, end), conn=1),
       f"PIPE frame: end {end}, must be 0 (READ) or 1 (WRITE)",
       Pipe(1, 4, cast(PipeEnd, end)))
      for end in (2, 255)],
]


@pytest.mark.parametrize(("peer", "message"), [(r[1], r[2]) for r in REFUSALS],
                         ids=[r[0] for r in REFUSALS])
def test_decoder_refuses_at_the_offending_byte(peer: bytes, message: str) -> None:
    decoder = Decoder()
    assert decoder.feed(peer[:-1]) == []
    with pytest.raises(StreamError) as refused:
        decoder.feed(peer[-1:])
    assert str(refused.value) == message
    with pytest.raises(StreamError):
        decoder.feed(b"")
    if len(peer) <= 64:
        decoder = Decoder()
        for index in range(len(peer) - 1):
            assert decoder.feed(peer[index:index + 1]) == []
        with pytest.raises(StreamError) as refused:
            decoder.feed(peer[-1:])
        assert str(refused.value) == message
    # after valid frames, and with valid bytes behind it in the same feed
    decoder = Decoder()
    with pytest.raises(StreamError) as refused:
        decoder.feed(encode(Open(1)) + encode_data(1, b"x") + peer + encode(Open(2)))
    assert str(refused.value) == message


ENCODER_REFUSALS = [r for r in REFUSALS if r[3] is not None]


@pytest.mark.parametrize(("frame", "message"), [(r[3], r[2]) for r in ENCODER_REFUSALS],
                         ids=[r[0] for r in ENCODER_REFUSALS])
def test_encoder_refuses_what_the_decoder_refuses(frame: Frame, message: str) -> None:
    with pytest.raises(ValueError) as refused:
        encode(frame)
    assert str(refused.value) == message


@pytest.mark.parametrize(("frame", "message"), [
    (Data(1 << 32, b"x"), "DATA frame: conn 4294967296, must be an int in 0..4294967295"),
    (Data(-1, b"x"), "DATA frame: conn -1, must be an int in 0..4294967295"),
    (Open(cast(int, None)), "OPEN frame: conn None, must be an int in 0..4294967295"),
    (Hello(0, 1 << 16, 0), "HELLO frame: version_max 65536, must be an int in 0..65535"),
    (Channel(-5), "CHANNEL frame: port -5, must be an int in 0..4294967295"),
    (Ack(1, 1 << 32), "ACK frame: count 4294967296, must be an int in 0..4294967295"),
    (PipeAck(1 << 32, 1), "PIPE_ACK frame: pipe_id 4294967296, must be an int in"
     " 0..4294967295"),
    (Pool(1, 0, 1, PAGE, 0, (1 << 32,)), "POOL frame: refs must be ints in 0..4294967295"),
    (Pool(1, 0, 1, PAGE, 0, (-1,)), "POOL frame: refs must be ints in 0..4294967295"),
    (Pool(1, 0, 1, MAX_REFS * PAGE, 0, (0,) * MAX_REFS),
     "POOL frame: size 4294967296, must be an int in 0..4294967295"),
    (Pipe(1, 1, cast(PipeEnd, 256)), "PIPE frame: end 256, must be an int in 0..255"),
    (Data(1, cast(bytes, "text")), "DATA frame: data of type str, must be bytes"),
    (Close(1, cast(str, b"bytes")), "CLOSE frame: reason must be a str"),
    (Close(1, "\ud800"),
     "CLOSE frame: reason is not valid UTF-8 (surrogates not allowed at character 0)"),
    (Error("ok \udcff"),
     "ERROR frame: text is not valid UTF-8 (surrogates not allowed at character 3)"),
])
def test_encoder_refuses_what_cannot_be_sent(frame: Frame, message: str) -> None:
    with pytest.raises(ValueError) as refused:
        encode(frame)
    assert str(refused.value) == message


def test_encode_refuses_what_is_not_a_frame() -> None:
    with pytest.raises(TypeError, match="not a stream frame"):
        encode(cast(Frame, ("DATA", 1, b"x")))


@pytest.mark.parametrize(("call", "message"), [
    (lambda: encode_data(0, b"x"), "DATA frame: conn 0, must be a connection id"),
    (lambda: encode_data(1 << 32, b"x"), "DATA frame: conn 4294967296, must be an int"),
    (lambda: encode_data(1, b""), "DATA frame: body of 0 bytes"),
    (lambda: encode_data(1, memoryview(b"")), "DATA frame: body of 0 bytes"),
    (lambda: encode_data(1, bytes(MAX_DATA + 1)), "DATA frame: body of 65537 bytes"),
    (lambda: encode_data(1, memoryview(array.array("I", [0] * (MAX_DATA // 4 + 1)))),
     "DATA frame: body of 65540 bytes"),
    (lambda: encode_ack(0, 1), "ACK frame: conn 0, must be a connection id"),
    (lambda: encode_ack(1, 0), "ACK frame: count 0, must be at least 1"),
    (lambda: encode_ack(1, 1 << 32), "ACK frame: count 4294967296, must be an int"),
], ids=["data conn 0", "data conn 2**32", "data empty", "data empty view", "data too long",
        "data too long view", "ack conn 0", "ack count 0", "ack count 2**32"])
def test_fast_encoders_refuse_alike(call: Any, message: str) -> None:
    with pytest.raises(ValueError, match="^" + re.escape(message)):
        call()


def test_huge_header_refused_after_its_12_bytes() -> None:
    huge = header(U32, Kind.DATA, conn=1)
    decoder = Decoder()
    for index in range(11):
        assert decoder.feed(huge[index:index + 1]) == []
    assert decoder.pending == 11
    with pytest.raises(StreamError, match="body of 4294967295 bytes"):
        decoder.feed(huge[11:])
    assert decoder.pending == 0


def test_after_an_error_everything_is_refused() -> None:
    decoder = Decoder()
    with pytest.raises(StreamError):
        decoder.feed(encode(Open(1)) + header(0, 99))
    for attempt in (lambda: decoder.feed(b""), lambda: decoder.feed(encode(Open(2))),
                    decoder.eof):
        with pytest.raises(StreamError, match=r"^the stream already failed: frame of unknown"
                                              r" kind 99"):
            attempt()


def test_eof() -> None:
    decoder = Decoder()
    decoder.eof()  # nothing pending: a clean end
    assert decoder.feed(encode(Open(1))) == [Open(1)]
    decoder.eof()
    cases = [
        (encode(Open(1))[:5], "a frame: EOF inside its header (5 of 12 bytes)"),
        (encode(Data(3, b"0123456789"))[:7], "DATA frame: EOF inside its header (7 of 12 bytes)"),
        (header(3, 77)[:6], "a frame: EOF inside its header (6 of 12 bytes)"),
        (encode(Data(3, b"0123456789"))[:15], "DATA frame: EOF inside its body (3 of 10 bytes)"),
        (encode(PipeClosed(3))[:12], "PIPE_END frame: EOF inside its body (0 of 4 bytes)"),
    ]
    for partial, message in cases:
        decoder = Decoder()
        assert decoder.feed(partial) == []
        with pytest.raises(StreamError) as ended:
            decoder.eof()
        assert str(ended.value) == message
        with pytest.raises(StreamError, match="already failed"):
            decoder.feed(b"")


def test_negotiate() -> None:
    assert negotiate(1, 1, Hello(1, 1, 0)) == 1
    assert negotiate(1, 3, Hello(2, 5, 0)) == 3
    assert negotiate(2, 5, Hello(1, 3, 0)) == 3
    assert negotiate(0, U16, Hello(7, 7, 0)) == 7
    with pytest.raises(StreamError) as refused:
        negotiate(1, 2, Hello(3, 4, 0))
    assert str(refused.value) == "HELLO frame: no common version: ours 1..2, theirs 3..4"
    with pytest.raises(StreamError, match=re.escape("ours 5..6, theirs 1..4")):
        negotiate(5, 6, Hello(1, 4, 0))
    with pytest.raises(ValueError):
        negotiate(2, 1, Hello(1, 1, 0))


any_texts = st.text(st.one_of(st.characters(),
                              st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF)),
                    max_size=1300)


@settings(max_examples=200, deadline=None)
@given(text=any_texts)
def test_fit_text_makes_any_text_sendable(text: str) -> None:
    fitted = fit_text(text)
    assert decode(encode(Close(1, fitted)) + encode(Error(fitted))) == [
        Close(1, fitted), Error(fitted)]
    if any("\ud800" <= char <= "\udfff" for char in text):
        assert fitted != text
    elif len(text.encode()) <= MAX_REASON:
        assert fitted == text
    else:  # cut as late as a whole character allows
        assert text.startswith(fitted) and len(fitted.encode()) > MAX_REASON - 4


def test_fit_text() -> None:
    assert fit_text("") == ""
    assert fit_text("bye") == "bye"
    assert fit_text("x" * 2000) == "x" * MAX_REASON
    assert fit_text("x" + "é" * 600) == "x" + "é" * 511  # 1023 bytes: no half character
    assert fit_text("no \udcff here") == "no \\udcff here"


# -- fuzz ----------------------------------------------------------------------------------


def check_any_input(stream: bytes, cuts: Sequence[int]) -> None:
    """Only StreamError escapes; after one, all is refused; what is accepted re-encodes
    to the bytes it came from (the encoding is canonical and the encoder accepts all the
    decoder does)."""
    decoder = Decoder()
    got: list[Frame] = []
    try:
        got = feed_in_pieces(decoder, stream, cuts)
    except StreamError as error:
        text = str(error)
        assert "\n" not in text and 0 < len(text) < 400, text
        for attempt in (lambda: decoder.feed(b""), lambda: decoder.feed(encode(Open(1))),
                        decoder.eof):
            with pytest.raises(StreamError):
                attempt()
        return
    consumed = len(stream) - decoder.pending
    assert b"".join(encode(frame) for frame in got) == stream[:consumed]
    if decoder.pending:
        with pytest.raises(StreamError):
            decoder.eof()
    else:
        decoder.eof()


@settings(max_examples=300, deadline=None)
@given(stream=st.binary(max_size=200), data=st.data())
def test_random_bytes(stream: bytes, data: st.DataObject) -> None:
    check_any_input(stream, data.draw(st.lists(st.integers(0, len(stream)), max_size=6)))


@st.composite
def mutated_streams(draw: st.DrawFn) -> bytes:
    stream = bytearray(draw(streams))
    for _ in range(draw(st.integers(1, 4))):
        size = len(stream)
        here = draw(st.integers(0, size))
        operation = draw(st.sampled_from(
            ["flip", "truncate", "splice", "delete", "insert", "duplicate", "set"]))
        if operation == "flip" and size:
            bit = draw(st.integers(0, size * 8 - 1))
            stream[bit // 8] ^= 1 << bit % 8
        elif operation == "set" and size:
            # a header field's byte set to an edge value
            stream[min(here, size - 1)] = draw(st.sampled_from([0, 1, 0x7F, 0x80, 0xFF]))
        elif operation == "truncate":
            del stream[here:]
        elif operation == "splice":
            other = draw(streams)
            stream[here:] = other[draw(st.integers(0, len(other))):]
        elif operation == "delete":
            del stream[here:here + draw(st.integers(1, 16))]
        elif operation == "insert":
            stream[here:here] = draw(st.binary(min_size=1, max_size=16))
        elif operation == "duplicate":
            stream[here:here] = stream[here:here + draw(st.integers(1, 32))]
    return bytes(stream)


@settings(max_examples=500, deadline=None)
@given(stream=mutated_streams(), data=st.data())
def test_mutated_streams(stream: bytes, data: st.DataObject) -> None:
    check_any_input(stream, data.draw(st.lists(st.integers(0, len(stream)), max_size=6)))
