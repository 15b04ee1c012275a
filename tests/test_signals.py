"""Signals in, status out: real dbtvenv processes, real signals, the stand-in dbt.

Most tests run dbt from one persistent env, built once for the module; the tests of a build
that is interrupted use temporary envs and a package index that never answers.
"""

from __future__ import annotations

import contextlib
import fcntl
import http.server
import json
import os
import signal
import subprocess
import sys
import termios
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import psutil
import pytest
from conftest import MakeEnv
from procs import assert_no_survivors, children_of, kill_quietly, wait_for_pidfile
from standin import dbt_cli_main, write_wheel
from warmmode import (
    MODES,
    assert_mode,
    mode_settings,
    private_run_dir,
    stop_warm_processes,
    warm_server_of,
    warm_up,
)

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux processes")

TERMINATING = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
# How a test ends a dbt that ignores the signal under test: with another forwarded signal.
ENDING = {
    signal.SIGINT: signal.SIGTERM,
    signal.SIGTERM: signal.SIGHUP,
    signal.SIGHUP: signal.SIGINT,
}
LONG_SLEEP = "120"  # the stand-in's run time when a test ends it itself


def _name(signum: int) -> str:
    return signal.Signals(signum).name


def prepare_persistent_env(
    cache: Path, wheelhouse: Path, pythonpath: str | None, requirement: str = "dbt-standin==1.0.0"
) -> dict[str, str]:
    """dbtvenv settings for a persistent env in `cache` (the stand-in dbt), built now."""
    settings = {
        "DBTVENV_VENV_DIR": str(cache),
        "DBTVENV_REQUIREMENTS": requirement,
        "DBTVENV_PIP_INSTALL_OPTIONS": f"--no-index --find-links {wheelhouse}",
    }
    environ = {k: v for k, v in os.environ.items() if not k.startswith("DBTVENV_")}
    environ.update(settings)
    if pythonpath is not None:
        environ["PYTHONPATH"] = pythonpath
    subprocess.run(
        [sys.executable, "-m", "dbtvenv", "env", "prepare"],
        env=environ,
        check=True,
        capture_output=True,
        timeout=300,
    )
    return settings


def mode_of(settings: Mapping[str, str]) -> str:
    return "warm" if settings.get("DBTVENV_WARM") == "1" else "direct"


def in_mode(
    mode: str,
    settings: dict[str, str],
    tmp_path_factory: pytest.TempPathFactory,
    pythonpath: str | None,
) -> Iterator[dict[str, str]]:
    """`settings` for runs in `mode`; for warm mode, with the warm process started and
    stopped again at the end."""
    if mode == "direct":
        yield settings
        return
    run_dir = private_run_dir(tmp_path_factory.mktemp("warm"))
    settings = {**settings, **mode_settings(mode, run_dir)}
    environ = {k: v for k, v in os.environ.items() if not k.startswith("DBTVENV_")}
    environ.update(settings)
    if pythonpath is not None:
        environ["PYTHONPATH"] = pythonpath
    warm_up(environ)
    try:
        yield settings
    finally:
        stop_warm_processes(run_dir)


# A dbt that records who sent each signal. Python's own handlers merge two quick copies of a
# signal into one call, and the kernel merges a copy that arrives while one is pending; the
# sender of the copy that got through still tells a forwarded signal from one that came
# straight from a group kill.
SENDERS_DBT = """\
import os, signal

def main():
    signals = {signal.SIGINT, signal.SIGTERM, signal.SIGHUP}
    signal.pthread_sigmask(signal.SIG_BLOCK, signals)
    pidfile = os.environ["SENDERS_PIDFILE"]
    with open(pidfile + ".tmp", "w") as f:
        f.write(str(os.getpid()))
    os.replace(pidfile + ".tmp", pidfile)
    while True:
        info = signal.sigwaitinfo(signals)
        name = signal.Signals(info.si_signo).name
        with open(os.environ["SENDERS_FILE"], "a") as f:
            f.write(f"{name} {info.si_pid}\\n")
        if name != os.environ.get("SENDERS_KEEP_ON"):
            return 128 + info.si_signo
"""


