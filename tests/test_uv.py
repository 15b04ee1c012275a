"""`--installer uv`: a real uv fills the env from the offline wheelhouse, under the same key as
pip and with the same distributions; a missing uv is exit 69 with a hint."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from conftest import Result

from dbtvenv.build import find_uv, uv_pip_options
from dbtvenv.errors import BuildError

try:
    UV = find_uv()
except BuildError:  # pragma: no cover - the dev extra brings uv
    pytest.skip(
        "uv is not installed here: pip install -e '.[dev]' (or 'dbtvenv[uv]') brings it",
        allow_module_level=True,
    )

STANDIN = "dbt-standin==1.0.0"
# dbtvenv with the `uv` package hidden, exactly as if `dbtvenv[uv]` had not been installed.
WITHOUT_UV_MODULE = (
    "import sys; sys.modules['uv'] = None; from dbtvenv.main import main; sys.exit(main())"
)


class Runner:
    """`python -m dbtvenv` (or another command line) for module-scoped builds."""

    def __init__(self, pythonpath: str | None, cwd: Path) -> None:
        self.pythonpath = pythonpath
        self.cwd = cwd

    def environ(self, **extra: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("DBTVENV_")}
        if self.pythonpath is not None:
            env["PYTHONPATH"] = os.pathsep.join(
                p for p in (self.pythonpath, env.get("PYTHONPATH")) if p
            )
        env.update(extra)
        return env

    def __call__(self, *args: str | Path, prefix: list[str] | None = None, **extra: str) -> Result:
        argv = [*(prefix or [sys.executable, "-m", "dbtvenv"]), *map(str, args)]
        done = subprocess.run(
            argv,
            env=self.environ(**extra),
            cwd=self.cwd,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=180,
        )
        return Result(done.returncode, done.stdout, done.stderr)


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory, _dbtvenv_pythonpath: str | None) -> Runner:
    return Runner(_dbtvenv_pythonpath, tmp_path_factory.mktemp("cwd"))


@pytest.fixture(scope="module")
def offline(wheelhouse: Path) -> str:
    return f"--no-index --find-links {wheelhouse}"


def spec_args(offline: str, *more: str) -> list[str]:
    return ["--requirements", STANDIN, "--pip-install-options", offline, *more]


@pytest.fixture(scope="module")
def uv_env(tmp_path_factory: pytest.TempPathFactory, run: Runner, offline: str) -> Path:
    """A persistent env built by uv (and used once, by `dbt ARGS`)."""
    cache = tmp_path_factory.mktemp("uv") / "cache"
    result = run("dbt", "--installer", "uv", "--venv-dir", cache, *spec_args(offline), "--", "hi")
    assert result.returncode == 0, result
    report = result.json()
    env_dir = Path(report["prefix"])
    assert env_dir.parent == cache
    assert report["argv"] == ["hi"]
    assert report["version"] == "1.0.0"
    assert report["env"]["VIRTUAL_ENV"] == str(env_dir)
    assert "with uv" in result.err
    assert "Installed 1 package" in result.err  # uv's own summary line: uv did the work
    return env_dir


@pytest.fixture(scope="module")
def pip_env(tmp_path_factory: pytest.TempPathFactory, run: Runner, offline: str) -> Path:
    cache = tmp_path_factory.mktemp("pip") / "cache"
    result = run("env", "prepare", "--installer", "pip", "--venv-dir", cache, *spec_args(offline))
    assert result.returncode == 0, result
    return Path(result.out.strip())


def manifest(env_dir: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((env_dir / "dbtvenv.json").read_text())
    return data


def site_packages(env_dir: Path) -> Path:
    (found,) = (env_dir / "lib").glob("python*/site-packages")
    return found


def test_uv_builds_a_working_env_and_says_so_in_the_manifest(uv_env: Path) -> None:
    data = manifest(uv_env)
    assert data["installer"] == "uv"
    assert data["key"] == uv_env.name
    assert {"name": "dbt-standin", "version": "1.0.0"} in data["distributions"]
    assert os.access(uv_env / "bin" / "dbt", os.X_OK)


def test_uv_installs_the_same_distributions_as_pip_under_the_same_key(
    uv_env: Path, pip_env: Path
) -> None:
    assert uv_env.name == pip_env.name  # the installer is not part of the key
    assert manifest(pip_env)["installer"] == "pip"
    assert manifest(uv_env)["distributions"] == manifest(pip_env)["distributions"]


def test_uv_compiles_bytecode(uv_env: Path) -> None:
    compiled = list((site_packages(uv_env) / "__pycache__").glob("dbt_standin.*.pyc"))
    assert compiled, sorted(p.name for p in site_packages(uv_env).rglob("*"))


def test_env_path_is_the_same_for_both_installers(
    run: Runner, offline: str, tmp_path: Path
) -> None:
    paths = {
        installer: run(
            "env", "path", "--installer", installer, "--venv-dir", tmp_path, *spec_args(offline)
        )
        for installer in ("pip", "uv")
    }
    assert all(r.returncode == 0 for r in paths.values()), paths
    assert paths["pip"].out == paths["uv"].out


def test_an_env_built_by_pip_is_used_as_it_is_by_installer_uv(
    run: Runner, offline: str, pip_env: Path
) -> None:
    result = run(
        "dbt", "--installer", "uv", "--venv-dir", pip_env.parent, *spec_args(offline), "--", "x"
    )
    assert result.returncode == 0, result
    assert result.json()["prefix"] == str(pip_env)
    assert "building" not in result.err
    assert manifest(pip_env)["installer"] == "pip"


@pytest.fixture
def path_without_uv(tmp_path: Path) -> str:
    """A PATH on which no `uv` can be found."""
    empty = tmp_path / "empty-bin"
    empty.mkdir()
    return str(empty)


def test_missing_uv_is_exit_69_with_the_hint(
    run: Runner, offline: str, tmp_path: Path, path_without_uv: str
) -> None:
    cache = tmp_path / "cache"
    result = run(
        "dbt",
        "--installer",
        "uv",
        "--venv-dir",
        cache,
        *spec_args(offline),
        "--",
        "--version",
        prefix=[sys.executable, "-c", WITHOUT_UV_MODULE],
        PATH=path_without_uv,
    )
    assert result.returncode == 69, result
    assert result.out == ""
    lines = result.err.splitlines()
    errors = [line for line in lines if line.startswith("dbtvenv: error:")]
    assert len(errors) == 1, result
    assert "uv is not installed" in errors[0]
    assert "pip install 'dbtvenv[uv]'" in errors[0]
    assert "Traceback" not in result.err
    leftovers = [p.name for p in cache.iterdir()] if cache.exists() else []
    assert all(not (cache / name / "bin").exists() for name in leftovers), leftovers
    assert not [name for name in leftovers if name.endswith(".lock")], leftovers


def test_uv_is_found_on_path_without_the_extra(run: Runner, offline: str, tmp_path: Path) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "uv").symlink_to(UV)
    result = run(
        "env",
        "prepare",
        "--installer",
        "uv",
        "--venv-dir",
        tmp_path / "cache",
        *spec_args(offline),
        prefix=[sys.executable, "-c", WITHOUT_UV_MODULE],
        PATH=str(bin_dir),
    )
    assert result.returncode == 0, result
    assert manifest(Path(result.out.strip()))["installer"] == "uv"


def test_a_uv_failure_is_exit_69_with_uvs_own_lines(
    run: Runner, offline: str, tmp_path: Path
) -> None:
    result = run(
        "env",
        "prepare",
        "--installer",
        "uv",
        "--venv-dir",
        tmp_path / "cache",
        "--requirements",
        "dbt-standin==9.9.9",
        "--pip-install-options",
        offline,
    )
    assert result.returncode == 69, result
    first = result.err.splitlines()
    errors = [line for line in first if line.startswith("dbtvenv: error:")]
    assert len(errors) == 1 and "uv" in errors[0], result
    assert "9.9.9" in result.err  # uv's own explanation follows the error line
    assert "Traceback" not in result.err
    assert [p for p in (tmp_path / "cache").iterdir() if p.is_dir()] == []


def test_pip_options_uv_does_without_are_dropped() -> None:
    options = [
        "--no-index",
        "--find-links",
        "wheels",
        "--progress-bar",
        "off",
        "--no-input",
        "--timeout=30",
        "--retries",
        "3",
        "--disable-pip-version-check",
        "--only-binary=:all:",
    ]
    assert uv_pip_options(options) == [
        "--no-index",
        "--find-links",
        "wheels",
        "--only-binary=:all:",
    ]


def test_uv_builds_with_pip_only_options_in_the_spec(
    run: Runner, offline: str, tmp_path: Path
) -> None:
    pip_only = f"{offline} --progress-bar off --no-input --timeout 30"
    result = run(
        "env",
        "prepare",
        "--installer",
        "uv",
        "--venv-dir",
        tmp_path / "cache",
        "--requirements",
        STANDIN,
        "--pip-install-options",
        pip_only,
    )
    assert result.returncode == 0, result
    data = manifest(Path(result.out.strip()))
    assert data["spec"]["pip_install_options"][-5:] == [
        "--progress-bar",
        "off",
        "--no-input",
        "--timeout",
        "30",
    ]
