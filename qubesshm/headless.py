"""Start a private headless Weston for the demo, the benchmarks and the tests.

The compositor gets its own ``XDG_RUNTIME_DIR`` so it never collides with a
desktop session, the pixman renderer so it needs no GPU, and ``--debug`` so
``weston-screenshooter`` may take shots of it.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType

# The desktop shell fades the screen in for about a second after start-up and fades
# closed windows out (keeping their last buffer until the fade ends), so shots taken
# meanwhile show dimmed pixels. ``animations=False`` turns that off; the default runs
# the desktop shell as shipped, as users run it.
WESTON_INI = """\
[shell]
startup-animation=none
close-animation=none
animation=none
focus-animation=none
"""


class WestonError(RuntimeError):
    """Weston is missing or did not come up."""


def compositor_socket_path(display: str | None = None) -> Path | None:
    """Where a client would connect for ``display`` (default ``$WAYLAND_DISPLAY``).

    Returns None when no display is named and ``wayland-0`` does not exist either.
    """
    name = display if display is not None else os.environ.get("WAYLAND_DISPLAY")
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if name and os.path.isabs(name):
        return Path(name)
    if runtime is None:
        return None
    path = Path(runtime) / (name or "wayland-0")
    if name is None and not path.exists():
        return None
    return path


def compositor_is_running(display: str | None = None) -> bool:
    """Whether something accepts connections at the display's socket."""
    path = compositor_socket_path(display)
    if path is None or not path.exists():
        return False
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        try:
            probe.connect(str(path))
        except OSError:
            return False
    return True


def take_screenshot(env: Mapping[str, str], workdir: Path) -> Path:
    """Run ``weston-screenshooter`` in ``workdir`` and return the PNG it wrote.

    The tool names its file ``wayland-screenshot-<date>_<time>.png`` (adding
    ``-1``, ``-2``... within the same second) in its working directory, unless
    ``XDG_PICTURES_DIR`` is set, which is therefore removed from ``env``.
    """
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in env.items() if k != "XDG_PICTURES_DIR"}
    before = set(workdir.glob("wayland-screenshot-*.png"))
    result = subprocess.run(
        ["weston-screenshooter"],
        env=env,
        cwd=workdir,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    if result.returncode != 0:
        raise RuntimeError(
            f"weston-screenshooter failed with status {result.returncode} "
            f"(is Weston running with --debug?): {result.stderr.strip()}"
        )
    new = sorted(set(workdir.glob("wayland-screenshot-*.png")) - before)
    if len(new) != 1:
        raise RuntimeError(f"expected one new screenshot in {workdir}, found {new}")
    return new[0]


class HeadlessWeston:
    """A headless Weston in a private runtime directory, as a context manager."""

    def __init__(
        self,
        *,
        width: int = 1024,
        height: int = 640,
        debug: bool = True,
        socket_name: str = "wayland-headless",
        log_path: Path | None = None,
        extra_args: tuple[str, ...] = (),
        animations: bool = True,
    ) -> None:
        self.width = width
        self.animations = animations
        self.height = height
        self.debug = debug
        self.socket_name = socket_name
        self.extra_args = extra_args
        self.runtime_dir = Path(tempfile.mkdtemp(prefix="qubesshm-weston-"))
        self.runtime_dir.chmod(0o700)
        self.log_path = log_path or self.runtime_dir / "weston.log"
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def socket_path(self) -> Path:
        return self.runtime_dir / self.socket_name

    def env(self) -> dict[str, str]:
        """An environment in which clients connect to this compositor."""
        env = dict(os.environ)
        env["XDG_RUNTIME_DIR"] = str(self.runtime_dir)
        env["WAYLAND_DISPLAY"] = self.socket_name
        env.pop("DISPLAY", None)
        return env

    def start(self, timeout: float = 20.0) -> None:
        weston = shutil.which("weston")
        if weston is None:
            raise WestonError("weston is not installed (Debian package 'weston')")
        if self.animations:
            # The shipped configuration: no weston.ini of the user's either.
            config_args = ["--no-config"]
        else:
            config = self.runtime_dir / "weston.ini"
            config.write_text(WESTON_INI)
            config_args = [f"--config={config}"]
        args = [
            weston,
            *config_args,
            "--backend=headless-backend.so",
            "--use-pixman",
            "--idle-time=0",
            f"--socket={self.socket_name}",
            f"--width={self.width}",
            f"--height={self.height}",
            *self.extra_args,
        ]
        if self.debug:
            args.append("--debug")
        env = self.env()
        env.pop("WAYLAND_DISPLAY")
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(
                args, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise WestonError(
                    f"weston exited with status {self.process.returncode}; "
                    f"log: {self.log_path.read_text(errors='replace')[-2000:]}"
                )
            if compositor_is_running(str(self.socket_path)) and self._shell_ready():
                return
            time.sleep(0.05)
        self.stop()
        raise WestonError(f"weston did not open {self.socket_path} within {timeout} s")

    def _shell_ready(self) -> bool:
        # The socket opens before the shell helper is launched; a window mapped in
        # between is placed before the shell knows the output, so wait for the launch.
        try:
            return b"weston-desktop-shell" in self.log_path.read_bytes()
        except OSError:
            return False

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None
        shutil.rmtree(self.runtime_dir, ignore_errors=True)

    def describe(self) -> str:
        """What this compositor is, for a benchmark's or demo's first line."""
        shell = ("desktop shell with its shipped animations" if self.animations
                 else "desktop shell, animations off")
        return (f"a headless Weston started for this run (pixman renderer, "
                f"{self.width}x{self.height}, {shell})")

    def screenshot(self, workdir: Path) -> Path:
        return take_screenshot(self.env(), workdir)

    def __enter__(self) -> HeadlessWeston:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
