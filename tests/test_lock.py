"""The env lock (`DIR/<key>.lock`): when it is stale, what a waiter does, what users see.

The process-level tests plant a lock file as another dbtvenv would have left it (a dead
holder, a live one, a reused pid, another host's, an unparseable one) in front of a cold cache
and run the real dbtvenv against it. The unit tests below them pin down `lock.py`'s edge cases.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from conftest import MakeEnv, Result, RunDbtvenv
from lockfaults import PLANTED_ARGV, Background, WheelServer, dead_pid, plant_lock, wait_until

from dbtvenv.errors import LockLost, LockTimeout
from dbtvenv.lock import UNPARSEABLE_GRACE, EnvLock, Holder, Watch, read_lock, stale_reason

HOST = socket.gethostname()
OTHER_HOST = "elsewhere-7"
PLANTED_SINCE = "2026-11-24T15:00:00+00:00"
PLANTED_COMMAND = " ".join(PLANTED_ARGV)


@pytest.fixture
def spec(standin_env: dict[str, str], tmp_path: Path) -> dict[str, str]:
    # A generous timeout: a run that should take a stale lock over at once must not pass
    # merely by waiting it out.
    return {
        **standin_env,
        "DBTVENV_VENV_DIR": str(tmp_path / "cache"),
        "DBTVENV_LOCK_TIMEOUT": "30",
    }


@pytest.fixture
def env_dir(dbtvenv: RunDbtvenv, spec: dict[str, str]) -> Path:
    found = dbtvenv("env", "path", env=spec)
    assert found.returncode == 0, str(found)
    return Path(found.out.strip())


@pytest.fixture
def lock_file(env_dir: Path) -> Path:
    return env_dir.with_name(env_dir.name + ".lock")


@pytest.fixture
def sleeper() -> Iterator[psutil.Process]:
    """A live process of this host, to be named as a lock's holder."""
    proc = subprocess.Popen(["sleep", "600"])
    try:
        yield psutil.Process(proc.pid)
    finally:
        proc.kill()
        proc.wait()


def _plant_live(lock_file: Path, holder: psutil.Process) -> dict[str, object]:
    return plant_lock(lock_file, pid=holder.pid, create_time=holder.create_time())


def _one_error_line(result: Result) -> str:
    """The run's error: exactly one `dbtvenv: error:` line, the last one of stderr."""
    errors = [line for line in result.err.splitlines() if line.startswith("dbtvenv: error:")]
    assert len(errors) == 1, result.err
    assert result.err.rstrip("\n").splitlines()[-1] == errors[0]
    return errors[0]


def _takeover_line(result: Result) -> str:
    lines = [line for line in result.err.splitlines() if "taking over the lock" in line]
    assert len(lines) == 1, result.err
    return lines[0]


# --- planted locks in front of a real dbtvenv --------------------------------------------


@pytest.mark.parametrize("holder", ["dead", "pid reused"])
def test_a_dead_holder_on_this_host_is_taken_over_at_once(
    holder: str, dbtvenv: RunDbtvenv, spec: dict[str, str], env_dir: Path, lock_file: Path
) -> None:
    if holder == "dead":
        pid, create_time = dead_pid(), time.time() - 60
        reason = f"its holder, pid {pid}, is gone"
    else:  # our own pid, with a create time that is not ours: the pid was reused
        pid, create_time = os.getpid(), psutil.Process().create_time() - 1000
        reason = f"its holder, pid {pid}, is gone (that pid now belongs to another process)"
    plant_lock(lock_file, pid=pid, create_time=create_time)

    result = dbtvenv("run", env=spec)

    assert result.returncode == 0, str(result)
    takeover = _takeover_line(result)
    assert reason in takeover
    assert f"(was pid {pid} on {HOST} since {PLANTED_SINCE} ({PLANTED_COMMAND}))" in takeover
    assert "waiting for the lock" not in result.err  # taken over at its first look
    assert "building env" in result.err
    assert result.json()["prefix"] == str(env_dir)
    assert not lock_file.exists()


