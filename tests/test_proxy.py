"""
The HTTP proxy resource driven in memory: raw bytes into a Site over a StringTransport (as Twisted's
own test_proxy.py does), a recording agent standing in for the hub.
"""

from __future__ import annotations

import json

from twisted.internet.defer import Deferred, TimeoutError
from twisted.internet.error import ConnectionLost, ConnectionRefusedError
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import capturedLogs, formatEvent
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.client import ResponseDone, ResponseFailed, ResponseNeverReceived
from twisted.web.http_headers import Headers
from twisted.web.iweb import UNKNOWN_LENGTH, IResponse
from zope.interface import implementer

from jds.paths import MAX_REWRITTEN_BODY, HubTarget
from jds.proxy import HubProxyResource
from jds.site import LocalSite
from jds.tls import HubTLSPolicy

TARGET = HubTarget(host="127.0.0.1", port=8443, user="alice", tls_name="hub.example.org")


class FakeUpstream:
    """What the hub's connection looks like to a body protocol: a pausable producer."""

    def __init__(self) -> None:
        self.paused = False
        self.stopped = False

    def pauseProducing(self) -> None:
        self.paused = True

    def resumeProducing(self) -> None:
        self.paused = False

    def stopProducing(self) -> None:
        self.stopped = True


@implementer(IResponse)
class FakeResponse:
    version = (b"HTTP", 1, 1)
    request = None
    previousResponse = None

    def __init__(self, code: int, headers: dict[bytes, list[bytes]], length: int | object = UNKNOWN_LENGTH) -> None:
        self.code = code
        self.phrase = b"Phrase"
        self.headers = Headers(headers)
        self.length = length
        self.upstream = FakeUpstream()
        self.protocol = None

    def deliverBody(self, protocol) -> None:
        self.protocol = protocol
        protocol.makeConnection(self.upstream)

    def send(self, *chunks: bytes, end: Failure | None = None) -> None:
        for chunk in chunks:
            self.protocol.dataReceived(chunk)
        self.protocol.connectionLost(end or Failure(ResponseDone()))

    def setPreviousResponse(self, response) -> None:  # pragma: no cover - interface
        pass


class Collected:
    """A hub connection as a body producer sees it: what was written, and whether it ended."""

    def __init__(self) -> None:
        self.data: list[bytes] = []
        self.ended = False

    def write(self, data: bytes) -> None:
        self.data.append(data)

    def done(self, _: object) -> None:
        self.ended = True


class RecordingAgent:
    def __init__(self) -> None:
        self.calls: list[tuple[bytes, bytes, Headers, object, Deferred]] = []
        self.cancelled: list[bytes] = []

    def request(self, method, uri, headers=None, bodyProducer=None) -> Deferred:
        d: Deferred = Deferred(lambda _: self.cancelled.append(uri))
        self.calls.append((method, uri, headers, bodyProducer, d))
        return d


