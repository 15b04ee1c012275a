"""A cache dir shared with other users: what they plant there is never run, written through,
deleted or told a secret. Every test here acts as real unprivileged users (``setpriv`` with
throw-away uids, see tests/users.py) against dirs they can really write."""

from __future__ import annotations

import json
import os
import shlex
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import MakeEnv, Result, RunDbtvenv
from lockfaults import STANDIN_WHEEL, Background, WheelServer, dead_pid, wait_until
from users import ALICE, BOB, CAROL, SHARE, PublicDbtvenv, can_switch_users

from dbtvenv.errors import VenvDirError

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="Linux users and file modes")

PRECIOUS = "alice's thesis: must never be truncated, chmod-ed or deleted\n"


@pytest.fixture(scope="module")
def users(wheelhouse: Path) -> Iterator[PublicDbtvenv]:
    if not can_switch_users():
        pytest.skip("acting as other users needs root and setpriv")
    public = PublicDbtvenv(wheelhouse)
    try:
        yield public
    finally:
        public.remove()


@pytest.fixture
def thesis(users: PublicDbtvenv) -> Iterator[Path]:
    """A file of alice's that bob points his planted links at."""
    path = users.home(ALICE) / "thesis.txt"
    path.write_text(PRECIOUS)
    os.chown(path, ALICE, ALICE)
    path.chmod(0o600)
    past = time.time() - 3600
    os.utime(path, (past, past))
    yield path
    path.unlink(missing_ok=True)


def assert_intact(path: Path) -> None:
    st = path.stat()
    assert path.read_text() == PRECIOUS
    assert stat.S_IMODE(st.st_mode) == 0o600 and st.st_uid == ALICE
    assert time.time() - st.st_mtime > 3000


def one_error(result: Result) -> str:
    """The one `dbtvenv: error:` line of a refusal (and nothing like a traceback)."""
    errors = [line for line in result.err.splitlines() if line.startswith("dbtvenv: error:")]
    assert len(errors) == 1 and "Traceback" not in result.err, result
    assert result.stdout == b"", result
    return errors[0]


def env_path(users: PublicDbtvenv, uid: int, cache: Path, groups: tuple[int, ...] = ()) -> Path:
    found = users.run(uid, "env", "path", "--venv-dir", cache, groups=groups)
    assert found.returncode == 0, found
    return Path(found.out.strip())


# --- planted lock guards ------------------------------------------------------------------


@pytest.mark.parametrize("planted", ["symlink", "fifo", "file"])
def test_a_planted_lock_guard_is_never_followed_or_opened(
    users: PublicDbtvenv, thesis: Path, planted: str
) -> None:
    """A team dir (sticky, setgid, group-writable): bob puts a symbolic link to alice's file,
    a FIFO or a file of his own where alice's next build opens its lock guard."""
    cache = users.shared_dir(f"guard-{planted}", 0o3775, gid=SHARE)
    env_dir = env_path(users, ALICE, cache, (SHARE,))
    guard = cache / f"{env_dir.name}.lock.guard"
    plant = {
        "symlink": f"ln -s {thesis} {guard}",
        "fifo": f"mkfifo -m 666 {guard}",
        "file": f"touch {guard}",
    }[planted]
    users.shell(BOB, plant, groups=(SHARE,))

    result = users.run(
        ALICE, "env", "prepare", "--venv-dir", cache, "--lock-timeout", "2", groups=(SHARE,)
    )
    assert result.returncode == 73, result
    error = one_error(result)
    assert str(guard) in error and f"uid {BOB}" in error, error
    expected = {"symlink": "symbolic link", "fifo": "a FIFO", "file": "does not trust"}
    assert expected[planted] in error, error
    assert_intact(thesis)
    assert not env_dir.exists()
    assert os.lstat(guard).st_uid == BOB  # not ours: left where it is


# --- planted envs ---------------------------------------------------------------------------


def plant_env(
    users: PublicDbtvenv, uid: int, env_dir: Path, marker: Path, groups: tuple[int, ...] = ()
) -> None:
    """What bob leaves where alice's env of that spec belongs: a complete, healthy-looking
    env whose `dbt` is his shell script."""
    users.shell(
        uid,
        f"""
        mkdir -p {env_dir}/bin
        printf '#!/bin/sh\\ntouch {marker}\\necho "{{}}"\\n' > {env_dir}/bin/dbt
        chmod 755 {env_dir}/bin/dbt
        ln -s /usr/bin/python3 {env_dir}/bin/python
        echo 'home = /usr/bin' > {env_dir}/pyvenv.cfg
        echo '{{}}' > {env_dir}/dbtvenv.json
        """,
        groups=groups,
    )


