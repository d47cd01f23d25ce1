"""
Managed mode against a real hub: the proxy holds alice's hub token, the IDE only ever sees the local
token, a stopped server is started on demand, and ``check`` names the fix for each broken link.
"""

from __future__ import annotations

import concurrent.futures
import json
import re
import subprocess
import uuid
from pathlib import Path

import pytest
import requests
from hub import JupyterHubProcess, ProxyFactory, ProxyProcess, clean_environ, dump, poll, venv_script


def local(token: str) -> dict[str, str]:
    return {"Authorization": f"token {token}"}


@pytest.fixture
def managed(hub: JupyterHubProcess, proxy: ProxyFactory) -> ProxyProcess:
    hub.start_server("alice")
    # its start-up checks start a stopped server: let them finish, or they race a test that stops it
    return proxy.for_hub(hub, token=hub.alice_token).wait_checked()


def spawn_requests(hub: JupyterHubProcess, user: str = "alice") -> int:
    """How many times the hub was asked to start the user's server (from its own log)."""
    return len(re.findall(rf"POST /hub/api/users/{re.escape(user)}/server(?:s/\S+)? ", hub.log_text()))


def test_local_token_only(hub: JupyterHubProcess, managed: ProxyProcess) -> None:
    assert managed.token and managed.token != hub.alice_token
    ok = requests.get(f"{managed.url}/api/kernelspecs", headers=local(managed.token))
    assert ok.status_code == 200, dump(ok)
    assert "python3" in ok.json()["kernelspecs"]
    assert requests.get(f"{managed.url}/api/kernelspecs?token={managed.token}").status_code == 200
    # the hub token itself is not a local credential
    assert requests.get(f"{managed.url}/api/kernelspecs", headers=local(hub.alice_token)).status_code == 403


def test_requests_without_the_local_token_never_reach_the_hub(hub: JupyterHubProcess, managed: ProxyProcess) -> None:
    marker = f"never-forwarded-{uuid.uuid4().hex}"
    for headers in ({}, local("wrong"), {"Cookie": "jds-auth=forged"}):
        refused = requests.get(f"{managed.url}/api/{marker}", headers=headers)
        assert refused.status_code == 403, dump(refused)
        assert "local token" in refused.json()["message"]
    page = requests.get(f"{managed.url}/lab/{marker}", allow_redirects=False)
    assert page.status_code == 302 and page.headers["Location"].startswith("/login?next=")
    assert marker not in hub.log_text()


def test_hub_token_never_reaches_the_ide(hub: JupyterHubProcess, managed: ProxyProcess) -> None:
    # jupyterhub-singleuser writes the token a request came with into JupyterLab's page_config
    page = requests.get(f"{managed.url}/lab?token={managed.token}")
    assert page.status_code == 200, dump(page)
    assert managed.token in page.text, "the local token stands where the hub's was"
    assert hub.alice_token not in page.text
    assert "jds-auth=" in page.headers.get("Set-Cookie", "")
    with requests.Session() as browser:
        browser.get(f"{managed.url}/lab?token={managed.token}")
        # /api/me is jupyter_server 2's (JupyterHub 3.1's era ran 1.x)
        paths = ["/api/me"] if hub.serves("alice", "api/me") else []
        for path in (*paths, "/api/kernelspecs", "/api/status", "/lab/tree", "/"):
            response = browser.get(managed.url + path)
            assert response.status_code == 200, (path, dump(response))
            assert hub.alice_token not in response.text
            assert hub.alice_token not in json.dumps(dict(response.headers))
            for earlier in response.history:
                assert hub.alice_token not in json.dumps(dict(earlier.headers))
    assert hub.alice_token not in managed.log_text()


