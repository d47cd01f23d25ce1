"""
The HTTP side of the proxy: every local request is re-issued on the hub under the user's prefix.

It keeps :class:`twisted.web.proxy.ReverseProxyResource` as its base, so it is recognisably a Twisted
reverse proxy, but replaces the transport: ``ProxyClient`` speaks HTTP/1.0, opens a TCP connection per
request, cannot do TLS and has no backpressure. Here a :class:`~jds.hubclient.HubClient` (Agent's
contract, less CPU per request) with a connection pool runs over
:class:`~jds.tls.HubTLSPolicy`'s pinned endpoint, bodies stream both ways with
producers (the IDE's to the hub while they arrive, :mod:`jds.upload`), and an upstream that dies mid-body aborts the client's response instead of ending it as if
it were complete.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from io import BytesIO
from typing import Any
from typing import Protocol as TypingProtocol
from urllib.parse import quote

from twisted.internet.defer import CancelledError, Deferred, TimeoutError
from twisted.internet.interfaces import IPushProducer, IReactorTime, IStreamClientEndpoint
from twisted.internet.protocol import Protocol
from twisted.internet.task import LoopingCall, deferLater
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import FileBodyProducer, ResponseDone
from twisted.web.http import PotentialDataLoss
from twisted.web.http_headers import Headers
from twisted.web.iweb import UNKNOWN_LENGTH, IAgent, IBodyProducer, IResponse
from twisted.web.proxy import ReverseProxyResource
from twisted.web.server import NOT_DONE_YET, Request
from zope.interface import implementer

from jds.auth import Credentials, StreamScrubber, missing_xsrf, needs_local_token
from jds.deadlines import Deadlines
from jds.errors import Refusal, render_refusal, write_refusal
from jds.hub import ServerStarter, looks_stopped, may_be_dead_token, server_not_running
from jds.hubclient import HubClient, headers_key
from jds.hublink import HubLink
from jds.logs import clip, quoted
from jds.paths import (
    MAX_REWRITTEN_BODY,
    HubTarget,
    ModelHeadMapper,
    body_too_large_to_map,
    in_ide_view,
    is_kernel_start,
    local_path,
    map_request_body,
    map_request_path,
    map_response_body,
    map_response_headers,
    request_body_kind,
    response_body_kind,
    split_token,
    upstream_request_headers,
)
from jds.retry import RetryPlan, may_retry
from jds.tls import HubTLSPolicy
from jds.upload import StreamedBody

log = Logger(namespace="jds.proxy")

__all__ = ["HubProxyResource", "ResponseTimeouts", "WebSocketUpgrader", "make_agent"]

# Node's http server (configurable-http-proxy) drops idle keep-alive connections after 5 s; closing
# ours first avoids sending a request down a socket the hub is closing.
IDLE_UPSTREAM_SECONDS = 4.0
# Status codes whose responses never have a body (RFC 9110 6.4.1).
_NO_BODY = {204, 304}
_BODYLESS_METHODS = (b"GET", b"HEAD", b"DELETE", b"OPTIONS")
_CANNOT_SEND_AGAIN = object()


@dataclass(frozen=True)
class ResponseTimeouts:
    """
    How long the hub may take to answer: any request (long enough for a large save, short of for
    ever), and a kernel start, which waits for a batch job or pod to run and gets its own limit.
    While a kernel start waits, a log line every ``progress_interval`` seconds says so.
    """

    response: float = 300.0
    kernel_start: float = 1800.0
    progress_interval: float = 60.0
    # A response body that makes no progress this long (the hub gone silent mid-download) is aborted.
    stall: float = 60.0

    def limit(self, kernel_start: bool) -> tuple[float, str]:
        """The limit for a request, and the option that sets it."""
        if kernel_start:
            return self.kernel_start, "--kernel-start-timeout"
        return self.response, "--response-timeout"


class WebSocketUpgrader(TypingProtocol):
    """What the proxy hands ``Upgrade: websocket`` requests to (see :mod:`jds.relay`)."""

    def render_upgrade(self, request: Request, hub_path: bytes, query: bytes) -> bytes | int: ...


@implementer(IStreamClientEndpoint)
class _PinnedEndpoint:
    """The policy's endpoint, built on the first connection and kept (building it per request cost 4-8 % CPU)."""

    def __init__(self, policy: HubTLSPolicy) -> None:
        self._policy = policy
        self._endpoint: IStreamClientEndpoint | None = None

    def connect(self, protocolFactory):  # noqa: N803 - IStreamClientEndpoint
        if self._endpoint is None:
            # Handed over only after the TLS handshake: a request whose connection failed was not sent.
            self._endpoint = self._policy.endpoint(after_handshake=True)
        return self._endpoint.connect(protocolFactory)


