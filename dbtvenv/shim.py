"""`dbtvenv shim`: an executable that is the env's `dbt`, with the spec fixed when it is written.

What Cosmos's `ExecutionMode.LOCAL` (and anything else that wants a path to `dbt`) takes as the
dbt executable. The shim is a POSIX sh script of a few lines that `exec`s
`dbtvenv dbt OPTIONS -- "$@"`: no process of its own stays between the caller and dbtvenv, so
arguments, streams, signals and the exit status are dbtvenv's, and dbtvenv's are dbt's.

The options are the ENV OPTIONS the shim was written with (on the command line or from their
variables), each written out from the option table (`options.ENV_OPTIONS`), so an option added
there is carried without a change here. Paths are made absolute at write time.

The env is fixed: the shim unsets the variables of every option that says which env dbt runs
in (`EnvOption.names_env`: requirements, files, venv dir, ...), so a worker's
`DBTVENV_REQUIREMENTS` meant for other tasks cannot add to the spec of a shim written with a
requirements file only. The variables of the options about how a run gets there
(`--lock-timeout`, `--installer`, `--warm`) and dbtvenv's other variables
(`DBTVENV_KILL_GRACE`, ...) still apply where the shim runs, unless the shim names the option:
a named option beats its variable, as on any dbtvenv command line.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import sys
import tempfile
from collections.abc import Collection, Iterable
from pathlib import Path

from dbtvenv import __version__
from dbtvenv.errors import OutputFileError, UsageError
from dbtvenv.options import COMMAND, CWD_PATH, ENV_OPTIONS, FLAG, MULTIPLE, VERBATIM_COMMAND
from dbtvenv.progress import Reporter
from dbtvenv.redact import redact

EXECUTABLE_MODE = 0o755  # less the umask, as for any program one installs
PRIVATE_MODE = 0o700  # a shim with a credential in it: the owner's alone
EX_NOT_FOUND_COMMAND = 127  # the shell's status for a command that cannot be found


def shim_options(values: dict[str, object], given: Collection[str]) -> list[str]:
    """The ENV OPTIONS in `values` whose names are in `given`, as `--flag=value` arguments
    (one argument per value: no value can be taken for an option), paths made absolute."""
    argv: list[str] = []
    for option in ENV_OPTIONS:
        if option.dest not in given:
            continue
        value = values.get(option.dest)
        if option.kind == FLAG:
            if value:  # a flag that is off is the default: nothing to write
                argv.append(option.flag)
            continue
        items: Iterable[object] = value if option.kind == MULTIPLE else (value,)  # type: ignore[assignment]
        for item in items:
            if item is None or item == "":
                continue
            argv.append(f"{option.flag}={_absolute(str(item), option.path)}")
    return argv


def _absolute(value: str, path: str) -> str:
    if path == CWD_PATH or (path == COMMAND and (os.sep in value or value.startswith("~"))):
        try:
            return os.path.abspath(os.path.expanduser(value))
        except OSError:  # a relative path, and the working directory was removed
            raise UsageError(
                f"{value!r} is relative, and the current directory no longer exists; give an "
                "absolute path, or run from an existing directory"
            ) from None
    return value


def sh_quote(text: str) -> str:
    """`text` as one word of a POSIX shell, whatever it holds: inside single quotes nothing
    is special ($, backticks, backslashes, newlines), and a single quote is spelt '\\''."""
    return "'" + text.replace("'", "'\\''") + "'"


def own_executable() -> str | None:
    """The absolute path of the `dbtvenv` program running now, if there is one."""
    candidates = [sys.argv[0]] if Path(sys.argv[0]).name == "dbtvenv" else []
    candidates.append(os.path.join(os.path.dirname(sys.executable), "dbtvenv"))
    for candidate in candidates:
        if candidate and os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return os.path.abspath(candidate)
    return None


