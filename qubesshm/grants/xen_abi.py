"""The kernel ABI of ``/dev/xen/gntalloc``, ``gntdev`` and ``evtchn``, and how to pack it.

This is where the real backend's bytes are laid out: the ioctl argument structs as
cffi declarations (ABI mode, so nothing is compiled at run time), the ioctl numbers
computed the way ``<asm-generic/ioctl.h>`` does, the flags, and one pack/unpack
function per ioctl that turns Python values into the exact bytes the kernel reads
and back. It touches no device, so all of it is testable on a machine without Xen;
``tests/test_xen_abi.py`` checks every size, offset and number here against the
real uapi headers (Debian package ``linux-libc-dev``) compiled with gcc.

The layouts are the x86-64 ones (cffi lays the structs out with the host's C ABI,
as the kernel does for a native process). The variable-length structs end in a
flexible array here, so ``ffi.new`` can size them for ``count`` elements; the
kernel headers declare that array with one element, so the ``sizeof`` encoded in
the ioctl number, and the least the kernel copies in, includes one element padded
to the struct's alignment (``kernel_sizeof``).
"""

from __future__ import annotations

import errno
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import cffi

CDEF = """
/* <xen/gntalloc.h> */
struct ioctl_gntalloc_alloc_gref {
    uint16_t domid;
    uint16_t flags;
    uint32_t count;
    uint64_t index;          /* out: mmap offset */
    uint32_t gref_ids[];     /* out: one per page; the header says [1] */
};
struct ioctl_gntalloc_dealloc_gref {
    uint64_t index;
    uint32_t count;
};
struct ioctl_gntalloc_unmap_notify {
    uint64_t index;
    uint32_t action;
    uint32_t event_channel_port;
};

/* <xen/gntdev.h> */
struct ioctl_gntdev_grant_ref {
    uint32_t domid;
    uint32_t ref;
};
struct ioctl_gntdev_map_grant_ref {
    uint32_t count;
    uint32_t pad;
    uint64_t index;          /* out: mmap offset */
    struct ioctl_gntdev_grant_ref refs[];   /* the header says [1] */
};
struct ioctl_gntdev_unmap_grant_ref {
    uint64_t index;
    uint32_t count;
    uint32_t pad;
};
struct ioctl_gntdev_unmap_notify {
    uint64_t index;
    uint32_t action;
    uint32_t event_channel_port;
};

/* <xen/evtchn.h>: unsigned int there, 32 bits on every Linux ABI */
struct ioctl_evtchn_bind_interdomain {
    uint32_t remote_domain;
    uint32_t remote_port;
};
struct ioctl_evtchn_bind_unbound_port {
    uint32_t remote_domain;
};
struct ioctl_evtchn_unbind {
    uint32_t port;
};
struct ioctl_evtchn_notify {
    uint32_t port;
};
"""

ffi: Any = cffi.FFI()
ffi.cdef(CDEF)

# -- the Linux _IOC encoding (asm-generic/ioctl.h, used by x86) -----------------------

_IOC_NRSHIFT = 0
_IOC_TYPESHIFT = 8
_IOC_SIZESHIFT = 16
_IOC_DIRSHIFT = 30
_IOC_NONE = 0
_IOC_SIZEMASK = (1 << 14) - 1


def _ioc(direction: int, kind: str, nr: int, size: int) -> int:
    if not 0 <= size <= _IOC_SIZEMASK:
        raise ValueError(f"ioctl argument size {size} does not fit _IOC's 14 bits")
    return ((direction << _IOC_DIRSHIFT) | (size << _IOC_SIZESHIFT)
            | (ord(kind) << _IOC_TYPESHIFT) | (nr << _IOC_NRSHIFT))


