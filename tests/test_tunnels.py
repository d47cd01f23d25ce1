"""
The HTTP CONNECT and SOCKS5 client endpoints in memory: the bytes they send, the answers they read,
every refusal named in the proxy's own words, and failures that the retry code takes for a hub
connection that failed before anything was sent.
"""

from __future__ import annotations

import base64
import json

import pytest
from twisted.internet import error as net_error
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import (
    IHostnameResolver,
    IHostResolution,
    IReactorPluggableNameResolver,
    IStreamClientEndpoint,
)
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure
from twisted.web.client import ResponseNeverReceived
from zope.interface import implementer

from jds.reach import ProxyVia
from jds.refusal import Refusal
from jds.retry import may_retry, never_sent
from jds.tls import HubTLSPolicy
from jds.tunnels import HTTPConnectEndpoint, SOCKS5Endpoint, TunnelError
from jds.via import parse_via

SECRET = "s3cr%t:pw"
HUB = ("hub.cluster.invalid", 8443)


@implementer(IStreamClientEndpoint)
class FakeProxy:
    """The connection to the proxy: a StringTransport the test reads and answers on."""

    def __init__(self, failure: Exception | None = None) -> None:
        self.transport = StringTransport()
        self.protocol: Protocol | None = None
        self.failure = failure
        self.pending: Deferred | None = None

    def connect(self, factory: Factory) -> Deferred:
        if self.failure is not None:
            return fail(self.failure)
        self.protocol = factory.buildProtocol(None)
        self.protocol.makeConnection(self.transport)
        return succeed(self.protocol)

    def answer(self, data: bytes) -> None:
        assert self.protocol is not None
        self.protocol.dataReceived(data)

    def sent(self) -> bytes:
        value = self.transport.value()
        self.transport.clear()
        return value


@implementer(IHostResolution)
class _Resolution:
    def __init__(self, name: str) -> None:
        self.name = name

    def cancel(self) -> None:
        pass


@implementer(IHostnameResolver)
class _LoopbackResolver:
    """Every name is 127.0.0.1 at once, as Twisted 24's MemoryReactor resolves them."""

    def resolveHostName(self, receiver, hostName, portNumber=0, addressTypes=None, transportSemantics="TCP"):  # noqa: N802, N803
        resolution = _Resolution(hostName)
        receiver.resolutionBegan(resolution)
        receiver.addressResolved(IPv4Address("TCP", "127.0.0.1", portNumber))
        receiver.resolutionComplete()
        return resolution


@implementer(IReactorPluggableNameResolver)
class ResolvingReactor(MemoryReactorClock):
    """A MemoryReactorClock that HostnameEndpoint dials at once with the oldest Twisted we support too."""

    def __init__(self) -> None:
        super().__init__()
        if not hasattr(self, "nameResolver"):  # Twisted < 24: MemoryReactor has no resolver
            self.nameResolver = _LoopbackResolver()

    def installNameResolver(self, resolver):  # noqa: N802 - interface name
        previous, self.nameResolver = self.nameResolver, resolver
        return previous


class Recorder(Protocol):
    def __init__(self) -> None:
        self.data = b""
        self.made = False
        self.lost: Failure | None = None

    def connectionMade(self) -> None:
        self.made = True

    def dataReceived(self, data: bytes) -> None:
        self.data += data

    def connectionLost(self, reason: Failure) -> None:
        self.lost = reason


def _open(kind, spec_text: str, proxy: FakeProxy | None = None, host_port=HUB):
    reactor = MemoryReactorClock()
    proxy = proxy or FakeProxy()
    spec = parse_via(spec_text, "HTTPS_PROXY")
    endpoint = kind(reactor, proxy, spec, *host_port, timeout=5.0)
    results: list = []
    d = endpoint.connect(Factory.forProtocol(Recorder))
    d.addBoth(results.append)
    return reactor, proxy, d, results


def _refusal(results: list) -> Refusal:
    assert len(results) == 1 and isinstance(results[0], Failure), results
    assert results[0].check(TunnelError), results[0]
    assert results[0].check(net_error.ConnectError)
    return results[0].value.refusal


def _no_secret(refusal: Refusal) -> None:
    text = json.dumps([refusal.message, refusal.hint, refusal.reason])
    assert "s3cr" not in text and base64.b64encode(b"user:" + SECRET.encode()).decode() not in text


# HTTP CONNECT


def test_connect_sends_the_name_and_basic_credentials_percent_decoded() -> None:
    _, proxy, _, _ = _open(HTTPConnectEndpoint, "http://us%65r:s3cr%25t%3Apw@proxy.example:3128")
    head = proxy.sent()
    assert head.startswith(b"CONNECT hub.cluster.invalid:8443 HTTP/1.1\r\n")
    assert b"\r\nHost: hub.cluster.invalid:8443\r\n" in head
    assert head.endswith(b"\r\n\r\n")
    auth = [line for line in head.split(b"\r\n") if line.startswith(b"Proxy-Authorization: ")]
    assert auth == [b"Proxy-Authorization: Basic " + base64.b64encode(b"user:" + SECRET.encode())]


