"""An offline stand-in for dbt, packaged as wheels built with nothing but ``zipfile``.

``build_wheelhouse(dest)`` writes three wheels into ``dest``:

* ``dbt_standin-1.0.0-py3-none-any.whl`` and ``dbt_standin-2.0.0-py3-none-any.whl``:
  distribution ``dbt-standin``, module ``dbt_standin``, and dbt's own entry point
  ``dbt.cli.main:cli`` (which is ``dbt_standin.main``) as the console script ``dbt``, so
  that a warm process can import and fork it as it does dbt-core's;
* ``no_dbt_here-1.0.0-py3-none-any.whl``: distribution ``no-dbt-here``, no console script.

so ``pip install --no-index --find-links DEST dbt-standin==1.0.0`` gives a venv with ``bin/dbt``.

The stand-in ``dbt`` is driven by environment variables (argv is only reported back):

``STANDIN_PIDFILE``
    write the own pid there (atomically). This happens once the signal handlers are
    installed and the grandchild (if any) is running and its pidfile written, so the
    pidfile appearing means "ready": a signal sent after that is handled.
``STANDIN_SIGNALS_FILE``
    handle SIGINT, SIGTERM and SIGHUP: append the signal's name (``SIGTERM``) as one line to
    that file, then exit with ``128 + signum``, unless ``STANDIN_IGNORE_<NAME>`` is set (and
    not ``0``), e.g. ``STANDIN_IGNORE_SIGTERM=1``, in which case it keeps running.
``STANDIN_GRANDCHILD_PIDFILE``
    start ``sys.executable -c 'import time; time.sleep(3600)'`` (same session and process
    group, stdin/stdout/stderr on /dev/null so it never holds a pipe open) and write its pid.
``STANDIN_GRANDCHILD_SETSID``
    start that grandchild with ``setsid()``, out of dbt's process group.
``STANDIN_FIRST_LINE``
    print that line on stdout at once and flush (before any sleep).
``STANDIN_STDOUT_BYTES`` / ``STANDIN_STDERR_BYTES``
    write exactly N bytes of ``expected_output(N)`` to stdout, then to stderr, in 64 KiB
    chunks, flushing each.
``STANDIN_READ_STDIN``
    read stdin to its end and report it as ``"stdin"`` in the JSON report.
(none of the three output variables above set)
    print one JSON object on one line: ``argv``, ``cwd``, ``executable``, ``prefix``, ``env``
    (VIRTUAL_ENV, PATH, PYTHONPATH, PYTHONHOME, DBT_PROFILES_DIR, STANDIN_MARK), ``shadow``
    (``shadowme.__file__`` if ``import shadowme`` works, else null), plus ``version``,
    ``pid``, ``ppid``. If argv is exactly ``["--version"]``, print
    ``Core:\\n  - installed: <version> (standin)`` instead.
``STANDIN_SLEEP``
    sleep that many seconds (float), in small steps.
``STANDIN_KILL_SELF``
    at the end, restore the default handler and kill itself with that signal (``SIGTERM``).
``STANDIN_EXIT``
    exit status (default 0).
"""

from __future__ import annotations

import base64
import hashlib
import re
import zipfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import cast

STANDIN_DIST = "dbt-standin"
STANDIN_VERSIONS = ("1.0.0", "2.0.0")
NO_DBT_DIST = "no-dbt-here"
NO_DBT_VERSION = "1.0.0"

