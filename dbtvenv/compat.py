"""Known breakage between old dbt releases and today's versions of their dependencies.

An old dbt release's metadata cannot know what later releases of its dependencies broke, so
pip resolves them to versions that crash it. Once the env is installed, `repairs` names the
requirements that bring such a dependency back to a version the dbt release works with; the
build installs them, with the user's own options and constraints, before the env is complete.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import NamedTuple

from dbtvenv.store import canonical_name


class Breakage(NamedTuple):
    dbt: str  # the dbt distribution
    dbt_below: str  # its releases before this one are affected
    dependency: str
    broken_from: str  # the dependency's releases from this one on break them
    repair: str  # the requirement that brings the dependency back
    why: str


KNOWN = (
    Breakage(
        "dbt-core",
        "1.8",
        "protobuf",
        "5",
        "protobuf<5",
        "its logging calls protobuf's MessageToJson with an argument protobuf 5 removed, so "
        "dbt crashes at its first log event (parse, run, build, ...); later 1.7 releases pin "
        "protobuf<5 themselves",
    ),
)


class Repair(NamedTuple):
    requirement: str
    reason: str


def repairs(distributions: Iterable[tuple[str, str]]) -> list[Repair]:
    """What to install on top of an env holding `distributions` (name, version)."""
    from packaging.version import InvalidVersion, Version

    installed = {canonical_name(name): version for name, version in distributions}
    found = []
    for breakage in KNOWN:
        dbt_version = installed.get(breakage.dbt)
        dependency_version = installed.get(breakage.dependency)
        if dbt_version is None or dependency_version is None:
            continue
        try:
            affected = Version(dbt_version) < Version(breakage.dbt_below)
            broken = Version(dependency_version) >= Version(breakage.broken_from)
        except InvalidVersion:
            continue
        if affected and broken:
            found.append(
                Repair(
                    breakage.repair,
                    f"{breakage.dbt} {dbt_version} does not work with {breakage.dependency} "
                    f"{dependency_version}: {breakage.why}",
                )
            )
    return found
