"""
Keeping the IDE's WebSocket open while the link to the hub is broken: which sockets may be
reconnected, when to try again, what waits meanwhile and when to give up.

The proxy sits next to the IDE, so only its own connection to the hub breaks (a Wi-Fi change, a VPN
blip, a laptop asleep). jupyter_server keeps a kernel's messages for a client that went away and
replays them, in order, to a client that comes back with the same ``session_id``; the relay
(:mod:`jds.relay`) reconnects with that ``session_id`` and lets the IDE carry on as if nothing had
happened. This module holds the decisions, as plain values and functions of time passed in, so they
are tested without a reactor. No Twisted type enters it.

Time: the reconnect window counts *awake* seconds, read from ``time.monotonic``. On Linux and macOS
that clock stops while the machine is suspended, so a laptop that sleeps overnight with a notebook
open tries again when it wakes (the kernel may well still be there) instead of having given up in
its sleep (where the monotonic clock goes on during sleep, as it may on Windows, the window is
wall-clock time, and a long sleep ends in the 1011 on wake). The outage a person is told about (log, status page, close reason) is that same awake
time; the status page also gives the wall-clock time the outage started.
"""

from __future__ import annotations

import datetime
import json
import re
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from urllib.parse import parse_qsl

__all__ = [
    "FIRST_DELAY",
    "MAX_DELAY",
    "HeldFrames",
    "Outage",
    "ReconnectPolicy",
    "ReplayCount",
    "backoff",
    "describe_duration",
    "message_date",
    "reconnectable",
    "with_session_id",
]

FIRST_DELAY = 0.5
MAX_DELAY = 10.0
# jupyter_server starts buffering only once it has noticed the old socket's close; the first
# attempt waits a little so that it usually has (a reconnect that wins the race gets no replay).

# The sockets whose server side survives the proxy's link: a kernel's channels (with replay), a
# terminal (the shell survives; its output during the gap is lost) and the event stream.
_RECONNECTABLE = (
    ("kernel", re.compile(rb"^/api/kernels/[^/]+/channels$")),
    ("terminal", re.compile(rb"^/terminals/websocket/[^/]+$")),
    ("events", re.compile(rb"^/api/events/subscribe$")),
)


def reconnectable(local_path: bytes) -> str | None:
    """``"kernel"``, ``"terminal"`` or ``"events"`` for a socket the relay keeps open across a
    broken hub link; ``None`` for any other (it is closed with 1011, as before)."""
    for kind, pattern in _RECONNECTABLE:
        if pattern.match(local_path):
            return kind
    return None


def with_session_id(query: bytes) -> bytes:
    """
    ``query`` with a ``session_id`` of the proxy's own when the IDE sent none: jupyter_server
    replays a kernel's buffered messages only to a client with the same ``session_id``, and the
    proxy reconnects with the query it first sent, so its reconnects are replayed to for every IDE.
    """
    pairs = parse_qsl(query.decode("latin-1"), keep_blank_values=True)
    if any(name == "session_id" and value for name, value in pairs):
        return query
    own = b"session_id=jds-" + uuid.uuid4().hex.encode("ascii")
    kept = b"&".join(part for part in query.split(b"&") if part and not part.startswith(b"session_id="))
    return kept + b"&" + own if kept else own


def backoff(first: float = FIRST_DELAY, cap: float = MAX_DELAY) -> Iterator[float]:
    """Seconds before each attempt: 0.5, 1, 2, 4, 8, then 10 for ever."""
    delay = first
    while True:
        yield delay
        delay = min(delay * 2, cap)


def describe_duration(seconds: float) -> str:
    """``3.2 s``, ``4 min 10 s``, ``2 h 5 min``: short enough for a 123-byte close reason."""
    if seconds < 60:
        return f"{seconds:.1f} s"
    whole = int(seconds)
    if whole < 3600:
        return f"{whole // 60} min {whole % 60} s"
    return f"{whole // 3600} h {whole % 3600 // 60} min"