# name: (owner of the cache dir, its group, its mode, what alice's refusal names)
LAYOUTS = {
    "alice's 1777 dir": (ALICE, ALICE, 0o1777, "env"),
    "bob's 1777 dir": (BOB, BOB, 0o1777, "owner"),
    "group dir 2775": (0, SHARE, 0o2775, "group"),
    "team dir 3775": (0, SHARE, 0o3775, "env"),
}


@pytest.mark.parametrize("layout", LAYOUTS)
def test_an_env_another_user_planted_is_never_run_or_deleted(
    users: PublicDbtvenv, layout: str
) -> None:
    owner, group, mode, refused = LAYOUTS[layout]
    cache = users.shared_dir(f"planted-{mode:o}-{owner}", mode, uid=owner, gid=group)
    groups = (SHARE,)
    env_dir = env_path(users, BOB, cache, groups)  # bob computes alice's key, as she would
    assert env_dir == env_path(users, ALICE, cache, groups)
    marker = users.base / f"pwned-{mode:o}-{owner}"
    plant_env(users, BOB, env_dir, marker, groups)

    for args in (
        ["run", "--venv-dir", cache, "--select", "x"],
        ["env", "prepare", "--venv-dir", cache],
    ):
        result = users.run(ALICE, *args, groups=groups)
        assert result.returncode == 73, result
        error = one_error(result)
        if refused == "env":  # the dir is fine; bob's env in it is not
            assert f"env {env_dir} is owned by uid {BOB}" in error, error
            assert "does not trust" in error and "DBTVENV_TRUSTED_OWNERS" in error, error
        elif refused == "owner":  # bob owns the dir: he may rename anything in it
            assert f"venv dir {cache} is owned by uid {BOB}" in error, error
        else:  # without the sticky bit every member of the group may swap alice's envs
            assert f"venv dir {cache} (mode 2775" in error, error
            assert f"lets members of group gid {SHARE}" in error and "chmod +t" in error, error
        assert not marker.exists(), "bob's dbt ran as alice"

    for args in (["env", "gc", "--older-than", "0s"], ["env", "rm", "--all"]):
        users.run(ALICE, *args, "--venv-dir", cache, groups=groups)
        assert (env_dir / "bin" / "dbt").is_file(), f"{args} deleted bob's env"
        assert not marker.exists()


def test_a_file_another_user_left_in_an_envs_place_is_not_deleted(users: PublicDbtvenv) -> None:
    """In alice's own 1777 dir she could delete bob's file at `DIR/<key>` (she owns the dir),
    but it is bob's, and no env: refused, kept as it was."""
    cache = users.shared_dir("file-in-place", 0o1777, uid=ALICE, gid=ALICE)
    env_dir = env_path(users, ALICE, cache)
    users.shell(BOB, f"echo 'bob wrote this' > {env_dir}")
    result = users.run(ALICE, "run", "--venv-dir", cache)
    assert result.returncode == 73, result
    assert f"a file in the place of env {env_dir} is owned by uid {BOB}" in one_error(result)
    for args in (["rm", env_dir.name], ["rm", "--all"], ["gc", "--older-than", "0s"]):
        users.run(ALICE, "env", args[0], "--venv-dir", cache, *args[1:])  # no env: none removed
        assert env_dir.read_text() == "bob wrote this\n", args


def test_an_env_others_can_write_is_refused(users: PublicDbtvenv) -> None:
    """alice's own env, but bob could have changed it since: its site-packages or its dbt
    became writable by other users."""
    cache = users.shared_dir("writable", 0o700, uid=ALICE, gid=ALICE)
    built = users.run(ALICE, "env", "prepare", "--venv-dir", cache)
    assert built.returncode == 0, built
    env_dir = Path(built.out.strip())
    (site,) = env_dir.glob("lib/python*/site-packages")
    for path, mode in ((site, 0o777), (env_dir / "bin" / "dbt", 0o775)):
        original = stat.S_IMODE(path.stat().st_mode)
        path.chmod(mode)
        result = users.run(ALICE, "run", "--venv-dir", cache)
        assert result.returncode == 73, result
        error = one_error(result)
        assert f"{path} (mode {mode:04o}, owner uid {ALICE}) can be changed by" in error, error
        path.chmod(original)
    assert users.run(ALICE, "run", "--venv-dir", cache).returncode == 0


