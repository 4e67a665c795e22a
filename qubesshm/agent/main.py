"""``qubesshm agent``'s work: the agent process from options to the summary at exit."""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from typing import Any

from ..grants.agentareas import release_summary
from ..grants.lifetimes import LifetimePolicy
from ..grants.params import KERNELS
from ..grants.select import choose
from ..relay.eventloop import loop_factory
from ..vchan.address import default_socket_dir
from .process import AgentOptions, AgentProcess


def agent_options(args: argparse.Namespace, vchan: str) -> AgentOptions:
    policy = LifetimePolicy(cache_pages=args.cache_pages, client_pages=args.client_pages,
                            late_timeout=args.late_timeout, defer_batch=args.defer_batch,
                            drain_target=args.drain_target)
    grants = choose(args.grants)
    kernel = KERNELS["stock" if getattr(args, "kernel", None) == "stock" else "qubes"]
    return AgentOptions(socket=args.socket, vchan=vchan,
                        vchan_dir=args.vchan_dir or default_socket_dir(),
                        domid=args.domid, gui_domid=args.gui_domid, refresh=args.refresh,
                        grants=grants, kernel=kernel, policy=policy,
                        gntalloc_limit=getattr(args, "gntalloc_limit", None),
                        keyboard_layout=getattr(args, "keyboard_layout", None) or "us")


def where(process: AgentProcess, loop_name: str) -> str:
    opts = process.options
    vchan = (f"socket vchan {process.vchan_path}" if opts.vchan == "socket"
             else f"libvchan-xen to domain {opts.gui_domid}")
    assert process.grants is not None
    return (f"agent for Wayland apps on {process.socket_path}, the GUI daemon of domain "
            f"{opts.gui_domid} on {vchan} (this VM: domain {opts.domid}); grants: "
            f"{process.grants.describe()}; event loop: {loop_name}")


def run_agent(args: argparse.Namespace) -> int:
    from ..commands.agent import vchan_choice

    options = agent_options(args, vchan_choice(args))
    factory, loop_name = loop_factory(args.event_loop)
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(_serve(options, loop_name))


async def start_process(options: AgentOptions) -> AgentProcess:
    """An agent process serving; a start-up failure the user can fix (a vchan
    directory, a missing library, the grant devices) is one line (``CommandError``)."""
    from ..commands.common import CommandError
    from ..vchan.stream import VchanError

    process = AgentProcess(options)
    try:
        await process.start()
    except BaseException as exc:
        await process.close(settle=0)
        if isinstance(exc, VchanError):
            raise CommandError(str(exc)) from exc
        if isinstance(exc, OSError) and not isinstance(exc, ConnectionError):
            raise CommandError(f"{exc.strerror or exc}"
                               + (f": {exc.filename}" if exc.filename else "")) from exc
        raise
    return process


