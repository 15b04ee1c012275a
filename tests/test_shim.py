"""`dbtvenv shim`: the executable it writes is the env's dbt (a real stand-in dbt behind it)
for any arguments, streams, signals and exit status, with the spec it was written with."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path

import pytest
from conftest import MakeEnv, RunDbtvenv, prepare_standin_env
from procs import assert_no_survivors, kill_quietly, wait_for_pidfile
from standin import expected_output

from dbtvenv import options, shim
from dbtvenv.options import ENV_OPTIONS, FLAG, MULTIPLE, parse_dbt_invocation

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="the shim is a POSIX sh script")

# Everything a shell would make something of, in one list of words.
AWKWARD = [
    "with space",
    "it's",
    'say "hi"',
    "$HOME",
    "${PATH}",
    "`id`",
    "$(id)",
    "back\\slash",
    "new\nline",
    "tab\there",
    "naïve ☃",
    "",
    "*",
    "--help",
    "--venv-dir",
    "--",
    "-",
    "!",
    ";exit 9",
    "'",
]


@pytest.fixture(scope="module")
def standin_cache(
    tmp_path_factory: pytest.TempPathFactory, wheelhouse: Path, _dbtvenv_pythonpath: str | None
) -> Path:
    cache = tmp_path_factory.mktemp("shim-cache")
    prepare_standin_env(cache, wheelhouse, _dbtvenv_pythonpath)
    return cache


@pytest.fixture
def spec_args(standin_cache: Path, pip_offline_options: str) -> list[str]:
    """The ENV OPTIONS of the stand-in's prepared env."""
    return [
        "--venv-dir",
        str(standin_cache),
        "--requirements",
        "dbt-standin==1.0.0",
        "--pip-install-options",
        pip_offline_options,
    ]


@pytest.fixture
def written(dbtvenv: RunDbtvenv, spec_args: list[str], tmp_path: Path) -> Path:
    path = tmp_path / "bin" / "dbt-isolated"
    path.parent.mkdir()
    result = dbtvenv("shim", *spec_args, "--output", path)
    assert result.returncode == 0, str(result)
    return path


def run_shim(
    path: Path,
    *args: str,
    make_env: MakeEnv,
    env: Mapping[str, str | None] | None = None,
    input: bytes | None = None,
    cwd: Path | None = None,
) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [str(path), *args],
        env=make_env(env),
        input=input,
        stdin=None if input is not None else subprocess.DEVNULL,
        capture_output=True,
        timeout=120,
        cwd=cwd,
    )


def test_arguments_reach_dbt_verbatim(written: Path, make_env: MakeEnv, tmp_path: Path) -> None:
    done = run_shim(written, "run", *AWKWARD, make_env=make_env, cwd=tmp_path)

    assert done.returncode == 0, done.stderr.decode()
    report = json.loads(done.stdout)
    assert report["argv"] == ["run", *AWKWARD]
    assert report["cwd"] == str(tmp_path)
    assert report["version"] == "1.0.0"


