"""The real Qubes GUI daemon (qubes-guid, invisible mode, socket vchan) as a test peer.

``locate_runner`` finds ``/tmp/guid/run_guid.sh`` with a built daemon, or builds it once
with the shared tools' ``setup.sh`` (``$QUBESSHM_GUID_TOOLS``, ``/work/shared/tools/qubes-guid``
or ``../shared/tools/qubes-guid`` beside the repo), or skips saying why. ``RealGuid`` owns a
private Xvfb display and a domain id; each ``session()`` listens as the vchan server (a
plain AF_UNIX stream), starts one daemon against it and does the agent's handshake.
"""

from __future__ import annotations

import os
import random
import select
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from qubesshm.guiproto import messages as gm
from qubesshm.guiproto.codec import AgentDecoder
from qubesshm.guiproto.handshake import AgentHandshake, Negotiated

GUID_HOME = Path("/tmp/guid")
RUNNER = GUID_HOME / "run_guid.sh"
BINARY = GUID_HOME / "src/qubes-gui-daemon/gui-daemon/qubes-guid"
REPO = Path(__file__).resolve().parent.parent
TIMEOUT = 30.0

_setup_failure: list[str] = []  # set once setup.sh failed in this run


def _tools_dirs() -> list[Path]:
    dirs = [Path(p) for p in [os.environ.get("QUBESSHM_GUID_TOOLS", "")] if p]
    return [*dirs, Path("/work/shared/tools/qubes-guid"), REPO.parent / "shared/tools/qubes-guid"]


def locate_runner() -> Path:
    """``run_guid.sh`` of a built qubes-guid; builds it once if its tools are here."""
    if os.geteuid() != 0:
        pytest.skip("run_guid.sh needs root (a private mount namespace for the daemon)")
    if RUNNER.is_file() and BINARY.is_file():
        return RUNNER
    setup = next((d / "setup.sh" for d in _tools_dirs() if (d / "setup.sh").is_file()), None)
    if setup is None:
        pytest.skip(f"the real qubes-guid is not built ({RUNNER} missing) and no setup.sh "
                    f"found in {', '.join(map(str, _tools_dirs()))}")
    if not _setup_failure:
        done = subprocess.run(["bash", str(setup)], capture_output=True, text=True,
                              timeout=1800, check=False)
        if done.returncode != 0 or not BINARY.is_file():
            _setup_failure.append((done.stdout + done.stderr)[-3000:])
    if _setup_failure:
        pytest.fail(f"{setup} could not build qubes-guid:\n{_setup_failure[0]}")
    return RUNNER


def free_display() -> int:
    """A display number no X server uses (random, so that parallel runs rarely meet)."""
    numbers = list(range(300, 900))
    random.shuffle(numbers)
    for n in numbers:
        if not Path(f"/tmp/.X11-unix/X{n}").exists() and not Path(f"/tmp/.X{n}-lock").exists():
            return n
    raise RuntimeError("no free X display number in 300..899")


class GuidSession:
    """One daemon run: the agent's connection after the handshake, and the daemon process."""

    def __init__(self, process: subprocess.Popen[bytes], conn: socket.socket,
                 stderr_path: Path, negotiated: Negotiated) -> None:
        self.process = process
        self.conn = conn
        self.stderr_path = stderr_path
        self.version = negotiated.version
        self.xconf = negotiated.xconf
        self.decoder = AgentDecoder(negotiated.version)
        self.received: list[gm.Message] = self.decoder.feed(negotiated.leftover)

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def send(self, data: bytes) -> bool:
        """Send to the daemon; False if it hung up first (it may exit in the middle)."""
        try:
            self.conn.sendall(data)
        except (BrokenPipeError, ConnectionResetError):
            return False
        return True

    def receive_until(self, count: int, timeout: float = TIMEOUT) -> list[gm.Message]:
        """Messages from the daemon until ``count`` arrived (all so far are returned)."""
        deadline = time.monotonic() + timeout
        while len(self.received) < count:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"{len(self.received)} of {count} replies: "
                                     f"{self.received}\n{self.stderr()}")
            ready, _, _ = select.select([self.conn], [], [], left)
            if ready:
                data = self.conn.recv(65536)
                if not data:
                    raise AssertionError(f"the daemon hung up after {self.received}:\n"
                                         f"{self.stderr()}")
                self.received += self.decoder.feed(data)
        return list(self.received)

    def wait_exit(self, timeout: float = TIMEOUT) -> int:
        try:
            return self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"qubes-guid did not exit:\n{self.stderr()}") from None

    def hang_up(self) -> int:
        """Close the agent's end; the daemon (GUID_ON_EOF=exit) then exits 0."""
        self.conn.close()
        return self.wait_exit()


