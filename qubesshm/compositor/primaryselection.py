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
from .selection import ClientSource, Device, Offer, close_fd

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
    slot = client.compositor.selection.primary
    device = Device(client, new_id, slot)
    client.resources[new_id] = device
    slot.add_device(device)


def source_offer(client: ClientCore, obj: WaylandObject, args: list[ArgValue],
                 fds: list[int]) -> None:
    mime = args[0]
    assert isinstance(mime, str)
    client.resource(obj.id, PrimarySource).add_mime(mime)


def source_destroy(client: ClientCore, obj: WaylandObject, args: list[ArgValue],
                   fds: list[int]) -> None:
    source = client.resource(obj.id, PrimarySource)
    source.alive = False
    client.compositor.selection.primary.source_gone(source)


def offer_receive(client: ClientCore, obj: WaylandObject, args: list[ArgValue],
                  fds: list[int]) -> None:
    mime, fd = args
    assert isinstance(mime, str) and isinstance(fd, int)
    fds.remove(fd)
    offer = client.resources.get(obj.id)
    if isinstance(offer, Offer):
        offer.receive(mime, fd)
    else:
        close_fd(fd)


def set_selection(client: ClientCore, obj: WaylandObject, args: list[ArgValue],
                  fds: list[int]) -> None:
    source_id, serial = args
    assert isinstance(serial, int)
    assert source_id is None or isinstance(source_id, int)
    source = None if source_id is None else client.resource(source_id, PrimarySource)
    if source is not None:
        source.used = True
    client.compositor.selection.primary.request(client, source, serial)


def device_destroy(client: ClientCore, obj: WaylandObject, args: list[ArgValue],
                   fds: list[int]) -> None:
    device = client.resource(obj.id, Device)
    device.slot.remove_device(device)


HANDLERS: dict[tuple[str, str], Handler] = {
    ("zwp_primary_selection_device_manager_v1", "create_source"): create_source,
    ("zwp_primary_selection_device_manager_v1", "get_device"): get_device,
    ("zwp_primary_selection_source_v1", "offer"): source_offer,
    ("zwp_primary_selection_source_v1", "destroy"): source_destroy,
    ("zwp_primary_selection_offer_v1", "receive"): offer_receive,
    ("zwp_primary_selection_device_v1", "set_selection"): set_selection,
    ("zwp_primary_selection_device_v1", "destroy"): device_destroy,
}
