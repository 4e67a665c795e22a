"""What a headless Weston's desktop shows: raw screenshots, and windows found on them.

``weston-screenshooter`` writes a PNG through cairo, whose ARGB is premultiplied:
a pixel whose alpha byte is 0 comes out black whatever its colour. Weston's
pixman renderer copies an opaque surface's XRGB8888 pixels into the output with
their X byte, and Xwayland leaves that byte 0, so every such shot of a rootful
Xwayland window is black. :func:`shoot` asks Weston for the same shot over the
same ``weston_screenshooter`` protocol (Weston must run with ``--debug``) into a
buffer of its own and keeps the colour bytes, dropping the fourth.

Windows are found by comparing a shot with the empty desktop (:func:`settled_desktop`):
the desktop shell's background below its panel, which clients cannot draw on.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import pytest
from messages import PROTO, RawClient, request

from qubesshm.headless import HeadlessWeston
from qubesshm.wire.codec import decode_args, encode_message
from qubesshm.wire.protocol import Arg, ArgKind, MessageSpec

Screen = npt.NDArray[np.uint8]  # height x width x 3, RGB

# The height of Weston 10's desktop-shell panel, at the top of the output.
PANEL_HEIGHT = 32

# weston_screenshooter is Weston's private protocol (weston-screenshooter.xml in its
# source): one request, shoot(output, buffer), answered by one event, done.
SHOOT = MessageSpec("weston_screenshooter", "shoot", 0, (
    Arg("output", ArgKind.OBJECT, "wl_output"), Arg("buffer", ArgKind.OBJECT, "wl_buffer")))
ARGB8888 = 0
TIMEOUT = 30.0


def wait_until(condition: Callable[[], bool], what: str, timeout: float = TIMEOUT,
               message: Callable[[], object] = lambda: "") -> None:
    """Poll ``condition`` until it holds; fail the test naming ``what`` (and what
    ``message`` says of the state then) at the deadline."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:g} s waiting for {what} {message()}")
        time.sleep(0.05)


def _bind(conn: RawClient, interface: str, version: int) -> int:
    if interface not in conn.globals:
        raise LookupError(f"Weston offers no {interface} (is it running with --debug?)")
    return conn.bind(interface, version)


def _until(conn: RawClient, object_id: int) -> None:
    """Read events until one for ``object_id`` (a shot's done)."""
    for event_object, opcode, data in conn.messages():
        if (event_object, opcode) == (1, 0):
            error = decode_args(PROTO["wl_display"].events[0], data, [])
            raise ConnectionError(f"Weston refused the screenshot client: {error}")
        if event_object == object_id:
            return
    raise ConnectionError("Weston hung up on the screenshot client")


def shoot(weston: HeadlessWeston) -> Screen:
    """The whole output as Weston's renderer has it now, as RGB."""
    width, height = weston.width, weston.height
    stride = width * 4
    conn = RawClient(weston.socket_path, TIMEOUT)
    fd = os.memfd_create("qubesshm-test-shot", os.MFD_CLOEXEC)
    try:
        os.ftruncate(fd, stride * height)
        shm = _bind(conn, "wl_shm", 1)
        output = _bind(conn, "wl_output", 1)
        shooter = _bind(conn, "weston_screenshooter", 1)
        pool, buffer = conn.new_id(), conn.new_id()
        conn.send(request(shm, "wl_shm", "create_pool", pool, fd, stride * height))
        conn.send(request(pool, "wl_shm_pool", "create_buffer", buffer, 0, width, height,
                          stride, ARGB8888))
        conn.send(encode_message(shooter, SHOOT, [output, buffer]))
        _until(conn, shooter)
        pixels = os.pread(fd, stride * height, 0)
        bgrx = np.frombuffer(pixels, np.uint8).reshape(height, width, 4)
        # Little-endian ARGB8888 is B, G, R, A in memory.
        return np.ascontiguousarray(bgrx[:, :, 2::-1])
    finally:
        os.close(fd)
        conn.close()


def below_panel(screen: Screen) -> Screen:
    return screen[PANEL_HEIGHT:]


# Shots in a row that must agree for the desktop to count as settled. Each shot is of a
# frame Weston repaints for it, so a fade still running cannot give this many equal
# ones (two, under load, sometimes did: a dimmed desktop became the baseline, and every
# later shot of the full desktop looked like a window).
SETTLED_SHOTS = 5


def settled_desktop(weston: HeadlessWeston) -> Screen:
    """The desktop once the shell's start-up fade is over and nothing moves:
    ``SETTLED_SHOTS`` shots in a row agree below the panel (the panel's clock may tick)
    and show more than one colour (before the fade starts the screen is uniformly
    black)."""
    shots = [shoot(weston)]

    def settled() -> bool:
        shots.append(shoot(weston))
        last = below_panel(shots[-1])
        return (len(shots) >= SETTLED_SHOTS
                and all(np.array_equal(last, below_panel(shot))
                        for shot in shots[-SETTLED_SHOTS:-1])
                and len(np.unique(last[:, :, 0])) > 1)

    wait_until(settled, "the desktop to settle (start-up fade over, no window changing)")
    return shots[-1]


@dataclass(frozen=True)
class Box:
    """A rectangle on the output, right and bottom exclusive."""

    left: int
    top: int
    right: int
    bottom: int

    @property
    def width(self) -> int:
        return self.right - self.left

    @property
    def height(self) -> int:
        return self.bottom - self.top

    def crop(self, screen: Screen) -> Screen:
        return screen[self.top : self.bottom, self.left : self.right]


def changed(screen: Screen, desktop: Screen) -> npt.NDArray[np.bool_]:
    """Where ``screen`` differs from the empty ``desktop``, pixel by pixel."""
    mask: npt.NDArray[np.bool_] = np.any(screen != desktop, axis=2)
    return mask


def window_box(screen: Screen, desktop: Screen) -> Box | None:
    """The bounding box of what differs from the empty desktop below the panel (the
    windows, their shadows included), or None when nothing does."""
    mask = changed(below_panel(screen), below_panel(desktop))
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    if not rows.size:
        return None
    return Box(int(cols[0]), PANEL_HEIGHT + int(rows[0]),
               int(cols[-1]) + 1, PANEL_HEIGHT + int(rows[-1]) + 1)


def covered(screen: Screen, desktop: Screen, box: Box) -> float:
    """The fraction of ``box``'s pixels that differ from the empty desktop."""
    return float(changed(box.crop(screen), box.crop(desktop)).mean())


def desktop_is_clear(weston: HeadlessWeston, desktop: Screen) -> bool:
    """Whether no window (nor a closed one still fading out) is on screen."""
    return what_is_on(weston, desktop) is None


def what_is_on(weston: HeadlessWeston, desktop: Screen) -> Box | None:
    """Where the screen differs from the empty desktop, if it does."""
    return window_box(shoot(weston), desktop)
