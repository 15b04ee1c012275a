"""dbtvenv under a real Airflow: the example DAGs in examples/airflow/dags, run by `airflow dags
test` from a venv that holds Airflow and dbtvenv (installed from this repository) but no dbt.

The venv is built once per module, from the package registry; the DuckDB test also installs
real dbt-core and dbt-duckdb. The other tests use the offline stand-in dbt.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sqlite3
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import psutil
import pytest
from procs import assert_no_survivors, kill_quietly, wait_for_pidfile

from dbtvenv.lock import EnvLock
from dbtvenv.store import open_cache_root

AIRFLOW_VERSION = "3.3.2"
DBT_REQUIREMENTS = "dbt-core~=1.11.0 dbt-duckdb~=1.11.0"
REPO_ROOT = Path(__file__).resolve().parent.parent
DAGS_DIR = REPO_ROOT / "examples" / "airflow" / "dags"
JAFFLE_DIR = REPO_ROOT / "examples" / "jaffle_duckdb"

pytestmark = [
    pytest.mark.airflow,
    pytest.mark.skipif(sys.version_info < (3, 10), reason="Airflow 3 needs Python 3.10+"),
    pytest.mark.skipif(sys.platform == "win32", reason="Airflow runs on POSIX only"),
]

# Variables of the test runner's environment that must not leak into Airflow or dbtvenv.
_SCRUBBED_PREFIXES = ("DBTVENV_", "AIRFLOW_", "AIRFLOW__", "DBT_", "STANDIN_")
_SCRUBBED = ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "TMPDIR")

# Run with a venv's own interpreter: versions and import locations of a few distributions,
# and the requirements that the named distributions declare on them.
_DEPS_REPORT = """\
import importlib, importlib.metadata as md, json, sys
def version(name):
    try:
        return md.version(name)
    except md.PackageNotFoundError:
        return None
def origin(module):
    try:
        return importlib.import_module(module).__file__
    except ImportError:
        return None
def requires(name):
    try:
        return md.requires(name) or []
    except md.PackageNotFoundError:
        return []
names = ["dbt-core", "dbt-duckdb", "duckdb", "jinja2", "markupsafe", "apache-airflow-core"]
print(json.dumps({
    "versions": {n: version(n) for n in names},
    "origins": {m: origin(m) for m in ("jinja2", "markupsafe")},
    "requires": {n: requires(n) for n in sys.argv[1:]},
}))
"""

_SATISFIED = """\
import json, sys
from packaging.requirements import Requirement
report = json.loads(sys.argv[1])
out = {}
for dist, reqs in report["requires"].items():
    for raw in reqs:
        req = Requirement(raw)
        if req.marker is not None and not req.marker.evaluate({"extra": ""}):
            continue
        if req.name.lower() in ("jinja2", "markupsafe"):
            have = report["versions"][req.name.lower()]
            out[f"{dist} -> {raw}"] = have is not None and req.specifier.contains(
                have, prereleases=True
            )
