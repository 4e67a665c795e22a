"""Limits slow a client down and never kill one a compositor would serve.

Sans-IO, on the simulated hypervisor with a fake clock: a commit that finds no
room under the client's cap or the gntalloc limit waits (the session parks it),
falls back to fewer output buffers, or re-fills the one on screen in place; only a
single buffer that can never fit is refused with ``no_memory``.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from messages import PROTO, parse_error
from test_bridge import World, attached, event, pattern, released, req

from qubesshm.grants.api import PAGE_SIZE
from qubesshm.grants.lifetimes import (
    DEFAULT_CACHE_PAGES,
    DEFAULT_CLIENT_PAGES,
    UHD_BUFFER_PAGES,
    default_cache_pages,
    default_client_pages,
    pages_for,
)
from qubesshm.relay.session import RelaySession, Step
from qubesshm.wire.codec import ErrorCode, UntypedNewId

pytestmark = pytest.mark.usefixtures("both_relay_paths")

W, H = 64, 64  # 16 KiB of pixels: 5 pages with the notify byte
PAGES = pages_for(W * H * 4)


@pytest.fixture
def world(tmp_path: Path) -> Iterator[World]:
    w = World(tmp_path / "sim")
    w.setup()
    yield w
    w.close()


def client_buffer(world: World, seed: int = 0) -> tuple[int, int]:
    """A 64x64 shm buffer drawn with a pattern: (buffer id, its memfd)."""
    pool, fd = world.pool(W * H * 4, pattern(W, H, seed))
    return world.buffer(pool, 0, W, H, W * 4)[1], fd


def test_defaults_fit_three_4k_buffers_and_the_cache() -> None:
    assert UHD_BUFFER_PAGES == pages_for(3840 * 2160 * 4) == 8101
    assert DEFAULT_CLIENT_PAGES == 3 * 8101 + DEFAULT_CACHE_PAGES == 40687
    # A Qubes VM's limit: the figures themselves.
    assert default_client_pages(1 << 30) == 40687
    assert default_cache_pages(1 << 30) == 16384
    # Linux's 1024 pages: no client may take more than half, the cache a quarter.
    assert default_client_pages(1024) == 512 and default_cache_pages(1024) == 256
    # Real Xen hiding the limit.
    assert default_client_pages(None) == 40687


def test_one_buffer_larger_than_the_cap_is_refused_naming_the_option(world: World) -> None:
    world.lifetimes.policy.client_pages = PAGES - 1
    buffer, _ = client_buffer(world)
    step, _ = world.commit(world.surface(), buffer, (0, 0, W, H))
    assert step.error is not None and step.error.code is ErrorCode.NO_MEMORY
    _, _, message = parse_error(step.to_client)
    assert isinstance(message, str)
    assert message.endswith(f"a buffer of {PAGES} pages is more than what a client may hold "
                            f"({PAGES - 1} pages); raise --client-pages")
    assert world.lifetimes.counters.refused == 1


def test_a_commit_over_the_cap_waits_for_room_and_goes_on_when_it_comes(
        world: World) -> None:
    world.lifetimes.policy.client_pages = PAGES + 2  # one output buffer's worth
    first, _ = client_buffer(world, 1)
    one = world.surface()
    _, got = world.commit(one, first, (0, 0, W, H))
    shown_one = attached(got)
    # A second window: no room for its output while the first one's is held.
    second, fd = client_buffer(world, 2)
    two = world.surface()
    step, got = world.commit(two, second, (0, 0, W, H))
    assert step.error is None, step.error
    assert world.session.blocked and world.session.waiting_for_room
    assert [m.name for m in got] == ["damage_buffer"]
    assert not released(step, second), "the client's buffer is not copied yet"
    # Requests behind it wait with it, in order.
    sync = world.new_id()
    _, got = world.send(req(1, "wl_display", "sync", sync))
    assert got == []
    assert world.session.retry().to_compositor == []  # no room yet: still waiting
    world.clock.now += 0.25
    # The compositor releases the first window's buffer (as one that copies shm buffers
    # to the screen does): the proxy takes that output back for the waiting commit.
    step = world.events(event(shown_one, "wl_buffer", "release"))
    got = world.comp.take(step)
    names = [(m.object_id, m.name) for m in got]
    assert names[0] == (shown_one, "destroy")
    assert [name for _, name in names][-3:] == ["attach", "commit", "sync"]
    assert world.comp.pixels(attached(got)) == os.pread(fd, W * H * 4, 0)
    assert released(step, second) and not world.session.blocked
    counters = world.ledger.total
    assert counters.commit_waits.summary()["count"] == 1
    assert counters.commit_waits.summary()["max"] == 250.0
    assert counters.waits_for_room == 1 and counters.commits == 2


def test_under_a_tight_cap_the_buffer_on_screen_is_filled_again_in_place(
        world: World) -> None:
    # One and a half buffers' worth: a second output never fits.
    world.lifetimes.policy.client_pages = PAGES + PAGES // 2
    buffer, fd = client_buffer(world)
    surface = world.surface()
    _, got = world.commit(surface, buffer, (0, 0, W, H))
    out = attached(got)
    pools = len(world.comp.pools)
    for frame in range(1, 6):
        os.pwrite(fd, bytes([frame]) * 8, (frame * W + frame) * 4)
        before = world.ledger.total.bytes_copied
        step, got = world.commit(surface, buffer, (frame, frame, 2, 1))
        assert step.error is None and not world.session.blocked
        # The compositor never released it (it shows it): filled again, attached again.
        assert attached(got) == out
        assert world.comp.pixels(out) == os.pread(fd, W * H * 4, 0)
        assert world.ledger.total.bytes_copied - before == 8, "only the damage is copied"
        assert released(step, buffer)
    assert len(world.comp.pools) == pools, "no new grant"
    counters = world.ledger.total
    assert counters.refills_in_place == 5
    assert counters.commit_waits.summary()["count"] == 0
    assert counters.pages.in_use == PAGES, "one buffer in use, counted once"
    # The compositor lets go of it in the end: nothing stays in use.
    world.events(event(out, "wl_buffer", "release"))
    assert counters.pages.in_use == 0


def test_with_room_for_two_a_surface_waits_for_the_older_release(world: World) -> None:
    world.lifetimes.policy.client_pages = 2 * PAGES + 2
    buffer, fd = client_buffer(world)
    surface = world.surface()
    outs = []
    for frame in range(2):
        os.pwrite(fd, bytes([0x40 + frame]) * 4, frame * 4)
        _, got = world.commit(surface, buffer, (frame, 0, 1, 1))
        outs.append(attached(got))
    assert outs[0] != outs[1]
    # Neither released: the older one will be (the newer replaced it), so wait for it.
    os.pwrite(fd, b"\x77" * 4, 9 * 4)
    step, _ = world.commit(surface, buffer, (9, 0, 1, 1))
    assert world.session.blocked and world.session.waiting_for_room
    world.clock.now += 0.1
    step = world.events(event(outs[0], "wl_buffer", "release"))
    got = world.comp.take(step)
    assert attached(got) == outs[0]
    # It lacked the second frame's damage and this one's: both copied.
    assert world.comp.pixels(outs[0]) == os.pread(fd, W * H * 4, 0)
    assert world.ledger.total.refills_in_place == 0
    assert world.ledger.total.waits_for_room == 1


def test_a_window_resized_under_a_tight_cap_gives_back_the_old_buffer(world: World) -> None:
    world.lifetimes.policy.client_pages = PAGES + 3
    buffer, _ = client_buffer(world)
    surface = world.surface()
    _, got = world.commit(surface, buffer, (0, 0, W, H))
    old = attached(got)
    # Grown by a row: one page more; the old buffer is on screen and held.
    pool, fd = world.pool(W * (H + 4) * 4, pattern(W, H + 4, 9))
    _, bigger = world.buffer(pool, 0, W, H + 4, W * 4)
    step, got = world.commit(surface, bigger, (0, 0, W, H + 4))
    assert step.error is None and not world.session.blocked
    names = [(m.interface, m.name) for m in got]
    # Destroyed in the batch that attaches its successor: no repaint falls between.
    assert names.index(("wl_buffer", "destroy")) < names.index(("wl_surface", "attach"))
    assert world.comp.pixels(attached(got)) == os.pread(fd, W * (H + 4) * 4, 0)
    assert attached(got) != old
    assert world.ledger.total.pages.in_use == pages_for(W * (H + 4) * 4)


def send(session: RelaySession, *messages: tuple[bytes, list[int]]) -> Step:
    return session.from_client(b"".join(m[0] for m in messages),
                               [fd for m in messages for fd in m[1]])


def test_the_gntalloc_limit_shared_by_two_clients_makes_the_second_wait(
        world: World) -> None:
    world.hv.params.gntalloc_limit = PAGES + 2
    world.lifetimes.policy.client_pages = 100  # the limit, not the cap, is what binds
    buffer, _ = client_buffer(world)
    step, got = world.commit(world.surface(), buffer, (0, 0, W, H))
    assert step.error is None, step.error
    shown = attached(got)
    world.mapped.add(world.comp.pool_file(shown))  # the compositor maps the first's pool
    # A second client of the same proxy, on its own compositor connection.
    woken: list[int] = []
    world.lifetimes.on_room = lambda: woken.append(1)
    other = RelaySession(PROTO, grants=world.lifetimes, clock=world.clock, owner=2)
    send(other, req(1, "wl_display", "get_registry", 2))
    other.from_compositor(event(2, "wl_registry", "global", 1, "wl_compositor", 4)
                          + event(2, "wl_registry", "global", 2, "wl_shm", 1))
    send(other, req(2, "wl_registry", "bind", 1, UntypedNewId("wl_compositor", 4, 3)),
         req(2, "wl_registry", "bind", 2, UntypedNewId("wl_shm", 1, 4)))
    fd = world.memfd(W * H * 4, pattern(W, H, 3))
    step = send(other, req(4, "wl_shm", "create_pool", 5, os.dup(fd), W * H * 4),
                req(5, "wl_shm_pool", "create_buffer", 6, 0, W, H, W * 4, 1),
                req(3, "wl_compositor", "create_surface", 7),
                req(7, "wl_surface", "attach", 6, 0, 0),
                req(7, "wl_surface", "commit"))
    assert step.error is None, step.error
    assert other.blocked and other.waiting_for_room
    assert other.retry().to_compositor == [] and other.blocked  # nothing moved yet
    # The first client goes. The compositor still maps its pool, but the kernel does
    # not count a deferred grant against the limit: the proxy hands that area to
    # deferred reclaim for room, and the second client goes on.
    world.session.end()
    assert woken, "the lifetimes said pages moved"
    step = other.retry()
    assert step.error is None and not other.blocked
    assert b"".join(d for d, _ in step.to_compositor), "its commit went upstream"
    assert world.lifetimes.counters.deferred_for_room == 1
    assert world.hv.deferred_pages == PAGES
    # Once the compositor lets go, the kernel reclaims it: nothing leaked.
    world.mapped.clear()
    world.clock.now += 1.0
    world.halves.tick()
    assert world.hv.deferred_pages == 0 and world.hv.counters.leaked_count == 0
    other.end()


def test_pages_for_the_defaults_are_whole_pages() -> None:
    assert DEFAULT_CLIENT_PAGES * PAGE_SIZE == 40687 * 4096


# -- windows closed while the compositor still shows them (close animations) -------------


def drawn_window(world: World, seed: int) -> tuple[int, int, int]:
    """A window drawn once: its surface, the client's buffer and the output buffer's
    upstream id."""
    buffer, _ = client_buffer(world, seed)
    surface = world.surface()
    _, got = world.commit(surface, buffer, (0, 0, W, H))
    return surface, buffer, attached(got)


def close_window(world: World, seed: int) -> int:
    """A window drawn once and destroyed while the compositor holds its buffer (as a
    close animation does): its output buffer's upstream id."""
    surface, _, out = drawn_window(world, seed)
    world.send(req(surface, "wl_surface", "destroy"))
    return out


