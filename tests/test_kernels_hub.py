"""
Kernels, terminals and the debugger through the proxy, against the real hub: what an IDE does once it
has a kernel. Three kinds of clients: ``@jupyterlab/services`` in Node (what VS Code runs), a
``websocket-client`` speaking the kernel wire formats by hand (both framings jupyter_server offers),
and the debugger's DAP messages over the kernel socket's control channel (ipykernel 6+).

Every kernel, terminal and session a test creates is deleted at teardown, directly on the hub, and
alice's default server is left running.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import re
import shutil
import struct
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from datetime import datetime, timezone
from typing import Any

import pytest
import requests
import websocket
from hub import REPO_ROOT, JupyterHubProcess, ProxyFactory, ProxyProcess, dump, poll, stop_pid

V1 = "v1.kernel.websocket.jupyter.org"
HTTP_TIMEOUT = 60  # seconds, for every REST call
KERNEL_CLIENT = REPO_ROOT / "tests" / "node" / "kernel_client.mjs"


def auth(token: str) -> dict[str, str]:
    return {"Authorization": f"token {token}"}


def ws_base(base: str) -> str:
    """http://... -> ws://..., https://... -> wss://..."""
    return "ws" + base[len("http") :]


# -- the kernel wire formats, as a client writes and reads them ------------------------------------


def _pack(obj: Any) -> bytes:
    return json.dumps(obj).encode()


def encode_v1(channel: str, msg: dict[str, Any]) -> bytes:
    """``v1.kernel.websocket.jupyter.org``: little-endian offsets, channel, four JSON parts, buffers."""
    parts = [_pack(msg[k]) for k in ("header", "parent_header", "metadata", "content")]
    parts += [bytes(b) for b in msg.get("buffers", ())]
    chunks = [channel.encode(), *parts]
    offsets = [8 * (1 + len(chunks) + 1)]
    for chunk in chunks:
        offsets.append(offsets[-1] + len(chunk))
    return b"".join([len(offsets).to_bytes(8, "little"), *(o.to_bytes(8, "little") for o in offsets), *chunks])


def decode_v1(data: bytes) -> dict[str, Any]:
    count = int.from_bytes(data[:8], "little")
    offsets = [int.from_bytes(data[8 * (i + 1) : 8 * (i + 2)], "little") for i in range(count)]
    chunks = [data[a:b] for a, b in zip(offsets, offsets[1:], strict=False)]
    header, parent, metadata, content = (json.loads(c) for c in chunks[1:5])
    return {
        "channel": chunks[0].decode(), "header": header, "parent_header": parent,
        "metadata": metadata, "content": content, "buffers": chunks[5:],
    }  # fmt: skip


def encode_legacy(channel: str, msg: dict[str, Any]) -> tuple[bytes | str, int]:
    """No subprotocol: JSON text, or with buffers the big-endian binary framing."""
    body = {**msg, "channel": channel}
    buffers = [bytes(b) for b in body.pop("buffers", ())]
    if not buffers:
        return json.dumps(body), websocket.ABNF.OPCODE_TEXT
    chunks = [json.dumps(body).encode(), *buffers]
    offsets = [4 * (len(chunks) + 1)]
    for chunk in chunks[:-1]:
        offsets.append(offsets[-1] + len(chunk))
    return struct.pack(f"!{len(chunks) + 1}I", len(chunks), *offsets) + b"".join(chunks), websocket.ABNF.OPCODE_BINARY


def decode_legacy(data: bytes, binary: bool) -> dict[str, Any]:
    if not binary:
        msg = json.loads(data)
        msg.setdefault("buffers", [])
        return msg
    count = struct.unpack("!I", data[:4])[0]
    offsets = [*struct.unpack(f"!{count}I", data[4 : 4 * (count + 1)]), len(data)]
    chunks = [data[a:b] for a, b in zip(offsets, offsets[1:], strict=False)]
    msg = json.loads(chunks[0])
    msg["buffers"] = chunks[1:]
    return msg


