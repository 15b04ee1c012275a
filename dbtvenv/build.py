"""Build an env in place: a venv without pip, one installer run against its interpreter, then
the manifest, written last. Installers are pip (the default) and uv."""

from __future__ import annotations

import functools
import importlib.util
import json
import os
import re
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from dbtvenv import __version__, credentials, dbt_lines, prereleases, procs
from dbtvenv.compat import explain_failure, repairs, source_build_note
from dbtvenv.errors import BuildError, LockLost, VenvDirError
from dbtvenv.progress import Reporter
from dbtvenv.redact import redact, redact_all
from dbtvenv.spec import EnvSpec, InputFile
from dbtvenv.store import script_record, sync_tree, write_manifest

# Never leak into a helper: they would load the wrong modules, or skip compiling bytecode.
# PIP_USER, PIP_TARGET, PIP_PREFIX and PIP_ROOT (Airflow's images set PIP_USER) would send
# the env's packages somewhere else, even into Airflow's own user site.
_HELPER_ENV_REMOVE = (
    "PYTHONPATH",
    "PYTHONHOME",
    "VIRTUAL_ENV",
    "PYTHONDONTWRITEBYTECODE",
    "PIP_USER",
    "PIP_TARGET",
    "PIP_PREFIX",
    "PIP_ROOT",
)
_LIST_DISTRIBUTIONS = (
    "import importlib.metadata as m, json; "
    "print(json.dumps(sorted({(d.metadata['Name'], d.version) for d in m.distributions() "
    "if d.metadata['Name']})))"
)
_LIST_REQUIRES = (
    "import importlib.metadata as m, json; "
    "print(json.dumps({d.metadata['Name'] + ' ' + d.version: d.requires or [] "
    "for d in m.distributions() if d.metadata['Name']}))"
)


def find_uv() -> str:
    """uv from the optional extra `dbtvenv[uv]`, else from PATH."""
    try:
        from uv import find_uv_bin  # type: ignore[import-not-found, unused-ignore]

        return str(find_uv_bin())
    except (ImportError, FileNotFoundError):
        pass
    found = shutil.which("uv")
    if found is None:
        raise BuildError(
            "--installer uv: uv is not installed; install it with "
            "\"pip install 'dbtvenv[uv]'\" or put uv on PATH, or use --installer pip"
        )
    return found


# pip options about pip itself (its output, prompts, network tuning) that `uv pip install`
# does not take; uv has its own defaults and UV_* variables (UV_HTTP_TIMEOUT) for them. Index,
# find-links, binary and build options are spelt the same and pass through.
_UV_DROPPED_FLAGS = frozenset(
    {
        "--no-input",
        "--no-warn-script-location",
        "--disable-pip-version-check",
        "--no-clean",
        "--require-virtualenv",
    }
)
_UV_DROPPED_WITH_VALUE = frozenset(
    {"--progress-bar", "--root-user-action", "--timeout", "--retries"}
)


def uv_pip_options(options: Sequence[str]) -> list[str]:
    """--pip-install-options as `uv pip install` takes them (the key keeps the user's spelling)."""
    out: list[str] = []
    skip_value = False
    for option in options:
        if skip_value:
            skip_value = False
            continue
        name = option.split("=", 1)[0]
        if name in _UV_DROPPED_FLAGS:
            continue
        if name in _UV_DROPPED_WITH_VALUE:
            skip_value = "=" not in option
            continue
        out.append(option)
    return out


def _host_pip(python_version: str) -> list[str] | None:
    """pip of dbtvenv's own interpreter, if it can install into another (`--python`, 22.3+)
    of that version: a pip runs only on the Pythons it supports (pip 25.3 needs 3.9+)."""
    if importlib.util.find_spec("pip") is None:
        return None
    from importlib.metadata import metadata, version

    major, minor = (int(part) for part in version("pip").split(".")[:2])
    if (major, minor) < (22, 3):
        return None
    requires_python = metadata("pip")["Requires-Python"]
    if requires_python:
        from packaging.specifiers import InvalidSpecifier, SpecifierSet

        try:
            if python_version not in SpecifierSet(requires_python):
                return None  # the env gets a pip of its own (ensurepip) instead
        except InvalidSpecifier:
            return None
    return [sys.executable, "-m", "pip"]


