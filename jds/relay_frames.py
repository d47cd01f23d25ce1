"""
The frame pump: the two autobahn protocols of a relayed WebSocket (the IDE's socket and the proxy's
socket on the hub), which pass frames to each other as they arrive. Everything they cannot decide
alone (where a message goes, what a close means, whether the hub link is down) they ask their
:class:`~jds.relay_link.Link`, which is only ever reached through the ``link`` attribute: this module
imports nothing of the relay above it. Why frames go on as they do is in :mod:`jds.relay`'s docstring.

This is the per-frame path: keep what it does per frame as small as it is.
"""

from __future__ import annotations

import random
from collections import deque
from types import FunctionType
from typing import Any

import txaio
from autobahn.twisted.websocket import (
    WebSocketClientFactory,
    WebSocketClientProtocol,
    WebSocketServerProtocol,
)
from autobahn.util import encode_truncate
from autobahn.websocket.protocol import WebSocketProtocol
from autobahn.websocket.types import ConnectingRequest
from autobahn.websocket.xormasker import create_xor_masker
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IPushProducer
from twisted.internet.protocol import connectionDone
from twisted.python.failure import Failure
from twisted.web.http import RESPONSES
from zope.interface import implementer

from jds.errors import error_body

__all__ = [
    "FRAME_PIECE", "MAX_MESSAGE_BYTES", "HubFactory", "HubSide", "IdeSide", "PeerReading", "Side", "configured",
    "socket_options", "xor_mask",
]

# Notebooks move outputs of tens of MB; a larger message closes the socket with 1009
# (--max-message-size). The same bound holds messages queued for a side that is not open yet; beyond
# it the sender is not read until that side opens (backpressure).
MAX_MESSAGE_BYTES = 256 << 20
# A frame larger than what one read brings goes on in complete frames of at least this size.
FRAME_PIECE = 4 << 20

_OPEN = WebSocketProtocol.STATE_OPEN
# What autobahn's opening handshake leaves on a protocol and nothing reads once the socket is open.
_HANDSHAKE_ONLY = (
    "http_request_data", "http_response_data", "http_headers", "http_status_line", "http_request_uri",
    "http_request_path", "http_request_params", "http_request_host", "websocket_origin", "websocket_protocols",
    "websocket_extensions", "websocket_key", "_wskey",
)
# autobahn's per-socket flags and timers at the values they have on an open, quiet socket. As class
# attributes of the relay's protocols they let an open socket's own __dict__ hold only what differs.
_AT_REST: dict[str, Any] = {
    name: False for name in (
        "closedByMe", "failedByMe", "droppedByMe", "wasClean", "wasServerConnectionDropTimeout",
        "wasOpenHandshakeTimeout", "wasCloseHandshakeTimeout", "wasServingFlashSocketPolicyFile",
        "wasMaxFramePayloadSizeExceeded", "wasMaxMessagePayloadSizeExceeded", "triggered", "inside_message",
    )
} | {
    name: None for name in (
        "wasNotCleanReason", "localCloseCode", "localCloseReason", "remoteCloseCode", "remoteCloseReason",
        "serverConnectionDropTimeoutCall", "openHandshakeTimeoutCall", "closeHandshakeTimeoutCall",
        "autoPingTimeoutCall", "autoPingPending", "autoPingPendingSent", "trackedTimings", "_perMessageCompress",
        "current_frame", "frame_data", "message_data",
    )
} | {"autoPingPendingSeq": 0, "data": b""}
# autobahn's queue of chopped or synchronous writes (a 760-byte deque per socket), which the relay
# never makes: an open socket has none of its own until such a write comes (Side.sendData).
_AT_REST["send_queue"] = ()
_UNSET = object()

# Up to this many bytes a payload is masked with one integer XOR; autobahn's masker (NVX, through
# CFFI) costs ~4 µs to create per frame, more than the XOR of a whole kernel request, and is faster
# only from about 1.5 KB on.
MASK_BY_INT = 1024


def xor_mask(payload: bytes, key: bytes, offset: int = 0) -> bytes:
    """
    ``payload`` XORed with the 4-byte masking ``key`` (RFC 6455, 5.3), which masks and unmasks
    alike; ``offset``: how far into its frame's payload ``payload`` starts (a frame read in pieces).
    """
    size = len(payload)
    if not size:
        return b""
    turn = offset & 3
    if turn:
        key = key[turn:] + key[:turn]
    if size > MASK_BY_INT:
        return create_xor_masker(key, size).process(payload)
    stream = key * (size >> 2) + key[: size & 3]
    return (int.from_bytes(payload, "little") ^ int.from_bytes(stream, "little")).to_bytes(size, "little")


