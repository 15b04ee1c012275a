"""env gc: old, incomplete and in-use envs, stale locks, trash, and the temporary envs of
killed runs, with real envs, real locks and real (SIGKILLed) processes.

Every gc here runs with TMPDIR under tmp_path, so it never looks at the real temp dir."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import time
from pathlib import Path

import psutil
import pytest
from conftest import MakeEnv, Result, RunDbtvenv
from lockfaults import dead_pid, plant_lock
from procs import assert_no_survivors, kill_quietly
from test_env_commands import env_list, long_run, prepare, set_last_use, wait_for_dbt

DAY = 86400.0


@pytest.fixture
def tmpdir_env(tmp_path: Path) -> dict[str, str]:
    temp = tmp_path / "t"
    temp.mkdir()
    return {"TMPDIR": str(temp)}


def gc(dbtvenv: RunDbtvenv, tmpdir_env: dict[str, str], *args: str | Path) -> Result:
    result = dbtvenv("env", "gc", *args, env=tmpdir_env)
    assert result.returncode == 0, result
    return result


def report(result: Result) -> dict[str, tuple[str, str]]:
    """gc's stdout as {path: (size, why)}, and its last line under the key 'total'."""
    *lines, total = result.out.splitlines()
    found = {}
    for line in lines:
        match = re.fullmatch(
            r"(?:removed|would remove)\s+(\d+ B|\d+\.\d \wiB)  (\S+)  \((.*)\)", line
        )
        assert match, line
        found[match[2]] = (match[1], match[3])
    found["total"] = (total, "")
    return found


def test_gc_removes_old_and_incomplete_envs_stale_locks_and_trash(
    dbtvenv: RunDbtvenv,
    cache_dir: Path,
    standin_env: dict[str, str],
    tmpdir_env: dict[str, str],
) -> None:
    old = prepare(dbtvenv, cache_dir, standin_env, "dbt-standin==1.0.0")
    recent = prepare(dbtvenv, cache_dir, standin_env, "dbt-standin==2.0.0")
    crashed = prepare(dbtvenv, cache_dir, standin_env, "dbt-standin==1.0.0 no-dbt-here==1.0.0")
    building = cache_dir / "00000000000000aa"
    # `old` is used for real once, which records its use; then it is made to look 40 days old.
    ran = dbtvenv("run", "--venv-dir", cache_dir, env={**standin_env, **tmpdir_env})
    assert ran.returncode == 0, ran
    assert (old / "dbtvenv.use").is_file()
    set_last_use(old, time.time() - 40 * DAY)
    set_last_use(recent, time.time() - 29 * DAY)
    (crashed / "dbtvenv.json").unlink()  # a build killed before its manifest
    # A build in progress: incomplete, and its lock names a live process (this one).
    (building / "bin").mkdir(parents=True)
    me = psutil.Process()
    plant_lock(cache_dir / f"{building.name}.lock", pid=me.pid, create_time=me.create_time())
    stale = cache_dir / "00000000000000bb.lock"
    plant_lock(stale, pid=dead_pid(), create_time=time.time() - 5)
    trash = cache_dir / ".00000000000000cc.0123abcd.trash"  # a removal cut short
    (trash / "bin").mkdir(parents=True)
    (trash / "bin" / "f").write_bytes(b"x" * 10000)
    before = sorted(p.name for p in cache_dir.iterdir())

    dry = gc(dbtvenv, tmpdir_env, "--venv-dir", cache_dir, "--dry-run")
    assert sorted(p.name for p in cache_dir.iterdir()) == before, "a dry run removes nothing"
    would = report(dry)
    assert set(would) == {str(old), str(crashed), str(stale), str(trash), "total"}
    assert would[str(old)][1].startswith("not used since ")
    assert re.fullmatch(r"\d+\.\d KiB", would[str(old)][0])
    assert "incomplete" in would[str(crashed)][1]
    assert "stale lock" in would[str(stale)][1] and "is gone" in would[str(stale)][1]
    assert re.fullmatch(
        r"would free \d+\.\d KiB \(4 items\); nothing was removed \(--dry-run\)", would["total"][0]
    )

    done = gc(dbtvenv, tmpdir_env, "--venv-dir", cache_dir)
    removed = report(done)
    assert set(removed) == set(would)
    assert re.fullmatch(r"freed \d+\.\d KiB \(4 items\)", removed["total"][0])
    assert not old.exists() and not crashed.exists() and not stale.exists()
    assert not trash.exists()
    assert (recent / "dbtvenv.json").is_file(), "used within 30 days: kept"
    assert building.is_dir(), "a live builder's env is kept"
    assert (cache_dir / f"{building.name}.lock").is_file(), "a live lock is kept"
    assert [row["key"] for row in env_list(dbtvenv, cache_dir)] == [building.name, recent.name]

    nothing = gc(dbtvenv, tmpdir_env, "--venv-dir", cache_dir)
    assert nothing.out == "nothing to remove\n"

    shorter = gc(dbtvenv, tmpdir_env, "--venv-dir", cache_dir, "--older-than", "4w")
    assert str(recent) in shorter.out and not recent.exists()


