"""How ``wl_surface.commit`` flows through a tree of subsurfaces.

A commit of a synchronized subsurface (itself or through an ancestor) goes
into its cache. Any other commit applies the surface's state (its cache first,
if it has one), then its children's positions, stacking order and, for every
synchronized child, the cached state, all the way down. The window the surface
belongs to is then told (``Window.committed``), once.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..objects.objectmap import WaylandObject
from ..wire.codec import ArgValue
from .subsurfaces import Subsurface, children_in_order
from .surfaces import Pending, Surface

if TYPE_CHECKING:
    from .client import ClientCore, Handler


def _apply_state(surface: Surface, state: Pending, *, from_cache: bool) -> bool:
    changed = surface.apply(state, from_cache=from_cache)
    if surface.order != surface.order_pending:
        surface.order = list(surface.order_pending)
        changed = True
    return changed


def _parent_applied(sub: Subsurface, parent_synchronized: bool) -> bool:
    """``sub``'s parent applied its state: the position, and a synchronized cache."""
    changed = False
    if sub.pending_position is not None:
        changed = sub.pending_position != sub.position
        sub.position, sub.pending_position = sub.pending_position, None
    if parent_synchronized or sub.sync:
        changed = _synchronized_commit(sub) or changed
    return changed


def _synchronized_commit(sub: Subsurface) -> bool:
    surface = sub.surface
    if surface is None:
        return False
    changed = False
    if surface.cached is not None:
        state, surface.cached = surface.cached, None
        changed = _apply_state(surface, state, from_cache=True)
    for child in children_in_order(surface):
        changed = _parent_applied(child, True) or changed
    return changed


def commit(client: ClientCore, obj: WaylandObject, args: list[ArgValue],
           fds: list[int]) -> None:
    surface = client.resource(obj.id, Surface)
    if surface.xdg is not None:
        surface.xdg.check_commit()
    sub = surface.subsurface
    if sub is not None and sub.effectively_synchronized():
        surface.cache_pending()
        return
    if surface.cached is not None:
        # Desynchronized with commits still cached: they apply with this one, as one.
        surface.cache_pending()
        state, surface.cached = surface.cached, None
        changed = _apply_state(surface, state, from_cache=True)
    else:
        state, surface.pending = surface.pending, Pending()
        changed = _apply_state(surface, state, from_cache=False)
    for child in children_in_order(surface):
        changed = _parent_applied(child, False) or changed
    client.compositor.surface_committed(surface, changed)


def set_desync(client: ClientCore, obj: WaylandObject, args: list[ArgValue],
               fds: list[int]) -> None:
    sub = client.resource(obj.id, Subsurface)
    if not sub.sync:
        return
    sub.sync = False
    surface = sub.surface
    # Its cached state (and its children's) applies now.
    if (surface is not None and not sub.effectively_synchronized()
            and _synchronized_commit(sub)):
        client.compositor.surface_committed(surface, True)


HANDLERS: dict[tuple[str, str], Handler] = {
    ("wl_surface", "commit"): commit,
    ("wl_subsurface", "set_desync"): set_desync,
}
