"""The compiled fast path (``qubesshm.relay._fastpath``) against the pure-Python one.

Two copies of one world (object map and id tables) are fed the same random byte
streams, one through each fast path: valid messages drawn from the world's state,
misnamed ids (zombies, unknown, the proxy's own, wrong interfaces), reused and
skipping new ids, ``delete_id`` of anything, bad sizes and opcodes, garbage and cut
messages, with id spaces that diverge as the proxy makes objects of its own. After
every call the two must have returned the same offset (or raised the same error),
produced the same bytes and left the same tables, down to the free heap.

The compiled core must be built (``pip install -e .`` builds it): these tests fail
rather than skip without it, and so does the one that checks ``serve`` runs it.
"""

from __future__ import annotations

import copy
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Protocol, TypeVar, cast

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from messages import PROTO, TAIL_BREAKS, break_tail
from procs import start_proxy

import qubesshm.relay
from qubesshm.headless import HeadlessWeston
from qubesshm.objects.idmap import UpstreamIds
from qubesshm.objects.objectmap import DISPLAY_ID, SERVER_ID_MIN, ObjectMap
from qubesshm.relay import _fastpath, fastpath
from qubesshm.relay.fastpath import PURE_PYTHON_VARIABLE, FastPath, Relay, select_fast_path
from qubesshm.relay.session import Outbox
from qubesshm.wire.codec import HEADER, ArgValue, Fixed, encode_message
from qubesshm.wire.protocol import ArgKind, MessageSpec

T = TypeVar("T")


class Draw(Protocol):
    """``data.draw`` of hypothesis's ``st.data()``."""

    def __call__(self, strategy: st.SearchStrategy[T], label: object = None) -> T: ...


REGISTRY, COMPOSITOR, SUBCOMPOSITOR, SEAT, DEVICE_MANAGER, OUTPUT = 2, 3, 4, 5, 6, 7
BOUND = {REGISTRY: "wl_registry", COMPOSITOR: "wl_compositor",
         SUBCOMPOSITOR: "wl_subcompositor", SEAT: "wl_seat",
         DEVICE_MANAGER: "wl_data_device_manager", OUTPUT: "wl_output"}
FIRST_FREE = 8


def spec(interface: str, name: str, *, event: bool = False) -> MessageSpec:
    messages = PROTO[interface].events if event else PROTO[interface].requests
    return next(m for m in messages if m.name == name)


# What a stream is made of: (interface of the target, message), requests then events.
REQUESTS = [spec(i, n) for i, n in [
    ("wl_display", "sync"), ("wl_compositor", "create_surface"),
    ("wl_compositor", "create_region"), ("wl_surface", "frame"), ("wl_surface", "destroy"),
    ("wl_surface", "commit"), ("wl_surface", "set_opaque_region"),
    ("wl_surface", "set_input_region"), ("wl_surface", "attach"), ("wl_region", "add"),
    ("wl_region", "destroy"), ("wl_subcompositor", "get_subsurface"),
    ("wl_subsurface", "place_above"), ("wl_subsurface", "set_position"),
    ("wl_subsurface", "destroy"), ("wl_data_device_manager", "get_data_device"),
    ("wl_data_device", "release"), ("wl_seat", "get_pointer"), ("wl_pointer", "release"),
    ("wl_output", "release"), ("wl_data_device", "set_selection"),
    # strings and arrays after the words
    ("wl_data_device_manager", "create_data_source"), ("wl_data_source", "offer"),
    ("wl_data_offer", "accept"), ("wl_seat", "get_keyboard"),
]]
EVENTS = [spec(i, n, event=True) for i, n in [
    ("wl_callback", "done"), ("wl_display", "delete_id"), ("wl_display", "error"),
    ("wl_surface", "enter"), ("wl_surface", "leave"), ("wl_data_device", "data_offer"),
    ("wl_data_device", "enter"), ("wl_data_device", "motion"), ("wl_data_device", "leave"),
    ("wl_data_device", "drop"), ("wl_data_device", "selection"), ("wl_data_offer", "offer"),
    ("wl_pointer", "motion"), ("wl_pointer", "enter"), ("wl_pointer", "frame"),
    ("wl_seat", "capabilities"), ("wl_output", "done"),
    # strings and arrays after the words (and geometry's int after its strings)
    ("wl_seat", "name"), ("wl_keyboard", "enter"), ("wl_data_source", "target"),
    ("wl_output", "geometry"),
]]


