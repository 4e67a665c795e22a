"""``xdg_wm_base``, ``xdg_positioner`` and ``xdg_surface``: the desktop shell's base.

An ``XdgSurface`` gives a ``wl_surface`` a role object (``toplevel.Toplevel`` or
``popup.Popup``), numbers the configure events it sends and checks the client's
acknowledgements; its window geometry is double-buffered with the surface.
The positioner rules and placement are ``positioner``'s.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ..objects.objectmap import WaylandObject
from ..pixels.region import Rect
from ..wire.codec import ArgValue, WireError
from .positioner import InvalidInput, InvalidPositioner, Positioner, check_complete
from .surfaces import Surface

if TYPE_CHECKING:
    from .client import ClientCore, Handler
    from .windows import Window

# xdg_wm_base.error
ROLE = 0
DEFUNCT_SURFACES = 1
NOT_THE_TOPMOST_POPUP = 2
INVALID_POPUP_PARENT = 3
INVALID_SURFACE_STATE = 4
INVALID_POSITIONER = 5
UNRESPONSIVE = 6
# xdg_surface.error
NOT_CONSTRUCTED = 1
ALREADY_CONSTRUCTED = 2
UNCONFIGURED_BUFFER = 3
INVALID_SERIAL = 4
INVALID_SIZE = 5
DEFUNCT_ROLE_OBJECT = 6


@dataclass(eq=False)
class WmBase:
    """A bound ``xdg_wm_base``: its surfaces, and the ping awaiting a pong."""

    client: ClientCore
    id: int
    surfaces: set[XdgSurface] = field(default_factory=set)
    ping_serial: int | None = None
    ping_sent_at: float = 0.0


class XdgSurface:
    """An ``xdg_surface`` and its role object's window."""

    def __init__(self, client: ClientCore, object_id: int, base: WmBase,
                 surface: Surface) -> None:
        self.client = client
        self.id = object_id
        self.base = base
        self.surface = surface
        self.window: Window | None = None  # the live role object
        self.constructed = False  # a role object was made (it may be gone now)
        self.initial_commit_done = False  # the initial configure was sent
        self.configured = False  # a configure was acknowledged since then
        self.pending_geometry: Rect | None = None
        self.geometry: Rect | None = None
        # Configures sent and not yet acknowledged: (serial, what the role sent).
        self.sent: list[tuple[int, object]] = []
        self.acked: tuple[int, object] | None = None  # applied at the next commit
        # Serials sent before the window last unmapped: an ack of one was in flight,
        # so it is no error, and configures nothing.
        self.stale: set[int] = set()

    def __repr__(self) -> str:
        return f"xdg_surface@{self.id}"

    def check_commit(self) -> None:
        """What a commit of the surface may not do (before its state applies)."""
        surface = self.surface
        if not self.constructed:
            raise WireError(f"{self} was committed before it got a role object "
                            "(get_toplevel or get_popup)", NOT_CONSTRUCTED, self.id)
        pending = surface.pending
        has_buffer = (pending.buffer is not None if pending.attached
                      else surface.buffer is not None)
        if self.window is not None and has_buffer and not self.configured:
            raise WireError(f"{self} has a buffer before acknowledging its first configure",
                            UNCONFIGURED_BUFFER, self.id)

    def configure(self, payload: object) -> int:
        """Close a configure sequence with ``xdg_surface.configure``; its serial."""
        serial = self.client.compositor.next_serial()
        self.sent.append((serial, payload))
        self.client.send(self.id, "configure", serial)
        return serial

    def take_acked(self) -> object | None:
        """At commit: what the last acknowledged configure asked for, once."""
        acked, self.acked = self.acked, None
        return None if acked is None else acked[1]

    def reset(self) -> None:
        """The window unmapped: the client starts again with an initial commit."""
        self.initial_commit_done = False
        self.configured = False
        self.stale = {serial for serial, _ in self.sent}
        self.sent = []
        self.acked = None


# -- xdg_wm_base ------------------------------------------------------------------


def bind_wm_base(client: ClientCore, object_id: int, version: int) -> None:
    base = WmBase(client, object_id)
    client.resources[object_id] = base
    client.compositor.wm_bases.add(base)


def destroy_wm_base(client: ClientCore, obj: WaylandObject, args: list[ArgValue],
                    fds: list[int]) -> None:
    base = client.resource(obj.id, WmBase)
    if base.surfaces:
        raise WireError(f"xdg_wm_base@{obj.id} destroyed while {len(base.surfaces)} "
                        "xdg_surface(s) made from it exist", DEFUNCT_SURFACES, obj.id)
    client.compositor.wm_bases.discard(base)


def create_positioner(client: ClientCore, obj: WaylandObject, args: list[ArgValue],
                      fds: list[int]) -> None:
    new_id = args[0]
    assert isinstance(new_id, int)
    client.resources[new_id] = Positioner()


