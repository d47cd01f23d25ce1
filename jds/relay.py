"""
The WebSocket side of the proxy: each IDE socket is spliced, message by message, to a socket the
proxy opens on the same path of the user's server on the hub.

Why it is built the way it is:

- The IDE's handshake is answered only once the hub has answered its own, so the IDE sees the hub's
  verdict: the subprotocol the hub chose (Node's ``ws`` fails a socket whose offered subprotocol is
  not echoed) or the status it refused with. The IDE-facing ``onConnect`` returns a Deferred that
  :class:`~jds.relay_link.Link` fires from the hub side's ``onOpen`` or errbacks with ``ConnectionDeny``.
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

Close codes pass through unchanged, which is why :meth:`Link._close <jds.relay_link.Link._close>` uses autobahn's
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
the local token is replaced (``rotate-token``)                 1008 "The local token was replaced
                                                               (jupyter-dev-server rotate-token);
                                                               connect again with the new URL." to the
                                                               IDE, 1000 to the hub
=============================================================  ==========================================

A kernel, terminal or event socket whose hub side is lost without a close frame (reset, FIN, TLS
error, or a ping unanswered for ``--ping-interval`` + 15 s) stays open on the IDE's side while the
proxy reconnects: see :class:`~jds.relay_outage.HubOutage` and :mod:`jds.reconnect`. After a 1011 for a gone kernel
the IDE's own reconnect meets the hub's 404, as with a plain server, and it shows the kernel as
dead.

Once a side has been sent a close frame, its connection ends with a FIN rather than autobahn's reset,
so that the close frame stays readable for an IDE that was busy (:meth:`jds.relay_frames.Side.dropConnection`).
"""

from __future__ import annotations

import ctypes
import gc
import time
from typing import Any
from urllib.parse import quote_from_bytes

from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from autobahn.websocket.types import ConnectingRequest
from twisted.internet.defer import Deferred, succeed
from twisted.logger import Logger
from twisted.protocols.policies import ProtocolWrapper
from twisted.web.server import NOT_DONE_YET, Request

from jds import __version__
from jds.auth import Credentials
from jds.errors import Refusal, render_refusal
from jds.guard import origin_refusal
from jds.hub import ServerStarter
from jds.hublink import HubLink
from jds.paths import HubTarget, authority, local_path, redact_query, split_token, upstream_request_headers
from jds.reconnect import ReconnectPolicy, reconnectable, with_session_id
from jds.relay_frames import MAX_MESSAGE_BYTES, HubFactory, IdeSide, configured, socket_options
from jds.relay_link import SHUTTING_DOWN, TOKEN_REPLACED, Link
from jds.stats import Stats
from jds.tls import HubTLSPolicy

__all__ = ["HANDSHAKE_TIMEOUT", "MAX_MESSAGE_BYTES", "WebSocketRelay"]

log = Logger(namespace="jds.relay")

# A hub that has to wake a sleeping server or a busy proxy can take a while to answer.
HANDSHAKE_TIMEOUT = 60.0
# After a socket that carried a message this large, memory is handed back at once (gc.collect).
LARGE_MESSAGE = 16 << 20
# How long a shutting-down proxy waits for close handshakes before the reactor stops.
SHUTDOWN_GRACE = 3.0
# The hub side's pong deadline: with the default 30 s ping interval a silent link (no FIN, no RST)
# is noticed within 45 s (a ping at most 30 s after the last answered one, then 15 s for its pong).
HUB_PONG_TIMEOUT = 15.0
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
    # The channel and the request reference each other: out of the channel's list, both go (with
    # the request's headers) when this call returns, not at a full collection hours later.
    if request in channel.requests:
        channel.requests.remove(request)
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
        hub_link: HubLink | None = None,
    ) -> None:
        self.stats = stats
        self.max_message = max_message
        self.reconnect = reconnect or ReconnectPolicy()
        # awake seconds (see jds.reconnect); the reactor's own clock in tests
        self.monotonic = monotonic or time.monotonic
        self.holding: set[Link] = set()
        self.hub_link = hub_link if hub_link is not None else HubLink(reactor, stats)
        self.target = target
        self.credentials = credentials or Credentials()
        self.starter = starter
        self.policy = policy
        self.reactor = reactor
        self.allowed_origins = frozenset(o.lower().rstrip("/").encode("ascii") for o in allowed_origins)
        self.shutting_down = False
        self.links: set[Link] = set()
        self._drained: Deferred | None = None
        self.hub_options = socket_options(ping_interval, HANDSHAKE_TIMEOUT, max_message, min(ping_interval, HUB_PONG_TIMEOUT))
        # The IDE waits for the hub's connection and handshake, and must hear the verdict.
        ide_timeout = HANDSHAKE_TIMEOUT + getattr(policy, "connect_timeout", 10.0) + 5
        if starter is not None:  # and it may wait for the server to start first
            ide_timeout += starter.timeout
        self.factory = WebSocketServerFactory(server=f"jupyter-dev-server/{__version__}", reactor=reactor)
        self.factory.setProtocolOptions(webStatus=False, **socket_options(ping_interval, ide_timeout, max_message))
        self.factory.protocol = configured(IdeSide, self.factory)
        self.factory.startFactory()
        self.hub_factory = HubFactory.for_relay(reactor, self.hub_options)
        reactor.addSystemEventTrigger("before", "shutdown", self.shutdown)
        if self.credentials.managed:
            self.credentials.on_rotation.append(self.token_replaced)

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
            return render_refusal(request, SHUTTING_DOWN)
        # JupyterLab opened through the proxy uses the server's base URL (/user/NAME/...): what is
        # held is decided from the path on the server, whichever of the two views the IDE used.
        kind = reconnectable(local_path(hub_path, self.target) or b"") if self.reconnect.enabled else None
        if kind == "kernel":
            query = with_session_id(query)
        link = Link(
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

    def link_down(self, link: Link, reason: str) -> None:
        """A socket lost its hub side and holds (:class:`HubLink` says so once for the outage)."""
        self.holding.add(link)
        self.hub_link.socket_lost(reason, len(self.holding))

    def link_settled(self, link: Link, outcome: str, seconds: float) -> None:
        """A holding socket is back (``"back"``), closed by the proxy (``"gave up"``) or by its IDE."""
        self.holding.discard(link)
        self.hub_link.socket_settled(len(self.holding), outcome, seconds)

    def link_done(self, link: Link) -> None:
        if link in self.links and link.counted:
            self.stats.websocket_closed()
        self.links.discard(link)
        if link.largest >= LARGE_MESSAGE:
            # The sockets' buffers hang on reference cycles (protocol <-> transport) that an idle
            # daemon's garbage collector might not visit for hours: hundreds of MiB after one message.
            self.reactor.callLater(0, _give_back_memory)
        if not self.links and self._drained is not None and not self._drained.called:
            self._drained.callback(None)

    def token_replaced(self) -> None:
        """
        Every socket open now was opened with the old local token (or a login it gave): the token
        check happens only at the handshake, so each ends here, the IDE's side with 1008 and a
        reason that says why, before the request that brought the new token is served.
        """
        if not self.links:
            return
        log.warn(
            "The local token was replaced: closing {count} WebSocket(s) opened with the old one (1008).",
            count=len(self.links),
        )
        for link in list(self.links):
            link.shut_down(TOKEN_REPLACED, 1008, 1000)

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