class World:
    """One copy of the tables the fast path works on, and one fast path on them."""

    def __init__(self, factory: Callable[..., Relay], refuse_skipped_ids: bool,
                 intercepting: bool, max_message_size: int,
                 versions: dict[int, int]) -> None:
        self.objects = ObjectMap(PROTO["wl_display"], refuse_skipped_ids=refuse_skipped_ids)
        self.ids = UpstreamIds()
        for object_id, interface in BOUND.items():
            self.objects.create_by_client(object_id, PROTO[interface], versions[object_id])
            self.ids.add_client_object(object_id)
        self.fast = factory(PROTO, self.objects, self.ids, intercepting=intercepting,
                            max_message_size=max_message_size)
        self.intercepting, self.max_message_size = intercepting, max_message_size
        self.owners = 0

    def copy(self) -> World:
        """The same tables (the protocol's specs shared), with the Python fast path."""
        copied = object.__new__(World)
        memo = {id(spec): spec for spec in PROTO.interfaces.values()}
        copied.objects, copied.ids = copy.deepcopy((self.objects, self.ids), memo)
        copied.fast = FastPath(PROTO, copied.objects, copied.ids,
                               intercepting=self.intercepting,
                               max_message_size=self.max_message_size)
        copied.owners = self.owners
        copied.intercepting, copied.max_message_size = self.intercepting, self.max_message_size
        return copied

    def state(self) -> tuple[object, ...]:
        ids = self.ids
        return ({i: (type(o).__name__, o.id, o.interface.name, o.version, o.alive)
                 for i, o in self.objects.entries.items()},
                self.objects._client_next,
                {u: (type(s).__name__, s.client_id, s.owner, s.destroyed)
                 for u, s in ids.slots.items()},
                dict(ids.upstream_ids), sorted(ids._free), sorted(ids._free_set), ids._next,
                ids._diverged, ids._client_highest)

    def relay(self, requests: bool, buf: bytes, pos: int) -> tuple[object, ...]:
        out = Outbox()
        try:
            reached: object = (self.fast.requests if requests else self.fast.events)(
                buf, pos, out)
        except Exception as exc:  # the same error from both, or a failure
            reached = (type(exc).__name__, str(exc))
        return reached, out.take()

    # What the rest of the proxy does between reads, applied to both worlds alike.
    def own_object(self) -> None:
        self.owners += 1
        self.ids.add_own_object(f"own {self.owners}")

    def retire_own(self, upstream: int) -> None:
        self.ids.destroyed(upstream)
        self.ids.delete_id(upstream)


def ids_to_draw(world: World) -> list[int]:
    """Ids a stream may name: every one the tables know, fresh ones, odd ones."""
    known = set(world.objects.entries) | set(world.ids.slots) | set(world.ids.upstream_ids)
    top = max(i for i in known if i < SERVER_ID_MIN)
    server = [i for i in known if i >= SERVER_ID_MIN]
    fresh_server = max(server, default=SERVER_ID_MIN - 1) + 1
    return sorted(known | {top + 1, top + 2, top + 5000, 0, DISPLAY_ID, 0x00F00000,
                           0xFEFFFFFF, fresh_server, fresh_server + 1, 0xFFFFFFFF})


def live_ids(world: World, requests: bool, interface: str | None) -> list[int]:
    """Live objects (of ``interface``, if any), as the receiver of the stream names them."""
    found = [i for i, o in world.objects.entries.items()
             if o.alive and (interface is None or o.interface.name == interface)]
    if requests:
        return found
    return [u for u in (world.ids.upstream(i) for i in found) if u is not None]


def fresh_id(world: World, requests: bool) -> int:
    entries = world.objects.entries
    if not requests:
        return max((i for i in entries if i >= SERVER_ID_MIN), default=SERVER_ID_MIN - 1) + 1
    return next(i for i in range(FIRST_FREE, 2**20)
                if i not in entries and i not in world.ids.upstream_ids)


