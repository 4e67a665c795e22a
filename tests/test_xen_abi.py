"""xen_abi's layouts, ioctl numbers and flags equal what gcc says of the real uapi headers.

A small C program includes <xen/gntalloc.h>, <xen/gntdev.h> and <xen/evtchn.h>
(Debian package linux-libc-dev) and prints sizeof/offsetof of every struct and
field the backend uses, every ioctl number and flag. Missing gcc or headers is a
failure, not a skip: this is the only check that the backend's bytes are right.
``c_abi()`` is shared with test_xen_backend.
"""

from __future__ import annotations

import functools
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest

from qubesshm.grants import xen_abi

# What the backend uses, written out independently of xen_abi: struct -> fields.
STRUCT_FIELDS: dict[str, tuple[str, ...]] = {
    "ioctl_gntalloc_alloc_gref": ("domid", "flags", "count", "index", "gref_ids"),
    "ioctl_gntalloc_dealloc_gref": ("index", "count"),
    "ioctl_gntalloc_unmap_notify": ("index", "action", "event_channel_port"),
    "ioctl_gntdev_grant_ref": ("domid", "ref"),
    "ioctl_gntdev_map_grant_ref": ("count", "pad", "index", "refs"),
    "ioctl_gntdev_unmap_grant_ref": ("index", "count", "pad"),
    "ioctl_gntdev_unmap_notify": ("index", "action", "event_channel_port"),
    "ioctl_evtchn_bind_interdomain": ("remote_domain", "remote_port"),
    "ioctl_evtchn_bind_unbound_port": ("remote_domain",),
    "ioctl_evtchn_unbind": ("port",),
    "ioctl_evtchn_notify": ("port",),
}
IOCTL_NAMES = (
    "IOCTL_GNTALLOC_ALLOC_GREF",
    "IOCTL_GNTALLOC_DEALLOC_GREF",
    "IOCTL_GNTALLOC_SET_UNMAP_NOTIFY",
    "IOCTL_GNTDEV_MAP_GRANT_REF",
    "IOCTL_GNTDEV_UNMAP_GRANT_REF",
    "IOCTL_GNTDEV_SET_UNMAP_NOTIFY",
    "IOCTL_EVTCHN_BIND_INTERDOMAIN",
    "IOCTL_EVTCHN_BIND_UNBOUND_PORT",
    "IOCTL_EVTCHN_UNBIND",
    "IOCTL_EVTCHN_NOTIFY",
)
FLAG_NAMES = ("GNTALLOC_FLAG_WRITABLE", "UNMAP_NOTIFY_CLEAR_BYTE", "UNMAP_NOTIFY_SEND_EVENT")

INSTALL_HINT = ("install gcc and the kernel uapi headers: apt-get install gcc linux-libc-dev "
                "(the headers are /usr/include/xen/{gntalloc,gntdev,evtchn}.h from the Debian "
                "package linux-libc-dev)")

# The headers are not self-contained: their ioctl numbers use _IOC without including
# <linux/ioctl.h>, and gntdev.h (grant copy) and evtchn.h (restrict domid) use
# grant_ref_t and domid_t, which no uapi header defines (declared as Xen's public
# headers do).
C_PRELUDE = """\
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <linux/ioctl.h>
typedef uint32_t grant_ref_t;
typedef uint16_t domid_t;
#include <xen/gntalloc.h>
#include <xen/gntdev.h>
#include <xen/evtchn.h>

int main(void)
{
"""


@dataclass(frozen=True)
class CAbi:
    """What the C compiler says: sizes, (offset, size) per field, constants."""

    sizes: dict[str, int]
    fields: dict[str, dict[str, tuple[int, int]]]
    constants: dict[str, int]


def c_program() -> str:
    lines = [C_PRELUDE]
    for struct, fields in STRUCT_FIELDS.items():
        lines.append(f'    printf("size {struct} %zu\\n", sizeof(struct {struct}));\n')
        for field in fields:
            lines.append(f'    printf("field {struct} {field} %zu %zu\\n", '
                         f"offsetof(struct {struct}, {field}), "
                         f"sizeof(((struct {struct} *)0)->{field}));\n")
    for name in (*IOCTL_NAMES, *FLAG_NAMES):
        lines.append(f'    printf("const {name} %lu\\n", (unsigned long)({name}));\n')
    lines.append("    return 0;\n}\n")
    return "".join(lines)


