"""One function per dbtvenv command: plain arguments in, output and an exit status out.

Nothing here knows Click; `cli.py` parses and calls these.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple, Union

from dbtvenv import credentials, provision, store, trust
from dbtvenv.errors import (
    EX_NOT_FOUND,
    DbtvenvError,
    EnvBusy,
    EnvNotFound,
    OutputError,
    UsageError,
    VenvDirError,
)
from dbtvenv.progress import Reporter, make_reporter
from dbtvenv.settings import Settings, kill_grace, lock_lease
from dbtvenv.spec import EnvSpec, resolve_spec


class EnvOptions(NamedTuple):
    """The ENV OPTIONS of the contract, as the user gave them."""

    requirements: Sequence[str] = ()
    requirements_files: Sequence[str] = ()
    constraints: Sequence[str] = ()
    venv_dir: str | None = None
    temporary: bool = False
    pip_install_options: str | None = None
    python: str | None = None
    system_site_packages: bool = False
    no_implied_pins: bool = False
    lock_timeout: float = 120.0
    installer: str = "pip"
    warm: bool = False

    def spec(self) -> EnvSpec:
        spec = resolve_spec(
            requirements=self.requirements,
            requirements_files=self.requirements_files,
            constraints_files=self.constraints,
            pip_install_options=self.pip_install_options,
            python=self.python,
            system_site_packages=self.system_site_packages,
            no_implied_pins=self.no_implied_pins,
        )
        # A credential the installer could only get on its command line: refused before
        # anything is locked or built.
        credentials.split(spec.pip_install_options, spec.requirements, installer=self.installer)
        return spec

    def settings(self) -> Settings:
        return Settings(
            installer=self.installer,
            lock_timeout=self.lock_timeout,
            lock_lease=lock_lease(),
            kill_grace=kill_grace(),
        )

    @property
    def persistent(self) -> bool:
        return bool(self.venv_dir) and not self.temporary

    def cache_root(self, command: str) -> Path:
        if not self.venv_dir:
            raise UsageError(f"{command} needs --venv-dir DIR (or DBTVENV_VENV_DIR)")
        return absolute_dir(self.venv_dir)


def run_dbt(options: EnvOptions, dbt_args: Sequence[str]) -> int:
    """`dbtvenv <dbt command> ...`: get the env, then run dbt in it."""
    from dbtvenv.runner import run_dbt as run_in_env

    spec, settings = options.spec(), options.settings()
    reporter = make_reporter()
    try:
        if not options.persistent:
            if options.warm:
                from dbtvenv.warm import debug

                debug("running dbt directly: warm mode needs a persistent env (--venv-dir)")
            with provision.temporary_env(spec, settings, reporter) as env_dir:
                return run_in_env(env_dir, dbt_args, kill_grace=settings.kill_grace)
        root = options.cache_root("run")
        for _ in range(3):  # the env may be removed between our check and our use mark
            env_dir = provision.ensure_env(root, spec, settings, reporter)
            with store.mark_in_use(env_dir) as usable:
                if usable:
                    if options.warm:
                        status = _run_warm(env_dir, dbt_args, kill_grace=settings.kill_grace)
                        if status is not None:
                            return status
                    return run_in_env(env_dir, dbt_args, kill_grace=settings.kill_grace)
        raise EnvBusy(
            f"env {env_dir} was removed three times while dbt was starting in it; is an "
            "'env gc' or 'env rm' running? Try again later"
        )
    finally:
        reporter.close()


def _run_warm(env_dir: Path, dbt_args: Sequence[str], *, kill_grace: float) -> int | None:
    """dbt's status from a run in the env's warm process, or None: then run it directly."""
    from dbtvenv import warm
    from dbtvenv.runner import dbt_environment

    return warm.run(env_dir, dbt_args, dbt_environment(env_dir), kill_grace=kill_grace)


def env_prepare(options: EnvOptions) -> int:
    """Build or verify the env; its path is the only thing on stdout."""
    root = options.cache_root("env prepare")
    spec = options.spec()
    reporter = make_reporter()
    try:
        provision.check_cache_root(root)
        ready = store.env_problem(root / spec.key) is None
        env_dir = provision.ensure_env(root, spec, options.settings(), reporter)
        if ready:
            reporter.info(f"env {spec.key} is complete and healthy; nothing to build")
    finally:
        reporter.close()
    out(str(env_dir))
    return 0


def env_path(options: EnvOptions) -> int:
    """Where the spec's env lives (or would); creates nothing, not even the venv dir."""
    out(str(options.cache_root("env path") / options.spec().key))
    return 0