def test_a_live_holder_blocks_until_the_lock_timeout(
    dbtvenv: RunDbtvenv,
    spec: dict[str, str],
    env_dir: Path,
    lock_file: Path,
    sleeper: psutil.Process,
) -> None:
    planted = _plant_live(lock_file, sleeper)

    result = dbtvenv("run", "--lock-timeout", "2", env=spec)

    assert result.returncode == 75, str(result)
    assert result.out == ""
    error = _one_error_line(result)
    for part in (
        f"pid {sleeper.pid} on {HOST}",
        f"since {PLANTED_SINCE}",
        PLANTED_COMMAND,
        "--lock-timeout",
    ):
        assert part in error
    assert f"waiting for the lock {lock_file.name}, held by pid {sleeper.pid}" in result.err
    assert not env_dir.exists()
    assert json.loads(lock_file.read_text()) == planted


def test_a_complete_env_is_used_while_its_lock_is_held(
    dbtvenv: RunDbtvenv,
    spec: dict[str, str],
    env_dir: Path,
    lock_file: Path,
    sleeper: psutil.Process,
) -> None:
    prepared = dbtvenv("env", "prepare", env=spec)
    assert prepared.returncode == 0, str(prepared)
    planted = _plant_live(lock_file, sleeper)

    result = dbtvenv("run", "--lock-timeout", "0", env=spec)

    assert result.returncode == 0, str(result)
    assert result.json()["prefix"] == str(env_dir)
    for word in ("waiting", "taking over", "building"):  # no wait, no build
        assert word not in result.err
    assert json.loads(lock_file.read_text()) == planted


@pytest.mark.parametrize("age", [0, 30])
def test_another_hosts_lock_within_its_lease_blocks(
    age: int, dbtvenv: RunDbtvenv, spec: dict[str, str], env_dir: Path, lock_file: Path
) -> None:
    # No process here has that pid: only its host may judge whether the holder lives.
    plant_lock(lock_file, pid=dead_pid(), create_time=time.time(), hostname=OTHER_HOST, age=age)

    result = dbtvenv("run", "--lock-timeout", "1", env=spec)  # the default lease: 60 s

    assert result.returncode == 75, str(result)
    error = _one_error_line(result)
    assert f"on {OTHER_HOST} since {PLANTED_SINCE}" in error
    assert not env_dir.exists()


@pytest.mark.parametrize("mtime", [-3600, 600], ids=["an-hour-old", "ten-minutes-ahead"])
def test_another_hosts_dead_lock_is_taken_over_once_seen_unchanged_for_a_lease(
    mtime: int, dbtvenv: RunDbtvenv, spec: dict[str, str], env_dir: Path, lock_file: Path
) -> None:
    """Whatever its mtime says (a clock ahead of ours, a copied file): a lock nobody renews
    is stale once this host has itself watched it unchanged for a whole lease."""
    plant_lock(lock_file, pid=12345, create_time=time.time(), hostname=OTHER_HOST)
    when = time.time() + mtime
    os.utime(lock_file, (when, when))
    lease = {"DBTVENV_LOCK_LEASE": "3"}

    result = dbtvenv("run", env={**spec, **lease})

    assert result.returncode == 0, str(result)
    takeover = _takeover_line(result)
    assert f"its holder on {OTHER_HOST} has not renewed it for 3 s, a whole lease" in takeover
    assert f"was pid 12345 on {OTHER_HOST}" in takeover
    assert f"waiting for the lock {lock_file.name}, held by pid 12345" in result.err
    assert result.json()["prefix"] == str(env_dir)

    # One look cannot see a whole lease: `lock status` says held, gc keeps the lock, saying so.
    plant_lock(lock_file, pid=12345, create_time=time.time(), hostname=OTHER_HOST)
    os.utime(lock_file, (when, when))
    status = dbtvenv("lock", "status", "--json", env={**spec, **lease})
    assert status.returncode == 0, str(status)
    assert json.loads(status.out)["state"] == "held"
    assert json.loads(status.out)["other_host"] is True
    collected = dbtvenv("env", "gc", "--venv-dir", env_dir.parent, env=lease)
    assert collected.returncode == 0, str(collected)
    assert collected.out == "nothing to remove\n"
    assert f"keeping lock {lock_file.name}: held by pid 12345 on {OTHER_HOST}" in collected.err
    assert lock_file.exists()


