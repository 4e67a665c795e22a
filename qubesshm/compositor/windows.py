"""A window (toplevel or popup) as the compositor shows it to the agent.

``Window`` is the machinery common to both roles: whether the window is
mapped, the surface tree it shows (``build_tree``), its window geometry, and
the offer of each changed tree to ``Shell.window_committed``. Once the agent
has rendered an offer, the buffers of the tree are released, its damage is
cleared and its frame callbacks go to the pacer; until then they wait.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..pixels.region import Rect, Region
from .regions import intersect
from .scene import SceneNode, tree_bounds
from .shell import ShellWindow, WindowKind
from .surfaces import Surface

if TYPE_CHECKING:
    from .client import ClientCore
    from .core import Compositor
    from .xdg import XdgSurface


def build_tree(root: Surface, rendered: set[int]) -> tuple[SceneNode, list[Surface]]:
    """The mapped surfaces under ``root`` (itself included) as a scene, and the list of
    them. A subsurface shows when it has a buffer and its parent shows."""
    surfaces: list[Surface] = []

    def node(surface: Surface, x: int, y: int) -> SceneNode:
        surfaces.append(surface)
        state = surface.snapshot(full_damage=surface.uid not in rendered)
        below: list[SceneNode] = []
        above: list[SceneNode] = []
        seen_self = False
        for item in surface.order:
            if item is surface:
                seen_self = True
                continue
            sub = item.subsurface
            if sub is None or item.buffer is None:
                continue
            child = node(item, x + sub.position[0], y + sub.position[1])
            (above if seen_self else below).append(child)
        return SceneNode(state, x, y, tuple(below), tuple(above))

    return node(root, 0, 0), surfaces


class Window:
    """What a toplevel or popup role object shows, and the agent's view of it."""

    def __init__(self, kind: WindowKind, xdg: XdgSurface, object_id: int) -> None:
        self.xdg = xdg
        self.id = object_id
        self.client: ClientCore = xdg.client
        self.compositor: Compositor = xdg.client.compositor
        self.shell_window = ShellWindow(kind, self.client.number, self.client.pid,
                                        self.render_pending)
        self.alive = True  # the role object exists
        self.dismissed = False  # a popup the compositor dismissed
        self.render_waiting = False  # an offer the agent has not rendered yet
        self._rendered: set[int] = set()  # surface uids the last render showed
        self._shown: list[Surface] = []  # surfaces of the last offered tree
        self.client.windows.append(self)
        self.compositor.window_created(self)

    @property
    def mapped(self) -> bool:
        return self.shell_window.mapped

    @property
    def surface(self) -> Surface:
        return self.xdg.surface

    def __repr__(self) -> str:
        return repr(self.shell_window)

    # -- what the role decides -------------------------------------------------

    def can_map(self) -> bool:
        """The role's conditions for showing (beyond having a buffer)."""
        return self.alive and not self.dismissed and self.xdg.configured

    def root_committed(self) -> bool:
        """The root surface applied a commit: the role's double-buffered state; True
        if the window needs offering even without surface changes."""
        return False

    def initial_configure(self) -> None:
        """Answer the initial commit."""

    def mapping(self) -> None:
        """The window is about to map (its ShellWindow fields are final)."""

    def unmapped(self) -> None:
        """The window just unmapped."""

    def retired(self) -> None:
        """The role object just went (or its surface did)."""

    def retire(self) -> None:
        """The role object is gone, or inert (its surface was destroyed): unmapped, and
        forgotten by the agent's side."""
        if not self.alive:
            return
        self.alive = False
        self.unmap()
        self.compositor.dismiss_popups_of(self)
        if self in self.client.windows:
            self.client.windows.remove(self)
        self.compositor.window_retired(self)
        if self.xdg.window is self:
            self.xdg.window = None
            self.xdg.reset()
        self.retired()

    # -- the flow ----------------------------------------------------------------

    def committed(self, *, root: bool, changed: bool) -> None:
        """A surface of the tree applied state (``root``: the root surface itself)."""
        xdg = self.xdg
        if root:
            if xdg.pending_geometry is not None:
                xdg.geometry, xdg.pending_geometry = xdg.pending_geometry, None
            changed = self.root_committed() or changed
            if not xdg.initial_commit_done:
                # The initial commit (it has no buffer: checked before it applied).
                xdg.initial_commit_done = True
                self.initial_configure()
                return
        if not self.client.closed:
            self.update(changed)

    def update(self, changed: bool) -> None:
        """Map, unmap or offer the tree, as the current state says."""
        should_map = self.can_map() and self.surface.buffer is not None
        if should_map and not self.mapped:
            self.map()
        elif not should_map and self.mapped:
            self.unmap()
        elif self.mapped:
            if self.render_waiting and self.shell_window.coalesce:
                return  # the shell asks for the newest state when it draws
            if changed or self.geometry() != self.shell_window.geometry:
                self.offer()
            elif not self.render_waiting:
                # Nothing to render: the commit's frame callbacks may run.
                self.frames_done(self._shown)

    def map(self) -> None:
        self.mapping()
        w = self.shell_window
        w.mapped = True
        w.offset = (0, 0)
        self.surface.offset = (0, 0)
        self._rendered = set()
        self.compositor.shell.window_mapped(w)
        if self.mapped and not self.client.closed:
            self.offer()

    def unmap(self) -> None:
        w = self.shell_window
        if not w.mapped:
            return
        w.mapped = False
        self.render_waiting = False
        self._rendered = set()
        with self.client.queueing():  # what the client did itself (or a popup_done goes)
            for surface in self._shown:
                self.compositor.outputs.leave(surface)
        self._shown = []
        self.compositor.shell.window_unmapped(w)
        self.unmapped()

    def geometry(self) -> Rect:
        """The window geometry: as set (clamped to the surfaces), else their bounds."""
        tree, _ = build_tree(self.surface, self._rendered)
        return self._geometry_of(tree)

    def _geometry_of(self, tree: SceneNode) -> Rect:
        bounds = tree_bounds(tree)
        wanted = self.xdg.geometry
        if wanted is None:
            return bounds
        clamped = intersect(wanted, bounds)
        return clamped if not clamped.empty else wanted

    def offer(self) -> None:
        """Give the agent the current tree when it draws now (``Shell.window_due``); on
        success, let go of what it used."""
        self.render_waiting = True
        if not self.compositor.shell.window_due(self.shell_window):
            return  # it asks again with render_pending when it draws
        tree, surfaces = build_tree(self.surface, self._rendered)
        geometry = self._geometry_of(tree)
        w = self.shell_window
        w.geometry = geometry
        w.offset = self.surface.offset
        outputs = self.compositor.outputs
        for surface in self._shown:
            if surface not in surfaces:
                outputs.leave(surface)
        for surface in surfaces:
            outputs.enter(surface)
        self._shown = surfaces
        with self.compositor.shell_call():
            rendered = self.compositor.shell.window_committed(w, tree, geometry)
        if rendered and self.mapped and not self.client.closed:
            self._done(surfaces)

    def _done(self, surfaces: list[Surface]) -> None:
        self.render_waiting = False
        self._rendered = {s.uid for s in surfaces}
        # A window of one surface is in its area once rendered: its buffer goes back at
        # once. With subsurfaces, a later render may read any of them again (one moved,
        # restacked or went away while the others did not commit): each is kept until
        # replaced, as a compositor showing it would.
        release = len(surfaces) == 1
        for surface in surfaces:
            if release:
                surface.release_buffer()
            surface.damage = Region()
        self.frames_done(surfaces)

    def frames_done(self, surfaces: list[Surface]) -> None:
        callbacks = [cb for s in surfaces for cb in s.frames]
        for surface in surfaces:
            surface.frames = []
        if callbacks:
            self.compositor.frames.add(self.client, callbacks)

    def render_pending(self) -> bool:
        """``ShellWindow.render_pending``: offer again what waits to be rendered."""
        if not self.render_waiting or not self.mapped or self.client.closed:
            return True
        self.offer()
        return not self.render_waiting

    def shown_surfaces(self) -> list[Surface]:
        """The surfaces of the tree last offered to the agent."""
        return list(self._shown)

    def contains(self, surface: Surface) -> bool:
        """Whether ``surface`` is the root or a subsurface somewhere under it."""
        node: Surface | None = surface
        while node is not None:
            if node is self.surface:
                return True
            node = node.subsurface.parent if node.subsurface is not None else None
        return False


def root_of(surface: Surface) -> Surface | None:
    """The top of ``surface``'s subsurface chain; None if it hangs off no parent."""
    node = surface
    while node.subsurface is not None:
        parent = node.subsurface.parent
        if parent is None:
            return None
        node = parent
    return node


def window_of(surface: Surface) -> Window | None:
    root = root_of(surface)
    if root is None or root.xdg is None:
        return None
    return root.xdg.window

