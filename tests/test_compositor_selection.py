"""Clipboard, primary selection and drag and drop, with libwayland clients (pywayland).

Real clients copy and paste through the served compositor's data devices; the
agent's side is called as the agent calls it (``selection.read_text`` and
``own_text``, the seat's focus and pointer). Each transfer's bytes are
checked exactly, as are the events the protocol promises (a replaced source
cancelled, the focused client offered the selection), the refusals (a client
without focus), the errors, and that no pipe stays open: one nobody reads is
closed at its deadline.
"""

from __future__ import annotations

import os
import select
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from compositor_clients import PyClient, solid
from compositor_server import RunningCompositor, serving
from compositor_shell import wait_until
from pywayland.protocol.wayland import WlDataDeviceManager, WlSeat
from pywayland.protocol.wp_primary_selection_unstable_v1 import (
    ZwpPrimarySelectionDeviceManagerV1,
)

from qubesshm.compositor.client import ClientCore
from qubesshm.compositor.selection import TEXT_MIMES, best_text_mime
from qubesshm.compositor.shell import ShellWindow
from qubesshm.compositor.transfers import MAX_PER_READER

BTN_LEFT = 0x110
BTN_RIGHT = 0x111
COPY, MOVE, ASK = 1, 2, 4
# Text with more than ASCII in it, as a clipboard carries.
TEXT = "Grüße, 世界 — qubes\n".encode() * 200


@pytest.fixture
def served() -> Iterator[RunningCompositor]:
    with serving(RunningCompositor) as running:
        yield running


def open_fds() -> set[int]:
    return {int(name) for name in os.listdir("/proc/self/fd")}


@dataclass
class Source:
    """A client's data source (or primary source) that serves ``data`` for its types."""

    proxy: Any
    data: bytes
    sent: list[str] = field(default_factory=list)
    cancelled: bool = False
    targets: list[str | None] = field(default_factory=list)
    actions: list[int] = field(default_factory=list)
    drop_performed: bool = False
    finished: bool = False

    def attach(self) -> None:
        self.proxy.dispatcher["send"] = self._send
        self.proxy.dispatcher["cancelled"] = self._cancelled
        if "target" not in _event_names(self.proxy):
            return  # a primary selection source
        self.proxy.dispatcher["target"] = lambda _, mime: self.targets.append(mime)
        self.proxy.dispatcher["action"] = lambda _, action: self.actions.append(action)
        self.proxy.dispatcher["dnd_drop_performed"] = lambda _: setattr(
            self, "drop_performed", True)
        self.proxy.dispatcher["dnd_finished"] = lambda _: setattr(self, "finished", True)

    def _send(self, _: Any, mime: str, fd: int) -> None:
        self.sent.append(mime)
        try:
            # Small enough for one pipe buffer: the test's thread reads it afterwards.
            os.write(fd, self.data)
        finally:
            os.close(fd)

    def _cancelled(self, _: Any) -> None:
        self.cancelled = True


@dataclass
class OfferSeen:
    proxy: Any
    mimes: list[str] = field(default_factory=list)
    source_actions: list[int] = field(default_factory=list)
    actions: list[int] = field(default_factory=list)


