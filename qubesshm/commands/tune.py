"""``qubesshm tune``: show or set a kernel's grant reclaim parameters (``qubesshm.tune``)."""

from __future__ import annotations

import argparse

from .. import options
from ..tune import run_tune
from . import common

NAME = "tune"
HELP = "show or set the kernel's grant reclaim parameters"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    common.add_grants_option(parser)
    parser.add_argument("--socket", metavar="NAME",
                        help="simulated grants: the kernel of the proxy serving this socket "
                        "(needed when several run)")
    parser.add_argument("--free-per-iteration", type=options.u32, metavar="N",
                        help="deferred grants retried per 1-second tick (0: all)")
    parser.add_argument("--gntalloc-limit", type=options.gntalloc_limit, metavar="N",
                        help="pages gntalloc may have granted at once")


def check(args: argparse.Namespace) -> str | None:
    return None


def main(args: argparse.Namespace) -> int:
    return run_tune(args)
