"""The real backend without Xen: clear errors, exact ioctl bytes, and its calls in order.

No machine running the tests has Xen, so: ``XenBackend()`` must say the devices are
missing and how to pick the simulated backend; the pack/unpack functions must
produce the bytes the C compiler lays out (offsets from test_xen_abi's C program,
and struct.pack of the same layout); and with regular files standing in for the
devices, every ioctl fails with the kernel's ENOTTY named, or, with a fake
``ioctl`` playing the kernel, the backend issues the right requests in the right
order.
"""

from __future__ import annotations

import errno
import fcntl
import mmap
import os
import struct
import sys
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest
from test_xen_abi import c_abi

from qubesshm.grants import xen, xen_abi
from qubesshm.grants.api import (
    PAGE_SIZE,
    MappedArea,
    ReclaimStatus,
    SharedArea,
    UnmapNotify,
    Unshared,
)
from qubesshm.grants.params import ModuleParams
from qubesshm.grants.xen import BackendUnavailable, XenBackend

# -- no Xen here ----------------------------------------------------------------------


@pytest.mark.skipif(Path("/dev/xen/gntalloc").exists(), reason="this machine runs under Xen")
def test_without_xen_the_backend_is_unavailable_and_says_how_to_pick_sim() -> None:
    with pytest.raises(BackendUnavailable) as raised:
        XenBackend()
    assert isinstance(raised.value, OSError)
    assert raised.value.errno == errno.ENOENT
    message = str(raised.value)
    assert "/dev/xen/gntalloc" in message
    assert "--grants sim" in message
    assert "QUBESSHM_GRANTS=sim" in message


@pytest.mark.parametrize(("present", "missing"), [
    ((), "gntalloc"),
    (("gntalloc",), "gntdev"),
    (("gntalloc", "gntdev"), "evtchn"),
    (("gntdev", "evtchn"), "gntalloc"),
    (("gntalloc", "evtchn"), "gntdev"),
])
def test_the_first_missing_device_is_named(tmp_path: Path, present: tuple[str, ...],
                                           missing: str) -> None:
    for name in present:
        (tmp_path / name).touch()
    with pytest.raises(BackendUnavailable) as raised:
        XenBackend(device_dir=tmp_path)
    assert raised.value.filename == str(tmp_path / missing)
    assert str(tmp_path / missing) in str(raised.value)
    assert "--grants sim" in str(raised.value)


