"""The I/O layer: accepts clients, opens one compositor connection each, pumps bytes.

Everything protocol-related is decided by ``RelaySession``; this module only moves
bytes and fds between sockets with asyncio readers and writers, applies
backpressure (while a peer is not reading, the proxy stops reading what would
add to its queue; the session is dropped if that peer accepts nothing for
``stall_timeout`` seconds) and tears a session down when either end goes away.
It also chooses when: the proxy's own events (its delete_ids, its early releases)
wait for the compositor's answer to their batch when the session says they may
(``OWN_EVENTS_DELAY``), the grant cache is trimmed to its bound
once a step's output went, and pools the client is done with are closed a moment
after (``SPENT_POOL_DELAY``).
"""

from __future__ import annotations

import asyncio
import errno
import functools
import logging
import os
import socket
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ..grants.halves import GrantHalves
from ..grants.ledger import GrantLedger
from ..grants.lifetimes import GrantLifetimes, LifetimePolicy
from ..grants.mapping import peer_pid
from ..shm.clientpool import SPENT_POOL_DELAY
from ..wire.codec import DEFAULT_MAX_MESSAGE_SIZE, ErrorCode, WireError, encode_message
from ..wire.protocol import ProtocolTable
from .control import ControlSocket
from .listener import Listener
from .session import (
    DMABUF_INTERFACES,
    ERROR_MESSAGE_LIMIT,
    RelaySession,
    Segment,
    Step,
    abridge,
)
from .trace import ProtocolLog
from .transport import FdRefused, FdsTruncated, Peer, PeerClosed, PeerEnded, Transport

if TYPE_CHECKING:
    from ..stream.vmside import RemoteUpstream

log = logging.getLogger("qubesshm.relay")


DEFAULT_STALL_TIMEOUT = 10.0
# libwayland reads 4 KiB at a time; larger client reads let requests run ahead of
# the events they cause.
CLIENT_READ_SIZE = 4096
COMPOSITOR_READ_SIZE = 64 * 1024
COMPOSITOR_READS_PER_WAKEUP = 16
# How often to retry accept() after running out of file descriptors.
ACCEPT_RETRY_DELAY = 0.5
CONNECT_RETRY_DELAY = 0.01
# Reads of a departed client's last requests before the proxy closes.
DRAIN_READS = 256
# Requests read ahead while a commit waits for an output buffer.
BLOCKED_READ_LIMIT = 64 * 1024
# How often the simulated kernel's deferred-reclaim timer is looked at.
TICK_INTERVAL = 0.25
AWAITING_TICK_INTERVAL = 0.05
# Lines kept about clients the proxy ended, for run to repeat at exit.
ENDED_KEPT = 32
# The proxy's own events (the delete_ids of the pools and buffers it kept, the early
# releases) of a batch of requests that went upstream wait, where the session says
# they may (``Step.own_events_wait``), for the compositor's answer to that batch and go
# to the client in one write with it, as a compositor writes what one dispatch made at
# once: one wake-up of the client instead of two. At most this long.
OWN_EVENTS_DELAY = 0.001
_OUT_OF_RESOURCES = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)


@dataclass(frozen=True, slots=True)
class RelayOptions:
    max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE
    # Above this many queued bytes, or fds, towards a peer, stop reading what
    # would add to that queue.
    high_water: int = 256 * 1024
    high_water_fds: int = 256
    # A paused session whose slow peer accepts nothing for this long is dropped.
    stall_timeout: float = DEFAULT_STALL_TIMEOUT
    # How long a client waits for a compositor whose listen backlog is full.
    connect_timeout: float = 5.0
    # Relay zwp_linux_dmabuf_v1 (hidden by default: dma-buf cannot cross VMs).
    allow_dmabuf: bool = False


