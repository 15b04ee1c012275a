"""Many dbtvenv processes, one cache dir: the env is built once, and the lock never lies.

Every build downloads the stand-in wheel from a server of the test (`lockfaults.WheelServer`),
so "built exactly once" is counted twice: GETs of the wheel, and "building env" lines across
all the processes' stderr. The server holds the download back where a test needs every
process to be in a known state (waiting for the lock) before the build may go on.
"""

from __future__ import annotations

import json
import socket
import subprocess
import time
from pathlib import Path

import psutil
import pytest
from conftest import MakeEnv, RunDbtvenv
from lockfaults import Background, WheelServer, dead_pid, plant_lock, wait_until
from procs import assert_no_survivors, wait_for_pidfile

OTHER_HOST = "dbtvenv-other-host"


def _spec(cache: Path, pip_options: str, **extra: str) -> dict[str, str]:
    return {
        "DBTVENV_REQUIREMENTS": "dbt-standin==1.0.0",
        "DBTVENV_PIP_INSTALL_OPTIONS": pip_options,
        "DBTVENV_VENV_DIR": str(cache),
        "DBTVENV_LOCK_TIMEOUT": "120",
        **extra,
    }


def _env_dir(dbtvenv: RunDbtvenv, spec: dict[str, str]) -> Path:
    found = dbtvenv("env", "path", env=spec)
    assert found.returncode == 0, str(found)
    return Path(found.out.strip())


def _lock_of(env_dir: Path) -> Path:
    return env_dir.with_name(env_dir.name + ".lock")


def _start(
    dbtvenv_cmd: list[str], args: list[str], env: dict[str, str], tmp_path: Path, name: str
) -> Background:
    return Background([*dbtvenv_cmd, *args], env, tmp_path / "runs", name)


def _start_sleeping_dbt(
    dbtvenv_cmd: list[str], make_env: MakeEnv, spec: dict[str, str], tmp_path: Path
) -> Background:
    """A `dbtvenv run` of `spec` whose dbt sleeps for a minute; returns once dbt runs (the env
    is built by then)."""
    pidfile = tmp_path / "dbt.pid"
    long_run = {**spec, "STANDIN_SLEEP": "60", "STANDIN_PIDFILE": str(pidfile)}
    first = _start(dbtvenv_cmd, ["run"], make_env(long_run), tmp_path, "first")
    try:
        wait_for_pidfile(pidfile, timeout=120)
    except BaseException:
        first.kill()
        raise
    return first


def _kill_all(runs: list[Background]) -> None:
    for run in runs:
        run.kill()


def test_sixteen_runs_at_once_build_the_env_exactly_once(
    wheels: WheelServer,
    tmp_path: Path,
    make_env: MakeEnv,
    dbtvenv_cmd: list[str],
    dbtvenv: RunDbtvenv,
) -> None:
    spec = _spec(tmp_path / "cache", wheels.pip_options)
    env_dir = _env_dir(dbtvenv, spec)
    wheels.hold()
    runs = [
        _start(
            dbtvenv_cmd,
            ["run", "--select", f"model_{i}"] if i % 2 else ["env", "prepare"],
            make_env(spec),
            tmp_path,
            f"run{i}",
        )
        for i in range(16)
    ]
    try:
        # One of them builds (its download is held back), the fifteen others wait for it.
        wheels.wait_for_get()
        wait_until(
            lambda: sum("waiting for the lock" in run.stderr() for run in runs) == 15,
            "15 runs wait for the lock",
        )
        wheels.release()
        results = [run.wait() for run in runs]
    finally:
        _kill_all(runs)

    for result in results:
        assert result.returncode == 0, str(result)
    builders = [run for run, result in zip(runs, results) if "building env" in result.err]
    assert len(builders) == 1, [result.err for result in results]
    assert sum(result.err.count("building env") for result in results) == 1
    assert wheels.gets() == 1
    builder = builders[0]
    me = socket.gethostname()
    for run, result in zip(runs, results):
        if run is not builder:
            first_wait = next(line for line in result.err.splitlines() if "waiting for" in line)
            assert f"held by pid {builder.pid} on {me} since " in first_wait
            assert "taking over" not in result.err
    for i, result in enumerate(results):
        if i % 2:
            report = result.json()
            assert report["argv"] == ["run", "--select", f"model_{i}"]
            assert report["prefix"] == str(env_dir)
        else:
            assert result.out == f"{env_dir}\n"
    assert (env_dir / "dbtvenv.json").is_file()
    assert not _lock_of(env_dir).exists()
    assert sorted(p.name for p in env_dir.parent.iterdir() if p.is_dir()) == [env_dir.name]


