"""Airflow DAG `dbt_timeout`: one dbtvenv task that Airflow stops with `execution_timeout`.

It shows (and the tests check) that a dbt run killed by Airflow leaves no process behind: when
the timeout fires, Airflow sends SIGTERM to the task's process group (bash and dbtvenv);
dbtvenv forwards it to dbt, which runs in a process group of its own, waits up to
DBTVENV_KILL_GRACE seconds, then SIGKILLs dbt's group, and exits.

Configuration, all from the environment of the Airflow worker (read when the DAG file is
parsed; the task also inherits the worker's whole environment, `append_env=True`):

    DBTVENV_BIN           the dbtvenv executable (default: `dbtvenv` from PATH)
    DBTVENV_VENV_DIR      shared, persistent cache of dbt envs (default: $AIRFLOW_HOME/dbtvenv)
    DBTVENV_REQUIREMENTS  requirements of the dbt env (default: dbt-core~=1.11.0 dbt-duckdb~=1.11.0)
    DBTVENV_*             any other dbtvenv option, e.g. DBTVENV_KILL_GRACE, passes through
    DBT_TIMEOUT_ARGS      the dbt command line run by `dbtvenv dbt --` (default: `run`)
    DBT_TIMEOUT_SECONDS   the task's execution_timeout (default: 5)
    DBT_PROJECT_DIR       the task's cwd (default: examples/jaffle_duckdb, two dirs up)

The task has no retries: a timeout fails it at once.
"""

from __future__ import annotations

import os
from datetime import datetime, timedelta, timezone
from pathlib import Path

try:  # Airflow 3
    from airflow.providers.standard.operators.bash import BashOperator
    from airflow.sdk import DAG
except ImportError:  # Airflow 2.x
    from airflow import DAG  # type: ignore[no-redef]
    from airflow.operators.bash import BashOperator  # type: ignore[no-redef]

DEFAULT_REQUIREMENTS = "dbt-core~=1.11.0 dbt-duckdb~=1.11.0"
_EXAMPLES_DIR = Path(__file__).resolve().parent.parent.parent  # examples/airflow/dags -> examples
PROJECT_DIR = os.environ.get("DBT_PROJECT_DIR") or str(_EXAMPLES_DIR / "jaffle_duckdb")
AIRFLOW_HOME = os.environ.get("AIRFLOW_HOME") or os.path.expanduser("~/airflow")

env = {
    "DBTVENV_BIN": os.environ.get("DBTVENV_BIN") or "dbtvenv",
    "DBTVENV_VENV_DIR": os.environ.get("DBTVENV_VENV_DIR") or os.path.join(AIRFLOW_HOME, "dbtvenv"),
    "DBTVENV_REQUIREMENTS": os.environ.get("DBTVENV_REQUIREMENTS") or DEFAULT_REQUIREMENTS,
    "DBT_TIMEOUT_ARGS": os.environ.get("DBT_TIMEOUT_ARGS") or "run",
}

with DAG(
    dag_id="dbt_timeout",
    description="A dbtvenv task stopped by its execution_timeout",
    schedule=None,
    start_date=datetime(2024, 1, 1, tzinfo=timezone.utc),
    catchup=False,
    tags=["dbt", "dbtvenv"],
):
    BashOperator(
        task_id="dbt_slow",
        # DBT_TIMEOUT_ARGS is split into words by bash on purpose: `run --select slow_model`.
        bash_command='"$DBTVENV_BIN" dbt -- $DBT_TIMEOUT_ARGS',
        cwd=PROJECT_DIR,
        env=env,
        append_env=True,
        skip_on_exit_code=None,
        execution_timeout=timedelta(seconds=float(os.environ.get("DBT_TIMEOUT_SECONDS") or 5)),
        retries=0,
    )
