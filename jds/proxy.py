"""
The HTTP side of the proxy: every local request is re-issued on the hub under the user's prefix.

It keeps :class:`twisted.web.proxy.ReverseProxyResource` as its base, so it is recognisably a Twisted
reverse proxy, but replaces the transport: ``ProxyClient`` speaks HTTP/1.0, opens a TCP connection per
request, cannot do TLS and has no backpressure. Here an :class:`~twisted.web.client.Agent` with a
connection pool runs over :class:`~jds.tls.HubTLSPolicy`'s pinned endpoint, bodies stream both ways with
producers, and an upstream that dies mid-body aborts the client's response instead of ending it as if
it were complete.
"""

from __future__ import annotations

from typing import Protocol as TypingProtocol

from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import (
    Agent,
    FileBodyProducer,
    HTTPConnectionPool,
    PartialDownloadError,
    ResponseDone,
    readBody,
)
from twisted.web.http import PotentialDataLoss
from twisted.web.http_headers import Headers
from twisted.web.iweb import UNKNOWN_LENGTH, IResponse
from twisted.web.proxy import ReverseProxyResource
from twisted.web.server import NOT_DONE_YET, Request

from jds.errors import render_error, write_error
from jds.paths import (
    HubTarget,
    PathRefused,
    is_kernelspec_path,
    local_path,
    map_kernelspecs_body,
    map_request_path,
    map_response_headers,
    split_token,
    upstream_request_headers,
)
from jds.tls import HubTLSPolicy

log = Logger(namespace="jds.proxy")

__all__ = ["HubProxyResource", "WebSocketUpgrader", "make_agent"]

# Node's http server (configurable-http-proxy) drops idle keep-alive connections after 5 s; closing
# ours first avoids sending a request down a socket the hub is closing.
IDLE_UPSTREAM_SECONDS = 4.0
# Status codes whose responses never have a body (RFC 9110 6.4.1).
_NO_BODY = {204, 304}


class WebSocketUpgrader(TypingProtocol):
    """What the proxy hands ``Upgrade: websocket`` requests to (see :mod:`jds.relay`)."""

    def render_upgrade(self, request: Request, hub_path: bytes, query: bytes) -> bytes | int: ...


class _PinnedEndpointFactory:
    """Agent asks for an endpoint per URI; every URI goes to the hub through the one TLS policy."""

    def __init__(self, policy: HubTLSPolicy) -> None:
        self._policy = policy

    def endpointForURI(self, uri):  # noqa: N802 - IAgentEndpointFactory
        return self._policy.endpoint()


def make_agent(reactor: IReactorTime, policy: HubTLSPolicy) -> Agent:
    pool = HTTPConnectionPool(reactor, persistent=True)
    pool.maxPersistentPerHost = 16
    pool.cachedConnectionTimeout = IDLE_UPSTREAM_SECONDS
    pool.retryAutomatically = True
    return Agent.usingEndpointFactory(reactor, _PinnedEndpointFactory(policy), pool=pool)


def _flatten(headers: Headers) -> list[tuple[bytes, bytes]]:
    return [(name, value) for name, values in headers.getAllRawHeaders() for value in values]


def _is_websocket_upgrade(request: Request) -> bool:
    upgrade = request.requestHeaders.getRawHeaders(b"upgrade") or []
    return any(value.strip().lower() == b"websocket" for value in upgrade)


class _BodyRelay(Protocol):
    """
    Streams one upstream body to the client. The upstream transport is registered as the client
    request's producer, so a slow client pauses reading from the hub instead of filling memory.
    """

    def __init__(self, exchange: _Exchange) -> None:
        self._exchange = exchange

    def connectionMade(self) -> None:
        self._exchange.streaming(self.transport)

    def dataReceived(self, data: bytes) -> None:
        self._exchange.write(data)

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self._exchange.body_ended(reason)


