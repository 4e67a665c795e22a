"""The main job for a newcomer: real clients through qubesshm, and what it did.

Runs two clients at once through qubesshm on the simulated grant layer (with a
Qubes VM's parameters), twice: the pattern client (``examples/pattern_client.py``)
animating for ``--seconds``, and the churn client (``examples/churn_client.py``)
opening, drawing and closing ``--windows`` windows beside it.

First in proxy mode, ``qubesshm run``: qubesshm between the clients and a
compositor, the one in ``$WAYLAND_DISPLAY``, or a private headless Weston started
here when none is running. Then in agent mode, ``qubesshm run --agent --emulator``:
qubesshm is the clients' compositor and a Qubes GUI agent, sending their windows
as grant pages to ``qubesshm guid-emulator``, which plays dom0's GUI daemon on a
private Xvfb started here (``--no-agent`` leaves this part out). While each run goes
the demo reads qubesshm's counters from its stats socket every 0.1 s (the deferred
list, the grant pages live). Each ``qubesshm run`` prints its report at exit; the
demo then saves one picture per run (``--screenshot``, and ``--agent-screenshot``
beside it, built by ``examples/demo_figure.py``): a one-sentence headline, the
screen with the two clients' windows labelled (the headless compositor's, taken
once the pattern shows undimmed, past Weston's start-up fade, and left out on your
own compositor, which cannot be screenshot; the emulator's X screen), the deferred
list over the run (qubesshm's, measured, against the modelled agent's on a stock
and a Qubes kernel: one without unmap notify, or today's GUI agents) and the
jargon in plain words.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import shlex
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from demo_agent import (
    SCREEN_SIZE,
    StderrTee,
    XvfbMissing,
    daemon_figures,
    grab_screen,
    private_xvfb,
)
from demo_figure import (
    AGENT,
    CHURN_SIZE,
    PROXY,
    RGB,
    Measured,
    Mode,
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


@dataclasses.dataclass
class Outcome:
    """What one run gave the demo: its exit status and what its picture is made of."""

    status: int
    report: dict[str, Any] | None = None
    measured: Measured = dataclasses.field(default_factory=Measured)
    screen: RGB | None = None
    windows: list[Window] = dataclasses.field(default_factory=list)
    daemon: dict[str, float] | None = None
    headline: str = ""

    def as_json(self) -> dict[str, Any]:
        return {"report": self.report, "measured": self.measured.as_json(),
                "windows": [dataclasses.asdict(w) for w in self.windows],
                "screenshot": self.screen is not None, "headline": self.headline,
                "daemon": self.daemon}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=5.0,
                        help="how long the pattern client animates (default %(default)s)")
    parser.add_argument("--windows", type=int, default=8,
                        help="windows the churn client opens and closes (default %(default)s)")
    parser.add_argument("--screenshot", type=Path, default=Path("qubesshm-demo.png"),
                        help="where to save the proxy run's picture (default %(default)s)")
    parser.add_argument("--agent", action=argparse.BooleanOptionalAction, default=True,
                        help="also run the clients through agent mode, on a private Xvfb "
                             "(default: yes)")
    parser.add_argument("--agent-screenshot", type=Path, default=None,
                        help="where to save the agent run's picture (default: beside "
                             "--screenshot, qubesshm-demo-agent.png)")
    parser.add_argument("--json", type=Path, default=None,
                        help="also save what the pictures were made from here: each run's "
                             "report, samples, windows found and headline (the agent run's "
                             "under \"agent\"), and the screens beside it as PNG files")
    args = parser.parse_args()
    if args.agent_screenshot is None:
        shot = args.screenshot
        args.agent_screenshot = shot.with_name(f"{shot.stem}-agent{shot.suffix or '.png'}")
    saved: dict[str, Any] = {}
    proxy = proxy_run(args)
    status = proxy.status
    if proxy.report is not None:
        saved.update(proxy.as_json())
        save_screen(args.json, "proxy", proxy.screen)
    if args.agent:
        agent = agent_run(args)
        status = status or agent.status
        if agent.report is not None:
            saved["agent"] = agent.as_json()
            save_screen(args.json, "agent", agent.screen)
    if args.json is not None and saved:
        args.json.write_text(json.dumps(saved, indent=1))
    return status


def clients(args: argparse.Namespace, ready: Path) -> list[str]:
    """``sh -c`` running both clients at once; it fails if either does."""
    pattern = [sys.executable, str(HERE / "pattern_client.py"), f"--seconds={args.seconds}",
               "--damage=partial", "--hold=1", f"--ready-file={ready}"]
    # Paced so that the windows come and go while the pattern animates.
    churn = [sys.executable, str(HERE / "churn_client.py"), "--windows", str(args.windows),
             "--size", "x".join(map(str, CHURN_SIZE)), "--frames", "3",
             "--rate", f"{max(args.windows / max(args.seconds, 0.1), 0.1):.3f}"]
    both = f"{shlex.join(pattern)} & {shlex.join(churn)}; churn=$?; wait $!; " \
           "pattern=$?; [ $churn -eq 0 ] && [ $pattern -eq 0 ]"
    return ["sh", "-c", both]


def proxy_run(args: argparse.Namespace) -> Outcome:
    """``qubesshm run``: the clients through qubesshm to a compositor; its picture saved."""
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
        run = subprocess.Popen(
            # The simulated grant layer, with the parameters of a Qubes VM and the
            # report's findings for a stock kernel too.
            [sys.executable, "-m", "qubesshm", "run", "--grants", "sim", "--kernel", "both",
             "--socket", str(socket), "--report-json", str(report_path), "--",
             *clients(args, ready)],
            env=env)
        sampler = Sampler(socket, run)
        sampler.start()
        outcome = Outcome(0, measured=sampler.measured)
        if weston is not None:
            shoot_weston = weston  # for the closure: a name mypy knows is not None
            _wait(ready, run)
            if ready.exists():
                # Until the pattern client stops (it stays mapped 1 s after its frames).
                outcome.screen, outcome.windows = best_screenshot(
                    lambda: read_rgb(shoot_weston.screenshot(workdir)), run,
                    time.monotonic() + args.seconds + 0.5)
        outcome.status = run.wait()
        sampler.join()
        if report_path.exists():
            outcome.report = json.loads(report_path.read_text())
    if outcome.report is None:
        print(f"demo: qubesshm run exited with status {outcome.status} and wrote no report")
        outcome.status = outcome.status or 1
        return outcome
    tell(args, outcome, PROXY, args.screenshot)
    print(f"demo: qubesshm run exited with status {outcome.status}")
    return outcome


def agent_run(args: argparse.Namespace) -> Outcome:
    """``qubesshm run --agent --emulator``: the same clients, qubesshm their compositor
    and GUI agent, the emulated GUI daemon on a private Xvfb; its picture saved."""
    try:
        with contextlib.ExitStack() as stack:
            xvfb = stack.enter_context(private_xvfb(SCREEN_SIZE))
            print(f"demo: agent mode: the same clients through `qubesshm run --agent "
                  f"--emulator`, the GUI-daemon emulator on a private Xvfb ({xvfb.display}, "
                  f"{SCREEN_SIZE[0]}x{SCREEN_SIZE[1]})")
            workdir = Path(stack.enter_context(
                tempfile.TemporaryDirectory(prefix="qubesshm-demo-agent-")))
            ready, report_path = workdir / "ready", workdir / "report.json"
            socket = workdir / "qubesshm-agent"
            # The socket vchan between agent and emulator: here too, so its path stays
            # short whatever $XDG_RUNTIME_DIR is (a Unix socket's path has 107 bytes).
            vchan = workdir / "vchan"
            vchan.mkdir(mode=0o700)
            env = {k: v for k, v in os.environ.items()
                   if k not in ("WAYLAND_DISPLAY", "WAYLAND_SOCKET")}
            env["DISPLAY"] = xvfb.display
            if not env.get("XDG_RUNTIME_DIR"):
                # No session (a fresh machine's root shell): the agent's socket and its
                # simulated kernel live in this private folder instead.
                env["XDG_RUNTIME_DIR"] = str(workdir)
            run = subprocess.Popen(
                [sys.executable, "-m", "qubesshm", "run", "--agent", "--emulator", "--grants",
                 "sim", "--kernel", "both", "--socket", str(socket), "--vchan-dir",
                 str(vchan), "--report-json", str(report_path), "--", *clients(args, ready)],
                env=env, stderr=subprocess.PIPE)
            assert run.stderr is not None
            tee = StderrTee(run.stderr)
            tee.start()
            sampler = Sampler(socket, run)
            sampler.start()
            outcome = Outcome(0, measured=sampler.measured)
            _wait(ready, run)
            if ready.exists():
                # No fades on the emulator's screen: its windows show the clients' pixels
                # as soon as they are there.
                outcome.screen, outcome.windows = best_screenshot(
                    lambda: grab_screen(xvfb.display), run,
                    time.monotonic() + args.seconds + 0.5)
            outcome.status = run.wait()
            sampler.join()
            tee.join()
            outcome.daemon = daemon_figures(tee.text)
            if report_path.exists():
                outcome.report = json.loads(report_path.read_text())
    except XvfbMissing as exc:
        print(f"demo: agent mode left out: {exc}")
        return Outcome(0)
    if outcome.report is None:
        print(f"demo: qubesshm run --agent exited with status {outcome.status} and wrote no "
              "report")
        outcome.status = outcome.status or 1
        return outcome
    tell(args, outcome, AGENT, args.agent_screenshot)
    print(f"demo: qubesshm run --agent exited with status {outcome.status}")
    return outcome


def tell(args: argparse.Namespace, outcome: Outcome, mode: Mode, picture: Path) -> None:
    """The run's headline and windows found, printed, and its picture saved."""
    assert outcome.report is not None
    figure = build_figure(outcome.report, outcome.measured, outcome.screen, outcome.windows,
                          seconds=args.seconds, churn_windows=args.windows, mode=mode,
                          daemon=outcome.daemon)
    figure.savefig(picture)
    outcome.headline = headline(outcome.report, outcome.measured, mode)
    print(f"demo: {outcome.headline}")
    screen = "the screen" if mode is PROXY else "the emulator's X screen"
    if outcome.screen is not None:
        found = ", ".join(f"{w.client} at ({w.x}, {w.y})"
                          + ("" if w.clean else " (dimmed or covered)") for w in outcome.windows)
        print(f"demo: windows labelled on {screen}: {found or 'none found'}")
    print(f"demo: the picture ({screen + ', ' if outcome.screen is not None else ''}the "
          f"deferred list over the run, the headline) saved to {picture}")


