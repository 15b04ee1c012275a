"""Run the env's own `dbt` as a child: signals in, exit status out, no process left behind.

dbt runs in a process group of its own. A signal sent to dbtvenv, or to dbtvenv's whole group
(Airflow kills the task's group), therefore reaches dbt exactly once: from us. At a terminal,
dbt's group becomes the foreground group, so a Ctrl-C goes to dbt straight from the terminal,
once, and dbt can still read the terminal (`dbt init` asks questions); a Ctrl-Z that stops dbt
stops dbtvenv too, so the shell sees the job stopped and can continue it.

dbtvenv is the subreaper of everything dbt starts: a process that leaves dbt's group or outlives
its parent still ends up as our child, and is killed when dbt has exited.
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
from dbtvenv.errors import EX_SIGNAL_BASE, BuildError, Interrupted

FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
# Stops that come from a terminal: dbtvenv follows dbt into them, as its job's shell expects.
TERMINAL_STOPS = (signal.SIGTSTP, signal.SIGTTIN, signal.SIGTTOU)


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
        self.reaped = False  # once dbt is reaped its pid may be reused: never signal it again
        self.pending: list[int] = []
        self.kill_deadline: float | None = None

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        if self.proc is None:
            self.pending.append(signum)
        else:
            self._forward(signum)

    def _forward(self, signum: int) -> None:
        assert self.proc is not None
        if self.reaped:
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.proc.pid, signum)
        if self.kill_deadline is None:
            self.kill_deadline = time.monotonic() + self.kill_grace

    def run(self, argv: list[str], env: dict[str, str]) -> int:
        procs.become_subreaper()
        with signals_routed(self._on_signal) as (wakeup, _):
            if self.pending:  # a signal came while we got ready: dbt is not started at all
                raise Interrupted(self.pending[0])
            try:
                self.proc = _spawn(argv, env)
            except OSError as exc:
                raise BuildError(
                    f"cannot start dbt from the env ({exc.strerror}); "
                    "the env looks broken: run again to rebuild it"
                ) from None
            try:
                with _Terminal.handed_to(self.proc.pid) as terminal:
                    for signum in self.pending:  # came between the check above and the spawn
                        self._forward(signum)
                    self._wait(wakeup, terminal)
            finally:
                returncode = self._clean_up()
        return exit_status(returncode)

    def _wait(self, wakeup: int, terminal: _Terminal | None) -> None:
        """Return once dbt has exited, leaving it unreaped: its pid still names its group."""
        assert self.proc is not None
        pid = self.proc.pid
        while not _has_exited(pid):
            stop = _stop_signal(pid)
            if stop in TERMINAL_STOPS and terminal is not None:
                terminal.follow_stop(stop)
            _reap_adopted(pid)
            timeout = None
            if self.kill_deadline is not None:
                timeout = self.kill_deadline - time.monotonic()
                if timeout <= 0:
                    _kill(pid)
                    self.kill_deadline = None
                    continue
            # Every SIGCHLD and forwarded signal writes to `wakeup`, so none is missed here.
            select.select([wakeup], [], [], timeout)
            drain(wakeup)

    def _clean_up(self) -> int:
        """Whatever happened, leave no process of this run behind; return dbt's status."""
        assert self.proc is not None
        pid = self.proc.pid
        if not _has_exited(pid):  # we are failing: dbt must not outlive us
            _kill(pid)
        procs.kill_group(pid)  # dbt is not reaped yet, so its group id cannot have been reused
        with _held(FORWARDED):
            returncode = self.proc.wait()
            self.reaped = True
        procs.kill_descendants()  # whatever left dbt's group: we adopted it as subreaper
        return returncode


