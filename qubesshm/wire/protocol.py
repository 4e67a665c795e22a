"""Protocol tables: the interfaces the proxy understands, as per-opcode signatures.

The XML in ``protocols/`` (and any ``--protocol-dir``) is parsed once at start-up
with ``pywayland.scanner`` into compact, immutable signatures that the codec and
the object tracker consult for every message.
"""

from __future__ import annotations

import enum
import os
import xml.etree.ElementTree as ET
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pywayland.scanner.argument import ArgumentType
from pywayland.scanner.protocol import Protocol as ScannedProtocol


class ArgKind(enum.IntEnum):
    INT = 0
    UINT = 1
    FIXED = 2
    STRING = 3
    OBJECT = 4
    NEW_ID = 5
    ARRAY = 6
    FD = 7


_KIND_FROM_SCANNER = {
    ArgumentType.Int: ArgKind.INT,
    ArgumentType.Uint: ArgKind.UINT,
    ArgumentType.Fixed: ArgKind.FIXED,
    ArgumentType.String: ArgKind.STRING,
    ArgumentType.Object: ArgKind.OBJECT,
    ArgumentType.NewId: ArgKind.NEW_ID,
    ArgumentType.Array: ArgKind.ARRAY,
    ArgumentType.FileDescriptor: ArgKind.FD,
}


@dataclass(frozen=True, slots=True)
class Arg:
    name: str
    kind: ArgKind
    interface: str | None = None
    nullable: bool = False

    @property
    def untyped_new_id(self) -> bool:
        """A new_id with no interface travels as (interface string, version, id)."""
        return self.kind is ArgKind.NEW_ID and self.interface is None


@dataclass(frozen=True, slots=True)
class MessageSpec:
    interface: str
    name: str
    opcode: int
    args: tuple[Arg, ...]
    since: int = 1
    destructor: bool = False
    fd_count: int = field(init=False)
    new_id_index: int | None = field(init=False)
    # The object arguments with their indices (what is checked to be live objects),
    # and those with the new_id arguments (what names an object: translated, or 0-checked).
    object_args: tuple[tuple[int, Arg], ...] = field(init=False, repr=False)
    id_args: tuple[tuple[int, Arg], ...] = field(init=False, repr=False)
    # The codec's precompiled decoder for this signature, made on first use.
    codec_plan: object = field(default=None, init=False, compare=False, repr=False)
    # The relay's fast-path plan for this message, made on first use.
    relay_plan: object = field(default=None, init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "fd_count", sum(a.kind is ArgKind.FD for a in self.args))
        new_ids = [i for i, a in enumerate(self.args) if a.kind is ArgKind.NEW_ID]
        if len(new_ids) > 1:
            raise ProtocolLoadError(f"{self.interface}.{self.name} creates more than one object")
        object.__setattr__(self, "new_id_index", new_ids[0] if new_ids else None)
        object.__setattr__(self, "object_args", tuple(
            (i, a) for i, a in enumerate(self.args) if a.kind is ArgKind.OBJECT))
        object.__setattr__(self, "id_args", tuple(
            (i, a) for i, a in enumerate(self.args)
            if a.kind is ArgKind.OBJECT or a.kind is ArgKind.NEW_ID))

    def __str__(self) -> str:
        return f"{self.interface}.{self.name}"


@dataclass(frozen=True, slots=True)
class InterfaceSpec:
    name: str
    version: int
    requests: tuple[MessageSpec, ...]
    events: tuple[MessageSpec, ...]
    # Where it came from, for error messages; identical definitions from two files agree.
    source: str = field(default="", compare=False)


class ProtocolLoadError(ValueError):
    """A protocol file cannot be used."""


