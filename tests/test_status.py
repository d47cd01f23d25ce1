"""
The status page: in memory first (counters, the JSON document, who may read it), then against the
real hub (the numbers move as traffic passes; managed mode wants the local token), and the
``jupyter-dev-server status`` command that prints it for a person.
"""

from __future__ import annotations

import inspect
import json
import os
import subprocess
from dataclasses import replace
from typing import Any

import pytest
import requests
import websocket
from hub import JupyterHubProcess, ProxyFactory, ProxyProcess, clean_environ, dump, poll, venv_script
from twisted.internet.defer import fail, succeed
from twisted.web.server import NOT_DONE_YET
from twisted.web.test.requesthelper import DummyRequest

from jds.auth import Credentials
from jds.hub import ServerState
from jds.paths import HubTarget
from jds.relay import WebSocketRelay
from jds.stats import Stats
from jds.status import StatusResource
from jds.status_command import describe, endpoint_url

TARGET = HubTarget(host="hub.example.org", port=8000, user="alice")
MANAGED = Credentials("hub-token-abc", "local-token-xyz")


class FakeAPI:
    def __init__(self, state: Any) -> None:
        self.state = state

    def server_state(self):
        return fail(self.state) if isinstance(self.state, Exception) else succeed(self.state)


def render(resource: StatusResource, path: bytes = b"/_jds/status", headers: dict[bytes, bytes] | None = None):
    """``(status, JSON body)`` of one GET, rendered in memory."""
    request = DummyRequest(path.split(b"?")[0].split(b"/")[2:])
    request.method = b"GET"
    request.uri = path
    request.path = path.split(b"?")[0]
    for name, value in (headers or {}).items():
        request.requestHeaders.setRawHeaders(name, [value])
    result = resource.render(request)
    body = b"".join(request.written) if result is NOT_DONE_YET else result
    return request.responseCode or 200, json.loads(body)


class TestStats:
    def test_counters_and_snapshot(self) -> None:
        now = [1000.0]
        stats = Stats(clock=lambda: now[0])
        closed = stats.http_opened()
        assert stats.snapshot()["open_http"] == 1
        closed(None)
        closed(None)  # a request both taken over and later notified counts once
        stats.http_finished(10, 200)
        stats.http_finished(0, 5)
        stats.websocket_opened()
        stats.websocket_opened()
        stats.websocket_closed()
        now[0] += 90.5
        stats.error(502, "The hub at h:1 refused the connection.", "hub-unreachable")
        snap = stats.snapshot()
        assert snap["open_http"] == 0
        assert (snap["requests"], snap["bytes_in"], snap["bytes_out"]) == (2, 10, 205)
        assert (snap["open_websockets"], snap["websockets"]) == (1, 2)
        assert snap["uptime_seconds"] == 90.5
        assert snap["last_error"]["reason"] == "hub-unreachable"
        assert snap["last_error"]["status"] == 502


    def test_hub_link_outage_and_counts(self) -> None:
        now = [1000.0]
        stats = Stats(clock=lambda: now[0])
        stats.hub_link_lost(1)
        now[0] += 2
        stats.hub_link_lost(2)
        now[0] += 3
        link = stats.snapshot()["hub_link"]
        assert link["outage"] == {
            "since": "1970-01-01T00:16:40+00:00", "seconds": 5.0, "websockets_holding": 2, "requests_failing": None
        }
        stats.hub_link_settled(1, "back", 4.9)
        assert stats.snapshot()["hub_link"]["outage"]["websockets_holding"] == 1
        stats.hub_link_settled(0, "gave up", 5.0)
        link = stats.snapshot()["hub_link"]
        assert link == {"lost": 2, "reconnected": 1, "gave_up": 1, "last_outage_seconds": 5.0, "outage": None}