@pytest.mark.parametrize("when", ["dead before they start", "dies while they wait"])
def test_of_many_waiters_exactly_one_takes_over_a_stale_lock(
    when: str,
    wheels: WheelServer,
    tmp_path: Path,
    make_env: MakeEnv,
    dbtvenv_cmd: list[str],
    dbtvenv: RunDbtvenv,
) -> None:
    spec = _spec(tmp_path / "cache", wheels.pip_options)
    env_dir = _env_dir(dbtvenv, spec)
    lock = _lock_of(env_dir)
    holder = subprocess.Popen(["sleep", "600"])
    try:
        if when == "dead before they start":
            plant_lock(lock, pid=dead_pid(), create_time=time.time() - 5)
            wheels.hold()  # so that all of them meet the lock before the build is over
        else:
            plant_lock(lock, pid=holder.pid, create_time=psutil.Process(holder.pid).create_time())
        runs = [_start(dbtvenv_cmd, ["run"], make_env(spec), tmp_path, f"run{i}") for i in range(8)]
        try:
            if when == "dead before they start":
                wheels.wait_for_get()
                wait_until(
                    lambda: sum("waiting for the lock" in run.stderr() for run in runs) == 7,
                    "7 runs wait for the one that took over",
                )
                wheels.release()
            else:
                wait_until(
                    lambda: all(f"pid {holder.pid} on" in run.stderr() for run in runs),
                    "all 8 runs wait for the planted holder",
                )
                holder.kill()  # now all eight find it dead at their next look, within 1 s
                holder.wait()
            results = [run.wait() for run in runs]
        finally:
            _kill_all(runs)
    finally:
        holder.kill()
        holder.wait()

    for result in results:
        assert result.returncode == 0, str(result)
    takeovers = [line for r in results for line in r.err.splitlines() if "taking over" in line]
    assert len(takeovers) == 1, takeovers
    assert "is gone" in takeovers[0]
    assert sum(result.err.count("building env") for result in results) == 1
    assert wheels.gets() == 1
    assert not lock.exists()


def test_a_live_holder_on_another_host_is_never_taken_over(
    wheels: WheelServer,
    tmp_path: Path,
    make_env: MakeEnv,
    dbtvenv_cmd: list[str],
    dbtvenv: RunDbtvenv,
) -> None:
    probe = subprocess.run(
        ["unshare", "-u", "sh", "-c", f"hostname {OTHER_HOST} && hostname"],
        capture_output=True,
        text=True,
    )
    if probe.returncode != 0 or probe.stdout.strip() != OTHER_HOST:
        pytest.skip(f"cannot give a process another hostname here (unshare -u): {probe.stderr}")
    lease = 2.0
    spec = _spec(tmp_path / "cache", wheels.pip_options, DBTVENV_LOCK_LEASE=f"{lease:g}")
    env_dir = _env_dir(dbtvenv, spec)
    lock = _lock_of(env_dir)
    wheels.hold()
    as_other_host = ["unshare", "-u", "sh", "-c", f'hostname {OTHER_HOST} && exec "$0" "$@"']
    holder = Background(
        [*as_other_host, *dbtvenv_cmd, "env", "prepare"], make_env(spec), tmp_path, "holder"
    )
    waiter = None
    try:
        wheels.wait_for_get()  # the holder is inside pip's download: it holds the lock
        assert json.loads(lock.read_text())["hostname"] == OTHER_HOST
        waiter = _start(dbtvenv_cmd, ["run"], make_env(spec), tmp_path, "waiter")
        wait_until(lambda: f"on {OTHER_HOST} since" in waiter.stderr(), "the waiter waits")
        # Three leases long, the holder's build goes on; it must keep its lock fresh all along.
        oldest = 0.0
        until = time.monotonic() + 3 * lease
        while time.monotonic() < until:
            oldest = max(oldest, time.time() - lock.stat().st_mtime)
            assert waiter.proc.poll() is None, waiter.stderr()
            time.sleep(0.05)
        assert oldest < lease
        assert "taking over" not in waiter.stderr()
        wheels.release()
        held = holder.wait()
        waited = waiter.wait()
    finally:
        holder.kill()
        if waiter is not None:
            waiter.kill()

    assert held.returncode == 0, str(held)
    assert waited.returncode == 0, str(waited)
    assert "building env" in held.err
    assert "taking over" not in waited.err
    assert "building env" not in waited.err
    assert waited.json()["prefix"] == str(env_dir)
    assert wheels.gets() == 1


