"""A Shell for the compositor tests: records every call, snapshots every committed tree.

Each ``window_committed`` renders the tree's window geometry into a numpy array
at once (the buffers are released right after), with a deliberately plain
renderer: nearest-neighbour sampling through buffer transform, scale and
viewport, premultiplied ARGB composited over what is below, XRGB opaque.
All state is behind a lock, since servers under test run in their own thread.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar

import numpy as np
from numpy.typing import NDArray

from qubesshm.compositor.scene import SceneNode, SurfaceState, paint_order
from qubesshm.compositor.shell import ShellWindow, WindowKind
from qubesshm.pixels.formats import XRGB8888
from qubesshm.pixels.region import Rect

T = TypeVar("T")
Image = NDArray[np.uint32]


def upright(state: SurfaceState) -> NDArray[np.uint32]:
    """The buffer turned as the surface shows it (still at buffer resolution)."""
    buffer = state.buffer
    assert buffer is not None
    pixels = np.array(buffer.pixels()[: buffer.height, : buffer.width])
    t = state.transform
    if t % 2 == 0:
        if t in (2, 4):
            pixels = pixels[:, ::-1]
        if t in (2, 6):
            pixels = pixels[::-1, :]
        return pixels
    if t in (3, 7):
        pixels = pixels[:, ::-1]
    if t in (1, 7):
        pixels = pixels[::-1, :]
    return np.ascontiguousarray(pixels.T)


def surface_pixels(state: SurfaceState) -> NDArray[np.uint32]:
    """The surface's own image, ``height`` x ``width``, nearest-neighbour sampled."""
    source = upright(state)
    scale = state.scale
    if state.viewport.source is not None:
        sx, sy, sw, sh = (float(v) * scale for v in state.viewport.source)
    else:
        sx, sy, sw, sh = 0.0, 0.0, float(source.shape[1]), float(source.shape[0])
    w, h = state.width, state.height
    xs = np.floor(sx + (np.arange(w) + 0.5) * sw / w).astype(int) if w else np.zeros(0, int)
    ys = np.floor(sy + (np.arange(h) + 0.5) * sh / h).astype(int) if h else np.zeros(0, int)
    xs = np.clip(xs, 0, source.shape[1] - 1)
    ys = np.clip(ys, 0, source.shape[0] - 1)
    out: NDArray[np.uint32] = source[np.ix_(ys, xs)]
    return out


def render(tree: SceneNode, geometry: Rect) -> Image:
    """The window geometry of ``tree`` as 0xAARRGGBB, on transparent black."""
    canvas = np.zeros((max(geometry.height, 0), max(geometry.width, 0), 4), dtype=np.float64)
    for node in paint_order(tree):
        state = node.state
        if state.buffer is None or state.width <= 0 or state.height <= 0:
            continue
        image = surface_pixels(state)
        x0, y0 = node.x - geometry.x, node.y - geometry.y
        cx0, cy0 = max(x0, 0), max(y0, 0)
        cx1 = min(x0 + state.width, geometry.width)
        cy1 = min(y0 + state.height, geometry.height)
        if cx1 <= cx0 or cy1 <= cy0:
            continue
        part = image[cy0 - y0 : cy1 - y0, cx0 - x0 : cx1 - x0]
        channels = part.view(np.uint8).reshape(part.shape[0], part.shape[1], 4)
        channels = channels.astype(np.float64)
        if state.buffer.format == XRGB8888:
            channels[..., 3] = 255.0
        alpha = channels[..., 3:4] / 255.0
        below = canvas[cy0:cy1, cx0:cx1]
        canvas[cy0:cy1, cx0:cx1] = channels + below * (1.0 - alpha)
    packed = np.clip(np.rint(canvas), 0, 255).astype(np.uint8)
    return packed.view(np.uint32).reshape(packed.shape[0], packed.shape[1])


@dataclass
class Commit:
    window: ShellWindow
    tree: SceneNode
    geometry: Rect
    image: Image
    title: str
    damage: dict[int, list[Rect]]  # surface id -> damaged buffer rects

    def surfaces(self) -> list[SurfaceState]:
        return [n.state for n in paint_order(self.tree)]


