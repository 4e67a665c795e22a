"""Which buffer pixel each surface pixel shows, and back.

A surface pixel ``(u, v)`` shows the buffer pixel under its centre
``(u + 1/2, v + 1/2)`` mapped through the ``wp_viewport`` (source crop scaled to
the destination size), the buffer transform and the buffer scale, in that order
(as Weston maps a surface point): nearest-neighbour sampling, no filtering.
Every one of the eight transforms keeps the axes separate (a buffer column
depends on one surface axis only), so the map is two integer index arrays, one
per surface axis; ``swapped`` says whether surface x picks buffer rows (the 90
and 270 degree transforms) instead of columns.

``buffer_to_surface`` is the inverse for damage: the surface pixels whose
samples may fall in a rectangle of buffer pixels, rounded outwards.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction

import numpy as np
import numpy.typing as npt

from ..pixels.region import NO_VIEWPORT, Rect, Viewport

IndexArray = npt.NDArray[np.int64]
Selector = slice | IndexArray

# Per wl_output.transform: (swapped, the buffer axis fed by surface x runs
# backwards, the one fed by surface y runs backwards). Derived from Weston's
# transformed-coordinate formula (qubesshm.pixels.region._transformed_point).
_AXES: dict[int, tuple[bool, bool, bool]] = {
    0: (False, False, False),  # normal
    1: (True, True, False),    # 90: buffer y = W - x, buffer x = y
    2: (False, True, True),    # 180
    3: (True, False, True),    # 270: buffer y = x, buffer x = H - y
    4: (False, True, False),   # flipped
    5: (True, False, False),   # flipped-90
    6: (False, False, True),   # flipped-180
    7: (True, True, True),     # flipped-270
}


@dataclass(frozen=True, slots=True)
class AxisMap:
    """Buffer index = ``(numerator + step * i) // denominator`` for surface
    coordinate ``i`` (or ``size - 1 - ...`` when ``backwards``), clamped to
    ``[0, size)``: exact rational arithmetic in integers."""

    numerator: int
    step: int
    denominator: int
    backwards: bool
    size: int  # buffer pixels along the axis

    def indices(self, start: int, stop: int) -> IndexArray:
        coords = np.arange(start, stop, dtype=np.int64)
        bound = abs(self.numerator) + abs(self.step) * max(abs(start), abs(stop)) + 1
        if bound < 1 << 62:
            scaled = (self.numerator + self.step * coords) // self.denominator
        else:  # absurd viewports: Python integers, slowly but exactly
            scaled = np.array([(self.numerator + self.step * int(c)) // self.denominator
                               for c in coords], dtype=np.int64)
        if self.backwards:
            scaled = self.size - 1 - scaled
        return np.clip(scaled, 0, self.size - 1)

    def selector(self, start: int, stop: int) -> Selector:
        """``indices`` as a slice when they are evenly spaced (no gather needed)."""
        return as_slice(self.indices(start, stop))


@dataclass(frozen=True, slots=True)
class SurfaceMap:
    """The sampling map of one surface: ``x`` maps surface columns and ``y`` surface
    rows to buffer columns and rows, or to rows and columns when ``swapped``."""

    swapped: bool
    x: AxisMap
    y: AxisMap


def surface_map(buffer_width: int, buffer_height: int, transform: int, scale: int,
                viewport: Viewport = NO_VIEWPORT) -> SurfaceMap:
    """The sampling map of a surface showing this buffer."""
    swapped, back_x, back_y = _AXES[transform]
    tw, th = (buffer_height, buffer_width) if swapped else (buffer_width, buffer_height)
    unscaled_w, unscaled_h = Fraction(tw, scale), Fraction(th, scale)
    if viewport.source is not None:
        sx, sy, sw, sh = viewport.source
    else:
        sx, sy, sw, sh = Fraction(0), Fraction(0), unscaled_w, unscaled_h
    if viewport.destination is not None:
        dw, dh = Fraction(viewport.destination[0]), Fraction(viewport.destination[1])
    else:
        dw, dh = sw, sh
    # Buffer pixel along the axis fed by surface x: floor(scale * (sx + (u + 1/2) sw / dw)),
    # measured from the far end when that axis runs backwards.
    x_axis = _axis(sx, sw, dw, scale, back_x, tw)
    y_axis = _axis(sy, sh, dh, scale, back_y, th)
    return SurfaceMap(swapped, x_axis, y_axis)


def _axis(start: Fraction, length: Fraction, dest: Fraction, scale: int, backwards: bool,
          size: int) -> AxisMap:
    if dest <= 0:
        dest = Fraction(1)
    step = scale * length / dest
    offset = scale * start + step / 2
    if backwards:
        # From the far end: floor(size - x) = size - 1 - (ceil(x) - 1) for x = offset + step*u,
        # and ceil(n / d) - 1 = (n - 1) // d.
        denominator = math.lcm(offset.denominator, step.denominator)
        numerator = int(offset * denominator) - 1
        return AxisMap(numerator, int(step * denominator), denominator, True, size)
    denominator = math.lcm(offset.denominator, step.denominator)
    return AxisMap(int(offset * denominator), int(step * denominator), denominator, False, size)


def as_slice(indices: IndexArray) -> Selector:
    """An evenly spaced, non-constant index array as the slice that selects the
    same elements (a view instead of a gather); anything else as is."""
    count = len(indices)
    if count == 0:
        return slice(0, 0)
    first = int(indices[0])
    if count == 1:
        return slice(first, first + 1)
    step = int(indices[1]) - first
    if step == 0 or not np.array_equal(np.diff(indices), np.full(count - 1, step)):
        return indices
    stop = first + step * count
    return slice(first, stop if stop >= 0 else None, step)


def buffer_to_surface(rect: Rect, buffer_width: int, buffer_height: int, transform: int,
                      scale: int, viewport: Viewport, surface_width: int,
                      surface_height: int) -> Rect:
    """The surface pixels whose samples may lie in ``rect`` (buffer pixels),
    rounded outwards and clipped to the surface."""
    rect = rect.clip(buffer_width, buffer_height)
    if rect.empty:
        return Rect(0, 0, 0, 0)
    if (transform == 0 and scale == 1 and viewport.source is None
            and viewport.destination is None):
        # The common case, every frame: buffer pixels are surface pixels.
        return rect.clip(surface_width, surface_height)
    swapped, back_x, back_y = _AXES[transform]
    tw, th = (buffer_height, buffer_width) if swapped else (buffer_width, buffer_height)
    # Buffer pixels -> transformed, unscaled coordinates, per axis.
    cols = (Fraction(rect.x, scale), Fraction(rect.x + rect.width, scale))
    rows = (Fraction(rect.y, scale), Fraction(rect.y + rect.height, scale))
    along_x, along_y = (rows, cols) if swapped else (cols, rows)
    if back_x:
        along_x = (Fraction(tw, scale) - along_x[1], Fraction(tw, scale) - along_x[0])
    if back_y:
        along_y = (Fraction(th, scale) - along_y[1], Fraction(th, scale) - along_y[0])
    if viewport.source is not None or viewport.destination is not None:
        if viewport.source is not None:
            sx, sy, sw, sh = viewport.source
        else:
            sx, sy, sw, sh = Fraction(0), Fraction(0), Fraction(tw, scale), Fraction(th, scale)
        dw = Fraction(viewport.destination[0]) if viewport.destination else sw
        dh = Fraction(viewport.destination[1]) if viewport.destination else sh
        if sw <= 0 or sh <= 0:
            return Rect(0, 0, 0, 0)
        along_x = ((along_x[0] - sx) * dw / sw, (along_x[1] - sx) * dw / sw)
        along_y = ((along_y[0] - sy) * dh / sh, (along_y[1] - sy) * dh / sh)
    x0, y0 = math.floor(along_x[0]), math.floor(along_y[0])
    out = Rect(x0, y0, math.ceil(along_x[1]) - x0, math.ceil(along_y[1]) - y0)
    return out.clip(surface_width, surface_height)
