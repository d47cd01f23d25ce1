"""
One relayed WebSocket: the IDE's socket and the proxy's socket on the hub (:mod:`jds.relay_frames`),
opened in the order the module docstring of :mod:`jds.relay` explains, with the queues, closes and
flow control between them. When the hub side of a kernel, terminal or event socket is lost without a
close frame, the :class:`~jds.relay_outage.HubOutage` takes over until it is back or given up.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from autobahn.util import encode_truncate
from autobahn.websocket.protocol import WebSocketProtocol
from autobahn.websocket.types import ConnectingRequest, ConnectionDeny
from twisted.internet.defer import CancelledError, Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure

from jds.hub import looks_stopped, server_not_running
from jds.logs import clip, quoted
from jds.refusal import Refusal
from jds.relay_frames import HubSide, IdeSide, PeerReading, Side
from jds.relay_outage import HubOutage, ReplayWatch, log_reconnected, loss_reason

__all__ = ["SERVER_MESSAGE_LIMIT", "SHUTTING_DOWN", "TOKEN_REPLACED", "Link"]

log = Logger(namespace="jds.relay")

# jupyter_server's (tornado's) default websocket_max_message_size: a larger message makes it drop the socket.
SERVER_MESSAGE_LIMIT = 10 << 20

_OPEN = WebSocketProtocol.STATE_OPEN
_CONNECTING = WebSocketProtocol.STATE_CONNECTING
SHUTTING_DOWN = Refusal(503, "jupyter-dev-server is shutting down.", "shutting-down")
# What opened a socket (the local token, or a login that came from it) no longer lets anyone in.
TOKEN_REPLACED = Refusal(
    403,
    "The local token was replaced (jupyter-dev-server rotate-token); connect again with the new URL.",
    "token-replaced",
)


@dataclass
class _Direction:
    """Messages waiting for one side to open (``None`` once it has, or is gone), and whether it is gone."""

    queued: list[tuple[bytes, bool]] | None = field(default_factory=list)
    gone: bool = False


class _Opening:
    """
    The first half of a :class:`Link`: the IDE's handshake is answered with the hub's verdict (its
    subprotocol, or its refusal as a Jupyter-style error), and a hub that says the server is not
    running gets it started once (``ServerStarter.recover``) while the IDE's handshake waits.
    """

    relay: Any
    uri: str
    ide: IdeSide | None
    hub: HubSide | None
    outage: HubOutage | None
    _upstream: ConnectingRequest
    _handshake: Deferred | None
    _connecting: Deferred | None
    _to_ide: _Direction
    _to_hub: _Direction
    recovered: bool  # one server start per socket, then the hub's answer stands
    waiting_for_server: bool

    def maybe_done(self) -> None:
        raise NotImplementedError


    def start(self, offered: list[str]) -> Deferred:
        """Open the hub socket; the returned Deferred answers the IDE's handshake."""
        self._upstream.protocols = list(offered)
        handshake = self._handshake = Deferred()
        self._connect()
        return handshake  # may have failed already: the endpoint can fail synchronously

    def _connect(self) -> None:
        factory = self.relay.hub_factory(self, self._upstream.protocols)
        connecting = self._connecting = self.relay.policy.endpoint().connect(factory)
        connecting.addCallbacks(self._connected, self._connect_failed)

    def upstream_request(self) -> ConnectingRequest:
        return self._upstream

    def _connected(self, protocol: object) -> None:
        self._connecting = None

    def _connect_failed(self, failure: Failure) -> None:
        self._connecting = None
        self._to_hub.gone = True
        if self.outage is not None and not failure.check(CancelledError):
            self.outage.retry_later(self.relay.policy.explain(failure).message)
            return
        if not failure.check(CancelledError):
            self._deny(self.relay.policy.explain(failure))
        self.maybe_done()

    def hub_refused(self, hub: HubSide, why: str) -> None:
        """The hub answered the handshake with something other than a valid 101."""
        line = getattr(hub, "http_status_line", "") or ""
        parts = line.split()
        status = int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else 101
        if self.outage is not None:
            self.outage.verdict = hub
            location = (getattr(hub, "http_headers", {}) or {}).get("location")
            self.outage.refused(why, status, location.encode("latin-1") if location else None)
            return
        starter = self.relay.starter
        if starter is None or self.recovered:
            self._refused(hub, why, status)
            return
        # The hub says the server may not be running: start it (one spawn for all waiting requests),
        # then open the hub side again while the IDE's handshake waits.
        self.recovered = self.waiting_for_server = True
        location = (getattr(hub, "http_headers", {}) or {}).get("location")
        # pass-through mode starts the server with the IDE's token, the one this socket carries
        token = next((v for k, v in self._upstream.headers.items() if k.lower() == "authorization"), None)
        recovering = starter.recover(status, location.encode("latin-1") if location else None, authorization=token)
        recovering.addCallbacks(lambda stopped: self._recovery_over(stopped, hub, why, status), self._not_recovered)

    def _recovery_over(self, stopped: bool, hub: HubSide, why: str, status: int) -> None:
        if stopped:
            self._reconnect()
        else:
            self.waiting_for_server = False
            self._refused(hub, why, status)

    def _not_recovered(self, failure: Failure) -> None:
        self.waiting_for_server = False
        self._deny(failure.value)
        self.maybe_done()

    def _reconnect(self) -> None:
        self.waiting_for_server = False
        if self.outage is not None:
            self.outage.attempt()
            return
        if self._to_ide.gone or self._handshake is None:
            self.maybe_done()
            return
        self._to_hub.gone = False
        self.hub = None
        self._connect()

    def _refused(self, hub: HubSide, why: str, status: int) -> None:
        path = self._upstream.resource.partition("?")[0]
        if status == 101:
            self._deny(Refusal(
                502,
                f"The hub's WebSocket handshake for {path} was invalid: {why}.",
                "hub-bad-handshake",
            ))
        elif 300 <= status < 400:
            where = (getattr(hub, "http_headers", {}) or {}).get("location", "elsewhere")
            if self.relay.starter is None and looks_stopped(status, where.encode("latin-1"), self.relay.target):
                self._deny(server_not_running(self.relay.target))
                return
            self._deny(Refusal(
                503,
                f"The hub redirected the WebSocket for {path} to {where}: your server "
                "on the hub is probably not running.",
                "server-not-running",
                hint="Start your server from the hub's home page, then reconnect.",
            ))
        else:
            phrase = " ".join((getattr(hub, "http_status_line", "") or "").split()[2:])
            self._deny(Refusal(
                status,
                f"The hub refused the WebSocket for {path}: {status} {phrase}.",
                "hub-refused",
            ))

    def _deny(self, refusal: Refusal) -> None:
        handshake, self._handshake = self._handshake, None
        if handshake is None or self.ide is None or self.ide.state != _CONNECTING:
            return
        log.warn(
            "WebSocket {uri} -> {status}: {message}{hint}",
            uri=quoted(self.uri),
            status=refusal.status,
            message=clip(refusal.message),
            hint=f" {clip(refusal.hint)}" if refusal.hint else "",
        )
        self.ide.deny_reason = refusal.reason
        handshake.errback(ConnectionDeny(refusal.status, refusal.message))

    def _hub_lost_during_handshake(self) -> Refusal:
        hub = self.hub
        if hub is not None and hub.wasOpenHandshakeTimeout:
            waited = f"{hub.openHandshakeTimeout:g} s"
            message = f"The hub did not complete the WebSocket handshake within {waited}."
            return Refusal(504, message, "hub-timeout", hint="Is the hub overloaded?")
        if self.relay.shutting_down:
            return SHUTTING_DOWN
        failure = (hub.lost_reason if hub is not None else None) or Failure(ConnectionError())
        return self.relay.policy.explain(failure)

    def _abort_hub_handshake(self) -> None:
        if self._connecting is not None:
            self._connecting.cancel()
        elif self.hub is not None and self.hub.state == _CONNECTING:
            self.hub.dropConnection(abort=True)


