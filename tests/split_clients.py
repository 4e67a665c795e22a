"""Clients for the split proxy's fd tests: a Weston with a seat, and what its clients get.

The headless backend of Weston 10 has no input devices at all (no ``wl_seat``
global), so nothing there has a keyboard, a keymap or keyboard focus, and
Weston sends a client the selection only when one of its surfaces has keyboard
focus. Weston's X11 backend on a private Xvfb has a seat with a keyboard and a
pointer, and the desktop shell gives keyboard focus to each toplevel as it maps:
``seat_weston`` starts that one (pixman, no GPU).

- ``KeymapClient``: binds ``wl_seat``, makes a ``wl_keyboard`` and records what the
  keymap's descriptor is (its /proc name, access mode, seals, size, every byte).
- ``ClipClient``: a mapped toplevel with keyboard focus and a data device; offers a
  selection whose ``send`` a ``Writer`` thread serves (counting what it wrote, in
  4 KiB writes, so a stalled transfer shows where it stopped), and receives one.
- ``RawClient``: a client speaking bytes, for fds no toolkit would send.
"""

from __future__ import annotations

import array
import contextlib
import fcntl
import mmap
import os
import select
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from compositor_clients import PyClient, solid
from pywayland.protocol.wayland import WlDataDeviceManager, WlSeat

from qubesshm.bench.private_x import private_xvfb
from qubesshm.headless import HeadlessWeston

WRITE_CHUNK = 4096
DEADLINE = 30.0


class SeatWeston(HeadlessWeston):
    """Weston on its X11 backend, on the X server ``display``: a seat with a keyboard."""

    def __init__(self, display: str, **kwargs: Any) -> None:
        super().__init__(extra_args=("--backend=x11-backend.so",), **kwargs)
        self.display = display

    def env(self) -> dict[str, str]:
        env = super().env()
        env["DISPLAY"] = self.display  # for Weston; its Wayland clients ignore it
        return env

    def describe(self) -> str:
        return f"Weston on its X11 backend on {self.display} (a seat with a keyboard)"


@contextlib.contextmanager
def seat_weston(socket_name: str) -> Iterator[SeatWeston]:
    """A Weston with a keyboard, on an Xvfb of its own; both end with the block."""
    with private_xvfb(1024, 640) as xvfb:
        compositor = SeatWeston(xvfb.display, animations=False, socket_name=socket_name)
        with compositor:
            yield compositor


def socket_of(env: dict[str, str]) -> Path:
    return Path(env["XDG_RUNTIME_DIR"]) / env["WAYLAND_DISPLAY"]


def wait_until(condition: Callable[[], bool], what: str | Callable[[], str],
               timeout: float = DEADLINE) -> None:
    """Poll ``condition`` until true; past ``timeout``, fail naming ``what`` (a callable
    is asked then, for the state it describes)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what() if callable(what) else what}")
        time.sleep(0.01)


# -- the keymap ----------------------------------------------------------------------


@dataclass
class KeymapSeen:
    """A keymap event's descriptor, as its receiver finds it."""

    format: int
    size: int  # as announced
    link: str  # what /proc/self/fd names it
    access: int  # O_RDONLY, O_WRONLY or O_RDWR
    seals: int | None  # None: not a memfd (no seals to ask for)
    file_size: int
    data: bytes  # the announced size, read with pread
    write_refused: bool
    shared_writable_map_refused: bool


def examine_keymap(fmt: int, fd: int, size: int) -> KeymapSeen:
    try:
        seals: int | None = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
    except OSError:
        seals = None
    try:
        os.write(fd, b"x")
        write_refused = False
    except OSError:
        write_refused = True
    try:
        mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE).close()
        map_refused = False
    except OSError:
        map_refused = True
    return KeymapSeen(fmt, size, os.readlink(f"/proc/self/fd/{fd}"),
                      fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE, seals,
                      os.fstat(fd).st_size, os.pread(fd, size, 0), write_refused, map_refused)


class KeymapClient(PyClient):
    """A client with a ``wl_keyboard`` of a ``wl_seat`` bound at ``seat_version``."""

    def __init__(self, path: Path, seat_version: int) -> None:
        super().__init__(path)
        self.keymaps: list[KeymapSeen] = []
        self.seat = self.bind(WlSeat, seat_version)
        self.keyboard = self.seat.get_keyboard()
        self.keyboard.dispatcher["keymap"] = self._keymap
        self.roundtrip()

    def _keymap(self, _: Any, fmt: int, fd: int, size: int) -> None:
        try:
            self.keymaps.append(examine_keymap(fmt, fd, size))
        finally:
            os.close(fd)

    def keymap(self) -> KeymapSeen:
        self.wait(lambda: bool(self.keymaps), "the keymap")
        return self.keymaps[0]


# -- the clipboard -------------------------------------------------------------------


class Writer(threading.Thread):
    """Writes ``data`` (of ``mime``) into ``fd`` (blocking, 4 KiB at a time), then closes
    it."""

    def __init__(self, fd: int, data: bytes, mime: str) -> None:
        super().__init__(daemon=True)
        self.fd = fd
        self.mime = mime
        self.data = data
        self.written = 0
        self.error: OSError | None = None
        st = os.fstat(fd)
        self.inode = (st.st_dev, st.st_ino)
        self.pipe_size = pipe_size(fd)

    def run(self) -> None:
        view = memoryview(self.data)
        try:
            while self.written < len(view):
                self.written += os.write(self.fd, view[self.written:self.written + WRITE_CHUNK])
        except OSError as exc:
            self.error = exc
        finally:
            os.close(self.fd)


