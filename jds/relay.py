"""
The WebSocket side of the proxy: each IDE socket is spliced, message by message, to a socket the
proxy opens on the same path of the user's server on the hub.

Why it is built the way it is:

- The IDE's handshake is answered only once the hub has answered its own, so the IDE sees the hub's
  verdict: the subprotocol the hub chose (Node's ``ws`` fails a socket whose offered subprotocol is
  not echoed) or the status it refused with. The IDE-facing ``onConnect`` returns a Deferred that
  :class:`_Link` fires from the hub side's ``onOpen`` or errbacks with ``ConnectionDeny``.
- The hub side is an autobahn client connected through :meth:`HubTLSPolicy.endpoint`; autobahn's
  ``connectWS`` would use an unverified TLS context. Its ``Host`` is ``target.netloc`` and its
  ``Origin`` ``target.origin``, so jupyter_server's "Origin host == Host" check passes.
- Frames go on as they arrive, in order, while the other side is open: a frame read whole (every
  kernel message) leaves as the same frame, in one write; a frame read in pieces leaves as one
  complete frame per piece (RFC 6455 lets an intermediary split frames), so that a close frame or a
  ping can always follow and no message is ever held whole on its way through. Whatever arrives for
  a side that is not open yet, or while the hub link is down, is collected into whole messages and
  queued (or held) until it is. A message the hub link breaks in the middle of: from the IDE, it
  goes whole to the next link (the server never had all of it, so it acts on it once); to the IDE,
  which has part of it and could never read another message, it ends the socket with 1011.
- Flow control: each side's transport has the *other* socket registered as its producer, so a slow
  IDE stops the proxy reading from the hub (and the reverse) instead of buffering without bound.

Close codes pass through unchanged, which is why :meth:`_Link._close` uses autobahn's
``sendCloseFrame`` rather than ``sendClose`` (which only takes 1000 and 3000-4999: an application's
codes, while a relay repeats codes its peer already sent on the wire, and autobahn has checked them):

=============================================================  ==========================================
received from one side                                         sent to the other
=============================================================  ==========================================
close frame, code C (1000-1003, 1007-1013, 3000-4999), reason  C and the reason (cut to 123 bytes)
close frame without a code                                     close frame without a code (seen as 1005)
IDE socket lost without a close frame (1006), ping timeout     1011 "The IDE connection was lost."
hub socket lost so, other sockets or ``--reconnect-window 0``  1011 "The hub connection was lost."
hub socket lost so, kernel/terminal/event socket               nothing: the proxy reconnects (below)
 ... in the middle of a message to the IDE                     1011 "The hub connection was lost in the
                                                               middle of a message."
 ... still unreachable after ``--reconnect-window``            1011 "The hub was unreachable for 15 min
                                                               0 s; jupyter-dev-server gave up
                                                               (--reconnect-window)."
 ... more than ``--reconnect-buffer`` held from the IDE        1011 "The hub was unreachable for 42.0 s
                                                               and more than 64 MiB from the IDE
                                                               waited for it (--reconnect-buffer)."
 ... the kernel is gone (404 twice)                            1011 "The kernel is gone (404 after a
                                                               3.2 s outage): shut down, culled or the
                                                               server restarted."
 ... the server is stopped, or another refusal                 1011 saying so (managed mode: the server
                                                               is started and the socket reconnects)
the proxy shuts down                                           1001 to both sides
=============================================================  ==========================================

A kernel, terminal or event socket whose hub side is lost without a close frame (reset, FIN, TLS
error, or a ping unanswered for ``--ping-interval`` + 15 s) stays open on the IDE's side while the
proxy reconnects: see :class:`_Link` and :mod:`jds.reconnect`. After a 1011 for a gone kernel
the IDE's own reconnect meets the hub's 404, as with a plain server, and it shows the kernel as
dead.

Once a side has been sent a close frame, its connection ends with a FIN rather than autobahn's reset,
so that the close frame stays readable for an IDE that was busy (:meth:`_Side.dropConnection`).
"""

from __future__ import annotations

import ctypes
import gc
import time
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote_from_bytes

import txaio
from autobahn.twisted.websocket import (
    WebSocketClientFactory,
    WebSocketClientProtocol,
    WebSocketServerFactory,
    WebSocketServerProtocol,
)
from autobahn.util import encode_truncate
from autobahn.websocket.protocol import WebSocketProtocol
from autobahn.websocket.types import ConnectingRequest, ConnectionDeny
from twisted.internet.defer import CancelledError, Deferred, succeed
from twisted.internet.interfaces import IPushProducer
from twisted.internet.protocol import connectionDone
from twisted.logger import Logger
from twisted.protocols.policies import ProtocolWrapper
from twisted.python.failure import Failure
from twisted.web.http import RESPONSES
from twisted.web.server import NOT_DONE_YET, Request
from zope.interface import implementer

from jds import __version__
from jds.auth import Credentials
from jds.errors import Refusal, error_body, render_refusal
from jds.guard import origin_refusal
from jds.hub import ServerStarter, looks_stopped, server_not_running
from jds.paths import HubTarget, authority, redact_query, split_token, upstream_request_headers
from jds.reconnect import (
    HeldFrames,
    Outage,
    ReconnectPolicy,
    ReplayCount,
    backoff,
    describe_duration,
    message_date,
    reconnectable,
    with_session_id,
)
from jds.stats import Stats
from jds.tls import HubTLSPolicy

__all__ = ["HANDSHAKE_TIMEOUT", "MAX_MESSAGE_BYTES", "WebSocketRelay"]

log = Logger(namespace="jds.relay")

# A hub that has to wake a sleeping server or a busy proxy can take a while to answer.
HANDSHAKE_TIMEOUT = 60.0
# Notebooks move outputs of tens of MB; a larger message closes the socket with 1009
# (--max-message-size). The same bound holds messages queued for a side that is not open yet; beyond
# it the sender is not read until that side opens (backpressure).
MAX_MESSAGE_BYTES = 256 << 20
# A frame larger than what one read brings goes on in complete frames of at least this size.
FRAME_PIECE = 4 << 20
# jupyter_server's (tornado's) default websocket_max_message_size: a larger message makes it drop the socket.
SERVER_MESSAGE_LIMIT = 10 << 20
# After a socket that carried a message this large, memory is handed back at once (gc.collect).
LARGE_MESSAGE = 16 << 20
# How long a shutting-down proxy waits for close handshakes before the reactor stops.
SHUTDOWN_GRACE = 3.0
# The hub side's pong deadline: with the default 30 s ping interval a silent link (no FIN, no RST)
# is noticed within 45 s (a ping at most 30 s after the last answered one, then 15 s for its pong).
HUB_PONG_TIMEOUT = 15.0
# After a reconnect, the replay count is final at the first new message, or this long after the
# last replayed one (the "reconnected" log line waits for it).
REPLAY_SETTLE = 2.0
# What is kept of the last kernel message to read its header.date from (see ReplayCount).
_HEADER_ROOM = 64 * 1024

