"""Agent mode through the GUI-daemon emulator: what a user of Qubes would see, and the grants.

``qubesshm agent`` serves real Wayland clients; ``qubesshm guid-emulator`` (a separate
process, as dom0 is) maps its dumps through the simulated hypervisor and shows each
window as an X window on a private Xvfb, read back here with xcffib ``GetImage``:

- every content route of ``examples/scenario_client.py`` (static, the 8 buffer
  transforms, scale 2, viewport, a grown pool, a synchronized subsurface, double
  buffering with partial damage) shows the client's pixels exactly;
- GTK 3 and GTK 4 windows appear with their titles and a plausible size;
- popups sit where their positioner puts them (a flip included), their pixels exact
  inside the frame the daemon draws;
- 500 windows of churn: grant pages bounded, nothing deferred or leaked, every dump
  acknowledged;
- a late daemon (``--hold``): let-go areas go to deferred reclaim in batches, with
  ``free_per_iteration`` raised and restored, and nothing leaks;
- the daemon killed and restarted: every window shown again, pending areas made late;
- a protocol 1.4 daemon (no ACK): only the late path, pixels still exact.
"""

from __future__ import annotations

import contextlib
import shutil
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
import xcffib
from agent_world import (
    Agent,
    Proc,
    Screen,
    World,
    Xvfb,
    XWindow,
    daemon_connected,
    example,
    mismatch,
    new_world,
    private_xvfb,
    start_agent,
    start_client,
    start_emulator,
    struct_windows,
    wait_until,
    words,
)
from compositor_clients import PyClient, gradient
from pywayland.protocol.xdg_shell import XdgPositioner
from screenshots import example as load_example

pytestmark = pytest.mark.skipif(shutil.which("Xvfb") is None,
                                reason="needs Xvfb (the emulator shows windows on X)")

pc = load_example("pattern_client")
sc = load_example("scenario_client")

SCENARIO_SIZE = (160, 120)
FRAMES = 6
RED = 0xFF0000  # the frame the emulator draws inside override-redirect windows
BORDER = 2


# -- fixtures -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def xvfb() -> Iterator[Xvfb]:
    with private_xvfb() as server:
        yield server


@pytest.fixture
def screen(xvfb: Xvfb) -> Iterator[Screen]:
    found = Screen(xvfb.display)
    try:
        # Each test starts on a screen without an emulator's window.
        wait_until(lambda: not found.windows(), "an earlier emulator's windows to go")
        yield found
    finally:
        found.close()


@dataclass
class Pair:
    """An agent and the emulator showing its windows."""

    world: World
    agent: Agent
    emulator: Proc

    def stats(self) -> dict[str, Any]:
        return self.agent.stats()

    def brief(self) -> dict[str, Any]:
        """The counters that say where grants are, for assertion messages."""
        stats = self.stats()
        life = {k: v for k, v in stats["lifetimes"].items()
                if not isinstance(v, dict) and not k.endswith("_ms")}
        return {"daemon": stats["daemon"], "grants": stats["grants"], "lifetimes": life}

    def check_healthy(self) -> None:
        assert self.emulator.running, f"the emulator exited: {self.emulator.output()}"
        assert self.agent.running, f"the agent exited: {self.agent.output()}"
        assert not self.agent.problems(), self.agent.problems()

    def stop(self) -> None:
        """The agent ends on SIGTERM with 0; the emulator, seeing it go, with 0."""
        agent_status = self.agent.stop()
        emulator_status = self.emulator.wait_exit() if self.emulator.running else None
        self.emulator.stop()
        assert agent_status == 0, self.agent.output()[-3000:]
        assert emulator_status in (0, None), self.emulator.output()
        assert not self.agent.problems(), self.agent.problems()
        assert "dumps (+" in self.agent.output(), "no summary at exit: " + self.agent.output()


StartPair = Callable[..., Pair]