class Link(_Opening):
    """
    One IDE socket and its hub socket: handshake order, queues, closes and flow control. For a
    socket :func:`~jds.reconnect.reconnectable` (``kind``):

    - *open*: both sides relay. The hub side is lost without a close frame (reset, FIN, TLS
      error, ping timeout) while the IDE's is open: -> *down*, ``outage`` set (a
      :class:`HubOutage`, which says what *down* and *reconnecting* do). Everything else ends the
      pair as the table in :mod:`jds.relay` says.
    - back to *open* when an attempt's hub side opens: held messages are sent, in order, then the
      relay carries on; for a kernel, ``replay`` (:class:`ReplayWatch`) tells how many messages
      the server replayed.
    """

    def __init__(self, relay: Any, upstream: ConnectingRequest, uri: str, kind: str | None = None) -> None:
        self.relay = relay
        self._upstream = upstream
        self.uri = uri
        self.kind = kind
        self.ide: IdeSide | None = None
        self.hub: HubSide | None = None
        self._handshake: Deferred | None = None
        self._connecting: Deferred | None = None
        self._to_ide = _Direction()
        self._to_hub = _Direction()
        self._queued_bytes = 0
        self._paused: Side | None = None  # a sender not read until its peer opens
        self.last_to_hub = 0  # size of the last message sent to the hub, to explain a drop
        self.largest = 0  # of the messages relayed either way
        self.counted = False
        self.recovered = False  # one server start per socket, then the hub's answer stands
        self.waiting_for_server = False
        # reconnecting (see the class docstring)
        self.established = False  # both sides were open once: a later hub loss may be an outage
        self.outage: HubOutage | None = None
        self.replay = ReplayWatch(self) if kind == "kernel" else None
        # what the IDE sends to the hub is kept until its message ends, up to this many bytes (see
        # holding); None: not kept. Read once per message, so worked out once per socket.
        reconnect = relay.reconnect
        self.keep_limit: int | None = reconnect.max_held if kind is not None and reconnect.enabled else None

    def opened(self, side: Side) -> None:
        if side is self.hub:
            self.relay.hub_link.answered()
            handshake, self._handshake = self._handshake, None
            if handshake is not None and self.ide is not None and self.ide.state == _CONNECTING:
                handshake.callback(self.hub.websocket_protocol_in_use)
        if side is self.hub and self.outage is not None:
            self._back()
            return
        direction = self._toward(side)
        queued, direction.queued = direction.queued or [], None
        for payload, is_binary in queued:
            side.sendMessage(payload, is_binary)  # type: ignore[attr-defined]
        self._queued_bytes = 0
        if self._paused is not None and self._paused is not side:
            paused, self._paused = self._paused, None
            paused.transport.resumeProducing()  # type: ignore[attr-defined]
        if side is self.ide and self.hub is not None and self.hub.state == _OPEN:
            self._couple()
            self.established = True
            self.counted = self.relay.stats is not None
            if self.counted:
                self.relay.stats.websocket_opened()
            log.info(
                "WebSocket {uri} open (subprotocol {protocol})",
                uri=quoted(self.uri),
                protocol=clip(str(self.ide.websocket_protocol_in_use)),
            )

    # Traffic

    def _peer(self, side: Side) -> Side | None:
        return self.hub if side is self.ide else self.ide

    def _toward(self, side: Side) -> _Direction:
        """The state kept for ``side``: any hub socket but the IDE's is the hub side."""
        return self._to_ide if side is self.ide else self._to_hub

    def _couple(self) -> None:
        """Each side's transport pauses reading from the other (see :class:`PeerReading`)."""
        self.ide.transport.registerProducer(PeerReading(self.hub.transport), True)  # type: ignore[union-attr]
        self.hub.transport.registerProducer(PeerReading(self.ide.transport), True)  # type: ignore[union-attr]

    def through(self, side: Side) -> Side | None:
        """
        The peer a message from ``side`` may go to frame by frame as it arrives: one that is open
        with nothing queued or held before it. ``None``: the message is collected whole for
        :meth:`forward` (the peer not open yet, the hub link down).
        """
        if side is self.ide:
            if self.outage is not None:
                return None
            peer, toward = self.hub, self._to_hub
        else:
            peer, toward = self.ide, self._to_ide
        if peer is None or toward.queued is not None or toward.gone or peer.state != _OPEN:  # type: ignore[attr-defined]
            return None
        return peer

    def holding(self, side: Side) -> bool:
        """The hub link is down and ``side``'s messages are held for the next one."""
        return side is self.ide and self.outage is not None

    def relayed(self, side: Side, size: int, is_binary: bool, first: bytes) -> None:
        """A message went through frame by frame; ``first`` is its first piece."""
        if size > self.largest:
            self.largest = size
        if side is self.hub and self.replay is not None:
            self.replay.note(first, is_binary)

    def message_rerouted(self, side: Side, size: int) -> None:
        log.info(
            "WebSocket {uri}: the hub link was lost {size} bytes into a message from the IDE; "
            "the server never had all of it, so it goes whole to the next link.",
            uri=quoted(self.uri), size=size,
        )

    def message_cut(self, side: Side, size: int) -> None:
        peer = "hub" if side is self.ide else "IDE"
        log.warn(
            "WebSocket {uri}: a {size}-byte message from the {role} was dropped: the {peer} side "
            "closed in the middle of it.",
            uri=quoted(self.uri), size=size, role=side.role, peer=peer,
        )

    def too_much_held(self) -> None:
        if self.outage is not None:
            self.outage.too_much_held()

    def forward(self, side: Side, payload: bytes, is_binary: bool) -> None:
        if side is self.ide and self.outage is not None:
            self.outage.hold(payload, is_binary)
            return
        if side is self.hub and self.replay is not None:
            self.replay.note(payload, is_binary)
        peer = self._peer(side)
        toward = self._to_hub if side is self.ide else self._to_ide
        self.largest = max(self.largest, len(payload))
        if getattr(peer, "state", None) == _OPEN:
            if peer is self.hub:
                self.last_to_hub = len(payload)
            peer.sendMessage(payload, is_binary)  # type: ignore[union-attr]
        elif toward.queued is not None and not toward.gone:
            toward.queued.append((payload, is_binary))
            self._queued_bytes += len(payload)
            if self._queued_bytes > self.relay.max_message and self._paused is None:
                self._paused = side
                side.transport.pauseProducing()  # type: ignore[attr-defined]

    # Closing

    def close_received(self, side: Side) -> None:
        code, reason = side.remoteCloseCode, side.remoteCloseReason  # type: ignore[attr-defined]
        if self._close(self._peer(side), code, reason):
            log.info(
                "WebSocket {uri}: the {role} closed it {how}.",
                uri=quoted(self.uri),
                role=side.role,
                how=f"with {code}{f' ({clip(reason)})' if reason else ''}" if code is not None else "without a close code",
            )

    def broken(self, side: Side, code: int, reason: str) -> None:
        peer = self._peer(side)
        peer_role = "hub" if side is self.ide else "IDE"
        log.warn(
            'failing WebSocket connection (code={code}): "{reason}" from the {role} on {uri}; '
            "the {peer} gets 1011.",
            code=code,
            reason=clip(reason),
            role=side.role,
            uri=quoted(self.uri),
            peer=peer_role,
        )
        self._close(peer, 1011, f"The {side.role} broke the WebSocket protocol.")

    def hub_proxy_error(self, hub: HubSide, status: str) -> None:
        """The hub's proxy reported an error inside the socket (see :meth:`HubSide._fail_connection`)."""
        size = self.last_to_hub
        if size > SERVER_MESSAGE_LIMIT:
            # the close reason has room for 123 bytes; the log line says the rest
            code, reason = 1009, (
                f"The server on the hub refused a {size / (1 << 20):.0f} MiB message: Jupyter servers "
                "take up to 10 MiB (websocket_max_message_size)."
            )
        else:
            code, reason = 1011, "The server on the hub dropped the socket."
        log.warn(
            "WebSocket {uri}: the hub's proxy wrote {status!r} into the socket: the server behind it "
            "dropped the connection (last message to it: {size} bytes; a Jupyter server drops one over "
            "its websocket_max_message_size, 10 MiB unless configured otherwise); the IDE gets {code}.",
            uri=quoted(self.uri), status=clip(status), size=size, code=code,
        )
        self._close(self.ide, code, reason)

    def lost(self, side: Side) -> None:
        if side is not self.ide and (self.waiting_for_server or side is not self.hub):
            # a refused handshake: another hub socket follows once the server runs
            self._to_hub.gone = True
            return
        if side is not self.ide and self.outage is not None:
            # an attempt that did not get through; a refusal was answered in hub_refused
            self._to_hub.gone = True
            if side is not self.outage.verdict:
                self.outage.retry_later(loss_reason(side))
            return
        # the peer has frames of a message from this side, but not its end
        mid_message = side._through is not None and side._through is self._peer(side) and side._opcode == 0
        if side is self.hub and self._may_reconnect() and not mid_message:
            self._hub_dropped(loss_reason(side))
            return
        direction = self._toward(side)
        direction.gone = True
        direction.queued = None
        if side is self.ide:
            self._handshake = None
            self._end_outage("abandoned")
            self._abort_hub_handshake()
        elif self._handshake is not None:
            self._deny(self._hub_lost_during_handshake())
        if self.relay.shutting_down:
            self._close(self._peer(side), 1001, "jupyter-dev-server is shutting down.")
        elif mid_message:
            # the peer has part of a message that can never be finished: its socket cannot go on
            self._close(self._peer(side), 1011, f"The {side.role} connection was lost in the middle of a message.")
        else:
            self._close(self._peer(side), 1011, f"The {side.role} connection was lost.")
        self.maybe_done()

    def _close(self, side: Side | None, code: int | None, reason: str | None) -> bool:
        """Send ``side`` a close frame, unless it is closing already; see the module's table."""
        if side is None or side.state != _OPEN:  # type: ignore[attr-defined]
            return False
        # It may have been paused for the peer's sake; it must read the close reply.
        side.transport.resumeProducing()  # type: ignore[attr-defined]
        encoded = encode_truncate(reason, 123) if code is not None and reason else None
        side.sendCloseFrame(code=code, reasonUtf8=encoded, isReply=False)  # type: ignore[attr-defined]
        return True

    def shut_down(self, why: Refusal = SHUTTING_DOWN, code: int = 1001, to_hub: int = 1001) -> None:
        """End the pair now: the proxy shuts down, or the local token that opened it was replaced."""
        if self.outage is not None:
            self._end_outage("abandoned")
            self._abort_hub_handshake()
        if self._handshake is not None:
            self._deny(why)
            self._abort_hub_handshake()
        self._close(self.ide, code, why.message)
        self._close(self.hub, to_hub, why.message)

    # The outage (jds.relay_outage)

    def _may_reconnect(self) -> bool:
        return (
            self.kind is not None
            and self.established
            and self.relay.reconnect.enabled
            and not self.relay.shutting_down
            and self.ide is not None
            and self.ide.state == _OPEN
        )

    def ide_open(self) -> bool:
        return self.ide is not None and self.ide.state == _OPEN

    def _hub_dropped(self, reason: str) -> None:
        """*open* -> *down*: keep the IDE's socket, unhook flow control, start the attempts."""
        self.outage = outage = HubOutage(self, reason)
        self.recovered = False  # a server found stopped now may be started once more
        self._to_hub.gone = True
        if self.replay is not None:
            self.replay.flush()
        ide = self.ide
        assert ide is not None
        ide.transport.unregisterProducer()  # type: ignore[attr-defined]
        ide.transport.resumeProducing()  # type: ignore[attr-defined]
        self.relay.link_down(self, reason)
        outage.retry_later(reason)

    def connect_again(self) -> None:
        """An attempt: a new hub socket on the same URL."""
        self.hub = None
        self._to_hub.gone = False
        self._connect()

    def give_up(self, reason: str) -> None:
        """End the outage with 1011 and ``reason`` to the IDE (and one log line)."""
        if self.outage is None:
            return
        log.warn("WebSocket {uri} closed with 1011: {reason}", uri=quoted(self.uri), reason=clip(reason))
        self._end_outage("gave up")
        self._abort_hub_handshake()
        self._to_hub.gone = True
        self._close(self.ide, 1011, reason)
        self.maybe_done()

    def _end_outage(self, outcome: str = "abandoned") -> None:
        outage, self.outage = self.outage, None
        if outage is not None:
            outage.end(outcome)
        if self.replay is not None:
            self.replay.flush()

    def _back(self) -> None:
        """*reconnecting* -> *open*: send what was held, couple flow control again, count."""
        outage, self.outage = self.outage, None
        assert outage is not None and self.hub is not None and self.ide is not None
        frames = outage.take_held()
        for payload, is_binary in frames:
            self.hub.sendMessage(payload, is_binary)
        self._couple()
        seconds = outage.end("back")
        if self.replay is not None:
            self.replay.back(seconds, len(frames))
        else:
            log_reconnected(self.uri, seconds, len(frames), None)

    def maybe_done(self) -> None:
        if self.waiting_for_server:
            return
        hub_gone = self._to_hub.gone or (self.hub is None and self._connecting is None)
        if self._to_ide.gone and hub_gone:
            self.relay.link_done(self)

