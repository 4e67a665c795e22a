"""The codec and DaemonChecks against the real qubes-guid (invisible mode, socket vchan).

For each fault, the daemon must end (or "Verify") with the text DaemonChecks gives for the
same bytes; a good session must be answered as ``daemon_replies`` says, at every version.
"""

from __future__ import annotations

import re
import select
import struct
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from realguid import GuidSession, RealGuid, locate_runner
from test_guiproto import FATAL, VERIFY, mutated_sessions, noisy_streams

from qubesshm.guiproto import messages as gm
from qubesshm.guiproto.checks import DaemonChecks, daemon_replies
from qubesshm.guiproto.codec import DaemonDecoder, ProtocolViolation, encode, encode_version
from qubesshm.guiproto.handshake import (
    AgentHandshake,
    DaemonHandshake,
    IncompatibleAgent,
    IncompatibleDaemon,
)
from qubesshm.guiproto.messages import MsgType

W = 0x63
V15, V17, V18 = gm.make_version(1, 5), gm.make_version(1, 7), gm.make_version(1, 8)
SCREEN = gm.Xconf.for_screen(1280, 1024)  # run_guid.sh's Xvfb: 1280x1024x24


@pytest.fixture(scope="module")
def guid(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RealGuid]:
    real = RealGuid(locate_runner(), tmp_path_factory.mktemp("guid"))
    yield real
    real.close()


def local_ids(stderr: str) -> dict[int, int]:
    """The daemon's X window for each VM window, from its "Created 0x..(0x..)" log lines."""
    return {int(remote, 16): int(local, 16)
            for local, remote in re.findall(r"Created 0x([0-9a-f]+)\(0x([0-9a-f]+)\)", stderr)}


def predict(version: int, stream: bytes, domid: int, stderr: str
            ) -> tuple[list[gm.Message], list[ProtocolViolation], list[str]]:
    """What DaemonChecks says of ``stream``: accepted messages, faults (up to the first fatal
    one), warnings; configured as run_guid.sh runs the daemon (outside dom0, "testvm")."""
    ids = local_ids(stderr)
    checks = DaemonChecks(version, in_dom0=False, vm_name="testvm", domid=domid,
                          local_window=lambda remote: ids.get(remote, remote))
    decoder = DaemonDecoder(version, checks)
    accepted: list[gm.Message] = []
    faults: list[ProtocolViolation] = []
    data = stream
    while True:
        try:
            accepted += decoder.feed(data)
            return accepted, faults, decoder.warnings
        except ProtocolViolation as exc:
            accepted += exc.before
            faults.append(exc)
            if exc.fatal:
                return accepted, faults, decoder.warnings
            data = b""


def assert_printed(lines: list[str], stderr: str) -> None:
    for line in lines:
        assert line in stderr, f"{line!r} not in the daemon's output:\n{stderr}"


def run_fault(guid: RealGuid, version: int, stream: bytes) -> tuple[GuidSession, str]:
    with guid.session(version) as session:
        session.send(stream)
        returncode = session.wait_exit()
        stderr = session.stderr()
    assert returncode == 1, stderr
    return session, stderr


@pytest.mark.parametrize(("version", "stream"), [c[1:3] for c in FATAL], ids=[c[0] for c in FATAL])
def test_fatal_fault_ends_the_daemon_with_the_predicted_text(
        guid: RealGuid, version: int, stream: bytes) -> None:
    _, stderr = run_fault(guid, version, stream)
    _, faults, warnings = predict(version, stream, guid.domid, stderr)
    assert faults and faults[-1].fatal
    assert_printed([*warnings, *faults[-1].lines], stderr)


def test_wrong_length_before_1_6_warns_and_misframes_as_predicted(guid: RealGuid) -> None:
    stream = (encode(W, gm.Create(0, 0, 10, 10)) + struct.pack("<III", MsgType.UNMAP, W, 4)
              + encode(W, gm.Map()) + bytes(12))
    _, stderr = run_fault(guid, V15, stream)
    accepted, faults, warnings = predict(V15, stream, guid.domid, stderr)
    assert [m.type for m in accepted] == [MsgType.CREATE, MsgType.UNMAP, MsgType.MAP]
    assert warnings and faults[-1].lines == ("msg 0x0 without CREATE for 0x0",)
    assert_printed([*warnings, *faults[-1].lines], stderr)


