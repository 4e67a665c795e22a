"""A sans-IO model of the Qubes GUI daemon (qubes-guid), as ``gui-daemon/xside.c`` behaves.

``GuiDaemon`` takes the agent's bytes, X events and the time, and answers with
*actions*: bytes for the agent, dumps to map or let go of, and X operations. It does
no I/O and reads no clock; ``main.py`` carries the actions out, in order.

What it reproduces, from the daemon's source (facts, not code):

- The handshake: the agent's version, the answer ``1.min(agent minor, ours)`` (only
  from 1.4 on: below that the daemon sends no version, just its screen), then
  ``msg_xconf`` of the X root (width rounded up to 8). A major version that differs
  ends the daemon.
- Every message checked as the daemon does (``guiproto``'s ``DaemonDecoder`` with
  ``DaemonChecks``); a fault ends it with status 1 and one line. A "Verify failed",
  about which qubes-guid asks the user whether to kill the VM, ends the emulator too
  unless ``verify_exits`` is off (its user is a test: a message qubes-guid would
  question is a bug in the agent).
- Windows: created at the clamped position and size; ``override_redirect`` refused to
  a window larger than 90% of the work area; override-redirect windows kept on the
  work area; a 2-pixel frame in the label colour drawn inside override-redirect
  windows; ``WMCLASS`` ignored on a mapped window; ``CONFIGURE`` handshakes with
  ``have_queued_configure``.
- Dumps: on ``WINDOW_DUMP`` the window's previous dump is let go (X ``ShmDetach``, no
  sync), the new one mapped read-only, attached, the X server synced, and one
  ``WINDOW_DUMP_ACK`` written (1.7+). ``UNMAP`` (except of window 0) and ``DESTROY`` let
  go too; ``DESTROY`` writes its echo (1.5+) right after, with no sync. ``SHMIMAGE`` and
  Expose put the rectangle, clipped to the dump, on screen.

- Input (``x_input``): what the daemon's ``process_xevent_*`` write for X events on its
  windows, field for field (see ``x_input``); the clipboard keys (Ctrl+Shift+C: the
  agent is asked for its clipboard; Ctrl+Shift+V: the clipboard file's text is sent);
  the agent's ``CLIPBOARD_DATA`` kept only when asked for, as ``ClipboardStore``.

What the emulator adds: ``hold`` keeps a let-go dump mapped that many seconds longer
(a slow daemon: its ACKs, which mean that the X server let go of every dump let go
before, wait as long, and whatever it writes after them); ``ack_delay`` holds each
ACK back that long (and, since the daemon writes in one stream, whatever it writes
after it). A let-go dump's mapping ends at
the latest moment the real daemon allows: just before the next ACK (the daemon's sync
with the X server), or when ``tick`` runs after the batch of messages that let it go
(the X server carrying out the detach "soon"); never before its hold has passed.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from qubesshm.emulator import events as ev
from qubesshm.emulator.clipboard import Metadata
from qubesshm.guiproto import codec, handshake
from qubesshm.guiproto import messages as gm
from qubesshm.guiproto.checks import DaemonChecks
from qubesshm.pixels.region import Rect as Rect  # the rectangles of its actions

log = logging.getLogger("qubesshm.emulator")

BORDER_WIDTH = 2  # the frame qubes-guid draws inside override-redirect windows
MAX_OVERRIDE_REDIRECT_PERCENTAGE = 90
OVERRIDE_REDIRECT_PADDING = 0
X_INCREMENT = 8  # the daemon rounds the root width up to a multiple of this
MIN_VERSION_SUPPORTED = gm.make_version(1, 3)  # what --version accepts (1.3: too old)

# _NET_WM_STATE atoms the daemon sets or asks for
STATE_FULLSCREEN = "_NET_WM_STATE_FULLSCREEN"
STATE_MAXIMIZED_VERT = "_NET_WM_STATE_MAXIMIZED_VERT"
STATE_MAXIMIZED_HORZ = "_NET_WM_STATE_MAXIMIZED_HORZ"
STATE_DEMANDS_ATTENTION = "_NET_WM_STATE_DEMANDS_ATTENTION"
STATE_HIDDEN = "_NET_WM_STATE_HIDDEN"
WM_STATES = (STATE_FULLSCREEN, STATE_MAXIMIZED_VERT, STATE_MAXIMIZED_HORZ,
             STATE_DEMANDS_ATTENTION, STATE_HIDDEN)

# The clipboard keys: the modifiers the daemon compares (Num Lock, Mod2, and Caps Lock
# are left out), and its default sequences, Ctrl+Shift+C and Ctrl+Shift+V.
SPECIAL_KEYS_MASK = (ev.MOD1_MASK | ev.MOD3_MASK | ev.MOD4_MASK | ev.SHIFT_MASK
                     | ev.CONTROL_MASK)
COPY_MASK = PASTE_MASK = ev.CONTROL_MASK | ev.SHIFT_MASK
COPY_KEYSYM, PASTE_KEYSYM = 0x63, 0x76  # XK_c, XK_v


# -- values shared with the X side --------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SizeHints:
    """WM_NORMAL_HINTS as the daemon passes them on (only the sane values, by flag)."""

    flags: int
    min_width: int = 0
    min_height: int = 0
    max_width: int = 0
    max_height: int = 0
    width_inc: int = 0
    height_inc: int = 0
    base_width: int = 0
    base_height: int = 0


def x_geometry(rect: Rect) -> Rect:
    """What an X server is asked for ``rect``: X has no empty windows and 16-bit positions."""
    return Rect(max(-32768, min(32767, rect.x)), max(-32768, min(32767, rect.y)),
                max(1, rect.width), max(1, rect.height))


@dataclass(frozen=True, slots=True)
class Screen:
    """The X screen the daemon runs on."""

    width: int
    height: int
    depth: int = 24
    work_area: Rect | None = None  # None: the whole root window

    @property
    def work(self) -> Rect:
        return self.work_area or Rect(0, 0, self.root_width, self.height)

    @property
    def root_width(self) -> int:
        return round_width(self.width)


def round_width(width: int) -> int:
    return (width + X_INCREMENT - 1) // X_INCREMENT * X_INCREMENT


@dataclass(frozen=True, slots=True)
class Settings:
    screen: Screen
    version: int = gm.VERSION  # the daemon's own protocol version (the most it agrees to)
    hold: float = 0.0
    ack_delay: float = 0.0
    vm_name: str = "vm"
    domid: int = 0
    allow_utf8_titles: bool = False
    prefix_titles: bool = False
    override_redirect_protection: bool = True
    allow_fullscreen: bool = False
    # A "Verify failed" check (qubes-guid asks the user whether to kill the VM): end the
    # emulator (True), or log it and drop the message as qubes-guid does when the user
    # lets the VM go on.
    verify_exits: bool = True
    # The VM's clipboard limit (guid.conf's clipboard_buffer_size): longer data from the
    # agent empties the clipboard instead.
    clipboard_buffer_size: int = gm.DEFAULT_CLIPBOARD_BUFFER_SIZE


# -- actions --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Send:
    """Write these bytes to the agent."""

    data: bytes


@dataclass(frozen=True, slots=True)
class MapDump:
    """Map ``refs`` of the agent's domain read-only and attach them to the X server (as
    ``dump``), then sync with it. A failure to map ends the daemon."""

    dump: int
    window: int
    refs: tuple[int, ...]
    width: int
    height: int


@dataclass(frozen=True, slots=True)
class Detach:
    """The X server lets go of ``dump`` (``ShmDetach``, no sync)."""

    dump: int


@dataclass(frozen=True, slots=True)
class Unmap:
    """The daemon's domain stops mapping ``dump``'s grants."""

    dump: int


@dataclass(frozen=True, slots=True)
class CreateWindow:
    window: int
    rect: Rect
    override_redirect: bool


@dataclass(frozen=True, slots=True)
class DestroyWindow:
    window: int


@dataclass(frozen=True, slots=True)
class MapWindow:
    window: int
    raise_window: bool


@dataclass(frozen=True, slots=True)
class UnmapWindow:
    window: int


@dataclass(frozen=True, slots=True)
class MoveResize:
    window: int
    rect: Rect


@dataclass(frozen=True, slots=True)
class SetOverrideRedirect:
    """Change the attribute; ``remap``: the window is mapped, unmap it around the change."""

    window: int
    value: bool
    remap: bool


@dataclass(frozen=True, slots=True)
class SetName:
    window: int
    name: bytes


@dataclass(frozen=True, slots=True)
class SetClass:
    window: int
    res_class: bytes
    res_name: bytes


@dataclass(frozen=True, slots=True)
class SetSizeHints:
    window: int
    hints: SizeHints


@dataclass(frozen=True, slots=True)
class SetTransientFor:
    window: int
    parent: int | None


@dataclass(frozen=True, slots=True)
class SetWmState:
    """_NET_WM_STATE of an unmapped window (empty: deleted)."""

    window: int
    states: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class RequestWmState:
    """Ask the window manager to add or remove states of a mapped window."""

    window: int
    add: bool
    first: str
    second: str | None = None


@dataclass(frozen=True, slots=True)
class Iconify:
    window: int


@dataclass(frozen=True, slots=True)
class SetCursor:
    window: int
    glyph: int | None  # an X cursor font glyph; None: the default


@dataclass(frozen=True, slots=True)
class Put:
    """Put ``rect`` of ``dump`` (``image_width`` x ``image_height``) at the same place of
    the window."""

    window: int
    dump: int
    image_width: int
    image_height: int
    rect: Rect


@dataclass(frozen=True, slots=True)
class Frame:
    window: int
    width: int
    height: int
    border: int


@dataclass(frozen=True, slots=True)
class Fill:
    """A window too small for more than its frame: all frame colour."""

    window: int
    width: int
    height: int


@dataclass(frozen=True, slots=True)
class SetUserTime:
    """``_NET_WM_USER_TIME`` of the window: the X time of the user's last key or button."""

    window: int
    time: int


