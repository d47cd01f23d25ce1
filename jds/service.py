"""
Service wiring: options in, a listening twistd service out.

The only module that knows how the daemon runs: the TLS policy and hub API built from the options,
the site (assembled in :mod:`jds.site`) listening and announcing its URL, the start-up checks
(:mod:`jds.check`) in the log, and a graceful stop on SIGTERM/SIGINT. twistd reaches it through
:mod:`jds.tap`.
"""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any, TextIO

from twisted.application import service
from twisted.application.internet import StreamServerEndpointService, TimerService
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import serverFromString
from twisted.internet.error import CannotListenError
from twisted.internet.task import deferLater
from twisted.logger import ILogObserver, Logger

from jds import __version__
from jds.auth import Credentials
from jds.check import run_checks
from jds.commands import login_command
from jds.connections import ConnectionLimit, total_connections
from jds.guard import Limits, LocalGuard, is_loopback
from jds.hub import HubAPI, ServerStarter
from jds.hublink import HubLink
from jds.logs import json_observer_for, text_observer_for
from jds.options import Options
from jds.paths import HubTarget, authority
from jds.progress import ProgressBar
from jds.proxy import IDLE_UPSTREAM_SECONDS, ResponseTimeouts, make_agent
from jds.reconnect import ReconnectPolicy
from jds.sessions import Sessions
from jds.site import LocalSite, build_site
from jds.stats import Stats
from jds.token_expiry import TokenExpiryWatch
from jds.tokens import url_file_path, write_private

log = Logger(namespace="jds")

# How often the daemon looks at --local-token-file for a token written by rotate-token.
TOKEN_CHECK_SECONDS = 1.0

__all__ = ["ListenError", "make_service"]

# Hub connections opened beside the first one after the IDE was idle (jds/spares.py): enough for the
# requests VS Code sends in parallel when it opens a notebook and for the kernel WebSocket after them.
SPARE_CONNECTIONS = 2


class ListenError(Exception):
    """The local endpoint could not be listened on; the message says what to change."""


class _ProxyListener(StreamServerEndpointService):
    """
    Listens, then says (once) where the IDE connects, with the real port. The local token is in the
    URL file (mode 600) and, in the foreground on a terminal, printed there; never in the log, which
    a daemon writes to a file others may read (twistd's ``twistd.log``), or hands to ``--logger``,
    ``--syslog`` or systemd's journal.
    """

    _raiseSynchronously = True

    def __init__(
        self, endpoint, factory, description: str, token: str | None, url_file: Path | None = None,
        terminal: TextIO | None = None,
    ) -> None:
        super().__init__(endpoint, factory)
        self.description = description
        self.token = token
        self.url_file = url_file
        self.terminal = terminal

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
        base = f"http://{authority(host)}:{address.port}/"
        if not self.token:
            # Pass-through mode: the URL holds no secret, the IDE brings its own hub token.
            log.info("Paste this URL into your IDE as an existing Jupyter server: {url}", url=f"{base}?token=<YOUR_HUB_API_TOKEN>")
            return port
        url = f"{base}?token={self.token}"
        if self.url_file is not None:
            write_private(self.url_file, url + "\n")
            log.info(
                "Listening on {url}. The URL to paste into your IDE as an existing Jupyter server, with the "
                "local token, is in {path} (readable only by you).",
                url=base, path=str(self.url_file),
            )
        else:
            log.info("Listening on {url}; every request needs the local token.", url=base)
        if self.terminal is not None:
            # The one place the token is shown: the terminal the user started the daemon in.
            with contextlib.suppress(OSError, ValueError):  # a terminal closed meanwhile
                self.terminal.write(f"Paste this URL into your IDE as an existing Jupyter server: {url}\n")
                self.terminal.flush()
        return port


def _terminal(options: Options) -> TextIO | None:
    """
    The terminal the daemon runs in, when it runs in the foreground in one (``twistd -n``, the
    ``jupyter-dev-server`` command): taken now, before twistd sends standard output to the log.
    A daemon's standard output is /dev/null, and one that is a file or a pipe is a log.
    """
    parent = getattr(options, "parent", None)
    if parent is not None and hasattr(parent, "get") and not parent.get("nodaemon"):
        return None
    stream = sys.stdout
    try:
        return stream if stream is not None and stream.isatty() else None
    except (AttributeError, ValueError):
        return None


