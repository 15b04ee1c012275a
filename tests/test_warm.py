"""Warm mode: what a forked dbt sees, when dbtvenv runs dbt directly instead, the warm
process's own life (listed, stopped, removed with its env, dying), users, and concurrency.

The lifecycle promises (signals, kill grace, SIGKILL of dbtvenv, orphans, exit status, output)
are tested in both modes by test_signals, test_runner and test_streaming; the real-dbt
equivalence is test_warm_e2e.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import psutil
import pytest
from conftest import MakeEnv, Result, RunDbtvenv
from procs import assert_no_survivors, wait_for_pidfile
from standin import dbt_cli_main, write_wheel
from test_signals import LONG_SLEEP, Spawner, finish, prepare_persistent_env
from warmmode import (
    WARM_LINE,
    assert_mode,
    private_run_dir,
    stop_warm_processes,
    warm_server_of,
    warm_up,
)

from dbtvenv import warm_server

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux processes")

# A variable dbt reads at import time: a value of its own gives a test a warm process of its own.
KEYED = "DBT_PACKAGE_HUB_URL"
NOBODY = 65534
OTHER_USER = 65533  # a second throw-away uid (setpriv needs no account for it)

# A dbt that reports what a process started to run dbt finds: the same from a fork of the warm
# process as from `bin/dbt`, apart from its pid and its random numbers.
PROBE_DBT = """\
import json, os, random, resource, signal, sys, time

SIGNALS = ("SIGINT", "SIGTERM", "SIGHUP", "SIGPIPE", "SIGXFSZ", "SIGCHLD", "SIGQUIT", "SIGUSR1")


def _disposition(signum):
    handler = signal.getsignal(signum)
    if handler is signal.SIG_IGN:
        return "ignored"
    if handler is signal.SIG_DFL:
        return "default"
    return getattr(handler, "__name__", "python")


def _stream(stream):
    if stream is None:
        return None
    return [stream.name, stream.mode, stream.encoding, stream.errors, stream.line_buffering,
            stream.isatty(), type(stream.buffer).__name__]


def main():
    import __main__

    umask = os.umask(0)
    os.umask(umask)
    report = {
        "argv": sys.argv,
        "cwd": os.getcwd(),
        "sys_path": sys.path,
        "environ": dict(os.environ),
        "umask": umask,
        "tzname": list(time.tzname),
        "gmtoff": time.localtime().tm_gmtoff,
        "stdin": _stream(sys.stdin),
        "stdout": _stream(sys.stdout),
        "stderr": _stream(sys.stderr),
        "read": sys.stdin.read() if os.environ.get("PROBE_READ") else None,
        "signals": {name: _disposition(getattr(signal, name)) for name in SIGNALS},
        "blocked": sorted(int(s) for s in signal.pthread_sigmask(signal.SIG_BLOCK, [])),
        "nofile": list(resource.getrlimit(resource.RLIMIT_NOFILE)),
        "nice": os.nice(0),
        "main": getattr(__main__, "__file__", None),
        "own_group": os.getpgrp() == os.getpid(),
        "fds": sorted(int(fd) for fd in os.listdir("/proc/self/fd"))[:4],
        "executable": sys.executable,
        "prefix": sys.prefix,
        "random": random.random(),
        "pid": os.getpid(),
    }
    print(json.dumps(report))
    return int(os.environ.get("PROBE_EXIT", "0"))
"""
# Differs from run to run by design.
NOT_COMPARED = ("random", "pid")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """This module's XDG_RUNTIME_DIR: its warm processes live there, and end with it."""
    path = private_run_dir(tmp_path_factory.mktemp("warm"))
    yield path
    stop_warm_processes(path)


@pytest.fixture(scope="module")
def probe_env(
    tmp_path_factory: pytest.TempPathFactory, _dbtvenv_pythonpath: str | None, run_dir: Path
) -> dict[str, str]:
    wheels = tmp_path_factory.mktemp("probe-wheels")
    write_wheel(
        wheels,
        "dbt-probe",
        "1.0.0",
        {"dbt_probe.py": PROBE_DBT, **dbt_cli_main("dbt_probe")},
        entry_points="[console_scripts]\ndbt = dbt.cli.main:cli\n",
    )
    settings = prepare_persistent_env(
        tmp_path_factory.mktemp("probe-cache"), wheels, _dbtvenv_pythonpath, "dbt-probe"
    )
    return {**settings, "XDG_RUNTIME_DIR": str(run_dir), "DBTVENV_DEBUG": "1"}


