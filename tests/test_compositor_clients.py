"""libwayland clients (pywayland) against the served compositor: the precise cases.

Each test builds a scene whose every pixel it knows, and checks what the
agent was given: subsurface stacking and alpha, synchronized subsurfaces,
viewports, transforms with scale, window geometry, a popup placed by its
positioner, and a protocol error that ends one client while another goes on.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
from compositor_clients import ARGB8888, PyBuffer, PyClient, gradient, solid
from compositor_server import RunningCompositor, serving
from compositor_shell import Commit, rgb, wait_until
from pywayland.protocol.xdg_shell import XdgPositioner

from qubesshm.compositor.shell import WindowKind
from qubesshm.pixels.region import Rect

RED, GREEN, BLUE, GREY = 0xFFFF0000, 0xFF00FF00, 0xFF0000FF, 0xFF808080


@pytest.fixture
def served() -> Iterator[RunningCompositor]:
    with serving(RunningCompositor) as running:
        yield running


@pytest.fixture
def client(served: RunningCompositor) -> Iterator[PyClient]:
    c = PyClient(served.path)
    yield c
    c.disconnect()


def latest(served: RunningCompositor, title: str, after: int = 0) -> Commit:
    """The newest commit of ``title`` once there are more than ``after`` of them."""
    def found() -> Commit | None:
        commits = served.shell.read(
            lambda s: [c for c in s.commits if c.window.title == title])
        return commits[-1] if len(commits) > after else None

    commit = wait_until(found, f"a commit of {title!r}")
    assert commit is not None
    return commit


def count(served: RunningCompositor, title: str) -> int:
    return served.shell.read(lambda s: sum(c.window.title == title for c in s.commits))


def commit_and_wait(client: PyClient, surface: Any, buffer: PyBuffer | None) -> None:
    """Show ``buffer`` (None: just commit) and wait for the commit's frame callback,
    which runs once the agent has rendered it."""
    if buffer is None:
        callback = surface.frame()
        done: list[int] = []
        callback.dispatcher["done"] = lambda cb, time_ms: done.append(time_ms)
        surface.commit()
    else:
        done = client.show(surface, buffer, frame=True)
    client.wait(lambda: bool(done), "the frame callback")


def test_subsurfaces_stack_and_blend(served: RunningCompositor, client: PyClient) -> None:
    window = client.toplevel("stack")
    root = window.surface
    below_surface = client.compositor.create_surface()
    below = client.subcompositor.get_subsurface(below_surface, root)
    above_surface = client.compositor.create_surface()
    above = client.subcompositor.get_subsurface(above_surface, root)
    below.set_position(-10, -10)
    above.set_position(30, 20)
    below.place_below(root)
    client.show(below_surface, client.buffer(solid(30, 30, GREEN)))
    # Half-transparent blue, premultiplied: 0x80 alpha, 0x80 blue.
    client.show(above_surface, client.buffer(solid(20, 20, 0x80000080), ARGB8888))
    commit_and_wait(client, root, client.buffer(solid(100, 80, RED)))
    commit = latest(served, "stack")
    # The tree's bounds start at the lower child: (-10, -10), 110x90.
    assert commit.geometry == Rect(-10, -10, 110, 90)
    image = rgb(commit.image)
    assert image[0, 0] == GREEN & 0xFFFFFF  # the child below, outside the parent
    assert image[15, 15] == RED & 0xFFFFFF  # the parent covers the child below
    assert image[35, 45] == 0x7F0080  # blue over red at half alpha
    assert len(commit.tree.below) == 1 and len(commit.tree.above) == 1


def test_a_synchronized_subsurface_shows_with_its_parent(served: RunningCompositor,
                                                         client: PyClient) -> None:
    window = client.toplevel("sync")
    root = window.surface
    child_surface = client.compositor.create_surface()
    child = client.subcompositor.get_subsurface(child_surface, root)
    child.set_position(10, 10)
    commit_and_wait(client, root, client.buffer(solid(64, 48, RED)))
    client.show(child_surface, client.buffer(solid(16, 16, GREEN)))
    client.roundtrip()
    before = count(served, "sync")
    assert all(len(c.tree.above) == 0 for c in served.shell.read(
        lambda s: [c for c in s.commits if c.window.title == "sync"]))
    commit_and_wait(client, root, None)  # the parent's commit brings the child's
    commit = latest(served, "sync", before)
    assert rgb(commit.image)[12, 12] == GREEN & 0xFFFFFF
    child.set_desync()
    before = count(served, "sync")
    client.show(child_surface, client.buffer(solid(16, 16, BLUE)))
    client.roundtrip()
    commit = latest(served, "sync", before)
    assert rgb(commit.image)[12, 12] == BLUE & 0xFFFFFF


def test_a_viewport_crops_and_scales(served: RunningCompositor, client: PyClient) -> None:
    window = client.toplevel("viewport")
    pixels = gradient(40, 40)
    viewport = client.viewporter.get_viewport(window.surface)
    viewport.set_source(20.0, 0.0, 20.0, 20.0)
    viewport.set_destination(60, 60)
    commit_and_wait(client, window.surface, client.buffer(pixels))
    commit = latest(served, "viewport")
    assert commit.geometry == Rect(0, 0, 60, 60)
    expected = np.repeat(np.repeat(pixels[0:20, 20:40], 3, axis=0), 3, axis=1)
    assert (rgb(commit.image) == rgb(expected)).all()


@pytest.mark.parametrize("transform", range(8))
def test_buffer_transforms_with_scale(served: RunningCompositor, client: PyClient,
                                      transform: int) -> None:
    window = client.toplevel(f"transform {transform}")
    upright = gradient(24, 16)  # what the surface must show, at buffer scale 2
    big = np.repeat(np.repeat(upright, 2, axis=0), 2, axis=1)
    # The buffer holds the image turned by the transform (buffer = T(surface)).
    buffer = big
    if transform % 2:
        buffer = buffer.T
        if transform in (1, 7):
            buffer = buffer[::-1, :]
        if transform in (3, 7):
            buffer = buffer[:, ::-1]
    else:
        if transform in (2, 6):
            buffer = buffer[::-1, :]
        if transform in (2, 4):
            buffer = buffer[:, ::-1]
    window.surface.set_buffer_transform(transform)
    window.surface.set_buffer_scale(2)
    commit_and_wait(client, window.surface, client.buffer(np.ascontiguousarray(buffer)))
    commit = latest(served, f"transform {transform}")
    assert commit.geometry == Rect(0, 0, 24, 16)
    state = commit.tree.state
    assert (state.transform, state.scale, state.width, state.height) == (transform, 2, 24, 16)
    assert (rgb(commit.image) == rgb(upright)).all()


def test_window_geometry_crops_client_side_shadows(served: RunningCompositor,
                                                   client: PyClient) -> None:
    window = client.toplevel("geometry")
    pixels = solid(120, 100, 0x20000000)  # a faint shadow all round
    pixels[10:90, 10:110] = gradient(100, 80)
    window.xdg_surface.set_window_geometry(10, 10, 100, 80)
    commit_and_wait(client, window.surface, client.buffer(pixels, ARGB8888))
    commit = latest(served, "geometry")
    assert commit.geometry == Rect(10, 10, 100, 80)
    assert (rgb(commit.image) == rgb(gradient(100, 80))).all()
    assert commit.window.geometry == commit.geometry


def test_a_popup_is_placed_by_its_positioner(served: RunningCompositor,
                                             client: PyClient) -> None:
    parent = client.toplevel("menu parent")
    commit_and_wait(client, parent.surface, client.buffer(solid(300, 200, GREY)))
    parent_window = latest(served, "menu parent").window
    served.call(lambda: served.shell.origins.__setitem__(parent_window.id, (1600, 900)))
    positioner = client.wm_base.create_positioner()
    positioner.set_size(150, 120)
    positioner.set_anchor_rect(250, 150, 40, 20)
    positioner.set_anchor(XdgPositioner.anchor.bottom_right.value)
    positioner.set_gravity(XdgPositioner.gravity.bottom_right.value)
    adjust = XdgPositioner.constraint_adjustment
    positioner.set_constraint_adjustment(adjust.flip_x.value | adjust.slide_y.value)
    popup = client.popup(parent, positioner)
    # On screen the parent spans 1600..1900 x 900..1100 of a 1920x1080 screen: the
    # popup (1890..2040 as asked) flips to the left of the anchor (1700..1850), and
    # slides up to fit (1070..1190 as asked).
    assert popup.configures[-1] == (250 - 150, 1080 - 120 - 900, 150, 120)
    commit_and_wait(client, popup.surface, client.buffer(solid(150, 120, BLUE)))
    w = wait_until(lambda: next((w for w in served.shell.mapped_windows()
                                 if w.kind is WindowKind.POPUP), None), "the popup")
    assert w is not None
    assert w.parent is parent_window
    assert w.popup_place == Rect(1600 + 100, 1080 - 120, 150, 120)
    popup.role.destroy()
    client.roundtrip()
    wait_until(lambda: len(served.shell.mapped_windows()) == 1, "the popup to unmap")


def test_a_protocol_error_ends_one_client_and_the_others_carry_on(
        served: RunningCompositor, client: PyClient) -> None:
    steady = client.toplevel("steady")
    buffer = client.buffer(solid(32, 32, GREEN))
    commit_and_wait(client, steady.surface, buffer)
    bad = PyClient(served.path)
    try:
        surface = bad.compositor.create_surface()
        surface.set_buffer_scale(0)
        assert bad.broken()
    finally:
        bad.disconnect()
    for _ in range(5):
        commit_and_wait(client, steady.surface, buffer)
    wait_until(lambda: served.client_count() == 1, "the bad client to be gone")
    assert client.display.roundtrip() >= 0
