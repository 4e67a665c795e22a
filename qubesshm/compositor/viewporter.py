"""``wp_viewporter`` and ``wp_viewport``: crop and scale a surface's buffer.

The source rectangle and destination size are double-buffered surface state;
the checks the protocol makes when state applies (``bad_size``,
``out_of_buffer``) are the surface's (``surfaces``).
"""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction
from typing import TYPE_CHECKING

from ..objects.objectmap import WaylandObject
from ..wire.codec import ArgValue, Fixed, WireError
from .surfaces import Surface

if TYPE_CHECKING:
    from .client import ClientCore, Handler

# wp_viewporter.error
VIEWPORT_EXISTS = 0
# wp_viewport.error
BAD_VALUE = 0
NO_SURFACE = 3


@dataclass(eq=False)
class Viewport:
    """A ``wp_viewport``; ``surface`` is None once the surface is destroyed."""

    id: int
    surface: Surface | None


def get_viewport(client: ClientCore, obj: WaylandObject, args: list[ArgValue],
                 fds: list[int]) -> None:
    new_id, surface_id = args
    assert isinstance(new_id, int) and isinstance(surface_id, int)
    surface = client.resource(surface_id, Surface)
    if surface.viewport_id is not None:
        raise WireError(f"{surface} already has wp_viewport@{surface.viewport_id}",
                        VIEWPORT_EXISTS, obj.id)
    surface.viewport_id = new_id
    client.resources[new_id] = Viewport(new_id, surface)


def _surface(client: ClientCore, obj: WaylandObject) -> Surface:
    surface = client.resource(obj.id, Viewport).surface
    if surface is None or not surface.alive:
        raise WireError(f"the wl_surface of wp_viewport@{obj.id} was destroyed", NO_SURFACE,
                        obj.id)
    return surface


def set_source(client: ClientCore, obj: WaylandObject, args: list[ArgValue],
               fds: list[int]) -> None:
    surface = _surface(client, obj)
    values = [Fraction(a.raw, 256) for a in args if isinstance(a, Fixed)]
    if all(v == -1 for v in values):
        source = None
    elif values[0] < 0 or values[1] < 0 or values[2] <= 0 or values[3] <= 0:
        raise WireError(f"source rectangle {[float(v) for v in values]} is invalid: x and y "
                        "must be at least 0, width and height above 0", BAD_VALUE, obj.id)
    else:
        source = (values[0], values[1], values[2], values[3])
    pending = surface.pending
    pending.source_set, pending.source = True, source


def set_destination(client: ClientCore, obj: WaylandObject, args: list[ArgValue],
                    fds: list[int]) -> None:
    surface = _surface(client, obj)
    width, height = args
    assert isinstance(width, int) and isinstance(height, int)
    if width == -1 and height == -1:
        destination = None
    elif width <= 0 or height <= 0:
        raise WireError(f"destination size {width}x{height} is not positive", BAD_VALUE,
                        obj.id)
    else:
        destination = (width, height)
    pending = surface.pending
    pending.destination_set, pending.destination = True, destination


def destroy_viewport(client: ClientCore, obj: WaylandObject, args: list[ArgValue],
                     fds: list[int]) -> None:
    viewport = client.resource(obj.id, Viewport)
    surface = viewport.surface
    if surface is not None and surface.alive and surface.viewport_id == obj.id:
        surface.viewport_id = None
        # The surface's crop and scale go with the next commit.
        pending = surface.pending
        pending.source_set, pending.source = True, None
        pending.destination_set, pending.destination = True, None


def surface_destroyed(client: ClientCore, surface: Surface) -> None:
    if surface.viewport_id is not None:
        viewport = client.resources.get(surface.viewport_id)
        if isinstance(viewport, Viewport):
            viewport.surface = None


HANDLERS: dict[tuple[str, str], Handler] = {
    ("wp_viewporter", "get_viewport"): get_viewport,
    ("wp_viewport", "set_source"): set_source,
    ("wp_viewport", "set_destination"): set_destination,
    ("wp_viewport", "destroy"): destroy_viewport,
}
