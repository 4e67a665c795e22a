"""Agent mode end to end: ``qubesshm agent`` and ``qubesshm guid-emulator`` on a private Xvfb.

What ``tests/test_agent_emulator.py`` drives: a *world* (a short private directory
holding ``XDG_RUNTIME_DIR``, the simulated kernels' root and the socket vchan's
directory), the agent and the emulator as the separate processes they are in use
(started through the ``qubesshm`` command), Wayland clients as processes (or
pywayland in the test), the agent's counters read from its ``NAME.stats``
socket, and what the emulator shows read back from the X server with xcffib:
the X window of a GUI window found by its ``WM_NAME`` or ``WM_CLASS``, its
geometry and its pixels (``GetImage``). Everything waits on conditions, each
with a generous deadline, never on time alone.

The Xvfb and the window listing come from ``test_emulator_x`` (the emulator's
own tests), so both files read the screen the same way.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import xcffib
import xcffib.xproto as xp
from numpy.typing import NDArray
from test_emulator_x import Xvfb, emulator_windows, private_xvfb, text_property

from qubesshm.relay.control import StatsError, read_stats

__all__ = ["Xvfb", "private_xvfb"]

REPO = Path(__file__).resolve().parent.parent
EXAMPLES = REPO / "examples"
AGENT_DOMID = 5  # the VM's domain id; the emulator is the GUI domain, 0
DEADLINE = 60.0  # for any one condition; a passing run never comes near it
POLL = 0.02
READY_LINE = "qubesshm: agent for Wayland apps on "
# The command line of the two processes (a list, so a test may wrap it).
QUBESSHM = [sys.executable, "-m", "qubesshm"]

T = TypeVar("T")


class WaitTimeout(AssertionError):
    """A condition did not come true within its deadline."""


def wait_until(condition: Callable[[], T | None], what: str, *, timeout: float = DEADLINE,
               between: Callable[[float], None] | None = None,
               detail: Callable[[], object] | None = None) -> T:
    """Poll ``condition`` until it returns something true, and return that.

    ``between(seconds)`` is called between polls instead of sleeping (a pywayland
    client in the test process dispatches its events there); ``detail()`` says what
    things looked like when the deadline passed."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            more = f": {detail()}" if detail is not None else ""
            raise WaitTimeout(f"timed out after {timeout:g} s waiting for {what}{more}")
        if between is not None:
            between(POLL)
        else:
            time.sleep(POLL)


# -- the world: directories and environment ---------------------------------------------------


@dataclass
class World:
    """One agent's surroundings: its runtime dir, simulated kernels and vchan dir."""

    top: Path
    display: str

    @property
    def runtime(self) -> Path:
        return self.top / "rt"

    @property
    def sim(self) -> Path:
        return self.top / "sim"

    @property
    def vchan(self) -> Path:
        return self.top / "vc"

    def env(self, **extra: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items()
               if k not in ("VCHAN_DOMAIN", "WAYLAND_DISPLAY", "WAYLAND_SOCKET",
                            "QUBESSHM_SIM_ROOT", "GDK_BACKEND")}
        env.update(XDG_RUNTIME_DIR=str(self.runtime), QUBESSHM_SIM_ROOT=str(self.sim),
                   VCHAN_SOCKET_DIR=str(self.vchan), DISPLAY=self.display,
                   PYTHONPATH=str(REPO), NO_AT_BRIDGE="1")
        env.update(extra)
        return env


@contextlib.contextmanager
def new_world(display: str) -> Iterator[World]:
    # Short: Unix socket paths (vchan, Wayland, hypercalls) are limited to 107 bytes.
    top = Path(tempfile.mkdtemp(prefix="qsag", dir="/tmp"))
    world = World(top, display)
    for path in (world.runtime, world.sim, world.vchan):
        path.mkdir(mode=0o700)
    try:
        yield world
    finally:
        shutil.rmtree(top, ignore_errors=True)


# -- processes ------------------------------------------------------------------------------


@dataclass(eq=False)
class Proc:
    """A process the test started, its stdout and stderr in one log file."""

    name: str
    process: subprocess.Popen[bytes]
    log: Path

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    @property
    def running(self) -> bool:
        return self.process.poll() is None

    def send(self, sig: int) -> None:
        if self.running:
            self.process.send_signal(sig)

    def wait_exit(self, timeout: float = DEADLINE) -> int:
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            raise WaitTimeout(f"{self.name} did not exit within {timeout:g} s: "
                              f"{self.output()[-3000:]}") from None

    def stop(self, sig: int = signal.SIGTERM, timeout: float = DEADLINE) -> int:
        """End it (``sig``, then SIGKILL if it lingers); its exit status."""
        if self.running:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode


def spawn(world: World, name: str, argv: Sequence[str], env: dict[str, str]) -> Proc:
    log = world.top / f"{name}.{time.monotonic_ns()}.log"
    with open(log, "wb") as out:
        process = subprocess.Popen(list(argv), env=env, cwd=REPO, stdin=subprocess.DEVNULL,
                                   stdout=out, stderr=subprocess.STDOUT)
    return Proc(name, process, log)


@dataclass(eq=False)
class Agent:
    """``qubesshm agent`` running for ``world`` on Wayland socket ``socket``."""

    proc: Proc
    world: World
    socket: str

    def output(self) -> str:
        return self.proc.output()

    @property
    def running(self) -> bool:
        return self.proc.running

    def stop(self, sig: int = signal.SIGTERM) -> int:
        return self.proc.stop(sig)

    @property
    def socket_path(self) -> Path:
        return self.world.runtime / self.socket

    def stats(self) -> dict[str, Any]:
        """The counters now, from ``NAME.stats`` (what ``qubesshm stats --json`` prints)."""
        return read_stats(str(self.socket_path))

    def cli_stats(self) -> dict[str, Any]:
        """The same through ``qubesshm stats --socket NAME --json``."""
        result = subprocess.run([*QUBESSHM, "stats", "--socket", self.socket, "--json"],
                                env=self.world.env(), cwd=REPO, capture_output=True,
                                text=True, timeout=DEADLINE, check=False)
        assert result.returncode == 0, result.stderr
        data: dict[str, Any] = json.loads(result.stdout)
        return data

    def client_env(self, **extra: str) -> dict[str, str]:
        """The environment of a Wayland client of this agent."""
        env = self.world.env(WAYLAND_DISPLAY=self.socket, GDK_BACKEND="wayland", **extra)
        env.pop("DISPLAY", None)  # a client must not fall back to X
        return env

    def problems(self) -> str:
        """The agent's log if it shows a bug (a traceback, a message withheld from the
        daemon because the daemon would refuse it, a daemon it hung up on), else ""."""
        out = self.output()
        for bad in ("Traceback", "not sent to the GUI daemon", "broke the protocol",
                    "internal error"):
            if bad in out:
                return out[-4000:]
        return ""


def start_agent(world: World, *args: str, socket: str = "qsa") -> Agent:
    """``qubesshm agent`` for ``world``, once it says it is ready."""
    argv = [*QUBESSHM, "agent", "--socket", socket, "--vchan-dir", str(world.vchan),
            "--domid", str(AGENT_DOMID), *args]
    agent = Agent(spawn(world, "agent", argv, world.env()), world, socket)

    def ready() -> bool:
        if not agent.running:
            raise AssertionError(f"the agent exited with {agent.proc.process.returncode}: "
                                 f"{agent.output()[-3000:]}")
        return READY_LINE in agent.output()

    try:
        wait_until(ready, "the agent's ready line")
    except BaseException:
        agent.stop(signal.SIGKILL)
        raise
    return agent


def start_emulator(world: World, *args: str) -> Proc:
    """``qubesshm guid-emulator`` for the agent of ``world`` on its display."""
    argv = [*QUBESSHM, "guid-emulator", "--domid", str(AGENT_DOMID), "--display",
            world.display, *args]
    return spawn(world, "emulator", argv, world.env())


def start_client(agent: Agent, argv: Sequence[str], **env: str) -> Proc:
    """A Wayland client of ``agent``."""
    return spawn(agent.world, Path(argv[0]).name, argv, agent.client_env(**env))


def example(name: str, *args: str) -> list[str]:
    return [sys.executable, str(EXAMPLES / f"{name}.py"), *args]


def daemon_connected(agent: Agent, connections: int = 1) -> bool:
    try:
        daemon = agent.stats()["daemon"]
    except StatsError:
        return False
    return bool(daemon["connected"]) and daemon["connections"] >= connections


# -- the X screen ---------------------------------------------------------------------------


@dataclass(frozen=True)
class XWindow:
    """A top-level X window of the emulator's, showing one GUI window."""

    gui_id: int
    xid: int


