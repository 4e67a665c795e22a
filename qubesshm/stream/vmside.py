"""The VM side of a split proxy: each client's compositor connection is one on the stream.

``serve --remote`` relays clients exactly as ``serve`` does, with one change of
transport: where a client's session would write to and read from a compositor
socket, it writes to and reads from a ``ChannelTransport``, a connection on the
stream to the host half. Fds become what they stand for on the way out (a pool
placeholder its description, a pipe end a relayed pipe, a readable file its
bytes; anything else is refused and the client told why) and back again on the
way in (a file a sealed memfd, a pipe a local stand-in). ``RemoteUpstream`` owns
the stream: it greets the host, hands out channels, and ends every one of them
with the reason when the stream ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shlex
import socket
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..grants.remote import RemoteMappingHalf, RemotePool
from ..relay.transport import FdRefused, PeerClosed, PeerEnded
from .codec import (
    VERSION,
    Ack,
    Channel,
    Close,
    Data,
    Error,
    File,
    Frame,
    Hello,
    Open,
    Pipe,
    PipeAck,
    PipeClosed,
    PipeData,
    Pool,
    StreamError,
    Unmap,
    negotiate,
)
from .connections import Connections, Sendable
from .fds import UnsupportedFd
from .link import StreamLink
from .pipes import PipeRelays, TooManyPipes
from .standins import fd_for, item_for

if TYPE_CHECKING:
    from ..grants.halves import GrantHalves

log = logging.getLogger("qubesshm.stream")

# Where the host half finds the simulated hypervisor's hypercalls (the simulation's
# stand-in for the Xen the two domains share).
HYPERVISOR_ENV = "QUBESSHM_SIM_HYPERVISOR"
EXIT_WAIT = 5.0


class RemoteError(Exception):
    """The host half could not be reached or greeted; one line."""


@dataclass
class HostInfo:
    """What the host said in its greeting."""

    version: int
    domid: int


@dataclass
class Reached:
    """The stream to the host half, once reached."""

    read_fd: int
    write_fd: int
    process: subprocess.Popen[bytes] | None
    what: str  # names the host half in messages


async def reach_host(command: str | None, socket_path: str | None,
                     grants: GrantHalves) -> Reached:
    """Start ``command`` with the stream on its stdin and stdout, or connect to the
    stream at ``socket_path``. The simulated hypervisor's hypercall socket is passed
    on in the environment."""
    if command:
        argv = shlex.split(command)
        env = dict(os.environ)
        if grants.hypercalls is not None:
            env[HYPERVISOR_ENV] = str(grants.hypercalls.path)
        try:
            process = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                       env=env, close_fds=True)
        except OSError as exc:
            raise RemoteError(f"cannot start the host half (--remote {command!r}): "
                              f"{exc.strerror or exc}") from exc
        assert process.stdin is not None and process.stdout is not None
        read_fd, write_fd = os.dup(process.stdout.fileno()), os.dup(process.stdin.fileno())
        process.stdout.close()
        process.stdin.close()
        return Reached(read_fd, write_fd, process, f"the host half ({argv[0]}, process "
                       f"{process.pid})")
    assert socket_path
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        sock.connect(socket_path)
    except OSError as exc:
        sock.close()
        raise RemoteError(f"cannot reach the host half at {socket_path} "
                          f"({exc.strerror or exc}): start it there, or give --remote CMD") \
            from exc
    fd = sock.detach()
    return Reached(fd, os.dup(fd), None, f"the host half at {socket_path}")


class ChannelTransport:
    """One client's compositor connection, carried on the stream (a ``Transport``'s
    interface, as ``ClientRelay`` uses it)."""

    def __init__(self, upstream: RemoteUpstream, conn: int) -> None:
        self.upstream = upstream
        self.conn = conn
        self.closed = False
        self.queued_fds = 0
        self._reader: Callable[[], None] | None = None
        self._writer: Callable[[], None] | None = None
        self._read_scheduled = False
        self._write_scheduled = False

    @property
    def queued_bytes(self) -> int:
        return self.upstream.conns.queued(self.conn)

    # -- readiness, as the event loop would report it for a socket -----------------

    def watch_readable(self, loop: asyncio.AbstractEventLoop,
                       callback: Callable[[], None]) -> None:
        self._reader = callback
        self.kick_reader()

    def unwatch_readable(self, loop: asyncio.AbstractEventLoop) -> None:
        self._reader = None

    def watch_writable(self, loop: asyncio.AbstractEventLoop,
                       callback: Callable[[], None]) -> None:
        self._writer = callback
        if self.queued_bytes == 0:
            self.kick_writer()

    def unwatch_writable(self, loop: asyncio.AbstractEventLoop) -> None:
        self._writer = None

    def readable(self) -> bool:
        if self.upstream.ended is not None:
            return True
        state = self.upstream.conns.live.get(self.conn)
        return state is not None and (bool(state.inbound) or state.peer_closed is not None)

    def kick_reader(self) -> None:
        if self._reader is not None and not self._read_scheduled and self.readable():
            self._read_scheduled = True
            self.upstream.loop.call_soon(self._call_reader)

    def kick_writer(self) -> None:
        if self._writer is not None and not self._write_scheduled:
            self._write_scheduled = True
            self.upstream.loop.call_soon(self._call_writer)

    def _call_reader(self) -> None:
        self._read_scheduled = False
        if self._reader is not None and not self.closed:
            self._reader()
            self.kick_reader()  # level-triggered, as a socket's readiness is

    def _call_writer(self) -> None:
        self._write_scheduled = False
        if self._writer is not None and not self.closed:
            self._writer()

    # -- the Transport interface ------------------------------------------------------

    def receive(self, size: int) -> tuple[bytes, list[int]] | None:
        """Bytes and fds from the compositor, as far as they came; None if none;
        ``PeerClosed`` once the host closed the connection or the stream ended."""
        up = self.upstream
        conns = up.conns
        data = bytearray()
        fds: list[int] = []
        try:
            while len(data) < size:
                item = conns.pop(self.conn)
                if item is None:
                    break
                if isinstance(item, Data):
                    room = size - len(data)
                    if len(item.data) > room:
                        conns.unpop(self.conn, Data(self.conn, item.data[room:]))
                        data += item.data[:room]
                        break
                    data += item.data
                elif isinstance(item, File | Pipe):
                    fds.append(fd_for(item, up.pipes))
                else:
                    raise StreamError(f"{type(item).__name__.upper()} from the host, which "
                                      "only the VM side sends")
        except (StreamError, OSError) as exc:
            for fd in fds:
                os.close(fd)
            up.fail(str(exc))
            raise PeerClosed(up.ended or str(exc)) from exc
        if data:
            conns.take(self.conn, len(data))
            up.flush()
        if data or fds:
            return bytes(data), fds
        state = conns.live.get(self.conn)
        if state is not None and state.peer_closed is not None:
            raise PeerEnded(state.peer_closed)
        if up.ended is not None:
            raise PeerEnded(f"the GUI domain's half is gone: {up.ended}")
        return None

    def send(self, segments: list[tuple[bytes, list[int]]]) -> bool:
        """Queue requests for the compositor; True once none wait for credit."""
        up = self.upstream
        if up.ended is not None:
            for _, fds in segments:
                for fd in fds:
                    os.close(fd)
            raise PeerClosed(up.ended)
        for data, fds in segments:
            items: list[Sendable] = []
            try:
                for fd in fds:
                    items.append(up.stand_for(self.conn, fd))
            except FdRefused:
                # None of the message's fds goes: a pipe already taken is let go.
                for item in items:
                    if isinstance(item, Pipe):
                        up.pipes.discard(item.pipe_id)
                raise
            finally:
                for fd in fds:
                    os.close(fd)
            for item in items:
                up.conns.send_item(self.conn, item)
            up.conns.send(self.conn, data)
        up.flush()
        return self.queued_bytes == 0

    def flush(self) -> bool:
        return self.queued_bytes == 0

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self._reader = self._writer = None
        self.upstream.close_channel(self)


class RemoteUpstream:
    """The VM side's end of the stream: greeting, channels, pools and pipes."""

    def __init__(self, loop: asyncio.AbstractEventLoop, read_fd: int, write_fd: int,
                 mapping: RemoteMappingHalf, own_domid: int, *, what: str,
                 process: subprocess.Popen[bytes] | None = None) -> None:
        self.loop = loop
        self.what = what  # names the other half in messages
        self.process = process  # the host half, when this side started it
        self.port = 0  # the event channel port the host binds, once allocated
        self.mapping = mapping
        self.own_domid = own_domid
        mapping.on_unmap = self._unmapped
        self.conns = Connections(opens=True)
        self.link = StreamLink(loop, read_fd, write_fd, on_frame=self._frame,
                               on_end=self._ended)
        self.pipes = PipeRelays(loop, self.link.send, vm_side=True)
        self.channels: dict[int, ChannelTransport] = {}
        self.host: HostInfo | None = None
        self.ended: str | None = None
        self._greeted = loop.create_future()
        # Told once when the stream ends (the proxy stops): the reason.
        self.on_end: Callable[[str], None] | None = None
        self.unmaps_sent = 0
        self.pools_sent = 0
        self.link.send_frame(Hello(VERSION, VERSION, own_domid))

    def snapshot(self) -> dict[str, object]:
        """The stream as the VM side sees it, for ``qubesshm stats``."""
        return {
            "host": self.what,
            "host_domid": None if self.host is None else self.host.domid,
            "version": None if self.host is None else self.host.version,
            "ended": self.ended,
            "connections": len(self.channels),
            "pools_sent": self.pools_sent,
            "unmaps_sent": self.unmaps_sent,
            "pipes": {"live": self.pipes.live, "total": self.pipes.transfers,
                      "bytes": self.pipes.bytes_relayed},
            "bytes_in": self.link.bytes_in,
            "bytes_out": self.link.bytes_out,
            "queued": self.link.queued,
        }

    async def greeted(self, timeout: float) -> HostInfo:
        """Wait for the host's greeting."""
        try:
            return await asyncio.wait_for(asyncio.shield(self._greeted), timeout)
        except TimeoutError as exc:
            raise RemoteError(f"{self.what} did not answer within {timeout:g} s") from exc

    def start_channel(self, port: int) -> None:
        """Tell the host the port to bind its unmap notifies to."""
        self.link.send_frame(Channel(port))

    # -- channels ------------------------------------------------------------------------

    def open_channel(self) -> ChannelTransport:
        conn = self.conns.open()
        channel = ChannelTransport(self, conn)
        self.channels[conn] = channel
        self.flush()
        return channel

    def close_channel(self, channel: ChannelTransport) -> None:
        self.channels.pop(channel.conn, None)
        if self.ended is None:
            self.conns.close(channel.conn)
            self.flush()

    def stand_for(self, conn: int, fd: int) -> Sendable:
        """What ``fd``, passed by a client on ``conn``, stands for on the stream."""
        pool = self.mapping.describe(fd)
        if pool is not None:
            if pool.conn and pool.conn != conn:
                raise FdRefused(f"pool {pool.pool_id} is already on another connection")
            pool.conn = conn
            self.pools_sent += 1
            return Pool(conn, pool.domid, pool.pool_id, pool.size, pool.notify_offset,
                        pool.refs)
        try:
            return item_for(conn, fd, self.pipes)
        except (UnsupportedFd, TooManyPipes) as exc:
            raise FdRefused(f"{exc}: only pipes and readable files can cross to the GUI "
                            "domain") from exc

    def _unmapped(self, pool: RemotePool) -> None:
        if pool.conn and pool.conn in self.conns.live and self.ended is None:
            self.conns.send_item(pool.conn, Unmap(pool.conn, pool.pool_id))
            self.unmaps_sent += 1
            self.flush()

    def flush(self) -> None:
        self.link.send(self.conns.output())

    # -- frames from the host ----------------------------------------------------------

    def _frame(self, frame: Frame) -> None:
        if isinstance(frame, Hello):
            if self.host is not None:
                raise StreamError("a second HELLO")
            version = negotiate(VERSION, VERSION, frame)
            self.host = HostInfo(version, frame.domid)
            if not self._greeted.done():
                self._greeted.set_result(self.host)
            return
        if self.host is None:
            raise StreamError(f"{type(frame).__name__.upper()} before HELLO")
        if isinstance(frame, Data | Close | Ack | File | Pipe):
            self.conns.receive(frame)
            channel = self.channels.get(frame.conn)
            if isinstance(frame, Ack):
                for conn in self.conns.take_unblocked():
                    waiting = self.channels.get(conn)
                    if waiting is not None:
                        waiting.kick_writer()
                self.flush()
            elif channel is not None:
                channel.kick_reader()
            return
        if isinstance(frame, PipeData | PipeClosed | PipeAck):
            self.pipes.frame(frame)
            return
        if isinstance(frame, Error):
            self.link.close()
            self._ended(f"{self.what} reported an error: {frame.text}")
            return
        assert isinstance(frame, Channel | Open | Pool | Unmap)
        raise StreamError(f"{type(frame).__name__.upper()} from the host, which only the VM "
                          "side sends")

    def fail(self, reason: str) -> None:
        self.link.fail(reason)

    def _ended(self, reason: str | None) -> None:
        if self.ended is not None:
            return
        self.ended = reason or f"{self.what} closed the stream"
        status = None if self.process is None else self.process.poll()
        if status is not None:
            self.ended += f" (it exited with status {status})"
        if not self._greeted.done():
            self._greeted.set_exception(RemoteError(self.ended))
        self.pipes.close()
        for channel in list(self.channels.values()):
            channel.kick_reader()
        if self.on_end is not None:
            self.on_end(self.ended)

    async def aclose(self, *, give_up: bool = False) -> None:
        """Stop (the proxy exits): what is queued is written (for a moment), the stream
        closes, and the host half, when this side started it, is waited for.
        ``give_up``: it never answered as it should; it is terminated at once."""
        if self.ended is None and not give_up:
            await self.link.drain(1.0)
        self.close()
        process = self.process
        if process is None:
            return
        if give_up and process.poll() is None:
            process.terminate()
        deadline = self.loop.time() + EXIT_WAIT
        while process.poll() is None and self.loop.time() < deadline:
            await asyncio.sleep(0.02)
        if process.poll() is None:
            log.warning("%s did not exit %g s after the stream closed: killed", self.what,
                        EXIT_WAIT)
            process.kill()
            process.wait()

    def close(self) -> None:
        """Stop (the proxy exits): the stream closes; the host ends every connection."""
        self.link.close()
        self.pipes.close()
        with contextlib.suppress(OSError):
            os.close(self.link.write_fd)
        if self.link.read_fd != self.link.write_fd:
            with contextlib.suppress(OSError):
                os.close(self.link.read_fd)
        if self.ended is None:
            self.ended = "the proxy stopped"

