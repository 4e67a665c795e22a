"""Sans-IO codec of the Qubes GUI protocol: typed messages to bytes, and bytes back.

``encode`` writes a header and body with the exact lengths qubes-guid expects.
``DaemonDecoder`` reads an agent's stream as qubes-guid does: same framing (a wrong
``untrusted_len`` of a fixed-size message is fatal from 1.6; before, the daemon reads the
fixed size anyway), same fatal faults in the same order, same text. Attached to a
``checks.DaemonChecks`` it also checks window ids and field values. ``AgentDecoder``
reads the daemon's stream as an agent, strictly: anything a daemon of the negotiated
version never sends is a ``ProtocolViolation``.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import fields
from typing import TYPE_CHECKING, Any

from . import messages as gm
from .messages import MsgType

if TYPE_CHECKING:
    from .checks import DaemonChecks

_HDR = struct.Struct("<III")
_U32 = struct.Struct("<I")
_XCONF = struct.Struct("<IIII")
_DUMP_HDR = struct.Struct("<IIII")
_SHM_CMD = struct.Struct("<7I")


class ProtocolViolation(Exception):
    """A stream or message qubes-guid would not accept; ``lines`` as the daemon prints them.

    ``fatal`` is False for the daemon's "Verify failed" checks (on Qubes it asks the user
    whether to kill the VM; the message is dropped either way). ``before`` holds the
    messages a ``feed`` decoded before the fault. After a non-fatal fault, ``feed(b"")``
    goes on with the rest of the stream.
    """

    def __init__(self, message: str, *more: str, fatal: bool = True) -> None:
        super().__init__(message)
        self.lines: tuple[str, ...] = (message, *more)
        self.fatal = fatal
        self.before: tuple[gm.Message, ...] = ()


# Fixed-size bodies: field order of each dataclass, little-endian.
_FIXED: dict[MsgType, struct.Struct] = {t: struct.Struct(f) for t, f in {
    MsgType.CREATE: "<iiIIII", MsgType.DESTROY: "<", MsgType.MAP: "<II", MsgType.UNMAP: "<",
    MsgType.CONFIGURE: "<iiIII", MsgType.SHMIMAGE: "<iiII", MsgType.WMNAME: "<128s",
    MsgType.WMCLASS: "<64s64s", MsgType.WINDOW_HINTS: "<9I", MsgType.WINDOW_FLAGS: "<II",
    MsgType.CURSOR: "<I", MsgType.CLIPBOARD_REQ: "<", MsgType.CLOSE: "<",
    MsgType.WINDOW_DUMP_ACK: "<", MsgType.DOCK: "<", MsgType.KEYPRESS: "<IiiII",
    MsgType.BUTTON: "<IiiII", MsgType.MOTION: "<iiII", MsgType.CROSSING: "<IiiIIII",
    MsgType.FOCUS: "<III", MsgType.KEYMAP_NOTIFY: "<32s", MsgType.EXECUTE: "<255s",
    MsgType.RESIZE: "<II",
}.items()}
_CLASSES: dict[MsgType, Callable[..., gm.Body]] = {cls.TYPE: cls for cls in (
    gm.Create, gm.Destroy, gm.Map, gm.Unmap, gm.Configure, gm.ShmImage, gm.WmName, gm.WmClass,
    gm.WindowHints, gm.WindowFlags, gm.Cursor, gm.ClipboardReq, gm.Close, gm.WindowDumpAck,
    gm.Dock, gm.Keypress, gm.Button, gm.Motion, gm.Crossing, gm.Focus, gm.KeymapNotify,
    gm.Execute, gm.Resize)}
_C_STRINGS = {MsgType.WMNAME: 128, MsgType.WMCLASS: 64, MsgType.EXECUTE: 255}
# Fixed-size messages the daemon takes from an agent, with the size it insists on.
DAEMON_FIXED_SIZES: dict[MsgType, int] = {
    t: _FIXED[t].size for t in gm.AGENT_TO_DAEMON if t in _FIXED}


def body_size(body: gm.Body) -> int:
    """The length of a body's encoding (the header's ``untrusted_len``)."""
    if isinstance(body, gm.ClipboardData):
        return len(body.data)
    if isinstance(body, gm.WindowDump):
        return gm.WINDOW_DUMP_HDR_SIZE + 4 * len(body.refs)
    if isinstance(body, gm.MfnDump):
        return gm.SHM_CMD_SIZE + 4 * len(body.mfns)
    return _FIXED[body.TYPE].size


def encode_body(body: gm.Body) -> bytes:
    try:
        if isinstance(body, gm.ClipboardData):
            return bytes(body.data)
        if isinstance(body, gm.WindowDump):
            head = _DUMP_HDR.pack(body.type, body.width, body.height, body.bpp)
            return head + struct.pack(f"<{len(body.refs)}I", *body.refs)
        if isinstance(body, gm.MfnDump):
            head = _SHM_CMD.pack(body.shmid, body.width, body.height, body.bpp, body.off,
                                 len(body.mfns), body.domid)
            return head + struct.pack(f"<{len(body.mfns)}I", *body.mfns)
        values: list[Any] = [getattr(body, f.name) for f in fields(body)]
        return _FIXED[body.TYPE].pack(*values)
    except struct.error as exc:
        raise ValueError(f"cannot encode {body!r}: {exc}") from None


def encode(window: int, body: gm.Body) -> bytes:
    """Header and body of one message, ``untrusted_len`` the body's exact length."""
    payload = encode_body(body)
    try:
        return _HDR.pack(body.TYPE, window, len(payload)) + payload
    except struct.error as exc:
        raise ValueError(f"cannot encode window id {window!r}: {exc}") from None


