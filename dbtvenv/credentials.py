"""Credentials reach pip and uv only where other users of the machine cannot read them.

Every local user can read every process's command line (`/proc/PID/cmdline`), never its
environment or a file of mode 0600. So when an index option (`--index-url`, `--extra-index-url`,
`--find-links`, in any spelling pip takes: `--index URL`, `--index-url=URL`, `-iURL`; uv's
`--default-index` and `--index [NAME=]URL`) or a requirement's URL carries a credential,
those index options and that requirement go to the installer in a private requirements file
(pip and uv read them there as they would on the command line), and a `--proxy` with a
credential goes through the environment (`PIP_PROXY` for pip, `HTTPS_PROXY`/`HTTP_PROXY` for
uv). Without a credential, the command line is what the user wrote. Anything else with a
credential in it (`-r URL`, an abbreviation pip would refuse) is refused: it never reaches
the installer.
"""

from __future__ import annotations

import contextlib
import os
import shlex
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import NamedTuple

from dbtvenv.errors import UsageError
from dbtvenv.redact import redact

PRIVATE_FILE = ".dbtvenv-private-requirements.txt"
# What each index option is in a requirements file, by installer. uv's own `--default-index`
# and `--index [NAME=]URL` have no requirements-file form: they are its `--index-url` and
# `--extra-index-url` there (an index's name only matters to a project's `tool.uv.sources`).
_INDEX_OPTIONS = {
    "pip": {
        "--index-url": "--index-url",
        "--extra-index-url": "--extra-index-url",
        "--find-links": "--find-links",
    },
    "uv": {
        "--index-url": "--index-url",
        "--extra-index-url": "--extra-index-url",
        "--find-links": "--find-links",
        "--default-index": "--index-url",
        "--index": "--extra-index-url",
    },
}
_SHORT_INDEX_OPTIONS = {"-i": "--index-url", "-f": "--find-links"}
# `pip install`'s long options (with pip's general ones, over pip's recent releases). pip's
# optparse takes any unique prefix of one of them for it (`--index URL` is `--index-url URL`),
# so a prefix is resolved against all of them, as pip does. uv takes no abbreviations.
# fmt: off
_PIP_LONG_OPTIONS = frozenset((
    "--abi", "--all-releases", "--break-system-packages", "--build-constraint",
    "--build-option", "--cache-dir", "--cert", "--check-build-dependencies",
    "--client-cert", "--compile", "--config-settings", "--constraint", "--debug",
    "--default-timeout", "--disable-pip-version-check", "--dry-run", "--editable",
    "--exists-action", "--extra-index-url", "--find-links", "--force-reinstall",
    "--global-option", "--group", "--help", "--ignore-installed",
    "--ignore-requires-python", "--implementation", "--index-url", "--install-option",
    "--isolated", "--keyring-provider", "--local-log", "--log", "--log-file",
    "--no-binary", "--no-build-isolation", "--no-cache-dir", "--no-clean", "--no-color",
    "--no-compile", "--no-dependencies", "--no-deps", "--no-index", "--no-input",
    "--no-proxy-env", "--no-python-version-warning", "--no-require-hashes",
    "--no-use-pep517", "--no-user", "--no-warn-conflicts", "--no-warn-script-location",
    "--only-binary", "--only-dependencies", "--only-deps", "--only-final", "--platform",
    "--pre", "--prefer-binary", "--prefix", "--progress-bar", "--proxy", "--pypi-url",
    "--python", "--python-version", "--quiet", "--refresh-package", "--report",
    "--require-hashes", "--require-venv", "--require-virtualenv", "--requirement",
    "--requirements-from-script", "--resume-retries", "--retries", "--root",
    "--root-user-action", "--source", "--source-dir", "--source-directory", "--src",
    "--target", "--timeout", "--trusted-host", "--upgrade", "--upgrade-strategy",
    "--uploaded-prior-to", "--use-deprecated", "--use-feature", "--use-pep517",
    "--user", "--verbose", "--version",
))
# fmt: on
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
    what must not; a credential that would still reach the command line is a `UsageError`."""
    index_options = _INDEX_OPTIONS[installer]
    index: list[tuple[str, str]] = []
    as_written: list[str] = []  # every option but a proxy moved to the environment
    rest: list[str] = []  # the same without the index options
    proxy: str | None = None
    i = 0
    while i < len(options):
        item = options[i]
        name, equals, value = item.partition("=")
        name = long_name(name, installer) if name.startswith("--") else name
        following = options[i + 1] if i + 1 < len(options) else None
        taken = [item]
        if name == "--no-index" and not equals:
            index.append((name, ""))
        elif name in index_options and equals:
            index.append((index_options[name], _index_url(name, value)))
        elif (name in index_options or item in _SHORT_INDEX_OPTIONS) and following is not None:
            option = index_options.get(name) or _SHORT_INDEX_OPTIONS[item]
            index.append((option, _index_url(name, following)))
            taken.append(following)
        elif item[:2] in _SHORT_INDEX_OPTIONS and len(item) > 2:
            index.append((_SHORT_INDEX_OPTIONS[item[:2]], item[2:]))
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
        return _checked(InstallerArgs(as_written, list(requirements), [], environ), installer)
    # Option lines are split like a shell would (by pip and uv alike): quote their values.
    lines = [
        f"{option} {shlex.quote(_absolute(option, value))}" if value else option
        for kind in _FILE_ORDER
        for option, value in index
        if option == kind
    ]
    lines += secret_requirements
    public = [r for r in requirements if r not in secret_requirements]
    return _checked(InstallerArgs(rest, public, lines, environ), installer)


def long_name(name: str, installer: str) -> str:
    """The long option a user's `--name` stands for: pip takes a unique prefix of one."""
    if installer != "pip" or name in _PIP_LONG_OPTIONS:
        return name
    matches = [option for option in _PIP_LONG_OPTIONS if option.startswith(name)]
    return matches[0] if len(matches) == 1 else name


def _index_url(name: str, value: str) -> str:
    """uv's `--index NAME=URL` (and `--default-index`) names an index; a file takes its URL."""
    if name in ("--index", "--default-index") and "=" in value.split("://", 1)[0]:
        return value.split("=", 1)[1]
    return value


def _checked(args: InstallerArgs, installer: str) -> InstallerArgs:
    """The backstop: nothing with a credential in it goes on the installer's command line."""
    for item in (*args.options, *args.requirements):
        if has_credential(item):
            raise UsageError(
                f"--pip-install-options: {redact(item)!r} carries a credential that {installer} "
                "could only get on its command line, which every local user can read; not "
                "passing it on: give the index with --index-url, --extra-index-url or "
                "--find-links, or the credential in the installer's configuration or ~/.netrc"
            )
    return args


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
