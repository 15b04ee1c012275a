"""`env gc`: remove what no run needs any more, never an env in use or a live builder's work."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import stat
import time
from pathlib import Path
from typing import NamedTuple

from dbtvenv import provision, store, trust
from dbtvenv.errors import LockTimeout
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
        found += _stale_locks(root, dry_run)
        found += _leftovers(root, dry_run)
    found += _temporary_envs(dry_run)
    return found


def _envs(root: Path, cutoff: float, dry_run: bool, reporter: Reporter) -> list[Collected]:
    found = []
    for key in store.env_keys(root):
        env_dir = root / key
        try:
            st = os.lstat(env_dir)
        except FileNotFoundError:
            continue
        if stat.S_ISLNK(st.st_mode):  # no env, whoever made it: the link goes, not its target
            if not dry_run and not _remove_locked(root, key, 0.0, reporter):
                continue
            found.append(Collected(env_dir, 0, "a symbolic link in an env's place (not followed)"))
            continue
        if st.st_uid not in trust.trusted_uids():
            owner = trust.describe_owner(st.st_uid)
            reporter.info(f"keeping {env_dir}: it is {owner}'s, whom this user does not trust")
            continue
        entry = store.describe_env(root, key, with_size=False)
        if entry.complete:
            if (entry.last_used or 0.0) >= cutoff:
                continue
            why = f"not used since {store.iso(entry.last_used)}"
        else:
            state = read_lock(provision.lock_path(root, key), lease=lock_lease())
            if state is not None and state.stale_reason is None:
                continue  # a live builder is working on it
            why = "incomplete (its build was interrupted), no live builder"
        if entry.in_use:
            reporter.info(f"keeping env {key}: dbt is running in it")
            continue
        size = store.dir_size(env_dir)
        if not dry_run and not _remove_locked(root, key, cutoff, reporter):
            continue
        found.append(Collected(env_dir, size, why))
    return found


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


def _stale_locks(root: Path, dry_run: bool) -> list[Collected]:
    """Stale locks of dbtvenv's own: `<key>.lock` files that parse as a lock, nothing else."""
    found = []
    for path in _own_entries(root, store.LOCK_NAME):
        state = read_lock(path, lease=lock_lease())
        if state is None or state.stale_reason is None or state.holder is None:
            continue
        size = _file_size(path)
        if not dry_run:
            # Taking a stale lock over and releasing it removes it, race-free.
            try:
                EnvLock(path, timeout=0, lease=lock_lease()).__enter__().release()
            except LockTimeout:
                continue  # a live process took it over meanwhile
        found.append(Collected(path, size, f"stale lock: {state.stale_reason}"))
    return found


def _leftovers(root: Path, dry_run: bool) -> list[Collected]:
    """What removals and writers that were cut short left: dbtvenv's own names only."""
    found = []
    for path in _own_entries(root, store.TRASH_NAME):
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
