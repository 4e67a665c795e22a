"""What a file descriptor in a Wayland message stands for, on the stream between the halves.

The two halves of the proxy are joined by one byte stream, so an fd a Wayland peer
sends cannot cross as an fd: the stream carries what it stands for instead. A pool of
grants is handled elsewhere (``POOL``); this module covers the rest:

- ``classify`` tells a pipe end (``PIPE_READ``/``PIPE_WRITE``: relayed as a byte stream,
  ``PIPE``/``PIPE_DATA`` frames) from a readable regular file (``FILE``: a keymap, say,
  sent as its bytes), and refuses anything else with ``UnsupportedFd``, whose message
  names the descriptor in words a user understands ("a socket", "an eventfd", ...), for
  the protocol error the caller raises.
- ``read_file`` reads such a file whole without moving its offset (``os.pread``).
- ``sealed_file`` makes the receiving side's stand-in: a sealed, read-only memfd, as
  libwayland compositors hand out keymaps.
- ``pipe_for`` makes the receiving side's stand-in for a pipe end: a fresh pipe whose
  end of the same kind goes to the local peer while this process works the other.

No I/O beyond the descriptors given; no event loop.
"""

from __future__ import annotations

import contextlib
import enum
import fcntl
import os
import socket
import stat

__all__ = [
    "READ_CHUNK",
    "SEALS",
    "FdKind",
    "UnsupportedFd",
    "classify",
    "describe",
    "pipe_for",
    "read_file",
    "sealed_file",
]

# Bytes asked of one os.pread: a file is read in pieces of at most this much.
READ_CHUNK = 1 << 20

# The seals of a file the other side sent: neither its size nor its bytes change.
SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE | fcntl.F_SEAL_SEAL


class FdKind(enum.Enum):
    """What an fd that may cross the stream is. For pipes the value is the ``end`` byte
    of the ``PIPE`` frame (0: the fd was a read end, 1: a write end)."""

    PIPE_READ = 0
    PIPE_WRITE = 1
    FILE = 2


class UnsupportedFd(Exception):
    """An fd that cannot cross the stream; the message names what it is."""


# Anonymous inodes (readlink gives "anon_inode:<name>"), by the name the kernel gives.
_ANON_NAMES = {
    "[eventfd]": "an eventfd",
    "[eventpoll]": "an epoll instance",
    "[timerfd]": "a timerfd",
    "[signalfd]": "a signalfd",
    "inotify": "an inotify instance",
    "[fanotify]": "a fanotify instance",
    "[pidfd]": "a pidfd (a process handle)",
    "[userfaultfd]": "a userfaultfd",
    "[io_uring]": "an io_uring instance",
    "[perf_event]": "a perf event",
    "dmabuf": "a dma-buf",
    "sync_file": "a sync_file (a GPU fence)",
    "syncobj": "a DRM sync object",
}

# Socket families and types, for "a Unix stream socket", "an IPv4 datagram socket".
_FAMILIES = {
    socket.AF_UNIX: "a Unix",
    socket.AF_INET: "an IPv4",
    socket.AF_INET6: "an IPv6",
    socket.AF_NETLINK: "a netlink",
}
_TYPES = {
    socket.SOCK_STREAM: "stream",
    socket.SOCK_DGRAM: "datagram",
    socket.SOCK_SEQPACKET: "seqpacket",
    socket.SOCK_RAW: "raw",
}


def _link(fd: int) -> str | None:
    """What /proc says the fd is (a path, "pipe:[N]", "anon_inode:[eventfd]", ...)."""
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return None


def _socket_words(fd: int) -> str:
    try:
        sock = socket.socket(fileno=fd)
    except OSError:
        return "a socket"
    try:
        family = _FAMILIES.get(sock.family)
        kind = _TYPES.get(sock.type)
    finally:
        sock.detach()  # the fd stays the caller's
    if family is None:
        return f"a {kind} socket" if kind else "a socket"
    return f"{family} {kind} socket" if kind else f"{family} socket"


def _pseudo(link: str) -> str | None:
    """The words for an fd /proc names ``link`` when that name says more than its file
    mode (anonymous inodes, dma-bufs, ...), or None for a path, a pipe or a socket."""
    if link.startswith("anon_inode:"):
        name = link.removeprefix("anon_inode:")
        return _ANON_NAMES.get(name, f"an anonymous kernel object ({link})")
    if link.startswith(("/dmabuf:", "dmabuf:")):
        return "a dma-buf"
    if link.startswith("/secretmem"):
        return "a secret memory area (memfd_secret)"
    if link.startswith(("/", "pipe:", "socket:")):
        return None
    return f"a kernel object ({link})"


def _words(mode: int, link: str | None) -> str:
    """The words for an fd of file mode ``mode`` whose /proc link is ``link``, not
    counting how it was opened (``describe`` adds that)."""
    if link is not None:
        pseudo = _pseudo(link)
        if pseudo is not None:
            return pseudo
    where = f" ({link})" if link else ""
    if stat.S_ISFIFO(mode):
        if link is not None and link.startswith("pipe:"):
            return "a pipe"
        return f"a named pipe (FIFO){where}"
    if stat.S_ISREG(mode):
        if link is not None and link.startswith("/memfd:"):
            return f"a memfd{where}"
        return f"a file{where}"
    if stat.S_ISDIR(mode):
        return f"a directory{where}"
    if stat.S_ISCHR(mode):
        return f"a character device{where}"
    if stat.S_ISBLK(mode):
        return f"a block device{where}"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISLNK(mode):
        return f"a symbolic link{where}"
    return f"an unsupported kind of descriptor{where}"


