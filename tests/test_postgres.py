"""End to end on a real PostgreSQL server: the line the project exists for,
`dbtvenv run --requirements dbt-postgres==1.7 -- --select orders`, with the old dbt line that
today's protobuf breaks unless dbtvenv repairs the env (dbtvenv/compat.py).

The server is a throw-away cluster made with initdb, listening on 127.0.0.1 only.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import RunDbtvenv

pytestmark = pytest.mark.e2e

PROFILE = """\
shop:
  target: dev
  outputs:
    dev:
      type: postgres
      host: 127.0.0.1
      port: {port}
      user: dbt
      password: unused
      dbname: postgres
      schema: analytics
      threads: 1
"""
PROJECT = """\
name: shop
version: "1.0.0"
config-version: 2
profile: shop
"""
ORDERS = """\
{{ config(materialized='table') }}
select * from (values (1, 'placed'), (2, 'shipped'), (3, 'returned')) as o (order_id, status)
"""
COUNT_ORDERS = """\
import sys
import psycopg2

with psycopg2.connect(host="127.0.0.1", port=int(sys.argv[1]), user="dbt", dbname="postgres") as c:
    with c.cursor() as cursor:
        cursor.execute("select count(*) from analytics.orders")
        print(cursor.fetchone()[0])
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@pytest.fixture(scope="module")
def postgres_port() -> Iterator[int]:
    """A PostgreSQL cluster of this module's own; yields its port."""
    if os.geteuid() != 0 or not all(shutil.which(c) for c in ("initdb", "pg_ctl", "runuser")):
        pytest.skip("a throw-away PostgreSQL needs root, runuser, initdb and pg_ctl")
    # The server runs as `postgres`, which cannot enter pytest's temp dir (private to root).
    base = Path(tempfile.mkdtemp(prefix="dbtvenv-test-postgres."))
    shutil.chown(base, "postgres", "postgres")
    data, port = base / "data", _free_port()
    as_postgres = ["runuser", "-u", "postgres", "--"]
    try:
        initdb = subprocess.run(
            [*as_postgres, "initdb", "-D", str(data), "-A", "trust", "-U", "dbt"],
            capture_output=True,
            timeout=120,
        )
        assert initdb.returncode == 0, initdb.stderr.decode()
        options = f"-p {port} -k {base} -c listen_addresses=127.0.0.1"
        log = str(base / "log")
        started = subprocess.run(
            [*as_postgres, "pg_ctl", "-D", str(data), "-o", options, "-l", log, "-w", "start"],
            capture_output=True,
            timeout=120,
        )
        assert started.returncode == 0, (base / "log").read_text()
        yield port
    finally:
        subprocess.run(
            [*as_postgres, "pg_ctl", "-D", str(data), "-m", "immediate", "stop"],
            capture_output=True,
            timeout=120,
        )
        shutil.rmtree(base, ignore_errors=True)


def test_dbt_postgres_1_7_runs_as_the_readme_promises(
    dbtvenv: RunDbtvenv, tmp_path: Path, postgres_port: int
) -> None:
    project = tmp_path / "shop"
    (project / "models").mkdir(parents=True)
    (project / "dbt_project.yml").write_text(PROJECT)
    (project / "models" / "orders.sql").write_text(ORDERS)
    (project / "profiles.yml").write_text(PROFILE.format(port=postgres_port))
    cache = tmp_path / "cache"
    result = dbtvenv(
        "run",
        "--requirements",
        "dbt-postgres==1.7",
        "--venv-dir",
        cache,
        "--",
        "--select",
        "orders",
        env={"DBT_PROFILES_DIR": str(project)},
        cwd=project,
        timeout=600,
    )
    assert result.returncode == 0, result
    assert "Completed successfully" in result.out, result
    assert "installing protobuf<5: dbt-core 1.7.0 does not work with protobuf" in result.err

    (env_dir,) = (p for p in cache.iterdir() if p.is_dir() and not p.name.startswith("."))
    manifest = json.loads((env_dir / "dbtvenv.json").read_text())
    assert manifest["repairs"] == ["protobuf<5"]
    assert manifest["implied_pins"] == ["dbt-core~=1.7.0"]  # 1.7 pins it itself: no change
    versions = {d["name"].lower(): d["version"] for d in manifest["distributions"]}
    assert versions["dbt-core"] == "1.7.0" and int(versions["protobuf"].split(".")[0]) < 5
    counted = subprocess.run(
        [str(env_dir / "bin" / "python"), "-I", "-c", COUNT_ORDERS, str(postgres_port)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert counted.returncode == 0, counted.stderr
    assert counted.stdout.strip() == "3"
    info = dbtvenv("env", "info", "--venv-dir", cache, "--requirements", "dbt-postgres==1.7")
    assert info.returncode == 0, info
    assert re.search(r"^repairs\s+protobuf<5$", info.out, re.MULTILINE), info

    again = dbtvenv(
        "run",
        "--requirements",
        "dbt-postgres==1.7",
        "--venv-dir",
        cache,
        "--",
        "--select",
        "orders",
        env={"DBT_PROFILES_DIR": str(project)},
        cwd=project,
    )
    assert again.returncode == 0, again
    assert "building" not in again.err and "installing" not in again.err, again
