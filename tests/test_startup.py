"""Start-up cost: what `--help`, `--version` and a warm run import, and the requirement
spelling that needs no `packaging` (see docs/performance.md)."""

from __future__ import annotations

import json
import os
import pty
import random
import subprocess
import sys
from pathlib import Path

import pytest

from dbtvenv import spec
from dbtvenv.errors import UsageError

HEAVY = ("rich", "psutil", "packaging", "pip", "uv", "importlib.metadata")
# Imports that cost milliseconds and that starting dbt in a complete env does without.
WARM_PATH_NEEDS_NONE = ("click", "dbtvenv.build", "dbtvenv.lock", "dataclasses", "platform")
CORE = (
    "dbtvenv.commands",
    "dbtvenv.provision",
    "dbtvenv.store",
    "dbtvenv.spec",
    "dbtvenv.build",
    "dbtvenv.lock",
    "dbtvenv.procs",
    "dbtvenv.runner",
    "dbtvenv.progress",
)
# Runs dbtvenv's main() in a child, then writes the modules it loaded to argv[1].
LOADED_MODULES = """
import json, sys
from dbtvenv.main import main
out, args = sys.argv[1], sys.argv[2:]
try:
    status = main(args)
finally:
    with open(out, "w") as f:
        json.dump(sorted(sys.modules), f)
sys.exit(status)
"""


def loaded_modules(
    args: list[str], tmp_path: Path, environ: dict[str, str], *, tty: bool = False
) -> tuple[int, set[str]]:
    out = tmp_path / "modules.json"
    argv = [sys.executable, "-c", LOADED_MODULES, str(out), *args]
    if tty:  # stderr on a terminal: the live progress reporter
        controller, terminal = pty.openpty()
        try:
            done = subprocess.run(
                argv,
                env=environ,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=terminal,
                timeout=60,
            )
        finally:
            os.close(terminal)
            os.close(controller)
    else:
        done = subprocess.run(argv, env=environ, capture_output=True, timeout=60)
    return done.returncode, set(json.loads(out.read_text()))


@pytest.fixture
def environ(make_env: object) -> dict[str, str]:
    env: dict[str, str] = make_env({"TERM": "xterm"})  # type: ignore[operator]
    return env


@pytest.mark.parametrize("args", [["--help"], ["--version"], ["run", "--help"], ["env", "--help"]])
def test_help_and_version_load_no_core_module(
    args: list[str], tmp_path: Path, environ: dict[str, str]
) -> None:
    status, modules = loaded_modules(args, tmp_path, environ)
    assert status == 0
    assert not modules & {*CORE, *HEAVY}, sorted(modules & {*CORE, *HEAVY})


@pytest.fixture(scope="module")
def warm_cache(tmp_path_factory: pytest.TempPathFactory, wheelhouse: Path) -> list[str]:
    """dbtvenv's arguments for a warm run (the env exists) of the stand-in."""
    cache = tmp_path_factory.mktemp("startup") / "cache"
    args = [
        "--venv-dir",
        str(cache),
        "--requirements",
        "dbt-standin==1.0.0",
        "--pip-install-options",
        f"--no-index --find-links {wheelhouse}",
    ]
    environ = {k: v for k, v in os.environ.items() if not k.startswith("DBTVENV_")}
    built = subprocess.run(
        [sys.executable, "-m", "dbtvenv", "env", "prepare", *args],
        env=environ,
        capture_output=True,
        timeout=120,
    )
    assert built.returncode == 0, built.stderr.decode()
    return args


@pytest.mark.parametrize("tty", [False, True], ids=["log", "terminal"])
def test_a_warm_run_loads_nothing_heavy(
    warm_cache: list[str], tmp_path: Path, environ: dict[str, str], tty: bool
) -> None:
    status, modules = loaded_modules(
        ["dbt", *warm_cache, "--", "--version"], tmp_path, environ, tty=tty
    )
    assert status == 0
    assert "dbtvenv.runner" in modules  # dbt did run
    unwanted = {*HEAVY, *WARM_PATH_NEEDS_NONE}
    assert not modules & unwanted, sorted(modules & unwanted)


@pytest.mark.parametrize(
    "words",
    [["run"], ["docs", "generate"], ["dbt"]],
    ids=" ".join,
)
def test_a_warm_dbt_command_line_is_parsed_without_click(
    warm_cache: list[str], tmp_path: Path, environ: dict[str, str], words: list[str]
) -> None:
    """The stand-in answers any command; what matters is that dbtvenv got there without Click."""
    status, modules = loaded_modules(
        [*words, "--lock-timeout=5", *warm_cache, "--", "--version"], tmp_path, environ
    )
    assert status == 0
    assert "dbtvenv.runner" in modules
    assert "click" not in modules


SIMPLE = [
    "dbt-core",
    "dbt-core~=1.11.0",
    "DBT_Core ~= 1.11.0",
    "dbt.duckdb==1.9.*",
    "dbt-postgres>=1.7,<1.8",
    "dbt-postgres <1.8 , >=1.7",
    "dbt-core!=1.9.1,>=1.9,!=1.9.1",
    "dbt-core[Foo_Bar, baz]>1",
    "\tdbt-core  ",
    "a",
    "A1.b_c-d==01.00",
]
NOT_SIMPLE = [
    "dbt-core==1.9.0b1",
    "dbt-core ; python_version > '3.8'",
    "dbt-core @ https://example.com/dbt_core-1.9.0-py3-none-any.whl",
    "dbt-core===1.9",
    "dbt-core (>=1.9)",
    "dbt-core[]",
]
MALFORMED = ["dbt-core~=1", "dbt-core==1.*.0", "-dbt", "dbt-core>=", "dbt core"]


def _with_packaging(text: str, monkeypatch: pytest.MonkeyPatch) -> str:
    with monkeypatch.context() as patch:
        patch.setattr(spec, "_normalise_simple", lambda text: None)
        return spec.normalise_requirement(text)


@pytest.mark.parametrize("text", SIMPLE)
def test_simple_requirements_are_normalised_as_packaging_does(
    text: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert spec._normalise_simple(text) is not None  # the fast spelling applies
    assert spec.normalise_requirement(text) == _with_packaging(text, monkeypatch)


@pytest.mark.parametrize("text", NOT_SIMPLE)
def test_other_requirements_go_to_packaging(text: str, monkeypatch: pytest.MonkeyPatch) -> None:
    assert spec._normalise_simple(text) is None
    assert spec.normalise_requirement(text) == _with_packaging(text, monkeypatch)


@pytest.mark.parametrize("text", MALFORMED)
def test_malformed_requirements_are_still_usage_errors(text: str) -> None:
    with pytest.raises(UsageError):
        spec.normalise_requirement(text)


def test_the_fast_spelling_agrees_with_packaging_on_random_input(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    pieces = [*"aZ9._-[], \t*=<>!~;@", "==", "~=", ">=", "1.0", "dbt-core", "[x]", ".*", "b1"]
    rng = random.Random(20261124)
    checked = 0
    for _ in range(5000):
        text = "".join(rng.choice(pieces) for _ in range(rng.randint(1, 8)))
        fast = spec._normalise_simple(text)
        if fast is None:
            continue
        checked += 1
        try:
            slow = _with_packaging(text, monkeypatch)
        except UsageError:
            slow = "<malformed>"
        assert fast == slow, text
    assert checked > 100
