"""The GUI protocol codec: round trips, fuzzing, the daemon's checks and version differences."""

from __future__ import annotations

import struct
from collections.abc import Callable, Sequence

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qubesshm.guiproto import messages as gm
from qubesshm.guiproto.checks import DaemonChecks, daemon_replies
from qubesshm.guiproto.codec import (
    AgentDecoder,
    DaemonDecoder,
    ProtocolViolation,
    decode_fixed,
    encode,
    encode_body,
    encode_version,
    encode_xconf,
)
from qubesshm.guiproto.handshake import (
    AgentHandshake,
    DaemonHandshake,
    IncompatibleAgent,
    IncompatibleDaemon,
)
from qubesshm.guiproto.messages import MsgType

U32 = st.integers(0, 2**32 - 1)
I32 = st.integers(-(2**31), 2**31 - 1)
ALL_VERSIONS = [gm.make_version(1, minor) for minor in range(9)]
AGENT_VERSIONS = [gm.make_version(1, minor) for minor in range(4, 9)]
V15, V16, V17, V18 = (gm.make_version(1, m) for m in (5, 6, 7, 8))
W = 0x63


def header(mtype: int, window: int, length: int) -> bytes:
    return struct.pack("<III", mtype, window, length)


def cstr(size: int) -> st.SearchStrategy[bytes]:
    return st.binary(max_size=size - 1).map(lambda b: b.replace(b"\0", b"_"))


def refs(count: int) -> st.SearchStrategy[tuple[int, ...]]:
    return U32.map(lambda base: tuple((base + i) % 2**32 for i in range(count)))


def pages(width: int, height: int) -> int:
    return (width * height * 4 + gm.PAGE_SIZE - 1) // gm.PAGE_SIZE


@st.composite
def valid_dumps(draw: st.DrawFn) -> gm.WindowDump:
    """Dumps the daemon accepts: within the limits, enough refs, not too many."""
    width, height = draw(st.one_of(
        st.tuples(st.integers(0, 300), st.integers(0, 300)),
        st.sampled_from([(gm.MAX_WINDOW_WIDTH, gm.MAX_WINDOW_HEIGHT),
                         (gm.MAX_WINDOW_WIDTH, 1), (1, gm.MAX_WINDOW_HEIGHT)])))
    need = pages(width, height)
    count = draw(st.integers(need, min(need + 3, gm.MAX_GRANT_REFS_COUNT)))
    return gm.WindowDump(width, height, draw(refs(count)), bpp=draw(st.sampled_from([24, 32])))


def flags_pair() -> st.SearchStrategy[gm.WindowFlags]:
    return st.tuples(U32, U32).map(lambda p: gm.WindowFlags(p[0], p[1] & ~p[0]))


def agent_bodies(version: int) -> st.SearchStrategy[gm.Body]:
    """Every body an agent may send about an existing window, with valid field values."""
    size = st.integers(1, 2**31 - 1)
    return st.one_of(
        st.builds(gm.Map, U32, U32), st.just(gm.Unmap()), st.just(gm.Dock()),
        st.builds(gm.Configure, I32, I32, st.integers(1, 2**32 - 1), st.integers(1, 2**32 - 1),
                  U32),
        st.builds(gm.ShmImage, I32, I32, U32, U32),
        st.builds(gm.WmName, cstr(128)), st.builds(gm.WmClass, cstr(64), cstr(64)),
        st.builds(gm.WindowHints, *[U32] * 9), flags_pair(), valid_dumps(),
        st.builds(gm.Cursor, st.sampled_from([gm.CURSOR_DEFAULT])
                  | st.integers(gm.CURSOR_X11, gm.CURSOR_X11_MAX - 1)),
        st.builds(gm.ClipboardData, st.binary(max_size=64)
                  | st.just(b"c" * gm.clipboard_limit(version))),
        st.builds(gm.Create, I32, I32, size, size, U32, U32),  # for another window id
    )


