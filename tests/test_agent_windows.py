"""The agent's window state (qubesshm/agent/windows.py): every message it sends passes the
real daemon's checks (guiproto.checks), in the order the daemon needs, and an area is
released only by the ACK of a dump sent after it was let go."""

from __future__ import annotations

import mmap
import struct
from collections.abc import Callable

import numpy as np
import pytest
from compositor_wire import App, CoreClient
from hypothesis import given, settings
from hypothesis import strategies as st

from qubesshm.agent.cursors import SHAPE_GLYPHS, cursor_message
from qubesshm.agent.windows import AgentWindows
from qubesshm.compositor.core import Compositor
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


# -- window management with the real compositor: dom0 <-> the client's toplevel ----------

class WmWorld:
    """The agent's windows as the shell of a real (sans-IO) compositor, a raw client of
    it, and the daemon's checks on everything sent."""

    def __init__(self, version: int = gm.VERSION) -> None:
        self.areas = FakeAreas()
        self.agent: AgentWindows[FakeArea] = AgentWindows(self.areas, clock=lambda: 0.0)
        self.comp = Compositor(self.agent, clock=lambda: 1000.0, screen=(1280, 1024))
        self.agent.wm = self.comp
        self.agent.connect(version, gm.Xconf.for_screen(1280, 1024))
        self.daemon = Daemon(version)
        self.daemon.take(self.agent)  # the barrier window
        self.app = App(CoreClient(self.comp))

    def toplevel(self, size: tuple[int, int] = (200, 100),
                 before: Callable[[int], None] | None = None) -> tuple[int, int, int, ShellWindow]:
        surface, xdg, top = self.app.toplevel("managed")
        if before is not None:
            before(top)
        self.app.show(surface, self.app.buffer(solid(*size)))
        self.app.c.roundtrip()
        w = next(w for w in self.comp.windows() if w.mapped and w.title == "managed")
        return surface, xdg, top, w

    def configures(self, top: int) -> list[tuple[int, int, tuple[int, ...]]]:
        """The xdg_toplevel.configure events the client got since last asked."""
        out = []
        for event in self.app.c.take("xdg_toplevel", "configure", top):
            width, height, states = event.args
            assert isinstance(width, int) and isinstance(height, int)
            assert isinstance(states, bytes)
            out.append((width, height, struct.unpack(f"={len(states) // 4}I", states)))
        return out

    def from_daemon(self, window: int, body: gm.Body) -> list[gm.Message]:
        self.agent.on_message(gm.Message.of(window, body))
        self.app.c.receive(0)
        return self.daemon.take(self.agent)


def solid(width: int, height: int) -> np.ndarray:
    return np.full((height, width), 0xFF204060, dtype=np.uint32)


def test_a_daemon_configure_is_echoed_then_configures_the_toplevel_whose_next_buffer_is_a_new_area(
        ) -> None:
    world = WmWorld()
    surface, xdg, top, _w = world.toplevel()
    world.daemon.take(world.agent)
    world.configures(top)
    # The user resized the window in dom0.
    sent = world.from_daemon(2, gm.Configure(50, 60, 300, 150))
    assert [m.body for m in sent] == [gm.Configure(50, 60, 300, 150, 0)]
    assert world.configures(top) == [(300, 150, ())]
    world.app.ack(xdg)
    world.app.show(surface, world.app.buffer(solid(300, 150)))
    world.app.c.roundtrip()
    sent = world.daemon.take(world.agent)
    assert [m.type.name for m in sent] == ["WINDOW_DUMP", "CONFIGURE", "SHMIMAGE"]
    dump, configure = sent[0].body, sent[1].body
    assert isinstance(dump, gm.WindowDump) and (dump.width, dump.height) == (300, 150)
    assert configure == gm.Configure(50, 60, 300, 150, 0)
    # A move alone is echoed and leaves the client's size alone.
    sent = world.from_daemon(2, gm.Configure(10, 20, 300, 150))
    assert [m.body for m in sent] == [gm.Configure(10, 20, 300, 150, 0)]
    assert world.configures(top) == []
    assert world.agent.window_origin(_w) == (10, 20)


def test_a_move_of_a_window_whose_client_chose_its_size_sends_it_no_configure() -> None:
    world = WmWorld()
    _surface, _xdg, top, _w = world.toplevel((120, 80))
    world.daemon.take(world.agent)
    world.configures(top)
    sent = world.from_daemon(2, gm.Configure(300, 200, 120, 80))
    assert [m.body for m in sent] == [gm.Configure(300, 200, 120, 80, 0)]
    assert world.configures(top) == []


