"""Every kind of bad input: the contract's exit status, one clear error line, nothing left behind.

Each failure must leave stdout empty (it belongs to dbt), print exactly one `dbtvenv: error:`
line that says what to do (followed, for a pip failure, by pip's last lines), show no Python
traceback, and leave no temporary dir, no env marked complete and no lock behind.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shlex
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import MakeEnv, Result, RunDbtvenv

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="Linux file systems and users")

EX_USAGE = 64
EX_UNAVAILABLE = 69
EX_CANTCREAT = 73
EX_IOERR = 74
NOBODY = 65534


def assert_clean_failure(
    result: Result,
    status: int | tuple[int, ...],
    *,
    says: tuple[str, ...] = (),
    tmpdir: Path | None = None,
    cache: Path | None = None,
) -> str:
    """The checks every bad input must pass; returns the error line."""
    statuses = status if isinstance(status, tuple) else (status,)
    assert result.returncode in statuses, result
    assert result.stdout == b"", result
    assert "Traceback" not in result.err, result
    errors = [line for line in result.err.splitlines() if line.startswith("dbtvenv: error:")]
    assert len(errors) == 1, result
    error = errors[0]
    for words in says:
        assert words in error, result
    if tmpdir is not None:
        assert sorted(p.name for p in tmpdir.iterdir()) == [], f"left in TMPDIR\n{result}"
    if cache is not None:
        assert_no_lock_held(cache)
        assert_nothing_complete(cache)
    return error


def assert_no_lock_held(cache: Path) -> None:
    if not cache.exists():
        return
    for path in cache.iterdir():
        assert not path.name.endswith(".lock"), f"lock file left: {path}"
        assert not path.name.endswith(".tmp"), f"temporary file left: {path}"
        if path.name.endswith(".lock.guard"):
            with open(path, "rb") as f:  # flock fails at once if someone still holds it
                fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)


def assert_nothing_complete(cache: Path) -> None:
    if not cache.exists():
        return
    leftovers = [p.name for p in cache.iterdir() if p.is_dir() or (p / "dbtvenv.json").exists()]
    assert leftovers == [], f"envs left in {cache}: {leftovers}"
    assert not list(cache.glob(".*.trash")), "an env half removed"


@pytest.fixture
def tmpdir_env(tmp_path: Path) -> tuple[Path, dict[str, str]]:
    """A TMPDIR of the test's own, to see that nothing is left in it."""
    tmpdir = tmp_path / "t"
    tmpdir.mkdir()
    return tmpdir, {"TMPDIR": str(tmpdir)}


@pytest.fixture
def not_python(tmp_path: Path) -> Path:
    text = tmp_path / "not-python"
    text.write_text("this is not an interpreter\n")
    text.chmod(0o755)
    return text


