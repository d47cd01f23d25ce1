"""
The hub connection pool against a real TLS server that, like a hub's proxy (Node's HTTP server), closes
keep-alive connections left idle: an IDE that comes back after a pause must not be answered with the
error of a request sent down a connection the hub has closed (configurable-http-proxy, used as a local
prefix proxy, answers 503 there), and the pool must let go of idle connections itself, without sending
anything, before such a hub would.
"""

from __future__ import annotations

import io
import shutil
import tempfile
from pathlib import Path

import trustme
from twisted.internet import reactor
from twisted.internet.defer import CancelledError, Deferred, inlineCallbacks
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.ssl import PrivateCertificate
from twisted.internet.task import deferLater
from twisted.python.failure import Failure
from twisted.trial.unittest import TestCase
from twisted.web.client import FileBodyProducer, readBody
from twisted.web.resource import Resource
from twisted.web.server import Site

from jds.proxy import IDLE_UPSTREAM_SECONDS, make_agent
from jds.tls import HubTLSPolicy

NAME = "hub.jds.test"
# Node's http.Server keepAliveTimeout, which configurable-http-proxy keeps.
NODE_KEEP_ALIVE_SECONDS = 5.0


class _Echo(Resource):
    isLeaf = True
    requests = 0

    def render_GET(self, request):
        self.requests += 1
        return b"got " + request.path

    def render_POST(self, request):
        self.requests += 1
        return b"posted " + request.content.read()


class _CountingSite(Site):
    """Records every connection the far end accepts and fires a Deferred when each one ends."""

    def __init__(self, idle_timeout: float | None) -> None:
        self.echo = _Echo()
        super().__init__(self.echo, timeout=idle_timeout)
        self.opened = 0
        self.closed: list[Deferred] = []

    def buildProtocol(self, addr):  # noqa: N802 - Twisted interface name
        channel = super().buildProtocol(addr)
        self.opened += 1
        ended: Deferred = Deferred()
        self.closed.append(ended)
        lost = channel.connectionLost

        def connection_lost(reason):
            lost(reason)
            ended.callback(None)

        channel.connectionLost = connection_lost
        return channel

    @property
    def requests(self) -> int:
        return self.echo.requests