class TestStatusResource:
    def test_managed_mode_wants_the_local_token(self) -> None:
        resource = StatusResource(Stats(), TARGET, MANAGED)
        code, body = render(resource)
        assert code == 403
        assert body["reason"] == "no-token"
        code, body = render(resource, b"/_jds/status?token=local-token-xyz")
        assert code == 200
        code, body = render(resource, headers={b"authorization": b"token local-token-xyz"})
        assert code == 200
        assert body["mode"] == "managed"
        code, _ = render(resource, headers={b"authorization": b"token hub-token-abc"})
        assert code == 403, "the hub token is not the local one"

    def test_pass_through_is_open_and_the_state_unknown(self) -> None:
        code, body = render(StatusResource(Stats(), TARGET, Credentials()))
        assert code == 200
        assert body["mode"] == "pass-through"
        assert body["server_state"] == "unknown"
        assert body["user"] == "alice"
        assert body["hub"] == "https://hub.example.org:8000/"
        assert body["server_url"] == "https://hub.example.org:8000/user/alice/"
        for key in ("version", "uptime_seconds", "open_http", "open_websockets", "requests",
                    "bytes_in", "bytes_out", "last_error"):
            assert key in body

    def test_server_state_from_the_hub(self) -> None:
        auth = {b"authorization": b"token local-token-xyz"}
        running = StatusResource(Stats(), TARGET, MANAGED, api=FakeAPI(ServerState(True, None)))
        assert render(running, headers=auth)[1]["server_state"] == "running"
        pending = StatusResource(Stats(), TARGET, MANAGED, api=FakeAPI(ServerState(False, "spawn")))
        assert render(pending, headers=auth)[1]["server_state"] == "pending spawn"
        broken = StatusResource(Stats(), TARGET, MANAGED, api=FakeAPI(ConnectionError("no hub")))
        assert render(broken, headers=auth)[1]["server_state"] == "unknown"

    def test_other_daemon_paths_are_a_json_404(self) -> None:
        code, body = render(StatusResource(Stats(), TARGET, Credentials()), b"/_jds/nothing")
        assert code == 404
        assert "/_jds/status" in body["message"]


def test_the_profile_and_the_server_options_in_use_and_no_secret() -> None:
    credentials = Credentials("HUB-SECRET", "LOCAL-SECRET")
    resource = StatusResource(
        Stats(), TARGET, credentials, profile="gpu", server_options={"partition": "gpu", "gpus": 2},
        via=_StubVia({"kind": "http", "address": "proxy:3128", "source": "HTTPS_PROXY", "state": "up"}),
    )
    body = resource.document("running")
    report = json.loads(body)
    assert (report["profile"], report["server_options"]) == ("gpu", {"partition": "gpu", "gpus": 2})
    assert b"SECRET" not in body
    text = describe(report, "http://127.0.0.1:8000")
    assert "  profile:    gpu" in text.splitlines()
    assert "  starts:     with --server-options partition=gpu, gpus:=2" in text.splitlines()
    bare = json.loads(StatusResource(Stats(), TARGET, Credentials()).document("unknown"))
    assert (bare["profile"], bare["server_options"]) == (None, {})
    lines = describe(bare, "http://127.0.0.1:8000").splitlines()
    assert "  profile:    none (its options came from the command line and the environment)" in lines
    assert "  starts:     with no --server-options (the hub reuses the last start's)" in lines


def test_describe_reads_like_a_sentence() -> None:
    stats = Stats()
    stats.http_finished(1500, 2_500_000)
    stats.error(403, "This jupyter-dev-server needs its local token ...", "no-token")
    report = json.loads(StatusResource(stats, TARGET, Credentials()).document("unknown"))
    text = describe(report, "http://127.0.0.1:8000")
    assert "pass-through mode" in text
    assert "1 request, 1.5 kB from the IDE, 2.5 MB to the IDE" in text
    assert "403 no-token" in text
    assert "only known in managed mode" in text
    assert "root:       the server's root (no --root)" in text
    rooted = json.loads(StatusResource(stats, replace(TARGET, root="work/proj"), Credentials()).document("unknown"))
    assert rooted["root"] == "work/proj"
    assert "root:       work/proj/ (--root" in describe(rooted, "http://127.0.0.1:8000")
    assert "retried" not in text
    assert "hub link:   up; 0 WebSockets reconnected, 0 given up" in text
    stats.hub_link_lost(3)
    report = json.loads(StatusResource(stats, TARGET, Credentials()).document("unknown"))
    assert "hub link:   down since " in describe(report, "http://127.0.0.1:8000")
    assert "(0 s), 3 WebSockets holding" in describe(report, "http://127.0.0.1:8000")


def test_describe_counts_requests_retried_after_a_lost_hub_link() -> None:
    stats = Stats()
    stats.request_retried()
    stats.request_retried()
    report = json.loads(StatusResource(stats, TARGET, Credentials()).document("unknown"))
    assert report["retried_requests"] == 2
    assert "0 WebSockets; 2 retried after a lost hub link" in describe(report, "http://127.0.0.1:8000")