@pytest.fixture(scope="module")
def standin_cache(
    wheelhouse: Path,
    tmp_path_factory: pytest.TempPathFactory,
    _dbtvenv_pythonpath: str | None,
    run_dir: Path,
) -> dict[str, str]:
    """The stand-in's persistent env, in warm mode."""
    settings = prepare_persistent_env(
        tmp_path_factory.mktemp("warm-cache"), wheelhouse, _dbtvenv_pythonpath
    )
    return {
        **settings,
        "XDG_RUNTIME_DIR": str(run_dir),
        "DBTVENV_DEBUG": "1",
        "DBTVENV_WARM": "1",
    }


@pytest.fixture
def spawner(dbtvenv_cmd: list[str], make_env: MakeEnv, tmp_path: Path) -> Iterator[Spawner]:
    spawner = Spawner(dbtvenv_cmd, make_env, tmp_path)
    yield spawner
    spawner.clean_up()


def _run(
    cmd: list[str], environ: Mapping[str, str], cwd: Path, *own: str, **popen: Any
) -> subprocess.CompletedProcess[bytes]:
    popen.setdefault("stdin", subprocess.DEVNULL)
    return subprocess.run(
        [*cmd, "run", *own, "--", "a b", "c"],
        env=dict(environ),
        cwd=cwd,
        capture_output=True,
        timeout=120,
        **popen,
    )


def _probe_both_ways(
    dbtvenv_cmd: list[str], environ: dict[str, str], cwd: Path, **popen: Any
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The probe's report from a direct run and from a warm one of the same request."""
    warm_up({**environ, "DBTVENV_WARM": "1"})
    reports = []
    for mode in ("direct", "warm"):
        done = _run(dbtvenv_cmd, environ, cwd, *(["--warm"] if mode == "warm" else []), **popen)
        stderr = done.stderr.decode()
        assert done.returncode == 0, stderr
        assert_mode(stderr, mode)
        report = json.loads(done.stdout)
        reports.append({k: v for k, v in report.items() if k not in NOT_COMPARED})
    return reports[0], reports[1]


def test_a_forked_dbt_starts_as_bin_dbt_would(
    dbtvenv_cmd: list[str], make_env: MakeEnv, probe_env: dict[str, str], tmp_path: Path
) -> None:
    """argv, cwd, sys.path, the whole environment (PYTHONPATH gone), umask, rlimits, stdio,
    signal dispositions and mask, `__main__`, its own process group: as from `bin/dbt`."""
    shadow = tmp_path / "shadow"
    shadow.mkdir()
    environ = make_env({**probe_env, "PROBE_MARK": "x y", "PYTHONPATH": str(shadow)})
    cwd = tmp_path / "project dir"
    cwd.mkdir()

    def caller_state() -> None:
        os.umask(0o027)
        _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (512, hard))
        signal.signal(signal.SIGHUP, signal.SIG_IGN)  # nohup

    direct, warm = _probe_both_ways(dbtvenv_cmd, environ, cwd, preexec_fn=caller_state)
    assert warm == direct
    assert warm["argv"][1:] == ["run", "a b", "c"]
    assert warm["cwd"] == str(cwd)
    assert warm["umask"] == 0o027
    assert warm["nofile"][0] == 512
    assert warm["signals"]["SIGHUP"] == "ignored"
    assert warm["signals"]["SIGINT"] == "default_int_handler"
    assert warm["environ"]["PROBE_MARK"] == "x y"
    assert "PYTHONPATH" not in warm["environ"]
    assert not any("dbtvenv" in p for p in warm["sys_path"])
    assert warm["main"] == warm["argv"][0]


def test_a_request_gets_its_own_time_zone_and_closed_stdin(
    dbtvenv_cmd: list[str], make_env: MakeEnv, probe_env: dict[str, str], tmp_path: Path
) -> None:
    """TZ is not part of a warm process's key: each request's own applies (`time.tzset`);
    a stdin closed by the caller is closed in dbt too."""
    seen = []
    for zone in ("Asia/Tokyo", "America/New_York"):
        environ = make_env({**probe_env, "TZ": zone})
        direct, warm = _probe_both_ways(dbtvenv_cmd, environ, tmp_path)
        assert warm == direct
        seen.append(warm["tzname"])
    assert seen[0] != seen[1]
    environ = make_env({**probe_env})
    direct, warm = _probe_both_ways(
        dbtvenv_cmd, environ, tmp_path, stdin=None, preexec_fn=lambda: os.close(0)
    )
    assert warm == direct
    assert warm["stdin"] is None


def test_stdin_reaches_a_forked_dbt(
    dbtvenv: RunDbtvenv, make_env: MakeEnv, probe_env: dict[str, str]
) -> None:
    environ = {**probe_env, "DBTVENV_WARM": "1", "PROBE_READ": "1"}
    warm_up(make_env(environ))
    result = dbtvenv("run", env=environ, input=b"piped \xc3\xa9 input\n")
    assert result.returncode == 0, result
    assert_mode(result.err, "warm")
    assert result.json()["read"] == "piped \u00e9 input\n"


