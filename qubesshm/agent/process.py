"""The agent as a running process: compositor, windows, grants and the daemon's vchan.

Thin I/O: wires the Wayland compositor (``compositor``) to the agent's windows
(``windows.AgentWindows``, its ``Shell``), those to the grant lifetimes of agent
mode (``grants.agentareas``) and to the GUI daemon (``link.DaemonLink``), and
runs their timers on the asyncio loop: frame callbacks, late releases and
deferred batches, the simulated kernel's reclaim tick. The daemon's input goes
to the compositor's seat (``input.AgentInput``), its clipboard messages to
``clipboard.AgentClipboard``, whose reads of a selection's pipe run here,
non-blocking and bounded in time. ``NAME.stats`` serves the counters as
``qubesshm stats`` reads them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..compositor.core import Compositor
from ..compositor.keymap import Keymap
from ..compositor.scene import SceneNode
from ..compositor.server import CompositorServer
from ..compositor.shell import ShellWindow
from ..grants.agentareas import AgentArea, AgentLifetimes, image_pages, image_size
from ..grants.ledger import GrantLedger
from ..grants.lifetimes import LifetimePolicy
from ..grants.params import Kernel
from ..guiproto import messages as gm
from ..pixels.region import Rect
from ..relay.control import ControlSocket, snapshot, stats_path
from ..relay.listener import Listener
from ..vchan.address import socket_path
from ..vchan.socketvchan import serve_socket
from ..vchan.stream import VchanListener
from .clipboard import CLIPBOARD_MESSAGES, AgentClipboard, ClipboardRead
from .grants import AgentGrants, open_agent_grants
from .input import INPUT_MESSAGES, AgentInput
from .link import DaemonLink
from .windows import AgentWindows

log = logging.getLogger("qubesshm.agent")

GUI_PORT = 6000
TICK_INTERVAL = 0.25
AWAITING_TICK_INTERVAL = 0.05
# After hanging up, how long a GUI domain of the simulated kernel may take to let go.
EXIT_GRACE = 1.0


@dataclass
class AgentOptions:
    socket: str
    vchan: str = "socket"  # or "xen"
    vchan_dir: Path | None = None
    domid: int = 1
    gui_domid: int = 0
    refresh: float = 60.0
    grants: str = "sim"
    kernel: Kernel | None = None
    policy: LifetimePolicy | None = None
    gntalloc_limit: int | None = None
    keyboard_layout: str = "us"  # Qubes' layout+variant+options


class AgentShell:
    """The compositor's ``Shell``: ``AgentWindows``, with the ledger's counters kept
    and the daemon told after every change."""

    def __init__(self, windows: AgentWindows[AgentArea], ledger: GrantLedger,
                 lifetimes: AgentLifetimes, changed: Callable[[], None]) -> None:
        self.windows = windows
        self.ledger = ledger
        self.lifetimes = lifetimes
        self.changed = changed
        self._clients: set[int] = set()
        # Commits are drawn at most once a refresh: one that arrives is noted here and
        # drawn (the newest tree, the damage gathered since) when ``render_now`` is
        # set; a buffer it supersedes meanwhile goes back to the client unread.
        self.render_now = False
        self.due: set[ShellWindow] = set()
        self.render_soon: Callable[[], None] = lambda: None
        self.input: AgentInput | None = None

    def _client(self, w: ShellWindow) -> None:
        if w.client not in self._clients:
            self._clients.add(w.client)
            self.lifetimes.open_connection(
                w.client, [self.ledger.client(w.client), self.ledger.total])

    def client_gone(self, number: int) -> None:
        if number in self._clients:
            self._clients.discard(number)
            self.lifetimes.close_connection(number)
            self.ledger.forget(number)

    def window_mapped(self, w: ShellWindow) -> None:
        self._client(w)
        self.windows.window_mapped(w)
        self.changed()

    def window_due(self, w: ShellWindow) -> bool:
        """Drawn now while drawing (``render_now``); else noted for the next refresh,
        and the compositor builds no tree for it until then."""
        self._client(w)
        if self.render_now:
            return True
        w.coalesce = True
        self.due.add(w)
        self.render_soon()
        return False

    def window_committed(self, w: ShellWindow, tree: SceneNode, geometry: Rect) -> bool:
        self._client(w)
        before = self.windows.counters.damaged_pixels
        done = self.windows.window_committed(w, tree, geometry)
        if done:
            copied = (self.windows.counters.damaged_pixels - before) * 4
            for counters in (self.ledger.client(w.client), self.ledger.total):
                counters.commits += 1
                counters.bytes_damaged += copied
                counters.bytes_copied += copied
        self.changed()
        return done

    def window_unmapped(self, w: ShellWindow) -> None:
        self.due.discard(w)
        self.windows.window_unmapped(w)
        if self.input is not None:
            self.input.window_gone(w)
        self.changed()

    def title_changed(self, w: ShellWindow) -> None:
        self.windows.title_changed(w)
        self.changed()

    def app_id_changed(self, w: ShellWindow) -> None:
        self.windows.app_id_changed(w)

    def size_hints_changed(self, w: ShellWindow) -> None:
        self.windows.size_hints_changed(w)
        self.changed()

    def parent_changed(self, w: ShellWindow) -> None:
        self.windows.parent_changed(w)

    def screen(self) -> Rect:
        return self.windows.screen()

    def window_origin(self, w: ShellWindow) -> tuple[int, int] | None:
        return self.windows.window_origin(w)

    def cursor_changed(self, w: ShellWindow, shape: str | None) -> None:
        self.windows.cursor_changed(w, shape)
        self.changed()

    def fullscreen_requested(self, w: ShellWindow, on: bool) -> None:
        self.windows.fullscreen_requested(w, on)
        self.changed()

    def maximize_requested(self, w: ShellWindow, on: bool) -> None:
        self.windows.maximize_requested(w, on)

    def minimize_requested(self, w: ShellWindow) -> None:
        self.windows.minimize_requested(w)
        self.changed()

    def interactive_requested(self, w: ShellWindow, what: str) -> None:
        self.windows.interactive_requested(w, what)


class ClipboardPipes:
    """The I/O of ``AgentClipboard``'s reads: each selection pipe read on the loop as
    it becomes readable, stopped (and closed) when the clipboard is done with it or
    at its deadline; ``done`` is called when a read ended (an answer to send)."""

    def __init__(self, clipboard: AgentClipboard, loop: asyncio.AbstractEventLoop,
                 clock: Callable[[], float], done: Callable[[], None]) -> None:
        self.clipboard = clipboard
        self.loop = loop
        self.clock = clock
        self.done = done
        self.reads: dict[ClipboardRead, asyncio.TimerHandle] = {}

    def service(self) -> None:
        """Start the reads the clipboard asked for; stop those it is done with."""
        for read in self.clipboard.take_started():
            delay = max(0.0, read.deadline - self.clock())
            self.reads[read] = self.loop.call_later(delay, self._expired, read)
            self.loop.add_reader(read.fd, self._readable, read)
        for read in [r for r in self.reads if r.done]:
            self._stop(read)

    def close(self) -> None:
        for read in list(self.reads):
            self._stop(read)

    def _readable(self, read: ClipboardRead) -> None:
        try:
            chunk = os.read(read.fd, 65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            log.warning("reading the clipboard's text failed: %s", exc.strerror or exc)
            chunk = b""
        if not self.clipboard.feed(read, chunk):
            self._stop(read)
            self.done()

    def _expired(self, read: ClipboardRead) -> None:
        self.clipboard.expire(read)
        self._stop(read)
        self.done()

    def _stop(self, read: ClipboardRead) -> None:
        handle = self.reads.pop(read, None)
        if handle is None:
            return
        handle.cancel()
        self.loop.remove_reader(read.fd)
        with contextlib.suppress(OSError):
            os.close(read.fd)


class AgentProcess:
    """Everything ``qubesshm agent`` runs; ``start`` inside the loop, ``close`` at exit."""

    def __init__(self, options: AgentOptions, *,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.options = options
        self.clock = clock
        self.ledger = GrantLedger()
        self.grants: AgentGrants | None = None
        self.lifetimes: AgentLifetimes | None = None
        self.windows: AgentWindows[AgentArea] | None = None
        self.compositor: Compositor | None = None
        self.server: CompositorServer | None = None
        self.link: DaemonLink | None = None
        self.vchan: VchanListener | None = None
        self.control: ControlSocket | None = None
        self._link_task: asyncio.Task[None] | None = None
        self._tick: asyncio.TimerHandle | None = None
        self._flush_soon = False
        self.loop: asyncio.AbstractEventLoop | None = None
        self.socket_path: Path | None = None
        self.room_warning: str | None = None
        self._room_checked = 0  # the daemon connection whose screen was checked
        self.shell: AgentShell | None = None
        self.input: AgentInput | None = None
        self.clipboard: AgentClipboard | None = None
        self.pipes: ClipboardPipes | None = None
        self._render_handle: asyncio.TimerHandle | None = None
        self._last_render = -1e9
        self._period = 1.0 / 60

    @property
    def vchan_path(self) -> Path:
        directory = self.options.vchan_dir
        assert directory is not None
        return socket_path(directory, self.options.domid, self.options.gui_domid, GUI_PORT)

    async def start(self) -> None:
        opts = self.options
        self.loop = asyncio.get_running_loop()
        kernel = opts.kernel
        assert kernel is not None or opts.grants == "xen"
        self.grants = open_agent_grants(opts.grants, opts.domid, opts.gui_domid,
                                        kernel)  # type: ignore[arg-type]
        self.grants.start(self.loop)
        if opts.gntalloc_limit is not None:
            self.grants.backend.set_gntalloc_limit(opts.gntalloc_limit)
        self.lifetimes = AgentLifetimes(self.grants, opts.policy, clock=self.clock)
        self.lifetimes.open_connection(0, [self.ledger.total])  # the barrier window
        self.lifetimes.on_room = self._room
        self.windows = AgentWindows(self.lifetimes, self.clock)
        shell = AgentShell(self.windows, self.ledger, self.lifetimes, self._changed)
        shell.render_soon = self._render_soon
        self.shell = shell
        self._period = 1.0 / opts.refresh
        self.compositor = Compositor(shell, clock=self.clock, refresh=opts.refresh,
                                     screen=(1920, 1080),
                                     keymap=Keymap.parse(opts.keyboard_layout))
        self.windows.wm = self.compositor
        self.input = AgentInput(self.compositor.seat, self.compositor,
                                self.windows.window_by_id, self.clock)
        shell.input = self.input
        windows = self.windows
        self.clipboard = AgentClipboard(self.compositor.selection, windows.send,
                                        lambda: windows.version, self.clock)
        self.pipes = ClipboardPipes(self.clipboard, self.loop, self.clock, self._changed)
        listener = Listener(opts.socket)
        self.socket_path = listener.path
        if self.grants.kernel_dir is not None:
            self.grants.kernel_dir.note_socket(listener.path)
        self.server = CompositorServer(self.compositor, listener, clock=self.clock)
        self.control = ControlSocket(stats_path(listener.path), self.stats)
        if opts.vchan == "xen":
            from ..vchan.xenvchan import serve_xen

            self.vchan = serve_xen(opts.gui_domid, GUI_PORT)
        else:
            self.vchan = await serve_socket(self.vchan_path)
        self.link = DaemonLink(self.vchan, self.windows, after_messages=self._daemon_spoke,
                               dispatch=self._daemon_message, disconnected=self._daemon_gone)
        self._link_task = self.loop.create_task(self.link.run())
        self._tick = self.loop.call_later(TICK_INTERVAL, self._timers)

    def _changed(self) -> None:
        if not self._flush_soon and self.loop is not None:
            self._flush_soon = True
            self.loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_soon = False
        if self.link is not None:
            self.link.flush()

    def _daemon_message(self, msg: gm.Message) -> None:
        assert self.windows is not None
        if msg.type in INPUT_MESSAGES:
            if self.input is not None:
                self.input.on_message(msg)
        elif msg.type in CLIPBOARD_MESSAGES:
            if self.clipboard is not None:
                self.clipboard.on_message(msg)
        else:
            self.windows.on_message(msg)

    def _daemon_gone(self) -> None:
        if self.input is not None:
            self.input.reset()

    def _daemon_spoke(self) -> None:
        """A screen size may have come with a new daemon."""
        assert self.windows is not None and self.compositor is not None
        if self.pipes is not None:
            self.pipes.service()
        screen = self.windows.screen_rect
        if (screen.width, screen.height) != self.compositor.screen_size:
            self.compositor.set_screen(screen.width, screen.height)
        if self.link is not None and self.link.connections != self._room_checked:
            self._room_checked = self.link.connections
            self._check_room(screen.width, screen.height)
        self._retry_waiting()
        if self.server is not None:
            self.server.service()

    def _check_room(self, width: int, height: int) -> None:
        """Say in one line when the limits cannot hold a window the size of the
        daemon's screen (a maximized app): such a window would not be shown."""
        assert self.lifetimes is not None
        why = self.lifetimes.room_for(image_pages(image_size(width, height)))
        if why is not None and why != self.room_warning:
            self.room_warning = why
            log.warning("%s one window the size of the GUI daemon's %dx%d screen: such a "
                        "window will not be shown; raise it (--gntalloc-limit 1073741824 "
                        "or qubesshm tune, as Qubes does in its VMs; --client-pages)",
                        why, width, height)

    def _room(self) -> None:
        if self.loop is not None:
            self.loop.call_soon(self._retry_waiting)

    def _retry_waiting(self) -> None:
        if self.windows is not None and self.windows.waiting():
            self._render_soon()

    def _render_soon(self) -> None:
        """Draw what waits at the next refresh (at once when the last was a refresh
        period ago or more)."""
        if self._render_handle is not None or self.loop is None:
            return
        now = self.clock()
        delay = max(0.0, self._last_render + self._period - now)
        self._render_handle = self.loop.call_later(delay, self._render)

    def _render(self) -> None:
        self._render_handle = None
        self._last_render = self.clock()
        shell = self.shell
        assert shell is not None and self.windows is not None
        shell.render_now = True
        try:
            for w in list(shell.due):
                shell.due.discard(w)
                w.render_pending()
            for w in self.windows.waiting():
                if not w.render_pending():
                    break  # still no room: the rest neither
        except Exception:
            log.exception("internal error drawing windows")
        finally:
            shell.render_now = False
        self._changed()
        if self.server is not None:
            self.server.service()

    def _timers(self) -> None:
        assert self.grants is not None and self.lifetimes is not None
        try:
            self.grants.tick()
            self.lifetimes.poll()
        except Exception:
            log.exception("the grant layer's timer failed")
        self._retry_waiting()
        interval = AWAITING_TICK_INTERVAL if self.lifetimes.awaiting else TICK_INTERVAL
        assert self.loop is not None
        self._tick = self.loop.call_later(interval, self._timers)

    def stats(self) -> dict[str, Any]:
        assert self.lifetimes is not None and self.windows is not None
        data = snapshot(self.ledger, self.grants, self.lifetimes)  # type: ignore[arg-type]
        w = self.windows.counters
        data["mode"] = "agent"
        if data.get("lifetimes") is not None:
            data["lifetimes"].update(self.lifetimes.stats(pending_acks=self.windows.acks.in_flight))
        data["daemon"] = {
            "connected": self.windows.connected,
            "connections": self.link.connections if self.link is not None else 0,
            "windows": len(self.windows.shown()),
            "created": w.created, "destroyed": w.destroyed, "dumps": w.dumps,
            "barriers": w.barriers, "shmimages": w.shmimages, "acks": w.acks,
            "pending_acks": self.windows.acks.in_flight,
        }
        return data

    async def close(self, settle: float = 1.0,
                    daemon_gone: Callable[[], Awaitable[None]] | None = None
                    ) -> dict[str, Any]:
        """Stop: clients first, then wait (up to ``settle`` s) for the daemon's ACKs of
        what they let go; hang up on the daemon, which lets go of every dump, and wait
        for that (``daemon_gone``, else up to ``EXIT_GRACE`` s for the GUI domain's
        simulated mappings to go); then end every grant. The counters at the end."""
        if self.server is not None:
            self.server.close()
        loop = self.loop
        if self.link is not None and loop is not None and self.lifetimes is not None:
            self.link.flush()
            deadline = loop.time() + settle
            while (self.windows is not None and self.windows.connected
                   and self.lifetimes.pending_releases and loop.time() < deadline):
                await asyncio.sleep(AWAITING_TICK_INTERVAL)
        if self._tick is not None:
            self._tick.cancel()
        if self.pipes is not None:
            self.pipes.close()
        if self._render_handle is not None:
            self._render_handle.cancel()
        if self._link_task is not None:
            self._link_task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._link_task
        if self.vchan is not None:
            self.vchan.close()
        if daemon_gone is not None:
            await daemon_gone()
        elif loop is not None and self.grants is not None and self.grants.hypercalls:
            deadline = loop.time() + EXIT_GRACE
            while self.grants.hypercalls.connections and loop.time() < deadline:
                await asyncio.sleep(AWAITING_TICK_INTERVAL)
        if self.lifetimes is not None:
            if self.grants is not None:
                self.grants.tick()
            self.lifetimes.close()
            if self.grants is not None:
                self.grants.tick()
        final = self.stats() if self.lifetimes is not None else {}
        if self.control is not None:
            self.control.close()
        if self.grants is not None:
            self.grants.close()
        return final