def get_xdg_surface(client: ClientCore, obj: WaylandObject, args: list[ArgValue],
                    fds: list[int]) -> None:
    new_id, surface_id = args
    assert isinstance(new_id, int) and isinstance(surface_id, int)
    base = client.resource(obj.id, WmBase)
    surface = client.resource(surface_id, Surface)
    if surface.role not in (None, "xdg_toplevel", "xdg_popup"):
        raise WireError(f"{surface} already has the role {surface.role}", ROLE, obj.id)
    if surface.xdg is not None:
        raise WireError(f"{surface} already has an xdg_surface ({surface.xdg})", ROLE, obj.id)
    xdg = XdgSurface(client, new_id, base, surface)
    client.resources[new_id] = xdg
    pending = surface.pending
    if surface.buffer is not None or (pending.attached and pending.buffer is not None):
        raise WireError(f"{surface} has a buffer attached or committed: it cannot become "
                        "an xdg_surface", UNCONFIGURED_BUFFER, new_id)
    surface.xdg = xdg
    base.surfaces.add(xdg)


def pong(client: ClientCore, obj: WaylandObject, args: list[ArgValue],
         fds: list[int]) -> None:
    serial = args[0]
    base = client.resource(obj.id, WmBase)
    if base.ping_serial is not None and serial == base.ping_serial:
        base.ping_serial = None


# -- xdg_positioner ----------------------------------------------------------------


def _positioner_request(name: str) -> Handler:
    def handler(client: ClientCore, obj: WaylandObject, args: list[ArgValue],
                fds: list[int]) -> None:
        positioner = client.resource(obj.id, Positioner)
        values = [a for a in args if isinstance(a, int)]
        try:
            getattr(positioner, name)(*values)
        except InvalidInput as exc:
            raise WireError(str(exc), exc.code, obj.id) from exc

    return handler


def complete_positioner(client: ClientCore, positioner_id: int, base_id: int) -> Positioner:
    """A copy of a positioner ``get_popup`` or ``reposition`` may use."""
    positioner = client.resource(positioner_id, Positioner)
    try:
        check_complete(positioner)
    except InvalidPositioner as exc:
        raise WireError(str(exc), INVALID_POSITIONER, base_id) from exc
    return positioner.copy()


# -- xdg_surface -------------------------------------------------------------------


def destroy_xdg_surface(client: ClientCore, obj: WaylandObject, args: list[ArgValue],
                        fds: list[int]) -> None:
    xdg = client.resource(obj.id, XdgSurface)
    if xdg.window is not None:
        raise WireError(f"{xdg} destroyed before its role object {xdg.window.id}",
                        DEFUNCT_ROLE_OBJECT, obj.id)
    xdg.base.surfaces.discard(xdg)
    if xdg.surface.xdg is xdg:
        xdg.surface.xdg = None


def set_window_geometry(client: ClientCore, obj: WaylandObject, args: list[ArgValue],
                        fds: list[int]) -> None:
    xdg = client.resource(obj.id, XdgSurface)
    x, y, width, height = args
    assert isinstance(x, int) and isinstance(y, int)
    assert isinstance(width, int) and isinstance(height, int)
    if not xdg.constructed:
        raise WireError(f"{xdg}.set_window_geometry before a role object", NOT_CONSTRUCTED,
                        obj.id)
    if width <= 0 or height <= 0:
        raise WireError(f"window geometry {width}x{height} is not positive", INVALID_SIZE,
                        obj.id)
    xdg.pending_geometry = Rect(x, y, width, height)


def ack_configure(client: ClientCore, obj: WaylandObject, args: list[ArgValue],
                  fds: list[int]) -> None:
    xdg = client.resource(obj.id, XdgSurface)
    serial = args[0]
    assert isinstance(serial, int)
    if not xdg.constructed:
        raise WireError(f"{xdg}.ack_configure before a role object", NOT_CONSTRUCTED, obj.id)
    for index, (sent, payload) in enumerate(xdg.sent):
        if sent == serial:
            xdg.acked = (sent, payload)
            del xdg.sent[: index + 1]
            xdg.configured = True
            return
    if serial in xdg.stale:
        return
    raise WireError(f"{xdg}.ack_configure({serial}): no such configure is waiting "
                    "(unknown, or older than one already acknowledged)", INVALID_SERIAL,
                    obj.id)


HANDLERS: dict[tuple[str, str], Handler] = {
    ("xdg_wm_base", "destroy"): destroy_wm_base,
    ("xdg_wm_base", "create_positioner"): create_positioner,
    ("xdg_wm_base", "get_xdg_surface"): get_xdg_surface,
    ("xdg_wm_base", "pong"): pong,
    ("xdg_positioner", "set_size"): _positioner_request("set_size"),
    ("xdg_positioner", "set_anchor_rect"): _positioner_request("set_anchor_rect"),
    ("xdg_positioner", "set_anchor"): _positioner_request("set_anchor"),
    ("xdg_positioner", "set_gravity"): _positioner_request("set_gravity"),
    ("xdg_positioner", "set_constraint_adjustment"):
        _positioner_request("set_constraint_adjustment"),
    ("xdg_positioner", "set_offset"): _positioner_request("set_offset"),
    ("xdg_positioner", "set_reactive"): _positioner_request("set_reactive"),
    ("xdg_positioner", "set_parent_size"): _positioner_request("set_parent_size"),
    ("xdg_positioner", "set_parent_configure"): _positioner_request("set_parent_configure"),
    ("xdg_surface", "destroy"): destroy_xdg_surface,
    ("xdg_surface", "set_window_geometry"): set_window_geometry,
    ("xdg_surface", "ack_configure"): ack_configure,
}
