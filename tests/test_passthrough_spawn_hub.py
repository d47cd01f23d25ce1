"""
Pass-through mode starts a stopped server with the token the IDE's request carries (a token from the
hub's token page has the user's scopes), as managed mode does with its own: one spawn however many
requests wait, for REST requests and kernel WebSockets alike. A token that may not start servers
gets the 503 that names the missing scope, and no spawn.

Spawns are counted from the hub's own log: each is one ``POST /hub/api/users/alice/server``.
"""

from __future__ import annotations

import concurrent.futures
import re
import uuid

import pytest
import requests
import websocket
from hub import JupyterHubProcess, ProxyFactory, ProxyProcess, dump, poll

HTTP_TIMEOUT = 180


def spawn_requests(hub: JupyterHubProcess, accepted_only: bool = False) -> int:
    """Requests to start alice's server the hub logged (``accepted_only``: those it answered 201/202)."""
    status = r"20[12] " if accepted_only else ""
    return len(re.findall(rf"{status}POST /hub/api/users/alice/server ", hub.log_text()))


def auth(token: str) -> dict[str, str]:
    return {"Authorization": f"token {token}"}


@pytest.fixture
def passing(hub: JupyterHubProcess, proxy: ProxyFactory) -> ProxyProcess:
    hub.start_server("alice")
    return proxy.for_hub(hub)


def test_five_rest_requests_start_the_server_once(hub: JupyterHubProcess, passing: ProxyProcess) -> None:
    hub.stop_server("alice")
    try:
        before = spawn_requests(hub)
        with concurrent.futures.ThreadPoolExecutor(5) as pool:
            answers = list(pool.map(
                lambda i: requests.get(f"{passing.url}/api/contents", headers=auth(hub.alice_token),
                                       timeout=HTTP_TIMEOUT),
                range(5),
            ))  # fmt: skip
        assert [a.status_code for a in answers] == [200] * 5, [dump(a) for a in answers]
        assert spawn_requests(hub) - before == 1, "one spawn for five waiters"
        assert (hub.server_model("alice") or {}).get("ready")
        assert hub.alice_token not in passing.log_text()
    finally:
        hub.start_server("alice")


def test_a_kernel_websocket_starts_the_server(hub: JupyterHubProcess, passing: ProxyProcess) -> None:
    """The morning case: the IDE reconnects yesterday's kernel; the server starts, the kernel is gone."""
    started = requests.post(f"{passing.url}/api/kernels", json={"name": "python3"}, headers=auth(hub.alice_token),
                            timeout=HTTP_TIMEOUT)  # fmt: skip
    assert started.status_code == 201, dump(started)
    kernel = started.json()["id"]
    hub.stop_server("alice")
    try:
        before = spawn_requests(hub)
        url = f"ws{passing.url[4:]}/api/kernels/{kernel}/channels?session_id={uuid.uuid4().hex}"
        with pytest.raises(websocket.WebSocketBadStatusException) as refused:
            websocket.create_connection(url, header=[f"Authorization: token {hub.alice_token}"],
                                        timeout=HTTP_TIMEOUT, suppress_origin=True)  # fmt: skip
        # the server was started by the socket, and then said what a restarted server says: no such kernel
        assert refused.value.status_code == 404, refused.value
        assert spawn_requests(hub) - before == 1
        assert (hub.server_model("alice") or {}).get("ready")
        # a new kernel's socket opens at once
        new = requests.post(f"{passing.url}/api/kernels", json={"name": "python3"}, headers=auth(hub.alice_token),
                            timeout=HTTP_TIMEOUT)  # fmt: skip
        assert new.status_code == 201, dump(new)
        ws = websocket.create_connection(
            f"ws{passing.url[4:]}/api/kernels/{new.json()['id']}/channels?session_id={uuid.uuid4().hex}",
            header=[f"Authorization: token {hub.alice_token}"], timeout=HTTP_TIMEOUT, suppress_origin=True,
        )  # fmt: skip
        assert ws.getstatus() == 101
        ws.close()
        requests.delete(f"{passing.url}/api/kernels/{new.json()['id']}", headers=auth(hub.alice_token), timeout=60)
    finally:
        hub.start_server("alice")