def test_random_numbers_differ_between_warm_runs(
    dbtvenv: RunDbtvenv, make_env: MakeEnv, probe_env: dict[str, str]
) -> None:
    environ = {**probe_env, "DBTVENV_WARM": "1"}
    warm_up(make_env(environ))
    numbers = {dbtvenv("run", env=environ).json()["random"] for _ in range(3)}
    assert len(numbers) == 3


# --- when dbt runs directly -------------------------------------------------------------


def test_a_dbt_without_its_cli_entry_point_runs_directly(
    dbtvenv: RunDbtvenv, tmp_path_factory: pytest.TempPathFactory, _dbtvenv_pythonpath: str | None
) -> None:
    """dbt before 1.5 has no `dbt.cli.main`: no warm process is started for it."""
    wheels = tmp_path_factory.mktemp("old-wheels")
    old_dbt = "import sys\n\ndef main():\n    print('old dbt', sys.argv[1:])\n    return 3\n"
    write_wheel(
        wheels,
        "dbt-old",
        "1.0.0",
        {"dbt_old.py": old_dbt},
        entry_points="[console_scripts]\ndbt = dbt_old:main\n",
    )
    run_dir = private_run_dir(tmp_path_factory.mktemp("old-run"))
    settings = prepare_persistent_env(
        tmp_path_factory.mktemp("old-cache"), wheels, _dbtvenv_pythonpath, "dbt-old"
    )
    environ = {**settings, "DBTVENV_WARM": "1", "DBTVENV_DEBUG": "1"}
    environ["XDG_RUNTIME_DIR"] = str(run_dir)
    for _ in range(2):
        result = dbtvenv("run", "--", "x", env=environ)
        assert result.returncode == 3, result
        assert result.out == "old dbt ['run', 'x']\n"
        assert "running dbt directly: the env's dbt has no dbt.cli.main" in result.err
    assert list((run_dir / "dbtvenv").glob("*.sock")) == []


def test_temporary_mode_runs_directly(dbtvenv: RunDbtvenv, standin_env: dict[str, str]) -> None:
    result = dbtvenv("run", "--warm", env={**standin_env, "DBTVENV_DEBUG": "1"})
    assert result.returncode == 0, result
    assert result.json()["argv"] == ["run"]
    assert "running dbt directly: warm mode needs a persistent env" in result.err


def test_first_run_is_direct_and_starts_the_warm_process(
    dbtvenv: RunDbtvenv, make_env: MakeEnv, standin_cache: dict[str, str]
) -> None:
    """A new key (an import-time value no warm process has) runs directly at once; the next
    is warm."""
    environ = {**standin_cache, KEYED: "first-run-test"}
    first = dbtvenv("run", env=environ)
    assert first.returncode == 0, first
    assert "running dbt directly while its warm process starts" in first.err, first
    warm_up(make_env(environ))
    second = dbtvenv("run", env=environ)
    assert second.returncode == 0, second
    assert_mode(second.err, "warm")


def test_a_killed_warm_process_is_replaced(
    dbtvenv: RunDbtvenv, make_env: MakeEnv, standin_cache: dict[str, str]
) -> None:
    """Its socket is left behind: the next run runs directly and starts a new one."""
    environ = {**standin_cache, KEYED: "killed-server-test"}
    server = psutil.Process(warm_up(make_env(environ)))
    server.kill()
    server.wait(timeout=10)
    result = dbtvenv("run", env=environ)
    assert result.returncode == 0, result
    assert result.json()["argv"] == ["run"]
    assert_mode(result.err, "direct")
    assert warm_up(make_env(environ)) != server.pid


# Where dbtvenv looks for the warm process of a run, computed as dbtvenv does (same environment).
PLACE = """\
import sys
from pathlib import Path
from dbtvenv import warm
from dbtvenv.runner import dbt_environment

env_dir = Path(sys.argv[1])
place, why = warm.place_for(env_dir, dbt_environment(env_dir))
print(place.socket)
"""


@pytest.mark.parametrize("answer", ["hang-up", "refusal"])
def test_a_warm_process_that_fails_before_dbt_starts_means_a_direct_run(
    dbtvenv: RunDbtvenv, make_env: MakeEnv, standin_cache: dict[str, str], answer: str
) -> None:
    """A socket that takes the request and closes (a warm process dying), or refuses it (one
    stopping): dbt runs directly, once, with its output and status."""
    environ = {**standin_cache, KEYED: f"fails-before-dbt-{answer}"}
    env_dir = dbtvenv("env", "path", env=environ).out.strip()
    found = subprocess.run(
        [sys.executable, "-c", PLACE, env_dir], env=make_env(environ), capture_output=True
    )
    assert found.returncode == 0, found.stderr
    path = found.stdout.decode().strip()
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as fake:
        fake.bind(path)
        fake.listen(1)
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            served = pool.submit(_answer_once, fake, answer)
            result = dbtvenv("run", "--", "x", env={**environ, "STANDIN_EXIT": "4"})
            assert served.result(timeout=60)
        os.unlink(path)
    assert result.returncode == 4, result
    assert result.json()["argv"] == ["run", "x"]
    assert_mode(result.err, "direct")
    why = "did not take the request" if answer == "hang-up" else "refused"
    assert f"running dbt directly: the warm process {why}" in result.err, result


