"""The cache dir: one env per spec at `DIR/<key>`, its manifest, in-use marks, and removal."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

from dbtvenv import dbt_lines
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
    except (FileNotFoundError, NotADirectoryError):
        return  # open_cache_root creates it, or says why it cannot
    except OSError as exc:
        raise VenvDirError(
            f"cannot reach venv dir {root}: {exc.strerror}; check the permissions of the dirs "
            "above it, or choose another --venv-dir"
        ) from None
    if os.path.islink(root) and st.st_uid not in (os.getuid(), 0):
        raise VenvDirError(
            f"venv dir {root} is a symbolic link owned by another user (uid {st.st_uid}); "
            "not following it: remove it or choose another --venv-dir"
        )
    try:
        os.lstat(os.path.join(root, "."))  # needs search permission, as every use does
    except PermissionError:
        raise VenvDirError(
            f"cannot enter venv dir {root}: permission denied; fix its permissions "
            "(chmod u+rwx) or choose another --venv-dir"
        ) from None
    except OSError:
        pass  # not a directory: open_cache_root says so


def check_readable_root(root: Path) -> None:
    """For the commands that only read the cache: a venv dir that is no directory is an error
    (73), one that does not exist yet is merely empty."""
    check_not_foreign_symlink(root)
    if os.path.lexists(root) and not root.is_dir():
        raise VenvDirError.not_a_directory(root)


def open_cache_root(venv_dir: Path) -> Path:
    """Create the cache root if needed (private), tag it, and make sure it is writable."""
    root = venv_dir.expanduser().absolute()
    check_not_foreign_symlink(root)
    try:
        root.mkdir(mode=0o700, parents=True, exist_ok=True)
    except FileExistsError:
        raise VenvDirError.not_a_directory(root) from None
    except OSError as exc:
        raise VenvDirError(
            f"cannot create venv dir {root}: {exc.strerror}; check the path and the "
            "permissions of the dirs above it, or choose another --venv-dir"
        ) from None
    if not root.is_dir():
        raise VenvDirError.not_a_directory(root)
    tag = root / "CACHEDIR.TAG"
    try:
        if not tag.exists():
            _write_atomic(tag, CACHEDIR_TAG.encode())
        probe = root / f".write-test-{os.getpid()}-{os.urandom(4).hex()}"
        probe.touch()
        probe.unlink()
    except OSError as exc:
        raise VenvDirError(
            f"venv dir {root} is not writable: {exc.strerror}; "
            "fix its permissions or choose another --venv-dir"
        ) from None
    return root


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{os.urandom(4).hex()}.tmp")
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
    try:
        complete = (env_dir / MANIFEST).is_file()
    except PermissionError:
        return "it cannot be read (permission denied)"
    if not complete:
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
        raise VenvDirError(
            f"cannot mark env {env_dir} in use: {exc.strerror or exc}; free some space on "
            "the venv dir's file system ('dbtvenv env gc' removes unused envs), then retry"
        ) from None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH)
        # A remover may have taken the env away between our check and our mark (and another
        # process may even have rebuilt it: then our mark is the old env's, in the trash).
        if not (env_dir / MANIFEST).is_file() or not _same_file(fd, env_dir / USE_MARK):
            yield False
            return
        with contextlib.suppress(OSError):
            os.utime(fd)
        yield True
    finally:
        os.close(fd)


def _same_file(fd: int, path: Path) -> bool:
    try:
        st = os.lstat(path)
    except OSError:
        return False
    mine = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (mine.st_dev, mine.st_ino)


def is_in_use(env_dir: Path) -> bool:
    # Opened for writing where we may: NFS emulates flock with POSIX locks, and an exclusive
    # one needs a file open for writing (EBADF otherwise). Read-only is enough elsewhere.
    try:
        fd = os.open(env_dir / USE_MARK, os.O_RDWR | os.O_NOFOLLOW)
    except OSError as exc:
        if exc.errno not in (errno.EACCES, errno.EPERM, errno.EROFS):
            return False
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
        doomed = trash / f"{env_dir.name}-{os.urandom(4).hex()}"
        os.rename(env_dir, doomed)
    finally:
        if fd is not None:
            os.close(fd)
    import shutil

    shutil.rmtree(doomed, ignore_errors=True)


def empty_trash(root: Path) -> None:
    import shutil

    shutil.rmtree(root / TRASH, ignore_errors=True)


def env_keys(root: Path) -> list[str]:
    """The keys of the envs (complete or not) in the cache dir; none if it does not exist."""
    try:
        names = os.listdir(root)
    except FileNotFoundError:
        return []
    except NotADirectoryError:
        raise VenvDirError.not_a_directory(root) from None
    except OSError as exc:
        raise VenvDirError(
            f"cannot read venv dir {root}: {exc.strerror}; fix its permissions"
        ) from None
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


class EnvEntry(NamedTuple):
    """One env of a cache dir as `env list` and `env info` show it."""

    key: str
    path: Path
    manifest: dict[str, Any] | None
    last_used: float | None
    in_use: bool
    size: int

    @property
    def complete(self) -> bool:
        return self.manifest is not None

    @property
    def distributions(self) -> dict[str, str]:
        """Installed distributions, canonical name -> version."""
        found: dict[str, str] = {}
        for dist in (self.manifest or {}).get("distributions", []):
            if isinstance(dist, dict) and dist.get("name"):
                found[canonical_name(str(dist["name"]))] = str(dist.get("version"))
        return found

    def version_of(self, name: str) -> str | None:
        return self.distributions.get(canonical_name(name))

    @property
    def adapters(self) -> dict[str, str]:
        """dbt's adapters (every `dbt-*` distribution that is not part of dbt itself)."""
        return {
            name: version
            for name, version in sorted(self.distributions.items())
            if name.startswith("dbt-") and name not in NOT_ADAPTERS
        }

    @property
    def created(self) -> float | None:
        return parse_iso((self.manifest or {}).get("created"))

    @property
    def python(self) -> str | None:
        python = (self.manifest or {}).get("python")
        return str(python["version"]) if isinstance(python, dict) and "version" in python else None

    @property
    def requirements(self) -> list[str]:
        spec = (self.manifest or {}).get("spec") or {}
        return [str(r) for r in spec.get("requirements", [])]

    @property
    def requirements_files(self) -> list[str]:
        spec = (self.manifest or {}).get("spec") or {}
        return [str(f.get("path")) for f in spec.get("requirements_files", [])]

    @property
    def constraints_files(self) -> list[str]:
        spec = (self.manifest or {}).get("spec") or {}
        return [str(f.get("path")) for f in spec.get("constraints_files", [])]

    @property
    def implied_pins(self) -> list[str]:
        return [str(r) for r in (self.manifest or {}).get("implied_pins") or []]

    @property
    def repairs(self) -> list[str]:
        return [str(r) for r in (self.manifest or {}).get("repairs") or []]

    def to_json(self) -> dict[str, Any]:
        """The `env list --json` object of this env (documented in docs/json.md)."""
        return {
            "key": self.key,
            "path": str(self.path),
            "complete": self.complete,
            "in_use": self.in_use,
            "requirements": self.requirements,
            "requirements_files": self.requirements_files,
            "constraints_files": self.constraints_files,
            "implied_pins": self.implied_pins,
            "repairs": self.repairs,
            "python": self.python,
            "dbt_core": self.version_of("dbt-core"),
            "adapters": self.adapters,
            "installer": (self.manifest or {}).get("installer"),
            "size": self.size,
            "created": iso(self.created),
            "last_used": iso(self.last_used),
        }


