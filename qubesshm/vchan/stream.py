"""What every vchan transport offers the agent: a byte stream, a listener, two errors.

A vchan is a reliable ordered byte stream between two domains; the GUI protocol
runs over it with no framing of its own. The socket vchan (off Xen) and libvchan-xen
both end up behind ``VchanStream``: ``read`` returns what is there (``b""`` once the
peer is gone), ``write`` queues, ``drain`` waits until the queue is in the
transport's hands, ``close`` ends it. A ``VchanListener`` hands out one peer
connection at a time, as the agent serves one GUI daemon at a time.
"""

from __future__ import annotations

from typing import Protocol


class VchanError(RuntimeError):
    """A vchan cannot be set up; the message is one line naming the cause and a fix."""


class VchanClosed(ConnectionError):
    """The stream was closed (by us, or the peer went away) while data was queued."""


class VchanStream(Protocol):
    """A connected vchan, either end."""

    async def read(self, n: int = 65536) -> bytes:
        """Up to ``n`` bytes, waiting for at least one; ``b""`` once the peer is gone."""
        ...

    def write(self, data: bytes | bytearray | memoryview) -> None:
        """Queue ``data``; raises ``VchanClosed`` after ``close``."""
        ...

    async def drain(self) -> None:
        """Wait until queued data is handed to the transport; ``VchanClosed`` if it
        cannot be any more."""
        ...

    def close(self) -> None:
        """End the connection (idempotent); the peer reads EOF."""
        ...


class VchanListener(Protocol):
    """The server end of a vchan address: one connection at a time."""

    async def accept(self) -> VchanStream:
        """The next peer, once the previous stream (if any) has been closed."""
        ...

    def close(self) -> None:
        """Stop listening (idempotent)."""
        ...
