"""The sans-IO compositor: every client connection, the globals, the screen, the clock.

``Compositor`` holds what is shared between clients (the globals, the output,
the frame pacer, configure serials) and the agent's side: its ``Shell`` hears
of windows, and calls ``configure``, ``close``, ``set_screen`` and ``tick``.
The I/O layer makes one ``ClientCore`` per connection with ``connect``, feeds
it, and flushes the clients in ``dirty`` whenever ``wake`` is called.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Callable, Iterable

from ..shm.clientpool import SpentPools
from ..wire.codec import DEFAULT_MAX_MESSAGE_SIZE, ErrorCode
from ..wire.protocol import ProtocolTable, load_protocols
from . import (
    commits,
    cursor,
    datadevice,
    decoration,
    keyboard,
    output,
    pointer,
    popup,
    primaryselection,
    registry,
    seat,
    shm,
    subsurfaces,
    surfaces,
    toplevel,
    viewporter,
    xdg,
)
from .client import ClientCore, Handler
from .frames import FramePacer, timestamp_ms
from .keymap import Keymap
from .output import Output
from .popup import Popup
from .selection import Selection
from .shell import Shell, ShellWindow
from .surfaces import Surface
from .toplevel import Toplevel
from .transfers import Transfers
from .windows import Window, window_of
from .xdg import UNRESPONSIVE, WmBase

log = logging.getLogger("qubesshm.compositor")

DEFAULT_SCREEN = (1920, 1080)


def _handlers() -> dict[tuple[str, str], Handler]:
    merged: dict[tuple[str, str], Handler] = {}
    for module in (registry, surfaces, commits, subsurfaces, shm, output, xdg, toplevel,
                   popup, viewporter, decoration, datadevice, primaryselection, seat, keyboard,
                   pointer, cursor):
        table: dict[tuple[str, str], Handler] = module.HANDLERS
        overlap = merged.keys() & table.keys()
        assert not overlap, f"requests handled twice: {overlap}"
        merged.update(table)
    return merged


class _ShellCall:
    """``Compositor.shell_call``'s context, one per compositor (it nests: a depth)."""

    __slots__ = ("_compositor",)

    def __init__(self, compositor: Compositor) -> None:
        self._compositor = compositor

    def __enter__(self) -> None:
        self._compositor._shell_depth += 1

    def __exit__(self, *exc: object) -> None:
        self._compositor._shell_returned()


