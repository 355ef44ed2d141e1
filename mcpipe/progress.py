"""Progress bars for the run loops (rich), switchable off.

Library code never prints; run loops take a ``Progress`` from here and the
CLI decides whether it is shown (``--no-progress``, or not a terminal).
"""

from __future__ import annotations

import contextlib
from typing import Iterator

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text


class RateColumn(ProgressColumn):
    """Items per second, e.g. ``412.3 img/s``."""

    def __init__(self, unit: str = "img"):
        super().__init__()
        self.unit = unit

    def render(self, task) -> Text:  # noqa: ANN001 - rich's Task
        speed = task.finished_speed or task.speed
        return Text("-" if speed is None else f"{speed:,.1f} {self.unit}/s", style="progress.data.speed")


@contextlib.contextmanager
def progress_bar(enabled: bool, *, unit: str = "img") -> Iterator[Progress]:
    """A rich Progress with count, rate and ETA; a disabled one when ``enabled`` is false."""
    console = Console(stderr=True)
    bar = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        RateColumn(unit),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
        console=console,
        disable=not enabled,
        transient=False,
    )
    with bar:
        yield bar