print(json.dumps(out))
"""


@dataclass(frozen=True)
class Completed:
    returncode: int
    output: str

    def __str__(self) -> str:
        return f"exit status {self.returncode}\n--- output (last 200 lines)\n" + "\n".join(
            self.output.splitlines()[-200:]
        )


@dataclass(frozen=True)
class TaskState:
    state: str | None
    try_number: int


@dataclass(frozen=True)
class Airflow:
    """A throw-away Airflow installation: its venv, its home and its SQLite metadata DB."""

    venv: Path
    home: Path
    db: Path

    @property
    def python(self) -> Path:
        return self.venv / "bin" / "python"

    @property
    def dbtvenv(self) -> Path:
        return self.venv / "bin" / "dbtvenv"

    def environ(self, extra: Mapping[str, str] | None = None) -> dict[str, str]:
        env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith(_SCRUBBED_PREFIXES) and k not in _SCRUBBED
        }
        env.update(
            AIRFLOW_HOME=str(self.home),
            AIRFLOW__CORE__LOAD_EXAMPLES="False",
            AIRFLOW__CORE__DAGS_FOLDER=str(DAGS_DIR),
            AIRFLOW__DATABASE__SQL_ALCHEMY_CONN=f"sqlite:///{self.db}",
            PYTHONWARNINGS="ignore",
            PYTHONDONTWRITEBYTECODE="1",  # parsing the DAGs leaves no __pycache__ in the repo
            DBTVENV_BIN=str(self.dbtvenv),
        )
        env.update(extra or {})
        return env

    def run(
        self, *argv: str, extra: Mapping[str, str] | None = None, timeout: float = 600
    ) -> Completed:
        done = subprocess.run(
            list(argv),
            env=self.environ(extra),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            timeout=timeout,
        )
        return Completed(done.returncode, done.stdout.decode("utf-8", errors="replace"))

    def airflow(self, *args: str, extra: Mapping[str, str] | None = None) -> Completed:
        return self.run(str(self.venv / "bin" / "airflow"), *args, extra=extra)

    def start_dags_test(self, dag_id: str, extra: Mapping[str, str], log: Path) -> _Running:
        out = log.open("wb")
        proc = subprocess.Popen(
            [str(self.venv / "bin" / "airflow"), "dags", "test", dag_id],
            env=self.environ(extra),
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
        return _Running(proc, out, log)

    def task_states(self, dag_id: str) -> dict[str, TaskState]:
        """The task states of the newest run of `dag_id`, read from the metadata DB."""
        last_error: sqlite3.Error | None = None
        for _ in range(100):  # the DB may be locked for a moment by a running Airflow
            try:
                with contextlib.closing(
                    sqlite3.connect(f"file:{self.db}?mode=ro", uri=True, timeout=5)
                ) as con:
                    rows = con.execute(
                        "SELECT task_id, state, try_number FROM task_instance WHERE run_id = "
                        "(SELECT run_id FROM dag_run WHERE dag_id = ? ORDER BY id DESC LIMIT 1)"
                        " AND dag_id = ?",
                        (dag_id, dag_id),
                    ).fetchall()
                return {task: TaskState(state, tries) for task, state, tries in rows}
            except sqlite3.OperationalError as exc:
                last_error = exc
                time.sleep(0.1)
        raise AssertionError(f"cannot read {self.db}: {last_error}")


@dataclass(frozen=True)
class _Running:
    proc: subprocess.Popen[bytes]
    out: IO[bytes]
    log: Path

    def wait(self, timeout: float = 600) -> Completed:
        try:
            self.proc.wait(timeout=timeout)
        finally:
            if self.proc.poll() is None:
                kill_quietly([self.proc.pid])
                self.proc.wait()
            self.out.close()
        return Completed(
            self.proc.returncode, self.log.read_bytes().decode("utf-8", errors="replace")
        )


def _check(done: subprocess.CompletedProcess[bytes], what: str) -> None:
    if done.returncode != 0:
        tail = "\n".join(done.stdout.decode("utf-8", errors="replace").splitlines()[-60:])
        raise AssertionError(f"{what} failed with exit status {done.returncode}:\n{tail}")


def _sh(argv: Sequence[str], what: str, timeout: float = 900) -> str:
    done = subprocess.run(
        list(argv),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        timeout=timeout,
        env={k: v for k, v in os.environ.items() if k not in _SCRUBBED},
    )
    _check(done, what)
    return done.stdout.decode("utf-8", errors="replace")


def _source_copy(dest: Path) -> Path:
    """dbtvenv's sources, copied so that building the wheel leaves nothing in the repository."""
    dest.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO_ROOT / name, dest / name)
    shutil.copytree(
        REPO_ROOT / "dbtvenv", dest / "dbtvenv", ignore=shutil.ignore_patterns("__pycache__")
    )
    return dest


