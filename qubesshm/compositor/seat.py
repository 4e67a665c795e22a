"""``wl_seat`` "seat0": the agent's keyboard and pointer, routed to clients' surfaces.

The agent drives the ``Seat`` (``compositor.seat``) with what the GUI daemon
reports of its windows: keyboard focus, keys, pointer motion, crossing, buttons
and wheel clicks, each for a ``ShellWindow`` at coordinates relative to its
window geometry's origin (where the daemon's window starts). The seat finds the
surface under the pointer (``picking``), keeps the pointer on the surface a
button went down on until every button is up (an implicit grab, as X does),
moves keyboard focus to the topmost grabbing popup of the focused window, and
ends the chain of grabbing popups (``popup_done``, top down) when focus leaves
its window or a button goes down on another client. ``PointerGrab`` lets a drag
take the pointer's events instead of the clients.

Serials of the presses (button and key) sent to each client are kept, the last
few dozen, so that requests naming one (``xdg_popup.grab``, selections, drags)
can be checked with ``serial_is_press``.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Protocol

from ..objects.objectmap import WaylandObject
from ..wire.codec import ArgValue, WireError
from . import picking
from .cursor import cursor_committed
from .datadevice import ICON_ROLE
from .keyboard import Keyboard
from .keymap import Keymap
from .pointer import Pointer
from .popup import Popup
from .surfaces import Surface
from .windows import Window, window_of

if TYPE_CHECKING:
    from .client import ClientCore, Handler
    from .core import Compositor
    from .shell import ShellWindow

SEAT_NAME = "seat0"
CAPABILITY_POINTER = 1
CAPABILITY_KEYBOARD = 2
CAPABILITIES = CAPABILITY_POINTER | CAPABILITY_KEYBOARD
# wl_seat.error
MISSING_CAPABILITY = 0
# Press serials remembered per client.
PRESS_SERIALS_KEPT = 48

Hit = tuple[Surface, float, float]


class PointerGrab(Protocol):
    """Takes the pointer's events while set (``Seat.start_grab``): a drag."""

    def motion(self, surface: Surface | None, sx: float, sy: float, time_ms: int) -> None:
        """The pointer is over ``surface`` at (sx, sy) in its coordinates (None: over
        no surface of any client's)."""

    def button(self, button: int, pressed: bool, time_ms: int) -> None: ...

    def cancel(self) -> None:
        """The grab is being replaced or the seat is going away."""


class SeatResource:
    """A ``wl_seat`` object."""

    def __init__(self, seat: Seat) -> None:
        self.seat = seat


