"""Study: does a bare adapter pin (`dbt-<adapter>==1.X`) give a working dbt of line 1.X?

For every dbt line from 1.5 to 1.11, with dbt-duckdb and with dbt-postgres, this builds the env
through dbtvenv from the package registry and runs `dbt build` on examples/jaffle_duckdb (on
DuckDB, and on a throw-away PostgreSQL cluster listening on 127.0.0.1), then prints the matrix
as Markdown: what dbtvenv installed, what it added, how long the build took and dbt's result.

    python benchmarks/dbt_lines.py [--installer uv|pip] [--lines 5-11] [--adapters duckdb,postgres]
        [--without-implied-pins] [--json results.json]

`--without-implied-pins` adds a column with what the same pin installs when dbtvenv does not
constrain dbt-core (`env prepare --no-implied-pins`, no dbt run). PostgreSQL needs root,
`runuser`, `initdb` and `pg_ctl` (the cells are skipped otherwise). It is slow (minutes per
cell with pip; uv's cache makes reruns fast) and needs the network: not a CI test.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
EXAMPLE = REPO / "examples" / "jaffle_duckdb"
PROFILES = """\
jaffle_duckdb:
  target: duckdb
  outputs:
    duckdb:
      type: duckdb
      path: "{database}"
      threads: 2
    postgres:
      type: postgres
      host: 127.0.0.1
      port: {port}
      user: dbt
      password: unused
      dbname: postgres
      schema: jaffle_{schema}
      threads: 2
"""


def dbtvenv(*args: str, env: dict[str, str], cwd: Path, timeout: float = 1800) -> Any:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("DBTVENV_")}
    environ.update(env)
    environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), environ.get("PYTHONPATH")) if p)
    return subprocess.run(
        [sys.executable, "-m", "dbtvenv", *args],
        env=environ,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )


@contextmanager
def postgres() -> Iterator[int | None]:
    """A throw-away PostgreSQL cluster; yields its port (None where one cannot be made)."""
    if os.geteuid() != 0 or not all(shutil.which(c) for c in ("initdb", "pg_ctl", "runuser")):
        yield None
        return
    base = Path(tempfile.mkdtemp(prefix="dbtvenv-study-postgres."))
    shutil.chown(base, "postgres", "postgres")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    data, as_postgres = base / "data", ["runuser", "-u", "postgres", "--"]
    try:
        subprocess.run(
            [*as_postgres, "initdb", "-D", str(data), "-A", "trust", "-U", "dbt"],
            check=True,
            capture_output=True,
        )
        options = f"-p {port} -k {base} -c listen_addresses=127.0.0.1"
        log = str(base / "log")
        subprocess.run(
            [*as_postgres, "pg_ctl", "-D", str(data), "-o", options, "-l", log, "-w", "start"],
            check=True,
            capture_output=True,
        )
        yield port
    finally:
        subprocess.run(
            [*as_postgres, "pg_ctl", "-D", str(data), "-m", "immediate", "stop"],
            capture_output=True,
        )
        shutil.rmtree(base, ignore_errors=True)


def project_copy(where: Path, line: int, port: int | None, schema: str) -> Path:
    """The example project as every line from 1.5 on reads it: without the 1.8+ `flags:` block
    and version gate, with the snapshot's `target_schema` that dbt before 1.9 requires."""
    project = where / "jaffle"
    shutil.copytree(EXAMPLE, project, ignore=shutil.ignore_patterns("target", "logs", "*.duckdb"))
    config = (project / "dbt_project.yml").read_text()
    config = re.sub(r"\nflags:\n(  .*\n)+", "\n", config)
    config = re.sub(r"require-dbt-version:.*\n", "", config)
    (project / "dbt_project.yml").write_text(config)
    for schema_file in project.glob("models/*/schema.yml"):
        text = schema_file.read_text()
        if line < 10:  # a test's `arguments:` is dbt 1.10's; before, they sit beside its name
            text = re.sub(
                r"\n( +)arguments:\n((?:\1  .*\n)+)",
                lambda m: "\n" + re.sub(r"(?m)^  ", "", m.group(2)),
                text,
            )
        if line < 8:  # and before 1.8 data tests are `tests:`
            text = text.replace("data_tests:", "tests:")
        schema_file.write_text(text)
    snapshot = project / "snapshots" / "customers_snapshot.sql"  # dbt <1.9 needs target_schema
    snapshot.write_text(
        snapshot.read_text().replace(
            "unique_key=", "target_schema=target.schema,\n        unique_key="
        )
    )
    (project / "profiles.yml").write_text(
        PROFILES.format(database=where / "jaffle.duckdb", port=port or 5432, schema=schema)
    )
    return project


def manifest_of(cache: Path, err: str) -> dict[str, Any]:
    for line in reversed(err.splitlines()):
        found = re.search(r"built env ([0-9a-f]{16})", line)
        if found:
            data: dict[str, Any] = json.loads((cache / found.group(1) / "dbtvenv.json").read_text())
            return data
    return {}


def error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith("dbtvenv: error:")]
    return lines[0].removeprefix("dbtvenv: error: ")[:160] if lines else err.strip()[-160:]


