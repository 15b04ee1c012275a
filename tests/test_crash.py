"""SIGKILL dbtvenv in the middle of a build: nothing it started lives on, the next run recovers.

Each test kills a real build at one point (pip downloading, pip installing, the venv just
made, the manifest just written), checks that every process the build had started dies with
it, then runs dbtvenv again: a half-built env (no manifest) is removed and rebuilt, saying
why; a complete one is used as it is.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import psutil
import pytest
from conftest import MakeEnv, RunDbtvenv
from lockfaults import Background, WheelServer, wait_until
from procs import assert_no_survivors
from standin import write_wheel

# Enough modules that pip spends seconds unpacking and compiling them: a pip that outlived
# the kill would still be at work when the test looks, more than a second later.
BULKY_MODULES = 2500
# The run after a kill takes the dead run's lock over at once; it must not pass by waiting.
LOCK_TIMEOUT = {"DBTVENV_LOCK_TIMEOUT": "30"}


@pytest.fixture(scope="module")
def bulky_wheelhouse(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A wheel `bulky` of many small modules: installing it takes long enough to be caught."""
    dest = tmp_path_factory.mktemp("bulky")
    body = "".join(f"def f{i}(x):\n    return x + {i}\n\n" for i in range(20))
    files = {f"bulky/m{i:04d}.py": body for i in range(BULKY_MODULES)}
    files["bulky/__init__.py"] = ""
    write_wheel(dest, "bulky", "1.0.0", files)
    return dest


def _env_dir(dbtvenv: RunDbtvenv, spec: dict[str, str]) -> Path:
    found = dbtvenv("env", "path", env=spec)
    assert found.returncode == 0, str(found)
    return Path(found.out.strip())


def _kill_with_helpers(run: Background) -> tuple[list[psutil.Process], list[str]]:
    """SIGKILL the dbtvenv process; return the processes it had started (now to be dead),
    and their command lines as they were."""
    helpers = psutil.Process(run.pid).children(recursive=True)
    cmdlines = []
    for proc in helpers:
        try:
            cmdlines.append(" ".join(proc.cmdline()))
        except psutil.Error:
            cmdlines.append(f"pid {proc.pid} (gone)")
    run.proc.kill()
    run.proc.wait()
    return helpers, cmdlines


def _assert_rebuilt(result_err: str, killed_pid: int) -> None:
    assert "the last build was interrupted" in result_err
    assert "taking over the lock" in result_err and f"pid {killed_pid}, is gone" in result_err


def test_kill_while_pip_downloads(
    wheels: WheelServer,
    tmp_path: Path,
    make_env: MakeEnv,
    dbtvenv_cmd: list[str],
    dbtvenv: RunDbtvenv,
) -> None:
    tmpdir = tmp_path / "tmp"
    tmpdir.mkdir()
    spec = {
        "DBTVENV_REQUIREMENTS": "dbt-standin==1.0.0",
        "DBTVENV_PIP_INSTALL_OPTIONS": wheels.pip_options,
        "DBTVENV_VENV_DIR": str(tmp_path / "cache"),
        "TMPDIR": str(tmpdir),
        **LOCK_TIMEOUT,
    }
    env_dir = _env_dir(dbtvenv, spec)
    wheels.hold()
    run = Background([*dbtvenv_cmd, "env", "prepare"], make_env(spec), tmp_path, "killed")
    try:
        wheels.wait_for_get()  # pip is blocked in the download of the wheel
        helpers, cmdlines = _kill_with_helpers(run)
    finally:
        run.kill()
    assert any("pip" in line for line in cmdlines), cmdlines
    assert_no_survivors(helpers)  # while the download is still held: a live pip would wait
    wheels.release()
    assert env_dir.is_dir() and not (env_dir / "dbtvenv.json").exists()
    # pip's download and unpack dirs were inside the half-built env, and go with it.
    assert list(tmpdir.iterdir()) == []
    assert any((env_dir / ".dbtvenv-build" / "tmp").iterdir())

    again = dbtvenv("run", env=spec)
    assert again.returncode == 0, str(again)
    _assert_rebuilt(again.err, run.pid)
    assert again.json()["prefix"] == str(env_dir)
    assert wheels.gets() == 2


