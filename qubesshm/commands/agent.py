"""``qubesshm agent``: be a Qubes VM's GUI agent for Wayland apps until a signal."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from .. import options
from . import common

NAME = "agent"
HELP = "be a Qubes VM's GUI agent: the Wayland compositor of its apps, windows to dom0"
DEFAULT_AGENT_SOCKET = "wayland-0"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    common.add_socket_option(parser, DEFAULT_AGENT_SOCKET)
    add_agent_options(parser)
    common.add_event_loop_option(parser, help="the event loop the agent runs on: uvloop, "
                                 "asyncio's own, or uvloop when installed (default "
                                 "%(default)s)")
    common.add_grants_option(parser)
    common.add_kernel_option(parser)
    common.add_gntalloc_limit_option(parser)
    common.add_cache_options(parser)
    parser.add_argument("--late-timeout", type=options.seconds, default=2.0,
                        metavar="SECONDS", help="how long the GUI daemon may go without "
                        "confirming (by its ACK order) that it let go of an area, before "
                        "the area's grants go to the kernel's deferred reclaim (default "
                        "%(default)s)")
    parser.add_argument("--defer-batch", type=options.positive_pages, default=2048,
                        metavar="PAGES", help="most pages handed to deferred reclaim per "
                        "second (default %(default)s)")
    parser.add_argument("--drain-target", type=options.seconds, default=2.0,
                        metavar="SECONDS", help="raise free_per_iteration so the agent's "
                        "deferred backlog drains within this time (default %(default)s)")


def add_agent_options(parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    """Where the GUI daemon is: the vchan, the domain ids, and the frame rate."""
    parser.add_argument("--vchan", choices=("auto", "socket", "xen"), default="auto",
                        help="the vchan to the GUI daemon: socket (a UNIX stream in "
                        "--vchan-dir, as qubes-core-vchan-socket makes; the default off "
                        "Xen), xen (libvchan-xen; the default where /dev/xen/gntalloc "
                        "exists)")
    parser.add_argument("--vchan-dir", type=Path, metavar="DIR",
                        help="socket vchan: the directory of its socket (default: "
                        "$VCHAN_SOCKET_DIR, else /var/run/vchan)")
    parser.add_argument("--domid", type=options.domid, metavar="N",
                        help="this VM's domain id, as the socket vchan names its socket "
                        "(default: $VCHAN_DOMAIN, else 0)")
    parser.add_argument("--gui-domid", type=options.domid, metavar="N",
                        help="the GUI daemon's domain id (default: QubesDB's "
                        "/qubes-gui-domain-xid where qubesdb-read exists, else 0)")
    parser.add_argument("--refresh", type=options.refresh_rate, default=60.0, metavar="HZ",
                        help="frame callbacks of mapped windows per second, and the "
                        "output's refresh rate (default %(default)s)")
    parser.add_argument("--keyboard-layout", metavar="LAYOUT[+VARIANT[+OPTIONS]]",
                        help="the keyboard the apps get, as the qube's keyboard_layout "
                        "property names it (e.g. de, fr+azerty, us++compose:ralt; "
                        "default us)")


def vchan_choice(args: argparse.Namespace) -> str:
    if args.vchan != "auto":
        return str(args.vchan)
    return "xen" if os.path.exists("/dev/xen/gntalloc") else "socket"


def check(args: argparse.Namespace) -> str | None:
    return check_agent(args, NAME)


def check_agent(args: argparse.Namespace, command: str) -> str | None:
    """Usage mistakes of the agent's options, before anything starts."""
    from ..vchan.address import default_gui_domid, own_domid_from_env
    from ..vchan.stream import VchanError

    if args.domid is None:
        try:
            args.domid = own_domid_from_env()
        except VchanError as exc:
            return f"qubesshm {command}: {exc}"
    if args.gui_domid is None:
        try:
            args.gui_domid = default_gui_domid()
        except VchanError as exc:
            return f"qubesshm {command}: {exc}"
    layout = getattr(args, "keyboard_layout", None)
    if layout is not None:
        from ..compositor.keymap import Keymap, KeymapError

        try:
            Keymap.parse(layout).close()
        except KeymapError as exc:
            return (f"qubesshm {command}: --keyboard-layout {layout}: {exc}; give "
                    "LAYOUT[+VARIANT[+OPTIONS]] with names xkeyboard-config knows (see "
                    "localectl list-x11-keymap-layouts), e.g. de or fr+azerty")
    vchan = vchan_choice(args)
    from ..grants.select import choose

    if vchan == "xen" and choose(args.grants) == "sim":
        return (f"qubesshm {command}: a GUI daemon on real Xen cannot map the simulated "
                "grant layer's pages: use --grants xen with --vchan xen (or --vchan socket "
                "with the emulator)")
    if vchan == "socket" and args.domid == args.gui_domid:
        return (f"qubesshm {command}: this VM's domain id and the GUI daemon's are both "
                f"{args.domid}: give the VM's with --domid (or $VCHAN_DOMAIN), e.g. "
                "--domid 1")
    if vchan == "xen" and args.vchan_dir is not None:
        return f"qubesshm {command}: --vchan-dir is for the socket vchan (--vchan socket)"
    return common.check_grants(args, command)


def main(args: argparse.Namespace) -> int:
    from ..agent.main import run_agent

    return run_agent(args)