class ProxyResourceTests(SynchronousTestCase):
    target = TARGET

    def setUp(self) -> None:
        self.reactor = MemoryReactorClock()
        self.agent = RecordingAgent()
        target = self.target
        policy = HubTLSPolicy(self.reactor, target.host, target.port, target.verify_name, None)
        self.site = LocalSite(HubProxyResource(target, policy, self.reactor, agent=self.agent), reactor=self.reactor)
        self.connect()

    def connect(self) -> None:
        """A new client connection (the next request on a connection waits for the last answer)."""
        self.channel = self.site.buildProtocol(None)
        self.transport = StringTransport()
        self.channel.makeConnection(self.transport)

    def send(self, raw: bytes) -> None:
        self.channel.dataReceived(raw)

    def written(self) -> bytes:
        return self.transport.value()

    def test_request_is_mapped_and_token_moves_to_header(self) -> None:
        self.send(b"GET /api/kernels?token=s3cret&x=1 HTTP/1.1\r\nHost: 127.0.0.1:8000\r\n"
                  b"Accept: application/json\r\nConnection: keep-alive\r\n\r\n")
        [(method, uri, headers, body, _)] = self.agent.calls
        self.assertEqual(method, b"GET")
        self.assertEqual(uri, b"https://hub.example.org:8443/user/alice/api/kernels?x=1")
        self.assertEqual(headers.getRawHeaders(b"authorization"), [b"token s3cret"])
        self.assertEqual(headers.getRawHeaders(b"host"), [b"hub.example.org:8443"])
        self.assertEqual(headers.getRawHeaders(b"accept"), [b"application/json"])
        self.assertIsNone(headers.getRawHeaders(b"connection"))
        self.assertIsNone(body)

    def test_response_streams_with_mapped_headers(self) -> None:
        self.send(b"POST /api/sessions HTTP/1.1\r\nHost: 127.0.0.1:8000\r\nContent-Length: 2\r\n\r\n{}")
        [(_, _, _, body, d)] = self.agent.calls
        self.assertIsNotNone(body)
        self.assertEqual(body.length, 2)
        response = FakeResponse(
            201,
            {b"Location": [b"/user/alice/api/sessions/1"],
             b"Set-Cookie": [b"a=1; Path=/user/alice/", b"b=2; Path=/user/alice/"]},
            length=7,
        )
        d.callback(response)
        response.send(b"{\"a\"", b":1}")
        out = self.written()
        self.assertTrue(out.startswith(b"HTTP/1.1 201 Phrase\r\n"))
        self.assertIn(b"Location: /api/sessions/1\r\n", out)
        self.assertIn(b"Set-Cookie: a=1; Path=/\r\n", out)
        self.assertIn(b"Set-Cookie: b=2; Path=/\r\n", out)
        self.assertIn(b"Content-Length: 7\r\n", out)
        self.assertNotIn(b"Content-Type: text/html", out)
        self.assertTrue(out.endswith(b"\r\n\r\n{\"a\":1}"))
        self.assertFalse(self.transport.disconnecting)

    def test_open_exchanges_are_counted_until_answered_or_abandoned(self) -> None:
        """Stats.open_http: one per relayed request while it runs, none once answered or its client left."""
        stats = self.site.stats
        self.send(b"GET /api/status HTTP/1.1\r\nHost: 127.0.0.1:8000\r\n\r\n")
        self.assertEqual(stats.open_http, 1)
        response = FakeResponse(200, {b"Content-Type": [b"application/json"]}, length=2)
        self.agent.calls[0][4].callback(response)
        response.send(b"{}")
        self.assertEqual((stats.open_http, stats.requests), (0, 1))
        self.send(b"GET /api/status HTTP/1.1\r\nHost: 127.0.0.1:8000\r\n\r\n")  # the same connection, again
        self.assertEqual(stats.open_http, 1)
        self.channel.connectionLost(Failure(ConnectionLost()))
        self.assertEqual((stats.open_http, stats.requests), (0, 1))
        self.assertEqual(self.agent.cancelled, [b"https://hub.example.org:8443/user/alice/api/status"])

    def test_kernelspec_resources_are_local(self) -> None:
        self.send(b"GET /api/kernelspecs?1638511749274 HTTP/1.1\r\nHost: 127.0.0.1:8000\r\nAccept-Encoding: gzip\r\n\r\n")
        [(_, uri, headers, _, d)] = self.agent.calls
        self.assertEqual(uri, b"https://hub.example.org:8443/user/alice/api/kernelspecs?1638511749274")
        self.assertIsNone(headers.getRawHeaders(b"accept-encoding"))
        spec = {"default": "python3", "kernelspecs": {"python3": {"name": "python3", "spec": {},
                "resources": {"logo-64x64": "/user/alice/kernelspecs/python3/logo-64x64.png"}}}}
        body = json.dumps(spec).encode()
        response = FakeResponse(200, {b"Content-Type": [b"application/json"]}, length=len(body))
        d.callback(response)
        response.send(body)
        head, _, sent = self.written().partition(b"\r\n\r\n")
        resources = json.loads(sent)["kernelspecs"]["python3"]["resources"]
        self.assertEqual(resources, {"logo-64x64": "/kernelspecs/python3/logo-64x64.png"})
        self.assertIn(b"Content-Length: %d\r\n" % len(sent), head + b"\r\n")

    def test_slow_client_pauses_the_hub(self) -> None:
        self.send(b"GET /files/big HTTP/1.1\r\nHost: 127.0.0.1:8000\r\n\r\n")
        [(_, _, _, _, d)] = self.agent.calls
        response = FakeResponse(200, {}, length=UNKNOWN_LENGTH)
        d.callback(response)
        response.protocol.dataReceived(b"x" * 10)
        client_side = self.transport.producer  # the channel, as the client's transport sees it
        client_side.pauseProducing()  # what the transport does when its write buffer fills
        self.assertTrue(response.upstream.paused)
        client_side.resumeProducing()
        self.assertFalse(response.upstream.paused)

    def test_truncated_upstream_body_aborts_the_client(self) -> None:
        self.send(b"GET /files/big HTTP/1.1\r\nHost: 127.0.0.1:8000\r\n\r\n")
        [(_, _, _, _, d)] = self.agent.calls
        response = FakeResponse(200, {}, length=100)
        d.callback(response)
        response.send(b"x" * 10, end=Failure(ResponseFailed([Failure(ConnectionLost())])))
        self.assertTrue(self.transport.disconnecting or getattr(self.transport, "aborted", False))
        self.assertIn(b"Content-Length: 100\r\n", self.written())

    def test_a_body_that_stalls_aborts_the_client_but_a_slow_client_does_not(self) -> None:
        self.send(b"GET /files/big HTTP/1.1\r\nHost: 127.0.0.1:8000\r\n\r\n")
        [(_, _, _, _, d)] = self.agent.calls
        response = FakeResponse(200, {}, length=100)
        d.callback(response)
        for _ in range(5):  # progress, however slow, keeps it going
            self.reactor.advance(50)
            response.protocol.dataReceived(b"x")
        client_side = self.transport.producer
        client_side.pauseProducing()  # the IDE is slow to read: the hub is not expected to send
        self.reactor.advance(600)
        self.assertFalse(self.transport.disconnecting)
        client_side.resumeProducing()
        self.reactor.advance(59)
        self.assertFalse(self.transport.disconnecting)
        self.reactor.advance(1)
        self.assertTrue(self.transport.disconnecting, "a body silent for 60 s must drop the client")
        self.assertTrue(response.upstream.stopped)
        self.assertTrue(self.written().endswith(b"Content-Length: 100\r\n\r\nxxxxx"))  # 5 of 100: dropped, not ended

    def test_a_small_body_in_one_piece_leaves_no_watch_and_sets_no_timer_of_its_own(self) -> None:
        deadlines = self.site.resource.deadlines
        self.send(b"GET /api/status HTTP/1.1\r\nHost: 127.0.0.1:8000\r\n\r\n")
        timers = {id(c) for c in self.reactor.getDelayedCalls() if c.active()}
        [(_, _, _, _, d)] = self.agent.calls
        response = FakeResponse(200, {b"Content-Type": [b"application/json"]}, length=2)
        d.callback(response)
        self.assertEqual(len(deadlines), 1)  # the stall watch, while the body comes
        response.send(b"{}")
        self.assertEqual(len(deadlines), 0)
        self.assertTrue(self.written().endswith(b"\r\n\r\n{}"))
        self.assertLessEqual({id(c) for c in self.reactor.getDelayedCalls() if c.active()}, timers)

    def test_a_body_read_whole_that_stalls_aborts_the_client(self) -> None:
        self.send(b"GET /api/kernelspecs HTTP/1.1\r\nHost: 127.0.0.1:8000\r\n\r\n")
        [(_, _, _, _, d)] = self.agent.calls
        response = FakeResponse(200, {b"Content-Type": [b"application/json"]}, length=100)
        d.callback(response)
        response.protocol.dataReceived(b'{"default"')
        self.reactor.advance(60)
        self.assertTrue(self.transport.disconnecting)
        self.assertTrue(response.upstream.stopped)
        self.assertEqual(self.written(), b"")

    def test_a_long_path_is_clipped_in_the_dropped_connection_line(self) -> None:
        long = b"/files/" + b"x" * 5000
        with capturedLogs() as events:
            self.send(b"GET " + long + b" HTTP/1.1\r\nHost: 127.0.0.1:8000\r\n\r\n")
            [(_, _, _, _, d)] = self.agent.calls
            response = FakeResponse(200, {}, length=100)
            d.callback(response)
            response.send(b"x" * 10, end=Failure(ResponseFailed([Failure(ConnectionLost())])))
        [line] = [formatEvent(e) for e in events if "connection was dropped" in formatEvent(e)]
        self.assertIn("GET /user/alice/files/xxx", line)
        self.assertIn("...[", line)  # clipped as a refusal's line is: 1 KiB of the path and how much more
        self.assertLess(len(line), 1400)

    def test_client_going_away_stops_the_upstream_body(self) -> None:
        self.send(b"GET /files/big HTTP/1.1\r\nHost: 127.0.0.1:8000\r\n\r\n")
        [(_, _, _, _, d)] = self.agent.calls
        response = FakeResponse(200, {}, length=100)
        d.callback(response)
        response.protocol.dataReceived(b"x" * 10)
        self.channel.connectionLost(Failure(ConnectionLost()))
        self.assertTrue(response.upstream.stopped)

    def test_client_going_away_cancels_the_pending_request(self) -> None:
        self.send(b"GET /api/kernels HTTP/1.1\r\nHost: 127.0.0.1:8000\r\n\r\n")
        self.transport.clear()
        self.channel.connectionLost(Failure(ConnectionLost()))
        self.assertEqual(self.agent.cancelled, [b"https://hub.example.org:8443/user/alice/api/kernels"])
        self.assertEqual(self.written(), b"")

    def fail_every_attempt(self, failure: Failure) -> list[float]:
        """Fail each attempt as it comes while the clock runs on; return when each one came."""
        times: list[float] = []
        while self.reactor.seconds() < 30:
            if len(self.agent.calls) > len(times):
                times.append(self.reactor.seconds())
                self.agent.calls[len(times) - 1][4].errback(failure)
            self.reactor.advance(0.25)
        return times

    def test_unreachable_hub_is_retried_for_ten_seconds_then_502_json(self) -> None:
        self.send(b"GET /api/kernels HTTP/1.1\r\nHost: 127.0.0.1:8000\r\n\r\n")
        with capturedLogs() as events:
            attempts = self.fail_every_attempt(Failure(ConnectionRefusedError()))
        self.assertEqual(attempts, [0.0, 0.5, 1.5, 3.5, 7.5, 10.0])
        head, _, body = self.written().partition(b"\r\n\r\n")
        self.assertTrue(head.startswith(b"HTTP/1.1 502 "))
        error = json.loads(body)
        self.assertEqual(error["reason"], "hub-unreachable")
        self.assertIn("127.0.0.1:8443", error["message"])
        lost = [formatEvent(e) for e in events if formatEvent(e).startswith("hub link lost")]
        self.assertEqual(len(lost), 1, lost)
        self.assertEqual(self.site.stats.retried_requests, 1)

    def test_get_that_met_a_broken_link_is_answered_once_the_link_is_back(self) -> None:
        self.send(b"GET /api/contents HTTP/1.1\r\nHost: 127.0.0.1:8000\r\n\r\n")
        for _ in range(2):
            self.agent.calls[-1][4].errback(Failure(ResponseNeverReceived([Failure(ConnectionLost())])))
            self.assertEqual(self.written(), b"")
            self.reactor.advance(2)
        self.assertEqual(len(self.agent.calls), 3)
        self.assertEqual({call[1] for call in self.agent.calls}, {b"https://hub.example.org:8443/user/alice/api/contents"})
        response = FakeResponse(200, {}, length=2)
        with capturedLogs() as events:
            self.agent.calls[-1][4].callback(response)
        response.send(b"{}")
        self.assertTrue(self.written().startswith(b"HTTP/1.1 200 "))
        self.assertEqual([formatEvent(e) for e in events if "hub link back" in formatEvent(e)],
                         ["hub link back after 4.0 s; 2 request attempts retried, 0 WebSockets reconnected."])

    def test_post_that_may_have_reached_the_hub_is_never_replayed(self) -> None:
        self.send(b"POST /api/contents/dir HTTP/1.1\r\nHost: 127.0.0.1:8000\r\nContent-Length: 2\r\n\r\n{}")
        self.agent.calls[0][4].errback(Failure(ResponseNeverReceived([Failure(ConnectionLost())])))
        self.assertTrue(self.written().startswith(b"HTTP/1.1 502 "))
        self.reactor.advance(10)
        self.assertEqual(len(self.agent.calls), 1)
        self.assertEqual(self.site.stats.retried_requests, 0)

    def test_post_never_sent_goes_again_with_its_whole_body(self) -> None:
        self.send(b"POST /api/contents/dir HTTP/1.1\r\nHost: 127.0.0.1:8000\r\nContent-Length: 10\r\n\r\n{\"a\": ")
        self.assertEqual(self.agent.calls[0][3].length, 10)  # sent before the body is all there
        self.agent.calls[0][4].errback(Failure(ConnectionRefusedError()))
        self.send(b'"b"}')
        self.reactor.advance(0.5)
        [_, (method, _, _, body, d)] = self.agent.calls
        self.assertEqual(method, b"POST")
        consumer = Collected()
        body.startProducing(consumer).addCallback(consumer.done)
        self.assertEqual((body.length, b"".join(consumer.data), consumer.ended), (10, b'{"a": "b"}', True))
        response = FakeResponse(201, {}, length=0)
        d.callback(response)
        response.send()
        self.assertTrue(self.written().startswith(b"HTTP/1.1 201 "))

    def test_client_gone_while_waiting_to_retry_ends_the_retries(self) -> None:
        self.send(b"GET /api/kernels HTTP/1.1\r\nHost: 127.0.0.1:8000\r\n\r\n")
        self.agent.calls[0][4].errback(Failure(ConnectionRefusedError()))
        self.reactor.advance(0)  # the outage's one log line
        # the retry (the connection's own deadline timer is further off: nothing is due while a request is served)
        self.assertEqual(len([c for c in self.reactor.getDelayedCalls() if c.getTime() < 5]), 1)
        self.channel.connectionLost(Failure(ConnectionLost()))
        # no retry is pending; the shared deadline timer may stay set (lazily): it finds nothing due
        pending = [c for c in self.reactor.getDelayedCalls() if c.active()]
        self.assertEqual([c for c in pending if c.func.__name__ != "_fire"], [])
        self.assertEqual(len(self.site.resource.deadlines), 0)
        self.reactor.advance(10)
        self.assertEqual(len(self.agent.calls), 1)
        self.assertEqual(self.written(), b"")
        self.reactor.advance(600)
        self.assertEqual([c for c in self.reactor.getDelayedCalls() if c.active()], [])
        self.assertEqual(len(self.agent.calls), 1)
        self.assertEqual(self.written(), b"")

    def test_hub_that_took_the_request_and_never_answered_is_not_retried(self) -> None:
        self.send(b"GET /api/kernels HTTP/1.1\r\nHost: 127.0.0.1:8000\r\n\r\n")
        self.agent.calls[0][4].errback(Failure(TimeoutError()))
        self.assertTrue(self.written().startswith(b"HTTP/1.1 504 "))
        self.assertEqual(len(self.agent.calls), 1)

    def test_refused_paths_never_reach_the_hub(self) -> None:
        for path, status in ((b"/hub/api", b"404"), (b"/../user/bob/", b"400"), (b"/a/%2e%2e/%2e%2e/x", b"400")):
            self.transport.clear()
            self.send(b"GET " + path + b" HTTP/1.1\r\nHost: 127.0.0.1:8000\r\n\r\n")
            head, _, body = self.written().partition(b"\r\n\r\n")
            self.assertTrue(head.startswith(b"HTTP/1.1 " + status), head)
            self.assertIn("message", json.loads(body))
        self.assertEqual(self.agent.calls, [])

    def test_repeated_request_headers_keep_every_value(self) -> None:
        self.send(b"GET /api/x HTTP/1.1\r\nHost: 127.0.0.1:8000\r\nX-A: 1\r\nX-A: 2\r\n\r\n")
        [(_, _, headers, _, _)] = self.agent.calls
        self.assertEqual(headers.getRawHeaders(b"x-a"), [b"1", b"2"])



