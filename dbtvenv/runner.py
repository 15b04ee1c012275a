"""Run the env's own `dbt` as a child: signals in, exit status out, no process left behind.

dbt runs in a process group of its own. A signal sent to dbtvenv, or to dbtvenv's whole group
(Airflow kills the task's group), therefore reaches dbt exactly once: from us. At a terminal,
dbt's group becomes the foreground group, so a Ctrl-C goes to dbt straight from the terminal,
once, and dbt can still read the terminal (`dbt init` asks questions).
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import subprocess
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from types import FrameType

from dbtvenv import procs
from dbtvenv.errors import EX_SIGNAL_BASE, BuildError

FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def dbt_environment(env_dir: Path) -> dict[str, str]:
    bin_dir = str(env_dir / "bin")
    path = os.environ.get("PATH", "")
    return procs.child_environment(
        remove=("PYTHONPATH", "PYTHONHOME"),
        VIRTUAL_ENV=str(env_dir),
        PATH=f"{bin_dir}{os.pathsep}{path}" if path else bin_dir,
    )


def exit_status(returncode: int) -> int:
    return EX_SIGNAL_BASE - returncode if returncode < 0 else returncode


def run_dbt(env_dir: Path, dbt_args: Sequence[str], *, kill_grace: float) -> int:
    """Run `dbt ARGS` from the env and return the status dbtvenv should exit with."""
    executable = env_dir / "bin" / "dbt"
    return _Supervisor(kill_grace).run([str(executable), *dbt_args], dbt_environment(env_dir))


class _Supervisor:
    def __init__(self, kill_grace: float) -> None:
        self.kill_grace = kill_grace
        self.proc: subprocess.Popen[bytes] | None = None
        self.pending: list[int] = []
        self.kill_deadline: float | None = None

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        if self.proc is None:
            self.pending.append(signum)
            return
        self._forward(signum)

    def _forward(self, signum: int) -> None:
        assert self.proc is not None
        if self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.proc.pid, signum)
        if self.kill_deadline is None:
            self.kill_deadline = time.monotonic() + self.kill_grace

    def run(self, argv: list[str], env: dict[str, str]) -> int:
        procs.become_subreaper()
        with _forwarding(self._on_signal) as wakeup:
            try:
                self.proc = _spawn(argv, env)
            except OSError as exc:
                raise BuildError(
                    f"cannot start dbt from the env ({exc.strerror}); "
                    "the env looks broken: run again to rebuild it"
                ) from None
            try:
                with _terminal_foreground(self.proc.pid):
                    for signum in self.pending:
                        self._forward(signum)
                    return exit_status(self._wait(wakeup))
            finally:
                self._clean_up()

    def _wait(self, wakeup: int) -> int:
        assert self.proc is not None
        proc = self.proc
        pidfd = _pidfd(proc.pid)
        try:
            while True:
                returncode = proc.poll()
                if returncode is not None:
                    return returncode
                timeout = None
                if self.kill_deadline is not None:
                    timeout = max(self.kill_deadline - time.monotonic(), 0.0)
                    if timeout == 0.0:
                        _kill_tree(proc.pid)
                        self.kill_deadline = None
                        continue
                if pidfd is None:
                    timeout = 0.05 if timeout is None else min(timeout, 0.05)
                    select.select([wakeup], [], [], timeout)
                else:
                    select.select([pidfd, wakeup], [], [], timeout)
                _drain(wakeup)
        finally:
            if pidfd is not None:
                os.close(pidfd)

    def _clean_up(self) -> None:
        """Whatever happened, leave no process of this run behind."""
        assert self.proc is not None
        if self.proc.poll() is None:
            _kill_tree(self.proc.pid)
            self.proc.wait()
        else:
            procs.kill_group(self.proc.pid)
        if _have_children():
            procs.kill_descendants()


def _spawn(argv: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(argv, env=env, preexec_fn=procs.child_setup(new_process_group=True))
    with contextlib.suppress(OSError):  # the child did it too; whoever is first wins the race
        os.setpgid(proc.pid, proc.pid)
    return proc


def _kill_tree(pid: int) -> None:
    procs.kill_group(pid)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    procs.kill_descendants()


def _have_children() -> bool:
    """Whether any child still runs (reaping the zombies met on the way)."""
    while True:
        try:
            if os.waitpid(-1, os.WNOHANG) == (0, 0):
                return True
        except ChildProcessError:
            return False


def _pidfd(pid: int) -> int | None:
    try:
        return os.pidfd_open(pid)
    except (AttributeError, OSError):
        return None


def _drain(fd: int) -> None:
    with contextlib.suppress(BlockingIOError):
        while os.read(fd, 512):
            pass


@contextlib.contextmanager
def _forwarding(handler: Callable[[int, FrameType | None], None]) -> Iterator[int]:
    """Route SIGINT, SIGTERM and SIGHUP to `handler`, and wake a select() when one arrives."""
    read_fd, write_fd = os.pipe()
    os.set_blocking(read_fd, False)
    os.set_blocking(write_fd, False)
    previous_wakeup = signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
    previous = {}
    try:
        for signum in FORWARDED:
            if signal.getsignal(signum) is signal.SIG_IGN:
                continue  # nohup and friends: an ignored signal stays ignored
            previous[signum] = signal.signal(signum, handler)
        yield read_fd
    finally:
        for signum, old in previous.items():
            signal.signal(signum, old)
        signal.set_wakeup_fd(previous_wakeup)
        os.close(read_fd)
        os.close(write_fd)


@contextlib.contextmanager
def _terminal_foreground(pgid: int) -> Iterator[None]:
    """Hand the controlling terminal's foreground to dbt's group while it runs, like a shell."""
    tty = _foreground_tty()
    if tty is None:
        yield
        return
    own = os.getpgrp()
    try:
        with _sigttou_ignored():
            os.tcsetpgrp(tty, pgid)
    except OSError:
        os.close(tty)
        yield
        return
    try:
        yield
    finally:
        with _sigttou_ignored(), contextlib.suppress(OSError):
            os.tcsetpgrp(tty, own)
        os.close(tty)


def _foreground_tty() -> int | None:
    """Our terminal, if we are its foreground group (not a background job, not cron)."""
    for stream_fd in (0, 1, 2):
        if os.isatty(stream_fd):
            try:
                if os.tcgetpgrp(stream_fd) == os.getpgrp():
                    return os.dup(stream_fd)
            except OSError:
                return None
            return None
    return None


@contextlib.contextmanager
def _sigttou_ignored() -> Iterator[None]:
    old = signal.signal(signal.SIGTTOU, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGTTOU, old)