class ClientRelay:
    """One client, its compositor connection and the session between them."""

    def __init__(self, server: ProxyServer, number: int, client: socket.socket,
                 compositor: socket.socket | Peer) -> None:
        self.server = server
        self.number = number
        self.loop = server.loop
        self.client = Transport(client)
        # The compositor's socket, or (split proxy) a connection on the stream to the
        # host half, which the same calls drive.
        self.compositor: Peer = (
            Transport(compositor) if isinstance(compositor, socket.socket) else compositor)
        protocol_log = server.protocol_log
        self._flush_pending = False
        self.session = RelaySession(
            server.protocol,
            max_message_size=server.options.max_message_size,
            tracer=None if protocol_log is None else protocol_log.tracer(
                number, self._object_name),
            on_hidden_global=server.hidden_global,
            grants=server.lifetimes,
            owner=number,
            counters=(server.ledger.client(number), server.ledger.total),
            hidden_interfaces=(frozenset() if server.options.allow_dmabuf
                               else DMABUF_INTERFACES),
        )
        self._blocked = False
        self.closed = False
        # The last read of requests filled the read buffer: more are on their way.
        self._client_bursting = False
        # Reading the compositor's last words after a write to it failed.
        self._draining = False
        # Peers whose queue is over the high-water mark, and so block reading.
        self._backed_up: set[Peer] = set()
        self._reading: set[Peer] = set()
        self._waiting_to_write: set[Peer] = set()
        # Set once the session is over but the client still has bytes to read.
        self._finishing: str | None = None
        self._stall: dict[Peer, asyncio.TimerHandle] = {}
        self._spent_timer: asyncio.TimerHandle | None = None
        # The proxy's own events, waiting for the compositor's answer (OWN_EVENTS_DELAY).
        self._held_own_events: list[Segment] = []
        self._own_events_timer: asyncio.TimerHandle | None = None
        if self.session.shm is not None:
            self.session.shm.wake = self._wake
        self._update_readers()

    def _wake(self) -> None:
        """The proxy has requests of its own for this compositor connection."""
        if not self._flush_pending:
            self._flush_pending = True
            self.loop.call_soon(self._flush_later)

    def _flush_later(self) -> None:
        self._flush_pending = False
        self._run(self.session.flush)

    def poll(self) -> None:
        """Timer work of the session (output buffers the compositor holds too long)."""
        self._run(self.session.poll)

    def retry(self) -> None:
        """The limits may have room now: the commit waiting for it tries again."""
        if self.session.waiting_for_room:
            self._run(self.session.retry)

    def _run(self, make_step: Callable[[], Step]) -> None:
        """Apply what the session does outside any read."""
        if self.closed:
            return
        try:
            self._apply(make_step())
        except Exception:
            self._internal_error()

    def _internal_error(self) -> None:
        """A bug must cost one session, never the proxy and its other clients."""
        log.exception("client#%d: internal error", self.number)
        self.server.ended(self.number, "dropped: an internal error of qubesshm (above)")
        self.close("internal error")

    def _object_name(self, object_id: int) -> str:
        obj = self.session.objects.get(object_id)
        return f"{obj}" if obj is not None else f"[unknown]@{object_id}"

    def _name(self, transport: Peer) -> str:
        return "client" if transport is self.client else "compositor"

    # -- reading -------------------------------------------------------------

    def _wanted_readers(self) -> set[Peer]:
        if self.closed or self._finishing is not None:
            return set()
        wanted = {self.client, self.compositor}
        if self.client in self._backed_up:
            # Events are piling up for a client that does not read them: stop
            # taking them, and stop taking the requests that cause more.
            wanted.clear()
        if self.compositor in self._backed_up:
            wanted.discard(self.client)
        elif self.session.blocked and self.session.request_backlog >= BLOCKED_READ_LIMIT:
            # A commit waits for the compositor to release a buffer, and the requests
            # behind it wait with it; reading goes on up to a bound, so that a client
            # hanging up meanwhile is noticed and its grants let go.
            wanted.discard(self.client)
        return wanted

    def _update_readers(self) -> None:
        """Register with the selector exactly the transports we may read now."""
        wanted = self._wanted_readers()
        for transport in self._reading - wanted:
            transport.unwatch_readable(self.loop)
        for transport in wanted - self._reading:
            transport.watch_readable(self.loop, functools.partial(self._readable, transport))
        self._reading = wanted

    def _readable(self, source: Peer) -> None:
        try:
            # A libwayland compositor drops a client whose events back up, and requests
            # make events: so while the client is sending faster than one small read
            # takes, drain the compositor before each read of requests. Otherwise the
            # compositor is read when it is readable, not on the chance that it is.
            if source is self.compositor or self._client_bursting:
                for _ in range(COMPOSITOR_READS_PER_WAKEUP):
                    if self._pump(self.compositor) < COMPOSITOR_READ_SIZE:
                        # A short read: the socket held no more (or the kernel
                        # stopped at a message's fds, and the loop wakes us again).
                        break
            if source is self.client:
                self._client_bursting = self._pump(self.client) >= CLIENT_READ_SIZE
        except Exception:
            self._internal_error()

    def pump_client(self) -> bool:
        """Read and relay once from the client; True if it sent anything."""
        try:
            return self._pump(self.client) > 0
        except Exception:
            self._internal_error()
            return False

    def _pump(self, source: Peer, *, draining: bool = False) -> int:
        """Read once from ``source`` and relay; how many bytes came (0: none, or the
        peer is gone)."""
        if source not in self._reading and not draining:
            return 0
        is_client = source is self.client
        try:
            got = source.receive(CLIENT_READ_SIZE if is_client else COMPOSITOR_READ_SIZE)
        except PeerClosed as exc:
            step = self.session.client_eof() if is_client else self.session.compositor_eof()
            self._apply(step)
            if isinstance(exc, PeerEnded) and exc.reason and not self.closed:
                # The host half ended the connection for a reason the client must hear.
                self.server.ended(self.number, exc.reason)
                self._send(self.client, [(display_error(self.server.protocol, WireError(
                    f"qubesshm: {exc.reason}", ErrorCode.IMPLEMENTATION)), [])])
            if is_client:
                self.close("client hung up")
            else:
                # The client still gets the compositor's last words (often an error).
                self.finish("compositor hung up")
            return 0
        except FdsTruncated as exc:
            if is_client:
                self._fail_client(WireError(str(exc), ErrorCode.NO_MEMORY))
            else:
                self.finish(f"compositor: {exc}")
            return 0
        if got is None:
            return 0
        data, fds = got
        step = (self.session.from_client(data, fds) if is_client
                else self.session.from_compositor(data, fds))
        self._apply(step)
        return len(data)

    def _hold_own_events(self, step: Step) -> None:
        """The proxy's own events wait for the compositor's answer where the session
        says they may; else they go ahead of what the step has for the client."""
        if step.own_events_wait:
            self._held_own_events += step.own_events
            if self._own_events_timer is None:
                self._own_events_timer = self.loop.call_later(OWN_EVENTS_DELAY,
                                                              self._send_own_events)
        else:
            step.to_client = step.own_events + step.to_client
        step.own_events = []

    def _take_own_events(self) -> list[Segment]:
        if self._own_events_timer is not None:
            self._own_events_timer.cancel()
            self._own_events_timer = None
        held, self._held_own_events = self._held_own_events, []
        return held

    def _send_own_events(self) -> None:
        """No answer came in time: the proxy's own events go alone."""
        self._own_events_timer = None
        self._send(self.client, self._take_own_events())

    def _apply(self, step: Step) -> None:
        if step.own_events:
            self._hold_own_events(step)
        for fd in step.discarded_fds:
            os.close(fd)
        self._send(self.compositor, step.to_compositor)
        self._send(self.client, step.to_client)
        lifetimes = self.server.lifetimes
        if lifetimes is not None and lifetimes.trim_due:
            # Areas given back in this step wait for the cache's bound until now: off
            # the path of the replies just sent (the bound is a file read away), and
            # before the next take, which would trim first, on the client's path.
            lifetimes.trim()
        if self.session.spent and self._spent_timer is None and not self.closed:
            self._spent_timer = self.loop.call_later(SPENT_POOL_DELAY, self._close_spent)
        if (self.session.blocked or self._blocked) and not self.closed:
            # The session relays the requests read while blocked itself, in the step
            # that unblocks it; here only what may be read changes.
            self._blocked = self.session.blocked
            self._update_readers()
        if step.error is not None and not self.closed:
            who = "client" if step.client_at_fault else "compositor"
            self.server.ended(self.number, f"{who} protocol error: {step.error}")
            self.finish(f"{who} protocol error")

    def _close_spent(self) -> None:
        self._spent_timer = None
        if self.closed:
            return
        try:
            self.session.close_spent()
        except Exception:
            self._internal_error()

    def _fail_client(self, error: WireError) -> None:
        self._send(self.client, [(display_error(self.server.protocol, error), [])])
        self._apply(Step(error=error, client_at_fault=True))

    # -- writing -------------------------------------------------------------

    def _send(self, dest: Peer, segments: list[Segment]) -> None:
        if dest is self.client and segments and self._held_own_events:
            segments = ahead(self._take_own_events(), segments)  # made first, sent first
        if self.closed or dest.closed or (self._draining and dest is self.compositor):
            for _, fds in segments:
                for fd in fds:
                    os.close(fd)
            return
        if not segments:
            return
        try:
            drained = dest.send(segments)
        except PeerClosed:
            self._peer_gone(dest)
            return
        except FdRefused as exc:
            # A client passed an fd that cannot cross to the GUI domain.
            self._fail_client(WireError(f"qubesshm: {exc}", ErrorCode.IMPLEMENTATION))
            return
        if drained and not self._waiting_to_write and not self._backed_up \
                and self._finishing is None:
            return  # the hot path: everything went, nothing to re-register
        self._after_flush(dest, drained)

    def _writable(self, dest: Peer) -> None:
        before = dest.queued_bytes
        try:
            drained = dest.flush()
        except PeerClosed:
            self._peer_gone(dest)
            return
        self._after_flush(dest, drained)
        if not self.closed and dest in self._stall and dest.queued_bytes < before:
            self._arm_stall(dest)  # progress: the peer is slow, not stuck

    def _peer_gone(self, dest: Peer) -> None:
        if dest is self.compositor and self._finishing is None:
            self._drain_compositor()
            self.finish("compositor hung up")
        else:
            self.close(f"{self._name(dest)} hung up")

    def _drain_compositor(self) -> None:
        """The compositor hung up while the proxy wrote to it: what it sent before
        (often the protocol error it hung up over) still goes to the client, as a
        libwayland client would read it after its own write failed."""
        if self._draining:
            return
        self._draining = True
        for _ in range(DRAIN_READS):
            if (self.closed or self._finishing is not None
                    or self._pump(self.compositor, draining=True) == 0):
                break

    def _after_flush(self, dest: Peer, drained: bool) -> None:
        """Follow a send with selector registrations and backpressure."""
        if self.closed:
            return
        # Registering with the selector costs a syscall, so only on state changes.
        if drained:
            if dest in self._waiting_to_write:
                self._waiting_to_write.discard(dest)
                dest.unwatch_writable(self.loop)
        elif dest not in self._waiting_to_write:
            self._waiting_to_write.add(dest)
            dest.watch_writable(self.loop, functools.partial(self._writable, dest))
        if self._finishing is not None:
            if drained:
                self.close(self._finishing)
            return
        options = self.server.options
        backed_up = (dest.queued_bytes > options.high_water
                     or dest.queued_fds > options.high_water_fds)
        if backed_up and dest not in self._backed_up:
            self._backed_up.add(dest)
            self._arm_stall(dest)
            self._update_readers()
        elif not backed_up and dest in self._backed_up:
            self._backed_up.discard(dest)
            self._disarm_stall(dest)
            self._update_readers()

    def _arm_stall(self, dest: Peer) -> None:
        self._disarm_stall(dest)
        self._stall[dest] = self.loop.call_later(
            self.server.options.stall_timeout, self._stalled, dest)

    def _disarm_stall(self, dest: Peer) -> None:
        handle = self._stall.pop(dest, None)
        if handle is not None:
            handle.cancel()

    def _stalled(self, dest: Peer) -> None:
        self._stall.pop(dest, None)
        reason = (f"{self._name(dest)} stopped reading: {dest.queued_bytes} bytes queued "
                  f"for {self.server.options.stall_timeout:g} s")
        self.server.ended(self.number, f"dropped: {reason}")
        self.close(reason)

    # -- ending --------------------------------------------------------------

    def finish(self, reason: str) -> None:
        """End the session once the client has read what is queued for it.

        The compositor side closes now; the client side stays open, unread, until
        its queue drains or it accepts nothing for ``stall_timeout`` seconds.
        """
        if self.closed or self._finishing is not None:
            return
        if self._held_own_events:
            self._send(self.client, self._take_own_events())
        self._finishing = reason
        self._update_readers()
        for dest in list(self._stall):
            self._disarm_stall(dest)
        self._backed_up.clear()
        if self.compositor in self._waiting_to_write:
            self._waiting_to_write.discard(self.compositor)
            self.compositor.unwatch_writable(self.loop)
        self.compositor.close()
        self._arm_stall(self.client)
        try:
            drained = self.client.flush()
        except PeerClosed:
            self.close(reason)
            return
        self._after_flush(self.client, drained)

    def close(self, reason: str) -> None:
        if self.closed:
            return
        self.closed = True
        log.info("client#%d: closed (%s)", self.number, reason)
        for handle in self._stall.values():
            handle.cancel()
        self._stall.clear()
        if self._spent_timer is not None:
            self._spent_timer.cancel()  # the session's end closes the spent pools
            self._spent_timer = None
        self._send(self.client, self._take_own_events())  # closed: only their fds close
        self._update_readers()
        for transport in self._waiting_to_write:
            transport.unwatch_writable(self.loop)
        self._waiting_to_write.clear()
        self.client.close()
        self.compositor.close()
        for fd in self.session.unclaimed_fds():
            os.close(fd)
        self.session.end()
        self.server.forget(self)


