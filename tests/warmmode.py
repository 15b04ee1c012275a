"""Running the lifecycle tests both ways: dbt started directly, and forked by a warm process.

A test module parametrizes its persistent env over `MODES`; `mode_settings` gives the variables
of a mode, `warm_up` runs dbtvenv until a run is served warm (the first one of a warm process
runs directly while the warm process starts), and `assert_mode` checks from dbtvenv's debug
output that a run went the way the test meant it to: a warm path that silently fell back would
pass every lifecycle test without testing anything.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path

import psutil

MODES = ("direct", "warm")
WARM_LINE = "dbtvenv: debug: dbt runs warm"
_FORKED_BY = re.compile(r"dbt runs warm: pid (\d+), forked by warm process (\d+)")


def mode_settings(mode: str, run_dir: Path) -> dict[str, str]:
    """dbtvenv's variables for `mode`; a warm process's files go to `run_dir` (private)."""
    if mode == "direct":
        return {}
    return {"DBTVENV_WARM": "1", "DBTVENV_DEBUG": "1", "XDG_RUNTIME_DIR": str(run_dir)}


def warm_up(
    environ: Mapping[str, str], *args: str, timeout: float = 90.0, cwd: Path | None = None
) -> int:
    """Run `dbtvenv run ARGS` (a quick stand-in run) until it is served warm; the warm
    process's pid."""
    deadline = time.monotonic() + timeout
    while True:
        done = subprocess.run(
            [sys.executable, "-m", "dbtvenv", "run", *args],
            env=dict(environ),
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=120,
        )
        stderr = done.stderr.decode("utf-8", "replace")
        match = _FORKED_BY.search(stderr)
        if match:
            return int(match.group(2))
        if time.monotonic() >= deadline:
            raise AssertionError(f"no warm run after {timeout}s; last stderr:\n{stderr}")
        time.sleep(0.2)


def assert_mode(stderr: str, mode: str) -> None:
    """The run went `mode`'s way: forked by a warm process, or started directly."""
    assert (WARM_LINE in stderr) == (mode == "warm"), f"not a {mode} run:\n{stderr}"


def warm_server_of(stderr: str) -> int:
    """The pid of the warm process that forked the run, from its debug line."""
    match = _FORKED_BY.search(stderr)
    assert match, stderr
    return int(match.group(2))


def stop_warm_processes(run_dir: Path) -> None:
    """SIGTERM every warm process whose files are in `run_dir`, and wait until they are gone."""
    procs = []
    for state in (run_dir / "dbtvenv").glob("w*-*.json"):
        with contextlib.suppress(OSError, ValueError, KeyError, psutil.Error):
            proc = psutil.Process(int(json.loads(state.read_text())["pid"]))
            proc.send_signal(signal.SIGTERM)
            procs.append(proc)
    _, alive = psutil.wait_procs(procs, timeout=15)
    for proc in alive:
        with contextlib.suppress(psutil.Error):
            proc.kill()


def requests_served(environ: Mapping[str, str]) -> int:
    """How many requests the warm processes of the env have served, as `env info --json`
    tells (for a test that keeps dbtvenv's stderr free of debug lines)."""
    done = subprocess.run(
        [sys.executable, "-m", "dbtvenv", "env", "info", "--json"],
        env=dict(environ),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    return sum(w["requests"] or 0 for w in json.loads(done.stdout)["warm_processes"])


def private_run_dir(base: Path) -> Path:
    """A run dir (`XDG_RUNTIME_DIR`) of mode 0700 under `base`, with a short path."""
    path = base / "run"
    path.mkdir(mode=0o700, exist_ok=True)
    os.chmod(path, 0o700)
    return path