def next_frame(ws: websocket.WebSocket, deadline: float) -> tuple[int, bytes] | None:
    """
    The next text, binary or close frame, or None at ``deadline``. Pings come back to this loop
    (``control_frame=True``): the proxy pings every 30 s, and each ping would otherwise restart a
    blocking read's timeout, forever.
    """
    while (left := deadline - time.monotonic()) > 0:
        ws.settimeout(left)
        try:
            opcode, data = ws.recv_data(control_frame=True)
        except websocket.WebSocketTimeoutException:
            return None
        if opcode in (websocket.ABNF.OPCODE_TEXT, websocket.ABNF.OPCODE_BINARY, websocket.ABNF.OPCODE_CLOSE):
            return opcode, data
    return None


def next_json(ws: websocket.WebSocket, deadline: float, what: str) -> Any:
    frame = next_frame(ws, deadline)
    assert frame is not None, f"nothing more came before the deadline while waiting for {what}"
    opcode, data = frame
    assert opcode != websocket.ABNF.OPCODE_CLOSE, f"closed ({data!r}) while waiting for {what}"
    return json.loads(data)


class KernelSocket:
    """
    One ``/api/kernels/<id>/channels`` socket. Speaks v1 when the server chose it and the JSON
    framing otherwise; keeps what it read while waiting for something else, for later ``wait``s.
    """

    def __init__(
        self,
        base: str,
        kernel_id: str,
        token: str,
        protocols: Sequence[str] = (V1,),
        origin: str | None = None,
        session: str | None = None,
        sslopt: dict[str, Any] | None = None,
        timeout: float = 60,
    ) -> None:
        self.session = session or uuid.uuid4().hex
        self.url = f"{ws_base(base)}/api/kernels/{kernel_id}/channels?session_id={self.session}"
        options: dict[str, Any] = {"origin": origin} if origin else {"suppress_origin": True}
        self.ws = websocket.create_connection(
            self.url, header=[f"Authorization: token {token}"], subprotocols=list(protocols) or None,
            timeout=timeout, sslopt=sslopt, **options,
        )  # fmt: skip
        self.protocol = self.ws.getsubprotocol()
        self.backlog: list[dict[str, Any]] = []
        self.opcodes: set[int] = set()  # of the messages received

    def send(self, channel: str, msg_type: str, content: dict[str, Any], buffers: Sequence[bytes] = ()) -> str:
        msg_id = uuid.uuid4().hex
        msg = {
            "header": {
                "msg_id": msg_id, "msg_type": msg_type, "session": self.session, "username": "jds",
                "version": "5.3", "date": datetime.now(timezone.utc).isoformat(),
            },
            "parent_header": {}, "metadata": {}, "content": content, "buffers": list(buffers),
        }  # fmt: skip
        if self.protocol == V1:
            self.ws.send(encode_v1(channel, msg), websocket.ABNF.OPCODE_BINARY)
        else:
            self.ws.send(*encode_legacy(channel, msg))
        return msg_id

    def _read(self, deadline: float) -> dict[str, Any] | None:
        frame = next_frame(self.ws, deadline)
        if frame is None:
            return None
        opcode, data = frame
        assert opcode != websocket.ABNF.OPCODE_CLOSE, f"the kernel socket was closed: {data!r}"
        self.opcodes.add(opcode)
        binary = opcode == websocket.ABNF.OPCODE_BINARY
        if self.protocol == V1:
            assert binary, f"v1 messages are binary, got opcode {opcode}: {data[:200]!r}"
            return decode_v1(data)
        return decode_legacy(data, binary)

    def wait(self, match: Callable[[dict[str, Any]], bool], timeout: float = 30, what: str = "a message") -> dict[str, Any]:
        for i, msg in enumerate(self.backlog):
            if match(msg):
                return self.backlog.pop(i)
        deadline = time.monotonic() + timeout
        while (msg := self._read(deadline)) is not None:
            if match(msg):
                return msg
            self.backlog.append(msg)
        seen = [(m["channel"], m["header"]["msg_type"]) for m in self.backlog[-20:]]
        raise AssertionError(f"no {what} within {timeout:g} s; last seen: {seen}")

    def reply(self, msg_id: str, timeout: float = 30) -> dict[str, Any]:
        """The ``*_reply`` to one request, on whatever channel it comes."""
        return self.wait(
            lambda m: m["parent_header"].get("msg_id") == msg_id and m["header"]["msg_type"].endswith("_reply"),
            timeout, f"reply to {msg_id}",
        )  # fmt: skip

    def execute(self, code: str) -> str:
        return self.send("shell", "execute_request", {
            "code": code, "silent": False, "store_history": False, "user_expressions": {},
            "allow_stdin": False, "stop_on_error": True,
        })  # fmt: skip

    def close(self) -> None:
        self.ws.close()


