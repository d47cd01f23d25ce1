"""
Who may talk to the local port at all, judged before any resource sees the request.

The proxy holds a user's cluster credentials on a laptop, and every web page the user opens can send
requests to ``127.0.0.1:8000``. Two checks stop a page from using it:

- ``Host`` must be a name the proxy listens as: a page on ``evil.example`` that re-resolves its name
  to 127.0.0.1 (DNS rebinding) still sends ``Host: evil.example``.
- ``Origin``, when a browser sends one, must be the proxy's own or one the user allowed with
  ``--allow-origin``. IDE clients running on Node send none.

The channel decides as soon as a request's headers are complete, before reading its body: a refused
request (Host, Origin, local token, path, size) is answered and its connection closed, so a web page's
96 MiB form post costs nothing but the bytes the kernel already buffered. It also bounds what a
client can hold: headers and bodies that trickle (slowloris), bodies over ``--max-body-size`` and
bodies where none is taken (a WebSocket upgrade's, the daemon's own pages'); and it says in the log
when it refuses a malformed request, which twisted.web does silently, answering with the same JSON
as every other refusal. How many connections the port holds is :mod:`jds.connections`' business; the
channel tells it when a connection is the token holder's (its ``slot``).

Each phase of a connection has one deadline, the channel's own: the headers (``--header-timeout``,
then 408), a body's pauses (``--body-timeout``, then 408), the wait between requests (twisted.web's
idle timeout, then a quiet close). twisted.web's idle timer, which restarts with every byte, is not
used: it raced the body's deadline and dropped stalled bodies with no answer, and it dropped a body
the proxy itself had stopped reading because the hub was slow.

Header lines are judged here before twisted.web sees them: Twisted before 26.10 stores a header value
holding CR, LF or NUL as it came (a client could smuggle a second header line through to the hub),
so what reaches the hub must not depend on which Twisted the user has.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote_to_bytes

from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.http import RESPONSES, HTTPChannel
from twisted.web.server import Request

from jds.errors import error_body, log_refusal
from jds.logs import clip, quoted
from jds.paths import MAX_REWRITTEN_BODY, body_too_large_to_map, split_authority
from jds.refusal import Refusal

__all__ = [
    "LOOPBACK_NAMES", "GuardedChannel", "Limits", "LocalGuard", "body_not_taken", "header_problem", "is_loopback",
    "origin_refusal", "request_line_problem",
]

log = Logger(namespace="jds")

# A request's line and headers must all arrive within this long once its first byte has.
HEADER_TIMEOUT = 30.0
# After a refusal, what the client still sends is read and dropped for this long (and this much)
# so that it can read the answer; a reset right away could destroy the answer in its kernel.
_LINGER_SECONDS = 2.0
_LINGER_BYTES = 4 << 20
# RFC 9110 5.1: a header name is a token; 5.5: a value never holds NUL, CR or LF.
_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_FORBIDDEN_IN_VALUE = b"\x00\r\n"
_GOOD_LINE = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+:[^\x00\r\n]*")
_FORBIDDEN_IN_PATH = bytes(range(0x21)) + b"\x7f"
# Tokens already: no regular expression run for them (a match costs more than the rest of the check).
_COMMON_METHODS = frozenset({b"GET", b"HEAD", b"POST", b"PUT", b"PATCH", b"DELETE", b"OPTIONS"})


def header_problem(line: bytes) -> str | None:
    """
    Why one request header line is malformed, or ``None``. A line without a colon is left to
    twisted.web, which refuses it in every version. The value is never quoted: it may be a token.
    """
    if _GOOD_LINE.fullmatch(line) is not None:
        return None  # the usual line, in one match; the rest are looked at piece by piece
    name, colon, value = line.partition(b":")
    if not colon:
        return None
    shown = name[:64].decode("latin-1")
    if not _TOKEN.fullmatch(name):
        return f"the header name {shown!r} is not an HTTP token (RFC 9110 section 5.1)."
    if len(value.translate(None, _FORBIDDEN_IN_VALUE)) != len(value):
        return f"the value of header {shown!r} holds a CR, LF or NUL character (RFC 9110 section 5.5)."
    return None


def request_line_problem(method: bytes, target: bytes, version: bytes) -> str | None:
    """
    Why a request line is malformed, or ``None``: the method must be a token, the path free of
    control characters and spaces, the version HTTP/1.0 or 1.1 (what twisted.web answers in).
    """
    if method not in _COMMON_METHODS and not _TOKEN.fullmatch(method):
        return "the request method is not an HTTP token (RFC 9110 section 9.1)."
    if len(target.translate(None, _FORBIDDEN_IN_PATH)) != len(target):
        return "the request path holds a control character or a space."
    if version not in (b"HTTP/1.0", b"HTTP/1.1"):
        return "the HTTP version is neither HTTP/1.0 nor HTTP/1.1."
    return None


@dataclass(frozen=True)
class Limits:
    """What one client may hold of the proxy; each is an option (0 means no limit)."""

    max_body: int = 0  # --max-body-size: request bodies stream to the hub, so unlimited by default
    held_body: int = 1 << 20  # --held-body-size: a body kept to be sent again once the server is up
    body_timeout: float = 60.0  # --body-timeout: longest pause within a request body
    connections_per_client: int = 256  # --max-connections-per-client
    connections: int = 512  # --max-connections: all clients together (see jds.connections)
    max_message: int = 256 << 20  # --max-message-size: one WebSocket message (then 1009)

    def body_refusal(self, length: int) -> Refusal | None:
        if self.max_body and length > self.max_body:
            return Refusal(
                413,
                f"The request body is larger than this proxy accepts ({self.max_body} bytes); "
                "start jupyter-dev-server with a larger --max-body-size.",
                "body-too-large",
            )
        return None


def body_not_taken(raw_path: bytes, request: Request) -> Refusal | None:
    """
    A request that never has a body, refused from its headers when it declares one: a WebSocket
    upgrade (autobahn would never read it, and it would lie on the disk while the socket lives) and
    the daemon's own pages under ``/_jds/`` (twisted.web finds them by the unquoted first segment).
    """
    upgrade = request.requestHeaders.getRawHeaders(b"upgrade") or []
    if any(value.strip().lower() == b"websocket" for value in upgrade):
        return Refusal(400, "A WebSocket upgrade request carries no body; this one declares one.", "body-not-allowed")
    if unquote_to_bytes(raw_path[1:].partition(b"/")[0]) == b"_jds":
        return Refusal(413, "jupyter-dev-server's own pages (/_jds/) take no request body.", "body-too-large")
    return None


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
    # Host values already judged good: parsing one (split_authority) cost ~13 µs of every request.
    # Few can pass (our names, with our port or none), and the set is bounded and reset on listening.
    _passed: set[str] = field(default_factory=set, repr=False, compare=False)

    @classmethod
    def build(cls, allowed_hosts: list[str], allowed_origins: list[str]) -> LocalGuard:
        return cls(
            allowed_hosts=frozenset(h.lower() for h in allowed_hosts),
            allowed_origins=frozenset(o.lower().rstrip("/").encode("ascii", "replace") for o in allowed_origins),
        )

    def listening(self, interface: str, port: int) -> None:
        self._passed.clear()
        self.port = port
        if interface and interface not in ("0.0.0.0", "::"):
            self.names.add(interface.strip("[]").lower())

    def host_refusal(self, request: Request) -> str | None:
        values = request.requestHeaders.getRawHeaders(b"host") or []
        if len(values) != 1:
            return "The request must carry exactly one Host header."
        raw = values[0].decode("latin-1").strip().lower()
        if raw in self.allowed_hosts or raw in self._passed:
            return None
        name, port = split_authority(raw)
        port_ok = self.port is None or port in (self.port, None)
        if name in self.allowed_hosts or (name in self.names and port_ok):
            if len(self._passed) < 32:
                self._passed.add(raw)
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


def _drop_line(line: bytes) -> bool:
    return True  # LineReceiver stops at a true answer


# The phases of a connection that have a deadline (GuardedChannel): one at a time.
HEADERS, BODY, IDLE, CLOSING = "headers", "body", "idle", "closing"


class PhaseDeadline:
    """
    The one timer of a connection, for whichever phase has a deadline now. A timer started and
    cancelled for each phase of each request (the headers, then the wait before the next) was two
    ``callLater`` and two ``cancel`` per request, and a reactor heap full of cancelled calls. Here a
    phase sets its deadline with a clock read: the timer, still set for an earlier deadline, fires
    then, finds the deadline later and is set again for what is left. Only a deadline sooner than
    the timer moves it (the headers' after a long idle wait), and between phases nothing is due.
    ``expired(phase)`` is called when the phase's deadline passes.
    """

    __slots__ = ("_call_later", "_due", "_expired", "_seconds", "_timer", "phase")

    # A deadline this close is due (the reactor's float time, re-armed timers).
    _SLACK = 1e-6

    def __init__(
        self, call_later: Callable[..., Any], seconds: Callable[[], float], expired: Callable[[str], None]
    ) -> None:
        self._call_later = call_later
        self._seconds = seconds
        self._expired = expired
        self._timer: Any = None  # pending whenever it is not None
        self._due = 0.0
        self.phase: str | None = None

    def start(self, phase: str, timeout: float) -> None:
        """``phase`` has ``timeout`` seconds from now (started again: from now again)."""
        due = self._seconds() + timeout
        self._due, self.phase = due, phase
        timer = self._timer
        if timer is None:
            self._timer = self._call_later(timeout, self._fire)
        elif timer.getTime() > due:
            timer.reset(timeout)

    def stop(self, *phases: str) -> None:
        """Nothing is due now (if the phase is one of ``phases``, when any are named)."""
        if not phases or self.phase in phases:
            self.phase = None

    def cancel(self) -> None:
        """The connection is over: nothing is ever due again."""
        self.phase = None
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _fire(self) -> None:
        self._timer = None
        phase = self.phase
        if phase is None:
            return
        left = self._due - self._seconds()
        if left > self._SLACK:
            self._timer = self._call_later(left, self._fire)
            return
        self.phase = None
        self._expired(phase)


class GuardedChannel(HTTPChannel):
    """
    ``HTTPChannel``'s idle timeout restarts with every byte, so a client sending one header byte a
    minute holds a connection for ever; here the headers as a whole have a deadline, and a body may
    pause at most ``limits.body_timeout``. Once the headers are complete the site judges the request
    (:meth:`LocalSite.refusal_before_body`); a refusal is answered at once and the body never read.
    Between requests the connection may idle for ``idle_timeout`` (twisted.web's ``timeOut``, which
    the channel takes over: see the module docstring).
    """

    header_timeout = HEADER_TIMEOUT
    limits = Limits()
    slot: Any = None  # jds.connections.ConnectionSlot, when the port's connections are counted
    idle_timeout: float | None = None
    _awaiting_headers = True
    _deadline: PhaseDeadline
    _body_seen = 0
    _body_cap = 0  # a body read whole (not streamed to the hub) is at most this; 0: no such bound
    _in_body = False
    _refused = False
    _request_line = b""
    _dropped = 0
    _bad_header: str | None = None

    def connectionMade(self) -> None:
        """The clock starts at once: a client that connects and says nothing is a slowloris too."""
        self.idle_timeout, self.timeOut = self.timeOut, None  # twisted.web's own timer never starts
        clock = getattr(self.callLater, "__self__", None)  # the site's reactor (a Clock in tests)
        if clock is None or not hasattr(clock, "seconds"):
            from twisted.internet import reactor as clock
        self._deadline = PhaseDeadline(self.callLater, clock.seconds, self._deadline_passed)
        super().connectionMade()
        self._deadline.start(HEADERS, self.header_timeout)

    def _deadline_passed(self, phase: str) -> None:
        if phase == HEADERS:
            self._headers_too_slow()
        elif phase == BODY:
            self._body_too_slow()
        elif phase == IDLE:
            self._idle_too_long()
        elif self.transport is not None:  # CLOSING: what was still to be written did not go
            self.transport.abortConnection()

    def dataReceived(self, data: bytes) -> None:
        if self._refused:
            self._dropped += len(data)
            if self._dropped > _LINGER_BYTES and self.transport is not None:
                self.transport.abortConnection()
            return
        if self._awaiting_headers and self._deadline.phase != HEADERS:
            self._deadline.start(HEADERS, self.header_timeout)  # the idle wait's deadline goes
        super().dataReceived(data)

    def lineReceived(self, line: bytes) -> bool | None:
        if line and getattr(self, "_HTTPChannel__first_line", 0):
            # what a burst of one malformed request is told apart by (Twisted refuses a bad request
            # line before anything else of it is kept)
            self._request_line = line
        return super().lineReceived(line)

    def headerReceived(self, line: bytes) -> bool:
        """A malformed header is kept out of the request and answered once all headers are in."""
        problem = header_problem(line)
        if problem is not None:
            self._bad_header = self._bad_header or problem
            return True
        return super().headerReceived(line)

    def allHeadersReceived(self) -> None:
        self._awaiting_headers = False
        self._cancel_deadline()
        problem = self._bad_header or request_line_problem(self._command, self._path, self._version)
        if problem is not None:
            self._bad_header = None
            self.malformed(problem)
            return
        request = self.requests[-1]
        judge = getattr(getattr(self, "site", None), "refusal_before_body", None)
        refusal = judge(self._command, self._path, request, self.length) if judge else None
        if refusal is not None:
            self.refuse(refusal)
            return
        self._protect(request)
        super().allHeadersReceived()
        self._body_seen = 0
        # Read whole only to be mapped (--root) or a login form, bounded from the headers already.
        self._body_cap = 0 if getattr(request, "body", None) is not None else MAX_REWRITTEN_BODY
        self._in_body = self.length != 0
        if self._in_body:
            self._start_body_deadline()
        accepted = getattr(self.requests[-1], "headers_accepted", None)
        if accepted is not None:
            accepted(self._command, self._path, self._version)

    def _protect(self, request: Request) -> None:
        """
        Tell the connection count that this connection is the token holder's, so that it is never
        dropped to make room (:mod:`jds.connections`): for good once a request showed the local token,
        or in pass-through mode (no local token) while this request is served.
        """
        slot = self.slot
        if slot is None:
            return
        credentials = getattr(getattr(self, "site", None), "credentials", None)
        if credentials is None or not credentials.managed:
            slot.protect()
            return
        if slot.for_good and slot.vouched_by == credentials.local_token:
            return  # shown before, and not replaced since (rotate-token)
        headers = {name.lower(): values for name, values in request.requestHeaders.getAllRawHeaders()}
        query = self._path.partition(b"?")[2]
        if credentials.check(self._command, query, headers, effects=False).allowed:
            slot.protect(for_good=True)
            slot.vouched_by = credentials.local_token
        else:
            slot.revoke()  # the token it showed was replaced: it holds nothing now

    def _start_body_deadline(self) -> None:
        if self.limits.body_timeout and self._deadline.phase != BODY:
            self._deadline.start(BODY, self.limits.body_timeout)

    def pause_body(self) -> None:
        """
        The hub cannot take more of the body now: stop reading it. Its clock stops too, since the
        wait is not the client's.
        """
        self._cancel_body_deadline()
        if self.transport is not None:
            self.transport.pauseProducing()

    def resume_body(self) -> None:
        if self.transport is None or self._refused:
            return
        if self._in_body:
            self._start_body_deadline()
        if not self._handlingRequest:  # else the channel resumes reading once the request is done
            self.transport.resumeProducing()

    def rawDataReceived(self, data: bytes) -> None:
        if self._refused:
            return
        if self._deadline.phase == BODY:
            self._deadline.start(BODY, self.limits.body_timeout)
        super().rawDataReceived(data)

    def body_received(self, size: int) -> None:
        """Called by the request for each piece of its body: a chunked body has no length up front."""
        self._body_seen += size
        refusal = self.limits.body_refusal(self._body_seen)
        if refusal is None and self._body_cap and self._body_seen > self._body_cap:
            refusal = body_too_large_to_map(None)
        if refusal is not None and not self._refused:
            self.refuse(refusal)

    def allContentReceived(self) -> None:
        if self._refused:
            return
        self._in_body = False
        self._cancel_body_deadline()
        super().allContentReceived()

    def checkPersistence(self, request: Request, version: bytes) -> bool:
        """
        ``Connection`` is a comma-separated list, in any number of headers (RFC 9110 7.6.1):
        twisted.web splits only the first header's at spaces, so ``keep-alive,close`` kept the
        connection open. Whether it closes is said in the answer (``_TimedRequest.write``).
        """
        tokens = {
            token.strip().lower()
            for value in request.requestHeaders.getRawHeaders(b"connection", [])
            for token in value.split(b",")
        }
        return version == b"HTTP/1.1" and b"close" not in tokens

    def requestDone(self, request: Request) -> None:
        """Answered: the connection holds nothing now, and may idle until the next request."""
        self._awaiting_headers = True
        if self.slot is not None:
            self.slot.unprotect()
        if self.idle_timeout and self.persistent and self.transport is not None:
            self._deadline.start(IDLE, self.idle_timeout)
        super().requestDone(request)  # may read a request that was sent meanwhile: its headers' clock then runs

    def connectionLost(self, reason) -> None:
        self._deadline.cancel()
        super().connectionLost(reason)

    def _idle_too_long(self) -> None:
        """
        Between requests nothing is owed to the client: the connection just ends, as twisted.web ends
        it, and is aborted if what is still to be written to it has not gone in ``abortTimeout`` more.
        """
        if self.transport is not None:
            self.transport.loseConnection()
            if self.abortTimeout is not None:
                self._deadline.start(CLOSING, self.abortTimeout)

    def refuse(self, refusal: Refusal) -> None:
        """
        Answer the request whose headers just arrived (or whose body is being read) and end the
        connection without reading the rest: the body is never buffered, parsed or spooled.
        """
        log_refusal(
            getattr(self, "site", None), getattr(self, "_command", b"?"), getattr(self, "_path", b"?"), refusal,
            " (refused before its body; connection closed)",
        )
        self._answer(refusal)

    def malformed(self, why: str) -> None:
        """
        Refuse a request twisted.web or this guard could not accept as HTTP with a JSON 400 and
        one log line; its method and path may not exist, so the line names the client instead.
        """
        if self._refused:
            return
        peer, why = self._peer(), clip(why)
        # the same malformed request again (its request line, as sent), as a refusal's burst is
        kind = ("malformed-request", quoted(self._request_line), why)

        def summary(count: int, seconds: float) -> None:
            log.warn(
                "Refused the same malformed HTTP request {count} more time(s) in {seconds:.0f} s (the last "
                "from {peer}): {why}", count=count, seconds=seconds, peer=peer, why=why,
            )

        if self._first_of_burst(kind, summary):
            log.warn("Refused a malformed HTTP request from {peer}: {why}", peer=peer, why=why)
        self._answer(Refusal(400, f"The proxy refused a malformed HTTP request: {why}", "malformed-request"))

    def _answer(self, refusal: Refusal) -> None:
        status, message, reason = refusal.status, refusal.message, refusal.reason
        self._refused = True
        # The lines still buffered are dropped: the half-closed transport is not ``disconnecting``,
        # which is what stops LineReceiver otherwise (an override per line cost every request a call).
        self.lineReceived = _drop_line  # type: ignore[method-assign]
        self._in_body = False
        self._cancel_deadline()
        self._cancel_body_deadline()
        request = self.requests[-1] if self.requests else None
        refused_body = getattr(request, "body_refused", None)
        if refused_body is not None:
            refused_body(Failure(refusal))  # a request rendered before its body: it answers nothing now
        answered = request is not None and getattr(request, "startedWriting", False)
        content = getattr(request, "content", None)
        if content is not None and not answered:
            content.close()  # a body being read whole, cut short: its buffer or file goes with the answer
        stats = getattr(getattr(self, "site", None), "stats", None)
        if stats is not None:
            stats.error(status, message, reason)
        transport = self.transport
        if transport is None:
            return
        if answered:
            # The hub's answer to it has begun already: a second answer would corrupt it.
            transport.loseConnection()
            return
        body = error_body(message, reason)
        head = b"HTTP/1.1 %d %s\r\n" % (status, RESPONSES.get(status, b"Error"))
        head += b"Content-Type: application/json; charset=UTF-8\r\nContent-Length: %d\r\n" % len(body)
        head += b"Connection: close\r\n\r\n"
        transport.write(head + body)
        # Half-close: the client reads the answer, then EOF; what it still sends is dropped.
        lose_write = getattr(transport, "loseWriteConnection", None)
        if lose_write is None:
            transport.loseConnection()
            return
        lose_write()
        self.callLater(_LINGER_SECONDS, transport.loseConnection)

    def _cancel_body_deadline(self) -> None:
        self._deadline.stop(BODY)

    def _body_too_slow(self) -> None:
        self.refuse(Refusal(
            408,
            f"The request body stalled: nothing arrived for {self.limits.body_timeout:g} s.",
            "body-timeout",
            "A client that pauses longer in mid-body needs a larger --body-timeout.",
        ))

    def _cancel_deadline(self) -> None:
        self._deadline.stop(HEADERS)

    def _peer(self) -> str:
        peer = self.transport.getPeer() if self.transport is not None else None
        return f"{getattr(peer, 'host', '?')}:{getattr(peer, 'port', '?')}"

    def _first_of_burst(self, kind: tuple[str, ...], summary: Any) -> bool:
        """Whether to write this line: a burst of one kind is three lines, then a count every 10 s (jds.logs)."""
        repeats = getattr(getattr(self, "site", None), "repeats", None)
        return repeats is None or repeats.first(kind, summary)

    def _headers_too_slow(self) -> None:
        timeout = self.header_timeout

        def summary(count: int, seconds: float) -> None:
            log.warn(
                "Dropped {count} more client(s) in {took:.0f} s that did not send their request headers "
                "within {seconds:g} s.", count=count, took=seconds, seconds=timeout,
            )

        if self._first_of_burst(("header-timeout",), summary):
            log.warn(
                "Dropped a client ({peer}) that did not send its request headers within {seconds:g} s.",
                peer=self._peer(),
                seconds=timeout,
            )
        self.transport.write(b"HTTP/1.1 408 Request Timeout\r\nConnection: close\r\n\r\n")
        self.transport.loseConnection()

    def lineLengthExceeded(self, line: bytes) -> None:
        """LineReceiver would drop the connection without a word; say 400 like any bad request."""
        self._respondToBadRequestAndDisconnect()

    def _respondToBadRequestAndDisconnect(self) -> None:
        """twisted.web's own refusals (it says only ``400 Bad Request``) get the guard's answer."""
        self.malformed(
            "a bad request line, header or chunking, or headers over "
            f"{self.totalHeadersSize} bytes or {self.maxHeaders} lines."
        )
