"""No pre-release that nobody asked for.

pip lets a pre-release in as soon as any requirement of the resolution names one, a
dependency's own included: dbt-postgres 1.8.0 requires `dbt-core>=1.8.0a1`, so `pip install
dbt-postgres==1.8.0` picks dbt-core 2.0.0rc9. A user asks for pre-releases with `--pre` (pip),
`--prerelease allow` (uv), PIP_PRE or UV_PRERELEASE, or by naming one in a requirement or
constraint of their own (`dbt-core==1.10.0rc1`). Unless they did, uv gets `--prerelease
explicit` (pre-releases only where the user's own requirements name one: here, none), and
after the install every distribution must be a final release, or the build fails naming it,
the requirement that let it in and the pin that keeps it out.

Imported at build time only: `packaging` is fine here.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path

from dbtvenv.dbt_lines import DBT_CORE, decide, requirement_lines
from dbtvenv.spec import EnvSpec

_TRUE = ("1", "true", "yes", "on")


def _option_value(options: Sequence[str], name: str) -> str | None:
    for i, option in enumerate(options):
        if option == name and i + 1 < len(options):
            return options[i + 1]
        if option.startswith(name + "="):
            return option.split("=", 1)[1]
    return None


def asked_for(spec: EnvSpec, environ: Mapping[str, str] | None = None) -> str | None:
    """What asks for pre-releases (for messages), or None if nothing does."""
    environ = os.environ if environ is None else environ
    options = spec.pip_install_options
    if "--pre" in options:
        return "--pre in --pip-install-options"
    policy = _option_value(options, "--prerelease")
    if policy is not None and policy != "disallow":
        return f"--prerelease {policy} in --pip-install-options"
    if environ.get("PIP_PRE", "").strip().lower() in _TRUE:
        return "PIP_PRE"
    if environ.get("UV_PRERELEASE", "disallow").strip().lower() not in ("", "disallow"):
        return "UV_PRERELEASE"
    for requirement in _user_requirements(spec):
        if _names_prerelease(requirement):
            return requirement
    return None


def uv_options(spec: EnvSpec) -> list[str]:
    """`uv pip install` options for the rule: no pre-release (uv's `explicit`, since nothing
    of the user's names one), unless the user asked for them or chose a policy of their own;
    then uv's own rules apply."""
    if asked_for(spec) is not None or _option_value(spec.pip_install_options, "--prerelease"):
        return []
    return ["--prerelease", "explicit"]


def _user_requirements(spec: EnvSpec) -> list[str]:
    found = list(spec.requirements)
    for f in (*spec.requirements_files, *spec.constraints_files):
        try:
            found += requirement_lines(Path(f.path).read_text("utf-8", "replace"))
        except OSError:
            continue  # the installer reads it next and says what is wrong
    return found


def _names_prerelease(requirement: str) -> bool:
    from packaging.requirements import InvalidRequirement, Requirement

    try:
        return bool(Requirement(requirement).specifier.prereleases)
    except InvalidRequirement:
        return False


def unasked(
    distributions: Iterable[tuple[str, str]],
    requires: Callable[[], Mapping[str, Sequence[str]]],
) -> str | None:
    """The build failure for the first pre-release among `distributions` (name, version), with
    who let it in from `requires()` (each installed distribution's Requires-Dist, asked for
    only if there is a pre-release); None if every one is a final release."""
    from packaging.utils import canonicalize_name
    from packaging.version import InvalidVersion, Version

    found = []
    for name, version in distributions:
        try:
            if Version(version).is_prerelease:
                found.append((name, Version(version)))
        except InvalidVersion:
            continue
    if not found:
        return None
    name, pre = found[0]
    others = f" (and {len(found) - 1} more)" if len(found) > 1 else ""
    head = f"{name} {pre} is a pre-release{others}, and nothing you gave asks for one"
    requirers = _required_by(canonicalize_name(name), requires())
    letters = [r for r, explicit in requirers if explicit]
    if letters:
        pin = f"{name}<{pre.base_version}"
        return (
            f"{head}: {'; '.join(letters)}, which let the installer choose it; keep it to a "
            f"final release with a constraint such as '{pin}' (--constraints FILE, or "
            f"--requirements '{pin}'), or accept pre-releases with --pip-install-options --pre"
        )
    needed = f" ({'; '.join(r for r, _ in requirers)})" if requirers else ""
    return (
        f"{head}: no final release of it fits what requires it{needed}; accept pre-releases "
        f"with --pip-install-options --pre, or require a version of {name} that has a final "
        "release"
    )


def _required_by(name: str, requires: Mapping[str, Sequence[str]]) -> list[tuple[str, bool]]:
    """(`dbt-postgres 1.8.0 requires dbt-core>=1.8.0a1`, whether it names a pre-release) for
    every installed distribution that requires `name`."""
    from packaging.requirements import InvalidRequirement, Requirement
    from packaging.utils import canonicalize_name

    found = []
    for requirer, lines in sorted(requires.items()):
        for line in lines:
            try:
                req = Requirement(line)
            except InvalidRequirement:
                continue
            if canonicalize_name(req.name) != name:
                continue
            if req.marker is not None and "extra" in str(req.marker):
                continue
            found.append(
                (f"{requirer} requires {req.name}{req.specifier}", bool(req.specifier.prereleases))
            )
    return found


class Chosen:
    """What an installer's output lines say it chose, for a failure that happens before the
    install is done (a pre-release whose build fails, as dbt-core 2.0.0rc9's does behind a
    registry-only proxy): `Collecting dbt-core>=1.8.0rc1 (from dbt-postgres==1.10)`, then
    `Downloading dbt_core-2.0.0rc9.tar.gz`."""

    def __init__(self) -> None:
        self.pre_releases: dict[str, str] = {}  # canonical name -> version
        self.wanted_by: dict[str, str] = {}  # canonical name -> `dbt-postgres==1.10 requires ...`

    def line(self, line: str) -> None:
        text = line.strip()
        word, _, rest = text.partition(" ")
        if word == "Collecting" and " (from " in rest:
            requirement, _, parent = rest.partition(" (from ")
            self._wanted(requirement, parent.rstrip(")"))
        elif word in ("Downloading", "Using", "Processing"):  # Using cached NAME
            name = rest.split(" ")[1] if word == "Using" else rest.split(" ")[0]
            self._file(name.rsplit("/", 1)[-1].removesuffix(".metadata"))

    def _wanted(self, requirement: str, parent: str) -> None:
        from packaging.requirements import InvalidRequirement, Requirement
        from packaging.utils import canonicalize_name

        try:
            req = Requirement(requirement)
        except InvalidRequirement:
            return
        if req.specifier.prereleases:
            self.wanted_by[canonicalize_name(req.name)] = f"{parent} requires {req}"

    def _file(self, filename: str) -> None:
        from packaging.utils import (
            InvalidSdistFilename,
            InvalidWheelFilename,
            parse_sdist_filename,
            parse_wheel_filename,
        )

        try:
            if filename.endswith(".whl"):
                name, version, *_ = parse_wheel_filename(filename)
            else:
                name, version = parse_sdist_filename(filename)
        except (InvalidSdistFilename, InvalidWheelFilename):
            return
        if version.is_prerelease:
            self.pre_releases[name] = str(version)

    def failure(self, what: str, spec: EnvSpec, said: str) -> str | None:
        """Why the install failed, if it failed on a pre-release nobody asked for (`said`: the
        installer's last lines)."""
        found = [(n, v) for n, v in self.pre_releases.items() if n in said or v in said]
        if not found or asked_for(spec) is not None:
            return None
        from packaging.version import Version

        name, version = found[0]
        let_in = self.wanted_by.get(name)
        why = f" ({let_in}, which let it choose one)" if let_in else ""
        pin = f"{name}<{Version(version).base_version}"
        line = ""
        lines, _ = decide(spec.requirements) if name == DBT_CORE else ((), ())
        if lines and not spec.implied_pins:
            line = f", or the dbt line {lines[0].asked_by} asks for: '{lines[0].requirement}'"
        return (
            f"{what} chose {name} {version}, a pre-release nothing you gave asks for{why}, and "
            f"could not install it; keep it to a final release with a constraint such as "
            f"'{pin}' (--constraints FILE, or --requirements '{pin}'){line}"
        )
