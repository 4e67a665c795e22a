"""The sans-IO compositor with raw clients: the core protocol, as libwayland-server.

Registry and binds, sync, delete_id, generic request checks, wl_shm, wl_surface
state (buffers, damage, release, frame pacing on an injected clock), the
agent's calls, and each protocol error with its object and code.
"""

from __future__ import annotations

import dataclasses
import os
import struct
from collections.abc import Callable, Iterator
from fractions import Fraction

import numpy as np
import pytest
from compositor_shell import RecordingShell
from compositor_wire import App, CoreClient, DisplayError, fixed

from qubesshm.compositor.client import MAX_UNCLAIMED_FDS
from qubesshm.compositor.core import Compositor
from qubesshm.compositor.registry import IMPLEMENTED_VERSIONS
from qubesshm.compositor.shell import ToplevelState
from qubesshm.objects.objectmap import SERVER_ID_MIN
from qubesshm.pixels.region import Rect, surface_size
from qubesshm.shm.clientpool import MAX_SPENT_POOLS
from qubesshm.wire.codec import ErrorCode, UntypedNewId
from qubesshm.wire.protocol import Arg, ArgKind, MessageSpec, ProtocolTable, load_protocols


class World:
    """A compositor on a clock the test moves."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.shell = RecordingShell()
        self.comp = Compositor(self.shell, clock=lambda: self.now)

    def app(self) -> App:
        return App(CoreClient(self.comp))

    def tick(self, dt: float = 0.0) -> float | None:
        self.now += dt
        return self.comp.tick(self.now)


@pytest.fixture
def world() -> Iterator[World]:
    w = World()
    yield w
    for client in list(w.comp.clients):
        client.close()


def header(object_id: int, opcode: int, size: int) -> bytes:
    return struct.pack("=II", object_id, size << 16 | opcode)


def pixels(width: int, height: int, value: int = 0xFF336699) -> np.ndarray:
    return np.full((height, width), value, dtype=np.uint32)


def error_of(app: App) -> DisplayError:
    return app.c.expect_error()


# -- registry, sync, ids -------------------------------------------------------


def test_globals_are_offered_at_the_versions_both_the_xml_and_qubesshm_know(
        world: World) -> None:
    app = world.app()
    offered = {name: version for name, (_, version) in app.c.globals.items()}
    for interface, ours in IMPLEMENTED_VERSIONS.items():
        if interface not in world.comp.protocol:
            # Implemented, but its XML is not in the bundled set (cursor-shape-v1 is
            # newer than Debian 12's wayland-protocols): not offered.
            assert interface not in offered
            continue
        assert offered[interface] == min(ours, world.comp.protocol[interface].version)
    for needed in ("wl_seat", "wl_data_device_manager",
                   "zwp_primary_selection_device_manager_v1"):
        assert needed in offered
    names = sorted(n for n, _ in app.c.globals.values())
    assert names == list(range(1, len(names) + 1))


@pytest.mark.parametrize(("change", "needle"), [
    (lambda name, iface, v: (name + 100, iface, v), "invalid global"),
    (lambda name, iface, v: (name, "wl_shm", v), "invalid interface"),
    (lambda name, iface, v: (name, iface, 0), "0 is not a valid version"),
    (lambda name, iface, v: (name, iface, v + 1), "have 5, wanted 6"),
])
def test_a_bad_bind_is_an_invalid_object_error_on_the_registry(world: World, change: object,
                                                              needle: str) -> None:
    c = CoreClient(world.comp)
    c.setup()
    name, version = c.globals["wl_compositor"]
    assert callable(change)
    bad_name, iface, bad_version = change(name, "wl_compositor", version)
    new = c.new_id(iface)
    c.request(c.registry, "bind", bad_name, UntypedNewId(iface, bad_version, new))
    err = c.expect_error()
    assert (err.object_id, err.code) == (c.registry, ErrorCode.INVALID_OBJECT)
    assert needle in err.message


def test_sync_answers_with_the_serial_then_retires_the_id(world: World) -> None:
    c = CoreClient(world.comp)
    callback = c.create(1, "sync", "wl_callback")
    events = [(e.interface, e.name, e.args) for e in c.take()]
    assert events == [("wl_callback", "done", (world.comp.serial,)),
                      ("wl_display", "delete_id", (callback,))]
    # The id may be used again at once.
    again = c.create(1, "sync", "wl_callback")
    assert again == callback
    c.roundtrip()


@pytest.mark.parametrize(("send", "code", "needle"), [
    (lambda c: c.send_bytes(header(99, 0, 8)), ErrorCode.INVALID_OBJECT, "invalid object 99"),
    (lambda c: c.send_bytes(header(1, 7, 8)), ErrorCode.INVALID_METHOD, "invalid method 7"),
    # get_registry with a new id that skips ahead.
    (lambda c: c.send_bytes(header(1, 1, 12) + struct.pack("=I", 9)),
     ErrorCode.INVALID_METHOD, "skips ahead"),
    # a message shorter than its arguments
    (lambda c: c.send_bytes(header(1, 1, 8)), ErrorCode.INVALID_METHOD, "message too short"),
    # a size that is no multiple of 4
    (lambda c: c.send_bytes(header(1, 1, 10) + b"\0\0"), ErrorCode.INVALID_METHOD,
     "not a multiple of 4"),
])
def test_generic_request_checks_post_errors_on_the_display(world: World, send: object,
                                                          code: ErrorCode, needle: str) -> None:
    c = CoreClient(world.comp)
    assert callable(send)
    send(c)
    err = c.expect_error()
    assert (err.object_id, err.code) == (1, code)
    assert needle in err.message
    assert c.core.closed


def test_a_request_newer_than_the_object_version_is_an_invalid_method(world: World) -> None:
    c = CoreClient(world.comp)
    c.setup()
    compositor = c.bind("wl_compositor", 1)
    surface = c.create(compositor, "create_surface", "wl_surface")
    c.request(surface, "set_buffer_scale", 2)  # since 3; the surface is version 1
    err = c.expect_error()
    assert (err.object_id, err.code) == (1, ErrorCode.INVALID_METHOD)
    assert "since 3" in err.message


def test_an_object_argument_of_the_wrong_interface_is_invalid_arguments(world: World) -> None:
    app = world.app()
    surface = app.surface()
    app.c.request(surface, "attach", surface, 0, 0)  # a wl_surface where a wl_buffer goes
    err = error_of(app)
    assert (err.object_id, err.code) == (1, ErrorCode.INVALID_METHOD)
    assert "invalid arguments for wl_surface" in err.message


def test_an_object_argument_that_was_destroyed_is_invalid_arguments(world: World) -> None:
    app = world.app()
    surface = app.surface()
    region = app.c.create(app.compositor, "create_region", "wl_region")
    app.c.destroy(region)
    app.c.request(surface, "set_opaque_region", region)
    err = error_of(app)
    assert (err.object_id, err.code) == (1, ErrorCode.INVALID_METHOD)
    assert f"argument region is invalid object {region}" in err.message


def test_the_object_limit_holds_for_created_and_bound_objects(
        world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    app = world.app()
    assert isinstance(app.c, CoreClient)
    core = app.c.core
    limit = len(core.objects) + 2
    monkeypatch.setattr("qubesshm.compositor.client.MAX_OBJECTS", limit)
    for _ in range(2):
        app.c.create(app.compositor, "create_region", "wl_region")
    assert len(core.objects) == limit and not core.closed
    app.c.create(app.compositor, "create_region", "wl_region")
    err = error_of(app)
    assert (err.object_id, err.code) == (1, ErrorCode.NO_MEMORY)
    assert f"too many objects: a client may have {limit}" in err.message

    bound = world.app()  # bind, whose new id carries its interface, counts alike
    assert isinstance(bound.c, CoreClient)
    monkeypatch.setattr("qubesshm.compositor.client.MAX_OBJECTS", len(bound.c.core.objects))
    bound.c.bind("wl_compositor")
    err = error_of(bound)
    assert (err.object_id, err.code) == (1, ErrorCode.NO_MEMORY)


def test_destroyed_objects_are_retired_with_delete_id_and_unusable(world: World) -> None:
    app = world.app()
    region = app.c.create(app.compositor, "create_region", "wl_region")
    app.c.destroy(region)
    assert [e.args for e in app.c.take("wl_display", "delete_id")] == [(region,)]
    app.c.objects[region] = app.c.protocol["wl_region"]
    app.c.request(region, "add", 0, 0, 1, 1)
    err = error_of(app)
    assert (err.object_id, err.code) == (1, ErrorCode.INVALID_OBJECT)


def test_server_objects_take_ids_from_0xff000000(world: World) -> None:
    c = CoreClient(world.comp)
    first = c.core.new_server_object("wl_callback", 1)
    second = c.core.new_server_object("wl_callback", 1)
    assert (first, second) == (SERVER_ID_MIN, SERVER_ID_MIN + 1)
    c.core.destroy(first)
    assert c.take("wl_display", "delete_id") == []  # server ids are freed silently
    assert c.core.objects.live(first) is None


def test_fds_sent_ahead_without_end_are_refused(world: World) -> None:
    c = CoreClient(world.comp)
    r, w = os.pipe()
    os.close(w)
    fds = [os.dup(r) for _ in range(MAX_UNCLAIMED_FDS + 1)]
    os.close(r)
    c.core.feed(b"", fds)
    c.receive(0)
    assert c.error is not None and c.error.code == ErrorCode.NO_MEMORY


def test_an_error_ends_one_client_and_no_other(world: World) -> None:
    good, bad = world.app(), world.app()
    surface, _, _ = good.toplevel("good")
    bad.c.request(bad.surface(), "set_buffer_scale", 0)
    assert error_of(bad).code == 0
    good.show(surface, good.buffer(pixels(10, 10)))
    good.c.roundtrip()
    assert world.shell.names()[-1] == "committed"
    assert good.c.error is None


# -- wl_shm ----------------------------------------------------------------------


def test_wl_shm_offers_argb8888_and_xrgb8888(world: World) -> None:
    c = CoreClient(world.comp)
    c.setup()
    c.bind("wl_shm")
    c.roundtrip()
    assert [e.args[0] for e in c.take("wl_shm", "format")] == [0, 1]


@pytest.mark.parametrize(("make", "code", "needle"), [
    (lambda app, pool: app.c.create(pool, "create_buffer", "wl_buffer", 0, 4, 4, 16, 7),
     0, "invalid format"),
    (lambda app, pool: app.c.create(pool, "create_buffer", "wl_buffer", 0, 4, 4, 8, 1),
     1, "invalid"),
    (lambda app, pool: app.c.create(pool, "create_buffer", "wl_buffer", 60, 4, 4, 16, 1),
     1, "invalid width, height or stride"),
    (lambda app, pool: app.c.create(pool, "create_buffer", "wl_buffer", 0, 2, 2, 10, 1),
     1, "not a multiple of 4"),
    (lambda app, pool: app.c.request(pool, "resize", 10), 2, "shrinking pool invalid"),
])
def test_shm_pool_errors(world: World, make: object, code: int, needle: str) -> None:
    app = world.app()
    fd = app.c.memfd(bytes(64))
    pool = app.c.create(app.shm, "create_pool", "wl_shm_pool", fd, 64, fds=[fd])
    os.close(fd)
    assert callable(make)
    make(app, pool)
    err = error_of(app)
    assert (err.object_id, err.code) == (pool, code)
    assert needle in err.message


def test_a_pool_of_no_size_is_invalid_stride_on_wl_shm(world: World) -> None:
    app = world.app()
    fd = app.c.memfd(bytes(64))
    app.c.create(app.shm, "create_pool", "wl_shm_pool", fd, 0, fds=[fd])
    os.close(fd)
    err = error_of(app)
    assert (err.object_id, err.code) == (app.shm, 1)


def test_a_pool_let_go_of_keeps_its_fd_until_the_spent_pools_close(world: World) -> None:
    """Closing a pool's last fd frees its pages: the core hands the fd over
    (``Compositor.spent``) for the I/O layer to close once the replies went; at
    MAX_SPENT_POOLS it closes them itself, and a client's going closes them too."""
    app = world.app()
    fd = app.c.memfd(bytes(64))
    pool = app.c.create(app.shm, "create_pool", "wl_shm_pool", fd, 64, fds=[fd])
    os.close(fd)
    buffer = app.c.create(pool, "create_buffer", "wl_buffer", 0, 4, 4, 16, 1)
    app.c.destroy(pool)
    app.c.roundtrip()
    assert world.comp.spent.pools == []  # its buffer still needs it
    app.c.destroy(buffer)
    app.c.roundtrip()
    [spent] = world.comp.spent.pools
    os.fstat(spent.fd)  # still open
    world.comp.spent.close()
    assert world.comp.spent.pools == [] and spent.fd == -1
    for count in range(1, MAX_SPENT_POOLS + 1):
        fd = app.c.memfd(bytes(64))
        pool = app.c.create(app.shm, "create_pool", "wl_shm_pool", fd, 64, fds=[fd])
        os.close(fd)
        app.c.destroy(pool)
        app.c.roundtrip()
        if count < MAX_SPENT_POOLS:
            assert len(world.comp.spent.pools) == count and world.comp.spent.pools[-1].fd >= 0
            kept = list(world.comp.spent.pools)
    assert world.comp.spent.pools == [] and all(p.fd == -1 for p in kept)  # the last closed all
    fd = app.c.memfd(bytes(64))
    app.c.destroy(app.c.create(app.shm, "create_pool", "wl_shm_pool", fd, 64, fds=[fd]))
    os.close(fd)
    app.c.roundtrip()
    [last] = world.comp.spent.pools
    client = app.c
    assert isinstance(client, CoreClient)
    client.core.close()  # the client goes
    assert world.comp.spent.pools == [] and last.fd == -1


