"""``qubesshm run -- CMD``: one command through a private proxy, with a report at exit."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ..grants.files import write_output
from ..grants.halves import GrantHalves
from ..relay.control import snapshot
from ..relay.server import RelayOptions
from ..report import KERNEL_CHOICES, build_report, format_report, kernels_for
from ..wire.protocol import ProtocolTable
from . import common, proxy

NAME = "run"
HELP = "run one command through a private proxy (or, with --agent, a private GUI agent)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from .agent import add_agent_options

    common.add_relay_options(parser, None)
    common.add_remote_options(parser)
    agent = parser.add_argument_group(
        "agent mode", "qubesshm as the command's compositor and Qubes GUI agent, its "
        "windows sent to a GUI daemon (as qubesshm agent does)")
    agent.add_argument("--agent", action="store_true",
                       help="be the command's GUI agent instead of a proxy: serve its "
                       "Wayland connection and send its windows to the GUI daemon")
    agent.add_argument("--emulator", action="store_true",
                       help="with --agent: also start qubesshm guid-emulator on $DISPLAY "
                       "(a private vchan and domain id), to see the app as Qubes shows it")
    add_agent_options(agent)
    common.add_grants_option(parser)
    common.add_buffer_options(parser)
    parser.add_argument("--kernel", choices=KERNEL_CHOICES, default=None,
                        help="kernel parameters for the simulated grant layer and the "
                        "report's findings: stock (Linux's: gntalloc limit 1024, "
                        "free_per_iteration 10), qubes (a Qubes VM's: 2^30, 1000), or both "
                        "(run on qubes', report on both; the default)")
    common.add_report_options(parser)
    parser.add_argument("cmd", nargs=argparse.REMAINDER, metavar="-- CMD [ARGS...]")


def command(args: argparse.Namespace) -> list[str]:
    """The command to run: what follows ``--``."""
    cmd = list(args.cmd)
    return cmd[1:] if cmd and cmd[0] == "--" else cmd


def check(args: argparse.Namespace) -> str | None:
    if not command(args):
        return "qubesshm run: give the command after --"
    if args.agent and (args.remote or args.remote_socket):
        return ("qubesshm run: --remote splits the proxy; with --agent qubesshm is the "
                "compositor and its GUI domain is the GUI daemon's: drop one of them")
    if args.agent:
        from ..agent.main import check_run_agent

        return check_run_agent(args)
    if args.emulator:
        return "qubesshm run: --emulator goes with --agent (the emulator is a GUI daemon)"
    mistake = common.check_remote(args, NAME)
    if mistake:
        return mistake
    for option, given in (("--vchan", args.vchan != "auto"), ("--vchan-dir", args.vchan_dir),
                          ("--domid", args.domid is not None),
                          ("--gui-domid", args.gui_domid is not None),
                          ("--refresh", args.refresh != 60.0),
                          ("--keyboard-layout", args.keyboard_layout is not None)):
        if given:
            return f"qubesshm run: {option} is an agent mode option: add --agent"
    return common.check_grants(args, NAME)


def main(args: argparse.Namespace) -> int:
    if args.kernel is None:
        args.kernel = "both"
    if args.agent:
        from ..agent.main import run_command

        return run_command(args, command(args))
    return proxy.run_proxy(args, _run)


def report_at_exit(args: argparse.Namespace, stats: dict[str, Any]) -> bool:
    """Print the report of a run whose final counters are ``stats`` (unless
    ``--quiet``) and write ``--report-json``; False if that file could not be written."""
    if args.quiet and not args.report_json:
        return True
    report = build_report(stats, kernels_for(args.kernel), args.late_timeout)
    if not args.quiet:
        print(format_report(report), file=sys.stderr)
    if args.report_json:
        try:
            write_output(Path(args.report_json), json.dumps(report, indent=2) + "\n")
        except OSError as exc:
            print(f"qubesshm run: cannot write the report to {args.report_json}: "
                  f"{exc.strerror or exc}", file=sys.stderr)
            return False
    return True


async def _exited(child: subprocess.Popen[bytes]) -> int:
    """The child's exit status (-N for signal N), waited for on the loop through a
    pidfd, which asyncio's loop and uvloop both poll."""
    loop = asyncio.get_running_loop()
    pidfd = os.pidfd_open(child.pid)
    done = loop.create_future()
    def readable() -> None:
        if not done.done():
            done.set_result(None)

    loop.add_reader(pidfd, readable)
    try:
        await done
    finally:
        loop.remove_reader(pidfd)
        os.close(pidfd)
    return child.wait()


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, sig)