@pytest.fixture
def start_pair(xvfb: Xvfb) -> Iterator[StartPair]:
    """``start_pair(agent_args=(), emulator_args=())``: an agent and an emulator in a world
    of their own, connected; killed at the end if a test left them running."""
    with contextlib.ExitStack() as stack:

        def start(agent_args: tuple[str, ...] = (),
                  emulator_args: tuple[str, ...] = ()) -> Pair:
            world = stack.enter_context(new_world(xvfb.display))
            agent = start_agent(world, "-v", *agent_args)
            stack.callback(agent.stop, signal.SIGKILL)
            pair = Pair(world, agent, start_emulator(world, *emulator_args))
            stack.callback(lambda: pair.emulator.stop(signal.SIGKILL))
            wait_until(lambda: daemon_connected(agent), "the emulator to connect")
            return pair

        yield start


@pytest.fixture(scope="module")
def shared_pair(xvfb: Xvfb) -> Iterator[Pair]:
    """One agent and emulator for the tests that only look at windows."""
    with new_world(xvfb.display) as world:
        agent = start_agent(world, "-v")
        emulator = start_emulator(world)
        pair = Pair(world, agent, emulator)
        try:
            wait_until(lambda: daemon_connected(agent), "the emulator to connect")
            yield pair
            pair.stop()
        finally:
            agent.stop(signal.SIGKILL)
            emulator.stop(signal.SIGKILL)


def stop_client(client: Proc) -> None:
    status = client.stop()
    assert status == 0, f"{client.name} exited with {status}: {client.output()[-3000:]}"


def scenario_pixels(scenario: str) -> np.ndarray:
    width, height = SCENARIO_SIZE
    if scenario == "double-buffered":
        return words(sc.double_buffered_pixels(width, height, FRAMES), width, height)
    return words(pc.pattern_pixels(width, height), width, height)


def start_scenario(agent: Agent, scenario: str) -> Proc:
    """The scenario client, once it has presented its last frame (and holds it until
    SIGTERM, which it then answers with exit status 0)."""
    width, height = SCENARIO_SIZE
    ready = agent.world.top / f"ready.{scenario}.{time.monotonic_ns()}"
    client = start_client(agent, example(
        "scenario_client", "--scenario", scenario, "--width", str(width), "--height",
        str(height), "--frames", str(FRAMES), "--hold", "120", "--quiet",
        "--ready-file", str(ready)))

    def presented() -> bool:
        assert client.running, f"{scenario} exited: {client.output()[-3000:]}"
        return ready.exists()

    wait_until(presented, f"the {scenario} client to present its last frame")
    return client


def title(scenario: str) -> bytes:
    return f"qubesshm scenario {scenario}".encode()


def shows_exactly(screen: Screen, name: bytes, want: np.ndarray, client: Proc,
                  *, inset: int = 0) -> None:
    """Wait until the window ``name`` shows ``want``; say what differs if it never does."""

    def check() -> bool:
        assert client.running, f"{client.name} exited: {client.output()[-3000:]}"
        return screen.shows(name=name, want=want, inset=inset) is not None

    try:
        wait_until(check, f"{name!r} to show the client's pixels", timeout=20)
    except AssertionError as exc:
        window = screen.find(name=name)
        if window is None:
            raise AssertionError(f"{exc}: no window {name!r} on the screen "
                                 f"({len(screen.windows())} others)") from None
        height, width = want.shape
        geometry = screen.geometry(window.xid)
        if geometry[2:] != (width, height):
            raise AssertionError(f"{exc}: the window is {geometry[2]}x{geometry[3]}, "
                                 f"not {width}x{height}") from None
        got = screen.image(window.xid, width, height)
        cut = (slice(inset, height - inset), slice(inset, width - inset))
        raise AssertionError(f"{exc}: {mismatch(got[cut], want[cut])}") from None


def gone(screen: Screen, name: bytes) -> bool:
    return screen.find(name=name) is None


