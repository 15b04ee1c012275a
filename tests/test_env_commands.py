"""env prepare / path / info / list / rm against real envs built offline with the stand-in dbt,
and "in use" held by a real, long-running dbtvenv."""

from __future__ import annotations

import fcntl
import json
import os
import platform
import pty
import re
import signal
import struct
import subprocess
import sys
import termios
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from conftest import MakeEnv, Result, RunDbtvenv
from procs import kill_quietly

ISO = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\+00:00$")
ANSI = re.compile(r"\x1b\[")
COLOUR = re.compile(r"\x1b\[(?:\d+;)*(?:3[0-8]|4[0-8]|9[0-7]|10[0-7])(?:;\d+)*m")


def prepare(dbtvenv: RunDbtvenv, cache: Path, env: Mapping[str, str], requirements: str) -> Path:
    result = dbtvenv(
        "env", "prepare", "--venv-dir", cache, env={**env, "DBTVENV_REQUIREMENTS": requirements}
    )
    assert result.returncode == 0, result
    return Path(result.out.strip())


def env_list(dbtvenv: RunDbtvenv, cache: Path) -> list[dict[str, Any]]:
    result = dbtvenv("env", "list", "--venv-dir", cache, "--json")
    assert result.returncode == 0, result
    rows: list[dict[str, Any]] = json.loads(result.stdout)
    return rows


def set_last_use(env_dir: Path, when: float) -> None:
    """Make an env look used (and built) at `when`."""
    (env_dir / "dbtvenv.use").touch()
    for name in ("dbtvenv.use", "dbtvenv.json"):
        os.utime(env_dir / name, (when, when))


@contextmanager
def long_run(
    dbtvenv_cmd: list[str],
    make_env: MakeEnv,
    tmp_path: Path,
    env: Mapping[str, str],
    *args: str,
) -> Iterator[subprocess.Popen[bytes]]:
    """A dbtvenv running a sleeping dbt; yields once dbt runs, ends it with SIGTERM after."""
    pidfile = tmp_path / "dbt.pid"
    pidfile.unlink(missing_ok=True)
    with open(tmp_path / "run.err", "wb") as err:
        proc = subprocess.Popen(
            [*dbtvenv_cmd, "run", *args],
            env=make_env({**env, "STANDIN_SLEEP": "300", "STANDIN_PIDFILE": str(pidfile)}),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=err,
        )
    dbt_pid = None
    try:
        dbt_pid = wait_for_dbt(proc, pidfile, tmp_path / "run.err")
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        finally:
            kill_quietly([proc.pid, *([dbt_pid] if dbt_pid else [])])


def wait_for_dbt(proc: subprocess.Popen[bytes], pidfile: Path, err: Path) -> int:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        text = pidfile.read_text().strip() if pidfile.exists() else ""
        if text:
            return int(text)
        if proc.poll() is not None:
            raise AssertionError(f"dbtvenv exited {proc.returncode}:\n{err.read_text()}")
        time.sleep(0.02)
    raise AssertionError(f"dbt did not start within 60 s:\n{err.read_text()}")


def assert_error_line(result: Result, status: int, *words: str) -> None:
    assert result.returncode == status, result
    assert result.stdout == b"", result
    first = result.err.splitlines()[0]
    assert first.startswith("dbtvenv: error: "), result
    for word in words:
        assert word in first, result


# --- prepare, path, info ---------------------------------------------------------------------


def test_path_builds_nothing_and_prepare_prints_only_the_path(
    dbtvenv: RunDbtvenv, cache_dir: Path, standin_env: dict[str, str]
) -> None:
    path = dbtvenv("env", "path", "--venv-dir", cache_dir, env=standin_env)
    assert path.returncode == 0, path
    env_dir = Path(path.out.strip())
    assert path.out == f"{env_dir}\n"
    assert env_dir.parent == cache_dir and re.fullmatch(r"[0-9a-f]{16}", env_dir.name)
    assert not cache_dir.exists(), "env path must not create anything"

    built = dbtvenv("env", "prepare", "--venv-dir", cache_dir, env=standin_env)
    assert built.returncode == 0, built
    assert built.out == f"{env_dir}\n", "stdout holds the path and nothing else"
    assert f"building env {env_dir.name}: no env for this spec yet" in built.err
    assert re.search(
        rf"built env {env_dir.name} in [\d.]+ s: dbt-standin 1.0.0 \(1 distributions, pip\)",
        built.err,
    )
    assert (env_dir / "dbtvenv.json").is_file() and (env_dir / "bin" / "dbt").exists()

    again = dbtvenv("env", "prepare", "--venv-dir", cache_dir, env=standin_env)
    assert again.returncode == 0, again
    assert again.out == f"{env_dir}\n"
    assert "building" not in again.err and "nothing to build" in again.err


