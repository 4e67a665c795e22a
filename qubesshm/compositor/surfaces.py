"""``wl_compositor``, ``wl_region`` and ``wl_surface``: double-buffered surface state.

Requests fill a surface's ``Pending`` state; ``apply`` makes a committed state
current (``commits`` decides when: at once, or later from a synchronized
subsurface's cache). Current state is what the agent's ``SurfaceState`` is
made of, with the damage gathered since the window was last rendered.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from fractions import Fraction
from typing import TYPE_CHECKING

from ..objects.objectmap import WaylandObject
from ..pixels.region import (
    MAX_RECTS,
    NO_VIEWPORT,
    TRANSFORMS,
    Rect,
    Region,
    Viewport,
    surface_pixels,
    surface_size,
    surface_to_buffer,
)
from ..wire.codec import ArgValue, WireError
from .regions import RectSet
from .scene import SurfaceState
from .shm import ShmBuffer

if TYPE_CHECKING:
    from .client import ClientCore, Handler
    from .subsurfaces import Subsurface
    from .xdg import XdgSurface

# wl_surface.error
INVALID_SCALE = 0
INVALID_TRANSFORM = 1
INVALID_SIZE = 2
INVALID_OFFSET = 3
# wp_viewport.error
VIEWPORT_BAD_SIZE = 1
VIEWPORT_OUT_OF_BUFFER = 2

_surface_ids = itertools.count(1)

ViewportSource = tuple[Fraction, Fraction, Fraction, Fraction]


@dataclass
class Pending:
    """State requested since the last commit (or, for a synchronized subsurface,
    committed into its cache and not yet applied)."""

    attached: bool = False
    buffer: ShmBuffer | None = None
    dx: int = 0
    dy: int = 0
    surface_damage: list[Rect] = field(default_factory=list)
    buffer_damage: list[Rect] = field(default_factory=list)
    frames: list[int] = field(default_factory=list)
    opaque_set: bool = False
    opaque: RectSet | None = None
    input_set: bool = False
    input: RectSet | None = None
    transform: int | None = None
    scale: int | None = None
    source_set: bool = False
    source: ViewportSource | None = None
    destination_set: bool = False
    destination: tuple[int, int] | None = None
    # In a cache: the buffer is committed (held) by the cache.
    holds_buffer: bool = False

    def merge(self, newer: Pending) -> None:
        """``newer`` committed on top of this cached state."""
        if newer.attached:
            if self.holds_buffer and self.buffer is not None:
                self.buffer.release()
                self.buffer.forget()
            self.attached, self.buffer = True, newer.buffer
            self.holds_buffer = newer.holds_buffer
        self.dx += newer.dx
        self.dy += newer.dy
        _add_damage(self.surface_damage, newer.surface_damage)
        _add_damage(self.buffer_damage, newer.buffer_damage)
        self.frames += newer.frames
        if newer.opaque_set:
            self.opaque_set, self.opaque = True, newer.opaque
        if newer.input_set:
            self.input_set, self.input = True, newer.input
        if newer.transform is not None:
            self.transform = newer.transform
        if newer.scale is not None:
            self.scale = newer.scale
        if newer.source_set:
            self.source_set, self.source = True, newer.source
        if newer.destination_set:
            self.destination_set, self.destination = True, newer.destination


def _add_damage(rects: list[Rect], more: list[Rect]) -> None:
    """Past MAX_RECTS rectangles the damage becomes their bounding box: a flood of
    damage requests costs no more than one rectangle."""
    rects += [r for r in more if not r.empty]
    if len(rects) > MAX_RECTS:
        rects[:] = [Region(rects).bounds()]


class Surface:
    """A ``wl_surface`` and its committed state."""

    def __init__(self, client: ClientCore, object_id: int) -> None:
        self.client = client
        self.id = object_id
        self.uid = next(_surface_ids)
        self.alive = True
        self.pending = Pending()
        self.cached: Pending | None = None  # a synchronized subsurface's commits
        # Current state.
        self.buffer: ShmBuffer | None = None
        self.held = False  # the current buffer's hold has not been released
        self.transform = 0
        self.scale = 1
        self.viewport = NO_VIEWPORT
        self.opaque: RectSet | None = None
        self.input: RectSet | None = None
        self.damage = Region()  # buffer pixels changed since the last render
        self.frames: list[int] = []  # callbacks of applied commits, not yet presented
        self.offset = (0, 0)  # attach offsets applied since the role took them
        # Roles: what the surface is (a role never changes once given).
        self.role: str | None = None
        self.subsurface: Subsurface | None = None  # as a child
        self.xdg: XdgSurface | None = None
        self.viewport_id: int | None = None  # its live wp_viewport
        # Subsurfaces: stacking order (this surface itself among them), pending
        # and current; ``children`` lists the wl_subsurfaces whose parent this is.
        self.order_pending: list[Surface] = [self]
        self.order: list[Surface] = [self]
        self.children: list[Subsurface] = []
        # wl_output ids the surface entered.
        self.entered: set[int] = set()

    def __repr__(self) -> str:
        return f"wl_surface@{self.id}"

    # -- current state ---------------------------------------------------------

    def size(self) -> tuple[int, int]:
        """The surface's size in surface coordinates (0x0 without a buffer)."""
        if self.buffer is None:
            return 0, 0
        data = self.buffer.data
        return surface_pixels(data.width, data.height, self.transform, self.scale,
                              self.viewport)

    def snapshot(self, full_damage: bool) -> SurfaceState:
        width, height = self.size()
        buffer = self.buffer
        if buffer is None:
            damage = Region()
        elif full_damage:
            damage = Region.full(buffer.data.width, buffer.data.height)
        else:
            damage = self.damage
        opaque = (self.opaque.opaque_region(width, height) if self.opaque is not None
                  else Region())
        return SurfaceState(self.uid, None if buffer is None else buffer.view(), self.transform,
                            self.scale, self.viewport, damage, opaque, width, height)

    def release_buffer(self) -> None:
        """The agent rendered the current buffer: the client may have it back."""
        if self.held and self.buffer is not None:
            self.held = False
            self.buffer.release()

    def apply(self, state: Pending, *, from_cache: bool) -> bool:
        """Make a committed state current; True if what the surface shows changed.

        Raises the viewport's errors that the protocol checks when state is applied.
        """
        old_key = self._content_key()
        changed = False
        if state.attached:
            new = state.buffer
            if new is not None and not (from_cache and state.holds_buffer):
                new.committed()
            if self.buffer is not None:
                if self.held:
                    self.buffer.release()
                self.buffer.forget()
            self.buffer, self.held = new, new is not None
            self.offset = (self.offset[0] + state.dx, self.offset[1] + state.dy)
            changed = True
        if state.transform is not None:
            self.transform = state.transform
        if state.scale is not None:
            self.scale = state.scale
        if state.source_set or state.destination_set:
            source = state.source if state.source_set else self.viewport.source
            destination = (state.destination if state.destination_set
                           else self.viewport.destination)
            self.viewport = Viewport(source, destination)
        if state.opaque_set:
            changed = changed or _rects(self.opaque) != _rects(state.opaque)
            self.opaque = state.opaque
        if state.input_set:
            self.input = state.input
        self._check_viewport()
        if self._content_key() != old_key:
            changed = True
            self.damage = (Region() if self.buffer is None
                           else Region.full(self.buffer.data.width, self.buffer.data.height))
        elif self.buffer is not None and (state.surface_damage or state.buffer_damage):
            data = self.buffer.data
            rects = [r.clip(data.width, data.height) for r in state.buffer_damage]
            rects += [surface_to_buffer(r, data.width, data.height, self.transform, self.scale,
                                        self.viewport) for r in state.surface_damage]
            commit_damage = Region(rects)
            if commit_damage:
                self.damage = self.damage.union(commit_damage)
                changed = True
        self.frames += state.frames
        return changed

    def _content_key(self) -> tuple[object, ...]:
        buffer = self.buffer
        shape = None if buffer is None else (buffer.data.width, buffer.data.height,
                                             buffer.data.format)
        return shape, self.transform, self.scale, self.viewport

    def _check_viewport(self) -> None:
        viewport = self.viewport
        source = viewport.source
        if self.viewport_id is None or source is None:
            return
        if viewport.destination is None and (source[2].denominator != 1
                                             or source[3].denominator != 1):
            raise WireError(f"source size {float(source[2])}x{float(source[3])} is not "
                            "integer and no destination size is set", VIEWPORT_BAD_SIZE,
                            self.viewport_id)
        if self.buffer is not None:
            data = self.buffer.data
            w, h = surface_size(data.width, data.height, self.transform, self.scale)
            if source[0] + source[2] > w or source[1] + source[3] > h:
                raise WireError(f"source rectangle {[float(v) for v in source]} extends "
                                f"outside the buffer ({float(w)}x{float(h)} in surface "
                                "coordinates)", VIEWPORT_OUT_OF_BUFFER, self.viewport_id)

    def cache_pending(self) -> None:
        """Commit into the cache (a synchronized subsurface): the cache holds the
        buffer until its state is applied or replaced."""
        pending = self.pending
        if pending.attached and pending.buffer is not None:
            pending.buffer.committed()
            pending.holds_buffer = True
        if self.cached is None:
            self.cached = pending
        else:
            self.cached.merge(pending)
        self.pending = Pending()

    def clear_pending_buffer(self, buffer: ShmBuffer) -> None:
        """``buffer`` was destroyed: a pending or cached attach of it attaches nothing,
        as in libwayland compositors (the surface is then unmapped at commit)."""
        if self.pending.buffer is buffer:
            self.pending.buffer = None
        cached = self.cached
        if cached is not None and cached.buffer is buffer:
            if cached.holds_buffer:
                buffer.release()
                buffer.forget()
            cached.buffer, cached.holds_buffer = None, False

    def drop_cache(self) -> None:
        """A synchronized subsurface's cached commits go unapplied (it stopped being
        a subsurface): their buffer is released, their callbacks die."""
        cached, self.cached = self.cached, None
        if cached is None:
            return
        for callback in cached.frames:
            self.client.destroy(callback)
        if cached.holds_buffer and cached.buffer is not None:
            cached.buffer.release()
            cached.buffer.forget()

    def destroy(self) -> None:
        """The surface is gone: its buffers are let go, its callbacks die."""
        self.alive = False
        self.drop_cache()
        for callback in self.pending.frames:
            self.client.destroy(callback)
        self.pending = Pending()
        for callback in self.frames:
            self.client.destroy(callback)
        self.frames = []
        if self.buffer is not None:
            if self.held:
                self.buffer.release()
            self.buffer.forget()
            self.buffer = None