@dataclass(frozen=True, slots=True)
class ClipboardStore:
    """Keep the agent's clipboard text (the copy's X time is in ``metadata``); the
    executor tells ``clipboard_stored`` unless the clipboard discarded it."""

    data: bytes
    metadata: Metadata


@dataclass(frozen=True, slots=True)
class ClipboardClear:
    """Empty the clipboard, recording ``metadata``."""

    metadata: Metadata


@dataclass(frozen=True, slots=True)
class ClipboardPaste:
    """Take the clipboard's text for a paste at X time ``time`` into ``window``, and hand
    it to ``clipboard_paste``."""

    window: int
    time: int
    metadata: Metadata


@dataclass(frozen=True, slots=True)
class Exit:
    """The daemon ends with ``status``; ``message`` is its line on stderr (or empty)."""

    status: int
    message: str


Action = (Send | MapDump | Detach | Unmap | CreateWindow | DestroyWindow | MapWindow
          | UnmapWindow | MoveResize | SetOverrideRedirect | SetName | SetClass | SetSizeHints
          | SetTransientFor | SetWmState | RequestWmState | Iconify | SetCursor | Put | Frame
          | Fill | SetUserTime | ClipboardStore | ClipboardClear | ClipboardPaste | Exit)


class Fault(Exception):
    """The daemon would exit 1 with this line."""