# Usage errors (64): (id, arguments, extra environment, words the error line must contain).
# `{...}` in an argument is filled in by the test: cache, wh (offline pip options), missing
# (a path that does not exist), dir (an existing directory), not_python.
USAGE_ERRORS = [
    ("unknown-command", ["frobnicate", "--select", "x"], {}, ("frobnicate", "dbtvenv dbt")),
    ("unknown-docs-command", ["docs", "frob"], {}, ("dbtvenv dbt", "docs frob")),
    ("unknown-env-option", ["env", "prepare", "--frob"], {}, ("--frob", "--help")),
    ("missing-requirements", ["run", "--venv-dir", "{cache}"], {}, ("--requirements",)),
    (
        "missing-requirements-env-blank",
        ["run", "--venv-dir", "{cache}"],
        {"DBTVENV_REQUIREMENTS": "   "},
        ("DBTVENV_REQUIREMENTS",),
    ),
    (
        "malformed-requirement",
        ["run", "--requirements", "dbt standin==1.0.0"],
        {},
        ("malformed requirement", "'dbt standin==1.0.0'", "PEP 508"),
    ),
    (
        "empty-requirement",
        ["run", "--requirements", ""],
        {},
        ("malformed requirement", "PEP 508"),
    ),
    (
        "requirement-that-is-a-pip-option",
        ["run", "--requirements", "--index-url=https://evil.example/simple"],
        {},
        ("malformed requirement",),
    ),
    (
        "requirements-env-split-at-space",
        ["run"],
        {"DBTVENV_REQUIREMENTS": "dbt-standin>=1.0, <2"},
        ("'<2'", "split at whitespace", "'dbt-core>=1.8,<2'"),
    ),
    (
        "negative-lock-timeout",
        ["run", "--requirements", "dbt-standin", "--lock-timeout", "-1"],
        {},
        ("--lock-timeout", "'-1'", "number of seconds"),
    ),
    (
        "non-numeric-lock-timeout",
        ["run", "--requirements", "dbt-standin", "--lock-timeout=soon"],
        {},
        ("--lock-timeout", "'soon'", "number of seconds"),
    ),
    (
        "nan-lock-timeout",
        ["run", "--requirements", "dbt-standin", "--lock-timeout", "nan"],
        {},
        ("--lock-timeout", "number of seconds"),
    ),
    (
        "bad-DBTVENV_LOCK_TIMEOUT",
        ["run", "--requirements", "dbt-standin"],
        {"DBTVENV_LOCK_TIMEOUT": "2m"},
        ("DBTVENV_LOCK_TIMEOUT", "'2m'", "number of seconds"),
    ),
    (
        "bad-DBTVENV_KILL_GRACE",
        ["run", "--requirements", "dbt-standin"],
        {"DBTVENV_KILL_GRACE": "thirty"},
        ("DBTVENV_KILL_GRACE", "'thirty'", "unset it"),
    ),
    (
        "negative-DBTVENV_KILL_GRACE",
        ["run", "--requirements", "dbt-standin", "--venv-dir", "{cache}"],
        {"DBTVENV_KILL_GRACE": "-5"},
        ("DBTVENV_KILL_GRACE", "'-5'"),
    ),
    (
        "bad-DBTVENV_LOCK_LEASE",
        ["run", "--requirements", "dbt-standin", "--venv-dir", "{cache}"],
        {"DBTVENV_LOCK_LEASE": "forever"},
        ("DBTVENV_LOCK_LEASE", "'forever'"),
    ),
    (
        "zero-DBTVENV_LOCK_LEASE",
        ["lock", "status", "--requirements", "dbt-standin", "--venv-dir", "{cache}"],
        {"DBTVENV_LOCK_LEASE": "0"},
        ("DBTVENV_LOCK_LEASE", ">= 1"),
    ),
    (
        "unbalanced-quote-in-pip-options",
        ["run", "--requirements", "dbt-standin", "--pip-install-options", "--find-links 'x"],
        {},
        ("--pip-install-options", "No closing quotation", "quote it"),
    ),
    (
        "unbalanced-quote-in-DBTVENV_PIP_INSTALL_OPTIONS",
        ["run", "--requirements", "dbt-standin"],
        {"DBTVENV_PIP_INSTALL_OPTIONS": '--find-links "x'},
        ("No closing quotation",),
    ),
    (
        "missing-requirements-file",
        ["run", "--requirements-file", "{missing}"],
        {},
        ("requirements file", "does not exist"),
    ),
    (
        "requirements-file-is-a-directory",
        ["run", "--requirements-file", "{dir}"],
        {},
        ("requirements file", "is a directory"),
    ),
    (
        "missing-constraints-file",
        ["run", "--requirements", "dbt-standin", "--constraints", "{missing}"],
        {},
        ("constraints file", "does not exist"),
    ),
    (
        "missing-DBTVENV_CONSTRAINTS-file",
        ["run", "--requirements", "dbt-standin"],
        {"DBTVENV_CONSTRAINTS": "{missing}"},
        ("constraints file", "does not exist"),
    ),
    (
        "nonexistent-python-path",
        ["run", "--requirements", "dbt-standin", "--python", "{missing}"],
        {},
        ("--python", "no such file", "Python 3.8+"),
    ),
    (
        "nonexistent-python-name",
        ["run", "--requirements", "dbt-standin", "--python", "python-no-such-version"],
        {},
        ("--python", "not found on PATH"),
    ),
    (
        "python-is-/bin/true",
        ["run", "--requirements", "dbt-standin", "--python", "/bin/true"],
        {},
        ("--python", "does not run as a Python interpreter"),
    ),
    (
        "python-is-an-executable-text-file",
        ["run", "--requirements", "dbt-standin", "--python", "{not_python}"],
        {},
        ("--python", "does not run as a Python interpreter"),
    ),
    (
        "python-is-a-directory",
        ["run", "--requirements", "dbt-standin", "--python", "{dir}"],
        {},
        ("--python", "a directory"),
    ),
    (
        "bad-installer",
        ["run", "--requirements", "dbt-standin", "--installer", "conda"],
        {},
        ("--installer", "'conda'", "'pip', 'uv'"),
    ),
    (
        "bad-DBTVENV_INSTALLER",
        ["run", "--requirements", "dbt-standin"],
        {"DBTVENV_INSTALLER": "poetry"},
        ("DBTVENV_INSTALLER", "'poetry'"),
    ),
    (
        "bad-DBTVENV_TEMPORARY",
        ["run", "--requirements", "dbt-standin"],
        {"DBTVENV_TEMPORARY": "maybe"},
        ("DBTVENV_TEMPORARY", "'maybe'"),
    ),
    (
        "flag-given-a-value",
        ["run", "--requirements", "dbt-standin", "--temporary=yes"],
        {},
        ("--temporary", "does not take a value"),
    ),
    ("option-missing-its-value", ["run", "--venv-dir"], {}, ("--venv-dir", "requires")),
    ("env-path-without-venv-dir", ["env", "path", "--requirements", "x"], {}, ("--venv-dir",)),
    ("bad-gc-duration", ["env", "gc", "--older-than", "soon"], {}, ("'soon'", "30d")),
    # Every number has a documented range (README, "Numbers"); beyond it is a usage error, not
    # a timestamp overflow once a signal comes.
    (
        "DBTVENV_KILL_GRACE-beyond-its-range",
        ["run", "--requirements", "dbt-standin"],
        {"DBTVENV_KILL_GRACE": "1e10"},
        ("DBTVENV_KILL_GRACE", "'1e10'", "<= 3600"),
    ),
    (
        "DBTVENV_LOCK_LEASE-beyond-its-range",
        ["run", "--requirements", "dbt-standin", "--venv-dir", "{cache}"],
        {"DBTVENV_LOCK_LEASE": "1e10"},
        ("DBTVENV_LOCK_LEASE", "<= 3600"),
    ),
    (
        "lock-timeout-beyond-its-range",
        ["run", "--requirements", "dbt-standin", "--lock-timeout", "1e10"],
        {},
        ("--lock-timeout", "from 0 to 86400"),
    ),
    (
        "DBTVENV_LOCK_TIMEOUT-beyond-its-range",
        ["env", "rm", "--venv-dir", "{cache}", "--all"],
        {"DBTVENV_LOCK_TIMEOUT": "inf"},
        ("DBTVENV_LOCK_TIMEOUT", "from 0 to 86400"),
    ),
    (
        "gc-duration-beyond-its-range",
        ["env", "gc", "--older-than", "40000d"],
        {},
        ("'40000d'", "36500d"),
    ),
    # Input files: regular files or pipes, at most 1 MiB, never a device read until memory ends.
    (
        "requirements-file-is-/dev/zero",
        ["run", "--requirements-file", "/dev/zero"],
        {},
        ("'/dev/zero'", "not a regular file"),
    ),
    (
        "constraints-file-over-1-MiB",
        ["run", "--requirements", "dbt-standin", "--constraints", "{big}"],
        {},
        ("constraints file", "larger than 1 MiB"),
    ),
    (
        "completion-variable-without-the-scripts-variables",
        ["env", "list"],
        {"_DBTVENV_COMPLETE": "bash_complete"},
        ("_DBTVENV_COMPLETE", "COMP_WORDS", "dbtvenv completion"),
    ),
]