class _StubVia:
    """A via's status as an ssh bastion's would read (the interface of jds.via.Via, status only)."""

    def __init__(self, report: dict) -> None:
        self.report = report

    def status(self) -> dict:
        return self.report


def test_describe_shows_the_via_without_credentials() -> None:
    direct = json.loads(StatusResource(Stats(), TARGET, Credentials(), via=_StubVia(
        {"kind": "direct", "address": "", "source": "", "state": "direct", "restarts": 0})).document("unknown"))
    assert direct["via"]["kind"] == "direct"
    assert "via:" not in describe(direct, "http://127.0.0.1:8000")
    proxy = json.loads(StatusResource(Stats(), TARGET, Credentials(), via=_StubVia({
        "kind": "http", "address": "http://proxy:3128", "source": "HTTPS_PROXY", "state": "down",
        "since": "2026-12-06T20:00:00Z", "restarts": 0, "tunnels": 3,
        "last_error": "The HTTP proxy at proxy:3128 (from HTTPS_PROXY) wants credentials: it answered '407'.",
    })).document("unknown"))
    assert (
        "  via:        http://proxy:3128 (from HTTPS_PROXY): down since 2026-12-06T20:00:00Z, 3 tunnels; "
        "last error: The HTTP proxy at proxy:3128 (from HTTPS_PROXY) wants credentials: it answered '407'."
    ) in describe(proxy, "http://127.0.0.1:8000").splitlines()
    ssh = json.loads(StatusResource(Stats(), TARGET, Credentials(), via=_StubVia({
        "kind": "ssh", "address": "ssh://me@login:22", "source": "--via", "state": "up", "restarts": 2, "pid": 4242,
    })).document("unknown"))
    assert "  via:        ssh://me@login:22 (from --via): up, pid 4242, 2 restarts" in describe(
        ssh, "http://127.0.0.1:8000").splitlines()


@pytest.mark.parametrize(
    ("listen", "url"),
    [
        ("tcp:8000:interface=127.0.0.1", "http://127.0.0.1:8000"),
        ("tcp:port=9000", "http://127.0.0.1:9000"),
        ("tcp6:8001:interface=\\:\\:1", "http://[::1]:8001"),
        ("tcp:8002:interface=0.0.0.0", "http://127.0.0.1:8002"),
    ],
)
def test_endpoint_url(listen: str, url: str) -> None:
    assert endpoint_url(listen) == url


# -- against the real hub ----------------------------------------------------------------------


def status(proxy: ProxyProcess, token: str | None = None) -> requests.Response:
    headers = {"Authorization": f"token {token}"} if token else {}
    return requests.get(f"{proxy.url}/_jds/status", headers=headers, timeout=30)


def counters(proxy: ProxyProcess) -> dict[str, Any]:
    response = status(proxy, proxy.token)
    assert response.status_code == 200, dump(response)
    return response.json()


@pytest.fixture
def managed(hub: JupyterHubProcess, proxy: ProxyFactory) -> ProxyProcess:
    hub.start_server("alice")
    return proxy.for_hub(hub, token=hub.alice_token)


def test_managed_status_needs_the_local_token(hub: JupyterHubProcess, managed: ProxyProcess) -> None:
    refused = status(managed)
    assert refused.status_code == 403, dump(refused)
    assert refused.json()["reason"] == "no-token"
    assert status(managed, hub.alice_token).status_code == 403, "the hub token is not the local token"
    report = counters(managed)
    assert report["mode"] == "managed"
    assert report["user"] == "alice"
    assert report["server_state"] == "running"
    assert report["last_error"]["reason"] == "no-token"
    assert hub.alice_token not in json.dumps(report)


def test_numbers_change_as_traffic_passes(managed: ProxyProcess) -> None:
    auth = {"Authorization": f"token {managed.token}"}
    before = counters(managed)
    text = "x" * 10_000
    put = requests.put(
        f"{managed.url}/api/contents/status.txt", json={"type": "file", "format": "text", "content": text},
        headers=auth, timeout=30,
    )
    assert put.status_code in (200, 201), dump(put)
    got = requests.get(f"{managed.url}/api/contents/status.txt?content=1", headers=auth, timeout=30)
    assert got.json()["content"] == text
    hub_path = requests.get(f"{managed.url}/hub/api", headers=auth, timeout=30)
    assert hub_path.status_code == 404
    after = counters(managed)
    # Three relayed exchanges; the status requests themselves are not traffic.
    assert after["requests"] == before["requests"] + 3
    assert after["bytes_in"] >= before["bytes_in"] + len(text)
    assert after["bytes_out"] >= before["bytes_out"] + len(text)
    assert after["last_error"]["reason"] == "hub-path"
    assert after["open_http"] == 0
    assert after["uptime_seconds"] >= before["uptime_seconds"]
    requests.delete(f"{managed.url}/api/contents/status.txt", headers=auth, timeout=30)