def test_kill_while_pip_installs(
    pip_offline_options: str,
    bulky_wheelhouse: Path,
    tmp_path: Path,
    make_env: MakeEnv,
    dbtvenv_cmd: list[str],
    dbtvenv: RunDbtvenv,
) -> None:
    spec = {
        "DBTVENV_REQUIREMENTS": "dbt-standin==1.0.0 bulky==1.0.0",
        "DBTVENV_PIP_INSTALL_OPTIONS": f"{pip_offline_options} --find-links {bulky_wheelhouse}",
        "DBTVENV_VENV_DIR": str(tmp_path / "cache"),
        **LOCK_TIMEOUT,
    }
    env_dir = _env_dir(dbtvenv, spec)
    run = Background([*dbtvenv_cmd, "env", "prepare"], make_env(spec), tmp_path, "killed")
    try:
        wait_until(
            lambda: any(env_dir.glob("lib/python*/site-packages/bulky/m0*.py")),
            "pip installs the bulky wheel",
        )
        helpers, cmdlines = _kill_with_helpers(run)
    finally:
        run.kill()
    assert any("pip" in line for line in cmdlines), cmdlines
    assert_no_survivors(helpers, timeout=1.0)  # they die with it, not when pip is done
    assert not (env_dir / "dbtvenv.json").exists(), "the kill came too late to test anything"

    again = dbtvenv("run", env=spec)
    assert again.returncode == 0, str(again)
    _assert_rebuilt(again.err, run.pid)
    assert again.json()["prefix"] == str(env_dir)
    manifest = json.loads((env_dir / "dbtvenv.json").read_text())
    assert {"name": "bulky", "version": "1.0.0"} in manifest["distributions"]


def test_kill_right_after_the_venv_is_made(
    standin_env: dict[str, str],
    tmp_path: Path,
    make_env: MakeEnv,
    dbtvenv_cmd: list[str],
    dbtvenv: RunDbtvenv,
) -> None:
    spec = {**standin_env, "DBTVENV_VENV_DIR": str(tmp_path / "cache"), **LOCK_TIMEOUT}
    env_dir = _env_dir(dbtvenv, spec)
    run = Background([*dbtvenv_cmd, "env", "prepare"], make_env(spec), tmp_path, "killed")
    try:
        python = env_dir / "bin" / "python"
        wait_until(lambda: os.path.lexists(python), "the venv has its interpreter")
        helpers, _ = _kill_with_helpers(run)
    finally:
        run.kill()
    assert_no_survivors(helpers)
    assert not (env_dir / "dbtvenv.json").exists(), "the kill came too late to test anything"

    again = dbtvenv("run", env=spec)
    assert again.returncode == 0, str(again)
    _assert_rebuilt(again.err, run.pid)
    assert again.json()["prefix"] == str(env_dir)


def test_kill_right_after_the_manifest_keeps_the_env(
    standin_env: dict[str, str],
    tmp_path: Path,
    make_env: MakeEnv,
    dbtvenv_cmd: list[str],
    dbtvenv: RunDbtvenv,
) -> None:
    spec = {**standin_env, "DBTVENV_VENV_DIR": str(tmp_path / "cache"), **LOCK_TIMEOUT}
    env_dir = _env_dir(dbtvenv, spec)
    manifest = env_dir / "dbtvenv.json"
    long_run = {**spec, "STANDIN_SLEEP": "60"}
    run = Background([*dbtvenv_cmd, "run"], make_env(long_run), tmp_path, "killed")
    try:
        deadline = time.monotonic() + 120
        while not manifest.exists():  # poll tightly: kill as soon as the env is complete
            assert time.monotonic() < deadline, "no manifest after 120 s"
            assert run.proc.poll() is None, run.stderr()
            time.sleep(0.002)
        helpers, _ = _kill_with_helpers(run)
    finally:
        run.kill()
    assert_no_survivors(helpers)
    written = manifest.read_bytes()

    again = dbtvenv("run", env=spec)
    assert again.returncode == 0, str(again)
    assert "building env" not in again.err
    assert "interrupted" not in again.err
    assert again.json()["prefix"] == str(env_dir)
    assert manifest.read_bytes() == written


def test_the_envs_files_are_on_disk_before_its_manifest(
    standin_env: dict[str, str], tmp_path: Path, make_env: MakeEnv, dbtvenv_cmd: list[str]
) -> None:
    """A power loss must leave an incomplete env, never a complete one with a zero-length
    `dbt` (pip does not fsync what it writes): the file system is synced, then the manifest
    is written. Traced for real system calls."""
    strace = shutil.which("strace")
    if strace is None:
        pytest.skip("strace is not installed")
    trace = tmp_path / "trace"
    spec = {**standin_env, "DBTVENV_VENV_DIR": str(tmp_path / "cache")}
    calls_traced = "trace=syncfs,fsync,rename,renameat,renameat2"
    completed = subprocess.run(
        [strace, "-f", "-qq", "-o", str(trace), "-e", calls_traced, *dbtvenv_cmd, "env", "prepare"],
        env=make_env(spec),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        timeout=300,
    )
    if completed.returncode != 0 and b"ptrace" in completed.stderr:
        pytest.skip(f"cannot trace here: {completed.stderr[-300:]!r}")
    assert completed.returncode == 0, completed.stderr.decode()
    calls = trace.read_text().splitlines()
    (manifest_at,) = [
        i for i, line in enumerate(calls) if "rename" in line and 'dbtvenv.json"' in line
    ]
    synced = [i for i, line in enumerate(calls[:manifest_at]) if "syncfs(" in line]
    assert synced, "\n".join(calls[-20:])
    assert " = 0" in calls[synced[-1]]
