"""The seat's two selections (clipboard and primary): who owns each, who is offered it.

A selection is owned by a source: a client's ``wl_data_source`` or
``zwp_primary_selection_source_v1``, or the compositor's own text (the GUI
daemon's clipboard, through ``Selection.own_text``). The client with keyboard
focus is offered the current selection on each of its devices (a new offer
object, its MIME types, then ``selection``) when it gains focus, when it makes
a device, and whenever the selection changes; a source that loses the
selection is cancelled. ``Selection.read_text`` asks the owner for its text
through a pipe, for the agent to pass to the daemon.

Who may set a selection (both kinds): only the client with keyboard focus, as
the Qubes clipboard's trust model asks (a window in the background must not
replace what the user copied). The serial is not required to be a press's:
weston and wlroots accept any serial the client was sent (wl-copy uses its
``wl_keyboard.enter``'s), but like weston one older than the current
selection's is refused, so a late request cannot undo a newer copy. A refused
source is cancelled (as wlroots does), so its client knows it owns nothing.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterable
from typing import TYPE_CHECKING

from ..objects.objectmap import WaylandObject
from ..wire.codec import ArgValue, ErrorCode, WireError

if TYPE_CHECKING:
    from .client import ClientCore
    from .core import Compositor
    from .transfers import Transfers

log = logging.getLogger("qubesshm.compositor")

# What the compositor's own text is offered as (as weston's and Xwayland's text).
TEXT_MIMES = ("text/plain;charset=utf-8", "UTF8_STRING", "TEXT", "STRING", "text/plain")
# Which of a client's MIME types to read text as, best first (UTF-8 ones first).
READ_PREFERENCE = ("text/plain;charset=utf-8", "UTF8_STRING", "text/plain", "TEXT", "STRING")
# MIME types one source may offer: far above what toolkits offer (GTK: about 10).
MAX_MIME_TYPES = 256
# The longest MIME type kept.
MAX_MIME_LENGTH = 256


def best_text_mime(mimes: Iterable[str]) -> str | None:
    """The MIME type to read text as, from a source's offers; None if none is text."""
    by_name: dict[str, str] = {}
    for mime in mimes:
        key = mime.strip()
        if key.lower().replace(" ", "") == "text/plain;charset=utf-8":
            key = "text/plain;charset=utf-8"
        by_name.setdefault(key, mime)
    for wanted in READ_PREFERENCE:
        if wanted in by_name:
            return by_name[wanted]
    return None


def close_fd(fd: int) -> None:
    with contextlib.suppress(OSError):
        os.close(fd)


class Source:
    """What owns a selection (or is dragged): its MIME types, and how it sends data."""

    def __init__(self) -> None:
        self.mimes: list[str] = []
        self.alive = True

    def add_mime(self, mime: str) -> None:
        if mime in self.mimes:
            return
        if len(self.mimes) >= MAX_MIME_TYPES:
            raise WireError(f"qubesshm: too many MIME types: a source may offer "
                            f"{MAX_MIME_TYPES}", ErrorCode.NO_MEMORY)
        if len(mime.encode("utf-8", "surrogateescape")) > MAX_MIME_LENGTH:
            raise WireError(f"qubesshm: MIME type longer than {MAX_MIME_LENGTH} bytes",
                            ErrorCode.NO_MEMORY)
        self.mimes.append(mime)

    def send(self, mime: str, fd: int, reader: ClientCore | None = None) -> None:
        """Write the data as ``mime`` into ``fd`` (taking it), then close it; ``reader``
        is the client that asked (None: the agent)."""
        close_fd(fd)

    def cancel(self) -> None:
        """This source no longer owns the selection (or its drag is over)."""

    @property
    def client(self) -> ClientCore | None:
        return None


