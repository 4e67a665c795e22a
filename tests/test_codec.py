"""The sans-IO wire codec: framing, fds, argument (de)coding and its validation.

Round trips cover every request and event signature of the bundled protocol table;
the malformed cases are checked both against the codec alone and through a
``RelaySession``, which must answer with a well-formed ``wl_display.error`` and
forward nothing from the bad message on.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Sequence
from itertools import pairwise

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from messages import PROTO, assert_client_error, ev, event, joined, parse_error, req, request

from qubesshm.relay.session import RelaySession
from qubesshm.wire.codec import (
    DEFAULT_MAX_MESSAGE_SIZE,
    ArgValue,
    ErrorCode,
    Fixed,
    UntypedNewId,
    WireError,
    WireReader,
    decode_args,
    encode_message,
)
from qubesshm.wire.protocol import ArgKind, MessageSpec

ALL_SPECS: list[MessageSpec] = list(PROTO.messages())
SPEC_IDS = [
    f"{s.interface}.{'req' if s in PROTO[s.interface].requests else 'ev'}.{s.name}"
    for s in ALL_SPECS
]
DISPLAY_ERROR = PROTO["wl_display"].events[0]

I32 = st.integers(-(2**31), 2**31 - 1)
U32 = st.integers(0, 2**32 - 1)
NONZERO_U32 = st.integers(1, 2**32 - 1)
# Text the wire can carry: no NUL, no lone surrogates; plenty of non-ASCII.
TEXT = st.text(
    alphabet=st.characters(exclude_categories=["Cs"], exclude_characters="\0"),
    max_size=24,
)


# -- helpers -------------------------------------------------------------------






def header(object_id: int, opcode: int, size: int) -> bytes:
    return struct.pack("=II", object_id, size << 16 | opcode)


def raw_message(object_id: int, opcode: int, body: bytes) -> bytes:
    """A message with a correct header around an arbitrary body."""
    return header(object_id, opcode, 8 + len(body)) + body


def u32(*values: int) -> bytes:
    return struct.pack(f"={len(values)}I", *values)


def wire_string(raw: bytes) -> bytes:
    """``raw`` as a string argument: length word (counting every byte) and padding."""
    return u32(len(raw)) + raw + bytes(-len(raw) % 4)


def arg_strategy(arg_kind: ArgKind, *, interface: str | None,
                 nullable: bool) -> st.SearchStrategy[ArgValue]:
    if arg_kind is ArgKind.INT:
        return I32
    if arg_kind is ArgKind.UINT:
        return U32
    if arg_kind is ArgKind.FIXED:
        return st.builds(Fixed, I32)
    if arg_kind is ArgKind.STRING:
        return st.none() | TEXT if nullable else TEXT
    if arg_kind is ArgKind.OBJECT:
        return st.none() | NONZERO_U32 if nullable else NONZERO_U32
    if arg_kind is ArgKind.NEW_ID:
        if interface is None:
            return st.builds(UntypedNewId, TEXT, U32, NONZERO_U32)
        return NONZERO_U32
    if arg_kind is ArgKind.ARRAY:
        return st.binary(max_size=40)
    assert arg_kind is ArgKind.FD
    return st.integers(0, 1023)


def args_for(spec: MessageSpec) -> st.SearchStrategy[list[ArgValue]]:
    return st.tuples(
        *(arg_strategy(a.kind, interface=a.interface, nullable=a.nullable) for a in spec.args)
    ).map(list)


# (object id, spec, args) for any message of the table.
ANY_MESSAGE = st.sampled_from(ALL_SPECS).flatmap(
    lambda spec: st.tuples(NONZERO_U32, st.just(spec), args_for(spec))
)


def fd_values(spec: MessageSpec, args: Sequence[ArgValue]) -> list[int]:
    out = []
    for arg, value in zip(spec.args, args, strict=True):
        if arg.kind is ArgKind.FD:
            assert isinstance(value, int)
            out.append(value)
    return out


def drain(reader: WireReader, specs: Callable[[int], MessageSpec]) -> list[tuple[bytes, list[int]]]:
    """Every message ``reader`` can hand out now; ``specs`` maps an index to its spec."""
    out: list[tuple[bytes, list[int]]] = []
    while True:
        head = reader.peek()
        if head is None:
            return out
        _, _, size = head
        taken = reader.take(size, specs(len(out)).fd_count)
        if taken is None:
            return out
        frame, fds = taken
        out.append((frame.data, fds))


# -- round trips ---------------------------------------------------------------


def test_table_is_the_full_protocol_set() -> None:
    # The round-trip parametrisation below must really cover a large table.
    assert len(ALL_SPECS) > 400
    kinds = {a.kind for s in ALL_SPECS for a in s.args}
    assert kinds == set(ArgKind)
    assert any(a.untyped_new_id for s in ALL_SPECS for a in s.args)


@pytest.mark.parametrize("spec", ALL_SPECS, ids=SPEC_IDS)
@settings(max_examples=4, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_round_trip_every_signature(spec: MessageSpec, data: st.DataObject) -> None:
    object_id = data.draw(NONZERO_U32, label="object_id")
    args = data.draw(args_for(spec), label="args")
    encoded, fds = encode_message(object_id, spec, args)

    assert len(encoded) % 4 == 0
    assert struct.unpack_from("=II", encoded) == (object_id, len(encoded) << 16 | spec.opcode)
    assert fds == fd_values(spec, args)

    reader = WireReader()
    reader.feed(encoded, fds)
    assert reader.peek() == (object_id, spec.opcode, len(encoded))
    taken = reader.take(len(encoded), spec.fd_count)
    assert taken is not None
    frame, got_fds = taken
    assert (frame.object_id, frame.opcode, frame.data) == (object_id, spec.opcode, encoded)
    assert got_fds == fds
    assert reader.buffered_bytes == 0 and reader.buffered_fds == 0
    assert reader.peek() is None

    decoded = decode_args(spec, frame.data, got_fds)
    assert decoded == args
    assert encode_message(object_id, spec, decoded) == (encoded, fds)


def test_round_trip_non_ascii_and_null_string() -> None:
    spec = ev("wl_data_source", "target")  # nullable string
    for value in ("text/plain;charset=utf-8", "ünïcødé ☃ 𝄞", "", None):
        data, fds = encode_message(7, spec, [value])
        assert decode_args(spec, data, fds) == [value]
    # A null string is a bare zero length word; "" is length 1 (just the NUL).
    assert encode_message(7, spec, [None])[0][8:] == u32(0)
    assert encode_message(7, spec, [""])[0][8:] == u32(1, 0)


def test_untyped_new_id_layout() -> None:
    spec = req("wl_registry", "bind")
    data, _ = encode_message(2, spec, [5, UntypedNewId("wl_shm", 1, 9)])
    assert data[8:] == u32(5) + wire_string(b"wl_shm\0") + u32(1, 9)
    assert decode_args(spec, data, []) == [5, UntypedNewId("wl_shm", 1, 9)]


# -- framing across arbitrary delivery -----------------------------------------


@settings(max_examples=60, deadline=None)
@given(messages=st.lists(ANY_MESSAGE, min_size=2, max_size=6))
def test_byte_at_a_time_delivery(
    messages: list[tuple[int, MessageSpec, list[ArgValue]]],
) -> None:
    encoded = [encode_message(oid, spec, args) for oid, spec, args in messages]
    specs = [spec for _, spec, _ in messages]
    reader = WireReader()
    out: list[tuple[bytes, list[int]]] = []
    ends = []
    pos = 0
    for data, _ in encoded:
        pos += len(data)
        ends.append(pos)
    stream = b"".join(data for data, _ in encoded)
    starts = [end - len(data) for end, (data, _) in zip(ends, encoded, strict=True)]
    fds_at = {start: fds for start, (_, fds) in zip(starts, encoded, strict=True)}
    for i in range(len(stream)):
        reader.feed(stream[i : i + 1], fds_at.get(i, ()))
        new = drain(reader, lambda n: specs[len(out) + n])
        # A message comes out exactly when its last byte arrives, never earlier.
        expected_now = [j for j, end in enumerate(ends) if end == i + 1]
        assert len(new) == len(expected_now)
        out.extend(new)
    assert out == encoded
    assert reader.buffered_bytes == 0 and reader.buffered_fds == 0
    for (data, fds), spec in zip(out, specs, strict=True):
        decoded = decode_args(spec, data, fds)
        assert encode_message(struct.unpack_from("=I", data)[0], spec, decoded)[0] == data


@settings(max_examples=60, deadline=None)
@given(
    messages=st.lists(ANY_MESSAGE, min_size=1, max_size=8),
    cuts=st.lists(st.integers(0, 4096), max_size=8),
)
def test_random_chunking(
    messages: list[tuple[int, MessageSpec, list[ArgValue]]], cuts: list[int]
) -> None:
    encoded = [encode_message(oid, spec, args) for oid, spec, args in messages]
    specs = [spec for _, spec, _ in messages]
    stream = b"".join(data for data, _ in encoded)
    all_fds = [fd for _, fds in encoded for fd in fds]
    points = sorted({min(c, len(stream)) for c in cuts} | {0, len(stream)})
    reader = WireReader()
    reader.feed(b"", all_fds)  # every fd early
    out: list[tuple[bytes, list[int]]] = []
    for a, b in pairwise(points):
        reader.feed(stream[a:b])
        out.extend(drain(reader, lambda n: specs[len(out) + n]))
    assert out == encoded


# -- fds arriving before or after their bytes ----------------------------------


def test_fds_early_all_before_any_byte() -> None:
    msgs = [
        request(3, "wl_shm", "create_pool", 10, 101, 4096),
        request(1, "wl_display", "sync", 11),
        request(3, "wl_shm", "create_pool", 12, 102, 8192),
        request(12, "wl_shm_pool", "create_buffer", 13, 0, 4, 4, 16, 0),
    ]
    specs = [req("wl_shm", "create_pool"), req("wl_display", "sync"),
             req("wl_shm", "create_pool"), req("wl_shm_pool", "create_buffer")]
    reader = WireReader()
    reader.feed(b"", [101, 102])
    assert reader.peek() is None and reader.buffered_fds == 2
    reader.feed(b"".join(data for data, _ in msgs))
    assert drain(reader, lambda n: specs[n]) == msgs
    assert reader.buffered_fds == 0


def test_fd_late_blocks_only_until_it_arrives() -> None:
    pool, pool_fds = request(3, "wl_shm", "create_pool", 10, 77, 4096)
    sync, _ = request(1, "wl_display", "sync", 11)
    spec = req("wl_shm", "create_pool")
    reader = WireReader()
    reader.feed(pool + sync)
    assert reader.peek() == (3, spec.opcode, len(pool))
    assert reader.take(len(pool), spec.fd_count) is None
    # Nothing was consumed while the fd is owed, and asking again changes nothing.
    assert reader.buffered_bytes == len(pool + sync)
    assert reader.take(len(pool), spec.fd_count) is None
    reader.feed(b"", pool_fds)
    taken = reader.take(len(pool), spec.fd_count)
    assert taken is not None
    assert (taken[0].data, taken[1]) == (pool, [77])
    head = reader.peek()
    assert head == (1, 0, len(sync))
    sync_taken = reader.take(len(sync), 0)
    assert sync_taken is not None and sync_taken[0].data == sync


@settings(max_examples=80, deadline=None)
@given(
    messages=st.lists(ANY_MESSAGE, min_size=1, max_size=6),
    fd_delay=st.integers(0, 3),
)
def test_fds_any_lateness(
    messages: list[tuple[int, MessageSpec, list[ArgValue]]], fd_delay: int
) -> None:
    """Message i's bytes arrive in round i, its fds in round i + ``fd_delay``."""
    encoded = [encode_message(oid, spec, args) for oid, spec, args in messages]
    specs = [spec for _, spec, _ in messages]
    # A message comes out once its bytes, its fds and everything before it are in.
    ready = [i + fd_delay if fds else i for i, (_, fds) in enumerate(encoded)]
    due = [max(ready[: i + 1]) for i in range(len(ready))]
    reader = WireReader()
    out: list[tuple[bytes, list[int]]] = []
    for rnd in range(len(encoded) + fd_delay):
        fds = encoded[rnd - fd_delay][1] if 0 <= rnd - fd_delay < len(encoded) else []
        data = encoded[rnd][0] if rnd < len(encoded) else b""
        reader.feed(data, fds)
        out.extend(drain(reader, lambda n: specs[len(out) + n]))
        assert len(out) == sum(d <= rnd for d in due)
        assert out == encoded[: len(out)]
    assert out == encoded
    assert reader.buffered_bytes == 0 and reader.buffered_fds == 0


