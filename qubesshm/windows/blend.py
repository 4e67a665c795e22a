"""Premultiplied-alpha OVER of ARGB8888 pixels onto an opaque XRGB8888 image.

``wl_shm`` ARGB8888 is premultiplied, so each colour channel becomes
``min(255, src + round(dst * (255 - alpha) / 255))``, rounding to nearest
(exact integer arithmetic: ``(x + 128 + ((x + 128) >> 8)) >> 8`` is
``round(x / 255)`` for every ``x`` in ``[0, 255 * 255]``; no ties exist as 255 is
odd). A colour above its alpha (not valid premultiplied data) saturates at 255
instead of wrapping. The result's alpha (X) byte is set to 255.

Red and blue are computed together in the two 16-bit halves of a uint32, green
alone, in blocks of rows small enough for the temporaries to stay in cache.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

from ..pixels.region import Rect

Pixels = npt.NDArray[np.uint32]

# Pixels per block: temporaries of this many uint32 stay in a core's cache.
_BLOCK_PIXELS = 1 << 16


def over(dst: Pixels, src: Pixels, opaque: Sequence[Rect] = ()) -> None:
    """Composite ``src`` (premultiplied ARGB8888, same shape) over ``dst`` in place;
    inside ``opaque`` (rectangles in the arrays' coordinates) the source's alpha is
    taken as 255 (the client declared it opaque there)."""
    height, width = dst.shape
    if height == 0 or width == 0:
        return
    rows = max(1, _BLOCK_PIXELS // width)
    for top in range(0, height, rows):
        bottom = min(top + rows, height)
        _over_block(dst[top:bottom], src[top:bottom],
                    [Rect(r.x, r.y - top, r.width, r.height) for r in opaque
                     if r.y < bottom and r.y + r.height > top])


def _over_block(d: Pixels, s: Pixels, opaque: list[Rect]) -> None:
    inverse = s >> 24
    np.subtract(255, inverse, out=inverse)
    for rect in opaque:
        inverse[max(rect.y, 0):rect.y + rect.height, rect.x:rect.x + rect.width] = 0
    if not inverse.any():  # opaque throughout: a copy
        np.bitwise_or(s, 0xFF000000, out=d)
        return
    # Red and blue: dst * (255 - alpha), rounded / 255, two channels a word.
    red_blue = d & 0x00FF00FF
    red_blue *= inverse
    red_blue += 0x00800080
    spare = red_blue >> 8
    spare &= 0x00FF00FF
    red_blue += spare
    red_blue >>= 8
    red_blue &= 0x00FF00FF
    green = d >> 8
    green &= 0xFF
    green *= inverse
    green += 0x80
    np.right_shift(green, 8, out=spare)
    green += spare
    green >>= 8
    # Plus the source, saturating each channel at 255.
    np.bitwise_and(s, 0x00FF00FF, out=spare)
    red_blue += spare
    np.right_shift(s, 8, out=spare)
    spare &= 0xFF
    green += spare
    np.bitwise_and(red_blue, 0x01000100, out=spare)  # a channel that passed 255
    spare -= spare >> 8
    red_blue |= spare
    red_blue &= 0x00FF00FF
    np.minimum(green, 255, out=green)
    green <<= 8
    red_blue |= green
    red_blue |= 0xFF000000
    d[...] = red_blue