@pytest.mark.parametrize(
    ("args", "extra", "says"),
    [pytest.param(a, e, s, id=i) for i, a, e, s in USAGE_ERRORS],
)
def test_usage_error(
    dbtvenv: RunDbtvenv,
    tmp_path: Path,
    tmpdir_env: tuple[Path, dict[str, str]],
    not_python: Path,
    args: list[str],
    extra: dict[str, str],
    says: tuple[str, ...],
) -> None:
    cache = tmp_path / "cache"
    (tmp_path / "a-dir").mkdir()
    (tmp_path / "big.txt").write_bytes(b"# padding\n" * (1 << 17))
    fill = {
        "cache": str(cache),
        "missing": str(tmp_path / "no-such-file"),
        "dir": str(tmp_path / "a-dir"),
        "not_python": str(not_python),
        "big": str(tmp_path / "big.txt"),
    }
    tmpdir, env = tmpdir_env
    env = {**env, **{k: v.format(**fill) for k, v in extra.items()}}
    result = dbtvenv(*(a.format(**fill) for a in args), env=env, cwd=tmp_path)
    assert_clean_failure(result, EX_USAGE, says=says, tmpdir=tmpdir)
    assert not cache.exists(), "a usage error must not create the venv dir"


@pytest.mark.parametrize("persistent", [True, False], ids=["persistent", "temporary"])
def test_no_such_distribution_offline(
    dbtvenv: RunDbtvenv,
    tmp_path: Path,
    tmpdir_env: tuple[Path, dict[str, str]],
    pip_offline_options: str,
    persistent: bool,
) -> None:
    cache = tmp_path / "cache"
    tmpdir, env = tmpdir_env
    where = ["--venv-dir", str(cache)] if persistent else []
    result = dbtvenv(
        "run",
        "--requirements",
        "dbt-no-such-adapter==9.9.9",
        "--pip-install-options",
        pip_offline_options,
        *where,
        env=env,
        cwd=tmp_path,
    )
    error = assert_clean_failure(
        result,
        EX_UNAVAILABLE,
        says=("found no distribution for dbt-no-such-adapter==9.9.9", "check the requirement"),
        tmpdir=tmpdir,
        cache=cache,
    )
    # pip's own last lines follow the error line, indented
    after = result.err.split(error, 1)[1]
    assert "No matching distribution found for dbt-no-such-adapter==9.9.9" in after