def env_info(options: EnvOptions, *, as_json: bool) -> int:
    root = options.cache_root("env info")
    key = options.spec().key
    store.check_readable_root(root)
    entry = store.describe_env(root, key)
    if entry.manifest is None:
        state = (
            "is incomplete (its build was interrupted)" if entry.path.exists() else "does not exist"
        )
        raise EnvNotFound(
            f"env {entry.path} {state}; build it with 'dbtvenv env prepare' and the same options"
        )
    if as_json:
        _print_json(env_info_json(entry))
        return 0
    manifest = entry.manifest
    # A manifest damaged by hand is shown as far as it makes sense, never a crash.
    spec = store.as_dict(manifest.get("spec"))
    python = store.as_dict(manifest.get("python"))
    rows = [
        ("key", key),
        ("path", str(entry.path)),
        ("requirements", " ".join(store.strings(spec.get("requirements"))) or "-"),
        ("requirements files", _paths(spec.get("requirements_files"))),
        ("constraints files", _paths(spec.get("constraints_files"))),
        ("pip install options", shlex.join(store.strings(spec.get("pip_install_options"))) or "-"),
        ("system site packages", "yes" if spec.get("system_site_packages") is True else "no"),
        (
            "python",
            f"{python.get('implementation', '?')} {python.get('version', '?')} "
            f"(base interpreter {python.get('executable', '?')})",
        ),
        ("installer", str(manifest.get("installer", "-"))),
        ("implied pins", " ".join(entry.implied_pins) or "-"),
        ("repairs", " ".join(entry.repairs) or "-"),
        ("dbt-core", entry.version_of("dbt-core") or "-"),
        ("adapters", _versions(entry.adapters)),
        ("created", _when(entry.created)),
        ("last used", _when(entry.last_used)),
        ("in use", "yes" if entry.in_use else "no"),
        ("size", human_size(entry.size)),
        *_warm_rows(entry.path),
        ("distributions", str(len(entry.distributions))),
    ]
    width = max(len(name) for name, _ in rows)
    lines = [f"{name:<{width}}  {value}" for name, value in rows]
    lines += [f"{'':<{width}}  {name}=={version}" for name, version in _manifest_dists(manifest)]
    out("\n".join(lines))
    return 0


def _warm_rows(env_dir: Path) -> list[tuple[str, str]]:
    """One row per warm process of this user for the env (`--warm`), or one that says none."""
    from dbtvenv.warm import warm_processes

    rows = []
    for warm in warm_processes(env_dir):
        requests = "?" if warm.requests is None else str(warm.requests)
        running = f", {warm.active} running" if warm.active else ""
        rss = "?" if warm.rss is None else human_size(warm.rss)
        rows.append(
            (
                "warm process",
                f"pid {warm.pid}, started {_when(warm.started)}, {requests} requests served"
                f"{running}, RSS {rss}",
            )
        )
    return rows or [("warm processes", "none (of this user)")]


def env_info_json(entry: store.EnvEntry) -> dict[str, Any]:
    """The manifest as written at build time, plus what changes after it (docs/json.md)."""
    from dbtvenv.warm import warm_processes

    return {
        **(entry.manifest or {}),
        "path": str(entry.path),
        "complete": entry.complete,
        "in_use": entry.in_use,
        "last_used": store.iso(entry.last_used),
        "size": entry.size,
        "warm_processes": [w.to_json() for w in warm_processes(entry.path)],
    }


def _manifest_dists(manifest: dict[str, Any]) -> list[tuple[str, str]]:
    return [
        (str(d.get("name")), str(d.get("version")))
        for d in store.as_list(manifest.get("distributions"))
        if isinstance(d, dict)
    ]


def _paths(files: object) -> str:
    return " ".join(store.file_paths(files)) or "-"


def _versions(dists: dict[str, str]) -> str:
    return " ".join(f"{name}=={version}" for name, version in dists.items()) or "-"


def _when(timestamp: float | None) -> str:
    return "-" if timestamp is None else f"{store.iso(timestamp)} ({ago(timestamp)})"


class Column(NamedTuple):
    header: str
    style: str = ""  # rich style on a terminal
    drop: int = 0  # on a terminal too narrow for the table: dropped in this order (0: never)