@dataclass
class RecordingShell:
    """Windows placed side by side at (0, 0), popups where the positioner says."""

    screen_rect: Rect = field(default_factory=lambda: Rect(0, 0, 1920, 1080))
    calls: list[tuple[str, ShellWindow]] = field(default_factory=list)
    gone: list[int] = field(default_factory=list)  # clients that disconnected
    commits: list[Commit] = field(default_factory=list)
    mapped: dict[int, ShellWindow] = field(default_factory=dict)
    origins: dict[int, tuple[int, int]] = field(default_factory=dict)
    cursors: list[tuple[int, str | None]] = field(default_factory=list)  # (window id, shape)
    # What window_committed answers (False: the agent is busy).
    render_result: bool = True
    # What window_due answers (False: the agent draws later, asking with render_pending).
    due_result: bool = True
    lock: threading.RLock = field(default_factory=threading.RLock)

    def window_mapped(self, w: ShellWindow) -> None:
        with self.lock:
            self.calls.append(("mapped", w))
            self.mapped[w.id] = w

    def window_due(self, w: ShellWindow) -> bool:
        with self.lock:
            if self.due_result:
                return True
            self.calls.append(("due", w))
            return False

    def window_committed(self, w: ShellWindow, tree: SceneNode, geometry: Rect) -> bool:
        image = render(tree, geometry)
        damage = {n.state.surface_id: list(n.state.damage.rects()) for n in paint_order(tree)}
        with self.lock:
            self.calls.append(("committed", w))
            self.commits.append(Commit(w, tree, geometry, image, w.title, damage))
            return self.render_result

    def window_unmapped(self, w: ShellWindow) -> None:
        with self.lock:
            self.calls.append(("unmapped", w))
            self.mapped.pop(w.id, None)

    def client_gone(self, client: int) -> None:
        with self.lock:
            self.gone.append(client)

    def title_changed(self, w: ShellWindow) -> None:
        with self.lock:
            self.calls.append(("title", w))

    def app_id_changed(self, w: ShellWindow) -> None:
        with self.lock:
            self.calls.append(("app_id", w))

    def size_hints_changed(self, w: ShellWindow) -> None:
        with self.lock:
            self.calls.append(("size_hints", w))

    def parent_changed(self, w: ShellWindow) -> None:
        with self.lock:
            self.calls.append(("parent", w))

    def cursor_changed(self, w: ShellWindow, shape: str | None) -> None:
        with self.lock:
            self.calls.append(("cursor", w))
            self.cursors.append((w.id, shape))

    def fullscreen_requested(self, w: ShellWindow, on: bool) -> None:
        with self.lock:
            self.calls.append(("fullscreen" if on else "unfullscreen", w))

    def maximize_requested(self, w: ShellWindow, on: bool) -> None:
        with self.lock:
            self.calls.append(("maximize" if on else "unmaximize", w))

    def minimize_requested(self, w: ShellWindow) -> None:
        with self.lock:
            self.calls.append(("minimize", w))

    def interactive_requested(self, w: ShellWindow, what: str) -> None:
        with self.lock:
            self.calls.append((what, w))

    def screen(self) -> Rect:
        return self.screen_rect

    def window_origin(self, w: ShellWindow) -> tuple[int, int] | None:
        if w.kind is WindowKind.POPUP:
            return None if w.popup_place is None else (w.popup_place.x, w.popup_place.y)
        return self.origins.get(w.id, (0, 0))

    # -- for the tests ---------------------------------------------------------

    def read(self, what: Callable[[RecordingShell], T]) -> T:
        with self.lock:
            return what(self)

    def names(self) -> list[str]:
        with self.lock:
            return [name for name, _ in self.calls]

    def last_commit(self, title: str | None = None) -> Commit | None:
        with self.lock:
            for commit in reversed(self.commits):
                if title is None or commit.window.title == title:
                    return commit
            return None

    def mapped_windows(self) -> list[ShellWindow]:
        with self.lock:
            return list(self.mapped.values())


def wait_until(condition: Callable[[], T | None], what: str, timeout: float = 30.0,
               poll: Callable[[], object] | None = None) -> T:
    """Poll ``condition`` until it is truthy (its value is returned); fail at the
    deadline naming ``what``."""
    deadline = time.monotonic() + timeout
    while True:
        if poll is not None:
            poll()
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.01)


def rgb(image: Image) -> Image:
    out: Image = image & np.uint32(0x00FFFFFF)
    return out
