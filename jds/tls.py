"""
The TLS policy for every connection to the hub: verified against the cluster CA, with a verification
name that may differ from the address dialled, TLS 1.2 at least, and no way to turn verification off.

HTTP and WebSocket traffic both get their connections from :meth:`HubTLSPolicy.endpoint`, so there is
exactly one place where the hub's certificate is judged. What carries the bytes underneath is the
policy's via (:mod:`jds.reach`: a TCP connection, a proxy's tunnel, an ssh channel); TLS is always on
top of it, so the check is the same whatever the way in. Verification failures are turned into
:class:`Refusal` with a sentence naming the option to change, because "certificate verify
failed" alone sends users to the original tool's README.
"""

from __future__ import annotations

import datetime
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from cryptography import x509
from cryptography.x509.oid import NameOID
from OpenSSL import SSL
from OpenSSL._util import ffi as _ffi
from OpenSSL._util import lib as _lib
from OpenSSL.crypto import X509
from service_identity import VerificationError
from service_identity.hazmat import DNS_ID, IPAddress_ID, verify_service_identity
from service_identity.pyopenssl import extract_patterns
from twisted.internet import error as net_error
from twisted.internet.abstract import isIPAddress, isIPv6Address
from twisted.internet.defer import CancelledError, Deferred, fail, succeed
from twisted.internet.interfaces import (
    IOpenSSLClientConnectionCreator,
    IReactorTCP,
    IReactorTime,
    IStreamClientEndpoint,
)
from twisted.internet.ssl import (
    Certificate,
    CertificateOptions,
    TLSVersion,
    platformTrust,
    trustRootFromCertificates,
)
from twisted.protocols.policies import ProtocolWrapper
from twisted.protocols.tls import TLSMemoryBIOFactory, TLSMemoryBIOProtocol
from twisted.python.failure import Failure
from zope.interface import implementer

from jds.reach import DirectVia
from jds.refusal import Refusal, leaf_failures
from jds.spares import SpareConnections
from jds.via import Via

__all__ = ["HubTLSPolicy", "PeerCertificate", "TLSConfigError", "explain_failure", "leaf_failures"]

_PEM_BLOCK = re.compile(
    rb"-----BEGIN CERTIFICATE-----\r?\n.+?\r?\n-----END CERTIFICATE-----", re.DOTALL
)

# OpenSSL X509_V_ERR_* codes a user can act on, by what they should do about them.
_UNKNOWN_CA = {2, 19, 20, 21}
_SELF_SIGNED_LEAF = 18
_NOT_YET_VALID = 9
_EXPIRED = 10


class TLSConfigError(ValueError):
    """The ``--ca-cert`` file cannot serve as a trust root; the message says why."""


def _describe_names(cert: X509) -> str:
    names = []
    for pattern in extract_patterns(cert):
        value = getattr(pattern, "pattern", None)
        if value is None:
            continue
        names.append(value.decode("ascii", "replace") if isinstance(value, bytes) else str(value))
    return ", ".join(names) or "none"


def _validity(parsed: x509.Certificate, edge: str) -> datetime.datetime:
    """
    ``not_valid_after`` / ``not_valid_before`` as an aware UTC time. cryptography 42 added the
    ``*_utc`` properties (and deprecated the naive ones); pyOpenSSL 23.2, our oldest, holds it to 41.
    """
    aware = getattr(parsed, f"{edge}_utc", None)
    return aware if aware is not None else getattr(parsed, edge).replace(tzinfo=datetime.timezone.utc)


def _common_name(name: x509.Name) -> str:
    for oid in (NameOID.COMMON_NAME, NameOID.ORGANIZATION_NAME):
        values = name.get_attributes_for_oid(oid)
        if values:
            return str(values[0].value)
    return ""


