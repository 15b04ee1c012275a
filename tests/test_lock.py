"""The env lock (`DIR/<key>.lock`): when it is stale, what a waiter does, what users see.

The process-level tests plant a lock file as another dbtvenv would have left it (a dead
holder, a live one, a reused pid, another host's, an unparseable one) in front of a cold cache
and run the real dbtvenv against it. The unit tests below them pin down `lock.py`'s edge cases.
"""

from __future__ import annotations

import json
import os
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
from lockfaults import PLANTED_ARGV, dead_pid, plant_lock, wait_until

from dbtvenv.errors import LockLost, LockTimeout
from dbtvenv.lock import UNPARSEABLE_GRACE, EnvLock, Holder, read_lock, stale_reason

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


def test_another_hosts_lock_past_its_lease_is_taken_over(
    dbtvenv: RunDbtvenv, spec: dict[str, str], env_dir: Path, lock_file: Path
) -> None:
    plant_lock(lock_file, pid=12345, create_time=time.time(), hostname=OTHER_HOST, age=30)

    result = dbtvenv("run", env={**spec, "DBTVENV_LOCK_LEASE": "3"})

    assert result.returncode == 0, str(result)
    takeover = _takeover_line(result)
    assert f"its holder on {OTHER_HOST} has not refreshed it for 30 s" in takeover
    assert f"was pid 12345 on {OTHER_HOST}" in takeover
    assert "waiting for the lock" not in result.err
    assert result.json()["prefix"] == str(env_dir)


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
    assert "it cannot be parsed and is 60 s old" in _takeover_line(result)
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
    ],
)
def test_holder_parse_rejects_what_is_not_a_sane_lock(raw: bytes) -> None:
    assert Holder.parse(raw) is None


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
    assert stale_reason(other, now - 59, lease=60, now=now) is None
    assert stale_reason(other, now + 30, lease=60, now=now) is None  # a clock ahead of ours
    assert "not refreshed it for 61 s" in (stale_reason(other, now - 61, lease=60, now=now) or "")
    young = now - UNPARSEABLE_GRACE + 1
    assert stale_reason(None, young, lease=60, now=now) is None
    old = now - UNPARSEABLE_GRACE - 1
    assert "cannot be parsed" in (stale_reason(None, old, lease=60, now=now) or "")


def test_read_lock_never_follows_a_symlink(tmp_path: Path) -> None:
    target = tmp_path / "elsewhere.json"
    plant_lock(target, pid=dead_pid(), create_time=time.time())
    link = tmp_path / "k.lock"
    link.symlink_to(target)
    state = read_lock(link, lease=60)
    assert state is not None and state.holder is None  # unparseable: a symlink is no lock
    assert read_lock(tmp_path / "missing.lock", lease=60) is None


def test_read_lock_of_a_directory_or_fifo_is_unparseable(tmp_path: Path) -> None:
    (tmp_path / "dir.lock").mkdir()
    os.mkfifo(tmp_path / "fifo.lock")
    for name in ("dir.lock", "fifo.lock"):
        state = read_lock(tmp_path / name, lease=60)
        assert state is not None and state.holder is None and state.stale_reason is None


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