def draw_message(draw: Draw, world: World, requests: bool) -> bytes:
    """A message for ``world`` as it is: mostly one it can take, else one of its
    arguments or ids named at random from every id it knows and some it does not."""
    ids = ids_to_draw(world)
    if draw(st.integers(0, 29)) == 0:  # garbage: any header, any size, any body
        words = draw(st.lists(st.integers(0, 2**32 - 1), max_size=5))
        size = draw(st.sampled_from([8 + 4 * len(words), 0, 4, 6, 9, 12, 20, 9000, 65535]))
        head = HEADER.pack(draw(st.sampled_from(ids)), size << 16 | draw(st.integers(0, 9)))
        return head + b"".join(w.to_bytes(4, "little") for w in words)

    def pick(likely: list[int]) -> int:
        sane: int = draw(st.integers(0, 11))
        if likely and sane:
            return draw(st.sampled_from(likely))
        return draw(st.sampled_from(ids))

    messages = REQUESTS if requests else EVENTS
    # Mostly a message to an object there is (delete_id only while an id awaits it).
    usable = [m for m in messages if live_ids(world, requests, m.interface)
              and (m is not EVENTS[1] or world.ids.awaiting_delete())]
    if not usable or not draw(st.integers(0, 7)):
        usable = messages
    message = draw(st.sampled_from(usable))
    target = pick(live_ids(world, requests, message.interface))
    if not requests and message is EVENTS[1]:  # delete_id: of an id that awaits it
        target = DISPLAY_ID
        waiting = sorted(world.ids.awaiting_delete())
        deleted = pick(waiting)
        return encode_message(target, message, [deleted])[0]
    args: list[ArgValue] = []
    for arg in message.args:
        kind = arg.kind
        if kind is ArgKind.OBJECT and arg.nullable and not draw(st.integers(0, 2)):
            args.append(None)
        elif kind is ArgKind.OBJECT:
            args.append(pick(live_ids(world, requests, arg.interface)))
        elif kind is ArgKind.NEW_ID:
            args.append(pick([fresh_id(world, requests)]))
        elif kind is ArgKind.INT:
            args.append(draw(st.integers(-(2**31), 2**31 - 1)))
        elif kind is ArgKind.FIXED:
            args.append(Fixed(draw(st.integers(-(2**31), 2**31 - 1))))
        elif kind is ArgKind.UINT:
            args.append(draw(st.integers(0, 2**32 - 1)))
        elif kind is ArgKind.STRING:
            text = draw(st.sampled_from(["text", "abc", "abcdef", "é", ""]))
            args.append(text or (None if arg.nullable else "y"))
        else:
            args.append(draw(st.binary(max_size=9)))
    data, _ = encode_message(target, message, args)
    twist = draw(st.integers(0, 29))
    if twist == 0:  # a wrong size in the header
        size = draw(st.sampled_from([len(data) - 4, len(data) + 4, 4, 10]))
        data = HEADER.pack(target, (size & 0xFFFF) << 16 | message.opcode) + data[8:]
    elif twist == 1:  # an opcode out of range or of another message
        data = HEADER.pack(target, len(data) << 16 | draw(st.integers(0, 12))) + data[8:]
    elif any(a.kind in (ArgKind.STRING, ArgKind.ARRAY) for a in message.args) and twist < 10:
        # a spoilt string or array, or non-zero padding
        data = break_tail(message, data, draw(st.sampled_from(TAIL_BREAKS))) or data
    return data


