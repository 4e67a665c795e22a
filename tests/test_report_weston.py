"""``qubesshm run``'s report against a real Weston, with a client whose every pool,
buffer and byte is known in advance (``examples/churn_client.py``)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from qubesshm.grants.lifetimes import pages_for
from qubesshm.headless import HeadlessWeston

CHURN = Path(__file__).resolve().parent.parent / "examples" / "churn_client.py"


def run(weston: HeadlessWeston, tmp_path: Path, *options: str,
        windows: int, size: str) -> tuple[subprocess.CompletedProcess[str], dict[str, Any]]:
    report = tmp_path / "report.json"
    result = subprocess.run(
        [sys.executable, "-m", "qubesshm", "run", "--report-json", str(report), *options,
         "--", sys.executable, str(CHURN), "--windows", str(windows), "--size", size],
        env=weston.env(), capture_output=True, text=True, timeout=300, check=False)
    return result, json.loads(report.read_text())


def test_the_report_counts_what_the_client_did(weston: HeadlessWeston,
                                               tmp_path: Path) -> None:
    windows, width, height = 12, 320, 240
    result, report = run(weston, tmp_path, "--quiet", windows=windows,
                         size=f"{width}x{height}")
    assert result.returncode == 0, result.stderr
    assert "qubesshm report" not in result.stderr  # --quiet
    pages = pages_for(width * 4 * height)
    # One pool, one buffer and one full frame per window, one window at a time: the
    # compositor gets one pool in all (recycled) and a buffer per window.
    assert (report["client_pools"], report["client_buffers"]) == (windows, windows)
    assert (report["upstream_pools"], report["upstream_buffers"]) == (1, windows)
    assert report["bytes_damaged"] == report["bytes_copied"] == windows * width * 4 * height
    assert report["pages_needed"] == pages
    assert report["cache_hits"] == windows - 1
    # Every window's area went back to the cache with Weston still holding it: what
    # an agent ending grants at once would have deferred.
    assert report["pages_retired_while_held"] == windows * pages
    assert report["grant_pages_leaked"] == 0
    stock = report["kernels"]["stock"]
    assert stock["agent_deferred_pages"] == windows * pages
    assert stock["agent_backlog_at_exit"] > 0
    assert report["kernels"]["qubes"]["fits_gntalloc_limit"] is True


def test_a_stock_kernel_refuses_a_full_hd_window_and_the_report_says_why(
        weston: HeadlessWeston, tmp_path: Path) -> None:
    pages = pages_for(1920 * 4 * 1080)
    assert pages > 1024
    stock, report = run(weston, tmp_path, "--kernel", "stock", windows=1, size="1920x1080")
    assert stock.returncode == 1  # the client got no_memory, and said so
    assert "no_memory" in stock.stderr or "gntalloc limit" in stock.stderr, stock.stderr
    assert report["pages_needed"] == pages
    findings = "\n".join(report["findings"])
    assert "1 buffer(s) were refused" in findings
    assert f"the {pages} pages it needs exceed the gntalloc limit" in findings
    assert "findings:" in stock.stderr  # printed without --quiet
    both, report = run(weston, tmp_path, "--kernel", "both", windows=1, size="1920x1080")
    assert both.returncode == 0, both.stderr
    assert report["kernels"]["stock"]["fits_gntalloc_limit"] is False
    assert report["kernels"]["qubes"]["fits_gntalloc_limit"] is True
    assert "refused" not in "\n".join(report["findings"])


def test_ending_grants_at_once_defers_every_page_the_compositor_held(
        weston: HeadlessWeston, tmp_path: Path) -> None:
    windows, pages = 20, pages_for(200 * 4 * 150)
    result, report = run(weston, tmp_path, "--quiet", "--reclaim", "at-once", "--kernel",
                         "stock", windows=windows, size="200x150")
    assert result.returncode == 0, result.stderr
    # No cache, no notify: each window's area is ended as it goes, while Weston
    # still maps it, so every page lands on the stock kernel's deferred list.
    assert report["cache_hits"] == 0 and report["upstream_pools"] == windows
    assert report["grant_pages_deferred"] == windows * pages
    assert report["pages_retired_while_held"] == windows * pages
    assert report["grant_pages_leaked"] == 0
    assert "free_per_iteration raised 0x" in result.stderr


def test_a_held_mapping_delays_the_notify_and_nothing_is_deferred(
        weston: HeadlessWeston, tmp_path: Path) -> None:
    result, report = run(weston, tmp_path, "--quiet", "--cache-pages", "0", "--sim-hold",
                         "0.3", windows=5, size="200x150")
    assert result.returncode == 0, result.stderr
    unmap = report["unmap_latency_ms"]
    assert unmap["count"] == 5 and unmap["p50"] >= 300
    assert report["grant_pages_deferred"] == 0 and report["late_releases"] == 0
