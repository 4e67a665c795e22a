"""The socket vchan off Xen: a Unix stream socket, either end, on asyncio.

Interoperable with QubesOS/qubes-core-vchan-socket: the bytes on the socket are
the vchan's bytes, nothing is exchanged on connect, and a client retries until
the server's socket answers. Unlike that library the server here owns its socket
file carefully: the directory must be ours (or root's) and writable by nobody
else, a path holding anything but a socket is refused, a socket is replaced only
when nobody answers on it, the new one is mode 0600 from the start (unless asked
otherwise) and it is removed at ``close``. It accepts one peer at a time and the
next one after the previous stream was closed, which is how a restarted GUI
daemon reconnects.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import socket
import stat
from collections.abc import Callable
from pathlib import Path

from qubesshm.vchan.address import SUN_PATH_MAX
from qubesshm.vchan.stream import VchanClosed, VchanError

RETRY_INTERVAL = 0.02
"""Seconds between a client's connection attempts (the socket vchan's loop is tighter)."""
_RETRY_ERRNOS = (errno.ENOENT, errno.ECONNREFUSED, errno.EAGAIN)


class SocketStream:
    """A connected socket vchan (``VchanStream``) over asyncio's streams."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 on_close: Callable[[], None] | None = None) -> None:
        self._reader = reader
        self._writer = writer
        self._on_close = on_close
        self._closed = False

    async def read(self, n: int = 65536) -> bytes:
        if self._closed:
            return b""
        try:
            return await self._reader.read(n)
        except ConnectionError:
            return b""

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self._closed:
            raise VchanClosed("write on a closed vchan")
        self._writer.write(data)

    async def drain(self) -> None:
        if self._closed:
            raise VchanClosed("drain on a closed vchan")
        try:
            await self._writer.drain()
        except ConnectionError as exc:
            raise VchanClosed(f"the vchan peer went away ({exc})") from exc

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._writer.close()
        if self._on_close is not None:
            self._on_close()

    async def wait_closed(self) -> None:
        """After ``close``: wait until the socket is really closed."""
        with contextlib.suppress(ConnectionError):
            await self._writer.wait_closed()


def _check_path_length(path: Path) -> None:
    if len(os.fsencode(path)) > SUN_PATH_MAX:
        raise VchanError(f"vchan socket path {path} is longer than {SUN_PATH_MAX} bytes, the "
                         "limit of a Unix socket: use a shorter directory")


def check_socket_dir(directory: Path) -> None:
    """Make ``directory`` (mode 0700) if missing; refuse one that is a symlink, not ours
    or root's, or writable by others (they could replace our socket)."""
    fix = "use a directory of your own (mkdir -m 0700 DIR; VCHAN_SOCKET_DIR=DIR)"
    try:
        os.mkdir(directory, 0o700)
    except FileExistsError:
        pass
    except OSError as exc:
        raise VchanError(f"cannot create the vchan socket directory {directory}: "
                         f"{exc.strerror}; {fix}") from exc
    st = os.lstat(directory)
    if not stat.S_ISDIR(st.st_mode):
        raise VchanError(f"vchan socket directory {directory} is not a directory (a symlink "
                         f"or a file); {fix}")
    if st.st_uid not in (os.geteuid(), 0):
        raise VchanError(f"vchan socket directory {directory} belongs to uid {st.st_uid}, "
                         f"neither you nor root; {fix}")
    mode = stat.S_IMODE(st.st_mode)
    if mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise VchanError(f"vchan socket directory {directory} has mode {mode:04o}: others "
                         f"may replace the socket in it; chmod go-w {directory}, or {fix}")


_SO_ACCEPTCON = 0x10000  # in /proc/net/unix's Flags: a listening socket


def _listed_as_listening(path: Path) -> bool:
    """Whether /proc/net/unix shows a listening socket bound to ``path`` (same string)."""
    try:
        lines = Path("/proc/net/unix").read_text().splitlines()[1:]
    except OSError:
        return False
    target = os.fspath(path)
    for line in lines:
        fields = line.split(maxsplit=7)
        if len(fields) == 8 and fields[7] == target and int(fields[3], 16) & _SO_ACCEPTCON:
            return True
    return False


def _answers(path: Path) -> bool:
    """Whether a server listens on the socket at ``path``. A listening socket the kernel
    lists under that name says so without a connection (which would be queued as that
    server's next peer); otherwise a connect that is not refused does."""
    if _listed_as_listening(path):
        return True
    probe = socket.socket(socket.AF_UNIX,
                          socket.SOCK_STREAM | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK)
    try:
        probe.connect(os.fspath(path))
    except BlockingIOError:
        return True  # its backlog is full: it is alive
    except (ConnectionRefusedError, FileNotFoundError):
        return False
    except OSError as exc:
        raise VchanError(f"cannot check whether the vchan socket {path} is in use: "
                         f"{exc.strerror}") from exc
    finally:
        probe.close()
    return True


