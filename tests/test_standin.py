"""The stand-in dbt works on its own: plain venvs, plain pip, no dbtvenv involved."""

from __future__ import annotations

import base64
import csv
import hashlib
import io
import json
import os
import signal
import subprocess
import sys
import zipfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest
from procs import assert_no_survivors, children_of, kill_quietly, wait_for_pidfile
from standin import STANDIN_VERSIONS, expected_output

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals and bin/")


@dataclass(frozen=True)
class Venvs:
    standin: dict[str, Path]  # version -> venv with dbt-standin==version
    no_dbt: Path  # venv with no-dbt-here only


def _make_venv(path: Path, wheelhouse: Path, requirement: str) -> Path:
    subprocess.run(
        [sys.executable, "-m", "venv", "--without-pip", str(path)], check=True, timeout=120
    )
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "--python",
            str(path / "bin" / "python"),
            "--disable-pip-version-check",
            "--quiet",
            "install",
            "--no-index",
            "--find-links",
            str(wheelhouse),
            requirement,
        ],
        check=True,
        timeout=300,
    )
    return path


@pytest.fixture(scope="module")
def venvs(wheelhouse: Path, tmp_path_factory: pytest.TempPathFactory) -> Venvs:
    root = tmp_path_factory.mktemp("standin-venvs")
    return Venvs(
        standin={
            version: _make_venv(root / f"standin-{version}", wheelhouse, f"dbt-standin=={version}")
            for version in STANDIN_VERSIONS
        },
        no_dbt=_make_venv(root / "no-dbt", wheelhouse, "no-dbt-here"),
    )


@pytest.fixture
def dbt(venvs: Venvs) -> Path:
    return venvs.standin["1.0.0"] / "bin" / "dbt"


@pytest.fixture
def spawned() -> Iterator[list[int]]:
    """Pids to SIGKILL after the test, whatever its outcome."""
    pids: list[int] = []
    yield pids
    kill_quietly(pids)


def _env(**extra: str) -> dict[str, str]:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("STANDIN_")}
    environ.update(extra)
    return environ


def _run(
    dbt: Path, *args: str, env: Mapping[str, str] | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [str(dbt), *args],
        env=dict(env) if env is not None else _env(),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        timeout=timeout,
    )


def test_wheels_have_valid_records(wheelhouse: Path) -> None:
    names = sorted(p.name for p in wheelhouse.glob("*.whl"))
    assert names == [
        "dbt_standin-1.0.0-py3-none-any.whl",
        "dbt_standin-2.0.0-py3-none-any.whl",
        "no_dbt_here-1.0.0-py3-none-any.whl",
    ]
    for wheel in wheelhouse.glob("*.whl"):
        with zipfile.ZipFile(wheel) as archive:
            (record_name,) = [n for n in archive.namelist() if n.endswith(".dist-info/RECORD")]
            rows = list(csv.reader(io.StringIO(archive.read(record_name).decode())))
            assert {row[0] for row in rows} == set(archive.namelist())
            for path, digest, size in rows:
                if path == record_name:
                    assert (digest, size) == ("", "")
                    continue
                data = archive.read(path)
                raw = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=")
                assert digest == "sha256=" + raw.decode()
                assert int(size) == len(data)


def test_expected_output_is_exact_and_lines_are_unique() -> None:
    assert expected_output(0) == b""
    assert expected_output(10) == b"line 00000"
    data = expected_output(200_000)
    assert len(data) == 200_000
    lines = data.split(b"\n")[:-1]
    assert len(set(lines)) == len(lines)
    assert expected_output(1000) == data[:1000]


