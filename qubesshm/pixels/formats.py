"""Bytes per pixel of ``wl_shm`` formats, where a single-plane format has a fixed size.

A damaged rectangle is copied by bytes per pixel for these; for any other
format (packed YUV, multi-planar, unknown codes) the proxy copies whole rows,
which is always correct since a ``wl_shm`` buffer is one plane of ``stride``
bytes per row.
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
    4: ("XB24", "RX24", "BX24", "AB24", "RA24", "BA24",
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


def bytes_per_pixel(format_code: int) -> int | None:
    """Size of one pixel of ``format_code``, None when rows must be copied whole."""
    return BYTES_PER_PIXEL.get(format_code)
