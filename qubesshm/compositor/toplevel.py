"""``xdg_toplevel``: an application window, configured by the agent.

The initial commit is answered with the screen as bounds, the (empty) window
manager capabilities and a 0x0 configure (the client picks its size); later
configures come from the agent (``Compositor.configure``, ``set_states``), and
the toplevel remembers the size and states of the last one. Title, app id and
parent change at once; size limits with the next commit. What only a window
manager can grant goes to the agent's ``Shell``: fullscreen, maximize and
minimize requests, and interactive move, resize and window menu (with the
serial's checks left to the agent, which has no way to give them anyway).
"""

from __future__ import annotations

import struct
from collections.abc import Iterable
from typing import TYPE_CHECKING

from ..objects.objectmap import WaylandObject
from ..wire.codec import ArgValue, WireError
from .shell import ToplevelState, WindowKind
from .windows import Window
from .xdg import ALREADY_CONSTRUCTED, ROLE, XdgSurface

if TYPE_CHECKING:
    from .client import ClientCore, Handler
    from .decoration import Decoration

# xdg_toplevel.error
INVALID_RESIZE_EDGE = 0
INVALID_PARENT = 1
INVALID_SIZE = 2
RESIZE_EDGES = frozenset({0, 1, 2, 4, 5, 6, 8, 9, 10})
# zxdg_toplevel_decoration_v1.error.orphaned (decoration imports this module)
DECORATION_ORPHANED = 2
# xdg_toplevel.wm_capabilities offered: fullscreen and minimize, which the GUI daemon
# carries (MSG_WINDOW_FLAGS); not maximize nor a window menu, which it does not.
WM_CAPABILITY_FULLSCREEN = 3
WM_CAPABILITY_MINIMIZE = 4
WM_CAPABILITIES: tuple[int, ...] = (WM_CAPABILITY_FULLSCREEN, WM_CAPABILITY_MINIMIZE)
# The xdg_wm_base version that introduced each state.
_STATE_SINCE = {ToplevelState.TILED_LEFT: 2, ToplevelState.TILED_RIGHT: 2,
                ToplevelState.TILED_TOP: 2, ToplevelState.TILED_BOTTOM: 2,
                ToplevelState.SUSPENDED: 6}
_KNOWN_STATES = frozenset(int(s) for s in ToplevelState)


class Toplevel(Window):
    """An ``xdg_toplevel``."""

    def __init__(self, xdg: XdgSurface, object_id: int) -> None:
        super().__init__(WindowKind.TOPLEVEL, xdg, object_id)
        self.declared_parent: Toplevel | None = None
        self.pending_min: tuple[int, int] | None = None
        self.pending_max: tuple[int, int] | None = None
        self.decoration: Decoration | None = None
        self.last_configure: tuple[int, int, tuple[int, ...]] = (0, 0, ())
        # What the agent last asked (states unfiltered by the client's version), for
        # changes of one state keeping the others and the size.
        self.size = (0, 0)
        self.states: frozenset[int] = frozenset()

    # -- configure -------------------------------------------------------------

    def send_configure(self, width: int, height: int, states: Iterable[int]) -> None:
        """One configure sequence: bounds, toplevel, decoration, then the serial."""
        client = self.client
        version = client.version(self.id)
        wanted = tuple(dict.fromkeys(int(s) for s in states))
        self.size, self.states = (width, height), frozenset(wanted)
        kept = tuple(s for s in wanted
                     if s in _KNOWN_STATES and _STATE_SINCE.get(ToplevelState(s), 1) <= version)
        self.last_configure = (width, height, kept)
        screen = self.compositor.screen_size
        client.send(self.id, "configure_bounds", screen[0], screen[1])
        client.send(self.id, "configure", width, height, struct.pack(f"={len(kept)}I", *kept))
        if self.decoration is not None:
            self.decoration.send_mode()
        self.xdg.configure((width, height, kept))

    def current(self) -> tuple[int, int, frozenset[int]]:
        """The size and states the client was (or, before its initial commit, will
        be) configured with."""
        if not self.xdg.initial_commit_done:
            width, height, states = self.last_configure
            return width, height, frozenset(states)
        return self.size[0], self.size[1], self.states

    def initial_configure(self) -> None:
        self.client.send(self.id, "wm_capabilities",
                         struct.pack(f"={len(WM_CAPABILITIES)}I", *WM_CAPABILITIES))
        self.send_configure(*self.last_configure)

    def reconfigure(self) -> None:
        """Send the last configure again (its decoration changed)."""
        if self.xdg.initial_commit_done and self.alive:
            self.send_configure(*self.last_configure)

    # -- the role's state ------------------------------------------------------

    def root_committed(self) -> bool:
        self.xdg.take_acked()
        w = self.shell_window
        min_size = self.pending_min if self.pending_min is not None else w.min_size
        max_size = self.pending_max if self.pending_max is not None else w.max_size
        self.pending_min = self.pending_max = None
        for axis in (0, 1):
            if max_size[axis] and max_size[axis] < min_size[axis]:
                raise WireError(f"maximum size {max_size} is smaller than the minimum size "
                                f"{min_size}", INVALID_SIZE, self.id)
        if (min_size, max_size) != (w.min_size, w.max_size):
            w.min_size, w.max_size = min_size, max_size
            if self.mapped:
                self.compositor.shell.size_hints_changed(w)
        return False

    def mapping(self) -> None:
        parent = effective_parent(self)
        self.shell_window.parent = None if parent is None else parent.shell_window

    def unmapped(self) -> None:
        # Keyboard focus went with the window (the seat's); so does the activated state,
        # which the next map's initial configure would otherwise repeat.
        activated = int(ToplevelState.ACTIVATED)
        self.states = self.states - {activated}
        width, height, kept = self.last_configure
        self.last_configure = (width, height, tuple(s for s in kept if s != activated))
        self.xdg.reset()
        self.compositor.dismiss_popups_of(self)
        refresh_parents(self.client)

    def map(self) -> None:
        super().map()
        refresh_parents(self.client)

    def retired(self) -> None:
        for other in self.client.windows:
            if isinstance(other, Toplevel) and other.declared_parent is self:
                other.declared_parent = self.declared_parent
        refresh_parents(self.client)


