"""Warm mode (`--warm`): run dbt as a fork of the env's warm process, or say why not.

The warm process (`warm_server.py`, run by the env's own interpreter) has imported dbt and its
adapters; each request is one `fork()` of it. This side finds the warm process for the env, this
user and the environment variables dbt reads at import time, starts one in the background when
there is none (that run goes direct: the first request never waits for it), passes the caller's
stdio, working directory and environment over, forwards SIGINT, SIGTERM and SIGHUP once each,
enforces the kill grace, and exits with dbt's status.

`run` returns None whenever warm mode cannot serve before dbt has started; the caller then runs
dbt directly, which is always correct.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import select
import signal
import socket
import stat
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from types import FrameType
from typing import Any, NamedTuple

from dbtvenv import procs, store
from dbtvenv import warm_server as protocol
from dbtvenv.errors import EX_SIGNAL_BASE, DbtvenvError, Interrupted, UsageError
from dbtvenv.runner import drain, signals_routed

DEFAULT_IDLE = 600.0
MAX_IDLE = 7 * 86400.0
# How long a start marker keeps other runs from starting a second warm process; also how soon a
# warm process that failed to start is tried again.
STARTING_STALE = 60.0
CONNECT_TIMEOUT = 5.0
MAX_PER_ENV = 4  # warm processes of one env per user (one per set of import-time settings)
SUN_PATH_MAX = 107  # sockaddr_un.sun_path holds 108 bytes, one of them the terminating NUL
# The entry point warm mode knows how to preload and run: dbt-core 1.5 and later.
ENTRY_MODULE = "dbt.cli.main"
_SCRIPT_IMPORT = re.compile(rb"^from ([\w.]+) import (\w+)\s*$", re.MULTILINE)
# What dbt, its adapters and their libraries read from the environment when imported (see
# docs/warm.md): a request whose values differ gets a warm process of its own. Every other
# variable (most DBT_* flags, DBT_ENV_CUSTOM_ENV_*, credentials) is read at run time from the
# request's own environment, so a per-task value never starts a warm process per task.
KEY_PREFIXES = ("DBT_RECORDER_", "DBT_ENGINE_RECORDER_", "PYTHON", "LC_", "NETWORKX_", "OTEL_")
KEY_NAMES = frozenset(
    {
        "DBT_MACRO_DEBUGGING",
        "DBT_PACKAGE_HUB_URL",
        "HOME",
        "LANG",
        "LANGUAGE",
        "MSGPACK_PUREPYTHON",
        "PROTOCOL_BUFFERS_PYTHON_IMPLEMENTATION",
        "TEMPORARILY_DISABLE_PROTOBUF_VERSION_CHECK",
    }
)
RLIMITS = (
    "RLIMIT_AS",
    "RLIMIT_CORE",
    "RLIMIT_CPU",
    "RLIMIT_DATA",
    "RLIMIT_FSIZE",
    "RLIMIT_NOFILE",
    "RLIMIT_NPROC",
    "RLIMIT_STACK",
)


class WarmFailed(DbtvenvError):
    """The warm process ended while dbt ran in it: dbt was killed with it."""

    exit_code = EX_SIGNAL_BASE + signal.SIGKILL


def debug_enabled() -> bool:
    return os.environ.get("DBTVENV_DEBUG", "") not in ("", "0")


def debug(message: str) -> None:
    if debug_enabled():
        with contextlib.suppress(OSError, ValueError):
            os.write(2, f"dbtvenv: debug: {message}\n".encode("utf-8", "replace"))


def idle_seconds() -> float:
    """DBTVENV_WARM_IDLE: how long a warm process waits for a request before it exits."""
    from dbtvenv.settings import env_seconds

    idle = env_seconds("DBTVENV_WARM_IDLE", DEFAULT_IDLE, minimum=1.0)
    if idle > MAX_IDLE:
        raise UsageError(
            f"DBTVENV_WARM_IDLE={idle:g} is more than {MAX_IDLE:g} seconds (7 days); "
            f"set it to at most that, or unset it for {DEFAULT_IDLE:g}"
        )
    return idle


# --- where a warm process lives -----------------------------------------------------------


class Place(NamedTuple):
    """The files of one warm process in the user's private run dir."""

    socket: Path
    state: Path
    starting: Path
    log: Path
    modules: Path