def _round_up(value: int, alignment: int) -> int:
    return -(-value // alignment) * alignment


def _flexible_field(struct: str) -> tuple[str, Any] | None:
    """The struct's trailing flexible array (name, field), if it has one."""
    name, field = ffi.typeof(f"struct {struct}").fields[-1]
    if field.type.kind == "array" and field.type.length is None:
        return name, field
    return None


def kernel_sizeof(struct: str) -> int:
    """``sizeof(struct <struct>)`` as the kernel header has it (arrays of one element)."""
    flexible = _flexible_field(struct)
    if flexible is None:
        return int(ffi.sizeof(f"struct {struct}"))
    _, field = flexible
    end = field.offset + ffi.sizeof(field.type.item)
    return _round_up(end, ffi.alignof(f"struct {struct}"))


def _ioc_none(kind: str, nr: int, struct: str) -> int:
    return _ioc(_IOC_NONE, kind, nr, kernel_sizeof(struct))


IOCTL_GNTALLOC_ALLOC_GREF = _ioc_none("G", 5, "ioctl_gntalloc_alloc_gref")
IOCTL_GNTALLOC_DEALLOC_GREF = _ioc_none("G", 6, "ioctl_gntalloc_dealloc_gref")
IOCTL_GNTALLOC_SET_UNMAP_NOTIFY = _ioc_none("G", 7, "ioctl_gntalloc_unmap_notify")
IOCTL_GNTDEV_MAP_GRANT_REF = _ioc_none("G", 0, "ioctl_gntdev_map_grant_ref")
IOCTL_GNTDEV_UNMAP_GRANT_REF = _ioc_none("G", 1, "ioctl_gntdev_unmap_grant_ref")
IOCTL_GNTDEV_SET_UNMAP_NOTIFY = _ioc_none("G", 7, "ioctl_gntdev_unmap_notify")
IOCTL_EVTCHN_BIND_INTERDOMAIN = _ioc_none("E", 1, "ioctl_evtchn_bind_interdomain")
IOCTL_EVTCHN_BIND_UNBOUND_PORT = _ioc_none("E", 2, "ioctl_evtchn_bind_unbound_port")
IOCTL_EVTCHN_UNBIND = _ioc_none("E", 3, "ioctl_evtchn_unbind")
IOCTL_EVTCHN_NOTIFY = _ioc_none("E", 4, "ioctl_evtchn_notify")

GNTALLOC_FLAG_WRITABLE = 1
UNMAP_NOTIFY_CLEAR_BYTE = 0x1
UNMAP_NOTIFY_SEND_EVENT = 0x2

IOCTLS: Mapping[str, int] = {
    "IOCTL_GNTALLOC_ALLOC_GREF": IOCTL_GNTALLOC_ALLOC_GREF,
    "IOCTL_GNTALLOC_DEALLOC_GREF": IOCTL_GNTALLOC_DEALLOC_GREF,
    "IOCTL_GNTALLOC_SET_UNMAP_NOTIFY": IOCTL_GNTALLOC_SET_UNMAP_NOTIFY,
    "IOCTL_GNTDEV_MAP_GRANT_REF": IOCTL_GNTDEV_MAP_GRANT_REF,
    "IOCTL_GNTDEV_UNMAP_GRANT_REF": IOCTL_GNTDEV_UNMAP_GRANT_REF,
    "IOCTL_GNTDEV_SET_UNMAP_NOTIFY": IOCTL_GNTDEV_SET_UNMAP_NOTIFY,
    "IOCTL_EVTCHN_BIND_INTERDOMAIN": IOCTL_EVTCHN_BIND_INTERDOMAIN,
    "IOCTL_EVTCHN_BIND_UNBOUND_PORT": IOCTL_EVTCHN_BIND_UNBOUND_PORT,
    "IOCTL_EVTCHN_UNBIND": IOCTL_EVTCHN_UNBIND,
    "IOCTL_EVTCHN_NOTIFY": IOCTL_EVTCHN_NOTIFY,
}

FLAGS: Mapping[str, int] = {
    "GNTALLOC_FLAG_WRITABLE": GNTALLOC_FLAG_WRITABLE,
    "UNMAP_NOTIFY_CLEAR_BYTE": UNMAP_NOTIFY_CLEAR_BYTE,
    "UNMAP_NOTIFY_SEND_EVENT": UNMAP_NOTIFY_SEND_EVENT,
}

# -- the layout table the ABI test compares with the C compiler's -------------------


@dataclass(frozen=True, slots=True)
class FieldLayout:
    """Where a field sits; for an array, ``size`` is that of one element."""

    offset: int
    size: int


@dataclass(frozen=True, slots=True)
class StructLayout:
    """A struct's kernel ``sizeof`` and its fields in declaration order."""

    size: int
    fields: Mapping[str, FieldLayout]


def _layout(struct: str) -> StructLayout:
    fields: dict[str, FieldLayout] = {}
    for name, field in ffi.typeof(f"struct {struct}").fields:
        ctype = field.type.item if field.type.kind == "array" else field.type
        fields[name] = FieldLayout(offset=field.offset, size=ffi.sizeof(ctype))
    return StructLayout(size=kernel_sizeof(struct), fields=fields)


STRUCTS = (
    "ioctl_gntalloc_alloc_gref",
    "ioctl_gntalloc_dealloc_gref",
    "ioctl_gntalloc_unmap_notify",
    "ioctl_gntdev_grant_ref",
    "ioctl_gntdev_map_grant_ref",
    "ioctl_gntdev_unmap_grant_ref",
    "ioctl_gntdev_unmap_notify",
    "ioctl_evtchn_bind_interdomain",
    "ioctl_evtchn_bind_unbound_port",
    "ioctl_evtchn_unbind",
    "ioctl_evtchn_notify",
)
LAYOUTS: Mapping[str, StructLayout] = {struct: _layout(struct) for struct in STRUCTS}

# -- packing: Python values <-> the bytes an ioctl reads and writes ------------------


def _new(struct: str, init: Mapping[str, Any]) -> bytes:
    """The bytes of ``struct`` with ``init``, at least the kernel's sizeof long."""
    flexible = _flexible_field(struct)
    values = dict(init)
    if flexible is not None:
        name, field = flexible
        items = list(values.get(name, ()))
        # The kernel copies in sizeof(struct) with its one-element array: never
        # hand it fewer bytes than that, even for zero or one element.
        least = -(-(kernel_sizeof(struct) - field.offset) // ffi.sizeof(field.type.item))
        zero: Any = {} if field.type.item.kind == "struct" else 0
        values[name] = items + [zero] * max(0, least - len(items))
    try:
        cdata = ffi.new(f"struct {struct} *", values)
    except OverflowError as exc:
        raise OSError(errno.EINVAL, f"struct {struct}: a value is out of range ({exc})") from exc
    return bytes(ffi.buffer(cdata))


def _view(struct: str, buf: bytes | bytearray) -> Any:
    return ffi.from_buffer(f"struct {struct} *", buf)


def pack_alloc_gref(domid: int, count: int, writable: bool) -> bytes:
    """``IOCTL_GNTALLOC_ALLOC_GREF``'s argument, with room for ``count`` grant refs."""
    flags = GNTALLOC_FLAG_WRITABLE if writable else 0
    return _new("ioctl_gntalloc_alloc_gref",
                {"domid": domid, "flags": flags, "count": count, "gref_ids": [0] * count})


def unpack_alloc_gref(buf: bytes | bytearray) -> tuple[int, tuple[int, ...]]:
    """The mmap offset and the ``count`` grant refs the kernel wrote back."""
    view = _view("ioctl_gntalloc_alloc_gref", buf)
    return int(view.index), tuple(int(view.gref_ids[i]) for i in range(view.count))


def pack_dealloc_gref(index: int, count: int) -> bytes:
    return _new("ioctl_gntalloc_dealloc_gref", {"index": index, "count": count})


def pack_gntalloc_unmap_notify(index: int, action: int, port: int) -> bytes:
    return _new("ioctl_gntalloc_unmap_notify",
                {"index": index, "action": action, "event_channel_port": port})


def pack_map_grant_ref(grants: Sequence[tuple[int, int]]) -> bytes:
    """``IOCTL_GNTDEV_MAP_GRANT_REF``'s argument for ``(domid, ref)`` per page."""
    return _new("ioctl_gntdev_map_grant_ref",
                {"count": len(grants),
                 "refs": [{"domid": domid, "ref": ref} for domid, ref in grants]})


def unpack_map_grant_ref(buf: bytes | bytearray) -> int:
    """The mmap offset the kernel wrote back (0 for the first mapping on an fd)."""
    return int(_view("ioctl_gntdev_map_grant_ref", buf).index)


def pack_unmap_grant_ref(index: int, count: int) -> bytes:
    return _new("ioctl_gntdev_unmap_grant_ref", {"index": index, "count": count})


def pack_gntdev_unmap_notify(index: int, action: int, port: int) -> bytes:
    return _new("ioctl_gntdev_unmap_notify",
                {"index": index, "action": action, "event_channel_port": port})


def pack_bind_interdomain(remote_domain: int, remote_port: int) -> bytes:
    return _new("ioctl_evtchn_bind_interdomain",
                {"remote_domain": remote_domain, "remote_port": remote_port})


def pack_bind_unbound_port(remote_domain: int) -> bytes:
    return _new("ioctl_evtchn_bind_unbound_port", {"remote_domain": remote_domain})


def pack_unbind(port: int) -> bytes:
    return _new("ioctl_evtchn_unbind", {"port": port})


def pack_notify(port: int) -> bytes:
    return _new("ioctl_evtchn_notify", {"port": port})


def notify_action(clear_byte: bool, send_event: bool) -> int:
    """The ``action`` bits of an unmap-notify request."""
    return (UNMAP_NOTIFY_CLEAR_BYTE if clear_byte else 0) | (
        UNMAP_NOTIFY_SEND_EVENT if send_event else 0)


# The event channel device reads and writes bare evtchn_port_t (u32) values.
PORT_SIZE = 4


def pack_ports(ports: Iterable[int]) -> bytes:
    """Ports as ``/dev/xen/evtchn`` takes them on ``write`` (to unmask)."""
    try:
        cdata = ffi.new("uint32_t[]", list(ports))
    except OverflowError as exc:
        raise OSError(errno.EINVAL, f"an event channel port is out of range ({exc})") from exc
    return bytes(ffi.buffer(cdata))


def unpack_ports(buf: bytes | bytearray) -> list[int]:
    """Ports as ``/dev/xen/evtchn`` returns them from ``read`` (fired, now masked)."""
    if len(buf) % PORT_SIZE:
        raise OSError(errno.EIO, f"event channel read of {len(buf)} bytes is not whole ports")
    if not buf:
        return []
    view = ffi.from_buffer("uint32_t[]", buf)
    return [int(view[i]) for i in range(len(buf) // PORT_SIZE)]
