"""dbtvenv under a real Airflow: the example DAGs in examples/airflow/dags, run by `airflow dags
test` from a venv that holds Airflow and dbtvenv (installed from this repository) but no dbt.

The venv (tests/airflowenv.py, shared with the Cosmos tests) is built once per session, from
the package registry; the DuckDB test also installs real dbt-core and dbt-duckdb. The other
tests use the offline stand-in dbt.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path

import psutil
import pytest
from airflowenv import SCRUBBED, Airflow, TaskState, marked_processes, wait_until
from procs import assert_no_survivors, wait_for_pidfile

from dbtvenv.lock import EnvLock
from dbtvenv.store import open_cache_root

DBT_REQUIREMENTS = "dbt-core~=1.11.0 dbt-duckdb~=1.11.0"
REPO_ROOT = Path(__file__).resolve().parent.parent
JAFFLE_DIR = REPO_ROOT / "examples" / "jaffle_duckdb"

pytestmark = [
    pytest.mark.airflow,
    pytest.mark.skipif(sys.version_info < (3, 10), reason="Airflow 3 needs Python 3.10+"),
    pytest.mark.skipif(sys.platform == "win32", reason="Airflow runs on POSIX only"),
]

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


def _deps_report(python: Path, *dists: str) -> dict[str, dict[str, object]]:
    done = subprocess.run(
        [str(python), "-c", _DEPS_REPORT, *dists],
        capture_output=True,
        timeout=120,
        env={k: v for k, v in os.environ.items() if k not in SCRUBBED},
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
        seen = marked_processes(mark)
        assert dbt_pid in {p.pid for p in seen}
        assert any(str(tmpdir) in " ".join(p.cmdline()) for p in seen if p.pid == dbt_pid)
        done = running.wait(timeout=300)

        assert done.returncode != 0, str(done)
        assert "AirflowTaskTimeout" in done.output, str(done)
        assert airflow.task_states("dbt_timeout") == {"dbt_slow": TaskState("failed", 1)}
        assert_no_survivors([dbt_pid, *seen], timeout=30)
        assert marked_processes(mark) == []
        assert signals.read_text().splitlines() == ["SIGTERM"]
        wait_until(
            lambda: not [p for p in tmpdir.iterdir() if p.name.startswith("dbtvenv-")],
            30,
            f"the temporary env under {tmpdir} is removed",
        )
    finally:
        for proc in [*seen, *marked_processes(mark)]:  # a Process object never hits a reused pid
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
            wait_until(
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
