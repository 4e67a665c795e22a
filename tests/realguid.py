"""The real Qubes GUI daemon (qubes-guid, invisible mode, socket vchan) as a test peer.

``locate_runner`` finds ``/tmp/guid/run_guid.sh`` with a built daemon, or builds it once
with the shared tools' ``setup.sh`` (``$QUBESSHM_GUID_TOOLS``, ``/work/shared/tools/qubes-guid``
or ``../shared/tools/qubes-guid`` beside the repo), or skips saying why. ``RealGuid`` owns a
private Xvfb display and a domain id; each ``session()`` listens as the vchan server (a
plain AF_UNIX stream), starts one daemon against it and does the agent's handshake.

For an agent under test that is the vchan server itself, ``start_daemon`` runs a daemon
against its socket (optionally through a ``GuidTap`` that records both directions), and
``daemon_problems``, ``created_windows``, ``destroyed_windows``, ``dumps_read`` and
``x_window_names`` read what the daemon did from its log and its X windows.
"""

from __future__ import annotations

import os
import random
import re
import select
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from qubesshm.guiproto import messages as gm
from qubesshm.guiproto.codec import AgentDecoder, DaemonDecoder
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


# -- qubes-guid against someone else's vchan server (an agent under test) ---------------

# Lines of qubes-guid (xside.c) that mean the VM sent something wrong, or something the
# daemon had to refuse, clamp or work around, and lines of its exits (errx/warnx print
# "qubes-guid: ..."). Everything else it prints at -v -v is informational: "Created ...",
# "set title ...", "MSG_WINDOW_DUMP for ...", " XDestroyWindow ...", and "cannot lookup
# 0x... in wid2windowdata" (an X event for a window the VM destroyed before the event was
# read: the daemon looks it up, finds nothing and drops the event).
COMPLAINTS = (
    r"Verify failed",                          # VERIFY() on a value from the VM
    r"without CREATE",                         # a message for a window never created
    r"CREATE for already existing window",
    r"incorrect untrusted_len",                # fixed-size message of the wrong length
    r"message is too short",
    r"Width or height too large",
    r"got too small",                          # dump or mfndump with too few pages
    r"unknown window dump type",
    r"got unknown msg type",
    r"invalid body size",                      # dump refs not a multiple of 4, too many
    r"invalid P(MinSize|MaxSize|ResizeInc|BaseSize)",  # WINDOW_HINTS out of range
    r"still set as transient_for",             # a parent destroyed before its transient
    r"unset override_redirect",                # a popup too big to be override-redirect
    r"cannot set class hint",                  # WMCLASS after MAP
    r"cannot dock",
    r"clipboard data len",
    r"MSG_MFNDUMP",                            # never valid outside dom0
    r"ErrorHandler:",                          # an X error the VM's request caused
    r"failed for window",                      # an xcb request that failed (xcb handler)
    r"BUG:",
    r"^qubes-guid: (?!agent EOF, restart suppressed)",  # errx()/warnx(): fatal or warning
    r"Segmentation fault|Aborted|core dumped",
)
_COMPLAINT = re.compile("|".join(f"(?:{c})" for c in COMPLAINTS))


def daemon_problems(stderr: str) -> list[str]:
    """The lines of a qubes-guid log that say the VM's side did something wrong."""
    return [line for line in stderr.splitlines() if _COMPLAINT.search(line)]


def created_windows(stderr: str) -> list[tuple[int, int]]:
    """``(local X window, VM window)`` of each "Created" line, in order."""
    return [(int(local, 16), int(remote, 16)) for local, remote
            in re.findall(r"^Created 0x([0-9a-f]+)\(0x([0-9a-f]+)\)", stderr, re.M)]


def destroyed_windows(stderr: str) -> list[int]:
    """The local X window of each " XDestroyWindow" line, in order."""
    return [int(local, 16) for local in re.findall(r"^ XDestroyWindow 0x([0-9a-f]+)$",
                                                   stderr, re.M)]


def dumps_read(stderr: str) -> list[tuple[int, int, int]]:
    """``(VM window, width, height)`` of each dump the daemon took (and ACKed)."""
    return [(int(remote, 16), int(w), int(h)) for remote, w, h in re.findall(
        r"^MSG_WINDOW_DUMP for 0x[0-9a-f]+\(0x([0-9a-f]+)\): (\d+)x(\d+), type = 0$",
        stderr, re.M)]


