"""``qubesshm host``: the GUI domain's half of a split proxy, on its stdin and stdout."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from typing import TYPE_CHECKING

from .. import options
from . import common

if TYPE_CHECKING:
    from ..relay.control import ControlSocket
    from ..stream.host import HostHalf

NAME = "host"
HELP = ("the GUI domain's half of a split proxy: map a VM's grants for the compositor "
        "(reads the stream on stdin; started by serve --remote, or as a qrexec service)")

log = logging.getLogger("qubesshm.host")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    common.add_upstream_option(parser)
    common.add_grants_option(parser)
    common.add_event_loop_option(parser, "the event loop: auto (uvloop when installed), "
                                 "uvloop or asyncio")
    parser.add_argument("--peer-domid", type=options.domid, metavar="N",
                        help="the VM this host serves: its greeting must name this domain, "
                        "and only its grants are mapped (on Xen: give it, e.g. from "
                        "qvm-prefs \"$QREXEC_REMOTE_DOMAIN\" xid; simulated: the VM's "
                        "greeting says it)")
    parser.add_argument("--stats-socket", metavar="NAME",
                        help="where qubesshm stats --socket NAME reads this half's counters "
                        "(a name in $XDG_RUNTIME_DIR, or a path; default qubesshm-host-DOMID "
                        "with --peer-domid, else qubesshm-host-PID)")
    parser.add_argument("--max-pages", type=options.positive_pages, default=None,
                        metavar="N", help="pages mapped at once for the VM at most "
                        "(default 2097152: 8 GiB); a pool past it ends its connection")


def check(args: argparse.Namespace) -> str | None:
    if os.isatty(0) or os.isatty(1):
        return ("qubesshm host: the stream from the VM side comes on stdin and goes on "
                "stdout, which are a terminal here: start it from the VM side (qubesshm "
                "serve --remote 'qubesshm host'), or as a qrexec service")
    return common.check_grants(args, NAME)


def main(args: argparse.Namespace) -> int:
    from ..grants.select import choose
    from ..relay.eventloop import loop_factory
    from ..relay.listener import upstream_path
    from .proxy import probe_upstream

    # Its lines share a terminal with the VM side's when serve --remote started it.
    for handler in logging.getLogger().handlers:
        handler.setFormatter(logging.Formatter("qubesshm host: %(message)s"))
    choice = choose(args.grants)
    if choice == "xen" and args.peer_domid is None:
        raise common.CommandError("on Xen give the VM's domain id with "
                                  "--peer-domid N: only its grants may be mapped")
    upstream = upstream_path(args.upstream)
    probe_upstream(upstream)
    # The stream is fd 1 from here on; anything else printing to stdout lands on stderr.
    stream_out = os.dup(1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    factory, _ = loop_factory(args.event_loop)
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(_host(args, choice, upstream, stream_out))


async def _host(args: argparse.Namespace, choice: str, upstream: os.PathLike[str] | str,
                stream_out: int) -> int:
    from pathlib import Path

    from ..grants.api import GrantBackend
    from ..stream.host import DEFAULT_MAX_PAGES, HostHalf

    own_domid = common.own_xen_domid() if choice == "xen" else 0

    def open_backend(vm_domid: int) -> GrantBackend:
        if choice == "xen":
            from ..grants.xen import XenBackend

            return XenBackend()
        from ..grants.foreign import connect_sim_host
        from ..stream.vmside import HYPERVISOR_ENV

        path = os.environ.get(HYPERVISOR_ENV)
        return connect_sim_host(own_domid, vm_domid, Path(path) if path else None)

    loop = asyncio.get_running_loop()
    half = HostHalf(loop, 0, stream_out, upstream=Path(upstream), own_domid=own_domid,
                    open_backend=open_backend, peer_domid=args.peer_domid,
                    max_pages=args.max_pages or DEFAULT_MAX_PAGES)
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        loop.add_signal_handler(sig, half.close)
    control = _stats_socket(args, half)
    log.info("serving the stream on stdin/stdout, compositor %s", upstream)
    try:
        reason = await half.done
    finally:
        if control is not None:
            control.close()
        half.close()
        c = half.counters
        log.info("%d connections (%d refused), %d pools mapped, %d unmapped, peak "
                 "%d pages", c.connections, c.refused, c.pools_mapped, c.pools_unmapped,
                 c.peak_pages_mapped)
    if reason is not None:
        print(f"qubesshm host: {reason}", file=sys.stderr, flush=True)
        return 1
    return 0


def _stats_socket(args: argparse.Namespace, half: HostHalf) -> ControlSocket | None:
    """The stats socket, or None (said in a line) where it cannot be had: the host
    serves its VM whether or not anyone can read its counters."""
    from ..relay.control import ControlSocket, stats_path
    from ..relay.listener import AddressError, runtime_path

    name = args.stats_socket or (f"qubesshm-host-{args.peer_domid}"
                                 if args.peer_domid is not None else
                                 f"qubesshm-host-{os.getpid()}")
    try:
        path = runtime_path(name)
        control = ControlSocket(stats_path(path), half.snapshot)
    except (AddressError, OSError) as exc:
        log.warning("no stats socket (%s): give a free one with --stats-socket NAME", exc)
        return None
    log.info("counters: qubesshm stats --socket %s", path)
    return control
