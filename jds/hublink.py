"""
Whether the link to the hub works, from every hub connection: REST requests (:mod:`jds.proxy`),
WebSockets (:mod:`jds.relay`) and the hub API's own calls (:class:`jds.hub.HubAPI`: spawn, progress,
token checks, through :meth:`HubLink.watch`) report here, so ``status`` cannot say "up" while every request
fails, and one outage is one log line however many requests and sockets met it: said on the next
reactor turn (sockets that break together are counted together), with the reason of the first
failure. One more line says when it is back: the first answer from the hub, or the last holding
socket settled.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from jds.retry import RETRY_WINDOW
from jds.stats import Stats

__all__ = ["HubLink"]

log = Logger(namespace="jds.hublink")


class HubLink:
    """The hub link's state and its two log lines; the counters and the outage live in ``stats``."""

    def __init__(
        self, clock: IReactorTime, stats: Stats | None = None, explain: Callable[[Failure], Any] | None = None
    ) -> None:
        self._clock = clock
        # the failure's sentence, as the IDE would get it (HubTLSPolicy.explain: a Refusal)
        self._explain = explain
        self.stats = stats if stats is not None else Stats(clock=clock.seconds)
        self._since: float | None = None
        self._why = ""
        self._retried = 0
        self._reconnected = 0
        self._requests_failing = False
        self._holding = 0
        self._line: Any = None

    @property
    def down(self) -> bool:
        return self._since is not None

    # REST

    def request_failed(self, why: str, retried: bool) -> None:
        """A request met a broken link (``retried``: it will be sent again); ``why`` names no token."""
        if retried:
            self._retried += 1
        self._requests_failing = True
        self.stats.requests_failing(why)
        self._went_down(why)

    def answered(self) -> None:
        """The hub answered (a request, a WebSocket handshake): the link works."""
        if self._requests_failing:
            self._requests_failing = False
            self.stats.request_answered()
        self._maybe_back()

    def watch(self, call: Deferred) -> Deferred:
        """
        Report a hub API call (``call`` fires with the hub's response): an answer says the link
        works, a failure to get one that it does not. A timeout or a cancelled call says nothing
        (as for the proxy's requests: the hub may be slow, not unreachable).
        """

        def answered(response: object) -> object:
            self.answered()
            return response

        def failed(failure: Failure) -> Failure:
            if not failure.check(CancelledError, TimeoutError):
                why = self._explain(failure).message if self._explain is not None else failure.getErrorMessage()
                self.request_failed(why, retried=False)
            return failure

        return call.addCallbacks(answered, failed)

    # WebSockets

    def socket_lost(self, why: str, holding: int) -> None:
        """A socket lost its hub side and holds; ``holding`` of them now."""
        self._holding = holding
        self.stats.hub_link_lost(holding)
        self._went_down(why)

    def socket_settled(self, holding: int, outcome: str, seconds: float) -> None:
        """A holding socket is back (``"back"``: the link works), given up, or left by its IDE."""
        self._holding = holding
        if outcome == "back":
            self._reconnected += 1
            self._requests_failing = False
        self.stats.hub_link_settled(holding, outcome, seconds)
        self._maybe_back()

    # The two lines

    def _went_down(self, why: str) -> None:
        if self._since is not None:
            return
        self._since = self._clock.seconds()
        self._why = why
        self._line = self._clock.callLater(0, self._say_lost)

    def _say_lost(self) -> None:
        self._line = None
        count = self._holding
        log.warn(
            "hub link lost: {why}; {count} WebSocket{s} holding; requests that are safe to send again "
            "are retried for up to {window:g} s.",
            why=self._why.rstrip("."),
            count=count,
            s="" if count == 1 else "s",
            window=RETRY_WINDOW,
        )

    def _maybe_back(self) -> None:
        if self._since is None or self._requests_failing or self._holding:
            return
        took = self._clock.seconds() - self._since
        said = self._line is None
        if not said:  # over within the turn it began: nothing was said, nothing to take back
            self._line.cancel()
            self._line = None
        else:
            log.info(
                "hub link back after {seconds:.1f} s; {retried} request attempt{rs} retried, "
                "{reconnected} WebSocket{ws} reconnected.",
                seconds=took,
                retried=self._retried,
                rs="" if self._retried == 1 else "s",
                reconnected=self._reconnected,
                ws="" if self._reconnected == 1 else "s",
            )
        self._since = None
        self._retried = self._reconnected = 0