def test_reports_argv_and_venv(venvs: Venvs, dbt: Path, tmp_path: Path) -> None:
    result = subprocess.run(
        [str(dbt), "run", "--select", "a b"],
        env=_env(STANDIN_MARK="marked"),
        cwd=tmp_path,
        capture_output=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["argv"] == ["run", "--select", "a b"]
    assert Path(report["cwd"]).resolve() == tmp_path.resolve()
    assert Path(report["prefix"]).resolve() == venvs.standin["1.0.0"].resolve()
    assert Path(report["executable"]).parent == venvs.standin["1.0.0"] / "bin"
    assert report["env"]["STANDIN_MARK"] == "marked"
    assert report["shadow"] is None
    assert report["version"] == "1.0.0"
    assert report["pid"] > 0


def test_second_version_installs_too(venvs: Venvs) -> None:
    result = _run(venvs.standin["2.0.0"] / "bin" / "dbt", "--version")
    assert result.returncode == 0, result.stderr
    assert result.stdout == b"Core:\n  - installed: 2.0.0 (standin)\n"


def test_version(dbt: Path) -> None:
    result = _run(dbt, "--version")
    assert (result.returncode, result.stdout) == (0, b"Core:\n  - installed: 1.0.0 (standin)\n")


def test_sees_shadow_module_on_pythonpath(dbt: Path, tmp_path: Path) -> None:
    # The probe works: a module on PYTHONPATH is found (dbtvenv must prevent exactly this).
    (tmp_path / "shadowme.py").write_text("")
    report = json.loads(_run(dbt, env=_env(PYTHONPATH=str(tmp_path))).stdout)
    assert report["shadow"] == str(tmp_path / "shadowme.py")
    assert report["env"]["PYTHONPATH"] == str(tmp_path)


def test_exit_status(dbt: Path) -> None:
    assert _run(dbt, "run", env=_env(STANDIN_EXIT="3")).returncode == 3


def test_kill_self(dbt: Path) -> None:
    result = _run(dbt, "run", env=_env(STANDIN_KILL_SELF="SIGTERM"))
    assert result.returncode == -signal.SIGTERM
    assert json.loads(result.stdout)["argv"] == ["run"]  # flushed before dying


def test_reads_stdin(dbt: Path) -> None:
    result = subprocess.run(
        [str(dbt)],
        env=_env(STANDIN_READ_STDIN="1"),
        input=b"hello\n",
        capture_output=True,
        timeout=60,
    )
    assert json.loads(result.stdout)["stdin"] == "hello\n"


def test_records_signal_and_exits_128_plus_signum(
    dbt: Path, tmp_path: Path, spawned: list[int]
) -> None:
    pidfile, signals = tmp_path / "pid", tmp_path / "signals"
    env = _env(STANDIN_PIDFILE=str(pidfile), STANDIN_SIGNALS_FILE=str(signals), STANDIN_SLEEP="60")
    with subprocess.Popen([str(dbt), "run"], env=env, stdout=subprocess.DEVNULL) as proc:
        spawned.append(proc.pid)
        assert wait_for_pidfile(pidfile) == proc.pid  # the console script execs python
        os.kill(proc.pid, signal.SIGTERM)
        assert proc.wait(timeout=30) == 128 + signal.SIGTERM
    assert signals.read_text() == "SIGTERM\n"


def test_ignored_signal_is_recorded_and_survived(
    dbt: Path, tmp_path: Path, spawned: list[int]
) -> None:
    pidfile, signals = tmp_path / "pid", tmp_path / "signals"
    env = _env(
        STANDIN_PIDFILE=str(pidfile),
        STANDIN_SIGNALS_FILE=str(signals),
        STANDIN_IGNORE_SIGTERM="1",
        STANDIN_SLEEP="60",
    )
    with subprocess.Popen([str(dbt)], env=env, stdout=subprocess.DEVNULL) as proc:
        spawned.append(proc.pid)
        wait_for_pidfile(pidfile)
        os.kill(proc.pid, signal.SIGTERM)
        with pytest.raises(subprocess.TimeoutExpired):
            proc.wait(timeout=0.5)
        os.kill(proc.pid, signal.SIGINT)
        assert proc.wait(timeout=30) == 128 + signal.SIGINT
    assert signals.read_text() == "SIGTERM\nSIGINT\n"


def test_grandchild(dbt: Path, tmp_path: Path, spawned: list[int]) -> None:
    pidfile, grandchild_pidfile = tmp_path / "pid", tmp_path / "grandchild"
    env = _env(
        STANDIN_PIDFILE=str(pidfile),
        STANDIN_GRANDCHILD_PIDFILE=str(grandchild_pidfile),
        STANDIN_SLEEP="60",
    )
    with subprocess.Popen([str(dbt)], env=env, stdout=subprocess.DEVNULL) as proc:
        spawned.append(proc.pid)
        wait_for_pidfile(pidfile)
        grandchild = wait_for_pidfile(grandchild_pidfile)  # written before the pidfile
        spawned.append(grandchild)
        assert children_of(proc.pid) == [grandchild]
        assert os.getpgid(grandchild) == os.getpgid(proc.pid)
        proc.kill()
        proc.wait(timeout=30)
    assert psutil.pid_exists(grandchild)  # orphaned, still running
    assert children_of(proc.pid) == []
    os.kill(grandchild, signal.SIGKILL)
    assert_no_survivors([proc.pid, grandchild])


def test_first_line_streams_before_sleep(dbt: Path, spawned: list[int]) -> None:
    env = _env(STANDIN_FIRST_LINE="hello now", STANDIN_SLEEP="60")
    with subprocess.Popen([str(dbt)], env=env, stdout=subprocess.PIPE) as proc:
        spawned.append(proc.pid)
        assert proc.stdout is not None
        assert proc.stdout.readline() == b"hello now\n"
        assert proc.poll() is None
        proc.terminate()
        assert proc.wait(timeout=30) == -signal.SIGTERM
        assert proc.stdout.read() == b""  # no JSON report when an output variable is set


def test_large_output_is_exact(dbt: Path) -> None:
    n_out, n_err = 1_000_000, 70_001
    result = _run(dbt, env=_env(STANDIN_STDOUT_BYTES=str(n_out), STANDIN_STDERR_BYTES=str(n_err)))
    assert result.returncode == 0
    assert hashlib.sha256(result.stdout).digest() == hashlib.sha256(expected_output(n_out)).digest()
    assert result.stderr == expected_output(n_err)


def test_no_dbt_here_has_no_dbt(venvs: Venvs) -> None:
    assert not (venvs.no_dbt / "bin" / "dbt").exists()
    python = venvs.no_dbt / "bin" / "python"
    result = subprocess.run(
        [str(python), "-c", "import no_dbt_here; print(no_dbt_here.VALUE)"],
        capture_output=True,
        timeout=60,
    )
    assert result.stdout == b"1\n", result.stderr