def _certificate_error(err: int, depth: int, cert: X509, ca_source: str) -> Refusal:
    parsed = cert.to_cryptography()
    subject = _common_name(parsed.subject) or "the hub's certificate"
    issuer = _common_name(parsed.issuer) or "an unnamed CA"
    if err in _UNKNOWN_CA:
        return Refusal(
            502,
            f"The hub's certificate ({subject}, issued by {issuer}) is not signed by {ca_source}.",
            "unknown-ca",
            hint="Pass the cluster's CA certificate with --ca-cert (or JUPYTER_CLUSTER_CA_CERT).",
        )
    if err == _SELF_SIGNED_LEAF:
        return Refusal(
            502,
            f"The hub presents a self-signed certificate ({subject}) that {ca_source} does not trust.",
            "self-signed",
            hint="Ask the cluster administrators for the CA certificate and pass it with --ca-cert.",
        )
    if err in (_EXPIRED, _NOT_YET_VALID):
        when = _validity(parsed, "not_valid_after" if err == _EXPIRED else "not_valid_before")
        stamp = when.strftime("%Y-%m-%d %H:%M UTC")
        state = "expired on" if err == _EXPIRED else "is not valid before"
        return Refusal(
            502,
            f"The hub's certificate ({subject}, depth {depth}) {state} {stamp}.",
            "expired" if err == _EXPIRED else "not-yet-valid",
            hint="The cluster administrators must renew the hub's certificate; check this machine's clock too.",
        )
    return Refusal(
        502,
        f"The hub's certificate ({subject}) failed verification (OpenSSL error {err}).",
        "bad-certificate",
        hint="Check --ca-cert and the hub's certificate chain with 'jupyter-dev-server check'.",
    )


@dataclass(frozen=True)
class PeerCertificate:
    """What ``jupyter-dev-server check`` reports about the hub's verified certificate."""

    names: str
    issuer: str
    not_after: datetime.datetime | None

    @classmethod
    def of(cls, cert: X509) -> PeerCertificate:
        parsed = cert.to_cryptography()
        issuer = _common_name(parsed.issuer) or "an unnamed CA"
        return cls(_describe_names(cert), issuer, _validity(parsed, "not_valid_after"))

    def days_left(self, now: datetime.datetime) -> int | None:
        return None if self.not_after is None else (self.not_after - now).days


@implementer(IOpenSSLClientConnectionCreator)
class _PinnedClientCreator:
    """
    Like ``optionsForClientTLS``, but the refusal reason survives: a failed check fails the TLS
    connection with a :class:`Refusal` instead of a bare "certificate verify failed".
    """

    def __init__(self, options: CertificateOptions, name: str, ca_source: str) -> None:
        self._options = options
        self._name = name
        self._is_dns = not (isIPAddress(name) or isIPv6Address(name))
        self._ca_source = ca_source
        self._service_id = DNS_ID(name) if self._is_dns else IPAddress_ID(name)
        self.last_peer: PeerCertificate | None = None

    def clientConnectionForTLS(self, tlsProtocol: object) -> SSL.Connection:
        connection = SSL.Connection(self._options.getContext(), None)
        connection.set_app_data(tlsProtocol)
        if self._is_dns:
            connection.set_tlsext_host_name(self._name.encode("idna"))
        connection.set_verify(
            SSL.VERIFY_PEER | SSL.VERIFY_FAIL_IF_NO_PEER_CERT, self._verifier(tlsProtocol)
        )
        return connection

    def _verifier(self, tlsProtocol: object) -> Callable[..., bool]:
        protocol_ref: list[object] = [tlsProtocol]

        def fail(error: Refusal) -> bool:
            if protocol_ref:
                protocol_ref.pop().failVerification(Failure(error))  # type: ignore[attr-defined]
            return False

        def verify(conn: SSL.Connection, cert: X509, err: int, depth: int, ok: int) -> bool:
            # An exception escaping an OpenSSL callback is lost; everything is caught here.
            try:
                if not ok:
                    return fail(_certificate_error(err, depth, cert, self._ca_source))
                if depth != 0:
                    return True
                try:
                    verify_service_identity(extract_patterns(cert), [self._service_id], [])
                except VerificationError:
                    return fail(
                        Refusal(
                            502,
                            f"The hub's certificate is for {_describe_names(cert)}, "
                            f"not for {self._name}.",
                            "name-mismatch",
                            hint="Set --tls-name (or JUPYTER_SERVER_NAME) to one of the names in the "
                            f"certificate: {_describe_names(cert)}.",
                        )
                    )
                self.last_peer = PeerCertificate.of(cert)
                tlsProtocol.jds_verified = True  # type: ignore[attr-defined]
                return True
            except Exception as exc:  # pragma: no cover - defensive, see above
                return fail(Refusal(502, str(exc), "tls-internal", hint="Report this as a bug."))

        return verify


