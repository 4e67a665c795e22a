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
    common.add_grants_option(parser)
    common.add_buffer_options(parser)
    common.add_kernel_option(parser)


def check(args: argparse.Namespace) -> str | None:
    return common.check_grants(args, NAME)


def main(args: argparse.Namespace) -> int:
    return proxy.run_proxy(args, _serve)


async def _serve(args: argparse.Namespace, protocol: ProtocolTable,
                 options: RelayOptions, grants: GrantHalves, loop_name: str) -> int:
    server = proxy.start(args, protocol, options, args.socket, grants)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        loop.add_signal_handler(sig, stop.set)
    # serve always says where it is (once a signal would end it cleanly); run, whose
    # command shares the terminal, with -v.
    print(f"qubesshm: {proxy.where(server, grants, loop_name)}", file=sys.stderr, flush=True)
    try:
        await stop.wait()
        await server.settle(args.late_timeout)
    finally:
        server.close()
        proxy.summary(server, grants)
    return 0
