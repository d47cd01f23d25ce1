"""
Request bodies streamed to the hub while they arrive (``jds.upload``): the body on its own, then
through the site over a StringTransport, a recording agent standing in for the hub.
"""

from __future__ import annotations

from test_proxy import TARGET, Collected, FakeResponse, RecordingAgent
from twisted.internet.defer import CancelledError
from twisted.internet.error import ConnectionLost
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.client import ResponseNeverReceived
from twisted.web.iweb import UNKNOWN_LENGTH

from jds.guard import Limits
from jds.proxy import HubProxyResource
from jds.site import LocalSite
from jds.tls import HubTLSPolicy
from jds.upload import HIGH_WATER, StreamedBody, SupersededError


class Reader:
    """The IDE's connection as the body sees it."""

    def __init__(self) -> None:
        self.paused = False

    def pause_body(self) -> None:
        self.paused = True

    def resume_body(self) -> None:
        self.paused = False


class StreamedBodyTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.reader = Reader()
        self.body = StreamedBody(10, self.reader, keep=6)
        self.hub = Collected()

    def start(self, producer=None):
        producer = producer or self.body.producer()
        self.hub = Collected()
        done = producer.startProducing(self.hub)
        done.addCallback(self.hub.done)
        return producer, done

    def test_pieces_go_on_as_they_arrive_and_the_end_ends_the_attempt(self) -> None:
        producer, _ = self.start()
        self.assertEqual(producer.length, 10)
        self.body.feed(b"01234")
        self.assertEqual(self.hub.data, [b"01234"])
        self.body.feed(b"56789")
        self.assertFalse(self.hub.ended)
        self.body.end()
        self.assertEqual((b"".join(self.hub.data), self.hub.ended), (b"0123456789", True))

    def test_a_chunked_body_has_no_length(self) -> None:
        body = StreamedBody(None, self.reader, keep=0)
        self.assertIs(body.producer().length, UNKNOWN_LENGTH)
        body.feed(b"abc")
        self.assertEqual(body.size, 3)

    def test_pieces_wait_for_the_connection_and_the_ide_pauses_past_the_high_water_mark(self) -> None:
        body = StreamedBody(None, self.reader, keep=0)
        producer = body.producer()
        body.feed(b"a" * HIGH_WATER)
        self.assertFalse(self.reader.paused)
        body.feed(b"b")
        self.assertTrue(self.reader.paused, "nothing reads it yet: the IDE waits")
        self.start(producer)
        self.assertEqual(sum(map(len, self.hub.data)), HIGH_WATER + 1)
        self.assertFalse(self.reader.paused)

    def test_a_full_hub_connection_pauses_the_ide(self) -> None:
        producer, _ = self.start()
        producer.pauseProducing()
        self.assertTrue(self.reader.paused)
        self.body.feed(b"0123")  # what was already on its way
        self.assertEqual(self.hub.data, [])
        producer.resumeProducing()
        self.assertEqual(self.hub.data, [b"0123"])
        self.assertFalse(self.reader.paused)

    def test_a_body_never_written_goes_whole_to_the_next_attempt(self) -> None:
        first = self.body.producer()  # its connection failed before the handshake
        self.body.feed(b"01234")
        self.assertFalse(self.body.spent)
        self.body.feed(b"56789")
        self.body.end()
        self.start()
        self.assertEqual((b"".join(self.hub.data), self.hub.ended), (b"0123456789", True))
        self.failureResultOf(first.startProducing(Collected()), SupersededError)  # left behind

    def test_once_written_it_goes_again_only_from_the_kept_copy(self) -> None:
        self.start()
        self.body.feed(b"012")
        self.assertTrue(self.body.spent)
        self.start()  # the server was stopped and has started: the body again, from its first byte
        self.assertEqual(self.hub.data, [b"012"])
        self.body.feed(b"345")
        self.assertEqual(b"".join(self.hub.data), b"012345")
        self.body.feed(b"6")  # past keep=6: no longer whole here
        self.assertFalse(self.body.can_send_again())
        self.assertIsNone(self.body.producer())

    def test_an_ide_that_leaves_fails_the_hub_request(self) -> None:
        _, done = self.start()
        self.body.feed(b"012")
        failures = []
        done.addErrback(failures.append)
        self.body.abort(Failure(ConnectionLost()))
        self.assertTrue(failures[0].check(ConnectionLost))
        self.assertFalse(self.body.can_send_again())

    def test_a_stopped_attempt_never_fires_and_frees_the_ide(self) -> None:
        producer, done = self.start()
        producer.pauseProducing()
        self.assertTrue(self.reader.paused)
        producer.stopProducing()  # the hub answered early, or the request was cancelled
        self.assertFalse(self.reader.paused)
        self.body.feed(b"0123")
        self.body.end()
        self.assertEqual((self.hub.data, done.called), ([], False))


