"""The command line's vocabulary, without Click: dbt's commands, the ENV OPTIONS of the
contract, and how a dbt command line splits into dbtvenv's options and dbt's arguments.

`cli.py` builds its Click options from this table. `parse_dbt_invocation` reads a plain dbt
command line with the same table and Click's own rules, so that the warm path (a complete env:
check, then run dbt) does not pay for importing Click; whatever it is not sure of (help, a
mistake, an unusual value) it leaves to Click, whose messages stay the only ones.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import NamedTuple

DBT_COMMANDS = (
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
)
DBT_SUBCOMMANDS = {"docs": ("generate", "serve"), "source": ("freshness",)}
VERBATIM_COMMAND = "dbt"  # `dbtvenv dbt -- ARGS`: dbt's whole command line, as given

# Set by the completion scripts: then Click answers, whatever the command line.
COMPLETE_VAR = "_DBTVENV_COMPLETE"

INSTALLERS = ("pip", "uv")
DEFAULT_LOCK_TIMEOUT = 120.0
# The documented range of every number of seconds dbtvenv takes (README, "Numbers").
MAX_LOCK_TIMEOUT = 86400.0

# What kind of value an option takes.
MULTIPLE = "multiple"  # repeatable; its variable is split at whitespace
VALUE = "value"
FLAG = "flag"  # no value; its variable is a boolean (1, true, yes, on / 0, false, no, off)
SECONDS = "seconds"
CHOICE = "choice"

# What a relative value of an option is relative to (`EnvOption.path`).
CWD_PATH = "cwd"
COMMAND = "command"


class EnvOption(NamedTuple):
    flag: str
    dest: str
    envvar: str
    kind: str
    metavar: str
    help: str
    default: object = None
    choices: tuple[str, ...] = ()
    completes: str = ""  # what a shell completes its value with: "dir", "file" or nothing
    # What a relative value means where dbtvenv records it for later use (`dbtvenv shim`):
    # CWD_PATH, a path relative to the working directory; COMMAND, a path, or a bare name
    # looked up on PATH whenever it is used.
    path: str = ""
    # Whether the option says which env dbt runs in (what it holds, where it lives), as
    # opposed to how a run gets there: a shim fixes the env, so its variable is ignored there.
    names_env: bool = True


ENV_OPTIONS = (
    EnvOption(
        "--requirements",
        "requirements",
        "DBTVENV_REQUIREMENTS",
        MULTIPLE,
        "SPEC",
        "A PEP 508 requirement to install, e.g. 'dbt-postgres~=1.9.0'. Repeatable; "
        "in the variable, separate them with whitespace.",
        (),
    ),
    EnvOption(
        "--requirements-file",
        "requirements_files",
        "DBTVENV_REQUIREMENTS_FILE",
        MULTIPLE,
        "PATH",
        "A pip requirements file. Repeatable.",
        (),
        completes="file",
        path=CWD_PATH,
    ),
    EnvOption(
        "--constraints",
        "constraints",
        "DBTVENV_CONSTRAINTS",
        MULTIPLE,
        "PATH",
        "A pip constraints file, e.g. to pin protobuf<5 for an old dbt. Repeatable.",
        (),
        completes="file",
        path=CWD_PATH,
    ),
    EnvOption(
        "--venv-dir",
        "venv_dir",
        "DBTVENV_VENV_DIR",
        VALUE,
        "DIR",
        "Persistent mode: a cache root holding one env per spec, shared by runs and "
        "processes, e.g. ~/.cache/dbtvenv. Without it the env is temporary.",
        completes="dir",
        path=CWD_PATH,
    ),
    EnvOption(
        "--temporary",
        "temporary",
        "DBTVENV_TEMPORARY",
        FLAG,
        "",
        "Build a throw-away env even if a venv dir is set.",
        False,
    ),
    EnvOption(
        "--pip-install-options",
        "pip_install_options",
        "DBTVENV_PIP_INSTALL_OPTIONS",
        VALUE,
        "OPTS",
        "Extra 'pip install' arguments, split like a shell would, e.g. "
        "'--index-url https://pypi.example.com/simple'.",
    ),
    EnvOption(
        "--python",
        "python",
        "DBTVENV_PYTHON",
        VALUE,
        "PATH",
        "Base interpreter of the env (default: the one dbtvenv runs on), e.g. python3.11.",
        path=COMMAND,
    ),
    EnvOption(
        "--system-site-packages",
        "system_site_packages",
        "DBTVENV_SYSTEM_SITE_PACKAGES",
        FLAG,
        "",
        "Give the env the base interpreter's site-packages.",
        False,
    ),
    EnvOption(
        "--no-implied-pins",
        "no_implied_pins",
        "DBTVENV_NO_IMPLIED_PINS",
        FLAG,
        "",
        "Do not constrain dbt-core to the line an adapter pin asks for (dbt-duckdb==1.9: "
        "dbt-core~=1.9.0); the installer chooses dbt-core.",
        False,
    ),
    EnvOption(
        "--lock-timeout",
        "lock_timeout",
        "DBTVENV_LOCK_TIMEOUT",
        SECONDS,
        "SECONDS",
        "Longest wait for an env lock held by another process; then exit 75.",
        DEFAULT_LOCK_TIMEOUT,
        names_env=False,
    ),
    EnvOption(
        "--warm",
        "warm",
        "DBTVENV_WARM",
        FLAG,
        "",
        "Persistent mode: start dbt as a fork of the env's warm process, which has imported "
        "dbt already (docs/warm.md). Runs dbt directly where that cannot serve.",
        False,
        names_env=False,
    ),
    EnvOption(
        "--installer",
        "installer",
        "DBTVENV_INSTALLER",
        CHOICE,
        "",
        "What fills the env: pip, or uv (several times faster; pip install 'dbtvenv[uv]').",
        "pip",
        INSTALLERS,
        names_env=False,
    ),
)
_BY_FLAG = {option.flag: option for option in ENV_OPTIONS}
# Every option a dbt command takes before dbt's arguments, and whether it takes a value.
OWN_OPTIONS_TAKE_VALUE = {
    **{option.flag: option.kind != FLAG for option in ENV_OPTIONS},
    "--help": False,
}


def parse_seconds(
    text: object, *, minimum: float = 0.0, maximum: float = MAX_LOCK_TIMEOUT
) -> float | None:
    """A number of seconds within [minimum, maximum], or None."""
    try:
        seconds = float(text)  # type: ignore[arg-type]
    except (TypeError, ValueError, OverflowError):
        return None
    return seconds if math.isfinite(seconds) and minimum <= seconds <= maximum else None


def split_own_options(args: Sequence[str]) -> tuple[list[str], list[str]]:
    """Split a dbt command's arguments into dbtvenv's options and dbt's, as the contract says:
    the first token that is not one of dbtvenv's options, or a literal `--`, ends them."""
    i = 0
    while i < len(args):
        token = args[i]
        if token == "--":
            return list(args[:i]), list(args[i + 1 :])
        name = token.split("=", 1)[0] if token.startswith("--") else token
        if name not in OWN_OPTIONS_TAKE_VALUE:
            break
        i += 2 if OWN_OPTIONS_TAKE_VALUE[name] and "=" not in token else 1
    i = min(i, len(args))
    return list(args[:i]), list(args[i:])