# -- malformed input: codec level ---------------------------------------------


@pytest.mark.parametrize(
    ("size", "why"),
    [(0, "below"), (4, "below"), (7, "below"), (10, "multiple of 4"), (13, "multiple of 4"),
     (DEFAULT_MAX_MESSAGE_SIZE + 4, "exceeds"), (0xFFFC, "exceeds")],
)
def test_bad_size_in_header(size: int, why: str) -> None:
    reader = WireReader()
    reader.feed(header(5, 0, size) + bytes(8))
    with pytest.raises(WireError, match=why) as info:
        reader.peek()
    assert info.value.code is ErrorCode.INVALID_METHOD


def test_max_message_size_is_inclusive_and_configurable() -> None:
    reader = WireReader()
    reader.feed(header(5, 0, DEFAULT_MAX_MESSAGE_SIZE))
    assert reader.peek() is None  # valid size, body not here yet
    reader.feed(bytes(DEFAULT_MAX_MESSAGE_SIZE - 8))
    assert reader.peek() == (5, 0, DEFAULT_MAX_MESSAGE_SIZE)
    small = WireReader(max_message_size=64)
    small.feed(header(5, 0, 68))
    with pytest.raises(WireError) as info:
        small.peek()
    assert info.value.code is ErrorCode.INVALID_METHOD


