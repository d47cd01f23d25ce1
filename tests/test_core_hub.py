"""
The core issue end to end: a real JupyterHub behind TLS, the proxy as a real ``twistd`` process, and
plain HTTP clients that only know a plain Jupyter server at ``/``.
"""

from __future__ import annotations

import base64
import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import requests
from hub import REPO_ROOT, JupyterHubProcess, ProxyFactory, ProxyProcess, dump, poll, venv_script


def auth(token: str) -> dict[str, str]:
    return {"Authorization": f"token {token}"}


@pytest.fixture
def alice(hub: JupyterHubProcess, proxy: ProxyFactory):
    """A pass-through proxy for alice; her server is (re)started if an earlier test stopped it."""
    hub.start_server("alice")
    return proxy.for_hub(hub)


def test_kernelspecs_and_logos(hub: JupyterHubProcess, alice) -> None:
    response = requests.get(f"{alice.url}/api/kernelspecs?1638511749274", headers=auth(hub.alice_token))
    assert response.status_code == 200, dump(response)
    specs = response.json()["kernelspecs"]
    assert "python3" in specs
    resources = specs["python3"]["resources"]
    logo = resources["logo-64x64"]
    assert logo.startswith("/kernelspecs/python3/"), resources
    image = requests.get(alice.url + logo, headers=auth(hub.alice_token))
    assert image.status_code == 200, dump(image)
    assert image.content.startswith(b"\x89PNG")
    single = requests.get(f"{alice.url}/api/kernelspecs/python3", headers=auth(hub.alice_token))
    assert single.json()["resources"]["logo-64x64"] == logo


class CommandProxy(ProxyProcess):
    """The proxy started as the README's first line and the systemd unit start it."""

    @property
    def command(self) -> list[str]:
        return [venv_script("jupyter-dev-server"), *self.args]


def test_the_jupyter_dev_server_command_serves_and_stops_cleanly(hub: JupyterHubProcess, tmp_path: Path) -> None:
    """It runs twistd with its own options class (no plugin scan): the same daemon, flags and exit."""
    hub.start_server("alice")
    proxy = CommandProxy.for_hub(hub, "alice", directory=tmp_path / "proxy")
    try:
        proxy.start()
        response = requests.get(f"{proxy.url}/api/kernelspecs", headers=auth(hub.alice_token))
        assert response.status_code == 200, dump(response)
        assert "python3" in response.json()["kernelspecs"]
    finally:
        code = proxy.stop()
    assert code == 0, proxy.log_text()
    assert not (tmp_path / "proxy" / "twistd.pid").exists()


def test_query_token_is_carried_as_a_header(hub: JupyterHubProcess, alice) -> None:
    # JupyterHub 5 and later ignore ?token= on HTTP requests; through the proxy the original tool's URL works.
    direct = requests.get(f"{hub.url}/user/alice/api/status?token={hub.alice_token}", verify=str(hub.ca_path))
    assert direct.status_code == (200 if hub.release.token_in_url else 403), dump(direct)
    through = requests.get(f"{alice.url}/api/status?token={hub.alice_token}")
    assert through.status_code == 200, dump(through)
    assert "token=" not in through.url.split("?", 1)[0]
    assert hub.alice_token not in alice.log_text()


@pytest.mark.parametrize("size", [20 * 1024 * 1024])
def test_contents_round_trip_byte_for_byte(hub: JupyterHubProcess, alice, size: int) -> None:
    headers = auth(hub.alice_token)
    payload = os.urandom(size)
    body = {"type": "file", "format": "base64", "content": base64.b64encode(payload).decode()}
    put = requests.put(f"{alice.url}/api/contents/big.bin", json=body, headers=headers)
    assert put.status_code in (200, 201), dump(put)
    got = requests.get(f"{alice.url}/files/big.bin", headers=headers)
    assert got.status_code == 200, dump(got)
    assert hashlib.sha256(got.content).hexdigest() == hashlib.sha256(payload).hexdigest()
    again = requests.get(f"{alice.url}/api/contents/big.bin?content=1&format=base64", headers=headers)
    assert base64.b64decode(again.json()["content"]) == payload
    requests.delete(f"{alice.url}/api/contents/big.bin", headers=headers)


