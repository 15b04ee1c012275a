"""Airflow DAG (Cosmos) `cosmos_jaffle_dbt_ls`: the example dbt project, one task per node,
rendered from `dbt ls` (`LoadMode.DBT_LS`), dbt run by dbtvenv.

Parsing this file runs `<shim> ls` (Cosmos caches its output): the dbt env must be complete
by then (`dbtvenv env prepare` at deploy time), or the first parse builds it and may run past
Airflow's DAG import timeout. Configuration both DAGs share: jaffle_cosmos.py.
"""

from __future__ import annotations

from cosmos import DbtDag, ProjectConfig, RenderConfig
from cosmos.constants import InvocationMode, LoadMode
from jaffle_cosmos import DBT_EXECUTABLE, DBTDAG_ARGS, PROJECT_DIR, SELECT

cosmos_jaffle_dbt_ls = DbtDag(
    dag_id="cosmos_jaffle_dbt_ls",
    project_config=ProjectConfig(dbt_project_path=PROJECT_DIR, install_dbt_deps=False),
    render_config=RenderConfig(
        load_method=LoadMode.DBT_LS,
        # The default, InvocationMode.DBT_RUNNER, imports dbt into the DAG processor (there is
        # none to import) and refuses any dbt_executable_path but the dbt on PATH.
        invocation_mode=InvocationMode.SUBPROCESS,
        dbt_executable_path=DBT_EXECUTABLE,
        select=SELECT,
    ),
    **DBTDAG_ARGS,
)
