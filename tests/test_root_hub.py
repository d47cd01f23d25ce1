"""
``--root`` against the real hub: the IDE sees a folder of alice's server as the server's root, for
files, for the kernels of sessions created as VS Code creates them, and for new terminals; paths that
would leave the folder are refused by the proxy itself.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import socket
import subprocess
import uuid
from pathlib import Path

import pytest
import requests
import websocket
from hub import JupyterHubProcess, ProxyFactory, ProxyProcess, dump, execute_in_kernel, poll, venv_script
from test_managed_hub import run_check
from test_security_hub import MiB, read_response, send_all_you_can, spool_files

ROOT = "work/proj"


def auth(token: str) -> dict[str, str]:
    return {"Authorization": f"token {token}"}


@pytest.fixture
def folder(hub: JupyterHubProcess) -> Path:
    """``work/proj`` in alice's home (her server's root), with a data file and a sibling secret."""
    home = hub.directory / "home" / "alice"
    path = home / ROOT
    (path / "sub").mkdir(parents=True, exist_ok=True)
    (path / "data.csv").write_text("a,b\n1,2\n")
    (home / "work" / "secret.txt").write_text("outside the folder\n")
    return path


@pytest.fixture
def rooted(hub: JupyterHubProcess, proxy: ProxyFactory, folder: Path) -> ProxyProcess:
    """A pass-through proxy for alice with the folder given in the environment, as a user may."""
    hub.start_server("alice")
    return proxy(
        "--hub", hub.url, "--user", "alice", "--ca-cert", str(hub.ca_path), "--tls-name", hub.tls_name,
        env={"JUPYTER_DEV_SERVER_ROOT": ROOT},
    )  # fmt: skip


def test_listing_shows_the_folder_as_the_root(hub: JupyterHubProcess, rooted: ProxyProcess) -> None:
    listing = requests.get(f"{rooted.url}/api/contents", headers=auth(hub.alice_token))
    assert listing.status_code == 200, dump(listing)
    model = listing.json()
    assert (model["type"], model["path"], model["name"]) == ("directory", "", "")
    entries = {entry["name"]: entry["path"] for entry in model["content"]}
    assert entries.get("data.csv") == "data.csv" and entries.get("sub") == "sub", entries
    assert "secret.txt" not in entries
    sub = requests.get(f"{rooted.url}/api/contents/sub", headers=auth(hub.alice_token))
    assert sub.status_code == 200 and sub.json()["path"] == "sub", dump(sub)
    raw = requests.get(f"{rooted.url}/files/data.csv", headers=auth(hub.alice_token))
    assert raw.status_code == 200 and raw.text == "a,b\n1,2\n", dump(raw)


def test_write_lands_in_the_folder(hub: JupyterHubProcess, rooted: ProxyProcess, folder: Path) -> None:
    headers = auth(hub.alice_token)
    name = f"notes-{uuid.uuid4().hex[:8]}.txt"
    put = requests.put(
        f"{rooted.url}/api/contents/sub/{name}", json={"type": "file", "format": "text", "content": "hello"},
        headers=headers,
    )
    assert put.status_code == 201, dump(put)
    assert put.json()["path"] == f"sub/{name}"
    assert put.headers["Location"] == f"/api/contents/sub/{name}"
    # on the hub directly, the file is under the folder
    direct = requests.get(
        f"{hub.url}/user/alice/api/contents/{ROOT}/sub/{name}?content=1", headers=headers, verify=str(hub.ca_path)
    )
    assert direct.status_code == 200 and direct.json()["content"] == "hello", dump(direct)
    assert (folder / "sub" / name).read_text() == "hello"
    back = requests.get(f"{rooted.url}/api/contents/sub/{name}?content=1", headers=headers)
    assert (back.json()["path"], back.json()["content"]) == (f"sub/{name}", "hello")
    # checkpoints and renames (the new path travels in the body) stay in the folder too
    checkpoint = requests.post(f"{rooted.url}/api/contents/sub/{name}/checkpoints", headers=headers)
    assert checkpoint.status_code == 201, dump(checkpoint)
    assert checkpoint.headers["Location"].startswith(f"/api/contents/sub/{name}/checkpoints/")
    renamed = requests.patch(f"{rooted.url}/api/contents/sub/{name}", json={"path": f"renamed-{name}"}, headers=headers)
    assert renamed.status_code == 200 and renamed.json()["path"] == f"renamed-{name}", dump(renamed)
    assert (folder / f"renamed-{name}").read_text() == "hello" and not (folder / "sub" / name).exists()
    deleted = requests.delete(f"{rooted.url}/api/contents/renamed-{name}", headers=headers)
    assert deleted.status_code == 204, dump(deleted)
    assert not (folder / f"renamed-{name}").exists()


def test_a_large_file_streams_with_its_path_mapped(hub: JupyterHubProcess, rooted: ProxyProcess, folder: Path) -> None:
    headers = auth(hub.alice_token)
    text = "0123456789abcdef\n" * (9 * 1024 * 1024 // 17)  # more than the proxy maps in memory
    name = f"big-{uuid.uuid4().hex[:8]}.txt"
    put = requests.put(
        f"{rooted.url}/api/contents/{name}", json={"type": "file", "format": "text", "content": text},
        headers=headers, timeout=120,
    )  # fmt: skip
    assert put.status_code == 201, dump(put)
    try:
        assert (folder / name).read_text() == text
        got = requests.get(f"{rooted.url}/api/contents/{name}?content=1&format=text", headers=headers, timeout=120)
        assert got.status_code == 200, dump(got)
        model = got.json()
        assert (model["path"], model["name"], model["content"]) == (name, name, text)
    finally:
        requests.delete(f"{rooted.url}/api/contents/{name}", headers=headers, timeout=60)


def raw_request(proxy: ProxyProcess, method: str, path: str, token: str, body: str | None = None):
    """Send a path exactly as written: HTTP clients would resolve its dot segments first."""
    connection = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=30)
    try:
        connection.request(method, path, body=body, headers=auth(token))
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        ("GET", "/api/contents/../secret.txt", None),
        ("GET", "/files/%2e%2e/secret.txt", None),
        ("GET", "/api/contents/%2E%2E/secret.txt?content=1", None),
        ("GET", "/files/..%2Fsecret.txt", None),
        ("GET", "/api/contents/sub%2F..%2F..%2Fsecret.txt", None),
        ("POST", "/api/sessions", '{"path": "../secret.ipynb", "type": "notebook", "kernel": {"name": "python3"}}'),
        ("PATCH", "/api/contents/data.csv", '{"path": "../moved.csv"}'),
    ],
)
def test_escapes_are_refused_by_the_proxy(
    hub: JupyterHubProcess, rooted: ProxyProcess, method: str, path: str, body: str | None
) -> None:
    marker = uuid.uuid4().hex
    status, sent = raw_request(rooted, method, f"{path}{'&' if '?' in path else '?'}m={marker}", hub.alice_token, body)
    assert status == 400, sent
    error = json.loads(sent)
    assert error["reason"] == "outside-root" and error["message"], error
    assert "outside the folder" not in sent.decode()
    # answered by the proxy, with one log line; the hub never saw it
    assert len([line for line in rooted.log_text().splitlines() if marker in line and "-> 400" in line]) == 1
    assert marker not in hub.log_text()


def test_vscode_session_kernel_runs_in_the_folder(hub: JupyterHubProcess, rooted: ProxyProcess, folder: Path) -> None:
    headers = auth(hub.alice_token)
    path = f"analysis-jvsc-{uuid.uuid4()}.ipynb"
    model = {"path": path, "type": "notebook", "name": "analysis.ipynb", "kernel": {"name": "python3"}}
    created = requests.post(f"{rooted.url}/api/sessions", json=model, headers=headers, timeout=120)
    assert created.status_code == 201, dump(created)
    session = created.json()
    try:
        assert session["path"] == path and session["notebook"]["path"] == path, session
        listed = requests.get(f"{rooted.url}/api/sessions", headers=headers).json()
        assert path in [s["path"] for s in listed]
        direct = requests.get(
            f"{hub.url}/user/alice/api/sessions/{session['id']}", headers=headers, verify=str(hub.ca_path)
        )
        assert direct.json()["path"] == f"{ROOT}/{path}", dump(direct)
        printed = execute_in_kernel(
            rooted.url, hub.alice_token, session["kernel"]["id"],
            "import os\nprint(os.getcwd())\nprint(open('data.csv').read(), end='')",
        )  # fmt: skip
        cwd, _, data = printed.partition("\n")
        assert os.path.realpath(cwd) == os.path.realpath(folder)
        assert data == "a,b\n1,2\n"
        renamed = requests.patch(
            f"{rooted.url}/api/sessions/{session['id']}", json={"path": f"sub/{path}"}, headers=headers
        )
        assert renamed.status_code == 200 and renamed.json()["path"] == f"sub/{path}", dump(renamed)
    finally:
        gone = requests.delete(f"{rooted.url}/api/sessions/{session['id']}", headers=headers)
        assert gone.status_code == 204, dump(gone)


def terminal_pwd(proxy: ProxyProcess, token: str, name: str) -> str:
    """Run ``pwd`` in a terminal over its WebSocket (terminado's JSON framing); what it printed."""
    ws = websocket.create_connection(
        f"ws://127.0.0.1:{proxy.port}/terminals/websocket/{name}", header=[f"Authorization: token {token}"],
        timeout=30, suppress_origin=True,
    )  # fmt: skip
    marker = uuid.uuid4().hex[:8]
    # the shell's echo of the command line shows "$(pwd)" between the markers, the answer a path
    answer = re.compile(f"{marker}(/[^\r\n]*?){marker}")
    output = ""

    def printed() -> str | None:
        nonlocal output
        kind, *payload = json.loads(ws.recv())
        if kind == "stdout":
            output += payload[0]
        match = answer.search(output)
        return match.group(1) if match else None

    try:
        ws.send(json.dumps(["stdin", f"echo {marker}$(pwd){marker}\r"]))
        return poll(printed, 30, "the terminal to print its working directory", 0)
    finally:
        ws.close()


def test_new_terminals_start_in_the_folder(hub: JupyterHubProcess, rooted: ProxyProcess, folder: Path) -> None:
    headers = auth(hub.alice_token)
    for body, where in ((None, folder), ({"cwd": "sub"}, folder / "sub")):
        created = requests.post(f"{rooted.url}/api/terminals", json=body, headers=headers)
        assert created.status_code == 200, dump(created)
        name = created.json()["name"]
        try:
            assert os.path.realpath(terminal_pwd(rooted, hub.alice_token, name)) == os.path.realpath(where)
        finally:
            requests.delete(f"{rooted.url}/api/terminals/{name}", headers=headers)


def test_status_shows_the_folder(rooted: ProxyProcess) -> None:
    report = requests.get(f"{rooted.url}/_jds/status", timeout=30)
    assert report.status_code == 200, dump(report)
    assert report.json()["root"] == ROOT
    printed = subprocess.run(
        [venv_script("jupyter-dev-server"), "status", "--url", rooted.url], capture_output=True, text=True, timeout=60
    )
    assert printed.returncode == 0, printed.stderr
    assert f"root:       {ROOT}/" in printed.stdout


def test_check_verifies_the_folder(hub: JupyterHubProcess, tmp_path: Path, folder: Path) -> None:
    hub.start_server("alice")
    args = ["--ca-cert", str(hub.ca_path), "--tls-name", hub.tls_name]
    code, steps = run_check(hub, *args, "--root", ROOT, token=hub.alice_token, state=tmp_path)
    assert code == 0, steps
    assert steps["root"]["ok"] is True and ROOT in steps["root"]["detail"]
    code, steps = run_check(hub, *args, "--root", "work/nowhere", token=hub.alice_token, state=tmp_path)
    assert code == 1
    assert steps["root"]["ok"] is False, steps
    assert "no such folder" in steps["root"]["detail"] and "--root" in steps["root"]["fix"]
    code, steps = run_check(hub, *args, "--root", f"{ROOT}/data.csv", token=hub.alice_token, state=tmp_path)
    assert code == 1 and "not a folder" in steps["root"]["detail"], steps
    # without a hub token check cannot list it: said, not passed
    code, steps = run_check(hub, *args, "--root", "work/nowhere", token=None, state=tmp_path)
    assert steps["root"]["ok"] is None and "not checked" in steps["root"]["detail"], steps


def padded(document: dict) -> bytes:
    """``document`` as JSON over 9 MiB: more than the proxy maps in memory (8 MiB)."""
    return json.dumps({**document, "pad": "x" * (9 << 20)}).encode()


def test_a_body_too_large_to_map_is_refused_never_passed(
    hub: JupyterHubProcess, rooted: ProxyProcess, folder: Path
) -> None:
    """A body whose paths the proxy must put into the folder and cannot (too large) gets 413: passed
    unmapped, its server-root paths would copy a file in from outside, move one out, start a terminal
    outside the folder."""
    headers = {**auth(hub.alice_token), "Content-Type": "application/json"}
    terminals = requests.get(f"{rooted.url}/api/terminals", headers=headers).json()
    attempts = [
        ("POST", "/api/contents/", padded({"copy_from": "work/secret.txt"})),
        ("PATCH", "/api/contents/data.csv", padded({"path": "work/moved.csv"})),
        ("POST", "/api/terminals", padded({})),
    ]
    for method, path, body in attempts:
        answer = requests.request(method, f"{rooted.url}{path}", data=body, headers=headers, timeout=120)
        assert answer.status_code == 413, (path, dump(answer))
        assert answer.json()["reason"] == "body-too-large" and "--root" in answer.json()["message"]
    assert not [p.name for p in folder.iterdir() if "secret" in p.name], "a file was copied in from outside"
    assert (folder / "data.csv").exists() and not (folder.parent / "moved.csv").exists()
    assert requests.get(f"{rooted.url}/api/terminals", headers=headers).json() == terminals


def test_a_kernels_path_is_put_into_the_folder(hub: JupyterHubProcess, rooted: ProxyProcess, folder: Path) -> None:
    headers = auth(hub.alice_token)
    escape = requests.post(f"{rooted.url}/api/kernels", json={"name": "python3", "path": "../.."}, headers=headers)
    assert escape.status_code == 400, dump(escape)
    assert escape.json()["reason"] == "outside-root"
    for body, where in (({"name": "python3"}, folder), ({"name": "python3", "path": "sub"}, folder / "sub")):
        started = requests.post(f"{rooted.url}/api/kernels", json=body, headers=headers, timeout=120)
        assert started.status_code == 201, dump(started)
        kernel = started.json()["id"]
        try:
            cwd = execute_in_kernel(rooted.url, hub.alice_token, kernel, "import os\nprint(os.getcwd())")
            assert os.path.realpath(cwd.strip()) == os.path.realpath(where)
        finally:
            requests.delete(f"{rooted.url}/api/kernels/{kernel}", headers=headers, timeout=60)


def test_a_body_read_whole_goes_with_its_answer(hub: JupyterHubProcess, rooted: ProxyProcess) -> None:
    """The bodies the proxy reads whole to map them are spooled past 100 KB; the file is closed by the
    time the answer is read, whether the hub answered or the proxy cut the body off at 8 MiB."""
    pid = rooted.proc.pid
    body = json.dumps({"path": "renamed.csv", "pad": "x" * (2 << 20)}).encode()
    missing = f"missing-{uuid.uuid4().hex[:8]}.csv"
    answer = requests.patch(
        f"{rooted.url}/api/contents/{missing}", data=body, timeout=60,
        headers={**auth(hub.alice_token), "Content-Type": "application/json"},
    )  # fmt: skip
    # the server's own answer about that file: 404, or 500 from jupyter_server 1.x (JupyterHub 3.1's)
    assert answer.status_code in (404, 500) and missing in answer.json()["message"], dump(answer)
    assert spool_files(pid) == []
    with socket.create_connection(("127.0.0.1", rooted.port), timeout=15) as sock:
        sock.sendall(
            f"PATCH /api/contents/{missing} HTTP/1.1\r\nHost: 127.0.0.1:{rooted.port}\r\n"
            f"Authorization: token {hub.alice_token}\r\nTransfer-Encoding: chunked\r\n\r\n".encode()
        )
        send_all_you_can(sock, 9 * MiB, b"%x\r\n" % MiB + b"x" * MiB + b"\r\n")  # past 8 MiB, within the 4 MiB read after a refusal
        status, _, sent = read_response(sock)
        assert (status, json.loads(sent)["reason"]) == (413, "body-too-large"), sent
        assert spool_files(pid) == []
