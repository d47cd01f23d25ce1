"""
A local ``/login`` for clients that ask for a password instead of a token (VS Code's password
flow, PyCharm's login popup, a browser). The password is the local token; success sets the auth
cookie, exactly as a Jupyter server's login would set its own.

VS Code's flow: ``GET login?`` for an ``_xsrf`` cookie, ``POST login?`` with ``_xsrf`` and
``password`` expecting a 302 whose first ``Set-Cookie`` is the session, then ``Cookie`` plus
``X-XSRFToken`` on every request.
"""

from __future__ import annotations

import html
import secrets
from urllib.parse import quote

from twisted.web.resource import Resource
from twisted.web.server import Request

from jds.auth import AUTH_COOKIE, Credentials, cookies, xsrf_matches

__all__ = ["LoginPage", "auth_cookie_header", "safe_next"]

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


def safe_next(value: bytes | None) -> bytes:
    """Only local absolute paths: a login must not become an open redirect."""
    if not value or not value.startswith(b"/") or value.startswith((b"//", b"/\\")):
        return b"/"
    return value


def auth_cookie_header(credentials: Credentials) -> bytes:
    return f"{AUTH_COOKIE}={credentials.cookie_value}; HttpOnly; SameSite=Strict; Path=/".encode()


class LoginPage(Resource):
    isLeaf = True

    def __init__(self, credentials: Credentials) -> None:
        super().__init__()
        self.credentials = credentials

    def _xsrf(self, request: Request) -> str:
        jar = cookies(request.requestHeaders.getRawHeaders(b"cookie", []))
        value = jar.get("_xsrf")
        if not value:
            value = secrets.token_hex(16)
            request.addCookie(b"_xsrf", value.encode(), path=b"/", sameSite=b"strict")
        return value

    def _form(self, request: Request, notice: str = "") -> bytes:
        next_path = safe_next((request.args.get(b"next") or [b"/"])[0])
        request.setHeader(b"content-type", b"text/html; charset=utf-8")
        request.setHeader(b"cache-control", b"no-store")
        return _FORM.format(
            notice=html.escape(notice),
            next=html.escape(quote(next_path.decode("latin-1"), safe="/")),
            xsrf=html.escape(self._xsrf(request)),
        ).encode("utf-8")

    def render_GET(self, request: Request) -> bytes:
        return self._form(request)

    def render_POST(self, request: Request) -> bytes:
        jar = cookies(request.requestHeaders.getRawHeaders(b"cookie", []))
        presented = (request.args.get(b"_xsrf") or [b""])[0].decode("latin-1")
        password = (request.args.get(b"password") or [b""])[0]
        if not xsrf_matches(jar.get("_xsrf"), presented):
            request.setResponseCode(403)
            return self._form(request, "The form expired ('_xsrf' missing or wrong); try again. ")
        if not self.credentials.is_local_token(password.strip()):
            request.setResponseCode(403)
            return self._form(request, "That is not the local token. ")
        request.responseHeaders.addRawHeader(b"set-cookie", auth_cookie_header(self.credentials))
        request.redirect(safe_next((request.args.get(b"next") or [b"/"])[0]))
        return b""