@pytest.fixture(scope="module", params=MODES)
def senders_env(
    request: pytest.FixtureRequest,
    tmp_path_factory: pytest.TempPathFactory,
    _dbtvenv_pythonpath: str | None,
) -> Iterator[dict[str, str]]:
    """A persistent env whose `dbt` records the sender of each signal (see SENDERS_DBT), run
    directly and warm."""
    wheels = tmp_path_factory.mktemp("senders-wheels")
    write_wheel(
        wheels,
        "dbt-senders",
        "1.0.0",
        {"dbt_senders.py": SENDERS_DBT, **dbt_cli_main("dbt_senders")},
        entry_points="[console_scripts]\ndbt = dbt.cli.main:cli\n",
    )
    settings = prepare_persistent_env(
        tmp_path_factory.mktemp("senders-cache"), wheels, _dbtvenv_pythonpath, "dbt-senders"
    )
    yield from in_mode(request.param, settings, tmp_path_factory, _dbtvenv_pythonpath)


@pytest.fixture(scope="module", params=MODES)
def persistent_env(
    request: pytest.FixtureRequest,
    wheelhouse: Path,
    tmp_path_factory: pytest.TempPathFactory,
    _dbtvenv_pythonpath: str | None,
) -> Iterator[dict[str, str]]:
    """The stand-in's persistent env, run directly and warm."""
    settings = prepare_persistent_env(
        tmp_path_factory.mktemp("signals-cache"), wheelhouse, _dbtvenv_pythonpath
    )
    yield from in_mode(request.param, settings, tmp_path_factory, _dbtvenv_pythonpath)


@pytest.fixture(scope="module")
def direct_env(
    wheelhouse: Path, tmp_path_factory: pytest.TempPathFactory, _dbtvenv_pythonpath: str | None
) -> dict[str, str]:
    """The stand-in's persistent env, for what only a direct run does (a terminal's job)."""
    return prepare_persistent_env(
        tmp_path_factory.mktemp("terminal-cache"), wheelhouse, _dbtvenv_pythonpath
    )


class Spawner:
    """Starts dbtvenv processes and kills whatever is left of them when the test ends."""

    def __init__(self, cmd: list[str], make_env: MakeEnv, tmp_path: Path) -> None:
        self.cmd = cmd
        self.make_env = make_env
        self.tmp_path = tmp_path
        self.procs: list[subprocess.Popen[bytes]] = []
        self.pidfiles: list[Path] = []

    def start(
        self,
        *args: str,
        env: Mapping[str, str | None],
        ignoring: Sequence[int] = (),
        **popen: Any,
    ) -> subprocess.Popen[bytes]:
        """Start dbtvenv as a shell starts a foreground command: the termination signals at
        their defaults, whatever pytest inherited (a background job of a script ignores
        SIGINT), but those in `ignoring` ignored (as `nohup` does)."""
        popen.setdefault("stdout", subprocess.DEVNULL)
        popen.setdefault("stderr", subprocess.PIPE)
        popen.setdefault("stdin", subprocess.DEVNULL)
        popen.setdefault("start_new_session", True)  # never the terminal pytest may run at
        proc = subprocess.Popen(
            [*self.cmd, *args],
            env=self.make_env(env),
            preexec_fn=lambda: default_signals(ignoring),
            **popen,
        )
        self.procs.append(proc)
        return proc

    def pidfile(self, name: str) -> Path:
        path = self.tmp_path / name
        self.pidfiles.append(path)
        return path

    def clean_up(self) -> None:
        pids = [proc.pid for proc in self.procs]
        for path in self.pidfiles:
            with contextlib.suppress(OSError, ValueError):
                pids.append(int(path.read_text()))
        for pid in pids:
            pids.extend(children_of(pid))
        kill_quietly(pids)
        for proc in self.procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.communicate(timeout=10)


@pytest.fixture
def spawner(dbtvenv_cmd: list[str], make_env: MakeEnv, tmp_path: Path) -> Iterator[Spawner]:
    spawner = Spawner(dbtvenv_cmd, make_env, tmp_path)
    yield spawner
    spawner.clean_up()


def default_signals(ignoring: Sequence[int] = ()) -> None:
    """In a child before exec: the termination signals at their defaults, `ignoring` ignored."""
    for signum in TERMINATING:
        signal.signal(signum, signal.SIG_DFL)
    for signum in ignoring:
        signal.signal(signum, signal.SIG_IGN)


