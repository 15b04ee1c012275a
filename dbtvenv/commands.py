"""One function per dbtvenv command: plain arguments in, output and an exit status out.

Nothing here knows Click; `cli.py` parses and calls these.
"""

from __future__ import annotations

import json
import re
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from dbtvenv import provision, store
from dbtvenv.errors import EnvNotFound, UsageError
from dbtvenv.lock import lock_lease, read_lock
from dbtvenv.progress import Reporter, make_reporter
from dbtvenv.settings import DEFAULT_KILL_GRACE, Settings, env_seconds
from dbtvenv.spec import EnvSpec, resolve_spec


@dataclass(frozen=True)
class EnvOptions:
    """The ENV OPTIONS of the contract, as the user gave them."""

    requirements: Sequence[str] = ()
    requirements_files: Sequence[str] = ()
    constraints: Sequence[str] = ()
    venv_dir: str | None = None
    temporary: bool = False
    pip_install_options: str | None = None
    python: str | None = None
    system_site_packages: bool = False
    lock_timeout: float = 120.0
    installer: str = "pip"

    def spec(self) -> EnvSpec:
        return resolve_spec(
            requirements=self.requirements,
            requirements_files=self.requirements_files,
            constraints_files=self.constraints,
            pip_install_options=self.pip_install_options,
            python=self.python,
            system_site_packages=self.system_site_packages,
        )

    def settings(self) -> Settings:
        return Settings(
            installer=self.installer,
            lock_timeout=self.lock_timeout,
            lock_lease=lock_lease(),
            kill_grace=env_seconds("DBTVENV_KILL_GRACE", DEFAULT_KILL_GRACE),
        )

    @property
    def persistent(self) -> bool:
        return bool(self.venv_dir) and not self.temporary

    def cache_root(self, command: str) -> Path:
        if not self.venv_dir:
            raise UsageError(f"{command} needs --venv-dir DIR (or DBTVENV_VENV_DIR)")
        return Path(self.venv_dir).expanduser().absolute()


def run_dbt(options: EnvOptions, dbt_args: Sequence[str]) -> int:
    """`dbtvenv <dbt command> ...`: get the env, then run dbt in it."""
    from dbtvenv.runner import run_dbt as run_in_env

    spec, settings = options.spec(), options.settings()
    reporter = make_reporter()
    try:
        if not options.persistent:
            with provision.temporary_env(spec, settings, reporter) as env_dir:
                return run_in_env(env_dir, dbt_args, kill_grace=settings.kill_grace)
        root = options.cache_root("run")
        for _ in range(3):  # the env may be removed between our check and our use mark
            env_dir = provision.ensure_env(root, spec, settings, reporter)
            with store.mark_in_use(env_dir) as usable:
                if usable:
                    return run_in_env(env_dir, dbt_args, kill_grace=settings.kill_grace)
        raise UsageError(f"env {env_dir} keeps being removed while starting; is a gc running?")
    finally:
        reporter.close()


def env_prepare(options: EnvOptions) -> int:
    root = options.cache_root("env prepare")
    reporter = make_reporter()
    try:
        env_dir = provision.ensure_env(root, options.spec(), options.settings(), reporter)
    finally:
        reporter.close()
    print(env_dir)
    return 0


def env_path(options: EnvOptions) -> int:
    print(options.cache_root("env path") / options.spec().key)
    return 0


def env_info(options: EnvOptions, *, as_json: bool) -> int:
    root = options.cache_root("env info")
    key = options.spec().key
    entry = store.describe_env(root, key)
    if entry.manifest is None:
        state = (
            "is incomplete (its build was interrupted)" if entry.path.exists() else "does not exist"
        )
        raise EnvNotFound(
            f"env {entry.path} {state}; build it with 'dbtvenv env prepare' and the same options"
        )
    info = {**entry.manifest, **entry.to_json()}
    if as_json:
        print(json.dumps(info, indent=2))
        return 0
    rows = [
        ("path", str(entry.path)),
        ("key", key),
        ("requirements", " ".join(info["spec"]["requirements"]) or "-"),
        ("requirements files", _paths(info["spec"]["requirements_files"])),
        ("constraints files", _paths(info["spec"]["constraints_files"])),
        ("pip install options", " ".join(info["spec"]["pip_install_options"]) or "-"),
        ("python", f"{info['python']['implementation']} {info['python']['version']}"),
        ("interpreter", info["python"]["executable"]),
        ("system site packages", "yes" if info["spec"]["system_site_packages"] else "no"),
        ("installer", str(info.get("installer"))),
        ("created", str(info["created"])),
        ("last used", str(info["last_used"])),
        ("in use", "yes" if entry.in_use else "no"),
        ("size", human_size(entry.size)),
        ("distributions", str(len(info["distributions"]))),
    ]
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        print(f"{name:<{width}}  {value}")
    for dist in info["distributions"]:
        print(f"{'':<{width}}  {dist['name']}=={dist['version']}")
    return 0


def _paths(files: list[dict[str, str]]) -> str:
    return " ".join(f["path"] for f in files) or "-"