# -- 1. every content route, pixel-exact ----------------------------------------------------


@pytest.mark.parametrize("scenario", sc.SCENARIOS)
def test_scenario_pixels_are_exact_on_the_daemons_screen(
        shared_pair: Pair, screen: Screen, scenario: str) -> None:
    agent = shared_pair.agent
    width, height = SCENARIO_SIZE
    before = agent.stats()
    client = start_scenario(agent, scenario)
    try:
        shows_exactly(screen, title(scenario), scenario_pixels(scenario), client)
        window = screen.find(name=title(scenario))
        assert window is not None and not screen.override_redirect(window.xid)
        after = agent.stats()
    finally:
        stop_client(client)
    wait_until(lambda: gone(screen, title(scenario)), "the window to go")
    shared_pair.check_healthy()
    if scenario == "double-buffered":
        # Frames after the first copy (and send) only the moving rectangle's places.
        copied = after["bytes_copied"] - before["bytes_copied"]
        full = width * height * 4
        assert full <= copied < 2 * full, (copied, full)
        shmimages = after["daemon"]["shmimages"] - before["daemon"]["shmimages"]
        assert shmimages >= FRAMES, shmimages


# -- 2. GTK 3 and GTK 4 ---------------------------------------------------------------------


@pytest.mark.parametrize(("argv", "env", "name"), [
    (("gtk3-demo",), {}, b"Application Class"),
    (("gtk4-demo",), {"GSK_RENDERER": "cairo"}, b"GTK Demo"),
], ids=["gtk3", "gtk4"])
def test_gtk_windows_appear_with_their_title_and_size(
        shared_pair: Pair, screen: Screen, argv: tuple[str, ...], env: dict[str, str],
        name: bytes) -> None:
    if shutil.which(argv[0]) is None:
        pytest.fail(f"{argv[0]} is not installed (.ci/install installs it)")
    app = start_client(shared_pair.agent, argv, **env)
    try:
        def drawn() -> bool:
            assert app.running, f"{argv[0]} exited: {app.output()[-3000:]}"
            window = screen.find(name=name)
            if window is None:
                return False
            _, _, width, height = screen.geometry(window.xid)
            colours = len(np.unique(screen.image(window.xid, width, height)))
            return colours > 10

        wait_until(drawn, f"a drawn {name!r} window")
        window = screen.find(name=name)
        assert window is not None
        x, y, width, height = screen.geometry(window.xid)
        # GTK's default sizes are 800x647 (3) and 800x600 (4); its shadows are not part
        # of the window (the window geometry is).
        assert 600 <= width <= 1000 and 450 <= height <= 800, (width, height)
        assert x >= 0 and y >= 0 and x + width <= 1280 and y + height <= 1024
        wm_class = screen.prop(window.xid, "WM_CLASS") or b""
        res_name, res_class = wm_class.split(b"\0")[:2]
        assert res_name.startswith(b"vm5:") and len(res_name) > 4, wm_class
        assert res_class == res_name, wm_class
        assert screen.find(wm_class=res_name) == window
        assert not screen.override_redirect(window.xid)
    finally:
        app.stop()
    wait_until(lambda: gone(screen, name), "the window to go")
    shared_pair.check_healthy()


# -- 3. popups placed by their positioner -----------------------------------------------------


def positioner(client: PyClient, size: tuple[int, int], anchor_rect: tuple[int, int, int, int],
               anchor: int, gravity: int, offset: tuple[int, int] = (0, 0),
               adjustment: int = 0) -> Any:
    found = client.wm_base.create_positioner()
    found.set_size(*size)
    found.set_anchor_rect(*anchor_rect)
    found.set_anchor(anchor)
    found.set_gravity(gravity)
    found.set_offset(*offset)
    found.set_constraint_adjustment(adjustment)
    return found


