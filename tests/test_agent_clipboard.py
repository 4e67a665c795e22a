"""The inter-domain clipboard on the agent's side, with libwayland clients (pywayland).

``AgentClipboard`` (sans-IO) and the process's ``ClipboardPipes`` (its reads on
the loop) run in the served compositor's thread, as in the agent; the daemon's
side is its messages in and the ``CLIPBOARD_DATA`` out, each checked as the
real daemon checks it. A client copies (``wl_data_device.set_selection``) and
the daemon's request gets its exact bytes, bounded as the protocol version
says; with nothing copied, or an owner that never finishes, the answer is
empty; the daemon's text is offered to the focused client to paste.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from typing import Any

import pytest
from compositor_server import RunningCompositor, serving
from compositor_shell import wait_until
from test_compositor_selection import SelectionClient, focus

from qubesshm.agent.clipboard import AgentClipboard
from qubesshm.agent.process import ClipboardPipes
from qubesshm.guiproto import messages as gm
from qubesshm.guiproto.checks import DaemonChecks

TEXT = "Grüße aus der VM, 世界 — qubes\n".encode() * 100


class DaemonSide:
    """The agent's clipboard and its pipes on the served compositor's loop, and what it
    sends the daemon (checked by the real daemon's rules as it goes)."""

    def __init__(self, served: RunningCompositor, version: int = gm.VERSION,
                 timeout: float = 2.0) -> None:
        self.served = served
        self.version = version
        self.checks = DaemonChecks(version)
        self.sent: list[tuple[int, gm.Body]] = []
        self.answers = 0

        def make() -> tuple[AgentClipboard, ClipboardPipes]:
            clipboard = AgentClipboard(served.compositor.selection, self._send,
                                       lambda: self.version, time.monotonic, timeout=timeout)
            pipes = ClipboardPipes(clipboard, served.loop, time.monotonic, self._done)
            return clipboard, pipes

        self.clipboard, self.pipes = served.call(make)

    def _send(self, window: int, body: gm.Body) -> None:
        self.checks.check(gm.Message.of(window, body))  # raises what the daemon refuses
        self.sent.append((window, body))

    def _done(self) -> None:
        self.answers += 1

    def message(self, window: int, body: gm.Body) -> None:
        def deliver() -> None:
            self.clipboard.on_message(gm.Message.of(window, body))
            self.pipes.service()

        self.served.call(deliver)

    def data(self, client: SelectionClient | None = None, count: int = 1) -> list[bytes]:
        """The CLIPBOARD_DATA sent, once ``count`` were (``client`` dispatching, as it
        writes what it copied)."""
        def enough() -> bool:
            return self.served.call(lambda: len(self.sent)) >= count

        if client is not None:
            client.wait(enough, "the agent's CLIPBOARD_DATA")
        else:
            wait_until(enough, "the agent's CLIPBOARD_DATA")
        out = []
        for _window, body in self.served.call(lambda: list(self.sent)):
            assert isinstance(body, gm.ClipboardData)
            out.append(body.data)
        return out

    def open_reads(self) -> int:
        return self.served.call(lambda: len(self.pipes.reads))


@pytest.fixture
def served() -> Iterator[RunningCompositor]:
    with serving(RunningCompositor) as running:
        yield running


@pytest.fixture
def app(served: RunningCompositor) -> Iterator[SelectionClient]:
    c = SelectionClient(served, "clipboard")
    yield c
    c.disconnect()


def copied(served: RunningCompositor, app: SelectionClient, data: bytes) -> None:
    focus(served, app)
    source = app.source(data, ("text/plain;charset=utf-8", "text/plain"))
    app.copy(source)
    wait_until(lambda: served.call(lambda: served.compositor.selection.owner()) is not None,
               "the client's selection")


def test_a_clipboard_request_gets_the_copied_text_exactly(served: RunningCompositor,
                                                        app: SelectionClient) -> None:
    daemon = DaemonSide(served)
    copied(served, app, TEXT)
    daemon.message(0x42, gm.ClipboardReq())
    assert daemon.data(app) == [TEXT]
    assert daemon.sent[0][0] == 0x42
    wait_until(lambda: daemon.open_reads() == 0, "the pipe closed")


def test_with_nothing_copied_the_answer_is_empty_at_once(served: RunningCompositor,
                                                        app: SelectionClient) -> None:
    daemon = DaemonSide(served)
    daemon.message(0x42, gm.ClipboardReq())
    assert daemon.data() == [b""]
    assert daemon.open_reads() == 0


class BigSource:
    """A copied text larger than the daemon takes: written until the agent stops
    reading (and closes its end)."""

    def __init__(self, app: SelectionClient, size: int) -> None:
        self.data = b"x" * size
        self.written = 0
        self.proxy = app.manager.create_data_source()
        self.proxy.dispatcher["send"] = self._send
        self.proxy.dispatcher["cancelled"] = lambda _: None
        self.proxy.offer("text/plain;charset=utf-8")
        self.fds: list[int] = []

    def _send(self, _: Any, mime: str, fd: int) -> None:
        os.set_blocking(fd, False)
        self.fds.append(fd)
        self.pump()

    def pump(self) -> None:
        for fd in list(self.fds):
            try:
                while self.written < len(self.data):
                    self.written += os.write(fd, self.data[self.written:self.written + 65536])
            except BlockingIOError:
                continue
            except BrokenPipeError:
                pass
            os.close(fd)
            self.fds.remove(fd)


@pytest.mark.parametrize(("version", "sent"), [
    (gm.VERSION, gm.MAX_CLIPBOARD_BUFFER_SIZE + 1),  # one byte over: "too large" to 1.8
    (gm.make_version(1, 7), gm.MAX_CLIPBOARD_SIZE),  # cut, as the X agent does
])
def test_a_text_over_the_limit_is_bounded_as_the_daemons_version_takes_it(
        served: RunningCompositor, app: SelectionClient, version: int, sent: int) -> None:
    daemon = DaemonSide(served, version)
    focus(served, app)
    big = BigSource(app, 400_000)
    app.device.set_selection(big.proxy, app.enter_serials[-1])
    app.roundtrip()
    daemon.message(1, gm.ClipboardReq())

    def answered() -> bool:
        big.pump()
        return served.call(lambda: len(daemon.sent)) == 1

    app.wait(answered, "the bounded answer")
    (data,) = daemon.data()
    assert len(data) == sent and data == big.data[:sent]
    def owner_done() -> bool:
        big.pump()
        return not big.fds

    app.wait(owner_done, "the owner's end to see the pipe close")


def test_an_owner_that_never_finishes_gets_an_empty_answer_at_the_deadline(
        served: RunningCompositor, app: SelectionClient) -> None:
    daemon = DaemonSide(served, timeout=0.3)
    focus(served, app)
    kept: list[int] = []

    def send(_: Any, mime: str, fd: int) -> None:
        os.write(fd, b"partial")
        kept.append(fd)  # and never closed

    proxy = app.manager.create_data_source()
    proxy.dispatcher["send"] = send
    proxy.dispatcher["cancelled"] = lambda _: None
    proxy.offer("text/plain;charset=utf-8")
    app.device.set_selection(proxy, app.enter_serials[-1])
    app.roundtrip()
    started = time.monotonic()
    daemon.message(1, gm.ClipboardReq())
    assert daemon.data(app) == [b""]
    assert time.monotonic() - started >= 0.3
    assert daemon.open_reads() == 0
    for fd in kept:
        os.close(fd)


def test_a_new_request_supersedes_one_still_reading(served: RunningCompositor,
                                                   app: SelectionClient) -> None:
    daemon = DaemonSide(served)
    focus(served, app)
    kept: list[int] = []
    proxy = app.manager.create_data_source()
    proxy.dispatcher["send"] = lambda _, mime, fd: kept.append(fd)
    proxy.dispatcher["cancelled"] = lambda _: None
    proxy.offer("text/plain;charset=utf-8")
    app.device.set_selection(proxy, app.enter_serials[-1])
    app.roundtrip()
    daemon.message(1, gm.ClipboardReq())
    app.wait(lambda: len(kept) == 1, "the first send")
    daemon.message(1, gm.ClipboardReq())
    app.wait(lambda: len(kept) == 2, "the second send")
    assert daemon.open_reads() == 1  # the first read stopped and its pipe closed
    os.write(kept[1], b"second")
    for fd in kept:
        os.close(fd)
    assert daemon.data(app) == [b"second"]


def test_the_daemons_text_is_pasted_into_the_focused_client_both_selections(
        served: RunningCompositor, app: SelectionClient) -> None:
    daemon = DaemonSide(served)
    focus(served, app)
    daemon.message(0, gm.ClipboardData(TEXT))
    app.wait(lambda: app.selections and app.selections[-1] is not None
             and app.primary_selections and app.primary_selections[-1] is not None,
             "both selections offered")
    offer = app.selections[-1]
    assert offer is not None and "text/plain;charset=utf-8" in offer.mimes
    assert app.receive(offer, "text/plain;charset=utf-8") == TEXT
    primary = app.primary_selections[-1]
    assert primary is not None
    assert app.receive(primary, "text/plain;charset=utf-8") == TEXT
    assert daemon.sent == []