class _Exchange:
    """One client request and its upstream counterpart, tied together until both are over."""

    def __init__(self, resource: HubProxyResource, request: Request, hub_path: bytes) -> None:
        self.resource = resource
        self.request = request
        self.hub_path = hub_path
        self._pending: Deferred | None = None
        self._upstream_body = None
        self._client_gone = False
        request.notifyFinish().addErrback(self._client_went_away)

    def start(self, query: bytes) -> None:
        request, target = self.request, self.resource.target
        query, token = split_token(query)
        headers = upstream_request_headers(
            _flatten(request.requestHeaders),
            target,
            client_ip=getattr(request.getClientAddress(), "host", "127.0.0.1"),
            local_host=request.getHeader(b"host"),
            query_token=token,
        )
        if self._rewrites_kernelspecs():
            # The body is rewritten, so it must arrive as identity-encoded JSON.
            headers = [(n, v) for n, v in headers if n.lower() != b"accept-encoding"]
        uri = target.origin + self.hub_path + (b"?" + query if query else b"")
        self._pending = self.resource.agent.request(
            request.method, uri, Headers(_group(headers)), self._body_producer()
        )
        self._pending.addCallbacks(self._got_response, self._failed)

    def _rewrites_kernelspecs(self) -> bool:
        local = local_path(self.hub_path, self.resource.target)
        return self.request.method == b"GET" and local is not None and is_kernelspec_path(local)

    def _body_producer(self) -> FileBodyProducer | None:
        content = self.request.content
        if content is None:
            return None
        content.seek(0, 2)
        size = content.tell()
        content.seek(0)
        has_length = self.request.requestHeaders.hasHeader(b"content-length")
        if size == 0 and not has_length and self.request.method in (b"GET", b"HEAD", b"DELETE", b"OPTIONS"):
            return None
        return FileBodyProducer(content)

    def _got_response(self, response: IResponse) -> None:
        self._pending = None
        request = self.request
        if self._client_gone:
            response.deliverBody(_Discard())
            return
        request.setResponseCode(response.code, response.phrase)
        request.responseHeaders = Headers(
            _group(map_response_headers(_flatten(response.headers), self.resource.target))
        )
        if response.code == 200 and self._rewrites_kernelspecs():
            readBody(response).addCallbacks(self._write_kernelspecs, self._body_failed)
            return
        if response.length is not UNKNOWN_LENGTH and response.code not in _NO_BODY:
            request.setHeader(b"content-length", b"%d" % response.length)
        response.deliverBody(_BodyRelay(self))

    def _write_kernelspecs(self, body: bytes) -> None:
        body = map_kernelspecs_body(body, self.resource.target)
        if self._client_gone:
            return
        self.request.setHeader(b"content-length", b"%d" % len(body))
        self.request.write(body)
        self.request.finish()

    def _body_failed(self, failure: Failure) -> None:
        if failure.check(PartialDownloadError):
            failure = Failure(failure.value.response)  # type: ignore[attr-defined]
        self._abort_client("the hub's response was cut short", failure)

    def streaming(self, producer) -> None:
        self._upstream_body = producer
        if not self._client_gone:
            self.request.registerProducer(producer, True)

    def write(self, data: bytes) -> None:
        if not self._client_gone:
            self.request.write(data)

    def body_ended(self, reason: Failure) -> None:
        self._upstream_body = None
        if self._client_gone:
            return
        self.request.unregisterProducer()
        if reason.check(ResponseDone, PotentialDataLoss):
            self.request.finish()
        else:
            self._abort_client("the hub's response was cut short", reason)

    def _abort_client(self, why: str, reason: Failure) -> None:
        """Dropping the connection is the only honest way to say a started body is incomplete."""
        log.warn(
            "{method} {path}: {why} ({error}); the client's connection was dropped.",
            method=self.request.method.decode("latin-1"),
            path=self.hub_path.decode("latin-1"),
            why=why,
            error=reason.getErrorMessage(),
        )
        self._client_gone = True
        transport = self.request.channel and self.request.channel.transport
        if transport is not None:
            transport.abortConnection()

    def _failed(self, failure: Failure) -> None:
        self._pending = None
        if self._client_gone or failure.check(CancelledError):
            return
        message, hint, reason = self.resource.policy.explain(failure)
        write_error(self.request, 502, message, reason, hint)

    def _client_went_away(self, failure: Failure) -> None:
        """The IDE hung up: cancel the hub request or stop its body, releasing that connection."""
        self._client_gone = True
        if self._pending is not None:
            self._pending.cancel()
        elif self._upstream_body is not None:
            self._upstream_body.stopProducing()


class _Discard(Protocol):
    def connectionMade(self) -> None:
        self.transport.stopProducing()


def _group(pairs: list[tuple[bytes, bytes]]) -> dict[bytes, list[bytes]]:
    grouped: dict[bytes, list[bytes]] = {}
    for name, value in pairs:
        grouped.setdefault(name, []).append(value)
    return grouped


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
        agent: Agent | None = None,
        websockets: WebSocketUpgrader | None = None,
    ) -> None:
        super().__init__(target.host, target.port, target.user_prefix.encode("ascii"), reactor)
        self.target = target
        self.policy = policy
        self.agent = agent if agent is not None else make_agent(reactor, policy)
        self.websockets = websockets

    def getChild(self, path: bytes, request: Request) -> HubProxyResource:
        return self

    def render(self, request: Request) -> bytes | int:
        raw_path, _, query = request.uri.partition(b"?")
        try:
            hub_path = map_request_path(raw_path, self.target)
        except PathRefused as refused:
            return render_error(request, refused.status, refused.message, refused.reason)
        if _is_websocket_upgrade(request):
            if self.websockets is None:
                return render_error(
                    request, 501, "WebSocket relaying is not available.", "no-websocket"
                )
            return self.websockets.render_upgrade(request, hub_path, query)
        request.defaultContentType = None
        _Exchange(self, request, hub_path).start(query)
        return NOT_DONE_YET
