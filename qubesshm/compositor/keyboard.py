"""``wl_keyboard``: the seat's keyboard, its focus, keys and modifiers.

Every ``wl_keyboard`` a client makes gets the keymap (a read-only descriptor of
the sealed memfd, format xkb_v1) and, from version 4, the repeat rate and delay;
if the client has the focus, ``enter`` and ``modifiers`` follow at once. Focus
changes send ``leave`` to the old surface and ``enter`` (with the keys held)
then ``modifiers`` to the new one. A key goes to the focused client's keyboards
as ``key``, followed by ``modifiers`` when it changed the serialized state, as
libwayland compositors do. The state is tracked whether or not a surface has
the focus, so modifiers held when focus arrives are right.
"""

from __future__ import annotations

import os
import struct
from typing import TYPE_CHECKING

from ..objects.objectmap import WaylandObject
from ..wire.codec import ArgValue
from .devices import DeviceObjects
from .keymap import Keymap, KeyState, Modifiers

if TYPE_CHECKING:
    from .client import ClientCore, Handler
    from .surfaces import Surface

KEYMAP_FORMAT_XKB_V1 = 1
KEY_RELEASED = 0
KEY_PRESSED = 1
# Characters per second, and milliseconds before the first repeat: what tinywl (wlroots'
# reference compositor) and sway send by default; X's own default is 25/s after 660 ms.
REPEAT_RATE = 25
REPEAT_DELAY = 600


class KeyboardResource:
    """A ``wl_keyboard`` object."""

    def __init__(self, keyboard: Keyboard) -> None:
        self.keyboard = keyboard


class Keyboard(DeviceObjects):
    """The seat's one keyboard, and every client's ``wl_keyboard`` objects of it."""

    def __init__(self, keymap: Keymap) -> None:
        self.keymap = keymap
        self.state: KeyState = keymap.state()
        super().__init__()
        self._sent_mods: Modifiers = self.state.modifiers()

    # -- objects ---------------------------------------------------------------

    def add(self, client: ClientCore, object_id: int) -> None:
        client.resources[object_id] = KeyboardResource(self)
        self.track(client, object_id)
        self._send_keymap(client, object_id)
        client.send(object_id, "repeat_info", REPEAT_RATE, REPEAT_DELAY)
        focus = self.focus
        if focus is not None and focus.client is client and focus.alive:
            serial = client.compositor.next_serial()
            client.send(object_id, "enter", serial, focus.id, self._keys())
            client.send(object_id, "modifiers", serial, *self.state.modifiers())

    def _send_keymap(self, client: ClientCore, object_id: int) -> None:
        fd = self.keymap.fd()
        if not client.send(object_id, "keymap", KEYMAP_FORMAT_XKB_V1, fd, self.keymap.size):
            os.close(fd)


    # -- state -----------------------------------------------------------------

    def _keys(self) -> bytes:
        held = self.state.held
        return struct.pack(f"={len(held)}I", *held)

    def set_keymap(self, keymap: Keymap) -> None:
        held = list(self.state.held)
        self.keymap = keymap
        self.state = KeyState(keymap, tuple(held))
        for client in list(self.resources):
            for object_id in self.live(client):
                self._send_keymap(client, object_id)
        self._send_modifiers()

    def reset(self, pressed: tuple[int, ...]) -> None:
        """The keys held are ``pressed`` (those held when focus came from elsewhere)."""
        self.state = KeyState(self.keymap, pressed)

    def resend_state(self) -> None:
        """The state was reset with the focus unchanged: modifiers, if they differ."""
        self._send_modifiers()

    def set_focus(self, surface: Surface | None) -> None:
        """Move the focus; ``enter`` carries the keys held now."""
        old = self.focus
        if old is surface:
            return
        if old is not None and old.alive and not old.client.closed:
            client = old.client
            serial = client.compositor.next_serial()
            for object_id in self.live(client):
                client.send(object_id, "leave", serial, old.id)
        self.focus = surface
        if surface is None or surface.client.closed:
            return
        client = surface.client
        serial = client.compositor.next_serial()
        mods = self.state.modifiers()
        keys = self._keys()
        for object_id in self.live(client):
            client.send(object_id, "enter", serial, surface.id, keys)
            client.send(object_id, "modifiers", serial, *mods)
        self._sent_mods = mods

    def key(self, code: int, pressed: bool, time_ms: int) -> tuple[ClientCore, int] | None:
        """A key went down or up: (client, serial) of the ``key`` event sent, if any.
        A press of a key already down, or a release of one not down, is dropped."""
        changed = self.state.press(code) if pressed else self.state.release(code)
        if not changed:
            return None
        focus = self.focus
        sent: tuple[ClientCore, int] | None = None
        if focus is not None and focus.alive and not focus.client.closed:
            client = focus.client
            serial = client.compositor.next_serial()
            state = KEY_PRESSED if pressed else KEY_RELEASED
            for object_id in self.live(client):
                client.send(object_id, "key", serial, time_ms & 0xFFFFFFFF, code, state)
            sent = (client, serial)
        self._send_modifiers()
        return sent

    def _send_modifiers(self) -> None:
        mods = self.state.modifiers()
        if mods == self._sent_mods:
            return
        self._sent_mods = mods
        focus = self.focus
        if focus is None or not focus.alive or focus.client.closed:
            return
        client = focus.client
        serial = client.compositor.next_serial()
        for object_id in self.live(client):
            client.send(object_id, "modifiers", serial, *mods)


# -- requests -------------------------------------------------------------------


def release_keyboard(client: ClientCore, obj: WaylandObject, args: list[ArgValue],
                     fds: list[int]) -> None:
    resource = client.resource(obj.id, KeyboardResource)
    resource.keyboard.remove(client, obj.id)


HANDLERS: dict[tuple[str, str], Handler] = {
    ("wl_keyboard", "release"): release_keyboard,
}
