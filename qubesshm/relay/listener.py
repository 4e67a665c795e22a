"""Where the proxy listens and where it connects, resolved as libwayland does.

The listening socket is ``$XDG_RUNTIME_DIR/NAME`` guarded by ``NAME.lock`` held
with ``flock``: whoever holds the lock owns the name, so a socket file left
behind by a dead process is stale and may be removed.
"""

from __future__ import annotations

import errno
import fcntl
import os
import socket
from pathlib import Path

DEFAULT_SOCKET_NAME = "qubesshm-0"


class AddressError(RuntimeError):
    """A socket name cannot be resolved or taken."""


def runtime_path(name: str) -> Path:
    """``name`` if absolute, else ``$XDG_RUNTIME_DIR/name``."""
    if not name or name.endswith("/") or os.path.basename(name) in (".", ".."):
        raise AddressError(f"{name!r} is not a socket name: give a file name such as "
                           "qubesshm-0, or an absolute path to one")
    if os.path.isabs(name):
        return Path(name)
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if not runtime:
        raise AddressError(f"XDG_RUNTIME_DIR is not set, so the socket name {name!r} "
                           "has no directory; set it or give an absolute path")
    return Path(runtime) / name


def upstream_path(upstream: str | None) -> Path:
    """The compositor to relay to: ``--upstream``, else ``$WAYLAND_DISPLAY``, else wayland-0."""
    name = upstream or os.environ.get("WAYLAND_DISPLAY") or "wayland-0"
    return runtime_path(name)


class Listener:
    """A bound, locked, listening Wayland socket; ``close`` removes both files."""

    def __init__(self, name: str = DEFAULT_SOCKET_NAME, backlog: int = 128) -> None:
        self.path = runtime_path(name)
        self.lock_path = Path(f"{self.path}.lock")
        if len(os.fsencode(self.path)) >= 108:
            raise AddressError(f"socket path {self.path} is too long for a Unix socket")
        try:
            self._lock_fd = os.open(self.lock_path, os.O_CREAT | os.O_RDWR | os.O_CLOEXEC, 0o660)
        except OSError as exc:
            raise AddressError(f"cannot listen on {self.path}: {exc.strerror} "
                               f"({self.lock_path}); give a socket name in an existing "
                               "directory you may write") from exc
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(self._lock_fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise AddressError(f"{self.path} is in use: another process holds "
                                   f"{self.lock_path}") from exc
            raise
        try:
            # We hold the lock, so a socket file still here is a leftover.
            self.path.unlink(missing_ok=True)
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
            self.sock.bind(str(self.path))
            self.sock.listen(backlog)
            self.sock.setblocking(False)
        except OSError as exc:
            self._release_lock()
            raise AddressError(f"cannot listen on {self.path}: {exc.strerror or exc}") from exc

    def fileno(self) -> int:
        return self.sock.fileno()

    def _release_lock(self) -> None:
        self.lock_path.unlink(missing_ok=True)
        os.close(self._lock_fd)

    def close(self) -> None:
        if self._lock_fd < 0:
            return
        self.sock.close()
        self.path.unlink(missing_ok=True)
        self._release_lock()
        self._lock_fd = -1