def test_an_unsealed_pool_is_read_not_mapped_and_a_truncated_one_is_an_error(
        world: World) -> None:
    app = world.app()
    surface, _, _ = app.toplevel()
    data = pixels(8, 8, 0xFF112233)
    fd = app.c.memfd(data.tobytes(), seal=False)
    pool = app.c.create(app.shm, "create_pool", "wl_shm_pool", fd, data.nbytes, fds=[fd])
    buffer = app.c.create(pool, "create_buffer", "wl_buffer", 0, 8, 8, 32, 1)
    app.show(surface, buffer)
    app.c.roundtrip()
    commit = world.shell.commits[-1]
    assert (commit.image == 0xFF112233).all()
    view = commit.tree.state.buffer
    assert view is not None
    assert (view.pixels() == 0xFF112233).all()
    os.ftruncate(fd, 16)
    os.close(fd)
    view.pixels()  # the client broke its buffer: reading it is its protocol error
    err = error_of(app)
    assert (err.object_id, err.code) == (buffer, 2)
    assert "error accessing SHM buffer" in err.message


# -- wl_surface ------------------------------------------------------------------


def test_surface_errors(world: World) -> None:
    cases: list[tuple[Callable[[App, int], object], int, str]] = [
        (lambda app, s: app.c.request(s, "set_buffer_scale", 0), 0, "at least one"),
        (lambda app, s: app.c.request(s, "set_buffer_transform", 8), 1, "transform"),
        (lambda app, s: app.c.request(s, "attach", None, 1, 0), 3, "offset"),
    ]
    for action, code, needle in cases:
        app = world.app()
        surface = app.surface()
        action(app, surface)
        err = error_of(app)
        assert (err.object_id, err.code) == (surface, code), err
        assert needle in err.message