def make_agent(reactor: IReactorTime, policy: HubTLSPolicy, persistent: bool = True) -> HubClient:
    """The pinned hub client; ``persistent=False`` for one-off commands that may block between requests."""
    return HubClient(reactor, _PinnedEndpoint(policy), persistent=persistent, idle_seconds=IDLE_UPSTREAM_SECONDS)


def _flatten(headers: Headers) -> list[tuple[bytes, bytes]]:
    return [(name, value) for name, values in headers.getAllRawHeaders() for value in values]


def _headers(pairs: list[tuple[bytes, bytes]]) -> Headers:
    """
    ``pairs`` as :class:`Headers` hold them (a CR or LF in a value folded to a space), built in one
    pass under the keys ``Headers`` itself uses (:func:`jds.hubclient.headers_key`): ``Headers(grouped)``
    re-splits every value and calls a method per name, twice per request. A name that comes twice in
    different case keeps all its values.
    """
    raw: dict[bytes, list[bytes]] = {}
    for name, value in pairs:
        if 13 in value or 10 in value:  # CR, LF (an int's membership test is several times a bytes one's speed)
            value = b" ".join(value.splitlines())
        raw.setdefault(headers_key(name), []).append(value)
    headers = Headers()
    headers._rawHeaders = raw
    return headers


def is_websocket_upgrade(request: Request) -> bool:
    upgrade = request.requestHeaders.getRawHeaders(b"upgrade") or []
    return any(value.strip().lower() == b"websocket" for value in upgrade)


def _streamed(request: Request) -> StreamedBody | None:
    """The request's body when it goes to the hub as it arrives (:mod:`jds.upload`), else ``None``."""
    body = getattr(request, "body", None)
    return body if isinstance(body, StreamedBody) else None


def _body_size(request: Request) -> int:
    body = _streamed(request)
    if body is not None:
        return body.size
    content = request.content
    if content is None:
        return 0
    position = content.tell()
    size = content.seek(0, 2)
    content.seek(position)
    return size


class _KeptOpen:
    """
    The spooled request body, handed to ``FileBodyProducer`` without letting it close the file:
    a request that meets a stopped server is replayed with the same body once the server is up.
    """

    def __init__(self, content) -> None:
        self._content = content

    def read(self, size: int = -1) -> bytes:
        return self._content.read(size)

    def seek(self, offset: int, whence: int = 0) -> int:
        return self._content.seek(offset, whence)

    def tell(self) -> int:
        return self._content.tell()

    def close(self) -> None:
        pass