def test_alice_builds_safe_envs_whatever_her_umask(users: PublicDbtvenv) -> None:
    """With a umask of 000 every file pip makes would be writable by everyone: dbtvenv masks
    group and other write off while it builds, so the env passes its own trust check."""
    cache = users.shared_dir("umask", 0o755, uid=ALICE, gid=ALICE)
    result = users.run(ALICE, "run", "--venv-dir", cache, umask=0)
    assert result.returncode == 0, result
    env_dir = cache / result.json()["prefix"].rsplit("/", 1)[-1]
    modes = {stat.S_IMODE(p.lstat().st_mode) for p in env_dir.rglob("*") if not p.is_symlink()}
    assert not [oct(m) for m in modes if m & 0o022], "group or other write in the env"
    assert stat.S_IMODE(cache.stat().st_mode) == 0o755


# --- sharing a cache safely -------------------------------------------------------------------


def test_a_team_shares_a_sticky_dir_and_names_whom_it_trusts(users: PublicDbtvenv) -> None:
    """docs/security.md's team recipe: a root-owned 3775 dir of the team's group; carol
    builds, alice uses carol's env once she trusts carol (DBTVENV_TRUSTED_OWNERS), and is
    refused it before."""
    cache = users.shared_dir("team", 0o3775, uid=0, gid=SHARE)
    groups = (SHARE,)
    built = users.run(CAROL, "env", "prepare", "--venv-dir", cache, groups=groups)
    assert built.returncode == 0, built
    env_dir = Path(built.out.strip())
    assert env_dir.stat().st_uid == CAROL and env_dir.stat().st_gid == SHARE  # setgid dir

    refused = users.run(ALICE, "run", "--venv-dir", cache, groups=groups)
    assert refused.returncode == 73, refused
    assert f"is owned by uid {CAROL}" in one_error(refused)

    trusting = {"DBTVENV_TRUSTED_OWNERS": f"{CAROL}"}
    used = users.run(ALICE, "run", "--venv-dir", cache, groups=groups, env=trusting)
    assert used.returncode == 0, used
    assert used.json()["prefix"] == str(env_dir)
    assert "building" not in used.err, "carol's env is used, not rebuilt"

    # The same for a second spec: alice builds it, carol (trusting alice) uses it.
    second = {"DBTVENV_REQUIREMENTS": "dbt-standin==2.0.0"}
    mine = users.run(ALICE, "env", "prepare", "--venv-dir", cache, groups=groups, env=second)
    assert mine.returncode == 0, mine
    theirs = users.run(
        CAROL, "run", "--venv-dir", cache, groups=groups,
        env={**second, "DBTVENV_TRUSTED_OWNERS": "41011"},
    )  # fmt: skip
    assert theirs.returncode == 0 and "building" not in theirs.err, theirs


def test_a_bad_trusted_owners_setting_is_a_usage_error(users: PublicDbtvenv) -> None:
    cache = users.shared_dir("bad-setting", 0o700, uid=ALICE, gid=ALICE)
    result = users.run(
        ALICE, "run", "--venv-dir", cache, env={"DBTVENV_TRUSTED_OWNERS": "no-such-user-x"}
    )
    assert result.returncode == 64, result
    assert "DBTVENV_TRUSTED_OWNERS names 'no-such-user-x'" in one_error(result)


def test_an_env_root_built_is_used_by_another_user(users: PublicDbtvenv) -> None:
    """README's Dockerfile recipe: root makes the dir and builds the env at image build
    time; the image's runtime user runs dbt from it (and cannot change it)."""
    cache = users.base / "shared" / "opt-dbtvenv"
    built = users.run(0, "env", "prepare", "--venv-dir", cache)  # mkdir -p by dbtvenv: 0700
    assert built.returncode == 0, built
    cache.chmod(0o755)  # as `mkdir -p` beforehand makes it
    env_dir = Path(built.out.strip())
    ran = users.run(ALICE, "run", "--venv-dir", cache)
    assert ran.returncode == 0, ran
    assert ran.json()["prefix"] == str(env_dir) and "building" not in ran.err
    listed = users.run(ALICE, "env", "list", "--venv-dir", cache, "--json")
    assert listed.returncode == 0 and env_dir.name in listed.out, listed