def wait_for_lines(path: Path, count: int, timeout: float = 30.0) -> list[str]:
    """The lines of `path` once it has at least `count` of them."""
    deadline = time.monotonic() + timeout
    while True:
        lines = read_lines(path)
        if len(lines) >= count:
            return lines
        if time.monotonic() >= deadline:
            raise AssertionError(f"{path} has {lines}, not {count} line(s), after {timeout}s")
        time.sleep(0.02)


def read_lines(path: Path) -> list[str]:
    try:
        return path.read_text().splitlines()
    except FileNotFoundError:
        return []


def finish(proc: subprocess.Popen[bytes], timeout: float = 60) -> tuple[int, str]:
    _, stderr = proc.communicate(timeout=timeout)
    return proc.returncode, (stderr or b"").decode("utf-8", "replace")


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("dbtvenv: error:")]


# --- signals while dbt runs -------------------------------------------------------------


@pytest.mark.parametrize("to_group", [False, True], ids=["to-dbtvenv", "to-its-group"])
@pytest.mark.parametrize("signum", TERMINATING, ids=_name)
def test_signal_reaches_dbt_exactly_once(
    spawner: Spawner,
    senders_env: dict[str, str],
    tmp_path: Path,
    signum: int,
    to_group: bool,
) -> None:
    """Sent to dbtvenv, or to its whole process group as Airflow does on a task kill: dbt gets
    it from dbtvenv (in warm mode: from the warm process, told by dbtvenv), and only from there.

    dbt keeps running on the signal under test, so a later copy would be recorded too; a
    different signal then ends it, and dbtvenv exits with the status of that one.
    """
    senders_file = tmp_path / "senders"
    pidfile = spawner.pidfile("dbt.pid")
    proc = spawner.start(
        "dbt",
        "--",
        "run",
        env={
            **senders_env,
            "SENDERS_FILE": str(senders_file),
            "SENDERS_PIDFILE": str(pidfile),
            "SENDERS_KEEP_ON": _name(signum),
        },
    )
    wait_for_pidfile(pidfile)
    if to_group:
        os.killpg(proc.pid, signum)
    else:
        os.kill(proc.pid, signum)
    [first] = wait_for_lines(senders_file, 1)
    ending = ENDING[signum]
    os.kill(proc.pid, ending)
    status, stderr = finish(proc)
    mode = mode_of(senders_env)
    assert_mode(stderr, mode)
    sender = proc.pid if mode == "direct" else warm_server_of(stderr)
    assert first == f"{_name(signum)} {sender}"
    assert read_lines(senders_file) == [first, f"{_name(ending)} {sender}"]
    assert status == 128 + ending, stderr
    assert "Traceback" not in stderr


def test_kill_grace_kills_dbt_and_its_children(
    spawner: Spawner, persistent_env: dict[str, str], tmp_path: Path
) -> None:
    """A dbt that ignores SIGTERM is killed, with its child, once DBTVENV_KILL_GRACE is over."""
    signals_file = tmp_path / "signals"
    pidfile = spawner.pidfile("dbt.pid")
    grandchild_pidfile = spawner.pidfile("grandchild.pid")
    proc = spawner.start(
        "run",
        env={
            **persistent_env,
            "DBTVENV_KILL_GRACE": "1",
            "STANDIN_SIGNALS_FILE": str(signals_file),
            "STANDIN_IGNORE_SIGTERM": "1",
            "STANDIN_PIDFILE": str(pidfile),
            "STANDIN_GRANDCHILD_PIDFILE": str(grandchild_pidfile),
            "STANDIN_SLEEP": LONG_SLEEP,
        },
    )
    dbt = psutil.Process(wait_for_pidfile(pidfile))
    grandchild = psutil.Process(wait_for_pidfile(grandchild_pidfile))
    os.kill(proc.pid, signal.SIGTERM)
    status, stderr = finish(proc)
    assert_mode(stderr, mode_of(persistent_env))
    assert status == 128 + signal.SIGKILL, stderr
    assert read_lines(signals_file) == ["SIGTERM"]
    assert_no_survivors([dbt, grandchild])


