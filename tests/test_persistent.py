"""Persistent mode: one env per distinct spec under the venv dir, reused without a rebuild,
rebuilt when incomplete or broken (saying why), never touched by another spec."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from conftest import MakeEnv, Result, RunDbtvenv, prepare_standin_env

CACHEDIR_SIGNATURE = "Signature: 8a477f597d28d172789f06886806bc55"


@dataclass(frozen=True)
class Snapshot:
    """What must not change in an env another spec's run has no business with (its use mark,
    `dbtvenv.use`, records each run in it)."""

    manifest: bytes
    manifest_mtime_ns: int
    listing: tuple[str, ...]

    @classmethod
    def of(cls, env_dir: Path) -> Snapshot:
        manifest = env_dir / "dbtvenv.json"
        return cls(
            manifest=manifest.read_bytes(),
            manifest_mtime_ns=manifest.stat().st_mtime_ns,
            listing=tuple(
                sorted(
                    str(p.relative_to(env_dir))
                    for p in env_dir.rglob("*")
                    if "__pycache__" not in p.parts and p.name != "dbtvenv.use"
                )
            ),
        )


@pytest.fixture(scope="module")
def base(
    tmp_path_factory: pytest.TempPathFactory, wheelhouse: Path, _dbtvenv_pythonpath: str | None
) -> Path:
    """An env for dbt-standin==1.0.0, built once for this module; its path."""
    cache = tmp_path_factory.mktemp("persistent") / "cache"
    env_dir = prepare_standin_env(cache, wheelhouse, _dbtvenv_pythonpath)
    assert env_dir.parent == cache
    return env_dir


def built(result: Result) -> bool:
    return "building env" in result.err


def prefix(result: Result) -> Path:
    assert result.returncode == 0, result
    return Path(result.json()["prefix"])


def test_reuse_without_rebuild(dbtvenv: RunDbtvenv, base: Path, pip_offline_options: str) -> None:
    before = Snapshot.of(base)
    for _ in range(2):
        started = time.monotonic()
        result = dbtvenv(
            "run",
            "--requirements",
            "dbt-standin==1.0.0",
            "--pip-install-options",
            pip_offline_options,
            "--venv-dir",
            base.parent,
            "--select",
            "x",
        )
        elapsed = time.monotonic() - started
        assert prefix(result) == base
        assert result.json()["argv"] == ["run", "--select", "x"]
        assert not built(result), result
        assert "dbtvenv:" not in result.err, result  # a warm run says nothing at all
        assert elapsed < 30  # no pip: generous, the point is "not a build"
    assert Snapshot.of(base) == before
    assert not (base.parent / f"{base.name}.lock").exists()


def test_env_path_builds_nothing(
    dbtvenv: RunDbtvenv, base: Path, tmp_path: Path, pip_offline_options: str
) -> None:
    spec = ["--requirements", "dbt-standin==1.0.0", "--pip-install-options", pip_offline_options]
    existing = dbtvenv("env", "path", *spec, "--venv-dir", base.parent)
    assert existing.returncode == 0 and existing.err == "", existing
    assert existing.out == f"{base}\n"
    fresh = tmp_path / "cache"
    result = dbtvenv("env", "path", *spec, "--venv-dir", fresh)
    assert result.returncode == 0 and result.err == "", result
    assert result.out == f"{fresh / base.name}\n"  # same spec, same key
    assert not fresh.exists()
    other = dbtvenv("env", "path", "--requirements", "dbt-standin==2.0.0", "--venv-dir", fresh)
    assert Path(other.out.strip()).parent == fresh and other.out != result.out
    assert not fresh.exists()


def test_manifest_and_cachedir_tag(
    dbtvenv: RunDbtvenv, base: Path, pip_offline_options: str
) -> None:
    manifest = json.loads((base / "dbtvenv.json").read_text())
    assert manifest["spec"]["requirements"] == ["dbt-standin==1.0.0"]
    assert manifest["spec"]["pip_install_options"][0] == "--no-index"
    assert manifest["spec"]["system_site_packages"] is False
    python = manifest["python"]
    assert python["version"] == ".".join(map(str, sys.version_info[:3]))
    assert python["implementation"] == sys.implementation.name
    assert os.access(python["executable"], os.X_OK)
    names = {d["name"].lower().replace("_", "-"): d["version"] for d in manifest["distributions"]}
    assert names["dbt-standin"] == "1.0.0"
    created = datetime.fromisoformat(manifest["created"])
    assert abs(datetime.now(timezone.utc) - created) < timedelta(hours=1)
    info = dbtvenv(
        "env",
        "info",
        "--requirements",
        "dbt-standin==1.0.0",
        "--pip-install-options",
        pip_offline_options,
        "--venv-dir",
        base.parent,
        "--json",
    )
    assert info.returncode == 0, info
    shown = json.loads(info.stdout)
    assert shown["distributions"] == manifest["distributions"]
    assert shown["created"] == manifest["created"]
    tag = (base.parent / "CACHEDIR.TAG").read_text()
    assert tag.startswith(CACHEDIR_SIGNATURE + "\n")
    assert (base.parent.stat().st_mode & 0o777) == 0o700


def _requirements_file(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "requirements.txt"
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    "change", ["version", "requirements-file-bytes", "pip-options", "system-site-packages"]
)
def test_changed_spec_gets_a_new_env_and_leaves_the_old_one_alone(
    dbtvenv: RunDbtvenv, base: Path, tmp_path: Path, pip_offline_options: str, change: str
) -> None:
    cache = base.parent
    pip = ["--pip-install-options", pip_offline_options]
    old_env = base
    if change == "requirements-file-bytes":
        req = _requirements_file(tmp_path, "dbt-standin==1.0.0\n")
        first = dbtvenv("run", "--requirements-file", req, *pip, "--venv-dir", cache)
        old_env = prefix(first)
        assert old_env != base  # a file with the same requirement is still another spec
        req.write_text("dbt-standin==2.0.0\n")
        new_args = ["--requirements-file", str(req), *pip]
    elif change == "version":
        new_args = ["--requirements", "dbt-standin==2.0.0", *pip]
    elif change == "pip-options":
        new_args = [
            "--requirements",
            "dbt-standin==1.0.0",
            "--pip-install-options",
            f"{pip_offline_options} --no-deps",
        ]
    else:
        new_args = ["--requirements", "dbt-standin==1.0.0", *pip, "--system-site-packages"]
    before = Snapshot.of(old_env)
    result = dbtvenv("run", *new_args, "--venv-dir", cache)
    new_env = prefix(result)
    assert built(result) and "no env for this spec yet" in result.err, result
    assert new_env.parent == cache and new_env not in (base, old_env)
    expected_version = "2.0.0" if change in ("version", "requirements-file-bytes") else "1.0.0"
    assert result.json()["version"] == expected_version
    assert Snapshot.of(old_env) == before
    if change == "system-site-packages":
        cfg = (new_env / "pyvenv.cfg").read_text()
        assert "include-system-site-packages = true" in cfg
    # and the old spec still finds its env, unbuilt
    if change != "requirements-file-bytes":
        again = dbtvenv("run", "--requirements", "dbt-standin==1.0.0", *pip, "--venv-dir", cache)
        assert prefix(again) == base and not built(again), again


def test_equal_specs_spelled_differently_share_one_env(
    dbtvenv: RunDbtvenv, base: Path, pip_offline_options: str, tmp_path: Path
) -> None:
    pip = ["--pip-install-options", pip_offline_options]
    for spelling in ("DBT-Standin==1.0.0", "dbt_standin==1.0.0", "dbt.standin == 1.0.0"):
        result = dbtvenv("run", "--requirements", spelling, *pip, "--venv-dir", base.parent)
        assert prefix(result) == base and not built(result), result
    cache = tmp_path / "cache"
    one = dbtvenv(
        "run",
        "--requirements",
        "dbt-standin==1.0.0",
        "--requirements",
        "no-dbt-here",
        *pip,
        "--venv-dir",
        cache,
    )
    assert built(one), one
    other = dbtvenv(
        "run",
        "--venv-dir",
        cache,
        env={
            "DBTVENV_REQUIREMENTS": "No_Dbt_Here  DBT_standin==1.0.0",
            "DBTVENV_PIP_INSTALL_OPTIONS": pip_offline_options,
        },
    )
    assert prefix(other) == prefix(one) and not built(other), other


@pytest.mark.parametrize(
    ("breakage", "reason"),
    [
        ("manifest-deleted", "the last build was interrupted"),
        ("dbt-deleted", "its dbt executable is gone"),
        ("python-dangling", "its interpreter is gone"),
        # What a power loss leaves of files that were never synced, and other damage that
        # makes dbt unable to start: caught before dbt runs, and rebuilt.
        ("dbt-empty", "its dbt executable is empty"),
        ("dbt-cut-short", "its dbt executable was cut short or changed since the build"),
        ("dbt-bad-shebang", "its dbt executable was cut short or changed since the build"),
        ("dbt-interpreter-gone-old-manifest", "the interpreter of its dbt executable is gone"),
        ("manifest-a-directory", "its manifest is not a file"),
        ("manifest-not-an-object", "its manifest is damaged"),
    ],
)
def test_incomplete_or_broken_env_is_rebuilt(
    dbtvenv: RunDbtvenv, tmp_path: Path, standin_env: dict[str, str], breakage: str, reason: str
) -> None:
    cache = tmp_path / "cache"
    env = {**standin_env, "DBTVENV_VENV_DIR": str(cache)}
    first = dbtvenv("env", "prepare", env=env)
    assert first.returncode == 0, first
    env_dir = Path(first.out.strip())
    manifest = env_dir / "dbtvenv.json"
    dbt = env_dir / "bin" / "dbt"
    script = dbt.read_bytes()
    if breakage == "manifest-deleted":
        manifest.unlink()
    elif breakage == "dbt-deleted":
        dbt.unlink()
    elif breakage == "dbt-empty":
        dbt.write_bytes(b"")
    elif breakage == "dbt-cut-short":
        dbt.write_bytes(script[: len(script) // 2])
    elif breakage == "dbt-bad-shebang":
        dbt.write_bytes(b"#!/no/such/python\n" + script.split(b"\n", 1)[1])
    elif breakage == "dbt-interpreter-gone-old-manifest":  # no record of the script to compare
        data = json.loads(manifest.read_text())
        del data["dbt_executable"]
        manifest.write_text(json.dumps(data))
        dbt.write_bytes(b"#!/no/such/python\n" + script.split(b"\n", 1)[1])
    elif breakage == "manifest-a-directory":
        manifest.unlink()
        manifest.mkdir()
    elif breakage == "manifest-not-an-object":
        manifest.write_text('"oops"\n')
    else:
        python = env_dir / "bin" / "python"
        python.unlink()
        python.symlink_to(tmp_path / "no-such-python")
    result = dbtvenv("run", "--select", "x", env=env)
    assert prefix(result) == env_dir
    assert f"building env {env_dir.name}: {reason}" in result.err, result
    assert (env_dir / "dbtvenv.json").is_file()
    assert (env_dir / "bin" / "python").resolve().exists()
    again = dbtvenv("run", env=env)
    assert prefix(again) == env_dir and not built(again), again
    assert not (cache / f"{env_dir.name}.lock").exists()
    assert not list(cache.glob(".*.trash"))  # the broken one is gone


@pytest.mark.parametrize("installer", ["pip", "uv"])
@pytest.mark.parametrize("length", ["short", "long"])
def test_a_venv_dir_with_spaces_gives_an_env_whose_dbt_runs(
    dbtvenv: RunDbtvenv,
    tmp_path: Path,
    standin_env: dict[str, str],
    installer: str,
    length: str,
) -> None:
    """A space in the env's Python path: pip and uv start bin/dbt through a line of sh that
    quotes it; so do they for a path longer than a `#!` line may be."""
    cache = tmp_path / "team envs" / ("x" * 120 if length == "long" else "dbt cache")
    environ = {
        **standin_env,
        "DBTVENV_INSTALLER": installer,
        "UV_CACHE_DIR": str(tmp_path / "uv-cache"),
    }
    result = dbtvenv("run", "--venv-dir", cache, "--select", "x", env=environ)
    assert prefix(result).parent == cache and built(result), result
    assert prefix(dbtvenv("run", "--venv-dir", cache, "--select", "y", env=environ)).parent == cache


# ---- credentials in --pip-install-options ---------------------------------------------------

TOKEN_A = "tok-AAAA-1111-secret"
TOKEN_B = "tok-BBBB-2222-secret"


def _pip_with_token(wheelhouse: Path, token: str, log: Path) -> str:
    # pip never contacts the index (--no-index); `--log` is a FIFO that holds pip, and with it
    # the env's lock, until the test has looked at the lock file.
    return (
        f"--extra-index-url https://ci-user:{token}@127.0.0.1:9/simple "
        f"--no-index --find-links {wheelhouse} --log {log}"
    )


def _wait_for(path: Path, proc: subprocess.Popen[bytes], timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, f"dbtvenv ended before {path} appeared"
        assert time.monotonic() < deadline, f"{path} did not appear"
        time.sleep(0.02)


def test_rotated_token_reuses_the_env_and_no_token_is_ever_written(
    dbtvenv: RunDbtvenv,
    dbtvenv_cmd: list[str],
    make_env: MakeEnv,
    tmp_path: Path,
    wheelhouse: Path,
) -> None:
    cache = tmp_path / "cache"
    fifo = tmp_path / "pip.log"
    os.mkfifo(fifo)
    pip_a = _pip_with_token(wheelhouse, TOKEN_A, fifo)
    pip_b = _pip_with_token(wheelhouse, TOKEN_B, fifo)
    spec_a = ["--requirements", "dbt-standin==1.0.0", "--pip-install-options", pip_a]
    spec_b = ["--requirements", "dbt-standin==1.0.0", "--pip-install-options", pip_b]
    key = Path(dbtvenv("env", "path", *spec_a, "--venv-dir", cache).out.strip()).name
    assert Path(dbtvenv("env", "path", *spec_b, "--venv-dir", cache).out.strip()).name == key

    proc = subprocess.Popen(
        [*dbtvenv_cmd, "run", *spec_a, "--venv-dir", str(cache), "--select", "x"],
        env=make_env(),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    drained: list[bytes] = []
    reader = threading.Thread(target=lambda: drained.append(fifo.read_bytes()), daemon=True)
    try:
        lock = cache / f"{key}.lock"
        _wait_for(lock, proc)
        written = {"lock file": lock.read_text()}  # pip cannot go on: the lock is held
        assert "***@127.0.0.1" in written["lock file"]
        status = dbtvenv("lock", "status", *spec_b, "--venv-dir", cache)
        assert status.returncode == 0 and "held" in status.out, status
        written["lock status"] = status.out + status.err
        reader.start()  # let pip go on
        out, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        reader.join(timeout=60)
    first = Result(proc.returncode, out, err)
    assert prefix(first) == cache / key and built(first), first
    assert drained, "pip never wrote its log"

    rotated = dbtvenv("run", *spec_b, "--venv-dir", cache, "--select", "x")
    assert prefix(rotated) == cache / key and not built(rotated), rotated

    written["first run stderr"] = first.err
    written["rotated run stderr"] = rotated.err
    for args in (["env", "info"], ["env", "info", "--json"]):
        shown = dbtvenv(*args, *spec_b, "--venv-dir", cache)
        assert shown.returncode == 0, shown
        written[" ".join(args)] = shown.out + shown.err
    for args in (["env", "list"], ["env", "list", "--json"]):
        shown = dbtvenv(*args, "--venv-dir", cache)
        assert shown.returncode == 0, shown
        written[" ".join(args)] = shown.out + shown.err
    assert "***@127.0.0.1" in written["env info --json"]
    for path in cache.rglob("*"):  # the manifest, and anything else dbtvenv put there
        if path.is_file() and not path.is_symlink():
            written[str(path)] = path.read_bytes().decode("utf-8", "replace")
    for where, text in written.items():
        for token in (TOKEN_A, TOKEN_B):
            assert token not in text, f"{token} written in {where}"


def test_env_dir_replaced_by_something_else_is_rebuilt(
    dbtvenv: RunDbtvenv, tmp_path: Path, standin_env: dict[str, str]
) -> None:
    """Half a tree with no manifest, as a build killed mid-way leaves it."""
    cache = tmp_path / "cache"
    env = {**standin_env, "DBTVENV_VENV_DIR": str(cache)}
    key_dir = Path(dbtvenv("env", "path", env=env).out.strip())
    (key_dir / "bin").mkdir(parents=True)
    (key_dir / "bin" / "python").write_text("half written")
    result = dbtvenv("run", env=env)
    assert prefix(result) == key_dir
    assert "the last build was interrupted" in result.err, result


def test_another_interpreter_builds_its_own_env(
    dbtvenv: RunDbtvenv, base: Path, pip_offline_options: str
) -> None:
    from test_spec import other_pythons

    mine = sys.version_info[:2]
    for other in other_pythons():
        version = subprocess.run(
            [other, "-c", "import sys; print('%d.%d.%d' % sys.version_info[:3])"],
            capture_output=True,
            text=True,
            timeout=60,
        ).stdout.strip()
        minor = tuple(map(int, version.split(".")[:2]))
        if minor != mine and minor >= (3, 9):
            break
    else:
        pytest.skip(f"no Python 3.9+ of another minor version than {mine} found")
    result = dbtvenv(
        "run",
        "--requirements",
        "dbt-standin==1.0.0",
        "--pip-install-options",
        pip_offline_options,
        "--python",
        other,
        "--venv-dir",
        base.parent,
    )
    env_dir = prefix(result)
    assert env_dir != base and env_dir.parent == base.parent
    assert built(result) and f"Python {version}" in result.err, result
    manifest = json.loads((env_dir / "dbtvenv.json").read_text())
    assert manifest["python"]["version"] == version
    ran = subprocess.run(
        [
            str(env_dir / "bin" / "python"),
            "-c",
            "import platform; print(platform.python_version())",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert ran.stdout.strip() == version


def test_interpreter_our_pip_does_not_support_gets_its_own_pip(
    dbtvenv: RunDbtvenv, base: Path, pip_offline_options: str
) -> None:
    """dbtvenv's own pip fills envs of the Pythons it supports; an older one (that dbt still
    supports) gets a pip of its own from ensurepip."""
    from importlib.metadata import metadata

    from packaging.specifiers import SpecifierSet
    from test_spec import other_pythons

    ours = SpecifierSet(metadata("pip")["Requires-Python"] or ">=0")
    for other in other_pythons():
        version = subprocess.run(
            [other, "-c", "import sys; print('%d.%d.%d' % sys.version_info[:3])"],
            capture_output=True,
            text=True,
            timeout=60,
        ).stdout.strip()
        if version not in ours and tuple(map(int, version.split(".")[:2])) >= (3, 9):
            break
    else:
        pytest.skip(f"no Python 3.9+ that this pip ({ours}) does not support is installed")
    result = dbtvenv(
        "run",
        "--requirements",
        "dbt-standin==1.0.0",
        "--pip-install-options",
        pip_offline_options,
        "--python",
        other,
        "--venv-dir",
        base.parent,
    )
    env_dir = prefix(result)
    manifest = json.loads((env_dir / "dbtvenv.json").read_text())
    assert manifest["python"]["version"] == version
    names = {d["name"].lower() for d in manifest["distributions"]}
    assert "pip" in names and "dbt-standin" in {n.replace("_", "-") for n in names}


def test_pip_settings_cannot_send_the_env_elsewhere(
    dbtvenv: RunDbtvenv, tmp_path: Path, standin_env: dict[str, str]
) -> None:
    """Airflow's images set PIP_USER; a pip config may say `user = true` or name a target.
    None of it may put dbt outside the env (least of all into Airflow's own user site)."""
    config = tmp_path / "pip.conf"
    config.write_text("[install]\nuser = true\n")
    elsewhere = {name: tmp_path / name.lower() for name in ("PIP_TARGET", "PIP_PREFIX", "PIP_ROOT")}
    env = {
        **standin_env,
        "DBTVENV_VENV_DIR": str(tmp_path / "cache"),
        "PIP_USER": "1",
        "PIP_CONFIG_FILE": str(config),
        "HOME": str(tmp_path / "home"),
        **{name: str(path) for name, path in elsewhere.items()},
    }
    result = dbtvenv("run", "--", "report", env=env)
    assert result.returncode == 0, result
    assert prefix(result).parent == tmp_path / "cache"
    assert not any(path.exists() for path in elsewhere.values())
    assert not (tmp_path / "home" / ".local").exists()  # the user site pip would have used


@pytest.fixture
def read_only_view(base: Path, tmp_path: Path) -> Iterator[Path]:
    """The module's cache dir, bind-mounted read-only, as envs baked into an image are often
    mounted (a Kubernetes volume, an image layer owned by another user)."""
    if os.geteuid() != 0 or not shutil.which("mount"):
        pytest.skip("a read-only bind mount needs root and mount(8)")
    view = tmp_path / "read-only"
    view.mkdir()
    mounted = subprocess.run(
        ["mount", "--bind", "-o", "ro", str(base.parent), str(view)],
        capture_output=True,
        timeout=60,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot bind-mount here: {mounted.stderr.decode().strip()}")
    try:
        probe = view / "probe"
        with pytest.raises(OSError):
            probe.touch()
        yield view
    finally:
        subprocess.run(["umount", "-l", str(view)], capture_output=True, timeout=60)


def test_a_read_only_cache_is_used_as_it_is(
    dbtvenv: RunDbtvenv, base: Path, read_only_view: Path, pip_offline_options: str
) -> None:
    result = dbtvenv(
        "run",
        "--requirements",
        "dbt-standin==1.0.0",
        "--pip-install-options",
        pip_offline_options,
        "--venv-dir",
        read_only_view,
        "--",
        "report",
    )
    assert result.returncode == 0, result
    # (Its scripts still name the interpreter where the env was built: venvs do not move.)
    assert result.json()["env"]["VIRTUAL_ENV"] == str(read_only_view / base.name)
    assert not built(result) and result.err == "", result
    listed = dbtvenv("env", "list", "--venv-dir", read_only_view, "--json")
    assert listed.returncode == 0, listed
    rows = {row["key"]: row for row in json.loads(listed.stdout)}  # other tests' envs too
    assert rows[base.name]["complete"] is True