ENV_LIST_COLUMNS = (
    Column("KEY", "cyan"),
    Column("REQUIREMENTS"),
    Column("ADDED", drop=7),  # by dbtvenv: the implied dbt-core line, repairs
    Column("PYTHON", drop=2),
    Column("DBT-CORE", drop=5),
    Column("ADAPTERS", drop=4),
    Column("SIZE", drop=6),
    Column("CREATED", "dim", drop=1),
    Column("LAST USED"),
    Column("IN USE"),
    Column("COMPLETE", drop=3),
)


def env_list(venv_dir: str | None, *, as_json: bool) -> int:
    root = EnvOptions(venv_dir=venv_dir).cache_root("env list")
    entries = store.list_envs(root)
    if as_json:
        _print_json([e.to_json() for e in entries])
        return 0
    if not entries:
        Reporter().info(f"no envs in {root}")
        return 0
    rows = [
        (
            e.key,
            [
                *e.requirements,
                *(f"-r {f}" for f in e.requirements_files),
                *(f"-c {f}" for f in e.constraints_files),
            ]
            or ["-"],
            [*e.implied_pins, *e.repairs] or ["-"],
            e.python or "-",
            e.version_of("dbt-core") or "-",
            [f"{name}=={version}" for name, version in e.adapters.items()] or ["-"],
            human_size(e.size),
            ago(e.created),
            ago(e.last_used),
            "yes" if e.in_use else "no",
            "yes" if e.complete else "no",
        )
        for e in entries
    ]
    highlights = {("IN USE", "yes"): "bold yellow", ("COMPLETE", "no"): "bold red"}
    print_table(ENV_LIST_COLUMNS, rows, highlights=highlights)
    return 0


Cell = Union[str, Sequence[str]]  # several values: one line each on a terminal, else spaced


def print_table(
    columns: Sequence[Column],
    rows: Sequence[Sequence[Cell]],
    *,
    highlights: dict[tuple[str, str], str] | None = None,
) -> None:
    """A rich table on a terminal (colours unless NO_COLOR), plain aligned columns elsewhere.

    On a terminal too narrow for every column, the least useful ones are left out and named
    below the table; plain output always has them all.
    """
    if not _rich_stdout():
        grid = [[c.header for c in columns]]
        grid += [[c if isinstance(c, str) else " ".join(c) for c in row] for row in rows]
        widths = [max(len(r[i]) for r in grid) for i in range(len(columns))]
        lines = ["  ".join(f"{c:<{w}}" for c, w in zip(r, widths)).rstrip() for r in grid]
        out("\n".join(lines))
        return
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    console = Console(highlight=False)
    cells = [[c if isinstance(c, str) else "\n".join(c) for c in row] for row in rows]
    shown = list(range(len(columns)))

    def width(i: int) -> int:
        lines = [columns[i].header, *(line for row in cells for line in row[i].splitlines())]
        return max(len(line) for line in lines)

    for i in sorted((i for i, c in enumerate(columns) if c.drop), key=lambda i: columns[i].drop):
        if sum(width(j) for j in shown) + 2 * (len(shown) - 1) <= console.width:
            break
        shown.remove(i)
    hidden = [columns[i].header for i in range(len(columns)) if i not in shown]
    table = Table(
        box=None,
        header_style="bold",
        pad_edge=False,
        caption=f"not shown on this narrow terminal: {', '.join(hidden)} (see --json)"
        if hidden
        else None,
        caption_style="dim",
        caption_justify="left",
    )
    for i in shown:
        table.add_column(columns[i].header, style=columns[i].style or None, overflow="fold")
    for row in cells:
        table.add_row(
            *(
                Text(row[i], style=(highlights or {}).get((columns[i].header, row[i]), ""))
                for i in shown
            )
        )
    try:
        console.print(table)
    except OSError as exc:
        raise OutputError.writing("stdout", exc) from None


def _rich_stdout() -> bool:
    return sys.stdout.isatty() and os.environ.get("TERM") != "dumb"


def _print_json(value: object) -> None:
    out(json.dumps(value, indent=2))


def env_keys(venv_dir: str) -> list[str]:
    """The keys of the envs in a cache dir (for shell completion); never raises."""
    try:
        return store.env_keys(absolute_dir(venv_dir))
    except DbtvenvError:
        return []


