"""Known breakage: old dbt releases with dependency versions known to break them (repaired;
tests/test_postgres.py shows a repaired dbt-postgres 1.7 running on a real server), and installs
that are slow or fail for reasons the installer's output hides."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import pytest
from conftest import RunDbtvenv

from dbtvenv.compat import explain_failure, repairs, source_build_note
from dbtvenv.spec import EnvSpec, resolve_spec


@pytest.mark.parametrize(
    ("distributions", "expected"),
    [
        ([("dbt-core", "1.7.0"), ("protobuf", "5.29.1")], ["protobuf<5"]),
        ([("DBT_Core", "1.5.11"), ("Protobuf", "6.30.0")], ["protobuf<5"]),
        ([("dbt-core", "1.7.20"), ("protobuf", "4.25.3")], []),  # pins protobuf<5 itself
        ([("dbt-core", "1.11.16"), ("protobuf", "6.30.0")], []),
        ([("dbt-core", "1.7.0")], []),
        ([("protobuf", "5.29.1")], []),
        ([("dbt-core", "not a version"), ("protobuf", "5.29.1")], []),
    ],
)
def test_repairs(distributions: list[tuple[str, str]], expected: list[str]) -> None:
    assert [fix.requirement for fix in repairs(distributions)] == expected


def test_a_repair_says_what_and_why() -> None:
    (fix,) = repairs([("dbt-core", "1.7.0"), ("protobuf", "5.29.1")])
    assert fix.reason.startswith("dbt-core 1.7.0 does not work with protobuf 5.29.1: ")


def _spec(*requirements: str, no_implied_pins: bool = False) -> EnvSpec:
    return resolve_spec(
        requirements=requirements,
        requirements_files=[],
        constraints_files=[],
        pip_install_options=None,
        python=None,
        system_site_packages=False,
        no_implied_pins=no_implied_pins,
    )


PARSER_FAILURE = "error: subprocess-exited-with-error\n  dbt-core-experimental-parser 2.0.8 ..."


def test_the_experimental_parser_names_the_line_the_user_asked_for() -> None:
    said = explain_failure("pip", PARSER_FAILURE, _spec("dbt-snowflake==1.12"))
    assert said is not None
    assert said.startswith(
        "pip could not install dbt-core-experimental-parser, which dbt-core 1.12 and later pull "
        "in and which downloads a binary from outside the package registry at install time: "
    )
    assert said.endswith(
        "the dbt 1.12 line, which dbt-snowflake==1.12 asks for, needs it; behind a registry-only "
        "proxy pin an older line, e.g. --requirements 'dbt-snowflake~=1.11.0'"
    )
    unpinned = explain_failure(
        "uv", PARSER_FAILURE, _spec("dbt-postgres==1.9", no_implied_pins=True)
    )
    assert unpinned is not None and unpinned.endswith(
        "dbt-core was not constrained, so the newest was chosen; for the dbt line "
        "dbt-postgres==1.9 asks for, add --requirements 'dbt-core~=1.9.0'"
    )
    named = explain_failure("pip", PARSER_FAILURE, _spec("dbt-core>=1.8", "dbt-duckdb"))
    assert named is not None and named.endswith(
        "dbt-core>=1.8 lets it in; behind a registry-only proxy pin a dbt-core line before 1.12, "
        "e.g. --requirements 'dbt-core~=1.11.0'"
    )


@pytest.mark.parametrize(
    "line",
    ["  Building wheel for psycopg2 (pyproject.toml): started", "Building psycopg2==2.9.10"],
)
def test_a_source_build_of_psycopg2_is_explained_as_it_starts(line: str) -> None:
    note = source_build_note(line)
    assert note is not None
    assert note.startswith("building psycopg2 from source: dbt-postgres 1.8.0 requires psycopg2")
    assert note.endswith("dbt-postgres~=1.8.0 installs 1.8.2, which takes the binary wheel")
    assert source_build_note("  Building wheel for agate (pyproject.toml): started") is None


def _failing_psycopg2(where: Path) -> None:
    """An sdist named psycopg2 whose build fails as it does without PostgreSQL's headers."""
    name = "psycopg2-2.9.10"
    files = {
        "pyproject.toml": "[build-system]\nrequires = []\nbuild-backend = 'backend'\n"
        "backend-path = ['.']\n\n[project]\nname = 'psycopg2'\nversion = '2.9.10'\n",
        "backend.py": "import os\n\n"
        "def prepare_metadata_for_build_wheel(directory, settings=None):\n"
        "    info = os.path.join(directory, 'psycopg2-2.9.10.dist-info')\n"
        "    os.makedirs(info)\n"
        "    with open(os.path.join(info, 'METADATA'), 'w') as f:\n"
        "        f.write('Metadata-Version: 2.1\\nName: psycopg2\\nVersion: 2.9.10\\n')\n"
        "    return 'psycopg2-2.9.10.dist-info'\n\n"
        "def build_wheel(*args, **kwargs):\n"
        "    raise RuntimeError('pg_config executable not found.')\n",
        "PKG-INFO": "Metadata-Version: 2.1\nName: psycopg2\nVersion: 2.9.10\n",
    }
    with tarfile.open(where / f"{name}.tar.gz", "w:gz") as tar:
        for path, text in files.items():
            data = text.encode()
            info = tarfile.TarInfo(f"{name}/{path}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_a_failed_source_build_of_psycopg2_says_why_and_what_to_pin(
    dbtvenv: RunDbtvenv, tmp_path: Path
) -> None:
    _failing_psycopg2(tmp_path)
    options = f"--no-index --find-links {tmp_path}"
    result = dbtvenv(
        "env", "prepare", "--venv-dir", tmp_path / "cache",
        "--requirements", "psycopg2", "--pip-install-options", options,
    )  # fmt: skip
    assert result.returncode == 69, result
    assert "dbtvenv: building psycopg2 from source: dbt-postgres 1.8.0 requires" in result.err
    (error,) = [line for line in result.err.splitlines() if line.startswith("dbtvenv: error:")]
    assert error.startswith("dbtvenv: error: pip could not build psycopg2 from source: ")
    assert error.endswith("dbt-postgres~=1.8.0 installs 1.8.2, which takes the binary wheel")
