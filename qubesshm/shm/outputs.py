"""Output buffers: the grant-backed ``wl_buffer``\\ s the compositor is shown instead.

Each surface keeps a small queue of them, as sommelier does: *released* ones may
be filled, *busy* ones are attached upstream until the compositor's
``wl_buffer.release``. Each remembers what it lacks, the ``stale`` region: every
commit's damage is added to every output buffer of the surface, and filling one
copies exactly its stale region and clears it. A new buffer, or a change of size,
format, transform, scale or viewport, makes everything stale.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from ..grants.lifetimes import Area
from ..pixels.region import Region
from .clientpool import ClientBuffer

# Output buffers per surface: enough for the compositor to hold one on screen and
# one queued (a synchronized subsurface's cached state) while the next is filled.
MAX_OUTPUTS_PER_SURFACE = 3

BufferKey = tuple[int, int, int, int]  # width, height, stride, format


class OutputState(enum.Enum):
    RELEASED = "released"  # may be filled
    BUSY = "busy"  # attached upstream, the compositor may read it
    RETIRED = "retired"  # destroyed upstream; its area went back to the cache


@dataclass(eq=False)
class OutputBuffer:
    key: BufferKey
    area: Area  # grant pages and the compositor's pool over them
    upstream_id: int  # its wl_buffer on the compositor connection
    stale: Region
    state: OutputState = OutputState.RELEASED
    attached_at: float = 0.0
    # The surface is gone or changed shape: retire once the compositor releases it.
    orphaned: bool = False
    orphaned_at: float = 0.0
    # Attached last on its surface: the compositor may be showing it.
    shown: bool = False
    # The client's buffer its pixels were last copied from: while the compositor holds
    # this output for a surface that is gone, it stands for that buffer, and goes when
    # the client destroys it.
    source: ClientBuffer | None = None

    @property
    def pages(self) -> int:
        return self.area.pages

    def __str__(self) -> str:
        width, height, _, _ = self.key
        return f"output wl_buffer@{self.upstream_id} ({width}x{height}, {self.pages} pages)"


class OutputQueue:
    """One surface's output buffers."""

    def __init__(self, cap: int = MAX_OUTPUTS_PER_SURFACE) -> None:
        self.cap = cap
        self.buffers: list[OutputBuffer] = []
        # The output last attached upstream, while the compositor may still show it
        # (until another buffer, or none, is attached): compositors that read a shm
        # buffer while showing it release it only once it is replaced.
        self.current: OutputBuffer | None = None

    def show(self, out: OutputBuffer | None) -> None:
        """``out`` was attached upstream (None: something else, or nothing, was)."""
        if self.current is not None:
            self.current.shown = False
        self.current = out
        if out is not None:
            out.shown = True

    def add_damage(self, damage: Region) -> None:
        if not damage:
            return
        for out in self.buffers:
            out.stale = out.stale.union(damage)

    def make_stale(self) -> None:
        for out in self.buffers:
            width, height, _, _ = out.key
            out.stale = Region.full(width, height)

    def pick(self, key: BufferKey) -> OutputBuffer | None:
        """The released buffer of this shape that lacks least."""
        best: OutputBuffer | None = None
        for out in self.buffers:
            if out.state is OutputState.RELEASED and out.key == key and (
                    best is None or out.stale.area < best.stale.area):
                best = out
        return best

    def refillable(self, key: BufferKey) -> OutputBuffer | None:
        """The output on screen, when it is the only busy one of this shape: waiting
        for its release could last for ever (it comes with the next attach), so under
        a limit with no room for another it is filled again in place."""
        current = self.current
        if current is None or current.key != key or current.state is not OutputState.BUSY:
            return None
        if any(o is not current and o.key == key and o.state is OutputState.BUSY
               for o in self.buffers):
            return None  # a release of that one is on its way: wait for it
        return current

    @property
    def full(self) -> bool:
        return len(self.buffers) >= self.cap
