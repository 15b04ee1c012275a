"""The per-env PID lock of the contract: who builds `DIR/<key>`, and when a holder is dead.

`DIR/<key>.lock` holds the holder's JSON (what users and other hosts read). Checking it and
taking it over happen under a kernel lock on a second file, `DIR/<key>.lock.guard`, so of many
waiters that find the same stale lock exactly one takes it. The guard is held for
milliseconds, never while building.
"""

from __future__ import annotations

import json
import os
import secrets
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from types import TracebackType
from typing import Any

from dbtvenv import procs
from dbtvenv.errors import LockTimeout, VenvDirError
from dbtvenv.redact import redact_all

UNPARSEABLE_GRACE = 10.0
DEFAULT_LEASE = 60.0
POLL_INTERVAL = 1.0


@dataclass(frozen=True)
class Holder:
    pid: int
    create_time: float
    hostname: str
    acquired_at: str
    argv: tuple[str, ...]

    @classmethod
    def parse(cls, raw: bytes) -> Holder | None:
        try:
            data = json.loads(raw)
            return cls(
                pid=int(data["pid"]),
                create_time=float(data["create_time"]),
                hostname=str(data["hostname"]),
                acquired_at=str(data["acquired_at"]),
                argv=tuple(str(a) for a in data["argv"]),
            )
        except (ValueError, TypeError, KeyError):
            return None

    def to_json(self) -> dict[str, Any]:
        return {
            "pid": self.pid,
            "create_time": self.create_time,
            "hostname": self.hostname,
            "acquired_at": self.acquired_at,
            "argv": list(self.argv),
        }

    def describe(self) -> str:
        command = " ".join(self.argv)
        return f"pid {self.pid} on {self.hostname} since {self.acquired_at} ({command})"


@dataclass(frozen=True)
class LockState:
    """What a lock file says right now; `holder` is None when it cannot be parsed."""

    path: Path
    holder: Holder | None
    mtime: float
    stale_reason: str | None

    def describe(self) -> str:
        if self.holder is None:
            return f"an unreadable lock file {self.path}"
        return self.holder.describe()


def lock_lease() -> float:
    from dbtvenv.settings import env_seconds

    return env_seconds("DBTVENV_LOCK_LEASE", DEFAULT_LEASE, minimum=1.0)


def read_lock(path: Path, *, lease: float, now: float | None = None) -> LockState | None:
    """The lock's state, or None when it is free. A symlink is read as itself, never followed."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except FileNotFoundError:
        return None
    except OSError:  # ELOOP: a symlink where the lock should be: treat as unreadable
        try:
            mtime = os.lstat(path).st_mtime
        except FileNotFoundError:
            return None
        holder = None
    else:
        try:
            mtime = os.fstat(fd).st_mtime
            raw = os.read(fd, 1 << 16)
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
        if not procs.pid_exists(holder.pid):
            return f"its holder, pid {holder.pid}, is gone"
        if not procs.is_running(holder.pid, holder.create_time):
            return (
                f"its holder, pid {holder.pid}, is gone (that pid now belongs to another process)"
            )
        return None
    if age > lease:
        return f"its holder on {holder.hostname} has not refreshed it for {age:.0f} s"
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
        self.argv = tuple(redact_all(sys.argv if argv is None else argv))
        self.on_wait = on_wait
        self.poll_interval = poll_interval
        self._me: Holder | None = None
        self._refreshed = 0.0

    @property
    def refresh_interval(self) -> float:
        return self.lease / 4

    def acquire(self) -> None:
        from filelock import FileLock, Timeout

        identity = procs.own_identity()
        deadline = time.monotonic() + self.timeout
        told: Holder | str | None = "nobody"
        while True:
            remaining = deadline - time.monotonic()
            try:
                with FileLock(self.guard_path, timeout=max(remaining, 0.0), mode=0o644):
                    state = read_lock(self.path, lease=self.lease)
                    if state is None or state.stale_reason is not None:
                        if state is not None:
                            self.on_wait(
                                f"taking over the lock {self.path.name}: {state.stale_reason} "
                                f"(was {state.describe()})"
                            )
                        self._write(identity, replace=state is not None)
                        return
            except Timeout:
                state = read_lock(self.path, lease=self.lease)
            except OSError as exc:
                raise VenvDirError(
                    f"cannot take the lock {self.path}: {exc.strerror}; "
                    "make the venv dir writable for this user"
                ) from None
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

    def _write(self, identity: procs.ProcessIdentity, *, replace: bool) -> None:
        me = Holder(
            pid=identity.pid,
            create_time=identity.create_time,
            hostname=identity.hostname,
            acquired_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
            argv=self.argv,
        )
        tmp = self.path.with_name(f".{self.path.name}.{identity.pid}.{secrets.token_hex(4)}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
        try:
            os.write(fd, json.dumps(me.to_json()).encode() + b"\n")
            os.fsync(fd)
        finally:
            os.close(fd)
        try:
            if replace:
                os.replace(tmp, self.path)
            else:
                # link() fails if the file appeared meanwhile, even where the guard is not honoured
                os.link(tmp, self.path)
        finally:
            if not replace:
                os.unlink(tmp)
        self._me = me
        self._refreshed = time.monotonic()

    def is_mine(self) -> bool:
        state = read_lock(self.path, lease=self.lease)
        return (
            self._me is not None
            and state is not None
            and state.holder is not None
            and (state.holder.pid, state.holder.create_time, state.holder.hostname)
            == (self._me.pid, self._me.create_time, self._me.hostname)
        )

    def refresh(self) -> None:
        """Renew the lease: call often; it touches the file at most every lease/4 seconds."""
        if self._me is None or time.monotonic() - self._refreshed < self.refresh_interval:
            return
        self._refreshed = time.monotonic()
        if self.is_mine():
            os.utime(self.path)

    def release(self) -> None:
        if self._me is None:
            return
        from filelock import FileLock

        try:
            with FileLock(self.guard_path, mode=0o644):
                if self.is_mine():
                    os.unlink(self.path)
        except FileNotFoundError:
            pass
        finally:
            self._me = None

    def __enter__(self) -> EnvLock:
        self.acquire()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()
