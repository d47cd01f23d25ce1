"""
The hub client (jds/hubclient.py) in memory: what it writes, how it frames answers, when it keeps,
reuses, retries and drops connections, and what it reports for each failure (Agent's types, which
jds.retry reads). Connections come from a fake endpoint over StringTransport; time is a task.Clock.
"""

from __future__ import annotations

from twisted.internet.defer import CancelledError, Deferred, succeed
from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.internet.protocol import Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from twisted.web._newclient import (
    ParseError,
    RequestGenerationFailed,
    RequestTransmissionFailed,
    ResponseDone,
    ResponseFailed,
    ResponseNeverReceived,
    WrongBodyLength,
)
from twisted.web.http import PotentialDataLoss
from twisted.web.http_headers import Headers
from twisted.web.iweb import UNKNOWN_LENGTH

from jds.hubclient import HOLD_UNREAD, HubClient, request_head
from jds.retry import may_retry

URL = b"https://hub.example.org:8443/user/alice/api/kernels?x=1"
IDLE = 4.0


class RecordingTransport(StringTransport):
    """A StringTransport that keeps each write apart, to tell one write from several."""

    aborted = False

    def __init__(self) -> None:
        super().__init__()
        self.writes: list[bytes] = []

    def abortConnection(self) -> None:  # noqa: N802
        self.aborted = True  # StringTransport's says it sets this, and does not
        super().abortConnection()

    def write(self, data: bytes) -> None:
        self.writes.append(data)
        super().write(data)

    def writeSequence(self, data) -> None:  # noqa: N802
        self.write(b"".join(data))


class FakeEndpoint:
    """Hands out connections when the test says so; remembers every one."""

    def __init__(self) -> None:
        self.waiting: list[tuple[Deferred, object]] = []
        self.cancelled = 0
        self.made: list[tuple[Protocol, RecordingTransport]] = []

    def connect(self, factory) -> Deferred:
        d: Deferred = Deferred(lambda _: self._cancelled())
        self.waiting.append((d, factory))
        return d

    def _cancelled(self) -> None:
        self.cancelled += 1

    def accept(self) -> tuple[Protocol, RecordingTransport]:
        d, factory = self.waiting.pop(0)
        protocol = factory.buildProtocol(None)
        transport = RecordingTransport()
        protocol.makeConnection(transport)
        self.made.append((protocol, transport))
        d.callback(protocol)
        return protocol, transport


class Body(Protocol):
    """A body protocol that records what arrives and how it ended."""

    def __init__(self) -> None:
        self.data: list[bytes] = []
        self.reason: Failure | None = None

    def dataReceived(self, data: bytes) -> None:  # noqa: N802
        self.data.append(data)

    def connectionLost(self, reason=None) -> None:  # noqa: N802
        self.reason = reason

    @property
    def body(self) -> bytes:
        return b"".join(self.data)


class BytesBody:
    """A body producer: writes its pieces when started, or holds them until ``finish``."""

    def __init__(self, pieces: list[bytes], length: object = None, hold: bool = False) -> None:
        self.pieces = pieces
        self.length = sum(map(len, pieces)) if length is None else length
        self.hold = hold
        self.stopped = False
        self.done: Deferred | None = None
        self.consumer = None

    def startProducing(self, consumer) -> Deferred:  # noqa: N802
        self.consumer = consumer
        if not self.hold:
            for piece in self.pieces:
                consumer.write(piece)
            return succeed(None)
        self.done = Deferred()
        return self.done

    def finish(self) -> None:
        for piece in self.pieces:
            self.consumer.write(piece)
        self.done.callback(None)

    def pauseProducing(self) -> None:  # noqa: N802
        pass

    def resumeProducing(self) -> None:  # noqa: N802
        pass

    def stopProducing(self) -> None:  # noqa: N802
        self.stopped = True


