"""
The WebSocket relay driven in memory: an autobahn client playing the IDE talks raw bytes to the
local Site (so the proxy resource, the take-over and the relay all run), and the relay's hub side
talks to an autobahn server playing jupyter_server. Both hops are in-memory wires moved by
:meth:`Network.pump`; time is a clock (autobahn's timers included, through txaio's loop).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile

import txaio
from autobahn.twisted.websocket import (
    WebSocketClientFactory,
    WebSocketClientProtocol,
    WebSocketServerFactory,
    WebSocketServerProtocol,
)
from autobahn.websocket.protocol import WebSocketProtocol
from autobahn.websocket.types import ConnectingRequest, ConnectionDeny
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.error import ConnectionAborted, ConnectionDone, ConnectionLost
from twisted.internet.error import ConnectionRefusedError as Refused
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import formatEvent, globalLogPublisher
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.server import Site

from jds import relay_frames
from jds.auth import Credentials
from jds.paths import HubTarget
from jds.proxy import HubProxyResource
from jds.refusal import Refusal
from jds.relay import WebSocketRelay
from jds.relay_frames import PeerReading
from jds.relay_link import Link

V1 = "v1.kernel.websocket.jupyter.org"
TOKEN = "secret-hub-token-4711"
KERNEL_PATH = f"/api/kernels/k1/channels?session_id=s1&token={TOKEN}"
# A socket the relay does not reconnect (a language server's): a lost hub side ends it with 1011.
OTHER_PATH = f"/lsp/ws/pylsp?token={TOKEN}"
TARGET = HubTarget(host="127.0.0.1", port=8443, user="alice", tls_name="hub.test")


class Wire(StringTransport):
    """One end of an in-memory connection. ``protocol`` is looked up on delivery, as a socket
    does, so a take-over of the transport is honoured."""

    def __init__(self, network: Network, host: IPv4Address, peer: IPv4Address) -> None:
        super().__init__(hostAddress=host, peerAddress=peer)
        self.network = network
        self.other: Wire | None = None
        self.protocol = None
        self.nodelay: bool | None = None
        self.closed = False
        self.history = b""
        self.writes: list[bytes] = []

    def write(self, data: bytes) -> None:
        if not self.closed:
            super().write(data)
            self.history += data
            self.writes.append(data)

    def writeSequence(self, data) -> None:
        self.write(b"".join(data))

    def setTcpNoDelay(self, enabled: bool) -> None:
        self.nodelay = enabled

    # Lenient like a socket: autobahn unregisters on every drop, registered or not.
    def unregisterProducer(self) -> None:
        self.producer = None

    def pauseProducing(self) -> None:
        if self.producerState != "stopped":
            self.producerState = "paused"

    def resumeProducing(self) -> None:
        if self.producerState != "stopped":
            self.producerState = "producing"


class Network:
    def __init__(self) -> None:
        self.wires: list[Wire] = []
        self._port = 40000

    def connect(self, server_protocol, client_protocol, server_port: int) -> tuple[Wire, Wire]:
        """A TCP connection: server side first (it listens), then the client's connectionMade."""
        self._port += 1
        server_addr = IPv4Address("TCP", "127.0.0.1", server_port)
        client_addr = IPv4Address("TCP", "127.0.0.1", self._port)
        server, client = Wire(self, server_addr, client_addr), Wire(self, client_addr, server_addr)
        server.other, client.other = client, server
        server.protocol, client.protocol = server_protocol, client_protocol
        self.wires += [server, client]
        server_protocol.makeConnection(server)
        client_protocol.makeConnection(client)
        return server, client

    def pump(self) -> None:
        """Deliver bytes (not to a side that paused reading) and closes until nothing moves."""
        moved = True
        while moved:
            moved = False
            for wire in list(self.wires):
                other = wire.other
                data = wire.value()
                if data and not other.closed and other.producerState == "producing":
                    wire.clear()
                    other.protocol.dataReceived(data)
                    moved = True
                elif wire.disconnecting and not wire.closed and (not data or wire.disconnected):
                    self._close(wire)
                    moved = True

    def _close(self, wire: Wire) -> None:
        other = wire.other
        wire.closed = other.closed = True
        local, remote = (
            (ConnectionAborted(), ConnectionLost())
            if wire.disconnected
            else (ConnectionDone(), ConnectionDone())
        )
        wire.protocol.connectionLost(Failure(local))
        other.protocol.connectionLost(Failure(remote))


class Ide(WebSocketClientProtocol):
    """The IDE: records what it gets."""

    def __init__(self) -> None:
        super().__init__()
        self.opened = False
        self.messages: list[tuple[bytes, bool]] = []
        self.pings = 0
        self.closed: tuple[bool, int | None, str | None] | None = None

    def onOpen(self) -> None:
        self.opened = True

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        self.messages.append((payload, isBinary))

    def onPing(self, payload: bytes) -> None:
        self.pings += 1
        super().onPing(payload)

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        self.closed = (wasClean, code, reason)


