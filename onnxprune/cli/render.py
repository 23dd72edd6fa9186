"""What the CLI shows: the consoles, notices, JSON, number formats and the progress bar."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import click
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from onnxprune import api
from onnxprune.cli.state import flag

__all__ = ["ProgressBar", "emit_json", "err", "fmt_flops", "fmt_int", "fmt_kib", "notice", "notices", "out",
           "progress_bar", "quiet", "titled_table"]

err = Console(stderr=True, highlight=False)
out = Console(highlight=False)


def quiet() -> bool:
    """Whether --quiet was given: no notices, no progress."""
    return flag("quiet")


def notice(text: str | None) -> None:
    if text and not quiet():
        err.print(f"[yellow]note:[/] {escape(text)}", soft_wrap=True)


def notices(texts) -> None:
    for text in texts:
        notice(text)


def emit_json(obj: dict) -> None:
    click.echo(api.json_text(obj))


def fmt_int(n: int | None) -> str:
    return "?" if n is None else f"{n:,}"


def fmt_flops(n: int | None) -> str:
    if n is None:
        return "?"
    for unit, scale in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(n)


def fmt_percent(x: float | None) -> str:
    """A fraction as a percentage; "?" when unknown (e.g. FLOPs at an unknown input size)."""
    return "?" if x is None else f"{100 * x:.2f} %"


def fmt_ratio(x: float | None) -> str:
    return "?" if x is None else f"{x:.4f}"


def fmt_kib(n: int) -> str:
    return f"{n / 1024:,.1f} KiB"


def titled_table(title: str, columns, left=()) -> Table:
    """A table titled at the left: the columns named in LEFT align left, the others right; long cells fold."""
    t = Table(title=title, title_justify="left")
    for col in columns:
        t.add_column(col, justify="left" if col in left else "right", overflow="fold")
    return t


class ProgressBar:
    """One bar: call it with (done, total) as the API's progress callback; describe() changes its text."""

    def __init__(self, progress: Progress, task) -> None:
        self._progress = progress
        self._task = task

    def __call__(self, done, total, description: str | None = None) -> None:
        self._progress.update(self._task, completed=done, total=total, description=description)

    def describe(self, description: str) -> None:
        self._progress.update(self._task, description=description)


@contextmanager
def progress_bar(description: str, visible: bool = True) -> Iterator[ProgressBar]:
    """A progress bar on stderr (hidden with --quiet or when stderr is not a terminal)."""
    progress = Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        console=err, transient=True, disable=quiet() or not err.is_terminal,
    )
    with progress:
        yield ProgressBar(progress, progress.add_task(description, total=None, visible=visible))