def draw_stream(draw: Draw, world: World, requests: bool) -> bytes:
    """Messages drawn one by one from a copy of ``world`` that takes each in turn, so
    that later ones build on earlier ones (a new object, then a request on it); after
    the first the copy refuses, a few more at most."""
    scout = world.copy()
    stream = []
    for _ in range(draw(st.integers(1, 12), label="messages")):
        data = draw_message(draw, scout, requests)
        stream.append(data)
        reached, _ = scout.relay(requests, data, 0)
        if reached != len(data):
            stream += [draw_message(draw, scout, requests)
                       for _ in range(draw(st.integers(0, 2)))]
            break
    return b"".join(stream)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_compiled_and_python_fast_paths_agree(data: st.DataObject) -> None:
    draw = data.draw
    setup = dict(refuse_skipped_ids=draw(st.booleans(), label="refuse skipped ids"),
                 intercepting=draw(st.booleans(), label="intercepting"),
                 max_message_size=draw(st.sampled_from([4096] * 6 + [24, 16]), label="max size"),
                 versions={i: draw(st.integers(1, PROTO[n].version)) for i, n in BOUND.items()})
    compiled = World(_fastpath.FastPath, **setup)  # type: ignore[arg-type]
    python = World(FastPath, **setup)  # type: ignore[arg-type]
    worlds = (compiled, python)
    assert compiled.state() == python.state()
    for _ in range(draw(st.integers(1, 25), label="reads")):
        action = draw(st.integers(0, 9), label="action")
        if action == 0:  # the proxy makes an object of its own: the id spaces diverge
            for w in worlds:
                w.own_object()
        elif action == 1:
            own = sorted(u for u, c in python.ids.in_use().items()
                         if c is None and u not in python.ids.awaiting_delete())
            if own:
                upstream = draw(st.sampled_from(own))
                for w in worlds:
                    w.retire_own(upstream)
        elif action == 2:  # the client made an object the compositor never sees
            local = draw(st.integers(FIRST_FREE, FIRST_FREE + 40))
            for w in worlds:
                w.ids.add_local(local)
        requests = draw(st.booleans(), label="requests")
        stream = draw_stream(draw, python, requests)
        cut = draw(st.integers(0, len(stream)), label="cut")
        if draw(st.booleans()):
            stream = stream[:cut]  # ends inside a message
        lead = draw(st.binary(max_size=12), label="bytes before pos")
        buf = lead + stream
        # The session passes bytes; the core takes any buffer.
        passed = cast(bytes, bytearray(buf)) if draw(st.booleans()) else buf
        results = [w.relay(requests, passed, len(lead)) for w in worlds]
        assert results[0] == results[1]
        assert compiled.state() == python.state()


def test_offset_past_the_end_and_empty_buffers() -> None:
    for factory in (_fastpath.FastPath, FastPath):
        world = World(factory, True, True, 4096, dict.fromkeys(BOUND, 1))
        for buf, pos in ((b"", 0), (b"\1\0\0\0", 0), (b"\0" * 7, 3), (b"x" * 4, 9)):
            assert world.relay(True, buf, pos) == (pos, [])
            assert world.relay(False, buf, pos) == (pos, [])


@pytest.mark.parametrize("factory", [_fastpath.FastPath, FastPath],
                         ids=["compiled", "python"])
def test_strings_and_arrays_are_relayed_unless_spoilt(factory: Callable[..., Relay]) -> None:
    """A title-like string and a keys-like array go through the fast path whole, with a
    renumbered sender; each way of spoiling them stops it at that message, for the full
    path to refuse it (or, for padding that is not zeros, to re-encode it)."""
    name, enter = spec("wl_seat", "name", event=True), spec("wl_keyboard", "enter", event=True)
    get_keyboard = spec("wl_seat", "get_keyboard")
    surface, keyboard = FIRST_FREE, FIRST_FREE + 1
    world = World(factory, True, False, 4096, {i: PROTO[n].version for i, n in BOUND.items()})
    world.own_object()  # the id spaces differ: every event gets a new header
    made = (encode_message(COMPOSITOR, spec("wl_compositor", "create_surface"), [surface])[0]
            + encode_message(SEAT, get_keyboard, [keyboard])[0])
    assert world.relay(True, made, 0)[0] == len(made)
    seat_up, surface_up, keyboard_up = (world.ids.upstream(i) or 0
                                        for i in (SEAT, surface, keyboard))
    assert 0 not in (seat_up, surface_up, keyboard_up) and keyboard_up != keyboard
    keys = b"\1\0\0\0\2"
    good = [(name, encode_message(seat_up, name, ["seat0"])[0],
             encode_message(SEAT, name, ["seat0"])[0]),
            (enter, encode_message(keyboard_up, enter, [5, surface_up, keys])[0],
             encode_message(keyboard, enter, [5, surface, keys])[0])]
    for spec_, message, relayed in good:
        assert world.relay(False, message, 0) == (len(message), [(relayed, [])])
        for how in TAIL_BREAKS:
            spoilt = break_tail(spec_, message, how)
            if spoilt is not None:
                assert world.relay(False, spoilt, 0) == (0, []), how


