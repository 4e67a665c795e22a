"""Connections multiplexed on the stream, sans-IO: order and back-pressure per connection.

Each Wayland connection between a client (VM side) and the compositor (host side)
is a numbered connection on the one stream. What it carries travels in order:
Wayland bytes (``DATA``) and, where an fd would travel, what the fd stands for
(``POOL``, ``FILE``, ``PIPE``), and on the VM side's way ``UNMAP``.

Back-pressure is per connection and direction, by credit: a side sends a
connection's bytes only while the peer has room for them (``WINDOW`` bytes at
first); the peer gives credit back with ``ACK`` as its local Wayland peer takes
the bytes. So a client or compositor that stops reading stops only its own
connection: the other side stops reading its local peer for that connection, and
every other connection goes on. A peer that sends past its credit breaks the
protocol (``StreamError``): the receiver never holds more than ``WINDOW`` bytes
per connection. The other items are few and small (or bounded by their own
limits) and carry no credit, but wait behind the bytes queued before them.

Connections are opened by the VM side with increasing ids, never reused; a side
closes a connection once (``CLOSE``), and frames that cross a ``CLOSE`` on the
way are dropped. Inputs are decoded frames and what the local peer took; outputs
are encoded frames to write and, per connection, the items received.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field

from .codec import (
    MAX_DATA,
    Ack,
    Close,
    Data,
    File,
    Open,
    Pipe,
    Pool,
    StreamError,
    Unmap,
    encode,
    encode_ack,
    encode_data,
    fit_text,
)

WINDOW = 512 * 1024
# Credit goes back once this much was taken, so that ACKs stay few.
ACK_EVERY = WINDOW // 4

# What a connection's inbound queue holds: bytes, or what an fd stands for.
Item = Data | Pool | File | Pipe | Unmap
# What may be sent in a connection's order besides bytes.
Sendable = Pool | File | Pipe | Unmap


@dataclass(eq=False)
class Connection:
    """One connection's state on this side."""

    conn: int
    credit: int = WINDOW  # bytes we may still send
    waiting: deque[bytes | Sendable] = field(default_factory=deque)  # beyond our credit
    waiting_bytes: int = 0
    inbound: deque[Item] = field(default_factory=deque)
    inbound_bytes: int = 0  # received, not yet taken by the local peer
    taken_unacked: int = 0  # taken by the local peer, credit not yet given back
    peer_closed: str | None = None  # the peer's CLOSE reason, once it came
    bytes_in: int = 0
    bytes_out: int = 0

    @property
    def ended(self) -> bool:
        """The peer closed and everything it sent was taken."""
        return self.peer_closed is not None and not self.inbound


