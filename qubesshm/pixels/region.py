"""Damage regions in buffer pixels, and the surface-to-buffer coordinate mapping.

A ``Region`` is a set of pixels kept as disjoint rectangles in y-bands (as
pixman keeps regions), so a union never counts a pixel twice and a copy of a
region copies each damaged byte once. ``surface_to_buffer`` maps a rectangle in
surface coordinates to the buffer pixels behind it through the viewport, the
buffer scale and all eight buffer transforms, rounding outwards.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from fractions import Fraction

# More rectangles than this and a region becomes its bounding box: copying a few
# extra bytes is cheaper than tracking confetti.
MAX_RECTS = 64
# Building bands costs rectangles x edges: more rectangles than this given at once
# are taken as their bounding box straight away (a flood of damage costs nothing).
MAX_INPUT_RECTS = 4 * MAX_RECTS


@dataclass(frozen=True, slots=True)
class Rect:
    x: int
    y: int
    width: int
    height: int

    @property
    def empty(self) -> bool:
        return self.width <= 0 or self.height <= 0

    @property
    def area(self) -> int:
        return 0 if self.empty else self.width * self.height

    def clip(self, width: int, height: int) -> Rect:
        """This rectangle within ``(0, 0, width, height)``."""
        x0, y0 = max(self.x, 0), max(self.y, 0)
        x1, y1 = min(self.x + self.width, width), min(self.y + self.height, height)
        return Rect(x0, y0, max(x1 - x0, 0), max(y1 - y0, 0))


_NO_RECTS: tuple[Rect, ...] = ()


class Region:
    """A set of pixels as disjoint rectangles, banded by rows."""

    __slots__ = ("_bands",)

    def __init__(self, rects: Iterable[Rect] = _NO_RECTS) -> None:
        # (y0, y1, ((x0, x1), ...)): sorted, non-overlapping bands of sorted spans.
        self._bands: list[tuple[int, int, tuple[tuple[int, int], ...]]] = []
        if rects is _NO_RECTS:  # an empty region: damage cleared, every commit
            return
        todo = [r for r in rects if not r.empty]
        if len(todo) == 1:  # the common case (whole-buffer damage): one band
            r = todo[0]
            self._bands = [(r.y, r.y + r.height, ((r.x, r.x + r.width),))]
            return
        if len(todo) > MAX_INPUT_RECTS:
            todo = [_bounds_of(todo)]
        if todo:
            self._bands = _bands_of(todo)
            if sum(len(spans) for _, _, spans in self._bands) > MAX_RECTS:
                self._bands = _bands_of([self.bounds()])

    @classmethod
    def full(cls, width: int, height: int) -> Region:
        return cls([Rect(0, 0, width, height)])

    def __bool__(self) -> bool:
        return bool(self._bands)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Region) and self._bands == other._bands

    def __hash__(self) -> int:
        return hash(tuple(self._bands))

    def __repr__(self) -> str:
        return f"Region({list(self.rects())!r})"

    def rects(self) -> Iterator[Rect]:
        for y0, y1, spans in self._bands:
            for x0, x1 in spans:
                yield Rect(x0, y0, x1 - x0, y1 - y0)

    @property
    def area(self) -> int:
        return sum((y1 - y0) * sum(x1 - x0 for x0, x1 in spans)
                   for y0, y1, spans in self._bands)

    def bounds(self) -> Rect:
        if not self._bands:
            return Rect(0, 0, 0, 0)
        x0 = min(spans[0][0] for _, _, spans in self._bands)
        x1 = max(spans[-1][1] for _, _, spans in self._bands)
        y0, y1 = self._bands[0][0], self._bands[-1][1]
        return Rect(x0, y0, x1 - x0, y1 - y0)

    def union(self, other: Region) -> Region:
        if not other._bands:
            return self
        if not self._bands:
            return other
        if self._covers(other):
            return self
        if other._covers(self):
            return other
        return Region([*self.rects(), *other.rects()])

    def _one_rect(self) -> tuple[int, int, int, int] | None:
        """(x0, y0, x1, y1) when this region is one rectangle, else None."""
        bands = self._bands
        if len(bands) != 1 or len(bands[0][2]) != 1:
            return None
        y0, y1, ((x0, x1),) = bands[0]
        return x0, y0, x1, y1

    def _covers(self, other: Region) -> bool:
        """Whether this region is one rectangle holding all of ``other``."""
        one = self._one_rect()
        if one is None:
            return False
        x0, y0, x1, y1 = one
        b = other.bounds()
        return x0 <= b.x and b.x + b.width <= x1 and y0 <= b.y and b.y + b.height <= y1

    def clip(self, width: int, height: int) -> Region:
        one = self._one_rect()
        if one is not None:  # one rectangle: clip it alone
            x0, y0, x1, y1 = one
            if x0 >= 0 and y0 >= 0 and x1 <= width and y1 <= height:
                return self  # regions are never changed in place
            return Region([Rect(x0, y0, x1 - x0, y1 - y0).clip(width, height)])
        return Region(r.clip(width, height) for r in self.rects())

    def contains(self, x: int, y: int) -> bool:
        for y0, y1, spans in self._bands:
            if y0 <= y < y1:
                return any(x0 <= x < x1 for x0, x1 in spans)
        return False


def _bounds_of(rects: list[Rect]) -> Rect:
    x0, y0 = min(r.x for r in rects), min(r.y for r in rects)
    x1 = max(r.x + r.width for r in rects)
    y1 = max(r.y + r.height for r in rects)
    return Rect(x0, y0, x1 - x0, y1 - y0)


def _bands_of(rects: list[Rect]) -> list[tuple[int, int, tuple[tuple[int, int], ...]]]:
    edges = sorted({r.y for r in rects} | {r.y + r.height for r in rects})
    bands: list[tuple[int, int, tuple[tuple[int, int], ...]]] = []
    for y0, y1 in itertools.pairwise(edges):
        spans = sorted((r.x, r.x + r.width) for r in rects if r.y <= y0 and r.y + r.height >= y1)
        merged: list[tuple[int, int]] = []
        for x0, x1 in spans:
            if merged and x0 <= merged[-1][1]:
                if x1 > merged[-1][1]:
                    merged[-1] = (merged[-1][0], x1)
            else:
                merged.append((x0, x1))
        if not merged:
            continue
        row = tuple(merged)
        if bands and bands[-1][1] == y0 and bands[-1][2] == row:
            bands[-1] = (bands[-1][0], y1, row)  # same spans as the band above: extend it
        else:
            bands.append((y0, y1, row))
    return bands


# -- surface coordinates to buffer pixels ------------------------------------

TRANSFORMS = range(8)  # wl_output.transform: normal, 90, 180, 270, flipped, flipped-90...


@dataclass(frozen=True, slots=True)
class Viewport:
    """``wp_viewport`` state: a source rectangle (24.8 fixed, as Fractions) and a
    destination size, each optional."""

    source: tuple[Fraction, Fraction, Fraction, Fraction] | None = None
    destination: tuple[int, int] | None = None


NO_VIEWPORT = Viewport()


def _transformed_point(x: Fraction, y: Fraction, width: Fraction, height: Fraction,
                       transform: int) -> tuple[Fraction, Fraction]:
    """A point of the transformed (surface-oriented) buffer in buffer orientation.

    ``width`` and ``height`` are the transformed buffer's size: the formula of
    Weston's ``weston_transformed_coord``.
    """
    if transform == 0:
        return x, y
    if transform == 1:  # 90
        return y, width - x
    if transform == 2:  # 180
        return width - x, height - y
    if transform == 3:  # 270
        return height - y, x
    if transform == 4:  # flipped
        return width - x, y
    if transform == 5:  # flipped-90
        return y, x
    if transform == 6:  # flipped-180
        return x, height - y
    return height - y, width - x  # flipped-270


def surface_size(buffer_width: int, buffer_height: int, transform: int, scale: int,
                 viewport: Viewport = NO_VIEWPORT) -> tuple[Fraction, Fraction]:
    """The surface's size in surface coordinates."""
    if viewport.destination is not None:
        return Fraction(viewport.destination[0]), Fraction(viewport.destination[1])
    if viewport.source is not None:
        return viewport.source[2], viewport.source[3]
    tw, th = (buffer_width, buffer_height) if transform % 2 == 0 else (buffer_height,
                                                                     buffer_width)
    return Fraction(tw, scale), Fraction(th, scale)