def test_a_buffer_released_after_its_window_closed_is_cached_and_reused(
        world: World) -> None:
    held = close_window(world, 1)
    # Another window opens while the first fades out: it needs a grant of its own.
    second = close_window(world, 2)
    assert world.lifetimes.counters.cache_hits == 0
    world.clock.now += 1.0  # within the late timeout (2 s)
    assert world.session.poll().to_compositor == []
    step = world.events(event(held, "wl_buffer", "release"))  # the fade-out ended
    names = [m.name for m in world.comp.take(step)]
    assert names == ["destroy"], "destroyed upstream once released, its pool kept"
    assert world.ledger.total.pages.cached == PAGES
    close_window(world, 3)
    assert world.lifetimes.counters.cache_hits == 1, "a later window reuses it"
    world.events(event(second, "wl_buffer", "release"))
    # Each window closed while the compositor still showed its buffer: what an agent
    # ending grants as buffers go would have deferred, counted once per window (not
    # again when the released buffer went to the cache).
    assert sum(world.lifetimes.counters.retired_while_held.values()) == 3 * PAGES


def test_a_closed_windows_output_goes_when_the_client_destroys_its_buffer(
        world: World) -> None:
    # What a churning client does: the window goes, then its buffer. Without the proxy
    # the compositor would lose the buffer now (a close animation has nothing left to
    # draw), so it loses the output now: destroyed upstream in the same batch, its area
    # cached at once for the next window, no wait for the release.
    surface, buffer, out = drawn_window(world, 1)
    world.send(req(surface, "wl_surface", "destroy"))
    assert world.ledger.total.pages.cached == 0, "held: the compositor may show it"
    _, got = world.send(req(buffer, "wl_buffer", "destroy"))
    assert [(m.object_id, m.name) for m in got] == [(out, "destroy")]
    assert world.ledger.total.pages.cached == PAGES
    assert world.ledger.total.pages.in_use == 0
    # Its late release changes nothing, and nothing is left to time out.
    assert world.comp.take(world.events(event(out, "wl_buffer", "release"))) == []
    world.clock.now += 10.0
    assert world.session.poll().to_compositor == []
    assert world.ledger.total.orphans_timed_out == 0
    close_window(world, 2)
    assert world.lifetimes.counters.cache_hits == 1, "the next window reuses it"
    # Counted once as retired while held (the window closed under the compositor).
    assert sum(world.lifetimes.counters.retired_while_held.values()) == 2 * PAGES