class Connections:
    """Every connection of one side of the stream."""

    def __init__(self, *, opens: bool, window: int = WINDOW) -> None:
        """``opens``: this side opens connections (the VM side); the other side takes
        an ``OPEN`` for an id above every earlier one as a new connection."""
        self.opens = opens
        self.window = window
        self.live: dict[int, Connection] = {}
        self._highest = 0
        self._out: list[bytes] = []
        # Connections whose queue may move now that credit came back.
        self.unblocked: set[int] = set()

    # -- this side's actions ---------------------------------------------------------

    def open(self) -> int:
        """A new connection (VM side); its ``OPEN`` is queued."""
        assert self.opens
        self._highest += 1
        conn = self._highest
        self.live[conn] = Connection(conn, credit=self.window)
        self._out.append(encode(Open(conn)))
        return conn

    def send(self, conn: int, data: bytes | memoryview) -> None:
        """Queue Wayland bytes for ``conn``: what its credit allows goes now."""
        state = self.live[conn]
        if state.waiting:
            state.waiting.append(bytes(data))
            state.waiting_bytes += len(data)
            return
        sent = self._send_now(state, data)
        if sent < len(data):
            rest = bytes(data[sent:])
            state.waiting.append(rest)
            state.waiting_bytes += len(rest)

    def send_item(self, conn: int, item: Sendable) -> None:
        """Queue what an fd stands for (or an ``UNMAP``), behind the bytes before it."""
        state = self.live[conn]
        if state.waiting:
            state.waiting.append(item)
        else:
            self._out.append(encode(item))

    def queued(self, conn: int) -> int:
        """Bytes of ``conn`` waiting for credit."""
        state = self.live.get(conn)
        return 0 if state is None else state.waiting_bytes

    def take(self, conn: int, count: int) -> None:
        """The local peer took ``count`` bytes of ``conn``'s inbound data: credit goes
        back to the sender once enough was taken."""
        state = self.live.get(conn)
        if state is None:
            return
        state.taken_unacked += count
        if state.taken_unacked >= ACK_EVERY:
            self._out.append(encode_ack(conn, state.taken_unacked))
            state.taken_unacked = 0

    def close(self, conn: int, reason: str = "") -> None:
        """This side is done with ``conn``: its ``CLOSE`` is queued after whatever of
        its bytes still waits for credit (dropped: the peer is not reading them), and
        it is forgotten."""
        state = self.live.pop(conn, None)
        if state is None:
            return
        self.unblocked.discard(conn)
        if state.peer_closed is None:
            self._out.append(encode(Close(conn, fit_text(reason))))

    def output(self) -> list[bytes]:
        """Encoded frames to write to the stream, in order."""
        out, self._out = self._out, []
        return out

    # -- frames from the peer ---------------------------------------------------------

    def receive(self, frame: Item | Open | Close | Ack) -> None:
        """A connection frame from the peer."""
        conn = frame.conn
        if isinstance(frame, Open):
            if self.opens:
                raise StreamError(f"OPEN of connection {conn}: only the VM side opens "
                                  "connections")
            if conn <= self._highest:
                raise StreamError(f"OPEN of connection {conn}: ids only grow (the last "
                                  f"was {self._highest})")
            self._highest = conn
            self.live[conn] = Connection(conn, credit=self.window)
            return
        state = self.live.get(conn)
        if state is None:
            if conn > self._highest:
                raise StreamError(f"{type(frame).__name__.upper()} for connection {conn}, "
                                  "which was never opened")
            return  # crossed our CLOSE on the way
        if state.peer_closed is not None:
            raise StreamError(f"{type(frame).__name__.upper()} for connection {conn} after "
                              "its CLOSE")
        if isinstance(frame, Close):
            state.peer_closed = frame.reason
        elif isinstance(frame, Ack):
            self._credit(state, frame.count)
        else:
            if isinstance(frame, Data):
                size = len(frame.data)
                if state.inbound_bytes + state.taken_unacked + size > self.window:
                    raise StreamError(f"DATA for connection {conn} past its credit: "
                                      f"{state.inbound_bytes + state.taken_unacked + size} "
                                      f"bytes outstanding, the window is {self.window}")
                state.inbound_bytes += size
                state.bytes_in += size
            state.inbound.append(frame)

    def pop(self, conn: int) -> Item | None:
        """The next inbound item of ``conn``; the caller calls ``take`` for the bytes
        its local peer took."""
        state = self.live.get(conn)
        if state is None or not state.inbound:
            return None
        item = state.inbound.popleft()
        if isinstance(item, Data):
            state.inbound_bytes -= len(item.data)
        return item

    def unpop(self, conn: int, item: Data) -> None:
        """Put back the part of a DATA item the local peer did not take."""
        state = self.live[conn]
        state.inbound.appendleft(item)
        state.inbound_bytes += len(item.data)

    # -- internals -------------------------------------------------------------------------

    def _send_now(self, state: Connection, data: bytes | memoryview) -> int:
        sent = 0
        view = memoryview(data)
        while sent < len(view) and state.credit > 0:
            size = min(len(view) - sent, MAX_DATA, state.credit)
            self._out.append(encode_data(state.conn, view[sent:sent + size]))
            state.credit -= size
            state.bytes_out += size
            sent += size
        return sent

    def _credit(self, state: Connection, count: int) -> None:
        if state.credit + count > self.window:
            raise StreamError(f"ACK of {count} bytes for connection {state.conn}: more than "
                              f"was sent ({self.window - state.credit} outstanding)")
        state.credit += count
        while state.waiting:
            head = state.waiting[0]
            if isinstance(head, bytes):
                if state.credit == 0:
                    break
                sent = self._send_now(state, head)
                state.waiting_bytes -= sent
                if sent < len(head):
                    state.waiting[0] = head[sent:]
                    break
            else:
                self._out.append(encode(head))
            state.waiting.popleft()
        self.unblocked.add(state.conn)

    def take_unblocked(self) -> Iterable[int]:
        unblocked, self.unblocked = self.unblocked, set()
        return unblocked