def _host_pip_runner() -> str | None:
    """pip's own script for running this very pip under another interpreter (pip 22.3+)."""
    found = importlib.util.find_spec("pip")
    if found is None or found.origin is None:
        return None
    runner = Path(found.origin).parent / "__pip-runner__.py"
    return str(runner) if runner.is_file() else None


def install_command(
    installer: str,
    env_python: Path,
    spec: EnvSpec,
    public: credentials.InstallerArgs | None = None,
    private_file: Path | None = None,
) -> list[str]:
    """The installer's command line; `public` is what of the options and requirements may be
    on it (credentials.split), `private_file` the private requirements file with the rest."""
    if public is None:
        public = credentials.split(spec.pip_install_options, spec.requirements, installer=installer)
    args: list[str] = []
    for f in spec.requirements_files:
        args += ["-r", str(f.path)]
    for f in spec.constraints_files:
        args += ["-c", str(f.path)]
    if spec.implied_pins:
        args += ["-c", str(env_python.parent.parent / dbt_lines.CONSTRAINTS_FILE)]
    if private_file is not None:
        args += ["-r", str(private_file)]
    if installer == "uv":
        return [
            find_uv(),
            "pip",
            "install",
            "--python",
            str(env_python),
            "--compile-bytecode",
            *prereleases.uv_options(spec),
            *args,
            *uv_pip_options(public.options),
            *public.requirements,
        ]
    args += [*public.options, *public.requirements]
    host_pip = _host_pip(spec.python.version)
    pip = [*host_pip, "--python", str(env_python)] if host_pip else [str(env_python), "-m", "pip"]
    runner = _host_pip_runner() if host_pip else None
    if runner is not None:
        # What `pip --python ENV/bin/python` runs, minus the pip in between: that one starts
        # it as a grandchild, which would outlive a SIGKILLed dbtvenv (the parent-death
        # signal reaches our direct child only) and keep writing into the half-built env.
        pip = [str(env_python), runner]
    quiet = ["--disable-pip-version-check", "--no-input", "--progress-bar", "off"]
    # --no-user: a `user = true` in a pip config file must not install outside the env either
    into_env = ["--no-user", "--compile", "--no-warn-script-location"]
    return [*pip, "install", *quiet, *into_env, *args]


def venv_command(installer: str, env_dir: Path, spec: EnvSpec) -> list[str]:
    site = ["--system-site-packages"] if spec.system_site_packages else []
    if installer == "uv":
        return [
            find_uv(),
            "venv",
            "--quiet",
            "--python",
            spec.python.executable,
            *site,
            str(env_dir),
        ]
    # ensurepip costs seconds; it is needed only when no pip here can install into the env
    without_pip = ["--without-pip"] if _host_pip(spec.python.version) else []
    return [spec.python.executable, "-m", "venv", *without_pip, *site, str(env_dir)]


# Inside the env being built: the installer's temp dir and the private copies of the input
# files. Removed before the manifest is written; a killed build leaves it in the half-built
# env, which goes as a whole.
BUILD_DIR = ".dbtvenv-build"


