"""What of the install options may go on the installer's command line (which every local user
can read in /proc/PID/cmdline) and what goes to its private requirements file instead, for
every spelling of an index option that pip and uv take."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import RunDbtvenv

from dbtvenv.credentials import split
from dbtvenv.errors import UsageError

SECRET = "https://alice:s3cr3tTOKEN@127.0.0.1:9/simple"
PLAIN = "https://127.0.0.1:9/plain"


def _private(options: str, installer: str = "pip") -> list[str]:
    args = split(options.split(), ["dbt-standin"], installer=installer)
    assert "s3cr3tTOKEN" not in " ".join([*args.options, *args.requirements]), args
    return args.private_lines


@pytest.mark.parametrize(
    ("options", "line"),
    [
        (f"--index-url {SECRET}", f"--index-url {SECRET}"),
        (f"--index-url={SECRET}", f"--index-url {SECRET}"),
        (f"-i {SECRET}", f"--index-url {SECRET}"),
        (f"-i{SECRET}", f"--index-url {SECRET}"),
        # optparse takes a unique prefix of a long option for it
        (f"--index {SECRET}", f"--index-url {SECRET}"),
        (f"--index={SECRET}", f"--index-url {SECRET}"),
        (f"--ind {SECRET}", f"--index-url {SECRET}"),
        (f"--extra-index {SECRET}", f"--extra-index-url {SECRET}"),
        (f"--extra={SECRET}", f"--extra-index-url {SECRET}"),
        (f"--find {SECRET}", f"--find-links {SECRET}"),
        (f"--fi={SECRET}", f"--find-links {SECRET}"),
        (f"-f{SECRET}", f"--find-links {SECRET}"),
    ],
)
def test_every_spelling_pip_takes_for_an_index_goes_to_the_private_file(
    options: str, line: str
) -> None:
    assert _private(options) == [line]


@pytest.mark.parametrize(
    ("options", "line"),
    [
        (f"--default-index {SECRET}", f"--index-url {SECRET}"),
        (f"--default-index={SECRET}", f"--index-url {SECRET}"),
        (f"--index {SECRET}", f"--extra-index-url {SECRET}"),
        (f"--index private={SECRET}", f"--extra-index-url {SECRET}"),
        (f"--index=private={SECRET}", f"--extra-index-url {SECRET}"),
        (f"--extra-index-url {SECRET}", f"--extra-index-url {SECRET}"),
        (f"-i{SECRET}", f"--index-url {SECRET}"),
    ],
)
def test_uvs_own_index_options_go_to_the_private_file_as_uv_reads_them_there(
    options: str, line: str
) -> None:
    assert _private(options, "uv") == [line]


def test_the_other_index_options_go_with_the_one_that_has_a_credential() -> None:
    lines = _private(f"--no-cache-dir --extra {PLAIN} --no-ind --index {SECRET} --find ./w")
    assert lines[:3] == ["--no-index", f"--index-url {SECRET}", f"--extra-index-url {PLAIN}"]
    assert lines[3].startswith("--find-links /") and lines[3].endswith("/w")
    args = split(["--no-cache-dir", "--index", SECRET], [], installer="pip")
    assert args.options == ["--no-cache-dir"]


def test_without_a_credential_the_command_line_is_what_the_user_wrote() -> None:
    options = ["--index", PLAIN, "--pre", "--no-cache-dir"]
    args = split(options, ["dbt-standin"], installer="pip")
    assert (args.options, args.private_lines) == (options, [])


def test_an_abbreviated_proxy_with_a_credential_goes_through_the_environment() -> None:
    args = split(["--prox", "bob:pw@proxy:3128"], [], installer="pip")
    assert args.options == [] and args.environ == {"PIP_PROXY": "bob:pw@proxy:3128"}


@pytest.mark.parametrize(
    ("installer", "options", "shown"),
    [
        ("pip", ["-r", SECRET + "/reqs.txt"], "https://***@127.0.0.1:9/simple/reqs.txt"),
        # `--e` is ambiguous to pip (--editable, --exists-action, --extra-index-url)
        ("pip", [f"--e={SECRET}"], "--e=https://***@127.0.0.1:9/simple"),
        ("uv", ["--extra-index", SECRET], "https://***@127.0.0.1:9/simple"),  # no prefixes
        ("uv", [f"--index-strategy={SECRET}"], "--index-strategy=https://***@127.0.0.1:9/simple"),
    ],
)
def test_a_credential_that_would_stay_on_the_command_line_is_refused(
    installer: str, options: list[str], shown: str
) -> None:
    with pytest.raises(UsageError) as refused:
        split(options, ["dbt-standin"], installer=installer)
    message = refused.value.message
    assert "s3cr3tTOKEN" not in message
    assert f"{shown!r} carries a credential that {installer} could only get" in message


def test_dbtvenv_refuses_it_before_it_builds_anything(dbtvenv: RunDbtvenv, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    result = dbtvenv(
        "env", "prepare", "--venv-dir", cache, "--requirements", "dbt-standin==1.0.0",
        env={"DBTVENV_PIP_INSTALL_OPTIONS": f"--no-index -r {SECRET}/reqs.txt"},
    )  # fmt: skip
    assert result.returncode == 64, result
    assert "s3cr3tTOKEN" not in result.err and result.stdout == b""
    (error,) = [line for line in result.err.splitlines() if line.startswith("dbtvenv: error:")]
    assert "'https://***@127.0.0.1:9/simple/reqs.txt' carries a credential" in error
    assert not cache.exists()
