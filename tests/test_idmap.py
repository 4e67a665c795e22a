"""``UpstreamIds`` against a model of libwayland's id rules on both connections.

A hypothesis state machine plays a libwayland client (its ids come from a LIFO
free list, then the next new id; an id is free again only once the proxy
forwards ``delete_id`` for it, or at once for an object the proxy keeps to
itself) and the compositor (which frees an upstream id only with ``delete_id``
and, as libwayland servers do, refuses a new id that skips past the highest id
used so far + 1). The model is checked after every step: translations both
ways, ids waiting for ``delete_id`` never handed out, a client object keeping
its own id whenever that id is free upstream, the proxy's objects taking the
lowest free id, and ``identical()`` meaning exactly "no id differs". Plain
tests pin down server ids, unknown ``delete_id`` and the lowest-free rule.

Everything runs twice: on the Python methods and on the compiled core's own
``add_client_object``, ``destroyed`` and ``delete_id`` (``qubesshm.relay._fastpath``,
which the relay's compiled fast path uses; it must be built, it is never skipped).
"""

from __future__ import annotations

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from qubesshm.objects.idmap import IdSpaceError, UpstreamIds, _Slot
from qubesshm.objects.objectmap import DISPLAY_ID, SERVER_ID_MIN
from qubesshm.relay import _fastpath


class CompiledIds(UpstreamIds):
    """UpstreamIds whose operations the compiled core has go through it."""

    def add_client_object(self, client_id: int) -> int:
        return _fastpath.add_client_object(self, client_id)

    def destroyed(self, upstream_id: int) -> None:
        _fastpath.destroyed(self, upstream_id)

    def delete_id(self, upstream_id: int) -> _Slot | None:
        return _fastpath.delete_id(self, upstream_id)


@pytest.fixture(params=[UpstreamIds, CompiledIds], ids=["python", "compiled"])
def make_ids(request: pytest.FixtureRequest) -> type[UpstreamIds]:
    cls: type[UpstreamIds] = request.param
    return cls


