"""The main job for a newcomer: run a real client through qubesshm and show it.

Runs ``qubesshm run -- examples/pattern_client.py`` against the compositor in
``$WAYLAND_DISPLAY``; when no compositor is running it starts a private headless
Weston first, and then also saves a screenshot of what the compositor showed.
"""

from __future__ import annotations

import argparse
import contextlib
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from qubesshm.headless import HeadlessWeston, compositor_is_running

HERE = Path(__file__).resolve().parent


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=5.0, help="how long the client draws")
    parser.add_argument("--screenshot", type=Path, default=Path("qubesshm-demo.png"),
                        help="where to save the headless compositor's screen")
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
        workdir = stack.enter_context(tempfile.TemporaryDirectory(prefix="qubesshm-demo-"))
        ready = Path(workdir) / "ready"
        client = subprocess.Popen(
            # The gntalloc limit Qubes sets in VMs: Linux's default of 1024 pages
            # is less than one 1920x1080 buffer.
            [sys.executable, "-m", "qubesshm", "-v", "run", "--gntalloc-limit", "1073741824",
             "--",
             sys.executable, str(HERE / "pattern_client.py"), f"--seconds={args.seconds}",
             "--damage=partial", "--hold=1", f"--ready-file={ready}"],
            env=env,
        )
        if weston is not None:
            _wait(ready, client)
            if ready.exists():
                shot = weston.screenshot(ready.parent)
                shutil.copy(shot, args.screenshot)
                print(f"demo: screenshot of the compositor saved to {args.screenshot}")
        status = client.wait()
    print(f"demo: qubesshm run exited with status {status}")
    return status


def _wait(path: Path, process: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 30
    while not path.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)


if __name__ == "__main__":
    sys.exit(main())