def env_rm(
    venv_dir: str | None, keys: Sequence[str], *, remove_all: bool, force: bool, lock_timeout: float
) -> int:
    """Remove envs under their locks; what was removed goes to stdout, refusals to stderr."""
    root = EnvOptions(venv_dir=venv_dir).cache_root("env rm")
    if remove_all and keys:
        raise UsageError("env rm takes KEY... or --all, not both")
    if not remove_all and not keys:
        raise UsageError(
            f"env rm needs the KEY of an env (see 'dbtvenv env list --venv-dir {root}') or --all"
        )
    present = store.env_keys(root)
    if present:
        provision.check_cache_root(root)
    targets = present if remove_all else list(dict.fromkeys(keys))
    if remove_all and not present:
        Reporter().info(f"no envs in {root}")
    settings = Settings(lock_timeout=lock_timeout, lock_lease=lock_lease())
    reporter = Reporter()
    status = 0
    for key in targets:
        if key not in present:
            echo_error(
                f"no env {key!r} in {root}; 'dbtvenv env list --venv-dir {root}' shows the keys"
            )
            status = EX_NOT_FOUND
            continue
        env_dir = root / key
        size = store.dir_size(env_dir)
        in_use = store.is_in_use(env_dir)
        try:
            with provision.new_lock(root, key, settings, reporter):
                store.remove_env(env_dir, force=force)
        except (store.EnvInUse, trust.Untrusted) as exc:
            echo_error(exc.message)
            status = exc.exit_code
            continue
        if in_use:
            reporter.info(f"env {key} was in use; removed it anyway (--force)")
        _stop_warm_of(env_dir, reporter)
        out(f"removed env {key} ({human_size(size)})")
    return status


def _stop_warm_of(env_dir: Path, reporter: Reporter) -> None:
    from dbtvenv.warm import stop_warm

    for warm in stop_warm(env_dir):
        reporter.info(f"stopped warm process {warm.pid} of env {env_dir.name}")


def env_stop_warm(venv_dir: str | None, keys: Sequence[str], *, stop_all: bool) -> int:
    """Stop this user's warm processes of those envs (all of them with `stop_all`); what was
    stopped goes to stdout. A warm process takes no new request once told, and exits as soon
    as the dbt commands it runs have ended."""
    from dbtvenv.warm import stop_warm, warm_processes

    if stop_all and keys:
        raise UsageError("env stop-warm takes KEY... or --all, not both")
    if not stop_all and not keys:
        raise UsageError("env stop-warm needs the KEY of an env (see 'dbtvenv env list') or --all")
    root = absolute_dir(venv_dir) if venv_dir else None
    if keys and root is None:
        raise UsageError("env stop-warm KEY... needs --venv-dir DIR (or DBTVENV_VENV_DIR)")
    if stop_all:
        envs = sorted({Path(w.env) for w in warm_processes()})
        if root is not None:
            envs = [env for env in envs if env.parent == root]
    else:
        assert root is not None
        envs = [root / key for key in dict.fromkeys(keys)]
    stopped = 0
    for env_dir in envs:
        for warm in stop_warm(env_dir):
            out(f"stopped warm process {warm.pid} of env {env_dir.name}")
            stopped += 1
    if not stopped:
        Reporter().info("no warm process of this user to stop")
    return 0


_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw]?)\s*$")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800, "": 86400}


# The documented range of --older-than (README, "Numbers"): up to 100 years.
MAX_OLDER_THAN = 36500 * 86400.0


def parse_duration(text: str) -> float:
    """`30d`, `12h`, `90m`, `45s`, `2w`; a bare number is days."""
    match = _DURATION.match(text)
    if not match:
        raise UsageError(
            f"--older-than {text!r} is not a duration: write a number with a unit "
            "s, m, h, d or w, e.g. 30d, 12h or 90m"
        )
    seconds = float(match.group(1)) * _UNIT_SECONDS[match.group(2)]
    if seconds > MAX_OLDER_THAN:
        raise UsageError(
            f"--older-than {text!r} is more than 36500d (100 years); write a shorter duration, "
            "e.g. 30d"
        )
    return seconds