class FakeHub(WebSocketServerProtocol):
    """jupyter_server's kernel socket: picks v1 when offered, echoes if asked to."""

    def __init__(self) -> None:
        super().__init__()
        self.messages: list[tuple[bytes, bool]] = []
        self.pings = 0
        self.closed: tuple[bool, int | None, str | None] | None = None

    def onConnect(self, request):
        self.factory.hubs.append(self)
        self.request = request
        return self.factory.answer(request)

    def onOpen(self) -> None:
        for payload, is_binary in self.factory.greeting:
            self.sendMessage(payload, is_binary)

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        self.messages.append((payload, isBinary))
        if self.factory.echo:
            self.sendMessage(payload, isBinary)

    def onPing(self, payload: bytes) -> None:
        self.pings += 1
        super().onPing(payload)

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        self.closed = (wasClean, code, reason)


def jupyter_answer(request):
    return V1 if V1 in request.protocols else None


class FakePolicy:
    """Stands in for HubTLSPolicy: connects in memory to a FakeHub and counts attempts."""

    connect_timeout = 10.0

    def __init__(self, network: Network, hub_factory: WebSocketServerFactory) -> None:
        self.network = network
        self.hub_factory = hub_factory
        self.attempts = 0
        self.failure: Failure | None = None
        self.hold: Deferred | None = None
        self.cancelled = 0

    def endpoint(self) -> FakePolicy:
        return self

    def connect(self, factory) -> Deferred:
        self.attempts += 1
        if self.failure is not None:
            return fail(self.failure)
        if self.hold is not None:
            self.hold = Deferred(lambda d: setattr(self, "cancelled", self.cancelled + 1))
            return self.hold
        relay_side = factory.buildProtocol(None)
        self.network.connect(self.hub_factory.buildProtocol(None), relay_side, TARGET.port)
        return succeed(relay_side)

    def explain(self, failure: Failure) -> Refusal:
        return Refusal(502, "The hub at 127.0.0.1:8443 refused the connection.", "hub-unreachable", hint="Is it running?")


class RelayTestCase(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = MemoryReactorClock()
        self.patch(txaio.config, "loop", self.clock)
        self.network = Network()
        self.hub_factory = WebSocketServerFactory(reactor=self.clock)
        self.hub_factory.protocol = FakeHub
        self.hub_factory.setProtocolOptions(openHandshakeTimeout=0)
        self.hub_factory.hubs = []
        self.hub_factory.answer = jupyter_answer
        self.hub_factory.greeting = []
        self.hub_factory.echo = False
        self.policy = FakePolicy(self.network, self.hub_factory)
        self.events: list[dict] = []
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)
        self.make_relay()

    def make_relay(self, target: HubTarget = TARGET, **kwargs) -> None:
        self.target = target
        self.relay = WebSocketRelay(target, self.policy, self.clock, **kwargs)
        resource = HubProxyResource(
            target,
            self.policy,
            self.clock,
            agent=object(),
            websockets=self.relay,
            credentials=kwargs.get("credentials"),
        )
        self.site = Site(resource, reactor=self.clock)

    def open_ide(self, path: str = KERNEL_PATH, protocols=(V1,), origin=None, headers=None):
        """Connect an IDE; returns it and the proxy's end of its connection."""
        factory = WebSocketClientFactory(
            f"ws://127.0.0.1:8888{path}",
            protocols=list(protocols),
            origin=origin,
            headers=headers or {},
            useragent="VSCode-Jupyter/1.0",
            reactor=self.clock,
        )
        factory.protocol = Ide
        factory.setProtocolOptions(openHandshakeTimeout=0)
        ide = factory.buildProtocol(None)
        channel = self.site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 50000))
        proxy_end, _ = self.network.connect(channel, ide, 8888)
        self.network.pump()
        return ide, proxy_end

    @property
    def hub(self) -> FakeHub:
        [hub] = self.hub_factory.hubs
        return hub

    def begin_frame(self, sender, length: int, first: bytes) -> None:
        """``sender`` starts a binary message of one ``length``-byte frame with ``first``, delivered."""
        sender.beginMessage(isBinary=True)
        sender.beginMessageFrame(length)
        sender.sendMessageFrameData(first)
        self.network.pump()

    def response(self, proxy_end: Wire) -> tuple[bytes, dict]:
        head, _, body = proxy_end.history.partition(b"\r\n\r\n")
        return head.split(b"\r\n")[0], json.loads(body)

    def assertLogsClean(self) -> None:
        text = " ".join(formatEvent(event) or "" for event in self.events)
        self.assertNotIn(TOKEN, text)