def dbt_command_words(args: Sequence[str]) -> tuple[list[str], int] | None:
    """The dbt command a dbtvenv command line names (`run`, `docs generate`; none for
    `dbtvenv dbt`) and how many of dbtvenv's words it takes, or None if it names none."""
    if not args:
        return None
    first = args[0]
    if first == VERBATIM_COMMAND:
        return [], 1
    if first in DBT_COMMANDS:
        return [first], 1
    subcommands = DBT_SUBCOMMANDS.get(first)
    if subcommands and len(args) > 1 and args[1] in subcommands:
        return [first, args[1]], 2
    return None


_TRUE = frozenset({"1", "true", "t", "yes", "y", "on"})
_FALSE = frozenset({"0", "false", "f", "no", "n", "off", ""})


def _convert(option: EnvOption, text: str) -> object | None:
    """`text` as the option's value, or None where only Click can say what is wrong."""
    if option.kind == SECONDS:
        return parse_seconds(text)
    if option.kind == CHOICE:
        return text if text in option.choices else None
    return text


def _from_environment(option: EnvOption, raw: str) -> object | None:
    if option.kind == MULTIPLE:
        return tuple(raw.split())
    if option.kind == FLAG:
        word = raw.strip().lower()
        return True if word in _TRUE else False if word in _FALSE else None
    return _convert(option, raw)


def parse_dbt_invocation(
    args: Sequence[str], environ: Mapping[str, str]
) -> tuple[dict[str, object], list[str]] | None:
    """For a dbt command line: dbtvenv's ENV OPTIONS (as `EnvOptions` fields, each from the
    command line, else its variable, else its default) and the whole argv for dbt.

    None whenever Click must see the line: not a dbt command, `--help`, a missing or bad
    value, a flag given a value, an unusual variable, a shell asking for completions.
    """
    found = dbt_command_words(args)
    if found is None or environ.get(COMPLETE_VAR):
        return None
    words, taken = found
    own, dbt_args = split_own_options(args[taken:])
    given: dict[str, object] = {}
    i = 0
    while i < len(own):
        name, has_inline, inline = own[i].partition("=")
        option = _BY_FLAG.get(name)
        if option is None:  # --help
            return None
        if option.kind == FLAG:
            if has_inline:
                return None
            given[option.dest] = True
            i += 1
            continue
        if has_inline:
            text, i = inline, i + 1
        elif i + 1 < len(own):  # as Click does, even `--pip-install-options --no-index`
            text, i = own[i + 1], i + 2
        else:
            return None  # no value
        value = _convert(option, text)
        if value is None:
            return None
        if option.kind == MULTIPLE:
            given[option.dest] = (*given.get(option.dest, ()), value)  # type: ignore[misc]
        else:
            given[option.dest] = value
    params: dict[str, object] = {}
    for option in ENV_OPTIONS:
        if option.dest in given:
            params[option.dest] = given[option.dest]
            continue
        raw = environ.get(option.envvar)
        if raw is None or raw == "":
            params[option.dest] = option.default
            continue
        value = _from_environment(option, raw)
        if value is None:
            return None
        params[option.dest] = value
    return params, [*words, *dbt_args]