def test_a_file_that_looks_like_http(hub: JupyterHubProcess, alice) -> None:
    headers = auth(hub.alice_token)
    text = "GET /api/x HTTP/1.1\r\nHost: evil\r\n\r\nContent-Length: 0\n"
    put = requests.put(
        f"{alice.url}/api/contents/http.txt", json={"type": "file", "format": "text", "content": text},
        headers=headers,
    )
    assert put.status_code in (200, 201), dump(put)
    got = requests.get(f"{alice.url}/api/contents/http.txt?content=1", headers=headers)
    assert got.json()["content"] == text


def test_sessions_and_their_locations(hub: JupyterHubProcess, alice) -> None:
    headers = auth(hub.alice_token)
    model = {"path": "proxy.ipynb", "type": "notebook", "name": "", "kernel": {"name": "python3"}}
    created = requests.post(f"{alice.url}/api/sessions", json=model, headers=headers)
    assert created.status_code == 201, dump(created)
    location = created.headers["Location"]
    assert location.startswith("/api/sessions/"), location
    session = requests.get(alice.url + location, headers=headers)
    assert session.status_code == 200 and session.json()["path"] == "proxy.ipynb"
    listed = requests.get(f"{alice.url}/api/sessions", headers=headers).json()
    assert created.json()["id"] in [s["id"] for s in listed]
    deleted = requests.delete(alice.url + location, headers=headers)
    assert deleted.status_code == 204, dump(deleted)


def test_redirects_are_local_and_followed(hub: JupyterHubProcess, alice) -> None:
    headers = auth(hub.alice_token)
    created = requests.post(f"{alice.url}/api/contents", json={"type": "notebook"}, headers=headers)
    assert created.status_code == 201, dump(created)
    path = created.json()["path"]
    checkpoint = requests.post(f"{alice.url}/api/contents/{path}/checkpoints", headers=headers)
    assert checkpoint.status_code == 201
    assert checkpoint.headers["Location"].startswith(f"/api/contents/{path}/checkpoints/")
    # the user's own prefix passes through untouched, and a hub-relative redirect comes back local
    raw = requests.get(f"{alice.url}/user/alice/api/contents/{path}", headers=headers)
    assert raw.status_code == 200 and raw.json()["path"] == path
    followed = requests.get(f"{alice.url}/api/kernelspecs/", headers=headers)
    assert followed.status_code == 200, dump(followed)
    assert followed.history, "jupyter_server redirects the trailing slash away"
    assert all(not r.headers.get("Location", "").startswith("/user/") for r in followed.history)
    requests.delete(f"{alice.url}/api/contents/{path}", headers=headers)


def test_hub_paths_and_traversal_never_reach_the_hub(hub: JupyterHubProcess, alice) -> None:
    probe = requests.get(f"{alice.url}/hub/api")
    assert probe.status_code == 404 and "not the hub" in probe.json()["message"]
    with requests.Session() as session:
        prepared = requests.Request("GET", f"{alice.url}/api/%2e%2e/%2e%2e/hub/api/users").prepare()
        prepared.url = f"{alice.url}/api/%2e%2e/%2e%2e/hub/api/users"
        refused = session.send(prepared)
    assert refused.status_code == 400, dump(refused)
    assert refused.json()["reason"] == "bad-path"


def test_wrong_ca_is_refused_with_502(hub: JupyterHubProcess, proxy: ProxyFactory) -> None:
    wrong = proxy(
        "--hub", hub.url, "--user", "alice", "--ca-cert", str(hub.wrong_ca_path), "--tls-name", hub.tls_name,
    )
    response = requests.get(f"{wrong.url}/api/status", headers=auth(hub.alice_token))
    assert response.status_code == 502, dump(response)
    assert response.json()["reason"] == "unknown-ca"
    assert "--ca-cert" in wrong.log_text()


