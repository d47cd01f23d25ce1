"""
The TLS policy against real TLS servers on loopback, one per way a hub's TLS can be wrong: each gives
a distinct, actionable error, and none is ever retried without verification.
"""

from __future__ import annotations

import datetime
import shutil
import tempfile
from pathlib import Path

import trustme
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from OpenSSL import SSL
from twisted.internet import reactor
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.ssl import CertificateOptions, PrivateCertificate
from twisted.python.failure import Failure
from twisted.trial.unittest import TestCase
from twisted.web.client import readBody
from twisted.web.resource import Resource
from twisted.web.server import Site

from jds.proxy import make_agent
from jds.retry import never_sent
from jds.tls import HUB_READ_SIZE, HubTLSPolicy

NAME = "hub.jds.test"


class Hello(Resource):
    isLeaf = True

    def render_GET(self, request):
        return b"hello"


def _pem_options(cert_pem: bytes, key_pem: bytes) -> CertificateOptions:
    return PrivateCertificate.loadPEM(key_pem + cert_pem).options()


class _OldTLSOnly:
    """A server context that offers nothing newer than TLS 1.1, as very old hubs did."""

    def __init__(self, leaf: trustme.LeafCert) -> None:
        self._leaf = leaf

    def getContext(self) -> SSL.Context:
        context = SSL.Context(SSL.TLS_METHOD)
        context.set_max_proto_version(SSL.TLS1_1_VERSION)
        context.set_cipher_list(b"DEFAULT:@SECLEVEL=0")
        # from PEM files: pyOpenSSL takes cryptography's key objects only from 24.x on; 23.2 is our oldest
        directory = Path(tempfile.mkdtemp(prefix="jds-oldtls-"))
        try:
            self._leaf.private_key_pem.write_to_path(str(directory / "key.pem"))
            self._leaf.cert_chain_pems[0].write_to_path(str(directory / "cert.pem"))
            context.use_privatekey_file(str(directory / "key.pem"))
            context.use_certificate_file(str(directory / "cert.pem"))
        finally:
            shutil.rmtree(directory)
        return context


class _AnswersBadRequest(Protocol):
    def dataReceived(self, data: bytes) -> None:  # noqa: N802 - Twisted interface name
        self.transport.write(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")
        self.transport.loseConnection()


def _self_signed(name: str) -> tuple[bytes, bytes]:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=30))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return cert.public_bytes(serialization.Encoding.PEM), key_pem


