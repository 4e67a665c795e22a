"""xdg-shell and decorations in the sans-IO compositor, with raw clients.

Mapping and unmapping as the agent sees it, configure serials, window geometry,
size hints and parents, popups placed by their positioner, decorations, and
each xdg protocol error with its object and code.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator

import pytest
from compositor_wire import App, CoreClient
from test_compositor_core import World, error_of, pixels

from qubesshm.compositor.shell import WindowKind
from qubesshm.pixels.region import Rect


@pytest.fixture
def world() -> Iterator[World]:
    w = World()
    yield w
    for client in list(w.comp.clients):
        client.close()


def mapped_toplevel(world: World, app: App, title: str = "t", size: tuple[int, int] = (40, 30),
                    ) -> tuple[int, int, int]:
    surface, xdg, top = app.toplevel(title)
    app.show(surface, app.buffer(pixels(*size)))
    app.c.roundtrip()
    return surface, xdg, top


# -- mapping ---------------------------------------------------------------------


def test_a_toplevel_maps_on_its_first_buffer_after_the_initial_configure(world: World) -> None:
    app = world.app()
    surface, _, _ = app.toplevel("first")
    assert world.shell.names() == []
    app.c.take()
    app.show(surface, app.buffer(pixels(40, 30)))
    app.c.roundtrip()
    assert world.shell.names() == ["mapped", "committed"]
    w = world.shell.mapped_windows()[0]
    assert (w.kind, w.title, w.mapped) == (WindowKind.TOPLEVEL, "first", True)
    assert world.shell.commits[-1].geometry == Rect(0, 0, 40, 30)


def test_the_initial_configure_sequence(world: World) -> None:
    app = world.app()
    surface = app.surface()
    xdg = app.c.create(app.wm_base, "get_xdg_surface", "xdg_surface", surface)
    top = app.c.create(xdg, "get_toplevel", "xdg_toplevel")
    app.c.request(surface, "commit")
    app.c.roundtrip()
    events = [(e.interface, e.name, e.args) for e in app.c.take()]
    assert events == [
        # fullscreen (3) and minimize (4): what the GUI protocol carries to dom0
        ("xdg_toplevel", "wm_capabilities", (struct.pack("=2I", 3, 4),)),
        ("xdg_toplevel", "configure_bounds", (1920, 1080)),
        ("xdg_toplevel", "configure", (0, 0, b"")),
        ("xdg_surface", "configure", (world.comp.serial,)),
    ]
    assert top


@pytest.mark.parametrize("how", ["null buffer", "role destroyed", "surface destroyed"])
def test_a_toplevel_unmaps(world: World, how: str) -> None:
    app = world.app()
    surface, xdg, top = mapped_toplevel(world, app)
    if how == "null buffer":
        app.show(surface, None)
    elif how == "role destroyed":
        app.c.destroy(top)
    else:
        app.c.destroy(top)
        app.c.destroy(xdg)
        app.c.destroy(surface)
    app.c.roundtrip()
    assert world.shell.names()[-1] == "unmapped"
    assert world.shell.mapped_windows() == []


def test_after_a_null_buffer_the_client_starts_again_with_an_initial_commit(
        world: World) -> None:
    app = world.app()
    surface, xdg, _ = mapped_toplevel(world, app)
    app.show(surface, None)
    app.c.roundtrip()
    app.c.take()
    app.c.request(surface, "commit")
    app.c.roundtrip()
    app.ack(xdg)
    app.show(surface, app.buffer(pixels(20, 20)))
    app.c.roundtrip()
    assert world.shell.names()[-2:] == ["mapped", "committed"]


def test_hooks_fire_for_mapped_windows_only(world: World) -> None:
    app = world.app()
    surface, _, top = app.toplevel("before")
    app.c.request(top, "set_app_id", "app.before")
    app.c.request(top, "set_min_size", 10, 10)
    app.c.request(surface, "commit")
    app.c.roundtrip()
    assert world.shell.names() == []
    app.show(surface, app.buffer(pixels(40, 30)))
    app.c.roundtrip()
    w = world.shell.mapped_windows()[0]
    assert (w.title, w.app_id, w.min_size, w.max_size) == ("before", "app.before", (10, 10),
                                                          (0, 0))
    app.c.request(top, "set_title", "after")
    app.c.request(top, "set_app_id", "app.after")
    app.c.request(top, "set_max_size", 500, 400)
    app.c.roundtrip()
    assert world.shell.names()[-2:] == ["title", "app_id"]  # size hints wait for a commit
    app.c.request(surface, "commit")
    app.c.roundtrip()
    assert world.shell.names()[-1] == "size_hints"
    assert (w.title, w.app_id, w.max_size) == ("after", "app.after", (500, 400))


def test_window_geometry_is_clamped_to_the_surfaces(world: World) -> None:
    app = world.app()
    surface, xdg, _ = app.toplevel()
    app.c.request(xdg, "set_window_geometry", 5, 6, 100, 10)
    app.show(surface, app.buffer(pixels(40, 30)))
    app.c.roundtrip()
    assert world.shell.commits[-1].geometry == Rect(5, 6, 35, 10)
    app.c.request(xdg, "set_window_geometry", 1, 2, 3, 4)
    app.c.request(surface, "commit")  # no new content: the geometry alone is offered
    app.c.roundtrip()
    assert world.shell.commits[-1].geometry == Rect(1, 2, 3, 4)


def test_parents_follow_mapping(world: World) -> None:
    app = world.app()
    a_surface, _, a = mapped_toplevel(world, app, "a")
    b_surface, _, b = app.toplevel("b")
    app.c.request(b, "set_parent", a)
    app.show(b_surface, app.buffer(pixels(10, 10)))
    c_surface, _, c = app.toplevel("c")
    app.c.request(c, "set_parent", b)
    app.show(c_surface, app.buffer(pixels(10, 10)))
    app.c.roundtrip()
    by_title = {w.title: w for w in world.shell.mapped_windows()}
    assert by_title["b"].parent is by_title["a"] and by_title["c"].parent is by_title["b"]
    app.show(b_surface, None)  # b unmaps: c is transient for a now
    app.c.roundtrip()
    assert by_title["c"].parent is by_title["a"]
    assert ("parent", by_title["c"]) in world.shell.calls
    app.c.request(a, "set_parent", c)  # a loop
    err = error_of(app)
    assert (err.object_id, err.code) == (a, 1)
    assert a_surface


# -- errors ----------------------------------------------------------------------


def test_xdg_errors(world: World) -> None:
    def unconfigured(app: App) -> tuple[int, int]:
        surface = app.surface()
        xdg = app.c.create(app.wm_base, "get_xdg_surface", "xdg_surface", surface)
        app.c.create(xdg, "get_toplevel", "xdg_toplevel")
        app.show(surface, app.buffer(pixels(4, 4)))
        return xdg, 3

    def has_buffer(app: App) -> tuple[int, int]:
        surface = app.surface()
        app.c.request(surface, "attach", app.buffer(pixels(4, 4)), 0, 0)
        xdg = app.c.create(app.wm_base, "get_xdg_surface", "xdg_surface", surface)
        return xdg, 3

    def role(app: App) -> tuple[int, int]:
        parent = app.surface()
        child = app.surface()
        app.c.create(app.subcompositor, "get_subsurface", "wl_subsurface", child, parent)
        app.c.create(app.wm_base, "get_xdg_surface", "xdg_surface", child)
        return app.wm_base, 0

    def twice(app: App) -> tuple[int, int]:
        surface = app.surface()
        app.c.create(app.wm_base, "get_xdg_surface", "xdg_surface", surface)
        app.c.create(app.wm_base, "get_xdg_surface", "xdg_surface", surface)
        return app.wm_base, 0

    def already_constructed(app: App) -> tuple[int, int]:
        surface = app.surface()
        xdg = app.c.create(app.wm_base, "get_xdg_surface", "xdg_surface", surface)
        app.c.create(xdg, "get_toplevel", "xdg_toplevel")
        app.c.create(xdg, "get_toplevel", "xdg_toplevel")
        return xdg, 2

    def not_constructed(app: App) -> tuple[int, int]:
        surface = app.surface()
        xdg = app.c.create(app.wm_base, "get_xdg_surface", "xdg_surface", surface)
        app.c.request(surface, "commit")
        return xdg, 1

    def bad_serial(app: App) -> tuple[int, int]:
        _, xdg, _ = app.toplevel()
        app.c.request(xdg, "ack_configure", 12345)
        return xdg, 4

    def stale_serial(app: App) -> tuple[int, int]:
        _, xdg, _ = mapped_toplevel(world, app)
        w = world.shell.mapped_windows()[-1]
        world.comp.configure(w, 10, 10)
        world.comp.configure(w, 20, 20)
        app.c.receive(0)
        serials = [e.args[0] for e in app.c.take("xdg_surface", "configure", xdg)]
        app.c.request(xdg, "ack_configure", serials[1])
        app.c.request(xdg, "ack_configure", serials[0])
        return xdg, 4

    def geometry(app: App) -> tuple[int, int]:
        _, xdg, _ = app.toplevel()
        app.c.request(xdg, "set_window_geometry", 0, 0, 0, 5)
        return xdg, 5

    def defunct_role(app: App) -> tuple[int, int]:
        _, xdg, _ = app.toplevel()
        app.c.destroy(xdg)
        return xdg, 6

    def defunct_surfaces(app: App) -> tuple[int, int]:
        app.toplevel()
        app.c.destroy(app.wm_base)
        return app.wm_base, 1

    def min_max(app: App) -> tuple[int, int]:
        surface, _, top = app.toplevel()
        app.c.request(top, "set_min_size", 100, 10)
        app.c.request(top, "set_max_size", 50, 0)
        app.c.request(surface, "commit")
        return top, 2

    def negative_size(app: App) -> tuple[int, int]:
        _, _, top = app.toplevel()
        app.c.request(top, "set_min_size", -1, 10)
        return top, 2

    def own_parent(app: App) -> tuple[int, int]:
        _, _, top = app.toplevel()
        app.c.request(top, "set_parent", top)
        return top, 1

    def positioner_size(app: App) -> tuple[int, int]:
        positioner = app.c.create(app.wm_base, "create_positioner", "xdg_positioner")
        app.c.request(positioner, "set_size", 0, 5)
        return positioner, 0

    def positioner_anchor(app: App) -> tuple[int, int]:
        positioner = app.c.create(app.wm_base, "create_positioner", "xdg_positioner")
        app.c.request(positioner, "set_anchor", 9)
        return positioner, 0

    def incomplete_positioner(app: App) -> tuple[int, int]:
        _, parent, _ = app.toplevel()
        positioner = app.c.create(app.wm_base, "create_positioner", "xdg_positioner")
        app.c.request(positioner, "set_size", 10, 10)
        surface = app.surface()
        xdg = app.c.create(app.wm_base, "get_xdg_surface", "xdg_surface", surface)
        app.c.create(xdg, "get_popup", "xdg_popup", parent, positioner)
        return app.wm_base, 5

    def popup_parent(app: App) -> tuple[int, int]:
        parent_surface = app.surface()
        parent = app.c.create(app.wm_base, "get_xdg_surface", "xdg_surface", parent_surface)
        positioner = complete_positioner(app)
        surface = app.surface()
        xdg = app.c.create(app.wm_base, "get_xdg_surface", "xdg_surface", surface)
        app.c.create(xdg, "get_popup", "xdg_popup", parent, positioner)
        return app.wm_base, 3

    def toplevel_then_popup(app: App) -> tuple[int, int]:
        _, parent, _ = app.toplevel()
        surface = app.surface()
        xdg = app.c.create(app.wm_base, "get_xdg_surface", "xdg_surface", surface)
        top = app.c.create(xdg, "get_toplevel", "xdg_toplevel")
        app.c.destroy(top)
        app.c.destroy(xdg)
        xdg = app.c.create(app.wm_base, "get_xdg_surface", "xdg_surface", surface)
        app.c.create(xdg, "get_popup", "xdg_popup", parent, complete_positioner(app))
        return app.wm_base, 0

    cases = [unconfigured, has_buffer, role, twice, already_constructed, not_constructed,
             bad_serial, stale_serial, geometry, defunct_role, defunct_surfaces, min_max,
             negative_size, own_parent, positioner_size, positioner_anchor,
             incomplete_positioner, popup_parent, toplevel_then_popup]
    for case in cases:
        app = world.app()
        expected = case(app)
        err = error_of(app)
        assert (err.object_id, err.code) == expected, (case.__name__, err)


def complete_positioner(app: App, size: tuple[int, int] = (50, 40),
                        anchor_rect: tuple[int, int, int, int] = (10, 10, 1, 1),
                        anchor: int = 8, gravity: int = 8, adjustment: int = 0) -> int:
    positioner = app.c.create(app.wm_base, "create_positioner", "xdg_positioner")
    app.c.request(positioner, "set_size", *size)
    app.c.request(positioner, "set_anchor_rect", *anchor_rect)
    app.c.request(positioner, "set_anchor", anchor)
    app.c.request(positioner, "set_gravity", gravity)
    app.c.request(positioner, "set_constraint_adjustment", adjustment)
    return positioner


# -- popups ----------------------------------------------------------------------


def test_a_popup_is_placed_by_its_positioner_and_maps_with_its_place(world: World) -> None:
    app = world.app()
    _, parent_xdg, _ = mapped_toplevel(world, app, "parent", (200, 100))
    parent = world.shell.mapped_windows()[0]
    world.shell.origins[parent.id] = (300, 200)
    positioner = complete_positioner(app, anchor_rect=(20, 30, 10, 5))
    surface = app.surface()
    xdg = app.c.create(app.wm_base, "get_xdg_surface", "xdg_surface", surface)
    popup = app.c.create(xdg, "get_popup", "xdg_popup", parent_xdg, positioner)
    app.c.request(surface, "commit")
    app.c.roundtrip()
    configure = app.c.take("xdg_popup", "configure", popup)
    # anchor bottom-right of (20, 30, 10, 5), gravity bottom-right: at (30, 35).
    assert configure[-1].args == (30, 35, 50, 40)
    app.ack(xdg)
    app.show(surface, app.buffer(pixels(50, 40)))
    app.c.roundtrip()
    w = world.shell.mapped_windows()[-1]
    assert w.kind is WindowKind.POPUP and w.parent is parent
    assert w.popup_place == Rect(330, 235, 50, 40)


def test_a_popup_is_kept_on_the_screen(world: World) -> None:
    app = world.app()
    _, parent_xdg, _ = mapped_toplevel(world, app, "parent", (200, 100))
    parent = world.shell.mapped_windows()[0]
    world.shell.origins[parent.id] = (1800, 0)
    flip_x = 4
    positioner = complete_positioner(app, anchor_rect=(100, 10, 1, 1), adjustment=flip_x)
    surface = app.surface()
    xdg = app.c.create(app.wm_base, "get_xdg_surface", "xdg_surface", surface)
    popup = app.c.create(xdg, "get_popup", "xdg_popup", parent_xdg, positioner)
    app.c.request(surface, "commit")
    app.c.roundtrip()
    x, y, width, height = app.c.take("xdg_popup", "configure", popup)[-1].args
    assert (x, y, width, height) == (101 - 1 - 50, 11, 50, 40)  # flipped to the left


def test_reposition_sends_repositioned_then_a_new_place(world: World) -> None:
    app = world.app()
    _, parent_xdg, _ = mapped_toplevel(world, app, "parent", (200, 100))
    surface = app.surface()
    xdg = app.c.create(app.wm_base, "get_xdg_surface", "xdg_surface", surface)
    popup = app.c.create(xdg, "get_popup", "xdg_popup", parent_xdg, complete_positioner(app))
    app.c.request(surface, "commit")
    app.c.roundtrip()
    app.ack(xdg)
    app.show(surface, app.buffer(pixels(50, 40)))
    app.c.roundtrip()
    app.c.take()
    app.c.request(popup, "reposition", complete_positioner(app, anchor_rect=(0, 0, 1, 1)), 77)
    app.c.roundtrip()
    events = [(e.name, e.args) for e in app.c.take() if e.object_id in (popup, xdg)]
    assert events[0] == ("repositioned", (77,))
    assert events[1] == ("configure", (1, 1, 50, 40))
    assert events[2][0] == "configure"
    w = world.shell.mapped_windows()[-1]
    assert w.popup_place == Rect(10 + 1, 10 + 1, 50, 40)  # the new place waits for the ack
    app.c.request(xdg, "ack_configure", events[2][1][0])
    app.c.request(surface, "commit")
    app.c.roundtrip()
    assert w.popup_place == Rect(1, 1, 50, 40)


def test_a_grab_without_a_press_serial_is_denied_and_the_popup_dismissed(
        world: World) -> None:
    app = world.app()
    _, parent_xdg, _ = mapped_toplevel(world, app, "parent", (200, 100))
    seat = app.c.bind("wl_seat")
    surface = app.surface()
    xdg = app.c.create(app.wm_base, "get_xdg_surface", "xdg_surface", surface)
    popup = app.c.create(xdg, "get_popup", "xdg_popup", parent_xdg, complete_positioner(app))
    # No button or key was ever pressed for this client: no serial can be a press's.
    app.c.request(popup, "grab", seat, world.comp.serial)
    app.c.roundtrip()
    assert app.c.take("xdg_popup", "popup_done", popup)
    app.c.request(surface, "commit")
    app.c.roundtrip()
    assert not app.c.take("xdg_popup", "configure", popup)


def test_popups_are_dismissed_with_their_parent(world: World) -> None:
    app = world.app()
    parent_surface, parent_xdg, _ = mapped_toplevel(world, app, "parent", (200, 100))
    surface = app.surface()
    xdg = app.c.create(app.wm_base, "get_xdg_surface", "xdg_surface", surface)
    popup = app.c.create(xdg, "get_popup", "xdg_popup", parent_xdg, complete_positioner(app))
    app.c.request(surface, "commit")
    app.c.roundtrip()
    app.ack(xdg)
    app.show(surface, app.buffer(pixels(50, 40)))
    app.c.roundtrip()
    assert len(world.shell.mapped_windows()) == 2
    app.show(parent_surface, None)
    app.c.roundtrip()
    assert app.c.take("xdg_popup", "popup_done", popup)
    assert world.shell.mapped_windows() == []
    assert world.shell.names()[-2:] == ["unmapped", "unmapped"]


# -- decorations --------------------------------------------------------------------


def test_decorations_are_always_server_side(world: World) -> None:
    app = world.app()
    manager = app.c.bind("zxdg_decoration_manager_v1")
    surface = app.surface()
    xdg = app.c.create(app.wm_base, "get_xdg_surface", "xdg_surface", surface)
    top = app.c.create(xdg, "get_toplevel", "xdg_toplevel")
    decoration = app.c.create(manager, "get_toplevel_decoration",
                              "zxdg_toplevel_decoration_v1", top)
    app.c.request(decoration, "set_mode", 1)  # client side, please
    app.c.request(surface, "commit")
    app.c.roundtrip()
    names = [(e.interface, e.name, e.args) for e in app.c.take()]
    assert ("zxdg_toplevel_decoration_v1", "configure", (2,)) in names
    assert names[-1][:2] == ("xdg_surface", "configure")
    app.c.request(decoration, "unset_mode")
    app.c.roundtrip()
    names = [(e.interface, e.name, e.args) for e in app.c.take()]
    assert names[-2:] == [("zxdg_toplevel_decoration_v1", "configure", (2,)),
                          ("xdg_surface", "configure", (world.comp.serial,))]


def test_decoration_errors(world: World) -> None:
    def twice(app: App, manager: int) -> tuple[int, int]:
        _, _, top = app.toplevel()
        app.c.create(manager, "get_toplevel_decoration", "zxdg_toplevel_decoration_v1", top)
        second = app.c.create(manager, "get_toplevel_decoration",
                              "zxdg_toplevel_decoration_v1", top)
        return second, 1

    def late(app: App, manager: int) -> tuple[int, int]:
        _, _, top = mapped_toplevel(world, app)
        decoration = app.c.create(manager, "get_toplevel_decoration",
                                  "zxdg_toplevel_decoration_v1", top)
        return decoration, 0

    def orphaned(app: App, manager: int) -> tuple[int, int]:
        _, _, top = app.toplevel()
        decoration = app.c.create(manager, "get_toplevel_decoration",
                                  "zxdg_toplevel_decoration_v1", top)
        app.c.destroy(top)
        return decoration, 2

    for case in (twice, late, orphaned):
        app = world.app()
        manager = app.c.bind("zxdg_decoration_manager_v1")
        expected = case(app, manager)
        err = error_of(app)
        assert (err.object_id, err.code) == expected, (case.__name__, err)


def test_client_teardown_unmaps_its_windows(world: World) -> None:
    app = world.app()
    mapped_toplevel(world, app)
    mapped_toplevel(world, app)
    assert len(world.shell.mapped_windows()) == 2
    assert isinstance(app.c, CoreClient)
    app.c.core.close()
    assert world.shell.mapped_windows() == []
    assert world.comp.windows() == []


def test_an_ack_in_flight_when_the_window_unmapped_is_no_error(world: World) -> None:
    app = world.app()
    surface, xdg, _ = mapped_toplevel(world, app)
    world.comp.configure(world.shell.mapped_windows()[0], 300, 200)
    app.c.receive(0)
    serial = [e.args[0] for e in app.c.take("xdg_surface", "configure", xdg)][-1]
    app.show(surface, None)  # unmaps before it read the configure
    app.c.request(xdg, "ack_configure", serial)
    app.c.roundtrip()
    # It configures nothing: a buffer now is still too early.
    app.c.request(surface, "commit")
    app.c.roundtrip()
    app.ack(xdg)
    app.show(surface, app.buffer(pixels(30, 20)))
    app.c.roundtrip()
    assert world.shell.names()[-2:] == ["mapped", "committed"]
