"""A real Airflow (with Cosmos) in its own venv, shared by the Airflow and the Cosmos tests:
the venv holds Airflow, astronomer-cosmos and dbtvenv (installed from this repository), and no
dbt. `install_airflow` builds it once per session (the `airflow` fixture in conftest)."""

from __future__ import annotations

import contextlib
import os
import shutil
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import psutil
from procs import kill_quietly

AIRFLOW_VERSION = "3.3.2"
COSMOS_VERSION = "1.15.1"  # ~=: any 1.15.x from 1.15.1 on
REPO_ROOT = Path(__file__).resolve().parent.parent
DAGS_DIR = REPO_ROOT / "examples" / "airflow" / "dags"

# Variables of the test runner's environment that must not leak into Airflow or dbtvenv.
SCRUBBED_PREFIXES = ("DBTVENV_", "AIRFLOW_", "AIRFLOW__", "DBT_", "STANDIN_")
SCRUBBED = ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "TMPDIR")


@dataclass(frozen=True)
class Completed:
    returncode: int
    output: str

    def __str__(self) -> str:
        return f"exit status {self.returncode}\n--- output (last 200 lines)\n" + "\n".join(
            self.output.splitlines()[-200:]
        )


@dataclass(frozen=True)
class TaskState:
    state: str | None
    try_number: int


@dataclass(frozen=True)
class Airflow:
    """A throw-away Airflow installation: its venv, its home and its SQLite metadata DB."""

    venv: Path
    home: Path
    db: Path

    @property
    def python(self) -> Path:
        return self.venv / "bin" / "python"

    @property
    def dbtvenv(self) -> Path:
        return self.venv / "bin" / "dbtvenv"

    def environ(self, extra: Mapping[str, str] | None = None) -> dict[str, str]:
        env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith(SCRUBBED_PREFIXES) and k not in SCRUBBED
        }
        env.update(
            AIRFLOW_HOME=str(self.home),
            AIRFLOW__CORE__LOAD_EXAMPLES="False",
            AIRFLOW__CORE__DAGS_FOLDER=str(DAGS_DIR),
            AIRFLOW__DATABASE__SQL_ALCHEMY_CONN=f"sqlite:///{self.db}",
            PYTHONWARNINGS="ignore",
            PYTHONDONTWRITEBYTECODE="1",  # parsing the DAGs leaves no __pycache__ in the repo
            DBTVENV_BIN=str(self.dbtvenv),
            AIRFLOW__COSMOS__CACHE_DIR=str(self.home / "cosmos"),
            AIRFLOW__COSMOS__ENABLE_TELEMETRY="False",  # no network here but package registries
            DO_NOT_TRACK="1",
        )
        env.update(extra or {})
        return env

    def run(
        self, *argv: str, extra: Mapping[str, str] | None = None, timeout: float = 600
    ) -> Completed:
        done = subprocess.run(
            list(argv),
            env=self.environ(extra),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            timeout=timeout,
        )
        return Completed(done.returncode, done.stdout.decode("utf-8", errors="replace"))

    def airflow(self, *args: str, extra: Mapping[str, str] | None = None) -> Completed:
        return self.run(str(self.venv / "bin" / "airflow"), *args, extra=extra)

    def start_dags_test(
        self, dag_id: str, extra: Mapping[str, str], log: Path, *, new_session: bool = False
    ) -> _Running:
        """`airflow dags test` in the background; with `new_session`, in a process group of
        its own, as a worker's task process is (so the test can signal that group)."""
        out = log.open("wb")
        proc = subprocess.Popen(
            [str(self.venv / "bin" / "airflow"), "dags", "test", dag_id],
            env=self.environ(extra),
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=new_session,
        )
        return _Running(proc, out, log)

    def task_states(self, dag_id: str) -> dict[str, TaskState]:
        """The task states of the newest run of `dag_id`, read from the metadata DB."""
        last_error: sqlite3.Error | None = None
        for _ in range(100):  # the DB may be locked for a moment by a running Airflow
            try:
                with contextlib.closing(
                    sqlite3.connect(f"file:{self.db}?mode=ro", uri=True, timeout=5)
                ) as con:
                    rows = con.execute(
                        "SELECT task_id, state, try_number FROM task_instance WHERE run_id = "
                        "(SELECT run_id FROM dag_run WHERE dag_id = ? ORDER BY id DESC LIMIT 1)"
                        " AND dag_id = ?",
                        (dag_id, dag_id),
                    ).fetchall()
                return {task: TaskState(state, tries) for task, state, tries in rows}
            except sqlite3.OperationalError as exc:
                last_error = exc
                time.sleep(0.1)
        raise AssertionError(f"cannot read {self.db}: {last_error}")


