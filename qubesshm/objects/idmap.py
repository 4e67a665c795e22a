"""Two id spaces: the client's ids and the ids the proxy uses on the compositor connection.

The proxy creates objects of its own upstream (grant-backed pools and buffers)
and keeps some of the client's objects to itself (its ``wl_shm`` pools and
buffers), so the two connections' client-side ids drift apart. ``UpstreamIds``
allocates upstream ids under libwayland's rules (an id comes free only with the
compositor's ``wl_display.delete_id``) and translates client ids to upstream ids
and back. The proxy's own objects take the lowest free id; a client object keeps
its own id when that id is free upstream, so the two spaces stay identical (and
messages need no rewriting) for as long as they can, and takes the lowest free
id otherwise. Server-created ids (0xff000000 and up) are the same on both
connections.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass, field

from .objectmap import DISPLAY_ID, MAP_MAX_OBJECTS, SERVER_ID_MIN

# How far ahead of the next fresh id a client id may be and still be kept as it is.
MAX_SKIP = 4096


class IdSpaceError(RuntimeError):
    """A misuse of the id space by the proxy itself (a bug, never client input)."""


@dataclass(slots=True)
class _Slot:
    client_id: int | None  # None: an object the proxy owns
    owner: object = None  # what the proxy's own object belongs to
    destroyed: bool = False  # waiting for delete_id


@dataclass
class UpstreamIds:
    """Allocation of upstream client ids and the translation to and from client ids."""

    _slots: dict[int, _Slot] = field(default_factory=dict)
    _to_upstream: dict[int, int] = field(default_factory=dict)
    _free: list[int] = field(default_factory=list)  # min-heap of free ids below _next
    _free_set: set[int] = field(default_factory=set)  # the same ids, for lookups
    _next: int = DISPLAY_ID + 1
    # Ids that differ between the connections (the proxy's own count too); while
    # there are none, messages can be relayed without looking at their ids.
    _diverged: int = 0
    # The highest id the client has used: a client id beyond it + 1 is the client's own
    # skip, not the proxy's doing.
    _client_highest: int = DISPLAY_ID

    def __post_init__(self) -> None:
        self._slots[DISPLAY_ID] = _Slot(DISPLAY_ID)
        self._to_upstream[DISPLAY_ID] = DISPLAY_ID

    def _allocate(self) -> int:
        while self._free:
            upstream = heapq.heappop(self._free)
            if upstream in self._free_set:  # entries taken by _claim stay in the heap
                self._free_set.discard(upstream)
                return upstream
        if self._next >= MAP_MAX_OBJECTS:
            raise IdSpaceError("no upstream object ids left")
        upstream = self._next
        self._next += 1
        return upstream

    def _claim(self, wanted: int) -> int:
        """``wanted`` itself if the compositor would take it now, else the lowest free id."""
        if wanted in self._free_set:
            self._take_free(wanted)
            return wanted
        if wanted == self._next and wanted < MAP_MAX_OBJECTS:
            self._next += 1
            return wanted
        if (self._client_highest + 1 < wanted and self._next <= wanted
                and wanted < min(self._next + MAX_SKIP, MAP_MAX_OBJECTS)):
            # The client skipped ids in its own space (libwayland clients never do; the
            # proxy with grants refuses it first): relay the id unchanged, for the
            # compositor to refuse as it would without the proxy, and keep the skipped
            # ids free.
            for skipped in range(self._next, wanted):
                heapq.heappush(self._free, skipped)
                self._free_set.add(skipped)
            self._next = wanted + 1
            return wanted
        # The client's ids ran ahead of the compositor's because of objects the
        # compositor never saw: an id past the compositor's next one would be refused.
        return self._allocate()

    def _take_free(self, upstream: int) -> None:
        self._free_set.discard(upstream)
        # The heap keeps the taken id until it surfaces; rebuild it before such dead
        # entries pile up (a frame callback can reuse one id every frame).
        if len(self._free) > 2 * len(self._free_set) + 64:
            self._free = sorted(self._free_set)

    # -- creating -------------------------------------------------------------

    def add_client_object(self, client_id: int) -> int:
        """Give the client's new object ``client_id`` an upstream id."""
        if client_id in self._to_upstream:
            raise IdSpaceError(f"client id {client_id} already has upstream id "
                               f"{self._to_upstream[client_id]}")
        upstream = self._claim(client_id)
        self._client_highest = max(self._client_highest, client_id)
        self._slots[upstream] = _Slot(client_id)
        self._to_upstream[client_id] = upstream
        if upstream != client_id:
            self._diverged += 1
        return upstream

    def add_own_object(self, owner: object) -> int:
        """An upstream id for an object the proxy creates itself."""
        upstream = self._allocate()
        self._slots[upstream] = _Slot(None, owner)
        self._diverged += 1
        return upstream

    def add_local(self, client_id: int) -> None:
        """The client made an object the compositor never sees: its ids run ahead."""
        self._client_highest = max(self._client_highest, client_id)
        self._diverged += 1

    def remove_local(self, client_id: int) -> None:
        self._diverged -= 1

    # -- translating ----------------------------------------------------------

    @property
    def upstream_ids(self) -> dict[int, int]:
        """Client id -> upstream id of every client object the compositor knows
        (server ids excepted); read-only, for the relay's fast path."""
        return self._to_upstream

    @property
    def slots(self) -> dict[int, _Slot]:
        """Upstream id -> what it stands for; read-only, for the relay's fast path."""
        return self._slots

    def upstream(self, client_id: int) -> int | None:
        """The upstream id of a client object, None if the compositor never saw it."""
        if client_id >= SERVER_ID_MIN:
            return client_id
        return self._to_upstream.get(client_id)

    def client(self, upstream_id: int) -> int | None:
        """The client id behind an upstream id, None for the proxy's own or unknown ids."""
        if upstream_id >= SERVER_ID_MIN:
            return upstream_id
        slot = self._slots.get(upstream_id)
        return None if slot is None else slot.client_id

    def owner(self, upstream_id: int) -> object:
        """What a proxy-owned upstream id belongs to (None if it is not the proxy's)."""
        slot = self._slots.get(upstream_id)
        return None if slot is None or slot.client_id is not None else slot.owner

    def is_own(self, upstream_id: int) -> bool:
        slot = self._slots.get(upstream_id)
        return slot is not None and slot.client_id is None

    def identical(self) -> bool:
        """Whether every known id is the same on both connections."""
        return self._diverged == 0

    # -- retiring -------------------------------------------------------------

    def destroyed(self, upstream_id: int) -> None:
        """A destructor ran; the id stays taken until the compositor's delete_id."""
        if upstream_id >= SERVER_ID_MIN:
            return  # the compositor's own ids need no delete_id
        slot = self._slots.get(upstream_id)
        if slot is None:
            raise IdSpaceError(f"upstream id {upstream_id} is not in use")
        slot.destroyed = True

    def delete_id(self, upstream_id: int) -> _Slot | None:
        """``wl_display.delete_id`` from the compositor: the id is free again.

        Returns what the id stood for, None for an id the proxy does not know (as
        libwayland clients, it is merely ignored).
        """
        if upstream_id == DISPLAY_ID or upstream_id >= SERVER_ID_MIN:
            return None
        slot = self._slots.pop(upstream_id, None)
        if slot is None:
            return None
        if slot.client_id is not None:
            del self._to_upstream[slot.client_id]
        if slot.client_id != upstream_id:
            self._diverged -= 1
        heapq.heappush(self._free, upstream_id)
        self._free_set.add(upstream_id)
        return slot

    # -- inspecting (tests, stats) --------------------------------------------

    def in_use(self) -> dict[int, int | None]:
        """Every upstream id in use, with its client id (None: the proxy's own)."""
        return {u: s.client_id for u, s in self._slots.items()}

    def live_own(self, upstream_id: int) -> bool:
        """An object of the proxy's that it has not destroyed."""
        slot = self._slots.get(upstream_id)
        return slot is not None and slot.client_id is None and not slot.destroyed

    def awaiting_delete(self) -> set[int]:
        return {u for u, s in self._slots.items() if s.destroyed}
