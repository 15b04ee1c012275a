"""The dbt child: its exit status, its environment, temporary envs, and nothing left behind."""

from __future__ import annotations

import os
import signal
import stat
import sys
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from conftest import MakeEnv, RunDbtvenv
from procs import assert_no_survivors, wait_for_pidfile
from test_signals import (
    LONG_SLEEP,
    Spawner,
    finish,
    in_mode,
    mode_of,
    prepare_persistent_env,
    read_lines,
    wait_for_lines,
)
from warmmode import MODES, assert_mode, warm_up

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux processes")


@pytest.fixture(scope="module", params=MODES)
def persistent_env(
    request: pytest.FixtureRequest,
    wheelhouse: Path,
    tmp_path_factory: pytest.TempPathFactory,
    _dbtvenv_pythonpath: str | None,
) -> Iterator[dict[str, str]]:
    """The stand-in's persistent env, run directly and warm."""
    settings = prepare_persistent_env(
        tmp_path_factory.mktemp("runner-cache"), wheelhouse, _dbtvenv_pythonpath
    )
    yield from in_mode(request.param, settings, tmp_path_factory, _dbtvenv_pythonpath)


@pytest.fixture
def spawner(dbtvenv_cmd: list[str], make_env: MakeEnv, tmp_path: Path) -> Iterator[Spawner]:
    spawner = Spawner(dbtvenv_cmd, make_env, tmp_path)
    yield spawner
    spawner.clean_up()


@pytest.fixture
def temporary_env(standin_env: dict[str, str], tmp_path: Path) -> dict[str, str]:
    """Settings for a temporary env, made under a TMPDIR of the test's own."""
    tmpdir = tmp_path / "tmp"
    tmpdir.mkdir()
    return {**standin_env, "TMPDIR": str(tmpdir)}


# --- exit status ------------------------------------------------------------------------


@pytest.mark.parametrize("code", [0, 1, 2, 3, 42])
def test_exit_status_is_dbts(
    dbtvenv: RunDbtvenv, persistent_env: dict[str, str], code: int
) -> None:
    result = dbtvenv("run", env={**persistent_env, "STANDIN_EXIT": str(code)})
    assert result.returncode == code, result
    assert result.json()["argv"] == ["run"]
    assert_mode(result.err, mode_of(persistent_env))


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGKILL], ids=lambda s: s.name)
def test_dbt_ended_by_a_signal_is_128_plus_n(
    dbtvenv: RunDbtvenv, persistent_env: dict[str, str], signum: signal.Signals
) -> None:
    result = dbtvenv("run", env={**persistent_env, "STANDIN_KILL_SELF": signum.name})
    assert result.returncode == 128 + signum, result
    assert "Traceback" not in result.err
    assert_mode(result.err, mode_of(persistent_env))


def test_exit_status_with_sigchld_ignored(spawner: Spawner, persistent_env: dict[str, str]) -> None:
    """Started with SIGCHLD ignored, the kernel would reap dbt by itself and its status be lost."""
    proc = spawner.start(
        "run",
        env={**persistent_env, "STANDIN_EXIT": "3"},
        ignoring=[signal.SIGCHLD],
    )
    status, stderr = finish(proc)
    assert status == 3, stderr
    assert_mode(stderr, mode_of(persistent_env))


# --- environment ------------------------------------------------------------------------


def test_dbt_environment(
    dbtvenv: RunDbtvenv, persistent_env: dict[str, str], tmp_path: Path, make_env: MakeEnv
) -> None:
    """dbt's environment is the caller's, with the env's own VIRTUAL_ENV and PATH and no
    PYTHONPATH or PYTHONHOME (which also never reach the warm process)."""
    shadow = tmp_path / "shadow"
    shadow.mkdir()
    (shadow / "shadowme.py").write_text("SHADOWED = True\n")
    project = tmp_path / "project"
    project.mkdir()
    path = os.environ["PATH"]
    env_path = dbtvenv("env", "path", env=persistent_env).out.strip()
    environ = {
        **persistent_env,
        "PYTHONPATH": str(shadow),
        "PYTHONHOME": sys.base_prefix,  # dbtvenv's own interpreter still starts with it
        "DBT_PROFILES_DIR": str(project / "profiles"),
        "STANDIN_MARK": "kept",
        "PATH": path,
    }
    mode = mode_of(persistent_env)
    if mode == "warm":  # DBT_* variables key the warm process: this one is new
        warm_up(make_env(environ))
    result = dbtvenv(
        "dbt", "--", "--log-level", "debug", "run", "--select", "a b", env=environ, cwd=project
    )
    assert result.returncode == 0, result
    assert_mode(result.err, mode)
    report = result.json()
    assert report["argv"] == ["--log-level", "debug", "run", "--select", "a b"]
    assert report["cwd"] == str(project)
    assert report["prefix"] == env_path
    assert report["env"] == {
        "VIRTUAL_ENV": env_path,
        "PATH": f"{env_path}/bin{os.pathsep}{path}",
        "PYTHONPATH": None,
        "PYTHONHOME": None,
        "DBT_PROFILES_DIR": str(project / "profiles"),
        "STANDIN_MARK": "kept",
    }
    assert report["shadow"] is None


