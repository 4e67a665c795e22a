"""The stream's I/O (``qubesshm/stream/link.py``) when the other half goes first."""

from __future__ import annotations

import asyncio
import os

from qubesshm.stream.codec import VERSION, Hello, encode
from qubesshm.stream.link import StreamLink


def test_a_peer_gone_is_heard_out_before_the_stream_ends() -> None:
    """A host half that wrote something and exited at once: writing to it fails with
    EPIPE, yet what it wrote is read first, so its garbage is a protocol error (and a
    clean frame is handled) rather than a bare end of the stream."""
    for written, ending in ((b"hello world, this is not the stream\n", "broke the protocol"),
                            (encode(Hello(VERSION, VERSION, 0)), None)):
        loop = asyncio.new_event_loop()
        from_peer, peer_out = os.pipe()
        peer_in, to_peer = os.pipe()
        os.write(peer_out, written)
        os.close(peer_out)  # the peer exited: its output ends ...
        os.close(peer_in)  # ... and nobody reads what this side writes
        frames: list[object] = []
        ends: list[str | None] = []
        try:
            link = StreamLink(loop, from_peer, to_peer, on_frame=frames.append,
                              on_end=ends.append)
            link.send_frame(Hello(VERSION, VERSION, 1))  # EPIPE, before any read
            assert link.ended and len(ends) == 1, ends
            if ending is None:
                assert ends == [None] and [type(f) for f in frames] == [Hello]
            else:
                assert ends[0] is not None and ending in ends[0], ends
        finally:
            loop.close()
            os.close(from_peer)
            os.close(to_peer)
