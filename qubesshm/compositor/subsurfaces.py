"""``wl_subcompositor`` and ``wl_subsurface``: surfaces placed in a parent surface.

A subsurface's position and its place in the parent's stacking order are the
parent's pending state, applied when the parent's state is; a synchronized
subsurface (itself, or through an ancestor) keeps its commits in a cache that
the parent's applied state flushes (``commits`` runs that flow).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..objects.objectmap import DISPLAY_ID, WaylandObject
from ..wire.codec import ArgValue, ErrorCode, WireError
from .surfaces import Surface

if TYPE_CHECKING:
    from .client import ClientCore, Handler

# wl_subcompositor.error and wl_subsurface.error
BAD_SURFACE = 0
# Limits no toolkit comes near, so that no client's tree costs the others' time: every
# commit walks the tree.
MAX_SUBSURFACES_PER_CLIENT = 1024
MAX_DEPTH = 32


class Subsurface:
    """A ``wl_subsurface``: ``surface`` as a child of ``parent`` (None once the parent
    is destroyed: the subsurface is then inert and shows nothing)."""

    def __init__(self, object_id: int, surface: Surface, parent: Surface) -> None:
        self.id = object_id
        self.surface: Surface | None = surface
        self.parent: Surface | None = parent
        self.sync = True
        self.position = (0, 0)
        self.pending_position: tuple[int, int] | None = None

    def effectively_synchronized(self) -> bool:
        sub: Subsurface | None = self
        while sub is not None:
            if sub.sync:
                return True
            if sub.parent is None:
                return False
            sub = sub.parent.subsurface
        return False

    def detach(self) -> Surface | None:
        """Take the child out of its parent at once (not double-buffered); the former
        parent, if any."""
        parent, surface = self.parent, self.surface
        if parent is not None:
            if self in parent.children:
                parent.children.remove(self)
            if surface is not None:
                for order in (parent.order_pending, parent.order):
                    if surface in order:
                        order.remove(surface)
        self.parent = None
        return parent


def children_in_order(surface: Surface) -> list[Subsurface]:
    """The subsurfaces of ``surface`` in its current stacking order, bottom first."""
    return [s.subsurface for s in surface.order
            if s is not surface and s.subsurface is not None]


def depth(surface: Surface) -> int:
    """How many parents ``surface`` has up its chain."""
    count = 0
    node = surface
    while node.subsurface is not None and node.subsurface.parent is not None:
        node = node.subsurface.parent
        count += 1
    return count


def height(surface: Surface) -> int:
    """How many levels of subsurfaces hang below ``surface``."""
    return max((1 + height(sub.surface) for sub in surface.children
                if sub.surface is not None), default=0)


def is_ancestor(candidate: Surface, surface: Surface) -> bool:
    """Whether ``candidate`` is ``surface`` or one of its parents, up the chain."""
    node: Surface | None = surface
    while node is not None:
        if node is candidate:
            return True
        node = node.subsurface.parent if node.subsurface is not None else None
    return False


# -- requests -------------------------------------------------------------------


def get_subsurface(client: ClientCore, obj: WaylandObject, args: list[ArgValue],
                   fds: list[int]) -> None:
    new_id, surface_id, parent_id = args
    assert isinstance(new_id, int) and isinstance(surface_id, int)
    assert isinstance(parent_id, int)
    surface = client.resource(surface_id, Surface)
    parent = client.resource(parent_id, Surface)
    if surface.subsurface is not None:
        raise WireError(f"{surface} is already a sub-surface", BAD_SURFACE, obj.id)
    if surface.role not in (None, "wl_subsurface"):
        raise WireError(f"{surface} already has the role {surface.role}", BAD_SURFACE, obj.id)
    if is_ancestor(surface, parent):
        raise WireError(f"{parent} is {surface} or one of its sub-surfaces: it cannot be "
                        "its parent", BAD_SURFACE, obj.id)
    if sum(isinstance(r, Subsurface) for r in client.resources.values()) >= \
            MAX_SUBSURFACES_PER_CLIENT:
        raise WireError(f"qubesshm: too many sub-surfaces: a client may have "
                        f"{MAX_SUBSURFACES_PER_CLIENT}", ErrorCode.NO_MEMORY, DISPLAY_ID)
    if depth(parent) + 1 + height(surface) > MAX_DEPTH:
        raise WireError(f"qubesshm: sub-surfaces nested too deep: at most {MAX_DEPTH} "
                        "levels", ErrorCode.NO_MEMORY, DISPLAY_ID)
    sub = Subsurface(new_id, surface, parent)
    surface.role = "wl_subsurface"
    surface.subsurface = sub
    parent.children.append(sub)
    parent.order_pending.append(surface)  # on top of its siblings and parent
    client.resources[new_id] = sub


def set_position(client: ClientCore, obj: WaylandObject, args: list[ArgValue],
                 fds: list[int]) -> None:
    x, y = args
    assert isinstance(x, int) and isinstance(y, int)
    client.resource(obj.id, Subsurface).pending_position = (x, y)


def _restack(client: ClientCore, obj: WaylandObject, args: list[ArgValue],
             *, above: bool) -> None:
    sub = client.resource(obj.id, Subsurface)
    sibling_id = args[0]
    assert isinstance(sibling_id, int)
    sibling = client.resource(sibling_id, Surface)
    surface, parent = sub.surface, sub.parent
    if surface is None or parent is None:
        return  # inert
    name = "place_above" if above else "place_below"
    if sibling is surface or (sibling is not parent and (
            sibling.subsurface is None or sibling.subsurface.parent is not parent)):
        raise WireError(f"wl_subsurface.{name}: {sibling} is not a sibling or the parent",
                        BAD_SURFACE, obj.id)
    order = parent.order_pending
    order.remove(surface)
    index = order.index(sibling)
    order.insert(index + 1 if above else index, surface)


def place_above(client: ClientCore, obj: WaylandObject, args: list[ArgValue],
                fds: list[int]) -> None:
    _restack(client, obj, args, above=True)


def place_below(client: ClientCore, obj: WaylandObject, args: list[ArgValue],
                fds: list[int]) -> None:
    _restack(client, obj, args, above=False)


def set_sync(client: ClientCore, obj: WaylandObject, args: list[ArgValue],
             fds: list[int]) -> None:
    client.resource(obj.id, Subsurface).sync = True


def destroy_subsurface(client: ClientCore, obj: WaylandObject, args: list[ArgValue],
                       fds: list[int]) -> None:
    sub = client.resource(obj.id, Subsurface)
    surface = sub.surface
    parent = sub.detach()
    if surface is not None:
        surface.subsurface = None
        sub.surface = None
        surface.drop_cache()
    if parent is not None and surface is not None:
        client.compositor.tree_changed(parent, left=surface)


HANDLERS: dict[tuple[str, str], Handler] = {
    ("wl_subcompositor", "get_subsurface"): get_subsurface,
    ("wl_subsurface", "set_position"): set_position,
    ("wl_subsurface", "place_above"): place_above,
    ("wl_subsurface", "place_below"): place_below,
    ("wl_subsurface", "set_sync"): set_sync,
    ("wl_subsurface", "destroy"): destroy_subsurface,
}
