"""The command line of the contract: dbt's commands, where dbtvenv's options end, what dbt gets,
and every option from its DBTVENV_* variable (the command line winning).

The stand-in dbt echoes its argv, so what reaches dbt is checked word for word.
"""

from __future__ import annotations

import json
import os
import socket
import sys
from collections.abc import Iterator, Mapping
from datetime import datetime, timezone
from pathlib import Path

import click
import psutil
import pytest
from conftest import Result, RunDbtvenv, prepare_standin_env

# The contract's list, written out here so the CLI is checked against it, not against itself.
DBT_COMMANDS = [
    ["build"],
    ["run"],
    ["test"],
    ["seed"],
    ["snapshot"],
    ["ls"],
    ["list"],
    ["run-operation"],
    ["clone"],
    ["compile"],
    ["debug"],
    ["deps"],
    ["parse"],
    ["show"],
    ["retry"],
    ["clean"],
    ["docs", "generate"],
    ["docs", "serve"],
    ["source", "freshness"],
]

ENV_VARIABLES = [
    "DBTVENV_REQUIREMENTS",
    "DBTVENV_REQUIREMENTS_FILE",
    "DBTVENV_CONSTRAINTS",
    "DBTVENV_VENV_DIR",
    "DBTVENV_TEMPORARY",
    "DBTVENV_PIP_INSTALL_OPTIONS",
    "DBTVENV_PYTHON",
    "DBTVENV_SYSTEM_SITE_PACKAGES",
    "DBTVENV_LOCK_TIMEOUT",
    "DBTVENV_INSTALLER",
]

AWKWARD = [
    "--vars",
    '{"a": [1, "b c"]}',
    "",
    "two  spaces",
    "ünïcødé ✓ 数据",
    "--select",
    "x",
    "--venv-dir",
    "y",
    "--requirements",
    "z",
    "--pip-install-options=--index-url http://evil.invalid",
    "--temporary",
    "--",
    "--help",
    "-s",
    "$(touch pwned)",
    "; touch pwned",
    "'single'",
    '"double"',
    "back\\slash",
    "*",
    "line\nbreak",
    "tab\there",
]


@pytest.fixture(scope="module")
def built_cache(
    tmp_path_factory: pytest.TempPathFactory, wheelhouse: Path, _dbtvenv_pythonpath: str | None
) -> Path:
    """A cache dir holding the env for dbt-standin==1.0.0, built once for this module."""
    cache = tmp_path_factory.mktemp("cli") / "cache"
    prepare_standin_env(cache, wheelhouse, _dbtvenv_pythonpath)
    return cache


@pytest.fixture
def spec_env(built_cache: Path, standin_env: dict[str, str]) -> dict[str, str]:
    """The built env's spec, all from DBTVENV_* variables."""
    return {**standin_env, "DBTVENV_VENV_DIR": str(built_cache)}


def dbt_argv(result: Result) -> list[str]:
    assert result.returncode == 0, result
    argv: list[str] = result.json()["argv"]
    return argv


def assert_no_build(result: Result) -> None:
    assert "building" not in result.err, result


@pytest.mark.parametrize("words", DBT_COMMANDS, ids=" ".join)
def test_every_dbt_command_runs_dbt_with_it(
    dbtvenv: RunDbtvenv, spec_env: dict[str, str], words: list[str]
) -> None:
    result = dbtvenv(*words, "--select", "my_model", "--target", "prod", env=spec_env)
    assert dbt_argv(result) == [*words, "--select", "my_model", "--target", "prod"]
    assert_no_build(result)


def test_dbt_verbatim_after_double_dash(dbtvenv: RunDbtvenv, spec_env: dict[str, str]) -> None:
    args = ["--debug", "--log-format", "json", "run", "--select", "x", "--", "-y"]
    assert dbt_argv(dbtvenv("dbt", "--", *args, env=spec_env)) == args


