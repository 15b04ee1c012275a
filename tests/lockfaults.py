"""Test support for the lock and crash tests: a wheel server, planted locks, background runs.

``WheelServer`` serves a wheelhouse over HTTP on 127.0.0.1. pip is pointed at it with
``--no-index --find-links URL`` (``WheelServer.pip_options``), with ``--no-cache-dir`` so that
every build downloads its wheels again: the number of GETs of a wheel is then the number of
builds that installed it. ``hold()`` makes wheel requests wait until ``release()``, which keeps
a build inside pip's download for as long as a test needs.
"""

from __future__ import annotations

import contextlib
import functools
import http.server
import json
import os
import socket
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

from conftest import Result

STANDIN_WHEEL = "dbt_standin-1.0.0-py3-none-any.whl"
# Far above any hold a test makes: pip's default of 15 s would make it retry a held download,
# which would count as a second build.
PIP_TIMEOUT = 300


class WheelServer:
    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._gets: Counter[str] = Counter()
        self._changed = threading.Condition()
        self._gate = threading.Event()
        self._gate.set()
        handler = functools.partial(_Handler, directory=str(directory), server_state=self)
        self._httpd = _QuietServer(("127.0.0.1", 0), handler)
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._httpd.server_address[1]}/"

    @property
    def pip_options(self) -> str:
        return f"--no-cache-dir --timeout {PIP_TIMEOUT} --no-index --find-links {self.url}"

    def __enter__(self) -> WheelServer:
        self._thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()
        self._httpd.shutdown()
        self._httpd.server_close()

    def reset(self) -> None:
        with self._changed:
            self._gets.clear()
        self.release()

    def hold(self) -> None:
        """Wheel downloads wait from now on (the index page is still served)."""
        self._gate.clear()

    def release(self) -> None:
        self._gate.set()

    def gets(self, name: str = STANDIN_WHEEL) -> int:
        """How many GET requests for `name` (a file of the wheelhouse) arrived."""
        with self._changed:
            return self._gets[name]

    def wait_for_get(self, name: str = STANDIN_WHEEL, count: int = 1, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        with self._changed:
            while self._gets[name] < count:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"no GET of {name} within {timeout} s: {self._gets}")
                self._changed.wait(left)

    def _record(self, name: str) -> None:
        with self._changed:
            self._gets[name] += 1
            self._changed.notify_all()

    def _wait_for_gate(self) -> None:
        self._gate.wait(timeout=600)


class _QuietServer(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # a client killed mid-request (the crash tests do that) is no error of ours


class _Handler(http.server.SimpleHTTPRequestHandler):
    def __init__(self, *args: Any, server_state: WheelServer, **kwargs: Any) -> None:
        self.server_state = server_state
        super().__init__(*args, **kwargs)

    def do_GET(self) -> None:
        name = self.path.split("?")[0].rsplit("/", 1)[-1]
        self.server_state._record(name)
        if name.endswith(".whl"):
            self.server_state._wait_for_gate()
        # The client may have been killed while it waited: that is what some tests do.
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            super().do_GET()

    def log_message(self, format: str, *args: Any) -> None:
        pass


PLANTED_ARGV = ("dbtvenv", "run", "--select", "planted")


def plant_lock(
    path: Path,
    *,
    pid: int,
    create_time: float,
    hostname: str | None = None,
    acquired_at: str = "2026-11-24T15:00:00+00:00",
    age: float = 0.0,
) -> dict[str, Any]:
    """Write a lock file as another dbtvenv would have; `age` sets its mtime into the past."""
    holder = {
        "pid": pid,
        "create_time": create_time,
        "hostname": socket.gethostname() if hostname is None else hostname,
        "acquired_at": acquired_at,
        "argv": list(PLANTED_ARGV),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(holder) + "\n")
    if age:
        past = time.time() - age
        os.utime(path, (past, past))
    return holder


def dead_pid() -> int:
    """The pid of a process that has run and been reaped (so nothing has that pid now)."""
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def wait_until(condition: Callable[[], object], what: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout} s waiting until {what}")
        time.sleep(0.02)


class Background:
    """One dbtvenv process in the background, its output going to files."""

    def __init__(
        self,
        argv: Sequence[str],
        env: Mapping[str, str],
        workdir: Path,
        name: str,
    ) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        self.stdout_path = workdir / f"{name}.out"
        self.stderr_path = workdir / f"{name}.err"
        with open(self.stdout_path, "wb") as out, open(self.stderr_path, "wb") as err:
            self.proc = subprocess.Popen(
                list(argv),
                env=dict(env),
                cwd=workdir,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
            )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def wait(self, timeout: float = 240) -> Result:
        try:
            returncode = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(
                f"pid {self.pid} still ran after {timeout} s; stderr:\n{self.stderr()}"
            ) from None
        return Result(returncode, self.stdout_path.read_bytes(), self.stderr_path.read_bytes())

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