def load_trust_root(ca_path: str | None) -> tuple[object, str]:
    """
    The trust root and a human name for it. A bundle of several PEM certificates is accepted, as
    clusters often hand out the intermediate and root together.
    """
    if not ca_path:
        return platformTrust(), "a CA in the system trust store"
    try:
        with open(ca_path, "rb") as handle:
            data = handle.read()
    except OSError as exc:
        raise TLSConfigError(
            f"Cannot read the CA certificate file {ca_path} given with --ca-cert: {exc.strerror}."
        ) from None
    blocks = _PEM_BLOCK.findall(data)
    if not blocks:
        raise TLSConfigError(
            f"{ca_path} (from --ca-cert) holds no PEM certificate: expected a "
            "'-----BEGIN CERTIFICATE-----' block."
        )
    try:
        certificates = [Certificate.loadPEM(block) for block in blocks]
    except Exception as exc:
        raise TLSConfigError(f"{ca_path} (from --ca-cert) holds an invalid certificate: {exc}.") from None
    return trustRootFromCertificates(certificates), f"the CA in {ca_path}"


# Bytes read from a hub socket at once (Twisted reads 64 KiB). A large response then costs a quarter
# of the socket reads, reactor turns and trips up through TLS, the HTTP client and the IDE's
# response: a 128 MiB download took 12-30 % less of the proxy's CPU in three A/B runs, uploads
# 10-20 % less (``benchmarks/HISTORY.md``). It is also the hub socket's write buffer before the
# IDE's body is paused, so at most this much of an upload waits in the proxy.
HUB_READ_SIZE = 2**18


@implementer(IStreamClientEndpoint)
class _HubSocketEndpoint:
    """
    The TCP side of every hub connection. Small kernel messages must not wait for a delayed ACK
    (Nagle), so TCP_NODELAY is set; reads take up to :data:`HUB_READ_SIZE`; and a peer that takes
    the connection but never completes a TLS handshake (a plain-HTTP port, a wedged load balancer)
    is dropped after ``timeout`` seconds with that reason, instead of holding the request until
    some far larger timeout.
    """

    def __init__(self, inner: IStreamClientEndpoint, reactor: IReactorTime, timeout: float) -> None:
        self._inner = inner
        self._reactor = reactor
        self._timeout = timeout

    def connect(self, protocolFactory):  # noqa: N803 - interface name
        def connected(tls_protocol):
            transport = getattr(tls_protocol, "transport", None)
            if transport is not None:
                transport.bufferSize = HUB_READ_SIZE
                try:
                    transport.setTcpNoDelay(True)
                except (AttributeError, OSError):  # the ssh forward's Unix socket: Twisted < 24 has the method there too
                    pass
            deadline = self._reactor.callLater(self._timeout, self._check_handshake, tls_protocol)
            lost = tls_protocol.connectionLost

            def connection_lost(reason):
                if deadline.active():
                    deadline.cancel()
                return lost(reason)

            tls_protocol.connectionLost = connection_lost
            return tls_protocol

        return self._inner.connect(protocolFactory).addCallback(connected)

    def _check_handshake(self, tls_protocol) -> None:
        transport = getattr(tls_protocol, "transport", None)
        # A via's transport may be another TLS connection (an https:// proxy), which has no ``disconnected``.
        if getattr(tls_protocol, "jds_verified", False) or transport is None or getattr(transport, "disconnected", False):
            return
        tls_protocol.failVerification(
            Failure(
                Refusal(
                    502,
                    f"The hub did not complete a TLS handshake within {self._timeout:g} s.",
                    "tls-handshake-timeout",
                    hint="Check that the port in --hub is the hub's https port.",
                )
            )
        )


