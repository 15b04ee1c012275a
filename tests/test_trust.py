"""A cache dir shared with other users: what they plant there is never run, written through,
deleted or told a secret. Every test here acts as real unprivileged users (``setpriv`` with
throw-away uids, see tests/users.py) against dirs they can really write."""

from __future__ import annotations

import os
import stat
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import Result
from users import ALICE, BOB, SHARE, PublicDbtvenv, can_switch_users

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="Linux users and file modes")

PRECIOUS = "alice's thesis: must never be truncated, chmod-ed or deleted\n"


@pytest.fixture(scope="module")
def users(wheelhouse: Path) -> Iterator[PublicDbtvenv]:
    if not can_switch_users():
        pytest.skip("acting as other users needs root and setpriv")
    public = PublicDbtvenv(wheelhouse)
    try:
        yield public
    finally:
        public.remove()


@pytest.fixture
def thesis(users: PublicDbtvenv) -> Iterator[Path]:
    """A file of alice's that bob points his planted links at."""
    path = users.home(ALICE) / "thesis.txt"
    path.write_text(PRECIOUS)
    os.chown(path, ALICE, ALICE)
    path.chmod(0o600)
    past = time.time() - 3600
    os.utime(path, (past, past))
    yield path
    path.unlink(missing_ok=True)


def assert_intact(path: Path) -> None:
    st = path.stat()
    assert path.read_text() == PRECIOUS
    assert stat.S_IMODE(st.st_mode) == 0o600 and st.st_uid == ALICE
    assert time.time() - st.st_mtime > 3000


def one_error(result: Result) -> str:
    """The one `dbtvenv: error:` line of a refusal (and nothing like a traceback)."""
    errors = [line for line in result.err.splitlines() if line.startswith("dbtvenv: error:")]
    assert len(errors) == 1 and "Traceback" not in result.err, result
    assert result.stdout == b"", result
    return errors[0]


def env_path(users: PublicDbtvenv, uid: int, cache: Path, groups: tuple[int, ...] = ()) -> Path:
    found = users.run(uid, "env", "path", "--venv-dir", cache, groups=groups)
    assert found.returncode == 0, found
    return Path(found.out.strip())


# --- planted lock guards ------------------------------------------------------------------


@pytest.mark.parametrize("planted", ["symlink", "fifo", "file"])
def test_a_planted_lock_guard_is_never_followed_or_opened(
    users: PublicDbtvenv, thesis: Path, planted: str
) -> None:
    """A team dir (sticky, setgid, group-writable): bob puts a symbolic link to alice's file,
    a FIFO or a file of his own where alice's next build opens its lock guard."""
    cache = users.shared_dir(f"guard-{planted}", 0o3775, gid=SHARE)
    env_dir = env_path(users, ALICE, cache, (SHARE,))
    guard = cache / f"{env_dir.name}.lock.guard"
    plant = {
        "symlink": f"ln -s {thesis} {guard}",
        "fifo": f"mkfifo -m 666 {guard}",
        "file": f"touch {guard}",
    }[planted]
    users.shell(BOB, plant, groups=(SHARE,))

    result = users.run(
        ALICE, "env", "prepare", "--venv-dir", cache, "--lock-timeout", "2", groups=(SHARE,)
    )
    assert result.returncode == 73, result
    error = one_error(result)
    assert str(guard) in error and f"uid {BOB}" in error, error
    expected = {"symlink": "symbolic link", "fifo": "a FIFO", "file": "does not trust"}
    assert expected[planted] in error, error
    assert_intact(thesis)
    assert not env_dir.exists()
    assert os.lstat(guard).st_uid == BOB  # not ours: left where it is