def run_dirs() -> list[Path]:
    """Where this user's warm processes may live: `$XDG_RUNTIME_DIR/dbtvenv`, else a private
    dir in /tmp."""
    found = []
    xdg = os.environ.get("XDG_RUNTIME_DIR", "")
    if xdg and os.path.isabs(xdg):
        found.append(Path(xdg) / "dbtvenv")
    found.append(Path("/tmp") / f"dbtvenv-{os.getuid()}")
    return found


def private_dir(path: Path, *, create: bool) -> str | None:
    """None if `path` is a dir only this user can use (made so if `create`), else why not."""
    if create:
        with contextlib.suppress(OSError):  # (not ours to make: the checks below say why)
            os.mkdir(path, 0o700)
    try:
        st = os.lstat(path)
    except OSError as exc:
        return f"{path}: {exc.strerror}"
    if not stat.S_ISDIR(st.st_mode):
        return f"{path} is not a directory"
    if st.st_uid != os.getuid():
        return f"{path} belongs to another user (uid {st.st_uid})"
    if stat.S_IMODE(st.st_mode) & 0o077:
        return f"{path} can be used by other users (mode {stat.S_IMODE(st.st_mode):o})"
    return None


def _digest(value: object) -> str:
    try:
        from _sha256 import sha256  # type: ignore[import-not-found, unused-ignore]
    except ImportError:  # Python 3.12+ (`_sha2`), or another implementation
        from hashlib import sha256

    return str(sha256(json.dumps(value, sort_keys=True).encode("utf-8")).hexdigest()[:20])


def key_variables(environ: Mapping[str, str]) -> dict[str, str]:
    return {
        name: value
        for name, value in environ.items()
        if name.startswith(KEY_PREFIXES) or name in KEY_NAMES
    }


def place_for(env_dir: Path, environ: Mapping[str, str]) -> tuple[Place | None, str]:
    """The warm process for this env (this very build of it), this user and these import-time
    variables; or None and why there can be none."""
    try:
        identity = protocol.manifest_identity(str(env_dir))
    except OSError:
        return None, "the env has no manifest"
    env_id = _digest([str(env_dir), identity])
    key = _digest([protocol.PROTOCOL, env_id, key_variables(environ)])
    problems = []
    for run_dir in run_dirs():
        problem = private_dir(run_dir, create=True)
        if problem is not None:
            problems.append(problem)
            continue
        name = f"w{protocol.PROTOCOL}-{key}"
        sock = run_dir / f"{name}.sock"
        if len(os.fsencode(sock)) > SUN_PATH_MAX:
            problems.append(f"{sock} is longer than a socket path may be")
            continue
        return (
            Place(
                socket=sock,
                state=run_dir / f"{name}.json",
                starting=run_dir / f"{name}.starting",
                log=run_dir / f"{name}.log",
                modules=run_dir / f"modules-{env_id}.json",
            ),
            "",
        )
    return None, "; ".join(problems)


# --- may warm mode serve this run? ----------------------------------------------------------


def entry_point(env_dir: Path) -> str | None:
    """`dbt.cli.main:cli` if the env's `bin/dbt` is the console script of a dbt that has it."""
    try:
        with open(env_dir / "bin" / "dbt", "rb") as f:
            script = f.read(4096)
    except OSError:
        return None
    match = _SCRIPT_IMPORT.search(script)
    if match is None or match.group(1).decode() != ENTRY_MODULE:
        return None
    return f"{ENTRY_MODULE}:{match.group(2).decode()}"


def interactive() -> str | None:
    """Why dbt needs the caller's terminal (so warm mode cannot serve), or None."""
    for fd, name in ((0, "stdin"), (1, "stdout")):
        with contextlib.suppress(OSError):
            if os.isatty(fd):
                return f"{name} is a terminal"
    try:
        tty = os.open("/dev/tty", os.O_RDWR | os.O_NOCTTY)
    except OSError:
        return None
    try:
        if os.tcgetpgrp(tty) == os.getpgrp():
            return "dbtvenv runs in the foreground of a terminal"
    except OSError:
        pass
    finally:
        os.close(tty)
    return None


# --- one run ----------------------------------------------------------------------------