class SelectionClient:
    """A libwayland client with one mapped toplevel, the seat's keyboard and pointer,
    a data device and a primary selection device."""

    def __init__(self, served: RunningCompositor, title: str) -> None:
        self.served = served
        self.title = title
        self.c = PyClient(served.path)
        self.gone = False
        self.seat = self.c.bind(WlSeat, 5)
        self.keyboard = self.seat.get_keyboard()
        self.pointer = self.seat.get_pointer()
        self.enter_serials: list[int] = []
        self.press_serials: list[int] = []
        self.keyboard.dispatcher["enter"] = (
            lambda _, serial, surface, keys: self.enter_serials.append(serial))
        self.keyboard.dispatcher["keymap"] = lambda _, fmt, fd, size: os.close(fd)
        self.pointer.dispatcher["button"] = self._button
        self.manager = self.c.bind(WlDataDeviceManager, 3)
        self.device = self.manager.get_data_device(self.seat)
        self.primary_manager = self.c.bind(ZwpPrimarySelectionDeviceManagerV1, 1)
        self.primary_device = self.primary_manager.get_device(self.seat)
        self.offers: dict[Any, OfferSeen] = {}
        self.selections: list[OfferSeen | None] = []
        self.primary_selections: list[OfferSeen | None] = []
        self.dnd: list[tuple[str, tuple[Any, ...]]] = []
        for device, into in ((self.device, self.selections),
                             (self.primary_device, self.primary_selections)):
            device.dispatcher["data_offer"] = self._data_offer
            device.dispatcher["selection"] = self._selection(into)
        for name in ("enter", "leave", "motion", "drop"):
            self.device.dispatcher[name] = self._dnd(name)
        self.window = self.c.toplevel(title)
        self.c.show(self.window.surface, self.c.buffer(solid(200, 100, 0xFF336699)))
        self.c.roundtrip()
        self.shell_window: ShellWindow = wait_until(
            lambda: next((w for w in served.shell.mapped_windows() if w.title == title),
                         None), f"{title!r} to map")
        self.core: ClientCore = served.call(lambda: next(
            c for c in served.compositor.clients if c.number == self.shell_window.client))

    def _button(self, _: Any, serial: int, time_ms: int, button: int, state: int) -> None:
        if state == 1:
            self.press_serials.append(serial)

    def _data_offer(self, _: Any, offer: Any) -> None:
        seen = OfferSeen(offer)
        self.offers[offer] = seen
        offer.dispatcher["offer"] = lambda _, mime: seen.mimes.append(mime)
        if "source_actions" in _event_names(offer):
            offer.dispatcher["source_actions"] = (
                lambda _, actions: seen.source_actions.append(actions))
            offer.dispatcher["action"] = lambda _, action: seen.actions.append(action)

    def _selection(self, into: list[OfferSeen | None]) -> Callable[[Any, Any], None]:
        def on_selection(_: Any, offer: Any) -> None:
            into.append(None if offer is None else self.offers[offer])
        return on_selection

    def _dnd(self, name: str) -> Callable[..., None]:
        def on_event(_: Any, *args: Any) -> None:
            self.dnd.append((name, args))
        return on_event

    # -- doing ---------------------------------------------------------------------

    def source(self, data: bytes, mimes: tuple[str, ...], *, primary: bool = False,
               actions: int | None = None) -> Source:
        if primary:
            proxy = self.primary_manager.create_source()
        else:
            proxy = self.manager.create_data_source()
        source = Source(proxy, data)
        source.attach()
        for mime in mimes:
            proxy.offer(mime)
        if actions is not None:
            proxy.set_actions(actions)
        return source

    def copy(self, source: Source, serial: int | None = None, *,
             primary: bool = False) -> None:
        if serial is None:
            serial = self.enter_serials[-1] if self.enter_serials else 0
        device = self.primary_device if primary else self.device
        device.set_selection(source.proxy, serial)
        self.c.roundtrip()

    def receive(self, offer: OfferSeen, mime: str, timeout: float = 10.0,
                owner: SelectionClient | None = None) -> bytes:
        """Read ``offer`` as ``mime`` to its end (this client, or ``owner``, writes it)."""
        read_end, write_end = os.pipe2(os.O_CLOEXEC)
        try:
            offer.proxy.receive(mime, write_end)
        finally:
            os.close(write_end)
        try:
            self.c.display.flush()
            return (owner or self).read_all(read_end, timeout)
        finally:
            os.close(read_end)

    def read_all(self, fd: int, timeout: float = 10.0) -> bytes:
        """Read ``fd`` to EOF while this client dispatches (it may write it)."""
        self.c.display.flush()
        out = bytearray()
        deadline = time.monotonic() + timeout
        display_fd = self.c.display.get_fd()
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"{self.title}: no EOF within {timeout} s "
                                     f"({len(out)} bytes read)")
            ready, _, _ = select.select([fd, display_fd], [], [], remaining)
            if display_fd in ready:
                self.c.dispatch(0)
            if fd in ready:
                try:
                    chunk = os.read(fd, 65536)
                except BlockingIOError:
                    continue
                if not chunk:
                    return bytes(out)
                out += chunk

    def wait(self, condition: Callable[[], object], what: str) -> None:
        self.c.wait(lambda: bool(condition()), what)

    def roundtrip(self) -> None:
        self.c.roundtrip()

    def disconnect(self) -> None:
        if self.gone:
            return
        self.gone = True
        # pywayland ties a proxy an event made to some display of the process, not
        # always its own: destroy the offers while their connection is still there.
        for offer in self.offers:
            if not offer.destroyed:
                offer.destroy()
        self.offers.clear()
        self.c.disconnect()


def _event_names(proxy: Any) -> set[str]:
    return {event.name for event in proxy.interface.events}