def cell(
    adapter: str, line: int, installer: str, cache: Path, port: int | None, work: Path
) -> dict[str, Any]:
    requirement = f"dbt-{adapter}==1.{line}"
    target = "postgres" if adapter == "postgres" else "duckdb"
    result: dict[str, Any] = {"requirement": requirement, "target": target}
    if adapter == "postgres" and port is None:
        return {**result, "outcome": "skipped: no PostgreSQL here"}
    project = project_copy(work / f"{adapter}-1.{line}", line, port, f"1_{line}")
    env = {"DBT_SEND_ANONYMOUS_USAGE_STATS": "false", "DBT_USE_COLORS": "false"}
    started = time.monotonic()
    done = dbtvenv(
        "build",
        "--installer",
        installer,
        "--requirements",
        requirement,
        "--venv-dir",
        str(cache),
        "--",
        "--profiles-dir",
        ".",
        "--target",
        target,
        env=env,
        cwd=project,
    )
    result["seconds"] = round(time.monotonic() - started, 1)
    manifest = manifest_of(cache, done.stderr)
    versions = {d["name"].lower(): d["version"] for d in manifest.get("distributions", [])}
    result.update(
        status=done.returncode,
        dbt_core=versions.get("dbt-core"),
        adapter=versions.get(f"dbt-{adapter}"),
        implied_pins=manifest.get("implied_pins", []),
        repairs=manifest.get("repairs", []),
        build_seconds=manifest.get("build_seconds"),
    )
    passed = re.search(r"PASS=(\d+) WARN=(\d+) ERROR=(\d+) SKIP=(\d+)", done.stdout)
    if done.returncode == 0 and passed:
        result["outcome"] = f"PASS={passed.group(1)}"
    elif passed:
        result["outcome"] = f"dbt failed: {passed.group(0)}"
    elif "dbtvenv: error:" in done.stderr:
        result["outcome"] = f"exit {done.returncode}: {error_line(done.stderr)}"
    else:  # dbt's own error, from its output
        said = [line for line in done.stdout.splitlines() if line.strip()][-2:]
        result["outcome"] = f"dbt exit {done.returncode}: {' / '.join(said)[-200:]}"
    return result


def without_pins(adapter: str, line: int, installer: str, cache: Path, work: Path) -> str:
    """What the bare pin installs when dbtvenv does not constrain dbt-core."""
    requirement = f"dbt-{adapter}==1.{line}"
    done = dbtvenv(
        "env",
        "prepare",
        "--no-implied-pins",
        "--installer",
        installer,
        "--requirements",
        requirement,
        "--venv-dir",
        str(cache),
        env={},
        cwd=work,
    )
    if done.returncode != 0:
        said = error_line(done.stderr)
        if "experimental-parser" in said:
            return "fails: the newest dbt-core needs dbt-core-experimental-parser"
        if "is a pre-release" in said:
            return f"refused: {said.split(', and', 1)[0]}"
        return f"fails: {said[:90]}"
    manifest = json.loads((Path(done.stdout.strip()) / "dbtvenv.json").read_text())
    versions = {d["name"].lower(): d["version"] for d in manifest["distributions"]}
    return f"dbt-core {versions.get('dbt-core')}"


def parse_lines(text: str) -> list[int]:
    low, _, high = text.partition("-")
    return list(range(int(low), int(high or low) + 1))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--installer", choices=("uv", "pip"), default="uv")
    parser.add_argument("--lines", default="5-11", help="minor numbers of dbt 1.X, e.g. 5-11")
    parser.add_argument("--adapters", default="duckdb,postgres")
    parser.add_argument("--without-implied-pins", action="store_true")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))  # clean up
    adapters = args.adapters.split(",")
    results = []
    with tempfile.TemporaryDirectory(prefix="dbtvenv-study-") as tmp, postgres() as port:
        work = Path(tmp)
        cache = work / "cache"
        for adapter in adapters:
            for line in parse_lines(args.lines):
                found = cell(adapter, line, args.installer, cache, port, work)
                if args.without_implied_pins:
                    found["without_implied_pins"] = without_pins(
                        adapter, line, args.installer, work / "cache-unpinned", work
                    )
                print(json.dumps(found), file=sys.stderr, flush=True)
                results.append(found)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    header = (
        "| requirement | target | dbt-core | adapter | added by dbtvenv | build s | dbt build |"
    )
    rule = "|---|---|---|---|---|---|---|"
    if args.without_implied_pins:
        header += " with --no-implied-pins |"
        rule += "---|"
    print(f"installer: {args.installer}, Python {sys.version.split()[0]}\n\n{header}\n{rule}")
    for r in results:
        added = " ".join([*r.get("implied_pins", []), *r.get("repairs", [])]) or "-"
        row = (
            f"| `{r['requirement']}` | {r['target']} | {r.get('dbt_core') or '-'} | "
            f"{r.get('adapter') or '-'} | {added} | {r.get('build_seconds') or '-'} | "
            f"{r['outcome']} |"
        )
        if args.without_implied_pins:
            row += f" {r.get('without_implied_pins', '-')} |"
        print(row)
    return 0 if all(r["outcome"].startswith("PASS") for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
