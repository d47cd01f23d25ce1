"""
The local site in memory (issue 20): query strings any client may send, ``Connection: close`` said
when the proxy closes, the login form's ``_xsrf``, and what the log gets for a refused request.
"""

from __future__ import annotations

import io
import json
import re
import shutil
import tempfile
from pathlib import Path

from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import formatEvent, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.resource import Resource

from jds.auth import Credentials, needs_local_token
from jds.errors import render_refusal
from jds.guard import LocalGuard
from jds.login import LoginPage
from jds.paths import HubTarget
from jds.service import _ProxyListener
from jds.site import LocalRoot, LocalSite

TARGET = HubTarget(host="hub.example", port=443, user="alice", server="", base_path="/", tls_name="hub.example")
TOKEN = "local-token-xyz"
HOST = b"Host: 127.0.0.1:8000\r\n"
WITH_TOKEN = HOST + b"Authorization: token " + TOKEN.encode() + b"\r\n"


class FakeProxy(Resource):
    """Stands for the hub: says what it got (path, query as sent, args), or refuses without the token."""

    isLeaf = True

    def __init__(self, credentials: Credentials) -> None:
        super().__init__()
        self.credentials = credentials

    def render(self, request):
        query = request.uri.partition(b"?")[2]
        headers = {name.lower(): values for name, values in request.requestHeaders.getAllRawHeaders()}
        if not self.credentials.check(request.method, query, headers).allowed:
            return render_refusal(request, needs_local_token("The request carried no valid local token."))
        args = {k.decode("latin-1"): [v.decode("latin-1") for v in vs] for k, vs in request.args.items()}
        return json.dumps({"query": query.decode("latin-1"), "args": args}).encode()

    def streams_body(self, method, uri, request) -> bool:
        return False


class SiteTestCase(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = MemoryReactorClock()
        guard = LocalGuard.build([], [])
        guard.listening("127.0.0.1", 8000)
        self.credentials = Credentials("hub-token", TOKEN)
        root = LocalRoot(FakeProxy(self.credentials), LoginPage(self.credentials))  # type: ignore[arg-type]
        self.site = LocalSite(root, guard=guard, reactor=self.clock, credentials=self.credentials, target=TARGET)
        self.events: list[dict] = []
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)

    def send(self, data: bytes) -> tuple[object, StringTransport]:
        channel = self.site.buildProtocol(None)
        transport = StringTransport()
        channel.makeConnection(transport)
        channel.dataReceived(data)
        return channel, transport

    @staticmethod
    def responses(transport: StringTransport) -> list[tuple[bytes, dict[bytes, bytes], bytes]]:
        """Every response written, as (status line, headers by lower-case name, body)."""
        out, data = [], transport.value()
        while data:
            head, _, data = data.partition(b"\r\n\r\n")
            status, *lines = head.split(b"\r\n")
            headers = {}
            for line in lines:
                name, _, value = line.partition(b":")
                headers[name.strip().lower()] = value.strip()
            length = int(headers.get(b"content-length", b"0"))
            out.append((status, headers, data[:length]))
            data = data[length:]
        return out

    def lines(self) -> list[str]:
        return [formatEvent(e) for e in self.events if e.get("log_namespace") == "jds"]


class QueryTests(SiteTestCase):
    """Finding 7: a query with escapes that are not ASCII text is answered, and passed as sent."""

    def test_non_ascii_escapes_are_answered_and_passed_as_sent(self) -> None:
        for query, arg in (
            (b"q=%C3%A9", {"q": ["\xc3\xa9"]}),
            (b"next=/lab%ff&x", {"next": ["/lab\xff"], "x": [""]}),
            (b"a=%C3%A9+%2B&a=%00&%ff=", {"a": ["\xc3\xa9 +", "\x00"], "\xff": [""]}),
        ):
            _, transport = self.send(b"GET /api/contents?" + query + b" HTTP/1.1\r\n" + WITH_TOKEN + b"\r\n")
            ((status, _, body),) = self.responses(transport)
            self.assertEqual(status, b"HTTP/1.1 200 OK", query)
            self.assertEqual(json.loads(body), {"query": query.decode("latin-1"), "args": arg})
            self.assertFalse(transport.disconnecting, query)

    def test_the_login_page_takes_them_too(self) -> None:
        _, transport = self.send(b"GET /login?next=/lab%ff HTTP/1.1\r\n" + HOST + b"\r\n")
        ((status, headers, body),) = self.responses(transport)
        self.assertEqual(status, b"HTTP/1.1 200 OK")
        self.assertIn(b'action="/login?next=/lab%25FF"', body)
        xsrf = re.search(rb'name="_xsrf" value="(\w+)"', body).group(1)
        for password, expected in ((b"%ff%fe", b"HTTP/1.1 403 Forbidden"), (TOKEN.encode(), b"HTTP/1.1 302 Found")):
            form = b"_xsrf=" + xsrf + b"&password=" + password
            _, transport = self.send(
                b"POST /login?next=/lab%ff HTTP/1.1\r\n" + HOST + b"Cookie: _xsrf=" + xsrf + b"\r\n"
                b"Content-Type: application/x-www-form-urlencoded\r\nContent-Length: %d\r\n\r\n" % len(form) + form
            )
            ((status, headers, _),) = self.responses(transport)
            self.assertEqual(status, expected, password)
        self.assertEqual(headers[b"location"], b"/lab%FF")