# -- the model ------------------------------------------------------------------------------


@dataclass(eq=False)
class _Dump:
    id: int
    window: int
    width: int
    height: int


@dataclass(eq=False)
class _Window:
    id: int
    x: int
    y: int
    width: int
    height: int
    override_redirect: bool
    is_mapped: bool = False
    is_docked: bool = False
    transient_for: int | None = None
    dump: _Dump | None = None
    have_queued_configure: bool = False
    flags_set: int = 0
    fullscreen_maximize_requested: bool = False
    # Geometries asked of the X server whose ConfigureNotify may still come.
    requested: deque[Rect] = field(default_factory=lambda: deque(maxlen=32))

    @property
    def rect(self) -> Rect:
        return Rect(self.x, self.y, self.width, self.height)


@dataclass
class Counters:
    messages: int = 0
    dumps: int = 0
    acks: int = 0
    echoes: int = 0
    let_go: int = 0
    unmapped: int = 0
    ack_order: list[int] = field(default_factory=list)  # window of each ACK, in order


class GuiDaemon:
    """qubes-guid's behaviour towards one agent, without I/O."""

    def __init__(self, settings: Settings) -> None:
        if not MIN_VERSION_SUPPORTED <= settings.version <= gm.VERSION:
            raise ValueError(f"protocol version {gm.version_text(settings.version)} is not "
                             f"one the emulator speaks (1.3 to {gm.version_text(gm.VERSION)})")
        self.settings = settings
        self.version: int | None = None  # negotiated
        self.counters = Counters()
        self.finished: Exit | None = None
        screen = settings.screen
        self._handshake = handshake.DaemonHandshake(
            gm.Xconf.for_screen(screen.width, screen.height, screen.depth), settings.version,
            settings.vm_name)
        self._decoder: codec.DaemonDecoder | None = None
        self._windows: dict[int, _Window] = {}
        self._next_dump = 1
        self._outbox: deque[tuple[float, bytes, int | None]] = deque()  # due, bytes, ACK window
        self._letting_go: deque[tuple[float, int]] = deque()  # not before, dump id
        self._dumps: dict[int, _Dump] = {}  # every dump still mapped (current or let go)
        self._copy_keycode = 0  # XKeysymToKeycode of the clipboard keys (0: none)
        self._paste_keycode = 0
        self._clipboard_requested = False
        self._clipboard_time = 0  # the X time of the last copy

    # -- inputs -----------------------------------------------------------------------

    def receive(self, data: bytes, now: float) -> list[Action]:
        """Bytes from the agent."""
        actions: list[Action] = []
        if self.finished is not None:
            return actions
        try:
            if self._decoder is None:
                data = self._shake(data, actions)
                if self._decoder is None:
                    return actions
            while True:
                try:
                    messages = self._decoder.feed(data)
                except codec.ProtocolViolation as exc:
                    self._handle_all(exc.before, now, actions)
                    if exc.fatal or self.settings.verify_exits:
                        raise
                    log.warning("%s (the message is dropped)", _one_line(exc))
                    data = b""
                    continue
                self._handle_all(messages, now, actions)
                break
            self._warn()
        except codec.ProtocolViolation as exc:
            self._warn()
            self._fail(_one_line(exc), actions)
        except Fault as exc:
            self._fail(str(exc), actions)
        return actions

    def _handle_all(self, messages: Sequence[gm.Message], now: float,
                    actions: list[Action]) -> None:
        for message in messages:
            self._handle(message, now, actions)
            self._flush(now, actions)

    def _warn(self) -> None:
        if self._decoder is not None and self._decoder.warnings:
            for line in self._decoder.warnings:
                log.warning("%s", line)
            self._decoder.warnings.clear()

    def expose(self, window: int, rect: Rect, now: float) -> list[Action]:
        """An X Expose on a window: put that part again from the dump."""
        actions: list[Action] = []
        found = self._windows.get(window)
        if found is not None and self.finished is None:
            self._update(found, rect.x, rect.y, rect.width, rect.height, actions)
        return actions

    def configured(self, window: int, rect: Rect, now: float) -> list[Action]:
        """An X ConfigureNotify (root coordinates): someone moved or resized the window;
        the agent hears of it unless it has not answered the previous one."""
        actions: list[Action] = []
        found = self._windows.get(window)
        if found is None or self.finished is not None:
            return actions
        if rect in found.requested:
            # Our own request carried out (the daemon would race with itself here).
            while found.requested.popleft() != rect:
                pass
            return actions
        if rect == x_geometry(found.rect):
            return actions
        found.x, found.y, found.width, found.height = rect.x, rect.y, rect.width, rect.height
        if found.override_redirect and self._force_on_screen(found):
            self._move(found, actions)
        if found.have_queued_configure:
            return actions
        if found.id != gm.FULLSCREEN_WINDOW_ID:
            found.have_queued_configure = True
        self._queue(now, codec.encode(found.id, gm.Configure(found.x, found.y, found.width,
                                                              found.height, 0)))
        self._flush(now, actions)
        return actions

    def tick(self, now: float) -> list[Action]:
        """Time passes: delayed writes that are due, let-go dumps whose mapping ends."""
        actions: list[Action] = []
        if self.finished is None:
            self._release_due(now, actions)
            self._flush(now, actions)
        return actions

    def next_deadline(self) -> float | None:
        """When ``tick`` next has something to do (None: nothing is waiting)."""
        if self.finished is not None:
            return None
        times = []
        if self._letting_go:
            times.append(self._letting_go[0][0])
        if self._outbox:
            times.append(self._outbox[0][0])
        return min(times) if times else None

    # -- input from the X server ---------------------------------------------------------

    def keyboard_mapped(self, copy_keycode: int, paste_keycode: int) -> None:
        """The key codes of the clipboard keys' keysyms in the X server's mapping now."""
        self._copy_keycode, self._paste_keycode = copy_keycode, paste_keycode

    def x_input(self, event: ev.Input, now: float) -> list[Action]:
        """An input event on one of the windows: what the daemon sends the agent.

        Events of X windows that are not the daemon's are dropped
        (``CHECK_NONMANAGED_WINDOW``); nothing else is filtered by window kind
        (override-redirect windows get input as others) or by repetition (X's
        auto-repeat presses reach the agent as X reports them)."""
        actions: list[Action] = []
        window = self._windows.get(event.window)
        if window is None or self.finished is not None or self.version is None:
            return actions
        match event:
            case ev.Key():
                self._key(window, event, now, actions)
            case ev.Button():
                # process_xevent_button (a docked window would take the focus too; the
                # emulator has no tray, so docked windows never show)
                actions.append(SetUserTime(window.id, event.time))
                self._send(now, window.id, gm.Button(event.type, event.x, event.y, event.state,
                                                     event.button))
            case ev.Motion():
                self._send(now, window.id, gm.Motion(event.x, event.y, event.state,
                                                     event.is_hint))
            case ev.Crossing():
                # process_xevent_crossing: an enter first says which keys are down
                if event.type == ev.ENTER_NOTIFY:
                    self._send(now, 0, gm.KeymapNotify(event.keys))
                self._send(now, window.id, gm.Crossing(event.type, event.x, event.y,
                                                       event.state, event.mode, event.detail,
                                                       event.focus))
            case ev.Focus():
                # process_xevent_focus: grabs (a window manager's task switcher) are not
                # the VM's business; WhileGrabbed is told as Normal.
                if event.mode not in (ev.NOTIFY_NORMAL, ev.NOTIFY_WHILE_GRABBED):
                    return actions
                if event.type == ev.FOCUS_IN:
                    self._send(now, 0, gm.KeymapNotify(event.keys))
                self._send(now, window.id, gm.Focus(event.type, ev.NOTIFY_NORMAL,
                                                    event.detail))
            case ev.DeleteRequest():
                self._send(now, window.id, gm.Close())  # process_xevent_close
            case ev.WmStateChanged():
                self._wm_state(window, event.states, now)
            case ev.MapNotified():
                self._map_notified(window, event, now, actions)
        self._flush(now, actions)
        return actions

    def _send(self, now: float, window: int, body: gm.Body) -> None:
        """One message to the agent, behind whatever is waiting (one stream)."""
        self._queue(now, codec.encode(window, body))

    def _key(self, window: _Window, event: ev.Key, now: float, actions: list[Action]) -> None:
        """process_xevent_keypress with is_special_keypress: the clipboard keys' press
        does the clipboard's work and neither it nor its release reaches the agent."""
        actions.append(SetUserTime(window.id, event.time))
        modifiers = event.state & SPECIAL_KEYS_MASK
        if modifiers == COPY_MASK and event.keycode == self._copy_keycode:
            if event.type == ev.KEY_PRESS:
                self._clipboard_time = event.time
                self._clipboard_requested = True
                self._send(now, window.id, gm.ClipboardReq())
            return
        if modifiers == PASTE_MASK and event.keycode == self._paste_keycode:
            if event.type == ev.KEY_PRESS:
                actions.append(ClipboardPaste(window.id, event.time,
                                              self._clipboard_metadata(paste_action=True)))
            return
        self._send(now, window.id, gm.Keypress(event.type, event.x, event.y, event.state,
                                               event.keycode))

    def _wm_state(self, window: _Window, states: tuple[str, ...] | None, now: float) -> None:
        """process_xevent_propertynotify of _NET_WM_STATE on a mapped window: the flags
        that changed, as WINDOW_FLAGS; a maximize the daemon asked for in place of a
        fullscreen counts as fullscreen."""
        if not window.is_mapped:
            return
        flags = 0
        if states is not None:
            names = set(states)
            if STATE_FULLSCREEN in names:
                flags |= gm.WINDOW_FLAG_FULLSCREEN
            if STATE_DEMANDS_ATTENTION in names:
                flags |= gm.WINDOW_FLAG_DEMANDS_ATTENTION
            if STATE_HIDDEN in names:
                flags |= gm.WINDOW_FLAG_MINIMIZE
            if flags & gm.WINDOW_FLAG_FULLSCREEN:
                window.fullscreen_maximize_requested = False
            if window.fullscreen_maximize_requested:
                if {STATE_MAXIMIZED_VERT, STATE_MAXIMIZED_HORZ} <= names:
                    flags |= gm.WINDOW_FLAG_FULLSCREEN
                else:
                    window.fullscreen_maximize_requested = False
        if flags == window.flags_set:
            return
        self._send(now, window.id, gm.WindowFlags(flags & ~window.flags_set,
                                                  ~flags & window.flags_set & 0xFFFFFFFF))
        window.flags_set = flags

    def _map_notified(self, window: _Window, event: ev.MapNotified, now: float,
                      actions: list[Action]) -> None:
        """process_xevent_mapnotify: someone else mapped a window the VM has not (a
        window manager): undone if it is not viewable, else the agent is told MAP."""
        if window.is_mapped:
            return
        if not event.viewable and not window.is_docked:
            actions.append(UnmapWindow(window.id))
            return
        # The daemon leaves transient_for unset (whatever its stack held): 0 here.
        self._send(now, window.id, gm.Map(0, int(event.override_redirect)))

    # -- the clipboard -------------------------------------------------------------------

    def _clipboard_metadata(self, **values: Any) -> Metadata:
        assert self.version is not None
        base = Metadata(vmname=self.settings.vm_name, xevent_timestamp=self._clipboard_time,
                        buffer_size=self.settings.clipboard_buffer_size,
                        protocol_version_xside=self.settings.version,
                        protocol_version_vmside=self.version)
        return replace(base, **values)

    def _clipboard_data(self, body: gm.ClipboardData, actions: list[Action]) -> None:
        """handle_clipboard_data (its length already checked by the decoder)."""
        size = len(body.data)
        if not self._clipboard_requested:
            log.warning("received clipboard data when not requested")
            return
        if size > self.settings.clipboard_buffer_size:
            log.info("clipboard data len %d exceeds VM's allowed!", size)
            actions.append(ClipboardClear(self._clipboard_metadata(
                copy_action=True, sent_size=size, oversized_request=True)))
            return
        if size == 0:  # the VM's clipboard is empty
            actions.append(ClipboardClear(self._clipboard_metadata(
                copy_action=True, successful=True)))
            return
        actions.append(ClipboardStore(body.data, self._clipboard_metadata(
            copy_action=True, sent_size=size)))

    def clipboard_stored(self) -> None:
        """The clipboard kept the agent's text (or failed writing it): the request is
        answered. (Data it discarded, empty or too long leaves the request open.)"""
        self._clipboard_requested = False

    def clipboard_paste(self, window: int, data: bytes, now: float) -> list[Action]:
        """The clipboard's text for a paste into ``window``: sent unless empty."""
        actions: list[Action] = []
        if data and self.finished is None and window in self._windows:
            self._send(now, window, gm.ClipboardData(data))
            self._flush(now, actions)
        return actions

    def hang_up(self) -> list[Action]:
        """The agent went away: every dump is let go and unmapped; the daemon ends (0)."""
        actions: list[Action] = []
        for window in self._windows.values():
            if window.dump is not None:
                actions.append(Detach(window.dump.id))
                self._letting_go.append((0.0, window.dump.id))
                window.dump = None
        while self._letting_go:
            _, dump = self._letting_go.popleft()
            self._unmap(dump, actions)
        self._outbox.clear()
        if self.finished is None:
            self.finished = Exit(0, "")
            actions.append(self.finished)
        return actions

    # -- what the model holds, for tests and stats ---------------------------------------

    @property
    def mapped_dumps(self) -> frozenset[int]:
        """Dumps whose grants the daemon's domain maps now."""
        return frozenset(self._dumps)

    def window(self, window: int) -> _Window | None:
        return self._windows.get(window)

    # -- handshake -------------------------------------------------------------------------

    def _shake(self, data: bytes, actions: list[Action]) -> bytes:
        """The agent's version in, ours and the screen out; the rest is messages."""
        result = self._handshake.feed(data)
        if result is None:
            return b""
        self.version = result.version
        actions.append(Send(self._handshake.reply))
        checks = DaemonChecks(result.version, in_dom0=False, vm_name=self.settings.vm_name,
                              domid=self.settings.domid)
        self._decoder = codec.DaemonDecoder(result.version, checks)
        return result.leftover

    # -- messages ----------------------------------------------------------------------------

    def _handle(self, message: gm.Message, now: float, actions: list[Action]) -> None:
        """One message the checks let through."""
        self.counters.messages += 1
        body = message.body
        if isinstance(body, gm.ClipboardData):
            self._clipboard_data(body, actions)
            return
        if isinstance(body, gm.Create):
            self._create(message.window, body, actions)
            return
        window = self._windows.get(message.window)
        if window is None:  # the checks end the daemon first; a VERIFY-ignored CREATE
            raise Fault(f"msg 0x{int(message.type):x} without CREATE for "
                        f"0x{message.window:x}")
        if isinstance(body, gm.Destroy):
            self._destroy(window, now, actions)
        elif isinstance(body, gm.Map):
            self._map(window, body, actions)
        elif isinstance(body, gm.Unmap):
            if window.is_docked:
                return
            window.is_mapped = False
            actions.append(UnmapWindow(window.id))
            if window.id != gm.FULLSCREEN_WINDOW_ID:
                self._let_go(window, now, actions)
        elif isinstance(body, gm.Configure):
            self._configure(window, body, now, actions)
        elif isinstance(body, gm.MfnDump):  # the checks refuse it outside dom0
            raise Fault("MSG_MFNDUMP is not supported by the emulator")
        elif isinstance(body, gm.ShmImage):
            if window.is_mapped and not window.is_docked:
                self._update(window, _i32(body.x), _i32(body.y), _i32(body.width),
                             _i32(body.height), actions)
        elif isinstance(body, gm.WmName):
            actions.append(SetName(window.id, self._title(body.name)))
        elif isinstance(body, gm.WmClass):
            if window.is_mapped:
                log.info("cannot set the class of mapped window 0x%x", window.id)
                return
            vm = self.settings.vm_name.encode()
            actions.append(SetClass(window.id, vm + b":" + _sanitize(body.res_class, False),
                                    vm + b":" + _sanitize(body.res_name, False)))
        elif isinstance(body, gm.Dock):
            self._dock(window, actions)
        elif isinstance(body, gm.WindowHints):
            actions.append(SetSizeHints(window.id, _hints(body)))
        elif isinstance(body, gm.WindowFlags):
            self._flags(window, body, actions)
        elif isinstance(body, gm.WindowDump):
            self._dump(window, body, now, actions)
        elif isinstance(body, gm.Cursor):
            actions.append(SetCursor(window.id, _cursor(body.cursor)))
        else:
            raise Fault(f"got unknown msg type {int(message.type)}")

    def _create(self, window_id: int, body: gm.Create, actions: list[Action]) -> None:
        width = min(body.width, gm.MAX_WINDOW_WIDTH)
        height = min(body.height, gm.MAX_WINDOW_HEIGHT)
        window = _Window(window_id, _clamp(body.x, gm.MAX_WINDOW_WIDTH),
                         _clamp(body.y, gm.MAX_WINDOW_HEIGHT), width, height, False)
        window.override_redirect = self._allowed_override_redirect(
            window, bool(body.override_redirect))
        self._windows[window_id] = window
        actions.append(CreateWindow(window_id, window.rect, window.override_redirect))
        window.requested.append(x_geometry(window.rect))
        if window.override_redirect and self._force_on_screen(window):
            self._move(window, actions)

    def _destroy(self, window: _Window, now: float, actions: list[Action]) -> None:
        for other in self._windows.values():
            if other.transient_for == window.id:
                other.transient_for = None
        actions.append(DestroyWindow(window.id))
        self._let_go(window, now, actions)
        del self._windows[window.id]
        assert self.version is not None
        if self.version >= gm.MIN_DESTROY_ECHO:
            self._queue(now, codec.encode(window.id, gm.Destroy()))
            self.counters.echoes += 1

    def _map(self, window: _Window, body: gm.Map, actions: list[Action]) -> None:
        if window.is_mapped or window.is_docked:
            return
        parent = self._windows.get(body.transient_for) if body.transient_for else None
        if parent is not None:
            window.transient_for = parent.id
            actions.append(SetTransientFor(window.id, parent.id))
        else:
            if window.transient_for is not None:
                actions.append(SetTransientFor(window.id, None))
            window.transient_for = None
        window.override_redirect = self._allowed_override_redirect(
            window, bool(body.override_redirect))
        actions.append(SetOverrideRedirect(window.id, window.override_redirect, False))
        if window.override_redirect and self._force_on_screen(window):
            self._move(window, actions)
        if window.override_redirect:
            self._update(window, 0, 0, window.width, window.height, actions)
        window.is_mapped = True
        actions.append(MapWindow(window.id, window.override_redirect))

    def _configure(self, window: _Window, body: gm.Configure, now: float,
                   actions: list[Action]) -> None:
        width = min(body.width, gm.MAX_WINDOW_WIDTH)
        height = min(body.height, gm.MAX_WINDOW_HEIGHT)
        x = _clamp(body.x, gm.MAX_WINDOW_WIDTH)
        y = _clamp(body.y, gm.MAX_WINDOW_HEIGHT)
        changed = (window.x, window.y, window.width, window.height) != (x, y, width, height)
        if window.is_docked:
            if changed:
                self._send_configure(window, now)
            window.have_queued_configure = False
            return
        if window.have_queued_configure:
            if changed:
                self._send_configure(window, now)
                return
            window.have_queued_configure = False  # the agent's answer to ours
        if not changed:
            return
        window.x, window.y, window.width, window.height = x, y, width, height
        allowed = self._allowed_override_redirect(window, window.override_redirect)
        if allowed:
            self._force_on_screen(window)
        if allowed != window.override_redirect:
            window.override_redirect = allowed
            self._move(window, actions)
            actions.append(SetOverrideRedirect(window.id, allowed, window.is_mapped))
        else:
            self._move(window, actions)

    @staticmethod
    def _move(window: _Window, actions: list[Action]) -> None:
        actions.append(MoveResize(window.id, window.rect))
        window.requested.append(x_geometry(window.rect))

    def _send_configure(self, window: _Window, now: float) -> None:
        self._queue(now, codec.encode(window.id, gm.Configure(window.x, window.y, window.width,
                                                               window.height, 0)))

    def _dock(self, window: _Window, actions: list[Action]) -> None:
        if window.is_mapped:
            log.info("cannot dock mapped window 0x%x", window.id)
            return
        if window.override_redirect:
            window.override_redirect = False
            actions.append(SetOverrideRedirect(window.id, False, False))
        window.is_docked = True  # no tray here: it never shows

    def _flags(self, window: _Window, body: gm.WindowFlags, actions: list[Action]) -> None:
        fullscreen, attention = gm.WINDOW_FLAG_FULLSCREEN, gm.WINDOW_FLAG_DEMANDS_ATTENTION
        minimize = gm.WINDOW_FLAG_MINIMIZE
        flags_set = body.flags_set & (fullscreen | attention | minimize)
        flags_unset = body.flags_unset & (fullscreen | attention)
        if not window.is_mapped:
            states: list[str] = []
            window.flags_set &= ~(fullscreen | attention)
            if flags_set & fullscreen:
                if self.settings.allow_fullscreen:
                    window.flags_set |= fullscreen
                    states.append(STATE_FULLSCREEN)
                else:
                    states += [STATE_MAXIMIZED_VERT, STATE_MAXIMIZED_HORZ]
                    window.fullscreen_maximize_requested = True
            else:
                window.fullscreen_maximize_requested = False
            if flags_set & attention:
                window.flags_set |= attention
                states.append(STATE_DEMANDS_ATTENTION)
            actions.append(SetWmState(window.id, tuple(states)))
            return
        every = flags_set | flags_unset
        if not every:
            return
        if flags_set & minimize:
            flags_set &= ~fullscreen
        if every & fullscreen:
            add = bool(flags_set & fullscreen)
            if self.settings.allow_fullscreen or (
                    not add and not window.fullscreen_maximize_requested):
                actions.append(RequestWmState(window.id, add, STATE_FULLSCREEN))
            else:
                actions.append(RequestWmState(window.id, add, STATE_MAXIMIZED_VERT,
                                              STATE_MAXIMIZED_HORZ))
                window.fullscreen_maximize_requested = add
        if flags_set & attention:
            actions.append(RequestWmState(window.id, True, STATE_DEMANDS_ATTENTION))
        if flags_set & minimize:
            actions.append(Iconify(window.id))

    def _dump(self, window: _Window, body: gm.WindowDump, now: float,
              actions: list[Action]) -> None:
        self._let_go(window, now, actions)
        dump = _Dump(self._next_dump, window.id, body.width, body.height)
        self._next_dump += 1
        self._dumps[dump.id] = dump
        window.dump = dump
        self.counters.dumps += 1
        actions.append(MapDump(dump.id, window.id, tuple(body.refs), body.width, body.height))
        # The daemon syncs with the X server before its ACK: every detach sent before
        # has been carried out by then.
        self._release_due(now, actions)
        assert self.version is not None
        if self.version >= gm.MIN_WINDOW_DUMP_ACK:
            # The ACK follows the sync that carried out every earlier detach: a held
            # dump is still mapped, so the ACK waits for its hold to pass.
            due = now + self.settings.ack_delay
            if self._letting_go:
                due = max(due, self._letting_go[-1][0])
            self._queue(due, codec.encode(window.id, gm.WindowDumpAck()), window.id)

    # -- dumps let go ----------------------------------------------------------------------

    def _let_go(self, window: _Window, now: float, actions: list[Action]) -> None:
        """``release_mapped_mfns``: the X server detaches; the mapping ends later."""
        dump = window.dump
        if dump is None:
            return
        window.dump = None
        actions.append(Detach(dump.id))
        self.counters.let_go += 1
        self._letting_go.append((now + self.settings.hold, dump.id))

    def _release_due(self, now: float, actions: list[Action]) -> None:
        while self._letting_go and self._letting_go[0][0] <= now:
            _, dump = self._letting_go.popleft()
            self._unmap(dump, actions)

    def _unmap(self, dump: int, actions: list[Action]) -> None:
        if self._dumps.pop(dump, None) is not None:
            actions.append(Unmap(dump))
            self.counters.unmapped += 1

    # -- writes to the agent -------------------------------------------------------------------

    def _queue(self, due: float, data: bytes, ack_window: int | None = None) -> None:
        self._outbox.append((due, data, ack_window))

    def _flush(self, now: float, actions: list[Action]) -> None:
        """Everything due, in order: one stream, so nothing passes a delayed ACK."""
        while self._outbox and self._outbox[0][0] <= now:
            _, data, ack_window = self._outbox.popleft()
            actions.append(Send(data))
            if ack_window is not None:
                self.counters.acks += 1
                self.counters.ack_order.append(ack_window)

    def _fail(self, message: str, actions: list[Action]) -> None:
        self._outbox.clear()
        self.finished = Exit(1, message)
        actions.append(self.finished)

    # -- geometry ----------------------------------------------------------------------------

    def _allowed_override_redirect(self, window: _Window, requested: bool) -> bool:
        """``validate_override_redirect``: never for docked windows, unchanged while
        mapped, and refused to a window over 90% of the work area."""
        if window.is_docked:
            return False
        if window.is_mapped:
            requested = window.override_redirect
        work = self.settings.screen.work
        available = work.width * work.height
        desired = window.width * window.height
        if (self.settings.override_redirect_protection and requested
                and desired > available * MAX_OVERRIDE_REDIRECT_PERCENTAGE // 100):
            log.info("override_redirect refused to window 0x%x (%dx%d)", window.id,
                     window.width, window.height)
            return False
        return requested

    def _force_on_screen(self, window: _Window) -> bool:
        """``force_on_screen`` with the daemon's padding for override-redirect windows:
        keep the window inside the work area, unless it is entirely off the screen."""
        screen = self.settings.screen
        work = screen.work
        border = OVERRIDE_REDIRECT_PADDING
        x, y, w, h = window.x, window.y, window.width, window.height
        # The daemon's test for "off the top" compares w + h, not y + h, with 0.
        if (x >= screen.root_width or y >= screen.height or (x < 0 and x + w <= 0)
                or (y < 0 and w + h <= 0)):
            return False
        moved = False
        left, top = border + work.x, border + work.y
        max_width, max_height = work.width - 2 * border, work.height - 2 * border
        if w > max_width:
            window.width, moved = max_width, True
        if h > max_height:
            window.height, moved = max_height, True
        if x < left:
            window.x, moved = left, True
        if y < top:
            window.y, moved = top, True
        if window.x > left + (max_width - window.width):
            window.x, moved = left + (max_width - window.width), True
        if window.y > top + (max_height - window.height):
            window.y, moved = top + (max_height - window.height), True
        return moved

    def _update(self, window: _Window, x: int, y: int, w: int, h: int,
                actions: list[Action]) -> None:
        """``do_shm_update``: the rectangle, clipped to the dump (or the window) and kept
        off the frame of an override-redirect window, put from the dump."""
        if x < 0 or y < 0 or w < 0 or h < 0:
            return
        dump = window.dump
        if dump is not None:
            x, y = min(x, dump.width), min(y, dump.height)
            w, h = min(w, dump.width - x), min(h, dump.height - y)
        else:
            x, y = min(x, window.width), min(y, window.height)
            w, h = min(w, window.width - x), min(h, window.height - y)
        border = BORDER_WIDTH if window.override_redirect else 0
        if window.width <= 2 * border or window.height <= 2 * border:
            actions.append(Fill(window.id, window.width, window.height))
            return
        right, bottom = x + w, y + h
        framed = False
        if border > x:
            if w <= border - x:
                return
            w -= border - x
            x = border
            framed = True
        right_allowed = window.width - border
        if right > right_allowed:
            if right_allowed <= x:
                return
            w = right_allowed - x
            framed = True
        if border > y:
            if h <= border - y:
                return
            h -= border - y
            y = border
            framed = True
        bottom_allowed = window.height - border
        if bottom > bottom_allowed:
            if bottom_allowed <= y:
                return
            h = bottom_allowed - y
            framed = True
        if w <= 0 or h <= 0:
            return
        if dump is not None:
            actions.append(Put(window.id, dump.id, dump.width, dump.height, Rect(x, y, w, h)))
        if framed:
            actions.append(Frame(window.id, window.width, window.height, border))

    def _title(self, raw: bytes) -> bytes:
        name = raw[:127].split(b"\0", 1)[0]
        if not self.settings.allow_utf8_titles and len(name) > 3 and name.endswith(
                "\u2026".encode()):
            name = name[:-3] + b"..."
        name = _sanitize(name, self.settings.allow_utf8_titles)
        if self.settings.prefix_titles:
            name = f"[{self.settings.vm_name}] ".encode() + name
        return name


# -- the daemon's sanitizing, as plain functions --------------------------------------------------


def _one_line(exc: codec.ProtocolViolation) -> str:
    """The daemon's lines about a fault, as one."""
    return "; ".join(exc.lines)


def _i32(value: int) -> int:
    """A 32-bit field read as C's ``int``."""
    value &= 0xFFFFFFFF
    return value - (1 << 32) if value >= 1 << 31 else value


def _clamp(value: int, limit: int) -> int:
    return max(-limit, min(_i32(value), limit))


def _hints(body: gm.WindowHints) -> SizeHints:
    """``handle_wmhints``: each pair passed on only when its flag is set and it is sane."""
    w_max, h_max = gm.MAX_WINDOW_WIDTH, gm.MAX_WINDOW_HEIGHT
    pairs = [
        (gm.HINT_P_MIN_SIZE, "min", body.min_width <= w_max and body.min_height <= h_max),
        (gm.HINT_P_MAX_SIZE, "max", 0 < body.max_width <= w_max and 0 < body.max_height <= h_max),
        (gm.HINT_P_RESIZE_INC, "inc", body.width_inc < w_max and body.height_inc < h_max),
        (gm.HINT_P_BASE_SIZE, "base", body.base_width <= w_max and body.base_height <= h_max),
    ]
    flags = body.flags & (gm.HINT_P_POSITION | gm.HINT_US_POSITION)
    values: dict[str, int] = {}
    for flag, name, sane in pairs:
        if body.flags & flag and sane:
            flags |= flag
            if name == "inc":
                values.update(width_inc=body.width_inc, height_inc=body.height_inc)
            else:
                values[f"{name}_width"] = getattr(body, f"{name}_width")
                values[f"{name}_height"] = getattr(body, f"{name}_height")
    return SizeHints(flags, **values)


def _cursor(cursor: int) -> int | None:
    """The X cursor font glyph of a (checked) cursor id; None for the default. The
    daemon makes a font cursor of each even glyph (the font's cursor shapes; each odd
    one is the mask of the shape before it) and uses None, the default, for the odd."""
    glyph = cursor & ~gm.CURSOR_X11 if cursor & gm.CURSOR_X11 else None
    return glyph if glyph is not None and glyph % 2 == 0 else None


def _utf8_length(data: bytes, at: int) -> int:
    """Bytes of the well-formed UTF-8 character at ``at`` (RFC 3629), 0 if none.

    As the daemon's check, a character starting with 0xF4 is never accepted."""
    lead = data[at]
    if lead <= 0x7F:
        return 1
    if 0xC2 <= lead <= 0xDF:
        size, second = 2, (0x80, 0xBF)
    elif lead == 0xE0:
        size, second = 3, (0xA0, 0xBF)
    elif 0xE1 <= lead <= 0xEC or lead in (0xEE, 0xEF):
        size, second = 3, (0x80, 0xBF)
    elif lead == 0xED:
        size, second = 3, (0x80, 0x9F)
    elif lead == 0xF0:
        size, second = 4, (0x90, 0xBF)
    elif 0xF1 <= lead <= 0xF3:
        size, second = 4, (0x80, 0xBF)
    else:
        return 0
    tail = data[at + 1:at + size]
    if len(tail) != size - 1 or not second[0] <= tail[0] <= second[1]:
        return 0
    if any(not 0x80 <= b <= 0xBF for b in tail[1:]):
        return 0
    return size


def _sanitize(text: bytes, allow_utf8: bool) -> bytes:
    """Printable ASCII (and, if allowed, well-formed UTF-8) kept; any other byte is '_'."""
    out = bytearray()
    at = 0
    while at < len(text):
        byte = text[at]
        if 0x20 <= byte <= 0x7E:
            out.append(byte)
            at += 1
            continue
        if allow_utf8 and byte >= 0x80:
            size = _utf8_length(text, at)
            if size:
                out += text[at:at + size]
                at += size
                continue
        out.append(ord("_"))
        at += 1
    return bytes(out)
