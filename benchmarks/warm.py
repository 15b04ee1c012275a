"""Warm-mode benchmark: `make bench` runs it, or `python benchmarks/warm.py [--quick]`.

One-task-per-model dbt on examples/jaffle_duckdb with real dbt-core + dbt-duckdb 1.11, three
ways side by side in one run:

  direct  the env's own `ENV/bin/dbt ARGS`, as a scheduler would run it without dbtvenv
  dbtvenv `dbtvenv ARGS` on the complete env (dbt started directly by dbtvenv)
  warm    `dbtvenv ARGS --warm`: dbt forked from the env's warm process

for `run -s stg_customers`, `ls`, `test -s stg_customers` and `build` (the whole project). The
cases run in turn, round after round, the order reversed every other round, so a change in the
machine's load hits all alike; rows give medians over n runs and the ratio to `direct`. Before
timing, the warm process is started and every command runs warm a few times untimed (what a
long-lived worker looks like after its first tasks); every timed warm run is checked to have
been served warm. Also: the warm process's memory (RSS and PSS); two floor rows, a warm
`dbt --version` (fork, hand-over and dbt's start without a project) and `run -s` timed inside
the forked child (dbt's own work, with dbtvenv, the socket and the fork left out); and the
first run of a new warm process (it runs directly while the warm process starts beside it).

dbtvenv runs as users run it: the console script of a scratch venv with a regular install of
this checkout (`--app-venv` reuses one). The env is built with uv (what it installs is the
same as pip's, see docs/performance.md). The results go into docs/performance.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from study import cpu_line, scratch, write_docs

REPO = Path(__file__).resolve().parent.parent
EXAMPLE = REPO / "examples" / "jaffle_duckdb"
REQUIREMENTS = ("dbt-core~=1.11.0", "dbt-duckdb~=1.11.0")
DOCS_BEGIN = "<!-- bench-warm:begin -->"
DOCS_END = "<!-- bench-warm:end -->"
TARGET = 0.3  # warm `run -s` against direct
WARM_LINE = "dbtvenv: debug: dbt runs warm"
# Variables that would change what Python or dbt does on one side only.
DROP = {"PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "PYTHONSTARTUP", "DBTVENV_WARM"}
# dbt --version asks PyPI for the latest release; a closed local port makes that fail at once.
NO_VERSION_CHECK = {"HTTPS_PROXY": "http://127.0.0.1:9", "https_proxy": "http://127.0.0.1:9"}


@dataclass(frozen=True)
class Command:
    name: str
    args: tuple[str, ...]
    n: int


FULL = (
    Command("run -s stg_customers", ("run", "-s", "stg_customers"), 15),
    Command("ls", ("ls",), 10),
    Command("test -s stg_customers", ("test", "-s", "stg_customers"), 10),
    Command("build", ("build",), 5),
)
QUICK = tuple(Command(c.name, c.args, max(2, c.n // 4)) for c in FULL)


class CommandFailed(RuntimeError):
    pass


@dataclass
class Row:
    what: str
    n: int
    cells: list[str]
    ratio: str = ""
    target: str = ""
    status: str = ""


@dataclass
class Bench:
    work: Path
    app: Path
    rows: list[Row] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.dbtvenv = self.app / "bin" / "dbtvenv"
        self.project = self.work / "jaffle_duckdb"
        shutil.copytree(EXAMPLE, self.project, ignore=shutil.ignore_patterns("target", "logs"))
        run_dir = self.work / "run"
        run_dir.mkdir(mode=0o700)
        self.env = {
            **{k: v for k, v in os.environ.items() if k not in DROP},
            "DBT_DUCKDB_PATH": str(self.work / "jaffle.duckdb"),
            "DBT_PROFILES_DIR": str(self.project),
            "DBT_SEND_ANONYMOUS_USAGE_STATS": "false",
            "XDG_RUNTIME_DIR": str(run_dir),
            "DBTVENV_VENV_DIR": str(self.work / "cache"),
            "DBTVENV_REQUIREMENTS": " ".join(REQUIREMENTS),
            "DBTVENV_INSTALLER": "uv",
        }
        self.env.pop("DBTVENV_DEBUG", None)

    def run(self, argv: Sequence[str], env: Mapping[str, str] | None = None) -> tuple[float, str]:
        """Run to completion in the project, stdout discarded: the wall time and stderr.

        The wait blocks in wait4(): `subprocess.run(timeout=...)` would poll every 50 ms."""
        with tempfile.TemporaryFile(dir=self.work) as err:
            started = time.perf_counter()
            proc = subprocess.Popen(
                list(argv),
                env=dict(env or self.env),
                cwd=self.project,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=err,
            )
            _, status, _ = os.wait4(proc.pid, 0)
            elapsed = time.perf_counter() - started
            err.seek(0)
            stderr = err.read().decode(errors="replace")
        if os.waitstatus_to_exitcode(status) != 0:
            tail = "\n  ".join(stderr.splitlines()[-15:])
            raise CommandFailed(f"{' '.join(argv)} failed:\n  {tail}")
        return elapsed, stderr

    def prepare(self) -> Path:
        out = subprocess.run(
            [str(self.dbtvenv), "env", "prepare"],
            env=self.env,
            cwd=self.work,
            capture_output=True,
            check=True,
            timeout=1800,
        )
        return Path(out.stdout.decode().strip())

    def warm(self, command: str, *args: str) -> float:
        elapsed, stderr = self.run(
            [str(self.dbtvenv), command, "--warm", *args], {**self.env, "DBTVENV_DEBUG": "1"}
        )
        if WARM_LINE not in stderr:
            raise CommandFailed(f"a timed warm run was not served warm:\n{stderr}")
        return elapsed

    def start_warm_process(self, commands: Sequence[Command]) -> None:
        deadline = time.monotonic() + 300
        while True:
            _, stderr = self.run(
                [str(self.dbtvenv), "ls", "--warm"], {**self.env, "DBTVENV_DEBUG": "1"}
            )
            if WARM_LINE in stderr:
                break
            if time.monotonic() > deadline:
                raise CommandFailed(f"the warm process did not start:\n{stderr}")
            time.sleep(0.5)
        for _ in range(3):  # what a worker's first tasks teach its warm process
            for command in commands:
                self.warm(*command.args)

    def interleaved(
        self, cases: Mapping[str, Callable[[], float]], n: int
    ) -> dict[str, list[float]]:
        names = list(cases)
        times: dict[str, list[float]] = {name: [] for name in names}
        for i in range(n):
            for name in names if i % 2 == 0 else reversed(names):
                times[name].append(cases[name]())
        return times

    def compare(self, env_dir: Path, command: Command) -> None:
        dbt = str(env_dir / "bin" / "dbt")
        cases = {
            "direct": lambda: self.run([dbt, *command.args])[0],
            "dbtvenv": lambda: self.run([str(self.dbtvenv), *command.args])[0],
            "warm": lambda: self.warm(*command.args),
        }
        print(f"timing {command.name} ({command.n} rounds)", flush=True)
        times = self.interleaved(cases, command.n)
        median = {name: statistics.median(values) for name, values in times.items()}
        ratio = median["warm"] / median["direct"]
        is_target = command.name.startswith("run -s")
        self.rows.append(
            Row(
                f"`{command.name}`",
                command.n,
                [s(median["direct"]), s(median["dbtvenv"]), s(median["warm"])],
                f"{ratio:.2f}x (fastest runs {min(times['warm']) / min(times['direct']):.2f}x); "
                f"dbtvenv direct {median['dbtvenv'] / median['direct']:.2f}x",
                f"<= {TARGET}x" if is_target else "",
                ("met" if ratio <= TARGET else "NOT met") if is_target else "",
            )
        )

    def floors(self, env_dir: Path, n: int) -> None:
        print("timing the floors", flush=True)
        version = [self.warm("dbt", "--", "--version") for _ in range(n)]
        env = {**self.env, **NO_VERSION_CHECK}
        direct_version = [self.run([str(env_dir / "bin" / "dbt"), "--version"], env)[0]]
        direct_version += [self.run([str(env_dir / "bin" / "dbt"), "--version"], env)[0]]
        self.rows.append(
            Row(
                "floor: warm `dbt --version` (fork, hand-over, dbt's start without a project)",
                n,
                [s(statistics.median(direct_version)), "", s(statistics.median(version))],
            )
        )
        inside = [self.in_child(env_dir) for _ in range(n)]
        self.rows.append(
            Row(
                "floor: `run -s stg_customers` in the forked child, fork to exit (dbt's own work)",
                n,
                ["", "", s(statistics.median(inside))],
            )
        )

    def in_child(self, env_dir: Path) -> float:
        """The forked child's life, fork to exit, as the warm process measured it."""
        _, stderr = self.run(
            [str(self.dbtvenv), "run", "--warm", "-s", "stg_customers"],
            {**self.env, "DBTVENV_DEBUG": "1"},
        )
        match = re.search(r"dbt ran warm for ([0-9.]+) s", stderr)
        if match is None:
            raise CommandFailed(f"no warm run:\n{stderr}")
        return float(match.group(1))

    def first_run(self, env_dir: Path, n: int) -> None:
        """A run that finds no warm process runs directly and starts one beside it: what it
        costs against a direct run while the new warm process imports dbt on the other core."""
        print("timing first runs", flush=True)
        dbt = str(env_dir / "bin" / "dbt")
        args = ("run", "-s", "stg_customers")
        first, direct = [], []
        for _ in range(n):
            self.stop_warm()
            self.wait_for_no_warm_process()
            elapsed, stderr = self.run(
                [str(self.dbtvenv), "run", "--warm", *args[1:]], {**self.env, "DBTVENV_DEBUG": "1"}
            )
            if "while its warm process starts" not in stderr:
                raise CommandFailed(f"not a first run:\n{stderr}")
            first.append(elapsed)
            direct.append(self.run([dbt, *args])[0])
            self.wait_for_warm_process()  # before the next round stops it
        ratio = statistics.median(first) / statistics.median(direct)
        self.rows.append(
            Row(
                "first `run -s` of a new warm process (runs directly, starts the warm process)",
                n,
                [s(statistics.median(direct)), "", s(statistics.median(first))],
                f"{ratio:.2f}x",
            )
        )

    def wait_for_warm_process(self) -> None:
        run_dir = Path(self.env["XDG_RUNTIME_DIR"]) / "dbtvenv"
        deadline = time.monotonic() + 120
        while not list(run_dir.glob("w*-*.sock")) or list(run_dir.glob("w*-*.starting")):
            if time.monotonic() > deadline:
                raise CommandFailed("the warm process did not start")
            time.sleep(0.2)

    def wait_for_no_warm_process(self) -> None:
        run_dir = Path(self.env["XDG_RUNTIME_DIR"]) / "dbtvenv"
        deadline = time.monotonic() + 60
        while list(run_dir.glob("w*-*.sock")) or list(run_dir.glob("w*-*.starting")):
            if time.monotonic() > deadline:
                raise CommandFailed("a warm process did not stop")
            time.sleep(0.2)

    def memory(self) -> None:
        states = list((Path(self.env["XDG_RUNTIME_DIR"]) / "dbtvenv").glob("w*-*.json"))
        for state in states:
            pid = json.loads(state.read_text())["pid"]
            rss = _field(f"/proc/{pid}/status", "VmRSS:")
            pss = _field(f"/proc/{pid}/smaps_rollup", "Pss:")
            self.rows.append(
                Row(
                    "memory of the warm process (after the runs above)",
                    1,
                    ["", "", f"RSS {rss / 1024:.0f} MiB, PSS {pss / 1024:.0f} MiB"],
                )
            )

    def stop_warm(self) -> None:
        subprocess.run(
            [str(self.dbtvenv), "env", "stop-warm", "--all"],
            env=self.env,
            capture_output=True,
            timeout=60,
        )


