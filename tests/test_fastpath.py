"""The relay's fast path against its full path: same bytes, fds, errors and state.

Two sessions are fed the same random streams of requests and events, one with the
fast path and one without. The streams are drawn from the session's own state so
that most messages are valid (live objects, fresh ids, the right interfaces) and
then broken at random (dead or wrong objects, reused ids, bad opcodes, sizes and
versions, nulls, garbage), and cut at random points. After every input the two
sessions must have produced the same output and reached the same state. Every test
runs on both fast paths: the compiled core (``qubesshm.relay._fastpath``, which must be
built: it is never skipped) and the pure-Python one (``QUBESSHM_PURE_PYTHON=1``).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from itertools import pairwise
from typing import Protocol, TypeVar

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from messages import PROTO, TAIL_BREAKS, break_tail

from qubesshm.objects.objectmap import DISPLAY_ID, SERVER_ID_MIN
from qubesshm.relay import _fastpath
from qubesshm.relay.fastpath import PURE_PYTHON_VARIABLE, FastPath, select_fast_path
from qubesshm.relay.session import RelaySession, Step
from qubesshm.wire.codec import HEADER, ArgValue, Fixed, UntypedNewId, encode_message
from qubesshm.wire.protocol import Arg, ArgKind, MessageSpec

T = TypeVar("T")


class Draw(Protocol):
    """``data.draw`` of hypothesis's ``st.data()``."""

    def __call__(self, strategy: st.SearchStrategy[T], label: object = None) -> T: ...


FAKE_FD = 10_000  # fds are only carried by the plain relay here, never opened
CORES = {"compiled": _fastpath.FastPath, "pure-python": FastPath}