def test_a_window_closed_after_its_buffer_was_destroyed_gives_its_output_back_at_once(
        world: World) -> None:
    surface, buffer, out = drawn_window(world, 1)
    # The buffer goes first: the window still shows the output (a compositor that
    # copied the buffer keeps showing it), so it stays.
    assert world.send(req(buffer, "wl_buffer", "destroy"))[1] == []
    _, got = world.send(req(surface, "wl_surface", "destroy"))
    names = [(m.object_id, m.name) for m in got]
    assert (out, "destroy") in names
    assert world.ledger.total.pages.cached == PAGES


def test_a_closed_window_whose_buffer_lives_on_keeps_its_output_until_released(
        world: World) -> None:
    # A client that keeps the buffer (to reuse it) keeps what the compositor shows as
    # well: another buffer's destruction changes nothing.
    held = close_window(world, 1)
    other, _ = client_buffer(world, 2)
    assert world.send(req(other, "wl_buffer", "destroy"))[1] == []
    assert world.ledger.total.pages.cached == 0
    step = world.events(event(held, "wl_buffer", "release"))
    assert [m.name for m in world.comp.take(step)] == ["destroy"]
    assert world.ledger.total.pages.cached == PAGES


def test_a_buffer_held_past_the_late_timeout_is_let_go_not_reused(world: World) -> None:
    world.lifetimes.policy.late_timeout = 2.0
    held = close_window(world, 1)
    pool = world.comp.buffers[held][0]
    world.mapped.add(world.comp.pool_file(held))  # the compositor still maps it
    world.clock.now += 1.9
    assert world.session.poll().to_compositor == []
    world.clock.now += 0.2
    got = world.comp.take(world.session.poll())
    assert [(m.object_id, m.name) for m in got] == [(held, "destroy"), (pool, "destroy")]
    counters = world.ledger.total
    assert counters.orphans_timed_out == 1 and counters.pages.in_use == 0
    assert counters.pages.cached == 0, "never reused: the compositor may still show it"
    assert counters.pages.awaiting_unmap == PAGES
    # A late release changes nothing; once unmapped, the grant ends on its notify.
    assert world.comp.take(world.events(event(held, "wl_buffer", "release"))) == []
    world.mapped.clear()
    world.halves.tick()
    world.lifetimes.on_event()
    assert counters.pages.live == 0 and world.hv.deferred_pages == 0


