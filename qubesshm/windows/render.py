"""A window's image: its surface tree rendered into a grant area, and the damage.

Sans-IO. ``WindowImage.render`` draws the window geometry (a rectangle in the
root surface's coordinates) of a ``SceneNode`` tree into ``dst`` as the Qubes
GUI daemon reads an area: XRGB8888, ``stride`` bytes a row, from byte 0. It
returns the rectangles it changed, in window coordinates: few, disjoint, at
most ``MAX_RECTS`` (then their bounding box), each one ``SHMIMAGE``.

What is drawn:

- surfaces in stacking order (a node's ``below`` subsurfaces, the node, its
  ``above`` ones, recursively), each at its position relative to the root,
  clipped to the geometry; positions may be negative or beyond it;
- each surface's buffer through its viewport (source crop, destination size),
  buffer transform (all eight) and integer buffer scale, sampled at pixel
  centres (nearest neighbour; see ``mapping``);
- XRGB8888 is opaque; ARGB8888 is premultiplied and composited OVER what is
  below (``blend``), except inside the surface's opaque region, where its alpha
  is taken as 255 (as Weston's renderers do);
- where no surface is, black: ``BACKGROUND`` = 0xff000000. The X byte of other
  pixels is not defined (copies keep the client's byte; the daemon ignores it).

What is damaged (only those pixels are written): each surface's damage (buffer
pixels) mapped to window coordinates; both the old and new rectangle of a
surface that appeared, disappeared, moved, changed size, stacking place,
transform, scale, viewport, format or opaque region; everything when the
geometry changed or ``full`` is set (a new area).

Fast path: one opaque surface (XRGB8888, or ARGB8888 whose opaque region covers
what is shown) with transform normal, scale 1, no viewport and the geometry
inside its buffer: each damaged rectangle is copied row by row straight from the
buffer into ``dst``, with no temporary.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from ..compositor.scene import SceneNode, SurfaceState
from ..pixels.formats import ARGB8888, XRGB8888
from ..pixels.region import Rect, Region
from . import blend
from .mapping import SurfaceMap, buffer_to_surface, surface_map

SUPPORTED_FORMATS = frozenset({ARGB8888, XRGB8888})
BACKGROUND = 0xFF000000

Pixels = npt.NDArray[np.uint32]


@dataclass(frozen=True, slots=True)
class Layer:
    """One drawn surface: its state and its rectangle in window coordinates."""

    state: SurfaceState
    rect: Rect
    # What changes every pixel of the rectangle when it changes.
    key: tuple[object, ...]


def layers(tree: SceneNode, geometry: Rect) -> list[Layer]:
    """The surfaces of ``tree`` that have something to draw, bottom first."""
    out: list[Layer] = []

    def visit(node: SceneNode) -> None:
        for child in node.below:
            visit(child)
        state = node.state
        buffer = state.buffer
        if (buffer is not None and buffer.format in SUPPORTED_FORMATS and state.width > 0
                and state.height > 0 and buffer.width > 0 and buffer.height > 0):
            rect = Rect(node.x - geometry.x, node.y - geometry.y, state.width, state.height)
            key = (len(out), rect, state.transform, state.scale, state.viewport,
                   buffer.width, buffer.height, buffer.format, state.opaque)
            out.append(Layer(state, rect, key))
        for child in node.above:
            visit(child)

    visit(tree)
    return out


def intersect(a: Rect, b: Rect) -> Rect:
    x0, y0 = max(a.x, b.x), max(a.y, b.y)
    x1, y1 = min(a.x + a.width, b.x + b.width), min(a.y + a.height, b.y + b.height)
    return Rect(x0, y0, max(x1 - x0, 0), max(y1 - y0, 0))


class WindowImage:
    """What one window's area shows, and what was drawn there last (to damage the
    places surfaces left)."""

    def __init__(self, width: int, height: int) -> None:
        self.width = width
        self.height = height
        self._geometry: Rect | None = None
        self._last: dict[int, Layer] = {}
        # How the last render drew: "fast", "general" or "none" (nothing damaged).
        self.last_path = "none"

    def damage(self, tree: SceneNode, geometry: Rect, full: bool = False) -> Region:
        """The window pixels the next ``render`` of ``tree`` would write."""
        return self._damage(layers(tree, geometry), geometry, full)

    def render(self, tree: SceneNode, geometry: Rect, dst: memoryview, stride: int,
               full: bool = False) -> list[Rect]:
        """Draw the damaged part of ``tree``'s ``geometry`` into ``dst``; the changed
        rectangles in window coordinates. A geometry of another size than the
        image's is a new image: everything is drawn."""
        if geometry.width != self.width or geometry.height != self.height:
            self.width, self.height = geometry.width, geometry.height
            full = True
        if self.width <= 0 or self.height <= 0:
            self._geometry, self._last = geometry, {}
            self.last_path = "none"
            return []
        if stride % 4 or stride < 4 * self.width:
            raise ValueError(f"stride {stride} does not hold {self.width} XRGB8888 pixels")
        image = _image(dst, stride, self.width, self.height)
        drawn = layers(tree, geometry)
        rects = list(self._damage(drawn, geometry, full).rects())
        # Until the drawing is done the area is in no known state: a failure (a
        # client's file cut short under a read) leaves the next render a full one.
        self._geometry, self._last = None, {}
        if not rects:
            self.last_path = "none"
        elif _fast(drawn, self.width, self.height):
            self.last_path = "fast"
            _copy_fast(image, drawn[0], rects)
        else:
            self.last_path = "general"
            _composite(image, drawn, rects)
        self._geometry = geometry
        self._last = {layer.state.surface_id: layer for layer in drawn}
        return rects

    def _damage(self, drawn: list[Layer], geometry: Rect, full: bool) -> Region:
        if full or geometry != self._geometry:
            return Region.full(geometry.width, geometry.height)
        rects: list[Rect] = []
        for layer in drawn:
            old = self._last.get(layer.state.surface_id)
            if old is None or old.key != layer.key:
                rects.append(layer.rect)
                if old is not None:
                    rects.append(old.rect)
                continue
            state = layer.state
            buffer = state.buffer
            assert buffer is not None
            for damaged in state.damage.rects():
                on_surface = buffer_to_surface(damaged, buffer.width, buffer.height,
                                               state.transform, state.scale, state.viewport,
                                               state.width, state.height)
                if not on_surface.empty:
                    rects.append(Rect(on_surface.x + layer.rect.x, on_surface.y + layer.rect.y,
                                      on_surface.width, on_surface.height))
        current = {layer.state.surface_id for layer in drawn}
        rects.extend(layer.rect for surface_id, layer in self._last.items()
                     if surface_id not in current)
        return Region(r.clip(geometry.width, geometry.height) for r in rects)


