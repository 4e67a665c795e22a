"""qubesshm.stream.fds: what an fd stands for, file bytes and sealed memfds, stand-in pipes."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import mmap
import os
import socket
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from qubesshm.stream import fds
from qubesshm.stream.fds import (
    SEALS,
    FdKind,
    UnsupportedFd,
    classify,
    describe,
    pipe_for,
    read_file,
    sealed_file,
)


class Fds:
    """Descriptors a test opens, closed when it ends."""

    def __init__(self) -> None:
        self.open: list[int] = []

    def add(self, *fd: int) -> int:
        self.open.extend(fd)
        return fd[0]

    def close(self) -> None:
        for fd in self.open:
            with contextlib.suppress(OSError):
                os.close(fd)


@pytest.fixture
def owned() -> Iterator[Fds]:
    held = Fds()
    yield held
    held.close()


def _file(tmp_path: Path, data: bytes, flags: int, name: str = "f") -> int:
    path = tmp_path / name
    path.write_bytes(data)
    return os.open(path, flags | os.O_CLOEXEC)


# --- classify ----------------------------------------------------------------------------


def test_pipe_ends(owned: Fds) -> None:
    r, w = os.pipe()
    owned.add(r, w)
    assert classify(r) is FdKind.PIPE_READ
    assert classify(w) is FdKind.PIPE_WRITE


def test_pipe_kinds_match_the_pipe_frames_end_byte() -> None:
    assert FdKind.PIPE_READ.value == 0
    assert FdKind.PIPE_WRITE.value == 1


def test_named_fifo_ends(tmp_path: Path, owned: Fds) -> None:
    path = tmp_path / "fifo"
    os.mkfifo(path)
    r = owned.add(os.open(path, os.O_RDONLY | os.O_NONBLOCK))
    w = owned.add(os.open(path, os.O_WRONLY | os.O_NONBLOCK))
    assert classify(r) is FdKind.PIPE_READ
    assert classify(w) is FdKind.PIPE_WRITE


def test_fifo_opened_read_write_refused(tmp_path: Path, owned: Fds) -> None:
    path = tmp_path / "fifo"
    os.mkfifo(path)
    fd = owned.add(os.open(path, os.O_RDWR))
    with pytest.raises(UnsupportedFd) as err:
        classify(fd)
    message = str(err.value)
    assert "named pipe" in message
    assert str(path) in message
    assert "both reading and writing" in message


def test_memfd_is_a_file(owned: Fds) -> None:
    fd = owned.add(os.memfd_create("test-memfd"))
    assert classify(fd) is FdKind.FILE
    assert describe(fd).startswith("a memfd (/memfd:test-memfd")


def test_sealed_file_is_a_file(owned: Fds) -> None:
    assert classify(owned.add(sealed_file(b"xkb"))) is FdKind.FILE


@pytest.mark.parametrize("flags", [os.O_RDONLY, os.O_RDWR])
def test_readable_regular_file(tmp_path: Path, owned: Fds, flags: int) -> None:
    fd = owned.add(_file(tmp_path, b"data", flags))
    assert classify(fd) is FdKind.FILE


def test_write_only_file_refused(tmp_path: Path, owned: Fds) -> None:
    fd = owned.add(_file(tmp_path, b"data", os.O_WRONLY))
    with pytest.raises(UnsupportedFd, match=r"^a write-only file \(.*/f\)$"):
        classify(fd)


def test_write_only_memfd_refused(owned: Fds) -> None:
    fd = owned.add(os.memfd_create("wo"))
    wo = owned.add(os.open(f"/proc/self/fd/{fd}", os.O_WRONLY | os.O_CLOEXEC))
    with pytest.raises(UnsupportedFd, match=r"^a write-only memfd"):
        classify(wo)


def test_o_path_file_refused(tmp_path: Path, owned: Fds) -> None:
    fd = owned.add(_file(tmp_path, b"data", os.O_PATH))
    with pytest.raises(UnsupportedFd, match=r"O_PATH"):
        classify(fd)


def test_socket_refused() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        with pytest.raises(UnsupportedFd, match=r"^an IPv4 stream socket$"):
            classify(sock.fileno())
        # the fd is still the socket's own: describing it did not close it
        assert sock.fileno() >= 0
        os.fstat(sock.fileno())


def test_socketpair_refused() -> None:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with a, b:
        with pytest.raises(UnsupportedFd, match=r"^a Unix stream socket$"):
            classify(a.fileno())
        a.sendall(b"still open")
        assert b.recv(16) == b"still open"


def test_unix_datagram_socket_named() -> None:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    with a, b:
        assert describe(a.fileno()) == "a Unix datagram socket"


def test_directory_refused(tmp_path: Path, owned: Fds) -> None:
    fd = owned.add(os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC))
    with pytest.raises(UnsupportedFd) as err:
        classify(fd)
    assert str(err.value) == f"a directory ({tmp_path})"


def test_dev_null_refused(owned: Fds) -> None:
    fd = owned.add(os.open("/dev/null", os.O_RDONLY | os.O_CLOEXEC))
    with pytest.raises(UnsupportedFd) as err:
        classify(fd)
    assert str(err.value) == "a character device (/dev/null)"


def test_eventfd_refused(owned: Fds) -> None:
    fd = owned.add(os.eventfd(0, os.EFD_CLOEXEC))
    with pytest.raises(UnsupportedFd) as err:
        classify(fd)
    assert str(err.value) == "an eventfd"


def test_pidfd_refused(owned: Fds) -> None:
    try:
        fd = owned.add(os.pidfd_open(os.getpid()))
    except OSError as e:
        pytest.skip(f"no pidfd_open: {e}")
    with pytest.raises(UnsupportedFd, match="pidfd"):
        classify(fd)


def test_closed_fd_refused(owned: Fds) -> None:
    r, w = os.pipe()
    os.close(r)
    os.close(w)
    with pytest.raises(UnsupportedFd, match="cannot be examined"):
        classify(r)


@pytest.mark.parametrize(
    ("mode", "link", "words"),
    [
        (0o600, "anon_inode:dmabuf", "a dma-buf"),
        (stat.S_IFREG | 0o600, "/dmabuf:", "a dma-buf"),
        (stat.S_IFREG | 0o600, "/dmabuf:gbm-bo", "a dma-buf"),
        (0o600, "anon_inode:sync_file", "a sync_file (a GPU fence)"),
        (0o600, "anon_inode:[timerfd]", "a timerfd"),
        (stat.S_IFREG | 0o600, "anon_inode:[pidfd]", "a pidfd (a process handle)"),
        (0o600, "anon_inode:[strange]", "an anonymous kernel object (anon_inode:[strange])"),
        (stat.S_IFREG | 0o600, "/secretmem (deleted)", "a secret memory area (memfd_secret)"),
        (0o444, "net:[4026531840]", "a kernel object (net:[4026531840])"),
        (stat.S_IFBLK | 0o600, "/dev/sda", "a block device (/dev/sda)"),
        (stat.S_IFIFO | 0o600, "pipe:[12]", "a pipe"),
        (stat.S_IFREG | 0o600, "/tmp/k (deleted)", "a file (/tmp/k (deleted))"),
        (stat.S_IFREG | 0o600, None, "a file"),
    ],
)
def test_words_for_kinds_not_made_here(mode: int, link: str | None, words: str) -> None:
    # dma-bufs and the like need devices this machine may not have: name them from what
    # fstat and /proc would say.
    assert fds._words(mode, link) == words


def test_regular_mode_with_a_pseudo_name_is_no_file(owned: Fds, monkeypatch: pytest.MonkeyPatch
                                                    ) -> None:
    # Newer kernels give some pseudo files (dma-bufs, pidfds) a regular file's mode.
    fd = owned.add(os.memfd_create("looks-like-a-file"))
    monkeypatch.setattr(fds, "_link", lambda _fd: "/dmabuf:")
    with pytest.raises(UnsupportedFd, match=r"^a dma-buf$"):
        classify(fd)


# --- read_file ---------------------------------------------------------------------------


def test_read_file_exact_bytes_offset_unchanged(tmp_path: Path, owned: Fds) -> None:
    data = bytes(range(256)) * 40
    fd = owned.add(_file(tmp_path, data, os.O_RDONLY))
    os.lseek(fd, 17, os.SEEK_SET)
    assert read_file(fd, 1 << 20) == data
    assert os.lseek(fd, 0, os.SEEK_CUR) == 17
    assert read_file(fd, len(data)) == data  # exactly at the limit


def test_read_file_over_limit_refused_before_reading(
        tmp_path: Path, owned: Fds, monkeypatch: pytest.MonkeyPatch) -> None:
    fd = owned.add(_file(tmp_path, b"x" * 101, os.O_RDONLY))
    calls: list[int] = []

    def pread(fd: int, n: int, offset: int) -> bytes:
        calls.append(n)
        raise AssertionError("read before refusing")

    monkeypatch.setattr(os, "pread", pread)
    with pytest.raises(UnsupportedFd) as err:
        read_file(fd, 100)
    assert calls == []
    assert str(err.value) == f"a file of 101 bytes ({tmp_path / 'f'}) (at most 100 cross)"


def test_read_file_over_limit_memfd_named(owned: Fds) -> None:
    fd = owned.add(os.memfd_create("big"))
    os.ftruncate(fd, 5000)
    with pytest.raises(UnsupportedFd, match=r"^a memfd of 5000 bytes \(/memfd:big.*at most 4096"):
        read_file(fd, 4096)


def test_read_empty_file(tmp_path: Path, owned: Fds) -> None:
    assert read_file(owned.add(_file(tmp_path, b"", os.O_RDONLY)), 0) == b""


def test_read_file_larger_than_a_chunk(tmp_path: Path, owned: Fds) -> None:
    data = os.urandom(fds.READ_CHUNK * 2 + 12345)
    fd = owned.add(_file(tmp_path, data, os.O_RDONLY))
    assert read_file(fd, len(data)) == data


def test_read_file_loops_on_short_reads(
        tmp_path: Path, owned: Fds, monkeypatch: pytest.MonkeyPatch) -> None:
    data = os.urandom(10_000)
    fd = owned.add(_file(tmp_path, data, os.O_RDONLY))
    real = os.pread
    sizes: list[int] = []

    def short(fd: int, n: int, offset: int) -> bytes:
        sizes.append(n)
        return real(fd, min(n, 999), offset)

    monkeypatch.setattr(os, "pread", short)
    assert read_file(fd, 1 << 20) == data
    assert len(sizes) == 11


def test_read_file_stops_at_first_size(
        tmp_path: Path, owned: Fds, monkeypatch: pytest.MonkeyPatch) -> None:
    fd = owned.add(_file(tmp_path, b"a" * 3000, os.O_RDWR))
    real = os.pread
    monkeypatch.setattr(fds, "READ_CHUNK", 1000)

    def growing(fd: int, n: int, offset: int) -> bytes:
        os.pwrite(fd, b"b" * 1000, os.fstat(fd).st_size)  # the file grows while read
        return real(fd, n, offset)

    monkeypatch.setattr(os, "pread", growing)
    assert read_file(fd, 1 << 20) == b"a" * 3000


def test_read_file_that_shrinks(
        tmp_path: Path, owned: Fds, monkeypatch: pytest.MonkeyPatch) -> None:
    fd = owned.add(_file(tmp_path, b"a" * 3000, os.O_RDWR))
    real = os.pread
    monkeypatch.setattr(fds, "READ_CHUNK", 1000)

    def shrinking(fd: int, n: int, offset: int) -> bytes:
        os.ftruncate(fd, 1500)
        return real(fd, n, offset)

    monkeypatch.setattr(os, "pread", shrinking)
    assert read_file(fd, 1 << 20) == b"a" * 1500


def test_read_error_refused(tmp_path: Path, owned: Fds, monkeypatch: pytest.MonkeyPatch) -> None:
    fd = owned.add(_file(tmp_path, b"data", os.O_RDONLY))

    def failing(fd: int, n: int, offset: int) -> bytes:
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    monkeypatch.setattr(os, "pread", failing)
    with pytest.raises(UnsupportedFd, match="cannot be read"):
        read_file(fd, 100)


def test_read_file_of_a_memfd(owned: Fds) -> None:
    fd = owned.add(os.memfd_create("m"))
    os.write(fd, b"keymap text\0")
    assert read_file(fd, 100) == b"keymap text\0"
    assert os.lseek(fd, 0, os.SEEK_CUR) == 12


# --- sealed_file -------------------------------------------------------------------------


def test_sealed_file_content_and_offset(owned: Fds) -> None:
    data = b"xkb_keymap {\n};\n\0"
    fd = owned.add(sealed_file(data))
    assert os.lseek(fd, 0, os.SEEK_CUR) == 0
    assert os.fstat(fd).st_size == len(data)
    assert os.read(fd, 1000) == data
    assert read_file(fd, len(data)) == data


def test_sealed_file_name_and_cloexec(owned: Fds) -> None:
    fd = owned.add(sealed_file(b"x", name="qubesshm-keymap"))
    assert os.readlink(f"/proc/self/fd/{fd}").startswith("/memfd:qubesshm-keymap")
    assert not os.get_inheritable(fd)
    assert describe(owned.add(sealed_file(b"x"))).startswith("a memfd (/memfd:qubesshm-file")


def test_sealed_file_is_read_only(owned: Fds) -> None:
    fd = owned.add(sealed_file(b"abc"))
    assert fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE == os.O_RDONLY
    with pytest.raises(OSError) as err:
        os.write(fd, b"x")
    assert err.value.errno == errno.EBADF
    with pytest.raises(OSError):
        os.pwrite(fd, b"x", 0)
    with pytest.raises(OSError):
        os.ftruncate(fd, 0)
    with pytest.raises(OSError):
        os.ftruncate(fd, 4096)


def test_sealed_file_seals(owned: Fds) -> None:
    fd = owned.add(sealed_file(b"abc"))
    seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
    for seal in (fcntl.F_SEAL_SHRINK, fcntl.F_SEAL_GROW, fcntl.F_SEAL_WRITE,
                 fcntl.F_SEAL_SEAL):
        assert seals & seal
    assert seals & SEALS == SEALS


def test_sealed_file_writes_fail_even_through_a_writable_open(owned: Fds) -> None:
    # The seals are the file's, not the descriptor's: reopening it writable gains nothing.
    fd = owned.add(sealed_file(b"abc"))
    rw = owned.add(os.open(f"/proc/self/fd/{fd}", os.O_RDWR | os.O_CLOEXEC))
    for attempt in (lambda: os.pwrite(rw, b"x", 0), lambda: os.ftruncate(rw, 1),
                    lambda: os.ftruncate(rw, 8192),
                    lambda: fcntl.fcntl(rw, fcntl.F_ADD_SEALS, 0)):
        with pytest.raises(OSError) as err:
            attempt()
        assert err.value.errno == errno.EPERM
    with pytest.raises(OSError):
        mmap.mmap(rw, 3, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
    assert os.pread(fd, 10, 0) == b"abc"


def test_sealed_file_maps_private_read_only(owned: Fds) -> None:
    data = os.urandom(10_000)
    fd = owned.add(sealed_file(data))
    with mmap.mmap(fd, len(data), mmap.MAP_PRIVATE, mmap.PROT_READ) as view:
        assert view[:] == data
    with pytest.raises(OSError):
        mmap.mmap(fd, len(data), mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)


def test_sealed_file_empty(owned: Fds) -> None:
    fd = owned.add(sealed_file(b""))
    assert os.fstat(fd).st_size == 0
    assert read_file(fd, 0) == b""


def test_sealed_file_leaves_no_writable_fd() -> None:
    fd = sealed_file(b"abc")
    try:
        mine = os.fstat(fd)
        same = []
        for name in os.listdir("/proc/self/fd"):
            try:
                other = os.stat(f"/proc/self/fd/{name}")
            except OSError:
                continue  # the listing's own directory fd, closed by now
            if (other.st_dev, other.st_ino) == (mine.st_dev, mine.st_ino):
                same.append(int(name))
        assert same == [fd]
    finally:
        os.close(fd)


# --- pipe_for ----------------------------------------------------------------------------


def _blocking(fd: int) -> bool:
    return not fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_NONBLOCK


def test_pipe_for_read_end(owned: Fds) -> None:
    give, keep = pipe_for(FdKind.PIPE_READ)
    owned.add(give, keep)
    assert classify(give) is FdKind.PIPE_READ
    assert classify(keep) is FdKind.PIPE_WRITE
    assert _blocking(give)
    assert not _blocking(keep)
    assert not os.get_inheritable(give) and not os.get_inheritable(keep)
    os.write(keep, b"from the other side")
    assert os.read(give, 100) == b"from the other side"


def test_pipe_for_write_end(owned: Fds) -> None:
    give, keep = pipe_for(FdKind.PIPE_WRITE)
    owned.add(give, keep)
    assert classify(give) is FdKind.PIPE_WRITE
    assert classify(keep) is FdKind.PIPE_READ
    assert _blocking(give)
    assert not _blocking(keep)
    assert not os.get_inheritable(give) and not os.get_inheritable(keep)
    with pytest.raises(BlockingIOError):
        os.read(keep, 100)  # keep never blocks this process
    os.write(give, b"selection bytes")
    assert os.read(keep, 100) == b"selection bytes"
    os.close(give)
    owned.open.remove(give)
    assert os.read(keep, 100) == b""  # the peer closing its end is end of data


def test_pipe_for_file_is_an_error() -> None:
    with pytest.raises(ValueError):
        pipe_for(FdKind.FILE)