NOT_ADAPTERS = dbt_lines.NOT_ADAPTERS


def canonical_name(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def iso(timestamp: float | None) -> str | None:
    """A time as ISO 8601 in UTC, to the second: `2026-11-24T15:00:00+00:00`."""
    if timestamp is None:
        return None
    from datetime import datetime, timezone

    return datetime.fromtimestamp(timestamp, timezone.utc).isoformat(timespec="seconds")


def parse_iso(text: object) -> float | None:
    if not isinstance(text, str):
        return None
    from datetime import datetime, timezone

    try:
        parsed = datetime.fromisoformat(text)
    except ValueError:
        return None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=timezone.utc)
    return parsed.timestamp()


def describe_env(root: Path, key: str, *, with_size: bool = True) -> EnvEntry:
    """What is known about `root/<key>` without locking anything."""
    path = root / key
    manifest = read_manifest(path)
    # Never used by dbt yet: its last use is its creation (or, half-built, its last write).
    used = last_used(path) or _mtime(path / MANIFEST if manifest is not None else path)
    return EnvEntry(
        key=key,
        path=path,
        manifest=manifest,
        last_used=used,
        in_use=is_in_use(path),
        size=dir_size(path) if with_size else 0,
    )


def _mtime(path: Path) -> float | None:
    try:
        return os.stat(path).st_mtime
    except OSError:
        return None


def list_envs(root: Path) -> list[EnvEntry]:
    """Every env of the cache dir, most recently used first."""
    entries = [describe_env(root, key) for key in env_keys(root)]
    return sorted(
        entries, key=lambda e: (e.last_used or 0.0, e.created or 0.0, e.key), reverse=True
    )