def daemon_bodies() -> st.SearchStrategy[gm.Body]:
    """Every body a daemon may send, any field values."""
    return st.one_of(
        st.builds(gm.Keypress, U32, I32, I32, U32, U32), st.builds(gm.Button, U32, I32, I32, U32,
                                                                   U32),
        st.builds(gm.Motion, I32, I32, U32, U32), st.builds(gm.Crossing, U32, I32, I32, *[U32] * 4),
        st.builds(gm.Focus, U32, U32, U32), st.builds(gm.Resize, U32, U32),
        st.builds(gm.Map, U32, U32), st.builds(gm.Configure, I32, I32, U32, U32, U32),
        st.just(gm.Close()), st.builds(gm.Execute, cstr(255)), st.just(gm.ClipboardReq()),
        st.builds(gm.ClipboardData, st.binary(max_size=300)),
        st.builds(gm.KeymapNotify, st.binary(min_size=32, max_size=32)),
        st.builds(gm.WindowFlags, U32, U32), st.just(gm.Destroy()), st.just(gm.WindowDumpAck()),
    )


def fixed_bodies() -> st.SearchStrategy[gm.Body]:
    """Every fixed-size body, any field values."""
    return st.one_of(
        daemon_bodies().filter(lambda b: not isinstance(b, gm.ClipboardData)),
        st.builds(gm.Create, I32, I32, U32, U32, U32, U32), st.just(gm.Unmap()),
        st.just(gm.Dock()), st.builds(gm.ShmImage, I32, I32, U32, U32),
        st.builds(gm.WmName, cstr(128)), st.builds(gm.WmClass, cstr(64), cstr(64)),
        st.builds(gm.WindowHints, *[U32] * 9), st.builds(gm.Cursor, U32),
    )


