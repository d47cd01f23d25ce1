"""
A local ``/login`` for clients that ask for a password instead of a token (VS Code's password
flow, PyCharm's login popup, a browser). The password is the local token; success sets the auth
cookie, exactly as a Jupyter server's login would set its own.

VS Code's flow: ``GET login?`` for an ``_xsrf`` cookie, ``POST login?`` with ``_xsrf`` and
``password`` expecting a 302 whose first ``Set-Cookie`` is the session, then ``Cookie`` plus
``X-XSRFToken`` on every request. So the session keeps the ``_xsrf`` its form carried; and so that
value must be one this daemon made for that form, never one the client chose: a page on another
local port can set cookies for 127.0.0.1, and a session whose ``_xsrf`` it knew would be its own.
"""

from __future__ import annotations

import html
from urllib.parse import quote_from_bytes

from twisted.web.resource import Resource
from twisted.web.server import Request

from jds.auth import Credentials, cookies, xsrf_matches
from jds.paths import query_args

__all__ = ["MAX_FORM_BYTES", "LoginPage", "safe_next"]

# The form has two short fields; the channel refuses a longer body before reading it (413).
MAX_FORM_BYTES = 16 * 1024

_FORM = """<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>jupyter-dev-server login</title></head>
<body style="font-family: sans-serif; max-width: 32em; margin: 4em auto">
<h1>jupyter-dev-server</h1>
<p>{notice}Paste the local token that jupyter-dev-server printed at start-up
(the <code>token=</code> part of its URL).</p>
<form method="post" action="/login?next={next}">
<input type="hidden" name="_xsrf" value="{xsrf}">
<input type="password" name="password" autofocus size="40" aria-label="token">
<button type="submit">Log in</button>
</form></body></html>
"""


_URL_SPACE = bytes(range(0x00, 0x21))  # what the URL standard strips from either end
# Kept as they are in a redirect; any other byte (non-ASCII, a control) is percent-encoded.
_LOCATION_SAFE = "/?#[]@!$&'()*+,;=:%~-._"


def safe_next(value: bytes | None) -> bytes:
    """
    Only a path of this proxy: a login must not become an open redirect. The value is first read
    the way a browser reads a ``Location`` (the WHATWG URL parser drops tabs and newlines anywhere,
    strips controls and spaces at the ends, and takes ``\\`` for ``/``), so ``/\\t/evil.example`` or
    ``/\\\\evil.example``, which browsers resolve to another host, are refused, not redirected to.
    """
    if not value:
        return b"/"
    path = value.strip(_URL_SPACE).translate(None, b"\t\r\n").replace(b"\\", b"/")
    if not path.startswith(b"/") or path.startswith(b"//"):
        return b"/"
    return quote_from_bytes(path, safe=_LOCATION_SAFE).encode("ascii")


def _form_fields(request: Request) -> dict[bytes, bytes]:
    """
    The login form, parsed here and only here: the site never parses bodies (a proxy forwards them),
    and this one is small by construction (``MAX_FORM_BYTES``).
    """
    content = request.content
    if content is None:
        return {}
    content.seek(0)
    body = content.read(MAX_FORM_BYTES)
    content.seek(0)
    return {name: values[0] for name, values in query_args(body).items()}


class LoginPage(Resource):
    isLeaf = True

    def __init__(self, credentials: Credentials) -> None:
        super().__init__()
        self.credentials = credentials

    def _xsrf(self, request: Request) -> str:
        """
        A new ``_xsrf`` for every form, never the one the request's cookie holds: that cookie may
        have been set by another page, which would then know the ``_xsrf`` of the session.
        """
        value = self.credentials.sessions.issue_xsrf()
        request.addCookie(b"_xsrf", value.encode(), path=b"/", sameSite=b"strict")
        return value

    def _form(self, request: Request, notice: str = "") -> bytes:
        next_path = safe_next((request.args.get(b"next") or [b"/"])[0])
        request.setHeader(b"content-type", b"text/html; charset=utf-8")
        request.setHeader(b"cache-control", b"no-store")
        return _FORM.format(
            notice=html.escape(notice),
            next=html.escape(quote_from_bytes(next_path, safe="/")),
            xsrf=html.escape(self._xsrf(request)),
        ).encode("utf-8")

    def render_GET(self, request: Request) -> bytes:
        return self._form(request)

    def render_POST(self, request: Request) -> bytes:
        jar = cookies(request.requestHeaders.getRawHeaders(b"cookie", []))
        form = _form_fields(request)
        presented = form.get(b"_xsrf", b"").decode("latin-1")
        password = form.get(b"password", b"")
        self.credentials.refresh()
        issued = self.credentials.sessions.issued_xsrf(presented)
        if not issued or not xsrf_matches(jar.get("_xsrf"), presented):
            request.setResponseCode(403)
            return self._form(request, "The form expired ('_xsrf' missing or wrong); try again. ")
        if not self.credentials.is_local_token(password.strip()):
            request.setResponseCode(403)
            return self._form(request, "That is not the local token. ")
        # The session keeps the _xsrf this daemon made for the form: VS Code sends that one from now on.
        for cookie in self.credentials.start_session(presented):
            request.responseHeaders.addRawHeader(b"set-cookie", cookie)
        request.redirect(safe_next((request.args.get(b"next") or [b"/"])[0]))
        return b""