def encode_message(msg: gm.Message) -> bytes:
    return encode(msg.window, msg.body)


def encode_version(version: int) -> bytes:
    """The bare ``u32`` version each side sends first."""
    return _U32.pack(version)


def encode_xconf(xconf: gm.Xconf) -> bytes:
    return _XCONF.pack(xconf.w, xconf.h, xconf.depth, xconf.mem)


def decode_xconf(data: bytes) -> gm.Xconf:
    return gm.Xconf(*_XCONF.unpack(data))


def decode_fixed(mtype: MsgType, payload: bytes | bytearray | memoryview) -> gm.Body:
    """The body of a fixed-size message from exactly its bytes."""
    values: list[Any] = list(_FIXED[mtype].unpack(payload))
    size = _C_STRINGS.get(mtype)
    if size is not None:  # C strings: the reader stops at the first NUL or the last byte
        values = [v[:size - 1].split(b"\0", 1)[0] for v in values]
    return _CLASSES[mtype](*values)


def too_big(msg: str, width: int, height: int) -> ProtocolViolation:
    return ProtocolViolation(
        f"Width or height too large in MSG_{msg}: limit is "
        f"{gm.MAX_WINDOW_WIDTH}x{gm.MAX_WINDOW_HEIGHT} but got {width}x{height}")


def too_short(msg: str, got: int, expected: int) -> ProtocolViolation:
    # The daemon's own text has no closing parenthesis.
    return ProtocolViolation(f"MSG_{msg} message is too short (got {got} expected >= {expected}")


def bad_length(version: int, msg: str, expected: int, got: int) -> list[str]:
    """The daemon's complaint about a wrong length: raised from 1.6, warnings before."""
    first = f"incorrect untrusted_len for MSG_{msg}: expected {expected} got {got}"
    shown = gm.version_text(version)
    if version >= gm.MIN_STRICT_LENGTHS:
        raise ProtocolViolation(first, f"Exiting since protocol version {shown} >= 1.6")
    return [first, f"Continuing since protocol version {shown} < 1.6"]


def check_clipboard_len(version: int, length: int) -> None:
    if length > gm.clipboard_limit(version):
        raise ProtocolViolation(f"clipboard data len 0x{length:x} exceeds maximum allowed!")


def check_dump_header(dump_type: int, width: int, height: int) -> None:
    if dump_type != gm.WINDOW_DUMP_TYPE_GRANT_REFS:
        raise ProtocolViolation(f"unknown window dump type {dump_type}")
    if width > gm.MAX_WINDOW_WIDTH or height > gm.MAX_WINDOW_HEIGHT:
        raise too_big("WINDOW_DUMP", width, height)