class TapConnection:
    """One daemon's connection through a ``GuidTap``: the bytes each way, as they passed."""

    def __init__(self) -> None:
        self.to_daemon = bytearray()
        self.to_agent = bytearray()
        self.ended = False

    def handshake(self) -> Negotiated | None:
        """The version and screen the daemon answered (None before it did)."""
        shake = AgentHandshake(gm.VERSION)
        return shake.feed(bytes(self.to_agent[:4 + 16]))

    def agent_messages(self) -> list[gm.Message]:
        """What the agent sent, after its version (whole messages only)."""
        negotiated = self.handshake()
        if negotiated is None:
            return []
        return DaemonDecoder(negotiated.version).feed(bytes(self.to_daemon[4:]))

    def daemon_messages(self) -> list[gm.Message]:
        """What the daemon sent after the handshake (whole messages only)."""
        negotiated = self.handshake()
        if negotiated is None:
            return []
        return AgentDecoder(negotiated.version).feed(bytes(self.to_agent[4 + 16:]))


class GuidTap:
    """A relay the daemon connects to in place of the agent's vchan socket: it connects
    to the agent for each daemon connection and passes both directions through
    unchanged, keeping a copy (``connections``, one per daemon connection)."""

    def __init__(self, listen_path: Path, agent_path: Path) -> None:
        self.agent_path = agent_path
        self.connections: list[TapConnection] = []
        self.lock = threading.Lock()
        listen_path.unlink(missing_ok=True)
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._listener.bind(str(listen_path))
        self._listener.listen(4)
        self._stop_r, self._stop_w = os.pipe()
        self._thread = threading.Thread(target=self._run, name="guid-tap", daemon=True)
        self._thread.start()

    def snapshot(self) -> list[TapConnection]:
        """A copy of the connections so far (the relay keeps appending to its own)."""
        with self.lock:
            out = []
            for conn in self.connections:
                copy = TapConnection()
                copy.to_daemon += conn.to_daemon
                copy.to_agent += conn.to_agent
                copy.ended = conn.ended
                out.append(copy)
            return out

    def _run(self) -> None:
        try:
            while True:
                ready, _, _ = select.select([self._listener.fileno(), self._stop_r], [], [])
                if self._stop_r in ready:
                    return
                daemon, _ = self._listener.accept()
                self._relay(daemon)
        finally:
            self._listener.close()

    def _relay(self, daemon: socket.socket) -> None:
        record = TapConnection()
        with self.lock:
            self.connections.append(record)
        agent = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            agent.connect(str(self.agent_path))
        except OSError:
            agent.close()
            daemon.close()
            record.ended = True
            return
        # daemon → agent bytes are recorded in to_agent, and the other way round.
        peers = {daemon.fileno(): (daemon, agent, record.to_agent),
                 agent.fileno(): (agent, daemon, record.to_daemon)}
        try:
            while True:
                ready, _, _ = select.select([*peers, self._stop_r], [], [])
                if self._stop_r in ready:
                    return
                for fd in ready:
                    sock, other, copy = peers[fd]
                    try:
                        data = sock.recv(1 << 16)
                    except OSError:
                        data = b""
                    if not data:
                        return
                    with self.lock:
                        copy += data
                    try:
                        other.sendall(data)
                    except OSError:
                        return
        finally:
            with self.lock:
                record.ended = True
            daemon.close()
            agent.close()

    def close(self) -> None:
        os.write(self._stop_w, b"x")
        self._thread.join(TIMEOUT)
        os.close(self._stop_r)
        os.close(self._stop_w)


class GuidDaemon:
    """One qubes-guid connecting to an agent's vchan socket (directly or through a tap)."""

    def __init__(self, process: subprocess.Popen[bytes], stderr_path: Path,
                 tap: GuidTap | None) -> None:
        self.process = process
        self.stderr_path = stderr_path
        self.tap = tap

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def running(self) -> bool:
        return self.process.poll() is None

    def freeze(self) -> None:
        """SIGSTOP: the daemon reads and answers nothing until ``kill``ed (or SIGCONT)."""
        self.process.send_signal(signal.SIGSTOP)

    def kill(self) -> None:
        """SIGKILL: the daemon dies mid-stream, as a crashed one does."""
        self.process.kill()
        self.process.wait(TIMEOUT)

    def wait_exit(self, timeout: float = TIMEOUT) -> int:
        try:
            return self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"qubes-guid did not exit:\n{self.stderr()[-4000:]}") from None

    def stop(self) -> None:
        """Whatever state it is in: gone, and the tap closed."""
        if self.process.poll() is None:
            self.kill()
        if self.tap is not None:
            self.tap.close()


