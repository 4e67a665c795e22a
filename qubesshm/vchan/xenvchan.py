"""The vchan on Xen: libvchan-xen through cffi (ABI mode), driven from asyncio.

The library (QubesOS/qubes-core-vchan-xen) is loaded on first use, so that
nothing needs it off Xen; where it is missing the error says which package
provides it. Its calls are used only in ways that never block: a read asks for at
most ``libvchan_data_ready`` bytes, a write offers at most
``libvchan_buffer_space`` (both also ask the peer to notify us when that changes),
and the event channel's fd (``libvchan_fd_for_select``) is watched by the loop;
when it is readable ``libvchan_wait`` takes the pending event. A server serves one
client: ``XenListener.accept`` sets up a fresh server for each peer, as today's
GUI agent does when the daemon restarts. The socket vchan library has the same
API, which is how the tests drive this code without Xen.
"""

from __future__ import annotations

import asyncio
import os
import select
from collections.abc import Callable, Sequence
from typing import Any

from qubesshm.vchan.address import GUI_PORT, check_domid
from qubesshm.vchan.stream import VchanClosed, VchanError

LIBRARY_NAMES = ("libvchan-xen.so.1", "libvchan-xen.so")
"""The runtime package ships only the versioned name; the unversioned one is -dev's."""
PACKAGES = "libvchan-xen1 (Debian) or qubes-libvchan-xen (Fedora)"

VCHAN_DISCONNECTED = 0
VCHAN_CONNECTED = 1
VCHAN_WAITING = 2

_CDEF = """
typedef struct libvchan libvchan_t;
libvchan_t *libvchan_server_init(int domain, int port, size_t read_min, size_t write_min);
int libvchan_write(libvchan_t *ctrl, const char *data, size_t size);
int libvchan_read(libvchan_t *ctrl, char *data, size_t size);
int libvchan_wait(libvchan_t *ctrl);
void libvchan_close(libvchan_t *ctrl);
int libvchan_fd_for_select(libvchan_t *ctrl);
int libvchan_is_open(libvchan_t *ctrl);
int libvchan_data_ready(libvchan_t *ctrl);
int libvchan_buffer_space(libvchan_t *ctrl);
"""
_SYMBOLS = ("libvchan_server_init", "libvchan_write", "libvchan_read", "libvchan_wait",
            "libvchan_close", "libvchan_fd_for_select", "libvchan_is_open",
            "libvchan_data_ready", "libvchan_buffer_space")


class LibVchan:
    """A loaded libvchan: the cffi handle and the name it was loaded by."""

    def __init__(self, ffi: Any, lib: Any, name: str) -> None:
        self.ffi = ffi
        self.lib = lib
        self.name = name


_loaded: dict[tuple[str, ...], LibVchan] = {}


def load_libvchan(names: Sequence[str] = LIBRARY_NAMES) -> LibVchan:
    """The first of ``names`` that ``dlopen`` finds (cached), or a one-line
    ``VchanError`` naming the library and the package that provides it."""
    key = tuple(names)
    if key in _loaded:
        return _loaded[key]
    import cffi  # only where a Xen vchan is asked for

    ffi = cffi.FFI()
    ffi.cdef(_CDEF)
    for name in names:
        try:
            lib = ffi.dlopen(name)
        except OSError:
            continue
        missing = [symbol for symbol in _SYMBOLS if not hasattr(lib, symbol)]
        if missing:
            raise VchanError(f"{name} lacks {', '.join(missing)}: it is not a libvchan; "
                             f"reinstall {PACKAGES}")
        _loaded[key] = LibVchan(ffi, lib, name)
        return _loaded[key]
    raise VchanError(f"cannot load {' or '.join(names)}: libvchan-xen is not installed; "
                     f"install {PACKAGES} (a Qubes VM has it), or use --vchan socket off Xen")


