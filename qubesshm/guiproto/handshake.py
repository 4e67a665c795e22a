"""Sans-IO version negotiation of the Qubes GUI protocol, both sides.

The agent (vchan server) speaks first: a bare ``u32`` version. qubes-guid takes
``1.min(agent minor, own minor)`` for any agent of major 1 (another major ends it), then
sends that version (only from 1.4 on: older daemons send none) and its screen,
``msg_xconf``. An agent refuses a daemon that answers below 1.4, above its offer, or
another major, as today's agent does.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from . import messages as gm
from .codec import ProtocolViolation, decode_xconf, encode_version, encode_xconf

_XCONF_SIZE = 16


class IncompatibleDaemon(ProtocolViolation):
    """The daemon's version is one qubesshm cannot speak."""


class IncompatibleAgent(ProtocolViolation):
    """The agent's version has another major; qubes-guid shows this and exits 1."""


@dataclass(frozen=True, slots=True)
class Negotiated:
    version: int
    xconf: gm.Xconf
    leftover: bytes  # bytes received after the handshake: the start of the message stream


class AgentHandshake:
    """The agent's side: send ``greeting()``, ``feed`` what arrives until it gives a result."""

    def __init__(self, version: int = gm.VERSION) -> None:
        if not gm.MIN_VERSION <= version <= gm.VERSION:
            raise ValueError(f"an agent offers protocol {gm.version_text(gm.MIN_VERSION)} to "
                             f"{gm.version_text(gm.VERSION)}, not {gm.version_text(version)}")
        self.offered = version
        self.result: Negotiated | None = None
        self._buf = b""

    def greeting(self) -> bytes:
        return encode_version(self.offered)

    def feed(self, data: bytes) -> Negotiated | None:
        if self.result is not None:
            raise RuntimeError("the handshake is over; the rest belongs to the message stream")
        self._buf += data
        if len(self._buf) < 4:
            return None
        (answer,) = struct.unpack_from("<I", self._buf)
        self._judge(answer)
        if len(self._buf) < 4 + _XCONF_SIZE:
            return None
        xconf = decode_xconf(self._buf[4:4 + _XCONF_SIZE])
        self.result = Negotiated(answer, xconf, self._buf[4 + _XCONF_SIZE:])
        return self.result

    def _judge(self, answer: int) -> None:
        got, offered = gm.version_text(answer), gm.version_text(self.offered)
        fix = "update the GUI daemon (in dom0: sudo qubes-dom0-update)"
        if answer >> 16 == 0:  # a daemon before 1.4 starts with msg_xconf
            raise IncompatibleDaemon(
                f"the GUI daemon sent no protocol version (it starts with its screen width, "
                f"{answer}, as daemons before 1.4 do): qubesshm offered {offered} and needs at "
                f"least 1.4; {fix}")
        if answer < gm.MIN_VERSION:
            raise IncompatibleDaemon(
                f"the GUI daemon answered protocol {got} to qubesshm's offer of {offered}: "
                f"qubesshm needs at least 1.4; {fix}")
        if answer > self.offered:
            raise IncompatibleDaemon(
                f"the GUI daemon answered protocol {got} to qubesshm's offer of {offered}: "
                f"a daemon may only answer the offered version or lower; {fix}")


class DaemonHandshake:
    """The daemon's side (for an emulator): ``feed`` the agent's bytes, then send ``reply``."""

    def __init__(self, xconf: gm.Xconf, max_version: int = gm.VERSION,
                 vm_name: str = "testvm") -> None:
        if max_version >> 16 != 1 or max_version > gm.VERSION:
            raise ValueError(f"a daemon speaks protocol 1.0 to {gm.version_text(gm.VERSION)}, "
                             f"not {gm.version_text(max_version)}")
        self.xconf = xconf
        self.max_version = max_version
        self.vm_name = vm_name
        self.reply = b""
        self.result: Negotiated | None = None
        self._buf = b""

    def feed(self, data: bytes) -> Negotiated | None:
        if self.result is not None:
            raise RuntimeError("the handshake is over; the rest belongs to the message stream")
        self._buf += data
        if len(self._buf) < 4:
            return None
        (offer,) = struct.unpack_from("<I", self._buf)
        major, minor = offer >> 16, offer & 0xFFFF
        if major < 1:
            raise IncompatibleAgent(
                f"The GUI agent that runs in the VM '{self.vm_name}' implements outdated "
                f"protocol ({major}:{minor}), and must be updated.")
        if major > 1:
            raise IncompatibleAgent(
                f"The Dom0 GUI daemon does not support protocol version {major}:{minor}, "
                f"requested by the VM '{self.vm_name}'.")
        version = gm.make_version(1, min(minor, self.max_version & 0xFFFF))
        announce = encode_version(version) if version >= gm.MIN_VERSION else b""
        self.reply = announce + encode_xconf(self.xconf)
        self.result = Negotiated(version, self.xconf, self._buf[4:])
        return self.result
