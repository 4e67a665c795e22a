"""The main job for a newcomer: real clients through qubesshm, and what it did.

Runs ``qubesshm run`` on the simulated grant layer with two clients at once: the
pattern client (``examples/pattern_client.py``) animating for ``--seconds``, and
the churn client (``examples/churn_client.py``) opening, drawing and closing
``--windows`` windows beside it. The compositor is the one in
``$WAYLAND_DISPLAY``, or a private headless Weston started here when none is
running. While the run goes the demo reads qubesshm's counters from its control
socket every 0.1 s (the deferred list, the grant pages live). ``qubesshm run``
prints its report at exit; the demo then saves one picture (``--screenshot``,
built by ``examples/demo_figure.py``): a one-sentence headline, the headless
compositor's screen with the two clients' windows labelled (taken once the
pattern shows undimmed, past Weston's start-up fade; left out on your own
compositor, which cannot be screenshot), the deferred list over the run
(qubesshm's, measured, against an agent without unmap notify on a stock and a
Qubes kernel, modelled) and the jargon in plain words.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import shlex
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from demo_figure import (
    CHURN_SIZE,
    Measured,
    Window,
    build_figure,
    find_windows,
    headline,
    is_best_shot,
    read_rgb,
    shot_quality,
)

from qubesshm.headless import HeadlessWeston, compositor_is_running
from qubesshm.relay.control import StatsError, read_stats

HERE = Path(__file__).resolve().parent
SAMPLE_INTERVAL = 0.1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=5.0,
                        help="how long the pattern client animates (default %(default)s)")
    parser.add_argument("--windows", type=int, default=8,
                        help="windows the churn client opens and closes (default %(default)s)")
    parser.add_argument("--screenshot", type=Path, default=Path("qubesshm-demo.png"),
                        help="where to save the picture (default %(default)s)")
    parser.add_argument("--json", type=Path, default=None,
                        help="also save what the picture was made from here: the report, "
                             "the samples, the windows found and the headline")
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
        # An absolute path: the demo reads the proxy's counters at NAME.stats beside it.
        socket = workdir / "qubesshm-demo"
        pattern = [sys.executable, str(HERE / "pattern_client.py"), f"--seconds={args.seconds}",
                   "--damage=partial", "--hold=1", f"--ready-file={ready}"]
        # Paced so that the windows come and go while the pattern animates.
        churn = [sys.executable, str(HERE / "churn_client.py"), "--windows", str(args.windows),
                 "--size", "x".join(map(str, CHURN_SIZE)), "--frames", "3",
                 "--rate", f"{max(args.windows / max(args.seconds, 0.1), 0.1):.3f}"]
        both = f"{shlex.join(pattern)} & {shlex.join(churn)}; churn=$?; wait $!; " \
               "pattern=$?; [ $churn -eq 0 ] && [ $pattern -eq 0 ]"
        run = subprocess.Popen(
            # The simulated grant layer, with the parameters of a Qubes VM and the
            # report's findings for a stock kernel too.
            [sys.executable, "-m", "qubesshm", "run", "--grants", "sim", "--kernel", "both",
             "--socket", str(socket), "--report-json", str(report_path), "--", "sh", "-c",
             both],
            env=env)
        sampler = Sampler(socket, run)
        sampler.start()
        shot: Path | None = None
        windows: list[Window] = []
        if weston is not None:
            _wait(ready, run)
            if ready.exists():
                # Until the pattern client stops (it stays mapped 1 s after its frames).
                shot, windows = best_screenshot(weston, workdir, run,
                                                time.monotonic() + args.seconds + 0.5)
        status = run.wait()
        sampler.join()
        if not report_path.exists():
            print(f"demo: qubesshm run exited with status {status} and wrote no report")
            return status or 1
        report = json.loads(report_path.read_text())
        measured = sampler.measured
        screen = read_rgb(shot) if shot is not None else None
        figure = build_figure(report, measured, screen, windows, seconds=args.seconds,
                              churn_windows=args.windows)
        figure.savefig(args.screenshot)
        sentence = headline(report, measured)
        if args.json is not None:
            args.json.write_text(json.dumps({
                "report": report, "measured": measured.as_json(),
                "windows": [dataclasses.asdict(w) for w in windows],
                "screenshot": shot is not None, "headline": sentence}, indent=1))
        print(f"demo: {sentence}")
        if shot is not None:
            found = ", ".join(f"{w.client} at ({w.x}, {w.y})"
                              + ("" if w.clean else " (dimmed or covered)") for w in windows)
            print(f"demo: windows labelled on the screen: {found or 'none found'}")
        print(f"demo: the picture ({'the screen, ' if shot else ''}the deferred list over "
              f"the run, the headline) saved to {args.screenshot}")
    print(f"demo: qubesshm run exited with status {status}")
    return status


class Sampler(threading.Thread):
    """Reads the proxy's counters every ``SAMPLE_INTERVAL`` while the run goes."""

    def __init__(self, socket: Path, run: subprocess.Popen[bytes]) -> None:
        super().__init__(daemon=True)
        self.socket = socket
        self.run_process = run
        self.measured = Measured()

    def run(self) -> None:
        start = time.monotonic()
        while self.run_process.poll() is None:
            try:
                stats = read_stats(str(self.socket), timeout=1.0)
            except StatsError:
                pass  # not listening yet, or gone
            else:
                self.measured.add(stats, time.monotonic() - start)
            time.sleep(SAMPLE_INTERVAL)


def best_screenshot(weston: HeadlessWeston, workdir: Path, run: subprocess.Popen[bytes],
                    deadline: float) -> tuple[Path | None, list[Window]]:
    """Screenshots until one shows the pattern client's window whole and undimmed with a
    churn window beside it, or until ``deadline``: then the best one taken. Weston's
    start-up fade dims the pattern at first and its close fade dims churn windows going
    away; dimmed pixels do not match the pattern, so waiting is for what is on screen."""
    best: tuple[Path, list[Window]] | None = None
    while run.poll() is None:
        shot = weston.screenshot(workdir)
        windows = find_windows(read_rgb(shot))
        if best is None or shot_quality(windows) > shot_quality(best[1]):
            best = (shot, windows)
        if is_best_shot(windows) or time.monotonic() >= deadline:
            break
        # A shot and a look take about 0.1 s: a few a second leave the apps the CPU.
        time.sleep(0.15)
    return best if best is not None else (None, [])


def _wait(path: Path, process: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 30
    while not path.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)


if __name__ == "__main__":
    sys.exit(main())