def focus(served: RunningCompositor, client: SelectionClient | None) -> None:
    w = None if client is None else client.shell_window
    served.call(lambda: served.compositor.seat.keyboard_focus(w))
    if client is not None:
        client.wait(lambda: client.enter_serials, "keyboard focus")


def read_text(served: RunningCompositor, owner: SelectionClient | None, *,
              primary: bool = False) -> bytes | None:
    """What the agent reads of the selection (``owner`` dispatches meanwhile)."""
    fd = served.call(lambda: served.compositor.selection.read_text(primary))
    if fd is None:
        return None
    try:
        if owner is not None:
            return owner.read_all(fd)
        deadline = time.monotonic() + 10
        out = bytearray()
        while time.monotonic() < deadline:
            select.select([fd], [], [], 0.5)
            try:
                chunk = os.read(fd, 65536)
            except BlockingIOError:
                continue
            if not chunk:
                return bytes(out)
            out += chunk
        raise AssertionError("no EOF on the selection's pipe")
    finally:
        os.close(fd)


@pytest.fixture
def clients(served: RunningCompositor) -> Iterator[Callable[[str], SelectionClient]]:
    made: list[SelectionClient] = []

    def make(title: str) -> SelectionClient:
        client = SelectionClient(served, title)
        made.append(client)
        return client

    yield make
    for client in made:
        client.disconnect()


# -- the clipboard -----------------------------------------------------------------------


def test_the_best_text_type_is_read() -> None:
    assert best_text_mime(["text/html", "STRING", "UTF8_STRING"]) == "UTF8_STRING"
    assert best_text_mime(["TEXT", "text/plain;charset=UTF-8"]) == "text/plain;charset=UTF-8"
    assert best_text_mime(["text/plain", "STRING"]) == "text/plain"
    assert best_text_mime(["image/png", "text/html"]) is None


def test_what_a_client_copies_is_read_exactly(
        served: RunningCompositor, clients: Callable[[str], SelectionClient]) -> None:
    a = clients("a")
    assert read_text(served, None) is None
    focus(served, a)
    source = a.source(TEXT, ("text/html", "STRING", "UTF8_STRING",
                             "text/plain;charset=utf-8", "image/png"))
    a.copy(source)
    assert served.call(lambda: served.compositor.selection.owner()) == a.core.number
    assert read_text(served, a) == TEXT
    assert source.sent == ["text/plain;charset=utf-8"]
    # The focused client itself is offered its own selection, as any other.
    a.wait(lambda: a.selections and a.selections[-1] is not None, "a's own selection")
    offer = a.selections[-1]
    assert offer is not None and offer.mimes[:2] == ["text/html", "STRING"]
    assert a.receive(offer, "STRING") == TEXT
    # No text among its types: nothing to read.
    image = a.source(b"\x89PNG", ("image/png",))
    a.copy(image)
    assert source.cancelled
    assert read_text(served, a) is None


def test_the_compositors_text_is_offered_to_the_focused_client_and_on_focus(
        served: RunningCompositor, clients: Callable[[str], SelectionClient]) -> None:
    a, b = clients("a"), clients("b")
    focus(served, a)
    a.wait(lambda: a.selections == [None], "a: no selection")
    served.call(lambda: served.compositor.selection.own_text(TEXT))
    a.wait(lambda: len(a.selections) == 2, "a: the compositor's selection")
    offer = a.selections[-1]
    assert offer is not None and tuple(offer.mimes) == TEXT_MIMES
    assert a.receive(offer, "text/plain;charset=utf-8") == TEXT
    assert a.receive(offer, "UTF8_STRING") == TEXT
    b.roundtrip()
    assert b.selections == []  # not focused: not told
    focus(served, b)
    b.wait(lambda: b.selections, "b: the selection on focus")
    offer_b = b.selections[-1]
    assert offer_b is not None and tuple(offer_b.mimes) == TEXT_MIMES
    assert b.receive(offer_b, "text/plain") == TEXT
    assert read_text(served, None) == TEXT
    assert served.call(lambda: served.compositor.selection.owner()) == 0


