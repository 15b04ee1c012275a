"""The warm process of an env: dbt imported once, one `fork()` per dbt command.

The env's own interpreter runs this file by path (the env holds dbt, not dbtvenv), so it uses
the standard library alone and runs on any Python an env may have (3.8 and later). It listens
on a Unix socket in a private per-user directory and serves only its own user (`SO_PEERCRED`).

One request, as `dbtvenv.warm` sends it: a frame with the caller's argv, environment, umask,
rlimits and the signals it ignores, carrying its stdin, stdout, stderr and working directory as
file descriptors (`SCM_RIGHTS`). The server forks; the child takes all of that over, becomes
dbt exactly as `bin/dbt` would start (`sys.argv`, `sys.stdout`, signal dispositions, `SystemExit`)
and writes straight to the caller's descriptors. The server answers with the child's pid, then
passes on the caller's signals and a kill, and at the end sends the exit status. If the caller's
connection closes first (dbtvenv was SIGKILLed), the child's process group is killed.

Nothing runs in the server that a request could leave state in: it imports modules (the entry
point, the adapters, and the modules earlier children loaded on the way, which each child
records), and never runs a dbt command. A module that reads the environment at import time
keeps the server's value, so `dbtvenv.warm` starts one server per set of such variables.

Every frame is a 4-byte big-endian length and that many bytes of JSON. The protocol's version is
in the socket's name and in every request: a server never answers a request of another version.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import select
import signal
import socket
import struct
import sys
import time
from typing import TYPE_CHECKING, Any, NoReturn

PROTOCOL = 1
MAX_FRAME = 64 * 1024 * 1024
# The descriptors a run request carries: stdin, stdout, stderr, the working directory.
RUN_FDS = 4
PR_SET_PDEATHSIG = 1
PR_SET_CHILD_SUBREAPER = 36
MANIFEST = "dbtvenv.json"
# What Python's start-up ignores, so a process it starts has them ignored too.
PYTHON_IGNORES = tuple(
    getattr(signal, name) for name in ("SIGPIPE", "SIGXFSZ") if hasattr(signal, name)
)
REQUEST_TIMEOUT = 10.0
CHECK_INTERVAL = 5.0
# Modules a child loaded that the server never imports ahead: they belong to the run.
NOT_PRELOADED = ("__main__", "__mp_main__")
# Blocked in a child once dbt has returned, so that its status is the one reported.
ENDING_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)

if TYPE_CHECKING:  # (no `dict[...]` at run time: the env's Python may be 3.8)
    Frame = dict[str, Any]


# --- frames (both sides) ------------------------------------------------------------------


def encode(message: Frame) -> bytes:
    body = json.dumps(message, separators=(",", ":")).encode("utf-8")
    return struct.pack(">I", len(body)) + body


def send_frame(sock: socket.socket, message: Frame, fds: list[int] | None = None) -> None:
    data = encode(message)
    if fds:
        rights = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack(f"{len(fds)}i", *fds))]
        sent = sock.sendmsg([data], rights)
        data = data[sent:]
    if data:
        sock.sendall(data)


def recv_exactly(sock: socket.socket, size: int) -> bytes:
    chunks = []
    while size:
        chunk = sock.recv(size)
        if not chunk:
            raise EOFError("connection closed")
        chunks.append(chunk)
        size -= len(chunk)
    return b"".join(chunks)


def recv_frame(sock: socket.socket, max_fds: int = 0) -> tuple[Frame, list[int]]:
    """One frame and the descriptors that came with its first bytes."""
    fds: list[int] = []
    if max_fds:
        space = socket.CMSG_SPACE(max_fds * struct.calcsize("i"))
        head, ancillary, _flags, _addr = sock.recvmsg(4, space)
        for level, kind, data in ancillary:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                usable = len(data) - len(data) % struct.calcsize("i")
                fds += list(struct.unpack(f"{usable // 4}i", data[:usable]))
        if not head:
            _close_all(fds)
            raise EOFError("connection closed")
        head += recv_exactly(sock, 4 - len(head))
    else:
        head = recv_exactly(sock, 4)
    (size,) = struct.unpack(">I", head)
    if size > MAX_FRAME:
        _close_all(fds)
        raise ValueError(f"frame of {size} bytes")
    message = json.loads(recv_exactly(sock, size).decode("utf-8"))
    if not isinstance(message, dict):
        _close_all(fds)
        raise ValueError("frame is not a JSON object")
    return message, fds


def split_frames(buffer: bytearray) -> list[Frame]:
    """The complete frames at the start of `buffer` (removed from it)."""
    frames = []
    while len(buffer) >= 4:
        (size,) = struct.unpack(">I", bytes(buffer[:4]))
        if len(buffer) < 4 + size:
            break
        body = bytes(buffer[4 : 4 + size])
        del buffer[: 4 + size]
        with contextlib.suppress(ValueError):
            message = json.loads(body.decode("utf-8"))
            if isinstance(message, dict):
                frames.append(message)
    return frames


def peer_uid(sock: socket.socket) -> int:
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    _pid, uid, _gid = struct.unpack("3i", creds)
    return int(uid)


def manifest_identity(env_dir: str) -> list[int]:
    """What tells this build of the env from a later one at the same path."""
    st = os.stat(os.path.join(env_dir, MANIFEST))
    return [st.st_dev, st.st_ino, st.st_mtime_ns]


def _close_all(fds: list[int]) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


def _prctl(option: int, value: int) -> None:
    with contextlib.suppress(Exception):
        ctypes.CDLL(None, use_errno=True).prctl(option, value, 0, 0, 0)


# --- the server -------------------------------------------------------------------------


class Request:
    """A run in progress: the caller's connection and the forked dbt."""

    def __init__(self, conn: socket.socket, pid: int) -> None:
        self.conn = conn
        self.pid = pid
        self.buffer = bytearray()
        self.reaped = False
        self.gone = False  # the caller closed its connection
        self.forked = time.monotonic()


