"""``wl_output``: the one screen, the GUI daemon's, as its clients see it.

Its size comes from the agent (``Compositor.set_screen``, from the daemon's
``MSG_XCONF``), its refresh rate from ``--refresh``; scale 1, no transform.
Mapped surfaces enter it (and, from ``wl_surface`` version 6, hear that scale 1
and no transform suit it best).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..objects.objectmap import WaylandObject
from ..wire.codec import ArgValue

if TYPE_CHECKING:
    from .client import ClientCore, Handler
    from .surfaces import Surface

NAME = "QUBES-1"
DESCRIPTION = "Qubes GUI daemon screen"
MAKE = "Qubes OS"
MODEL = "qubes-guid"
MODE_CURRENT = 1
SUBPIXEL_UNKNOWN = 0
TRANSFORM_NORMAL = 0
MM_PER_PIXEL = 25.4 / 96  # as if 96 dpi


class Output:
    """The screen's state, and every client's ``wl_output`` objects."""

    def __init__(self, width: int, height: int, refresh: float) -> None:
        self.width = width
        self.height = height
        self.refresh_mhz = round(refresh * 1000)
        self.bound: dict[ClientCore, list[int]] = {}

    # -- objects ---------------------------------------------------------------

    def bind(self, client: ClientCore, object_id: int, version: int) -> None:
        client.resources[object_id] = self
        self.bound.setdefault(client, []).append(object_id)
        self._send_all(client, object_id, first=True)
        for window in client.windows:
            if window.mapped:
                for surface in window.shown_surfaces():
                    self._enter_one(surface, object_id)

    def _send_all(self, client: ClientCore, object_id: int, *, first: bool) -> None:
        client.send(object_id, "geometry", 0, 0, round(self.width * MM_PER_PIXEL),
                    round(self.height * MM_PER_PIXEL), SUBPIXEL_UNKNOWN, MAKE, MODEL,
                    TRANSFORM_NORMAL)
        client.send(object_id, "mode", MODE_CURRENT, self.width, self.height,
                    self.refresh_mhz)
        if first:
            client.send(object_id, "scale", 1)
            client.send(object_id, "name", NAME)
            client.send(object_id, "description", DESCRIPTION)
        client.send(object_id, "done")

    def released(self, client: ClientCore, object_id: int) -> None:
        ids = self.bound.get(client, [])
        if object_id in ids:
            ids.remove(object_id)
        for surface in client.surfaces:
            surface.entered.discard(object_id)

    def client_gone(self, client: ClientCore) -> None:
        self.bound.pop(client, None)

    def set_size(self, width: int, height: int) -> bool:
        """The screen changed size: every client hears the new mode. True if it did."""
        if (width, height) == (self.width, self.height):
            return False
        self.width, self.height = width, height
        for client, ids in self.bound.items():
            for object_id in ids:
                self._send_all(client, object_id, first=False)
        return True

    # -- surfaces --------------------------------------------------------------

    def enter(self, surface: Surface) -> None:
        for object_id in self.bound.get(surface.client, []):
            self._enter_one(surface, object_id)

    def _enter_one(self, surface: Surface, object_id: int) -> None:
        if object_id in surface.entered or not surface.alive:
            return
        client = surface.client
        if not surface.entered:
            client.send(surface.id, "preferred_buffer_scale", 1)
            client.send(surface.id, "preferred_buffer_transform", TRANSFORM_NORMAL)
        surface.entered.add(object_id)
        client.send(surface.id, "enter", object_id)

    def leave(self, surface: Surface) -> None:
        if not surface.alive:
            return
        for object_id in sorted(surface.entered):
            surface.client.send(surface.id, "leave", object_id)
        surface.entered.clear()


def release(client: ClientCore, obj: WaylandObject, args: list[ArgValue],
            fds: list[int]) -> None:
    client.compositor.outputs.released(client, obj.id)


HANDLERS: dict[tuple[str, str], Handler] = {
    ("wl_output", "release"): release,
}
