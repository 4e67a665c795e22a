"""``Region`` and ``surface_to_buffer`` against brute-force pixel models.

A region is checked against the plain set of the pixels its rectangles cover
(union, clip, area, contains, disjoint bands, the ``MAX_RECTS`` fallback to the
bounding box). ``surface_to_buffer`` is checked against Weston's mapping of a
surface point to a buffer point (``weston_transformed_coord``, preceded by the
``wp_viewport`` source/destination scaling), written out here per transform:
every surface pixel the rectangle covers must land inside the returned buffer
rectangle, and without a viewport the result must be exact.
"""

from __future__ import annotations

import math
import random
from fractions import Fraction

from hypothesis import given, settings
from hypothesis import strategies as st

from qubesshm.pixels.region import (
    MAX_INPUT_RECTS,
    MAX_RECTS,
    NO_VIEWPORT,
    TRANSFORMS,
    Rect,
    Region,
    Viewport,
    surface_to_buffer,
)

Pixel = tuple[int, int]

# -- the pixel model -----------------------------------------------------------


def rect_pixels(rect: Rect) -> set[Pixel]:
    return {(x, y) for x in range(rect.x, rect.x + rect.width)
            for y in range(rect.y, rect.y + rect.height)}


def union_pixels(rects: list[Rect]) -> set[Pixel]:
    out: set[Pixel] = set()
    for rect in rects:
        out |= rect_pixels(rect)
    return out


def region_pixels(region: Region) -> set[Pixel]:
    """The region's pixels; its rectangles must be non-empty and pairwise disjoint."""
    out: set[Pixel] = set()
    for rect in region.rects():
        assert not rect.empty, region
        pixels = rect_pixels(rect)
        assert not pixels & out, f"{rect} overlaps another rectangle of {region}"
        out |= pixels
    return out


def bounding_box(pixels: set[Pixel]) -> Rect:
    xs, ys = [x for x, _ in pixels], [y for _, y in pixels]
    return Rect(min(xs), min(ys), max(xs) - min(xs) + 1, max(ys) - min(ys) + 1)


rects_st = st.builds(Rect, st.integers(-5, 40), st.integers(-5, 40),
                     st.integers(0, 20), st.integers(0, 20))
rect_lists = st.lists(rects_st, max_size=8)

# -- Region --------------------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(rect_lists)
def test_region_is_the_union_of_its_rects(rects: list[Rect]) -> None:
    region = Region(rects)
    pixels = union_pixels(rects)
    assert region_pixels(region) == pixels
    assert region.area == len(pixels)
    assert bool(region) == bool(pixels)
    assert region.bounds() == (bounding_box(pixels) if pixels else Rect(0, 0, 0, 0))


@settings(max_examples=100, deadline=None)
@given(rect_lists, st.randoms(use_true_random=False))
def test_region_is_canonical(rects: list[Rect], rnd: random.Random) -> None:
    """The same pixels, however given, make equal regions (the bands are canonical)."""
    region = Region(rects)
    rows = [Rect(r.x, y, r.width, 1) for r in rects for y in range(r.y, r.y + r.height)]
    columns = [Rect(x, r.y, 1, r.height) for r in rects for x in range(r.x, r.x + r.width)]
    shuffled = [*rects, *rects[:3]]
    rnd.shuffle(shuffled)
    # Past MAX_INPUT_RECTS at once, a region is the inputs' bounding box by design.
    if len(rows) <= MAX_INPUT_RECTS:
        assert Region(rows) == region
        assert hash(Region(rows)) == hash(region)
    if len(columns) <= MAX_INPUT_RECTS:
        assert Region(columns) == region
    assert Region(shuffled) == region
    assert Region(region.rects()) == region


@settings(max_examples=200, deadline=None)
@given(rect_lists, rect_lists)
def test_union_is_the_set_union(a: list[Rect], b: list[Rect]) -> None:
    ra, rb = Region(a), Region(b)
    union = ra.union(rb)
    pixels = union_pixels(a) | union_pixels(b)
    exact = Region([*a, *b])
    if len(list(exact.rects())) <= MAX_RECTS:
        assert region_pixels(union) == pixels
        assert union == exact
    else:
        assert list(union.rects()) == [bounding_box(pixels)]
    assert region_pixels(union) >= pixels
    assert union.area == len(region_pixels(union))