def test_header_alone_is_not_a_message_until_complete() -> None:
    data, _ = request(1, "wl_display", "sync", 3)
    reader = WireReader()
    for i in range(len(data) - 1):
        reader.feed(data[i : i + 1])
        assert reader.peek() is None
    reader.feed(data[-1:])
    assert reader.peek() == (1, 0, 12)


OFFER = req("wl_data_source", "offer")  # one non-nullable string
TARGET = ev("wl_data_source", "target")  # one nullable string
BIND = req("wl_registry", "bind")  # uint + untyped new_id
ATTACH = req("wl_surface", "attach")  # nullable object + 2 ints
SET_OPAQUE = req("wl_surface", "set_opaque_region")  # nullable object
GET_DATA_DEVICE = req("wl_data_device_manager", "get_data_device")  # new_id + object
SYNC = req("wl_display", "sync")
KEYMAP_ARRAY = ev("wl_keyboard", "enter")  # uint + object + array

MALFORMED_BODIES: list[tuple[str, MessageSpec, bytes, str]] = [
    ("string not NUL-terminated", OFFER, wire_string(b"text"), "NUL-terminated"),
    ("string not NUL-terminated, padded", OFFER, u32(3) + b"abc\0", "NUL-terminated"),
    ("interior NUL", OFFER, wire_string(b"te\0xt\0"), "interior NUL"),
    ("null string, non-nullable", OFFER, u32(0), "null string"),
    ("null interface in bind", BIND, u32(1, 0, 1, 5), "null string"),
    ("string longer than body", OFFER, u32(100) + b"abc\0", "too short"),
    ("string length past 4 GiB", OFFER, u32(0xFFFFFFFF) + b"abc\0", "too short"),
    ("string padding missing", OFFER, u32(5) + b"abcd\0", "too short"),
    ("empty body for a string", OFFER, b"", "too short"),
    ("bind truncated after interface", BIND, u32(1) + wire_string(b"wl_shm\0") + u32(1),
     "too short"),
    ("truncated int", ATTACH, u32(0, 1), "too short"),
    ("truncated new_id", SYNC, b"", "too short"),
    ("array longer than body", KEYMAP_ARRAY, u32(1, 2, 64) + bytes(8), "too short"),
    ("array padding missing", KEYMAP_ARRAY, u32(1, 2, 3) + b"abc", "too short"),
    ("trailing bytes", SYNC, u32(3, 0), "trailing"),
    ("trailing bytes after string", OFFER, wire_string(b"a\0") + u32(0), "trailing"),
    ("null new_id", SYNC, u32(0), "null new_id"),
    ("null untyped new_id", BIND, u32(1) + wire_string(b"wl_shm\0") + u32(1, 0), "null new_id"),
    ("null object, non-nullable", GET_DATA_DEVICE, u32(5, 0), "null object"),
]


