"""The emulator end to end: a private Xvfb, a simulated kernel, a tiny agent written here.

The agent side lives in the test process: a socket vchan server (``qubesshm.vchan``),
the GUI protocol codec, and a ``SimHypervisor`` whose domain shares the window images
and serves hypercalls, so that the emulator (a separate process, as dom0 is) maps them
as the GUI domain. What the X server shows is read back with xcffib ``GetImage``.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import xcffib
import xcffib.xproto as xp
from kernels import Clock

from qubesshm.grants.api import PAGE_SIZE, SharedArea, Unshared
from qubesshm.grants.hypercalls import HypercallServer, serve_hypercalls
from qubesshm.grants.simkernels import KernelDir
from qubesshm.grants.simulated import SimBackend, SimHypervisor
from qubesshm.guiproto import codec
from qubesshm.guiproto import messages as gm
from qubesshm.guiproto.handshake import AgentHandshake, IncompatibleDaemon
from qubesshm.vchan.address import socket_path
from qubesshm.vchan.socketvchan import SocketListener, SocketStream, serve_socket

REPO = Path(__file__).resolve().parent.parent
AGENT = 5  # the agent's domain id
GUI = 0  # the emulator's
DEADLINE = 30.0
WIDTH, HEIGHT = 1280, 1024

pytestmark = pytest.mark.skipif(shutil.which("Xvfb") is None, reason="needs Xvfb")


# -- a private X server ---------------------------------------------------------------------


@dataclass
class Xvfb:
    display: str
    process: subprocess.Popen[bytes]

    def connect(self) -> Any:
        return xcffib.connect(display=self.display)


@pytest.fixture(scope="module")
def xvfb() -> Iterator[Xvfb]:
    with private_xvfb() as server:
        yield server


@contextlib.contextmanager
def private_xvfb(*extra: str) -> Iterator[Xvfb]:
    """Xvfb on a free display number (it picks one and says which: -displayfd)."""
    read, write = os.pipe()
    process = subprocess.Popen(
        ["Xvfb", "-displayfd", str(write), "-screen", "0", f"{WIDTH}x{HEIGHT}x24",
         "-nolisten", "tcp", *extra], pass_fds=(write,), stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    os.close(write)
    number = b""
    with os.fdopen(read, "rb") as pipe:
        while not number.endswith(b"\n"):
            chunk = pipe.read(1)
            if not chunk:
                process.kill()
                pytest.fail("Xvfb exited before it named its display")
            number += chunk
    try:
        yield Xvfb(f":{int(number)}", process)
    finally:
        process.terminate()
        process.wait(timeout=20)


@pytest.fixture(autouse=True)
def clean_screen(xvfb: Xvfb) -> Iterator[None]:
    """Each test starts on a screen with no emulator's window left (an emulator that exited
    has its windows destroyed as the X server notices its connection close)."""
    conn = xvfb.connect()
    try:
        deadline = time.monotonic() + DEADLINE
        while emulator_windows(conn):
            if time.monotonic() > deadline:
                pytest.fail("an earlier emulator's windows stay on the screen")
            time.sleep(0.02)
    finally:
        conn.disconnect()
    yield


# -- the agent's world: a simulated kernel serving hypercalls, a vchan listener ----------------



@dataclass
class World:
    top: Path
    base: Path
    kernel: KernelDir
    hv: SimHypervisor
    vm: SimBackend
    clock: Clock
    vchan_dir: Path
    server: HypercallServer | None = None

    @property
    def clipboard(self) -> Path:
        return self.top / "clip"

    def env(self, display: str | None) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items()
               if k not in ("VCHAN_DOMAIN", "DISPLAY", "QUBESSHM_SIM_ROOT")}
        env.update(VCHAN_SOCKET_DIR=str(self.vchan_dir), QUBESSHM_SIM_ROOT=str(self.base),
                   PYTHONPATH=str(REPO))
        if display is not None:
            env["DISPLAY"] = display
        return env

    def tick(self) -> int:
        """One second of the simulated kernel's deferred timer."""
        self.clock.now += 1.0
        self.hv.advance()
        return self.hv.counters.deferred_count


@pytest.fixture
def world() -> Iterator[World]:
    with new_world() as found:
        yield found