def render(options: Iterable[str], dbtvenv: str | None) -> str:
    """The shim's text: `exec` dbtvenv (at `dbtvenv`, else from PATH) with the options."""
    lines = [
        "#!/bin/sh",
        "# dbt in its own virtual environment: runs 'dbtvenv dbt OPTIONS -- ARGS' for any ARGS,",
        f"# with the env options below. Written by 'dbtvenv shim' (dbtvenv {__version__}); write",
        "# it again to change them. The env is fixed: the variables that could change it go.",
        "unset " + " ".join(o.envvar for o in ENV_OPTIONS if o.names_env),
        f"set -- {VERBATIM_COMMAND} \\",
        *(f"  {sh_quote(argument)} \\" for argument in options),
        '  -- "$@"',
    ]
    if dbtvenv is not None:
        lines += [
            f"dbtvenv={sh_quote(dbtvenv)}",
            'if [ -x "$dbtvenv" ]; then exec "$dbtvenv" "$@"; fi',
        ]
    lines += [
        'if command -v dbtvenv >/dev/null 2>&1; then exec dbtvenv "$@"; fi',
        "echo 'dbtvenv: error: dbtvenv is not installed here"
        + (" (not at the path this shim recorded, nor on PATH)" if dbtvenv else " (not on PATH)")
        + "; install it, or write this shim again' >&2",
        f"exit {EX_NOT_FOUND_COMMAND}",
    ]
    return "\n".join(lines) + "\n"


def write_shim(
    values: dict[str, object], given: Collection[str], output: str | None, show: bool
) -> int:
    """`dbtvenv shim`: check the spec, then write the shim to `output` and/or print it."""
    from dbtvenv.commands import EnvOptions

    if output is None and not show:
        raise UsageError("shim needs --output PATH (where to write it) or --print")
    EnvOptions(**values).spec()  # type: ignore[arg-type]  # a bad spec fails now, not in a task
    options = shim_options(values, given)
    dbtvenv = own_executable()
    text = render(options, dbtvenv)
    secret = redact(text) != text
    if output is not None:
        path = Path(_absolute(output, CWD_PATH))
        if path.name == "dbtvenv":
            raise UsageError(
                f"--output {output!r}: a shim named dbtvenv would find itself on PATH; "
                "name it for what it runs, e.g. dbt-isolated"
            )
        mode = PRIVATE_MODE if secret else EXECUTABLE_MODE
        written = write_executable(path, text, mode)
        reporter = Reporter()
        reporter.info(f"wrote {path} (mode {written:04o}): dbt in the env of this spec")
        if dbtvenv is None:
            reporter.info("no dbtvenv program found beside this Python: it runs dbtvenv from PATH")
        if secret:
            reporter.info(
                f"{path} holds a credential (a URL with user info), so only its owner may "
                "read and run it; to share it, leave the credential to the workers' "
                "environment (PIP_INDEX_URL, DBTVENV_PIP_INSTALL_OPTIONS) instead"
            )
        if EnvOptions(**values).persistent:  # type: ignore[arg-type]
            prepare = shlex.join(["dbtvenv", "env", "prepare", *options])
            reporter.info(f"build its env before the first task needs it: {prepare}")
        else:
            reporter.info("no --venv-dir: every run of it builds a temporary env first")
    if show:
        # Printed text is shown text: credentials hidden, as everywhere dbtvenv writes.
        sys.stdout.flush()
        sys.stdout.buffer.write(os.fsencode(redact(text)))
        sys.stdout.buffer.flush()
    return 0


def write_executable(path: Path, text: str, mode: int) -> int:
    """Write `text` to `path` atomically (a reader sees the old file or the new one, never a
    part), with `mode` less the umask; return the mode the file got.

    A symlink at `path` is replaced, never followed.
    """
    if path.is_dir() and not path.is_symlink():
        raise UsageError(
            f"--output {path} is a directory; give the shim's own path, e.g. {path / 'dbt'}"
        )
    directory = path.parent
    if not directory.is_dir():
        raise OutputFileError(
            f"cannot write {path}: directory {directory} does not exist; create it first"
        )
    mode &= ~_umask()
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=directory)
    except OSError as exc:
        raise OutputFileError(
            f"cannot write {path}: {exc.strerror} in {directory}; choose another --output"
        ) from None
    try:
        with os.fdopen(fd, "wb") as file:
            file.write(os.fsencode(text))
            os.fchmod(file.fileno(), mode)
            file.flush()
            os.fsync(file.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise OutputFileError(
            f"cannot write {path}: {exc.strerror}; choose another --output"
        ) from None
    return mode


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask
