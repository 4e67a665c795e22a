"""The ACK-order release rule (qubesshm/agent/acks.py) against a model of the daemon."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from qubesshm.agent.acks import AckOrder, AckOutOfOrder


def test_an_area_let_go_is_released_by_the_ack_of_the_next_dump_not_an_earlier_one() -> None:
    order: AckOrder[str] = AckOrder()
    order.dump_sent()  # dump 1 (window A, area a1)
    order.dump_sent()  # dump 2 (window B)
    order.let_go("a1")  # A's next dump: let go of a1 ...
    order.dump_sent()  # ... dump 3
    assert order.ack()[0] == []  # ACK 1
    assert order.ack()[0] == []  # ACK 2: dump 2 went out before the let-go
    assert order.ack()[0] == ["a1"]  # ACK 3
    assert order.pending == 0


def test_a_let_go_with_nothing_sent_after_it_asks_for_a_barrier() -> None:
    order: AckOrder[str] = AckOrder()
    order.dump_sent()
    assert not order.needs_barrier
    order.let_go("a")  # UNMAP
    assert order.needs_barrier
    order.dump_sent()  # the barrier
    assert not order.needs_barrier
    assert order.ack()[0] == []
    assert order.ack()[0] == ["a"]


def test_ack_latency_is_measured_per_dump() -> None:
    order: AckOrder[str] = AckOrder()
    order.dump_sent(10.0)
    order.dump_sent(11.0)
    assert order.ack(10.5)[1] == pytest.approx(0.5)
    assert order.ack(13.0)[1] == pytest.approx(2.0)


def test_an_ack_for_no_dump_is_refused() -> None:
    order: AckOrder[str] = AckOrder()
    with pytest.raises(AckOutOfOrder, match="no dump awaiting"):
        order.ack()


def test_without_acks_nothing_is_ever_released_and_reset_returns_all_late() -> None:
    order: AckOrder[str] = AckOrder(acks=False)
    order.dump_sent()
    order.let_go("a")
    order.dump_sent()
    assert not order.needs_barrier
    with pytest.raises(AckOutOfOrder):
        order.ack()
    assert order.reset(acks=True) == ["a"]
    assert order.sent == order.acked == 0 and order.acks


def test_forget_settles_a_token_another_way() -> None:
    order: AckOrder[str] = AckOrder()
    order.let_go("a")
    order.let_go("b")
    assert order.forget("a") and not order.forget("a")
    order.dump_sent()
    assert order.ack()[0] == ["b"]


# A model of the real daemon: each dump maps its area; the window's next dump, or an
# unmap, lets the previous one go *before* the new one is ACKed; ACKs come in order.
ops = st.lists(st.tuples(st.sampled_from(["dump", "unmap", "ack"]), st.integers(0, 3)),
               max_size=60)


@given(ops)
def test_no_area_is_released_while_the_modelled_daemon_may_still_map_it(
        script: list[tuple[str, int]]) -> None:
    order: AckOrder[tuple[int, int]] = AckOrder()
    current: dict[int, tuple[int, int]] = {}  # window -> its area, agent's view
    queue: list[tuple[str, int, tuple[int, int] | None]] = []  # sent, not yet processed
    daemon_current: dict[int, tuple[int, int]] = {}
    mapped: set[tuple[int, int]] = set()
    released: set[tuple[int, int]] = set()
    serial = 0

    def daemon_process_one() -> bool:
        """The daemon reads one message; returns True when it was a dump (ACK due)."""
        kind, window, area = queue.pop(0)
        old = daemon_current.pop(window, None)
        if old is not None:
            mapped.discard(old)  # detach, processed by X before any later sync
        if kind == "dump":
            assert area is not None
            daemon_current[window] = area
            mapped.add(area)
            return True
        return False

    def send(kind: str, window: int, area: tuple[int, int] | None) -> None:
        queue.append((kind, window, area))
        if kind == "dump":
            order.dump_sent()

    for op, window in script:
        if op == "dump":
            serial += 1
            area = (window, serial)
            old = current.get(window)
            current[window] = area
            send("dump", window, area)
            if old is not None:
                order.let_go(old)
        elif op == "unmap" and window in current:
            send("unmap", window, None)
            order.let_go(current.pop(window))
        elif op == "ack" and order.in_flight:
            if order.needs_barrier:
                serial += 1
                send("dump", 99, (99, serial))  # barrier window's dump
            while not daemon_process_one():
                pass
            for token in order.ack()[0]:
                assert token not in mapped, f"{token} released while mapped"
                released.add(token)
    assert not (released & set(current.values()))