_OPEN = WebSocketProtocol.STATE_OPEN
_CONNECTING = WebSocketProtocol.STATE_CONNECTING
_SHUTTING_DOWN = Refusal(503, "jupyter-dev-server is shutting down.", "shutting-down")
# Printable ASCII stays as it is; anything else is percent-encoded for the request line.
_URI_SAFE = bytes(range(0x21, 0x7F))
# Written by autobahn itself for the hub hop, or describing only the IDE's hop.
_NOT_FORWARDED = frozenset(
    {
        b"host",
        b"origin",
        b"user-agent",
        b"pragma",
        b"cache-control",
        b"content-length",
        b"sec-websocket-key",
        b"sec-websocket-version",
        b"sec-websocket-extensions",
        b"sec-websocket-protocol",
        b"sec-websocket-accept",
    }
)


def _options(
    ping_interval: float, handshake_timeout: float, max_message: int = MAX_MESSAGE_BYTES,
    pong_timeout: float | None = None,
) -> dict[str, Any]:
    """autobahn options shared by both sides."""
    return {
        "openHandshakeTimeout": handshake_timeout,
        "closeHandshakeTimeout": 5,
        "autoPingInterval": ping_interval,
        "autoPingTimeout": ping_interval if pong_timeout is None else pong_timeout,
        "maxFramePayloadSize": max_message,
        "maxMessagePayloadSize": max_message,
        "echoCloseCodeReason": True,
        # a peer that breaks the protocol hears why (1002, 1007, 1009) instead of a bare TCP drop
        "failByDrop": False,
        "tcpNoDelay": True,
    }


def _give_back_memory() -> None:
    """
    Collect the cycles, then return freed heap to the system: the message's pieces (64 KiB reads,
    16 KiB TLS records) are below glibc's mmap threshold, so they were taken from the heap, which
    glibc does not shrink on its own while anything above them is still in use.
    """
    gc.collect()
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


@implementer(IPushProducer)
class _PeerReading:
    """
    Registered on one side's transport as the producer of what is written to it: when that
    transport's buffer fills, reading from the *other* socket pauses. ``stopProducing`` is ignored:
    when a socket goes, the relay closes the other one with a close frame, which a transport
    tearing down its producer would lose.
    """

    def __init__(self, transport: Any) -> None:
        self._transport = transport

    def pauseProducing(self) -> None:
        self._transport.pauseProducing()

    def resumeProducing(self) -> None:
        self._transport.resumeProducing()

    def stopProducing(self) -> None:
        pass


