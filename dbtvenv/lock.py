"""The per-env PID lock of the contract: who builds `DIR/<key>`, and when a holder is dead.

`DIR/<key>.lock` holds the holder's JSON (what users and other hosts read). Checking it and
taking it over happen under a kernel lock on a second file, `DIR/<key>.lock.guard`, so of many
waiters that find the same stale lock exactly one takes it. The guard is held for
milliseconds, never while building. While it holds the lock, a holder renews its lease from
a background thread. docs/locking.md describes the whole protocol.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import math
import os
import shlex
import stat
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from datetime import datetime, timezone
from pathlib import Path
from types import TracebackType
from typing import Any, NamedTuple

from dbtvenv import procs, trust
from dbtvenv.errors import LockLost, LockTimeout, VenvDirError
from dbtvenv.redact import redact_all

UNPARSEABLE_GRACE = 10.0
POLL_INTERVAL = 1.0
# The guard is held for milliseconds: even a caller that will not wait (timeout 0) waits
# this long for it, so that a neighbour's check is not mistaken for a held lock.
GUARD_MIN_WAIT = 1.0
# How long a release waits for the guard before removing its own lock file without it.
RELEASE_GUARD_WAIT = 10.0
GUARD_POLL = 0.05
MAX_LOCK_BYTES = 1 << 16


class GuardTimeout(Exception):
    """The guard stayed locked by another process for the whole wait."""


@contextlib.contextmanager
def hold_guard(path: Path, *, timeout: float) -> Iterator[None]:
    """Hold the kernel lock (`flock`) on the guard file `path`, waiting up to `timeout`.

    Opened by dbtvenv itself, never through a planted symbolic link, FIFO or device, nor a
    file of a user it does not trust (`trust.open_regular`); nothing is truncated or
    chmod-ed. A guard removed or replaced while we waited for it is opened again, so two
    processes never hold two different files both called the guard.
    """
    deadline = time.monotonic() + timeout
    while True:
        fd = trust.open_regular(path, what="lock guard", create=True)
        try:
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() >= deadline:
                        raise GuardTimeout(str(path)) from None
                    time.sleep(GUARD_POLL)
            if trust.same_file(fd, path):
                break
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)
    try:
        yield
    finally:
        os.close(fd)  # which releases the flock


class Holder(NamedTuple):
    pid: int
    create_time: float
    hostname: str
    acquired_at: str
    argv: tuple[str, ...]

    @classmethod
    def parse(cls, raw: bytes) -> Holder | None:
        """The holder a lock file names, or None if it is not a complete, sane lock."""
        try:
            data = json.loads(raw)
            if not isinstance(data["argv"], list):
                return None
            holder = cls(
                pid=int(data["pid"]),
                create_time=float(data["create_time"]),
                hostname=str(data["hostname"]),
                acquired_at=str(data["acquired_at"]),
                argv=tuple(str(a) for a in data["argv"]),
            )
        except (ValueError, TypeError, KeyError, IndexError, RecursionError):
            return None
        if holder.pid <= 0 or not math.isfinite(holder.create_time) or not holder.hostname:
            return None
        return holder

    def to_json(self) -> dict[str, Any]:
        return {
            "pid": self.pid,
            "create_time": self.create_time,
            "hostname": self.hostname,
            "acquired_at": self.acquired_at,
            "argv": list(self.argv),
        }

    def same_process(self, other: Holder) -> bool:
        return (self.pid, self.create_time, self.hostname) == (
            other.pid,
            other.create_time,
            other.hostname,
        )

    def describe(self) -> str:
        command = _printable(shlex.join(self.argv))
        return (
            f"pid {self.pid} on {_printable(self.hostname)} "
            f"since {_printable(self.acquired_at)} ({command})"
        )


def _printable(text: str) -> str:
    """Text for a one-line message: control characters (a newline in an argument) escaped."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


class LockState(NamedTuple):
    """What a lock file says right now; `holder` is None when it cannot be parsed or read."""

    path: Path
    holder: Holder | None
    mtime: float
    stale_reason: str | None
    unreadable_by: int | None = None  # the owner's uid, when we may not read the file

    def describe(self) -> str:
        if self.unreadable_by is not None:
            return (
                f"a lock file this user may not read (owned by uid {self.unreadable_by}; "
                "remove it if no build of that user is running)"
            )
        if self.holder is None:
            return "an unparseable lock file"
        return self.holder.describe()