def split(data: bytes, cuts: Sequence[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    return [data[a:b] for a, b in zip([0, *points], [*points, len(data)], strict=True)]


Decoder = DaemonDecoder | AgentDecoder


def drain(decoder: Decoder, chunks: Sequence[bytes]) -> tuple[list[gm.Message], list[str]]:
    """Feed chunk by chunk; go on after non-fatal faults, stop at the first fatal one."""
    messages: list[gm.Message] = []
    faults: list[str] = []
    for chunk in [*chunks, b""]:
        data = chunk
        while True:
            try:
                messages += decoder.feed(data)
                break
            except ProtocolViolation as exc:
                messages += exc.before
                faults.append(exc.lines[0])
                if exc.fatal:
                    with pytest.raises(ProtocolViolation):
                        decoder.feed(b"")
                    return messages, faults
                data = b""
    return messages, faults


# -- round trips --------------------------------------------------------------------------------

@given(body=fixed_bodies())
def test_fixed_bodies_round_trip(body: gm.Body) -> None:
    assert decode_fixed(body.TYPE, encode_body(body)) == body


@given(bodies=st.lists(daemon_bodies(), max_size=8), window=U32, cuts=st.lists(st.integers(0)))
def test_daemon_messages_round_trip(bodies: list[gm.Body], window: int, cuts: list[int]) -> None:
    stream = b"".join(encode(window, b) for b in bodies)
    decoded, faults = drain(AgentDecoder(gm.VERSION), split(stream, cuts))
    assert faults == []
    assert decoded == [gm.Message.of(window, b) for b in bodies]
    assert [m.untrusted_len for m in decoded] == [len(encode_body(b)) for b in bodies]


@settings(max_examples=150)
@given(version=st.sampled_from(AGENT_VERSIONS), create=st.builds(gm.Create, I32, I32,
       st.integers(1, 2**31 - 1), st.integers(1, 2**31 - 1), U32, U32),
       data=st.data(), cuts=st.lists(st.integers(0)))
def test_agent_messages_round_trip_and_pass_the_daemon_checks(
        version: int, create: gm.Create, data: st.DataObject, cuts: list[int]) -> None:
    """Whatever the agent side encodes from valid values, the daemon's checks accept, once
    the window exists; decoded from a stream (in any chunks) it is what was encoded."""
    bodies = data.draw(st.lists(agent_bodies(version), max_size=8))
    sent = [gm.Message.of(W, create)] + [
        gm.Message.of(W + 1 + i if isinstance(b, gm.Create) else W, b)
        for i, b in enumerate(bodies)] + [gm.Message.of(W, gm.Destroy())]
    one_by_one = DaemonChecks(version)
    for msg in sent:
        one_by_one.check(msg)
    assert one_by_one.warnings == []
    assert W not in one_by_one.windows
    stream = b"".join(encode(m.window, m.body) for m in sent)
    decoded, faults = drain(DaemonDecoder(version, DaemonChecks(version)), split(stream, cuts))
    assert faults == []
    assert decoded == sent


def test_message_type_must_match_its_body() -> None:
    with pytest.raises(ValueError, match="not MSG_MAP"):
        gm.Message(MsgType.MAP, 1, gm.Unmap())


@pytest.mark.parametrize("body", [gm.Create(0, 0, 2**32, 1), gm.ShmImage(2**31, 0, 1, 1),
                                  gm.WindowDump(1, 1, (-1,))])
def test_out_of_range_fields_are_refused_by_the_encoder(body: gm.Body) -> None:
    with pytest.raises(ValueError, match="cannot encode"):
        encode(1, body)


@pytest.mark.parametrize("make", [lambda: gm.WmName(b"x" * 128), lambda: gm.WmName(b"a\0b"),
                                  lambda: gm.WmClass(b"c" * 64, b""),
                                  lambda: gm.KeymapNotify(b"k" * 31)])
def test_strings_that_the_daemon_would_cut_are_refused(make: Callable[[], gm.Body]) -> None:
    with pytest.raises(ValueError):
        make()


def test_wmname_is_cut_where_the_daemon_cuts_it() -> None:
    raw = header(MsgType.CREATE, W, 24) + bytes(8) + struct.pack("<IIII", 1, 1, 0, 0)
    raw += header(MsgType.WMNAME, W, 128) + b"t" * 128
    msgs = DaemonDecoder(V18, DaemonChecks(V18)).feed(raw)
    assert msgs[1].body == gm.WmName(b"t" * 127)


def test_exact_encodings() -> None:
    assert encode(W, gm.Create(-1, 2, 3, 4, 5, 1)) == header(130, W, 24) + struct.pack(
        "<iiIIII", -1, 2, 3, 4, 5, 1)
    assert encode(W, gm.WindowDump(2, 3, (7, 8))) == header(147, W, 24) + struct.pack(
        "<IIIIII", 0, 2, 3, 32, 7, 8)
    assert encode(W, gm.WmName(b"ab")) == header(141, W, 128) + b"ab" + bytes(126)
    assert encode(W, gm.Destroy()) == header(131, W, 0)
    assert encode_version(gm.VERSION) == b"\x08\x00\x01\x00"
    assert encode_xconf(gm.Xconf.for_screen(1279, 1024)) == struct.pack("<4I", 1280, 1024, 24,
                                                                         5121)


# -- fuzzing -------------------------------------------------------------------------------------

@st.composite
def noisy_streams(draw: st.DrawFn) -> bytes:
    """Headers near the message numbers, lengths right or wrong, bodies valid or random;
    mostly after the CREATE of both window ids that they use."""
    known = encode(W, gm.Create(0, 0, 9, 9)) + encode(W + 1, gm.Create(5, 5, 1, 1))
    parts = [draw(st.sampled_from([known, known, b""]))]
    for _ in range(draw(st.integers(0, 10))):
        if draw(st.booleans()):
            body = draw(agent_bodies(gm.VERSION) | daemon_bodies())
            parts.append(encode(draw(st.sampled_from([W, W + 1])), body))
            continue
        mtype = draw(st.integers(120, 152) | U32)
        payload = draw(st.binary(max_size=48))
        length = draw(st.sampled_from([len(payload), 0, 4, 16, 24]) | U32)
        parts.append(header(mtype, draw(st.sampled_from([W, W + 1]) | U32), length) + payload)
    return b"".join(parts)


@st.composite
def mutated_sessions(draw: st.DrawFn) -> bytes:
    """A valid session of two windows with at most one message damaged: its length, type,
    window id or body bytes changed, or the message cut short."""
    known = [gm.Message.of(W, gm.Create(0, 0, 30, 20)),
             gm.Message.of(W + 1, gm.Create(3, 4, 5, 6, override_redirect=1))]
    bodies = draw(st.lists(agent_bodies(gm.VERSION).filter(
        lambda b: not isinstance(b, gm.Create)), max_size=6))
    sent = known + [gm.Message.of(draw(st.sampled_from([W, W + 1])), b) for b in bodies]
    raw = [bytearray(encode(m.window, m.body)) for m in sent]
    hit = draw(st.integers(2, len(raw)) | st.integers(0, len(raw)))
    if hit < len(raw):
        msg = raw[hit]
        kind = draw(st.sampled_from(["length", "type", "window", "body", "cut"]))
        if kind == "length":
            msg[8:12] = struct.pack("<I", draw(st.integers(0, 64) | U32))
        elif kind == "type":
            msg[0:4] = struct.pack("<I", draw(st.integers(120, 152)))
        elif kind == "window":
            msg[4:8] = struct.pack("<I", draw(st.sampled_from([0, W + 2, 0x7777])))
        elif kind == "body":
            msg[12:] = draw(st.binary(min_size=len(msg) - 12, max_size=len(msg) - 12))
        else:
            del msg[draw(st.integers(0, len(msg) - 1)):]
    return b"".join(raw)


@settings(max_examples=300)
@given(stream=noisy_streams() | mutated_sessions() | st.binary(max_size=400),
       version=st.sampled_from(ALL_VERSIONS), cuts=st.lists(st.integers(0), max_size=6),
       dom0=st.booleans())
def test_decoders_raise_only_protocol_violations(stream: bytes, version: int, cuts: list[int],
                                                 dom0: bool) -> None:
    """Any bytes: only ProtocolViolation, and the same outcome whatever the chunking."""
    makers: list[Callable[[], Decoder]] = [
        lambda: DaemonDecoder(version),
        lambda: DaemonDecoder(version, DaemonChecks(version, in_dom0=dom0)),
        lambda: AgentDecoder(version),
    ]
    for make in makers:
        whole = drain(make(), [stream])
        assert drain(make(), split(stream, cuts)) == whole


# -- the daemon's faults, with its text ----------------------------------------------------------

def create(window: int = W, width: int = 10, height: int = 10) -> bytes:
    return encode(window, gm.Create(0, 0, width, height))


FATAL: list[tuple[str, int, bytes, tuple[str, ...]]] = [
    ("length", V18, create() + header(MsgType.CREATE, W + 1, 23) + bytes(23),
     ("incorrect untrusted_len for MSG_CREATE: expected 24 got 23",
      "Exiting since protocol version 1.8 >= 1.6")),
    ("length-1.6", V16, create() + header(MsgType.UNMAP, W, 4) + bytes(4),
     ("incorrect untrusted_len for MSG_UNMAP: expected 0 got 4",
      "Exiting since protocol version 1.6 >= 1.6")),
    ("no-create", V18, encode(W, gm.Map()), ("msg 0x84 without CREATE for 0x63",)),
    ("no-create-first", V18, header(MsgType.MAP, W, 3), ("msg 0x84 without CREATE for 0x63",)),
    ("after-destroy", V18, create() + encode(W, gm.Destroy()) + encode(W, gm.Unmap()),
     ("msg 0x85 without CREATE for 0x63",)),
    ("second-create", V18, create() + create(), ("CREATE for already existing window id 0x63?",)),
    ("dump-wide", V18, create() + encode(W, gm.WindowDump(16385, 1, (1, 2, 3, 4, 5))),
     ("Width or height too large in MSG_WINDOW_DUMP: limit is 16384x6144 but got 16385x1",)),
    ("dump-tall", V18, create() + encode(W, gm.WindowDump(1, 6145, (1, 2, 3, 4, 5, 6, 7))),
     ("Width or height too large in MSG_WINDOW_DUMP: limit is 16384x6144 but got 1x6145",)),
    ("dump-few-refs", V18, create() + encode(W, gm.WindowDump(100, 100, (1, 2))),
     ("handle_window_dump: got too small image data size (8192) for window 0x63 (remote 0x63)",)),
    ("dump-odd-body", V18, create() + header(MsgType.WINDOW_DUMP, W, 22) + bytes(22),
     ("handle_msg_window_dump_grant_refs: invalid body size(6)",)),
    ("dump-many-refs", V18, create() + header(MsgType.WINDOW_DUMP, W, 16 + 4 * 98305) + bytes(16),
     ("handle_msg_window_dump_grant_refs: invalid body size(393220)",)),
    ("dump-type", V18, create() + encode(W, gm.WindowDump(1, 1, (1,), type=1)),
     ("unknown window dump type 1",)),
    ("dump-short", V18, create() + header(MsgType.WINDOW_DUMP, W, 12) + bytes(12),
     ("MSG_WINDOW_DUMP message is too short (got 12 expected >= 16",)),
    ("unknown-type", V18, create() + header(200, W, 0), ("got unknown msg type 200",)),
    ("agent-sends-keypress", V18, create() + encode(W, gm.Keypress(0, 0, 0, 0, 9)),
     ("got unknown msg type 124",)),
    ("unknown-type-no-window", V18, header(200, W, 0), ("msg 0xc8 without CREATE for 0x63",)),
    ("create-zero", V18, create(width=0),
     ("ErrorHandler: BadValue (integer parameter out of range for operation)",
      "Major opcode: 1 (X_CreateWindow)")),
    ("clipboard-1.7", V17, header(MsgType.CLIPBOARD_DATA, 0, 65001),
     ("clipboard data len 0xfde9 exceeds maximum allowed!",)),
    ("clipboard-1.8", V18, header(MsgType.CLIPBOARD_DATA, 0, 256002),
     ("clipboard data len 0x3e802 exceeds maximum allowed!",)),
    ("mfndump-wide", V18, create() + encode(W, gm.MfnDump(16385, 1, (1, 2, 3, 4, 5))),
     ("Width or height too large in MSG_MFNDUMP: limit is 16384x6144 but got 16385x1",)),
    ("mfndump-offset", V18, create() + encode(W, gm.MfnDump(1, 1, (1, 2), off=4096)),
     ("MSG_MFNDUMP has offset 4096 which is not less than 4096",)),
    ("mfndump-length", V18,
     create() + header(MsgType.MFNDUMP, W, 28) + struct.pack("<7I", 0, 1, 1, 24, 0, 1, 0),
     ('incorrect untrusted_len for MSG_"MFNDUMP": expected 32 got 28',
      "Exiting since protocol version 1.8 >= 1.6")),
    ("mfndump-few", V18, create() + encode(W, gm.MfnDump(10, 10, (1,), off=3700)),
     ("handle_mfndump for window 0x63(remote 0x63) got too small num_mfn= 0x1",)),
]


@pytest.mark.parametrize(("version", "stream", "lines"), [c[1:] for c in FATAL],
                         ids=[c[0] for c in FATAL])
def test_fatal_faults_with_the_daemons_text(version: int, stream: bytes,
                                            lines: tuple[str, ...]) -> None:
    decoder = DaemonDecoder(version, DaemonChecks(version))
    with pytest.raises(ProtocolViolation) as caught:
        decoder.feed(stream)
    assert caught.value.lines == lines
    assert caught.value.fatal
    with pytest.raises(ProtocolViolation):  # a dead stream stays dead
        decoder.feed(create(W + 7))


def test_mfndump_outside_dom0() -> None:
    checks = DaemonChecks(V18, in_dom0=False, vm_name="work", domid=12)
    with pytest.raises(ProtocolViolation, match=r"^Qube work \(id 12\) sent a MSG_MFNDUMP"):
        DaemonDecoder(V18, checks).feed(create() + encode(W, gm.MfnDump(1, 1, (1,))))


def test_local_window_id_in_the_too_small_text() -> None:
    checks = DaemonChecks(V18, local_window=lambda remote: remote + 0x200000)
    with pytest.raises(ProtocolViolation, match=r"for window 0x200063 \(remote 0x63\)$"):
        DaemonDecoder(V18, checks).feed(create() + encode(W, gm.WindowDump(100, 100, (1,))))


VERIFY: list[tuple[str, gm.Body, str]] = [
    ("configure-zero", gm.Configure(0, 0, 0, 5), "width > 0 && height > 0"),
    ("flags-overlap", gm.WindowFlags(3, 1),
     "(untrusted_msg.flags_set & untrusted_msg.flags_unset) == 0"),
    ("cursor-x11-max", gm.Cursor(gm.CURSOR_X11_MAX), "untrusted_msg.cursor < 0x19a"),
    ("cursor-other", gm.Cursor(0x200), "untrusted_msg.cursor == 0"),
]


@pytest.mark.parametrize(("body", "condition"), [c[1:] for c in VERIFY], ids=[c[0] for c in VERIFY])
def test_verify_failures_drop_the_message_and_go_on(body: gm.Body, condition: str) -> None:
    decoder = DaemonDecoder(V18, DaemonChecks(V18))
    dump = encode(W, gm.WindowDump(1, 1, (9,)))
    with pytest.raises(ProtocolViolation) as caught:
        decoder.feed(create() + encode(W, body) + dump)
    assert caught.value.lines == (f"Verify failed: {condition}",)
    assert not caught.value.fatal
    assert [m.type for m in caught.value.before] == [MsgType.CREATE]
    assert [m.type for m in decoder.feed(b"")] == [MsgType.WINDOW_DUMP]


def test_create_with_a_negative_size_fails_verify_and_creates_nothing() -> None:
    checks = DaemonChecks(V18)
    decoder = DaemonDecoder(V18, checks)
    with pytest.raises(ProtocolViolation, match=r"^Verify failed: \(int\) untrusted_crt.width"):
        decoder.feed(create(width=2**31) + encode(W, gm.Map()))
    assert checks.windows == set()
    with pytest.raises(ProtocolViolation, match="msg 0x84 without CREATE for 0x63"):
        decoder.feed(b"")


def test_create_over_the_limits_is_clamped_not_fatal() -> None:
    checks = DaemonChecks(V18)
    checks.check(gm.Message.of(W, gm.Create(-(2**31), 2**31 - 1, 2**31 - 1, 2**31 - 1)))
    checks.check(gm.Message.of(W, gm.Configure(0, 0, 2**32 - 1, 2**32 - 1)))
    assert checks.windows == {W}


def test_check_uses_the_untrusted_len_it_is_given() -> None:
    checks = DaemonChecks(V15)
    checks.check(gm.Message(MsgType.CREATE, W, gm.Create(0, 0, 1, 1), untrusted_len=20))
    assert checks.warnings == ["incorrect untrusted_len for MSG_CREATE: expected 24 got 20",
                               "Continuing since protocol version 1.5 < 1.6"]
    with pytest.raises(ValueError, match="not the length"):
        checks.check(gm.Message(MsgType.WINDOW_DUMP, W, gm.WindowDump(0, 0, ()), untrusted_len=4))


# -- version differences -------------------------------------------------------------------------

@pytest.mark.parametrize("version", ALL_VERSIONS, ids=gm.version_text)
def test_replies_by_version(version: int) -> None:
    dump = gm.Message.of(W, gm.WindowDump(1, 1, (1,)))
    destroy = gm.Message.of(W, gm.Destroy())
    assert daemon_replies(version, dump) == (
        [gm.Message.of(W, gm.WindowDumpAck())] if version >= V17 else [])
    assert daemon_replies(version, destroy) == ([destroy] if version >= V15 else [])
    assert daemon_replies(version, gm.Message.of(W, gm.Unmap())) == []


@pytest.mark.parametrize("version", ALL_VERSIONS, ids=gm.version_text)
def test_agent_decoder_accepts_echo_and_ack_only_from_their_versions(version: int) -> None:
    for body, since in ((gm.Destroy(), V15), (gm.WindowDumpAck(), V17)):
        if version >= since:
            assert AgentDecoder(version).feed(encode(W, body)) == [gm.Message.of(W, body)]
        else:
            with pytest.raises(ProtocolViolation, match="unexpected message type"):
                AgentDecoder(version).feed(encode(W, body))


def test_agent_decoder_refuses_wrong_lengths_and_agent_only_messages() -> None:
    with pytest.raises(ProtocolViolation, match="MSG_CONFIGURE from the GUI daemon: expected 20"):
        AgentDecoder(V18).feed(header(MsgType.CONFIGURE, W, 16))
    with pytest.raises(ProtocolViolation, match="unexpected message type 147"):
        AgentDecoder(V18).feed(encode(W, gm.WindowDump(0, 0, ())))


@pytest.mark.parametrize("version", ALL_VERSIONS, ids=gm.version_text)
def test_wrong_lengths_are_fatal_from_1_6_and_misframe_before(version: int) -> None:
    stream = create() + header(MsgType.UNMAP, W, 4) + header(MsgType.MAP, W, 8) + bytes(20)
    decoder = DaemonDecoder(version, DaemonChecks(version))
    if version >= V16:
        with pytest.raises(ProtocolViolation, match="expected 0 got 4"):
            decoder.feed(stream)
        return
    # The daemon reads no body for UNMAP and takes the next header as it comes; here the
    # MAP is read whole, and the zero bytes after it are a header of type 0 for window 0.
    with pytest.raises(ProtocolViolation) as caught:
        decoder.feed(stream)
    assert [m.type for m in caught.value.before] == [MsgType.CREATE, MsgType.UNMAP, MsgType.MAP]
    assert caught.value.lines == ("msg 0x0 without CREATE for 0x0",)
    assert decoder.warnings == ["incorrect untrusted_len for MSG_UNMAP: expected 0 got 4",
                                f"Continuing since protocol version {gm.version_text(version)}"
                                " < 1.6"]


@pytest.mark.parametrize("version", ALL_VERSIONS, ids=gm.version_text)
@pytest.mark.parametrize("length", [65000, 65001, 256001, 256002])
def test_clipboard_limits_by_version(version: int, length: int) -> None:
    stream = header(MsgType.CLIPBOARD_DATA, 0, length) + b"c" * length
    limit = 65000 if version < V18 else 256001
    if length <= limit:
        assert DaemonDecoder(version).feed(stream)[0].body == gm.ClipboardData(b"c" * length)
    else:
        with pytest.raises(ProtocolViolation, match="exceeds maximum allowed"):
            DaemonDecoder(version).feed(stream)


def test_mfndump_too_short_only_from_1_6() -> None:
    short = create() + header(MsgType.MFNDUMP, W, 8) + struct.pack("<7I", 0, 0, 0, 24, 0, 0, 0)
    with pytest.raises(ProtocolViolation, match="MSG_MFNDUMP message is too short"):
        DaemonDecoder(V16, DaemonChecks(V16)).feed(short)
    decoder = DaemonDecoder(V15, DaemonChecks(V15))
    assert decoder.feed(short)[1].body == gm.MfnDump(0, 0, ())
    assert decoder.warnings[0] == 'incorrect untrusted_len for MSG_"MFNDUMP": expected 28 got 8'


# -- handshake -----------------------------------------------------------------------------------

@pytest.mark.parametrize("offered", AGENT_VERSIONS, ids=gm.version_text)
@pytest.mark.parametrize("daemon_max", ALL_VERSIONS, ids=gm.version_text)
def test_handshake_both_sides(offered: int, daemon_max: int) -> None:
    xconf = gm.Xconf.for_screen(1920, 1080)
    agent, daemon = AgentHandshake(offered), DaemonHandshake(xconf, daemon_max)
    greeting = agent.greeting() + encode(W, gm.Create(0, 0, 1, 1))
    on_daemon = [daemon.feed(greeting[i:i + 1]) for i in range(4)]
    assert on_daemon[:3] == [None] * 3
    negotiated = on_daemon[3]
    assert negotiated is not None and negotiated.version == min(offered, daemon_max)
    assert negotiated.leftover == b""
    whole = DaemonHandshake(xconf, daemon_max).feed(greeting)
    assert whole is not None and whole.leftover == greeting[4:]
    reply = daemon.reply + encode(W, gm.Configure(1, 2, 3, 4))
    if negotiated.version < gm.MIN_VERSION:
        assert daemon.reply == encode_xconf(xconf)  # no version before 1.4
        with pytest.raises(IncompatibleDaemon, match=r"no protocol version .* 1920, .* offered"):
            agent.feed(reply)
        return
    results = [agent.feed(reply[i:i + 1]) for i in range(20)]
    assert results[:19] == [None] * 19
    done = results[19]
    assert done is not None
    assert (done.version, done.xconf, done.leftover) == (negotiated.version, xconf, b"")
    at_once = AgentHandshake(offered).feed(reply)
    assert at_once is not None and at_once.leftover == reply[20:]


@pytest.mark.parametrize(("answer", "text"), [
    (gm.make_version(1, 3), r"answered protocol 1\.3 to qubesshm's offer of 1\.8: .* 1\.4"),
    (gm.make_version(1, 9), r"answered protocol 1\.9 to qubesshm's offer of 1\.8"),
    (gm.make_version(2, 0), r"answered protocol 2\.0 to qubesshm's offer of 1\.8"),
])
def test_agent_refuses_daemons_it_cannot_speak_with(answer: int, text: str) -> None:
    with pytest.raises(IncompatibleDaemon, match=text):
        AgentHandshake().feed(encode_version(answer))


def test_agent_offer_within_1_4_to_1_8() -> None:
    with pytest.raises(ValueError, match=r"not 1\.3"):
        AgentHandshake(gm.make_version(1, 3))


@pytest.mark.parametrize(("offer", "text"), [
    (gm.make_version(0, 9), "implements outdated protocol (0:9)"),
    (gm.make_version(2, 1), "does not support protocol version 2:1"),
])
def test_daemon_refuses_another_major(offer: int, text: str) -> None:
    with pytest.raises(IncompatibleAgent) as caught:
        DaemonHandshake(gm.Xconf.for_screen(800, 600)).feed(encode_version(offer))
    assert text in caught.value.lines[0]


def test_old_agent_gets_no_version_from_the_daemon() -> None:
    xconf = gm.Xconf.for_screen(800, 600)
    daemon = DaemonHandshake(xconf)
    negotiated = daemon.feed(encode_version(gm.make_version(1, 2)))
    assert negotiated is not None and negotiated.version == gm.make_version(1, 2)
    assert daemon.reply == encode_xconf(xconf)
