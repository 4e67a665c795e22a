"""The real qubes-guid's checks of an agent's messages, as a pure state machine.

``DaemonChecks`` knows which windows exist (``CREATE`` .. ``DESTROY``) and raises
``codec.ProtocolViolation`` where qubes-guid exits or fails a "Verify", with the line it
prints. Use it through ``codec.DaemonDecoder(version, checks)`` on a byte stream, or call
``check(msg)`` on messages one by one (never both on the same messages).
``daemon_replies`` says what the daemon answers to a message it accepted.
"""

from __future__ import annotations

import struct
from collections.abc import Callable

from . import messages as gm
from .codec import DAEMON_FIXED_SIZES, DaemonDecoder, ProtocolViolation, encode_message
from .messages import MsgType

_X_BAD_VALUE = ("ErrorHandler: BadValue (integer parameter out of range for operation)",
                "Major opcode: 1 (X_CreateWindow)")


def _verify(condition: str) -> ProtocolViolation:
    return ProtocolViolation(f"Verify failed: {condition}", fatal=False)


class DaemonChecks:
    """One daemon connection's checks; ``version`` is the negotiated protocol version.

    ``in_dom0``: a daemon in a GUI domain refuses ``MFNDUMP`` (``vm_name`` and ``domid`` go
    into that message). ``local_window`` maps a VM window id to the daemon's X window id,
    which one message prints (identity by default).
    """

    def __init__(self, version: int, *, in_dom0: bool = True, vm_name: str = "testvm",
                 domid: int = 0, local_window: Callable[[int], int] | None = None) -> None:
        self.version = version
        self.in_dom0 = in_dom0
        self.vm_name = vm_name
        self.domid = domid
        self.windows: set[int] = set()
        self.warnings: list[str] = []
        self._local = local_window

    def local_window(self, window: int) -> int:
        return window if self._local is None else self._local(window)

    def check(self, msg: gm.Message) -> None:
        """Check one agent-to-daemon message (``untrusted_len``, when set, as its header)."""
        data = bytearray(encode_message(msg))
        if msg.untrusted_len is not None and msg.untrusted_len != len(data) - gm.HEADER_SIZE:
            if msg.type not in DAEMON_FIXED_SIZES and msg.type != MsgType.MFNDUMP:
                raise ValueError(f"untrusted_len {msg.untrusted_len} is not the length of "
                                 f"this MSG_{msg.type.name} body")
            struct.pack_into("<I", data, 8, msg.untrusted_len)
        decoder = DaemonDecoder(self.version, self)
        try:
            decoder.feed(bytes(data))
        finally:
            self.warnings.extend(decoder.warnings)

    def check_window(self, raw_type: int, window: int) -> None:
        """The daemon's first check of every message but ``CLIPBOARD_DATA``."""
        if raw_type == MsgType.CREATE:
            if window in self.windows:
                raise ProtocolViolation(f"CREATE for already existing window id 0x{window:x}?")
        elif window not in self.windows:
            raise ProtocolViolation(f"msg 0x{raw_type:x} without CREATE for 0x{window:x}")

    def check_mfndump(self) -> None:
        if not self.in_dom0:
            raise ProtocolViolation(
                f"Qube {self.vm_name} (id {self.domid}) sent a MSG_MFNDUMP message, but this"
                " GUI daemon instance is not running in dom0.",
                "Since we are not in dom0, we cannot process this request.",
                "Please upgrade the GUI agent in the VM if possible")

    def after(self, msg: gm.Message) -> None:
        """Checks of a complete, well-framed message's fields, and the window list."""
        body = msg.body
        if isinstance(body, gm.Create):
            if body.width >= 1 << 31 or body.height >= 1 << 31:  # negative as C ints
                raise _verify("(int) untrusted_crt.width >= 0 && (int) untrusted_crt.height >= 0")
            self.windows.add(msg.window)
            # Sizes are clamped to the limits; a zero size makes XCreateWindow fail, and the
            # daemon treats X errors as fatal.
            if body.width == 0 or body.height == 0:
                raise ProtocolViolation(*_X_BAD_VALUE)
        elif isinstance(body, gm.Destroy):
            self.windows.discard(msg.window)
        elif isinstance(body, gm.Configure):
            width = min(body.width, gm.MAX_WINDOW_WIDTH)
            height = min(body.height, gm.MAX_WINDOW_HEIGHT)
            if not (width > 0 and height > 0):
                raise _verify("width > 0 && height > 0")
        elif isinstance(body, gm.WindowFlags):
            if body.flags_set & body.flags_unset:
                raise _verify("(untrusted_msg.flags_set & untrusted_msg.flags_unset) == 0")
        elif isinstance(body, gm.Cursor):
            if body.cursor & gm.CURSOR_X11:
                if not body.cursor < gm.CURSOR_X11_MAX:
                    raise _verify(f"untrusted_msg.cursor < 0x{gm.CURSOR_X11_MAX:x}")
            elif body.cursor != gm.CURSOR_DEFAULT:
                raise _verify(f"untrusted_msg.cursor == {gm.CURSOR_DEFAULT}")


def daemon_replies(version: int, msg: gm.Message) -> list[gm.Message]:
    """What qubes-guid writes back once it has handled an accepted agent message."""
    dumps = (MsgType.WINDOW_DUMP, MsgType.MFNDUMP)
    if msg.type in dumps and version >= gm.MIN_WINDOW_DUMP_ACK:
        return [gm.Message.of(msg.window, gm.WindowDumpAck())]
    if msg.type == MsgType.DESTROY and version >= gm.MIN_DESTROY_ECHO:
        return [gm.Message.of(msg.window, gm.Destroy())]
    return []