class Owner:
    """Something a proxy-owned upstream object belongs to."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __repr__(self) -> str:
        return f"Owner({self.n})"


class IdSpaces(RuleBasedStateMachine):
    ids_class: type[UpstreamIds] = UpstreamIds

    def __init__(self) -> None:
        super().__init__()
        self.ids = self.ids_class()
        # The client's id space, as libwayland's wl_map allocates it.
        self.client_free: list[int] = []  # most recently freed last
        self.client_next = DISPLAY_ID + 1
        # Objects, until their delete_id (locals: until the proxy retires them).
        self.forwarded: dict[int, int] = {}  # client id -> upstream id
        self.locals: set[int] = set()
        self.own: dict[int, Owner] = {}  # upstream id -> owner
        self.zombies: set[int] = set()  # destroyed upstream ids awaiting delete_id
        # The compositor's id space: the highest id it has seen.
        self.highest = DISPLAY_ID
        self.owners = 0

    # -- the model --------------------------------------------------------------

    def client_alloc(self) -> int:
        if self.client_free:
            return self.client_free.pop()
        self.client_next += 1
        return self.client_next - 1

    def upstream_used(self) -> set[int]:
        return {DISPLAY_ID, *self.forwarded.values(), *self.own}

    def lowest_free(self) -> int:
        used = self.upstream_used()
        return min(u for u in range(DISPLAY_ID + 1, self.highest + 2) if u not in used)

    def model_identical(self) -> bool:
        return (not self.locals and not self.own
                and all(c == u for c, u in self.forwarded.items()))

    def check_new_upstream(self, upstream: int, used: set[int], identical: bool) -> None:
        """A freshly assigned upstream id, ``used``/``identical`` as they were before."""
        assert upstream not in used, f"upstream id {upstream} is still in use"
        assert upstream not in self.zombies, f"upstream id {upstream} awaits delete_id"
        assert identical or upstream <= self.highest + 1, (
            f"skip-ahead while diverged: {upstream} after highest {self.highest}")
        # The client never skips, so neither may the proxy, identical or not: the
        # compositor refuses an id past its highest + 1 whatever the proxy thinks.
        assert upstream <= self.highest + 1, (
            f"skip-ahead while identical(): upstream id {upstream} after highest "
            f"{self.highest}, though the client's ids never skip")
        self.highest = max(self.highest, upstream)

    # -- the client ---------------------------------------------------------------

    @rule()
    def create_forwarded(self) -> None:
        client_id = self.client_alloc()
        used, identical = self.upstream_used(), self.model_identical()
        free_upstream = client_id not in used and client_id <= self.highest + 1
        expected = client_id if free_upstream else self.lowest_free()
        upstream = self.ids.add_client_object(client_id)
        self.check_new_upstream(upstream, used, identical)
        assert upstream == expected, (
            f"client id {client_id} (free upstream: {free_upstream}) got upstream id "
            f"{upstream}, expected {expected}")
        self.forwarded[client_id] = upstream

    @rule()
    def create_local(self) -> None:
        client_id = self.client_alloc()
        self.ids.add_local(client_id)
        self.locals.add(client_id)

    @precondition(lambda self: self.locals)
    @rule(data=st.data())
    def remove_local(self, data: st.DataObject) -> None:
        client_id = data.draw(st.sampled_from(sorted(self.locals)))
        assert self.ids.upstream(client_id) is None
        self.ids.remove_local(client_id)
        self.locals.remove(client_id)
        self.client_free.append(client_id)  # the proxy sends delete_id at once

    # -- the proxy ----------------------------------------------------------------

    @rule()
    def create_own(self) -> None:
        used, identical = self.upstream_used(), self.model_identical()
        expected = self.lowest_free()
        self.owners += 1
        owner = Owner(self.owners)
        upstream = self.ids.add_own_object(owner)
        self.check_new_upstream(upstream, used, identical)
        assert upstream == expected, f"own object got {upstream}, lowest free is {expected}"
        self.own[upstream] = owner

    # -- destructors and the compositor ------------------------------------------------

    def live(self) -> list[int]:
        return sorted((set(self.forwarded.values()) | set(self.own)) - self.zombies)

    @precondition(lambda self: self.live())
    @rule(data=st.data())
    def destroy(self, data: st.DataObject) -> None:
        upstream = data.draw(st.sampled_from(self.live()))
        self.ids.destroyed(upstream)
        self.zombies.add(upstream)

    @precondition(lambda self: self.zombies)
    @rule(data=st.data())
    def delete_id(self, data: st.DataObject) -> None:
        upstream = data.draw(st.sampled_from(sorted(self.zombies)))
        slot = self.ids.delete_id(upstream)
        assert slot is not None
        self.zombies.remove(upstream)
        if upstream in self.own:
            assert slot.client_id is None
            assert slot.owner is self.own.pop(upstream)
        else:
            (client_id,) = [c for c, u in self.forwarded.items() if u == upstream]
            assert slot.client_id == client_id
            del self.forwarded[client_id]
            self.client_free.append(client_id)  # the proxy forwards delete_id
        assert self.ids.delete_id(upstream) is None  # a second one is ignored

    # -- invariants ---------------------------------------------------------------------

    @invariant()
    def translations(self) -> None:
        in_use = self.ids.in_use()
        expected: dict[int, int | None] = {DISPLAY_ID: DISPLAY_ID}
        expected.update({u: c for c, u in self.forwarded.items()})
        expected.update({u: None for u in self.own})
        assert in_use == expected
        for upstream, client_id in in_use.items():
            if client_id is not None:
                assert self.ids.upstream(client_id) == upstream
                assert self.ids.client(upstream) == client_id
                assert not self.ids.is_own(upstream)
            else:
                assert self.ids.is_own(upstream)
                assert self.ids.owner(upstream) is self.own[upstream]
                assert self.ids.client(upstream) is None
        ups = [self.ids.upstream(c) for c in self.forwarded]
        assert len(set(ups)) == len(ups), "two client ids share an upstream id"
        for client_id in self.locals:
            assert self.ids.upstream(client_id) is None

    @invariant()
    def zombies_wait(self) -> None:
        assert self.ids.awaiting_delete() == self.zombies

    @invariant()
    def identical_means_no_difference(self) -> None:
        assert self.ids.identical() == self.model_identical()


# One bug at a time: shrinking several at once can take half a minute.
IdSpaces.TestCase.settings = settings(max_examples=200, stateful_step_count=30,
                                      report_multiple_bugs=False, deadline=None)
TestIdSpaces = IdSpaces.TestCase


class CompiledIdSpaces(IdSpaces):
    ids_class = CompiledIds


CompiledIdSpaces.TestCase.settings = IdSpaces.TestCase.settings
TestCompiledIdSpaces = CompiledIdSpaces.TestCase


# -- fixed cases ------------------------------------------------------------------------


def test_server_ids_pass_through(make_ids: type[UpstreamIds]) -> None:
    ids = make_ids()
    ids.add_own_object("pool")  # diverged: still the same for server ids
    for server_id in (SERVER_ID_MIN, SERVER_ID_MIN + 5, 0xFFFFFFFF):
        assert ids.upstream(server_id) == server_id
        assert ids.client(server_id) == server_id
        ids.destroyed(server_id)  # no delete_id follows: nothing to do
        assert ids.delete_id(server_id) is None
    assert ids.awaiting_delete() == set()


def test_display_and_unknown_ids(make_ids: type[UpstreamIds]) -> None:
    ids = make_ids()
    assert ids.upstream(DISPLAY_ID) == DISPLAY_ID
    assert ids.client(DISPLAY_ID) == DISPLAY_ID
    assert ids.delete_id(DISPLAY_ID) is None
    assert ids.delete_id(2) is None
    assert ids.delete_id(12345) is None
    assert ids.upstream(2) is None
    assert ids.client(2) is None
    assert ids.in_use() == {DISPLAY_ID: DISPLAY_ID}
    assert ids.identical()
    with pytest.raises(IdSpaceError):
        ids.destroyed(7)


def test_client_id_taken_twice_is_an_error(make_ids: type[UpstreamIds]) -> None:
    ids = make_ids()
    ids.add_client_object(2)
    with pytest.raises(IdSpaceError):
        ids.add_client_object(2)


def test_own_objects_take_the_lowest_free_id(make_ids: type[UpstreamIds]) -> None:
    ids = make_ids()
    assert [ids.add_own_object(n) for n in range(5)] == [2, 3, 4, 5, 6]
    for upstream in (5, 3):
        ids.destroyed(upstream)
    assert ids.awaiting_delete() == {3, 5}
    assert ids.add_own_object("waits") == 7  # destroyed is not free
    ids.delete_id(5)
    ids.delete_id(3)
    assert ids.add_own_object("a") == 3
    assert ids.add_own_object("b") == 5
    assert ids.add_own_object("c") == 8
    assert ids.owner(3) == "a"
    assert ids.is_own(8)


def test_identical_client_keeps_its_ids(make_ids: type[UpstreamIds]) -> None:
    ids = make_ids()
    assert [ids.add_client_object(c) for c in (2, 3, 4)] == [2, 3, 4]
    assert ids.identical()
    ids.destroyed(3)
    assert ids.delete_id(3) is not None
    assert ids.add_client_object(3) == 3
    assert ids.identical()


def test_client_object_moves_aside_for_an_own_object(make_ids: type[UpstreamIds]) -> None:
    ids = make_ids()
    assert ids.add_own_object("pool") == 2
    assert ids.add_client_object(2) == 3
    assert ids.upstream(2) == 3
    assert ids.client(3) == 2
    assert not ids.identical()
    ids.destroyed(2)
    ids.delete_id(2)
    assert not ids.identical()  # client 2 is still upstream 3
    ids.destroyed(3)
    slot = ids.delete_id(3)
    assert slot is not None
    assert slot.client_id == 2
    assert ids.identical()


def test_no_skip_ahead_after_local_ids_ran_ahead(make_ids: type[UpstreamIds]) -> None:
    """Local objects push the client's ids ahead of the compositor's.

    Two local objects (client ids 2, 3), a forwarded one (client 4, upstream 2);
    all go away, the spaces are identical again, and the client reuses its most
    recently freed id, 4. The compositor has only seen up to id 2, so upstream 4
    would be refused ("invalid new id"): the proxy must renumber it.
    """
    ids = make_ids()
    ids.add_local(2)
    ids.add_local(3)
    assert ids.add_client_object(4) == 2
    ids.remove_local(2)
    ids.remove_local(3)
    ids.destroyed(2)
    ids.delete_id(2)  # forwarded to the client as delete_id(4)
    assert ids.identical()
    # The client's free list is now 2, 3, 4 (4 most recent): it asks for 4.
    upstream = ids.add_client_object(4)
    assert upstream <= 3, f"upstream id {upstream} skips past the compositor's highest, 2"


def test_client_keeps_a_fresh_id_while_diverged(make_ids: type[UpstreamIds]) -> None:
    """A client id that is the compositor's next new id is free upstream: keep it.

    Local 2, client 3 -> upstream 2, own object -> 3, client 4 keeps 4; the own
    object goes; the client's next id, 5, is the compositor's next new id too.
    """
    ids = make_ids()
    ids.add_local(2)
    assert ids.add_client_object(3) == 2
    assert ids.add_own_object("pool") == 3
    assert ids.add_client_object(4) == 4
    ids.destroyed(3)
    ids.delete_id(3)
    assert ids.add_client_object(5) == 5
