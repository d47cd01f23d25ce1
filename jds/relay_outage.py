"""
What a relayed kernel, terminal or event socket goes through while its hub side is lost without a
close frame: the IDE's messages held, the attempts on a backoff, the hub's verdict on each, the
give-up, and for a kernel the count of what the server replayed. The decisions (which sockets, the
delays, the bounds, the window) are :mod:`jds.reconnect`'s; this module runs them on the reactor
for one :class:`~jds.relay_link.Link`, reached through the ``link`` given to it (this module
imports nothing of the relay above it). The close reasons the IDE gets are in :mod:`jds.relay`'s
table.
"""

from __future__ import annotations

from typing import Any

from twisted.logger import Logger
from twisted.python.failure import Failure

from jds.hub import looks_stopped
from jds.logs import quoted
from jds.reconnect import (
    HeldFrames,
    Outage,
    ReplayCount,
    backoff,
    describe_duration,
    message_date,
)
from jds.refusal import Refusal

__all__ = ["REPLAY_SETTLE", "HubOutage", "ReplayWatch", "log_reconnected", "loss_reason"]

log = Logger(namespace="jds.relay")

# After a reconnect, the replay count is final at the first new message, or this long after the
# last replayed one (the "reconnected" log line waits for it).
REPLAY_SETTLE = 2.0
# What is kept of the last kernel message to read its header.date from (see ReplayCount).
_HEADER_ROOM = 64 * 1024


def loss_reason(hub: Any) -> str:
    """A short phrase for the log: why the hub side went."""
    if getattr(hub, "wasNotCleanReason", None) and "ping timeout" in hub.wasNotCleanReason:
        return f"no answer to a ping within {hub.autoPingTimeout:g} s"
    if getattr(hub, "wasOpenHandshakeTimeout", False):
        return f"no WebSocket handshake within {hub.openHandshakeTimeout:g} s"
    failure = getattr(hub, "lost_reason", None)
    if failure is None:
        return "the connection was lost"
    return (failure.getErrorMessage() or failure.type.__name__).rstrip(".")


def log_reconnected(uri: str, seconds: float, sent: int, replay: ReplayCount | None) -> None:
    """The one line that says a socket is back."""
    parts = [] if replay is None else [replay.describe()]
    parts.append(f"{sent} held message{'' if sent == 1 else 's'} sent")
    log.info(
        "WebSocket {uri} reconnected after {after}; {counts}",
        uri=quoted(uri),
        after=describe_duration(seconds),
        counts=", ".join(parts),
    )


