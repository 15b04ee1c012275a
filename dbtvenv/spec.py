"""The env spec: everything that changes what gets installed, normalised, and its cache key."""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dbtvenv.errors import UsageError
from dbtvenv.redact import redact, redact_all

# Bump when the layout of an env or the meaning of the key changes.
KEY_FORMAT = 1
KEY_LENGTH = 16


@dataclass(frozen=True)
class Interpreter:
    executable: str
    version: str
    implementation: str


@dataclass(frozen=True)
class InputFile:
    """A requirements or constraints file: its path (for pip), its bytes' digest (for the key)."""

    path: Path
    sha256: str


@dataclass(frozen=True)
class EnvSpec:
    requirements: tuple[str, ...]
    requirements_files: tuple[InputFile, ...]
    constraints_files: tuple[InputFile, ...]
    pip_install_options: tuple[str, ...]
    python: Interpreter
    system_site_packages: bool

    @property
    def key(self) -> str:
        payload = {
            "format": KEY_FORMAT,
            "requirements": sorted(set(redact_all(self.requirements))),
            "requirements_files": [f.sha256 for f in self.requirements_files],
            "constraints_files": [f.sha256 for f in self.constraints_files],
            "pip_install_options": redact_all(self.pip_install_options),
            "python": [self.python.implementation, self.python.version],
            "system_site_packages": self.system_site_packages,
        }
        blob = json.dumps(payload, sort_keys=True, separators=(",", ":")).encode()
        return hashlib.sha256(blob).hexdigest()[:KEY_LENGTH]

    def describe(self) -> dict[str, Any]:
        """The spec as the manifest and `env info` show it, credentials hidden."""
        return {
            "requirements": redact_all(self.requirements),
            "requirements_files": [
                {"path": redact(str(f.path)), "sha256": f.sha256} for f in self.requirements_files
            ],
            "constraints_files": [
                {"path": redact(str(f.path)), "sha256": f.sha256} for f in self.constraints_files
            ],
            "pip_install_options": redact_all(self.pip_install_options),
            "system_site_packages": self.system_site_packages,
        }


def resolve_spec(
    *,
    requirements: Sequence[str],
    requirements_files: Sequence[str],
    constraints_files: Sequence[str],
    pip_install_options: str | None,
    python: str | None,
    system_site_packages: bool,
) -> EnvSpec:
    """Validate and normalise what the user gave; every mistake is a `UsageError`."""
    if not requirements and not requirements_files:
        raise UsageError(
            "no requirements given: name dbt and an adapter with --requirements "
            "(e.g. --requirements 'dbt-postgres~=1.9.0') or DBTVENV_REQUIREMENTS"
        )
    return EnvSpec(
        requirements=tuple(normalise_requirement(r) for r in requirements),
        requirements_files=tuple(_input_file(p, "requirements") for p in requirements_files),
        constraints_files=tuple(_input_file(p, "constraints") for p in constraints_files),
        pip_install_options=split_pip_options(pip_install_options),
        python=find_interpreter(python),
        system_site_packages=system_site_packages,
    )


def normalise_requirement(text: str) -> str:
    """A PEP 508 requirement in one canonical spelling, so equal specs get equal keys."""
    from packaging.requirements import InvalidRequirement, Requirement
    from packaging.utils import canonicalize_name

    try:
        req = Requirement(text)
    except InvalidRequirement as exc:
        raise UsageError(
            f"malformed requirement {redact(text)!r}: {redact(str(exc)).splitlines()[0]} "
            "(write a PEP 508 requirement such as 'dbt-duckdb~=1.9.0' or 'name @ https://...')"
        ) from None
    out: str = canonicalize_name(req.name)
    if req.extras:
        out += "[" + ",".join(sorted(canonicalize_name(e) for e in req.extras)) + "]"
    out += str(req.specifier)
    if req.url:
        out += f" @ {req.url}"
    if req.marker:
        out += f" ; {req.marker}"
    return out


def split_pip_options(text: str | None) -> tuple[str, ...]:
    if not text:
        return ()
    try:
        return tuple(shlex.split(text))
    except ValueError as exc:
        raise UsageError(
            f"cannot split --pip-install-options {redact(text)!r}: {exc} "
            "(quote it as you would in a shell)"
        ) from None


def _input_file(path: str, kind: str) -> InputFile:
    p = Path(path).expanduser().absolute()
    try:
        data = p.read_bytes()
    except FileNotFoundError:
        raise UsageError(f"{kind} file {path!r} does not exist") from None
    except IsADirectoryError:
        raise UsageError(f"{kind} file {path!r} is a directory, not a file") from None
    except OSError as exc:
        raise UsageError(f"cannot read {kind} file {path!r}: {exc.strerror}") from None
    return InputFile(path=p, sha256=hashlib.sha256(data).hexdigest())


_PROBE = (
    "import json, platform, sys; "
    "print(json.dumps([sys.implementation.name, platform.python_version(), "
    "sys.version_info >= (3, 8)]))"
)


def find_interpreter(python: str | None) -> Interpreter:
    """The base interpreter of the env; asking a foreign one costs one short child process."""
    if python is None:
        # The interpreter below dbtvenv's own venv, if any: the env must not depend on that venv.
        base = getattr(sys, "_base_executable", None) or sys.executable
        return Interpreter(base, platform.python_version(), sys.implementation.name)
    found = shutil.which(python) if os.sep not in python else python
    if found is None or not os.path.isfile(found):
        raise UsageError(
            f"--python {python!r}: no such interpreter (give a path or a name on PATH)"
        )
    executable = os.path.abspath(found)
    if not os.access(executable, os.X_OK):
        raise UsageError(f"--python {python!r}: {executable} is not executable")
    try:
        out = subprocess.run(
            [executable, "-I", "-c", _PROBE],
            capture_output=True,
            timeout=60,
            check=True,
            stdin=subprocess.DEVNULL,
        ).stdout
        implementation, version, supported = json.loads(out)
    except (OSError, subprocess.SubprocessError, ValueError):
        raise UsageError(
            f"--python {python!r}: {executable} does not run as a Python interpreter"
        ) from None
    if not supported:
        raise UsageError(f"--python {python!r}: Python {version} is too old for dbt")
    return Interpreter(executable, str(version), str(implementation))
