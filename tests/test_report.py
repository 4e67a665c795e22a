"""The run report's model and findings, from counters alone (no compositor)."""

from __future__ import annotations

import math
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from qubesshm.report import KERNELS, build_report, deferred_backlog, format_report, kernels_for


@given(added=st.dictionaries(st.integers(0, 60), st.integers(1, 5000), max_size=20),
       fpi=st.integers(1, 2000), seconds=st.floats(0, 80))
def test_the_deferred_list_loses_no_page_and_drains_at_its_rate(
        added: dict[int, int], fpi: int, seconds: float) -> None:
    backlog = deferred_backlog(added, fpi, seconds)
    assert backlog.added == sum(added.values())
    assert backlog.at_exit <= backlog.peak <= backlog.added
    assert backlog.drain_seconds == math.ceil(backlog.at_exit / fpi)
    end = max(math.ceil(seconds), max(added, default=-1) + 1)
    # Each second frees at most fpi pages: what was added minus end·fpi stays at least.
    assert backlog.at_exit >= backlog.added - end * fpi
    assert deferred_backlog(added, fpi + 1, seconds).at_exit <= backlog.at_exit


def test_a_stock_kernel_drains_ten_pages_a_second() -> None:
    # 600 pages at second 0, run of 10 s: 100 drained, 500 left, 50 s more.
    backlog = deferred_backlog({0: 600}, 10, 10.0)
    assert (backlog.peak, backlog.at_exit, backlog.drain_seconds) == (600, 500, 50)


NO_WAITS = {"count": 0, "p50": None, "p99": None, "max": None}


def stats(peak: int = 301, retired: dict[str, int] | None = None,
          **lifetimes: Any) -> dict[str, Any]:
    return {
        "clients": 0, "clients_served": 1, "commits": 40, "bytes_damaged": 1 << 20,
        "bytes_copied": 1 << 20, "early_releases": 20, "client_pools": 20,
        "client_buffers": 20, "upstream_pools": 1, "upstream_buffers": 20,
        "commit_waits_ms": NO_WAITS, "waits_for_room": 0, "refills_in_place": 0,
        "grants": {"peak_live": peak, "shared_total": peak, "deferred": 0, "leaked": 0},
        "release_latency_ms": {"count": 20, "p50": 25.0, "p99": 25.5, "max": 25.6},
        "lifetimes": {"cache_hits": 19, "late_releases": 0, "refused": 0,
                      "peak_pages_wanted": peak,
                      "unmap_latency_ms": {"count": 1, "p50": 0.5, "p99": 0.5, "max": 1500.0},
                      "retired_while_held": retired if retired is not None else {"0": 6020},
                      "seconds": 0.6, **lifetimes},
    }


def test_the_report_carries_the_counters_it_was_made_from() -> None:
    report = build_report(stats(), kernels_for("both"), 2.0)
    assert (report["commits"], report["client_pools"], report["upstream_buffers"],
            report["pages_needed"], report["pages_retired_while_held"],
            report["cache_hits"]) == (40, 20, 20, 301, 6020, 19)
    text = format_report(report)
    assert "the app's 20/20, the compositor's 1/20" in text
    assert "held mappings up to 1.50 s after the proxy let them go" in text


def test_commits_held_back_by_a_limit_are_a_finding() -> None:
    quiet = build_report(stats(), kernels_for("both"), 2.0)
    assert "commits that waited for an output buffer: 0 (0 for grant room); re-filled in " \
        "place 0" in format_report(quiet)
    assert not any("left room for fewer" in f for f in quiet["findings"])
    held = stats()
    held.update(commit_waits_ms={"count": 3, "p50": 10.0, "p99": 40.0, "max": 40.0},
                waits_for_room=2, refills_in_place=7)
    report = build_report(held, kernels_for("both"), 2.0)
    text = format_report(report)
    assert "commits that waited for an output buffer: 3 (2 for grant room), longest " \
        "40.0 ms; re-filled in place 7" in text
    assert ("2 commit(s) waited for room (longest 40.0 ms) and 7 re-filled the buffer on "
            "screen in place") in text


def test_a_report_with_nothing_to_say_says_so() -> None:
    nothing = stats(peak=0, retired={})
    nothing.update(commits=0, bytes_damaged=0, bytes_copied=0, early_releases=0,
                   client_pools=0, client_buffers=0, upstream_pools=0, upstream_buffers=0)
    nothing["grants"].update(shared_total=0)
    report = build_report(nothing, kernels_for("both"), 2.0)
    assert report["findings"] == [
        "the app drew nothing through qubesshm (no wl_shm buffer was committed), so it "
        "needed no grant pages and there is nothing to say about gntalloc limits or "
        "deferred lists"]
    text = format_report(report)
    assert "at least 0 pages" not in text and "n/a" not in text
    nothing["clients_served"] = 0
    alone = build_report(nothing, kernels_for("both"), 2.0)
    assert alone["findings"][0].endswith("no client connected at all: did it find "
                                         "WAYLAND_DISPLAY?")


def test_the_kernel_changes_the_findings_as_its_parameters_say() -> None:
    big = stats(peak=2026, retired={"0": 2026, "3": 2026})
    stock = build_report(big, kernels_for("stock"), 2.0)
    qubes = build_report(big, kernels_for("qubes"), 2.0)
    stock_text, qubes_text = "\n".join(stock["findings"]), "\n".join(qubes["findings"])
    assert "exceed the gntalloc limit" in stock_text
    assert "exceed the gntalloc limit" not in qubes_text
    # 4052 pages over a 4-second run at 10 a second: 40 drained, 4012 left for 402 s.
    assert stock["kernels"]["stock"]["agent_backlog_at_exit"] == 4052 - 40
    assert "leave 4012 there at exit, draining for 402 s more" in stock_text
    # At 1000 a second the first 2026 are gone by second 3; of the second 2026, 1026
    # are left at exit, for 2 s more.
    assert qubes["kernels"]["qubes"]["agent_backlog_at_exit"] == 1026
    assert qubes["kernels"]["qubes"]["agent_drain_seconds"] == 2
    both = build_report(big, kernels_for("both"), 2.0)
    assert set(both["kernels"]) == {"stock", "qubes"}


