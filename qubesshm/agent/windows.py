"""The agent's windows: the compositor's toplevels and popups as GUI-daemon windows.

Sans-IO. The compositor calls this as a ``Shell``; what the daemon must be told
comes out in ``outbox`` as ``(window id, message body)`` pairs, in order; the
daemon's messages go in through ``on_message``. Each mapped window has an
*area*: grant pages holding its image as the daemon reads it (XRGB8888, stride
4 * width, from byte 0), from the injected ``Areas`` (which recycles them).

A window's life on the daemon: ``CREATE`` (placed here), ``WMNAME``,
``WMCLASS`` (the daemon takes a class only before the window is mapped),
``WINDOW_HINTS``, ``WINDOW_DUMP`` of its first area, ``MAP``, one full
``SHMIMAGE``; then one ``SHMIMAGE`` per damaged rectangle; a new size brings a
new area, one ``WINDOW_DUMP`` and a ``CONFIGURE``; going away, ``UNMAP`` and
``DESTROY``. Window ids are never reused on one connection, so a late
``DESTROY`` echo can never name a newer window.

Window management goes both ways through the injected ``WindowManager`` (the
compositor): the daemon's ``CONFIGURE`` (the user moved or resized the window
in dom0) is echoed, which the daemon waits for, and a new size becomes an
``xdg_toplevel.configure``; the client's next buffer brings the new area.
``CLOSE`` asks the client to close. ``WINDOW_FLAGS`` from the daemon set the
toplevel's fullscreen state, and minimized as suspended. A client's fullscreen
and minimize requests go to the daemon as ``WINDOW_FLAGS`` (the daemon and
dom0's window manager decide, and answer as above); maximize, which the
protocol cannot carry, and interactive move, resize and window menu are
declined. Cursor shapes go out as ``MSG_CURSOR`` (``cursors``).

An area stops being current on its window's next dump, ``UNMAP`` or
``DESTROY``; it is released by the rule of ``acks.AckOrder`` (a one-page barrier
window, created and never mapped, gives an ACK when nothing else would), and
only then recycled. A daemon without ACKs, or one that went away, leaves the
areas to the late path of ``Areas``.
"""

from __future__ import annotations

import logging
import mmap
import weakref
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Generic, Protocol, TypeVar

from ..compositor.scene import SceneNode
from ..compositor.shell import ShellWindow, ToplevelState, WindowKind
from ..grants.agentareas import image_pages, image_size
from ..grants.lifetimes import GrantLimit, NoRoom
from ..guiproto import messages as gm
from ..pixels.region import Rect
from ..windows.render import WindowImage
from .acks import AckOrder
from .cursors import cursor_message

log = logging.getLogger("qubesshm.agent")

BARRIER_WINDOW = 1  # the one-page window whose dumps are ACK barriers; never mapped
FIRST_WINDOW = 2
CASCADE_STEP = 32  # pixels between toplevels placed one after another
MAX_ID = 2**32 - 1


class AreaLike(Protocol):
    """What the agent needs of a grant area."""

    @property
    def refs(self) -> tuple[int, ...]: ...

    @property
    def memory(self) -> mmap.mmap: ...


A = TypeVar("A", bound=AreaLike)


class WindowManager(Protocol):
    """What the agent asks of the compositor's windows (``Compositor`` is one)."""

    def set_states(self, w: ShellWindow, *, add: Iterable[int] = (),
                   remove: Iterable[int] = (), size: tuple[int, int] | None = None,
                   force: bool = False) -> bool:
        """Configure toplevel ``w`` again with these state changes and size (its
        last ones otherwise); sent if anything changed or ``force``. False: ``w``
        is no live toplevel."""
        ...

    def toplevel_configured(self, w: ShellWindow) -> tuple[int, int, frozenset[int]] | None:
        """The size and states ``w`` was last configured with."""
        ...

    def close(self, w: ShellWindow) -> None:
        """Ask the client to close ``w`` (a popup is dismissed)."""


