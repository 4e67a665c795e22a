"""The connections multiplexed on the stream, sans-IO: order, credit, close races.

Two ``Connections`` (the VM side's and the host's) are joined by hand: what one
outputs is decoded and fed to the other, so each test sees exactly the frames a
stream would carry.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qubesshm.stream.codec import (
    MAX_DATA,
    Ack,
    Close,
    Data,
    Decoder,
    File,
    Open,
    Pool,
    StreamError,
    Unmap,
)
from qubesshm.stream.connections import ACK_EVERY, WINDOW, Connections


def deliver(sender: Connections, receiver: Connections) -> list[object]:
    """Feed every frame ``sender`` has queued to ``receiver``; the frames."""
    frames: list[object] = []
    decoder = Decoder()
    for data in sender.output():
        for frame in decoder.feed(data):
            frames.append(frame)
            assert isinstance(frame, Open | Close | Data | Ack | Pool | Unmap | File)
            receiver.receive(frame)
    return frames


def drain(side: Connections, conn: int) -> bytes:
    """Everything ``conn`` received, taken by the local peer."""
    out = bytearray()
    while (item := side.pop(conn)) is not None:
        assert isinstance(item, Data)
        out += item.data
        side.take(conn, len(item.data))
    return bytes(out)


def pair() -> tuple[Connections, Connections, int]:
    vm, host = Connections(opens=True), Connections(opens=False)
    conn = vm.open()
    deliver(vm, host)
    assert list(host.live) == [conn]
    return vm, host, conn


def test_bytes_arrive_in_order_split_into_bounded_frames() -> None:
    vm, host, conn = pair()
    payload = bytes(range(256)) * 700  # 179 200 bytes: four frames
    vm.send(conn, payload)
    frames = deliver(vm, host)
    assert all(isinstance(f, Data) and len(f.data) <= MAX_DATA for f in frames)
    assert len(frames) == 3
    assert drain(host, conn) == payload


def test_items_keep_their_place_among_the_bytes() -> None:
    vm, host, conn = pair()
    pool = Pool(conn, 1, 7, 4096, 4095, (10,))
    vm.send(conn, b"a" * 8)
    vm.send_item(conn, pool)
    vm.send(conn, b"b" * 8)
    deliver(vm, host)
    assert host.pop(conn) == Data(conn, b"a" * 8)
    assert host.pop(conn) == pool
    assert host.pop(conn) == Data(conn, b"b" * 8)


def test_a_peer_that_does_not_take_stops_only_its_connection() -> None:
    vm, host = Connections(opens=True), Connections(opens=False)
    slow, other = vm.open(), vm.open()
    deliver(vm, host)
    vm.send(slow, b"x" * (WINDOW + 1000))
    assert vm.queued(slow) == 1000  # beyond the credit: waits here
    item = Pool(slow, 1, 3, 4096, 4095, (9,))
    vm.send_item(slow, item)  # waits behind those bytes
    vm.send(other, b"y" * 100)
    assert vm.queued(other) == 0
    deliver(vm, host)
    assert drain(host, other) == b"y" * 100
    # The slow connection's peer takes a little: no credit yet (under ACK_EVERY).
    first = host.pop(slow)
    assert isinstance(first, Data)
    host.take(slow, len(first.data))
    deliver(host, vm)
    assert vm.queued(slow) == 1000
    # Enough taken: credit comes back and the rest, then the item, go.
    got = len(first.data) + len(drain(host, slow))
    assert got == WINDOW
    deliver(host, vm)
    assert slow in set(vm.take_unblocked())
    assert vm.queued(slow) == 0
    deliver(vm, host)
    assert host.pop(slow) == Data(slow, b"x" * 1000)
    assert host.pop(slow) == item


def test_credit_comes_back_in_batches() -> None:
    vm, host, conn = pair()
    vm.send(conn, b"z" * (ACK_EVERY - 1))
    deliver(vm, host)
    drain(host, conn)
    assert host.output() == []  # not yet worth an ACK
    vm.send(conn, b"z")
    deliver(vm, host)
    drain(host, conn)
    frames = deliver(host, vm)
    assert frames == [Ack(conn, ACK_EVERY)]


def test_sending_past_the_credit_is_a_protocol_error() -> None:
    _, host, conn = pair()
    for _ in range(WINDOW // MAX_DATA):
        host.receive(Data(conn, b"q" * MAX_DATA))
    with pytest.raises(StreamError, match="past its credit"):
        host.receive(Data(conn, b"q"))


def test_an_ack_for_more_than_was_sent_is_a_protocol_error() -> None:
    vm, _, conn = pair()
    vm.send(conn, b"1234")
    with pytest.raises(StreamError, match="more than was sent"):
        vm.receive(Ack(conn, 5))


def test_frames_for_a_connection_never_opened_are_refused() -> None:
    host = Connections(opens=False)
    with pytest.raises(StreamError, match="never opened"):
        host.receive(Data(3, b"x"))
    host.receive(Open(3))
    with pytest.raises(StreamError, match="ids only grow"):
        host.receive(Open(2))


def test_the_host_may_not_open_connections() -> None:
    vm = Connections(opens=True)
    with pytest.raises(StreamError, match="only the VM side opens"):
        vm.receive(Open(1))


def test_frames_crossing_a_close_are_dropped_but_none_after_the_peers_close() -> None:
    vm, host, conn = pair()
    vm.close(conn, "")
    # The host sent these before it saw the CLOSE: dropped, no error.
    vm.receive(Data(conn, b"late"))
    vm.receive(Close(conn, "compositor hung up"))
    deliver(vm, host)
    assert host.live[conn].peer_closed == ""
    with pytest.raises(StreamError, match="after its CLOSE"):
        host.receive(Data(conn, b"after"))


def test_a_close_after_the_peers_close_is_not_sent() -> None:
    vm, host, conn = pair()
    host.close(conn, "refused: pool 3 names domain 7")
    deliver(host, vm)
    state = vm.live[conn]
    assert state.peer_closed == "refused: pool 3 names domain 7"
    assert state.ended
    vm.close(conn)
    assert vm.output() == []


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["send", "item", "take"]),
                          st.integers(min_value=0, max_value=3 * MAX_DATA)), max_size=40))
def test_any_interleaving_delivers_everything_in_order(
        steps: list[tuple[str, int]]) -> None:
    """Whatever the sender sends and however slowly the receiver takes, the receiver
    ends up with exactly what was sent, in order, never over the window."""
    vm, host, conn = pair()
    sent: list[object] = []
    got: list[object] = []
    counter = 0
    for action, size in steps:
        if action == "send" and size:
            data = bytes([counter % 251]) * size
            counter += 1
            vm.send(conn, data)
            sent.append(data)
        elif action == "item":
            counter += 1
            unmap = Unmap(conn, counter)
            vm.send_item(conn, unmap)
            sent.append(unmap)
        else:
            taken = 0
            while taken < size and (item := host.pop(conn)) is not None:
                if isinstance(item, Data):
                    got.append(item.data)
                    host.take(conn, len(item.data))
                    taken += len(item.data)
                else:
                    got.append(item)
        deliver(vm, host)
        deliver(host, vm)
        state = host.live[conn]
        assert state.inbound_bytes + state.taken_unacked <= WINDOW
    for _ in range(1000):
        item = host.pop(conn)
        if item is None:
            if not vm.queued(conn) and not vm.live[conn].waiting:
                break
        elif isinstance(item, Data):
            got.append(item.data)
            host.take(conn, len(item.data))
        else:
            got.append(item)
        deliver(vm, host)
        deliver(host, vm)
    assert _joined(got) == _joined(sent)


def _joined(items: list[object]) -> list[object]:
    """Adjacent byte strings joined (frames split and merge bytes, never items)."""
    out: list[object] = []
    for item in items:
        if isinstance(item, bytes) and out and isinstance(out[-1], bytes):
            out[-1] = out[-1] + item
        else:
            out.append(item)
    return out
