"""Shared fixtures: the offline stand-in wheelhouse and a runner for ``python -m dbtvenv``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, Union

import pytest
from standin import build_wheelhouse

if TYPE_CHECKING:  # lockfaults itself imports this module
    from airflowenv import Airflow
    from lockfaults import WheelServer

REPO_ROOT = Path(__file__).resolve().parent.parent

StrPath = Union[str, os.PathLike[str]]  # a runtime alias: no `|` on Python 3.9


@dataclass(frozen=True)
class Result:
    """Outcome of one ``python -m dbtvenv`` run."""

    returncode: int
    stdout: bytes
    stderr: bytes

    @property
    def out(self) -> str:
        return self.stdout.decode("utf-8", errors="replace")

    @property
    def err(self) -> str:
        return self.stderr.decode("utf-8", errors="replace")

    def json(self) -> dict[str, Any]:
        """Stdout parsed as exactly one JSON object (the stand-in dbt's report)."""
        try:
            value = json.loads(self.stdout)
        except ValueError as exc:
            raise AssertionError(f"stdout is not one JSON object ({exc}):\n{self}") from exc
        if not isinstance(value, dict):
            raise AssertionError(f"stdout is JSON but not an object:\n{self}")
        return value

    def __str__(self) -> str:
        return f"exit status {self.returncode}\n--- stdout\n{self.out}\n--- stderr\n{self.err}"


class RunDbtvenv(Protocol):
    def __call__(
        self,
        *args: StrPath,
        env: Mapping[str, str | None] | None = None,
        cwd: StrPath | None = None,
        timeout: float = 120,
        input: bytes | str | None = None,
    ) -> Result: ...


class MakeEnv(Protocol):
    def __call__(self, extra: Mapping[str, str | None] | None = None) -> dict[str, str]: ...


@pytest.fixture(scope="session")
def wheelhouse(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory with the stand-in wheels (see tests/standin.py), built once per session."""
    return build_wheelhouse(tmp_path_factory.mktemp("wheelhouse"))


@pytest.fixture
def pip_offline_options(wheelhouse: Path) -> str:
    """Value for dbtvenv's ``--pip-install-options``: install from the wheelhouse only."""
    return f"--no-index --find-links {wheelhouse}"


@pytest.fixture
def standin_env(pip_offline_options: str) -> dict[str, str]:
    """dbtvenv settings that build an environment with the stand-in dbt, offline."""
    return {
        "DBTVENV_REQUIREMENTS": "dbt-standin==1.0.0",
        "DBTVENV_PIP_INSTALL_OPTIONS": pip_offline_options,
    }


@pytest.fixture
def cache_dir(tmp_path: Path) -> Path:
    """Where a test keeps dbtvenv's cache (not created)."""
    return tmp_path / "cache"


@pytest.fixture(scope="session")
def _dbtvenv_pythonpath(tmp_path_factory: pytest.TempPathFactory) -> str | None:
    """The repository root if ``dbtvenv`` is not importable from elsewhere (not installed).

    ``python -m dbtvenv`` finds the package through the working directory only when that is
    the repository root; tests run it from temporary directories, so then the root goes on
    dbtvenv's PYTHONPATH (dbtvenv itself keeps PYTHONPATH away from dbt and pip).
    """
    check = subprocess.run(
        [sys.executable, "-c", "import dbtvenv"],
        cwd=tmp_path_factory.mktemp("import-check"),
        env=_base_environ(),
        capture_output=True,
        timeout=60,
    )
    return None if check.returncode == 0 else str(REPO_ROOT)


def _base_environ() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("DBTVENV_")}


def prepare_standin_env(cache: Path, wheelhouse: Path, pythonpath: str | None) -> Path:
    """`dbtvenv env prepare` of dbt-standin==1.0.0 into `cache`, for a module-wide fixture
    (which cannot use the function-scoped `dbtvenv`); returns the env's path."""
    environ = _base_environ()
    if pythonpath is not None:
        environ["PYTHONPATH"] = pythonpath
    spec = ["--requirements", "dbt-standin==1.0.0"]
    offline = ["--pip-install-options", f"--no-index --find-links {wheelhouse}"]
    completed = subprocess.run(
        [
            sys.executable,
            "-m",
            "dbtvenv",
            "env",
            "prepare",
            *spec,
            *offline,
            "--venv-dir",
            str(cache),
        ],
        env=environ,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        timeout=300,
    )
    assert completed.returncode == 0, completed.stderr.decode()
    return Path(completed.stdout.decode().strip())


@pytest.fixture
def make_env(_dbtvenv_pythonpath: str | None) -> MakeEnv:
    """Build the environment for a dbtvenv child: ``os.environ`` without ``DBTVENV_*``,
    updated with ``extra`` (a ``None`` value removes the variable)."""

    def make(extra: Mapping[str, str | None] | None = None) -> dict[str, str]:
        environ = _base_environ()
        for key, value in (extra or {}).items():
            if value is None:
                environ.pop(key, None)
            else:
                environ[key] = value
        if _dbtvenv_pythonpath is not None:
            rest = environ.get("PYTHONPATH")
            environ["PYTHONPATH"] = os.pathsep.join(p for p in (_dbtvenv_pythonpath, rest) if p)
        return environ

    return make


@pytest.fixture
def dbtvenv_cmd() -> list[str]:
    """The command line that starts dbtvenv, for tests that use Popen themselves
    (give them ``make_env(...)`` as the environment)."""
    return [sys.executable, "-m", "dbtvenv"]


@pytest.fixture
def dbtvenv(dbtvenv_cmd: list[str], make_env: MakeEnv) -> RunDbtvenv:
    """Run ``python -m dbtvenv *args`` to completion and capture its output."""

    def run(
        *args: StrPath,
        env: Mapping[str, str | None] | None = None,
        cwd: StrPath | None = None,
        timeout: float = 120,
        input: bytes | str | None = None,
    ) -> Result:
        completed = subprocess.run(
            [*dbtvenv_cmd, *(os.fspath(arg) for arg in args)],
            env=make_env(env),
            cwd=cwd,
            input=input.encode("utf-8") if isinstance(input, str) else input,
            stdin=None if input is not None else subprocess.DEVNULL,
            capture_output=True,
            timeout=timeout,
        )
        return Result(completed.returncode, completed.stdout, completed.stderr)

    return run


@pytest.fixture(scope="module")
def wheel_server(wheelhouse: Path) -> Iterator[WheelServer]:
    """The wheelhouse served on 127.0.0.1, counting downloads and able to stall them."""
    from lockfaults import WheelServer

    with WheelServer(wheelhouse) as running:
        yield running


@pytest.fixture
def wheels(wheel_server: WheelServer) -> Iterator[WheelServer]:
    wheel_server.reset()
    yield wheel_server
    wheel_server.release()


@pytest.fixture(scope="session")
def airflow(tmp_path_factory: pytest.TempPathFactory) -> Airflow:
    """A real Airflow with Cosmos and dbtvenv in its own venv, built once for every test that
    needs it (tests/airflowenv.py)."""
    from airflowenv import install_airflow

    return install_airflow(tmp_path_factory.mktemp("airflow"))
