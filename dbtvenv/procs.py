"""Process identity and the one place that starts child processes."""

from __future__ import annotations

import contextlib
import ctypes
import math
import os
import select
import signal
import subprocess
import sys
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, NamedTuple

if TYPE_CHECKING:
    from typing import TypeGuard  # Python 3.10+; only ever read by the type checker

PR_SET_PDEATHSIG = 1
PR_SET_CHILD_SUBREAPER = 36
# Two create times of one process as psutil reports them may differ by rounding; a reused PID
# is a process started later, far more than this.
CREATE_TIME_TOLERANCE = 1.0

MAX_PID = 2**31 - 1

_libc: ctypes.CDLL | None = None


def _load_libc() -> ctypes.CDLL | None:
    global _libc
    if _libc is None and sys.platform.startswith("linux"):
        _libc = ctypes.CDLL(None, use_errno=True)
    return _libc


def _prctl(option: int, value: int) -> bool:
    libc = _load_libc()
    return libc is not None and int(libc.prctl(option, value, 0, 0, 0)) == 0


def become_subreaper() -> None:
    """Orphaned descendants get reparented to us, so none can escape the final clean-up."""
    _prctl(PR_SET_CHILD_SUBREAPER, 1)


def is_pid(value: object) -> TypeGuard[int]:
    """A pid as a JSON file may name one: an int (not a bool) in the kernel's range."""
    return isinstance(value, int) and not isinstance(value, bool) and 0 < value <= MAX_PID


def is_finite_number(value: object) -> TypeGuard[float]:
    """A finite JSON number (`NaN` and `Infinity` are what Python's json also reads)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:  # an int too large for a float
        return False


class ProcessIdentity(NamedTuple):
    pid: int
    create_time: float
    hostname: str


def hostname() -> str:
    import socket

    return socket.gethostname()


def own_identity() -> ProcessIdentity:
    import psutil

    pid = os.getpid()
    return ProcessIdentity(pid, psutil.Process(pid).create_time(), hostname())


def is_running(pid: int, create_time: float) -> bool:
    """Whether that very process (not a later one with a reused PID) still runs on this host."""
    import psutil

    try:
        proc = psutil.Process(pid)
        if proc.status() == psutil.STATUS_ZOMBIE:
            return False
        return abs(proc.create_time() - create_time) <= CREATE_TIME_TOLERANCE
    except (psutil.NoSuchProcess, psutil.AccessDenied, ValueError):
        return False


def pid_exists(pid: int) -> bool:
    import psutil

    return bool(psutil.pid_exists(pid))


def child_setup(*, new_process_group: bool, interruptible: bool = False) -> Callable[[], None]:
    """What a child does between fork and exec: die with us, and optionally lead its own group.

    The parent-death signal makes a SIGKILLed dbtvenv take its children along, so no pip keeps
    writing into a half-built env and no dbt runs on as an orphan. An `interruptible` child
    gets SIGINT back even if we were started with it ignored, so that we can stop it politely.
    """
    parent = os.getpid()
    libc = _load_libc()
    # Looked up before fork, so that the child does as little as it can before exec: another
    # thread (the lock's refresher) may have held a lock at the moment of the fork.
    prctl = libc.prctl if libc is not None else None

    def setup() -> None:
        if new_process_group:
            os.setpgid(0, 0)
        if interruptible:
            signal.signal(signal.SIGINT, signal.SIG_DFL)
        if prctl is not None:
            prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if os.getppid() != parent:  # the parent died before the signal was armed
            os._exit(128 + signal.SIGKILL)

    return setup


def child_environment(remove: Sequence[str] = (), **updates: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in remove}
    env.update(updates)
    return env


class Captured(NamedTuple):
    returncode: int
    tail: tuple[str, ...]


def run_captured(
    argv: Sequence[str],
    *,
    env: Mapping[str, str],
    on_line: Callable[[str], None] = lambda line: None,
    on_tick: Callable[[], None] = lambda: None,
    tick: float = 1.0,
    tail_lines: int = 30,
) -> Captured:
    """Run a helper (venv, pip, uv) with its output merged and read line by line.

    `on_tick` runs at least every `tick` seconds while the child lives (a lock holder refreshes
    its lease there). On any exception (a signal, say) the child's whole process group is
    stopped first, see `_stop_child`.
    """
    tail: deque[str] = deque(maxlen=tail_lines)
    keep_exit_statuses()
    proc = subprocess.Popen(
        list(argv),
        env=dict(env),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        preexec_fn=child_setup(new_process_group=True, interruptible=True),
    )
    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    pending = b""
    try:
        while True:
            ready, _, _ = select.select([fd], [], [], tick)
            on_tick()
            if not ready:
                continue
            chunk = os.read(fd, 65536)
            if not chunk:
                break
            pending += chunk
            *lines, pending = pending.split(b"\n")
            for raw in lines:
                line = raw.decode("utf-8", "replace").rstrip("\r")
                tail.append(line)
                on_line(line)
        if pending:
            line = pending.decode("utf-8", "replace")
            tail.append(line)
            on_line(line)
        while True:
            try:
                returncode = proc.wait(timeout=tick)
                break
            except subprocess.TimeoutExpired:
                on_tick()
    except BaseException:
        _stop_child(proc)
        raise
    finally:
        proc.stdout.close()
    return Captured(returncode, tuple(tail))


STOP_GRACE = 3.0
_TERMINATING = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def _stop_child(proc: subprocess.Popen[bytes]) -> None:
    """Interrupt an installer's group as a Ctrl-C would, so pip removes its temp files; SIGKILL
    whatever of it is left after a moment.

    Further termination signals wait until it is gone: a second Ctrl-C cannot leave it running.
    """
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, _TERMINATING)
    try:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGINT)
        deadline = time.monotonic() + STOP_GRACE
        # Not reaped yet, so its pid still names its group for the kill below.
        while os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is None:
            if time.monotonic() >= deadline:
                break
            time.sleep(0.02)
        kill_group(proc.pid)
        proc.wait()
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def kill_group(pgid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)


def kill_descendants(timeout: float = 10.0) -> None:
    """SIGKILL every process below us and reap them.

    Meant for a subreaper: a descendant whose parent dies becomes our child, so once we have
    no child left, no descendant is left. One that forks while we kill is found on the next
    round; after `timeout` seconds we give up rather than hang.
    """
    if not _has_children():
        return  # the usual case, found without loading psutil: nothing is left below us
    import psutil

    me = psutil.Process()
    deadline = time.monotonic() + timeout
    while True:
        for proc in me.children(recursive=True):
            with contextlib.suppress(psutil.Error):
                proc.kill()
        while True:
            try:
                pid, _ = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return  # no child, so no descendant
            if pid == 0:
                break
        if time.monotonic() >= deadline:
            return
        time.sleep(0.01)


def _has_children() -> bool:
    """Whether any child is left, reaping those that have already exited."""
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return False
        if pid == 0:
            return True


def keep_exit_statuses() -> None:
    """Undo an inherited `SIGCHLD` ignore: with it the kernel reaps our children at once and a
    failed child's status reads as 0."""
    if signal.getsignal(signal.SIGCHLD) is signal.SIG_IGN:
        with contextlib.suppress(ValueError):  # not the main thread: nothing we can do there
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)