@dataclass(frozen=True)
class ReconnectPolicy:
    """``window``: awake seconds an outage may last (0: never reconnect); ``max_held``: bytes of
    the IDE's messages held for the hub meanwhile."""

    window: float = 15 * 60.0
    max_held: int = 64 << 20

    @property
    def enabled(self) -> bool:
        return self.window > 0

    def gave_up(self, outage: Outage, now: float) -> str | None:
        """The close reason once ``outage`` has lasted longer than the window, else ``None``."""
        if outage.awake(now) < self.window:
            return None
        return (
            f"The hub was unreachable for {describe_duration(outage.awake(now))}; "
            "jupyter-dev-server gave up (--reconnect-window)."
        )

    def too_much_held(self, outage: Outage, now: float) -> str:
        mib = self.max_held / (1 << 20)
        return (
            f"The hub was unreachable for {describe_duration(outage.awake(now))} and more than "
            f"{mib:g} MiB from the IDE waited for it (--reconnect-buffer)."
        )


@dataclass
class Outage:
    """One socket's time without its hub side: since when (monotonic and wall clock) and why."""

    reason: str
    started: float  # time.monotonic()
    wall_started: float  # time.time()
    attempts: int = 0
    not_found: int = 0  # 404 answers so far

    def awake(self, now: float) -> float:
        return max(0.0, now - self.started)


@dataclass
class HeldFrames:
    """The IDE's messages waiting for the hub, in order, with their total size against a bound."""

    limit: int
    frames: list[tuple[bytes, bool]] = field(default_factory=list)
    size: int = 0

    def hold(self, payload: bytes, is_binary: bool) -> bool:
        """Keep one message; ``False`` once the total is past the bound."""
        self.frames.append((payload, is_binary))
        self.size += len(payload)
        return self.size <= self.limit

    def take(self) -> list[tuple[bytes, bool]]:
        frames, self.frames, self.size = self.frames, [], 0
        return frames


def message_date(payload: bytes, is_binary: bool, subprotocol: str | None) -> float | None:
    """
    The ``header.date`` of a kernel message as POSIX seconds (the kernel's clock), from either
    framing jupyter_server speaks: ``v1.kernel.websocket.jupyter.org`` (binary: offsets, channel,
    header, ...) or the legacy JSON text. ``None`` when it cannot be read.
    """
    try:
        if is_binary and subprotocol:
            count = int.from_bytes(payload[:8], "little")
            if count < 3:
                return None
            start = int.from_bytes(payload[16:24], "little")
            end = int.from_bytes(payload[24:32], "little")
            header = json.loads(payload[start:end])
        elif not is_binary:
            header = json.loads(payload)["header"]
        else:
            return None
        text = header["date"]
        if text.endswith("Z"):
            text = text[:-1] + "+00:00"
        moment = datetime.datetime.fromisoformat(text)
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=datetime.timezone.utc)
        return moment.timestamp()
    except (ValueError, KeyError, TypeError, AttributeError, IndexError):
        return None


class ReplayCount:
    """
    How many of the messages that follow a reconnect jupyter_server replayed from its buffer.

    It replays before it forwards anything new, and what it replays was made by the kernel during
    the outage. So the relay notes the last message it got before the link broke (its
    ``header.date``, kernel clock, and the wall-clock second it arrived); the kernel's clock at the
    reconnect is that date plus the wall-clock time that passed since. Messages after the reconnect
    dated before that moment are counted as replayed; the first one dated after it (or one whose
    date cannot be read) ends the count. Only the two clocks' *rates* matter, not their offset; the
    error is the difference of two network latencies, milliseconds.
    """

    def __init__(self, reference: tuple[float, float] | None, reopened_wall: float) -> None:
        self.counting = reference is not None
        self.known = reference is not None
        self.replayed = 0
        self._until = reference[0] + (reopened_wall - reference[1]) if reference is not None else 0.0

    def seen(self, date: float | None) -> None:
        if not self.counting:
            return
        if date is not None and date < self._until:
            self.replayed += 1
        else:
            self.counting = False

    def describe(self) -> str:
        if not self.known:
            return "replayed messages not counted"
        plural = "" if self.replayed == 1 else "s"
        return f"{self.replayed} message{plural} replayed by the server"