class ProtocolTable:
    """All known interfaces by name."""

    def __init__(self, interfaces: Iterable[InterfaceSpec] = ()) -> None:
        self.interfaces: dict[str, InterfaceSpec] = {}
        for spec in interfaces:
            self.add(spec)

    def add(self, spec: InterfaceSpec) -> None:
        known = self.interfaces.get(spec.name)
        if known is not None and known != spec:
            raise ProtocolLoadError(
                f"interface {spec.name} is defined twice, differently: "
                f"{known.source} (version {known.version}) and {spec.source} "
                f"(version {spec.version})"
            )
        self.interfaces[spec.name] = spec

    def __contains__(self, name: object) -> bool:
        return name in self.interfaces

    def __getitem__(self, name: str) -> InterfaceSpec:
        return self.interfaces[name]

    def get(self, name: str) -> InterfaceSpec | None:
        return self.interfaces.get(name)

    def __len__(self) -> int:
        return len(self.interfaces)

    def messages(self) -> Iterable[MessageSpec]:
        for spec in self.interfaces.values():
            yield from spec.requests
            yield from spec.events


def _event_name(name: str) -> str:
    # pywayland renames events that collide with Python keywords; the wire name is what we log.
    return name[:-1] if name in ("global_", "import_") else name


def _message(
    # A pywayland scanner Message: Any, so that its typing (or a lack of it) in any
    # pywayland release changes nothing here.
    interface: str, opcode: int, scanned: Any, element: ET.Element
) -> MessageSpec:
    args = tuple(
        Arg(
            name=a.name,
            kind=_KIND_FROM_SCANNER[a.type],
            interface=a.interface,
            nullable=bool(a.allow_null),
        )
        for a in scanned.arg
    )
    since = scanned.since
    return MessageSpec(
        interface=interface,
        name=_event_name(scanned.name),
        opcode=opcode,
        args=args,
        since=int(since) if since else 1,
        # pywayland's scanner keeps the destructor type for requests only.
        destructor=element.get("type") == "destructor",
    )


def parse_protocol_file(path: Path) -> list[InterfaceSpec]:
    """Signatures of every interface in one protocol XML file."""
    try:
        root = ET.parse(path).getroot()
        scanned = ScannedProtocol.parse(root)
    except (ET.ParseError, ValueError, KeyError, AttributeError) as exc:
        raise ProtocolLoadError(f"{path}: not a usable Wayland protocol file: {exc}") from exc
    out = []
    for iface, iface_el in zip(scanned.interface, root.findall("interface"), strict=True):
        requests = tuple(
            _message(iface.name, i, r, el)
            for i, (r, el) in enumerate(zip(iface.request, iface_el.findall("request"),
                                            strict=True))
        )
        events = tuple(
            _message(iface.name, i, e, el)
            for i, (e, el) in enumerate(zip(iface.event, iface_el.findall("event"),
                                            strict=True))
        )
        out.append(
            InterfaceSpec(
                name=iface.name,
                version=int(iface.version),
                requests=requests,
                events=events,
                source=str(path),
            )
        )
    return out


def bundled_protocol_dir() -> Path:
    """The ``protocols/`` shipped with qubesshm: inside the wheel, or the source checkout."""
    here = Path(__file__).resolve().parent.parent
    for candidate in (here / "_protocols", here.parent / "protocols"):
        if (candidate / "wayland.xml").is_file():
            return candidate
    raise ProtocolLoadError(
        f"no protocol definitions found (looked in {here / '_protocols'} and "
        f"{here.parent / 'protocols'}); reinstall qubesshm"
    )


def load_protocols(extra_dirs: Sequence[str | os.PathLike[str]] = ()) -> ProtocolTable:
    """The bundled protocols plus every ``*.xml`` in ``extra_dirs``."""
    table = ProtocolTable()
    dirs = [bundled_protocol_dir(), *(Path(d) for d in extra_dirs)]
    for directory in dirs:
        if not directory.is_dir():
            raise ProtocolLoadError(f"protocol directory {directory} does not exist")
        files = sorted(directory.glob("*.xml"))
        if not files and directory != dirs[0]:
            raise ProtocolLoadError(f"protocol directory {directory} holds no *.xml file")
        for path in files:
            for spec in parse_protocol_file(path):
                table.add(spec)
    if "wl_display" not in table:
        raise ProtocolLoadError("the protocol set lacks wayland.xml (wl_display)")
    return table