class HubTLSFailureTests(TestCase):
    def setUp(self) -> None:
        self.ca = trustme.CA()
        directory = tempfile.mkdtemp(prefix="jds-tls-")
        self.addCleanup(shutil.rmtree, directory)
        self.ca_path = Path(directory, "ca.pem")
        self.ca.cert_pem.write_to_path(str(self.ca_path))

    def serve_tls(self, context_factory) -> int:
        # timeout=None: no idle-timeout call left in the reactor for trial to find after the test
        port = reactor.listenSSL(0, Site(Hello(), timeout=None), context_factory, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        return port.getHost().port

    def serve_plain(self, protocol: type[Protocol]) -> int:
        port = reactor.listenTCP(0, Factory.forProtocol(protocol), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        return port.getHost().port

    def leaf_options(self, leaf: trustme.LeafCert) -> CertificateOptions:
        return _pem_options(leaf.cert_chain_pems[0].bytes(), leaf.private_key_pem.bytes())

    @inlineCallbacks
    def fetch(self, port: int, name: str = NAME, ca_path: Path | None = None):
        policy = HubTLSPolicy(reactor, "127.0.0.1", port, name, str(ca_path or self.ca_path), connect_timeout=2)
        agent = make_agent(reactor, policy)
        self.addCleanup(agent.close_idle)
        try:
            response = yield agent.request(b"GET", f"https://{name}:{port}/".encode())
            body = yield readBody(response)
        except Exception:
            return policy.explain(Failure())
        return body

    @inlineCallbacks
    def test_verified_hub_answers(self):
        port = self.serve_tls(self.leaf_options(self.ca.issue_cert(NAME, "127.0.0.1")))
        self.assertEqual((yield self.fetch(port)), b"hello")
        # an IP address can be the verified name too, when the certificate lists it
        self.assertEqual((yield self.fetch(port, name="127.0.0.1")), b"hello")

    @inlineCallbacks
    def test_writes_to_the_hub_wait_for_no_timer(self):
        """
        Twisted's default TLS transport holds every write back to the next reactor turn (a timer)
        to merge small ones; the hub's are whole already, and each held one is latency.
        """
        port = self.serve_tls(self.leaf_options(self.ca.issue_cert(NAME)))
        policy = HubTLSPolicy(reactor, "127.0.0.1", port, NAME, str(self.ca_path), connect_timeout=2)
        answered: Deferred = Deferred()

        class Client(Protocol):
            def dataReceived(self, data: bytes) -> None:  # noqa: N802 - Twisted interface name
                self.received = getattr(self, "received", b"") + data

            def connectionLost(self, reason=None) -> None:  # noqa: N802 - Twisted interface name
                answered.callback(getattr(self, "received", b""))

        client = yield policy.endpoint().connect(Factory.forProtocol(Client))
        timers = len(reactor.getDelayedCalls())
        client.transport.write(b"GET / HTTP/1.0\r\nHost: hub\r\n\r\n")
        self.assertEqual(len(reactor.getDelayedCalls()), timers)
        answer = yield answered
        self.assertTrue(answer.startswith(b"HTTP/1.0 200 "), answer[:80])
        self.assertTrue(answer.endswith(b"hello"))

    @inlineCallbacks
    def test_records_from_one_read_arrive_together_and_whole(self):
        """A large answer reaches the protocol in pieces of several 16 KiB records, every byte, then the close."""
        body = bytes(range(256)) * 4096  # 1 MiB: 64 records

        class Big(Resource):
            isLeaf = True

            def render_GET(self, request):  # noqa: N802 - twisted.web's name
                return body

        port = reactor.listenSSL(
            0, Site(Big(), timeout=None), self.leaf_options(self.ca.issue_cert(NAME)), interface="127.0.0.1"
        )
        self.addCleanup(port.stopListening)
        policy = HubTLSPolicy(reactor, "127.0.0.1", port.getHost().port, NAME, str(self.ca_path), connect_timeout=2)
        pieces: list[bytes] = []
        closed: Deferred = Deferred()

        class Client(Protocol):
            def dataReceived(self, data: bytes) -> None:  # noqa: N802 - Twisted interface name
                pieces.append(data)

            def connectionLost(self, reason=None) -> None:  # noqa: N802 - Twisted interface name
                closed.callback(None)

        client = yield policy.endpoint().connect(Factory.forProtocol(Client))
        # the socket is read HUB_READ_SIZE at a time, not Twisted's 64 KiB
        self.assertEqual(client.transport.transport.bufferSize, HUB_READ_SIZE)
        self.assertGreater(HUB_READ_SIZE, 2**16)
        client.transport.write(b"GET / HTTP/1.0\r\nHost: hub\r\n\r\n")
        yield closed
        self.assertTrue(b"".join(pieces).endswith(b"\r\n\r\n" + body))
        self.assertGreater(max(map(len, pieces)), 16384, "no piece held more than one TLS record")

    @inlineCallbacks
    def test_after_handshake_hands_the_connection_over_with_tls_up(self):
        """The proxy's requests wait for the handshake: then a failed connect means nothing was sent."""
        port = self.serve_tls(self.leaf_options(self.ca.issue_cert(NAME)))
        policy = HubTLSPolicy(reactor, "127.0.0.1", port, NAME, str(self.ca_path), connect_timeout=2)
        client = yield policy.endpoint(after_handshake=True).connect(Factory.forProtocol(Protocol))
        self.addCleanup(client.transport.abortConnection)
        self.assertIsNotNone(client.transport.getPeerCertificate())
        early = yield policy.endpoint().connect(Factory.forProtocol(Protocol))
        self.addCleanup(early.transport.abortConnection)
        self.assertIsNone(early.transport.getPeerCertificate())  # without it: at once, TLS not yet up

    @inlineCallbacks
    def test_after_handshake_a_peer_that_resets_before_tls_fails_the_connect(self):
        class Resets(Protocol):
            def connectionMade(self) -> None:  # noqa: N802 - Twisted interface name
                self.transport.abortConnection()

        port = self.serve_plain(Resets)
        policy = HubTLSPolicy(reactor, "127.0.0.1", port, NAME, str(self.ca_path), connect_timeout=2)
        lost: list[Failure] = []

        class Client(Protocol):
            def connectionLost(self, reason=None) -> None:  # noqa: N802 - Twisted interface name
                lost.append(reason)

        try:
            yield policy.endpoint(after_handshake=True).connect(Factory.forProtocol(Client))
        except Exception:
            failure = Failure()
        else:
            self.fail("the connect succeeded although the peer reset the connection before TLS")
        self.assertTrue(never_sent(failure), failure)
        self.assertEqual(policy.explain(failure).reason, "hub-connection-lost")
        self.assertEqual(len(lost), 1, "the protocol that never got the connection was not told it is gone")

    @inlineCallbacks
    def test_unknown_ca(self):
        port = self.serve_tls(self.leaf_options(trustme.CA().issue_cert(NAME)))
        refused = yield self.fetch(port)
        self.assertEqual(refused.reason, "unknown-ca")
        self.assertIn("--ca-cert", refused.hint)
        self.assertIn(str(self.ca_path), refused.message)

    @inlineCallbacks
    def test_wrong_name(self):
        port = self.serve_tls(self.leaf_options(self.ca.issue_cert("other.jds.test")))
        refused = yield self.fetch(port)
        self.assertEqual(refused.reason, "name-mismatch")
        self.assertIn("other.jds.test", refused.message)
        self.assertIn("--tls-name", refused.hint)

    @inlineCallbacks
    def test_expired(self):
        past = datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(days=3)
        leaf = self.ca.issue_cert(NAME, not_before=past - datetime.timedelta(days=30), not_after=past)
        port = self.serve_tls(self.leaf_options(leaf))
        refused = yield self.fetch(port)
        self.assertEqual(refused.reason, "expired")
        self.assertIn(past.strftime("%Y-%m-%d"), refused.message)
        self.assertIn("renew", refused.hint)

    @inlineCallbacks
    def test_self_signed_leaf(self):
        cert_pem, key_pem = _self_signed(NAME)
        port = self.serve_tls(_pem_options(cert_pem, key_pem))
        refused = yield self.fetch(port)
        self.assertEqual(refused.reason, "self-signed")
        self.assertIn("--ca-cert", refused.hint)

    @inlineCallbacks
    def test_only_old_tls_versions(self):
        port = self.serve_tls(_OldTLSOnly(self.ca.issue_cert(NAME)))
        refused = yield self.fetch(port)
        self.assertEqual(refused.reason, "tls-version")
        self.assertIn("1.2", refused.message)

    @inlineCallbacks
    def test_plain_http_port_that_answers(self):
        # A plain-HTTP server that answers the ClientHello with an error at once. (twisted.web's Site
        # answers only when the random ClientHello bytes happen to hold a newline and otherwise waits
        # for one, so each behaviour gets a peer that always shows it.)
        port = self.serve_plain(_AnswersBadRequest)
        refused = yield self.fetch(port)
        self.assertEqual(refused.reason, "not-tls")
        self.assertIn("https port", refused.hint)
        self.assertIn(f"127.0.0.1:{port}", refused.message)

    @inlineCallbacks
    def test_plain_http_port_that_waits(self):
        # ...and one still waiting for the end of a request line never answers at all.
        port = self.serve_plain(Protocol)
        refused = yield self.fetch(port)
        self.assertEqual(refused.reason, "tls-handshake-timeout")
        self.assertIn("https port", refused.hint)

    @inlineCallbacks
    def test_nothing_listening(self):
        free = reactor.listenTCP(0, Factory.forProtocol(Protocol), interface="127.0.0.1")
        number = free.getHost().port
        yield free.stopListening()
        refused = yield self.fetch(number)
        self.assertEqual(refused.reason, "hub-unreachable")
        self.assertIn(f"127.0.0.1:{number}", refused.message)
