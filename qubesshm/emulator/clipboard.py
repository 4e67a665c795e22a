"""The emulator's global clipboard: qubes-guid's clipboard files, in a private directory.

qubes-guid keeps the inter-VM clipboard in ``/run/qubes/qubes-clipboard.bin`` with
three companions: ``.source`` (the VM the text came from, empty once it has been
pasted), ``.xevent`` (the X time of the copy) and ``.metadata`` (what happened last,
as a small JSON-like text), and takes ``/run/qubes/appviewer.lock`` (``flock``) around
its reads and writes, so that every daemon of the machine shares one clipboard. The
emulator keeps the same files, under the same names, in a directory of the user's:
``--clipboard-dir``, by default ``$XDG_RUNTIME_DIR/qubesshm-clipboard``. A test (or a
person) puts text there to paste with Ctrl+Shift+V, and reads what Ctrl+Shift+C
copied.

What the daemon decides from these files, reproduced here: a copy (the agent's
``CLIPBOARD_DATA``) is discarded when ``.metadata`` records a clipboard operation at
the same X time or later; a paste is discarded likewise, and refused when ``.source``
is missing or empty (the daemon's "policy": nothing to paste; the emulator asks no
qrexec policy beyond that); every paste empties the clipboard (the file truncated,
``.source`` emptied), as Qubes users know it. The directory must be the user's, mode
0700 or stricter; no file is read or written through a symlink.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import re
import stat
from collections.abc import Iterator
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

from qubesshm.grants.files import UnsafeDirectory, check_private_dir, private_dir

log = logging.getLogger("qubesshm.emulator")

CLIPBOARD_FILE = "qubes-clipboard.bin"  # QUBES_CLIPBOARD_FILENAME's name
LOCK_FILE = "appviewer.lock"  # the daemons' inter_appviewer_lock
DEFAULT_DIR_NAME = "qubesshm-clipboard"  # under $XDG_RUNTIME_DIR

_WRAP = 1 << 64  # the daemon's Time is a C unsigned long
_RECENT = 1 << 31


@dataclass(frozen=True, slots=True)
class Metadata:
    """``struct clipboard_metadata``: what the daemon writes to ``.metadata``."""

    vmname: str = ""
    xevent_timestamp: int = 0
    successful: bool = False
    copy_action: bool = False
    paste_action: bool = False
    malformed_request: bool = False
    oversized_request: bool = False
    cleared: bool = False
    qrexec_clipboard: bool = False
    sent_size: int = 0
    buffer_size: int = 0
    protocol_version_xside: int = 0
    protocol_version_vmside: int = 0

    def text(self) -> str:
        """The file as the daemon prints it: one ``"key":value`` a line, in braces."""
        lines = [f'"vmname":"{self.vmname}"']
        for item in fields(self)[1:]:
            lines.append(f'"{item.name}":{int(getattr(self, item.name))}')
        return "{\n" + ",\n".join(lines) + "\n}\n"

    @classmethod
    def parse(cls, text: str) -> Metadata | None:
        """The daemon's reading of ``.metadata`` (None where it gives up)."""
        vmname = ""
        numbers: dict[str, Any] = {}
        names = {item.name for item in fields(cls)}
        for line in text.split("\n"):
            if line in ("", "{", "}"):
                continue
            match = re.match(r'"([A-Za-z0-9_-]+)":(["A-Za-z0-9_-]+)', line)
            if match is None:
                return None
            key, value = match[1], match[2]
            if key == "vmname":
                if not 2 <= len(value) < 34 or value[0] != '"' or value[-1] != '"':
                    return None
                vmname = value[1:-1]
                continue
            number = re.match(r"\d+", value)
            if number is None:
                return None
            if key in names:
                numbers[key] = int(number[0])
        return replace(cls(vmname=vmname), **numbers)


def newer_operation(recorded: int, ours: int) -> bool:
    """The daemon's test that a clipboard operation at X time ``recorded`` (from
    ``.metadata``) came at or after ours at ``ours``, so ours is discarded: the
    difference, as an unsigned long, is below 2**31."""
    return (recorded - ours) % _WRAP < _RECENT


