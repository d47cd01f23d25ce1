"""
HTTP as real clients speak it, through the proxy to the real hub (issue 20): a query string holding
escapes that are not ASCII text (7), and ``Connection: close`` with a pooling client (14).
"""

from __future__ import annotations

import socket
import uuid

import requests
from hub import JupyterHubProcess, ProxyFactory, poll


def exchange(port: int, head: str, timeout: float = 30) -> bytes:
    """Send one request head as written; read until the proxy closes (the head says ``close``)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(head.encode("latin-1"))
        received = bytearray()
        while chunk := sock.recv(65536):
            received += chunk
        return bytes(received)


def test_escapes_that_are_not_ascii_text_are_answered_and_reach_the_hub_as_sent(
    hub: JupyterHubProcess, proxy: ProxyFactory
) -> None:
    hub.start_server("alice")
    managed = proxy.for_hub(hub, token=hub.alice_token)
    marker = f"query-{uuid.uuid4().hex}"
    query = f"q=%C3%A9&next=/lab%ff&%fe=%00&m={marker}"
    answer = exchange(
        managed.port,
        f"GET /api/contents/{marker}?{query} HTTP/1.1\r\nHost: 127.0.0.1:{managed.port}\r\n"
        f"Authorization: token {managed.token}\r\nConnection: close\r\n\r\n",
    )
    assert answer.startswith(b"HTTP/1.1 404 "), answer[:300]  # alice's server's answer: no such file
    poll(lambda: f"/user/alice/api/contents/{marker}?{query}" in hub.log_text() or None, 10,
         "alice's server to log the request with its query as sent")  # fmt: skip
    # the login page (the proxy's own) takes them as well, and keeps `next` for after the login
    page = exchange(managed.port, f"GET /login?next=/lab%ff HTTP/1.1\r\nHost: 127.0.0.1:{managed.port}\r\nConnection: close\r\n\r\n")
    assert page.startswith(b"HTTP/1.1 200 "), page[:300]
    assert b'action="/login?next=/lab%25FF"' in page
    assert "Traceback" not in managed.log_text()


def test_connection_close_is_said_and_a_pooling_client_never_trips_on_it(
    hub: JupyterHubProcess, proxy: ProxyFactory
) -> None:
    hub.start_server("alice")
    managed = proxy.for_hub(hub, token=hub.alice_token)
    with requests.Session() as session:
        session.headers.update({"Connection": "close", "Authorization": f"token {managed.token}"})
        said = []
        for _ in range(50):
            response = session.get(f"{managed.url}/api/contents", timeout=30)
            assert response.status_code == 200, response.text
            said.append(response.headers.get("Connection"))
        assert said == ["close"] * 50
        # the proxy's own refusal says it too
        del session.headers["Authorization"]
        for _ in range(5):
            refused = session.get(f"{managed.url}/api/contents", timeout=30)
            assert (refused.status_code, refused.headers.get("Connection")) == (403, "close")
    # without the header the connection stays, and nothing says it closes
    with requests.Session() as session:
        kept = [session.get(f"{managed.url}/api/contents", headers={"Authorization": f"token {managed.token}"},
                            timeout=30) for _ in range(5)]  # fmt: skip
        assert [(r.status_code, r.headers.get("Connection")) for r in kept] == [(200, None)] * 5