class StreamedRequestTests(SynchronousTestCase):
    """A relayed request with a body through the real site, channel and proxy resource."""

    def setUp(self) -> None:
        self.reactor = MemoryReactorClock()
        self.agent = RecordingAgent()
        policy = HubTLSPolicy(self.reactor, TARGET.host, TARGET.port, TARGET.verify_name, None)
        resource = HubProxyResource(TARGET, policy, self.reactor, agent=self.agent)
        self.site = LocalSite(
            resource, reactor=self.reactor, limits=Limits(max_body=1 << 20, body_timeout=5)
        )
        self.channel = self.site.buildProtocol(None)
        self.transport = StringTransport()
        self.channel.makeConnection(self.transport)

    def put(self, length: bytes = b"Content-Length: 300000") -> None:
        self.channel.dataReceived(
            b"PUT /api/contents/big.txt HTTP/1.1\r\nHost: 127.0.0.1:8000\r\n" + length + b"\r\n\r\n"
        )

    def hub_reads(self):
        [(method, uri, _, producer, d)] = self.agent.calls
        hub = Collected()
        done = producer.startProducing(hub)
        self.failures: list[Failure] = []
        done.addCallbacks(hub.done, self.failures.append)
        return producer, hub, d, done

    def test_the_hub_request_starts_before_the_body_and_nothing_is_spooled(self) -> None:
        self.put()
        [(method, uri, _, producer, _)] = self.agent.calls
        self.assertEqual((method, uri, producer.length), (b"PUT", TARGET.origin + b"/user/alice/api/contents/big.txt", 300000))
        self.assertIsNone(self.channel.requests[-1].content, "no buffer or spool file")
        _, hub, d, _ = self.hub_reads()
        self.channel.dataReceived(b"x" * 100_000)
        self.assertEqual(sum(map(len, hub.data)), 100_000)
        self.channel.dataReceived(b"y" * 200_000)
        self.assertTrue(hub.ended)
        response = FakeResponse(201, {}, length=0)
        d.callback(response)
        response.send()
        self.assertTrue(self.transport.value().startswith(b"HTTP/1.1 201 "))
        self.assertEqual((self.site.stats.requests, self.site.stats.bytes_in), (1, 300_000))

    def test_a_slow_hub_pauses_the_ide_and_stops_the_body_clock(self) -> None:
        self.put()
        producer, hub, _, _ = self.hub_reads()
        producer.pauseProducing()
        self.assertEqual(self.transport.producerState, "paused")
        self.reactor.advance(30)  # past --body-timeout: the wait is the hub's, not the client's
        self.assertEqual(self.transport.value(), b"")
        producer.resumeProducing()
        self.assertEqual(self.transport.producerState, "producing")
        self.reactor.advance(6)  # but a client that then stalls is still dropped
        self.assertTrue(self.transport.value().startswith(b"HTTP/1.1 408 "))
        self.assertEqual(len(self.failures), 1, "and its hub request ends")

    def test_a_hub_slower_than_a_minute_does_not_drop_the_ide(self) -> None:
        """While the hub cannot take more, no clock runs against the IDE: twisted.web's idle one neither."""
        self.put()
        producer, hub, _, _ = self.hub_reads()
        self.channel.dataReceived(b"x" * 1000)
        producer.pauseProducing()
        self.reactor.advance(200)  # within --response-timeout (300 s)
        self.assertEqual((self.transport.value(), self.transport.disconnecting), (b"", False))
        producer.resumeProducing()
        self.channel.dataReceived(b"y" * 299_000)
        self.assertTrue(hub.ended)

    def test_an_early_answer_reads_the_rest_of_the_body_before_the_next_request(self) -> None:
        self.put(b"Content-Length: 60")
        _, hub, d, _ = self.hub_reads()
        response = FakeResponse(403, {}, length=0)
        d.callback(response)
        response.send()
        self.assertTrue(self.transport.value().startswith(b"HTTP/1.1 403 "))
        # the rest of the body looks like a request: it must not be taken for one
        smuggled = b"GET /api/smuggled HTTP/1.1\r\nHost: 127.0.0.1:8000\r\n\r\n"
        self.channel.dataReceived(smuggled.ljust(60, b"x"))
        self.assertEqual(len(self.agent.calls), 1)
        self.channel.dataReceived(b"GET /api/next HTTP/1.1\r\nHost: 127.0.0.1:8000\r\n\r\n")
        self.assertEqual([c[1].rsplit(b"/", 1)[1] for c in self.agent.calls], [b"big.txt", b"next"])

    def test_a_chunked_body_over_the_limit_is_cut_and_the_hub_request_ends(self) -> None:
        self.put(b"Transfer-Encoding: chunked")
        self.hub_reads()
        piece = b"%x\r\n" % (512 << 10) + b"z" * (512 << 10) + b"\r\n"
        self.channel.dataReceived(piece)
        self.assertEqual(self.transport.value(), b"")
        self.channel.dataReceived(piece + piece)
        self.assertTrue(self.transport.value().startswith(b"HTTP/1.1 413 "))
        self.assertEqual(self.transport.value().count(b"HTTP/1.1"), 1)
        self.assertEqual(len(self.failures), 1, "the hub's request body failed")
        self.assertEqual(len(self.agent.cancelled), 1)

    def test_an_ide_leaving_mid_body_ends_the_hub_request(self) -> None:
        self.put()
        self.hub_reads()
        self.channel.dataReceived(b"x" * 1000)
        self.channel.connectionLost(Failure(ConnectionLost()))
        self.assertEqual(len(self.failures), 1)
        self.assertTrue(self.failures[0].check(ConnectionLost, CancelledError))
        self.assertEqual(len(self.agent.cancelled), 1)

    def test_a_body_that_went_out_is_not_sent_again_after_a_broken_link(self) -> None:
        self.channel.dataReceived(
            b"GET /api/contents/x HTTP/1.1\r\nHost: 127.0.0.1:8000\r\nContent-Length: 4\r\n\r\n"
        )
        _, hub, d, _ = self.hub_reads()
        self.channel.dataReceived(b"abcd")
        d.errback(Failure(ResponseNeverReceived([Failure(ConnectionLost())])))
        self.reactor.advance(10)
        self.assertEqual(len(self.agent.calls), 1)
        self.assertTrue(self.transport.value().startswith(b"HTTP/1.1 502 "))

    def test_a_malformed_chunk_gets_one_400_and_ends_the_hub_request(self) -> None:
        self.put(b"Transfer-Encoding: chunked")
        self.hub_reads()
        self.channel.dataReceived(b"zz\r\n")
        self.channel.connectionLost(Failure(ConnectionLost()))
        self.assertTrue(self.transport.value().startswith(b"HTTP/1.1 400 "))
        self.assertEqual(self.transport.value().count(b"HTTP/1.1"), 1, "the 400 alone, no 502 after it")
        self.assertEqual((len(self.failures), len(self.agent.cancelled)), (1, 1))
