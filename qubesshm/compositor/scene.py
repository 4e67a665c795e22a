"""What a window shows, as the agent receives it: a tree of committed surface states.

A ``SceneNode`` is one surface at a position relative to the window's root
surface, with its subsurfaces below and above it (each list bottom to top).
Every value is a snapshot taken when the window was offered to the agent; only
``BufferView.pixels`` reads the client's memory, when called.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from ..pixels.region import Rect, Region, Viewport


@dataclass(frozen=True, slots=True)
class BufferView:
    """A committed ``wl_shm`` buffer.

    ``pixels()`` gives a read-only uint32 array of shape (height, stride // 4):
    a view on the client's pool when reading it can never fault (a pool sealed
    against shrinking), else a fresh copy. After the compositor has released the
    buffer (once the agent rendered it) the client may draw into it again.
    """

    width: int
    height: int
    stride: int
    format: int  # wl_shm.format: ARGB8888 (0) or XRGB8888 (1)
    pixels: Callable[[], NDArray[np.uint32]]


@dataclass(frozen=True, slots=True)
class SurfaceState:
    """One surface's applied state.

    ``surface_id`` is unique in the compositor's life (not the client's object id).
    ``damage`` is in buffer pixels: what changed since the window was last rendered
    (the whole buffer for a surface the last render did not show). ``opaque`` is in
    surface coordinates, within the surface. ``width`` and ``height`` are the
    surface's size after scale, transform and viewport.
    """

    surface_id: int
    buffer: BufferView | None
    transform: int
    scale: int
    viewport: Viewport
    damage: Region
    opaque: Region
    width: int
    height: int


@dataclass(frozen=True, slots=True)
class SceneNode:
    """A surface at (x, y) relative to the root surface, with its subsurfaces.

    ``below`` and ``above`` list the subsurfaces stacked under and over this
    surface, each from bottom to top.
    """

    state: SurfaceState
    x: int
    y: int
    below: tuple[SceneNode, ...] = ()
    above: tuple[SceneNode, ...] = ()

    def rect(self) -> Rect:
        """Where this surface lies, relative to the root surface."""
        return Rect(self.x, self.y, self.state.width, self.state.height)


def paint_order(node: SceneNode) -> Iterator[SceneNode]:
    """Every surface of the tree, bottom first."""
    for child in node.below:
        yield from paint_order(child)
    yield node
    for child in node.above:
        yield from paint_order(child)


def tree_bounds(node: SceneNode) -> Rect:
    """The bounding box of every surface of the tree, relative to the root surface."""
    rects = [n.rect() for n in paint_order(node) if not n.rect().empty]
    if not rects:
        return Rect(0, 0, 0, 0)
    x0 = min(r.x for r in rects)
    y0 = min(r.y for r in rects)
    x1 = max(r.x + r.width for r in rects)
    y1 = max(r.y + r.height for r in rects)
    return Rect(x0, y0, x1 - x0, y1 - y0)