def test_sigkill_of_dbtvenv_takes_dbt_along(
    spawner: Spawner, persistent_env: dict[str, str]
) -> None:
    pidfile = spawner.pidfile("dbt.pid")
    proc = spawner.start(
        "run", env={**persistent_env, "STANDIN_PIDFILE": str(pidfile), "STANDIN_SLEEP": LONG_SLEEP}
    )
    dbt = psutil.Process(wait_for_pidfile(pidfile))
    if mode_of(persistent_env) == "warm":
        assert dbt.ppid() != proc.pid  # forked by the warm process, not started by dbtvenv
    proc.kill()
    proc.wait(timeout=30)
    assert_no_survivors([dbt], timeout=10)


@pytest.mark.parametrize("signum", [signal.SIGHUP, signal.SIGINT], ids=_name)
def test_an_ignored_signal_stays_ignored(
    spawner: Spawner, persistent_env: dict[str, str], signum: int
) -> None:
    """`nohup dbtvenv ...` (or a background job of a script, for SIGINT): dbt ignores it too,
    and dbtvenv does not pass it on."""
    pidfile = spawner.pidfile("dbt.pid")
    proc = spawner.start(
        "run",
        env={**persistent_env, "STANDIN_PIDFILE": str(pidfile), "STANDIN_SLEEP": LONG_SLEEP},
        ignoring=[signum],
    )
    dbt_pid = wait_for_pidfile(pidfile)
    assert signum in _ignored_signals(dbt_pid)
    os.killpg(proc.pid, signum)
    os.kill(proc.pid, signum)
    # A signal that is ignored is discarded when sent: had dbt or dbtvenv acted on it, the
    # SIGTERM below would not be what ends the run.
    os.kill(proc.pid, signal.SIGTERM)
    status, stderr = finish(proc)
    assert_mode(stderr, mode_of(persistent_env))
    assert status == 128 + signal.SIGTERM, stderr


def _ignored_signals(pid: int) -> set[int]:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("SigIgn:"):
            mask = int(line.split()[1], 16)
            return {n for n in range(1, 65) if mask & (1 << (n - 1))}
    raise AssertionError(f"no SigIgn in /proc/{pid}/status")


# --- at a terminal ----------------------------------------------------------------------

# A tiny job-control shell, the controlling process of a pseudo-terminal: it runs its arguments as
# a foreground job, as bash does, and reports what it sees as JSON lines to the file argv[1].
JOB_SHELL = r"""
import json, os, signal, sys

report_path, argv = sys.argv[1], sys.argv[2:]

def report(**event):
    with open(report_path, "a") as f:
        f.write(json.dumps(event) + "\n")

for s in (signal.SIGTTOU, signal.SIGTTIN, signal.SIGTSTP):
    signal.signal(s, signal.SIG_IGN)
pid = os.fork()
if pid == 0:
    os.setpgid(0, 0)
    os.tcsetpgrp(0, os.getpid())
    for s in (signal.SIGTTOU, signal.SIGTTIN, signal.SIGTSTP):
        signal.signal(s, signal.SIG_DFL)
    os.execv(argv[0], argv)
try:
    os.setpgid(pid, pid)
except OSError:
    pass
os.tcsetpgrp(0, pid)
report(event="started", job=pid)
while True:
    _, status = os.waitpid(pid, os.WUNTRACED)
    if os.WIFSTOPPED(status):
        foreground = os.tcgetpgrp(0)
        os.tcsetpgrp(0, os.getpgrp())
        report(event="stopped", signal=os.WSTOPSIG(status), foreground=foreground)
        os.tcsetpgrp(0, pid)  # `fg`
        os.killpg(pid, signal.SIGCONT)
        report(event="continued")
        continue
    report(event="exited", status=os.waitstatus_to_exitcode(status), foreground=os.tcgetpgrp(0))
    break
"""


