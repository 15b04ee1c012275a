"""Cosmos benchmark: `make bench-cosmos`, or `python benchmarks/cosmos.py [--warm-rounds N]`.

The example DAG (examples/jaffle_duckdb rendered from its manifest, 14 tasks) run by
`airflow dags test` under Airflow 3.3.2 and astronomer-cosmos 1.15.x, two ways in one run:

  virtualenv  Cosmos's own isolation, `ExecutionMode.VIRTUALENV` with a persistent
              `virtualenv_dir` and `py_requirements` (dbt-core + dbt-duckdb 1.11)
  local       `ExecutionMode.LOCAL` with a `dbtvenv shim` for the same requirements
              (examples/cosmos/dags/cosmos_jaffle_manifest.py, unchanged)
  local+warm  the same with the shim written with `--warm` (dbt forked from a warm process),
              when the dbtvenv of this checkout has that option

Cold: a fresh `virtualenv_dir`, a fresh dbtvenv cache dir (the first task builds the env with
pip, as Cosmos does); warm: both already filled, after one untimed warm-up run per side. The
sides alternate, round after round, the order reversed every other round, so a change in the
machine's load hits all alike. Each row gives the DAG run's wall time (`airflow dags test`,
start to exit) and its tasks' durations (from Airflow's metadata DB), and the ratio to
`virtualenv` of the same run. Airflow and Cosmos live in a venv of their own in a scratch dir
(`--airflow-venv` reuses one), with dbtvenv installed from this checkout (not editable). pip
gets the public index and one pip cache of the bench's own on both sides.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from study import cpu_line, scratch, write_docs

REPO = Path(__file__).resolve().parent.parent
EXAMPLE_DAGS = REPO / "examples" / "cosmos" / "dags"
JAFFLE = REPO / "examples" / "jaffle_duckdb"
AIRFLOW_VERSION = "3.3.2"
COSMOS_REQUIREMENT = "astronomer-cosmos~=1.15.1"
REQUIREMENTS = ("dbt-core~=1.11.0", "dbt-duckdb~=1.11.0")
DOCS_BEGIN = "<!-- bench-cosmos:begin -->"
DOCS_END = "<!-- bench-cosmos:end -->"
TARGETS = {"local": 0.4, "local+warm": 0.25}  # of virtualenv's warm DAG wall time

# Variables that would point pip at another index, cache or config, or change what Python or
# Airflow does; the machine's certificates and timeouts stay.
KEEP_PIP = {"PIP_CERT", "PIP_CLIENT_CERT", "PIP_DEFAULT_TIMEOUT"}
DROP = {"PYTHONDONTWRITEBYTECODE", "PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "PYTHONSTARTUP"}

VIRTUALENV_DAG = '''\
"""Airflow DAG `bench_cosmos_virtualenv`: the example project under Cosmos's own isolation,
ExecutionMode.VIRTUALENV, rendered from the manifest as cosmos_jaffle_manifest is."""

from __future__ import annotations

import os

from cosmos import DbtDag, ExecutionConfig, ProjectConfig, RenderConfig
from cosmos.constants import ExecutionMode, LoadMode
from jaffle_cosmos import DBTDAG_ARGS, MANIFEST_PATH, PROJECT_DIR, SELECT

bench_cosmos_virtualenv = DbtDag(
    dag_id="bench_cosmos_virtualenv",
    project_config=ProjectConfig(
        dbt_project_path=PROJECT_DIR, manifest_path=MANIFEST_PATH, install_dbt_deps=False
    ),
    render_config=RenderConfig(load_method=LoadMode.DBT_MANIFEST, select=SELECT),
    **{
        **DBTDAG_ARGS,
        "execution_config": ExecutionConfig(
            execution_mode=ExecutionMode.VIRTUALENV,
            virtualenv_dir=os.environ["BENCH_VIRTUALENV_DIR"],
        ),
        "operator_args": {
            "install_deps": False,
            "py_requirements": os.environ["BENCH_PY_REQUIREMENTS"].split(),
        },
    },
)
'''
DAG_IDS = {
    "virtualenv": "bench_cosmos_virtualenv",
    "local": "cosmos_jaffle_manifest",
    "local+warm": "cosmos_jaffle_manifest",
}


class CommandFailed(RuntimeError):
    pass


@dataclass
class DagRun:
    wall: float
    run: float  # the DAG run itself, first task queued to last one done (metadata DB)
    tasks: dict[str, float]
    installs: int  # venv creations + pip installs (virtualenv), env builds (dbtvenv)


@dataclass
class Side:
    name: str
    runs: dict[str, list[DagRun]] = field(default_factory=lambda: {"cold": [], "warm": []})


class Bench:
    def __init__(self, work: Path, airflow_venv: Path | None) -> None:
        self.work = work
        self.env = self._environment()
        self.venv = airflow_venv or self._install_airflow()
        self.bin = self.venv / "bin"
        self.db = work / "airflow.db"
        self.home = work / "airflow-home"
        self.home.mkdir(exist_ok=True)
        self.dags = work / "dags"
        self.dags.mkdir(exist_ok=True)
        for name in ("jaffle_cosmos.py", "cosmos_jaffle_manifest.py"):
            (self.dags / name).symlink_to(EXAMPLE_DAGS / name)
        (self.dags / "bench_cosmos_virtualenv.py").write_text(VIRTUALENV_DAG)
        self.project = work / "jaffle_duckdb"
        shutil.copytree(
            JAFFLE, self.project, ignore=shutil.ignore_patterns("target", "logs", "*.duckdb*")
        )
        self.serial = 0
        self.capture(self.bin / "airflow", "db", "migrate")
        help_text = self.capture(self.bin / "dbtvenv", "shim", "--help")
        self.has_warm = "--warm" in help_text

    def _environment(self) -> dict[str, str]:
        env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith(("DBTVENV_", "AIRFLOW_", "DBT_", "COSMOS_"))
            and k not in DROP
            and (not k.startswith(("PIP_", "UV_")) or k in KEEP_PIP)
        }
        env.update(
            PIP_CONFIG_FILE=os.devnull,
            PIP_DISABLE_PIP_VERSION_CHECK="1",
            PIP_CACHE_DIR=str(self.work / "pip-cache"),
            AIRFLOW_HOME=str(self.work / "airflow-home"),
            AIRFLOW__CORE__LOAD_EXAMPLES="False",
            AIRFLOW__CORE__DAGS_FOLDER=str(self.work / "dags"),
            AIRFLOW__DATABASE__SQL_ALCHEMY_CONN=f"sqlite:///{self.work / 'airflow.db'}",
            AIRFLOW__COSMOS__CACHE_DIR=str(self.work / "cosmos-cache"),
            AIRFLOW__COSMOS__ENABLE_TELEMETRY="False",
            DO_NOT_TRACK="1",
            PYTHONWARNINGS="ignore",
            DBT_SEND_ANONYMOUS_USAGE_STATS="false",
            DBT_PROJECT_DIR=str(self.work / "jaffle_duckdb"),
            COSMOS_TASK_RETRIES="0",
            BENCH_PY_REQUIREMENTS=" ".join(REQUIREMENTS),
            AIRFLOW_CONN_JAFFLE_DUCKDB=json.dumps(
                {"conn_type": "duckdb", "host": str(self.work / "jaffle.duckdb")}
            ),
        )
        return env

    def capture(self, *argv: str | Path, env: Mapping[str, str] | None = None) -> str:
        done = subprocess.run(
            [str(a) for a in argv],
            env=dict(env or self.env),
            cwd=self.work,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=3600,
        )
        if done.returncode != 0:
            tail = done.stderr.decode(errors="replace").splitlines()[-30:]
            raise CommandFailed(f"{argv} exited {done.returncode}:\n  " + "\n  ".join(tail))
        return done.stdout.decode(errors="replace")

    def _install_airflow(self) -> Path:
        print("installing Airflow, Cosmos and dbtvenv into a scratch venv", flush=True)
        venv = self.work / "airflow-venv"
        self.capture(sys.executable, "-m", "venv", venv)
        pip = [venv / "bin" / "python", "-m", "pip", "-q"]
        self.capture(*pip, "install", "--upgrade", "pip")
        source = self.work / "dbtvenv-src"
        source.mkdir()
        for name in ("pyproject.toml", "README.md"):
            shutil.copy2(REPO / name, source / name)
        shutil.copytree(
            REPO / "dbtvenv", source / "dbtvenv", ignore=shutil.ignore_patterns("__pycache__")
        )
        self.capture(
            *pip, "install", f"apache-airflow=={AIRFLOW_VERSION}", COSMOS_REQUIREMENT, source
        )
        return venv

    def fresh(self, name: str) -> Path:
        self.serial += 1
        return self.work / f"{name}-{self.serial}"

    def write_shim(self, cache: Path, *extra: str) -> Path:
        shim = self.fresh("dbt-shim")
        spec = [a for r in REQUIREMENTS for a in ("--requirements", r)]
        self.capture(
            self.bin / "dbtvenv", "shim", "--venv-dir", cache, *spec, *extra, "--output", shim
        )
        return shim

    def prepare(self, cache: Path) -> None:
        spec = [a for r in REQUIREMENTS for a in ("--requirements", r)]
        self.capture(self.bin / "dbtvenv", "env", "prepare", "--venv-dir", cache, *spec)

    def dag_test(self, side: str, settings: Mapping[str, str]) -> DagRun:
        dag_id = DAG_IDS[side]
        env = {**self.env, **settings}
        with tempfile.TemporaryFile(dir=self.work) as log:
            started = time.perf_counter()
            done = subprocess.run(
                [str(self.bin / "airflow"), "dags", "test", dag_id],
                env=env,
                cwd=self.work,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                timeout=3600,
            )
            wall = time.perf_counter() - started
            log.seek(0)
            output = log.read().decode(errors="replace")
        if done.returncode != 0:
            errors = [line for line in output.splitlines() if "ERROR" in line or "rror:" in line]
            tail = "\n  ".join([*errors[-20:], "...", *output.splitlines()[-20:]])
            raise CommandFailed(f"airflow dags test {dag_id} ({side}) failed:\n  {tail}")
        tasks, run_seconds = self.task_durations(dag_id)
        installs = len(re.findall(r"Creating or updating the virtualenv at", output))
        installs += len(re.findall(r"dbtvenv: building env ", output))
        return DagRun(wall, run_seconds, tasks, installs)

    def task_durations(self, dag_id: str) -> tuple[dict[str, float], float]:
        """The newest run of `dag_id`: each task's duration, and the run's."""
        with contextlib.closing(sqlite3.connect(f"file:{self.db}?mode=ro", uri=True)) as con:
            start, end = con.execute(
                "SELECT start_date, end_date FROM dag_run WHERE dag_id = ? ORDER BY id DESC "
                "LIMIT 1",
                (dag_id,),
            ).fetchone()
            rows = con.execute(
                "SELECT task_id, duration, state FROM task_instance WHERE run_id = "
                "(SELECT run_id FROM dag_run WHERE dag_id = ? ORDER BY id DESC LIMIT 1) "
                "AND dag_id = ?",
                (dag_id, dag_id),
            ).fetchall()
        failed = [task for task, _, state in rows if state != "success"]
        if failed:
            raise CommandFailed(f"{dag_id}: tasks not successful: {failed}")
        run_seconds = (_parse_time(end) - _parse_time(start)).total_seconds()
        return {task: float(duration) for task, duration, _ in rows}, run_seconds


def _parse_time(text: str) -> datetime:
    return datetime.fromisoformat(str(text).replace(" ", "T"))


def run(bench: Bench, warm_rounds: int, cold_rounds: int) -> list[Side]:
    names = ["virtualenv", "local", *(["local+warm"] if bench.has_warm else [])]
    sides = {name: Side(name) for name in names}
    warm_cache = bench.work / "dbtvenv-cache"
    bench.prepare(warm_cache)  # deploy time: `dbtvenv env prepare`
    shims = {
        "local": bench.write_shim(warm_cache),
        **({"local+warm": bench.write_shim(warm_cache, "--warm")} if bench.has_warm else {}),
    }
    manifest = bench.capture(
        shims["local"], "parse", "--project-dir", bench.project, "--profiles-dir", bench.project
    )
    del manifest  # target/manifest.json, written by `dbt parse`
    warm_virtualenv = bench.work / "cosmos-venv"

    def settings(name: str, cold: bool) -> dict[str, str]:
        if name == "virtualenv":
            venv_dir = bench.fresh("cosmos-venv-cold") if cold else warm_virtualenv
            return {"BENCH_VIRTUALENV_DIR": str(venv_dir)}
        shim = bench.write_shim(bench.fresh("dbtvenv-cache-cold")) if cold else shims[name]
        return {"COSMOS_DBT_EXECUTABLE": str(shim)}

    for i in range(cold_rounds):
        for name in names if i % 2 == 0 else reversed(names):
            if name == "local+warm":
                continue  # a cold env has no warm process to fork: the same as `local`
            print(f"cold, round {i + 1}: {name}", flush=True)
            sides[name].runs["cold"].append(bench.dag_test(name, settings(name, cold=True)))
    print("warm-up: one untimed run of three tasks per side", flush=True)
    for name in names:
        bench.dag_test(name, {**settings(name, cold=False), "COSMOS_SELECT": "+stg_customers"})
    for i in range(warm_rounds):
        for name in names if i % 2 == 0 else reversed(names):
            print(f"warm, round {i + 1}: {name}", flush=True)
            dag_run = bench.dag_test(name, settings(name, cold=False))
            print(f"  {dag_run.wall:.1f} s", flush=True)
            sides[name].runs["warm"].append(dag_run)
    return list(sides.values())


def table(sides: Sequence[Side], header: Sequence[str]) -> str:
    base = sides[0]
    lines = [*(f"- {h}" for h in header), ""]
    lines += [
        "| cache | side | n | DAG wall (median, range) | vs virtualenv | DAG run alone "
        "| per-task median | vs virtualenv | venv/pip installs per DAG run | target | status |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for state in ("warm", "cold"):
        base_runs = base.runs[state]
        if not base_runs:
            continue
        base_wall = statistics.median(r.wall for r in base_runs)
        base_task = statistics.median(d for r in base_runs for d in r.tasks.values())
        for side in sides:
            runs = side.runs[state]
            if not runs:
                continue
            walls = [r.wall for r in runs]
            wall = statistics.median(walls)
            task = statistics.median(d for r in runs for d in r.tasks.values())
            installs = statistics.median(r.installs for r in runs)
            dag_run = statistics.median(r.run for r in runs)
            base_run = statistics.median(r.run for r in base_runs)
            target = TARGETS.get(side.name) if state == "warm" else None
            ratio = wall / base_wall
            lines.append(
                f"| {state} | {side.name} | {len(runs)} | {wall:.1f} s ({min(walls):.0f}-"
                f"{max(walls):.0f}) | {ratio:.2f}x | {dag_run:.1f} s ({dag_run / base_run:.2f}x) "
                f"| {task:.1f} s | {task / base_task:.2f}x "
                f"| {installs:g} | {'' if target is None else f'<= {target}x'} "
                f"| {'' if target is None else ('met' if ratio <= target else 'NOT met')} |"
            )
    return "\n".join(lines) + "\n"


def machine(bench: Bench) -> list[str]:
    versions = bench.capture(
        bench.bin / "python",
        "-c",
        "import importlib.metadata as m, platform\n"
        "print('Python', platform.python_version(), end='; ')\n"
        "for d in ('apache-airflow', 'astronomer-cosmos', 'dbtvenv', 'pip'):\n"
        "    print(d, m.version(d), end=', ')",
    )
    return [
        cpu_line(),
        versions.strip().rstrip(","),
        f"dbt: {', '.join(REQUIREMENTS)}, both sides; date: "
        f"{datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}",
        "local+warm: "
        + ("measured" if bench.has_warm else "not measured: this dbtvenv has no --warm yet"),
    ]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--warm-rounds", type=int, default=3, help="warm DAG runs per side")
    parser.add_argument("--cold-rounds", type=int, default=1, help="cold DAG runs per side")
    parser.add_argument("--airflow-venv", type=Path, help="a venv with Airflow, Cosmos, dbtvenv")
    parser.add_argument(
        "--select", default="", help="dbt selectors to render (default: the whole DAG)"
    )
    parser.add_argument("--docs", type=Path, default=REPO / "docs" / "performance.md")
    parser.add_argument("--no-docs", action="store_true", help="only print the table")
    parser.add_argument("--keep", action="store_true", help="keep the scratch dir")
    args = parser.parse_args(argv)
    started = time.monotonic()
    with scratch("bench-cosmos-", args.keep) as work:
        bench = Bench(work, args.airflow_venv.absolute() if args.airflow_venv else None)
        if args.select:
            bench.env["COSMOS_SELECT"] = args.select
        sides = run(bench, args.warm_rounds, args.cold_rounds)
        header = [
            *machine(bench),
            f"n: DAG runs per row; run took {time.monotonic() - started:.0f} s",
        ]
        text = table(sides, header)
    print()
    print(text)
    if not args.no_docs:
        write_docs(args.docs, text, DOCS_BEGIN, DOCS_END)
        print(f"written to {args.docs}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