def stdout_of(sock: KernelSocket, msg_id: str, timeout: float = 30) -> str:
    """The stdout of one execution, up to the kernel going idle; its reply must be ``ok``."""
    out: list[str] = []

    def done(msg: dict[str, Any]) -> bool:
        if msg["parent_header"].get("msg_id") != msg_id:
            return False
        kind, content = msg["header"]["msg_type"], msg["content"]
        if kind == "stream" and content.get("name") == "stdout":
            out.append(content["text"])
        if kind == "error":
            raise AssertionError("the kernel raised:\n" + "\n".join(content.get("traceback", [])))
        return kind == "status" and content.get("execution_state") == "idle"

    sock.wait(done, timeout, f"the end of execution {msg_id}")
    assert sock.reply(msg_id, timeout)["content"]["status"] == "ok"
    return "".join(out)


def close_frame(ws: websocket.WebSocket, timeout: float) -> bytes | None:
    """Read until a close frame; return its payload (code and reason), or None if none came in time."""
    deadline = time.monotonic() + timeout
    while (frame := next_frame(ws, deadline)) is not None:
        if frame[0] == websocket.ABNF.OPCODE_CLOSE:
            return frame[1]
    return None


# -- fixtures ------------------------------------------------------------------------------------


class HubObjects:
    """Kernels, terminals and sessions created by a test, deleted at teardown directly on the hub."""

    KINDS = ("sessions", "kernels", "terminals")

    def __init__(self, hub: JupyterHubProcess) -> None:
        self.hub = hub
        self.sessions: list[str] = []
        self.kernels: list[str] = []
        self.terminals: list[str] = []

    def _listed(self, kind: str) -> set[str]:
        listed = requests.get(
            f"{self.direct}/api/{kind}", headers=auth(self.hub.alice_token), verify=str(self.hub.ca_path),
            timeout=HTTP_TIMEOUT,
        )
        assert listed.status_code == 200, dump(listed)
        return {item["id" if kind != "terminals" else "name"] for item in listed.json()}

    def snapshot(self) -> dict[str, set[str]]:
        return {kind: self._listed(kind) for kind in self.KINDS}

    def adopt_new(self, before: dict[str, set[str]]) -> None:
        """Delete at teardown whatever someone else (the Node client) created since ``before``."""
        for kind in self.KINDS:
            getattr(self, kind).extend(self._listed(kind) - before[kind])

    @property
    def direct(self) -> str:
        """alice's server on the hub itself, without the proxy."""
        return self.hub.server_url("alice").rstrip("/")

    def direct_sslopt(self) -> dict[str, Any]:
        return {"ca_certs": str(self.hub.ca_path)}

    def start_kernel(self, base: str, token: str, verify: Any = True) -> str:
        started = requests.post(
            f"{base}/api/kernels", json={"name": "python3"}, headers=auth(token), verify=verify, timeout=HTTP_TIMEOUT
        )
        assert started.status_code == 201, dump(started)
        self.kernels.append(started.json()["id"])
        return self.kernels[-1]

    def start_terminal(self, base: str, token: str, verify: Any = True) -> str:
        started = requests.post(f"{base}/api/terminals", headers=auth(token), verify=verify, timeout=HTTP_TIMEOUT)
        assert started.status_code == 200, dump(started)
        self.terminals.append(started.json()["name"])
        return self.terminals[-1]

    def delete_all(self) -> None:
        headers, ca = auth(self.hub.alice_token), str(self.hub.ca_path)
        for kind in self.KINDS:
            for name in getattr(self, kind):
                requests.delete(f"{self.direct}/api/{kind}/{name}", headers=headers, verify=ca, timeout=HTTP_TIMEOUT)


