"""
Site assembly: the local site the IDE talks to, put together from the web resources.

The HTTP proxy resource, the WebSocket relay (built on first use), the login and status pages and
the local guard, behind one :class:`LocalSite` with its redacted access log and its counters. The
daemon (:mod:`jds.service`) and ``check`` (which runs one on a spare port) both build it here.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import Request, Site

from jds.auth import Credentials, missing_xsrf, needs_local_token
from jds.guard import HEADER_TIMEOUT, GuardedChannel, Limits, LocalGuard, body_not_taken
from jds.hub import ServerStarter
from jds.hublink import HubLink
from jds.login import MAX_FORM_BYTES, LoginPage
from jds.logs import RepeatCounter, clip, log_access
from jds.paths import (
    MAX_REWRITTEN_BODY,
    HubTarget,
    body_too_large_to_map,
    map_request_path,
    query_args,
    redact_query,
)
from jds.proxy import HubProxyResource, ResponseTimeouts, make_agent
from jds.reconnect import ReconnectPolicy
from jds.refusal import Refusal
from jds.stats import Stats
from jds.status import StatusResource
from jds.tls import HubTLSPolicy
from jds.token_expiry import TokenExpiryWatch
from jds.upload import StreamedBody

log = Logger(namespace="jds")

__all__ = ["LocalRoot", "LocalSite", "build_site"]


class _TimedRequest(Request):
    """
    Records when it started so the access line can say how long the exchange took, and counts
    itself in the site's :class:`~jds.status.Stats` while it is relayed to the hub.

    A request the proxy relays with a body is rendered as soon as its headers are accepted, and its
    body goes to the hub as it arrives (:class:`~jds.upload.StreamedBody`, ``body``), never spooled.
    """

    relayed = False
    received = 0
    body: StreamedBody | None = None
    _rendered = False
    _cleanup_postponed = False
    _closed: Callable[[], object] | None = None  # ends its count in Stats.open_http

    def gotLength(self, length: int | None) -> None:
        channel = self.channel
        site = getattr(channel, "site", None)
        if length != 0 and isinstance(channel, GuardedChannel) and isinstance(site, LocalSite):
            if site.streams_body(channel._command, channel._path, self):
                self.body = StreamedBody(length, channel, site.limits.held_body)
                return
        super().gotLength(length)

    def headers_accepted(self, command: bytes, path: bytes, version: bytes) -> None:
        """The channel accepted the headers: a streamed request is rendered now, before its body."""
        if self.body is not None:
            self.requestReceived(command, path, version)

    def requestReceived(self, command: bytes, path: bytes, version: bytes) -> None:
        """
        twisted.web's own parses form bodies (urlencoded, multipart) into ``args``, which cost 2 GiB
        for a 96 MiB form. A proxy forwards bodies and never interprets them: only the query string
        becomes ``args`` here (the login page reads its small form itself).
        """
        if self._rendered:
            # The channel says the streamed body has arrived whole; the request was rendered already.
            self.body.end()  # type: ignore[union-attr]
            if self._cleanup_postponed:
                self._cleanup_postponed = False
                super()._cleanup()
            return
        self._rendered = self.body is not None
        if self.content is not None:
            self.content.seek(0, 0)
        self.method, self.uri, self.clientproto = command, path, version
        self.path, sep, query = path.partition(b"?")
        self.args = query_args(query) if sep else {}
        self.process()

    def write(self, data: bytes) -> None:
        """
        The first write sends the headers: when the channel will close the connection after this
        answer (the client asked with ``Connection: close``, or spoke HTTP/1.0), they say so (RFC
        9112 9.6). Without it a pooling client (python-requests) keeps the connection and its next
        request fails on it. Whatever wrote the headers (the hub's, a refusal's) gets it.
        """
        if not self.startedWriting and not getattr(self.channel, "persistent", True):
            self.responseHeaders.setRawHeaders(b"connection", [b"close"])
        super().write(data)

    def handleContentChunk(self, data: bytes) -> None:
        channel = self.channel
        if isinstance(channel, GuardedChannel):
            channel.body_received(len(data))
            if channel._refused:
                return
        if self.body is not None:
            self.received += len(data)
            self.body.feed(data)
            return
        super().handleContentChunk(data)

    def _cleanup(self) -> None:
        """
        Answered before its body has arrived whole (a refusal, or an early answer from the hub): the
        rest of the body is read and dropped before the channel reads the connection's next request.
        """
        if self.body is not None and not self.body.complete and not self._disconnected:
            self._cleanup_postponed = True
            self.body.discard()
            return
        super()._cleanup()
        self._over()

    def body_refused(self, reason: Failure) -> None:
        """The channel refused the rest of the body (too large, too slow) and answers for the request."""
        if not self._rendered:
            return
        if not self._disconnected:
            Request.connectionLost(self, reason)  # first: whoever relays it stops answering
            self._over()
        self.body.abort(reason)  # type: ignore[union-attr]

    def connectionLost(self, reason: Failure) -> None:
        super().connectionLost(reason)  # first: whoever relays it stops answering
        self._over()
        if self.body is not None:
            self.body.abort(reason)

    def _over(self) -> None:
        """The exchange is over (answered, or its client gone): no longer counted as open."""
        closed, self._closed = self._closed, None
        if closed is not None:
            closed()

    def process(self) -> None:
        self.started = time.monotonic()
        if self.content is not None:
            self.received = self.content.seek(0, 2)
            self.content.seek(0)
        super().process()

    def render(self, resource: Resource) -> None:
        stats: Stats | None = getattr(getattr(self, "site", None), "stats", None)
        if stats is None or not isinstance(resource, HubProxyResource):
            super().render(resource)
            return
        self.relayed = True
        # ended by _over, where twisted.web would fire notifyFinish()'s Deferreds (one fewer per request)
        self._closed = stats.http_opened()
        super().render(resource)
        if not self.finished and self.channel is not None and self.channel.transport is None:
            self._over()  # the WebSocket relay took the connection over: no longer an HTTP exchange


class LocalSite(Site):
    """The IDE-facing site. Its access log never shows a token (they travel in query strings)."""

    requestFactory = _TimedRequest
    displayTracebacks = False
    noisy = False
    access_log = True  # off for the start-up self-check's own request

    def __init__(
        self,
        resource: Resource,
        stats: Stats | None = None,
        guard: LocalGuard | None = None,
        header_timeout: float = HEADER_TIMEOUT,
        reactor: Any = None,
        credentials: Credentials | None = None,
        target: HubTarget | None = None,
        limits: Limits | None = None,
    ) -> None:
        super().__init__(resource, reactor=reactor)
        self.stats = stats if stats is not None else Stats()
        self.guard = guard if guard is not None else LocalGuard()
        self.header_timeout = header_timeout
        self.credentials = credentials if credentials is not None else Credentials()
        self.target = target
        self.limits = limits if limits is not None else Limits()
        self.repeats = RepeatCounter(self.reactor)  # bursts of one refusal (jds.errors.log_refusal)

    def protocol(self) -> GuardedChannel:  # type: ignore[override]
        channel = GuardedChannel()
        channel.header_timeout = self.header_timeout
        channel.limits = self.limits
        return channel

    def refusal_before_body(
        self, method: bytes, uri: bytes, request: Request, length: int | None
    ) -> Refusal | None:
        """
        A :class:`Refusal` when a request must be refused on its headers alone: Host and Origin
        (every path, the login page and status included), and for a request with a body also the
        path, a body where none is taken (``body_not_taken``), the local token and the body's
        declared size (and, with --root, whether it can be mapped). A bodiless request costs nothing to
        serve, so the resources answer it as before (a page without the token is redirected to the
        login, for instance).
        """
        refusal = self.guard.refusal(request)
        if refusal is not None:
            return refusal
        if length == 0:
            return None
        raw_path, _, query = uri.partition(b"?")
        if self.target is not None:
            try:
                map_request_path(raw_path, self.target)
            except Refusal as refused:
                return refused
        refusal = body_not_taken(raw_path, request)
        if refusal is not None:
            return refusal
        if raw_path == b"/login" and self.credentials.managed:
            if length is None or length > MAX_FORM_BYTES:
                return Refusal(413, f"A login form is at most {MAX_FORM_BYTES} bytes.", "body-too-large")
            return None
        verdict = self.credentials.check(
            method, query,
            {name.lower(): values for name, values in request.requestHeaders.getAllRawHeaders()},
            effects=False,
        )
        if not verdict.allowed:
            if verdict.reason == "xsrf":
                return missing_xsrf()
            return needs_local_token("The request, with a body, carried no valid local token.")
        if length is None:
            return None  # a chunked body is bounded as it arrives (GuardedChannel.body_received)
        refusal = self.limits.body_refusal(length)
        if refusal is None and length > MAX_REWRITTEN_BODY and not self.streams_body(method, uri, request):
            refusal = body_too_large_to_map(length)  # --root: a body to be mapped is read whole
        return refusal

    def streams_body(self, method: bytes, uri: bytes, request: Request) -> bool:
        """Whether this request's body goes to the hub as it arrives (see :class:`_TimedRequest`)."""
        judge = getattr(self.resource, "streams_body", None)
        return bool(judge is not None and judge(method, uri, request))

    def log(self, request: Request) -> None:
        if getattr(request, "relayed", False):
            self.stats.http_finished(getattr(request, "received", 0), request.sentLength)
        if not self.access_log or getattr(request, "refused", False):
            return  # a refusal has had its line (jds.errors.log_refusal)
        started = getattr(request, "started", None)
        elapsed = (time.monotonic() - started) * 1000 if started is not None else 0.0
        log_access(
            log,
            request.method.decode("latin-1"),
            clip(redact_query(request.uri).decode("latin-1")),
            request.code,
            request.sentLength,
            elapsed,
        )


