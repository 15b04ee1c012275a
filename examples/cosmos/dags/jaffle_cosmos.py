"""What the two Cosmos DAGs of this folder share: the project, the profile and how dbt runs
(`ExecutionMode.LOCAL`, with a `dbtvenv shim` as the dbt executable).

Airflow's environment holds Cosmos and dbtvenv, and no dbt. The shim is written once, at deploy
time, and bound to the dbt env's spec:

    dbtvenv env prepare --venv-dir /shared/dbtvenv \\
        --requirements 'dbt-core~=1.11.0' --requirements 'dbt-duckdb~=1.11.0'
    dbtvenv shim --venv-dir /shared/dbtvenv \\
        --requirements 'dbt-core~=1.11.0' --requirements 'dbt-duckdb~=1.11.0' \\
        --output "$AIRFLOW_HOME/bin/dbt-jaffle"
    "$AIRFLOW_HOME/bin/dbt-jaffle" parse --project-dir examples/jaffle_duckdb \\
        --profiles-dir examples/jaffle_duckdb    # target/manifest.json, for DBT_MANIFEST

Every task runs `<shim> run|test|seed|snapshot --select <node> ...` in a copy of the project
that Cosmos makes; dbtvenv finds the complete env and starts its dbt at once.

Configuration, from the environment of the Airflow worker when a DAG file is parsed:

    COSMOS_DBT_EXECUTABLE  the shim (default: $AIRFLOW_HOME/bin/dbt-jaffle)
    DBT_PROJECT_DIR        the dbt project (default: examples/jaffle_duckdb, two dirs up)
    DBT_MANIFEST_PATH      the manifest for DBT_MANIFEST (default: target/manifest.json there)
    COSMOS_SELECT          whitespace-separated dbt selectors to render (default: every node)
    COSMOS_TASK_RETRIES    retries of a task, for dbtvenv's exit 75 (default: 2)
    COSMOS_TASK_TIMEOUT    execution_timeout of each task in seconds (default: none)

The DuckDB database comes from the Airflow connection `jaffle_duckdb` (its `host` is the file
path), e.g. AIRFLOW_CONN_JAFFLE_DUCKDB='{"conn_type": "duckdb", "host": "/data/jaffle.duckdb"}'.
"""

from __future__ import annotations

import os
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from cosmos import ExecutionConfig, ProfileConfig
from cosmos.constants import ExecutionMode, InvocationMode
from cosmos.profiles import DuckDBUserPasswordProfileMapping

_EXAMPLES_DIR = Path(__file__).resolve().parent.parent.parent  # examples/cosmos/dags -> examples
PROJECT_DIR = Path(os.environ.get("DBT_PROJECT_DIR") or _EXAMPLES_DIR / "jaffle_duckdb")
MANIFEST_PATH = Path(os.environ.get("DBT_MANIFEST_PATH") or PROJECT_DIR / "target/manifest.json")
AIRFLOW_HOME = os.environ.get("AIRFLOW_HOME") or os.path.expanduser("~/airflow")
DBT_EXECUTABLE = os.environ.get("COSMOS_DBT_EXECUTABLE") or os.path.join(
    AIRFLOW_HOME, "bin", "dbt-jaffle"
)
SELECT = (os.environ.get("COSMOS_SELECT") or "").split()

PROFILE_CONFIG = ProfileConfig(
    profile_name="jaffle_duckdb",
    target_name="dev",
    profile_mapping=DuckDBUserPasswordProfileMapping(
        conn_id="jaffle_duckdb", profile_args={"threads": 1}
    ),
)

# Every task: dbt through the shim, as a subprocess (dbt is not importable here, and must not
# be: that is the point). Cosmos stops a task's dbt with a signal to its process group, which
# the shim passes to dbtvenv and dbtvenv to dbt, once.
EXECUTION_CONFIG = ExecutionConfig(
    execution_mode=ExecutionMode.LOCAL,
    invocation_mode=InvocationMode.SUBPROCESS,
    dbt_executable_path=DBT_EXECUTABLE,
)

DEFAULT_ARGS: dict[str, Any] = {
    "retries": int(os.environ.get("COSMOS_TASK_RETRIES") or 2),
    "retry_delay": timedelta(seconds=30),
}
if os.environ.get("COSMOS_TASK_TIMEOUT"):
    DEFAULT_ARGS["execution_timeout"] = timedelta(seconds=float(os.environ["COSMOS_TASK_TIMEOUT"]))

DBTDAG_ARGS: dict[str, Any] = {
    "profile_config": PROFILE_CONFIG,
    "execution_config": EXECUTION_CONFIG,
    "operator_args": {"install_deps": False},  # the project has no packages
    "schedule": None,
    "start_date": datetime(2024, 1, 1, tzinfo=timezone.utc),
    "catchup": False,
    "default_args": DEFAULT_ARGS,
    "tags": ["dbt", "cosmos", "dbtvenv"],
}
