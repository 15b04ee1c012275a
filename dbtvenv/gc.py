"""`env gc`: remove what no run needs any more, never an env in use or a live builder's work."""

from __future__ import annotations

import contextlib
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from dbtvenv import provision, store
from dbtvenv.errors import LockTimeout
from dbtvenv.lock import EnvLock, lock_lease, read_lock
from dbtvenv.progress import Reporter

# A writer's temporary file this old belongs to a writer that died.
ORPHAN_TMP_AGE = 3600.0


@dataclass(frozen=True)
class Collected:
    path: Path
    size: int
    why: str


def collect(
    root: Path | None, *, cutoff: float, dry_run: bool, reporter: Reporter
) -> list[Collected]:
    found: list[Collected] = []
    if root is not None and root.is_dir():
        found += _envs(root, cutoff, dry_run, reporter)
        found += _stale_locks(root, dry_run, reporter)
        found += _leftovers(root, dry_run)
    for path in provision.abandoned_temporary_envs():
        found.append(
            Collected(path, store.dir_size(path), "temporary env of a run that was killed")
        )
        if not dry_run:
            shutil.rmtree(path, ignore_errors=True)
    return found


def _envs(root: Path, cutoff: float, dry_run: bool, reporter: Reporter) -> list[Collected]:
    found = []
    for key in store.env_keys(root):
        env_dir = root / key
        entry = store.describe_env(root, key, with_size=False)
        if entry.in_use:
            continue
        if entry.complete:
            if (entry.last_used or 0.0) >= cutoff:
                continue
            why = f"not used since {store._iso(entry.last_used)}"
        else:
            holder = read_lock(provision.lock_path(root, key), lease=lock_lease())
            if holder is not None and holder.stale_reason is None:
                continue  # a live builder is working on it
            why = "incomplete, no live builder"
        size = store.dir_size(env_dir)
        if not dry_run and not _remove_locked(root, key, reporter):
            continue
        found.append(Collected(env_dir, size, why))
    return found


def _remove_locked(root: Path, key: str, reporter: Reporter) -> bool:
    lock = EnvLock(
        provision.lock_path(root, key), timeout=0, lease=lock_lease(), on_wait=reporter.info
    )
    try:
        with lock:
            store.remove_env(root / key)
    except (LockTimeout, store.EnvInUse):
        return False  # somebody started using or building it meanwhile: leave it
    return True


def _stale_locks(root: Path, dry_run: bool, reporter: Reporter) -> list[Collected]:
    found = []
    for path in root.glob(f"*{store.LOCK_SUFFIX}"):
        state = read_lock(path, lease=lock_lease())
        if state is None or state.stale_reason is None:
            continue
        if not dry_run:
            # Taking a stale lock over and releasing it removes it, race-free.
            with contextlib.suppress(LockTimeout):
                EnvLock(path, timeout=0, lease=lock_lease()).__enter__().release()
        found.append(Collected(path, 0, f"stale lock: {state.stale_reason}"))
    return found


def _leftovers(root: Path, dry_run: bool) -> list[Collected]:
    found = []
    trash = root / store.TRASH
    if trash.exists():
        found.append(Collected(trash, store.dir_size(trash), "half-removed envs"))
        if not dry_run:
            store.empty_trash(root)
    now = time.time()
    for path in root.glob(".*.tmp"):
        with contextlib.suppress(OSError):
            if now - path.lstat().st_mtime > ORPHAN_TMP_AGE:
                found.append(
                    Collected(path, path.lstat().st_size, "temporary file of a dead writer")
                )
                if not dry_run:
                    os.unlink(path)
    return found