class _BodyRelay(Protocol):
    """
    Streams one upstream body to the client. The upstream transport is registered as the client
    request's producer, so a slow client pauses reading from the hub instead of filling memory.
    ``scrubber`` filters the body on the way (``feed`` each piece, ``flush`` at the end).

    A hub that goes silent in the middle (no FIN, no reset) would hold the client for ever: a body
    that makes no progress for ``ResponseTimeouts.stall`` seconds, while the client is ready for
    more, is aborted (:meth:`_Exchange.abort_client`). Per piece this costs one clock read; the
    watch is an entry in the resource's :class:`~jds.deadlines.Deadlines` (no timer of its own,
    which a small body arriving in one piece would set and cancel), looked at only when due.
    """

    def __init__(self, exchange: _Exchange, scrubber: StreamScrubber | ModelHeadMapper | None) -> None:
        self._exchange = exchange
        self._scrubber = scrubber
        resource = exchange.resource
        self._clock = resource.reactor.seconds
        self._deadlines = resource.deadlines
        self._stall = resource.timeouts.stall
        self._last = 0.0
        self._watching = False

    def connectionMade(self) -> None:
        self.resume_watch()  # first: a client that is not ready yet pauses it as it is registered
        self._exchange.streaming(_StallPause(self.transport, self))

    def dataReceived(self, data: bytes) -> None:
        self._last = self._clock()
        if self._scrubber is not None:
            data = self._scrubber.feed(data)
        self._exchange.write(data)

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self.pause_watch()
        if self._scrubber is not None and reason.check(ResponseDone, PotentialDataLoss):
            self._exchange.write(self._scrubber.flush())
        self._exchange.body_ended(reason)

    def pause_watch(self) -> None:
        """The client is not ready for more: no progress is expected of the hub meanwhile."""
        if self._watching:
            self._watching = False
            self._deadlines.discard(self)

    def resume_watch(self) -> None:
        if self._stall > 0 and not self._watching:
            self._watching = True
            self._last = self._clock()
            self._deadlines.set(self, self._last + self._stall, self._look)

    def _look(self) -> float | None:
        """Due: a later due if a piece came meanwhile, else the client is dropped."""
        idle = self._clock() - self._last
        if idle < self._stall:
            return self._last + self._stall
        self._watching = False
        # the client was ready for more all along (its pauses stop this watch): drop it, never finish
        self._exchange.abort_client(
            f"the hub sent nothing of the response for {idle:.0f} s (--stall-timeout)",
            Failure(TimeoutError("no progress")),
        )
        self.transport.stopProducing()
        return None


class _BodyReader(_BodyRelay):
    """A body read whole to be mapped (bounded JSON, kernelspecs), under the same stall watch."""

    def __init__(self, exchange: _Exchange) -> None:
        super().__init__(exchange, None)
        self._pieces: list[bytes] = []

    def connectionMade(self) -> None:
        self._exchange.streaming(_StallPause(self.transport, self), to_client=False)
        self.resume_watch()

    def dataReceived(self, data: bytes) -> None:
        self._last = self._clock()
        self._pieces.append(data)

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self.pause_watch()
        self._exchange.body_read(b"".join(self._pieces), reason)


@implementer(IPushProducer)
class _StallPause:
    """The upstream body as the client's producer: pausing it (a slow client) also pauses the stall watch."""

    def __init__(self, transport: Any, relay: _BodyRelay) -> None:
        self._transport = transport
        self._relay = relay

    def pauseProducing(self) -> None:
        self._relay.pause_watch()
        self._transport.pauseProducing()

    def resumeProducing(self) -> None:
        self._transport.resumeProducing()
        self._relay.resume_watch()

    def stopProducing(self) -> None:
        self._relay.pause_watch()
        self._transport.stopProducing()


class _Discard(Protocol):
    def connectionMade(self) -> None:
        self.transport.stopProducing()


class _NoAnswer(TimeoutError):
    """The hub did not answer within the request's limit (not a connect timeout: that is a 502)."""


class _ClientGone:
    """
    Stands in ``Request.notifications`` for ``notifyFinish()``'s Deferred, one fewer per request:
    ``finish()`` calls ``callback``, a lost connection ``errback``, as they would the Deferred's.
    """

    __slots__ = ("_exchange",)

    def __init__(self, exchange: _Exchange) -> None:
        self._exchange = exchange

    def callback(self, result: object) -> None:
        pass

    def errback(self, reason: Failure) -> None:
        self._exchange._client_went_away(reason)


def _body_producer(request: Request) -> IBodyProducer | None | object:
    """The body for one attempt; ``_CANNOT_SEND_AGAIN`` for a streamed one that is no longer whole."""
    streamed = _streamed(request)
    if streamed is not None:
        producer = streamed.producer()
        return _CANNOT_SEND_AGAIN if producer is None else producer
    content = request.content
    if content is None:
        return None
    size = _body_size(request)
    content.seek(0)
    has_length = request.requestHeaders.hasHeader(b"content-length")
    if size == 0 and not has_length and request.method in _BODYLESS_METHODS:
        return None
    return FileBodyProducer(_KeptOpen(content))


