"""``wl_data_device_manager`` (v3): data sources, offers and devices; copy and drag.

Copy and paste goes through the seat's clipboard (``selection.SelectionSlot``):
``set_selection`` from the client with keyboard focus makes its source the
owner, the previous one is cancelled, and the focused client is offered it.

Drag and drop (``start_drag``) needs the serial of a press this client was
sent (``Seat.serial_is_press``); the drag then takes the pointer
(``Seat.start_grab``): the seat reports the surface under the pointer, and the
drag sends ``enter`` (with a new offer, its MIME types and the source's
actions), ``motion`` and ``leave`` to the data device of that surface's client
(with no source, only the dragging client's own surfaces), negotiates the
action as weston does (the target's preferred one if both allow it, else the
first common one), and on the button's release sends ``drop`` when the target
accepted a type and an action was chosen, else cancels the source. The drag
icon takes the ``wl_data_device`` icon role; Qubes has no way to show it.
Requests and errors follow wayland.xml (``role``, ``used_source``,
``invalid_finish``, ``invalid_action_mask``, ``invalid_action``,
``invalid_offer``, ``invalid_source``), but a source set as the selection again
is no error (GTK 3 does it; weston and wlroots let it): ``used_source`` is for
a source given to ``start_drag`` after any use, or used after a drag.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from ..objects.objectmap import WaylandObject
from ..wire.codec import ArgValue, Fixed, WireError
from .selection import (
    ClientSource,
    Device,
    Offer,
    add_device,
    device_release,
    offer_receive,
    source_offer,
)
from .surfaces import Surface

if TYPE_CHECKING:
    from .client import ClientCore, Handler
    from .seat import Seat
    from .selection import Selection

log = logging.getLogger("qubesshm.compositor")

# wl_data_device_manager.dnd_action
ACTION_NONE = 0
ACTION_COPY = 1
ACTION_MOVE = 2
ACTION_ASK = 4
ALL_ACTIONS = ACTION_COPY | ACTION_MOVE | ACTION_ASK
# wl_data_device.error
ROLE = 0
USED_SOURCE = 1  # since wayland 1.22 (the XML bundled may predate it)
# wl_data_source.error
SOURCE_INVALID_ACTION_MASK = 0
SOURCE_INVALID_SOURCE = 1
# wl_data_offer.error
INVALID_FINISH = 0
INVALID_ACTION_MASK = 1
INVALID_ACTION = 2
INVALID_OFFER = 3
# Since which version the objects have drag-and-drop actions.
ACTIONS_SINCE = 3
ICON_ROLE = "wl_data_device-icon"


def fixed(value: float) -> Fixed:
    return Fixed(round(value * 256))


class DragOffer(Offer):
    """A ``wl_data_offer`` made by a drag entering a surface."""

    def __init__(self, client: ClientCore, object_id: int, source: ClientSource) -> None:
        super().__init__(client, object_id, source)
        self.drag_source = source
        self.actions = 0  # what the target accepts (set_actions)
        self.preferred = 0
        self.in_ask = False
        self.finished = False

    @property
    def current(self) -> bool:
        """Still the source's live drag offer (a drag makes one per enter)."""
        source = self.drag_source
        return source.alive and source.drag_offer is self

    def choose_action(self) -> int:
        """The action for this offer, as weston chooses it."""
        source = self.drag_source
        if self.client.version(self.id) >= ACTIONS_SINCE:
            offered, preferred = self.actions, self.preferred
        else:
            offered, preferred = ACTION_COPY, 0
        source_actions = (source.actions if source.owner.version(source.id) >= ACTIONS_SINCE
                          else ACTION_COPY)
        available = offered & source_actions
        if not available:
            return ACTION_NONE
        if preferred & available:
            return preferred
        return available & -available

    def update_action(self) -> None:
        source = self.drag_source
        if not self.current:
            return
        action = self.choose_action()
        if source.current_action == action:
            return
        source.current_action = action
        if self.in_ask:
            return
        source.owner.send(source.id, "action", action)
        self.client.send(self.id, "action", action)

    def finish_notify(self) -> None:
        """The target is done with the drop: the source hears it."""
        source = self.drag_source
        if not source.alive:
            return
        if self.in_ask:
            source.owner.send(source.id, "action", source.current_action)
        source.owner.send(source.id, "dnd_finished")
        source.drag_offer = None


