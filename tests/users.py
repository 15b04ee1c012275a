"""Test support: run dbtvenv as real unprivileged users of this machine.

The test interpreter and the checkout may live where other users cannot go (a home dir of
mode 0700), so ``PublicDbtvenv`` puts a copy of dbtvenv, its dependencies and the stand-in
wheels in a world-readable dir, and runs ``/usr/bin/python3 -m dbtvenv`` from there with
``setpriv`` under numeric uids and gids that no account uses: no ``/etc/passwd`` entry is
made, and nothing of them outlives the test session.
"""

from __future__ import annotations

import importlib
import os
import shutil
import subprocess
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

from conftest import Result, StrPath

ALICE = 41011  # the victim: runs dbtvenv
BOB = 41012  # another user of the same machine
CAROL = 41013  # a team member alice trusts
SHARE = 41010  # a group alice, bob and carol are members of
SYSTEM_PYTHON = "/usr/bin/python3"
# What `python -m dbtvenv` imports, besides the standard library.
PACKAGES = ("dbtvenv", "click", "psutil", "rich", "packaging", "markdown_it", "mdurl", "pygments")


def can_switch_users() -> bool:
    return os.geteuid() == 0 and shutil.which("setpriv") is not None


class PublicDbtvenv:
    """dbtvenv and the stand-in wheelhouse where every user can read them."""

    def __init__(self, wheelhouse: Path) -> None:
        self.base = Path(tempfile.mkdtemp(prefix="dbtvenv-test-users."))
        self.base.chmod(0o755)
        self.lib = self.base / "lib"
        self.lib.mkdir()
        for name in PACKAGES:
            module = importlib.import_module(name)
            assert module.__file__ is not None
            shutil.copytree(
                Path(module.__file__).parent,
                self.lib / name,
                ignore=shutil.ignore_patterns("__pycache__"),
            )
        self.wheelhouse = self.base / "wheelhouse"
        shutil.copytree(wheelhouse, self.wheelhouse)
        self.homes = self.base / "home"
        self.homes.mkdir()
        for path in self.base.rglob("*"):
            path.chmod(0o755 if path.is_dir() else 0o644)

    @property
    def pip_options(self) -> str:
        return f"--no-index --find-links {self.wheelhouse}"

    def home(self, uid: int) -> Path:
        home = self.homes / str(uid)
        if not home.exists():
            home.mkdir(mode=0o700)
            os.chown(home, uid, uid)
        return home

    def environ(self, uid: int, extra: Mapping[str, str] | None = None) -> dict[str, str]:
        environ = {
            "PATH": "/usr/local/bin:/usr/bin:/bin",
            "HOME": str(self.home(uid)),
            "LANG": "C.UTF-8",
            "PYTHONPATH": str(self.lib),
            "PYTHONDONTWRITEBYTECODE": "1",
            "PIP_NO_CACHE_DIR": "1",
            "DBTVENV_REQUIREMENTS": "dbt-standin==1.0.0",
            "DBTVENV_PIP_INSTALL_OPTIONS": self.pip_options,
        }
        environ.update(extra or {})
        return environ

    def command(self, uid: int, groups: Sequence[int] = ()) -> list[str]:
        ids = [f"--reuid={uid}", f"--regid={uid}"]
        ids += [f"--groups={','.join(map(str, groups))}"] if groups else ["--clear-groups"]
        return ["setpriv", *ids, SYSTEM_PYTHON, "-m", "dbtvenv"]

    def run(
        self,
        uid: int,
        *args: StrPath,
        groups: Sequence[int] = (),
        env: Mapping[str, str] | None = None,
        umask: int = 0o022,
        cwd: Path | None = None,
        timeout: float = 180,
    ) -> Result:
        """`dbtvenv ARGS` as user `uid` (its group: the same number), from its home dir."""
        done = subprocess.run(
            [*self.command(uid, groups), *(os.fspath(a) for a in args)],
            env=self.environ(uid, env),
            cwd=cwd or self.home(uid),
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=timeout,
            preexec_fn=lambda: os.umask(umask),
        )
        return Result(done.returncode, done.stdout, done.stderr)

    def shell(self, uid: int, script: str, groups: Sequence[int] = ()) -> None:
        """A few shell commands as user `uid`: how another user plants things."""
        ids = [f"--reuid={uid}", f"--regid={uid}"]
        ids += [f"--groups={','.join(map(str, groups))}"] if groups else ["--clear-groups"]
        subprocess.run(
            ["setpriv", *ids, "sh", "-euc", script],
            cwd="/",
            env={"PATH": "/usr/bin:/bin"},
            check=True,
            timeout=60,
        )

    def shared_dir(self, name: str, mode: int, *, uid: int = 0, gid: int = 0) -> Path:
        """A dir under the world-readable base, with exactly this mode and owner."""
        path = self.base / "shared" / name
        path.parent.mkdir(exist_ok=True)
        path.parent.chmod(0o755)
        path.mkdir()
        os.chown(path, uid, gid)
        path.chmod(mode)
        return path

    def remove(self) -> None:
        shutil.rmtree(self.base, ignore_errors=True)
