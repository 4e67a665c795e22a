"""Qubes GUI protocol (1.0-1.8) message types, constants and typed bodies.

Facts from qubes-gui-common ``qubes-gui-protocol.h``: message numbers, limits, the
versions at which the daemon's behaviour changes. Every body is a frozen dataclass whose
``TYPE`` names its message; ``Message`` pairs a body with its window id. Encoding and
decoding live in ``codec``; the daemon's checks in ``checks``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import IntEnum
from typing import ClassVar, TypeAlias


def make_version(major: int, minor: int) -> int:
    """A protocol version as it travels: ``major << 16 | minor``."""
    return (major << 16) | minor


def version_text(version: int) -> str:
    """``1.8`` for ``0x00010008``."""
    return f"{version >> 16}.{version & 0xFFFF}"


VERSION = make_version(1, 8)
MIN_VERSION = make_version(1, 4)  # bidirectional negotiation: the daemon answers a version
MIN_CLIPBOARD_DATA_LEN_IN_LEN = make_version(1, 2)  # before: clipboard length in the window field
MIN_DESTROY_ECHO = make_version(1, 5)  # the daemon answers each DESTROY with a DESTROY
MIN_STRICT_LENGTHS = make_version(1, 6)  # a wrong untrusted_len is fatal
MIN_WINDOW_DUMP_ACK = make_version(1, 7)  # the daemon sends one WINDOW_DUMP_ACK per dump
MIN_CLIPBOARD_4X = make_version(1, 8)  # clipboard data up to 256000 (+1) bytes

HEADER_SIZE = 12
PAGE_SIZE = 4096
MAX_WINDOW_WIDTH = 16384
MAX_WINDOW_HEIGHT = 6144
MAX_WINDOW_MEM = MAX_WINDOW_WIDTH * MAX_WINDOW_HEIGHT * 4
MAX_GRANT_REFS_COUNT = (MAX_WINDOW_MEM + PAGE_SIZE - 1) // PAGE_SIZE
MAX_MFN_COUNT = MAX_GRANT_REFS_COUNT
WINDOW_DUMP_HDR_SIZE = 16
SHM_CMD_SIZE = 28
WINDOW_DUMP_TYPE_GRANT_REFS = 0
FULLSCREEN_WINDOW_ID = 0  # the daemon treats window 0 as the VM's whole screen

MAX_CLIPBOARD_SIZE = 65000  # protocol 1.7 and older
MAX_CLIPBOARD_BUFFER_SIZE = 256000  # protocol 1.8; one byte more means "over the limit"
MIN_CLIPBOARD_BUFFER_SIZE = 256
DEFAULT_CLIPBOARD_BUFFER_SIZE = 64000

CURSOR_DEFAULT = 0
CURSOR_X11 = 0x100  # CURSOR_X11 + an X cursor font glyph number
CURSOR_X11_MAX = 0x19A

WINDOW_FLAG_FULLSCREEN = 1 << 0
WINDOW_FLAG_DEMANDS_ATTENTION = 1 << 1
WINDOW_FLAG_MINIMIZE = 1 << 2

# WM_NORMAL_HINTS flags (X11 XSizeHints) the daemon passes on when the values are sane
HINT_US_POSITION = 1 << 0
HINT_P_POSITION = 1 << 2
HINT_P_MIN_SIZE = 1 << 4
HINT_P_MAX_SIZE = 1 << 5
HINT_P_RESIZE_INC = 1 << 6
HINT_P_BASE_SIZE = 1 << 8


def clipboard_limit(version: int) -> int:
    """The largest clipboard length the daemon accepts without exiting, by version."""
    return MAX_CLIPBOARD_SIZE if version < MIN_CLIPBOARD_4X else MAX_CLIPBOARD_BUFFER_SIZE + 1


class MsgType(IntEnum):
    KEYPRESS = 124
    BUTTON = 125
    MOTION = 126
    CROSSING = 127
    FOCUS = 128
    RESIZE = 129
    CREATE = 130
    DESTROY = 131
    MAP = 132
    UNMAP = 133
    CONFIGURE = 134
    MFNDUMP = 135
    SHMIMAGE = 136
    CLOSE = 137
    EXECUTE = 138
    CLIPBOARD_REQ = 139
    CLIPBOARD_DATA = 140
    WMNAME = 141
    KEYMAP_NOTIFY = 142
    DOCK = 143
    WINDOW_HINTS = 144
    WINDOW_FLAGS = 145
    WMCLASS = 146
    WINDOW_DUMP = 147
    CURSOR = 148
    WINDOW_DUMP_ACK = 149


# What the daemon's dispatcher accepts from an agent (anything else ends it).
AGENT_TO_DAEMON = frozenset({
    MsgType.CREATE, MsgType.DESTROY, MsgType.MAP, MsgType.UNMAP, MsgType.CONFIGURE,
    MsgType.MFNDUMP, MsgType.SHMIMAGE, MsgType.CLIPBOARD_DATA, MsgType.WMNAME, MsgType.DOCK,
    MsgType.WINDOW_HINTS, MsgType.WINDOW_FLAGS, MsgType.WMCLASS, MsgType.WINDOW_DUMP,
    MsgType.CURSOR,
})


def daemon_to_agent(version: int) -> frozenset[MsgType]:
    """What a daemon may send at ``version`` (RESIZE and EXECUTE: declared, never sent today)."""
    kinds = {MsgType.KEYPRESS, MsgType.BUTTON, MsgType.MOTION, MsgType.CROSSING, MsgType.FOCUS,
             MsgType.RESIZE, MsgType.MAP, MsgType.CONFIGURE, MsgType.CLOSE, MsgType.EXECUTE,
             MsgType.CLIPBOARD_REQ, MsgType.CLIPBOARD_DATA, MsgType.KEYMAP_NOTIFY,
             MsgType.WINDOW_FLAGS}
    if version >= MIN_DESTROY_ECHO:
        kinds.add(MsgType.DESTROY)
    if version >= MIN_WINDOW_DUMP_ACK:
        kinds.add(MsgType.WINDOW_DUMP_ACK)
    return frozenset(kinds)


def _c_string(value: bytes, size: int, what: str) -> None:
    if len(value) >= size or b"\0" in value:
        raise ValueError(f"{what} must be at most {size - 1} bytes without NUL, got {value!r}")


@dataclass(frozen=True, slots=True)
class Xconf:
    """The daemon's screen, sent after its version: ``msg_xconf``."""

    w: int
    h: int
    depth: int
    mem: int

    @classmethod
    def for_screen(cls, width: int, height: int, depth: int = 24) -> Xconf:
        """What qubes-guid sends for an X root of this size (width rounded up to 8)."""
        w = (width + 7) // 8 * 8
        return cls(w, height, depth, w * height * 4 // 1024 + 1)


@dataclass(frozen=True, slots=True)
class Create:
    TYPE: ClassVar[MsgType] = MsgType.CREATE
    x: int
    y: int
    width: int
    height: int
    parent: int = 0
    override_redirect: int = 0


@dataclass(frozen=True, slots=True)
class Destroy:
    TYPE: ClassVar[MsgType] = MsgType.DESTROY


@dataclass(frozen=True, slots=True)
class Map:
    TYPE: ClassVar[MsgType] = MsgType.MAP
    transient_for: int = 0
    override_redirect: int = 0


@dataclass(frozen=True, slots=True)
class Unmap:
    TYPE: ClassVar[MsgType] = MsgType.UNMAP


@dataclass(frozen=True, slots=True)
class Configure:
    TYPE: ClassVar[MsgType] = MsgType.CONFIGURE
    x: int
    y: int
    width: int
    height: int
    override_redirect: int = 0


@dataclass(frozen=True, slots=True)
class ShmImage:
    TYPE: ClassVar[MsgType] = MsgType.SHMIMAGE
    x: int
    y: int
    width: int
    height: int


@dataclass(frozen=True, slots=True)
class WmName:
    """A title: at most 127 bytes (the daemon forces byte 127 to NUL); UTF-8 by convention."""

    TYPE: ClassVar[MsgType] = MsgType.WMNAME
    name: bytes

    def __post_init__(self) -> None:
        _c_string(self.name, 128, "WMNAME")


@dataclass(frozen=True, slots=True)
class WmClass:
    TYPE: ClassVar[MsgType] = MsgType.WMCLASS
    res_class: bytes
    res_name: bytes

    def __post_init__(self) -> None:
        _c_string(self.res_class, 64, "WMCLASS res_class")
        _c_string(self.res_name, 64, "WMCLASS res_name")


@dataclass(frozen=True, slots=True)
class WindowHints:
    TYPE: ClassVar[MsgType] = MsgType.WINDOW_HINTS
    flags: int
    min_width: int = 0
    min_height: int = 0
    max_width: int = 0
    max_height: int = 0
    width_inc: int = 0
    height_inc: int = 0
    base_width: int = 0
    base_height: int = 0


@dataclass(frozen=True, slots=True)
class WindowFlags:
    TYPE: ClassVar[MsgType] = MsgType.WINDOW_FLAGS
    flags_set: int
    flags_unset: int


@dataclass(frozen=True, slots=True)
class WindowDump:
    """Grant refs of a window image: XRGB8888, stride 4 * width, from the first page.

    ``bpp`` is ignored by the daemon; today's X agent sends the pixmap's bits per pixel, 32.
    """

    TYPE: ClassVar[MsgType] = MsgType.WINDOW_DUMP
    width: int
    height: int
    refs: tuple[int, ...]
    type: int = WINDOW_DUMP_TYPE_GRANT_REFS
    bpp: int = 32


@dataclass(frozen=True, slots=True)
class MfnDump:
    """Deprecated ``shm_cmd`` (dom0 daemons only); decoded so that it can be checked."""

    TYPE: ClassVar[MsgType] = MsgType.MFNDUMP
    width: int
    height: int
    mfns: tuple[int, ...]
    off: int = 0
    bpp: int = 24
    shmid: int = 0
    domid: int = 0


@dataclass(frozen=True, slots=True)
class Cursor:
    TYPE: ClassVar[MsgType] = MsgType.CURSOR
    cursor: int


@dataclass(frozen=True, slots=True)
class ClipboardData:
    TYPE: ClassVar[MsgType] = MsgType.CLIPBOARD_DATA
    data: bytes


@dataclass(frozen=True, slots=True)
class ClipboardReq:
    TYPE: ClassVar[MsgType] = MsgType.CLIPBOARD_REQ


@dataclass(frozen=True, slots=True)
class Close:
    TYPE: ClassVar[MsgType] = MsgType.CLOSE


@dataclass(frozen=True, slots=True)
class WindowDumpAck:
    TYPE: ClassVar[MsgType] = MsgType.WINDOW_DUMP_ACK


@dataclass(frozen=True, slots=True)
class Dock:
    TYPE: ClassVar[MsgType] = MsgType.DOCK


@dataclass(frozen=True, slots=True)
class Keypress:
    TYPE: ClassVar[MsgType] = MsgType.KEYPRESS
    type: int
    x: int
    y: int
    state: int
    keycode: int


@dataclass(frozen=True, slots=True)
class Button:
    TYPE: ClassVar[MsgType] = MsgType.BUTTON
    type: int
    x: int
    y: int
    state: int
    button: int


@dataclass(frozen=True, slots=True)
class Motion:
    TYPE: ClassVar[MsgType] = MsgType.MOTION
    x: int
    y: int
    state: int
    is_hint: int


@dataclass(frozen=True, slots=True)
class Crossing:
    TYPE: ClassVar[MsgType] = MsgType.CROSSING
    type: int
    x: int
    y: int
    state: int
    mode: int
    detail: int
    focus: int


@dataclass(frozen=True, slots=True)
class Focus:
    TYPE: ClassVar[MsgType] = MsgType.FOCUS
    type: int
    mode: int
    detail: int


@dataclass(frozen=True, slots=True)
class KeymapNotify:
    TYPE: ClassVar[MsgType] = MsgType.KEYMAP_NOTIFY
    keys: bytes

    def __post_init__(self) -> None:
        if len(self.keys) != 32:
            raise ValueError(f"KEYMAP_NOTIFY keys must be 32 bytes, got {len(self.keys)}")


@dataclass(frozen=True, slots=True)
class Execute:
    TYPE: ClassVar[MsgType] = MsgType.EXECUTE
    cmd: bytes

    def __post_init__(self) -> None:
        _c_string(self.cmd, 255, "EXECUTE cmd")


@dataclass(frozen=True, slots=True)
class Resize:
    TYPE: ClassVar[MsgType] = MsgType.RESIZE
    width: int
    height: int


Body: TypeAlias = (
    Create | Destroy | Map | Unmap | Configure | ShmImage | WmName | WmClass | WindowHints
    | WindowFlags | WindowDump | MfnDump | Cursor | ClipboardData | ClipboardReq | Close
    | WindowDumpAck | Dock | Keypress | Button | Motion | Crossing | Focus | KeymapNotify
    | Execute | Resize
)


@dataclass(frozen=True, slots=True)
class Message:
    """One message: its type, window id and body.

    ``untrusted_len`` is what the header said, set by the decoders (ignored by ``==``).
    """

    type: MsgType
    window: int
    body: Body
    untrusted_len: int | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        if self.type != self.body.TYPE:
            raise ValueError(f"a {type(self.body).__name__} body is not MSG_{self.type.name}")

    @classmethod
    def of(cls, window: int, body: Body) -> Message:
        return cls(body.TYPE, window, body)
