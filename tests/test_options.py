"""The Click-free reading of a dbt command line (`options.parse_dbt_invocation`, the warm
path's) against Click's own reading of the same line and environment: wherever the fast path
answers, Click would have called the core with exactly the same options and dbt arguments."""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from pathlib import Path

import click
import pytest
from conftest import RunDbtvenv

from dbtvenv import cli, commands, options

Parsed = tuple[commands.EnvOptions, list[str]]

COMMANDS = [
    ["run"],
    ["build"],
    ["run-operation"],
    ["docs", "generate"],
    ["source", "freshness"],
    ["dbt"],
    ["docs"],
    ["docs", "nope"],
    ["nope"],
    [],
]
OWN = [
    ["--requirements", "dbt-standin==1.0.0"],
    ["--requirements", "dbt-core>=1.8,<2"],
    ["--requirements", ""],
    ["--requirements", "--select"],
    ["--requirements=dbt-duckdb~=1.11.0"],
    ["--requirements-file", "r.txt"],
    ["--requirements-file=r 2.txt"],
    ["--constraints", "c.txt"],
    ["--venv-dir", "/cache"],
    ["--venv-dir=/other"],
    ["--venv-dir="],
    ["--temporary"],
    ["--temporary=1"],
    ["--system-site-packages"],
    ["--pip-install-options", "--no-index --find-links /wheels"],
    ["--pip-install-options=--pre"],
    ["--python", "python3"],
    ["--lock-timeout", "5"],
    ["--lock-timeout", "0"],
    ["--lock-timeout", "1e3"],
    ["--lock-timeout", " 7 "],
    ["--lock-timeout", "-1"],
    ["--lock-timeout", "abc"],
    ["--lock-timeout", "nan"],
    ["--lock-timeout", "inf"],
    ["--lock-timeout=2.5"],
    ["--installer", "uv"],
    ["--installer", "pip"],
    ["--installer", "UV"],
    ["--installer=conda"],
    ["--help"],
]
DBT = [
    ["--select", "orders customers"],
    ["-s", "orders"],
    ["--vars", '{"day": "2026-11-24"}'],
    ["--", "--help"],
    ["--"],
    ["--requirements", "x"],
    ["--full-refresh"],
    ["ünïcode"],
]
ENVIRONMENT = {
    "DBTVENV_REQUIREMENTS": ["dbt-a dbt-b", "dbt-core>=1.8,<2", "", "  ", "dbt-c\n\tdbt-d"],
    "DBTVENV_REQUIREMENTS_FILE": ["a.txt b.txt", ""],
    "DBTVENV_CONSTRAINTS": ["c.txt", ""],
    "DBTVENV_VENV_DIR": ["/env-cache", ""],
    "DBTVENV_TEMPORARY": ["1", "0", "yes", " TRUE ", "off", "", "foo", "2"],
    "DBTVENV_SYSTEM_SITE_PACKAGES": ["1", "no", "maybe"],
    "DBTVENV_PIP_INSTALL_OPTIONS": ["--pre", ""],
    "DBTVENV_PYTHON": ["python3", ""],
    "DBTVENV_LOCK_TIMEOUT": ["10", "-5", "x", "", "0.5"],
    "DBTVENV_INSTALLER": ["uv", "pip", "", "UV"],
}


def click_parse(
    args: Sequence[str], environ: Mapping[str, str], monkeypatch: pytest.MonkeyPatch
) -> Parsed | None:
    """What Click hands the core for this command line, or None where it refuses it."""
    calls: list[Parsed] = []

    def run_dbt(env_options: commands.EnvOptions, dbt_args: Sequence[str]) -> int:
        calls.append((env_options, list(dbt_args)))
        return 0

    with monkeypatch.context() as patch:
        patch.setattr(commands, "run_dbt", run_dbt)
        for option in options.ENV_OPTIONS:
            patch.delenv(option.envvar, raising=False)
        for name, value in environ.items():
            patch.setenv(name, value)
        try:
            cli.cli.main(args=list(args), prog_name="dbtvenv", standalone_mode=False)
        except (click.ClickException, click.exceptions.Exit):
            return None
    return calls[0] if calls else None


def fast_parse(args: Sequence[str], environ: Mapping[str, str]) -> Parsed | None:
    parsed = options.parse_dbt_invocation(args, environ)
    if parsed is None:
        return None
    params, dbt_args = parsed
    return commands.EnvOptions(**params), dbt_args  # type: ignore[arg-type]


def test_the_fast_path_reads_every_line_as_click_does(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    rng = random.Random(20261201)
    answered = refused_by_both = left_to_click = 0
    for _ in range(3000):
        args = [*rng.choice(COMMANDS)]
        for _ in range(rng.randint(0, 4)):
            args += rng.choice(OWN)
        for _ in range(rng.randint(0, 2)):
            args += rng.choice(DBT)
        environ = {
            name: rng.choice(values) for name, values in ENVIRONMENT.items() if rng.random() < 0.3
        }
        fast = fast_parse(args, environ)
        slow = click_parse(args, environ, monkeypatch)
        if fast is not None:
            answered += 1
            assert fast == slow, (args, environ)
        elif slow is None:
            refused_by_both += 1
        else:
            left_to_click += 1
    # Most lines here hold a mistake (Click refuses them); of the rest, the fast path answers
    # nearly all.
    assert refused_by_both > 1000, refused_by_both
    assert answered > 500, answered
    assert left_to_click < answered / 10, (left_to_click, answered)


@pytest.mark.parametrize(
    "args",
    [
        ["run", "--venv-dir", "/c", "--requirements", "dbt-duckdb~=1.11.0", "--select", "a"],
        ["build"],
        ["docs", "generate", "--", "--no-compile"],
        ["dbt", "--", "--debug", "run"],
        ["test", "--pip-install-options", "--index-url https://u:t@h/simple", "-s", "x"],
    ],
)
def test_plain_dbt_command_lines_take_the_fast_path(args: list[str]) -> None:
    assert options.parse_dbt_invocation(args, {"DBTVENV_VENV_DIR": "/c"}) is not None


@pytest.mark.parametrize(
    "args",
    [
        ["--version"],
        ["env", "list"],
        ["run", "--help"],
        ["run", "--lock-timeout", "soon"],
        ["run", "--venv-dir"],
        ["docs"],
        ["docs", "build"],
    ],
)
def test_other_lines_are_left_to_click(args: list[str]) -> None:
    assert options.parse_dbt_invocation(args, {}) is None


def test_a_bad_variable_is_left_to_click_which_names_it() -> None:
    assert options.parse_dbt_invocation(["run"], {"DBTVENV_LOCK_TIMEOUT": "soon"}) is None
    assert options.parse_dbt_invocation(["run"], {"DBTVENV_TEMPORARY": "maybe"}) is None


def test_a_shell_asking_for_completions_is_left_to_click() -> None:
    assert options.parse_dbt_invocation(["run"], {"_DBTVENV_COMPLETE": "bash_complete"}) is None


def test_an_empty_completion_variable_changes_nothing(dbtvenv: RunDbtvenv, tmp_path: Path) -> None:
    """Click answers completions only when the variable is set to something."""
    for env in ({}, {"_DBTVENV_COMPLETE": ""}):
        usage = dbtvenv("run", "--lock-timeout", "soon", env=env)
        assert usage.returncode == 64, usage
        assert usage.err.startswith("dbtvenv: error:"), usage
        missing = dbtvenv("env", "rm", "--venv-dir", tmp_path, "0123456789abcdef", env=env)
        assert missing.returncode == 1, missing
