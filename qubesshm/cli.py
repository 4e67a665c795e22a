"""Command line: ``qubesshm COMMAND``, dispatched to the command modules of
``qubesshm.commands`` (one a command: serve, run, tune, stats, bench, ...).

Parse; usage mistakes are one line and exit status 2 (with the command's usage when
argparse finds them); then the command's work, whose user errors are one line each.
"""

from __future__ import annotations

import argparse
import logging
import resource
import sys
import time
from collections.abc import Sequence

from . import __version__
from .commands import all_commands, by_name
from .commands.common import USER_ERRORS, UsageError, add_subcommand, env_flag
from .relay.trace import wayland_timestamp

__all__ = ["UsageError", "build_parser", "env_flag", "main"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="qubesshm",
        description="Wayland apps on a Qubes OS screen through Xen grant pages qubesshm "
        "owns: as a proxy in front of a Wayland compositor (serve, run), or as the VM's "
        "GUI agent sending windows to the Qubes GUI daemon (agent, run --agent).")
    parser.add_argument("-v", "--verbose", action="store_true", help="log connections")
    parser.add_argument("--version", action="version", version=f"qubesshm {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for command in all_commands():
        command.add_arguments(add_subcommand(sub, command.name, help=command.help))
    return parser


def _parse(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> argparse.Namespace:
    args, extras = parser.parse_known_args(argv)
    if extras:
        # The usage of the subcommand that was given the unknown arguments, not the top.
        _subparser(parser, args).error(f"unrecognized arguments: {' '.join(extras)}")
    try:
        args.debug = getattr(args, "debug", False) or env_flag("QUBESSHM_DEBUG")
    except UsageError as exc:
        _subparser(parser, args).error(str(exc))
    return args


def _subparser(parser: argparse.ArgumentParser,
               args: argparse.Namespace) -> argparse.ArgumentParser:
    """The parser of the subcommand given (each sets itself as a default), else the top."""
    found = getattr(args, "usage_parser", None)
    return found if isinstance(found, argparse.ArgumentParser) else parser


class _TimestampedFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return f"qubesshm: {wayland_timestamp(time.time_ns())} {record.getMessage()}"


def _raise_fd_limit() -> None:
    """Every relayed fd is open in the proxy for a moment, and each client costs two
    sockets: take the whole hard limit rather than the customary soft 1024."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = _parse(parser, argv)
    command = by_name(args.command)
    logging.basicConfig(
        level=logging.INFO if args.verbose or args.debug else logging.WARNING,
        format="qubesshm: %(message)s",
    )
    if args.debug:
        # Beside the protocol log, other lines carry its timestamps, and never start
        # with "[" as protocol lines do.
        for handler in logging.getLogger().handlers:
            handler.setFormatter(_TimestampedFormatter())
    _raise_fd_limit()
    try:
        try:
            mistake = command.check(args)
        except UsageError as exc:
            # Shown as argparse shows its own: the command's usage, then the line.
            _subparser(parser, args).error(str(exc))
        if mistake is not None:
            print(mistake, file=sys.stderr)
            return 2
        return command.main(args)
    except USER_ERRORS as exc:
        print(f"qubesshm: {exc}", file=sys.stderr)
        return 1