class Compositor:
    """All clients of one Wayland socket, and the agent's view of their windows."""

    def __init__(self, shell: Shell, *, protocol: ProtocolTable | None = None,
                 clock: Callable[[], float] = time.monotonic, refresh: float = 60.0,
                 screen: tuple[int, int] = DEFAULT_SCREEN, ping_timeout: float | None = None,
                 max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE,
                 keymap: Keymap | None = None) -> None:
        self.protocol = protocol if protocol is not None else load_protocols()
        self.shell = shell
        self.clock = clock
        self.outputs = Output(screen[0], screen[1], refresh)
        self.frames = FramePacer(refresh)
        self.ping_timeout = ping_timeout
        self.max_message_size = max_message_size
        self.serial = 0
        self.handlers = _handlers()
        self.seat = seat.Seat(self, keymap)
        binds: dict[str, registry.Bind] = {
            "wl_shm": shm.bind_shm,
            "wl_output": self.outputs.bind,
            "xdg_wm_base": xdg.bind_wm_base,
            "wl_seat": self.seat.bind,
        }
        self.globals = registry.make_globals(self.protocol, binds)
        self.clients: set[ClientCore] = set()
        self.wm_bases: set[WmBase] = set()  # pinged when ping_timeout is set
        # Clients with output to flush; the I/O layer empties it after ``wake``.
        self.dirty: set[ClientCore] = set()
        self.wake: Callable[[], None] | None = None
        self._numbers = itertools.count(1)
        self._windows: dict[int, Window] = {}
        self._shell_depth = 0
        self._shell_call = _ShellCall(self)
        self._faults: list[tuple[ClientCore, int, ErrorCode | int, str]] = []
        # Pipe writes for the I/O layer, and the clipboard and primary selection.
        self.transfers = Transfers(self._wake)
        # Pools no client object needs any more, fds still open: the I/O layer closes
        # them a moment after flushing the replies.
        self.spent = SpentPools()
        self.selection = Selection(self, self.transfers)

    @property
    def screen_size(self) -> tuple[int, int]:
        return self.outputs.width, self.outputs.height

    # -- connections -------------------------------------------------------------

    def connect(self, *, pid: int | None = None) -> ClientCore:
        client = ClientCore(self, next(self._numbers), self.protocol, self.handlers, pid=pid,
                            max_message_size=self.max_message_size)
        client.on_output = self._client_output
        self.clients.add(client)
        return client

    def _client_output(self, client: ClientCore) -> None:
        self.dirty.add(client)
        self._wake()

    def _wake(self) -> None:
        if self.wake is not None:
            self.wake()

    def client_gone(self, client: ClientCore) -> None:
        """The connection closed (or broke the protocol): forget all of it."""
        self.clients.discard(client)
        for window in list(client.windows):
            window.alive = False
            self._windows.pop(window.shell_window.id, None)
            if window.mapped:
                window.shell_window.mapped = False
                with self.shell_call():
                    self.shell.window_unmapped(window.shell_window)
        client.windows.clear()
        self.seat.client_gone(client)
        self.frames.forget(client)
        self.wm_bases = {b for b in self.wm_bases if b.client is not client}
        self.outputs.client_gone(client)
        self.selection.client_gone(client)
        shm.close_client_pools(client)
        self._faults = [f for f in self._faults if f[0] is not client]
        with self.shell_call():
            self.shell.client_gone(client.number)

    def next_serial(self) -> int:
        self.serial = (self.serial + 1) & 0xFFFFFFFF
        return self.serial

    # -- what the protocol modules tell --------------------------------------------

    def window_created(self, window: Window) -> None:
        self._windows[window.shell_window.id] = window

    def window_retired(self, window: Window) -> None:
        self._windows.pop(window.shell_window.id, None)
        self.seat.window_unmapped(window)

    def surface_committed(self, surface: Surface, changed: bool) -> None:
        window = window_of(surface)
        if window is not None and window.alive:
            was_mapped = window.mapped
            window.committed(root=surface is window.surface, changed=changed)
            if was_mapped and not window.mapped:
                self.seat.window_unmapped(window)
        else:
            self.seat.surface_committed(surface)

    def tree_changed(self, parent: Surface, left: Surface | None = None) -> None:
        """A subsurface left ``parent``'s tree at once (not at a commit)."""
        window = window_of(parent)
        if window is not None and window.alive and window.mapped:
            window.update(True)

    def surface_destroyed(self, surface: Surface) -> None:
        client = surface.client
        self.seat.surface_destroyed(surface)
        viewporter.surface_destroyed(client, surface)
        sub = surface.subsurface
        if sub is not None:
            parent = sub.detach()
            sub.surface = None
            surface.subsurface = None
            if parent is not None:
                surface.alive = False
                self.tree_changed(parent, surface)
        for child in list(surface.children):
            child.detach()
        xdg_surface = surface.xdg
        if xdg_surface is not None and xdg_surface.window is not None:
            # The role object is inert from now on.
            xdg_surface.window.retire()

    def buffer_destroyed(self, client: ClientCore, buffer: shm.ShmBuffer) -> None:
        for surface in client.surfaces:
            surface.clear_pending_buffer(buffer)

    def dismiss_popups_of(self, parent: Window) -> None:
        for window in list(parent.client.windows):
            if isinstance(window, Popup) and window.parent is parent:
                window.dismiss()

    def fault(self, client: ClientCore, object_id: int, code: ErrorCode | int,
              message: str) -> None:
        """A protocol error found outside the client's own request (reading its buffer
        for the agent): posted once the agent's call returns."""
        if self._shell_depth:
            self._faults.append((client, object_id, code, message))
        else:
            client.post_error(object_id, code, message)

    def shell_call(self) -> _ShellCall:
        """Around a call into the shell: errors found meanwhile wait for its end."""
        return self._shell_call

    def _shell_returned(self) -> None:
        self._shell_depth -= 1
        if not self._shell_depth:
            faults, self._faults = self._faults, []
            for client, object_id, code, message in faults:
                client.post_error(object_id, code, message)

    # -- the agent's side ------------------------------------------------------------

    def _window(self, w: ShellWindow) -> Window | None:
        window = self._windows.get(w.id)
        return window if window is not None and window.alive else None

    def configure(self, w: ShellWindow, width: int, height: int,
                  states: Iterable[int] = ()) -> None:
        """Ask a toplevel to take this size (0: its own choice) and these states."""
        window = self._window(w)
        if not isinstance(window, Toplevel) or window.client.closed:
            return
        if width < 0 or height < 0:
            raise ValueError(f"configure size {width}x{height} is negative")
        if window.xdg.initial_commit_done:
            window.send_configure(width, height, states)
        else:
            window.last_configure = (width, height, tuple(int(s) for s in states))

    def close(self, w: ShellWindow) -> None:
        """Ask the client to close a toplevel; a popup is dismissed."""
        window = self._window(w)
        if window is None or window.client.closed:
            return
        if isinstance(window, Toplevel):
            window.client.send(window.id, "close")
        elif isinstance(window, Popup):
            window.dismiss()

    def set_screen(self, width: int, height: int) -> None:
        """The screen's size changed (the daemon's ``MSG_XCONF``)."""
        if width <= 0 or height <= 0:
            raise ValueError(f"screen size {width}x{height} is not positive")
        self.outputs.set_size(width, height)

    def tick(self, now: float) -> float | None:
        """Run the frame callbacks (and pings) that are due; when next to call."""
        ready = self.frames.take(now)
        if ready:
            stamp = timestamp_ms(now)
            for client, callbacks in ready.items():
                for callback in callbacks:
                    client.send(callback, "done", stamp)
                    client.destroy(callback)
        due = [d for d in (self.frames.due(), self._pings(now)) if d is not None]
        return max(min(due), now) if due else None

    def _pings(self, now: float) -> float | None:
        timeout = self.ping_timeout
        if timeout is None:
            return None
        next_due: float | None = None
        for base in list(self.wm_bases):
            client = base.client
            if client.closed:
                continue
            if base.ping_serial is None:
                if now - base.ping_sent_at >= timeout:
                    base.ping_serial = self.next_serial()
                    base.ping_sent_at = now
                    client.send(base.id, "ping", base.ping_serial)
            elif now - base.ping_sent_at >= timeout:
                client.post_error(base.id, UNRESPONSIVE, f"no pong to ping "
                                  f"{base.ping_serial} within {timeout:g} s")
                continue
            deadline = base.ping_sent_at + timeout
            next_due = deadline if next_due is None else min(next_due, deadline)
        return next_due

    def windows(self) -> list[ShellWindow]:
        """Every live window, mapped or not."""
        return [w.shell_window for w in self._windows.values() if w.alive]


    def toplevel_configured(self, w: ShellWindow) -> tuple[int, int, frozenset[int]] | None:
        """The size and states a live toplevel was last configured with (None for
        anything else)."""
        window = self._window(w)
        return window.current() if isinstance(window, Toplevel) else None

    def set_states(self, w: ShellWindow, *, add: Iterable[int] = (),
                   remove: Iterable[int] = (), size: tuple[int, int] | None = None,
                   force: bool = False) -> bool:
        """Configure a toplevel again with ``add`` and without ``remove`` among its
        states, at ``size`` (else its last one): sent when something changed, or when
        ``force`` (an answer the client waits for). False if ``w`` is no live toplevel."""
        current = self.toplevel_configured(w)
        if current is None:
            return False
        width, height, states = current
        new_states = (states | frozenset(int(s) for s in add)) - frozenset(
            int(s) for s in remove)
        new_size = size if size is not None else (width, height)
        if force or new_size != (width, height) or new_states != states:
            self.configure(w, new_size[0], new_size[1], sorted(new_states))
        return True
