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
from dbtvenv.settings import LOCK_LEASE_RANGE

UNPARSEABLE_GRACE = 10.0
POLL_INTERVAL = 1.0
# The guard is held for milliseconds: even a caller that will not wait (timeout 0) waits
# this long for it, so that a neighbour's check is not mistaken for a held lock.
GUARD_MIN_WAIT = 1.0
# How long a release waits for the guard before removing its own lock file without it.
RELEASE_GUARD_WAIT = 10.0
GUARD_POLL = 0.05
MAX_LOCK_BYTES = 1 << 16
# The range of a lease (DBTVENV_LOCK_LEASE, and the one a holder records in its lock).
MIN_LEASE, MAX_LEASE = LOCK_LEASE_RANGE
# Far above any pid a kernel hands out (Linux: at most 2**22), far below what psutil chokes on.


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
    lease: float | None = None  # the holder's lease; absent in locks of older releases

    @classmethod
    def parse(cls, raw: bytes) -> Holder | None:
        """The holder a lock file names, or None if it is not a complete, sane lock.

        Anything JSON can hold is taken apart by type, never converted: a pid of `1e400`,
        `true` or `"12"` makes the file unparseable, not a crash.
        """
        try:
            data = json.loads(raw)
        except (ValueError, RecursionError):
            return None
        if not isinstance(data, dict):
            return None
        pid = data.get("pid")
        create_time = data.get("create_time")
        hostname = data.get("hostname")
        acquired_at = data.get("acquired_at")
        argv = data.get("argv")
        lease = data.get("lease")
        if not procs.is_pid(pid):
            return None
        if not (procs.is_finite_number(create_time) and 0 <= create_time < math.inf):
            return None
        if not isinstance(hostname, str) or not hostname or not isinstance(acquired_at, str):
            return None
        if not isinstance(argv, list) or not all(isinstance(a, str) for a in argv):
            return None
        if lease is not None and not (
            procs.is_finite_number(lease) and MIN_LEASE <= lease <= MAX_LEASE
        ):
            return None
        return cls(
            pid=pid,
            create_time=float(create_time),
            hostname=hostname,
            acquired_at=acquired_at,
            argv=tuple(argv),
            lease=None if lease is None else float(lease),
        )

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "pid": self.pid,
            "create_time": self.create_time,
            "hostname": self.hostname,
            "acquired_at": self.acquired_at,
            "argv": list(self.argv),
        }
        if self.lease is not None:
            data["lease"] = self.lease
        return data

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
    unchanged_for: float = 0.0  # how long this process has seen it unchanged (monotonic)
    lease: float = 0.0  # the lease it is judged by: the longer of ours and its holder's
    is_directory: bool = False

    @property
    def other_host(self) -> bool:
        return self.holder is not None and self.holder.hostname != procs.hostname()

    def describe(self) -> str:
        if self.unreadable_by is not None:
            return (
                f"a lock file this user may not read (owned by uid {self.unreadable_by}; "
                "remove it if no build of that user is running)"
            )
        if self.holder is None:
            return "an unparseable lock file"
        return self.holder.describe()


class Watch:
    """What one process has seen of one lock file, timed on its own monotonic clock.

    Another host's holder cannot be looked up; it proves it is alive by changing its lock
    file (its lease renewals set the mtime). A lock this process has seen unchanged for a whole
    lease is stale, whatever its mtime says: clocks that disagree neither wedge nor shorten.
    """

    def __init__(self) -> None:
        self._signature: object = None
        self._since = 0.0

    def unchanged_for(self, signature: object, now: float | None = None) -> float:
        now = time.monotonic() if now is None else now
        if signature != self._signature:
            self._signature = signature
            self._since = now
        return now - self._since


def effective_lease(holder: Holder | None, lease: float) -> float:
    """A waiter never judges a holder by a lease shorter than the one the holder renews by."""
    if holder is not None and holder.lease is not None:
        return max(lease, holder.lease)
    return lease


def read_lock(
    path: Path, *, lease: float, watch: Watch | None = None, now: float | None = None
) -> LockState | None:
    """The lock's state, or None when it is free. A symlink is read as itself, never followed;
    a directory, FIFO or socket in its place is an unparseable lock, and nothing blocks.

    `watch` carries what this process saw of the file at its earlier looks: without one
    (a single look, as `lock status` takes), another host's lock is never stale.

    The modification time comes from the open file (`fstat`), not from `stat` of the path: on
    NFS, opening revalidates the attributes (close-to-open), a bare `stat` may be cached.
    """
    is_directory = False
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY)
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
    except OSError:  # ELOOP (a symlink), ENXIO (a socket): unparseable
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            return None
        holder, raw = None, b""
    else:
        try:
            st = os.fstat(fd)
            is_directory = stat.S_ISDIR(st.st_mode)
            raw = b""
            if stat.S_ISREG(st.st_mode):  # never read from a FIFO or device planted there
                with contextlib.suppress(OSError):
                    raw = os.read(fd, MAX_LOCK_BYTES)
        finally:
            os.close(fd)
        holder = Holder.parse(raw)
    signature = (st.st_dev, st.st_ino, st.st_mode, st.st_mtime_ns, st.st_size, raw)
    unchanged = watch.unchanged_for(signature) if watch is not None else 0.0
    judged_by = effective_lease(holder, lease)
    now = time.time() if now is None else now
    reason = stale_reason(holder, st.st_mtime, lease=lease, now=now, unchanged_for=unchanged)
    return LockState(
        path,
        holder,
        st.st_mtime,
        reason,
        unchanged_for=unchanged,
        lease=judged_by,
        is_directory=is_directory,
    )


