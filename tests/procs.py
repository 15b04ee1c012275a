"""Process helpers for tests: who is still alive, who descends from whom, pidfiles."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Union

import psutil

ProcessRef = Union[int, psutil.Process]  # a runtime alias: no `|` on Python 3.9


def _alive(proc: ProcessRef) -> bool:
    """True if ``proc`` still runs; zombies and vanished processes count as dead.

    Given a ``psutil.Process`` (rather than a bare pid), a pid reused by a newer process
    also counts as dead.
    """
    try:
        process = proc if isinstance(proc, psutil.Process) else psutil.Process(proc)
        if not process.is_running():
            return False
        return process.status() != psutil.STATUS_ZOMBIE
    except (psutil.NoSuchProcess, psutil.ZombieProcess):
        return False


def _pid(proc: ProcessRef) -> int:
    return proc.pid if isinstance(proc, psutil.Process) else proc


def survivors(procs: Iterable[ProcessRef]) -> list[int]:
    """The pids among ``procs`` that are alive right now (zombies count as dead)."""
    return [_pid(proc) for proc in procs if _alive(proc)]


def assert_no_survivors(procs: Iterable[ProcessRef], timeout: float = 5.0) -> None:
    """Assert that every given process is dead, waiting up to ``timeout`` seconds."""
    pending = list(procs)
    deadline = time.monotonic() + timeout
    while True:
        alive = [proc for proc in pending if _alive(proc)]
        if not alive:
            return
        if time.monotonic() >= deadline:
            break
        pending = alive
        time.sleep(0.05)
    details = []
    for proc in alive:
        try:
            process = proc if isinstance(proc, psutil.Process) else psutil.Process(proc)
            details.append(f"{process.pid} {process.status()} {process.cmdline()}")
        except psutil.Error:
            details.append(str(_pid(proc)))
    raise AssertionError(f"processes still alive after {timeout}s: " + "; ".join(details))


def children_of(pid: int) -> list[int]:
    """Pids of all living descendants of ``pid`` (empty if ``pid`` itself is gone)."""
    try:
        return [child.pid for child in psutil.Process(pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def wait_for_pidfile(path: Path, timeout: float = 30.0) -> int:
    """Wait until ``path`` holds a pid (the stand-in writes it atomically) and return it."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            text = path.read_text().strip()
        except FileNotFoundError:
            text = ""
        if text:
            return int(text)
        if time.monotonic() >= deadline:
            raise AssertionError(f"no pid in {path} after {timeout}s")
        time.sleep(0.02)


def kill_quietly(pids: Iterable[int]) -> None:
    """SIGKILL every given process that still exists (cleanup after a failed test)."""
    for pid in pids:
        with contextlib.suppress(psutil.Error):
            psutil.Process(pid).kill()