STANDIN_SOURCE = '''\
"""Stand-in for the dbt command line, for dbtvenv's tests (stdlib only, Python 3.9+)."""

import contextlib
import json
import os
import signal
import subprocess
import sys
import time

CHUNK_SIZE = 64 * 1024
LINE_WIDTH = 64
HANDLED_SIGNALS = ("SIGINT", "SIGTERM", "SIGHUP")
OUTPUT_VARIABLES = ("STANDIN_FIRST_LINE", "STANDIN_STDOUT_BYTES", "STANDIN_STDERR_BYTES")
REPORTED_ENV = (
    "VIRTUAL_ENV",
    "PATH",
    "PYTHONPATH",
    "PYTHONHOME",
    "DBT_PROFILES_DIR",
    "STANDIN_MARK",
)


def iter_output(n):
    """Yield exactly n bytes of numbered 64-byte lines, in chunks of at most 64 KiB."""
    lines_per_chunk = CHUNK_SIZE // LINE_WIDTH
    first = 0
    remaining = n
    while remaining > 0:
        lines = (
            f"line {i:09d} ".ljust(LINE_WIDTH - 1, "x") + "\\n"
            for i in range(first, first + lines_per_chunk)
        )
        chunk = "".join(lines).encode("ascii")[:remaining]
        first += lines_per_chunk
        remaining -= len(chunk)
        yield chunk


def expected_output(n):
    """The n bytes that STANDIN_STDOUT_BYTES=n / STANDIN_STDERR_BYTES=n write."""
    return b"".join(iter_output(n))


def _flag(name):
    return os.environ.get(name, "") not in ("", "0")


def _write_atomic(path, text):
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _flush_std():
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()


def _on_signal(signum, frame):
    name = signal.Signals(signum).name
    with open(os.environ["STANDIN_SIGNALS_FILE"], "a") as f:
        f.write(name + "\\n")
        f.flush()
    if _flag("STANDIN_IGNORE_" + name):
        return
    _flush_std()
    os._exit(128 + signum)


def _version():
    try:
        from importlib.metadata import version

        return version("dbt-standin")
    except Exception:
        return "0+unknown"


def _shadow():
    try:
        import shadowme
    except ImportError:
        return None
    return getattr(shadowme, "__file__", None)


def _write_bytes(stream, n):
    for chunk in iter_output(n):
        stream.write(chunk)
        stream.flush()


def _sleep(seconds):
    deadline = time.monotonic() + seconds
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            return
        time.sleep(min(left, 0.05))


def _kill_self(name):
    name = name.strip().upper()
    if not name.startswith("SIG"):
        name = "SIG" + name
    sig = signal.Signals[name]
    _flush_std()
    if sig not in (signal.SIGKILL, signal.SIGSTOP):  # those two cannot have a handler
        signal.signal(sig, signal.SIG_DFL)
    os.kill(os.getpid(), sig)
    _sleep(1.0)  # only reached for signals whose default action is not fatal


def main():
    env = os.environ

    if env.get("STANDIN_SIGNALS_FILE"):
        for name in HANDLED_SIGNALS:
            signal.signal(getattr(signal, name), _on_signal)

    if env.get("STANDIN_GRANDCHILD_PIDFILE"):
        grandchild = subprocess.Popen(
            [sys.executable, "-c", "import time; time.sleep(3600)"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=_flag("STANDIN_GRANDCHILD_SETSID"),
        )
        _write_atomic(env["STANDIN_GRANDCHILD_PIDFILE"], str(grandchild.pid))

    if env.get("STANDIN_PIDFILE"):
        _write_atomic(env["STANDIN_PIDFILE"], str(os.getpid()))

    if "STANDIN_FIRST_LINE" in env:
        sys.stdout.write(env["STANDIN_FIRST_LINE"] + "\\n")
        sys.stdout.flush()

    stdin_text = sys.stdin.read() if _flag("STANDIN_READ_STDIN") else None

    if env.get("STANDIN_STDOUT_BYTES"):
        sys.stdout.flush()
        _write_bytes(sys.stdout.buffer, int(env["STANDIN_STDOUT_BYTES"]))
    if env.get("STANDIN_STDERR_BYTES"):
        sys.stderr.flush()
        _write_bytes(sys.stderr.buffer, int(env["STANDIN_STDERR_BYTES"]))

    if not any(name in env for name in OUTPUT_VARIABLES):
        if sys.argv[1:] == ["--version"]:
            print(f"Core:\\n  - installed: {_version()} (standin)")
        else:
            report = {
                "argv": sys.argv[1:],
                "cwd": os.getcwd(),
                "executable": sys.executable,
                "prefix": sys.prefix,
                "env": {k: env.get(k) for k in REPORTED_ENV},
                "shadow": _shadow(),
                "version": _version(),
                "pid": os.getpid(),
                "ppid": os.getppid(),
            }
            if stdin_text is not None:
                report["stdin"] = stdin_text
            print(json.dumps(report))
        sys.stdout.flush()

    if env.get("STANDIN_SLEEP"):
        _sleep(float(env["STANDIN_SLEEP"]))

    if env.get("STANDIN_KILL_SELF"):
        _kill_self(env["STANDIN_KILL_SELF"])

    _flush_std()
    return int(env.get("STANDIN_EXIT") or 0)


if __name__ == "__main__":
    sys.exit(main())
'''

