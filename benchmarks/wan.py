"""
The WAN workload: what VS Code does when it opens a notebook and runs a cell, after the IDE sat idle
long enough for the hub's proxy to close its keep-alive connections, over a link with a round trip
of 20 ms (:mod:`benchmarks.delayline`).

The IDE side behaves like Node's keep-alive HTTPS agent: idle connections are reused unless the far
end has closed them, TLS sessions are resumed across connections, and the kernel WebSocket is its own
connection (``ws`` opens it with a full handshake). The sequence, timed from the first request:

1. ``GET /api/kernelspecs`` and ``GET /api/sessions`` at once (the kernel picker);
2. ``POST /api/sessions`` for the notebook (its session exists: the answer names the running kernel);
3. ``GET /api/contents/<notebook>`` (2 MiB);
4. the kernel WebSocket, ``kernel_info_request`` and its reply;
5. ``execute_request`` for a cell that prints: *first output* is its ``stream`` message;
6. the ``execute_reply``, then ``PUT`` the notebook back: *whole sequence*.
"""

from __future__ import annotations

import http.client
import json
import select
import socket
import ssl
import threading
import time
from typing import Any

from benchmarks.kernelws import KernelSocket

__all__ = ["make_notebook", "wan"]

NOTEBOOK = "wan.ipynb"


