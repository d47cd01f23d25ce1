"""
Site assembly: the local site the IDE talks to, put together from the web resources.

The HTTP proxy resource, the WebSocket relay (built on first use), the login and status pages and
the local guard, behind one :class:`LocalSite` with its redacted access log and its counters. The
daemon (:mod:`jds.service`) and ``check`` (which runs one on a spare port) both build it here.
"""

from __future__ import annotations

import time
from typing import Any

from twisted.logger import Logger
from twisted.web.resource import Resource
from twisted.web.server import Request, Site

from jds.auth import Credentials
from jds.errors import Refusal, render_refusal
from jds.guard import HEADER_TIMEOUT, GuardedChannel, LocalGuard
from jds.hub import ServerStarter
from jds.login import LoginPage
from jds.paths import HubTarget, redact_query
from jds.proxy import HubProxyResource, ResponseTimeouts, make_agent
from jds.reconnect import ReconnectPolicy
from jds.stats import Stats
from jds.status import StatusResource
from jds.tls import HubTLSPolicy
from jds.token_expiry import TokenExpiryWatch

log = Logger(namespace="jds")

__all__ = ["LocalRoot", "LocalSite", "build_site"]


class _TimedRequest(Request):
    """
    Records when it started so the access line can say how long the exchange took, and counts
    itself in the site's :class:`~jds.status.Stats` while it is relayed to the hub.
    """

    relayed = False
    received = 0

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
        closed = stats.http_opened()
        self.notifyFinish().addBoth(closed)
        super().render(resource)
        if not self.finished and self.channel is not None and self.channel.transport is None:
            closed()  # the WebSocket relay took the connection over: no longer an HTTP exchange


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
    ) -> None:
        super().__init__(resource, reactor=reactor)
        self.stats = stats if stats is not None else Stats()
        self.guard = guard if guard is not None else LocalGuard()
        self.header_timeout = header_timeout

    def protocol(self) -> GuardedChannel:  # type: ignore[override]
        channel = GuardedChannel()
        channel.header_timeout = self.header_timeout
        return channel

    def getResourceFor(self, request: Request) -> Resource:
        """Host and Origin are judged before any resource, the login page and status included."""
        refusal = self.guard.refusal(request)
        if refusal is not None:
            return _Refused(refusal)
        return super().getResourceFor(request)

    def log(self, request: Request) -> None:
        if getattr(request, "relayed", False):
            self.stats.http_finished(getattr(request, "received", 0), request.sentLength)
        if not self.access_log:
            return
        started = getattr(request, "started", None)
        elapsed = (time.monotonic() - started) * 1000 if started is not None else 0.0
        log.info(
            "{method} {uri} {status} {bytes}B {ms:.1f}ms",
            method=request.method.decode("latin-1"),
            uri=redact_query(request.uri).decode("latin-1"),
            status=request.code,
            bytes=request.sentLength,
            ms=elapsed,
        )


class _Refused(Resource):
    isLeaf = True

    def __init__(self, refusal: Refusal) -> None:
        super().__init__()
        self.refusal = refusal

    def render(self, request: Request) -> bytes:
        return render_refusal(request, self.refusal)


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
) -> LocalSite:
    credentials = credentials or Credentials()
    stats = stats if stats is not None else Stats()
    agent = starter.api.agent if starter is not None else make_agent(reactor, policy)

    def relay() -> Any:
        # lazy load: autobahn (~5 MiB of RSS) only once a WebSocket arrives, see _OnFirstUse
        from jds.relay import WebSocketRelay

        return WebSocketRelay(
            target, policy, reactor, ping_interval=ping_interval, allowed_origins=allowed_origins,
            credentials=credentials, starter=starter, stats=stats, reconnect=reconnect,
        )

    websockets = _OnFirstUse(relay)
    proxy = HubProxyResource(
        target, policy, reactor, agent=agent, websockets=websockets, credentials=credentials,
        starter=starter, timeouts=timeouts,
    )
    login = LoginPage(credentials) if credentials.managed else None
    status = StatusResource(
        stats, target, credentials, api=starter.api if starter is not None and starter.api.has_token else None,
        reactor=reactor,
        token_watch=token_watch,
    )
    return LocalSite(LocalRoot(proxy, login, status), stats, guard, header_timeout, reactor)
