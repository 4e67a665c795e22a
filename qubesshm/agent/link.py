"""The agent's link to the GUI daemon: the vchan server, the handshake, both directions.

Thin I/O over ``guiproto`` and ``AgentWindows``: one daemon at a time on the
vchan (a daemon that restarts connects again and is shown every window), the
handshake first (a daemon older than 1.4 is refused with a line saying so),
then the daemon's messages decoded and dispatched (to ``AgentWindows.on_message``
unless told otherwise), and the
agent's messages encoded out of its outbox whenever ``flush`` is called.
A daemon that breaks the protocol is hung up on, with one line naming what it
sent; the agent carries on waiting for the next one.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import Any

from ..guiproto import codec
from ..guiproto import messages as gm
from ..guiproto.checks import DaemonChecks
from ..guiproto.handshake import AgentHandshake, IncompatibleDaemon
from ..vchan.stream import VchanClosed, VchanListener, VchanStream
from .acks import AckOutOfOrder
from .windows import AgentWindows

log = logging.getLogger("qubesshm.agent")


class DaemonLink:
    """Serves daemons on ``listener``, one after another, for ``windows``."""

    def __init__(self, listener: VchanListener, windows: AgentWindows[Any],
                 after_messages: Callable[[], None] = lambda: None,
                 dispatch: Callable[[gm.Message], None] | None = None,
                 disconnected: Callable[[], None] = lambda: None) -> None:
        self.listener = listener
        self.windows = windows
        self.after_messages = after_messages
        # Where each message of the daemon goes (the windows, by default).
        self.dispatch = dispatch if dispatch is not None else windows.on_message
        self.disconnected = disconnected
        self.stream: VchanStream | None = None
        self.connections = 0
        self.refused: list[str] = []  # why daemons were hung up on, newest last
        self.last_error: str | None = None
        self.connected = asyncio.Event()
        # The real daemon's checks on everything sent: what would end it is never sent.
        self.checks: DaemonChecks | None = None
        self.withheld = 0

    async def run(self) -> None:
        """Accept daemons for ever (until cancelled)."""
        while True:
            stream = await self.listener.accept()
            try:
                await self._serve(stream)
            finally:
                stream.close()
                if self.stream is stream:
                    self.stream = None
                    self.connected.clear()
                    self.windows.disconnect()
                    self.disconnected()

    async def _serve(self, stream: VchanStream) -> None:
        handshake = AgentHandshake(gm.VERSION)
        stream.write(handshake.greeting())
        result = None
        try:
            while result is None:
                data = await stream.read()
                if not data:
                    log.info("the GUI daemon hung up during the handshake")
                    return
                result = handshake.feed(data)
        except IncompatibleDaemon as exc:
            self._refuse(str(exc), error=True)
            return
        self.connections += 1
        log.info("GUI daemon connected: protocol %s, screen %dx%d",
                 gm.version_text(result.version), result.xconf.w, result.xconf.h)
        self.stream = stream
        self.checks = DaemonChecks(result.version)
        self.windows.connect(result.version, result.xconf)
        self.connected.set()
        decoder = codec.AgentDecoder(result.version)
        pending = result.leftover
        while True:
            try:
                for msg in decoder.feed(pending):
                    self.dispatch(msg)
            except (codec.ProtocolViolation, AckOutOfOrder) as exc:
                self._refuse(f"the GUI daemon broke the protocol: {exc}", error=True)
                return
            finally:
                self.after_messages()
                self.flush()
            pending = await stream.read()
            if not pending:
                log.info("the GUI daemon hung up")
                return

    def _refuse(self, why: str, *, error: bool) -> None:
        self.refused.append(why)
        del self.refused[:-32]
        self.last_error = why
        log.log(logging.ERROR if error else logging.INFO, "%s", why)

    def flush(self) -> None:
        """Send what the windows have to say (nothing while no daemon is there)."""
        out = self.windows.flush()
        if self.stream is None or not out:
            return
        parts = []
        for window, body in out:
            msg = gm.Message.of(window, body)
            if (self.checks is not None and isinstance(body, gm.ShmImage)
                    and window in self.checks.windows):
                # Every frame: a SHMIMAGE of a created window is always accepted (the
                # daemon clips its rectangle), and the encoder gives it its length.
                parts.append(codec.encode(window, body))
                continue
            if self.checks is not None:
                try:
                    self.checks.check(msg)
                except codec.ProtocolViolation as exc:
                    # A bug of qubesshm's: the daemon would exit and take every window.
                    # A window whose CREATE is withheld does not exist for the daemon:
                    # what follows for it is withheld too.
                    if isinstance(body, gm.Create):
                        self.checks.windows.discard(window)
                    self.withheld += 1
                    log.error("not sent to the GUI daemon, which would refuse it (a bug in "
                              "qubesshm): MSG_%s for window %#x: %s", msg.type.name, window, exc)
                    continue
            parts.append(codec.encode_message(msg))
        data = b"".join(parts)
        with contextlib.suppress(VchanClosed):
            self.stream.write(data)

    async def drain(self) -> None:
        if self.stream is not None:
            with contextlib.suppress(VchanClosed):
                await self.stream.drain()