class Server:
    def __init__(self, options: dict[str, Any]) -> None:
        self.socket_path: str = options["socket"]
        self.state_path: str = options["state"]
        self.modules_path: str = options["modules"]
        self.env_dir: str = options["env"]
        self.entry: str = options["entry"]
        # Python's start-up may have coerced a C locale to UTF-8 (PEP 538) by setting LC_CTYPE,
        # in our environment as it would in dbt's; a child's environment gets the same.
        given = options.get("lc_ctype")
        found = os.environ.get("LC_CTYPE")
        self.coerced_lc_ctype = found if found is not None and found != given else None
        self.idle: float = float(options["idle"])
        self.identity = manifest_identity(self.env_dir)
        self.uid = os.getuid()
        self.pid = os.getpid()
        self.started = time.time()
        self.requests = 0
        self.active: dict[int, Request] = {}
        self.stopping = False
        self.stop_requested = False
        self.last_activity = time.monotonic()
        self.modules_mtime = 0
        self.applied: set[tuple[str, str, str]] = set()
        self.quiet_runs = 0  # requests in a row whose child had nothing to teach
        self.listener: socket.socket | None = None
        self.socket_inode: tuple[int, int] | None = None
        self.wakeup_r, self.wakeup_w = os.pipe()
        for fd in (self.wakeup_r, self.wakeup_w):
            os.set_blocking(fd, False)
        # How Python's start-up made the streams, from the variables this server is keyed by
        # (PYTHONIOENCODING, PYTHONUNBUFFERED, the locale); a child makes its own the same way.
        self.stdio: dict[str, tuple[str, str, bool]] = {
            name: (
                getattr(sys, name).encoding,
                getattr(sys, name).errors,
                bool(getattr(getattr(sys, name), "write_through", False)),
            )
            for name in ("stdin", "stdout", "stderr")
        }

    # start-up

    def preload(self) -> None:
        module, _, _attr = self.entry.partition(":")
        __import__(module)
        for name in installed_adapters():
            self._import(f"dbt.adapters.{name}")
        self._import_learned()

    def _import(self, name: str) -> None:
        if name in sys.modules:
            return
        try:
            __import__(name)
        except BaseException as exc:  # a module that cannot load ahead loads in the child
            log(f"not preloading {name}: {type(exc).__name__}: {exc}")

    def _lessons_changed(self) -> bool:
        try:
            return os.stat(self.modules_path).st_mtime_ns != self.modules_mtime
        except OSError:
            return False

    def _import_learned(self) -> None:
        """Do ahead what earlier runs did on their way (see `Lessons`), once each."""
        try:
            mtime = os.stat(self.modules_path).st_mtime_ns
        except OSError:
            return
        if mtime == self.modules_mtime:
            return
        self.modules_mtime = mtime
        lessons = Lessons.read(self.modules_path)
        threads = _thread_count()
        for name in lessons.modules:
            if name in NOT_PRELOADED or name in lessons.unsafe:
                continue
            loaded = set(sys.modules)
            self._import(name)
            if _thread_count() > threads:
                # It (or what it imported) started a thread: this process cannot fork safely
                # any more, and later ones must not import it ahead.
                threads = _thread_count()
                log(f"not preloading {name} again: importing it starts a thread")
                Lessons.mark_unsafe(self.modules_path, [m for m in sys.modules if m not in loaded])
        for module, qualname, method in lessons.compiled:
            if (module, qualname, method) not in self.applied:
                self.applied.add((module, qualname, method))
                compile_serializer(module, qualname, method)
        for module, qualname in lessons.schemas:
            if (module, qualname, "") not in self.applied:
                self.applied.add((module, qualname, ""))
                build_schema(module, qualname)

    def listen(self) -> None:
        """Bind under a temporary name, then link it into place: of two servers that start at
        once, one wins and the other exits."""
        # (A name no longer than the final one: a socket's path has a length limit.)
        tmp = os.path.join(os.path.dirname(self.socket_path), f"t{os.getpid()}")
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(tmp)
        os.chmod(tmp, 0o600)
        listener.listen(128)
        try:
            try:
                os.link(tmp, self.socket_path)
            except FileExistsError:
                if _answers(self.socket_path):
                    raise SystemExit(0) from None  # another server is already here
                os.unlink(self.socket_path)  # a dead server's socket
                os.link(tmp, self.socket_path)
        finally:
            os.unlink(tmp)
        st = os.stat(self.socket_path)
        self.socket_inode = (st.st_dev, st.st_ino)
        self.listener = listener
        listener.setblocking(False)
        state = {
            "protocol": PROTOCOL,
            "pid": os.getpid(),
            "env": self.env_dir,
            "socket": self.socket_path,
            "started": self.started,
            "python": sys.executable,
        }
        _write_atomic(self.state_path, json.dumps(state))

    # the loop

    def serve(self) -> None:
        for signum in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
            signal.signal(signum, self._on_stop)
        signal.signal(signal.SIGCHLD, _wake)
        signal.set_wakeup_fd(self.wakeup_w)
        next_check = time.monotonic() + CHECK_INTERVAL
        while True:
            if self.stopping and not self.active:
                return
            now = time.monotonic()
            if not self.active and now - self.last_activity >= self.idle:
                return
            timeout = next_check - now
            if not self.active:  # a running request keeps the server, however long it runs
                timeout = min(timeout, self.idle - (now - self.last_activity))
            watched: list[Any] = [self.wakeup_r]
            watched += [r.conn for r in self.active.values() if not r.gone]
            if self.listener is not None:
                watched.append(self.listener)
            ready, _, _ = select.select(watched, [], [], max(timeout, 0.0))
            if self.wakeup_r in ready:
                _drain(self.wakeup_r)
            if self.stop_requested:
                self.stop()
            self._reap()
            for request in list(self.active.values()):
                if not request.gone and request.conn in ready:
                    self._read_control(request)
            if self.listener is not None and self.listener in ready:
                self._accept()
            if time.monotonic() >= next_check:
                next_check = time.monotonic() + CHECK_INTERVAL
                if not self._env_unchanged() or not self._socket_is_ours():
                    self.stop()
                elif not self.active and self._lessons_changed():
                    in_background(self._import_learned)

    def _on_stop(self, signum: int, frame: object) -> None:
        # Only noted here: select() is retried after a handler, with the descriptors it had.
        self.stop_requested = True

    def stop(self) -> None:
        """Take no more requests; exit once the running ones have ended."""
        self.stopping = True
        if self.listener is not None:
            self.listener.close()
            self.listener = None
            if self._socket_is_ours():
                with contextlib.suppress(OSError):
                    os.unlink(self.socket_path)
            with contextlib.suppress(OSError):
                os.unlink(self.state_path)

    def _socket_is_ours(self) -> bool:
        try:
            st = os.stat(self.socket_path)
        except OSError:
            return False
        return (st.st_dev, st.st_ino) == self.socket_inode

    def _env_unchanged(self) -> bool:
        try:
            return manifest_identity(self.env_dir) == self.identity
        except OSError:
            return False

    def _accept(self) -> None:
        assert self.listener is not None
        try:
            conn, _ = self.listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        fds: list[int] = []
        try:
            conn.setblocking(True)
            conn.settimeout(REQUEST_TIMEOUT)
            if peer_uid(conn) != self.uid:
                conn.close()
                return
            message, fds = recv_frame(conn, max_fds=RUN_FDS)
            self._answer(conn, message, fds)
        except (OSError, EOFError, ValueError, KeyError, TypeError):
            _close_all(fds)
            conn.close()

    def _answer(self, conn: socket.socket, message: Frame, fds: list[int]) -> None:
        if message.get("protocol") != PROTOCOL:
            _close_all(fds)
            send_frame(conn, {"refused": f"protocol {PROTOCOL} only"})
            conn.close()
            return
        op = message.get("op")
        if op == "status":
            send_frame(conn, self.status())
            conn.close()
        elif op == "stop":
            self.stop()
            send_frame(conn, {"stopping": True, "active": len(self.active)})
            conn.close()
        elif op == "run":
            if not self.stopping and _thread_count() > 1:
                # A module started a thread: a fork would copy its locks, held or not.
                log("a thread runs in the warm process: forking is not safe, stopping")
                self.stop()
            if self.stopping or not self._env_unchanged():
                _close_all(fds)
                send_frame(conn, {"refused": "the warm process is stopping"})
                conn.close()
                self.stop()
                return
            if len(fds) != RUN_FDS:
                _close_all(fds)
                send_frame(conn, {"refused": "a run request carries 4 descriptors"})
                conn.close()
                return
            self._run(conn, message, fds)
        else:
            _close_all(fds)
            conn.close()

    def status(self) -> Frame:
        return {
            "protocol": PROTOCOL,
            "pid": os.getpid(),
            "env": self.env_dir,
            "started": self.started,
            "requests": self.requests,
            "active": len(self.active),
            "stopping": self.stopping,
        }

    def _run(self, conn: socket.socket, message: Frame, fds: list[int]) -> None:
        go_r, go_w = os.pipe()
        before = frozenset(sys.modules)
        pid = os.fork()
        if pid == 0:
            os.close(go_w)
            try:
                self._detach_sockets(conn)
                self._child(message, fds, go_r, before)
            finally:
                os._exit(70)  # only a bug in the child's set-up gets here
        os.close(go_r)
        _close_all(fds)
        with contextlib.suppress(OSError):
            os.setpgid(pid, pid)  # as the child does: no moment where it is in our group
        request = Request(conn, pid)
        self.active[pid] = request
        self.requests += 1
        self.last_activity = time.monotonic()
        try:
            send_frame(conn, {"pid": pid, "pgid": pid, "server": os.getpid()})
            os.write(go_w, b"g")
        except OSError:
            self._kill(request)
        finally:
            os.close(go_w)
        conn.setblocking(False)

    def _detach_sockets(self, conn: socket.socket) -> None:
        """In a child: our socket objects let go of their descriptors, which the child closes,
        so that none of them ever closes a number dbt has reused for a file of its own."""
        for sock in (self.listener, conn, *(r.conn for r in self.active.values())):
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.detach()

    def _read_control(self, request: Request) -> None:
        try:
            data = request.conn.recv(65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:  # the caller is gone (SIGKILLed): so is its dbt
            self._kill(request)
            self._forget(request)
            return
        request.buffer += data
        for frame in split_frames(request.buffer):
            if request.reaped:
                break
            if "signal" in frame:
                with contextlib.suppress(OSError, ValueError, TypeError):
                    os.kill(request.pid, int(frame["signal"]))
            elif frame.get("kill"):
                self._kill(request)

    def _kill(self, request: Request) -> None:
        """SIGKILL the request's dbt and its group (unreaped: its pid still names the group)."""
        if request.reaped:
            return
        for kill in (os.killpg, os.kill):
            with contextlib.suppress(OSError):
                kill(request.pid, signal.SIGKILL)

    def _forget(self, request: Request) -> None:
        """The caller is gone; the child is reaped later, its status goes nowhere."""
        request.gone = True
        with contextlib.suppress(OSError):
            request.conn.close()

    def _reap(self) -> None:
        while True:
            try:
                info = os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT)
            except ChildProcessError:
                return
            if info is None:
                return
            pid = info.si_pid
            request = self.active.get(pid)
            if request is not None:
                # Whatever dbt left in its group goes with it, before its pid can be reused.
                with contextlib.suppress(OSError):
                    os.killpg(pid, signal.SIGKILL)
            try:
                _, status = os.waitpid(pid, 0)
            except ChildProcessError:
                continue
            _kill_adopted(set(self.active) - {pid})
            if request is None:
                continue
            request.reaped = True
            del self.active[pid]
            self.last_activity = time.monotonic()
            before = self.modules_mtime
            if not self.active and self._lessons_changed():
                in_background(self._import_learned)
            self.quiet_runs = self.quiet_runs + 1 if self.modules_mtime == before else 0
            if os.WIFSIGNALED(status):
                result: Frame = {"signal": os.WTERMSIG(status)}
            else:
                result = {"exitcode": os.WEXITSTATUS(status)}
            result["seconds"] = round(time.monotonic() - request.forked, 6)
            if not request.gone:
                with contextlib.suppress(OSError):
                    request.conn.setblocking(True)
                    request.conn.settimeout(REQUEST_TIMEOUT)
                    send_frame(request.conn, result)
                with contextlib.suppress(OSError):
                    request.conn.close()

    # the child

    def _child(self, message: Frame, fds: list[int], go_r: int, before: frozenset) -> None:  # type: ignore[type-arg]
        signal.set_wakeup_fd(-1)
        ignored = set(message.get("ignored") or ())
        for signum in range(1, signal.NSIG):
            if signum in (signal.SIGKILL, signal.SIGSTOP):
                continue
            with contextlib.suppress(OSError, ValueError, RuntimeError):
                if signum in ignored or signum in PYTHON_IGNORES:
                    signal.signal(signum, signal.SIG_IGN)
                else:  # SIGINT too: dbt's KeyboardInterrupt is installed around its entry only
                    signal.signal(signum, signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_SETMASK, [])
        _prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != self.pid:
            os._exit(128 + signal.SIGKILL)
        _prctl(PR_SET_CHILD_SUBREAPER, 1)  # orphans of dbt's children stay below this run
        with contextlib.suppress(OSError):
            os.setpgid(0, 0)
        stdin, stdout, stderr, cwd = fds
        for target, fd in ((0, stdin), (1, stdout), (2, stderr)):
            os.dup2(fd, target)
        os.fchdir(cwd)
        for fd in message.get("closed") or ():
            with contextlib.suppress(OSError):
                os.close(int(fd))
        go = os.read(go_r, 1)
        for fd in _open_fds():
            if fd > 2:
                with contextlib.suppress(OSError):
                    os.close(fd)
        if go != b"g":
            os._exit(128 + signal.SIGKILL)
        _forget_inherited_helpers()
        if self.coerced_lc_ctype is not None:
            message["environ"]["LC_CTYPE"] = self.coerced_lc_ctype
        become_the_caller(message, self.stdio)
        watch = CacheWatch(record_schemas=self.quiet_runs < LEARNING_RUNS)
        code = run_entry(self.entry, interruptible=signal.SIGINT not in ignored)
        # dbt has returned: its status stands, whatever signal comes while the server learns.
        signal.pthread_sigmask(signal.SIG_BLOCK, ENDING_SIGNALS)
        Lessons.learn(self.modules_path, before, self.env_dir, watch)
        os._exit(code)