def test_burst_of_syncs_in_one_read() -> None:
    """What the relay benchmark sends: syncs, their callbacks' done and delete_id."""
    sync, done = spec("wl_display", "sync"), spec("wl_callback", "done", event=True)
    delete_id = spec("wl_display", "delete_id", event=True)
    for diverged in (False, True):
        worlds = [World(f, True, False, 4096, dict.fromkeys(BOUND, 1))
                  for f in (_fastpath.FastPath, FastPath)]
        if diverged:
            for w in worlds:
                w.own_object()
        for round_ in range(3):
            new = range(FIRST_FREE, FIRST_FREE + 300)
            requests = b"".join(encode_message(DISPLAY_ID, sync, [i])[0] for i in new)
            results = [w.relay(True, requests, 0) for w in worlds]
            assert results[0] == results[1] and results[0][0] == len(requests), round_
            upstream = [worlds[1].ids.upstream(i) for i in new]
            events = b"".join(encode_message(u, done, [7])[0]
                              + encode_message(DISPLAY_ID, delete_id, [u])[0]
                              for u in upstream if u is not None)
            results = [w.relay(False, events, 0) for w in worlds]
            assert results[0] == results[1] and results[0][0] == len(events)
            assert worlds[0].state() == worlds[1].state()


def test_a_changed_table_class_is_refused_not_misread() -> None:
    """The core reads the dataclasses at their slots' offsets; an object of another
    class in a table hands the rest of the buffer to the Python fast path."""
    world = World(_fastpath.FastPath, True, False, 4096, dict.fromkeys(BOUND, 1))
    reference = World(FastPath, True, False, 4096, dict.fromkeys(BOUND, 1))

    class Odd:
        def __init__(self, obj: object) -> None:
            self.__dict__.update({k: getattr(obj, k) for k in ("id", "interface", "version",
                                                                "alive")})

    for w in (world, reference):
        w.objects.entries[COMPOSITOR] = Odd(w.objects.entries[COMPOSITOR])  # type: ignore[assignment]
    data = (encode_message(DISPLAY_ID, spec("wl_display", "sync"), [FIRST_FREE])[0]
            + encode_message(COMPOSITOR, spec("wl_compositor", "create_surface"),
                             [FIRST_FREE + 1])[0])
    assert world.relay(True, data, 0) == reference.relay(True, data, 0) == (len(data), [
        (data, [])])
    assert world.state() == reference.state()


def test_the_compiled_core_is_selected_unless_pure_python_is_asked_for(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(PURE_PYTHON_VARIABLE, raising=False)
    assert select_fast_path() == (_fastpath.FastPath, "compiled")
    monkeypatch.setenv(PURE_PYTHON_VARIABLE, "1")
    assert select_fast_path() == (FastPath, f"pure Python ({PURE_PYTHON_VARIABLE}=1)")


def test_without_the_compiled_core_the_reason_is_given(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "qubesshm.relay._fastpath", None)
    monkeypatch.delattr(qubesshm.relay, "_fastpath")
    factory, name = fastpath._compiled()
    assert factory is None
    assert name == ("pure Python (the compiled core is not built: import of "
                    "qubesshm.relay._fastpath halted; None in sys.modules)")


# What serve's start line says: the compiled core; pure Python as asked; pure Python
# where the core cannot be imported (hidden here by a sitecustomize), with the reason.
HIDE_CORE = "import sys\nsys.modules['qubesshm.relay._fastpath'] = None\n"
START_LINES = {
    "compiled": "fast path: compiled",
    "pure-python": "fast path: pure Python (QUBESSHM_PURE_PYTHON=1)",
    "not-built": "fast path: pure Python (the compiled core is not built: import of "
                 "qubesshm.relay._fastpath halted; None in sys.modules)",
}


@pytest.mark.parametrize("case", list(START_LINES))
def test_serve_says_which_fast_path_it_runs(weston: HeadlessWeston, tmp_path: Path,
                                            case: str) -> None:
    env = {k: v for k, v in weston.env().items() if k != PURE_PYTHON_VARIABLE}
    if case == "pure-python":
        env[PURE_PYTHON_VARIABLE] = "1"
    elif case == "not-built":
        (tmp_path / "sitecustomize.py").write_text(HIDE_CORE)
        env["PYTHONPATH"] = os.pathsep.join(
            [str(tmp_path), *filter(None, [env.get("PYTHONPATH")])])
    proxy = start_proxy(weston, tmp_path / "serve.log", env=env, socket_name=f"qs-{case}")
    try:
        start = next(line for line in proxy.log().splitlines()
                     if line.startswith("qubesshm: listening on "))
        assert f", {START_LINES[case]}, event loop: " in start, start
    finally:
        assert proxy.stop() == 0, proxy.log()
