"""The command line: Click parsing only. Everything else lives in `commands` and below.

dbtvenv's own options come first; the first token that is not one of them, or a literal `--`,
ends them, and everything from there goes to dbt unchanged.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import click
from click.core import ParameterSource

from dbtvenv import __version__
from dbtvenv.errors import EX_USAGE, UsageError
from dbtvenv.options import (
    CHOICE,
    COMPLETE_VAR,
    DBT_COMMANDS,
    DBT_SUBCOMMANDS,
    ENV_OPTIONS,
    FLAG,
    MAX_LOCK_TIMEOUT,
    MULTIPLE,
    SECONDS,
    parse_seconds,
    split_own_options,
)
from dbtvenv.redact import redact


class _LazyModule:
    """A module imported on first use, so `--help` and `--version` never load the core."""

    def __init__(self, name: str) -> None:
        self._name = name

    def __getattr__(self, attr: str) -> Any:
        __import__(self._name)  # the import statement's path: `-X importtime` sees it
        return getattr(sys.modules[self._name], attr)


if TYPE_CHECKING:
    from dbtvenv import commands
    from dbtvenv import shim as shim_module
else:
    commands = _LazyModule("dbtvenv.commands")
    shim_module = _LazyModule("dbtvenv.shim")


if TYPE_CHECKING:
    _FloatParamType = click.ParamType[float]  # generic in newer Click only
else:
    _FloatParamType = click.ParamType


class Seconds(_FloatParamType):
    """A number of seconds from 0 to MAX_LOCK_TIMEOUT."""

    name = "seconds"

    def convert(
        self, value: Any, param: click.Parameter | None, ctx: click.Context | None
    ) -> float:
        seconds = parse_seconds(value)
        if seconds is None:
            self.fail(
                f"{value!r} is not a number of seconds from 0 to {MAX_LOCK_TIMEOUT:g}, such as 300",
                param,
                ctx,
            )
        return seconds


SECONDS_TYPE = Seconds()


def env_options(func: Callable[..., Any]) -> Callable[..., Any]:
    """The ENV OPTIONS of the contract (`options.ENV_OPTIONS`), each also from its variable."""
    for option in reversed(ENV_OPTIONS):
        settings: dict[str, Any] = {
            "envvar": option.envvar,
            "show_envvar": True,
            "help": option.help,
        }
        if option.kind == FLAG:
            settings["is_flag"] = True
        else:
            settings["metavar"] = option.metavar or None
            settings["default"] = option.default
        if option.kind == MULTIPLE:
            settings["multiple"] = True
            settings["default"] = None
        elif option.kind == SECONDS:
            settings.update(type=SECONDS_TYPE, show_default=True)
        elif option.kind == CHOICE:
            settings.update(type=click.Choice(option.choices), show_default=True)
        if option.completes:
            settings["shell_complete"] = _COMPLETERS[option.completes]
        func = click.option(option.flag, option.dest, **settings)(func)
    return func


def _env_options(params: dict[str, Any]) -> commands.EnvOptions:
    return commands.EnvOptions(**{option.dest: params.pop(option.dest) for option in ENV_OPTIONS})


class PassThroughCommand(click.Command):
    """A dbt command: dbtvenv's options first, then dbt's arguments, untouched."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        own, dbt_args = split_own_options(args)
        ctx.meta["dbtvenv.dbt_args"] = dbt_args
        return super().parse_args(ctx, own)

    def collect_usage_pieces(self, ctx: click.Context) -> list[str]:
        return ["[ENV OPTIONS]", "[--]", "[DBT ARGS]..."]


def _dbt_args() -> list[str]:
    args: list[str] = click.get_current_context().meta["dbtvenv.dbt_args"]
    return args


