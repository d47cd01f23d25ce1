"""
The HTTP/1.1 client every hub request goes through, in place of twisted.web's ``Agent``.

Why not Agent: for one small REST request, Agent and ``_newclient`` cost about as much CPU as
twisted.web's whole handling of the IDE's side (a state machine per request, the response head
parsed line by line through ``LineReceiver``, every header value sanitised again as it is stored,
two Deferred chains, an endpoint and a pool key per request; ``benchmarks/HISTORY.md``,
experiment 04). The hub hop needs far less: one destination, whose connections all come from one
endpoint (``HubTLSPolicy``'s: the via, the spares, the pinned CA), one request at a time on a
connection, no redirects, cookies or content decoding.

What it keeps of Agent's contract, so that the proxy, :class:`jds.hub.HubAPI` and :mod:`jds.retry`
read it as they read Agent:

- ``request(method, uri, headers, bodyProducer)`` fires with a response that has ``code``,
  ``phrase``, ``version``, ``headers`` (without the connection's own: Content-Length,
  Transfer-Encoding, Connection...), ``length`` and ``deliverBody``; the body protocol's transport
  pauses, resumes and stops the hub connection, so a slow IDE slows the hub and ``--stall-timeout``
  can drop it;
- failures are Agent's types for the same moments: ``ResponseNeverReceived`` (lost before any
  byte of the answer), ``ResponseFailed`` (lost or malformed after some), ``RequestTransmissionFailed``
  (lost while the body was being sent), ``RequestGenerationFailed`` (the body's producer failed),
  each with its ``reasons``; a body cut short ends with ``ResponseFailed``, one read until the
  connection closed with ``PotentialDataLoss``;
- a cancelled request drops its connection and fails with ``ResponseNeverReceived([CancelledError])``;
- a request with no body and a method that changes nothing on a second try (GET, HEAD, OPTIONS,
  DELETE, TRACE), sent on a pooled connection that turns out closed before any byte of the answer,
  goes once more on a new connection; nothing else is sent again here (:mod:`jds.retry` decides).

The request head goes out in one write, with ``Host`` from the URI when the caller gave none. A body
is framed by its producer's length (``Content-Length``) or, unknown, chunked; it streams with the
connection as its consumer, so a full hub connection pauses the producer (:mod:`jds.upload`).
Answers are framed by Content-Length, chunked (trailers read and dropped) or the connection's close;
HEAD, 204 and 304 have no body; interim 1xx answers are skipped. A connection goes back to the pool,
most recently used first, only after a whole answer that did not say ``Connection: close`` (nor came
as HTTP/1.0 without keep-alive), with its request body all sent and no stray bytes after it; it is
resumed first, in case a slow reader had paused it. Idle connections close after ``idle_seconds``.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import CancelledError, Deferred, fail, gatherResults
from twisted.internet.interfaces import IReactorTime, IStreamClientEndpoint
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.python.failure import Failure
from twisted.web._newclient import (
    BadResponseVersion,
    ParseError,
    RequestGenerationFailed,
    RequestTransmissionFailed,
    ResponseDone,
    ResponseFailed,
    ResponseNeverReceived,
    WrongBodyLength,
)
from twisted.web.http import PotentialDataLoss
from twisted.web.http_headers import Headers
from twisted.web.iweb import UNKNOWN_LENGTH, IAgent, IBodyProducer, IResponse
from zope.interface import implementer

__all__ = ["HubClient", "HubResponse", "headers_key", "request_head"]

MAX_IDLE = 16
# A response head larger than this is refused as malformed (Agent refuses any one line over 16 KiB).
MAX_HEAD = 256 << 10
# Body bytes that arrive before anyone reads them are held up to this much; then the hub is paused.
HOLD_UNREAD = 64 << 10
_MAX_CHUNK_LINE = 4096
_SENT_AGAIN_WHEN_STALE = frozenset({b"GET", b"HEAD", b"OPTIONS", b"DELETE", b"TRACE"})
_SAYS_EMPTY_BODY = (b"PUT", b"POST")  # Agent sends "Content-Length: 0" for these without a body
_NO_BODY_CODES = (204, 304)
# The connection's own headers (twisted.web._newclient's list): never in ``response.headers``.
_CONNECTION_HEADERS = frozenset({
    b"content-length", b"connection", b"keep-alive", b"te", b"trailers", b"transfer-encoding",
    b"upgrade", b"proxy-connection",
})
_HTTP11 = (b"HTTP", 1, 1)
_HEX = b"0123456789abcdefABCDEF"

# How a body is framed
_NONE, _LENGTH, _CHUNKED, _CLOSE = range(4)


# The response head, read

# A header name as read -> (whether it is the connection's own, the key it is filed under)
_NAMES: dict[bytes, tuple[bool, bytes]] = {}


_KEYS: dict[bytes, bytes] = {}


def headers_key(name: bytes) -> bytes:
    """
    The key :class:`Headers` files ``name`` under (lower case up to Twisted 24, Header-Case since),
    asked of ``Headers`` itself once per name, so that a mapping built directly reads as one
    ``Headers`` built; ``ValueError`` for a name ``Headers`` refuses.
    """
    key = _KEYS.get(name)
    if key is None:
        probe = Headers()
        probe.addRawHeader(name, b"")
        [key] = probe._rawHeaders
        if len(_KEYS) < 1000:
            _KEYS[name] = key
    return key


def _name(name: bytes) -> tuple[bool, bytes]:
    """
    Where a header goes: the connection's own are keyed in lower case; the others under the key
    ``Headers`` files them under (lower case up to Twisted 24, Header-Case since), asked of
    ``Headers`` itself once per name so that it refuses what ``Headers`` refuses. The mapping is then
    built directly, values as read (split on line ends, they hold none).
    """
    found = _NAMES.get(name)
    if found is None:
        lower = name.lower()
        if lower in _CONNECTION_HEADERS:
            found = (True, lower)
        else:
            try:
                found = (False, headers_key(name))
            except ValueError:
                raise ParseError("invalid header name", name) from None
        if len(_NAMES) < 1000:
            _NAMES[name] = found
    return found


def _lines(head: bytes) -> list[bytes]:
    if head.count(b"\n") == head.count(b"\r\n"):
        lines = head.split(b"\r\n")
    else:  # lines ended by LF alone, as some servers write them (Agent reads them too)
        lines = [line[:-1] if line.endswith(b"\r") else line for line in head.split(b"\n")]
    if b"\n " in head or b"\n\t" in head:  # obsolete line folding: a header continued on the next line
        folded: list[bytes] = []
        for line in lines:
            if line[:1] in (b" ", b"\t") and len(folded) > 1:
                folded[-1] += line
            else:
                folded.append(line)
        lines = folded
    return lines


def _version(text: bytes) -> tuple[bytes, int, int]:
    if text == b"HTTP/1.1":
        return _HTTP11
    try:
        protocol, number = text.split(b"/")
        major, minor = (int(part) for part in number.split(b"."))
    except ValueError as e:
        raise BadResponseVersion(str(e), text) from None
    if major < 0 or minor < 0:
        raise BadResponseVersion("version may not be negative", text)
    return protocol, major, minor


def parse_head(head: bytes, head_request: bool) -> tuple[tuple[bytes, int, int], int, bytes, dict, dict]:
    """
    A response head (without its blank line) as ``(version, code, phrase, headers, connection
    headers)``; both mappings hold lists of values, ``headers`` keyed as :class:`Headers` keys
    them, the connection's own keyed in lower case. Raises :class:`ParseError`.
    """
    lines = _lines(head)
    status = lines[0]
    parts = status.split(b" ", 2)
    if len(parts) == 3:
        version, code_text, phrase = parts
    elif len(parts) == 2:  # some servers omit the phrase
        (version, code_text), phrase = parts, b""
    else:
        raise ParseError("wrong number of parts", status)
    if not code_text.isdigit():
        raise ParseError("non-integer status code", status)
    headers: dict[bytes, list[bytes]] = {}
    connection: dict[bytes, list[bytes]] = {}
    names = _NAMES
    for line in lines[1:]:
        name, colon, value = line.partition(b":")
        if not colon:
            raise ParseError("header line without a colon", line)
        own, key = names.get(name) or _name(name)
        filed = connection if own else headers
        values = filed.get(key)
        if values is None:
            filed[key] = [value.strip()]
        else:
            values.append(value.strip())
    if head_request and b"content-length" in connection:  # a HEAD's is the entity's (Agent's rule)
        headers[_header_key_of_content_length()] = connection.pop(b"content-length")
    return _version(version), int(code_text), phrase, headers, connection


def _header_key_of_content_length() -> bytes:
    return headers_key(b"Content-Length")


def _has_token(values: list[bytes], token: bytes) -> bool:
    return any(part.strip().lower() == token for value in values for part in value.split(b","))


def _content_length(values: list[bytes]) -> int:
    """Content-Length, repeated or listed only with one value (twisted.web._newclient's rule)."""
    if len(values) == 1 and values[0].isdigit():
        return int(values[0])
    found = set()
    for part in b",".join(values).split(b","):
        part = part.strip(b" \t")
        if not part.isdigit():
            raise ParseError("invalid Content-Length", part)
        found.add(int(part))
    if len(found) != 1:
        raise ParseError("conflicting Content-Length values", b",".join(values))
    return found.pop()


def framing(version: tuple, code: int, head_request: bool, connection: dict) -> tuple[int, int | object, bool]:
    """How the body is framed, its length (``UNKNOWN_LENGTH`` if not known), whether the connection stays."""
    said = connection.get(b"connection")
    if version == _HTTP11:
        keep = not (said and _has_token(said, b"close"))
    else:
        keep = bool(said) and _has_token(said, b"keep-alive") and not _has_token(said, b"close")
    if head_request or code in _NO_BODY_CODES:
        return _NONE, 0, keep
    codings = connection.get(b"transfer-encoding")
    if codings:
        if [c.strip().lower() for c in b",".join(codings).split(b",")] != [b"chunked"]:
            raise ParseError("unsupported transfer coding", b",".join(codings))
        return _CHUNKED, UNKNOWN_LENGTH, keep and b"content-length" not in connection
    lengths = connection.get(b"content-length")
    if lengths is None:
        return _CLOSE, UNKNOWN_LENGTH, False
    length = _content_length(lengths)
    return (_LENGTH if length else _NONE), length, keep


class _Chunks:
    """The chunked transfer coding undone (RFC 9112 7.1): sizes, data, and trailers read and dropped."""

    __slots__ = ("left", "line", "state")
    SIZE, DATA, DATA_END, TRAILER = range(4)

    def __init__(self) -> None:
        self.state = self.SIZE
        self.left = 0
        self.line = b""

    def feed(self, data: bytes, deliver: Any) -> bytes | None:
        """Hands the data on to ``deliver``; returns what follows the body once it is over, else None."""
        pos, end = 0, len(data)
        while pos < end:
            state = self.state
            if state == self.DATA:
                take = min(self.left, end - pos)
                deliver(data if take == end else data[pos : pos + take])
                pos += take
                self.left -= take
                if not self.left:
                    self.state = self.DATA_END
                continue
            newline = data.find(b"\n", pos)
            if newline < 0:
                self.line += data[pos:]
                if len(self.line) > _MAX_CHUNK_LINE:
                    raise ParseError("chunk line too long", self.line[:64])
                return None
            line, self.line = self.line + data[pos:newline], b""
            pos = newline + 1
            if line.endswith(b"\r"):
                line = line[:-1]
            if state == self.SIZE:
                size = line.split(b";", 1)[0].strip(b" \t")
                if not size or size.strip(_HEX):
                    raise ParseError("invalid chunk size", line[:64])
                self.left = int(size, 16)
                self.state = self.DATA if self.left else self.TRAILER
            elif state == self.DATA_END:
                if line:
                    raise ParseError("chunk data longer than its size", line[:64])
                self.state = self.SIZE
            elif not line:  # the blank line after the trailers
                return data[pos:]
        return None


# The request, written

def request_head(method: bytes, uri: bytes, headers: Headers | None, body: IBodyProducer | None, persistent: bool) -> bytes:
    """
    The request line and headers for an absolute ``uri``, in one piece: ``Host`` from the URI if
    ``headers`` has none, the body's framing, ``Connection: close`` when the connection is not kept.
    Raises ``ValueError`` for a method or target that would split the request.
    """
    scheme, separator, rest = uri.partition(b"://")
    if not separator:
        raise ValueError(f"not an absolute URI: {uri!r}")
    cut = len(rest)
    for mark in (b"/", b"?"):
        found = rest.find(mark)
        if 0 <= found < cut:
            cut = found
    authority, target = rest[:cut], rest[cut:] or b"/"
    if target[:1] == b"?":
        target = b"/" + target
    for part in (method, target):
        if b" " in part or b"\r" in part or b"\n" in part or not part:
            raise ValueError(f"invalid request line part: {part!r}")
    pieces = [method, b" ", target, b" HTTP/1.1\r\n"]
    if headers is None or not headers.hasHeader(b"host"):
        default = b":443" if scheme == b"https" else b":80"
        host = authority[: -len(default)] if authority.endswith(default) else authority
        pieces += (b"Host: ", host, b"\r\n")
    if headers is not None:
        for name, values in headers.getAllRawHeaders():
            for value in values:
                pieces += (name, b": ", value, b"\r\n")
    if body is None:
        if method in _SAYS_EMPTY_BODY:
            pieces.append(b"Content-Length: 0\r\n")
    elif body.length is UNKNOWN_LENGTH:
        pieces.append(b"Transfer-Encoding: chunked\r\n")
    else:
        pieces.append(b"Content-Length: %d\r\n" % body.length)
    if not persistent:
        pieces.append(b"Connection: close\r\n")
    pieces.append(b"\r\n")
    return b"".join(pieces)


class _BodyWriter:
    """The consumer a request body's producer writes to: its framing, and its declared length held to."""

    __slots__ = ("_chunked", "_conn", "_left", "_producer", "_transport")

    def __init__(self, conn: _Connection, producer: IBodyProducer) -> None:
        self._conn = conn
        self._producer = producer
        self._transport = conn.transport
        self._chunked = producer.length is UNKNOWN_LENGTH
        self._left = 0 if self._chunked else producer.length

    def write(self, data: bytes) -> None:
        if not data:
            return
        if self._chunked:
            self._transport.writeSequence((b"%x\r\n" % len(data), data, b"\r\n"))
            return
        self._left -= len(data)
        if self._left < 0:
            self._producer.stopProducing()
            self._conn.body_failed(Failure(WrongBodyLength("more bytes than the declared length")), self._producer)
            return
        self._transport.write(data)

    def finish(self) -> None:
        if self._chunked:
            self._transport.write(b"0\r\n\r\n")
        elif self._left:
            raise WrongBodyLength(f"{self._left} bytes fewer than the declared length")

    def registerProducer(self, producer: Any, streaming: bool) -> None:  # noqa: N802 - IConsumer
        """The connection registered the producer with its transport already."""

    def unregisterProducer(self) -> None:  # noqa: N802 - IConsumer
        pass


# The response, handed over

@implementer(IResponse)
class HubResponse:
    """
    One answer from the hub; to its body protocol it is also the transport (a push producer over
    the hub connection). Once the body has ended, pausing or stopping it does nothing: the
    connection may already be serving another request.
    """

    request = None
    previousResponse = None  # noqa: N815 - IResponse

    def __init__(self, conn: _Connection, version: tuple, code: int, phrase: bytes, headers: Headers, length: Any) -> None:
        self.version = version
        self.code = code
        self.phrase = phrase
        self.headers = headers
        self.length = length
        self._conn: _Connection | None = conn
        self._protocol: Protocol | None = None
        self._held: list[bytes] | None = None
        self._held_size = 0
        self._held_paused = False  # the hub paused until someone reads the held bytes
        self._paused = False  # by the body protocol
        self._ended: Failure | None = None

    def setPreviousResponse(self, response: IResponse) -> None:  # noqa: N802 - IResponse
        self.previousResponse = response

    def deliverBody(self, protocol: Protocol) -> None:  # noqa: N802 - IResponse
        if self._protocol is not None:
            raise RuntimeError("the response body was already delivered")
        self._protocol = protocol
        protocol.makeConnection(self)
        held, self._held = self._held, None
        for data in held or ():
            protocol.dataReceived(data)
        if self._held_paused:
            self._held_paused = False
            if not self._paused and self._conn is not None:
                self._conn.resume()
        if self._ended is not None:
            protocol.connectionLost(self._ended)

    # the body protocol's transport

    def pauseProducing(self) -> None:  # noqa: N802 - IPushProducer
        self._paused = True
        if self._conn is not None:
            self._conn.pause()

    def resumeProducing(self) -> None:  # noqa: N802
        self._paused = False
        if self._conn is not None and not self._held_paused:
            self._conn.resume()

    def stopProducing(self) -> None:  # noqa: N802
        """Drops the hub connection; the body ends with ``ResponseFailed`` once it is closed."""
        if self._conn is not None:
            self._conn.abandon()

    loseConnection = abortConnection = stopProducing  # noqa: N815 - what readBody's cancel looks for

    # from the connection

    def data(self, data: bytes) -> None:
        protocol = self._protocol
        if protocol is not None:
            protocol.dataReceived(data)
            return
        if self._held is None:
            self._held = []
        self._held.append(data)
        self._held_size += len(data)
        if self._held_size > HOLD_UNREAD and not self._held_paused and self._conn is not None:
            self._held_paused = True
            self._conn.pause()

    def end(self, reason: Failure) -> None:
        if self._ended is not None:
            return
        self._ended = reason
        self._conn = None
        if self._protocol is not None:
            self._protocol.connectionLost(reason)


# One connection

class _Connection(Protocol):
    """One hub connection: one request at a time, its answer read and framed here."""

    def __init__(self, client: HubClient) -> None:
        self.client = client
        self.call: _Call | None = None  # the request waiting for its answer's head
        self.response: HubResponse | None = None  # the answer whose body is arriving
        self.body: IBodyProducer | None = None  # the request body still being written
        self.buffer = b""
        self.mode = _NONE
        self.remaining = 0
        self.chunks: _Chunks | None = None
        self.keep = False
        self.stale_may_retry = False
        self.heard = False
        self.head_request = False
        self.paused = False
        self.dead = False  # closing or closed: never pooled, never written to again
        self.idle_timer: Any = None
        self._closed: list[Deferred] = []

    def send(self, call: _Call, stale_may_retry: bool) -> None:
        self.call = call
        self.stale_may_retry = stale_may_retry
        self.heard = False
        self.keep = self.client.persistent
        self.head_request = call.method == b"HEAD"
        self.transport.write(call.head)
        if call.body is not None:
            self._send_body(call.body)

    def _send_body(self, producer: IBodyProducer) -> None:
        self.body = producer
        writer = _BodyWriter(self, producer)
        self.transport.registerProducer(producer, True)
        try:
            sending = producer.startProducing(writer)
        except Exception:
            sending = fail()
        sending.addCallbacks(self._body_sent, self.body_failed, (producer, writer), None, (producer,))

    def _body_sent(self, _: object, producer: IBodyProducer, writer: _BodyWriter) -> None:
        if self.body is not producer:
            return
        try:
            writer.finish()
        except WrongBodyLength:
            self.body_failed(Failure(), producer)
            return
        self.body = None
        self.transport.unregisterProducer()

    def body_failed(self, failure: Failure, producer: IBodyProducer) -> None:
        if self.body is not producer:
            return None  # stopped by us, or superseded: nobody waits for it
        self.body = None
        self.transport.unregisterProducer()
        call, self.call = self.call, None
        self.abandon()
        if call is not None:
            call.failed(Failure(RequestGenerationFailed([failure])), stale=False)
        return None  # an answer already under way ends as the connection closes

    def dataReceived(self, data: bytes) -> None:  # noqa: N802 - Twisted interface name
        if self.response is not None:
            if not self.dead:  # a reader that stopped gets nothing more
                self._body_data(data)
        elif self.call is not None:
            self.heard = True
            self._head_data(data)
        elif data and not self.dead:
            self.abandon()  # bytes nobody asked for: this connection cannot be trusted again

    def _head_data(self, data: bytes) -> None:
        buffer = self.buffer + data if self.buffer else data
        while True:
            end = buffer.find(b"\r\n\r\n")
            if end >= 0 and buffer.find(b"\n\n", 0, end) < 0:
                head, rest = buffer[:end], buffer[end + 4 :]
            else:
                ends = [(at, size) for at, size in ((buffer.find(b"\n\n"), 2), (buffer.find(b"\n\r\n"), 3)) if at >= 0]
                if not ends:
                    self.buffer = buffer
                    if len(buffer) > MAX_HEAD:
                        self._broken(Failure(ParseError("response head too long", buffer[:64])))
                    return
                at, size = min(ends)
                head, rest = buffer[:at], buffer[at + size :]
            try:
                version, code, phrase, raw, connection = parse_head(head, self.head_request)
                if 100 <= code < 200:  # an interim answer (100 Continue): the real one follows
                    buffer = rest
                    continue
                mode, length, keep = framing(version, code, self.head_request, connection)
            except ParseError:
                self._broken(Failure())
                return
            break
        self.buffer = b""
        if not keep:
            self.keep = False
        headers = Headers()
        headers._rawHeaders = raw
        response = HubResponse(self, version, code, phrase, headers, length)
        call, self.call = self.call, None
        self.mode = mode
        if mode == _NONE:
            self._complete(response, rest)  # back in the pool before the answer is handed on, as Agent does
            call.answered(response)
            return
        self.response = response
        if mode == _LENGTH:
            self.remaining = length  # type: ignore[assignment]
        elif mode == _CHUNKED:
            self.chunks = _Chunks()
        call.answered(response)
        if rest and self.response is response and not self.dead:
            self._body_data(rest)

    def _body_data(self, data: bytes) -> None:
        response = self.response
        mode = self.mode
        if mode == _LENGTH:
            remaining = self.remaining
            if len(data) < remaining:
                self.remaining = remaining - len(data)
                response.data(data)
                return
            self.remaining = 0
            response.data(data if len(data) == remaining else data[:remaining])
            if self.response is response and not self.dead:
                self._complete(response, data[remaining:])
        elif mode == _CLOSE:
            response.data(data)
        else:
            try:
                rest = self.chunks.feed(data, response.data)
            except ParseError:
                self._broken(Failure())
                return
            if rest is not None and self.response is response and not self.dead:
                self._complete(response, rest)

    def _complete(self, response: HubResponse, extra: bytes) -> None:
        """A whole answer: the connection goes back to the pool (or closes), then the body ends."""
        self.response = None
        self.chunks = None
        if extra or self.body is not None:
            self.keep = False  # stray bytes, or the answer came before the request was all sent
            self._stop_body()
        if self.keep:
            self.client.release(self)
        else:
            self.close()
        response.end(Failure(ResponseDone("Response body fully received")))

    def _broken(self, failure: Failure) -> None:
        """A malformed answer: the connection goes, and whoever waits for it gets ``ResponseFailed``."""
        call, self.call = self.call, None
        response, self.response = self.response, None
        self.abandon()
        wrapped = Failure(ResponseFailed([failure]))
        if call is not None:
            call.failed(wrapped, stale=False)
        if response is not None:
            response.end(wrapped)

    def pause(self) -> None:
        if not self.paused and not self.dead:
            self.paused = True
            self.transport.pauseProducing()

    def resume(self) -> None:
        if self.paused:
            self.paused = False
            if not self.dead:
                self.transport.resumeProducing()

    def _stop_body(self) -> None:
        body, self.body = self.body, None
        if body is not None:
            try:
                self.transport.unregisterProducer()
            finally:
                body.stopProducing()

    def drop_call(self) -> None:
        """The request was cancelled: the connection goes without telling it anything more."""
        self.call = None
        self.abandon()

    def abandon(self) -> None:
        """Drop the connection now (a cancelled or failed request, a reader that stopped)."""
        if self.dead:
            return
        self.dead = True
        self._stop_body()
        abort = getattr(self.transport, "abortConnection", None)
        (abort or self.transport.loseConnection)()

    def close(self) -> None:
        """Close the connection after a whole exchange."""
        if not self.dead:
            self.dead = True
            self._stop_body()  # TLS closes only once no producer is registered
            self.transport.loseConnection()

    def closed(self) -> Deferred:
        """Fires once the connection is closed."""
        d: Deferred = Deferred()
        self._closed.append(d)
        return d

    def connectionLost(self, reason: Failure = connectionDone) -> None:  # noqa: N802
        self.dead = True
        self.client.forget(self)
        sending = self.body is not None
        self._stop_body()
        call, self.call = self.call, None
        response, self.response = self.response, None
        if call is not None:
            if sending:
                call.failed(Failure(RequestTransmissionFailed([reason])), stale=False)
            elif self.heard:
                call.failed(Failure(ResponseFailed([reason])), stale=False)
            else:
                call.failed(Failure(ResponseNeverReceived([reason])), stale=self.stale_may_retry)
        elif response is not None:
            if self.mode == _CLOSE:
                response.end(Failure(PotentialDataLoss()))
            else:
                response.end(Failure(ResponseFailed([reason])))
        waiting, self._closed = self._closed, []
        for d in waiting:
            d.callback(None)


class _ConnectionFactory(Factory):
    noisy = False  # no "Starting factory" line per hub connection

    def __init__(self, client: HubClient) -> None:
        self.client = client

    def buildProtocol(self, addr: Any) -> _Connection:  # noqa: N802 - Twisted interface name
        return _Connection(self.client)


class _Call:
    """One request until its answer's head: the connection it waits for, its one retry, its cancellation."""

    __slots__ = ("body", "client", "conn", "connecting", "head", "method", "result", "settled")

    def __init__(self, client: HubClient, method: bytes, head: bytes, body: IBodyProducer | None) -> None:
        self.client = client
        self.method = method
        self.head = head
        self.body = body
        self.result: Deferred = Deferred(self._cancel)
        self.conn: _Connection | None = None
        self.connecting: Deferred | None = None
        self.settled = False

    def connect(self) -> None:
        self.connecting = self.client.open()
        self.connecting.addCallbacks(self._connected, self._not_connected)

    def _connected(self, conn: _Connection) -> None:
        self.connecting = None
        if self.settled:
            conn.close()
            return
        self.send(conn, stale_may_retry=False)

    def _not_connected(self, failure: Failure) -> None:
        self.connecting = None
        self._fail(failure)

    def send(self, conn: _Connection, stale_may_retry: bool) -> None:
        self.conn = conn
        conn.send(self, stale_may_retry)

    def answered(self, response: HubResponse) -> None:
        self.conn = None
        if not self.settled:
            self.settled = True
            self.result.callback(response)

    def failed(self, failure: Failure, stale: bool) -> None:
        self.conn = None
        if self.settled:
            return
        if stale:
            self.connect()  # the pooled connection had been closed: once more, on a new one
        else:
            self._fail(failure)

    def _fail(self, failure: Failure) -> None:
        if not self.settled:
            self.settled = True
            self.result.errback(failure)

    def _cancel(self, _: Deferred) -> None:
        if self.settled:
            return
        self.settled = True
        connecting, self.connecting = self.connecting, None
        if connecting is not None:
            connecting.cancel()
        conn, self.conn = self.conn, None
        if conn is not None:
            conn.drop_call()
        self.result.errback(Failure(ResponseNeverReceived([Failure(CancelledError())])))


@implementer(IAgent)
class HubClient:
    """
    Agent's ``request()`` over one endpoint, with a pool of its connections. ``persistent=False``
    (``login``, ``check``): every connection closes after its answer and says so in the request.
    """

    def __init__(
        self,
        reactor: IReactorTime,
        endpoint: IStreamClientEndpoint,
        persistent: bool = True,
        idle_seconds: float = 4.0,
        max_idle: int = MAX_IDLE,
    ) -> None:
        self._reactor = reactor
        self._endpoint = endpoint
        self.persistent = persistent
        self._idle_seconds = idle_seconds
        self._max_idle = max_idle
        self._idle: list[_Connection] = []
        self._factory = _ConnectionFactory(self)

    def request(
        self, method: bytes, uri: bytes, headers: Headers | None = None, bodyProducer: IBodyProducer | None = None  # noqa: N803
    ) -> Deferred:
        """Fires with a :class:`HubResponse` once its head has arrived (IAgent)."""
        try:
            head = request_head(method, uri, headers, bodyProducer, self.persistent)
        except ValueError:
            return fail(RequestGenerationFailed([Failure()]))
        call = _Call(self, method, head, bodyProducer)
        conn = self._take()
        if conn is None:
            call.connect()
        else:
            call.send(conn, stale_may_retry=bodyProducer is None and method in _SENT_AGAIN_WHEN_STALE)
        return call.result

    @property
    def idle(self) -> int:
        """Connections in the pool now (for tests and the status page)."""
        return len(self._idle)

    def close_idle(self) -> Deferred:
        """Closes every idle connection; fires once they are closed (a test's clean-up, a stop)."""
        idle, self._idle = self._idle, []
        waits = []
        for conn in idle:
            self._stop_timer(conn)
            waits.append(conn.closed())
            conn.close()
        return gatherResults(waits)

    # from the calls and connections

    def open(self) -> Deferred:
        return self._endpoint.connect(self._factory)

    def _take(self) -> _Connection | None:
        idle = self._idle
        while idle:
            conn = idle.pop()
            if not conn.dead:
                return conn
        return None

    def release(self, conn: _Connection) -> None:
        if not self.persistent or len(self._idle) >= self._max_idle:
            conn.close()
            return
        conn.resume()  # a slow reader may have paused it in the middle of the body
        self._idle.append(conn)
        # The timer runs on while the connection is in use (firing then does nothing) and is pushed
        # back when it returns: cheaper per request than a new timer each time.
        timer = conn.idle_timer
        if timer is not None and timer.active():
            timer.reset(self._idle_seconds)
        else:
            conn.idle_timer = self._reactor.callLater(self._idle_seconds, self._expire, conn)

    def _expire(self, conn: _Connection) -> None:
        conn.idle_timer = None
        if conn in self._idle:
            self._idle.remove(conn)
            conn.close()

    def forget(self, conn: _Connection) -> None:
        if conn in self._idle:
            self._idle.remove(conn)
        self._stop_timer(conn)

    @staticmethod
    def _stop_timer(conn: _Connection) -> None:
        timer, conn.idle_timer = conn.idle_timer, None
        if timer is not None and timer.active():
            timer.cancel()
