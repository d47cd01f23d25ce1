"""
Client endpoints that open a stream to the hub through an HTTP proxy (``CONNECT``, RFC 9110 9.3.6)
or a SOCKS5 proxy (RFC 1928, with RFC 1929's user name and password). Twisted has neither.

Each wraps the endpoint that reaches the proxy, speaks the handshake, then hands the connection,
and any bytes that came after the proxy's answer, to the protocol the caller asked for; that is the
TLS protocol of :class:`jds.tls.HubTLSPolicy`, so the proxy only sees encrypted bytes. The hub's
*name* is sent (the CONNECT authority, SOCKS5 address type 3): the proxy resolves it, so a hub known
only to the site's DNS works.

Every failure to open a tunnel is a :class:`TunnelError`, a ``ConnectError``: to the retry and
reconnect code (:mod:`jds.retry`, :mod:`jds.relay`) a via that fails is a hub connection that failed
before a byte was sent, and is retried as one. It carries a :class:`Refusal` in the proxy's own
words (its status line, the SOCKS reply), never with a password in it.
"""

from __future__ import annotations

import base64
import ipaddress
import re
import struct
from typing import Any

from OpenSSL import SSL
from twisted.internet import error as net_error
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IProtocolFactory, IReactorTime, IStreamClientEndpoint
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.python.failure import Failure
from zope.interface import implementer

from jds.refusal import Refusal
from jds.via import ViaSpec

__all__ = ["HTTPConnectEndpoint", "SOCKS5Endpoint", "TunnelError", "tunnel_refusal"]

# A proxy's answer head larger than this is not an answer to CONNECT.
_MAX_HEAD = 64 * 1024
_STATUS_LINE = re.compile(rb"HTTP/1\.[01] +(\d{3})(?: +(.*))?$")
_END_OF_HEAD = re.compile(rb"\r?\n\r?\n")

SOCKS_REPLIES = {
    1: "general failure",
    2: "connection not allowed by its rules",
    3: "network unreachable",
    4: "host unreachable",
    5: "connection refused",
    6: "TTL expired",
    7: "command not supported",
    8: "address type not supported",
}


class TunnelError(net_error.ConnectError):
    """The via could not open a stream to the hub; ``refusal`` says why, in the via's words."""

    def __init__(self, refusal: Refusal) -> None:
        super().__init__(string=refusal.message)
        self.refusal = refusal

    def __str__(self) -> str:
        return self.refusal.message


def _who(spec: ViaSpec) -> str:
    text = spec.describe()
    return text[:1].upper() + text[1:]