class ClientSource(Source):
    """A client's ``wl_data_source`` or ``zwp_primary_selection_source_v1``."""

    def __init__(self, client: ClientCore, object_id: int) -> None:
        super().__init__()
        self.owner = client
        self.id = object_id
        self.used = False  # given to set_selection or start_drag
        self.dragged = False  # given to start_drag (it may not be used again)
        # Drag and drop (wl_data_source v3).
        self.actions = 0
        self.actions_set = False
        self.accepted = False  # the target accepted a MIME type
        self.current_action = 0
        self.dropped = False
        self.drag_offer: object | None = None  # the datadevice.Offer the drag made last

    def __repr__(self) -> str:
        return f"source@{self.id} of {self.owner}"

    @property
    def client(self) -> ClientCore | None:
        return self.owner

    def send(self, mime: str, fd: int, reader: ClientCore | None = None) -> None:
        if not self.alive or not self.owner.send(self.id, "send", mime, fd):
            close_fd(fd)

    def cancel(self) -> None:
        if self.alive:
            self.owner.send(self.id, "cancelled")


class TextSource(Source):
    """The compositor's own text (from the GUI daemon's clipboard)."""

    def __init__(self, data: bytes, transfers: Transfers) -> None:
        super().__init__()
        self.data = bytes(data)
        self.transfers = transfers
        self.mimes = list(TEXT_MIMES)

    def send(self, mime: str, fd: int, reader: ClientCore | None = None) -> None:
        self.transfers.queue(fd, self.data, reader)


class Offer:
    """A selection offer made to a client (``wl_data_offer`` or the primary one);
    drag-and-drop offers are ``datadevice.DragOffer``."""

    def __init__(self, client: ClientCore, object_id: int, source: Source | None) -> None:
        self.client = client
        self.id = object_id
        self.source = source

    def receive(self, mime: str, fd: int) -> None:
        source = self.source
        if source is None or not source.alive:
            close_fd(fd)
        else:
            source.send(mime, fd, self.client)


class Device:
    """A client's ``wl_data_device`` or ``zwp_primary_selection_device_v1``."""

    def __init__(self, client: ClientCore, object_id: int, slot: SelectionSlot) -> None:
        self.client = client
        self.id = object_id
        self.slot = slot


class SelectionSlot:
    """One selection (the clipboard, or the primary selection) of the seat."""

    def __init__(self, selection: Selection, name: str, offer_interface: str) -> None:
        self.selection = selection
        self.name = name
        self.offer_interface = offer_interface
        self.source: Source | None = None
        self.serial: int | None = None  # the request's that set it; None: not a client's
        self.devices: dict[ClientCore, list[Device]] = {}

    # -- devices ---------------------------------------------------------------

    def add_device(self, device: Device) -> None:
        self.devices.setdefault(device.client, []).append(device)
        if self.selection.focused_client() is device.client:
            self._offer_on(device)

    def remove_device(self, device: Device) -> None:
        devices = self.devices.get(device.client, [])
        if device in devices:
            devices.remove(device)
        if not devices:
            self.devices.pop(device.client, None)

    # -- who owns it -----------------------------------------------------------

    def request(self, client: ClientCore, source: ClientSource | None, serial: int) -> bool:
        """A client's set_selection; False (the source cancelled) when refused."""
        why = self._refusal(client, serial)
        if why is not None:
            log.debug("%s: %s selection refused: %s", client, self.name, why)
            if source is not None:
                source.cancel()
            return False
        self.set(source, serial)
        return True

    def _refusal(self, client: ClientCore, serial: int) -> str | None:
        if self.selection.focused_client() is not client:
            return "the client does not have keyboard focus"
        if (self.source is not None and self.serial is not None
                and (self.serial - serial) & 0xFFFFFFFF < 0x80000000 and self.serial != serial):
            return f"serial {serial} is older than the selection's ({self.serial})"
        return None

    def set(self, source: Source | None, serial: int | None) -> None:
        """``source`` owns this selection now (None: nothing does)."""
        old = self.source
        self.source, self.serial = source, serial
        if old is not None and old is not source:
            old.cancel()
        self.offer_focused()

    def source_gone(self, source: Source) -> None:
        """``source`` was destroyed: if it owned the selection, nothing does now."""
        if self.source is source:
            self.source = self.serial = None
            self.offer_focused()

    def client_gone(self, client: ClientCore) -> None:
        self.devices.pop(client, None)
        source = self.source
        if source is not None and source.client is client:
            source.alive = False
            self.source = self.serial = None
            self.offer_focused()

    # -- offers ----------------------------------------------------------------

    def offer_focused(self) -> None:
        """Tell the client with keyboard focus what the selection is now."""
        client = self.selection.focused_client()
        if client is not None:
            self.offer_to(client)

    def offer_to(self, client: ClientCore) -> None:
        for device in list(self.devices.get(client, [])):
            self._offer_on(device)

    def _offer_on(self, device: Device) -> None:
        client = device.client
        if client.closed or not client.alive(device.id):
            return
        source = self.source
        if source is None or not source.alive:
            client.send(device.id, "selection", None)
            return
        try:
            offer_id = client.new_server_object(self.offer_interface,
                                                client.version(device.id))
        except WireError as err:  # (no server id left) outside any request of its
            client.post_error(err.object_id, err.code, err.message)
            return
        client.resources[offer_id] = Offer(client, offer_id, source)
        client.send(device.id, "data_offer", offer_id)
        for mime in source.mimes:
            client.send(offer_id, "offer", mime)
        client.send(device.id, "selection", offer_id)

    # -- the agent's side ------------------------------------------------------

    def read_text(self) -> int | None:
        source = self.source
        if source is None or not source.alive:
            return None
        mime = best_text_mime(source.mimes)
        if mime is None:
            return None
        read_end, write_end = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        try:
            source.send(mime, write_end)
        except BaseException:
            close_fd(read_end)
            raise
        return read_end