def test_a_response_in_progress_is_an_open_request(managed: ProxyProcess) -> None:
    auth = {"Authorization": f"token {managed.token}"}
    size = 12 * 1024 * 1024
    put = requests.put(
        f"{managed.url}/api/contents/open.txt",
        json={"type": "file", "format": "text", "content": "y" * size}, headers=auth, timeout=60,
    )
    assert put.status_code in (200, 201), dump(put)
    try:
        # Not reading the body holds the exchange open (the proxy stops reading from the hub).
        download = requests.get(f"{managed.url}/files/open.txt", headers=auth, stream=True, timeout=30)
        assert download.status_code == 200
        assert counters(managed)["open_http"] == 1
        download.close()
        poll(lambda: True if counters(managed)["open_http"] == 0 else None, 30, "open_http back to 0")
    finally:
        requests.delete(f"{managed.url}/api/contents/open.txt", headers=auth, timeout=30)


@pytest.mark.skipif(
    "stats" not in inspect.signature(WebSocketRelay).parameters,
    reason="the WebSocket relay does not report to Stats yet (WebSocketRelay(stats=...))",
)
def test_websockets_are_counted(managed: ProxyProcess) -> None:
    auth = {"Authorization": f"token {managed.token}"}
    kernel = requests.post(f"{managed.url}/api/kernels", json={"name": "python3"}, headers=auth, timeout=60)
    assert kernel.status_code == 201, dump(kernel)
    kernel_id = kernel.json()["id"]
    try:
        before = counters(managed)
        ws = websocket.create_connection(
            f"ws://127.0.0.1:{managed.port}/api/kernels/{kernel_id}/channels",
            header=[f"Authorization: token {managed.token}"], timeout=30, suppress_origin=True,
        )
        try:
            during = poll(
                lambda: (c := counters(managed))["open_websockets"] == before["open_websockets"] + 1 and c or None,
                30, "the socket to be counted",
            )
            assert during["websockets"] == before["websockets"] + 1
            assert during["open_http"] == 0, "a relayed socket is no longer an open HTTP request"
        finally:
            ws.close()
        poll(lambda: True if counters(managed)["open_websockets"] == before["open_websockets"] else None,
             30, "the closed socket to be uncounted")
    finally:
        requests.delete(f"{managed.url}/api/kernels/{kernel_id}", headers=auth, timeout=30)


def test_pass_through_status_is_open(hub: JupyterHubProcess, proxy: ProxyFactory) -> None:
    plain = proxy.for_hub(hub)
    response = status(plain)
    assert response.status_code == 200, dump(response)
    report = response.json()
    assert report["mode"] == "pass-through"
    assert report["server_state"] == "unknown"


def run_status(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [venv_script("jupyter-dev-server"), "status", *args], capture_output=True, text=True,
        timeout=60, env=clean_environ(env),
    )


def test_status_command(managed: ProxyProcess) -> None:
    # The daemon's local token is read from the same file it keeps it in ($XDG_STATE_HOME).
    state = managed.env["XDG_STATE_HOME"]
    done = run_status("--url", managed.url, env={"XDG_STATE_HOME": state})
    assert done.returncode == 0, done.stderr
    assert f"at {managed.url}" in done.stdout
    assert "(alice's default server) is running" in done.stdout
    assert "managed mode" in done.stdout
    as_json = run_status("--listen", f"tcp:{managed.port}:interface=127.0.0.1", "--token", managed.token, "--json")
    assert json.loads(as_json.stdout)["server_state"] == "running"
    nothing = run_status("--url", managed.url, env={"XDG_STATE_HOME": os.path.join(state, "nowhere")})
    assert nothing.returncode == 1
    assert "needs its local token (there is none in" in nothing.stderr
    wrong = run_status("--url", managed.url, "--token", "wrong")
    assert wrong.returncode == 1
    assert "refused the one given with --token" in wrong.stderr


def test_status_command_when_nothing_listens() -> None:
    from hub import free_port

    done = run_status("--url", f"http://127.0.0.1:{free_port()}", "--token", "x")
    assert done.returncode == 1
    assert "nothing answers at" in done.stderr
