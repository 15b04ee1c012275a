"""The command line: Click parsing only. Everything else lives in `commands` and below.

dbtvenv's own options come first; the first token that is not one of them, or a literal `--`,
ends them, and everything from there goes to dbt unchanged.
"""

from __future__ import annotations

import signal
import sys
from collections.abc import Callable, Sequence
from types import FrameType
from typing import Any

import click

from dbtvenv import __version__, commands
from dbtvenv.errors import EX_SIGNAL_BASE, EX_SOFTWARE, EX_USAGE, DbtvenvError, Interrupted

DBT_COMMANDS = [
    "build",
    "run",
    "test",
    "seed",
    "snapshot",
    "ls",
    "list",
    "run-operation",
    "clone",
    "compile",
    "debug",
    "deps",
    "parse",
    "show",
    "retry",
    "clean",
]
DBT_SUBCOMMANDS = {"docs": ("generate", "serve"), "source": ("freshness",)}

EXAMPLE_REQUIREMENTS = "--requirements 'dbt-core~=1.11.0' --requirements 'dbt-duckdb~=1.11.0'"


def env_options(func: Callable[..., Any]) -> Callable[..., Any]:
    """The ENV OPTIONS of the contract, each also read from its DBTVENV_* variable."""
    options = [
        click.option(
            "--requirements",
            "requirements",
            multiple=True,
            metavar="SPEC",
            envvar="DBTVENV_REQUIREMENTS",
            help="A PEP 508 requirement to install, e.g. 'dbt-postgres~=1.9.0'. Repeatable. "
            "DBTVENV_REQUIREMENTS: whitespace-separated.",
        ),
        click.option(
            "--requirements-file",
            "requirements_files",
            multiple=True,
            metavar="PATH",
            envvar="DBTVENV_REQUIREMENTS_FILE",
            help="A pip requirements file. Repeatable.",
        ),
        click.option(
            "--constraints",
            multiple=True,
            metavar="PATH",
            envvar="DBTVENV_CONSTRAINTS",
            help="A pip constraints file, e.g. to pin protobuf<5 for an old dbt. Repeatable.",
        ),
        click.option(
            "--venv-dir",
            metavar="DIR",
            envvar="DBTVENV_VENV_DIR",
            help="Persistent mode: a cache root holding one env per spec, shared by runs and "
            "processes, e.g. ~/.cache/dbtvenv. Without it the env is temporary.",
        ),
        click.option(
            "--temporary",
            is_flag=True,
            envvar="DBTVENV_TEMPORARY",
            help="Build a throw-away env even if a venv dir is set.",
        ),
        click.option(
            "--pip-install-options",
            metavar="OPTS",
            envvar="DBTVENV_PIP_INSTALL_OPTIONS",
            help="Extra 'pip install' arguments, split like a shell would, e.g. "
            "'--index-url https://pypi.example.com/simple'.",
        ),
        click.option(
            "--python",
            metavar="PATH",
            envvar="DBTVENV_PYTHON",
            help="Base interpreter of the env (default: the one dbtvenv runs on), e.g. python3.11.",
        ),
        click.option(
            "--system-site-packages",
            is_flag=True,
            envvar="DBTVENV_SYSTEM_SITE_PACKAGES",
            help="Give the env the base interpreter's site-packages.",
        ),
        click.option(
            "--lock-timeout",
            type=click.FloatRange(min=0),
            default=120.0,
            show_default=True,
            metavar="SECONDS",
            envvar="DBTVENV_LOCK_TIMEOUT",
            help="Longest wait for an env lock held by another process; then exit 75.",
        ),
        click.option(
            "--installer",
            type=click.Choice(["pip", "uv"]),
            default="pip",
            show_default=True,
            envvar="DBTVENV_INSTALLER",
            help="What fills the env: pip, or uv (several times faster; "
            "pip install 'dbtvenv[uv]').",
        ),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def _env_options(params: dict[str, Any]) -> commands.EnvOptions:
    return commands.EnvOptions(
        requirements=params.pop("requirements"),
        requirements_files=params.pop("requirements_files"),
        constraints=params.pop("constraints"),
        venv_dir=params.pop("venv_dir"),
        temporary=params.pop("temporary"),
        pip_install_options=params.pop("pip_install_options"),
        python=params.pop("python"),
        system_site_packages=params.pop("system_site_packages"),
        lock_timeout=params.pop("lock_timeout"),
        installer=params.pop("installer"),
    )


def split_own_options(
    args: Sequence[str], params: Sequence[click.Parameter]
) -> tuple[list[str], list[str]]:
    """Split argv into dbtvenv's options and dbt's arguments, exactly as the contract says."""
    takes_value: dict[str, bool] = {}
    for param in params:
        if isinstance(param, click.Option):
            for name in (*param.opts, *param.secondary_opts):
                takes_value[name] = not (param.is_flag or param.count)
    i = 0
    while i < len(args):
        token = args[i]
        if token == "--":
            return list(args[:i]), list(args[i + 1 :])
        name = token.split("=", 1)[0] if token.startswith("--") else token
        if name not in takes_value:
            break
        i += 2 if takes_value[name] and "=" not in token else 1
    i = min(i, len(args))
    return list(args[:i]), list(args[i:])


class PassThroughCommand(click.Command):
    """A dbt command: dbtvenv's options first, then dbt's arguments, untouched."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        own, dbt_args = split_own_options(args, self.get_params(ctx))
        ctx.meta["dbtvenv.dbt_args"] = dbt_args
        return super().parse_args(ctx, own)

    def collect_usage_pieces(self, ctx: click.Context) -> list[str]:
        return ["[ENV OPTIONS]", "[--]", "[DBT ARGS]..."]


def _dbt_args() -> list[str]:
    args: list[str] = click.get_current_context().meta["dbtvenv.dbt_args"]
    return args


class SectionedGroup(click.Group):
    """Lists dbt's commands apart from dbtvenv's own in --help."""

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        own = {"dbt", "env", "lock", "completion"}
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


@click.group(
    cls=SectionedGroup,
    context_settings={"help_option_names": ["--help"], "max_content_width": 100},
    epilog="Run 'dbtvenv COMMAND --help' for a command's options; "
    "'dbtvenv run [ENV OPTIONS] -- --help' shows dbt's own help.",
)
@click.version_option(__version__, "--version", prog_name="dbtvenv", message="%(prog)s %(version)s")
def cli() -> None:
    """Run dbt in a virtual environment built for it, never in your own.

    dbtvenv builds (or reuses) a Python virtual environment from the requirements you give,
    then runs that env's own dbt as a child process: its output, signals and exit status
    pass straight through. Airflow, cron and your shell keep their own dependencies.

    \b
    Examples:
      dbtvenv run --requirements 'dbt-postgres~=1.9.0' -- --select orders
      dbtvenv build --requirements 'dbt-duckdb~=1.11.0' --venv-dir ~/.cache/dbtvenv
      dbtvenv dbt --venv-dir ~/.cache/dbtvenv -- --debug run --select orders
      dbtvenv env list --venv-dir ~/.cache/dbtvenv
    """


def _dbt_command(words: Sequence[str]) -> click.Command:
    shown = " ".join(words)

    def callback(**params: Any) -> int:
        return commands.run_dbt(_env_options(params), [*words, *_dbt_args()])

    help_text = f"""Run 'dbt {shown} [DBT ARGS]' in the env.

    \b
    Example:
      dbtvenv {shown} {EXAMPLE_REQUIREMENTS} --venv-dir ~/.cache/dbtvenv -- --select my_model

    dbtvenv's options come first; the first other token, or '--', ends them and the rest goes
    to dbt unchanged. dbt's own help: dbtvenv {shown} [ENV OPTIONS] -- --help
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
    _group = click.Group(_group_name, help=f"dbt {_group_name} {'|'.join(_subcommands)}.")
    _group.short_help = f"dbt {_group_name} {'|'.join(_subcommands)}"
    for _sub in _subcommands:
        _group.add_command(_dbt_command([_group_name, _sub]))
    cli.add_command(_group)


@cli.command(
    "dbt",
    cls=PassThroughCommand,
    short_help="Run any dbt command line verbatim: dbtvenv dbt [ENV OPTIONS] -- ARGS",
)
@env_options
def dbt_verbatim(**params: Any) -> int:
    """Run 'dbt ARGS' in the env: any command, global flags first, future commands.

    \b
    Example:
      dbtvenv dbt --venv-dir ~/.cache/dbtvenv -- --log-format json run --select orders
    """
    return commands.run_dbt(_env_options(params), _dbt_args())


@cli.group("env")
def env_group() -> None:
    """Build, inspect and clean up envs: prepare, path, info, list, rm, gc."""


@env_group.command("prepare")
@env_options
def env_prepare(**params: Any) -> int:
    """Build or verify the env and print its path; runs no dbt.

    For baking envs into images and warming caches:

    \b
      RUN dbtvenv env prepare --venv-dir /opt/dbtvenv --requirements 'dbt-postgres~=1.9.0'
    """
    return commands.env_prepare(_env_options(params))


@env_group.command("path")
@env_options
def env_path(**params: Any) -> int:
    """Print the env path (DIR/<key>) the spec maps to; builds nothing.

    \b
    Example:
      dbtvenv env path --venv-dir ~/.cache/dbtvenv --requirements 'dbt-duckdb~=1.11.0'
    """
    return commands.env_path(_env_options(params))


@env_group.command("info")
@env_options
@click.option("--json", "as_json", is_flag=True, help="Print the manifest as JSON.")
def env_info(as_json: bool, **params: Any) -> int:
    """Show the env's manifest: spec, interpreter, distributions, created, last used, size.

    Exits 1 if the env does not exist.

    \b
    Example:
      dbtvenv env info --venv-dir ~/.cache/dbtvenv --requirements 'dbt-duckdb~=1.11.0' --json
    """
    return commands.env_info(_env_options(params), as_json=as_json)


@env_group.command("list")
@click.option("--venv-dir", metavar="DIR", envvar="DBTVENV_VENV_DIR", help="The cache root.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per env, in an array.")
def env_list(venv_dir: str | None, as_json: bool) -> int:
    """List the envs in a cache dir, most recently used first.

    \b
    Example:
      dbtvenv env list --venv-dir ~/.cache/dbtvenv
    """
    return commands.env_list(venv_dir, as_json=as_json)


@env_group.command("rm")
@click.option("--venv-dir", metavar="DIR", envvar="DBTVENV_VENV_DIR", help="The cache root.")
@click.option("--all", "remove_all", is_flag=True, help="Remove every env in the cache dir.")
@click.option("--force", is_flag=True, help="Remove envs even while dbt runs in them.")
@click.option(
    "--lock-timeout",
    type=click.FloatRange(min=0),
    default=120.0,
    metavar="SECONDS",
    envvar="DBTVENV_LOCK_TIMEOUT",
    help="Longest wait for an env's lock.",
)
@click.argument("keys", nargs=-1, metavar="[KEY]...")
def env_rm(
    venv_dir: str | None, remove_all: bool, force: bool, lock_timeout: float, keys: tuple[str, ...]
) -> int:
    """Remove envs by key (see 'env list'), each under its lock.

    An env in use is refused unless --force.

    \b
    Example:
      dbtvenv env rm --venv-dir ~/.cache/dbtvenv 3f2a9c1e5b7d4a60
    """
    return commands.env_rm(
        venv_dir, keys, remove_all=remove_all, force=force, lock_timeout=lock_timeout
    )


@env_group.command("gc")
@click.option("--venv-dir", metavar="DIR", envvar="DBTVENV_VENV_DIR", help="The cache root.")
@click.option(
    "--older-than",
    default="30d",
    show_default=True,
    metavar="DURATION",
    help="Remove envs not used within this long: 30d, 12h, 90m, 45s, 2w.",
)
@click.option("--dry-run", is_flag=True, help="Only list what would be removed and its size.")
def env_gc(venv_dir: str | None, older_than: str, dry_run: bool) -> int:
    """Remove unused and incomplete envs, stale locks, and temporary envs of killed runs.

    Never touches an env in use.

    \b
    Example (cron, nightly):
      0 3 * * * dbtvenv env gc --venv-dir /var/cache/dbtvenv --older-than 14d
    """
    return commands.env_gc(venv_dir, older_than=older_than, dry_run=dry_run)


@cli.group("lock")
def lock_group() -> None:
    """Inspect env locks."""


@lock_group.command("status")
@env_options
@click.option("--json", "as_json", is_flag=True, help="Print the lock state as JSON.")
def lock_status(as_json: bool, **params: Any) -> int:
    """Show who holds the lock of the env the spec maps to, or that it is free.

    \b
    Example:
      dbtvenv lock status --venv-dir ~/.cache/dbtvenv --requirements 'dbt-duckdb~=1.11.0'
    """
    return commands.lock_status(_env_options(params), as_json=as_json)


@cli.command("completion")
@click.argument("shell", type=click.Choice(["bash", "zsh", "fish"]))
def completion(shell: str) -> int:
    """Print the shell completion script for bash, zsh or fish.

    \b
    Examples:
      dbtvenv completion bash > ~/.local/share/bash-completion/completions/dbtvenv
      dbtvenv completion zsh > "${fpath[1]}/_dbtvenv"
      dbtvenv completion fish > ~/.config/fish/completions/dbtvenv.fish
    """
    click.echo(completion_script(shell))
    return 0


def completion_script(shell: str) -> str:
    from click.shell_completion import get_completion_class

    completion_class = get_completion_class(shell)
    assert completion_class is not None
    return completion_class(cli, {}, "dbtvenv", "_DBTVENV_COMPLETE").source()


def _raise_interrupted(signum: int, frame: FrameType | None) -> None:
    raise Interrupted(signum)


def main(argv: Sequence[str] | None = None) -> int:
    """The error boundary: every outcome becomes one exit status, never a traceback."""
    for signum in (signal.SIGTERM, signal.SIGHUP):
        if signal.getsignal(signum) is not signal.SIG_IGN:
            signal.signal(signum, _raise_interrupted)
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        result = cli.main(args=args, prog_name="dbtvenv", standalone_mode=False)
    except click.exceptions.Abort:  # Click's translation of KeyboardInterrupt
        commands.echo_error("interrupted before dbt started")
        return EX_SIGNAL_BASE + signal.SIGINT
    except click.UsageError as exc:
        hint = f" (see '{exc.ctx.command_path} --help')" if exc.ctx is not None else ""
        commands.echo_error(f"{exc.format_message().rstrip('.')}{hint}")
        return EX_USAGE
    except click.ClickException as exc:
        commands.echo_error(exc.format_message())
        return EX_USAGE
    except DbtvenvError as exc:
        commands.echo_error(exc.message, exc.details)
        return exc.exit_code
    except KeyboardInterrupt:
        commands.echo_error("interrupted before dbt started")
        return EX_SIGNAL_BASE + signal.SIGINT
    except BrokenPipeError:
        return EX_SIGNAL_BASE + signal.SIGPIPE
    except Exception as exc:  # a bug: one line for the user, the traceback only on request
        import os
        import traceback

        if os.environ.get("DBTVENV_DEBUG"):
            traceback.print_exc()
        commands.echo_error(
            f"internal error: {type(exc).__name__}: {exc}; set DBTVENV_DEBUG=1 for the traceback "
            "and please report it"
        )
        return EX_SOFTWARE
    if isinstance(result, int):
        return result
    return 0