@functools.cache
def c_abi() -> CAbi:
    """Compile and run the C program once per session; fail if that is impossible."""
    gcc = shutil.which("gcc")
    if gcc is None:
        pytest.fail(f"gcc is not installed; {INSTALL_HINT}")
    with tempfile.TemporaryDirectory(prefix="qubesshm-xen-abi-") as tmp:
        source = Path(tmp) / "abi.c"
        binary = Path(tmp) / "abi"
        source.write_text(c_program())
        built = subprocess.run([gcc, "-std=c11", "-Wall", "-o", str(binary), str(source)],
                               capture_output=True, text=True, timeout=120, check=False)
        if built.returncode != 0:
            pytest.fail(f"compiling against <xen/*.h> failed (if a header is missing, "
                        f"{INSTALL_HINT}):\n{built.stderr}")
        ran = subprocess.run([str(binary)], capture_output=True, text=True, timeout=60,
                             check=True)
    sizes: dict[str, int] = {}
    fields: dict[str, dict[str, tuple[int, int]]] = {}
    constants: dict[str, int] = {}
    for line in ran.stdout.splitlines():
        kind, *rest = line.split()
        if kind == "size":
            sizes[rest[0]] = int(rest[1])
        elif kind == "field":
            fields.setdefault(rest[0], {})[rest[1]] = (int(rest[2]), int(rest[3]))
        else:
            constants[rest[0]] = int(rest[1])
    return CAbi(sizes=sizes, fields=fields, constants=constants)


def test_xen_abi_describes_exactly_the_structs_ioctls_and_flags_checked_here() -> None:
    assert {s: tuple(layout.fields) for s, layout in xen_abi.LAYOUTS.items()} == STRUCT_FIELDS
    assert set(xen_abi.IOCTLS) == set(IOCTL_NAMES)
    assert set(xen_abi.FLAGS) == set(FLAG_NAMES)


@pytest.mark.parametrize("struct", sorted(STRUCT_FIELDS))
def test_struct_size(struct: str) -> None:
    assert xen_abi.LAYOUTS[struct].size == c_abi().sizes[struct]
    assert xen_abi.kernel_sizeof(struct) == c_abi().sizes[struct]


@pytest.mark.parametrize("struct", sorted(STRUCT_FIELDS))
def test_field_offsets_and_sizes(struct: str) -> None:
    ours = {name: (f.offset, f.size) for name, f in xen_abi.LAYOUTS[struct].fields.items()}
    assert ours == c_abi().fields[struct]


@pytest.mark.parametrize("name", IOCTL_NAMES)
def test_ioctl_number(name: str) -> None:
    assert xen_abi.IOCTLS[name] == c_abi().constants[name], hex(c_abi().constants[name])
    assert getattr(xen_abi, name) == xen_abi.IOCTLS[name]


@pytest.mark.parametrize("name", FLAG_NAMES)
def test_flag(name: str) -> None:
    assert xen_abi.FLAGS[name] == c_abi().constants[name]
    assert getattr(xen_abi, name) == xen_abi.FLAGS[name]


def test_alloc_gref_size_includes_one_padded_array_element() -> None:
    # The brief's worked example: 16 bytes of header plus one u32, padded to 8.
    assert c_abi().sizes["ioctl_gntalloc_alloc_gref"] == 24
    number = xen_abi.IOCTL_GNTALLOC_ALLOC_GREF
    assert number == (24 << 16) | (ord("G") << 8) | 5


def test_ioctl_numbers_decode_to_the_documented_type_and_nr() -> None:
    # DESIGN.md section 3: gntalloc 'G' 5/6/7, gntdev 'G' 0/1/7, evtchn 'E' 1..4, _IOC_NONE.
    documented = {
        "IOCTL_GNTALLOC_ALLOC_GREF": ("G", 5), "IOCTL_GNTALLOC_DEALLOC_GREF": ("G", 6),
        "IOCTL_GNTALLOC_SET_UNMAP_NOTIFY": ("G", 7), "IOCTL_GNTDEV_MAP_GRANT_REF": ("G", 0),
        "IOCTL_GNTDEV_UNMAP_GRANT_REF": ("G", 1), "IOCTL_GNTDEV_SET_UNMAP_NOTIFY": ("G", 7),
        "IOCTL_EVTCHN_BIND_INTERDOMAIN": ("E", 1), "IOCTL_EVTCHN_BIND_UNBOUND_PORT": ("E", 2),
        "IOCTL_EVTCHN_UNBIND": ("E", 3), "IOCTL_EVTCHN_NOTIFY": ("E", 4),
    }
    for name, (kind, nr) in documented.items():
        number = c_abi().constants[name]
        assert number >> 30 == 0, name
        assert (chr((number >> 8) & 0xFF), number & 0xFF) == (kind, nr), name