# --- no process left behind -------------------------------------------------------------


@pytest.mark.parametrize("setsid", [False, True], ids=["in-dbts-group", "setsid"])
def test_a_child_dbt_leaves_running_is_killed(
    spawner: Spawner, persistent_env: dict[str, str], setsid: bool
) -> None:
    """dbt exits normally but leaves a child running; one that called setsid()
    escaped dbt's process group, and still cannot escape its subreaper (dbtvenv; in warm
    mode dbt itself, then the warm process)."""
    grandchild_pidfile = spawner.pidfile("grandchild.pid")
    # dbt lives a moment after the pidfile: its end kills the child, the test must see it first
    env = {
        **persistent_env,
        "STANDIN_GRANDCHILD_PIDFILE": str(grandchild_pidfile),
        "STANDIN_SLEEP": "0.5",
    }
    if setsid:
        env["STANDIN_GRANDCHILD_SETSID"] = "1"
    proc = spawner.start("run", env=env)
    grandchild = psutil.Process(wait_for_pidfile(grandchild_pidfile))
    if setsid:
        assert grandchild.pid == os.getsid(grandchild.pid)
    status, stderr = finish(proc)
    assert status == 0, stderr
    assert_mode(stderr, mode_of(persistent_env))
    assert_no_survivors([grandchild])


# --- temporary envs ---------------------------------------------------------------------


def test_temporary_env_is_removed_after_success(
    dbtvenv: RunDbtvenv, temporary_env: dict[str, str]
) -> None:
    tmpdir = Path(temporary_env["TMPDIR"])
    result = dbtvenv("run", env=temporary_env)
    assert result.returncode == 0, result
    virtual_env = Path(result.json()["env"]["VIRTUAL_ENV"])
    assert virtual_env.parent.parent == tmpdir
    assert virtual_env.parent.name.startswith("dbtvenv-")
    assert list(tmpdir.iterdir()) == []


def test_temporary_env_is_removed_after_dbt_fails(
    dbtvenv: RunDbtvenv, temporary_env: dict[str, str]
) -> None:
    result = dbtvenv("run", env={**temporary_env, "STANDIN_EXIT": "1"})
    assert result.returncode == 1, result
    assert list(Path(temporary_env["TMPDIR"]).iterdir()) == []


@pytest.mark.parametrize(
    "signum", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP], ids=lambda s: s.name
)
def test_temporary_env_while_dbt_runs_and_after_a_signal(
    spawner: Spawner, temporary_env: dict[str, str], tmp_path: Path, signum: int
) -> None:
    """Private (0700, prefix `dbtvenv-`) while dbt runs in it; gone after dbt is signalled."""
    tmpdir = Path(temporary_env["TMPDIR"])
    signals_file = tmp_path / "signals"
    pidfile = spawner.pidfile("dbt.pid")
    proc = spawner.start(
        "run",
        env={
            **temporary_env,
            "STANDIN_SIGNALS_FILE": str(signals_file),
            "STANDIN_PIDFILE": str(pidfile),
            "STANDIN_SLEEP": LONG_SLEEP,
        },
    )
    dbt = psutil.Process(wait_for_pidfile(pidfile, timeout=120))
    [base] = list(tmpdir.iterdir())
    assert base.name.startswith("dbtvenv-")
    assert stat.S_IMODE(base.stat().st_mode) == 0o700
    assert Path(dbt.environ()["VIRTUAL_ENV"]).parent == base
    os.kill(proc.pid, signum)
    assert wait_for_lines(signals_file, 1) == [signal.Signals(signum).name]
    status, stderr = finish(proc)
    assert status == 128 + signum, stderr
    assert read_lines(signals_file) == [signal.Signals(signum).name]
    assert list(tmpdir.iterdir()) == []
    assert_no_survivors([dbt])