def test_vscode_password_flow(hub: JupyterHubProcess, managed: ProxyProcess) -> None:
    """What vscode-jupyter's JupyterPasswordConnect does, step by step."""
    needs_password = requests.get(f"{managed.url}/tree?", allow_redirects=False)
    assert needs_password.status_code != 200
    xsrf_page = requests.get(f"{managed.url}/login?", allow_redirects=False)
    assert xsrf_page.ok
    xsrf = xsrf_page.cookies["_xsrf"]
    wrong = requests.post(
        f"{managed.url}/login?", data={"_xsrf": xsrf, "password": "nope"},
        headers={"Cookie": f"_xsrf={xsrf}"}, allow_redirects=False,
    )
    assert wrong.status_code == 403
    login = requests.post(
        f"{managed.url}/login?", data={"_xsrf": xsrf, "password": managed.token},
        headers={"Cookie": f"_xsrf={xsrf}"}, allow_redirects=False,
    )
    assert login.status_code == 302, dump(login)
    first_cookie = login.raw.headers.getlist("Set-Cookie")[0]
    name, _, value = first_cookie.partition("=")  # vscode keeps the attributes in the value
    cookie = f"_xsrf={xsrf}; {name}={value}"
    headers = {"Cookie": cookie, "X-XSRFToken": xsrf}
    kernels = requests.get(f"{managed.url}/api/kernelspecs", headers=headers)
    assert kernels.status_code == 200, dump(kernels)
    created = requests.post(f"{managed.url}/api/contents", json={"type": "notebook"}, headers=headers)
    assert created.status_code == 201, dump(created)
    forged = requests.post(f"{managed.url}/api/contents", json={"type": "notebook"}, headers={"Cookie": cookie})
    assert forged.status_code == 403, dump(forged)
    assert forged.json()["reason"] == "xsrf"
    requests.delete(f"{managed.url}/api/contents/{created.json()['path']}", headers=headers)


def test_stopped_server_is_started_once_for_concurrent_requests(hub: JupyterHubProcess, managed: ProxyProcess) -> None:
    hub.stop_server("alice")
    before = spawn_requests(hub)
    paths = ["/api/kernelspecs", "/api/status", "/api/kernels", "/api/contents", "/api/sessions"]
    with concurrent.futures.ThreadPoolExecutor(len(paths)) as pool:
        answers = list(pool.map(
            lambda p: requests.get(managed.url + p, headers=local(managed.token), timeout=120), paths
        ))
    for path, answer in zip(paths, answers, strict=True):
        assert answer.status_code == 200, (path, dump(answer))
    assert spawn_requests(hub) - before == 1
    assert managed.log_text().count("Starting your server") == 1


def test_stopped_server_is_started_by_a_post_with_its_body(hub: JupyterHubProcess, managed: ProxyProcess) -> None:
    hub.stop_server("alice")
    body = {"type": "file", "format": "text", "content": "kept while the server started\n"}
    put = requests.put(f"{managed.url}/api/contents/kept.txt", json=body, headers=local(managed.token), timeout=120)
    assert put.status_code in (200, 201), dump(put)
    got = requests.get(f"{managed.url}/api/contents/kept.txt?content=1", headers=local(managed.token))
    assert got.json()["content"] == body["content"]


def test_no_spawn_says_how_to_start(hub: JupyterHubProcess, proxy: ProxyFactory) -> None:
    hub.start_server("alice")
    held = proxy.for_hub(hub, token=hub.alice_token, extra_args=["--no-spawn"])
    hub.stop_server("alice")
    try:
        answer = requests.get(f"{held.url}/api/kernelspecs", headers=local(held.token))
        assert answer.status_code == 503, dump(answer)
        error = answer.json()
        assert error["reason"] == "server-not-running"
        assert f"{hub.url.replace('127.0.0.1', hub.tls_name)}/hub/home" in error["message"]
    finally:
        hub.start_server("alice")


def test_revoked_token_is_reported(hub: JupyterHubProcess, proxy: ProxyFactory) -> None:
    hub.start_server("alice")
    token = hub.new_token("alice", note="revoked by the test")
    held = proxy.for_hub(hub, token=token)
    assert requests.get(f"{held.url}/api/status", headers=local(held.token)).status_code == 200
    tokens = hub.api("GET", "/users/alice/tokens").json()["api_tokens"]
    [victim] = [t for t in tokens if t.get("note") == "revoked by the test"]
    assert hub.api("DELETE", f"/users/alice/tokens/{victim['id']}").status_code == 204
    # the single-user server caches token checks for minutes; a request that needs the hub finds out now
    hub.stop_server("alice")
    try:
        answer = requests.get(f"{held.url}/api/status", headers=local(held.token))
        assert answer.status_code == 401, dump(answer)
        assert answer.json()["reason"] == "hub-token-refused"
        assert "/hub/token" in answer.json()["message"]
    finally:
        hub.start_server("alice")
    # a fresh server sends a page request with a dead token into the hub's login, which the IDE (holding
    # only the local token) could never complete: the proxy says what is wrong instead
    page = requests.get(f"{held.url}/lab", headers=local(held.token), allow_redirects=False)
    assert page.status_code == 401, dump(page)
    assert page.json()["reason"] == "hub-token-refused"
    assert token not in held.log_text()


