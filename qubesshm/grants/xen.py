"""The real grant backend: ``/dev/xen/gntalloc``, ``gntdev`` and ``evtchn`` through ioctls.

Sharing allocates grant refs on one gntalloc fd and maps them at the offset the
kernel returns; mapping opens a fresh gntdev fd per area, so the area is that fd's
first mapping, at offset 0, and the fd can go to a compositor as a ``wl_shm`` pool.
Event channels go through one evtchn fd per backend. The bytes of every ioctl come
from ``xen_abi``; an ioctl that fails raises ``OSError`` with the kernel's errno and
a message naming the ioctl.

What the kernel does not tell us, this backend does not claim to know: whether
ending a share's grants was immediate or deferred (see ``unshare``), and the
deferred reclaim counters (``status`` reports them as None).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import grp
import mmap
import os
from collections.abc import Sequence
from pathlib import Path

from qubesshm.grants import xen_abi as abi
from qubesshm.grants.api import (
    PAGE_SIZE,
    GrantBackend,
    MappedArea,
    ReclaimStatus,
    SharedArea,
    UnmapNotify,
    Unshared,
)
from qubesshm.grants.params import FREE_PER_ITERATION, GNTALLOC_LIMIT, ModuleParams

DEVICE_DIR = Path("/dev/xen")
DEVICES = ("gntalloc", "gntdev", "evtchn")
CHOOSE_SIM = "choose the simulated backend with --grants sim or QUBESSHM_GRANTS=sim"
_READ_CHUNK = 4096  # ports per read() of the event channel device, times 4 bytes


class BackendUnavailable(OSError):
    """The Xen devices are not there: this is not a Xen domain (or the modules are out)."""

    def __init__(self, path: Path) -> None:
        super().__init__(errno.ENOENT, f"{path} does not exist: not running under Xen, or "
                         f"its module is not loaded; {CHOOSE_SIM}", str(path))


def _open_device(path: Path, flags: int) -> int:
    try:
        return os.open(path, flags | os.O_CLOEXEC)
    except FileNotFoundError as exc:
        raise BackendUnavailable(path) from exc
    except PermissionError as exc:
        raise PermissionError(errno.EACCES, f"not permitted to open {path}: run as root or "
                              f"join the group owning {path}{_owning_group(path)}",
                              str(path)) from exc


def _owning_group(path: Path) -> str:
    try:
        return f" ({grp.getgrgid(path.stat().st_gid).gr_name})"
    except (OSError, KeyError):
        return ""


def _ioctl(fd: int, name: str, request: int, arg: bytearray) -> int:
    """Run one ioctl on ``arg`` in place; its return value (a port for evtchn binds)."""
    try:
        return int(fcntl.ioctl(fd, request, arg, True))
    except OSError as exc:
        raise OSError(exc.errno, f"{name} failed: {exc.strerror}") from exc


def _check_notify(size: int, notify: UnmapNotify) -> tuple[int, int, int]:
    """(offset, action, port) of an unmap-notify request on an area of ``size`` bytes."""
    offset = notify.clear_byte if notify.clear_byte is not None else 0
    if not 0 <= offset < size:
        raise OSError(errno.EINVAL, f"clear_byte {offset} is outside the area's {size} bytes")
    action = abi.notify_action(notify.clear_byte is not None, notify.event_port is not None)
    port = notify.event_port if notify.event_port is not None else 0
    return offset, action, port


class XenBackend(GrantBackend):
    """Grant tables and event channels of the domain this runs in, through ``/dev/xen``."""

    name = "xen"

    def __init__(self, device_dir: Path = DEVICE_DIR, *, params_root: Path = Path("/")) -> None:
        self.device_dir = device_dir
        for device in DEVICES:
            if not (device_dir / device).exists():
                raise BackendUnavailable(device_dir / device)
        self.params = ModuleParams(params_root)
        self._gntalloc = _open_device(device_dir / "gntalloc", os.O_RDWR)
        try:
            # gntdev is opened afresh per mapped area; open it once now so that a
            # permission problem shows at start-up, not at the first map.
            os.close(_open_device(device_dir / "gntdev", os.O_RDWR))
            self._evtchn = _open_device(device_dir / "evtchn", os.O_RDWR | os.O_NONBLOCK)
        except BaseException:
            os.close(self._gntalloc)
            raise
        self._closed = False

    # -- sharing side (gntalloc) ------------------------------------------------

    def share(self, domid: int, count: int, *, writable: bool = True) -> SharedArea:
        if count < 1:
            raise OSError(errno.EINVAL, f"cannot share {count} pages")
        arg = bytearray(abi.pack_alloc_gref(domid, count, writable))
        _ioctl(self._gntalloc, "IOCTL_GNTALLOC_ALLOC_GREF", abi.IOCTL_GNTALLOC_ALLOC_GREF, arg)
        index, refs = abi.unpack_alloc_gref(arg)
        try:
            # Our own view is always writable; ``writable`` is the peer's access.
            memory = mmap.mmap(self._gntalloc, count * PAGE_SIZE, flags=mmap.MAP_SHARED,
                               prot=mmap.PROT_READ | mmap.PROT_WRITE, offset=index)
        except BaseException:
            self._dealloc(index, count)
            raise
        return SharedArea(index=index, domid=domid, refs=refs, writable=writable,
                          memory=memory)

    def set_share_notify(self, area: SharedArea, notify: UnmapNotify) -> None:
        if area.released:
            raise OSError(errno.EINVAL, "the area was already unshared")
        offset, action, port = _check_notify(area.size, notify)
        arg = bytearray(abi.pack_gntalloc_unmap_notify(area.index + offset, action, port))
        _ioctl(self._gntalloc, "IOCTL_GNTALLOC_SET_UNMAP_NOTIFY",
               abi.IOCTL_GNTALLOC_SET_UNMAP_NOTIFY, arg)
        area.notify = notify

    def unshare(self, area: SharedArea) -> Unshared:
        """Dealloc the grant refs, then munmap our view: that ends the grants.

        The kernel ends each grant when its last local user (the dealloc'd ref
        plus our mapping) goes. A grant the peer still maps is not ended but put
        on the kernel's deferred list, silently: no ioctl result, counter or file
        says which happened, hence ``Unshared.UNREPORTED``; callers that must know
        should use unmap-notify, which is what tells them the peer let go.
        """
        if area.released:
            raise OSError(errno.EINVAL, "the area was already unshared")
        self._dealloc(area.index, len(area.refs))
        area.released = True
        try:
            area.memory.close()
        except BufferError as exc:
            # Views of the memory are still alive; the munmap, and so the end of the
            # grants, happens when the last of them is dropped.
            raise OSError(errno.EBUSY, "grants deallocated, but views of the shared memory "
                          "are still exported; they end when those views go") from exc
        return Unshared.UNREPORTED

    def _dealloc(self, index: int, count: int) -> None:
        arg = bytearray(abi.pack_dealloc_gref(index, count))
        _ioctl(self._gntalloc, "IOCTL_GNTALLOC_DEALLOC_GREF", abi.IOCTL_GNTALLOC_DEALLOC_GREF,
               arg)

    # -- mapping side (gntdev) --------------------------------------------------

    def map(self, grants: Sequence[tuple[int, int]], *, writable: bool = True) -> MappedArea:
        """Map ``grants`` as the first (offset 0) mapping of a fresh gntdev fd.

        gntdev has no read-only flag at this stage: a mapping is read-only when the
        process that mmaps the fd asks for ``PROT_READ`` only, so ``writable`` is
        recorded, not enforced.
        """
        if not grants:
            raise OSError(errno.EINVAL, "cannot map an empty list of grants")
        grants = tuple((domid, ref) for domid, ref in grants)
        arg = bytearray(abi.pack_map_grant_ref(grants))
        fd = _open_device(self.device_dir / "gntdev", os.O_RDWR)
        try:
            _ioctl(fd, "IOCTL_GNTDEV_MAP_GRANT_REF", abi.IOCTL_GNTDEV_MAP_GRANT_REF, arg)
            index = abi.unpack_map_grant_ref(arg)
            if index != 0:
                with contextlib.suppress(OSError):
                    self._unmap_grant_ref(fd, index, len(grants))
                raise OSError(errno.ENXIO, f"the first mapping on a fresh gntdev fd is at "
                              f"offset {index}, not 0: a compositor could not mmap it")
        except BaseException:
            os.close(fd)
            raise
        return MappedArea(index=index, grants=grants, fd=fd, writable=writable)

    def set_map_notify(self, area: MappedArea, notify: UnmapNotify) -> None:
        if area.released:
            raise OSError(errno.EINVAL, "the area was already unmapped")
        offset, action, port = _check_notify(area.size, notify)
        arg = bytearray(abi.pack_gntdev_unmap_notify(area.index + offset, action, port))
        _ioctl(area.fd, "IOCTL_GNTDEV_SET_UNMAP_NOTIFY", abi.IOCTL_GNTDEV_SET_UNMAP_NOTIFY,
               arg)
        area.notify = notify

    def unmap(self, area: MappedArea) -> None:
        """Unmap the grant refs and close the fd; the pages go when the last mmap does."""
        if area.released:
            raise OSError(errno.EINVAL, "the area was already unmapped")
        try:
            self._unmap_grant_ref(area.fd, area.index, len(area.grants))
        finally:
            area.released = True
            os.close(area.fd)

    def watch(self, pid: int) -> None:
        """Nothing to do: gntdev keeps a mapping while any process has it mmapped."""

    @staticmethod
    def _unmap_grant_ref(fd: int, index: int, count: int) -> None:
        arg = bytearray(abi.pack_unmap_grant_ref(index, count))
        _ioctl(fd, "IOCTL_GNTDEV_UNMAP_GRANT_REF", abi.IOCTL_GNTDEV_UNMAP_GRANT_REF, arg)

    # -- event channels -----------------------------------------------------------

    def bind_unbound_port(self, remote_domid: int) -> int:
        arg = bytearray(abi.pack_bind_unbound_port(remote_domid))
        return _ioctl(self._evtchn, "IOCTL_EVTCHN_BIND_UNBOUND_PORT",
                      abi.IOCTL_EVTCHN_BIND_UNBOUND_PORT, arg)

    def bind_interdomain(self, remote_domid: int, remote_port: int) -> int:
        arg = bytearray(abi.pack_bind_interdomain(remote_domid, remote_port))
        return _ioctl(self._evtchn, "IOCTL_EVTCHN_BIND_INTERDOMAIN",
                      abi.IOCTL_EVTCHN_BIND_INTERDOMAIN, arg)

    def unbind(self, port: int) -> None:
        arg = bytearray(abi.pack_unbind(port))
        _ioctl(self._evtchn, "IOCTL_EVTCHN_UNBIND", abi.IOCTL_EVTCHN_UNBIND, arg)

    def notify(self, port: int) -> None:
        arg = bytearray(abi.pack_notify(port))
        _ioctl(self._evtchn, "IOCTL_EVTCHN_NOTIFY", abi.IOCTL_EVTCHN_NOTIFY, arg)

    def event_fd(self) -> int:
        return self._evtchn

    def fired_ports(self) -> list[int]:
        ports: list[int] = []
        while True:
            try:
                data = os.read(self._evtchn, _READ_CHUNK * abi.PORT_SIZE)
            except BlockingIOError:
                break
            except OSError as exc:
                raise OSError(exc.errno, f"reading {self.device_dir / 'evtchn'} failed: "
                              f"{exc.strerror}") from exc
            if not data:
                break
            ports.extend(abi.unpack_ports(data))
        return ports

    def unmask(self, ports: Sequence[int]) -> None:
        data = memoryview(abi.pack_ports(ports))
        while data:
            try:
                written = os.write(self._evtchn, data)
            except OSError as exc:
                raise OSError(exc.errno, f"unmasking ports on {self.device_dir / 'evtchn'} "
                              f"failed: {exc.strerror}") from exc
            data = data[written:]

    # -- tuning -------------------------------------------------------------------

    def status(self) -> ReclaimStatus:
        """The two module parameters; the kernel does not expose its reclaim counters.

        A parameter is None where its file is missing (``free_per_iteration`` before
        Linux 6.5, ``limit`` without xen_gntalloc) or unreadable (it may be root-only).
        """
        return ReclaimStatus(free_per_iteration=self._param(FREE_PER_ITERATION),
                             gntalloc_limit=self._param(GNTALLOC_LIMIT),
                             deferred_count=None, leaked_count=None)

    def gntalloc_limit(self) -> int | None:
        return self._param(GNTALLOC_LIMIT)

    def _param(self, relative: Path) -> int | None:
        try:
            return self.params.read(relative)
        except PermissionError:
            return None
        except OSError as exc:
            if exc.errno == errno.ENOENT:
                return None
            raise

    def set_free_per_iteration(self, value: int) -> None:
        self.params.free_per_iteration = value

    def set_gntalloc_limit(self, value: int) -> None:
        self.params.gntalloc_limit = value

    def close(self) -> None:
        """Close the gntalloc and evtchn fds; areas keep their own mappings and fds."""
        if self._closed:
            return
        self._closed = True
        os.close(self._evtchn)
        os.close(self._gntalloc)