_NAMESPACE: dict[str, object] = {"__name__": "dbt_standin_source"}
exec(compile(STANDIN_SOURCE, "dbt_standin.py", "exec"), _NAMESPACE)


def expected_output(n: int) -> bytes:
    """The exact bytes the stand-in writes for ``STANDIN_STDOUT_BYTES=n`` (or STDERR)."""
    generate = cast(Callable[[int], bytes], _NAMESPACE["expected_output"])
    return generate(n)


def iter_expected_output(n: int) -> Iterator[bytes]:
    """``expected_output(n)`` in chunks of at most 64 KiB, for sizes too big to hold at once."""
    generate = cast(Callable[[int], Iterator[bytes]], _NAMESPACE["iter_output"])
    return generate(n)


def _record_hash(data: bytes) -> str:
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=")
    return "sha256=" + digest.decode("ascii")


def write_wheel(
    dest: Path,
    name: str,
    version: str,
    files: Mapping[str, str | bytes],
    *,
    entry_points: str | None = None,
    summary: str = "",
    requires: Sequence[str] = (),
) -> Path:
    """Write a pure-Python ``py3-none-any`` wheel of ``files`` into ``dest`` and return it."""
    project = re.sub(r"[-_.]+", "_", name).lower()
    dist_info = f"{project}-{version}.dist-info"
    metadata = (
        "Metadata-Version: 2.1\n"
        f"Name: {name}\n"
        f"Version: {version}\n"
        f"Summary: {summary}\n"
        "Requires-Python: >=3.9\n"
    ) + "".join(f"Requires-Dist: {requirement}\n" for requirement in requires)
    wheel = (
        "Wheel-Version: 1.0\n"
        "Generator: dbtvenv-tests-standin\n"
        "Root-Is-Purelib: true\n"
        "Tag: py3-none-any\n"
    )
    top_level = sorted({path.split("/")[0].removesuffix(".py") for path in files})
    contents: dict[str, bytes] = {
        path: data.encode("utf-8") if isinstance(data, str) else data
        for path, data in files.items()
    }
    contents[f"{dist_info}/METADATA"] = metadata.encode("utf-8")
    contents[f"{dist_info}/WHEEL"] = wheel.encode("utf-8")
    contents[f"{dist_info}/top_level.txt"] = "".join(f"{t}\n" for t in top_level).encode()
    if entry_points is not None:
        contents[f"{dist_info}/entry_points.txt"] = entry_points.encode("utf-8")
    record_path = f"{dist_info}/RECORD"
    record = "".join(
        f"{path},{_record_hash(data)},{len(data)}\n" for path, data in contents.items()
    )
    contents[record_path] = (record + f"{record_path},,\n").encode("utf-8")

    dest.mkdir(parents=True, exist_ok=True)
    target = dest / f"{project}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(target, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for path, data in contents.items():
            info = zipfile.ZipInfo(path, date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = 0o100644 << 16
            archive.writestr(info, data)
    return target


# dbt-core's entry point (1.5 and later), as a stand-in's package `dbt` provides it.
DBT_CLI_MAIN = {
    "dbt/__init__.py": "",
    "dbt/cli/__init__.py": "",
    "dbt/cli/main.py": "from dbt_standin import main as cli\n",
}


def dbt_cli_main(module: str, function: str = "main") -> dict[str, str]:
    """The files of a package `dbt` whose `dbt.cli.main:cli` is `module.function`."""
    return {**DBT_CLI_MAIN, "dbt/cli/main.py": f"from {module} import {function} as cli\n"}


def build_wheelhouse(dest: Path) -> Path:
    """Write the stand-in wheels (see the module docstring) into ``dest`` and return ``dest``."""
    for version in STANDIN_VERSIONS:
        write_wheel(
            dest,
            STANDIN_DIST,
            version,
            {"dbt_standin.py": STANDIN_SOURCE, **DBT_CLI_MAIN},
            entry_points="[console_scripts]\ndbt = dbt.cli.main:cli\n",
            summary="Offline stand-in for the dbt command line (dbtvenv tests)",
        )
    write_wheel(
        dest,
        NO_DBT_DIST,
        NO_DBT_VERSION,
        {"no_dbt_here.py": '"""Nothing to see: a requirement set without dbt."""\n\nVALUE = 1\n'},
        summary="A package without any console script (dbtvenv tests)",
    )
    return dest