@pytest.fixture(scope="module")
def airflow(tmp_path_factory: pytest.TempPathFactory) -> Airflow:
    """Airflow and dbtvenv (from this repository, not editable) in one venv, a migrated DB."""
    base = tmp_path_factory.mktemp("airflow")
    venv = base / "venv"
    _sh([sys.executable, "-m", "venv", str(venv)], "creating the Airflow venv")
    pip = [str(venv / "bin" / "python"), "-m", "pip", "--disable-pip-version-check"]
    _sh([*pip, "install", "-q", "--upgrade", "pip"], "upgrading pip")
    source = _source_copy(base / "dbtvenv-src")
    _sh(
        [*pip, "install", "-q", f"apache-airflow=={AIRFLOW_VERSION}", str(source)],
        f"installing apache-airflow=={AIRFLOW_VERSION} and dbtvenv",
    )
    check = _sh([*pip, "check"], "pip check in the Airflow venv")
    assert "No broken requirements found" in check, check

    home = base / "home"
    home.mkdir()
    installed = Airflow(venv=venv, home=home, db=base / "airflow.db")
    migrated = installed.airflow("db", "migrate")
    assert migrated.returncode == 0, f"airflow db migrate\n{migrated}"
    version = installed.airflow("version")
    assert version.output.strip().splitlines()[-1] == AIRFLOW_VERSION, str(version)
    return installed


def _marked_processes(mark: str) -> list[psutil.Process]:
    """Every process whose environment holds STANDIN_MARK=mark (a task and all it started)."""
    found = []
    for proc in psutil.process_iter():
        with contextlib.suppress(psutil.Error):
            if proc.environ().get("STANDIN_MARK") == mark:
                found.append(proc)
    return found


