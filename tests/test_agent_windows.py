"""The agent's window state (qubesshm/agent/windows.py): every message it sends passes the
real daemon's checks (guiproto.checks), in the order the daemon needs, and an area is
released only by the ACK of a dump sent after it was let go."""

from __future__ import annotations

import mmap

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from qubesshm.agent.windows import AgentWindows
from qubesshm.compositor.scene import BufferView, SceneNode, SurfaceState
from qubesshm.compositor.shell import ShellWindow, WindowKind
from qubesshm.grants.api import PAGE_SIZE
from qubesshm.guiproto import messages as gm
from qubesshm.guiproto.checks import DaemonChecks, daemon_replies
from qubesshm.pixels.formats import XRGB8888
from qubesshm.pixels.region import NO_VIEWPORT, Rect, Region


class FakeArea:
    def __init__(self, serial: int, pages: int) -> None:
        self.serial = serial
        self.memory = mmap.mmap(-1, pages * PAGE_SIZE)
        self.refs = tuple(range(serial * 100000, serial * 100000 + pages))


class FakeAreas:
    def __init__(self) -> None:
        self.serial = 0
        self.current: set[FakeArea] = set()
        self.let_go_: list[FakeArea] = []
        self.released_: list[FakeArea] = []
        self.late = 0

    def take(self, owner: int, size: int) -> FakeArea:
        self.serial += 1
        area = FakeArea(self.serial, -(-size // PAGE_SIZE))
        self.current.add(area)
        return area

    def let_go(self, area: FakeArea, *, recycle: bool = False) -> None:
        assert recycle
        self.current.discard(area)
        self.let_go_.append(area)

    def note_ack(self, waited: float | None) -> None:
        pass

    def confirm_released(self, area: FakeArea) -> None:
        assert area in self.let_go_ and area not in self.released_
        self.released_.append(area)

    def all_late(self) -> int:
        self.late += 1
        return 0


def tree(width: int, height: int, value: int = 0xFF336699, serial: int = 1) -> SceneNode:
    pixels = np.full((height, width), value, dtype=np.uint32)
    view = BufferView(width, height, width * 4, XRGB8888, lambda: pixels)
    state = SurfaceState(serial, view, 0, 1, NO_VIEWPORT, Region.full(width, height),
                         Region(), width, height)
    return SceneNode(state, 0, 0)


def window(kind: WindowKind = WindowKind.TOPLEVEL) -> ShellWindow:
    w = ShellWindow(kind, 1, None, lambda: True)
    w.title = "A title"
    w.app_id = "org.example.App"
    return w


class Daemon:
    """The real daemon's checks and replies, applied to what the agent sends."""

    def __init__(self, version: int = gm.VERSION) -> None:
        self.version = version
        self.checks = DaemonChecks(version)
        self.sent: list[gm.Message] = []
        self.replies: list[gm.Message] = []

    def take(self, agent: AgentWindows[FakeArea]) -> list[gm.Message]:
        out = [gm.Message.of(wid, body) for wid, body in agent.flush()]
        for msg in out:
            self.checks.check(msg)
            self.replies.extend(daemon_replies(self.version, msg))
        self.sent.extend(out)
        return out

    def answer(self, agent: AgentWindows[FakeArea], count: int | None = None) -> None:
        n = len(self.replies) if count is None else count
        for msg in self.replies[:n]:
            agent.on_message(msg)
        del self.replies[:n]


def connected(version: int = gm.VERSION) -> tuple[AgentWindows[FakeArea], FakeAreas, Daemon]:
    areas = FakeAreas()
    agent = AgentWindows(areas, clock=lambda: 0.0)
    agent.connect(version, gm.Xconf.for_screen(1280, 1024))
    return agent, areas, Daemon(version)


def test_a_new_window_is_created_named_dumped_mapped_and_drawn_in_that_order() -> None:
    agent, areas, daemon = connected()
    w = window()
    agent.window_mapped(w)
    assert agent.window_committed(w, tree(200, 100), Rect(0, 0, 200, 100))
    kinds = [(m.type.name, m.window) for m in daemon.take(agent)]
    assert kinds == [("CREATE", 1), ("CREATE", 2), ("WMNAME", 2), ("WMCLASS", 2),
                     ("WINDOW_DUMP", 2), ("MAP", 2), ("SHMIMAGE", 2)]
    dump = daemon.sent[4].body
    assert isinstance(dump, gm.WindowDump)
    assert (dump.width, dump.height) == (200, 100)
    assert len(dump.refs) * PAGE_SIZE >= 200 * 100 * 4
    area = next(iter(areas.current))
    image = np.frombuffer(area.memory, dtype=np.uint32, count=200 * 100)
    assert (image & 0xFFFFFF == 0x336699).all()
    create = daemon.sent[1].body
    assert isinstance(create, gm.Create)
    assert 0 <= create.x <= 1280 - 200 and 0 <= create.y <= 1024 - 100


def test_a_resize_dumps_a_new_area_and_the_old_one_is_released_by_that_dumps_ack() -> None:
    agent, areas, daemon = connected()
    w = window()
    agent.window_mapped(w)
    agent.window_committed(w, tree(200, 100), Rect(0, 0, 200, 100))
    daemon.take(agent)
    daemon.answer(agent)
    first = next(iter(areas.current))
    agent.window_committed(w, tree(300, 100, serial=2), Rect(0, 0, 300, 100))
    sent = daemon.take(agent)
    assert [m.type.name for m in sent] == ["WINDOW_DUMP", "CONFIGURE", "SHMIMAGE"]
    assert areas.let_go_ == [first] and areas.released_ == []
    daemon.answer(agent)
    assert areas.released_ == [first]


def test_an_unmap_with_nothing_after_it_is_released_through_a_barrier_dump() -> None:
    agent, areas, daemon = connected()
    w = window()
    agent.window_mapped(w)
    agent.window_committed(w, tree(64, 64), Rect(0, 0, 64, 64))
    daemon.take(agent)
    daemon.answer(agent)
    agent.window_unmapped(w)
    sent = daemon.take(agent)
    assert [(m.type.name, m.window) for m in sent] == [
        ("UNMAP", 2), ("DESTROY", 2), ("WINDOW_DUMP", 1)]
    assert areas.released_ == []
    daemon.answer(agent)
    assert len(areas.released_) == 1


def test_only_damage_is_sent_between_resizes() -> None:
    agent, _areas, daemon = connected()
    w = window()
    agent.window_mapped(w)
    agent.window_committed(w, tree(100, 100), Rect(0, 0, 100, 100))
    daemon.take(agent)
    pixels = np.full((100, 100), 0xFF000000, dtype=np.uint32)
    view = BufferView(100, 100, 400, XRGB8888, lambda: pixels)
    state = SurfaceState(1, view, 0, 1, NO_VIEWPORT, Region([Rect(10, 20, 5, 6)]), Region(),
                         100, 100)
    agent.window_committed(w, SceneNode(state, 0, 0), Rect(0, 0, 100, 100))
    sent = daemon.take(agent)
    assert [(m.type.name, m.body) for m in sent] == [("SHMIMAGE", gm.ShmImage(10, 20, 5, 6))]


def test_a_daemon_without_acks_gets_no_barrier_and_a_new_daemon_gets_every_window() -> None:
    agent, _areas, daemon = connected(gm.make_version(1, 6))
    w = window()
    agent.window_mapped(w)
    agent.window_committed(w, tree(64, 64), Rect(0, 0, 64, 64))
    sent = daemon.take(agent)
    assert [m.window for m in sent if m.type == gm.MsgType.CREATE] == [2]
    agent.disconnect()
    agent.connect(gm.VERSION, gm.Xconf.for_screen(800, 600))
    again = Daemon()
    kinds = [m.type.name for m in again.take(agent)]
    assert kinds == ["CREATE", "CREATE", "WMNAME", "WMCLASS", "WINDOW_DUMP", "MAP", "SHMIMAGE"]


steps = st.lists(st.tuples(st.sampled_from(["map", "commit", "unmap", "ack"]),
                           st.integers(0, 2), st.integers(1, 40)), max_size=40)


@settings(max_examples=60, deadline=None)
@given(steps, st.sampled_from([gm.make_version(1, 5), gm.VERSION]))
def test_any_sequence_passes_the_daemons_checks_and_releases_only_after_its_ack(
        script: list[tuple[str, int, int]], version: int) -> None:
    agent, areas, daemon = connected(version)
    windows: dict[int, ShellWindow] = {}
    for op, n, size in script:
        if op == "map" and n not in windows:
            windows[n] = window()
            agent.window_mapped(windows[n])
        elif op == "commit" and n in windows:
            agent.window_committed(windows[n], tree(size, size + 1), Rect(0, 0, size, size + 1))
        elif op == "unmap" and n in windows:
            agent.window_unmapped(windows.pop(n))
        elif op == "ack":
            daemon.answer(agent, 1)
        daemon.take(agent)
        for area in areas.released_:
            assert area not in areas.current
    daemon.answer(agent)
    daemon.take(agent)
    daemon.answer(agent)
    if version >= gm.MIN_WINDOW_DUMP_ACK:
        assert sorted(a.serial for a in areas.released_) == sorted(
            a.serial for a in areas.let_go_)
    else:
        assert areas.released_ == []


def test_a_new_daemon_is_not_sent_a_window_that_has_no_image_yet() -> None:
    agent, _areas, daemon = connected()
    shown, waiting = window(), window()
    agent.window_mapped(shown)
    agent.window_committed(shown, tree(40, 30), Rect(0, 0, 40, 30))
    agent.window_mapped(waiting)  # mapped; its first image not drawn yet
    daemon.take(agent)
    agent.disconnect()
    agent.connect(gm.VERSION, gm.Xconf.for_screen(800, 600))
    again = Daemon()
    sent = again.take(agent)  # every message passes the daemon's checks
    assert [m.type.name for m in sent].count("CREATE") == 2  # the barrier and one window
    agent.window_committed(waiting, tree(20, 10), Rect(0, 0, 20, 10))
    later = again.take(agent)
    assert [m.type.name for m in later][:1] == ["CREATE"]