def _unshare_prefix(hostname: str) -> list[str]:
    """Run a command under another hostname (a UTS namespace of its own), as on another host."""
    if os.geteuid() != 0 or not shutil.which("unshare"):
        pytest.skip("another hostname needs root and unshare(1)")
    probe = subprocess.run(
        ["unshare", "-u", "sh", "-c", f"hostname {hostname} && hostname"],
        capture_output=True,
        timeout=30,
    )
    if probe.stdout.strip() != hostname.encode():
        pytest.skip(f"cannot fake a hostname here: {probe.stderr[-300:]!r}")
    return ["unshare", "-u", "sh", "-c", f'hostname {hostname} && exec "$@"', "sh"]


def test_a_shorter_lease_never_takes_a_live_holder_of_another_host_over(
    wheels: WheelServer,
    dbtvenv_cmd: list[str],
    make_env: MakeEnv,
    tmp_path: Path,
) -> None:
    """The holder records its lease; a waiter judges it by the longer of the two, so one
    started with DBTVENV_LOCK_LEASE=1 waits for a holder that renews every few seconds."""
    spec = {
        "DBTVENV_REQUIREMENTS": "dbt-standin==1.0.0",
        "DBTVENV_PIP_INSTALL_OPTIONS": wheels.pip_options,
        "DBTVENV_VENV_DIR": str(tmp_path / "cache"),
    }
    wheels.hold()
    holder = Background(
        [*_unshare_prefix("worker-a"), *dbtvenv_cmd, "env", "prepare"],
        make_env({**spec, "DBTVENV_LOCK_LEASE": "24"}),  # renewed every 3 s
        tmp_path,
        "holder",
    )
    try:
        wheels.wait_for_get()  # the holder is in pip, holding the lock
        waiter = Background(
            [*dbtvenv_cmd, "env", "prepare", "--lock-timeout", "8"],
            make_env({**spec, "DBTVENV_LOCK_LEASE": "1"}),
            tmp_path,
            "waiter",
        )
        waited = waiter.wait()
        wheels.release()
        held = holder.wait()
    finally:
        wheels.release()
        holder.kill()
    assert waited.returncode == 75, str(waited)
    assert "taking over" not in waited.err
    assert "on worker-a" in _one_error_line(waited)
    assert "its lease, 24 s" in _one_error_line(waited)
    assert held.returncode == 0, str(held)
    assert "lost the lock" not in held.err
    assert wheels.gets() == 1


@pytest.mark.parametrize("content", [b"", b'{"pid": 4242, "create_t', b"\xff\xfe\x00 not json"])
def test_an_unparseable_young_lock_blocks(
    content: bytes, dbtvenv: RunDbtvenv, spec: dict[str, str], env_dir: Path, lock_file: Path
) -> None:
    lock_file.parent.mkdir(parents=True)
    lock_file.write_bytes(content)  # a writer may be in the middle of it

    result = dbtvenv("run", "--lock-timeout", "1", env=spec)

    assert result.returncode == 75, str(result)
    assert "unparseable lock file" in _one_error_line(result)
    assert not env_dir.exists()
    assert lock_file.read_bytes() == content


def test_an_unparseable_old_lock_is_taken_over(
    dbtvenv: RunDbtvenv, spec: dict[str, str], env_dir: Path, lock_file: Path
) -> None:
    lock_file.parent.mkdir(parents=True)
    lock_file.write_bytes(b'{"pid": 4242, "create_t')  # its writer died mid-write
    past = time.time() - 60
    os.utime(lock_file, (past, past))

    result = dbtvenv("run", env=spec)

    assert result.returncode == 0, str(result)
    assert re.search(r"it cannot be parsed and is 6\d s old", _takeover_line(result))
    assert result.json()["prefix"] == str(env_dir)


# --- dbtvenv lock status ----------------------------------------------------------------