# pyOpenSSL raises WantReadError at the end of every TLS read (the recv that finds no more records)
# and after it (the send BIO found empty): ~10 µs each, a few per cent of a kernel round trip's CPU.
# These make the same OpenSSL calls and raise what pyOpenSSL would, except that WantReadError; they
# use pyOpenSSL's internals (Connection._ssl, ._from_ssl, ._raise_ssl_error) and fall back to its
# public calls where those are missing. One buffer each: the reactor reads one socket at a time.
_RECV_SIZE = 2**16
_SEND_SIZE = 2**15  # Twisted's
_recv_buffer: Any = None
_send_buffer: Any = None


def _callback_problem(context: Any) -> bool:
    """An exception a callback (certificate verification, ALPN, OCSP) left, which pyOpenSSL raises first."""
    for helper in (context._verify_helper, context._alpn_select_helper, context._ocsp_helper):
        if helper is not None and helper._problems:
            return True
    return False


def quiet_recv(conn: SSL.Connection) -> bytes | None:
    """``conn.recv(2**16)``, or ``None`` where that raises :class:`SSL.WantReadError`."""
    global _recv_buffer
    try:
        ssl, context, raise_error = conn._ssl, conn._context, conn._raise_ssl_error
    except AttributeError:
        try:
            return conn.recv(_RECV_SIZE)
        except SSL.WantReadError:
            return None
    if _recv_buffer is None:
        _recv_buffer = _ffi.new("char[]", _RECV_SIZE)
    result = _lib.SSL_read(ssl, _recv_buffer, _RECV_SIZE)
    if (result > 0 or _lib.SSL_get_error(ssl, result) == _lib.SSL_ERROR_WANT_READ) and not _callback_problem(context):
        return _ffi.buffer(_recv_buffer, result)[:] if result > 0 else None
    raise_error(ssl, result)  # what recv raises for this state
    return _ffi.buffer(_recv_buffer, result)[:]


def quiet_bio_read(conn: SSL.Connection) -> bytes:
    """``conn.bio_read(2**15)``, or ``b""`` where that raises :class:`SSL.WantReadError` (nothing to send)."""
    global _send_buffer
    bio = getattr(conn, "_from_ssl", None)
    if bio is not None:
        if _send_buffer is None:
            _send_buffer = _ffi.new("char[]", _SEND_SIZE)
        result = _lib.BIO_read(bio, _send_buffer, _SEND_SIZE)
        if result > 0:
            return _ffi.buffer(_send_buffer, result)[:]
        if _lib.BIO_should_retry(bio) and _lib.BIO_should_read(bio):
            return b""
    try:  # pyOpenSSL's own error for this state
        return conn.bio_read(_SEND_SIZE)
    except SSL.WantReadError:
        return b""


