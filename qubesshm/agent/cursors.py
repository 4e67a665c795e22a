"""Cursor shapes as the GUI daemon can show them: ``MSG_CURSOR`` values.

A Wayland client names its cursor with a ``wp_cursor_shape_v1`` shape (CSS
spelling) or draws its own image. The daemon shows only the glyphs of X's
cursor font (``CURSOR_X11`` + an ``XC_*`` number from ``X11/cursorfont.h``)
or its default cursor (``CURSOR_DEFAULT``, the arrow). Each shape goes to the
glyph today's X agent (qubes-gui-agent-linux ``vmside.c``) sends for the same
name, else the nearest glyph, else the default; a client's own image, which
cannot be named, and a hidden cursor are the default too (no glyph is blank).
"""

from __future__ import annotations

from ..guiproto import messages as gm

# X cursor font glyphs (X11/cursorfont.h).
XC_X_CURSOR = 0
XC_ARROW = 2
XC_BOTTOM_LEFT_CORNER = 12
XC_BOTTOM_RIGHT_CORNER = 14
XC_BOTTOM_SIDE = 16
XC_CROSS = 30
XC_CROSSHAIR = 34
XC_FLEUR = 52
XC_HAND1 = 58
XC_HAND2 = 60
XC_LEFT_PTR = 68
XC_LEFT_SIDE = 70
XC_PLUS = 90
XC_QUESTION_ARROW = 92
XC_RIGHT_SIDE = 96
XC_SB_H_DOUBLE_ARROW = 108
XC_SB_V_DOUBLE_ARROW = 116
XC_SIZING = 120
XC_TOP_LEFT_CORNER = 134
XC_TOP_RIGHT_CORNER = 136
XC_TOP_SIDE = 138
XC_WATCH = 150
XC_XTERM = 152

# wp_cursor_shape_device_v1.shape names -> glyph. The first group is vmside.c's own
# table for these names; the rest are the nearest glyph the font has.
SHAPE_GLYPHS: dict[str, int] = {
    "pointer": XC_HAND2,
    "progress": XC_WATCH,
    "wait": XC_WATCH,
    "cell": XC_PLUS,
    "all-scroll": XC_FLEUR,
    "crosshair": XC_CROSS,
    "text": XC_XTERM,
    "grabbing": XC_HAND2,
    "col-resize": XC_SB_H_DOUBLE_ARROW,
    "row-resize": XC_SB_V_DOUBLE_ARROW,
    "n-resize": XC_TOP_SIDE,
    "e-resize": XC_RIGHT_SIDE,
    "s-resize": XC_BOTTOM_SIDE,
    "w-resize": XC_LEFT_SIDE,
    "ne-resize": XC_TOP_RIGHT_CORNER,
    "nw-resize": XC_TOP_LEFT_CORNER,
    "se-resize": XC_BOTTOM_RIGHT_CORNER,
    "sw-resize": XC_BOTTOM_LEFT_CORNER,
    "ew-resize": XC_SB_H_DOUBLE_ARROW,
    "ns-resize": XC_SB_V_DOUBLE_ARROW,
    # nearest glyphs
    "help": XC_QUESTION_ARROW,
    "vertical-text": XC_XTERM,
    "move": XC_FLEUR,
    "all-resize": XC_FLEUR,
    "grab": XC_HAND1,
    "not-allowed": XC_X_CURSOR,
    "no-drop": XC_X_CURSOR,
    "nwse-resize": XC_SIZING,  # its arrow points north-west and south-east
    "nesw-resize": XC_FLEUR,  # no glyph for this diagonal: the four-way arrow
}


def cursor_message(shape: str | None) -> gm.Cursor:
    """The ``MSG_CURSOR`` for a shape (None: a hidden cursor; "default" or a
    client's own image: the daemon's default)."""
    glyph = SHAPE_GLYPHS.get(shape) if shape is not None else None
    if glyph is None:
        return gm.Cursor(gm.CURSOR_DEFAULT)
    return gm.Cursor(gm.CURSOR_X11 + glyph)