def test_gc_never_removes_an_env_in_use(
    dbtvenv: RunDbtvenv,
    dbtvenv_cmd: list[str],
    make_env: MakeEnv,
    tmp_path: Path,
    cache_dir: Path,
    standin_env: dict[str, str],
    tmpdir_env: dict[str, str],
) -> None:
    env_dir = prepare(dbtvenv, cache_dir, standin_env, standin_env["DBTVENV_REQUIREMENTS"])
    with long_run(dbtvenv_cmd, make_env, tmp_path, standin_env, "--venv-dir", str(cache_dir)):
        set_last_use(env_dir, time.time() - 400 * DAY)
        for args in (["--dry-run"], []):
            kept = gc(dbtvenv, tmpdir_env, "--venv-dir", cache_dir, "--older-than", "0s", *args)
            assert kept.out == "nothing to remove\n", kept
            assert f"keeping env {env_dir.name}: dbt is running in it" in kept.err
        assert (env_dir / "dbtvenv.json").is_file() and (env_dir / "bin" / "dbt").exists()

    collected = gc(dbtvenv, tmpdir_env, "--venv-dir", cache_dir, "--older-than", "0s")
    assert str(env_dir) in collected.out and "keeping" not in collected.err
    assert not env_dir.exists()


def test_gc_removes_the_temporary_env_of_a_killed_run_but_not_of_a_live_one(
    dbtvenv: RunDbtvenv,
    dbtvenv_cmd: list[str],
    make_env: MakeEnv,
    tmp_path: Path,
    standin_env: dict[str, str],
    tmpdir_env: dict[str, str],
) -> None:
    temp = Path(tmpdir_env["TMPDIR"])
    pidfile = tmp_path / "dbt.pid"
    err = tmp_path / "run.err"
    with open(err, "wb") as stderr:
        run = subprocess.Popen(
            [*dbtvenv_cmd, "run"],
            env=make_env(
                {
                    **standin_env,
                    **tmpdir_env,
                    "STANDIN_SLEEP": "300",
                    "STANDIN_PIDFILE": str(pidfile),
                }
            ),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=stderr,
        )
    dbt_pid = None
    try:
        dbt_pid = wait_for_dbt(run, pidfile, err)
        (env_base,) = temp.iterdir()
        assert env_base.name.startswith("dbtvenv-")

        live = gc(dbtvenv, tmpdir_env)
        assert live.out == "nothing to remove\n", "a live run's temporary env is kept"
        assert (env_base / "env" / "bin" / "dbt").exists()

        run.send_signal(signal.SIGKILL)
        assert run.wait(timeout=30) == -signal.SIGKILL
        assert_no_survivors([dbt_pid], timeout=10)  # dbt dies with it (parent-death signal)
        assert env_base.is_dir(), "SIGKILL leaves the temporary env behind"

        dry = gc(dbtvenv, tmpdir_env, "--dry-run")
        assert report(dry)[str(env_base)][1] == "temporary env of a run that was killed"
        assert env_base.is_dir()
        collected = gc(dbtvenv, tmpdir_env)
        assert str(env_base) in collected.out
        assert not env_base.exists() and list(temp.iterdir()) == []
    finally:
        kill_quietly([run.pid, *([dbt_pid] if dbt_pid else [])])
        run.wait(timeout=30)