def become_the_caller(message: Frame, stdio: dict[str, tuple[str, str, bool]]) -> None:
    """Take over the caller's process state, as a process it had started would have it."""
    import random

    os.umask(int(message["umask"]))
    environ = {str(k): str(v) for k, v in message["environ"].items()}
    os.environ.clear()
    os.environ.update(environ)
    if hasattr(time, "tzset"):
        time.tzset()
    with contextlib.suppress(Exception):
        import locale

        locale.setlocale(locale.LC_CTYPE, "")
    with contextlib.suppress(Exception):
        import resource

        for name, (soft, hard) in (message.get("rlimits") or {}).items():
            limit = getattr(resource, name, None)
            if limit is not None:
                with contextlib.suppress(ValueError, OSError):
                    resource.setrlimit(limit, (int(soft), int(hard)))
    with contextlib.suppress(OSError):
        wanted = int(message.get("nice", 0))
        current = os.nice(0)
        if wanted > current:
            os.nice(wanted - current)
    for fd, name, mode in ((0, "stdin", "r"), (1, "stdout", "w"), (2, "stderr", "w")):
        stream = _stream(fd, mode, f"<{name}>", *stdio[name])
        setattr(sys, name, stream)
        setattr(sys, f"__{name}__", stream)
    random.seed()
    argv = [str(arg) for arg in message["argv"]]
    sys.argv = argv
    if hasattr(sys, "orig_argv"):
        sys.orig_argv = [sys.executable, *argv]
    import types

    main = types.ModuleType("__main__")
    main.__file__ = argv[0]
    main.__builtins__ = __builtins__  # type: ignore[attr-defined]
    sys.modules["__main__"] = main


