"""``zxdg_decoration_manager_v1``: window decorations are always the server's.

In a Qubes VM, dom0 draws each window's coloured frame, so a client asking for
any mode is told ``server_side``, as part of a toplevel configure sequence.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..objects.objectmap import WaylandObject
from ..wire.codec import ArgValue, WireError
from .toplevel import Toplevel

if TYPE_CHECKING:
    from .client import ClientCore, Handler

# zxdg_toplevel_decoration_v1.error
UNCONFIGURED_BUFFER = 0
ALREADY_CONSTRUCTED = 1
ORPHANED = 2
SERVER_SIDE = 2


@dataclass(eq=False)
class Decoration:
    """A ``zxdg_toplevel_decoration_v1``."""

    client: ClientCore
    id: int
    toplevel: Toplevel | None

    def send_mode(self) -> None:
        self.client.send(self.id, "configure", SERVER_SIDE)


def get_toplevel_decoration(client: ClientCore, obj: WaylandObject, args: list[ArgValue],
                            fds: list[int]) -> None:
    new_id, toplevel_id = args
    assert isinstance(new_id, int) and isinstance(toplevel_id, int)
    toplevel = client.resource(toplevel_id, Toplevel)
    decoration = Decoration(client, new_id, toplevel)
    client.resources[new_id] = decoration
    if toplevel.decoration is not None and client.alive(toplevel.decoration.id):
        raise WireError(f"xdg_toplevel@{toplevel_id} already has "
                        f"zxdg_toplevel_decoration_v1@{toplevel.decoration.id}",
                        ALREADY_CONSTRUCTED, new_id)
    surface = toplevel.surface
    pending = surface.pending
    if surface.buffer is not None or (pending.attached and pending.buffer is not None):
        raise WireError(f"xdg_toplevel@{toplevel_id} has a buffer attached or committed: "
                        "too late for a decoration object", UNCONFIGURED_BUFFER, new_id)
    toplevel.decoration = decoration
    toplevel.reconfigure()


def _mode_request(client: ClientCore, obj: WaylandObject, args: list[ArgValue],
                  fds: list[int]) -> None:
    """``set_mode`` or ``unset_mode``: the answer is server side, whatever was asked."""
    decoration = client.resource(obj.id, Decoration)
    if decoration.toplevel is not None:
        decoration.toplevel.reconfigure()


def destroy_decoration(client: ClientCore, obj: WaylandObject, args: list[ArgValue],
                       fds: list[int]) -> None:
    decoration = client.resource(obj.id, Decoration)
    toplevel = decoration.toplevel
    if toplevel is not None and toplevel.decoration is decoration:
        toplevel.decoration = None


HANDLERS: dict[tuple[str, str], Handler] = {
    ("zxdg_decoration_manager_v1", "get_toplevel_decoration"): get_toplevel_decoration,
    ("zxdg_toplevel_decoration_v1", "set_mode"): _mode_request,
    ("zxdg_toplevel_decoration_v1", "unset_mode"): _mode_request,
    ("zxdg_toplevel_decoration_v1", "destroy"): destroy_decoration,
}
