"""The command registry and the dispatcher's contract with a command module: what a
new command (one module in ``qubesshm/commands``) gets from ``qubesshm.cli``."""

from __future__ import annotations

import argparse
import types
from collections.abc import Callable, Iterator

import pytest

from qubesshm import cli, commands
from qubesshm.commands import common


def test_every_module_but_the_helpers_is_a_command_in_help_order() -> None:
    names = [command.name for command in commands.all_commands()]
    assert [n for n in names if n in ("serve", "run", "tune", "stats", "bench")] == \
        ["serve", "run", "tune", "stats", "bench"]
    known = [n for n in names if n in commands.ORDER]
    others = [n for n in names if n not in commands.ORDER]
    # The known ones in ORDER's order, then any others by name.
    assert names == sorted(known, key=commands.ORDER.index) + sorted(others)
    assert commands.by_name("bench").module == "qubesshm.commands.bench"


def test_a_module_without_the_whole_api_is_named() -> None:
    module = types.ModuleType("qubesshm.commands.half")
    module.NAME = "half"  # type: ignore[attr-defined]
    module.HELP = "half a command"  # type: ignore[attr-defined]
    with pytest.raises(TypeError, match=r"qubesshm\.commands\.half .* does not define "
                       r"add_arguments, check, main"):
        commands.from_module(module)


def fake(name: str, check: Callable[[argparse.Namespace], str | None],
         main: Callable[[argparse.Namespace], int]) -> commands.Command:
    def add_arguments(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--level", type=int, default=0)

    return commands.Command(name=name, help=f"the {name} command", add_arguments=add_arguments,
                            check=check, main=main, module=f"tests.{name}")


@pytest.fixture
def registry(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[commands.Command]]:
    """The dispatcher sees the real commands and the fakes a test appends."""
    extra: list[commands.Command] = []
    real = commands.all_commands()

    def all_commands() -> tuple[commands.Command, ...]:
        return (*real, *extra)

    def by_name(name: str) -> commands.Command:
        return next(c for c in all_commands() if c.name == name)

    monkeypatch.setattr(cli, "all_commands", all_commands)
    monkeypatch.setattr(cli, "by_name", by_name)
    monkeypatch.delenv("QUBESSHM_DEBUG", raising=False)
    yield extra


def test_a_new_command_is_dispatched_with_its_options(
        registry: list[commands.Command], capsys: pytest.CaptureFixture[str]) -> None:
    seen: list[argparse.Namespace] = []

    def main(args: argparse.Namespace) -> int:
        seen.append(args)
        return int(args.level)

    registry.append(fake("echo", lambda args: None, main))
    assert cli.main(["echo", "--level", "7", "-v"]) == 7
    assert seen[0].command == "echo" and seen[0].verbose is True
    with pytest.raises(SystemExit) as exit_:
        cli.main(["--help"])
    assert exit_.value.code == 0
    assert "the echo command" in capsys.readouterr().out


def test_a_check_line_is_printed_as_it_is_with_status_2(
        registry: list[commands.Command], capsys: pytest.CaptureFixture[str]) -> None:
    ran: list[bool] = []

    def main(args: argparse.Namespace) -> int:
        ran.append(True)
        return 0

    registry.append(fake("picky", lambda args: "qubesshm picky: give --level 1", main))
    assert cli.main(["picky"]) == 2
    assert capsys.readouterr().err == "qubesshm picky: give --level 1\n"
    assert not ran


def test_a_usage_error_from_check_shows_the_commands_usage(
        registry: list[commands.Command], capsys: pytest.CaptureFixture[str]) -> None:
    def check(args: argparse.Namespace) -> str | None:
        raise common.UsageError("--level must be even")

    registry.append(fake("even", check, lambda args: 0))
    with pytest.raises(SystemExit) as exit_:
        cli.main(["even", "--level", "3"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: qubesshm even ")
    assert err.endswith("qubesshm even: error: --level must be even\n")


def test_a_command_error_is_one_line_with_status_1(
        registry: list[commands.Command], capsys: pytest.CaptureFixture[str]) -> None:
    def main(args: argparse.Namespace) -> int:
        raise common.CommandError("the daemon went away: start it again")

    registry.append(fake("failing", lambda args: None, main))
    assert cli.main(["failing"]) == 1
    assert capsys.readouterr().err == "qubesshm: the daemon went away: start it again\n"
