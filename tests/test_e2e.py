"""End to end: real dbt-core and dbt-duckdb from the package registry, on examples/jaffle_duckdb.

The env is built once for the module (`dbtvenv env prepare` into a module-wide cache dir);
every test then runs dbt through dbtvenv in its own copy of the project, with its own DuckDB
file. duckdb is not installed in the test venv: the database is read with the env's python.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import Result, RunDbtvenv

pytestmark = pytest.mark.e2e

REPO_ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = REPO_ROOT / "examples" / "jaffle_duckdb"
REQUIREMENTS = ("dbt-core~=1.11.0", "dbt-duckdb~=1.11.0")
BUILD_OUTPUT = ("target", "logs", "dbt_packages", "*.duckdb", "*.duckdb.wal")
# dbt never writes bytecode in these tests, so any .pyc in the env was written at install time.
NO_BYTECODE = {"PYTHONDONTWRITEBYTECODE": "1"}
# Rows after `dbt build`: the seeds' rows, and every model and the snapshot keep them all.
EXPECTED_ROWS = {
    "raw_customers": 10,
    "raw_orders": 20,
    "raw_payments": 25,
    "stg_customers": 10,
    "stg_orders": 20,
    "stg_payments": 25,
    "customers": 10,
    "orders": 20,
    "customers_snapshot": 10,
}
# Sum of raw_payments.amount (cents) / 100; customers 9 and 10 have no orders.
TOTAL_AMOUNT = 332.0
QUERY_DUCKDB = """\
import json, sys
import duckdb

con = duckdb.connect(sys.argv[1], read_only=True)
counts = {t: con.execute(f"select count(*) from main.{t}").fetchone()[0] for t in sys.argv[2:]}
facts = {
    "orders_amount": con.execute("select sum(amount) from main.orders").fetchone()[0],
    "lifetime_value": con.execute(
        "select sum(customer_lifetime_value) from main.customers"
    ).fetchone()[0],
    "customers_without_orders": con.execute(
        "select count(*) from main.customers where number_of_orders = 0"
    ).fetchone()[0],
}
print(json.dumps({"counts": counts, "facts": {k: float(v) for k, v in facts.items()}}))
"""
# Every module of the dbt namespace (dbt-core, dbt-adapters, dbt-common, dbt-duckdb) that has
# no up-to-date bytecode next to it, for the env's own interpreter.
MISSING_BYTECODE = """\
import json, sys
from importlib.util import cache_from_source
from pathlib import Path

sources = sorted(Path(sys.argv[1]).rglob("*.py"))
missing = [str(p) for p in sources if not Path(cache_from_source(p)).is_file()]
print(json.dumps({"sources": len(sources), "missing": missing[:20], "missing_count": len(missing)}))
"""


@dataclass(frozen=True)
class PreparedEnv:
    cache: Path
    path: Path
    prepare: Result

    @property
    def options(self) -> list[str]:
        """dbtvenv's ENV OPTIONS for this env."""
        options = []
        for requirement in REQUIREMENTS:
            options += ["--requirements", requirement]
        return [*options, "--venv-dir", str(self.cache)]


def _environ(extra: dict[str, str]) -> dict[str, str]:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("DBTVENV_")}
    environ.update(extra)
    # dbtvenv may not be installed in the test venv: find it from the repository root.
    rest = environ.get("PYTHONPATH")
    environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), rest) if p)
    return environ


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> PreparedEnv:
    """The real dbt env, built once for this module by `dbtvenv env prepare`."""
    cache = tmp_path_factory.mktemp("e2e") / "cache"
    argv = [sys.executable, "-m", "dbtvenv", "env", "prepare"]
    for requirement in REQUIREMENTS:
        argv += ["--requirements", requirement]
    completed = subprocess.run(
        [*argv, "--venv-dir", str(cache)],
        env=_environ(NO_BYTECODE),
        cwd=cache.parent,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        timeout=600,
    )
    result = Result(completed.returncode, completed.stdout, completed.stderr)
    assert result.returncode == 0, result
    return PreparedEnv(cache=cache, path=Path(result.out.strip()), prepare=result)


@dataclass(frozen=True)
class Project:
    dir: Path
    database: Path
    env: dict[str, str]