class Areas(Protocol[A]):
    """The grant lifetimes the agent draws areas from (``grants.agentareas``)."""

    def take(self, owner: int, size: int) -> A:
        """An area of at least ``size`` bytes; raises ``NoRoom`` or ``GrantLimit``."""
        ...

    def let_go(self, area: A, *, recycle: bool = False) -> None:
        """``area`` is no longer current; the daemon may still map it. ``recycle``:
        once released, cache it for another window rather than end it."""

    def confirm_released(self, area: A) -> object:
        """The daemon can no longer map ``area``: recycle or end it."""

    def all_late(self) -> int:
        """Nothing let go will be confirmed: the late path for all of them."""

    def note_ack(self, waited: float | None) -> None:
        """An ACK came, ``waited`` seconds after its dump was sent."""


@dataclass(eq=False)
class GuiWindow(Generic[A]):
    """One window as the daemon knows it."""

    id: int
    shell: ShellWindow
    x: int
    y: int
    width: int = 0
    height: int = 0
    override_redirect: bool = False
    area: A | None = None
    image: WindowImage = field(default_factory=lambda: WindowImage(0, 0))
    shown: bool = False  # MAP sent
    cursor: gm.Cursor = field(default_factory=lambda: gm.Cursor(gm.CURSOR_DEFAULT))
    flags: int = 0  # WINDOW_FLAGS the daemon last said are set


@dataclass
class WindowCounters:
    created: int = 0
    destroyed: int = 0
    dumps: int = 0
    barriers: int = 0
    shmimages: int = 0
    damaged_pixels: int = 0
    acks: int = 0
    released_by_ack: int = 0
    renders_waiting: int = 0


def _text(value: str, size: int) -> bytes:
    """``value`` in UTF-8, cut at a character boundary to fit ``size`` - 1 bytes."""
    data = value.replace("\0", " ").encode("utf-8", "replace")
    if len(data) < size:
        return data
    return data[: size - 1].decode("utf-8", "ignore").encode("utf-8")


