"""A run's progress as one status line that updates in place in a terminal, as tqdm's does.

::

    from client_py import EngineClient, print_events

    with EngineClient("127.0.0.1:50051") as client:
        run = print_events(client.execute("Summarise README.md"))

Events are printed one per line above the status line (the model's text as whole messages,
the text being streamed right now at the end of the status line). Where the output is not
a terminal (a log file, CI), nothing is redrawn: the events are printed and the status
line is printed once, at the end.
"""

from __future__ import annotations

import shutil
import sys
import time
from collections.abc import Callable, Iterable
from typing import TextIO

from client_py._render import clip
from client_py._types import AssistantMessage, Run, RunEvent, TextDelta
from client_py._view import RunViewModel

__all__ = ["ProgressLine", "print_events"]


class ProgressLine:
    """Folds a run's events into a ``RunViewModel`` and shows its ``progress_text()`` live.

    Args:
        file: where to write (default: standard output).
        min_interval: the least time between two redraws of the line, in seconds.
        clock: the monotonic clock (tests pass their own).
    """

    def __init__(
        self,
        file: TextIO | None = None,
        *,
        min_interval: float = 0.1,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.file = file if file is not None else sys.stdout
        self.model = RunViewModel()
        self.live = bool(getattr(self.file, "isatty", lambda: False)())
        self._min_interval = min_interval
        self._clock = clock
        self._drawn_at: float | None = None
        self._shown = False  # a status line is on screen (live mode only)
        self._streaming = ""  # the model's text of the turn being streamed

    def update(self, event: RunEvent) -> None:
        """Takes one event; redraws the status line when it is due."""
        self.model.apply(event)
        if isinstance(event, TextDelta):
            self._streaming += event.text
        elif isinstance(event, AssistantMessage):
            self._streaming = ""
        self.refresh(force=self.model.done)

    def line(self) -> str:
        text = self.model.progress_text()
        if self._streaming:
            text += " · " + clip(self._streaming.split("\n")[-1], 200)
        return text

    def refresh(self, *, force: bool = False) -> None:
        """Redraws the status line (live mode), at most every ``min_interval`` unless forced."""
        if not self.live:
            return
        now = self._clock()
        if not force and self._drawn_at is not None and now - self._drawn_at < self._min_interval:
            return
        width = max(20, shutil.get_terminal_size((100, 20)).columns - 1)
        self.file.write("\r\033[K" + clip(self.line(), width))
        self.file.flush()
        self._drawn_at, self._shown = now, True

    def print(self, text: str) -> None:
        """Prints ``text`` as lines above the status line."""
        if self._shown:
            self.file.write("\r\033[K")
            self._shown = False
        self.file.write(text + "\n")
        self.file.flush()
        self.refresh(force=True)

    def close(self) -> None:
        """Leaves the final status line on its own line."""
        if self._shown:
            self.file.write("\r\033[K")
        self.file.write(self.line() + "\n")
        self.file.flush()
        self._shown = False


def print_events(
    events: Iterable[RunEvent],
    *,
    file: TextIO | None = None,
    show: Callable[[RunEvent], str | None] | None = None,
) -> Run | None:
    """Prints a run's events one line each under a live progress line; returns the final Run.

    ``events`` is what ``EngineClient.execute`` or ``RunHandle.events`` returns. ``show`` turns
    an event into the line to print (``None`` prints nothing for it); by default every event
    but the streamed text (``TextDelta``) is printed with ``str(event)``. The Run returned is
    the execution's final snapshot when ``events`` has one (an ``Execution``), else ``None``.
    """
    progress = ProgressLine(file)
    choose = show or (lambda event: None if isinstance(event, TextDelta) else str(event))
    try:
        for event in events:
            line = choose(event)
            if line is not None:
                progress.print(line)
            progress.update(event)
    finally:
        progress.close()
    run = getattr(events, "run", None)
    return run if isinstance(run, Run) else None