class ConnectionCloseTests(SiteTestCase):
    """Finding 14: an answer after which the proxy closes says ``Connection: close`` (RFC 9112 9.6)."""

    def test_said_whenever_the_proxy_closes(self) -> None:
        for line, connection in (
            (b"GET /api/contents HTTP/1.1\r\n", b"Connection: close\r\n"),
            (b"GET /api/contents HTTP/1.1\r\n", b"Connection: keep-alive, close\r\n"),
            (b"GET /api/contents HTTP/1.1\r\n", b"Connection: keep-alive\r\nConnection: Close\r\n"),
            (b"GET /api/contents HTTP/1.0\r\n", b""),
        ):
            for credentials in (WITH_TOKEN, HOST):  # the hub's answer, and the proxy's own refusal
                _, transport = self.send(line + credentials + connection + b"\r\n")
                ((status, headers, _),) = self.responses(transport)
                self.assertEqual(headers.get(b"connection"), b"close", (line, connection, status))
                self.assertTrue(transport.disconnecting, (line, connection))

    def test_not_said_on_a_connection_that_stays(self) -> None:
        _, transport = self.send(
            b"GET /api/contents HTTP/1.1\r\n" + WITH_TOKEN + b"\r\n"
            b"GET /api/contents HTTP/1.1\r\n" + HOST + b"\r\n"
            b"GET /api/contents HTTP/1.1\r\n" + WITH_TOKEN + b"Connection: close\r\n\r\n"
        )
        answers = self.responses(transport)
        self.assertEqual([status for status, _, _ in answers],
                         [b"HTTP/1.1 200 OK", b"HTTP/1.1 403 Forbidden", b"HTTP/1.1 200 OK"])  # fmt: skip
        self.assertEqual([headers.get(b"connection") for _, headers, _ in answers], [None, None, b"close"])
        self.assertTrue(transport.disconnecting)


class LoginXsrfTests(SiteTestCase):
    """Finding 3: a session's ``_xsrf`` is one this daemon made for the login form, never a chosen one."""

    def login(self, cookie: bytes, form_xsrf: bytes) -> tuple[bytes, dict[bytes, bytes], list[bytes]]:
        form = b"_xsrf=" + form_xsrf + b"&password=" + TOKEN.encode()
        _, transport = self.send(
            b"POST /login? HTTP/1.1\r\n" + HOST + b"Cookie: _xsrf=" + cookie + b"\r\n"
            b"Content-Type: application/x-www-form-urlencoded\r\nContent-Length: %d\r\n\r\n" % len(form) + form
        )
        ((status, headers, _),) = self.responses(transport)
        cookies = re.findall(rb"(?im)^set-cookie: *([^\r\n]*)", transport.value())
        return status, headers, cookies

    def form_xsrf(self, cookie: bytes = b"") -> bytes:
        _, transport = self.send(b"GET /login? HTTP/1.1\r\n" + HOST + (b"Cookie: " + cookie + b"\r\n" if cookie else b"") + b"\r\n")
        ((_, _, body),) = self.responses(transport)
        value = re.search(rb'name="_xsrf" value="(\w+)"', body).group(1)
        self.assertIn(b"_xsrf=" + value, transport.value(), "the cookie and the form carry the same value")
        return value

    def test_a_chosen_xsrf_starts_no_session(self) -> None:
        chosen = b"a" * 64
        status, _, cookies = self.login(chosen, chosen)
        self.assertEqual(status, b"HTTP/1.1 403 Forbidden")
        self.assertFalse([c for c in cookies if c.startswith(b"jds-auth=")])
        self.assertEqual(len(self.credentials.sessions), 0)

    def test_the_form_never_takes_the_cookies_value(self) -> None:
        planted = self.form_xsrf()  # a value this daemon made, for another page: planted in the cookie
        fresh = self.form_xsrf(b"_xsrf=" + planted)
        self.assertNotEqual(fresh, planted)

    def test_each_session_gets_the_fresh_value_of_its_own_form(self) -> None:
        values = []
        for _ in range(2):
            xsrf = self.form_xsrf()
            status, _, cookies = self.login(xsrf, xsrf)
            self.assertEqual(status, b"HTTP/1.1 302 Found")
            self.assertIn(b"_xsrf=" + xsrf, b"\n".join(cookies), "VS Code goes on sending its form's _xsrf")
            values.append(xsrf)
        self.assertNotEqual(values[0], values[1])
        self.assertEqual(len(self.credentials.sessions), 2)