def test_a_compositor_that_releases_what_it_shows_is_waited_for_not_raced(
        world: World) -> None:
    """Re-filling in place is for compositors that hold the buffer on screen; one that
    copies shm buffers to the screen and releases them (GL renderers) is waited for,
    so the proxy never writes a buffer it may be reading."""
    world.lifetimes.policy.client_pages = PAGES + PAGES // 2
    buffer, fd = client_buffer(world)
    surface = world.surface()
    _, got = world.commit(surface, buffer, (0, 0, W, H))
    out = attached(got)
    world.events(event(out, "wl_buffer", "release"))  # released while on screen
    _, got = world.commit(surface, buffer, (0, 0, 1, 1))
    assert attached(got) == out  # released: simply filled again
    os.pwrite(fd, b"\x55" * 4, 0)
    step, got = world.commit(surface, buffer, (0, 0, 1, 1))
    assert world.session.blocked and world.session.waiting_for_room, "waits, no re-fill"
    assert world.ledger.total.refills_in_place == 0
    step = world.events(event(out, "wl_buffer", "release"))
    got = world.comp.take(step)
    assert attached(got) == out and not world.session.blocked
    assert world.comp.pixels(out) == os.pread(fd, W * H * 4, 0)
    assert world.ledger.total.waits_for_room == 1