@contextlib.contextmanager
def new_world() -> Iterator[World]:
    """A simulated kernel hosting the agent's domain, and a vchan directory."""
    top = Path(tempfile.mkdtemp(prefix="emu", dir="/tmp"))  # short: socket paths
    base = top / "sim"
    kernel = KernelDir.create(base)
    clock = Clock()
    hv = SimHypervisor(kernel.root, clock=clock)
    vm = SimBackend(hv, AGENT)
    vchan_dir = top / "vchan"
    vchan_dir.mkdir(mode=0o700)
    found = World(top, base, kernel, hv, vm, clock, vchan_dir)
    try:
        yield found
    finally:
        if found.server is not None:
            found.server.close()
        vm.close()
        kernel.close()
        shutil.rmtree(top, ignore_errors=True)


CLIPBOARD_LINE = "qubesshm guid-emulator: clipboard: "  # the line it says at start


@dataclass
class Emulator:
    process: subprocess.Popen[bytes]
    log: Path

    def output(self) -> str:
        """What it said, but the line naming its clipboard file."""
        return "".join(line for line in self.everything().splitlines(keepends=True)
                       if not line.startswith(CLIPBOARD_LINE))

    def everything(self) -> str:
        return self.log.read_text(errors="replace")

    async def exited(self) -> int:
        deadline = time.monotonic() + DEADLINE
        while self.process.poll() is None:
            if time.monotonic() > deadline:
                self.process.kill()
                pytest.fail(f"the emulator did not exit: {self.output()}")
            await asyncio.sleep(0.02)
        return self.process.returncode

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def start_emulator(world: World, display: str | None, *args: str) -> Emulator:
    """The emulator for ``world``'s agent, its clipboard in ``world.clipboard`` unless
    ``args`` say otherwise."""
    if "--clipboard-dir" not in args:
        args = (*args, "--clipboard-dir", str(world.clipboard))
    log = world.top / f"emulator.{time.monotonic_ns()}.log"
    with open(log, "wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "qubesshm.emulator.main", "--domid", str(AGENT), *args]
            + ([] if display is None else ["--display", display]),
            env=world.env(None), cwd=REPO, stdin=subprocess.DEVNULL, stdout=out,
            stderr=subprocess.STDOUT)
    return Emulator(process, log)


@dataclass
class Agent:
    """A minimal GUI agent: the vchan server end, the codec, pages from the world's VM."""

    world: World
    listener: SocketListener
    stream: SocketStream | None = None
    version: int = 0
    xconf: gm.Xconf | None = None
    decoder: codec.AgentDecoder | None = None
    received: list[gm.Message] = field(default_factory=list)
    areas: list[SharedArea] = field(default_factory=list)

    async def accept(self, offer: int = gm.VERSION) -> None:
        self.stream = await asyncio.wait_for(self.listener.accept(), DEADLINE)
        handshake = AgentHandshake(offer)
        self.stream.write(handshake.greeting())
        result = None
        while result is None:
            data = await asyncio.wait_for(self.stream.read(), DEADLINE)
            assert data, "the emulator hung up during the handshake"
            result = handshake.feed(data)
        self.version, self.xconf = result.version, result.xconf
        self.decoder = codec.AgentDecoder(result.version)
        self.received += self.decoder.feed(result.leftover)

    async def send(self, window: int, body: gm.Body) -> None:
        assert self.stream is not None
        self.stream.write(codec.encode(window, body))
        await self.stream.drain()

    async def expect(self, mtype: gm.MsgType, window: int) -> gm.Message:
        """The next message the daemon sends must be this one."""
        message = await self.next()
        assert (message.type, message.window) == (mtype, window), message
        return message

    async def next(self) -> gm.Message:
        assert self.stream is not None and self.decoder is not None
        while not self.received:
            data = await asyncio.wait_for(self.stream.read(), DEADLINE)
            assert data, "the emulator hung up"
            self.received += self.decoder.feed(data)
        return self.received.pop(0)

    def share(self, width: int, height: int, pixel: Callable[[int, int], int]) -> SharedArea:
        """A window image in fresh grant pages: XRGB8888, stride 4 * width, from page 0."""
        pages = (width * height * 4 + PAGE_SIZE - 1) // PAGE_SIZE
        area = self.world.vm.share(GUI, pages, writable=False)
        paint(area, width, 0, 0, width, height, pixel)
        self.areas.append(area)
        return area

    async def dump(self, window: int, width: int, height: int, area: SharedArea) -> None:
        await self.send(window, gm.WindowDump(width, height, area.refs))


