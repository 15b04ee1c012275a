"""dbt's output reaches dbtvenv's stdout and stderr unchanged, as dbt writes it."""

from __future__ import annotations

import contextlib
import hashlib
import os
import select
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from conftest import MakeEnv, RunDbtvenv
from standin import iter_expected_output
from test_signals import LONG_SLEEP, Spawner, finish, in_mode, mode_of, prepare_persistent_env
from warmmode import MODES, assert_mode, requests_served

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux processes")

STDOUT_BYTES = 100_000_000
STDERR_BYTES = 10_000_000
RSS_LIMIT = 100 * 1024 * 1024


@pytest.fixture(scope="module", params=MODES)
def persistent_env(
    request: pytest.FixtureRequest,
    wheelhouse: Path,
    tmp_path_factory: pytest.TempPathFactory,
    _dbtvenv_pythonpath: str | None,
) -> Iterator[dict[str, str]]:
    """The stand-in's persistent env, run directly and warm."""
    settings = prepare_persistent_env(
        tmp_path_factory.mktemp("streaming-cache"), wheelhouse, _dbtvenv_pythonpath
    )
    yield from in_mode(request.param, settings, tmp_path_factory, _dbtvenv_pythonpath)


@pytest.fixture
def spawner(dbtvenv_cmd: list[str], make_env: MakeEnv, tmp_path: Path) -> Iterator[Spawner]:
    spawner = Spawner(dbtvenv_cmd, make_env, tmp_path)
    yield spawner
    spawner.clean_up()


class Digest(threading.Thread):
    """Reads a pipe to its end, keeping only a running sha256 and the byte count."""

    def __init__(self, fd: int) -> None:
        super().__init__(daemon=True)
        self.fd = fd
        self.sha256 = hashlib.sha256()
        self.size = 0
        self.start()

    def run(self) -> None:
        while chunk := os.read(self.fd, 1 << 20):
            self.sha256.update(chunk)
            self.size += len(chunk)


def expected_digest(n: int) -> str:
    sha256 = hashlib.sha256()
    for chunk in iter_expected_output(n):
        sha256.update(chunk)
    return sha256.hexdigest()


def test_large_output_passes_through_byte_for_byte(
    spawner: Spawner, persistent_env: dict[str, str], make_env: MakeEnv
) -> None:
    """100 MB on stdout and 10 MB on stderr arrive unchanged, and never pass through dbtvenv's
    memory (in warm mode, dbt writes to dbtvenv's own descriptors)."""
    quiet = {**persistent_env, "DBTVENV_DEBUG": None}  # stderr is dbt's alone
    warm = mode_of(persistent_env) == "warm"
    served = requests_served(make_env(quiet)) if warm else 0
    proc = spawner.start(
        "run",
        env={
            **quiet,
            "STANDIN_STDOUT_BYTES": str(STDOUT_BYTES),
            "STANDIN_STDERR_BYTES": str(STDERR_BYTES),
        },
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert proc.stdout is not None and proc.stderr is not None
    stdout, stderr = Digest(proc.stdout.fileno()), Digest(proc.stderr.fileno())
    dbtvenv = psutil.Process(proc.pid)
    peak_rss = 0
    while proc.poll() is None:  # sampling dbtvenv's memory while the bytes flow
        with contextlib.suppress(psutil.NoSuchProcess, psutil.ZombieProcess):
            peak_rss = max(peak_rss, dbtvenv.memory_info().rss)
        time.sleep(0.05)
    stdout.join(timeout=60)
    stderr.join(timeout=60)
    assert proc.returncode == 0
    assert (stdout.size, stderr.size) == (STDOUT_BYTES, STDERR_BYTES)
    assert stdout.sha256.hexdigest() == expected_digest(STDOUT_BYTES)
    assert stderr.sha256.hexdigest() == expected_digest(STDERR_BYTES)
    assert 0 < peak_rss < RSS_LIMIT
    if warm:
        assert requests_served(make_env(quiet)) == served + 1


def test_a_line_arrives_while_dbt_still_runs(
    spawner: Spawner, persistent_env: dict[str, str]
) -> None:
    proc = spawner.start(
        "run",
        env={**persistent_env, "STANDIN_FIRST_LINE": "hello", "STANDIN_SLEEP": LONG_SLEEP},
        stdout=subprocess.PIPE,
    )
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], 60)
    assert ready, "no output from dbt within 60 s"
    assert proc.stdout.readline() == b"hello\n"
    assert proc.poll() is None  # dbt sleeps on: the line did not wait for its exit
    os.kill(proc.pid, signal.SIGTERM)
    status, stderr = finish(proc)
    assert status == 128 + signal.SIGTERM, stderr
    assert_mode(stderr, mode_of(persistent_env))


def test_only_dbt_writes_to_stdout_even_while_building(
    dbtvenv: RunDbtvenv, standin_env: dict[str, str], tmp_path: Path
) -> None:
    """A temporary env is built on every run: its progress goes to stderr, stdout is dbt's."""
    tmpdir = tmp_path / "tmp"
    tmpdir.mkdir()
    result = dbtvenv("run", "--select", "x", env={**standin_env, "TMPDIR": str(tmpdir)})
    assert result.returncode == 0, result
    assert result.json()["argv"] == ["run", "--select", "x"]
    assert result.stdout.count(b"\n") == 1
    assert "dbtvenv: " in result.err  # the build said what it did, on stderr