@dataclass(frozen=True)
class _Running:
    proc: subprocess.Popen[bytes]
    out: IO[bytes]
    log: Path

    def wait(self, timeout: float = 600) -> Completed:
        try:
            self.proc.wait(timeout=timeout)
        finally:
            if self.proc.poll() is None:
                kill_quietly([self.proc.pid])
                self.proc.wait()
            self.out.close()
        return Completed(
            self.proc.returncode, self.log.read_bytes().decode("utf-8", errors="replace")
        )


def _check(done: subprocess.CompletedProcess[bytes], what: str) -> None:
    if done.returncode != 0:
        tail = "\n".join(done.stdout.decode("utf-8", errors="replace").splitlines()[-60:])
        raise AssertionError(f"{what} failed with exit status {done.returncode}:\n{tail}")


def _sh(argv: Sequence[str], what: str, timeout: float = 900) -> str:
    done = subprocess.run(
        list(argv),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        timeout=timeout,
        env={k: v for k, v in os.environ.items() if k not in SCRUBBED},
    )
    _check(done, what)
    return done.stdout.decode("utf-8", errors="replace")


def _source_copy(dest: Path) -> Path:
    """dbtvenv's sources, copied so that building the wheel leaves nothing in the repository."""
    dest.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO_ROOT / name, dest / name)
    shutil.copytree(
        REPO_ROOT / "dbtvenv", dest / "dbtvenv", ignore=shutil.ignore_patterns("__pycache__")
    )
    return dest


def install_airflow(base: Path) -> Airflow:
    """Airflow, Cosmos and dbtvenv (from this repository, not editable) in one venv under
    `base`, and a migrated DB: what the Airflow and the Cosmos tests share, built once."""
    venv = base / "venv"
    _sh([sys.executable, "-m", "venv", str(venv)], "creating the Airflow venv")
    pip = [str(venv / "bin" / "python"), "-m", "pip", "--disable-pip-version-check"]
    _sh([*pip, "install", "-q", "--upgrade", "pip"], "upgrading pip")
    source = _source_copy(base / "dbtvenv-src")
    _sh(
        [
            *pip,
            "install",
            "-q",
            f"apache-airflow=={AIRFLOW_VERSION}",
            f"astronomer-cosmos~={COSMOS_VERSION}",
            str(source),
        ],
        f"installing apache-airflow=={AIRFLOW_VERSION}, astronomer-cosmos~={COSMOS_VERSION} "
        "and dbtvenv",
    )
    check = _sh([*pip, "check"], "pip check in the Airflow venv")
    assert "No broken requirements found" in check, check

    home = base / "home"
    home.mkdir()
    installed = Airflow(venv=venv, home=home, db=base / "airflow.db")
    migrated = installed.airflow("db", "migrate")
    assert migrated.returncode == 0, f"airflow db migrate\n{migrated}"
    version = installed.airflow("version")
    assert version.output.strip().splitlines()[-1] == AIRFLOW_VERSION, str(version)
    return installed


def marked_processes(mark: str) -> list[psutil.Process]:
    """Every process whose environment holds STANDIN_MARK=mark (a task and all it started)."""
    found = []
    for proc in psutil.process_iter():
        with contextlib.suppress(psutil.Error):
            if proc.environ().get("STANDIN_MARK") == mark:
                found.append(proc)
    return found


def wait_until(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() >= deadline:
            raise AssertionError(f"not within {timeout} s: {what}")
        time.sleep(0.1)