class AgentWindows(Generic[A]):
    """The window-manager state of the agent for one compositor."""

    def __init__(self, areas: Areas[A], clock: Callable[[], float],
                 wm: WindowManager | None = None) -> None:
        self.areas = areas
        self.clock = clock
        self.wm = wm  # set before any daemon message or request arrives
        self.outbox: list[tuple[int, gm.Body]] = []
        self.counters = WindowCounters()
        self.screen_rect = Rect(0, 0, 1920, 1080)
        self.version = 0  # 0: no daemon connected
        self.acks: AckOrder[A] = AckOrder()
        self._windows: dict[ShellWindow, GuiWindow[A]] = {}
        self._by_id: dict[int, GuiWindow[A]] = {}
        self._next_id = FIRST_WINDOW
        self._cascade = 0
        self._barrier: A | None = None
        self._waiting: set[ShellWindow] = set()  # commits not rendered for want of room
        # WINDOW_FLAGS a client asked for before its window reached the daemon: sent
        # before its MAP, as the X agent sends a window's state.
        self._asked: weakref.WeakKeyDictionary[ShellWindow, int] = (
            weakref.WeakKeyDictionary())

    # -- the daemon's connection ---------------------------------------------------

    @property
    def connected(self) -> bool:
        return self.version != 0

    def connect(self, version: int, screen: gm.Xconf) -> None:
        """A daemon answered the handshake: show it every window there is."""
        self.version = version
        self.screen_rect = Rect(0, 0, screen.w, screen.h)
        late = self.acks.reset(acks=version >= gm.MIN_WINDOW_DUMP_ACK)
        if late:
            self.areas.all_late()
        self._next_id = FIRST_WINDOW
        self._by_id.clear()
        if self.acks.acks:
            self._emit(BARRIER_WINDOW, gm.Create(0, 0, 1, 1))
        for win in list(self._windows.values()):
            win.id = self._new_id()
            self._by_id[win.id] = win
            win.shown = False
            if win.area is not None:  # the others are introduced at their first image
                self._introduce(win)
                self._dump(win)
                self._show(win)
                self._emit(win.id, gm.ShmImage(0, 0, win.width, win.height))

    def disconnect(self) -> None:
        """The daemon went away: nothing let go will be acknowledged, nothing unsent
        is for the next one."""
        self.version = 0
        self.outbox.clear()
        if self.acks.reset(acks=True):
            self.areas.all_late()

    def on_message(self, msg: gm.Message) -> None:
        """A message from the daemon (the handshake is done)."""
        if msg.type == gm.MsgType.WINDOW_DUMP_ACK:
            released, waited = self.acks.ack(self.clock())
            self.counters.acks += 1
            self.areas.note_ack(waited)
            for area in released:
                self.counters.released_by_ack += 1
                self.areas.confirm_released(area)
        elif msg.type == gm.MsgType.CONFIGURE:
            self._daemon_configure(msg)
        elif msg.type == gm.MsgType.CLOSE:
            win = self._by_id.get(msg.window)
            if win is not None and self.wm is not None:
                self.wm.close(win.shell)
        elif msg.type == gm.MsgType.WINDOW_FLAGS:
            self._daemon_flags(msg)
        elif msg.type == gm.MsgType.DESTROY:
            log.debug("the daemon echoed DESTROY of window %#x", msg.window)
        elif msg.type == gm.MsgType.MAP:
            # The daemon's MSG_MAP (dom0 mapped it, e.g. restored from minimized)
            # asks the X agent to map the window; ours is mapped already.
            log.debug("the daemon mapped window %#x", msg.window)
        else:
            log.debug("MSG_%s for window %#x is not about windows: ignored",
                      msg.type.name, msg.window)

    def _daemon_configure(self, msg: gm.Message) -> None:
        """The user moved or resized a window in dom0: echo it, as the daemon holds
        back its further configures until the agent does (vmside moves and resizes
        its X window, whose ConfigureNotify is the echo); a new size is the
        toplevel's configure, and its next buffer the new area."""
        body = msg.body
        assert isinstance(body, gm.Configure)
        win = self._by_id.get(msg.window)
        if win is None:
            return
        win.x, win.y = body.x, body.y
        self._emit(win.id, gm.Configure(body.x, body.y, body.width, body.height,
                                        int(win.override_redirect)))
        w = win.shell
        if w.kind is not WindowKind.TOPLEVEL or self.wm is None:
            return
        size = (min(body.width, gm.MAX_WINDOW_WIDTH), min(body.height, gm.MAX_WINDOW_HEIGHT))
        if size[0] <= 0 or size[1] <= 0:
            return
        configured = self.wm.toplevel_configured(w)
        if size == (win.width, win.height) and (configured is None or configured[:2] == (0, 0)):
            return  # a move: the client keeps the size it chose
        self.wm.set_states(w, size=size)

    def _daemon_flags(self, msg: gm.Message) -> None:
        """dom0 changed the window's state: fullscreen is the toplevel's state (its
        size comes in the daemon's CONFIGURE), minimized is suspended (not drawn)."""
        body = msg.body
        assert isinstance(body, gm.WindowFlags)
        win = self._by_id.get(msg.window)
        if win is None:
            return
        win.flags = (win.flags | body.flags_set) & ~body.flags_unset
        add: list[int] = []
        remove: list[int] = []
        for flag, state in ((gm.WINDOW_FLAG_FULLSCREEN, ToplevelState.FULLSCREEN),
                            (gm.WINDOW_FLAG_MINIMIZE, ToplevelState.SUSPENDED)):
            if body.flags_set & flag:
                add.append(state)
            elif body.flags_unset & flag:
                remove.append(state)
        if (add or remove) and self.wm is not None:
            self.wm.set_states(win.shell, add=add, remove=remove)

    def send(self, window: int, body: gm.Body) -> None:
        """Send a message of the agent's other parts (clipboard) in order with the
        windows' (nothing while no daemon is connected)."""
        self._emit(window, body)

    def window_by_id(self, window: int) -> ShellWindow | None:
        """The window the daemon knows as ``window``."""
        win = self._by_id.get(window)
        return None if win is None else win.shell

    @property
    def barrier_due(self) -> bool:
        return self.connected and self.acks.needs_barrier

    def flush(self) -> list[tuple[int, gm.Body]]:
        """What to send now, a barrier dump last when an area waits for one."""
        if self.barrier_due:
            self._send_barrier()
        out, self.outbox = self.outbox, []
        return out

    # -- Shell: the compositor's windows ----------------------------------------------

    def screen(self) -> Rect:
        return self.screen_rect

    def window_origin(self, w: ShellWindow) -> tuple[int, int] | None:
        win = self._windows.get(w)
        return None if win is None else (win.x, win.y)

    def window_mapped(self, w: ShellWindow) -> None:
        popup = w.kind is WindowKind.POPUP
        place = w.popup_place
        x, y = (place.x, place.y) if place is not None else (0, 0)
        win: GuiWindow[A] = GuiWindow(self._new_id(), w, x, y, override_redirect=popup)
        self._windows[w] = win
        self._by_id[win.id] = win

    def window_due(self, w: ShellWindow) -> bool:
        return True  # drawn at every commit (the agent's shell paces it: AgentShell)

    def window_committed(self, w: ShellWindow, tree: SceneNode, geometry: Rect) -> bool:
        win = self._windows.get(w)
        if win is None:
            return True
        width = min(geometry.width, gm.MAX_WINDOW_WIDTH)
        height = min(geometry.height, gm.MAX_WINDOW_HEIGHT)
        if width <= 0 or height <= 0:
            return True  # nothing to show yet; the daemon refuses empty windows
        shown = Rect(geometry.x, geometry.y, width, height)
        moved_from = (win.x, win.y)
        if w.popup_place is not None:
            win.x, win.y = w.popup_place.x, w.popup_place.y
        resized = win.area is None or (width, height) != (win.width, win.height)
        if resized:
            try:
                area = self.areas.take(w.client, image_size(width, height))
            except NoRoom:
                self._waiting.add(w)
                self.counters.renders_waiting += 1
                return False
            except GrantLimit as exc:
                log.warning("window %r is not shown: %s", w, exc)
                return True
            old = win.area
            first = old is None
            if first and w.kind is WindowKind.TOPLEVEL:
                win.x, win.y = self._place(w, width, height)
            win.area, win.width, win.height = area, width, height
            rects = win.image.render(tree, shown, memoryview(area.memory), 4 * width, full=True)
            if first:
                self._introduce(win)
            if old is not None:
                # The daemon lets go of the old dump as it reads the new one, before
                # that one's ACK: the new dump's ACK releases it.
                self.acks.let_go(old)
                self.areas.let_go(old, recycle=True)
            self._dump(win)
            if old is not None:
                self._emit(win.id, gm.Configure(win.x, win.y, width, height,
                                                int(win.override_redirect)))
            if not win.shown:
                self._show(win)
            rects = [Rect(0, 0, width, height)]
        else:
            assert win.area is not None
            if (win.x, win.y) != moved_from:  # a popup repositioned
                self._emit(win.id, gm.Configure(win.x, win.y, width, height,
                                                int(win.override_redirect)))
            rects = win.image.render(tree, shown, memoryview(win.area.memory), 4 * width)
        self._waiting.discard(w)
        for rect in rects:
            self.counters.shmimages += 1
            self.counters.damaged_pixels += rect.width * rect.height
            self._emit(win.id, gm.ShmImage(rect.x, rect.y, rect.width, rect.height))
        return True

    def window_unmapped(self, w: ShellWindow) -> None:
        win = self._windows.pop(w, None)
        self._waiting.discard(w)
        if win is None:
            return
        self._by_id.pop(win.id, None)
        if win.area is not None:
            self._emit(win.id, gm.Unmap())
            self._emit(win.id, gm.Destroy())
            self.counters.destroyed += 1
            self.acks.let_go(win.area)
            self.areas.let_go(win.area, recycle=True)
            win.area = None

    def client_gone(self, client: int) -> None:
        """Its windows were unmapped before this; nothing more to tell the daemon."""

    def title_changed(self, w: ShellWindow) -> None:
        win = self._windows.get(w)
        if win is not None and win.area is not None:
            self._emit(win.id, gm.WmName(_text(w.title, 128)))

    def app_id_changed(self, w: ShellWindow) -> None:
        """The daemon takes WM_CLASS only before MAP (ICCCM): a later app id is kept
        for the next time the window maps."""

    def size_hints_changed(self, w: ShellWindow) -> None:
        win = self._windows.get(w)
        if win is not None and win.area is not None:
            self._emit(win.id, self._hints(w))

    def parent_changed(self, w: ShellWindow) -> None:
        """The daemon reads transient_for only at MAP; a later parent waits for the
        next map."""

    def cursor_changed(self, w: ShellWindow, shape: str | None) -> None:
        win = self._windows.get(w)
        if win is None:
            return
        cursor = cursor_message(shape)
        if cursor != win.cursor:
            win.cursor = cursor
            if win.shown:
                self._emit(win.id, cursor)

    def fullscreen_requested(self, w: ShellWindow, on: bool) -> None:
        """To the daemon, which decides with dom0's window manager (and may make it a
        maximize, answered as fullscreen); the client's answer now is its current
        state, the daemon's comes as WINDOW_FLAGS and CONFIGURE."""
        self._ask(w, gm.WINDOW_FLAG_FULLSCREEN, on)
        if self.wm is not None:
            self.wm.set_states(w, force=True)

    def maximize_requested(self, w: ShellWindow, on: bool) -> None:
        """The protocol has no maximize: declined (the current state is the
        answer); dom0's maximize arrives as a plain resize."""
        if self.wm is not None:
            self.wm.set_states(w, force=True)

    def minimize_requested(self, w: ShellWindow) -> None:
        self._ask(w, gm.WINDOW_FLAG_MINIMIZE, True)

    def interactive_requested(self, w: ShellWindow, what: str) -> None:
        """No message asks the daemon for an interactive move, resize or window
        menu: the user has dom0's frame for those."""
        log.debug("%r asked for an interactive %s, which the GUI protocol cannot carry",
                  w, what)

    def _ask(self, w: ShellWindow, flag: int, on: bool) -> None:
        win = self._windows.get(w)
        if win is not None and win.shown:
            if flag == gm.WINDOW_FLAG_MINIMIZE and not on:
                return  # the daemon takes minimize only as set
            self._emit(win.id, gm.WindowFlags(flag, 0) if on else gm.WindowFlags(0, flag))
            return
        # Not on the daemon yet: sent before its MAP (minimize there means nothing).
        if flag == gm.WINDOW_FLAG_MINIMIZE:
            return
        asked = self._asked.get(w, 0)
        self._asked[w] = asked | flag if on else asked & ~flag

    def shown(self) -> list[GuiWindow[A]]:
        """The windows the daemon has been given an image of."""
        return [win for win in self._windows.values() if win.area is not None]

    def waiting(self) -> Iterable[ShellWindow]:
        """Windows whose last commit waits for room (``render_pending`` them)."""
        return list(self._waiting)

    # -- inside ---------------------------------------------------------------------

    def _new_id(self) -> int:
        if self._next_id > MAX_ID:
            raise RuntimeError("window ids of this connection ran out")
        self._next_id += 1
        return self._next_id - 1

    def _emit(self, window: int, body: gm.Body) -> None:
        if self.connected:
            self.outbox.append((window, body))

    def _introduce(self, win: GuiWindow[A]) -> None:
        w = win.shell
        self.counters.created += 1
        self._emit(win.id, gm.Create(win.x, win.y, win.width, win.height, 0,
                                     int(win.override_redirect)))
        if w.kind is WindowKind.TOPLEVEL:
            if w.title:
                self._emit(win.id, gm.WmName(_text(w.title, 128)))
            if w.app_id:
                name = _text(w.app_id, 64)
                self._emit(win.id, gm.WmClass(name, name))
            if w.min_size != (0, 0) or w.max_size != (0, 0):
                self._emit(win.id, self._hints(w))

    def _show(self, win: GuiWindow[A]) -> None:
        w = win.shell
        flags = self._asked.pop(w, 0)
        configured = self.wm.toplevel_configured(w) if self.wm is not None else None
        if configured is not None and ToplevelState.FULLSCREEN in configured[2]:
            flags |= gm.WINDOW_FLAG_FULLSCREEN  # a new daemon: as it was
        if flags and w.kind is WindowKind.TOPLEVEL:
            self._emit(win.id, gm.WindowFlags(flags, 0))
        if win.cursor.cursor != gm.CURSOR_DEFAULT:
            self._emit(win.id, win.cursor)
        parent = self._windows.get(win.shell.parent) if win.shell.parent else None
        self._emit(win.id, gm.Map(parent.id if parent is not None else 0,
                                  int(win.override_redirect)))
        win.shown = True

    def _dump(self, win: GuiWindow[A]) -> None:
        assert win.area is not None
        pages = image_pages(image_size(win.width, win.height))
        self._emit(win.id, gm.WindowDump(win.width, win.height, win.area.refs[:pages]))
        if self.connected:
            self.counters.dumps += 1
            self.acks.dump_sent(self.clock())

    def _send_barrier(self) -> None:
        if self._barrier is None:
            self._barrier = self.areas.take(0, image_size(1, 1))
        self._emit(BARRIER_WINDOW, gm.WindowDump(1, 1, self._barrier.refs[:1]))
        self.counters.barriers += 1
        self.acks.dump_sent(self.clock())

    @staticmethod
    def _hints(w: ShellWindow) -> gm.WindowHints:
        flags = 0
        min_w, min_h = w.min_size
        max_w, max_h = w.max_size
        if min_w or min_h:
            flags |= gm.HINT_P_MIN_SIZE
        if max_w or max_h:
            flags |= gm.HINT_P_MAX_SIZE
            # 0 on one axis means no limit there; the daemon wants both above 0.
            max_w = min(max_w or gm.MAX_WINDOW_WIDTH, gm.MAX_WINDOW_WIDTH)
            max_h = min(max_h or gm.MAX_WINDOW_HEIGHT, gm.MAX_WINDOW_HEIGHT)
        return gm.WindowHints(flags, min(min_w, gm.MAX_WINDOW_WIDTH),
                              min(min_h, gm.MAX_WINDOW_HEIGHT), max_w, max_h)

    def _place(self, w: ShellWindow, width: int, height: int) -> tuple[int, int]:
        """Where a new toplevel goes: centred on its parent, else cascading from the
        top left, kept on the screen where it fits."""
        screen = self.screen_rect
        parent = self._windows.get(w.parent) if w.parent is not None else None
        if parent is not None:
            x = parent.x + (parent.width - width) // 2
            y = parent.y + (parent.height - height) // 2
        else:
            step = self._cascade * CASCADE_STEP
            self._cascade = (self._cascade + 1) % 10
            x = screen.x + (screen.width - width) // 4 + step
            y = screen.y + (screen.height - height) // 4 + step
        x = max(screen.x, min(x, screen.x + screen.width - width))
        y = max(screen.y, min(y, screen.y + screen.height - height))
        return x, y