class _ClientTestCase(SynchronousTestCase):
    persistent = True

    def setUp(self) -> None:
        self.clock = Clock()
        self.endpoint = FakeEndpoint()
        self.client = HubClient(self.clock, self.endpoint, persistent=self.persistent, idle_seconds=IDLE)

    def request(self, method: bytes = b"GET", headers: Headers | None = None, body=None, url: bytes = URL):
        results: list = []
        d = self.client.request(method, url, headers, body)
        d.addBoth(results.append)
        return d, results

    def answer(self, transport: RecordingTransport, protocol: Protocol, raw: bytes) -> None:
        transport.clear()
        protocol.dataReceived(raw)

    def exchange(self, raw: bytes, method: bytes = b"GET"):
        """One request on a new connection, answered with ``raw``: (response, body protocol, transport)."""
        _, results = self.request(method)
        protocol, transport = self.endpoint.accept()
        protocol.dataReceived(raw)
        [response] = results
        body = Body()
        response.deliverBody(body)
        return response, body, transport, protocol


class RequestWritingTests(_ClientTestCase):
    def test_head_goes_in_one_write_with_host_from_the_uri(self) -> None:
        self.request(headers=Headers({b"Accept": [b"application/json"], b"X-Two": [b"a", b"b"]}))
        _, transport = self.endpoint.accept()
        self.assertEqual(transport.writes, [
            b"GET /user/alice/api/kernels?x=1 HTTP/1.1\r\nHost: hub.example.org:8443\r\n"
            b"Accept: application/json\r\nX-Two: a\r\nX-Two: b\r\n\r\n"
        ])

    def test_a_host_given_is_kept_and_the_default_port_left_out(self) -> None:
        head = request_head(b"GET", b"https://h:8443/p", Headers({b"Host": [b"other:1"]}), None, True)
        self.assertEqual(head, b"GET /p HTTP/1.1\r\nHost: other:1\r\n\r\n")
        self.assertEqual(request_head(b"GET", b"https://h:443", None, None, True), b"GET / HTTP/1.1\r\nHost: h\r\n\r\n")
        self.assertEqual(request_head(b"GET", b"http://h:80?q", None, None, True), b"GET /?q HTTP/1.1\r\nHost: h\r\n\r\n")

    def test_framing_of_request_bodies(self) -> None:
        self.assertIn(b"Content-Length: 0\r\n", request_head(b"POST", URL, None, None, True))
        self.assertNotIn(b"Content-Length", request_head(b"DELETE", URL, None, None, True))
        self.assertIn(b"Content-Length: 3\r\n", request_head(b"PUT", URL, None, BytesBody([b"abc"]), True))
        chunked = request_head(b"PUT", URL, None, BytesBody([], length=UNKNOWN_LENGTH), False)
        self.assertIn(b"Transfer-Encoding: chunked\r\n", chunked)
        self.assertIn(b"Connection: close\r\n", chunked)

    def test_a_target_that_would_split_the_request_is_refused(self) -> None:
        _, results = self.request(url=b"https://h/a\r\nX: y")
        self.assertIsInstance(results[0].value, RequestGenerationFailed)
        self.assertEqual(self.endpoint.waiting, [])

    def test_known_length_body_is_written_as_is_then_the_producer_unregistered(self) -> None:
        body = BytesBody([b"abc", b"de"], hold=True)
        self.request(b"PUT", body=body)
        _, transport = self.endpoint.accept()
        self.assertIs(transport.producer, body)  # a full connection pauses the body: backpressure
        self.assertTrue(transport.streaming)
        body.finish()
        self.assertEqual(transport.writes[1:], [b"abc", b"de"])
        self.assertIsNone(transport.producer)

    def test_unknown_length_body_goes_chunked(self) -> None:
        body = BytesBody([b"abc", b"", b"0123456789abcdef"], length=UNKNOWN_LENGTH)
        self.request(b"PUT", body=body)
        _, transport = self.endpoint.accept()
        self.assertEqual(b"".join(transport.writes[1:]), b"3\r\nabc\r\n10\r\n0123456789abcdef\r\n0\r\n\r\n")

    def test_a_body_shorter_than_declared_fails_the_request_and_the_connection(self) -> None:
        _, results = self.request(b"PUT", body=BytesBody([b"abc"], length=5))
        _, transport = self.endpoint.accept()
        self.assertIsInstance(results[0].value, RequestGenerationFailed)
        self.assertTrue(results[0].value.reasons[0].check(WrongBodyLength))
        self.assertTrue(transport.aborted)

    def test_a_body_that_fails_fails_the_request(self) -> None:
        body = BytesBody([b"abc"], hold=True)
        _, results = self.request(b"PUT", body=body)
        _, transport = self.endpoint.accept()
        body.done.errback(Failure(ConnectionLost("the IDE left")))
        self.assertIsInstance(results[0].value, RequestGenerationFailed)
        self.assertTrue(transport.aborted)
        self.assertIsNone(transport.producer)


