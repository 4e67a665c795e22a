"""Building Wayland messages by interface and message name, for the sans-IO tests."""

from __future__ import annotations

from qubesshm.wire.codec import ArgValue, encode_message
from qubesshm.wire.protocol import MessageSpec, load_protocols

PROTO = load_protocols()


def req(interface: str, name: str) -> MessageSpec:
    return next(m for m in PROTO[interface].requests if m.name == name)


def ev(interface: str, name: str) -> MessageSpec:
    return next(m for m in PROTO[interface].events if m.name == name)


def request(object_id: int, interface: str, name: str, *args: ArgValue) -> tuple[bytes, list[int]]:
    return encode_message(object_id, req(interface, name), list(args))


def event(object_id: int, interface: str, name: str, *args: ArgValue) -> tuple[bytes, list[int]]:
    return encode_message(object_id, ev(interface, name), list(args))