def test_named_server(hub: JupyterHubProcess, proxy: ProxyFactory) -> None:
    hub.start_server("alice")
    hub.start_server("alice", "dev-1")
    try:
        named = proxy.for_hub(hub, token=hub.alice_token, extra_args=["--server", "dev-1"])
        status = requests.get(f"{named.url}/api/status", headers=local(named.token))
        assert status.status_code == 200, dump(status)
        hub.stop_server("alice", "dev-1")
        # a stopped named server's paths fall through to the default server: still detected
        again = requests.get(f"{named.url}/api/kernelspecs", headers=local(named.token), timeout=120)
        assert again.status_code == 200, dump(again)
        assert (hub.server_model("alice", "dev-1") or {}).get("ready")
    finally:
        hub.stop_server("alice", "dev-1")


def test_user_name_with_at_and_dot(hub: JupyterHubProcess, proxy: ProxyFactory) -> None:
    hub.create_user("a.b@c")
    hub.start_server("a.b@c")
    try:
        odd = proxy.for_hub(hub, user="a.b@c", token=hub.new_token("a.b@c")).wait_checked()
        answer = requests.get(f"{odd.url}/api/contents", headers=local(odd.token))
        assert answer.status_code == 200, dump(answer)
    finally:
        hub.stop_server("a.b@c")


def run_check(hub: JupyterHubProcess, *args: str, token: str | None, state: Path) -> tuple[int, dict[str, dict]]:
    extra = {"XDG_STATE_HOME": str(state)}
    if token:
        extra["JUPYTERHUB_API_TOKEN"] = token
    command = [venv_script("jupyter-dev-server"), "check", "--hub", hub.url, "--user", "alice", "--json", *args]
    result = subprocess.run(command, capture_output=True, text=True, timeout=60, env=clean_environ(extra))
    steps = {step["name"]: step for step in json.loads(result.stdout or "[]")}
    return result.returncode, steps


def test_start_up_self_check_reads_as_one_listener(hub: JupyterHubProcess, managed: ProxyProcess) -> None:
    """The self-check reaches the proxy in memory: one 'starting on', no port closing, no access line."""
    log = poll(lambda: managed.log_text() if "check kernelspecs:" in managed.log_text() else None,
               60, "the start-up check", 0.2, managed.log_text)  # fmt: skip
    assert "check kernelspecs: kernels an IDE will offer: python3" in log
    assert len(re.findall(r"starting on \d+", log)) == 1, log
    assert not re.search(r"\(TCP Port \d+ Closed\)", log), log
    assert not re.search(r"GET /api/kernelspecs \d{3} ", log), log
    # ... and the token's expiry is in the check's token line (a token made without one never expires),
    # where the hub says which token asked (jds.hubversions)
    release = hub.release
    expiry = "never expires" if release.token_id else f"expiry unknown (JupyterHub {release.name} does not say"
    assert f"check token: owner alice, {expiry}" in log


def test_check_passes_on_a_good_setup(hub: JupyterHubProcess, tmp_path: Path) -> None:
    hub.start_server("alice")
    code, steps = run_check(
        hub, "--ca-cert", str(hub.ca_path), "--tls-name", hub.tls_name, token=hub.alice_token, state=tmp_path
    )
    assert code == 0, steps
    assert [name for name, step in steps.items() if step["ok"]] == [
        "connect", "tls", "hub", "token", "server", "kernelspecs"
    ]
    assert "python3" in steps["kernelspecs"]["detail"]


@pytest.mark.parametrize(
    ("case", "step", "fix_words"),
    [
        ("wrong-ca", "tls", "--ca-cert"),
        ("wrong-name", "tls", "--tls-name"),
        ("bad-token", "token", "/hub/token"),
        ("stopped", "server", "Start your server"),
        ("hub-down", "connect", "--hub"),
    ],
)
def test_check_names_the_fix(hub: JupyterHubProcess, tmp_path: Path, case: str, step: str, fix_words: str) -> None:
    args = ["--ca-cert", str(hub.ca_path), "--tls-name", hub.tls_name]
    token = hub.alice_token
    if case == "wrong-ca":
        args[1] = str(hub.wrong_ca_path)
    elif case == "wrong-name":
        args[3] = "other.test"
    elif case == "bad-token":
        token = "0" * 32
    elif case == "stopped":
        hub.stop_server("alice")
    elif case == "hub-down":
        hub.stop()
    try:
        code, steps = run_check(hub, *args, token=token, state=tmp_path)
    finally:
        if case == "hub-down":
            hub.start()
        hub.start_server("alice")
    assert code != 0
    failed = [name for name, s in steps.items() if s["ok"] is False]
    assert failed == [step], steps
    assert fix_words in steps[step]["fix"], steps[step]
