"""The local port's defences, in memory: Host and Origin checks, the header deadline, bad requests."""

from __future__ import annotations

import json

from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import formatEvent, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.resource import Resource

from jds.guard import LocalGuard
from jds.site import LocalSite


class Hello(Resource):
    isLeaf = True

    def render(self, request):
        return b"hello"


class GuardTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = MemoryReactorClock()
        guard = LocalGuard.build(["jds.internal"], ["http://localhost:3000"])
        guard.listening("127.0.0.1", 8000)
        self.site = LocalSite(Hello(), guard=guard, header_timeout=5, reactor=self.clock)
        self.events: list[dict] = []
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)

    def connect(self) -> tuple[object, StringTransport]:
        channel = self.site.buildProtocol(None)
        transport = StringTransport()
        channel.makeConnection(transport)
        return channel, transport

    def ask(self, head: bytes) -> tuple[bytes, bytes]:
        channel, transport = self.connect()
        channel.dataReceived(head)
        status, _, rest = transport.value().partition(b"\r\n")
        return status, rest.partition(b"\r\n\r\n")[2]

    def test_own_names_pass(self) -> None:
        for host in (b"127.0.0.1:8000", b"localhost:8000", b"[::1]:8000", b"localhost", b"jds.internal:9"):
            status, body = self.ask(b"GET / HTTP/1.1\r\nHost: " + host + b"\r\n\r\n")
            self.assertEqual((status, body), (b"HTTP/1.1 200 OK", b"hello"), host)

    def test_rebinding_host_is_refused(self) -> None:
        for host in (b"evil.example:8000", b"127.0.0.1:9999", b"localhost.evil.example"):
            status, body = self.ask(b"GET /api/kernels HTTP/1.1\r\nHost: " + host + b"\r\n\r\n")
            self.assertEqual(status, b"HTTP/1.1 403 Forbidden", host)
            self.assertEqual(json.loads(body)["reason"], "host-refused")
        status, _ = self.ask(b"GET / HTTP/1.1\r\nHost: 127.0.0.1:8000\r\nHost: evil.example\r\n\r\n")
        self.assertEqual(status, b"HTTP/1.1 403 Forbidden")

    def test_a_host_that_passed_is_judged_again_once_the_port_changes(self) -> None:
        """Passed Host values are remembered (parsing one is most of the check's cost), never past a new port."""
        for _ in range(2):
            status, _ = self.ask(b"GET / HTTP/1.1\r\nHost: localhost:8000\r\n\r\n")
            self.assertEqual(status, b"HTTP/1.1 200 OK")
        self.site.guard.listening("127.0.0.1", 8001)
        status, body = self.ask(b"GET / HTTP/1.1\r\nHost: localhost:8000\r\n\r\n")
        self.assertEqual(status, b"HTTP/1.1 403 Forbidden")
        self.assertEqual(json.loads(body)["reason"], "host-refused")
        status, _ = self.ask(b"GET / HTTP/1.1\r\nHost: localhost:8001\r\n\r\n")
        self.assertEqual(status, b"HTTP/1.1 200 OK")

    def test_foreign_origin_is_refused(self) -> None:
        base = b"GET /api/kernels HTTP/1.1\r\nHost: 127.0.0.1:8000\r\nOrigin: "
        for origin, expected in (
            (b"http://127.0.0.1:8000", b"HTTP/1.1 200 OK"),
            (b"http://localhost:3000", b"HTTP/1.1 200 OK"),
            (b"https://evil.example", b"HTTP/1.1 403 Forbidden"),
            (b"null", b"HTTP/1.1 403 Forbidden"),
            (b"http://127.0.0.1:9999", b"HTTP/1.1 403 Forbidden"),
        ):
            status, body = self.ask(base + origin + b"\r\n\r\n")
            self.assertEqual(status, expected, origin)
            if expected.endswith(b"Forbidden"):
                self.assertEqual(json.loads(body)["reason"], "origin-refused")
                self.assertIn("--allow-origin", json.loads(body)["message"])

    def test_trickled_headers_are_cut_off(self) -> None:
        channel, transport = self.connect()
        channel.dataReceived(b"GET / HTTP/1.1\r\n")
        for _ in range(4):
            self.clock.advance(1)
            channel.dataReceived(b"X: y\r\n")  # each byte resets the idle timeout, not this one
        self.assertFalse(transport.disconnecting)
        self.clock.advance(1.5)
        self.assertTrue(transport.value().startswith(b"HTTP/1.1 408"))
        self.assertTrue(transport.disconnecting)
        self.assertTrue(any("did not send its request headers" in str(e.get("log_format")) for e in self.events))

    def test_idle_keep_alive_is_not_the_header_deadline(self) -> None:
        channel, transport = self.connect()
        channel.dataReceived(b"GET / HTTP/1.1\r\nHost: 127.0.0.1:8000\r\n\r\n")
        self.clock.advance(30)  # past the header deadline, within the idle timeout
        self.assertFalse(transport.disconnecting)
        channel.dataReceived(b"GET / HTTP/1.1\r\nHost: 127.0.0.1:8000\r\n\r\n")
        self.assertEqual(transport.value().count(b"HTTP/1.1 200 OK"), 2)

    def test_malformed_requests_are_logged(self) -> None:
        for head in (
            b"GARBAGE\r\n\r\n",
            b"GET / HTTP/1.1\r\n" + b"X-Big: " + b"a" * 100_000 + b"\r\n\r\n",
            b"GET / HTTP/1.1\r\n" + b"".join(b"X-%d: y\r\n" % i for i in range(1000)) + b"\r\n",
        ):
            self.events.clear()
            channel, transport = self.connect()
            channel.dataReceived(head)
            self.assertTrue(transport.value().startswith(b"HTTP/1.1 400"), head[:20])
            lines = [e for e in self.events if "malformed" in str(e.get("log_format"))]
            self.assertEqual(len(lines), 1)

    def lines(self, words: str) -> list[str]:
        return [formatEvent(e) for e in self.events if words in (formatEvent(e) or "")]

    def test_a_burst_of_malformed_requests_is_collapsed_like_refusals(self) -> None:
        """Three lines, then one per 10 s with the count; another malformed request has lines of its own."""
        for _ in range(50):
            status, _ = self.ask(b"GET /api HTTP/1.1\r\nX A: b\r\n\r\n")
            self.assertEqual(status, b"HTTP/1.1 400 Bad Request")  # every one is still answered
        status, _ = self.ask(b"GET /api HTTP/1.1\r\nX-A\x00: b\r\n\r\n")
        self.assertEqual(status, b"HTTP/1.1 400 Bad Request")
        self.clock.advance(10)
        self.clock.advance(30)
        same = self.lines("'X A' is not an HTTP token")
        self.assertEqual(len(same), 4, same)
        self.assertTrue(all(line.startswith("Refused a malformed HTTP request from ") for line in same[:3]), same)
        self.assertTrue(same[3].startswith("Refused the same malformed HTTP request 47 more time(s) in 10 s"), same)
        self.assertEqual(len(self.lines("'X-A\\x00' is not an HTTP token")), 1)

    def test_a_burst_of_clients_too_slow_with_their_headers_is_collapsed(self) -> None:
        transports = []
        for _ in range(20):
            channel, transport = self.connect()
            channel.dataReceived(b"GET / HTTP/1.1\r\n")
            transports.append(transport)
        self.clock.advance(5.5)
        self.assertTrue(all(t.value().startswith(b"HTTP/1.1 408") for t in transports))
        self.clock.advance(10)
        dropped = self.lines("did not send")
        self.assertEqual(len(dropped), 4, dropped)
        self.assertTrue(all(line.startswith("Dropped a client (") for line in dropped[:3]), dropped)
        self.assertTrue(dropped[3].startswith("Dropped 17 more client(s) in 10 s that did not send their request "
                                              "headers within 5 s."), dropped)

    def test_control_characters_in_headers_are_refused_whatever_the_twisted(self) -> None:
        """
        Twisted before 26.10 stores these header values as sent; the guard refuses them itself,
        with the JSON every refusal has, before the resource (here: the hub) sees the request.
        """
        rendered: list[bytes] = []
        self.site.resource.render = lambda request: rendered.append(request.uri) or b"hello"
        head = b"GET /api/status HTTP/1.1\r\nHost: 127.0.0.1:8000\r\n"
        for header in (
            b"Authorization: token s3cret\x00b",
            b"Authorization: token s3cret\rX-Injected: yes",
            b"Authorization: token s3cret\nX-Injected: yes",
            b"X A: b",
            b"X-A\x00: b",
            b"X-A : b",
        ):
            self.events.clear()
            channel, transport = self.connect()
            channel.dataReceived(head + header + b"\r\nX-After: 1\r\n\r\nGET / HTTP/1.1\r\n\r\n")
            status, _, rest = transport.value().partition(b"\r\n")
            self.assertEqual(status, b"HTTP/1.1 400 Bad Request", header)
            answer = json.loads(rest.partition(b"\r\n\r\n")[2])
            self.assertEqual(answer["reason"], "malformed-request", header)
            self.assertIn("RFC 9110", answer["message"])
            self.assertIn(b"Connection: close", rest)
            self.assertTrue(transport.disconnecting, header)
            logged = [e for e in self.events if e.get("log_level") is not None and e.get("log_namespace") == "jds"]
            self.assertEqual(len(logged), 1, header)
            self.assertIn("Refused a malformed HTTP request from", formatEvent(logged[0]))
            self.assertNotIn("s3cret", formatEvent(logged[0]) + answer["message"])
        self.assertEqual(rendered, [])

    def test_twisteds_own_bad_request_gets_the_json_answer(self) -> None:
        for head in (
            b"GARBAGE\r\n\r\n",
            b"GET /api/a\x00b HTTP/1.1\r\nHost: 127.0.0.1:8000\r\n\r\n",
            b"G(T /api/status HTTP/1.1\r\nHost: 127.0.0.1:8000\r\n\r\n",
            b"GET /api/status HTTP/9.9\r\nHost: 127.0.0.1:8000\r\n\r\n",
        ):
            channel, transport = self.connect()
            channel.dataReceived(head)
            status, _, rest = transport.value().partition(b"\r\n")
            self.assertEqual(status, b"HTTP/1.1 400 Bad Request", head)
            self.assertEqual(json.loads(rest.partition(b"\r\n\r\n")[2])["reason"], "malformed-request")

    def test_a_header_deadline_longer_than_twisteds_idle_timeout_still_answers_408(self) -> None:
        """--header-timeout past twisted.web's own idle timeout (60 s): one deadline, and a 408 at its end."""
        self.site.header_timeout = 90
        channel = self.site.buildProtocol(None)  # with twisted.web's idle timeout, as in the daemon
        transport = StringTransport()
        channel.makeConnection(transport)
        channel.dataReceived(b"GET / HTTP/1.1\r\n")
        self.clock.advance(61)
        self.assertEqual((transport.value(), transport.disconnecting), (b"", False))
        self.clock.advance(29.5)
        self.assertTrue(transport.value().startswith(b"HTTP/1.1 408"))
        self.assertTrue(transport.disconnecting)

    def test_silent_connection_is_cut_off(self) -> None:
        channel, transport = self.connect()
        self.clock.advance(4.9)
        self.assertFalse(transport.disconnecting)
        self.clock.advance(0.2)
        self.assertTrue(transport.value().startswith(b"HTTP/1.1 408"))
        self.assertTrue(transport.disconnecting)

    def test_a_keep_alive_connection_holds_one_timer_whatever_its_requests(self) -> None:
        """The deadlines of every phase share one timer: requests do not pile timers up in the reactor."""
        self.site.timeOut = 60  # twisted.web's idle timeout, taken over by the channel
        channel, transport = self.connect()
        for _ in range(50):
            channel.dataReceived(b"GET / HTTP/1.1\r\nHost: 127.0.0.1:8000\r\n\r\n")
            self.clock.advance(0.5)
            self.assertEqual(len(self.clock.getDelayedCalls()), 1)
        self.assertEqual(transport.value().count(b"HTTP/1.1 200 OK"), 50)
        self.clock.advance(59)  # idle since the last answer, 0.5 s ago
        self.assertFalse(transport.disconnecting)
        self.clock.advance(1)
        self.assertTrue(transport.disconnecting)
        self.assertEqual(transport.value().count(b"HTTP/1.1"), 50)  # closed quietly, no answer

    def test_headers_after_a_long_idle_wait_get_their_own_deadline(self) -> None:
        """The header deadline is sooner than the idle one it follows: the shared timer moves up for it."""
        self.site.timeOut = 600
        channel, transport = self.connect()
        channel.dataReceived(b"GET / HTTP/1.1\r\nHost: 127.0.0.1:8000\r\n\r\n")
        self.clock.advance(100)  # past the first request's header deadline: the timer now waits for the idle one
        channel.dataReceived(b"GET / HTTP/1.1\r\n")
        self.clock.advance(4.9)
        self.assertFalse(transport.disconnecting)
        self.clock.advance(0.2)
        self.assertIn(b"HTTP/1.1 408", transport.value())
        self.assertTrue(transport.disconnecting)


