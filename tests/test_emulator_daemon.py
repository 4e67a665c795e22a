"""The emulator's sans-IO model of qubes-guid: handshake, checks, dumps, ACK order, geometry,
input and the clipboard keys.

Every expectation here is a fact read in the real daemon's ``gui-daemon/xside.c``: what
it answers, what it lets go of and when, what ends it.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qubesshm.emulator import daemon as dm
from qubesshm.emulator import events as ev
from qubesshm.emulator.clipboard import Metadata
from qubesshm.guiproto import codec
from qubesshm.guiproto import messages as gm

V = gm.make_version
SCREEN = dm.Screen(1283, 1024)  # the handshake rounds the width up to 1288
A = TypeVar("A")


@dataclass
class Run:
    """A model, the time, and what it has done so far."""

    daemon: dm.GuiDaemon
    version: int
    now: float = 0.0
    actions: list[dm.Action] = field(default_factory=list)
    decoder: codec.AgentDecoder | None = None

    def feed(self, data: bytes) -> list[dm.Action]:
        got = self.daemon.receive(data, self.now)
        self.actions += got
        return got

    def send(self, window: int, body: gm.Body) -> list[dm.Action]:
        return self.feed(codec.encode(window, body))

    def tick(self) -> list[dm.Action]:
        got = self.daemon.tick(self.now)
        self.actions += got
        return got

    def sent(self, actions: Sequence[dm.Action]) -> list[gm.Message]:
        """The messages among ``actions``, as the agent reads them."""
        if self.decoder is None:
            self.decoder = codec.AgentDecoder(self.version)
        out: list[gm.Message] = []
        for action in actions:
            if isinstance(action, dm.Send):
                out += self.decoder.feed(action.data)
        return out


def start(version: int = gm.VERSION, agent: int = gm.VERSION, **kw: Any) -> Run:
    daemon = dm.GuiDaemon(dm.Settings(screen=SCREEN, version=version, **kw))
    run = Run(daemon, min(version, agent))
    answer = daemon.receive(codec.encode_version(agent), run.now)
    assert len(answer) == 1 and isinstance(answer[0], dm.Send)
    return run


def of(kind: type[A], actions: Sequence[object]) -> list[A]:
    return [a for a in actions if isinstance(a, kind)]


def dump_body(width: int = 16, height: int = 16, refs: tuple[int, ...] | None = None
              ) -> gm.WindowDump:
    pages = (width * height * 4 + 4095) // 4096
    return gm.WindowDump(width, height, refs if refs is not None else tuple(range(8, 8 + pages)))


def shown(run: Run, window: int, x: int = 10, y: int = 10, w: int = 16, h: int = 16,
          override_redirect: int = 0) -> None:
    run.send(window, gm.Create(x, y, w, h, 0, override_redirect))
    run.send(window, gm.Map(0, override_redirect))


def fault(actions: Sequence[dm.Action]) -> dm.Exit:
    exits = of(dm.Exit, actions)
    assert len(exits) == 1 and exits[0] is actions[-1], actions
    assert exits[0].status == 1
    return exits[0]


# -- handshake ---------------------------------------------------------------------------------


@pytest.mark.parametrize("minor", [3, 4, 5, 6, 7, 8])
def test_handshake_answers_the_lower_version_and_the_screen(minor: int) -> None:
    daemon = dm.GuiDaemon(dm.Settings(screen=SCREEN, version=V(1, minor)))
    answer = daemon.receive(codec.encode_version(gm.VERSION), 0.0)
    assert len(answer) == 1 and isinstance(answer[0], dm.Send)
    xconf = codec.encode_xconf(gm.Xconf(1288, 1024, 24, 1288 * 1024 * 4 // 1024 + 1))
    if minor >= 4:
        assert answer[0].data == codec.encode_version(V(1, minor)) + xconf
    else:  # a daemon below 1.4 sends no version: only its screen
        assert answer[0].data == xconf
    assert daemon.version == V(1, minor)


def test_handshake_takes_the_agents_lower_minor_and_bytes_one_at_a_time() -> None:
    daemon = dm.GuiDaemon(dm.Settings(screen=SCREEN))
    stream = codec.encode_version(V(1, 5)) + codec.encode(7, gm.Create(0, 0, 8, 8))
    actions: list[dm.Action] = []
    for i in range(len(stream)):
        actions += daemon.receive(stream[i:i + 1], 0.0)
    assert daemon.version == V(1, 5)
    sends = of(dm.Send, actions)
    assert sends[0].data[:4] == codec.encode_version(V(1, 5))
    assert of(dm.CreateWindow, actions) == [dm.CreateWindow(7, dm.Rect(0, 0, 8, 8), False)]


@pytest.mark.parametrize(("agent", "text"), [
    (V(2, 0), "The Dom0 GUI daemon does not support protocol version 2:0"),
    (V(0, 9), "implements outdated protocol (0:9)"),
])
def test_handshake_with_another_major_ends_the_daemon(agent: int, text: str) -> None:
    daemon = dm.GuiDaemon(dm.Settings(screen=SCREEN, vm_name="work"))
    actions = daemon.receive(codec.encode_version(agent), 0.0)
    assert text in fault(actions).message
    assert "'work'" in fault(actions).message
    assert daemon.receive(codec.encode(1, gm.Create(0, 0, 8, 8)), 0.0) == []


def test_versions_outside_the_emulators_range_are_refused() -> None:
    for version in (V(1, 2), V(1, 9), V(2, 0)):
        with pytest.raises(ValueError, match="not one the emulator speaks"):
            dm.GuiDaemon(dm.Settings(screen=SCREEN, version=version))


# -- dumps: let go, map, ACK, echo -----------------------------------------------------------------


@pytest.mark.parametrize("minor", [4, 5, 6, 7, 8])
def test_a_new_dump_lets_go_of_the_previous_then_maps_then_acks(minor: int) -> None:
    run = start(V(1, minor))
    shown(run, 5)
    first = run.send(5, dump_body())
    assert [type(a) for a in first][:1] == [dm.MapDump]
    second = run.send(5, dump_body(refs=(20, 21)))
    kinds = [type(a) for a in second]
    old, new = of(dm.MapDump, first)[0].dump, of(dm.MapDump, second)[0]
    assert new.refs == (20, 21) and new.window == 5
    if minor >= 7:
        # The daemon detaches, maps and attaches, syncs with X (the detach is carried
        # out), then writes the ACK.
        assert kinds == [dm.Detach, dm.MapDump, dm.Unmap, dm.Send]
        assert [m.type for m in run.sent(second)] == [gm.MsgType.WINDOW_DUMP_ACK]
        assert run.sent(second)[0].window == 5
    else:
        assert kinds == [dm.Detach, dm.MapDump, dm.Unmap]
    assert second[0] == dm.Detach(old) and second[2] == dm.Unmap(old)
    assert run.daemon.mapped_dumps == {new.dump}


@pytest.mark.parametrize("minor", [4, 5, 8])
def test_destroy_lets_go_and_echoes_before_the_mapping_ends(minor: int) -> None:
    run = start(V(1, minor))
    shown(run, 9)
    dump = of(dm.MapDump, run.send(9, dump_body()))[0].dump
    destroyed = run.send(9, gm.Destroy())
    expected: list[dm.Action] = [dm.DestroyWindow(9), dm.Detach(dump)]
    if minor >= 5:
        assert destroyed[:2] == expected and len(destroyed) == 3
        assert [(m.type, m.window) for m in run.sent(destroyed)] == [(gm.MsgType.DESTROY, 9)]
    else:
        assert destroyed == expected
    # No sync after the detach: the mapping may outlive the echo; the X server carries
    # the detach out soon after, which the I/O layer's tick after the batch stands for.
    assert run.daemon.mapped_dumps == {dump}
    assert run.tick() == [dm.Unmap(dump)]
    assert run.daemon.mapped_dumps == frozenset()


def test_unmap_lets_go_but_not_of_window_zero() -> None:
    run = start()
    shown(run, 3)
    shown(run, 0)
    three = of(dm.MapDump, run.send(3, dump_body()))[0].dump
    zero = of(dm.MapDump, run.send(0, dump_body()))[0].dump
    assert run.send(3, gm.Unmap()) == [dm.UnmapWindow(3), dm.Detach(three)]
    # window 0 is the daemon's "whole screen" window: UNMAP keeps its dump
    assert run.send(0, gm.Unmap()) == [dm.UnmapWindow(0)]
    run.tick()
    assert run.daemon.mapped_dumps == {zero}


def test_acks_are_one_fifo_for_all_windows_in_dump_order() -> None:
    run = start()
    for window in (1, 2, 3):
        shown(run, window)
    order = [2, 1, 3, 3, 1, 2, 2]
    for window in order:
        run.send(window, dump_body())
    acks = [m.window for m in run.sent(run.actions) if m.type == gm.MsgType.WINDOW_DUMP_ACK]
    assert acks == order
    assert run.daemon.counters.ack_order == order


def test_hold_keeps_a_let_go_dump_mapped_that_much_longer() -> None:
    run = start(hold=2.0)
    shown(run, 4)
    old = of(dm.MapDump, run.send(4, dump_body()))[0].dump
    run.now = 10.0
    second = run.send(4, dump_body())
    assert of(dm.Unmap, second) == []
    # The ACK means the X server let go of every dump let go before: it waits too.
    assert run.sent(second) == []
    assert run.daemon.next_deadline() == 12.0
    run.now = 11.99
    assert run.tick() == []
    run.now = 12.0
    later = run.tick()
    assert later[0] == dm.Unmap(old)
    assert [m.type for m in run.sent(later[1:])] == [gm.MsgType.WINDOW_DUMP_ACK]
    assert run.daemon.next_deadline() is None


def test_hold_counts_from_each_let_go() -> None:
    run = start(hold=1.0)
    shown(run, 1)
    shown(run, 2)
    a = of(dm.MapDump, run.send(1, dump_body()))[0].dump
    b = of(dm.MapDump, run.send(2, dump_body()))[0].dump
    run.send(1, gm.Unmap())
    run.now = 0.5
    run.send(2, gm.Destroy())
    run.now = 1.0
    assert run.tick() == [dm.Unmap(a)]
    run.now = 1.5
    assert run.tick() == [dm.Unmap(b)]


def test_ack_delay_holds_the_ack_and_whatever_follows_it() -> None:
    run = start(ack_delay=1.0)
    shown(run, 6)
    shown(run, 7)
    assert run.sent(run.send(6, dump_body())) == []
    run.now = 0.5
    destroyed = run.send(7, gm.Destroy())
    assert run.sent(destroyed) == []  # the echo waits behind the ACK: one stream
    assert run.daemon.next_deadline() == 1.0
    run.now = 0.99
    assert run.sent(run.tick()) == []
    run.now = 1.0
    out = run.sent(run.tick())
    assert [(m.type, m.window) for m in out] == [(gm.MsgType.WINDOW_DUMP_ACK, 6),
                                                 (gm.MsgType.DESTROY, 7)]


def test_hang_up_lets_go_of_everything() -> None:
    run = start(hold=5.0)
    shown(run, 1)
    shown(run, 2)
    a = of(dm.MapDump, run.send(1, dump_body()))[0].dump
    b = of(dm.MapDump, run.send(1, dump_body()))[0].dump
    c = of(dm.MapDump, run.send(2, dump_body()))[0].dump
    actions = run.daemon.hang_up()
    assert set(of(dm.Detach, actions)) == {dm.Detach(b), dm.Detach(c)}
    assert set(of(dm.Unmap, actions)) == {dm.Unmap(a), dm.Unmap(b), dm.Unmap(c)}
    assert actions[-1] == dm.Exit(0, "")
    assert run.daemon.mapped_dumps == frozenset()
    assert run.daemon.receive(codec.encode(1, gm.Destroy()), 0.0) == []


# -- faults: what ends qubes-guid ends the emulator, with its line -------------------------------


@pytest.mark.parametrize(("data", "text"), [
    (codec.encode(0x63, gm.Map(0, 0)), "msg 0x84 without CREATE for 0x63"),
    (codec.encode(1, gm.Create(0, 0, 8, 8)), "CREATE for already existing window id 0x1?"),
    (codec.encode(2, gm.Create(0, 0, 8, 8))[:8] + (23).to_bytes(4, "little") + bytes(24),
     "incorrect untrusted_len for MSG_CREATE: expected 24 got 23"),
    (codec.encode(1, gm.WindowDump(16385, 1, (1,) * 17)),
     "Width or height too large in MSG_WINDOW_DUMP: limit is 16384x6144 but got 16385x1"),
    (codec.encode(1, gm.WindowDump(64, 64, (8, 9, 10))), "got too small image data size (12288)"),
    (codec.encode(1, gm.WindowDump(1, 1, (8,), type=1)), "unknown window dump type 1"),
    ((200).to_bytes(4, "little") + (1).to_bytes(4, "little") + bytes(4),
     "got unknown msg type 200"),
    (codec.encode(1, gm.Configure(0, 0, 0, 10)), "Verify failed: width > 0 && height > 0"),
    (codec.encode(1, gm.MfnDump(1, 1, (1,))), "is not running in dom0"),
])
def test_what_ends_qubes_guid_ends_the_emulator(data: bytes, text: str) -> None:
    run = start(vm_name="work", domid=12)
    shown(run, 1)
    actions = run.feed(data)
    assert text in fault(actions).message
    assert "\n" not in fault(actions).message
    assert run.daemon.finished == actions[-1]
    assert run.feed(codec.encode(1, gm.Unmap())) == []


def test_messages_before_a_fault_in_the_same_read_are_handled() -> None:
    run = start()
    data = codec.encode(1, gm.Create(0, 0, 8, 8)) + codec.encode(2, gm.Map(0, 0))
    actions = run.feed(data)
    assert of(dm.CreateWindow, actions) == [dm.CreateWindow(1, dm.Rect(0, 0, 8, 8), False)]
    assert "msg 0x84 without CREATE for 0x2" in fault(actions).message


def test_a_fault_drops_what_a_delayed_ack_would_have_written() -> None:
    run = start(ack_delay=1.0)
    shown(run, 1)
    run.send(1, dump_body())
    fault(run.send(5, gm.Unmap()))
    run.now = 2.0
    assert run.tick() == []


def test_wrong_lengths_before_1_6_are_warnings_and_the_fixed_size_is_read() -> None:
    run = start(V(1, 5))
    short = codec.encode(1, gm.Create(0, 0, 8, 8))[:8] + (23).to_bytes(4, "little")
    actions = run.feed(short + codec.encode(1, gm.Create(0, 0, 8, 8))[12:])
    assert of(dm.Exit, actions) == []
    assert of(dm.CreateWindow, actions) == [dm.CreateWindow(1, dm.Rect(0, 0, 8, 8), False)]


def test_verify_failures_may_be_dropped_instead() -> None:
    run = start(verify_exits=False)
    shown(run, 1)
    actions = run.send(1, gm.Configure(0, 0, 10, 0)) + run.send(1, gm.WindowFlags(1, 1))
    actions += run.send(1, gm.Configure(5, 5, 10, 10))
    assert of(dm.Exit, actions) == []
    assert of(dm.MoveResize, actions) == [dm.MoveResize(1, dm.Rect(5, 5, 10, 10))]


def test_create_with_a_negative_size_fails_its_verify_and_makes_no_window() -> None:
    run = start(verify_exits=False)
    run.send(1, gm.Create(0, 0, 0x80000000, 8))
    assert "without CREATE for 0x1" in fault(run.send(1, gm.Map(0, 0))).message


# -- windows ------------------------------------------------------------------------------------


def test_create_clamps_position_and_size() -> None:
    run = start()
    actions = run.send(1, gm.Create(-(2**31), 2**31 - 1, 20000, 7000, 0, 0))
    assert actions == [dm.CreateWindow(1, dm.Rect(-16384, 6144, 16384, 6144), False)]


def test_override_redirect_is_refused_to_a_window_over_90_percent_of_the_work_area() -> None:
    run = start()
    big = run.send(1, gm.Create(0, 0, 1288, 1024, 0, 1))
    assert big == [dm.CreateWindow(1, dm.Rect(0, 0, 1288, 1024), False)]
    limit = 1288 * 1024 * 90 // 100
    fits = run.send(2, gm.Create(0, 0, limit // 1024, 1024, 0, 1))
    assert of(dm.CreateWindow, fits)[0].override_redirect


def test_override_redirect_windows_are_kept_on_the_work_area() -> None:
    run = start()
    actions = run.send(1, gm.Create(-5, 1000, 100, 50, 0, 1))
    assert actions[1:] == [dm.MoveResize(1, dm.Rect(0, 974, 100, 50))]
    # entirely off the screen is allowed
    assert of(dm.MoveResize, run.send(2, gm.Create(2000, 10, 100, 50, 0, 1))) == []
    assert of(dm.MoveResize, run.send(3, gm.Create(10, 10, 100, 50, 0, 0))) == []
    mapped = run.send(4, gm.Create(-5, 10, 100, 50, 0, 0)) + run.send(4, gm.Map(0, 1))
    assert dm.MoveResize(4, dm.Rect(0, 10, 100, 50)) in mapped
    assert mapped[-1] == dm.MapWindow(4, True)


def test_the_work_area_is_the_screens_root_or_the_given_one() -> None:
    screen = dm.Screen(1283, 1024, work_area=dm.Rect(0, 30, 1283, 994))
    daemon = dm.GuiDaemon(dm.Settings(screen=screen))
    daemon.receive(codec.encode_version(gm.VERSION), 0.0)
    actions = daemon.receive(codec.encode(1, gm.Create(5, 5, 10, 10, 0, 1)), 0.0)
    assert actions[-1] == dm.MoveResize(1, dm.Rect(5, 30, 10, 10))


def test_shmimage_puts_the_rectangle_clipped_to_the_dump() -> None:
    run = start()
    shown(run, 1, w=40, h=30)
    dump = of(dm.MapDump, run.send(1, dump_body(32, 20)))[0].dump
    assert run.send(1, gm.ShmImage(4, 5, 100, 100)) == [
        dm.Put(1, dump, 32, 20, dm.Rect(4, 5, 28, 15))]
    assert run.send(1, gm.ShmImage(-1, 0, 4, 4)) == []
    assert run.send(1, gm.ShmImage(0, 0, 0x80000000, 4)) == []  # negative as a C int
    assert run.send(1, gm.ShmImage(40, 0, 4, 4)) == []  # nothing of it on the dump
    run.send(1, gm.Unmap())
    assert run.send(1, gm.ShmImage(0, 0, 4, 4)) == []  # unmapped windows are not drawn


def test_override_redirect_windows_get_a_frame_the_image_never_covers() -> None:
    run = start()
    actions = run.send(1, gm.Create(100, 100, 40, 30, 0, 1)) + run.send(1, gm.Map(0, 1))
    # mapping draws the frame at once, before any content
    assert of(dm.Frame, actions) == [dm.Frame(1, 40, 30, 2)]
    dump = of(dm.MapDump, run.send(1, dump_body(40, 30)))[0].dump
    assert run.send(1, gm.ShmImage(0, 0, 40, 30)) == [
        dm.Put(1, dump, 40, 30, dm.Rect(2, 2, 36, 26)), dm.Frame(1, 40, 30, 2)]
    assert run.send(1, gm.ShmImage(10, 10, 5, 5)) == [
        dm.Put(1, dump, 40, 30, dm.Rect(10, 10, 5, 5))]
    assert run.send(1, gm.ShmImage(0, 0, 2, 30)) == []  # only frame
    tiny = run.send(2, gm.Create(0, 0, 4, 30, 0, 1)) + run.send(2, gm.Map(0, 1))
    assert of(dm.Fill, tiny) == [dm.Fill(2, 4, 30)]


def test_expose_redraws_from_the_current_dump() -> None:
    run = start()
    shown(run, 1, w=40, h=30)
    dump = of(dm.MapDump, run.send(1, dump_body(40, 30)))[0].dump
    assert run.daemon.expose(1, dm.Rect(5, 6, 7, 8), 0.0) == [
        dm.Put(1, dump, 40, 30, dm.Rect(5, 6, 7, 8))]
    run.send(1, gm.Unmap())
    assert run.daemon.expose(1, dm.Rect(5, 6, 7, 8), 0.0) == []  # no dump, no frame
    assert run.daemon.expose(99, dm.Rect(0, 0, 1, 1), 0.0) == []


def test_titles_and_classes_are_sanitized_as_the_daemon_does() -> None:
    run = start(vm_name="work")
    run.send(1, gm.Create(0, 0, 8, 8))
    assert run.send(1, gm.WmName(b"caf\xc3\xa9\x07 \xe2\x80\xa6")) == [
        dm.SetName(1, b"caf___ ...")]
    assert run.send(1, gm.WmClass(b"Foot\x01", b"foot")) == [
        dm.SetClass(1, b"work:Foot_", b"work:foot")]
    run.send(1, gm.Map(0, 0))
    assert run.send(1, gm.WmClass(b"Other", b"other")) == []  # not on a mapped window


def test_utf8_titles_and_prefixes_when_allowed() -> None:
    run = start(vm_name="work", allow_utf8_titles=True, prefix_titles=True)
    run.send(1, gm.Create(0, 0, 8, 8))
    title = "café ✓ \U0001f600 \U00100000".encode()
    assert run.send(1, gm.WmName(title)) == [
        dm.SetName(1, "[work] café ✓ \U0001f600 ".encode() + b"____")]
    assert run.send(1, gm.WmName(b"\xc0\xafx\xed\xa0\x80")) == [dm.SetName(1, b"[work] __x___")]


def test_size_hints_pass_only_sane_pairs() -> None:
    run = start()
    run.send(1, gm.Create(0, 0, 8, 8))
    hints = gm.WindowHints(gm.HINT_P_MIN_SIZE | gm.HINT_P_MAX_SIZE | gm.HINT_P_RESIZE_INC
                           | gm.HINT_P_BASE_SIZE | gm.HINT_P_POSITION | (1 << 3),
                           min_width=10, min_height=20, max_width=0, max_height=50,
                           width_inc=16384, height_inc=1, base_width=3, base_height=4)
    assert run.send(1, hints) == [dm.SetSizeHints(1, dm.SizeHints(
        gm.HINT_P_MIN_SIZE | gm.HINT_P_BASE_SIZE | gm.HINT_P_POSITION, min_width=10,
        min_height=20, base_width=3, base_height=4))]


def test_window_flags_before_and_after_mapping() -> None:
    run = start()
    run.send(1, gm.Create(0, 0, 8, 8))
    assert run.send(1, gm.WindowFlags(gm.WINDOW_FLAG_FULLSCREEN
                                      | gm.WINDOW_FLAG_DEMANDS_ATTENTION, 0)) == [
        dm.SetWmState(1, (dm.STATE_MAXIMIZED_VERT, dm.STATE_MAXIMIZED_HORZ,
                          dm.STATE_DEMANDS_ATTENTION))]
    run.send(1, gm.Map(0, 0))
    assert run.send(1, gm.WindowFlags(0, gm.WINDOW_FLAG_FULLSCREEN)) == [
        dm.RequestWmState(1, False, dm.STATE_MAXIMIZED_VERT, dm.STATE_MAXIMIZED_HORZ)]
    # minimizing takes precedence: the fullscreen request becomes "leave fullscreen"
    assert run.send(1, gm.WindowFlags(gm.WINDOW_FLAG_MINIMIZE | gm.WINDOW_FLAG_FULLSCREEN,
                                      0)) == [
        dm.RequestWmState(1, False, dm.STATE_FULLSCREEN), dm.Iconify(1)]
    assert run.send(1, gm.WindowFlags(0, 0)) == []


def test_cursor_transient_for_and_dock() -> None:
    run = start()
    shown(run, 1)
    run.send(2, gm.Create(0, 0, 8, 8, 0, 1))
    assert run.send(2, gm.Cursor(gm.CURSOR_X11 + 68)) == [dm.SetCursor(2, 68)]
    assert run.send(2, gm.Cursor(gm.CURSOR_DEFAULT)) == [dm.SetCursor(2, None)]
    mapped = run.send(2, gm.Map(1, 0))
    assert mapped[0] == dm.SetTransientFor(2, 1)
    run.send(1, gm.Destroy())
    window = run.daemon.window(2)
    assert window is not None and window.transient_for is None
    run.send(3, gm.Create(0, 0, 8, 8, 0, 1))
    assert run.send(3, gm.Dock()) == [dm.SetOverrideRedirect(3, False, False)]
    assert run.send(3, gm.Map(0, 0)) == []  # a docked window is not mapped by MAP


def test_configure_from_the_agent_and_the_handshake_of_configures() -> None:
    run = start()
    shown(run, 1, x=10, y=10, w=100, h=50)
    assert run.send(1, gm.Configure(20, 30, 200, 60)) == [
        dm.MoveResize(1, dm.Rect(20, 30, 200, 60))]
    assert run.send(1, gm.Configure(20, 30, 200, 60)) == []  # nothing changed
    # Our own requests carried out by X are not news for the agent.
    assert run.daemon.configured(1, dm.Rect(20, 30, 200, 60), 0.0) == []
    # Someone else (a window manager, a user) moved it: the agent hears once.
    told = run.daemon.configured(1, dm.Rect(50, 60, 200, 60), 0.0)
    assert [(m.type, m.body) for m in run.sent(told)] == [
        (gm.MsgType.CONFIGURE, gm.Configure(50, 60, 200, 60, 0))]
    assert run.sent(run.daemon.configured(1, dm.Rect(51, 60, 200, 60), 0.0)) == []
    # Until the agent answers with that geometry, other ones are answered with ours.
    assert run.sent(run.send(1, gm.Configure(0, 0, 10, 10))) == [
        gm.Message.of(1, gm.Configure(51, 60, 200, 60, 0))]
    assert run.send(1, gm.Configure(51, 60, 200, 60)) == []
    assert run.send(1, gm.Configure(0, 0, 10, 10)) == [dm.MoveResize(1, dm.Rect(0, 0, 10, 10))]


def test_configure_that_grows_a_popup_too_much_drops_its_override_redirect() -> None:
    run = start()
    shown(run, 1, w=100, h=50, override_redirect=1)
    actions = run.send(1, gm.Configure(0, 0, 1288, 1024))
    assert actions == [dm.MoveResize(1, dm.Rect(0, 0, 1288, 1024)),
                       dm.SetOverrideRedirect(1, False, True)]


# -- a property: any sequence of windows and dumps ------------------------------------------------

STEPS = st.lists(st.tuples(st.sampled_from(["create", "create", "map", "dump", "dump", "dump",
                                            "unmap", "destroy", "image", "tick"]),
                           st.integers(1, 3)), max_size=60)


@pytest.mark.parametrize("hold", [0.0, 0.5])
@pytest.mark.parametrize("minor", [4, 6, 7, 8])
@settings(max_examples=150, deadline=None)
@given(steps=STEPS)
def test_every_dump_is_acked_once_in_order_and_unmapped_before_any_later_ack(
        steps: list[tuple[str, int]], minor: int, hold: float) -> None:
    run = start(V(1, minor), hold=hold)
    live: set[int] = set()
    dump_windows: list[int] = []
    for step, (what, window) in enumerate(steps):
        run.now = step * 0.25
        if what == "tick":
            run.tick()
            continue
        if what == "create" and window not in live:
            run.send(window, gm.Create(window * 20, 0, 16, 16, 0, window == 3))
            live.add(window)
        elif window not in live:
            continue
        elif what == "map":
            run.send(window, gm.Map(0, window == 3))
        elif what == "dump":
            run.send(window, dump_body())
            dump_windows.append(window)
        elif what == "unmap":
            run.send(window, gm.Unmap())
        elif what == "destroy":
            run.send(window, gm.Destroy())
            live.discard(window)
        elif what == "image":
            run.send(window, gm.ShmImage(0, 0, 16, 16))
    assert of(dm.Exit, run.actions) == []
    run.now = len(steps) * 0.25 + hold + 1  # whatever a hold kept back is written
    run.tick()
    run.actions += run.daemon.hang_up()

    maps = [a.dump for a in of(dm.MapDump, run.actions)]
    unmaps = [a.dump for a in of(dm.Unmap, run.actions)]
    assert sorted(unmaps) == sorted(maps) and len(set(unmaps)) == len(unmaps)
    acks = [m.window for m in run.sent(run.actions) if m.type == gm.MsgType.WINDOW_DUMP_ACK]
    assert acks == (dump_windows if minor >= 7 else [])
    # A dump let go before another dump's processing is unmapped before that dump's ACK
    # is written (with no hold), and every Put reads a dump that is still mapped.
    mapped: set[int] = set()
    let_go: set[int] = set()
    for action in run.actions:
        if isinstance(action, dm.MapDump):
            mapped.add(action.dump)
        elif isinstance(action, dm.Detach):
            let_go.add(action.dump)
        elif isinstance(action, dm.Unmap):
            assert action.dump in let_go
            mapped.discard(action.dump)
        elif isinstance(action, dm.Put):
            assert action.dump in mapped and action.dump not in let_go
        elif isinstance(action, dm.Send) and hold == 0 and _type(action) == ACK:
            assert mapped & let_go == set()


ACK = gm.MsgType.WINDOW_DUMP_ACK


def _type(send: dm.Send) -> int | None:
    """The message type of a Send after the handshake (each is one whole message)."""
    return int.from_bytes(send.data[:4], "little") if len(send.data) >= 12 else None


# -- input: what the daemon sends for each X event (process_xevent_*) ----------------------------

KEYMAP = bytes(range(32))
C_KEY, V_KEY = 54, 55  # XKeysymToKeycode(XK_c), (XK_v) on a us keyboard
CTRL_SHIFT = ev.CONTROL_MASK | ev.SHIFT_MASK


def header(mtype: int, window: int, body: bytes) -> bytes:
    """A message as the daemon writes it, packed here field by field (not by the codec)."""
    return struct.pack("<III", mtype, window, len(body)) + body


def wire(actions: Sequence[dm.Action]) -> bytes:
    return b"".join(a.data for a in of(dm.Send, actions))


def typing() -> Run:
    run = start()
    shown(run, 7, x=100, y=50, w=200, h=100)
    run.daemon.keyboard_mapped(C_KEY, V_KEY)
    return run


def test_keys_are_sent_with_the_x_events_fields() -> None:
    run = typing()
    press = run.daemon.x_input(ev.Key(7, ev.KEY_PRESS, 12, -3, 0x11, 38, 5000), 0.0)
    assert press == [dm.SetUserTime(7, 5000),
                     dm.Send(header(124, 7, struct.pack("<IiiII", 2, 12, -3, 0x11, 38)))]
    release = run.daemon.x_input(ev.Key(7, ev.KEY_RELEASE, 12, 4, 1, 38, 5001), 0.0)
    assert wire(release) == header(124, 7, struct.pack("<IiiII", 3, 12, 4, 1, 38))
    # No filter: the same press twice (X's auto-repeat) is sent twice.
    again = [run.daemon.x_input(ev.Key(7, ev.KEY_PRESS, 0, 0, 0, 38, t), 0.0) for t in (1, 2)]
    assert [wire(a) for a in again] == [header(124, 7, struct.pack("<IiiII", 2, 0, 0, 0, 38))] * 2


def test_buttons_motion_and_close() -> None:
    run = typing()
    assert run.daemon.x_input(ev.Button(7, ev.BUTTON_PRESS, 5, 6, 0x10, 3, 77), 0.0) == [
        dm.SetUserTime(7, 77), dm.Send(header(125, 7, struct.pack("<IiiII", 4, 5, 6, 0x10, 3)))]
    assert wire(run.daemon.x_input(ev.Button(7, ev.BUTTON_RELEASE, -5, 6, 0x410, 3, 78),
                                   0.0)) == header(125, 7, struct.pack("<IiiII", 5, -5, 6,
                                                                        0x410, 3))
    assert run.daemon.x_input(ev.Motion(7, 199, 99, 0x100, 0), 0.0) == [
        dm.Send(header(126, 7, struct.pack("<iiII", 199, 99, 0x100, 0)))]
    assert run.daemon.x_input(ev.DeleteRequest(7), 0.0) == [dm.Send(header(137, 7, b""))]


def test_an_enter_first_says_which_keys_are_down_a_leave_does_not() -> None:
    run = typing()
    enter = run.daemon.x_input(ev.Crossing(7, ev.ENTER_NOTIFY, 1, 2, 0, 0, 3, 1, KEYMAP), 0.0)
    assert wire(enter) == (header(142, 0, KEYMAP)
                           + header(127, 7, struct.pack("<IiiIIII", 7, 1, 2, 0, 0, 3, 1)))
    leave = run.daemon.x_input(ev.Crossing(7, ev.LEAVE_NOTIFY, -1, 2, 4, 1, 0, 0, KEYMAP), 0.0)
    assert wire(leave) == header(127, 7, struct.pack("<IiiIIII", 8, -1, 2, 4, 1, 0, 0))
    assert [m.type for m in run.sent(enter + leave)] == [
        gm.MsgType.KEYMAP_NOTIFY, gm.MsgType.CROSSING, gm.MsgType.CROSSING]


@pytest.mark.parametrize(("mode", "sent"), [(ev.NOTIFY_NORMAL, True), (ev.NOTIFY_GRAB, False),
                                            (ev.NOTIFY_UNGRAB, False),
                                            (ev.NOTIFY_WHILE_GRABBED, True)])
def test_focus_changes_but_not_grabs_are_sent_as_normal(mode: int, sent: bool) -> None:
    run = typing()
    focus_in = run.daemon.x_input(ev.Focus(7, ev.FOCUS_IN, mode, 3, KEYMAP), 0.0)
    focus_out = run.daemon.x_input(ev.Focus(7, ev.FOCUS_OUT, mode, 4, KEYMAP), 0.0)
    if not sent:
        assert focus_in == focus_out == []
        return
    assert wire(focus_in) == header(142, 0, KEYMAP) + header(128, 7, struct.pack("<III",
                                                                               9, 0, 3))
    assert wire(focus_out) == header(128, 7, struct.pack("<III", 10, 0, 4))


def test_input_of_windows_not_the_daemons_is_dropped() -> None:
    run = typing()
    assert run.daemon.x_input(ev.Key(8, ev.KEY_PRESS, 0, 0, 0, 38, 1), 0.0) == []
    assert run.daemon.x_input(ev.Motion(8, 0, 0, 0, 0), 0.0) == []
    run.send(7, gm.Destroy())
    assert run.daemon.x_input(ev.DeleteRequest(7), 0.0) == []


def test_input_waits_behind_a_delayed_ack() -> None:
    run = start(ack_delay=0.5)
    shown(run, 1)
    run.send(1, dump_body())
    assert run.sent(run.daemon.x_input(ev.Motion(1, 3, 4, 0, 0), 0.1)) == []
    run.now = 0.5
    assert [m.type for m in run.sent(run.tick())] == [gm.MsgType.WINDOW_DUMP_ACK,
                                                      gm.MsgType.MOTION]


def test_wm_state_changes_become_window_flags() -> None:
    run = typing()
    states = dm.STATE_FULLSCREEN, dm.STATE_DEMANDS_ATTENTION
    assert wire(run.daemon.x_input(ev.WmStateChanged(7, states), 0.0)) == header(
        145, 7, struct.pack("<II", 3, 0))
    assert run.daemon.x_input(ev.WmStateChanged(7, states), 0.0) == []  # no change
    assert wire(run.daemon.x_input(ev.WmStateChanged(7, (dm.STATE_HIDDEN, "_NET_WM_STATE_X")),
                                   0.0)) == header(145, 7, struct.pack("<II", 4, 3))
    assert wire(run.daemon.x_input(ev.WmStateChanged(7, None), 0.0)) == header(
        145, 7, struct.pack("<II", 0, 4))
    run.send(2, gm.Create(0, 0, 8, 8))  # not mapped: not told
    assert run.daemon.x_input(ev.WmStateChanged(2, states), 0.0) == []


def test_a_maximize_asked_for_a_fullscreen_is_told_as_fullscreen() -> None:
    run = typing()
    run.send(7, gm.WindowFlags(gm.WINDOW_FLAG_FULLSCREEN, 0))  # without allow_fullscreen
    both = (dm.STATE_MAXIMIZED_VERT, dm.STATE_MAXIMIZED_HORZ)
    assert run.sent(run.daemon.x_input(ev.WmStateChanged(7, both), 0.0)) == [
        gm.Message.of(7, gm.WindowFlags(gm.WINDOW_FLAG_FULLSCREEN, 0))]
    # one of the two gone: out of the emulated fullscreen, and it stays out
    assert run.sent(run.daemon.x_input(ev.WmStateChanged(7, both[:1]), 0.0)) == [
        gm.Message.of(7, gm.WindowFlags(0, gm.WINDOW_FLAG_FULLSCREEN))]
    assert run.daemon.x_input(ev.WmStateChanged(7, both), 0.0) == []


def test_a_window_someone_else_maps_is_told_or_unmapped_again() -> None:
    run = start()
    run.send(3, gm.Create(0, 0, 8, 8))
    assert wire(run.daemon.x_input(ev.MapNotified(3, True, True), 0.0)) == header(
        132, 3, struct.pack("<II", 0, 1))
    assert run.daemon.x_input(ev.MapNotified(3, False, False), 0.0) == [dm.UnmapWindow(3)]
    run.send(3, gm.Map(0, 0))
    assert run.daemon.x_input(ev.MapNotified(3, False, True), 0.0) == []  # its own map


# -- the clipboard keys -------------------------------------------------------------------------


def test_ctrl_shift_c_asks_the_agent_and_neither_key_event_is_forwarded() -> None:
    run = typing()
    shift = run.daemon.x_input(ev.Key(7, ev.KEY_PRESS, 1, 1, ev.CONTROL_MASK, 50, 10), 0.0)
    assert [m.body for m in run.sent(shift)] == [gm.Keypress(2, 1, 1, ev.CONTROL_MASK, 50)]
    # Num Lock (Mod2) and Caps Lock do not count; the release is swallowed too.
    copy = run.daemon.x_input(ev.Key(7, ev.KEY_PRESS, 1, 1,
                                     CTRL_SHIFT | ev.MOD2_MASK | ev.LOCK_MASK, C_KEY, 11), 0.0)
    assert copy == [dm.SetUserTime(7, 11), dm.Send(header(139, 7, b""))]
    assert run.daemon.x_input(ev.Key(7, ev.KEY_RELEASE, 1, 1, CTRL_SHIFT, C_KEY, 12), 0.0) == [
        dm.SetUserTime(7, 12)]
    # With Alt as well it is an ordinary key.
    alt = run.daemon.x_input(ev.Key(7, ev.KEY_PRESS, 1, 1, CTRL_SHIFT | ev.MOD1_MASK, C_KEY,
                                    13), 0.0)
    assert [m.type for m in run.sent(alt)] == [gm.MsgType.KEYPRESS]


def test_the_agents_clipboard_data_is_kept_only_when_asked_for() -> None:
    run = typing()
    assert run.send(7, gm.ClipboardData(b"unasked")) == []
    run.daemon.x_input(ev.Key(7, ev.KEY_PRESS, 0, 0, CTRL_SHIFT, C_KEY, 4242), 0.0)
    stored = run.send(7, gm.ClipboardData(b"text"))
    assert stored == [dm.ClipboardStore(b"text", Metadata(
        vmname="vm", xevent_timestamp=4242, copy_action=True, sent_size=4,
        buffer_size=gm.DEFAULT_CLIPBOARD_BUFFER_SIZE, protocol_version_xside=gm.VERSION,
        protocol_version_vmside=gm.VERSION))]
    run.daemon.clipboard_stored()
    assert run.send(7, gm.ClipboardData(b"again")) == []


def test_empty_or_too_long_clipboard_data_empties_the_clipboard() -> None:
    run = typing()
    run.daemon.x_input(ev.Key(7, ev.KEY_PRESS, 0, 0, CTRL_SHIFT, C_KEY, 9), 0.0)
    [empty] = run.send(7, gm.ClipboardData(b""))
    assert isinstance(empty, dm.ClipboardClear)
    assert (empty.metadata.successful, empty.metadata.copy_action) == (True, True)
    [long] = run.send(7, gm.ClipboardData(b"x" * (gm.DEFAULT_CLIPBOARD_BUFFER_SIZE + 1)))
    assert isinstance(long, dm.ClipboardClear)
    assert (long.metadata.successful, long.metadata.oversized_request) == (False, True)
    assert long.metadata.sent_size == gm.DEFAULT_CLIPBOARD_BUFFER_SIZE + 1


def test_ctrl_shift_v_pastes_what_the_clipboard_gives() -> None:
    run = typing()
    [paste] = [a for a in run.daemon.x_input(ev.Key(7, ev.KEY_PRESS, 0, 0, CTRL_SHIFT, V_KEY,
                                                    300), 0.0)
               if not isinstance(a, dm.SetUserTime)]
    assert isinstance(paste, dm.ClipboardPaste)
    assert (paste.window, paste.time, paste.metadata.paste_action) == (7, 300, True)
    assert run.daemon.x_input(ev.Key(7, ev.KEY_RELEASE, 0, 0, CTRL_SHIFT, V_KEY, 301), 0.0) == [
        dm.SetUserTime(7, 301)]
    assert run.daemon.clipboard_paste(7, b"hello", 0.0) == [
        dm.Send(header(140, 7, b"hello"))]
    assert run.daemon.clipboard_paste(7, b"", 0.0) == []  # nothing to paste: nothing sent


def test_odd_cursor_glyphs_are_the_default_cursor() -> None:
    run = typing()
    assert run.send(7, gm.Cursor(gm.CURSOR_X11 + 152)) == [dm.SetCursor(7, 152)]
    assert run.send(7, gm.Cursor(gm.CURSOR_X11 + 69)) == [dm.SetCursor(7, None)]