def effective_parent(toplevel: Toplevel) -> Toplevel | None:
    """The nearest mapped toplevel up the ``set_parent`` chain."""
    parent = toplevel.declared_parent
    while parent is not None and not parent.mapped:
        parent = parent.declared_parent
    return parent


def refresh_parents(client: ClientCore) -> None:
    """Tell the agent of every mapped toplevel whose effective parent changed."""
    for window in list(client.windows):
        if not isinstance(window, Toplevel):
            continue
        parent = effective_parent(window)
        shell_parent = None if parent is None else parent.shell_window
        if window.shell_window.parent is not shell_parent:
            window.shell_window.parent = shell_parent
            if window.mapped:
                window.compositor.shell.parent_changed(window.shell_window)


# -- requests -------------------------------------------------------------------


def get_toplevel(client: ClientCore, obj: WaylandObject, args: list[ArgValue],
                 fds: list[int]) -> None:
    new_id = args[0]
    assert isinstance(new_id, int)
    xdg = client.resource(obj.id, XdgSurface)
    if xdg.window is not None:
        raise WireError(f"{xdg} already has a role object", ALREADY_CONSTRUCTED, obj.id)
    surface = xdg.surface
    if surface.role not in (None, "xdg_toplevel"):
        raise WireError(f"{surface} already has the role {surface.role}", ROLE, xdg.base.id)
    surface.role = "xdg_toplevel"
    toplevel = Toplevel(xdg, new_id)
    xdg.window = toplevel
    xdg.constructed = True
    client.resources[new_id] = toplevel


def destroy_toplevel(client: ClientCore, obj: WaylandObject, args: list[ArgValue],
                     fds: list[int]) -> None:
    toplevel = client.resource(obj.id, Toplevel)
    decoration = toplevel.decoration
    if decoration is not None and client.alive(decoration.id):
        raise WireError(f"xdg_toplevel@{obj.id} destroyed before its "
                        f"zxdg_toplevel_decoration_v1@{decoration.id}", DECORATION_ORPHANED,
                        decoration.id)
    toplevel.retire()


def set_parent(client: ClientCore, obj: WaylandObject, args: list[ArgValue],
               fds: list[int]) -> None:
    toplevel = client.resource(obj.id, Toplevel)
    parent_id = args[0]
    parent = client.resource(parent_id, Toplevel) if isinstance(parent_id, int) else None
    node = parent
    while node is not None:
        if node is toplevel:
            raise WireError(f"xdg_toplevel@{args[0]!r} cannot be the parent of "
                            f"xdg_toplevel@{obj.id}: that would make a loop",
                            INVALID_PARENT, obj.id)
        node = node.declared_parent
    toplevel.declared_parent = parent
    refresh_parents(client)


def set_title(client: ClientCore, obj: WaylandObject, args: list[ArgValue],
              fds: list[int]) -> None:
    toplevel = client.resource(obj.id, Toplevel)
    title = args[0]
    assert isinstance(title, str)
    if title != toplevel.shell_window.title:
        toplevel.shell_window.title = title
        if toplevel.mapped:
            client.compositor.shell.title_changed(toplevel.shell_window)