def surface_pixels(buffer_width: int, buffer_height: int, transform: int, scale: int,
                   viewport: Viewport = NO_VIEWPORT) -> tuple[int, int]:
    """``surface_size`` floored to whole pixels; without a viewport, in integers (no
    Fractions made: the common case, at every map and render)."""
    if viewport.source is None and viewport.destination is None:
        tw, th = (buffer_width, buffer_height) if transform % 2 == 0 else (buffer_height,
                                                                         buffer_width)
        return tw // scale, th // scale
    w, h = surface_size(buffer_width, buffer_height, transform, scale, viewport)
    return math.floor(w), math.floor(h)


def surface_to_buffer(rect: Rect, buffer_width: int, buffer_height: int, transform: int,
                      scale: int, viewport: Viewport = NO_VIEWPORT) -> Rect:
    """The buffer pixels a surface-coordinate rectangle covers, clipped to the buffer."""
    if rect.empty:
        return Rect(0, 0, 0, 0)
    tw, th = (buffer_width, buffer_height) if transform % 2 == 0 else (buffer_height,
                                                                     buffer_width)
    # Only damage on the surface counts (as in Weston, which clips it first).
    surface_w, surface_h = surface_size(buffer_width, buffer_height, transform, scale, viewport)
    x0, y0 = max(Fraction(rect.x), Fraction(0)), max(Fraction(rect.y), Fraction(0))
    x1 = min(Fraction(rect.x) + rect.width, surface_w)
    y1 = min(Fraction(rect.y) + rect.height, surface_h)
    if x1 <= x0 or y1 <= y0:
        return Rect(0, 0, 0, 0)
    # Surface coordinates -> unscaled, transformed buffer coordinates (the viewport).
    unscaled_w, unscaled_h = Fraction(tw, scale), Fraction(th, scale)
    if viewport.source is not None or viewport.destination is not None:
        sx, sy, sw, sh = (viewport.source if viewport.source is not None
                          else (Fraction(0), Fraction(0), unscaled_w, unscaled_h))
        dw, dh = surface_size(buffer_width, buffer_height, transform, scale, viewport)
        if dw <= 0 or dh <= 0:
            return Rect(0, 0, 0, 0)
        x0, x1 = sx + x0 * sw / dw, sx + x1 * sw / dw
        y0, y1 = sy + y0 * sh / dh, sy + y1 * sh / dh
    corners = [_transformed_point(px, py, unscaled_w, unscaled_h, transform)
               for px, py in ((x0, y0), (x1, y1))]
    bx0 = min(c[0] for c in corners) * scale
    bx1 = max(c[0] for c in corners) * scale
    by0 = min(c[1] for c in corners) * scale
    by1 = max(c[1] for c in corners) * scale
    left, top = math.floor(bx0), math.floor(by0)
    out = Rect(left, top, math.ceil(bx1) - left, math.ceil(by1) - top)
    return out.clip(buffer_width, buffer_height)
