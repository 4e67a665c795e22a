"""The Qubes GUI protocol (agent <-> qubes-guid, 1.4-1.8), sans-IO.

``messages``: types, constants, typed bodies; ``codec``: bytes to messages and back;
``checks``: the real daemon's checks; ``handshake``: version negotiation, both sides.
"""

from . import checks, codec, handshake, messages
from .codec import AgentDecoder, DaemonDecoder, ProtocolViolation, encode

__all__ = ["AgentDecoder", "DaemonDecoder", "ProtocolViolation", "checks", "codec", "encode",
           "handshake", "messages"]