# --- env gc and env rm remove only dbtvenv's own entries ------------------------------------


def test_a_project_dir_as_venv_dir_loses_nothing_but_dbtvenvs_own_entries(
    users: PublicDbtvenv,
) -> None:
    """`--venv-dir .` in a project: the project keeps its backups (no CACHEDIR.TAG) and gc and
    rm take only the env and dbtvenv's own files, however old and lock- or temp-like the
    project's files look."""
    project = users.shared_dir("project", 0o755, uid=ALICE, gid=ALICE)
    day_ago = time.time() - 86400
    files = {
        "dbt_project.yml": "name: jaffle\n",
        "poetry.lock": "# This file is automatically @generated by Poetry\n",
        "0123456789abcdef.lock": "not a lock of dbtvenv's\n",
        ".notes.tmp": "draft\n",
        ".trash/keep.txt": "the project's own trash\n",
    }
    for name, text in files.items():
        path = project / name
        path.parent.mkdir(exist_ok=True)
        path.write_text(text)
    for path in project.rglob("*"):
        os.chown(path, ALICE, ALICE)
        os.utime(path, (day_ago, day_ago))

    built = users.run(ALICE, "env", "prepare", "--venv-dir", ".", cwd=project)
    assert built.returncode == 0, built
    env_dir = Path(built.out.strip())
    assert env_dir.parent == project
    assert not (project / "CACHEDIR.TAG").exists(), "the project would drop out of backups"

    gc = users.run(ALICE, "env", "gc", "--venv-dir", ".", "--older-than", "0s", cwd=project)
    assert gc.returncode == 0, gc
    assert str(env_dir) in gc.out and not env_dir.exists(), gc
    assert users.run(ALICE, "env", "prepare", "--venv-dir", ".", cwd=project).returncode == 0
    rm = users.run(ALICE, "env", "rm", "--venv-dir", ".", "--all", cwd=project)
    assert rm.returncode == 0 and not env_dir.exists(), rm
    left = {str(p.relative_to(project)): p.read_text() for p in project.rglob("*") if p.is_file()}
    assert {k: v for k, v in left.items() if not k.endswith(".guard")} == files


def test_cachedir_tag_goes_only_into_dirs_of_dbtvenvs_own(users: PublicDbtvenv) -> None:
    made = users.home(ALICE) / "made-by-dbtvenv"
    empty = users.shared_dir("empty", 0o755, uid=ALICE, gid=ALICE)
    for cache in (made, empty):
        built = users.run(ALICE, "env", "prepare", "--venv-dir", cache)
        assert built.returncode == 0, built
        assert (cache / "CACHEDIR.TAG").read_text().startswith("Signature: 8a477f597d28d172")
    # A cache that lost its tag but holds only dbtvenv's entries gets it back with a build.
    (empty / "CACHEDIR.TAG").unlink()
    second = {"DBTVENV_REQUIREMENTS": "dbt-standin==2.0.0"}
    assert users.run(ALICE, "env", "prepare", "--venv-dir", empty, env=second).returncode == 0
    assert (empty / "CACHEDIR.TAG").is_file()


@pytest.mark.parametrize("whose", ["alice's own link", "bob's link in a 1777 dir"])
def test_a_symlink_in_an_envs_place_is_removed_itself_never_followed(
    users: PublicDbtvenv, whose: str
) -> None:
    """`DIR/<key>` links to alice's env in another cache of hers: rm, gc and run remove the
    link, never what it points to; bob's link in root's sticky dir, which alice may not
    remove, is refused (rm, run) or kept (gc), and never followed either."""
    other = users.shared_dir(f"other-{whose[:3]}", 0o700, uid=ALICE, gid=ALICE)
    built = users.run(ALICE, "env", "prepare", "--venv-dir", other)
    assert built.returncode == 0, built
    target = Path(built.out.strip())
    precious = {p: p.read_bytes() for p in target.rglob("*") if p.is_file()}
    bobs = whose.startswith("bob")
    cache = users.shared_dir(
        f"linked-{whose[:3]}", 0o1777 if bobs else 0o700, uid=0 if bobs else ALICE
    )
    link = cache / target.name

    def plant() -> None:
        users.shell(BOB if bobs else ALICE, f"ln -s {target} {link}")

    for args in (
        ["env", "rm", "--venv-dir", cache, target.name],
        ["env", "gc", "--venv-dir", cache, "--older-than", "0s"],
        ["run", "--venv-dir", cache],
    ):
        if not link.is_symlink():
            plant()
        result = users.run(ALICE, *args)
        if bobs:
            assert link.is_symlink(), f"{args}: alice removed bob's link"
            if args[0] != "env" or args[1] == "rm":
                assert result.returncode == 73, result
                assert f"{link} is a symbolic link owned by uid {BOB}" in one_error(result)
        else:
            assert result.returncode == 0, result
            assert not link.is_symlink(), f"{args} left the link"
        assert {p: p.read_bytes() for p in target.rglob("*") if p.is_file()} == precious
    if not bobs:  # `run` built a real env of its own in the link's place
        assert (link / "dbtvenv.json").is_file() and not link.is_symlink()