def _rewrites_body(body_kind: str | None, response: IResponse, content_type: bytes) -> bool:
    """
    Bodies with paths to map are read whole, so only JSON answers of a known, bounded length;
    a larger one (a big file's model) streams, only its leading members mapped on the way.
    """
    if body_kind is None or response.code not in (200, 201):
        return False
    if body_kind == "kernelspecs":
        return True
    return (
        content_type.startswith(b"application/json")
        and response.length is not UNKNOWN_LENGTH
        and response.length <= MAX_REWRITTEN_BODY
    )


def _waiting_reporter(reactor: Any, interval: float, say: Callable[[float], None]) -> Callable[[object], object]:
    """Calls ``say(minutes so far)`` every ``interval`` seconds; returns the callback that stops it."""
    began = reactor.seconds()
    ticker = LoopingCall(lambda: say((reactor.seconds() - began) / 60))
    ticker.clock = reactor
    ticker.start(interval, now=False)

    def stop(result: object) -> object:
        if ticker.running:
            ticker.stop()
        return result

    return stop


class _Exchange:
    """One client request and its upstream counterpart, tied together until both are over."""

    def __init__(
        self, resource: HubProxyResource, request: Request, hub_path: bytes, query: bytes, ide_view: bool = True
    ) -> None:
        self.resource = resource
        self.request = request
        self.hub_path = hub_path
        self.query = query
        self.body_kind = self._response_body_kind(ide_view)
        self._pending: Deferred | None = None
        self._upstream_body = None
        self._client_gone = False
        self._replayed = False
        self._held: IResponse | None = None
        self._retry: RetryPlan | None = None
        self.limit, self.limit_option = 0.0, ""
        self._timed_out = False
        self.authorization: bytes | None = None  # the upstream Authorization: whose token starts a server
        self._answered = False  # by the proxy itself, while the server starts
        self.set_cookies: tuple[bytes, ...] = ()
        notifications = getattr(request, "notifications", None)
        if type(notifications) is list:  # twisted.web's Request: told as its Deferreds are, without one
            notifications.append(_ClientGone(self))
        else:
            request.notifyFinish().addErrback(self._client_went_away)

    def start(self) -> None:
        request, target, credentials = self.request, self.resource.target, self.resource.credentials
        query, token = split_token(self.query)
        headers, token = credentials.upstream(_flatten(request.requestHeaders), token)
        headers = upstream_request_headers(
            headers,
            target,
            client_ip=getattr(request.getClientAddress(), "host", "127.0.0.1"),
            local_host=request.getHeader(b"host"),
            query_token=token,
        )
        if self.body_kind is not None or credentials.managed:
            # Bodies that are rewritten or scrubbed must arrive uncompressed.
            headers = [(n, v) for n, v in headers if n.lower() != b"accept-encoding"]
        upstream = _headers(headers)
        self.authorization = (upstream.getRawHeaders(b"authorization") or [None])[0]
        uri = target.origin + self.hub_path + (b"?" + query if query else b"")
        body = _body_producer(self.request)
        if body is _CANNOT_SEND_AGAIN:  # a replay, but the streamed body is no longer whole here
            self._answered = True
            if not self._client_gone:
                write_refusal(self.request, self._not_held())
            return
        # A hub that accepts the connection but never answers must not hold the request for ever;
        # a kernel start, though, may rightly take many minutes. The deadline ends with the answer
        # (_got_response) or the failure (_failed), which may come before request() returns.
        kernel_start = is_kernel_start(request.method, local_path(self.hub_path, target) or b"")
        self.limit, self.limit_option = self.resource.timeouts.limit(kernel_start)
        self._pending = self.resource.agent.request(request.method, uri, upstream, body)
        resource = self.resource
        resource.deadlines.set(self, resource.reactor.seconds() + self.limit, self._no_answer)
        if kernel_start:
            self._pending.addBoth(self._report_waiting())
        self._pending.addCallbacks(self._got_response, self._failed)

    def _no_answer(self) -> None:
        """The request's limit passed without an answer: it is cancelled, and ``_failed`` says why."""
        self._timed_out = True
        if self._pending is not None:
            self._pending.cancel()

    def _report_waiting(self) -> Callable[[object], object]:
        """Log every minute while a kernel start waits; returns the callback that stops it."""

        def still_waiting(minutes: float) -> None:
            log.info(
                "{method} {path}: still waiting for the kernel to start ({minutes:.0f} min so far; "
                "up to {limit:g} s, {option}).",
                method=clip(self.request.method.decode("latin-1"), 32), path=quoted(self.hub_path),
                minutes=minutes, limit=self.limit, option=self.limit_option,
            )

        return _waiting_reporter(self.resource.reactor, self.resource.timeouts.progress_interval, still_waiting)

    def _is_api(self) -> bool:
        local = local_path(self.hub_path, self.resource.target) or b""
        accept = self.request.getHeader(b"accept") or b""
        return local.startswith(b"/api/") or b"application/json" in accept

    def _response_body_kind(self, ide_view: bool) -> str | None:
        """Which answers carry paths to map (see :func:`jds.paths.response_body_kind`)."""
        rooted = ide_view and bool(self.resource.target.root)
        if not rooted and b"kernelspecs" not in self.hub_path:
            return None  # the common case, decided without parsing the path
        local = local_path(self.hub_path, self.resource.target)
        return None if local is None else response_body_kind(self.request.method, local, rooted)

    def _got_response(self, response: IResponse) -> None:
        self.resource.deadlines.discard(self)
        if self._timed_out:  # an answer that the cancellation did not stop: too late all the same
            response.deliverBody(_Discard())
            self._failed(Failure(CancelledError()))
            return
        self._pending = None
        self.resource.hub_link.answered()
        if self._client_gone:
            response.deliverBody(_Discard())
            return
        starter = self.resource.starter
        location = (response.headers.getRawHeaders(b"location") or [None])[0]
        if looks_stopped(response.code, location, self.resource.target) is False:
            self._check_token(response)  # what recover() would conclude, without its Deferred (most answers)
            return
        can_start = starter is not None and starter.api_for(self.authorization) is not None
        if not can_start and self._is_api() and looks_stopped(response.code, location, self.resource.target):
            # Without a hub token the proxy cannot start the server; an IDE cannot follow the hub's
            # redirect either (another name, another CA), so say what is wrong instead.
            response.deliverBody(_Discard())
            write_refusal(self.request, server_not_running(self.resource.target))
            return
        if can_start and not self._replayed:
            # Once per request: the replay's answer stands, whatever it is.
            self._replayed = True
            self._held = response
            self._pending = starter.recover(
                response.code, location, on_stopped=self._server_stopped, authorization=self.authorization
            )
            self._pending.addCallbacks(self._recovered, self._not_recovered)
            return
        self._check_token(response)

    def _take_held(self) -> IResponse:
        response, self._held = self._held, None
        return response

    def _let_go(self) -> None:
        """Discard the hub's answer that is not going to the client (at most once)."""
        response = self._take_held()
        if response is not None:
            response.deliverBody(_Discard())

    def _server_stopped(self) -> None:
        """
        The server is starting. A start can take minutes; a body over ``--held-body-size`` is not
        held that long (memory or disk for a client that can simply send it again): 503, retry.
        """
        self._let_go()
        size, limit = _body_size(self.request), self.resource.held_body
        streamed = _streamed(self.request)
        lost = streamed is not None and not streamed.can_send_again()
        if lost or (limit and size > limit):
            self._answered = True
            write_refusal(self.request, self._not_held())

    def _not_held(self) -> Refusal:
        size, limit = _body_size(self.request), self.resource.held_body
        return Refusal(
            503,
            f"Your server is starting; this request's body ({size} bytes) is over the {limit} bytes "
            "kept while it starts, so it was not kept: retry in a moment.",
            "server-starting",
            "A larger --held-body-size keeps larger bodies until the server is up.",
        )

    def _recovered(self, stopped: bool) -> None:
        if self._answered:
            self._pending = None
        elif stopped:
            self.start()
        else:
            self._check_token(self._take_held())

    def _not_recovered(self, failure: Failure) -> None:
        """The server did not start (or the client left): the :class:`Refusal` says why."""
        self._pending = None
        self._let_go()
        if self._client_gone or self._answered or failure.check(CancelledError):
            return
        write_refusal(self.request, failure.value)

    def _check_token(self, response: IResponse) -> None:
        """In managed mode a 401/403 or a login redirect may mean the hub no longer takes our token: find out."""
        starter = self.resource.starter
        location = (response.headers.getRawHeaders(b"location") or [None])[0]
        managed = starter is not None and self.resource.credentials.managed
        if not managed or not may_be_dead_token(response.code, location, self.resource.target):
            self._relay(response)
            return
        self._pending = starter.api.token_accepted()
        self._pending.addCallbacks(
            lambda ok: self._relay(response) if ok else self._token_refused(response),
            lambda _: self._relay(response),
        )

    def _relay(self, response: IResponse) -> None:
        self._pending = None
        request, credentials = self.request, self.resource.credentials
        if self._client_gone:
            response.deliverBody(_Discard())
            return
        request.setResponseCode(response.code, response.phrase)
        headers = map_response_headers(_flatten(response.headers), self.resource.target)
        if credentials.managed:
            headers = [(name, credentials.scrub(value)) for name, value in headers]
        request.responseHeaders = _headers(headers)
        for cookie in self.set_cookies:
            request.responseHeaders.addRawHeader(b"set-cookie", cookie)
        content_type = (response.headers.getRawHeaders(b"content-type") or [b""])[0].lower()
        if _rewrites_body(self.body_kind, response, content_type):
            response.deliverBody(_BodyReader(self))
            return
        scrubber: StreamScrubber | ModelHeadMapper | None = None
        keeps_length = True
        if credentials.managed and content_type.startswith(b"text/html"):
            scrubber = StreamScrubber(credentials.hub_token.encode(), credentials.local_token.encode())
            keeps_length = len(credentials.hub_token) == len(credentials.local_token)
        elif self.body_kind == "contents" and response.code in (200, 201) and content_type.startswith(b"application/json"):
            # A model too large to map whole (a big file's): its path is mapped as it passes.
            scrubber = ModelHeadMapper(self.resource.target)
            keeps_length = False
        if response.length is not UNKNOWN_LENGTH and response.code not in _NO_BODY and keeps_length:
            request.setHeader(b"content-length", b"%d" % response.length)
        response.deliverBody(_BodyRelay(self, scrubber))

    def _token_refused(self, response: IResponse) -> None:
        """The hub no longer accepts the token this proxy holds: say so, and where to get one."""
        self._pending = None
        response.deliverBody(_Discard())
        if self._client_gone:
            return
        target = self.resource.target
        write_refusal(self.request, Refusal(
            401,
            "The hub refused the API token this proxy holds: it may have expired or been revoked. "
            f"Create a new one at {target.url}hub/token and put it in the --token-file.",
            "hub-token-refused",
            hint="Replace the token in --token-file and restart jupyter-dev-server.",
        ))

    def body_read(self, body: bytes, reason: Failure) -> None:
        """A body read whole (:class:`_BodyReader`) ended: mapped and sent if it is complete."""
        self._upstream_body = None
        if self._client_gone:
            return
        if not reason.check(ResponseDone):
            self.abort_client("the hub's response was cut short", reason)
            return
        body = map_response_body(self.body_kind, body, self.resource.target)
        self.request.setHeader(b"content-length", b"%d" % len(body))
        self.request.write(body)
        self.request.finish()

    def streaming(self, producer, to_client: bool = True) -> None:
        self._upstream_body = producer
        if to_client and not self._client_gone:
            self.request.registerProducer(producer, True)

    def write(self, data: bytes) -> None:
        if data and not self._client_gone:
            self.request.write(data)

    def body_ended(self, reason: Failure) -> None:
        self._upstream_body = None
        if self._client_gone:
            return
        self.request.unregisterProducer()
        if isinstance(reason.value, (ResponseDone, PotentialDataLoss)):  # Failure.check formats class names
            self.request.finish()
        else:
            self.abort_client("the hub's response was cut short", reason)

    def abort_client(self, why: str, reason: Failure) -> None:
        """Dropping the connection is the only honest way to say a started body is incomplete."""
        log.warn(
            "{method} {path}: {why} ({error}); the client's connection was dropped.",
            method=clip(self.request.method.decode("latin-1"), 32),
            path=quoted(self.hub_path),
            why=why,
            error=clip(reason.getErrorMessage()),
        )
        self._client_gone = True
        transport = self.request.channel and self.request.channel.transport
        if transport is not None:
            transport.abortConnection()

    def _failed(self, failure: Failure) -> None:
        self.resource.deadlines.discard(self)
        if self._timed_out:
            # The client reports its own cancellation as ResponseNeverReceived (as Agent does), not as a timeout: name it here.
            self._timed_out = False
            failure = Failure(_NoAnswer(self.limit))
        self._pending = None
        if self._client_gone or failure.check(CancelledError) or self._retry_later(failure):
            return
        if failure.check(TimeoutError):  # ours (_NoAnswer), or one an agent reports as such
            write_refusal(self.request, Refusal(
                504,
                f"The hub did not answer this request within {self.limit:g} s ({self.limit_option}).",
                "hub-no-answer",
                hint="The hub or your server is overloaded or stuck; 'jupyter-dev-server check' tells which.",
            ))
            return
        refusal = self.resource.policy.explain(failure)
        self.resource.hub_link.request_failed(refusal.message, retried=False)
        write_refusal(self.request, refusal)

    def _retry_later(self, failure: Failure) -> bool:
        """A request the hub cannot have acted on, or one that changes nothing, goes again after a wait."""
        if not may_retry(self.request.method, failure):
            return False
        streamed = _streamed(self.request)
        if streamed is not None and streamed.spent:
            return False  # some of it went out: the hub may have acted on it
        if self._retry is None:
            self._retry = RetryPlan(self.resource.reactor)
            stats = getattr(getattr(self.request, "site", None), "stats", None)
            if stats is not None:
                stats.request_retried()
        delay = self._retry.next_delay()
        if delay is None:
            return False
        self.resource.hub_link.request_failed(self.resource.policy.explain(failure).message, retried=True)
        self._pending = deferLater(self.resource.reactor, delay, self.start)
        self._pending.addErrback(self._failed)
        return True

    def _client_went_away(self, failure: Failure) -> None:
        """The IDE hung up: cancel the hub request or stop its body, releasing that connection."""
        self._client_gone = True
        if self._pending is not None:
            self._pending.cancel()
        elif self._upstream_body is not None:
            self._upstream_body.stopProducing()