# A proxy's upstream connection is bound to an abstract address naming the chain of
# qubesshm proxies it went through, so the next proxy sees it (getpeername) and a
# chain that comes back to a proxy is refused instead of growing without end.
HOP_PREFIX = b"\0qubesshm-hops:"
MAX_HOPS = 8


def proxy_chain(client: socket.socket) -> list[int]:
    """Pids of the qubesshm proxies a client connection came through (none: a client)."""
    try:
        name = client.getpeername()
    except OSError:
        return []
    if not isinstance(name, bytes | str):
        return []
    raw = name.encode("latin-1") if isinstance(name, str) else name
    if not raw.startswith(HOP_PREFIX):
        return []
    pids = raw[len(HOP_PREFIX):].split(b":", 1)[0]
    try:
        return [int(p) for p in pids.split(b",") if p]
    except ValueError:
        return []


def _loop_reason(chain: list[int]) -> str | None:
    if os.getpid() in chain:
        return ("proxy loop: this connection already came through this proxy (qubesshm "
                f"pids {', '.join(map(str, chain))}); point one of them at the compositor")
    if len(chain) >= MAX_HOPS:
        return f"proxy loop: {len(chain)} qubesshm proxies in a row"
    return None


def _name_upstream(upstream: socket.socket, chain: list[int], number: int) -> None:
    pids = ",".join(map(str, [*chain, os.getpid()])).encode()
    for attempt in range(4):
        try:
            upstream.bind(HOP_PREFIX + pids + f":{number}.{attempt}.{id(upstream)}".encode())
            return
        except OSError:
            continue  # a name in use: another attempt, else the connection stays unnamed