def override_redirect_at(screen: Screen, where: tuple[int, int, int, int]) -> XWindow | None:
    """The emulator's mapped override-redirect window with geometry ``where``."""
    for window in screen.windows():
        try:
            if screen.override_redirect(window.xid) and screen.geometry(window.xid) == where:
                return window
        except xcffib.XcffibException:
            pass  # gone meanwhile
    return None


def framed(screen: Screen, window: XWindow, pixels: np.ndarray) -> bool:
    """``window`` shows ``pixels`` inside the frame the daemon draws, and the frame."""
    height, width = pixels.shape
    got = screen.image(window.xid, width, height)
    inside = (slice(BORDER, height - BORDER), slice(BORDER, width - BORDER))
    frame = np.ones((height, width), dtype=bool)
    frame[inside] = False
    return bool(np.array_equal(got[inside], pixels[inside] & 0xFFFFFF)
                and (got[frame] == RED).all())


ANCHOR, GRAVITY = XdgPositioner.anchor, XdgPositioner.gravity
FLIP_Y = XdgPositioner.constraint_adjustment.flip_y


@pytest.mark.parametrize(("size", "anchor_rect", "anchor", "gravity", "offset", "adjustment",
                          "place"), [
    # The popup's top left at the anchor rectangle's bottom right, moved by the offset.
    ((60, 30), (50, 40, 20, 10), ANCHOR.bottom_right, GRAVITY.bottom_right, (5, 3), 0,
     (50 + 20 + 5, 40 + 10 + 3)),
    # Its bottom right at the rectangle's top left, moved back by a negative offset.
    ((80, 40), (100, 200, 40, 20), ANCHOR.top_left, GRAVITY.top_left, (-7, -4), 0,
     (100 - 80 - 7, 200 - 40 - 4)),
    # Below the rectangle it would leave the 1024-pixel screen (the parent is 900 high
    # and at y >= 0): flip_y puts it above the rectangle instead.
    ((100, 200), (10, 850, 20, 20), ANCHOR.bottom_left, GRAVITY.bottom_right, (0, 0), FLIP_Y,
     (10, 850 - 200)),
], ids=["below-right", "above-left", "flipped-up"])
def test_popups_sit_where_their_positioner_puts_them(
        shared_pair: Pair, screen: Screen, size: tuple[int, int],
        anchor_rect: tuple[int, int, int, int], anchor: int, gravity: int,
        offset: tuple[int, int], adjustment: int, place: tuple[int, int]) -> None:
    client = PyClient(shared_pair.agent.socket_path)
    # Non-ASCII in a title shows as one '_' per byte (the daemon's default).
    parent_name, shown_name = "popup parent caf\u00e9", b"popup parent caf__"
    try:
        parent = client.toplevel(parent_name)
        parent_pixels = gradient(300, 900, 1)
        client.show(parent.surface, client.buffer(parent_pixels))
        wait_until(lambda: screen.shows(name=shown_name, want=parent_pixels),
                   "the parent's pixels", between=client.dispatch)
        parent_window = screen.find(name=shown_name)
        assert parent_window is not None
        px, py, _, _ = screen.geometry(parent_window.xid)
        if adjustment == FLIP_Y:
            assert py + anchor_rect[1] + anchor_rect[3] + size[1] > 1024, py

        popup = client.popup(parent, positioner(client, size, anchor_rect, anchor, gravity,
                                                offset, adjustment))
        assert popup.configures[-1] == (*place, *size), popup.configures
        pixels = gradient(*size, 2)
        client.show(popup.surface, client.buffer(pixels))
        where = (px + place[0], py + place[1], *size)
        window = wait_until(lambda: override_redirect_at(screen, where),
                            f"a popup at {where} over the parent at {(px, py)}",
                            between=client.dispatch)
        transient = screen.prop(window.xid, "WM_TRANSIENT_FOR")
        assert transient is not None and struct_windows(transient) == (parent_window.xid,)
        wait_until(lambda: framed(screen, window, pixels), "the popup's pixels",
                   between=client.dispatch)
        popup.role.destroy()
        popup.xdg_surface.destroy()
        popup.surface.destroy()
        wait_until(lambda: override_redirect_at(screen, where) is None, "the popup to go",
                   between=client.dispatch)
    finally:
        client.disconnect()
    wait_until(lambda: gone(screen, shown_name), "the parent to go")
    shared_pair.check_healthy()