class ResponseFramingTests(_ClientTestCase):
    def test_content_length(self) -> None:
        response, body, transport, _ = self.exchange(
            b"HTTP/1.1 201 Created\r\nContent-Type: text/plain\r\nContent-Length: 5\r\n"
            b"Set-Cookie: a=1\r\nset-cookie: b=2\r\nX-Odd:   spaced ,  value \r\n\r\nhello"
        )
        self.assertEqual((response.code, response.phrase, response.version, response.length), (201, b"Created", (b"HTTP", 1, 1), 5))
        self.assertEqual(response.headers.getRawHeaders(b"set-cookie"), [b"a=1", b"b=2"])
        self.assertEqual(response.headers.getRawHeaders(b"x-odd"), [b"spaced ,  value"])
        # the connection's own headers are not the answer's (Agent's rule)
        self.assertIsNone(response.headers.getRawHeaders(b"content-length"))
        self.assertEqual(body.body, b"hello")
        self.assertTrue(body.reason.check(ResponseDone))
        self.assertEqual(self.client.idle, 1)
        self.assertFalse(transport.disconnecting)

    def test_chunked_in_any_pieces_with_extensions_and_trailers(self) -> None:
        raw = (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
               b"5;ext=1\r\nhello\r\n1A\r\nabcdefghijklmnopqrstuvwxyz\r\n0\r\nX-Trailer: t\r\n\r\n")
        _, results = self.request()
        protocol, _ = self.endpoint.accept()
        for i in range(len(raw)):
            protocol.dataReceived(raw[i : i + 1])
        [response] = results
        body = Body()
        response.deliverBody(body)
        self.assertEqual(response.length, UNKNOWN_LENGTH)
        self.assertIsNone(response.headers.getRawHeaders(b"transfer-encoding"))
        self.assertEqual(body.body, b"helloabcdefghijklmnopqrstuvwxyz")
        self.assertTrue(body.reason.check(ResponseDone))
        self.assertEqual(self.client.idle, 1)

    def test_read_until_close(self) -> None:
        response, body, transport, protocol = self.exchange(b"HTTP/1.1 200 OK\r\n\r\nsome")
        protocol.dataReceived(b" more")
        self.assertEqual(response.length, UNKNOWN_LENGTH)
        self.assertIsNone(body.reason)
        protocol.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(body.body, b"some more")
        self.assertTrue(body.reason.check(PotentialDataLoss))  # as Agent says it
        self.assertEqual(self.client.idle, 0)

    def test_no_body_for_head_204_and_304(self) -> None:
        response, body, transport, protocol = self.exchange(
            b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n", method=b"HEAD"
        )
        self.assertEqual((response.length, body.body), (0, b""))
        self.assertTrue(body.reason.check(ResponseDone))
        self.assertEqual(response.headers.getRawHeaders(b"content-length"), [b"100"])  # HEAD's is the entity's
        for status in (b"204 No Content", b"304 Not Modified"):
            _, results = self.request()
            transport.clear()
            protocol.dataReceived(b"HTTP/1.1 " + status + b"\r\n\r\n")
            self.assertEqual(results[0].length, 0)
        self.assertEqual(len(self.endpoint.made), 1)  # all three on one connection

    def test_interim_answers_are_skipped(self) -> None:
        response, body, _, _ = self.exchange(
            b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 102 Processing\r\nX: y\r\n\r\n"
            b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
        )
        self.assertEqual((response.code, body.body), (200, b"ok"))

    def test_lf_only_lines_and_folded_headers_are_read(self) -> None:
        response, body, _, _ = self.exchange(b"HTTP/1.1 200\nX-Long: a\n  b\nContent-Length: 1\n\nz")
        self.assertEqual((response.code, response.phrase, body.body), (200, b"", b"z"))
        self.assertEqual(response.headers.getRawHeaders(b"x-long"), [b"a  b"])

    def test_http_1_0_and_connection_close_are_not_pooled(self) -> None:
        for raw in (
            b"HTTP/1.0 200 OK\r\nContent-Length: 1\r\n\r\nx",
            b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 1\r\n\r\nx",
        ):
            response, body, transport, _ = self.exchange(raw)
            self.assertEqual(body.body, b"x")
            self.assertTrue(body.reason.check(ResponseDone))
            self.assertTrue(transport.disconnecting)
            self.assertEqual(self.client.idle, 0)
        self.assertEqual(response.version, (b"HTTP", 1, 1))
        response, _, transport, _ = self.exchange(b"HTTP/1.0 200 OK\r\nConnection: Keep-Alive\r\nContent-Length: 0\r\n\r\n")
        self.assertEqual((response.version, self.client.idle), ((b"HTTP", 1, 0), 1))

    def test_stray_bytes_after_an_answer_drop_the_connection(self) -> None:
        _, body, transport, _ = self.exchange(b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\nxHTTP/1.1 200")
        self.assertEqual(body.body, b"x")
        self.assertTrue(transport.disconnecting)
        self.assertEqual(self.client.idle, 0)


class MalformedResponseTests(_ClientTestCase):
    def assert_fails_cleanly(self, raw: bytes) -> Failure:
        _, results = self.request()
        protocol, transport = self.endpoint.accept()
        protocol.dataReceived(raw)
        [failure] = results
        self.assertIsInstance(failure, Failure)
        self.assertTrue(failure.check(ResponseFailed))
        self.assertFalse(failure.check(ResponseNeverReceived))
        self.assertTrue(transport.aborted)
        protocol.connectionLost(Failure(ConnectionDone()))  # nothing more is reported
        self.assertEqual(len(results), 1)
        self.assertEqual(self.client.idle, 0)
        return failure

    def test_bad_heads(self) -> None:
        for raw in (
            b"HTTP/1.1\r\n\r\n",
            b"HTTP/1.1 2x0 OK\r\n\r\n",
            b"HTTP/x.y 200 OK\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nno colon here\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: 1, 2\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n",
        ):
            failure = self.assert_fails_cleanly(raw)
            self.assertTrue(failure.value.reasons[0].check(ParseError), raw)

    def test_a_head_that_never_ends_fails_instead_of_growing(self) -> None:
        failure = self.assert_fails_cleanly(b"HTTP/1.1 200 OK\r\nX: " + b"a" * (300 << 10))
        self.assertTrue(failure.value.reasons[0].check(ParseError))

    def test_a_bad_chunk_ends_the_body_with_response_failed(self) -> None:
        _, body, transport, _ = self.exchange(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nokzz\r\n")
        self.assertEqual(body.body, b"ok")
        self.assertTrue(body.reason.check(ResponseFailed))
        self.assertTrue(transport.aborted)
        _, body, transport, _ = self.exchange(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n")
        self.assertTrue(body.reason.check(ResponseFailed))

    def test_a_body_cut_short_ends_with_response_failed(self) -> None:
        _, body, _, protocol = self.exchange(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc")
        protocol.connectionLost(Failure(ConnectionLost()))
        self.assertEqual(body.body, b"abc")
        self.assertTrue(body.reason.check(ResponseFailed))


class PoolTests(_ClientTestCase):
    def test_connections_are_reused_most_recent_first(self) -> None:
        d1, r1 = self.request()
        d2, r2 = self.request()
        p1, t1 = self.endpoint.accept()
        p2, t2 = self.endpoint.accept()
        p1.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
        p2.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
        self.assertEqual(self.client.idle, 2)
        t2.clear()
        self.request()
        self.assertTrue(t2.value().startswith(b"GET "))
        self.assertEqual(self.endpoint.waiting, [])

    def test_idle_connections_close_after_the_idle_time_counted_from_their_last_answer(self) -> None:
        _, _, transport, protocol = self.exchange(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
        self.clock.advance(IDLE - 1)
        self.request()
        protocol.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
        self.clock.advance(IDLE - 1)
        self.assertFalse(transport.disconnecting)
        self.assertEqual(self.client.idle, 1)
        self.clock.advance(1)
        self.assertTrue(transport.disconnecting)
        self.assertEqual(self.client.idle, 0)
        protocol.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_a_connection_the_hub_closed_while_idle_leaves_the_pool(self) -> None:
        _, _, _, protocol = self.exchange(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
        protocol.connectionLost(Failure(ConnectionDone()))
        self.assertEqual((self.client.idle, self.clock.getDelayedCalls()), (0, []))
        self.request()
        self.assertEqual(len(self.endpoint.waiting), 1)

    def test_close_idle_fires_once_they_are_closed(self) -> None:
        _, _, transport, protocol = self.exchange(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
        closed: list = []
        self.client.close_idle().addCallback(closed.append)
        self.assertTrue(transport.disconnecting)
        self.assertEqual((closed, self.clock.getDelayedCalls()), ([], []))
        protocol.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(len(closed), 1)

    def test_a_paused_connection_is_resumed_before_it_is_pooled(self) -> None:
        response, body, transport, protocol = self.exchange(b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nabc")
        body.transport.pauseProducing()
        self.assertEqual(transport.producerState, "paused")
        protocol.dataReceived(b"def")  # already on its way when the reader paused
        self.assertEqual(body.body, b"abcdef")
        self.assertEqual(transport.producerState, "producing")
        self.assertEqual(self.client.idle, 1)
        body.transport.pauseProducing()  # the body is over: the connection is someone else's now
        self.assertEqual(transport.producerState, "producing")


class NonPersistentTests(_ClientTestCase):
    persistent = False

    def test_every_connection_says_close_and_closes_after_its_answer(self) -> None:
        _, body, transport, _ = self.exchange(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        self.assertIn(b"\r\nConnection: close\r\n", transport.writes[0])
        self.assertEqual(body.body, b"ok")
        self.assertTrue(transport.disconnecting)
        self.assertEqual(self.client.idle, 0)


class StaleConnectionTests(_ClientTestCase):
    def pooled(self):
        _, _, transport, protocol = self.exchange(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
        return protocol, transport

    def test_a_get_on_a_stale_pooled_connection_goes_once_more_on_a_new_one(self) -> None:
        protocol, _ = self.pooled()
        _, results = self.request()
        protocol.connectionLost(Failure(ConnectionDone()))  # the hub had closed it: no byte of an answer
        self.assertEqual(results, [])
        fresh, transport = self.endpoint.accept()
        self.assertTrue(transport.value().startswith(b"GET /user/alice/api/kernels?x=1 HTTP/1.1\r\n"))
        fresh.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
        self.assertEqual(results[0].code, 200)

    def test_only_once(self) -> None:
        protocol, _ = self.pooled()
        _, results = self.request()
        protocol.connectionLost(Failure(ConnectionDone()))
        fresh, _ = self.endpoint.accept()
        fresh.connectionLost(Failure(ConnectionLost()))
        self.assertTrue(results[0].check(ResponseNeverReceived))
        self.assertEqual(self.endpoint.waiting, [])

    def test_a_post_whose_body_was_sent_is_never_sent_again(self) -> None:
        protocol, _ = self.pooled()
        _, results = self.request(b"POST", body=BytesBody([b"{}"]))
        protocol.connectionLost(Failure(ConnectionDone()))
        self.assertTrue(results[0].check(ResponseNeverReceived))
        self.assertEqual(self.endpoint.waiting, [])
        self.assertFalse(may_retry(b"POST", results[0]))  # and jds.retry does not send it again either

    def test_a_body_still_being_sent_when_the_connection_goes(self) -> None:
        protocol, _ = self.pooled()
        body = BytesBody([b"abc"], hold=True)
        _, results = self.request(b"PUT", body=body)
        protocol.connectionLost(Failure(ConnectionLost()))
        self.assertTrue(results[0].check(RequestTransmissionFailed))
        self.assertTrue(body.stopped)
        self.assertEqual(self.endpoint.waiting, [])

    def test_no_retry_once_some_of_the_answer_came(self) -> None:
        protocol, _ = self.pooled()
        _, results = self.request()
        protocol.dataReceived(b"HTTP/1.1 20")
        protocol.connectionLost(Failure(ConnectionLost()))
        self.assertTrue(results[0].check(ResponseFailed))
        self.assertFalse(results[0].check(ResponseNeverReceived))
        self.assertEqual(self.endpoint.waiting, [])

    def test_no_retry_on_a_new_connection(self) -> None:
        _, results = self.request()
        protocol, _ = self.endpoint.accept()
        protocol.connectionLost(Failure(ConnectionLost()))
        self.assertTrue(results[0].check(ResponseNeverReceived))
        self.assertEqual(self.endpoint.waiting, [])


class CancellationAndFlowTests(_ClientTestCase):
    def test_cancel_while_waiting_for_the_answer_drops_the_connection(self) -> None:
        d, results = self.request()
        protocol, transport = self.endpoint.accept()
        d.cancel()
        [failure] = results
        self.assertTrue(failure.check(ResponseNeverReceived))  # what the proxy's timeouts expect of Agent
        self.assertTrue(failure.value.reasons[0].check(CancelledError))
        self.assertTrue(transport.aborted)
        protocol.connectionLost(Failure(ConnectionLost()))
        self.assertEqual((len(results), self.client.idle), (1, 0))
        self.assertFalse(may_retry(b"GET", failure))

    def test_cancel_while_connecting_cancels_the_connect(self) -> None:
        d, results = self.request()
        d.cancel()
        self.assertEqual(self.endpoint.cancelled, 1)
        self.assertTrue(results[0].check(ResponseNeverReceived))

    def test_cancel_stops_a_body_being_sent(self) -> None:
        body = BytesBody([b"abc"], hold=True)
        d, _ = self.request(b"PUT", body=body)
        _, transport = self.endpoint.accept()
        d.cancel()
        self.assertTrue(body.stopped)
        self.assertIsNone(transport.producer)

    def test_stop_producing_drops_the_connection_and_the_body_ends_failed(self) -> None:
        _, body, transport, protocol = self.exchange(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc")
        body.transport.stopProducing()
        self.assertTrue(transport.aborted)
        protocol.dataReceived(b"def")  # in flight: nobody wants it
        protocol.connectionLost(Failure(ConnectionLost()))
        self.assertEqual(body.body, b"abc")
        self.assertTrue(body.reason.check(ResponseFailed))
        self.assertEqual(self.client.idle, 0)

    def test_a_body_read_late_is_held_and_the_hub_paused_past_a_bound(self) -> None:
        _, results = self.request()
        protocol, transport = self.endpoint.accept()
        protocol.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % (HOLD_UNREAD + 2))
        protocol.dataReceived(b"a" * HOLD_UNREAD)
        self.assertEqual(transport.producerState, "producing")
        protocol.dataReceived(b"b")
        self.assertEqual(transport.producerState, "paused")
        body = Body()
        results[0].deliverBody(body)
        self.assertEqual(transport.producerState, "producing")
        protocol.dataReceived(b"c")
        self.assertEqual(body.body, b"a" * HOLD_UNREAD + b"bc")
        self.assertTrue(body.reason.check(ResponseDone))

    def test_an_answer_before_the_body_is_all_sent_stops_the_body_and_the_connection(self) -> None:
        body = BytesBody([b"abc"], hold=True)
        _, results = self.request(b"PUT", body=body)
        protocol, transport = self.endpoint.accept()
        protocol.dataReceived(b"HTTP/1.1 413 Too Large\r\nContent-Length: 0\r\n\r\n")
        self.assertEqual(results[0].code, 413)
        self.assertTrue(body.stopped)
        self.assertTrue(transport.disconnecting)
        self.assertIsNone(transport.producer)
        self.assertEqual(self.client.idle, 0)