class _FarEndTestCase(TestCase):
    def setUp(self) -> None:
        ca = trustme.CA()
        directory = tempfile.mkdtemp(prefix="jds-pool-")
        self.addCleanup(shutil.rmtree, directory)
        self.ca_path = Path(directory, "ca.pem")
        ca.cert_pem.write_to_path(str(self.ca_path))
        leaf = ca.issue_cert(NAME)
        self.leaf = PrivateCertificate.loadPEM(leaf.private_key_pem.bytes() + leaf.cert_chain_pems[0].bytes())
        self.options = self.leaf.options()

    def far_end(self, idle_timeout: float | None) -> tuple[_CountingSite, int]:
        site = _CountingSite(idle_timeout)
        port = reactor.listenSSL(0, site, self.options, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        return site, port.getHost().port



class HubPoolTests(_FarEndTestCase):
    def agent(self, port: int):
        policy = HubTLSPolicy(reactor, "127.0.0.1", port, NAME, str(self.ca_path), connect_timeout=5)
        agent = make_agent(reactor, policy)
        self.addCleanup(agent.close_idle)
        return agent

    @inlineCallbacks
    def test_request_after_the_hub_closed_the_idle_connection_succeeds(self):
        """
        The far end closes idle connections after 1 s (a hub's proxy: 5 s). Once it has, a request
        that may not be retried (a POST) goes out on a new connection and is answered.
        """
        site, port = self.far_end(idle_timeout=1.0)
        agent = self.agent(port)
        url = f"https://{NAME}:{port}/api/x".encode()
        body = yield readBody((yield agent.request(b"GET", url)))
        self.assertEqual(body, b"got /api/x")
        self.assertEqual(site.opened, 1)
        yield site.closed[0]  # the far end's idle timeout, not ours (1 s < IDLE_UPSTREAM_SECONDS)
        response = yield agent.request(b"POST", url, bodyProducer=FileBodyProducer(io.BytesIO(b"after idle")))
        self.assertEqual(response.code, 200)
        self.assertEqual((yield readBody(response)), b"posted after idle")
        self.assertEqual((site.opened, site.requests), (2, 2))
        yield agent.close_idle()
        yield site.closed[1]

    @inlineCallbacks
    def test_pool_closes_idle_connections_before_a_node_hub_would_and_sends_nothing(self):
        """
        With a far end that never times out, jds closes its idle connection itself, before Node's
        5 s (so no request can race the hub's close), and sends nothing meanwhile: an idle IDE must
        look idle to the hub's culler.
        """
        self.assertLess(IDLE_UPSTREAM_SECONDS, NODE_KEEP_ALIVE_SECONDS)
        site, port = self.far_end(idle_timeout=None)
        agent = self.agent(port)
        answered_at = None
        response = yield agent.request(b"GET", f"https://{NAME}:{port}/api/y".encode())
        yield readBody(response)
        answered_at = reactor.seconds()
        yield site.closed[0]
        waited = reactor.seconds() - answered_at
        self.assertGreaterEqual(waited, IDLE_UPSTREAM_SECONDS - 0.5)
        self.assertLess(waited, NODE_KEEP_ALIVE_SECONDS)
        self.assertEqual((site.opened, site.requests), (1, 1))


class SpareConnectionTests(_FarEndTestCase):
    """jds/spares.py against the same far end: connections opened ahead of need, and only then."""

    def agent(self, port: int, spare_seconds: float = 4.0):
        self.policy = HubTLSPolicy(
            reactor, "127.0.0.1", port, NAME, str(self.ca_path), connect_timeout=5, spares=2,
            spare_seconds=spare_seconds,
        )
        self.addCleanup(self.policy.spares.close)
        agent = make_agent(reactor, self.policy)
        self.addCleanup(agent.close_idle)
        return agent

    @inlineCallbacks
    def test_first_request_after_idle_opens_spares_that_later_connections_take(self):
        site, port = self.far_end(idle_timeout=None)
        agent = self.agent(port)
        url = f"https://{NAME}:{port}/api/a".encode()
        self.assertEqual(self.policy.spares.ready, 0)  # nothing is opened before the IDE asks
        self.assertEqual(site.opened, 0)
        first = agent.request(b"GET", url)
        self.assertEqual(self.policy.spares.ready, 2)
        # a second request while the first is under way needs a connection: it takes a spare
        second = agent.request(b"POST", url, bodyProducer=FileBodyProducer(io.BytesIO(b"two")))
        self.assertEqual(self.policy.spares.ready, 1)
        self.assertEqual((yield readBody((yield first))), b"got /api/a")
        self.assertEqual((yield readBody((yield second))), b"posted two")
        # the kernel WebSocket (any protocol) gets the last one, already connected and verified
        self.assertEqual(self.policy.spares.ready, 1)
        raw = yield self.policy.endpoint().connect(_RawHTTPFactory())
        self.assertEqual(self.policy.spares.ready, 0)
        raw.transport.write(b"GET /api/raw HTTP/1.1\r\nHost: hub\r\nConnection: close\r\n\r\n")
        answer = yield raw.done
        self.assertTrue(answer.startswith(b"HTTP/1.1 200"), answer[:80])
        self.assertTrue(answer.endswith(b"got /api/raw"), answer[-80:])
        self.assertEqual((site.opened, site.requests), (3, 3))

    @inlineCallbacks
    def test_unused_spares_close_without_sending_anything(self):
        site, port = self.far_end(idle_timeout=None)
        agent = self.agent(port, spare_seconds=0.5)
        response = yield agent.request(b"GET", f"https://{NAME}:{port}/api/b".encode())
        yield readBody(response)
        while site.opened < 3:  # on a busy machine the spares may reach the far end after the answer
            yield _later(0.01)  # poll (trial's timeout is the deadline)
        yield site.closed[1]  # both spares end at their own timeout, not the pool's (4 s)
        yield site.closed[2]
        self.assertEqual(self.policy.spares.ready, 0)
        self.assertEqual((site.opened, site.requests), (3, 1))

    @inlineCallbacks
    def test_a_taker_that_gives_up_before_its_spare_connected_leaves_it_a_spare(self):
        """The relay cancels its hub connection when the IDE goes away during the handshake."""
        site, port = self.far_end(idle_timeout=None)
        agent = self.agent(port, spare_seconds=0.5)
        first = agent.request(b"GET", f"https://{NAME}:{port}/api/d".encode())
        taking = self.policy.endpoint().connect(_RawHTTPFactory())  # a spare still on its way
        self.assertEqual(self.policy.spares.ready, 1)
        taking.cancel()
        yield self.assertFailure(taking, CancelledError)
        self.assertEqual(self.policy.spares.ready, 2)
        yield readBody((yield first))
        yield site.closed[1]  # both spares close unused at their timeout, nothing sent on them
        yield site.closed[2]
        self.assertEqual(self.policy.spares.ready, 0)
        self.assertEqual((site.opened, site.requests), (3, 1))

    @inlineCallbacks
    def test_a_hub_that_refuses_connections_keeps_no_spares_and_the_error_is_the_hub_s(self):
        listening = reactor.listenTCP(0, Factory(), interface="127.0.0.1")
        port = listening.getHost().port
        yield listening.stopListening()
        agent = self.agent(port)
        try:
            yield agent.request(b"GET", f"https://{NAME}:{port}/api/c".encode())
        except Exception:
            reason = self.policy.explain(Failure()).reason
        else:
            self.fail("a request to a closed port was answered")
        self.assertEqual(reason, "hub-unreachable")
        while self.policy.spares.ready:  # the spares' refusals arrive on the next reactor turns
            yield _later(0.01)  # poll
        self.assertEqual(self.policy.spares.ready, 0)


class _RawHTTP(Protocol):
    def __init__(self) -> None:
        self.received = b""
        self.done: Deferred = Deferred()

    def dataReceived(self, data: bytes) -> None:  # noqa: N802 - Twisted interface name
        self.received += data

    def connectionLost(self, reason=None) -> None:  # noqa: N802 - Twisted interface name
        self.done.callback(self.received)


class _RawHTTPFactory(Factory):
    protocol = _RawHTTP


def _later(seconds: float) -> Deferred:
    return deferLater(reactor, seconds, lambda: None)
