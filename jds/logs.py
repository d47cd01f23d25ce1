"""
Where the log goes and what a line may hold: twistd's text format or ``--log-format json``, in a
file only the user can read, of bounded size, with bounded quotes and bursts.

A log file outlives the terminal and is read by tools and people, and a client with no token at
all decides what the proxy logs about it: so every log file the daemon writes is created mode 600
(rotated ones too), rotates at ``LOG_ROTATE_BYTES`` and keeps ``LOG_FILES_KEPT`` old files; a line
quotes at most ``QUOTE_LIMIT`` characters of anything a client (or the hub) sent (:func:`clip`; a
path or URI through :func:`quoted`, its token redacted); and a burst of
identical lines is its first few lines plus one with its count (:class:`RepeatCounter`).

``--log-format json``: one JSON object per log event, for log shippers and ``jq``.

The text format is twistd's own (``TIME [NAMESPACE#LEVEL] message``, one line per event). JSON
replaces it through the hook twistd documents for this: an ``ILogObserver`` component on the
application, consulted when no ``--logger`` is given. Each line holds ``time``, ``level``,
``namespace`` and the formatted ``message``, plus the event's own simple fields (status, bytes,
...) under ``fields`` and a ``traceback`` when the event carries a failure.
"""

from __future__ import annotations

import datetime
import json
import signal
import sys
import time
from collections.abc import Callable, Hashable, Mapping
from typing import Any

from twisted.logger import (
    FileLogObserver,
    Logger,
    LogLevel,
    formatEvent,
    formatEventAsClassicLogText,
    formatTime,
)
from twisted.python.logfile import LogFile

from jds.paths import redact_query

__all__ = [
    "ACCESS_FORMAT", "LOG_FILES_KEPT", "LOG_ROTATE_BYTES", "QUOTE_LIMIT", "RepeatCounter", "clip", "event_record", "json_line",
    "json_observer_for", "log_access", "private_log_file", "quoted", "text_observer_for",
]

# twistd's own rotation size; with the files kept, the log folder holds at most about 11 MB.
LOG_ROTATE_BYTES = 1_000_000
LOG_FILES_KEPT = 10
# What a line quotes of one thing a client sent (a path with its query, a header value).
QUOTE_LIMIT = 1024

# The access line's format (jds.site). Its text line is rendered here without string.Formatter,
# which twisted.logger runs field by field: that was a third of the cost of writing the line.
ACCESS_FORMAT = "{method} {uri} {status} {bytes}B {ms:.1f}ms"

# Keys of legacy (twisted.python.log) events that repeat what the record already says.
_LEGACY_KEYS = frozenset({"message", "isError", "system", "time", "format", "why", "failure", "printed"})


def log_access(logger: Logger, method: str, uri: str, status: int, sent: int, ms: float) -> None:
    """
    The access line: the event ``logger.info(ACCESS_FORMAT, ...)`` emits, to the same observer, but
    without ``Logger.emit``'s check that ``info`` is a log level, which sorts every level for every
    event. ``tests/test_logs.py`` compares the two events.
    """
    logger.observer({
        "method": method, "uri": uri, "status": status, "bytes": sent, "ms": ms,
        "log_logger": logger, "log_level": LogLevel.info, "log_namespace": logger.namespace,
        "log_source": logger.source, "log_format": ACCESS_FORMAT, "log_time": time.time(),
    })


def clip(text: str, limit: int = QUOTE_LIMIT) -> str:
    """``text`` cut to ``limit`` characters, saying how many more there were."""
    if len(text) <= limit:
        return text
    return f"{text[:limit]}...[{len(text) - limit} more]"


def quoted(uri: bytes | str) -> str:
    """
    What a log line quotes of a path or URI a client sent (or the hub's path it became): every
    ``token=`` value redacted, then clipped at ``QUOTE_LIMIT``, as a refusal's line quotes it.
    """
    raw = uri.encode("latin-1", "replace") if isinstance(uri, str) else uri
    return clip(redact_query(raw).decode("latin-1"))


class RepeatCounter:
    """
    Collapses a burst of identical lines. The first ``shown`` of a kind within ``window`` seconds
    are written (a user who tries twice sees both); more of the same kind in that window are only
    counted, and when the window closes one line says how many there were (``summary(count,
    seconds)``). A burst that goes on gets one such line per window; a kind quiet for a whole window
    starts over. ``clock`` is a reactor (``seconds``, ``callLater``).
    """

    def __init__(self, clock: Any, window: float = 10.0, shown: int = 3, max_kinds: int = 256) -> None:
        self.clock = clock
        self.window = window
        self.shown = shown
        self.max_kinds = max_kinds
        self._kinds: dict[Hashable, _Burst] = {}

    def first(self, kind: Hashable, summary: Callable[[int, float], None]) -> bool:
        """Whether to write this line; if not, it is counted into a later ``summary`` line."""
        now = self.clock.seconds()
        burst = self._kinds.get(kind)
        if burst is None or (burst.count == 0 and now - burst.since >= self.window):
            if burst is None and len(self._kinds) >= self.max_kinds:
                self._forget(now)
            self._kinds[kind] = _Burst(now, summary)
            return True
        if burst.count == 0 and burst.written < self.shown:
            burst.written += 1
            return True
        burst.count += 1
        burst.summary = summary
        if burst.timer is None:
            burst.timer = self.clock.callLater(max(burst.since + self.window - now, 0), self._close, kind)
        return False

    def _close(self, kind: Hashable) -> None:
        burst = self._kinds.get(kind)
        if burst is None:
            return
        now = self.clock.seconds()
        count, seconds = burst.count, now - burst.since
        # the burst goes on being counted until it has been quiet for a whole window
        burst.count, burst.since, burst.timer, burst.written = 0, now, None, self.shown
        if count:
            burst.summary(count, seconds)

    def _forget(self, now: float) -> None:
        """Room for a new kind: quiet ones go; if all are busy, their counts are written now."""
        for kind, burst in list(self._kinds.items()):
            if burst.count == 0 and now - burst.since >= self.window:
                del self._kinds[kind]
        if len(self._kinds) < self.max_kinds:
            return
        for kind, burst in list(self._kinds.items()):
            if burst.timer is not None and burst.timer.active():
                burst.timer.cancel()
            burst.timer = None
            self._close(kind)
        self._kinds.clear()


