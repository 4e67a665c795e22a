"""Fake X input for a benchmark: XTest key presses and X focus, through xcffib.

What ``qubesshm bench input`` needs and no more: ``XTest(display)`` connects to
an X server that has the XTEST extension (Xvfb has it), ``find_window`` finds a
top-level window by its ``WM_NAME`` or ``_NET_WM_NAME`` (Weston's x11 output, the emulator's window
of the input client), ``focus`` gives a window the X input focus (key events go
to the focus window; nothing else sets it on a bare Xvfb) and waits until the
server says so, and ``key`` presses or releases an X key code (evdev + 8),
flushed at once, returning the CLOCK_MONOTONIC nanoseconds taken just before
the request went to the server.
"""

from __future__ import annotations

import time
from typing import Any

import xcffib
import xcffib.xproto as xp
import xcffib.xtest

KEY_PRESS = 2  # core event types XTest fakes
KEY_RELEASE = 3
POLL = 0.02


class XTestError(RuntimeError):
    pass


class XTest:
    """One connection to ``display`` with XTEST."""

    def __init__(self, display: str) -> None:
        try:
            self.conn: Any = xcffib.connect(display=display)
        except xcffib.ConnectionException as exc:
            raise XTestError(f"cannot connect to the X server {display}") from exc
        self.xtest: Any = self.conn(xcffib.xtest.key)
        self.root = self.conn.get_setup().roots[0].root
        try:
            self.xtest.GetVersion(2, 2).reply()
        except xcffib.XcffibException as exc:
            self.conn.disconnect()
            raise XTestError(f"the X server {display} has no XTEST extension") from exc
        self._atoms: dict[str, int] = {}

    def close(self) -> None:
        self.conn.disconnect()

    def atom(self, name: str) -> int:
        if name not in self._atoms:
            reply = self.conn.core.InternAtom(False, len(name), name).reply()
            self._atoms[name] = int(reply.atom)
        return self._atoms[name]

    def _names(self, window: int) -> set[bytes]:
        """``window``'s WM_NAME and _NET_WM_NAME (Weston sets only the latter)."""
        names = set()
        for prop in ("WM_NAME", "_NET_WM_NAME"):
            try:
                reply = self.conn.core.GetProperty(False, window, self.atom(prop),
                                                   xp.GetPropertyType.Any, 0, 4096).reply()
            except xcffib.XcffibException:
                continue
            if reply.format == 8:
                names.add(bytes(reply.value.buf()))
        return names

    def _viewable(self, window: int) -> bool:
        try:
            attrs = self.conn.core.GetWindowAttributes(window).reply()
        except xcffib.XcffibException:
            return False
        return bool(attrs.map_state == xp.MapState.Viewable)

    def find_window(self, name: bytes, timeout: float) -> int:
        """The mapped top-level window named ``name`` (waiting up to ``timeout`` s)."""
        deadline = time.monotonic() + timeout
        while True:
            children = self.conn.core.QueryTree(self.root).reply().children
            for window in children:
                if name in self._names(window) and self._viewable(window):
                    return int(window)
            if time.monotonic() > deadline:
                raise XTestError(f"no X window named {name.decode(errors='replace')!r} was "
                                 f"mapped within {timeout:g} s")
            time.sleep(POLL)

    def focus(self, window: int, timeout: float) -> None:
        """X input focus to ``window``; returns once the server reports it."""
        deadline = time.monotonic() + timeout
        while True:
            self.conn.core.SetInputFocus(xp.InputFocus.PointerRoot, window,
                                         xp.Time.CurrentTime)
            if int(self.conn.core.GetInputFocus().reply().focus) == window:
                return
            if time.monotonic() > deadline:
                raise XTestError(f"X window {window:#x} did not take the input focus")
            time.sleep(POLL)

    def key(self, keycode: int, press: bool) -> int:
        """Press or release X key ``keycode``; CLOCK_MONOTONIC ns just before sending."""
        sent = time.monotonic_ns()
        self.xtest.FakeInput(KEY_PRESS if press else KEY_RELEASE, keycode,
                             xp.Time.CurrentTime, self.root, 0, 0, 0)
        self.conn.flush()
        return sent

    def sync(self) -> None:
        """A round trip: the server has handled everything sent before."""
        self.conn.core.GetInputFocus().reply()
