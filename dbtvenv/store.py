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
from dbtvenv.spec import hex_digest

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


MAX_MANIFEST_BYTES = 1 << 20
MAX_SCRIPT_BYTES = 1 << 16
_SCRIPT_RECORD = "dbt_executable"


def read_manifest(env_dir: Path) -> dict[str, Any] | None:
    """The manifest as a JSON object, or None if there is none or it is no JSON object."""
    raw = _read_small(os.path.join(env_dir, MANIFEST), MAX_MANIFEST_BYTES)
    if raw is None:
        return None
    try:
        data = json.loads(raw)
    except (ValueError, RecursionError):
        return None
    return data if isinstance(data, dict) else None


def _read_small(path: str, limit: int) -> bytes | None:
    """A regular file's bytes if it has at most `limit` of them, else None; never blocks."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY)
    except OSError:
        return None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_size > limit:
            return None
        chunks: list[bytes] = []
        while True:
            chunk = os.read(fd, max(st.st_size, 4096))
            if not chunk:
                return b"".join(chunks)
            chunks.append(chunk)
            if sum(map(len, chunks)) > limit:
                return None
    except OSError:
        return None
    finally:
        os.close(fd)


def script_record(path: Path) -> dict[str, Any]:
    """What the manifest records of the env's `dbt`, so that a damaged one is noticed."""
    data = path.read_bytes()
    return {"size": len(data), "sha256": hex_digest(data)}


def env_problem(env_dir: Path) -> str | None:
    """Why this env cannot be used as it is, or None when it is complete and healthy.

    Cheap on purpose (a few stats and two small reads, no child process): it runs before
    every dbt command. It catches a `dbt` that cannot start: gone, empty or cut short (a
    power loss after the build), changed since the build, with an interpreter that is gone.
    Raises `trust.Untrusted` for an env that another user built or could have changed: that
    one is neither used nor rebuilt (which would delete it).
    """
    env = os.fspath(env_dir)
    try:
        st = os.lstat(env)
    except (FileNotFoundError, NotADirectoryError):
        return "no env for this spec yet"
    except OSError as exc:
        return f"it cannot be read ({exc.strerror})"
    if stat.S_ISLNK(st.st_mode):
        return "a symbolic link is in its place"
    if not stat.S_ISDIR(st.st_mode):
        if st.st_uid not in trust.trusted_uids():  # not ours to remove: refused, kept
            raise trust.refuse_owner(
                f"{trust.kind_of(st.st_mode)} in the place of env", env, st.st_uid
            )
        return "a file is in its place"
    trust.check_env(env_dir)
    manifest_path = os.path.join(env, MANIFEST)
    try:
        manifest_st = os.stat(manifest_path)
    except PermissionError:
        return "it cannot be read (permission denied)"
    except OSError:
        return "the last build was interrupted"
    if not stat.S_ISREG(manifest_st.st_mode):
        return "its manifest is not a file"
    manifest = read_manifest(env_dir)
    if manifest is None:
        return "its manifest is damaged"
    if not os.path.exists(os.path.join(env, "bin", "python")):
        return "its interpreter is gone"
    return _dbt_problem(os.path.join(env, "bin", "dbt"), manifest.get(_SCRIPT_RECORD))


def _dbt_problem(dbt: str, record: object) -> str | None:
    try:
        fd = os.open(dbt, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY)
    except FileNotFoundError:
        return "its dbt executable is gone"
    except OSError:
        return "its dbt executable cannot be read"
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            return "its dbt executable is not a file"
        if not os.access(dbt, os.X_OK):
            return "its dbt executable is not executable"
        head = os.read(fd, MAX_SCRIPT_BYTES)
    except OSError:
        return "its dbt executable cannot be read"
    finally:
        os.close(fd)
    if not head:
        return "its dbt executable is empty (cut short, as a power loss after a build leaves it)"
    if isinstance(record, dict) and "size" in record:
        whole = st.st_size <= MAX_SCRIPT_BYTES
        if record.get("size") != st.st_size or (whole and record.get("sha256") != hex_digest(head)):
            return "its dbt executable was cut short or changed since the build"
    if head.startswith(b"\x7fELF"):
        return None
    if not head.startswith(b"#!"):
        return "its dbt executable is neither a script nor a program"
    first, newline, _ = head.partition(b"\n")
    if not newline:
        return "its dbt executable is cut short"
    words = first[2:].split()
    if not words or not os.access(words[0], os.X_OK) or not os.path.isfile(words[0]):
        return "the interpreter of its dbt executable is gone"
    return None