def _stream(fd: int, mode: str, name: str, encoding: str, errors: str, unbuffered: bool) -> Any:
    """A text stream on `fd` as Python's start-up makes one: line buffered on a terminal (and
    stderr always), write-through when unbuffered (`PYTHONUNBUFFERED`)."""
    import io

    try:
        os.fstat(fd)
    except OSError:
        return None  # a closed descriptor: Python leaves the stream None too
    raw = io.FileIO(fd, mode, closefd=False)
    raw.name = name
    interactive = raw.isatty()
    buffered: Any
    if mode == "r":
        buffered = io.BufferedReader(raw)
    elif unbuffered:  # PYTHONUNBUFFERED
        buffered = raw
    else:
        buffered = io.BufferedWriter(raw)
    text = io.TextIOWrapper(
        buffered,
        encoding=encoding,
        errors=errors,
        newline="\n",
        line_buffering=not unbuffered and (interactive or fd == 2),
        write_through=unbuffered,
    )
    text.mode = mode  # type: ignore[misc]
    return text


def run_entry(entry: str, *, interruptible: bool = True) -> int:
    """`sys.exit(entry())`, then what the interpreter does at exit: the exit status.

    SIGINT raises KeyboardInterrupt from here on (unless the caller ignores it), as in a Python
    process that has started; a Ctrl-C that comes after dbt's own ended it by SIGINT too."""
    try:
        return _run_entry(entry, interruptible)
    except KeyboardInterrupt:
        _die_by(signal.SIGINT)


