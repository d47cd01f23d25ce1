"""
Counters of one daemon's traffic, kept by the local site, :mod:`jds.errors` and the WebSocket relay,
and shown by the status page. Plain data, so any layer may import it.
"""

from __future__ import annotations

import datetime
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from twisted.python.failure import Failure

__all__ = ["Stats", "iso_time"]


def iso_time(seconds: float) -> str:
    return datetime.datetime.fromtimestamp(seconds, datetime.timezone.utc).isoformat(timespec="seconds")


@dataclass
class Stats:
    """
    Counters of one daemon's traffic. ``requests`` and bytes count finished HTTP exchanges relayed
    to the hub (the daemon's own pages are not traffic); ``open_http`` counts exchanges in progress,
    ``open_websockets`` relayed sockets, ``websockets`` all sockets ever opened, ``retried_requests``
    requests sent to the hub again after a broken link (:mod:`jds.retry`).
    """

    clock: Callable[[], float] = time.time
    started: float = field(default=0.0)
    requests: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    open_http: int = 0
    open_websockets: int = 0
    websockets: int = 0
    retried_requests: int = 0
    last_error: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        if not self.started:
            self.started = self.clock()

    def http_opened(self) -> Callable[[object], object]:
        """Count an exchange as open; call the returned function (once or more) when it is over."""
        self.open_http += 1
        done = False

        def closed(result: object = None) -> object:
            nonlocal done
            if not done:
                done = True
                self.open_http -= 1
            return None if isinstance(result, Failure) else result

        return closed

    def http_finished(self, received: int, sent: int) -> None:
        self.requests += 1
        self.bytes_in += received
        self.bytes_out += sent

    def request_retried(self) -> None:
        self.retried_requests += 1

    def websocket_opened(self) -> None:
        self.open_websockets += 1
        self.websockets += 1

    def websocket_closed(self) -> None:
        self.open_websockets = max(0, self.open_websockets - 1)

    def error(self, status: int, message: str, reason: str) -> None:
        self.last_error = {"time": iso_time(self.clock()), "status": status, "reason": reason, "message": message}

    def snapshot(self) -> dict[str, Any]:
        return {
            "started": iso_time(self.started),
            "uptime_seconds": round(max(0.0, self.clock() - self.started), 1),
            "open_http": self.open_http,
            "open_websockets": self.open_websockets,
            "requests": self.requests,
            "bytes_in": self.bytes_in,
            "bytes_out": self.bytes_out,
            "websockets": self.websockets,
            "retried_requests": self.retried_requests,
            "last_error": self.last_error,
        }
