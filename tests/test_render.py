"""Window images (``qubesshm.windows.render``) against a per-pixel reference.

Random surface trees (one to three surfaces of 1..40 buffer pixels a side, all
eight transforms, scales 1..3, viewports with fractional sources, ARGB8888 with
and without valid premultiplied data, XRGB8888, opaque regions, positions in
and out of the geometry) are rendered in full and compared pixel for pixel with
``render_reference``; then the scene changes (new content with its damage,
subsurfaces moved, added, removed, re-transformed, the geometry moved or
resized) and the incremental render must equal the reference of the new scene,
write nothing outside the rectangles it returns, and those rectangles must be
few, disjoint and cover every pixel that changed.
"""

from __future__ import annotations

import dataclasses
import unittest.mock
from dataclasses import dataclass
from fractions import Fraction

import numpy as np
import numpy.typing as npt
import pytest
import render_reference
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qubesshm.compositor.scene import BufferView, SceneNode, SurfaceState
from qubesshm.pixels.formats import ARGB8888, XRGB8888
from qubesshm.pixels.region import (
    MAX_RECTS,
    NO_VIEWPORT,
    Rect,
    Region,
    Viewport,
    surface_size,
    surface_to_buffer,
)
from qubesshm.windows import blend
from qubesshm.windows.mapping import as_slice, buffer_to_surface
from qubesshm.windows.render import BACKGROUND, WindowImage

Pixels = npt.NDArray[np.uint32]
SENTINEL = 0x5A


# -- building scenes -------------------------------------------------------------


