"""A slow, per-pixel reference of a window image, to check ``qubesshm.windows.render``.

Written for obviousness, not speed: for every pixel of the window geometry,
every surface in stacking order that covers it maps the pixel's centre through
its viewport (exact fractions), Weston's transformed-coordinate formula
(``qubesshm.pixels.region._transformed_point``) and its scale to one buffer
pixel, and composites it over what is below, one channel at a time:
``min(255, src + round(dst * (255 - alpha) / 255))`` for premultiplied
ARGB8888, a plain copy for XRGB8888 or inside the surface's opaque region.
Outside every surface the window is black. Only the 24 colour bits are
returned (the daemon ignores the X byte).
"""

from __future__ import annotations

import math
from fractions import Fraction

from qubesshm.compositor.scene import SceneNode, SurfaceState
from qubesshm.pixels.formats import ARGB8888, XRGB8888
from qubesshm.pixels.region import Rect, _transformed_point

Image = list[list[int]]  # rows of 0xRRGGBB


def paint_order(node: SceneNode) -> list[SceneNode]:
    """The node's subtree, bottom first: ``below`` subsurfaces, itself, ``above``."""
    out: list[SceneNode] = []
    for child in node.below:
        out.extend(paint_order(child))
    out.append(node)
    for child in node.above:
        out.extend(paint_order(child))
    return out


def buffer_pixel(state: SurfaceState, u: int, v: int) -> tuple[int, int]:
    """The buffer pixel (column, row) shown at surface pixel ``(u, v)``."""
    buffer = state.buffer
    assert buffer is not None
    scale, transform, viewport = state.scale, state.transform, state.viewport
    if transform % 2 == 0:
        transformed_w, transformed_h = buffer.width, buffer.height
    else:
        transformed_w, transformed_h = buffer.height, buffer.width
    unscaled_w = Fraction(transformed_w, scale)
    unscaled_h = Fraction(transformed_h, scale)
    x = Fraction(2 * u + 1, 2)
    y = Fraction(2 * v + 1, 2)
    if viewport.source is not None or viewport.destination is not None:
        if viewport.source is not None:
            src_x, src_y, src_w, src_h = viewport.source
        else:
            src_x, src_y, src_w, src_h = Fraction(0), Fraction(0), unscaled_w, unscaled_h
        if viewport.destination is not None:
            dst_w, dst_h = Fraction(viewport.destination[0]), Fraction(viewport.destination[1])
        else:
            dst_w, dst_h = src_w, src_h
        x = src_x + x * src_w / dst_w
        y = src_y + y * src_h / dst_h
    bx, by = _transformed_point(x, y, unscaled_w, unscaled_h, transform)
    column = min(max(math.floor(bx * scale), 0), buffer.width - 1)
    row = min(max(math.floor(by * scale), 0), buffer.height - 1)
    return column, row


def over(below: int, pixel: int, opaque: bool) -> int:
    """One pixel composited: ``pixel`` (ARGB8888 premultiplied, or opaque) over
    ``below`` (0xRRGGBB)."""
    if opaque:
        return pixel & 0xFFFFFF
    alpha = pixel >> 24
    out = 0
    for shift in (0, 8, 16):
        src = (pixel >> shift) & 0xFF
        dst = (below >> shift) & 0xFF
        mixed = Fraction(dst * (255 - alpha), 255)
        rounded = math.floor(mixed + Fraction(1, 2))
        out |= min(255, src + rounded) << shift
    return out


def render(tree: SceneNode, geometry: Rect) -> Image:
    image = [[0] * geometry.width for _ in range(geometry.height)]
    for node in paint_order(tree):
        state = node.state
        buffer = state.buffer
        if (buffer is None or buffer.format not in (ARGB8888, XRGB8888)
                or state.width <= 0 or state.height <= 0):
            continue
        pixels = buffer.pixels()
        for row in range(geometry.height):
            v = row + geometry.y - node.y
            if not 0 <= v < state.height:
                continue
            for column in range(geometry.width):
                u = column + geometry.x - node.x
                if not 0 <= u < state.width:
                    continue
                bx, by = buffer_pixel(state, u, v)
                opaque = buffer.format == XRGB8888 or state.opaque.contains(u, v)
                image[row][column] = over(image[row][column], int(pixels[by, bx]), opaque)
    return image
