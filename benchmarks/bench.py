"""dbtvenv's benchmarks: `make bench`, or `python benchmarks/bench.py [--quick]`.

One run measures everything side by side against a baseline measured in the same run, and
prints one table (medians over n repeated runs, n stated per row):

  a. warm path: `dbtvenv dbt ... -- --version` on a complete env vs that env's own `dbt
     --version`, with the offline stand-in dbt and with real dbt-core + dbt-duckdb;
  b. cold build with pip: `dbtvenv env prepare` into a fresh dir vs what Airflow and Cosmos
     do: `python -m venv X && X/bin/pip install dbt-core~=1.11.0 dbt-duckdb~=1.11.0`;
  c. cold build with `--installer uv`, cold and warm uv cache, against the same pip baseline,
     and whether uv installs the same distributions and versions as pip;
  d. contention: 8 concurrent warm runs on one cache dir, and the warm-path decision
     (`provision.ensure_env`) timed in 8 concurrent processes, with every lock it takes;
  e. start-up: `dbtvenv --version`, `dbtvenv --help`, and `-X importtime` of the warm path.

dbtvenv runs as users run it: the `dbtvenv` console script of a venv with a regular
(non-editable) install of this checkout, made in a scratch dir (`--app-venv` reuses one).
Everything else lives in that scratch dir too and is removed at the end. pip and uv get the
same index (the public one: pip's config files and PIP_*/UV_* index settings are set aside)
and each build pair the same cache state. The results table goes into docs/performance.md.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from study import cpu_line, scratch, write_docs

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

from standin import build_wheelhouse  # noqa: E402

REAL_REQUIREMENTS = ("dbt-core~=1.11.0", "dbt-duckdb~=1.11.0")
STANDIN_REQUIREMENT = "dbt-standin==1.0.0"
CONCURRENCY = 8
HEAVY_MODULES = ("rich", "psutil", "packaging", "pip", "uv", "importlib.metadata")
# What `dbtvenv --help` and `--version` need of dbtvenv: the CLI and two leaf modules.
# The command line itself: entry point, Click tree, the option table, errors and redaction.
CLI_MODULES = {
    "dbtvenv",
    "dbtvenv.__main__",
    "dbtvenv.main",
    "dbtvenv.cli",
    "dbtvenv.options",
    "dbtvenv.errors",
    "dbtvenv.redact",
}
# dbt --version asks PyPI for the latest release (up to 1 s per package, varying with the
# network); a proxy at a closed local port makes that fail at once, on both sides alike.
NO_VERSION_CHECK = {"HTTPS_PROXY": "http://127.0.0.1:9", "https_proxy": "http://127.0.0.1:9"}
DOCS_BEGIN = "<!-- bench:begin -->"
DOCS_END = "<!-- bench:end -->"

# Environment variables that would point pip or uv at another index, cache or config than the
# run chooses, or change what Python does; the machine's certificates and timeouts stay.
KEEP_PIP_UV = {"PIP_CERT", "PIP_CLIENT_CERT", "PIP_DEFAULT_TIMEOUT", "UV_NATIVE_TLS"}
DROP = {"PYTHONDONTWRITEBYTECODE", "PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "PYTHONSTARTUP"}


@dataclass(frozen=True)
class Counts:
    warm: int
    warm_real: int
    cold_pip: int
    cold_uv: int
    warm_uv: int
    contention: int
    startup: int
    importtime: int


FULL = Counts(
    warm=40,
    warm_real=10,
    cold_pip=3,
    cold_uv=3,
    warm_uv=5,
    contention=10,
    startup=40,
    importtime=10,
)
QUICK = Counts(
    warm=10,
    warm_real=3,
    cold_pip=1,
    cold_uv=1,
    warm_uv=2,
    contention=3,
    startup=10,
    importtime=3,
)


@dataclass
class Row:
    section: str
    what: str
    n: int
    dbtvenv: str
    baseline: str
    compared: str
    target: str = ""
    met: bool | None = None

    def status(self) -> str:
        return "" if self.met is None else ("met" if self.met else "NOT met")


@dataclass
class Results:
    rows: list[Row] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    imports: list[str] = field(default_factory=list)

    def add(self, row: Row) -> None:
        self.rows.append(row)
        print(
            f"  {row.what}: {row.dbtvenv} vs {row.baseline} ({row.compared}) {row.status()}",
            flush=True,
        )


class CommandFailed(RuntimeError):
    pass


class Bench:
    def __init__(self, work: Path, app_venv: Path, counts: Counts, pip_cache: str) -> None:
        self.work = work
        self.app = app_venv
        self.python = app_venv / "bin" / "python"
        self.dbtvenv = app_venv / "bin" / "dbtvenv"
        self.counts = counts
        self.pip_cache = pip_cache
        self.wheelhouse = build_wheelhouse(work / "wheelhouse")
        self.offline = f"--no-index --find-links {self.wheelhouse}"
        self.env = self._environment()
        self.base_python = self._base_python()
        self.results = Results()
        self._serial = 0
        self.last_cpu = 0.0
        self.manifests: dict[str, dict[str, Any]] = {}
        self.baseline_steps: list[tuple[float, float]] = []
        self.kept: dict[str, tuple[Path, Path]] = {}

    # -- plumbing ---------------------------------------------------------------------------

    def _environment(self) -> dict[str, str]:
        env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith("DBTVENV_")
            and k not in DROP
            and (not k.startswith(("PIP_", "UV_")) or k in KEEP_PIP_UV)
        }
        env["PIP_CONFIG_FILE"] = os.devnull
        env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
        env["UV_NO_CONFIG"] = "1"
        env["DBT_SEND_ANONYMOUS_USAGE_STATS"] = "false"
        if self.pip_cache == "cold":
            env["PIP_NO_CACHE_DIR"] = "1"
        else:
            env["PIP_CACHE_DIR"] = str(self.work / "pip-cache")
        env["UV_CACHE_DIR"] = str(self.work / "uv-cache")
        return env

    def _base_python(self) -> str:
        out = self.run_captured([str(self.python), "-c", "import sys; print(sys._base_executable)"])
        return out.strip()

    def fresh(self, name: str) -> Path:
        self._serial += 1
        return self.work / f"{name}-{self._serial}"

    def run(
        self,
        argv: Sequence[str],
        env: Mapping[str, str] | None = None,
        timeout: float = 1800,
    ) -> float:
        """Run to completion, stdout discarded; return the wall time in seconds.

        The CPU time (user + system) of the command and every descendant it waited for goes
        to `self.last_cpu`: unlike wall time, it hardly changes with the machine's load. The
        wait blocks in wait4(): `subprocess.run(timeout=...)` would poll every 50 ms and round
        every measurement up to that.
        """
        with tempfile.TemporaryFile(dir=self.work) as err:
            started = time.perf_counter()
            proc = subprocess.Popen(
                list(argv),
                env=dict(env or self.env),
                cwd=self.work,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=err,
            )
            watchdog = threading.Timer(timeout, proc.kill)
            watchdog.start()
            try:
                _, status, usage = os.wait4(proc.pid, 0)
            finally:
                watchdog.cancel()
            elapsed = time.perf_counter() - started
            proc.returncode = os.waitstatus_to_exitcode(status)
            self.last_cpu = usage.ru_utime + usage.ru_stime
            if proc.returncode != 0:
                err.seek(0)
                tail = err.read().decode(errors="replace").splitlines()[-15:]
                raise CommandFailed(
                    f"{shlex.join(argv)} exited {proc.returncode}:\n  " + "\n  ".join(tail)
                )
        return elapsed

    def run_captured(self, argv: Sequence[str], env: Mapping[str, str] | None = None) -> str:
        proc = subprocess.run(
            list(argv),
            env=dict(env or self.env),
            cwd=self.work,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=1800,
        )
        if proc.returncode != 0:
            raise CommandFailed(f"{shlex.join(argv)} exited {proc.returncode}:\n{proc.stderr}")
        return proc.stdout.decode()

    def interleaved(
        self, cases: Mapping[str, Callable[[], float]], n: int, warmup: int = 0
    ) -> dict[str, list[float]]:
        """Run the cases in turn, n rounds, the order reversed every other round."""
        names = list(cases)
        for _ in range(warmup):
            for name in names:
                cases[name]()
        times: dict[str, list[float]] = {name: [] for name in names}
        for i in range(n):
            for name in names if i % 2 == 0 else reversed(names):
                times[name].append(cases[name]())
        return times

    def dbtvenv_argv(self, *args: str) -> list[str]:
        return [str(self.dbtvenv), *args]

    def prepare(
        self, root: Path, requirements: Sequence[str], *extra: str, env: Mapping[str, str] | None
    ) -> Path:
        reqs = [arg for r in requirements for arg in ("--requirements", r)]
        out = self.run_captured(
            self.dbtvenv_argv("env", "prepare", "--venv-dir", str(root), *reqs, *extra), env=env
        )
        return Path(out.strip().splitlines()[-1])

    # -- a. warm path -------------------------------------------------------------------------

    def standin(self) -> None:
        """The stand-in's env, built once: the warm path of a, d and e."""
        self.standin_root = self.work / "cache-standin"
        self.standin_env = self.prepare(
            self.standin_root,
            [STANDIN_REQUIREMENT],
            "--pip-install-options",
            self.offline,
            env=None,
        )
        self.standin_args = [
            "dbt",
            "--venv-dir",
            str(self.standin_root),
            "--requirements",
            STANDIN_REQUIREMENT,
            "--pip-install-options",
            self.offline,
            "--",
            "--version",
        ]

    def warm_path(self, real_env: tuple[Path, Path] | None) -> None:
        print("a. warm path", flush=True)
        direct = [str(self.standin_env / "bin" / "dbt"), "--version"]
        python = str(self.python)
        spawn = "import subprocess, sys; sys.exit(subprocess.call(sys.argv[1:]))"
        floors = {
            "a Python wrapper that only spawns dbt": [python, "-c", spawn, *direct],
            "the same wrapper importing Click": [python, "-c", f"import click; {spawn}", *direct],
        }
        self._overhead(
            "stand-in dbt",
            self.dbtvenv_argv(*self.standin_args),
            direct,
            self.counts.warm,
            target_ms=60.0,
            floors=floors,
        )
        if real_env is not None:
            real_root, real_dir = real_env
            reqs = [arg for r in REAL_REQUIREMENTS for arg in ("--requirements", r)]
            argv = self.dbtvenv_argv("dbt", "--venv-dir", str(real_root), *reqs, "--", "--version")
            self._overhead(
                "dbt-core + dbt-duckdb",
                argv,
                [str(real_dir / "bin" / "dbt"), "--version"],
                self.counts.warm_real,
                target_ms=60.0,
                env={**self.env, **NO_VERSION_CHECK},
            )

    def _overhead(
        self,
        label: str,
        argv: list[str],
        direct: list[str],
        n: int,
        target_ms: float,
        env: Mapping[str, str] | None = None,
        floors: Mapping[str, list[str]] | None = None,
    ) -> None:
        commands = {"dbtvenv": argv, "direct": direct, **(floors or {})}
        cpu: dict[str, list[float]] = {name: [] for name in commands}

        def case(name: str) -> Callable[[], float]:
            def timed() -> float:
                wall = self.run(commands[name], env)
                cpu[name].append(self.last_cpu)
                return wall

            return timed

        times = self.interleaved({name: case(name) for name in commands}, n, warmup=2)
        theirs = statistics.median(times["direct"])
        for name in commands:
            if name == "direct":
                continue
            ours = statistics.median(times[name])
            paired = statistics.median(a - b for a, b in zip(times[name], times["direct"]))
            fastest = min(times[name]) - min(times["direct"])
            cpu_paired = statistics.median(
                a - b for a, b in zip(cpu[name][-n:], cpu["direct"][-n:])
            )
            ours_is_dbtvenv = name == "dbtvenv"
            self.results.add(
                Row(
                    "a",
                    f"warm run, {label}: `dbtvenv dbt ... -- --version` vs `ENV/bin/dbt --version`"
                    if ours_is_dbtvenv
                    else f"floor, {label}: {name}, vs `ENV/bin/dbt --version`",
                    n,
                    ms(ours),
                    ms(theirs),
                    f"+{paired * 1000:.0f} ms ({ours / theirs:.2f}x); fastest runs "
                    f"+{fastest * 1000:.0f} ms; CPU +{cpu_paired * 1000:.0f} ms",
                    f"overhead <= {target_ms:.0f} ms" if ours_is_dbtvenv else "",
                    paired * 1000 <= target_ms if ours_is_dbtvenv else None,
                )
            )

    # -- b. cold build with pip -----------------------------------------------------------------

    def baseline_build(self) -> float:
        venv = self.fresh("baseline")
        venv_seconds = self.run([self.base_python, "-m", "venv", str(venv)])
        pip_seconds = self.run([str(venv / "bin" / "pip"), "install", *REAL_REQUIREMENTS])
        self.baseline_steps.append((venv_seconds, pip_seconds))
        shutil.rmtree(venv)
        return venv_seconds + pip_seconds

    def dbtvenv_build(
        self, installer: str, env: Mapping[str, str] | None = None, keep: bool = False
    ) -> float:
        root = self.fresh(f"cache-{installer}")
        reqs = [arg for r in REAL_REQUIREMENTS for arg in ("--requirements", r)]
        argv = self.dbtvenv_argv("env", "prepare", "--venv-dir", str(root), *reqs)
        elapsed = self.run([*argv, "--installer", installer], env=env)
        (env_dir,) = [p for p in root.iterdir() if re.fullmatch(r"[0-9a-f]{16}", p.name)]
        manifest = json.loads((env_dir / "dbtvenv.json").read_text())
        self.manifests.setdefault(installer, manifest)
        if keep:
            self.kept[installer] = (root, env_dir)
        else:
            shutil.rmtree(root)
        return elapsed

    def cold_pip(self) -> float:
        print("b. cold build with pip", flush=True)
        n = self.counts.cold_pip
        if self.pip_cache == "warm":
            self.baseline_build()  # fills the pip cache both sides then use
        rounds = iter(range(n))
        times = self.interleaved(
            {
                "baseline": self.baseline_build,
                "dbtvenv": lambda: self.dbtvenv_build("pip", keep=next(rounds) == n - 1),
            },
            n,
        )
        base, ours = statistics.median(times["baseline"]), statistics.median(times["dbtvenv"])
        timed = self.baseline_steps[-n:]
        venv_step = statistics.median(v for v, _ in timed)
        pip_step = statistics.median(p for _, p in timed)
        self.results.add(
            Row(
                "b",
                "cold build, pip: `dbtvenv env prepare` vs `python -m venv X && X/bin/pip install`",
                n,
                s(ours),
                s(base),
                f"{ours / base:.2f}x",
                "<= 0.85x",
                ours / base <= 0.85,
            )
        )
        self.results.add(
            Row(
                "b",
                "floor: the baseline's two steps, `pip install` alone and `python -m venv` "
                "(ensurepip) alone",
                n,
                s(pip_step),
                s(venv_step),
                f"pip install alone: {pip_step / base:.2f}x of the baseline",
            )
        )
        return base

    # -- c. cold build with uv ------------------------------------------------------------------

    def cold_uv(self, pip_baseline: float | None) -> None:
        print("c. cold build with uv", flush=True)
        if pip_baseline is None:  # section b did not run: one build each, warm-up first
            if self.pip_cache == "warm":
                self.baseline_build()
            pip_baseline = self.baseline_build()
            self.dbtvenv_build("pip")
        cold: list[float] = []
        for _ in range(self.counts.cold_uv):
            env = {**self.env, "UV_CACHE_DIR": str(self.fresh("uv-cache-cold"))}
            cold.append(self.dbtvenv_build("uv", env=env))
            shutil.rmtree(env["UV_CACHE_DIR"])
        self.dbtvenv_build("uv")  # fills the shared uv cache
        times = self.interleaved(
            {
                "dbtvenv": lambda: self.dbtvenv_build("uv"),
                "uv alone": lambda: self.uv_alone(compile_bytecode=True),
                "uv alone, no bytecode": lambda: self.uv_alone(compile_bytecode=False),
            },
            self.counts.warm_uv,
        )
        rows = (
            ("`--installer uv`, cold uv cache", cold, None),
            ("`--installer uv`, warm uv cache", times["dbtvenv"], 0.1),
            (
                "floor: uv alone, warm cache, `uv venv` + `uv pip install --compile-bytecode`",
                times["uv alone"],
                None,
            ),
            (
                "floor: uv alone, warm cache, without `--compile-bytecode`",
                times["uv alone, no bytecode"],
                None,
            ),
        )
        for label, runs, target in rows:
            median = statistics.median(runs)
            self.results.add(
                Row(
                    "c",
                    f"cold build, {label}, vs the pip baseline",
                    len(runs),
                    s(median),
                    s(pip_baseline),
                    f"{median / pip_baseline:.3f}x",
                    "" if target is None else f"<= {target}x",
                    None if target is None else median / pip_baseline <= target,
                )
            )
        pip_dists = distributions(self.manifests.get("pip"))
        uv_dists = distributions(self.manifests.get("uv"))
        same = pip_dists == uv_dists and bool(pip_dists)
        diff = sorted(pip_dists ^ uv_dists)
        self.results.add(
            Row(
                "c",
                "distributions and versions installed by uv vs by pip (manifests)",
                1,
                f"{len(uv_dists)} distributions",
                f"{len(pip_dists)} distributions",
                "identical" if same else "differ: " + ", ".join(f"{n}=={v}" for n, v in diff),
                "identical",
                same,
            )
        )

    def uv_alone(self, *, compile_bytecode: bool) -> float:
        venv = self.fresh("uv-alone")
        uv = self.run_captured([str(self.python), "-c", "import uv; print(uv.find_uv_bin())"])
        started = time.perf_counter()
        self.run([uv.strip(), "venv", "--quiet", "--python", self.base_python, str(venv)])
        compiling = ["--compile-bytecode"] if compile_bytecode else []
        python = str(venv / "bin" / "python")
        self.run([uv.strip(), "pip", "install", "--python", python, *compiling, *REAL_REQUIREMENTS])
        elapsed = time.perf_counter() - started
        shutil.rmtree(venv)
        return elapsed

    # -- d. contention --------------------------------------------------------------------------

    def contention(self) -> None:
        print("d. contention", flush=True)
        root = self.standin_root
        argv = self.dbtvenv_argv(*self.standin_args)
        direct = [str(self.standin_env / "bin" / "dbt"), "--version"]
        times = self.interleaved(
            {
                "dbtvenv": lambda: self.concurrently(argv),
                "direct": lambda: self.concurrently(direct),
            },
            self.counts.contention,
            warmup=1,
        )
        ours, theirs = statistics.median(times["dbtvenv"]), statistics.median(times["direct"])
        self.results.add(
            Row(
                "d",
                f"{CONCURRENCY} concurrent warm runs on one cache dir, wall time",
                self.counts.contention,
                ms(ours),
                ms(theirs),
                f"+{(ours - theirs) * 1000:.0f} ms, {ours / theirs:.2f}x",
            )
        )
        probes = []
        for _ in range(self.counts.contention):
            probes += self.concurrent_probes(root)
        decisions = [p["ensure_ms"] for p in probes]
        specs = [p["spec_ms"] for p in probes]
        held = sum(p["lock_held_ms"] for p in probes)
        taken = sum(p["locks_taken"] for p in probes)
        self.results.add(
            Row(
                "d",
                f"warm-path decision in {CONCURRENCY} concurrent processes: spec+key, "
                "then `provision.ensure_env`",
                len(probes),
                f"{statistics.median(specs):.2f} + {statistics.median(decisions):.2f} ms "
                f"(max {max(specs):.1f} + {max(decisions):.1f})",
                "-",
                "in-process, imports excluded",
            )
        )
        self.results.add(
            Row(
                "d",
                "lock held on the warm path (every EnvLock timed from acquired to released)",
                len(probes),
                f"{held:.1f} ms ({taken} locks taken)",
                "-",
                "the warm path takes no lock",
                "<= 5 ms",
                max(p["lock_held_ms"] for p in probes) <= 5.0,
            )
        )

    def concurrently(self, argv: list[str]) -> float:
        started = time.perf_counter()
        procs = [
            subprocess.Popen(
                argv,
                env=self.env,
                cwd=self.work,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            for _ in range(CONCURRENCY)
        ]
        codes = [p.wait() for p in procs]
        elapsed = time.perf_counter() - started
        if any(codes):
            raise CommandFailed(f"{shlex.join(argv)}: exit statuses {codes}")
        return elapsed

    def concurrent_probes(self, root: Path) -> list[dict[str, float]]:
        argv = [
            str(self.python),
            "-c",
            PROBE,
            str(root),
            STANDIN_REQUIREMENT,
            self.offline,
        ]
        with concurrent.futures.ThreadPoolExecutor(CONCURRENCY) as pool:
            outs = list(pool.map(lambda _: self.run_captured(argv), range(CONCURRENCY)))
        return [json.loads(out) for out in outs]

    # -- e. start-up --------------------------------------------------------------------------

    def startup(self) -> None:
        print("e. start-up", flush=True)
        python = str(self.python)
        cases = {
            "python": lambda: self.run([python, "-c", "pass"]),
            "click": lambda: self.run([python, "-c", "import click"]),
            "version": lambda: self.run(self.dbtvenv_argv("--version")),
            "help": lambda: self.run(self.dbtvenv_argv("--help")),
        }
        times = self.interleaved(cases, self.counts.startup, warmup=2)
        med = {name: statistics.median(t) for name, t in times.items()}
        floor = f"`python -c pass` {ms(med['python'])}, `import click` {ms(med['click'])}"
        for name, target in (("version", None), ("help", 150.0)):
            self.results.add(
                Row(
                    "e",
                    f"`dbtvenv --{name}`",
                    self.counts.startup,
                    ms(med[name]),
                    floor,
                    f"+{(med[name] - med['click']) * 1000:.0f} ms over `import click`",
                    "" if target is None else f"< {target:.0f} ms",
                    None if target is None else med[name] * 1000 < target,
                )
            )
        warm = self.importtime(self.standin_args)
        helps = self.importtime(["--help"])
        heavy = [m for m in HEAVY_MODULES if m in warm]
        core_in_help = sorted(m for m in helps if m.startswith("dbtvenv") and m not in CLI_MODULES)
        self.results.add(
            Row(
                "e",
                "heavy imports on the warm path (" + ", ".join(HEAVY_MODULES) + ")",
                self.counts.importtime,
                ", ".join(f"{m} {warm[m][1]:.1f} ms" for m in heavy) or "none",
                "-",
                f"all imports: {sum(v[0] for v in warm.values()):.0f} ms (self times summed)",
                "none",
                not heavy,
            )
        )
        self.results.add(
            Row(
                "e",
                "dbtvenv modules imported by `dbtvenv --help` "
                "besides main, cli, options, errors, redact",
                self.counts.importtime,
                ", ".join(core_in_help) or "none",
                "-",
                "the core loads on first use",
                "none",
                not core_in_help,
            )
        )
        top = sorted(
            ((name, cum, own) for name, (own, cum, depth) in warm.items() if depth == 0),
            key=lambda item: -item[1],
        )
        self.results.imports = [
            f"| `{name}` | {cum:.1f} | {own:.1f} |" for name, cum, own in top[:15]
        ]

    def importtime(self, args: list[str]) -> dict[str, tuple[float, float, int]]:
        """Module -> (median self ms, median cumulative ms, nesting depth) over n runs."""
        runs: dict[str, list[tuple[float, float, int]]] = {}
        argv = [str(self.python), "-X", "importtime", "-m", "dbtvenv", *args]
        for _ in range(self.counts.importtime + 1):
            proc = subprocess.run(
                argv, env=self.env, cwd=self.work, capture_output=True, timeout=120
            )
            if proc.returncode != 0:
                raise CommandFailed(f"{shlex.join(argv)} exited {proc.returncode}")
            for line in proc.stderr.decode(errors="replace").splitlines():
                match = IMPORT_LINE.match(line)
                if match:
                    depth = (len(match["name"]) - len(match["name"].lstrip(" "))) // 2
                    runs.setdefault(match["name"].strip(), []).append(
                        (int(match["own"]) / 1000, int(match["cum"]) / 1000, depth)
                    )
        return {
            name: (
                statistics.median(r[0] for r in rows),
                statistics.median(r[1] for r in rows),
                rows[0][2],
            )
            for name, rows in runs.items()
        }


IMPORT_LINE = re.compile(r"import time:\s+(?P<own>\d+) \|\s+(?P<cum>\d+) \| (?P<name>.*)$")

# Runs in the app venv: times the warm-path decision in-process and every lock it takes.
PROBE = """
import json, sys, time
from pathlib import Path
from dbtvenv import commands, lock, provision
from dbtvenv.progress import Reporter

held, taken = [], [0]
enter, leave = lock.EnvLock.__enter__, lock.EnvLock.__exit__

def timed_enter(self):
    result = enter(self)
    self._bench_acquired = time.perf_counter()
    taken[0] += 1
    return result

def timed_exit(self, *exc):
    held.append(time.perf_counter() - self._bench_acquired)
    return leave(self, *exc)

lock.EnvLock.__enter__, lock.EnvLock.__exit__ = timed_enter, timed_exit
root, requirement, pip_options = sys.argv[1:]
started = time.perf_counter()
options = commands.EnvOptions(
    requirements=(requirement,), pip_install_options=pip_options, venv_dir=root
)
spec, settings = options.spec(), options.settings()
spec.key
resolved = time.perf_counter()
provision.ensure_env(Path(root), spec, settings, Reporter())
done = time.perf_counter()
print(json.dumps({
    "spec_ms": (resolved - started) * 1000,
    "ensure_ms": (done - resolved) * 1000,
    "locks_taken": taken[0],
    "lock_held_ms": sum(held) * 1000,
}))
"""


def distributions(manifest: dict[str, Any] | None) -> set[tuple[str, str]]:
    if manifest is None:
        return set()
    return {
        (re.sub(r"[-_.]+", "-", d["name"]).lower(), d["version"]) for d in manifest["distributions"]
    }


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.0f} ms"