class _Burst:
    __slots__ = ("count", "since", "summary", "timer", "written")

    def __init__(self, since: float, summary: Callable[[int, float], None]) -> None:
        self.since = since
        self.summary = summary
        self.written = 1
        self.count = 0
        self.timer: Any = None


def event_record(event: Mapping[str, Any]) -> dict[str, Any]:
    """The JSON-ready record of one twisted.logger event."""
    level = event.get("log_level")
    stamp = datetime.datetime.fromtimestamp(event.get("log_time", 0.0), datetime.timezone.utc)
    record: dict[str, Any] = {
        "time": stamp.isoformat(timespec="milliseconds"),
        "level": getattr(level, "name", "info"),
        "namespace": event.get("log_namespace", "-"),
        "message": formatEvent(dict(event)),
    }
    fields = {
        key: value
        for key, value in event.items()
        if not key.startswith("log_")
        and key not in _LEGACY_KEYS
        and isinstance(value, str | int | float | bool | type(None))
    }
    if fields:
        record["fields"] = fields
    failure = event.get("log_failure")
    if failure is not None:
        record["traceback"] = failure.getTraceback()
    return record


def json_line(event: Mapping[str, Any]) -> str:
    """One event as one line of JSON: the formatter ``FileLogObserver`` writes (and flushes)."""
    return json.dumps(event_record(event), default=str) + "\n"


class _PerSecondTime:
    """
    twistd's timestamp (``formatTime``: whole seconds, local time zone), computed once a second.
    twisted.logger looks the time zone up again for every event, which was a third of the cost of
    an access line.
    """

    def __init__(self) -> None:
        self._second: int | None = None
        self._text = "-"

    def __call__(self, when: float | None) -> str:
        if when is None:
            return formatTime(when)
        second = int(when)
        if second != self._second:
            self._second, self._text = second, formatTime(second)
        return self._text


def text_observer_for(twistd_config: Mapping[str, Any] | None) -> FileLogObserver | None:
    """twistd's text format, on the destination twistd's options name (see :func:`_observer_for`)."""
    clock = _PerSecondTime()

    def line(event: Mapping[str, Any]) -> str | None:
        if event.get("log_format") is ACCESS_FORMAT and "log_failure" not in event:
            # what formatEventAsClassicLogText makes of it, byte for byte (tests/test_logs.py)
            system = event.get("log_system")
            if system is None:
                level = event.get("log_level")
                system = f"{event.get('log_namespace', '-')}#{'-' if level is None else level.name}"
            return (
                f"{clock(event.get('log_time'))} [{system}] "
                f"{event['method']} {event['uri']} {event['status']} {event['bytes']}B {event['ms']:.1f}ms\n"
            )
        return formatEventAsClassicLogText(event, formatTime=clock)

    return _observer_for(twistd_config, line)


def json_observer_for(twistd_config: Mapping[str, Any] | None) -> FileLogObserver | None:
    """One JSON line per event, on the destination twistd's options name (see :func:`_observer_for`)."""
    return _observer_for(twistd_config, json_line)


def _observer_for(
    twistd_config: Mapping[str, Any] | None, line: Callable[[Mapping[str, Any]], str | None]
) -> FileLogObserver | None:
    """
    ``line`` written where twistd's logging options ask for: ``--logfile`` (``-`` or none with
    ``--nodaemon`` is stdout, none without it twistd's ``twistd.log``). ``None`` when ``--logger``
    or ``--syslog`` chose another destination, which then wins.
    """
    config = twistd_config or {"nodaemon": True}
    if config.get("logger") or config.get("syslog"):
        return None
    name = config.get("logfile")
    if name == "-" or (not name and config.get("nodaemon")):
        return FileLogObserver(sys.stdout, line)
    return FileLogObserver(private_log_file(name or "twistd.log"), line)


def private_log_file(path: str) -> LogFile:
    """
    The log file at ``path`` (twistd's ``--logfile``, or its ``twistd.log`` when a daemon has none):
    mode 600 whatever the umask, an existing one made so too, every rotated one as well (Twisted
    creates each with the mode given here), and at most ``LOG_FILES_KEPT`` rotated files.
    """
    logfile = LogFile.fromFullPath(
        path, rotateLength=LOG_ROTATE_BYTES, defaultMode=0o600, maxRotatedFiles=LOG_FILES_KEPT
    )
    _rotate_on_sigusr1(logfile)
    return logfile


def _rotate_on_sigusr1(logfile: LogFile) -> None:
    """``kill -USR1`` rotates the log now, as twistd does for its text log."""
    if not hasattr(signal, "SIGUSR1") or signal.getsignal(signal.SIGUSR1):
        return

    def rotate(signum: int, frame: Any) -> None:
        from twisted.internet import reactor

        reactor.callFromThread(logfile.rotate)

    signal.signal(signal.SIGUSR1, rotate)