def _rects(rects: RectSet | None) -> object:
    return None if rects is None else (tuple(rects.rects), rects.exact)


# -- requests -------------------------------------------------------------------


def create_surface(client: ClientCore, obj: WaylandObject, args: list[ArgValue],
                   fds: list[int]) -> None:
    new_id = args[0]
    assert isinstance(new_id, int)
    surface = Surface(client, new_id)
    client.resources[new_id] = surface
    client.surfaces.add(surface)


def create_region(client: ClientCore, obj: WaylandObject, args: list[ArgValue],
                  fds: list[int]) -> None:
    new_id = args[0]
    assert isinstance(new_id, int)
    client.resources[new_id] = RectSet()


def region_add(client: ClientCore, obj: WaylandObject, args: list[ArgValue],
               fds: list[int]) -> None:
    client.resource(obj.id, RectSet).add(_rect(args))


def region_subtract(client: ClientCore, obj: WaylandObject, args: list[ArgValue],
                    fds: list[int]) -> None:
    client.resource(obj.id, RectSet).subtract(_rect(args))


def _rect(args: list[ArgValue]) -> Rect:
    x, y, width, height = args
    assert isinstance(x, int) and isinstance(y, int)
    assert isinstance(width, int) and isinstance(height, int)
    return Rect(x, y, width, height)


