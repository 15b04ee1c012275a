"""Build progress on stderr: a live view on a terminal (a real pseudo-terminal here) that ends
in one summary line, plain timestamped lines elsewhere; never anything on stdout."""

from __future__ import annotations

import fcntl
import io
import os
import pty
import re
import shutil
import struct
import subprocess
import termios
import threading
import time
from collections.abc import Mapping
from datetime import datetime
from pathlib import Path

import pytest
from conftest import MakeEnv, RunDbtvenv
from lockfaults import WheelServer

from dbtvenv import progress

PLAIN_LINE = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ dbtvenv: \S.*$")
COLOUR = re.compile(r"\x1b\[(?:\d+;)*(?:3[0-8]|4[0-8]|9[0-7]|10[0-7])(?:;\d+)*m")
CSI = re.compile(r"\x1b\[(\??)([0-9;]*)([A-Za-z])")


def on_terminal(argv: list[str], env: Mapping[str, str]) -> tuple[int, bytes, str]:
    """Run with stderr on a pseudo-terminal (100 columns), stdout on a pipe."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 100, 0, 0))
    proc = subprocess.Popen(
        argv, env=dict(env), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=slave
    )
    os.close(slave)
    terminal = b""
    while True:
        try:
            chunk = os.read(master, 65536)
        except OSError:  # EIO: every writer has closed the terminal
            break
        if not chunk:
            break
        terminal += chunk
    os.close(master)
    assert proc.stdout is not None
    stdout = proc.stdout.read()
    proc.stdout.close()
    return proc.wait(timeout=60), stdout, terminal.decode("utf-8", "replace")


def screen(output: str) -> list[str]:
    """What a terminal shows after `output`: carriage returns, line erases and cursor moves
    applied (the codes rich uses for a live view); colours and other modes ignored."""
    lines = [""]
    row = col = 0
    i = 0
    while i < len(output):
        match = CSI.match(output, i)
        if match:
            private, params, command = match.groups()
            count = int(params or "1") if params.isdigit() else 1
            if not private and command == "A":
                row = max(row - count, 0)
            elif not private and command == "B":
                row += count
            elif not private and command == "K":
                lines[row] = lines[row][:col] if params in ("", "0") else ""
            elif not private and command == "G":
                col = count - 1
            i = match.end()
            continue
        char = output[i]
        i += 1
        if char == "\r":
            col = 0
        elif char == "\n":
            row += 1
        elif char == "\x1b":
            continue
        else:
            while len(lines) <= row:
                lines.append("")
            line = lines[row].ljust(col)
            lines[row] = line[:col] + char + line[col + 1 :]
            col += 1
        while len(lines) <= row:
            lines.append("")
    return [line.rstrip() for line in lines if line.strip()]


def test_plain_lines_without_a_terminal(
    dbtvenv: RunDbtvenv, cache_dir: Path, standin_env: dict[str, str]
) -> None:
    result = dbtvenv(
        "env", "prepare", "--venv-dir", cache_dir, env={**standin_env, "TERM": "xterm-256color"}
    )
    assert result.returncode == 0, result
    assert result.out == f"{cache_dir}/{result.out.strip().rsplit('/', 1)[1]}\n"
    key = Path(result.out.strip()).name
    lines = result.err.splitlines()
    assert lines and all(PLAIN_LINE.match(line) for line in lines), result.err
    assert "\x1b" not in result.err and "\r" not in result.err
    assert not re.search("[\u2800-\u28ff\u2713]", result.err), "no spinner, no tick marks"
    messages = [line.split(" dbtvenv: ", 1)[1] for line in lines]
    assert messages[0] == f"building env {key}: no env for this spec yet"
    assert "installing 1 requirement(s) with pip" in messages
    assert re.fullmatch(
        rf"built env {key} in [\d.]+ s: dbt-standin 1.0.0 \(1 distributions, pip\)", messages[-1]
    )


def test_live_view_on_a_terminal_vanishes_into_one_summary_line(
    dbtvenv_cmd: list[str], make_env: MakeEnv, cache_dir: Path, standin_env: dict[str, str]
) -> None:
    argv = [*dbtvenv_cmd, "env", "prepare", "--venv-dir", str(cache_dir)]
    env = make_env({**standin_env, "TERM": "xterm-256color", "NO_COLOR": None})
    status, stdout, terminal = on_terminal(argv, env)
    assert status == 0, terminal
    env_dir = Path(stdout.decode().strip())
    assert stdout == f"{env_dir}\n".encode(), "stdout holds the path only"
    assert env_dir.parent == cache_dir

    # While it ran: a live line with a spinner, the phase, the elapsed seconds, pip's step.
    live = terminal.split("\x1b[?25l", 1)[1].split("\x1b[?25h", 1)[0]  # cursor hidden..shown
    plain_live = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", live)
    assert re.search("[\u2800-\u28ff] creating a virtual environment with Python", plain_live)
    assert re.search(r"[\u2800-\u28ff] installing 1 requirement\(s\) with pip +\d+s", plain_live)
    assert re.search(r"with pip +\d+s +(Looking in links|Processing|Successfully)", plain_live)
    assert "verifying dbt" in plain_live
    assert COLOUR.search(terminal), "colours on a terminal"

    # What stays on the screen: why it built, then one summary line.
    assert screen(terminal) == [
        f"dbtvenv: building env {env_dir.name}: no env for this spec yet",
        screen(terminal)[1],
    ]
    assert re.fullmatch(
        rf"\u2713 dbtvenv: built env {env_dir.name} in [\d.]+ s: dbt-standin 1.0.0 "
        r"\(1 distributions, pip\)",
        screen(terminal)[1],
    )


def test_no_color_on_a_terminal(
    dbtvenv_cmd: list[str], make_env: MakeEnv, cache_dir: Path, standin_env: dict[str, str]
) -> None:
    argv = [*dbtvenv_cmd, "env", "prepare", "--venv-dir", str(cache_dir)]
    env = make_env({**standin_env, "TERM": "xterm-256color", "NO_COLOR": "1"})
    status, _, terminal = on_terminal(argv, env)
    assert status == 0, terminal
    assert not COLOUR.search(terminal), "NO_COLOR: no colour codes"
    assert "installing 1 requirement(s) with pip" in terminal, "still live"
    assert re.search(r"built env \w+ in [\d.]+ s", screen(terminal)[-1])


def test_dumb_terminal_gets_plain_lines(
    dbtvenv_cmd: list[str], make_env: MakeEnv, cache_dir: Path, standin_env: dict[str, str]
) -> None:
    argv = [*dbtvenv_cmd, "env", "prepare", "--venv-dir", str(cache_dir)]
    status, _, terminal = on_terminal(argv, make_env({**standin_env, "TERM": "dumb"}))
    assert status == 0, terminal
    assert "\x1b" not in terminal
    lines = terminal.replace("\r\n", "\n").splitlines()
    assert lines and all(PLAIN_LINE.match(line) for line in lines), terminal


def test_a_dbt_run_keeps_stdout_for_dbt_alone(
    dbtvenv_cmd: list[str], make_env: MakeEnv, standin_env: dict[str, str], tmp_path: Path
) -> None:
    """A temporary env built on a terminal: the live view on stderr, dbt's JSON on stdout."""
    argv = [*dbtvenv_cmd, "run", "--select", "x"]
    env = make_env({**standin_env, "TERM": "xterm-256color", "TMPDIR": str(tmp_path)})
    status, stdout, terminal = on_terminal(argv, env)
    assert status == 0, terminal
    assert stdout.count(b"\n") == 1 and stdout.startswith(b'{"argv": ["run", "--select", "x"]')
    assert re.search(r"built temporary env in [\d.]+ s", screen(terminal)[-1])


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_a_quiet_build_gets_a_line_every_15_seconds_saying_what_it_does(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    clock = FakeClock()
    monkeypatch.setattr(progress.time, "monotonic", clock)
    out = io.StringIO()
    reporter = progress.Reporter(out)
    reporter.phase("installing 1 requirement(s) with pip")
    reporter.detail("Collecting dbt-postgres==1.8.0")
    reporter.detail("Building wheels for collected packages: psycopg2")
    for _ in range(44):  # the installer is silent for 44 s, ticked once a second
        clock.now += 1
        reporter.tick()
    messages = [line.split(" dbtvenv: ", 1)[1] for line in out.getvalue().splitlines()]
    assert messages == [
        "installing 1 requirement(s) with pip",
        "still installing 1 requirement(s) with pip: building psycopg2 from source (15 s)",
        "still installing 1 requirement(s) with pip: building psycopg2 from source (30 s)",
    ]
    reporter.done("built env x in 45.0 s")
    clock.now += 60
    reporter.tick()
    assert out.getvalue().splitlines()[-1].endswith("built env x in 45.0 s"), "none after it"


def test_no_heartbeat_on_a_terminal_where_the_live_line_counts(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    clock = FakeClock()
    monkeypatch.setattr(progress.time, "monotonic", clock)
    out = io.StringIO()
    reporter = progress.LiveReporter(out)
    reporter._phase = "installing 1 requirement(s) with pip"  # as phase() sets it, minus rich
    clock.now += 60
    reporter.tick()
    assert out.getvalue() == ""


@pytest.mark.parametrize(
    ("line", "doing"),
    [
        ("Collecting dbt-core>=1.8.0 (from dbt-duckdb==1.9)", "resolving (dbt-core>=1.8.0)"),
        (
            "  Downloading dbt_core-1.9.11-py3-none-any.whl (943 kB)",
            "downloading dbt_core-1.9.11-py3-none-any.whl",
        ),
        (
            "  Building wheel for psycopg2 (pyproject.toml): started",
            "building psycopg2 from source",
        ),
        (
            "INFO: pip is looking at multiple versions of dbt-core to determine which version ...",
            "resolving (trying other versions of dbt-core)",
        ),
        (
            "Installing collected packages: agate, dbt-core",
            "installing 2 distributions and compiling their bytecode",
        ),
        ("Resolved 54 packages in 1.21s", "downloading and preparing 54 packages"),  # uv
        ("Building psycopg2==2.9.10", "building psycopg2==2.9.10 from source"),  # uv
    ],
)
def test_what_the_installer_is_doing(line: str, doing: str) -> None:
    assert progress.activity(line) == doing


def test_a_real_build_held_in_its_download_says_it_is_still_going(
    dbtvenv: RunDbtvenv, cache_dir: Path, wheels: WheelServer
) -> None:
    def release_later() -> None:
        wheels.wait_for_get()
        time.sleep(progress.HEARTBEAT + 2)
        wheels.release()

    wheels.hold()
    releaser = threading.Thread(target=release_later, daemon=True)
    releaser.start()
    spec = ["--requirements", "dbt-standin==1.0.0", "--pip-install-options", wheels.pip_options]
    result = dbtvenv("env", "prepare", "--venv-dir", cache_dir, *spec)
    releaser.join()
    assert result.returncode == 0, result
    lines = result.err.splitlines()
    assert any(
        re.search(r"dbtvenv: still installing 1 requirement\(s\) with pip: \S.* \(1\d s\)$", line)
        for line in lines
    ), result.err
    stamps = [datetime.strptime(line.split(" ", 1)[0], "%Y-%m-%dT%H:%M:%SZ") for line in lines]
    gaps = [(b - a).total_seconds() for a, b in zip(stamps, stamps[1:])]
    assert max(gaps) <= progress.HEARTBEAT + 2, (gaps, result.err)


def test_a_yanked_release_the_installer_warns_of_is_passed_on(
    dbtvenv: RunDbtvenv, cache_dir: Path, wheelhouse: Path, tmp_path: Path
) -> None:
    index = tmp_path / "index"
    index.mkdir()
    wheel = "dbt_standin-1.0.0-py3-none-any.whl"
    shutil.copy(wheelhouse / wheel, index / wheel)
    (index / "index.html").write_text(
        f'<html><body><a href="{wheel}" data-yanked="broken on purpose">{wheel}</a></body></html>\n'
    )
    with WheelServer(index) as server:
        spec = ["--requirements", "dbt-standin==1.0.0", "--pip-install-options", server.pip_options]
        result = dbtvenv("env", "prepare", "--venv-dir", cache_dir, *spec)
    assert result.returncode == 0, result
    messages = [line.split(" dbtvenv: ", 1)[1] for line in result.err.splitlines()]
    assert any(
        m.startswith("WARNING: The candidate selected for download or install is a yanked version")
        for m in messages
    ), result.err
    assert "Reason for being yanked: broken on purpose" in messages, result.err
