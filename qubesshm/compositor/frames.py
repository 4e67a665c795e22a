"""Frame callbacks, paced at the screen's refresh rate.

A callback is ready once the commit that asked for it was rendered (or needed
no rendering) in a mapped window; the pacer then answers every ready callback
at once, at most once per refresh period, with the injected clock's time.
Callbacks of surfaces that show nowhere are not ready: they wait.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .client import ClientCore


class FramePacer:
    """Ready callbacks and when they may next run."""

    def __init__(self, refresh: float) -> None:
        if not refresh > 0 or not math.isfinite(refresh):
            raise ValueError(f"refresh rate {refresh} is not a positive number of Hz")
        self.period = 1.0 / refresh
        self._ready: dict[ClientCore, list[int]] = {}
        self._last: float | None = None

    def add(self, client: ClientCore, callbacks: list[int]) -> None:
        self._ready.setdefault(client, []).extend(callbacks)

    def forget(self, client: ClientCore) -> None:
        self._ready.pop(client, None)

    def due(self) -> float | None:
        """When the ready callbacks may run (-inf: now); None if none are ready."""
        if not self._ready:
            return None
        return -math.inf if self._last is None else self._last + self.period

    def take(self, now: float) -> dict[ClientCore, list[int]] | None:
        """The callbacks to answer at ``now``, if their time has come."""
        due = self.due()
        if due is None or now < due:
            return None
        ready, self._ready = self._ready, {}
        # Keep to the refresh grid unless we are a whole period late.
        self._last = now if self._last is None or now - due >= self.period else due
        return ready


def timestamp_ms(now: float) -> int:
    """``wl_callback.done``'s time: milliseconds, wrapping at 32 bits."""
    return int(now * 1000) & 0xFFFFFFFF