@pytest.fixture
def jaffle(tmp_path: Path) -> Project:
    """A fresh copy of the example project and where its DuckDB file goes."""
    project = tmp_path / "jaffle_duckdb"
    shutil.copytree(EXAMPLE, project, ignore=shutil.ignore_patterns(*BUILD_OUTPUT))
    database = tmp_path / "data" / "jaffle.duckdb"
    database.parent.mkdir()
    return Project(project, database, {**NO_BYTECODE, "DBT_DUCKDB_PATH": str(database)})


def _env_python(env: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(env / "bin" / "python"), "-I", "-B", *args],
        capture_output=True,
        text=True,
        timeout=120,
        stdin=subprocess.DEVNULL,
    )


def _query(prepared: PreparedEnv, database: Path) -> dict[str, dict[str, float]]:
    completed = _env_python(prepared.path, "-c", QUERY_DUCKDB, str(database), *EXPECTED_ROWS)
    assert completed.returncode == 0, completed.stderr
    result: dict[str, dict[str, float]] = json.loads(completed.stdout)
    return result


def _assert_no_build(result: Result) -> None:
    assert "building" not in result.err, result
    assert "installing" not in result.err, result


def test_prepare_builds_the_env_once(prepared: PreparedEnv, dbtvenv: RunDbtvenv) -> None:
    assert prepared.path.parent == prepared.cache
    assert (prepared.path / "dbtvenv.json").is_file()
    assert os.access(prepared.path / "bin" / "dbt", os.X_OK)
    assert "no env for this spec yet" in prepared.prepare.err, prepared.prepare

    again = dbtvenv("env", "prepare", *prepared.options, env=NO_BYTECODE)
    assert again.returncode == 0, again
    assert again.out.strip() == str(prepared.path)
    _assert_no_build(again)


def test_env_has_bytecode_for_dbt(prepared: PreparedEnv) -> None:
    # dbt runs with PYTHONDONTWRITEBYTECODE=1 here (and on many machines); without bytecode
    # written at install time, every start of dbt would compile hundreds of modules again.
    found = _env_python(
        prepared.path, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"
    )
    assert found.returncode == 0, found.stderr
    dbt_package = Path(found.stdout.strip()) / "dbt"
    checked = _env_python(prepared.path, "-c", MISSING_BYTECODE, str(dbt_package))
    assert checked.returncode == 0, checked.stderr
    report = json.loads(checked.stdout)
    assert report["sources"] > 100, report
    assert report["missing_count"] == 0, report


def test_build_runs_the_project_and_reuses_the_env(
    prepared: PreparedEnv, jaffle: Project, dbtvenv: RunDbtvenv
) -> None:
    first = dbtvenv(
        "build", *prepared.options, "--", "--profiles-dir", ".", env=jaffle.env, cwd=jaffle.dir
    )
    assert first.returncode == 0, first
    assert "Completed successfully" in first.out, first
    assert "PASS=23 WARN=0 ERROR=0 SKIP=0" in first.out, first
    _assert_no_build(first)
    assert jaffle.database.is_file()
    assert (jaffle.dir / "target" / "run_results.json").is_file()

    result = _query(prepared, jaffle.database)
    assert result["counts"] == EXPECTED_ROWS
    assert result["facts"] == {
        "orders_amount": TOTAL_AMOUNT,
        "lifetime_value": TOTAL_AMOUNT,
        "customers_without_orders": 2.0,
    }

    # The second build takes the incremental path for `orders` (a merge on order_id).
    second = dbtvenv(
        "build", *prepared.options, "--", "--profiles-dir", ".", env=jaffle.env, cwd=jaffle.dir
    )
    assert second.returncode == 0, second
    assert "PASS=23 WARN=0 ERROR=0 SKIP=0" in second.out, second
    _assert_no_build(second)
    assert _query(prepared, jaffle.database)["counts"] == EXPECTED_ROWS


def test_failing_model_gives_dbt_exit_status(
    prepared: PreparedEnv, jaffle: Project, dbtvenv: RunDbtvenv
) -> None:
    result = dbtvenv(
        "build",
        *prepared.options,
        "--",
        "--profiles-dir",
        ".",
        "--vars",
        '{"fail_on_purpose": true}',
        env=jaffle.env,
        cwd=jaffle.dir,
    )
    assert result.returncode == 1, result
    assert "ERROR=1" in result.out, result
    assert "table_that_does_not_exist" in result.out, result
    assert "dbtvenv: error" not in result.err, result