class Selection:
    """The clipboard and the primary selection of the compositor's one seat."""

    def __init__(self, compositor: Compositor, transfers: Transfers) -> None:
        self.compositor = compositor
        self.transfers = transfers
        self.clipboard = SelectionSlot(self, "clipboard", "wl_data_offer")
        self.primary = SelectionSlot(self, "primary", "zwp_primary_selection_offer_v1")
        from .datadevice import DataDevices  # (it builds on this module)

        self.dnd = DataDevices(self)
        compositor.seat.focus_listeners.append(self.focus_changed)

    def focused_client(self) -> ClientCore | None:
        return self.compositor.seat.keyboard_client

    def slot(self, primary: bool) -> SelectionSlot:
        return self.primary if primary else self.clipboard

    def focus_changed(self, client: ClientCore | None) -> None:
        """Keyboard focus moved to ``client``: it is offered both selections."""
        if client is not None and not client.closed:
            self.clipboard.offer_to(client)
            self.primary.offer_to(client)

    def client_gone(self, client: ClientCore) -> None:
        self.dnd.client_gone(client)
        self.clipboard.client_gone(client)
        self.primary.client_gone(client)

    # -- the agent's side ------------------------------------------------------

    def read_text(self, primary: bool = False) -> int | None:
        """The read end of a new pipe (non-blocking, close-on-exec) the selection's
        owner was asked to write its text into (as its best UTF-8 text type); None
        when there is no selection or it offers no text. The caller reads to EOF
        (bounded, with a timeout) and closes it."""
        return self.slot(primary).read_text()

    def own_text(self, data: bytes, primary: bool = False) -> None:
        """The compositor owns the selection with ``data``, offered as text to the
        client with keyboard focus (and each client as it gains focus)."""
        self.slot(primary).set(TextSource(data, self.transfers), None)

    def owner(self, primary: bool = False) -> int | None:
        """The number of the client owning the selection; 0 for the compositor's own
        text; None for no selection."""
        source = self.slot(primary).source
        if source is None:
            return None
        client = source.client
        return 0 if client is None else client.number


# -- requests both protocols handle alike ------------------------------------------------


def add_device(client: ClientCore, object_id: int, slot: SelectionSlot) -> None:
    """A new device object of ``client`` for ``slot`` (the clipboard or the primary)."""
    device = Device(client, object_id, slot)
    client.resources[object_id] = device
    slot.add_device(device)


def source_offer(client: ClientCore, obj: WaylandObject, args: list[ArgValue],
                 fds: list[int]) -> None:
    mime = args[0]
    assert isinstance(mime, str)
    client.resource(obj.id, ClientSource).add_mime(mime)


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


def device_release(client: ClientCore, obj: WaylandObject, args: list[ArgValue],
                   fds: list[int]) -> None:
    device = client.resource(obj.id, Device)
    device.slot.remove_device(device)
