"""Airflow DAG `dbt_duckdb`: seed, run and test the example dbt project through dbtvenv.

dbt never enters Airflow's environment: each task runs `dbtvenv <command>`, which builds (once)
or reuses a virtualenv holding dbt in a shared cache dir, and runs dbt from there. Airflow only
needs `dbtvenv` on PATH (or DBTVENV_BIN pointing at it).

Configuration, all from the environment of the Airflow worker (read when the DAG file is
parsed; tasks also inherit the worker's whole environment, `append_env=True`):

    DBTVENV_BIN           the dbtvenv executable (default: `dbtvenv` from PATH)
    DBTVENV_VENV_DIR      shared, persistent cache of dbt envs (default: $AIRFLOW_HOME/dbtvenv)
    DBTVENV_REQUIREMENTS  whitespace-separated requirements of the dbt env
                          (default: dbt-core~=1.11.0 dbt-duckdb~=1.11.0)
    DBTVENV_*             any other dbtvenv option, e.g. DBTVENV_LOCK_TIMEOUT, passes through
    DBT_PROJECT_DIR       the dbt project (default: examples/jaffle_duckdb, two dirs up)
    DBT_DUCKDB_PATH       the DuckDB database file, read by the project's profiles.yml
    DBT_TASK_RETRIES      retries after a lock timeout (default: 3)
    DBT_TASK_RETRY_DELAY  seconds between those retries (default: 60)

Retries: a task is retried only when dbtvenv exits 75 (it timed out waiting for the lock of
the env being built by another task: worth retrying). Any other non-zero exit fails the task
at once: 1 (a dbt node failed) and 2 (dbt error) would fail the same way again, as would
64 (usage error), 69 (env build failed) and 73 (venv dir not writable). BashOperator cannot
tell exit codes apart (every non-zero exit but `skip_on_exit_code` raises the same
AirflowException), so the small DbtvenvOperator below turns those other exits into
AirflowFailException, which Airflow documents as "fail the task without retrying"; the task's
`retries` therefore serve exit 75, plus failures that are not an exit status at all (the cwd is
missing, an `execution_timeout` if one is set).
"""

from __future__ import annotations

import os
import re
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

try:  # Airflow 3
    from airflow.providers.standard.operators.bash import BashOperator
    from airflow.sdk import DAG
    from airflow.sdk.exceptions import AirflowException, AirflowFailException
except ImportError:  # Airflow 2.x
    from airflow import DAG  # type: ignore[no-redef]
    from airflow.exceptions import (  # type: ignore[no-redef]
        AirflowException,
        AirflowFailException,
    )
    from airflow.operators.bash import BashOperator  # type: ignore[no-redef]

EX_TEMPFAIL = 75  # dbtvenv: lock timeout, worth retrying

DEFAULT_REQUIREMENTS = "dbt-core~=1.11.0 dbt-duckdb~=1.11.0"
_EXAMPLES_DIR = Path(__file__).resolve().parent.parent.parent  # examples/airflow/dags -> examples
PROJECT_DIR = os.environ.get("DBT_PROJECT_DIR") or str(_EXAMPLES_DIR / "jaffle_duckdb")
AIRFLOW_HOME = os.environ.get("AIRFLOW_HOME") or os.path.expanduser("~/airflow")


def dbtvenv_env() -> dict[str, str]:
    """The env vars that configure dbtvenv for every task, on top of the worker's own."""
    env = {
        "DBTVENV_BIN": os.environ.get("DBTVENV_BIN") or "dbtvenv",
        "DBTVENV_VENV_DIR": os.environ.get("DBTVENV_VENV_DIR")
        or os.path.join(AIRFLOW_HOME, "dbtvenv"),
        "DBTVENV_REQUIREMENTS": os.environ.get("DBTVENV_REQUIREMENTS") or DEFAULT_REQUIREMENTS,
    }
    if os.environ.get("DBT_DUCKDB_PATH"):
        env["DBT_DUCKDB_PATH"] = os.environ["DBT_DUCKDB_PATH"]
    return env


class DbtvenvOperator(BashOperator):  # type: ignore[misc]
    """A BashOperator whose command's non-zero exit fails the task without retrying, unless the
    exit status is in `retry_exit_codes` (dbtvenv's 75, lock timeout)."""

    retry_exit_codes: frozenset[int] = frozenset({EX_TEMPFAIL})

    def execute(self, context: Any) -> Any:
        try:
            return super().execute(context)
        except AirflowFailException:
            raise
        except AirflowException as exc:
            code = self._exit_code(exc)
            if code is None or code in self.retry_exit_codes:
                raise  # an ordinary failure: retried while the task has retries left
            raise AirflowFailException(
                f"{self.task_id}: the command exited {code}; not retried (only exit "
                f"{sorted(self.retry_exit_codes)} is)"
            ) from exc

    def _exit_code(self, exc: BaseException) -> int | None:
        process = getattr(self.subprocess_hook, "sub_process", None)
        code = getattr(process, "returncode", None)
        if isinstance(code, int):
            return code
        found = re.search(r"exit code (-?\d+)", str(exc))  # BashOperator's own message
        return int(found.group(1)) if found else None


def dbtvenv_task(task_id: str, command: str) -> DbtvenvOperator:
    # `--profiles-dir .`: the project's own profiles.yml, since cwd is the project dir.
    return DbtvenvOperator(
        task_id=task_id,
        bash_command=f'"$DBTVENV_BIN" {command} -- --profiles-dir .',
        cwd=PROJECT_DIR,
        env=dbtvenv_env(),
        append_env=True,  # keep PATH, HOME and any other DBTVENV_* of the worker
        skip_on_exit_code=None,  # no exit status means "skipped"
    )


with DAG(
    dag_id="dbt_duckdb",
    description="dbt seed, run and test of the jaffle_duckdb example, run through dbtvenv",
    schedule=None,
    start_date=datetime(2024, 1, 1, tzinfo=timezone.utc),
    catchup=False,
    default_args={
        "retries": int(os.environ.get("DBT_TASK_RETRIES") or 3),
        "retry_delay": timedelta(seconds=float(os.environ.get("DBT_TASK_RETRY_DELAY") or 60)),
    },
    tags=["dbt", "dbtvenv"],
):
    dbt_seed = dbtvenv_task("dbt_seed", "seed")
    dbt_run = dbtvenv_task("dbt_run", "run")
    dbt_test = dbtvenv_task("dbt_test", "test")

    dbt_seed >> dbt_run >> dbt_test
