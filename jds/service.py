"""
Service wiring: options in, a listening twistd service out.

This is the only module that knows how the pieces fit: the TLS policy, the HTTP proxy resource, the
WebSocket relay, the status page and the local site with its redacted access log and its counters.
"""

from __future__ import annotations

import signal
import sys
import threading
import time
from typing import Any

from twisted.application import service
from twisted.application.internet import StreamServerEndpointService
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import serverFromString
from twisted.internet.error import CannotListenError
from twisted.internet.task import deferLater
from twisted.logger import ILogObserver, Logger
from twisted.plugin import IPlugin
from twisted.web.resource import Resource
from twisted.web.server import Request, Site
from zope.interface import implementer

from jds import __version__
from jds.auth import Credentials
from jds.errors import render_error
from jds.guard import HEADER_TIMEOUT, GuardedChannel, LocalGuard, is_loopback
from jds.hub import HubAPI, ServerStarter
from jds.login import LoginPage
from jds.logs import json_observer_for, text_observer_for
from jds.options import Options
from jds.paths import HubTarget, redact_query
from jds.progress import ProgressBar
from jds.proxy import HubProxyResource, make_agent
from jds.status import Stats, StatusResource
from jds.tls import HubTLSPolicy

log = Logger(namespace="jds")

__all__ = ["JupyterDevServerMaker", "LocalSite", "ListenError", "build_site", "make_service"]


class ListenError(Exception):
    """The local endpoint could not be listened on; the message says what to change."""


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
            return _Refused(*refusal)
        return super().getResourceFor(request)

    def log(self, request: Request) -> None:
        if getattr(request, "relayed", False):
            self.stats.http_finished(getattr(request, "received", 0), request.sentLength)
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

    def __init__(self, message: str, reason: str) -> None:
        super().__init__()
        self.message = message
        self.reason = reason

    def render(self, request: Request) -> bytes:
        return render_error(request, 403, self.message, self.reason)


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
) -> LocalSite:
    credentials = credentials or Credentials()
    stats = stats if stats is not None else Stats()
    agent = starter.api.agent if starter is not None else make_agent(reactor, policy)

    def relay() -> Any:
        from jds.relay import WebSocketRelay

        return WebSocketRelay(
            target, policy, reactor, ping_interval=ping_interval, allowed_origins=allowed_origins,
            credentials=credentials, starter=starter, stats=stats,
        )

    websockets = _OnFirstUse(relay)
    proxy = HubProxyResource(
        target, policy, reactor, agent=agent, websockets=websockets, credentials=credentials,
        starter=starter,
    )
    login = LoginPage(credentials) if credentials.managed else None
    status = StatusResource(
        stats, target, credentials, api=starter.api if starter is not None else None, reactor=reactor
    )
    return LocalSite(LocalRoot(proxy, login, status), stats, guard, header_timeout, reactor)


