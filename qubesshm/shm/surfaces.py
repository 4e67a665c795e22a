"""A client surface's double-buffered state, as far as copying pixels needs it.

Requests fill ``Pending``; ``commit`` applies it. The proxy copies at every
commit that brings new pixels, so a synchronized subsurface's buffer holds what
the client had drawn when the child committed, whatever the client writes
afterwards: the compositor applies that state at the parent's commit, from the
proxy's copy.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from fractions import Fraction

from ..pixels.region import NO_VIEWPORT, Rect, Region, Viewport, surface_to_buffer
from .clientpool import ClientBuffer
from .outputs import BufferKey, OutputQueue


class Attach(enum.Enum):
    NONE = "none"  # no attach since the last commit
    OTHER = "other"  # a null or non-shm buffer, forwarded as the client sent it


@dataclass
class Pending:
    attach: ClientBuffer | Attach = Attach.NONE
    dx: int = 0
    dy: int = 0
    surface_damage: list[Rect] = field(default_factory=list)
    buffer_damage: list[Rect] = field(default_factory=list)
    transform: int | None = None
    scale: int | None = None


@dataclass
class ViewportRequests:
    """A ``wp_viewport``'s requests since the surface's last commit."""

    source: tuple[Fraction, Fraction, Fraction, Fraction] | None = None
    destination: tuple[int, int] | None = None
    source_set: bool = False
    destination_set: bool = False


@dataclass
class Surface:
    client_id: int
    pending: Pending = field(default_factory=Pending)
    transform: int = 0
    scale: int = 1
    viewport: Viewport = NO_VIEWPORT
    viewport_requests: ViewportRequests | None = None
    viewport_gone: bool = False  # its wp_viewport was destroyed: unset at the next commit
    buffer: ClientBuffer | None = None  # the shm buffer the compositor is showing a copy of
    shown_key: BufferKey | None = None
    outputs: OutputQueue = field(default_factory=OutputQueue)

    def next_buffer(self) -> ClientBuffer | None:
        """The shm buffer this commit shows: newly attached, or the one shown now."""
        attach = self.pending.attach
        if isinstance(attach, ClientBuffer):
            return attach
        if attach is Attach.OTHER:
            return None
        return self.buffer

    def next_viewport(self) -> Viewport:
        requests = self.viewport_requests
        if requests is None:
            return self.viewport
        source = requests.source if requests.source_set else self.viewport.source
        destination = (requests.destination if requests.destination_set
                       else self.viewport.destination)
        return Viewport(source, destination)

    def commit_damage(self, buffer: ClientBuffer) -> Region:
        """This commit's damage in ``buffer``'s pixels, under the state it commits."""
        pending = self.pending
        transform = pending.transform if pending.transform is not None else self.transform
        scale = pending.scale if pending.scale is not None else self.scale
        viewport = self.next_viewport()
        rects = [r.clip(buffer.width, buffer.height) for r in pending.buffer_damage]
        rects += [surface_to_buffer(r, buffer.width, buffer.height, transform, scale, viewport)
                  for r in pending.surface_damage]
        return Region(rects)

    def apply(self) -> bool:
        """Make the pending state current; True if the mapping of pixels changed."""
        pending = self.pending
        changed = False
        if pending.transform is not None and pending.transform != self.transform:
            self.transform, changed = pending.transform, True
        if pending.scale is not None and pending.scale != self.scale:
            self.scale, changed = pending.scale, True
        viewport = self.next_viewport()
        if viewport != self.viewport:
            self.viewport, changed = viewport, True
        if self.viewport_requests is not None:
            self.viewport_requests = None if self.viewport_gone else ViewportRequests()
            self.viewport_gone = False
        if isinstance(pending.attach, ClientBuffer):
            self.buffer = pending.attach
        elif pending.attach is Attach.OTHER:
            self.buffer = None
        self.pending = Pending()
        return changed