def test_connect_without_credentials_sends_none_and_brackets_ipv6() -> None:
    _, proxy, _, _ = _open(HTTPConnectEndpoint, "http://proxy:3128", host_port=("fd00::1", 443))
    head = proxy.sent()
    assert head.startswith(b"CONNECT [fd00::1]:443 HTTP/1.1\r\n") and b"Proxy-Authorization" not in head


def test_a_2xx_is_a_tunnel_and_bytes_after_the_head_are_handed_on() -> None:
    reactor, proxy, _, results = _open(HTTPConnectEndpoint, "http://proxy:3128")
    proxy.sent()
    proxy.answer(b"HTTP/1.1 200 Connection established\r\nVia: x\r\n")
    assert results == []
    proxy.answer(b"\r\nTLS-BYTES")
    (wrapped,) = results
    assert isinstance(wrapped, Recorder) and wrapped.made
    assert wrapped.transport is proxy.transport  # the real transport: TCP_NODELAY and flow control reach it
    assert wrapped.data == b"TLS-BYTES"
    proxy.answer(b"MORE")
    assert wrapped.data == b"TLS-BYTESMORE"
    wrapped.transport.write(b"UP")
    assert proxy.sent() == b"UP"
    proxy.protocol.connectionLost(Failure(net_error.ConnectionDone()))
    assert wrapped.lost is not None
    assert reactor.getDelayedCalls() == []  # the handshake deadline is gone


@pytest.mark.parametrize("status", [b"HTTP/1.1 407 Proxy Authentication Required", b"HTTP/1.0 401 Unauthorized"])
def test_credentials_wanted(status: bytes) -> None:
    _, proxy, _, results = _open(HTTPConnectEndpoint, "http://proxy:3128")
    proxy.answer(status + b"\r\nProxy-Authenticate: Basic realm=x\r\n\r\n")
    refusal = _refusal(results)
    assert refusal.reason == "via-auth-required" and refusal.status == 502
    assert refusal.message == (
        f"The HTTP proxy at proxy:3128 (from HTTPS_PROXY) wants credentials: it answered '{status.decode()}'."
    )
    assert "HTTPS_PROXY=http://USER:PASSWORD@proxy:3128" in refusal.hint
    assert proxy.transport.disconnecting


@pytest.mark.parametrize("status", [b"HTTP/1.1 407 Proxy Authentication Required", b"HTTP/1.1 401 Unauthorized"])
def test_credentials_refused(status: bytes) -> None:
    _, proxy, _, results = _open(HTTPConnectEndpoint, "http://user:s3cr%25t%3Apw@proxy:3128")
    proxy.answer(status + b"\r\n\r\n")
    refusal = _refusal(results)
    assert refusal.reason == "via-auth-refused"
    assert refusal.message.startswith("The HTTP proxy at proxy:3128 (from HTTPS_PROXY) refused the credentials given for user")
    assert status.decode() in refusal.message
    _no_secret(refusal)


@pytest.mark.parametrize(
    ("status", "reason", "says"),
    [
        (b"HTTP/1.1 403 Forbidden", "via-refused", "refused to open a tunnel to hub.cluster.invalid:8443"),
        (b"HTTP/1.1 502 Bad Gateway", "via-hub-unreachable", "could not reach the hub at hub.cluster.invalid:8443"),
        (b"HTTP/1.1 503 Service Unavailable", "via-hub-unreachable", "could not reach the hub"),
        (b"HTTP/1.1 405 Method Not Allowed", "via-refused", "did not open a tunnel"),
    ],
)
def test_refusals_quote_the_status_line(status: bytes, reason: str, says: str) -> None:
    _, proxy, _, results = _open(HTTPConnectEndpoint, "http://proxy:3128")
    proxy.answer(status + b"\r\nContent-Length: 5\r\n\r\nbody!")
    refusal = _refusal(results)
    assert refusal.reason == reason
    assert says in refusal.message
    assert f"it answered '{status.decode()}'." in refusal.message


def test_a_status_line_with_control_characters_is_quoted_safely() -> None:
    _, proxy, _, results = _open(HTTPConnectEndpoint, "http://proxy:3128")
    proxy.answer(b"HTTP/1.1 403 No\x1b[31m way\r\n\r\n")
    assert "'HTTP/1.1 403 No?[31m way'" in _refusal(results).message


