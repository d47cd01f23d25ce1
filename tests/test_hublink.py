"""
The hub link's state from every hub connection, in memory: REST failures alone make it down (and
the status say so), and one outage is one log line whatever met it first.
"""

from __future__ import annotations

from twisted.internet.defer import CancelledError, fail, succeed
from twisted.internet.task import Clock
from twisted.logger import capturedLogs, formatEvent
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone
from twisted.web.http_headers import Headers

from jds.hub import HubAPI, ServerStarter
from jds.hublink import HubLink
from jds.paths import HubTarget
from jds.refusal import Refusal
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


class _Agent:
    """An agent whose requests fail to connect until ``up``, then get ``code``."""

    def __init__(self) -> None:
        self.up = False
        self.code = 200
        self.calls = 0

    def request(self, method, uri, headers=None, producer=None):
        self.calls += 1
        if not self.up:
            return fail(ConnectionRefusedError("Connection refused"))
        response = _Response(self.code)
        return succeed(response)


class _Response:
    def __init__(self, code: int) -> None:
        self.code = code
        self.headers = Headers()
        self.length = 2
        self.phrase = b"OK"

    def deliverBody(self, protocol) -> None:  # noqa: N802 - IResponse
        protocol.dataReceived(b"{}")
        protocol.connectionLost(Failure(ResponseDone()))


def _explained(failure: Failure) -> Refusal:
    return Refusal(502, f"The hub at hub.test:443 refused the connection ({failure.getErrorMessage()}).", "hub-unreachable")


def test_the_hub_apis_own_calls_report_to_the_link_once_per_outage() -> None:
    clock = Clock()
    stats = Stats(clock=clock.seconds)
    link = HubLink(clock, stats, explain=_explained)
    agent = _Agent()
    target = HubTarget(host="hub.test", port=443, user="alice")
    api = HubAPI(agent, target, "HUB-TOKEN", link=link)
    passing = api.with_token("IDE-TOKEN")  # pass-through's API reports to the same link
    starter = ServerStarter(api, clock)
    with capturedLogs() as events:
        failures: list[Failure] = []
        for call in (api.token_accepted(), api.server_state(), passing.server_state(), starter.ensure_running()):
            call.addErrback(failures.append)
            clock.advance(0)
        assert len(failures) == 4 and agent.calls == 4
        assert link.down
        outage = stats.snapshot()["hub_link"]["outage"]
        assert outage["requests_failing"].startswith("The hub at hub.test:443 refused the connection")
        assert "HUB-TOKEN" not in outage["requests_failing"]
        clock.advance(3)
        agent.up = True
        accepted: list[bool] = []
        api.token_accepted().addCallback(accepted.append)
        api.token_accepted().addCallback(accepted.append)
        clock.advance(0)
        assert accepted == [True, True]
    assert not link.down
    said = lines(events)
    lost = [line for line in said if line.startswith("hub link lost")]
    back = [line for line in said if line.startswith("hub link back")]
    assert len(lost) == 1 and lost[0].startswith("hub link lost: The hub at hub.test:443 refused the connection")
    assert back == ["hub link back after 3.0 s; 0 request attempts retried, 0 WebSockets reconnected."]


def test_a_slow_hub_api_call_is_not_an_outage() -> None:
    clock = Clock()
    link = HubLink(clock, Stats(clock=clock.seconds), explain=_explained)
    link.watch(fail(TimeoutError("no answer"))).addErrback(lambda failure: None)
    link.watch(fail(CancelledError())).addErrback(lambda failure: None)
    clock.advance(0)
    assert not link.down


def test_the_daemon_wires_its_hub_api_to_the_sites_link(tmp_path) -> None:
    from twisted.internet.testing import MemoryReactorClock

    from jds.options import Options
    from jds.service import make_service
    from jds.tokens import write_private

    token = tmp_path / "hub-token"
    write_private(token, "HUB-TOKEN\n")
    options = Options(environ={"XDG_CONFIG_HOME": str(tmp_path / "c"), "XDG_STATE_HOME": str(tmp_path / "s")})
    options.parseOptions(["--hub", "hub.test:443", "--user", "alice", "--token-file", str(token)])
    top = make_service(options, MemoryReactorClock())
    site = next(child for child in top if hasattr(child, "site")).site
    starter = next(child for child in top if hasattr(child, "starter")).starter
    token_watch = next(child for child in top if hasattr(child, "renew_command"))
    link = site.resource.proxy.hub_link
    assert starter.api.link is link and token_watch.api.link is link
    assert link.stats is site.stats  # what /_jds/status reads
