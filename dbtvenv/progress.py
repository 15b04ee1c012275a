"""dbtvenv's own messages, always on stderr: live on a terminal, timestamped lines elsewhere."""

from __future__ import annotations

import os
import sys
import time
from typing import TYPE_CHECKING, Any, TextIO

from dbtvenv.redact import redact

if TYPE_CHECKING:
    from rich.console import Console

# Installer lines worth a line of their own in a log.
_MILESTONES = ("Installing collected packages", "Successfully installed", "Installed ")
# A log gets a line at least this often while a build runs, so that it never looks hung.
HEARTBEAT = 15.0


def passed_on(line: str) -> bool:
    """Installer lines every user must see, terminal or not: a yanked release was chosen."""
    return "yanked" in line.lower()


def activity(line: str) -> str | None:
    """What pip or uv is doing, as one of its output lines shows it; None if it does not say."""
    text = line.strip()
    word, _, rest = text.partition(" ")
    first = rest.split(" ", 1)[0]
    if word in ("Collecting", "Processing", "Requirement") or text.startswith("Looking in"):
        return f"resolving ({first})" if word == "Collecting" else "resolving"
    if word == "Using":  # Using cached NAME (SIZE)
        return "resolving"
    if word == "Downloading":
        name = first.rsplit("/", 1)[-1]
        return f"resolving (downloading {name})" if ".metadata" in name else f"downloading {name}"
    if text.startswith("INFO: pip is looking at multiple versions of"):
        return f"resolving (trying other versions of {text.split(' of ', 1)[1].split(' ')[0]})"
    if text.startswith("Building wheels for collected packages: "):
        return f"building {text.split(': ', 1)[1]} from source"
    if text.startswith("Building wheel for "):
        return f"building {text.split(' ')[3]} from source"
    if word == "Building":  # uv: Building psycopg2==2.9.10
        return f"building {first} from source"
    if text.startswith(("Installing build dependencies", "Getting requirements to build")):
        return "preparing a source distribution"
    if text.startswith("Installing collected packages:"):
        count = len(text.split(":", 1)[1].split(","))
        return f"installing {count} distributions and compiling their bytecode"
    if word == "Resolved":  # uv
        return f"downloading and preparing {first} packages"
    if word == "Prepared":  # uv
        return "installing and compiling bytecode"
    return None


class Reporter:
    """Plain lines, for cron, Airflow logs and anything else that is not a terminal."""

    def __init__(self, stream: TextIO | None = None) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self._phase = ""
        self._activity = ""
        self._phase_started = self._last = time.monotonic()

    def _emit(self, message: str) -> None:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        try:
            self.stream.write(f"{stamp} dbtvenv: {redact(message)}\n")
            self.stream.flush()
        except BrokenPipeError:
            raise
        except OSError as exc:  # a full disk under the log: stop, rather than build unseen
            from dbtvenv.errors import OutputError

            raise OutputError.writing("stderr", exc) from None
        self._last = time.monotonic()

    def info(self, message: str) -> None:
        self._emit(message)

    def phase(self, message: str) -> None:
        self._phase, self._activity = message, ""
        self._phase_started = time.monotonic()
        self._emit(message)

    def detail(self, line: str) -> None:
        """One line of installer output."""
        self._activity = activity(line) or self._activity
        if line.startswith(_MILESTONES) or passed_on(line):
            self._emit(line.strip())

    def tick(self) -> None:
        """Called about once a second while a build runs: a line if the log has been quiet for
        HEARTBEAT seconds, saying what the build is doing."""
        now = time.monotonic()
        if self._phase and now - self._last >= HEARTBEAT:
            doing = f": {self._activity}" if self._activity else ""
            self._emit(f"still {self._phase}{doing} ({now - self._phase_started:.0f} s)")

    def done(self, message: str) -> None:
        self._phase = ""
        self._emit(message)

    def close(self) -> None:
        """Stop anything live; plain output has nothing to stop."""
        self._phase = ""


REDRAW_INTERVAL = 0.1


class LiveReporter(Reporter):
    """On a terminal: one live line (spinner, phase, elapsed seconds, the installer's current
    step) that vanishes into a one-line summary when the build is done."""

    def __init__(self, stream: TextIO | None = None) -> None:
        super().__init__(stream)
        self._console: Console | None = None
        self._live: Any = None
        self._phase = ""
        self._step = ""
        self._started = time.monotonic()
        self._spinner: Any = None
        self._shown = 0.0

    @property
    def console(self) -> Console:
        """rich, loaded on first use: a run that builds nothing says nothing and needs none."""
        if self._console is None:
            from rich.console import Console

            # rich honours NO_COLOR (no colours) and TERM=dumb itself.
            self._console = Console(file=self.stream, highlight=False)
        return self._console

    def info(self, message: str) -> None:
        self.console.print(f"dbtvenv: {redact(message)}", markup=False)

    def phase(self, message: str) -> None:
        self._phase = redact(message)
        self._step = ""
        self._shown = 0.0  # show the first installer step of a phase at once
        if self._live is None:
            from rich.live import Live

            self._started = time.monotonic()
            self._live = Live(
                _LiveLine(self),
                console=self.console,
                transient=True,  # the live line vanishes; done() prints the summary
                refresh_per_second=8,
                redirect_stdout=False,
                redirect_stderr=False,
            )
            self._live.start()
        self._live.refresh()

    def detail(self, line: str) -> None:
        if not line.strip():
            return
        if passed_on(line):
            self.console.print(f"dbtvenv: {redact(line.strip())}", markup=False)
        self._step = redact(line.strip())
        # The live view redraws itself 8 times a second; a new step is shown at once unless
        # the installer is pouring out lines faster than anyone could read them.
        now = time.monotonic()
        if self._live is not None and now - self._shown >= REDRAW_INTERVAL:
            self._shown = now
            self._live.refresh()

    def tick(self) -> None:
        """Nothing: the live line shows the elapsed time and the installer's step itself."""

    def done(self, message: str) -> None:
        self.close()
        self.console.print(f"[green]✓[/green] dbtvenv: {_escape(redact(message))}")

    def close(self) -> None:
        if self._live is not None:
            self._live.stop()
            self._live = None

    def render(self, width: int) -> Any:
        """The live line: `⠹ installing 2 requirement(s) with pip  12s  Collecting dbt-core`."""
        from rich.spinner import Spinner
        from rich.text import Text

        if self._spinner is None:
            self._spinner = Spinner("dots", style="green")
        elapsed = time.monotonic() - self._started
        line = Text.assemble(
            self._spinner.render(self.console.get_time()),
            " ",
            self._phase,
            (f"  {elapsed:.0f}s", "bold"),
        )
        if self._step:
            line.append(f"  {self._step}", style="dim")
        line.no_wrap = True
        line.truncate(max(width, 1), overflow="ellipsis")
        return line


class _LiveLine:
    """Rendered afresh at every refresh, so the elapsed time and the spinner move on their own."""

    def __init__(self, reporter: LiveReporter) -> None:
        self.reporter = reporter

    def __rich_console__(self, console: Any, options: Any) -> Any:
        yield self.reporter.render(options.max_width)


def _escape(text: str) -> str:
    from rich.markup import escape

    return escape(text)


def make_reporter() -> Reporter:
    if sys.stderr.isatty() and os.environ.get("TERM") != "dumb":
        return LiveReporter()
    return Reporter()
