"""Protocol log in libwayland 1.21's ``WAYLAND_DEBUG`` format, as the client sees it.

One line per relayed message, written as libwayland's ``wl_closure_print`` writes
it on the client's side of the connection, so the log lines up with
``WAYLAND_DEBUG=1`` of the same client: the timestamp is realtime microseconds
cut to 32 bits (``[%7u.%03u]``, wrapping as libwayland's does), a request is
``" -> "``, an event has no arrow, and untyped new ids (``wl_registry.bind``)
print as ``"wl_compositor", 1, new id [unknown]@4``. What only the proxy knows
follows after two spaces and ``#``: the client number, and a note when the proxy
kept, dropped or rewrote the message (``sed 's/  #.*//'`` leaves libwayland's
line). The fds shown are the proxy's own numbers for them.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TextIO

from ..wire.codec import ArgValue, Fixed, UntypedNewId
from ..wire.protocol import Arg, ArgKind
from .session import Direction, Relayed


def wayland_timestamp(realtime_ns: int) -> str:
    """``[%7u.%03u]`` of the realtime clock in microseconds, cut to 32 bits."""
    micros = (realtime_ns // 1000) & 0xFFFFFFFF
    return f"[{micros // 1000:7d}.{micros % 1000:03d}]"


def format_arg(arg: Arg, value: ArgValue, objects: Callable[[int], str]) -> str:
    kind = arg.kind
    if isinstance(value, UntypedNewId):
        return f'"{value.interface}", {value.version}, new id [unknown]@{value.id}'
    if value is None:
        return "nil"
    if isinstance(value, Fixed):
        return f"{float(value):f}"
    if isinstance(value, bytes):
        return f"array[{len(value)}]"
    if isinstance(value, str):
        return f'"{value}"'
    if kind is ArgKind.FD:
        return f"fd {value}"
    if kind is ArgKind.NEW_ID:
        return f"new id {arg.interface or '[unknown]'}@{value}"
    if kind is ArgKind.OBJECT:
        assert isinstance(value, int)
        return objects(value)
    return str(value)


def format_record(record: Relayed, client: int, objects: Callable[[int], str],
                  realtime_ns: int) -> str:
    names = _upstream_name if record.upstream else objects
    args = ", ".join(format_arg(a, v, names)
                     for a, v in zip(record.spec.args, record.args, strict=True))
    arrow = " -> " if record.direction is Direction.REQUEST else ""
    note = f"; {record.note}" if record.note else ""
    return (f"{wayland_timestamp(realtime_ns)} {arrow}{record.obj}.{record.spec.name}({args})"
            f"  # client#{client}{note}\n")


class ProtocolLog:
    """Writes ``Relayed`` records to a stream."""

    def __init__(self, stream: TextIO, clock_ns: Callable[[], int] = time.time_ns) -> None:
        self.stream = stream
        self.clock_ns = clock_ns

    def tracer(self, client: int, objects: Callable[[int], str]) -> Callable[[Relayed], None]:
        def write(record: Relayed) -> None:
            self.stream.write(format_record(record, client, objects, self.clock_ns()))
        return write


def _upstream_name(object_id: int) -> str:
    return f"@{object_id}"
