"""A cache dir damaged by hand, by a crash or by a race: what dbtvenv made repairs itself
(moved aside and rebuilt), what is in the way of it is removed (never followed), and nothing
on disk ends in exit 70."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

from conftest import MakeEnv, Result, RunDbtvenv
from test_env_commands import env_list, prepare

EX_CANTCREAT = 73


def one_error_line(result: Result, status: int, *words: str) -> str:
    assert result.returncode == status, result
    assert "Traceback" not in result.err and "internal error" not in result.err, result
    errors = [line for line in result.err.splitlines() if line.startswith("dbtvenv: error:")]
    assert len(errors) == 1, result
    for word in words:
        assert word in errors[0], result
    return errors[0]


def test_a_file_where_the_env_belongs_is_removed_and_the_env_built(
    dbtvenv: RunDbtvenv, cache_dir: Path, standin_env: dict[str, str]
) -> None:
    spec = {**standin_env, "DBTVENV_VENV_DIR": str(cache_dir)}
    key_path = Path(dbtvenv("env", "path", env=spec).out.strip())
    cache_dir.mkdir()
    key_path.write_text("left over\n")
    for command in (["env", "info"], ["lock", "status"], ["env", "list", "--json"]):
        looked = dbtvenv(*command, env=spec)
        assert looked.returncode in (0, 1), looked
        assert "internal error" not in looked.err, looked
    result = dbtvenv("run", env=spec)
    assert result.returncode == 0, result
    assert f"building env {key_path.name}: a file is in its place" in result.err
    assert result.json()["prefix"] == str(key_path)


def test_a_manifest_with_fields_of_the_wrong_type_is_listed_and_shown(
    dbtvenv: RunDbtvenv, cache_dir: Path, standin_env: dict[str, str]
) -> None:
    env_dir = prepare(dbtvenv, cache_dir, standin_env, "dbt-standin==1.0.0")
    manifest = env_dir / "dbtvenv.json"
    data = json.loads(manifest.read_text())
    data.update(
        spec="oops",
        python=["3.11"],
        distributions={"dbt-core": "1.9"},
        repairs="protobuf<5",
        implied_pins={"dbt-core": "~=1.9.0"},
        created=1764000000,
        installer=7,
    )
    manifest.write_text(json.dumps(data))
    spec = {**standin_env, "DBTVENV_VENV_DIR": str(cache_dir)}

    (row,) = env_list(dbtvenv, cache_dir)
    assert row["key"] == env_dir.name and row["complete"] is True
    assert row["requirements"] == [] and row["python"] is None and row["installer"] is None
    table = dbtvenv("env", "list", "--venv-dir", cache_dir)
    assert table.returncode == 0 and env_dir.name in table.out, table
    for args in ([], ["--json"]):
        info = dbtvenv("env", "info", *args, env=spec)
        assert info.returncode == 0, info
        assert str(env_dir) in info.out
    ran = dbtvenv("run", env=spec)  # the env itself is whole: it is used as it is
    assert ran.returncode == 0, ran
    assert "building env" not in ran.err


# Removes envs under their locks while another process removes half-removed envs without
# any lock, as `env gc` does: every removal must succeed, and nothing is left.
RACE = textwrap.dedent(
    """
    import multiprocessing, sys
    from pathlib import Path
    from dbtvenv import gc, store

    def empty(root, stop):
        while not stop.is_set():
            gc._leftovers(root, dry_run=False)

    if __name__ == "__main__":
        root = Path(sys.argv[1])
        count = int(sys.argv[2])
        for i in range(count):
            (root / f"{i:016x}" / "bin").mkdir(parents=True)
            (root / f"{i:016x}" / "bin" / "dbt").write_text("x")
        stop = multiprocessing.Event()
        emptier = multiprocessing.Process(target=empty, args=(root, stop))
        emptier.start()
        failures = []
        for i in range(count):
            try:
                store.remove_env(root / f"{i:016x}")
            except Exception as exc:
                failures.append(f"{type(exc).__name__}: {exc}")
        stop.set()
        emptier.join()
        gc._leftovers(root, dry_run=False)
        left = sorted(p.name for p in root.iterdir())
        print(len(failures), failures[:3], left[:3], flush=True)
        sys.exit(1 if failures or left else 0)
    """
)


def test_removals_racing_gc_all_succeed(tmp_path: Path, make_env: MakeEnv) -> None:
    root = tmp_path / "cache"
    root.mkdir()
    raced = subprocess.run(
        [sys.executable, "-c", RACE, str(root), "1500"],
        env=make_env(),
        capture_output=True,
        timeout=300,
    )
    assert raced.returncode == 0, (raced.stdout.decode(), raced.stderr.decode()[-2000:])
