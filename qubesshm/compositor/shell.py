"""The compositor's contract with the agent: the ``Shell`` it shows windows to.

The agent implements ``Shell``; the compositor calls it as clients map, commit
and unmap their toplevels and popups, each a ``ShellWindow``. The hooks about
a window's properties (title, app id, size hints, parent) fire only while it is
mapped: ``window_mapped`` finds them already set. The agent answers with
``Compositor.configure``, ``close``, ``set_screen`` and ``tick``.
"""

from __future__ import annotations

import enum
import itertools
from collections.abc import Callable
from typing import Protocol

from ..pixels.region import Rect
from .scene import SceneNode


class WindowKind(enum.StrEnum):
    TOPLEVEL = "toplevel"
    POPUP = "popup"


class ToplevelState(enum.IntEnum):
    """``xdg_toplevel.state`` values for ``Compositor.configure``; each is sent only
    to clients whose ``xdg_wm_base`` version knows it."""

    MAXIMIZED = 1
    FULLSCREEN = 2
    RESIZING = 3
    ACTIVATED = 4
    TILED_LEFT = 5  # since 2
    TILED_RIGHT = 6  # since 2
    TILED_TOP = 7  # since 2
    TILED_BOTTOM = 8  # since 2
    SUSPENDED = 9  # since 6


_window_ids = itertools.count(1)


class ShellWindow:
    """A toplevel or popup of some client, as the agent sees it.

    ``id`` is unique in the compositor's life; ``client`` numbers the connection.
    ``parent`` is the window it is transient for: for a toplevel the nearest
    mapped one up its ``set_parent`` chain, for a popup the window it pops out
    of. ``min_size`` and ``max_size`` are (0, 0) when unset (0 on one axis: no
    limit there). ``popup_place`` is a popup's window geometry on the screen, as
    the positioner placed it (None for a toplevel). ``geometry`` is the window
    geometry last given to ``window_committed``, in root-surface coordinates.
    ``offset`` sums the ``wl_surface`` attach offsets of the root surface since
    the window mapped (a client resizing from the top or left edge).
    """

    def __init__(self, kind: WindowKind, client: int, pid: int | None,
                 render_pending: Callable[[], bool]) -> None:
        self.id = next(_window_ids)
        self.kind = kind
        self.client = client
        self.pid = pid
        self.title = ""
        self.app_id = ""
        self.min_size = (0, 0)
        self.max_size = (0, 0)
        self.parent: ShellWindow | None = None
        self.popup_place: Rect | None = None
        self.geometry = Rect(0, 0, 0, 0)
        self.offset = (0, 0)
        self.mapped = False
        # Set by a shell that draws at its own pace: while a commit it refused waits,
        # later commits are not offered (their damage gathers); it asks for the newest
        # state with ``render_pending``.
        self.coalesce = False
        self._render_pending = render_pending

    def render_pending(self) -> bool:
        """Offer the window's latest tree to ``Shell.window_committed`` again, after it
        returned False; True once rendered (or when nothing waits to be)."""
        return self._render_pending()

    def __repr__(self) -> str:
        return f"<{self.kind.value} {self.id} {self.title!r} of client {self.client}>"


class Shell(Protocol):
    """What the agent does with the compositor's windows."""

    def window_mapped(self, w: ShellWindow) -> None:
        """``w`` has a first buffer to show; ``window_committed`` follows at once."""

    def window_due(self, w: ShellWindow) -> bool:
        """A commit changed what ``w`` shows. True: offer it now (``window_committed``
        follows at once, with the tree); False: the shell draws later and asks for the
        newest tree then with ``w.render_pending()``. The tree is built, and the
        surfaces enter the output, only once it is offered, not for commits a shell
        that draws at its own pace never shows."""
        ...

    def window_committed(self, w: ShellWindow, tree: SceneNode, geometry: Rect) -> bool:
        """A commit changed what ``w`` shows. ``geometry`` is the window geometry in
        root-surface coordinates. True: rendered (the compositor releases the
        buffers and lets the frame callbacks run); False: not yet (the buffers and
        callbacks wait until ``w.render_pending()`` returns True)."""
        ...

    def window_unmapped(self, w: ShellWindow) -> None:
        """``w`` shows nothing any more (it may map again)."""

    def client_gone(self, client: int) -> None:
        """Client ``client`` disconnected; its windows were unmapped before this."""

    def title_changed(self, w: ShellWindow) -> None: ...

    def app_id_changed(self, w: ShellWindow) -> None: ...

    def size_hints_changed(self, w: ShellWindow) -> None: ...

    def parent_changed(self, w: ShellWindow) -> None: ...

    def screen(self) -> Rect:
        """The screen windows are placed on (popups are kept within it)."""
        ...

    def window_origin(self, w: ShellWindow) -> tuple[int, int] | None:
        """Where the mapped window ``w``'s geometry is on the screen; None if unknown."""
        ...

    # -- what a client asks of its windows beyond their pixels --------------------------

    def cursor_changed(self, w: ShellWindow, shape: str | None) -> None:
        """The pointer over ``w`` should look like ``shape``: a ``wp_cursor_shape_v1``
        shape name in CSS spelling ("default", "text", "pointer", "ew-resize", ...),
        "default" for a client's own cursor image (which cannot be named), None for a
        hidden cursor."""

    def fullscreen_requested(self, w: ShellWindow, on: bool) -> None:
        """The toplevel asked to be made fullscreen (``on``) or no longer."""

    def maximize_requested(self, w: ShellWindow, on: bool) -> None:
        """The toplevel asked to be maximized (``on``) or no longer."""

    def minimize_requested(self, w: ShellWindow) -> None:
        """The toplevel asked to be minimized."""

    def interactive_requested(self, w: ShellWindow, what: str) -> None:
        """The toplevel asked for an interactive ``what`` ("move", "resize" or
        "window menu"), which the shell may not be able to give."""
