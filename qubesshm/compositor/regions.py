"""``wl_region``: a set of surface pixels built by adding and subtracting rectangles.

Kept exactly as disjoint rectangles up to ``MAX_RECTS``; a client that makes one
more complex than that (no toolkit does) gets an approximation: its bounding box
as an input region, nothing as an opaque region (claiming pixels opaque that are
not would show garbage; claiming none only costs blending).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from ..pixels.region import Rect, Region

MAX_RECTS = 256


def rect_minus(a: Rect, b: Rect) -> list[Rect]:
    """The pixels of ``a`` not in ``b``, as up to four disjoint rectangles."""
    ax1, ay1 = a.x + a.width, a.y + a.height
    bx1, by1 = b.x + b.width, b.y + b.height
    if b.empty or bx1 <= a.x or by1 <= a.y or b.x >= ax1 or b.y >= ay1:
        return [a]
    out = []
    if b.y > a.y:
        out.append(Rect(a.x, a.y, a.width, b.y - a.y))
    if by1 < ay1:
        out.append(Rect(a.x, by1, a.width, ay1 - by1))
    y0, y1 = max(a.y, b.y), min(ay1, by1)
    if b.x > a.x:
        out.append(Rect(a.x, y0, b.x - a.x, y1 - y0))
    if bx1 < ax1:
        out.append(Rect(bx1, y0, ax1 - bx1, y1 - y0))
    return out


def intersect(a: Rect, b: Rect) -> Rect:
    x0, y0 = max(a.x, b.x), max(a.y, b.y)
    x1, y1 = min(a.x + a.width, b.x + b.width), min(a.y + a.height, b.y + b.height)
    return Rect(x0, y0, max(x1 - x0, 0), max(y1 - y0, 0))


@dataclass(slots=True)
class RectSet:
    """Disjoint rectangles, or (``exact`` False) an over-complex set's bounding box."""

    rects: list[Rect] = field(default_factory=list)
    exact: bool = True

    def add(self, rect: Rect) -> None:
        if rect.empty:
            return
        if not self.exact:
            self.rects = [_bounds([*self.rects, rect])]
            return
        pieces = [rect]
        for have in self.rects:
            pieces = [p for piece in pieces for p in rect_minus(piece, have)]
            if not pieces:
                return
        self.rects += pieces
        self._check_size()

    def subtract(self, rect: Rect) -> None:
        if rect.empty or not self.rects:
            return
        if not self.exact:
            return  # the bounding box still covers what is left
        self.rects = [p for have in self.rects for p in rect_minus(have, rect)]
        self._check_size()

    def _check_size(self) -> None:
        if len(self.rects) > MAX_RECTS:
            self.rects = [_bounds(self.rects)]
            self.exact = False

    def copy(self) -> RectSet:
        return RectSet(list(self.rects), self.exact)

    def opaque_region(self, width: int, height: int) -> Region:
        """The set within (0, 0, width, height), never claiming more than it holds."""
        if not self.exact:
            return Region()
        clipped = [r.clip(width, height) for r in self.rects]
        clipped = [r for r in clipped if not r.empty]
        region = Region(clipped)
        # Region keeps a bounding box past its own rectangle limit: that would claim
        # pixels that are not opaque.
        if region.area != sum(r.area for r in clipped):
            return Region()
        return region

    def contains(self, x: int, y: int) -> bool:
        return any(r.x <= x < r.x + r.width and r.y <= y < r.y + r.height for r in self.rects)


def _bounds(rects: Iterable[Rect]) -> Rect:
    rects = [r for r in rects if not r.empty]
    if not rects:
        return Rect(0, 0, 0, 0)
    x0, y0 = min(r.x for r in rects), min(r.y for r in rects)
    x1 = max(r.x + r.width for r in rects)
    y1 = max(r.y + r.height for r in rects)
    return Rect(x0, y0, x1 - x0, y1 - y0)
