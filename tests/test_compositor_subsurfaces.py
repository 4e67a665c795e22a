"""Subsurfaces in the sans-IO compositor: stacking, positions, sync and desync.

What the agent is offered is checked as the tree of surfaces in paint order,
each at its position, after each commit.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from compositor_wire import App
from test_compositor_core import World, error_of, pixels

from qubesshm.compositor.scene import paint_order
from qubesshm.compositor.subsurfaces import MAX_DEPTH


@pytest.fixture
def world() -> Iterator[World]:
    w = World()
    yield w
    for client in list(w.comp.clients):
        client.close()


class Tree:
    """A mapped toplevel with children; surfaces named by colour."""

    def __init__(self, world: World) -> None:
        self.world = world
        self.app = world.app()
        self.root, self.xdg, self.top = self.app.toplevel()
        self.colour = {self.root: 0xFF000001}
        self.app.show(self.root, self.app.buffer(pixels(100, 100, self.colour[self.root])))
        self.app.c.roundtrip()

    def child(self, parent: int | None = None, size: int = 10) -> tuple[int, int]:
        app = self.app
        surface = app.surface()
        sub = app.c.create(app.subcompositor, "get_subsurface", "wl_subsurface", surface,
                           self.root if parent is None else parent)
        self.colour[surface] = 0xFF000000 | (len(self.colour) + 1)
        app.show(surface, app.buffer(pixels(size, size, self.colour[surface])))
        return surface, sub

    def offered(self) -> list[tuple[int, int, int]]:
        """(colour, x, y) of each surface of the last offered tree, bottom first."""
        self.app.c.roundtrip()
        commit = self.world.shell.commits[-1]
        out = []
        for node in paint_order(commit.tree):
            state = node.state
            assert state.buffer is not None
            out.append((int(state.buffer.pixels()[0, 0]) & 0xFF, node.x, node.y))
        return out

    def name(self, surface: int) -> int:
        return self.colour[surface] & 0xFF

    def commit_root(self) -> None:
        self.app.c.request(self.root, "commit")


def test_children_appear_and_move_when_the_parent_commits(world: World) -> None:
    t = Tree(world)
    a, sub_a = t.child()
    t.app.c.request(sub_a, "set_position", 5, 6)
    assert t.offered() == [(1, 0, 0)]  # nothing until the parent commits
    t.commit_root()
    assert t.offered() == [(1, 0, 0), (t.name(a), 5, 6)]
    t.app.c.request(sub_a, "set_position", 50, 60)
    t.app.c.request(sub_a, "set_desync")
    t.app.show(a, t.app.buffer(pixels(10, 10, t.colour[a])))
    assert t.offered()[-1] == (t.name(a), 5, 6)  # the position waits for the parent
    t.commit_root()
    assert t.offered()[-1] == (t.name(a), 50, 60)


def test_stacking_order_is_the_parents_pending_state(world: World) -> None:
    t = Tree(world)
    a, sub_a = t.child()
    b, sub_b = t.child()
    t.commit_root()
    assert [c for c, _, _ in t.offered()] == [1, t.name(a), t.name(b)]
    t.app.c.request(sub_b, "place_below", t.root)
    t.app.c.request(sub_a, "place_above", b)
    assert [c for c, _, _ in t.offered()] == [1, t.name(a), t.name(b)]
    t.commit_root()
    assert [c for c, _, _ in t.offered()] == [t.name(b), t.name(a), 1]
    t.app.c.request(sub_a, "place_below", b)
    t.app.c.request(sub_b, "place_above", t.root)
    t.commit_root()
    assert [c for c, _, _ in t.offered()] == [t.name(a), 1, t.name(b)]
    commit = world.shell.commits[-1]
    assert len(commit.tree.below) == 1 and len(commit.tree.above) == 1


def test_a_synchronized_child_waits_for_its_parent(world: World) -> None:
    t = Tree(world)
    a, _ = t.child()
    t.commit_root()
    t.offered()
    t.app.c.take("wl_buffer", "release")
    offers = len(world.shell.commits)
    decoy = t.app.buffer(pixels(10, 10, 0xFF0000AA))
    t.app.show(a, decoy)
    right = t.app.buffer(pixels(10, 10, 0xFF0000BB))
    callback = t.app.show(a, right, frame=True)
    t.app.c.roundtrip()
    assert len(world.shell.commits) == offers  # cached: nothing offered
    # The decoy, replaced in the cache, is released; the cached buffer is not.
    assert [e.object_id for e in t.app.c.take("wl_buffer", "release")] == [decoy]
    world.tick(1)
    t.app.c.receive(0)
    assert not t.app.c.take("wl_callback", "done", callback)
    t.commit_root()
    assert [c for c, _, _ in t.offered()] == [1, 0xBB]
    # With subsurfaces each buffer is kept until replaced (a later render may read it
    # again): the child's previous one goes back now, the new one stays.
    released = [e.object_id for e in t.app.c.take("wl_buffer", "release")]
    assert len(released) == 1 and released[0] not in (decoy, right)
    world.tick(1)
    t.app.c.receive(0)
    assert t.app.c.take("wl_callback", "done", callback)


def test_a_grandchild_is_synchronized_through_its_parent(world: World) -> None:
    t = Tree(world)
    a, sub_a = t.child()
    g, sub_g = t.child(parent=a)
    t.app.c.request(sub_g, "set_desync")  # desync itself, but its parent is sync
    t.app.c.request(sub_g, "set_position", 3, 3)
    t.app.c.request(a, "commit")
    t.commit_root()
    assert t.offered() == [(1, 0, 0), (t.name(a), 0, 0), (t.name(g), 3, 3)]
    offers = len(world.shell.commits)
    t.app.show(g, t.app.buffer(pixels(10, 10, 0xFF0000CC)))
    t.app.c.roundtrip()
    assert len(world.shell.commits) == offers
    t.app.c.request(sub_a, "set_desync")  # now the whole chain is desync: applied at once
    assert t.offered()[-1] == (0xCC, 3, 3)


def test_set_desync_applies_the_cache(world: World) -> None:
    t = Tree(world)
    a, sub_a = t.child()
    t.commit_root()
    t.offered()
    t.app.show(a, t.app.buffer(pixels(10, 10, 0xFF0000DD)))
    t.app.c.request(sub_a, "set_desync")
    assert t.offered()[-1][0] == 0xDD
    t.app.show(a, t.app.buffer(pixels(10, 10, 0xFF0000EE)))
    assert t.offered()[-1][0] == 0xEE  # desync: at once


def test_destroying_a_subsurface_takes_it_away_at_once(world: World) -> None:
    t = Tree(world)
    _, sub_a = t.child()
    b, _ = t.child()
    t.commit_root()
    assert len(t.offered()) == 3
    t.app.c.destroy(sub_a)
    assert [c for c, _, _ in t.offered()] == [1, t.name(b)]
    t.app.c.destroy(b)
    assert [c for c, _, _ in t.offered()] == [1]


def test_a_child_without_buffer_hides_its_own_children(world: World) -> None:
    t = Tree(world)
    a, sub_a = t.child()
    t.child(parent=a)
    t.app.c.request(a, "commit")
    t.commit_root()
    assert len(t.offered()) == 3
    t.app.c.request(sub_a, "set_desync")
    t.app.show(a, None)
    assert t.offered() == [(1, 0, 0)]


def test_subsurface_errors(world: World) -> None:
    def own_parent(app: App) -> tuple[int, int]:
        s = app.surface()
        app.c.create(app.subcompositor, "get_subsurface", "wl_subsurface", s, s)
        return app.subcompositor, 0

    def ancestor(app: App) -> tuple[int, int]:
        a, b = app.surface(), app.surface()
        app.c.create(app.subcompositor, "get_subsurface", "wl_subsurface", b, a)
        app.c.create(app.subcompositor, "get_subsurface", "wl_subsurface", a, b)
        return app.subcompositor, 0

    def twice(app: App) -> tuple[int, int]:
        a, b = app.surface(), app.surface()
        app.c.create(app.subcompositor, "get_subsurface", "wl_subsurface", b, a)
        app.c.create(app.subcompositor, "get_subsurface", "wl_subsurface", b, a)
        return app.subcompositor, 0

    def role(app: App) -> tuple[int, int]:
        a = app.surface()
        top, _, _ = app.toplevel()
        app.c.create(app.subcompositor, "get_subsurface", "wl_subsurface", top, a)
        return app.subcompositor, 0

    def not_sibling(app: App) -> tuple[int, int]:
        a, b, c = app.surface(), app.surface(), app.surface()
        sub = app.c.create(app.subcompositor, "get_subsurface", "wl_subsurface", b, a)
        app.c.request(sub, "place_above", c)
        return sub, 0

    def itself(app: App) -> tuple[int, int]:
        a, b = app.surface(), app.surface()
        sub = app.c.create(app.subcompositor, "get_subsurface", "wl_subsurface", b, a)
        app.c.request(sub, "place_below", b)
        return sub, 0

    for case in (own_parent, ancestor, twice, role, not_sibling, itself):
        app = world.app()
        expected = case(app)
        err = error_of(app)
        assert (err.object_id, err.code) == expected, (case.__name__, err)


def test_a_surface_may_become_a_subsurface_again(world: World) -> None:
    t = Tree(world)
    a, sub_a = t.child()
    t.commit_root()
    t.app.c.destroy(sub_a)
    t.app.c.create(t.app.subcompositor, "get_subsurface", "wl_subsurface", a, t.root)
    t.app.c.request(a, "commit")
    t.commit_root()
    assert len(t.offered()) == 2


def test_subsurface_trees_are_bounded(world: World) -> None:
    app = world.app()
    parent = app.surface()
    for _ in range(MAX_DEPTH):
        child = app.surface()
        app.c.create(app.subcompositor, "get_subsurface", "wl_subsurface", child, parent)
        parent = child
    app.c.roundtrip()
    app.c.create(app.subcompositor, "get_subsurface", "wl_subsurface", app.surface(), parent)
    err = error_of(app)
    assert (err.object_id, err.code) == (1, 2)
    assert "too deep" in err.message