@pytest.mark.parametrize("answer", [b"SSH-2.0-OpenSSH\r\n\r\n", b"\x05\x00" + b"x" * 70000])
def test_an_answer_that_is_not_http(answer: bytes) -> None:
    _, proxy, _, results = _open(HTTPConnectEndpoint, "http://proxy:3128")
    proxy.answer(answer)
    refusal = _refusal(results)
    assert refusal.reason == "via-protocol"
    assert refusal.message == "The HTTP proxy at proxy:3128 (from HTTPS_PROXY) did not answer the CONNECT in HTTP."


def test_a_silent_proxy_times_out() -> None:
    reactor, proxy, _, results = _open(HTTPConnectEndpoint, "http://proxy:3128")
    reactor.advance(4.9)
    assert results == []
    reactor.advance(0.2)
    refusal = _refusal(results)
    assert refusal.reason == "via-timeout"
    assert "did not answer the CONNECT for hub.cluster.invalid:8443 within 5 s" in refusal.message
    assert proxy.transport.disconnecting


def test_a_proxy_that_hangs_up_before_answering() -> None:
    reactor, proxy, _, results = _open(HTTPConnectEndpoint, "http://proxy:3128")
    proxy.protocol.connectionLost(Failure(net_error.ConnectionDone()))
    refusal = _refusal(results)
    assert refusal.reason == "via-protocol" and "closed the connection before opening a tunnel" in refusal.message
    assert reactor.getDelayedCalls() == []


@pytest.mark.parametrize(
    ("error", "reason", "says"),
    [
        (net_error.ConnectionRefusedError(), "via-unreachable", "refused the connection: nothing listens there"),
        (net_error.DNSLookupError("proxy"), "via-unresolvable", "Cannot resolve the name of the HTTP proxy at proxy:3128"),
        (net_error.TimeoutError(), "via-timeout", "did not answer within 5 s"),
        (net_error.NoRouteError(), "via-unreachable", "Cannot connect to the HTTP proxy at proxy:3128"),
    ],
)
def test_failures_to_reach_the_proxy_are_the_proxys(error: Exception, reason: str, says: str) -> None:
    _, _, _, results = _open(HTTPConnectEndpoint, "http://proxy:3128", FakeProxy(error))
    refusal = _refusal(results)
    assert refusal.reason == reason and says in refusal.message


def test_cancelling_aborts_the_connection_to_the_proxy() -> None:
    reactor, proxy, d, results = _open(HTTPConnectEndpoint, "http://proxy:3128")
    d.cancel()
    assert results[0].check(net_error.ConnectingCancelledError)
    assert proxy.transport.disconnecting
    proxy.answer(b"HTTP/1.1 200 OK\r\n\r\n")  # too late: ignored
    assert len(results) == 1


def test_a_tunnel_failure_is_a_hub_connection_never_sent_and_explained_by_the_policy(tmp_path) -> None:
    _, proxy, _, results = _open(HTTPConnectEndpoint, "http://proxy:3128")
    proxy.answer(b"HTTP/1.1 407 Proxy Authentication Required\r\n\r\n")
    failure = results[0]
    assert never_sent(failure) and may_retry(b"POST", failure)
    wrapped = Failure(ResponseNeverReceived([failure]))
    policy = HubTLSPolicy(
        MemoryReactorClock(), *HUB, HUB[0], None, via=ProxyVia(MemoryReactorClock(), parse_via("http://proxy:3128"))
    )
    assert policy.explain(wrapped) == failure.value.refusal
    # and a failure that is not the via's still gets the hub's sentence
    refused = policy.explain(Failure(net_error.ConnectionRefusedError()))
    assert refused.message == "The hub at hub.cluster.invalid:8443 refused the connection."


# SOCKS5


def test_socks5_sends_the_name_for_the_proxy_to_resolve() -> None:
    _, proxy, _, results = _open(SOCKS5Endpoint, "socks5://127.0.0.1:1080")
    assert proxy.sent() == b"\x05\x01\x00"
    proxy.answer(b"\x05\x00")
    name = b"hub.cluster.invalid"
    assert proxy.sent() == b"\x05\x01\x00\x03" + bytes([len(name)]) + name + b"\x20\xfb"
    # the reply one byte at a time, then the first bytes of the tunnel in the same read
    for byte in b"\x05\x00\x00\x01\x7f\x00\x00":
        proxy.answer(bytes([byte]))
    assert results == []
    proxy.answer(b"\x01\x04\x38HELLO")
    (wrapped,) = results
    assert wrapped.data == b"HELLO" and wrapped.transport is proxy.transport


def test_socks5_addresses_are_sent_as_addresses() -> None:
    _, proxy, _, _ = _open(SOCKS5Endpoint, "socks5://p:1080", host_port=("10.1.2.3", 443))
    proxy.sent()
    proxy.answer(b"\x05\x00")
    assert proxy.sent() == b"\x05\x01\x00\x01\x0a\x01\x02\x03\x01\xbb"
    _, proxy, _, _ = _open(SOCKS5Endpoint, "socks5://p:1080", host_port=("::1", 443))
    proxy.sent()
    proxy.answer(b"\x05\x00")
    assert proxy.sent() == b"\x05\x01\x00\x04" + b"\x00" * 15 + b"\x01\x01\xbb"