def _field(path: str, name: str) -> int:
    """A `kB` field of a /proc file, in kB (0 if absent)."""
    try:
        for line in Path(path).read_text().splitlines():
            if line.startswith(name):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return 0


def s(seconds: float) -> str:
    return f"{seconds:.2f} s"


def make_app_venv(work: Path) -> Path:
    """A venv with dbtvenv installed from this checkout, as a user installs it (not editable)."""
    venv = work / "app"
    print("installing dbtvenv[uv] from this checkout into a scratch venv", flush=True)
    subprocess.run(
        [getattr(sys, "_base_executable", sys.executable), "-m", "venv", str(venv)], check=True
    )
    subprocess.run(
        [str(venv / "bin" / "python"), "-m", "pip", "install", "-q", f"{REPO}[uv]"],
        cwd=work,
        check=True,
        capture_output=True,
    )
    return venv


def machine() -> list[str]:
    load = " ".join(Path("/proc/loadavg").read_text().split()[:3])
    return [
        cpu_line(),
        f"Python {platform.python_version()}; dbt-core and dbt-duckdb 1.11 (uv build)",
        f"date: {datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}; "
        f"load average at the end: {load}",
    ]


def table(bench: Bench, header: Sequence[str]) -> str:
    lines = [*(f"- {h}" for h in header), ""]
    lines += [
        "| measurement | n | direct `ENV/bin/dbt` | `dbtvenv` | `dbtvenv --warm` "
        "| warm vs direct | target | status |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in bench.rows:
        lines.append(
            f"| {r.what} | {r.n} | {' | '.join(r.cells)} | {r.ratio} | {r.target} | {r.status} |"
        )
    for note in bench.notes:
        lines += ["", note]
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="few repeats (about 2 minutes)")
    parser.add_argument("--app-venv", type=Path, help="a venv with dbtvenv installed already")
    parser.add_argument("--docs", type=Path, default=REPO / "docs" / "performance.md")
    parser.add_argument("--no-docs", action="store_true", help="only print the table")
    parser.add_argument("--keep", action="store_true", help="keep the scratch dir")
    args = parser.parse_args(argv)
    commands = QUICK if args.quick else FULL
    started = time.monotonic()
    with scratch("bench-warm-", args.keep) as work:
        app = args.app_venv.absolute() if args.app_venv else make_app_venv(work)
        bench = Bench(work, app)
        try:
            print("building the env (uv)", flush=True)
            env_dir = bench.prepare()
            bench.run([str(env_dir / "bin" / "dbt"), "build"])  # the database, partial parse
            print("starting the warm process", flush=True)
            bench.start_warm_process(commands)
            for command in commands:
                bench.compare(env_dir, command)
            bench.floors(env_dir, commands[0].n)
            bench.memory()
            bench.first_run(env_dir, 3)
        finally:
            bench.stop_warm()
        header = [*machine(), f"n: repeats per row; run took {time.monotonic() - started:.0f} s"]
        if args.quick:
            header.append("quick run (--quick): few repeats, rough numbers")
        text = table(bench, header)
    print()
    print(text)
    if not args.no_docs and not args.quick:
        write_docs(args.docs, text, DOCS_BEGIN, DOCS_END)
        print(f"written to {args.docs}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