@pytest.mark.parametrize(
    ("spec", "body", "why"),
    [(spec, body, why) for _, spec, body, why in MALFORMED_BODIES],
    ids=[name for name, *_ in MALFORMED_BODIES],
)
def test_malformed_body(spec: MessageSpec, body: bytes, why: str) -> None:
    data = raw_message(9, spec.opcode, body)
    if len(data) % 4 == 0:  # (the padding cases are for decode_args alone)
        reader = WireReader()
        reader.feed(data)
        assert reader.peek() == (9, spec.opcode, len(data))
    with pytest.raises(WireError, match=why) as info:
        decode_args(spec, data, [])
    assert info.value.code is ErrorCode.INVALID_METHOD


def test_nullable_values_are_accepted() -> None:
    assert decode_args(TARGET, raw_message(9, 0, u32(0)), []) == [None]
    assert decode_args(SET_OPAQUE, raw_message(9, 4, u32(0)), []) == [None]
    assert decode_args(ATTACH, raw_message(9, 1, u32(0, 1, 2)), []) == [None, 1, 2]


@settings(max_examples=400, deadline=None)
@given(spec=st.sampled_from(ALL_SPECS), body=st.binary(max_size=64).map(
    lambda b: b[: len(b) - len(b) % 4]))
def test_decode_garbage_only_raises_wire_error(spec: MessageSpec, body: bytes) -> None:
    data = raw_message(9, spec.opcode, body)
    fds = list(range(spec.fd_count))
    try:
        args = decode_args(spec, data, fds)
    except WireError as err:
        assert err.code is ErrorCode.INVALID_METHOD
    else:
        # Whatever decodes re-encodes to a message that decodes the same (padding bytes
        # are not checked, as in libwayland, so the bytes themselves may differ there).
        again, again_fds = encode_message(9, spec, args)
        assert len(again) == len(data) and again_fds == fds
        assert decode_args(spec, again, again_fds) == args