def test_wrong_tls_name_is_refused_with_502(hub: JupyterHubProcess, proxy: ProxyFactory) -> None:
    wrong = proxy("--hub", hub.url, "--user", "alice", "--ca-cert", str(hub.ca_path), "--tls-name", "other.test")
    response = requests.get(f"{wrong.url}/api/status", headers=auth(hub.alice_token))
    assert response.status_code == 502, dump(response)
    error = response.json()
    assert error["reason"] == "name-mismatch"
    assert "hub.jds.test" in error["message"]
    assert "--tls-name" in wrong.log_text()


def test_hub_stopped_and_restarted_while_the_proxy_runs(hub: JupyterHubProcess, alice) -> None:
    headers = auth(hub.alice_token)
    assert requests.get(f"{alice.url}/api/status", headers=headers).status_code == 200
    hub.stop()
    try:
        down = requests.get(f"{alice.url}/api/status", headers=headers, timeout=30)
        assert down.status_code == 502, dump(down)
        assert down.json()["reason"] == "hub-unreachable"
    finally:
        hub.start()
        hub.start_server("alice")

    def works() -> bool | None:
        return requests.get(f"{alice.url}/api/status", headers=headers).status_code == 200 or None

    poll(works, 30, "the proxy to reach the restarted hub")


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["--hub", "h"], "--user"),
        (["--hub", "http://h:8000", "--user", "u"], "https"),
        (["--hub", "h", "--user", "u", "--ca-cert", "/nonexistent.pem"], "Cannot read"),
        (["--hub", "h", "--user", "u", "--listen", "nonsense:endpoint"], "--listen"),
    ],
)
def test_bad_options_stop_start_up(proxy: ProxyFactory, args: list[str], words: str) -> None:
    process = proxy(*args, ready=False)
    code, output = process.wait_exit(30)
    assert code != 0
    assert words in output
    assert "starting on" not in output


def _fresh_venv(tmp_path: Path, name: str) -> Path:
    """A new virtualenv that sees this one's dependencies, so installing the package takes seconds."""
    venv = tmp_path / name
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    site = subprocess.run(
        [str(venv / "bin" / "python"), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True, capture_output=True, text=True,
    ).stdout.strip()
    ours = subprocess.run(
        [sys.executable, "-c", "import twisted, os; print(os.path.dirname(os.path.dirname(twisted.__file__)))"],
        check=True, capture_output=True, text=True,
    ).stdout.strip()
    Path(site, "deps.pth").write_text(ours + "\n")
    return venv


@pytest.mark.parametrize("editable", [False, True], ids=["pip-install", "pip-install-e"])
def test_twistd_lists_the_plugin_after_install(tmp_path: Path, editable: bool) -> None:
    venv = _fresh_venv(tmp_path, "venv")
    python = str(venv / "bin" / "python")
    source = REPO_ROOT
    if not editable:
        # a copy, so that build/ and egg-info never land in the checkout
        source = tmp_path / "src"
        shutil.copytree(
            REPO_ROOT, source,
            ignore=shutil.ignore_patterns(".git", ".venv", ".compat", "node_modules", "*.egg-info", "build", "__pycache__"),
        )
    install = [sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", "-q"]
    install += ["-e", str(source)] if editable else [str(source)]
    result = subprocess.run(install, capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    twistd_help = "import sys; from twisted.scripts.twistd import run; sys.argv = ['twistd', '--help']; run()"
    listing = subprocess.run([python, "-c", twistd_help], capture_output=True, text=True, cwd=tmp_path)
    assert "jupyter-dev-server" in listing.stdout, listing.stdout + listing.stderr
    where = subprocess.run(
        [python, "-c", "import jds; print(jds.__file__)"], capture_output=True, text=True, cwd=tmp_path,
    ).stdout
    assert where.startswith(str(REPO_ROOT if editable else venv)), where


def test_stopped_server_in_pass_through_mode_without_a_token_is_explained(hub: JupyterHubProcess, alice) -> None:
    """With a token the IDE's request starts the server (test_passthrough_spawn_hub); without one, a 503."""
    hub.stop_server("alice")
    try:
        answer = requests.get(f"{alice.url}/api/status")
        assert answer.status_code == 503, dump(answer)
        error = answer.json()
        assert error["reason"] == "server-not-running"
        assert "/hub/home" in error["message"] and "--token-file" in error["message"]
    finally:
        hub.start_server("alice")