class LocalRoot(Resource):
    """
    The proxy serves every path, except the few the daemon answers itself: ``/login`` (managed
    mode) and ``/_jds/`` (its status page; no Jupyter server uses that prefix).
    """

    def __init__(
        self, proxy: HubProxyResource, login: LoginPage | None, status: StatusResource | None = None
    ) -> None:
        super().__init__()
        self.proxy = proxy
        self.login = login
        self.status = status

    def getChild(self, path: bytes, request: Request) -> Resource:
        if path == b"login" and self.login is not None and not request.postpath:
            return self.login
        if path == b"_jds" and self.status is not None:
            return self.status
        return self.proxy

    def render(self, request: Request) -> bytes | int:
        return self.proxy.render(request)

    def streams_body(self, method: bytes, uri: bytes, request: Request) -> bool:
        """The pages the daemon answers itself read their (small) bodies whole."""
        raw_path = uri.partition(b"?")[0]
        if raw_path == b"/login" and self.login is not None:
            return False
        if (raw_path == b"/_jds" or raw_path.startswith(b"/_jds/")) and self.status is not None:
            return False
        return self.proxy.streams_body(method, raw_path, request)


class _OnFirstUse:
    """
    The WebSocket relay, built (and autobahn imported: ~5 MiB of RSS) when the first socket
    arrives, so a proxy that only ever serves HTTP does not carry it.
    """

    def __init__(self, make: Any) -> None:
        self._make = make
        self._relay: Any = None

    def render_upgrade(self, request: Request, hub_path: bytes, query: bytes) -> bytes | int:
        if self._relay is None:
            self._relay = self._make()
        return self._relay.render_upgrade(request, hub_path, query)


