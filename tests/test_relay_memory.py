"""
What an open, quiet relayed WebSocket keeps, in memory (the harness of test_relay.py): the HTTP
request it came in on is gone, its autobahn protocols hold only what differs from their class, and
the links of a relay share one timer for their pings (``benchmarks/HISTORY.md``, third round).
"""

from __future__ import annotations

import gc
import weakref

from autobahn.twisted.websocket import WebSocketClientFactory
from test_relay import KERNEL_PATH, V1, Ide, RelayTestCase
from twisted.internet.address import IPv4Address

from jds.relay_frames import _HANDSHAKE_ONLY


class ReleasedTests(RelayTestCase):
    def setUp(self) -> None:
        super().setUp()
        # Only reference counting may free what these tests expect gone: no collection runs.
        gc.disable()
        self.addCleanup(gc.enable)

    def open_watched(self) -> tuple[Ide, list[weakref.ref], weakref.ref]:
        """Like ``open_ide``; also weak references to the HTTP request(s) and channel it came in on."""
        requests: list[weakref.ref] = []
        make_request = self.site.requestFactory

        def recording(*args):
            request = make_request(*args)
            requests.append(weakref.ref(request))
            return request

        factory = WebSocketClientFactory(f"ws://127.0.0.1:8888{KERNEL_PATH}", protocols=[V1], reactor=self.clock)
        factory.protocol = Ide
        factory.setProtocolOptions(openHandshakeTimeout=0)
        ide = factory.buildProtocol(None)
        wrapper = self.site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 50000))
        channel = wrapper._channel
        channel.requestFactory = recording
        self.network.connect(wrapper, ide, 8888)
        self.network.pump()
        return ide, requests, weakref.ref(channel)

    def test_the_upgraded_request_and_its_channel_go_at_once(self) -> None:
        ide, requests, channel = self.open_watched()
        self.assertTrue(ide.opened)
        [link] = self.relay.links
        self.assertEqual(link.ide.state, link.ide.STATE_OPEN)
        self.assertEqual(len(requests), 1)
        self.assertIsNone(requests[0](), "the upgraded Request is still referenced")
        self.assertIsNone(channel(), "the HTTP channel of an upgraded connection is still referenced")

    def test_an_open_socket_keeps_no_handshake_leftovers(self) -> None:
        self.open_ide()
        [link] = self.relay.links
        for side in (link.ide, link.hub):
            own = vars(side)
            self.assertEqual([name for name in _HANDSHAKE_ONLY if name in own], [])
            self.assertIsNone(side._transport_details)
            # the options are the relay's configured class's, not copies in every socket
            self.assertNotIn("autoPingInterval", own)
            self.assertEqual(side.autoPingInterval, 30.0)
            self.assertNotIn("wasClean", own)
            self.assertFalse(side.wasClean)
            self.assertNotIn("send_queue", own)
            self.assertLessEqual(len(own), 24, sorted(own))
        # what the relay and the log still need stays
        self.assertEqual(link.ide.websocket_protocol_in_use, V1)
        self.assertEqual(link.hub.websocket_protocol_in_use, V1)

    def test_options_differ_per_relay(self) -> None:
        self.make_relay(ping_interval=5.0, max_message=1 << 20)
        self.open_ide()
        [link] = self.relay.links
        self.assertEqual((link.ide.autoPingInterval, link.hub.autoPingInterval), (5.0, 5.0))
        self.assertEqual((link.ide.maxMessagePayloadSize, link.hub.maxMessagePayloadSize), (1 << 20, 1 << 20))

    def test_an_ide_offering_compression_is_answered_without_it(self) -> None:
        # the options' functions (perMessageCompressionAccept) stay functions on the configured class
        from autobahn.websocket.compress import PerMessageDeflateOffer

        factory = WebSocketClientFactory(f"ws://127.0.0.1:8888{KERNEL_PATH}", protocols=[V1], reactor=self.clock)
        factory.protocol = Ide
        factory.setProtocolOptions(openHandshakeTimeout=0, perMessageCompressionOffers=[PerMessageDeflateOffer()])
        ide = factory.buildProtocol(None)
        self.network.connect(self.site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 50000)), ide, 8888)
        self.network.pump()
        self.assertTrue(ide.opened)
        self.assertIsNone(ide._perMessageCompress)
        self.hub_factory.echo = True
        ide.sendMessage(b"\x01", isBinary=True)
        self.network.pump()
        self.assertEqual(ide.messages, [(b"\x01", True)])

    def test_a_pruned_socket_still_relays_and_closes_as_before(self) -> None:
        ide, _ = self.open_ide()
        [link] = self.relay.links
        self.hub_factory.echo = True
        ide.sendMessage(b"\x01\x02", isBinary=True)
        self.network.pump()
        self.assertEqual(ide.messages, [(b"\x01\x02", True)])
        ide.sendClose(4001, "bye")
        self.network.pump()
        self.assertEqual(self.hub.closed, (True, 4001, "bye"))
        self.assertEqual(ide.closed, (True, 4001, "bye"))
        self.assertEqual(link.ide.remoteCloseCode, 4001)
        self.assertEqual(self.relay.links, set())

    def test_a_chopped_or_synchronous_write_gets_its_queue_back(self) -> None:
        ide, _ = self.open_ide()
        [link] = self.relay.links
        link.ide.sendMessage(b"one", isBinary=True, sync=True)
        link.ide.sendMessage(b"two", isBinary=True)
        self.assertIn("send_queue", vars(link.ide))
        for _ in range(5):
            self.clock.advance(0.01)
            self.network.pump()
        self.assertEqual(ide.messages, [(b"one", True), (b"two", True)])

    def test_links_share_the_relays_ping_timer(self) -> None:
        self.open_ide()
        one = len(self.clock.getDelayedCalls())
        for _ in range(4):
            self.open_ide()
        self.assertEqual(len(self.relay.links), 5)
        # one bucket of pings per side for sockets opened together, not one timer per socket
        self.assertEqual(len(self.clock.getDelayedCalls()), one)
        factories = [link.hub.factory for link in self.relay.links]
        self.assertEqual(len({id(f._batched_timer) for f in factories}), 1)
        for factory in factories:
            self.assertEqual(sorted(vars(factory)), ["link", "protocols"])
            self.assertEqual(factory.protocols, [V1])