class RealGuid:
    """qubes-guid runs on one private Xvfb display with one domain id."""

    def __init__(self, runner: Path, workdir: Path) -> None:
        self.runner = runner
        self.workdir = workdir
        self.display = free_display()
        self.domid = random.randrange(1000, 30000)
        self.sockdir = workdir / "vchan"
        self.sockdir.mkdir(parents=True, exist_ok=True)
        self._started = time.time()
        self._runs = 0

    @property
    def socket_path(self) -> Path:
        return self.sockdir / f"vchan.{self.domid}.0.6000.sock"

    @contextmanager
    def session(self, version: int = gm.VERSION, greeting: bytes | None = None
                ) -> Iterator[GuidSession]:
        """A daemon connected to us, after the handshake with ``version``.

        ``greeting``: raw bytes to send instead of an agent's (the handshake is then left
        to the test, through ``session.conn``; ``session.version`` is the one offered).
        """
        self.socket_path.unlink(missing_ok=True)
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(str(self.socket_path))
        listener.listen(1)
        self._runs += 1
        stderr_path = self.workdir / f"guid.{self._runs}.stderr"
        with open(stderr_path, "wb") as err:
            process = subprocess.Popen(
                [str(self.runner), str(self.sockdir), str(self.domid), str(self.display)],
                stdin=subprocess.DEVNULL, stdout=err, stderr=subprocess.STDOUT,
                env=dict(os.environ, GUID_ON_EOF="exit"))
        conn: socket.socket | None = None
        try:
            conn = self._accept(listener, process, stderr_path)
            if greeting is not None:
                conn.sendall(greeting)
                negotiated = Negotiated(version, gm.Xconf(0, 0, 0, 0), b"")
            else:
                negotiated = self._handshake(conn, version, stderr_path)
            yield GuidSession(process, conn, stderr_path, negotiated)
        finally:
            listener.close()
            if conn is not None:
                conn.close()
            try:
                process.wait(timeout=TIMEOUT)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
            self.socket_path.unlink(missing_ok=True)

    def _accept(self, listener: socket.socket, process: subprocess.Popen[bytes],
                stderr_path: Path) -> socket.socket:
        deadline = time.monotonic() + TIMEOUT
        while True:
            ready, _, _ = select.select([listener], [], [], 0.2)
            if ready:
                return listener.accept()[0]
            if process.poll() is not None or time.monotonic() > deadline:
                raise AssertionError("qubes-guid did not connect:\n"
                                     + stderr_path.read_text(errors="replace"))

    def _handshake(self, conn: socket.socket, version: int, stderr_path: Path) -> Negotiated:
        handshake = AgentHandshake(version)
        conn.sendall(handshake.greeting())
        deadline = time.monotonic() + TIMEOUT
        while True:
            ready, _, _ = select.select([conn], [], [], max(0.0, deadline - time.monotonic()))
            data = conn.recv(4096) if ready else b""
            if not data:
                raise AssertionError("no handshake from qubes-guid:\n"
                                     + stderr_path.read_text(errors="replace"))
            result = handshake.feed(data)
            if result is not None:
                return result

    def close(self) -> None:
        """Stop the Xvfb that run_guid.sh started for this display, and drop its state."""
        pid_file = GUID_HOME / "state" / f"Xvfb.{self.display}.pid"
        shutil.rmtree(GUID_HOME / "state" / str(self.domid), ignore_errors=True)
        try:
            pid = int(pid_file.read_text().strip())
            fresh = pid_file.stat().st_mtime >= self._started - 1
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except (OSError, ValueError):
            return
        if fresh and cmdline[:2] == [b"Xvfb", f":{self.display}".encode()]:
            os.kill(pid, signal.SIGTERM)
            pid_file.unlink(missing_ok=True)
            pid_file.with_suffix(".log").unlink(missing_ok=True)