def ahead(first: list[Segment], then: list[Segment]) -> list[Segment]:
    """``first`` sent before ``then``. The proxy's own events carry no fds, so they go in
    one segment with the first of ``then`` (whose fds then travel with bytes before their
    message, as fds may): a single segment takes the transport's one-``sendmsg`` path."""
    if not then or any(fds for _, fds in first):
        return first + then
    data, fds = then[0]
    return [(b"".join([*(d for d, _ in first), data]), fds), *then[1:]]


def display_error(protocol: ProtocolTable, error: WireError) -> bytes:
    """The ``wl_display.error`` event telling a client what it did wrong."""
    data, _ = encode_message(1, protocol["wl_display"].events[0],
                             [error.object_id, int(error.code),
                              abridge(error.message, ERROR_MESSAGE_LIMIT)])
    return data


class ProxyServer:
    """Accepts clients on a ``Listener`` and relays each to the compositor."""

    def __init__(
        self,
        protocol: ProtocolTable,
        listener: Listener,
        upstream: Path,
        *,
        options: RelayOptions | None = None,
        protocol_log: ProtocolLog | None = None,
        grants: GrantHalves | None = None,
        ledger: GrantLedger | None = None,
        policy: LifetimePolicy | None = None,
        remote: RemoteUpstream | None = None,
    ) -> None:
        self.protocol = protocol
        # Without grants this is the plain validating relay (the socket-level tests
        # drive it so); qubesshm serve and run always give it grants.
        self.grants = grants
        self.ledger = ledger or GrantLedger()
        # A split proxy: each client's compositor connection is one on this stream to
        # the host half, which maps the grants; the areas notify on its one port.
        self.remote = remote
        self.lifetimes: GrantLifetimes | None = None
        if grants is not None and remote is not None:
            from ..grants.remote import RemoteLifetimes

            self.lifetimes = RemoteLifetimes(grants, remote.port, policy,
                                             clock=time.monotonic)
        elif grants is not None:
            self.lifetimes = GrantLifetimes(grants, policy, clock=time.monotonic)
        self.listener = listener
        self.upstream = upstream
        self.options = options or RelayOptions()
        self.protocol_log = protocol_log
        self.loop = asyncio.get_running_loop()
        self.clients: set[ClientRelay] = set()
        self._connecting: set[socket.socket] = set()
        self._waiting_for_fds: deque[tuple[int, socket.socket]] = deque()
        self._next_number = 1
        # One line per client the proxy ended or refused (a protocol error, a stall):
        # the most recent ones (a long-running serve must not keep them all), and a count.
        self.ended_clients: deque[str] = deque(maxlen=ENDED_KEPT)
        self.ended_count = 0
        self._hidden_logged: set[str] = set()
        self._accept_retry: asyncio.TimerHandle | None = None
        self.loop.add_reader(listener.fileno(), self._accept)
        self._tick_handle: asyncio.TimerHandle | None = None
        # The stats socket, set by whoever starts the proxy; closed with it.
        self.control: ControlSocket | None = None
        self._room_pending = False
        if self.lifetimes is not None:
            self.lifetimes.on_room = self._room
            self.loop.add_reader(self.lifetimes.event_fd, self._grant_event)
            self._tick_handle = self.loop.call_later(TICK_INTERVAL, self._tick)

    def _room(self) -> None:
        """Pages were given back or ended: commits waiting for room try again, once
        the work that freed them is done."""
        if not self._room_pending:
            self._room_pending = True
            self.loop.call_soon(self._retry_waiting)

    def _retry_waiting(self) -> None:
        self._room_pending = False
        for relay in sorted(self.clients, key=lambda r: r.number):
            relay.retry()

    def _grant_event(self) -> None:
        """An unmap notify fired: end the grants whose mappings are gone."""
        assert self.lifetimes is not None
        try:
            self.lifetimes.on_event()
        except Exception:
            log.exception("handling an unmap notify failed")

    def _tick(self) -> None:
        """Timers of the grant layer: late releases, free_per_iteration, and the
        simulated kernel's deferred reclaim and its look at the compositor's mmaps."""
        assert self.grants is not None and self.lifetimes is not None
        try:
            self.grants.tick()
            self.lifetimes.poll()
        except Exception:
            # The timer must outlive one bad tick, or deferred grants are never reclaimed.
            log.exception("the grant layer's timer failed")
        for relay in list(self.clients):
            relay.poll()
        # Room also comes without a page of ours moving: the kernel's deferred reclaim
        # frees grant table entries, tune raises the gntalloc limit.
        self._retry_waiting()
        # While areas wait for their notify, the simulated kernel looks at the
        # compositor's mmaps often: the real one would notify at once.
        interval = AWAITING_TICK_INTERVAL if self.lifetimes.awaiting else TICK_INTERVAL
        self._tick_handle = self.loop.call_later(interval, self._tick)

    async def settle(self, timeout: float) -> None:
        """Close every client and wait, at most ``timeout`` seconds, for the
        compositor to let go of their grants, so the exit summary is the truth."""
        for relay in list(self.clients):
            relay.close("proxy shutting down")
        if self.lifetimes is None:
            return
        deadline = self.loop.time() + timeout
        while self.lifetimes.awaiting and self.loop.time() < deadline:
            await asyncio.sleep(AWAITING_TICK_INTERVAL)

    def ended(self, number: int, why: str, *, level: int = logging.WARNING) -> None:
        """The proxy ended or refused client ``number``: logged now, and kept for whoever
        started the proxy (``run`` says it again once its command has exited)."""
        line = f"client#{number}: {why}"
        self.ended_clients.append(line)
        self.ended_count += 1
        log.log(level, "%s", line)

    def hidden_global(self, interface: str, version: int) -> None:
        if interface not in self._hidden_logged:
            self._hidden_logged.add(interface)
            log.info("hiding global %s (version %d): no protocol XML for it", interface,
                     version)

    def _accept(self) -> None:
        try:
            client, _ = self.listener.sock.accept()
        except (BlockingIOError, InterruptedError, ConnectionAbortedError):
            return
        except OSError as exc:
            if exc.errno not in _OUT_OF_RESOURCES:
                raise
            # The connection stays in the backlog.
            self._pause_accepting(exc)
            return
        number = self._next_number
        self._next_number += 1
        self._start_upstream(number, client)

    def _start_upstream(self, number: int, client: socket.socket, *,
                        retry: bool = False) -> bool:
        if self.remote is not None:
            return self._start_remote(number, client)
        try:
            upstream = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        except OSError as exc:
            if exc.errno not in _OUT_OF_RESOURCES:
                raise
            # Accepted but no fd for its compositor connection: it waits, first in line.
            if retry:
                self._waiting_for_fds.appendleft((number, client))
            else:
                self._waiting_for_fds.append((number, client))
            self._pause_accepting(exc)
            return False
        upstream.setblocking(False)
        chain = proxy_chain(client)
        loop = _loop_reason(chain)
        if loop is not None:
            self._connecting.add(client)
            self._refuse(number, client, upstream, reason=loop)
            return True
        _name_upstream(upstream, chain, number)
        self._connecting.add(client)
        self._connect(number, client, upstream, self.loop.time() + self.options.connect_timeout)
        return True

    def _start_remote(self, number: int, client: socket.socket) -> bool:
        """A split proxy's client: its compositor connection is one on the stream."""
        assert self.remote is not None
        if self.remote.ended is not None:
            self._connecting.add(client)
            self._refuse_client(number, client, f"the GUI domain's half is gone: "
                                f"{self.remote.ended}")
            return True
        log.info("client#%d: connected (through the stream)", number)
        self.clients.add(ClientRelay(self, number, client, self.remote.open_channel()))
        return True

    def _pause_accepting(self, exc: OSError) -> None:
        """Out of fds: a readable listener would spin the loop, so look again later."""
        if self._accept_retry is not None:
            return
        log.error("cannot accept a client: %s; retrying in %g s", exc, ACCEPT_RETRY_DELAY)
        self.loop.remove_reader(self.listener.fileno())
        self._accept_retry = self.loop.call_later(ACCEPT_RETRY_DELAY, self._resume_accepting)

    def _resume_accepting(self) -> None:
        self._accept_retry = None
        while self._waiting_for_fds:
            number, client = self._waiting_for_fds.popleft()
            if not self._start_upstream(number, client, retry=True):
                return
        self.loop.add_reader(self.listener.fileno(), self._accept)

    def _connect(self, number: int, client: socket.socket, upstream: socket.socket,
                 deadline: float) -> None:
        if client not in self._connecting:
            upstream.close()  # the proxy is shutting down
            return
        try:
            upstream.connect(str(self.upstream))
        except (BlockingIOError, InterruptedError) as exc:
            # A Unix socket says EAGAIN while the compositor's backlog is full; a
            # client connecting directly would wait, so wait without blocking.
            if self.loop.time() < deadline:
                self.loop.call_later(CONNECT_RETRY_DELAY, self._connect, number, client,
                                     upstream, deadline)
                return
            self._refuse(number, client, upstream, exc)
            return
        except OSError as exc:
            self._refuse(number, client, upstream, exc)
            return
        if self.grants is not None:
            try:
                self.grants.watch_compositor(peer_pid(upstream))
            except OSError as exc:
                self._refuse(number, client, upstream, reason=exc.strerror or str(exc))
                return
        self._connecting.discard(client)
        log.info("client#%d: connected", number)
        self.clients.add(ClientRelay(self, number, client, upstream))

    def _refuse(self, number: int, client: socket.socket, upstream: socket.socket,
                exc: OSError | None = None, *, reason: str = "") -> None:
        upstream.close()
        if exc is not None:
            reason = f"cannot reach the compositor at {self.upstream}: {exc.strerror or exc}"
        self._refuse_client(number, client, reason)

    def _refuse_client(self, number: int, client: socket.socket, reason: str) -> None:
        self._connecting.discard(client)
        self.ended(number, reason, level=logging.ERROR)
        message = f"qubesshm: {reason}"
        try:
            client.setblocking(False)
            client.send(display_error(self.protocol,
                                      WireError(message, ErrorCode.IMPLEMENTATION)))
        except OSError:
            pass
        client.close()

    def drain_clients(self) -> None:
        """Relay what clients sent before they went away (``run``'s command exited):
        their last requests are in their sockets, ahead of the hang-up."""
        for relay in list(self.clients):
            for _ in range(DRAIN_READS):
                if relay.closed or not relay.pump_client():
                    break

    def forget(self, relay: ClientRelay) -> None:
        self.clients.discard(relay)
        self.ledger.forget(relay.number)

    def close(self) -> None:
        if self.control is not None:
            self.control.close()
            self.control = None
        if self._tick_handle is not None:
            self._tick_handle.cancel()
        if self.lifetimes is not None:
            self.loop.remove_reader(self.lifetimes.event_fd)
        if self._accept_retry is not None:
            self._accept_retry.cancel()
        else:
            self.loop.remove_reader(self.listener.fileno())
        for client in self._connecting:
            client.close()
        self._connecting.clear()
        for _, client in self._waiting_for_fds:
            client.close()
        self._waiting_for_fds.clear()
        for relay in list(self.clients):
            relay.close("proxy shutting down")
        if self.lifetimes is not None:
            self.lifetimes.close()
        self.listener.close()