def test_socks5_reply_with_a_domain_bound_address() -> None:
    _, proxy, _, results = _open(SOCKS5Endpoint, "socks5://p:1080")
    proxy.answer(b"\x05\x00")
    proxy.answer(b"\x05\x00\x00\x03\x04host\x00\x50X")
    assert results[0].data == b"X"


def test_socks5_user_and_password() -> None:
    _, proxy, _, results = _open(SOCKS5Endpoint, "socks5://user:s3cr%25t%3Apw@p:1080")
    assert proxy.sent() == b"\x05\x02\x00\x02"
    proxy.answer(b"\x05\x02")
    secret = SECRET.encode()
    assert proxy.sent() == b"\x01\x04user" + bytes([len(secret)]) + secret
    proxy.answer(b"\x01\x00")
    assert proxy.sent().startswith(b"\x05\x01\x00\x03")
    proxy.answer(b"\x05\x00\x00\x01\x00\x00\x00\x00\x00\x00")
    assert isinstance(results[0], Recorder)


def test_socks5_credentials_refused() -> None:
    _, proxy, _, results = _open(SOCKS5Endpoint, "socks5://user:s3cr%25t%3Apw@p:1080")
    proxy.answer(b"\x05\x02\x01\x01")
    refusal = _refusal(results)
    assert refusal.reason == "via-auth-refused"
    assert refusal.message == "The SOCKS5 proxy at p:1080 (from HTTPS_PROXY) refused the credentials given for user."
    _no_secret(refusal)


def test_socks5_wants_credentials() -> None:
    _, proxy, _, results = _open(SOCKS5Endpoint, "socks5://p:1080")
    proxy.answer(b"\x05\xff")
    refusal = _refusal(results)
    assert refusal.reason == "via-auth-required"
    assert refusal.message == "The SOCKS5 proxy at p:1080 (from HTTPS_PROXY) wants credentials; none were given."


@pytest.mark.parametrize(("code", "meaning"), [(4, "host unreachable"), (5, "connection refused"), (2, "connection not allowed by its rules"), (1, "general failure")])
def test_socks5_replies_are_named(code: int, meaning: str) -> None:
    _, proxy, _, results = _open(SOCKS5Endpoint, "socks5://p:1080")
    proxy.answer(b"\x05\x00")
    proxy.answer(b"\x05" + bytes([code]) + b"\x00\x01\x00\x00\x00\x00\x00\x00")
    refusal = _refusal(results)
    assert refusal.message == (
        f"The SOCKS5 proxy at p:1080 (from HTTPS_PROXY) could not connect to hub.cluster.invalid:8443: "
        f"{meaning} (SOCKS5 reply {code})."
    )


def test_an_http_proxy_given_as_socks5() -> None:
    _, proxy, _, results = _open(SOCKS5Endpoint, "socks5://p:1080")
    proxy.answer(b"HTTP/1.1 400 Bad Request\r\n\r\n")
    refusal = _refusal(results)
    assert refusal.reason == "via-protocol" and "did not answer as a SOCKS5 proxy" in refusal.message


# The via around them


def test_proxy_via_status_check_and_explain() -> None:
    reactor = ResolvingReactor()
    spec = parse_via("http://user:s3cr%25t%3Apw@127.0.0.1:3128", "HTTPS_PROXY")
    via = ProxyVia(reactor, spec, 5.0)
    assert via.status() == {
        "kind": "http", "address": "http://127.0.0.1:3128", "source": "HTTPS_PROXY", "state": "idle",
        "restarts": 0, "tunnels": 0,
    }
    results: list = []
    via.check(*HUB).addBoth(results.append)
    (connector,) = reactor.tcpClients[-1:]  # the endpoint dials the proxy, not the hub
    assert (connector[0], connector[1]) == ("127.0.0.1", 3128)
    protocol = connector[2].buildProtocol(None)
    transport = StringTransport()
    protocol.makeConnection(transport)
    assert transport.value().startswith(b"CONNECT hub.cluster.invalid:8443 ")
    protocol.dataReceived(b"HTTP/1.1 407 Proxy Authentication Required\r\n\r\n")
    assert isinstance(results[0], Failure) and results[0].check(Refusal)
    assert results[0].value.reason == "via-auth-refused"
    status = via.status()
    assert status["state"] == "down" and "refused the credentials" in status["last_error"]
    assert "s3cr" not in json.dumps(status)
    assert via.explain(Failure(net_error.ConnectionRefusedError())) is None