def test_a_device_we_may_not_open_says_to_run_as_root_or_join_its_group(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in xen.DEVICES:
        (tmp_path / name).touch()

    def refuse(path: Any, flags: int, mode: int = 0o777) -> int:
        raise PermissionError(errno.EACCES, "Permission denied", str(path))

    monkeypatch.setattr(os, "open", refuse)
    with pytest.raises(PermissionError) as raised:
        XenBackend(device_dir=tmp_path)
    assert raised.value.errno == errno.EACCES
    message = str(raised.value)
    assert str(tmp_path / "gntalloc") in message
    assert "run as root or join the group owning" in message


# -- the bytes of each ioctl, against the C compiler's layout -------------------------


def c_bytes(struct_name: str,
            values: Mapping[str, int | Sequence[int | tuple[int, int]]],
            *, elements: int = 1) -> bytes:
    """The struct's bytes laid out from the C program's offsets and sizes alone.

    An array field takes a list; the buffer holds ``max(1, elements)`` of them, or
    the C ``sizeof`` if that is larger. A struct array takes tuples of its fields.
    """
    abi = c_abi()
    fields = abi.fields[struct_name]
    last = list(fields)[-1]
    offset, item = fields[last]
    length = max(abi.sizes[struct_name], offset + item * max(1, elements))
    buf = bytearray(length)
    for name, value in values.items():
        offset, size = fields[name]
        if isinstance(value, int):
            buf[offset:offset + size] = value.to_bytes(size, sys.byteorder)
            continue
        for i, element in enumerate(value):
            at = offset + i * size
            if isinstance(element, tuple):  # struct ioctl_gntdev_grant_ref
                sub = abi.fields["ioctl_gntdev_grant_ref"]
                for (field, (sub_offset, sub_size)), part in zip(sub.items(), element,
                                                                 strict=True):
                    assert field in ("domid", "ref")
                    buf[at + sub_offset:at + sub_offset + sub_size] = part.to_bytes(
                        sub_size, sys.byteorder)
            else:
                buf[at:at + size] = element.to_bytes(size, sys.byteorder)
    return bytes(buf)


def test_pack_alloc_gref() -> None:
    packed = xen_abi.pack_alloc_gref(7, 3, True)
    assert packed == struct.pack("=HHIQ3I", 7, 1, 3, 0, 0, 0, 0)
    assert packed == c_bytes("ioctl_gntalloc_alloc_gref",
                             {"domid": 7, "flags": 1, "count": 3}, elements=3)
    assert xen_abi.pack_alloc_gref(0xFFFF, 2, False) == struct.pack("=HHIQ2I", 0xFFFF, 0, 2,
                                                                    0, 0, 0)


@pytest.mark.parametrize("count", [0, 1])
def test_alloc_gref_is_never_shorter_than_the_kernel_sizeof(count: int) -> None:
    packed = xen_abi.pack_alloc_gref(1, count, False)
    assert len(packed) == c_abi().sizes["ioctl_gntalloc_alloc_gref"]
    assert packed == c_bytes("ioctl_gntalloc_alloc_gref", {"domid": 1, "count": count})


def test_unpack_alloc_gref() -> None:
    answer = struct.pack("=HHIQ3I", 7, 1, 3, 0x5000, 11, 12, 13)
    assert xen_abi.unpack_alloc_gref(answer) == (0x5000, (11, 12, 13))
    assert xen_abi.unpack_alloc_gref(bytearray(answer)) == (0x5000, (11, 12, 13))
    answer = c_bytes("ioctl_gntalloc_alloc_gref",
                     {"count": 2, "index": 1 << 40, "gref_ids": [0xFFFFFFFF, 9]}, elements=2)
    assert xen_abi.unpack_alloc_gref(answer) == (1 << 40, (0xFFFFFFFF, 9))


def test_pack_dealloc_gref() -> None:
    packed = xen_abi.pack_dealloc_gref(0x3000, 5)
    assert packed == struct.pack("=QI4x", 0x3000, 5)
    assert packed == c_bytes("ioctl_gntalloc_dealloc_gref", {"index": 0x3000, "count": 5})


@pytest.mark.parametrize(("pack", "struct_name"), [
    (xen_abi.pack_gntalloc_unmap_notify, "ioctl_gntalloc_unmap_notify"),
    (xen_abi.pack_gntdev_unmap_notify, "ioctl_gntdev_unmap_notify"),
])
def test_pack_unmap_notify(pack: Any, struct_name: str) -> None:
    packed = pack(0x2000 + 17, 3, 42)
    assert packed == struct.pack("=QII", 0x2011, 3, 42)
    assert packed == c_bytes(struct_name,
                             {"index": 0x2011, "action": 3, "event_channel_port": 42})


def test_pack_map_grant_ref() -> None:
    grants = [(1, 10), (2, 0xFFFFFFFF), (0x7FF0, 30)]
    packed = xen_abi.pack_map_grant_ref(grants)
    assert packed == struct.pack("=IIQ6I", 3, 0, 0, 1, 10, 2, 0xFFFFFFFF, 0x7FF0, 30)
    assert packed == c_bytes("ioctl_gntdev_map_grant_ref",
                             {"count": 3, "refs": grants}, elements=3)


def test_pack_map_grant_ref_of_one_is_the_kernel_sizeof() -> None:
    packed = xen_abi.pack_map_grant_ref([(5, 6)])
    assert len(packed) == c_abi().sizes["ioctl_gntdev_map_grant_ref"]
    assert packed == c_bytes("ioctl_gntdev_map_grant_ref", {"count": 1, "refs": [(5, 6)]})


def test_unpack_map_grant_ref() -> None:
    assert xen_abi.unpack_map_grant_ref(struct.pack("=IIQII", 1, 0, 0, 5, 6)) == 0
    answer = c_bytes("ioctl_gntdev_map_grant_ref", {"count": 1, "index": 0x7000})
    assert xen_abi.unpack_map_grant_ref(answer) == 0x7000


def test_pack_unmap_grant_ref() -> None:
    packed = xen_abi.pack_unmap_grant_ref(0x4000, 2)
    assert packed == struct.pack("=QII", 0x4000, 2, 0)
    assert packed == c_bytes("ioctl_gntdev_unmap_grant_ref", {"index": 0x4000, "count": 2})


def test_pack_event_channel_requests() -> None:
    assert xen_abi.pack_bind_interdomain(3, 77) == struct.pack("=II", 3, 77)
    assert xen_abi.pack_bind_interdomain(3, 77) == c_bytes(
        "ioctl_evtchn_bind_interdomain", {"remote_domain": 3, "remote_port": 77})
    assert xen_abi.pack_bind_unbound_port(9) == struct.pack("=I", 9)
    assert xen_abi.pack_bind_unbound_port(9) == c_bytes("ioctl_evtchn_bind_unbound_port",
                                                        {"remote_domain": 9})
    assert xen_abi.pack_unbind(12) == c_bytes("ioctl_evtchn_unbind", {"port": 12})
    assert xen_abi.pack_notify(13) == c_bytes("ioctl_evtchn_notify", {"port": 13})


def test_ports_are_native_u32() -> None:
    assert xen_abi.pack_ports([1, 2, 0xFFFFFFFF]) == struct.pack("=3I", 1, 2, 0xFFFFFFFF)
    assert xen_abi.pack_ports([]) == b""
    assert xen_abi.unpack_ports(struct.pack("=2I", 5, 70000)) == [5, 70000]
    assert xen_abi.unpack_ports(b"") == []
    with pytest.raises(OSError) as raised:
        xen_abi.unpack_ports(b"\x01\x00\x00\x00\x02")
    assert raised.value.errno == errno.EIO


def test_notify_action_bits() -> None:
    assert xen_abi.notify_action(False, False) == 0
    assert xen_abi.notify_action(True, False) == c_abi().constants["UNMAP_NOTIFY_CLEAR_BYTE"]
    assert xen_abi.notify_action(False, True) == c_abi().constants["UNMAP_NOTIFY_SEND_EVENT"]
    assert xen_abi.notify_action(True, True) == 3


@pytest.mark.parametrize("call", [
    lambda: xen_abi.pack_alloc_gref(0x10000, 1, True),
    lambda: xen_abi.pack_alloc_gref(-1, 1, True),
    lambda: xen_abi.pack_map_grant_ref([(1, 1 << 32)]),
    lambda: xen_abi.pack_dealloc_gref(1 << 64, 1),
    lambda: xen_abi.pack_ports([1 << 32]),
])
def test_values_out_of_range_are_einval(call: Any) -> None:
    with pytest.raises(OSError) as raised:
        call()
    assert raised.value.errno == errno.EINVAL


# -- regular files standing in for the devices ---------------------------------------


@pytest.fixture
def fake_dev(tmp_path: Path) -> Path:
    """A device dir of regular files: opening works, every ioctl is ENOTTY."""
    device_dir = tmp_path / "dev"
    device_dir.mkdir()
    for name in xen.DEVICES:
        (device_dir / name).touch()
    # gntalloc's "memory": mmap at the offsets a fake ALLOC_GREF hands out.
    os.truncate(device_dir / "gntalloc", 64 * PAGE_SIZE)
    return device_dir


@pytest.fixture
def backend(fake_dev: Path, tmp_path: Path) -> Iterator[XenBackend]:
    params = tmp_path / "root"
    ModuleParams(params).create_defaults()
    opened = XenBackend(device_dir=fake_dev, params_root=params)
    yield opened
    opened.close()


def open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


def expect_enotty(name: str, call: Any) -> None:
    with pytest.raises(OSError) as raised:
        call()
    assert raised.value.errno == errno.ENOTTY
    assert name in str(raised.value)


def test_every_ioctl_failure_names_the_ioctl_and_keeps_the_errno(backend: XenBackend) -> None:
    expect_enotty("IOCTL_GNTALLOC_ALLOC_GREF", lambda: backend.share(1, 2))
    expect_enotty("IOCTL_EVTCHN_BIND_UNBOUND_PORT", lambda: backend.bind_unbound_port(1))
    expect_enotty("IOCTL_EVTCHN_BIND_INTERDOMAIN", lambda: backend.bind_interdomain(1, 5))
    expect_enotty("IOCTL_EVTCHN_UNBIND", lambda: backend.unbind(5))
    expect_enotty("IOCTL_EVTCHN_NOTIFY", lambda: backend.notify(5))


def test_a_failed_map_closes_its_fresh_fd(backend: XenBackend) -> None:
    before = open_fds()
    expect_enotty("IOCTL_GNTDEV_MAP_GRANT_REF", lambda: backend.map([(1, 10), (1, 11)]))
    assert open_fds() == before


def test_notify_on_a_shared_area(backend: XenBackend) -> None:
    area = SharedArea(index=0, domid=1, refs=(10, 11), writable=True,
                      memory=mmap.mmap(-1, 2 * PAGE_SIZE))
    with pytest.raises(OSError) as raised:
        backend.set_share_notify(area, UnmapNotify(clear_byte=2 * PAGE_SIZE))
    assert raised.value.errno == errno.EINVAL
    expect_enotty("IOCTL_GNTALLOC_SET_UNMAP_NOTIFY",
                  lambda: backend.set_share_notify(area, UnmapNotify(clear_byte=5)))
    assert area.notify is None
    expect_enotty("IOCTL_GNTALLOC_DEALLOC_GREF", lambda: backend.unshare(area))
    assert not area.released and not area.memory.closed
    area.memory.close()


def test_a_failed_unmap_still_closes_the_fd(backend: XenBackend, fake_dev: Path) -> None:
    before = open_fds()
    fd = os.open(fake_dev / "gntdev", os.O_RDWR)
    area = MappedArea(index=0, grants=((1, 10),), fd=fd, writable=True)
    expect_enotty("IOCTL_GNTDEV_SET_UNMAP_NOTIFY",
                  lambda: backend.set_map_notify(area, UnmapNotify(event_port=3)))
    expect_enotty("IOCTL_GNTDEV_UNMAP_GRANT_REF", lambda: backend.unmap(area))
    assert area.released
    assert open_fds() == before


def test_fired_ports_reads_u32s_until_there_are_none(fake_dev: Path, tmp_path: Path) -> None:
    (fake_dev / "evtchn").write_bytes(struct.pack("=3I", 5, 6, 70000))
    with_ports = XenBackend(device_dir=fake_dev, params_root=tmp_path)
    try:
        assert with_ports.fired_ports() == [5, 6, 70000]
        assert with_ports.fired_ports() == []
        with_ports.unmask([5, 6])
    finally:
        with_ports.close()
    assert (fake_dev / "evtchn").read_bytes() == struct.pack("=5I", 5, 6, 70000, 5, 6)


def test_event_fd_is_nonblocking(backend: XenBackend) -> None:
    assert os.get_blocking(backend.event_fd()) is False


def test_status_reads_the_module_parameters(backend: XenBackend) -> None:
    assert backend.status() == ReclaimStatus(free_per_iteration=10, gntalloc_limit=1024,
                                             deferred_count=None, leaked_count=None)
    backend.set_free_per_iteration(10000)
    backend.set_gntalloc_limit(1 << 30)
    assert backend.status() == ReclaimStatus(free_per_iteration=10000,
                                             gntalloc_limit=1 << 30,
                                             deferred_count=None, leaked_count=None)


def test_status_is_none_where_a_parameter_file_is_missing(fake_dev: Path,
                                                          tmp_path: Path) -> None:
    bare = XenBackend(device_dir=fake_dev, params_root=tmp_path / "nowhere")
    try:
        assert bare.status() == ReclaimStatus(None, None, None, None)
        with pytest.raises(OSError) as raised:
            bare.set_free_per_iteration(5)
        assert raised.value.errno == errno.ENOENT
    finally:
        bare.close()


def test_close_is_idempotent(fake_dev: Path, tmp_path: Path) -> None:
    before = open_fds()
    opened = XenBackend(device_dir=fake_dev, params_root=tmp_path)
    opened.close()
    opened.close()
    assert open_fds() == before


# -- a fake kernel answering the ioctls ----------------------------------------------


class FakeKernel:
    """Records each ioctl's name and argument bytes; writes back what Xen would.

    gntalloc's and gntdev's SET_UNMAP_NOTIFY have the same number ('G', 7, 16
    bytes): the device the fd is open on tells them apart.
    """

    def __init__(self) -> None:
        self.calls: list[tuple[str, bytes]] = []
        self.next_index = 0
        self.map_index = 0

    def ioctl(self, fd: int, request: int, arg: bytearray, mutate: bool = True) -> int:
        device = Path(os.readlink(f"/proc/self/fd/{fd}")).name.upper()
        [name] = [name for name, number in xen_abi.IOCTLS.items()
                  if number == request and name.startswith(f"IOCTL_{device}_")]
        self.calls.append((name, bytes(arg)))
        if name == "IOCTL_GNTALLOC_ALLOC_GREF":
            count = struct.unpack_from("=I", arg, 4)[0]
            struct.pack_into(f"=Q{count}I", arg, 8, self.next_index,
                             *range(100, 100 + count))
            self.next_index += count * PAGE_SIZE
        elif name == "IOCTL_GNTDEV_MAP_GRANT_REF":
            struct.pack_into("=Q", arg, 8, self.map_index)
        elif name == "IOCTL_EVTCHN_BIND_UNBOUND_PORT":
            return 40
        elif name == "IOCTL_EVTCHN_BIND_INTERDOMAIN":
            return 41
        return 0


@pytest.fixture
def kernel(monkeypatch: pytest.MonkeyPatch) -> FakeKernel:
    fake = FakeKernel()
    monkeypatch.setattr(fcntl, "ioctl", fake.ioctl)
    return fake


def test_share_allocates_maps_and_unshare_deallocates_then_unmaps(
        backend: XenBackend, kernel: FakeKernel) -> None:
    first = backend.share(3, 2, writable=True)
    second = backend.share(3, 1, writable=False)
    assert (first.index, first.refs, first.domid, first.writable) == (0, (100, 101), 3, True)
    assert (second.index, second.refs) == (2 * PAGE_SIZE, (100,))
    assert len(first.memory) == 2 * PAGE_SIZE
    first.memory[:4] = b"abcd"
    backend.set_share_notify(first, UnmapNotify(clear_byte=PAGE_SIZE + 1, event_port=40))
    assert first.notify == UnmapNotify(clear_byte=PAGE_SIZE + 1, event_port=40)
    assert backend.unshare(first) is Unshared.UNREPORTED
    assert first.released and first.memory.closed
    with pytest.raises(OSError) as raised:
        backend.unshare(first)
    assert raised.value.errno == errno.EINVAL
    assert kernel.calls == [
        ("IOCTL_GNTALLOC_ALLOC_GREF", xen_abi.pack_alloc_gref(3, 2, True)),
        ("IOCTL_GNTALLOC_ALLOC_GREF", xen_abi.pack_alloc_gref(3, 1, False)),
        ("IOCTL_GNTALLOC_SET_UNMAP_NOTIFY", struct.pack("=QII", PAGE_SIZE + 1, 3, 40)),
        ("IOCTL_GNTALLOC_DEALLOC_GREF", struct.pack("=QI4x", 0, 2)),
    ]
    backend.unshare(second)


def test_a_share_that_cannot_be_mmapped_is_deallocated(backend: XenBackend,
                                                       kernel: FakeKernel) -> None:
    kernel.next_index = 1 << 40  # past the end of the stand-in file
    with pytest.raises((OSError, ValueError)):
        backend.share(3, 1)
    assert [name for name, _ in kernel.calls] == ["IOCTL_GNTALLOC_ALLOC_GREF",
                                                  "IOCTL_GNTALLOC_DEALLOC_GREF"]
    assert kernel.calls[1][1] == xen_abi.pack_dealloc_gref(1 << 40, 1)


def test_map_uses_a_fresh_fd_per_area_and_unmap_closes_it(backend: XenBackend,
                                                          kernel: FakeKernel) -> None:
    before = open_fds()
    first = backend.map([(3, 100), (3, 101)])
    second = backend.map([(3, 102)], writable=False)
    assert first.fd != second.fd
    assert (first.index, first.grants, first.writable) == (0, ((3, 100), (3, 101)), True)
    assert second.writable is False
    backend.set_map_notify(first, UnmapNotify(clear_byte=7))
    backend.unmap(first)
    backend.unmap(second)
    assert open_fds() == before
    assert kernel.calls == [
        ("IOCTL_GNTDEV_MAP_GRANT_REF", struct.pack("=IIQ4I", 2, 0, 0, 3, 100, 3, 101)),
        ("IOCTL_GNTDEV_MAP_GRANT_REF", struct.pack("=IIQ2I", 1, 0, 0, 3, 102)),
        ("IOCTL_GNTDEV_SET_UNMAP_NOTIFY", struct.pack("=QII", 7, 1, 0)),
        ("IOCTL_GNTDEV_UNMAP_GRANT_REF", struct.pack("=QII", 0, 2, 0)),
        ("IOCTL_GNTDEV_UNMAP_GRANT_REF", struct.pack("=QII", 0, 1, 0)),
    ]


def test_a_mapping_not_at_offset_zero_is_refused(backend: XenBackend,
                                                 kernel: FakeKernel) -> None:
    kernel.map_index = PAGE_SIZE
    before = open_fds()
    with pytest.raises(OSError) as raised:
        backend.map([(3, 100)])
    assert raised.value.errno == errno.ENXIO
    assert open_fds() == before
    assert kernel.calls[-1] == ("IOCTL_GNTDEV_UNMAP_GRANT_REF",
                                struct.pack("=QII", PAGE_SIZE, 1, 0))


def test_event_channel_ioctls_return_the_kernels_port(backend: XenBackend,
                                                      kernel: FakeKernel) -> None:
    assert backend.bind_unbound_port(3) == 40
    assert backend.bind_interdomain(3, 9) == 41
    backend.notify(40)
    backend.unbind(41)
    assert kernel.calls == [
        ("IOCTL_EVTCHN_BIND_UNBOUND_PORT", struct.pack("=I", 3)),
        ("IOCTL_EVTCHN_BIND_INTERDOMAIN", struct.pack("=II", 3, 9)),
        ("IOCTL_EVTCHN_NOTIFY", struct.pack("=I", 40)),
        ("IOCTL_EVTCHN_UNBIND", struct.pack("=I", 41)),
    ]


def test_unshare_with_views_still_exported_says_when_the_grants_end(
        backend: XenBackend, kernel: FakeKernel) -> None:
    area = backend.share(3, 1)
    view = memoryview(area.memory)
    with pytest.raises(OSError) as raised:
        backend.unshare(area)
    assert raised.value.errno == errno.EBUSY
    assert area.released  # deallocated: the grants end when the view goes
    assert kernel.calls[-1] == ("IOCTL_GNTALLOC_DEALLOC_GREF", xen_abi.pack_dealloc_gref(0, 1))
    view.release()
    area.memory.close()
