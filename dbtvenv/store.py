"""The cache dir: one env per spec at `DIR/<key>`, its manifest, in-use marks, and removal."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import re
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

from dbtvenv import dbt_lines, trust
from dbtvenv.errors import DbtvenvError, VenvDirError

MANIFEST = "dbtvenv.json"
# Held shared by every run of dbt in the env, exclusively by whoever removes it; its mtime is
# the env's last use.
USE_MARK = "dbtvenv.use"
LOCK_SUFFIX = ".lock"
TAG = "CACHEDIR.TAG"
KEY_PATTERN = re.compile(r"^[0-9a-f]{16}$")
# Every name dbtvenv itself makes in a cache dir, and nothing else: only these are ever
# removed by `env gc`, and a dir holding anything else gets no CACHEDIR.TAG.
_KEY = r"[0-9a-f]{16}"
_SUFFIX = r"\.\d+\.[0-9a-f]{8}\.tmp"
LOCK_NAME = re.compile(rf"^{_KEY}\.lock$")
GUARD_NAME = re.compile(rf"^{_KEY}\.lock\.guard$")
TEMP_NAME = re.compile(rf"^\.(?:{_KEY}\.lock|{re.escape(TAG)}){_SUFFIX}$")
# An env being removed: renamed out of its key's place, then deleted.
TRASH_NAME = re.compile(rf"^\.{_KEY}\.[0-9a-f]{{8}}\.trash$")
_PROBE_NAME = re.compile(r"^\.write-test-\d+-[0-9a-f]{8}$")
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


def is_own_name(name: str) -> bool:
    """Whether dbtvenv makes entries of this name in a cache dir."""
    patterns = (KEY_PATTERN, LOCK_NAME, GUARD_NAME, TEMP_NAME, TRASH_NAME, _PROBE_NAME)
    return name == TAG or any(pattern.match(name) for pattern in patterns)


def open_cache_root(venv_dir: Path) -> Path:
    """Create the cache root if needed (private), tag it, and make sure it is writable.

    `CACHEDIR.TAG` goes only into a dir made here, or one holding nothing but dbtvenv's own
    entries: `--venv-dir .` in a project must not take the project out of backups.
    """
    root = venv_dir.expanduser().absolute()
    check_not_foreign_symlink(root)
    created = False
    try:
        try:
            root.mkdir(mode=0o700)
        except FileNotFoundError:
            root.parent.mkdir(parents=True, exist_ok=True)
            root.mkdir(mode=0o700)
        created = True
    except FileExistsError:
        if not root.is_dir():
            raise VenvDirError.not_a_directory(root) from None
    except OSError as exc:
        raise VenvDirError(
            f"cannot create venv dir {root}: {exc.strerror}; check the path and the "
            "permissions of the dirs above it, or choose another --venv-dir"
        ) from None
    trust.check_dir_chain(root)
    tag = root / TAG
    try:
        if not os.path.lexists(tag) and (created or _holds_only_own_entries(root)):
            _write_atomic(tag, CACHEDIR_TAG.encode())
        probe = root / f".write-test-{os.getpid()}-{os.urandom(4).hex()}"
        os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600))
        probe.unlink()
    except OSError as exc:
        raise VenvDirError(
            f"venv dir {root} is not writable: {exc.strerror}; "
            "fix its permissions or choose another --venv-dir"
        ) from None
    return root


def _holds_only_own_entries(root: Path) -> bool:
    return all(is_own_name(name) for name in os.listdir(root))


def _write_atomic(path: Path, data: bytes) -> None:
    """Write to a new private name (O_EXCL: nothing planted there is followed), then rename
    over `path`, which replaces a planted link rather than writing through it."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{os.urandom(4).hex()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
    try:  # from here on the temporary file is ours to remove; what was there before is not
        with open(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise


def write_manifest(env_dir: Path, manifest: dict[str, Any]) -> None:
    """The last write of a build: from here on the env is complete.

    The use mark is made first, so that users who may use the env but not write into it
    (an env root built, read by everyone) can still hold it shared while dbt runs.
    """
    with contextlib.suppress(FileExistsError):
        os.close(os.open(env_dir / USE_MARK, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
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
    Raises `trust.Untrusted` for an env that another user built or could have changed: that
    one is neither used nor rebuilt (which would delete it).
    """
    try:
        st = os.lstat(env_dir)
    except FileNotFoundError:
        return "no env for this spec yet"
    except OSError:
        st = None
    if st is not None and stat.S_ISLNK(st.st_mode):
        return "a symbolic link is in its place"
    if st is not None and stat.S_ISDIR(st.st_mode):
        trust.check_env(env_dir)
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
        fd = _open_use_mark(env_dir, create=True)
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
        if not (env_dir / MANIFEST).is_file() or not trust.same_file(fd, env_dir / USE_MARK):
            yield False
            return
        with contextlib.suppress(OSError):
            os.utime(fd)
        yield True
    finally:
        os.close(fd)


def _open_use_mark(env_dir: Path, *, create: bool) -> int:
    # Read-write where we may: NFS emulates flock with POSIX locks, and an exclusive one needs
    # a file open for writing (EBADF otherwise). Read-only is enough for a shared one.
    return trust.open_regular(env_dir / USE_MARK, what="use mark", create=create)


def is_in_use(env_dir: Path) -> bool:
    if os.path.islink(env_dir):
        return False  # a link in an env's place is no env of this cache
    try:
        fd = _open_use_mark(env_dir, create=False)
    except (OSError, trust.Untrusted):
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
    """Remove an env; the caller holds its lock. An env in use is refused unless `force`.

    Only what is dbtvenv's to remove: a symbolic link (or file) in an env's place is removed
    itself, never what it points to; an env of a user this one does not trust is refused.
    """
    try:
        st = os.lstat(env_dir)
    except FileNotFoundError:
        return
    if not stat.S_ISDIR(st.st_mode):
        remove_entry(env_dir, st, "an env's place")
        return
    if st.st_uid not in trust.trusted_uids():
        raise trust.refuse_owner("env", str(env_dir), st.st_uid, doing="removing")
    fd = None
    with contextlib.suppress(OSError, trust.Untrusted):
        fd = _open_use_mark(env_dir, create=True)
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
        # Out of its key's place in one step; deleting it may take a while (or be cut short:
        # then `env gc` finishes it).
        doomed = env_dir.with_name(f".{env_dir.name}.{os.urandom(4).hex()}.trash")
        os.rename(env_dir, doomed)
    finally:
        if fd is not None:
            os.close(fd)
    remove_tree(doomed)


def remove_tree(path: Path) -> None:
    """Delete a dir of dbtvenv's; links inside are removed, never followed (shutil.rmtree
    works on descriptors here, so a link swapped in meanwhile cannot redirect it)."""
    import shutil

    shutil.rmtree(path, ignore_errors=True)


def remove_entry(path: Path, st: os.stat_result, where: str) -> None:
    """Unlink a link or file, never its target; one this user may not remove is refused."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    except PermissionError:
        raise trust.Untrusted(
            f"{path} is {trust.kind_of(st.st_mode)} owned by {trust.describe_owner(st.st_uid)} "
            f"in {where}, which this user may not remove; ask its owner or root to remove it, "
            "or choose another --venv-dir"
        ) from None


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
    # A link in an env's place is listed too (as incomplete), so that gc and rm can remove
    # it; nothing ever follows it.
    return sorted(
        n
        for n in names
        if KEY_PATTERN.match(n) and (os.path.islink(root / n) or (root / n).is_dir())
    )


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
    if os.path.islink(path):  # never followed: not an env of this cache
        return EnvEntry(key, path, None, _mtime(path, follow=False), False, 0)
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


def _mtime(path: Path, *, follow: bool = True) -> float | None:
    try:
        return os.stat(path, follow_symlinks=follow).st_mtime
    except OSError:
        return None


def list_envs(root: Path) -> list[EnvEntry]:
    """Every env of the cache dir, most recently used first."""
    entries = [describe_env(root, key) for key in env_keys(root)]
    return sorted(
        entries, key=lambda e: (e.last_used or 0.0, e.created or 0.0, e.key), reverse=True
    )