def _sdist_that_downloads(wheelhouse: Path) -> None:
    """`dbt-core-experimental-parser` as the newest dbt-core pulls it in: an sdist whose build
    downloads a binary from outside the package registry (which fails behind a registry-only
    proxy, as here)."""
    import io
    import tarfile

    name = "dbt_core_experimental_parser-2.0.8"
    files = {
        "pyproject.toml": "[build-system]\nrequires = []\nbuild-backend = 'backend'\n"
        "backend-path = ['.']\n\n[project]\nname = 'dbt-core-experimental-parser'\n"
        "version = '2.0.8'\n",
        "backend.py": "def _fail(*args, **kwargs):\n"
        "    raise RuntimeError('failed to download https://github.invalid/parser.whl: "
        "<urlopen error [Errno -2] Name or service not known>')\n"
        "build_wheel = prepare_metadata_for_build_wheel = build_sdist = _fail\n",
        "PKG-INFO": "Metadata-Version: 2.1\nName: dbt-core-experimental-parser\nVersion: 2.0.8\n",
    }
    with tarfile.open(wheelhouse / f"{name}.tar.gz", "w:gz") as tar:
        for path, text in files.items():
            data = text.encode()
            info = tarfile.TarInfo(f"{name}/{path}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_dbt_core_that_downloads_from_outside_the_registry_is_explained(
    dbtvenv: RunDbtvenv, tmp_path: Path, tmpdir_env: tuple[Path, dict[str, str]]
) -> None:
    wheelhouse = tmp_path / "wheelhouse"
    wheelhouse.mkdir()
    _sdist_that_downloads(wheelhouse)
    tmpdir, env = tmpdir_env
    cache = tmp_path / "cache"
    result = dbtvenv(
        "run",
        "--requirements",
        "dbt-core-experimental-parser",
        "--pip-install-options",
        f"--no-index --find-links {wheelhouse}",
        "--venv-dir",
        cache,
        env=env,
        cwd=tmp_path,
    )
    # pip's last lines, which follow the error line, hold the build backend's own traceback:
    # that part is pip's to show; dbtvenv's part is the one line before it.
    ours, pips = result.err.split("dbtvenv: error: ", 1)
    error, _, pip_lines = pips.partition("\n")
    assert_clean_failure(
        Result(result.returncode, result.stdout, f"{ours}dbtvenv: error: {error}\n".encode()),
        EX_UNAVAILABLE,
        says=("outside the package registry", "dbt-core~=1.11.0"),
        tmpdir=tmpdir,
        cache=cache,
    )
    assert "failed to download" in pip_lines


def test_pip_option_pip_rejects(
    dbtvenv: RunDbtvenv,
    tmp_path: Path,
    tmpdir_env: tuple[Path, dict[str, str]],
    pip_offline_options: str,
) -> None:
    """A pip failure that is not a missing distribution: pip's own words follow."""
    cache = tmp_path / "cache"
    tmpdir, env = tmpdir_env
    result = dbtvenv(
        "run",
        "--requirements",
        "dbt-standin==1.0.0",
        "--pip-install-options",
        f"{pip_offline_options} --no-such-pip-option",
        "--venv-dir",
        cache,
        env=env,
        cwd=tmp_path,
    )
    error = assert_clean_failure(
        result, EX_UNAVAILABLE, says=("pip failed", "--pip-install-options"), tmpdir=tmpdir
    )
    assert "--no-such-pip-option" in result.err.split(error, 1)[1]
    assert_no_lock_held(cache)
    assert_nothing_complete(cache)