def start_daemon(guid: RealGuid, *, tap: bool = False,
                 env: dict[str, str] | None = None) -> GuidDaemon:
    """qubes-guid for ``guid``'s domain and display, as the vchan client of whoever
    serves ``guid.socket_path`` (an agent started with ``--vchan-dir guid.sockdir
    --domid guid.domid --gui-domid 0``). With ``tap``, through a ``GuidTap``."""
    guid._runs += 1
    run = guid._runs
    sockdir = guid.sockdir
    relay = None
    if tap:
        sockdir = guid.workdir / f"tap.{run}"
        sockdir.mkdir(parents=True, exist_ok=True)
        relay = GuidTap(sockdir / guid.socket_path.name, guid.socket_path)
    stderr_path = guid.workdir / f"guid.{run}.stderr"
    with open(stderr_path, "wb") as err:
        process = subprocess.Popen(
            [str(guid.runner), str(sockdir), str(guid.domid), str(guid.display)],
            stdin=subprocess.DEVNULL, stdout=err, stderr=subprocess.STDOUT,
            env={**os.environ, "GUID_ON_EOF": "exit", **(env or {})})
    return GuidDaemon(process, stderr_path, relay)


def x_window_names(display: int) -> dict[int, str]:
    """``_NET_WM_NAME`` of each top-level X window on ``:display`` (the daemon's windows
    for the VM's: titles as the daemon set them)."""
    import xcffib
    import xcffib.xproto

    conn = xcffib.connect(display=f":{display}")
    try:
        root = conn.get_setup().roots[0].root
        intern = conn.core.InternAtom
        net_wm_name = intern(False, len("_NET_WM_NAME"), "_NET_WM_NAME").reply().atom
        utf8 = intern(False, len("UTF8_STRING"), "UTF8_STRING").reply().atom
        names = {}
        for window in conn.core.QueryTree(root).reply().children:
            try:
                reply = conn.core.GetProperty(False, window, net_wm_name, utf8, 0,
                                              1024).reply()
            except xcffib.xproto.WindowError:
                continue  # destroyed since QueryTree
            if reply.value_len:
                names[window] = reply.value.to_string()
        return names
    finally:
        conn.disconnect()


class XPeer:
    """Another X client on the daemon's display, doing to the daemon's windows what a
    window manager and a person do in dom0: map one (in invisible mode the daemon never
    maps its windows itself, so no pointer can reach them otherwise), move the pointer
    into it, move or resize it, and read the ``_NET_WM_STATE`` the daemon set on it."""

    def __init__(self, display: int) -> None:
        import xcffib
        import xcffib.xproto

        self._xproto = xcffib.xproto
        self.conn = xcffib.connect(display=f":{display}")
        self.root = self.conn.get_setup().roots[0].root

    def atom(self, name: str) -> int:
        atom: int = self.conn.core.InternAtom(False, len(name), name).reply().atom
        return atom

    def atom_name(self, atom: int) -> str:
        name: str = self.conn.core.GetAtomName(atom).reply().name.to_string()
        return name

    def map(self, window: int) -> None:
        self.conn.core.MapWindowChecked(window).check()

    def viewable(self, window: int) -> bool:
        state: int = self.conn.core.GetWindowAttributes(window).reply().map_state
        viewable: int = self._xproto.MapState.Viewable
        return state == viewable

    def warp(self, window: int, x: int, y: int) -> None:
        """The pointer to (x, y) of ``window`` (or of the root, ``window`` 0)."""
        self.conn.core.WarpPointerChecked(0, window or self.root, 0, 0, 0, 0, x, y).check()

    def configure(self, window: int, x: int, y: int, width: int, height: int) -> None:
        mask = (self._xproto.ConfigWindow.X | self._xproto.ConfigWindow.Y
                | self._xproto.ConfigWindow.Width | self._xproto.ConfigWindow.Height)
        self.conn.core.ConfigureWindowChecked(window, mask, [x, y, width, height]).check()

    def net_wm_state(self, window: int) -> list[str]:
        """The atoms of ``_NET_WM_STATE`` on ``window``, by name ([] when unset)."""
        reply = self.conn.core.GetProperty(False, window, self.atom("_NET_WM_STATE"),
                                           self._xproto.Atom.ATOM, 0, 64).reply()
        return [self.atom_name(a) for a in reply.value.to_atoms()] if reply.value_len else []

    def close(self) -> None:
        self.conn.disconnect()