@settings(max_examples=200, deadline=None)
@given(stream=st.binary(max_size=256), chunk=st.integers(1, 64))
def test_reader_garbage_only_raises_wire_error(stream: bytes, chunk: int) -> None:
    reader = WireReader()
    try:
        for i in range(0, len(stream), chunk):
            reader.feed(stream[i : i + chunk])
            while (head := reader.peek()) is not None:
                taken = reader.take(head[2], 0)
                assert taken is not None and len(taken[0].data) == head[2]
    except WireError as err:
        assert err.code is ErrorCode.INVALID_METHOD


# -- malformed input: through the session --------------------------------------

REGISTRY = 2
COMPOSITOR, SHM, DDM = 3, 4, 5  # bound ids
GLOBALS = [(1, "wl_compositor", 1), (2, "wl_shm", 1), (3, "wl_data_device_manager", 3)]



def ready_session() -> RelaySession:
    """A session with a registry, wl_compositor v1 at 3, wl_shm at 4, data device mgr at 5."""
    session = RelaySession(PROTO)
    steps = [session.from_client(*request(1, "wl_display", "get_registry", REGISTRY))]
    for name, iface, version in GLOBALS:
        steps.append(session.from_compositor(*event(REGISTRY, "wl_registry", "global",
                                                     name, iface, version)))
    for bound, (name, iface, version) in zip((COMPOSITOR, SHM, DDM), GLOBALS, strict=True):
        steps.append(session.from_client(*request(
            REGISTRY, "wl_registry", "bind", name, UntypedNewId(iface, version, bound))))
    assert all(s.error is None for s in steps)
    return session




