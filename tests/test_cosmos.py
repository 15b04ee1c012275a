"""Cosmos on dbtvenv: the example DAGs in examples/cosmos/dags (`ExecutionMode.LOCAL` with a
`dbtvenv shim` as dbt) run by `airflow dags test` under a real Airflow and Cosmos, from the
venv the Airflow tests use too (tests/airflowenv.py), which holds no dbt.

One real dbt env (dbt-core + dbt-duckdb) is prepared once, as a deployment would, and runs the
whole manifest-rendered DAG and a small `dbt ls`-rendered one. The kill tests use the offline
stand-in dbt, which sleeps and records the signals it gets.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import psutil
import pytest
from airflowenv import REPO_ROOT, Airflow, TaskState, marked_processes
from procs import assert_no_survivors, wait_for_pidfile

DBT_REQUIREMENTS = ("dbt-core~=1.11.0", "dbt-duckdb~=1.11.0")
COSMOS_DAGS = REPO_ROOT / "examples" / "cosmos" / "dags"
JAFFLE_DIR = REPO_ROOT / "examples" / "jaffle_duckdb"

pytestmark = [
    pytest.mark.cosmos,
    pytest.mark.skipif(sys.version_info < (3, 10), reason="Airflow 3 needs Python 3.10+"),
    pytest.mark.skipif(sys.platform == "win32", reason="Airflow runs on POSIX only"),
]

# The manifest DAG, one task per node of the example project.
ALL_TASKS = {
    "raw_customers_seed",
    "raw_orders_seed",
    "raw_payments_seed",
    "stg_customers.run",
    "stg_customers.test",
    "stg_orders.run",
    "stg_orders.test",
    "stg_payments.run",
    "stg_payments.test",
    "customers.run",
    "customers.test",
    "orders.run",
    "orders.test",
    "customers_snapshot_snapshot",
}


class Deployed(NamedTuple):
    """A dbt env prepared and a shim written for it, as at deploy time."""

    cache: Path
    env_dir: Path
    shim: Path
    spec: list[str]


def _deploy(airflow: Airflow, base: Path, spec: list[str], name: str) -> Deployed:
    cache, shim = base / "cache", base / "bin" / name
    shim.parent.mkdir(parents=True)
    # uv (the dev extra puts it beside this interpreter) builds faster; the key is the same.
    uv = shutil.which("uv", path=str(Path(sys.executable).parent))
    installer = ["--installer", "uv"] if uv else []
    path = os.pathsep.join(
        p for p in (str(Path(sys.executable).parent), os.environ.get("PATH")) if p
    )
    prepared = airflow.run(
        str(airflow.dbtvenv),
        "env",
        "prepare",
        "--venv-dir",
        str(cache),
        *spec,
        *installer,
        extra={"PATH": path},
        timeout=900,
    )
    assert prepared.returncode == 0, str(prepared)
    written = airflow.run(
        str(airflow.dbtvenv), "shim", "--venv-dir", str(cache), *spec, "--output", str(shim)
    )
    assert written.returncode == 0, str(written)
    env_dir = Path(prepared.output.strip().splitlines()[-1])
    return Deployed(cache, env_dir, shim, spec)


@pytest.fixture(scope="module")
def real_dbt(airflow: Airflow, tmp_path_factory: pytest.TempPathFactory) -> Deployed:
    spec = [arg for r in DBT_REQUIREMENTS for arg in ("--requirements", r)]
    return _deploy(airflow, tmp_path_factory.mktemp("cosmos-real"), spec, "dbt-jaffle")


@pytest.fixture(scope="module")
def standin_dbt(
    airflow: Airflow, tmp_path_factory: pytest.TempPathFactory, wheelhouse: Path
) -> Deployed:
    spec = [
        "--requirements",
        "dbt-standin==1.0.0",
        "--pip-install-options",
        f"--no-index --find-links {wheelhouse}",
    ]
    return _deploy(airflow, tmp_path_factory.mktemp("cosmos-standin"), spec, "dbt-standin")


@pytest.fixture(scope="module")
def project(real_dbt: Deployed, airflow: Airflow, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the example project with its manifest, made by `<shim> parse` at deploy time."""
    project = tmp_path_factory.mktemp("cosmos-project") / "jaffle_duckdb"
    shutil.copytree(
        JAFFLE_DIR,
        project,
        ignore=shutil.ignore_patterns("target", "logs", "dbt_packages", "*.duckdb*"),
    )
    parsed = airflow.run(
        str(real_dbt.shim), "parse", "--project-dir", str(project), "--profiles-dir", str(project)
    )
    assert parsed.returncode == 0, str(parsed)
    assert (project / "target" / "manifest.json").is_file()
    return project


