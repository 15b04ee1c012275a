"""The env spec and its key: equal specs share one key, anything that changes what gets installed
changes it, and credentials never enter it or anything shown."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import pytest

from dbtvenv.errors import UsageError
from dbtvenv.redact import redact, redact_all
from dbtvenv.spec import (
    EnvSpec,
    Interpreter,
    find_interpreter,
    normalise_requirement,
    resolve_spec,
    split_pip_options,
)

TOKEN = "s3cr3t-T0KEN"


def spec(
    requirements: Sequence[str] = ("dbt-standin==1.0.0",),
    *,
    files: Sequence[str | os.PathLike[str]] = (),
    constraints: Sequence[str | os.PathLike[str]] = (),
    pip: str | None = None,
    python: str | None = None,
    system_site_packages: bool = False,
) -> EnvSpec:
    return resolve_spec(
        requirements=requirements,
        requirements_files=[os.fspath(f) for f in files],
        constraints_files=[os.fspath(c) for c in constraints],
        pip_install_options=pip,
        python=python,
        system_site_packages=system_site_packages,
    )


@pytest.mark.parametrize(
    ("spellings", "normal"),
    [
        (
            ["DBT-Standin==1.0.0", "dbt_standin==1.0.0", "dbt.standin == 1.0.0"],
            "dbt-standin==1.0.0",
        ),
        (["dbt-core>=1.8,<2", "dbt-core <2, >=1.8", "DBT_Core>=1.8 , <2"], "dbt-core<2,>=1.8"),
        (["dbt-duckdb[MD,Aws]~=1.9.0", "dbt_duckdb[aws,md] ~= 1.9.0"], "dbt-duckdb[aws,md]~=1.9.0"),
        (["dbt-postgres"], "dbt-postgres"),
    ],
)
def test_equal_requirements_spelled_differently(spellings: list[str], normal: str) -> None:
    assert {normalise_requirement(s) for s in spellings} == {normal}


def test_urls_and_markers_pass_through_packaging() -> None:
    url = normalise_requirement("My_Adapter @ https://example.com/my_adapter-1.0-py3-none-any.whl")
    assert url == "my-adapter @ https://example.com/my_adapter-1.0-py3-none-any.whl"
    marker = normalise_requirement('dbt-core>=1.8; python_version >= "3.9"')
    assert marker == 'dbt-core>=1.8 ; python_version >= "3.9"'


@pytest.mark.parametrize(
    "bad", ["", "dbt standin", "dbt-core>>1", "-e .", "--index-url=https://x", "dbt-core==1.8 junk"]
)
def test_malformed_requirement(bad: str) -> None:
    with pytest.raises(UsageError, match="malformed requirement"):
        normalise_requirement(bad)


def test_malformed_requirement_hides_credentials() -> None:
    with pytest.raises(UsageError) as caught:
        normalise_requirement(f"pkg @ https://user:{TOKEN}@host/x.whl junk")
    assert TOKEN not in caught.value.message
    assert "***@host" in caught.value.message


def test_no_requirements_is_a_usage_error() -> None:
    with pytest.raises(UsageError, match="--requirements"):
        spec([])


def test_key_ignores_spelling_order_and_duplicates() -> None:
    a = spec(["DBT-Standin==1.0.0", "no_dbt_here"])
    b = spec(["no-dbt-here", "dbt_standin==1.0.0", "no-dbt-here"])
    assert a.key == b.key
    assert len(a.key) == 16 and int(a.key, 16) >= 0


def test_key_changes_with_what_gets_installed(tmp_path: Path) -> None:
    req = tmp_path / "requirements.txt"
    req.write_text("dbt-standin==1.0.0\n")
    con = tmp_path / "constraints.txt"
    con.write_text("dbt-standin<3\n")
    base = spec()
    keys = {
        "base": base.key,
        "version": spec(["dbt-standin==2.0.0"]).key,
        "extra requirement": spec(["dbt-standin==1.0.0", "no-dbt-here"]).key,
        "requirements file": spec(files=[req]).key,
        "constraints": spec(constraints=[con]).key,
        "pip options": spec(pip="--no-deps").key,
        "system site packages": spec(system_site_packages=True).key,
    }
    assert len(set(keys.values())) == len(keys), keys
    # the bytes of a file count, not its path
    before = spec(files=[req]).key
    req.write_text("dbt-standin==1.0.0\n# pinned for the nightly run\n")
    assert spec(files=[req]).key != before
    copy = tmp_path / "elsewhere" / "reqs.txt"
    copy.parent.mkdir()
    copy.write_bytes(req.read_bytes())
    assert spec(files=[copy]).key == spec(files=[req]).key
    con2 = tmp_path / "constraints2.txt"
    con2.write_text("dbt-standin<2\n")
    assert spec(constraints=[con2]).key != spec(constraints=[con]).key


def test_key_of_a_fixed_spec_never_changes_by_accident() -> None:
    """Every user's cache is keyed by this: a change must be deliberate (bump KEY_FORMAT)."""
    fixed = EnvSpec(
        requirements=("dbt-duckdb~=1.9.0",),
        requirements_files=(),
        constraints_files=(),
        pip_install_options=("--index-url", "https://***@pypi.example.com/simple"),
        python=Interpreter("/usr/bin/python3.11", "3.11.7", "cpython"),
        system_site_packages=False,
    )
    assert fixed.key == GOLDEN_KEY