class RefusalLogTests(SiteTestCase):
    """Finding 8: one short line per refusal, and a burst of the same one is a line and a count."""

    def test_one_clipped_line_per_refusal(self) -> None:
        path = b"/api/contents/" + b"x" * 15_000
        _, transport = self.send(b"GET " + path + b"?token=wrong&q=" + b"y" * 900 + b" HTTP/1.1\r\n" + HOST + b"\r\n")
        ((status, _, _),) = self.responses(transport)
        self.assertEqual(status, b"HTTP/1.1 403 Forbidden")
        (line,) = self.lines()
        self.assertIn("GET /api/contents/xxx", line)
        self.assertIn("-> 403", line)
        self.assertIn("more]", line)
        self.assertLess(len(line), 1600)
        self.assertNotIn("wrong", line)

    def test_a_burst_is_a_few_lines_and_a_count(self) -> None:
        path = b"/api/contents/" + b"x" * 15_000
        head = b"GET " + path + b" HTTP/1.1\r\n" + HOST + b"\r\n"
        other = b"GET /api/kernels HTTP/1.1\r\n" + HOST + b"\r\n"
        _, transport = self.send(head * 500 + other)
        self.assertEqual(transport.value().count(b"HTTP/1.1 403 Forbidden"), 501, "every one is answered")
        self.assertEqual(len(self.lines()), 4, "the first three of the burst, and the other request")
        self.clock.advance(10)
        lines = self.lines()
        self.assertEqual(len(lines), 5)
        self.assertRegex(lines[4], r"^GET /api/contents/x+\.\.\.\[\d+ more\] -> 403: the same refusal \(no-token\) 497 more")
        # a burst that goes on: one line with its count per window, never one per request
        for _ in range(3):
            self.send(head * 100)
            self.clock.advance(10)
        self.assertEqual(len(self.lines()), 8)
        self.assertIn(" 100 more time(s) in 10 s.", self.lines()[-1])
        # once quiet for a window, the next one is written in full again
        self.clock.advance(20)
        self.send(head)
        self.assertIn("needs its local token", self.lines()[-1])

    def test_trying_again_is_not_a_burst(self) -> None:
        for _ in range(3):
            self.send(b"GET /api/kernels HTTP/1.1\r\n" + HOST + b"\r\n")
            self.clock.advance(1)
        self.assertEqual(len(self.lines()), 3)
        self.clock.advance(60)
        self.assertEqual(len(self.lines()), 3, "nothing to count")


class AnnouncementTests(SynchronousTestCase):
    """Finding 1: the local token goes to the URL file and the terminal, never to the log."""

    class Port:
        def getHost(self):
            from twisted.internet.address import IPv4Address

            return IPv4Address("TCP", "127.0.0.1", 8123)

    def announce(self, token: str | None, terminal: io.StringIO | None) -> tuple[list[str], Path]:
        events: list[dict] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        folder = tempfile.mkdtemp(prefix="jds-test-")
        self.addCleanup(shutil.rmtree, folder)
        url_file = Path(folder) / "local-token.url"
        listener = _ProxyListener(None, None, "tcp:0", token, url_file=url_file, terminal=terminal)
        listener._announce(self.Port())
        return [formatEvent(e) for e in events if e.get("log_namespace") == "jds"], url_file

    def test_managed_mode_logs_the_url_files_path_only(self) -> None:
        url = f"http://127.0.0.1:8123/?token={TOKEN}"
        for terminal in (None, io.StringIO()):
            (line,), url_file = self.announce(TOKEN, terminal)
            self.assertNotIn(TOKEN, line)
            self.assertIn("Listening on http://127.0.0.1:8123/.", line)
            self.assertIn(f" is in {url_file} (readable only by you)", line)
            self.assertEqual(url_file.read_text(), url + "\n")
            if terminal is not None:
                self.assertEqual(
                    terminal.getvalue(), f"Paste this URL into your IDE as an existing Jupyter server: {url}\n"
                )

    def test_pass_through_mode_has_no_secret_to_keep(self) -> None:
        (line,), url_file = self.announce(None, None)
        self.assertIn("http://127.0.0.1:8123/?token=<YOUR_HUB_API_TOKEN>", line)
        self.assertFalse(url_file.exists())
