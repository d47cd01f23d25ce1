"""
Service wiring: options in, a listening twistd service out.

This is the only module that knows how the pieces fit: the TLS policy, the HTTP proxy resource, the
WebSocket relay and the local site with its redacted access log.
"""

from __future__ import annotations

import time
from typing import Any

from twisted.application import service
from twisted.application.internet import StreamServerEndpointService
from twisted.internet.endpoints import serverFromString
from twisted.internet.error import CannotListenError
from twisted.logger import Logger
from twisted.plugin import IPlugin
from twisted.web.server import Request, Site
from zope.interface import implementer

from jds import __version__
from jds.options import Options
from jds.paths import HubTarget, redact_query
from jds.proxy import HubProxyResource
from jds.tls import HubTLSPolicy

log = Logger(namespace="jds")

__all__ = ["JupyterDevServerMaker", "LocalSite", "ListenError", "build_site", "make_service"]


class ListenError(Exception):
    """The local endpoint could not be listened on; the message says what to change."""


class _TimedRequest(Request):
    """Records when it started so the access line can say how long the exchange took."""

    def process(self) -> None:
        self.started = time.monotonic()
        super().process()


class LocalSite(Site):
    """The IDE-facing site. Its access log never shows a token (they travel in query strings)."""

    requestFactory = _TimedRequest
    displayTracebacks = False

    def log(self, request: Request) -> None:
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


def build_site(target: HubTarget, policy: HubTLSPolicy, reactor: Any) -> LocalSite:
    websockets = None
    try:
        from jds.relay import WebSocketRelay
    except ImportError:  # the relay lands separately; HTTP works without it
        pass
    else:
        websockets = WebSocketRelay(target, policy, reactor)
    resource = HubProxyResource(target, policy, reactor, websockets=websockets)
    return LocalSite(resource)


class _ProxyListener(StreamServerEndpointService):
    """Listens, then says (once, in the log) which URL to paste into the IDE, with the real port."""

    _raiseSynchronously = True

    def __init__(self, endpoint, factory, description: str) -> None:
        super().__init__(endpoint, factory)
        self.description = description

    def privilegedStartService(self) -> None:
        try:
            super().privilegedStartService()
        except CannotListenError as exc:
            raise ListenError(
                f"Cannot listen on {self.description}: {exc.socketError}. "
                "Choose another port or interface with --listen."
            ) from None
        self._waitingForPort.addCallback(self._announce)

    def _announce(self, port):
        address = port.getHost()
        host = getattr(address, "host", "127.0.0.1")
        if host in ("0.0.0.0", "::", ""):
            host = "127.0.0.1"
        if ":" in host:
            host = f"[{host}]"
        log.info(
            "Paste this URL into your IDE as an existing Jupyter server: "
            "http://{host}:{port}/?token=<YOUR_HUB_API_TOKEN>",
            host=host,
            port=address.port,
        )
        return port


def make_service(options: Options, reactor: Any = None) -> service.IService:
    if reactor is None:
        from twisted.internet import reactor
    target: HubTarget = options["target"]
    policy = HubTLSPolicy(
        reactor, target.host, target.port, target.verify_name, options["ca-cert"],
        connect_timeout=options["connect-timeout"],
    )
    site = build_site(target, policy, reactor)
    endpoint = serverFromString(reactor, options["listen"])
    top = service.MultiService()
    _ProxyListener(endpoint, site, options["listen"]).setServiceParent(top)
    log.info(
        "jupyter-dev-server {version}: serving {url} for user {user}, verified as {name} by {ca}",
        version=__version__,
        url=target.server_url,
        user=target.user,
        name=target.verify_name,
        ca=policy.ca_source,
    )
    return top


@implementer(service.IServiceMaker, IPlugin)
class JupyterDevServerMaker:
    tapname = "jupyter-dev-server"
    description = "Serve your JupyterHub server to a local IDE as a plain Jupyter server."
    options = Options

    def makeService(self, options: Options) -> service.IService:
        return make_service(options)
