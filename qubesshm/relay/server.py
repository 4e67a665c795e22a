"""The I/O layer: accepts clients, opens one compositor connection each, pumps bytes.

Everything protocol-related is decided by ``RelaySession``; this module only moves
bytes and fds between sockets with asyncio readers and writers, applies
backpressure (a side whose peer stops reading is paused, and the session is
dropped if that peer accepts nothing for ``stall_timeout`` seconds) and tears a
session down when either end goes away.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from dataclasses import dataclass
from pathlib import Path

from ..wire.codec import DEFAULT_MAX_MESSAGE_SIZE, ErrorCode, WireError, encode_message
from ..wire.protocol import ProtocolTable
from .listener import Listener
from .session import RelaySession, Segment, Step
from .trace import ProtocolLog
from .transport import FdsTruncated, PeerClosed, Transport

log = logging.getLogger("qubesshm.relay")


DEFAULT_STALL_TIMEOUT = 10.0
# libwayland reads 4 KiB at a time; larger client reads let requests run ahead of
# the events they cause.
CLIENT_READ_SIZE = 4096
COMPOSITOR_READ_SIZE = 64 * 1024
COMPOSITOR_READS_PER_WAKEUP = 16


@dataclass(frozen=True, slots=True)
class RelayOptions:
    max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE
    # Above this many queued bytes towards a peer, stop reading from the other one.
    high_water: int = 256 * 1024
    # A paused session whose slow peer accepts nothing for this long is dropped.
    stall_timeout: float = DEFAULT_STALL_TIMEOUT
    connect_timeout: float = 5.0


class ClientRelay:
    """One client, its compositor connection and the session between them."""

    def __init__(self, server: ProxyServer, number: int, client: socket.socket,
                 compositor: socket.socket) -> None:
        self.server = server
        self.number = number
        self.loop = server.loop
        self.client = Transport(client)
        self.compositor = Transport(compositor)
        protocol_log = server.protocol_log
        self.session = RelaySession(
            server.protocol,
            max_message_size=server.options.max_message_size,
            tracer=None if protocol_log is None else protocol_log.tracer(
                number, self._object_name),
            on_hidden_global=server.hidden_global,
        )
        self.closed = False
        self._paused: set[Transport] = set()
        self._waiting_to_write: set[Transport] = set()
        # Set once the session is over but the client still has bytes to read.
        self._finishing: str | None = None
        self._stall: dict[Transport, asyncio.TimerHandle] = {}
        self.loop.add_reader(self.client.fileno(), self._readable, self.client)
        self.loop.add_reader(self.compositor.fileno(), self._readable, self.compositor)

    def _object_name(self, object_id: int) -> str:
        obj = self.session.objects.get(object_id)
        return f"{obj}" if obj is not None else f"[unknown]@{object_id}"

    def _other(self, transport: Transport) -> Transport:
        return self.compositor if transport is self.client else self.client

    def _readable(self, source: Transport) -> None:
        try:
            # A libwayland compositor drops a client whose events back up, and
            # requests make events: so always drain the compositor first, and take
            # requests in small reads.
            for _ in range(COMPOSITOR_READS_PER_WAKEUP):
                if not self._pump(self.compositor):
                    break
            if source is self.client:
                self._pump(self.client)
        except Exception:
            # A bug must cost one session, never the proxy and its other clients.
            log.exception("client#%d: internal error", self.number)
            self.close("internal error")

    def _pump(self, source: Transport) -> bool:
        """Read once from ``source`` and relay; True if more may be waiting there."""
        if self.closed or self._finishing is not None or source in self._paused:
            return False
        if source is self.client and self.compositor in self._paused:
            # The client is not reading its events; more requests would only make
            # more events for the compositor to back up on.
            return False
        is_client = source is self.client
        try:
            got = source.receive(CLIENT_READ_SIZE if is_client else COMPOSITOR_READ_SIZE)
        except PeerClosed:
            step = self.session.client_eof() if is_client else self.session.compositor_eof()
            self._apply(step)
            if is_client:
                self.close("client hung up")
            else:
                # The client still gets the compositor's last words (often an error).
                self.finish("compositor hung up")
            return False
        except FdsTruncated as exc:
            if is_client:
                self._fail_client(WireError(str(exc), ErrorCode.NO_MEMORY))
            else:
                self.close(f"compositor: {exc}")
            return False
        if got is None:
            return False
        data, fds = got
        step = (self.session.from_client(data, fds) if is_client
                else self.session.from_compositor(data, fds))
        self._apply(step)
        return True

    def _apply(self, step: Step) -> None:
        self._send(self.compositor, step.to_compositor)
        self._send(self.client, step.to_client)
        if step.error is not None and not self.closed:
            who = "client" if step.client_at_fault else "compositor"
            log.warning("client#%d: %s protocol error: %s", self.number, who, step.error)
            self.finish(f"{who} protocol error")

    def _fail_client(self, error: WireError) -> None:
        data = display_error(self.server.protocol, error)
        self._send(self.client, [(data, [])])
        self._apply(Step(error=error, client_at_fault=True))

    def _send(self, dest: Transport, segments: list[Segment]) -> None:
        if self.closed or dest.closed:
            for _, fds in segments:
                for fd in fds:
                    os.close(fd)
            return
        if not segments:
            return
        try:
            drained = dest.send(segments)
        except PeerClosed:
            self.close(f"{'client' if dest is self.client else 'compositor'} hung up")
            return
        if drained and not self._waiting_to_write and not self._paused \
                and self._finishing is None:
            return  # the hot path: everything went, nothing to re-register
        self._after_flush(dest, drained)

    def _try_flush(self, dest: Transport) -> None:
        if self.closed:
            return
        try:
            drained = dest.flush()
        except PeerClosed:
            self.close(f"{'client' if dest is self.client else 'compositor'} hung up")
            return
        self._after_flush(dest, drained)

    def _after_flush(self, dest: Transport, drained: bool) -> None:
        """Follow a flush with selector registrations and backpressure."""
        source = self._other(dest)
        # Registering with the selector costs a syscall, so only on state changes.
        if drained:
            if dest in self._waiting_to_write:
                self._waiting_to_write.discard(dest)
                self.loop.remove_writer(dest.fileno())
        elif dest not in self._waiting_to_write:
            self._waiting_to_write.add(dest)
            self.loop.add_writer(dest.fileno(), self._writable, dest)
        if self._finishing is not None:
            if drained:
                self.close(self._finishing)
            return
        if dest.queued_bytes > self.server.options.high_water:
            if source not in self._paused:
                self._paused.add(source)
                self.loop.remove_reader(source.fileno())
                self._arm_stall(dest)
        elif source in self._paused:
            self._paused.discard(source)
            self._disarm_stall(dest)
            self.loop.add_reader(source.fileno(), self._readable, source)

    def _writable(self, dest: Transport) -> None:
        before = dest.queued_bytes
        self._try_flush(dest)
        if not self.closed and dest in self._stall and dest.queued_bytes < before:
            self._arm_stall(dest)

    def _arm_stall(self, dest: Transport) -> None:
        self._disarm_stall(dest)
        self._stall[dest] = self.loop.call_later(
            self.server.options.stall_timeout, self._stalled, dest)

    def _disarm_stall(self, dest: Transport) -> None:
        handle = self._stall.pop(dest, None)
        if handle is not None:
            handle.cancel()

    def _stalled(self, dest: Transport) -> None:
        who = "client" if dest is self.client else "compositor"
        self._finishing = None
        self.close(f"{who} stopped reading: {dest.queued_bytes} bytes queued for "
                   f"{self.server.options.stall_timeout:g} s")

    def finish(self, reason: str) -> None:
        """End the session once the client has read what is queued for it.

        The compositor side closes now; the client side stays open, unread, until
        its queue drains or it accepts nothing for ``stall_timeout`` seconds.
        """
        if self.closed or self._finishing is not None:
            return
        self._finishing = reason
        for transport in (self.client, self.compositor):
            if transport not in self._paused:
                self.loop.remove_reader(transport.fileno())
        self._paused.clear()
        for handle in self._stall.values():
            handle.cancel()
        self._stall.clear()
        self.loop.remove_writer(self.compositor.fileno())
        self._waiting_to_write.discard(self.compositor)
        self.compositor.close()
        self._arm_stall(self.client)
        self._try_flush(self.client)

    def close(self, reason: str) -> None:
        if self.closed:
            return
        self.closed = True
        log.info("client#%d: closed (%s)", self.number, reason)
        for handle in self._stall.values():
            handle.cancel()
        for transport in (self.client, self.compositor):
            if not transport.closed:
                self.loop.remove_reader(transport.fileno())
                self.loop.remove_writer(transport.fileno())
                transport.close()
        for fd in self.session.unclaimed_fds():
            os.close(fd)
        self.server.forget(self)


def display_error(protocol: ProtocolTable, error: WireError) -> bytes:
    """The ``wl_display.error`` event telling a client what it did wrong."""
    data, _ = encode_message(1, protocol["wl_display"].events[0],
                             [error.object_id, int(error.code), error.message])
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
    ) -> None:
        self.protocol = protocol
        self.listener = listener
        self.upstream = upstream
        self.options = options or RelayOptions()
        self.protocol_log = protocol_log
        self.loop = asyncio.get_running_loop()
        self.clients: set[ClientRelay] = set()
        self._next_number = 1
        self._hidden_logged: set[str] = set()
        self.loop.add_reader(listener.fileno(), self._accept)

    def hidden_global(self, interface: str, version: int) -> None:
        if interface not in self._hidden_logged:
            self._hidden_logged.add(interface)
            log.info("hiding global %s (version %d): no protocol XML for it", interface,
                     version)

    def _accept(self) -> None:
        try:
            client, _ = self.listener.sock.accept()
        except (BlockingIOError, InterruptedError):
            return
        number = self._next_number
        self._next_number += 1
        upstream = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        upstream.settimeout(self.options.connect_timeout)
        try:
            upstream.connect(str(self.upstream))
        except OSError as exc:
            upstream.close()
            message = f"qubesshm: cannot reach the compositor at {self.upstream}: {exc}"
            log.error("client#%d: %s", number, message)
            try:
                client.setblocking(False)
                client.send(display_error(self.protocol,
                                          WireError(message, ErrorCode.IMPLEMENTATION)))
            except OSError:
                pass
            client.close()
            return
        log.info("client#%d: connected", number)
        self.clients.add(ClientRelay(self, number, client, upstream))

    def forget(self, relay: ClientRelay) -> None:
        self.clients.discard(relay)

    def close(self) -> None:
        self.loop.remove_reader(self.listener.fileno())
        for relay in list(self.clients):
            relay.close("proxy shutting down")
        self.listener.close()