def test_the_shim_execs_dbtvenv_and_dbtvenv_runs_the_envs_dbt(
    written: Path, make_env: MakeEnv, standin_cache: Path
) -> None:
    """No shell stays between the caller and dbtvenv: dbt's parent is the shim's own pid."""
    proc = subprocess.Popen(
        [str(written), "run"],
        env=make_env(),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    out, err = proc.communicate(timeout=120)
    report = json.loads(out)
    assert proc.returncode == 0, err.decode()
    assert report["ppid"] == proc.pid
    env_dir = Path(report["env"]["VIRTUAL_ENV"])
    assert env_dir.parent == standin_cache
    assert report["executable"].startswith(str(env_dir))


def test_streams_pass_through(written: Path, make_env: MakeEnv) -> None:
    size = 3 * 1024 * 1024 + 17
    stdin = b"select 1;\n" * 1000
    done = run_shim(
        written,
        "show",
        make_env=make_env,
        env={"STANDIN_READ_STDIN": "1", "STANDIN_STDOUT_BYTES": str(size)},
        input=stdin,
    )
    assert done.returncode == 0, done.stderr.decode()
    assert done.stdout == expected_output(size)

    done = run_shim(
        written, "run", make_env=make_env, env={"STANDIN_STDERR_BYTES": "100000"}, input=b""
    )
    assert done.returncode == 0
    assert done.stdout == b""
    assert done.stderr == expected_output(100000)

    done = run_shim(written, "run", make_env=make_env, env={"STANDIN_READ_STDIN": "1"}, input=stdin)
    assert json.loads(done.stdout)["stdin"] == stdin.decode()


@pytest.mark.parametrize(
    ("env", "status"),
    [
        ({"STANDIN_EXIT": "0"}, 0),
        ({"STANDIN_EXIT": "1"}, 1),
        ({"STANDIN_EXIT": "2"}, 2),
        ({"STANDIN_EXIT": "42"}, 42),
        ({"STANDIN_KILL_SELF": "SIGTERM"}, 128 + signal.SIGTERM),
        ({"STANDIN_KILL_SELF": "SIGKILL"}, 128 + signal.SIGKILL),
    ],
)
def test_exit_status_is_dbts(
    written: Path, make_env: MakeEnv, env: dict[str, str], status: int
) -> None:
    assert run_shim(written, "run", make_env=make_env, env=env).returncode == status


@pytest.fixture
def started() -> Iterator[list[subprocess.Popen[bytes]]]:
    procs: list[subprocess.Popen[bytes]] = []
    yield procs
    kill_quietly([p.pid for p in procs if p.poll() is None])


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_to_the_shims_group_reaches_dbt_once(
    written: Path,
    make_env: MakeEnv,
    tmp_path: Path,
    started: list[subprocess.Popen[bytes]],
    signum: int,
) -> None:
    """As Cosmos stops a task: the shim runs in a session of its own (`setsid`), and the
    signal goes to that whole process group."""
    pidfile, signals = tmp_path / "dbt.pid", tmp_path / "signals"
    proc = subprocess.Popen(
        [str(written), "run"],
        env=make_env(
            {
                "STANDIN_PIDFILE": str(pidfile),
                "STANDIN_SIGNALS_FILE": str(signals),
                "STANDIN_SLEEP": "60",
            }
        ),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    started.append(proc)
    dbt_pid = wait_for_pidfile(pidfile, timeout=60)

    os.killpg(proc.pid, signum)
    _, err = proc.communicate(timeout=60)

    assert proc.returncode == 128 + signum, err.decode()
    assert signals.read_text().splitlines() == [signal.Signals(signum).name]
    assert_no_survivors([dbt_pid])


def test_spec_is_fixed_and_paths_are_absolute(
    dbtvenv: RunDbtvenv, make_env: MakeEnv, tmp_path: Path, pip_offline_options: str
) -> None:
    """Awkward paths, given relative, written from one dir and run from another; the
    environment's DBTVENV_* cannot change the env (even the options the shim does not name),
    while the variables of how a run gets there still apply."""
    place = tmp_path / "it's a $dir `x`\nnaïve"
    place.mkdir()
    (place / "reqs file.txt").write_text("dbt-standin==1.0.0\n")
    (place / "constraints 'c'.txt").write_text("dbt-standin<2\n")
    output = place / "dbt shim"
    result = dbtvenv(
        "shim",
        "--venv-dir",
        # No quote, $, backtick or newline: an env's own scripts cannot start from such a dir,
        # so dbtvenv refuses it as a venv dir (the files' paths above carry them instead).
        "../cache dir ☃",
        "--requirements-file",
        "reqs file.txt",
        "--constraints",
        "constraints 'c'.txt",
        "--output",
        "dbt shim",
        env={"DBTVENV_PIP_INSTALL_OPTIONS": pip_offline_options},  # fixed by the shim too
        cwd=place,
    )
    assert result.returncode == 0, str(result)
    text = output.read_text()
    cache = tmp_path / "cache dir ☃"
    assert "'--venv-dir=" + str(cache) + "'" in text
    assert "'--requirements-file=" + str(place / "reqs file.txt").replace("'", "'\\''") in text

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    done = run_shim(
        output,
        "run",
        make_env=make_env,
        env={
            "DBTVENV_REQUIREMENTS": "dbt-standin==2.0.0",  # not named by the shim: ignored too
            "DBTVENV_SYSTEM_SITE_PACKAGES": "1",
            "DBTVENV_VENV_DIR": str(tmp_path / "other-cache"),
            "DBTVENV_PIP_INSTALL_OPTIONS": "--index-url http://127.0.0.1:9/nothing",
            "DBTVENV_LOCK_TIMEOUT": "77",  # not named by the shim: still read
        },
        cwd=elsewhere,
    )
    assert done.returncode == 0, done.stderr.decode()
    report = json.loads(done.stdout)
    assert report["version"] == "1.0.0"
    assert Path(report["env"]["VIRTUAL_ENV"]).parent == cache
    env_dir = Path(report["env"]["VIRTUAL_ENV"])
    assert "include-system-site-packages = false" in (env_dir / "pyvenv.cfg").read_text()
    assert [p.name for p in env_dir.parent.iterdir() if p.is_dir()] == [env_dir.name]
    assert not (tmp_path / "other-cache").exists()
    assert sorted(p.name for p in elsewhere.iterdir()) == []

    bad = run_shim(
        output, "run", make_env=make_env, env={"DBTVENV_LOCK_TIMEOUT": "soon"}, cwd=elsewhere
    )
    assert bad.returncode == 64  # the variable of an option it does not name is read
    assert b"DBTVENV_LOCK_TIMEOUT" in bad.stderr


def test_every_env_option_is_written_so_that_dbtvenv_reads_it_back(tmp_path: Path) -> None:
    """Generic over the option table: a new option passes through the shim unchanged."""
    values: dict[str, object] = {}
    for option in ENV_OPTIONS:
        if option.kind == FLAG:
            values[option.dest] = True
        elif option.kind == MULTIPLE:
            values[option.dest] = (f"/abs/{option.dest} 1", f"/abs/{option.dest} '$2'")
        elif option.kind == options.SECONDS:
            values[option.dest] = 12.5
        elif option.kind == options.CHOICE:
            values[option.dest] = option.choices[-1]
        else:
            values[option.dest] = f"/abs/--{option.dest} `x`\n"
    argv = shim.shim_options(values, set(values))
    parsed = parse_dbt_invocation(["dbt", *argv, "--", "run"], {})
    assert parsed is not None
    assert parsed == (values, ["run"])


def test_options_left_out_are_read_from_the_environment_where_it_runs() -> None:
    argv = shim.shim_options(
        {"requirements": ("a",), "temporary": False, "lock_timeout": 120.0}, {"requirements"}
    )
    assert argv == ["--requirements=a"]


def test_relative_python_is_made_absolute_but_a_bare_name_stays(tmp_path: Path) -> None:
    os.chdir(tmp_path)
    assert shim.shim_options({"python": "python3.11"}, {"python"}) == ["--python=python3.11"]
    assert shim.shim_options({"python": "bin/python"}, {"python"}) == [
        f"--python={tmp_path / 'bin' / 'python'}"
    ]


def test_dbtvenv_from_path_when_the_recorded_one_is_gone(
    tmp_path: Path, spec_args: list[str], make_env: MakeEnv
) -> None:
    argv = [f"{flag}={value}" for flag, value in zip(spec_args[::2], spec_args[1::2])]
    output = tmp_path / "dbt"
    shim.write_executable(output, shim.render(argv, str(tmp_path / "gone" / "dbtvenv")), 0o755)

    missing = run_shim(output, "run", make_env=make_env, env={"PATH": "/usr/bin:/bin"})
    assert missing.returncode == 127
    assert missing.stderr.decode().startswith("dbtvenv: error: dbtvenv is not installed here")

    on_path = tmp_path / "path"
    on_path.mkdir()
    real = Path(sys.executable).parent / "dbtvenv"
    (on_path / "dbtvenv").symlink_to(real)
    found = run_shim(output, "run", make_env=make_env, env={"PATH": f"{on_path}:/usr/bin:/bin"})
    assert found.returncode == 0, found.stderr.decode()
    assert b'"version": "1.0.0"' in found.stdout


def test_written_atomically_with_the_mode_less_the_umask(
    dbtvenv: RunDbtvenv, spec_args: list[str], tmp_path: Path
) -> None:
    output = tmp_path / "dbt"
    target = tmp_path / "target"
    target.write_text("precious\n")
    output.symlink_to(target)  # replaced, never written through

    result = dbtvenv("shim", *spec_args, "--output", output)
    assert result.returncode == 0, str(result)
    assert not output.is_symlink()
    assert target.read_text() == "precious\n"
    assert stat.S_IMODE(output.stat().st_mode) == 0o755 & ~_current_umask()
    assert output.read_text().startswith("#!/bin/sh\n")
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []

    private = subprocess.run(
        [
            "sh",
            "-c",
            'umask 077 && exec "$@"',
            "sh",
            *_dbtvenv_argv(),
            "shim",
            *spec_args,
            "--output",
            str(tmp_path / "private"),
        ],
        capture_output=True,
        timeout=60,
        env={k: v for k, v in os.environ.items() if not k.startswith("DBTVENV_")},
    )
    assert private.returncode == 0, private.stderr.decode()
    assert stat.S_IMODE((tmp_path / "private").stat().st_mode) == 0o700


def test_a_credential_keeps_the_shim_private_and_print_hides_it(
    dbtvenv: RunDbtvenv, tmp_path: Path
) -> None:
    secret = "--index-url https://user:s3cret@pypi.example.com/simple"
    args = ["--venv-dir", tmp_path / "c", "--requirements", "dbt-duckdb", "--pip-install-options"]
    result = dbtvenv("shim", *args, secret, "--output", tmp_path / "dbt", "--print")

    assert result.returncode == 0, str(result)
    assert stat.S_IMODE((tmp_path / "dbt").stat().st_mode) == 0o700 & ~_current_umask()
    assert "s3cret" in (tmp_path / "dbt").read_text()  # pip needs it
    assert "s3cret" not in result.out + result.err
    assert "https://***@pypi.example.com/simple" in result.out


@pytest.mark.parametrize(
    ("args", "status", "says"),
    [
        (["--requirements", "dbt-duckdb"], 64, "--output PATH"),
        (["--requirements", "dbt duckdb ==", "--print"], 64, "malformed requirement"),
        (["--print"], 64, "no requirements given"),
        (["--requirements", "dbt-duckdb", "--output", "{dir}"], 64, "is a directory"),
        (["--requirements", "dbt-duckdb", "--output", "{dir}/no/dbt"], 73, "does not exist"),
        (["--requirements", "dbt-duckdb", "--output", "{dir}/dbtvenv"], 64, "find itself"),
        (["--requirements-file", "{dir}/missing.txt", "--print"], 64, "does not exist"),
    ],
)
def test_bad_input_writes_nothing(
    dbtvenv: RunDbtvenv, tmp_path: Path, args: list[str], status: int, says: str
) -> None:
    before = sorted(tmp_path.iterdir())
    result = dbtvenv("shim", *(a.format(dir=tmp_path) for a in args))

    assert result.returncode == status, str(result)
    assert result.err.startswith("dbtvenv: error:"), str(result)
    assert says in result.err
    assert result.out == ""
    assert sorted(tmp_path.iterdir()) == before


def _current_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _dbtvenv_argv() -> list[str]:
    return [str(Path(sys.executable).parent / "dbtvenv")]


def test_the_shim_unsets_exactly_the_variables_that_name_the_env() -> None:
    unset = [line for line in shim.render([], None).splitlines() if line.startswith("unset ")]
    assert len(unset) == 1
    names = set(unset[0].split()[1:])
    assert names == {o.envvar for o in ENV_OPTIONS if o.names_env}
    assert {"DBTVENV_REQUIREMENTS", "DBTVENV_VENV_DIR", "DBTVENV_PIP_INSTALL_OPTIONS"} <= names
    assert not names & {"DBTVENV_LOCK_TIMEOUT", "DBTVENV_INSTALLER", "DBTVENV_WARM"}