class HandshakeTests(RelayTestCase):
    def test_client_handshake_waits_for_the_hubs(self) -> None:
        answer: Deferred = Deferred()
        self.hub_factory.answer = lambda request: answer
        ide, proxy_end = self.open_ide()
        self.assertEqual(len(self.hub_factory.hubs), 1)
        self.assertFalse(ide.opened)
        self.assertNotIn(b"101", proxy_end.history)
        self.assertEqual(proxy_end.producerState, "paused", "nothing is read from the IDE meanwhile")
        answer.callback(V1)
        self.network.pump()
        self.assertTrue(ide.opened)
        self.assertEqual(proxy_end.producerState, "producing")
        self.assertEqual(ide.websocket_protocol_in_use, V1)
        self.assertLogsClean()

    def test_upstream_request(self) -> None:
        self.open_ide(headers={"Cookie": "a=1", "X-Extra": "yes"})
        request = self.hub.request
        self.assertEqual(request.path, "/user/alice/api/kernels/k1/channels")
        self.assertEqual(request.params, {"session_id": ["s1"]})
        headers = request.headers
        self.assertEqual(headers["authorization"], f"token {TOKEN}")
        self.assertEqual(headers["origin"], "https://hub.test:8443")
        self.assertEqual(headers["host"], "hub.test:8443")
        self.assertEqual(headers["user-agent"], "VSCode-Jupyter/1.0")
        self.assertEqual(headers["cookie"], "a=1")
        self.assertEqual(headers["x-extra"], "yes")
        self.assertEqual(headers["x-forwarded-host"], "127.0.0.1:8888")
        self.assertEqual(request.protocols, [V1])
        raw = self.hub.http_request_data.lower()
        self.assertEqual(raw.count(b"\r\nhost:"), 1)
        self.assertEqual(raw.count(b"\r\nsec-websocket-key:"), 1)
        self.assertEqual(raw.count(b"\r\nsec-websocket-version:"), 1)
        self.assertNotIn(TOKEN.encode(), raw.split(b"\r\n")[0])

    def test_client_authorization_wins_over_query_token(self) -> None:
        self.open_ide(headers={"Authorization": "token from-header"})
        self.assertEqual(self.hub.request.headers["authorization"], "token from-header")

    def test_port_443_host_without_port(self) -> None:
        self.make_relay(HubTarget(host="10.0.0.1", port=443, user="alice", tls_name="hub.test"))
        self.open_ide()
        self.assertEqual(self.hub.request.headers["host"], "hub.test")
        self.assertEqual(self.hub.request.headers["origin"], "https://hub.test")

    def test_managed_mode_sends_the_hub_token(self) -> None:
        self.make_relay(credentials=Credentials(hub_token="HUB-TOKEN", local_token=TOKEN))
        ide, _ = self.open_ide()
        self.assertTrue(ide.opened)
        self.assertEqual(self.hub.request.headers["authorization"], "token HUB-TOKEN")
        self.assertNotIn(TOKEN.encode(), self.hub.http_request_data)

    def test_a_replaced_local_token_ends_the_sockets_it_opened(self) -> None:
        folder = tempfile.mkdtemp(prefix="jds-test-")
        self.addCleanup(shutil.rmtree, folder)
        path = os.path.join(folder, "local-token")
        with open(path, "w") as file:
            file.write(TOKEN + "\n")
        credentials = Credentials(hub_token="HUB-TOKEN", local_token=TOKEN, token_file=path)
        self.make_relay(credentials=credentials)
        ide, _ = self.open_ide()
        hub = self.hub
        self.assertFalse(credentials.refresh())
        with open(path, "w") as file:
            file.write("a-new-token-of-a-different-length\n")
        self.assertTrue(credentials.refresh())
        self.network.pump()
        self.assertEqual(ide.closed[1], 1008)
        self.assertIn("The local token was replaced (jupyter-dev-server rotate-token)", ide.closed[2])
        self.assertEqual(hub.closed[1], 1000)
        self.assertEqual(self.relay.links, set())

    def test_no_subprotocol_when_none_offered(self) -> None:
        ide, proxy_end = self.open_ide(protocols=())
        self.assertTrue(ide.opened)
        self.assertEqual(self.hub.request.protocols, [])
        self.assertIsNone(ide.websocket_protocol_in_use)
        self.assertNotIn(b"sec-websocket-protocol", proxy_end.history.lower())

    def test_client_facing_socket_has_tcp_nodelay(self) -> None:
        _, proxy_end = self.open_ide()
        self.assertIs(proxy_end.nodelay, True)

    def test_keepalive_pings_both_sides(self) -> None:
        self.make_relay(ping_interval=5.0)
        ide, _ = self.open_ide()
        for _ in range(3):
            self.clock.advance(2.5)
            self.network.pump()
        self.assertGreaterEqual(ide.pings, 1)
        self.assertGreaterEqual(self.hub.pings, 1)
        self.assertIsNone(ide.closed)


