"""The subcommands of ``qubesshm``: one module each in this package, found here.

Every module of this package but the helpers (``HELPERS``) is a command, and defines:

- ``NAME: str``: the subcommand as typed (``"guid-emulator"`` lives in ``guid_emulator.py``);
- ``HELP: str``: its line in ``qubesshm --help``;
- ``add_arguments(parser: argparse.ArgumentParser) -> None``: its options; the shared
  groups are ``common.add_*``. ``-v`` and ``--help`` are there already;
- ``check(args: argparse.Namespace) -> str | None``: usage mistakes found before any work
  starts. A line returned is printed as it is (name the command: ``"qubesshm agent: ..."``)
  and the exit status is 2; ``common.UsageError`` raised instead is shown with the
  command's usage, as argparse shows its own mistakes;
- ``main(args: argparse.Namespace) -> int``: the work, and its exit status.
  ``common.USER_ERRORS`` raised from ``check`` or ``main`` (``common.CommandError`` for
  a command's own) are one line, ``qubesshm: ...``, and exit status 1.

Adding a command is adding its module: nothing here changes. ``ORDER`` places the known
ones in ``qubesshm --help``; any other comes after them, by name. A command module
imports at its top only what ``add_arguments`` needs, and its work inside ``main``:
every command's module is imported whichever one runs.
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from types import ModuleType

# Where each command stands in ``qubesshm --help`` (those not yet written are skipped).
ORDER = ("serve", "run", "agent", "guid-emulator", "tune", "stats", "bench")
# Modules of this package that are not commands.
HELPERS = frozenset({"common", "proxy"})


@dataclass(frozen=True, slots=True)
class Command:
    """One subcommand, as its module defines it."""

    name: str
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    check: Callable[[argparse.Namespace], str | None]
    main: Callable[[argparse.Namespace], int]
    module: str


def from_module(module: ModuleType) -> Command:
    """The command ``module`` defines; TypeError naming what it lacks."""
    missing = [attr for attr in ("NAME", "HELP", "add_arguments", "check", "main")
               if not hasattr(module, attr)]
    if missing:
        raise TypeError(f"{module.__name__} is in qubesshm/commands but does not define "
                        f"{', '.join(missing)}: a command module defines NAME, HELP, "
                        "add_arguments, check and main (a helper module is named in "
                        "qubesshm.commands.HELPERS)")
    name, help_line = module.NAME, module.HELP
    if not (isinstance(name, str) and name and isinstance(help_line, str)):
        raise TypeError(f"{module.__name__}: NAME must be a non-empty str and HELP a str")
    return Command(name=name, help=help_line, add_arguments=module.add_arguments,
                   check=module.check, main=module.main, module=module.__name__)


def _place(command: Command) -> tuple[int, str]:
    known = ORDER.index(command.name) if command.name in ORDER else len(ORDER)
    return known, command.name


@cache
def all_commands() -> tuple[Command, ...]:
    """Every command of this package, in ``--help`` order."""
    found: dict[str, Command] = {}
    for info in pkgutil.iter_modules(__path__):
        if info.name in HELPERS or info.name.startswith("_"):
            continue
        command = from_module(importlib.import_module(f"{__name__}.{info.name}"))
        if command.name in found:
            raise TypeError(f"{command.module} and {found[command.name].module} both define "
                            f"the command {command.name!r}")
        found[command.name] = command
    return tuple(sorted(found.values(), key=_place))


def by_name(name: str) -> Command:
    """The command called ``name`` (KeyError if none is)."""
    for command in all_commands():
        if command.name == name:
            return command
    raise KeyError(name)