def test_lock_status_free_held_and_stale(
    dbtvenv: RunDbtvenv, spec: dict[str, str], lock_file: Path, sleeper: psutil.Process
) -> None:
    lock_file.parent.mkdir(parents=True)

    def status() -> tuple[str, dict[str, object]]:
        plain = dbtvenv("lock", "status", env=spec)
        as_json = dbtvenv("lock", "status", "--json", env=spec)
        assert plain.returncode == 0, str(plain)
        assert as_json.returncode == 0, str(as_json)
        return plain.out, json.loads(as_json.out)

    plain, state = status()
    assert "free" in plain
    assert state["state"] == "free"
    assert state["lock"] == str(lock_file)
    assert state["holder"] is None and state["stale_reason"] is None

    planted = _plant_live(lock_file, sleeper)
    plain, state = status()
    assert "held" in plain and "stale" not in plain
    for part in (f"pid {sleeper.pid} on {HOST}", PLANTED_SINCE, PLANTED_COMMAND):
        assert part in plain
    assert state["state"] == "held"
    assert state["holder"] == planted
    assert state["stale_reason"] is None

    pid = dead_pid()
    planted = plant_lock(lock_file, pid=pid, create_time=time.time() - 60)
    plain, state = status()
    assert "stale" in plain and f"its holder, pid {pid}, is gone" in plain
    assert state["state"] == "stale"
    assert state["holder"] == planted
    assert state["stale_reason"] == f"its holder, pid {pid}, is gone"
    assert json.loads(lock_file.read_text()) == planted  # looking changes nothing


# --- race-free takeover, process against process -----------------------------------------

CONTENDER = textwrap.dedent(
    """
    import os, sys, time
    from pathlib import Path

    import psutil  # imported before the start: all contenders then race evenly
    from dbtvenv.lock import EnvLock

    lock = EnvLock(Path(sys.argv[1]), timeout=60, lease=60, poll_interval=0.05,
                   on_wait=lambda message: print(message, flush=True))
    print("ready", flush=True)
    os.read(int(sys.argv[2]), 1)  # blocks until the test closes the pipe: go
    with lock:
        print("holding", flush=True)
        time.sleep(0.1)
    """
)


def test_contenders_started_at_the_same_instant_take_a_stale_lock_over_once(
    tmp_path: Path, make_env: MakeEnv
) -> None:
    lock_file = tmp_path / "0123456789abcdef.lock"
    pid = dead_pid()
    plant_lock(lock_file, pid=pid, create_time=time.time() - 60)
    go_read, go_write = os.pipe()
    contenders: list[subprocess.Popen[bytes]] = []
    try:
        for _ in range(12):
            contenders.append(
                subprocess.Popen(
                    [sys.executable, "-c", CONTENDER, str(lock_file), str(go_read)],
                    env=make_env(),
                    pass_fds=[go_read],
                    stdout=subprocess.PIPE,
                    stderr=subprocess.STDOUT,
                )
            )
        os.close(go_read)
        for contender in contenders:
            assert contender.stdout is not None
            assert contender.stdout.readline() == b"ready\n"
        os.close(go_write)  # all of them wake up at once and race for the stale lock
        outputs = [c.communicate(timeout=120)[0].decode() for c in contenders]
    finally:
        for c in contenders:
            if c.poll() is None:
                c.kill()
                c.wait()
    assert all(c.returncode == 0 for c in contenders), outputs
    takeovers = [line for out in outputs for line in out.splitlines() if "taking over" in line]
    assert len(takeovers) == 1, outputs
    assert f"pid {pid}, is gone" in takeovers[0]
    assert sum(out.count("holding") for out in outputs) == 12
    assert not lock_file.exists()


# --- lock.py, unit by unit ---------------------------------------------------------------


def _holder(**changes: object) -> dict[str, object]:
    data: dict[str, object] = {
        "pid": 4242,
        "create_time": 1764000000.12,
        "hostname": "worker-3",
        "acquired_at": PLANTED_SINCE,
        "argv": ["dbtvenv", "run"],
    }
    data.update(changes)
    return data


