"""``zwp_primary_selection_device_manager_v1``: the primary selection (middle-click paste).

The same rules as the clipboard (``selection``): only the client with keyboard
focus may set it, the previous source is cancelled, the focused client is
offered it. It stays within the VM's clients unless the agent reads it
(``Selection.read_text(primary=True)``); the Qubes clipboard is the other one.
The protocol defines no errors.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..objects.objectmap import WaylandObject
from ..wire.codec import ArgValue
from .selection import ClientSource, add_device, device_release, offer_receive, source_offer

if TYPE_CHECKING:
    from .client import ClientCore, Handler


class PrimarySource(ClientSource):
    """A ``zwp_primary_selection_source_v1``."""


def create_source(client: ClientCore, obj: WaylandObject, args: list[ArgValue],
                  fds: list[int]) -> None:
    new_id = args[0]
    assert isinstance(new_id, int)
    client.resources[new_id] = PrimarySource(client, new_id)


def get_device(client: ClientCore, obj: WaylandObject, args: list[ArgValue],
               fds: list[int]) -> None:
    new_id = args[0]
    assert isinstance(new_id, int)
    add_device(client, new_id, client.compositor.selection.primary)


def source_destroy(client: ClientCore, obj: WaylandObject, args: list[ArgValue],
                   fds: list[int]) -> None:
    source = client.resource(obj.id, PrimarySource)
    source.alive = False
    client.compositor.selection.primary.source_gone(source)


def set_selection(client: ClientCore, obj: WaylandObject, args: list[ArgValue],
                  fds: list[int]) -> None:
    source_id, serial = args
    assert isinstance(serial, int)
    assert source_id is None or isinstance(source_id, int)
    source = None if source_id is None else client.resource(source_id, PrimarySource)
    if source is not None:
        source.used = True
    client.compositor.selection.primary.request(client, source, serial)


HANDLERS: dict[tuple[str, str], Handler] = {
    ("zwp_primary_selection_device_manager_v1", "create_source"): create_source,
    ("zwp_primary_selection_device_manager_v1", "get_device"): get_device,
    ("zwp_primary_selection_source_v1", "offer"): source_offer,
    ("zwp_primary_selection_source_v1", "destroy"): source_destroy,
    ("zwp_primary_selection_offer_v1", "receive"): offer_receive,
    ("zwp_primary_selection_device_v1", "set_selection"): set_selection,
    ("zwp_primary_selection_device_v1", "destroy"): device_release,
}
