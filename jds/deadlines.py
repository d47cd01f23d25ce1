"""
Many deadlines on one timer: the proxy's per-request limits (no answer from the hub, a body that
stalls). A ``callLater`` set and cancelled per request and per response body cost two timers, two
cancels and a reactor heap full of cancelled calls for every small REST request, which almost
always ends long before either limit. Here a deadline is an entry in a dict (a clock read, a set,
a pop), and the one timer is set for the soonest; an entry removed before it is due leaves the timer
as it is, to find nothing due when it fires. Only a deadline sooner than the timer moves it.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from typing import Any

__all__ = ["Deadlines"]

# A deadline this close is due (the reactor's float time, re-armed timers).
_SLACK = 1e-6


class Deadlines:
    """
    ``set(key, due, expired)``: ``expired()`` is called once ``due`` (reactor seconds) has passed,
    unless ``discard(key)`` came first. ``expired`` may return a later due to keep watching (a
    stall watch that saw progress meanwhile), or ``None``.
    """

    __slots__ = ("_call_later", "_entries", "_firing", "_seconds", "_timer")

    def __init__(self, call_later: Callable[..., Any], seconds: Callable[[], float]) -> None:
        self._call_later = call_later
        self._seconds = seconds
        self._entries: dict[Hashable, tuple[float, Callable[[], float | None]]] = {}
        self._timer: Any = None  # pending whenever it is not None
        self._firing = False  # the timer is set again once the due ones have run

    def __len__(self) -> int:
        return len(self._entries)

    def set(self, key: Hashable, due: float, expired: Callable[[], float | None]) -> None:
        """``key`` is due at ``due`` (set again: the new due replaces the old)."""
        self._entries[key] = (due, expired)
        if self._firing:
            return
        timer = self._timer
        if timer is None:
            self._timer = self._call_later(max(0.0, due - self._seconds()), self._fire)
        elif timer.getTime() > due:
            timer.reset(max(0.0, due - self._seconds()))

    def discard(self, key: Hashable) -> None:
        """``key`` is no longer due (nothing if it was not)."""
        self._entries.pop(key, None)

    def _fire(self) -> None:
        self._timer = None
        now = self._seconds() + _SLACK
        entries = self._entries
        due_now = [key for key, (due, _) in entries.items() if due <= now]
        self._firing = True
        try:
            for key in due_now:
                entry = entries.pop(key, None)
                if entry is None:  # discarded by an earlier one's expiry
                    continue
                later = entry[1]()
                if later is not None and key not in entries:
                    entries[key] = (later, entry[1])
        finally:
            self._firing = False
        if entries:
            soonest = min(due for due, _ in entries.values())
            self._timer = self._call_later(max(0.0, soonest - self._seconds()), self._fire)