class Drag:
    """One drag and drop in progress: the seat's pointer grab while it lasts."""

    def __init__(self, dnd: DataDevices, client: ClientCore, source: ClientSource | None,
                 origin: Surface, icon: Surface | None) -> None:
        self.dnd = dnd
        self.client = client
        self.source = source
        self.origin = origin
        self.icon = icon
        self.focus: Surface | None = None
        self.target: Device | None = None
        self.offer: DragOffer | None = None
        self.ended = False

    # -- the PointerGrab protocol (Seat.start_grab) --------------------------------

    def motion(self, surface: Surface | None, sx: float, sy: float, time_ms: int) -> None:
        if self.ended:
            return
        if surface is not None and not surface.alive:
            surface = None
        if surface is not self.focus:
            self._set_focus(surface, sx, sy)
        elif self.target is not None:
            self.target.client.send(self.target.id, "motion", time_ms & 0xFFFFFFFF,
                                    fixed(sx), fixed(sy))

    def button(self, button: int, pressed: bool, time_ms: int) -> None:
        if self.ended or pressed:
            return
        if self._seat().pointer.buttons:
            return  # the drop comes with the last button's release
        target, source = self.target, self.source
        if self.focus is not None and not self.focus.alive:
            target = None  # its surface went since the last motion
        if target is not None:
            if source is None:
                target.client.send(target.id, "drop")
            elif source.accepted and source.current_action != ACTION_NONE and self.offer:
                target.client.send(target.id, "drop")
                source.owner.send(source.id, "dnd_drop_performed")
                self.offer.in_ask = source.current_action == ACTION_ASK
                source.dropped = True
            else:
                source.cancel()
        elif source is not None:
            source.cancel()
        self._end()

    def cancel(self) -> None:
        """The seat broke the grab (or a party went away): no drop."""
        if self.ended:
            return
        if self.source is not None:
            self.source.cancel()
        self._end()

    # -- the drag's course ---------------------------------------------------------

    def _set_focus(self, surface: Surface | None, sx: float, sy: float) -> None:
        self._leave()
        if surface is None:
            return
        client = surface.client
        if self.source is None and client is not self.client:
            return
        devices = self.dnd.selection.clipboard.devices.get(client, [])
        live = [d for d in devices if client.alive(d.id)]
        if not live or client.closed:
            return
        device = live[-1]
        offer_id: int | None = None
        source = self.source
        if source is not None:
            source.accepted = False
            offer_id = client.new_server_object("wl_data_offer", client.version(device.id))
            offer = DragOffer(client, offer_id, source)
            client.resources[offer_id] = offer
            source.drag_offer = offer
            self.offer = offer
            client.send(device.id, "data_offer", offer_id)
            for mime in source.mimes:
                client.send(offer_id, "offer", mime)
            offer.update_action()
            client.send(offer_id, "source_actions", source.actions)
        serial = client.compositor.next_serial()
        client.send(device.id, "enter", serial, surface.id, fixed(sx), fixed(sy), offer_id)
        self.focus, self.target = surface, device

    def _leave(self) -> None:
        target = self.target
        if target is not None:
            target.client.send(target.id, "leave")
        source = self.source
        if source is not None and not source.dropped and self.offer is not None:
            if source.drag_offer is self.offer:
                source.drag_offer = None
            self.offer.source = None
        self.focus = self.target = None
        self.offer = None

    def _end(self) -> None:
        self.ended = True
        # A dropped offer stays usable after the leave (for receive and finish).
        offer, self.offer = self.offer, None
        target = self.target
        if target is not None:
            target.client.send(target.id, "leave")
        self.focus = self.target = None
        if self.source is not None and not self.source.dropped and offer is not None:
            offer.source = None
            if self.source.drag_offer is offer:
                self.source.drag_offer = None
        if self.dnd.drag is self:
            self.dnd.drag = None
        seat = self._seat()
        if seat.grab is self:
            seat.end_grab()

    def _seat(self) -> Seat:
        return self.dnd.selection.compositor.seat

    def gone(self, client: ClientCore) -> None:
        """A client went away: the drag ends if it was the dragging one."""
        if self.ended:
            return
        if client is self.client:
            if self.source is not None:
                self.source.alive = False
            self.target = None if self.target is not None and \
                self.target.client is client else self.target
            self._end()
        elif self.target is not None and self.target.client is client:
            self.focus = self.target = None
            self.offer = None


