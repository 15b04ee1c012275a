"""From a spec to a usable env: the persistent cache (lock, check, build) or a temporary one."""

from __future__ import annotations

import json
import os
import re
import signal
import stat
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from dbtvenv import dbt_lines, procs, store, trust
from dbtvenv.errors import EnvBusy, VenvDirError
from dbtvenv.progress import Reporter
from dbtvenv.settings import Settings
from dbtvenv.spec import EnvSpec

if TYPE_CHECKING:  # the warm path (a complete env) needs neither: imported when building
    from dbtvenv.lock import EnvLock

TEMP_PREFIX = "dbtvenv-"
TEMP_OWNER = "owner.json"
TEMP_ENV = "env"
_TEMP_NAME = re.compile(rf"^{re.escape(TEMP_PREFIX)}[a-z0-9_]{{8}}$")
# Characters of an env's path that the scripts pip and uv install (bin/dbt) cannot start
# from. Their first line names the env's Python: as a `#!` line, which a newline ends and a
# tab splits (a carriage return ends it for Python), or, when the path is long or has a
# space, inside a line of sh, where quotes, `$`, a backtick, a backslash and `;&|<>()` mean
# something. A `:` splits the PATH that dbt gets the env's bin dir in (venv refuses it too).
# A space is fine: pip and uv both quote it.
_BREAKS_SCRIPTS = frozenset("\"'$`\\;&|<>():" + "".join(map(chr, range(32))) + chr(127))
_CHARACTER_NAMES = {"\n": "a newline", "\t": "a tab", "\r": "a carriage return"}


def lock_path(root: Path, key: str) -> Path:
    return root / f"{key}{store.LOCK_SUFFIX}"


def ensure_env(root: Path, spec: EnvSpec, settings: Settings, reporter: Reporter) -> Path:
    """Return `root/<key>`, complete and healthy, building it under its lock if needed.

    A complete env is returned without touching the lock.
    """
    env_dir = root / spec.key
    check_env_location(str(root), "venv dir", "choose another --venv-dir")
    check_cache_root(root)
    if store.env_problem(env_dir) is None:
        return env_dir
    root = store.open_cache_root(root)
    with new_lock(root, spec.key, settings, reporter) as lock:
        reason = store.env_problem(env_dir)  # another process may have just built it
        if reason is None:
            return env_dir
        if os.path.lexists(env_dir):
            _discard(env_dir, reason)
        reporter.info(f"building env {spec.key}: {reason}")
        # The lease is renewed by the lock's own thread; the build only checks it still holds it.
        _build(env_dir, spec, settings, reporter, on_tick=lock.check, durable=True)
    return env_dir


def check_env_location(path: str, what: str, instead: str) -> None:
    """Refuse a dir whose path an env's scripts cannot start from (a scan of the string)."""
    if _BREAKS_SCRIPTS.isdisjoint(path):
        return
    char = next(c for c in path if c in _BREAKS_SCRIPTS)
    name = _CHARACTER_NAMES.get(char) or repr(char)
    raise VenvDirError(
        f"{what} {path!r} contains {name}, which the scripts pip and uv install in an env "
        f"(bin/dbt) cannot start from; {instead}"
    )


def check_cache_root(root: Path) -> None:
    """Refuse a cache dir that another user could swap, or swap envs in (trust.py)."""
    store.check_not_foreign_symlink(root)
    trust.check_dir_chain(root)


def new_lock(root: Path, key: str, settings: Settings, reporter: Reporter) -> EnvLock:
    from dbtvenv.lock import EnvLock

    return EnvLock(
        lock_path(root, key),
        timeout=settings.lock_timeout,
        lease=settings.lock_lease,
        on_wait=reporter.info,
    )


def _discard(env_dir: Path, reason: str) -> None:
    """Remove a broken or half-built env; a symlink in its place is removed, never followed.

    A half-built env (no manifest) is nobody's to use. A complete one that broke may still
    have a dbt running in it: that one is left alone, never pulled from under it.
    """
    complete = not env_dir.is_symlink() and (env_dir / store.MANIFEST).is_file()
    try:
        store.remove_env(env_dir, force=not complete)
    except store.EnvInUse:
        raise EnvBusy(
            f"env {env_dir.name} must be rebuilt ({reason}), but a dbt is still running in it; "
            "try again once it has finished"
        ) from None


