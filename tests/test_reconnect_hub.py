"""
Issue 11 against the real hub: a kernel WebSocket survives a broken hub link.

The proxy runs as a real ``twistd`` process; its hub connections go through a
:class:`tcp_cutter.TcpCutter` that resets them, refuses new ones, or goes silent (no FIN, no RST).
The IDE is a raw ``websocket-client`` socket in the JSON framing (and ``@jupyterlab/services`` in
one test); it keeps reading throughout, answering the proxy's pings, as an IDE does. Every fault
lasts a fixed time measured while the IDE reads on (the fault *is* the duration); every wait for
an effect polls with a deadline.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import time
import uuid
from collections.abc import Callable
from typing import Any

import pytest
import requests
import test_faults_hub
import websocket
from hub import REPO_ROOT, JupyterHubProcess, ProxyFactory, ProxyProcess, dump, stop_pid
from tcp_cutter import TcpCutter
from test_faults_hub import (
    LogWatch,
    auth,
    close_of,
    open_kernel_socket,
    start_kernel,
    status_document,
    through,
)

# The fixtures of the fault tests: a TcpCutter in front of the hub, kernels deleted afterwards.
cutter = test_faults_hub.cutter
kernels = test_faults_hub.kernels

# A cell printing 40 lines over 10 s, as in the issue.
FORTY_LINES = "import time\nfor i in range(40):\n    print(i, flush=True)\n    time.sleep(0.25)"
EXPECTED = [str(i) for i in range(40)]
KERNEL_CLIENT = REPO_ROOT / "tests" / "node" / "kernel_client.mjs"


class IdeSocket:
    """The IDE's kernel socket: sends requests, reads everything, fails on a close frame."""

    def __init__(self, ws: websocket.WebSocket) -> None:
        self.ws = ws
        self.session = uuid.uuid4().hex

    def send(self, msg_type: str, content: dict[str, Any]) -> str:
        msg_id = uuid.uuid4().hex
        self.ws.send(json.dumps({
            "channel": "shell", "parent_header": {}, "metadata": {}, "content": content, "buffers": [],
            "header": {"msg_id": msg_id, "msg_type": msg_type, "session": self.session,
                       "username": "jds", "version": "5.3", "date": ""},
        }))  # fmt: skip
        return msg_id

    def execute(self, code: str) -> str:
        return self.send("execute_request", {"code": code, "silent": False, "store_history": False})

    def read_until(
        self, done: Callable[[dict[str, Any]], bool], timeout: float, tick: Callable[[], None] = lambda: None
    ) -> list[dict[str, Any]]:
        """
        Read messages until one satisfies ``done``; ``tick`` runs at least every 0.2 s (faults
        start and end there). A close frame or a dropped connection fails the test: the IDE's
        socket must stay open.
        """
        seen: list[dict[str, Any]] = []
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            tick()
            self.ws.settimeout(0.2)
            try:
                opcode, frame = self.ws.recv_data_frame(control_frame=True)
            except websocket.WebSocketTimeoutException:
                continue
            except (websocket.WebSocketConnectionClosedException, ConnectionError) as exc:
                raise AssertionError(f"the IDE's socket was dropped: {exc!r}") from None
            if opcode == websocket.ABNF.OPCODE_CLOSE:
                raise AssertionError(f"the IDE's socket was closed: {frame.data!r}")
            if opcode != websocket.ABNF.OPCODE_TEXT:
                continue
            msg = json.loads(frame.data)
            seen.append(msg)
            if done(msg):
                return seen
        raise AssertionError(f"not done within {timeout:g} s; saw {[m['msg_type'] for m in seen][-20:]}")


def reply_to(msg_id: str, msg_type: str) -> Callable[[dict[str, Any]], bool]:
    return lambda msg: msg["msg_type"] == msg_type and msg["parent_header"].get("msg_id") == msg_id


def stdout_of(seen: list[dict[str, Any]], msg_id: str) -> str:
    return "".join(
        m["content"]["text"] for m in seen
        if m["msg_type"] == "stream" and m["parent_header"].get("msg_id") == msg_id
        and m["content"]["name"] == "stdout"
    )  # fmt: skip


class Cell:
    """One execute request and what came back for it, read as it comes (``lines``)."""

    def __init__(self, ide: IdeSocket, code: str) -> None:
        self.ide = ide
        self.msg_id = ide.execute(code)
        self.seen: list[dict[str, Any]] = []

    @property
    def lines(self) -> int:
        return stdout_of(self.seen, self.msg_id).count("\n")

    def finish(self, timeout: float, tick: Callable[[Cell], None] = lambda cell: None) -> dict[str, Any]:
        """Read up to the execute_reply *and* the kernel's idle status for this request."""
        replied: list[dict[str, Any]] = []
        idle: list[dict[str, Any]] = []

        def done(msg: dict[str, Any]) -> bool:
            self.seen.append(msg)
            if reply_to(self.msg_id, "execute_reply")(msg):
                replied.append(msg)
            if reply_to(self.msg_id, "status")(msg) and msg["content"]["execution_state"] == "idle":
                idle.append(msg)
            return bool(replied and idle)

        self.ide.read_until(done, timeout, lambda: tick(self))
        return replied[0]

    @property
    def stdout(self) -> list[str]:
        return stdout_of(self.seen, self.msg_id).splitlines()