GOLDEN_KEY = "5ec723fb5ec624ff"


@pytest.mark.parametrize(
    "pip",
    [
        "--extra-index-url https://user:{t}@pypi.example.com/simple --no-deps",
        "--extra-index-url=https://user:{t}@pypi.example.com/simple --no-deps",
        "--extra-index-url https://{t}@pypi.example.com/simple --no-deps",
        "--extra-index-url 'https://user:p@ss{t}@pypi.example.com/simple' --no-deps",
        "--proxy user:{t}@proxy.example.com:3128 --no-deps",
        "--proxy=http://user:{t}@proxy.example.com:3128 --no-deps",
    ],
)
def test_credentials_are_not_part_of_the_key(pip: str) -> None:
    with_token = spec(pip=pip.format(t=TOKEN))
    rotated = spec(pip=pip.format(t="rotated-0ther"))
    assert with_token.key == rotated.key
    # pip itself still gets the real credentials
    assert any(TOKEN in option for option in with_token.pip_install_options)
    shown = json.dumps(with_token.describe())
    assert TOKEN not in shown and "ss" + TOKEN not in shown
    assert "***@" in shown


def test_another_index_host_is_another_key() -> None:
    a = spec(pip="--index-url https://user:x@a.example.com/simple")
    b = spec(pip="--index-url https://user:x@b.example.com/simple")
    assert a.key != b.key


def test_credentials_in_a_requirement_url_are_not_part_of_the_key() -> None:
    url = "pkg @ https://user:{t}@host.example.com/pkg-1.0-py3-none-any.whl"
    a = spec([url.format(t=TOKEN)])
    b = spec([url.format(t="other")])
    assert a.key == b.key
    assert TOKEN not in json.dumps(a.describe())


@pytest.mark.parametrize(
    ("text", "shown"),
    [
        ("https://user:tok@host/simple", "https://***@host/simple"),
        ("https://tok@host/simple", "https://***@host/simple"),
        ("https://user:p@ss@host/simple", "https://***@host/simple"),
        ("git+ssh://git@github.com/org/repo.git", "git+ssh://***@github.com/org/repo.git"),
        ("--index-url=https://u:t@h/s --no-deps", "--index-url=https://***@h/s --no-deps"),
        ("--proxy u:t@proxy:3128", "--proxy ***@proxy:3128"),
        ("--proxy=u:t@proxy:3128", "--proxy=***@proxy:3128"),
        ("https://host/simple", "https://host/simple"),
        ("see https://host/a?x=@y", "see https://host/a?x=@y"),
        ("user@example.com wrote", "user@example.com wrote"),
        # every character RFC 3986 allows in a userinfo, and `:` in the password
        ("https://u:pa'ss@h/s", "https://***@h/s"),
        ("https://u:!$&'()*+,;=%41~-._:x@h/s", "https://***@h/s"),
        ("'https://u:t@h'", "'https://***@h'"),
        ("--proxy 'u:p@h:1'", "--proxy '***@h:1'"),
        ("http://host/x https://u:t@h/y", "http://host/x https://***@h/y"),
    ],
)
def test_redact(text: str, shown: str) -> None:
    assert redact(text) == shown


def test_redact_all_hides_a_separate_proxy_value() -> None:
    assert redact_all(["--proxy", "u:t@proxy:3128", "x@y"]) == ["--proxy", "***@proxy:3128", "x@y"]


def test_split_pip_options_like_a_shell_without_one() -> None:
    assert split_pip_options("--find-links '/a b' --no-deps $(touch x) ;") == (
        "--find-links",
        "/a b",
        "--no-deps",
        "$(touch",
        "x)",
        ";",
    )
    assert split_pip_options("") == ()
    assert split_pip_options(None) == ()
    with pytest.raises(UsageError, match="No closing quotation"):
        split_pip_options("--find-links 'x")


