"""Shell completion: the committed scripts match the CLI, and completion works in a real bash
and through Click's protocol (the environment variable the scripts set)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO_ROOT, MakeEnv, RunDbtvenv

SHELLS = ("bash", "zsh", "fish")
ENV_COMMANDS = ["prepare", "path", "info", "list", "rm", "stop-warm", "gc"]


@pytest.mark.parametrize("shell", SHELLS)
def test_committed_script_is_what_the_cli_prints(dbtvenv: RunDbtvenv, shell: str) -> None:
    result = dbtvenv("completion", shell)
    assert result.returncode == 0, result
    committed = REPO_ROOT / "completions" / f"dbtvenv.{shell}"
    assert committed.read_text() == result.out, (
        f"{committed.name} is out of date: run 'make completions' and commit the result"
    )
    assert "_DBTVENV_COMPLETE" in result.out and result.stderr == b""


def test_unknown_shell_is_a_usage_error(dbtvenv: RunDbtvenv) -> None:
    result = dbtvenv("completion", "tcsh")
    assert result.returncode == 64, result
    assert result.err.startswith("dbtvenv: error: ")


@pytest.fixture
def dbtvenv_on_path(tmp_path: Path, make_env: MakeEnv) -> dict[str, str]:
    """An environment whose PATH starts with a dir holding the `dbtvenv` console script
    (the one installed next to this interpreter, or a stand-in that runs `-m dbtvenv`)."""
    installed = Path(sys.executable).parent / "dbtvenv"
    if installed.is_file() and os.access(installed, os.X_OK):
        bin_dir = installed.parent
    else:
        bin_dir = tmp_path / "bin"
        bin_dir.mkdir()
        script = bin_dir / "dbtvenv"
        script.write_text(f'#!/bin/sh\nexec {sys.executable} -m dbtvenv "$@"\n')
        script.chmod(0o755)
    env = make_env()
    env["PATH"] = f"{bin_dir}{os.pathsep}{env.get('PATH', '')}"
    return env


def bash_complete(env: dict[str, str], *words: str) -> list[str]:
    """Complete the last of `words` in a real bash, through the script `dbtvenv completion
    bash` prints and the function it registers with `complete`."""
    script = r"""
        source <(dbtvenv completion bash) || exit 90
        spec=$(complete -p dbtvenv) || exit 91
        function=${spec##*-F }; function=${function%% *}
        COMP_WORDS=("$@"); COMP_CWORD=$(( $# - 1 ))
        COMP_LINE="$*"; COMP_POINT=${#COMP_LINE}
        "$function" dbtvenv "${COMP_WORDS[COMP_CWORD]}" "${COMP_WORDS[COMP_CWORD-1]}"
        printf '%s\n' "${COMPREPLY[@]}"
    """
    bash = shutil.which("bash")
    assert bash is not None
    done = subprocess.run(
        [bash, "--norc", "--noprofile", "-c", script, "bash", *words],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done
    return [line for line in done.stdout.splitlines() if line]


def test_bash_completes_commands_subcommands_options_and_keys(
    dbtvenv_on_path: dict[str, str], tmp_path: Path
) -> None:
    env = dbtvenv_on_path
    assert bash_complete(env, "dbtvenv", "en") == ["env"]
    assert bash_complete(env, "dbtvenv", "env", "") == ENV_COMMANDS
    assert bash_complete(env, "dbtvenv", "run", "--ven") == ["--venv-dir"]
    assert bash_complete(env, "dbtvenv", "run", "--installer", "") == ["pip", "uv"]
    assert bash_complete(env, "dbtvenv", "completion", "") == list(SHELLS)
    assert "run-operation" in bash_complete(env, "dbtvenv", "run")
    assert bash_complete(env, "dbtvenv", "docs", "") == ["generate", "serve"]

    cache = tmp_path / "cache"
    for key in ("3f2a9c1e5b7d4a60", "3f00000000000000", "9999999999999999"):
        (cache / key).mkdir(parents=True)
    keys = bash_complete(env, "dbtvenv", "env", "rm", "--venv-dir", str(cache), "3f")
    assert sorted(keys) == ["3f00000000000000", "3f2a9c1e5b7d4a60"]


def click_complete(env: dict[str, str], shell: str, words: str, cword: int | str) -> str:
    """Ask `dbtvenv` itself through Click's completion protocol, as the scripts do.

    `cword` is the index of the word to complete, except for fish: the word itself."""
    protocol = {
        "_DBTVENV_COMPLETE": f"{shell}_complete",
        "COMP_WORDS": words,
        "COMP_CWORD": str(cword),
    }
    done = subprocess.run(
        ["dbtvenv"], env={**env, **protocol}, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done
    return done.stdout


def test_click_protocol_for_each_shell(dbtvenv_on_path: dict[str, str]) -> None:
    env = dbtvenv_on_path
    bash = click_complete(env, "bash", "dbtvenv env ", 2)
    assert bash.splitlines() == [f"plain,{name}" for name in ENV_COMMANDS]
    assert click_complete(env, "bash", "dbtvenv run --ven", 2).splitlines() == ["plain,--venv-dir"]
    assert click_complete(env, "bash", "dbtvenv run --venv-dir ", 3).splitlines() == ["dir,"]
    assert click_complete(env, "bash", "dbtvenv run --requirements-file ", 3) == "file,\n"

    zsh = click_complete(env, "zsh", "dbtvenv env ", 2).splitlines()
    assert zsh[0::3] == ["plain"] * len(ENV_COMMANDS)
    assert zsh[1::3] == ENV_COMMANDS
    assert zsh[2] == "Build or verify the env; print its path."

    fish = click_complete(env, "fish", "dbtvenv env ", "").splitlines()
    assert [line.split(",", 1)[1].split("\t")[0] for line in fish] == ENV_COMMANDS
