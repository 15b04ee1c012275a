"""What every study script in benchmarks/ shares: the machine line, a scratch dir, and its
section of docs/performance.md."""

from __future__ import annotations

import contextlib
import os
import platform
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path


def cpu_line() -> str:
    """`CPU: <model>, <n> cores; <system> <release>`: the machine a table was measured on."""
    cpu = "unknown CPU"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return f"CPU: {cpu}, {os.cpu_count()} cores; {platform.system()} {platform.release()}"


def write_docs(path: Path, text: str, begin: str, end: str) -> None:
    """Put `text` between the `begin` and `end` markers of `path` (added at its end if absent)."""
    current = path.read_text() if path.exists() else ""
    start, stop = current.find(begin), current.find(end)
    if start < 0 or stop < start:
        current += f"\n{begin}\n{end}\n"
        start, stop = current.find(begin), current.find(end)
    path.write_text(current[: start + len(begin)] + "\n" + text + current[stop:])


@contextlib.contextmanager
def scratch(prefix: str, keep: bool) -> Iterator[Path]:
    """A scratch dir for one run of a study, removed afterwards unless `keep`."""
    path = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        yield path
    finally:
        if keep:
            print(f"kept {path}")
        else:
            shutil.rmtree(path, ignore_errors=True)