# --- secrets ---------------------------------------------------------------------------------

# Every character RFC 3986 allows in a userinfo, an escape, and `:` in the password.
ODD_PASSWORD = "pa'ss!$&()*+,;=%40~-._:x"


def test_a_password_with_any_userinfo_character_is_hidden_everywhere(
    dbtvenv: RunDbtvenv, tmp_path: Path, wheelhouse: Path
) -> None:
    cache = tmp_path / "cache"
    index = shlex.quote(f"https://ci-user:{ODD_PASSWORD}@127.0.0.1:9/simple")
    options = f"--extra-index-url {index} --no-index --find-links {wheelhouse}"
    spec = {"DBTVENV_REQUIREMENTS": "dbt-standin==1.0.0", "DBTVENV_PIP_INSTALL_OPTIONS": options}
    outputs = [
        dbtvenv("env", "prepare", "--venv-dir", cache, env=spec),
        dbtvenv("env", "info", "--venv-dir", cache, env=spec),
        dbtvenv("env", "info", "--json", "--venv-dir", cache, env=spec),
        dbtvenv("env", "list", "--json", "--venv-dir", cache, env=spec),
        dbtvenv("run", "--venv-dir", cache, "--requirements", "dbt-nope==9", env=spec),
    ]
    assert [r.returncode for r in outputs] == [0, 0, 0, 0, 69], outputs
    assert "https://***@127.0.0.1:9/simple" in outputs[1].out, outputs[1]
    for result in outputs:
        for secret in (ODD_PASSWORD, "pa'ss", "%40~"):
            assert secret not in result.out and secret not in result.err, result
    for path in cache.rglob("*"):
        if path.is_file() and not path.is_symlink():
            assert b"pa'ss" not in path.read_bytes(), path


