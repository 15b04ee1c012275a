"""The dbt line an adapter pin asks for (dbtvenv/dbt_lines.py): every way of pinning a line,
the specs it must leave alone, and what it adds to the key. Offline and fast; the builds that
use it are in tests/test_prereleases.py (offline) and tests/test_e2e.py (the registry)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import pytest

from dbtvenv.dbt_lines import (
    FOLLOWERS,
    dbt_requirement_lines,
    decide,
    installed_dbt,
    requirement_lines,
)
from dbtvenv.spec import EnvSpec, normalise_requirement, resolve_spec


def pins(requirements: Sequence[str], constraints: Sequence[str] = (), **kw: str) -> list[str]:
    found, _ = decide(
        [normalise_requirement(r) for r in requirements],
        [normalise_requirement(c) for c in constraints],
        **kw,
    )
    return [pin.requirement for pin in found]


def notes(requirements: Sequence[str], constraints: Sequence[str] = ()) -> list[str]:
    _, found = decide([normalise_requirement(r) for r in requirements], constraints)
    return list(found)


@pytest.mark.parametrize(
    ("requirement", "line"),
    [
        ("dbt-postgres==1.9", "1.9"),
        ("dbt-postgres==1.9.*", "1.9"),
        ("dbt-postgres==1.9.1", "1.9"),
        ("dbt-postgres===1.9.1", "1.9"),
        ("dbt-postgres~=1.9.0", "1.9"),
        ("dbt-postgres~=1.9.1", "1.9"),
        ("dbt-postgres>=1.9,<1.10", "1.9"),
        ("dbt-postgres>=1.9.0,<1.10.0", "1.9"),
        ("dbt-postgres>=1.9, <1.10, !=1.9.0", "1.9"),
        ("dbt-postgres>1.9.0,<=1.9.99", "1.9"),
        ("dbt-postgres==1.10.0rc1", "1.10"),  # a pre-release of the adapter: packaging reads it
        ("DBT_Postgres[extra]==1.8", "1.8"),
        ('dbt-postgres==1.8.0 ; sys_platform == "linux"', "1.8"),
        ("dbt-duckdb==1.11", "1.11"),
        ("dbt-redshift==1.5.0", "1.5"),
        ("dbt-snowflake~=1.12.0", "1.12"),
        ("dbt-databricks>=1.10.0,<1.11", "1.10"),
    ],
)
def test_an_adapter_pinned_to_a_line_pins_dbt_core_to_it(requirement: str, line: str) -> None:
    assert pins([requirement]) == [f"dbt-core~={line}.0"]


@pytest.mark.parametrize(
    "requirement",
    [
        "dbt-postgres",
        "dbt-postgres>=1.8",
        "dbt-postgres~=1.9",  # means >=1.9,<2: every line from 1.9 on
        "dbt-postgres==1.*",
        "dbt-postgres>=1.9,<1.10.1",  # 1.10.0 too
        "dbt-postgres>=1.9,<1.10.0rc1",  # 1.10.0a1 too
        "dbt-postgres<1.10",
        "dbt-postgres==1!1.9.0",
        "dbt-postgres @ https://example.com/dbt_postgres-1.9.0-py3-none-any.whl",
        "dbt-postgres>=1.10,<1.9",  # nothing fits: the installer says so
    ],
)
def test_no_line_no_pin(requirement: str) -> None:
    assert pins([requirement]) == []


def test_a_two_part_exact_pin_is_said_to_mean_the_first_release_of_the_line() -> None:
    assert notes(["dbt-postgres==1.8"]) == [
        "dbt-postgres==1.8 means dbt-postgres 1.8.0 exactly; dbt-postgres~=1.8.0 takes the newest "
        "release of the line, with its fixes"
    ]
    assert notes(["dbt-postgres==1.8.2"]) == notes(["dbt-postgres~=1.8.0"]) == []


def test_a_range_of_lines_gets_a_hint_that_names_the_line_form() -> None:
    (note,) = notes(["dbt-duckdb~=1.9"])
    assert "dbt-duckdb~=1.9 allows more than one dbt line" in note
    assert "~=1.9 means >=1.9,<2" in note and "write dbt-duckdb~=1.9.0" in note


@pytest.mark.parametrize(
    "dbt_core", ["dbt-core~=1.10.0", "dbt-core>=1.8", "dbt-core==1.9.3", "dbt-core @ file:///x.whl"]
)
def test_dbt_core_named_by_the_user_is_left_alone(dbt_core: str) -> None:
    assert pins(["dbt-postgres==1.9", dbt_core]) == []
    assert pins([dbt_core, "dbt-postgres==1.9"]) == []


def test_bare_dbt_core_names_no_version_so_the_line_still_applies() -> None:
    assert pins(["dbt-core", "dbt-postgres==1.9"]) == ["dbt-core~=1.9.0"]


def test_constraints_pinning_dbt_core_are_left_alone() -> None:
    assert pins(["dbt-postgres==1.9"], ["dbt-core<1.9.5"]) == []


def test_a_constraint_can_pin_the_adapter_line() -> None:
    assert pins(["dbt-postgres"], ["dbt-postgres==1.8.2"]) == ["dbt-core~=1.8.0"]


def test_an_unknown_adapter_gets_no_pin_and_a_hint() -> None:
    assert pins(["dbt-materialize==1.8.0"]) == []
    (note,) = notes(["dbt-materialize==1.8.0"])
    assert "does not know whether dbt-materialize's versions follow dbt-core's" in note
    assert "--requirements 'dbt-core~=1.8.0'" in note
    # Below 1.8 adapters pinned dbt-core themselves: nothing to say
    assert notes(["dbt-standin==1.0.0"]) == []


def test_pre_releases_asked_for_leave_the_choice_to_the_installer() -> None:
    found, (note,) = decide([normalise_requirement("dbt-postgres~=1.9.0")], pre="--pre")
    assert found == ()
    assert note.startswith("--pre: dbt-core is not constrained to the dbt 1.9 line")


def test_two_adapters_of_one_line_give_one_pin_two_lines_none() -> None:
    assert pins(["dbt-postgres==1.9.1", "dbt-duckdb~=1.9.0"]) == ["dbt-core~=1.9.0"]
    assert pins(["dbt-postgres==1.8", "dbt-duckdb==1.9"]) == []
    *_, note = notes(["dbt-postgres==1.8", "dbt-duckdb==1.9"])
    assert "different dbt lines (dbt-postgres==1.8: 1.8; dbt-duckdb==1.9: 1.9)" in note


def test_the_reason_names_what_the_user_asked_for_and_the_switch() -> None:
    (pin,), _ = decide([normalise_requirement("dbt-postgres==1.9")])
    assert pin.reason == (
        "dbt-postgres==1.9 asks for the dbt 1.9 line: constraining dbt-core to ~=1.9.0 "
        "(--no-implied-pins lets the installer choose)"
    )


def test_every_follower_says_why() -> None:
    for adapter, why in FOLLOWERS.items():
        assert adapter == normalise_requirement(adapter)
        assert "dbt-core" in why


def test_requirement_files_are_read_as_pip_reads_them() -> None:
    text = (
        "# pinned for the nightly run\n"
        "-r base.txt\n"
        "--index-url https://pypi.example.com/simple\n"
        "dbt-postgres==1.9.1 \\\n"
        "    --hash=sha256:0123456789abcdef\n"
        "agate>=1.7  # a comment\n"
        'DBT_Core>=1.9 ; python_version >= "3.9"\n'
    )
    assert requirement_lines(text) == [
        "dbt-postgres==1.9.1",
        "agate>=1.7",
        'DBT_Core>=1.9 ; python_version >= "3.9"',
    ]
    assert dbt_requirement_lines(text) == [
        "dbt-postgres==1.9.1",
        'DBT_Core>=1.9 ; python_version >= "3.9"',
    ]


def _spec(
    requirements: Sequence[str],
    *,
    files: Sequence[Path] = (),
    constraints: Sequence[Path] = (),
    pip: str | None = None,
    no_implied_pins: bool = False,
) -> EnvSpec:
    return resolve_spec(
        requirements=requirements,
        requirements_files=[os.fspath(f) for f in files],
        constraints_files=[os.fspath(c) for c in constraints],
        pip_install_options=pip,
        python=None,
        system_site_packages=False,
        no_implied_pins=no_implied_pins,
    )


def test_the_implied_pin_is_part_of_the_key(tmp_path: Path) -> None:
    implied = _spec(["dbt-postgres==1.9"])
    assert [p.requirement for p in implied.implied_pins] == ["dbt-core~=1.9.0"]
    off = _spec(["dbt-postgres==1.9"], no_implied_pins=True)
    assert off.implied_pins == ()
    assert implied.key != off.key
    # Without an implied pin the key is what it always was: no env of another spec moves.
    assert _spec(["dbt-standin==1.0.0"], no_implied_pins=True).key == (
        _spec(["dbt-standin==1.0.0"]).key
    )


def test_requirements_and_constraints_files_count(tmp_path: Path) -> None:
    reqs = tmp_path / "requirements.txt"
    reqs.write_text("dbt-duckdb==1.10.1\n")
    assert [p.requirement for p in _spec([], files=[reqs]).implied_pins] == ["dbt-core~=1.10.0"]
    constraints = tmp_path / "constraints.txt"
    constraints.write_text("dbt-core==1.10.4\n")
    assert _spec([], files=[reqs], constraints=[constraints]).implied_pins == ()
    assert _spec(["dbt-duckdb==1.9"], pip="--pre").implied_pins == ()


def test_installed_dbt_names_core_first_then_the_adapters() -> None:
    found = installed_dbt(
        [
            ("agate", "1.9.1"),
            ("dbt-redshift", "1.9.5"),
            ("dbt_core", "1.9.11"),
            ("dbt-adapters", "1.16.0"),
            ("dbt-postgres", "1.9.1"),
        ]
    )
    assert found == [("dbt-core", "1.9.11"), ("dbt-postgres", "1.9.1"), ("dbt-redshift", "1.9.5")]


# Computes the key of an adapter-pinned spec, then lists what it imported.
_KEY_IMPORTS = """
import json, sys
from dbtvenv.spec import resolve_spec
spec = resolve_spec(requirements=["dbt-duckdb==1.9", "dbt-core", "agate>=1.7,<2"],
    requirements_files=[], constraints_files=[sys.argv[1]], pip_install_options=None,
    python=None, system_site_packages=False)
print(json.dumps({"pins": [p.requirement for p in spec.implied_pins],
    "packaging": sorted(m for m in sys.modules if m.startswith("packaging"))}))
"""


def test_the_key_of_an_adapter_pin_needs_no_packaging(tmp_path: Path) -> None:
    """The key is computed before every dbt command; `packaging` costs milliseconds there."""
    constraints = tmp_path / "constraints.txt"
    constraints.write_text("dbt-duckdb>=1.9.0  # the line we test\nprotobuf<5\n")
    done = subprocess.run(
        [sys.executable, "-c", _KEY_IMPORTS, str(constraints)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report == {"pins": ["dbt-core~=1.9.0"], "packaging": []}
