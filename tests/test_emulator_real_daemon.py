"""The emulator's daemon model against the real qubes-guid (invisible mode, socket vchan).

The same agent stream goes to both; what each writes back (the handshake, one ACK per
dump and one echo per DESTROY, in one order) must be the same messages, and a stream
that ends qubes-guid must end the model with one of the lines it printed.
"""

from __future__ import annotations

import random
import select
import time
from collections.abc import Iterator

import pytest
from realguid import GuidSession, RealGuid, locate_runner

from qubesshm.emulator import daemon as dm
from qubesshm.guiproto import codec
from qubesshm.guiproto import messages as gm

SCREEN = dm.Screen(1280, 1024)  # run_guid.sh's Xvfb


@pytest.fixture(scope="module")
def guid(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RealGuid]:
    real = RealGuid(locate_runner(), tmp_path_factory.mktemp("guid"))
    yield real
    real.close()


def session(seed: int) -> bytes:
    """A valid agent stream: windows come and go, with dumps, images, titles, moves."""
    rng = random.Random(seed)
    live: set[int] = set()
    out = bytearray()
    next_id = 1
    for _ in range(rng.randrange(20, 60)):
        choice = rng.random()
        if choice < 0.2 or not live:
            window, next_id = next_id, next_id + 1
            live.add(window)
            out += codec.encode(window, gm.Create(rng.randrange(-50, 1300),
                                                  rng.randrange(-50, 1000),
                                                  rng.randrange(1, 300), rng.randrange(1, 300),
                                                  0, rng.random() < 0.3))
            continue
        window = rng.choice(sorted(live))
        if choice < 0.45:
            width, height = rng.randrange(0, 200), rng.randrange(0, 200)
            pages = (width * height * 4 + 4095) // 4096 + rng.randrange(0, 2)
            refs = tuple(rng.randrange(8, 1 << 20) for _ in range(max(pages, 1)))
            out += codec.encode(window, gm.WindowDump(width, height, refs))
        elif choice < 0.55:
            out += codec.encode(window, gm.Map(rng.choice([0, *live]), rng.random() < 0.3))
        elif choice < 0.62:
            out += codec.encode(window, gm.Unmap())
        elif choice < 0.72:
            out += codec.encode(window, gm.Destroy())
            live.discard(window)
        elif choice < 0.8:
            out += codec.encode(window, gm.ShmImage(rng.randrange(-5, 100), rng.randrange(-5, 100),
                                                    rng.randrange(0, 100), rng.randrange(0, 100)))
        elif choice < 0.88:
            out += codec.encode(window, gm.Configure(rng.randrange(-50, 1300),
                                                     rng.randrange(-50, 1000),
                                                     rng.randrange(1, 300), rng.randrange(1, 300)))
        elif choice < 0.94:
            out += codec.encode(window, gm.WmName(bytes(rng.randrange(32, 127)
                                                        for _ in range(rng.randrange(0, 40)))))
        else:
            out += codec.encode(window, gm.WindowFlags(rng.choice([0, 1, 2, 4]), 0))
    return bytes(out)


def model_replies(version: int, stream: bytes, domid: int
                  ) -> tuple[list[gm.Message], dm.Exit | None]:
    daemon = dm.GuiDaemon(dm.Settings(screen=SCREEN, vm_name="testvm", domid=domid))
    answer = daemon.receive(codec.encode_version(version), 0.0)
    assert isinstance(answer[0], dm.Send)
    decoder = codec.AgentDecoder(version)
    replies: list[gm.Message] = []
    actions = daemon.receive(stream, 0.0) + daemon.tick(0.0)
    for action in actions:
        if isinstance(action, dm.Send):
            replies += decoder.feed(action.data)
    return replies, daemon.finished


def everything(real: GuidSession) -> list[gm.Message]:
    """All the daemon writes until it closes the vchan (it exits after a fault)."""
    deadline = time.monotonic() + 30
    while True:
        ready, _, _ = select.select([real.conn], [], [], max(0.0, deadline - time.monotonic()))
        assert ready, f"qubes-guid did not close the vchan: {real.stderr()}"
        data = real.conn.recv(65536)
        if not data:
            return list(real.received)
        real.received += real.decoder.feed(data)


MARKER = 0x7FFF  # a last window whose DESTROY echo closes the session (1.5+)


@pytest.mark.parametrize(("seed", "minor"), [(1, 8), (2, 8), (3, 7), (4, 6), (5, 5), (6, 4)])
def test_the_model_answers_a_session_as_qubes_guid_does(guid: RealGuid, seed: int,
                                                        minor: int) -> None:
    version = gm.make_version(1, minor)
    stream = session(seed) + codec.encode(MARKER, gm.Create(0, 0, 1, 1)) + codec.encode(
        MARKER, gm.Destroy())
    replies, finished = model_replies(version, stream, guid.domid)
    assert finished is None
    with guid.session(version) as real:
        assert real.version == version
        assert real.xconf == gm.Xconf.for_screen(SCREEN.width, SCREEN.height)
        real.send(stream)
        # With the marker's echo last, anything else qubes-guid wrote came before it.
        got = real.receive_until(len(replies))
        while minor >= 5 and replies[-1] not in got:
            got = real.receive_until(len(got) + 1)
        assert real.hang_up() == 0, real.stderr()
    # qubes-guid handles the ConfigureNotify of its own moves when it gets to them: one
    # that arrives after the agent's next CONFIGURE differs from the daemon's geometry,
    # and it tells the agent the older one. The emulator knows its own requests.
    assert [m for m in got if m.type != gm.MsgType.CONFIGURE] == replies
    if minor >= 5:
        assert replies[-1] == gm.Message.of(MARKER, gm.Destroy())
    kinds = {m.type for m in replies}
    if minor >= 7:
        assert gm.MsgType.WINDOW_DUMP_ACK in kinds  # the session did exercise it


def test_a_fault_ends_both_with_the_same_line(guid: RealGuid) -> None:
    stream = session(7) + codec.encode(0x4242, gm.Unmap())
    replies, finished = model_replies(gm.VERSION, stream, guid.domid)
    assert finished is not None and finished.status == 1
    with guid.session() as real:
        real.send(stream)
        got = everything(real)
        assert real.wait_exit() == 1
        stderr = real.stderr()
    assert got == replies
    assert finished.message == "msg 0x85 without CREATE for 0x4242"
    assert finished.message in stderr
