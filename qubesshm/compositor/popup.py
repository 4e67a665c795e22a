"""``xdg_popup``: a menu or tooltip, placed by its positioner next to its parent.

The place is computed in screen coordinates (``positioner.place`` against the
agent's screen, the parent's window geometry put where the agent shows it) and
sent relative to the parent's window geometry; it becomes the window's
``popup_place`` at the commit that acknowledges it. A popup whose parent unmaps
is dismissed.

``grab`` asks the seat (``Seat.grab_popup``): granted for the serial of a recent
press sent to the client, on a popup whose parent is the topmost grabbing popup
(or, first in a chain, not a popup); a denied grab dismisses the popup at once,
as the protocol says. Grabbing popups form the seat's chain: keyboard focus goes
to its topmost mapped one, and only the topmost may be destroyed
(``xdg_wm_base.not_the_topmost_popup``) until the compositor dismisses them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..objects.objectmap import WaylandObject
from ..pixels.region import Rect
from ..wire.codec import ArgValue, WireError
from .positioner import Positioner, place
from .shell import WindowKind
from .windows import Window
from .xdg import (
    ALREADY_CONSTRUCTED,
    INVALID_POPUP_PARENT,
    NOT_THE_TOPMOST_POPUP,
    ROLE,
    XdgSurface,
    complete_positioner,
)

if TYPE_CHECKING:
    from .client import ClientCore, Handler

# xdg_popup.error
INVALID_GRAB = 0


class Popup(Window):
    """An ``xdg_popup``."""

    def __init__(self, xdg: XdgSurface, object_id: int, parent: Window | None,
                 positioner: Positioner) -> None:
        super().__init__(WindowKind.POPUP, xdg, object_id)
        self.parent = parent
        self.positioner = positioner
        self.shell_window.parent = None if parent is None else parent.shell_window

    def parent_rect(self) -> Rect:
        """The parent's window geometry on the screen (the screen, without a parent)."""
        shell = self.compositor.shell
        parent = self.parent
        if parent is None:
            return shell.screen()
        geometry = parent.geometry()
        origin = shell.window_origin(parent.shell_window) if parent.mapped else None
        x, y = origin if origin is not None else (0, 0)
        return Rect(x, y, geometry.width, geometry.height)

    def send_place(self, token: int | None = None) -> None:
        """Place the popup and send the configure sequence."""
        parent = self.parent_rect()
        where = place(self.positioner, parent, self.compositor.shell.screen())
        if token is not None:
            self.client.send(self.id, "repositioned", token)
        self.client.send(self.id, "configure", where.x - parent.x, where.y - parent.y,
                         where.width, where.height)
        self.xdg.configure(where)

    def initial_configure(self) -> None:
        if not self.dismissed:
            self.send_place()

    def root_committed(self) -> bool:
        acked = self.xdg.take_acked()
        w = self.shell_window
        if isinstance(acked, Rect) and acked != w.popup_place:
            w.popup_place = acked
            return True
        return False

    def can_map(self) -> bool:
        if not super().can_map():
            return False
        if self.parent is not None and not self.parent.mapped:
            # A popup's parent must be mapped first: this one goes away at once.
            self.dismiss()
            return False
        return True

    def dismiss(self) -> None:
        """The compositor ends the popup: ``popup_done`` (children first), unmapped."""
        if self.dismissed or not self.alive:
            return
        self.dismissed = True
        self.compositor.dismiss_popups_of(self)
        self.client.send(self.id, "popup_done")
        self.compositor.seat.popup_gone(self)
        self.unmap()

    def map(self) -> None:
        super().map()
        if self.mapped:
            self.compositor.seat.popup_mapped(self)

    def unmapped(self) -> None:
        self.xdg.reset()
        self.compositor.dismiss_popups_of(self)
        self.compositor.seat.window_unmapped(self)

    def retired(self) -> None:
        self.compositor.seat.popup_gone(self)



# -- requests -------------------------------------------------------------------


def get_popup(client: ClientCore, obj: WaylandObject, args: list[ArgValue],
              fds: list[int]) -> None:
    new_id, parent_id, positioner_id = args
    assert isinstance(new_id, int) and isinstance(positioner_id, int)
    xdg = client.resource(obj.id, XdgSurface)
    if xdg.window is not None:
        raise WireError(f"{xdg} already has a role object", ALREADY_CONSTRUCTED, obj.id)
    surface = xdg.surface
    if surface.role not in (None, "xdg_popup"):
        raise WireError(f"{surface} already has the role {surface.role}", ROLE, xdg.base.id)
    parent: Window | None = None
    if isinstance(parent_id, int):
        parent_xdg = client.resource(parent_id, XdgSurface)
        parent = parent_xdg.window
        if parent is None or parent_xdg is xdg:
            raise WireError(f"xdg_surface@{parent_id} cannot be a popup's parent: it has no "
                            "xdg_toplevel or xdg_popup", INVALID_POPUP_PARENT, xdg.base.id)
    positioner = complete_positioner(client, positioner_id, xdg.base.id)
    surface.role = "xdg_popup"
    popup = Popup(xdg, new_id, parent, positioner)
    xdg.window = popup
    xdg.constructed = True
    client.resources[new_id] = popup


def destroy_popup(client: ClientCore, obj: WaylandObject, args: list[ArgValue],
                  fds: list[int]) -> None:
    popup = client.resource(obj.id, Popup)
    seat = client.compositor.seat
    if seat.in_chain(popup) and not seat.is_topmost_grab(popup):
        raise WireError(f"xdg_popup@{obj.id} destroyed while a popup it grabbed for is "
                        "still open above it", NOT_THE_TOPMOST_POPUP, popup.xdg.base.id)
    popup.retire()


def grab(client: ClientCore, obj: WaylandObject, args: list[ArgValue],
         fds: list[int]) -> None:
    popup = client.resource(obj.id, Popup)
    serial = args[1]
    assert isinstance(serial, int)
    if popup.xdg.initial_commit_done or popup.mapped:
        raise WireError(f"xdg_popup@{obj.id}.grab after its initial commit", INVALID_GRAB,
                        obj.id)
    parent = popup.parent
    if isinstance(parent, Popup) and parent.dismissed:
        popup.dismiss()  # the protocol: a dismissed grabbing parent, a dismissed child
        return
    if popup.dismissed or not client.compositor.seat.grab_popup(popup, serial):
        popup.dismiss()


def reposition(client: ClientCore, obj: WaylandObject, args: list[ArgValue],
               fds: list[int]) -> None:
    popup = client.resource(obj.id, Popup)
    positioner_id, token = args
    assert isinstance(positioner_id, int) and isinstance(token, int)
    popup.positioner = complete_positioner(client, positioner_id, popup.xdg.base.id)
    if popup.xdg.initial_commit_done and not popup.dismissed:
        popup.send_place(token)


HANDLERS: dict[tuple[str, str], Handler] = {
    ("xdg_surface", "get_popup"): get_popup,
    ("xdg_popup", "destroy"): destroy_popup,
    ("xdg_popup", "grab"): grab,
    ("xdg_popup", "reposition"): reposition,
}
