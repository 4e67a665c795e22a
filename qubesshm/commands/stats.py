"""``qubesshm stats``: a running proxy's counters, as a table or JSON."""

from __future__ import annotations

import argparse
import json
import sys

from ..relay.control import StatsError, format_table, read_stats
from ..relay.listener import DEFAULT_SOCKET_NAME, AddressError

NAME = "stats"
HELP = "show a running proxy's counters"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--socket", default=DEFAULT_SOCKET_NAME, metavar="NAME",
                        help="the proxy's socket name or path (default %(default)s)")
    parser.add_argument("--json", action="store_true", help="print JSON")


def check(args: argparse.Namespace) -> str | None:
    return None


def main(args: argparse.Namespace) -> int:
    try:
        stats = read_stats(args.socket)
    except (StatsError, AddressError) as exc:
        print(f"qubesshm stats: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(stats, indent=2) if args.json else format_table(stats))
    return 0