def attach(client: ClientCore, obj: WaylandObject, args: list[ArgValue],
           fds: list[int]) -> None:
    buffer_id, dx, dy = args
    assert isinstance(dx, int) and isinstance(dy, int)
    if obj.version >= 5 and (dx or dy):
        raise WireError(f"attach offset ({dx}, {dy}) is not allowed since version 5: use "
                        "wl_surface.offset", INVALID_OFFSET, obj.id)
    surface = client.resource(obj.id, Surface)
    # Every wl_buffer here is a wl_shm one (no other buffer factory is offered).
    buffer = client.resource(buffer_id, ShmBuffer) if isinstance(buffer_id, int) else None
    pending = surface.pending
    pending.attached, pending.buffer = True, buffer
    if obj.version < 5:
        pending.dx, pending.dy = dx, dy


def offset(client: ClientCore, obj: WaylandObject, args: list[ArgValue],
           fds: list[int]) -> None:
    dx, dy = args
    assert isinstance(dx, int) and isinstance(dy, int)
    pending = client.resource(obj.id, Surface).pending
    pending.dx, pending.dy = dx, dy


def damage(client: ClientCore, obj: WaylandObject, args: list[ArgValue],
           fds: list[int]) -> None:
    _add_damage(client.resource(obj.id, Surface).pending.surface_damage, [_rect(args)])


