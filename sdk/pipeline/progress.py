"""Progress reporting for the pipeline: a silent default and a rich display on stderr."""
from __future__ import annotations

import contextlib
import logging
import time
from typing import Iterator, Protocol

log = logging.getLogger(__name__)


class Progress(Protocol):
    """What the pipeline calls to report progress. Implementations must not raise."""

    def stage(self, name: str) -> contextlib.AbstractContextManager[None]:
        """A context manager around one stage (shown as a spinner, then a tick with its duration)."""

    def note(self, message: str) -> None:
        """A line of information under the current stage."""

    def warn(self, message: str) -> None:
        """A warning the user must see (random calibration, host proxy, ...)."""


class NullProgress:
    """Logs stages and notes; draws nothing."""

    def __init__(self) -> None:
        self.notes: list[str] = []
        self.warnings: list[str] = []

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        log.info("stage: %s", name)
        yield

    def note(self, message: str) -> None:
        self.notes.append(message)
        log.info("%s", message)

    def warn(self, message: str) -> None:
        self.warnings.append(message)
        log.warning("%s", message)

    def steps(self, name: str, total: int) -> "StepBar":
        """A per-step callback ``bar(loss)`` for training loops (logged every 10%); ``bar.close()`` ends it."""
        return StepBar(name, total, None)


class RichProgress:
    """Stages with a spinner, a tick and their duration, on stderr (stdout stays free for --json)."""

    def __init__(self, console=None, quiet: bool = False) -> None:
        from rich.console import Console

        self.console = console or Console(stderr=True)
        self.quiet = quiet
        self.warnings: list[str] = []

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        if self.quiet:
            yield
            return
        from rich.markup import escape

        name = escape(name)
        with self.console.status(f"[bold cyan]{name}…[/]", spinner="dots"):
            try:
                yield
            except BaseException:
                self.console.print(f"[red]✗[/] {name}")
                raise
        self.console.print(f"[green]✓[/] {name} [dim]({time.perf_counter() - start:.1f} s)[/]")

    def note(self, message: str) -> None:
        from rich.markup import escape

        log.info("%s", message)
        if not self.quiet:
            self.console.print(f"  [dim]{escape(message)}[/]", highlight=False)

    def warn(self, message: str) -> None:
        from rich.markup import escape

        self.warnings.append(message)
        self.console.print(f"  [yellow]warning:[/] {escape(message)}", highlight=False)

    def steps(self, name: str, total: int) -> "StepBar":
        """A progress bar with the running loss for training loops: ``bar(loss)`` per step, ``bar.close()``."""
        return StepBar(name, total, None if self.quiet else self.console)


class StepBar:
    """One bar of ``total`` steps showing the latest loss; logs every 10% as well."""

    def __init__(self, name: str, total: int, console) -> None:
        self.name, self.total, self.done = name, max(1, int(total)), 0
        self._progress = self._task = None
        if console is not None:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress as Bar, TextColumn, TimeRemainingColumn

            self._progress = Bar(TextColumn("  {task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("loss {task.fields[loss]}"), TimeRemainingColumn(), console=console,
                                 transient=False)
            self._task = self._progress.add_task(name, total=self.total, loss="-")
            self._progress.start()

    def __call__(self, loss: float) -> None:
        self.done += 1
        if self._progress is not None:
            self._progress.update(self._task, advance=1, loss=f"{loss:.4f}")
        if self.done % max(1, self.total // 10) == 0 or self.done == self.total:
            log.info("%s: step %d/%d, loss %.4f", self.name, self.done, self.total, loss)

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None