class _Side:
    """What both autobahn protocols report to their :class:`_Link`."""

    link: _Link
    role: str

    _backstop: Any = None

    def onOpen(self) -> None:
        self.link.opened(self)

    def dropConnection(self, abort: bool = False) -> None:
        """
        autobahn resets the TCP connection when a close handshake it started ends or times out,
        and a reset makes the peer's kernel throw away what the peer has not read yet, our close
        frame included: an IDE busy for a few seconds, or one that sent a bad close frame, would
        see "connection reset" instead of the code that says why. Once our close frame is on its
        way the connection ends with a FIN instead; the abort follows only if that has not
        finished within another ``closeHandshakeTimeout`` (a peer that reads nothing).
        """
        if abort and self.state == WebSocketProtocol.STATE_CLOSING:  # type: ignore[attr-defined]
            abort = False
            self._backstop = txaio.call_later(self.closeHandshakeTimeout, self.transport.abortConnection)  # type: ignore[attr-defined]
        super().dropConnection(abort)  # type: ignore[misc]

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self._backstop is not None and self._backstop.active():
            self._backstop.cancel()
        self._backstop = None
        super().connectionLost(reason)  # type: ignore[misc]

    def _fail_connection(self, code: int = 1001, reason: str = "going away") -> None:
        """
        autobahn's, with the log line said once by the relay and the other side told (1011): a
        peer that breaks the protocol (bad frame, invalid UTF-8, oversized message) ends the pair.
        """
        if self.state == WebSocketProtocol.STATE_CLOSED:  # type: ignore[attr-defined]
            return
        self.link.broken(self, code, reason)
        self.failedByMe = True
        if self.state != WebSocketProtocol.STATE_CLOSING:  # type: ignore[attr-defined]
            self.sendCloseFrame(code=code, reasonUtf8=encode_truncate(reason, 123), isReply=False)  # type: ignore[attr-defined]
        else:
            self.dropConnection(abort=False)  # type: ignore[attr-defined]

    # autobahn formats a debug line (hltype/hlval: qualified names and ANSI colours) on every
    # read and every write before its logger drops it: 14 % of the relay's CPU per round trip.
    def dataReceived(self, data: bytes) -> None:
        self._dataReceived(data)  # type: ignore[attr-defined]

    def sendData(self, data: bytes, sync: bool = False, chopsize: int | None = None) -> None:
        if sync or chopsize or self.send_queue or self.state != _OPEN or self.logOctets:  # type: ignore[attr-defined]
            super().sendData(data, sync, chopsize)  # type: ignore[misc]
            return
        self.transport.write(data)  # type: ignore[attr-defined]
        self.trafficStats.outgoingOctetsWireLevel += len(data)  # type: ignore[attr-defined]

    # Frame-level relaying. A message whose peer is open goes on frame by frame as it arrives; one
    # that must wait (the peer not open yet, the hub link down) is collected whole, as autobahn does.
    _through: _Side | None = None  # the side this message's frames go to as they arrive
    _opcode = 0  # of the next frame sent on: the message's type, then continuation (0)
    _first: bytes = b""  # the message's first piece, for the kernel's replay count
    # Of a message going to the hub on a socket that reconnects, the pieces sent so far: if the link
    # breaks before its end, the server has seen none of it, and it goes whole to the next link.
    _sent: list[bytes] | None = None
    _sent_size = 0
    _unkept = False  # ... except that it outgrew --reconnect-buffer
    _cut = False  # the rest of this message has nowhere to go
    _left = 0  # bytes of the current frame still to come
    _pieces: list[bytes] | None = None  # read of it, not sent on yet (up to FRAME_PIECE)
    _pieces_size = 0
    _fin = False  # whether it ends its message

    def onMessageBegin(self, isBinary: bool) -> None:
        super().onMessageBegin(isBinary)  # type: ignore[misc]
        through = self._through = self.link.through(self)
        if through is not None:
            self._opcode = 2 if isBinary else 1
            self._first = b""
            self._pieces, self._pieces_size = None, 0
            if self.link.keeps(self):
                self._sent, self._sent_size, self._unkept = [], 0, False

    def onMessageFrameBegin(self, length: int) -> None:
        super().onMessageFrameBegin(length)  # type: ignore[misc]  # the size limits (1009)
        through = self._through
        if through is not None:
            self._left, self._fin = length, self.current_frame.fin  # type: ignore[attr-defined]
            if through is self.link.hub:
                self.link.last_to_hub = self.message_data_total_length  # type: ignore[attr-defined]

    def onMessageFrameData(self, payload: bytes) -> None:
        """
        A frame read whole (every kernel message) goes on unchanged, header and payload in one write.
        A larger one goes on in pieces of ``FRAME_PIECE``, each a complete frame (RFC 6455 lets an
        intermediary split frames), so that a close frame or a ping can always follow, also when the
        message cannot be finished; pieces this large keep the frame count low for clients that
        join fragments by copying (websocket-client's ``+=``: quadratic in the number of frames).
        """
        if self.autoPingTimeoutCall is not None:  # type: ignore[attr-defined]
            # Data arriving answers the ping as well as a pong: autobahn only counts a finished
            # frame, and a 100 MiB output takes longer than the pong timeout on a slow link.
            self._cancelAutoPingTimeoutCall()  # type: ignore[attr-defined]
        through = self._through
        if through is None:
            if not self._cut:
                super().onMessageFrameData(payload)  # type: ignore[misc]
            return
        if self.failedByMe or through.state != _OPEN:  # type: ignore[attr-defined]
            self._detour(payload)
            return
        left = self._left = self._left - len(payload)
        if not self._first:
            self._first = payload
        pieces = self._pieces
        if left and self._pieces_size + len(payload) < FRAME_PIECE:
            if pieces is None:
                pieces = self._pieces = []
            pieces.append(payload)
            self._pieces_size += len(payload)
            return
        if pieces:
            pieces.append(payload)
            payload = b"".join(pieces)
            self._pieces, self._pieces_size = None, 0
        through.sendFrame(self._opcode, payload, self._fin and not left)  # type: ignore[attr-defined]
        self._opcode = 0
        sent = self._sent
        if sent is not None:
            self._sent_size += len(payload)
            if self._sent_size <= self.link.relay.reconnect.max_held:
                sent.append(payload)
            else:  # could not be held for the next link anyway (--reconnect-buffer)
                self._sent, self._unkept = None, True

    def _detour(self, payload: bytes) -> None:
        """The peer went in the middle of this message: collect it whole if it may go to the next hub link."""
        sent, self._through, self._sent = self._sent, None, None
        pieces, self._pieces, self._pieces_size = self._pieces or [], None, 0
        holding = not self.failedByMe and self.link.holding(self)  # type: ignore[attr-defined]
        if holding and sent is not None:
            self.message_data = [*sent, *pieces, payload]  # type: ignore[attr-defined]
            self.link.message_rerouted(self, sum(map(len, self.message_data)))  # type: ignore[attr-defined]
            return
        self._cut = True
        self.message_data = None  # type: ignore[attr-defined]
        if holding and self._unkept:
            self.link.too_much_held()

    def onMessageFrameEnd(self) -> None:
        if self._through is None and not self._cut:
            super().onMessageFrameEnd()  # type: ignore[misc]
        self.frame_data = None  # type: ignore[attr-defined]

    def onMessageEnd(self) -> None:
        """autobahn's, without its ``message`` event (a Deferred per message that nobody listens to)."""
        through, self._through = self._through, None
        data, self.message_data = self.message_data, None  # type: ignore[attr-defined]
        if through is not None:
            self._sent = None
            self.link.relayed(self, self.message_data_total_length, self.message_is_binary, self._first)  # type: ignore[attr-defined]
            self._first = b""
        elif self._cut:
            self._cut = False
            if not self.failedByMe:  # type: ignore[attr-defined]
                self.link.message_cut(self, self.message_data_total_length)  # type: ignore[attr-defined]
        elif not self.failedByMe and data is not None:  # type: ignore[attr-defined]
            self.link.forward(self, b"".join(data), self.message_is_binary)  # type: ignore[attr-defined]

    def onCloseFrame(self, code: int | None, reasonRaw: bytes | None) -> bool | None:
        stop = super().onCloseFrame(code, reasonRaw)  # type: ignore[misc]
        if not stop:
            self.link.close_received(self)
        return stop

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        self.link.lost(self)


class _IdeSide(_Side, WebSocketServerProtocol):
    """The IDE's socket, handed over from twisted.web by :func:`_take_over`."""

    role = "IDE"
    deny_reason = "bad-websocket-handshake"

    def onConnect(self, request: Any) -> Deferred:
        """
        Until the hub has answered, the IDE is not read: a client may not send frames before its
        handshake is answered, and autobahn would buffer whatever it sent anyway, without bound.
        """
        self.transport.pauseProducing()  # type: ignore[attr-defined]

        def resume(result: Any) -> Any:
            if self.transport is not None:  # type: ignore[attr-defined]
                self.transport.resumeProducing()  # type: ignore[attr-defined]
            return result

        return self.link.start(request.protocols).addBoth(resume)

    def failHandshake(self, reason: str, code: int = 400, responseHeaders: Any = None) -> None:
        """Answer with a Jupyter-style JSON error, as the HTTP proxy does, not a bare status line."""
        self.wasNotCleanReason = reason
        body = error_body(reason, self.deny_reason)
        head = [
            b"HTTP/1.1 %d %s" % (code, RESPONSES.get(code, b"Error")),
            b"Content-Type: application/json; charset=UTF-8",
            b"Content-Length: %d" % len(body),
            b"Connection: close",
        ]
        head += [f"{name}: {value}".encode("latin-1") for name, value in responseHeaders or ()]
        self.sendData(b"\r\n".join(head) + b"\r\n\r\n" + body)
        self.dropConnection(abort=False)


