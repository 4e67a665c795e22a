"""``wl_display`` and ``wl_registry``: the globals a client may bind, and sync.

Each global is offered at the lower of the version qubesshm implements and the
one its protocol XML defines. Binds are checked as libwayland-server checks
them (an advertised name, the same interface, a version from 1 to the one
advertised), each error on the registry object.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..objects.objectmap import WaylandObject
from ..wire.codec import ArgValue, ErrorCode, UntypedNewId, WireError
from ..wire.protocol import ProtocolTable

if TYPE_CHECKING:
    from .client import ClientCore, Handler

Bind = Callable[["ClientCore", int, int], None]

# What qubesshm implements of each global it offers.
IMPLEMENTED_VERSIONS: dict[str, int] = {
    "wl_compositor": 6,
    "wl_subcompositor": 1,
    "wl_shm": 2,
    "wl_output": 4,
    "xdg_wm_base": 6,
    "wp_viewporter": 1,
    "zxdg_decoration_manager_v1": 1,
    "wl_data_device_manager": 3,
    "zwp_primary_selection_device_manager_v1": 1,
    "wl_seat": 8,
}
# Globals offered only when the loaded protocol set has their XML (Debian 12's
# wayland-protocols 1.31 lacks cursor-shape-v1; a protocol directory may add it).
OPTIONAL_VERSIONS: dict[str, int] = {
    "wp_cursor_shape_manager_v1": 1,
}


@dataclass(frozen=True, slots=True)
class Global:
    name: int
    interface: str
    version: int
    bind: Bind | None  # what binding does beyond making the object


def make_globals(protocol: ProtocolTable, binds: dict[str, Bind]) -> list[Global]:
    """The globals, numbered from 1, at the versions both sides know."""
    out: list[Global] = []
    for interface, ours in (IMPLEMENTED_VERSIONS | OPTIONAL_VERSIONS).items():
        spec = protocol.get(interface)
        if spec is None:
            continue
        out.append(Global(len(out) + 1, interface, min(ours, spec.version),
                          binds.get(interface)))
    return out


class Registry:
    """A ``wl_registry`` object."""


def get_registry(client: ClientCore, obj: WaylandObject, args: list[ArgValue],
                 fds: list[int]) -> None:
    new_id = args[0]
    assert isinstance(new_id, int)
    client.resources[new_id] = Registry()
    for g in client.compositor.globals:
        client.send(new_id, "global", g.name, g.interface, g.version)


def sync(client: ClientCore, obj: WaylandObject, args: list[ArgValue],
         fds: list[int]) -> None:
    callback = args[0]
    assert isinstance(callback, int)
    client.send(callback, "done", client.compositor.serial)
    client.destroy(callback)


def bind(client: ClientCore, obj: WaylandObject, args: list[ArgValue],
         fds: list[int]) -> None:
    name, new = args
    assert isinstance(name, int) and isinstance(new, UntypedNewId)
    found = next((g for g in client.compositor.globals if g.name == name), None)
    if found is None:
        raise WireError(f"invalid global {new.interface} ({name})", ErrorCode.INVALID_OBJECT,
                        obj.id)
    if found.interface != new.interface:
        raise WireError(f"invalid interface for global {name}: have {new.interface}, wanted "
                        f"{found.interface}", ErrorCode.INVALID_OBJECT, obj.id)
    if new.version == 0:
        raise WireError(f"invalid version for global {new.interface} ({name}): 0 is not a "
                        "valid version", ErrorCode.INVALID_OBJECT, obj.id)
    if new.version > found.version:
        raise WireError(f"invalid version for global {new.interface} ({name}): have "
                        f"{found.version}, wanted {new.version}", ErrorCode.INVALID_OBJECT,
                        obj.id)
    client.create(new.id, client.protocol[found.interface], new.version)
    client.resources[new.id] = found
    if found.bind is not None:
        found.bind(client, new.id, new.version)


HANDLERS: dict[tuple[str, str], Handler] = {
    ("wl_display", "get_registry"): get_registry,
    ("wl_display", "sync"): sync,
    ("wl_registry", "bind"): bind,
}