def test_holder_parse_round_trips() -> None:
    holder = Holder.parse(json.dumps(_holder()).encode())
    assert holder is not None
    assert holder.to_json() == _holder()


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"[]",
        b"null",
        b'"text"',
        b"\xff\xfe",
        b"[" * 100_000,
        json.dumps({k: v for k, v in _holder().items() if k != "pid"}).encode(),
        json.dumps(_holder(pid="many")).encode(),
        json.dumps(_holder(pid=0)).encode(),
        json.dumps(_holder(pid=-1)).encode(),
        json.dumps(_holder(create_time=float("nan"))).encode(),
        json.dumps(_holder(hostname="")).encode(),
        json.dumps(_holder(argv="dbtvenv run")).encode(),
        json.dumps(_holder(argv=["dbtvenv", 1])).encode(),
        json.dumps(_holder(hostname=["worker-3"])).encode(),
        json.dumps(_holder(acquired_at=None)).encode(),
        # What Python's json reads beyond JSON, and numbers no pid or time can be.
        b'{"pid": 1e400, "create_time": 1, "hostname": "h", "acquired_at": "", "argv": []}',
        b'{"pid": Infinity, "create_time": 1, "hostname": "h", "acquired_at": "", "argv": []}',
        b'{"pid": 1, "create_time": NaN, "hostname": "h", "acquired_at": "", "argv": []}',
        b'{"pid": 1, "create_time": -Infinity, "hostname": "h", "acquired_at": "", "argv": []}',
        b'{"pid": 1, "create_time": 1e400, "hostname": "h", "acquired_at": "", "argv": []}',
        b'{"pid": 1, "create_time": 1, "hostname": "h", "acquired_at": "", "argv": [], '
        b'"lease": NaN}',
        json.dumps(_holder(pid=10**30)).encode(),
        json.dumps(_holder(pid=-(10**30))).encode(),
        json.dumps(_holder(create_time=10**400)).encode(),
        json.dumps(_holder(create_time=-5.0)).encode(),
        json.dumps(_holder(pid=True)).encode(),
        json.dumps(_holder(pid=4242.5)).encode(),
        json.dumps(_holder(pid="4242")).encode(),
        json.dumps(_holder(create_time="1764000000")).encode(),
        json.dumps(_holder(lease=0)).encode(),
        json.dumps(_holder(lease=1e10)).encode(),
        json.dumps(_holder(lease="60")).encode(),
        b"1" * 5000,  # beyond Python's limit on the digits of an int
        b'{"pid": ' + b"9" * 5000 + b"}",
    ],
)
def test_holder_parse_rejects_what_is_not_a_sane_lock(raw: bytes) -> None:
    assert Holder.parse(raw) is None


@pytest.mark.parametrize(
    "content",
    [
        b'{"pid": 1e400, "create_time": 1, "hostname": "h", "acquired_at": "", "argv": []}',
        b'{"pid": 1, "create_time": Infinity, "hostname": "h", "acquired_at": "", "argv": []}',
        json.dumps(_holder(pid=-(10**30))).encode(),
        json.dumps([_holder()]).encode(),
    ],
    ids=["pid-1e400", "create-time-infinity", "pid-huge-negative", "a-list"],
)
def test_a_lock_no_holder_could_have_written_is_unparseable_everywhere(
    content: bytes, dbtvenv: RunDbtvenv, spec: dict[str, str], env_dir: Path, lock_file: Path
) -> None:
    """Neither `lock status`, `env gc` nor a run crashes on it: it is an unparseable lock."""
    lock_file.parent.mkdir(parents=True)
    lock_file.write_bytes(content)
    past = time.time() - 60
    os.utime(lock_file, (past, past))
    status = dbtvenv("lock", "status", "--json", env=spec)
    assert status.returncode == 0, str(status)
    assert json.loads(status.out)["state"] == "stale"
    assert json.loads(status.out)["holder"] is None
    # gc removes only dbtvenv's own entries, and dbtvenv never writes such a file: kept.
    collected = dbtvenv("env", "gc", "--venv-dir", env_dir.parent)
    assert collected.returncode == 0, str(collected)
    assert lock_file.read_bytes() == content
    result = dbtvenv("run", env=spec)  # in a run's way: taken over
    assert result.returncode == 0, str(result)
    assert re.search(r"it cannot be parsed and is 6\d s old", _takeover_line(result))