def build_site(
    target: HubTarget,
    policy: HubTLSPolicy,
    reactor: Any,
    credentials: Credentials | None = None,
    starter: ServerStarter | None = None,
    allowed_origins: tuple[str, ...] = (),
    ping_interval: float = 30.0,
    stats: Stats | None = None,
    guard: LocalGuard | None = None,
    header_timeout: float = HEADER_TIMEOUT,
    reconnect: ReconnectPolicy | None = None,
    timeouts: ResponseTimeouts | None = None,
    token_watch: TokenExpiryWatch | None = None,
    limits: Limits | None = None,
    hub_link: HubLink | None = None,
    profile: str | None = None,
) -> LocalSite:
    credentials = credentials or Credentials()
    limits = limits if limits is not None else Limits()
    stats = stats if stats is not None else Stats()
    agent = starter.api.agent if starter is not None else make_agent(reactor, policy)
    if hub_link is None:  # one state for REST, WebSockets and the hub API's calls
        hub_link = HubLink(reactor, stats)

    def relay() -> Any:
        # lazy load: autobahn (~5 MiB of RSS) only once a WebSocket arrives, see _OnFirstUse
        from jds.relay import WebSocketRelay

        return WebSocketRelay(
            target, policy, reactor, ping_interval=ping_interval, allowed_origins=allowed_origins,
            credentials=credentials, starter=starter, stats=stats, reconnect=reconnect,
            max_message=limits.max_message, hub_link=hub_link,
        )

    websockets = _OnFirstUse(relay)
    proxy = HubProxyResource(
        target, policy, reactor, agent=agent, websockets=websockets, credentials=credentials,
        starter=starter, timeouts=timeouts, held_body=limits.held_body, hub_link=hub_link,
    )
    login = LoginPage(credentials) if credentials.managed else None
    status = StatusResource(
        stats, target, credentials, api=starter.api if starter is not None and starter.api.has_token else None,
        reactor=reactor,
        token_watch=token_watch,
        via=policy.via,
        profile=profile,
        server_options=starter.api.user_options if starter is not None else None,
    )
    return LocalSite(
        LocalRoot(proxy, login, status), stats, guard, header_timeout, reactor, credentials, target, limits
    )