class RefusalTests(RelayTestCase):
    def test_hub_refusal_status_reaches_the_client(self) -> None:
        def refuse(request):
            raise ConnectionDeny(403, "Forbidden")

        self.hub_factory.answer = refuse
        ide, proxy_end = self.open_ide()
        status, body = self.response(proxy_end)
        self.assertEqual(status, b"HTTP/1.1 403 Forbidden")
        self.assertEqual(body["reason"], "hub-refused")
        self.assertIn("403", body["message"])
        self.assertFalse(ide.opened)
        self.assertTrue(proxy_end.closed)
        self.assertEqual(self.relay.links, set())

    def test_hub_redirect_means_server_not_running(self) -> None:
        def redirect(request):
            raise ConnectionDeny(302, "Found")

        self.hub_factory.answer = redirect
        _, proxy_end = self.open_ide()
        status, body = self.response(proxy_end)
        self.assertEqual(status, b"HTTP/1.1 503 Service Unavailable")
        self.assertEqual(body["reason"], "server-not-running")

    def test_unreachable_hub_is_502_with_the_policys_explanation(self) -> None:
        self.policy.failure = Failure(Refused())
        ide, proxy_end = self.open_ide()
        status, body = self.response(proxy_end)
        self.assertEqual(status, b"HTTP/1.1 502 Bad Gateway")
        self.assertEqual(
            body,
            {"message": "The hub at 127.0.0.1:8443 refused the connection.", "reason": "hub-unreachable"},
        )
        self.assertFalse(ide.opened)
        self.assertEqual(self.relay.links, set())
        self.assertLogsClean()

    def test_hub_handshake_timeout_is_504(self) -> None:
        self.hub_factory.answer = lambda request: Deferred()
        ide, proxy_end = self.open_ide()
        self.clock.advance(61)
        self.network.pump()
        status, body = self.response(proxy_end)
        self.assertTrue(status.startswith(b"HTTP/1.1 504 "), status)
        self.assertEqual(body["reason"], "hub-timeout")

    def test_foreign_origin_is_refused_before_contacting_the_hub(self) -> None:
        ide, proxy_end = self.open_ide(origin="https://evil.example")
        status, body = self.response(proxy_end)
        self.assertEqual(status, b"HTTP/1.1 403 Forbidden")
        self.assertEqual(body["reason"], "origin-refused")
        self.assertEqual(self.policy.attempts, 0)
        self.assertFalse(ide.opened)
        self.assertEqual(self.relay.links, set())

    def test_accepted_origins(self) -> None:
        self.make_relay(allowed_origins=("https://lab.example.org",))
        for origin in (None, "http://127.0.0.1:8888", "https://lab.example.org"):
            ide, _ = self.open_ide(origin=origin)
            self.assertTrue(ide.opened, origin)
        self.assertEqual(self.policy.attempts, 3)

    def test_client_gone_during_hub_connect_cancels_it(self) -> None:
        self.policy.hold = Deferred()
        ide, proxy_end = self.open_ide()
        proxy_end.other.abortConnection()
        self.network.pump()
        self.assertEqual(self.policy.cancelled, 1)
        self.assertEqual(self.relay.links, set())

    def test_client_gone_during_hub_handshake_drops_the_hub(self) -> None:
        self.hub_factory.answer = lambda request: Deferred()
        _, proxy_end = self.open_ide()
        proxy_end.other.abortConnection()
        self.network.pump()
        self.assertIsNotNone(self.hub.closed)
        self.assertEqual(self.relay.links, set())


