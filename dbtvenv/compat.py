"""Known breakage between dbt releases and today's versions of their dependencies.

An old dbt release's metadata cannot know what later releases of its dependencies broke, so
pip resolves them to versions that crash it. Once the env is installed, `repairs` names the
requirements that bring such a dependency back to a version the dbt release works with; the
build installs them, with the user's own options and constraints, before the env is complete.

Some installs are slow or fail for reasons the installer's own output hides (a distribution
compiled from source, a build that downloads from outside the package registry):
`source_build_note` and `explain_failure` say why, and what to pin instead.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import NamedTuple

from dbtvenv.dbt_lines import decide
from dbtvenv.spec import EnvSpec
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


# Installs that are slow or fail for a reason an installer's output does not say.
class SourceBuild(NamedTuple):
    distribution: str  # what gets compiled from source
    why: str
    fix: str


SOURCE_BUILDS = (
    SourceBuild(
        "psycopg2",
        "dbt-postgres 1.8.0 requires psycopg2 on Linux, not psycopg2-binary, so it is compiled "
        "from source: about two minutes instead of seconds, and it fails without a C compiler "
        "and PostgreSQL's pg_config (libpq-dev)",
        "dbt-postgres~=1.8.0 installs 1.8.2, which takes the binary wheel",
    ),
)
# dbt-core from this line on requires it, and its build downloads a binary from outside the
# package registry: it fails behind a registry-only proxy.
EXPERIMENTAL_PARSER = "dbt-core-experimental-parser"
EXPERIMENTAL_PARSER_FROM = (1, 12)


def _built_from_source(line: str) -> str | None:
    """The distribution an installer output line says it compiles: pip's `Building wheel for
    psycopg2 (pyproject.toml)`, uv's `Building psycopg2==2.9.10`."""
    text = line.strip()
    if text.startswith("Building wheel for "):
        return canonical_name(text.split(" ")[3])
    if text.startswith("Building ") and "==" in text:
        return canonical_name(text.split(" ")[1].split("==")[0])
    return None


def source_build_note(line: str) -> str | None:
    """A note for the user when the installer starts compiling a distribution known to be slow
    or fragile to build."""
    name = _built_from_source(line)
    for known in SOURCE_BUILDS:
        if name == known.distribution:
            return f"building {known.distribution} from source: {known.why}; {known.fix}"
    return None


def explain_failure(what: str, text: str, spec: EnvSpec) -> str | None:
    """The cause of a failed install, where known breakage explains it."""
    for known in SOURCE_BUILDS:
        failed = (
            f"Failed to build {known.distribution}" in text
            or f"Failed to build `{known.distribution}" in text
            or (known.distribution in text and "pg_config executable not found" in text)
        )
        if failed:
            return (
                f"{what} could not build {known.distribution} from source: {known.why}; {known.fix}"
            )
    if EXPERIMENTAL_PARSER in text or EXPERIMENTAL_PARSER.replace("-", "_") in text:
        return _experimental_parser(what, spec)
    return None


def _experimental_parser(what: str, spec: EnvSpec) -> str:
    start = (
        f"{what} could not install {EXPERIMENTAL_PARSER}, which dbt-core "
        f"{'.'.join(map(str, EXPERIMENTAL_PARSER_FROM))} and later pull in and which downloads a "
        "binary from outside the package registry at install time"
    )
    last = f"{EXPERIMENTAL_PARSER_FROM[0]}.{EXPERIMENTAL_PARSER_FROM[1] - 1}"
    for pin in spec.implied_pins:  # the line the user asked for is that new
        adapter = re.split(r"[\[=<>!~ ;@]", pin.asked_by, maxsplit=1)[0]
        line = pin.requirement.split("~=", 1)[1].rsplit(".", 1)[0]
        return (
            f"{start}: the dbt {line} line, which {pin.asked_by} asks for, needs it; behind a "
            f"registry-only proxy pin an older line, e.g. --requirements '{adapter}~={last}.0'"
        )
    named = [r for r in spec.requirements if re.match(r"dbt-core(\[[^\]]*\])?[=<>!~]", r)]
    if named:
        return (
            f"{start}: {' '.join(named)} lets it in; behind a registry-only proxy pin a dbt-core "
            f"line before {EXPERIMENTAL_PARSER_FROM[0]}.{EXPERIMENTAL_PARSER_FROM[1]}, e.g. "
            f"--requirements 'dbt-core~={last}.0'"
        )
    pins, _ = decide(spec.requirements)  # what the line would be, had dbtvenv implied it
    if pins:
        return (
            f"{start}: dbt-core was not constrained, so the newest was chosen; for the dbt line "
            f"{pins[0].asked_by} asks for, add --requirements '{pins[0].requirement}'"
        )
    return (
        f"{start}: nothing pins dbt-core, so the newest was chosen; pin a dbt-core line that "
        f"installs from the registry alone, e.g. --requirements 'dbt-core~={last}.0'"
    )
