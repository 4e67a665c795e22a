"""The two kernel module parameters that govern grant reclaim, as sysfs files.

``/sys/module/grant_table/parameters/free_per_iteration`` (Linux >= 6.5): how many
deferred grants the 1-second reclaim timer retries per tick, 0 for all.
``/sys/module/xen_gntalloc/parameters/limit``: how many pages gntalloc may have
granted at once. The simulated hypervisor keeps the same files under its own root.
"""

from __future__ import annotations

import errno
import os
from dataclasses import dataclass
from pathlib import Path

from .files import private_dir, write_file

FREE_PER_ITERATION = Path("sys/module/grant_table/parameters/free_per_iteration")
GNTALLOC_LIMIT = Path("sys/module/xen_gntalloc/parameters/limit")
# Linux's defaults: CONFIG_XEN_GRANTS_RECLAIM_PER_ITERATION and gntalloc's limit.
DEFAULT_FREE_PER_ITERATION = 10
DEFAULT_GNTALLOC_LIMIT = 1024
_U32_MAX = 2**32 - 1


@dataclass(frozen=True, slots=True)
class Kernel:
    """A kernel's grant reclaim parameters."""

    name: str
    gntalloc_limit: int
    free_per_iteration: int


KERNELS = {
    # Linux's defaults.
    "stock": Kernel("stock", DEFAULT_GNTALLOC_LIMIT, DEFAULT_FREE_PER_ITERATION),
    # What Qubes sets: the gntalloc limit in its VMs (2^30), free_per_iteration in dom0.
    "qubes": Kernel("qubes", 1 << 30, 1000),
}
# What the simulated kernel of serve, run and the benchmarks starts with: a Qubes VM's.
DEFAULT_KERNEL = KERNELS["qubes"]


class ModuleParams:
    """Reads and writes the parameter files under ``root`` (``/`` on real Xen)."""

    def __init__(self, root: Path = Path("/")) -> None:
        self.root = root
        # The parameters' paths as strings: a parameter is read as each buffer is made,
        # and joining paths costs more than the read.
        self._paths: dict[Path, str] = {}

    def path(self, relative: Path) -> Path:
        return self.root / relative

    def read(self, relative: Path) -> int:
        path = self._paths.get(relative)
        if path is None:
            path = self._paths[relative] = str(self.path(relative))
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError as exc:
            raise OSError(errno.ENOENT, f"{path} does not exist: {_missing(relative)}",
                          str(path)) from exc
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise OSError(errno.ELOOP, f"{path} is a symlink; qubesshm does not read "
                              "parameters through symlinks", str(path)) from exc
            raise
        try:
            text = os.read(fd, 64)
        finally:
            os.close(fd)
        try:
            return int(text.strip())
        except ValueError as exc:
            raise OSError(errno.EINVAL, f"{path} holds {text[:20]!r}, not a number",
                          str(path)) from exc

    def write(self, relative: Path, value: int) -> None:
        if not 0 <= value <= _U32_MAX:
            raise OSError(errno.EINVAL, f"{value} is not an unsigned 32-bit value")
        path = self.path(relative)
        if not path.exists():
            raise OSError(errno.ENOENT, f"{path} does not exist: {_missing(relative)}",
                          str(path))
        try:
            write_file(path, f"{value}\n")
        except PermissionError as exc:
            raise OSError(errno.EACCES, f"not permitted to write {path}: it is writable "
                          "by root only (mode 0600/0644)", str(path)) from exc

    @property
    def free_per_iteration(self) -> int:
        return self.read(FREE_PER_ITERATION)

    @free_per_iteration.setter
    def free_per_iteration(self, value: int) -> None:
        self.write(FREE_PER_ITERATION, value)

    @property
    def gntalloc_limit(self) -> int:
        return self.read(GNTALLOC_LIMIT)

    @gntalloc_limit.setter
    def gntalloc_limit(self, value: int) -> None:
        self.write(GNTALLOC_LIMIT, value)

    def create_defaults(self) -> None:
        """Lay out the files with Linux's defaults where they are missing (for a
        simulated hypervisor); files that exist keep their values."""
        self._lay_out(KERNELS["stock"], overwrite=False)

    def boot(self, kernel: Kernel) -> None:
        """Set both parameters to ``kernel``'s, as a kernel booting with them."""
        self._lay_out(kernel, overwrite=True)

    def _lay_out(self, kernel: Kernel, *, overwrite: bool) -> None:
        private_dir(self.root, "the simulated kernel's directory")
        for relative, value in ((FREE_PER_ITERATION, kernel.free_per_iteration),
                                (GNTALLOC_LIMIT, kernel.gntalloc_limit)):
            path = self.path(relative)
            directory = self.root
            for part in relative.parent.parts:
                directory = directory / part
                private_dir(directory, "simulated sysfs directory")
            if not path.exists():
                write_file(path, f"{value}\n", create=True)
            elif overwrite:
                write_file(path, f"{value}\n")


def _missing(relative: Path) -> str:
    if relative == FREE_PER_ITERATION:
        return "free_per_iteration is a module parameter since Linux 6.5"
    return "is the xen_gntalloc module loaded?"