def test_requirements_without_dbt_keep_no_env(
    dbtvenv: RunDbtvenv,
    tmp_path: Path,
    tmpdir_env: tuple[Path, dict[str, str]],
    pip_offline_options: str,
) -> None:
    cache = tmp_path / "cache"
    tmpdir, env = tmpdir_env
    spec = ["--requirements", "no-dbt-here==1.0.0", "--pip-install-options", pip_offline_options]
    key_dir = Path(dbtvenv("env", "path", *spec, "--venv-dir", cache).out.strip())
    result = dbtvenv("run", *spec, "--venv-dir", cache, env=env, cwd=tmp_path)
    assert_clean_failure(
        result,
        EX_UNAVAILABLE,
        says=("no dbt executable", "--requirements"),
        tmpdir=tmpdir,
        cache=cache,
    )
    assert not key_dir.exists() and not key_dir.is_symlink()
    listed = dbtvenv("env", "list", "--venv-dir", cache, "--json")
    assert listed.returncode == 0, listed
    assert json.loads(listed.stdout) == []
    info = dbtvenv("env", "info", *spec, "--venv-dir", cache)
    assert info.returncode == 1, info


def test_requirements_without_dbt_temporary(
    dbtvenv: RunDbtvenv,
    tmp_path: Path,
    tmpdir_env: tuple[Path, dict[str, str]],
    pip_offline_options: str,
) -> None:
    tmpdir, env = tmpdir_env
    result = dbtvenv(
        "run",
        "--requirements",
        "no-dbt-here==1.0.0",
        "--pip-install-options",
        pip_offline_options,
        env=env,
        cwd=tmp_path,
    )
    assert_clean_failure(result, EX_UNAVAILABLE, says=("no dbt executable",), tmpdir=tmpdir)


@pytest.mark.parametrize(
    "command",
    [["run"], ["env", "prepare"], ["env", "info"], ["lock", "status"], ["env", "list"]],
    ids=" ".join,
)
def test_venv_dir_is_a_file(
    dbtvenv: RunDbtvenv,
    tmp_path: Path,
    tmpdir_env: tuple[Path, dict[str, str]],
    command: list[str],
) -> None:
    tmpdir, env = tmpdir_env
    a_file = tmp_path / "cache"
    a_file.write_text("not a dir\n")
    spec = [] if command == ["env", "list"] else ["--requirements", "dbt-standin"]
    result = dbtvenv(*command, *spec, "--venv-dir", a_file, env=env, cwd=tmp_path)
    assert_clean_failure(result, EX_CANTCREAT, says=(str(a_file), "not a directory"), tmpdir=tmpdir)
    assert a_file.read_text() == "not a dir\n"


def test_venv_dir_below_a_file(
    dbtvenv: RunDbtvenv, tmp_path: Path, tmpdir_env: tuple[Path, dict[str, str]]
) -> None:
    tmpdir, env = tmpdir_env
    (tmp_path / "a-file").write_text("")
    venv_dir = tmp_path / "a-file" / "cache"
    result = dbtvenv(
        "env", "prepare", "--requirements", "dbt-standin", "--venv-dir", venv_dir, env=env
    )
    assert_clean_failure(result, EX_CANTCREAT, says=(str(venv_dir), "cannot create"), tmpdir=tmpdir)


def _setpriv_prefix() -> list[str]:
    """Run as `nobody`, able to read and traverse everything (CAP_DAC_READ_SEARCH, so it can
    reach the test's files inside pytest's private temp dir and the project's interpreter)
    but to write only where `nobody` may."""
    if os.geteuid() != 0:
        pytest.skip("dropping privileges to another user needs root")
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip("setpriv (util-linux) is not installed")
    prefix = [
        setpriv,
        f"--reuid={NOBODY}",
        f"--regid={NOBODY}",
        "--clear-groups",
        "--inh-caps=+dac_read_search",
        "--ambient-caps=+dac_read_search",
    ]
    probe = subprocess.run(
        [*prefix, sys.executable, "-c", "import dbtvenv, os; print(os.geteuid())"],
        capture_output=True,
        timeout=60,
    )
    if probe.returncode != 0 or probe.stdout.strip() != str(NOBODY).encode():
        pytest.skip(f"cannot run this interpreter as uid {NOBODY}: {probe.stderr[-300:]!r}")
    return prefix