def _die_by(signum: int) -> NoReturn:
    """End by `signum`, as Python ends on an unhandled KeyboardInterrupt."""
    with contextlib.suppress(BaseException):
        signal.signal(signum, signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, [signum])
        os.kill(os.getpid(), signum)
    os._exit(128 + signum)


def _run_entry(entry: str, interruptible: bool) -> int:
    module_name, _, attr = entry.partition(":")
    code: object = 0
    try:
        if interruptible:
            signal.signal(signal.SIGINT, signal.default_int_handler)
        module = sys.modules.get(module_name) or __import__(module_name, fromlist=["_"])
        func = module
        for part in attr.split("."):
            func = getattr(func, part)
        code = func()  # type: ignore[operator]
    except SystemExit as exc:
        code = exc.code
    except KeyboardInterrupt:
        # An unhandled Ctrl-C ends Python by SIGINT, so its parent sees the signal.
        _print_exception()
        _finish()
        _die_by(signal.SIGINT)
    except BaseException:
        _print_exception()
        code = 1
    status = _exit_status(code)
    if not _finish() and status == 0:
        status = 120  # as Python: stdout could not be flushed at exit
    return status


def _exit_status(code: object) -> int:
    if code is None:
        return 0
    if not isinstance(code, int):  # (True and False are ints to Python's exit too)
        with contextlib.suppress(Exception):
            sys.stderr.write(f"{code}\n")
        return 1
    return code & 0xFF


