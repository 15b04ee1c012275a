"""From a spec to a usable env: the persistent cache (lock, check, build) or a temporary one."""

from __future__ import annotations

import json
import os
import shutil
import signal
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from dbtvenv import procs, store
from dbtvenv.build import build_env
from dbtvenv.lock import EnvLock
from dbtvenv.progress import Reporter
from dbtvenv.settings import Settings
from dbtvenv.spec import EnvSpec

TEMP_PREFIX = "dbtvenv-"
TEMP_OWNER = "owner.json"
TEMP_ENV = "env"


def lock_path(root: Path, key: str) -> Path:
    return root / f"{key}{store.LOCK_SUFFIX}"


def ensure_env(root: Path, spec: EnvSpec, settings: Settings, reporter: Reporter) -> Path:
    """Return `root/<key>`, complete and healthy, building it under its lock if needed.

    A complete env is returned without touching the lock.
    """
    env_dir = root / spec.key
    store.check_not_foreign_symlink(root)
    if store.env_problem(env_dir) is None:
        return env_dir
    root = store.open_cache_root(root)
    with new_lock(root, spec.key, settings, reporter) as lock:
        reason = store.env_problem(env_dir)  # another process may have just built it
        if reason is None:
            return env_dir
        reporter.info(f"building env {spec.key}: {reason}")
        if env_dir.exists() or env_dir.is_symlink():
            _discard(env_dir)
        _build(env_dir, spec, settings, reporter, on_tick=lock.refresh, tick=lock.refresh_interval)
    return env_dir


def new_lock(root: Path, key: str, settings: Settings, reporter: Reporter) -> EnvLock:
    return EnvLock(
        lock_path(root, key),
        timeout=settings.lock_timeout,
        lease=settings.lock_lease,
        on_wait=reporter.info,
    )


def _discard(env_dir: Path) -> None:
    """Remove a broken or half-built env; a symlink in its place is removed, never followed."""
    if env_dir.is_symlink():
        env_dir.unlink()
    else:
        store.remove_env(env_dir, force=True)


def _build(
    env_dir: Path,
    spec: EnvSpec,
    settings: Settings,
    reporter: Reporter,
    *,
    on_tick: Callable[[], None] = lambda: None,
    tick: float = 1.0,
) -> None:
    manifest = build_env(
        env_dir,
        spec,
        installer=settings.installer,
        reporter=reporter,
        on_tick=on_tick,
        tick=min(tick, 1.0),
    )
    count = len(manifest["distributions"])
    name = "temporary env" if env_dir.name == TEMP_ENV else f"env {env_dir.name}"
    reporter.done(
        f"built {name} in {manifest['build_seconds']:.1f} s "
        f"({count} distributions, {settings.installer})"
    )


@contextmanager
def temporary_env(spec: EnvSpec, settings: Settings, reporter: Reporter) -> Iterator[Path]:
    """A throw-away env in a private temp dir, removed on every exit Python can see.

    The dir records its owner, so `env gc` can remove one left behind by a SIGKILLed run.
    """
    base = Path(tempfile.mkdtemp(prefix=TEMP_PREFIX))
    try:
        me = procs.own_identity()
        owner = {"pid": me.pid, "create_time": me.create_time, "hostname": me.hostname}
        (base / TEMP_OWNER).write_text(json.dumps(owner) + "\n")
        env_dir = base / TEMP_ENV
        reporter.info("building a temporary env")
        _build(env_dir, spec, settings, reporter)
        yield env_dir
    finally:
        _remove_uninterrupted(base)


def _remove_uninterrupted(path: Path) -> None:
    """rmtree with termination signals held back, so a second Ctrl-C cannot leave half a tree."""
    held = {signal.SIGINT, signal.SIGTERM, signal.SIGHUP}
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, held)
    try:
        shutil.rmtree(path, ignore_errors=True)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def abandoned_temporary_envs(tmpdir: str | None = None) -> list[Path]:
    """Temporary env dirs whose owner process is gone (left by a SIGKILLed run)."""
    base = Path(tmpdir or tempfile.gettempdir())
    found = []
    try:
        candidates = [p for p in base.iterdir() if p.name.startswith(TEMP_PREFIX)]
    except OSError:
        return []
    for path in candidates:
        if path.is_symlink() or not path.is_dir():
            continue
        try:
            if path.stat().st_uid != os.getuid():
                continue
            owner = json.loads((path / TEMP_OWNER).read_text())
            alive = owner.get("hostname") == procs.hostname() and procs.is_running(
                int(owner["pid"]), float(owner["create_time"])
            )
        except (OSError, ValueError, KeyError, TypeError):
            # No readable owner: a run killed before writing it, if the dir is not brand new.
            alive = _age(path) < 60
        if not alive:
            found.append(path)
    return found


def _age(path: Path) -> float:
    import time

    try:
        return time.time() - path.stat().st_mtime
    except OSError:
        return 0.0