def describe(fd: int) -> str:
    """Words naming what ``fd`` is ("a pipe", "a file (/tmp/x)", "a write-only file
    (/tmp/x)", "a Unix stream socket", "an eventfd", ...), for messages."""
    try:
        mode = os.fstat(fd).st_mode
        flags = fcntl.fcntl(fd, fcntl.F_GETFL)
    except OSError as e:
        return f"a descriptor that cannot be examined ({e.strerror})"
    link = _link(fd)
    if stat.S_ISSOCK(mode):
        return _socket_words(fd)
    words = _words(mode, link)
    if flags & os.O_PATH:
        return f"{words}, opened as a path only (O_PATH)"
    access = flags & os.O_ACCMODE
    if stat.S_ISREG(mode) and access == os.O_WRONLY and words.startswith("a "):
        return "a write-only " + words.removeprefix("a ")
    if stat.S_ISFIFO(mode) and access == os.O_RDWR:
        return f"{words}, opened for both reading and writing"
    return words


def classify(fd: int) -> FdKind:
    """What ``fd`` crosses the stream as: a pipe's read or write end (by its access
    mode), or a readable regular file (memfds included). Anything else raises
    ``UnsupportedFd`` naming it: sockets, directories, devices, anonymous inodes
    (eventfd, dma-buf, ...), write-only files, a FIFO opened for reading and writing."""
    try:
        mode = os.fstat(fd).st_mode
        flags = fcntl.fcntl(fd, fcntl.F_GETFL)
    except OSError as e:
        raise UnsupportedFd(describe(fd)) from e
    access = flags & os.O_ACCMODE
    if not flags & os.O_PATH:
        if stat.S_ISFIFO(mode):
            if access == os.O_RDONLY:
                return FdKind.PIPE_READ
            if access == os.O_WRONLY:
                return FdKind.PIPE_WRITE
        elif stat.S_ISREG(mode) and access in (os.O_RDONLY, os.O_RDWR):
            link = _link(fd)
            # Some pseudo file systems (pidfs, dma-buf, secretmem) give regular-file
            # modes to what is no file: trust /proc's name for what it is.
            if link is None or _pseudo(link) is None:
                return FdKind.FILE
    raise UnsupportedFd(describe(fd))


def read_file(fd: int, limit: int) -> bytes:
    """The whole of the regular file ``fd`` from offset 0, read with ``os.pread`` (the
    fd's own offset does not move). Its size is the one ``fstat`` gives first: a file
    that grows meanwhile is read up to that size, one that shrinks up to its end. A file
    larger than ``limit`` bytes raises ``UnsupportedFd`` before anything is read, as does
    one the kernel refuses to read."""
    try:
        size = os.fstat(fd).st_size
    except OSError as e:
        raise UnsupportedFd(f"{describe(fd)} that cannot be examined ({e.strerror})") from e
    if size > limit:
        raise UnsupportedFd(f"{_sized(describe(fd), size)} (at most {limit} cross)")
    parts: list[bytes] = []
    offset = 0
    while offset < size:
        try:
            part = os.pread(fd, min(size - offset, READ_CHUNK), offset)
        except InterruptedError:
            continue
        except OSError as e:
            raise UnsupportedFd(f"{describe(fd)} that cannot be read ({e.strerror})") from e
        if not part:
            break
        parts.append(part)
        offset += len(part)
    return b"".join(parts)


def _sized(words: str, size: int) -> str:
    """"a file (/x)" -> "a file of N bytes (/x)"."""
    head, sep, rest = words.partition(" (")
    return f"{head} of {size} bytes{sep}{rest}"


def sealed_file(data: bytes, name: str = "qubesshm-file") -> int:
    """A read-only fd of a memfd holding ``data``, sealed against any change of size or
    bytes (and against further seals): what libwayland compositors hand out for keymaps
    (weston's os_ro_anonymous_file). The caller owns it; its offset is 0."""
    fd = os.memfd_create(name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        view = memoryview(data)
        while view:
            written = os.write(fd, view)
            view = view[written:]
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, SEALS)
        # A fresh open of the same file, read-only: its receiver cannot even try to
        # write or mmap it shared and writable.
        return os.open(f"/proc/self/fd/{fd}", os.O_RDONLY | os.O_CLOEXEC)
    finally:
        with contextlib.suppress(OSError):
            os.close(fd)


def pipe_for(kind: FdKind) -> tuple[int, int]:
    """A fresh close-on-exec pipe standing in for a peer's pipe end of ``kind``:
    ``(give, keep)``, where ``give`` is the end of that kind, for the local Wayland peer
    in the remote fd's place, and ``keep`` the other end, which this process reads or
    writes. ``keep`` is non-blocking; ``give`` is left blocking, as a client's own pipe
    would be (O_NONBLOCK belongs to the open file description, which ``give``'s receiver
    shares)."""
    if kind is FdKind.FILE:
        raise ValueError("pipe_for takes a pipe end's kind, not FdKind.FILE")
    read_end, write_end = os.pipe2(os.O_CLOEXEC)
    give, keep = (read_end, write_end) if kind is FdKind.PIPE_READ else (write_end, read_end)
    try:
        os.set_blocking(keep, False)
    except BaseException:
        os.close(read_end)
        os.close(write_end)
        raise
    return give, keep
