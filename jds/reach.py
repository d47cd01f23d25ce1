"""
The via kinds at run time, behind the :class:`jds.via.Via` interface, and :func:`make_via`, which
maps a :class:`ViaSpec` to one. :class:`jds.tls.HubTLSPolicy` asks the via for the stream to the hub
and puts TLS on it; nothing else here knows about TLS or HTTP to the hub.

``direct`` is Twisted's ``HostnameEndpoint``, as before there were vias. An HTTP or SOCKS5 proxy
opens a tunnel per connection (:mod:`jds.tunnels`) and keeps only what ``status`` reports: whether
the last tunnel opened, and the last failure's sentence. ``ssh://`` is :mod:`jds.bastion`'s.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred, succeed
from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.internet.interfaces import IProtocolFactory, IStreamClientEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.ssl import optionsForClientTLS
from twisted.python.failure import Failure
from zope.interface import implementer

from jds.refusal import Refusal
from jds.stats import iso_time
from jds.tunnels import HTTPConnectEndpoint, SOCKS5Endpoint, TunnelError, tunnel_refusal
from jds.via import Via, ViaSpec

__all__ = ["DirectVia", "ProxyVia", "closing_probe", "make_via"]


class DirectVia:
    """The hub dialled from this machine, its name resolved here."""

    def __init__(self, reactor: Any, spec: ViaSpec | None = None, connect_timeout: float = 10.0) -> None:
        self.reactor = reactor
        self.spec = spec if spec is not None else ViaSpec("direct")
        self.connect_timeout = connect_timeout

    def endpoint(self, host: str, port: int) -> IStreamClientEndpoint:
        return HostnameEndpoint(self.reactor, host, port, timeout=self.connect_timeout)

    def status(self) -> dict[str, Any]:
        return {"kind": "direct", "address": "", "source": self.spec.source, "state": "direct", "restarts": 0}

    def explain(self, failure: Failure) -> Refusal | None:
        return None

    def check(self, host: str, port: int) -> Deferred:
        return succeed(f"{host}:{port} is dialled from this machine, {self.spec.describe()}")

    def stop(self) -> None:
        return None


class _Close(Protocol):
    def connectionMade(self) -> None:
        self.transport.loseConnection()


def closing_probe() -> Factory:
    """A connection that closes as soon as it is made: proof that a way to the hub works, nothing sent."""
    probe = Factory.forProtocol(_Close)
    probe.noisy = False
    return probe


@implementer(IStreamClientEndpoint)
class _Watched:
    """An endpoint whose outcome the via records for ``status``."""

    def __init__(self, inner: IStreamClientEndpoint, via: ProxyVia) -> None:
        self._inner = inner
        self._via = via

    def connect(self, protocolFactory: IProtocolFactory) -> Deferred:  # noqa: N803 - interface name
        def opened(protocol: object) -> object:
            self._via.opened()
            return protocol

        def failed(failure: Failure) -> Failure:
            self._via.failed(failure)
            return failure

        return self._inner.connect(protocolFactory).addCallbacks(opened, failed)


class ProxyVia:
    """
    An HTTP (``http://``, ``https://``: CONNECT) or SOCKS5 proxy: one tunnel per hub connection, the
    hub's name resolved by the proxy. ``https://`` speaks TLS to the proxy (verified by the system
    trust store) and the hub's TLS inside it.
    """

    def __init__(self, reactor: Any, spec: ViaSpec, connect_timeout: float = 10.0) -> None:
        self.reactor = reactor
        self.spec = spec
        self.connect_timeout = connect_timeout
        self.tunnels = 0
        self.state = "idle"
        self.since: float | None = None
        self.last_error = ""

    def _to_proxy(self) -> IStreamClientEndpoint:
        tcp = HostnameEndpoint(self.reactor, self.spec.host, self.spec.port, timeout=self.connect_timeout)
        if self.spec.kind == "https":
            return wrapClientTLS(optionsForClientTLS(self.spec.host), tcp)
        return tcp

    def endpoint(self, host: str, port: int) -> IStreamClientEndpoint:
        kind = SOCKS5Endpoint if self.spec.kind == "socks5" else HTTPConnectEndpoint
        return _Watched(kind(self.reactor, self._to_proxy(), self.spec, host, port, self.connect_timeout), self)

    def opened(self) -> None:
        self.tunnels += 1
        if self.state != "up":
            self.state, self.since = "up", self.reactor.seconds()

    def failed(self, failure: Failure) -> None:
        refusal = self.explain(failure)
        if refusal is None:  # cancelled by the caller: says nothing about the proxy
            return
        self.last_error = refusal.message
        if self.state != "down":
            self.state, self.since = "down", self.reactor.seconds()

    def status(self) -> dict[str, Any]:
        report: dict[str, Any] = {
            "kind": self.spec.kind, "address": self.spec.url(), "source": self.spec.source,
            "state": self.state, "restarts": 0, "tunnels": self.tunnels,
        }
        if self.since is not None:
            report["since"] = iso_time(self.since)
        if self.last_error:
            report["last_error"] = self.last_error
        return report

    def explain(self, failure: Failure) -> Refusal | None:
        return failure.value.refusal if failure.check(TunnelError) else None

    def check(self, host: str, port: int) -> Deferred:
        def refused(failure: Failure) -> Failure:
            refusal = self.explain(failure) or tunnel_refusal(self.spec, failure, self.connect_timeout)
            return Failure(refusal)

        d = self.endpoint(host, port).connect(closing_probe())
        return d.addCallbacks(
            lambda _: f"{self.spec.describe()} opened a tunnel to {host}:{port}", refused
        )

    def stop(self) -> None:
        return None


def make_via(reactor: Any, spec: ViaSpec, ssh_command: str = "ssh", connect_timeout: float = 10.0) -> Via:
    """The via ``spec`` names. ``ssh://`` comes from :mod:`jds.bastion` (imported only when asked for)."""
    if spec.direct:
        return DirectVia(reactor, spec, connect_timeout)
    if spec.kind == "ssh":
        # lazy load: the ssh kind's module (and its process machinery) only when --via ssh:// asks for it
        from jds.bastion import SSHVia

        return SSHVia(reactor, spec, ssh_command, connect_timeout=connect_timeout)
    return ProxyVia(reactor, spec, connect_timeout)
