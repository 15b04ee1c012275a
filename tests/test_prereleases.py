"""The dbt you asked for, offline: a local index with the shape that bit dbt-postgres 1.8.0
users (an adapter that requires `dbt-core>=1.8.0a1`, dbt-core finals and a newer pre-release).

Without the implied pin, pip takes the pre-release and the build fails naming it, who let it in
and the pin that keeps it out; uv is told to disallow pre-releases and takes the newest final.
With the implied pin, both take the adapter's own line. `--pre`, or a pre-release named by the
user, lets one in.
"""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path
from typing import Any

import pytest
from conftest import RunDbtvenv
from lockfaults import WheelServer
from standin import STANDIN_SOURCE, write_wheel

from dbtvenv import prereleases
from dbtvenv.spec import resolve_spec

CORE_FINALS = ("1.8.0", "1.8.1", "1.9.0")
CORE_PRE = "2.0.0rc1"
ADAPTER = "dbt-postgres==1.8.0"


@pytest.fixture(scope="module")
def dbt_index(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Fake dbt-core releases (each with a `dbt` executable) and a fake dbt-postgres 1.8.0."""
    index = tmp_path_factory.mktemp("dbt-index")
    for version in (*CORE_FINALS, CORE_PRE):
        write_wheel(
            index,
            "dbt-core",
            version,
            {"dbt_fake_core.py": STANDIN_SOURCE},
            entry_points="[console_scripts]\ndbt = dbt_fake_core:main\n",
            summary="A stand-in dbt-core (dbtvenv tests)",
        )
    write_wheel(
        index,
        "dbt-duckdb",
        "1.9.0",
        {"dbt_fake_duckdb.py": "VALUE = 1\n"},
        requires=["dbt-core>=1.8.0", "duckdb-nightly"],
        summary="An adapter that needs a dependency with no final release yet",
    )
    write_wheel(
        index,
        "duckdb-nightly",
        "0.1.0.dev1",
        {"duckdb_nightly.py": "VALUE = 1\n"},
        summary="Pre-releases only",
    )
    write_wheel(
        index,
        "dbt-postgres",
        "1.8.0",
        {"dbt_fake_postgres.py": "VALUE = 1\n"},
        requires=["dbt-core>=1.8.0a1"],
        summary="An adapter that lets pre-releases of dbt-core in, as dbt-postgres 1.8.0 does",
    )
    return index


@pytest.fixture
def offline(dbt_index: Path) -> list[str]:
    return ["--pip-install-options", f"--no-index --find-links {dbt_index}"]


def manifest(env_dir: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((env_dir / "dbtvenv.json").read_text())
    return data


def versions(env_dir: Path) -> dict[str, str]:
    return {d["name"]: d["version"] for d in manifest(env_dir)["distributions"]}


def test_pip_landing_on_an_unasked_pre_release_fails_and_says_why(
    dbtvenv: RunDbtvenv, cache_dir: Path, offline: list[str]
) -> None:
    spec = ["--requirements", ADAPTER, "--no-implied-pins", *offline]
    result = dbtvenv("env", "prepare", "--venv-dir", cache_dir, *spec)
    assert result.returncode == 69, result
    (error,) = [line for line in result.err.splitlines() if line.startswith("dbtvenv: error:")]
    assert error == (
        "dbtvenv: error: dbt-core 2.0.0rc1 is a pre-release, and nothing you gave asks for one: "
        "dbt-postgres 1.8.0 requires dbt-core>=1.8.0a1, which let the installer choose it; keep "
        "it to a final release with a constraint such as 'dbt-core<2.0.0' (--constraints FILE, "
        "or --requirements 'dbt-core<2.0.0'), or accept pre-releases with --pip-install-options "
        "--pre"
    )
    assert not [p for p in cache_dir.iterdir() if p.is_dir() and not p.name.startswith(".")]

    # The pin the message suggests works.
    fixed = dbtvenv(
        "env", "prepare", "--venv-dir", cache_dir, *spec, "--requirements", "dbt-core<2.0.0"
    )
    assert fixed.returncode == 0, fixed
    assert versions(Path(fixed.out.strip()))["dbt-core"] == "1.9.0"


def test_uv_takes_no_pre_release_from_a_dependency(
    dbtvenv: RunDbtvenv, cache_dir: Path, offline: list[str]
) -> None:
    spec = ["--requirements", ADAPTER, "--no-implied-pins", "--installer", "uv", *offline]
    result = dbtvenv("env", "prepare", "--venv-dir", cache_dir, *spec)
    assert result.returncode == 0, result
    assert versions(Path(result.out.strip()))["dbt-core"] == "1.9.0"


@pytest.mark.parametrize(
    ("installer", "error"),
    [
        (
            "pip",
            "dbtvenv: error: duckdb-nightly 0.1.0.dev1 is a pre-release, and nothing you gave asks "
            "for one: no final release of it fits what requires it (dbt-duckdb 1.9.0 requires "
            "duckdb-nightly); accept pre-releases with --pip-install-options --pre, or require a "
            "version of duckdb-nightly that has a final release",
        ),
        (
            "uv",
            "dbtvenv: error: uv found only pre-releases for part of the requirements, and nothing "
            "you gave asks for one; name the pre-release you want in --requirements, or accept "
            "pre-releases with --pip-install-options --pre (uv's lines below name it)",
        ),
    ],
)
def test_a_dependency_with_only_pre_releases_is_refused(
    dbtvenv: RunDbtvenv, cache_dir: Path, offline: list[str], installer: str, error: str
) -> None:
    spec = ["--requirements", "dbt-duckdb==1.9.0", "--installer", installer, *offline]
    result = dbtvenv("env", "prepare", "--venv-dir", cache_dir, *spec)
    assert result.returncode == 69, result
    assert error in result.err.splitlines(), result
    if installer == "uv":
        assert "duckdb-nightly" in result.err.split(error, 1)[1]  # uv's own lines follow


@pytest.mark.parametrize("installer", ["pip", "uv"])
def test_the_adapter_pin_gets_its_own_dbt_line(
    dbtvenv: RunDbtvenv, cache_dir: Path, offline: list[str], installer: str
) -> None:
    spec = ["--requirements", ADAPTER, "--installer", installer, *offline]
    result = dbtvenv("env", "prepare", "--venv-dir", cache_dir, *spec)
    assert result.returncode == 0, result
    env_dir = Path(result.out.strip())
    assert versions(env_dir)["dbt-core"] == "1.8.1"
    assert manifest(env_dir)["implied_pins"] == ["dbt-core~=1.8.0"]
    assert (
        "dbt-postgres==1.8.0 asks for the dbt 1.8 line: constraining dbt-core to ~=1.8.0 "
        "(--no-implied-pins lets the installer choose)"
    ) in result.err
    summary = result.err.splitlines()[-1]
    assert f": dbt-core 1.8.1, dbt-postgres 1.8.0 (2 distributions, {installer})" in summary

    off = dbtvenv("env", "path", "--venv-dir", cache_dir, "--no-implied-pins", *spec)
    assert off.returncode == 0, off
    assert off.out.strip() != str(env_dir), "the implied pin is part of the key"
    listed = dbtvenv("env", "list", "--venv-dir", cache_dir, "--json")
    assert listed.returncode == 0, listed
    (entry,) = json.loads(listed.out)
    assert entry["implied_pins"] == ["dbt-core~=1.8.0"] and entry["dbt_core"] == "1.8.1"


@pytest.mark.parametrize("installer", ["pip", "uv"])
def test_pre_releases_asked_for_are_installed(
    dbtvenv: RunDbtvenv, cache_dir: Path, dbt_index: Path, installer: str
) -> None:
    offline = f"--no-index --find-links {dbt_index}"
    pre = dbtvenv(
        "env",
        "prepare",
        "--installer",
        installer,
        "--venv-dir",
        cache_dir,
        "--requirements",
        ADAPTER,
        "--pip-install-options",
        f"--pre {offline}",
    )
    assert pre.returncode == 0, pre
    assert versions(Path(pre.out.strip()))["dbt-core"] == CORE_PRE
    assert "--pre: dbt-core is not constrained to the dbt 1.8 line" in pre.err

    named = dbtvenv(
        "env",
        "prepare",
        "--installer",
        installer,
        "--venv-dir",
        cache_dir,
        "--requirements",
        ADAPTER,
        "--requirements",
        f"dbt-core=={CORE_PRE}",
        "--pip-install-options",
        offline,
    )
    assert named.returncode == 0, named
    assert versions(Path(named.out.strip()))["dbt-core"] == CORE_PRE


@pytest.mark.parametrize(
    ("options", "environ", "asked"),
    [
        ("", {}, None),
        ("--pre", {}, "--pre in --pip-install-options"),
        ("--prerelease=allow", {}, "--prerelease allow in --pip-install-options"),
        ("--prerelease disallow", {}, None),
        ("", {"PIP_PRE": "1"}, "PIP_PRE"),
        ("", {"UV_PRERELEASE": "if-necessary"}, "UV_PRERELEASE"),
        ("", {"UV_PRERELEASE": "disallow"}, None),
    ],
)
def test_what_asks_for_pre_releases(
    options: str, environ: dict[str, str], asked: str | None
) -> None:
    spec = resolve_spec(
        requirements=["dbt-postgres==1.8.0"],
        requirements_files=[],
        constraints_files=[],
        pip_install_options=options,
        python=None,
        system_site_packages=False,
    )
    assert prereleases.asked_for(spec, environ) == asked


def test_a_pre_release_named_in_a_constraints_file_asks_for_it(tmp_path: Path) -> None:
    constraints = tmp_path / "constraints.txt"
    constraints.write_text("# testing the next dbt\ndbt-core==1.11.0rc1  # the candidate\n")
    spec = resolve_spec(
        requirements=["dbt-postgres"],
        requirements_files=[],
        constraints_files=[str(constraints)],
        pip_install_options=None,
        python=None,
        system_site_packages=False,
    )
    assert prereleases.asked_for(spec, {}) == "dbt-core==1.11.0rc1"
    assert prereleases.uv_options(spec) == []
    plain = spec._replace(constraints_files=())
    assert prereleases.asked_for(plain, {}) is None


def _sdist_whose_build_fails(index: Path, name: str, version: str) -> None:
    """As dbt-core 2.0.0rc9's: its build downloads a binary from outside the registry."""
    base = f"{name.replace('-', '_')}-{version}"
    files = {
        "pyproject.toml": "[build-system]\nrequires = []\nbuild-backend = 'backend'\n"
        f"backend-path = ['.']\n\n[project]\nname = '{name}'\nversion = '{version}'\n",
        "backend.py": "def _fail(*args, **kwargs):\n"
        "    raise RuntimeError('failed to download https://github.invalid/dbt.whl')\n"
        "build_wheel = prepare_metadata_for_build_wheel = build_sdist = _fail\n",
        "PKG-INFO": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n",
    }
    with tarfile.open(index / f"{base}.tar.gz", "w:gz") as tar:
        for path, text in files.items():
            data = text.encode()
            info = tarfile.TarInfo(f"{base}/{path}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_a_pre_release_that_fails_to_build_is_named_not_pips_hint_about_pre(
    dbtvenv: RunDbtvenv, cache_dir: Path, tmp_path: Path
) -> None:
    index = tmp_path / "index"
    write_wheel(
        index,
        "dbt-core",
        "1.10.4",
        {"dbt_fake_core.py": STANDIN_SOURCE},
        entry_points="[console_scripts]\ndbt = dbt_fake_core:main\n",
    )
    write_wheel(
        index, "dbt-postgres", "1.10.0", {"dbt_fake_pg.py": ""}, requires=["dbt-core>=1.8.0rc1"]
    )
    _sdist_whose_build_fails(index, "dbt-core", "2.0.0rc9")
    spec = ["--requirements", "dbt-postgres==1.10.0", "--no-implied-pins"]
    with WheelServer(index) as server:  # as a registry says it: Collecting X (from Y)
        offline = ["--pip-install-options", server.pip_options]
        result = dbtvenv("env", "prepare", "--venv-dir", cache_dir, *spec, *offline)
    assert result.returncode == 69, result
    (error,) = [line for line in result.err.splitlines() if line.startswith("dbtvenv: error:")]
    assert error == (
        "dbtvenv: error: pip chose dbt-core 2.0.0rc9, a pre-release nothing you gave asks for "
        "(dbt-postgres==1.10.0 requires dbt-core>=1.8.0rc1, which let it choose one), and could "
        "not install it; keep it to a final release with a constraint such as 'dbt-core<2.0.0' "
        "(--constraints FILE, or --requirements 'dbt-core<2.0.0'), or the dbt line "
        "dbt-postgres==1.10.0 asks for: 'dbt-core~=1.10.0'"
    )
    fixed = dbtvenv(
        "env", "prepare", "--venv-dir", cache_dir, *spec, "--requirements", "dbt-core<2.0.0",
        "--pip-install-options", f"--no-index --find-links {index}",
    )  # fmt: skip
    assert fixed.returncode == 0, fixed
    assert versions(Path(fixed.out.strip()))["dbt-core"] == "1.10.4"
