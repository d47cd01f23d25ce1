"""
The hub link's state from every hub connection, in memory: REST failures alone make it down (and
the status say so), and one outage is one log line whatever met it first.
"""

from __future__ import annotations

from twisted.internet.task import Clock
from twisted.logger import capturedLogs, formatEvent

from jds.hublink import HubLink
from jds.stats import Stats
from jds.status_command import describe

TLS_TIMEOUT = "The hub did not complete a TLS handshake within 2 s."


def lines(events: list) -> list[str]:
    return [formatEvent(event) for event in events]


def test_requests_failing_alone_make_the_link_down_until_the_hub_answers() -> None:
    clock = Clock()
    stats = Stats(clock=clock.seconds)
    link = HubLink(clock, stats)
    with capturedLogs() as events:
        link.answered()  # nothing was lost: nothing to say
        for _ in range(3):  # every request fails, none is sent again (no WebSocket open)
            link.request_failed(TLS_TIMEOUT, retried=False)
            clock.advance(2)
        assert link.down
        outage = stats.snapshot()["hub_link"]["outage"]
        assert outage == {"since": outage["since"], "seconds": 6.0, "websockets_holding": 0,
                          "requests_failing": TLS_TIMEOUT}  # fmt: skip
        report = {"hub_link": stats.snapshot()["hub_link"]}
        link.answered()
        link.answered()
    assert not link.down
    assert stats.snapshot()["hub_link"]["outage"] is None
    assert stats.snapshot()["hub_link"]["last_outage_seconds"] == 6.0
    assert lines(events) == [
        "hub link lost: The hub did not complete a TLS handshake within 2 s; 0 WebSockets holding; requests "
        "that are safe to send again are retried for up to 10 s.",
        "hub link back after 6.0 s; 0 request attempts retried, 0 WebSockets reconnected.",
    ]
    text = _describe(report)
    assert "hub link:   down since " in text and f"requests failing: {TLS_TIMEOUT}" in text


def _describe(partial: dict) -> str:
    report = {
        "version": "x", "mode": "pass-through", "uptime_seconds": 1, "started": "t", "hub": "h", "server": "",
        "server_url": "u", "user": "alice", "server_state": "running", "root": "", "requests": 0, "bytes_in": 0,
        "bytes_out": 0, "websockets": 0, "open_http": 0, "open_websockets": 0, **partial,
    }  # fmt: skip
    return describe(report, "http://127.0.0.1:8000")


def test_one_outage_is_one_line_whichever_connection_met_it_first() -> None:
    clock = Clock()
    stats = Stats(clock=clock.seconds)
    link = HubLink(clock, stats)
    with capturedLogs() as events:
        # two sockets and a request break in the same moment; more requests fail later
        link.socket_lost("Connection lost", 1)
        link.socket_lost("Connection lost", 2)
        link.request_failed("The hub at hub.test:443 refused the connection.", retried=True)
        clock.advance(0)
        for _ in range(4):
            clock.advance(1)
            link.request_failed("The hub at hub.test:443 refused the connection.", retried=True)
        link.socket_settled(1, "back", 5.0)  # a socket reconnected: the link works again
        assert link.down  # ... but the other still holds
        link.socket_settled(0, "back", 5.0)
        assert not link.down
        clock.advance(1)
        link.request_failed("The hub at hub.test:443 refused the connection.", retried=True)
        clock.advance(0)
        link.answered()
    said = lines(events)
    assert said[:2] == [
        "hub link lost: Connection lost; 2 WebSockets holding; requests that are safe to send again are "
        "retried for up to 10 s.",
        "hub link back after 4.0 s; 5 request attempts retried, 2 WebSockets reconnected.",
    ]
    assert len(said) == 4 and said[2].startswith("hub link lost: The hub at hub.test:443 refused"), said
    assert stats.snapshot()["hub_link"]["lost"] == 2


def test_a_blip_within_one_turn_says_nothing() -> None:
    clock = Clock()
    link = HubLink(clock)
    with capturedLogs() as events:
        link.request_failed("reset", retried=True)
        link.answered()
        clock.advance(0)
    assert lines(events) == []
    assert not link.down