def _print_exception() -> None:
    with contextlib.suppress(Exception):
        sys.excepthook(*sys.exc_info())


def _finish() -> bool:
    """Non-daemon threads, atexit handlers, flushing: what Python does before it exits.
    False if stdout could not be flushed."""
    with contextlib.suppress(BaseException):
        import threading

        threading._shutdown()  # type: ignore[attr-defined]
    with contextlib.suppress(BaseException):
        import atexit

        atexit._run_exitfuncs()
    flushed = True
    for stream in (sys.stdout, sys.stderr):
        try:
            if stream is not None:
                stream.flush()
        except Exception:
            if stream is sys.stdout:
                flushed = False
    return flushed


# --- what runs teach the server ------------------------------------------------------------

# Requests in a row that taught nothing new, after which children stop recording which JSON
# schemas they build (the one thing recorded by wrapping a dbt method; see `CacheWatch`).
LEARNING_RUNS = 3
SERIALIZERS = ("from_dict", "to_dict", "from_msgpack", "to_msgpack", "from_json", "to_json")


class Lessons:
    """What runs in an env loaded or built on their way, kept in a file per env (and user) so
    that its warm processes do it ahead of the next run, without running any dbt command:

    - modules imported lazily (`dbt.task.run`, sqlparse, ...), from the env or the stdlib;
    - mashumaro serializers compiled on first use (dbt's dataclasses compile lazily: each
      `from_dict`, `to_msgpack`, ... generates its code the first time it is called);
    - JSON schemas dbt built for the dataclasses it validated (`dbtClassMixin.json_schema`,
      cached per class).
    """

    def __init__(self, data: object = None) -> None:
        data = data if isinstance(data, dict) else {}
        self.modules = [m for m in data.get("modules") or () if isinstance(m, str)]
        self.compiled = [tuple(map(str, c)) for c in data.get("compiled") or () if len(c) == 3]
        self.schemas = [tuple(map(str, c)) for c in data.get("schemas") or () if len(c) == 2]
        # Modules that start a thread when imported: loaded in each run, never ahead.
        self.unsafe = {m for m in data.get("unsafe") or () if isinstance(m, str)}

    def to_json(self) -> str:
        return json.dumps(
            {
                "modules": self.modules,
                "compiled": [list(c) for c in self.compiled],
                "schemas": [list(c) for c in self.schemas],
                "unsafe": sorted(self.unsafe),
            }
        )

    @classmethod
    def read(cls, path: str) -> Lessons:
        try:
            with open(path, encoding="utf-8") as f:
                return cls(json.load(f))
        except (OSError, ValueError, TypeError):
            return cls()

    @classmethod
    def learn(cls, path: str, before: frozenset, env_dir: str, watch: CacheWatch) -> None:  # type: ignore[type-arg]
        """Add what this run did on its way to the env's file, if it is anything new."""
        with contextlib.suppress(Exception):
            known = cls.read(path)
            skip = set(known.modules) | known.unsafe
            modules = [m for m in _new_modules(before, env_dir) if m not in skip]
            compiled = [c for c in watch.compiled() if c not in set(known.compiled)]
            schemas = [c for c in watch.schemas() if c not in set(known.schemas)]
            if modules or compiled or schemas:
                known.modules += modules
                known.compiled += compiled
                known.schemas += schemas
                _write_atomic(path, known.to_json())

    @classmethod
    def mark_unsafe(cls, path: str, modules: list[str]) -> None:
        """Never preload `modules` again (they are still loaded by each run that needs them)."""
        with contextlib.suppress(Exception):
            known = cls.read(path)
            known.unsafe.update(modules)
            known.modules = [m for m in known.modules if m not in known.unsafe]
            _write_atomic(path, known.to_json())


