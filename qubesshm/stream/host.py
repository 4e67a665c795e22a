"""The host half of a split proxy: beside the compositor, in the GUI domain.

``qubesshm host`` reads the stream on stdin and writes it on stdout (so it can be
a qrexec service). For each connection the VM side opens it connects to the local
compositor once, writes the connection's bytes there and sends back what the
compositor answers. Where the VM side sent a pool it maps the refs (gntdev, or
the simulated hypervisor's hypercalls), arms the unmap notify on the mapping (the
area's notify byte cleared, and an event on the stream's one event channel,
bound to the port the VM side allocated) and hands the compositor a fresh fd of
exactly the pool's pages; ``UNMAP`` (or the connection's end) lets go of it. A
file or pipe end the compositor sends goes to the VM side as what it stands for.

The VM side is the less trusted one: every frame is checked (the codec checks
each length and field; here, that a pool's domain is the VM's, its id new, its
pages within what this side maps for one stream) and a connection whose frames
are refused is closed with the reason, which the VM side tells its client. A
malformed stream ends the stream, and with it every connection and mapping.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from ..grants.api import GrantBackend
from ..grants.mapping import Mapping, MappingHalf, peer_pid
from ..relay.transport import MAX_FDS_PER_SENDMSG, FdsTruncated, PeerClosed, Transport
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
from .connections import Connections
from .fds import UnsupportedFd
from .link import StreamLink
from .pipes import PipeRelays, TooManyPipes
from .standins import fd_for, item_for

log = logging.getLogger("qubesshm.host")

# Pages one stream may have mapped at once: 8 GiB, far more than any screenful of
# windows, and a bound on what a hostile VM can make the GUI domain map.
DEFAULT_MAX_PAGES = 1 << 21
COMPOSITOR_READ_SIZE = 64 * 1024
# What stands for fds (pools, files, pipe ends) waits for the bytes it travels with:
# at most this many per connection (an honest VM side sends a message's fds just
# before its bytes, and no more than one recvmsg of its client's brings: SCM_MAX_FD).
MAX_PENDING_FDS = 253
# Clients of one VM connected at once: each costs a compositor connection.
MAX_CONNECTIONS = 1024
CONNECT_TIMEOUT = 5.0
CONNECT_RETRY = 0.01

# Opens the mapping side once the VM has said its domain id.
BackendOpener = Callable[[int], GrantBackend]


def _one_line(text: str) -> str:
    """The VM side's text for this side's log: what is not printable escaped, so that
    it cannot start a line (or move a terminal's cursor) of its own."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


@dataclass(eq=False)
class HostConnection:
    """One client's connection to the compositor, on this side."""

    conn: int
    transport: Transport | None = None
    pending_fds: list[int] = field(default_factory=list)  # for the next bytes
    pools: dict[int, Mapping] = field(default_factory=dict)
    given: int = 0  # bytes handed to the transport
    acked: int = 0  # of those, credited back to the VM side
    reading: bool = False
    writing: bool = False
    eof: bool = False  # the compositor hung up: close once its last words went


@dataclass
class HostCounters:
    connections: int = 0
    refused: int = 0
    pools_mapped: int = 0
    pools_unmapped: int = 0
    pages_mapped: int = 0  # now
    peak_pages_mapped: int = 0
    files: int = 0


class HostHalf:
    """The stream's far end: connections to the compositor, mappings, pipes."""

    def __init__(self, loop: asyncio.AbstractEventLoop, read_fd: int, write_fd: int, *,
                 upstream: Path, own_domid: int, open_backend: BackendOpener,
                 peer_domid: int | None = None, max_pages: int = DEFAULT_MAX_PAGES) -> None:
        self.loop = loop
        self.upstream = upstream
        self.own_domid = own_domid
        self.peer_domid = peer_domid  # pinned by the command line, or by the VM's hello
        self.open_backend = open_backend
        self.max_pages = max_pages
        self.conns = Connections(opens=False)
        self.link = StreamLink(loop, read_fd, write_fd, on_frame=self._frame,
                               on_end=self._ended)
        self.pipes = PipeRelays(loop, self.link.send, vm_side=False)
        self.backend: GrantBackend | None = None
        self.mapping: MappingHalf | None = None
        self.port: int | None = None
        self.version: int | None = None
        self.connections: dict[int, HostConnection] = {}
        self._pool_ids: set[int] = set()
        self._watched: set[int] = set()
        self.counters = HostCounters()
        self.done: asyncio.Future[str | None] = loop.create_future()
        self.link.send_frame(Hello(VERSION, VERSION, own_domid))

    def snapshot(self) -> dict[str, object]:
        """The host half's counters, as ``qubesshm stats --json`` prints them."""
        c = self.counters
        return {
            "half": "host",
            "vm_domid": self.peer_domid,
            "version": self.version,
            "backend": None if self.backend is None else self.backend.name,
            "upstream": str(self.upstream),
            "connections": len(self.connections),
            "connections_served": c.connections,
            "refused": c.refused,
            "pools": {"mapped": sum(len(x.pools) for x in self.connections.values()),
                      "mapped_total": c.pools_mapped, "unmapped_total": c.pools_unmapped},
            "pages": {"mapped": c.pages_mapped, "peak_mapped": c.peak_pages_mapped,
                      "max": self.max_pages},
            "files": c.files,
            "pipes": {"live": self.pipes.live, "total": self.pipes.transfers,
                      "bytes": self.pipes.bytes_relayed},
            "stream": {"bytes_in": self.link.bytes_in, "bytes_out": self.link.bytes_out,
                       "frames_in": self.link.frames_in, "queued": self.link.queued},
        }

    # -- frames from the VM side ----------------------------------------------------------

    def _frame(self, frame: Frame) -> None:
        if isinstance(frame, Hello):
            self._hello(frame)
            return
        if self.version is None:
            raise StreamError(f"{type(frame).__name__.upper()} before HELLO")
        if isinstance(frame, Channel):
            self._channel(frame.port)
        elif isinstance(frame, Open):
            self.conns.receive(frame)
            self._open(frame.conn)
        elif isinstance(frame, Data | Pool | Unmap | File | Pipe | Close | Ack):
            self.conns.receive(frame)
            connection = self.connections.get(frame.conn)
            if isinstance(frame, Ack):
                for conn in self.conns.take_unblocked():
                    unblocked = self.connections.get(conn)
                    if unblocked is not None:
                        self._after_credit(unblocked)
            elif connection is not None:
                self._drain_inbound(connection)
        elif isinstance(frame, PipeData | PipeClosed | PipeAck):
            self.pipes.frame(frame)
        elif isinstance(frame, Error):
            self.link.close()
            self._ended(f"the VM side reported an error: {_one_line(frame.text)}")
        self.flush()

    def _hello(self, hello: Hello) -> None:
        if self.version is not None:
            raise StreamError("a second HELLO")
        self.version = negotiate(VERSION, VERSION, hello)
        if self.peer_domid is not None and hello.domid != self.peer_domid:
            raise StreamError(f"HELLO from domain {hello.domid}, but this host serves "
                              f"domain {self.peer_domid}")
        self.peer_domid = hello.domid
        try:
            self.backend = self.open_backend(hello.domid)
        except (OSError, RuntimeError) as exc:
            self._fatal(f"cannot open the mapping side for domain {hello.domid}: {exc}")
            return
        self.mapping = MappingHalf(self.backend)
        log.info("the VM side is domain %d (protocol version %d)", hello.domid, self.version)

    def _channel(self, port: int) -> None:
        if self.port is not None:
            raise StreamError("a second CHANNEL")
        assert self.mapping is not None and self.peer_domid is not None
        try:
            self.port = self.mapping.connect_channel(self.peer_domid, port)
        except OSError as exc:
            raise StreamError(f"CHANNEL: cannot bind port {port} of domain "
                              f"{self.peer_domid}: {exc.strerror or exc}") from exc

    # -- connections ------------------------------------------------------------------------

    def _open(self, conn: int) -> None:
        connection = HostConnection(conn)
        self.connections[conn] = connection
        self.counters.connections += 1
        if len(self.connections) > MAX_CONNECTIONS:
            self._refuse(connection, f"more than {MAX_CONNECTIONS} clients of this VM at once "
                         "(each is a connection to the compositor)")
            return
        try:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC
                                 | socket.SOCK_NONBLOCK)
        except OSError as exc:
            self._refuse(connection, f"cannot reach the compositor at {self.upstream}: "
                         f"{exc.strerror or exc}")
            return
        self._connect(connection, sock, self.loop.time() + CONNECT_TIMEOUT)

    def _connect(self, connection: HostConnection, sock: socket.socket,
                 deadline: float) -> None:
        if self.connections.get(connection.conn) is not connection:
            sock.close()
            return
        try:
            sock.connect(str(self.upstream))
        except (BlockingIOError, InterruptedError):
            if self.loop.time() < deadline:
                self.loop.call_later(CONNECT_RETRY, self._connect, connection, sock, deadline)
                return
            sock.close()
            self._refuse(connection, f"cannot reach the compositor at {self.upstream}: its "
                         "listen backlog stayed full")
            return
        except OSError as exc:
            sock.close()
            self._refuse(connection, f"cannot reach the compositor at {self.upstream}: "
                         f"{exc.strerror or exc}")
            return
        pid = peer_pid(sock)
        if pid is not None and self.backend is not None and pid not in self._watched:
            try:
                self.backend.watch(pid)
            except OSError as exc:
                sock.close()
                self._refuse(connection, f"the simulated hypervisor cannot watch the "
                             f"compositor (process {pid}): {exc.strerror or exc}")
                return
            self._watched.add(pid)
        connection.transport = Transport(sock)
        self._update(connection)
        try:
            # What the VM side sent while this connected (from a timer, when the
            # compositor's backlog was full: no frame handler catches for it here).
            self._drain_inbound(connection)
        except StreamError as exc:
            self.link.fail(str(exc))
            return
        self.flush()

    def _drain_inbound(self, connection: HostConnection) -> None:
        """Hand the compositor what the VM side sent, in order, fds with their bytes."""
        transport = connection.transport
        if transport is None:
            return  # still connecting: it waits (within the connection's credit)
        conn = connection.conn
        while True:
            if transport.queued_bytes:
                # The compositor is behind: what follows waits in the connection's
                # window, where the VM side's credit bounds it.
                break
            item = self.conns.pop(conn)
            if item is None:
                break
            if isinstance(item, Data):
                fds, connection.pending_fds = connection.pending_fds, []
                if len(fds) > MAX_FDS_PER_SENDMSG * len(item.data):
                    for fd in fds:
                        os.close(fd)
                    self._refuse(connection, f"{len(fds)} fds ride on {len(item.data)} "
                                 f"byte(s): at most {MAX_FDS_PER_SENDMSG} per byte reach the "
                                 "compositor")
                    return
                try:
                    transport.send([(item.data, fds)])
                except PeerClosed:
                    self._compositor_gone(connection)
                    return
                connection.given += len(item.data)
            elif len(connection.pending_fds) >= MAX_PENDING_FDS and not isinstance(
                    item, Unmap):
                self._refuse(connection, f"more than {MAX_PENDING_FDS} pools, files or pipe "
                             "ends wait for the bytes they travel with")
                return
            elif isinstance(item, Pool):
                pool_fd = self._map(connection, item)
                if pool_fd is None:
                    return
                connection.pending_fds.append(pool_fd)
            elif isinstance(item, Unmap):
                if not self._unmap(connection, item.pool_id):
                    return
            else:
                try:
                    fd = fd_for(item, self.pipes)
                except OSError as exc:
                    self._refuse(connection, f"cannot make the {type(item).__name__.lower()} "
                                 f"for the compositor: {exc.strerror or exc}")
                    return
                connection.pending_fds.append(fd)
                if isinstance(item, File):
                    self.counters.files += 1
        state = self.conns.live.get(conn)
        if state is not None and state.ended:
            self._close(connection)
            return
        self._account(connection)
        self._update(connection)

    def _account(self, connection: HostConnection) -> None:
        """Credit back what left for the compositor."""
        transport = connection.transport
        if transport is None:
            return
        sent = connection.given - transport.queued_bytes
        if sent > connection.acked:
            self.conns.take(connection.conn, sent - connection.acked)
            connection.acked = sent

    def _update(self, connection: HostConnection) -> None:
        """Read the compositor while the VM side has room; write while bytes wait."""
        transport = connection.transport
        if transport is None or transport.closed:
            return
        want_read = not connection.eof and self.conns.queued(connection.conn) == 0
        if want_read != connection.reading:
            connection.reading = want_read
            if want_read:
                transport.watch_readable(self.loop, lambda: self._readable(connection))
            else:
                transport.unwatch_readable(self.loop)
        want_write = transport.queued_bytes > 0
        if want_write != connection.writing:
            connection.writing = want_write
            if want_write:
                transport.watch_writable(self.loop, lambda: self._writable(connection))
            else:
                transport.unwatch_writable(self.loop)

    def _writable(self, connection: HostConnection) -> None:
        transport = connection.transport
        assert transport is not None
        try:
            transport.flush()
        except PeerClosed:
            self._compositor_gone(connection)
            return
        self._account(connection)
        if not transport.queued_bytes:
            try:
                self._drain_inbound(connection)
            except StreamError as exc:
                self.link.fail(str(exc))
                return
        self._update(connection)
        self.flush()

    def _readable(self, connection: HostConnection) -> None:
        transport = connection.transport
        assert transport is not None
        try:
            got = transport.receive(COMPOSITOR_READ_SIZE)
        except (PeerClosed, FdsTruncated):
            self._compositor_gone(connection)
            return
        if got is None:
            return
        data, fds = got
        conn = connection.conn
        for index, fd in enumerate(fds):
            try:
                item = item_for(conn, fd, self.pipes)
                if isinstance(item, File):
                    self.counters.files += 1
                self.conns.send_item(conn, item)
            except (UnsupportedFd, TooManyPipes) as exc:
                for rest in fds[index + 1:]:
                    os.close(rest)
                self._refuse(connection, f"the compositor sent {exc}, which cannot "
                             "cross to the VM")
                return
            finally:
                os.close(fd)
        self.conns.send(conn, data)
        self._update(connection)
        self.flush()

    def _after_credit(self, connection: HostConnection) -> None:
        if connection.eof and self.conns.queued(connection.conn) == 0:
            self._close(connection)
        else:
            self._update(connection)

    def _compositor_gone(self, connection: HostConnection) -> None:
        """The compositor hung up: its last words go to the VM side, then CLOSE."""
        connection.eof = True
        if self.conns.queued(connection.conn) == 0:
            self._close(connection)
        else:
            self._update(connection)
        self.flush()

    # -- pools --------------------------------------------------------------------------------

    def _map(self, connection: HostConnection, pool: Pool) -> int | None:
        """The compositor's fd for ``pool``, its notify armed; None if refused."""
        assert self.mapping is not None
        if pool.domid != self.peer_domid:
            self._refuse(connection, f"pool {pool.pool_id} names domain {pool.domid}, not "
                         f"the VM's ({self.peer_domid})")
            return None
        if pool.pool_id in self._pool_ids:
            self._refuse(connection, f"pool {pool.pool_id} is already mapped")
            return None
        pages = len(pool.refs)
        if self.counters.pages_mapped + pages > self.max_pages:
            self._refuse(connection, f"pool {pool.pool_id} of {pages} pages would pass the "
                         f"{self.max_pages} pages this host maps for one VM (--max-pages)")
            return None
        try:
            mapped = self.mapping.map(pool.domid, pool.refs, notify_byte=pool.notify_offset,
                                      notify_port=self.port)
        except OSError as exc:
            self._refuse(connection, f"cannot map pool {pool.pool_id} ({pages} pages): "
                         f"{exc.strerror or exc}")
            return None
        try:
            fd = mapped.pool_fd()
        except OSError as exc:
            self.mapping.unmap(mapped)
            self._refuse(connection, f"cannot map pool {pool.pool_id} ({pages} pages): "
                         f"{exc.strerror or exc}")
            return None
        connection.pools[pool.pool_id] = mapped
        self._pool_ids.add(pool.pool_id)
        self.counters.pools_mapped += 1
        self.counters.pages_mapped += pages
        self.counters.peak_pages_mapped = max(self.counters.peak_pages_mapped,
                                              self.counters.pages_mapped)
        return fd

    def _unmap(self, connection: HostConnection, pool_id: int) -> bool:
        mapped = connection.pools.pop(pool_id, None)
        if mapped is None:
            self._refuse(connection, f"UNMAP of pool {pool_id}, which this connection has "
                         "not mapped")
            return False
        self._let_go(pool_id, mapped)
        return True

    def _let_go(self, pool_id: int, mapped: Mapping) -> None:
        assert self.mapping is not None
        self._pool_ids.discard(pool_id)
        self.counters.pools_unmapped += 1
        self.counters.pages_mapped -= mapped.pages
        try:
            self.mapping.unmap(mapped)
        except OSError as exc:
            log.error("cannot unmap pool %d: %s", pool_id, exc.strerror or exc)

    # -- ending -------------------------------------------------------------------------------

    def _refuse(self, connection: HostConnection, reason: str) -> None:
        """The VM side's frames for ``connection`` cannot be served: it ends with
        ``reason`` (the VM side tells its client)."""
        log.warning("connection %d: %s", connection.conn, reason)
        self.counters.refused += 1
        self._close(connection, reason)

    def _close(self, connection: HostConnection, reason: str = "") -> None:
        if self.connections.pop(connection.conn, None) is None:
            return
        for fd in connection.pending_fds:
            os.close(fd)
        connection.pending_fds.clear()
        transport = connection.transport
        if transport is not None and not transport.closed:
            if connection.reading:
                transport.unwatch_readable(self.loop)
            if connection.writing:
                transport.unwatch_writable(self.loop)
            connection.reading = connection.writing = False
            transport.close()
        for pool_id, mapped in list(connection.pools.items()):
            self._let_go(pool_id, mapped)
        connection.pools.clear()
        # Inbound items not handed over yet hold nothing (fds are made when handed over).
        self.conns.close(connection.conn, reason)
        self.flush()

    def flush(self) -> None:
        self.link.send(self.conns.output())

    def _fatal(self, reason: str) -> None:
        """This side cannot go on (not the VM side's fault): it is told why, and the
        stream ends."""
        self.link.abort(reason)

    def _ended(self, reason: str | None) -> None:
        """The stream is over: every connection, mapping and pipe goes."""
        for connection in list(self.connections.values()):
            self._close(connection)
        self.pipes.close()
        if self.mapping is not None and self.port is not None:
            with contextlib.suppress(OSError):
                self.mapping.close_channel(self.port)
            self.port = None
        if not self.done.done():
            self.done.set_result(reason)

    def close(self) -> None:
        """Everything this half holds goes, the backend last."""
        self.link.close()
        self._ended(None)
        if self.backend is not None:
            self.backend.close()
            self.backend = None