PRE, _ = request(1, "wl_display", "sync", 40)  # valid, sent before the bad message
POST, _ = request(1, "wl_display", "sync", 41)  # valid, sent after it


def bad_string_message(raw: bytes) -> bytes:
    return raw_message(6, OFFER.opcode, raw)


def _prepare_data_source(session: RelaySession) -> None:
    step = session.from_client(*request(DDM, "wl_data_device_manager",
                                        "create_data_source", 6))
    assert step.error is None


def _prepare_destroyed_surface(session: RelaySession) -> None:
    step = session.from_client(request(COMPOSITOR, "wl_compositor", "create_surface", 6)[0]
                               + request(6, "wl_surface", "destroy")[0])
    assert step.error is None


def _prepare_surface(session: RelaySession) -> None:
    step = session.from_client(request(COMPOSITOR, "wl_compositor", "create_surface", 6)[0])
    assert step.error is None


def _nothing(session: RelaySession) -> None:
    pass


# name, preparation, bad bytes, expected code, expected object id in the error
SESSION_CASES: list[tuple[str, Callable[[RelaySession], None], bytes, ErrorCode, int | None]] = [
    ("size < 8", _nothing, header(1, 0, 4) + u32(0), ErrorCode.INVALID_METHOD, 1),
    ("size not multiple of 4", _nothing, header(1, 0, 10) + bytes(4), ErrorCode.INVALID_METHOD,
     1),
    ("size > max", _nothing, header(1, 0, DEFAULT_MAX_MESSAGE_SIZE + 4)
     + bytes(DEFAULT_MAX_MESSAGE_SIZE - 4), ErrorCode.INVALID_METHOD, 1),
    ("string not NUL-terminated", _prepare_data_source, bad_string_message(wire_string(b"text")),
     ErrorCode.INVALID_METHOD, 6),
    ("interior NUL", _prepare_data_source, bad_string_message(wire_string(b"a\0b\0")),
     ErrorCode.INVALID_METHOD, 6),
    ("null string", _prepare_data_source, bad_string_message(u32(0)), ErrorCode.INVALID_METHOD,
     6),
    ("truncated string", _prepare_data_source, bad_string_message(u32(12) + b"abc\0"),
     ErrorCode.INVALID_METHOD, 6),
    ("truncated message body", _nothing, raw_message(1, 0, b""), ErrorCode.INVALID_METHOD, 1),
    ("trailing bytes", _nothing, raw_message(1, 0, u32(42, 0)), ErrorCode.INVALID_METHOD, 1),
    ("unknown opcode", _nothing, raw_message(1, 2, u32(42)), ErrorCode.INVALID_METHOD, 1),
    ("unknown opcode on bound object", _nothing, raw_message(COMPOSITOR, 2, b""),
     ErrorCode.INVALID_METHOD, COMPOSITOR),
    ("unknown object id", _nothing, raw_message(77, 0, b""), ErrorCode.INVALID_OBJECT, 1),
    ("dead object id", _prepare_destroyed_surface, request(6, "wl_surface", "commit")[0],
     ErrorCode.INVALID_OBJECT, 1),
    ("server object id", _nothing, raw_message(0xFF000000, 0, b""), ErrorCode.INVALID_OBJECT, 1),
    ("new_id in server range", _nothing, request(1, "wl_display", "sync", 0xFF000001)[0],
     ErrorCode.INVALID_METHOD, 1),
    ("new_id at the top of the range", _nothing, request(1, "wl_display", "sync", 0xFFFFFFFF)[0],
     ErrorCode.INVALID_METHOD, 1),
    ("new_id already in use", _nothing, request(1, "wl_display", "sync", REGISTRY)[0],
     ErrorCode.INVALID_METHOD, 1),
    ("new_id is the display", _nothing, request(1, "wl_display", "sync", 1)[0],
     ErrorCode.INVALID_METHOD, 1),
    ("new_id of a live callback", _nothing, request(1, "wl_display", "sync", 40)[0],
     ErrorCode.INVALID_METHOD, 1),
    ("null new_id", _nothing, raw_message(1, 0, u32(0)), ErrorCode.INVALID_METHOD, 1),
    # libwayland-server reports bad object arguments and new ids as INVALID_METHOD
    # ("invalid arguments") on wl_display, and so does qubesshm.
    ("object arg of wrong interface", _prepare_surface,
     request(6, "wl_surface", "attach", COMPOSITOR, 0, 0)[0], ErrorCode.INVALID_METHOD, 1),
    ("object arg unknown", _prepare_surface, request(6, "wl_surface", "set_opaque_region", 99)[0],
     ErrorCode.INVALID_METHOD, 1),
    ("null object, non-nullable", _nothing,
     raw_message(DDM, 1, u32(6, 0)), ErrorCode.INVALID_METHOD, DDM),
    ("request since > version", _prepare_surface,
     request(6, "wl_surface", "set_buffer_scale", 2)[0], ErrorCode.INVALID_METHOD, 6),
]