@pytest.fixture(params=list(CORES), autouse=True)
def core(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> type:
    """Every test here on either fast path, as QUBESSHM_PURE_PYTHON selects it."""
    if request.param == "compiled":
        monkeypatch.delenv(PURE_PYTHON_VARIABLE, raising=False)
    else:
        monkeypatch.setenv(PURE_PYTHON_VARIABLE, "1")
    assert select_fast_path()[0] is CORES[request.param]
    return CORES[request.param]


@contextmanager
def fast_path(enabled: bool) -> Iterator[None]:
    saved = RelaySession.fast_path_enabled
    RelaySession.fast_path_enabled = enabled
    try:
        yield
    finally:
        RelaySession.fast_path_enabled = saved


def session_pair(diverged: bool) -> tuple[RelaySession, RelaySession]:
    """A session with the selected fast path and one without any."""
    pair = []
    for enabled in (True, False):
        with fast_path(enabled):
            session = RelaySession(PROTO)
        if diverged:
            # An object of the proxy's takes upstream id 2, so every client id the
            # client makes from then on is renumbered upstream.
            session.ids.add_own_object("seed")
        pair.append(session)
    selected: object = select_fast_path()[0]
    assert type(pair[0]._fast) is selected and pair[1]._fast is None
    return pair[0], pair[1]


def outcome(step: Step) -> tuple[object, ...]:
    error = step.error
    return (step.to_compositor, step.to_client, step.own_events, step.own_events_wait,
            step.discarded_fds,
            step.client_at_fault,
            None if error is None else (error.message, int(error.code), error.object_id))


def state(session: RelaySession) -> tuple[object, ...]:
    objects = {i: (o.interface.name, o.version, o.alive)
               for i, o in session.objects.entries.items()}
    return (objects, session.ids.in_use(), session.ids.identical(),
            sorted(session.ids.awaiting_delete()), session.request_backlog,
            session.closed)


# -- drawing messages from the session's state ----------------------------------------

INTERFACES = sorted(PROTO.interfaces)
# Bound in every stream's set-up, at versions the stream draws: a world of objects
# whose requests and events are mostly words.
GLOBALS = ["wl_compositor", "wl_subcompositor", "wl_seat", "wl_output", "xdg_wm_base",
           "wp_viewporter", "wl_data_device_manager", "zwp_relative_pointer_manager_v1",
           "zwp_pointer_constraints_v1", "wp_presentation", "zxdg_decoration_manager_v1",
           "wp_fractional_scale_manager_v1", "xdg_activation_v1", "wl_shm"]
REGISTRY = 2


def set_up(draw: Draw | None, sessions: tuple[RelaySession, RelaySession]) -> int:
    """Bind every global of ``GLOBALS`` in both sessions, at versions ``draw`` picks
    (all 1 without it); the next fresh client id."""
    get_registry, _ = encode_message(DISPLAY_ID, PROTO["wl_display"].requests[1], [REGISTRY])
    global_spec, bind_spec = PROTO["wl_registry"].events[0], PROTO["wl_registry"].requests[0]
    binds = b"".join(
        encode_message(REGISTRY, bind_spec, [n, UntypedNewId(
            name, draw(st.integers(1, PROTO[name].version), label=name) if draw else 1,
            REGISTRY + n)])[0]
        for n, name in enumerate(GLOBALS, 1))
    for session in sessions:
        step = session.from_client(get_registry)
        assert step.error is None
        upstream = session.ids.upstream(REGISTRY)
        assert upstream is not None
        announce = b"".join(
            encode_message(upstream, global_spec, [n, name, PROTO[name].version])[0]
            for n, name in enumerate(GLOBALS, 1))
        for step in (session.from_compositor(announce), session.from_client(binds)):
            assert step.error is None, step.error
    return REGISTRY + len(GLOBALS) + 1


def draw_word(draw: Draw, kind: ArgKind) -> int:
    if kind is ArgKind.INT or kind is ArgKind.FIXED:
        return draw(st.integers(-(2**31), 2**31 - 1))
    return draw(st.sampled_from([0, 1, 2, 7, 2**32 - 1]) | st.integers(0, 2**32 - 1))


class World:
    """What a stream may name next, read from the full-path session's state."""

    def __init__(self, session: RelaySession, requests: bool) -> None:
        entries = session.objects.entries
        self.requests = requests
        # Requests name client ids, events upstream ids (server ids are both).
        name = (lambda c: c) if requests else session.ids.upstream
        self.known: list[int] = []  # every id the receiver knows, zombies included
        self.live: dict[str, list[int]] = {}
        self.zombies: list[int] = []
        for client_id, obj in sorted(entries.items()):
            wire_id = name(client_id)
            if wire_id is None:
                continue
            self.known.append(wire_id)
            if obj.alive:
                self.live.setdefault(obj.interface.name, []).append(wire_id)
            else:
                self.zombies.append(wire_id)
        self.waiting_delete = sorted(session.ids.awaiting_delete())
        self.client_id = (lambda wire_id: wire_id) if requests else (
            lambda wire_id: session.ids.client(wire_id) or 0)
        self.own = sorted(u for u, c in session.ids.in_use().items() if c is None)
        self.server_live = [i for ids in self.live.values() for i in ids if i >= SERVER_ID_MIN]

    def misnamed(self, draw: Draw, fresh: int, likely: list[int]) -> int:
        """An id where a valid message has another: often one of ``likely``, else a
        zombie, an object of another interface, one of the proxy's own, a live server
        object, or none at all."""
        odd = [0, 9999, fresh + 3, SERVER_ID_MIN + 50, DISPLAY_ID]
        prefer: bool = draw(st.booleans())
        if likely and prefer:
            return draw(st.sampled_from(likely))
        return draw(st.sampled_from(self.zombies or odd) | st.sampled_from(self.known)
                    | st.sampled_from(self.own or odd) | st.sampled_from(self.server_live or odd)
                    | st.sampled_from(odd))

    def sent(self, target: int, spec: MessageSpec, args: list[ArgValue]) -> None:
        """Follow a valid message drawn into a batch, for the messages after it."""
        if spec.new_id_index is not None:
            created = args[spec.new_id_index]
            interface = spec.args[spec.new_id_index].interface
            assert isinstance(created, int) and interface is not None
            self.known.append(created)
            self.live.setdefault(interface, []).append(created)
        if spec.destructor:
            for ids in self.live.values():
                if target in ids:
                    ids.remove(target)
                    self.zombies.append(target)
            if self.requests:
                self.waiting_delete.append(target)  # not exact upstream, fine for drawing

    def usable(self, spec: MessageSpec, version: int, *, too_new: bool = False) -> bool:
        """Whether a valid ``spec`` (or one newer than the object) can be drawn now."""
        if self.requests and (spec.since > version) != too_new:
            return False
        if any(a.untyped_new_id for a in spec.args):
            return False
        if not self.requests and spec is PROTO["wl_display"].events[1]:
            return bool(self.waiting_delete)
        return all(a.kind is not ArgKind.OBJECT or a.nullable or a.interface is None
                   or bool(self.live.get(a.interface)) for a in spec.args)


def draw_args(draw: Draw, spec: MessageSpec, world: World, fresh: int,
              fds: list[int]) -> list[ArgValue]:
    """Valid arguments for ``spec`` in ``world``."""
    args: list[ArgValue] = []
    for arg in spec.args:
        kind = arg.kind
        if kind is ArgKind.OBJECT:
            fitting = (world.live.get(arg.interface, []) if arg.interface is not None
                       else [i for ids in world.live.values() for i in ids])
            if arg.nullable and (not fitting or draw(st.booleans())):
                args.append(None)
            else:
                args.append(draw(st.sampled_from(fitting)))
        elif kind is ArgKind.NEW_ID:
            args.append(fresh)
        elif kind is ArgKind.STRING:
            text = draw(st.sampled_from(["wl_compositor", "x" * 9, "abc", "abcdef", ""]))
            args.append(None if arg.nullable and not text else text or "y")
        elif kind is ArgKind.ARRAY:
            args.append(draw(st.binary(max_size=9)))
        elif kind is ArgKind.FD:
            fds.append(FAKE_FD + len(fds))
            args.append(fds[-1])
        elif kind is ArgKind.FIXED:
            args.append(Fixed(draw_word(draw, kind)))
        else:
            args.append(draw_word(draw, kind))
    return args


BREAKS = ["garbage", "size", "opcode", "target", "object", "new_id", "null", "since",
          "tail"]


def message(draw: Draw, session: RelaySession, world: World,
            next_ids: dict[str, int], broken: str | None) -> tuple[bytes, list[int]]:
    """One message, well formed for the session's state unless ``broken`` says how not."""
    requests = world.requests
    entries = session.objects.entries
    fresh = next_ids["client" if requests else "server"]
    if broken == "garbage":
        words = draw(st.lists(st.integers(0, 2**32 - 1), max_size=4))
        size = draw(st.sampled_from([8 + 4 * len(words)] * 3 + [4, 6, 8, 12, 9000]))
        head = HEADER.pack(draw(st.sampled_from([*world.known, 0, 9999])),
                           size << 16 | draw(st.integers(0, 5)))
        return head + b"".join(w.to_bytes(4, "little") for w in words), []
    choices = []
    for client_id, obj in entries.items():
        wire_id = client_id if requests else session.ids.upstream(client_id)
        if requests and wire_id not in world.live.get(obj.interface.name, []):
            continue
        messages = obj.interface.requests if requests else obj.interface.events
        for spec in messages:
            if world.usable(spec, obj.version, too_new=broken == "since"):
                # Events that make server objects are rare in this world: weigh them up.
                weight = 5 if not requests and spec.new_id_index is not None else 1
                choices += [(wire_id, len(messages), spec)] * weight
    def breakable(arg: Arg) -> bool:
        if broken == "null":
            return arg.kind is ArgKind.OBJECT and not arg.nullable
        return arg.kind is {"object": ArgKind.OBJECT, "new_id": ArgKind.NEW_ID}.get(broken or "")

    if broken in ("object", "null", "new_id"):
        choices = [c for c in choices if any(breakable(a) for a in c[2].args)
                   or (not requests and c[2] is PROTO["wl_display"].events[1])]
    elif broken == "tail":
        choices = [c for c in choices
                   if any(a.kind in (ArgKind.STRING, ArgKind.ARRAY) for a in c[2].args)]
    if not choices:
        choices = [(DISPLAY_ID, 2, PROTO["wl_display"].requests[0])] if requests else [
            (DISPLAY_ID, 2, PROTO["wl_display"].events[0])]
    target, count, spec = draw(st.sampled_from(
        sorted(choices, key=lambda c: (c[0] or 0, c[2].opcode))))
    assert target is not None
    fds: list[int] = []
    if not requests and spec is PROTO["wl_display"].events[1]:
        if broken in ("object", "null", "new_id") or not world.waiting_delete:
            deleted = world.misnamed(draw, fresh, [DISPLAY_ID, *world.own, *world.known])
        else:
            deleted = draw(st.sampled_from(world.waiting_delete))
            world.waiting_delete.remove(deleted)
        data, _ = encode_message(DISPLAY_ID, spec, [deleted])
        return data, fds
    args = draw_args(draw, spec, world, fresh, fds)
    if spec.new_id_index is not None:
        next_ids["client" if requests else "server"] += 1
    if broken is None:
        world.sent(target, spec, args)
    words = [i for i, a in enumerate(spec.args) if breakable(a)]
    if words:
        index = draw(st.sampled_from(words))
        wanted = spec.args[index].interface
        # A zombie of the right interface trips the liveness check alone; a live server
        # object, the check that a new id is free.
        likely = (world.server_live if broken == "new_id" else
                  [z for z in world.zombies
                   if (dead := entries.get(world.client_id(z))) is not None
                   and dead.interface.name == wanted])
        args[index] = None if broken == "null" else world.misnamed(draw, fresh, likely)
    elif broken == "target":
        target = world.misnamed(draw, fresh, world.zombies)
    data, fds = encode_message(target, spec, args)
    if broken == "size":
        data = data + b"\0\0\0\0" if draw(st.booleans()) or len(data) <= 8 else data[:-4]
        data = HEADER.pack(target, len(data) << 16 | spec.opcode) + data[8:]
    elif broken == "opcode":
        data = HEADER.pack(target, len(data) << 16 | draw(st.integers(0, count + 1))) + data[8:]
    elif broken == "tail":
        data = break_tail(spec, data, draw(st.sampled_from(TAIL_BREAKS))) or data
    return data, fds


@st.composite
def chunks(draw: st.DrawFn, data: bytes) -> list[bytes]:
    cuts = sorted(draw(st.lists(st.integers(0, len(data)), max_size=3)))
    bounds = [0, *cuts, len(data)]
    return [data[a:b] for a, b in pairwise(bounds) if b > a]


@pytest.mark.parametrize("broken", [None, *BREAKS])
@pytest.mark.parametrize("diverged", [False, True], ids=["same-ids", "renumbered-ids"])
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_fast_and_full_paths_relay_the_same(diverged: bool, broken: str | None,
                                            data: st.DataObject) -> None:
    fast, full = session_pair(diverged)
    next_ids = {"client": set_up(data.draw, (fast, full)), "server": SERVER_ID_MIN}
    assert state(fast) == state(full)
    # One broken message at most, late enough for the stream to have built up state
    # (renumbered ids, zombies, server objects) that it may trip over.
    break_at = data.draw(st.integers(0, 60), label="break at")
    sent = 0
    for _ in range(data.draw(st.integers(1, 30), label="inputs")):
        requests = data.draw(st.booleans(), label="requests")
        world = World(full, requests)
        batch = []
        for _ in range(data.draw(st.integers(1, 8), label="messages")):
            batch.append(message(data.draw, full, world, next_ids,
                                 broken if sent == break_at else None))
            sent += 1
        stream = b"".join(m for m, _ in batch)
        fds = [fd for _, f in batch for fd in f]
        for index, piece in enumerate(data.draw(chunks(stream), label="chunks")):
            sent_fds = fds if index == 0 else []
            if requests:
                steps = fast.from_client(piece, sent_fds), full.from_client(piece, sent_fds)
            else:
                steps = (fast.from_compositor(piece, sent_fds),
                         full.from_compositor(piece, sent_fds))
            assert outcome(steps[0]) == outcome(steps[1])
            assert state(fast) == state(full)
            if full.closed:
                return
    ends = fast.client_eof(), full.client_eof()
    assert outcome(ends[0]) == outcome(ends[1])


# -- handpicked streams: the checks random streams reach least often -------------------

C, S = "client", "compositor"
SURFACE_A, SURFACE_B, DEVICE = 17, 18, 19  # the next client ids after set_up
OFFER = SERVER_ID_MIN


def r(object_id: int, interface: str, name: str, *args: ArgValue) -> tuple[str, bytes]:
    spec = next(m for m in PROTO[interface].requests if m.name == name)
    return C, encode_message(object_id, spec, list(args))[0]


def e(object_id: int, interface: str, name: str, *args: ArgValue) -> tuple[str, bytes]:
    spec = next(m for m in PROTO[interface].events if m.name == name)
    return S, encode_message(object_id, spec, list(args))[0]


def together(*messages: tuple[str, bytes]) -> tuple[str, bytes]:
    """Messages that arrive in one read, so that the fast path has a run before the
    message it must refuse."""
    return messages[0][0], b"".join(m for _, m in messages)


COMPOSITOR, SUBCOMPOSITOR, SEAT = 3, 4, 5  # set_up's binds
DATA_DEVICE_MANAGER = 9
SURFACES = [r(COMPOSITOR, "wl_compositor", "create_surface", SURFACE_A),
            r(COMPOSITOR, "wl_compositor", "create_surface", SURFACE_B)]
SCENARIOS = {
    "zombie argument": (
        [*SURFACES, r(SURFACE_A, "wl_surface", "destroy"),
         together(r(SURFACE_B, "wl_surface", "frame", 20),
                  r(SUBCOMPOSITOR, "wl_subcompositor", "get_subsurface", 21, SURFACE_A,
                    SURFACE_B))],
        "argument surface is invalid object 17"),
    "zombie target": (
        [*SURFACES, r(SURFACE_A, "wl_surface", "destroy"),
         together(r(SURFACE_B, "wl_surface", "frame", 20),
                  r(SURFACE_A, "wl_surface", "frame", 21))],
        "invalid object 17"),
    "argument of another interface": (
        [*SURFACES, together(r(SURFACE_B, "wl_surface", "frame", 20),
                             r(SUBCOMPOSITOR, "wl_subcompositor", "get_subsurface", 21,
                               SURFACE_A, SEAT))],
        "argument parent must be a wl_surface, got wl_seat@5"),
    "event creating a live server id": (
        [r(DATA_DEVICE_MANAGER, "wl_data_device_manager", "get_data_device", DEVICE, SEAT),
         e(DEVICE, "wl_data_device", "data_offer", OFFER),
         together(e(DEVICE, "wl_data_device", "motion", 1, Fixed(0), Fixed(0)),
                  e(DEVICE, "wl_data_device", "data_offer", OFFER))],
        f"compositor reused live server id {OFFER}"),
    "event with a null object where none may be": (
        [*SURFACES, r(DATA_DEVICE_MANAGER, "wl_data_device_manager", "get_data_device",
                      DEVICE, SEAT),
         together(e(DEVICE, "wl_data_device", "motion", 1, Fixed(0), Fixed(0)),
                  (S, encode_message(DEVICE, PROTO["wl_data_device"].events[1],
                                     [1, SURFACE_A, Fixed(0), Fixed(0), None])[0][:12]
                   + b"\0\0\0\0" + b"\0" * 12))],
        "(argument surface): null object"),
    "delete_id of wl_display": (
        [r(DISPLAY_ID, "wl_display", "sync", SURFACE_A),
         together(e(SURFACE_A, "wl_callback", "done", 1),
                  e(DISPLAY_ID, "wl_display", "delete_id", SURFACE_A),
                  e(DISPLAY_ID, "wl_display", "delete_id", DISPLAY_ID))],
        "compositor sent delete_id for id 1"),
}


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_fast_and_full_paths_agree_on(scenario: str) -> None:
    stream, expected = SCENARIOS[scenario]
    fast, full = session_pair(diverged=False)
    set_up(None, (fast, full))
    for direction, data in stream:
        if direction == C:
            steps = fast.from_client(data), full.from_client(data)
        else:
            steps = fast.from_compositor(data), full.from_compositor(data)
        assert outcome(steps[0]) == outcome(steps[1])
        assert state(fast) == state(full)
    error = steps[1].error
    assert error is not None and expected in error.message, error
    # The messages before the refused one in the same read went on.
    assert steps[1].to_compositor or steps[1].to_client


def test_delete_id_of_an_object_of_the_proxys_agrees() -> None:
    fast, full = session_pair(diverged=True)  # upstream id 2 is the proxy's own
    for session in (fast, full):
        data, _ = encode_message(DISPLAY_ID, PROTO["wl_display"].events[1], [2])
        step = session.from_compositor(data)
        assert step.error is not None and "an object of the proxy's" in step.error.message
    assert state(fast) == state(full)