def test_describe_is_one_line_whatever_the_arguments() -> None:
    holder = Holder.parse(
        json.dumps(_holder(argv=["dbtvenv", "run", "--vars", "a: 1\nb: 2"])).encode()
    )
    assert holder is not None
    text = holder.describe()
    assert "\n" not in text
    assert "a: 1\\nb: 2" in text


def _parsed(**changes: object) -> Holder:
    holder = Holder.parse(json.dumps(_holder(**changes)).encode())
    assert holder is not None
    return holder


def test_stale_reason_on_this_host() -> None:
    me = psutil.Process()
    now = time.time()
    alive = _parsed(pid=me.pid, create_time=me.create_time(), hostname=HOST)
    assert stale_reason(alive, now - 3600, lease=60, now=now) is None  # age does not matter
    nearly = _parsed(pid=me.pid, create_time=me.create_time() + 0.5, hostname=HOST)
    assert stale_reason(nearly, now, lease=60, now=now) is None  # rounding of create times
    reused = _parsed(pid=me.pid, create_time=me.create_time() - 5, hostname=HOST)
    assert "another process" in (stale_reason(reused, now, lease=60, now=now) or "")
    gone = _parsed(pid=dead_pid(), hostname=HOST)
    assert "is gone" in (stale_reason(gone, now, lease=60, now=now) or "")


def test_a_zombie_holder_is_dead() -> None:
    proc = subprocess.Popen(["true"])
    wait_until(lambda: psutil.Process(proc.pid).status() == psutil.STATUS_ZOMBIE, "a zombie")
    try:
        zombie = _parsed(pid=proc.pid, create_time=time.time(), hostname=HOST)
        assert "is gone" in (stale_reason(zombie, time.time(), lease=60, now=time.time()) or "")
    finally:
        proc.wait()


def test_stale_reason_for_another_host_and_for_unparseable_locks() -> None:
    now = time.time()
    other = _parsed(pid=dead_pid(), hostname=OTHER_HOST)
    # Another host's lock: only what the reader itself watched counts, never the mtime.
    for mtime in (now - 3600, now, now + 3600):
        assert stale_reason(other, mtime, lease=60, now=now) is None
        assert stale_reason(other, mtime, lease=60, now=now, unchanged_for=59) is None
        reason = stale_reason(other, mtime, lease=60, now=now, unchanged_for=61)
        assert "not renewed it for 61 s, a whole lease (60 s)" in (reason or "")
    # The holder's own lease, when longer than ours, is the one it is judged by.
    patient = _parsed(pid=dead_pid(), hostname=OTHER_HOST, lease=600)
    assert stale_reason(patient, now, lease=60, now=now, unchanged_for=61) is None
    assert stale_reason(patient, now, lease=60, now=now, unchanged_for=601) is not None
    young = now - UNPARSEABLE_GRACE + 1
    assert stale_reason(None, young, lease=60, now=now) is None
    old = now - UNPARSEABLE_GRACE - 1
    assert "cannot be parsed" in (stale_reason(None, old, lease=60, now=now) or "")
    # An unparseable file dated ahead of our clock: stale once watched unchanged for 10 s.
    ahead = now + 3600
    assert stale_reason(None, ahead, lease=60, now=now) is None
    watched = stale_reason(None, ahead, lease=60, now=now, unchanged_for=UNPARSEABLE_GRACE)
    assert "has not changed for 10 s" in (watched or "")


def test_a_watch_restarts_whenever_the_file_changes(tmp_path: Path) -> None:
    path = tmp_path / "k.lock"
    plant_lock(path, pid=4242, create_time=time.time(), hostname=OTHER_HOST)
    watch = Watch()
    first = read_lock(path, lease=60, watch=watch)
    assert first is not None and first.unchanged_for == 0.0
    time.sleep(0.05)
    again = read_lock(path, lease=60, watch=watch)
    assert again is not None and again.unchanged_for > 0.0
    os.utime(path)  # a renewal
    renewed = read_lock(path, lease=60, watch=watch)
    assert renewed is not None and renewed.unchanged_for == 0.0


