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


def stats(peak: int = 301, retired: dict[str, int] | None = None,
          **lifetimes: Any) -> dict[str, Any]:
    return {
        "clients": 0, "clients_served": 1, "commits": 40, "bytes_damaged": 1 << 20,
        "bytes_copied": 1 << 20, "early_releases": 20, "client_pools": 20,
        "client_buffers": 20, "upstream_pools": 1, "upstream_buffers": 20,
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