class DataDevices:
    """The data device state beyond the selection: the drag in progress."""

    def __init__(self, selection: Selection) -> None:
        self.selection = selection
        self.drag: Drag | None = None

    def client_gone(self, client: ClientCore) -> None:
        if self.drag is not None:
            self.drag.gone(client)


def _selection(client: ClientCore) -> Selection:
    return client.compositor.selection


# -- wl_data_device_manager -----------------------------------------------------------


def create_data_source(client: ClientCore, obj: WaylandObject, args: list[ArgValue],
                       fds: list[int]) -> None:
    new_id = args[0]
    assert isinstance(new_id, int)
    client.resources[new_id] = ClientSource(client, new_id)


def get_data_device(client: ClientCore, obj: WaylandObject, args: list[ArgValue],
                    fds: list[int]) -> None:
    new_id = args[0]
    assert isinstance(new_id, int)
    add_device(client, new_id, _selection(client).clipboard)


# -- wl_data_source -------------------------------------------------------------------


def source_set_actions(client: ClientCore, obj: WaylandObject, args: list[ArgValue],
                       fds: list[int]) -> None:
    actions = args[0]
    assert isinstance(actions, int)
    source = client.resource(obj.id, ClientSource)
    if source.actions_set:
        raise WireError(f"{source}: actions set more than once", SOURCE_INVALID_ACTION_MASK,
                        obj.id)
    if actions & ~ALL_ACTIONS:
        raise WireError(f"{source}: invalid action mask {actions:#x}",
                        SOURCE_INVALID_ACTION_MASK, obj.id)
    if source.used:
        raise WireError(f"{source}: actions set after it was used",
                        SOURCE_INVALID_ACTION_MASK, obj.id)
    source.actions = actions
    source.actions_set = True


def source_destroy(client: ClientCore, obj: WaylandObject, args: list[ArgValue],
                   fds: list[int]) -> None:
    source = client.resource(obj.id, ClientSource)
    source.alive = False
    selection = _selection(client)
    selection.clipboard.source_gone(source)
    drag = selection.dnd.drag
    if drag is not None and drag.source is source:
        drag.source = None
        drag.cancel()


# -- wl_data_offer --------------------------------------------------------------------


def offer_accept(client: ClientCore, obj: WaylandObject, args: list[ArgValue],
                 fds: list[int]) -> None:
    _, mime = args
    assert mime is None or isinstance(mime, str)
    offer = client.resource(obj.id, Offer)
    if not isinstance(offer, DragOffer):
        return  # a selection offer: accept means nothing there
    if offer.finished:
        raise WireError(f"wl_data_offer@{obj.id} was already finished", INVALID_OFFER, obj.id)
    if not offer.current:
        return
    source = offer.drag_source
    source.owner.send(source.id, "target", mime)
    source.accepted = mime is not None


def offer_finish(client: ClientCore, obj: WaylandObject, args: list[ArgValue],
                 fds: list[int]) -> None:
    offer = client.resource(obj.id, Offer)
    if not isinstance(offer, DragOffer):
        raise WireError(f"wl_data_offer@{obj.id} is not a drag and drop offer: finish is "
                        "only valid for drag and drop", INVALID_FINISH, obj.id)
    source = offer.drag_source
    if offer.finished or not source.dropped:
        raise WireError(f"wl_data_offer@{obj.id} finished before a drop (or twice)",
                        INVALID_FINISH, obj.id)
    if source.current_action == ACTION_NONE:
        raise WireError(f"wl_data_offer@{obj.id} finished with no action", INVALID_FINISH,
                        obj.id)
    offer.finished = True
    if offer.current:
        offer.finish_notify()


def offer_set_actions(client: ClientCore, obj: WaylandObject, args: list[ArgValue],
                      fds: list[int]) -> None:
    actions, preferred = args
    assert isinstance(actions, int) and isinstance(preferred, int)
    offer = client.resource(obj.id, Offer)
    if not isinstance(offer, DragOffer):
        raise WireError(f"wl_data_offer@{obj.id} is not a drag and drop offer",
                        INVALID_OFFER, obj.id)
    if offer.finished:
        raise WireError(f"wl_data_offer@{obj.id} was already finished", INVALID_OFFER, obj.id)
    if actions & ~ALL_ACTIONS:
        raise WireError(f"invalid action mask {actions:#x}", INVALID_ACTION_MASK, obj.id)
    if preferred and (preferred & ~actions or preferred & (preferred - 1)):
        raise WireError(f"invalid preferred action {preferred:#x} (actions {actions:#x})",
                        INVALID_ACTION, obj.id)
    offer.actions, offer.preferred = actions, preferred
    offer.update_action()


