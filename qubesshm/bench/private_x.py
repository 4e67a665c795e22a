"""A private Xvfb for a benchmark: an X server of the run's own, on a display it picks.

``private_xvfb(width, height)`` starts ``Xvfb`` with one ``width`` x ``height``
screen of depth 24, lets it choose a free display number (``-displayfd``), and
yields that display (``":N"``); the server ends with the context. A missing
``Xvfb`` is one clear ``RuntimeError``, raised before anything starts. The demo
starts its X screen here too, with its own words for a missing one.
"""

from __future__ import annotations

import contextlib
import os
import select
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass

START_TIMEOUT = 20.0


@dataclass(frozen=True)
class PrivateX:
    display: str  # ":N"
    process: subprocess.Popen[bytes]
    width: int
    height: int

    @property
    def pid(self) -> int:
        return self.process.pid

    def describe(self) -> str:
        return f"a private Xvfb on {self.display} ({self.width}x{self.height}x24)"


def xvfb_command() -> str:
    """Xvfb's path, or a ``RuntimeError`` saying how to get it."""
    path = shutil.which("Xvfb")
    if path is None:
        raise RuntimeError("Xvfb is not installed (Debian package 'xvfb'); agent mode shows "
                           "the emulator's windows on a private one")
    return path


def _display_number(read: int, proc: subprocess.Popen[bytes], timeout: float) -> int:
    deadline = time.monotonic() + timeout
    text = b""
    while not text.endswith(b"\n"):
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise RuntimeError(f"Xvfb did not name its display within {timeout:g} s")
        ready, _, _ = select.select([read], [], [], remaining)
        if not ready:
            continue
        chunk = os.read(read, 16)
        if not chunk:  # it exited: its end of the pipe closed
            status = proc.wait()
            raise RuntimeError(f"Xvfb exited with status {status} before naming its display "
                               "(run 'Xvfb -displayfd 1' by hand to see why)")
        text += chunk
    return int(text)


@contextlib.contextmanager
def private_xvfb(width: int, height: int, *, command: str | None = None,
                 timeout: float = START_TIMEOUT) -> Iterator[PrivateX]:
    """``command`` (default: ``xvfb_command()``) as a private X server; one that exits
    or names no display within ``timeout`` s is a ``RuntimeError``."""
    if command is None:
        command = xvfb_command()
    read, write = os.pipe()
    try:
        proc = subprocess.Popen(
            [command, "-displayfd", str(write), "-screen", "0", f"{width}x{height}x24",
             "-nolisten", "tcp"], pass_fds=(write,), stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, process_group=0)
    except BaseException:
        os.close(read)
        raise
    finally:
        os.close(write)
    try:
        with os.fdopen(read, "rb", buffering=0):
            number = _display_number(read, proc, timeout)
        yield PrivateX(f":{number}", proc, width, height)
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
