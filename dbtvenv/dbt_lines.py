"""The dbt line an adapter pin asks for.

A dbt adapter's version `1.X.y` is made for dbt-core's line `1.X`. Up to 1.7 each adapter's
metadata pinned dbt-core to its own line, so `dbt-postgres==1.7` brought dbt-core 1.7. Since
1.8 most adapters require only `dbt-core>=1.8.0` (some `>=1.8.0a1`), so a bare adapter pin
installs the newest dbt-core there is, pre-releases included. When the requirements pin a
known adapter to one line and name no dbt-core version, dbtvenv constrains dbt-core to that
line (`dbt-core~=1.X.0`); `--no-implied-pins` turns it off.

`FOLLOWERS` is the knowledge: the adapters whose numbering follows dbt-core's lines, each with
what their own metadata (Requires-Dist) says. An adapter outside it gets no implied pin.

This module runs before every dbt command (the implied pin is part of the env's key), so a
plain requirement (`spec` has normalised it: no spaces, release numbers only) is read with
string operations; `packaging` is imported only for the others (a pre-release version, a
marker, a URL), as `spec` does.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from typing import NamedTuple

DBT_CORE = "dbt-core"


# Adapter (canonical name) -> what its own metadata says, checked release by release.
FOLLOWERS: dict[str, str] = {
    "dbt-postgres": (
        "1.5-1.7: each release requires the dbt-core release of its own number (1.7.0: "
        "dbt-core==1.7.0); 1.8.0-1.8.2 require dbt-core>=1.8.0a1, 1.9.x >=1.8.0, 1.10.0 "
        ">=1.8.0rc1, 1.10.2 and 1.11.0 >=1.8.0rc1,<2.0"
    ),
    "dbt-redshift": (
        "1.5-1.7 require dbt-core~=1.X.0 and dbt-postgres~=1.X.0; 1.8 and later require "
        "dbt-core>=1.8.0b3 or >=1.8.0, and dbt-postgres of their own line"
    ),
    "dbt-snowflake": (
        "1.5-1.7 require dbt-core~=1.X.0; 1.8 >=1.8.0a1, 1.9 >=1.8.0, 1.10-1.12 >=1.10.0rc0"
    ),
    "dbt-bigquery": (
        "1.5-1.7 require dbt-core~=1.X.0; 1.8 >=1.8.0a1, 1.9 >=1.8.0, 1.10-1.12 >=1.10.0rc0"
    ),
    "dbt-spark": ("1.5-1.7 require dbt-core~=1.X.0; 1.8 >=1.8.0a1, 1.9 and 1.10 >=1.8.0"),
    "dbt-databricks": (
        "1.5-1.7 pin dbt-spark~=1.X.0, which pins dbt-core~=1.X.0; 1.8.0 requires "
        "dbt-core~=1.8.0rc2, later releases a window around their own line (1.9.0: >=1.8.7,<2.0; "
        "1.11.8: >=1.11.2,<1.11.9)"
    ),
    "dbt-duckdb": (
        "1.5-1.7 require dbt-core~=1.X.0; every release from 1.8.0 to 1.11.1 requires only "
        "dbt-core>=1.8.0"
    ),
    "dbt-trino": ("1.5-1.7 require dbt-core~=1.X.0; 1.8-1.10 require dbt-core>=1.8.0"),
    "dbt-sqlserver": (
        "1.7 requires dbt-core~=1.7.2, 1.8 >=1.8.0,<1.9.0, 1.9 >=1.9.0, 1.10 >=1.10.0, 1.12 "
        ">=1.12.0"
    ),
    "dbt-fabric": (
        "1.5 requires dbt-core~=1.5.2, 1.7 ~=1.7.2; 1.8 and 1.9 >=1.8.0a1 or >=1.8.0, 1.10 >=1.10.0"
    ),
    "dbt-athena-community": (
        "1.5-1.7 require dbt-core~=1.X.0; 1.8 and later require dbt-core>=1.8.0"
    ),
    "dbt-athena": ("the adapter's new name from 1.9.0 on; 1.9 requires dbt-core>=1.8.0"),
    "dbt-clickhouse": ("1.5-1.8 require dbt-core~=1.X.0; 1.9 and 1.10 require dbt-core>=1.9"),
}

# dbt's own distributions: every other `dbt-*` distribution is taken for an adapter.
NOT_ADAPTERS = frozenset(
    {
        "dbt-core",
        "dbt-adapters",
        "dbt-common",
        "dbt-extractor",
        "dbt-semantic-interfaces",
        "dbt-protos",
        "dbt-core-experimental-parser",
    }
)


def installed_dbt(distributions: Iterable[tuple[str, str]]) -> list[tuple[str, str]]:
    """dbt-core, then the adapters, of an env's (name, version) distributions."""
    found = {re.sub(r"[-_.]+", "-", name).lower(): version for name, version in distributions}
    adapters = sorted(
        (name, version)
        for name, version in found.items()
        if name.startswith("dbt-") and name not in NOT_ADAPTERS
    )
    core = [(DBT_CORE, found[DBT_CORE])] if DBT_CORE in found else []
    return core + adapters