def _answer_once(listener: socket.socket, answer: str) -> bool:
    listener.settimeout(60)
    conn, _ = listener.accept()
    with conn:
        if answer == "refusal":  # as a stopping warm process does: it reads, then refuses
            _, fds = warm_server.recv_frame(conn, max_fds=warm_server.RUN_FDS)
            for fd in fds:
                os.close(fd)
            warm_server.send_frame(conn, {"refused": "stopping"})
    return True


def test_the_warm_process_dying_while_dbt_runs(
    spawner: Spawner, make_env: MakeEnv, standin_cache: dict[str, str]
) -> None:
    """dbt dies with it (its parent-death signal), and dbtvenv says so: 128+9, one line."""
    environ = {**standin_cache, KEYED: "dying-server-test"}
    server = psutil.Process(warm_up(make_env(environ)))
    pidfile = spawner.pidfile("dbt.pid")
    grandchild_pidfile = spawner.pidfile("grandchild.pid")
    proc = spawner.start(
        "run",
        env={
            **environ,
            "STANDIN_PIDFILE": str(pidfile),
            "STANDIN_GRANDCHILD_PIDFILE": str(grandchild_pidfile),
            "STANDIN_SLEEP": LONG_SLEEP,
        },
    )
    dbt = psutil.Process(wait_for_pidfile(pidfile))
    grandchild = psutil.Process(wait_for_pidfile(grandchild_pidfile))
    assert dbt.ppid() == server.pid
    server.kill()
    status, stderr = finish(proc)
    assert status == 128 + signal.SIGKILL, stderr
    errors = [line for line in stderr.splitlines() if line.startswith("dbtvenv: error:")]
    assert len(errors) == 1 and "warm process ended while dbt ran" in errors[0], stderr
    assert_no_survivors([dbt, grandchild])


def test_a_request_of_another_protocol_is_refused(
    make_env: MakeEnv, standin_cache: dict[str, str], run_dir: Path
) -> None:
    pid = warm_up(make_env(standin_cache))
    states = [json.loads(p.read_text()) for p in (run_dir / "dbtvenv").glob("w*-*.json")]
    [path] = [state["socket"] for state in states if state["pid"] == pid]
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(10)
        sock.connect(path)
        body = json.dumps({"op": "run", "protocol": 999}).encode()
        sock.sendall(len(body).to_bytes(4, "big") + body)
        size = int.from_bytes(sock.recv(4), "big")
        answer = json.loads(sock.recv(size))
    assert "refused" in answer and "protocol 1" in answer["refused"], answer


# --- seen, stopped, removed -------------------------------------------------------------


def test_env_info_lists_warm_processes_and_stop_warm_stops_them(
    dbtvenv: RunDbtvenv, make_env: MakeEnv, standin_cache: dict[str, str]
) -> None:
    environ = {**standin_cache, KEYED: "info-test"}
    pid = warm_up(make_env(environ))
    assert dbtvenv("run", env=environ).returncode == 0
    info = dbtvenv("env", "info", "--json", env=environ)
    assert info.returncode == 0, info
    [warm] = [w for w in info.json()["warm_processes"] if w["pid"] == pid]
    assert warm["requests"] >= 2
    assert warm["running"] == 0
    assert warm["rss"] > 1_000_000
    assert warm["started"].endswith("+00:00")
    text = dbtvenv("env", "info", env=environ)
    assert f"pid {pid}, started " in text.out, text
    key = Path(info.json()["path"]).name

    stopped = dbtvenv("env", "stop-warm", key, env=environ)
    assert stopped.returncode == 0, stopped
    assert f"stopped warm process {pid} of env {key}" in stopped.out, stopped
    assert_no_survivors([pid], timeout=15)
    after = dbtvenv("env", "info", "--json", env=environ).json()["warm_processes"]
    assert pid not in [w["pid"] for w in after]