@dataclass
class Offered:
    """A selection this client offers: what each type's bytes are, and who wrote them."""

    proxy: Any
    data: dict[str, bytes]
    writers: list[Writer] = field(default_factory=list)
    cancelled: bool = False


@dataclass
class OfferSeen:
    proxy: Any
    mimes: list[str] = field(default_factory=list)


class ClipClient(PyClient):
    """A client with a mapped toplevel, the seat's keyboard and a data device."""

    def __init__(self, path: Path, title: str) -> None:
        super().__init__(path)
        self.title = title
        self.seat = self.bind(WlSeat, 7)
        self.keyboard = self.seat.get_keyboard()
        self.enter_serials: list[int] = []
        self.focused = False
        self.keyboard.dispatcher["keymap"] = lambda _, fmt, fd, size: os.close(fd)
        self.keyboard.dispatcher["enter"] = self._enter
        self.keyboard.dispatcher["leave"] = lambda *_: setattr(self, "focused", False)
        self.manager = self.bind(WlDataDeviceManager, 3)
        self.device = self.manager.get_data_device(self.seat)
        self.offers: dict[Any, OfferSeen] = {}
        self.selections: list[OfferSeen | None] = []
        self.device.dispatcher["data_offer"] = self._data_offer
        self.device.dispatcher["selection"] = (
            lambda _, offer: self.selections.append(None if offer is None
                                                    else self.offers[offer]))
        self.window = self.toplevel(title)
        self.show(self.window.surface, self.buffer(solid(160, 100, 0xFF336699)))
        self.roundtrip()
        self.wait(lambda: self.focused, f"keyboard focus on {title!r}")

    def disconnect(self) -> None:
        # pywayland gives a proxy the compositor made (a data offer) the Display of the
        # first registry it finds, often another client's: this client's disconnect
        # would not destroy it, and collecting it afterwards would touch freed memory.
        for seen in self.offers.values():
            if not seen.proxy.destroyed:
                seen.proxy.destroy()
        self.offers.clear()
        self.selections.clear()
        super().disconnect()

    def _enter(self, _: Any, serial: int, surface: Any, keys: Any) -> None:
        self.enter_serials.append(serial)
        self.focused = True

    def _data_offer(self, _: Any, offer: Any) -> None:
        seen = OfferSeen(offer)
        self.offers[offer] = seen
        offer.dispatcher["offer"] = lambda _, mime: seen.mimes.append(mime)

    def offer(self, data: dict[str, bytes]) -> Offered:
        """Set the selection (with the serial of this client's keyboard focus) to a
        source serving ``data``: each send is written by a thread of its own.

        Weston's clipboard manager asks for the first type at once, to keep a copy for
        when the source goes: that first transfer is waited for here (it is
        ``writers[0]``), so that the next send is a paste's."""
        proxy = self.manager.create_data_source()
        offered = Offered(proxy, data)

        def send(_: Any, mime: str, fd: int) -> None:
            writer = Writer(fd, offered.data[mime], mime)
            offered.writers.append(writer)
            writer.start()

        proxy.dispatcher["send"] = send
        proxy.dispatcher["cancelled"] = lambda _: setattr(offered, "cancelled", True)
        for mime in data:
            proxy.offer(mime)
        self.device.set_selection(proxy, self.enter_serials[-1])
        self.roundtrip()
        kept = self.served(offered, 1)
        first = next(iter(data))
        assert kept.mime == first, (kept.mime, first)
        kept.join(DEADLINE)
        assert (kept.error, kept.written) == (None, len(data[first])), \
            f"Weston's clipboard manager read {kept.written} bytes: {kept.error}"
        return offered

    def served(self, offered: Offered, count: int) -> Writer:
        """The ``count``-th writer of ``offered``, once Weston asked for it."""
        self.wait(lambda: len(offered.writers) >= count, f"send #{count} of the source")
        return offered.writers[count - 1]

    def selection(self, mime: str) -> OfferSeen:
        """The selection offered to this client, once it carries ``mime``."""
        self.wait(lambda: bool(self.selections) and self.selections[-1] is not None
                  and mime in self.selections[-1].mimes, f"a selection of {mime}")
        seen = self.selections[-1]
        assert seen is not None
        return seen

    def ask(self, offer: OfferSeen, mime: str) -> int:
        """Ask for ``offer`` as ``mime``; the read end of the pipe it comes on."""
        read_end, write_end = os.pipe2(os.O_CLOEXEC)
        try:
            offer.proxy.receive(mime, write_end)
            self.display.flush()
        finally:
            os.close(write_end)
        return read_end


def read_to_end(fd: int, timeout: float = DEADLINE) -> bytes:
    """All of ``fd`` up to its end (then closed), within ``timeout``."""
    deadline = time.monotonic() + timeout
    parts: list[bytes] = []
    try:
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"the pipe did not end within {timeout} s "
                                     f"({sum(map(len, parts))} bytes read)")
            ready, _, _ = select.select([fd], [], [], remaining)
            if not ready:
                continue
            chunk = os.read(fd, 1 << 16)
            if not chunk:
                return b"".join(parts)
            parts.append(chunk)
    finally:
        os.close(fd)


def pipe_size(fd: int) -> int:
    return fcntl.fcntl(fd, fcntl.F_GETPIPE_SZ)


def unread(fd: int) -> int:
    """Bytes waiting in the pipe ``fd`` reads."""
    buf = array.array("i", [0])
    fcntl.ioctl(fd, 0x541B, buf)  # FIONREAD
    return buf[0]
