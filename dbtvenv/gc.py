"""`env gc`: remove what no run needs any more, never an env in use or a live builder's work."""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import shutil
import stat
import time
from pathlib import Path
from typing import NamedTuple

from dbtvenv import provision, store, trust
from dbtvenv.errors import DbtvenvError, LockTimeout
from dbtvenv.lock import EnvLock, read_lock
from dbtvenv.progress import Reporter
from dbtvenv.settings import lock_lease

# A writer's temporary file this old belongs to a writer that died.
ORPHAN_TMP_AGE = 3600.0


class Collected(NamedTuple):
    """One thing gc removed (or, in a dry run, would remove)."""

    path: Path
    size: int
    why: str


def collect(
    root: Path | None, *, cutoff: float, dry_run: bool, reporter: Reporter
) -> list[Collected]:
    """Remove, from `root` and the system temp dir, what no run needs; return what it was.

    An env counts as unused when its last use is before `cutoff` (a Unix time).
    """
    found: list[Collected] = []
    if root is not None and root.exists():  # a file there is an error, raised by env_keys
        provision.check_cache_root(root)
        found += _envs(root, cutoff, dry_run, reporter)
        found += _stale_locks(root, dry_run, reporter)
        found += _leftovers(root, dry_run)
        if not dry_run:
            _remove_unused_guards(root)
    found += _temporary_envs(dry_run)
    return found


def _envs(root: Path, cutoff: float, dry_run: bool, reporter: Reporter) -> list[Collected]:
    found = []
    for key in store.env_keys(root):
        try:
            found += _env(root, key, cutoff, dry_run, reporter)
        except DbtvenvError as exc:  # one damaged entry must not stop the rest, nor the report
            reporter.info(f"keeping env {key}: {exc.message}")
    return found


def _env(root: Path, key: str, cutoff: float, dry_run: bool, reporter: Reporter) -> list[Collected]:
    env_dir = root / key
    try:
        st = os.lstat(env_dir)
    except FileNotFoundError:
        return []
    if stat.S_ISLNK(st.st_mode):  # no env, whoever made it: the link goes, not its target
        if not dry_run and not _remove_locked(root, key, 0.0, reporter):
            return []
        return [Collected(env_dir, 0, "a symbolic link in an env's place (not followed)")]
    if st.st_uid not in trust.trusted_uids():
        owner = trust.describe_owner(st.st_uid)
        reporter.info(f"keeping {env_dir}: it is {owner}'s, whom this user does not trust")
        return []
    entry = store.describe_env(root, key, with_size=False)
    if entry.complete:
        if (entry.last_used or 0.0) >= cutoff:
            return []
        why = f"not used since {store.iso(entry.last_used)}"
    else:
        state = read_lock(provision.lock_path(root, key), lease=lock_lease())
        if state is not None and state.stale_reason is None:
            return []  # a live builder is working on it (or another host's, unjudged)
        why = "incomplete (its build was interrupted), no live builder"
    if entry.in_use:
        reporter.info(f"keeping env {key}: dbt is running in it")
        return []
    size = store.dir_size(env_dir)
    if not dry_run and not _remove_locked(root, key, cutoff, reporter):
        return []
    return [Collected(env_dir, size, why)]


def _remove_locked(root: Path, key: str, cutoff: float, reporter: Reporter) -> bool:
    """Remove one env under its lock, unless somebody uses or builds it right now.

    Checked again under the lock: a build may have finished, or a run started, since the scan.
    """
    lock = EnvLock(
        provision.lock_path(root, key), timeout=0, lease=lock_lease(), on_wait=reporter.info
    )
    try:
        with lock:
            entry = store.describe_env(root, key, with_size=False)
            if entry.complete and (entry.last_used or 0.0) >= cutoff:
                reporter.info(f"keeping env {key}: it was built or used just now")
                return False
            store.remove_env(root / key)
        from dbtvenv.warm import stop_warm

        for warm in stop_warm(root / key):
            reporter.info(f"stopped warm process {warm.pid} of env {key}")
    except LockTimeout:
        reporter.info(f"keeping env {key}: another process holds its lock")
        return False
    except store.EnvInUse:
        reporter.info(f"keeping env {key}: dbt is running in it")
        return False
    except trust.Untrusted as exc:
        reporter.info(f"keeping env {key}: {exc.message}")
        return False
    except OSError as exc:
        reporter.info(f"keeping env {key}: cannot remove it ({exc.strerror or exc})")
        return False
    return True


