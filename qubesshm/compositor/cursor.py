"""The pointer's look: ``wl_pointer.set_cursor`` and ``wp_cursor_shape_v1``.

Either request counts only from the client the pointer is over, naming the
serial of the latest ``wl_pointer.enter`` it was sent; others are ignored, as
the protocols say. The agent hears ``Shell.cursor_changed`` for the window under
the pointer: a shape name for ``set_shape``, "default" for a cursor surface (the
daemon can only show X cursors, not the client's image), None for a hidden one.
A cursor surface gets the role "cursor": its commits are shown nowhere, so its
buffers go back and its frame callbacks run at once.

``wp_cursor_shape_v1`` is handled here by interface name; the global is offered
only when the loaded protocol set has its XML (Debian 12's wayland-protocols
1.31 does not).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..objects.objectmap import WaylandObject
from ..pixels.region import Region
from ..wire.codec import ArgValue, WireError
from .pointer import PointerResource
from .surfaces import Surface

if TYPE_CHECKING:
    from .client import ClientCore, Handler

# wl_pointer.error
ROLE = 0
# wp_cursor_shape_device_v1.error
INVALID_SHAPE = 1
CURSOR_ROLE = "cursor"

# wp_cursor_shape_device_v1.shape (version 1), as CSS spells them.
SHAPES: dict[int, str] = {
    1: "default", 2: "context-menu", 3: "help", 4: "pointer", 5: "progress", 6: "wait",
    7: "cell", 8: "crosshair", 9: "text", 10: "vertical-text", 11: "alias", 12: "copy",
    13: "move", 14: "no-drop", 15: "not-allowed", 16: "grab", 17: "grabbing",
    18: "e-resize", 19: "n-resize", 20: "ne-resize", 21: "nw-resize", 22: "s-resize",
    23: "se-resize", 24: "sw-resize", 25: "w-resize", 26: "ew-resize", 27: "ns-resize",
    28: "nesw-resize", 29: "nwse-resize", 30: "col-resize", 31: "row-resize",
    32: "all-scroll", 33: "zoom-in", 34: "zoom-out",
}


class CursorShapeDevice:
    """A ``wp_cursor_shape_device_v1``: for a pointer, or (inert) a tablet tool."""

    def __init__(self, pointer_id: int | None) -> None:
        self.pointer_id = pointer_id


def cursor_committed(surface: Surface) -> None:
    """A cursor surface applied a commit: nothing shows it, so its buffer and frame
    callbacks are done with at once."""
    surface.release_buffer()
    surface.damage = Region()
    if surface.frames:
        callbacks, surface.frames = surface.frames, []
        surface.client.compositor.frames.add(surface.client, callbacks)


# -- requests -------------------------------------------------------------------


def set_cursor(client: ClientCore, obj: WaylandObject, args: list[ArgValue],
               fds: list[int]) -> None:
    serial, surface_id, _hotspot_x, _hotspot_y = args
    assert isinstance(serial, int)
    client.resource(obj.id, PointerResource)
    surface = client.resource(surface_id, Surface) if isinstance(surface_id, int) else None
    seat = client.compositor.seat
    if not seat.cursor_allowed(client, serial):
        return
    if surface is not None:
        if surface.role not in (None, CURSOR_ROLE):
            raise WireError(f"{surface} already has the role {surface.role}: it cannot be "
                            "a cursor", ROLE, obj.id)
        surface.role = CURSOR_ROLE
    seat.cursor_changed(None if surface is None else "default")


def get_shape_pointer(client: ClientCore, obj: WaylandObject, args: list[ArgValue],
                      fds: list[int]) -> None:
    new_id, pointer_id = args
    assert isinstance(new_id, int) and isinstance(pointer_id, int)
    client.resource(pointer_id, PointerResource)
    client.resources[new_id] = CursorShapeDevice(pointer_id)


def get_shape_tablet_tool(client: ClientCore, obj: WaylandObject, args: list[ArgValue],
                          fds: list[int]) -> None:
    new_id = args[0]
    assert isinstance(new_id, int)
    client.resources[new_id] = CursorShapeDevice(None)  # no tablets: inert


def set_shape(client: ClientCore, obj: WaylandObject, args: list[ArgValue],
              fds: list[int]) -> None:
    serial, shape = args
    assert isinstance(serial, int) and isinstance(shape, int)
    device = client.resource(obj.id, CursorShapeDevice)
    name = SHAPES.get(shape)
    if name is None:
        raise WireError(f"cursor shape {shape} is not a wp_cursor_shape_device_v1.shape",
                        INVALID_SHAPE, obj.id)
    if device.pointer_id is None or not client.alive(device.pointer_id):
        return
    seat = client.compositor.seat
    if seat.cursor_allowed(client, serial):
        seat.cursor_changed(name)


HANDLERS: dict[tuple[str, str], Handler] = {
    ("wl_pointer", "set_cursor"): set_cursor,
    ("wp_cursor_shape_manager_v1", "get_pointer"): get_shape_pointer,
    ("wp_cursor_shape_manager_v1", "get_tablet_tool_v2"): get_shape_tablet_tool,
    ("wp_cursor_shape_device_v1", "set_shape"): set_shape,
}