def frame_head(opcode: int, size: int, fin: bool, rsv: int, mask_bit: int) -> bytes:
    """A frame's first bytes as autobahn's ``sendFrame`` writes them (``mask_bit``: 0x80 if a key follows)."""
    first = (0x80 if fin else 0) | (rsv % 8) << 4 | opcode % 128
    if size <= 125:
        return bytes((first, mask_bit | size))
    if size <= 0xFFFF:
        return bytes((first, mask_bit | 126)) + size.to_bytes(2, "big")
    return bytes((first, mask_bit | 127)) + size.to_bytes(8, "big")


def socket_options(
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



def configured(side: type[Side], factory: Any) -> type[Side]:
    """
    ``side`` with ``factory``'s protocol options as class attributes. autobahn copies each option
    (23-29 of them) from the factory onto every protocol that does not have it yet, into each
    socket's own __dict__; one class per relay carries them once for all its sockets.
    """
    # an option the relay's own classes set (IdeSide.applyMask: jds unmasks) stays theirs
    own = {name for cls in side.__mro__ if cls.__module__ == __name__ for name in vars(cls)}
    options = {name: getattr(factory, name) for name in side.CONFIG_ATTRS if name not in own}  # type: ignore[attr-defined]
    # a function as a class attribute would become a method (perMessageCompressionAccept is one)
    options = {name: staticmethod(v) if isinstance(v, FunctionType) else v for name, v in options.items()}
    return type(side.__name__, (side,), {"__module__": side.__module__, **options})


@implementer(IPushProducer)
class PeerReading:
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


class Side:
    """What both autobahn protocols report to their :class:`~jds.relay_link.Link`."""

    link: Any  # its Link (jds.relay_link), which imports this module
    role: str

    _backstop: Any = None

    def onOpen(self) -> None:
        self.link.opened(self)

    def _onOpen(self) -> None:
        """
        autobahn's, without the TLS channel id and the peer's certificate parsed into a dict (read only
        by WAMP; ~3 KiB and a certificate parse per hub socket), and with the handshake's leftovers
        dropped: the request and response as received, their headers, the offered subprotocols. Then
        the socket's __dict__ is rebuilt with only what differs from the class (a dict never shrinks on
        its own): an idle socket kept ~90 attributes in a 3.3 KiB dict (``benchmarks/HISTORY.md``).
        """
        state = self.__dict__
        for name in _HANDSHAKE_ONLY:
            state.pop(name, None)
        state["_transport_details"] = None
        if not state.get("send_queue", True):
            del state["send_queue"]
        cls = type(self)
        self.__dict__ = {name: value for name, value in state.items() if getattr(cls, name, _UNSET) is not value}
        self.onOpen()

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
            if (sync or chopsize) and "send_queue" not in self.__dict__:
                self.send_queue = deque()  # autobahn queues these writes
            super().sendData(data, sync, chopsize)  # type: ignore[misc]
            return
        self.transport.write(data)  # type: ignore[attr-defined]
        self.trafficStats.outgoingOctetsWireLevel += len(data)  # type: ignore[attr-defined]

    # Frame-level relaying. A message whose peer is open goes on frame by frame as it arrives; one
    # that must wait (the peer not open yet, the hub link down) is collected whole, as autobahn does.
    _through: Side | None = None  # the side this message's frames go to as they arrive
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

    _keep_limit: int | None = None  # of this message's pieces kept in _sent (Link.keep_limit)

    def onMessageBegin(self, isBinary: bool) -> None:
        # autobahn's (three assignments), inline: this and the next run for every message
        self.message_is_binary = isBinary
        self.message_data = []
        self.message_data_total_length = 0
        link = self.link
        through = self._through = link.through(self)
        if through is not None:
            self._opcode = 2 if isBinary else 1
            self._first = b""
            self._pieces, self._pieces_size = None, 0
            if through is link.hub and link.keep_limit is not None:
                self._sent, self._sent_size, self._unkept = [], 0, False
                self._keep_limit = link.keep_limit

    def onMessageFrameBegin(self, length: int) -> None:
        total = self.message_data_total_length + length
        if 0 < self.maxMessagePayloadSize < total or 0 < self.maxFramePayloadSize < length:  # type: ignore[attr-defined]
            super().onMessageFrameBegin(length)  # type: ignore[misc]  # the size limits (1009)
        else:  # what autobahn's does within them
            self.frame_length = length
            self.frame_data = []
            self.message_data_total_length = total
        through = self._through
        if through is not None:
            self._left, self._fin = length, self.current_frame.fin  # type: ignore[attr-defined]
            if through is self.link.hub:
                self.link.last_to_hub = total

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
            if self._sent_size <= self._keep_limit:  # type: ignore[operator]
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

    # autobahn.twisted's _onMessageBegin and the like only call these: bound directly, each frame
    # goes through one Python call less per hook.
    _onMessageBegin = onMessageBegin
    _onMessageFrameBegin = onMessageFrameBegin
    _onMessageFrameData = onMessageFrameData
    _onMessageFrameEnd = onMessageFrameEnd
    _onMessageEnd = onMessageEnd

    def onCloseFrame(self, code: int | None, reasonRaw: bytes | None) -> bool | None:
        stop = super().onCloseFrame(code, reasonRaw)  # type: ignore[misc]
        if not stop:
            self.link.close_received(self)
        return stop

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        self.link.lost(self)


for _name, _value in _AT_REST.items():
    setattr(Side, _name, _value)


class IdeSide(Side, WebSocketServerProtocol):
    """The IDE's socket, handed over from twisted.web by :func:`jds.relay._take_over`."""

    role = "IDE"
    deny_reason = "bad-websocket-handshake"

    # The IDE's frames are unmasked in onFrameData, not by a masker autobahn creates per frame (a
    # server masks nothing it sends: this changes only how received frames are unmasked). autobahn
    # copies its factory's options only to a protocol that does not have them already.
    applyMask = False

    def onFrameData(self, payload: bytes) -> bool | None:
        """autobahn's, given the payload unmasked (:func:`xor_mask`; every frame from a client is masked)."""
        mask = self.current_frame.mask  # type: ignore[attr-defined]
        if mask is not None and payload:
            # autobahn's null masker counts the bytes of this frame read so far, these included
            start = self.current_frame_masker.pointer() - len(payload)  # type: ignore[attr-defined]
            payload = xor_mask(payload, mask, start)
        return super().onFrameData(payload)  # type: ignore[misc]

    def sendFrame(
        self, opcode: int, payload: bytes = b"", fin: bool = True, rsv: int = 0, mask: bytes | None = None,
        payload_len: int | None = None, chopsize: int | None = None, sync: bool = False,
    ) -> None:
        """
        autobahn's for a server's unmasked frame, the same bytes in one concatenation (three of every
        kernel round trip's four frames go to the IDE). What only tests and fuzzers ask for (a key,
        a repeated payload, masked server frames, frame logging) goes to autobahn's.
        """
        if mask is not None or payload_len is not None or self.logFrames or self.maskServerFrames:  # type: ignore[attr-defined]
            super().sendFrame(opcode, payload, fin, rsv, mask, payload_len, chopsize, sync)  # type: ignore[misc]
            return
        if opcode < 3:
            self.trafficStats.outgoingWebSocketFrames += 1  # type: ignore[attr-defined]
        self.sendData(frame_head(opcode, len(payload), fin, rsv, 0) + payload, sync, chopsize)

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


class HubSide(Side, WebSocketClientProtocol):
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

    def sendFrame(
        self, opcode: int, payload: bytes = b"", fin: bool = True, rsv: int = 0, mask: bytes | None = None,
        payload_len: int | None = None, chopsize: int | None = None, sync: bool = False,
    ) -> None:
        """
        autobahn's, masked by :func:`xor_mask`: the same bytes on the wire (a random key from
        ``random.getrandbits(32)``, as autobahn's) without creating a masker per frame. What only
        tests and fuzzers ask for (a given key, a repeated payload, frame logging) goes to autobahn's.
        """
        if mask is not None or payload_len is not None or self.logFrames or not (self.maskClientFrames and self.applyMask):  # type: ignore[attr-defined]
            super().sendFrame(opcode, payload, fin, rsv, mask, payload_len, chopsize, sync)  # type: ignore[misc]
            return
        head = frame_head(opcode, len(payload), fin, rsv, 0x80)
        key = random.getrandbits(32).to_bytes(4, "big")
        if opcode < 3:
            self.trafficStats.outgoingWebSocketFrames += 1  # type: ignore[attr-defined]
        self.sendData(head + key + xor_mask(payload, key), sync, chopsize)

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


class HubFactory(WebSocketClientFactory):
    """
    One per link: autobahn checks the hub's subprotocol against the factory's list. A relay makes
    them from the class :meth:`for_relay` gives it, which holds everything else a factory has (the
    options, the protocol class, the batched timer of the pings) once for all its links.
    """

    protocol = HubSide
    noisy = False  # one per socket: "Starting factory" lines would double the log

    def __init__(self, link: Any, offered: list[str]) -> None:  # autobahn's ran once, for the class
        self.link = link
        self.protocols = offered

    @classmethod
    def for_relay(cls, reactor: Any, options: dict[str, Any]) -> type[HubFactory]:
        """A subclass whose attributes are those of one factory set up with ``options``."""
        template = WebSocketClientFactory(reactor=reactor)
        template.setProtocolOptions(**options)
        shared = {**vars(template), "protocol": configured(HubSide, template), "__module__": cls.__module__}
        return type(cls.__name__, (cls,), shared)

    def buildProtocol(self, addr: Any) -> HubSide:
        protocol = super().buildProtocol(addr)
        protocol.link = self.link
        self.link.hub = protocol
        return protocol