def sync_tree(path: Path) -> None:
    """Put everything under `path` on disk: `syncfs` of its file system where the platform has
    it, else an `fsync` of every file and directory. A power loss after this leaves the files
    whole; the manifest, written after it, can then never mark a damaged env complete."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        if _syncfs(fd):
            return
    finally:
        os.close(fd)
    for dirpath, _dirnames, filenames in os.walk(path):
        for name in [*filenames, "."]:
            with contextlib.suppress(OSError):
                file_fd = os.open(os.path.join(dirpath, name), os.O_RDONLY | os.O_NOFOLLOW)
                try:
                    os.fsync(file_fd)
                finally:
                    os.close(file_fd)


def _syncfs(fd: int) -> bool:
    import sys

    if not sys.platform.startswith("linux"):
        return False
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return int(libc.syncfs(fd)) == 0
    except (OSError, AttributeError):
        return False


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
    if stat.S_ISLNK(st.st_mode):  # removing a link harms nobody: its target stays
        remove_entry(env_dir, st, "an env's place")
        return
    if st.st_uid not in trust.trusted_uids():
        raise trust.refuse_owner("env", str(env_dir), st.st_uid, doing="removing")
    if not stat.S_ISDIR(st.st_mode):
        remove_entry(env_dir, st, "an env's place")
        return
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
        # (A manifest that is a directory already makes the env incomplete.)
        with contextlib.suppress(FileNotFoundError, IsADirectoryError):
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
        for dist in as_list((self.manifest or {}).get("distributions")):
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
        spec = as_dict((self.manifest or {}).get("spec"))
        return strings(spec.get("requirements"))

    @property
    def requirements_files(self) -> list[str]:
        spec = as_dict((self.manifest or {}).get("spec"))
        return file_paths(spec.get("requirements_files"))

    @property
    def constraints_files(self) -> list[str]:
        spec = as_dict((self.manifest or {}).get("spec"))
        return file_paths(spec.get("constraints_files"))

    @property
    def implied_pins(self) -> list[str]:
        return strings((self.manifest or {}).get("implied_pins"))

    @property
    def repairs(self) -> list[str]:
        return strings((self.manifest or {}).get("repairs"))

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
            "installer": _string_or_none((self.manifest or {}).get("installer")),
            "size": self.size,
            "created": iso(self.created),
            "last_used": iso(self.last_used),
        }


NOT_ADAPTERS = dbt_lines.NOT_ADAPTERS


# Readers of a manifest that may have been damaged by hand: a field of the wrong type reads
# as empty, never as a crash.
def as_dict(value: object) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def as_list(value: object) -> list[Any]:
    return value if isinstance(value, list) else []


def strings(value: object) -> list[str]:
    return [str(item) for item in as_list(value) if isinstance(item, (str, int, float))]


def file_paths(value: object) -> list[str]:
    return [str(f.get("path")) for f in as_list(value) if isinstance(f, dict)]


def _string_or_none(value: object) -> str | None:
    return value if isinstance(value, str) else None


def canonical_name(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def iso(timestamp: float | None) -> str | None:
    """A time as ISO 8601 in UTC, to the second: `2026-11-24T15:00:00+00:00`."""
    if timestamp is None:
        return None
    from datetime import datetime, timezone

    try:
        when = datetime.fromtimestamp(timestamp, timezone.utc)
    except (OverflowError, OSError, ValueError):  # an mtime set beyond year 9999
        return None
    return when.isoformat(timespec="seconds")


def parse_iso(text: object) -> float | None:
    if not isinstance(text, str):
        return None
    from datetime import datetime, timezone

    try:
        parsed = datetime.fromisoformat(text)
        if parsed.tzinfo is None:
            parsed = parsed.replace(tzinfo=timezone.utc)
        return parsed.timestamp()
    except (ValueError, OverflowError, OSError):
        return None


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