def make_pixels(seed: int, width: int, height: int, pad: int, kind: str) -> Pixels:
    """``height`` rows of ``width + pad`` pixels: random, valid premultiplied
    ARGB, or opaque."""
    rng = np.random.default_rng(seed)
    shape = (height, width + pad)
    if kind == "random":
        return rng.integers(0, 1 << 32, shape, dtype=np.uint64).astype(np.uint32)
    alpha = (np.full(shape, 255, np.uint64) if kind == "opaque"
             else rng.choice(np.array([0, 1, 128, 254, 255], np.uint64), shape))
    colour = [(rng.integers(0, 256, shape, dtype=np.uint64) * alpha) // 255 for _ in range(3)]
    out = alpha << 24 | colour[2] << 16 | colour[1] << 8 | colour[0]
    return out.astype(np.uint32)


def view(pixels: Pixels, width: int, fmt: int) -> BufferView:
    frozen = pixels.copy()
    frozen.flags.writeable = False
    return BufferView(width, frozen.shape[0], frozen.shape[1] * 4, fmt, lambda: frozen)


@dataclass
class Spec:
    """A surface of a scene being built: its state, place and parent."""

    state: SurfaceState
    x: int = 0
    y: int = 0
    parent: int | None = None  # index of the parent spec; None for the root
    above: bool = True


def build(specs: list[Spec]) -> SceneNode:
    def node(index: int) -> SceneNode:
        children = [i for i, s in enumerate(specs) if s.parent == index]
        spec = specs[index]
        return SceneNode(spec.state, spec.x, spec.y,
                         below=tuple(node(i) for i in children if not specs[i].above),
                         above=tuple(node(i) for i in children if specs[i].above))
    return node(0)


@st.composite
def viewports(draw: st.DrawFn, unscaled_w: int, unscaled_h: int) -> Viewport:
    kind = draw(st.sampled_from(["none", "source", "destination", "both"]))
    if kind == "none":
        return NO_VIEWPORT
    destination = None
    if kind in ("destination", "both"):
        destination = (draw(st.integers(1, 40)), draw(st.integers(1, 40)))
    source = None
    if kind in ("source", "both"):
        x = draw(st.integers(0, unscaled_w * 256 - 1))
        y = draw(st.integers(0, unscaled_h * 256 - 1))
        if destination is None:  # the source size must then be whole pixels
            if unscaled_w * 256 - x < 256 or unscaled_h * 256 - y < 256:
                x, y = 0, 0
            w = 256 * draw(st.integers(1, (unscaled_w * 256 - x) // 256))
            h = 256 * draw(st.integers(1, (unscaled_h * 256 - y) // 256))
        else:
            w = draw(st.integers(1, unscaled_w * 256 - x))
            h = draw(st.integers(1, unscaled_h * 256 - y))
        source = (Fraction(x, 256), Fraction(y, 256), Fraction(w, 256), Fraction(h, 256))
    return Viewport(source, destination)


@st.composite
def surfaces(draw: st.DrawFn, surface_id: int) -> SurfaceState:
    scale = draw(st.integers(1, 3))
    transform = draw(st.integers(0, 7))
    units_w = draw(st.integers(1, 40 // scale))
    units_h = draw(st.integers(1, 40 // scale))
    width, height = units_w * scale, units_h * scale
    fmt = draw(st.sampled_from([ARGB8888, ARGB8888, XRGB8888]))
    kind = draw(st.sampled_from(["random", "premultiplied", "premultiplied", "opaque"]))
    pixels = make_pixels(draw(st.integers(0, 2**32 - 1)), width, height,
                         draw(st.integers(0, 3)), kind)
    unscaled = (units_w, units_h) if transform % 2 == 0 else (units_h, units_w)
    viewport = draw(viewports(*unscaled))
    size_w, size_h = surface_size(width, height, transform, scale, viewport)
    assert size_w.denominator == 1 and size_h.denominator == 1
    opaque_rects = draw(st.lists(rects_in(int(size_w), int(size_h)), max_size=2))
    return SurfaceState(surface_id, view(pixels, width, fmt), transform, scale, viewport,
                        Region(), Region(opaque_rects), int(size_w), int(size_h))


def rects_in(width: int, height: int) -> st.SearchStrategy[Rect]:
    return st.builds(lambda x, y, w, h: Rect(x, y, w, h),
                     st.integers(-2, width), st.integers(-2, height),
                     st.integers(1, width + 2), st.integers(1, height + 2))


def positions(root: SurfaceState) -> st.SearchStrategy[tuple[int, int]]:
    """Mostly overlapping the root surface (so that surfaces blend), sometimes
    anywhere, partly or wholly outside the window."""
    near = st.tuples(st.integers(-6, root.width), st.integers(-6, root.height))
    anywhere = st.tuples(st.integers(-30, 50), st.integers(-30, 50))
    return st.one_of(near, near, anywhere)


@st.composite
def scenes(draw: st.DrawFn) -> tuple[list[Spec], Rect]:
    root = draw(surfaces(1))
    specs = [Spec(root)]
    for index in range(draw(st.sampled_from([0, 1, 2, 2]))):
        x, y = draw(positions(root))
        specs.append(Spec(draw(surfaces(index + 2)), x, y, draw(st.integers(0, index)),
                          draw(st.booleans())))
    near = st.builds(Rect, st.integers(-4, root.width // 2), st.integers(-4, root.height // 2),
                     st.integers(1, root.width + 8), st.integers(1, root.height + 8))
    anywhere = st.builds(Rect, st.integers(-10, 30), st.integers(-10, 30), st.integers(1, 50),
                         st.integers(1, 50))
    geometry = draw(st.one_of(near, near, anywhere))
    return specs, geometry


@st.composite
def changes(draw: st.DrawFn, specs: list[Spec], geometry: Rect) -> tuple[list[Spec], Rect]:
    """The next frame: every surface may get new content (with damage), move, be
    replaced (new transform, scale, viewport: no damage), disappear or appear."""
    out = [dataclasses.replace(spec) for spec in specs]
    for spec in out:
        state = spec.state
        buffer = state.buffer
        assert buffer is not None
        what = draw(st.sampled_from(["same", "content", "content", "move", "opaque",
                                     "replace"]))
        if what == "content":
            damaged = draw(rects_in(buffer.width, buffer.height)).clip(buffer.width,
                                                                       buffer.height)
            pixels = buffer.pixels().copy()
            fresh = make_pixels(draw(st.integers(0, 2**32 - 1)), buffer.width,
                                buffer.height, 0, "random")
            rows = slice(damaged.y, damaged.y + damaged.height)
            cols = slice(damaged.x, damaged.x + damaged.width)
            pixels[rows, cols] = fresh[rows, cols]
            extra = draw(st.lists(rects_in(buffer.width, buffer.height), max_size=2))
            spec.state = dataclasses.replace(
                state, buffer=view(pixels, buffer.width, buffer.format),
                damage=Region([damaged, *extra]))
        elif what == "move" and spec.parent is not None:
            spec.x, spec.y = draw(positions(out[0].state))
        elif what == "opaque":
            opaque = draw(st.lists(rects_in(state.width, state.height), max_size=2))
            spec.state = dataclasses.replace(state, opaque=Region(opaque))
        elif what == "replace":
            spec.state = draw(surfaces(state.surface_id))
    if len(out) > 1 and draw(st.booleans()):
        # Remove the last subsurface (nothing is parented to the last one).
        out.pop()
    if len(out) < 3 and draw(st.booleans()):
        x, y = draw(positions(out[0].state))
        out.append(Spec(draw(surfaces(10 + len(out))), x, y,
                        draw(st.integers(0, len(out) - 1)), draw(st.booleans())))
    how = draw(st.sampled_from(["same", "same", "moved", "resized"]))
    if how == "moved":
        geometry = Rect(geometry.x + draw(st.integers(-5, 5)),
                        geometry.y + draw(st.integers(-5, 5)), geometry.width, geometry.height)
    elif how == "resized":
        geometry = Rect(geometry.x, geometry.y, draw(st.integers(1, 50)),
                        draw(st.integers(1, 50)))
    return out, geometry


# -- checking ---------------------------------------------------------------------


def area(geometry: Rect, pad: int) -> tuple[bytearray, int]:
    stride = 4 * (geometry.width + pad)
    return bytearray([SENTINEL]) * (stride * geometry.height), stride


def words(dst: bytearray, stride: int, height: int) -> Pixels:
    return np.frombuffer(bytes(dst), np.uint32).reshape(height, stride // 4)


def assert_image(dst: bytearray, stride: int, geometry: Rect, tree: SceneNode) -> None:
    got = words(dst, stride, geometry.height)
    expected = np.array(render_reference.render(tree, geometry), np.uint32).reshape(
        geometry.height, geometry.width)
    colours = got[:, :geometry.width] & 0xFFFFFF
    if not np.array_equal(colours, expected):
        bad = np.argwhere(colours != expected)
        y, x = bad[0]
        raise AssertionError(f"{len(bad)} pixels differ, first at ({x}, {y}): "
                             f"{colours[y, x]:06x} != {expected[y, x]:06x}")
    padding = got[:, geometry.width:]
    assert (padding == SENTINEL * 0x01010101).all(), "wrote past the row's pixels"


def assert_rects(rects: list[Rect], width: int, height: int) -> None:
    assert len(rects) <= MAX_RECTS
    seen = np.zeros((height, width), bool)
    for rect in rects:
        assert not rect.empty
        assert rect == rect.clip(width, height), rect
        part = seen[rect.y:rect.y + rect.height, rect.x:rect.x + rect.width]
        assert not part.any(), f"{rect} overlaps another rectangle"
        part[...] = True


def covered(rects: list[Rect], width: int, height: int) -> npt.NDArray[np.bool_]:
    mask = np.zeros((height, width), bool)
    for rect in rects:
        mask[rect.y:rect.y + rect.height, rect.x:rect.x + rect.width] = True
    return mask


# -- properties ---------------------------------------------------------------------

SLOW = settings(max_examples=120, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@SLOW
@given(scenes(), st.integers(0, 2))
def test_full_render_matches_reference(scene: tuple[list[Spec], Rect], pad: int) -> None:
    specs, geometry = scene
    tree = build(specs)
    dst, stride = area(geometry, pad)
    image = WindowImage(geometry.width, geometry.height)
    rects = image.render(tree, geometry, memoryview(dst), stride, full=True)
    assert rects == [Rect(0, 0, geometry.width, geometry.height)]
    assert_image(dst, stride, geometry, tree)


@SLOW
@given(st.data(), scenes(), st.integers(0, 2))
def test_incremental_render_matches_reference_and_damage_covers_changes(
        data: st.DataObject, scene: tuple[list[Spec], Rect], pad: int) -> None:
    specs, geometry = scene
    before_tree = build(specs)
    dst, stride = area(geometry, pad)
    image = WindowImage(geometry.width, geometry.height)
    image.render(before_tree, geometry, memoryview(dst), stride, full=True)
    after_specs, after_geometry = data.draw(changes(specs, geometry))
    after_tree = build(after_specs)
    if (after_geometry.width, after_geometry.height) != (geometry.width, geometry.height):
        dst, stride = area(after_geometry, pad)  # a new area, as the agent allocates
    previous = words(dst, stride, after_geometry.height).copy()
    rects = image.render(after_tree, after_geometry, memoryview(dst), stride)
    width, height = after_geometry.width, after_geometry.height
    assert_rects(rects, width, height)
    assert_image(dst, stride, after_geometry, after_tree)
    mask = covered(rects, width, height)
    now = words(dst, stride, height)
    untouched = ~mask
    assert np.array_equal(now[:, :width][untouched], previous[:, :width][untouched]), \
        "wrote outside the damage it returned"
    if after_geometry == geometry:
        old = np.array(render_reference.render(before_tree, geometry), np.uint32)
        new = np.array(render_reference.render(after_tree, geometry), np.uint32)
        changed = (old != new).reshape(height, width)
        assert not (changed & ~mask).any(), "a changed pixel is outside the damage"
    else:
        assert rects == [Rect(0, 0, width, height)]


# -- cases ----------------------------------------------------------------------------


def opaque_surface(width: int, height: int, fmt: int = XRGB8888, seed: int = 1,
                   opaque: Region | None = None, surface_id: int = 1) -> SurfaceState:
    pixels = make_pixels(seed, width, height, 0, "premultiplied")
    return SurfaceState(surface_id, view(pixels, width, fmt), 0, 1, NO_VIEWPORT, Region(),
                        opaque or Region(), width, height)


def test_one_opaque_surface_takes_the_fast_path_and_copies_only_damage() -> None:
    state = opaque_surface(64, 48)
    geometry = Rect(5, 7, 40, 30)
    dst, stride = area(geometry, 0)
    image = WindowImage(40, 30)
    image.render(SceneNode(state, 0, 0), geometry, memoryview(dst), stride, full=True)
    assert image.last_path == "fast"
    assert_image(dst, stride, geometry, SceneNode(state, 0, 0))
    # Scribble over the area: only the damaged rectangle may be rewritten.
    dst[:] = bytes([SENTINEL]) * len(dst)
    damaged = dataclasses.replace(state, damage=Region([Rect(10, 10, 4, 3)]))
    rects = image.render(SceneNode(damaged, 0, 0), geometry, memoryview(dst), stride)
    assert image.last_path == "fast"
    assert rects == [Rect(5, 3, 4, 3)]
    got = words(dst, stride, 30)
    assert state.buffer is not None
    source = state.buffer.pixels()
    assert np.array_equal(got[3:6, 5:9], source[10:13, 10:14])
    got_mask = np.ones_like(got, bool)
    got_mask[3:6, 5:9] = False
    assert (got[got_mask] == SENTINEL * 0x01010101).all()


def test_argb_needs_an_opaque_region_for_the_fast_path() -> None:
    geometry = Rect(0, 0, 16, 16)
    dst, stride = area(geometry, 0)
    translucent = opaque_surface(16, 16, ARGB8888)
    image = WindowImage(16, 16)
    image.render(SceneNode(translucent, 0, 0), geometry, memoryview(dst), stride, full=True)
    assert image.last_path == "general"
    assert_image(dst, stride, geometry, SceneNode(translucent, 0, 0))
    declared = opaque_surface(16, 16, ARGB8888, opaque=Region([Rect(0, 0, 16, 16)]))
    image.render(SceneNode(declared, 0, 0), geometry, memoryview(dst), stride, full=True)
    assert image.last_path == "fast"
    assert_image(dst, stride, geometry, SceneNode(declared, 0, 0))


def test_opaque_region_of_a_translucent_subsurface_hides_what_is_below() -> None:
    root = opaque_surface(12, 12)
    pixels = np.full((6, 6), 0x40102030, np.uint32)  # a quarter opaque
    child = SurfaceState(2, view(pixels, 6, ARGB8888), 0, 1, NO_VIEWPORT, Region(),
                         Region([Rect(0, 0, 3, 6)]), 6, 6)
    tree = SceneNode(root, 0, 0, above=(SceneNode(child, 3, 3),))
    geometry = Rect(0, 0, 12, 12)
    dst, stride = area(geometry, 0)
    WindowImage(12, 12).render(tree, geometry, memoryview(dst), stride, full=True)
    assert_image(dst, stride, geometry, tree)
    got = words(dst, stride, 12) & 0xFFFFFF
    assert (got[3:9, 3:6] == 0x102030).all()  # declared opaque: alpha taken as 255
    assert (got[3:9, 6:9] != 0x102030).any()  # blended with the root below
    # The client declares another opaque region, with no damage: it still shows.
    image = WindowImage(12, 12)
    image.render(tree, geometry, memoryview(dst), stride, full=True)
    child = dataclasses.replace(child, opaque=Region())
    tree = SceneNode(root, 0, 0, above=(SceneNode(child, 3, 3),))
    assert image.render(tree, geometry, memoryview(dst), stride) == [Rect(3, 3, 6, 6)]
    assert_image(dst, stride, geometry, tree)


def test_blending_in_blocks_of_rows_keeps_opaque_regions_in_place() -> None:
    root = opaque_surface(12, 12)
    pixels = make_pixels(7, 10, 10, 0, "premultiplied")
    child = SurfaceState(2, view(pixels, 10, ARGB8888), 0, 1, NO_VIEWPORT, Region(),
                         Region([Rect(2, 3, 5, 6)]), 10, 10)
    tree = SceneNode(root, 0, 0, above=(SceneNode(child, 1, 1),))
    geometry = Rect(0, 0, 12, 12)
    dst, stride = area(geometry, 0)
    with unittest.mock.patch.object(blend, "_BLOCK_PIXELS", 16):  # a row a block
        WindowImage(12, 12).render(tree, geometry, memoryview(dst), stride, full=True)
    assert_image(dst, stride, geometry, tree)


def test_geometry_beyond_the_buffer_is_black_there() -> None:
    state = opaque_surface(8, 8)
    geometry = Rect(-2, 0, 12, 8)
    dst, stride = area(geometry, 0)
    image = WindowImage(12, 8)
    image.render(SceneNode(state, 0, 0), geometry, memoryview(dst), stride, full=True)
    assert image.last_path == "general"
    got = words(dst, stride, 8)
    assert (got[:, :2] == BACKGROUND).all() and (got[:, 10:] == BACKGROUND).all()


def test_moved_subsurface_damages_old_and_new_place() -> None:
    root = opaque_surface(40, 40)
    child = opaque_surface(5, 5, seed=2, surface_id=2)
    geometry = Rect(0, 0, 40, 40)
    dst, stride = area(geometry, 0)
    image = WindowImage(40, 40)
    image.render(SceneNode(root, 0, 0, above=(SceneNode(child, 2, 3),)), geometry,
                 memoryview(dst), stride, full=True)
    rects = image.render(SceneNode(root, 0, 0, above=(SceneNode(child, 20, 3),)), geometry,
                         memoryview(dst), stride)
    assert Region(rects) == Region([Rect(2, 3, 5, 5), Rect(20, 3, 5, 5)])
    # Gone: its last place is damaged.
    rects = image.render(SceneNode(root, 0, 0), geometry, memoryview(dst), stride)
    assert Region(rects) == Region([Rect(20, 3, 5, 5)])
    # Nothing changed: nothing damaged, nothing written.
    assert image.render(SceneNode(root, 0, 0), geometry, memoryview(dst), stride) == []


def test_damage_maps_through_transform_and_scale() -> None:
    # A 4x6 buffer at scale 2, transform 90: a 3x2 surface. Its top-left 2x2
    # buffer pixels are one surface pixel, at (2, 0) (the inverse of surface_to_buffer).
    assert buffer_to_surface(Rect(0, 0, 2, 2), 4, 6, 1, 2, NO_VIEWPORT, 3, 2) == Rect(2, 0, 1, 1)
    assert surface_to_buffer(Rect(2, 0, 1, 1), 4, 6, 1, 2) == Rect(0, 0, 2, 2)
    pixels = make_pixels(3, 4, 6, 0, "opaque")
    state = SurfaceState(1, view(pixels, 4, XRGB8888), 1, 2, NO_VIEWPORT, Region(), Region(), 3,
                         2)
    geometry = Rect(0, 0, 3, 2)
    dst, stride = area(geometry, 0)
    image = WindowImage(3, 2)
    image.render(SceneNode(state, 0, 0), geometry, memoryview(dst), stride, full=True)
    damaged = dataclasses.replace(state, damage=Region([Rect(0, 0, 2, 2)]))
    assert image.render(SceneNode(damaged, 0, 0), geometry, memoryview(dst), stride) == [
        Rect(2, 0, 1, 1)]


@given(st.integers(1, 30), st.integers(1, 30), st.integers(0, 7), st.integers(1, 3),
       st.data())
def test_buffer_to_surface_covers_every_surface_pixel_sampling_the_rect(
        units_w: int, units_h: int, transform: int, scale: int, data: st.DataObject) -> None:
    width, height = units_w * scale, units_h * scale
    unscaled = (units_w, units_h) if transform % 2 == 0 else (units_h, units_w)
    viewport = data.draw(viewports(*unscaled))
    size_w, size_h = surface_size(width, height, transform, scale, viewport)
    state = SurfaceState(1, view(np.zeros((height, width), np.uint32), width, XRGB8888),
                         transform, scale, viewport, Region(), Region(), int(size_w),
                         int(size_h))
    damaged = data.draw(rects_in(width, height)).clip(width, height)
    on_surface = buffer_to_surface(damaged, width, height, transform, scale, viewport,
                                   state.width, state.height)
    for v in range(state.height):
        for u in range(state.width):
            bx, by = render_reference.buffer_pixel(state, u, v)
            if damaged.x <= bx < damaged.x + damaged.width and \
                    damaged.y <= by < damaged.y + damaged.height:
                assert on_surface.x <= u < on_surface.x + on_surface.width, (u, v)
                assert on_surface.y <= v < on_surface.y + on_surface.height, (u, v)


def test_geometry_change_and_full_render_everything() -> None:
    state = opaque_surface(20, 20)
    geometry = Rect(0, 0, 10, 10)
    dst, stride = area(geometry, 0)
    image = WindowImage(10, 10)
    image.render(SceneNode(state, 0, 0), geometry, memoryview(dst), stride, full=True)
    assert image.render(SceneNode(state, 0, 0), geometry, memoryview(dst), stride) == []
    assert image.render(SceneNode(state, 0, 0), geometry, memoryview(dst), stride, full=True) == [
        Rect(0, 0, 10, 10)]
    moved = Rect(1, 1, 10, 10)
    assert image.render(SceneNode(state, 0, 0), moved, memoryview(dst), stride) == [
        Rect(0, 0, 10, 10)]
    assert_image(dst, stride, moved, SceneNode(state, 0, 0))


def test_scattered_damage_is_capped() -> None:
    state = opaque_surface(400, 400)
    geometry = Rect(0, 0, 400, 400)
    dst, stride = area(geometry, 0)
    image = WindowImage(400, 400)
    image.render(SceneNode(state, 0, 0), geometry, memoryview(dst), stride, full=True)
    confetti = Region([Rect(i * 5, (i * 37) % 390, 2, 2) for i in range(MAX_RECTS * 2)])
    rects = image.render(SceneNode(dataclasses.replace(state, damage=confetti), 0, 0), geometry,
                         memoryview(dst), stride)
    assert 1 <= len(rects) <= MAX_RECTS
    assert_rects(rects, 400, 400)


def test_a_failed_render_makes_the_next_one_full() -> None:
    state = opaque_surface(8, 8)
    geometry = Rect(0, 0, 8, 8)
    dst, stride = area(geometry, 0)
    image = WindowImage(8, 8)
    image.render(SceneNode(state, 0, 0), geometry, memoryview(dst), stride, full=True)

    def cut_short() -> Pixels:
        raise OSError("client file shrank")

    assert state.buffer is not None
    broken = dataclasses.replace(
        state, buffer=dataclasses.replace(state.buffer, pixels=cut_short),
        damage=Region([Rect(0, 0, 1, 1)]))
    with pytest.raises(OSError):
        image.render(SceneNode(broken, 0, 0), geometry, memoryview(dst), stride)
    assert image.render(SceneNode(state, 0, 0), geometry, memoryview(dst), stride) == [
        Rect(0, 0, 8, 8)]


def test_bad_area_is_refused() -> None:
    state = opaque_surface(4, 4)
    image = WindowImage(4, 4)
    with pytest.raises(ValueError, match="stride"):
        image.render(SceneNode(state, 0, 0), Rect(0, 0, 4, 4), memoryview(bytearray(64)), 15)
    with pytest.raises(ValueError, match="too small"):
        image.render(SceneNode(state, 0, 0), Rect(0, 0, 4, 4), memoryview(bytearray(60)), 16)


@pytest.mark.parametrize(("src", "dst", "expected"), [
    (0x00000000, 0xFF123456, 0x123456),      # transparent: the background
    (0xFF102030, 0xFFFFFFFF, 0x102030),      # opaque: the source
    (0x80404040, 0xFFFFFFFF, 0xBFBFBF),      # 0x40 + round(255 * 127 / 255)
    (0x80000000, 0xFF010101, 0x000000),      # round(1 * 127 / 255) = 0
    (0x01FFFFFF, 0xFFFFFFFF, 0xFFFFFF),      # invalid premultiplied data saturates
])
def test_over(src: int, dst: int, expected: int) -> None:
    below = np.array([[dst]], np.uint32)
    blend.over(below, np.array([[src]], np.uint32))
    assert int(below[0, 0]) == 0xFF000000 | expected
    assert render_reference.over(dst & 0xFFFFFF, src, False) == expected


def test_as_slice() -> None:
    assert as_slice(np.array([3, 5, 7], np.int64)) == slice(3, 9, 2)
    assert as_slice(np.array([2, 1, 0], np.int64)) == slice(2, None, -1)
    gather = as_slice(np.array([0, 0, 1], np.int64))
    assert not isinstance(gather, slice)
    data = np.arange(10)
    for indices in ([4, 3, 2, 1, 0], [0, 3, 6, 9], [7]):
        array = np.array(indices, np.int64)
        assert list(data[as_slice(array)]) == indices
