"""dbtvenv's own messages, always on stderr: live on a terminal, timestamped lines elsewhere."""

from __future__ import annotations

import os
import sys
import time
from datetime import datetime, timezone
from typing import Any, TextIO

from dbtvenv.redact import redact

# Installer lines worth a line of their own in a log.
_MILESTONES = ("Installing collected packages", "Successfully installed", "Installed ")


class Reporter:
    """Plain lines, for cron, Airflow logs and anything else that is not a terminal."""

    def __init__(self, stream: TextIO | None = None) -> None:
        self.stream = stream if stream is not None else sys.stderr

    def _emit(self, message: str) -> None:
        stamp = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
        self.stream.write(f"{stamp} dbtvenv: {redact(message)}\n")
        self.stream.flush()

    def info(self, message: str) -> None:
        self._emit(message)

    def phase(self, message: str) -> None:
        self._emit(message)

    def detail(self, line: str) -> None:
        """One line of installer output."""
        if line.startswith(_MILESTONES):
            self._emit(line.strip())

    def done(self, message: str) -> None:
        self._emit(message)

    def close(self) -> None:
        """Stop anything live; plain output has nothing to stop."""


class LiveReporter(Reporter):
    """A spinner with the current phase and installer step, replaced by one line when done."""

    def __init__(self, stream: TextIO | None = None) -> None:
        super().__init__(stream)
        from rich.console import Console

        self.console = Console(file=self.stream, highlight=False)
        self._status: Any = None
        self._phase = ""
        self._started = time.monotonic()

    def info(self, message: str) -> None:
        self.console.print(f"dbtvenv: {redact(message)}", markup=False)

    def phase(self, message: str) -> None:
        self._phase = redact(message)
        if self._status is None:
            self._started = time.monotonic()
            self._status = self.console.status(self._phase)
            self._status.start()
        else:
            self._status.update(self._phase)

    def detail(self, line: str) -> None:
        if self._status is not None and line.strip():
            elapsed = time.monotonic() - self._started
            text = redact(line.strip())[: max(self.console.width - len(self._phase) - 16, 20)]
            self._status.update(f"{self._phase} [dim]{elapsed:4.0f}s · {_escape(text)}[/dim]")

    def done(self, message: str) -> None:
        self.close()
        self.console.print(f"[green]✓[/green] dbtvenv: {_escape(redact(message))}")

    def close(self) -> None:
        if self._status is not None:
            self._status.stop()
            self._status = None


def _escape(text: str) -> str:
    from rich.markup import escape

    return escape(text)


def make_reporter() -> Reporter:
    if sys.stderr.isatty() and os.environ.get("TERM") != "dumb":
        return LiveReporter()
    return Reporter()