class _HubSide(_Side, WebSocketClientProtocol):
    """The proxy's socket on the hub, on the same path as the IDE's."""

    role = "hub"
    lost_reason: Failure | None = None
    _host_fix: tuple[bytes, bytes] | None = None

    def onConnecting(self, transport_details: Any) -> ConnectingRequest:
        request = self.link.upstream_request()
        # autobahn always writes "Host: host:port", also for 443; the hub must see target.netloc.
        written = f"\r\nHost: {request.host}:{request.port}\r\n".encode()
        self._host_fix = (
            written,
            f"\r\nHost: {self.link.relay.target.netloc}\r\n".encode(),
        )
        return request

    def sendData(self, data: bytes, sync: bool = False, chopsize: int | None = None) -> None:
        if self._host_fix is not None:
            data = data.replace(*self._host_fix, 1)
            self._host_fix = None
        super().sendData(data, sync, chopsize)

    def failHandshake(self, reason: str) -> None:
        self.link.hub_refused(self, reason)
        super().failHandshake(reason)

    def _fail_connection(self, code: int = 1001, reason: str = "going away") -> None:
        """
        configurable-http-proxy, when the server behind it drops an upgraded socket, writes an HTTP
        status line into it (``HTTP/1.1 503``): read as a frame, its ``H`` (0x48) has RSV = 4 and a
        fragmented close opcode, and autobahn's complaint about that would hide what happened.
        """
        buffered = getattr(self, "data", b"") or b""
        # also after the server's own close frame (1009) got through first: the socket is closing then
        if self.state in (_OPEN, WebSocketProtocol.STATE_CLOSING) and buffered.startswith(b"HTTP/"):  # type: ignore[attr-defined]
            status = buffered.split(b"\r\n", 1)[0].decode("latin-1", "replace")
            self.link.hub_proxy_error(self, status)
            self.failedByMe = True
            self.dropConnection(abort=True)  # type: ignore[attr-defined]
            return
        super()._fail_connection(code, reason)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        # onClose only gets a string; policy.explain() needs the failure.
        self.lost_reason = reason
        super().connectionLost(reason)


class _HubFactory(WebSocketClientFactory):
    """One per link: autobahn checks the hub's subprotocol against the factory's list."""

    protocol = _HubSide
    noisy = False  # one per socket: "Starting factory" lines would double the log

    def __init__(self, link: _Link, offered: list[str], options: dict[str, Any]) -> None:
        super().__init__(protocols=offered, reactor=link.relay.reactor)
        self.setProtocolOptions(**options)
        self.link = link

    def buildProtocol(self, addr: Any) -> _HubSide:
        protocol = super().buildProtocol(addr)
        protocol.link = self.link
        self.link.hub = protocol
        return protocol


@dataclass
class _Direction:
    """Messages waiting for one side to open (``None`` once it has, or is gone), and whether it is gone."""

    queued: list[tuple[bytes, bool]] | None = field(default_factory=list)
    gone: bool = False


