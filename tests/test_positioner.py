"""xdg_positioner placement (``qubesshm.compositor.positioner``) against xdg-shell.xml.

Table cases from the protocol's text: anchor points and gravity, the offset,
each constraint adjustment alone and combined, on both axes, flips kept only
when the flipped place is unconstrained, slides past either edge, resizes, and
a resize that would leave nothing falling back. Then hypothesis: the result
against a literal model of the text (slides taken one pixel at a time), and
inside the screen whenever the adjustments allow it. Also the requests' own
checks (``invalid_input``) and completeness (``invalid_positioner``).
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qubesshm.compositor.positioner import (
    INVALID_INPUT,
    INVALID_POSITIONER,
    Adjust,
    Anchor,
    Gravity,
    InvalidInput,
    InvalidPositioner,
    Positioner,
    anchor_within,
    check_complete,
    place,
    unconstrained,
)
from qubesshm.pixels.region import Rect

SCREEN = Rect(0, 0, 100, 100)


def positioner(size: tuple[int, int], rect: tuple[int, int, int, int], anchor: Anchor,
               gravity: Gravity, adjust: Adjust = Adjust.NONE,
               offset: tuple[int, int] = (0, 0)) -> Positioner:
    p = Positioner()
    p.set_size(*size)
    p.set_anchor_rect(*rect)
    p.set_anchor(anchor)
    p.set_gravity(gravity)
    p.set_constraint_adjustment(adjust)
    p.set_offset(*offset)
    return p


# -- the unconstrained place -------------------------------------------------------

@pytest.mark.parametrize(("anchor", "gravity", "expected"), [
    # Anchor rectangle (10, 20, 30, 40) in the parent; popup 8x6.
    (Anchor.TOP_LEFT, Gravity.BOTTOM_RIGHT, Rect(10, 20, 8, 6)),
    (Anchor.BOTTOM_RIGHT, Gravity.BOTTOM_RIGHT, Rect(40, 60, 8, 6)),
    (Anchor.BOTTOM_RIGHT, Gravity.TOP_LEFT, Rect(32, 54, 8, 6)),
    (Anchor.BOTTOM, Gravity.BOTTOM, Rect(21, 60, 8, 6)),      # centred on x
    (Anchor.RIGHT, Gravity.LEFT, Rect(32, 37, 8, 6)),         # centred on y
    (Anchor.NONE, Gravity.NONE, Rect(21, 37, 8, 6)),          # centre over centre
    (Anchor.TOP, Gravity.TOP_RIGHT, Rect(25, 14, 8, 6)),
    (Anchor.LEFT, Gravity.BOTTOM_LEFT, Rect(2, 40, 8, 6)),
])
def test_anchor_and_gravity(anchor: Anchor, gravity: Gravity, expected: Rect) -> None:
    p = positioner((8, 6), (10, 20, 30, 40), anchor, gravity)
    assert unconstrained(p) == expected
    # In screen coordinates: plus the parent's place; nothing constrained here.
    assert place(p, Rect(100, 200, 300, 300), Rect(0, 0, 1000, 1000)) == Rect(
        expected.x + 100, expected.y + 200, 8, 6)


def test_offset_moves_the_place_tested_for_constraints() -> None:
    p = positioner((10, 10), (0, 0, 10, 10), Anchor.BOTTOM_RIGHT, Gravity.BOTTOM_RIGHT,
                   offset=(5, -3))
    assert unconstrained(p) == Rect(15, 7, 10, 10)
    # Unconstrained without the offset, constrained with it: the slide sees the offset.
    p.set_constraint_adjustment(Adjust.SLIDE_X)
    assert place(p, Rect(76, 0, 10, 10), SCREEN) == Rect(90, 7, 10, 10)


# -- each adjustment ----------------------------------------------------------------

# A menu opening to the right of a parent near the right edge of the screen:
# anchor rectangle the parent's whole 20x20 geometry at (70, 10), popup 30x10.
PARENT = Rect(70, 10, 20, 20)


def right_menu(adjust: Adjust, width: int = 30) -> Positioner:
    return positioner((width, 10), (0, 0, 20, 20), Anchor.TOP_RIGHT, Gravity.BOTTOM_RIGHT,
                      adjust)


def test_none_leaves_it_constrained() -> None:
    assert place(right_menu(Adjust.NONE), PARENT, SCREEN) == Rect(90, 10, 30, 10)


def test_flip_x_inverts_anchor_and_gravity() -> None:
    # Flipped: anchor top-left, gravity bottom-left: ends at the parent's left edge.
    assert place(right_menu(Adjust.FLIP_X), PARENT, SCREEN) == Rect(40, 10, 30, 10)


def test_flip_x_is_dropped_when_the_flipped_place_is_constrained_too() -> None:
    # 80 wide: 90..170 unflipped, -10..70 flipped: both constrained, so unflipped.
    assert place(right_menu(Adjust.FLIP_X, 80), PARENT, SCREEN) == Rect(90, 10, 80, 10)


def test_flip_example_of_the_protocol() -> None:
    # "if the left edge of the surface is constrained, the gravity is 'left' and the
    # anchor is 'left', change the gravity to 'right' and the anchor to 'right'."
    p = positioner((30, 10), (0, 0, 20, 20), Anchor.LEFT, Gravity.LEFT, Adjust.FLIP_X)
    assert place(p, Rect(10, 40, 20, 20), SCREEN) == Rect(30, 45, 30, 10)


def test_flip_y_above_instead_of_below() -> None:
    p = positioner((30, 40), (0, 0, 20, 10), Anchor.BOTTOM_LEFT, Gravity.BOTTOM_RIGHT,
                   Adjust.FLIP_Y)
    assert place(p, Rect(10, 80, 20, 10), SCREEN) == Rect(10, 40, 30, 40)
    p.set_constraint_adjustment(Adjust.FLIP_X)  # the other axis' flip: no effect on y
    assert place(p, Rect(10, 80, 20, 10), SCREEN) == Rect(10, 90, 30, 40)


def test_slide_x_past_the_right_edge() -> None:
    assert place(right_menu(Adjust.SLIDE_X), PARENT, SCREEN) == Rect(70, 10, 30, 10)


def test_slide_x_past_the_left_edge() -> None:
    p = positioner((30, 10), (0, 0, 20, 20), Anchor.TOP_LEFT, Gravity.BOTTOM_LEFT,
                   Adjust.SLIDE_X)
    assert place(p, Rect(10, 10, 20, 20), SCREEN) == Rect(0, 10, 30, 10)


def test_slide_y_a_tall_popup_past_one_edge() -> None:
    # Below the parent, out at the bottom: moves up until its top is on the screen's.
    down = positioner((10, 150), (0, 0, 10, 10), Anchor.BOTTOM, Gravity.BOTTOM,
                      Adjust.SLIDE_Y)
    assert place(down, Rect(40, 40, 10, 10), SCREEN).y == 0
    # Above it, out at the top: moves down until its bottom is on the screen's.
    up = positioner((10, 150), (0, 0, 10, 10), Anchor.TOP, Gravity.TOP, Adjust.SLIDE_Y)
    assert place(up, Rect(40, 40, 10, 10), SCREEN).y == 100 - 150


def test_slide_y_past_both_edges_keeps_the_edge_next_to_the_anchor() -> None:
    # Out at both edges (-10..140): gravity bottom puts the top edge on the screen's.
    down = positioner((10, 150), (0, 0, 10, 10), Anchor.TOP, Gravity.BOTTOM,
                      Adjust.SLIDE_Y, offset=(0, -50))
    assert place(down, Rect(40, 40, 10, 10), SCREEN).y == 0
    # Out at both edges (-40..110): gravity top puts the bottom edge on the screen's.
    up = positioner((10, 150), (0, 0, 10, 10), Anchor.TOP, Gravity.TOP, Adjust.SLIDE_Y,
                    offset=(0, 70))
    assert place(up, Rect(40, 40, 10, 10), SCREEN).y == 100 - 150


def test_slide_a_centred_popup() -> None:
    p = positioner((40, 10), (0, 0, 10, 10), Anchor.NONE, Gravity.NONE, Adjust.SLIDE_X)
    assert place(p, Rect(90, 40, 10, 10), SCREEN).x == 60


def test_resize_x_cuts_to_the_screen() -> None:
    assert place(right_menu(Adjust.RESIZE_X), PARENT, SCREEN) == Rect(90, 10, 10, 10)


def test_resize_that_leaves_nothing_falls_back() -> None:
    # The parent is off the screen's right edge: the popup is wholly outside on x.
    p = right_menu(Adjust.RESIZE_X | Adjust.RESIZE_Y)
    assert place(p, Rect(120, 95, 20, 20), SCREEN) == Rect(140, 95, 30, 5)


def test_flip_then_slide() -> None:
    # 80 wide: the flip does not help, so it is dropped; the slide then applies.
    assert place(right_menu(Adjust.FLIP_X | Adjust.SLIDE_X, 80), PARENT, SCREEN) == Rect(
        20, 10, 80, 10)
    # 30 wide: the flip helps and nothing is left for the slide.
    assert place(right_menu(Adjust.FLIP_X | Adjust.SLIDE_X), PARENT, SCREEN) == Rect(
        40, 10, 30, 10)


def test_slide_then_resize() -> None:
    wide = right_menu(Adjust.SLIDE_X | Adjust.RESIZE_X, 130)
    assert place(wide, PARENT, SCREEN) == Rect(0, 10, 100, 10)


def test_flip_then_resize() -> None:
    assert place(right_menu(Adjust.FLIP_X | Adjust.RESIZE_X, 80), PARENT, SCREEN) == Rect(
        90, 10, 10, 10)


def test_both_axes_at_once() -> None:
    # Bottom-right corner of the screen: flip on x, slide on y.
    p = positioner((30, 30), (0, 0, 10, 10), Anchor.BOTTOM_RIGHT, Gravity.BOTTOM_RIGHT,
                   Adjust.FLIP_X | Adjust.SLIDE_Y)
    assert place(p, Rect(80, 80, 10, 10), SCREEN) == Rect(50, 70, 30, 30)


def test_screen_not_at_the_origin() -> None:
    screen = Rect(1000, 500, 100, 100)
    assert place(right_menu(Adjust.SLIDE_X), Rect(1070, 510, 20, 20), screen) == Rect(
        1070, 510, 30, 10)


# -- requests' checks -----------------------------------------------------------------

def test_request_checks() -> None:
    p = Positioner()
    for width, height in ((0, 5), (5, 0), (-1, 5)):
        with pytest.raises(InvalidInput, match="positive") as caught:
            p.set_size(width, height)
        assert caught.value.code == INVALID_INPUT
    with pytest.raises(InvalidInput, match="negative"):
        p.set_anchor_rect(0, 0, -1, 5)
    p.set_anchor_rect(3, 4, 0, 0)  # a zero-sized anchor rectangle is a point
    with pytest.raises(InvalidInput, match="anchor"):
        p.set_anchor(9)
    with pytest.raises(InvalidInput, match="gravity"):
        p.set_gravity(9)
    p.set_constraint_adjustment(0xFFFF)
    assert p.constraint_adjustment == Adjust(0x3F)


def test_completeness() -> None:
    p = Positioner()
    with pytest.raises(InvalidPositioner, match="set_size and no set_anchor_rect") as caught:
        check_complete(p)
    assert caught.value.code == INVALID_POSITIONER
    p.set_size(10, 10)
    with pytest.raises(InvalidPositioner, match="no set_anchor_rect"):
        place(p, Rect(0, 0, 10, 10), SCREEN)
    p.set_anchor_rect(0, 0, 5, 5)
    check_complete(p)
    frozen = p.copy()
    p.set_size(20, 20)
    assert frozen.size == (10, 10)


def test_anchor_within_parent() -> None:
    p = positioner((5, 5), (10, 10, 20, 20), Anchor.NONE, Gravity.NONE)
    assert anchor_within(p, 30, 30)
    assert not anchor_within(p, 29, 30)
    p.set_anchor_rect(-1, 0, 5, 5)
    assert not anchor_within(p, 30, 30)


# -- against a literal model ------------------------------------------------------------

def anchor_point(rect: Rect, anchor: Anchor) -> tuple[int, int]:
    """xdg_positioner.set_anchor: a corner, the middle of an edge, or the centre."""
    name = anchor.name.lower()
    x = (rect.x if "left" in name else rect.x + rect.width if "right" in name
         else rect.x + rect.width // 2)
    y = (rect.y if "top" in name else rect.y + rect.height if "bottom" in name
         else rect.y + rect.height // 2)
    return x, y


def model_start(size: tuple[int, int], rect: Rect, anchor: Anchor, gravity: Gravity,
                offset: tuple[int, int]) -> tuple[int, int]:
    """set_gravity: towards the named edges from the anchor point, else centred."""
    px, py = anchor_point(rect, anchor)
    name = gravity.name.lower()
    x = px if "right" in name else px - size[0] if "left" in name else px - size[0] // 2
    y = py if "bottom" in name else py - size[1] if "top" in name else py - size[1] // 2
    return x + offset[0], y + offset[1]


FLIP_X = {Anchor.LEFT: Anchor.RIGHT, Anchor.TOP_LEFT: Anchor.TOP_RIGHT,
          Anchor.BOTTOM_LEFT: Anchor.BOTTOM_RIGHT}
FLIP_Y = {Anchor.TOP: Anchor.BOTTOM, Anchor.TOP_LEFT: Anchor.BOTTOM_LEFT,
          Anchor.TOP_RIGHT: Anchor.BOTTOM_RIGHT}


def flipped(anchor: Anchor, axis: int) -> Anchor:
    table = FLIP_X if axis == 0 else FLIP_Y
    both = {**table, **{v: k for k, v in table.items()}}
    return both.get(anchor, anchor)


def model_slide(start: int, length: int, lo: int, hi: int, gravity: int) -> int:
    """The slide_x text, one pixel at a time: towards the gravity while the edge
    opposite it is constrained and the edge on its side would stay unconstrained,
    then the other way round. (Wider than the screen, where the text moves
    nothing, the edge next to the anchor goes on the screen: see the module.)"""
    def before(s: int) -> bool:
        return s < lo

    def after(s: int) -> bool:
        return s + length > hi

    if before(start) and after(start):
        return hi - length if gravity < 0 else lo
    forwards = gravity >= 0
    for direction in ((1, -1) if forwards else (-1, 1)):
        if direction > 0:
            while before(start) and not after(start + 1):
                start += 1
        else:
            while after(start) and not before(start - 1):
                start -= 1
    return start


def model_place(p: Positioner, parent: Rect, screen: Rect) -> Rect:
    assert p.size is not None and p.anchor_rect is not None
    adjust = p.constraint_adjustment
    plain = model_start(p.size, p.anchor_rect, p.anchor, p.gravity, p.offset)
    out = []
    for axis in (0, 1):
        lo = (screen.x, screen.y)[axis]
        hi = lo + (screen.width, screen.height)[axis]
        origin = (parent.x, parent.y)[axis]
        length = p.size[axis]
        start = origin + plain[axis]

        def constrained(s: int, n: int, lo: int = lo, hi: int = hi) -> bool:
            return s < lo or s + n > hi

        if constrained(start, length) and adjust & (Adjust.FLIP_X, Adjust.FLIP_Y)[axis]:
            inverted = Gravity(flipped(Anchor(p.gravity), axis))
            other = origin + model_start(p.size, p.anchor_rect, flipped(p.anchor, axis),
                                         inverted, p.offset)[axis]
            if not constrained(other, length):
                start = other
        if constrained(start, length) and adjust & (Adjust.SLIDE_X, Adjust.SLIDE_Y)[axis]:
            name = p.gravity.name.lower()
            towards = ("right", "bottom")[axis]
            away = ("left", "top")[axis]
            side = 1 if towards in name else -1 if away in name else 0
            start = model_slide(start, length, lo, hi, side)
        if constrained(start, length) and adjust & (Adjust.RESIZE_X, Adjust.RESIZE_Y)[axis]:
            new_start, end = max(start, lo), min(start + length, hi)
            if end > new_start:
                start, length = new_start, end - new_start
        out.append((start, length))
    return Rect(out[0][0], out[1][0], out[0][1], out[1][1])


@st.composite
def cases(draw: st.DrawFn) -> tuple[Positioner, Rect, Rect]:
    screen = Rect(draw(st.integers(-50, 50)), draw(st.integers(-50, 50)),
                  draw(st.integers(1, 200)), draw(st.integers(1, 200)))
    parent = Rect(draw(st.integers(-100, 250)), draw(st.integers(-100, 250)),
                  draw(st.integers(1, 150)), draw(st.integers(1, 150)))
    ax, ay = draw(st.integers(0, parent.width)), draw(st.integers(0, parent.height))
    p = positioner((draw(st.integers(1, 250)), draw(st.integers(1, 250))),
                   (ax, ay, draw(st.integers(0, parent.width - ax)),
                    draw(st.integers(0, parent.height - ay))),
                   draw(st.sampled_from(Anchor)), draw(st.sampled_from(Gravity)),
                   Adjust(draw(st.integers(0, 63))),
                   (draw(st.integers(-20, 20)), draw(st.integers(-20, 20))))
    return p, parent, screen


@settings(max_examples=500, deadline=None)
@given(cases())
def test_place_follows_the_protocol_text(case: tuple[Positioner, Rect, Rect]) -> None:
    p, parent, screen = case
    assert place(p, parent, screen) == model_place(p, parent, screen)


@settings(max_examples=500, deadline=None)
@given(cases())
def test_inside_the_screen_whenever_an_adjustment_allows(
        case: tuple[Positioner, Rect, Rect]) -> None:
    p, parent, screen = case
    assert p.size is not None
    result = place(p, parent, screen)
    first = unconstrained(p)
    plain = Rect(first.x + parent.x, first.y + parent.y, first.width, first.height)
    adjust = p.constraint_adjustment
    for axis in (0, 1):
        lo = (screen.x, screen.y)[axis]
        hi = lo + (screen.width, screen.height)[axis]
        start = (result.x, result.y)[axis]
        length = (result.width, result.height)[axis]
        plain_start = (plain.x, plain.y)[axis]
        inside = lo <= start and start + length <= hi
        assert 0 < length <= p.size[axis]
        if lo <= plain_start and plain_start + p.size[axis] <= hi:
            # Unconstrained: no adjustment moves it.
            assert (start, length) == (plain_start, p.size[axis])
        slide = adjust & (Adjust.SLIDE_X, Adjust.SLIDE_Y)[axis]
        resize = adjust & (Adjust.RESIZE_X, Adjust.RESIZE_Y)[axis]
        flip = adjust & (Adjust.FLIP_X, Adjust.FLIP_Y)[axis]
        if slide and resize:
            assert inside
        if slide and p.size[axis] <= hi - lo:
            assert inside
        if not (slide or resize or flip):
            assert (start, length) == (plain_start, p.size[axis])
        if flip and not (slide or resize) and start != plain_start:
            assert inside  # a flip is only kept when it is unconstrained
