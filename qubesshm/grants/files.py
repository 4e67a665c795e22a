"""Writing files safely: private directories, no symlinks followed, outputs checked early.

The simulated hypervisor keeps its parameter and counter files under a root in
``$XDG_RUNTIME_DIR`` (or ``QUBESSHM_SIM_ROOT``). Like libwayland with its runtime
directory, qubesshm refuses a directory that is missing, not the user's, or open
to others, never falls back to a predictable path in a shared directory, and
opens every file it writes with ``O_NOFOLLOW``. Files a command writes at the end
(a report, a plot) are checked with ``check_output`` before any work starts.
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path


class UnsafeDirectory(ValueError):
    """A directory qubesshm would write in is missing, not the user's, or shared."""


def check_private_dir(path: Path, what: str) -> None:
    """``path`` exists, is a real directory owned by this user, mode 0700 or stricter."""
    try:
        st = os.lstat(path)
    except FileNotFoundError as exc:
        raise UnsafeDirectory(f"{what} {path} does not exist; create it (mode 0700) or "
                              "point the variable at a directory of yours") from exc
    if not stat.S_ISDIR(st.st_mode):
        raise UnsafeDirectory(f"{what} {path} is not a directory (a symlink or a file)")
    own = ("point it at a directory of your own, mode 0700 (mkdir -m 0700 DIR), rather "
           "than changing this one")
    if st.st_uid != os.geteuid():
        raise UnsafeDirectory(f"{what} {path} belongs to uid {st.st_uid}, not to you "
                              f"(uid {os.geteuid()}): {own}")
    mode = stat.S_IMODE(st.st_mode)
    if mode & (stat.S_ISVTX | stat.S_IWOTH | stat.S_IWGRP):
        # A directory others may write in (like /tmp) is shared by design: chmod-ing it
        # would break whoever else uses it.
        raise UnsafeDirectory(f"{what} {path} has mode {mode:04o}: it is shared with other "
                              f"users; {own}")
    if mode & 0o077:
        raise UnsafeDirectory(f"{what} {path} has mode {mode:04o}; others may read it: "
                              f"chmod 0700 {path}")


def private_dir(path: Path, what: str) -> None:
    """Make ``path`` (mode 0700) if it is missing, then check it is private."""
    try:
        path.mkdir(mode=0o700)
    except FileExistsError:
        pass
    except FileNotFoundError as exc:
        raise UnsafeDirectory(f"cannot create {what} {path}: its parent does not exist") \
            from exc
    check_private_dir(path, what)


def write_file(path: Path, data: str | bytes, *, create: bool = False) -> None:
    """Write ``data`` to ``path`` without following a symlink there; ``create`` makes a
    new file (mode 0600) and fails if one exists."""
    flags = os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC
    flags |= os.O_CREAT | os.O_EXCL if create else os.O_TRUNC
    try:
        fd = os.open(path, flags, 0o600)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise OSError(errno.ELOOP, f"{path} is a symlink; qubesshm does not write "
                          "through symlinks", str(path)) from exc
        raise
    try:
        view = memoryview(data.encode() if isinstance(data, str) else data)
        while view:
            view = view[os.write(fd, view):]
    finally:
        os.close(fd)


def check_output(path: Path) -> str | None:
    """Why ``path`` cannot be written by ``write_file`` (None if it can), found before a
    command does the work whose result goes there; nothing is created."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        st = None
    except OSError as exc:
        return f"{path}: {exc.strerror}"
    if st is not None:
        if stat.S_ISLNK(st.st_mode):
            return f"{path} is a symlink; qubesshm does not write through symlinks"
        if not stat.S_ISREG(st.st_mode):
            return f"{path} exists and is not a regular file"
        if not os.access(path, os.W_OK):
            return f"{path} is not writable"
        return None
    parent = path.parent
    if not parent.is_dir():
        return f"{parent} does not exist (or is not a directory): make it first"
    if not os.access(parent, os.W_OK | os.X_OK):
        return f"cannot create files in {parent}: it is not writable"
    return None


def write_output(path: Path, data: bytes | str) -> None:
    """Write a command's output file: created mode 0600, or an existing regular file
    replaced in place, never through a symlink."""
    write_file(path, data, create=not path.exists())
