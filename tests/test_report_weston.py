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
    assert result.stderr == "", "--quiet prints nothing but errors"
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
    # After the app exited, run said which client the proxy ended, and why.
    ended = [line for line in stock.stderr.splitlines()
             if line.startswith("qubesshm run: qubesshm ended client#")]
    assert len(ended) == 1 and "more than the gntalloc limit of 1024 pages" in ended[0]
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
    result, report = run(weston, tmp_path, "--reclaim", "at-once", "--kernel", "stock",
                         windows=windows, size="200x150")
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


# An app that breaks the protocol, reads the error, prints nothing and exits 0.
SILENT_BAD_CLIENT = """
import os, socket, struct
path = os.path.join(os.environ["XDG_RUNTIME_DIR"], os.environ["WAYLAND_DISPLAY"])
with socket.socket(socket.AF_UNIX) as sock:
    sock.connect(path)
    sock.sendall(struct.pack("<II", 99, 8 << 16))  # a request to an object that is not
    while sock.recv(4096):
        pass
"""


def test_run_says_which_client_it_ended_even_when_the_app_exits_0(
        weston: HeadlessWeston, tmp_path: Path) -> None:
    for quiet in ((), ("--quiet",)):
        result = subprocess.run(
            [sys.executable, "-m", "qubesshm", "run", *quiet, "--", sys.executable, "-c",
             SILENT_BAD_CLIENT], env=weston.env(), capture_output=True, text=True,
            timeout=120, check=False)
        assert result.returncode == 1, result.stderr
        last = result.stderr.strip().splitlines()[-1]
        assert last.startswith("qubesshm run: qubesshm ended client#"), result.stderr
        assert "client protocol error" in last and "99" in last, last
        assert "Traceback" not in result.stderr


def test_a_limit_too_small_for_one_screen_sized_window_is_said_at_start(
        desktop_weston: HeadlessWeston, tmp_path: Path) -> None:
    need = pages_for(1920 * 1080 * 4)
    result = subprocess.run(
        [sys.executable, "-m", "qubesshm", "run", "--quiet", "--kernel", "stock", "--", "true"],
        env=desktop_weston.env(), capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr
    assert result.stderr.splitlines() == [
        f"qubesshm run: the gntalloc limit is 1024 pages, less than the {need} pages that one "
        "window the size of the compositor's 1920x1080 output needs: such a window will be "
        "refused; raise the limit with --gntalloc-limit 1073741824 (or qubesshm tune "
        "--gntalloc-limit 1073741824), as Qubes does in its VMs"]
    capped = subprocess.run(
        [sys.executable, "-m", "qubesshm", "run", "--quiet", "--client-pages", "900", "--",
         "true"], env=desktop_weston.env(), capture_output=True, text=True, timeout=120,
        check=False)
    assert capped.stderr.startswith(f"qubesshm run: --client-pages 900 is less than the "
                                    f"{need} pages"), capped.stderr
    # With a Qubes VM's parameters, the default, nothing to say.
    fits = subprocess.run(
        [sys.executable, "-m", "qubesshm", "run", "--quiet", "--", "true"],
        env=desktop_weston.env(), capture_output=True, text=True, timeout=120, check=False)
    assert fits.returncode == 0 and fits.stderr == ""


def test_an_unwritable_report_path_is_refused_before_the_app_runs(
        weston: HeadlessWeston, tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    result = subprocess.run(
        [sys.executable, "-m", "qubesshm", "run", "--report-json",
         str(tmp_path / "nodir" / "r.json"), "--", "touch", str(marker)],
        env=weston.env(), capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 2
    assert result.stderr.splitlines()[-1].startswith(
        "qubesshm run: error: argument --report-json: ")
    assert not marker.exists(), "the app never started"


def test_run_keeps_the_last_ended_clients_and_counts_them_all(
        weston: HeadlessWeston, tmp_path: Path) -> None:
    many = """
import os, socket, struct
path = os.path.join(os.environ["XDG_RUNTIME_DIR"], os.environ["WAYLAND_DISPLAY"])
for _ in range(40):
    with socket.socket(socket.AF_UNIX) as sock:
        sock.connect(path)
        sock.sendall(struct.pack("<II", 99, 8 << 16))
        while sock.recv(4096):
            pass
"""
    result = subprocess.run(
        [sys.executable, "-m", "qubesshm", "run", "--quiet", "--", sys.executable, "-c", many],
        env=weston.env(), capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 1, result.stderr
    repeated = [line for line in result.stderr.splitlines()
                if line.startswith("qubesshm run: qubesshm ended client#")]
    assert len(repeated) == 32
    assert result.stderr.splitlines()[-1] == (
        "qubesshm run: qubesshm ended 40 clients in all (the last 32 above)")