def check_dump_body_len(length: int) -> None:
    if length > gm.MAX_GRANT_REFS_COUNT * 4 or length % 4:
        raise ProtocolViolation(
            f"handle_msg_window_dump_grant_refs: invalid body size({length})")


def check_dump_size(window: int, local: int, width: int, height: int, nrefs: int) -> None:
    if nrefs * gm.PAGE_SIZE < width * height * 4:
        raise ProtocolViolation(
            f"handle_window_dump: got too small image data size ({nrefs * gm.PAGE_SIZE})"
            f" for window 0x{local:x} (remote 0x{window:x})")


class DaemonDecoder:
    """Agent-to-daemon messages out of a byte stream, framed and judged as qubes-guid does.

    With ``checks``, each message's window is checked where the daemon checks it (right after
    the header) and ``checks`` sees each complete message; don't also call ``checks.check``.
    Warnings the daemon prints and goes on (wrong lengths before 1.6) land in ``warnings``.
    """

    def __init__(self, version: int, checks: DaemonChecks | None = None) -> None:
        self.version = version
        self.checks = checks
        self.warnings: list[str] = []
        self._buf = bytearray()
        self._dead: ProtocolViolation | None = None

    def feed(self, data: bytes) -> list[gm.Message]:
        if self._dead is not None:
            self._dead.before = ()
            raise self._dead
        self._buf += data
        out: list[gm.Message] = []
        while True:
            try:
                msg = self._next()
            except ProtocolViolation as exc:
                exc.before = tuple(out)
                if exc.fatal:
                    self._dead = exc
                raise
            if msg is None:
                return out
            out.append(msg)

    def _local(self, window: int) -> int:
        return window if self.checks is None else self.checks.local_window(window)

    def _take(self, end: int, msg: gm.Message, warn: list[str] | None = None) -> gm.Message:
        del self._buf[:end]
        if warn:
            self.warnings.extend(warn)
        if self.checks is not None:
            self.checks.after(msg)
        return msg

    def _next(self) -> gm.Message | None:
        buf, version = self._buf, self.version
        if len(buf) < gm.HEADER_SIZE:
            return None
        raw_type, window, ulen = _HDR.unpack_from(buf)
        if raw_type == MsgType.CLIPBOARD_DATA:
            check_clipboard_len(version, ulen)
            end = gm.HEADER_SIZE + ulen
            if len(buf) < end:
                return None
            body = gm.ClipboardData(bytes(buf[gm.HEADER_SIZE:end]))
            return self._take(end, gm.Message(MsgType.CLIPBOARD_DATA, window, body, ulen))
        if self.checks is not None:
            self.checks.check_window(raw_type, window)
        if raw_type not in gm.AGENT_TO_DAEMON:
            raise ProtocolViolation(f"got unknown msg type {raw_type}")
        mtype = MsgType(raw_type)
        if mtype == MsgType.WINDOW_DUMP:
            return self._window_dump(window, ulen)
        if mtype == MsgType.MFNDUMP:
            return self._mfndump(window, ulen)
        expected = DAEMON_FIXED_SIZES[mtype]
        warn = bad_length(version, mtype.name, expected, ulen) if ulen != expected else None
        end = gm.HEADER_SIZE + expected
        if len(buf) < end:
            return None
        fixed = decode_fixed(mtype, buf[gm.HEADER_SIZE:end])
        return self._take(end, gm.Message(mtype, window, fixed, ulen), warn)

    def _window_dump(self, window: int, ulen: int) -> gm.Message | None:
        buf, start = self._buf, gm.HEADER_SIZE + gm.WINDOW_DUMP_HDR_SIZE
        if ulen < gm.WINDOW_DUMP_HDR_SIZE:
            raise too_short("WINDOW_DUMP", ulen, gm.WINDOW_DUMP_HDR_SIZE)
        if len(buf) < start:
            return None
        dump_type, width, height, bpp = _DUMP_HDR.unpack_from(buf, gm.HEADER_SIZE)
        check_dump_header(dump_type, width, height)
        check_dump_body_len(ulen - gm.WINDOW_DUMP_HDR_SIZE)
        end = gm.HEADER_SIZE + ulen
        if len(buf) < end:
            return None
        count = (ulen - gm.WINDOW_DUMP_HDR_SIZE) // 4
        refs = struct.unpack_from(f"<{count}I", buf, start)
        check_dump_size(window, self._local(window), width, height, count)
        body = gm.WindowDump(width, height, refs, dump_type, bpp)
        return self._take(end, gm.Message(MsgType.WINDOW_DUMP, window, body, ulen))

    def _mfndump(self, window: int, ulen: int) -> gm.Message | None:
        buf, start = self._buf, gm.HEADER_SIZE + gm.SHM_CMD_SIZE
        if self.version >= gm.MIN_STRICT_LENGTHS and ulen < gm.SHM_CMD_SIZE:
            raise too_short("MFNDUMP", ulen, gm.SHM_CMD_SIZE)
        if len(buf) < start:
            return None
        if self.checks is not None:
            self.checks.check_mfndump()
        shmid, width, height, bpp, off, count, domid = _SHM_CMD.unpack_from(buf, gm.HEADER_SIZE)
        if count > gm.MAX_MFN_COUNT:
            raise ProtocolViolation(
                f"MSG_MFNDUMP: too many MFNs (limit {gm.MAX_MFN_COUNT} got {count})")
        if width > gm.MAX_WINDOW_WIDTH or height > gm.MAX_WINDOW_HEIGHT:
            raise too_big("MFNDUMP", width, height)
        if off >= gm.PAGE_SIZE:
            raise ProtocolViolation(f"MSG_MFNDUMP has offset {off} which is not less than 4096")
        expected = gm.SHM_CMD_SIZE + 4 * count
        # The daemon names this one with its quotes: MSG_"MFNDUMP".
        warn = bad_length(self.version, '"MFNDUMP"', expected, ulen) if ulen != expected else None
        end = gm.HEADER_SIZE + expected
        if len(buf) < end:
            return None
        mfns = struct.unpack_from(f"<{count}I", buf, start)
        if count * gm.PAGE_SIZE < width * height * 4 + off:
            raise ProtocolViolation(
                f"handle_mfndump for window 0x{self._local(window):x}(remote 0x{window:x})"
                f" got too small num_mfn= 0x{count:x}")
        body = gm.MfnDump(width, height, mfns, off, bpp, shmid, domid)
        return self._take(end, gm.Message(MsgType.MFNDUMP, window, body, ulen), warn)