def _stale_locks(root: Path, dry_run: bool, reporter: Reporter) -> list[Collected]:
    """Stale locks of dbtvenv's own: `<key>.lock` files that parse as a lock, nothing else.

    Each is judged by one look, so another host's lock is never stale here (only a waiter that
    watches it for a whole lease can tell): it is kept, and named.
    """
    found = []
    for path in _own_entries(root, store.LOCK_NAME):
        try:
            state = read_lock(path, lease=lock_lease())
            if state is None or state.holder is None:
                continue
            if state.stale_reason is None:
                if state.other_host:
                    reporter.info(
                        f"keeping lock {path.name}: held by {state.describe()}, another host; "
                        "a waiter takes it over once it has seen it unchanged for "
                        f"{state.lease:g} s"
                    )
                continue
            size = _file_size(path)
            if not dry_run:
                # Taking a stale lock over and releasing it removes it, race-free.
                EnvLock(path, timeout=0, lease=lock_lease()).__enter__().release()
        except LockTimeout:
            continue  # a live process took it over meanwhile
        except DbtvenvError as exc:
            reporter.info(f"keeping lock {path.name}: {exc.message}")
            continue
        found.append(Collected(path, size, f"stale lock: {state.stale_reason}"))
    return found


def _leftovers(root: Path, dry_run: bool) -> list[Collected]:
    """What removals and writers that were cut short left: dbtvenv's own names only."""
    found = []
    for path in _own_entries(root, store.TRASH_NAME):
        with contextlib.suppress(OSError):
            if stat.S_ISDIR(os.lstat(path).st_mode):
                found.append(Collected(path, store.dir_size(path), "half-removed env"))
                if not dry_run:
                    store.remove_tree(path)
    now = time.time()
    for path in _own_entries(root, store.TEMP_NAME):
        with contextlib.suppress(OSError):
            st = os.lstat(path)
            if stat.S_ISREG(st.st_mode) and now - st.st_mtime > ORPHAN_TMP_AGE:
                found.append(Collected(path, _file_size(path), "temporary file of a dead writer"))
                if not dry_run:
                    os.unlink(path)
    return found


def _own_entries(root: Path, pattern: re.Pattern[str]) -> list[Path]:
    """Entries of `root` named as dbtvenv names them and owned by a user this one trusts."""
    found = []
    with os.scandir(root) as entries:
        for entry in entries:
            if not pattern.match(entry.name):
                continue
            with contextlib.suppress(OSError):
                if entry.stat(follow_symlinks=False).st_uid in trust.trusted_uids():
                    found.append(Path(entry.path))
    return sorted(found)


def _remove_unused_guards(root: Path) -> None:
    """Remove the guard files of keys with neither an env nor a lock (a failed build leaves
    one). Empty bookkeeping, so not listed in the report.

    Each is removed while gc holds its kernel lock, after checking again that there is no
    lock file and no env, and that the name still is the file it locked. A process that opened
    the old guard just before and locks it just after still cannot make two holders: a new
    lock is created with `link()`, which fails if another process's appeared meanwhile.
    """
    for path in _own_entries(root, store.GUARD_NAME):
        _remove_guard(path, root, path.name[: -len(".lock.guard")])


def _remove_guard(path: Path, root: Path, key: str) -> bool:
    if os.path.lexists(root / key) or os.path.lexists(provision.lock_path(root, key)):
        return False
    try:
        fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return False
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_size != 0 or st.st_uid != os.getuid():
            return False  # not one dbtvenv of this user made
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return False  # somebody looks at the lock right now
        if os.path.lexists(root / key) or os.path.lexists(provision.lock_path(root, key)):
            return False
        if not trust.same_file(fd, path):
            return False
        os.unlink(path)
        return True
    except OSError:
        return False
    finally:
        os.close(fd)


def _temporary_envs(dry_run: bool) -> list[Collected]:
    found = []
    for path in provision.abandoned_temporary_envs():
        found.append(
            Collected(path, store.dir_size(path), "temporary env of a run that was killed")
        )
        if not dry_run:
            shutil.rmtree(path, ignore_errors=True)
    return found


def _file_size(path: Path) -> int:
    try:
        return os.lstat(path).st_blocks * 512
    except OSError:
        return 0