def test_info_shows_the_manifest_as_text_and_json(
    dbtvenv: RunDbtvenv, cache_dir: Path, standin_env: dict[str, str]
) -> None:
    env_dir = prepare(dbtvenv, cache_dir, standin_env, "dbt-standin==2.0.0")
    info_env = {**standin_env, "DBTVENV_REQUIREMENTS": "dbt-standin==2.0.0"}

    text = dbtvenv("env", "info", "--venv-dir", cache_dir, env=info_env)
    assert text.returncode == 0, text
    fields = dict(re.split(r"\s{2,}", line, maxsplit=1) for line in text.out.splitlines()[:17])
    assert fields["key"] == env_dir.name
    assert fields["path"] == str(env_dir)
    assert fields["requirements"] == "dbt-standin==2.0.0"
    assert fields["python"].startswith(f"cpython {platform.python_version()} (base interpreter ")
    assert fields["adapters"] == "dbt-standin==2.0.0"
    assert fields["implied pins"] == fields["repairs"] == "-"
    assert fields["in use"] == "no"
    assert re.fullmatch(r"\d+\.\d (KiB|MiB)", fields["size"]), fields["size"]
    assert re.fullmatch(r"\S+\+00:00 \(\d+s ago\)", fields["created"]), fields["created"]
    assert re.fullmatch(r"\S+\+00:00 \(\d+s ago\)", fields["last used"]), fields["last used"]
    assert text.out.splitlines()[-1].strip() == "dbt-standin==2.0.0"

    as_json = dbtvenv("env", "info", "--venv-dir", cache_dir, "--json", env=info_env)
    assert as_json.returncode == 0, as_json
    info = as_json.json()
    manifest = json.loads((env_dir / "dbtvenv.json").read_text())
    assert {k: info[k] for k in manifest} == manifest, "the manifest, unchanged"
    assert info["python"]["version"] == platform.python_version()
    assert info["distributions"] == [{"name": "dbt-standin", "version": "2.0.0"}]
    assert info["path"] == str(env_dir) and info["complete"] is True
    assert info["in_use"] is False
    assert isinstance(info["size"], int) and info["size"] > 10_000
    assert ISO.match(info["created"]) and ISO.match(info["last_used"])


def test_info_of_a_missing_or_incomplete_env_is_exit_1(
    dbtvenv: RunDbtvenv, cache_dir: Path, standin_env: dict[str, str]
) -> None:
    missing = dbtvenv("env", "info", "--venv-dir", cache_dir, env=standin_env)
    assert_error_line(missing, 1, "does not exist", "env prepare")

    env_dir = prepare(dbtvenv, cache_dir, standin_env, standin_env["DBTVENV_REQUIREMENTS"])
    (env_dir / "dbtvenv.json").unlink()
    incomplete = dbtvenv("env", "info", "--venv-dir", cache_dir, "--json", env=standin_env)
    assert_error_line(incomplete, 1, "incomplete")


# --- list ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def three_envs(
    tmp_path_factory: pytest.TempPathFactory, wheelhouse: Path, _dbtvenv_pythonpath: str | None
) -> tuple[Path, dict[str, Path]]:
    """A cache dir (read only for the tests that use it) with three envs: used 3 days ago,
    used 2 hours ago, and an incomplete one. Built once for the module."""
    cache = tmp_path_factory.mktemp("three-envs") / "cache"
    environ = {k: v for k, v in os.environ.items() if not k.startswith("DBTVENV_")}
    if _dbtvenv_pythonpath:
        environ["PYTHONPATH"] = _dbtvenv_pythonpath
    environ["DBTVENV_PIP_INSTALL_OPTIONS"] = f"--no-index --find-links {wheelhouse}"

    def build(requirements: str) -> Path:
        done = subprocess.run(
            [sys.executable, "-m", "dbtvenv", "env", "prepare", "--venv-dir", str(cache)],
            env={**environ, "DBTVENV_REQUIREMENTS": requirements},
            capture_output=True,
            timeout=120,
        )
        assert done.returncode == 0, done
        return Path(done.stdout.decode().strip())

    envs = {
        "old": build("dbt-standin==1.0.0"),
        "recent": build("dbt-standin==2.0.0"),
        "broken": build("dbt-standin==1.0.0 no-dbt-here==1.0.0"),
    }
    now = time.time()
    set_last_use(envs["old"], now - 3 * 86400 - 60)
    set_last_use(envs["recent"], now - 2 * 3600 - 60)
    for name in ("dbtvenv.json", "dbtvenv.use"):  # as a build killed before it finished
        (envs["broken"] / name).unlink()
    os.utime(envs["broken"], (now - 7 * 86400, now - 7 * 86400))
    return cache, envs