def _wait_until(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() >= deadline:
            raise AssertionError(f"not within {timeout} s: {what}")
        time.sleep(0.1)


def _deps_report(python: Path, *dists: str) -> dict[str, dict[str, object]]:
    done = subprocess.run(
        [str(python), "-c", _DEPS_REPORT, *dists],
        capture_output=True,
        timeout=120,
        env={k: v for k, v in os.environ.items() if k not in _SCRUBBED},
    )
    assert done.returncode == 0, done.stderr.decode()
    report: dict[str, dict[str, object]] = json.loads(done.stdout)
    return report


def test_dbt_duckdb_dag_builds_the_project_with_dbt_outside_airflows_env(
    airflow: Airflow, tmp_path: Path
) -> None:
    project = tmp_path / "jaffle_duckdb"
    shutil.copytree(
        JAFFLE_DIR,
        project,
        ignore=shutil.ignore_patterns("target", "logs", "dbt_packages", "*.duckdb*"),
    )
    database = tmp_path / "jaffle.duckdb"
    spec = {
        "DBTVENV_VENV_DIR": str(tmp_path / "cache"),
        "DBTVENV_REQUIREMENTS": DBT_REQUIREMENTS,
    }
    extra = {
        **spec,
        "DBT_PROJECT_DIR": str(project),
        "DBT_DUCKDB_PATH": str(database),
        "DBT_TASK_RETRIES": "0",  # any failure shows at once
    }

    run = airflow.airflow("dags", "test", "dbt_duckdb", extra=extra)

    assert run.returncode == 0, str(run)
    states = airflow.task_states("dbt_duckdb")
    assert states == {
        task: TaskState("success", 1) for task in ("dbt_seed", "dbt_run", "dbt_test")
    }, str(run)

    # The env dbtvenv built for those tasks, found the way a user would.
    found = airflow.run(str(airflow.dbtvenv), "env", "path", extra=spec)
    assert found.returncode == 0, str(found)
    env_dir = Path(found.output.strip().splitlines()[-1])
    assert (env_dir / "dbtvenv.json").is_file()
    env_python = env_dir / "bin" / "python"
    count = (
        "import duckdb, json, sys\n"
        "con = duckdb.connect(sys.argv[1], read_only=True)\n"
        "print(json.dumps({t: con.execute(f'select count(*) from {t}').fetchone()[0]\n"
        "    for t in ('customers', 'orders', 'stg_payments')}))\n"
    )
    counted = subprocess.run(
        [str(env_python), "-c", count, str(database)], capture_output=True, timeout=120
    )
    assert counted.returncode == 0, counted.stderr.decode()
    assert json.loads(counted.stdout) == {"customers": 10, "orders": 20, "stg_payments": 25}

    # dbt lives in its own env only; each side has the Jinja2 and MarkupSafe it asks for.
    theirs = _deps_report(airflow.python, "apache-airflow-core", "jinja2")
    ours = _deps_report(env_python, "dbt-core", "jinja2")
    assert theirs["versions"]["dbt-core"] is None
    assert theirs["versions"]["dbt-duckdb"] is None
    assert not (airflow.venv / "bin" / "dbt").exists()
    assert ours["versions"]["dbt-core"] is not None
    assert str(ours["versions"]["dbt-core"]).startswith("1.11.")
    for module in ("jinja2", "markupsafe"):
        assert str(theirs["origins"][module]).startswith(str(airflow.venv)), theirs
        assert str(ours["origins"][module]).startswith(str(env_dir)), ours
    for report in (theirs, ours):
        satisfied = subprocess.run(
            [str(airflow.python), "-c", _SATISFIED, json.dumps(report)],
            capture_output=True,
            timeout=120,
        )
        assert satisfied.returncode == 0, satisfied.stderr.decode()
        verdicts = json.loads(satisfied.stdout)
        assert verdicts, report  # the requirements on Jinja2 were found
        assert all(verdicts.values()), verdicts
    dbt_env_check = airflow.run(
        str(airflow.python), "-m", "pip", "--python", str(env_python), "check", extra={}
    )
    assert dbt_env_check.returncode == 0, str(dbt_env_check)


def test_execution_timeout_leaves_no_dbt_process_and_no_temporary_env(
    airflow: Airflow, tmp_path: Path, pip_offline_options: str
) -> None:
    """Airflow's timeout SIGTERMs bash and dbtvenv; dbt, which ignores it, is killed after
    DBTVENV_KILL_GRACE, and the temporary env goes with it.

    `airflow dags test` exits about 2 s after the timeout, as a task process does on a worker,
    so with a 5 s grace dbtvenv usually finishes its clean-up after Airflow has stopped reading
    its output: the clean-up must not depend on anyone listening.
    """
    tmpdir = tmp_path / "tmp"
    tmpdir.mkdir()
    workdir = tmp_path / "project"
    workdir.mkdir()
    pidfile = tmp_path / "dbt.pid"
    signals = tmp_path / "signals"
    mark = uuid.uuid4().hex
    extra = {
        "DBTVENV_TEMPORARY": "1",
        "DBTVENV_REQUIREMENTS": "dbt-standin==1.0.0",
        "DBTVENV_PIP_INSTALL_OPTIONS": pip_offline_options,
        "DBTVENV_KILL_GRACE": "5",
        "DBT_TIMEOUT_SECONDS": "15",
        "DBT_PROJECT_DIR": str(workdir),
        "TMPDIR": str(tmpdir),
        "STANDIN_SLEEP": "120",
        "STANDIN_PIDFILE": str(pidfile),
        "STANDIN_SIGNALS_FILE": str(signals),
        "STANDIN_IGNORE_SIGTERM": "1",
        "STANDIN_MARK": mark,
    }

    running = airflow.start_dags_test("dbt_timeout", extra, tmp_path / "dags-test.log")
    seen: list[psutil.Process] = []
    try:
        try:
            dbt_pid = wait_for_pidfile(pidfile, timeout=120)
        except AssertionError:
            running.proc.kill()
            raise AssertionError(
                f"dbt never started (the env build must finish within the timeout)\n"
                f"{running.wait()}"
            ) from None
        seen = _marked_processes(mark)
        assert dbt_pid in {p.pid for p in seen}
        assert any(str(tmpdir) in " ".join(p.cmdline()) for p in seen if p.pid == dbt_pid)
        done = running.wait(timeout=300)

        assert done.returncode != 0, str(done)
        assert "AirflowTaskTimeout" in done.output, str(done)
        assert airflow.task_states("dbt_timeout") == {"dbt_slow": TaskState("failed", 1)}
        assert_no_survivors([dbt_pid, *seen], timeout=30)
        assert _marked_processes(mark) == []
        assert signals.read_text().splitlines() == ["SIGTERM"]
        _wait_until(
            lambda: not [p for p in tmpdir.iterdir() if p.name.startswith("dbtvenv-")],
            30,
            f"the temporary env under {tmpdir} is removed",
        )
    finally:
        for proc in [*seen, *_marked_processes(mark)]:  # a Process object never hits a reused pid
            with contextlib.suppress(psutil.Error):
                proc.kill()
        if running.proc.poll() is None:
            running.proc.kill()
            running.wait()


@pytest.fixture
def stand_in_dag(tmp_path: Path, pip_offline_options: str) -> dict[str, str]:
    """Settings that run the dbt_duckdb DAG's tasks on the stand-in dbt, offline."""
    workdir = tmp_path / "project"
    workdir.mkdir()
    return {
        "DBTVENV_VENV_DIR": str(tmp_path / "cache"),
        "DBTVENV_REQUIREMENTS": "dbt-standin==1.0.0",
        "DBTVENV_PIP_INSTALL_OPTIONS": pip_offline_options,
        "DBT_PROJECT_DIR": str(workdir),
    }


@contextlib.contextmanager
def _env_lock_held(airflow: Airflow, spec: Mapping[str, str]) -> Iterator[EnvLock]:
    """Hold the lock of the env that `spec` maps to, as a live builder on this host would."""
    found = airflow.run(str(airflow.dbtvenv), "env", "path", extra=spec)
    assert found.returncode == 0, str(found)
    env_dir = Path(found.output.strip().splitlines()[-1])
    open_cache_root(env_dir.parent)
    lock = EnvLock(
        env_dir.with_name(env_dir.name + ".lock"), timeout=10, lease=60, argv=["builder"]
    )
    with lock:
        yield lock


def test_lock_timeout_exit_75_is_retried_until_the_builder_is_done(
    airflow: Airflow, tmp_path: Path, stand_in_dag: dict[str, str]
) -> None:
    extra = {
        **stand_in_dag,
        "DBTVENV_LOCK_TIMEOUT": "1",
        "DBT_TASK_RETRIES": "3",
        "DBT_TASK_RETRY_DELAY": "2",
    }
    with _env_lock_held(airflow, stand_in_dag) as lock:
        running = airflow.start_dags_test("dbt_duckdb", extra, tmp_path / "dags-test.log")
        try:
            _wait_until(
                lambda: (
                    airflow.task_states("dbt_duckdb").get("dbt_seed")
                    == TaskState("up_for_retry", 1)
                    or running.proc.poll() is not None
                ),
                300,
                "dbt_seed is up for retry",
            )
        finally:
            lock.release()  # the builder is done: the next try builds the env itself
            done = running.wait()

    assert done.returncode == 0, str(done)
    assert "gave up after 1 s waiting for the lock" in done.output, str(done)
    assert "non-zero exit code 75" in done.output, str(done)
    states = airflow.task_states("dbt_duckdb")
    assert states["dbt_seed"].state == "success", states
    assert states["dbt_seed"].try_number >= 2, states
    assert states["dbt_run"] == TaskState("success", 1), states
    assert states["dbt_test"] == TaskState("success", 1), states


def test_dbt_failure_is_not_retried(
    airflow: Airflow, tmp_path: Path, stand_in_dag: dict[str, str]
) -> None:
    extra = {
        **stand_in_dag,
        "STANDIN_EXIT": "1",  # a dbt node failed: running it again would fail the same way
        "DBT_TASK_RETRIES": "3",
        "DBT_TASK_RETRY_DELAY": "0",
    }

    done = airflow.airflow("dags", "test", "dbt_duckdb", extra=extra)

    assert done.returncode == 1, str(done)
    assert "the command exited 1; not retried" in done.output, str(done)
    assert airflow.task_states("dbt_duckdb") == {
        "dbt_seed": TaskState("failed", 1),
        "dbt_run": TaskState("upstream_failed", 0),
        "dbt_test": TaskState("upstream_failed", 0),
    }