def test_a_stopped_warm_process_finishes_its_running_request(
    spawner: Spawner, dbtvenv: RunDbtvenv, make_env: MakeEnv, standin_cache: dict[str, str]
) -> None:
    environ = {**standin_cache, KEYED: "stop-while-running-test"}
    pid = warm_up(make_env(environ))
    pidfile = spawner.pidfile("dbt.pid")
    proc = spawner.start(
        "run",
        env={**environ, "STANDIN_PIDFILE": str(pidfile), "STANDIN_SLEEP": "2", "STANDIN_EXIT": "5"},
    )
    wait_for_pidfile(pidfile)
    key = Path(dbtvenv("env", "path", env=environ).out.strip()).name
    stopped = dbtvenv("env", "stop-warm", key, env=environ)
    assert f"stopped warm process {pid} " in stopped.out, stopped
    status, stderr = finish(proc)
    assert status == 5, stderr
    assert_mode(stderr, "warm")
    assert_no_survivors([pid], timeout=15)


def test_env_rm_refuses_an_env_under_a_warm_request_then_stops_its_warm_process(
    spawner: Spawner,
    dbtvenv: RunDbtvenv,
    make_env: MakeEnv,
    wheelhouse: Path,
    tmp_path: Path,
    _dbtvenv_pythonpath: str | None,
) -> None:
    run_dir = private_run_dir(tmp_path)
    settings = prepare_persistent_env(tmp_path / "cache", wheelhouse, _dbtvenv_pythonpath)
    environ = {**settings, "DBTVENV_WARM": "1", "DBTVENV_DEBUG": "1"}
    environ["XDG_RUNTIME_DIR"] = str(run_dir)
    try:
        server = warm_up(make_env(environ))
        pidfile = spawner.pidfile("dbt.pid")
        proc = spawner.start(
            "run", env={**environ, "STANDIN_PIDFILE": str(pidfile), "STANDIN_SLEEP": LONG_SLEEP}
        )
        wait_for_pidfile(pidfile)
        key = Path(dbtvenv("env", "path", env=environ).out.strip()).name
        listed = json.loads(dbtvenv("env", "list", "--json", env=environ).stdout)
        assert [e["in_use"] for e in listed] == [True]
        refused = dbtvenv("env", "rm", key, env=environ)
        assert refused.returncode == 1, refused
        assert "in use" in refused.err
        gc = dbtvenv("env", "gc", "--older-than", "0s", env=environ)
        assert gc.returncode == 0, gc
        assert (tmp_path / "cache" / key / "dbtvenv.json").is_file()
        assert psutil.pid_exists(server)
        os.kill(proc.pid, signal.SIGTERM)
        status, stderr = finish(proc)
        assert status == 128 + signal.SIGTERM, stderr
        removed = dbtvenv("env", "rm", key, env=environ)
        assert removed.returncode == 0, removed
        assert f"stopped warm process {server} of env {key}" in removed.err, removed
        assert_no_survivors([server], timeout=15)
    finally:
        stop_warm_processes(run_dir)


def test_env_gc_stops_the_warm_process_of_an_env_it_removes(
    dbtvenv: RunDbtvenv,
    make_env: MakeEnv,
    wheelhouse: Path,
    tmp_path: Path,
    _dbtvenv_pythonpath: str | None,
) -> None:
    run_dir = private_run_dir(tmp_path)
    settings = prepare_persistent_env(tmp_path / "cache", wheelhouse, _dbtvenv_pythonpath)
    environ = {**settings, "DBTVENV_WARM": "1", "DBTVENV_DEBUG": "1"}
    environ["XDG_RUNTIME_DIR"] = str(run_dir)
    try:
        server = warm_up(make_env(environ))
        gc = dbtvenv("env", "gc", "--older-than", "0s", env=environ)
        assert gc.returncode == 0, gc
        assert "stopped warm process" in gc.err, gc
        assert_no_survivors([server], timeout=15)
    finally:
        stop_warm_processes(run_dir)


def test_a_warm_process_ends_after_its_idle_time(
    dbtvenv: RunDbtvenv, standin_cache: dict[str, str], run_dir: Path
) -> None:
    """The first run starts it (with that run's DBTVENV_WARM_IDLE); with no request, it exits."""
    environ = {**standin_cache, KEYED: "idle-test", "DBTVENV_WARM_IDLE": "2"}
    states = run_dir / "dbtvenv"
    before = set(states.glob("w*-*.json"))
    first = dbtvenv("run", env=environ)
    assert "running dbt directly while its warm process starts" in first.err, first
    deadline = time.monotonic() + 60
    while not (new := set(states.glob("w*-*.json")) - before):
        assert time.monotonic() < deadline, "the warm process never started"
        time.sleep(0.05)
    [state] = new
    try:
        server = json.loads(state.read_text())["pid"]
    except FileNotFoundError:  # it has come and gone already
        return
    assert_no_survivors([server], timeout=60)
    assert not state.exists()