ROOTED = HubTarget(host="127.0.0.1", port=8443, user="alice", tls_name="hub.example.org", root="work/proj")


class RootedProxyTests(SynchronousTestCase):
    """``--root``: paths in URLs and JSON bodies under the folder on the way in, taken off on the way out."""

    target = ROOTED
    setUp = ProxyResourceTests.setUp
    connect = ProxyResourceTests.connect

    def request(self, method: bytes, path: bytes, body: bytes | None = None) -> tuple:
        """Send one request on a new connection and return the hub request it made."""
        self.connect()
        head = method + b" " + path + b" HTTP/1.1\r\nHost: 127.0.0.1:8000\r\n"
        if body is not None:
            head += b"Content-Length: %d\r\n" % len(body)
        self.channel.dataReceived(head + b"\r\n" + (body or b""))
        [call] = self.agent.calls
        self.agent.calls.clear()
        return call

    @staticmethod
    def body_of(producer) -> bytes:
        """What the producer would send (a file's is read: its cooperator needs a running reactor)."""
        if not hasattr(producer, "_inputFile"):  # a body streamed as it arrived (jds.upload)
            consumer = Collected()
            producer.startProducing(consumer)
            return b"".join(consumer.data)
        source = producer._inputFile
        source.seek(0)
        body = source.read()
        source.seek(0)
        return body

    def answer(self, d: Deferred, code: int, document: object, headers: dict | None = None) -> tuple[bytes, bytes]:
        body = json.dumps(document).encode()
        response = FakeResponse(
            code, {b"Content-Type": [b"application/json"], **(headers or {})}, length=len(body)
        )
        d.callback(response)
        response.send(body)
        head, _, sent = self.transport.value().partition(b"\r\n\r\n")
        return head, sent

    def test_vscode_session_goes_into_the_folder_and_comes_back_without_it(self) -> None:
        model = {"path": "nb-jvsc-7f3e.ipynb", "type": "notebook", "name": "nb.ipynb", "kernel": {"name": "python3"}}
        method, uri, _, producer, d = self.request(b"POST", b"/api/sessions", json.dumps(model).encode())
        self.assertEqual(uri, b"https://hub.example.org:8443/user/alice/api/sessions")
        sent_up = self.body_of(producer)
        self.assertEqual(producer.length, len(sent_up))
        self.assertEqual(json.loads(sent_up), {**model, "path": "work/proj/nb-jvsc-7f3e.ipynb"})
        session = {"id": "s1", "path": "work/proj/nb-jvsc-7f3e.ipynb", "type": "notebook", "name": "nb.ipynb",
                   "kernel": {"id": "k1", "name": "python3"}, "notebook": {"path": "work/proj/nb-jvsc-7f3e.ipynb"}}
        head, sent = self.answer(d, 201, session, {b"Location": [b"/user/alice/api/sessions/s1"]})
        self.assertIn(b"Location: /api/sessions/s1\r\n", head + b"\r\n")
        self.assertIn(b"Content-Length: %d\r\n" % len(sent), head + b"\r\n")
        back = json.loads(sent)
        self.assertEqual((back["path"], back["notebook"]["path"]), ("nb-jvsc-7f3e.ipynb", "nb-jvsc-7f3e.ipynb"))

    def test_listing_paths_lose_the_folder(self) -> None:
        _, uri, headers, _, d = self.request(b"GET", b"/api/contents?content=1")
        self.assertEqual(uri, b"https://hub.example.org:8443/user/alice/api/contents/work/proj?content=1")
        listing = {"name": "proj", "path": "work/proj", "type": "directory",
                   "content": [{"name": "a.csv", "path": "work/proj/a.csv", "type": "file", "content": None}]}
        _, sent = self.answer(d, 200, listing)
        back = json.loads(sent)
        self.assertEqual((back["name"], back["path"], back["content"][0]["path"]), ("", "", "a.csv"))

    def test_new_terminal_starts_in_the_folder(self) -> None:
        _, uri, _, producer, _ = self.request(b"POST", b"/api/terminals", b"")
        self.assertEqual(uri, b"https://hub.example.org:8443/user/alice/api/terminals")
        self.assertEqual(json.loads(self.body_of(producer)), {"cwd": "work/proj"})
        _, _, _, producer, _ = self.request(b"POST", b"/api/terminals", b'{"cwd": "sub"}')
        self.assertEqual(json.loads(self.body_of(producer)), {"cwd": "work/proj/sub"})

    def test_a_body_too_large_to_map_is_refused_not_passed(self) -> None:
        """A body whose paths must be mapped and cannot be (over 8 MiB) never reaches the hub unmapped."""
        for method, path in ((b"POST", b"/api/contents/"), (b"PATCH", b"/api/contents/data.csv"),
                             (b"POST", b"/api/terminals"), (b"POST", b"/api/sessions"), (b"POST", b"/api/kernels")):
            self.connect()
            head = method + b" " + path + b" HTTP/1.1\r\nHost: 127.0.0.1:8000\r\n"
            self.channel.dataReceived(head + b"Content-Length: %d\r\n\r\n" % (MAX_REWRITTEN_BODY + 1))
            status, _, sent = self.transport.value().partition(b"\r\n\r\n")
            self.assertTrue(status.startswith(b"HTTP/1.1 413 "), (path, status))
            self.assertEqual(json.loads(sent)["reason"], "body-too-large")
            self.assertIn(b"--root", sent)
            self.assertIsNone(self.channel.requests[-1].content, "refused from the headers: nothing spooled")
        # a chunked one is cut once it passes the bound, before any of it goes to the hub
        self.connect()
        self.channel.dataReceived(
            b"POST /api/contents/ HTTP/1.1\r\nHost: 127.0.0.1:8000\r\nTransfer-Encoding: chunked\r\n\r\n"
        )
        piece = b'{"copy_from": "../secret.txt", "pad": "' + b"x" * (1 << 20)
        self.channel.dataReceived(b"%x\r\n" % len(piece) + piece + b"\r\n")
        self.assertEqual(self.transport.value(), b"")
        filler = b"x" * (1 << 20)
        for _ in range(8):
            self.channel.dataReceived(b"%x\r\n" % len(filler) + filler + b"\r\n")
        status, _, sent = self.transport.value().partition(b"\r\n\r\n")
        self.assertTrue(status.startswith(b"HTTP/1.1 413 "), status)
        self.assertEqual(self.agent.calls, [])

    def test_a_kernels_path_goes_into_the_folder(self) -> None:
        _, _, _, producer, _ = self.request(b"POST", b"/api/kernels", b'{"name": "python3", "path": "sub"}')
        self.assertEqual(json.loads(self.body_of(producer)), {"name": "python3", "path": "work/proj/sub"})
        _, _, _, producer, _ = self.request(b"POST", b"/api/kernels", b'{"name": "python3"}')
        self.assertEqual(json.loads(self.body_of(producer)), {"name": "python3", "path": "work/proj"})
        for body in (b'{"name": "python3", "path": "../.."}', b'{"path": "sub/../../x"}'):
            self.connect()
            self.channel.dataReceived(
                b"POST /api/kernels HTTP/1.1\r\nHost: 127.0.0.1:8000\r\nContent-Length: %d\r\n\r\n" % len(body)
                + body
            )
            status, _, sent = self.transport.value().partition(b"\r\n\r\n")
            self.assertTrue(status.startswith(b"HTTP/1.1 400 "), (body, status))
            self.assertEqual(json.loads(sent)["reason"], "outside-root")
        self.assertEqual(self.agent.calls, [])

    def test_bad_json_goes_as_it_came(self) -> None:
        _, _, _, producer, _ = self.request(b"POST", b"/api/sessions", b"{not json")
        self.assertEqual(self.body_of(producer), b"{not json")

    def test_the_servers_own_view_is_not_mapped(self) -> None:
        # JupyterLab's pages use the user's prefix: those paths are the server's, not the IDE's
        model = b'{"path": "other/nb.ipynb", "type": "notebook"}'
        _, uri, _, producer, d = self.request(b"POST", b"/user/alice/api/sessions", model)
        self.assertEqual(uri, b"https://hub.example.org:8443/user/alice/api/sessions")
        self.assertEqual(self.body_of(producer), model)
        _, sent = self.answer(d, 201, {"id": "s", "path": "other/nb.ipynb"})
        self.assertEqual(json.loads(sent)["path"], "other/nb.ipynb")

    def test_escapes_are_refused_locally(self) -> None:
        for method, path, body in (
            (b"GET", b"/api/contents/../secret", None),
            (b"GET", b"/files/%2e%2e/secret", None),
            (b"GET", b"/api/contents/..%2Fsecret", None),
            (b"POST", b"/api/sessions", b'{"path": "../nb.ipynb", "type": "notebook"}'),
            (b"POST", b"/api/terminals", b'{"cwd": "../.."}'),
            (b"PATCH", b"/api/contents/a.txt", b'{"path": "../a.txt"}'),
        ):
            self.transport.clear()
            head = method + b" " + path + b" HTTP/1.1\r\nHost: 127.0.0.1:8000\r\n"
            if body is not None:
                head += b"Content-Length: %d\r\n" % len(body)
            self.channel.dataReceived(head + b"\r\n" + (body or b""))
            status, _, sent = self.transport.value().partition(b"\r\n\r\n")
            self.assertTrue(status.startswith(b"HTTP/1.1 400 "), (path, status))
            self.assertIn(json.loads(sent)["reason"], ("outside-root", "bad-path"))
        self.assertEqual(self.agent.calls, [])

    def test_large_models_stream_with_their_path_mapped(self) -> None:
        _, _, _, _, d = self.request(b"GET", b"/api/contents/big.txt?content=1")
        content = "y" * (MAX_REWRITTEN_BODY + 1)
        body = json.dumps({"name": "big.txt", "path": "work/proj/big.txt", "content": content, "type": "file"})
        response = FakeResponse(200, {b"Content-Type": [b"application/json"]}, length=len(body))
        d.callback(response)
        response.protocol.dataReceived(body[:30].encode())
        self.assertEqual(self.transport.value(), b"", "the head is held until the path is complete")
        response.send(body[30:].encode())
        head, _, sent = self.transport.value().partition(b"\r\n\r\n")
        self.assertIn(b"Transfer-Encoding: chunked", head)
        self.assertNotIn(b"Content-Length", head)
        self.assertIn(b'{"name": "big.txt", "path": "big.txt", "content": "yyy', sent)
        self.assertNotIn(b"work/proj", sent)

    def test_other_answers_stream_untouched(self) -> None:
        _, _, _, _, d = self.request(b"GET", b"/files/work.json")
        response = FakeResponse(200, {b"Content-Type": [b"application/json"]}, length=29)
        d.callback(response)
        response.send(b'{"path": "work/proj/big.txt"}')
        self.assertTrue(self.transport.value().endswith(b'\r\n\r\n{"path": "work/proj/big.txt"}'))
