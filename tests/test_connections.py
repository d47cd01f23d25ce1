"""
How many connections the local port holds and which one goes when it is full (``jds.connections``),
in memory: connections that have not shown the local token make room for the token holder's, and the
total is bounded whatever the client addresses.
"""

from __future__ import annotations

import json

from twisted.internet.address import IPv4Address
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import capturedLogs, formatEvent
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET

from jds.auth import Credentials
from jds.connections import ConnectionLimit, connection_cap
from jds.guard import LocalGuard
from jds.paths import HubTarget
from jds.site import LocalSite

TARGET = HubTarget(host="hub.example", port=443, user="alice", server="", base_path="/", tls_name="hub.example")
TOKEN = "local-token-xyz"
WITH_TOKEN = b"GET /api/status HTTP/1.1\r\nHost: 127.0.0.1:8000\r\nAuthorization: token " + TOKEN.encode() + b"\r\n\r\n"
WITHOUT_TOKEN = b"GET /api/status HTTP/1.1\r\nHost: 127.0.0.1:8000\r\n\r\n"


class Answers(Resource):
    """Answers at once, except ``/slow``, which is answered when the test says (``pending``)."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.pending: list = []

    def render(self, request):
        if request.path == b"/slow":
            self.pending.append(request)
            return NOT_DONE_YET
        return b"{}"


class Limited(SynchronousTestCase):
    managed = True

    def setUp(self) -> None:
        self.clock = MemoryReactorClock()
        guard = LocalGuard.build([], [])
        guard.listening("127.0.0.1", 8000)
        self.resource = Answers()
        self.site = LocalSite(
            self.resource, guard=guard, reactor=self.clock, target=TARGET,
            credentials=Credentials("hub-token", TOKEN) if self.managed else Credentials(),
        )

    def limit(self, per_client: int, total: int = 0) -> None:
        self.limited = ConnectionLimit(self.site, per_client, total)

    def open(self, host: str = "127.0.0.1", send: bytes = b"GET / HTTP/1.1\r\n") -> StringTransport:
        """A connection from ``host`` that sends ``send`` (by default half a request, then nothing)."""
        peer = IPv4Address("TCP", host, 40000)
        protocol = self.limited.buildProtocol(peer)
        transport = StringTransport(peerAddress=peer)
        transport.disconnected = False
        protocol.makeConnection(transport)
        if send:
            protocol.dataReceived(send)
        transport.protocol = protocol
        return transport

    @staticmethod
    def status(transport: StringTransport) -> bytes:
        return transport.value().partition(b"\r\n")[0]

    @staticmethod
    def held(transports: list[StringTransport]) -> list[StringTransport]:
        return [t for t in transports if not t.disconnecting]


class ManagedModeTests(Limited):
    def test_silent_connections_make_room_for_the_token_holder(self) -> None:
        self.limit(per_client=3)
        silent = [self.open() for _ in range(3)]
        ide = self.open(send=WITH_TOKEN)
        self.assertEqual(self.status(ide), b"HTTP/1.1 200 OK")
        self.assertEqual([t.disconnected for t in silent], [True, False, False], "the oldest silent one went")
        self.assertEqual(self.limited.open, {"127.0.0.1": 3})
        # once it showed the token, no number of silent connections drops it, even between requests
        more = [self.open() for _ in range(10)]
        self.assertFalse(ide.disconnecting)
        self.assertEqual(len(self.held(silent + more)), 2)
        ide.protocol.dataReceived(WITH_TOKEN)
        self.assertEqual(ide.value().count(b"HTTP/1.1 200 OK"), 2)

    def test_a_request_without_the_token_protects_nothing(self) -> None:
        self.limit(per_client=2)
        refused = self.open(send=WITHOUT_TOKEN)
        self.assertEqual(self.status(refused), b"HTTP/1.1 200 OK")
        self.open()
        self.open()
        self.assertTrue(refused.disconnected, "answered, kept alive, and the first to go")

    def test_the_total_is_bounded_whatever_the_addresses(self) -> None:
        self.limit(per_client=256, total=4)
        opened = [self.open(f"127.0.0.{n}") for n in range(2, 12)]
        self.assertEqual(len(self.held(opened)), 4)
        self.assertEqual(sum(self.limited.open.values()), 4)
        ide = self.open(send=WITH_TOKEN)
        self.assertEqual(self.status(ide), b"HTTP/1.1 200 OK")
        self.assertEqual(len(self.held(opened)), 3)

    def test_only_token_holders_fill_the_port_and_then_it_says_so(self) -> None:
        self.limit(per_client=2, total=3)
        own = [self.open(send=WITH_TOKEN) for _ in range(2)]
        extra = self.open(send=WITH_TOKEN)
        self.assertEqual(self.status(extra), b"HTTP/1.1 503 Service Unavailable")
        body = json.loads(extra.value().partition(b"\r\n\r\n")[2])
        self.assertEqual(body["reason"], "too-many-connections")
        self.assertIn("--max-connections-per-client", body["message"])
        self.assertEqual(self.held(own), own)
        other = self.open("127.0.0.2", send=WITH_TOKEN)
        self.assertEqual(self.status(other), b"HTTP/1.1 200 OK")
        full = self.open("127.0.0.3", send=WITH_TOKEN)
        self.assertIn("--max-connections", json.loads(full.value().partition(b"\r\n\r\n")[2])["message"])
        # a closed connection frees its place
        own[0].protocol.connectionLost(None)
        self.assertEqual(self.status(self.open(send=WITH_TOKEN)), b"HTTP/1.1 200 OK")


    def test_a_replaced_token_protects_nothing(self) -> None:
        """After rotate-token, a connection that showed the old token is protected no more."""
        self.limit(per_client=2)
        old = self.open(send=WITH_TOKEN)
        self.site.credentials.local_token = "rotated-token"
        old.protocol.dataReceived(WITH_TOKEN)  # the old token now: refused by the proxy, and unprotected
        self.open()
        self.open()
        self.assertTrue(old.disconnected)

    def test_a_flood_is_collapsed_like_a_burst_of_refusals(self) -> None:
        """Three lines, then one per 10 s with the count (jds.logs.RepeatCounter), as refusals are."""
        self.limit(2)
        with capturedLogs() as events:
            for _ in range(100):  # 98 dropped to make room
                self.open()
            self.clock.advance(10)
            for _ in range(5):
                self.open()
            self.clock.advance(10)
            self.clock.advance(20)  # quiet for a whole window: nothing more to say
        lines = [formatEvent(e) for e in events if "to make room" in formatEvent(e)]
        self.assertEqual(len(lines), 5, lines)
        self.assertTrue(all(line.startswith("Dropped a connection that") for line in lines[:3]), lines)
        self.assertTrue(lines[3].startswith("Dropped 95 more connection(s) in 10 s that had not shown"), lines)
        self.assertTrue(lines[4].startswith("Dropped 5 more connection(s) in 10 s"), lines)
        self.assertIn("--max-connections-per-client 2", lines[3])

    def test_refused_connections_are_collapsed_too(self) -> None:
        self.limit(1)
        self.assertEqual(self.status(self.open(send=WITH_TOKEN)), b"HTTP/1.1 200 OK")
        with capturedLogs() as events:
            for _ in range(20):
                self.assertIn(b"503", self.status(self.open()))
            self.clock.advance(10)
        lines = [formatEvent(e) for e in events if formatEvent(e).startswith("Refused ")]
        self.assertEqual(len(lines), 4, lines)
        self.assertTrue(all(line.startswith("Refused a connection: ") for line in lines[:3]), lines)
        self.assertTrue(lines[3].startswith("Refused 17 more connection(s) in 10 s: "), lines)


class PassThroughModeTests(Limited):
    """No local token: a connection is protected while a request whose headers arrived is served."""

    managed = False

    def test_a_request_being_served_is_never_dropped_an_idle_connection_is(self) -> None:
        self.limit(per_client=2)
        busy = self.open(send=b"GET /slow HTTP/1.1\r\nHost: 127.0.0.1:8000\r\n\r\n")
        done = self.open(send=WITHOUT_TOKEN)
        self.assertEqual(self.status(done), b"HTTP/1.1 200 OK")
        silent = [self.open() for _ in range(5)]
        self.assertFalse(busy.disconnecting)
        self.assertTrue(done.disconnected, "between requests a connection holds nothing")
        self.assertEqual(len(self.held(silent)), 1)
        [request] = self.resource.pending
        request.write(b"{}")
        request.finish()
        self.open()  # the silent one goes first: it has waited longer than the connection just answered
        self.assertFalse(busy.disconnected)
        self.open()
        self.assertTrue(busy.disconnected, "answered: it waits for headers again, and holds nothing")


class CapTests(SynchronousTestCase):
    def test_the_total_leaves_file_descriptors_for_the_hub_side(self) -> None:
        self.assertEqual(connection_cap(512, 20000), 512)
        self.assertEqual(connection_cap(512, 1024), 480)  # each may need a hub connection, and some spare
        self.assertEqual(connection_cap(0, 1024), 480)  # 0: as many as the descriptors allow
        self.assertEqual(connection_cap(512, 100), 18)
