"""pywayland (libwayland-client) clients for the compositor tests' precise cases.

``PyClient`` binds what the compositor offers and makes shm buffers from numpy
arrays; ``PyWindow`` is one xdg_toplevel or xdg_popup that has gone through its
initial configure. Pixels are 0xAARRGGBB words (ARGB8888/XRGB8888 in memory).
"""

from __future__ import annotations

import fcntl
import mmap
import os
import select
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray
from pywayland.client.display import Display
from pywayland.protocol.viewporter import WpViewporter
from pywayland.protocol.wayland import WlCompositor, WlOutput, WlShm, WlSubcompositor
from pywayland.protocol.xdg_decoration_unstable_v1 import ZxdgDecorationManagerV1
from pywayland.protocol.xdg_shell import XdgWmBase

ARGB8888 = 0
XRGB8888 = 1


class ClientFailed(RuntimeError):
    """The connection is broken (a protocol error, or the compositor left)."""


@dataclass
class PyBuffer:
    proxy: Any
    width: int
    height: int
    memory: mmap.mmap
    released: bool = False
    releases: int = 0

    def write(self, pixels: NDArray[np.uint32]) -> None:
        assert pixels.shape == (self.height, self.width)
        self.memory[:] = np.ascontiguousarray(pixels, dtype=np.uint32).tobytes()


@dataclass
class PyWindow:
    surface: Any
    xdg_surface: Any
    role: Any
    serials: list[int] = field(default_factory=list)
    configures: list[tuple[int, ...]] = field(default_factory=list)
    closed: bool = False
    popup_done: bool = False
    repositioned: list[int] = field(default_factory=list)

    def ack_latest(self) -> None:
        if self.serials:
            self.xdg_surface.ack_configure(self.serials[-1])
            self.serials.clear()