def run(
    env_dir: Path, dbt_args: Sequence[str], environ: Mapping[str, str], *, kill_grace: float
) -> int | None:
    """Run `dbt ARGS` in the env's warm process and return dbtvenv's exit status, or None if
    warm mode cannot serve (nothing of dbt has run then)."""
    idle = idle_seconds()  # a bad value is a usage error, whether or not a warm process starts
    reason = interactive()
    entry = entry_point(env_dir)
    if reason is None and entry is None:
        reason = f"the env's dbt has no {ENTRY_MODULE} (dbt-core before 1.5)"
    place = None
    if reason is None:
        place, reason = place_for(env_dir, environ)
    if place is None or entry is None:
        debug(f"running dbt directly: {reason}")
        return None
    sock = connect(place.socket)
    if sock is None:
        if not _room_for_another(env_dir):
            return None
        started = start_server(place, env_dir, entry, environ, idle=idle)
        debug(
            "running dbt directly while its warm process starts"
            if started
            else "running dbt directly: its warm process is starting"
        )
        return None
    with sock:
        return _Session(sock, kill_grace).run(env_dir, dbt_args, environ)


def _room_for_another(env_dir: Path) -> bool:
    """At most MAX_PER_ENV warm processes of an env per user (each holds ~140 MiB): to start
    another, the oldest idle one is stopped; if all of them serve runs, none is started."""
    running = warm_processes(env_dir)
    if len(running) < MAX_PER_ENV:
        return True
    idle = [w for w in running if w.active == 0]
    if len(running) - len(idle) >= MAX_PER_ENV:
        debug(
            f"running dbt directly: {len(running)} warm processes of this env serve runs "
            f"already (at most {MAX_PER_ENV}; their import-time settings differ)"
        )
        return False
    for warm in idle[: len(running) - MAX_PER_ENV + 1]:
        with contextlib.suppress(OSError):
            os.kill(warm.pid, signal.SIGTERM)
            debug(
                f"stopping warm process {warm.pid}, the oldest idle one of this env's {MAX_PER_ENV}"
            )
    return True