def read_lock(path: Path, *, lease: float, now: float | None = None) -> LockState | None:
    """The lock's state, or None when it is free. A symlink is read as itself, never followed.

    The modification time comes from the open file (`fstat`), not from `stat` of the path: on
    NFS, opening revalidates the attributes (close-to-open), a bare `stat` may be cached.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except FileNotFoundError:
        return None
    except NotADirectoryError:
        raise VenvDirError.not_a_directory(path.parent) from None
    except PermissionError:
        # Another user's lock that we may not read: its holder may well be alive. Never
        # taken over (two builds of one env), only reported.
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise VenvDirError(
                f"cannot reach the lock {path}: {exc.strerror}; check the permissions of the "
                "venv dir, or choose another --venv-dir"
            ) from None
        return LockState(path, None, st.st_mtime, None, unreadable_by=st.st_uid)
    except OSError:  # ELOOP: a symlink where the lock should be: treat as unparseable
        try:
            mtime = os.lstat(path).st_mtime
        except FileNotFoundError:
            return None
        holder = None
    else:
        try:
            st = os.fstat(fd)
            mtime = st.st_mtime
            try:
                # Never read from a FIFO or device planted in the lock's place
                raw = os.read(fd, MAX_LOCK_BYTES) if stat.S_ISREG(st.st_mode) else b""
            except OSError:  # a directory, or worse, where the lock should be
                raw = b""
        finally:
            os.close(fd)
        holder = Holder.parse(raw)
    now = time.time() if now is None else now
    return LockState(path, holder, mtime, stale_reason(holder, mtime, lease=lease, now=now))


def stale_reason(holder: Holder | None, mtime: float, *, lease: float, now: float) -> str | None:
    """Why the lock may be taken over, or None while its holder may be alive."""
    age = now - mtime
    if holder is None:
        if age > UNPARSEABLE_GRACE:
            return f"it cannot be parsed and is {age:.0f} s old"
        return None
    if holder.hostname == procs.hostname():
        return holder_gone(holder.pid, holder.create_time)
    if age > lease:
        return f"its holder on {holder.hostname} has not refreshed it for {age:.0f} s"
    return None


def holder_gone(pid: int, create_time: float) -> str | None:
    """Why the process (pid, create_time) of this host is not running, or None if it may be.

    A process we may not look at (another user's, under a restricted /proc) counts as alive.
    """
    import psutil

    try:
        proc = psutil.Process(pid)
        if proc.status() == psutil.STATUS_ZOMBIE:
            return f"its holder, pid {pid}, is gone"
        started = proc.create_time()
    except psutil.NoSuchProcess:  # ZombieProcess included
        return f"its holder, pid {pid}, is gone"
    except psutil.AccessDenied:
        return None
    if abs(started - create_time) > procs.CREATE_TIME_TOLERANCE:
        return f"its holder, pid {pid}, is gone (that pid now belongs to another process)"
    return None


class EnvLock:
    """Hold `DIR/<key>.lock` while an env is checked, built or removed."""

    def __init__(
        self,
        path: Path,
        *,
        timeout: float,
        lease: float,
        argv: Sequence[str] | None = None,
        on_wait: Callable[[str], None] = lambda message: None,
        poll_interval: float = POLL_INTERVAL,
    ) -> None:
        self.path = path
        self.guard_path = path.with_name(path.name + ".guard")
        self.timeout = timeout
        self.lease = lease
        # Named as users type it, whatever path or `-m` started us.
        command = ["dbtvenv", *sys.argv[1:]] if argv is None else list(argv)
        self.argv = tuple(redact_all(command))
        self.on_wait = on_wait
        self.poll_interval = poll_interval
        self._me: Holder | None = None
        self._lost: str | None = None
        self._stop = threading.Event()
        self._refresher: threading.Thread | None = None

    @property
    def refresh_interval(self) -> float:
        """How often the holder touches its lock: no gap between two touches exceeds lease/4."""
        return self.lease / 8

    def acquire(self) -> None:
        identity = procs.own_identity()
        deadline = time.monotonic() + self.timeout
        told: Holder | str | None = "nobody"
        while True:
            remaining = deadline - time.monotonic()
            try:
                with hold_guard(self.guard_path, timeout=max(remaining, GUARD_MIN_WAIT)):
                    state = read_lock(self.path, lease=self.lease)
                    free = state is None or state.stale_reason is not None
                    if free and self._write(identity, replace=state is not None):
                        break
                    if state is None:  # created meanwhile by a process that ignored the guard
                        state = read_lock(self.path, lease=self.lease)
            except GuardTimeout:
                state = read_lock(self.path, lease=self.lease)
            except OSError as exc:
                raise VenvDirError(_cannot_lock(self.path, exc)) from None
            if time.monotonic() >= deadline:
                who = state.describe() if state is not None else "another process"
                raise LockTimeout(
                    f"gave up after {self.timeout:g} s waiting for the lock {self.path}, "
                    f"held by {who}; try again later, or raise --lock-timeout"
                )
            holder = state.holder if state is not None else None
            if holder != told:
                told = holder
                who = state.describe() if state is not None else "another process"
                self.on_wait(f"waiting for the lock {self.path.name}, held by {who}")
            time.sleep(min(self.poll_interval, max(deadline - time.monotonic(), 0.0)))
        self._start_refresher()
        if state is not None:
            self.on_wait(
                f"taking over the lock {self.path.name}: {state.stale_reason} "
                f"(was {state.describe()})"
            )

    def _write(self, identity: procs.ProcessIdentity, *, replace: bool) -> bool:
        """Put our lock file in place: False if another process's appeared meanwhile.

        Written whole to a private file, then linked (a new lock: fails if one exists, even
        where the guard is not honoured) or renamed (a takeover) into place, so a reader never
        sees half a lock.
        """
        me = Holder(
            pid=identity.pid,
            create_time=identity.create_time,
            hostname=identity.hostname,
            acquired_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
            argv=self.argv,
        )
        tmp = self.path.with_name(f".{self.path.name}.{identity.pid}.{os.urandom(4).hex()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
        try:
            try:
                os.write(fd, json.dumps(me.to_json()).encode() + b"\n")
                os.fsync(fd)
            finally:
                os.close(fd)
            # Before the file is in place: a signal right after it still lets release() remove
            # it; release() only ever removes a file that names us.
            self._me = me
            if replace:
                try:
                    os.replace(tmp, self.path)
                except PermissionError:  # another user's lock, in a sticky dir
                    self._me = None
                    raise _not_replaceable(self.path) from None
            else:
                try:
                    os.link(tmp, self.path)
                except FileExistsError:
                    self._me = None
                    return False
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
        self._lost = None
        return True

    def _verify(self, *, touch: bool) -> str | None:
        """None while the lock file still names us (`touch` renews the lease), else what it is.

        Raises OSError for a passing failure of the file system (the caller tries again).
        """
        me = self._me
        if me is None:
            return None
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        except FileNotFoundError:
            return "its lock file was removed"
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                return "its lock file was replaced by a symbolic link"
            raise
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                return "its lock file was replaced by something that is not a file"
            holder = Holder.parse(os.read(fd, MAX_LOCK_BYTES))
            if holder is None:
                return "its lock file was replaced by an unparseable one"
            if not holder.same_process(me):
                return f"it now names {holder.describe()}"
            if touch:
                os.utime(fd)
        finally:
            os.close(fd)
        return None

    def check(self) -> None:
        """Raise LockLost if another process has taken this lock over; call it while building.

        A holder stopped (or its host cut off) for longer than the lease may be taken for
        dead by a waiter on another host; from then on the env is that process's to build.
        """
        if self._me is None:
            return
        if self._lost is None:
            with contextlib.suppress(OSError):
                self._lost = self._verify(touch=False)
        if self._lost is not None:
            raise LockLost(
                f"lost the lock {self.path} while building the env: {self._lost}; this "
                "process was stopped for longer than DBTVENV_LOCK_LEASE, or the hosts' clocks "
                "disagree by more than that; leaving the env to the new holder, try again later"
            )

    def _start_refresher(self) -> None:
        self._stop = threading.Event()
        self._refresher = threading.Thread(
            target=self._keep_fresh,
            args=(self._stop,),
            name=f"lease {self.path.name}",
            daemon=True,
        )
        self._refresher.start()

    def _keep_fresh(self, stop: threading.Event) -> None:
        while not stop.wait(self.refresh_interval):
            try:
                lost = self._verify(touch=True)
            except OSError:
                continue  # a passing failure of the file system: the next round tries again
            if lost is not None:
                self._lost = lost
                return

    def _stop_refresher(self) -> None:
        self._stop.set()
        if self._refresher is not None:
            self._refresher.join(timeout=5)
            self._refresher = None

    def release(self) -> None:
        """Remove the lock file if it still names us; never someone else's."""
        if self._me is None:
            return
        try:
            self._stop_refresher()
            try:
                with hold_guard(self.guard_path, timeout=RELEASE_GUARD_WAIT):
                    self._unlink_if_mine()
            except (GuardTimeout, trust.Untrusted):
                self._unlink_if_mine()  # the guard is stuck: ours to remove all the same
        except OSError:
            with contextlib.suppress(OSError):
                self._unlink_if_mine()
        except BaseException:  # interrupted by a signal: still leave no lock of ours behind
            with contextlib.suppress(OSError):
                self._unlink_if_mine()
            raise
        finally:
            self._me = None

    def _unlink_if_mine(self) -> None:
        if self._verify(touch=False) is None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)

    def __enter__(self) -> EnvLock:
        try:
            self.acquire()
        except BaseException:
            self.release()  # a signal may have come right after our file was in place
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()


def _not_replaceable(path: Path) -> trust.Untrusted:
    try:
        owner = trust.describe_owner(os.lstat(path).st_uid)
    except OSError:
        owner = "another user"
    return trust.Untrusted(
        f"the lock {path} is stale but belongs to {owner}, and this user may not replace it "
        "(the venv dir is sticky); ask its owner or root to remove it, or choose another "
        "--venv-dir"
    )


def _cannot_lock(path: Path, exc: OSError) -> str:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        hint = "free some space on its file system"
    elif exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        hint = "make the venv dir writable for this user, or choose another --venv-dir"
    else:
        hint = "check the venv dir and its file system"
    return f"cannot take the lock {path}: {exc.strerror or exc}; {hint}"