def test_unbalanced_quote_message_hides_credentials() -> None:
    with pytest.raises(UsageError) as caught:
        split_pip_options(f"--index-url 'https://u:{TOKEN}@h/simple")
    assert TOKEN not in caught.value.message


def test_default_interpreter_is_the_base_of_our_own() -> None:
    found = find_interpreter(None)
    assert found.version == ".".join(map(str, sys.version_info[:3]))
    assert found.implementation == sys.implementation.name
    assert os.access(found.executable, os.X_OK)


def test_named_interpreter_is_asked_for_its_version() -> None:
    found = find_interpreter(sys.executable)
    assert found.executable == os.path.abspath(sys.executable)
    assert (found.version, found.implementation) == (
        find_interpreter(None).version,
        sys.implementation.name,
    )
    # the same interpreter, given by path, gives the same key as the default
    assert spec(python=sys.executable).key == spec().key


def other_pythons() -> list[str]:
    """Interpreters of another version than this one: on PATH, or installed beside this one
    (pyenv, asdf and uv keep versions side by side)."""
    mine = sys.version_info[:2]
    candidates = [
        os.path.join(d, f"python3.{minor}")
        for minor in range(8, 16)
        if minor != mine[1]
        for d in os.get_exec_path()
    ]
    siblings = Path(sys.base_prefix).parent
    if siblings.is_dir():
        candidates += [
            str(p) for p in sorted(siblings.glob("*/bin/python3.*")) if p.name[-1].isdigit()
        ]
    found = []
    for candidate in candidates:
        if not os.access(candidate, os.X_OK):
            continue
        try:
            interpreter = find_interpreter(candidate)
        except UsageError:
            continue  # too old, or a version manager's shim for a version it does not enable
        if tuple(map(int, interpreter.version.split(".")[:2])) != mine:
            found.append(candidate)
    return found


@pytest.fixture(scope="module")
def other_python() -> str:
    found = other_pythons()
    if not found:
        pytest.skip(f"no Python 3.8+ of another version than {sys.version.split()[0]} found")
    return found[0]


def test_another_interpreter_is_another_key(other_python: str) -> None:
    other = spec(python=other_python)
    assert other.python.version != find_interpreter(None).version
    assert other.key != spec().key
    assert spec(python=other_python).key == other.key


def _old_python() -> str | None:
    siblings = Path(sys.base_prefix).parent
    names = [f"python{v}" for v in ("2.7", "3.6", "3.7")]
    paths = [os.path.join(d, n) for n in names for d in os.get_exec_path()]
    if siblings.is_dir():
        paths += [str(p) for n in names for p in sorted(siblings.glob(f"*/bin/{n}"))]
    for path in paths:
        if os.access(path, os.X_OK):
            try:
                find_interpreter(path)
            except UsageError as exc:
                if "too old" in exc.message:
                    return path
    return None


def test_too_old_interpreter_is_named_as_such() -> None:
    old = _old_python()
    if old is None:
        pytest.skip("no Python older than 3.8 installed to try")
    with pytest.raises(UsageError, match=r"Python [23]\.\d+\.\d+ is too old for dbt"):
        find_interpreter(old)


def test_not_an_interpreter(tmp_path: Path) -> None:
    script = tmp_path / "fake-python"
    script.write_text("#!/bin/sh\necho 'no python here' >&2\nexit 3\n")
    script.chmod(0o755)
    with pytest.raises(
        UsageError, match=r"does not run as a Python interpreter \(it said: no python here\)"
    ):
        find_interpreter(str(script))
    garbage = tmp_path / "garbage"
    garbage.write_text("#!/bin/sh\necho '[1, 2'\n")
    garbage.chmod(0o755)
    with pytest.raises(UsageError, match="does not run as a Python interpreter"):
        find_interpreter(str(garbage))
    script.chmod(0o644)
    with pytest.raises(UsageError, match="not executable"):
        find_interpreter(str(script))


def test_requirements_and_constraints_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(UsageError, match=r"requirements file .* does not exist"):
        spec(files=[tmp_path / "nope.txt"])
    with pytest.raises(UsageError, match=r"constraints file .* is a directory"):
        spec(constraints=[tmp_path])
    (tmp_path / "reqs.txt").write_text("dbt-standin==1.0.0\n")
    monkeypatch.chdir(tmp_path)
    relative = spec(files=["reqs.txt"])
    # pip runs elsewhere: it gets the absolute path
    assert relative.requirements_files[0].path == tmp_path / "reqs.txt"
