"""The compositor served from a thread of the test process, for real clients.

``ServedCompositor`` owns an asyncio loop in a thread with a
``CompositorServer`` on a fresh socket; ``RunningCompositor`` is one whose shell
is a ``RecordingShell``; ``serving`` runs either in a fresh directory. Clients
(apps started as processes, or pywayland in the test itself) connect to ``path``.
``call`` runs a function in the server's thread (the compositor is not
thread-safe), as the agent would call it.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import tempfile
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from pathlib import Path
from typing import TypeVar

from compositor_shell import RecordingShell

from qubesshm.compositor.core import Compositor
from qubesshm.compositor.server import CompositorServer
from qubesshm.relay.listener import Listener

T = TypeVar("T")


class ServedCompositor:
    """``compositor`` serving ``runtime_dir/name`` from an asyncio loop in a thread of
    its own."""

    def __init__(self, compositor: Compositor, runtime_dir: Path, name: str) -> None:
        self.compositor = compositor
        self.runtime_dir = runtime_dir
        self.name = name
        self.path = runtime_dir / name
        self.loop = asyncio.new_event_loop()
        self.server: CompositorServer | None = None
        self.error: BaseException | None = None
        started = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(started,), daemon=True)
        self._thread.start()
        if not started.wait(20):
            raise RuntimeError("the compositor's thread did not start")
        if self.error is not None:
            raise self.error

    def _run(self, started: threading.Event) -> None:
        asyncio.set_event_loop(self.loop)

        async def start() -> None:
            listener = Listener(str(self.path))
            self.server = CompositorServer(self.compositor, listener)

        try:
            self.loop.run_until_complete(start())
        except BaseException as exc:
            self.error = exc
            started.set()
            return
        started.set()
        self.loop.run_forever()

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env["XDG_RUNTIME_DIR"] = str(self.runtime_dir)
        env["WAYLAND_DISPLAY"] = self.name
        env.pop("DISPLAY", None)
        env["GDK_BACKEND"] = "wayland"
        return env

    def call(self, fn: Callable[[], T], timeout: float = 20.0) -> T:
        """Run ``fn`` in the server's thread and return its result."""
        future: Future[T] = Future()

        def run() -> None:
            try:
                future.set_result(fn())
            except BaseException as exc:
                future.set_exception(exc)
            if self.server is not None:
                self.server.service()

        self.loop.call_soon_threadsafe(run)
        return future.result(timeout)

    def client_count(self) -> int:
        return self.call(lambda: len(self.compositor.clients))

    def stop(self) -> None:
        if self.server is not None and not self.loop.is_closed():
            server = self.server
            self.call(server.close)
        if not self.loop.is_closed():
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(20)
            self.loop.close()


class RunningCompositor(ServedCompositor):
    """A compositor whose shell is a ``RecordingShell``, served from a thread."""

    def __init__(self, runtime_dir: Path, *, name: str = "qs-compositor",
                 shell: RecordingShell | None = None, refresh: float = 60.0,
                 screen: tuple[int, int] = (1920, 1080),
                 ping_timeout: float | None = None) -> None:
        self.shell = shell if shell is not None else RecordingShell()
        super().__init__(Compositor(self.shell, refresh=refresh, screen=screen,
                                    ping_timeout=ping_timeout), runtime_dir, name)


S = TypeVar("S", bound=ServedCompositor)


@contextlib.contextmanager
def serving(make: Callable[[Path], S]) -> Iterator[S]:
    """``make(runtime_dir)`` in a fresh directory of a short path (a Unix socket's path
    holds 107 bytes at most), stopped and the directory removed afterwards."""
    runtime = Path(tempfile.mkdtemp(prefix="qsc-"))
    try:
        running = make(runtime)
        try:
            yield running
        finally:
            running.stop()
    finally:
        shutil.rmtree(runtime, ignore_errors=True)
