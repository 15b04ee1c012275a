"""The entry point and error boundary: every outcome becomes one exit status, never a traceback.

A plain dbt command line goes straight to the core (`options.parse_dbt_invocation`); every
other one, and any dbt command line it is not sure of, goes through Click (`cli.py`). Click is
not imported on the first path: starting dbt in a complete env is what schedulers do hundreds
of times an hour.
"""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import sys
from collections.abc import Sequence
from types import FrameType

from dbtvenv.errors import EX_SIGNAL_BASE, EX_SOFTWARE, DbtvenvError, Interrupted, OutputError
from dbtvenv.options import parse_dbt_invocation
from dbtvenv.redact import redact


def _raise_interrupted(signum: int, frame: FrameType | None) -> None:
    raise Interrupted(signum)


def main(argv: Sequence[str] | None = None) -> int:
    for signum in (signal.SIGTERM, signal.SIGHUP):
        if signal.getsignal(signum) is not signal.SIG_IGN:
            signal.signal(signum, _raise_interrupted)
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        status = _dispatch(args)
        _flush_stdout()
        return status
    except DbtvenvError as exc:
        if isinstance(exc, OutputError) and exc.stream == "stdout":
            _silence_stdout()
        _error(exc.message, exc.details)
        return exc.exit_code
    except KeyboardInterrupt:
        _error("interrupted before dbt started")
        return EX_SIGNAL_BASE + signal.SIGINT
    except BrokenPipeError:
        # Whoever read our stdout has gone (`dbtvenv env list | head -1`): exit as a program
        # killed by SIGPIPE would, without a second error when Python flushes stdout at exit.
        _silence_stdout()
        return EX_SIGNAL_BASE + signal.SIGPIPE
    except OSError as exc:
        # Click's own output (--help, --version, completions) into a full disk, say.
        if _stdout_failing() or (exc.errno in _WRITE_ERRORS and exc.filename is None):
            _silence_stdout()
            error = OutputError.writing("stdout", exc)
            _error(error.message)
            return error.exit_code
        return _internal_error(exc)
    except Exception as exc:
        return _internal_error(exc)


def _internal_error(exc: Exception) -> int:
    """A bug: one line for the user, the traceback only on request."""
    if os.environ.get("DBTVENV_DEBUG", "") not in ("", "0"):
        import traceback

        traceback.print_exception(type(exc), exc, exc.__traceback__)
    _error(
        f"internal error: {type(exc).__name__}: {exc}; set DBTVENV_DEBUG=1 for the traceback "
        "and please report it"
    )
    return EX_SOFTWARE


# What writing a stream into a full or failing file system raises (a file name would say
# the error came from a file dbtvenv opened itself).
_WRITE_ERRORS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EIO})


def _flush_stdout() -> None:
    if sys.stdout is None:
        return
    try:
        sys.stdout.flush()
    except BrokenPipeError:
        raise
    except OSError as exc:
        raise OutputError.writing("stdout", exc) from None


def _stdout_failing() -> bool:
    """Whether stdout still holds output it could not write."""
    try:
        _flush_stdout()
    except (OSError, OutputError):
        return True
    return False


def _silence_stdout() -> None:
    """Drop what stdout could not take, so that Python's own flush at exit says nothing."""
    if sys.stdout is None:
        return
    with contextlib.suppress(OSError, ValueError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)


def _dispatch(args: list[str]) -> int:
    parsed = parse_dbt_invocation(args, os.environ)
    if parsed is not None:
        from dbtvenv import commands

        params, dbt_args = parsed
        return commands.run_dbt(commands.EnvOptions(**params), dbt_args)  # type: ignore[arg-type]
    from dbtvenv import cli

    return cli.run(args)


def _error(message: str, details: Sequence[str] = ()) -> None:
    """The one `dbtvenv: error:` line (and pip's or uv's last lines), credentials hidden.

    Where stderr cannot be written (its reader has gone too), the exit status still tells.
    """
    from dbtvenv.commands import echo_error

    with contextlib.suppress(OSError, ValueError):
        echo_error(redact(message), [redact(line) for line in details])