def test_touching_rects_merge() -> None:
    side_by_side = Region([Rect(0, 0, 2, 3), Rect(2, 0, 2, 3)])
    assert list(side_by_side.rects()) == [Rect(0, 0, 4, 3)]
    stacked = Region([Rect(0, 0, 4, 1), Rect(0, 1, 4, 2)])
    assert list(stacked.rects()) == [Rect(0, 0, 4, 3)]


def test_union_with_empty_region() -> None:
    region = Region([Rect(1, 2, 3, 4), Rect(10, 0, 2, 2)])
    assert region.union(Region()) == region
    assert Region().union(region) == region
    assert not Region().union(Region())


def checkerboard(size: int, rows: range) -> list[Rect]:
    return [Rect(x, y, 1, 1) for y in rows for x in range(size) if (x + y) % 2 == 0]


def test_union_of_too_many_rects_is_the_bounding_box() -> None:
    top, bottom = checkerboard(16, range(8)), checkerboard(16, range(8, 16))
    assert len(top) + len(bottom) > MAX_RECTS
    union = Region(top).union(Region(bottom))
    assert list(union.rects()) == [Rect(0, 0, 16, 16)]
    for x, y in union_pixels(top + bottom):
        assert union.contains(x, y)
    assert union.area == 16 * 16


def test_union_of_max_rects_stays_exact() -> None:
    # 8 x 16 cells, half of them set: exactly MAX_RECTS separate pixels.
    cells = [Rect(x, y, 1, 1) for y in range(8) for x in range(16) if (x + y) % 2 == 0]
    assert len(cells) == MAX_RECTS
    union = Region(cells[:10]).union(Region(cells[10:]))
    assert region_pixels(union) == union_pixels(cells)
    assert len(list(union.rects())) == MAX_RECTS


@settings(max_examples=200, deadline=None)
@given(rect_lists, st.integers(0, 45), st.integers(0, 45))
def test_clip_is_the_intersection_with_the_box(rects: list[Rect], width: int,
                                               height: int) -> None:
    box = rect_pixels(Rect(0, 0, width, height))
    clipped = Region(rects).clip(width, height)
    assert region_pixels(clipped) == union_pixels(rects) & box
    assert clipped.area == len(union_pixels(rects) & box)
    for rect in rects:
        assert rect_pixels(rect.clip(width, height)) == rect_pixels(rect) & box


def test_empty_regions() -> None:
    assert not Region()
    assert Region().area == 0
    assert list(Region().rects()) == []
    assert Region().bounds() == Rect(0, 0, 0, 0)
    empty = Region([Rect(3, 3, 0, 5), Rect(1, 1, 4, 0), Rect(0, 0, -2, 3), Rect(5, 5, 2, -1)])
    assert not empty
    assert empty == Region()
    assert Region([Rect(0, 0, 0, 9), Rect(2, 2, 1, 1)]) == Region([Rect(2, 2, 1, 1)])
    assert Region.full(4, 3) == Region([Rect(0, 0, 4, 3)])
    assert not Region.full(0, 3)


@settings(max_examples=50, deadline=None)
@given(rect_lists)
def test_contains_agrees_with_the_model(rects: list[Rect]) -> None:
    region = Region(rects)
    pixels = union_pixels(rects)
    for y in range(-7, 62):
        for x in range(-7, 62):
            assert region.contains(x, y) == ((x, y) in pixels), (x, y)


# -- surface_to_buffer: the reference mapping -------------------------------------


def weston_transformed_coord(width: Fraction, height: Fraction, transform: int, scale: int,
                             sx: Fraction, sy: Fraction) -> tuple[Fraction, Fraction]:
    """Weston's mapping of a point of the unviewported surface to the buffer.

    ``width``/``height``: the surface's size in surface units (the transformed
    buffer size divided by the scale).
    """
    bx, by = {
        0: (sx, sy),
        1: (sy, width - sx),
        2: (width - sx, height - sy),
        3: (height - sy, sx),
        4: (width - sx, sy),
        5: (sy, sx),
        6: (sx, height - sy),
        7: (height - sy, width - sx),
    }[transform]
    return bx * scale, by * scale


class Mapping:
    """Surface coordinates to buffer coordinates, viewport included."""

    def __init__(self, buffer_width: int, buffer_height: int, transform: int, scale: int,
                 viewport: Viewport) -> None:
        tw, th = ((buffer_width, buffer_height) if transform in (0, 2, 4, 6)
                  else (buffer_height, buffer_width))
        self.width, self.height = Fraction(tw, scale), Fraction(th, scale)
        self.transform, self.scale = transform, scale
        self.source = (viewport.source if viewport.source is not None
                       else (Fraction(0), Fraction(0), self.width, self.height))
        self.destination = (tuple(Fraction(d) for d in viewport.destination)
                            if viewport.destination is not None
                            else (self.source[2], self.source[3]))

    def surface_size(self) -> tuple[Fraction, Fraction]:
        return self.destination[0], self.destination[1]

    def __call__(self, sx: Fraction, sy: Fraction) -> tuple[Fraction, Fraction]:
        src_x, src_y, src_w, src_h = self.source
        ux = src_x + sx * src_w / self.destination[0]
        uy = src_y + sy * src_h / self.destination[1]
        return weston_transformed_coord(self.width, self.height, self.transform, self.scale,
                                        ux, uy)


def rect_contains(rect: Rect, x: int, y: int) -> bool:
    return rect.x <= x < rect.x + rect.width and rect.y <= y < rect.y + rect.height


@st.composite
def buffer_setups(draw: st.DrawFn, viewports: bool = True
                  ) -> tuple[int, int, int, int, Viewport]:
    scale = draw(st.integers(1, 3))
    width = draw(st.integers(1, 12)) * scale
    height = draw(st.integers(1, 12)) * scale
    transform = draw(st.sampled_from(TRANSFORMS))
    viewport = NO_VIEWPORT
    if viewports:
        tw, th = (width, height) if transform % 2 == 0 else (height, width)
        # Fixed 24.8 source coordinates, inside the unviewported surface.
        uw, uh = tw * 256 // scale, th * 256 // scale
        source = None
        if draw(st.booleans()):
            x = draw(st.integers(0, uw - 1))
            y = draw(st.integers(0, uh - 1))
            w = draw(st.integers(1, uw - x))
            h = draw(st.integers(1, uh - y))
            source = (Fraction(x, 256), Fraction(y, 256), Fraction(w, 256), Fraction(h, 256))
        destination = None
        if draw(st.booleans()):
            destination = (draw(st.integers(1, 16)), draw(st.integers(1, 16)))
        viewport = Viewport(source, destination)
    return width, height, transform, scale, viewport


surface_rects = st.builds(Rect, st.integers(-3, 20), st.integers(-3, 20),
                          st.integers(0, 20), st.integers(0, 20))


@settings(max_examples=300, deadline=None)
@given(buffer_setups(), surface_rects)
def test_surface_pixels_land_inside_the_result(setup: tuple[int, int, int, int, Viewport],
                                               rect: Rect) -> None:
    width, height, transform, scale, viewport = setup
    result = surface_to_buffer(rect, width, height, transform, scale, viewport)
    assert result == result.clip(width, height), "the result leaves the buffer"
    mapping = Mapping(width, height, transform, scale, viewport)
    surface_w, surface_h = mapping.surface_size()
    half = Fraction(1, 2)
    for py in range(max(rect.y, 0), rect.y + rect.height):
        if py + half >= surface_h:
            break
        for px in range(max(rect.x, 0), rect.x + rect.width):
            if px + half >= surface_w:
                break
            bx, by = mapping(px + half, py + half)
            pixel = math.floor(bx), math.floor(by)
            assert rect_contains(result, *pixel), (
                f"surface pixel {(px, py)} maps to buffer pixel {pixel}, not in {result}")


