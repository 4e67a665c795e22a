"""``qubesshm guid-emulator``: the Qubes GUI daemon's side on one machine, on X11."""

from __future__ import annotations

import argparse

from ..emulator import cli

NAME = "guid-emulator"
HELP = ("be the Qubes GUI daemon for an agent on this machine: its windows on $DISPLAY "
        "(for tests, demos, previews)")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    cli.add_arguments(parser)


def check(args: argparse.Namespace) -> str | None:
    return None


def main(args: argparse.Namespace) -> int:
    return cli.main(args)