def _prepare_build_dir(env_dir: Path, spec: EnvSpec) -> tuple[EnvSpec, Path]:
    """The spec as the installer gets it (input files replaced by private copies of the bytes
    keyed) and the temp dir for the installer."""
    from dbtvenv.spec import private_copy

    build_dir = env_dir / BUILD_DIR
    tmp = build_dir / "tmp"
    tmp.mkdir(mode=0o700, parents=True)
    copies: dict[str, list[InputFile]] = {"requirements": [], "constraints": []}
    for kind, files in (
        ("requirements", spec.requirements_files),
        ("constraints", spec.constraints_files),
    ):
        for number, input_file in enumerate(files, 1):
            copy = build_dir / f"{kind}-{number}.txt"
            fd = os.open(copy, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
            with open(fd, "wb") as f:
                f.write(private_copy(input_file))
            copies[kind].append(input_file._replace(path=copy))
    installed = spec._replace(
        requirements_files=tuple(copies["requirements"]),
        constraints_files=tuple(copies["constraints"]),
    )
    return installed, tmp


def build_env(
    env_dir: Path,
    spec: EnvSpec,
    *,
    installer: str,
    reporter: Reporter,
    on_tick: Callable[[], None] = lambda: None,
    tick: float = 1.0,
    durable: bool = False,
) -> dict[str, Any]:
    """Create, fill and verify the env at `env_dir` (which must not exist) and mark it complete.

    `durable`: the env's files are on disk before the manifest is written (a cache env; a
    temporary one does not outlive a power loss anyway). On failure the half-built env is
    removed and a `BuildError` says why.
    """
    started = time.monotonic()
    env = procs.child_environment(remove=_HELPER_ENV_REMOVE)
    for pin in spec.implied_pins:
        reporter.info(pin.reason)
    for note in spec.dbt_line_notes:
        reporter.info(note)
    # Nothing of an env is writable by anyone but its builder, whatever the user's umask:
    # others who use it (and the trust check) rely on that.
    umask = os.umask(0o022)
    os.umask(umask | 0o022)
    keyed = spec
    try:
        reporter.phase(f"creating a virtual environment with Python {spec.python.version}")
        _run(
            venv_command(installer, env_dir, spec),
            env,
            reporter,
            on_tick,
            tick,
            what="venv",
            where=env_dir.parent,
        )
        env_python = env_dir / "bin" / "python"
        if spec.implied_pins:
            (env_dir / dbt_lines.CONSTRAINTS_FILE).write_text(
                dbt_lines.constraints_text(spec.implied_pins)
            )
        spec, tmp = _prepare_build_dir(env_dir, spec)
        # pip's and uv's unpack and build dirs go with the env if the build is killed.
        env = {**env, "TMPDIR": str(tmp), "TEMP": str(tmp), "TMP": str(tmp)}
        count = len(spec.requirements) + len(spec.requirements_files)
        reporter.phase(f"installing {count} requirement(s) with {installer}")
        install = functools.partial(
            _install,
            installer,
            env_python,
            env=env,
            reporter=reporter,
            on_tick=on_tick,
            tick=tick,
            about=spec,
        )
        install(spec)
        reporter.phase("verifying dbt")
        dbt = env_dir / "bin" / "dbt"
        if not os.access(dbt, os.X_OK) or not dbt.is_file():
            raise BuildError(
                "the env has no dbt executable after install: the requirements hold no dbt "
                "adapter or dbt-core; add one, e.g. --requirements 'dbt-postgres~=1.9.0'"
            )
        distributions = _list_distributions(env_python, env)
        fixes = repairs(distributions)
        if fixes:
            for fix in fixes:
                reporter.info(f"installing {fix.requirement}: {fix.reason}")
            repaired = spec._replace(
                requirements=(*spec.requirements, *(fix.requirement for fix in fixes))
            )
            install(repaired)
            distributions = _list_distributions(env_python, env)
        if prereleases.asked_for(spec) is None:
            unasked = prereleases.unasked(distributions, lambda: _list_requires(env_python, env))
            if unasked is not None:
                raise BuildError(unasked)
        manifest = {
            "format": 1,
            "dbtvenv_version": __version__,
            "key": env_dir.name,
            "spec": keyed.describe(),
            "python": {
                "executable": spec.python.executable,
                "version": spec.python.version,
                "implementation": spec.python.implementation,
            },
            "installer": installer,
            "implied_pins": [pin.requirement for pin in spec.implied_pins],
            "repairs": [fix.requirement for fix in fixes],
            "distributions": [{"name": n, "version": v} for n, v in distributions],
            "dbt_executable": script_record(dbt),
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "build_seconds": round(time.monotonic() - started, 2),
        }
        shutil.rmtree(env_dir / BUILD_DIR, ignore_errors=True)
        if durable:
            reporter.phase("writing the env to disk")
            sync_tree(env_dir)
        on_tick()  # a builder that lost its lock must not mark the new holder's env complete
        write_manifest(env_dir, manifest)
    except BaseException as exc:
        if not isinstance(exc, LockLost):  # then the env dir is the new holder's
            shutil.rmtree(env_dir, ignore_errors=True)
        if isinstance(exc, OSError):
            raise VenvDirError(
                f"cannot build the env in {env_dir}: {exc.strerror or exc}; "
                "check free space and permissions of the venv dir"
            ) from None
        raise
    finally:
        os.umask(umask)
        reporter.close()
    return manifest


def _install(
    installer: str,
    env_python: Path,
    spec: EnvSpec,
    *,
    env: dict[str, str],
    reporter: Reporter,
    on_tick: Callable[[], None],
    tick: float,
    about: EnvSpec,
) -> None:
    """One installer run of `spec` (the user's spec is `about`, for failure messages);
    credentials go through a private file or the environment."""
    env_dir = env_python.parent.parent
    public = credentials.split(spec.pip_install_options, spec.requirements, installer=installer)
    with credentials.private_file(public, env_dir) as private:
        _run(
            install_command(installer, env_python, spec, public, private),
            {**env, **public.environ},
            reporter,
            on_tick,
            tick,
            what=installer,
            where=env_dir.parent,
            spec=about,
        )


def _run(
    argv: Sequence[str],
    env: dict[str, str],
    reporter: Reporter,
    on_tick: Callable[[], None],
    tick: float,
    *,
    what: str,
    where: Path,
    spec: EnvSpec | None = None,
) -> None:
    def ticked() -> None:
        on_tick()
        reporter.tick()

    noted: set[str] = set()
    chosen = prereleases.Chosen()

    def on_line(line: str) -> None:
        reporter.detail(line)
        chosen.line(line)
        note = source_build_note(line)
        if note is not None and note not in noted:
            noted.add(note)
            reporter.info(note)

    try:
        result = procs.run_captured(argv, env=env, on_line=on_line, on_tick=ticked, tick=tick)
    except FileNotFoundError as exc:
        raise BuildError(f"cannot run {what}: {exc.filename} not found") from None
    except OSError as exc:  # not a program for this machine (ENOEXEC), not executable, ...
        raise BuildError(f"cannot run {what} ({argv[0]}): {exc.strerror or exc}") from None
    if result.returncode != 0:
        said = "\n".join(result.tail)
        unasked = chosen.failure(what, spec, said) if spec is not None else None
        raise BuildError(
            unasked or _failure_message(what, result.returncode, result.tail, where, spec),
            redact_all(result.tail),
        )


_NO_DISTRIBUTION = re.compile(r"No matching distribution found for (\S+)")


def _failure_message(
    what: str, returncode: int, tail: Sequence[str], where: Path, spec: EnvSpec | None = None
) -> str:
    text = "\n".join(tail)
    missing = _NO_DISTRIBUTION.search(text)
    if missing:
        return (
            f"{what} found no distribution for {redact(missing.group(1))}: check the "
            "requirement's name and version, and the index in --pip-install-options"
        )
    explained = explain_failure(what, text, spec) if spec is not None else None
    if explained is not None:
        return explained
    if "pre-releases weren't enabled" in text:  # uv, told `--prerelease explicit`
        return (
            f"{what} found only pre-releases for part of the requirements, and nothing you gave "
            "asks for one; name the pre-release you want in --requirements, or accept "
            "pre-releases with --pip-install-options --pre (uv's lines below name it)"
        )
    if "No space left on device" in text:
        return (
            f"{what} ran out of disk space building the env in {where}: free space on that "
            "file system ('dbtvenv env gc' removes unused envs) or build elsewhere "
            "(--venv-dir DIR, or TMPDIR for a temporary env), then retry"
        )
    if what == "venv":
        return (
            f"creating the virtual environment failed (exit {returncode}); "
            "check that --python is a complete Python with the venv module"
        )
    return (
        f"{what} failed (exit {returncode}) while installing the env; fix the requirements or "
        f"--pip-install-options as {what}'s last lines below say, then retry"
    )


def _list_requires(env_python: Path, env: dict[str, str]) -> dict[str, list[str]]:
    """Each installed distribution's requirements, by `name version`."""
    result = procs.run_captured([str(env_python), "-I", "-c", _LIST_REQUIRES], env=env)
    try:
        found = json.loads(result.tail[-1]) if result.returncode == 0 else {}
    except (ValueError, IndexError):
        return {}
    return (
        {str(k): [str(r) for r in v] for k, v in found.items()} if isinstance(found, dict) else {}
    )


def _list_distributions(env_python: Path, env: dict[str, str]) -> list[tuple[str, str]]:
    result = procs.run_captured([str(env_python), "-I", "-c", _LIST_DISTRIBUTIONS], env=env)
    try:
        if result.returncode != 0:
            raise ValueError
        return [(str(n), str(v)) for n, v in json.loads(result.tail[-1])]
    except (ValueError, IndexError):
        raise BuildError(
            "the env's interpreter does not run after install", redact_all(result.tail)
        ) from None