def test_the_primary_selection_both_ways(
        served: RunningCompositor, clients: Callable[[str], SelectionClient]) -> None:
    a, b = clients("a"), clients("b")
    focus(served, a)
    primary = a.source(b"middle-click text", ("text/plain;charset=utf-8",), primary=True)
    a.copy(primary, primary=True)
    assert read_text(served, a, primary=True) == b"middle-click text"
    assert read_text(served, a) is None  # the clipboard is another selection
    focus(served, b)
    b.wait(lambda: b.primary_selections and b.primary_selections[-1] is not None,
           "b: the primary selection on focus")
    offer = b.primary_selections[-1]
    assert offer is not None and offer.mimes == ["text/plain;charset=utf-8"]
    assert b.receive(offer, "text/plain;charset=utf-8", owner=a) == b"middle-click text"
    served.call(lambda: served.compositor.selection.own_text(b"from dom0", primary=True))
    a.wait(lambda: primary.cancelled, "a's primary source to be cancelled")
    b.wait(lambda: b.primary_selections[-1] is not offer, "b: the new primary selection")
    new = b.primary_selections[-1]
    assert new is not None and b.receive(new, "UTF8_STRING") == b"from dom0"


def test_a_replaced_source_is_cancelled_and_a_destroyed_one_is_gone(
        served: RunningCompositor, clients: Callable[[str], SelectionClient]) -> None:
    a = clients("a")
    focus(served, a)
    first = a.source(b"first", ("text/plain",))
    a.copy(first)
    second = a.source(b"second", ("text/plain",))
    a.copy(second)
    a.roundtrip()
    assert first.cancelled and not second.cancelled
    assert read_text(served, a) == b"second"
    served.call(lambda: served.compositor.selection.own_text(b"third"))
    a.wait(lambda: second.cancelled, "the second source to be cancelled")
    assert read_text(served, a) == b"third"
    fourth = a.source(b"fourth", ("text/plain",))
    a.copy(fourth)
    a.wait(lambda: a.selections and a.selections[-1] is not None
           and a.selections[-1].mimes == ["text/plain"], "the offer of the fourth")
    old_offer = a.selections[-1]
    assert old_offer is not None
    fourth.proxy.destroy()
    a.wait(lambda: a.selections[-1] is None, "the selection cleared")
    assert read_text(served, a) is None
    # The old offer's source is gone: a receive on it ends at once, empty.
    assert a.receive(old_offer, "text/plain") == b""


def test_a_client_without_focus_cannot_set_the_selection(
        served: RunningCompositor, clients: Callable[[str], SelectionClient]) -> None:
    a, b = clients("a"), clients("b")
    focus(served, a)
    mine = a.source(b"the user's copy", ("text/plain;charset=utf-8",))
    a.copy(mine)
    focus(served, b)
    a.roundtrip()
    sneaky = a.source(b"from the background", ("text/plain;charset=utf-8",))
    a.copy(sneaky, a.enter_serials[-1])
    a.wait(lambda: sneaky.cancelled, "the refused source to be cancelled")
    sneaky_primary = a.source(b"background", ("text/plain",), primary=True)
    a.copy(sneaky_primary, primary=True)
    a.wait(lambda: sneaky_primary.cancelled, "the refused primary source to be cancelled")
    assert not mine.cancelled
    assert read_text(served, a) == b"the user's copy"
    assert read_text(served, a, primary=True) is None


def test_an_older_serial_does_not_replace_a_newer_selection(
        served: RunningCompositor, clients: Callable[[str], SelectionClient]) -> None:
    a = clients("a")
    focus(served, a)
    serial = a.enter_serials[-1]
    newer = a.source(b"newer", ("text/plain",))
    a.copy(newer, serial + 5)
    late = a.source(b"late", ("text/plain",))
    a.copy(late, serial)
    a.wait(lambda: late.cancelled, "the late source to be refused")
    assert read_text(served, a) == b"newer"


# -- drag and drop ------------------------------------------------------------------------


