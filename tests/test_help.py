"""Help texts: every command has help with an example, every option says what it does, and
the top-level help reads like a manual page's summary."""

from __future__ import annotations

from collections.abc import Iterator

import click
import pytest
from conftest import RunDbtvenv

from dbtvenv.cli import DBT_COMMANDS, DBT_SUBCOMMANDS, cli

WIDTH = 80


def walk(
    command: click.Command,
    path: tuple[str, ...] = ("dbtvenv",),
    parent: click.Context | None = None,
) -> Iterator[tuple[tuple[str, ...], click.Command, click.Context]]:
    ctx = click.Context(command, info_name=path[-1], parent=parent, terminal_width=WIDTH)
    yield path, command, ctx
    if isinstance(command, click.Group):
        for name in command.list_commands(ctx):
            sub = command.get_command(ctx, name)
            assert sub is not None
            yield from walk(sub, (*path, name), ctx)


COMMANDS = list(walk(cli))


def ids(entry: tuple[tuple[str, ...], click.Command, click.Context]) -> str:
    return " ".join(entry[0])


def test_the_tree_holds_every_command() -> None:
    paths = {" ".join(path[1:]) for path, _, _ in COMMANDS}
    expected = {
        *DBT_COMMANDS,
        *(f"{group} {sub}" for group, subs in DBT_SUBCOMMANDS.items() for sub in subs),
        *("env " + name for name in ("prepare", "path", "info", "list", "rm", "gc")),
        "dbt",
        "lock status",
        "completion",
    }
    assert expected <= paths


@pytest.mark.parametrize("entry", COMMANDS, ids=ids)
def test_each_command_has_help_with_an_example(
    entry: tuple[tuple[str, ...], click.Command, click.Context],
) -> None:
    path, command, ctx = entry
    assert command.help and command.help.strip(), f"{' '.join(path)} has no help"
    assert "Example" in command.help, f"{' '.join(path)}: its help shows no example"
    if len(path) > 1:
        short = command.get_short_help_str(limit=45)
        assert short and not short.endswith("..."), f"{short!r}: too long for a completion menu"
    text = command.get_help(ctx)
    too_wide = [line for line in text.splitlines() if len(line) > WIDTH]
    assert not too_wide, f"help of {' '.join(path)} is wider than {WIDTH} columns"


@pytest.mark.parametrize("entry", COMMANDS, ids=ids)
def test_each_option_has_help(
    entry: tuple[tuple[str, ...], click.Command, click.Context],
) -> None:
    path, command, ctx = entry
    for param in command.get_params(ctx):
        if isinstance(param, click.Option):
            assert param.help and len(param.help) > 10, f"{' '.join(path)} {param.opts[0]}"


def test_top_level_help_reads_like_a_manual_page(dbtvenv: RunDbtvenv) -> None:
    result = dbtvenv("--help")
    assert result.returncode == 0 and result.stderr == b"", result
    text = result.out
    sections = [
        "Usage: dbtvenv",
        "Synopsis:",
        "Examples:",
        "dbtvenv commands:",
        "dbt commands:",
        "Environment:",
        "Exit status:",
    ]
    positions = [text.index(section) for section in sections]
    assert positions == sorted(positions), "sections in man page order"
    for form in (
        "dbtvenv DBT_COMMAND [ENV OPTIONS] [--] [DBT ARGS]...",
        "dbtvenv dbt [ENV OPTIONS] [--] DBT ARGS...",
        "dbtvenv env prepare|path|info|list|rm|stop-warm|gc",
        "dbtvenv lock status [ENV OPTIONS]",
        "dbtvenv completion bash|zsh|fish",
    ):
        assert form in text
    exit_status = text[text.index("Exit status:") :]
    for status in ("dbt's own", "128+N", "64", "69", "73", "75"):
        assert f"\n    {status} " in exit_status, status
    for variable in (
        "DBTVENV_KILL_GRACE",
        "DBTVENV_LOCK_LEASE",
        "DBTVENV_TRUSTED_OWNERS",
        "NO_COLOR",
        "DBTVENV_DEBUG",
    ):
        assert variable in text
    commands = text[text.index("dbt commands:") : text.index("Environment:")]
    for name in [*DBT_COMMANDS, *DBT_SUBCOMMANDS]:
        assert f"\n  {name} " in commands, name


@pytest.mark.parametrize("words", [["run"], ["docs", "generate"], ["source", "freshness"]])
def test_dbt_command_help_says_how_to_reach_dbts_own_help(
    dbtvenv: RunDbtvenv, words: list[str]
) -> None:
    result = dbtvenv(*words, "--help")
    assert result.returncode == 0, result
    shown = " ".join(words)
    assert result.out.startswith(f"Usage: dbtvenv {shown} [ENV OPTIONS] [--] [DBT ARGS]...")
    assert f"dbt's own help for this command:\n    dbtvenv {shown} [ENV OPTIONS] -- --help" in (
        result.out
    )


def test_dbts_own_help_is_reached_after_a_double_dash(
    dbtvenv: RunDbtvenv, standin_env: dict[str, str], tmp_path: str
) -> None:
    result = dbtvenv("run", "--", "--help", env={**standin_env, "TMPDIR": str(tmp_path)})
    assert result.returncode == 0, result
    assert result.json()["argv"] == ["run", "--help"], "dbt got --help"