class CacheWatch:
    """Which class-level caches a run fills: the serializers mashumaro compiles (a method of
    the class replaced), and, while the server is learning, the JSON schemas dbt builds."""

    def __init__(self, *, record_schemas: bool) -> None:
        self.mixin = _loaded_class("mashumaro.mixins.dict", "DataClassDictMixin")
        self.before = self._methods()
        self.built: list[tuple[str, str]] = []
        schema_mixin = _loaded_class("dbt_common.dataclass_schema", "dbtClassMixin")
        original = getattr(schema_mixin, "__dict__", {}).get("json_schema")
        if record_schemas and isinstance(original, classmethod):
            cached = original.__func__  # dbt's own lru_cache: results stay cached as they were
            built = self.built

            def json_schema(cls: type) -> Any:
                built.append((cls.__module__, cls.__qualname__))
                return cached(cls)

            json_schema.__doc__ = getattr(cached, "__doc__", None)
            schema_mixin.json_schema = classmethod(json_schema)

    def _methods(self) -> dict[tuple[str, str, str], int]:
        found = {}
        for cls in _subclasses(self.mixin):
            if "<locals>" in cls.__qualname__:  # made by a function: not to be found again
                continue
            for name in SERIALIZERS:
                method = cls.__dict__.get(name)
                if method is not None:
                    found[(cls.__module__, cls.__qualname__, name)] = id(method)
        return found

    def compiled(self) -> list[tuple[str, str, str]]:
        after = self._methods()
        return sorted(k for k, v in after.items() if self.before.get(k) != v)

    def schemas(self) -> list[tuple[str, str]]:
        return list(dict.fromkeys(self.built))


def compile_serializer(module: str, qualname: str, method: str) -> None:
    """Make mashumaro generate one serializer of a class now, as its first call would, with
    nothing run: the call gets data (or an object) that fails at its first use, so no instance
    is made and no hook runs on real data (a `Manifest` made from `{}` would make a lock)."""
    cls = _resolve(module, qualname)
    if cls is None or method not in SERIALIZERS:
        return
    with contextlib.suppress(BaseException):
        if method.startswith("from_"):
            getattr(cls, method)(_Unusable())
        else:
            stub = cls.__dict__.get(method)
            if callable(stub):
                stub(_StandIn(cls))


class _Unusable(Exception):
    """As data: fails on any use; as an exception: what that failure raises."""

    def __getattr__(self, name: str) -> Any:
        raise _Unusable()

    def __getitem__(self, key: object) -> Any:
        raise _Unusable()

    def __contains__(self, key: object) -> bool:
        raise _Unusable()

    def __iter__(self) -> Any:
        raise _Unusable()

    def __len__(self) -> int:
        raise _Unusable()


class _StandIn:
    """What a serializer's first call gets as `self`: the class it compiles for, and nothing to
    serialize (every attribute fails), so the generated code never runs on anything."""

    def __init__(self, cls: type) -> None:
        object.__setattr__(self, "_cls", cls)

    @property  # type: ignore[misc]
    def __class__(self) -> type:
        return object.__getattribute__(self, "_cls")  # type: ignore[no-any-return]

    def __getattr__(self, name: str) -> Any:
        raise _Unusable()


def build_schema(module: str, qualname: str) -> None:
    cls = _resolve(module, qualname)
    if cls is not None:
        with contextlib.suppress(BaseException):
            cls.json_schema()


def _resolve(module: str, qualname: str) -> Any:
    """A class of an already imported module (never imports one), or None."""
    found: Any = sys.modules.get(module)
    for part in qualname.split("."):
        found = getattr(found, part, None)
    return found if isinstance(found, type) else None


def _loaded_class(module: str, name: str) -> Any:
    return getattr(sys.modules.get(module), name, None)


def _subclasses(root: Any) -> list[type]:
    if not isinstance(root, type):
        return []
    found: list[type] = []
    todo = [root]
    while todo:
        sub: type
        for sub in todo.pop().__subclasses__():
            if sub not in found:
                found.append(sub)
                todo.append(sub)
    return found


def _new_modules(before: frozenset, env_dir: str) -> list[str]:  # type: ignore[type-arg]
    """Modules this run imported from the env or the standard library (never the project's)."""
    roots = tuple({os.path.realpath(p) for p in (sys.prefix, sys.base_prefix, env_dir)})
    new = []
    for name, module in list(sys.modules.items()):
        if name in before or name in NOT_PRELOADED or module is None:
            continue
        spec = getattr(module, "__spec__", None)
        origin = getattr(spec, "origin", None)
        if origin in ("built-in", "frozen") or (
            isinstance(origin, str) and os.path.realpath(origin).startswith(roots)
        ):
            new.append(name)
    return new