@pytest.mark.parametrize(
    ("prepare", "bad", "code", "object_id"),
    [case[1:] for case in SESSION_CASES],
    ids=[case[0] for case in SESSION_CASES],
)
@pytest.mark.parametrize("split", [False, True], ids=["one-chunk", "separate-chunks"])
def test_session_rejects_malformed_request(
    prepare: Callable[[RelaySession], None], bad: bytes, code: ErrorCode,
    object_id: int | None, split: bool,
) -> None:
    session = ready_session()
    prepare(session)
    forwarded: list[bytes] = []
    if split:
        first = session.from_client(PRE)
        assert first.error is None
        forwarded.append(joined(first.to_compositor)[0])
        step = session.from_client(bad + POST)
    else:
        step = session.from_client(PRE + bad + POST)
    forwarded.append(joined(step.to_compositor)[0])
    # The message before the bad one went through; nothing from the bad one on did.
    assert b"".join(forwarded) == PRE
    assert_client_error(step, code, object_id=object_id)
    assert session.closed
    # A closed session forwards nothing more in either direction.
    later = session.from_client(POST)
    assert later.to_compositor == [] and later.to_client == [] and later.error is None
    later = session.from_compositor(event(1, "wl_display", "delete_id", 40)[0])
    assert later.to_compositor == [] and later.to_client == []


def test_session_too_few_fds_at_client_eof() -> None:
    session = ready_session()
    pool, _ = request(SHM, "wl_shm", "create_pool", 6, 0, 4096)
    step = session.from_client(PRE + pool + POST)
    assert step.error is None
    assert joined(step.to_compositor)[0] == PRE
    step = session.client_eof()
    assert step.to_compositor == []
    message = assert_client_error(step, ErrorCode.INVALID_METHOD, object_id=SHM)
    assert "fd" in message


def test_session_closed_mid_message_at_client_eof() -> None:
    session = ready_session()
    step = session.from_client(PRE + POST[:7])
    assert joined(step.to_compositor)[0] == PRE and step.error is None
    step = session.client_eof()
    assert step.to_compositor == []
    message = assert_client_error(step, ErrorCode.INVALID_METHOD, object_id=1)
    assert "closed" in message


