"""
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
from collections.abc import Callable, Mapping
from typing import Any

from twisted.logger import FileLogObserver, formatEvent, formatEventAsClassicLogText, formatTime
from twisted.python.logfile import LogFile

__all__ = ["ACCESS_FORMAT", "event_record", "json_line", "json_observer_for", "text_observer_for"]

# The access line's format (jds.site). Its text line is rendered here without string.Formatter,
# which twisted.logger runs field by field: that was a third of the cost of writing the line.
ACCESS_FORMAT = "{method} {uri} {status} {bytes}B {ms:.1f}ms"

# Keys of legacy (twisted.python.log) events that repeat what the record already says.
_LEGACY_KEYS = frozenset({"message", "isError", "system", "time", "format", "why", "failure", "printed"})


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
            message = f"{event['method']} {event['uri']} {event['status']} {event['bytes']}B {event['ms']:.1f}ms"
            return f"{clock(event.get('log_time'))} [{system}] {message}\n"
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
    logfile = LogFile.fromFullPath(name or "twistd.log")
    _rotate_on_sigusr1(logfile)
    return FileLogObserver(logfile, line)


def _rotate_on_sigusr1(logfile: LogFile) -> None:
    """``kill -USR1`` rotates the log now, as twistd does for its text log."""
    if not hasattr(signal, "SIGUSR1") or signal.getsignal(signal.SIGUSR1):
        return

    def rotate(signum: int, frame: Any) -> None:
        from twisted.internet import reactor

        reactor.callFromThread(logfile.rotate)

    signal.signal(signal.SIGUSR1, rotate)
