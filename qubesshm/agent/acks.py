"""The release rule of agent mode: when the GUI daemon can no longer map an area.

The daemon tells the agent nothing when it lets go of a dump. It lets go of a
window's dump on that window's next ``WINDOW_DUMP``, on ``UNMAP`` and on
``DESTROY`` (an ``xcb_shm_detach`` with no sync), and it answers every dump with
one ``WINDOW_DUMP_ACK``, in order, after mapping the new dump and syncing with
its X server. The X connection is one ordered stream, so when the ACK of a dump
the agent sent *after* the message that let an area go arrives, the X server has
processed that area's detach and unmapped it. Hence the rule:

    an area let go after the n-th dump was sent is released by the ACK of dump n+1.

When nothing is sent after a let-go, the agent sends a *barrier*: a dump of a
one-page window that is never mapped, whose only purpose is its ACK. Sans-IO:
the caller says what it sent and what arrived; tokens (areas) come back when
they are released, or all at once as *late* when the daemon is gone.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Generic, TypeVar

T = TypeVar("T")


class AckOutOfOrder(Exception):
    """The daemon acknowledged more dumps than it was sent: a broken peer."""


@dataclass
class AckOrder(Generic[T]):
    """The FIFO of dumps awaiting their ACK, and the areas each ACK releases.

    ``acks``: whether the daemon sends ACKs (protocol 1.7 and later). Without
    them nothing is ever released here; the caller's late timeout takes over.
    """

    acks: bool = True
    sent: int = 0  # dumps sent on this connection
    acked: int = 0  # ACKs received on this connection
    # (the dump whose ACK releases them, the areas), in order of that dump.
    _waiting: deque[tuple[int, list[T]]] = field(default_factory=deque)
    _sent_at: deque[float] = field(default_factory=deque)

    @property
    def in_flight(self) -> int:
        """Dumps sent and not yet acknowledged (none awaited from a daemon without ACKs)."""
        return self.sent - self.acked if self.acks else 0

    @property
    def pending(self) -> int:
        """Areas let go and not yet released."""
        return sum(len(tokens) for _, tokens in self._waiting)

    def dump_sent(self, now: float = 0.0) -> int:
        """A ``WINDOW_DUMP`` went out; returns its number (1 for the first)."""
        self.sent += 1
        if self.acks:
            self._sent_at.append(now)
        return self.sent

    def let_go(self, token: T) -> None:
        """``token`` stopped being current (next dump, ``UNMAP`` or ``DESTROY``
        sent just now): the next dump's ACK releases it."""
        target = self.sent + 1
        if self._waiting and self._waiting[-1][0] == target:
            self._waiting[-1][1].append(token)
        else:
            self._waiting.append((target, [token]))

    @property
    def needs_barrier(self) -> bool:
        """Some area waits for a dump that has not been sent: send a barrier."""
        return self.acks and bool(self._waiting) and self._waiting[-1][0] > self.sent

    def ack(self, now: float = 0.0) -> tuple[list[T], float | None]:
        """A ``WINDOW_DUMP_ACK`` arrived: the areas it releases, and how long the
        acknowledged dump waited for it."""
        if not self.acks or self.acked >= self.sent:
            raise AckOutOfOrder(
                f"the GUI daemon sent a WINDOW_DUMP_ACK with no dump awaiting one "
                f"({self.sent} sent, {self.acked} acknowledged)")
        self.acked += 1
        waited = now - self._sent_at.popleft() if self._sent_at else None
        released: list[T] = []
        while self._waiting and self._waiting[0][0] <= self.acked:
            released.extend(self._waiting.popleft()[1])
        return released, waited

    def forget(self, token: T) -> bool:
        """Stop waiting for ``token`` (the caller settled it another way)."""
        for _, tokens in self._waiting:
            if token in tokens:
                tokens.remove(token)
                return True
        return False

    def reset(self, *, acks: bool) -> list[T]:
        """The daemon went away (or a new one came): nothing pending will be
        acknowledged. Returns every area still waiting, now late; counting
        starts again for the next connection."""
        late = [token for _, tokens in self._waiting for token in tokens]
        self._waiting.clear()
        self._sent_at.clear()
        self.sent = self.acked = 0
        self.acks = acks
        return late