def env_list(venv_dir: str | None, *, as_json: bool) -> int:
    root = EnvOptions(venv_dir=venv_dir).cache_root("env list")
    entries = store.list_envs(root)
    if as_json:
        print(json.dumps([e.to_json() for e in entries], indent=2))
        return 0
    headers = (
        "KEY",
        "REQUIREMENTS",
        "PYTHON",
        "DBT-CORE",
        "ADAPTERS",
        "SIZE",
        "CREATED",
        "LAST USED",
        "IN USE",
        "COMPLETE",
    )
    rows = [
        (
            e.key,
            " ".join(e.to_json()["requirements"]) or "-",
            e.to_json()["python"] or "-",
            e.version_of("dbt-core") or "-",
            " ".join(e.adapters) or "-",
            human_size(e.size),
            ago(_timestamp(e.created)),
            ago(e.last_used),
            "yes" if e.in_use else "no",
            "yes" if e.complete else "no",
        )
        for e in entries
    ]
    if sys.stdout.isatty():
        from rich.console import Console
        from rich.table import Table

        table = Table(*headers, box=None, header_style="bold")
        for row in rows:
            table.add_row(*row)
        Console().print(table)
    else:
        widths = [max(len(str(r[i])) for r in [headers, *rows]) for i in range(len(headers))]
        for row in [headers, *rows]:
            print("  ".join(f"{cell:<{w}}" for cell, w in zip(row, widths)).rstrip())
    return 0


def env_rm(
    venv_dir: str | None, keys: Sequence[str], *, remove_all: bool, force: bool, lock_timeout: float
) -> int:
    root = EnvOptions(venv_dir=venv_dir).cache_root("env rm")
    if remove_all == bool(keys):
        raise UsageError("env rm takes KEY... or --all, not both and not neither")
    present = store.env_keys(root)
    targets = present if remove_all else list(keys)
    settings = Settings(lock_timeout=lock_timeout, lock_lease=lock_lease())
    reporter = Reporter()
    status = 0
    for key in targets:
        if key not in present:
            reporter.info(f"no env {key} in {root}")
            status = 1
            continue
        env_dir = root / key
        size = store.dir_size(env_dir)
        try:
            with provision.new_lock(root, key, settings, reporter):
                store.remove_env(env_dir, force=force)
        except store.EnvInUse as exc:
            reporter.info(exc.message)
            status = 1
            continue
        reporter.info(f"removed env {key} ({human_size(size)})")
    return status


_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw]?)\s*$")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800, "": 86400}


def parse_duration(text: str) -> float:
    """`30d`, `12h`, `90m`, `45s`, `2w`; a bare number is days."""
    match = _DURATION.match(text)
    if not match:
        raise UsageError(f"--older-than {text!r} is not a duration such as 30d, 12h or 90m")
    return float(match.group(1)) * _UNIT_SECONDS[match.group(2)]


def env_gc(venv_dir: str | None, *, older_than: str, dry_run: bool) -> int:
    from dbtvenv.gc import collect

    cutoff = time.time() - parse_duration(older_than)
    root = Path(venv_dir).expanduser().absolute() if venv_dir else None
    found = collect(root, cutoff=cutoff, dry_run=dry_run, reporter=Reporter())
    verb = "would remove" if dry_run else "removed"
    for item in found:
        print(f"{verb}  {human_size(item.size):>9}  {item.path}  ({item.why})")
    total = sum(item.size for item in found)
    print(f"{verb} {len(found)} item(s), {human_size(total)}")
    return 0


def lock_status(options: EnvOptions, *, as_json: bool) -> int:
    root = options.cache_root("lock status")
    key = options.spec().key
    path = provision.lock_path(root, key)
    state = read_lock(path, lease=lock_lease())
    if as_json:
        print(
            json.dumps(
                {
                    "lock": str(path),
                    "key": key,
                    "state": "free"
                    if state is None
                    else ("stale" if state.stale_reason else "held"),
                    "holder": state.holder.to_json() if state and state.holder else None,
                    "stale_reason": state.stale_reason if state else None,
                },
                indent=2,
            )
        )
    elif state is None:
        print(f"free: nobody holds {path}")
    elif state.stale_reason:
        print(
            f"stale: {path} names {state.describe()}; {state.stale_reason}, "
            "the next run takes it over"
        )
    else:
        print(f"held: {path} by {state.describe()}")
    return 0


def human_size(size: int) -> str:
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def ago(timestamp: float | None) -> str:
    if timestamp is None:
        return "-"
    seconds = max(time.time() - timestamp, 0)
    for unit, length in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= length:
            return f"{seconds // length:.0f}{unit} ago"
    return f"{seconds:.0f}s ago"


def _timestamp(iso: str | None) -> float | None:
    if not iso:
        return None
    from datetime import datetime

    try:
        return datetime.fromisoformat(iso).timestamp()
    except ValueError:
        return None


MAX_DETAIL = 400


def echo_error(message: str, details: Sequence[str] = ()) -> None:
    sys.stderr.write(f"dbtvenv: error: {message}\n")
    for line in details:
        shown = line if len(line) <= MAX_DETAIL else line[: MAX_DETAIL - 3] + "..."
        sys.stderr.write(f"  {shown}\n")
    sys.stderr.flush()
