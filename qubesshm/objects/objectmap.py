"""Object tracking for one client connection: id -> (interface, version).

Client ids (1..0xfeffffff) are created by requests and retired by the
compositor's ``wl_display.delete_id``; until then a destroyed one is a *zombie*:
events already in flight for it must still be decoded (they may carry fds), but
the client may neither use nor reuse it. Server ids (0xff000000 and up) are
created by events; the compositor frees them at once when they are destroyed.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..wire.codec import ErrorCode, WireError
from ..wire.protocol import InterfaceSpec

DISPLAY_ID = 1
CLIENT_ID_MAX = 0xFEFFFFFF
# libwayland's wl_map refuses ids from here on (WL_MAP_MAX_OBJECTS).
MAP_MAX_OBJECTS = 0x00F00000
SERVER_ID_MIN = 0xFF000000
SERVER_ID_MAX = 0xFFFFFFFF


def is_client_id(object_id: int) -> bool:
    return 1 <= object_id <= CLIENT_ID_MAX


@dataclass(slots=True)
class WaylandObject:
    id: int
    interface: InterfaceSpec
    version: int
    alive: bool = True

    def __str__(self) -> str:
        return f"{self.interface.name}@{self.id}"


class ObjectMap:
    """The live and zombie objects of one connection."""

    def __init__(self, display: InterfaceSpec, *, refuse_skipped_ids: bool = True) -> None:
        self._objects: dict[int, WaylandObject] = {
            DISPLAY_ID: WaylandObject(DISPLAY_ID, display, 1)
        }
        # libwayland's server map has an entry for every client id up to the highest
        # one used; a new id may be a free entry or the next one, never beyond.
        self._client_next = DISPLAY_ID + 1
        self.refuse_skipped_ids = refuse_skipped_ids

    def __len__(self) -> int:
        return len(self._objects)

    def get(self, object_id: int) -> WaylandObject | None:
        """The object with this id, zombie or alive."""
        return self._objects.get(object_id)

    def live(self, object_id: int) -> WaylandObject | None:
        obj = self._objects.get(object_id)
        return obj if obj is not None and obj.alive else None

    @property
    def entries(self) -> dict[int, WaylandObject]:
        """Every object by id, zombies included; read-only, for the relay's fast path."""
        return self._objects

    def accepts_client_id(self, object_id: int) -> bool:
        """Whether ``create_by_client`` would take ``object_id`` now."""
        return (1 <= object_id < MAP_MAX_OBJECTS and object_id not in self._objects
                and not (self.refuse_skipped_ids and object_id > self._client_next))

    def create_by_client(self, object_id: int, interface: InterfaceSpec,
                         version: int) -> WaylandObject:
        # libwayland reports a bad new id as invalid arguments, on wl_display.
        if not 1 <= object_id < MAP_MAX_OBJECTS:
            raise WireError(f"new id {object_id} is outside the client id range",
                            ErrorCode.INVALID_METHOD, DISPLAY_ID)
        known = self._objects.get(object_id)
        if known is not None:
            state = "in use" if known.alive else "awaiting wl_display.delete_id"
            raise WireError(f"new id {object_id} is still {state} ({known})",
                            ErrorCode.INVALID_METHOD, DISPLAY_ID)
        if self.refuse_skipped_ids and object_id > self._client_next:
            raise WireError(f"new id {object_id} skips ahead of the next new id "
                            f"{self._client_next}", ErrorCode.INVALID_METHOD, DISPLAY_ID)
        self._client_next = max(self._client_next, object_id + 1)
        obj = WaylandObject(object_id, interface, version)
        self._objects[object_id] = obj
        return obj

    def create_by_server(self, object_id: int, interface: InterfaceSpec,
                         version: int) -> WaylandObject:
        if object_id < SERVER_ID_MIN:
            raise WireError(f"compositor created object {object_id} outside the server range",
                            ErrorCode.IMPLEMENTATION)
        known = self._objects.get(object_id)
        if known is not None and known.alive:
            raise WireError(f"compositor reused live server id {object_id} ({known})",
                            ErrorCode.IMPLEMENTATION)
        obj = WaylandObject(object_id, interface, version)
        self._objects[object_id] = obj
        return obj

    def destroyed(self, obj: WaylandObject, *, by_compositor: bool) -> None:
        """A destructor request or event ran on ``obj``."""
        if by_compositor and not is_client_id(obj.id):
            # The compositor freed its own id; no delete_id will follow.
            self._objects.pop(obj.id, None)
        else:
            obj.alive = False

    def delete_id(self, object_id: int) -> bool:
        """``wl_display.delete_id``: the compositor is done with a client id.

        Returns False for an id we do not know, which libwayland clients merely log.
        """
        if not is_client_id(object_id) or object_id == DISPLAY_ID:
            raise WireError(f"compositor sent delete_id for id {object_id}",
                            ErrorCode.IMPLEMENTATION)
        # The compositor deletes ids of objects it destroyed itself as well, so a live
        # entry is fine.
        return self._objects.pop(object_id, None) is not None
