"""The cache dir: one env per spec at `DIR/<key>`, its manifest, in-use marks, and removal."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import re
import secrets
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dbtvenv.errors import DbtvenvError, VenvDirError

MANIFEST = "dbtvenv.json"
# Held shared by every run of dbt in the env, exclusively by whoever removes it; its mtime is
# the env's last use.
USE_MARK = "dbtvenv.use"
LOCK_SUFFIX = ".lock"
TRASH = ".trash"
KEY_PATTERN = re.compile(r"^[0-9a-f]{16}$")
CACHEDIR_TAG = (
    "Signature: 8a477f597d28d172789f06886806bc55\n"
    "# This file is a cache directory tag created by dbtvenv.\n"
    "# For information about cache directory tags see https://bford.info/cachedir/\n"
)


class EnvInUse(DbtvenvError):
    exit_code = 1


def check_not_foreign_symlink(root: Path) -> None:
    """Refuse a venv dir that is another user's symlink: it leads where we did not choose."""
    try:
        st = os.lstat(root)
    except FileNotFoundError:
        return
    if os.path.islink(root) and st.st_uid not in (os.getuid(), 0):
        raise VenvDirError(
            f"venv dir {root} is a symbolic link owned by another user (uid {st.st_uid}); "
            "not following it: remove it or choose another --venv-dir"
        )


