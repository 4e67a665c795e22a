"""The emulator's clipboard files: qubes-guid's names, formats and rules, in a private directory.

The expectations are the daemon's (``gui-daemon/xside.c``): ``.metadata`` printed key by
key, a copy or a paste discarded when an operation at the same X time or later is on
record, a paste refused without a source VM, every paste emptying the clipboard.
"""

from __future__ import annotations

import os
import stat
from dataclasses import replace
from pathlib import Path

import pytest

from qubesshm.emulator.clipboard import (
    CLIPBOARD_FILE,
    DEFAULT_DIR_NAME,
    ClipboardDir,
    Metadata,
    newer_operation,
)
from qubesshm.grants.files import UnsafeDirectory

COPY = Metadata(vmname="work", xevent_timestamp=1000, copy_action=True, sent_size=5,
                buffer_size=64000, protocol_version_xside=65544, protocol_version_vmside=65543)


def test_metadata_is_printed_as_the_daemon_prints_it() -> None:
    assert COPY.text() == (
        '{\n"vmname":"work",\n"xevent_timestamp":1000,\n"successful":0,\n"copy_action":1,\n'
        '"paste_action":0,\n"malformed_request":0,\n"oversized_request":0,\n"cleared":0,\n'
        '"qrexec_clipboard":0,\n"sent_size":5,\n"buffer_size":64000,\n'
        '"protocol_version_xside":65544,\n"protocol_version_vmside":65543\n}\n')
    assert Metadata.parse(COPY.text()) == COPY
    assert Metadata.parse('{\n"vmname":work,\n}\n') is None  # a name must be quoted
    assert Metadata.parse('{\n"xevent_timestamp":"1"\n}\n') is None
    assert Metadata.parse('{\n"unknown":3,\n"xevent_timestamp":7\n}\n') == Metadata(
        xevent_timestamp=7)


def test_an_operation_on_record_at_the_same_time_or_later_wins() -> None:
    assert newer_operation(1000, 1000)
    assert newer_operation(1001, 1000)
    assert not newer_operation(999, 1000)
    assert not newer_operation(0, 5)  # nothing on record
    assert newer_operation(5, 2**64 - 3)  # unsigned long arithmetic, as the daemon's


@pytest.fixture
def clip(tmp_path: Path) -> ClipboardDir:
    return ClipboardDir.open(tmp_path / "clip")


def read(clip: ClipboardDir, suffix: str = "") -> bytes:
    return (clip.path / (CLIPBOARD_FILE + suffix)).read_bytes()


def test_the_directory_is_made_private_or_refused(tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    made = ClipboardDir.open(tmp_path / "new")
    assert stat.S_IMODE(os.lstat(made.path).st_mode) == 0o700
    shared = tmp_path / "shared"
    shared.mkdir(mode=0o755)
    os.chmod(shared, 0o755)
    with pytest.raises(UnsafeDirectory, match="others may read it"):
        ClipboardDir.open(shared)
    (tmp_path / "link").symlink_to(made.path)
    with pytest.raises(UnsafeDirectory, match="not a directory"):
        ClipboardDir.open(tmp_path / "link")
    runtime = tmp_path / "rt"
    runtime.mkdir(mode=0o700)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(runtime))
    assert ClipboardDir.open(None).path == runtime / DEFAULT_DIR_NAME
    monkeypatch.delenv("XDG_RUNTIME_DIR")
    with pytest.raises(UnsafeDirectory, match="--clipboard-dir"):
        ClipboardDir.open(None)


def test_a_copy_writes_the_four_files(clip: ClipboardDir) -> None:
    assert clip.store(b"hello", COPY)
    assert read(clip) == b"hello"
    assert read(clip, ".source") == b"work"
    assert read(clip, ".xevent") == b"1000\n"
    assert Metadata.parse(read(clip, ".metadata").decode()) == replace(COPY, successful=True)
    assert stat.S_IMODE(os.lstat(clip.file).st_mode) == 0o600
    # An older copy (another daemon's X time is earlier) is discarded.
    assert not clip.store(b"older", Metadata(vmname="other", xevent_timestamp=900))
    assert not clip.store(b"same", Metadata(vmname="other", xevent_timestamp=1000))
    assert read(clip) == b"hello"
    assert clip.store(b"newer", Metadata(vmname="other", xevent_timestamp=1001))
    assert (read(clip), read(clip, ".source")) == (b"newer", b"other")


def test_a_paste_takes_the_text_and_empties_the_clipboard(clip: ClipboardDir) -> None:
    paste = Metadata(vmname="dest", xevent_timestamp=0, paste_action=True)
    assert clip.take(2000, paste) == b""  # nothing there: nothing written either
    assert not clip.file.exists()
    clip.file.write_bytes(b"from dom0")
    assert clip.take(2000, paste) == b""  # no .source: the daemon's policy says no
    assert read(clip) == b"from dom0"
    (clip.path / (CLIPBOARD_FILE + ".source")).write_bytes(b"dom0")
    assert clip.take(2000, paste) == b"from dom0"
    assert (read(clip), read(clip, ".source")) == (b"", b"")
    recorded = Metadata.parse(read(clip, ".metadata").decode())
    assert recorded is not None
    assert (recorded.vmname, recorded.paste_action, recorded.cleared, recorded.successful,
            recorded.sent_size) == ("dest", True, True, True, 9)


def test_a_paste_before_the_last_operation_is_discarded(clip: ClipboardDir) -> None:
    assert clip.store(b"copied", COPY)  # recorded at X time 1000
    assert clip.take(1000, Metadata(paste_action=True)) == b""
    assert read(clip) == b"copied"
    assert clip.take(1001, Metadata(paste_action=True)) == b"copied"


def test_symlinks_are_neither_read_nor_written_through(clip: ClipboardDir,
                                                       tmp_path: Path) -> None:
    target = tmp_path / "elsewhere"
    target.write_bytes(b"secret")
    clip.file.symlink_to(target)
    (clip.path / (CLIPBOARD_FILE + ".source")).write_bytes(b"dom0")
    assert clip.take(5, Metadata()) == b""
    assert clip.store(b"overwrite", COPY)  # the failure is logged, the request answered
    assert target.read_bytes() == b"secret"
    assert clip.file.is_symlink()
