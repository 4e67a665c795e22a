"""The sans-IO relay session: registry filtering, bind validation, object lifetimes.

Every input is built with ``encode_message``; the session is driven directly with
``from_client`` / ``from_compositor`` and its ``Step`` outputs are checked byte for byte.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from itertools import pairwise
from typing import cast

import messages
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)
from messages import PROTO, ev, event, joined, parse_error, req, request

from qubesshm.objects.objectmap import SERVER_ID_MIN
from qubesshm.relay.fastpath import PURE_PYTHON_VARIABLE, select_fast_path
from qubesshm.relay.session import RelaySession, Step
from qubesshm.wire.codec import (
    ArgValue,
    ErrorCode,
    Fixed,
    UntypedNewId,
    WireReader,
    decode_args,
    encode_message,
)
from qubesshm.wire.protocol import ArgKind


@pytest.fixture(params=["compiled", "pure-python", "full-path"])
def relay_path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """The session with the compiled fast path (which must be built: never skipped),
    with the pure-Python one (QUBESSHM_PURE_PYTHON=1), and with none."""
    monkeypatch.setattr(RelaySession, "fast_path_enabled", request.param != "full-path")
    if request.param == "compiled":
        monkeypatch.delenv(PURE_PYTHON_VARIABLE, raising=False)
        assert select_fast_path()[1] == "compiled"
    else:
        monkeypatch.setenv(PURE_PYTHON_VARIABLE, "1")


# Every test here holds for either fast path and for the full path.
pytestmark = pytest.mark.usefixtures("relay_path")

DISPLAY_ERROR = PROTO["wl_display"].events[0]
REGISTRY = 2

I32 = st.integers(-(2**31), 2**31 - 1)
U32 = st.integers(0, 2**32 - 1)


# -- helpers -------------------------------------------------------------------






def r(object_id: int, interface: str, name: str, *args: ArgValue) -> bytes:
    """Bytes of a request that carries no fd."""
    data, fds = request(object_id, interface, name, *args)
    assert fds == []
    return data


def e(object_id: int, interface: str, name: str, *args: ArgValue) -> bytes:
    """Bytes of an event that carries no fd."""
    data, fds = event(object_id, interface, name, *args)
    assert fds == []
    return data


def global_(name: int, interface: str, version: int) -> bytes:
    return e(REGISTRY, "wl_registry", "global", name, interface, version)


def bind(name: int, interface: str, version: int, new_id: int) -> bytes:
    return r(REGISTRY, "wl_registry", "bind", name, UntypedNewId(interface, version, new_id))



def to_comp(step: Step) -> bytes:
    assert step.error is None, step.error
    return joined(step.to_compositor)[0]


def to_client(step: Step) -> bytes:
    assert step.error is None, step.error
    return joined(step.to_client)[0]


def with_registry(*globals_: tuple[int, str, int], **kwargs: object) -> RelaySession:
    session = RelaySession(PROTO, **kwargs)  # type: ignore[arg-type]
    assert to_comp(session.from_client(r(1, "wl_display", "get_registry", REGISTRY)))
    for g in globals_:
        to_client(session.from_compositor(global_(*g)))
    return session



def assert_client_error(step: Step, code: ErrorCode, object_id: int | None = None) -> str:
    """As messages.assert_client_error, and nothing reached the compositor."""
    assert step.to_compositor == []
    return messages.assert_client_error(step, code, object_id=object_id)


def assert_compositor_error(step: Step) -> str:
    assert step.error is not None, "expected a protocol error"
    assert step.client_at_fault is False
    err_object, err_code, message = parse_error(step.to_client)
    assert (err_object, err_code) == (1, int(ErrorCode.IMPLEMENTATION))
    assert isinstance(message, str)
    return message


XML_COMPOSITOR = PROTO["wl_compositor"].version
XML_SEAT = PROTO["wl_seat"].version


# -- registry filtering --------------------------------------------------------


def test_unknown_global_hidden_with_its_removal() -> None:
    hidden: list[tuple[str, int]] = []
    session = with_registry(on_hidden_global=lambda i, v: hidden.append((i, v)))
    step = session.from_compositor(global_(7, "weston_screenshooter", 1))
    assert step.error is None and step.to_client == [] and step.to_compositor == []
    assert hidden == [("weston_screenshooter", 1)]
    step = session.from_compositor(e(REGISTRY, "wl_registry", "global_remove", 7))
    assert step.error is None and step.to_client == []


def test_hidden_global_dropped_from_the_middle_of_a_batch() -> None:
    session = with_registry()
    known_a = global_(1, "wl_compositor", 1)
    known_b = global_(3, "wl_shm", 1)
    batch = known_a + global_(2, "weston_screenshooter", 1) + known_b
    assert to_client(session.from_compositor(batch)) == known_a + known_b
    removals = [e(REGISTRY, "wl_registry", "global_remove", n) for n in (1, 2, 3)]
    assert to_client(session.from_compositor(b"".join(removals))) == removals[0] + removals[2]


def test_known_global_above_xml_version_is_capped() -> None:
    session = with_registry()
    out = to_client(session.from_compositor(global_(1, "wl_compositor", 99)))
    assert out == global_(1, "wl_compositor", XML_COMPOSITOR)
    spec = ev("wl_registry", "global")
    assert decode_args(spec, out, []) == [1, "wl_compositor", XML_COMPOSITOR]


@pytest.mark.parametrize("version", [1, XML_COMPOSITOR - 1, XML_COMPOSITOR])
def test_known_global_at_or_below_xml_version_passes_unchanged(version: int) -> None:
    session = with_registry()
    data = global_(1, "wl_compositor", version)
    step = session.from_compositor(data)
    assert step.to_client == [(data, [])]


KNOWN_NAMES = sorted(PROTO.interfaces)
UNKNOWN_NAMES = ["weston_screenshooter", "zwp_made_up_v9", "wl_compositor2", "", "ünknown"]


@settings(max_examples=100, deadline=None)
@given(
    globals_=st.lists(
        st.tuples(st.sampled_from(KNOWN_NAMES + UNKNOWN_NAMES), st.integers(1, 200)),
        max_size=12,
    ),
    removed=st.sets(st.integers(0, 11)),
)
def test_registry_filter_matches_model(
    globals_: list[tuple[str, int]], removed: set[int]
) -> None:
    session = with_registry()
    stream = b""
    expected = b""
    for name, (iface, version) in enumerate(globals_, start=1):
        stream += global_(name, iface, version)
        if iface in PROTO:
            expected += global_(name, iface, min(version, PROTO[iface].version))
    for name in sorted(removed):
        if name < len(globals_):
            stream += e(REGISTRY, "wl_registry", "global_remove", name + 1)
            if globals_[name][0] in PROTO:
                expected += e(REGISTRY, "wl_registry", "global_remove", name + 1)
    assert to_client(session.from_compositor(stream)) == expected


def test_hidden_global_removal_dropped_on_every_registry() -> None:
    session = with_registry()
    assert to_comp(session.from_client(r(1, "wl_display", "get_registry", 3)))
    # The compositor announces every global on each registry.
    for registry in (REGISTRY, 3):
        step = session.from_compositor(
            e(registry, "wl_registry", "global", 9, "weston_screenshooter", 1))
        assert step.to_client == []
    for registry in (REGISTRY, 3):
        step = session.from_compositor(e(registry, "wl_registry", "global_remove", 9))
        assert step.error is None
        assert step.to_client == [], f"global_remove of a hidden global on registry {registry}"


# -- wl_registry.bind ----------------------------------------------------------

BIND_GLOBALS = [
    (1, "wl_compositor", 99),  # capped to the XML's version
    (2, "wl_shm", 1),
    (3, "weston_screenshooter", 1),  # hidden
    (4, "wl_seat", 3),
]


@pytest.mark.parametrize(
    ("bind_bytes", "why"),
    [
        (bind(50, "wl_compositor", 1, 10), "invalid global"),
        (bind(3, "weston_screenshooter", 1, 10), "invalid global"),
        (bind(3, "wl_compositor", 1, 10), "invalid global"),
        (bind(1, "wl_shm", 1, 10), "not a wl_shm"),
        (bind(2, "wl_compositor", 1, 10), "not a wl_compositor"),
        (bind(1, "wl_compositor", 0, 10), "invalid version"),
        (bind(1, "wl_compositor", XML_COMPOSITOR + 1, 10), "invalid version"),
        (bind(1, "wl_compositor", 99, 10), "invalid version"),
        (bind(4, "wl_seat", 4, 10), "invalid version"),
        (bind(2, "wl_shm", 2**32 - 1, 10), "invalid version"),
    ],
    ids=["unknown-name", "hidden-name", "hidden-name-known-interface", "mismatch-a",
         "mismatch-b", "version-0", "above-capped", "above-capped-advertised-99",
         "above-advertised", "version-u32-max"],
)
def test_bind_rejected(bind_bytes: bytes, why: str) -> None:
    session = with_registry(*BIND_GLOBALS)
    sync = r(1, "wl_display", "sync", 20)
    step = session.from_client(sync + bind_bytes + r(1, "wl_display", "sync", 21))
    assert joined(step.to_compositor)[0] == sync
    step.to_compositor = []
    message = assert_client_error(step, ErrorCode.INVALID_OBJECT, object_id=REGISTRY)
    assert why in message
    assert session.objects.get(10) is None


def test_error_event_for_a_huge_bind_fits_the_message_limit() -> None:
    session = with_registry(*BIND_GLOBALS)
    longest = "x" * (4096 - 8 - 4 - 4 - 8 - 1)  # the largest bind that is itself valid
    data = bind(1, longest, 1, 10)
    assert len(data) == 4096
    step = session.from_client(data)
    assert step.error is not None and step.client_at_fault
    reader = WireReader()  # default maximum: 4096
    reader.feed(joined(step.to_client)[0])
    assert reader.peek() is not None
    assert_client_error(step, ErrorCode.INVALID_OBJECT, object_id=REGISTRY)


@pytest.mark.parametrize("new_id", [1, REGISTRY, SERVER_ID_MIN, 2**32 - 1])
def test_bind_with_bad_new_id(new_id: int) -> None:
    session = with_registry(*BIND_GLOBALS)
    step = session.from_client(bind(2, "wl_shm", 1, new_id))
    assert_client_error(step, ErrorCode.INVALID_METHOD, object_id=1)


def test_valid_bind_creates_the_object() -> None:
    session = with_registry(*BIND_GLOBALS)
    binding = bind(1, "wl_compositor", XML_COMPOSITOR, 10)
    assert to_comp(session.from_client(binding)) == binding
    obj = session.objects.live(10)
    assert obj is not None and obj.interface.name == "wl_compositor"
    assert obj.version == XML_COMPOSITOR
    # Requests on it are accepted and forwarded unchanged; children inherit its version.
    stream = (r(10, "wl_compositor", "create_surface", 11)
              + r(11, "wl_surface", "offset", -3, 4)  # since 5
              + r(11, "wl_surface", "commit"))
    assert to_comp(session.from_client(stream)) == stream
    surface = session.objects.live(11)
    assert surface is not None and surface.version == XML_COMPOSITOR


def test_bound_version_limits_requests() -> None:
    session = with_registry(*BIND_GLOBALS)
    stream = bind(4, "wl_seat", 3, 10) + r(10, "wl_seat", "get_pointer", 11)
    assert to_comp(session.from_client(stream)) == stream
    step = session.from_client(r(10, "wl_seat", "release"))  # since 5
    assert_client_error(step, ErrorCode.INVALID_METHOD, object_id=10)


def test_bind_at_lower_version_than_advertised() -> None:
    session = with_registry(*BIND_GLOBALS)
    stream = bind(1, "wl_compositor", 2, 10) + r(10, "wl_compositor", "create_surface", 11)
    assert to_comp(session.from_client(stream)) == stream
    step = session.from_client(r(11, "wl_surface", "set_buffer_scale", 2))  # since 3
    assert_client_error(step, ErrorCode.INVALID_METHOD, object_id=11)


# -- object lifetimes ----------------------------------------------------------


def test_callback_done_then_delete_id_frees_the_id() -> None:
    session = with_registry()
    sync = r(1, "wl_display", "sync", 3)
    assert to_comp(session.from_client(sync)) == sync
    callback = session.objects.live(3)
    assert callback is not None and callback.interface.name == "wl_callback"

    done = e(3, "wl_callback", "done", 1234)
    assert to_client(session.from_compositor(done)) == done
    zombie = session.objects.get(3)
    assert zombie is not None and not zombie.alive and session.objects.live(3) is None

    delete = e(1, "wl_display", "delete_id", 3)
    assert to_client(session.from_compositor(delete)) == delete
    assert session.objects.get(3) is None

    # The id is free again, for any interface.
    again = r(1, "wl_display", "sync", 3)
    assert to_comp(session.from_client(again)) == again
    stream = done + delete
    assert to_client(session.from_compositor(stream)) == stream
    binding = bind(1, "wl_compositor", 1, 3)
    to_client(session.from_compositor(global_(1, "wl_compositor", 1)))
    assert to_comp(session.from_client(binding)) == binding
    obj = session.objects.live(3)
    assert obj is not None and obj.interface.name == "wl_compositor"


@pytest.mark.parametrize("state", ["live", "zombie"])
def test_reuse_before_delete_id_is_an_error(state: str) -> None:
    session = with_registry()
    to_comp(session.from_client(r(1, "wl_display", "sync", 3)))
    if state == "zombie":
        to_client(session.from_compositor(e(3, "wl_callback", "done", 1)))
    step = session.from_client(r(1, "wl_display", "sync", 3))
    message = assert_client_error(step, ErrorCode.INVALID_METHOD, object_id=1)
    if state == "zombie":
        assert "delete_id" in message


SHM_SETUP = (
    bind(2, "wl_shm", 1, 3)
    + request(3, "wl_shm", "create_pool", 4, 50, 4096)[0]
    + r(4, "wl_shm_pool", "create_buffer", 5, 0, 16, 16, 64, 0)
)


def shm_session() -> RelaySession:
    session = with_registry((2, "wl_shm", 1))
    step = session.from_client(SHM_SETUP, [50])
    assert joined(step.to_compositor) == (SHM_SETUP, [50])
    return session


def test_events_in_flight_for_a_zombie_are_forwarded() -> None:
    session = shm_session()
    destroy = r(5, "wl_buffer", "destroy")
    assert to_comp(session.from_client(destroy)) == destroy
    zombie = session.objects.get(5)
    assert zombie is not None and not zombie.alive
    # The compositor sent release before it saw the destroy.
    release = e(5, "wl_buffer", "release")
    assert to_client(session.from_compositor(release)) == release
    delete = e(1, "wl_display", "delete_id", 5)
    assert to_client(session.from_compositor(release + delete)) == release + delete
    assert session.objects.get(5) is None
    # Once the id is deleted, an event for it is the compositor's fault.
    assert "unknown object" in assert_compositor_error(session.from_compositor(release))


def test_zombie_event_carrying_an_fd_is_forwarded_with_it() -> None:
    session = with_registry((3, "wl_data_device_manager", 3))
    stream = (bind(3, "wl_data_device_manager", 3, 3)
              + r(3, "wl_data_device_manager", "create_data_source", 4)
              + r(4, "wl_data_source", "offer", "text/plain")
              + r(4, "wl_data_source", "destroy"))
    assert to_comp(session.from_client(stream)) == stream
    send, fds = event(4, "wl_data_source", "send", "text/plain", 77)
    step = session.from_compositor(send, fds)
    assert step.error is None and step.to_client == [(send, [77])]


def test_request_on_a_zombie_is_an_error() -> None:
    session = shm_session()
    to_comp(session.from_client(r(5, "wl_buffer", "destroy")))
    step = session.from_client(r(5, "wl_buffer", "destroy"))
    assert_client_error(step, ErrorCode.INVALID_OBJECT, object_id=1)


def test_zombie_cannot_be_an_object_argument() -> None:
    session = shm_session()
    to_client(session.from_compositor(global_(1, "wl_compositor", 1)))
    stream = (bind(1, "wl_compositor", 1, 6) + r(6, "wl_compositor", "create_surface", 7)
              + r(5, "wl_buffer", "destroy"))
    assert to_comp(session.from_client(stream)) == stream
    step = session.from_client(r(7, "wl_surface", "attach", 5, 0, 0))
    assert_client_error(step, ErrorCode.INVALID_METHOD, object_id=1)


def data_device_session() -> RelaySession:
    session = with_registry((3, "wl_data_device_manager", 3), (4, "wl_seat", 3))
    stream = (bind(3, "wl_data_device_manager", 3, 3) + bind(4, "wl_seat", 3, 4)
              + r(3, "wl_data_device_manager", "get_data_device", 5, 4))
    assert to_comp(session.from_client(stream)) == stream
    return session


def test_server_created_objects() -> None:
    session = data_device_session()
    offer_id = SERVER_ID_MIN
    events = (e(5, "wl_data_device", "data_offer", offer_id)
              + e(offer_id, "wl_data_offer", "offer", "text/plain")
              + e(offer_id, "wl_data_offer", "source_actions", 1)  # since 3
              + e(5, "wl_data_device", "selection", offer_id))
    assert to_client(session.from_compositor(events)) == events
    offer = session.objects.live(offer_id)
    assert offer is not None and offer.interface.name == "wl_data_offer"
    assert offer.version == 3  # that of the wl_data_device that announced it

    receive, fds = request(offer_id, "wl_data_offer", "receive", "text/plain", 33)
    requests = receive + r(offer_id, "wl_data_offer", "set_actions", 1, 1)
    step = session.from_client(requests, fds)
    assert step.error is None and joined(step.to_compositor) == (requests, [33])

    # The client destroys it; the compositor frees server ids itself and may reuse them.
    assert to_comp(session.from_client(r(offer_id, "wl_data_offer", "destroy")))
    late = e(offer_id, "wl_data_offer", "offer", "text/html")
    assert to_client(session.from_compositor(late)) == late
    again = e(5, "wl_data_device", "data_offer", offer_id)
    assert to_client(session.from_compositor(again)) == again
    assert session.objects.live(offer_id) is not None
    second = e(5, "wl_data_device", "data_offer", 2**32 - 1)
    assert to_client(session.from_compositor(second)) == second


def test_server_object_created_in_client_range_is_compositor_error() -> None:
    session = data_device_session()
    step = session.from_compositor(e(5, "wl_data_device", "data_offer", 100))
    assert_compositor_error(step)


def test_server_reusing_a_live_server_id_is_compositor_error() -> None:
    session = data_device_session()
    offer = e(5, "wl_data_device", "data_offer", SERVER_ID_MIN)
    assert to_client(session.from_compositor(offer)) == offer
    assert_compositor_error(session.from_compositor(offer))


def test_delete_id_of_the_display_is_compositor_error() -> None:
    session = with_registry()
    assert_compositor_error(session.from_compositor(e(1, "wl_display", "delete_id", 1)))


def test_delete_id_of_unknown_id_is_forwarded() -> None:
    # libwayland clients merely log it.
    session = with_registry()
    delete = e(1, "wl_display", "delete_id", 12345)
    assert to_client(session.from_compositor(delete)) == delete


# -- stateful: create / destroy / delete_id / reuse ---------------------------

POOL = list(range(3, 9))  # a small pool of client ids, so reuse is frequent
S_REGISTRY, S_COMPOSITOR = 100, 101
KINDS = ["wl_callback", "wl_region", "wl_surface"]


class ObjectLifetimes(RuleBasedStateMachine):
    """The session's ObjectMap against a dict: id -> [interface, alive]."""

    def __init__(self) -> None:
        super().__init__()
        self.model: dict[int, tuple[str, bool]] = {}
        self.log: list[tuple[str, bytes]] = []
        self.session = RelaySession(PROTO)

    def _client(self, data: bytes) -> Step:
        self.log.append(("client", data))
        return self.session.from_client(data)

    def _compositor(self, data: bytes) -> Step:
        self.log.append(("compositor", data))
        return self.session.from_compositor(data)

    def _fresh_session(self) -> None:
        """The last step killed the session: replay everything valid into a new one."""
        self.session = RelaySession(PROTO)
        for side, data in self.log:
            feed = self.session.from_client if side == "client" else self.session.from_compositor
            step = feed(data)
            assert step.error is None

    def _ids(self, interfaces: Sequence[str], alive: bool) -> list[int]:
        return sorted(i for i, (iface, a) in self.model.items()
                      if iface in interfaces and a == alive)

    @initialize()
    def setup(self) -> None:
        assert to_comp(self._client(r(1, "wl_display", "get_registry", S_REGISTRY)))
        g = e(S_REGISTRY, "wl_registry", "global", 1, "wl_compositor", XML_COMPOSITOR)
        assert to_client(self._compositor(g)) == g
        b = r(S_REGISTRY, "wl_registry", "bind", 1,
              UntypedNewId("wl_compositor", XML_COMPOSITOR, S_COMPOSITOR))
        assert to_comp(self._client(b)) == b

    @staticmethod
    def _create(kind: str, new_id: int) -> bytes:
        if kind == "wl_callback":
            return r(1, "wl_display", "sync", new_id)
        name = "create_region" if kind == "wl_region" else "create_surface"
        return r(S_COMPOSITOR, "wl_compositor", name, new_id)

    @precondition(lambda self: len(self.model) < len(POOL))
    @rule(data=st.data(), kind=st.sampled_from(KINDS))
    def create(self, data: st.DataObject, kind: str) -> None:
        new_id = data.draw(st.sampled_from([i for i in POOL if i not in self.model]))
        msg = self._create(kind, new_id)
        assert to_comp(self._client(msg)) == msg
        self.model[new_id] = (kind, True)

    @precondition(lambda self: self._ids(["wl_region", "wl_surface"], True))
    @rule(data=st.data())
    def destroy(self, data: st.DataObject) -> None:
        target = data.draw(st.sampled_from(self._ids(["wl_region", "wl_surface"], True)))
        kind = self.model[target][0]
        msg = r(target, kind, "destroy")
        assert to_comp(self._client(msg)) == msg
        self.model[target] = (kind, False)

    @precondition(lambda self: self._ids(["wl_region", "wl_surface"], True))
    @rule(data=st.data())
    def use(self, data: st.DataObject) -> None:
        target = data.draw(st.sampled_from(self._ids(["wl_region", "wl_surface"], True)))
        if self.model[target][0] == "wl_region":
            msg = r(target, "wl_region", "add", 0, 0, 10, 10)
        else:
            msg = r(target, "wl_surface", "commit")
        assert to_comp(self._client(msg)) == msg

    @precondition(lambda self: self._ids(["wl_callback"], True))
    @rule(data=st.data(), serial=U32)
    def callback_done(self, data: st.DataObject, serial: int) -> None:
        target = data.draw(st.sampled_from(self._ids(["wl_callback"], True)))
        msg = e(target, "wl_callback", "done", serial)
        assert to_client(self._compositor(msg)) == msg
        self.model[target] = ("wl_callback", False)

    @precondition(lambda self: self._ids(KINDS, False))
    @rule(data=st.data())
    def delete_id(self, data: st.DataObject) -> None:
        target = data.draw(st.sampled_from(self._ids(KINDS, False)))
        msg = e(1, "wl_display", "delete_id", target)
        assert to_client(self._compositor(msg)) == msg
        del self.model[target]

    @precondition(lambda self: self.model)
    @rule(data=st.data(), kind=st.sampled_from(KINDS))
    def invalid_reuse(self, data: st.DataObject, kind: str) -> None:
        target = data.draw(st.sampled_from(sorted(self.model)))
        step = self.session.from_client(self._create(kind, target))
        assert_client_error(step, ErrorCode.INVALID_METHOD, object_id=1)
        self._fresh_session()

    @precondition(lambda self: self._ids(["wl_region", "wl_surface"], False))
    @rule(data=st.data())
    def invalid_use_of_zombie(self, data: st.DataObject) -> None:
        target = data.draw(st.sampled_from(self._ids(["wl_region", "wl_surface"], False)))
        step = self.session.from_client(r(target, self.model[target][0], "destroy"))
        assert_client_error(step, ErrorCode.INVALID_OBJECT, object_id=1)
        self._fresh_session()

    @invariant()
    def object_map_agrees(self) -> None:
        for object_id in POOL:
            obj = self.session.objects.get(object_id)
            if object_id not in self.model:
                assert obj is None
                continue
            kind, alive = self.model[object_id]
            assert obj is not None
            assert (obj.interface.name, obj.alive) == (kind, alive)
            assert (self.session.objects.live(object_id) is not None) == alive
        # display, registry, compositor and the pool's objects; nothing else lingers.
        assert len(self.session.objects) == 3 + len(self.model)
        assert not self.session.closed