def test_dbt_verbatim_without_double_dash(dbtvenv: RunDbtvenv, spec_env: dict[str, str]) -> None:
    result = dbtvenv("dbt", "--lock-timeout", "5", "future-command", "--flag", env=spec_env)
    assert dbt_argv(result) == ["future-command", "--flag"]


def test_dbt_verbatim_with_no_arguments(dbtvenv: RunDbtvenv, spec_env: dict[str, str]) -> None:
    assert dbt_argv(dbtvenv("dbt", env=spec_env)) == []


def test_first_foreign_token_ends_dbtvenv_options(
    dbtvenv: RunDbtvenv, built_cache: Path, pip_offline_options: str
) -> None:
    result = dbtvenv(
        "run",
        "--requirements",
        "dbt-standin==1.0.0",
        "--pip-install-options",
        pip_offline_options,
        "--venv-dir",
        built_cache,
        *AWKWARD,
    )
    assert dbt_argv(result) == ["run", *AWKWARD]
    assert_no_build(result)


def test_double_dash_ends_dbtvenv_options(
    dbtvenv: RunDbtvenv, built_cache: Path, standin_env: dict[str, str]
) -> None:
    result = dbtvenv(
        "test", "--venv-dir", built_cache, "--", "--venv-dir", "y", "--", *AWKWARD, env=standin_env
    )
    assert dbt_argv(result) == ["test", "--venv-dir", "y", "--", *AWKWARD]


def test_first_token_may_be_a_dbt_short_option(
    dbtvenv: RunDbtvenv, spec_env: dict[str, str]
) -> None:
    for short in ("-s", "-m", "-t", "-x", "-f", "-q", "-d", "-h", "-v"):
        result = dbtvenv("run", short, "x", env=spec_env)
        assert dbt_argv(result) == ["run", short, "x"]


def test_equals_form_of_every_value_option(
    dbtvenv: RunDbtvenv, built_cache: Path, pip_offline_options: str, tmp_path: Path
) -> None:
    requirements = tmp_path / "requirements.txt"
    requirements.write_text("dbt-standin==1.0.0\n")
    constraints = tmp_path / "constraints.txt"
    constraints.write_text("dbt-standin<3\n")
    spec = [
        "--requirements=dbt-standin==1.0.0",
        f"--pip-install-options={pip_offline_options}",
        f"--venv-dir={built_cache}",
        "--lock-timeout=30",
        "--installer=pip",
        f"--python={sys.executable}",
    ]
    path = dbtvenv("env", "path", *spec)
    assert path.returncode == 0, path
    result = dbtvenv("run", *spec, "--select=x")
    assert dbt_argv(result) == ["run", "--select=x"]
    assert json.loads(result.stdout)["prefix"] == path.out.strip()
    # files given with `=` are read too (a changed spec: only its path is asked for)
    with_files = dbtvenv(
        "env",
        "path",
        f"--venv-dir={built_cache}",
        f"--requirements-file={requirements}",
        f"--constraints={constraints}",
    )
    assert with_files.returncode == 0, with_files
    assert with_files.out != path.out


