"""Where simulated kernels keep their files: one directory per running kernel.

Each ``qubesshm serve`` or ``run`` on the simulated grant layer is a VM of its own:
its grant table and deferred list live in the process, and its two module
parameters, as sysfs shows them, in ``BASE/<pid>/sys/module/...``, where ``BASE``
is ``$QUBESSHM_SIM_ROOT`` or ``$XDG_RUNTIME_DIR/qubesshm-sim``. The directory is
made afresh at start with the parameters the command asked for, held with
``flock`` while the kernel runs, and removed at exit, so no command depends on
what an earlier, finished one left behind. ``qubesshm tune`` finds running
kernels by their held locks (a directory whose lock nobody holds is a dead
kernel's and is removed by the next start), and the socket each one serves.
A kernel that serves hypercalls to domains in other processes (``hypercalls``)
has ``hypervisor.sock`` there and notes the domains it hosts, so a foreign
domain (the GUI-daemon emulator) finds the kernel of the domain whose grants
it maps.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import shutil
import stat
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from .files import UnsafeDirectory, check_private_dir, private_dir, write_file

LOCK = "kernel.lock"
SOCKET_NOTE = "socket"
DOMAINS_NOTE = "domains"
HYPERCALL_SOCKET = "hypervisor.sock"


def sim_base() -> Path:
    """The directory under which simulated kernels live; never a predictable shared path.

    ``QUBESSHM_SIM_ROOT`` if set, else ``$XDG_RUNTIME_DIR/qubesshm-sim``, where the
    runtime directory must be the user's own, mode 0700, as libwayland requires.
    """
    explicit = os.environ.get("QUBESSHM_SIM_ROOT")
    if explicit:
        return Path(explicit)
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if not runtime:
        raise UnsafeDirectory("XDG_RUNTIME_DIR is not set, so the simulated kernel has no "
                              "private place for its files: set it (a directory of yours, "
                              "mode 0700) or QUBESSHM_SIM_ROOT")
    check_private_dir(Path(runtime), "XDG_RUNTIME_DIR")
    return Path(runtime) / "qubesshm-sim"


@dataclass(frozen=True)
class RunningKernel:
    """A simulated kernel that a live process holds."""

    root: Path
    pid: int
    socket: str | None  # the Wayland socket its proxy serves, once it listens
    domains: tuple[int, ...] = ()  # the domains it hosts, once noted
    hypercalls: Path | None = None  # its hypercall socket, while it serves one


class KernelDir:
    """The directory of this process's simulated kernel, locked while it runs."""

    def __init__(self, root: Path, lock_fd: int) -> None:
        self.root = root
        self._lock_fd: int | None = lock_fd

    @classmethod
    def create(cls, base: Path | None = None) -> KernelDir:
        """A fresh, empty, locked directory under ``base`` (default ``sim_base()``);
        dead kernels' directories found there are removed first."""
        base = sim_base() if base is None else base
        private_dir(base, "the simulated kernels' directory")
        remove_dead(base)
        for attempt in range(1000):
            name = str(os.getpid()) if attempt == 0 else f"{os.getpid()}.{attempt}"
            root = base / name
            try:
                root.mkdir(mode=0o700)
            except FileExistsError:
                continue  # another kernel of this process, or a dead one still locked
            # The lock is taken before it appears in the directory: another command's
            # remove_dead must never see it free (a directory with no lock is left be).
            pending = base / f".{name}.{LOCK}"
            lock_fd = os.open(pending, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW
                              | os.O_CLOEXEC, 0o600)
            fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            os.rename(pending, root / LOCK)
            return cls(root, lock_fd)
        raise OSError(errno.EEXIST, f"no free directory for a simulated kernel under {base}")

    def note_socket(self, path: Path) -> None:
        """Record the Wayland socket this kernel's proxy serves, for ``tune --socket``."""
        write_file(self.root / SOCKET_NOTE, f"{path}\n", create=True)

    def note_domains(self, domids: Iterable[int]) -> None:
        """Record the domains this kernel hosts (replacing an earlier note at once, so
        a reader sees the old list or the new one)."""
        path = self.root / DOMAINS_NOTE
        tmp = path.with_name(f".{DOMAINS_NOTE}.tmp")
        tmp.unlink(missing_ok=True)
        write_file(tmp, " ".join(str(d) for d in sorted(set(domids))) + "\n", create=True)
        tmp.replace(path)

    def close(self) -> None:
        """The kernel stops: its files go."""
        if self._lock_fd is None:
            return
        shutil.rmtree(self.root, ignore_errors=True)
        os.close(self._lock_fd)
        self._lock_fd = None


def _held(root: Path) -> bool | None:
    """Whether a live process holds ``root``'s lock; None if it has no lock file."""
    try:
        fd = os.open(root / LOCK, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


def remove_dead(base: Path) -> None:
    """Remove the directories of kernels whose process is gone (their lock is free)."""
    with contextlib.suppress(FileNotFoundError):
        for root in base.iterdir():
            if root.is_dir() and not root.is_symlink() and _held(root) is False:
                shutil.rmtree(root, ignore_errors=True)


def running_kernels(base: Path) -> list[RunningKernel]:
    """The simulated kernels running under ``base``, oldest pid first."""
    found = []
    with contextlib.suppress(FileNotFoundError):
        for root in base.iterdir():
            if not root.is_dir() or root.is_symlink() or not _held(root):
                continue
            try:
                socket: str | None = (root / SOCKET_NOTE).read_text().strip()
            except OSError:
                socket = None
            try:
                pid = int(root.name.split(".")[0])
            except ValueError:
                continue
            found.append(RunningKernel(root, pid, socket, _read_domains(root),
                                       _hypercall_socket(root)))
    return sorted(found, key=lambda k: (k.pid, k.root.name))


def _read_domains(root: Path) -> tuple[int, ...]:
    try:
        return tuple(int(word) for word in (root / DOMAINS_NOTE).read_text().split())
    except (OSError, ValueError):
        return ()


def _hypercall_socket(root: Path) -> Path | None:
    path = root / HYPERCALL_SOCKET
    try:
        return path if stat.S_ISSOCK(os.lstat(path).st_mode) else None
    except OSError:
        return None