class TerminalJob:
    """dbtvenv as the foreground job of a shell at a pseudo-terminal."""

    def __init__(self, spawner: Spawner, args: list[str], env: Mapping[str, str | None]) -> None:
        self.report_path = spawner.tmp_path / "job-shell.jsonl"
        master, slave = os.openpty()
        self.master = master
        self.shell = subprocess.Popen(
            [sys.executable, "-c", JOB_SHELL, str(self.report_path), *spawner.cmd, *args],
            env=spawner.make_env(env),
            stdin=slave,
            stdout=slave,
            stderr=slave,
            start_new_session=True,
            preexec_fn=self._terminal_setup,
        )
        spawner.procs.append(self.shell)
        os.close(slave)
        self.output = bytearray()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    @staticmethod
    def _terminal_setup() -> None:
        default_signals()
        fcntl.ioctl(0, termios.TIOCSCTTY, 0)  # the pty becomes the controlling terminal

    def _read(self) -> None:
        while True:
            try:
                chunk = os.read(self.master, 65536)
            except OSError:  # EIO: every process of the terminal has closed it
                return
            if not chunk:
                return
            self.output += chunk

    def type(self, data: bytes) -> None:
        os.write(self.master, data)

    def foreground(self) -> int:
        return os.tcgetpgrp(self.master)

    def wait_for_foreground(self, pgrp: int, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while self.foreground() != pgrp:
            if time.monotonic() >= deadline:
                raise AssertionError(f"foreground is {self.foreground()}, not {pgrp}")
            time.sleep(0.02)

    def events(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in read_lines(self.report_path)]

    def wait_for_event(self, name: str, timeout: float = 60.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            found = [e for e in self.events() if e["event"] == name]
            if found:
                return found[0]
            if time.monotonic() >= deadline:
                raise AssertionError(
                    f"no {name!r} event after {timeout}s: {self.events()}\n"
                    f"terminal output:\n{self.output.decode('utf-8', 'replace')}"
                )
            time.sleep(0.02)

    def close(self) -> None:
        self.shell.wait(timeout=30)
        self._reader.join(timeout=10)
        os.close(self.master)


def _dbt_in_the_foreground(
    spawner: Spawner, environ: dict[str, str], **standin: str
) -> tuple[TerminalJob, int, int]:
    """`dbtvenv run` at a terminal, its stand-in dbt told `standin`; returns once dbt runs and
    holds the terminal's foreground: the job, dbtvenv's pid and dbt's."""
    pidfile = spawner.pidfile("dbt.pid")
    job = TerminalJob(spawner, ["run"], {**environ, **standin, "STANDIN_PIDFILE": str(pidfile)})
    dbtvenv_pid = job.wait_for_event("started")["job"]
    dbt_pid = wait_for_pidfile(pidfile)
    job.wait_for_foreground(dbt_pid)
    return job, dbtvenv_pid, dbt_pid


def test_ctrl_c_at_a_terminal_reaches_dbt_once(
    spawner: Spawner, persistent_env: dict[str, str], tmp_path: Path
) -> None:
    """dbt runs in the terminal's foreground; the Ctrl-C reaches it straight from the terminal,
    and dbtvenv gives the foreground back to its own group when dbt has exited. With --warm
    too: at a terminal dbt runs directly."""
    signals_file = tmp_path / "signals"
    job, dbtvenv_pid, _dbt_pid = _dbt_in_the_foreground(
        spawner, persistent_env, STANDIN_SIGNALS_FILE=str(signals_file), STANDIN_SLEEP=LONG_SLEEP
    )
    job.type(b"\x03")
    exited = job.wait_for_event("exited")
    job.close()
    assert exited["status"] == 128 + signal.SIGINT, job.output
    assert read_lines(signals_file) == ["SIGINT"]
    assert exited["foreground"] == dbtvenv_pid
    if mode_of(persistent_env) == "warm":  # dbt needs the terminal: warm mode stands aside
        assert b"running dbt directly: stdin is a terminal" in job.output, job.output


def test_ctrl_c_at_a_terminal_is_not_passed_on_again(
    spawner: Spawner, direct_env: dict[str, str], tmp_path: Path
) -> None:
    """A dbt that ignores SIGINT records every copy it gets: the terminal's is the only one."""
    signals_file = tmp_path / "signals"
    job, dbtvenv_pid, _dbt_pid = _dbt_in_the_foreground(
        spawner,
        direct_env,
        STANDIN_SIGNALS_FILE=str(signals_file),
        STANDIN_IGNORE_SIGINT="1",
        STANDIN_SLEEP=LONG_SLEEP,
    )
    job.type(b"\x03")
    assert wait_for_lines(signals_file, 1) == ["SIGINT"]
    os.kill(dbtvenv_pid, signal.SIGTERM)
    exited = job.wait_for_event("exited")
    job.close()
    assert read_lines(signals_file) == ["SIGINT", "SIGTERM"]
    assert exited["status"] == 128 + signal.SIGTERM, job.output
    assert exited["foreground"] == dbtvenv_pid


def test_dbt_reads_the_terminal(
    spawner: Spawner, direct_env: dict[str, str], tmp_path: Path
) -> None:
    """dbt can ask questions (`dbt init`): a background group reading its terminal would stop."""
    job, dbtvenv_pid, _dbt_pid = _dbt_in_the_foreground(spawner, direct_env, STANDIN_READ_STDIN="1")
    job.type(b"my answer\n\x04")
    exited = job.wait_for_event("exited")
    job.close()
    assert exited["status"] == 0, job.output
    assert exited["foreground"] == dbtvenv_pid
    assert [e["event"] for e in job.events()] == ["started", "exited"]  # never stopped
    report = next(
        json.loads(line)
        for line in job.output.decode("utf-8", "replace").splitlines()
        if line.startswith("{")
    )
    assert report["stdin"] == "my answer\n"


def test_ctrl_z_at_a_terminal_stops_the_job(
    spawner: Spawner, direct_env: dict[str, str], tmp_path: Path
) -> None:
    """Ctrl-Z stops dbt; dbtvenv follows it, so the shell sees its job stopped (rather than
    waiting forever on a dbtvenv that still runs), and `fg` continues dbt at the terminal."""
    signals_file = tmp_path / "signals"
    job, dbtvenv_pid, dbt_pid = _dbt_in_the_foreground(
        spawner, direct_env, STANDIN_SIGNALS_FILE=str(signals_file), STANDIN_SLEEP=LONG_SLEEP
    )
    job.type(b"\x1a")
    stopped = job.wait_for_event("stopped")
    assert stopped["signal"] == signal.SIGTSTP
    assert stopped["foreground"] == dbtvenv_pid  # dbtvenv took the terminal back
    job.wait_for_event("continued")
    job.wait_for_foreground(dbt_pid)  # and handed it to dbt again
    _wait_until_running(dbt_pid)
    job.type(b"\x03")
    exited = job.wait_for_event("exited")
    job.close()
    assert exited["status"] == 128 + signal.SIGINT, job.output
    assert read_lines(signals_file) == ["SIGINT"]


def _wait_until_running(pid: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while psutil.Process(pid).status() == psutil.STATUS_STOPPED:
        if time.monotonic() >= deadline:
            raise AssertionError(f"{pid} still stopped after {timeout}s")
        time.sleep(0.02)


# --- signals while the env is being built -----------------------------------------------


class StallingIndex:
    """A `--find-links` URL that accepts every request and never answers it (until closed)."""

    def __init__(self) -> None:
        self.requested = threading.Event()
        self.released = threading.Event()
        index = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                index.requested.set()
                index.released.wait(120)
                self.send_error(404)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/"

    def close(self) -> None:
        self.released.set()
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def stalling_index() -> Iterator[StallingIndex]:
    index = StallingIndex()
    yield index
    index.close()


@pytest.mark.parametrize("signum", TERMINATING, ids=_name)
def test_signal_during_a_build(
    spawner: Spawner, stalling_index: StallingIndex, tmp_path: Path, signum: int
) -> None:
    """Before dbt starts: one error line, 128+N, the temporary env gone, no pip left."""
    tmpdir = tmp_path / "tmp"
    tmpdir.mkdir()
    proc = spawner.start(
        "run",
        env={
            "DBTVENV_REQUIREMENTS": "dbt-standin==1.0.0",
            "DBTVENV_PIP_INSTALL_OPTIONS": f"--no-index --find-links {stalling_index.url}",
            "TMPDIR": str(tmpdir),
            "NO_PROXY": "127.0.0.1",
            "no_proxy": "127.0.0.1",
        },
    )
    assert stalling_index.requested.wait(60), "pip never asked the index"
    installers = [psutil.Process(pid) for pid in children_of(proc.pid)]
    assert any("pip" in " ".join(p.cmdline()) for p in installers), installers
    assert [p.name for p in tmpdir.iterdir() if p.name.startswith("dbtvenv-")]
    os.kill(proc.pid, signum)
    status, stderr = finish(proc)
    assert status == 128 + signum, stderr
    assert len(error_lines(stderr)) == 1, stderr
    assert "Traceback" not in stderr
    assert [p.name for p in tmpdir.iterdir()] == []
    assert_no_survivors(installers)
