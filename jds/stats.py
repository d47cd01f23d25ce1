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
    requests sent to the hub again after a broken link (:mod:`jds.retry`). The hub link:
    ``hub_links_lost`` sockets that lost their hub side and held on, ``reconnects`` those that got
    it back, ``reconnects_failed`` those closed after all (see :mod:`jds.reconnect`), and the
    outage now, if any (REST requests failing for a broken link, or sockets holding: see
    :mod:`jds.hublink`): since when, how many sockets are holding, why requests fail.
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
    hub_links_lost: int = 0
    reconnects: int = 0
    reconnects_failed: int = 0
    websockets_holding: int = 0
    outage_since: float | None = None
    last_outage_seconds: float | None = None
    # why REST requests fail for a broken link, while they do (jds.hublink)
    failing_requests: str | None = None

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

    def hub_link_lost(self, holding: int) -> None:
        self.hub_links_lost += 1
        self.websockets_holding = holding
        if self.outage_since is None:
            self.outage_since = self.clock()

    def hub_link_settled(self, holding: int, outcome: str, seconds: float) -> None:
        """``outcome``: ``"back"``, ``"gave up"``, or anything else (the IDE left meanwhile)."""
        if outcome == "back":
            self.reconnects += 1
            self.failing_requests = None  # a hub connection works again
        elif outcome == "gave up":
            self.reconnects_failed += 1
        self.websockets_holding = holding
        if not holding and self.failing_requests is None and self.outage_since is not None:
            self.outage_since = None
            self.last_outage_seconds = round(seconds, 1)

    def requests_failing(self, why: str) -> None:
        """REST requests meet a broken hub link (the outage starts now if none is on)."""
        self.failing_requests = why
        if self.outage_since is None:
            self.outage_since = self.clock()

    def request_answered(self) -> None:
        """The hub answered a request: the outage is over unless sockets still hold."""
        self.failing_requests = None
        if not self.websockets_holding and self.outage_since is not None:
            self.last_outage_seconds = round(max(0.0, self.clock() - self.outage_since), 1)
            self.outage_since = None

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
            "hub_link": {
                "lost": self.hub_links_lost,
                "reconnected": self.reconnects,
                "gave_up": self.reconnects_failed,
                "last_outage_seconds": self.last_outage_seconds,
                "outage": None if self.outage_since is None else {
                    "since": iso_time(self.outage_since),
                    "seconds": round(max(0.0, self.clock() - self.outage_since), 1),
                    "websockets_holding": self.websockets_holding,
                    "requests_failing": self.failing_requests,
                },
            },
        }