def kernel_socket(proxy: ProxyProcess, kernel: str, token: str) -> IdeSocket:
    ide = IdeSocket(open_kernel_socket(proxy, kernel, token))
    msg_id = ide.send("kernel_info_request", {})
    ide.read_until(reply_to(msg_id, "kernel_info_reply"), 30)
    return ide


def assert_next_cell_runs(ide: IdeSocket) -> None:
    cell = Cell(ide, "print(6*7)")
    reply = cell.finish(30)
    assert reply["content"]["status"] == "ok", reply
    assert cell.stdout == ["42"]


class Fault:
    """A fault that starts once a condition holds and lasts ``seconds`` (measured as the IDE reads)."""

    def __init__(self, start: Callable[[], None], end: Callable[[], None], seconds: float) -> None:
        self._start, self._end, self.seconds = start, end, seconds
        self.started: float | None = None
        self.ended: float | None = None

    def begin(self) -> None:
        if self.started is None:
            self._start()
            self.started = time.monotonic()

    def tick(self) -> None:
        if self.started is not None and self.ended is None and time.monotonic() - self.started >= self.seconds:
            self.finish()

    def finish(self) -> None:
        if self.started is not None and self.ended is None:
            self._end()
            self.ended = time.monotonic()


def forty_lines_through(ide: IdeSocket, fault: Fault, timeout: float) -> None:
    """
    The issue's cell, with ``fault`` from its third line on: every line arrives once and in
    order, the reply is ``ok``, and the next cell runs on the same socket.
    """

    def tick(cell: Cell) -> None:
        if cell.lines >= 3:
            fault.begin()
        fault.tick()

    cell = Cell(ide, FORTY_LINES)
    try:
        reply = cell.finish(timeout, tick)
    finally:
        fault.finish()
    assert fault.started is not None, "the fault never started"
    assert cell.stdout == EXPECTED, cell.stdout
    assert reply["content"]["status"] == "ok", reply
    assert_next_cell_runs(ide)


def test_a_cell_survives_a_reset_and_3_s_of_refused_connections(
    hub: JupyterHubProcess, proxy: ProxyFactory, cutter: TcpCutter, kernels: list[str]
) -> None:
    p = through(proxy, hub, cutter)
    token = hub.alice_token
    ide = kernel_socket(p, start_kernel(p.url, token, kernels), token)
    watch = LogWatch(p)

    def break_link() -> None:
        cutter.mode = "reset"
        assert cutter.cut() >= 1

    forty_lines_through(ide, Fault(break_link, lambda: setattr(cutter, "mode", "forward"), 3.0), 60)
    [lost] = watch.wait_for(r"hub link lost: .*; 1 WebSocket holding")
    [back] = watch.wait_for(r"reconnected after \d+(\.\d)? s; \d+ messages? replayed by the server, 0 held messages sent")
    assert not [line for line in watch.lines() if "Traceback" in line]
    link = status_document(p, token)["hub_link"]
    assert link["lost"] == 1 and link["reconnected"] == 1 and link["outage"] is None, link
    assert link["last_outage_seconds"] >= 3.0, link
    ide.ws.close()


def test_a_frozen_proxy_whose_hub_links_were_reset_delivers_every_line(
    hub: JupyterHubProcess, proxy: ProxyFactory, cutter: TcpCutter, kernels: list[str]
) -> None:
    """A sleeping laptop: the proxy is stopped (SIGSTOP) for 20 s while its hub connections are reset."""
    p = through(proxy, hub, cutter)
    assert p.proc is not None
    pid = p.proc.pid
    token = hub.alice_token
    ide = kernel_socket(p, start_kernel(p.url, token, kernels), token)
    watch = LogWatch(p)

    def freeze() -> None:
        os.kill(pid, signal.SIGSTOP)
        assert cutter.cut() >= 1

    forty_lines_through(ide, Fault(freeze, lambda: os.kill(pid, signal.SIGCONT), 20.0), 90)
    watch.wait_for(r"reconnected after")
    ide.ws.close()