# Adapters pinned below this line pin dbt-core themselves; an unknown one above it may not.
DECOUPLED_FROM = (1, 8)


class ImpliedPin(NamedTuple):
    requirement: str  # what goes into the constraints: `dbt-core~=1.9.0`
    reason: str  # one line for stderr
    asked_by: str  # the user's requirements that ask for the line: `dbt-postgres==1.9`


# (pins, notes): the pins, and hints for the user where no pin could be implied
LineDecision = tuple[tuple[ImpliedPin, ...], tuple[str, ...]]
Line = tuple[int, int]
_OPEN = 10**9  # "every minor release" of a major line
# (operator, release numbers, `.*` wildcard, final: no pre-, post-, dev-release or local part)
_Specifier = tuple[str, tuple[int, ...], bool, bool]
_OPERATORS = ("===", "==", "!=", "~=", "<=", ">=", "<", ">")


def _parse(requirement: str) -> tuple[str, list[_Specifier] | None] | None:
    """(name, specifiers) of a normalised requirement; specifiers None for a URL requirement."""
    if " " not in requirement:
        name, _, rest = requirement.partition("[")
        if rest:
            rest = rest.partition("]")[2]
        else:
            cut = min((i for i in map(name.find, "=!~<>") if i >= 0), default=len(name))
            name, rest = name[:cut], name[cut:]
        found = []
        for text in filter(None, rest.split(",")):
            op = next((o for o in _OPERATORS if text.startswith(o)), "")
            number = text[len(op) :]
            wildcard = number.endswith(".*")
            parts = (number[:-2] if wildcard else number).split(".")
            if op in ("", "===") or not all(part.isdigit() for part in parts):
                break  # a pre-release or other tag: packaging reads it
            found.append((op, tuple(map(int, parts)), wildcard, True))
        else:
            return name, found
    return _parse_with_packaging(requirement)


def _parse_with_packaging(requirement: str) -> tuple[str, list[_Specifier] | None] | None:
    from packaging.requirements import InvalidRequirement, Requirement
    from packaging.utils import canonicalize_name
    from packaging.version import InvalidVersion, Version

    try:
        req = Requirement(requirement)
    except InvalidRequirement:
        return None
    if req.url:
        return canonicalize_name(req.name), None
    found = []
    for specifier in req.specifier:
        text = specifier.version
        wildcard = text.endswith(".*")
        try:
            version = Version(text[:-2] if wildcard else text)
        except InvalidVersion:
            continue  # `===anything`: says nothing about a line
        if version.epoch:
            continue
        final = not (version.is_prerelease or version.is_postrelease or version.local)
        op = "==" if specifier.operator == "===" else specifier.operator
        found.append((op, version.release, wildcard, final))
    return canonicalize_name(req.name), found


def _bounds(spec: _Specifier) -> tuple[Line | None, Line | None]:
    """The lowest and highest dbt line (major, minor) this one specifier lets in."""
    op, release, wildcard, final = spec
    line = (release[0], release[1] if len(release) > 1 else 0)
    if op == "==":
        if wildcard and len(release) < 2:
            return (release[0], 0), (release[0], _OPEN)
        return line, line
    if op == "~=":  # >= V and == V without its last part, .*
        prefix = release[:-1]
        return line, (prefix[0], prefix[1]) if len(prefix) >= 2 else (prefix[0], _OPEN)
    if op in (">=", ">"):
        return line, None
    if op == "<=":
        return None, line
    if op == "<":
        if final and not any(release[2:]):
            # `<1.10` (or `<1.10.0`) lets in no 1.10 release, not even its pre-releases
            return None, (line[0], line[1] - 1) if line[1] else (line[0] - 1, _OPEN)
        return None, line
    return None, None  # `!=` only takes single releases out


def line_of(specifiers: Iterable[_Specifier]) -> Line | None:
    """The one dbt line these specifiers together confine a version to, if they do."""
    lows, highs = [], []
    for spec in specifiers:
        low, high = _bounds(spec)
        if low is not None:
            lows.append(low)
        if high is not None:
            highs.append(high)
    if not lows or not highs:
        return None
    low, high = max(lows), min(highs)
    return low if low == high and low[1] != _OPEN else None


