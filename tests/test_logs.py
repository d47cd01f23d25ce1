"""
Log lines are one event each, with a level, readable by a person (text) and parsable (json): the
record in memory first, then a real proxy run with ``--log-format json``.
"""

from __future__ import annotations

import io
import json
import os
import stat
from pathlib import Path

import pytest
import requests
from hub import JupyterHubProcess, ProxyFactory, poll
from twisted.logger import FileLogObserver, Logger, LogLevel, eventAsText, formatEventAsClassicLogText
from twisted.python import usage
from twisted.python.failure import Failure

from jds.logs import (
    ACCESS_FORMAT,
    LOG_FILES_KEPT,
    LOG_ROTATE_BYTES,
    QUOTE_LIMIT,
    clip,
    event_record,
    json_line,
    json_observer_for,
    text_observer_for,
)
from jds.options import Options


def capture(emit) -> list[dict]:
    events: list[dict] = []
    emit(Logger(namespace="jds.test", observer=events.append))
    return events


def test_the_access_lines_fast_text_is_twisteds_own_line_byte_for_byte(tmp_path: Path) -> None:
    """The access line skips string.Formatter; what it writes must not change."""
    events = capture(lambda log: [
        log.info(ACCESS_FORMAT, method="GET", uri="/api/contents/a%20b?token=[secret]", status=200, bytes=1234,
                 ms=0.4567),
        log.warn(ACCESS_FORMAT, method="PUT", uri="/files/x", status=502, bytes=0, ms=12345.0),
        log.info(ACCESS_FORMAT, method="GET", uri="/", status=304, bytes=0, ms=1.0, log_system="other#x"),
    ])
    path = tmp_path / "jds.log"
    observer = text_observer_for({"logfile": str(path)})
    for event in events:
        observer(event)
    expected = "".join(formatEventAsClassicLogText(event) for event in events)
    assert path.read_text() == expected
    assert "GET /api/contents/a%20b?token=[secret] 200 1234B 0.5ms" in expected


def test_the_access_line_is_the_event_logger_info_emits() -> None:
    """log_access skips Logger.emit's level check; the event (but for its time) is the one info() makes."""
    from jds.logs import log_access

    (by_info,) = capture(lambda log: log.info(ACCESS_FORMAT, method="GET", uri="/x", status=200, bytes=5, ms=0.25))
    (by_access,) = capture(lambda log: log_access(log, "GET", "/x", 200, 5, 0.25))
    assert abs(by_access.pop("log_time") - by_info.pop("log_time")) < 5
    by_info["log_logger"] = by_access["log_logger"]  # each capture has a logger of its own
    assert by_access == by_info


def test_one_line_per_event_with_level_and_fields() -> None:
    (event,) = capture(lambda log: log.warn("{method} {uri} -> {status}", method="GET", uri="/api/x", status=502))
    stream = io.StringIO()
    FileLogObserver(stream, json_line)(event)
    line = stream.getvalue()
    assert line.endswith("\n") and line.count("\n") == 1
    record = json.loads(line)
    assert record["level"] == "warn"
    assert record["namespace"] == "jds.test"
    assert record["message"] == "GET /api/x -> 502"
    assert record["fields"] == {"method": "GET", "uri": "/api/x", "status": 502}
    assert record["time"].endswith("+00:00")


def test_a_failure_keeps_its_traceback_on_one_line() -> None:
    failure = Failure(ZeroDivisionError("division by zero"))
    (event,) = capture(lambda log: log.failure("Relaying {path} failed", failure, path="/api/y"))
    stream = io.StringIO()
    FileLogObserver(stream, json_line)(event)
    assert stream.getvalue().count("\n") == 1
    record = json.loads(stream.getvalue())
    assert record["level"] == "critical"
    assert "ZeroDivisionError" in record["traceback"]
    assert record["fields"] == {"path": "/api/y"}


def test_objects_are_left_out_of_fields() -> None:
    (event,) = capture(lambda log: log.info("x {thing}", thing=object(), count=3))
    assert event_record(event)["fields"] == {"count": 3}
    assert LogLevel.info.name == event_record(event)["level"]
    assert "x <object object" in eventAsText(event)