def s(seconds: float) -> str:
    return f"{seconds:.1f} s"


# -- set-up, report -----------------------------------------------------------------------------


def make_app_venv(work: Path) -> Path:
    """A venv with dbtvenv installed from this checkout, as a user installs it (not editable)."""
    venv = work / "app"
    print("installing dbtvenv[uv] from this checkout into a scratch venv", flush=True)
    subprocess.run(
        [getattr(sys, "_base_executable", sys.executable), "-m", "venv", str(venv)], check=True
    )
    installed = subprocess.run(
        [str(venv / "bin" / "python"), "-m", "pip", "install", "-q", f"{REPO}[uv]"],
        cwd=work,
        capture_output=True,
    )
    if installed.returncode != 0:
        raise CommandFailed(f"installing dbtvenv failed:\n{installed.stderr.decode()}")
    return venv


def machine(bench: Bench) -> list[str]:
    py = bench.run_captured(
        [str(bench.python), "-c", "import platform; print(platform.python_version())"]
    )
    versions = bench.run_captured(
        [
            str(bench.python),
            "-c",
            "import importlib.metadata as m\n"
            "for d in ('pip', 'uv', 'click'):\n"
            "    try: print(d, m.version(d), end=', ')\n"
            "    except m.PackageNotFoundError: print(d, 'absent', end=', ')",
        ]
    )
    return [
        cpu_line(),
        f"Python {py.strip()}; in dbtvenv's venv: {versions.strip().rstrip(',')}",
        f"date: {datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}",
        f"pip cache: {bench.pip_cache} for both sides of every pip comparison; pip and uv "
        "both use the public index (no config files, no PIP_*/UV_* index settings)",
    ]