class _ProxyListener(StreamServerEndpointService):
    """Listens, then says (once, in the log) which URL to paste into the IDE, with the real port."""

    _raiseSynchronously = True

    def __init__(self, endpoint, factory, description: str, token: str | None) -> None:
        super().__init__(endpoint, factory)
        self.description = description
        self.token = token

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
        guard = getattr(self.factory, "guard", None)
        if guard is not None:
            guard.listening(host, getattr(address, "port", None))
        if host in ("0.0.0.0", "::", ""):
            host = "127.0.0.1"
        if ":" in host:
            host = f"[{host}]"
        # The local token is printed on purpose (the user pastes it); hub tokens never are.
        log.info(
            "Paste this URL into your IDE as an existing Jupyter server: "
            "http://{host}:{port}/?token={token}",
            host=host,
            port=address.port,
            token=self.token or "<YOUR_HUB_API_TOKEN>",
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
    credentials = Credentials(options["hub-token"], options["local-token"])
    starter = None
    if credentials.managed:
        api = HubAPI(make_agent(reactor, policy), target, options["hub-token"])
        starter = ServerStarter(
            api, reactor, timeout=options["spawn-timeout"], allowed=not options["no-spawn"],
            on_progress=ProgressBar(sys.stderr).update,
        )
    guard = LocalGuard.build(options["allow-host"], options["allow-origin"])
    site = build_site(
        target, policy, reactor, credentials, starter,
        allowed_origins=tuple(options["allow-origin"]), ping_interval=options["ping-interval"],
        guard=guard, header_timeout=options["header-timeout"],
    )
    endpoint = serverFromString(reactor, options["listen"])
    top = _Daemon()
    if options.get("log-format") == "json":
        top.log_observer = json_observer_for(getattr(options, "parent", None))
    else:
        top.log_observer = text_observer_for(getattr(options, "parent", None))
    _ProxyListener(endpoint, site, options["listen"], options["local-token"]).setServiceParent(top)
    _LaunchChecks(options, starter, reactor).setServiceParent(top)
    _GracefulStop(site, reactor).setServiceParent(top)
    if not is_loopback(options["interface"]):
        log.warn(
            "Listening on {interface}: other machines can reach this proxy. Every request must carry "
            "the local token; keep it secret. Other machines must connect by a name given with "
            "--allow-host (this machine's address or DNS name).",
            interface=options["interface"],
        )
    log.info(
        "jupyter-dev-server {version}: serving {url} for user {user}, verified as {name} by {ca}",
        version=__version__,
        url=target.server_url,
        user=target.user,
        name=target.verify_name,
        ca=policy.ca_source,
    )
    return top


class _Daemon(service.MultiService):
    """
    The daemon's top service. It hands twistd the observer ``--log-format json`` asked for, as an
    ``ILogObserver`` component of the application: twistd uses that when no ``--logger`` is given.
    """

    log_observer: ILogObserver | None = None

    def setServiceParent(self, parent: Any) -> None:
        if self.log_observer is not None and hasattr(parent, "setComponent"):
            parent.setComponent(ILogObserver, self.log_observer)
        super().setServiceParent(parent)


class _GracefulStop(service.Service):
    """
    SIGTERM and SIGINT stop the daemon cleanly and with exit status 0: listening stops, WebSockets
    are closed with 1001 (the relay's own shutdown trigger), and requests in flight get a few
    seconds to finish. twistd's own handlers would re-raise the signal, so it exits "killed".
    """

    drain_seconds = 5.0

    def __init__(self, site: LocalSite, reactor: Any) -> None:
        self.site = site
        self.reactor = reactor

    def startService(self) -> None:
        super().startService()
        self.reactor.callWhenRunning(self._install)
        self.reactor.addSystemEventTrigger("before", "shutdown", self._drain)

    def _install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, self._stop)

    def _stop(self, signum: int, frame: object) -> None:
        log.info("Received {signal}: shutting down.", signal=signal.Signals(signum).name)
        self.reactor.callFromThread(self._stop_once)

    def _stop_once(self) -> None:
        if self.reactor.running:
            self.reactor.stop()

    def _drain(self) -> Deferred | None:
        deadline = time.monotonic() + self.drain_seconds

        def idle(_: object = None) -> Deferred | None:
            if self.site.stats.open_http <= 0 or time.monotonic() >= deadline:
                if self.site.stats.open_http > 0:
                    log.warn("Stopping with {count} request(s) still in flight.", count=self.site.stats.open_http)
                return None
            return deferLater(self.reactor, 0.05, idle)

        return idle()


class _LaunchChecks(service.Service):
    """
    Once at start-up: the ``check`` steps go to the log (a failure is reported, not fatal: the hub
    may come back), and in managed mode a stopped server is started so the IDE's first request is fast.
    """

    def __init__(self, options: Options, starter: ServerStarter | None, reactor: Any) -> None:
        self.options = options
        self.starter = starter
        self.reactor = reactor

    def startService(self) -> None:
        super().startService()
        from jds.check import run_checks

        d = run_checks(self.reactor, self.options)
        d.addCallback(self._log_steps)
        d.addErrback(lambda failure: log.warn("Start-up check failed: {error}", error=failure.getErrorMessage()))

    def _log_steps(self, steps) -> Deferred | None:
        for step in steps:
            if step.ok is False:
                log.warn("check {name}: {detail} Fix: {fix}", name=step.name, detail=step.detail, fix=step.fix or "-")
            else:
                log.info("check {name}: {detail}", name=step.name, detail=step.detail)
        stopped = any(step.name == "server" and step.ok is False for step in steps)
        if not stopped or self.starter is None or not self.starter.allowed:
            return None
        return self.starter.ensure_running().addErrback(
            lambda failure: log.warn("{message}", message=getattr(failure.value, "message", failure.getErrorMessage()))
        )


@implementer(service.IServiceMaker, IPlugin)
class JupyterDevServerMaker:
    tapname = "jupyter-dev-server"
    description = "Serve your JupyterHub server to a local IDE as a plain Jupyter server."
    options = Options

    def makeService(self, options: Options) -> service.IService:
        return make_service(options)
