"""
Who may use the local port, and which credentials go to the hub.

In pass-through mode the IDE holds the hub token and the proxy only carries it (a ``?token=`` becomes
an ``Authorization`` header, because JupyterHub 5+ ignores tokens in HTTP URLs). In managed mode the
proxy holds the hub token and the IDE gets a local token instead: every request must show the local
token, which is then replaced by the hub token upstream, and the hub token is scrubbed from anything
that comes back, so it never reaches the IDE or a browser.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass

from jds.paths import split_token
from jds.refusal import Refusal

__all__ = ["AUTH_COOKIE", "Credentials", "StreamScrubber", "Verdict", "cookies", "needs_local_token", "xsrf_matches"]

AUTH_COOKIE = "jds-auth"
_SAFE_METHODS = frozenset({b"GET", b"HEAD", b"OPTIONS"})


@dataclass(frozen=True)
class Verdict:
    """The outcome of checking a request's local credentials."""

    allowed: bool
    by_cookie: bool = False
    reason: str = ""


def cookies(header_values: list[bytes]) -> dict[str, str]:
    """
    Parse ``Cookie`` headers leniently: VS Code's password flow echoes a ``Set-Cookie`` value with
    its attributes (``Path=/; HttpOnly``) back as if they were cookies, which strict parsers reject.
    """
    jar: dict[str, str] = {}
    for value in header_values:
        for part in value.decode("latin-1").split(";"):
            name, sep, content = part.strip().partition("=")
            if sep and name and name not in jar:
                jar[name] = content.strip().strip('"')
    return jar


def _xsrf_secret(value: str) -> bytes:
    """Tornado masks ``_xsrf`` values (``2|mask|masked|time``); compare what they unmask to."""
    parts = value.split("|")
    if len(parts) == 4 and parts[0] == "2":
        try:
            mask, masked = bytes.fromhex(parts[1]), bytes.fromhex(parts[2])
        except ValueError:
            return value.encode()
        if mask:
            return bytes(b ^ mask[i % len(mask)] for i, b in enumerate(masked))
    return value.encode()


def xsrf_matches(cookie: str | None, presented: str | None) -> bool:
    if not cookie or not presented:
        return False
    return hmac.compare_digest(_xsrf_secret(cookie), _xsrf_secret(presented))


def _authorization_token(values: list[bytes]) -> bytes | None:
    for value in values:
        scheme, _, credential = value.strip().partition(b" ")
        if scheme.lower() in (b"token", b"bearer") and credential.strip():
            return credential.strip()
    return None


@dataclass(frozen=True)
class Credentials:
    """``hub_token`` set means managed mode; ``local_token`` is then what the IDE must present."""

    hub_token: str | None = None
    local_token: str | None = None

    @property
    def managed(self) -> bool:
        return self.hub_token is not None

    @property
    def cookie_value(self) -> str:
        """The auth cookie carries a MAC of the local token, not the token itself."""
        assert self.local_token is not None
        return hmac.new(self.local_token.encode(), b"jds-auth-cookie", hashlib.sha256).hexdigest()

    def is_local_token(self, candidate: bytes | str | None) -> bool:
        if candidate is None or self.local_token is None:
            return False
        if isinstance(candidate, str):
            candidate = candidate.encode("utf-8", "replace")
        return hmac.compare_digest(candidate, self.local_token.encode())

    def check(
        self, method: bytes, query: bytes, headers: dict[bytes, list[bytes]], form_xsrf: str | None = None
    ) -> Verdict:
        """
        Whether a request may pass. A cookie alone authenticates only safe methods unless an
        ``X-XSRFToken`` (or ``_xsrf``) matching the ``_xsrf`` cookie comes with it: a cookie is sent
        by any web page the user visits, a header is not.
        """
        if not self.managed:
            return Verdict(True)
        _, query_token = split_token(query)
        if self.is_local_token(query_token):
            return Verdict(True)
        if self.is_local_token(_authorization_token(headers.get(b"authorization", []))):
            return Verdict(True)
        jar = cookies(headers.get(b"cookie", []))
        if not hmac.compare_digest(jar.get(AUTH_COOKIE, "").encode(), self.cookie_value.encode()):
            return Verdict(False, reason="no-token")
        if method in _SAFE_METHODS:
            return Verdict(True, by_cookie=True)
        presented = (headers.get(b"x-xsrftoken") or [b""])[0].decode("latin-1") or form_xsrf
        if xsrf_matches(jar.get("_xsrf"), presented):
            return Verdict(True, by_cookie=True)
        return Verdict(False, by_cookie=True, reason="xsrf")

    def upstream(
        self, headers: list[tuple[bytes, bytes]], query_token: bytes | None
    ) -> tuple[list[tuple[bytes, bytes]], bytes | None]:
        """
        ``(headers, query token)`` to send upstream: in managed mode local credentials are removed
        (the ``Authorization`` header, the auth cookie) and the hub token is added instead.
        """
        if not self.managed:
            return headers, query_token
        out = []
        for name, value in headers:
            lowered = name.lower()
            if lowered == b"authorization":
                continue
            if lowered == b"cookie":
                value = _without_cookie(value, AUTH_COOKIE)
                if not value:
                    continue
            out.append((name, value))
        assert self.hub_token is not None
        out.append((b"Authorization", b"token " + self.hub_token.encode()))
        return out, None

    def scrub(self, data: bytes) -> bytes:
        """Replace the hub token by the local one (jupyterhub-singleuser writes it into pages)."""
        if not self.managed or not data:
            return data
        assert self.hub_token is not None and self.local_token is not None
        return data.replace(self.hub_token.encode(), self.local_token.encode())


def _without_cookie(header: bytes, name: str) -> bytes:
    kept = [
        part.strip()
        for part in header.split(b";")
        if part.strip() and part.strip().split(b"=", 1)[0].strip() != name.encode()
    ]
    return b"; ".join(kept)


class StreamScrubber:
    """
    Replaces ``old`` by ``new`` in a body that arrives in pieces, holding back just enough bytes
    to catch an occurrence split across two pieces, so a large page is never held whole.
    """

    def __init__(self, old: bytes, new: bytes) -> None:
        self._old = old
        self._new = new
        self._held = b""

    def feed(self, data: bytes) -> bytes:
        data = (self._held + data).replace(self._old, self._new)
        keep = len(self._old) - 1
        # Only a suffix that could start the token needs holding back.
        cut = len(data)
        for size in range(min(keep, len(data)), 0, -1):
            if self._old.startswith(data[-size:]):
                cut = len(data) - size
                break
        self._held = data[cut:]
        return data[:cut]

    def flush(self) -> bytes:
        held, self._held = self._held, b""
        return held


def needs_local_token(hint: str, local: object = None) -> Refusal:
    """
    The 403 for a request without the local token; ``hint`` says, in the log, where it came from.
    ``local`` is the address the request came in on (``request.getHost()``): the URL names its port.
    """
    host, port = getattr(local, "host", "127.0.0.1"), getattr(local, "port", None)
    where = f"http://{f'[{host}]' if ':' in host else host}:{port}" if port else "http://127.0.0.1:PORT"
    return Refusal(
        403,
        "This jupyter-dev-server needs its local token: use the URL it printed at start-up "
        f"({where}/?token=...) or send 'Authorization: token <local token>'.",
        "no-token",
        hint=hint,
    )