def test_read_lock_never_follows_a_symlink(tmp_path: Path) -> None:
    target = tmp_path / "elsewhere.json"
    plant_lock(target, pid=dead_pid(), create_time=time.time())
    link = tmp_path / "k.lock"
    link.symlink_to(target)
    state = read_lock(link, lease=60)
    assert state is not None and state.holder is None  # unparseable: a symlink is no lock
    assert read_lock(tmp_path / "missing.lock", lease=60) is None


def test_read_lock_of_a_directory_fifo_or_socket_is_unparseable_and_never_blocks(
    tmp_path: Path,
) -> None:
    import socket as sockets

    (tmp_path / "dir.lock").mkdir()
    os.mkfifo(tmp_path / "fifo.lock")
    os.mkfifo(tmp_path / "busy.lock")
    server = sockets.socket(sockets.AF_UNIX)
    server.bind(str(tmp_path / "socket.lock"))
    # A FIFO whose writer pours out bytes for ever, as a file that changes while it is read.
    pour = (
        "import sys\n"
        "with open(sys.argv[1], 'wb') as f:\n"
        "    while True: f.write(b'{\"pid\": 1,' * 999)"
    )
    writer = subprocess.Popen(
        [sys.executable, "-c", pour, str(tmp_path / "busy.lock")], stderr=subprocess.DEVNULL
    )
    try:
        for name in ("dir.lock", "fifo.lock", "busy.lock", "socket.lock"):
            started = time.monotonic()
            state = read_lock(tmp_path / name, lease=60)
            assert time.monotonic() - started < 5, name
            assert state is not None and state.holder is None, name
            assert state.stale_reason is None, name  # young: a writer may be at work
            assert state.is_directory == (name == "dir.lock")
    finally:
        writer.kill()
        writer.wait()
        server.close()


def test_a_directory_in_the_locks_place_is_taken_over(
    dbtvenv: RunDbtvenv, spec: dict[str, str], env_dir: Path, lock_file: Path
) -> None:
    (lock_file / "inside").mkdir(parents=True)
    past = time.time() - 60
    os.utime(lock_file, (past, past))
    collected = dbtvenv("env", "gc", "--venv-dir", env_dir.parent)
    assert collected.returncode == 0, str(collected)  # not dbtvenv's: gc leaves it
    assert (lock_file / "inside").is_dir()
    result = dbtvenv("run", env=spec)
    assert result.returncode == 0, str(result)
    assert re.search(r"it cannot be parsed and is 6\d s old", _takeover_line(result))
    assert not lock_file.exists()
    assert [p.name for p in env_dir.parent.glob(".*.trash")] == []


def test_acquire_writes_the_contract_json_and_release_removes_it(tmp_path: Path) -> None:
    path = tmp_path / "k.lock"
    argv = ["dbtvenv", "run", "--pip-install-options", "--index-url https://me:s3cret@host/simple"]
    with EnvLock(path, timeout=5, lease=60, argv=argv):
        data = json.loads(path.read_text())
        me = psutil.Process()
        assert data["pid"] == me.pid
        assert abs(data["create_time"] - me.create_time()) < 0.01
        assert data["hostname"] == HOST
        assert data["argv"][-1] == "--index-url https://***@host/simple"
        assert "s3cret" not in path.read_text()
        assert oct(path.stat().st_mode & 0o777) == "0o644"
    assert not path.exists()
    assert [p.name for p in tmp_path.iterdir()] == ["k.lock.guard"]


def test_the_holder_renews_its_lease_while_it_holds_the_lock(tmp_path: Path) -> None:
    path = tmp_path / "k.lock"
    lease = 1.0
    with EnvLock(path, timeout=5, lease=lease):
        for _ in range(3):
            past = time.time() - 100
            os.utime(path, (past, past))
            wait_until(lambda: time.time() - path.stat().st_mtime < lease / 2, "a renewal", 5)