def make_notebook(size: int) -> dict:
    """An nbformat 4 notebook of about ``size`` bytes: 20 code cells with large stream outputs."""
    cells = []
    per_cell = max(1, size // 20)
    for i in range(20):
        text = (f"line {i} " + "x" * 70 + "\n") * (per_cell // 78)
        cells.append({
            "cell_type": "code", "execution_count": i + 1, "id": f"cell-{i}", "metadata": {},
            "source": f"print('cell {i}')",
            "outputs": [{"output_type": "stream", "name": "stdout", "text": text}],
        })
    cells.append({"cell_type": "code", "execution_count": None, "id": "run-me", "metadata": {},
                  "source": "print('hello from the WAN')", "outputs": []})
    return {"nbformat": 4, "nbformat_minor": 5, "cells": cells,
            "metadata": {"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"}}}


class _Agent:
    """A keep-alive HTTP(S) connection pool per route, as Node's agent: reuse what the far end kept."""

    def __init__(self, route: dict, token: str) -> None:
        self.route = route
        self.headers = {"Authorization": f"token {token}"}
        host_port = route["origin"].split("://", 1)[1]
        self.host, port = host_port.rsplit(":", 1)
        self.port = int(port)
        self.context = ssl.create_default_context(cafile=route["ca"]) if route["ca"] else None
        self.session: ssl.SSLSession | None = None
        self.idle: list[http.client.HTTPConnection] = []
        self.lock = threading.Lock()
        self.opened = 0

    def _new(self) -> http.client.HTTPConnection:
        self.opened += 1
        sock = socket.create_connection((self.host, self.port), timeout=60)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if self.context is None:
            conn = http.client.HTTPConnection(self.host, self.port, timeout=60)
        else:
            sock = self.context.wrap_socket(sock, server_hostname=self.host, session=self.session)
            conn = http.client.HTTPSConnection(self.host, self.port, timeout=60, context=self.context)
        conn.sock = sock
        return conn

    def _take(self) -> http.client.HTTPConnection:
        with self.lock:
            while self.idle:
                conn = self.idle.pop()
                # A readable idle socket is one the far end closed (or spoke on unasked): drop it.
                if conn.sock is not None and not select.select([conn.sock], [], [], 0)[0]:
                    return conn
                conn.close()
        return self._new()

    def request(self, method: str, path: str, body: bytes | None = None) -> tuple[int, bytes]:
        conn = self._take()
        headers = dict(self.headers)
        if body is not None:
            headers["Content-Type"] = "application/json"
        conn.request(method, self.route["prefix"] + path, body=body, headers=headers)
        response = conn.getresponse()
        data = response.read()
        if isinstance(conn.sock, ssl.SSLSocket) and conn.sock.session is not None:
            self.session = conn.sock.session
        with self.lock:
            if response.will_close:
                conn.close()
            else:
                self.idle.append(conn)
        return response.status, data

    def close(self) -> None:
        with self.lock:
            for conn in self.idle:
                conn.close()
            self.idle.clear()


def _expect(status_body: tuple[int, bytes], ok: tuple[int, ...], what: str) -> Any:
    status, body = status_body
    if status not in ok:
        raise RuntimeError(f"{what} -> {status}: {body[:160]!r}")
    return json.loads(body) if body else None


def replay(agent: _Agent, token: str, notebook_body: bytes) -> dict:
    """One open-and-run; seconds to the cell's first output and to the end, and what was opened."""
    opened = agent.opened
    started = time.perf_counter()
    results: dict[str, Any] = {}

    def fetch(key: str, path: str) -> None:
        try:
            results[key] = _expect(agent.request("GET", path), (200,), f"GET {path}")
        except Exception as exc:  # surfaced below
            results[key] = exc

    pickers = [threading.Thread(target=fetch, args=(k, p))
               for k, p in (("kernelspecs", "/api/kernelspecs"), ("sessions", "/api/sessions"))]
    for thread in pickers:
        thread.start()
    for thread in pickers:
        thread.join()
    for value in results.values():
        if isinstance(value, Exception):
            raise value
    phases = {"pickers": time.perf_counter() - started}
    session = {"path": NOTEBOOK, "name": NOTEBOOK, "type": "notebook", "kernel": {"name": "python3"}}
    model = _expect(agent.request("POST", "/api/sessions", json.dumps(session).encode()), (200, 201),
                    "POST /api/sessions")
    kernel = model["kernel"]["id"]
    phases["session"] = time.perf_counter() - started
    content = _expect(agent.request("GET", f"/api/contents/{NOTEBOOK}?type=notebook&content=1"), (200,),
                      "GET the notebook")
    if len(content["content"]["cells"]) < 2:
        raise RuntimeError("the notebook came back without its cells")
    phases["notebook"] = time.perf_counter() - started
    ks = KernelSocket(agent.route, kernel, token)
    phases["websocket"] = time.perf_counter() - started
    try:
        reply = ks.send_kernel_info()
        while ks.read_message()[2] != reply:
            pass
        phases["kernel_info"] = time.perf_counter() - started
        execute = ks.send_request("execute_request", {
            "code": "print('hello from the WAN')", "silent": False, "store_history": True,
            "user_expressions": {}, "allow_stdin": False, "stop_on_error": True})
        first_output = None
        replied = False
        while first_output is None or not replied:
            channel, msg_type, parent = ks.read_message()
            if parent != execute:
                continue
            if msg_type == "stream" and first_output is None:
                first_output = time.perf_counter() - started
            elif msg_type == "execute_reply":
                replied = True
        phases["executed"] = time.perf_counter() - started
    finally:
        ks.close()
    _expect(agent.request("PUT", f"/api/contents/{NOTEBOOK}", notebook_body), (200, 201), "PUT the notebook")
    total = time.perf_counter() - started
    return {"first_output": first_output, "total": total, "connections": agent.opened - opened,
            "phases": phases}


def wan(job: dict) -> dict:
    """
    Every route once to warm up, then ``rounds`` rounds: all routes idle ``idle`` seconds (the far
    end closes idle connections after 5), then one replay per route, in rotating order.
    """
    routes, token = job["routes"], job["token"]
    notebook_body = json.dumps({"type": "notebook", "format": "json",
                                "content": make_notebook(job["notebook_bytes"])}).encode()
    agents = {name: _Agent(route, token) for name, route in routes.items()}
    rounds: dict[str, list] = {name: [] for name in routes}
    errors: dict[str, list[str]] = {name: [] for name in routes}
    for agent in agents.values():
        replay(agent, token, notebook_body)  # the session exists from here on; nothing is cold
    names = list(routes)
    for round_no in range(job["rounds"]):
        time.sleep(job["idle"])  # the IDE is idle: the workload is this pause
        shift = round_no % len(names)
        for name in names[shift:] + names[:shift]:
            try:
                rounds[name].append(replay(agents[name], token, notebook_body))
            except Exception as exc:
                errors[name].append(f"{type(exc).__name__}: {exc}"[:200])
                agents[name].close()
    for agent in agents.values():
        agent.close()
    return {"rounds": rounds, "errors": errors}