class _HubTLSProtocol(TLSMemoryBIOProtocol):
    """
    Twisted's plain TLS protocol that can tell its endpoint when the handshake is over: until then
    no byte the application wrote has left, so a connection lost before it has carried nothing.
    """

    _handshake_waiter: Deferred | None = None

    def handshake_done(self) -> Deferred:
        """Fires with the wrapped protocol once the handshake is done, or fails with why it was not."""
        if self._handshakeDone:
            return succeed(self.wrappedProtocol)
        if not self.connected:
            return fail(net_error.ConnectionLost("The connection was lost during the TLS handshake."))
        self._handshake_waiter = Deferred(lambda _: self.abortConnection())
        return self._handshake_waiter

    def dataReceived(self, data: bytes) -> None:
        super().dataReceived(data)
        waiter = self._handshake_waiter
        if waiter is not None and self._handshakeDone:
            self._handshake_waiter = None
            waiter.callback(self.wrappedProtocol)

    def _flushReceiveBIO(self) -> None:  # noqa: N802 - Twisted's name
        """
        Every record decrypted from one socket read goes up in one ``dataReceived``; Twisted's hands
        up each 16 KiB record on its own, and each is then a trip through the HTTP client and the IDE's
        response: on a 256 MiB download that cost 16 % of the proxy's CPU (``benchmarks/HISTORY.md``).
        """
        chunks: list[bytes] = []
        while not self._lostTLSConnection:
            try:
                chunk = quiet_recv(self._tlsConnection)
            except SSL.WantReadError:
                break
            except SSL.ZeroReturnError:
                self._deliver(chunks)
                chunks = []
                self._shutdownTLS()
                self._tlsShutdownFinished(None)
                continue
            except SSL.Error:
                self._deliver(chunks)
                chunks = []
                self._tlsShutdownFinished(Failure())
                continue
            if chunk is None:
                break
            chunks.append(chunk)
        self._deliver(chunks)
        self._flushSendBIO()

    def _flushSendBIO(self) -> None:  # noqa: N802 - Twisted's name
        """Twisted's, without the WantReadError an empty send BIO raises (see :func:`quiet_bio_read`)."""
        data = quiet_bio_read(self._tlsConnection)
        if data:
            self.transport.write(data)

    def _deliver(self, chunks: list[bytes]) -> None:
        if chunks and not self._aborted:
            ProtocolWrapper.dataReceived(self, chunks[0] if len(chunks) == 1 else b"".join(chunks))

    def connectionLost(self, reason: Failure) -> None:  # type: ignore[override]
        waiter, self._handshake_waiter = self._handshake_waiter, None
        why = self._reason or reason
        super().connectionLost(reason)
        if waiter is not None and not waiter.called:
            waiter.errback(why)


class _UnbufferedTLSFactory(TLSMemoryBIOFactory):
    protocol = _HubTLSProtocol


@implementer(IStreamClientEndpoint)
class _UnbufferedTLSEndpoint:
    """
    ``wrapClientTLS`` with Twisted's plain TLS protocol instead of its default, which holds every
    write back to the next reactor turn to merge small ones. The proxy's writes to the hub are
    already whole (a request head, a WebSocket frame, 64 KiB of a body), so holding them merges
    nothing and only adds a timer and a turn to each one: without it a small REST request costs
    ~8 % less CPU and ~140 µs less latency, and uploads get faster (``benchmarks/HISTORY.md``).

    With ``after_handshake`` the connection is handed over only once its TLS handshake is done, and a
    connection lost before then fails the connect: whoever writes on it knows that nothing was sent.
    """

    def __init__(
        self, creator: IOpenSSLClientConnectionCreator, inner: IStreamClientEndpoint, after_handshake: bool = False
    ) -> None:
        self._creator = creator
        self._inner = inner
        self._after_handshake = after_handshake

    def connect(self, protocolFactory):  # noqa: N803 - interface name
        tls_factory = _UnbufferedTLSFactory(self._creator, True, protocolFactory)
        connecting = self._inner.connect(tls_factory)
        if self._after_handshake:
            return connecting.addCallback(lambda tls: tls.handshake_done())
        return connecting.addCallback(lambda tls: tls.wrappedProtocol)