class PhaseDeadlineTests(SynchronousTestCase):
    def setUp(self) -> None:
        from twisted.internet.task import Clock

        from jds.guard import PhaseDeadline

        self.clock = Clock()
        self.expired: list[tuple[str, float]] = []
        self.deadline = PhaseDeadline(
            self.clock.callLater, self.clock.seconds, lambda phase: self.expired.append((phase, self.clock.seconds()))
        )

    def test_a_phase_expires_at_its_deadline(self) -> None:
        self.deadline.start("headers", 5)
        self.clock.advance(4.99)
        self.assertEqual(self.expired, [])
        self.clock.advance(0.01)
        self.assertEqual(self.expired, [("headers", 5)])
        self.assertIsNone(self.deadline.phase)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_a_later_deadline_reuses_the_timer(self) -> None:
        self.deadline.start("body", 5)
        [timer] = self.clock.getDelayedCalls()
        self.clock.advance(2)
        self.deadline.start("body", 5)  # a piece of the body arrived: 5 s from now
        self.assertEqual(self.clock.getDelayedCalls(), [timer])  # not moved: it fires at 5 and is set again
        for _ in range(2):
            self.clock.advance(2)
            self.deadline.start("body", 5)
            self.assertEqual(len(self.clock.getDelayedCalls()), 1)
        self.clock.advance(4.9)
        self.assertEqual(self.expired, [])
        self.clock.advance(0.1)
        self.assertEqual(self.expired, [("body", 11)])

    def test_a_sooner_deadline_moves_the_timer(self) -> None:
        self.deadline.start("idle", 100)
        self.clock.advance(1)
        self.deadline.start("headers", 5)
        self.clock.advance(5)
        self.assertEqual(self.expired, [("headers", 6)])

    def test_a_stopped_phase_never_expires(self) -> None:
        self.deadline.start("headers", 5)
        self.deadline.stop("body")  # another phase's stop leaves it running
        self.assertEqual(self.deadline.phase, "headers")
        self.deadline.stop("headers")
        self.clock.advance(10)
        self.assertEqual((self.expired, self.clock.getDelayedCalls()), ([], []))
        self.deadline.start("idle", 3)
        self.clock.advance(3)
        self.assertEqual(self.expired, [("idle", 13)])

    def test_cancel_takes_the_timer_away(self) -> None:
        self.deadline.start("headers", 5)
        self.deadline.cancel()
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.clock.advance(10)
        self.assertEqual(self.expired, [])