class TrafficTests(RelayTestCase):
    def test_messages_in_order_with_their_types(self) -> None:
        ide, _ = self.open_ide()
        sent = [
            (b"one", False),
            (b"\x00\xff\x01", True),
            ("\u00e9t\u00e9".encode(), False),
            (b"", True),
            (b"four", False),
        ]
        for payload, is_binary in sent:
            ide.sendMessage(payload, is_binary)
        self.network.pump()
        self.assertEqual(self.hub.messages, sent)
        for payload, is_binary in reversed(sent):
            self.hub.sendMessage(payload, is_binary)
        self.network.pump()
        self.assertEqual(ide.messages, list(reversed(sent)))

    def test_large_messages(self) -> None:
        self.hub_factory.echo = True
        ide, _ = self.open_ide()
        big_binary = bytes(range(256)) * (80 * 1024)  # 20 MiB
        big_text = b"x" * (5 * 1024 * 1024)
        ide.sendMessage(big_binary, True)
        ide.sendMessage(big_text, False)
        self.network.pump()
        self.assertEqual(ide.messages, [(big_binary, True), (big_text, False)])

    def test_hub_messages_right_after_its_handshake_arrive(self) -> None:
        greeting = [(b'{"status": "starting"}', False), (b"\x01\x02", True)]
        self.hub_factory.greeting = greeting
        ide, _ = self.open_ide()
        self.assertEqual(ide.messages, greeting)

    def test_queued_until_the_side_opens(self) -> None:
        """Whatever arrives for a side that is not open yet waits for it, in order."""
        link = Link(self.relay, ConnectingRequest(host="h", port=1, resource="/"), "/")
        link.ide = StubSide("IDE", WebSocketProtocol.STATE_CONNECTING)
        link.forward(link.ide, b"to hub 1", False)  # the hub side does not even exist yet
        link.forward(link.ide, b"to hub 2", True)
        link.hub = StubSide("hub", WebSocketProtocol.STATE_OPEN)
        link.forward(link.hub, b"to ide", False)
        link.opened(link.hub)
        self.assertEqual(link.hub.sent, [(b"to hub 1", False), (b"to hub 2", True)])
        self.assertEqual(link.ide.sent, [])
        link.ide.state = WebSocketProtocol.STATE_OPEN
        link.opened(link.ide)
        link.forward(link.hub, b"after", True)
        self.assertEqual(link.ide.sent, [(b"to ide", False), (b"after", True)])

    def test_queued_messages_are_bounded(self) -> None:
        """Beyond --max-message-size of queued messages the sender is not read until its peer opens."""
        self.make_relay(max_message=10)
        link = Link(self.relay, ConnectingRequest(host="h", port=1, resource="/"), "/")
        link.ide = StubSide("IDE", WebSocketProtocol.STATE_OPEN)
        link.forward(link.ide, b"123456", False)
        self.assertEqual(link.ide.transport.producerState, "producing")
        link.forward(link.ide, b"789012", False)
        self.assertEqual(link.ide.transport.producerState, "paused")
        link.hub = StubSide("hub", WebSocketProtocol.STATE_OPEN)
        link.opened(link.hub)
        self.assertEqual(link.hub.sent, [(b"123456", False), (b"789012", False)])
        self.assertEqual(link.ide.transport.producerState, "producing")

    def test_backpressure_pauses_the_other_socket(self) -> None:
        ide, proxy_end = self.open_ide()
        hub_end = self.hub.transport.other  # the relay's end of the hub connection
        self.assertIsInstance(proxy_end.producer, PeerReading)
        self.assertIsInstance(hub_end.producer, PeerReading)
        # The IDE reads slowly: the IDE socket's buffer is full, Twisted pauses its producer.
        proxy_end.producer.pauseProducing()
        self.assertEqual(hub_end.producerState, "paused")
        self.hub.sendMessage(b"held back", False)
        self.network.pump()
        self.assertEqual(ide.messages, [])
        proxy_end.producer.resumeProducing()
        self.network.pump()
        self.assertEqual(ide.messages, [(b"held back", False)])
        # And the other way: a slow hub pauses reading from the IDE.
        hub_end.producer.pauseProducing()
        self.assertEqual(proxy_end.producerState, "paused")
        hub_end.producer.resumeProducing()
        self.assertEqual(proxy_end.producerState, "producing")


def frames(wire_bytes: bytes) -> list[tuple[bool, int, bytes]]:
    """The data frames in what one side wrote: (FIN, opcode, payload unmasked), control frames left out."""
    found, i = [], 0
    while i < len(wire_bytes):
        b0, b1 = wire_bytes[i], wire_bytes[i + 1]
        length, i = b1 & 0x7F, i + 2
        if length == 126:
            length, i = int.from_bytes(wire_bytes[i:i + 2], "big"), i + 2
        elif length == 127:
            length, i = int.from_bytes(wire_bytes[i:i + 8], "big"), i + 8
        mask = b""
        if b1 & 0x80:
            mask, i = wire_bytes[i:i + 4], i + 4
        payload = wire_bytes[i:i + length]
        if mask:
            payload = bytes(c ^ mask[n % 4] for n, c in enumerate(payload))
        i += length
        if b0 & 0x0F < 8:
            found.append((bool(b0 & 0x80), b0 & 0x0F, payload))
    return found


