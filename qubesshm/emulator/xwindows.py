"""The emulator's X11 side: one X window per GUI window, drawn from the dumps, through xcffib.

``XWindows`` owns the X connection. It carries out what the daemon model asks of the
X server (create, map, move, name a window; attach a dump; put a rectangle of it on
screen) and turns the X events it reads back into the plain values of ``events.py``
for the model: Expose, ConfigureNotify, and the input qubes-guid selects on its
windows (keys, buttons, motion, enter/leave, focus, ``WM_DELETE_WINDOW``,
``_NET_WM_STATE`` changes, MapNotify), with the key bitmap read at an enter or a focus
in, as the daemon reads it. It answers a window manager's ``_NET_WM_PING`` itself, as
the daemon does (no protocol involved). A dump's pages reach the X server as qubes-guid hands them
over: MIT-SHM ``AttachFd`` of the read-only fd, so that the X server itself maps the
pages, where the server offers MIT-SHM 1.2 and ``libxcb-shm`` is loadable; otherwise
the emulator maps the fd read-only itself and sends the pixels with ``PutImage``.

Nothing here decides anything about the protocol: clamping, frames and the order of
let-go and ACK are the model's (``daemon.py``).
"""

from __future__ import annotations

import contextlib
import io
import logging
import mmap
import os
import socket
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import xcffib
import xcffib.shm
import xcffib.xproto as xp

from qubesshm.emulator import events as ev
from qubesshm.emulator.daemon import COPY_KEYSYM, PASTE_KEYSYM, WM_STATES, SizeHints, x_geometry
from qubesshm.emulator.events import Configured, Exposed, XEvent
from qubesshm.pixels.region import Rect

log = logging.getLogger("qubesshm.emulator")

DEPTH = 24  # the daemon puts every dump as a depth-24 ZPixmap of 32 bits per pixel
WHITE = 0xFFFFFF  # qubes-guid's default window background
RED = 0xFF0000  # qubes-guid's default label colour (no -c): override-redirect frames

P_SIZE = 1 << 3  # WM_NORMAL_HINTS: the program's size (set at creation, as the daemon does)

_PUT_IMAGE_OPCODE = 72
_PUT_IMAGE_HEADER = 24  # bytes of a core PutImage request before its data
_NO_SEGMENT = 0
_CLIENT_MESSAGE = 33  # the core event code of ClientMessage
_MAPPING_KEYBOARD = 1  # MappingNotify's request for a new keyboard mapping
_PROPERTY_NEW_VALUE = 0
_IS_VIEWABLE = 2  # GetWindowAttributes' map_state
# What qubes-guid selects on each of its windows (mkwindow).
WINDOW_EVENTS = (xp.EventMask.Exposure | xp.EventMask.KeyPress | xp.EventMask.KeyRelease
                 | xp.EventMask.ButtonPress | xp.EventMask.ButtonRelease
                 | xp.EventMask.PointerMotion | xp.EventMask.EnterWindow
                 | xp.EventMask.LeaveWindow | xp.EventMask.FocusChange
                 | xp.EventMask.StructureNotify | xp.EventMask.PropertyChange)


class XDisplayError(Exception):
    """The X server cannot be used (not reachable, gone, or of a kind the daemon refuses)."""


@dataclass(frozen=True, slots=True)
class ScreenInfo:
    """The X screen as qubes-guid reads it at start."""

    width: int  # the root window's real width (the handshake rounds it up to 8)
    height: int
    depth: int
    work_area: Rect  # _NET_WORKAREA of the current desktop, or the whole root window