def test_object_lifetimes() -> None:
    # A plain test rather than the machine's unittest TestCase, so that it runs once
    # per relay path like the rest of this module.
    # Through a cast: hypothesis types this function in some releases and not others.
    run = cast(Callable[..., None], run_state_machine_as_test)
    run(ObjectLifetimes, settings=settings(max_examples=60, stateful_step_count=30,
                                           deadline=None))


# -- byte-exact passthrough ----------------------------------------------------

P_REGISTRY, P_COMPOSITOR, P_SHM = 2, 3, 4


def passthrough_session() -> RelaySession:
    session = with_registry((1, "wl_compositor", XML_COMPOSITOR), (2, "wl_shm", 1))
    setup = (bind(1, "wl_compositor", XML_COMPOSITOR, P_COMPOSITOR)
             + bind(2, "wl_shm", 1, P_SHM))
    assert to_comp(session.from_client(setup)) == setup
    return session


@st.composite
def request_streams(draw: st.DrawFn) -> list[tuple[bytes, list[int]]]:
    """A random valid request sequence on a fresh passthrough session."""
    live: dict[str, list[int]] = {"wl_surface": [], "wl_region": [], "wl_shm_pool": [],
                                  "wl_buffer": []}
    next_id = 10
    next_fd = 500
    out: list[tuple[bytes, list[int]]] = []

    def fresh() -> int:
        nonlocal next_id
        next_id += 1
        return next_id

    for _ in range(draw(st.integers(1, 25))):
        choices = ["sync", "create_surface", "create_region", "create_pool"]
        choices += [k for k, ids in live.items() if ids]
        what = draw(st.sampled_from(choices))
        if what == "sync":
            out.append(request(1, "wl_display", "sync", fresh()))
        elif what in ("create_surface", "create_region"):
            new = fresh()
            out.append(request(P_COMPOSITOR, "wl_compositor", what, new))
            live["wl_surface" if what == "create_surface" else "wl_region"].append(new)
        elif what == "create_pool":
            new = fresh()
            next_fd += 1
            out.append(request(P_SHM, "wl_shm", "create_pool", new, next_fd, draw(I32)))
            live["wl_shm_pool"].append(new)
        else:
            target = draw(st.sampled_from(live[what]))
            op = draw(st.sampled_from(
                [m.name for m in PROTO[what].requests if m.since <= XML_COMPOSITOR]))
            spec = req(what, op)
            args: list[ArgValue] = []
            for arg in spec.args:
                if arg.kind is ArgKind.NEW_ID:
                    new = fresh()
                    args.append(new)
                    if arg.interface in live:
                        live[arg.interface].append(new)
                elif arg.kind is ArgKind.OBJECT:
                    pool = live.get(arg.interface or "", [])
                    choice = st.sampled_from(pool) if pool else st.nothing()
                    args.append(draw(st.none() | choice if arg.nullable else choice))
                elif arg.kind is ArgKind.INT:
                    args.append(draw(I32))
                elif arg.kind is ArgKind.UINT:
                    args.append(draw(U32))
                elif arg.kind is ArgKind.FIXED:
                    args.append(Fixed(draw(I32)))
                else:  # pragma: no cover - these interfaces have no other kinds
                    raise AssertionError(arg)
            out.append(encode_message(target, spec, args))
            if spec.destructor:
                live[what].remove(target)
    return out