class Screen:
    """An X connection of the test's own to read what the emulator shows."""

    def __init__(self, display: str) -> None:
        self.conn: Any = xcffib.connect(display=display)

    def close(self) -> None:
        with contextlib.suppress(xcffib.XcffibException):
            self.conn.disconnect()

    def windows(self) -> list[XWindow]:
        """The emulator's windows that are mapped (the agent's barrier window, created
        and never mapped, is not one)."""
        try:
            found = emulator_windows(self.conn)
        except xcffib.XcffibException:
            return []  # one went away as it was listed
        return [XWindow(gui, xid) for gui, xid in sorted(found.items())
                if self.viewable(xid)]

    def prop(self, xid: int, name: str) -> bytes | None:
        try:
            return text_property(self.conn, xid, name)
        except xcffib.XcffibException:
            return None

    def find(self, *, name: bytes | None = None,
             wm_class: bytes | None = None) -> XWindow | None:
        """The emulator's window whose WM_NAME is ``name`` and/or whose WM_CLASS
        contains ``wm_class`` (both strings), if exactly one is mapped; None if none.
        """
        hits = []
        for window in self.windows():
            if name is not None and self.prop(window.xid, "WM_NAME") != name:
                continue
            if wm_class is not None:
                value = self.prop(window.xid, "WM_CLASS") or b""
                if wm_class not in value.split(b"\0"):
                    continue
            hits.append(window)
        assert len(hits) <= 1, f"{len(hits)} windows named {name!r} / class {wm_class!r}"
        return hits[0] if hits else None

    def viewable(self, xid: int) -> bool:
        try:
            state = self.conn.core.GetWindowAttributes(xid).reply().map_state
        except xcffib.XcffibException:
            return False
        return bool(state == xp.MapState.Viewable)

    def geometry(self, xid: int) -> tuple[int, int, int, int]:
        """x, y (on the root: nothing reparents here), width, height."""
        reply = self.conn.core.GetGeometry(xid).reply()
        return int(reply.x), int(reply.y), int(reply.width), int(reply.height)

    def override_redirect(self, xid: int) -> bool:
        return bool(self.conn.core.GetWindowAttributes(xid).reply().override_redirect)

    def image(self, xid: int, width: int, height: int) -> NDArray[np.uint32]:
        """The window's pixels (0x00RRGGBB: the X byte of each 32-bit pixel cleared)."""
        reply = self.conn.core.GetImage(xp.ImageFormat.ZPixmap, xid, 0, 0, width, height,
                                        0xFFFFFFFF).reply()
        data = np.frombuffer(bytes(reply.data.buf()), dtype="<u4").reshape(height, width)
        out: NDArray[np.uint32] = (data & 0xFFFFFF).astype(np.uint32)
        return out

    def shows(self, *, name: bytes, want: NDArray[np.uint32],
              inset: int = 0) -> tuple[XWindow, NDArray[np.uint32]] | None:
        """The window named ``name`` if it has ``want``'s size and shows ``want``
        exactly (``inset``: only inside a frame that wide); else None."""
        window = self.find(name=name)
        if window is None:
            return None
        height, width = want.shape
        try:
            if self.geometry(window.xid)[2:] != (width, height):
                return None
            got = self.image(window.xid, width, height)
        except xcffib.XcffibException:
            return None
        cut = (slice(inset, height - inset), slice(inset, width - inset))
        if not np.array_equal(got[cut], want[cut] & 0xFFFFFF):
            return None
        return window, got


def words(pixels: bytes, width: int, height: int) -> NDArray[np.uint32]:
    """B, G, R, A (or X) bytes, stride 4 * width, as 0x00RRGGBB words."""
    data = np.frombuffer(pixels, dtype="<u4").reshape(height, width)
    out: NDArray[np.uint32] = (data & 0xFFFFFF).astype(np.uint32)
    return out


def mismatch(got: NDArray[np.uint32], want: NDArray[np.uint32]) -> str:
    """How two images differ, for assertion messages."""
    if got.shape != want.shape:
        return f"size {got.shape[::-1]} != {want.shape[::-1]}"
    bad = np.argwhere((got & 0xFFFFFF) != (want & 0xFFFFFF))
    if not len(bad):
        return "identical"
    y, x = (int(v) for v in bad[0])
    return (f"{len(bad)} pixels differ; first at ({x}, {y}): got {int(got[y, x]):06x}, "
            f"want {int(want[y, x]) & 0xFFFFFF:06x}")


def struct_windows(data: bytes) -> tuple[int, ...]:
    """A 32-bit property's values (WM_TRANSIENT_FOR, say)."""
    return struct.unpack(f"={len(data) // 4}I", data)
