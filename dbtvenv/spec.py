"""The env spec: everything that changes what gets installed, normalised, and its cache key."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

from dbtvenv import dbt_lines
from dbtvenv.errors import UsageError
from dbtvenv.redact import redact, redact_all

try:  # CPython's own SHA-256: `hashlib` would load OpenSSL first, milliseconds on every run
    from _sha256 import sha256  # type: ignore[import-not-found, unused-ignore]
except ImportError:  # Python 3.12+ (`_sha2`), or another implementation
    from hashlib import sha256


def hex_digest(data: bytes) -> str:
    """SHA-256 of `data`, in hex."""
    digest: str = sha256(data).hexdigest()
    return digest


# Bump when the layout of an env or the meaning of the key changes.
KEY_FORMAT = 1
KEY_LENGTH = 16


class Interpreter(NamedTuple):
    executable: str
    version: str
    implementation: str


class InputFile(NamedTuple):
    """A requirements or constraints file: its path as given (for people and for the relative
    paths inside it), its bytes as read once (what the installer gets, as a private copy) and
    their digest (for the key)."""

    path: Path
    sha256: str
    data: bytes = b""


class EnvSpec(NamedTuple):
    requirements: tuple[str, ...]
    requirements_files: tuple[InputFile, ...]
    constraints_files: tuple[InputFile, ...]
    pip_install_options: tuple[str, ...]
    python: Interpreter
    system_site_packages: bool
    # What dbtvenv adds: the dbt-core line an adapter pin asks for (see dbt_lines), and notes
    # on pins it could not imply. Shown at build time only.
    implied_pins: tuple[dbt_lines.ImpliedPin, ...] = ()
    dbt_line_notes: tuple[str, ...] = ()

    @property
    def key(self) -> str:
        payload: dict[str, Any] = {
            "format": KEY_FORMAT,
            "requirements": sorted(set(redact_all(self.requirements))),
            "requirements_files": [f.sha256 for f in self.requirements_files],
            "constraints_files": [f.sha256 for f in self.constraints_files],
            "pip_install_options": redact_all(self.pip_install_options),
            "python": [self.python.implementation, self.python.version],
            "system_site_packages": self.system_site_packages,
        }
        if self.implied_pins:  # absent otherwise: the keys of all other envs stay as they were
            payload["implied_pins"] = [pin.requirement for pin in self.implied_pins]
        blob = json.dumps(payload, sort_keys=True, separators=(",", ":")).encode()
        return hex_digest(blob)[:KEY_LENGTH]

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
    no_implied_pins: bool = False,
) -> EnvSpec:
    """Validate and normalise what the user gave; every mistake is a `UsageError`."""
    if not requirements and not requirements_files:
        raise UsageError(
            "no requirements given: name dbt and an adapter with --requirements "
            "(e.g. --requirements 'dbt-postgres~=1.9.0'), DBTVENV_REQUIREMENTS or "
            "--requirements-file PATH"
        )
    normalised = tuple(normalise_requirement(r) for r in requirements)
    files = [_read_input_file(p, "requirements") for p in requirements_files]
    constraints = [_read_input_file(p, "constraints") for p in constraints_files]
    options = split_pip_options(pip_install_options)
    decision: dbt_lines.LineDecision = ((), ())
    if not no_implied_pins:
        decision = dbt_lines.decide(
            [*normalised, *_dbt_requirements(data for _, data in files)],
            _dbt_requirements(data for _, data in constraints),
            pre=_asks_for_prereleases(options),
        )
    return EnvSpec(
        requirements=normalised,
        requirements_files=tuple(f for f, _ in files),
        constraints_files=tuple(f for f, _ in constraints),
        pip_install_options=options,
        python=find_interpreter(python),
        system_site_packages=system_site_packages,
        implied_pins=decision[0],
        dbt_line_notes=decision[1],
    )


def _asks_for_prereleases(options: Sequence[str]) -> str | None:
    if "--pre" in options:
        return "--pre"
    for i, option in enumerate(options):
        policy = option.split("=", 1)[1] if option.startswith("--prerelease=") else None
        if option == "--prerelease" and i + 1 < len(options):
            policy = options[i + 1]
        if policy == "allow":
            return "--prerelease allow"
    return None


def _dbt_requirements(contents: Iterable[bytes]) -> list[str]:
    """The requirements of files naming dbt-core or an adapter, normalised; a line pip would
    reject is left for pip to reject."""
    found = []
    for data in contents:
        for line in dbt_lines.dbt_requirement_lines(data.decode("utf-8", "replace")):
            try:
                found.append(normalise_requirement(line))
            except UsageError:
                continue
    return found


_WS = r"[ \t]*"
_NAME = r"[A-Za-z0-9](?:[A-Za-z0-9._-]*[A-Za-z0-9])?"
_RELEASE = r"[0-9]+(?:\.[0-9]+)*"
_SPECIFIER = (
    rf"{_WS}(?:(?:==|!=){_WS}{_RELEASE}(?:\.\*)?"
    rf"|~={_WS}[0-9]+(?:\.[0-9]+)+"
    rf"|(?:<=|>=|<|>){_WS}{_RELEASE}){_WS}"
)
# name[extras] and release-number specifiers: most requirements, spelt out without `packaging`
# (whose import costs tens of milliseconds on every run) and normalised exactly as it would.
_SIMPLE_REQUIREMENT = re.compile(
    rf"{_WS}(?P<name>{_NAME}){_WS}"
    rf"(?:\[(?P<extras>{_WS}{_NAME}{_WS}(?:,{_WS}{_NAME}{_WS})*)\])?"
    rf"(?P<specifiers>{_SPECIFIER}(?:,{_SPECIFIER})*)?"
)


def _canonical_name(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _normalise_simple(text: str) -> str | None:
    match = _SIMPLE_REQUIREMENT.fullmatch(text)
    if match is None:
        return None
    out = _canonical_name(match["name"])
    if match["extras"]:
        extras = {e.strip() for e in match["extras"].split(",")}
        out += "[" + ",".join(sorted(_canonical_name(e) for e in extras)) + "]"
    if match["specifiers"]:
        specifiers = {re.sub(r"[ \t]+", "", s) for s in match["specifiers"].split(",")}
        out += ",".join(sorted(specifiers))
    return out


def normalise_requirement(text: str) -> str:
    """A PEP 508 requirement in one canonical spelling, so equal specs get equal keys."""
    simple = _normalise_simple(text)
    if simple is not None:
        return simple
    from packaging.requirements import InvalidRequirement, Requirement
    from packaging.utils import canonicalize_name

    try:
        req = Requirement(text)
    except InvalidRequirement as exc:
        hint = "write a PEP 508 requirement such as 'dbt-duckdb~=1.9.0' or 'name @ https://...'"
        if text.strip()[:1] in ("<", ">", "=", "!", "~", ",") or text.rstrip().endswith(","):
            # `DBTVENV_REQUIREMENTS='dbt-core>=1.8, <2'` is split at the space.
            hint = (
                "DBTVENV_REQUIREMENTS is split at whitespace, so write one requirement without "
                "spaces, such as 'dbt-core>=1.8,<2'"
            )
        raise UsageError(
            f"malformed requirement {redact(text)!r}: {redact(str(exc)).splitlines()[0]} ({hint})"
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


_FILE_OPTIONS = {
    "requirements": "--requirements-file or DBTVENV_REQUIREMENTS_FILE",
    "constraints": "--constraints or DBTVENV_CONSTRAINTS",
}


# Requirements and constraints files: read once, whole, at most this much.
MAX_INPUT_BYTES = 1 << 20
# How long a pipe (`<(...)`) may take to deliver its file.
PIPE_READ_TIMEOUT = 30.0


def _read_input_file(path: str, kind: str) -> tuple[InputFile, bytes]:
    given = f"check the path given to {_FILE_OPTIONS.get(kind, kind)}"
    try:
        p = Path(path).expanduser().absolute()
    except OSError:  # a relative path, and the working directory was removed
        raise UsageError(
            f"{kind} file {path!r} is relative, and the current directory no longer exists; "
            "give an absolute path, or run from an existing directory"
        ) from None
    try:
        data = read_input(p, kind, path)
    except FileNotFoundError:
        where = "" if os.path.isabs(os.path.expanduser(path)) else f" (looked for {p})"
        raise UsageError(f"{kind} file {path!r} does not exist{where}; {given}") from None
    except IsADirectoryError:
        example = os.path.join(path, f"{kind}.txt")
        raise UsageError(
            f"{kind} file {path!r} is a directory, not a file; give the file in it, e.g. {example}"
        ) from None
    except OSError as exc:
        raise UsageError(
            f"cannot read {kind} file {path!r}: {exc.strerror}; make it readable for this user "
            f"or {given}"
        ) from None
    return InputFile(path=p, sha256=hex_digest(data), data=data), data


def read_input(path: Path, kind: str, given: str) -> bytes:
    """The bytes of a regular file or a pipe (process substitution), read once, bounded in size
    and, for a pipe, in time. A device (`/dev/zero`), socket or FIFO without data never hangs
    or floods dbtvenv."""
    import select
    import stat
    import time

    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY)
    try:
        mode = os.fstat(fd).st_mode
        if stat.S_ISDIR(mode):
            raise IsADirectoryError
        pipe = stat.S_ISFIFO(mode)
        if not pipe and not stat.S_ISREG(mode):
            raise UsageError(
                f"{kind} file {given!r} is not a regular file (a device or socket); give a "
                "file, or a pipe such as <(printf 'dbt-duckdb~=1.9.0')"
            )
        chunks: list[bytes] = []
        size = 0
        deadline = time.monotonic() + PIPE_READ_TIMEOUT
        while True:
            try:
                chunk = os.read(fd, 65536)
            except BlockingIOError:  # a pipe whose writer has not written yet
                left = deadline - time.monotonic()
                if left <= 0:
                    raise UsageError(
                        f"{kind} file {given!r} is a pipe that delivered no end of file within "
                        f"{PIPE_READ_TIMEOUT:g} s; give a file, or make its writer finish"
                    ) from None
                select.select([fd], [], [], left)
                continue
            if not chunk:
                break
            size += len(chunk)
            if size > MAX_INPUT_BYTES:
                raise UsageError(
                    f"{kind} file {given!r} is larger than {MAX_INPUT_BYTES >> 20} MiB, far "
                    "more than any requirements file; check the path"
                )
            chunks.append(chunk)
    finally:
        os.close(fd)
    return b"".join(chunks)


_INCLUDE = re.compile(
    rb"^(?P<lead>[ \t]*(?:-r|-c|-f|(?:--requirement|--constraint|--find-links)(?=[ \t=])))"
    rb"(?P<sep>[ \t]*=?[ \t]*)(?P<value>[^ \t\r\n]+)"
)


def private_copy(input_file: InputFile) -> bytes:
    """The bytes to give the installer in place of `input_file`: the bytes keyed, with the
    files it names by a relative path (`-r base.txt`, `-c constraints.txt`, `-f wheels/`)
    made absolute, as pip would have resolved them next to the original file."""
    base = os.fsencode(input_file.path.parent)
    lines = input_file.data.splitlines(keepends=True)
    for i, line in enumerate(lines):
        match = _INCLUDE.match(line)
        if match is None:
            continue
        value = match["value"]
        if os.path.isabs(value) or b":" in value or value.startswith(b"$"):
            continue  # absolute, a URL, or a variable pip expands
        resolved = os.path.join(base, value)
        if match["lead"].strip() in (b"-f", b"--find-links") and not os.path.exists(resolved):
            continue  # pip reads a find-links path next to the file only if it is there
        lines[i] = line[: match.start("value")] + resolved + line[match.end("value") :]
    return b"".join(lines)


# Runs on any Python, even 2.7, so that one too old is told so (`-I` is 3.4+: `-E -s` and no
# current directory on sys.path do the same here).
_PROBE = (
    "import sys; del sys.path[0]; import json, platform; "
    "impl = getattr(sys, 'implementation', None); "
    "print(json.dumps([impl.name if impl else platform.python_implementation().lower(), "
    "sys.version.split()[0], sys.version_info >= (3, 8)]))"
)


def find_interpreter(python: str | None) -> Interpreter:
    """The base interpreter of the env; asking a foreign one costs one short child process."""
    if python is None:
        # The interpreter below dbtvenv's own venv, if any: the env must not depend on that venv.
        base = getattr(sys, "_base_executable", None) or sys.executable
        # As the probe reads it, so that naming this interpreter with --python gives one key.
        return Interpreter(base, sys.version.split()[0], sys.implementation.name)
    import shutil

    found = shutil.which(python) if os.sep not in python else python
    if found is None or not os.path.isfile(found):
        where = "not found on PATH" if found is None else "no such file"
        if found is not None and os.path.isdir(found):
            where = "a directory, not an interpreter"
        raise UsageError(
            f"--python {python!r}: {where}; give the path of a Python 3.8+ interpreter, "
            "e.g. --python /usr/bin/python3.11"
        )
    executable = os.path.abspath(found)
    if not os.access(executable, os.X_OK):
        raise UsageError(
            f"--python {python!r}: {executable} is not executable; give a Python interpreter"
        )
    try:
        probe = subprocess.run(
            [executable, "-E", "-s", "-c", _PROBE],
            capture_output=True,
            timeout=60,
            stdin=subprocess.DEVNULL,
        )
    except (OSError, subprocess.SubprocessError) as exc:
        said = getattr(exc, "strerror", None) or "it did not answer within 60 s"
        raise UsageError(
            f"--python {python!r}: {executable} does not run as a Python interpreter ({said}); "
            "give the path of a Python 3.8+ interpreter"
        ) from None
    try:
        if probe.returncode != 0:
            raise ValueError
        implementation, version, supported = json.loads(probe.stdout)
    except ValueError:
        lines = probe.stderr.decode("utf-8", "replace").strip().splitlines()
        said = f" (it said: {lines[0].strip()[:200]})" if lines else ""
        raise UsageError(
            f"--python {python!r}: {executable} does not run as a Python interpreter{said}; "
            "give the path of a Python 3.8+ interpreter"
        ) from None
    if not supported:
        raise UsageError(
            f"--python {python!r}: Python {version} is too old for dbt, which needs 3.8 or "
            "newer; give a newer interpreter"
        )
    return Interpreter(executable, str(version), str(implementation))