def _spawn(argv: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen(argv, env=env, preexec_fn=procs.child_setup(new_process_group=True))


def _kill(pid: int) -> None:
    """SIGKILL dbt and its group; the rest of its descendants go once it is dead."""
    procs.kill_group(pid)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


def _has_exited(pid: int) -> bool:
    """Whether our child `pid` has exited, without reaping it."""
    return os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None


def _stop_signal(pid: int) -> int | None:
    """The signal that stopped our child `pid` since we last asked, if it was stopped."""
    info = os.waitid(os.P_PID, pid, os.WSTOPPED | os.WNOHANG)
    if info is None or info.si_code != os.CLD_STOPPED:
        return None
    return info.si_status


def _reap_adopted(dbt_pid: int) -> None:
    """Reap orphans that were reparented to us and have ended, but never dbt itself."""
    while True:
        try:
            info = os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        except ChildProcessError:
            return
        if info is None or info.si_pid == dbt_pid:
            return
        with contextlib.suppress(ChildProcessError):
            os.waitpid(info.si_pid, 0)


def drain(fd: int) -> None:
    """Empty the wakeup fd of `signals_routed`."""
    with contextlib.suppress(BlockingIOError):
        while os.read(fd, 512):
            pass


def _ignore(signum: int, frame: FrameType | None) -> None:
    """A handler that does nothing: its signal only wakes the select() through the wakeup fd."""


@contextlib.contextmanager
def signals_routed(
    handler: Callable[[int, FrameType | None], None], *, wake_on_child: bool = True
) -> Iterator[tuple[int, list[int]]]:
    """Route SIGINT, SIGTERM and SIGHUP to `handler`; yield an fd that any of them (and, with
    `wake_on_child`, any SIGCHLD) makes readable, and the ones that were ignored.

    An ignored signal stays ignored (nohup and friends), so dbt inherits it ignored. SIGCHLD
    gets a handler even if it was ignored: with SIGCHLD ignored the kernel reaps children by
    itself and dbt's exit status would be lost.
    """
    read_fd, write_fd = os.pipe()
    os.set_blocking(read_fd, False)
    os.set_blocking(write_fd, False)
    previous_wakeup = signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
    previous: dict[int, Callable[[int, FrameType | None], object] | int | None] = {}
    ignored: list[int] = []
    try:
        if wake_on_child:
            previous[signal.SIGCHLD] = signal.signal(signal.SIGCHLD, _ignore)
        for signum in FORWARDED:
            if signal.getsignal(signum) is signal.SIG_IGN:
                ignored.append(int(signum))
            else:
                previous[signum] = signal.signal(signum, handler)
        yield read_fd, ignored
    finally:
        for routed, old in previous.items():
            signal.signal(routed, signal.SIG_DFL if old is None else old)
        signal.set_wakeup_fd(previous_wakeup)
        os.close(read_fd)
        os.close(write_fd)


@contextlib.contextmanager
def _held(signums: Sequence[int]) -> Iterator[None]:
    """Hold signals back (they are delivered, not lost, at the end)."""
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, signums)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


class _Terminal:
    """Our controlling terminal, whose foreground dbt's group gets while dbt runs, as a shell
    gives it to a job."""

    def __init__(self, fd: int, dbt_pgrp: int) -> None:
        self.fd = fd
        self.own_pgrp = os.getpgrp()
        self.dbt_pgrp = dbt_pgrp

    @classmethod
    @contextlib.contextmanager
    def handed_to(cls, dbt_pgrp: int) -> Iterator[_Terminal | None]:
        """Give dbt the terminal if we are its foreground (not a background job, not cron);
        take it back at the end if dbt still has it."""
        try:
            fd = os.open("/dev/tty", os.O_RDWR | os.O_NOCTTY)
        except OSError:  # no controlling terminal
            yield None
            return
        terminal = cls(fd, dbt_pgrp)
        try:
            terminal._move(terminal.own_pgrp, terminal.dbt_pgrp)
            yield terminal
        finally:
            terminal._move(terminal.dbt_pgrp, terminal.own_pgrp)
            os.close(fd)

    def follow_stop(self, signum: int) -> None:
        """dbt was stopped by the terminal (Ctrl-Z): stop our job too, so the shell sees it
        stopped; once the shell continues us, give dbt the terminal back and continue it.

        In an orphaned process group (no job-control shell above us) the kernel discards the
        stop, and dbt is simply continued.
        """
        self._move(self.dbt_pgrp, self.own_pgrp)
        with contextlib.suppress(OSError):
            os.killpg(self.own_pgrp, signum)  # we stop here until continued
        self._move(self.own_pgrp, self.dbt_pgrp)
        with contextlib.suppress(OSError):
            os.killpg(self.dbt_pgrp, signal.SIGCONT)

    def _move(self, source: int, target: int) -> None:
        """Make `target` the foreground process group, if `source` is it now."""
        with contextlib.suppress(OSError):
            if os.tcgetpgrp(self.fd) != source:
                return
            # Changing the foreground from outside it raises SIGTTOU unless that is ignored.
            previous = signal.signal(signal.SIGTTOU, signal.SIG_IGN)
            try:
                os.tcsetpgrp(self.fd, target)
            finally:
                signal.signal(signal.SIGTTOU, signal.SIG_DFL if previous is None else previous)
