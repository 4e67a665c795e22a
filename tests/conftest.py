"""Shared fixtures: a real headless Weston, and qubesshm relaying to it."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from procs import RunningProxy, start_proxy

from qubesshm.headless import HeadlessWeston
from qubesshm.relay.session import RelaySession


@pytest.fixture(scope="session")
def weston() -> Iterator[HeadlessWeston]:
    """One headless Weston (pixman, --debug for screenshots, animations off so that
    shots never catch a fade) for the whole run."""
    with HeadlessWeston(animations=False) as compositor:
        yield compositor


@pytest.fixture(scope="session")
def desktop_weston() -> Iterator[HeadlessWeston]:
    """Weston as users run it: 1920x1080, the desktop shell with its shipped
    animations (a start-up fade, closed windows faded out), pixman."""
    with HeadlessWeston(width=1920, height=1080, socket_name="wayland-desktop") as compositor:
        yield compositor


@pytest.fixture
def sim_env(weston: HeadlessWeston, tmp_path: Path) -> dict[str, str]:
    """Weston's environment with a simulated kernel of this test's own."""
    root = tmp_path / "sim"
    root.mkdir(mode=0o700)
    return dict(weston.env(), QUBESSHM_SIM_ROOT=str(root), QUBESSHM_GRANTS="sim")


@pytest.fixture
def proxy(weston: HeadlessWeston, tmp_path: Path) -> Iterator[RunningProxy]:
    """``qubesshm serve`` relaying to the session's Weston; must exit 0 on SIGTERM."""
    running = start_proxy(weston, tmp_path / "qubesshm.log", socket_name=f"qs-{os.getpid()}")
    yield running
    assert running.stop() == 0, running.log()
    assert "Traceback" not in running.log(), running.log()


@pytest.fixture(params=[True, False], ids=["fast-path", "full-path"])
def both_relay_paths(request: pytest.FixtureRequest,
                     monkeypatch: pytest.MonkeyPatch) -> None:
    """Run a sans-IO session test twice: with the relay's fast path, and without."""
    monkeypatch.setattr(RelaySession, "fast_path_enabled", request.param)
