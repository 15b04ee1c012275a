"""Whom dbtvenv trusts in a cache dir, and the checks that refuse everything else.

dbtvenv trusts the user running it, root, and the users named in `DBTVENV_TRUSTED_OWNERS`.
Nothing another user could have written or replaced is executed, written through or deleted:
a file counts as another user's when they own it, can write it, or can rename it away (it
sits in a dir they can write that has no sticky bit). docs/security.md states the model.

Cheap on purpose: a few `lstat` calls, no child process. It runs before every dbt command.
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

from dbtvenv.errors import UsageError, VenvDirError

TRUSTED_OWNERS_VAR = "DBTVENV_TRUSTED_OWNERS"
# More symbolic links than this on one path is a loop (the kernel's own limit).
MAX_SYMLINKS = 40


class Untrusted(VenvDirError):
    """Something in the cache dir that another user owns, could change, or planted."""


def trusted_uids() -> frozenset[int]:
    """The current user, root, and `DBTVENV_TRUSTED_OWNERS` (user names or uids)."""
    raw = os.environ.get(TRUSTED_OWNERS_VAR, "")
    cached = _cache.get(raw)
    if cached is None:
        cached = _cache[raw] = frozenset({os.geteuid(), 0, *_parse_owners(raw)})
    return cached


_cache: dict[str, frozenset[int]] = {}


def _parse_owners(raw: str) -> list[int]:
    uids = []
    for name in raw.replace(",", " ").split():
        if name.isdigit():
            uids.append(int(name))
            continue
        import pwd

        try:
            uids.append(pwd.getpwnam(name).pw_uid)
        except KeyError:
            raise UsageError(
                f"{TRUSTED_OWNERS_VAR} names {name!r}, which is no user of this system; "
                "list user names or numeric uids, separated by spaces or commas"
            ) from None
    return uids


def describe_owner(uid: int) -> str:
    """`bob (uid 1001)`, or `uid 1001` for a uid with no name here."""
    import pwd

    try:
        return f"{pwd.getpwuid(uid).pw_name} (uid {uid})"
    except KeyError:
        return f"uid {uid}"


def _describe_group(gid: int) -> str:
    import grp

    try:
        return f"group {grp.getgrgid(gid).gr_name} (gid {gid})"
    except KeyError:
        return f"group gid {gid}"


def refuse_owner(what: str, path: str, uid: int, *, doing: str = "using") -> Untrusted:
    owner = describe_owner(uid)
    return Untrusted(
        f"{what} {path} is owned by {owner}, whom dbtvenv does not trust; not {doing} it: "
        f"remove it (as its owner or root), add its owner to {TRUSTED_OWNERS_VAR} if you "
        "trust them, or choose another --venv-dir"
    )


def _writable_by_others(st: os.stat_result) -> str | None:
    """Who besides the owner may write this file or dir, or None."""
    mode = st.st_mode
    if mode & stat.S_IWOTH:
        return "every user"
    if mode & stat.S_IWGRP:
        return f"members of {_describe_group(st.st_gid)}"
    return None


def check_entry(what: str, path: str, st: os.stat_result, *, sticky_ok: bool = False) -> None:
    """Refuse a file or dir that is not a trusted user's alone to change.

    `sticky_ok`: a dir whose sticky bit keeps every user to their own entries (like /tmp) may
    be writable by others: they can add entries there, never rename or remove ours.
    """
    if st.st_uid not in trusted_uids():
        raise refuse_owner(what, path, st.st_uid)
    if sticky_ok and stat.S_ISDIR(st.st_mode) and st.st_mode & stat.S_ISVTX:
        return
    writers = _writable_by_others(st)
    if writers is None:
        return
    shown = (
        f"{what} {path} (mode {stat.S_IMODE(st.st_mode):04o}, owner {describe_owner(st.st_uid)})"
    )
    if sticky_ok and stat.S_ISDIR(st.st_mode):
        raise Untrusted(
            f"{shown} lets {writers} rename or replace what is in it; not using it: "
            f"chmod +t {path} so that each user can change only their own entries, or "
            f"chmod go-w {path}, or choose another --venv-dir"
        )
    raise Untrusted(
        f"{shown} can be changed by {writers}; not using it: remove it, or chmod go-w {path} "
        "once you know nobody changed it, or choose another --venv-dir"
    )


def check_dir_chain(path: Path, what: str = "venv dir") -> None:
    """Refuse `path` if another user could replace it: every dir on the way to it (symbolic
    links resolved one by one) and `path` itself must be a trusted user's, and writable by
    others only with the sticky bit. The part of `path` that does not exist yet is skipped."""
    shown = os.path.abspath(path)
    pending = [p for p in reversed(shown.split("/")) if p]
    current = "/"
    _check_dir(current, os.lstat(current), f"dir above {what} {shown}:")
    links = 0
    while pending:
        part = pending.pop()
        if part == ".":
            continue
        if part == "..":
            current = os.path.dirname(current)
            continue
        candidate = os.path.join(current, part)
        try:
            st = os.lstat(candidate)
        except (FileNotFoundError, NotADirectoryError, PermissionError):
            return  # made later, by us, under checked dirs; or the caller's access says why not
        if stat.S_ISLNK(st.st_mode):
            links += 1
            if links > MAX_SYMLINKS:
                raise VenvDirError(f"too many symbolic links on the way to {what} {shown}")
            target = os.readlink(candidate)
            if target.startswith("/"):
                current = "/"
            pending.extend(p for p in reversed(target.split("/")) if p)
            continue
        _check_dir(candidate, st, what if not pending else f"dir above {what} {shown}:")
        current = candidate


def _check_dir(path: str, st: os.stat_result, what: str) -> None:
    if stat.S_ISDIR(st.st_mode):  # anything else: the caller finds out, with its own message
        check_entry(what, path, st, sticky_ok=True)


def check_env(env_dir: Path) -> None:
    """Refuse an env that another user built, or could have changed since: the env dir and
    what dbtvenv runs or reads from it (bin/dbt, bin/python, pyvenv.cfg, the manifest,
    site-packages) must be trusted users' files that nobody else can write."""
    base = str(env_dir)
    check_entry("env", base, os.lstat(base))
    for relative in ("bin", "bin/dbt", "bin/python", "pyvenv.cfg", "dbtvenv.json", "lib"):
        _check_optional(os.path.join(base, relative), base)
    lib = os.path.join(base, "lib")
    try:
        versions = [n for n in os.listdir(lib) if n.startswith("python")]
    except OSError:
        return
    for name in versions:
        _check_optional(os.path.join(lib, name), base)
        _check_optional(os.path.join(lib, name, "site-packages"), base)


