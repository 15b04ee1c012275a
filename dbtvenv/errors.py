"""Every error a user can cause, one type per exit status of the contract."""

from __future__ import annotations

from collections.abc import Sequence

# Exit statuses (sysexits.h names), never bare integers in command code.
EX_NOT_FOUND = 1
EX_USAGE = 64
EX_UNAVAILABLE = 69
EX_SOFTWARE = 70
EX_CANTCREAT = 73
EX_IOERR = 74
EX_TEMPFAIL = 75
EX_SIGNAL_BASE = 128


class DbtvenvError(Exception):
    """An error with a one-line message for the user and the exit status it ends in.

    `details` are extra lines shown after the message, such as the last lines of pip's output.
    """

    exit_code = EX_SOFTWARE

    def __init__(self, message: str, details: Sequence[str] = ()) -> None:
        super().__init__(message)
        self.message = message
        self.details = tuple(details)


class UsageError(DbtvenvError):
    exit_code = EX_USAGE


class BuildError(DbtvenvError):
    """The env could not be built: pip failed, no such distribution, no `dbt` in the env."""

    exit_code = EX_UNAVAILABLE


class VenvDirError(DbtvenvError):
    """The venv dir cannot be created or written, or is not a directory."""

    exit_code = EX_CANTCREAT

    @classmethod
    def not_a_directory(cls, venv_dir: object) -> VenvDirError:
        return cls(f"venv dir {venv_dir} exists and is not a directory; choose another --venv-dir")


class OutputFileError(DbtvenvError):
    """A file dbtvenv was asked to write (`dbtvenv shim --output PATH`) cannot be written."""

    exit_code = EX_CANTCREAT


class OutputError(DbtvenvError):
    """dbtvenv's own output (stdout, or its messages on stderr) could not be written."""

    exit_code = EX_IOERR
    stream = "stdout"

    @classmethod
    def writing(cls, stream: str, exc: OSError) -> OutputError:
        error = cls(
            f"cannot write to {stream}: {exc.strerror or exc}; free space on the file system "
            f"{stream} goes to, or send it elsewhere"
        )
        error.stream = stream
        return error


class EnvBusy(DbtvenvError):
    """Something another process does right now is in the way: try again later."""

    exit_code = EX_TEMPFAIL


class LockTimeout(EnvBusy):
    pass


class LockLost(EnvBusy):
    """Another process took over the lock of an env this one was building.

    The half-built env is theirs now: it must not be removed or marked complete by us.
    """

    exit_code = EX_TEMPFAIL


class EnvNotFound(DbtvenvError):
    exit_code = EX_NOT_FOUND


class Interrupted(DbtvenvError):
    """dbtvenv itself received a termination signal before dbt started."""

    def __init__(self, signum: int) -> None:
        import signal

        name = signal.Signals(signum).name
        super().__init__(f"interrupted by {name} before dbt started")
        self.signum = signum
        self.exit_code = EX_SIGNAL_BASE + signum