def connect(path: Path, timeout: float = CONNECT_TIMEOUT) -> socket.socket | None:
    """A connection to the warm process at `path`, if one listens there and is this user's."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.settimeout(timeout)
        sock.connect(os.fspath(path))
        if protocol.peer_uid(sock) != os.getuid():
            raise OSError("the warm process belongs to another user")
    except OSError:
        sock.close()
        return None
    return sock


class _Session:
    def __init__(self, sock: socket.socket, kill_grace: float) -> None:
        self.sock = sock
        self.kill_grace = kill_grace
        self.pending: list[int] = []
        self.kill_deadline: float | None = None
        self.started = False

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self.pending.append(signum)

    def run(self, env_dir: Path, dbt_args: Sequence[str], environ: Mapping[str, str]) -> int | None:
        with signals_routed(self._on_signal, wake_on_child=False) as (wakeup, ignored):
            ack = self._request(env_dir, dbt_args, environ, ignored)
            if ack is None:
                if self.pending:  # a signal came before dbt started: it never will
                    raise Interrupted(self.pending[0])
                return None
            self.started = True
            debug(f"dbt runs warm: pid {ack['pid']}, forked by warm process {ack['server']}")
            return self._wait(wakeup, int(ack["pgid"]))

    def _request(
        self,
        env_dir: Path,
        dbt_args: Sequence[str],
        environ: Mapping[str, str],
        ignored: list[int],
    ) -> dict[str, Any] | None:
        umask = os.umask(0o022)
        os.umask(umask)
        message = {
            "op": "run",
            "protocol": protocol.PROTOCOL,
            "argv": [str(env_dir / "bin" / "dbt"), *dbt_args],
            "environ": dict(environ),
            "umask": umask,
            "ignored": ignored,
            "rlimits": _rlimits(),
            "nice": os.nice(0),
        }
        sent: OSError | None = None
        try:
            with _stdio_and_cwd() as (fds, closed):
                message["closed"] = closed
                try:
                    protocol.send_frame(self.sock, message, fds)
                except OSError as exc:  # it may have answered (refused) before reading it all
                    sent = exc
            ack, _ = protocol.recv_frame(self.sock)
        except (OSError, EOFError, ValueError) as exc:
            exc = sent or exc
            debug(f"running dbt directly: the warm process did not take the request ({exc})")
            return None
        if "pid" not in ack:
            debug(f"running dbt directly: the warm process refused: {ack.get('refused')}")
            return None
        return ack

    def _wait(self, wakeup: int, pgid: int) -> int:
        self.sock.setblocking(False)
        buffer = bytearray()
        while True:
            self._forward_pending()
            timeout = None
            if self.kill_deadline is not None:
                timeout = self.kill_deadline - time.monotonic()
                if timeout <= 0:
                    self._send({"kill": True})
                    self.kill_deadline = None
                    continue
            watched: list[Any] = [self.sock, wakeup]
            ready, _, _ = select.select(watched, [], [], timeout)
            if wakeup in ready:
                drain(wakeup)
            if self.sock not in ready:
                continue
            try:
                data = self.sock.recv(65536)
            except (BlockingIOError, InterruptedError):
                continue
            except OSError:
                data = b""
            if not data:
                # The warm process is gone; its child died with it (parent-death signal).
                with contextlib.suppress(OSError):
                    os.killpg(pgid, signal.SIGKILL)
                raise WarmFailed(
                    "the warm process ended while dbt ran in it, and dbt was killed with it; "
                    "run again (a new warm process starts), or without --warm"
                )
            buffer += data
            for frame in protocol.split_frames(buffer):
                if "signal" in frame or "exitcode" in frame:
                    debug(f"dbt ran warm for {frame.get('seconds', '?')} s (fork to exit)")
                if "signal" in frame:
                    return EX_SIGNAL_BASE + int(frame["signal"])
                if "exitcode" in frame:
                    return int(frame["exitcode"])

    def _forward_pending(self) -> None:
        while self.pending:
            signum = self.pending.pop(0)
            self._send({"signal": signum})
            if self.kill_deadline is None:
                self.kill_deadline = time.monotonic() + self.kill_grace

    def _send(self, message: dict[str, Any]) -> None:
        data = protocol.encode(message)
        self.sock.setblocking(True)
        try:
            with contextlib.suppress(OSError):
                self.sock.sendall(data)
        finally:
            self.sock.setblocking(False)


@contextlib.contextmanager
def _stdio_and_cwd() -> Iterator[tuple[list[int], list[int]]]:
    """Our stdin, stdout, stderr and working directory as descriptors to pass on. One that was
    closed when we started (Python made its stream None; its number may have been reused by a
    file or socket of ours since) travels as /dev/null and is named in the second list, so the
    child closes it too."""
    import sys

    opened: list[int] = []
    closed: list[int] = []
    fds: list[int] = []
    try:
        for fd, stream in enumerate((sys.__stdin__, sys.__stdout__, sys.__stderr__)):
            if stream is not None:
                fds.append(fd)
                continue
            devnull = os.open(os.devnull, os.O_RDWR)
            opened.append(devnull)
            fds.append(devnull)
            closed.append(fd)
        cwd = os.open(".", os.O_RDONLY | os.O_DIRECTORY)
        opened.append(cwd)
        fds.append(cwd)
        yield fds, closed
    finally:
        for fd in opened:
            os.close(fd)


def _rlimits() -> dict[str, tuple[int, int]]:
    import resource

    limits = {}
    for name in RLIMITS:
        limit = getattr(resource, name, None)
        if limit is not None:
            with contextlib.suppress(ValueError, OSError):
                limits[name] = resource.getrlimit(limit)
    return limits


# --- starting a warm process ----------------------------------------------------------------


def start_server(
    place: Place, env_dir: Path, entry: str, environ: Mapping[str, str], *, idle: float
) -> bool:
    """Start the warm process in the background, detached into a session of its own; False if
    another run is starting it already. Never waits for it."""
    if not _claim_start(place.starting):
        return False
    options = {
        "socket": str(place.socket),
        "state": str(place.state),
        "starting": str(place.starting),
        "modules": str(place.modules),
        "env": str(env_dir),
        "entry": entry,
        "idle": idle,
        "lc_ctype": environ.get("LC_CTYPE"),
    }
    python = str(env_dir / "bin" / "python")
    argv = [python, str(Path(protocol.__file__).resolve()), json.dumps(options)]
    env = dict(environ)
    log_fd = os.open(place.log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    try:
        pid = os.fork()
        if pid == 0:  # pragma: no cover (a child)
            try:
                os.setsid()
                if os.fork() == 0:
                    devnull = os.open(os.devnull, os.O_RDWR)
                    os.dup2(devnull, 0)
                    os.dup2(devnull, 1)
                    os.dup2(log_fd, 2)
                    os.closerange(3, 65536)
                    os.execve(python, argv, env)
            finally:
                os._exit(0)
        os.waitpid(pid, 0)
    finally:
        os.close(log_fd)
    return True


def _claim_start(marker: Path) -> bool:
    for _ in range(2):
        try:
            fd = os.open(marker, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        except FileExistsError:
            try:
                age = time.time() - os.lstat(marker).st_mtime
            except FileNotFoundError:
                continue
            if age < STARTING_STALE:
                return False
            with contextlib.suppress(FileNotFoundError):
                os.unlink(marker)
            continue
        except OSError:
            return False
        os.write(fd, str(os.getpid()).encode())
        os.close(fd)
        return True
    return False


# --- what runs, and stopping it -------------------------------------------------------------


class WarmProcess(NamedTuple):
    pid: int
    env: str
    started: float | None
    requests: int | None
    active: int | None
    rss: int | None
    state: Path

    def to_json(self) -> dict[str, Any]:
        return {
            "pid": self.pid,
            "started": store.iso(self.started),
            "requests": self.requests,
            "running": self.active,
            "rss": self.rss,
        }


def warm_processes(env_dir: Path | None = None) -> list[WarmProcess]:
    """This user's warm processes (of `env_dir`, or all), oldest first; the state files of dead
    ones are removed on the way."""
    found = []
    for run_dir in run_dirs():
        if private_dir(run_dir, create=False) is not None:
            continue
        for state_path in sorted(run_dir.glob("w*-*.json")):
            state = _read_state(state_path)
            if state is None:
                continue
            if env_dir is not None and state.get("env") != str(env_dir):
                continue
            pid = int(state["pid"])
            if not _is_warm_server(pid):
                with contextlib.suppress(OSError):
                    state_path.unlink()
                continue
            status = _status(Path(str(state.get("socket"))))
            found.append(
                WarmProcess(
                    pid=pid,
                    env=str(state.get("env")),
                    started=_number(state.get("started")),
                    requests=_int(status.get("requests")),
                    active=_int(status.get("active")),
                    rss=_rss(pid),
                    state=state_path,
                )
            )
    return sorted(found, key=lambda w: (w.started or 0.0, w.pid))


def stop_warm(env_dir: Path) -> list[WarmProcess]:
    """Ask this user's warm processes of `env_dir` to stop: they take no new request, and exit
    once the running ones have ended."""
    stopped = []
    for warm in warm_processes(env_dir):
        with contextlib.suppress(OSError):
            os.kill(warm.pid, signal.SIGTERM)
            stopped.append(warm)
    return stopped


def _read_state(path: Path) -> dict[str, Any] | None:
    try:
        st = os.lstat(path)
        if not stat.S_ISREG(st.st_mode) or st.st_uid != os.getuid():
            return None
        state = json.loads(path.read_text())
    except (OSError, ValueError, RecursionError):
        return None
    # Taken apart by type, never converted: a pid of `1e400`, `true` or `"12"` is no state.
    if not isinstance(state, dict) or not procs.is_pid(state.get("pid")):
        return None
    return state


def _is_warm_server(pid: int) -> bool:
    """That pid is a live warm process of this user (not a reused pid)."""
    try:
        st = os.stat(f"/proc/{pid}")
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmdline = f.read()
        with open(f"/proc/{pid}/stat", "rb") as f:
            state = f.read().rsplit(b")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return st.st_uid == os.getuid() and b"warm_server.py" in cmdline and state != b"Z"


def _status(path: Path) -> dict[str, Any]:
    sock = connect(path, timeout=2.0)
    if sock is None:
        return {}
    with sock:
        try:
            protocol.send_frame(sock, {"op": "status", "protocol": protocol.PROTOCOL})
            status, _ = protocol.recv_frame(sock)
        except (OSError, EOFError, ValueError):
            return {}
    return status


def _rss(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/status", "rb") as f:
            for line in f:
                if line.startswith(b"VmRSS:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _number(value: object) -> float | None:
    return float(value) if procs.is_finite_number(value) else None


def _int(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None