def test_attach_offsets_before_version_5_move_the_window(world: World) -> None:
    app = world.app()
    c = app.c
    compositor = c.bind("wl_compositor", 4)
    surface = c.create(compositor, "create_surface", "wl_surface")
    xdg = c.create(app.wm_base, "get_xdg_surface", "xdg_surface", surface)
    c.create(xdg, "get_toplevel", "xdg_toplevel")
    c.request(surface, "commit")
    app.ack(xdg)
    app.show(surface, app.buffer(pixels(10, 10)))
    c.request(surface, "attach", app.buffer(pixels(12, 10)), -2, 0)
    c.request(surface, "commit")
    c.roundtrip()
    assert world.shell.commits[-1].window.offset == (-2, 0)


def test_buffers_are_released_once_rendered_and_held_while_the_agent_waits(
        world: World) -> None:
    app = world.app()
    surface, _, _ = app.toplevel()
    first = app.buffer(pixels(10, 10))
    app.show(surface, first)
    app.c.roundtrip()
    assert [e.object_id for e in app.c.take("wl_buffer", "release")] == [first]
    world.shell.render_result = False
    second = app.buffer(pixels(10, 10, 0xFF00FF00))
    app.show(surface, second)
    app.c.roundtrip()
    assert app.c.take("wl_buffer", "release") == []
    window = world.shell.commits[-1].window
    world.shell.render_result = True
    assert window.render_pending() is True
    app.c.receive(0)
    assert [e.object_id for e in app.c.take("wl_buffer", "release")] == [second]
    assert window.render_pending() is True  # nothing waits any more


