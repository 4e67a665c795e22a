"""``wl_pointer``: the seat's pointer, the surface it is over, buttons and the wheel.

The pointer's focus is one surface; ``enter`` and ``leave`` move it, each group
of events closed by ``frame`` (version 5 on). ``button`` and the wheel go to the
focused client's pointers. A wheel click is ``axis`` 15 (libinput's degrees per
click) with, by version, ``axis_source`` wheel and ``axis_discrete`` (5 to 7) or
``axis_value120`` (8 on) before it. The serial of each ``enter`` is kept per client:
``set_cursor`` (``cursor``) needs the latest.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..objects.objectmap import WaylandObject
from ..wire.codec import ArgValue, Fixed
from .devices import DeviceObjects

if TYPE_CHECKING:
    from .client import ClientCore, Handler
    from .surfaces import Surface

BUTTON_RELEASED = 0
BUTTON_PRESSED = 1
AXIS_SOURCE_WHEEL = 0
# libinput's scroll for one wheel click, in the axis event's units.
AXIS_PER_STEP = 15.0
AXIS_VALUE120_SINCE = 8
AXIS_DISCRETE_SINCE = 5


def fixed(value: float) -> Fixed:
    return Fixed(round(value * 256))


class PointerResource:
    """A ``wl_pointer`` object."""

    def __init__(self, pointer: Pointer) -> None:
        self.pointer = pointer


class Pointer(DeviceObjects):
    """The seat's one pointer, and every client's ``wl_pointer`` objects of it."""

    def __init__(self) -> None:
        super().__init__()
        self.position = (0.0, 0.0)  # in the focused surface's coordinates
        self.enter_serials: dict[ClientCore, int] = {}
        self.buttons: list[int] = []  # held down, in the order pressed

    # -- objects ---------------------------------------------------------------

    def add(self, client: ClientCore, object_id: int) -> None:
        client.resources[object_id] = PointerResource(self)
        self.track(client, object_id)
        focus = self.focus
        if focus is not None and focus.client is client and focus.alive:
            serial = self.enter_serials.get(client)
            if serial is None:
                serial = client.compositor.next_serial()
                self.enter_serials[client] = serial
            client.send(object_id, "enter", serial, focus.id, fixed(self.position[0]),
                        fixed(self.position[1]))
            client.send(object_id, "frame")

    def client_gone(self, client: ClientCore) -> None:
        self.enter_serials.pop(client, None)
        super().client_gone(client)

    def lose_focus(self) -> None:
        self.focus = None
        self.buttons = []

    def _usable(self) -> Surface | None:
        focus = self.focus
        if focus is None or not focus.alive or focus.client.closed:
            return None
        return focus

    # -- events ----------------------------------------------------------------

    def set_focus(self, surface: Surface | None, sx: float = 0.0, sy: float = 0.0) -> None:
        """Leave the focused surface (if another) and enter ``surface`` at (sx, sy)."""
        old = self._usable()
        if old is surface and surface is not None:
            self.motion_to(sx, sy, None)
            return
        if old is not None:
            client = old.client
            serial = client.compositor.next_serial()
            for object_id in self.live(client):
                client.send(object_id, "leave", serial, old.id)
                if surface is None or surface.client is not client:
                    client.send(object_id, "frame")
            self.enter_serials.pop(client, None)
        self.focus = surface
        self.position = (sx, sy)
        if surface is None or surface.client.closed:
            return
        client = surface.client
        serial = client.compositor.next_serial()
        self.enter_serials[client] = serial
        for object_id in self.live(client):
            client.send(object_id, "enter", serial, surface.id, fixed(sx), fixed(sy))
            client.send(object_id, "frame")

    def motion_to(self, sx: float, sy: float, time_ms: int | None) -> None:
        """Motion within the focused surface (nothing sent if the point is unchanged,
        or when ``time_ms`` is None, only the position is noted)."""
        focus = self._usable()
        if focus is None or (sx, sy) == self.position:
            return
        self.position = (sx, sy)
        if time_ms is None:
            return
        client = focus.client
        for object_id in self.live(client):
            client.send(object_id, "motion", time_ms & 0xFFFFFFFF, fixed(sx), fixed(sy))
            client.send(object_id, "frame")

    def button(self, button: int, pressed: bool, time_ms: int) -> tuple[ClientCore, int] | None:
        """A button went down or up: (client, serial) of the event sent, if any."""
        if pressed:
            if button in self.buttons:
                return None
            self.buttons.append(button)
        else:
            if button not in self.buttons:
                return None
            self.buttons.remove(button)
        focus = self._usable()
        if focus is None:
            return None
        client = focus.client
        serial = client.compositor.next_serial()
        state = BUTTON_PRESSED if pressed else BUTTON_RELEASED
        for object_id in self.live(client):
            client.send(object_id, "button", serial, time_ms & 0xFFFFFFFF, button, state)
            client.send(object_id, "frame")
        return client, serial

    def axis(self, axis: int, steps: int, time_ms: int) -> None:
        """``steps`` wheel clicks on ``axis`` (0 vertical, 1 horizontal)."""
        focus = self._usable()
        if focus is None or steps == 0:
            return
        client = focus.client
        for object_id in self.live(client):
            version = client.version(object_id)
            client.send(object_id, "axis_source", AXIS_SOURCE_WHEEL)
            if version >= AXIS_VALUE120_SINCE:
                client.send(object_id, "axis_value120", axis, steps * 120)
            elif version >= AXIS_DISCRETE_SINCE:
                client.send(object_id, "axis_discrete", axis, steps)
            client.send(object_id, "axis", time_ms & 0xFFFFFFFF, axis,
                        fixed(steps * AXIS_PER_STEP))
            client.send(object_id, "frame")


# -- requests -------------------------------------------------------------------


def release_pointer(client: ClientCore, obj: WaylandObject, args: list[ArgValue],
                    fds: list[int]) -> None:
    resource = client.resource(obj.id, PointerResource)
    resource.pointer.remove(client, obj.id)


HANDLERS: dict[tuple[str, str], Handler] = {
    ("wl_pointer", "release"): release_pointer,
}
