"""
The WebSocket relay end to end, without JupyterHub: a real jupyter_server serving ``/user/alice/``
over TLS from a trustme CA, the proxy in front of it exactly as ``twistd`` runs it, and
websocket-client (with jupyter_client's message helpers) playing the IDE. All on 127.0.0.1; every
process started here is stopped here, by its own pid.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest
import requests
import trustme
import websocket
from hub import free_port
from jupyter_client.jsonutil import json_default
from jupyter_client.session import Session
from jupyter_server.services.kernels.connection.base import (
    deserialize_binary_message,
    deserialize_msg_from_ws_v1,
    serialize_binary_message,
    serialize_msg_to_ws_v1,
)

BIN = Path(sys.executable).parent
TOKEN = "relay-e2e-token-93f1"
V1 = "v1.kernel.websocket.jupyter.org"
AUTH = {"Authorization": f"token {TOKEN}"}
T = TypeVar("T")


def poll(check: Callable[[], T | None], seconds: float, what: str, log: Path | None = None) -> T:
    """``check()``'s first truthy value; its exceptions count as "not yet"."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            value = check()
        except Exception:  # a server still starting fails in many ways
            value = None
        if value:
            return value
        if time.monotonic() > deadline:
            tail = log.read_text(errors="replace")[-3000:] if log and log.exists() else ""
            raise AssertionError(f"{what} not within {seconds} s\n{tail}")
        time.sleep(0.1)  # poll


def receive(ws: websocket.WebSocket, deadline: float) -> tuple[int, bytes]:
    """The next data frame, or AssertionError at ``deadline``. The socket timeout is short on
    purpose: the proxy pings every 30 s and websocket-client answers pings inside ``recv``,
    so a long timeout would never expire."""
    while time.monotonic() < deadline:
        try:
            return ws.recv_data()
        except websocket.WebSocketTimeoutException:
            continue
    raise AssertionError("nothing received in time")


def stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        os.kill(process.pid, signal.SIGTERM)
        try:
            process.wait(20)
        except subprocess.TimeoutExpired:
            os.kill(process.pid, signal.SIGKILL)
            process.wait(10)


