"""``qubesshm serve``: relay Wayland clients to the compositor until a signal."""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys

from ..grants.halves import GrantHalves
from ..relay.listener import DEFAULT_SOCKET_NAME
from ..relay.server import RelayOptions
from ..wire.protocol import ProtocolTable
from . import common, proxy

NAME = "serve"
HELP = "relay Wayland clients to the compositor"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    common.add_relay_options(parser, DEFAULT_SOCKET_NAME)
    common.add_remote_options(parser)
    common.add_grants_option(parser)
    common.add_buffer_options(parser)
    common.add_kernel_option(parser)


def check(args: argparse.Namespace) -> str | None:
    return common.check_remote(args, NAME) or common.check_grants(args, NAME)


def main(args: argparse.Namespace) -> int:
    return proxy.run_proxy(args, _serve)


async def _serve(args: argparse.Namespace, protocol: ProtocolTable,
                 options: RelayOptions, grants: GrantHalves, loop_name: str) -> int:
    server = await proxy.start_any(args, protocol, options, args.socket, grants)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        loop.add_signal_handler(sig, stop.set)
    lost: list[str] = []
    if server.remote is not None:
        # Without its host half a split proxy serves no one: it ends, its clients told.
        def host_gone(reason: str) -> None:
            lost.append(reason)
            stop.set()

        server.remote.on_end = host_gone
    # serve always says where it is (once a signal would end it cleanly); run, whose
    # command shares the terminal, with -v.
    print(f"qubesshm: {proxy.where(server, grants, loop_name)}", file=sys.stderr, flush=True)
    try:
        await stop.wait()
        await server.settle(args.late_timeout)
    finally:
        server.close()
        if server.remote is not None:
            await server.remote.aclose()
        proxy.summary(server, grants)
    if lost:
        print(f"qubesshm: {lost[0]}", file=sys.stderr, flush=True)
        return 1
    return 0
