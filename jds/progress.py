"""
A one-line progress bar for the server spawn, drawn only on a terminal: batch queues can take
minutes, and a silent wait looks like a hang. Off a terminal the spawn's log lines say the same.
"""

from __future__ import annotations

from typing import TextIO

from jds.hub import Progress

__all__ = ["ProgressBar"]


class ProgressBar:
    def __init__(self, stream: TextIO, width: int = 30) -> None:
        self.stream = stream
        self.width = width

    def render(self, progress: Progress) -> str:
        percent = max(0, min(100, progress.percent or 0))
        filled = self.width * percent // 100
        bar = "#" * filled + "-" * (self.width - filled)
        return f"\r[{bar}] {percent:3d}% {progress.message[:60]:<60}"

    def update(self, progress: Progress) -> bool:
        """Draw the bar; ``False`` (not a terminal) means the caller should log instead."""
        if not getattr(self.stream, "isatty", lambda: False)():
            return False
        self.stream.write(self.render(progress))
        if progress.ready or progress.failed:
            self.stream.write("\n")
        self.stream.flush()
        return True