def test_a_lost_lock_is_noticed_and_the_new_holders_file_is_left_alone(
    tmp_path: Path, sleeper: psutil.Process
) -> None:
    path = tmp_path / "k.lock"
    lock = EnvLock(path, timeout=5, lease=60)
    with lock:
        lock.check()  # still ours: nothing to say
        theirs = _plant_live(path, sleeper)  # as a waiter that judged us dead would
        with pytest.raises(LockLost, match=f"pid {sleeper.pid}"):
            lock.check()
    assert json.loads(path.read_text()) == theirs


def test_a_timeout_names_the_holder(tmp_path: Path, sleeper: psutil.Process) -> None:
    path = tmp_path / "k.lock"
    _plant_live(path, sleeper)
    messages: list[str] = []
    started = time.monotonic()
    with pytest.raises(LockTimeout) as raised:
        EnvLock(path, timeout=0.5, lease=60, on_wait=messages.append, poll_interval=0.1).acquire()
    assert time.monotonic() - started < 30
    assert f"pid {sleeper.pid} on {HOST} since {PLANTED_SINCE} ({PLANTED_COMMAND})" in str(
        raised.value
    )
    assert len(messages) == 1 and "waiting for the lock k.lock" in messages[0]


def test_a_signal_right_after_acquiring_leaves_no_lock_behind(tmp_path: Path) -> None:
    path = tmp_path / "k.lock"

    class Interrupted(Exception):
        pass

    def interrupt(message: str) -> None:
        raise Interrupted  # the "taking over" message comes once our file is in place

    plant_lock(path, pid=dead_pid(), create_time=time.time())
    with pytest.raises(Interrupted), EnvLock(path, timeout=5, lease=60, on_wait=interrupt):
        pass
    assert not path.exists()


def test_a_holder_ended_by_sigterm_leaves_no_lock(tmp_path: Path, make_env: MakeEnv) -> None:
    """dbtvenv turns SIGTERM into an exception: the lock goes on the way out."""
    path = tmp_path / "k.lock"
    script = textwrap.dedent(
        """
        import signal, sys, time
        from pathlib import Path
        from dbtvenv.lock import EnvLock

        def stop(signum, frame):
            raise SystemExit(143)

        signal.signal(signal.SIGTERM, stop)
        with EnvLock(Path(sys.argv[1]), timeout=5, lease=60):
            print("holding", flush=True)
            time.sleep(60)
        """
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", script, str(path)], env=make_env(), stdout=subprocess.PIPE
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline() == b"holding\n"
        assert path.exists()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 143
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()
    assert not path.exists()


def test_a_guard_removed_while_waited_for_is_opened_again(tmp_path: Path) -> None:
    """A waiter that gets the flock of a guard file somebody has meanwhile removed (and a
    newcomer has made anew) must not take it for the guard: it opens the new one and waits
    for whoever holds that, so that two processes never hold "the guard" at once."""
    import fcntl
    import threading

    from dbtvenv.lock import GuardTimeout, hold_guard

    guard = tmp_path / "k.lock.guard"
    old = os.open(guard, os.O_RDWR | os.O_CREAT, 0o644)
    fcntl.flock(old, fcntl.LOCK_EX)
    outcome: list[str] = []

    def waiter() -> None:
        try:
            with hold_guard(guard, timeout=3):
                outcome.append("held")
        except GuardTimeout:
            outcome.append("timed out")

    thread = threading.Thread(target=waiter)
    thread.start()

    def open_count() -> int:
        fds = os.listdir("/proc/self/fd")
        return sum(1 for fd in fds if _readlink(f"/proc/self/fd/{fd}") == str(guard))

    wait_until(lambda: open_count() == 2, "the waiter has the guard open", timeout=10)
    os.unlink(guard)
    new = os.open(guard, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
    fcntl.flock(new, fcntl.LOCK_EX)  # a newcomer holds the new guard
    os.close(old)  # the waiter now gets the old file's flock
    thread.join(timeout=30)
    os.close(new)
    assert outcome == ["timed out"]


def _readlink(path: str) -> str | None:
    try:
        return os.readlink(path)
    except OSError:
        return None
