"""
The security audit's fixes (issue #12) in memory: the channel's decision before the body, the body and
connection bounds, cookie sessions, the login's ``next``, Host ports and hop-by-hop names.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile

from twisted.internet.address import IPv4Address
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.resource import Resource

from jds.auth import Credentials
from jds.connections import ConnectionLimit
from jds.guard import Limits, LocalGuard
from jds.login import safe_next
from jds.paths import HubTarget, upstream_request_headers
from jds.sessions import Sessions
from jds.site import LocalSite

TARGET = HubTarget(host="hub.example", port=443, user="alice", server="", base_path="/", tls_name="hub.example")
TOKEN = "local-token-xyz"


class Echo(Resource):
    """Says how much body it got and what ``args`` twisted.web made of it."""

    isLeaf = True

    def render(self, request):
        body = request.content.read() if request.content is not None else b""
        return json.dumps({"body": len(body), "args": sorted(k.decode() for k in request.args)}).encode()


class Transport(StringTransport):
    """A StringTransport that can half-close, as TCP can, and remembers what was written before it closed."""

    write_closed = False
    before_close: bytes | None = None

    def loseWriteConnection(self) -> None:
        self.write_closed = True
        if self.before_close is None:
            self.before_close = self.value()

    def loseConnection(self) -> None:
        if self.before_close is None:
            self.before_close = self.value()
        super().loseConnection()


class Creeping(MemoryReactorClock):
    """A clock on which time passes while code runs, as it does on a real one (a microsecond a look)."""

    def seconds(self) -> float:
        self.rightNow += 1e-6
        return self.rightNow


class ChannelTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = MemoryReactorClock()
        guard = LocalGuard.build([], [])
        guard.listening("127.0.0.1", 8000)
        self.site = LocalSite(
            Echo(), guard=guard, reactor=self.clock, credentials=Credentials("hub-token", TOKEN),
            target=TARGET, limits=Limits(max_body=1000, body_timeout=5),
        )

    def send(self, data: bytes) -> tuple[object, Transport]:
        channel = self.site.buildProtocol(None)
        transport = Transport()
        channel.makeConnection(transport)
        channel.dataReceived(data)
        return channel, transport

    def answer(self, transport: Transport) -> tuple[bytes, dict]:
        status, _, rest = transport.value().partition(b"\r\n")
        body = rest.partition(b"\r\n\r\n")[2]
        return status, json.loads(body) if body else {}

    def test_refused_on_the_headers_before_any_body(self) -> None:
        cases = {
            b"Origin: http://evil.example\r\nAuthorization: token " + TOKEN.encode(): "origin-refused",
            b"Host: localhost:abc": "host-refused",
            b"Authorization: token wrong": "no-token",
        }
        for extra, reason in cases.items():
            host = b"" if extra.startswith(b"Host") else b"Host: 127.0.0.1:8000\r\n"
            channel, transport = self.send(
                b"POST /api/contents HTTP/1.1\r\n" + host + extra + b"\r\n"
                b"Content-Type: application/x-www-form-urlencoded\r\nContent-Length: 100663296\r\n\r\na=b"
            )
            status, body = self.answer(transport)
            self.assertEqual((status, body["reason"]), (b"HTTP/1.1 403 Forbidden", reason), extra)
            self.assertTrue(transport.write_closed)
            self.assertIsNone(channel.requests[-1].content, "no buffer or spool file was made")
            channel.dataReceived(b"x" * 100_000)  # the rest is dropped, not parsed
            self.assertEqual(transport.value().count(b"HTTP/1.1"), 1)
            self.clock.advance(3)
            self.assertTrue(transport.disconnecting)

    def test_forms_are_forwarded_not_parsed(self) -> None:
        _, transport = self.send(
            b"POST /api/contents?x=1 HTTP/1.1\r\nHost: 127.0.0.1:8000\r\nAuthorization: token "
            + TOKEN.encode() + b"\r\nContent-Type: application/x-www-form-urlencoded\r\n"
            b"Content-Length: 7\r\n\r\na=b&c=d"
        )
        status, body = self.answer(transport)
        self.assertEqual(status, b"HTTP/1.1 200 OK")
        self.assertEqual(body, {"body": 7, "args": ["x"]})

    def test_body_over_the_limit_gets_413_declared_or_chunked(self) -> None:
        head = b"PUT /api/contents/a HTTP/1.1\r\nHost: 127.0.0.1:8000\r\nAuthorization: token " + TOKEN.encode()
        _, transport = self.send(head + b"\r\nContent-Length: 1001\r\n\r\n")
        status, body = self.answer(transport)
        self.assertEqual((status, body["reason"]), (b"HTTP/1.1 413 Request Entity Too Large", "body-too-large"))
        self.assertIn("--max-body-size", body["message"])
        channel, t = self.send(head + b"\r\nTransfer-Encoding: chunked\r\n\r\n")
        channel.dataReceived(b"200\r\n" + b"z" * 512 + b"\r\n")
        self.assertEqual(t.value(), b"", "within the limit so far")
        channel.dataReceived(b"200\r\n" + b"z" * 512 + b"\r\n")
        status, body = self.answer(t)
        self.assertEqual(body["reason"], "body-too-large")

    def test_a_stalled_body_gets_408(self) -> None:
        channel, transport = self.send(
            b"PUT /api/contents/a HTTP/1.1\r\nHost: 127.0.0.1:8000\r\nAuthorization: token "
            + TOKEN.encode() + b"\r\nContent-Length: 100\r\n\r\nx"
        )
        for _ in range(3):
            self.clock.advance(4)
            channel.dataReceived(b"x")  # progress restarts the clock
        self.assertEqual(transport.value(), b"")
        self.clock.advance(5.1)
        status, body = self.answer(transport)
        self.assertEqual((status, body["reason"]), (b"HTTP/1.1 408 Request Time-out", "body-timeout"))

    def test_no_body_where_none_is_taken_and_nothing_spooled(self) -> None:
        """In pass-through mode too: a WebSocket upgrade with a body, and any body to /_jds/, are refused
        from the headers, before a byte of the body is read or written anywhere."""
        guard = LocalGuard.build([], [])
        guard.listening("127.0.0.1", 8000)
        self.site = LocalSite(Echo(), guard=guard, reactor=self.clock, target=TARGET)
        upgrade = (b"GET /api/kernels/k1/channels HTTP/1.1\r\nHost: 127.0.0.1:8000\r\nUpgrade: websocket\r\n"
                   b"Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n")
        status_page = b"POST /_jds/status HTTP/1.1\r\nHost: 127.0.0.1:8000\r\n"
        for head, expected in (
            (upgrade + b"Content-Length: 100663296\r\n\r\n", (b"HTTP/1.1 400 Bad Request", "body-not-allowed")),
            (upgrade + b"Transfer-Encoding: chunked\r\n\r\n", (b"HTTP/1.1 400 Bad Request", "body-not-allowed")),
            (status_page + b"Content-Length: 100663296\r\n\r\n", (b"HTTP/1.1 413 Request Entity Too Large", "body-too-large")),
            (status_page + b"Transfer-Encoding: chunked\r\n\r\n", (b"HTTP/1.1 413 Request Entity Too Large", "body-too-large")),
        ):
            channel, transport = self.send(head + b"x" * 1000)
            status, body = self.answer(transport)
            self.assertEqual((status, body["reason"]), expected, head)
            self.assertIsNone(channel.requests[-1].content, "no buffer or spool file was made")
            self.assertTrue(transport.write_closed)

    def stalled(self, body_timeout: float, head: bytes = b"PUT /api/contents/a HTTP/1.1") -> tuple[object, Transport]:
        """A request whose body stops after one byte, on a site built as the daemon builds it."""
        guard = LocalGuard.build([], [])
        guard.listening("127.0.0.1", 8000)
        site = LocalSite(
            Echo(), guard=guard, reactor=self.clock, credentials=Credentials("hub-token", TOKEN),
            target=TARGET, limits=Limits(body_timeout=body_timeout),
        )
        channel = site.buildProtocol(None)  # with twisted.web's own idle timeout (60 s), as in the daemon
        transport = Transport()
        channel.makeConnection(transport)
        channel.dataReceived(
            head + b"\r\nHost: 127.0.0.1:8000\r\nAuthorization: token " + TOKEN.encode()
            + b"\r\nContent-Length: 100\r\n\r\nx"
        )
        return channel, transport

    def test_a_stalled_body_has_one_deadline_and_always_gets_its_408(self) -> None:
        # --body-timeout longer than twisted.web's idle timeout: that one no longer drops it first
        _, transport = self.stalled(90)
        self.clock.advance(61)
        self.assertEqual((transport.value(), transport.disconnecting), (b"", False))
        self.clock.advance(29.5)
        status, body = self.answer(transport)
        self.assertEqual((status, body["reason"]), (b"HTTP/1.1 408 Request Time-out", "body-timeout"))
        # the same length as twisted.web's (60 s, the default): every one of 256 stalled bodies is
        # answered before its connection closes
        self.clock = Creeping()
        stalled = []
        for _ in range(256):
            stalled.append(self.stalled(60)[1])
            self.clock.advance(0.01)
        self.clock.advance(61)
        answers = [(t.before_close or b"still open")[:30] for t in stalled]
        self.assertEqual(answers, [b"HTTP/1.1 408 Request Time-out\r"] * 256)

    def test_an_idle_keep_alive_connection_is_still_closed(self) -> None:
        """Between requests no deadline of the guard runs: the idle timeout (60 s) closes the connection."""
        channel, transport = self.send(
            b"GET /api/status HTTP/1.1\r\nHost: 127.0.0.1:8000\r\nAuthorization: token " + TOKEN.encode() + b"\r\n\r\n"
        )
        self.assertTrue(transport.value().startswith(b"HTTP/1.1 200 "))
        self.clock.advance(59)
        self.assertFalse(transport.disconnecting)
        self.clock.advance(2)
        self.assertTrue(transport.disconnecting)

    def test_connections_per_client(self) -> None:
        """Bounded per client; when every connection showed the token, the next one is told why (see
        test_connections for the connections that make room)."""
        limited = ConnectionLimit(self.site, 2)
        peer = IPv4Address("TCP", "127.0.0.1", 5000)
        held = []
        for _ in range(2):
            protocol = limited.buildProtocol(peer)
            transport = Transport(peerAddress=peer)
            protocol.makeConnection(transport)
            protocol.dataReceived(
                b"GET /x HTTP/1.1\r\nHost: 127.0.0.1:8000\r\nAuthorization: token " + TOKEN.encode() + b"\r\n\r\n"
            )
            held.append(protocol)
        refused = limited.buildProtocol(peer)
        transport = Transport(peerAddress=peer)
        refused.makeConnection(transport)
        self.assertTrue(transport.value().startswith(b"HTTP/1.1 503"))
        self.assertIn(b"--max-connections-per-client", transport.value())
        held[0].connectionLost(None)
        again = limited.buildProtocol(peer)
        again.makeConnection(Transport(peerAddress=peer))
        self.assertEqual(limited.open, {"127.0.0.1": 2})


class SessionTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.now = 1000.0
        self.sessions = Sessions(max_age=100, clock=lambda: self.now)
        self.credentials = Credentials("hub-token", TOKEN, sessions=self.sessions)

    def cookie(self, value: str, xsrf: str | None = None) -> dict[bytes, list[bytes]]:
        headers = {b"cookie": [f"jds-auth={value}; _xsrf=whatever".encode()]}
        if xsrf is not None:
            headers[b"x-xsrftoken"] = [xsrf.encode()]
        return headers

    def test_a_page_opened_with_the_token_starts_a_session(self) -> None:
        verdict = self.credentials.check(b"GET", b"token=" + TOKEN.encode(), {}, page=True)
        self.assertTrue(verdict.allowed)
        auth, xsrf = verdict.set_cookies
        self.assertIn(b"Max-Age=100", auth)
        value = auth.split(b";")[0].split(b"=", 1)[1].decode()
        self.assertNotIn(TOKEN, value)
        again = self.credentials.check(b"GET", b"token=" + TOKEN.encode(), {}, page=True)
        self.assertNotEqual(again.set_cookies[0], auth, "each session is a new random value")
        self.assertFalse(self.credentials.check(b"GET", b"token=" + TOKEN.encode(), {}, page=False).set_cookies)

    def test_xsrf_is_the_sessions_own(self) -> None:
        session = self.sessions.start("login-xsrf")
        self.assertTrue(self.credentials.check(b"POST", b"", self.cookie(session.value, "login-xsrf")).allowed)
        chosen = self.credentials.check(b"POST", b"", self.cookie(session.value, "whatever"))
        self.assertEqual((chosen.allowed, chosen.reason), (False, "xsrf"))
        self.assertTrue(self.credentials.check(b"POST", b"_xsrf=login-xsrf", self.cookie(session.value)).allowed)
        self.assertTrue(self.credentials.check(b"GET", b"", self.cookie(session.value)).allowed)

    def test_expiry_and_rotation(self) -> None:
        session = self.sessions.start()
        self.now += 49
        self.assertEqual(self.credentials.check(b"GET", b"", self.cookie(session.value)).set_cookies, ())
        self.now += 2
        rotated = self.credentials.check(b"GET", b"", self.cookie(session.value))
        self.assertTrue(rotated.allowed)
        new_value = rotated.set_cookies[0].split(b";")[0].split(b"=", 1)[1].decode()
        self.assertNotEqual(new_value, session.value)
        self.now += 50
        self.assertFalse(self.credentials.check(b"GET", b"", self.cookie(session.value)).allowed)
        self.assertTrue(self.credentials.check(b"GET", b"", self.cookie(new_value)).allowed)

    def test_a_new_token_file_ends_every_session(self) -> None:
        folder = tempfile.mkdtemp(prefix="jds-test-")
        self.addCleanup(shutil.rmtree, folder)
        path = os.path.join(folder, "local-token")
        with open(path, "w") as handle:
            handle.write(TOKEN + "\n")
        credentials = Credentials("hub-token", TOKEN, token_file=path, sessions=self.sessions)
        session = self.sessions.start()
        self.assertTrue(credentials.check(b"GET", b"", self.cookie(session.value)).allowed)
        from jds.tokens import rotate_local_token

        new = rotate_local_token(path)
        self.assertFalse(credentials.check(b"GET", b"", self.cookie(session.value)).allowed)
        self.assertFalse(credentials.check(b"GET", b"token=" + TOKEN.encode(), {}).allowed)
        self.assertTrue(credentials.check(b"GET", b"token=" + new.encode(), {}).allowed)


class SmallFixesTests(SynchronousTestCase):
    def test_next_is_a_path_of_this_proxy(self) -> None:
        for value in (b"/\t/evil.example/", b"/\\evil.example", b"\t//evil.example", b"/\r\n/evil", b"//x", b"http://x"):
            self.assertEqual(safe_next(value), b"/", value)
        self.assertEqual(safe_next(b"/tree/a?b=1"), b"/tree/a?b=1")
        self.assertEqual(safe_next(b"/a\\b"), b"/a/b")

    def test_host_port_is_a_number(self) -> None:
        guard = LocalGuard.build([], [])
        guard.listening("127.0.0.1", 8000)

        class Req:
            def __init__(self, host: bytes) -> None:
                from twisted.web.http_headers import Headers

                self.requestHeaders = Headers({b"host": [host]})

        for host in (b"localhost:abc", b"127.0.0.1:1@evil.example", b"localhost:", b"[::1]x", b"127.0.0.1:\xd9\xa8"):
            self.assertIsNotNone(guard.host_refusal(Req(host)), host)
        for host in (b"localhost:8000", b"[::1]:8000", b"127.0.0.1"):
            self.assertIsNone(guard.host_refusal(Req(host)), host)

    def test_connection_cannot_name_the_proxys_authorization(self) -> None:
        headers = [(b"Connection", b"keep-alive, authorization, x-drop"), (b"X-Drop", b"1"),
                   (b"Authorization", b"token hub-token")]
        out = dict(upstream_request_headers(headers, TARGET, "127.0.0.1", b"127.0.0.1:8000", None))
        self.assertEqual(out[b"Authorization"], b"token hub-token")
        self.assertNotIn(b"X-Drop", out)