def damage_buffer(client: ClientCore, obj: WaylandObject, args: list[ArgValue],
                  fds: list[int]) -> None:
    _add_damage(client.resource(obj.id, Surface).pending.buffer_damage, [_rect(args)])


def frame(client: ClientCore, obj: WaylandObject, args: list[ArgValue],
          fds: list[int]) -> None:
    callback = args[0]
    assert isinstance(callback, int)
    client.resources[callback] = FrameCallback()
    client.resource(obj.id, Surface).pending.frames.append(callback)


class FrameCallback:
    """A ``wl_callback`` from ``wl_surface.frame``."""


def _region_arg(client: ClientCore, value: ArgValue) -> RectSet | None:
    if not isinstance(value, int):
        return None
    return client.resource(value, RectSet).copy()


def set_opaque_region(client: ClientCore, obj: WaylandObject, args: list[ArgValue],
                      fds: list[int]) -> None:
    pending = client.resource(obj.id, Surface).pending
    pending.opaque_set, pending.opaque = True, _region_arg(client, args[0])


def set_input_region(client: ClientCore, obj: WaylandObject, args: list[ArgValue],
                     fds: list[int]) -> None:
    pending = client.resource(obj.id, Surface).pending
    pending.input_set, pending.input = True, _region_arg(client, args[0])


def set_buffer_transform(client: ClientCore, obj: WaylandObject, args: list[ArgValue],
                         fds: list[int]) -> None:
    transform = args[0]
    assert isinstance(transform, int)
    if transform not in TRANSFORMS:
        raise WireError(f"buffer transform value {transform} is invalid", INVALID_TRANSFORM,
                        obj.id)
    client.resource(obj.id, Surface).pending.transform = transform


def set_buffer_scale(client: ClientCore, obj: WaylandObject, args: list[ArgValue],
                     fds: list[int]) -> None:
    scale = args[0]
    assert isinstance(scale, int)
    if scale < 1:
        raise WireError(f"buffer scale must be at least one ({scale} specified)",
                        INVALID_SCALE, obj.id)
    client.resource(obj.id, Surface).pending.scale = scale


def destroy_surface(client: ClientCore, obj: WaylandObject, args: list[ArgValue],
                    fds: list[int]) -> None:
    surface = client.resource(obj.id, Surface)
    client.compositor.surface_destroyed(surface)
    client.surfaces.discard(surface)
    surface.destroy()


HANDLERS: dict[tuple[str, str], Handler] = {
    ("wl_compositor", "create_surface"): create_surface,
    ("wl_compositor", "create_region"): create_region,
    ("wl_region", "add"): region_add,
    ("wl_region", "subtract"): region_subtract,
    ("wl_surface", "attach"): attach,
    ("wl_surface", "offset"): offset,
    ("wl_surface", "damage"): damage,
    ("wl_surface", "damage_buffer"): damage_buffer,
    ("wl_surface", "frame"): frame,
    ("wl_surface", "set_opaque_region"): set_opaque_region,
    ("wl_surface", "set_input_region"): set_input_region,
    ("wl_surface", "set_buffer_transform"): set_buffer_transform,
    ("wl_surface", "set_buffer_scale"): set_buffer_scale,
    ("wl_surface", "destroy"): destroy_surface,
}