class _Link:
    """
    One IDE socket and its hub socket: handshake order, queues, closes and flow control, and for a
    socket :func:`reconnectable` (``kind``) the outage state machine:

    - *open*: both sides relay. The hub side is lost without a close frame (reset, FIN, TLS
      error, ping timeout) while the IDE's is open: -> *down*. Everything else ends the pair as
      the module's table says.
    - *down* (``_outage`` set, no attempt running): the IDE's messages are held (:class:`HeldFrames`),
      never written into a dead socket; an attempt is due after the next :func:`backoff` delay.
      Past ``--reconnect-window`` of awake time, or past the held-bytes bound: the IDE gets 1011
      with a reason saying how long the hub was unreachable.
    - *reconnecting* (an attempt running): the same URL, the same ``session_id``. Connection
      failures, a lost handshake, redirects that do not say "stopped", 5xx, 429 and a first 404
      (the hub answers one while it restores its proxy's routes): -> *down* again. A second 404
      (kernel or terminal gone: culled, shut down, server restarted), other 4xx and a stopped
      server: 1011 with the hub's verdict, after which the IDE's own reconnect meets the refusal a
      plain server would give. In managed mode a stopped server is started first (as on a first
      connect), then the attempt is made again.
    - back to *open* when the hub side opens: held messages are sent, in order, then the relay
      carries on; :class:`ReplayCount` tells how many messages the server replayed.
    """

    def __init__(self, relay: WebSocketRelay, upstream: ConnectingRequest, uri: str, kind: str | None = None) -> None:
        self.relay = relay
        self._upstream = upstream
        self.uri = uri
        self.kind = kind
        self.ide: _IdeSide | None = None
        self.hub: _HubSide | None = None
        self._handshake: Deferred | None = None
        self._connecting: Deferred | None = None
        self._to_ide = _Direction()
        self._to_hub = _Direction()
        self._queued_bytes = 0
        self._paused: _Side | None = None  # a sender not read until its peer opens
        self.last_to_hub = 0  # size of the last message sent to the hub, to explain a drop
        self.largest = 0  # of the messages relayed either way
        self.counted = False
        self._recovered = False  # one server start per socket, then the hub's answer stands
        self._waiting_for_server = False
        # reconnecting (see the class docstring)
        self.established = False  # both sides were open once: a later hub loss may be an outage
        self._outage: Outage | None = None
        self._held: HeldFrames | None = None
        self._delays: Any = None
        self._retry: Any = None  # the delayed call of the next attempt
        self._verdict: Any = None  # the refused hub socket whose answer was handled
        self._last_from_hub: tuple[bytes, bool, float] | None = None
        self._replay: ReplayCount | None = None
        self._replay_done: Any = None
        self._back_line: tuple[float, int] | None = None

    # Opening

    def start(self, offered: list[str]) -> Deferred:
        """Open the hub socket; the returned Deferred answers the IDE's handshake."""
        self._upstream.protocols = list(offered)
        handshake = self._handshake = Deferred()
        self._connect()
        return handshake  # may have failed already: the endpoint can fail synchronously

    def _connect(self) -> None:
        factory = _HubFactory(self, self._upstream.protocols, self.relay.hub_options)
        connecting = self._connecting = self.relay.policy.endpoint().connect(factory)
        connecting.addCallbacks(self._connected, self._connect_failed)

    def upstream_request(self) -> ConnectingRequest:
        return self._upstream

    def _connected(self, protocol: object) -> None:
        self._connecting = None

    def _connect_failed(self, failure: Failure) -> None:
        self._connecting = None
        self._to_hub.gone = True
        if self._outage is not None and not failure.check(CancelledError):
            self._retry_later(self.relay.policy.explain(failure).message)
            return
        if not failure.check(CancelledError):
            self._deny(self.relay.policy.explain(failure))
        self._maybe_done()

    def hub_refused(self, hub: _HubSide, why: str) -> None:
        """The hub answered the handshake with something other than a valid 101."""
        line = getattr(hub, "http_status_line", "") or ""
        parts = line.split()
        status = int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else 101
        if self._outage is not None:
            self._verdict = hub
            location = (getattr(hub, "http_headers", {}) or {}).get("location")
            self._refused_on_reconnect(why, status, location.encode("latin-1") if location else None)
            return
        starter = self.relay.starter
        if starter is None or self._recovered:
            self._refused(hub, why, status)
            return
        # The hub says the server may not be running: start it (one spawn for all waiting requests),
        # then open the hub side again while the IDE's handshake waits.
        self._recovered = self._waiting_for_server = True
        location = (getattr(hub, "http_headers", {}) or {}).get("location")
        # pass-through mode starts the server with the IDE's token, the one this socket carries
        token = next((v for k, v in self._upstream.headers.items() if k.lower() == "authorization"), None)
        recovering = starter.recover(status, location.encode("latin-1") if location else None, authorization=token)
        recovering.addCallbacks(lambda stopped: self._recovery_over(stopped, hub, why, status), self._not_recovered)

    def _recovery_over(self, stopped: bool, hub: _HubSide, why: str, status: int) -> None:
        if stopped:
            self._reconnect()
        else:
            self._waiting_for_server = False
            self._refused(hub, why, status)

    def _not_recovered(self, failure: Failure) -> None:
        self._waiting_for_server = False
        self._deny(failure.value)
        self._maybe_done()

    def _reconnect(self) -> None:
        self._waiting_for_server = False
        if self._outage is not None:
            self._attempt()
            return
        if self._to_ide.gone or self._handshake is None:
            self._maybe_done()
            return
        self._to_hub.gone = False
        self.hub = None
        self._connect()

    def _refused(self, hub: _HubSide, why: str, status: int) -> None:
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
            uri=self.uri,
            status=refusal.status,
            message=refusal.message,
            hint=f" {refusal.hint}" if refusal.hint else "",
        )
        self.ide.deny_reason = refusal.reason
        handshake.errback(ConnectionDeny(refusal.status, refusal.message))

    def opened(self, side: _Side) -> None:
        if side is self.hub:
            handshake, self._handshake = self._handshake, None
            if handshake is not None and self.ide is not None and self.ide.state == _CONNECTING:
                handshake.callback(self.hub.websocket_protocol_in_use)
        if side is self.hub and self._outage is not None:
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
                uri=self.uri,
                protocol=self.ide.websocket_protocol_in_use,
            )

    # Traffic

    def _peer(self, side: _Side) -> _Side | None:
        return self.hub if side is self.ide else self.ide

    def _toward(self, side: _Side) -> _Direction:
        """The state kept for ``side``: any hub socket but the IDE's is the hub side."""
        return self._to_ide if side is self.ide else self._to_hub

    def _couple(self) -> None:
        """Each side's transport pauses reading from the other (see :class:`_PeerReading`)."""
        self.ide.transport.registerProducer(_PeerReading(self.hub.transport), True)  # type: ignore[union-attr]
        self.hub.transport.registerProducer(_PeerReading(self.ide.transport), True)  # type: ignore[union-attr]

    def through(self, side: _Side) -> _Side | None:
        """
        The peer a message from ``side`` may go to frame by frame as it arrives: one that is open
        with nothing queued or held before it. ``None``: the message is collected whole for
        :meth:`forward` (the peer not open yet, the hub link down).
        """
        if side is self.ide:
            if self._held is not None:
                return None
            peer, toward = self.hub, self._to_hub
        else:
            peer, toward = self.ide, self._to_ide
        if peer is None or toward.queued is not None or toward.gone or peer.state != _OPEN:  # type: ignore[attr-defined]
            return None
        return peer

    def keeps(self, side: _Side) -> bool:
        """Whether what ``side`` sends to the hub is kept until its message ends (see :meth:`holding`)."""
        return side is self.ide and self.kind is not None and self.relay.reconnect.enabled

    def holding(self, side: _Side) -> bool:
        """The hub link is down and ``side``'s messages are held for the next one."""
        return side is self.ide and self._held is not None

    def relayed(self, side: _Side, size: int, is_binary: bool, first: bytes) -> None:
        """A message went through frame by frame; ``first`` is its first piece."""
        if size > self.largest:
            self.largest = size
        if side is self.hub and self.kind == "kernel":
            self._note_from_hub(first, is_binary)

    def message_rerouted(self, side: _Side, size: int) -> None:
        log.info(
            "WebSocket {uri}: the hub link was lost {size} bytes into a message from the IDE; "
            "the server never had all of it, so it goes whole to the next link.",
            uri=self.uri, size=size,
        )

    def message_cut(self, side: _Side, size: int) -> None:
        peer = "hub" if side is self.ide else "IDE"
        log.warn(
            "WebSocket {uri}: a {size}-byte message from the {role} was dropped: the {peer} side "
            "closed in the middle of it.",
            uri=self.uri, size=size, role=side.role, peer=peer,
        )

    def too_much_held(self) -> None:
        if self._outage is not None:
            self._give_up(self.relay.reconnect.too_much_held(self._outage, self.relay.monotonic()))

    def forward(self, side: _Side, payload: bytes, is_binary: bool) -> None:
        if side is self.ide and self._held is not None:
            self._hold(payload, is_binary)
            return
        if side is self.hub and self.kind == "kernel":
            self._note_from_hub(payload, is_binary)
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

    def close_received(self, side: _Side) -> None:
        code, reason = side.remoteCloseCode, side.remoteCloseReason  # type: ignore[attr-defined]
        if self._close(self._peer(side), code, reason):
            log.info(
                "WebSocket {uri}: the {role} closed it {how}.",
                uri=self.uri,
                role=side.role,
                how=f"with {code}{f' ({reason})' if reason else ''}" if code is not None else "without a close code",
            )

    def broken(self, side: _Side, code: int, reason: str) -> None:
        peer = self._peer(side)
        peer_role = "hub" if side is self.ide else "IDE"
        log.warn(
            'failing WebSocket connection (code={code}): "{reason}" from the {role} on {uri}; '
            "the {peer} gets 1011.",
            code=code,
            reason=reason,
            role=side.role,
            uri=self.uri,
            peer=peer_role,
        )
        self._close(peer, 1011, f"The {side.role} broke the WebSocket protocol.")

    def hub_proxy_error(self, hub: _HubSide, status: str) -> None:
        """The hub's proxy reported an error inside the socket (see :meth:`_HubSide._fail_connection`)."""
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
            uri=self.uri, status=status, size=size, code=code,
        )
        self._close(self.ide, code, reason)

    def lost(self, side: _Side) -> None:
        if side is not self.ide and (self._waiting_for_server or side is not self.hub):
            # a refused handshake: another hub socket follows once the server runs
            self._to_hub.gone = True
            return
        if side is not self.ide and self._outage is not None:
            # an attempt that did not get through; a refusal was answered in hub_refused
            self._to_hub.gone = True
            if side is not self._verdict:
                self._retry_later(self._loss_reason(side))
            return
        # the peer has frames of a message from this side, but not its end
        mid_message = side._through is not None and side._through is self._peer(side) and side._opcode == 0
        if side is self.hub and self._may_reconnect() and not mid_message:
            self._hub_dropped(self._loss_reason(side))
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
        self._maybe_done()

    def _hub_lost_during_handshake(self) -> Refusal:
        hub = self.hub
        if hub is not None and hub.wasOpenHandshakeTimeout:
            waited = f"{hub.openHandshakeTimeout:g} s"
            message = f"The hub did not complete the WebSocket handshake within {waited}."
            return Refusal(504, message, "hub-timeout", hint="Is the hub overloaded?")
        if self.relay.shutting_down:
            return _SHUTTING_DOWN
        failure = (hub.lost_reason if hub is not None else None) or Failure(ConnectionError())
        return self.relay.policy.explain(failure)

    def _abort_hub_handshake(self) -> None:
        if self._connecting is not None:
            self._connecting.cancel()
        elif self.hub is not None and self.hub.state == _CONNECTING:
            self.hub.dropConnection(abort=True)

    def _close(self, side: _Side | None, code: int | None, reason: str | None) -> bool:
        """Send ``side`` a close frame, unless it is closing already; see the module's table."""
        if side is None or side.state != _OPEN:  # type: ignore[attr-defined]
            return False
        # It may have been paused for the peer's sake; it must read the close reply.
        side.transport.resumeProducing()  # type: ignore[attr-defined]
        encoded = encode_truncate(reason, 123) if code is not None and reason else None
        side.sendCloseFrame(code=code, reasonUtf8=encoded, isReply=False)  # type: ignore[attr-defined]
        return True

    def shut_down(self) -> None:
        reason = _SHUTTING_DOWN.message
        if self._outage is not None:
            self._end_outage("abandoned")
            self._abort_hub_handshake()
        if self._handshake is not None:
            self._deny(_SHUTTING_DOWN)
            self._abort_hub_handshake()
        self._close(self.ide, 1001, reason)
        self._close(self.hub, 1001, reason)

    # Reconnecting (see the class docstring)

    def _may_reconnect(self) -> bool:
        return (
            self.kind is not None
            and self.established
            and self.relay.reconnect.enabled
            and not self.relay.shutting_down
            and self.ide is not None
            and self.ide.state == _OPEN
        )

    def _loss_reason(self, hub: _Side) -> str:
        """A short phrase for the log: why the hub side went."""
        if getattr(hub, "wasNotCleanReason", None) and "ping timeout" in hub.wasNotCleanReason:  # type: ignore[attr-defined]
            return f"no answer to a ping within {hub.autoPingTimeout:g} s"  # type: ignore[attr-defined]
        if getattr(hub, "wasOpenHandshakeTimeout", False):
            return f"no WebSocket handshake within {hub.openHandshakeTimeout:g} s"  # type: ignore[attr-defined]
        failure = getattr(hub, "lost_reason", None)
        if failure is None:
            return "the connection was lost"
        return (failure.getErrorMessage() or failure.type.__name__).rstrip(".")

    def _hub_dropped(self, reason: str) -> None:
        """*open* -> *down*: keep the IDE's socket, unhook flow control, start the attempts."""
        relay = self.relay
        self._outage = Outage(reason, relay.monotonic(), relay.reactor.seconds())
        self._held = HeldFrames(relay.reconnect.max_held)
        self._delays = backoff()
        self._recovered = False  # a server found stopped now may be started once more
        self._to_hub.gone = True
        self._cancel_replay_count()
        ide = self.ide
        assert ide is not None
        ide.transport.unregisterProducer()  # type: ignore[attr-defined]
        ide.transport.resumeProducing()  # type: ignore[attr-defined]
        relay.link_down(self, reason)
        self._retry_later(reason)

    def _retry_later(self, why: str) -> None:
        """*down*: the next attempt after the next delay, unless the window is over."""
        outage = self._outage
        if outage is None or self.ide is None or self.ide.state != _OPEN:
            return
        outage.reason = why
        verdict = self.relay.reconnect.gave_up(outage, self.relay.monotonic())
        if verdict is not None:
            self._give_up(verdict)
            return
        self._cancel_retry()
        self._retry = self.relay.reactor.callLater(next(self._delays), self._attempt)

    def _attempt(self) -> None:
        self._retry = None
        outage = self._outage
        if outage is None or self.ide is None or self.ide.state != _OPEN:
            return
        verdict = self.relay.reconnect.gave_up(outage, self.relay.monotonic())
        if verdict is not None:
            self._give_up(verdict)
            return
        outage.attempts += 1
        self._verdict = None
        self.hub = None
        self._to_hub.gone = False
        self._connect()

    def _hold(self, payload: bytes, is_binary: bool) -> None:
        assert self._held is not None and self._outage is not None
        if not self._held.hold(payload, is_binary):
            self._give_up(self.relay.reconnect.too_much_held(self._outage, self.relay.monotonic()))

    def _refused_on_reconnect(self, why: str, status: int, location: bytes | None) -> None:
        """The hub answered an attempt with something other than 101."""
        outage = self._outage
        assert outage is not None
        after = describe_duration(outage.awake(self.relay.monotonic()))
        if status == 404 and not outage.not_found:
            # the hub itself answers 404 for a moment after its proxy restarted, until it has
            # restored its routes: only a second 404 means the kernel is gone
            outage.not_found += 1
            self._retry_later("the hub answered 404")
            return
        # Only a definite answer ends the wait: gone (404), refused (4xx), a stopped server. A
        # redirect loop while the hub re-adds its routes, 5xx, 429 and a garbled 101 pass.
        transient = status < 400 or status >= 500 or status == 429
        stopped = looks_stopped(status, location, self.relay.target)
        reason = self._refusal_reason(status, after, stopped is not False and status != 404)
        starter = self.relay.starter
        if starter is not None and not self._recovered and stopped is not False:
            # the shared recovery: start the server (one spawn for everyone waiting), then try again
            self._recovered = self._waiting_for_server = True

            def over(started: bool) -> None:
                self._waiting_for_server = False
                if self._outage is None:  # the IDE left meanwhile
                    self._maybe_done()
                elif started:
                    self._attempt()
                elif transient:
                    self._retry_later(f"the hub answered {status}")
                else:
                    self._give_up(reason)

            def failed(failure: Failure) -> None:
                self._waiting_for_server = False
                if self._outage is None:
                    self._maybe_done()
                    return
                message = failure.value.message if isinstance(failure.value, Refusal) else failure.getErrorMessage()
                self._give_up(f"Restarting your server failed: {message}"[:123])

            starter.recover(status, location).addCallbacks(over, failed)
            return
        if transient and stopped is not True:
            self._retry_later(why if status == 101 else f"the hub answered {status}")
        else:
            self._give_up(reason)

    def _refusal_reason(self, status: int, after: str, stopped: bool = False) -> str:
        if stopped:
            return f"Your server on the hub is not running (found after a {after} outage)."
        if status == 404:
            what = {"kernel": "The kernel", "terminal": "The terminal"}.get(self.kind or "", "This socket")
            return f"{what} is gone (404 after a {after} outage): shut down, culled or the server restarted."
        return f"The hub refused to reconnect ({status}) after a {after} outage."

    def _give_up(self, reason: str) -> None:
        """End the outage with 1011 and ``reason`` to the IDE (and one log line)."""
        outage = self._outage
        if outage is None:
            return
        log.warn("WebSocket {uri} closed with 1011: {reason}", uri=self.uri, reason=reason)
        self._end_outage("gave up")
        self._abort_hub_handshake()
        self._to_hub.gone = True
        self._close(self.ide, 1011, reason)
        self._maybe_done()

    def _end_outage(self, outcome: str = "abandoned") -> None:
        if self._outage is not None:
            self.relay.link_settled(self, outcome, self._outage.awake(self.relay.monotonic()))
        self._outage = None
        self._held = None
        self._cancel_retry()
        self._cancel_replay_count()

    def _cancel_retry(self) -> None:
        if self._retry is not None and self._retry.active():
            self._retry.cancel()
        self._retry = None

    def _back(self) -> None:
        """*reconnecting* -> *open*: send what was held, couple flow control again, count."""
        outage, held = self._outage, self._held
        assert outage is not None and held is not None and self.hub is not None and self.ide is not None
        self._outage = self._held = None
        frames = held.take()
        for payload, is_binary in frames:
            self.hub.sendMessage(payload, is_binary)
        self._couple()
        seconds = outage.awake(self.relay.monotonic())
        self.relay.link_settled(self, "back", seconds)
        self._back_line = (seconds, len(frames))
        if self.kind == "kernel":
            reference = None
            if self._last_from_hub is not None:
                payload, is_binary, wall = self._last_from_hub
                date = message_date(payload, is_binary, self.ide.websocket_protocol_in_use)
                reference = (date, wall) if date is not None else None
            self._replay = ReplayCount(reference, self.relay.reactor.seconds())
            self._replay_done = self.relay.reactor.callLater(REPLAY_SETTLE, self._log_back)
        else:
            self._log_back()

    def _note_from_hub(self, payload: bytes, is_binary: bool) -> None:
        replay = self._replay
        if replay is not None:
            replay.seen(message_date(payload, is_binary, self.ide.websocket_protocol_in_use))  # type: ignore[union-attr]
            if replay.counting:
                self._replay_done.reset(REPLAY_SETTLE)
            else:
                self._log_back()
        # the header is at the start; a large output need not stay in memory for it
        kept = payload if len(payload) <= _HEADER_ROOM else payload[:_HEADER_ROOM]
        self._last_from_hub = (kept, is_binary, self.relay.reactor.seconds())

    def _log_back(self) -> None:
        """The one line that says the socket is back (for a kernel, once the replay is counted)."""
        if self._replay_done is not None and self._replay_done.active():
            self._replay_done.cancel()
        self._replay_done = None
        replay, self._replay = self._replay, None
        if self._back_line is None:
            return
        seconds, sent = self._back_line
        self._back_line = None
        parts = [] if replay is None else [replay.describe()]
        parts.append(f"{sent} held message{'' if sent == 1 else 's'} sent")
        log.info(
            "WebSocket {uri} reconnected after {after}; {counts}",
            uri=self.uri,
            after=describe_duration(seconds),
            counts=", ".join(parts),
        )

    def _cancel_replay_count(self) -> None:
        if self._back_line is not None:
            self._log_back()

    def _maybe_done(self) -> None:
        if self._waiting_for_server:
            return
        hub_gone = self._to_hub.gone or (self.hub is None and self._connecting is None)
        if self._to_ide.gone and hub_gone:
            self.relay.link_done(self)