def test_list_json_one_object_per_env_most_recently_used_first(
    dbtvenv: RunDbtvenv, three_envs: tuple[Path, dict[str, Path]]
) -> None:
    cache_dir, envs = three_envs
    rows = env_list(dbtvenv, cache_dir)
    assert [r["key"] for r in rows] == [envs[name].name for name in ("recent", "old", "broken")]
    recent, old, broken = rows
    assert recent["requirements"] == ["dbt-standin==2.0.0"]
    assert old["requirements"] == ["dbt-standin==1.0.0"]
    for row in (recent, old):
        assert row["complete"] is True and row["in_use"] is False
        assert row["python"] == platform.python_version()
        assert row["dbt_core"] is None
        assert row["installer"] == "pip"
        assert isinstance(row["size"], int) and row["size"] > 10_000
        assert ISO.match(row["created"]) and ISO.match(row["last_used"])
    assert recent["adapters"] == {"dbt-standin": "2.0.0"}
    age = datetime.now(timezone.utc) - datetime.fromisoformat(old["last_used"])
    assert timedelta(days=3) < age < timedelta(days=3, minutes=10)
    assert recent["constraints_files"] == recent["implied_pins"] == recent["repairs"] == []
    assert broken["complete"] is False and broken["requirements"] == []
    assert broken["created"] is None and broken["adapters"] == {}


def test_list_table_without_a_terminal_is_plain_aligned_columns(
    dbtvenv: RunDbtvenv, three_envs: tuple[Path, dict[str, Path]]
) -> None:
    cache_dir, envs = three_envs
    result = dbtvenv("env", "list", "--venv-dir", cache_dir, env={"TERM": "xterm-256color"})
    assert result.returncode == 0, result
    assert not ANSI.search(result.out), "no escape codes when stdout is not a terminal"
    header, *lines = result.out.splitlines()
    assert header.split("  ")[0] == "KEY"
    assert re.split(r"\s{2,}", header) == [
        "KEY", "REQUIREMENTS", "ADDED", "PYTHON", "DBT-CORE", "ADAPTERS", "SIZE",
        "CREATED", "LAST USED", "IN USE", "COMPLETE",
    ]  # fmt: skip
    starts = [header.index(name) for name in ("SIZE", "LAST USED", "IN USE")]
    assert len(lines) == 3
    cells = {}
    for line, name in zip(lines, ("recent", "old", "broken")):
        assert line.startswith(envs[name].name)
        size, last_used, in_use = (line[s:].split("  ")[0].strip() for s in starts)
        cells[name] = (size, last_used, in_use)
    assert re.fullmatch(r"\d+\.\d KiB", cells["recent"][0])
    assert cells["recent"][1:] == ("2h ago", "no")
    assert cells["old"][1:] == ("3d ago", "no")
    assert cells["broken"][1] == "7d ago"
    assert lines[2].rstrip().endswith("no"), "the incomplete env is not complete"