@pytest.mark.parametrize("value", ["0", "-1", "nan", "1e9"])
def test_warm_idle_out_of_range_is_a_usage_error(
    dbtvenv: RunDbtvenv, make_env: MakeEnv, standin_cache: dict[str, str], value: str
) -> None:
    """Whether or not a warm process is to be started (the default one runs already)."""
    warm_up(make_env(standin_cache))
    result = dbtvenv("run", env={**standin_cache, "DBTVENV_WARM_IDLE": value})
    assert result.returncode == 64, result
    assert "DBTVENV_WARM_IDLE" in result.err


# --- many requests, many users ----------------------------------------------------------


def test_16_concurrent_warm_requests_all_succeed(
    dbtvenv_cmd: list[str], make_env: MakeEnv, standin_cache: dict[str, str], tmp_path: Path
) -> None:
    environ = make_env(standin_cache)
    server = warm_up(environ)

    def one(i: int) -> Result:
        done = subprocess.run(
            [*dbtvenv_cmd, "run", "--", f"request-{i}"],
            env={**environ, "STANDIN_EXIT": str(i % 3)},
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=180,
        )
        return Result(done.returncode, done.stdout, done.stderr)

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        results = list(pool.map(one, range(16)))
    for i, result in enumerate(results):
        assert result.returncode == i % 3, result
        assert result.json()["argv"] == ["run", f"request-{i}"]
        assert_mode(result.err, "warm")
        assert warm_server_of(result.err) == server


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A dir every user may enter (pytest's own temp dir is private to root), removed after."""
    import tempfile

    path = Path(tempfile.mkdtemp(prefix="dbtvenv-test-shared."))
    try:
        path.chmod(0o755)
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def test_two_users_have_warm_processes_of_their_own(
    dbtvenv_cmd: list[str],
    make_env: MakeEnv,
    standin_env: dict[str, str],
    shared_dir: Path,
) -> None:
    """One shared env; each user gets their own warm process, and cannot reach the other's.

    The env lives where every user may enter, on an interpreter every user may run; dbtvenv
    itself runs with CAP_DAC_READ_SEARCH only to reach this checkout's interpreter."""
    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        pytest.skip("running as other users needs root and setpriv")
    if not os.access("/usr/bin/python3", os.X_OK):
        pytest.skip("no /usr/bin/python3 to base a shared env on")
    cache = shared_dir / "cache"
    spec = {**standin_env, "DBTVENV_VENV_DIR": str(cache), "DBTVENV_PYTHON": "/usr/bin/python3"}
    prepared = subprocess.run(
        [*dbtvenv_cmd, "env", "prepare"],
        env=make_env(spec),
        capture_output=True,
        timeout=300,
    )
    assert prepared.returncode == 0, prepared.stderr
    cache.chmod(0o755)
    homes = {}
    for uid in (NOBODY, OTHER_USER):
        home = shared_dir / f"home-{uid}"
        home.mkdir(mode=0o700)
        os.chown(home, uid, uid)
        homes[uid] = home

    def as_user(uid: int, *argv: str, extra: Mapping[str, str] = {}) -> Result:
        environ = make_env(
            {
                **spec,
                "DBTVENV_WARM": "1",
                "DBTVENV_DEBUG": "1",
                "HOME": str(homes[uid]),
                "XDG_RUNTIME_DIR": str(homes[uid]),
                **extra,
            }
        )
        done = subprocess.run(
            [
                "setpriv",
                f"--reuid={uid}",
                f"--regid={uid}",
                "--clear-groups",
                "--inh-caps=+dac_read_search",
                "--ambient-caps=+dac_read_search",
                *argv,
            ],
            env=environ,
            cwd="/",
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=120,
        )
        return Result(done.returncode, done.stdout, done.stderr)

    servers = {}
    try:
        for uid in (NOBODY, OTHER_USER):
            deadline = time.monotonic() + 90
            while True:
                result = as_user(uid, *dbtvenv_cmd, "run", "--", str(uid))
                assert result.returncode == 0, result
                assert result.json()["argv"] == ["run", str(uid)]
                if WARM_LINE in result.err:
                    break
                assert time.monotonic() < deadline, result
                time.sleep(0.2)
            servers[uid] = psutil.Process(warm_server_of(result.err))
            assert servers[uid].uids().real == uid
        assert servers[NOBODY].pid != servers[OTHER_USER].pid
        [other_socket] = (homes[OTHER_USER] / "dbtvenv").glob("*.sock")
        probe = as_user(
            NOBODY,
            sys.executable,
            "-c",
            "import socket, sys\n"
            "s = socket.socket(socket.AF_UNIX)\n"
            "s.settimeout(5)\n"
            "try:\n"
            "    s.connect(sys.argv[1])\n"
            '    s.sendall(b\'\\0\\0\\0\\x1d{"op":"status","protocol":1}\')\n'
            "    print(repr(s.recv(100)))\n"
            "except OSError as e:\n"
            "    print('refused', e.errno)\n",
            str(other_socket),
        )
        assert probe.out.startswith("refused") or probe.out.strip() == "b''", probe
    finally:
        for server in servers.values():
            server.kill()


def test_a_request_longer_than_the_idle_time_leaves_the_warm_process_idle(
    dbtvenv_cmd: list[str], make_env: MakeEnv, standin_cache: dict[str, str]
) -> None:
    """While dbt runs past DBTVENV_WARM_IDLE, the warm process waits in select(), not in a
    busy loop: it spends next to no CPU time."""
    environ = make_env({**standin_cache, KEYED: "busy-test", "DBTVENV_WARM_IDLE": "1"})
    server = psutil.Process(warm_up(environ))
    run = subprocess.Popen(
        [*dbtvenv_cmd, "run"],
        env={**environ, "STANDIN_SLEEP": "6"},
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        time.sleep(2.5)  # the request is older than the idle time now
        before = server.cpu_times()
        time.sleep(2)
        after = server.cpu_times()
        assert run.poll() is None, "the request should still run"
        spent = (after.user + after.system) - (before.user + before.system)
        assert spent < 0.5, f"the warm process spent {spent:.2f} s of CPU in 2 s"
    finally:
        assert run.wait(timeout=60) == 0


def test_a_run_dir_that_cannot_be_made_means_the_next_place(
    dbtvenv: RunDbtvenv, standin_cache: dict[str, str], tmp_path: Path
) -> None:
    """An XDG_RUNTIME_DIR under which no dir can be made (here a file: ENOTDIR even for root)
    is passed over for the next place, never an internal error."""
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("")
    environ = {
        **standin_cache,
        "XDG_RUNTIME_DIR": str(not_a_dir),
        KEYED: "unmakeable-run-dir-test",
        "DBTVENV_WARM_IDLE": "1",  # the one it starts in the next place ends at once
    }
    result = dbtvenv("run", env=environ)
    assert result.returncode == 0, result
    assert result.json()["argv"] == ["run"]


def test_a_run_dir_this_user_cannot_write_means_the_next_place(
    dbtvenv_cmd: list[str], make_env: MakeEnv, shared_dir: Path
) -> None:
    """An XDG_RUNTIME_DIR kept after `su`: root's, mode 0755, not writable for this user."""
    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        pytest.skip("running as another user needs root and setpriv")
    runtime = shared_dir / "root-runtime"
    runtime.mkdir(mode=0o755)
    env_dir = shared_dir / "env"
    env_dir.mkdir(mode=0o755)
    (env_dir / warm_server.MANIFEST).write_text("{}")
    script = (
        "import sys\nfrom pathlib import Path\nfrom dbtvenv import warm\n"
        "place, why = warm.place_for(Path(sys.argv[1]), {})\n"
        "print(place.socket.parent if place else why)\n"
    )
    done = subprocess.run(
        [
            *("setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups"),
            *("--inh-caps=+dac_read_search", "--ambient-caps=+dac_read_search"),
            *(sys.executable, "-c", script, str(env_dir)),
        ],
        env=make_env({"XDG_RUNTIME_DIR": str(runtime)}),
        cwd="/",
        capture_output=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.decode().strip() == f"/tmp/dbtvenv-{NOBODY}"
    assert not (runtime / "dbtvenv").exists()


@pytest.mark.parametrize("state", ['{"pid": 1e400}', '{"pid": true}'])
def test_a_state_file_no_warm_process_wrote_is_passed_over(
    dbtvenv: RunDbtvenv, standin_cache: dict[str, str], tmp_path: Path, state: str
) -> None:
    """`env info` (and so rm and gc) read every state file of the run dir: one whose numbers
    JSON gives as floats too large for an int (`1e400`) or of the wrong type is no warm process."""
    run_dir = private_run_dir(tmp_path)
    (run_dir / "dbtvenv").mkdir(mode=0o700)
    (run_dir / "dbtvenv" / "w1-planted.json").write_text(state)
    result = dbtvenv(
        "env", "info", "--json", env={**standin_cache, "XDG_RUNTIME_DIR": str(run_dir)}
    )
    assert result.returncode == 0, result
    # (Warm processes of the env elsewhere, as in /tmp, may be listed: never a planted one.)
    assert all(w["pid"] > 1 for w in result.json()["warm_processes"]), result


def test_an_interrupt_at_any_moment_of_a_warm_run_ends_it_as_dbt_would(
    dbtvenv_cmd: list[str], make_env: MakeEnv, standin_cache: dict[str, str]
) -> None:
    """SIGINT sent to a forked dbt over and over, from its fork to its exit (its set-up, dbt's
    entry point, what the warm process learns after it): each run ends as dbt would, 130 or
    dbt's own status, never as an internal error (70)."""
    import threading

    environ = make_env({**standin_cache, KEYED: "interrupt-test"})
    server = psutil.Process(warm_up(environ))
    done = threading.Event()

    def interrupt_children() -> None:
        while not done.is_set():
            with contextlib.suppress(psutil.Error):
                for child in server.children():
                    with contextlib.suppress(OSError):
                        os.kill(child.pid, signal.SIGINT)

    interrupter = threading.Thread(target=interrupt_children, daemon=True)
    interrupter.start()
    statuses = []
    try:
        for _ in range(25):
            run = subprocess.run(
                [*dbtvenv_cmd, "run"], env=environ, stdin=subprocess.DEVNULL, capture_output=True
            )
            statuses.append(run.returncode)
            assert run.returncode in (0, 130), run.stderr.decode()
    finally:
        done.set()
        interrupter.join()
    assert 130 in statuses, statuses


THREADER_DBT = """\
def main():
    import threader  # loaded lazily, as dbt loads a task's modules: a warm process learns it
    print("ran")
    return 0
"""
# A library that starts a thread when imported (a metrics exporter, a connection pool's reaper).
THREADER = """\
import threading, time

threading.Thread(target=time.sleep, args=(3600,), daemon=True).start()
"""


def test_a_module_that_starts_a_thread_at_import_is_not_preloaded_again(
    dbtvenv_cmd: list[str],
    make_env: MakeEnv,
    tmp_path_factory: pytest.TempPathFactory,
    _dbtvenv_pythonpath: str | None,
    run_dir: Path,
) -> None:
    """A warm process that learned it cannot fork any more, and stops; it marks the module so
    that the next one never imports it ahead, and serves every run."""
    wheels = tmp_path_factory.mktemp("threader-wheels")
    write_wheel(
        wheels,
        "dbt-threader",
        "1.0.0",
        {"dbt_threader.py": THREADER_DBT, "threader.py": THREADER, **dbt_cli_main("dbt_threader")},
        entry_points="[console_scripts]\ndbt = dbt.cli.main:cli\n",
    )
    settings = prepare_persistent_env(
        tmp_path_factory.mktemp("threader-cache"), wheels, _dbtvenv_pythonpath, "dbt-threader"
    )
    environ = make_env(
        {**settings, "XDG_RUNTIME_DIR": str(run_dir), "DBTVENV_DEBUG": "1", "DBTVENV_WARM": "1"}
    )
    warm_up(environ, timeout=60)  # its first warm run teaches it `threader`
    server = warm_up(environ, timeout=60)  # a warm process that never imported it ahead
    for _ in range(3):
        done = subprocess.run(
            [*dbtvenv_cmd, "run"], env=environ, stdin=subprocess.DEVNULL, capture_output=True
        )
        assert done.returncode == 0 and done.stdout == b"ran\n", done
        assert warm_server_of(done.stderr.decode()) == server
    lessons = [json.loads(p.read_text()) for p in (run_dir / "dbtvenv").glob("modules-*.json")]
    [data] = [d for d in lessons if "threader" in json.dumps(d)]
    assert "threader" in data["unsafe"] and "threader" not in data["modules"], data


def test_a_per_task_dbt_variable_shares_one_warm_process(
    dbtvenv_cmd: list[str], make_env: MakeEnv, probe_env: dict[str, str], tmp_path: Path
) -> None:
    """dbt reads DBT_ENV_CUSTOM_ENV_* (and every DBT_* flag but a few) when it runs, not when
    imported: a value per task is no warm process per task, and each run sees its own."""
    environ = make_env({**probe_env, "DBTVENV_WARM": "1", KEYED: "per-task-test"})
    server = warm_up({**environ, "DBT_ENV_CUSTOM_ENV_RUN_ID": "task-0"})
    for task in ("task-1", "task-2"):
        done = _run(dbtvenv_cmd, {**environ, "DBT_ENV_CUSTOM_ENV_RUN_ID": task}, tmp_path)
        assert done.returncode == 0, done.stderr
        assert warm_server_of(done.stderr.decode()) == server
        assert json.loads(done.stdout)["environ"]["DBT_ENV_CUSTOM_ENV_RUN_ID"] == task


def test_an_env_has_at_most_four_warm_processes_per_user(
    dbtvenv: RunDbtvenv, make_env: MakeEnv, standin_cache: dict[str, str]
) -> None:
    """A fifth set of import-time settings stops the oldest idle warm process of the env."""
    servers = [warm_up(make_env({**standin_cache, KEYED: f"cap-test-{i}"})) for i in range(5)]
    info = dbtvenv("env", "info", "--json", env=standin_cache)
    running = {w["pid"] for w in info.json()["warm_processes"]}
    assert len(running) <= 4 and servers[-1] in running, info
    assert_no_survivors([servers[0]], timeout=30)