async def _serve(options: AgentOptions, loop_name: str) -> int:
    process = await start_process(options)
    print(f"qubesshm: {where(process, loop_name)}", file=sys.stderr, flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        loop.add_signal_handler(sig, stop.set)
    final: dict[str, Any] = {}
    try:
        await stop.wait()
    finally:
        final = await process.close(settle=options.policy.late_timeout
                                    if options.policy is not None else 2.0)
        if final:
            print(f"qubesshm: {agent_summary(final)}", file=sys.stderr, flush=True)
    return 0


def agent_summary(stats: dict[str, Any]) -> str:
    """The exit line: windows and the daemon's ACKs, pixels, grant pages, releases."""
    daemon = stats.get("daemon", {})
    grants = {k: "n/a" if v is None else v for k, v in stats["grants"].items()}
    lifetimes = stats.get("lifetimes") or {}
    late = (f"; {lifetimes.get('late_releases', 0)} late, {lifetimes.get('deferred_areas', 0)} "
            f"areas to deferred reclaim in {lifetimes.get('defer_batches', 0)} batches, "
            f"free_per_iteration raised {lifetimes.get('free_per_iteration_raises', 0)}x and "
            f"restored {lifetimes.get('free_per_iteration_restores', 0)}x"
            if lifetimes.get("late_releases") else "")
    return (f"{daemon.get('created', 0)} windows, {daemon.get('dumps', 0)} dumps "
            f"(+{daemon.get('barriers', 0)} barriers), {daemon.get('acks', 0)} ACKs; "
            f"{stats['commits']} commits, {stats['bytes_copied'] / (1 << 20):.1f} MiB "
            f"copied; grant pages: {grants['shared_total']} shared, {grants['ended_total']} "
            f"ended, {grants['deferred']} deferred, {grants['leaked']} leaked, "
            f"{grants['live']} live, peak {grants['peak_live']}"
            + release_summary(lifetimes) + late)


# -- qubesshm run --agent [--emulator] -- CMD ---------------------------------------------------

PROXY_ONLY: tuple[tuple[str, str, object], ...] = (
    ("--upstream", "upstream", None), ("--reclaim", "reclaim", "notify"),
    ("--sim-hold", "sim_hold", 0.0), ("--sim-watch", "sim_watch", []),
    ("--allow-dmabuf", "allow_dmabuf", False))


def check_run_agent(args: argparse.Namespace) -> str | None:
    """``run --agent``'s usage mistakes, before anything starts."""
    import os

    from ..commands.agent import check_agent

    for option, attr, default in PROXY_ONLY:
        if getattr(args, attr, default) != default:
            return f"qubesshm run: {option} is a proxy option; it does nothing with --agent"
    if args.emulator:
        if not os.environ.get("DISPLAY"):
            return ("qubesshm run: --emulator shows the windows on an X display, and $DISPLAY "
                    "is not set (start Xvfb, or run it in a desktop session)")
        if args.domid is None:
            # A domain of its own: the emulator finds the simulated kernel by it.
            args.domid = 1 + os.getpid() % 32000
        if args.gui_domid is None:
            args.gui_domid = 0
    return check_agent(args, "run")


def run_command(args: argparse.Namespace, cmd: list[str]) -> int:
    import contextlib
    import os
    import shutil
    import tempfile
    from pathlib import Path

    from ..commands.agent import vchan_choice
    from ..relay.listener import runtime_path

    if args.socket is None:
        args.socket = f"qubesshm-agent-{os.getpid()}"
    private_vchan: Path | None = None
    if args.emulator and args.vchan_dir is None and vchan_choice(args) == "socket":
        base = runtime_path(args.socket).parent  # where its socket goes
        private_vchan = Path(tempfile.mkdtemp(prefix="qs-vchan-", dir=base))
        args.vchan_dir = private_vchan
    try:
        options = agent_options(args, vchan_choice(args))
        factory, loop_name = loop_factory(args.event_loop)
        with asyncio.Runner(loop_factory=factory) as runner:
            return runner.run(_run_command(args, options, cmd, loop_name))
    finally:
        if private_vchan is not None:
            with contextlib.suppress(OSError):
                shutil.rmtree(private_vchan)


async def _run_command(args: argparse.Namespace, options: AgentOptions, cmd: list[str],
                       loop_name: str) -> int:
    import logging
    import os
    import subprocess

    from ..commands.run import CANNOT_START, _exited, report_at_exit, run_child

    log = logging.getLogger("qubesshm.agent")
    process = await start_process(options)
    emulator: subprocess.Popen[bytes] | None = None
    log.info("%s", where(process, loop_name))
    status = 1
    final: dict[str, Any] = {}
    try:
        if args.emulator:
            env = dict(os.environ)
            env["VCHAN_SOCKET_DIR"] = str(options.vchan_dir)
            env["VCHAN_DOMAIN"] = str(options.gui_domid)
            emulator = subprocess.Popen(
                [sys.executable, "-m", "qubesshm", "guid-emulator", "--domid",
                 str(options.domid)], env=env, process_group=0)
            link = process.link
            assert link is not None
            waiter = asyncio.ensure_future(link.connected.wait())
            gone = asyncio.ensure_future(_exited(emulator))
            await asyncio.wait({waiter, gone}, return_when=asyncio.FIRST_COMPLETED)
            if gone.done():
                waiter.cancel()
                print(f"qubesshm run: the GUI-daemon emulator exited with status "
                      f"{gone.result()} before connecting (its message is above)",
                      file=sys.stderr)
                return 1
            gone.cancel()
        assert process.socket_path is not None
        status = await run_child(cmd, process.socket_path)
        if status == CANNOT_START:
            return status
    finally:
        async def emulator_gone() -> None:
            # It exits when the vchan closes, letting go of every dump: only then are
            # the last areas' grants ended, never deferred.
            if emulator is not None and emulator.poll() is None:
                try:
                    await asyncio.wait_for(_exited(emulator), 10)
                except TimeoutError:
                    emulator.terminate()
                    emulator.wait()

        final = await process.close(settle=args.late_timeout, daemon_gone=emulator_gone)
        if final and not args.quiet:
            print(f"qubesshm: {agent_summary(final)}", file=sys.stderr)
    status = status if status >= 0 else 128 - status
    if final and not report_at_exit(args, final):
        return status or 1
    return status