def test_a_shell_that_draws_later_gets_the_tree_only_when_it_draws(world: World) -> None:
    app = world.app()
    output = app.c.bind("wl_output")
    world.shell.due_result = False  # as the agent between refreshes
    surface, _, _ = app.toplevel()
    buffer = app.buffer(pixels(10, 10))
    app.show(surface, buffer)
    app.c.roundtrip()
    # Noted, not offered: no tree built, nothing entered, the buffer still held.
    assert [name for name, _ in world.shell.calls] == ["mapped", "due"]
    assert world.shell.commits == []
    assert app.c.take("wl_surface", "enter") == []
    assert app.c.take("wl_buffer", "release") == []
    window = world.shell.calls[-1][1]
    world.shell.due_result = True  # it draws: the newest tree, offered once
    assert window.render_pending() is True
    app.c.receive(0)
    assert len(world.shell.commits) == 1 and world.shell.commits[0].geometry == Rect(
        0, 0, 10, 10)
    assert [e.args for e in app.c.take("wl_surface", "enter")] == [(output,)]
    assert [e.object_id for e in app.c.take("wl_buffer", "release")] == [buffer]

    # A window that closes before the shell draws it never entered, so never leaves.
    world.shell.due_result = False
    other, _, top = app.toplevel("closed early")
    app.show(other, app.buffer(pixels(10, 10)))
    app.c.roundtrip()
    app.c.destroy(top)
    app.c.destroy(other)
    app.c.roundtrip()
    assert app.c.take("wl_surface", "enter") == []
    assert app.c.take("wl_surface", "leave") == []
    assert len(world.shell.commits) == 1