@contextlib.contextmanager
def _foreground(pgid: int) -> Iterator[None]:
    """Make ``pgid`` the terminal's foreground job while it runs, as a shell does,
    so it can read the terminal and Ctrl-C goes to it."""
    try:
        tty = os.open("/dev/tty", os.O_RDWR | os.O_CLOEXEC)
    except OSError:
        yield  # no controlling terminal: nothing to hand over
        return
    try:
        if os.tcgetpgrp(tty) != os.getpgrp():
            yield  # we are not the foreground job ourselves
            return
        # A background group may only take the terminal with SIGTTOU ignored.
        previous = signal.signal(signal.SIGTTOU, signal.SIG_IGN)
        try:
            os.tcsetpgrp(tty, pgid)
            # If it touched the terminal before it owned it, it is stopped now.
            _signal_group(pgid, signal.SIGCONT)
            try:
                yield
            finally:
                os.tcsetpgrp(tty, os.getpgrp())
        finally:
            signal.signal(signal.SIGTTOU, previous)
    finally:
        os.close(tty)


CANNOT_START = 127  # as a shell says of a command it could not start


async def run_child(cmd: list[str], wayland_display: Path) -> int:
    """Run ``cmd`` with ``WAYLAND_DISPLAY`` pointing at qubesshm, as the terminal's
    foreground job, passing SIGINT, SIGTERM and SIGHUP on to it once; its exit
    status (-N for signal N), or ``CANNOT_START`` (said on stderr)."""
    env = dict(os.environ)
    env["WAYLAND_DISPLAY"] = str(wayland_display)
    env.pop("WAYLAND_SOCKET", None)
    try:
        # The command gets a process group of its own, so a signal meant for it
        # arrives exactly once: from us, never also from a group-wide kill. (Started
        # with subprocess, not the loop's API: uvloop refuses process_group.)
        child = subprocess.Popen(cmd, env=env, process_group=0)
    except OSError as exc:
        print(f"qubesshm run: cannot start {cmd[0]}: {exc}", file=sys.stderr)
        return CANNOT_START
    with _foreground(child.pid):
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            loop.add_signal_handler(sig, _signal_group, child.pid, sig)
        return await _exited(child)


async def _run(args: argparse.Namespace, protocol: ProtocolTable, options: RelayOptions,
               grants: GrantHalves, loop_name: str) -> int:
    cmd = command(args)
    socket_name = args.socket or f"qubesshm-run-{os.getpid()}"
    server = await proxy.start_any(args, protocol, options, socket_name, grants)
    common.log.info("%s", proxy.where(server, grants, loop_name))
    try:
        status = await run_child(cmd, server.listener.path)
        if status == CANNOT_START:
            return status
        server.drain_clients()
        await server.settle(args.late_timeout)
    finally:
        server.close()
        if server.remote is not None:
            await server.remote.aclose()
        if not args.quiet:
            proxy.summary(server, grants)
        written = report_at_exit(args, snapshot(server.ledger, grants, server.lifetimes))
    # Shells report a death by signal N as 128+N.
    status = status if status >= 0 else 128 - status
    if server.ended_count:
        # Said when it happened too, but an app that then exits 0 (weston-terminal does)
        # would leave the user with a window that flashed and vanished, and no reason.
        for line in server.ended_clients:
            print(f"qubesshm run: qubesshm ended {line}", file=sys.stderr)
        if server.ended_count > len(server.ended_clients):
            print(f"qubesshm run: qubesshm ended {server.ended_count} clients in all (the "
                  f"last {len(server.ended_clients)} above)", file=sys.stderr)
        return status or 1
    return status if written else status or 1