@settings(max_examples=150, deadline=None)
@given(stream=request_streams(), cuts=st.lists(st.integers(0, 2000), max_size=6),
       fds_late=st.booleans())
def test_byte_exact_passthrough(
    stream: list[tuple[bytes, list[int]]], cuts: list[int], fds_late: bool
) -> None:
    session = passthrough_session()
    data = b"".join(d for d, _ in stream)
    fds = [fd for _, f in stream for fd in f]
    points = sorted({min(c, len(data)) for c in cuts} | {0, len(data)})
    sent: list[tuple[bytes, list[int]]] = []
    chunks = list(pairwise(points))
    for i, (a, b) in enumerate(chunks):
        chunk_fds: list[int] = []
        if (i == 0 and not fds_late) or (i == len(chunks) - 1 and fds_late):
            chunk_fds = fds
        step = session.from_client(data[a:b], chunk_fds)
        assert step.error is None, step.error
        assert step.to_client == []
        sent.extend(step.to_compositor)
    if not chunks:
        step = session.from_client(b"", fds)
        sent.extend(step.to_compositor)
    assert joined(sent) == (data, fds)
    # Each fd is sent no later than the bytes of the message that carries it.
    msg_ends = []
    end = fd_total = 0
    for msg_data, msg_fds in stream:
        end += len(msg_data)
        fd_total += len(msg_fds)
        msg_ends.append((end, fd_total))
    seg_end = seg_fds = 0
    for seg_data, fds_of_seg in sent:
        seg_end += len(seg_data)
        seg_fds += len(fds_of_seg)
        assert seg_end in {end for end, _ in msg_ends}, "a segment splits a message"
        needed = max((n for end, n in msg_ends if end <= seg_end), default=0)
        assert seg_fds >= needed
    assert session.client_eof().error is None


def test_passthrough_keeps_arbitrary_padding_bytes() -> None:
    # libwayland ignores the content of padding bytes; the proxy must neither reject
    # nor rewrite them.
    session = data_device_session()
    to_comp(session.from_client(r(3, "wl_data_device_manager", "create_data_source", 6)))
    offer = r(6, "wl_data_source", "offer", "ab")
    assert offer[-1:] == b"\0"
    odd = offer[:-1] + b"X"
    assert to_comp(session.from_client(odd)) == odd