def test_session_clean_client_eof() -> None:
    session = ready_session()
    step = session.from_client(PRE)
    assert step.error is None
    step = session.client_eof()
    assert step.error is None and step.to_client == [] and step.to_compositor == []


def test_session_closed_mid_body_at_client_eof() -> None:
    # The header is complete and announces more bytes than ever arrive.
    session = ready_session()
    session.from_client(POST[:8])
    step = session.client_eof()
    assert_client_error(step, ErrorCode.INVALID_METHOD, object_id=1)


def test_compositor_error_is_not_the_clients_fault() -> None:
    session = ready_session()
    step = session.from_compositor(raw_message(4242, 0, b""))
    assert step.error is not None and step.client_at_fault is False
    err_object, code, message = parse_error(step.to_client)
    assert (err_object, code) == (1, int(ErrorCode.IMPLEMENTATION))
    assert isinstance(message, str) and "compositor" in message


# -- fds through the session ---------------------------------------------------


def test_session_fd_after_its_bytes() -> None:
    session = ready_session()
    pool, pool_fds = request(SHM, "wl_shm", "create_pool", 6, 55, 4096)
    step = session.from_client(pool + POST)
    # Neither the pool nor the sync queued behind it may go out before the fd.
    assert step.to_compositor == [] and step.error is None
    step = session.from_client(b"", pool_fds)
    assert step.error is None
    assert step.to_compositor[0] == (pool + POST, [55])
    assert joined(step.to_compositor) == (pool + POST, [55])
    obj = session.objects.live(6)
    assert obj is not None and obj.interface.name == "wl_shm_pool"


def test_session_fd_before_its_bytes() -> None:
    session = ready_session()
    pool, pool_fds = request(SHM, "wl_shm", "create_pool", 6, 55, 4096)
    step = session.from_client(b"", pool_fds)
    assert step.to_compositor == [] and step.error is None
    step = session.from_client(PRE + pool)
    assert step.error is None
    assert joined(step.to_compositor) == (PRE + pool, [55])
    # The fd travels with (not after) the bytes of its message.
    for data, fds in step.to_compositor:
        if fds:
            assert pool in data


def test_session_fd_split_across_chunks() -> None:
    session = ready_session()
    pool, pool_fds = request(SHM, "wl_shm", "create_pool", 6, 55, 4096)
    assert session.from_client(pool[:5]).to_compositor == []
    assert session.from_client(pool[5:13], pool_fds).to_compositor == []
    step = session.from_client(pool[13:])
    assert step.to_compositor == [(pool, [55])]


def test_hundred_fds_in_one_burst() -> None:
    session = ready_session()
    messages = [request(SHM, "wl_shm", "create_pool", 100 + i, 1000 + i, 4096 * (i + 1))
                for i in range(100)]
    stream = b"".join(data for data, _ in messages)
    fds = [fd for _, f in messages for fd in f]
    assert fds == list(range(1000, 1100))
    step = session.from_client(stream, fds)
    assert step.error is None and step.to_client == []
    assert joined(step.to_compositor) == (stream, fds)
    # Every fd rides with the bytes of its own message.
    assert step.to_compositor == messages
    for i in range(100):
        obj = session.objects.live(100 + i)
        assert obj is not None and obj.interface.name == "wl_shm_pool"
    assert session.unclaimed_fds() == []


def test_hundred_fds_arriving_first() -> None:
    session = ready_session()
    messages = [request(SHM, "wl_shm", "create_pool", 100 + i, 1000 + i, 4096)
                for i in range(100)]
    step = session.from_client(b"", list(range(1000, 1100)))
    assert step.to_compositor == []
    stream = b"".join(data for data, _ in messages)
    step = session.from_client(stream)
    assert step.to_compositor == messages


def test_unclaimed_fds_are_handed_back() -> None:
    session = ready_session()
    step = session.from_client(PRE, [7, 8])  # a sync carries no fd
    assert joined(step.to_compositor) == (PRE, [])
    assert session.unclaimed_fds() == [7, 8]
    assert session.unclaimed_fds() == []
