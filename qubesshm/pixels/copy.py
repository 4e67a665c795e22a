"""Copying a damaged region from a client's memory into grant pages.

Both buffers have the same stride, so a pixel lives at the same offset in each.
Two ways, chosen by what the client's file allows:

- ``copy_region_mapped``: the client's memfd is sealed against shrinking
  (``F_SEAL_SHRINK``, as Weston's clients seal it) and long enough, so
  its mapping can never fault; numpy copies each rectangle row by row.
- ``copy_region``: any other file, and a pool's first commit (a mapping costs
  more than one read), is read with ``preadv`` straight into the
  mmapped grant pages: no SIGBUS when the client shrinks its file, and a short
  read says exactly that. Each rectangle costs one system call per 512 rows: the
  bytes between its rows go to a scratch buffer, so only damaged bytes are
  written.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from .region import Rect, Region

_IOV_MAX = os.sysconf("SC_IOV_MAX") if hasattr(os, "sysconf") else 1024
# Above this many bytes between rows, read row by row instead of into scratch.
_MAX_GAP = 1 << 20


class ShortRead(Exception):
    """The client's file ended before the bytes its buffer promised."""

    def __init__(self, offset: int, wanted: int, got: int) -> None:
        super().__init__(f"read {got} of {wanted} bytes at offset {offset}")
        self.offset = offset


@dataclass(frozen=True, slots=True)
class Layout:
    """Where a buffer's pixels are: ``offset`` into the file, ``stride`` bytes a row."""

    offset: int
    width: int
    height: int
    stride: int
    bpp: int | None  # None: copy whole rows


def row_span(layout: Layout, rect: Rect) -> tuple[int, int]:
    """Byte offset (from the buffer's start) and length of ``rect``'s part of a row."""
    if layout.bpp is None:
        return 0, layout.stride
    return rect.x * layout.bpp, rect.width * layout.bpp


def damaged_bytes(layout: Layout, region: Region) -> int:
    """Bytes of ``region`` (clipped to the buffer) in this layout."""
    total = 0
    for rect in region.clip(layout.width, layout.height).rects():
        total += row_span(layout, rect)[1] * rect.height
    return total


def copy_region(src_fd: int, layout: Layout, region: Region, dst: memoryview) -> int:
    """Copy ``region`` of the buffer in ``src_fd`` to ``dst``; the bytes written."""
    written = 0
    for rect in region.clip(layout.width, layout.height).rects():
        written += _copy_rect(src_fd, layout, rect, dst)
    return written


def copy_region_mapped(src: memoryview, layout: Layout, region: Region,
                       dst: memoryview) -> int:
    """Copy ``region`` from a mapping of the client's whole file; the bytes written."""
    size = layout.stride * layout.height
    rows_in = np.frombuffer(src, np.uint8, size, layout.offset).reshape(layout.height,
                                                                        layout.stride)
    rows_out = np.frombuffer(dst, np.uint8, size, 0).reshape(layout.height, layout.stride)
    written = 0
    for rect in region.clip(layout.width, layout.height).rects():
        start, length = row_span(layout, rect)
        y0, y1 = rect.y, rect.y + rect.height
        np.copyto(rows_out[y0:y1, start:start + length], rows_in[y0:y1, start:start + length])
        written += length * rect.height
    return written


def _copy_rect(src_fd: int, layout: Layout, rect: Rect, dst: memoryview) -> int:
    start, length = row_span(layout, rect)
    stride = layout.stride
    first = rect.y * stride + start
    if length == stride or rect.height == 1:
        # Whole rows, or one row: a single contiguous span.
        total = (rect.height - 1) * stride + length
        _read_exact(src_fd, dst, [(first, total)], None, layout.offset + first, total)
        return total
    gap = stride - length
    if gap > _MAX_GAP:
        for row in range(rect.height):
            at = first + row * stride
            _read_exact(src_fd, dst, [(at, length)], None, layout.offset + at, length)
        return length * rect.height
    scratch = bytearray(gap)
    for rows in _batches(rect.height, _IOV_MAX // 2):
        spans = [(first + row * stride, length) for row in rows]
        count = len(rows)
        _read_exact(src_fd, dst, spans, scratch, layout.offset + spans[0][0],
                    count * length + (count - 1) * gap)
    return length * rect.height


def _batches(count: int, size: int) -> Iterator[range]:
    for start in range(0, count, size):
        yield range(start, min(start + size, count))


def _read_exact(fd: int, dst: memoryview, spans: list[tuple[int, int]],
                gap: bytearray | None, offset: int, wanted: int) -> None:
    """One preadv of consecutive file bytes into ``spans`` of ``dst``, the bytes
    between spans going to ``gap``."""
    views: list[memoryview] = []
    try:
        for i, (at, length) in enumerate(spans):
            if i and gap is not None:
                views.append(memoryview(gap))
            views.append(dst[at:at + length])
        got = os.preadv(fd, views, offset)
    finally:
        # A view left alive would keep the grant pages' mmap from being closed.
        for view in views:
            view.release()
    if got != wanted:
        # A regular file returns everything up to its end in one call; less means
        # the client's file is shorter than its buffer.
        raise ShortRead(offset, wanted, got)