class DbtCommandGroup(click.Group):
    """A group of dbt commands; an unknown one is pointed at `dbtvenv dbt -- ...`."""

    dbt_prefix: tuple[str, ...] = ()

    def resolve_command(
        self, ctx: click.Context, args: list[str]
    ) -> tuple[str | None, click.Command | None, list[str]]:
        name = args[0] if args else ""
        unknown = name and not name.startswith("-") and self.get_command(ctx, name) is None
        if unknown and not ctx.resilient_parsing:  # (shell completion parses resiliently)
            words = " ".join([*self.dbt_prefix, name])
            raise click.UsageError(
                f"no such command {name!r}; to run a dbt command dbtvenv does not list, "
                f"use 'dbtvenv dbt [ENV OPTIONS] -- {words} ...'",
                ctx,
            )
        return super().resolve_command(ctx, args)


class SectionedGroup(DbtCommandGroup):
    """Lists dbt's commands apart from dbtvenv's own in --help."""

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        own = {"dbt", "env", "lock", "shim", "completion"}
        sections: dict[str, list[tuple[str, str]]] = {"dbtvenv commands": [], "dbt commands": []}
        for name in self.list_commands(ctx):
            command = self.get_command(ctx, name)
            if command is None or command.hidden:
                continue
            section = "dbtvenv commands" if name in own else "dbt commands"
            sections[section].append((name, command.get_short_help_str(limit=60)))
        for title, rows in sections.items():
            with formatter.section(title):
                formatter.write_dl(rows)

    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(self.commands)


class OrderedGroup(click.Group):
    """Lists and completes its commands in the order they are defined."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(self.commands)


TOP_EPILOG = """\b
Environment:
  DBTVENV_*               each ENV OPTION has one, e.g. DBTVENV_VENV_DIR
  DBTVENV_KILL_GRACE      seconds dbt gets to stop after a signal (30, 0-3600)
  DBTVENV_LOCK_LEASE      seconds a remote lock lives unrenewed (60, 1-3600)
  DBTVENV_WARM_IDLE       seconds a warm process waits for a request (600)
  DBTVENV_TRUSTED_OWNERS  users whose envs to use besides your own and root's
  NO_COLOR                no colours on a terminal
  DBTVENV_DEBUG=1         show tracebacks of internal errors, and warm or not

\b
Exit status:
  dbt's own  dbt ran: 0 success, 1 a node failed, 2 dbt error, ...
  128+N      ended by signal N (130 SIGINT, 143 SIGTERM)
  1          env info, env rm: no such env, or it is in use
  64         usage error
  69         the env could not be built (pip failed, no dbt in the env)
  73         the venv dir cannot be created or written, or another user
             owns or could change what is in it (see docs/security.md)
  74         dbtvenv's own output could not be written
  75         the lock was not acquired in time: try again later