def test_a_request_sent_into_a_silent_link_is_delivered_once_it_is_back(
    hub: JupyterHubProcess, proxy: ProxyFactory, cutter: TcpCutter, kernels: list[str]
) -> None:
    """
    The link goes silent (no FIN, no RST; new connections go nowhere). With a 3 s ping interval the
    proxy notices within 3 + 3 s (the default, 30 s, notices within 45 s: tests/test_reconnect.py);
    a request the IDE sends after that is held and delivered once the link is back.
    """
    p = through(proxy, hub, cutter, "--ping-interval", "3", "--connect-timeout", "3")
    token = hub.alice_token
    ide = kernel_socket(p, start_kernel(p.url, token, kernels), token)
    watch = LogWatch(p)
    cutter.mode = "blackhole"
    cutter.silent = True
    went_silent = time.monotonic()
    noticed: list[float] = []

    def lost() -> bool:
        if any("hub link lost" in line for line in watch.lines()):
            noticed.append(time.monotonic())
            return True
        return False

    def tick() -> None:
        if not noticed:
            lost()

    # the IDE reads on (and answers the proxy's pings) until the proxy has noticed
    with pytest.raises(AssertionError, match="not done"):
        ide.read_until(lambda msg: False, 15, tick)
    assert noticed, "\n".join(watch.lines()[-20:])
    assert noticed[0] - went_silent < 3 + 3 + 2, noticed[0] - went_silent
    assert any("no answer to a ping within 3 s" in line for line in watch.lines()), watch.lines()
    msg_id = ide.send("kernel_info_request", {})
    # still silent for a while: the request waits in the proxy
    with pytest.raises(AssertionError, match="not done"):
        ide.read_until(reply_to(msg_id, "kernel_info_reply"), 4)
    cutter.silent = False
    cutter.mode = "forward"
    [reply] = [m for m in ide.read_until(reply_to(msg_id, "kernel_info_reply"), 30) if reply_to(msg_id, "kernel_info_reply")(m)]
    assert reply["content"]["status"] == "ok"
    watch.wait_for(r"reconnected after .*1 held message sent")
    assert_next_cell_runs(ide)
    ide.ws.close()


def test_a_kernel_deleted_during_an_outage_closes_the_ides_socket(
    hub: JupyterHubProcess, proxy: ProxyFactory, cutter: TcpCutter, kernels: list[str]
) -> None:
    p = through(proxy, hub, cutter)
    token = hub.alice_token
    kernel = start_kernel(p.url, token, kernels)
    ide = kernel_socket(p, kernel, token)
    watch = LogWatch(p)
    cutter.mode = "reset"
    assert cutter.cut() >= 1
    watch.wait_for("hub link lost")
    deleted = requests.delete(
        f"{hub.url}/user/alice/api/kernels/{kernel}", headers=auth(token), verify=str(hub.ca_path), timeout=30
    )
    assert deleted.status_code == 204, dump(deleted)
    cutter.mode = "forward"
    code, _ = close_of(ide.ws, 30)
    assert code == 1011, code
    [line] = watch.wait_for(r"closed with 1011: The kernel is gone \(404 after a .* outage\)")
    # the IDE's own reconnect meets what a plain server answers: 404
    with pytest.raises(websocket.WebSocketBadStatusException) as refused:
        open_kernel_socket(p, kernel, token)
    assert refused.value.status_code == 404
    link = status_document(p, token)["hub_link"]
    assert link["gave_up"] == 1 and link["outage"] is None, link