def _clear_path(path: Path) -> None:
    """Remove a stale socket at ``path``; refuse anything else that is there."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        kind = ("a symlink" if stat.S_ISLNK(st.st_mode) else
                "a directory" if stat.S_ISDIR(st.st_mode) else "a file")
        raise VchanError(f"{path} is {kind}, not a socket: qubesshm replaces only a stale "
                         "vchan socket; move it away or choose another VCHAN_SOCKET_DIR")
    if _answers(path):
        raise VchanError(f"another vchan server is listening on {path}: stop it, or give "
                         "another domain id or VCHAN_SOCKET_DIR")
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


class SocketListener:
    """A listening socket vchan (``VchanListener``); ``close`` removes its file.

    asyncio's server takes every connection as it comes; ``accept`` hands them out in
    order, each only once the stream it handed out before has been closed."""

    def __init__(self, path: Path) -> None:
        self.path = path
        st = os.lstat(path)
        self._identity = (st.st_dev, st.st_ino)
        self._server: asyncio.AbstractServer | None = None
        self._incoming: asyncio.Queue[SocketStream | None] = asyncio.Queue()
        self._idle = asyncio.Event()
        self._idle.set()
        self._lock = asyncio.Lock()
        self._closed = False

    def _connected(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        stream = SocketStream(reader, writer, on_close=self._idle.set)
        if self._closed:
            stream.close()
        else:
            self._incoming.put_nowait(stream)

    async def accept(self) -> SocketStream:
        async with self._lock:
            await self._idle.wait()
            stream = None if self._closed else await self._incoming.get()
            if stream is None:
                raise VchanClosed(f"the vchan listener on {self.path} is closed")
            self._idle.clear()
            return stream

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._server is not None:
            self._server.close()
        while not self._incoming.empty():
            pending = self._incoming.get_nowait()
            if pending is not None:
                pending.close()
        self._incoming.put_nowait(None)
        self._idle.set()
        try:
            st = os.lstat(self.path)
        except FileNotFoundError:
            return
        if (st.st_dev, st.st_ino) == self._identity:
            os.unlink(self.path)

    async def __aenter__(self) -> SocketListener:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()


async def serve_socket(path: Path | str, *, mode: int = 0o600, backlog: int = 8
                       ) -> SocketListener:
    """Listen at ``path`` as a socket vchan server (see the module docstring for the
    rules on the directory and on what may already be at ``path``)."""
    path = Path(path)
    _check_path_length(path)
    check_socket_dir(path.parent)
    _clear_path(path)
    sock = socket.socket(socket.AF_UNIX,
                         socket.SOCK_STREAM | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK)
    try:
        # bind() gives the new file the socket inode's mode (less the umask): set it
        # first, so that the file is never more open than asked.
        os.fchmod(sock.fileno(), mode)
        sock.bind(os.fspath(path))
        os.chmod(path, mode)
        sock.listen(backlog)
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise VchanError(f"{path} appeared while qubesshm was taking it: another vchan "
                             "server is starting there") from exc
        raise VchanError(f"cannot listen on {path}: {exc.strerror or exc}") from exc
    listener = SocketListener(path)
    listener._server = await asyncio.start_unix_server(listener._connected, sock=sock)
    return listener


async def connect_socket(path: Path | str, *, retry: bool = True,
                         timeout: float | None = None) -> SocketStream:
    """Connect to the socket vchan server at ``path``; while nobody listens there, try
    again (``retry``) until ``timeout`` seconds have passed (None: for ever, as the
    socket vchan's client does)."""
    path = Path(path)
    _check_path_length(path)
    loop = asyncio.get_running_loop()
    deadline = None if timeout is None else loop.time() + timeout
    while True:
        sock = socket.socket(socket.AF_UNIX,
                             socket.SOCK_STREAM | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK)
        try:
            sock.connect(os.fspath(path))
        except OSError as exc:
            sock.close()
            if exc.errno not in _RETRY_ERRNOS:
                raise VchanError(f"cannot connect to the vchan socket {path}: "
                                 f"{exc.strerror}") from exc
            if not retry or (deadline is not None and loop.time() >= deadline):
                waited = f" within {timeout:g} s" if retry and timeout is not None else ""
                raise VchanError(f"no vchan server answered at {path}{waited}: start the "
                                 "agent first, or check VCHAN_SOCKET_DIR and the domain "
                                 "ids") from exc
            await asyncio.sleep(RETRY_INTERVAL)
            continue
        reader, writer = await asyncio.open_unix_connection(sock=sock)
        return SocketStream(reader, writer)