@pytest.mark.parametrize("where", ["venv-dir-itself", "tagged-venv-dir", "parent-of-venv-dir"])
def test_venv_dir_not_writable(
    tmp_path: Path,
    dbtvenv_cmd: list[str],
    make_env: MakeEnv,
    pip_offline_options: str,
    where: str,
) -> None:
    prefix = _setpriv_prefix()
    root_owned = tmp_path / "root-owned"
    root_owned.mkdir(mode=0o755)
    root_owned.chmod(0o755)
    cache = root_owned / "cache" if where == "parent-of-venv-dir" else root_owned
    if where == "tagged-venv-dir":  # a cache someone else set up: only the write probe tells
        (root_owned / "CACHEDIR.TAG").write_text("Signature: 8a477f597d28d172789f06886806bc55\n")
    tmpdir = tmp_path / "t"
    tmpdir.mkdir()
    os.chown(tmpdir, NOBODY, NOBODY)  # whatever dbtvenv would leave there, it could
    completed = subprocess.run(
        [
            *prefix,
            *dbtvenv_cmd,
            "run",
            "--requirements",
            "dbt-standin==1.0.0",
            "--pip-install-options",
            pip_offline_options,
            "--venv-dir",
            str(cache),
        ],
        env=make_env({"TMPDIR": str(tmpdir), "HOME": str(tmpdir)}),
        cwd=tmpdir,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        timeout=120,
    )
    result = Result(completed.returncode, completed.stdout, completed.stderr)
    says = ("not writable", "permissions") if cache == root_owned else ("cannot create",)
    assert_clean_failure(result, EX_CANTCREAT, says=(str(cache), *says), tmpdir=tmpdir)
    assert [p for p in os.listdir(root_owned) if p != "CACHEDIR.TAG"] == []


@contextlib.contextmanager
def small_tmpfs(path: Path, size: str, *, inodes: int | None = None) -> Iterator[Path]:
    """A tmpfs of `size` (and `inodes` files, its root included) at `path`: a file system
    that fills up for real."""
    path.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a small tmpfs to fill up needs root and mount(8)")
    limits = f"size={size},mode=0755" + (f",nr_inodes={inodes}" if inodes else "")
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", limits, "tmpfs", str(path)],
        capture_output=True,
        timeout=60,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True, timeout=60)


# 16k fills up while the venv is created, 64k while pip installs into it.
@pytest.mark.parametrize("size", ["16k", "64k"])
def test_disk_full_during_persistent_build(
    dbtvenv: RunDbtvenv,
    tmp_path: Path,
    tmpdir_env: tuple[Path, dict[str, str]],
    pip_offline_options: str,
    size: str,
) -> None:
    tmpdir, env = tmpdir_env
    with small_tmpfs(tmp_path / "small", size) as small:
        cache = small / "cache"
        result = dbtvenv(
            "run",
            "--requirements",
            "dbt-standin==1.0.0",
            "--pip-install-options",
            pip_offline_options,
            "--venv-dir",
            cache,
            env=env,
            cwd=tmp_path,
        )
        error = assert_clean_failure(
            result, (EX_UNAVAILABLE, EX_CANTCREAT), tmpdir=tmpdir, cache=cache
        )
        assert "disk space" in error or "No space left" in error, result
        assert str(cache) in error, result
        assert "retry" in error, result


@pytest.mark.parametrize(
    ("inodes", "status", "says"),
    [
        (None, (EX_UNAVAILABLE, EX_CANTCREAT), ()),
        (2, EX_CANTCREAT, ("cannot create a temporary env", "--venv-dir")),
    ],
    ids=["full-while-building", "no-room-for-the-env-dir"],
)
def test_disk_full_during_temporary_build(
    dbtvenv: RunDbtvenv,
    tmp_path: Path,
    pip_offline_options: str,
    inodes: int | None,
    status: int | tuple[int, ...],
    says: tuple[str, ...],
) -> None:
    """A TMPDIR that fills up while pip installs, or has room for the env's dir and no more."""
    with small_tmpfs(tmp_path / "small", "64k", inodes=inodes) as small:
        result = dbtvenv(
            "run",
            "--requirements",
            "dbt-standin==1.0.0",
            "--pip-install-options",
            pip_offline_options,
            env={"TMPDIR": str(small)},
            cwd=tmp_path,
        )
        error = assert_clean_failure(result, status, says=("TMPDIR", *says), tmpdir=small)
        assert "disk space" in error or "No space left" in error, result