def test_jupyterlab_services_cell_survives_a_reset(
    hub: JupyterHubProcess, proxy: ProxyFactory, cutter: TcpCutter
) -> None:
    node = shutil.which("node")
    assert node, "node is not on PATH (make test puts tests/node's tools there)"
    p = through(proxy, hub, cutter)
    client = subprocess.Popen(
        [node, str(KERNEL_CLIENT), p.url, hub.alice_token, "90", "survive-cut"],
        cwd=KERNEL_CLIENT.parent, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert client.stdout is not None
        line = client.stdout.readline()  # the client says when its third line has arrived
        assert line == "cut now\n", (line, client.stderr.read() if client.poll() is not None else "")
        assert cutter.cut() >= 1
        out, err = client.communicate(timeout=90)
    finally:
        stop_pid(client, 10)
    assert client.returncode == 0, f"{err[-3000:]}\n{p.log_text()[-3000:]}"
    result = json.loads(out.strip().splitlines()[-1])
    assert result["cell"]["status"] == "ok", result
    assert result["cell"]["stdout"].splitlines() == EXPECTED, result["cell"]
    assert result["next"] == {"status": "ok", "stdout": "42\n"}, result
    # one socket, never closed while the cell ran; the library never saw its connection go
    assert len(result["sockets"]) == 1 and result["sockets"][0]["closeCode"] is None, result["sockets"]
    statuses = result["connection_statuses"]
    assert "connecting" not in statuses[statuses.index("connected") + 1 :], statuses
    assert "reconnected after" in p.log_text()


def read_json(ws: websocket.WebSocket, deadline: float) -> Any:
    """The next text message as JSON; pings are answered while waiting; a close fails the test."""
    while (left := deadline - time.monotonic()) > 0:
        ws.settimeout(left)
        try:
            opcode, frame = ws.recv_data_frame(control_frame=True)
        except websocket.WebSocketTimeoutException:
            break
        assert opcode != websocket.ABNF.OPCODE_CLOSE, f"the IDE's socket was closed: {frame.data!r}"
        if opcode == websocket.ABNF.OPCODE_TEXT:
            return json.loads(frame.data)
    raise AssertionError("nothing arrived in time")


@pytest.mark.parametrize("base", ["", "/user/alice"], ids=["ide-view", "server-base-url"])
def test_a_terminal_survives_a_reset(hub: JupyterHubProcess, proxy: ProxyFactory, cutter: TcpCutter, base: str) -> None:
    """``server-base-url``: JupyterLab opened through the proxy opens its sockets under the server's
    own base URL, and they are held like the IDE's."""
    p = through(proxy, hub, cutter)
    token = hub.alice_token
    created = requests.post(f"{p.url}/api/terminals", headers=auth(token), timeout=30)
    assert created.status_code == 200, dump(created)
    name = created.json()["name"]
    ws = websocket.create_connection(
        f"ws://127.0.0.1:{p.port}{base}/terminals/websocket/{name}", header=[f"Authorization: token {token}"],
        timeout=30, suppress_origin=True,
    )  # fmt: skip
    watch = LogWatch(p)

    def shell(command: str, expected: str) -> None:
        ws.send(json.dumps(["stdin", command + "\r"]))
        seen, deadline = "", time.monotonic() + 30
        while expected not in seen:
            kind, *payload = read_json(ws, deadline)
            if kind == "stdout":
                seen += payload[0]

    try:
        # arithmetic, so that the echoed command line never matches the output
        shell("jds_before=$((40+2)); echo before-$jds_before", "before-42")
        assert cutter.cut() >= 1
        watch.wait_for("hub link lost")
        shell("echo after-$((jds_before+1))", "after-43")  # the same shell, its variable kept
        watch.wait_for(r"terminals/websocket/.* reconnected after .*; 1 held message sent")
    finally:
        ws.close()
        requests.delete(f"{hub.url}/user/alice/api/terminals/{name}", headers=auth(token),
                        verify=str(hub.ca_path), timeout=30)  # fmt: skip


def test_managed_events_socket_waits_for_a_stopped_server_to_be_started(
    hub: JupyterHubProcess, proxy: ProxyFactory, cutter: TcpCutter
) -> None:
    """The link breaks and meanwhile the server stops: managed mode starts it and the socket reconnects."""
    if not hub.has_event_socket():
        pytest.skip("jupyter_server 1.x has no event socket; its kernel sockets end with the server they ran on")
    hub.start_server("alice")
    managed = proxy.for_hub(hub, token=hub.alice_token, extra_args=["--hub", f"https://{cutter.address}"]).wait_checked()
    ws = websocket.create_connection(
        f"ws://127.0.0.1:{managed.port}/api/events/subscribe", header=[f"Authorization: token {managed.token}"],
        timeout=30, suppress_origin=True,
    )  # fmt: skip
    watch = LogWatch(managed)
    try:
        cutter.mode = "reset"
        assert cutter.cut() >= 1
        watch.wait_for("hub link lost")
        hub.stop_server("alice")
        cutter.mode = "forward"
        # the IDE reads on while the proxy finds the server stopped, starts it and reconnects
        deadline = time.monotonic() + 180
        while not any("reconnected after" in line for line in watch.lines()):
            with contextlib.suppress(AssertionError):
                read_json(ws, min(deadline, time.monotonic() + 1))
            assert time.monotonic() < deadline, "\n".join(watch.lines()[-20:])
        assert (hub.server_model("alice") or {}).get("ready"), "the proxy started the server"
        path = f"jds-events-{uuid.uuid4().hex}.txt"
        saved = requests.put(
            f"{managed.url}/api/contents/{path}", json={"type": "file", "format": "text", "content": "saved\n"},
            headers=auth(managed.token), timeout=60,
        )  # fmt: skip
        assert saved.status_code == 201, dump(saved)
        deadline, events = time.monotonic() + 30, []
        while not any(e.get("path") == path and e.get("action") == "save" for e in events):
            events.append(read_json(ws, deadline))
        requests.delete(f"{managed.url}/api/contents/{path}", headers=auth(managed.token), timeout=60)
    finally:
        ws.close()
        hub.start_server("alice")