def open_cache_root(venv_dir: Path) -> Path:
    """Create the cache root if needed (private), tag it, and make sure it is writable."""
    root = venv_dir.expanduser().absolute()
    check_not_foreign_symlink(root)
    try:
        root.mkdir(mode=0o700, parents=True, exist_ok=True)
    except FileExistsError:
        raise VenvDirError(f"venv dir {root} exists and is not a directory") from None
    except OSError as exc:
        raise VenvDirError(f"cannot create venv dir {root}: {exc.strerror}") from None
    if not root.is_dir():
        raise VenvDirError(f"venv dir {root} exists and is not a directory")
    tag = root / "CACHEDIR.TAG"
    try:
        if not tag.exists():
            _write_atomic(tag, CACHEDIR_TAG.encode())
        probe = root / f".write-test-{os.getpid()}-{secrets.token_hex(4)}"
        probe.touch()
        probe.unlink()
    except OSError as exc:
        raise VenvDirError(
            f"venv dir {root} is not writable: {exc.strerror}; "
            "fix its permissions or choose another --venv-dir"
        ) from None
    return root


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        with open(tmp, "xb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise


def write_manifest(env_dir: Path, manifest: dict[str, Any]) -> None:
    """The last write of a build: from here on the env is complete."""
    _write_atomic(env_dir / MANIFEST, json.dumps(manifest, indent=2).encode() + b"\n")
    dir_fd = os.open(env_dir, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def read_manifest(env_dir: Path) -> dict[str, Any] | None:
    try:
        data = json.loads((env_dir / MANIFEST).read_bytes())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def env_problem(env_dir: Path) -> str | None:
    """Why this env cannot be used as it is, or None when it is complete and healthy.

    Cheap on purpose (a few stats, no child process): it runs before every dbt command.
    """
    if not (env_dir / MANIFEST).is_file():
        if env_dir.exists():
            return "the last build was interrupted"
        return "no env for this spec yet"
    if not os.path.exists(env_dir / "bin" / "python"):
        return "its interpreter is gone"
    dbt = env_dir / "bin" / "dbt"
    if not os.access(dbt, os.X_OK):
        return "its dbt executable is gone"
    try:
        with open(dbt, "rb") as f:
            first = f.readline(4096)
    except OSError:
        return "its dbt executable cannot be read"
    if first.startswith(b"#!"):
        interpreter = first[2:].strip().split(b" ")[0]
        if interpreter and not os.access(interpreter, os.X_OK):
            return "the interpreter of its dbt executable is gone"
    return None


@contextlib.contextmanager
def mark_in_use(env_dir: Path) -> Iterator[bool]:
    """Hold the env's use mark while dbt runs in it; yields False if the env vanished meanwhile.

    A read-only cache (an env baked into an image) cannot be marked; it is used all the same.
    """
    try:
        fd = os.open(env_dir / USE_MARK, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
    except FileNotFoundError:
        yield False
        return
    except OSError as exc:
        if exc.errno in (errno.EACCES, errno.EROFS, errno.EPERM):
            yield (env_dir / MANIFEST).is_file()
            return
        raise
    try:
        fcntl.flock(fd, fcntl.LOCK_SH)
        # A remover may have taken the env away between our check and our mark.
        if not (env_dir / MANIFEST).is_file():
            yield False
            return
        with contextlib.suppress(OSError):
            os.utime(fd)
        yield True
    finally:
        os.close(fd)


def is_in_use(env_dir: Path) -> bool:
    try:
        fd = os.open(env_dir / USE_MARK, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


def last_used(env_dir: Path) -> float | None:
    try:
        return os.stat(env_dir / USE_MARK).st_mtime
    except OSError:
        return None


def remove_env(env_dir: Path, *, force: bool = False) -> None:
    """Remove an env; the caller holds its lock. An env in use is refused unless `force`."""
    if not env_dir.exists():
        return
    fd = None
    with contextlib.suppress(OSError):
        fd = os.open(env_dir / USE_MARK, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
    try:
        if fd is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                if not force:
                    raise EnvInUse(
                        f"env {env_dir.name} is in use by a running dbt; "
                        "wait for it to finish, or pass --force"
                    ) from None
        # Incomplete first, so a run that arrives now goes to the lock and waits for us.
        with contextlib.suppress(FileNotFoundError):
            (env_dir / MANIFEST).unlink()
        trash = env_dir.parent / TRASH
        trash.mkdir(exist_ok=True)
        doomed = trash / f"{env_dir.name}-{secrets.token_hex(4)}"
        os.rename(env_dir, doomed)
    finally:
        if fd is not None:
            os.close(fd)
    shutil.rmtree(doomed, ignore_errors=True)


def empty_trash(root: Path) -> None:
    shutil.rmtree(root / TRASH, ignore_errors=True)


def env_keys(root: Path) -> list[str]:
    try:
        names = os.listdir(root)
    except FileNotFoundError:
        return []
    return sorted(n for n in names if KEY_PATTERN.match(n) and (root / n).is_dir())


def dir_size(path: Path) -> int:
    """Bytes on disk, like `du`, counting each hard-linked file once."""
    total = 0
    seen: set[tuple[int, int]] = set()
    for dirpath, dirnames, filenames in os.walk(path):
        for name in dirnames + filenames:
            try:
                st = os.lstat(os.path.join(dirpath, name))
            except OSError:
                continue
            if (st.st_dev, st.st_ino) in seen:
                continue
            seen.add((st.st_dev, st.st_ino))
            total += st.st_blocks * 512
    return total


@dataclass(frozen=True)
class EnvEntry:
    key: str
    path: Path
    manifest: dict[str, Any] | None
    last_used: float | None
    in_use: bool
    size: int

    @property
    def complete(self) -> bool:
        return self.manifest is not None

    def version_of(self, name: str) -> str | None:
        for dist in (self.manifest or {}).get("distributions", []):
            if dist.get("name", "").lower().replace("_", "-") == name:
                return str(dist.get("version"))
        return None

    @property
    def adapters(self) -> list[str]:
        names = []
        for dist in (self.manifest or {}).get("distributions", []):
            name = str(dist.get("name", "")).lower().replace("_", "-")
            if name.startswith("dbt-") and name not in NOT_ADAPTERS:
                names.append(f"{name}=={dist.get('version')}")
        return sorted(names)

    @property
    def created(self) -> str | None:
        return None if self.manifest is None else self.manifest.get("created")

    def to_json(self) -> dict[str, Any]:
        manifest = self.manifest or {}
        return {
            "key": self.key,
            "path": str(self.path),
            "complete": self.complete,
            "in_use": self.in_use,
            "requirements": manifest.get("spec", {}).get("requirements", []),
            "python": manifest.get("python", {}).get("version"),
            "dbt_core": self.version_of("dbt-core"),
            "adapters": self.adapters,
            "installer": manifest.get("installer"),
            "size": self.size,
            "created": self.created,
            "last_used": _iso(self.last_used),
        }


NOT_ADAPTERS = {
    "dbt-core",
    "dbt-adapters",
    "dbt-common",
    "dbt-extractor",
    "dbt-semantic-interfaces",
    "dbt-protos",
}


def _iso(timestamp: float | None) -> str | None:
    if timestamp is None:
        return None
    from datetime import datetime, timezone

    return datetime.fromtimestamp(timestamp, timezone.utc).isoformat(timespec="seconds")


def describe_env(root: Path, key: str, *, with_size: bool = True) -> EnvEntry:
    path = root / key
    return EnvEntry(
        key=key,
        path=path,
        manifest=read_manifest(path),
        last_used=last_used(path) or _mtime(path / MANIFEST),
        in_use=is_in_use(path),
        size=dir_size(path) if with_size else 0,
    )


def _mtime(path: Path) -> float | None:
    try:
        return os.stat(path).st_mtime
    except OSError:
        return None


def list_envs(root: Path) -> list[EnvEntry]:
    entries = [describe_env(root, key) for key in env_keys(root)]
    return sorted(entries, key=lambda e: e.last_used or 0.0, reverse=True)