def env_gc(venv_dir: str | None, *, older_than: str, dry_run: bool) -> int:
    """Collect garbage. The report (what was removed, bytes freed) is the command's output:
    stdout. Notes on what was kept, and why, go to stderr."""
    from dbtvenv.gc import collect

    cutoff = time.time() - parse_duration(older_than)
    lock_lease()  # a bad DBTVENV_LOCK_LEASE is a usage error before anything is looked at
    root = absolute_dir(venv_dir) if venv_dir else None
    found = collect(root, cutoff=cutoff, dry_run=dry_run, reporter=Reporter())
    verb = "would remove" if dry_run else "removed"
    lines = [f"{verb}  {human_size(i.size):>10}  {i.path}  ({i.why})" for i in found]
    total = human_size(sum(i.size for i in found))
    items = f"{len(found)} item{'' if len(found) == 1 else 's'}"
    if not found:
        lines.append("nothing to remove")
    elif dry_run:
        lines.append(f"would free {total} ({items}); nothing was removed (--dry-run)")
    else:
        lines.append(f"freed {total} ({items})")
    out("\n".join(lines))
    return 0


def lock_status(options: EnvOptions, *, as_json: bool) -> int:
    root = options.cache_root("lock status")
    key = options.spec().key
    path = provision.lock_path(root, key)
    from dbtvenv.lock import read_lock

    # One look: another host's holder cannot be judged by it (see docs/locking.md).
    state = read_lock(path, lease=lock_lease())
    status = "free" if state is None else ("stale" if state.stale_reason else "held")
    other_host = state is not None and state.other_host
    if as_json:
        _print_json(
            {
                "lock": str(path),
                "key": key,
                "state": status,
                "holder": state.holder.to_json() if state and state.holder else None,
                "stale_reason": state.stale_reason if state else None,
                "other_host": other_host,
                "lease": state.lease if other_host and state else None,
                "modified": store.iso(state.mtime) if state else None,
            }
        )
        return 0
    rows = [("lock", str(path))]
    if state is None:
        rows.append(("state", "free: nobody builds or removes this env now"))
    else:
        if state.stale_reason:
            rows.append(("state", f"stale: {state.stale_reason}; the next run takes it over"))
        elif other_host:
            rows.append(
                (
                    "state",
                    "held by another host: one look cannot tell whether its holder lives; a "
                    f"waiter takes it over once it has seen it unchanged for {state.lease:g} s "
                    f"(the lease); last changed {ago(state.mtime)} by this host's clock",
                )
            )
        else:
            rows.append(("state", "held"))
        holder = state.holder
        if state.unreadable_by is not None:
            rows.append(("holder", f"unknown: {state.describe()}"))
        elif holder is None:
            rows.append(("holder", f"unknown (the file cannot be parsed; {ago(state.mtime)})"))
        else:
            since = store.parse_iso(holder.acquired_at)
            rows += [
                ("holder", f"pid {holder.pid} on {holder.hostname}"),
                ("since", f"{holder.acquired_at} ({ago(since)})"),
                ("command", shlex.join(holder.argv)),
            ]
    width = max(len(name) for name, _ in rows)
    out("\n".join(f"{name:<{width}}  {value}" for name, value in rows))
    return 0


def human_size(size: int) -> str:
    """Bytes as people read them: `512 B`, `112.0 KiB`, `1.4 GiB`."""
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024:
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TiB"


def ago(timestamp: float | None) -> str:
    """How long ago, roughly: `12s ago`, `3m ago`, `5h ago`, `2d ago`."""
    if timestamp is None:
        return "-"
    seconds = max(time.time() - timestamp, 0)
    for unit, length in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= length:
            return f"{seconds // length:.0f}{unit} ago"
    return f"{seconds:.0f}s ago"


def out(text: str) -> None:
    """One piece of the command's output, on stdout, flushed: a full disk is exit 74."""
    try:
        sys.stdout.write(text + "\n")
        sys.stdout.flush()
    except BrokenPipeError:
        raise  # the reader has gone: the boundary exits as SIGPIPE would
    except OSError as exc:
        raise OutputError.writing("stdout", exc) from None


def absolute_dir(venv_dir: str) -> Path:
    """The venv dir as an absolute path; a relative one in a removed working dir is 73."""
    try:
        return Path(venv_dir).expanduser().absolute()
    except OSError:
        raise VenvDirError(
            f"venv dir {venv_dir!r} is relative, and the current directory no longer exists; "
            "give an absolute --venv-dir, or run from an existing directory"
        ) from None


MAX_DETAIL = 400


def echo_error(message: str, details: Sequence[str] = ()) -> None:
    sys.stderr.write(f"dbtvenv: error: {message}\n")
    for line in details:
        shown = line if len(line) <= MAX_DETAIL else line[: MAX_DETAIL - 3] + "..."
        sys.stderr.write(f"  {shown}\n")
    sys.stderr.flush()