def test_drag_and_drop_inside_one_client(
        served: RunningCompositor, clients: Callable[[str], SelectionClient]) -> None:
    a = clients("a")
    w = a.shell_window
    seat = served.compositor.seat
    served.call(lambda: seat.pointer_motion(w, 10.0, 10.0, 1000))
    served.call(lambda: seat.pointer_button(w, 10.0, 10.0, BTN_LEFT, True, 1001))
    a.wait(lambda: a.press_serials, "the press")
    source = a.source(b"dragged words", ("text/plain;charset=utf-8", "text/uri-list"),
                      actions=COPY | MOVE)
    a.device.start_drag(source.proxy, a.window.surface, None, a.press_serials[-1])
    a.roundtrip()
    served.call(lambda: seat.pointer_motion(w, 30.0, 20.0, 1002))
    a.wait(lambda: any(name == "enter" for name, _ in a.dnd), "the drag to enter")
    args = next(args for name, args in a.dnd if name == "enter")
    serial, surface, x, y, offer_proxy = args
    assert surface is a.window.surface and (x, y) == (30.0, 20.0)
    offer = a.offers[offer_proxy]
    assert offer.mimes == ["text/plain;charset=utf-8", "text/uri-list"]
    assert offer.source_actions == [COPY | MOVE]
    offer_proxy.set_actions(COPY | MOVE, MOVE)
    offer_proxy.accept(serial, "text/plain;charset=utf-8")
    a.wait(lambda: source.targets and source.actions, "the target to accept")
    assert source.targets == ["text/plain;charset=utf-8"]
    assert source.actions[-1] == MOVE and offer.actions[-1] == MOVE
    served.call(lambda: seat.pointer_motion(w, 40.0, 25.0, 1003))
    a.wait(lambda: any(name == "motion" for name, _ in a.dnd), "motion")
    assert [args[1:] for name, args in a.dnd if name == "motion"] == [(40.0, 25.0)]
    # Another button's click meanwhile drops nothing: the drop is the last release's.
    served.call(lambda: seat.pointer_button(w, 40.0, 25.0, BTN_RIGHT, True, 1004))
    served.call(lambda: seat.pointer_button(w, 40.0, 25.0, BTN_RIGHT, False, 1005))
    a.roundtrip()
    assert not source.drop_performed and not source.cancelled
    served.call(lambda: seat.pointer_button(w, 40.0, 25.0, BTN_LEFT, False, 1006))
    a.wait(lambda: source.drop_performed, "the drop")
    assert [name for name, _ in a.dnd] == ["enter", "motion", "drop", "leave"]
    assert a.receive(offer, "text/plain;charset=utf-8") == b"dragged words"
    offer_proxy.finish()
    a.wait(lambda: source.finished, "dnd_finished")
    assert not source.cancelled


def test_a_drop_nobody_accepts_cancels_the_source(
        served: RunningCompositor, clients: Callable[[str], SelectionClient]) -> None:
    a = clients("a")
    w = a.shell_window
    seat = served.compositor.seat
    served.call(lambda: seat.pointer_motion(w, 10.0, 10.0, 1000))
    served.call(lambda: seat.pointer_button(w, 10.0, 10.0, BTN_LEFT, True, 1001))
    a.wait(lambda: a.press_serials, "the press")
    source = a.source(b"x", ("text/plain",), actions=COPY)
    a.device.start_drag(source.proxy, a.window.surface, None, a.press_serials[-1])
    a.roundtrip()
    served.call(lambda: seat.pointer_motion(w, 12.0, 12.0, 1002))
    a.wait(lambda: a.dnd, "the drag to enter")
    served.call(lambda: seat.pointer_button(w, 12.0, 12.0, BTN_LEFT, False, 1003))
    a.wait(lambda: source.cancelled, "the source cancelled")
    assert not source.drop_performed
    assert [name for name, _ in a.dnd] == ["enter", "leave"]


def test_a_source_destroyed_mid_drag_ends_it(
        served: RunningCompositor, clients: Callable[[str], SelectionClient]) -> None:
    a = clients("a")
    w = a.shell_window
    seat = served.compositor.seat
    served.call(lambda: seat.pointer_motion(w, 10.0, 10.0, 1000))
    served.call(lambda: seat.pointer_button(w, 10.0, 10.0, BTN_LEFT, True, 1001))
    a.wait(lambda: a.press_serials, "the press")
    source = a.source(b"x", ("text/plain",), actions=COPY)
    a.device.start_drag(source.proxy, a.window.surface, None, a.press_serials[-1])
    a.roundtrip()
    served.call(lambda: seat.pointer_motion(w, 12.0, 12.0, 1002))
    a.wait(lambda: a.dnd, "the drag to enter")
    source.proxy.destroy()
    a.wait(lambda: [n for n, _ in a.dnd] == ["enter", "leave"], "the drag's leave")
    assert served.call(lambda: seat.grab) is None
    served.call(lambda: seat.pointer_button(w, 12.0, 12.0, BTN_LEFT, False, 1003))
    a.roundtrip()
    assert [n for n, _ in a.dnd] == ["enter", "leave"]


