"""Protocol log in the style of libwayland's ``WAYLAND_DEBUG``.

One line per relayed message: a millisecond timestamp, the client number, the
direction (``->`` request to the compositor, ``<-`` event to the client) and
``interface@id.message(args)``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TextIO

from ..wire.codec import ArgValue, Fixed, UntypedNewId
from ..wire.protocol import Arg, ArgKind
from .session import Relayed


def format_arg(arg: Arg, value: ArgValue, objects: Callable[[int], str]) -> str:
    kind = arg.kind
    if value is None:
        return "nil"
    if isinstance(value, UntypedNewId):
        return f"new id {value.interface}#{value.version}@{value.id}"
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


class ProtocolLog:
    """Writes ``Relayed`` records to a stream."""

    def __init__(self, stream: TextIO, clock: Callable[[], float] = time.monotonic) -> None:
        self.stream = stream
        self.clock = clock

    def tracer(self, client: int, objects: Callable[[int], str]) -> Callable[[Relayed], None]:
        def write(record: Relayed) -> None:
            names = _upstream_name if record.upstream else objects
            args = ", ".join(
                format_arg(a, v, names)
                for a, v in zip(record.spec.args, record.args, strict=True)
            )
            note = f"  # {record.note}" if record.note else ""
            self.stream.write(
                f"[{self.clock() * 1000:13.3f}] client#{client} {record.direction.value} "
                f"{record.obj}.{record.spec.name}({args}){note}\n"
            )
        return write


def _upstream_name(object_id: int) -> str:
    return f"@{object_id}"