@settings(max_examples=100, deadline=None)
@given(buffer_setups(viewports=False))
def test_whole_surface_is_whole_buffer(setup: tuple[int, int, int, int, Viewport]) -> None:
    width, height, transform, scale, _ = setup
    mapping = Mapping(width, height, transform, scale, NO_VIEWPORT)
    surface = Rect(0, 0, int(mapping.width), int(mapping.height))
    assert surface_to_buffer(surface, width, height, transform, scale) == Rect(0, 0, width,
                                                                               height)
    # A damage rectangle larger than the surface is clipped to the buffer.
    huge = Rect(-100, -100, 1000, 1000)
    assert surface_to_buffer(huge, width, height, transform, scale) == Rect(0, 0, width, height)


def test_whole_surface_every_transform_and_scale() -> None:
    for transform in TRANSFORMS:
        for scale in (1, 2, 3):
            width, height = 5 * scale, 3 * scale
            sw, sh = (5, 3) if transform % 2 == 0 else (3, 5)
            assert surface_to_buffer(Rect(0, 0, sw, sh), width, height, transform,
                                     scale) == Rect(0, 0, width, height), (transform, scale)


@settings(max_examples=300, deadline=None)
@given(buffer_setups(viewports=False), surface_rects)
def test_without_viewport_the_result_is_exact(setup: tuple[int, int, int, int, Viewport],
                                              rect: Rect) -> None:
    """Whole surface pixels map onto whole blocks of scale x scale buffer pixels."""
    width, height, transform, scale, _ = setup
    result = surface_to_buffer(rect, width, height, transform, scale)
    mapping = Mapping(width, height, transform, scale, NO_VIEWPORT)
    visible = rect.clip(int(mapping.width), int(mapping.height))
    assert result.area == visible.area * scale * scale
    if scale == 1:
        # A bijection: the centres of the visible surface pixels are exactly the result.
        half = Fraction(1, 2)
        images = set()
        for px, py in rect_pixels(visible):
            bx, by = mapping(px + half, py + half)
            images.add((math.floor(bx), math.floor(by)))
        assert images == rect_pixels(result)


def test_transforms_of_a_corner_pixel() -> None:
    # A 4x2 buffer; the surface pixel (0, 0), under each transform, at scale 1.
    expected = {
        0: Rect(0, 0, 1, 1),  # normal
        1: Rect(0, 1, 1, 1),  # 90: surface is 2x4, (sx, sy) -> (sy, W - sx)
        2: Rect(3, 1, 1, 1),  # 180
        3: Rect(3, 0, 1, 1),  # 270: (H - sy, sx)
        4: Rect(3, 0, 1, 1),  # flipped
        5: Rect(0, 0, 1, 1),  # flipped-90
        6: Rect(0, 1, 1, 1),  # flipped-180
        7: Rect(3, 1, 1, 1),  # flipped-270
    }
    for transform, want in expected.items():
        assert surface_to_buffer(Rect(0, 0, 1, 1), 4, 2, transform, 1) == want, transform


def test_viewport_examples() -> None:
    # Source (2, 1, 4, 2) of an 8x4 buffer stretched to a 16x8 surface: each surface
    # pixel is a quarter of a buffer pixel: surface (0, 0, 3, 3) is buffer
    # (2, 1)-(2.75, 1.75), within buffer pixel (2, 1); (0, 0, 5, 5) reaches 3.25, 2.25.
    viewport = Viewport((Fraction(2), Fraction(1), Fraction(4), Fraction(2)), (16, 8))
    assert surface_to_buffer(Rect(0, 0, 3, 3), 8, 4, 0, 1, viewport) == Rect(2, 1, 1, 1)
    assert surface_to_buffer(Rect(0, 0, 5, 5), 8, 4, 0, 1, viewport) == Rect(2, 1, 2, 2)
    # Destination only: the whole buffer scaled to the destination size.
    viewport = Viewport(None, (2, 2))
    assert surface_to_buffer(Rect(1, 1, 1, 1), 8, 4, 0, 1, viewport) == Rect(4, 2, 4, 2)
    # An empty rectangle covers nothing.
    assert surface_to_buffer(Rect(1, 1, 0, 3), 8, 4, 0, 1, viewport) == Rect(0, 0, 0, 0)