def _dags_folder(tmp_path: Path, *files: str) -> Path:
    """A DAGs folder with only the given example DAG files (and the module they share): what
    Airflow parses runs no `dbt ls` that the test did not ask for."""
    folder = tmp_path / "dags"
    folder.mkdir()
    for name in ("jaffle_cosmos.py", *files):
        (folder / name).symlink_to(COSMOS_DAGS / name)
    return folder


def _settings(
    tmp_path: Path, deployed: Deployed, project: Path, dag_file: str, **more: str
) -> dict[str, str]:
    connection = {"conn_type": "duckdb", "host": str(tmp_path / "jaffle.duckdb")}
    return {
        "AIRFLOW__CORE__DAGS_FOLDER": str(_dags_folder(tmp_path, dag_file)),
        "COSMOS_DBT_EXECUTABLE": str(deployed.shim),
        "DBT_PROJECT_DIR": str(project),
        "AIRFLOW_CONN_JAFFLE_DUCKDB": json.dumps(connection),
        "COSMOS_TASK_RETRIES": "0",  # any failure shows at once
        **more,
    }


def _last_used(airflow: Airflow, deployed: Deployed) -> float | None:
    info = airflow.run(
        str(airflow.dbtvenv),
        "env",
        "info",
        "--json",
        "--venv-dir",
        str(deployed.cache),
        *deployed.spec,
    )
    assert info.returncode == 0, str(info)
    last_used = json.loads(info.output[info.output.index("{") :])["last_used"]
    return None if last_used is None else _timestamp(last_used)


def _timestamp(iso: str) -> float:
    from datetime import datetime

    return datetime.fromisoformat(iso).timestamp()