def test_the_lock_is_released_before_dbt_starts(
    standin_env: dict[str, str],
    tmp_path: Path,
    make_env: MakeEnv,
    dbtvenv_cmd: list[str],
    dbtvenv: RunDbtvenv,
) -> None:
    spec = {**standin_env, "DBTVENV_VENV_DIR": str(tmp_path / "cache")}
    env_dir = _env_dir(dbtvenv, spec)
    first = _start_sleeping_dbt(dbtvenv_cmd, make_env, spec, tmp_path)
    try:
        assert "building env" in first.stderr()
        assert not _lock_of(env_dir).exists()
        status = dbtvenv("lock", "status", "--json", env=spec)
        assert status.returncode == 0, str(status)
        assert json.loads(status.out)["state"] == "free"
        second = dbtvenv("run", "--lock-timeout", "0", env=spec, timeout=60)
        assert second.returncode == 0, str(second)
        assert second.json()["prefix"] == str(env_dir)
        assert first.proc.poll() is None  # the first dbt still sleeps
    finally:
        first.proc.terminate()
        stopped = first.wait(timeout=60)
    assert stopped.returncode == 143, str(stopped)


def test_a_builder_whose_lock_was_taken_over_backs_off(
    wheels: WheelServer,
    tmp_path: Path,
    make_env: MakeEnv,
    dbtvenv_cmd: list[str],
    dbtvenv: RunDbtvenv,
) -> None:
    """What a holder on another host does after being stopped longer than its lease."""
    spec = _spec(tmp_path / "cache", wheels.pip_options)
    env_dir = _env_dir(dbtvenv, spec)
    lock = _lock_of(env_dir)
    wheels.hold()
    builder = _start(dbtvenv_cmd, ["env", "prepare"], make_env(spec), tmp_path, "builder")
    taker = subprocess.Popen(["sleep", "600"])
    try:
        wheels.wait_for_get()  # the builder is inside pip's download
        helpers = psutil.Process(builder.pid).children(recursive=True)
        # Another process takes the lock over, as a waiter that judged the builder dead would.
        planted = plant_lock(
            lock.with_name("planted"),
            pid=taker.pid,
            create_time=psutil.Process(taker.pid).create_time(),
        )
        lock.with_name("planted").rename(lock)
        result = builder.wait(timeout=60)
    finally:
        builder.kill()
        taker.kill()
        taker.wait()
    assert result.returncode == 75, str(result)
    error = result.err.rstrip("\n").splitlines()[-1]
    assert error.startswith("dbtvenv: error: lost the lock"), result.err
    assert f"it now names pid {taker.pid} on {socket.gethostname()}" in error
    assert_no_survivors(helpers)
    assert env_dir.is_dir(), "the env dir is the new holder's: it must stay"
    assert not (env_dir / "dbtvenv.json").exists()
    assert json.loads(lock.read_text()) == planted


def test_a_broken_env_is_not_rebuilt_under_a_running_dbt(
    standin_env: dict[str, str],
    tmp_path: Path,
    make_env: MakeEnv,
    dbtvenv_cmd: list[str],
    dbtvenv: RunDbtvenv,
) -> None:
    spec = {**standin_env, "DBTVENV_VENV_DIR": str(tmp_path / "cache")}
    env_dir = _env_dir(dbtvenv, spec)
    first = _start_sleeping_dbt(dbtvenv_cmd, make_env, spec, tmp_path)
    try:
        (env_dir / "bin" / "dbt").unlink()  # broken while a dbt runs in it
        refused = dbtvenv("run", env=spec)
        assert refused.returncode == 75, str(refused)
        assert "a dbt is still running in it" in refused.err
        assert (env_dir / "dbtvenv.json").is_file()  # left as it was, under the running dbt
        assert first.proc.poll() is None
    finally:
        first.proc.terminate()
        first.wait(timeout=60)
    rebuilt = dbtvenv("run", env=spec)
    assert rebuilt.returncode == 0, str(rebuilt)
    assert "building env" in rebuilt.err and "its dbt executable is gone" in rebuilt.err
    assert rebuilt.json()["prefix"] == str(env_dir)