def test_mfndump_is_refused_outside_dom0(guid: RealGuid) -> None:
    stream = encode(W, gm.Create(0, 0, 10, 10)) + encode(W, gm.MfnDump(1, 1, (5,)))
    _, stderr = run_fault(guid, V18, stream)
    _, faults, _ = predict(V18, stream, guid.domid, stderr)
    assert faults[-1].lines[0].startswith(f"Qube testvm (id {guid.domid}) sent a MSG_MFNDUMP")
    assert_printed(list(faults[-1].lines), stderr)


def test_create_failing_verify_creates_no_window(guid: RealGuid) -> None:
    stream = encode(W, gm.Create(0, 0, 2**31, 10)) + encode(W, gm.Map())
    _, stderr = run_fault(guid, V18, stream)
    _, faults, _ = predict(V18, stream, guid.domid, stderr)
    assert [f.fatal for f in faults] == [False, True]
    assert_printed([line for f in faults for line in f.lines], stderr)


@pytest.mark.parametrize("body", [c[1] for c in VERIFY], ids=[c[0] for c in VERIFY])
def test_verify_failure_is_printed_and_the_daemon_goes_on(guid: RealGuid, body: gm.Body) -> None:
    stream = (encode(W, gm.Create(0, 0, 10, 10)) + encode(W, body)
              + encode(W, gm.WindowDump(10, 10, (3,))))
    with guid.session(V18) as session:
        session.send(stream)
        replies = session.receive_until(1)
        assert session.hang_up() == 0
        stderr = session.stderr()
    accepted, faults, _ = predict(V18, stream, guid.domid, stderr)
    assert [f.fatal for f in faults] == [False]
    assert_printed(list(faults[0].lines), stderr)
    assert replies == [r for m in accepted for r in daemon_replies(V18, m)]


def test_clipboard_within_the_1_8_limit_is_read_and_dropped(guid: RealGuid) -> None:
    stream = (encode(0, gm.ClipboardData(b"c" * 65001)) + encode(W, gm.Create(0, 0, 1, 1))
              + encode(W, gm.WindowDump(1, 1, (1,))))
    with guid.session(V18) as session:
        session.send(stream)
        assert session.receive_until(1) == [gm.Message.of(W, gm.WindowDumpAck())]
        assert session.hang_up() == 0
        assert "received clipboard data when not requested" in session.stderr()


def good_session() -> list[gm.Message]:
    """Two windows, a popup among them, dumps of every kind of valid size."""
    popup = W + 1
    big = (gm.MAX_WINDOW_WIDTH * gm.MAX_WINDOW_HEIGHT * 4) // gm.PAGE_SIZE
    bodies: list[tuple[int, gm.Body]] = [
        (W, gm.Create(10, 20, 300, 200)), (W, gm.WmName("Qubes \u2013 \u00fc".encode())),
        (W, gm.WmClass(b"Toplevel", b"app")),
        (W, gm.WindowHints(gm.HINT_P_MIN_SIZE | gm.HINT_P_MAX_SIZE, 100, 50, 4000, 3000)),
        (W, gm.Map()), (W, gm.WindowDump(300, 200, tuple(range(1, 60)))),
        (W, gm.ShmImage(0, 0, 300, 200)), (W, gm.Configure(10, 20, 640, 480)),
        (W, gm.WindowDump(640, 480, tuple(range(100, 400)))),
        (W, gm.Cursor(gm.CURSOR_X11 + 68)), (W, gm.WindowFlags(gm.WINDOW_FLAG_FULLSCREEN, 0)),
        (popup, gm.Create(40, 60, 120, 80, override_redirect=1)),
        (popup, gm.Map(transient_for=W, override_redirect=1)),
        (popup, gm.WindowDump(120, 80, tuple(range(500, 510)))),
        (W, gm.WindowDump(gm.MAX_WINDOW_WIDTH, gm.MAX_WINDOW_HEIGHT, tuple(range(1, big + 1)))),
        (popup, gm.WindowDump(0, 0, ())), (popup, gm.Unmap()), (popup, gm.Destroy()),
        (W, gm.WindowDump(1, 1, (7,))), (W, gm.Unmap()), (W, gm.Destroy()),
    ]
    return [gm.Message.of(window, body) for window, body in bodies]


