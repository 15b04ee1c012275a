"""Airflow DAG (Cosmos) `cosmos_jaffle_manifest`: the example dbt project, one task per node,
rendered from the project's manifest (`LoadMode.DBT_MANIFEST`), dbt run by dbtvenv.

Parsing this file runs no dbt at all: Cosmos reads target/manifest.json, made at deploy time
by `<shim> parse` (see jaffle_cosmos.py, which holds the configuration both DAGs share).
"""

from __future__ import annotations

from cosmos import DbtDag, ProjectConfig, RenderConfig
from cosmos.constants import LoadMode
from jaffle_cosmos import DBTDAG_ARGS, MANIFEST_PATH, PROJECT_DIR, SELECT

cosmos_jaffle_manifest = DbtDag(
    dag_id="cosmos_jaffle_manifest",
    project_config=ProjectConfig(
        dbt_project_path=PROJECT_DIR,
        manifest_path=MANIFEST_PATH,
        install_dbt_deps=False,
    ),
    render_config=RenderConfig(load_method=LoadMode.DBT_MANIFEST, select=SELECT),
    **DBTDAG_ARGS,
)
