"""Pipes relayed over the stream: two ``PipeRelays`` (the VM side's and the host's) on
one event loop, joined by handing each one's frames to the other, with real pipes at
both ends."""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import Callable, Iterator

import pytest

from qubesshm.stream.codec import (
    Decoder,
    PipeAck,
    PipeClosed,
    PipeData,
    PipeEnd,
    StreamError,
)
from qubesshm.stream.fds import FdKind
from qubesshm.stream.pipes import PIPE_WINDOW, PipeRelays


class Pair:
    """The VM side's relays and the host's, each frame of one fed to the other."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.frames: list[object] = []
        self.errors: list[BaseException] = []
        self.vm = PipeRelays(loop, lambda out: self._deliver(out, to_host=True), vm_side=True)
        self.host = PipeRelays(loop, lambda out: self._deliver(out, to_host=False),
                               vm_side=False)

    def _deliver(self, encoded: list[bytes], *, to_host: bool) -> None:
        target = self.host if to_host else self.vm
        decoder = Decoder()
        for data in encoded:
            for frame in decoder.feed(data):
                self.frames.append(frame)
                assert isinstance(frame, PipeData | PipeClosed | PipeAck)
                try:
                    target.frame(frame)
                except StreamError as exc:
                    self.errors.append(exc)

    def run_until(self, condition: Callable[[], bool], what: str) -> None:
        deadline = time.monotonic() + 10.0
        while not condition():
            assert time.monotonic() < deadline, f"timed out waiting for {what}"
            self.loop.run_until_complete(asyncio.sleep(0.001))


@pytest.fixture
def pair() -> Iterator[Pair]:
    loop = asyncio.new_event_loop()
    relays = Pair(loop)
    yield relays
    relays.vm.close()
    relays.host.close()
    loop.close()


def read_some(fd: int) -> bytes:
    try:
        return os.read(fd, 1 << 20)
    except BlockingIOError:
        return b""


def test_data_crosses_with_credit_and_ends(pair: Pair) -> None:
    """A copier on the VM side writes 1 MiB into a pipe whose read end its client
    passed; a paster on the host side reads it through the stand-in."""
    read_end, write_end = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
    pipe_id, end = pair.vm.adopt(read_end, FdKind.PIPE_READ)
    assert (pipe_id % 2, end) == (0, PipeEnd.READ)
    given = pair.host.stand_in(pipe_id, end)  # the host's peer reads this
    os.set_blocking(given, False)
    payload = bytes(range(256)) * 4096
    got = bytearray()
    sent = 0
    while len(got) < len(payload):
        if sent < len(payload):
            with contextlib.suppress(BlockingIOError):
                sent += os.write(write_end, payload[sent:sent + 65536])
            if sent == len(payload):
                os.close(write_end)
        pair.loop.run_until_complete(asyncio.sleep(0.001))
        got += read_some(given)
        # Never more than the window in flight between the two sides.
        in_flight = sum(len(f.data) for f in pair.frames if isinstance(f, PipeData)) - sum(
            f.count for f in pair.frames if isinstance(f, PipeAck))
        assert in_flight <= PIPE_WINDOW
    assert bytes(got) == payload
    pair.run_until(lambda: read_some(given) == b"" and pair.host.live == 0
                   and pair.vm.live == 0, "the end to cross")
    assert any(isinstance(f, PipeClosed) for f in pair.frames)
    os.close(given)
    assert not pair.errors


def test_a_reader_that_goes_away_stops_the_writer(pair: Pair) -> None:
    """The paster (VM side) gave a write end and closes its read end: the copier's
    side hears PIPE_END and lets go, so the copier's writes fail."""
    read_end, write_end = os.pipe2(os.O_CLOEXEC)
    pipe_id, end = pair.vm.adopt(write_end, FdKind.PIPE_WRITE)
    assert end is PipeEnd.WRITE
    given = pair.host.stand_in(pipe_id, end)  # the host's peer (the copier) writes here
    os.close(read_end)
    os.write(given, b"x" * 1000)
    pair.run_until(lambda: pair.vm.live == 0 and pair.host.live == 0, "both to let go")
    with pytest.raises(BrokenPipeError):
        os.write(given, b"y")
    os.close(given)
    assert not pair.errors


def test_a_discarded_pipe_closes_its_end_and_tells_nothing(pair: Pair) -> None:
    read_end, write_end = os.pipe2(os.O_CLOEXEC)
    pipe_id, _ = pair.vm.adopt(write_end, FdKind.PIPE_WRITE)
    pair.vm.discard(pipe_id)
    assert pair.vm.live == 0 and pair.frames == []
    assert os.read(read_end, 10) == b""  # the only write end is gone
    os.close(read_end)


@pytest.mark.parametrize(("frames", "says"), [
    ([PipeData(2, b"x")], "never announced"),
    ([PipeAck(1, 1)], "never announced"),
])
def test_frames_for_unknown_pipes_are_refused(pair: Pair, frames: list[object],
                                              says: str) -> None:
    for frame in frames:
        assert isinstance(frame, PipeData | PipeAck)
        with pytest.raises(StreamError, match=says):
            pair.host.frame(frame)


def test_the_peers_announcements_are_checked(pair: Pair) -> None:
    with pytest.raises(StreamError, match="one this side allocates"):
        pair.host.stand_in(3, PipeEnd.READ)  # odd: the host's own
    os.close(pair.host.stand_in(2, PipeEnd.READ))
    with pytest.raises(StreamError, match="ids only grow"):
        pair.host.stand_in(2, PipeEnd.READ)


def test_data_past_the_credit_or_the_wrong_way_is_refused(pair: Pair) -> None:
    given = pair.host.stand_in(2, PipeEnd.READ)  # the VM side reads and sends
    pair.host.frame(PipeData(2, b"a" * PIPE_WINDOW))
    with pytest.raises(StreamError, match="past its credit"):
        pair.host.frame(PipeData(2, b"b"))
    os.close(given)
    other = pair.host.stand_in(4, PipeEnd.WRITE)  # the host reads this one and sends
    with pytest.raises(StreamError, match="goes the other way"):
        pair.host.frame(PipeData(4, b"c"))
    with pytest.raises(StreamError, match="more than was sent"):
        pair.host.frame(PipeAck(4, 1))
    os.close(other)
