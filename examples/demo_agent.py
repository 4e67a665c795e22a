"""The demo's agent-mode part: a private X screen, what it shows, and the agent's own lines.

``examples/demo.py`` runs the same two clients a second time through ``qubesshm run
--agent --emulator``: qubesshm is their Wayland compositor and a Qubes GUI agent, and
``qubesshm guid-emulator`` plays dom0's GUI daemon on an X server. This module holds
the pieces of that part that are not about the picture:

- :func:`private_xvfb`, an Xvfb on a display number it picks itself (``-displayfd``),
  ended when the block ends; :class:`XvfbMissing` (one line saying what to install)
  when there is no Xvfb to start;
- :func:`grab_screen`, the X screen as height x width x RGB bytes (xcffib
  ``GetImage`` of the root window: what the emulator drew, pixel for pixel);
- :class:`StderrTee`, the agent run's stderr passed on line by line as it comes and
  kept, so the demo can read the exit summary's figures of the GUI daemon (windows,
  dumps, ACKs) that the report leaves out: :func:`daemon_figures`.
"""

from __future__ import annotations

import contextlib
import re
import shutil
import sys
import threading
from collections.abc import Iterator
from typing import IO, Any

import numpy as np
import numpy.typing as npt

from qubesshm.bench import private_x
from qubesshm.bench.private_x import PrivateX

RGB = npt.NDArray[np.uint8]

# The emulated daemon's screen: the size of the demo's headless Weston, so the two
# pictures show the windows at the same scale.
SCREEN_SIZE = (1024, 640)
# How long Xvfb may take to name its display.
XVFB_START_TIMEOUT = 20.0


class XvfbMissing(Exception):
    """No Xvfb to start: the message is one line saying what to install."""


PrivateXvfb = PrivateX  # ``display`` (":N") and ``process``


@contextlib.contextmanager
def private_xvfb(size: tuple[int, int] = SCREEN_SIZE, binary: str = "Xvfb",
                 timeout: float = XVFB_START_TIMEOUT) -> Iterator[PrivateXvfb]:
    """An Xvfb of ``size`` on a free display number (``qubesshm.bench.private_x``),
    ended when the block ends; ``XvfbMissing`` when there is none to start."""
    path = shutil.which(binary)
    if path is None:
        raise XvfbMissing(f"{binary} is not installed (Debian/Ubuntu: apt-get install xvfb; "
                          ".ci/install installs it)")
    with contextlib.ExitStack() as stack:
        try:
            xvfb = stack.enter_context(
                private_x.private_xvfb(*size, command=path, timeout=timeout))
        except RuntimeError as exc:
            raise XvfbMissing(f"{path} did not start: {exc}") from exc
        yield xvfb


def grab_screen(display: str) -> RGB:
    """The whole X screen of ``display`` as height x width x RGB bytes."""
    import xcffib
    import xcffib.xproto as xp

    conn: Any = xcffib.connect(display=display)
    try:
        screen = conn.get_setup().roots[0]
        width, height = int(screen.width_in_pixels), int(screen.height_in_pixels)
        reply = conn.core.GetImage(xp.ImageFormat.ZPixmap, screen.root, 0, 0, width, height,
                                   0xFFFFFFFF).reply()
        data = bytes(reply.data.buf())
    finally:
        conn.disconnect()
    # A 24-bit screen's ZPixmap: 32 bits a pixel, little-endian 0x00RRGGBB (B, G, R, x).
    bgrx = np.frombuffer(data, dtype=np.uint8).reshape(height, width, 4)
    rgb: RGB = bgrx[:, :, 2::-1].copy()
    return rgb


class StderrTee(threading.Thread):
    """Copies a child's stderr (a pipe) to ours line by line as it comes, and keeps it."""

    def __init__(self, stream: IO[bytes]) -> None:
        super().__init__(daemon=True)
        self.stream = stream
        self.lines: list[str] = []

    def run(self) -> None:
        for raw in self.stream:
            line = raw.decode(errors="replace")
            self.lines.append(line.rstrip("\n"))
            sys.stderr.write(line)
            sys.stderr.flush()

    @property
    def text(self) -> str:
        return "\n".join(self.lines)


# The agent's exit line (``qubesshm.agent.main.agent_summary``), the daemon's part.
_SUMMARY = re.compile(r"qubesshm: (\d+) windows, (\d+) dumps \(\+(\d+) barriers\), "
                      r"(\d+) ACKs;")
_ACK_LATENCY = re.compile(r"ACKs p50 ([\d.]+) ms, max ([\d.]+) ms")


def daemon_figures(stderr: str) -> dict[str, float] | None:
    """The GUI daemon's side of the agent's exit summary: windows, dumps, barrier dumps,
    ACKs (and the ACK latency's median and maximum in ms when it says them); None when
    the line is not there."""
    found = _SUMMARY.search(stderr)
    if found is None:
        return None
    figures: dict[str, float] = {}
    for name, value in zip(("windows", "dumps", "barriers", "acks"), found.groups(),
                           strict=True):
        figures[name] = int(value)
    latency = _ACK_LATENCY.search(stderr, found.end())
    if latency is not None:
        figures["ack_p50_ms"], figures["ack_max_ms"] = map(float, latency.groups())
    return figures
