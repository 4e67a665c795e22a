"""The inter-domain clipboard on the agent's side: ``CLIPBOARD_REQ`` and ``CLIPBOARD_DATA``.

Sans-IO. The user's copy to the global clipboard (Ctrl+Shift+C in dom0) makes
the daemon send ``CLIPBOARD_REQ``: the agent asks the selection's owner for
its text (``Selection.read_text``, the read end of a pipe) and answers
``CLIPBOARD_DATA`` with what it reads. ``ClipboardRead`` is that read, carried
out by the I/O layer (``feed`` each chunk, ``expire`` at its deadline): it is
bounded by what the daemon takes (``clipboard_limit``: 65000 bytes below
protocol 1.8; from 1.8, 256000, and one byte more tells the daemon the text is
over its limit, as today's X agent does) and by ``READ_TIMEOUT``. No selection,
a selection with no text, or an owner that gives nothing in time: an empty
``CLIPBOARD_DATA``, as the X agent sends when the clipboard has no owner (the
daemon clears the global clipboard). A paste into the VM (Ctrl+Shift+V) is the
daemon's ``CLIPBOARD_DATA``: the compositor owns the clipboard and the primary
selection with that text, as the X agent owns both.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from ..guiproto import messages as gm

log = logging.getLogger("qubesshm.agent")

READ_TIMEOUT = 2.0  # seconds an owner has to write its text
CLIPBOARD_MESSAGES = frozenset({gm.MsgType.CLIPBOARD_REQ, gm.MsgType.CLIPBOARD_DATA})


class Selection(Protocol):
    """The compositor's selections (``compositor.selection``)."""

    def read_text(self, primary: bool = False) -> int | None: ...

    def own_text(self, data: bytes, primary: bool = False) -> None: ...


@dataclass(eq=False)
class ClipboardRead:
    """Reading the owner's text from ``fd``: at most ``limit`` bytes, by ``deadline``.
    ``done``: the I/O layer stops and closes ``fd``."""

    fd: int
    window: int
    limit: int
    deadline: float
    data: bytearray = field(default_factory=bytearray)
    done: bool = False


class AgentClipboard:
    """The clipboard messages of one agent; ``send`` puts a message in the daemon's
    stream (``AgentWindows.send``), ``version`` is the daemon's protocol version."""

    def __init__(self, selection: Selection, send: Callable[[int, gm.Body], None],
                 version: Callable[[], int], clock: Callable[[], float],
                 timeout: float = READ_TIMEOUT) -> None:
        self.selection = selection
        self.send = send
        self.version = version
        self.clock = clock
        self.timeout = timeout
        self.current: ClipboardRead | None = None
        self.started: list[ClipboardRead] = []  # for the I/O layer to take up
        self.copies = 0  # CLIPBOARD_DATA sent
        self.pastes = 0  # CLIPBOARD_DATA received

    def on_message(self, msg: gm.Message) -> None:
        body = msg.body
        if isinstance(body, gm.ClipboardReq):
            self._request(msg.window)
        elif isinstance(body, gm.ClipboardData):
            self.pastes += 1
            self.selection.own_text(body.data)
            self.selection.own_text(body.data, primary=True)

    def take_started(self) -> list[ClipboardRead]:
        started, self.started = self.started, []
        return started

    def _request(self, window: int) -> None:
        if self.current is not None:  # a new copy supersedes one still reading
            self.current.done = True
            self.current = None
        fd = self.selection.read_text()
        if fd is None:
            self._answer(window, b"")
            return
        read = ClipboardRead(fd, window, gm.clipboard_limit(self.version()),
                             self.clock() + self.timeout)
        self.current = read
        self.started.append(read)

    def feed(self, read: ClipboardRead, chunk: bytes) -> bool:
        """``chunk`` read from ``read.fd`` (empty at its end); False once done."""
        if read.done:
            return False
        room = read.limit - len(read.data)
        read.data += chunk[:room]
        if chunk and len(read.data) < read.limit:
            return True
        self._finish(read, bytes(read.data))
        return False

    def expire(self, read: ClipboardRead) -> None:
        """``read``'s deadline passed before the owner closed its end."""
        if read.done:
            return
        log.warning("the clipboard's owner sent no complete text within %g s: the GUI "
                    "daemon is told the clipboard is empty", self.timeout)
        self._finish(read, b"")

    def _finish(self, read: ClipboardRead, data: bytes) -> None:
        read.done = True
        if self.current is read:
            self.current = None
        self._answer(read.window, data)

    def _answer(self, window: int, data: bytes) -> None:
        self.copies += 1
        self.send(window, gm.ClipboardData(data))