class _XcbShm:
    """The one MIT-SHM call xcffib cannot make: ``AttachFd`` needs the fd passed along.

    libxcb-shm's own ``xcb_shm_attach_fd_checked`` is called on xcffib's connection
    pointer; libxcb keeps the sequence numbers, so the two interleave safely.
    """

    _CDEF = """
        typedef struct xcb_connection_t xcb_connection_t;
        typedef struct { unsigned int sequence; } xcb_void_cookie_t;
        typedef struct {
            uint8_t response_type; uint8_t error_code; uint16_t sequence;
            uint32_t resource_id; uint16_t minor_code; uint8_t major_code;
            uint8_t pad0; uint32_t pad[5]; uint32_t full_sequence;
        } xcb_generic_error_t;
        xcb_void_cookie_t xcb_shm_attach_fd_checked(xcb_connection_t *c, uint32_t shmseg,
                                                    int32_t shm_fd, uint8_t read_only);
        xcb_generic_error_t *xcb_request_check(xcb_connection_t *c, xcb_void_cookie_t cookie);
        void free(void *ptr);
    """

    def __init__(self, conn: Any) -> None:
        import cffi

        self.ffi = cffi.FFI()
        self.ffi.cdef(self._CDEF)
        self.shm = self.ffi.dlopen("libxcb-shm.so.0")
        self.xcb = self.ffi.dlopen("libxcb.so.1")
        self.libc = self.ffi.dlopen(None)
        address = int(xcffib.ffi.cast("uintptr_t", conn._conn))
        self.conn = self.ffi.cast("xcb_connection_t *", address)

    def attach_fd(self, segment: int, fd: int) -> int | None:
        """Attach ``fd`` read-only as ``segment`` and wait for the server's answer (xcb
        closes the fd once sent); the X error code on failure, else None."""
        cookie = self.shm.xcb_shm_attach_fd_checked(self.conn, segment, fd, 1)
        error = self.xcb.xcb_request_check(self.conn, cookie)
        if error == self.ffi.NULL:
            return None
        code = int(error.error_code)
        self.libc.free(error)
        return code


@dataclass(eq=False)
class _Image:
    """A dump the X side holds: an MIT-SHM segment, or our own read-only mapping."""

    segment: int = _NO_SEGMENT
    memory: mmap.mmap | None = None