class ResponseTimeoutTests(SynchronousTestCase):
    """--response-timeout cuts a plain request; a kernel start has its own, longer limit and a log line a minute."""

    def setUp(self) -> None:
        from twisted.logger import globalLogPublisher

        from jds.proxy import ResponseTimeouts

        self.reactor = MemoryReactorClock()
        self.agent = RecordingAgent()
        policy = HubTLSPolicy(self.reactor, TARGET.host, TARGET.port, TARGET.verify_name, None)
        resource = HubProxyResource(
            TARGET, policy, self.reactor, agent=self.agent, timeouts=ResponseTimeouts(5, 600, 60)
        )
        self.site = LocalSite(resource, reactor=self.reactor)
        self.events: list[dict] = []
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)

    def request(self, raw: bytes) -> StringTransport:
        channel = self.site.buildProtocol(None)
        transport = StringTransport()
        channel.makeConnection(transport)
        channel.dataReceived(raw)
        return transport

    def waiting_lines(self) -> list[str]:
        from twisted.logger import formatEvent

        return [formatEvent(e) for e in self.events if "still waiting for the kernel" in e.get("log_format", "")]

    def test_plain_request_gets_504_naming_the_option(self) -> None:
        transport = self.request(b"GET /api/contents HTTP/1.1\r\nHost: 127.0.0.1:8000\r\n\r\n")
        self.reactor.advance(4.9)
        self.assertEqual(transport.value(), b"")
        self.reactor.advance(0.2)
        self.assertIn(b" 504 ", transport.value())
        self.assertIn(b"within 5 s (--response-timeout)", transport.value())
        self.assertEqual(self.waiting_lines(), [])

    def test_limits_share_one_timer_and_each_fires_at_its_own_time(self) -> None:
        kernel = self.request(b"POST /api/sessions HTTP/1.1\r\nHost: 127.0.0.1:8000\r\nContent-Length: 2\r\n\r\n{}")
        self.reactor.advance(3)
        plain = self.request(b"GET /api/contents HTTP/1.1\r\nHost: 127.0.0.1:8000\r\n\r\n")
        answered = self.request(b"GET /api/status HTTP/1.1\r\nHost: 127.0.0.1:8000\r\n\r\n")
        answer = FakeResponse(200, {b"Content-Type": [b"application/json"]}, length=2)
        self.agent.calls[2][4].callback(answer)
        answer.send(b"{}")
        self.reactor.advance(4.9)
        self.assertEqual(plain.value(), b"")
        self.reactor.advance(0.2)
        self.assertIn(b"within 5 s (--response-timeout)", plain.value())
        self.assertIn(b" 200 ", answered.value())
        self.assertNotIn(b" 504 ", answered.value())
        self.reactor.advance(600 - 8.1 - 0.1)
        self.assertEqual(kernel.value(), b"")
        self.reactor.advance(0.2)
        self.assertIn(b"within 600 s (--kernel-start-timeout)", kernel.value())

    def test_kernel_start_waits_longer_and_says_so_every_minute(self) -> None:
        transport = self.request(b"POST /api/sessions HTTP/1.1\r\nHost: 127.0.0.1:8000\r\nContent-Length: 2\r\n\r\n{}")
        for _ in range(3):
            self.reactor.advance(60)
        self.assertEqual(transport.value(), b"")
        lines = self.waiting_lines()
        self.assertEqual(len(lines), 3)
        self.assertIn("POST /user/alice/api/sessions: still waiting for the kernel to start (3 min so far", lines[-1])
        self.assertIn("--kernel-start-timeout", lines[-1])
        [(_, _, _, _, d)] = self.agent.calls
        response = FakeResponse(201, {b"Content-Type": [b"application/json"]}, length=2)
        d.callback(response)
        response.send(b"{}")
        self.reactor.advance(120)
        self.assertEqual(len(self.waiting_lines()), 3)  # the ticker stopped with the answer
        self.assertIn(b" 201 ", transport.value())

    def test_a_long_kernel_path_is_clipped_in_the_waiting_line(self) -> None:
        kernel = b"k" * 5000
        self.request(b"POST /api/kernels/" + kernel + b"/restart HTTP/1.1\r\nHost: 127.0.0.1:8000\r\nContent-Length: 0\r\n\r\n")
        self.reactor.advance(60)
        [line] = self.waiting_lines()
        self.assertIn("POST /user/alice/api/kernels/kkk", line)
        self.assertIn(f"...[{len('/user/alice/api/kernels/') + 5000 + len('/restart') - 1024} more]", line)
        self.assertIn("--kernel-start-timeout", line)

    def test_kernel_start_is_cut_at_its_own_limit(self) -> None:
        transport = self.request(b"POST /api/kernels/abc/restart HTTP/1.1\r\nHost: 127.0.0.1:8000\r\nContent-Length: 0\r\n\r\n")
        self.reactor.advance(599)
        self.assertEqual(transport.value(), b"")
        self.reactor.advance(2)
        self.assertIn(b"within 600 s (--kernel-start-timeout)", transport.value())

    def test_no_token_403_names_the_real_port(self) -> None:
        from jds.auth import Credentials

        policy = HubTLSPolicy(self.reactor, TARGET.host, TARGET.port, TARGET.verify_name, None)
        resource = HubProxyResource(TARGET, policy, self.reactor, agent=self.agent, credentials=Credentials("hub", "local"))
        site = LocalSite(resource, reactor=self.reactor)
        channel = site.buildProtocol(None)
        from twisted.internet.address import IPv4Address

        transport = StringTransport(hostAddress=IPv4Address("TCP", "127.0.0.1", 8765))
        channel.makeConnection(transport)
        channel.dataReceived(b"GET /api/contents HTTP/1.1\r\nHost: 127.0.0.1:8765\r\n\r\n")
        self.assertIn(b" 403 ", transport.value())
        self.assertIn(b"http://127.0.0.1:8765/?token=...", transport.value())
        self.assertNotIn(b"PORT", transport.value())


def test_headers_are_built_as_twisted_builds_them() -> None:
    from jds.proxy import _headers

    pairs = [(b"x-thing", b"a\r\nb"), (b"Etag", b"1"), (b"set-cookie", b"a=1"), (b"Set-Cookie", b"b=2"), (b"Te", b"x\n")]
    built = _headers(pairs)
    expected = Headers()
    for name, value in pairs:
        expected.addRawHeader(name, value)
    assert list(built.getAllRawHeaders()) == list(expected.getAllRawHeaders())
    assert built.getRawHeaders(b"x-thing") == [b"a b"]
    assert built.getRawHeaders(b"set-cookie") == [b"a=1", b"b=2"]