def clean_environ(**extra: str) -> dict[str, str]:
    """No JUPYTER*/JUPYTERHUB* variables leak in: the proxy reads its defaults from them."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("JUPYTER")}
    env.update(extra)
    return env


@dataclass
class Servers:
    directory: Path
    ca: Path
    jupyter_port: int
    proxy_port: int
    proxy_log: Path

    @property
    def http(self) -> str:
        return f"http://127.0.0.1:{self.proxy_port}"

    @property
    def ws(self) -> str:
        return f"ws://127.0.0.1:{self.proxy_port}"


def start_proxy(
    directory: Path, ca: Path, jupyter_port: int, name: str
) -> tuple[subprocess.Popen, int, Path]:
    log = directory / f"{name}.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [
                str(BIN / "twistd"),
                "-n",
                "--pidfile=",
                "jupyter-dev-server",
                "--hub",
                f"https://127.0.0.1:{jupyter_port}",
                "--user",
                "alice",
                "--ca-cert",
                str(ca),
                "--tls-name",
                "localhost",
                "--listen",
                "tcp:0:interface=127.0.0.1",
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=directory,
            env=clean_environ(),
        )
    try:
        port = poll(
            lambda: re.search(r"http://127\.0\.0\.1:(\d+)/\?token=", log.read_text()),
            30,
            "the proxy's start-up URL",
            log,
        )
        port = int(port.group(1))
        poll(
            lambda: requests.get(f"http://127.0.0.1:{port}/api/status", headers=AUTH, timeout=5).ok,
            30,
            "/api/status through the proxy",
            log,
        )
    except BaseException:
        stop(process)
        raise
    return process, port, log


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Servers]:
    directory = tmp_path_factory.mktemp("relay-e2e")
    ca = trustme.CA()
    cert = ca.issue_cert("localhost", "127.0.0.1")
    ca.cert_pem.write_to_path(str(directory / "ca.pem"))
    cert.private_key_pem.write_to_path(str(directory / "key.pem"))
    cert.cert_chain_pems[0].write_to_path(str(directory / "cert.pem"))
    (directory / "root").mkdir()
    port = free_port()
    jupyter_log = directory / "jupyter.log"
    env = clean_environ(
        JUPYTER_RUNTIME_DIR=str(directory / "runtime"),
        JUPYTER_CONFIG_DIR=str(directory / "config"),
        IPYTHONDIR=str(directory / "ipython"),
    )
    with jupyter_log.open("wb") as out:
        jupyter = subprocess.Popen(
            [
                str(BIN / "jupyter-server"),
                "--allow-root",
                "--ServerApp.ip=127.0.0.1",
                f"--ServerApp.port={port}",
                "--ServerApp.port_retries=0",
                "--ServerApp.base_url=/user/alice/",
                f"--IdentityProvider.token={TOKEN}",
                f"--ServerApp.certfile={directory / 'cert.pem'}",
                f"--ServerApp.keyfile={directory / 'key.pem'}",
                f"--ServerApp.root_dir={directory / 'root'}",
                "--ServerApp.open_browser=False",
                # The default 1 MB/s would replace the 5 MB output with a rate-limit notice.
                "--ZMQChannelsWebsocketConnection.iopub_data_rate_limit=0",
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=directory,
            env=env,
        )
    try:
        poll(
            lambda: (
                requests.get(
                    f"https://127.0.0.1:{port}/user/alice/api/status",
                    headers=AUTH,
                    verify=str(directory / "ca.pem"),
                    timeout=5,
                ).ok
            ),
            60,
            "jupyter_server",
            jupyter_log,
        )
        proxy, proxy_port, proxy_log = start_proxy(directory, directory / "ca.pem", port, "proxy")
        try:
            yield Servers(directory, directory / "ca.pem", port, proxy_port, proxy_log)
        finally:
            stop(proxy)
    finally:
        stop(jupyter)


@pytest.fixture(scope="module")
def kernel(servers: Servers) -> Iterator[str]:
    response = requests.post(
        f"{servers.http}/api/kernels", headers=AUTH, json={"name": "python3"}, timeout=30
    )
    assert response.status_code == 201, response.text
    kernel_id = response.json()["id"]
    try:
        yield kernel_id
    finally:
        requests.delete(f"{servers.http}/api/kernels/{kernel_id}", headers=AUTH, timeout=30)


class KernelSocket:
    """The IDE's kernel channel socket: v1 (binary) framing when negotiated, legacy JSON otherwise."""

    def __init__(self, url: str, offer_v1: bool) -> None:
        self.ws = websocket.create_connection(
            url, subprotocols=[V1] if offer_v1 else None, timeout=30, suppress_origin=True
        )
        self.ws.settimeout(2)  # see receive()
        self.v1 = self.ws.getsubprotocol() == V1
        self.session = Session(key=b"ide-side-key", username="ide")

    def send(self, channel: str, msg_type: str, content: dict, buffers: list[bytes] = ()) -> str:
        msg = self.session.msg(msg_type, content)
        if self.v1:
            parts = [
                json.dumps(msg[key], default=json_default).encode()
                for key in ("header", "parent_header", "metadata", "content")
            ]
            self.ws.send_binary(serialize_msg_to_ws_v1([*parts, *buffers], channel))
        elif buffers:
            self.ws.send_binary(
                serialize_binary_message({**msg, "channel": channel, "buffers": list(buffers)})
            )
        else:
            self.ws.send(json.dumps({**msg, "channel": channel}, default=json_default))
        return msg["header"]["msg_id"]

    def recv(self, deadline: float) -> dict[str, Any]:
        opcode, data = receive(self.ws, deadline)
        if self.v1:
            channel, parts = deserialize_msg_from_ws_v1(data)
            header, parent, metadata, content = (json.loads(part) for part in parts[:4])
            return {
                "channel": channel,
                "header": header,
                "parent_header": parent,
                "metadata": metadata,
                "content": content,
                "buffers": parts[4:],
            }
        if opcode == websocket.ABNF.OPCODE_BINARY:
            return deserialize_binary_message(data)
        return json.loads(data)

    def wait_for(self, parent: str, msg_type: str, seconds: float = 60) -> dict[str, Any]:
        deadline = time.monotonic() + seconds
        while True:
            msg = self.recv(deadline)
            if msg["parent_header"].get("msg_id") == parent and msg["header"]["msg_type"] == msg_type:
                return msg

    def execute(self, code: str) -> str:
        return self.send(
            "shell",
            "execute_request",
            {
                "code": code,
                "silent": False,
                "store_history": False,
                "user_expressions": {},
                "allow_stdin": False,
                "stop_on_error": True,
            },
        )

    def close(self) -> None:
        self.ws.close()


def kernel_url(servers: Servers, kernel_id: str, session: str = "ide-session") -> str:
    return f"{servers.ws}/api/kernels/{kernel_id}/channels?session_id={session}&token={TOKEN}"


@pytest.mark.parametrize("offer_v1", [True, False], ids=["v1", "legacy"])
def test_subprotocol_and_kernel_info(servers: Servers, kernel: str, offer_v1: bool) -> None:
    sock = KernelSocket(kernel_url(servers, kernel), offer_v1)
    try:
        assert sock.ws.getsubprotocol() == (V1 if offer_v1 else None)
        reply = sock.wait_for(sock.send("shell", "kernel_info_request", {}), "kernel_info_reply")
        assert reply["channel"] == "shell"
        assert reply["content"]["status"] == "ok"
        assert reply["content"]["language_info"]["name"] == "python"
    finally:
        sock.close()


ECHO_TARGET = """
import comm
def _echo_target(c, open_msg):
    @c.on_msg
    def _echo(msg):
        c.send({"echo": msg["content"]["data"]}, buffers=msg["buffers"])
comm.get_comm_manager().register_target("jds-echo", _echo_target)
"""