def _check_optional(path: str, env_dir: str) -> None:
    try:
        st = os.lstat(path)
    except OSError:
        return  # missing: the health check says so
    if stat.S_ISLNK(st.st_mode):
        return  # links cannot be changed, only replaced, which needs the checked dir
    check_entry(f"file of env {env_dir}:", path, st)


def open_regular(path: Path, *, what: str, create: bool = False, mode: int = 0o644) -> int:
    """Open a file of dbtvenv's own in the cache dir, never what another user planted there.

    A new file is made with O_EXCL (nothing planted is followed); an existing one is opened
    with O_NOFOLLOW and O_NONBLOCK and must be, on the descriptor itself, a regular file of a
    trusted user. Read-write where permitted (NFS needs it for an exclusive lock), read-only
    otherwise. Nothing is truncated or chmod-ed. Raises Untrusted, or OSError as `os.open`.
    """
    flags = os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
    for _ in range(8):
        if create:
            try:
                return os.open(path, flags | os.O_RDWR | os.O_CREAT | os.O_EXCL, mode)
            except FileExistsError:
                pass
        try:
            try:
                fd = os.open(path, flags | os.O_RDWR)
            except PermissionError:
                fd = os.open(path, flags | os.O_RDONLY)
        except FileNotFoundError:
            if create:
                continue  # removed between our two opens: make it anew
            raise
        except OSError as exc:
            if exc.errno in (errno.ELOOP, errno.EISDIR, errno.ENXIO, errno.EMLINK):
                raise _not_a_file(what, path) from None
            raise
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise _not_a_file(what, path)
            if st.st_uid not in trusted_uids():
                raise refuse_owner(what, str(path), st.st_uid)
        except BaseException:
            os.close(fd)
            raise
        return fd
    raise OSError(errno.EAGAIN, f"{path} keeps disappearing")


def _not_a_file(what: str, path: Path) -> Untrusted:
    try:
        st = os.lstat(path)
        kind = kind_of(st.st_mode)
        owner = f" owned by {describe_owner(st.st_uid)}"
    except OSError:
        kind, owner = "not a regular file", ""
    return Untrusted(
        f"{what} {path} is {kind}{owner}, not a file dbtvenv made; not following or opening "
        "it: remove it, or choose another --venv-dir"
    )


def kind_of(mode: int) -> str:
    if stat.S_ISREG(mode):
        return "a file"
    if stat.S_ISLNK(mode):
        return "a symbolic link"
    if stat.S_ISDIR(mode):
        return "a directory"
    if stat.S_ISFIFO(mode):
        return "a FIFO"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    return "not a regular file"


def same_file(fd: int, path: Path) -> bool:
    """Whether `path` still names the open file `fd` (not removed or replaced meanwhile)."""
    try:
        st = os.lstat(path)
    except OSError:
        return False
    mine = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (mine.st_dev, mine.st_ino)
