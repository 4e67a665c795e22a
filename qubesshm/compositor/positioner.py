"""xdg_positioner: the rules a client gives for placing a popup, and the placement.

Sans-IO. ``Positioner`` holds what the requests set (each setter does the
request's own checks and raises ``InvalidInput``, the ``xdg_positioner``
error); ``check_complete`` is the ``xdg_wm_base.invalid_positioner`` check of
``get_popup`` and ``xdg_popup.reposition``; ``place`` computes where the popup
goes on the screen, applying the constraint adjustments as xdg-shell.xml says:

- per axis, in the order flip, slide, resize, each only while the popup is
  still constrained (partly outside the screen) on that axis;
- flip inverts anchor and gravity on the axis (same anchor rectangle and
  offset), and is kept only when the flipped position is not constrained on
  that axis ("if the adjusted position also ends up being constrained, the
  resulting position ... will be the one before the adjustment");
- slide first moves towards the gravity until the edge opposite the gravity is
  inside or the edge on the gravity's side would leave, then the other way
  round: one edge out moves the popup by the least distance that brings it in
  or puts the other edge on the screen's; both edges out (wider than the
  screen) puts the edge next to the anchor on the screen's edge. On an axis
  without gravity (centred) the popup still slides (wlroots does not; the
  protocol does not forbid it, and a centred popup half off the screen is what
  sliding is for); wider than the screen, its start edge goes on the screen's;
- resize cuts the popup to the screen on the axis, unless nothing would be
  left, in which case that axis keeps its size and position.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from enum import IntEnum, IntFlag

from ..pixels.region import Rect


class Anchor(IntEnum):
    """``xdg_positioner.anchor`` (an edge or corner of the anchor rectangle)."""

    NONE = 0
    TOP = 1
    BOTTOM = 2
    LEFT = 3
    RIGHT = 4
    TOP_LEFT = 5
    BOTTOM_LEFT = 6
    TOP_RIGHT = 7
    BOTTOM_RIGHT = 8


class Gravity(IntEnum):
    """``xdg_positioner.gravity`` (the direction the popup extends in)."""

    NONE = 0
    TOP = 1
    BOTTOM = 2
    LEFT = 3
    RIGHT = 4
    TOP_LEFT = 5
    BOTTOM_LEFT = 6
    TOP_RIGHT = 7
    BOTTOM_RIGHT = 8


class Adjust(IntFlag):
    """``xdg_positioner.constraint_adjustment``."""

    NONE = 0
    SLIDE_X = 1
    SLIDE_Y = 2
    FLIP_X = 4
    FLIP_Y = 8
    RESIZE_X = 16
    RESIZE_Y = 32


# xdg_positioner.error.invalid_input and xdg_wm_base.error.invalid_positioner.
INVALID_INPUT = 0
INVALID_POSITIONER = 5


class InvalidInput(ValueError):
    """A request the protocol answers with ``xdg_positioner.error.invalid_input``."""

    code = INVALID_INPUT


class InvalidPositioner(ValueError):
    """An incomplete positioner given to ``get_popup`` or ``reposition``:
    ``xdg_wm_base.error.invalid_positioner``."""

    code = INVALID_POSITIONER


# The side of the anchor rectangle (x, y) each anchor value names: -1 the left or
# top edge, 1 the right or bottom edge, 0 the middle. Gravity uses the same table:
# -1 the popup extends left/up from the anchor point, 1 right/down, 0 centred.
_SIDES: dict[int, tuple[int, int]] = {
    0: (0, 0), 1: (0, -1), 2: (0, 1), 3: (-1, 0), 4: (1, 0),
    5: (-1, -1), 6: (-1, 1), 7: (1, -1), 8: (1, 1),
}


@dataclass(slots=True)
class Positioner:
    """The state of one ``xdg_positioner``; ``get_popup`` takes a ``copy()``."""

    size: tuple[int, int] | None = None
    anchor_rect: Rect | None = None
    anchor: Anchor = Anchor.NONE
    gravity: Gravity = Gravity.NONE
    constraint_adjustment: Adjust = Adjust.NONE
    offset: tuple[int, int] = (0, 0)
    reactive: bool = False
    parent_size: tuple[int, int] | None = None
    parent_configure: int | None = None

    def set_size(self, width: int, height: int) -> None:
        if width <= 0 or height <= 0:
            raise InvalidInput(f"set_size({width}, {height}): width and height must be "
                               "positive")
        self.size = (width, height)

    def set_anchor_rect(self, x: int, y: int, width: int, height: int) -> None:
        if width < 0 or height < 0:
            raise InvalidInput(f"set_anchor_rect(..., {width}, {height}): negative size")
        self.anchor_rect = Rect(x, y, width, height)

    def set_anchor(self, anchor: int) -> None:
        if anchor not in _SIDES:
            raise InvalidInput(f"set_anchor({anchor}): not an xdg_positioner.anchor value")
        self.anchor = Anchor(anchor)

    def set_gravity(self, gravity: int) -> None:
        if gravity not in _SIDES:
            raise InvalidInput(f"set_gravity({gravity}): not an xdg_positioner.gravity value")
        self.gravity = Gravity(gravity)

    def set_constraint_adjustment(self, adjustment: int) -> None:
        # Unknown bits are no error in the protocol: they are ignored.
        self.constraint_adjustment = Adjust(adjustment & 0x3F)

    def set_offset(self, x: int, y: int) -> None:
        self.offset = (x, y)

    def set_reactive(self) -> None:
        self.reactive = True

    def set_parent_size(self, width: int, height: int) -> None:
        self.parent_size = (width, height)

    def set_parent_configure(self, serial: int) -> None:
        self.parent_configure = serial

    def copy(self) -> Positioner:
        """The rules as they are now (later requests do not change a popup's)."""
        return dataclasses.replace(self)


def check_complete(positioner: Positioner) -> None:
    """Raise ``InvalidPositioner`` unless ``set_size`` and ``set_anchor_rect`` were
    called (a zero-sized anchor rectangle is accepted, as the current text of
    ``set_anchor_rect`` allows it)."""
    missing = [name for name, value in (("set_size", positioner.size),
                                        ("set_anchor_rect", positioner.anchor_rect))
               if value is None]
    if missing:
        raise InvalidPositioner("incomplete xdg_positioner: no " + " and no ".join(missing))


def anchor_within(positioner: Positioner, parent_width: int, parent_height: int) -> bool:
    """Whether the anchor rectangle lies within the parent's window geometry, as
    the protocol asks of clients (advisory: toolkits break it transiently while a
    parent resizes, so a compositor should not end a client for it)."""
    rect = positioner.anchor_rect
    if rect is None:
        return False
    return (rect.x >= 0 and rect.y >= 0 and rect.x + rect.width <= parent_width
            and rect.y + rect.height <= parent_height)


def unconstrained(positioner: Positioner) -> Rect:
    """The popup's rectangle relative to the parent's window geometry, before any
    constraint adjustment."""
    check_complete(positioner)
    assert positioner.size is not None and positioner.anchor_rect is not None
    xs = _axis_start(positioner, 0, flipped=False)
    ys = _axis_start(positioner, 1, flipped=False)
    return Rect(xs, ys, positioner.size[0], positioner.size[1])


def place(positioner: Positioner, parent_geometry_on_screen: Rect, screen: Rect) -> Rect:
    """Where the popup goes, in screen coordinates: its unconstrained place relative
    to the parent's window geometry, then flip, slide and resize per axis while it
    is partly outside ``screen``."""
    check_complete(positioner)
    assert positioner.size is not None
    adjust = positioner.constraint_adjustment
    result: list[tuple[int, int]] = []
    for axis, origin, lo, span, flip, slide, resize in (
            (0, parent_geometry_on_screen.x, screen.x, screen.width,
             Adjust.FLIP_X, Adjust.SLIDE_X, Adjust.RESIZE_X),
            (1, parent_geometry_on_screen.y, screen.y, screen.height,
             Adjust.FLIP_Y, Adjust.SLIDE_Y, Adjust.RESIZE_Y)):
        length = positioner.size[axis]
        start = origin + _axis_start(positioner, axis, flipped=False)
        hi = lo + span
        if _constrained(start, length, lo, hi) and adjust & flip:
            flipped = origin + _axis_start(positioner, axis, flipped=True)
            if not _constrained(flipped, length, lo, hi):
                start = flipped
        if _constrained(start, length, lo, hi) and adjust & slide:
            gravity = _SIDES[positioner.gravity][axis]
            start = _slide(start, length, lo, hi, gravity)
        if _constrained(start, length, lo, hi) and adjust & resize:
            cut_start, cut_end = max(start, lo), min(start + length, hi)
            if cut_end > cut_start:
                start, length = cut_start, cut_end - cut_start
        result.append((start, length))
    (x, width), (y, height) = result
    return Rect(x, y, width, height)


def _axis_start(positioner: Positioner, axis: int, *, flipped: bool) -> int:
    """The popup's first coordinate on ``axis`` relative to the parent's geometry."""
    assert positioner.size is not None and positioner.anchor_rect is not None
    rect = positioner.anchor_rect
    rect_start, rect_length = (rect.x, rect.width) if axis == 0 else (rect.y, rect.height)
    anchor_side = _SIDES[positioner.anchor][axis]
    gravity_side = _SIDES[positioner.gravity][axis]
    if flipped:
        anchor_side, gravity_side = -anchor_side, -gravity_side
    point = rect_start + (0 if anchor_side < 0 else rect_length if anchor_side > 0
                          else rect_length // 2)
    length = positioner.size[axis]
    return (point + positioner.offset[axis]
            - (length if gravity_side < 0 else 0 if gravity_side > 0 else length // 2))


def _constrained(start: int, length: int, lo: int, hi: int) -> bool:
    return start < lo or start + length > hi


def _slide(start: int, length: int, lo: int, hi: int, gravity: int) -> int:
    """``start`` after sliding along one axis within ``[lo, hi)``."""
    out_before = lo - start            # > 0: sticks out before the screen's start
    out_after = start + length - hi    # > 0: sticks out past the screen's end
    if out_before > 0 and out_after > 0:
        # Wider than the screen: keep the edge next to the anchor point on screen.
        return hi - length if gravity < 0 else lo
    if out_before > 0:
        # Move forwards until the start is in, or the end reaches the screen's end.
        return start + min(out_before, -out_after)
    # Move back until the end is in, or the start reaches the screen's start.
    return start - min(out_after, -out_before)
