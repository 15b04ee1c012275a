"""What another user, a hostile argument or a secret in the environment must not achieve:
private dirs, no symlink followed into someone else's choice, no shell, nothing of the
environment printed."""

from __future__ import annotations

import json
import os
import shutil
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import MakeEnv, Result, RunDbtvenv

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="Linux users and file modes")

NOBODY = 65534
VICTIM_TEXT = "precious: must never be written through a planted link\n"


def _mode(path: Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


@pytest.fixture
def victim(tmp_path: Path) -> Path:
    """A file a planted symlink points at; nothing dbtvenv does may change it."""
    path = tmp_path / "victim.txt"
    path.write_text(VICTIM_TEXT)
    past = time.time() - 3600
    os.utime(path, (past, past))
    return path


def assert_untouched(victim: Path) -> None:
    assert victim.read_text() == VICTIM_TEXT
    assert time.time() - victim.stat().st_mtime > 3000


def _plant(link: Path, target: Path, *, age: float = 0.0) -> None:
    """A symlink owned by another user (as if they had put it there)."""
    if os.geteuid() != 0:
        pytest.skip("planting a symlink owned by another user needs root")
    link.symlink_to(target)
    os.lchown(link, NOBODY, NOBODY)
    if age:
        past = time.time() - age
        os.utime(link, (past, past), follow_symlinks=False)


def _key_dir(dbtvenv: RunDbtvenv, cache: Path, env: dict[str, str]) -> Path:
    result = dbtvenv("env", "path", "--venv-dir", cache, env=env)
    assert result.returncode == 0, result
    return Path(result.out.strip())


def test_cache_root_is_created_private(
    dbtvenv: RunDbtvenv, tmp_path: Path, standin_env: dict[str, str]
) -> None:
    cache = tmp_path / "new" / "cache"
    result = dbtvenv("env", "prepare", "--venv-dir", cache, env=standin_env)
    assert result.returncode == 0, result
    assert _mode(cache) == 0o700
    # an existing dir keeps the mode its owner gave it (a team's cache: sticky, see
    # docs/security.md; without the sticky bit it is refused, see tests/test_trust.py)
    shared = tmp_path / "shared"
    shared.mkdir(mode=0o755)
    shared.chmod(0o3775)
    result = dbtvenv("env", "prepare", "--venv-dir", shared, env=standin_env)
    assert result.returncode == 0, result
    assert _mode(shared) == 0o3775


def test_temporary_env_dir_is_private(
    dbtvenv_cmd: list[str], make_env: MakeEnv, tmp_path: Path, standin_env: dict[str, str]
) -> None:
    tmpdir = tmp_path / "t"
    tmpdir.mkdir(mode=0o777)
    tmpdir.chmod(0o1777)  # like /tmp
    pidfile = tmp_path / "dbt.pid"
    proc = subprocess.Popen(
        [*dbtvenv_cmd, "run"],
        env=make_env(
            {
                **standin_env,
                "TMPDIR": str(tmpdir),
                "STANDIN_PIDFILE": str(pidfile),
                "STANDIN_READ_STDIN": "1",  # dbt waits for stdin's end: our cue to finish
            }
        ),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 120
        while not pidfile.exists():
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "dbt never started"
            time.sleep(0.02)
        (temp,) = list(tmpdir.iterdir())
        assert temp.name.startswith("dbtvenv-")
        assert _mode(temp) == 0o700
        assert temp.stat().st_uid == os.geteuid()
        out, err = proc.communicate(input=b"", timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err
    assert json.loads(out)["prefix"].startswith(str(temp))
    assert list(tmpdir.iterdir()) == []


def test_foreign_symlink_as_venv_dir_is_refused(
    dbtvenv: RunDbtvenv, tmp_path: Path, standin_env: dict[str, str]
) -> None:
    target = tmp_path / "their-dir"
    target.mkdir()
    cache = str(tmp_path / "cache")
    _plant(Path(cache), target)
    for args in (
        ["run", "--venv-dir", cache, "--select", "x"],
        ["env", "prepare", "--venv-dir", cache],
    ):
        result = dbtvenv(*args, env=standin_env)
        assert result.returncode == 73, result
        assert result.stdout == b""
        assert "symbolic link owned by another user" in result.err, result
        assert f"uid {NOBODY}" in result.err and "Traceback" not in result.err
    assert list(target.iterdir()) == []  # not followed: nothing created through it
    assert Path(cache).is_symlink()  # and not removed either: it is not ours


def test_own_symlink_as_venv_dir_is_followed(
    dbtvenv: RunDbtvenv, tmp_path: Path, standin_env: dict[str, str]
) -> None:
    """The refusal is about another user's link, not links as such."""
    target = tmp_path / "real-cache"
    target.mkdir()
    cache = tmp_path / "cache"
    cache.symlink_to(target)
    result = dbtvenv("run", "--venv-dir", cache, env=standin_env)
    assert result.returncode == 0, result
    assert (target / "CACHEDIR.TAG").exists()


def test_stale_lock_symlink_is_replaced_never_followed(
    dbtvenv: RunDbtvenv, tmp_path: Path, standin_env: dict[str, str], victim: Path
) -> None:
    cache = tmp_path / "cache"
    cache.mkdir(mode=0o700)
    key_dir = _key_dir(dbtvenv, cache, standin_env)
    lock = cache / f"{key_dir.name}.lock"
    _plant(lock, victim, age=600)  # unreadable as a lock, and old: stale
    result = dbtvenv("run", "--venv-dir", cache, "--lock-timeout", "20", env=standin_env)
    assert result.returncode == 0, result
    assert "taking over the lock" in result.err, result
    assert_untouched(victim)
    assert not lock.exists() and not lock.is_symlink()


def test_fresh_lock_symlink_is_waited_for_never_followed(
    dbtvenv: RunDbtvenv, tmp_path: Path, standin_env: dict[str, str], victim: Path
) -> None:
    cache = tmp_path / "cache"
    cache.mkdir(mode=0o700)
    key_dir = _key_dir(dbtvenv, cache, standin_env)
    lock = cache / f"{key_dir.name}.lock"
    _plant(lock, victim)
    result = dbtvenv("run", "--venv-dir", cache, "--lock-timeout", "0.5", env=standin_env)
    assert result.returncode == 75, result
    assert result.stdout == b"" and "Traceback" not in result.err
    assert_untouched(victim)
    assert lock.is_symlink()  # a lock that may be alive is left to its holder
    assert not key_dir.exists()


def test_lock_guard_symlink_is_never_followed(
    dbtvenv: RunDbtvenv, tmp_path: Path, standin_env: dict[str, str], victim: Path
) -> None:
    cache = tmp_path / "cache"
    cache.mkdir(mode=0o700)
    key_dir = _key_dir(dbtvenv, cache, standin_env)
    _plant(cache / f"{key_dir.name}.lock.guard", victim)
    victim.chmod(0o600)
    result = dbtvenv("run", "--venv-dir", cache, "--lock-timeout", "2", env=standin_env)
    assert result.returncode == 73, result
    errors = [line for line in result.err.splitlines() if line.startswith("dbtvenv: error:")]
    assert len(errors) == 1 and "Traceback" not in result.err, result
    assert "symbolic link" in errors[0] and f"uid {NOBODY}" in errors[0], result
    assert_untouched(victim)
    assert _mode(victim) == 0o600  # not chmod-ed through the link either
    assert not key_dir.exists()


@pytest.mark.parametrize("dangling", [False, True], ids=["to-a-file", "dangling"])
def test_cachedir_tag_symlink_is_never_written_through(
    dbtvenv: RunDbtvenv,
    tmp_path: Path,
    standin_env: dict[str, str],
    victim: Path,
    dangling: bool,
) -> None:
    cache = tmp_path / "cache"
    cache.mkdir(mode=0o700)
    target = tmp_path / "not-yet" if dangling else victim
    _plant(cache / "CACHEDIR.TAG", target)
    result = dbtvenv("run", "--venv-dir", cache, env=standin_env)
    assert result.returncode == 0, result
    assert_untouched(victim)
    assert not (tmp_path / "not-yet").exists()


SHELL_BAITS = ["$(touch pwned-1)", "; touch pwned-2", "`touch pwned-3`", "| touch pwned-4", "&&"]


def test_no_shell_for_pip_options_or_dbt_args(
    dbtvenv: RunDbtvenv, tmp_path: Path, pip_offline_options: str
) -> None:
    work = tmp_path / "work"
    work.mkdir()
    requirements = work / "$(touch pwned-5).txt"
    requirements.write_text("dbt-standin==1.0.0\n")
    result = dbtvenv(
        "run",
        "--requirements-file",
        requirements,
        "--pip-install-options",
        f"{pip_offline_options} --log '$(touch pwned-6)'",
        "--venv-dir",
        tmp_path / "cache",
        "--",
        *SHELL_BAITS,
        cwd=work,
    )
    assert result.returncode == 0, result
    assert result.json()["argv"] == ["run", *SHELL_BAITS]
    # pip got the literal file name for its log, and wrote it there
    assert (work / "$(touch pwned-6)").is_file()
    created = sorted(p.name for p in work.iterdir())
    assert created == sorted(["$(touch pwned-5).txt", "$(touch pwned-6)"])
    assert not list(tmp_path.rglob("pwned-*"))


SECRET = "hunter2-Zq9-not-for-logs"


def test_environment_is_never_printed(
    dbtvenv: RunDbtvenv, tmp_path: Path, pip_offline_options: str
) -> None:
    cache = tmp_path / "cache"
    secrets_env = {
        "DBT_ENV_SECRET_PASSWORD": SECRET,
        "AWS_SECRET_ACCESS_KEY": SECRET + "-aws",
        "STANDIN_MARK": SECRET + "-mark",  # the stand-in echoes this one: proof dbt got it
        "DBTVENV_PIP_INSTALL_OPTIONS": pip_offline_options,
    }
    runs: dict[str, list[str | Path]] = {
        "build": ["run", "--requirements", "dbt-standin==1.0.0", "--venv-dir", cache],
        "warm": ["run", "--requirements", "dbt-standin==1.0.0", "--venv-dir", cache],
        "temporary": ["run", "--requirements", "dbt-standin==1.0.0"],
        "pip failure": ["run", "--requirements", "dbt-nope==1", "--venv-dir", cache],
        "no dbt": ["env", "prepare", "--requirements", "no-dbt-here", "--venv-dir", cache],
        "usage error": ["run", "--requirements", "dbt standin"],
        "env info": ["env", "info", "--requirements", "dbt-standin==1.0.0", "--venv-dir", cache],
        "env list": ["env", "list", "--venv-dir", cache, "--json"],
        "lock status": ["lock", "status", "--requirements", "dbt-standin", "--venv-dir", cache],
    }
    results: dict[str, Result] = {}
    for name, args in runs.items():
        results[name] = dbtvenv(*args, env=secrets_env, cwd=tmp_path)
    assert results["build"].returncode == 0, results["build"]
    assert results["pip failure"].returncode == 69, results["pip failure"]
    for name, result in results.items():
        assert SECRET not in result.err, f"{name}: the environment leaked into stderr\n{result}"
        if name in ("build", "warm", "temporary"):
            report = result.json()
            assert report["env"]["STANDIN_MARK"] == SECRET + "-mark"  # dbt's own echo
            assert result.out.count(SECRET) == 1, result
        else:
            assert SECRET not in result.out, f"{name}: the environment leaked into stdout"
    for path in cache.rglob("*"):
        if path.is_file() and path.suffix in (".json", ".lock", ".TAG", ".use"):
            assert SECRET not in path.read_text(errors="replace"), path


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A dir that `nobody` may enter without any capability (pytest's own temp dir is private
    to root), removed afterwards."""
    import tempfile

    path = Path(tempfile.mkdtemp(prefix="dbtvenv-test-shared."))
    try:
        path.chmod(0o755)
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def test_another_users_unreadable_lock_is_waited_for_never_taken_over(
    make_env: MakeEnv, standin_env: dict[str, str], shared_dir: Path
) -> None:
    """A group-shared cache where the holder's umask is 077: its lock cannot be read, so its
    holder may be alive, however old the file looks; taking it over would build the env twice."""
    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        pytest.skip("running as another user needs root and setpriv")
    cache = shared_dir / "cache"
    cache.mkdir()
    os.chown(cache, NOBODY, NOBODY)
    as_nobody = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups"]
    environ = make_env({**standin_env, "DBTVENV_VENV_DIR": str(cache), "HOME": "/"})
    environ.pop("TMPDIR", None)

    def run(*args: str) -> Result:
        done = subprocess.run(
            [*as_nobody, sys.executable, "-m", "dbtvenv", *args],
            env=environ,
            cwd="/",
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=120,
        )
        return Result(done.returncode, done.stdout, done.stderr)

    dead = subprocess.Popen(["true"])
    dead.wait()
    holder = {
        "pid": dead.pid,  # readable, this lock would be stale twice over
        "create_time": 1.0,
        "hostname": socket.gethostname(),
        "acquired_at": "2026-11-24T15:00:00+00:00",
        "argv": ["dbtvenv", "run"],
    }
    # The key as `nobody` computes it: its interpreter may be another one than ours.
    found = run("env", "path")
    assert found.returncode == 0, found
    env_dir = Path(found.out.strip())
    lock = env_dir.with_name(env_dir.name + ".lock")
    lock.write_text(json.dumps(holder) + "\n")
    lock.chmod(0o600)
    past = time.time() - 3600
    os.utime(lock, (past, past))
    status = run("lock", "status")
    assert status.returncode == 0, status
    assert "held" in status.out and "may not read" in status.out, status
    result = run("env", "prepare", "--lock-timeout", "2")
    assert result.returncode == 75, result
    assert "may not read" in result.err and "uid 0" in result.err, result
    assert json.loads(lock.read_text()) == holder
    assert not env_dir.exists()