def test_start_drag_needs_a_press_serial(
        served: RunningCompositor, clients: Callable[[str], SelectionClient]) -> None:
    a = clients("a")
    focus(served, a)
    source = a.source(b"x", ("text/plain",), actions=COPY)
    a.device.start_drag(source.proxy, a.window.surface, None, a.enter_serials[-1])
    a.wait(lambda: source.cancelled, "the refused drag's source to be cancelled")
    seat, w = served.compositor.seat, a.shell_window
    served.call(lambda: seat.pointer_motion(w, 5.0, 5.0, 1))
    a.roundtrip()
    assert a.dnd == []
    # A press's serial, but the button is up again: no drag either.
    served.call(lambda: seat.pointer_button(w, 5.0, 5.0, BTN_LEFT, True, 2))
    served.call(lambda: seat.pointer_button(w, 5.0, 5.0, BTN_LEFT, False, 3))
    a.wait(lambda: a.press_serials, "the press")
    late = a.source(b"x", ("text/plain",), actions=COPY)
    a.device.start_drag(late.proxy, a.window.surface, None, a.press_serials[-1])
    a.wait(lambda: late.cancelled, "the late drag's source to be cancelled")
    served.call(lambda: seat.pointer_motion(w, 6.0, 6.0, 4))
    a.roundtrip()
    assert a.dnd == []


def test_drag_and_drop_between_windows_of_one_client(
        served: RunningCompositor, clients: Callable[[str], SelectionClient]) -> None:
    a = clients("a")
    second = a.c.toplevel("a's second window")
    a.c.show(second.surface, a.c.buffer(solid(120, 80, 0xFF996633)))
    a.roundtrip()
    w2: ShellWindow = wait_until(lambda: next(
        (w for w in served.shell.mapped_windows() if w.title == "a's second window"), None),
        "the second window")
    w = a.shell_window
    with served.shell.lock:
        served.shell.origins[w.id] = (100, 100)
        served.shell.origins[w2.id] = (400, 300)
    seat = served.compositor.seat
    served.call(lambda: seat.pointer_motion(w, 10.0, 10.0, 1000))
    served.call(lambda: seat.pointer_button(w, 10.0, 10.0, BTN_LEFT, True, 1001))
    a.wait(lambda: a.press_serials, "the press")
    source = a.source(b"across windows", ("text/plain;charset=utf-8",), actions=COPY)
    a.device.start_drag(source.proxy, a.window.surface, None, a.press_serials[-1])
    a.roundtrip()
    served.call(lambda: seat.pointer_motion(w, 20.0, 20.0, 1002))
    a.wait(lambda: a.dnd, "the drag to enter the first window")
    # X keeps reporting the pointer relative to the window pressed in: (330, 220) there
    # is (30, 20) in the second window on the screen.
    served.call(lambda: seat.pointer_motion(w, 330.0, 220.0, 1003))
    a.wait(lambda: [n for n, _ in a.dnd].count("enter") == 2, "the drag to enter the second")
    enter = [args for name, args in a.dnd if name == "enter"][-1]
    assert enter[1] is second.surface and (enter[2], enter[3]) == (30.0, 20.0)
    offer_proxy = enter[4]
    offer_proxy.set_actions(COPY, COPY)
    offer_proxy.accept(enter[0], "text/plain;charset=utf-8")
    a.wait(lambda: source.actions and source.targets, "the second window to accept")
    served.call(lambda: seat.pointer_button(w, 330.0, 220.0, BTN_LEFT, False, 1004))
    a.wait(lambda: source.drop_performed, "the drop")
    assert [n for n, _ in a.dnd] == ["enter", "leave", "enter", "drop", "leave"]
    assert a.receive(a.offers[offer_proxy], "text/plain;charset=utf-8") == b"across windows"
    offer_proxy.finish()
    a.wait(lambda: source.finished, "dnd_finished")


# -- protocol errors ------------------------------------------------------------------------


def protocol_error(served: RunningCompositor, client: SelectionClient) -> tuple[str, int]:
    """The interface of the object of the error that ended ``client``, and its code."""
    assert client.c.broken()

    def find() -> tuple[str, int]:
        error = client.core.error
        assert error is not None
        obj = client.core.objects.live(error.object_id)
        assert obj is not None
        return obj.interface.name, int(error.code)

    return served.call(find)


def test_the_same_source_set_again_stays_the_selection(
        served: RunningCompositor, clients: Callable[[str], SelectionClient]) -> None:
    # GTK 3 does this: no used_source error (nor is the source cancelled).
    a = clients("a")
    focus(served, a)
    source = a.source(b"again", ("text/plain",))
    a.copy(source)
    a.copy(source)
    a.roundtrip()
    assert not source.cancelled and not a.c.broken()
    assert read_text(served, a) == b"again"