def save_screen(data: Path | None, name: str, screen: RGB | None) -> None:
    """With ``--json``: the run's screen, as captured, beside the file
    (``X-NAME-screen.png``)."""
    if data is not None and screen is not None:
        from matplotlib import image

        image.imsave(data.with_name(f"{data.stem}-{name}-screen.png"), screen)


class Sampler(threading.Thread):
    """Reads qubesshm's counters every ``SAMPLE_INTERVAL`` while the run goes."""

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


def best_screenshot(shoot: Callable[[], RGB], run: subprocess.Popen[bytes],
                    deadline: float) -> tuple[RGB | None, list[Window]]:
    """Screenshots (``shoot``) until one shows the pattern client's window whole and
    undimmed with a churn window beside it, or until ``deadline``: then the best one
    taken. Weston's start-up fade dims the pattern at first and its close fade dims
    churn windows going away; dimmed pixels do not match the pattern, so waiting is for
    what is on screen."""
    import xcffib

    best: tuple[RGB, list[Window]] | None = None
    while run.poll() is None:
        try:
            screen = shoot()
        except xcffib.XcffibException as exc:
            print(f"demo: cannot read the X screen: {exc}")
            break
        windows = find_windows(screen)
        if best is None or shot_quality(windows) > shot_quality(best[1]):
            best = (screen, windows)
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