def test_a_replaced_unrendered_buffer_is_released_at_once(world: World) -> None:
    app = world.app()
    surface, _, _ = app.toplevel()
    app.show(surface, app.buffer(pixels(10, 10)))
    app.c.roundtrip()
    assert len(app.c.take("wl_buffer", "release")) == 1
    world.shell.render_result = False
    waiting = app.buffer(pixels(10, 10))
    app.show(surface, waiting)
    app.c.roundtrip()
    assert app.c.take("wl_buffer", "release") == []
    app.show(surface, app.buffer(pixels(10, 10)))
    app.c.roundtrip()
    assert [e.object_id for e in app.c.take("wl_buffer", "release")] == [waiting]


@pytest.mark.parametrize("transform", range(8))
@pytest.mark.parametrize("scale", [1, 2, 3])
def test_a_surface_is_its_buffer_turned_and_scaled_down(world: World, transform: int,
                                                       scale: int) -> None:
    app = world.app()
    surface, _, _ = app.toplevel()
    app.c.request(surface, "set_buffer_transform", transform)
    app.c.request(surface, "set_buffer_scale", scale)
    app.show(surface, app.buffer(pixels(36, 12)))
    app.c.roundtrip()
    state = world.shell.commits[-1].tree.state
    turned = (36, 12) if transform % 2 == 0 else (12, 36)
    assert (state.width, state.height) == (turned[0] // scale, turned[1] // scale)
    assert surface_size(36, 12, transform, scale) == (Fraction(state.width),
                                                      Fraction(state.height))


def test_damage_gathers_in_buffer_pixels_until_a_render(world: World) -> None:
    app = world.app()
    surface, _, _ = app.toplevel()
    buffer = app.buffer(pixels(40, 30))
    app.c.request(surface, "set_buffer_scale", 2)
    app.show(surface, buffer)
    app.c.roundtrip()
    uid = world.shell.commits[-1].tree.state.surface_id
    assert world.shell.commits[-1].damage[uid] == [Rect(0, 0, 40, 30)]  # new: all of it
    world.shell.render_result = False
    app.c.request(surface, "damage", 1, 1, 2, 2)  # surface coordinates: x2 in the buffer
    app.c.request(surface, "commit")
    app.c.request(surface, "damage_buffer", 30, 20, 5, 5)
    app.c.request(surface, "commit")
    app.c.roundtrip()
    damage = world.shell.commits[-1].damage[uid]
    assert sorted((r.x, r.y, r.width, r.height) for r in damage) == [
        (2, 2, 4, 4), (30, 20, 5, 5)]
    world.shell.render_result = True
    app.c.request(surface, "damage_buffer", 0, 0, 1, 1)
    app.c.request(surface, "commit")
    app.c.roundtrip()
    app.c.request(surface, "damage_buffer", 7, 7, 1, 1)
    app.c.request(surface, "commit")
    app.c.roundtrip()
    assert world.shell.commits[-1].damage[uid] == [Rect(7, 7, 1, 1)]


def test_a_commit_that_changes_nothing_is_not_offered_but_its_callback_runs(
        world: World) -> None:
    app = world.app()
    surface, _, _ = app.toplevel()
    app.show(surface, app.buffer(pixels(10, 10)))
    app.c.roundtrip()
    offers = len(world.shell.commits)
    callback = app.c.create(surface, "frame", "wl_callback")
    app.c.request(surface, "commit")
    app.c.roundtrip()
    assert len(world.shell.commits) == offers
    world.tick(1)
    app.c.receive(0)
    assert app.c.take("wl_callback", "done", callback)


def test_frame_callbacks_are_paced_at_the_refresh_rate(world: World) -> None:
    app = world.app()
    surface, _, _ = app.toplevel()
    buffer = app.buffer(pixels(10, 10))
    done: list[float] = []
    for _ in range(5):
        callback = app.show(surface, buffer, frame=True)
        app.c.roundtrip()
        due = world.tick()
        app.c.receive(0)
        while not app.c.take("wl_callback", "done", callback):
            assert due is not None and due > world.now
            world.now = due
            due = world.tick()
            app.c.receive(0)
        done.append(world.now)
    gaps = np.diff(done)
    assert np.allclose(gaps, 1 / 60), gaps


def test_frame_callbacks_of_an_unmapped_window_wait(world: World) -> None:
    app = world.app()
    surface = app.surface()
    callback = app.c.create(surface, "frame", "wl_callback")
    app.c.request(surface, "attach", app.buffer(pixels(10, 10)), 0, 0)
    app.c.request(surface, "commit")
    app.c.roundtrip()
    assert world.tick(10) is None
    app.c.receive(0)
    assert not app.c.take("wl_callback", "done", callback)


def test_frame_callbacks_wait_for_the_agent_to_render(world: World) -> None:
    app = world.app()
    surface, _, _ = app.toplevel()
    world.shell.render_result = False
    callback = app.show(surface, app.buffer(pixels(10, 10)), frame=True)
    app.c.roundtrip()
    assert world.tick(1) is None
    app.c.receive(0)
    assert not app.c.take("wl_callback", "done", callback)
    world.shell.render_result = True
    assert world.shell.commits[-1].window.render_pending()
    world.tick(1)
    app.c.receive(0)
    assert app.c.take("wl_callback", "done", callback)


def test_opaque_regions_are_exact_and_within_the_surface(world: World) -> None:
    app = world.app()
    surface, _, _ = app.toplevel()
    region = app.c.create(app.compositor, "create_region", "wl_region")
    app.c.request(region, "add", -5, 0, 20, 10)
    app.c.request(region, "subtract", 2, 2, 3, 3)
    app.c.request(surface, "set_opaque_region", region)
    app.c.destroy(region)  # the surface keeps a copy
    app.show(surface, app.buffer(pixels(10, 10), fmt=0))
    app.c.roundtrip()
    opaque = world.shell.commits[-1].tree.state.opaque
    assert opaque.area == 100 - 9
    assert not opaque.contains(3, 3) and opaque.contains(0, 0) and opaque.contains(9, 9)


# -- viewports ---------------------------------------------------------------------


def test_viewport_errors(world: World) -> None:
    def negative_source(app: App, s: int, v: int) -> None:
        app.c.request(v, "set_source", fixed(-1), fixed(0), fixed(1), fixed(1))

    def empty_destination(app: App, s: int, v: int) -> None:
        app.c.request(v, "set_destination", 0, 5)

    def fractional_size(app: App, s: int, v: int) -> None:
        app.c.request(v, "set_source", fixed(0), fixed(0), fixed(2.5), fixed(2))
        app.c.request(s, "commit")

    def out_of_buffer(app: App, s: int, v: int) -> None:
        app.c.request(v, "set_source", fixed(5), fixed(0), fixed(8), fixed(8))
        app.show(s, app.buffer(pixels(10, 10)))

    def no_surface(app: App, s: int, v: int) -> None:
        app.c.destroy(s)
        app.c.request(v, "set_destination", 5, 5)

    def exists(app: App, s: int, v: int) -> None:
        app.c.create(app.viewporter, "get_viewport", "wp_viewport", s)

    cases: list[tuple[Callable[[App, int, int], None], str, int]] = [
        (negative_source, "viewport", 0), (empty_destination, "viewport", 0),
        (fractional_size, "viewport", 1), (out_of_buffer, "viewport", 2),
        (no_surface, "viewport", 3), (exists, "viewporter", 0),
    ]
    for action, on, code in cases:
        app = world.app()
        surface = app.surface()
        viewport = app.c.create(app.viewporter, "get_viewport", "wp_viewport", surface)
        action(app, surface, viewport)
        err = error_of(app)
        expected = viewport if on == "viewport" else app.viewporter
        assert (err.object_id, err.code) == (expected, code), err


def test_a_viewport_sets_the_surface_size_and_goes_with_its_object(world: World) -> None:
    app = world.app()
    surface, _, _ = app.toplevel()
    viewport = app.c.create(app.viewporter, "get_viewport", "wp_viewport", surface)
    app.c.request(viewport, "set_source", fixed(2), fixed(3), fixed(10), fixed(6))
    app.c.request(viewport, "set_destination", 50, 30)
    app.show(surface, app.buffer(pixels(20, 20)))
    app.c.roundtrip()
    state = world.shell.commits[-1].tree.state
    assert (state.width, state.height) == (50, 30)
    app.c.destroy(viewport)
    app.c.request(surface, "commit")
    app.c.roundtrip()
    state = world.shell.commits[-1].tree.state
    assert (state.width, state.height) == (20, 20)


# -- the agent's calls ----------------------------------------------------------------


def test_configure_close_and_screen_changes_reach_the_client(world: World) -> None:
    app = world.app()
    output = app.c.bind("wl_output")
    surface, xdg, top = app.toplevel()
    app.show(surface, app.buffer(pixels(10, 10)))
    app.c.roundtrip()
    w = world.shell.mapped_windows()[0]
    world.comp.configure(w, 300, 200, [ToplevelState.ACTIVATED, ToplevelState.SUSPENDED])
    app.c.receive(0)
    configure = app.c.take("xdg_toplevel", "configure")[-1]
    # xdg_wm_base 5 has no "suspended": only "activated" is sent.
    assert configure.args == (300, 200, np.array([4], dtype=np.uint32).tobytes())
    assert app.c.take("xdg_surface", "configure", xdg)
    world.comp.close(w)
    app.c.receive(0)
    assert app.c.take("xdg_toplevel", "close", top)
    world.comp.set_screen(1280, 1024)
    app.c.receive(0)
    modes = app.c.take("wl_output", "mode", output)
    assert modes[-1].args == (1, 1280, 1024, 60000)
    assert app.c.take("wl_output", "done", output)


def test_pings_that_go_unanswered_end_the_client(world: World) -> None:
    world.comp.ping_timeout = 5.0
    app = world.app()
    world.tick()
    app.c.receive(0)
    ping = app.c.take("xdg_wm_base", "ping")[-1]
    app.c.request(app.wm_base, "pong", ping.args[0])
    world.tick(5)
    app.c.receive(0)
    assert app.c.take("xdg_wm_base", "ping")  # answered: pinged again later
    world.tick(5)
    err = error_of(app)
    assert (err.object_id, err.code) == (app.wm_base, 6)


# -- versions newer than the bundled XML ---------------------------------------------


def newer_protocol() -> ProtocolTable:
    """The bundled protocols with wl_compositor 6 (preferred scale and transform),
    wl_shm 2 (release) and xdg_wm_base 6, as newer wayland releases define them."""
    table = load_protocols()
    out = ProtocolTable()
    for spec in table.interfaces.values():
        if spec.name in ("wl_compositor", "wl_surface"):
            events = spec.events
            if spec.name == "wl_surface":
                events = (*events,
                          MessageSpec("wl_surface", "preferred_buffer_scale", len(events),
                                      (Arg("factor", ArgKind.INT),), since=6),
                          MessageSpec("wl_surface", "preferred_buffer_transform",
                                      len(events) + 1, (Arg("transform", ArgKind.UINT),),
                                      since=6))
            spec = dataclasses.replace(spec, version=6, events=events)
        elif spec.name == "wl_shm":
            requests = (*spec.requests, MessageSpec("wl_shm", "release", len(spec.requests),
                                                    (), since=2, destructor=True))
            spec = dataclasses.replace(spec, version=2, requests=requests)
        elif spec.name in ("xdg_wm_base", "xdg_surface", "xdg_toplevel", "xdg_popup",
                           "xdg_positioner"):
            spec = dataclasses.replace(spec, version=6)
        out.add(spec)
    return out


def test_newer_versions_get_their_events_and_requests() -> None:
    shell = RecordingShell()
    protocol = newer_protocol()
    comp = Compositor(shell, protocol=protocol)
    c = CoreClient(comp, protocol)
    app = App(c)
    offered = {name: version for name, (_, version) in c.globals.items()}
    assert (offered["wl_compositor"], offered["wl_shm"], offered["xdg_wm_base"]) == (6, 2, 6)
    output = c.bind("wl_output")
    surface, _, _ = app.toplevel()
    app.show(surface, app.buffer(pixels(10, 10)))
    c.roundtrip()
    events = [(e.name, e.args) for e in c.take("wl_surface", object_id=surface)]
    assert events == [("preferred_buffer_scale", (1,)), ("preferred_buffer_transform", (0,)),
                      ("enter", (output,))]
    w = shell.mapped_windows()[0]
    comp.configure(w, 0, 0, [ToplevelState.SUSPENDED])
    c.receive(0)
    assert c.take("xdg_toplevel", "configure")[-1].args[2] == struct.pack("=I", 9)
    c.destroy(app.shm, "release")
    c.roundtrip()
    assert c.take("wl_display", "delete_id")[-1].args == (app.shm,)
    c.core.close()