def test_close_from_dom0_closes_the_toplevel_and_dismisses_a_popup() -> None:
    world = WmWorld()
    _surface, xdg, top, _w = world.toplevel()
    world.daemon.take(world.agent)
    world.from_daemon(2, gm.Close())
    assert world.app.c.take("xdg_toplevel", "close", top)
    positioner = world.app.c.create(world.app.wm_base, "create_positioner", "xdg_positioner")
    world.app.c.request(positioner, "set_size", 50, 40)
    world.app.c.request(positioner, "set_anchor_rect", 0, 0, 10, 10)
    popup_surface = world.app.surface()
    popup_xdg = world.app.c.create(world.app.wm_base, "get_xdg_surface", "xdg_surface",
                                   popup_surface)
    popup = world.app.c.create(popup_xdg, "get_popup", "xdg_popup", xdg, positioner)
    world.app.c.request(popup_surface, "commit")
    world.app.c.roundtrip()
    world.app.ack(popup_xdg)
    world.app.show(popup_surface, world.app.buffer(solid(50, 40)))
    world.app.c.roundtrip()
    created = [m for m in world.daemon.take(world.agent) if m.type == gm.MsgType.CREATE]
    assert len(created) == 1
    world.from_daemon(created[0].window, gm.Close())
    assert world.app.c.take("xdg_popup", "popup_done", popup)


def test_fullscreen_from_dom0_and_back_are_the_toplevels_states_with_the_daemons_size() -> None:
    world = WmWorld()
    _surface, _xdg, top, _w = world.toplevel()
    world.daemon.take(world.agent)
    world.configures(top)
    world.from_daemon(2, gm.Configure(0, 0, 1280, 1024))
    world.from_daemon(2, gm.WindowFlags(gm.WINDOW_FLAG_FULLSCREEN, 0))
    assert world.configures(top) == [(1280, 1024, ()), (1280, 1024, (2,))]
    world.from_daemon(2, gm.WindowFlags(0, gm.WINDOW_FLAG_FULLSCREEN))
    world.from_daemon(2, gm.Configure(40, 40, 200, 100))
    assert world.configures(top) == [(1280, 1024, ()), (200, 100, ())]
    # Minimized in dom0: suspended (from xdg_wm_base 6, where the protocols know it), and
    # back.
    world.from_daemon(2, gm.WindowFlags(gm.WINDOW_FLAG_MINIMIZE, 0))
    world.from_daemon(2, gm.WindowFlags(0, gm.WINDOW_FLAG_MINIMIZE))
    spec = world.comp.protocol.get("xdg_wm_base")
    assert spec is not None
    suspended = (9,) if spec.version >= 6 else ()
    assert world.configures(top) == [(200, 100, suspended), (200, 100, ())]
    assert world.daemon.sent[-1].body == gm.Configure(40, 40, 200, 100, 0)  # only echoes


def test_a_clients_fullscreen_and_minimize_go_to_the_daemon_and_maximize_is_declined() -> None:
    world = WmWorld()
    _surface, _xdg, top, _w = world.toplevel()
    world.daemon.take(world.agent)
    world.configures(top)
    world.app.c.request(top, "set_fullscreen", None)
    world.app.c.roundtrip()
    assert [m.body for m in world.daemon.take(world.agent)] == [
        gm.WindowFlags(gm.WINDOW_FLAG_FULLSCREEN, 0)]
    assert world.configures(top) == [(0, 0, ())]  # answered: the daemon decides
    world.app.c.request(top, "unset_fullscreen")
    world.app.c.request(top, "set_minimized")
    world.app.c.roundtrip()
    assert [m.body for m in world.daemon.take(world.agent)] == [
        gm.WindowFlags(0, gm.WINDOW_FLAG_FULLSCREEN), gm.WindowFlags(gm.WINDOW_FLAG_MINIMIZE, 0)]
    world.configures(top)
    world.app.c.request(top, "set_maximized")
    world.app.c.roundtrip()
    assert world.configures(top) == [(0, 0, ())]  # not maximized
    assert world.daemon.take(world.agent) == []


def test_a_fullscreen_asked_before_the_first_buffer_goes_to_the_daemon_before_map() -> None:
    world = WmWorld()

    def ask(top: int) -> None:
        world.app.c.request(top, "set_fullscreen", None)

    world.toplevel(before=ask)
    kinds = [(m.type.name, m.body) for m in world.daemon.take(world.agent)]
    names = [k for k, _ in kinds]
    assert names.index("WINDOW_FLAGS") < names.index("MAP")
    assert ("WINDOW_FLAGS", gm.WindowFlags(gm.WINDOW_FLAG_FULLSCREEN, 0)) in kinds


def test_wm_capabilities_offer_fullscreen_and_minimize_only() -> None:
    world = WmWorld()
    surface = world.app.surface()
    xdg = world.app.c.create(world.app.wm_base, "get_xdg_surface", "xdg_surface", surface)
    top = world.app.c.create(xdg, "get_toplevel", "xdg_toplevel")
    world.app.c.request(surface, "commit")
    world.app.c.roundtrip()
    (event,) = world.app.c.take("xdg_toplevel", "wm_capabilities", top)
    assert event.args == (struct.pack("=2I", 3, 4),)  # fullscreen, minimize


