"""
Managed mode's browser sessions: what the ``jds-auth`` cookie stands for.

The cookie holds a random value that means something only to this process (kept in memory, so a
restart logs every browser out), for ``--cookie-max-age`` seconds. Its ``_xsrf`` is fixed when the
session starts and checked against it, so holding the cookie is not enough to choose an ``_xsrf``:
a page on another local port can set cookies for 127.0.0.1, but cannot learn the session's value.
Nor choose it at login: a login form's ``_xsrf`` is made (and signed) by this process for that form
(:meth:`Sessions.issue_xsrf`), and a session starts only with one of those.
A new local token (``jupyter-dev-server rotate-token``) ends every session.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["AUTH_COOKIE", "DEFAULT_COOKIE_MAX_AGE", "Session", "Sessions"]

AUTH_COOKIE = "jds-auth"

DEFAULT_COOKIE_MAX_AGE = 7 * 24 * 3600.0
# Browsers are few; the bound only keeps a client that never returns its cookie from growing the map.
MAX_SESSIONS = 1000


@dataclass(frozen=True)
class Session:
    value: str
    xsrf: str
    started: float
    expires: float


class Sessions:
    """
    The live sessions. A session used after half its life is replaced by a fresh one (rotation);
    the old value keeps working until its own expiry, since an IDE that stored it (VS Code's
    password flow) never picks up a new cookie.
    """

    def __init__(self, max_age: float = DEFAULT_COOKIE_MAX_AGE, clock: Callable[[], float] = time.time) -> None:
        self.max_age = max_age
        self._clock = clock
        self._key = secrets.token_bytes(32)
        self._live: OrderedDict[str, Session] = OrderedDict()

    def start(self, xsrf: str | None = None) -> Session:
        """A new session; its ``_xsrf`` is the one the login form proved, or one derived from it."""
        value = secrets.token_urlsafe(32)
        if xsrf is None:
            xsrf = hmac.new(self._key, value.encode(), hashlib.sha256).hexdigest()
        now = self._clock()
        session = Session(value, xsrf, now, now + self.max_age)
        self._live[value] = session
        while len(self._live) > MAX_SESSIONS:
            self._live.popitem(last=False)
        return session

    def issue_xsrf(self) -> str:
        """A fresh ``_xsrf`` for a login form, signed so that :meth:`issued_xsrf` knows it for ours."""
        nonce = secrets.token_hex(16)
        return nonce + self._xsrf_mac(nonce)

    def issued_xsrf(self, value: str | None) -> bool:
        """Whether ``value`` came from :meth:`issue_xsrf` (of this process), not from a client."""
        if not value or len(value) != 64:
            return False
        return hmac.compare_digest(value[32:], self._xsrf_mac(value[:32]))

    def _xsrf_mac(self, nonce: str) -> str:
        return hmac.new(self._key, b"login-xsrf:" + nonce.encode("latin-1"), hashlib.sha256).hexdigest()[:32]

    def find(self, value: str | None) -> Session | None:
        if not value:
            return None
        session = self._live.get(value)
        if session is None:
            return None
        if self._clock() >= session.expires:
            del self._live[value]
            return None
        return session

    def due_for_rotation(self, session: Session) -> bool:
        return self._clock() - session.started >= self.max_age / 2

    def rotate(self, session: Session) -> Session:
        return self.start(session.xsrf)

    def revoke_all(self) -> None:
        self._live.clear()

    def __len__(self) -> int:
        return len(self._live)

    def cookie_headers(self, session: Session) -> list[bytes]:
        """``Set-Cookie`` values for a session: the auth cookie, and the ``_xsrf`` tied to it."""
        age = int(max(session.expires - self._clock(), 0))
        return [
            f"{AUTH_COOKIE}={session.value}; Max-Age={age}; HttpOnly; SameSite=Strict; Path=/".encode(),
            f"_xsrf={session.xsrf}; Max-Age={age}; SameSite=Strict; Path=/".encode(),
        ]