def test_a_used_source_cannot_be_dragged(
        served: RunningCompositor, clients: Callable[[str], SelectionClient]) -> None:
    a = clients("a")
    focus(served, a)
    source = a.source(b"x", ("text/plain",))
    a.copy(source)
    a.device.start_drag(source.proxy, a.window.surface, None, a.enter_serials[-1])
    assert protocol_error(served, a) == ("wl_data_device", 1)  # used_source


def test_a_drag_source_cannot_be_the_selection(
        served: RunningCompositor, clients: Callable[[str], SelectionClient]) -> None:
    a = clients("a")
    focus(served, a)
    source = a.source(b"x", ("text/plain",), actions=COPY)
    a.device.set_selection(source.proxy, a.enter_serials[-1])
    assert protocol_error(served, a) == ("wl_data_source", 1)  # invalid_source


def test_source_actions_are_checked(
        served: RunningCompositor, clients: Callable[[str], SelectionClient]) -> None:
    a = clients("a")
    source = a.source(b"x", ("text/plain",), actions=COPY)
    source.proxy.set_actions(MOVE)
    assert protocol_error(served, a) == ("wl_data_source", 0)  # invalid_action_mask
    b = clients("b")
    b.source(b"x", ("text/plain",), actions=8)
    assert protocol_error(served, b) == ("wl_data_source", 0)


def test_finish_is_only_for_drag_and_drop(
        served: RunningCompositor, clients: Callable[[str], SelectionClient]) -> None:
    a = clients("a")
    focus(served, a)
    a.copy(a.source(b"x", ("text/plain",)))
    a.wait(lambda: a.selections and a.selections[-1] is not None, "the offer")
    offer = a.selections[-1]
    assert offer is not None
    offer.proxy.finish()
    assert protocol_error(served, a) == ("wl_data_offer", 0)  # invalid_finish


def test_selection_offers_have_no_actions(
        served: RunningCompositor, clients: Callable[[str], SelectionClient]) -> None:
    a = clients("a")
    focus(served, a)
    a.copy(a.source(b"x", ("text/plain",)))
    a.wait(lambda: a.selections and a.selections[-1] is not None, "the offer")
    offer = a.selections[-1]
    assert offer is not None
    offer.proxy.set_actions(COPY, COPY)
    assert protocol_error(served, a) == ("wl_data_offer", 3)  # invalid_offer


def test_a_drag_icon_needs_a_surface_without_another_role(
        served: RunningCompositor, clients: Callable[[str], SelectionClient]) -> None:
    a = clients("a")
    source = a.source(b"x", ("text/plain",), actions=COPY)
    a.device.start_drag(source.proxy, a.window.surface, a.window.surface, 1)
    assert protocol_error(served, a) == ("wl_data_device", 0)  # role


# -- pipes --------------------------------------------------------------------------------


def test_a_pipe_nobody_reads_is_closed_at_its_deadline(
        served: RunningCompositor, clients: Callable[[str], SelectionClient]) -> None:
    a = clients("a")
    focus(served, a)
    timeout = 0.5
    server = served.server
    assert server is not None
    served.call(lambda: setattr(server, "transfer_timeout", timeout))
    served.call(lambda: served.compositor.selection.own_text(b"z" * (1 << 20)))
    a.wait(lambda: a.selections and a.selections[-1] is not None, "the offer")
    offer = a.selections[-1]
    assert offer is not None
    before = open_fds()
    read_end, write_end = os.pipe2(os.O_CLOEXEC)
    offer.proxy.receive("text/plain", write_end)
    os.close(write_end)
    a.roundtrip()
    started = time.monotonic()
    wait_until(lambda: served.call(lambda: len(server.transfers)) == 1, "the transfer")
    poller = select.poll()
    poller.register(read_end, select.POLLIN)
    # The pipe is full and still open on the compositor's side.
    events = dict(poller.poll(0))
    assert events.get(read_end, 0) & select.POLLIN
    assert not events.get(read_end, 0) & select.POLLHUP
    wait_until(lambda: dict(poller.poll(0)).get(read_end, 0) & select.POLLHUP,
               "the write end closed", timeout=timeout + 10)
    assert time.monotonic() - started >= timeout * 0.8
    assert served.call(lambda: len(server.transfers)) == 0
    os.close(read_end)
    assert open_fds() <= before


