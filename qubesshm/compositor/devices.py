"""What the seat's keyboard and pointer share: every client's objects of one device.

A client may make any number of ``wl_keyboard`` or ``wl_pointer`` objects of the
seat; each gets the device's events while the device's focus is on that
client's surface. ``DeviceObjects`` keeps them per client, and forgets them as
they are released or their client goes.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .client import ClientCore
    from .surfaces import Surface


class DeviceObjects:
    """The live objects of one input device, per client, and the device's focus."""

    def __init__(self) -> None:
        self.focus: Surface | None = None
        self.resources: dict[ClientCore, list[int]] = {}

    def track(self, client: ClientCore, object_id: int) -> None:
        self.resources.setdefault(client, []).append(object_id)

    def remove(self, client: ClientCore, object_id: int) -> None:
        ids = self.resources.get(client)
        if ids is not None and object_id in ids:
            ids.remove(object_id)
            if not ids:
                del self.resources[client]

    def live(self, client: ClientCore) -> list[int]:
        return [i for i in self.resources.get(client, ()) if client.alive(i)]

    def client_gone(self, client: ClientCore) -> None:
        self.resources.pop(client, None)
        if self.focus is not None and self.focus.client is client:
            self.lose_focus()

    def surface_destroyed(self, surface: Surface) -> None:
        """The focused surface is gone: no leave (its object is gone too)."""
        if self.focus is surface:
            self.lose_focus()

    def lose_focus(self) -> None:
        """The focus went with its surface or client, with nothing to tell."""
        self.focus = None