class HubTLSPolicy:
    """How to reach the hub: address, verified name, trust root. Nothing else makes hub sockets."""

    def __init__(
        self,
        reactor: IReactorTCP,
        host: str,
        port: int,
        tls_name: str,
        ca_path: str | None,
        connect_timeout: float = 10.0,
        spares: int = 0,
        spare_seconds: float = 4.0,
        via: Via | None = None,
    ) -> None:
        """
        ``spares``: connections opened ahead of need when the IDE becomes active (:mod:`jds.spares`);
        ``via``: what carries the bytes (:mod:`jds.reach`; direct when not given).
        """
        trust_root, self.ca_source = load_trust_root(ca_path)
        self.via: Via = via if via is not None else DirectVia(reactor, connect_timeout=connect_timeout)
        self.reactor = reactor
        self.host = host
        self.port = port
        self.connect_timeout = connect_timeout
        options = CertificateOptions(trustRoot=trust_root, raiseMinimumTo=TLSVersion.TLSv1_2)
        self.creator = _PinnedClientCreator(options, tls_name, self.ca_source)
        self.spares = SpareConnections(reactor, spares, spare_seconds) if spares else None

    def endpoint(self, after_handshake: bool = False) -> IStreamClientEndpoint:
        """
        Where hub connections come from. ``after_handshake``: connect only once TLS is established,
        so that a failure to connect means the hub saw none of what would have been written.
        """
        hub_socket = _HubSocketEndpoint(self.inner_endpoint(), self.reactor, self.connect_timeout)
        tls = _UnbufferedTLSEndpoint(self.creator, hub_socket, after_handshake)
        return self.spares.endpoint(tls) if self.spares is not None else tls

    def inner_endpoint(self) -> IStreamClientEndpoint:
        """The stream to the hub under TLS, from the via: what ``check``'s connect step tries alone."""
        return self.via.endpoint(self.host, self.port)

    def explain(self, failure: Failure) -> Refusal:
        """The via's own sentence when the failure is the via's, else the hub connection's."""
        for leaf in leaf_failures(failure):
            refusal = self.via.explain(leaf)
            if refusal is not None:
                return refusal
        return explain_failure(failure, self.host, self.port, self.connect_timeout)


def explain_failure(failure: Failure, host: str, port: int, timeout: float) -> Refusal:
    """
    The 502 for a failed hub connection: the message goes to the IDE, the hint (the option or
    action that fixes it) to the log line.
    """
    where = f"{host}:{port}"
    leaves = leaf_failures(failure)
    for leaf in leaves:
        if leaf.check(Refusal):
            return leaf.value
    for leaf in leaves:
        if leaf.check(net_error.DNSLookupError):
            return Refusal(
                502,
                f"Cannot resolve the hub's address {host}.",
                "hub-unresolvable",
                hint="Check --hub (or JUPYTER_SERVER_IP_OR_NAME).",
            )
        if leaf.check(net_error.ConnectionRefusedError):
            return Refusal(
                502,
                f"The hub at {where} refused the connection.",
                "hub-unreachable",
                hint="Is the hub running, and is the port in --hub right?",
            )
        if leaf.check(net_error.TimeoutError, CancelledError, net_error.ConnectingCancelledError):
            return Refusal(
                502,
                f"The hub at {where} did not answer within {timeout:g} s.",
                "hub-timeout",
                hint="Check the network path to the hub (VPN, firewall) and --hub.",
            )
        if leaf.check(SSL.Error):
            text = str(leaf.value)
            if "wrong version number" in text or "record layer" in text:
                return Refusal(
                    502,
                    f"The hub at {where} does not speak TLS on that port.",
                    "not-tls",
                    hint="Check the port in --hub: it must be the hub's https port.",
                )
            if "protocol" in text or "version" in text:
                return Refusal(
                    502,
                    f"The hub at {where} offers no TLS version this proxy accepts (1.2 or later).",
                    "tls-version",
                    hint="Ask the cluster administrators to enable TLS 1.2 or 1.3 on the hub.",
                )
            return Refusal(
                502,
                f"TLS with the hub at {where} failed: {text}.",
                "tls-failed",
                hint="Run 'jupyter-dev-server check' to see which step fails.",
            )
        if leaf.check(net_error.ConnectError):
            return Refusal(
                502,
                f"Cannot connect to the hub at {where}: {leaf.getErrorMessage()}.",
                "hub-unreachable",
                hint="Check --hub and the network path to the hub.",
            )
    first = leaves[0]
    if first.check(net_error.ConnectionLost, net_error.ConnectionDone):
        return Refusal(
            502,
            f"The hub at {where} closed the connection without answering.",
            "hub-connection-lost",
            hint="Check that the port in --hub is the hub's https port, and the hub's health "
            "('jupyter-dev-server check').",
        )
    return Refusal(
        502,
        f"The connection to the hub at {where} failed: {first.getErrorMessage()}.",
        "hub-connection-lost",
        hint="Check the hub's health; the request was not completed.",
    )