class XWindows:
    """The X connection of the emulator and the X windows of the VM's GUI windows."""

    def __init__(self, display: str | None, *, use_shm: bool = True) -> None:
        name = display if display else os.environ.get("DISPLAY", "")
        if not name:
            raise XDisplayError("no X display: set DISPLAY or pass --display (for example "
                                "--display :1 with an Xvfb running there)")
        try:
            self.conn: Any = xcffib.connect(display=name)
        except xcffib.ConnectionException as exc:
            raise XDisplayError(f"cannot open X display {name!r} ({exc}): start an X server "
                                f"there (Xvfb {name} -screen 0 1920x1080x24) or pass "
                                "--display") from exc
        self.display_name = name
        self._fd = int(self.conn.get_file_descriptor())
        setup = self.conn.get_setup()
        screen = setup.roots[0]
        self.root: int = screen.root
        self.visual: int = screen.root_visual
        if screen.root_depth != DEPTH or not any(
                f.depth == DEPTH and f.bits_per_pixel == 32 for f in setup.pixmap_formats):
            self.conn.disconnect()
            raise XDisplayError(f"X display {name!r} has a {screen.root_depth}-bit screen; the "
                                "GUI daemon needs 24-bit colour with 32 bits per pixel "
                                "(Xvfb -screen 0 WxHx24)")
        self._atoms: dict[str, int] = {}
        self._atom_names: dict[int, str] = {}
        self._windows: dict[int, int] = {}  # VM window id -> X window
        self._by_xid: dict[int, int] = {}  # X window -> VM window id
        self._reparented: set[int] = set()  # X windows a window manager framed
        self._images: dict[int, _Image] = {}
        self._cursors: dict[int, int] = {}
        self._cursor_font = 0
        self.gc = self.conn.generate_id()
        self.conn.core.CreateGC(self.gc, self.root, 0, [])
        self.frame_gc = self.conn.generate_id()
        self.conn.core.CreateGC(self.frame_gc, self.root, xp.GC.Foreground, [RED])
        self._max_request = int(self.conn.get_maximum_request_length()) * 4
        self._shm: _XcbShm | None = None
        self.shm_version: tuple[int, int] | None = None
        self.server_pid = self._peer_pid()
        # Fds travel only over a Unix socket (an fd sent over TCP breaks the connection).
        if use_shm and self.server_pid is not None:
            self._shm, self.shm_version = self._probe_shm()
        self.screen = ScreenInfo(screen.width_in_pixels, screen.height_in_pixels,
                                 screen.root_depth, self.work_area(
                                     screen.width_in_pixels, screen.height_in_pixels))
        for name in (*WM_STATES, "WM_DELETE_WINDOW", "_NET_WM_PING", "WM_PROTOCOLS",
                     "_NET_WM_USER_TIME", "_NET_WM_STATE"):
            self.atom(name)  # known by number when the X server names them in events

    # -- the connection ---------------------------------------------------------------------

    @property
    def fd(self) -> int:
        """The X connection's socket (to wait on; xcb reads it)."""
        return self._fd

    @property
    def uses_shm(self) -> bool:
        """Dumps reach the X server as MIT-SHM segments of their own fds."""
        return self._shm is not None

    def _probe_shm(self) -> tuple[_XcbShm | None, tuple[int, int] | None]:
        # Asked with the core request first: a request of an extension the server lacks
        # would end xcb's connection.
        name = b"MIT-SHM"
        if not self.conn.core.QueryExtension(len(name), name).reply().present:
            log.info("the X server offers no MIT-SHM: dumps are put with PutImage")
            return None, None
        reply = self.conn(xcffib.shm.key).QueryVersion().reply()
        version = (int(reply.major_version), int(reply.minor_version))
        if version < (1, 2):
            log.info("the X server's MIT-SHM is %d.%d (AttachFd needs 1.2): PutImage", *version)
            return None, version
        try:
            return _XcbShm(self.conn), version
        except OSError as exc:
            log.info("libxcb-shm cannot be loaded (%s): dumps are put with PutImage", exc)
            return None, version

    def _peer_pid(self) -> int | None:
        """The X server's pid, as the kernel saw it connect (SO_PEERCRED); None over TCP."""
        sock = socket.socket(fileno=os.dup(self.fd))
        try:
            if sock.family != socket.AF_UNIX:
                return None
            creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12)
        except OSError:
            return None
        finally:
            sock.close()
        pid = struct.unpack("3i", creds)[0]
        return int(pid) if pid > 0 else None

    def atom(self, name: str) -> int:
        found = self._atoms.get(name)
        if found is None:
            data = name.encode()
            found = int(self.conn.core.InternAtom(False, len(data), data).reply().atom)
            self._atoms[name] = found
            self._atom_names[found] = name
        return found

    def work_area(self, root_width: int, root_height: int) -> Rect:
        """The current desktop's work area, or the whole root window without one."""
        desktop = self._cardinals(self.root, "_NET_CURRENT_DESKTOP", 0, 1)
        if len(desktop) == 1:
            area = self._cardinals(self.root, "_NET_WORKAREA", desktop[0] * 4, 4)
            if len(area) == 4 and all(v <= 1 << 20 for v in area):
                return Rect(*area)
        return Rect(0, 0, root_width, root_height)

    def _cardinals(self, window: int, name: str, offset: int, count: int) -> list[int]:
        reply = self.conn.core.GetProperty(False, window, self.atom(name), xp.Atom.CARDINAL,
                                           offset, count).reply()
        if reply.format != 32:
            return []
        return [int(v) for v in struct.unpack(f"={reply.value_len}I", reply.value.buf())]

    def flush(self) -> None:
        self.conn.flush()

    def sync(self) -> None:
        """Wait until the X server has carried out every request sent so far."""
        self.conn.core.GetInputFocus().reply()

    def close(self) -> None:
        for image in self._images.values():
            if image.memory is not None:
                image.memory.close()
        self._images.clear()
        with contextlib.suppress(xcffib.XcffibException):
            self.conn.disconnect()

    def events(self) -> list[XEvent]:
        """Every event the X server has sent (and xcb has queued), as the model wants them.

        X errors from requests on windows that are gone are logged, as qubes-guid does;
        a lost X connection raises ``XDisplayError``."""
        found: list[XEvent] = []
        while True:
            try:
                event = self.conn.poll_for_event()
            except xcffib.ConnectionException as exc:
                raise XDisplayError(f"lost the connection to X display "
                                    f"{self.display_name!r}") from exc
            except xcffib.XcffibException as exc:
                log.warning("X error: %s", type(exc).__name__)
                continue
            if event is None:
                return found
            converted = self._convert(event)
            if converted is not None:
                found.append(converted)

    def _convert(self, event: Any) -> XEvent | None:
        if isinstance(event, xp.ExposeEvent):
            window = self._by_xid.get(event.window)
            if window is None:
                return None
            return Exposed(window, Rect(event.x, event.y, event.width, event.height))
        if isinstance(event, xp.ReparentNotifyEvent):
            if event.parent == self.root:
                self._reparented.discard(event.window)
            else:
                self._reparented.add(event.window)
            return None
        if isinstance(event, xp.ConfigureNotifyEvent):
            window = self._by_xid.get(event.window)
            if window is None:
                return None
            x, y = event.x, event.y
            synthetic = bool(event.response_type & 0x80)
            if not synthetic and event.window in self._reparented:
                # Relative to a window manager's frame: ask where that is on the root.
                try:
                    where = self.conn.core.TranslateCoordinates(event.window, self.root,
                                                                0, 0).reply()
                except xcffib.XcffibException:
                    return None
                x, y = where.dst_x, where.dst_y
            return Configured(window, Rect(x, y, event.width, event.height))
        if isinstance(event, xp.MappingNotifyEvent):
            return self.keyboard_mapping() if event.request == _MAPPING_KEYBOARD else None
        if isinstance(event, xp.ClientMessageEvent):
            return self._client_message_event(event)
        return self._input(event)

    def _input(self, event: Any) -> ev.Input | None:
        """Input on one of our windows (the event window: ours have no children)."""
        code = event.response_type & 0x7F
        if isinstance(event, xp.KeyPressEvent | xp.KeyReleaseEvent):
            window = self._by_xid.get(event.event)
            if window is None:
                return None
            return ev.Key(window, code, event.event_x, event.event_y, event.state,
                          event.detail, event.time)
        if isinstance(event, xp.ButtonPressEvent | xp.ButtonReleaseEvent):
            window = self._by_xid.get(event.event)
            if window is None:
                return None
            return ev.Button(window, code, event.event_x, event.event_y, event.state,
                             event.detail, event.time)
        if isinstance(event, xp.MotionNotifyEvent):
            window = self._by_xid.get(event.event)
            if window is None:
                return None
            return ev.Motion(window, event.event_x, event.event_y, event.state, event.detail)
        if isinstance(event, xp.EnterNotifyEvent | xp.LeaveNotifyEvent):
            window = self._by_xid.get(event.event)
            if window is None:
                return None
            keys = self._keymap() if code == ev.ENTER_NOTIFY else bytes(ev.KEYMAP_BYTES)
            return ev.Crossing(window, code, event.event_x, event.event_y, event.state,
                               event.mode, event.detail, event.same_screen_focus & 1, keys)
        if isinstance(event, xp.FocusInEvent | xp.FocusOutEvent):
            window = self._by_xid.get(event.event)
            if window is None:
                return None
            keys = self._keymap() if code == ev.FOCUS_IN else bytes(ev.KEYMAP_BYTES)
            return ev.Focus(window, code, event.mode, event.detail, keys)
        if isinstance(event, xp.PropertyNotifyEvent):
            window = self._by_xid.get(event.window)
            if window is None or event.atom != self.atom("_NET_WM_STATE"):
                return None
            if event.state != _PROPERTY_NEW_VALUE:
                return ev.WmStateChanged(window, None)
            return ev.WmStateChanged(window, self._wm_states(event.window))
        if isinstance(event, xp.MapNotifyEvent):
            window = self._by_xid.get(event.window)
            if window is None or event.event != event.window:
                return None
            try:
                state = self.conn.core.GetWindowAttributes(event.window).reply().map_state
            except xcffib.XcffibException:
                return None  # gone meanwhile
            return ev.MapNotified(window, bool(event.override_redirect), state == _IS_VIEWABLE)
        return None

    def _client_message_event(self, event: Any) -> ev.DeleteRequest | None:
        """``WM_DELETE_WINDOW`` (the daemon reads the first long whatever the message's
        type); ``_NET_WM_PING`` answered to the root window, as the daemon does."""
        first = int(event.data.data32[0])
        if first == self.atom("WM_DELETE_WINDOW"):
            window = self._by_xid.get(event.window)
            return ev.DeleteRequest(window) if window is not None else None
        if first == self.atom("_NET_WM_PING"):
            words = [int(v) for v in event.data.data32]
            answer = struct.pack("=BBHII5I", _CLIENT_MESSAGE, event.format, 0, self.root,
                                 event.type, *words)
            mask = xp.EventMask.SubstructureNotify | xp.EventMask.SubstructureRedirect
            self.conn.core.SendEvent(False, self.root, mask, answer)
        return None

    def _keymap(self) -> bytes:
        """XQueryKeymap: one bit per key code, set for the keys down now."""
        return bytes(self.conn.core.QueryKeymap().reply().keys)

    def _wm_states(self, xid: int) -> tuple[str, ...]:
        try:
            reply = self.conn.core.GetProperty(False, xid, self.atom("_NET_WM_STATE"),
                                               xp.Atom.ATOM, 0, 1024).reply()
        except xcffib.XcffibException:
            return ()
        if reply.format != 32:
            return ()
        atoms = struct.unpack(f"={reply.value_len}I", reply.value.buf())
        return tuple(self._atom_names[a] for a in atoms if a in self._atom_names)

    def keyboard_mapping(self) -> ev.KeyboardMapped:
        """The clipboard keys' key codes as ``XKeysymToKeycode`` finds them: the first key
        code listing the keysym, trying each key's first keysym, then each one's
        second, and so on."""
        setup = self.conn.get_setup()
        first, last = setup.min_keycode, setup.max_keycode
        reply = self.conn.core.GetKeyboardMapping(first, last - first + 1).reply()
        per = reply.keysyms_per_keycode
        keysyms = list(reply.keysyms)

        def keycode(keysym: int) -> int:
            for column in range(per):
                for index in range(len(keysyms) // per if per else 0):
                    if keysyms[index * per + column] == keysym:
                        return int(first + index)
            return 0

        return ev.KeyboardMapped(keycode(COPY_KEYSYM), keycode(PASTE_KEYSYM))

    # -- windows ----------------------------------------------------------------------------

    def xid(self, window: int) -> int | None:
        """The X window showing GUI window ``window``."""
        return self._windows.get(window)

    def create(self, window: int, rect: Rect, override_redirect: bool, *,
               vm_name: str) -> int:
        xid = self.conn.generate_id()
        mask = xp.CW.BackPixel | xp.CW.OverrideRedirect | xp.CW.EventMask
        events = WINDOW_EVENTS
        # X refuses an empty window; the daemon's would fail and every later request on
        # it with it. One pixel keeps the emulator's windows alive instead.
        where = x_geometry(rect)
        self.conn.core.CreateWindow(
            xp.WindowClass.CopyFromParent, xid, self.root, where.x, where.y, where.width,
            where.height, 0, xp.WindowClass.InputOutput, self.visual, mask,
            [WHITE, int(override_redirect), events])
        self._windows[window] = xid
        self._by_xid[xid] = window
        self._set_text(xid, "WM_NAME", "STRING", b"VMapp command")
        self._set_text(xid, "WM_ICON_NAME", "STRING", b"Pixmap")
        self._set_hints_property(xid, SizeHints(P_SIZE), rect.width, rect.height)
        self._set_text(xid, "_QUBES_VMNAME", "STRING", vm_name.encode())
        self._set_cardinals(xid, "_QUBES_VMWINDOWID", "WINDOW", [window])
        self._set_cardinals(xid, "_NET_WM_PID", "CARDINAL", [os.getpid()])
        self._set_cardinals(xid, "WM_PROTOCOLS", "ATOM",
                            [self.atom("WM_DELETE_WINDOW"), self.atom("_NET_WM_PING")])
        return int(xid)

    def destroy(self, window: int) -> None:
        xid = self._windows.pop(window, None)
        if xid is None:
            return
        del self._by_xid[xid]
        self._reparented.discard(xid)
        self.conn.core.DestroyWindow(xid)

    def map(self, window: int, *, raise_window: bool) -> None:
        xid = self._windows[window]
        self.conn.core.MapWindow(xid)
        if raise_window:
            self.conn.core.ConfigureWindow(xid, xp.ConfigWindow.StackMode,
                                           [xp.StackMode.Above])

    def unmap(self, window: int) -> None:
        self.conn.core.UnmapWindow(self._windows[window])

    def move_resize(self, window: int, rect: Rect) -> None:
        mask = (xp.ConfigWindow.X | xp.ConfigWindow.Y | xp.ConfigWindow.Width
                | xp.ConfigWindow.Height)
        where = x_geometry(rect)
        self.conn.core.ConfigureWindow(self._windows[window], mask,
                                       [where.x, where.y, where.width, where.height])

    def set_override_redirect(self, window: int, value: bool) -> None:
        self.conn.core.ChangeWindowAttributes(self._windows[window], xp.CW.OverrideRedirect,
                                              [int(value)])

    def set_name(self, window: int, name: bytes) -> None:
        """The title, as qubes-guid sets it: WM_NAME, _NET_WM_NAME and both icon names."""
        xid = self._windows[window]
        for prop in ("WM_NAME", "_NET_WM_NAME", "WM_ICON_NAME", "_NET_WM_ICON_NAME"):
            self._set_text(xid, prop, "UTF8_STRING", name)

    def set_class(self, window: int, res_class: bytes, res_name: bytes) -> None:
        self._set_text(self._windows[window], "WM_CLASS", "STRING",
                       res_name + b"\0" + res_class + b"\0")

    def set_size_hints(self, window: int, hints: SizeHints) -> None:
        self._set_hints_property(self._windows[window], hints, 0, 0)

    def set_transient_for(self, window: int, other: int | None) -> None:
        xid = self._windows[window]
        target = self._windows.get(other) if other is not None else None
        if target is None:
            self.conn.core.DeleteProperty(xid, self.atom("WM_TRANSIENT_FOR"))
        else:
            self._set_cardinals(xid, "WM_TRANSIENT_FOR", "WINDOW", [target])

    def set_wm_state(self, window: int, states: Sequence[str]) -> None:
        """_NET_WM_STATE of a window not yet mapped (replaced, or deleted when empty)."""
        xid = self._windows[window]
        if states:
            self._set_cardinals(xid, "_NET_WM_STATE", "ATOM", [self.atom(s) for s in states])
        else:
            self.conn.core.DeleteProperty(xid, self.atom("_NET_WM_STATE"))

    def request_wm_state(self, window: int, add: bool, first: str, second: str | None) -> None:
        """Ask a window manager to change _NET_WM_STATE of a mapped window (EWMH)."""
        data = [int(add), self.atom(first), self.atom(second) if second else 0, 1, 0]
        self._client_message(window, "_NET_WM_STATE", data)

    def iconify(self, window: int) -> None:
        self._client_message(window, "WM_CHANGE_STATE", [3, 0, 0, 0, 0])  # IconicState

    def _client_message(self, window: int, type_name: str, data: list[int]) -> None:
        event = struct.pack("=BBHII5I", _CLIENT_MESSAGE, 32, 0, self._windows[window],
                            self.atom(type_name), *data)
        mask = xp.EventMask.SubstructureNotify | xp.EventMask.SubstructureRedirect
        self.conn.core.SendEvent(False, self.root, mask, event)

    def set_user_time(self, window: int, time: int) -> None:
        """``_NET_WM_USER_TIME``: when the user last pressed a key or button there."""
        xid = self._windows.get(window)
        if xid is not None:
            self._set_cardinals(xid, "_NET_WM_USER_TIME", "CARDINAL", [time])

    def set_cursor(self, window: int, glyph: int | None) -> None:
        """A cursor of the X cursor font (``XC_*``), or the parent's with None."""
        cursor = 0 if glyph is None else self._font_cursor(glyph)
        self.conn.core.ChangeWindowAttributes(self._windows[window], xp.CW.Cursor, [cursor])

    def _font_cursor(self, glyph: int) -> int:
        found = self._cursors.get(glyph)
        if found is None:
            if not self._cursor_font:
                self._cursor_font = self.conn.generate_id()
                self.conn.core.OpenFont(self._cursor_font, len(b"cursor"), b"cursor")
            found = self.conn.generate_id()
            self.conn.core.CreateGlyphCursor(found, self._cursor_font, self._cursor_font,
                                             glyph, glyph + 1, 0, 0, 0,
                                             0xFFFF, 0xFFFF, 0xFFFF)
            self._cursors[glyph] = found
        return found

    def _set_text(self, xid: int, prop: str, type_name: str, value: bytes) -> None:
        self.conn.core.ChangeProperty(xp.PropMode.Replace, xid, self.atom(prop),
                                      self.atom(type_name), 8, len(value), value)

    def _set_cardinals(self, xid: int, prop: str, type_name: str, values: list[int]) -> None:
        data = struct.pack(f"={len(values)}I", *values)
        self.conn.core.ChangeProperty(xp.PropMode.Replace, xid, self.atom(prop),
                                      self.atom(type_name), 32, len(values), data)

    def _set_hints_property(self, xid: int, hints: SizeHints, width: int, height: int) -> None:
        values = [hints.flags, 0, 0, width, height, hints.min_width, hints.min_height,
                  hints.max_width, hints.max_height, hints.width_inc, hints.height_inc,
                  0, 0, 0, 0, hints.base_width, hints.base_height, 0]
        data = struct.pack("=18I", *(v & 0xFFFFFFFF for v in values))
        self.conn.core.ChangeProperty(xp.PropMode.Replace, xid, self.atom("WM_NORMAL_HINTS"),
                                      self.atom("WM_SIZE_HINTS"), 32, 18, data)

    # -- dumps ------------------------------------------------------------------------------

    def attach(self, key: int, fd: int, size: int) -> bool:
        """Take a dump's read-only pages: the X server maps them (MIT-SHM), or we do.

        ``fd`` stays ours. False when the X server refused the segment (the daemon then
        shows nothing of that dump, and still ACKs it)."""
        if self._shm is not None:
            segment = int(self.conn.generate_id())
            error = self._shm.attach_fd(segment, os.dup(fd))
            if error is not None:
                log.warning("xcb_shm_attach_fd failed for a dump (X error %d)", error)
                self._images[key] = _Image()
                return False
            self._images[key] = _Image(segment=segment)
            return True
        self._images[key] = _Image(memory=mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ))
        return True

    def detach(self, key: int) -> None:
        """Let go of a dump: ``ShmDetach`` (the X server unmaps the pages once it has
        carried it out: ``sync`` to know that), or drop our own mapping."""
        image = self._images.pop(key, None)
        if image is None:
            return
        if image.segment != _NO_SEGMENT:
            self.conn(xcffib.shm.key).Detach(image.segment)
        if image.memory is not None:
            image.memory.close()

    def put(self, window: int, key: int, image_width: int, image_height: int,
            rect: Rect, dst_x: int, dst_y: int) -> None:
        """Put ``rect`` of dump ``key`` (XRGB8888, stride 4·width, from byte 0) at
        ``(dst_x, dst_y)`` of the window."""
        image = self._images.get(key)
        xid = self._windows.get(window)
        if image is None or xid is None or rect.width <= 0 or rect.height <= 0:
            return
        if image.segment != _NO_SEGMENT:
            self.conn(xcffib.shm.key).PutImage(
                xid, self.gc, image_width, image_height, rect.x, rect.y, rect.width,
                rect.height, _i16(dst_x), _i16(dst_y), DEPTH, xp.ImageFormat.ZPixmap, 0,
                image.segment, 0)
        elif image.memory is not None:
            self._put_from_memory(xid, image.memory, image_width, rect, dst_x, dst_y)

    def _put_from_memory(self, xid: int, memory: mmap.mmap, image_width: int, rect: Rect,
                         dst_x: int, dst_y: int) -> None:
        """Core PutImage in bands of rows, each within the server's request limit."""
        row_bytes = rect.width * 4
        rows_per_request = max(1, (self._max_request - _PUT_IMAGE_HEADER) // row_bytes)
        stride = image_width * 4
        view = memoryview(memory)
        try:
            top = 0
            while top < rect.height:
                rows = min(rows_per_request, rect.height - top)
                band = bytearray(rows * row_bytes)
                for row in range(rows):
                    start = (rect.y + top + row) * stride + rect.x * 4
                    band[row * row_bytes:(row + 1) * row_bytes] = view[start:start + row_bytes]
                self._put_image_request(xid, rect.width, rows, dst_x, dst_y + top, band)
                top += rows
        finally:
            view.release()

    def _put_image_request(self, xid: int, width: int, height: int, x: int, y: int,
                           data: bytearray) -> None:
        # xcffib packs image data a byte at a time; the request is packed here instead.
        buf = io.BytesIO()
        buf.write(struct.pack("=xB2xIIHHhhBB2x", xp.ImageFormat.ZPixmap, xid, self.gc,
                              width, height, _i16(x), _i16(y), 0, DEPTH))
        buf.write(data)
        self.conn.core.send_request(_PUT_IMAGE_OPCODE, buf)

    def frame(self, window: int, width: int, height: int, border: int, padding: int = 0) -> None:
        """The coloured frame the daemon draws inside an override-redirect window."""
        xid = self._windows.get(window)
        if xid is None or border <= 0:
            return
        rects = [xp.RECTANGLE.synthetic(i, i, max(0, width - 1 - 2 * i),
                                        max(0, height - 1 - 2 * i))
                 for i in range(padding, padding + border)]
        self.conn.core.PolyRectangle(xid, self.frame_gc, len(rects), rects)

    def fill(self, window: int, width: int, height: int) -> None:
        """A window too small for anything but its frame: all frame colour."""
        xid = self._windows.get(window)
        if xid is None:
            return
        self.conn.core.PolyFillRectangle(xid, self.frame_gc, 1,
                                         [xp.RECTANGLE.synthetic(0, 0, width, height)])


def _i16(value: int) -> int:
    """X coordinates are 16-bit signed on the wire."""
    return max(-32768, min(32767, value))