def test_venv_dir_unreachable(
    tmp_path: Path, dbtvenv_cmd: list[str], make_env: MakeEnv, pip_offline_options: str
) -> None:
    """`nobody` without any capability cannot even pass through pytest's private temp dir."""
    prefix = [p for p in _setpriv_prefix() if "caps" not in p]
    cache = tmp_path / "cache"
    completed = subprocess.run(
        [
            *prefix,
            *dbtvenv_cmd,
            "env",
            "prepare",
            "--requirements",
            "dbt-standin==1.0.0",
            "--pip-install-options",
            pip_offline_options,
            "--venv-dir",
            str(cache),
        ],
        env=make_env({"TMPDIR": None, "HOME": "/"}),
        cwd="/",
        stdin=subprocess.DEVNULL,
        capture_output=True,
        timeout=120,
    )
    result = Result(completed.returncode, completed.stdout, completed.stderr)
    assert_clean_failure(result, EX_CANTCREAT, says=(str(cache), "cannot reach", "permissions"))
    assert not cache.exists()


def test_a_fifo_without_a_writer_never_hangs(dbtvenv: RunDbtvenv, tmp_path: Path) -> None:
    fifo = tmp_path / "requirements.txt"
    os.mkfifo(fifo)
    result = dbtvenv(
        "env", "path", "--requirements-file", fifo, "--venv-dir", tmp_path / "c", timeout=60
    )
    assert result.returncode == 0, result  # read as what it holds: nothing


@pytest.mark.parametrize("source", ["process-substitution", "relative-include"])
def test_the_installer_gets_a_private_copy_of_the_bytes_keyed(
    tmp_path: Path,
    make_env: MakeEnv,
    dbtvenv_cmd: list[str],
    pip_offline_options: str,
    source: str,
) -> None:
    """A pipe (`<(...)`) is read once and what pip installs from is a copy of those bytes; a
    file's relative `-r` still finds its neighbour."""
    cache = tmp_path / "cache"
    if source == "process-substitution":
        given = "<(printf 'dbt-standin==1.0.0\\n')"
    else:
        (tmp_path / "base.txt").write_text("dbt-standin==1.0.0\n")
        (tmp_path / "top.txt").write_text("-r base.txt\n")
        given = str(tmp_path / "top.txt")
    script = (
        f"exec {shlex.join(dbtvenv_cmd)} run --requirements-file {given} "
        f"--pip-install-options {shlex.quote(pip_offline_options)} --venv-dir {cache}"
    )
    completed = subprocess.run(
        ["bash", "-c", script],
        env=make_env(),
        cwd="/",
        stdin=subprocess.DEVNULL,
        capture_output=True,
        timeout=300,
    )
    result = Result(completed.returncode, completed.stdout, completed.stderr)
    assert result.returncode == 0, result
    (env_dir,) = [p for p in cache.iterdir() if p.is_dir() and p.name != ".trash"]
    manifest = json.loads((env_dir / "dbtvenv.json").read_text())
    (keyed,) = manifest["spec"]["requirements_files"]
    if source == "process-substitution":
        assert keyed["path"].startswith("/dev/fd/")
    assert not (env_dir / ".dbtvenv-build").exists()


def test_a_relative_path_in_a_removed_working_dir(
    tmp_path: Path, make_env: MakeEnv, dbtvenv_cmd: list[str]
) -> None:
    gone = tmp_path / "gone"
    gone.mkdir()
    in_removed_dir = ["sh", "-c", 'cd "$1" && rmdir "$1" && shift && exec "$@"', "sh", str(gone)]
    outcomes = {}
    for name, args in (
        ("venv-dir", ["env", "list", "--venv-dir", "cache"]),
        ("requirements-file", ["env", "path", "--requirements-file", "r.txt", "--venv-dir", "/c"]),
        ("shim", ["shim", "--requirements", "dbt-standin", "--venv-dir", "cache", "--print"]),
    ):
        completed = subprocess.run(
            [*in_removed_dir, *dbtvenv_cmd, *args],
            env=make_env(),
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=60,
        )
        outcomes[name] = Result(completed.returncode, completed.stdout, completed.stderr)
        gone.mkdir()
    assert_clean_failure(
        outcomes["venv-dir"], EX_CANTCREAT, says=("'cache'", "current directory no longer exists")
    )
    assert_clean_failure(
        outcomes["requirements-file"], EX_USAGE, says=("'r.txt'", "give an absolute path")
    )
    assert_clean_failure(outcomes["shim"], EX_USAGE, says=("'cache'", "give an absolute path"))