Run 'dbtvenv COMMAND --help' for a command's options and examples, and
'dbtvenv run [ENV OPTIONS] -- --help' for dbt's own help.
"""


def _complete_dir(ctx: click.Context, param: click.Parameter, incomplete: str) -> list[Any]:
    from click.shell_completion import CompletionItem

    return [CompletionItem(incomplete, type="dir")]


def _complete_file(ctx: click.Context, param: click.Parameter, incomplete: str) -> list[Any]:
    from click.shell_completion import CompletionItem

    return [CompletionItem(incomplete, type="file")]


_COMPLETERS = {"dir": _complete_dir, "file": _complete_file}


def _complete_env_key(ctx: click.Context, param: click.Parameter, incomplete: str) -> list[str]:
    """The keys of the envs in the --venv-dir given so far (or DBTVENV_VENV_DIR)."""
    venv_dir = ctx.params.get("venv_dir")
    if not venv_dir:
        return []
    return [key for key in commands.env_keys(venv_dir) if key.startswith(incomplete)]


@click.group(
    cls=SectionedGroup,
    context_settings={"help_option_names": ["--help"], "max_content_width": 100},
    epilog=TOP_EPILOG,
)
@click.version_option(__version__, "--version", prog_name="dbtvenv", message="%(prog)s %(version)s")
def cli() -> None:
    """Run dbt in a virtual environment built for it, never in your own.

    dbtvenv builds (or reuses) a Python virtual environment from the requirements you give,
    then runs that env's own dbt as a child process: its output, signals and exit status
    pass straight through. Airflow, cron and your shell keep their own dependencies.

    \b
    Synopsis:
      dbtvenv DBT_COMMAND [ENV OPTIONS] [--] [DBT ARGS]...
      dbtvenv dbt [ENV OPTIONS] [--] DBT ARGS...
      dbtvenv env prepare|path|info|list|rm|stop-warm|gc [OPTIONS]
      dbtvenv lock status [ENV OPTIONS]
      dbtvenv shim [ENV OPTIONS] --output PATH
      dbtvenv completion bash|zsh|fish

    Without --venv-dir the env is temporary: built for this one run and removed after it.
    With --venv-dir DIR, DIR keeps one env per spec, reused by every later run and process.
    dbtvenv's own messages go to stderr; stdout is dbt's.

    \b
    Examples:
      dbtvenv run --requirements 'dbt-postgres~=1.9.0' -- --select orders
      export DBTVENV_VENV_DIR=~/.cache/dbtvenv
      export DBTVENV_REQUIREMENTS='dbt-core~=1.11.0 dbt-duckdb~=1.11.0'
      dbtvenv build --select orders
      dbtvenv dbt -- --debug run --select orders
      dbtvenv env list
    """


# What each dbt command's help example passes on to dbt (default: --select my_model).
EXAMPLE_DBT_ARGS = {
    "run-operation": "my_macro --args '{days: 7}'",
    "debug": "--config-dir",
    "deps": "--upgrade",
    "parse": "--no-partial-parse",
    "retry": "--target prod",
    "clean": "--no-clean-project-files-only",
    "docs generate": "--no-compile",
    "docs serve": "--port 8081",
    "source freshness": "--select source:raw",
}


def _dbt_command(words: Sequence[str]) -> click.Command:
    shown = " ".join(words)

    def callback(**params: Any) -> int:
        return commands.run_dbt(_env_options(params), [*words, *_dbt_args()])

    help_text = f"""Run 'dbt {shown} [DBT ARGS]' in the env.

    dbtvenv's options (below) come first; the first other token, or '--', ends them and
    the rest goes to dbt unchanged.

    \b
    Example:
      dbtvenv {shown} --venv-dir ~/.cache/dbtvenv \\
        --requirements 'dbt-duckdb~=1.11.0' -- {EXAMPLE_DBT_ARGS.get(shown, "--select my_model")}

    \b
    dbt's own help for this command:
      dbtvenv {shown} [ENV OPTIONS] -- --help
    """
    return click.command(
        words[-1],
        cls=PassThroughCommand,
        help=help_text,
        short_help=f"dbt {shown}",
    )(env_options(callback))


for _name in DBT_COMMANDS:
    cli.add_command(_dbt_command([_name]))

for _group_name, _subcommands in DBT_SUBCOMMANDS.items():
    _group = DbtCommandGroup(
        _group_name,
        help=f"Run 'dbt {_group_name} {'|'.join(_subcommands)}' in the env.\n\n\b\nExample:\n"
        f"  dbtvenv {_group_name} {_subcommands[0]} --venv-dir ~/.cache/dbtvenv",
    )
    _group.dbt_prefix = (_group_name,)
    _group.short_help = f"dbt {_group_name} {'|'.join(_subcommands)}"
    for _sub in _subcommands:
        _group.add_command(_dbt_command([_group_name, _sub]))
    cli.add_command(_group)


@cli.command(
    "dbt",
    cls=PassThroughCommand,
    short_help="Run any dbt command line verbatim.",
)
@env_options
def dbt_verbatim(**params: Any) -> int:
    """Run 'dbt ARGS' in the env: any command, global flags first, future commands.

    \b
    Example:
      dbtvenv dbt --venv-dir ~/.cache/dbtvenv -- --log-format json run -s orders

    \b
    dbt's own help:
      dbtvenv dbt [ENV OPTIONS] -- --help
    """
    return commands.run_dbt(_env_options(params), _dbt_args())


@cli.group("env", cls=OrderedGroup)
def env_group() -> None:
    """Build, inspect and clean up cached envs.

    The envs of a cache dir (--venv-dir DIR), one per spec.

    \b
    Example:
      dbtvenv env list --venv-dir ~/.cache/dbtvenv
      dbtvenv env gc --venv-dir ~/.cache/dbtvenv --older-than 14d --dry-run
    """


@env_group.command("prepare")
@env_options
def env_prepare(**params: Any) -> int:
    """Build or verify the env; print its path.

    Runs no dbt: for baking envs into images and warming caches. The path is the only
    thing on stdout; progress goes to stderr.

    \b
    Example (a Dockerfile):
      RUN dbtvenv env prepare --venv-dir /opt/dbtvenv \\
            --requirements 'dbt-postgres~=1.9.0'
    """
    return commands.env_prepare(_env_options(params))


@env_group.command("path")
@env_options
def env_path(**params: Any) -> int:
    """Print the env's path; build nothing.

    The path is DIR/<key>, where the spec's env lives or would live. Creates nothing, not
    even DIR.

    \b
    Example:
      dbtvenv env path --venv-dir ~/.cache/dbtvenv \\
        --requirements 'dbt-duckdb~=1.11.0'
    """
    return commands.env_path(_env_options(params))


@env_group.command("info")
@env_options
@click.option("--json", "as_json", is_flag=True, help="Print the manifest as JSON.")
def env_info(as_json: bool, **params: Any) -> int:
    """Show the env's manifest, size and use.

    Spec, interpreter, installed distributions, created, last used, size, and whether dbt
    runs in it now. Exits 1 if the env does not exist. The JSON fields are described in
    docs/json.md.

    \b
    Example:
      dbtvenv env info --venv-dir ~/.cache/dbtvenv --json \\
        --requirements 'dbt-duckdb~=1.11.0'
    """
    return commands.env_info(_env_options(params), as_json=as_json)


# The cache dir of the env commands that take no spec (list, rm, stop-warm, gc).
venv_dir_option = click.option(
    "--venv-dir",
    metavar="DIR",
    envvar="DBTVENV_VENV_DIR",
    show_envvar=True,
    shell_complete=_complete_dir,
    help="The cache dir, as given to runs, e.g. ~/.cache/dbtvenv.",
)


@env_group.command("list")
@venv_dir_option
@click.option("--json", "as_json", is_flag=True, help="One JSON object per env, in an array.")
def env_list(venv_dir: str | None, as_json: bool) -> int:
    """List the envs in a cache dir.

    Most recently used first, one row per env: key, requirements, Python, dbt-core and
    adapter versions, size, created, last used, in use, complete. A table on a terminal,
    plain columns elsewhere; --json gives sizes in bytes and times in ISO 8601 (fields:
    docs/json.md).

    \b
    Example:
      dbtvenv env list --venv-dir ~/.cache/dbtvenv
    """
    return commands.env_list(venv_dir, as_json=as_json)


@env_group.command("rm")
@venv_dir_option
@click.option("--all", "remove_all", is_flag=True, help="Remove every env in the cache dir.")
@click.option("--force", is_flag=True, help="Remove envs even while dbt runs in them.")
@click.option(
    "--lock-timeout",
    type=SECONDS_TYPE,
    default=120.0,
    metavar="SECONDS",
    envvar="DBTVENV_LOCK_TIMEOUT",
    show_envvar=True,
    help="Longest wait for an env's lock (a build in progress); then exit 75.",
)
@click.argument("keys", nargs=-1, metavar="[KEY]...", shell_complete=_complete_env_key)
def env_rm(
    venv_dir: str | None, remove_all: bool, force: bool, lock_timeout: float, keys: tuple[str, ...]
) -> int:
    """Remove envs by key, or all of them.

    Keys are what 'env list' shows. Each env is removed under its lock. An env in use is
    refused (exit 1) unless --force; an unknown key is exit 1 too. What was removed is
    printed on stdout.

    \b
    Example:
      dbtvenv env rm --venv-dir ~/.cache/dbtvenv 3f2a9c1e5b7d4a60
    """
    return commands.env_rm(
        venv_dir, keys, remove_all=remove_all, force=force, lock_timeout=lock_timeout
    )


@env_group.command("stop-warm")
@venv_dir_option
@click.option(
    "--all",
    "stop_all",
    is_flag=True,
    help="Stop every warm process of yours (of the envs in --venv-dir, if given).",
)
@click.argument("keys", nargs=-1, metavar="[KEY]...", shell_complete=_complete_env_key)
def env_stop_warm(venv_dir: str | None, stop_all: bool, keys: tuple[str, ...]) -> int:
    """Stop your warm processes of envs (--warm).

    A warm process takes no new request once told, and exits when the dbt commands it runs
    have ended; the next --warm run starts a new one. Only your own warm processes are
    stopped: each user has their own. 'env info' lists them.

    \b
    Example:
      dbtvenv env stop-warm --venv-dir ~/.cache/dbtvenv 3f2a9c1e5b7d4a60
      dbtvenv env stop-warm --all
    """
    return commands.env_stop_warm(venv_dir, keys, stop_all=stop_all)


@env_group.command("gc")
@venv_dir_option
@click.option(
    "--older-than",
    default="30d",
    show_default=True,
    metavar="DURATION",
    help="Remove envs not used within this long: 30d, 12h, 90m, 45s, 2w.",
)
@click.option(
    "--dry-run", is_flag=True, help="Only list what would be removed and the bytes it would free."
)
def env_gc(venv_dir: str | None, older_than: str, dry_run: bool) -> int:
    """Remove unused envs and what crashes left.

    Removes envs not used within --older-than, envs whose build was interrupted (no live
    builder), stale lock files, half-removed envs, and temporary envs (dbtvenv-* in the
    system temp dir) of runs that were killed. Never an env in use, never a live run's
    temporary env. Without --venv-dir only temporary envs are collected. What it removes,
    and the bytes freed, is printed on stdout.

    \b
    Example (cron, nightly):
      0 3 * * * dbtvenv env gc --venv-dir /var/cache/dbtvenv --older-than 14d
    """
    return commands.env_gc(venv_dir, older_than=older_than, dry_run=dry_run)


@cli.group("lock", cls=OrderedGroup)
def lock_group() -> None:
    """Inspect env locks.

    The lock DIR/<key>.lock guards building and removing an env; runs never wait for it
    while the env is complete.

    \b
    Example:
      dbtvenv lock status --venv-dir ~/.cache/dbtvenv \\
        --requirements 'dbt-duckdb~=1.11.0'
    """


@lock_group.command("status")
@env_options
@click.option("--json", "as_json", is_flag=True, help="Print the lock state as JSON.")
def lock_status(as_json: bool, **params: Any) -> int:
    """Show who holds an env's lock, if anyone.

    For the env the spec maps to: names the holder (pid, host, since when, its command
    line), or says that the lock is stale and why; the next run takes a stale lock over.

    \b
    Example:
      dbtvenv lock status --venv-dir ~/.cache/dbtvenv \\
        --requirements 'dbt-duckdb~=1.11.0'
    """
    return commands.lock_status(_env_options(params), as_json=as_json)


@cli.command("shim")
@env_options
@click.option(
    "--output",
    metavar="PATH",
    shell_complete=_complete_file,
    help="Where to write the shim (replaced atomically if it exists).",
)
@click.option("--print", "show", is_flag=True, help="Print the shim on stdout.")
def shim(output: str | None, show: bool, **params: Any) -> int:
    """Write an executable that is the env's dbt.

    The shim runs 'dbtvenv dbt [ENV OPTIONS] -- ARGS' for any ARGS, with the ENV OPTIONS
    given here (on the command line or by their variables) fixed in it, paths made absolute.
    It behaves as the env's dbt: arguments, streams, signals and exit status pass straight
    through. Give its path to whatever runs dbt, such as Cosmos's
    ExecutionConfig(dbt_executable_path=...). Where it runs, no variable changes its env
    (DBTVENV_REQUIREMENTS and the like are ignored); DBTVENV_LOCK_TIMEOUT,
    DBTVENV_INSTALLER, DBTVENV_WARM (unless given here), DBTVENV_KILL_GRACE and the like
    still apply.

    It is a POSIX sh script that runs dbtvenv from the path dbtvenv has now, else from PATH.
    Mode 0755 less the umask; 0700 if it holds a credential.

    \b
    Example:
      dbtvenv shim --venv-dir /shared/dbtvenv \\
        --requirements 'dbt-core~=1.11.0' --requirements 'dbt-postgres~=1.9.0' \\
        --output /opt/airflow/bin/dbt-isolated
    """
    ctx = click.get_current_context()
    given = {
        name
        for name in params
        if ctx.get_parameter_source(name)
        in (ParameterSource.COMMANDLINE, ParameterSource.ENVIRONMENT)
    }
    return shim_module.write_shim(params, given, output, show)


@cli.command("completion")
@click.argument("shell", type=click.Choice(["bash", "zsh", "fish"]), metavar="SHELL")
def completion(shell: str) -> int:
    """Print a shell completion script.

    For bash, zsh or fish; the same scripts are in the completions/ dir of the source.

    \b
    Examples:
      dbtvenv completion bash > ~/.local/share/bash-completion/completions/dbtvenv
      dbtvenv completion zsh > "${fpath[1]}/_dbtvenv"
      dbtvenv completion fish > ~/.config/fish/completions/dbtvenv.fish
    """
    commands.out(completion_script(shell))
    return 0


def completion_script(shell: str) -> str:
    from click.shell_completion import get_completion_class

    completion_class = get_completion_class(shell)
    assert completion_class is not None
    return completion_class(cli, {}, "dbtvenv", COMPLETE_VAR).source()


def run(args: Sequence[str]) -> int:
    """Parse `args` with Click and run the command; Click's own outcomes become exit statuses.

    dbtvenv's errors propagate to the boundary in `dbtvenv.main`.
    """
    if os.environ.get(COMPLETE_VAR):  # a shell asks for completions: Click answers and exits
        _complete(args)
    # Not `cli.main()`: that turns a broken pipe into exit 1 even outside standalone mode.
    try:
        with cli.make_context("dbtvenv", list(args)) as ctx:
            result = cli.invoke(ctx)
    except click.exceptions.Exit as exc:  # --help, --version
        return exc.exit_code
    except click.exceptions.Abort:
        raise KeyboardInterrupt from None
    except click.UsageError as exc:
        commands.echo_error(redact(usage_message(exc)))
        return EX_USAGE
    except click.ClickException as exc:
        commands.echo_error(redact(exc.format_message()))
        return EX_USAGE
    return result if isinstance(result, int) else 0


def _complete(args: Sequence[str]) -> None:
    """Answer a completion script; the variables it sets missing or malformed are a usage error
    (someone set the variable by hand), never a crash."""
    try:
        cli.main(args=list(args), prog_name="dbtvenv", complete_var=COMPLETE_VAR)
    except (KeyError, ValueError, IndexError):
        raise UsageError(
            f"{COMPLETE_VAR}={os.environ.get(COMPLETE_VAR)!r} asks for shell completions, but "
            "COMP_WORDS and COMP_CWORD, which the completion script sets with it, are missing "
            f"or malformed; unset {COMPLETE_VAR}, or install the script from "
            "'dbtvenv completion SHELL'"
        ) from None


def usage_message(exc: click.UsageError) -> str:
    """Click's message, naming the environment variable a bad value came from."""
    ctx = exc.ctx
    if isinstance(exc, click.exceptions.NoArgsIsHelpError) and ctx is not None:
        # A bare `dbtvenv` or `dbtvenv env`: the help, then what is missing.
        sys.stderr.write(ctx.get_help() + "\n\n")
        return f"missing command: run '{ctx.command_path} COMMAND ...' (see the list above)"
    if isinstance(exc, click.BadParameter) and ctx is not None and exc.param is not None:
        param = exc.param
        from_env = param.name is not None and (
            ctx.get_parameter_source(param.name) is ParameterSource.ENVIRONMENT
        )
        if from_env and isinstance(param.envvar, str):
            exc.param_hint = f"{param.envvar} (the environment variable behind {param.opts[0]})"
    message = exc.format_message().rstrip(".")
    if ctx is not None:
        message += f" (see '{ctx.command_path} --help')"
    return message