def test_run_operation_passes_quoted_args(
    prepared: PreparedEnv, jaffle: Project, dbtvenv: RunDbtvenv
) -> None:
    result = dbtvenv(
        "run-operation",
        *prepared.options,
        "--",
        "say_hello",
        "--args",
        '{"name": "world"}',
        "--profiles-dir",
        ".",
        env=jaffle.env,
        cwd=jaffle.dir,
    )
    assert result.returncode == 0, result
    assert "hello world" in result.out, result


def test_dbt_version_verbatim(prepared: PreparedEnv, tmp_path: Path, dbtvenv: RunDbtvenv) -> None:
    result = dbtvenv("dbt", *prepared.options, "--", "--version", env=NO_BYTECODE, cwd=tmp_path)
    assert result.returncode == 0, result
    assert "installed: 1.11." in result.out, result
    assert "duckdb: 1.11." in result.out, result


def test_env_info_lists_dbt(prepared: PreparedEnv, dbtvenv: RunDbtvenv) -> None:
    result = dbtvenv("env", "info", *prepared.options, "--json")
    assert result.returncode == 0, result
    info = result.json()
    assert info["path"] == str(prepared.path)
    assert info["complete"] is True
    versions = {d["name"].lower(): d["version"] for d in info["distributions"]}
    assert versions["dbt-core"].startswith("1.11."), versions
    assert versions["dbt-duckdb"].startswith("1.11."), versions
    assert "duckdb" in versions
    assert info["spec"]["requirements"] == list(REQUIREMENTS)


def _as_dbt_1_9_reads_it(project: Path) -> None:
    """The example is written for dbt 1.11: a 1.9 copy drops the version gate and spells its
    tests' arguments as dbt before 1.10 reads them (beside the test's name)."""
    config = project / "dbt_project.yml"
    config.write_text(re.sub(r"require-dbt-version:.*\n", "", config.read_text()))
    for schema in project.glob("models/*/schema.yml"):
        text = re.sub(
            r"\n( +)arguments:\n((?:\1  .*\n)+)",
            lambda m: "\n" + re.sub(r"(?m)^  ", "", m.group(2)),
            schema.read_text(),
        )
        schema.write_text(text)


def test_an_adapter_pin_builds_the_example_on_its_own_dbt_line(
    jaffle: Project, tmp_path: Path, dbtvenv: RunDbtvenv
) -> None:
    """`dbt-duckdb==1.9` alone: every dbt-duckdb since 1.8 requires only dbt-core>=1.8.0, so
    without the implied pin this would run the newest dbt-core (or fail to install it)."""
    _as_dbt_1_9_reads_it(jaffle.dir)
    cache = tmp_path / "cache"
    spec = ["--installer", "uv", "--requirements", "dbt-duckdb==1.9", "--venv-dir", str(cache)]
    result = dbtvenv(
        "build", *spec, "--", "--profiles-dir", ".", env=jaffle.env, cwd=jaffle.dir, timeout=600
    )
    assert result.returncode == 0, result
    assert "Running with dbt=1.9." in result.out, result
    assert "PASS=23 WARN=0 ERROR=0 SKIP=0" in result.out, result
    assert "dbt-duckdb==1.9 asks for the dbt 1.9 line: constraining dbt-core to ~=1.9.0" in (
        result.err
    )
    assert re.search(
        r"built env \w+ in [\d.]+ s: dbt-core 1\.9\.\d+, dbt-duckdb 1\.9\.0 ", result.err
    )

    (entry,) = json.loads(dbtvenv("env", "list", "--venv-dir", cache, "--json").out)
    assert entry["implied_pins"] == ["dbt-core~=1.9.0"]
    assert entry["dbt_core"].startswith("1.9.") and entry["adapters"] == {"dbt-duckdb": "1.9.0"}
    manifest = json.loads((Path(entry["path"]) / "dbtvenv.json").read_text())
    assert manifest["implied_pins"] == ["dbt-core~=1.9.0"]
    versions = {d["name"].lower(): d["version"] for d in manifest["distributions"]}
    assert versions["dbt-core"] == entry["dbt_core"]
    assert (Path(entry["path"]) / "dbtvenv-constraints.txt").read_text().splitlines()[-1] == (
        "dbt-core~=1.9.0"
    )