def test_no_fd_is_left_open_by_transfers(
        served: RunningCompositor, clients: Callable[[str], SelectionClient]) -> None:
    a, b = clients("a"), clients("b")
    focus(served, a)
    a.copy(a.source(TEXT, ("text/plain;charset=utf-8",)))
    assert read_text(served, a) == TEXT  # warm up whatever is opened once
    before = open_fds()
    for _ in range(20):
        assert read_text(served, a) == TEXT
    served.call(lambda: served.compositor.selection.own_text(TEXT))
    focus(served, b)
    b.wait(lambda: b.selections and b.selections[-1] is not None, "b's offer")
    offer = b.selections[-1]
    assert offer is not None
    for _ in range(20):
        assert b.receive(offer, "UTF8_STRING") == TEXT
    # A reader that closes at once: the write fails and the fd is closed.
    read_end, write_end = os.pipe2(os.O_CLOEXEC)
    offer.proxy.receive("STRING", write_end)
    os.close(write_end)
    os.close(read_end)
    b.roundtrip()
    server = served.server
    assert server is not None
    wait_until(lambda: served.call(lambda: len(server.transfers)) == 0, "the transfers")
    assert open_fds() <= before


def test_a_client_has_a_bounded_number_of_transfers_open(
        served: RunningCompositor, clients: Callable[[str], SelectionClient]) -> None:
    a = clients("a")
    focus(served, a)
    server = served.server
    assert server is not None
    served.call(lambda: served.compositor.selection.own_text(b"y" * (1 << 20)))
    a.wait(lambda: a.selections and a.selections[-1] is not None, "the offer")
    offer = a.selections[-1]
    assert offer is not None
    before = open_fds()
    reads = []
    for _ in range(MAX_PER_READER + 4):
        read_end, write_end = os.pipe2(os.O_CLOEXEC)
        offer.proxy.receive("text/plain", write_end)
        os.close(write_end)
        reads.append(read_end)
    a.roundtrip()
    wait_until(lambda: served.call(lambda: len(server.transfers)) == MAX_PER_READER,
               "the transfers allowed")
    poller = select.poll()
    for fd in reads:
        poller.register(fd, select.POLLIN)
    wait_until(lambda: sum(1 for _, ev in poller.poll(0) if ev & select.POLLHUP) == 4,
               "the refused ones closed")
    for fd in reads:
        os.close(fd)
    wait_until(lambda: served.call(lambda: len(server.transfers)) == 0, "every pipe closed")
    assert served.call(lambda: served.compositor.transfers.open_for(a.core)) == 0
    assert open_fds() <= before


def test_a_gone_owner_leaves_no_selection(
        served: RunningCompositor, clients: Callable[[str], SelectionClient]) -> None:
    a, b = clients("a"), clients("b")
    focus(served, a)
    a.copy(a.source(b"x", ("text/plain",)))
    focus(served, b)
    b.wait(lambda: b.selections and b.selections[-1] is not None, "b's offer")
    a.disconnect()
    b.wait(lambda: b.selections[-1] is None, "the selection cleared")
    assert read_text(served, None) is None


def test_a_drag_icons_buffer_and_frame_callbacks_are_done_with_at_once(
        served: RunningCompositor, clients: Callable[[str], SelectionClient]) -> None:
    # Nothing can show a drag icon (it does not cross to dom0): like a cursor image, its
    # buffer goes back and its frame callbacks run, so a client animating it never stalls.
    a = clients("a")
    w = a.shell_window
    seat = served.compositor.seat
    served.call(lambda: seat.pointer_motion(w, 10.0, 10.0, 1000))
    served.call(lambda: seat.pointer_button(w, 10.0, 10.0, BTN_LEFT, True, 1001))
    a.wait(lambda: a.press_serials, "the press")
    source = a.source(b"x", ("text/plain",), actions=COPY)
    icon = a.c.compositor.create_surface()
    a.device.start_drag(source.proxy, a.window.surface, icon, a.press_serials[-1])

    buffers = [a.c.buffer(solid(16, 16, 0xFF000000 + n)) for n in range(3)]
    for n, buffer in enumerate(buffers):
        done = a.c.show(icon, buffer, frame=True)
        a.wait(lambda: bool(done) and buffer.released,  # noqa: B023 (waited on at once)
               f"icon frame {n} done")
    assert not a.c.broken()
