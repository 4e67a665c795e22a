"""Which surface of a window is under a point: the pointer's target.

A window's surfaces are searched top down, as they are stacked: at each surface
its subsurfaces above it (topmost first), then itself, then those below it. A
surface takes input where it has content (within its size) and its input region
says so; no input region set means all of the surface. A subsurface without a
buffer shows nothing, so neither it nor its own subsurfaces take input, as
``windows.build_tree`` leaves them out of what is shown.
"""

from __future__ import annotations

import math

from .surfaces import Surface


def accepts_input(surface: Surface, sx: float, sy: float) -> bool:
    """Whether surface-local point (sx, sy) is within ``surface`` and its input region."""
    if surface.buffer is None:
        return False
    width, height = surface.size()
    if not (0 <= sx < width and 0 <= sy < height):
        return False
    region = surface.input
    return region is None or region.contains(math.floor(sx), math.floor(sy))


def pick(root: Surface, x: float, y: float) -> tuple[Surface, float, float] | None:
    """The surface under (x, y) in ``root``'s coordinates, and the point in its own."""

    def visit(surface: Surface, ox: int, oy: int) -> tuple[Surface, float, float] | None:
        for item in reversed(surface.order):
            if item is surface:
                if accepts_input(surface, x - ox, y - oy):
                    return surface, x - ox, y - oy
                continue
            sub = item.subsurface
            if sub is None or item.buffer is None:
                continue
            found = visit(item, ox + sub.position[0], oy + sub.position[1])
            if found is not None:
                return found
        return None

    if root.buffer is None:
        return None
    return visit(root, 0, 0)


def origin_in_root(surface: Surface) -> tuple[int, int] | None:
    """Where ``surface``'s origin is in its root surface's coordinates (None: it hangs
    off no root)."""
    x = y = 0
    node = surface
    while node.subsurface is not None:
        sub = node.subsurface
        if sub.parent is None:
            return None
        x += sub.position[0]
        y += sub.position[1]
        node = sub.parent
    return x, y
