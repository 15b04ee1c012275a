"""Warm and direct give the same results: real dbt-core + dbt-duckdb on examples/jaffle_duckdb.

Two copies of the project, each with its own DuckDB file, take the same steps: one runs every
dbt command directly, the other warm (each warm run checked to have been forked by the warm
process). Every step must give the same exit status, the same stdout once timestamps and
durations are taken out, and the same results in `target/run_results.json`. One env and one
warm process serve the whole module; the profile reads its database path with `env_var()`
from a variable that is not part of the warm process's key, so a value that changes between
two requests must reach dbt as it is.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from conftest import Result
from warmmode import WARM_LINE, private_run_dir, stop_warm_processes, warm_up

pytestmark = pytest.mark.e2e

REPO_ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = REPO_ROOT / "examples" / "jaffle_duckdb"
REQUIREMENTS = ("dbt-core~=1.11.0", "dbt-duckdb~=1.11.0")
PROFILE = """\
jaffle_duckdb:
  target: dev
  outputs:
    dev:
      type: duckdb
      path: "{{ env_var('JAFFLE_DB') }}"
      threads: 1  # one at a time: the order of dbt's lines is the same in every run
"""
LOCAL_OFFSET = """\
{% macro local_offset() %}
    {% set now = modules.datetime.datetime.now().astimezone() %}
    {{ log('local offset ' ~ now.strftime('%z'), info=True) }}
{% endmacro %}
"""
# What differs between two runs of one command: when, how long, which invocation.
TIMESTAMP = re.compile(r"^\d\d:\d\d:\d\d(\.\d+)?\s+", re.MULTILINE)
DURATION = re.compile(r"\b\d+(\.\d+)?\s?(s|seconds)\b")


@dataclass(frozen=True)
class Side:
    """One copy of the project and how dbtvenv runs dbt in it."""

    name: str
    project: Path
    environ: dict[str, str]

    def db(self, name: str = "jaffle") -> Path:
        return self.project.parent / f"{name}.duckdb"


@pytest.fixture(scope="module")
def sides(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Side, Side]]:
    base = tmp_path_factory.mktemp("warm-e2e")
    run_dir = private_run_dir(base)
    environ = {k: v for k, v in os.environ.items() if not k.startswith("DBTVENV_")}
    rest = environ.get("PYTHONPATH")
    environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), rest) if p)
    environ.update(
        {
            "DBTVENV_VENV_DIR": str(base / "cache"),
            "DBTVENV_REQUIREMENTS": " ".join(REQUIREMENTS),
            "DBTVENV_INSTALLER": "uv",
            "DBTVENV_DEBUG": "1",
            "XDG_RUNTIME_DIR": str(run_dir),
            "DBT_PROFILES_DIR": ".",
            "PYTHONDONTWRITEBYTECODE": "1",
        }
    )
    prepared = subprocess.run(
        [sys.executable, "-m", "dbtvenv", "env", "prepare"],
        env=environ,
        capture_output=True,
        timeout=900,
    )
    assert prepared.returncode == 0, prepared.stderr.decode()
    made = []
    for name in ("direct", "warm"):
        project = base / name / "jaffle_duckdb"
        shutil.copytree(EXAMPLE, project, ignore=shutil.ignore_patterns("target", "logs"))
        (project / "profiles.yml").write_text(PROFILE)
        (project / "macros" / "local_offset.sql").write_text(LOCAL_OFFSET)
        side_env = {**environ, "JAFFLE_DB": str(project.parent / "jaffle.duckdb")}
        if name == "warm":
            side_env["DBTVENV_WARM"] = "1"
        made.append(Side(name, project, side_env))
    warm_up(made[1].environ, "--", "--version", cwd=made[1].project, timeout=180)
    try:
        yield made[0], made[1]
    finally:
        stop_warm_processes(run_dir)


def dbtvenv(side: Side, *args: str, **extra: str) -> Result:
    done = subprocess.run(
        [sys.executable, "-m", "dbtvenv", *args],
        env={**side.environ, **extra},
        cwd=side.project,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        timeout=300,
    )
    result = Result(done.returncode, done.stdout, done.stderr)
    assert (WARM_LINE in result.err) == (side.name == "warm"), result
    return result


def normalised(stdout: str) -> str:
    return DURATION.sub("<duration>", TIMESTAMP.sub("", stdout))


def run_results(side: Side) -> list[tuple[str, str, Any]]:
    data = json.loads((side.project / "target" / "run_results.json").read_text())
    return sorted((r["unique_id"], r["status"], r.get("failures")) for r in data["results"])


def both(sides: tuple[Side, Side], *args: str, **extra: str) -> tuple[Result, Result]:
    """One step on both copies: the same status, stdout and results."""
    direct, warm = (dbtvenv(side, *args, **extra) for side in sides)
    assert warm.returncode == direct.returncode, (direct, warm)
    assert normalised(warm.out) == normalised(direct.out), (direct, warm)
    if (sides[0].project / "target" / "run_results.json").exists():
        assert run_results(sides[1]) == run_results(sides[0])
    return direct, warm


def test_warm_and_direct_dbt_agree_step_by_step(sides: tuple[Side, Side]) -> None:

    direct, warm = both(sides, "build")
    assert direct.returncode == 0, direct
    assert "PASS=23 WARN=0 ERROR=0 SKIP=0" in warm.out, warm

    direct, warm = both(sides, "run", "-s", "stg_customers")
    assert "PASS=1" in warm.out, warm
    both(sides, "test")

    direct, warm = both(sides, "ls", "--", "--output", "json")
    nodes = [json.loads(line) for line in warm.out.splitlines() if line.startswith("{")]
    assert {"model.jaffle_duckdb.stg_customers"} <= {n["unique_id"] for n in nodes}

    direct, warm = both(sides, "run-operation", "say_hello", "--args", '{"name": "warm world"}')
    assert "hello warm world" in warm.out, warm

    direct, warm = both(sides, "build", "--vars", '{"fail_on_purpose": true}')
    assert warm.returncode == 1, warm
    assert "table_that_does_not_exist" in warm.out, warm

    # A model changed between two requests: the warm run parses it afresh, as dbt would.
    for side in sides:
        model = side.project / "models" / "staging" / "stg_customers.sql"
        model.write_text(model.read_text().replace("last_name", "last_name,\n    1 as added"))
    both(sides, "run", "-s", "stg_customers")
    for side in sides:
        compiled = next((side.project / "target" / "run").rglob("stg_customers.sql"))
        assert "1 as added" in compiled.read_text(), side

    # The profile's env_var() value differs from the last request's: each run uses its own.
    for side in sides:
        other = dbtvenv(side, "build", "-s", "+stg_customers", JAFFLE_DB=str(side.db("other")))
        assert other.returncode == 0, other
        assert side.db("other").is_file(), side
        back = dbtvenv(side, "run", "-s", "stg_customers")
        assert back.returncode == 0, back


def test_each_request_has_its_own_time_zone(sides: tuple[Side, Side]) -> None:
    """TZ is not part of a warm process's key: two requests in a row with two zones see each
    their own, as two direct runs do (dbt's log lines are UTC; a macro shows local time)."""
    for zone, offset in (("Asia/Kathmandu", "+0545"), ("UTC", "+0000")):
        _, warm = both(sides, "run-operation", "local_offset", TZ=zone)
        assert f"local offset {offset}" in warm.out, warm