class HubOutage:
    """
    One outage of one link, from the hub side's loss to *open* again or the 1011:

    - *down* (no attempt running): the IDE's messages are held (:class:`HeldFrames`), never written
      into a dead socket; an attempt is due after the next :func:`backoff` delay. Past
      ``--reconnect-window`` of awake time, or past the held-bytes bound: the IDE gets 1011 with a
      reason saying how long the hub was unreachable.
    - *reconnecting* (an attempt running, made by the link): the same URL, the same ``session_id``.
      Connection failures, a lost handshake, redirects that do not say "stopped", 5xx, 429 and a
      first 404 (the hub answers one while it restores its proxy's routes): -> *down* again. A
      second 404 (kernel or terminal gone: culled, shut down, server restarted), other 4xx and a
      stopped server: 1011 with the hub's verdict, after which the IDE's own reconnect meets the
      refusal a plain server would give. In managed mode a stopped server is started first (as on
      a first connect), then the attempt is made again.
    """

    def __init__(self, link: Any, reason: str) -> None:
        relay = link.relay
        self.link = link
        self._relay = relay
        self.outage = Outage(reason, relay.monotonic(), relay.reactor.seconds())
        self._held = HeldFrames(relay.reconnect.max_held)
        self._delays = backoff()
        self._retry: Any = None  # the delayed call of the next attempt
        self.verdict: Any = None  # the refused hub socket whose answer was handled

    def hold(self, payload: bytes, is_binary: bool) -> None:
        if not self._held.hold(payload, is_binary):
            self.too_much_held()

    def too_much_held(self) -> None:
        self.link.give_up(self._relay.reconnect.too_much_held(self.outage, self._relay.monotonic()))

    def retry_later(self, why: str) -> None:
        """*down*: the next attempt after the next delay, unless the window is over."""
        if self.link.outage is not self or not self.link.ide_open():
            return
        self.outage.reason = why
        verdict = self._relay.reconnect.gave_up(self.outage, self._relay.monotonic())
        if verdict is not None:
            self.link.give_up(verdict)
            return
        self._cancel_retry()
        self._retry = self._relay.reactor.callLater(next(self._delays), self.attempt)

    def attempt(self) -> None:
        self._retry = None
        if self.link.outage is not self or not self.link.ide_open():
            return
        verdict = self._relay.reconnect.gave_up(self.outage, self._relay.monotonic())
        if verdict is not None:
            self.link.give_up(verdict)
            return
        self.outage.attempts += 1
        self.verdict = None
        self.link.connect_again()

    def refused(self, why: str, status: int, location: bytes | None) -> None:
        """The hub answered an attempt with something other than 101."""
        outage, link = self.outage, self.link
        after = describe_duration(outage.awake(self._relay.monotonic()))
        if status == 404 and not outage.not_found:
            # the hub itself answers 404 for a moment after its proxy restarted, until it has
            # restored its routes: only a second 404 means the kernel is gone
            outage.not_found += 1
            self.retry_later("the hub answered 404")
            return
        # Only a definite answer ends the wait: gone (404), refused (4xx), a stopped server. A
        # redirect loop while the hub re-adds its routes, 5xx, 429 and a garbled 101 pass.
        transient = status < 400 or status >= 500 or status == 429
        stopped = looks_stopped(status, location, self._relay.target)
        reason = self._refusal_reason(status, after, stopped is not False and status != 404)
        starter = self._relay.starter
        if starter is not None and not link.recovered and stopped is not False:
            # the shared recovery: start the server (one spawn for everyone waiting), then try again
            link.recovered = link.waiting_for_server = True

            def over(started: bool) -> None:
                link.waiting_for_server = False
                if link.outage is not self:  # the IDE left meanwhile
                    link.maybe_done()
                elif started:
                    self.attempt()
                elif transient:
                    self.retry_later(f"the hub answered {status}")
                else:
                    link.give_up(reason)

            def failed(failure: Failure) -> None:
                link.waiting_for_server = False
                if link.outage is not self:
                    link.maybe_done()
                    return
                message = failure.value.message if isinstance(failure.value, Refusal) else failure.getErrorMessage()
                link.give_up(f"Restarting your server failed: {message}"[:123])

            starter.recover(status, location).addCallbacks(over, failed)
            return
        if transient and stopped is not True:
            self.retry_later(why if status == 101 else f"the hub answered {status}")
        else:
            link.give_up(reason)

    def _refusal_reason(self, status: int, after: str, stopped: bool = False) -> str:
        if stopped:
            return f"Your server on the hub is not running (found after a {after} outage)."
        if status == 404:
            what = {"kernel": "The kernel", "terminal": "The terminal"}.get(self.link.kind or "", "This socket")
            return f"{what} is gone (404 after a {after} outage): shut down, culled or the server restarted."
        return f"The hub refused to reconnect ({status}) after a {after} outage."

    def end(self, outcome: str) -> float:
        """Over: ``"back"``, ``"gave up"`` or ``"abandoned"`` (the IDE left, the proxy shuts down);
        the outage's awake seconds."""
        seconds = self.outage.awake(self._relay.monotonic())
        self._relay.link_settled(self.link, outcome, seconds)
        self._cancel_retry()
        return seconds

    def take_held(self) -> list[tuple[bytes, bool]]:
        """*reconnecting* -> *open*: the held messages, in order."""
        return self._held.take()

    def _cancel_retry(self) -> None:
        if self._retry is not None and self._retry.active():
            self._retry.cancel()
        self._retry = None


class ReplayWatch:
    """
    A kernel socket's last message from the hub (for its ``header.date``) and, after a reconnect,
    the count of messages the server replayed (:class:`ReplayCount`), which the "reconnected" log
    line waits for.
    """

    def __init__(self, link: Any) -> None:
        self._link = link
        self._last: tuple[bytes, bool, float] | None = None
        self._replay: ReplayCount | None = None
        self._done: Any = None
        self._back_line: tuple[float, int] | None = None

    def note(self, payload: bytes, is_binary: bool) -> None:
        """A message from the hub (its first piece is enough)."""
        link = self._link
        replay = self._replay
        if replay is not None:
            replay.seen(message_date(payload, is_binary, link.ide.websocket_protocol_in_use))
            if replay.counting:
                self._done.reset(REPLAY_SETTLE)
            else:
                self._log_back()
        # the header is at the start; a large output need not stay in memory for it
        kept = payload if len(payload) <= _HEADER_ROOM else payload[:_HEADER_ROOM]
        self._last = (kept, is_binary, link.relay.reactor.seconds())

    def back(self, seconds: float, sent: int) -> None:
        """The socket is back: count the replay, then say so."""
        link = self._link
        self._back_line = (seconds, sent)
        reference = None
        if self._last is not None:
            payload, is_binary, wall = self._last
            date = message_date(payload, is_binary, link.ide.websocket_protocol_in_use)
            reference = (date, wall) if date is not None else None
        reactor = link.relay.reactor
        self._replay = ReplayCount(reference, reactor.seconds())
        self._done = reactor.callLater(REPLAY_SETTLE, self._log_back)

    def flush(self) -> None:
        """Say the pending "reconnected" line now (the socket went, or went down again)."""
        if self._back_line is not None:
            self._log_back()

    def _log_back(self) -> None:
        if self._done is not None and self._done.active():
            self._done.cancel()
        self._done = None
        replay, self._replay = self._replay, None
        if self._back_line is None:
            return
        seconds, sent = self._back_line
        self._back_line = None
        log_reconnected(self._link.uri, seconds, sent, replay)
