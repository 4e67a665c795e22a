"""The emulator's process: vchan, hypervisor mapper and X connection on one asyncio loop.

``run(args)`` connects to the agent's socket vchan as qubes-guid does (the client,
retrying until the agent listens), maps the agent's grants as the GUI domain through
the simulated kernel that hosts the agent's domain, and drives ``daemon.GuiDaemon``:
the agent's bytes, X events and timers go in, the model's actions are carried out in
order. Exit status: 0 when the agent hangs up (or on SIGTERM/SIGINT, as qubes-guid on
SIGTERM), 1 on a protocol fault (the daemon's line on stderr) or when the X display,
the vchan or the simulated kernel cannot be used (one line naming the cause).

Mapping is as on Qubes: each dump's refs are mapped read-only through a fresh mapping
and the fd handed to the X server (MIT-SHM ``AttachFd``), which maps the pages itself.
The hypervisor is asked to watch the X server's process (its pid from the X socket's
``SO_PEERCRED``), so the X server's own mapping counts as the GUI domain's, exactly
until it carries out the ``ShmDetach``. The emulator keeps its own mapping from the dump
to the let-go (plus ``--hold``); where the X server cannot be watched it syncs with it
before ending that mapping, so the hypervisor never sees a dump unmapped that the X
server still maps.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import xcffib

from qubesshm.emulator import daemon as dm
from qubesshm.emulator import events as ev
from qubesshm.emulator.clipboard import ClipboardDir
from qubesshm.emulator.xwindows import XDisplayError, XWindows
from qubesshm.grants.files import UnsafeDirectory
from qubesshm.grants.hypercalls import ForeignKernelError, ForeignMapper, ForeignMapping
from qubesshm.guiproto import messages as gm
from qubesshm.vchan.address import GUI_PORT, default_socket_dir, own_domid_from_env, socket_path
from qubesshm.vchan.socketvchan import SocketStream, connect_socket
from qubesshm.vchan.stream import VchanClosed, VchanError

log = logging.getLogger("qubesshm.emulator")

PROG = "qubesshm guid-emulator"


class EmulatorError(Exception):
    """The emulator cannot go on; one line naming the cause and a fix."""


@dataclass(frozen=True)
class Options:
    domid: int
    hold: float = 0.0
    ack_delay: float = 0.0
    version: int = gm.VERSION
    display: str | None = None
    name: str | None = None
    socket_dir: Path | None = None
    use_shm: bool = True
    verify_exits: bool = True
    clipboard_dir: Path | None = None  # None: $XDG_RUNTIME_DIR/qubesshm-clipboard

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Options:
        return cls(domid=args.domid, hold=args.hold, ack_delay=args.ack_delay,
                   version=args.version, display=args.display, name=args.name,
                   use_shm=not args.no_shm, verify_exits=args.on_verify == "exit",
                   clipboard_dir=args.clipboard_dir)


class Executor:
    """Carries out the model's actions against the X server, the mapper and the vchan."""

    def __init__(self, options: Options, x: XWindows, mapper: ForeignMapper,
                 write: Callable[[bytes], None], vm_name: str, model: dm.GuiDaemon,
                 clipboard: ClipboardDir | None, clock: Callable[[], float]) -> None:
        self.options = options
        self.x = x
        self.mapper = mapper
        self.write = write
        self.vm_name = vm_name
        self.model = model  # told what the clipboard did, for what follows
        self.clipboard = clipboard
        self.clock = clock
        self.mappings: dict[int, ForeignMapping] = {}
        self.x_watched = False
        self._unsynced_detach = False
        self.exit: dm.Exit | None = None

    def watch_x_server(self) -> None:
        """Have the hypervisor count the X server's mmaps of granted pages as ours."""
        if not self.x.uses_shm or self.x.server_pid is None:
            return
        try:
            self.mapper.watch(self.x.server_pid)
        except OSError as exc:
            log.info("the simulated kernel cannot watch the X server (pid %d): %s; the "
                     "emulator syncs with X before it ends a mapping instead",
                     self.x.server_pid, exc.strerror or exc)
            return
        self.x_watched = True

    def apply(self, actions: Sequence[dm.Action]) -> None:
        for action in actions:
            if self.exit is not None:
                return
            self._apply(action)
        self.x.flush()

    def _apply(self, action: dm.Action) -> None:
        x = self.x
        match action:
            case dm.Send(data):
                self.write(data)
            case dm.MapDump():
                self._map_dump(action)
            case dm.Detach(dump):
                x.detach(dump)
                self._unsynced_detach = x.uses_shm
            case dm.Unmap(dump):
                if self._unsynced_detach and not self.x_watched:
                    x.sync()
                    self._unsynced_detach = False
                mapping = self.mappings.pop(dump, None)
                if mapping is not None:
                    self._unmap(mapping)
            case dm.CreateWindow(window, rect, override_redirect):
                x.create(window, rect, override_redirect, vm_name=self.vm_name)
            case dm.DestroyWindow(window):
                x.destroy(window)
            case dm.MapWindow(window, raise_window):
                x.map(window, raise_window=raise_window)
            case dm.UnmapWindow(window):
                x.unmap(window)
            case dm.MoveResize(window, rect):
                x.move_resize(window, rect)
            case dm.SetOverrideRedirect(window, value, remap):
                if remap:
                    x.unmap(window)
                x.set_override_redirect(window, value)
                if remap:
                    x.map(window, raise_window=False)
            case dm.SetName(window, name):
                x.set_name(window, name)
            case dm.SetClass(window, res_class, res_name):
                x.set_class(window, res_class, res_name)
            case dm.SetSizeHints(window, hints):
                x.set_size_hints(window, hints)
            case dm.SetTransientFor(window, parent):
                x.set_transient_for(window, parent)
            case dm.SetWmState(window, states):
                x.set_wm_state(window, states)
            case dm.RequestWmState(window, add, first, second):
                x.request_wm_state(window, add, first, second)
            case dm.Iconify(window):
                x.iconify(window)
            case dm.SetCursor(window, glyph):
                x.set_cursor(window, glyph)
            case dm.Put(window, dump, width, height, rect):
                x.put(window, dump, width, height, rect, rect.x, rect.y)
            case dm.Frame(window, width, height, border):
                x.frame(window, width, height, border)
            case dm.Fill(window, width, height):
                x.fill(window, width, height)
            case dm.SetUserTime(window, time):
                x.set_user_time(window, time)
            case dm.ClipboardStore() | dm.ClipboardClear() | dm.ClipboardPaste():
                self._clipboard(action)
            case dm.Exit():
                self.exit = action

    def _clipboard(self, action: dm.ClipboardStore | dm.ClipboardClear | dm.ClipboardPaste
                   ) -> None:
        """The clipboard files; a file the daemon cannot write ends it (exit 1)."""
        if self.clipboard is None:
            if isinstance(action, dm.ClipboardStore):
                log.warning("no clipboard directory: the VM's clipboard text is dropped")
            return
        try:
            match action:
                case dm.ClipboardStore(data, metadata):
                    if self.clipboard.store(data, metadata):
                        self.model.clipboard_stored()
                case dm.ClipboardClear(metadata):
                    self.clipboard.clear(metadata)
                case dm.ClipboardPaste(window, time, metadata):
                    data = self.clipboard.take(time, metadata)
                    for sent in self.model.clipboard_paste(window, data, self.clock()):
                        self._apply(sent)
        except OSError as exc:
            self.exit = dm.Exit(1, f"cannot use the clipboard files in {self.clipboard.path}: "
                                   f"{exc.strerror or exc}")

    def _map_dump(self, action: dm.MapDump) -> None:
        """gntdev map of the refs, read-only, then the fd to the X server (which syncs)."""
        try:
            mapping = self.mapper.map(self.options.domid, action.refs, writable=False)
        except OSError as exc:
            # qubes-guid: err(1, "ioctl(IOCTL_GNTDEV_MAP_GRANT_REF)")
            self.exit = dm.Exit(1, f"ioctl(IOCTL_GNTDEV_MAP_GRANT_REF): "
                                   f"{exc.strerror or exc} (window 0x{action.window:x}, "
                                   f"{len(action.refs)} refs of domain {self.options.domid})")
            return
        self.mappings[action.dump] = mapping
        self.x.attach(action.dump, mapping.fd, mapping.size)
        self._unsynced_detach = False  # the attach waited for the X server's answer

    def _unmap(self, mapping: ForeignMapping) -> None:
        try:
            self.mapper.unmap(mapping)
        except OSError as exc:
            # The hypervisor's process is gone (the agent's VM with it): nothing is
            # mapped any more; its vchan's end follows.
            log.info("cannot unmap a dump: %s", exc.strerror or exc)

    def close(self) -> None:
        for mapping in list(self.mappings.values()):
            self._unmap(mapping)
        self.mappings.clear()