def _image(dst: memoryview, stride: int, width: int, height: int) -> Pixels:
    size = dst.nbytes
    if size < stride * (height - 1) + 4 * width:
        raise ValueError(f"area of {size} bytes is too small for {width}x{height} "
                         f"XRGB8888 at stride {stride}")
    return np.ndarray((height, width), np.uint32, buffer=dst.cast("B"), offset=0,
                      strides=(stride, 4))


def _opaque_everywhere(layer: Layer, within: Rect) -> bool:
    """Whether ``layer`` is opaque over all of ``within`` (window coordinates)."""
    state = layer.state
    assert state.buffer is not None
    if state.buffer.format == XRGB8888:
        return True
    target = intersect(within, layer.rect)
    if target.empty:
        return True
    covered = 0
    for rect in state.opaque.rects():
        moved = Rect(rect.x + layer.rect.x, rect.y + layer.rect.y, rect.width, rect.height)
        covered += intersect(moved, target).area
    return covered == target.area


def _fast(drawn: list[Layer], width: int, height: int) -> bool:
    if len(drawn) != 1:
        return False
    layer = drawn[0]
    state = layer.state
    buffer = state.buffer
    assert buffer is not None
    whole = Rect(0, 0, width, height)
    return (state.transform == 0 and state.scale == 1 and state.viewport.source is None
            and state.viewport.destination is None
            and state.width == buffer.width and state.height == buffer.height
            and intersect(layer.rect, whole) == whole
            and _opaque_everywhere(layer, whole))


def _copy_fast(image: Pixels, layer: Layer, rects: list[Rect]) -> None:
    assert layer.state.buffer is not None
    source = layer.state.buffer.pixels()
    dx, dy = -layer.rect.x, -layer.rect.y  # window -> buffer coordinates
    for rect in rects:
        np.copyto(image[rect.y:rect.y + rect.height, rect.x:rect.x + rect.width],
                  source[rect.y + dy:rect.y + dy + rect.height,
                         rect.x + dx:rect.x + dx + rect.width])


def _composite(image: Pixels, drawn: list[Layer], rects: list[Rect]) -> None:
    maps: dict[int, SurfaceMap] = {}
    sources: dict[int, Pixels] = {}
    for rect in rects:
        target = image[rect.y:rect.y + rect.height, rect.x:rect.x + rect.width]
        # Start at the topmost surface that hides everything under it in this rectangle.
        first = 0
        for index in range(len(drawn) - 1, -1, -1):
            layer = drawn[index]
            if intersect(layer.rect, rect) == rect and _opaque_everywhere(layer, rect):
                first = index
                break
        else:
            target.fill(BACKGROUND)
        for index in range(first, len(drawn)):
            layer = drawn[index]
            part = intersect(layer.rect, rect)
            if part.empty:
                continue
            if index not in maps:
                state = layer.state
                buffer = state.buffer
                assert buffer is not None
                maps[index] = surface_map(buffer.width, buffer.height, state.transform,
                                          state.scale, state.viewport)
                sources[index] = buffer.pixels()[:buffer.height, :buffer.width]
            src = _sample(sources[index], maps[index], part.x - layer.rect.x,
                          part.y - layer.rect.y, part.width, part.height)
            out = target[part.y - rect.y:part.y - rect.y + part.height,
                         part.x - rect.x:part.x - rect.x + part.width]
            if _opaque_everywhere(layer, part):
                np.copyto(out, src)
            else:
                blend.over(out, src, _opaque_rects(layer, part))


def _opaque_rects(layer: Layer, part: Rect) -> list[Rect]:
    """The layer's opaque region within ``part``, relative to ``part``."""
    out = []
    for rect in layer.state.opaque.rects():
        moved = intersect(Rect(rect.x + layer.rect.x, rect.y + layer.rect.y, rect.width,
                               rect.height), part)
        if not moved.empty:
            out.append(Rect(moved.x - part.x, moved.y - part.y, moved.width, moved.height))
    return out


def _sample(source: Pixels, smap: SurfaceMap, u: int, v: int, width: int,
            height: int) -> Pixels:
    """The buffer pixels shown by surface pixels ``[u, u+width) x [v, v+height)``,
    as a ``(height, width)`` array (a view where the map allows)."""
    along_x = smap.x.selector(u, u + width)
    along_y = smap.y.selector(v, v + height)
    if smap.swapped:
        return _take(source, along_x, along_y).T
    return _take(source, along_y, along_x)


def _take(source: Pixels, rows: slice | npt.NDArray[np.int64],
          cols: slice | npt.NDArray[np.int64]) -> Pixels:
    if isinstance(rows, slice) or isinstance(cols, slice):
        return source[rows, cols]
    return np.take(source[rows], cols, axis=1)