def paint(area: SharedArea, width: int, x0: int, y0: int, w: int, h: int,
          pixel: Callable[[int, int], int]) -> None:
    for y in range(y0, y0 + h):
        row = struct.pack(f"<{w}I", *(pixel(x, y) for x in range(x0, x0 + w)))
        start = (y * width + x0) * 4
        area.memory[start:start + len(row)] = row


def pattern(seed: int) -> Callable[[int, int], int]:
    # A distinct colour per pixel; the padding byte set, which the screen must not show.
    return lambda x, y: 0xA5000000 | ((x * 2654435761 + y * 40503 + seed * 977) & 0xFFFFFF)


async def serving(world: World, body: Callable[[Agent], Awaitable[None]]) -> None:
    """Run ``body`` with the hypercall server and the vchan listener on this loop."""
    world.server = serve_hypercalls(world.kernel, world.hv, [AGENT])
    world.server.start(asyncio.get_running_loop())
    listener = await serve_socket(socket_path(world.vchan_dir, AGENT, GUI, 6000))
    agent = Agent(world, listener)
    try:
        await body(agent)
    finally:
        if agent.stream is not None:
            agent.stream.close()
            await agent.stream.wait_closed()
        listener.close()
        world.server.close()
        world.server = None


# -- reading the screen ----------------------------------------------------------------------------


def emulator_windows(conn: Any) -> dict[int, int]:
    """Top-level X windows carrying the daemon's _QUBES_VMWINDOWID: GUI window -> X window."""
    root = conn.get_setup().roots[0].root
    atom = conn.core.InternAtom(False, len("_QUBES_VMWINDOWID"), "_QUBES_VMWINDOWID").reply().atom
    found = {}
    for child in conn.core.QueryTree(root).reply().children:
        try:
            prop = conn.core.GetProperty(False, child, atom, xp.Atom.Any, 0, 1).reply()
        except xp.WindowError:
            continue  # gone meanwhile
        if prop.format == 32 and prop.value_len == 1:
            (value,) = struct.unpack("=I", prop.value.buf())
            found[value] = int(child)
    return found


def find_window(conn: Any, window: int) -> int | None:
    """The X window showing GUI window ``window``."""
    return emulator_windows(conn).get(window)


def image(conn: Any, xid: int, width: int, height: int) -> list[int]:
    reply = conn.core.GetImage(xp.ImageFormat.ZPixmap, xid, 0, 0, width, height,
                               0xFFFFFFFF).reply()
    data = bytes(reply.data.buf())
    return [v & 0xFFFFFF for v in struct.unpack(f"<{width * height}I", data)]


def expected(width: int, height: int, pixel: Callable[[int, int], int]) -> list[int]:
    return [pixel(x, y) & 0xFFFFFF for y in range(height) for x in range(width)]