class PyClient:
    """One libwayland-client connection to the compositor under test."""

    def __init__(self, path: Path, *, timeout: float = 20.0) -> None:
        self.timeout = timeout
        self._callbacks: set[Any] = set()  # frame callbacks not done yet
        self.display = Display(str(path))
        self.display.connect()
        self.globals: dict[str, tuple[int, int]] = {}
        self.registry = self.display.get_registry()
        self.registry.dispatcher["global"] = self._on_global
        self.roundtrip()
        self.compositor = self.bind(WlCompositor, 5)
        self.shm = self.bind(WlShm, 1)
        self.wm_base = self.bind(XdgWmBase, 5)
        self.wm_base.dispatcher["ping"] = lambda base, serial: base.pong(serial)
        self.subcompositor = self.bind(WlSubcompositor, 1)
        self.viewporter = self.bind(WpViewporter, 1)
        self.frames_done = 0
        self.roundtrip()

    def _on_global(self, registry: Any, name: int, interface: str, version: int) -> None:
        self.globals[interface] = (name, version)

    def bind(self, kind: Any, version: int) -> Any:
        name, offered = self.globals[kind.name]
        return self.registry.bind(name, kind, min(version, offered))

    def bind_output(self) -> Any:
        return self.bind(WlOutput, 4)

    def bind_decoration_manager(self) -> Any:
        return self.bind(ZxdgDecorationManagerV1, 1)

    # -- the loop --------------------------------------------------------------

    def roundtrip(self) -> None:
        if self.display.roundtrip() < 0:
            raise ClientFailed("roundtrip failed: the connection is broken")

    def dispatch(self, timeout: float) -> None:
        try:
            self.display.dispatch(block=False)
            self.display.flush()
            ready, _, _ = select.select([self.display.get_fd()], [], [], timeout)
            if ready:
                self.display.read()
                self.display.dispatch(block=False)
        except RuntimeError as exc:
            raise ClientFailed(str(exc)) from exc

    def wait(self, condition: Callable[[], bool], what: str) -> None:
        deadline = time.monotonic() + self.timeout
        while not condition():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"client timed out waiting for {what}")
            self.dispatch(min(remaining, 0.1))

    def broken(self) -> bool:
        """Whether the connection hit a fatal (protocol) error."""
        try:
            return self.display.roundtrip() < 0
        except RuntimeError:
            return True

    def disconnect(self) -> None:
        self.display.disconnect()

    # -- buffers ---------------------------------------------------------------

    def buffer(self, pixels: NDArray[np.uint32], fmt: int = XRGB8888) -> PyBuffer:
        height, width = pixels.shape
        size = width * height * 4
        fd = os.memfd_create("compositor-test", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            os.ftruncate(fd, size)
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK)
            memory = mmap.mmap(fd, size)
            pool = self.shm.create_pool(fd, size)
        finally:
            os.close(fd)
        proxy = pool.create_buffer(0, width, height, width * 4, fmt)
        pool.destroy()
        buffer = PyBuffer(proxy, width, height, memory)

        def on_release(_: Any) -> None:
            buffer.released = True
            buffer.releases += 1

        proxy.dispatcher["release"] = on_release
        buffer.write(pixels)
        return buffer

    def show(self, surface: Any, buffer: PyBuffer | None, *, frame: bool = False) -> list[int]:
        """Attach (None: null), damage everything, commit; a frame callback's done
        list when ``frame``."""
        done: list[int] = []
        if buffer is not None:
            buffer.released = False
            surface.attach(buffer.proxy, 0, 0)
            surface.damage_buffer(0, 0, buffer.width, buffer.height)
        else:
            surface.attach(None, 0, 0)
        if frame:
            callback = surface.frame()
            # Kept until done: a pywayland proxy that is collected gets no more events.
            self._callbacks.add(callback)

            def on_done(cb: Any, time_ms: int) -> None:
                done.append(time_ms)
                self._callbacks.discard(cb)

            callback.dispatcher["done"] = on_done
        surface.commit()
        return done

    # -- windows ---------------------------------------------------------------

    def _xdg(self, surface: Any) -> tuple[Any, PyWindow]:
        xdg_surface = self.wm_base.get_xdg_surface(surface)
        window = PyWindow(surface, xdg_surface, None)
        xdg_surface.dispatcher["configure"] = lambda xs, serial: window.serials.append(serial)
        return xdg_surface, window

    def toplevel(self, title: str, *, before_commit: Callable[[PyWindow], None] | None = None
                 ) -> PyWindow:
        """A toplevel after its initial commit and configure (acknowledged)."""
        surface = self.compositor.create_surface()
        xdg_surface, window = self._xdg(surface)
        window.role = xdg_surface.get_toplevel()
        window.role.set_title(title)

        def on_configure(_: Any, width: int, height: int, states: Any) -> None:
            window.configures.append((width, height))

        def on_close(_: Any) -> None:
            window.closed = True

        window.role.dispatcher["configure"] = on_configure
        window.role.dispatcher["close"] = on_close
        if before_commit is not None:
            before_commit(window)
        surface.commit()
        self.wait(lambda: bool(window.serials), f"the initial configure of {title!r}")
        window.ack_latest()
        return window

    def popup(self, parent: PyWindow, positioner: Any) -> PyWindow:
        surface = self.compositor.create_surface()
        xdg_surface, window = self._xdg(surface)
        window.role = xdg_surface.get_popup(parent.xdg_surface, positioner)

        def on_configure(_: Any, x: int, y: int, width: int, height: int) -> None:
            window.configures.append((x, y, width, height))

        def on_done(_: Any) -> None:
            window.popup_done = True

        window.role.dispatcher["configure"] = on_configure
        window.role.dispatcher["popup_done"] = on_done
        window.role.dispatcher["repositioned"] = (
            lambda _, token: window.repositioned.append(token))
        surface.commit()
        self.wait(lambda: bool(window.serials), "the popup's initial configure")
        window.ack_latest()
        return window


def solid(width: int, height: int, colour: int) -> NDArray[np.uint32]:
    return np.full((height, width), colour, dtype=np.uint32)


def gradient(width: int, height: int, seed: int = 0) -> NDArray[np.uint32]:
    """Opaque pixels that differ from each other (and from their neighbours)."""
    y, x = np.mgrid[0:height, 0:width].astype(np.uint32)
    pixels = 0xFF000000 | ((x * 7 + seed) & 0xFF) << 16 | ((y * 5 + seed) & 0xFF) << 8
    out: NDArray[np.uint32] = (pixels | ((x + y + seed) & 0xFF)).astype(np.uint32)
    return out