class ClipboardDir:
    """The clipboard files in one private directory."""

    def __init__(self, path: Path) -> None:
        self.path = path

    @classmethod
    def open(cls, path: Path | None) -> ClipboardDir:
        """``path`` (made 0700 if missing), or the default under ``$XDG_RUNTIME_DIR``;
        ``UnsafeDirectory`` naming the problem when it is not private or cannot be."""
        if path is None:
            runtime = os.environ.get("XDG_RUNTIME_DIR")
            if not runtime:
                raise UnsafeDirectory("XDG_RUNTIME_DIR is not set, so the clipboard has no "
                                      "default directory: pass --clipboard-dir DIR (a "
                                      "directory of yours, mode 0700)")
            check_private_dir(Path(runtime), "XDG_RUNTIME_DIR")
            path = Path(runtime) / DEFAULT_DIR_NAME
        private_dir(path, "the clipboard directory")
        return cls(path)

    @property
    def file(self) -> Path:
        return self.path / CLIPBOARD_FILE

    def _companion(self, suffix: str) -> Path:
        return self.path / (CLIPBOARD_FILE + suffix)

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """``inter_appviewer_lock``: an exclusive ``flock`` of ``appviewer.lock``."""
        fd = os.open(self.path / LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW
                     | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # lets go of the lock

    # -- the daemon's operations -----------------------------------------------------------

    def recorded_time(self) -> int:
        """The X time of the last operation ``.metadata`` records (0: none, or unreadable)."""
        text = _read(self._companion(".metadata"))
        if text is None:
            return 0
        found = Metadata.parse(text.decode("utf-8", "replace"))
        return found.xevent_timestamp if found is not None else 0

    def store(self, data: bytes, metadata: Metadata) -> bool:
        """The agent's text after a copy at X time ``metadata.xevent_timestamp``: written
        with ``.source`` (the VM), ``.xevent`` and ``.metadata``. False when it is
        discarded because another operation came since; True when written (or when
        writing failed, which is logged: the daemon shows an error and goes on)."""
        with self.locked():
            if newer_operation(self.recorded_time(), metadata.xevent_timestamp):
                log.warning("received clipboard data after some other clipboard op, "
                            "discarding")
                return False
            try:
                _write(self.file, data)
            except OSError as exc:
                log.warning("secure copy: failed to write %s: %s", self.file, exc)
                return True
            _write(self._companion(".source"), metadata.vmname.encode())
            _write(self._companion(".xevent"), f"{metadata.xevent_timestamp}\n".encode())
            _write(self._companion(".metadata"),
                   replace(metadata, successful=True).text().encode())
        return True

    def clear(self, metadata: Metadata) -> None:
        """``clear_clipboard``: the file emptied, ``.metadata`` written (``cleared``),
        ``.source`` emptied."""
        with self.locked():
            self._clear(metadata)

    def _clear(self, metadata: Metadata) -> None:
        try:
            fd = os.open(self.file, os.O_WRONLY | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC)
            os.close(fd)
        except FileNotFoundError:
            pass
        except OSError:
            with contextlib.suppress(FileNotFoundError):
                self.file.unlink()
        _write(self._companion(".metadata"), replace(metadata, cleared=True).text().encode())
        _write(self._companion(".source"), b"")

    def take(self, time: int, metadata: Metadata) -> bytes:
        """A paste at X time ``time``: the clipboard's text, and the clipboard emptied.

        Empty when there is nothing to paste: an operation recorded at ``time`` or later,
        no ``.source`` or an empty one, no file (these leave the files as they are), or an
        empty file."""
        with self.locked():
            if newer_operation(self.recorded_time(), time):
                log.warning("received clipboard xevent after some other clipboard op, "
                            "discarding")
                return b""
            source = _read(self._companion(".source"))
            if not source:
                log.info("nothing to paste: %s is missing or empty",
                         self._companion(".source"))
                return b""
            data = _read(self.file)
            if data is None:
                return b""
            self._clear(replace(metadata, successful=bool(data), sent_size=len(data)))
            return data


def _read(path: Path) -> bytes | None:
    """A regular file's bytes, never through a symlink; None if it is missing or not one."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError as exc:
        if exc.errno not in (errno.ENOENT, errno.ELOOP):
            log.warning("cannot read %s: %s", path, exc.strerror)
        elif exc.errno == errno.ELOOP:
            log.warning("%s is a symlink; the emulator does not read through symlinks", path)
        return None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            log.warning("%s is not a regular file", path)
            return None
        chunks = []
        while chunk := os.read(fd, 1 << 16):
            chunks.append(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


def _write(path: Path, data: bytes) -> None:
    """Create or replace ``path`` (mode 0600) with ``data``, never through a symlink."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC,
                 0o600)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
    finally:
        os.close(fd)