def _authority(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _quoted(line: bytes) -> str:
    """A proxy's status line, safe to show: printable ASCII, at most 200 characters."""
    text = "".join(ch if " " <= ch <= "~" else "?" for ch in line.decode("latin-1"))
    return text[:200]


def _where_hint(spec: ViaSpec) -> str:
    return f"the address in {spec.source}" if spec.source else "the proxy address"


def tunnel_refusal(spec: ViaSpec, failure: Failure, timeout: float) -> Refusal:
    """The sentence for a failure to reach the proxy itself (before any handshake)."""
    who = _who(spec)
    if failure.check(TunnelError):
        return failure.value.refusal
    if failure.check(net_error.DNSLookupError):
        return Refusal(502, f"Cannot resolve the name of {spec.describe()}.", "via-unresolvable",
                       hint=f"Check {_where_hint(spec)}.")
    if failure.check(net_error.ConnectionRefusedError):
        return Refusal(
            502, f"{who} refused the connection: nothing listens there.", "via-unreachable",
            hint=f"Start the proxy (a SOCKS tunnel: ssh -D PORT -N HOST), or fix {_where_hint(spec)}.",
        )
    if failure.check(net_error.TimeoutError, net_error.ConnectingCancelledError):
        return Refusal(502, f"{who} did not answer within {timeout:g} s.", "via-timeout",
                       hint=f"Check the network path to the proxy and {_where_hint(spec)}.")
    if failure.check(SSL.Error):
        return Refusal(502, f"TLS with {spec.describe()} failed: {failure.getErrorMessage()}.", "via-tls",
                       hint="Check that the proxy speaks TLS (https://) and its certificate is trusted here.")
    return Refusal(
        502, f"Cannot connect to {spec.describe()}: {failure.getErrorMessage()}.", "via-unreachable",
        hint=f"Check {_where_hint(spec)} and the network path to the proxy.",
    )


class _Handshake(Protocol):
    """
    Speaks one proxy handshake on the connection to the proxy, then forwards everything between the
    transport and the caller's protocol, which gets the real transport (so TCP_NODELAY, pausing and
    flow control reach the socket).
    """

    def __init__(self, tunnel: _TunnelEndpoint, factory: IProtocolFactory, done: Deferred) -> None:
        self.tunnel = tunnel
        self.wanted = factory
        self.done = done
        self.buffer = b""
        self.wrapped: Any = None
        self._deadline: IDelayedCall | None = None

    # What a kind says and reads; ``consume`` returns the bytes after the handshake once it is over.
    def greeting(self) -> bytes:
        raise NotImplementedError

    def consume(self) -> bytes | None:
        raise NotImplementedError

    def connectionMade(self) -> None:
        self._deadline = self.tunnel.reactor.callLater(self.tunnel.timeout, self._timed_out)
        self.transport.write(self.greeting())

    def dataReceived(self, data: bytes) -> None:
        if self.wrapped is not None:
            self.wrapped.dataReceived(data)
            return
        if self.done.called:
            return
        self.buffer += data
        try:
            rest = self.consume()
        except TunnelError as error:
            self._fail(error)
            return
        if rest is not None:
            self._open(rest)

    def _open(self, rest: bytes) -> None:
        self._stop_deadline()
        wrapped = self.wanted.buildProtocol(self.transport.getPeer())
        if wrapped is None:
            self.transport.loseConnection()
            self.done.errback(net_error.ConnectingCancelledError(self.transport.getPeer()))
            return
        self.wrapped = wrapped
        wrapped.makeConnection(self.transport)
        self.done.callback(wrapped)
        if rest and self.transport is not None and not getattr(self.transport, "disconnected", False):
            wrapped.dataReceived(rest)

    def _fail(self, error: TunnelError) -> None:
        self._stop_deadline()
        if not self.done.called:
            self.done.errback(error)
        self.transport.abortConnection()

    def _timed_out(self) -> None:
        self._deadline = None
        self._fail(self.tunnel.error(
            f"{_who(self.tunnel.spec)} did not answer the {self.tunnel.request_name} for "
            f"{_authority(self.tunnel.host, self.tunnel.port)} within {self.tunnel.timeout:g} s.",
            "via-timeout", "Check that the address names a proxy of that kind, and the proxy's health.",
        ))

    def _stop_deadline(self) -> None:
        if self._deadline is not None and self._deadline.active():
            self._deadline.cancel()
        self._deadline = None

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._stop_deadline()
        if self.wrapped is not None:
            self.wrapped.connectionLost(reason)
            return
        if self.done.called:
            return
        tunnel = self.tunnel
        if reason.check(SSL.Error):
            self.done.errback(TunnelError(tunnel_refusal(tunnel.spec, reason, tunnel.timeout)))
            return
        self.done.errback(tunnel.error(
            f"{_who(tunnel.spec)} closed the connection before opening a tunnel to "
            f"{_authority(tunnel.host, tunnel.port)}.",
            "via-protocol", "Check that the address names a proxy of that kind, and the proxy's log.",
        ))


@implementer(IStreamClientEndpoint)
class _TunnelEndpoint:
    """What both kinds share: reaching the proxy, the deadline, cancelling, failing in the proxy's words."""

    handshake: type[_Handshake]
    request_name = "request"

    def __init__(
        self, reactor: IReactorTime, proxy: IStreamClientEndpoint, spec: ViaSpec, host: str, port: int,
        timeout: float = 10.0,
    ) -> None:
        self.reactor = reactor
        self.proxy = proxy
        self.spec = spec
        self.host = host
        self.port = port
        self.timeout = timeout

    def error(self, message: str, reason: str, hint: str) -> TunnelError:
        return TunnelError(Refusal(502, message, reason, hint=hint))

    def connect(self, protocolFactory: IProtocolFactory) -> Deferred:  # noqa: N803 - interface name
        handshakes: list[_Handshake] = []

        def cancel(done: Deferred) -> None:
            if not connecting.called:
                connecting.cancel()
            elif handshakes and handshakes[0].transport is not None:
                handshakes[0].transport.abortConnection()
            if not done.called:
                done.errback(net_error.ConnectingCancelledError(None))

        done: Deferred = Deferred(cancel)

        def build() -> _Handshake:
            handshake = self.handshake(self, protocolFactory, done)
            handshakes.append(handshake)
            return handshake

        factory = Factory.forProtocol(build)
        factory.noisy = False
        connecting = self.proxy.connect(factory)

        def failed(failure: Failure) -> None:
            if not done.called:
                done.errback(TunnelError(tunnel_refusal(self.spec, failure, self.timeout)))

        connecting.addErrback(failed)
        return done


class _ConnectHandshake(_Handshake):
    tunnel: HTTPConnectEndpoint

    def greeting(self) -> bytes:
        target = _authority(self.tunnel.host, self.tunnel.port).encode("idna")
        lines = [b"CONNECT " + target + b" HTTP/1.1", b"Host: " + target]
        spec = self.tunnel.spec
        if spec.user or spec.password:
            pair = f"{spec.user}:{spec.password}".encode()
            lines.append(b"Proxy-Authorization: Basic " + base64.b64encode(pair))
        return b"\r\n".join(lines) + b"\r\n\r\n"

    def consume(self) -> bytes | None:
        end = _END_OF_HEAD.search(self.buffer)
        if end is None:
            if len(self.buffer) > _MAX_HEAD:
                raise self._not_http()
            return None
        head, rest = self.buffer[: end.start()], self.buffer[end.end():]
        line = head.split(b"\n", 1)[0].rstrip(b"\r")
        match = _STATUS_LINE.match(line)
        if match is None:
            raise self._not_http()
        code = int(match.group(1))
        if 200 <= code < 300:
            return rest
        raise self._refused(code, _quoted(line))

    def _not_http(self) -> TunnelError:
        return self.tunnel.error(
            f"{_who(self.tunnel.spec)} did not answer the CONNECT in HTTP.", "via-protocol",
            "Check that the address names an HTTP proxy (a SOCKS proxy needs socks5://).",
        )

    def _refused(self, code: int, line: str) -> TunnelError:
        spec = self.tunnel.spec
        who = _who(spec)
        target = _authority(self.tunnel.host, self.tunnel.port)
        if code in (401, 407) and not (spec.user or spec.password):
            return self.tunnel.error(
                f"{who} wants credentials: it answered '{line}'.", "via-auth-required",
                f"Put them in the proxy URL in the environment: HTTPS_PROXY=http://USER:PASSWORD@{spec.address} "
                "(percent-encode any @ or : in them).",
            )
        if code in (401, 407):
            return self.tunnel.error(
                f"{who} refused the credentials given for {spec.user or 'the user'}: it answered '{line}'.",
                "via-auth-refused", f"Check the user name and password in {spec.source or 'the proxy URL'}.",
            )
        if code == 403:
            return self.tunnel.error(
                f"{who} refused to open a tunnel to {target}: it answered '{line}'.", "via-refused",
                "The proxy does not allow this hub or port: ask its administrators, or reach the hub another way (--via).",
            )
        if code >= 500:
            return self.tunnel.error(
                f"{who} could not reach the hub at {target}: it answered '{line}'.", "via-hub-unreachable",
                "Check the name and port in --hub: the proxy resolves and dials them itself.",
            )
        return self.tunnel.error(
            f"{who} did not open a tunnel to {target}: it answered '{line}'.", "via-refused",
            "Check that the address names an HTTP proxy that allows CONNECT.",
        )


class HTTPConnectEndpoint(_TunnelEndpoint):
    """A stream to ``host:port`` through an HTTP proxy's CONNECT, with Basic credentials when the spec has them."""

    handshake = _ConnectHandshake
    request_name = "CONNECT"


def _socks_address(host: str) -> bytes:
    """SOCKS5 ATYP and address: IP addresses as themselves, names (type 3) for the proxy to resolve."""
    try:
        address = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        name = host.encode("idna")
        if not 0 < len(name) < 256:
            raise ValueError(f"the hub's name {host!r} is too long for SOCKS5") from None
        return b"\x03" + bytes([len(name)]) + name
    return (b"\x01" if address.version == 4 else b"\x04") + address.packed


class _SOCKSHandshake(_Handshake):
    tunnel: SOCKS5Endpoint
    stage = "method"

    def greeting(self) -> bytes:
        spec = self.tunnel.spec
        return b"\x05\x02\x00\x02" if spec.user or spec.password else b"\x05\x01\x00"

    rest = b""

    def consume(self) -> bytes | None:
        while self.stage != "open":
            if getattr(self, f"_{self.stage}")() is None:
                return None
        return self.rest

    def _take(self, count: int) -> bytes | None:
        if len(self.buffer) < count:
            return None
        taken, self.buffer = self.buffer[:count], self.buffer[count:]
        return taken

    def _method(self) -> bytes | None:
        answer = self._take(2)
        if answer is None:
            return None
        spec = self.tunnel.spec
        if answer[0] != 5:
            raise self.tunnel.error(
                f"{_who(spec)} did not answer as a SOCKS5 proxy.", "via-protocol",
                "Check that the address names a SOCKS5 proxy (an HTTP proxy needs http://).",
            )
        if answer[1] == 0:
            return self._request()
        if answer[1] == 2 and (spec.user or spec.password):
            user, password = spec.user.encode(), spec.password.encode()
            if len(user) > 255 or len(password) > 255:
                raise self.tunnel.error(
                    f"The user name or password for {spec.describe()} is longer than SOCKS5 allows (255 bytes).",
                    "via-auth-refused", f"Check the credentials in {spec.source or 'the proxy URL'}.",
                )
            self.transport.write(b"\x01" + bytes([len(user)]) + user + bytes([len(password)]) + password)
            self.stage = "auth"
            return b""
        wanted = "" if spec.user or spec.password else ": put them in the URL, socks5://USER:PASSWORD@" + spec.address
        raise self.tunnel.error(
            f"{_who(spec)} wants credentials" + (
                " of a kind this client does not offer." if spec.user or spec.password else "; none were given."
            ), "via-auth-required", "Check the proxy's authentication settings" + wanted + ".",
        )

    def _auth(self) -> bytes | None:
        answer = self._take(2)
        if answer is None:
            return None
        if answer[1] != 0:
            spec = self.tunnel.spec
            raise self.tunnel.error(
                f"{_who(spec)} refused the credentials given for {spec.user or 'the user'}.", "via-auth-refused",
                f"Check the user name and password in {spec.source or 'the proxy URL'}.",
            )
        return self._request()

    def _request(self) -> bytes:
        try:
            address = _socks_address(self.tunnel.host)
        except ValueError as exc:
            raise self.tunnel.error(f"Cannot ask {self.tunnel.spec.describe()} for the hub: {exc}.", "via-protocol",
                                    "Check the name in --hub.") from None
        self.transport.write(b"\x05\x01\x00" + address + struct.pack("!H", self.tunnel.port))
        self.stage = "reply"
        return b""

    def _reply(self) -> bytes | None:
        if len(self.buffer) < 5:
            return None
        version, code, _, kind, first = self.buffer[:5]
        size = {1: 4, 4: 16, 3: 1 + first}.get(kind)
        if version != 5 or size is None:
            raise self.tunnel.error(
                f"{_who(self.tunnel.spec)} sent a SOCKS5 reply this client cannot read.", "via-protocol",
                "Check that the address names a SOCKS5 proxy.",
            )
        total = 4 + size + 2
        if len(self.buffer) < total:
            return None
        self.rest = self.buffer[total:]
        self.buffer = b""
        if code != 0:
            meaning = SOCKS_REPLIES.get(code, "an unknown error")
            target = _authority(self.tunnel.host, self.tunnel.port)
            raise self.tunnel.error(
                f"{_who(self.tunnel.spec)} could not connect to {target}: {meaning} (SOCKS5 reply {code}).",
                "via-hub-unreachable" if code in (3, 4, 5, 6) else "via-refused",
                "Check the name and port in --hub: the proxy resolves and dials them itself.",
            )
        self.stage = "open"
        return self.rest


class SOCKS5Endpoint(_TunnelEndpoint):
    """A stream to ``host:port`` through a SOCKS5 proxy, the name resolved by the proxy (curl's socks5h)."""

    handshake = _SOCKSHandshake
    request_name = "SOCKS5 request"
