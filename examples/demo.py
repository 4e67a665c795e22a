"""The main job for a newcomer: real clients through qubesshm, and what it did.

Runs ``qubesshm run`` on the simulated grant layer with two clients at once: the
pattern client (``examples/pattern_client.py``) animating for ``--seconds``, and
the churn client (``examples/churn_client.py``) opening, drawing and closing
``--windows`` windows beside it. The compositor is the one in
``$WAYLAND_DISPLAY``, or a private headless Weston started here when none is
running. ``qubesshm run`` prints its report at exit; the demo then saves one
image (``--screenshot``) with the headless compositor's screen, taken while the
pattern was animating, beside the report's key figures (the figures alone when
the compositor is yours: only the private Weston can be screenshot).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from qubesshm.headless import HeadlessWeston, compositor_is_running

HERE = Path(__file__).resolve().parent


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=5.0,
                        help="how long the pattern client animates (default %(default)s)")
    parser.add_argument("--windows", type=int, default=8,
                        help="windows the churn client opens and closes (default %(default)s)")
    parser.add_argument("--screenshot", type=Path, default=Path("qubesshm-demo.png"),
                        help="where to save the screen and the figures (default %(default)s)")
    args = parser.parse_args()
    with contextlib.ExitStack() as stack:
        weston: HeadlessWeston | None = None
        env = None
        if compositor_is_running():
            print("demo: using the compositor at $WAYLAND_DISPLAY")
        else:
            print("demo: no compositor running; starting a headless Weston")
            weston = stack.enter_context(HeadlessWeston())
            env = weston.env()
        workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="qubesshm-demo-")))
        ready, report_path = workdir / "ready", workdir / "report.json"
        pattern = [sys.executable, str(HERE / "pattern_client.py"), f"--seconds={args.seconds}",
                   "--damage=partial", "--hold=1", f"--ready-file={ready}"]
        # Paced so that the windows come and go while the pattern animates.
        churn = [sys.executable, str(HERE / "churn_client.py"), "--windows", str(args.windows),
                 "--size", "400x300", "--frames", "3",
                 "--rate", f"{max(args.windows / max(args.seconds, 0.1), 0.1):.3f}"]
        both = f"{shlex.join(pattern)} & {shlex.join(churn)}; churn=$?; wait $!; " \
               "pattern=$?; [ $churn -eq 0 ] && [ $pattern -eq 0 ]"
        run = subprocess.Popen(
            # The simulated grant layer, with the parameters of a Qubes VM and the
            # report's findings for a stock kernel too.
            [sys.executable, "-m", "qubesshm", "run", "--grants", "sim", "--kernel", "both",
             "--report-json", str(report_path), "--", "sh", "-c", both],
            env=env)
        screen: Path | None = None
        if weston is not None:
            _wait(ready, run)
            if ready.exists():
                screen = weston.screenshot(workdir)
        status = run.wait()
        if not report_path.exists():
            print(f"demo: qubesshm run exited with status {status} and wrote no report")
            return status or 1
        report = json.loads(report_path.read_text())
        save_figure(report, screen, args.screenshot)
        print(f"demo: {'the screen and ' if screen else ''}the report's key figures saved "
              f"to {args.screenshot}")
    print(f"demo: qubesshm run exited with status {status}")
    return status


def key_figures(report: dict[str, Any]) -> list[str]:
    """The report's figures that say what happened, one short line each."""
    mib = 1 << 20
    lines = [
        f"{report['clients']} clients, {report['seconds']:.1f} s, {report['commits']} commits",
        f"damaged {report['bytes_damaged'] / mib:.1f} MiB, copied "
        f"{report['bytes_copied'] / mib:.1f} MiB",
        f"pools: the apps' {report['client_pools']}, the compositor's "
        f"{report['upstream_pools']}",
        f"grant pages needed: {report['pages_needed']}",
        f"cache hits: {report['cache_hits']}",
        f"deferred: {report['grant_pages_deferred']}, leaked: {report['grant_pages_leaked']}",
    ]
    release = report["release_latency_ms"]
    if release.get("p50") is not None:
        lines.append(f"release after commit: median {release['p50']:.1f} ms")
    for name, kernel in report["kernels"].items():
        fits = "fits" if kernel["fits_gntalloc_limit"] else "EXCEEDS"
        lines.append(f"{name} kernel: {fits} gntalloc limit {kernel['gntalloc_limit']}")
        lines.append(f"  without unmap notify: {kernel['agent_deferred_pages']} pages "
                     f"deferred, {kernel['agent_backlog_at_exit']} left at exit")
    return lines


def save_figure(report: dict[str, Any], screen: Path | None, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot

    if screen is not None:
        figure, (image_axes, text_axes) = pyplot.subplots(
            1, 2, figsize=(14, 5.5), gridspec_kw={"width_ratios": [1.6, 1]})
        image_axes.imshow(pyplot.imread(str(screen)))
        image_axes.set_title("the compositor's screen, through qubesshm")
        image_axes.axis("off")
    else:
        figure, text_axes = pyplot.subplots(figsize=(6, 5.5))
    text_axes.axis("off")
    text_axes.set_title("qubesshm run: the report's key figures")
    text_axes.text(0.0, 1.0, "\n".join(key_figures(report)), va="top", ha="left",
                   family="monospace", fontsize=9, transform=text_axes.transAxes)
    figure.tight_layout()
    figure.savefig(path, dpi=100)


def _wait(path: Path, process: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 30
    while not path.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)


if __name__ == "__main__":
    sys.exit(main())