def test_run_help_is_dbtvenvs(dbtvenv: RunDbtvenv, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    for args in (["run", "--help"], ["run", "--venv-dir", str(cache), "--help"]):
        result = dbtvenv(*args, env={"DBTVENV_REQUIREMENTS": "dbt-standin==1.0.0"})
        assert result.returncode == 0, result
        assert result.out.startswith("Usage: dbtvenv run"), result
        assert "--requirements" in result.out and "--venv-dir" in result.out
        assert "-- --help" in result.out  # it says how to get dbt's
        for variable in ENV_VARIABLES:  # each option names its variable
            assert variable in result.out, variable
    assert not cache.exists()


def test_help_after_double_dash_or_dbt_args_is_dbts(
    dbtvenv: RunDbtvenv, spec_env: dict[str, str]
) -> None:
    assert dbt_argv(dbtvenv("run", "--", "--help", env=spec_env)) == ["run", "--help"]
    assert dbt_argv(dbtvenv("run", "-s", "x", "--help", env=spec_env)) == [
        "run",
        "-s",
        "x",
        "--help",
    ]
    assert dbt_argv(dbtvenv("docs", "generate", "--", "--help", env=spec_env)) == [
        "docs",
        "generate",
        "--help",
    ]


def test_group_help_and_version(dbtvenv: RunDbtvenv) -> None:
    top = dbtvenv("--help")
    assert top.returncode == 0, top
    for words in DBT_COMMANDS:
        assert f"\n  {words[0]} " in top.out, words
    version = dbtvenv("--version")
    assert version.returncode == 0 and version.out.startswith("dbtvenv "), version
    bare = dbtvenv()
    assert bare.returncode == 64, bare
    assert bare.stdout == b""
    assert "Usage: dbtvenv" in bare.err and "dbtvenv: error: missing command" in bare.err


def _all_commands(
    command: click.Command, ctx: click.Context
) -> Iterator[tuple[click.Command, click.Context]]:
    yield command, ctx
    if isinstance(command, click.Group):
        for name in command.list_commands(ctx):
            sub = command.get_command(ctx, name)
            assert sub is not None
            yield from _all_commands(sub, click.Context(sub, info_name=name, parent=ctx))


def test_no_short_options_anywhere() -> None:
    """A dbtvenv option like `-s` would swallow dbt's `-s my_model`."""
    from dbtvenv.cli import cli

    seen = 0
    for command, ctx in _all_commands(cli, click.Context(cli, info_name="dbtvenv")):
        for param in command.get_params(ctx):
            if isinstance(param, click.Option):
                for opt in (*param.opts, *param.secondary_opts):
                    assert opt.startswith("--"), f"{ctx.command_path}: short option {opt}"
                    seen += 1
    assert seen > 100  # every command was looked at, with its --help


def test_every_contract_command_is_registered() -> None:
    from dbtvenv.cli import cli

    ctx = click.Context(cli, info_name="dbtvenv")
    for words in DBT_COMMANDS:
        command: click.Command | None = cli
        for word in words:
            assert isinstance(command, click.Group)
            command = command.get_command(ctx, word)
        assert command is not None, words
    for group, subs in {
        "env": ["prepare", "path", "info", "list", "rm", "stop-warm", "gc"],
        "lock": ["status"],
    }.items():
        found = cli.get_command(ctx, group)
        assert isinstance(found, click.Group)
        assert sorted(found.list_commands(ctx)) == sorted(subs)


# ---- every option from its DBTVENV_* variable; the command line wins ----------------------


def env_path(dbtvenv: RunDbtvenv, *args: str | Path, env: Mapping[str, str] | None = None) -> str:
    result = dbtvenv("env", "path", *args, env=env)
    assert result.returncode == 0, result
    assert result.err == "", result
    return result.out.strip()


@pytest.fixture
def spec_files(tmp_path: Path) -> dict[str, Path]:
    files = {}
    for name, text in {
        "req-a": "dbt-standin==1.0.0\n",
        "req-b": "dbt-standin==2.0.0\n",
        "con-a": "dbt-standin<3\n",
        "con-b": "dbt-standin<2\n",
    }.items():
        files[name] = tmp_path / f"{name}.txt"
        files[name].write_text(text)
    return files


def option_cases(files: dict[str, Path], other: str) -> list[tuple[list[str], str, str, list[str]]]:
    """(option args, variable, variable value, option args that differ from the variable's)."""
    return [
        (
            ["--requirements", "dbt-standin==1.0.0", "--requirements", "no-dbt-here"],
            "DBTVENV_REQUIREMENTS",
            "dbt-standin==1.0.0 \n\t no-dbt-here",
            ["--requirements", "dbt-standin==2.0.0"],
        ),
        (
            ["--requirements-file", str(files["req-a"])],
            "DBTVENV_REQUIREMENTS_FILE",
            str(files["req-a"]),
            ["--requirements-file", str(files["req-b"])],
        ),
        (
            ["--constraints", str(files["con-a"])],
            "DBTVENV_CONSTRAINTS",
            str(files["con-a"]),
            ["--constraints", str(files["con-b"])],
        ),
        (
            ["--pip-install-options", "--no-deps --prefer-binary"],
            "DBTVENV_PIP_INSTALL_OPTIONS",
            "--no-deps --prefer-binary",
            ["--pip-install-options", "--no-deps"],
        ),
        (
            ["--system-site-packages"],
            "DBTVENV_SYSTEM_SITE_PACKAGES",
            "1",
            [],
        ),
        (
            ["--python", other],
            "DBTVENV_PYTHON",
            other,
            ["--python", sys.executable],
        ),
    ]


@pytest.fixture(scope="module")
def other_python() -> str | None:
    """An interpreter whose key differs from this one's (another version), if there is one."""
    from dbtvenv.errors import UsageError
    from dbtvenv.spec import find_interpreter

    mine = find_interpreter(None)
    for name in ("python3.12", "python3.13", "python3.11", "python3.10", "python3", "python"):
        for candidate in sorted({os.path.join(d, name) for d in os.get_exec_path()}):
            if not os.access(candidate, os.X_OK):
                continue
            try:
                found = find_interpreter(candidate)
            except UsageError:
                continue  # e.g. a version manager's shim for a version it does not enable
            if found.version != mine.version:
                return candidate
    return None


@pytest.mark.parametrize("index", range(6))
def test_option_from_its_variable(
    dbtvenv: RunDbtvenv,
    tmp_path: Path,
    spec_files: dict[str, Path],
    other_python: str | None,
    index: int,
) -> None:
    cases = option_cases(spec_files, other_python or "")
    option, variable, value, other = cases[index]
    if variable == "DBTVENV_PYTHON" and other_python is None:
        pytest.skip("no second Python of another version on PATH")
    base = ["--venv-dir", str(tmp_path / "cache")]
    if variable != "DBTVENV_REQUIREMENTS":
        base += ["--requirements", "dbt-standin==1.0.0"]
    from_option = env_path(dbtvenv, *base, *option)
    from_variable = env_path(dbtvenv, *base, env={variable: value})
    assert from_variable == from_option
    # the variable changes the key: it was read, not ignored
    if variable != "DBTVENV_REQUIREMENTS":
        assert env_path(dbtvenv, *base) != from_variable
    if other:  # the command line beats the variable
        assert env_path(dbtvenv, *base, *other, env={variable: value}) == env_path(
            dbtvenv, *base, *other
        )
    else:  # a flag: an explicit "0" turns it off
        assert env_path(dbtvenv, *base, env={variable: "0"}) == env_path(dbtvenv, *base)


def test_venv_dir_from_its_variable(dbtvenv: RunDbtvenv, tmp_path: Path) -> None:
    spec = ["--requirements", "dbt-standin==1.0.0"]
    a, b = tmp_path / "a", tmp_path / "b"
    key = Path(env_path(dbtvenv, *spec, "--venv-dir", a)).name
    assert env_path(dbtvenv, *spec, env={"DBTVENV_VENV_DIR": str(a)}) == str(a / key)
    assert env_path(dbtvenv, *spec, "--venv-dir", b, env={"DBTVENV_VENV_DIR": str(a)}) == str(
        b / key
    )
    assert not a.exists() and not b.exists()  # env path creates nothing


def test_command_line_requirements_replace_the_variable(
    dbtvenv: RunDbtvenv, tmp_path: Path
) -> None:
    cache = ["--venv-dir", str(tmp_path)]
    only_two = env_path(dbtvenv, *cache, "--requirements", "dbt-standin==2.0.0")
    both = env_path(
        dbtvenv,
        *cache,
        "--requirements",
        "dbt-standin==2.0.0",
        env={"DBTVENV_REQUIREMENTS": "no-dbt-here"},
    )
    assert both == only_two


def test_temporary_from_its_variable_and_flag(
    dbtvenv: RunDbtvenv, spec_env: dict[str, str], built_cache: Path, tmp_path: Path
) -> None:
    tmpdir = tmp_path / "t"
    tmpdir.mkdir()
    before = sorted(p.name for p in built_cache.iterdir())
    for args, extra in (
        ([], {"DBTVENV_TEMPORARY": "1"}),
        (["--temporary"], {}),
        (["--temporary"], {"DBTVENV_TEMPORARY": "0"}),
    ):
        result = dbtvenv("run", *args, env={**spec_env, **extra, "TMPDIR": str(tmpdir)})
        assert result.returncode == 0, result
        prefix = Path(result.json()["prefix"])
        assert prefix.parent.parent == tmpdir, result
        assert prefix.parent.name.startswith("dbtvenv-")
        assert list(tmpdir.iterdir()) == []  # removed on exit
    assert sorted(p.name for p in built_cache.iterdir()) == before
    # "0" is off: the persistent env again
    result = dbtvenv("run", env={**spec_env, "DBTVENV_TEMPORARY": "0"})
    assert Path(result.json()["prefix"]).parent == built_cache


def _plant_live_lock(lock: Path) -> None:
    """A lock held by this very test process: alive, so never stale."""
    me = psutil.Process()
    lock.parent.mkdir(parents=True, exist_ok=True)
    lock.write_text(
        json.dumps(
            {
                "pid": me.pid,
                "create_time": me.create_time(),
                "hostname": socket.gethostname(),
                "acquired_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                "argv": ["dbtvenv", "env", "prepare", "--held-by-the-test"],
            }
        )
    )


def test_lock_timeout_from_its_variable(
    dbtvenv: RunDbtvenv, tmp_path: Path, standin_env: dict[str, str]
) -> None:
    cache = tmp_path / "cache"
    spec = {**standin_env, "DBTVENV_REQUIREMENTS": "dbt-standin==2.0.0"}
    key_dir = Path(env_path(dbtvenv, "--venv-dir", cache, env=spec))
    _plant_live_lock(cache / f"{key_dir.name}.lock")
    result = dbtvenv(
        "env", "prepare", "--venv-dir", cache, env={**spec, "DBTVENV_LOCK_TIMEOUT": "0"}
    )
    assert result.returncode == 75, result
    assert f"pid {os.getpid()}" in result.err and "--held-by-the-test" in result.err
    # the command line beats the variable, even a malformed one
    result = dbtvenv(
        "env",
        "prepare",
        "--venv-dir",
        cache,
        "--lock-timeout",
        "0",
        env={**spec, "DBTVENV_LOCK_TIMEOUT": "not-a-number"},
    )
    assert result.returncode == 75, result
    assert not key_dir.exists()


def test_installer_from_its_variable(dbtvenv: RunDbtvenv, spec_env: dict[str, str]) -> None:
    bad = dbtvenv("run", env={**spec_env, "DBTVENV_INSTALLER": "conda"})
    assert bad.returncode == 64 and "DBTVENV_INSTALLER" in bad.err, bad
    good = dbtvenv("run", "--installer", "pip", env={**spec_env, "DBTVENV_INSTALLER": "conda"})
    assert dbt_argv(good) == ["run"]


def test_python_from_its_variable_and_option(dbtvenv: RunDbtvenv, spec_env: dict[str, str]) -> None:
    bad = dbtvenv("run", env={**spec_env, "DBTVENV_PYTHON": "/bin/true"})
    assert bad.returncode == 64 and "/bin/true" in bad.err, bad
    good = dbtvenv(
        "run", "--python", sys.executable, env={**spec_env, "DBTVENV_PYTHON": "/bin/true"}
    )
    assert dbt_argv(good) == ["run"]
