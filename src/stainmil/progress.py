"""Progress bars (rich) for every long loop; quiet when not attached to a terminal or in tests."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


def _enabled() -> bool:
    if os.environ.get("STAINMIL_PROGRESS") == "0":
        return False
    return sys.stderr.isatty() or os.environ.get("STAINMIL_PROGRESS") == "1"


@contextmanager
def progress_bar(description: str, total: int) -> Iterator[Callable[[int], None]]:
    """Yield ``advance(n=1)``; shows a bar on a terminal, stays silent otherwise."""
    if not _enabled():
        yield lambda n=1: None
        return
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TimeRemainingColumn())
    with Progress(*columns, transient=False) as progress:
        task = progress.add_task(description, total=total)
        yield lambda n=1: progress.advance(task, n)