def test_destination_follows_twistds_options(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (event,) = capture(lambda log: log.info("to {where}", where="here"))
    for config in ({"nodaemon": True, "logfile": None}, {"nodaemon": True, "logfile": "-"}):
        json_observer_for(config)(event)
        assert json.loads(capsys.readouterr().out)["message"] == "to here", config
    path = tmp_path / "jds.log"
    json_observer_for({"nodaemon": False, "logfile": str(path)})(event)
    assert json.loads(path.read_text())["fields"] == {"where": "here"}
    assert json_observer_for({"logger": object()}) is None, "an explicit --logger wins"
    assert json_observer_for({"syslog": True}) is None, "--syslog wins"


def test_only_text_or_json(tmp_path: Path) -> None:
    options = Options(environ={"XDG_CONFIG_HOME": "/nonexistent/jds-tests"})
    with pytest.raises(usage.UsageError, match="--log-format must be 'text' or 'json'"):
        options.parseOptions(["--hub", "h", "--user", "u", "--log-format", "xml"])


def test_proxy_logs_json(hub: JupyterHubProcess, proxy: ProxyFactory) -> None:
    hub.start_server("alice")
    running = proxy.for_hub(hub, extra_args=["--log-format", "json"])
    response = requests.get(f"{running.url}/api/status", headers={"Authorization": f"token {hub.alice_token}"})
    assert response.status_code == 200

    def records() -> list[dict]:
        complete = running.log_text().split("\n")[:-1]  # the last line may still be being written
        return [json.loads(line) for line in complete]

    def access_line() -> dict | None:
        return next((r for r in records() if r.get("fields", {}).get("uri") == "/api/status"), None)

    record = poll(access_line, 30, "the access line")
    assert record["level"] == "info"
    assert record["namespace"] == "jds"
    assert record["fields"]["status"] == 200
    assert record["message"].startswith("GET /api/status 200 ")
    assert all(set(r) >= {"time", "level", "namespace", "message"} for r in records())
    assert hub.alice_token not in running.log_text()


def test_log_files_are_private_and_bounded(tmp_path: Path) -> None:
    """
    Issue 20 (1, 8): twistd's ``twistd.log`` or a ``--logfile``, under umask 022, is mode 600, and
    so is every rotated file; at most ``LOG_FILES_KEPT`` of those stay, old ones from before too.
    """
    path = tmp_path / "jds.log"
    path.write_text("from an older run\n")
    path.chmod(0o644)
    for number in range(1, 31):  # what an older version left: rotated files never deleted
        (tmp_path / f"jds.log.{number}").write_text("old\n")
    (event,) = capture(lambda log: log.info("{line}", line="x" * 500))
    old_umask = os.umask(0o022)
    try:
        for observer_for in (text_observer_for, json_observer_for):
            observer = observer_for({"nodaemon": False, "logfile": str(path)})
            assert stat.S_IMODE(path.stat().st_mode) == 0o600, "an existing log is made private too"
            for _ in range(3 * LOG_ROTATE_BYTES // 500 + 10):
                observer(event)
    finally:
        os.umask(old_umask)
    files = sorted(tmp_path.iterdir())
    assert len(files) == LOG_FILES_KEPT + 1, [f.name for f in files]
    assert {stat.S_IMODE(f.stat().st_mode) for f in files if f.read_text() != "old\n"} == {0o600}
    assert sum(f.stat().st_size for f in files) <= (LOG_FILES_KEPT + 1) * (LOG_ROTATE_BYTES + 2048)


def test_clip_says_how_much_it_left_out() -> None:
    assert clip("abc", 5) == "abc"
    assert clip("a" * 1500) == "a" * QUOTE_LIMIT + f"...[{1500 - QUOTE_LIMIT} more]"


def test_quoted_redacts_then_clips_a_uri() -> None:
    from jds.logs import QUOTE_LIMIT, quoted

    short = quoted(b"/api/kernels?token=SECRET&x=1")
    assert short == "/api/kernels?token=[redacted]&x=1"
    assert quoted("/api/kernels?token=SECRET") == "/api/kernels?token=[redacted]"  # a str is redacted too
    long = quoted(b"/a?x=" + b"y" * 3000 + b"&token=SECRET")
    assert "SECRET" not in long and long.endswith("more]")
    assert long.startswith("/a?x=yyy") and len(long) < QUOTE_LIMIT + 20