@pytest.fixture
def objects(hub: JupyterHubProcess) -> Iterator[HubObjects]:
    hub.start_server("alice")
    created = HubObjects(hub)
    try:
        yield created
    finally:
        created.delete_all()


@pytest.fixture
def alice(hub: JupyterHubProcess, proxy: ProxyFactory) -> ProxyProcess:
    """A pass-through proxy for alice; her server is (re)started if an earlier test stopped it."""
    hub.start_server("alice")
    return proxy.for_hub(hub)


# -- 1. @jupyterlab/services in Node -------------------------------------------------------------


@pytest.mark.parametrize("mode", ["pass-through", "managed"])
def test_jupyterlab_services_client(
    hub: JupyterHubProcess, proxy: ProxyFactory, objects: HubObjects, mode: str
) -> None:
    node = shutil.which("node")
    assert node, "Node.js is needed for the @jupyterlab/services client (make test installs tests/node)"
    assert (REPO_ROOT / "tests" / "node" / "node_modules" / "@jupyterlab" / "services").is_dir(), "run make test"
    served = proxy.for_hub(hub, token=hub.alice_token if mode == "managed" else None)
    token = served.token if mode == "managed" else hub.alice_token
    assert token
    before = objects.snapshot()
    client = subprocess.Popen(
        [node, str(KERNEL_CLIENT), served.url, token, "60"],
        cwd=KERNEL_CLIENT.parent, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        out, err = client.communicate(timeout=90)
    finally:
        stop_pid(client, 10)
        objects.adopt_new(before)
    assert client.returncode == 0, f"{err.decode()[-3000:]}\n{served.log_text()[-3000:]}"
    result = json.loads(out.decode().strip().splitlines()[-1])
    assert result["implementation"] == "ipython"
    assert result["answer"] == "42\n"
    big = result["big"]
    assert big["status"] == "ok" and big["displays"] == 1, big
    assert big["display_length"] == 5 * 1024 * 1024 and big["display_intact"], big
    assert big["stdout_length"] == 2 * 1024 * 1024 + 1 and big["stdout_intact"], big
    interrupt = result["interrupt"]
    assert interrupt["status"] == "error" and interrupt["ename"] == "KeyboardInterrupt", interrupt
    assert interrupt["stdout"] == "sleeping\n"
    assert interrupt["seconds"] < 15, "the interrupt must stop time.sleep(30) early"
    assert result["after_restart"] == "42 False\n", "a restarted kernel forgets its variables"
    assert result["kernel_listed_after_shutdown"] is False
    # one kernel socket, and another after the restart, each with the subprotocol the hub chose
    sockets = result["sockets"]
    assert len(sockets) >= 2, sockets
    for sock in sockets:
        assert sock["url"].startswith(f"{ws_base(served.url)}/api/kernels/{result['kernel_id']}/channels?"), sock
        assert sock["offered"] == [V1] and sock["protocol"] == V1, sock
    if mode == "managed":
        assert hub.alice_token not in out.decode() + err.decode()
    # shut down on the hub too, not only in the proxy's answers
    assert result["kernel_id"] not in objects.snapshot()["kernels"]
    assert result["session_id"] not in objects.snapshot()["sessions"]


# -- 2. the wire formats by hand ---------------------------------------------------------------------


def test_subprotocol_is_negotiated_or_absent(hub: JupyterHubProcess, alice: ProxyProcess, objects: HubObjects) -> None:
    kernel = objects.start_kernel(alice.url, hub.alice_token)
    offered = KernelSocket(alice.url, kernel, hub.alice_token, protocols=[V1])
    plain = KernelSocket(alice.url, kernel, hub.alice_token, protocols=[])
    try:
        assert offered.protocol == V1
        assert offered.ws.getheaders().get("sec-websocket-protocol") == V1
        assert plain.protocol is None
        assert "sec-websocket-protocol" not in plain.ws.getheaders()
        for sock in (offered, plain):
            info = sock.reply(sock.send("shell", "kernel_info_request", {}))
            assert info["header"]["msg_type"] == "kernel_info_reply"
            assert info["channel"] == "shell"
            assert info["content"]["status"] == "ok"
            assert info["content"]["implementation"] == "ipython"
        assert stdout_of(offered, offered.execute("print(6*7)")) == "42\n"
        assert stdout_of(plain, plain.execute("print(6*7)")) == "42\n"
        # each got its own framing: v1 is binary, the legacy one JSON text
        assert offered.opcodes == {websocket.ABNF.OPCODE_BINARY}
        assert plain.opcodes == {websocket.ABNF.OPCODE_TEXT}
    finally:
        offered.close()
        plain.close()


ECHO_TARGET = """
import comm
def _jds_echo(c, opened):
    c.on_msg(lambda msg: c.send({"echo": msg["content"]["data"]}, buffers=[bytes(b) for b in msg["buffers"]]))
    c.send({"opened": opened["content"]["data"]}, buffers=[bytes(b) for b in opened["buffers"]])
comm.get_comm_manager().register_target("jds_echo", _jds_echo)
print("registered")
"""


@pytest.mark.parametrize("protocol", [V1, None], ids=["v1", "legacy"])
def test_comm_buffers_round_trip_byte_for_byte(
    hub: JupyterHubProcess, alice: ProxyProcess, objects: HubObjects, protocol: str | None
) -> None:
    kernel = objects.start_kernel(alice.url, hub.alice_token)
    sock = KernelSocket(alice.url, kernel, hub.alice_token, protocols=[protocol] if protocol else [])
    try:
        assert sock.protocol == protocol
        assert stdout_of(sock, sock.execute(ECHO_TARGET)) == "registered\n"
        comm_id = uuid.uuid4().hex
        small, large = bytes(range(256)) * 4, os.urandom(3 * 1024 * 1024 + 7)

        def comm_msg(msg: dict[str, Any]) -> bool:
            return msg["header"]["msg_type"] == "comm_msg" and msg["content"].get("comm_id") == comm_id

        sock.send("shell", "comm_open", {"comm_id": comm_id, "target_name": "jds_echo", "data": {"n": 1}}, [small])
        opened = sock.wait(comm_msg, 30, "the comm's greeting")
        assert opened["channel"] == "iopub"
        assert opened["content"]["data"] == {"opened": {"n": 1}}
        assert [bytes(b) for b in opened["buffers"]] == [small]
        sock.send("shell", "comm_msg", {"comm_id": comm_id, "data": {"n": 2}}, [large, b"", small])
        echoed = sock.wait(comm_msg, 60, "the comm's echo")
        assert echoed["content"]["data"] == {"echo": {"n": 2}}
        assert [len(b) for b in echoed["buffers"]] == [len(large), 0, len(small)]
        assert [bytes(b) for b in echoed["buffers"]] == [large, b"", small]
    finally:
        sock.close()


def test_terminal_echoes(hub: JupyterHubProcess, alice: ProxyProcess, objects: HubObjects) -> None:
    name = objects.start_terminal(alice.url, hub.alice_token)
    ws = websocket.create_connection(
        f"{ws_base(alice.url)}/terminals/websocket/{name}", header=[f"Authorization: token {hub.alice_token}"],
        timeout=30, suppress_origin=True,
    )  # fmt: skip
    try:
        # the typed line reads `echo "h""i"`; only the shell's output is a line that says hi
        ws.send(json.dumps(["stdin", 'echo "h""i"\r']))
        seen, deadline = "", time.monotonic() + 30
        while not re.search(r"[\r\n]hi\r\n", seen):
            kind, *rest = next_json(ws, deadline, f"the terminal to print hi; it printed {seen[-500:]!r}")
            if kind == "stdout":
                seen += rest[0]
    finally:
        ws.close()


def test_ten_kernel_sockets_at_once(hub: JupyterHubProcess, alice: ProxyProcess, objects: HubObjects) -> None:
    with concurrent.futures.ThreadPoolExecutor(10) as pool:
        kernels = list(pool.map(lambda _: objects.start_kernel(alice.url, hub.alice_token), range(10)))
        sockets = list(pool.map(lambda k: KernelSocket(alice.url, k, hub.alice_token, timeout=90), kernels))
        try:
            asked = [sock.send("shell", "kernel_info_request", {}) for sock in sockets]
            replies = list(pool.map(lambda pair: pair[0].reply(pair[1], 60), zip(sockets, asked, strict=True)))
        finally:
            for sock in sockets:
                sock.close()
    assert len(set(kernels)) == 10
    assert all(sock.protocol == V1 for sock in sockets)
    for sock, msg_id, reply in zip(sockets, asked, replies, strict=True):
        assert reply["header"]["msg_type"] == "kernel_info_reply"
        assert reply["parent_header"]["msg_id"] == msg_id
        assert reply["parent_header"]["session"] == sock.session
        assert reply["content"]["status"] == "ok"


# -- 3. the debugger over the control channel --------------------------------------------------------


class Debugger:
    """DAP requests as ``debug_request`` messages on the control channel, as JupyterLab sends them."""

    def __init__(self, sock: KernelSocket) -> None:
        self.sock = sock
        self.seq = 0

    def request(self, command: str, arguments: dict[str, Any] | None = None, timeout: float = 30) -> dict[str, Any]:
        self.seq += 1
        dap = {"type": "request", "seq": self.seq, "command": command, "arguments": arguments or {}}
        msg_id = self.sock.send("control", "debug_request", dap)
        reply = self.sock.reply(msg_id, timeout)
        assert reply["channel"] == "control" and reply["header"]["msg_type"] == "debug_reply", reply["header"]
        assert reply["content"].get("command") == command, reply["content"]
        assert reply["content"].get("success") is True, reply["content"]
        return reply["content"]

    def event(self, name: str, timeout: float = 30) -> dict[str, Any]:
        msg = self.sock.wait(
            lambda m: m["header"]["msg_type"] == "debug_event" and m["content"].get("event") == name,
            timeout, f"debug_event {name}",
        )  # fmt: skip
        assert msg["channel"] == "iopub"
        return msg["content"]


CELL = """\
jds_a = 6
jds_b = jds_a * 7
print(jds_b)
"""


def test_cell_debugging(hub: JupyterHubProcess, alice: ProxyProcess, objects: HubObjects) -> None:
    kernel = objects.start_kernel(alice.url, hub.alice_token)
    sock = KernelSocket(alice.url, kernel, hub.alice_token)
    try:
        info = sock.reply(sock.send("shell", "kernel_info_request", {}))
        # ipykernel 7 lists the debugger in supported_features, later 6.x say "debugger": true, and
        # older 6.x (JupyterHub 3.1's era) only in the kernelspec's metadata
        content = info["content"]
        spec = requests.get(f"{alice.url}/api/kernelspecs/python3", headers=auth(hub.alice_token), timeout=HTTP_TIMEOUT)
        assert spec.status_code == 200, dump(spec)
        assert (
            content.get("debugger") is True
            or "debugger" in content.get("supported_features", [])
            or spec.json()["spec"].get("metadata", {}).get("debugger") is True
        ), (content, spec.json())
        debug = Debugger(sock)
        debug.request("initialize", {
            "clientID": "jds-tests", "clientName": "jds-tests", "adapterID": "python", "pathFormat": "path",
            "linesStartAt1": True, "columnsStartAt1": True, "supportsVariableType": True,
            "supportsVariablePaging": True, "supportsRunInTerminalRequest": True, "locale": "en",
        }, timeout=60)  # fmt: skip
        debug.request("attach", timeout=60)
        source = debug.request("dumpCell", {"code": CELL})["body"]["sourcePath"]
        assert source.endswith(".py"), source
        placed = debug.request("setBreakpoints", {
            "source": {"path": source}, "breakpoints": [{"line": 2}], "sourceModified": False,
        })["body"]["breakpoints"]  # fmt: skip
        assert [b["line"] for b in placed] == [2] and placed[0]["verified"], placed
        debug.request("configurationDone")

        run = sock.execute(CELL)
        stopped = debug.event("stopped", timeout=60)
        assert stopped["body"]["reason"] == "breakpoint", stopped
        thread = stopped["body"]["threadId"]
        frames = debug.request("stackTrace", {"threadId": thread})["body"]["stackFrames"]
        assert frames[0]["line"] == 2 and frames[0]["source"]["path"] == source, frames[0]
        # stopped before line 2 runs: jds_a is set, jds_b not yet
        scopes = debug.request("scopes", {"frameId": frames[0]["id"]})["body"]["scopes"]
        names = {}
        for scope in scopes:
            listed = debug.request("variables", {"variablesReference": scope["variablesReference"]})
            names.update({v["name"]: v["value"] for v in listed["body"]["variables"]})
        assert names.get("jds_a") == "6" and "jds_b" not in names, sorted(names)
        debug.request("continue", {"threadId": thread})
        assert stdout_of(sock, run, 60) == "42\n"
        debug.request("disconnect", {"restart": False, "terminateDebuggee": True})
    finally:
        sock.close()


# -- 4. Origin -----------------------------------------------------------------------------------------


def test_foreign_origin_never_reaches_the_hub(hub: JupyterHubProcess, alice: ProxyProcess, objects: HubObjects) -> None:
    evil_kernel, control_kernel = str(uuid.uuid4()), str(uuid.uuid4())
    with pytest.raises(websocket.WebSocketBadStatusException) as refused:
        KernelSocket(alice.url, evil_kernel, hub.alice_token, origin="http://evil.example")
    assert refused.value.status_code == 403
    error = json.loads(refused.value.resp_body)
    assert error["reason"] == "origin-refused" and "http://evil.example" in error["message"], error
    # the same kind of request without a foreign Origin does reach the hub (and is logged there: 404)
    with pytest.raises(websocket.WebSocketBadStatusException) as missing:
        KernelSocket(alice.url, control_kernel, hub.alice_token)
    assert missing.value.status_code == 404
    poll(lambda: control_kernel in hub.log_text() or None, 15, "the hub to log the control request")
    assert evil_kernel not in hub.log_text()
    assert evil_kernel in alice.log_text(), "the proxy logs what it refused"

    # the proxy's own origin is what a page it serves would send: accepted, and the hub accepts it too
    kernel = objects.start_kernel(alice.url, hub.alice_token)
    own = KernelSocket(alice.url, kernel, hub.alice_token, origin=alice.url)
    try:
        assert own.ws.getstatus() == 101
        assert own.reply(own.send("shell", "kernel_info_request", {}))["content"]["status"] == "ok"
    finally:
        own.close()


# -- 5. close codes from the hub's side --------------------------------------------------------------


def test_hub_side_closes_reach_the_client_unchanged(
    hub: JupyterHubProcess, alice: ProxyProcess, objects: HubObjects
) -> None:
    """
    The same server-side events, seen by a client of the hub itself and by a client of the proxy:
    whatever close frame the first gets (code and reason, byte for byte), the second gets too.

    jupyter_server 2.x sends no close frame when a kernel is deleted (its sockets stay open and see
    the shutdown's status messages): it closes a kernel socket when another one takes over its
    session (an IDE reconnecting), and terminado closes a terminal's socket when the terminal goes.
    Both send a close frame without a code, which a client reads as 1005.
    """
    token = hub.alice_token
    routes = {"direct": (objects.direct, str(hub.ca_path), objects.direct_sslopt()), "proxy": (alice.url, True, None)}
    seen: dict[str, dict[str, bytes | None]] = {name: {} for name in routes}

    kernel = objects.start_kernel(alice.url, token)
    watching = {name: KernelSocket(base, kernel, token, sslopt=sslopt) for name, (base, _, sslopt) in routes.items()}
    for sock in watching.values():
        assert sock.reply(sock.send("shell", "kernel_info_request", {}))["content"]["status"] == "ok"
    deleted = requests.delete(f"{alice.url}/api/kernels/{kernel}", headers=auth(token), timeout=HTTP_TIMEOUT)
    assert deleted.status_code == 204, dump(deleted)
    deadline = time.monotonic() + 3
    for name, sock in watching.items():
        seen[name]["kernel deleted"] = close_frame(sock.ws, max(deadline - time.monotonic(), 0.5))
        sock.close()

    for name, (base, verify, sslopt) in routes.items():
        kernel = objects.start_kernel(base, token, verify)
        first = KernelSocket(base, kernel, token, sslopt=sslopt)
        second = KernelSocket(base, kernel, token, session=first.session, sslopt=sslopt)
        seen[name]["session taken over"] = close_frame(first.ws, 15)
        assert second.reply(second.send("shell", "kernel_info_request", {}))["content"]["status"] == "ok"
        second.close()

        terminal = objects.start_terminal(base, token, verify)
        term = websocket.create_connection(
            f"{ws_base(base)}/terminals/websocket/{terminal}", header=[f"Authorization: token {token}"],
            timeout=30, suppress_origin=True, sslopt=sslopt,
        )  # fmt: skip
        deleted = requests.delete(
            f"{base}/api/terminals/{terminal}", headers=auth(token), verify=verify, timeout=HTTP_TIMEOUT
        )
        assert deleted.status_code == 204, dump(deleted)
        seen[name]["terminal deleted"] = close_frame(term, 15)
        term.close()

    assert seen["proxy"] == seen["direct"], seen
    assert seen["direct"]["session taken over"] is not None, seen
    assert seen["direct"]["terminal deleted"] is not None, seen


# -- 6. managed mode: a WebSocket starts a stopped server ------------------------------------------


def spawn_requests(hub: JupyterHubProcess) -> int:
    """How many times the hub was asked to start alice's default server (from its own log)."""
    return len(re.findall(r"POST /hub/api/users/alice/server ", hub.log_text()))


def test_managed_websocket_starts_a_stopped_server(hub: JupyterHubProcess, proxy: ProxyFactory) -> None:
    hub.start_server("alice")
    # Its start-up checks (logged, the last one on kernelspecs) start a stopped server by themselves:
    # let them finish against the running server first, or they race the stop below.
    managed = proxy.for_hub(hub, token=hub.alice_token).wait_checked()
    assert managed.token and managed.token != hub.alice_token
    # jupyter_server 2's event socket needs nothing on the server; with 1.x (no event socket) the
    # IDE's kernel socket of a kernel that went with the server is what reconnects
    events = hub.has_event_socket()
    if not events:
        kernel = requests.post(
            f"{managed.url}/api/kernels", json={"name": "python3"}, headers=auth(managed.token), timeout=HTTP_TIMEOUT
        )
        assert kernel.status_code == 201, dump(kernel)
    hub.stop_server("alice")
    try:
        assert hub.server_model("alice") is None
        before = spawn_requests(hub)
        if not events:
            with pytest.raises(websocket.WebSocketBadStatusException) as refused:
                websocket.create_connection(
                    f"{ws_base(managed.url)}/api/kernels/{kernel.json()['id']}/channels",
                    header=[f"Authorization: token {managed.token}"], timeout=120, suppress_origin=True,
                )  # fmt: skip
            assert (hub.server_model("alice") or {}).get("ready"), "the server runs after the handshake"
            assert spawn_requests(hub) - before == 1, "one spawn, by the proxy"
            # the new server answered the handshake: that kernel is gone with the old one
            assert refused.value.status_code == 404, refused.value
            return
        ws = websocket.create_connection(
            f"{ws_base(managed.url)}/api/events/subscribe", header=[f"Authorization: token {managed.token}"],
            timeout=120, suppress_origin=True,
        )  # fmt: skip
        try:
            assert ws.getstatus() == 101
            assert (hub.server_model("alice") or {}).get("ready"), "the server runs after the handshake"
            assert spawn_requests(hub) - before == 1, "one spawn, by the proxy"
            # the socket is spliced to the new server: its events arrive
            path = f"jds-events-{uuid.uuid4().hex}.txt"
            body = {"type": "file", "format": "text", "content": "saved\n"}
            saved = requests.put(
                f"{managed.url}/api/contents/{path}", json=body, headers=auth(managed.token), timeout=HTTP_TIMEOUT
            )
            assert saved.status_code == 201, dump(saved)
            deadline, events = time.monotonic() + 30, []
            while not any(e.get("path") == path and e.get("action") == "save" for e in events):
                events.append(next_json(ws, deadline, f"the save event of {path}; got {events}"))
            requests.delete(f"{managed.url}/api/contents/{path}", headers=auth(managed.token), timeout=HTTP_TIMEOUT)
        finally:
            ws.close()
    finally:
        hub.start_server("alice")
