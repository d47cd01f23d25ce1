"""
Who may talk to the local port at all, judged before any resource sees the request.

The proxy holds a user's cluster credentials on a laptop, and every web page the user opens can send
requests to ``127.0.0.1:8000``. Two checks stop a page from using it:

- ``Host`` must be a name the proxy listens as: a page on ``evil.example`` that re-resolves its name
  to 127.0.0.1 (DNS rebinding) still sends ``Host: evil.example``.
- ``Origin``, when a browser sends one, must be the proxy's own or one the user allowed with
  ``--allow-origin``. IDE clients running on Node send none.

And the channel itself does not wait forever for a client that trickles its headers (slowloris), and
says in the log when it refuses a malformed request, which twisted.web does silently.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from twisted.logger import Logger
from twisted.web.http import HTTPChannel
from twisted.web.server import Request

from jds.paths import split_authority
from jds.refusal import Refusal

__all__ = ["LOOPBACK_NAMES", "GuardedChannel", "LocalGuard", "is_loopback", "origin_refusal"]

log = Logger(namespace="jds")

# A request's line and headers must all arrive within this long once its first byte has.
HEADER_TIMEOUT = 30.0

LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})


def is_loopback(host: str) -> bool:
    host = host.strip("[]").lower()
    return host in LOOPBACK_NAMES or host.startswith("127.")


def origin_refusal(request: Request, allowed_origins: frozenset[bytes]) -> str | None:
    """
    ``None`` when the request's ``Origin`` may use the proxy (none at all, the proxy's own, or one of
    ``allowed_origins``), else the sentence that explains the refusal.
    """
    origins = request.requestHeaders.getRawHeaders(b"origin") or []
    if not origins:
        return None
    host = (request.getHeader(b"host") or b"").lower()
    own = {(b"https://" if request.isSecure() else b"http://") + host} if host else set()
    origin = origins[0].strip().lower().rstrip(b"/")
    if len(origins) == 1 and (origin in own or origin in allowed_origins):
        return None
    shown = b", ".join(origins).decode("latin-1")
    return (
        f"Requests from the web page at {shown} are not allowed; "
        "start jupyter-dev-server with --allow-origin to allow that page."
    )


@dataclass
class LocalGuard:
    """``port`` is filled in once the proxy listens (``--listen tcp:0`` picks it then)."""

    allowed_hosts: frozenset[str] = frozenset()
    allowed_origins: frozenset[bytes] = frozenset()
    port: int | None = None
    names: set[str] = field(default_factory=lambda: set(LOOPBACK_NAMES))

    @classmethod
    def build(cls, allowed_hosts: list[str], allowed_origins: list[str]) -> LocalGuard:
        return cls(
            allowed_hosts=frozenset(h.lower() for h in allowed_hosts),
            allowed_origins=frozenset(o.lower().rstrip("/").encode("ascii", "replace") for o in allowed_origins),
        )

    def listening(self, interface: str, port: int) -> None:
        self.port = port
        if interface and interface not in ("0.0.0.0", "::"):
            self.names.add(interface.strip("[]").lower())

    def host_refusal(self, request: Request) -> str | None:
        values = request.requestHeaders.getRawHeaders(b"host") or []
        if len(values) != 1:
            return "The request must carry exactly one Host header."
        raw = values[0].decode("latin-1").strip().lower()
        if raw in self.allowed_hosts:
            return None
        name, port = split_authority(raw)
        port_ok = self.port is None or port in (self.port, None)
        if name in self.allowed_hosts or (name in self.names and port_ok):
            return None
        return (
            f"Host {raw!r} is not a name this proxy listens as (DNS rebinding?); "
            "start jupyter-dev-server with --allow-host to accept it."
        )

    def refusal(self, request: Request) -> Refusal | None:
        """A 403 when the request must be refused before anything else sees it."""
        host = self.host_refusal(request)
        if host:
            return Refusal(403, host, "host-refused")
        origin = origin_refusal(request, self.allowed_origins)
        if origin:
            return Refusal(403, origin, "origin-refused")
        return None


class GuardedChannel(HTTPChannel):
    """
    ``HTTPChannel``'s idle timeout restarts with every byte, so a client sending one header byte a
    minute holds a connection for ever; here the headers as a whole have a deadline.
    """

    header_timeout = HEADER_TIMEOUT
    _awaiting_headers = True
    _header_deadline = None

    def connectionMade(self) -> None:
        """The clock starts at once: a client that connects and says nothing is a slowloris too."""
        super().connectionMade()
        self._header_deadline = self.callLater(self.header_timeout, self._headers_too_slow)

    def dataReceived(self, data: bytes) -> None:
        if self._awaiting_headers and self._header_deadline is None:
            self._header_deadline = self.callLater(self.header_timeout, self._headers_too_slow)
        super().dataReceived(data)

    def allHeadersReceived(self) -> None:
        self._awaiting_headers = False
        self._cancel_deadline()
        super().allHeadersReceived()

    def requestDone(self, request: Request) -> None:
        self._awaiting_headers = True
        super().requestDone(request)

    def connectionLost(self, reason) -> None:
        self._cancel_deadline()
        super().connectionLost(reason)

    def _cancel_deadline(self) -> None:
        if self._header_deadline is not None and self._header_deadline.active():
            self._header_deadline.cancel()
        self._header_deadline = None

    def _peer(self) -> str:
        peer = self.transport.getPeer() if self.transport is not None else None
        return f"{getattr(peer, 'host', '?')}:{getattr(peer, 'port', '?')}"

    def _headers_too_slow(self) -> None:
        self._header_deadline = None
        log.warn(
            "Dropped a client ({peer}) that did not send its request headers within {seconds:g} s.",
            peer=self._peer(),
            seconds=self.header_timeout,
        )
        self.transport.write(b"HTTP/1.1 408 Request Timeout\r\nConnection: close\r\n\r\n")
        self.transport.loseConnection()

    def lineLengthExceeded(self, line: bytes) -> None:
        """LineReceiver would drop the connection without a word; say 400 like any bad request."""
        self._respondToBadRequestAndDisconnect()

    def _respondToBadRequestAndDisconnect(self) -> None:
        log.warn(
            "Refused a malformed HTTP request from {peer} (bad request line, headers or chunking, "
            "or headers over {size} bytes or {count} lines).",
            peer=self._peer(),
            size=self.totalHeadersSize,
            count=self.maxHeaders,
        )
        super()._respondToBadRequestAndDisconnect()