class Seat:
    """The one seat: keyboard focus, pointer focus, popup grabs and press serials."""

    def __init__(self, compositor: Compositor, keymap: Keymap | None = None) -> None:
        self.compositor = compositor
        self.keymap = keymap if keymap is not None else Keymap.default()
        self.keyboard = Keyboard(self.keymap)
        self.pointer = Pointer()
        self.focus_window: Window | None = None  # the window the agent gave focus
        self.popup_chain: list[Popup] = []  # grabbing popups of one client, bottom first
        self.grab: PointerGrab | None = None
        self.focus_listeners: list[Callable[[ClientCore | None], None]] = []
        self._presses: dict[ClientCore, deque[int]] = {}
        self._pointer_outside = False  # left the window while a button was held
        self._last_pointer: tuple[Window, float, float] | None = None  # root coords
        self._keyboard_client: ClientCore | None = None

    # -- binding -----------------------------------------------------------------

    def bind(self, client: ClientCore, object_id: int, version: int) -> None:
        client.resources[object_id] = SeatResource(self)
        client.send(object_id, "capabilities", CAPABILITIES)
        client.send(object_id, "name", SEAT_NAME)

    # -- the agent's calls -------------------------------------------------------

    def set_keymap(self, keymap: Keymap) -> None:
        """A new keymap for every ``wl_keyboard`` (held keys carry over)."""
        self.keymap = keymap
        self.keyboard.set_keymap(keymap)

    @property
    def keyboard_client(self) -> ClientCore | None:
        focus = self.keyboard.focus
        return None if focus is None or focus.client.closed else focus.client

    def keyboard_focus(self, w: ShellWindow | None, pressed: Iterable[int] = ()) -> None:
        """Keyboard focus to ``w`` (its topmost grabbing popup's surface, if it has
        one), or to nothing; ``pressed`` are the evdev codes held as focus arrives."""
        window = self._window(w) if w is not None else None
        leaving_chain = bool(self.popup_chain) and (window is None
                                                    or not self._in_chain_family(window))
        self.keyboard.reset(tuple(int(code) for code in pressed))
        self.focus_window = window
        if leaving_chain:
            self.dismiss_popup_chain()  # focus goes straight to ``window``
        target = self._keyboard_target()
        if target is self.keyboard.focus:
            self.keyboard.resend_state()
        else:
            self.keyboard.set_focus(target)
        self._focus_changed()

    def key(self, code: int, pressed: bool, time_ms: int) -> None:
        """Key ``code`` (evdev: X key code - 8) went down or up."""
        sent = self.keyboard.key(code, pressed, time_ms)
        if sent is not None and pressed:
            self._note_press(*sent)

    def surface_at(self, w: ShellWindow, x: float, y: float) -> Hit | None:
        """The surface of ``w`` under (x, y) (relative to its window geometry) and the
        point in that surface's coordinates."""
        window = self._window(w)
        if window is None:
            return None
        return picking.pick(window.surface, x + w.geometry.x, y + w.geometry.y)

    def pointer_motion(self, w: ShellWindow, x: float, y: float, time_ms: int) -> None:
        """The pointer is at (x, y) relative to ``w``'s window geometry."""
        window = self._window(w)
        if window is None:
            return
        rx, ry = x + w.geometry.x, y + w.geometry.y
        self._last_pointer = (window, rx, ry)
        self._pointer_outside = False
        if self.grab is not None:
            hit = self._grab_pick(window, rx, ry)
            if hit is None:
                self.grab.motion(None, 0.0, 0.0, time_ms)
            else:
                self.grab.motion(hit[0], hit[1], hit[2], time_ms)
            return
        focus = self.pointer.focus
        if self.pointer.buttons and focus is not None and not self._chain_of(window):
            sx, sy = self._local(window, rx, ry, focus)
            self.pointer.motion_to(sx, sy, time_ms)
            return
        self._repick(window, rx, ry, time_ms)

    def pointer_leave(self, w: ShellWindow) -> None:
        """The pointer left ``w`` (kept, while a button is held, until the last is up)."""
        window = self._window(w)
        focus = self.pointer.focus
        if self._last_pointer is not None and self._last_pointer[0] is window:
            self._last_pointer = None
        if focus is None or window is None or (window_of(focus) is not window
                                               and not self.pointer.buttons):
            return
        if self.pointer.buttons or self.grab is not None:
            self._pointer_outside = True
            return
        self.pointer.set_focus(None)

    def pointer_button(self, w: ShellWindow, x: float, y: float, button: int, pressed: bool,
                       time_ms: int) -> int | None:
        """Button ``button`` (BTN_*) went down or up at (x, y) relative to ``w``'s window
        geometry; the serial of the ``wl_pointer.button`` sent, if one was."""
        window = self._window(w)
        rx, ry = (x + w.geometry.x, y + w.geometry.y)
        if self.grab is not None:
            buttons = self.pointer.buttons
            if pressed and button not in buttons:
                buttons.append(button)
            elif not pressed and button in buttons:
                buttons.remove(button)
            self.grab.button(button, pressed, time_ms)
            return None
        if window is None and not self.pointer.buttons:
            # A press on a window that is gone: nobody's, but it ends a popup grab.
            if pressed and self.popup_chain:
                self.dismiss_popup_chain()
            return None
        if pressed and window is not None:
            if not self.pointer.buttons:
                self._last_pointer = (window, rx, ry)
                self._pointer_outside = False
                self._repick(window, rx, ry, time_ms)
            target = self.pointer.focus
            if self.popup_chain and (target is None
                                     or target.client is not self.popup_chain[0].client):
                self.dismiss_popup_chain()
        sent = self.pointer.button(button, pressed, time_ms)
        if sent is not None and pressed:
            self._note_press(*sent)
        if not pressed and not self.pointer.buttons:
            # The implicit grab ended: the pointer goes to what is under it now.
            if self._pointer_outside or window is None:
                self._pointer_outside = False
                self.pointer.set_focus(None)
            else:
                self._repick(window, rx, ry, time_ms)
        return None if sent is None else sent[1]

    def pointer_axis(self, w: ShellWindow, x: float, y: float, axis: int, steps: int,
                     time_ms: int) -> None:
        """``steps`` wheel clicks (signed) on ``axis`` (0 vertical, 1 horizontal)."""
        if self.grab is not None:
            return
        window = self._window(w)
        if window is None:
            return
        if not self.pointer.buttons:
            rx, ry = x + w.geometry.x, y + w.geometry.y
            self._last_pointer = (window, rx, ry)
            self._repick(window, rx, ry, time_ms)
        self.pointer.axis(axis, steps, time_ms)

    def serial_is_press(self, client: ClientCore, serial: int) -> bool:
        """Whether ``serial`` is one of the recent button or key presses sent to
        ``client``."""
        kept = self._presses.get(client)
        return kept is not None and serial in kept

    def start_grab(self, grab: PointerGrab) -> None:
        """Pointer events go to ``grab`` from now on; the pointer leaves its surface."""
        if self.grab is not None and self.grab is not grab:
            self.grab.cancel()
        self.grab = grab
        buttons = list(self.pointer.buttons)
        self.pointer.set_focus(None)
        self.pointer.buttons = buttons

    def end_grab(self) -> None:
        """Pointer events go to clients again, to the surface under the pointer."""
        if self.grab is None:
            return
        self.grab = None
        last = self._last_pointer
        if last is not None and not self._pointer_outside and last[0].mapped:
            self._repick(*last, None)

    # -- popup grabs ---------------------------------------------------------------

    def grab_popup(self, popup: Popup, serial: int) -> bool:
        """``xdg_popup.grab``: granted (True) for a serial of a recent press sent to the
        popup's client, when the popup's parent is the topmost grabbing popup or (no
        chain yet) not a popup; else denied, and the popup is to be dismissed."""
        client = popup.client
        if not self.serial_is_press(client, serial):
            return False
        chain = self.popup_chain
        if chain:
            if chain[0].client is not client or popup.parent is not chain[-1]:
                return False
        elif isinstance(popup.parent, Popup):
            return False
        chain.append(popup)
        return True

    def popup_mapped(self, popup: Popup) -> None:
        if popup in self.popup_chain:
            self._refocus()

    def popup_gone(self, popup: Popup) -> None:
        """``popup`` was dismissed, unmapped or destroyed: it leaves the chain (with
        any above it)."""
        chain = self.popup_chain
        if popup in chain:
            del chain[chain.index(popup):]
            self._refocus()

    def dismiss_popup_chain(self) -> None:
        """``popup_done`` to every grabbing popup, the topmost first."""
        for popup in reversed(list(self.popup_chain)):
            popup.dismiss()
        self.popup_chain.clear()
        self._refocus()

    def is_topmost_grab(self, popup: Popup) -> bool:
        return not self.popup_chain or self.popup_chain[-1] is popup

    def in_chain(self, popup: Popup) -> bool:
        return popup in self.popup_chain

    # -- cursors -------------------------------------------------------------------

    def cursor_allowed(self, client: ClientCore, serial: int) -> bool:
        """A cursor request counts: ``client`` has the pointer and ``serial`` is the
        latest enter it was sent."""
        focus = self.pointer.focus
        return (focus is not None and focus.client is client and focus.alive
                and self.pointer.enter_serials.get(client) == serial)

    def cursor_changed(self, shape: str | None) -> None:
        focus = self.pointer.focus
        window = None if focus is None else window_of(focus)
        if window is None or not window.mapped:
            return
        with self.compositor.shell_call():
            self.compositor.shell.cursor_changed(window.shell_window, shape)

    # -- what the compositor tells ---------------------------------------------------

    def client_gone(self, client: ClientCore) -> None:
        self._presses.pop(client, None)
        self.popup_chain = [p for p in self.popup_chain if p.client is not client]
        if self.focus_window is not None and self.focus_window.client is client:
            self.focus_window = None
        self.keyboard.client_gone(client)
        self.pointer.client_gone(client)
        if self._last_pointer is not None and self._last_pointer[0].client is client:
            self._last_pointer = None
        self._focus_changed()

    def surface_destroyed(self, surface: Surface) -> None:
        self.keyboard.surface_destroyed(surface)
        self.pointer.surface_destroyed(surface)
        self._focus_changed()

    def surface_committed(self, surface: Surface) -> None:
        if surface.role in ("cursor", ICON_ROLE):
            # Shown by nothing (a cursor image or drag icon cannot cross to dom0): its
            # buffer and frame callbacks are done with at once.
            cursor_committed(surface)

    def window_unmapped(self, window: Window) -> None:
        """``window`` no longer shows: focus on its surfaces goes (with ``leave``)."""
        if isinstance(window, Popup):
            self.popup_gone(window)
        if self._last_pointer is not None and self._last_pointer[0] is window:
            self._last_pointer = None
        focus = self.pointer.focus
        if focus is not None and window_of(focus) is window:
            # Queued: it only tells the client what it did (a popup_done is posted
            # when the compositor did it). The keyboard's leave is posted: a client
            # repeats a held key until it hears of the leave.
            with focus.client.queueing():
                self.pointer.set_focus(None)
            self.pointer.buttons = []
        if self.focus_window is window:
            self.focus_window = None
        kfocus = self.keyboard.focus
        if kfocus is not None and window_of(kfocus) is window:
            self._refocus()

    # -- inside --------------------------------------------------------------------

    def _window(self, w: ShellWindow) -> Window | None:
        window = self.compositor._window(w)
        return window if window is not None and window.mapped else None

    def _note_press(self, client: ClientCore, serial: int) -> None:
        kept = self._presses.get(client)
        if kept is None:
            kept = self._presses[client] = deque(maxlen=PRESS_SERIALS_KEPT)
        kept.append(serial)

    def _chain_owner(self) -> Window | None:
        if not self.popup_chain:
            return None
        node: Window | None = self.popup_chain[0]
        while isinstance(node, Popup):
            node = node.parent
        return node

    def _in_chain_family(self, window: Window) -> bool:
        return (isinstance(window, Popup) and window in self.popup_chain) or \
            window is self._chain_owner()

    def _keyboard_target(self) -> Surface | None:
        window = self.focus_window
        if window is None or not window.alive or not window.mapped:
            return None
        if self.popup_chain and self._in_chain_family(window):
            mapped = [p for p in self.popup_chain if p.mapped]
            if mapped:
                return mapped[-1].surface
            owner = self._chain_owner()
            if owner is not None and owner.mapped:
                return owner.surface
        return window.surface

    def _refocus(self) -> None:
        target = self._keyboard_target()
        if target is not self.keyboard.focus:
            self.keyboard.set_focus(target)
            self._focus_changed()

    def _focus_changed(self) -> None:
        client = self.keyboard_client
        if client is self._keyboard_client:
            return
        self._keyboard_client = client
        for listener in list(self.focus_listeners):
            listener(client)

    def _repick(self, window: Window, rx: float, ry: float, time_ms: int | None) -> None:
        hit = (self._client_pick(window, rx, ry, popups_first=True) if self._chain_of(window)
               else picking.pick(window.surface, rx, ry))
        if hit is None:
            self.pointer.set_focus(None)
            return
        surface, sx, sy = hit
        if surface is self.pointer.focus and surface.alive:
            self.pointer.motion_to(sx, sy, time_ms)
        else:
            self.pointer.set_focus(surface, sx, sy)

    def _chain_of(self, window: Window) -> bool:
        """Whether ``window``'s client holds the popup grab: the pointer then goes to
        whichever of its surfaces is under it, held buttons or not (the popup grab
        replaces the implicit one, so that a menu opened by a press takes the release)."""
        return bool(self.popup_chain) and self.popup_chain[0].client is window.client

    def _local(self, window: Window, rx: float, ry: float,
               surface: Surface) -> tuple[float, float]:
        """Root point (rx, ry) of ``window`` in ``surface``'s coordinates (the surface
        may be in another window: through the windows' places on the screen)."""
        origin = picking.origin_in_root(surface) or (0, 0)
        target = window_of(surface)
        if target is not None and target is not window:
            shell = self.compositor.shell
            here = shell.window_origin(window.shell_window)
            there = shell.window_origin(target.shell_window)
            if here is not None and there is not None:
                g, tg = window.shell_window.geometry, target.shell_window.geometry
                rx = here[0] + rx - g.x - there[0] + tg.x
                ry = here[1] + ry - g.y - there[1] + tg.y
        return rx - origin[0], ry - origin[1]

    def _grab_pick(self, window: Window, rx: float, ry: float) -> Hit | None:
        """The surface under the pointer during a grab (a drag): ``window``'s, else one
        of the same client's other windows under that screen point."""
        return self._client_pick(window, rx, ry, popups_first=False)

    def _client_pick(self, window: Window, rx: float, ry: float, *,
                     popups_first: bool) -> Hit | None:
        """The surface under root point (rx, ry) of ``window`` among the mapped windows
        of its client, placed on the screen by ``Shell.window_origin``: popups (the
        newest first) before or after ``window`` itself, then its other windows."""
        shell = self.compositor.shell
        popups = [o for o in reversed(window.client.windows)
                  if isinstance(o, Popup) and o.mapped and o is not window]
        rest = [o for o in window.client.windows
                if not isinstance(o, Popup) and o.mapped and o is not window]
        order = [*popups, window, *rest] if popups_first else [window, *popups, *rest]
        here = shell.window_origin(window.shell_window)
        g = window.shell_window.geometry
        for other in order:
            if other is window:
                hit = picking.pick(window.surface, rx, ry)
            else:
                there = shell.window_origin(other.shell_window)
                if here is None or there is None:
                    continue
                og = other.shell_window.geometry
                hit = picking.pick(other.surface, here[0] + rx - g.x - there[0] + og.x,
                                   here[1] + ry - g.y - there[1] + og.y)
            if hit is not None:
                return hit
        return None


# -- requests -------------------------------------------------------------------


def _seat(client: ClientCore, obj: WaylandObject) -> Seat:
    return client.resource(obj.id, SeatResource).seat


def get_pointer(client: ClientCore, obj: WaylandObject, args: list[ArgValue],
                fds: list[int]) -> None:
    new_id = args[0]
    assert isinstance(new_id, int)
    _seat(client, obj).pointer.add(client, new_id)


def get_keyboard(client: ClientCore, obj: WaylandObject, args: list[ArgValue],
                 fds: list[int]) -> None:
    new_id = args[0]
    assert isinstance(new_id, int)
    _seat(client, obj).keyboard.add(client, new_id)


def get_touch(client: ClientCore, obj: WaylandObject, args: list[ArgValue],
              fds: list[int]) -> None:
    raise WireError(f"wl_seat@{obj.id}.get_touch: {SEAT_NAME} has never had the touch "
                    "capability", MISSING_CAPABILITY, obj.id)


HANDLERS: dict[tuple[str, str], Handler] = {
    ("wl_seat", "get_pointer"): get_pointer,
    ("wl_seat", "get_keyboard"): get_keyboard,
    ("wl_seat", "get_touch"): get_touch,
}