def test_redaction_is_linear_in_the_length_of_its_input() -> None:
    """A 100,000-character requirement took 33 s to redact: a regular expression that
    backtracked. Compared by size rather than against a clock: ten times the input must cost
    about ten times as much (a quadratic redactor costs a hundred times)."""
    from dbtvenv.redact import redact_all

    def cost(size: int, unit: str) -> float:
        text = unit * (size // len(unit))
        best = float("inf")
        for _ in range(3):
            started = time.perf_counter()
            redact_all([text, f"--proxy {text}"])
            best = min(best, time.perf_counter() - started)
        return best

    for unit in ("a", "https://a", "a://", "x:y@", "--proxy a:b", "a" * 50 + "@"):
        small = cost(30_000, unit)
        assert small < 2.0, f"{unit!r}: {small:.2f} s for 30,000 characters"
        large = cost(300_000, unit)
        assert large < 30 * small + 0.05, f"{unit!r}: {small:.4f} s -> {large:.4f} s"


def test_env_path_of_a_huge_requirement_answers_at_once(dbtvenv: RunDbtvenv) -> None:
    huge = "dbt-x @ https://" + "a" * 100_000
    result = dbtvenv(
        "env", "path", "--venv-dir", "/nonexistent", "--requirements", huge, timeout=30
    )
    assert result.returncode == 0, result


def _cmdlines_with(token: bytes) -> list[str]:
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmdline = f.read()
        except OSError:
            continue
        if token in cmdline:
            found.append(cmdline.replace(b"\0", b" ").decode(errors="replace"))
    return found


@pytest.fixture
def simple_index(wheelhouse: Path, tmp_path: Path) -> Iterator[WheelServer]:
    """The stand-in wheel behind a package index: the served dir's listing of `dbt-standin/`
    is the project's page that pip and uv read."""
    project = tmp_path / "simple" / "dbt-standin"
    project.mkdir(parents=True)
    (project / STANDIN_WHEEL).write_bytes((wheelhouse / STANDIN_WHEEL).read_bytes())
    with WheelServer(project.parent) as server:
        yield server


# The spellings pip and uv take for an index besides the plain ones: pip's unique prefix of
# `--index-url`, uv's own `--default-index`, `--index NAME=URL`.
_INDEX_SPELLINGS = {"pip --index": "--index", "uv --default-index": "--default-index"}


@pytest.mark.parametrize(
    ("installer", "where"),
    [
        ("pip", "index"),
        ("pip", "requirement"),
        ("uv", "index"),
        ("pip", "pip --index"),
        ("uv", "uv --default-index"),
        ("uv", "uv --index NAME=URL"),
    ],
)
def test_a_token_never_reaches_a_command_line_other_users_can_read(
    dbtvenv_cmd: list[str],
    make_env: MakeEnv,
    tmp_path: Path,
    request: pytest.FixtureRequest,
    installer: str,
    where: str,
) -> None:
    """Any local user reads every process's /proc/PID/cmdline. A build whose index (or
    requirement) URL carries a token is held inside its download by the local wheel server,
    while every process's command line is scanned for the token, again and again."""
    token = f"tok-{os.urandom(8).hex()}"
    fixture = "wheels" if where in ("index", "requirement") else "simple_index"
    wheels: WheelServer = request.getfixturevalue(fixture)
    authed = wheels.url.replace("http://", f"http://ci:{token}@")
    requirement = "dbt-standin==1.0.0"
    if where == "index":
        options = f"--no-cache-dir --timeout 300 --no-index --find-links {authed}"
    elif where == "requirement":
        requirement = f"dbt-standin@{authed}{STANDIN_WHEEL}"  # no space: a variable splits there
        options = "--no-cache-dir --timeout 300 --no-index"
    elif where == "uv --index NAME=URL":
        options = f"--no-cache-dir --index private={authed} --default-index {wheels.url}"
    else:
        options = f"--no-cache-dir --timeout 300 {_INDEX_SPELLINGS[where]} {authed}"
    environ = make_env(
        {
            "DBTVENV_REQUIREMENTS": requirement,
            "DBTVENV_PIP_INSTALL_OPTIONS": options,
            "DBTVENV_INSTALLER": installer,
            "UV_CACHE_DIR": str(tmp_path / "uv-cache"),
        }
    )
    cache = tmp_path / "cache"
    wheels.hold()
    seen: list[str] = []
    build = Background(
        [*dbtvenv_cmd, "env", "prepare", "--venv-dir", str(cache)], environ, tmp_path, "build"
    )
    try:
        deadline = time.monotonic() + 120
        while wheels.gets() == 0:
            seen += _cmdlines_with(token.encode())
            assert build.proc.poll() is None, build.stderr()
            assert time.monotonic() < deadline, build.stderr()
            time.sleep(0.01)
        for _ in range(20):  # the installer waits for the held wheel meanwhile
            seen += _cmdlines_with(token.encode())
            time.sleep(0.02)
        private = list(cache.glob("*/.dbtvenv-private-requirements.txt"))
        modes = [stat.S_IMODE(p.stat().st_mode) for p in private]
        wheels.release()
        result = build.wait()
    finally:
        wheels.release()
        build.kill()
    assert result.returncode == 0, result
    assert seen == [], f"the token was on a command line: {seen}"
    assert modes == [0o600], "the token went to the installer in a private file"
    env_dir = Path(result.out.strip())
    assert not (env_dir / ".dbtvenv-private-requirements.txt").exists()
    assert (env_dir / "bin" / "dbt").exists()
    for path in env_dir.rglob("*"):
        if path.is_file() and path.suffix in (".json", ".txt", ".cfg"):
            assert token not in path.read_text(errors="replace"), path


def test_another_users_stale_lock_in_a_sticky_dir_is_named_not_replaced(
    users: PublicDbtvenv,
) -> None:
    """In root's 1777 dir bob leaves a lock naming a dead process: stale, but alice may not
    replace bob's file there. She says whose it is, and bob's file stays as it was."""
    cache = users.shared_dir("stale-lock", 0o1777)
    env_dir = env_path(users, ALICE, cache)
    lock = cache / f"{env_dir.name}.lock"
    holder = json.dumps(
        {"pid": dead_pid(), "create_time": 1.0, "hostname": socket.gethostname(),
         "acquired_at": "2026-11-24T15:00:00+00:00", "argv": ["dbtvenv", "run"]}
    )  # fmt: skip
    users.shell(BOB, f"printf '%s\\n' '{holder}' > {lock}")
    result = users.run(ALICE, "env", "prepare", "--venv-dir", cache, "--lock-timeout", "5")
    assert result.returncode == 73, result
    error = one_error(result)
    assert f"the lock {lock} is stale but belongs to uid {BOB}" in error, error
    assert lock.read_text() == holder + "\n" and lock.stat().st_uid == BOB
    assert not env_dir.exists()


def test_a_team_members_run_keeps_the_env_from_its_owners_gc(users: PublicDbtvenv) -> None:
    """alice runs dbt from carol's env (she trusts carol) and cannot write into it: her run
    still holds the env's use mark (shared, read-only), so carol's `env gc` keeps the env."""
    cache = users.shared_dir("team-in-use", 0o3775, uid=0, gid=SHARE)
    groups = (SHARE,)
    built = users.run(CAROL, "env", "prepare", "--venv-dir", cache, groups=groups)
    assert built.returncode == 0, built
    env_dir = Path(built.out.strip())
    pidfile = users.home(ALICE) / "dbt.pid"
    environ = users.environ(
        ALICE,
        {"DBTVENV_TRUSTED_OWNERS": str(CAROL), "STANDIN_SLEEP": "300",
         "STANDIN_PIDFILE": str(pidfile)},
    )  # fmt: skip
    run = subprocess.Popen(
        [*users.command(ALICE, groups), "run", "--venv-dir", str(cache)],
        env=environ,
        cwd=users.home(ALICE),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        wait_until(lambda: pidfile.exists() or run.poll() is not None, "dbt runs", timeout=120)
        assert run.poll() is None, run.communicate()
        kept = users.run(
            CAROL, "env", "gc", "--venv-dir", cache, "--older-than", "0s", groups=groups
        )
        assert kept.returncode == 0, kept
        assert "dbt is running in it" in kept.err and kept.out == "nothing to remove\n", kept
        assert (env_dir / "dbtvenv.json").is_file()
    finally:
        run.kill()
        run.communicate()
    gone = users.run(CAROL, "env", "gc", "--venv-dir", cache, "--older-than", "0s", groups=groups)
    assert gone.returncode == 0 and not env_dir.exists(), gone


# --- the temporary names of a lock and a manifest ---------------------------------------------


def test_a_link_planted_at_a_temporary_name_is_never_written_through(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The lock and the manifest are written to `.<name>.<pid>.<random>.tmp`, then renamed into
    place. Here the random part is made predictable and a link to a victim waits at exactly
    that name: the write fails (O_EXCL) rather than going through the link."""
    from dbtvenv import store
    from dbtvenv.lock import EnvLock

    victim = tmp_path / "victim.txt"
    victim.write_text(PRECIOUS)
    monkeypatch.setattr(os, "urandom", lambda n: bytes.fromhex("abcdef01")[:n])
    pid = os.getpid()
    cache = tmp_path / "cache"
    env_dir = cache / "0123456789abcdef"
    env_dir.mkdir(parents=True)
    links = [
        cache / f".0123456789abcdef.lock.{pid}.abcdef01.tmp",
        env_dir / f".dbtvenv.json.{pid}.abcdef01.tmp",
        env_dir / "dbtvenv.use",
    ]
    for link in links:
        link.symlink_to(victim)

    with pytest.raises(VenvDirError, match="cannot take the lock"):
        EnvLock(cache / "0123456789abcdef.lock", timeout=2, lease=60).acquire()
    with pytest.raises(FileExistsError):
        store.write_manifest(env_dir, {"format": 1})
    assert victim.read_text() == PRECIOUS
    assert not (env_dir / "dbtvenv.json").exists()
    assert not (cache / "0123456789abcdef.lock").exists()
    assert all(link.is_symlink() for link in links)