async def until(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + DEADLINE
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


async def shows(conn: Any, window: int, width: int, height: int, want: list[int],
                what: str) -> None:
    def matches() -> bool:
        try:
            xid = find_window(conn, window)
            return xid is not None and image(conn, xid, width, height) == want
        except xcffib.XcffibException:
            return False  # an earlier emulator's window, going away with its connection

    await until(matches, what)


def text_property(conn: Any, xid: int, name: str) -> bytes:
    atom = conn.core.InternAtom(False, len(name), name).reply().atom
    prop = conn.core.GetProperty(False, xid, atom, xp.Atom.Any, 0, 1024).reply()
    return bytes(prop.value.buf())


def grant_memfds(pid: int) -> set[int]:
    """Inodes of the simulated kernel's grant memfds that process ``pid`` maps."""
    found = set()
    with open(f"/proc/{pid}/maps") as maps:
        for line in maps:
            fields = line.split()
            if len(fields) >= 6 and fields[5].startswith("/memfd:qubesshm-grant"):
                found.add(int(fields[4]))
    return found


# -- the tests -------------------------------------------------------------------------------------


@pytest.mark.parametrize("shm", [True, False], ids=["mit-shm", "putimage"])
def test_windows_show_the_dumped_pixels_exactly(xvfb: Xvfb, world: World, shm: bool) -> None:
    conn = xvfb.connect()
    emulator = start_emulator(world, xvfb.display, *([] if shm else ["--no-shm"]))

    async def scenario(agent: Agent) -> None:
        await agent.accept()
        assert agent.version == gm.VERSION
        assert agent.xconf == gm.Xconf.for_screen(WIDTH, HEIGHT, 24)
        # a toplevel and a popup (override-redirect: a 2-pixel frame drawn inside)
        await agent.send(1, gm.Create(10, 20, 64, 48, 0, 0))
        await agent.send(1, gm.WmName(b"hello"))
        await agent.send(1, gm.WmClass(b"Foot", b"foot"))
        await agent.send(1, gm.Map(0, 0))
        await agent.send(2, gm.Create(200, 30, 33, 17, 0, 1))
        await agent.send(2, gm.Map(1, 1))
        one = agent.share(64, 48, pattern(1))
        two = agent.share(33, 17, pattern(2))
        await agent.dump(1, 64, 48, one)
        await agent.dump(2, 33, 17, two)
        await agent.send(1, gm.ShmImage(0, 0, 64, 48))
        await agent.send(2, gm.ShmImage(0, 0, 33, 17))
        await agent.expect(gm.MsgType.WINDOW_DUMP_ACK, 1)
        await agent.expect(gm.MsgType.WINDOW_DUMP_ACK, 2)
        await shows(conn, 1, 64, 48, expected(64, 48, pattern(1)), "the toplevel's pixels")
        red = 0xFF0000
        framed = [red if x < 2 or y < 2 or x >= 31 or y >= 15 else pattern(2)(x, y) & 0xFFFFFF
                  for y in range(17) for x in range(33)]
        await shows(conn, 2, 33, 17, framed, "the popup's pixels inside its frame")

        xid1, xid2 = find_window(conn, 1), find_window(conn, 2)
        assert xid1 is not None and xid2 is not None
        assert text_property(conn, xid1, "WM_NAME") == b"hello"
        assert text_property(conn, xid1, "_NET_WM_NAME") == b"hello"
        assert text_property(conn, xid1, "WM_CLASS") == b"vm5:foot\0vm5:Foot\0"
        geometry = conn.core.GetGeometry(xid1).reply()
        assert (geometry.x, geometry.y, geometry.width, geometry.height) == (10, 20, 64, 48)
        assert conn.core.GetWindowAttributes(xid2).reply().override_redirect == 1
        assert conn.core.GetWindowAttributes(xid1).reply().override_redirect == 0
        transient = text_property(conn, xid2, "WM_TRANSIENT_FOR")
        assert struct.unpack("=I", transient) == (xid1,)

        # A partial update: only the rectangle of the SHMIMAGE is put again.
        paint(one, 64, 0, 0, 64, 48, pattern(3))
        await agent.send(1, gm.ShmImage(8, 4, 20, 10))
        partly = [pattern(3 if 8 <= x < 28 and 4 <= y < 14 else 1)(x, y) & 0xFFFFFF
                  for y in range(48) for x in range(64)]
        await shows(conn, 1, 64, 48, partly, "the updated rectangle only")

        # Covered and uncovered: the X server asks for the pixels again (Expose).
        cover = conn.generate_id()
        root = conn.get_setup().roots[0]
        conn.core.CreateWindow(24, cover, root.root, 0, 0, 400, 200, 0,
                               xp.WindowClass.InputOutput, root.root_visual,
                               xp.CW.BackPixel | xp.CW.OverrideRedirect, [0x123456, 1])
        conn.core.MapWindow(cover)
        conn.core.GetInputFocus().reply()
        conn.core.DestroyWindow(cover)
        conn.flush()
        await shows(conn, 1, 64, 48, expected(64, 48, pattern(3)), "the exposed pixels")

        # Moved and resized by the agent.
        await agent.send(1, gm.Configure(300, 400, 64, 48, 0))
        await until(lambda: (conn.core.GetGeometry(xid1).reply().x,
                             conn.core.GetGeometry(xid1).reply().y) == (300, 400), "the move")
        await agent.send(1, gm.Destroy())
        await agent.expect(gm.MsgType.DESTROY, 1)
        await until(lambda: find_window(conn, 1) is None, "the window's destruction")

    try:
        asyncio.run(serving(world, scenario))
        assert asyncio.run(emulator.exited()) == 0, emulator.output()
    finally:
        emulator.stop()
        conn.disconnect()


def test_acks_come_in_dump_order_and_destroys_are_echoed(xvfb: Xvfb, world: World) -> None:
    emulator = start_emulator(world, xvfb.display)

    async def scenario(agent: Agent) -> None:
        await agent.accept()
        for window in (1, 2, 3):
            await agent.send(window, gm.Create(window * 100, 10, 40, 30, 0, 0))
            await agent.send(window, gm.Map(0, 0))
        order = [2, 1, 3, 3, 2, 1, 1]
        for window in order:
            await agent.dump(window, 40, 30, agent.share(40, 30, pattern(window)))
        await agent.send(2, gm.Destroy())
        for window in order:
            await agent.expect(gm.MsgType.WINDOW_DUMP_ACK, window)
        await agent.expect(gm.MsgType.DESTROY, 2)

    try:
        asyncio.run(serving(world, scenario))
        assert asyncio.run(emulator.exited()) == 0, emulator.output()
    finally:
        emulator.stop()


@pytest.mark.parametrize("hold", [0, 3])
def test_the_hypervisor_sees_the_emulators_mappings(xvfb: Xvfb, world: World,
                                                     hold: int) -> None:
    """Ending a grant the emulator maps defers; once a later dump's ACK is in, the let-go
    one is unmapped (or, with --hold, that many seconds later)."""
    emulator = start_emulator(world, xvfb.display, "--hold", str(hold))

    async def scenario(agent: Agent) -> None:
        await agent.accept()
        await agent.send(1, gm.Create(10, 10, 100, 80, 0, 0))
        await agent.send(1, gm.Map(0, 0))
        first = agent.share(100, 80, pattern(1))
        await agent.dump(1, 100, 80, first)
        await agent.expect(gm.MsgType.WINDOW_DUMP_ACK, 1)
        # Both the emulator (its own mapping) and the X server (MIT-SHM, watched) map it.
        assert {emulator.process.pid, xvfb.process.pid} <= world.hv.watched
        assert len(grant_memfds(xvfb.process.pid)) == 1
        assert world.vm.unshare(first) == Unshared.DEFERRED
        pages = len(first.refs)
        assert world.tick() == pages

        second = agent.share(100, 80, pattern(2))
        await agent.dump(1, 100, 80, second)
        await agent.expect(gm.MsgType.WINDOW_DUMP_ACK, 1)
        # The X server has carried out its detach before the ACK.
        assert len(grant_memfds(xvfb.process.pid)) == 1
        # The ACK came once the let-go dump was unmapped (after its hold, if any): the
        # first timer tick after it ends the grant.
        assert world.tick() == 0
        assert world.vm.unshare(second) == Unshared.DEFERRED  # still current
        await agent.send(1, gm.Unmap())
        await agent.send(1, gm.Destroy())
        await agent.expect(gm.MsgType.DESTROY, 1)
        await until(lambda: world.tick() == 0, "the last dump's let-go")
        assert grant_memfds(xvfb.process.pid) == set()

    try:
        asyncio.run(serving(world, scenario))
        assert asyncio.run(emulator.exited()) == 0, emulator.output()
        assert world.hv.counters.deferred_count == 0
    finally:
        emulator.stop()


def test_when_the_agent_goes_the_emulator_exits_0_and_lets_go(xvfb: Xvfb, world: World) -> None:
    emulator = start_emulator(world, xvfb.display, "--hold", "600")

    async def scenario(agent: Agent) -> None:
        await agent.accept()
        await agent.send(1, gm.Create(10, 10, 16, 16, 0, 0))
        area = agent.share(16, 16, pattern(1))
        await agent.dump(1, 16, 16, area)
        await agent.expect(gm.MsgType.WINDOW_DUMP_ACK, 1)
        # Let go by the next dump, held for 600 s (whose ACK waits as long).
        await agent.dump(1, 16, 16, agent.share(16, 16, pattern(2)))
        assert world.vm.unshare(area) == Unshared.DEFERRED  # mapped: current, then held
        assert agent.stream is not None
        agent.stream.close()
        assert await emulator.exited() == 0
        await until(lambda: world.tick() == 0, "the held dump's release")

    try:
        asyncio.run(serving(world, scenario))
        assert emulator.output() == ""
    finally:
        emulator.stop()


@pytest.mark.parametrize(("body", "line"), [
    (lambda agent: agent.send(0x63, gm.Map(0, 0)), "msg 0x84 without CREATE for 0x63"),
    (lambda agent: agent.send(1, gm.Configure(0, 0, 0, 5)),
     "Verify failed: width > 0 && height > 0"),
])
def test_a_message_qubes_guid_refuses_ends_the_emulator_with_its_line(
        xvfb: Xvfb, world: World, body: Callable[[Agent], Awaitable[None]], line: str) -> None:
    emulator = start_emulator(world, xvfb.display)

    async def scenario(agent: Agent) -> None:
        await agent.accept()
        await agent.send(1, gm.Create(10, 10, 16, 16, 0, 0))
        await body(agent)
        assert await emulator.exited() == 1

    try:
        asyncio.run(serving(world, scenario))
        lines = emulator.output().splitlines()
        assert lines == [f"qubesshm guid-emulator: {line}"]
    finally:
        emulator.stop()


def test_refs_the_gui_domain_may_not_map_end_the_emulator(xvfb: Xvfb, world: World) -> None:
    emulator = start_emulator(world, xvfb.display)

    async def scenario(agent: Agent) -> None:
        await agent.accept()
        await agent.send(1, gm.Create(10, 10, 16, 16, 0, 0))
        elsewhere = world.vm.share(7, 1, writable=False)  # granted to domain 7, not 0
        await agent.send(1, gm.WindowDump(16, 16, elsewhere.refs))
        assert await emulator.exited() == 1
        world.vm.unshare(elsewhere)

    try:
        asyncio.run(serving(world, scenario))
        out = emulator.output()
        assert "ioctl(IOCTL_GNTDEV_MAP_GRANT_REF)" in out and "not 0" in out, out
        assert len(out.splitlines()) == 1
    finally:
        emulator.stop()


@pytest.mark.parametrize("minor", [3, 4])
def test_old_daemon_versions(xvfb: Xvfb, world: World, minor: int) -> None:
    """1.4: no echo, no ACK (the agent's strict decoder would refuse them); 1.3: no version
    in the answer, which an agent must refuse."""
    conn = xvfb.connect()
    emulator = start_emulator(world, xvfb.display, "--version", f"1.{minor}")

    async def scenario(agent: Agent) -> None:
        if minor == 3:
            with pytest.raises(IncompatibleDaemon, match=r"needs at least 1\.4"):
                await agent.accept()
            assert agent.stream is not None
            agent.stream.close()
            return
        await agent.accept()
        assert agent.version == gm.make_version(1, 4)
        await agent.send(1, gm.Create(10, 10, 16, 16, 0, 0))
        await agent.send(1, gm.Map(0, 0))
        await agent.dump(1, 16, 16, agent.share(16, 16, pattern(1)))
        await agent.send(1, gm.ShmImage(0, 0, 16, 16))
        await shows(conn, 1, 16, 16, expected(16, 16, pattern(1)), "the window")
        await agent.send(1, gm.Destroy())
        await agent.send(2, gm.Create(10, 10, 16, 16, 0, 0))
        await until(lambda: find_window(conn, 1) is None and find_window(conn, 2) is not None,
                    "the window's destruction")
        assert agent.stream is not None and agent.decoder is not None
        with contextlib.suppress(asyncio.TimeoutError):
            # Nothing at all comes back: an ACK or an echo would fail the decoder.
            data = await asyncio.wait_for(agent.stream.read(), 0.2)
            assert agent.decoder.feed(data) == []

    try:
        asyncio.run(serving(world, scenario))
        assert asyncio.run(emulator.exited()) == 0, emulator.output()
    finally:
        emulator.stop()
        conn.disconnect()


def test_start_up_errors_are_one_line(xvfb: Xvfb, world: World) -> None:
    # No display at all.
    emulator = start_emulator(world, None)
    assert asyncio.run(emulator.exited()) == 1
    assert emulator.output().startswith("qubesshm guid-emulator: no X display")
    assert len(emulator.output().splitlines()) == 1
    # A display nobody serves.
    emulator = start_emulator(world, ":4093")
    assert asyncio.run(emulator.exited()) == 1
    assert "cannot open X display ':4093'" in emulator.output()
    assert len(emulator.output().splitlines()) == 1

    # An agent listening, but no simulated kernel hosts its domain.
    async def lonely() -> None:
        listener = await serve_socket(socket_path(world.vchan_dir, AGENT, GUI, 6000))
        emulator = start_emulator(world, xvfb.display)
        try:
            stream = await asyncio.wait_for(listener.accept(), DEADLINE)
            assert await emulator.exited() == 1
            stream.close()
        finally:
            listener.close()
            emulator.stop()
        out = emulator.output()
        assert "no running simulated kernel" in out and f"hosts domain {AGENT}" in out, out
        assert len(out.splitlines()) == 1

    asyncio.run(lonely())


def test_usage_errors_exit_2() -> None:
    result = subprocess.run([sys.executable, "-m", "qubesshm.emulator.main", "--domid", "5",
                             "--version", "1.9"], capture_output=True, text=True, cwd=REPO,
                            timeout=60, check=False)
    assert result.returncode == 2
    assert "'1.9' is not a protocol version the emulator speaks" in result.stderr


def test_sigterm_ends_the_emulator_with_status_0(xvfb: Xvfb, world: World) -> None:
    """As qubes-guid on SIGTERM: while it waits for the agent, and while it runs."""
    emulator = start_emulator(world, xvfb.display, "-v")

    async def wait_then_stop() -> None:
        await until(lambda: "waiting for the agent" in emulator.output(), "the emulator to wait")
        emulator.process.send_signal(signal.SIGTERM)
        assert await emulator.exited() == 0

    try:
        asyncio.run(wait_then_stop())
    finally:
        emulator.stop()

    emulator = start_emulator(world, xvfb.display)

    async def scenario(agent: Agent) -> None:
        await agent.accept()
        await agent.send(1, gm.Create(10, 10, 16, 16, 0, 0))
        area = agent.share(16, 16, pattern(1))
        await agent.dump(1, 16, 16, area)
        await agent.expect(gm.MsgType.WINDOW_DUMP_ACK, 1)
        assert world.vm.unshare(area) == Unshared.DEFERRED
        emulator.process.send_signal(signal.SIGTERM)
        assert await emulator.exited() == 0
        await until(lambda: world.tick() == 0, "the dump's release")

    try:
        asyncio.run(serving(world, scenario))
        assert emulator.output() == ""
    finally:
        emulator.stop()


def test_losing_the_x_server_ends_the_emulator_with_a_line(world: World) -> None:
    with private_xvfb() as own:
        emulator = start_emulator(world, own.display)

        async def scenario(agent: Agent) -> None:
            await agent.accept()
            await agent.send(1, gm.Create(10, 10, 16, 16, 0, 0))
            await agent.send(1, gm.Map(0, 0))
            await agent.dump(1, 16, 16, agent.share(16, 16, pattern(1)))
            await agent.expect(gm.MsgType.WINDOW_DUMP_ACK, 1)
            own.process.kill()
            assert await emulator.exited() == 1

        try:
            asyncio.run(serving(world, scenario))
            out = emulator.output()
            assert out == f"qubesshm guid-emulator: lost the connection to X display " \
                          f"{own.display!r}\n", out
        finally:
            emulator.stop()


def test_an_x_server_without_mit_shm_gets_the_pixels_by_putimage(world: World) -> None:
    with private_xvfb("-extension", "MIT-SHM") as own:
        conn = own.connect()
        emulator = start_emulator(world, own.display)

        async def scenario(agent: Agent) -> None:
            await agent.accept()
            await agent.send(1, gm.Create(10, 10, 300, 200, 0, 0))
            await agent.send(1, gm.Map(0, 0))
            await agent.dump(1, 300, 200, agent.share(300, 200, pattern(4)))
            await agent.send(1, gm.ShmImage(0, 0, 300, 200))
            await agent.expect(gm.MsgType.WINDOW_DUMP_ACK, 1)
            await shows(conn, 1, 300, 200, expected(300, 200, pattern(4)), "the pixels")
            # Only the emulator maps the dump (the X server got a copy).
            assert grant_memfds(own.process.pid) == set()
            assert len(grant_memfds(emulator.process.pid)) == 1

        try:
            asyncio.run(serving(world, scenario))
            assert asyncio.run(emulator.exited()) == 0, emulator.output()
        finally:
            emulator.stop()
            conn.disconnect()