@pytest.mark.parametrize("version", [gm.make_version(1, m) for m in range(4, 9)],
                         ids=gm.version_text)
def test_good_session_is_answered_as_daemon_replies_says(guid: RealGuid, version: int) -> None:
    sent = good_session()
    checks = DaemonChecks(version)
    for msg in sent:
        checks.check(msg)
    expected = [reply for msg in sent for reply in daemon_replies(version, msg)]
    sentinel = encode(0x7777, gm.Unmap())  # a fault the daemon reports only once it got here
    with guid.session(version) as session:
        assert (session.version, session.xconf) == (version, SCREEN)
        session.send(b"".join(encode(m.window, m.body) for m in sent))
        replies = session.receive_until(len(expected))
        session.send(sentinel)
        assert session.wait_exit() == 1
        rest = session.decoder.feed(read_to_end(session))  # nothing more, at 1.4 nothing at all
        stderr = session.stderr()
    assert replies + rest == expected
    if version >= V17:
        assert [m.window for m in replies if m.type == MsgType.WINDOW_DUMP_ACK] == [
            m.window for m in sent if m.type == MsgType.WINDOW_DUMP]
    assert "msg 0x85 without CREATE for 0x7777" in stderr
    for complaint in ("Verify failed", "incorrect untrusted_len", "too small", "ErrorHandler",
                      "invalid body size", "too large"):
        assert complaint not in stderr, stderr


def read_to_end(session: GuidSession) -> bytes:
    data = b""
    while select.select([session.conn], [], [], 30)[0]:
        chunk = session.conn.recv(4096)
        if not chunk:
            return data
        data += chunk
    raise AssertionError(f"no EOF from the daemon after {data!r}")


def test_agent_below_1_4_gets_only_the_screen(guid: RealGuid) -> None:
    """The daemon sends no version below 1.4, so AgentHandshake sees the screen width."""
    offer = encode_version(gm.make_version(1, 3))
    with guid.session(gm.make_version(1, 3), greeting=offer) as session:
        session.send(encode(0x7777, gm.Unmap()))
        assert session.wait_exit() == 1
        answer = read_to_end(session)
    daemon = DaemonHandshake(SCREEN)
    assert daemon.feed(offer) is not None
    assert answer == daemon.reply and len(answer) == 16
    with pytest.raises(IncompatibleDaemon, match="no protocol version"):
        AgentHandshake().feed(answer)


def test_daemon_answers_its_own_version_to_a_newer_agent(guid: RealGuid) -> None:
    offer = encode_version(gm.make_version(1, 9))
    with guid.session(gm.make_version(1, 9), greeting=offer) as session:
        session.send(encode(0x7777, gm.Unmap()))
        assert session.wait_exit() == 1
        answer = read_to_end(session)
    daemon = DaemonHandshake(SCREEN)
    assert daemon.feed(offer) is not None
    assert answer == daemon.reply and answer[:4] == encode_version(V18)


def test_another_major_ends_the_daemon(guid: RealGuid) -> None:
    offer = encode_version(gm.make_version(2, 0))
    with guid.session(gm.make_version(2, 0), greeting=offer) as session:
        assert session.wait_exit() == 1
    with pytest.raises(IncompatibleAgent):
        DaemonHandshake(SCREEN).feed(offer)



@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(stream=mutated_sessions() | noisy_streams())
def test_damaged_streams_end_the_daemon_as_predicted(guid: RealGuid, stream: bytes) -> None:
    """Differential: sessions with one damaged message, or random headers, lengths and
    bodies; then a sure fault. The daemon ends as DaemonChecks predicts, at 1.8."""
    stream += encode(0x7777, gm.Unmap())
    with guid.session(V18) as session:
        session.send(stream)
        probe = predict(V18, stream, guid.domid, "")
        fatal = bool(probe[1]) and probe[1][-1].fatal
        returncode = session.wait_exit() if fatal else session.hang_up()
        stderr = session.stderr()
    _, faults, warnings = predict(V18, stream, guid.domid, stderr)
    assert returncode == (1 if fatal else 0), stderr
    if fatal:
        assert_printed([*warnings, *[line for f in faults for line in f.lines]], stderr)