def _build(
    env_dir: Path,
    spec: EnvSpec,
    settings: Settings,
    reporter: Reporter,
    *,
    on_tick: Callable[[], None] = lambda: None,
    tick: float = 1.0,
    durable: bool = False,
) -> None:
    from dbtvenv.build import build_env

    manifest = build_env(
        env_dir,
        spec,
        installer=settings.installer,
        reporter=reporter,
        on_tick=on_tick,
        tick=min(tick, 1.0),
        durable=durable,
    )
    distributions = [(d["name"], d["version"]) for d in manifest["distributions"]]
    dbt = ", ".join(f"{n} {v}" for n, v in dbt_lines.installed_dbt(distributions))
    name = "temporary env" if env_dir.name == TEMP_ENV else f"env {env_dir.name}"
    reporter.done(
        f"built {name} in {manifest['build_seconds']:.1f} s{': ' + dbt if dbt else ''} "
        f"({len(distributions)} distributions, {settings.installer})"
    )


@contextmanager
def temporary_env(spec: EnvSpec, settings: Settings, reporter: Reporter) -> Iterator[Path]:
    """A throw-away env in a private temp dir, removed on every exit Python can see.

    The dir records its owner, so `env gc` can remove one left behind by a SIGKILLed run.
    """
    import tempfile

    check_env_location(
        tempfile.gettempdir(),
        "the temp dir (TMPDIR)",
        "set TMPDIR to another dir, or keep envs in a cache dir (--venv-dir DIR)",
    )
    try:
        base = Path(tempfile.mkdtemp(prefix=TEMP_PREFIX))
    except OSError as exc:
        raise _no_temporary_dir(exc) from None
    try:
        me = procs.own_identity()
        owner = {"pid": me.pid, "create_time": me.create_time, "hostname": me.hostname}
        try:
            (base / TEMP_OWNER).write_text(json.dumps(owner) + "\n")
        except OSError as exc:
            raise _no_temporary_dir(exc, base.parent) from None
        env_dir = base / TEMP_ENV
        reporter.info("building a temporary env")
        _build(env_dir, spec, settings, reporter)
        yield env_dir
    finally:
        _remove_uninterrupted(base)


def _no_temporary_dir(exc: OSError, where: Path | None = None) -> VenvDirError:
    place = f" in {where}" if where is not None else ""
    return VenvDirError(
        f"cannot create a temporary env{place}: {exc.strerror or exc}; set TMPDIR to a "
        "writable dir with free space, or keep envs in a cache dir (--venv-dir DIR)"
    )


def _remove_uninterrupted(path: Path) -> None:
    """rmtree with termination signals held back, so a second Ctrl-C cannot leave half a tree."""
    import shutil

    held = {signal.SIGINT, signal.SIGTERM, signal.SIGHUP}
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, held)
    try:
        shutil.rmtree(path, ignore_errors=True)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def abandoned_temporary_envs(tmpdir: str | None = None) -> list[Path]:
    """Temporary env dirs whose owner process is gone (left by a SIGKILLed run)."""
    import tempfile

    base = Path(tmpdir or tempfile.gettempdir())
    found = []
    try:
        # Only what mkdtemp(prefix=TEMP_PREFIX) makes; never another program's `dbtvenv-...`.
        candidates = [p for p in base.iterdir() if _TEMP_NAME.match(p.name)]
    except OSError:
        return []
    for path in candidates:
        try:
            st = path.lstat()
            if (
                not stat.S_ISDIR(st.st_mode)
                or st.st_uid != os.getuid()
                or stat.S_IMODE(st.st_mode) != 0o700
            ):
                continue
            owner = json.loads((path / TEMP_OWNER).read_text())
            pid, create_time = owner["pid"], owner["create_time"]
            if not (procs.is_pid(pid) and procs.is_finite_number(create_time)):
                raise ValueError("not an owner")  # (`1e400`, `true`, `"12"`: never converted)
            # Another host's run (a shared temp dir) cannot be checked from here: keep it.
            alive = owner.get("hostname") != procs.hostname() or procs.is_running(
                pid, float(create_time)
            )
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            # No readable owner: a run killed while writing it, if that is all the dir holds
            # and it is not brand new; anything else is not ours to judge.
            try:
                alive = not set(os.listdir(path)) <= {TEMP_OWNER} or _age(path) < 60
            except OSError:
                alive = True
        if not alive:
            found.append(path)
    return found


def _age(path: Path) -> float:
    import time

    try:
        return time.time() - path.stat().st_mtime
    except OSError:
        return 0.0
