"""
When an HTTP request that met a broken hub link may be sent again, and when.

A request is sent again only when that cannot make the hub act twice: GET, HEAD and OPTIONS change
nothing, and any request whose bytes never left the proxy (the hub refused the connection, the
connection was lost before its TLS handshake completed, or a pooled connection was gone before the
request was written) was never seen. Anything else that may have reached the hub, such as a POST
whose answer never came, is never replayed: the IDE gets the 502 and decides. Nor is a request whose
connection failed for a reason another attempt cannot change within the window (an exception marked
``final``: the bastion refused the ssh login or its host key is not trusted, :mod:`jds.bastion`):
retrying would only start ssh again and again for the same refusal.

The first new attempt waits 0.5 s, each later one twice as long, until :data:`RETRY_WINDOW` seconds
have passed since the first failure. The hub client (:mod:`jds.hubclient`) already sends a body-less
idempotent request once more at once when a pooled connection turns out to be stale; what fails after
that comes here.

While requests fail for a broken link, :class:`jds.hublink.HubLink` says so, once for the outage,
whatever met it first (a request or a WebSocket).
"""

from __future__ import annotations

from twisted.internet import error as net_error
from twisted.internet.defer import CancelledError
from twisted.internet.interfaces import IReactorTime
from twisted.python.failure import Failure
from twisted.web.client import (
    RequestNotSent,
    RequestTransmissionFailed,
    ResponseFailed,
    ResponseNeverReceived,
)

from jds.refusal import leaf_failures

__all__ = [
    "FIRST_DELAY", "RETRY_WINDOW", "SAFE_METHODS", "RetryPlan", "final", "link_broken", "may_retry", "never_sent",
]

RETRY_WINDOW = 10.0
FIRST_DELAY = 0.5
SAFE_METHODS = frozenset({b"GET", b"HEAD", b"OPTIONS"})

# The hub client's wrappers (Agent's types) for a request that was (or may have been) written on a connection.
_ON_A_CONNECTION = (RequestTransmissionFailed, ResponseNeverReceived, ResponseFailed)
# Failures to open a connection, or connections lost under a request: the network, not the hub's answer.
_CONNECT_FAILURES = (net_error.ConnectError, net_error.DNSLookupError)
_LOST = (net_error.ConnectionClosed,)


def never_sent(failure: Failure) -> bool:
    """
    True when no byte of the request can have reached the hub: the client never got a connection
    (refused, unreachable, lost during the TLS handshake; the endpoint fails the connection then) or,
    with Agent, found its pooled connection gone before writing (``RequestNotSent``).
    """
    if failure.check(RequestNotSent):
        return True
    if failure.check(*_ON_A_CONNECTION, CancelledError):
        return False
    return bool(failure.check(*_CONNECT_FAILURES, *_LOST))


def link_broken(failure: Failure) -> bool:
    """True when the request failed because the connection to the hub failed, not for an answer or a timeout."""
    if never_sent(failure):
        return True
    if not failure.check(*_ON_A_CONNECTION):
        return False
    leaves = leaf_failures(failure)
    return bool(leaves) and all(leaf.check(*_LOST, *_CONNECT_FAILURES) for leaf in leaves)


def final(failure: Failure) -> bool:
    """True when a cause says another attempt would fail the same way (its ``final`` attribute)."""
    return any(getattr(leaf.value, "final", False) for leaf in leaf_failures(failure))


def may_retry(method: bytes, failure: Failure) -> bool:
    """Whether a request with ``method`` that failed with ``failure`` may be sent again."""
    if final(failure):
        return False
    return never_sent(failure) or (method in SAFE_METHODS and link_broken(failure))


class RetryPlan:
    """
    The waits before one request's new attempts: 0.5 s, then twice the last, the last wait shortened
    so that the last attempt starts :data:`RETRY_WINDOW` seconds after the first failure. The time an
    attempt takes counts; one that meets a silent hub can still take its connect timeout on top.
    """

    def __init__(self, clock: IReactorTime, window: float = RETRY_WINDOW, first: float = FIRST_DELAY) -> None:
        self._clock = clock
        self._window = window
        self._next = first
        self._deadline: float | None = None
        self.attempts = 1

    def next_delay(self) -> float | None:
        """How long to wait before the next attempt, or None when the window is spent."""
        now = self._clock.seconds()
        if self._deadline is None:
            self._deadline = now + self._window
        left = self._deadline - now
        if left <= 0:
            return None
        delay = min(self._next, left)
        self._next *= 2
        self.attempts += 1
        return delay