def offer_destroy(client: ClientCore, obj: WaylandObject, args: list[ArgValue],
                  fds: list[int]) -> None:
    offer = client.resources.get(obj.id)
    if not isinstance(offer, DragOffer) or not offer.current:
        return
    source = offer.drag_source
    if not source.dropped or offer.finished:
        return
    # Dropped and never finished: a v3 target gave up; an older one cannot finish.
    if client.version(obj.id) < ACTIONS_SINCE:
        offer.finish_notify()
    else:
        source.drag_offer = None
        source.cancel()


# -- wl_data_device -------------------------------------------------------------------


def _drag_refusal(client: ClientCore, seat: Seat, serial: int,
                  origin: Surface) -> str | None:
    """Why a drag may not start (None: it may): as wlroots checks its pointer grab
    serial, a press of this client's with the button still held on its surface."""
    if client.compositor.selection.dnd.drag is not None:
        return "a drag is on"
    if not origin.alive:
        return "the origin surface is gone"
    if not seat.serial_is_press(client, serial):
        return f"serial {serial} is not a recent press of the client's"
    focus = seat.pointer.focus
    if not seat.pointer.buttons or focus is None or focus.client is not client:
        return "the client does not hold the pointer with a button down"
    return None


def start_drag(client: ClientCore, obj: WaylandObject, args: list[ArgValue],
               fds: list[int]) -> None:
    source_id, origin_id, icon_id, serial = args
    assert isinstance(origin_id, int) and isinstance(serial, int)
    assert source_id is None or isinstance(source_id, int)
    source = None if source_id is None else client.resource(source_id, ClientSource)
    origin = client.resource(origin_id, Surface)
    icon: Surface | None = None
    if icon_id is not None:
        assert isinstance(icon_id, int)
        icon = client.resource(icon_id, Surface)
        if icon.role not in (None, ICON_ROLE):
            raise WireError(f"{icon} already has the role {icon.role}", ROLE, obj.id)
    if source is not None:
        if source.used:
            raise WireError(f"{source} was already used", USED_SOURCE, obj.id)
        source.used = source.dragged = True
    selection = _selection(client)
    seat = client.compositor.seat
    why = _drag_refusal(client, seat, serial, origin)
    if why is not None:
        log.debug("%s: start_drag refused: %s", client, why)
        if source is not None:
            source.cancel()
        return
    if icon is not None:
        icon.role = ICON_ROLE
    drag = Drag(selection.dnd, client, source, origin, icon)
    selection.dnd.drag = drag
    seat.start_grab(drag)


def set_selection(client: ClientCore, obj: WaylandObject, args: list[ArgValue],
                  fds: list[int]) -> None:
    source_id, serial = args
    assert isinstance(serial, int)
    assert source_id is None or isinstance(source_id, int)
    source = None if source_id is None else client.resource(source_id, ClientSource)
    if source is not None:
        if source.actions_set:
            raise WireError(f"{source} has drag-and-drop actions: it cannot be a selection",
                            SOURCE_INVALID_SOURCE, source.id)
        if source.dragged:
            raise WireError(f"{source} was used for a drag", USED_SOURCE, obj.id)
        # GTK 3 sets the same source again (wlroots and weston let it): no error.
        source.used = True
    _selection(client).clipboard.request(client, source, serial)


HANDLERS: dict[tuple[str, str], Handler] = {
    ("wl_data_device_manager", "create_data_source"): create_data_source,
    ("wl_data_device_manager", "get_data_device"): get_data_device,
    ("wl_data_source", "offer"): source_offer,
    ("wl_data_source", "set_actions"): source_set_actions,
    ("wl_data_source", "destroy"): source_destroy,
    ("wl_data_offer", "accept"): offer_accept,
    ("wl_data_offer", "receive"): offer_receive,
    ("wl_data_offer", "finish"): offer_finish,
    ("wl_data_offer", "set_actions"): offer_set_actions,
    ("wl_data_offer", "destroy"): offer_destroy,
    ("wl_data_device", "start_drag"): start_drag,
    ("wl_data_device", "set_selection"): set_selection,
    ("wl_data_device", "release"): device_release,
}
