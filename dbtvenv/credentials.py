"""Credentials reach pip and uv only where other users of the machine cannot read them.

Every local user can read every process's command line (`/proc/PID/cmdline`), never its
environment or a file of mode 0600. So when an index option (`--index-url`, `--extra-index-url`,
`--find-links`) or a requirement's URL carries a credential, those index options and that
requirement go to the installer in a private requirements file (pip and uv read them there
as they would on the command line), and a `--proxy` with a credential goes through the
environment (`PIP_PROXY` for pip, `HTTPS_PROXY`/`HTTP_PROXY` for uv). Without a credential,
the command line is what the user wrote.
"""

from __future__ import annotations

import contextlib
import os
import shlex
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import NamedTuple

from dbtvenv.redact import redact

PRIVATE_FILE = ".dbtvenv-private-requirements.txt"
_INDEX_OPTIONS = {
    "-i": "--index-url",
    "--index-url": "--index-url",
    "--extra-index-url": "--extra-index-url",
    "-f": "--find-links",
    "--find-links": "--find-links",
}
# In a requirements file `--index-url` replaces the index list it finds: it comes first.
_FILE_ORDER = ("--no-index", "--index-url", "--extra-index-url", "--find-links")


class InstallerArgs(NamedTuple):
    options: list[str]  # for the installer's command line
    requirements: list[str]  # for the command line too
    private_lines: list[str]  # for the private requirements file; none: no file
    environ: dict[str, str]  # added to the installer's environment


def has_credential(text: str) -> bool:
    return redact(text) != text


def split(options: Sequence[str], requirements: Sequence[str], *, installer: str) -> InstallerArgs:
    """Sort the install options and requirements into what may go on the command line and
    what must not."""
    index: list[tuple[str, str]] = []
    as_written: list[str] = []  # every option but a proxy moved to the environment
    rest: list[str] = []  # the same without the index options
    proxy: str | None = None
    i = 0
    while i < len(options):
        item = options[i]
        name, equals, value = item.partition("=")
        following = options[i + 1] if i + 1 < len(options) else None
        taken = [item]
        if item == "--no-index":
            index.append((item, ""))
        elif name.startswith("--") and name in _INDEX_OPTIONS and equals:
            index.append((_INDEX_OPTIONS[name], value))
        elif item in _INDEX_OPTIONS and following is not None:
            index.append((_INDEX_OPTIONS[item], following))
            taken.append(following)
        elif item[:2] in ("-i", "-f") and len(item) > 2:
            index.append((_INDEX_OPTIONS[item[:2]], item[2:]))
        elif name == "--proxy" and (equals or following is not None):
            proxy = value if equals else following
            taken = [item] if equals else [item, str(following)]
            if _proxy_credential(str(proxy)) or installer == "uv":  # uv: only from here
                taken = []
            as_written += taken
            rest += taken
            i += 1 if equals else 2
            continue
        else:
            rest.append(item)
        as_written += taken
        i += len(taken)
    environ: dict[str, str] = {}
    if proxy is not None and (_proxy_credential(proxy) or installer == "uv"):
        names = ("HTTPS_PROXY", "HTTP_PROXY") if installer == "uv" else ("PIP_PROXY",)
        environ.update(dict.fromkeys(names, proxy))
    secret_requirements = [r for r in requirements if has_credential(r)]
    if not secret_requirements and not any(has_credential(value) for _, value in index):
        return InstallerArgs(as_written, list(requirements), [], environ)
    # Option lines are split like a shell would (by pip and uv alike): quote their values.
    lines = [
        f"{option} {shlex.quote(_absolute(option, value))}" if value else option
        for kind in _FILE_ORDER
        for option, value in index
        if option == kind
    ]
    lines += secret_requirements
    public = [r for r in requirements if r not in secret_requirements]
    return InstallerArgs(rest, public, lines, environ)


def _proxy_credential(proxy: str) -> bool:
    """`user:password@host:port` needs no scheme in a proxy setting."""
    return has_credential(f"--proxy {proxy}")


def _absolute(option: str, value: str) -> str:
    """A local find-links dir, relative to the working dir as on the command line (in a
    requirements file pip would first look beside the file)."""
    if option == "--find-links" and "://" not in value and not os.path.isabs(value):
        return os.path.abspath(value)
    return value


@contextlib.contextmanager
def private_file(args: InstallerArgs, where: Path) -> Iterator[Path | None]:
    """The private requirements file for one installer run (mode 0600, made with O_EXCL in
    the env being built, removed after the run); None when there is nothing to hide."""
    if not args.private_lines:
        yield None
        return
    path = where / PRIVATE_FILE
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    try:
        with open(fd, "w", encoding="utf-8") as f:
            f.write("".join(f"{line}\n" for line in args.private_lines))
        yield path
    finally:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