def table(results: Results, header: Sequence[str]) -> str:
    lines = [*(f"- {h}" for h in header), ""]
    lines += [
        "| | measurement | n | dbtvenv | baseline | compared | target | status |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results.rows:
        lines.append(
            f"| {r.section} | {r.what} | {r.n} | {r.dbtvenv} | {r.baseline} | {r.compared} "
            f"| {r.target} | {r.status()} |"
        )
    if results.imports:
        lines += [
            "",
            "Top-level imports of the warm path (`python -X importtime -m dbtvenv dbt ...`), "
            "median ms:",
            "",
            "| module | cumulative | self |",
            "|---|---|---|",
            *results.imports,
        ]
    for note in results.notes:
        lines += ["", note]
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="few repeats (about 2 minutes)")
    parser.add_argument(
        "--sections", default="abcde", help="which sections to run, e.g. 'ae' (default: all)"
    )
    parser.add_argument(
        "--app-venv",
        type=Path,
        help="a venv with dbtvenv already installed (default: install this checkout afresh)",
    )
    parser.add_argument(
        "--pip-cache",
        choices=("warm", "cold"),
        default="warm",
        help="pip cache state for both sides: warm (filled by one untimed build) or cold "
        "(PIP_NO_CACHE_DIR=1, every build downloads)",
    )
    parser.add_argument(
        "--docs",
        type=Path,
        default=REPO / "docs" / "performance.md",
        help="where the table goes (default: docs/performance.md)",
    )
    parser.add_argument("--no-docs", action="store_true", help="only print the table")
    parser.add_argument("--keep", action="store_true", help="keep the scratch dir")
    args = parser.parse_args(argv)
    counts = QUICK if args.quick else FULL
    sections = set(args.sections)
    started = time.monotonic()
    with scratch("bench-dbtvenv-", args.keep) as work:
        app = args.app_venv.absolute() if args.app_venv else make_app_venv(work)
        bench = Bench(work, app, counts, args.pip_cache)
        baseline = bench.cold_pip() if "b" in sections else None
        if "c" in sections:
            bench.cold_uv(baseline)
        if sections & set("ade"):
            bench.standin()
        if "a" in sections:
            real_env = bench.kept.get("pip")
            if real_env is None:
                root = bench.fresh("cache-pip")
                real_env = (root, bench.prepare(root, REAL_REQUIREMENTS, env=None))
            bench.warm_path(real_env)
        if "d" in sections:
            bench.contention()
        if "e" in sections:
            bench.startup()
        order = "abcde"
        bench.results.rows.sort(key=lambda r: order.index(r.section))
        header = [
            *machine(bench),
            f"n: repeats per row; run took {time.monotonic() - started:.0f} s",
        ]
        if args.quick:
            header.append("quick run (--quick): few repeats, rough numbers")
        text = table(bench.results, header)
    print()
    print(text)
    if not args.no_docs and not (args.quick and args.docs == parser.get_default("docs")):
        write_docs(args.docs, text, DOCS_BEGIN, DOCS_END)
        print(f"written to {args.docs}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