class AgentDecoder:
    """Daemon-to-agent messages out of a byte stream (after the handshake), checked strictly."""

    def __init__(self, version: int) -> None:
        self.version = version
        self._allowed = gm.daemon_to_agent(version)
        self._buf = bytearray()

    def feed(self, data: bytes) -> list[gm.Message]:
        self._buf += data
        out: list[gm.Message] = []
        while True:
            try:
                msg = self._next()
            except ProtocolViolation as exc:
                exc.before = tuple(out)
                raise
            if msg is None:
                return out
            out.append(msg)

    def _next(self) -> gm.Message | None:
        buf = self._buf
        if len(buf) < gm.HEADER_SIZE:
            return None
        raw_type, window, ulen = _HDR.unpack_from(buf)
        if raw_type not in self._allowed:
            raise ProtocolViolation(
                f"unexpected message type {raw_type} from the GUI daemon"
                f" (protocol {gm.version_text(self.version)})")
        mtype = MsgType(raw_type)
        if mtype != MsgType.CLIPBOARD_DATA and ulen != _FIXED[mtype].size:
            raise ProtocolViolation(
                f"incorrect untrusted_len for MSG_{mtype.name} from the GUI daemon:"
                f" expected {_FIXED[mtype].size} got {ulen}")
        end = gm.HEADER_SIZE + ulen
        if len(buf) < end:
            return None
        payload = buf[gm.HEADER_SIZE:end]
        body: gm.Body = (gm.ClipboardData(bytes(payload)) if mtype == MsgType.CLIPBOARD_DATA
                else decode_fixed(mtype, payload))
        del buf[:end]
        return gm.Message(mtype, window, body, ulen)