# -- grants ---------------------------------------------------------------------------------


def settled(pair: Pair, *, acks: bool = True) -> dict[str, Any] | None:
    """The counters once nothing waits: no area awaiting release, the simulated
    kernel's deferred list empty, and (``acks``) no ACK pending; None until then."""
    stats = pair.stats()
    life, grants = stats["lifetimes"], stats["grants"]
    if ((stats["daemon"]["pending_acks"] == 0 or not acks) and life["pending_releases"] == 0
            and grants["deferred"] == 0 and grants["awaiting_unmap"] == 0):
        return stats
    return None


def churn(agent: Agent, windows: int, *extra: str) -> None:
    client = start_client(agent, example("churn_client", "--windows", str(windows), *extra))
    status = client.wait_exit(timeout=120)
    assert status == 0, client.output()[-3000:]


# -- 4. churn: bounded, nothing deferred, every dump acknowledged ----------------------------


def test_500_windows_of_churn_stay_bounded_and_leak_nothing(start_pair: StartPair,
                                                            screen: Screen) -> None:
    pair = start_pair()
    size = (64, 48)
    pages_per_window = -(-size[0] * size[1] * 4 // 4096)
    churn(pair.agent, 500, "--size", f"{size[0]}x{size[1]}", "--concurrency", "2")
    stats = wait_until(lambda: settled(pair), "every ACK and release", detail=pair.brief)
    daemon, life, grants = stats["daemon"], stats["lifetimes"], stats["grants"]
    assert daemon["created"] == daemon["destroyed"] == 500, daemon
    assert daemon["dumps"] == 500 and daemon["acks"] == daemon["dumps"] + daemon["barriers"]
    assert daemon["windows"] == 0 and not screen.windows()
    # Areas come back by the ACK order and serve the next windows.
    assert life["recycled_on_release"] + life["ended_on_release"] >= 500
    assert life["cache_hits"] >= 450, life
    assert grants["peak_live"] <= 20 * pages_per_window, grants  # 500 windows: 1500 pages
    assert grants["shared_total"] <= 20 * pages_per_window, grants
    # Nothing went the late way, and nothing is left behind.
    assert life["late_releases"] == life["deferred_areas"] == life["forced_late"] == 0, life
    assert life["wrong_releases"] == 0, life
    assert grants["deferred"] == 0 and grants["leaked"] == 0, grants
    pair.check_healthy()
    pair.stop()


# -- 5. a late daemon ----------------------------------------------------------------------


def late_path_checks(pair: Pair, before: dict[str, Any]) -> dict[str, Any]:
    """After areas went late: batches, free_per_iteration raised then restored, and at
    last nothing deferred or leaked."""
    fpi = before["lifetimes"]["free_per_iteration"]
    stats = wait_until(lambda: settled(pair), "every area let go to be settled",
                       detail=pair.brief)
    life = stats["lifetimes"]
    assert life["late_releases"] >= 1 and life["deferred_areas"] >= 1, life
    assert life["defer_batches"] >= 2, life  # in batches, not all at once
    assert life["peak_deferred_backlog"] > 0, life
    assert life["free_per_iteration_raises"] >= 1, life

    def restored() -> dict[str, Any] | None:
        stats = pair.stats()
        life = stats["lifetimes"]
        if life["free_per_iteration_restores"] >= 1 and life["free_per_iteration"] == fpi:
            return stats
        return None

    # Raised (perhaps more than once as the backlog grew), then put back as it was.
    stats = wait_until(restored, "free_per_iteration to be restored", detail=pair.brief)
    life, grants = stats["lifetimes"], stats["grants"]
    assert grants["deferred"] == 0 and grants["leaked"] == 0, grants
    assert life["wrong_releases"] == 0, life
    return stats


def test_a_late_daemon_sends_areas_to_deferred_reclaim_in_batches(start_pair: StartPair,
                                                                   screen: Screen) -> None:
    pair = start_pair(("--kernel", "stock"), ("--hold", "3"))
    before = pair.stats()
    churn(pair.agent, 40, "--size", "128x96")
    late_path_checks(pair, before)
    pair.check_healthy()
    pair.stop()


def test_late_acks_send_areas_to_deferred_reclaim_in_batches(start_pair: StartPair,
                                                             screen: Screen) -> None:
    """A daemon that holds its dumps and whose ACKs come after the late timeout (2 s)."""
    pair = start_pair(("--kernel", "stock"), ("--hold", "3", "--ack-delay", "3"))
    before = pair.stats()
    churn(pair.agent, 40, "--size", "128x96")
    stats = late_path_checks(pair, before)
    # The late ACKs confirmed what the late path had taken already.
    assert stats["lifetimes"]["late_confirms"] >= 1, stats["lifetimes"]
    assert stats["daemon"]["acks"] == stats["daemon"]["dumps"] + stats["daemon"]["barriers"]
    pair.check_healthy()
    pair.stop()


# -- 6. the daemon killed and restarted -----------------------------------------------------


def test_a_restarted_daemon_is_shown_every_window_again(start_pair: StartPair,
                                                        screen: Screen) -> None:
    # ACKs that never come while the first emulator runs, and a late timeout it never
    # reaches: whatever is let go is pending when it dies.
    pair = start_pair(("--late-timeout", "60"), ("--ack-delay", "600"))
    agent = pair.agent
    # One after the other: the second is placed over the first, whose pixels are then
    # hidden in part (the X server keeps no copy of what a window covers).
    kept = start_scenario(agent, "static")
    other = None
    try:
        shows_exactly(screen, title("static"), scenario_pixels("static"), kept)
        other = start_scenario(agent, "transform-3")
        shows_exactly(screen, title("transform-3"), scenario_pixels("transform-3"), other)
        stop_client(other)
        wait_until(lambda: gone(screen, title("transform-3")), "the closed window to go")
        churn(agent, 5, "--size", "64x48")
        pending = wait_until(lambda: (n := agent.stats()["lifetimes"]["pending_releases"])
                             >= 6 and n, "the let-go areas to await release")
        assert agent.stats()["lifetimes"]["forced_late"] == 0

        pair.emulator.stop(signal.SIGKILL)
        wait_until(lambda: not agent.stats()["daemon"]["connected"], "the agent to notice")
        wait_until(lambda: not screen.windows(), "the dead emulator's windows to go")
        pair.emulator = start_emulator(pair.world)
        wait_until(lambda: daemon_connected(agent, 2), "the new emulator to connect")
        # The window is shown again, pixel-exact, with its title.
        shows_exactly(screen, title("static"), scenario_pixels("static"), kept)
        assert len(screen.windows()) == 1, screen.windows()
        stats = wait_until(lambda: settled(pair), "the pending areas to be settled",
                           detail=pair.brief)
        life, grants = stats["lifetimes"], stats["grants"]
        assert life["forced_late"] >= pending and life["late_releases"] >= pending, life
        assert life["wrong_releases"] == 0, life
        assert grants["deferred"] == 0 and grants["leaked"] == 0, grants
        daemon = stats["daemon"]
        assert daemon["connections"] == 2 and daemon["windows"] == 1, daemon
        # The new daemon acknowledges its dumps: the re-sent one included.
        assert daemon["pending_acks"] == 0 and daemon["acks"] >= 1, daemon
        pair.check_healthy()
    finally:
        kept.stop()
        if other is not None:
            other.stop()
    wait_until(lambda: settled(pair), "the last window's release", detail=pair.brief)
    pair.stop()


# -- 7. a protocol 1.4 daemon: no ACK ----------------------------------------------------------


def test_a_daemon_without_acks_gets_only_the_late_path(start_pair: StartPair,
                                                       screen: Screen) -> None:
    pair = start_pair((), ("--version", "1.4"))
    agent = pair.agent
    client = start_scenario(agent, "double-buffered")
    try:
        shows_exactly(screen, title("double-buffered"), scenario_pixels("double-buffered"),
                      client)
        churn(agent, 10, "--size", "64x48")
    finally:
        stop_client(client)
    wait_until(lambda: gone(screen, title("double-buffered")), "the window to go")
    stats = wait_until(lambda: settled(pair, acks=False), "the late path to settle every area",
                       detail=pair.brief)
    daemon, life, grants = stats["daemon"], stats["lifetimes"], stats["grants"]
    assert daemon["acks"] == 0 and daemon["barriers"] == 0, daemon
    assert daemon["created"] == daemon["destroyed"] == 11, daemon
    assert life["ended_on_release"] == life["recycled_on_release"] == 0, life
    assert life["confirm_latency_ms"]["count"] == 0, life
    # Every area let go waited the late timeout; the emulator had let go of them by
    # then, so they ended at once rather than on the kernel's deferred list.
    assert life["late_releases"] >= 11 and life["defer_batches"] >= 1, life
    assert life["wrong_releases"] == 0, life
    assert grants["deferred"] == 0 and grants["leaked"] == 0, grants
    pair.check_healthy()
    pair.stop()


def test_stats_command_reads_the_agents_counters(shared_pair: Pair) -> None:
    """``qubesshm stats --socket NAME --json`` shows the agent's sections."""
    stats = shared_pair.agent.cli_stats()
    assert stats["mode"] == "agent"
    assert set(stats["daemon"]) == {"connected", "connections", "windows", "created",
                                    "destroyed", "dumps", "barriers", "shmimages", "acks",
                                    "pending_acks"}
    assert stats["daemon"]["connected"] is True
    for key in ("pending_acks", "pending_releases", "ended_on_release",
                "recycled_on_release", "wrong_releases", "forced_late", "ack_latency_ms",
                "free_per_iteration", "defer_batches"):
        assert key in stats["lifetimes"], key


# -- counters ---------------------------------------------------------------------------------


def test_a_daemon_without_acks_has_no_acks_pending(start_pair: StartPair,
                                                   screen: Screen) -> None:
    pair = start_pair((), ("--version", "1.4"))
    client = start_scenario(pair.agent, "static")
    try:
        shows_exactly(screen, title("static"), scenario_pixels("static"), client)
        stats = pair.stats()
        assert stats["daemon"]["dumps"] >= 1
        assert stats["daemon"]["pending_acks"] == 0, stats["daemon"]
        assert stats["lifetimes"]["pending_acks"] in (0, None), stats["lifetimes"]
    finally:
        stop_client(client)
    pair.stop()


def test_a_client_that_leaves_is_forgotten(shared_pair: Pair, screen: Screen) -> None:
    """Its counters go, and the areas it left in the cache end."""
    churn(shared_pair.agent, 3, "--size", "64x48")

    def forgotten() -> dict[str, Any] | None:
        stats = settled(shared_pair)
        if stats is None or stats["clients"] or stats["grants"]["cached"]:
            return None
        return stats

    stats = wait_until(forgotten, "the agent to forget the client", detail=shared_pair.brief)
    assert stats["per_client"] == [], stats["per_client"]
    assert stats["clients_served"] >= 1
    assert stats["grants"]["ended_total"] >= 3, stats["grants"]
