"""The options of ``qubesshm guid-emulator`` and its entry point for the command line.

``add_arguments(parser)`` declares them on any parser (the ``qubesshm`` command's
subparser, or ``python3 -m qubesshm.emulator.main``'s own); ``main(args)`` runs the
emulator and returns its exit status.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from qubesshm.guiproto import messages as gm
from qubesshm.options import non_negative_seconds, whole

DOMID_LIMIT = 0x7FEF  # the last Xen domain id that names a domain


def domid(text: str) -> int:
    return whole(text, 0, DOMID_LIMIT, "a domain id")


def protocol_version(text: str) -> int:
    """``1.3`` .. ``1.8``: the most the emulated daemon agrees to."""
    match = re.fullmatch(r"1\.([0-9])", text.strip())
    if match is None or not 3 <= int(match[1]) <= gm.VERSION & 0xFFFF:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a protocol version the emulator speaks: give 1.3 to "
            f"{gm.version_text(gm.VERSION)} (1.3 is one today's agents must refuse)")
    return gm.make_version(1, int(match[1]))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--domid", type=domid, required=True,
        help="the agent's domain id, as qubes-guid -d: connect to "
             "$VCHAN_SOCKET_DIR/vchan.DOMID.<own domid>.6000.sock (own domid: "
             "$VCHAN_DOMAIN, default 0) and map its grants as the GUI domain")
    parser.add_argument(
        "--hold", type=non_negative_seconds, default=0.0, metavar="S",
        help="keep each dump the daemon lets go of mapped S seconds longer (a slow daemon; "
             "default 0)")
    parser.add_argument(
        "--ack-delay", type=non_negative_seconds, default=0.0, metavar="S",
        help="write each WINDOW_DUMP_ACK S seconds late, and what follows it in order "
             "(default 0)")
    parser.add_argument(
        "--version", type=protocol_version, default=gm.VERSION, metavar="1.N",
        help="the daemon's protocol version, 1.3 to 1.8 (default 1.8): 1.4 has no DESTROY "
             "echo, below 1.7 no ACKs, 1.3 sends no version (an agent must refuse it)")
    parser.add_argument(
        "--display", default=None,
        help="the X display to show the windows on (default $DISPLAY)")
    parser.add_argument(
        "--name", default=None,
        help="the VM's name, as qubes-guid -N (prefixes WM_CLASS; default vmDOMID)")
    parser.add_argument(
        "--no-shm", action="store_true",
        help="put dumps with PutImage from the emulator's own mapping, even where the X "
             "server offers MIT-SHM")
    parser.add_argument(
        "--clipboard-dir", type=Path, default=None, metavar="DIR",
        help="the global clipboard's directory: qubes-guid's qubes-clipboard.bin (with "
             ".source, .xevent, .metadata) kept there, filled by Ctrl+Shift+C in a VM window "
             "and pasted by Ctrl+Shift+V; made (mode 0700) if missing, refused unless yours "
             "and private (default $XDG_RUNTIME_DIR/qubesshm-clipboard)")
    parser.add_argument(
        "--on-verify", choices=("exit", "ignore"), default="exit",
        help="what a message failing one of qubes-guid's 'Verify' checks does (qubes-guid "
             "asks the user whether to kill the VM): exit 1 (default), or drop the message "
             "and go on")


def main(args: argparse.Namespace) -> int:
    from qubesshm.emulator.main import run

    return run(args)