def set_app_id(client: ClientCore, obj: WaylandObject, args: list[ArgValue],
               fds: list[int]) -> None:
    toplevel = client.resource(obj.id, Toplevel)
    app_id = args[0]
    assert isinstance(app_id, str)
    if app_id != toplevel.shell_window.app_id:
        toplevel.shell_window.app_id = app_id
        if toplevel.mapped:
            client.compositor.shell.app_id_changed(toplevel.shell_window)


def _size(obj: WaylandObject, args: list[ArgValue], what: str) -> tuple[int, int]:
    width, height = args
    assert isinstance(width, int) and isinstance(height, int)
    if width < 0 or height < 0:
        raise WireError(f"{what} size {width}x{height} is negative", INVALID_SIZE, obj.id)
    return width, height


def set_min_size(client: ClientCore, obj: WaylandObject, args: list[ArgValue],
                 fds: list[int]) -> None:
    client.resource(obj.id, Toplevel).pending_min = _size(obj, args, "minimum")


def set_max_size(client: ClientCore, obj: WaylandObject, args: list[ArgValue],
                 fds: list[int]) -> None:
    client.resource(obj.id, Toplevel).pending_max = _size(obj, args, "maximum")


def resize(client: ClientCore, obj: WaylandObject, args: list[ArgValue],
           fds: list[int]) -> None:
    edges = args[2]
    assert isinstance(edges, int)
    if edges not in RESIZE_EDGES:
        raise WireError(f"resize edge {edges} is not an xdg_toplevel.resize_edge",
                        INVALID_RESIZE_EDGE, obj.id)
    _hook(client, obj, "interactive_requested", "resize")


def _hook(client: ClientCore, obj: WaylandObject, call: str, *args: object) -> None:
    """A window management request, for the agent's ``Shell`` (mapped or not: a
    request before the first commit is meant for the initial configure)."""
    toplevel = client.resource(obj.id, Toplevel)
    if not toplevel.alive:
        return
    compositor = client.compositor
    with compositor.shell_call():
        getattr(compositor.shell, call)(toplevel.shell_window, *args)


def set_fullscreen(client: ClientCore, obj: WaylandObject, args: list[ArgValue],
                   fds: list[int]) -> None:
    _hook(client, obj, "fullscreen_requested", True)  # the output asked for is advice


def unset_fullscreen(client: ClientCore, obj: WaylandObject, args: list[ArgValue],
                     fds: list[int]) -> None:
    _hook(client, obj, "fullscreen_requested", False)


def set_maximized(client: ClientCore, obj: WaylandObject, args: list[ArgValue],
                  fds: list[int]) -> None:
    _hook(client, obj, "maximize_requested", True)


def unset_maximized(client: ClientCore, obj: WaylandObject, args: list[ArgValue],
                    fds: list[int]) -> None:
    _hook(client, obj, "maximize_requested", False)


def set_minimized(client: ClientCore, obj: WaylandObject, args: list[ArgValue],
                  fds: list[int]) -> None:
    _hook(client, obj, "minimize_requested")


def move(client: ClientCore, obj: WaylandObject, args: list[ArgValue],
         fds: list[int]) -> None:
    _hook(client, obj, "interactive_requested", "move")


def show_window_menu(client: ClientCore, obj: WaylandObject, args: list[ArgValue],
                     fds: list[int]) -> None:
    _hook(client, obj, "interactive_requested", "window menu")


HANDLERS: dict[tuple[str, str], Handler] = {
    ("xdg_surface", "get_toplevel"): get_toplevel,
    ("xdg_toplevel", "destroy"): destroy_toplevel,
    ("xdg_toplevel", "set_parent"): set_parent,
    ("xdg_toplevel", "set_title"): set_title,
    ("xdg_toplevel", "set_app_id"): set_app_id,
    ("xdg_toplevel", "set_min_size"): set_min_size,
    ("xdg_toplevel", "set_max_size"): set_max_size,
    ("xdg_toplevel", "resize"): resize,
    ("xdg_toplevel", "show_window_menu"): show_window_menu,
    ("xdg_toplevel", "move"): move,
    ("xdg_toplevel", "set_maximized"): set_maximized,
    ("xdg_toplevel", "unset_maximized"): unset_maximized,
    ("xdg_toplevel", "set_fullscreen"): set_fullscreen,
    ("xdg_toplevel", "unset_fullscreen"): unset_fullscreen,
    ("xdg_toplevel", "set_minimized"): set_minimized,
}