@pytest.mark.parametrize(("shape", "cursor"), [
    ("text", gm.CURSOR_X11 + 152), ("pointer", gm.CURSOR_X11 + 60),
    ("ew-resize", gm.CURSOR_X11 + 108), ("nw-resize", gm.CURSOR_X11 + 134),
    ("progress", gm.CURSOR_X11 + 150), ("zoom-in", gm.CURSOR_DEFAULT),
    ("default", gm.CURSOR_DEFAULT), (None, gm.CURSOR_DEFAULT)])
def test_cursor_shapes_become_x_cursor_font_glyphs_the_daemon_accepts(
        shape: str | None, cursor: int) -> None:
    world = WmWorld()
    _surface, _xdg, _top, w = world.toplevel()
    world.daemon.take(world.agent)
    world.agent.cursor_changed(w, "crosshair")  # something else first
    world.agent.cursor_changed(w, shape)
    sent = world.daemon.take(world.agent)
    assert sent[0].body == gm.Cursor(gm.CURSOR_X11 + 30)
    expected = [] if cursor == gm.CURSOR_X11 + 30 else [gm.Cursor(cursor)]
    assert [m.body for m in sent[1:]] == expected


def test_every_shape_maps_to_a_glyph_of_the_x_cursor_font() -> None:
    for shape in SHAPE_GLYPHS:
        value = cursor_message(shape).cursor
        assert gm.CURSOR_X11 <= value < gm.CURSOR_X11_MAX and (value - gm.CURSOR_X11) % 2 == 0


def test_a_new_daemon_gets_the_cursor_and_fullscreen_state_before_map() -> None:
    world = WmWorld()
    _surface, _xdg, _top, w = world.toplevel()
    world.daemon.take(world.agent)
    world.from_daemon(2, gm.WindowFlags(gm.WINDOW_FLAG_FULLSCREEN, 0))
    world.agent.cursor_changed(w, "text")
    world.agent.disconnect()
    world.agent.connect(gm.VERSION, gm.Xconf.for_screen(800, 600))
    again = Daemon()
    kinds = [(m.type.name, m.body) for m in again.take(world.agent)]
    names = [k for k, _ in kinds]
    assert ("WINDOW_FLAGS", gm.WindowFlags(gm.WINDOW_FLAG_FULLSCREEN, 0)) in kinds
    assert ("CURSOR", gm.Cursor(gm.CURSOR_X11 + 152)) in kinds
    assert names.index("WINDOW_FLAGS") < names.index("MAP")


managed_steps = st.lists(st.tuples(
    st.sampled_from(["commit", "unmap", "ack", "configure", "close", "flags", "cursor",
                     "fullscreen", "minimize", "maximize"]),
    st.integers(0, 2), st.integers(1, 40)), max_size=30)


@settings(max_examples=40, deadline=None)
@given(managed_steps)
def test_any_window_management_sequence_passes_the_daemons_checks(
        script: list[tuple[str, int, int]]) -> None:
    world = WmWorld()
    app = world.app
    windows: dict[int, tuple[int, int, int]] = {}
    for op, n, size in script:
        if op == "commit":
            if n not in windows:
                windows[n] = app.toplevel(f"w{n}")
            surface, xdg, _top = windows[n]
            if app.c.take("xdg_surface", "configure", xdg):
                pass
            app.show(surface, app.buffer(solid(size, size + 1)))
        elif op == "unmap" and n in windows:
            surface, xdg, top = windows.pop(n)
            app.c.destroy(top)
            app.c.destroy(xdg)
            app.c.destroy(surface)
        elif op == "ack":
            world.daemon.answer(world.agent, 1)
        elif op in ("configure", "close", "flags"):
            body: gm.Body = (gm.Configure(size, -size, size * 3, size * 2) if op == "configure"
                             else gm.Close() if op == "close"
                             else gm.WindowFlags(size & 5, ~size & 5 & ~(size & 5)))
            world.agent.on_message(gm.Message.of(2 + n, body))
        elif op == "cursor":
            for w in world.comp.windows():
                world.agent.cursor_changed(w, ["text", None, "wait", "bogus"][size % 4])
        elif n in windows:
            top = windows[n][2]
            request = {"fullscreen": "set_fullscreen" if size % 2 else "unset_fullscreen",
                       "minimize": "set_minimized",
                       "maximize": "set_maximized" if size % 2 else "unset_maximized"}[op]
            app.c.request(top, request, *((None,) if request == "set_fullscreen" else ()))
        app.c.roundtrip()
        world.daemon.take(world.agent)  # raises what the daemon would refuse
    assert not app.c.closed()
