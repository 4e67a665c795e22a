"""Which ``wl_shm`` formats the proxy can copy, and their bytes per pixel.

Only single-plane formats: a buffer of one is ``height`` rows of ``stride``
bytes, all the compositor reads. A damaged rectangle is copied by bytes per
pixel where a pixel has a fixed size, by whole rows for packed YUV (whose pixels
share chroma). Multi-planar formats (NV12, YUV420, ...) keep further planes past
``stride x height``, where a compositor reads them: the proxy neither advertises
nor accepts them, so no compositor ever reads past a pool the proxy made.
"""

from __future__ import annotations

ARGB8888 = 0
XRGB8888 = 1

_BY_SIZE: dict[int, tuple[str, ...]] = {
    1: ("C8  ", "RGB8", "BGR8", "R8  "),
    2: ("XR12", "XB12", "RX12", "BX12", "AR12", "AB12", "RA12", "BA12",
        "XR15", "XB15", "RX15", "BX15", "AR15", "AB15", "RA15", "BA15",
        "RG16", "BG16", "R16 ", "RG88", "GR88"),
    3: ("RG24", "BG24", "VU24"),
    4: ("XR24", "AR24", "XB24", "RX24", "BX24", "AB24", "RA24", "BA24",
        "XR30", "XB30", "RX30", "BX30", "AR30", "AB30", "RA30", "BA30",
        "RG32", "GR32", "XYUV", "AYUV"),
    8: ("XR4H", "XB4H", "AR4H", "AB4H", "XR48", "XB48", "AR48", "AB48"),
}


def _fourcc(code: str) -> int:
    raw = code.encode("ascii")
    return raw[0] | raw[1] << 8 | raw[2] << 16 | raw[3] << 24


BYTES_PER_PIXEL: dict[int, int] = {ARGB8888: 4, XRGB8888: 4}
for _size, _codes in _BY_SIZE.items():
    for _code in _codes:
        BYTES_PER_PIXEL[_fourcc(_code)] = _size


# Packed YUV in one plane: copied by whole rows.
_WHOLE_ROWS = ("YUYV", "YVYU", "UYVY", "VYUY", "Y210", "Y212", "Y216", "Y410", "Y412",
               "Y416", "XV30", "XV36", "XV48", "VU30")
SINGLE_PLANE: frozenset[int] = frozenset(BYTES_PER_PIXEL) | {_fourcc(c) for c in _WHOLE_ROWS}


def single_plane(format_code: int) -> bool:
    """Whether the proxy can copy buffers of this format (all of it is in one plane)."""
    return format_code in SINGLE_PLANE


def bytes_per_pixel(format_code: int) -> int | None:
    """Size of one pixel of ``format_code``, None when rows must be copied whole."""
    return BYTES_PER_PIXEL.get(format_code)