class FrameTests(RelayTestCase):
    """Frames go on as they arrive while the peer is open: nothing of a message is held whole."""

    def written_since(self, wire: Wire, mark: int) -> list[bytes]:
        return wire.writes[mark:]

    def deliver(self, wire: Wire) -> None:
        """What one end wrote, to the other end only."""
        data = wire.value()
        wire.clear()
        wire.other.protocol.dataReceived(data)

    def test_a_message_read_whole_goes_on_as_one_frame_in_one_write(self) -> None:
        ide, proxy_end = self.open_ide()
        hub_end = self.hub.transport.other
        to_hub, to_ide = len(hub_end.writes), len(proxy_end.writes)
        ide.sendMessage(b"kernel_info_request", True)
        self.network.pump()
        [write] = self.written_since(hub_end, to_hub)
        self.assertEqual(frames(write), [(True, 2, b"kernel_info_request")])
        self.assertTrue(write[1] & 0x80, "frames to the hub are masked")
        self.hub.sendMessage("r\u00e9ply".encode(), False)
        self.network.pump()
        [write] = self.written_since(proxy_end, to_ide)
        self.assertEqual(frames(write), [(True, 1, "r\u00e9ply".encode())])
        self.assertEqual(self.hub.messages, [(b"kernel_info_request", True)])
        self.assertEqual(ide.messages, [("r\u00e9ply".encode(), False)])

    def test_a_frame_goes_on_piece_by_piece_each_a_complete_frame(self) -> None:
        """The hub has the first piece before the IDE sent the second; the message ends where it did."""
        self.patch(relay_frames, "FRAME_PIECE", 1)
        ide, _ = self.open_ide()
        hub_end = self.hub.transport.other
        mark = len(hub_end.writes)
        self.begin_frame(ide, 3000, b"a" * 1000)
        self.assertEqual(frames(b"".join(self.written_since(hub_end, mark))), [(False, 2, b"a" * 1000)])
        ide.sendMessageFrameData(b"b" * 2000)
        ide.endMessage()  # autobahn's own end: an empty last frame
        self.network.pump()
        writes = self.written_since(hub_end, mark)
        self.assertEqual([frames(w) for w in writes], [
            [(False, 2, b"a" * 1000)], [(False, 0, b"b" * 2000)], [(True, 0, b"")],
        ])
        self.assertEqual(self.hub.messages, [(b"a" * 1000 + b"b" * 2000, True)])
        [link] = self.relay.links
        self.assertEqual(link.largest, 3000)

    def test_pieces_of_a_large_frame_are_gathered_to_frame_piece(self) -> None:
        """Few frames for a large message: a client joining fragments by copying stays linear enough."""
        self.patch(relay_frames, "FRAME_PIECE", 2500)
        ide, _ = self.open_ide()
        hub_end = self.hub.transport.other
        mark = len(hub_end.writes)
        ide.beginMessage(isBinary=True)
        ide.beginMessageFrame(6000)
        for n in range(6):
            ide.sendMessageFrameData(bytes([n]) * 1000)
            self.network.pump()
        ide.endMessage()
        self.network.pump()
        sent = [(fin, op, len(data)) for w in self.written_since(hub_end, mark) for fin, op, data in frames(w)]
        self.assertEqual(sent, [(False, 2, 3000), (False, 0, 3000), (True, 0, 0)])
        self.assertEqual(self.hub.messages, [(b"".join(bytes([n]) * 1000 for n in range(6)), True)])

    def test_fragmented_messages_keep_their_frames_and_types(self) -> None:
        ide, proxy_end = self.open_ide()
        mark = len(proxy_end.writes)
        self.hub.beginMessage(isBinary=False)
        for piece in (b"one ", b"two ", b"three"):
            self.hub.sendMessageFrame(piece)
        self.hub.endMessage()
        self.hub.sendMessage(b"\x00\x01", True)
        self.network.pump()
        self.assertEqual(frames(b"".join(self.written_since(proxy_end, mark))), [
            (False, 1, b"one "), (False, 0, b"two "), (False, 0, b"three"), (True, 0, b""), (True, 2, b"\x00\x01"),
        ])
        self.assertEqual(ide.messages, [(b"one two three", False), (b"\x00\x01", True)])

    def test_a_ping_between_pieces_is_a_frame_of_its_own(self) -> None:
        ide, proxy_end = self.open_ide()
        self.begin_frame(self.hub, 10, b"01234")
        [link] = self.relay.links
        link.ide.sendPing(b"are you there")
        self.hub.sendMessageFrameData(b"56789")
        self.hub.endMessage()
        self.network.pump()
        self.assertEqual(ide.messages, [(b"0123456789", True)])
        self.assertIsNone(ide.closed)

    def test_invalid_utf8_in_a_later_piece_closes_both_sides_cleanly(self) -> None:
        """The IDE already has the first piece; its socket still gets a close frame it can read."""
        self.patch(relay_frames, "FRAME_PIECE", 1)
        ide, _ = self.open_ide()
        self.hub.beginMessage(isBinary=False)
        self.hub.beginMessageFrame(8)
        self.hub.sendMessageFrameData(b"valid")
        self.network.pump()
        self.hub.sendMessageFrameData(b"\xff\xfe\xfd")
        self.network.pump()
        self.assertEqual(self.hub.closed[1], 1007)
        self.assertEqual(ide.closed[1:], (1011, "The hub broke the WebSocket protocol."))
        self.assertEqual(ide.messages, [])

    def test_over_the_size_limit_mid_message_is_1009_and_nothing_more_goes_on(self) -> None:
        self.make_relay(max_message=1000)
        ide, _ = self.open_ide()
        hub_end = self.hub.transport.other
        mark = len(hub_end.writes)
        ide.beginMessage(isBinary=True)
        ide.sendMessageFrame(b"x" * 600)
        self.network.pump()
        ide.sendMessageFrame(b"y" * 600)
        ide.endMessage()
        self.network.pump()
        self.assertEqual(ide.closed[1], 1009)
        self.assertEqual(self.hub.closed[1:], (1011, "The IDE broke the WebSocket protocol."))
        self.assertEqual(frames(b"".join(self.written_since(hub_end, mark))), [(False, 2, b"x" * 600)])
        self.assertEqual(self.hub.messages, [])

    def test_the_rest_of_a_message_to_a_closing_hub_is_dropped_and_said(self) -> None:
        self.patch(relay_frames, "FRAME_PIECE", 1)
        ide, _ = self.open_ide(OTHER_PATH)
        self.begin_frame(ide, 2000, b"a" * 1000)
        hub = self.hub
        hub.sendClose(4000, "enough")
        self.deliver(hub.transport)  # the relay has the close; the IDE has not read it yet
        ide.sendMessageFrameData(b"b" * 1000)
        ide.endMessage()
        self.network.pump()
        self.assertEqual(hub.messages, [])
        self.assertEqual(ide.closed[1:], (4000, "enough"))
        text = " ".join(formatEvent(event) or "" for event in self.events)
        self.assertIn("a 2000-byte message from the IDE was dropped", text)