def make_service(options: Options, reactor: Any = None) -> service.IService:
    if reactor is None:
        from twisted.internet import reactor
    target: HubTarget = options["target"]
    policy = options.hub_policy(reactor, spares=SPARE_CONNECTIONS, spare_seconds=IDLE_UPSTREAM_SECONDS)
    credentials = Credentials(
        options["hub-token"], options["local-token"], token_file=options.get("local-token-path"),
        sessions=Sessions(options["cookie-max-age"]),
    )
    limits = Limits(
        max_body=options["max-body-size"], held_body=options["held-body-size"],
        body_timeout=options["body-timeout"], connections_per_client=options["max-connections-per-client"],
        connections=total_connections(options["max-connections"]), max_message=options["max-message-size"],
    )
    # One hub link state for REST, WebSockets and the hub API's own calls (spawn, token checks).
    stats = Stats()
    hub_link = HubLink(reactor, stats, explain=policy.explain)
    # Both modes start a stopped server: managed mode with the token it holds, pass-through mode
    # (no hub token here) with the token the IDE's request carries.
    api = HubAPI(
        make_agent(reactor, policy), target, options["hub-token"], user_options=options["server-options"], link=hub_link
    )
    starter = ServerStarter(
        api, reactor, timeout=options["spawn-timeout"], allowed=not options["no-spawn"],
        on_progress=ProgressBar(sys.stderr).update,
    )
    token_watch = None
    if credentials.managed:
        renew = login_command(
            target, options["ca-cert"], options["token-file"], options.renewal_profile(), options["via"],
            options["ssh-command"],
        )
        token_watch = TokenExpiryWatch(api, renew, reactor)
    guard = LocalGuard.build(options["allow-host"], options["allow-origin"])
    timeouts = ResponseTimeouts(
        options["response-timeout"], options["kernel-start-timeout"], stall=options["stall-timeout"]
    )
    site = build_site(
        target, policy, reactor, credentials, starter,
        allowed_origins=tuple(options["allow-origin"]), ping_interval=options["ping-interval"],
        guard=guard, header_timeout=options["header-timeout"], timeouts=timeouts, limits=limits,
        token_watch=token_watch, stats=stats, hub_link=hub_link, profile=getattr(options, "profile_name", None),
        reconnect=ReconnectPolicy(options["reconnect-window"], options["reconnect-buffer"]),
    )
    endpoint = serverFromString(reactor, options["listen"])
    top = _Daemon()
    if options.get("log-format") == "json":
        top.log_observer = json_observer_for(getattr(options, "parent", None))
    else:
        top.log_observer = text_observer_for(getattr(options, "parent", None))
    factory = ConnectionLimit(site, limits.connections_per_client, limits.connections)
    token_path = options.get("local-token-path")
    _ProxyListener(
        endpoint, factory, options["listen"], options["local-token"],
        url_file=url_file_path(token_path) if token_path else None, terminal=_terminal(options),
    ).setServiceParent(top)
    # The checks get a policy of their own (no spare connections, the via shared: options.via() makes one).
    _LaunchChecks(options, starter, reactor).setServiceParent(top)
    _ViaStop(policy.via, reactor).setServiceParent(top)
    _GracefulStop(site, reactor).setServiceParent(top)
    if token_watch is not None:
        token_watch.setServiceParent(top)
    if credentials.managed and credentials.token_file is not None:
        # rotate-token ends what the old token opened within a second, not at the next request
        credentials.on_rotation.insert(0, lambda: log.info(
            "The local token was replaced (rotate-token): the old token and every login have ended."
        ))
        TimerService(TOKEN_CHECK_SECONDS, credentials.refresh).setServiceParent(top)
    if not is_loopback(options["interface"]):
        log.warn(
            "Listening on {interface}: other machines can reach this proxy. Every request must carry "
            "the local token; keep it secret. Other machines must connect by a name given with "
            "--allow-host (this machine's address or DNS name).",
            interface=options["interface"],
        )
    if options.get("via-warning"):
        log.warn("{warning}", warning=options["via-warning"])
    log.info(
        "jupyter-dev-server {version}: serving {url} for user {user}, verified as {name} by {ca}, "
        "reached {via}",
        version=__version__,
        url=target.server_url,
        user=target.user,
        name=target.verify_name,
        ca=policy.ca_source,
        via=policy.via.spec.how(),
    )
    return top


class _ViaStop(service.Service):
    """
    The via ends with the daemon: an ssh process it started must not outlive it. It ends during
    shutdown, after the requests in flight had their drain time (:class:`_GracefulStop`), since
    they may still be using it.
    """

    def __init__(self, via: Any, reactor: Any) -> None:
        self.via = via
        self.reactor = reactor

    def startService(self) -> None:
        super().startService()
        self.reactor.addSystemEventTrigger("during", "shutdown", self.via.stop)


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
    may come back), and in managed mode a stopped server is started so the IDE's first request is fast
    (in pass-through mode there is no token yet to start it with: the IDE's first request will).
    """

    def __init__(self, options: Options, starter: ServerStarter | None, reactor: Any) -> None:
        self.options = options
        self.starter = starter
        self.reactor = reactor

    def startService(self) -> None:
        super().startService()
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
        if not stopped or self.starter is None or not self.starter.allowed or not self.starter.api.has_token:
            return None
        return self.starter.ensure_running().addErrback(
            lambda failure: log.warn("{message}", message=getattr(failure.value, "message", failure.getErrorMessage()))
        )