def test_gc_leaves_temp_dirs_it_cannot_vouch_for(
    dbtvenv: RunDbtvenv, tmpdir_env: dict[str, str]
) -> None:
    """Only dbtvenv's own private temp dirs of a dead run on this host are removed."""
    temp = Path(tmpdir_env["TMPDIR"])
    old = time.time() - DAY

    def temp_dir(
        name: str,
        owner: dict[str, object] | str | None,
        mode: int = 0o700,
        *,
        empty: bool = False,
    ) -> Path:
        path = temp / name
        path.mkdir()
        if not empty:
            (path / "env").mkdir()
        if owner is not None:
            text = owner if isinstance(owner, str) else json.dumps(owner)
            (path / "owner.json").write_text(text)
        path.chmod(mode)
        os.utime(path, (old, old))
        return path

    pid = dead_pid()
    dead_here = {"pid": pid, "create_time": time.time() - 60, "hostname": socket.gethostname()}
    abandoned = temp_dir("dbtvenv-abc12345", dead_here)
    other_host = temp_dir("dbtvenv-def12345", {**dead_here, "hostname": "another-host"})
    not_ours = temp_dir("dbtvenv-venv", None, 0o755)  # e.g. somebody's venv called so
    no_owner = temp_dir("dbtvenv-ghi12345", None)
    shared_mode = temp_dir("dbtvenv-jkl12345", dead_here, 0o755)
    # Killed between creating its dir and writing its owner: removed once a minute old.
    killed_at_once = temp_dir("dbtvenv-mno12345", None, empty=True)
    empty_not_ours = temp_dir("dbtvenv-work", None, empty=True)
    # An owner no run writes: a pid JSON reads as a float too large for an int, or `true`.
    here = json.dumps(socket.gethostname())
    huge_pid = temp_dir(
        "dbtvenv-pqr12345", f'{{"pid": 1e400, "create_time": 1, "hostname": {here}}}'
    )
    bool_pid = temp_dir(
        "dbtvenv-stu12345", f'{{"pid": true, "create_time": 1, "hostname": {here}}}'
    )

    collected = gc(dbtvenv, tmpdir_env)
    assert set(report(collected)) == {str(abandoned), str(killed_at_once), "total"}
    assert not abandoned.exists() and not killed_at_once.exists()
    for kept in (other_host, not_ours, no_owner, shared_mode, empty_not_ours, huge_pid, bool_pid):
        assert kept.is_dir(), kept


@pytest.mark.parametrize("bad", ["1x", "-1d", "", "d", "10 years", "1e3"])
def test_gc_rejects_a_bad_duration(
    dbtvenv: RunDbtvenv, tmp_path: Path, tmpdir_env: dict[str, str], bad: str
) -> None:
    result = dbtvenv("env", "gc", "--venv-dir", tmp_path, "--older-than", bad, env=tmpdir_env)
    assert result.returncode == 64, result
    assert result.stdout == b""
    assert result.err.startswith(f"dbtvenv: error: --older-than {bad!r} is not a duration")


def test_gc_checks_again_under_the_lock(
    dbtvenv: RunDbtvenv, cache_dir: Path, standin_env: dict[str, str]
) -> None:
    """What gc found old may have been rebuilt or used since its scan: under the env's lock
    it looks again, and keeps an env that is fresh by then."""
    from dbtvenv import gc as collector
    from dbtvenv.progress import Reporter

    env_dir = prepare(dbtvenv, cache_dir, standin_env, "dbt-standin==1.0.0")
    scanned_at = time.time()
    set_last_use(env_dir, scanned_at - 40 * DAY)  # what the scan saw: 40 days unused
    cutoff = scanned_at - 30 * DAY
    set_last_use(env_dir, scanned_at)  # then a run used it, before gc took the lock
    assert not collector._remove_locked(cache_dir, env_dir.name, cutoff, Reporter())
    assert (env_dir / "dbtvenv.json").is_file()
    set_last_use(env_dir, scanned_at - 40 * DAY)
    assert collector._remove_locked(cache_dir, env_dir.name, cutoff, Reporter())
    assert not env_dir.exists()


def test_gc_removes_the_guards_of_keys_with_neither_env_nor_lock(
    dbtvenv: RunDbtvenv,
    cache_dir: Path,
    standin_env: dict[str, str],
    tmpdir_env: dict[str, str],
) -> None:
    """A failed build leaves its empty guard file; gc removes it, and only such guards."""
    import fcntl

    env_dir = prepare(dbtvenv, cache_dir, standin_env, "dbt-standin==1.0.0")
    failed = dbtvenv(
        "run", "--venv-dir", cache_dir, env={**standin_env, "DBTVENV_REQUIREMENTS": "no-dbt-here"}
    )
    assert failed.returncode == 69, failed
    guards = {p.name for p in cache_dir.glob("*.lock.guard")}
    orphan = cache_dir / next(g for g in guards if not g.startswith(env_dir.name))
    kept = cache_dir / f"{env_dir.name}.lock.guard"
    assert kept.exists() and orphan.exists()
    busy = cache_dir / "00000000000000dd.lock.guard"  # somebody looks at that lock right now
    busy.touch()
    not_ours = cache_dir / "00000000000000ee.lock.guard"
    not_ours.write_text("notes")
    with open(busy, "rb") as held:
        fcntl.flock(held.fileno(), fcntl.LOCK_EX)
        collected = gc(dbtvenv, tmpdir_env, "--venv-dir", cache_dir)
    assert not orphan.exists()
    assert kept.exists(), "the guard of an existing env stays"
    assert busy.exists() and not_ours.exists()
    assert "guard" not in collected.out  # bookkeeping, not listed
    again = dbtvenv("run", "--venv-dir", cache_dir, env={**standin_env, **tmpdir_env})
    assert again.returncode == 0, again