def stale_reason(
    holder: Holder | None,
    mtime: float,
    *,
    lease: float,
    now: float,
    unchanged_for: float = 0.0,
) -> str | None:
    """Why the lock may be taken over, or None while its holder may be alive.

    `unchanged_for` is how long the caller has itself seen the file unchanged, on its
    monotonic clock; `now` and `mtime` are wall-clock times, trusted only for this host's
    files and then only to call an unparseable file old.
    """
    if holder is None:
        age = now - mtime
        if age > UNPARSEABLE_GRACE:
            return f"it cannot be parsed and is {age:.0f} s old"
        if unchanged_for >= UNPARSEABLE_GRACE:
            return f"it cannot be parsed and has not changed for {unchanged_for:.0f} s"
        return None
    if holder.hostname == procs.hostname():
        return holder_gone(holder.pid, holder.create_time)
    judged_by = effective_lease(holder, lease)
    if unchanged_for >= judged_by:
        return (
            f"its holder on {_printable(holder.hostname)} has not renewed it for "
            f"{unchanged_for:.0f} s, a whole lease ({judged_by:g} s)"
        )
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
        watch = Watch()
        told: Holder | str | None = "nobody"
        while True:
            remaining = deadline - time.monotonic()
            try:
                with hold_guard(self.guard_path, timeout=max(remaining, GUARD_MIN_WAIT)):
                    state = read_lock(self.path, lease=self.lease, watch=watch)
                    free = state is None or state.stale_reason is not None
                    if free and self._write(identity, stale=state):
                        break
                    if state is None:  # created meanwhile by a process that ignored the guard
                        state = read_lock(self.path, lease=self.lease, watch=watch)
            except GuardTimeout:
                state = read_lock(self.path, lease=self.lease, watch=watch)
            except OSError as exc:
                raise VenvDirError(_cannot_lock(self.path, exc)) from None
            if time.monotonic() >= deadline:
                raise LockTimeout(_timeout_message(self.path, self.timeout, state))
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

    def _write(self, identity: procs.ProcessIdentity, *, stale: LockState | None) -> bool:
        """Put our lock file in place of `stale` (None: of no file): False if another
        process's appeared meanwhile.

        Written whole to a private file, then linked (a new lock: fails if one exists, even
        where the guard is not honoured) or renamed (a takeover) into place, so a reader never
        sees half a lock. A directory in the lock's place is moved aside first.
        """
        me = Holder(
            pid=identity.pid,
            create_time=identity.create_time,
            hostname=identity.hostname,
            acquired_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
            argv=self.argv,
            lease=self.lease,
        )
        replace = stale is not None and not stale.is_directory
        if stale is not None and stale.is_directory:
            _move_aside(self.path)
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
                "process was stopped for longer than its lease (DBTVENV_LOCK_LEASE), or its lock "
                "file was changed by hand; leaving the env to the new holder, try again later"
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


def _timeout_message(path: Path, timeout: float, state: LockState | None) -> str:
    who = state.describe() if state is not None else "another process"
    message = (
        f"gave up after {timeout:g} s waiting for the lock {path}, held by {who}; "
        "try again later, or raise --lock-timeout"
    )
    if state is not None and state.other_host:
        message += (
            f" (another host's lock is taken over once this host has seen it unchanged for "
            f"its lease, {state.lease:g} s; it was unchanged for {state.unchanged_for:.0f} s)"
        )
    return message


def _move_aside(path: Path) -> None:
    """Take a directory in the lock's place out of the way (a stale one, which the guard
    makes ours to take over): renamed as a half-removed env, then deleted. One of a user
    this one does not trust is refused, never deleted."""
    from dbtvenv import store

    try:
        owner = os.lstat(path).st_uid
    except FileNotFoundError:
        return
    if owner not in trust.trusted_uids():
        raise _not_replaceable(path)
    key = path.name[: -len(store.LOCK_SUFFIX)]
    doomed = path.with_name(f".{key}.{os.urandom(4).hex()}.trash")
    try:
        os.rename(path, doomed)
    except PermissionError:
        raise _not_replaceable(path) from None
    store.remove_tree(doomed)


def _cannot_lock(path: Path, exc: OSError) -> str:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        hint = "free some space on its file system"
    elif exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        hint = "make the venv dir writable for this user, or choose another --venv-dir"
    else:
        hint = "check the venv dir and its file system"
    return f"cannot take the lock {path}: {exc.strerror or exc}; {hint}"