def _row_counts(deployed: Deployed, database: Path) -> dict[str, int]:
    count = (
        "import duckdb, json, sys\n"
        "con = duckdb.connect(sys.argv[1], read_only=True)\n"
        "print(json.dumps({t: con.execute(f'select count(*) from {t}').fetchone()[0]\n"
        "    for t in sys.argv[2:]}))\n"
    )
    done = subprocess.run(
        [
            str(deployed.env_dir / "bin" / "python"),
            "-c",
            count,
            str(database),
            "customers",
            "orders",
            "stg_payments",
            "customers_snapshot",
        ],
        capture_output=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr.decode()
    counts: dict[str, int] = json.loads(done.stdout)
    return counts


def test_manifest_dag_runs_every_node_with_dbt_from_the_dbtvenv_env(
    airflow: Airflow, real_dbt: Deployed, project: Path, tmp_path: Path
) -> None:
    before = time.time()
    extra = _settings(tmp_path, real_dbt, project, "cosmos_jaffle_manifest.py")

    run = airflow.airflow("dags", "test", "cosmos_jaffle_manifest", extra=extra)

    assert run.returncode == 0, str(run)
    states = airflow.task_states("cosmos_jaffle_manifest")
    assert states == {task: TaskState("success", 1) for task in ALL_TASKS}, str(run)
    assert f"Running command: ['{real_dbt.shim}', 'run', '--select'" in run.output
    assert "dbt ls" not in run.output  # rendering from the manifest runs no dbt
    assert _row_counts(real_dbt, tmp_path / "jaffle.duckdb") == {
        "customers": 10,
        "orders": 20,
        "stg_payments": 25,
        "customers_snapshot": 10,
    }

    # dbt ran from dbtvenv's env, which recorded the use; Airflow's env has no dbt to run.
    last_used = _last_used(airflow, real_dbt)
    assert last_used is not None and last_used >= before - 1
    assert not (airflow.venv / "bin" / "dbt").exists()
    no_dbt = airflow.run(
        str(airflow.python), "-c", "import importlib.util as u; print(u.find_spec('dbt'))"
    )
    assert no_dbt.output.strip().splitlines()[-1] == "None", str(no_dbt)


def test_dbt_ls_dag_renders_through_the_shim_with_a_small_selection(
    airflow: Airflow, real_dbt: Deployed, project: Path, tmp_path: Path
) -> None:
    extra = _settings(
        tmp_path, real_dbt, project, "cosmos_jaffle_dbt_ls.py", COSMOS_SELECT="+stg_customers"
    )

    run = airflow.airflow("dags", "test", "cosmos_jaffle_dbt_ls", extra=extra)

    assert run.returncode == 0, str(run)
    assert f"`{real_dbt.shim} ls --output json" in run.output  # dbt ls, while parsing
    states = airflow.task_states("cosmos_jaffle_dbt_ls")
    expected = ("raw_customers_seed", "stg_customers.run", "stg_customers.test")
    assert states == {task: TaskState("success", 1) for task in expected}, str(run)


@pytest.fixture
def mark() -> Iterator[str]:
    """A mark in the environment of every process a test starts; whatever is left is killed."""
    value = uuid.uuid4().hex
    yield value
    for proc in marked_processes(value):
        with contextlib.suppress(psutil.Error):
            proc.kill()


@pytest.mark.parametrize("how", ["SIGTERM to the task's group", "execution_timeout"])
def test_a_killed_task_leaves_no_dbt_and_ends_promptly(
    airflow: Airflow,
    standin_dbt: Deployed,
    project: Path,
    tmp_path: Path,
    mark: str,
    how: str,
) -> None:
    """Airflow stops the task; Cosmos's on_kill signals the shim's process group (SIGINT: it
    cancels queries); dbtvenv passes it to dbt once. For the timeout the stand-in ignores it,
    so dbtvenv must kill it after DBTVENV_KILL_GRACE."""
    pidfile, signals = tmp_path / "dbt.pid", tmp_path / "signals"
    timeout = how == "execution_timeout"
    extra = _settings(
        tmp_path,
        standin_dbt,
        project,
        "cosmos_jaffle_manifest.py",
        COSMOS_SELECT="stg_customers",
        STANDIN_SLEEP="300",
        STANDIN_PIDFILE=str(pidfile),
        STANDIN_SIGNALS_FILE=str(signals),
        STANDIN_MARK=mark,
        DBTVENV_KILL_GRACE="5",
        **({"COSMOS_TASK_TIMEOUT": "5", "STANDIN_IGNORE_SIGINT": "1"} if timeout else {}),
    )
    running = airflow.start_dags_test(
        "cosmos_jaffle_manifest", extra, tmp_path / "dags-test.log", new_session=True
    )
    try:
        dbt_pid = wait_for_pidfile(pidfile, timeout=180)
    except AssertionError:
        running.proc.kill()
        raise AssertionError(f"dbt never started\n{running.wait()}") from None
    seen = marked_processes(mark)
    dbt = psutil.Process(dbt_pid)
    assert dbt.cmdline()[0].startswith(str(standin_dbt.env_dir)), dbt.cmdline()
    started = time.monotonic()
    if not timeout:
        os.killpg(running.proc.pid, signal.SIGTERM)

    done = running.wait(timeout=120)
    ended = time.monotonic() - started

    assert done.returncode != 0, str(done)
    assert airflow.task_states("cosmos_jaffle_manifest")["stg_customers.run"].state == "failed"
    if timeout:
        assert "AirflowTaskTimeout" in done.output, str(done)
    assert ended < 60, f"the task took {ended:.0f} s to end; dbt sleeps 300 s\n{done}"
    assert_no_survivors([dbt_pid, *seen], timeout=30)
    assert marked_processes(mark) == []
    assert signals.read_text().splitlines() == ["SIGINT"]