def _take_over(request: Request, protocol: WebSocketServerProtocol) -> None:
    """
    Hand the request's connection to ``protocol`` and replay the request to it, as autobahn's
    ``WebSocketResource.render`` does (autobahn parses the handshake itself), plus: the HTTP
    channel stops being the transport's producer (the relay registers its own) and TCP_NODELAY is
    set, since kernel messages are small and latency-bound.
    """
    channel = request.channel
    transport, channel.transport = channel.transport, None
    transport.unregisterProducer()
    if isinstance(transport, ProtocolWrapper):
        transport.wrappedProtocol = protocol
    elif isinstance(getattr(transport, "protocol", None), ProtocolWrapper):
        transport.protocol.wrappedProtocol = protocol
    else:
        transport.protocol = protocol
    protocol.makeConnection(transport)
    try:
        transport.setTcpNoDelay(True)
    except (AttributeError, OSError):  # not TCP (a UNIX socket, a test transport)
        pass
    transport.resumeProducing()
    head = [request.method + b" " + request.uri + b" HTTP/1.1"]
    for name, values in request.requestHeaders.getAllRawHeaders():
        head += [name + b": " + value for value in values]
    protocol.dataReceived(b"\r\n".join(head) + b"\r\n\r\n")


class WebSocketRelay:
    """
    Relays ``Upgrade: websocket`` requests of the local site to the user's server on the hub
    (see the module docstring). ``allowed_origins`` are full origins (``https://host:port``)
    allowed besides the proxy's own and none at all. ``credentials`` in managed mode swap the
    local token for the hub token, as they do for HTTP requests.
    """

    def __init__(
        self,
        target: HubTarget,
        policy: HubTLSPolicy,
        reactor: Any,
        ping_interval: float = 30.0,
        allowed_origins: tuple[str, ...] = (),
        credentials: Credentials | None = None,
        starter: ServerStarter | None = None,
        stats: Stats | None = None,
        reconnect: ReconnectPolicy | None = None,
        monotonic: Any = None,
        max_message: int = MAX_MESSAGE_BYTES,
    ) -> None:
        self.stats = stats
        self.max_message = max_message
        self.reconnect = reconnect or ReconnectPolicy()
        # awake seconds (see jds.reconnect); the reactor's own clock in tests
        self.monotonic = monotonic or time.monotonic
        self.holding: set[_Link] = set()
        self._lost_line: Any = None
        self._lost_reason = ""
        self.target = target
        self.credentials = credentials or Credentials()
        self.starter = starter
        self.policy = policy
        self.reactor = reactor
        self.allowed_origins = frozenset(o.lower().rstrip("/").encode("ascii") for o in allowed_origins)
        self.shutting_down = False
        self.links: set[_Link] = set()
        self._drained: Deferred | None = None
        self.hub_options = _options(ping_interval, HANDSHAKE_TIMEOUT, max_message, min(ping_interval, HUB_PONG_TIMEOUT))
        # The IDE waits for the hub's connection and handshake, and must hear the verdict.
        ide_timeout = HANDSHAKE_TIMEOUT + getattr(policy, "connect_timeout", 10.0) + 5
        if starter is not None:  # and it may wait for the server to start first
            ide_timeout += starter.timeout
        self.factory = WebSocketServerFactory(server=f"jupyter-dev-server/{__version__}", reactor=reactor)
        self.factory.protocol = _IdeSide
        self.factory.setProtocolOptions(webStatus=False, **_options(ping_interval, ide_timeout, max_message))
        self.factory.startFactory()
        reactor.addSystemEventTrigger("before", "shutdown", self.shutdown)

    def render_upgrade(self, request: Request, hub_path: bytes, query: bytes) -> bytes | int:
        """Check the Origin, then take the connection over; nothing reaches the hub before that."""
        refusal = origin_refusal(request, self.allowed_origins)
        if refusal:
            return render_refusal(request, Refusal(
                403, refusal, "origin-refused", hint="Open the notebook from the IDE or from this proxy's own URL."
            ))
        if request.channel is None or request.channel.transport is None:
            return render_refusal(request, Refusal(426, "WebSockets need HTTP/1.1.", "upgrade-required"))
        if self.shutting_down:
            return render_refusal(request, _SHUTTING_DOWN)
        kind = reconnectable(request.path) if self.reconnect.enabled else None
        if kind == "kernel":
            query = with_session_id(query)
        link = _Link(
            self,
            self._upstream(request, hub_path, query),
            redact_query(request.uri).decode("latin-1"),
            kind,
        )
        link.ide = self.factory.buildProtocol(request.getClientAddress())
        link.ide.link = link
        self.links.add(link)
        _take_over(request, link.ide)
        return NOT_DONE_YET

    def _upstream(self, request: Request, hub_path: bytes, query: bytes) -> ConnectingRequest:
        """The hub's handshake: same path and query, token as a header, forwarded headers."""
        query, token = split_token(query)
        client = request.getClientAddress()
        raw = [(n, v) for n, vs in request.requestHeaders.getAllRawHeaders() for v in vs]
        raw, token = self.credentials.upstream(raw, token)
        pairs = upstream_request_headers(
            raw,
            self.target,
            client_ip=getattr(client, "host", "127.0.0.1"),
            local_host=request.getHeader(b"host"),
            query_token=token,
        )
        grouped: dict[bytes, tuple[str, list[str]]] = {}
        for name, value in pairs:
            text = value.decode("utf-8", "replace")
            grouped.setdefault(name.lower(), (name.decode("latin-1"), []))[1].append(text)
        useragent = grouped.pop(b"user-agent", (None, [f"jupyter-dev-server/{__version__}"]))[1][0]
        headers = {
            display: ("; " if lowered == b"cookie" else ", ").join(values)
            for lowered, (display, values) in grouped.items()
            if lowered not in _NOT_FORWARDED
        }
        resource = quote_from_bytes(hub_path + (b"?" + query if query else b""), _URI_SAFE)
        return ConnectingRequest(
            host=authority(self.target.verify_name),
            port=self.target.port,
            resource=resource,
            headers=headers,
            useragent=useragent,
            origin=self.target.origin.decode("ascii"),
        )

    def link_down(self, link: _Link, reason: str) -> None:
        """A socket lost its hub side and holds: one log line for all that go in the same moment."""
        self.holding.add(link)
        if self.stats is not None:
            self.stats.hub_link_lost(len(self.holding))
        if self._lost_line is None:
            self._lost_reason = reason
            self._lost_line = self.reactor.callLater(0, self._say_lost)

    def _say_lost(self) -> None:
        self._lost_line = None
        count = len(self.holding)
        if count:
            log.warn(
                "hub link lost: {reason}; {count} WebSocket{s} holding",
                reason=self._lost_reason,
                count=count,
                s="" if count == 1 else "s",
            )

    def link_settled(self, link: _Link, outcome: str, seconds: float) -> None:
        """A holding socket is back (``"back"``), closed by the proxy (``"gave up"``) or by its IDE."""
        self.holding.discard(link)
        if self.stats is not None:
            self.stats.hub_link_settled(len(self.holding), outcome, seconds)

    def link_done(self, link: _Link) -> None:
        if link in self.links and link.counted:
            self.stats.websocket_closed()
        self.links.discard(link)
        if link.largest >= LARGE_MESSAGE:
            # The sockets' buffers hang on reference cycles (protocol <-> transport) that an idle
            # daemon's garbage collector might not visit for hours: hundreds of MiB after one message.
            self.reactor.callLater(0, _give_back_memory)
        if not self.links and self._drained is not None and not self._drained.called:
            self._drained.callback(None)

    def shutdown(self) -> Deferred:
        """Close every socket with 1001 (both sides), waiting a little for the close handshakes."""
        self.shutting_down = True
        if not self.links:
            return succeed(None)
        log.info("Closing {count} WebSocket(s) with 1001.", count=len(self.links))
        self._drained = Deferred()
        for link in list(self.links):
            link.shut_down()
        waiting = self._drained
        waiting.addTimeout(SHUTDOWN_GRACE, self.reactor)
        return waiting.addErrback(lambda _: None)