def test_five_kernel_websockets_and_requests_share_one_spawn(hub: JupyterHubProcess, passing: ProxyProcess) -> None:
    # jupyter_server 2's event socket opens on the new server (101); with 1.x, which has none, a
    # kernel socket's handshake reaches the new server, which knows no such kernel (404)
    if hub.has_event_socket():
        path, opened = "api/events/subscribe", 101
    else:
        path, opened = f"api/kernels/{uuid.uuid4()}/channels", 404
    hub.stop_server("alice")
    try:
        before = spawn_requests(hub)

        def socket(_: int) -> int:
            try:
                ws = websocket.create_connection(
                    f"ws{passing.url[4:]}/{path}", header=[f"Authorization: token {hub.alice_token}"],
                    timeout=HTTP_TIMEOUT, suppress_origin=True,
                )  # fmt: skip
            except websocket.WebSocketBadStatusException as refused:
                return refused.status_code
            try:
                return ws.getstatus()
            finally:
                ws.close()

        def rest(_: int) -> int:
            return requests.get(f"{passing.url}/api/status", headers=auth(hub.alice_token),
                                timeout=HTTP_TIMEOUT).status_code  # fmt: skip

        with concurrent.futures.ThreadPoolExecutor(5) as pool:
            waiting = [pool.submit(socket, i) for i in range(3)] + [pool.submit(rest, i) for i in range(2)]
            assert [w.result() for w in waiting] == [opened] * 3 + [200, 200]
        assert spawn_requests(hub) - before == 1, "one spawn for three sockets and two requests"
    finally:
        hub.start_server("alice")


def test_a_token_that_may_not_start_servers_gets_the_missing_scope_503(
    hub: JupyterHubProcess, passing: ProxyProcess
) -> None:
    limited = hub.new_token("alice", scopes=["access:servers!user=alice", "read:users!user=alice"],
                            note="may not start servers")  # fmt: skip
    hub.stop_server("alice")
    try:
        before = spawn_requests(hub, accepted_only=True)
        answer = requests.get(f"{passing.url}/api/status", headers=auth(limited), timeout=HTTP_TIMEOUT)
        assert answer.status_code == 503, dump(answer)
        assert answer.json()["reason"] == "missing-scope"
        assert "the token the IDE sent may not start your server" in answer.json()["message"]
        assert "'servers' scope" in answer.json()["message"]
        with pytest.raises(websocket.WebSocketBadStatusException) as refused:
            websocket.create_connection(f"ws{passing.url[4:]}/api/events/subscribe",
                                        header=[f"Authorization: token {limited}"], timeout=HTTP_TIMEOUT,
                                        suppress_origin=True)  # fmt: skip
        assert refused.value.status_code == 503
        assert spawn_requests(hub, accepted_only=True) == before, "the hub started nothing"
        assert hub.server_model("alice") is None
        poll(lambda: "missing scope" in passing.log_text() or None, 10, "the refusal in the log")
    finally:
        hub.start_server("alice")


def test_the_close_log_line_reads_as_a_sentence(hub: JupyterHubProcess, passing: ProxyProcess) -> None:
    """A close frame without a status code is logged as such, not as 'closed it with None '."""
    kernel = None
    if hub.has_event_socket():
        path = "api/events/subscribe"
    else:  # jupyter_server 1.x has no event socket: a kernel's
        kernel = requests.post(f"{passing.url}/api/kernels", json={"name": "python3"}, headers=auth(hub.alice_token),
                               timeout=HTTP_TIMEOUT)  # fmt: skip
        assert kernel.status_code == 201, dump(kernel)
        path = f"api/kernels/{kernel.json()['id']}/channels"
    try:
        for frame, said in ((b"", "the IDE closed it without a close code."), (b"\x03\xe8bye", "the IDE closed it with 1000 (bye).")):
            ws = websocket.create_connection(f"ws{passing.url[4:]}/{path}",
                                             header=[f"Authorization: token {hub.alice_token}"], timeout=60,
                                             suppress_origin=True)  # fmt: skip
            ws.send(frame, opcode=websocket.ABNF.OPCODE_CLOSE)
            poll(lambda said=said: said in passing.log_text() or None, 30, f"{said!r} in the log", 0.1,
                 passing.log_text)  # fmt: skip
            ws.shutdown()
        assert "with None" not in passing.log_text()
    finally:
        if kernel is not None:
            requests.delete(f"{passing.url}/api/kernels/{kernel.json()['id']}", headers=auth(hub.alice_token), timeout=60)