def requirement_lines(text: str) -> list[str]:
    """The requirements of a requirements or constraints file, without comments and per-line
    options (`--hash=...`); option lines (`-r`, `--index-url`) are skipped."""
    found = []
    for raw in text.replace("\\\n", " ").splitlines():
        line = re.sub(r"(^|\s)#.*", "", raw).strip()
        if line and not line.startswith("-"):
            found.append(re.split(r"\s+--?[A-Za-z]", line, maxsplit=1)[0])
    return found


def dbt_requirement_lines(text: str) -> list[str]:
    """The requirements of a file that name dbt-core or an adapter (`dbt-*`)."""
    found = []
    for line in requirement_lines(text):
        name = re.match(r"[A-Za-z0-9][A-Za-z0-9._-]*", line)
        if name and re.sub(r"[-_.]+", "-", name.group(0)).lower().startswith("dbt-"):
            found.append(line)
    return found


def decide(
    requirements: Sequence[str], constraints: Sequence[str] = (), *, pre: str | None = None
) -> LineDecision:
    """Which dbt-core line follows from `requirements` (normalised, the user's own and those of
    requirements files) under `constraints` (normalised lines of the constraints files).

    `pre` names the option that asks for pre-releases, if any: then the installer's choice
    stands (the user wants what is newest, pre-releases included).
    """
    adapters: dict[str, list[_Specifier]] = {}
    shown: dict[str, list[str]] = {}
    for requirement in (*requirements, *constraints):
        parsed = _parse(requirement)
        if parsed is None:
            continue
        name, specifiers = parsed
        if name == DBT_CORE:
            if specifiers is None or specifiers:
                return (), ()  # the user chose dbt-core's version
            continue
        if not name.startswith("dbt-") or name in NOT_ADAPTERS or specifiers is None:
            continue
        adapters.setdefault(name, []).extend(specifiers)
        if specifiers:
            shown.setdefault(name, []).append(requirement)
    lines: dict[Line, list[str]] = {}
    notes = []
    for name, specifiers in adapters.items():
        line = line_of(specifiers)
        asked = " and ".join(shown.get(name, [name]))
        if name not in FOLLOWERS:
            if line is not None and line >= DECOUPLED_FROM:
                notes.append(
                    f"{asked}: dbtvenv does not know whether {name}'s versions follow dbt-core's "
                    f"lines, so dbt-core is not constrained; to get dbt {line[0]}.{line[1]}, add "
                    f"--requirements '{DBT_CORE}~={line[0]}.{line[1]}.0'"
                )
            continue
        if line is not None:
            lines.setdefault(line, []).append(asked)
            exact = [s for s in specifiers if s[0] == "==" and not s[2] and len(s[1]) == 2]
            if exact and len(specifiers) == 1:
                major, minor = exact[0][1]
                notes.append(
                    f"{name}=={major}.{minor} means {name} {major}.{minor}.0 exactly; {name}"
                    f"~={major}.{minor}.0 takes the newest release of the line, with its fixes"
                )
        elif specifiers:
            low = [s for s in specifiers if s[0] == "~=" and len(s[1]) == 2]
            hint = ""
            if low:
                major, minor = low[0][1]
                hint = (
                    f" (~={major}.{minor} means >={major}.{minor},<{major + 1}); for the "
                    f"{major}.{minor} line write {name}~={major}.{minor}.0"
                )
            notes.append(
                f"{asked} allows more than one dbt line, so dbt-core is not constrained{hint}"
            )
    if len(lines) > 1:
        named = "; ".join(
            f"{' and '.join(asks)}: {m}.{n}" for (m, n), asks in sorted(lines.items())
        )
        notes.append(
            f"the adapters ask for different dbt lines ({named}); dbt-core is not constrained"
        )
        return (), tuple(notes)
    if pre is not None and lines:
        ((major, minor), asks), *_ = lines.items()
        notes.append(
            f"{pre}: dbt-core is not constrained to the dbt {major}.{minor} line "
            f"{' and '.join(asks)} asks for; name a dbt-core version to choose one"
        )
        return (), tuple(notes)
    pins = tuple(
        ImpliedPin(
            f"{DBT_CORE}~={major}.{minor}.0",
            f"{' and '.join(asks)} asks for the dbt {major}.{minor} line: constraining dbt-core to "
            f"~={major}.{minor}.0 (--no-implied-pins lets the installer choose)",
            " and ".join(asks),
        )
        for (major, minor), asks in lines.items()
    )
    return pins, tuple(notes)


CONSTRAINTS_FILE = "dbtvenv-constraints.txt"


def constraints_text(pins: Sequence[ImpliedPin]) -> str:
    """The private constraints file of an env being built."""
    lines = ["# dbt-core lines implied by adapter pins (dbtvenv); see the env's manifest"]
    lines += [pin.requirement for pin in pins]
    return "\n".join(lines) + "\n"