class XenVchanStream:
    """One libvchan connection (``VchanStream``), its event fd watched by the loop."""

    def __init__(self, lib: LibVchan, ctrl: Any, on_close: Callable[[], None] | None = None
                 ) -> None:
        self._lib = lib
        self._ctrl: Any = ctrl
        self._on_close = on_close
        self._loop = asyncio.get_running_loop()
        self._fd: int = lib.lib.libvchan_fd_for_select(ctrl)
        self._waiters: list[asyncio.Future[None]] = []
        self._out = bytearray()
        self._broken = False
        self._loop.add_reader(self._fd, self._on_event)

    def _state(self) -> int:
        if self._ctrl is None or self._broken:
            return VCHAN_DISCONNECTED
        state: int = self._lib.lib.libvchan_is_open(self._ctrl)
        return state

    def _on_event(self) -> None:
        # Another callback of this loop round may have taken the event already (the
        # socket vchan's read does): libvchan_wait would then block.
        if not select.select([self._fd], [], [], 0)[0]:
            self._wake()
            return
        if self._lib.lib.libvchan_wait(self._ctrl) < 0:
            self._broken = True
            self._loop.remove_reader(self._fd)
        self._flush()
        self._wake()

    def _wake(self) -> None:
        for waiter in self._waiters:
            if not waiter.done():
                waiter.set_result(None)
        self._waiters.clear()

    async def _event(self) -> None:
        waiter: asyncio.Future[None] = self._loop.create_future()
        self._waiters.append(waiter)
        await waiter

    async def connected(self) -> None:
        """Wait until a client has connected; ``VchanError`` if it never can."""
        while (state := self._state()) == VCHAN_WAITING:
            await self._event()
        if state != VCHAN_CONNECTED:
            raise VchanError("the vchan peer went away before connecting")

    async def read(self, n: int = 65536) -> bytes:
        lib = self._lib.lib
        while self._ctrl is not None:
            ready: int = lib.libvchan_data_ready(self._ctrl)
            if ready > 0:
                size = min(n, ready)
                buf = self._lib.ffi.new("char[]", size)
                got: int = lib.libvchan_read(self._ctrl, buf, size)
                return bytes(self._lib.ffi.buffer(buf, got)) if got > 0 else b""
            if self._state() == VCHAN_DISCONNECTED:
                return b""
            await self._event()
        return b""

    def _flush(self) -> None:
        # No libvchan_is_open here: on Xen it costs a hypercall, and a write to a
        # vchan whose peer is gone fails by itself.
        lib = self._lib.lib
        while self._out and self._ctrl is not None and not self._broken:
            space: int = lib.libvchan_buffer_space(self._ctrl)
            if space <= 0:
                return
            chunk = bytes(self._out[:space])
            sent: int = lib.libvchan_write(self._ctrl, chunk, len(chunk))
            if sent <= 0:
                return
            del self._out[:sent]

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self._ctrl is None:
            raise VchanClosed("write on a closed vchan")
        self._out += data
        self._flush()

    async def drain(self) -> None:
        if self._ctrl is None:
            raise VchanClosed("drain on a closed vchan")
        while self._out:
            if self._state() == VCHAN_DISCONNECTED:
                raise VchanClosed(f"the vchan peer went away with {len(self._out)} bytes "
                                  "unsent")
            await self._event()
            self._flush()

    def close(self) -> None:
        if self._ctrl is None:
            return
        if not self._broken:
            self._loop.remove_reader(self._fd)
        ctrl, self._ctrl = self._ctrl, None
        self._lib.lib.libvchan_close(ctrl)
        self._wake()
        if self._on_close is not None:
            self._on_close()


class XenListener:
    """The server end of a Xen vchan (``VchanListener``): a fresh libvchan server for
    each peer, set up once the previous stream was closed."""

    def __init__(self, lib: LibVchan, remote_domid: int, port: int, read_min: int,
                 write_min: int) -> None:
        self._lib = lib
        self.remote_domid = check_domid(remote_domid, "GUI domain")
        self.port = port
        self._sizes = (read_min, write_min)
        self._idle = asyncio.Event()
        self._idle.set()
        self._lock = asyncio.Lock()
        self._closed = False

    async def accept(self) -> XenVchanStream:
        async with self._lock:
            await self._idle.wait()
            if self._closed:
                raise VchanClosed("the Xen vchan listener is closed")
            ffi, lib = self._lib.ffi, self._lib.lib
            ctrl = lib.libvchan_server_init(self.remote_domid, self.port, *self._sizes)
            if ctrl == ffi.NULL:
                raise VchanError(
                    f"libvchan_server_init(domain {self.remote_domid}, port {self.port}) "
                    f"failed: {os.strerror(ffi.errno) if ffi.errno else 'no reason given'}; "
                    "is this a Xen domain with xenstore and /dev/xen?")
            self._idle.clear()
            stream = XenVchanStream(self._lib, ctrl, on_close=self._idle.set)
            try:
                await stream.connected()
            except BaseException:
                stream.close()
                raise
            return stream

    def close(self) -> None:
        self._closed = True
        self._idle.set()


def serve_xen(remote_domid: int, port: int = GUI_PORT, read_min: int = 4096,
              write_min: int = 4096, *, lib: LibVchan | None = None) -> XenListener:
    """A listener for ``remote_domid`` on ``port``; loads libvchan-xen now (``lib``:
    another libvchan with the same API)."""
    return XenListener(lib or load_libvchan(), remote_domid, port, read_min, write_min)


async def open_xen_server(remote_domid: int, port: int = GUI_PORT, read_min: int = 4096,
                          write_min: int = 4096, *, lib: LibVchan | None = None
                          ) -> XenVchanStream:
    """Serve one vchan to ``remote_domid`` and return it once the client connected."""
    return await serve_xen(remote_domid, port, read_min, write_min, lib=lib).accept()