class HubProxyResource(ReverseProxyResource):
    """
    Serves the whole local URL space from the user's server on the hub.

    It is a leaf: the path is mapped as a whole by :func:`jds.paths.map_request_path`, not walked
    segment by segment, because dot segments and escapes must be judged on the complete path.
    """

    isLeaf = True

    def __init__(
        self,
        target: HubTarget,
        policy: HubTLSPolicy,
        reactor: IReactorTime,
        agent: IAgent | None = None,
        websockets: WebSocketUpgrader | None = None,
        credentials: Credentials | None = None,
        starter: ServerStarter | None = None,
        timeouts: ResponseTimeouts | None = None,
        held_body: int = 1 << 20,
        hub_link: HubLink | None = None,
    ) -> None:
        super().__init__(target.host, target.port, target.user_prefix.encode("ascii"), reactor)
        self.timeouts = timeouts if timeouts is not None else ResponseTimeouts()
        self.target = target
        self.policy = policy
        self.agent = agent if agent is not None else make_agent(reactor, policy)
        self.websockets = websockets
        self.credentials = credentials or Credentials()
        self.starter = starter
        self.hub_link = hub_link if hub_link is not None else HubLink(reactor)
        self.held_body = held_body
        # every exchange's no-answer limit and every body's stall watch, on one timer
        self.deadlines = Deadlines(reactor.callLater, reactor.seconds)

    def getChild(self, path: bytes, request: Request) -> HubProxyResource:
        return self

    def render(self, request: Request) -> bytes | int:
        raw_path, _, query = request.uri.partition(b"?")
        try:
            hub_path = map_request_path(raw_path, self.target)
        except Refusal as refused:
            return render_refusal(request, refused)
        websocket = is_websocket_upgrade(request)
        credentials = self.credentials
        verdict = credentials.check(
            request.method,
            query,
            # only managed mode reads them (pass-through lets every request through)
            {name.lower(): values for name, values in request.requestHeaders.getAllRawHeaders()}
            if credentials.managed else {},
            page=not websocket and not raw_path.startswith(b"/api/"),
        )
        if not verdict.allowed:
            return self._refuse(request, raw_path, query, verdict, websocket)
        if websocket:
            if self.websockets is None:
                return render_refusal(request, Refusal(501, "WebSocket relaying is not available.", "no-websocket"))
            return self.websockets.render_upgrade(request, hub_path, query)
        request.defaultContentType = None
        ide_view = not self.target.root or in_ide_view(raw_path, self.target)
        if ide_view and self.target.root:
            try:
                self._map_request_body(request, hub_path)
            except Refusal as refused:
                return render_refusal(request, refused)
        exchange = _Exchange(self, request, hub_path, query, ide_view)
        exchange.set_cookies = verdict.set_cookies
        exchange.start()
        return NOT_DONE_YET

    def streams_body(self, method: bytes, raw_path: bytes, request: Request) -> bool:
        """
        Whether a request's body goes to the hub as it arrives (:mod:`jds.upload`): all but a
        WebSocket upgrade's and, with ``--root``, the small JSON bodies whose paths are mapped whole.
        """
        if is_websocket_upgrade(request):
            return False
        if not self.target.root or not in_ide_view(raw_path, self.target):
            return True
        try:
            hub_path = map_request_path(raw_path, self.target)
        except Refusal:
            return True  # refused when rendered, before any of the body is read
        return request_body_kind(method, local_path(hub_path, self.target) or b"") is None

    def _map_request_body(self, request: Request, hub_path: bytes) -> None:
        """
        With --root, the paths in a session's, kernel's, terminal's, rename's or copy's JSON body go
        under the folder. One too large to map is refused (the channel refuses it before reading it;
        this is the last word): passed as it came, its paths would be the server's, outside the folder.
        """
        kind = request_body_kind(request.method, local_path(hub_path, self.target) or b"")
        if kind is None:
            return
        content = request.content
        if content is None:  # a streamed body: only one that needs no mapping is ever streamed
            return
        size = content.seek(0, 2)
        content.seek(0)
        if size > MAX_REWRITTEN_BODY:
            raise body_too_large_to_map(size)
        body = content.read()
        content.seek(0)
        mapped = map_request_body(kind, body, self.target)
        if mapped != body:
            request.content = BytesIO(mapped)
            content.close()  # a spooled body's file goes now, not when the request is collected

    def _refuse(self, request: Request, raw_path: bytes, query: bytes, verdict, websocket: bool) -> bytes:
        """
        Without the local token: pages redirect to the local login (that is how Jupyter clients
        learn a password is needed), everything else gets a 403 that says what to do.
        """
        if verdict.reason == "xsrf":
            return render_refusal(request, missing_xsrf())
        if request.method == b"GET" and not websocket and not raw_path.startswith(b"/api/"):
            target = raw_path + (b"?" + query if query else b"")
            request.redirect(b"/login?next=" + quote(target.decode("latin-1"), safe="").encode())
            return b""
        return render_refusal(
            request, needs_local_token("The request carried no valid local token.", request.getHost())
        )