def test_an_unwritable_stdout_is_exit_74(
    tmp_path: Path, make_env: MakeEnv, dbtvenv_cmd: list[str]
) -> None:
    (tmp_path / "cache").mkdir()
    for args in (
        ["env", "list", "--venv-dir", str(tmp_path / "cache"), "--json"],
        ["env", "path", "--requirements", "dbt-standin", "--venv-dir", str(tmp_path / "c")],
        ["--help"],
        ["completion", "bash"],
    ):
        with open("/dev/full", "wb") as full:
            completed = subprocess.run(
                [*dbtvenv_cmd, *args],
                env=make_env(),
                stdin=subprocess.DEVNULL,
                stdout=full,
                stderr=subprocess.PIPE,
                timeout=60,
            )
        result = Result(completed.returncode, b"", completed.stderr)
        assert_clean_failure(result, EX_IOERR, says=("cannot write to stdout", "No space left"))


def test_a_full_disk_under_stderr_aborts_the_build(
    tmp_path: Path, make_env: MakeEnv, dbtvenv_cmd: list[str], pip_offline_options: str
) -> None:
    """dbtvenv's messages cannot be written: no build goes on unseen, nothing is kept."""
    cache = tmp_path / "cache"
    with open("/dev/full", "wb") as full:
        completed = subprocess.run(
            [
                *dbtvenv_cmd,
                "run",
                "--requirements",
                "dbt-standin==1.0.0",
                "--pip-install-options",
                pip_offline_options,
                "--venv-dir",
                str(cache),
            ],
            env=make_env(),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=full,
            timeout=120,
        )
    assert completed.returncode == EX_IOERR, completed
    assert completed.stdout == b""
    assert_no_lock_held(cache)
    assert_nothing_complete(cache)


# ---- a dir an env's scripts cannot start from -------------------------------------------
# pip and uv write bin/dbt with the env's Python in its first line: a `#!` line (a newline
# ends it, a tab splits it) or, for a long path or one with a space, a line of sh (quotes,
# `$`, a backtick, a backslash mean something there). Such an env was built "successfully"
# and its dbt then failed with 127.
_SCRIPT_BREAKERS = {
    "newline": ("\n", "a newline"),
    "tab": ("\t", "a tab"),
    "double-quote": ('"', "'\"'"),
    "single-quote": ("'", '"\'"'),
    "dollar": ("$", "'$'"),
    "backtick": ("`", "'`'"),
    "backslash": ("\\", "'\\\\'"),
    "semicolon": (";", "';'"),
    "colon": (":", "':'"),
}


@pytest.mark.parametrize("char", list(_SCRIPT_BREAKERS))
def test_a_venv_dir_whose_path_breaks_an_envs_scripts_is_refused(
    dbtvenv: RunDbtvenv, tmp_path: Path, standin_env: dict[str, str], char: str
) -> None:
    """Long enough that pip starts bin/dbt through a line of sh: unrefused, each of these
    built an env whose dbt did not start (2 or 127), or whose build failed."""
    character, named = _SCRIPT_BREAKERS[char]
    parent = tmp_path / ("x" * 100) / f"team{character}envs"
    cache = parent / "cache"
    for command in (["run"], ["env", "prepare"]):
        result = dbtvenv(*command, "--venv-dir", cache, env=standin_env)
        error = assert_clean_failure(
            result, EX_CANTCREAT, says=(f"contains {named}", "choose another --venv-dir")
        )
        assert f"venv dir {str(cache)!r} contains" in error
        assert not parent.exists()


def test_a_temp_dir_whose_path_breaks_an_envs_scripts_is_refused(
    dbtvenv: RunDbtvenv, tmp_path: Path, standin_env: dict[str, str]
) -> None:
    tmpdir = tmp_path / ("x" * 100) / 'tmp"dir'  # unrefused: a dbt that did not start
    tmpdir.mkdir(parents=True)
    result = dbtvenv("run", "--select", "x", env={**standin_env, "TMPDIR": str(tmpdir)})
    error = assert_clean_failure(result, EX_CANTCREAT, says=("contains '\"'",), tmpdir=tmpdir)
    assert error.startswith(f"dbtvenv: error: the temp dir (TMPDIR) {str(tmpdir)!r} contains")
    assert error.endswith("set TMPDIR to another dir, or keep envs in a cache dir (--venv-dir DIR)")