@pytest.mark.parametrize("offer_v1", [True, False], ids=["v1", "legacy"])
def test_comm_binary_buffers_round_trip(servers: Servers, kernel: str, offer_v1: bool) -> None:
    sock = KernelSocket(kernel_url(servers, kernel), offer_v1)
    try:
        reply = sock.wait_for(sock.execute(ECHO_TARGET), "execute_reply")
        assert reply["content"]["status"] == "ok", reply["content"]
        comm_id = f"comm-{offer_v1}"
        sock.send("shell", "comm_open", {"comm_id": comm_id, "target_name": "jds-echo", "data": {}})
        buffers = [bytes(range(256)) * 64, b"\x00", b"\xff" * 3]
        parent = sock.send("shell", "comm_msg", {"comm_id": comm_id, "data": {"n": 3}}, buffers)
        echo = sock.wait_for(parent, "comm_msg")
        assert echo["channel"] == "iopub"
        assert echo["content"]["data"] == {"echo": {"n": 3}}
        assert [bytes(b) for b in echo["buffers"]] == buffers
    finally:
        sock.close()


def test_large_output_arrives(servers: Servers, kernel: str) -> None:
    sock = KernelSocket(kernel_url(servers, kernel), True)
    try:
        parent = sock.execute("print('x' * 5_000_000)")
        text, deadline = [], time.monotonic() + 120
        while True:
            msg = sock.recv(deadline)
            if msg["parent_header"].get("msg_id") != parent:
                continue
            if msg["header"]["msg_type"] == "stream":
                text.append(msg["content"]["text"])
            if msg["header"]["msg_type"] == "status" and msg["content"]["execution_state"] == "idle":
                break
        assert "".join(text) == "x" * 5_000_000 + "\n"
    finally:
        sock.close()


def test_terminal_echoes(servers: Servers) -> None:
    response = requests.post(f"{servers.http}/api/terminals", headers=AUTH, timeout=30)
    assert response.status_code == 200, response.text
    name = response.json()["name"]
    try:
        ws = websocket.create_connection(
            f"{servers.ws}/terminals/websocket/{name}?token={TOKEN}",
            timeout=30,
            suppress_origin=True,
        )
        ws.settimeout(2)  # see receive()
        try:
            # The quotes keep the echoed command line from matching: only the output is "hi".
            ws.send(json.dumps(["stdin", "echo h''i\r"]))
            seen, deadline = "", time.monotonic() + 30
            while "hi\r\n" not in seen:
                kind, *payload = json.loads(receive(ws, deadline)[1])
                if kind == "stdout":
                    seen += payload[0]
        finally:
            ws.close()
    finally:
        requests.delete(f"{servers.http}/api/terminals/{name}", headers=AUTH, timeout=30)


def test_browser_page_origin_rules(servers: Servers, kernel: str) -> None:
    own = websocket.create_connection(kernel_url(servers, kernel), timeout=30, origin=servers.http)
    own.close()
    with pytest.raises(websocket.WebSocketBadStatusException) as refused:
        websocket.create_connection(kernel_url(servers, kernel), timeout=30, origin="https://evil.example")
    assert refused.value.status_code == 403
    assert json.loads(refused.value.resp_body)["reason"] == "origin-refused"


def test_hub_refusal_status_passes(servers: Servers, kernel: str) -> None:
    url = kernel_url(servers, kernel).replace(TOKEN, "wrong-token")
    with pytest.raises(websocket.WebSocketBadStatusException) as refused:
        websocket.create_connection(url, timeout=30, suppress_origin=True)
    assert refused.value.status_code == 403
    assert json.loads(refused.value.resp_body)["reason"] == "hub-refused"


def test_proxy_shutdown_closes_sockets_with_1001(servers: Servers, kernel: str) -> None:
    proxy, port, log = start_proxy(servers.directory, servers.ca, servers.jupyter_port, "proxy-2")
    try:
        url = kernel_url(servers, kernel).replace(f":{servers.proxy_port}/", f":{port}/")
        sock = KernelSocket(url, True)
        try:
            sock.wait_for(sock.send("shell", "kernel_info_request", {}), "kernel_info_reply")
            os.kill(proxy.pid, signal.SIGTERM)
            deadline, opcode, data = time.monotonic() + 20, None, b""
            while opcode != websocket.ABNF.OPCODE_CLOSE:  # iopub status may still be on its way
                assert time.monotonic() < deadline, "no close frame"
                try:
                    opcode, data = sock.ws.recv_data(control_frame=True)
                except websocket.WebSocketTimeoutException:
                    continue
            assert int.from_bytes(data[:2], "big") == 1001
        finally:
            sock.close()
        # twistd stops cleanly, then re-raises the signal so its exit status tells why.
        assert proxy.wait(20) in (0, -signal.SIGTERM)
    finally:
        stop(proxy)


def test_no_token_in_the_proxy_log(servers: Servers) -> None:
    text = servers.proxy_log.read_text()
    assert "WebSocket /api/kernels/" in text
    assert TOKEN not in text