def test_nothing_held_means_nothing_deferred() -> None:
    text = "\n".join(build_report(stats(retired={}), [KERNELS["stock"]], 2.0)["findings"])
    assert "would have deferred nothing" in text


@pytest.mark.parametrize("bad", [0, -1])
def test_the_model_needs_a_positive_rate(bad: int) -> None:
    with pytest.raises(ValueError):
        deferred_backlog({0: 1}, bad, 1.0)


# The deferred list second by second (the demo's plot); imported here, as this part
# of the file was added after its imports.
def test_the_deferred_list_by_second_as_computed_by_hand() -> None:
    from qubesshm.report import deferred_list_by_second

    # 25 pages in second 0 and 5 in second 2 of a 2.5 s run, 10 freed a second: 25,
    # then 15, then 5 + 5, empty in second 3 (the first after the run).
    assert deferred_list_by_second({0: 25, 2: 5}, 10, 2.5) == [25, 15, 10, 0]
    # 35 pages in second 1 of a 1 s run: 25 left at exit, gone 3 s later.
    assert deferred_list_by_second({1: 35}, 10, 1.0) == [0, 35, 25, 15, 5, 0]
    # Nothing deferred: the list is empty for the run and the second after it.
    assert deferred_list_by_second({}, 10, 2.2) == [0, 0, 0, 0]
    assert deferred_list_by_second({}, 10, 0.0) == [0]
    # 600 pages at once on a stock kernel, 10 s run: 500 at exit, 50 s more.
    stock = deferred_list_by_second({0: 600}, 10, 10.0)
    assert stock[:3] == [600, 590, 580] and stock[10] == 500
    assert len(stock) == 10 + 50 + 1 and stock[-2:] == [10, 0]
    # The cap: at most cap_seconds past the run, then the list is cut short.
    assert deferred_list_by_second({0: 100}, 1, 1.0, cap_seconds=5) == [
        100, 99, 98, 97, 96, 95, 94]


@given(added=st.dictionaries(st.integers(0, 60), st.integers(1, 5000), max_size=20),
       fpi=st.integers(1, 2000), seconds=st.floats(0, 80))
def test_the_deferred_list_by_second_agrees_with_the_backlog(
        added: dict[int, int], fpi: int, seconds: float) -> None:
    from qubesshm.report import deferred_list_by_second

    backlog = deferred_backlog(added, fpi, seconds)
    end = max(math.ceil(seconds), max(added, default=-1) + 1)
    cap = 200
    sizes = deferred_list_by_second(added, fpi, seconds, cap_seconds=cap)
    assert max(sizes) == backlog.peak
    assert sizes[end] == backlog.at_exit
    if backlog.drain_seconds <= cap:
        assert len(sizes) == end + backlog.drain_seconds + 1
        assert sizes[-1] == 0 and all(size > 0 for size in sizes[end:-1])
    else:
        assert len(sizes) == end + cap + 1 and sizes[-1] > 0
    # Each second frees at most fpi pages and adds what the model says.
    for second in range(1, len(sizes)):
        assert sizes[second] - added.get(second, 0) == max(0, sizes[second - 1] - fpi)


@pytest.mark.parametrize("fpi, cap", [(0, 10), (-1, 10), (10, -1)])
def test_the_deferred_list_by_second_refuses_bad_parameters(fpi: int, cap: int) -> None:
    from qubesshm.report import deferred_list_by_second

    with pytest.raises(ValueError):
        deferred_list_by_second({0: 1}, fpi, 1.0, cap_seconds=cap)


def test_the_report_carries_the_pages_retired_while_held_by_second() -> None:
    report = build_report(stats(retired={"0": 2026, "3": 2026}), kernels_for("both"), 2.0)
    assert report["pages_retired_while_held_by_second"] == {"0": 2026, "3": 2026}


def test_an_agent_runs_report_speaks_of_the_daemon_and_todays_agents() -> None:
    agent = stats(retired={"0": 40})
    agent["mode"] = "agent"
    agent["daemon"] = {"created": 3, "dumps": 5, "barriers": 2, "acks": 7, "shmimages": 90}
    timing = {"count": 4, "p50": 6.0, "p99": 9.0, "max": 9.5}
    agent["lifetimes"].update(confirm_latency_ms=timing, ack_latency_ms=timing,
                              wrong_releases=1)
    report = build_report(agent, kernels_for("both"), 2.0)
    text = format_report(report)
    assert "GUI daemon: 3 windows, 5 dumps (+2 barriers), 7 ACKs, 90 SHMIMAGEs" in text
    assert "released (ACK order) after let go: median 6.0 ms" in text
    assert "pools/buffers" not in text and "compositor release" not in text
    assert "as today's GUI agents do" in text
    assert "the GUI daemon let go of areas up to 9.5 ms after qubesshm did" in text
    assert "1 area(s) were still mapped by the GUI domain" in text
    proxy = format_report(build_report(stats(retired={"0": 40}), kernels_for("both"), 2.0))
    assert "GUI daemon" not in proxy and "as an agent without unmap notify does" in proxy