class StubSide:
    def __init__(self, role: str, state: int) -> None:
        self.role = role
        self.state = state
        self.sent: list[tuple[bytes, bool]] = []
        self.transport = StringTransport()
        self.websocket_protocol_in_use = None

    def sendMessage(self, payload: bytes, isBinary: bool) -> None:
        self.sent.append((payload, isBinary))


class CloseTests(RelayTestCase):
    def test_client_close_code_reaches_the_hub(self) -> None:
        for code, reason in ((1000, None), (4001, "bye"), (3000, "kernel restart")):
            self.hub_factory.hubs.clear()
            ide, _ = self.open_ide()
            ide.sendClose(code, reason)
            self.network.pump()
            self.assertEqual(self.hub.closed, (True, code, reason))
            self.assertEqual(ide.closed[:2], (True, code))
        self.assertEqual(self.relay.links, set())

    def test_hub_close_code_reaches_the_client(self) -> None:
        ide, _ = self.open_ide()
        self.hub.sendClose(4002, "kernel died")
        self.network.pump()
        self.assertEqual(ide.closed, (True, 4002, "kernel died"))
        self.assertEqual(self.hub.closed[:2], (True, 4002))
        self.assertEqual(self.relay.links, set())

    def test_protocol_level_codes_pass_unchanged(self) -> None:
        """1001 (going away) and 1011 are not for sendClose, but a relay repeats them as sent."""
        for code in (1001, 1011):
            self.hub_factory.hubs.clear()
            ide, _ = self.open_ide()
            self.hub.sendCloseFrame(code, b"server going away")
            self.network.pump()
            self.assertEqual(ide.closed, (True, code, "server going away"))

    def test_close_without_code(self) -> None:
        ide, _ = self.open_ide()
        ide.sendClose()
        self.network.pump()
        self.assertEqual(self.hub.closed, (True, None, None))

    def test_an_http_status_line_from_the_hubs_proxy_is_named_not_misread(self) -> None:
        """
        configurable-http-proxy writes ``HTTP/1.1 503`` into an upgraded socket when the server
        behind it drops it; its ``H`` (0x48) would read as a frame with RSV = 4.
        """
        for last_message, code, words in ((1000, 1011, "dropped the socket"), (200 << 20, 1009, "200 MiB")):
            self.events.clear()
            ide, _ = self.open_ide()
            [link] = self.relay.links
            link.last_to_hub = last_message
            self.hub.transport.write(b"HTTP/1.1 503\r\nContent-Length: 0\r\n\r\n")
            self.network.pump()
            self.assertEqual(ide.closed[1], code)
            self.assertIn(words, ide.closed[2])
            text = " ".join(formatEvent(event) or "" for event in self.events)
            self.assertIn("'HTTP/1.1 503'", text)
            self.assertNotIn("RSV", text)
            self.hub_factory.hubs.clear()

    def test_long_uris_and_reasons_are_clipped_in_the_log(self) -> None:
        """A client-sent URI (its token still redacted) and a peer's words are quoted at most 1 KiB."""
        ide, _ = self.open_ide(KERNEL_PATH + "&x=" + "y" * 5000)
        self.hub.transport.write(b"HTTP/1.1 503 " + b"z" * 5000 + b"\r\n\r\n")
        self.network.pump()
        self.assertEqual(ide.closed[1], 1011)
        lines = [formatEvent(event) or "" for event in self.events]
        opened = [line for line in lines if " open (subprotocol " in line]
        wrote = [line for line in lines if "the hub's proxy wrote" in line]
        self.assertEqual((len(opened), len(wrote)), (1, 1), lines)
        for line in opened + wrote:
            self.assertIn("token=[redacted]", line)
            self.assertIn("more]", line)
            self.assertLess(len(line), 2 * 1024 + 600)
        self.assertNotIn("z" * 1100, wrote[0])
        self.assertLogsClean()

    def test_client_dropping_without_close_gives_the_hub_1011(self) -> None:
        _, proxy_end = self.open_ide()
        proxy_end.other.abortConnection()
        self.network.pump()
        self.assertEqual(self.hub.closed, (True, 1011, "The IDE connection was lost."))
        self.assertEqual(self.relay.links, set())

    def test_hub_dropping_without_close_gives_the_client_1011(self) -> None:
        ide, _ = self.open_ide(OTHER_PATH)
        self.hub.transport.abortConnection()
        self.network.pump()
        self.assertEqual(ide.closed, (True, 1011, "The hub connection was lost."))
        self.assertEqual(self.relay.links, set())

    def test_a_close_the_proxy_started_ends_with_a_fin(self) -> None:
        """autobahn would reset the connection once the IDE answered; a reset can cost the IDE data."""
        ide, proxy_end = self.open_ide(OTHER_PATH)
        self.hub.transport.abortConnection()
        self.network.pump()
        self.assertEqual(ide.closed, (True, 1011, "The hub connection was lost."))
        self.assertTrue(proxy_end.disconnecting)
        self.assertFalse(proxy_end.disconnected, "the IDE's connection was reset")
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_a_busy_ide_still_reads_its_close_code(self) -> None:
        """
        An IDE that reads nothing for longer than the close handshake timeout is disconnected
        with a FIN: what it has not read yet, the close frame included, stays readable (a reset
        would make its kernel discard it).
        """
        ide, proxy_end = self.open_ide(OTHER_PATH)
        ide_end = proxy_end.other
        ide_end.producerState = "paused"  # the IDE's event loop is busy
        self.hub.transport.abortConnection()
        self.network.pump()
        self.clock.advance(5)
        self.network.pump()
        self.assertTrue(proxy_end.disconnecting)
        self.assertFalse(proxy_end.disconnected, "aborted: the close frame would be lost")
        ide_end.producerState = "producing"
        self.network.pump()
        self.assertEqual(ide.closed[1:], (1011, "The hub connection was lost."))
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_a_peer_that_never_reads_is_aborted_in_the_end(self) -> None:
        _, proxy_end = self.open_ide(OTHER_PATH)
        proxy_end.other.producerState = "paused"
        proxy_end.other.closed = True  # nothing written to the proxy's end will be taken away
        self.hub.transport.abortConnection()
        self.network.pump()
        self.clock.advance(5)
        self.assertFalse(proxy_end.disconnected)
        self.clock.advance(5)
        self.assertTrue(proxy_end.disconnected)

    def test_paused_side_still_gets_its_close(self) -> None:
        """A hub paused for a slow IDE must read again to see the close when the IDE drops."""
        _, proxy_end = self.open_ide()
        proxy_end.producer.pauseProducing()
        proxy_end.other.abortConnection()
        self.network.pump()
        self.assertEqual(self.hub.closed[:2], (True, 1011))

    def test_shutdown_closes_both_sides_with_1001(self) -> None:
        ide, _ = self.open_ide()
        hub = self.hub
        done = self.relay.shutdown()
        self.network.pump()
        self.assertEqual(ide.closed[:2], (True, 1001))
        self.assertEqual(hub.closed[:2], (True, 1001))
        self.assertIsNone(self.successResultOf(done))
        self.assertEqual(self.relay.links, set())
        _, proxy_end = self.open_ide()
        status, body = self.response(proxy_end)
        self.assertEqual(status, b"HTTP/1.1 503 Service Unavailable")

    def test_shutdown_is_registered_with_the_reactor(self) -> None:
        self.assertIn(self.relay.shutdown, [t[0] for t in self.clock.triggers["before"]["shutdown"]])