class Emulator:
    """One run: the agent's stream in, the model's actions out, until an Exit."""

    def __init__(self, options: Options, x: XWindows, mapper: ForeignMapper,
                 stream: SocketStream, clipboard: ClipboardDir | None, *,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.options = options
        self.x = x
        self.stream = stream
        self.clock = clock
        vm_name = options.name or f"vm{options.domid}"
        screen = x.screen
        work = screen.work_area
        self.model = dm.GuiDaemon(dm.Settings(
            screen=dm.Screen(screen.width, screen.height, screen.depth,
                             dm.Rect(work.x, work.y, work.width, work.height)),
            version=options.version, hold=options.hold, ack_delay=options.ack_delay,
            vm_name=vm_name, domid=options.domid, verify_exits=options.verify_exits))
        mapped = x.keyboard_mapping()
        self.model.keyboard_mapped(mapped.copy_keycode, mapped.paste_keycode)
        self.executor = Executor(options, x, mapper, stream.write, vm_name, self.model,
                                 clipboard, clock)
        self._done: asyncio.Future[dm.Exit] | None = None
        self._timer: asyncio.TimerHandle | None = None

    async def run(self) -> dm.Exit:
        loop = asyncio.get_running_loop()
        self._done = loop.create_future()
        self.executor.watch_x_server()
        loop.add_reader(self.x.fd, self._x_readable)
        reader = asyncio.ensure_future(self._read_agent())
        try:
            return await self._done
        finally:
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reader
            loop.remove_reader(self.x.fd)
            counted = self.model.counters
            log.info("%d messages, %d dumps, %d ACKs, %d DESTROY echoes", counted.messages,
                     counted.dumps, counted.acks, counted.echoes)
            if self._timer is not None:
                self._timer.cancel()
            self.executor.close()

    def stop(self, status: int, message: str = "") -> None:
        if self._done is not None and not self._done.done():
            self._done.set_result(dm.Exit(status, message))

    def _apply(self, actions: Sequence[dm.Action]) -> None:
        """Carry out ``actions``, then whatever X events came meanwhile; end the run on an
        Exit, a lost X server, or a bug (never a hang or a traceback)."""
        if self._done is None or self._done.done():
            return
        try:
            self.executor.apply(actions)
            self._x_events()
        except VchanClosed:
            return  # the agent went away: its EOF ends the run
        except XDisplayError as exc:
            self.stop(1, str(exc))
            return
        except xcffib.ConnectionException:
            self.stop(1, f"lost the connection to X display {self.x.display_name!r}")
            return
        except Exception as exc:
            log.exception("the emulator failed")
            self.stop(1, f"internal error: {exc!r}")
            return
        if self.executor.exit is not None:
            self.stop(self.executor.exit.status, self.executor.exit.message)
            return
        self._schedule()

    def _schedule(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        deadline = self.model.next_deadline()
        if deadline is not None:
            loop = asyncio.get_running_loop()
            self._timer = loop.call_later(max(0.0, deadline - self.clock()), self._tick)

    def _tick(self) -> None:
        self._timer = None
        self._apply(self.model.tick(self.clock()))

    def _x_readable(self) -> None:
        self._apply(())

    def _x_events(self) -> None:
        """Every X event queued (some arrive while the executor waits for a reply)."""
        while self._done is not None and not self._done.done():
            events = self.x.events()
            if not events:
                self.x.flush()  # what reading them sent (a ping's answer)
                return
            for event in events:
                now = self.clock()
                match event:
                    case ev.Exposed(window, rect):
                        actions = self.model.expose(window, rect, now)
                    case ev.Configured(window, rect):
                        actions = self.model.configured(window, rect, now)
                    case ev.KeyboardMapped(copy_keycode, paste_keycode):
                        self.model.keyboard_mapped(copy_keycode, paste_keycode)
                        continue
                    case _:
                        actions = self.model.x_input(event, now)
                self.executor.apply(actions)
                if self.executor.exit is not None:
                    return

    async def _read_agent(self) -> None:
        try:
            await self._read_agent_until_done()
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a bug must end the run with a line, never hang it
            log.exception("the emulator failed")
            self.stop(1, f"internal error: {exc!r}")

    async def _read_agent_until_done(self) -> None:
        while self._done is not None and not self._done.done():
            data = await self.stream.read()
            if not data:
                self._apply(self.model.hang_up())
                self.stop(0)
                return
            self._apply(self.model.receive(data, self.clock()))
            # The X server carries out queued detaches soon after: a let-go dump's
            # mapping ends once the batch that let it go is written.
            self._apply(self.model.tick(self.clock()))
            with contextlib.suppress(VchanClosed):
                await self.stream.drain()


async def _main(options: Options) -> int:
    """Open X, wait for the agent, map through its kernel, run; SIGTERM/SIGINT end it (0)."""
    loop = asyncio.get_running_loop()
    signalled = asyncio.Event()
    waiting = asyncio.ensure_future(_connect_and_run(options))
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, signalled.set)
    stop = asyncio.ensure_future(signalled.wait())
    try:
        await asyncio.wait({waiting, stop}, return_when=asyncio.FIRST_COMPLETED)
        if not waiting.done():
            waiting.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await waiting
            return 0
        result = waiting.result()
    finally:
        stop.cancel()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
    if result.message:
        print(f"{PROG}: {result.message}", file=sys.stderr)
    return result.status


def open_clipboard(path: Path | None) -> ClipboardDir | None:
    """The clipboard directory, said on stderr (one line). A ``--clipboard-dir`` that is
    not private is an ``EmulatorError``; with none and no ``$XDG_RUNTIME_DIR`` the
    emulator goes on without a clipboard, and says so."""
    if path is None and not os.environ.get("XDG_RUNTIME_DIR"):
        print(f"{PROG}: no clipboard: $XDG_RUNTIME_DIR is not set and no --clipboard-dir "
              "was given (Ctrl+Shift+C and Ctrl+Shift+V are still taken, to no effect)",
              file=sys.stderr, flush=True)
        return None
    try:
        clipboard = ClipboardDir.open(path)
    except (UnsafeDirectory, OSError) as exc:
        raise EmulatorError(f"no clipboard directory: {exc}") from exc
    print(f"{PROG}: clipboard: {clipboard.file} (Ctrl+Shift+C copies the VM's, "
          "Ctrl+Shift+V pastes it into the VM)", file=sys.stderr, flush=True)
    return clipboard


async def _connect_and_run(options: Options) -> dm.Exit:
    try:
        x = XWindows(options.display, use_shm=options.use_shm)
    except XDisplayError as exc:
        raise EmulatorError(str(exc)) from exc
    try:
        clipboard = open_clipboard(options.clipboard_dir)
        own = own_domid_from_env()
        directory = options.socket_dir or default_socket_dir()
        path = socket_path(directory, options.domid, own, GUI_PORT)
        log.info("waiting for the agent of domain %d at %s", options.domid, path)
        stream = await connect_socket(path, retry=True)
        try:
            mapper = _connect_mapper(own, options.domid)
            try:
                emulator = Emulator(options, x, mapper, stream, clipboard)
                return await emulator.run()
            finally:
                mapper.close()
        finally:
            stream.close()
    except VchanError as exc:
        raise EmulatorError(str(exc)) from exc
    finally:
        x.close()


def _connect_mapper(own_domid: int, domid: int) -> ForeignMapper:
    from qubesshm.grants.hypercalls import connect_foreign

    try:
        return connect_foreign(own_domid, granter_domid=domid)
    except ForeignKernelError as exc:
        raise EmulatorError(str(exc)) from exc
    except (OSError, ValueError) as exc:  # e.g. XDG_RUNTIME_DIR unusable
        raise EmulatorError(f"cannot look for the simulated kernel of domain {domid}: "
                            f"{exc}") from exc


def run(args: argparse.Namespace) -> int:
    """``qubesshm guid-emulator``: the exit status."""
    options = Options.from_args(args)
    try:
        return asyncio.run(_main(options))
    except EmulatorError as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0


def main(argv: Sequence[str] | None = None) -> int:
    from qubesshm.emulator.cli import add_arguments

    parser = argparse.ArgumentParser(
        prog=PROG, description="The Qubes GUI daemon (qubes-guid) emulated on an X display: "
        "the dom0 side of the GUI protocol for an agent on this machine.")
    add_arguments(parser)
    parser.add_argument("-v", "--verbose", action="store_true", help="say what it does")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format=f"{PROG}: %(message)s")
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