def installed_adapters() -> list[str]:
    """dbt's adapter plugins in this env: `dbt.adapters.<name>` that ship `dbt/include/<name>`."""
    found = set()
    for entry in sys.path:
        include = os.path.join(entry, "dbt", "include")
        adapters = os.path.join(entry, "dbt", "adapters")
        with contextlib.suppress(OSError):
            for name in os.listdir(include):
                if os.path.isfile(os.path.join(adapters, name, "__init__.py")):
                    found.add(name)
    return sorted(found)


def _kill_adopted(requests: set) -> None:  # type: ignore[type-arg]
    """SIGKILL our children that are no request's dbt: orphans of finished runs, adopted by us
    as their subreaper."""
    me = os.getpid()
    for pid in _children_of(me):
        if pid not in requests:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)


def _children_of(parent: int) -> list[int]:
    children = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        fields = stat[stat.rfind(b")") + 2 :].split()
        if len(fields) > 1 and int(fields[1]) == parent:
            children.append(int(name))
    return children


def in_background(work: Any) -> None:
    """Run `work` in a thread of the lowest CPU priority, and wait for it: the first request of
    a warm process runs dbt directly while this imports dbt, and must not be slowed by it.

    Priority is per thread on Linux, and an unprivileged process cannot raise it again: so the
    imports run at nice 19 in a thread of their own, and the main thread, which forks every
    child, keeps the priority it started with. Once the thread has ended the process is
    single-threaded again, as forking needs.
    """
    import threading

    failure: list[BaseException] = []

    def run() -> None:
        with contextlib.suppress(OSError, AttributeError):
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
        try:
            work()
        except BaseException as exc:
            failure.append(exc)

    thread = threading.Thread(target=run, name="warm-preload")
    thread.start()
    thread.join()
    deadline = time.monotonic() + 5
    while _thread_count() > 1 and time.monotonic() < deadline:
        time.sleep(0.001)  # the thread's end, as the kernel sees it
    if failure:
        raise failure[0]


def _thread_count() -> int:
    try:
        return len(os.listdir("/proc/self/task"))
    except OSError:
        import threading

        return threading.active_count()


def _forget_inherited_helpers() -> None:
    """A child starts its own multiprocessing resource tracker, as a new process would: the
    server's (if an import started one) was reached by a descriptor the child has closed."""
    tracker = getattr(
        sys.modules.get("multiprocessing.resource_tracker"), "_resource_tracker", None
    )
    if tracker is not None and getattr(tracker, "_fd", None) is not None:
        with contextlib.suppress(Exception):
            tracker._fd = None
            tracker._pid = None


def _open_fds() -> list[int]:
    try:
        return sorted(int(fd) for fd in os.listdir("/proc/self/fd"))
    except OSError:
        return list(range(3, 1024))


def _answers(path: str) -> bool:
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.settimeout(2)
        probe.connect(path)
        return True
    except OSError:
        return False
    finally:
        probe.close()


def _wake(signum: int, frame: object) -> None:
    """SIGCHLD's handler: it only wakes the select() through the wakeup fd."""


def _drain(fd: int) -> None:
    with contextlib.suppress(OSError):
        while os.read(fd, 512):
            pass


def _write_atomic(path: str, text: str) -> None:
    tmp = f"{path}.{os.getpid()}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    with open(fd, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


def log(message: str) -> None:
    with contextlib.suppress(Exception):
        stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        sys.stderr.write(f"{stamp} pid {os.getpid()}: {message}\n")
        sys.stderr.flush()


def main(argv: list[str]) -> int:
    options = json.loads(argv[1])
    # Run by path, Python put this file's dir first on sys.path; bin/dbt would have its own.
    script_dir = os.path.dirname(os.path.abspath(__file__))
    if sys.path and os.path.abspath(sys.path[0] or ".") == script_dir:
        sys.path[0] = os.path.join(options["env"], "bin")
    os.chdir("/")
    _prctl(PR_SET_CHILD_SUBREAPER, 1)
    server = Server(options)
    # On a failure the start marker stays: clients run dbt directly and try again once it is
    # stale, rather than each starting a server that fails the same way.
    try:
        in_background(server.preload)
    except BaseException as exc:
        log(f"cannot import {server.entry}: {type(exc).__name__}: {exc}")
        return 1
    try:
        server.listen()
    except OSError as exc:
        log(f"cannot listen on {server.socket_path}: {exc}")
        return 1
    with contextlib.suppress(OSError):
        os.unlink(options["starting"])
    log(f"serving {server.env_dir} on {server.socket_path}")
    try:
        server.serve()
    finally:
        server.stop()
        for request in list(server.active.values()):
            server._kill(request)
    log("stopped")
    return 0


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.stderr.write("usage: warm_server.py OPTIONS_JSON (started by dbtvenv --warm)\n")
        sys.exit(2)
    sys.exit(main(sys.argv))