def run_on_terminal(argv: list[str], env: Mapping[str, str]) -> bytes:
    """Run with stdout on a pseudo-terminal 160 columns wide; return what it printed."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 160, 0, 0))
    proc = subprocess.Popen(
        argv,
        env={**env, "COLUMNS": "160"},
        stdin=subprocess.DEVNULL,
        stdout=slave,
        stderr=subprocess.PIPE,
    )
    os.close(slave)
    out = b""
    while True:
        try:
            chunk = os.read(master, 65536)
        except OSError:  # EIO: the other end is closed
            break
        if not chunk:
            break
        out += chunk
    os.close(master)
    assert proc.wait(timeout=60) == 0, proc.stderr.read() if proc.stderr else b""
    return out


def test_list_on_a_terminal_is_a_rich_table_and_respects_no_color(
    dbtvenv_cmd: list[str], make_env: MakeEnv, three_envs: tuple[Path, dict[str, Path]]
) -> None:
    cache_dir, envs = three_envs
    argv = [*dbtvenv_cmd, "env", "list", "--venv-dir", str(cache_dir)]
    coloured = run_on_terminal(argv, make_env({"TERM": "xterm-256color", "NO_COLOR": None}))
    text = coloured.decode()
    assert COLOUR.search(text), "a table with colours on a terminal"
    plain_text = re.sub(r"\x1b\[[0-9;]*m", "", text)
    assert all(env_dir.name in plain_text for env_dir in envs.values())
    assert "LAST USED" in plain_text and "2h ago" in plain_text

    no_color = run_on_terminal(argv, make_env({"TERM": "xterm-256color", "NO_COLOR": "1"}))
    assert not COLOUR.search(no_color.decode()), "NO_COLOR: no colour codes"
    assert all(env_dir.name in no_color.decode() for env_dir in envs.values())


def test_list_of_an_empty_or_missing_cache_dir(dbtvenv: RunDbtvenv, tmp_path: Path) -> None:
    assert env_list(dbtvenv, tmp_path / "nothing-here") == []
    table = dbtvenv("env", "list", "--venv-dir", tmp_path / "nothing-here")
    assert table.returncode == 0 and table.stdout == b"", table
    assert "no envs in" in table.err
    no_dir = dbtvenv("env", "list")
    assert_error_line(no_dir, 64, "--venv-dir")
    a_file = tmp_path / "a-file"
    a_file.write_text("")
    for command in (["list"], ["rm", "--all"], ["gc", "--dry-run"]):
        result = dbtvenv("env", *command, "--venv-dir", a_file, env={"TMPDIR": str(tmp_path)})
        assert_error_line(result, 73, "is not a directory")


# --- in use, rm ------------------------------------------------------------------------------


def test_an_env_in_use_is_listed_so_and_rm_refuses_it(
    dbtvenv: RunDbtvenv,
    dbtvenv_cmd: list[str],
    make_env: MakeEnv,
    tmp_path: Path,
    cache_dir: Path,
    standin_env: dict[str, str],
) -> None:
    env_dir = prepare(dbtvenv, cache_dir, standin_env, standin_env["DBTVENV_REQUIREMENTS"])
    set_last_use(env_dir, time.time() - 86400)
    with long_run(dbtvenv_cmd, make_env, tmp_path, standin_env, "--venv-dir", str(cache_dir)):
        (row,) = env_list(dbtvenv, cache_dir)
        assert row["in_use"] is True
        age = datetime.now(timezone.utc) - datetime.fromisoformat(row["last_used"])
        assert age < timedelta(minutes=5), "the run recorded its use"
        table = dbtvenv("env", "list", "--venv-dir", cache_dir)
        assert re.search(r"\s(\d+s|1m) ago\s+yes\s+yes$", table.out.splitlines()[1]), table
        info = dbtvenv("env", "info", "--venv-dir", cache_dir, "--json", env=standin_env)
        assert info.json()["in_use"] is True

        refused = dbtvenv("env", "rm", "--venv-dir", cache_dir, env_dir.name)
        assert_error_line(refused, 1, env_dir.name, "in use", "--force")
        refused_all = dbtvenv("env", "rm", "--venv-dir", cache_dir, "--all")
        assert_error_line(refused_all, 1, "--force")
        assert (env_dir / "dbtvenv.json").is_file() and (env_dir / "bin" / "dbt").exists()

    (row,) = env_list(dbtvenv, cache_dir)
    assert row["in_use"] is False, "no longer in use once the run has ended"
    removed = dbtvenv("env", "rm", "--venv-dir", cache_dir, env_dir.name)
    assert removed.returncode == 0, removed
    assert re.fullmatch(rf"removed env {env_dir.name} \(\d+\.\d KiB\)\n", removed.out)
    assert not env_dir.exists() and env_list(dbtvenv, cache_dir) == []


def test_rm_force_removes_an_env_in_use(
    dbtvenv: RunDbtvenv,
    dbtvenv_cmd: list[str],
    make_env: MakeEnv,
    tmp_path: Path,
    cache_dir: Path,
    standin_env: dict[str, str],
) -> None:
    env_dir = prepare(dbtvenv, cache_dir, standin_env, standin_env["DBTVENV_REQUIREMENTS"])
    with long_run(dbtvenv_cmd, make_env, tmp_path, standin_env, "--venv-dir", str(cache_dir)):
        forced = dbtvenv("env", "rm", "--venv-dir", cache_dir, "--force", env_dir.name)
        assert forced.returncode == 0, forced
        assert forced.out.startswith(f"removed env {env_dir.name} (")
        assert "was in use" in forced.err
        assert not env_dir.exists()
        assert env_list(dbtvenv, cache_dir) == []
        assert not list(cache_dir.glob(".*.trash"))


def test_rm_all_unknown_keys_and_usage(
    dbtvenv: RunDbtvenv, cache_dir: Path, standin_env: dict[str, str]
) -> None:
    one = prepare(dbtvenv, cache_dir, standin_env, "dbt-standin==1.0.0")
    two = prepare(dbtvenv, cache_dir, standin_env, "dbt-standin==2.0.0")

    unknown = dbtvenv("env", "rm", "--venv-dir", cache_dir, "0123456789abcdef")
    assert_error_line(unknown, 1, "no env '0123456789abcdef'", "env list")
    escape = dbtvenv("env", "rm", "--venv-dir", cache_dir, "../cache")
    assert_error_line(escape, 1, "no env '../cache'")
    assert one.exists() and two.exists()

    assert_error_line(dbtvenv("env", "rm", "--venv-dir", cache_dir), 64, "KEY", "--all")
    both = dbtvenv("env", "rm", "--venv-dir", cache_dir, "--all", one.name)
    assert_error_line(both, 64, "not both")

    mixed = dbtvenv("env", "rm", "--venv-dir", cache_dir, "nope", one.name)
    assert mixed.returncode == 1, mixed
    assert mixed.out == f"removed env {one.name} ({mixed.out.split('(')[1]}"
    assert "dbtvenv: error: no env 'nope'" in mixed.err
    assert not one.exists() and two.exists()

    everything = dbtvenv("env", "rm", "--venv-dir", cache_dir, "--all")
    assert everything.returncode == 0, everything
    assert everything.out.startswith(f"removed env {two.name} (")
    assert env_list(dbtvenv, cache_dir) == []
    again = dbtvenv("env", "rm", "--venv-dir", cache_dir, "--all")
    assert again.returncode == 0 and again.stdout == b"" and "no envs in" in again.err


@pytest.mark.parametrize(
    "command",
    [["env", "path", "--requirements", "dbt-x"], ["env", "list", "--json"], ["--help"]],
    ids=lambda words: " ".join(words[:2]),
)
def test_a_reader_that_has_gone_is_sigpipe_not_an_error(
    dbtvenv_cmd: list[str], make_env: MakeEnv, tmp_path: Path, command: list[str]
) -> None:
    """`dbtvenv env list --json | head -c 10`: exit 141 as any Unix tool, nothing on stderr."""
    read_end, write_end = os.pipe()
    os.close(read_end)  # gone before dbtvenv writes a byte
    try:
        done = subprocess.run(
            [*dbtvenv_cmd, *command],
            env=make_env({"DBTVENV_VENV_DIR": str(tmp_path / "cache")}),
            stdout=write_end,
            stderr=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
            timeout=60,
        )
    finally:
        os.close(write_end)
    assert done.returncode == 128 + signal.SIGPIPE, done
    assert done.stderr == b"", done


def test_list_tells_apart_envs_that_differ_only_in_constraints(
    dbtvenv: RunDbtvenv, cache_dir: Path, standin_env: dict[str, str], tmp_path: Path
) -> None:
    constraints = tmp_path / "constraints.txt"
    constraints.write_text("dbt-standin<2\n")
    plain = prepare(dbtvenv, cache_dir, standin_env, "dbt-standin")
    constrained = prepare(
        dbtvenv, cache_dir, {**standin_env, "DBTVENV_CONSTRAINTS": str(constraints)}, "dbt-standin"
    )
    assert plain != constrained
    rows = {row["key"]: row for row in env_list(dbtvenv, cache_dir)}
    assert rows[plain.name]["constraints_files"] == []
    assert rows[constrained.name]["constraints_files"] == [str(constraints)]
    assert rows[plain.name]["adapters"] == {"dbt-standin": "2.0.0"}
    assert rows[constrained.name]["adapters"] == {"dbt-standin": "1.0.0"}

    table = dbtvenv("env", "list", "--venv-dir", cache_dir)
    assert table.returncode == 0, table
    lines = {line.split()[0]: line for line in table.out.splitlines()[1:]}
    assert lines[constrained.name].split()[1:4] == ["dbt-standin", "-c", str(constraints)]
    assert lines[plain.name].split()[1:3] == ["dbt-standin", "-"]
