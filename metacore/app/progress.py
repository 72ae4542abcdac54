"""A progress bar on stderr (rich), one line per training run; silent when stdout carries JSON."""

from __future__ import annotations

from typing import Callable


class RunProgress:
    def __init__(self, unit: str = "steps") -> None:
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        self._progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                  TextColumn(unit), TimeElapsedColumn(), TimeRemainingColumn(),
                                  console=Console(stderr=True))
        self._task = None

    def start(self, label: str, total: int) -> Callable[[int], None]:
        self._progress.start()
        self._task = self._progress.add_task(label, total=total)
        return lambda step: self._progress.update(self._task, completed=step)

    @property
    def is_terminal(self) -> bool:
        return self._progress.console.is_terminal

    def stop(self) -> None:
        self._progress.stop()
