"""
Who may use the local port, and which credentials go to the hub.

In pass-through mode the IDE holds the hub token and the proxy only carries it (a ``?token=`` becomes
an ``Authorization`` header, because JupyterHub 5+ ignores tokens in HTTP URLs). In managed mode the
proxy holds the hub token and the IDE gets a local token instead: every request must show the local
token, which is then replaced by the hub token upstream, and the hub token is scrubbed from anything
that comes back, so it never reaches the IDE or a browser.
"""

from __future__ import annotations

import hmac
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import unquote_to_bytes

from jds.paths import split_token
from jds.refusal import Refusal
from jds.sessions import AUTH_COOKIE, Session, Sessions

__all__ = [
    "AUTH_COOKIE", "Credentials", "StreamScrubber", "Verdict", "cookies", "missing_xsrf", "needs_local_token",
    "xsrf_matches",
]

_SAFE_METHODS = frozenset({b"GET", b"HEAD", b"OPTIONS"})



@dataclass(frozen=True)
class Verdict:
    """The outcome of checking a request's local credentials."""

    allowed: bool
    by_cookie: bool = False
    reason: str = ""
    # ``Set-Cookie`` values the response should carry: a new session, or a rotated one.
    set_cookies: tuple[bytes, ...] = ()


# The verdict of most requests, made once (it is frozen) rather than for every request.
_ALLOWED = Verdict(True)


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


@dataclass
class Credentials:
    """
    ``hub_token`` set means managed mode; ``local_token`` is then what the IDE must present.

    With ``token_file`` the local token is re-read when that file changes (``jupyter-dev-server
    rotate-token`` writes a new one), and every cookie session ends with the old token: checking a
    file's status per request is cheaper than any signal or control channel, and needs no pid.
    """

    hub_token: str | None = None
    local_token: str | None = None
    token_file: Path | None = None
    sessions: Sessions = field(default_factory=Sessions)
    # Called once the old token is refused: what it opened that outlives a request (a WebSocket) ends.
    on_rotation: list[Callable[[], None]] = field(default_factory=list, repr=False, compare=False)
    _seen: tuple[int, int, int] | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        self._seen = self._file_state()

    @property
    def managed(self) -> bool:
        return self.hub_token is not None

    def _file_state(self) -> tuple[int, int, int] | None:
        if self.token_file is None:
            return None
        try:
            st = os.stat(self.token_file)
        except OSError:
            return None
        return (st.st_ino, st.st_mtime_ns, st.st_size)

    def refresh(self) -> bool:
        """
        Take a rotated local token from ``token_file``: the old token and its cookies stop working,
        and ``on_rotation`` ends what they opened. Called for every request and, so that an open
        WebSocket does not wait for one, every second by the daemon. Whether the token changed.
        """
        state = self._file_state()
        if state is None or state == self._seen:
            return False
        self._seen = state
        try:
            token = Path(self.token_file).read_text(encoding="utf-8").strip()  # type: ignore[arg-type]
        except OSError:
            return False
        if not token or token == self.local_token:
            return False
        self.local_token = token
        self.sessions.revoke_all()
        for ended in list(self.on_rotation):
            ended()
        return True

    def is_local_token(self, candidate: bytes | str | None) -> bool:
        if candidate is None or self.local_token is None:
            return False
        if isinstance(candidate, str):
            candidate = candidate.encode("utf-8", "replace")
        return hmac.compare_digest(candidate, self.local_token.encode())

    def start_session(self, xsrf: str | None = None) -> tuple[bytes, ...]:
        """A new cookie session (a login, a browser opening the ``?token=`` URL): its cookies."""
        return tuple(self.sessions.cookie_headers(self.sessions.start(xsrf)))

    def check(
        self, method: bytes, query: bytes, headers: dict[bytes, list[bytes]], page: bool = False,
        effects: bool = True,
    ) -> Verdict:
        """
        Whether a request may pass. A cookie alone authenticates only safe methods unless an
        ``X-XSRFToken`` header (or ``_xsrf`` query argument) with the session's ``_xsrf`` comes with
        it: a cookie is sent by any web page the user visits, a header is not. Bodies are never read
        for an ``_xsrf``: the proxy does not interpret what it forwards. A ``page`` (a browser
        navigating with ``?token=``) starts a cookie session; ``effects=False`` (the channel's look at
        the headers, before the request is served) starts or rotates none.
        """
        if not self.managed:
            return _ALLOWED
        self.refresh()
        query_rest, query_token = split_token(query)
        if self.is_local_token(query_token):
            jar = cookies(headers.get(b"cookie", []))
            if effects and page and method == b"GET" and self.sessions.find(jar.get(AUTH_COOKIE)) is None:
                return Verdict(True, set_cookies=self.start_session())
            return _ALLOWED
        if self.is_local_token(_authorization_token(headers.get(b"authorization", []))):
            return _ALLOWED
        jar = cookies(headers.get(b"cookie", []))
        session = self.sessions.find(jar.get(AUTH_COOKIE))
        if session is None:
            return Verdict(False, reason="no-token")
        if method not in _SAFE_METHODS and not self._xsrf_ok(session, headers, query_rest):
            return Verdict(False, by_cookie=True, reason="xsrf")
        rotated: tuple[bytes, ...] = ()
        if effects and self.sessions.due_for_rotation(session):
            rotated = tuple(self.sessions.cookie_headers(self.sessions.rotate(session)))
        return Verdict(True, by_cookie=True, set_cookies=rotated)

    @staticmethod
    def _xsrf_ok(session: Session, headers: dict[bytes, list[bytes]], query: bytes) -> bool:
        presented = (headers.get(b"x-xsrftoken") or [b""])[0].decode("latin-1")
        if not presented:
            for part in query.split(b"&"):
                name, _, value = part.partition(b"=")
                if name == b"_xsrf":
                    presented = unquote_to_bytes(value).decode("latin-1")
        return xsrf_matches(session.xsrf, presented)

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


def missing_xsrf() -> Refusal:
    """The 403 for a cookie-authenticated request without its session's ``_xsrf``."""
    return Refusal(
        403,
        "'_xsrf' argument missing from POST: cookie-authenticated requests must send the '_xsrf' "
        "cookie's value as an X-XSRFToken header.",
        "xsrf",
    )
