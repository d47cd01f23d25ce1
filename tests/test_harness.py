"""The end-to-end harness itself works, without the proxy: real hub, real servers, real TLS.

These also pin the JupyterHub behaviour the proxy is built around (token in the URL ignored,
redirects for stopped servers), so a hub upgrade that changes it shows up here first.
"""

from __future__ import annotations

import signal
import textwrap
from pathlib import Path

import psutil
import pytest
import requests
from hub import JupyterHubProcess, ProxyFactory, dump, escape_name, poll

from jds.hubversions import release_of


def get(
    hub: JupyterHubProcess, path: str, token: str | None = None
) -> requests.Response:
    headers = {"Authorization": f"token {token}"} if token else {}
    return requests.get(
        hub.url + path,
        headers=headers,
        verify=hub.ca_path,
        allow_redirects=False,
        timeout=30,
    )


def test_hub_api_answers_over_verified_tls(hub: JupyterHubProcess) -> None:
    response = requests.get(f"{hub.url}/hub/api", verify=hub.ca_path, timeout=30)
    assert response.status_code == 200
    release_of(response.json()["version"])  # one the proxy supports, or UnsupportedHub


def test_wrong_ca_is_refused(hub: JupyterHubProcess) -> None:
    with pytest.raises(requests.exceptions.SSLError):
        requests.get(f"{hub.url}/hub/api", verify=hub.wrong_ca_path, timeout=30)


def test_alice_server_lists_python3_with_token_header(hub: JupyterHubProcess) -> None:
    response = get(hub, "/user/alice/api/kernelspecs", hub.alice_token)
    assert response.status_code == 200, dump(response)
    assert "python3" in response.json()["kernelspecs"]


def test_token_in_url_alone_is_rejected_from_5(hub: JupyterHubProcess) -> None:
    """A user's server ignores ?token= from JupyterHub 5 (older ones take it), the hub's API always."""
    on_server = get(hub, f"/user/alice/api/kernelspecs?token={hub.alice_token}")
    assert on_server.status_code == (200 if hub.release.token_in_url else 403), dump(on_server)
    on_hub = get(hub, f"/hub/api/user?token={hub.alice_token}")
    assert on_hub.status_code == 403, dump(on_hub)
    assert get(hub, "/hub/api/user", hub.alice_token).json()["name"] == "alice"


def test_user_with_at_and_dot_gets_a_server(hub: JupyterHubProcess) -> None:
    name = "a.b@c"
    assert escape_name(name) == "a.b@c"
    hub.create_user(name)
    model = hub.start_server(name)
    try:
        assert model["url"] == "/user/a.b@c/"
        token = hub.new_token(name)
        response = get(hub, "/user/a.b@c/api/status", token)
        assert response.status_code == 200, dump(response)
        # The single-user server matches its prefix literally: an escaped @ is not found.
        assert get(hub, "/user/a.b%40c/api/status", token).status_code == 404
        # Alice's token does not open someone else's server.
        assert get(hub, "/user/a.b@c/api/status", hub.alice_token).status_code == 403
    finally:
        hub.stop_server(name)


def test_named_server(hub: JupyterHubProcess) -> None:
    model = hub.start_server("alice", "dev-1")
    try:
        assert model["url"] == "/user/alice/dev-1/"
        response = get(hub, "/user/alice/dev-1/api/status", hub.alice_token)
        assert response.status_code == 200, dump(response)
    finally:
        hub.stop_server("alice", "dev-1")
    # CHP routes by longest prefix: with the named server gone, /user/alice/dev-1/... reaches
    # alice's *default* server, which answers 404 (no redirect to the hub as for a lone user).
    gone = get(hub, "/user/alice/dev-1/api/status", hub.alice_token)
    assert gone.status_code == 404, dump(gone)
    hub_says = get(hub, "/hub/user/alice/dev-1/api/status", hub.alice_token)
    assert hub_says.status_code == 424, dump(hub_says)
    assert "/hub/spawn/alice/dev-1" in hub_says.json()["message"]


def test_hub_restart_stops_everything_and_recovers(hub: JupyterHubProcess) -> None:
    """Restart leaves no process of the old hub behind; alice's token survives, her server not."""
    kernel = requests.post(
        f"{hub.url}/user/alice/api/kernels",
        headers={"Authorization": f"token {hub.alice_token}"},
        json={"name": "python3"},
        verify=hub.ca_path,
        timeout=60,
    )
    assert kernel.status_code == 201, dump(kernel)
    assert hub.pid is not None
    before = psutil.Process(hub.pid).children(recursive=True)
    commands = " ".join(" ".join(child.cmdline()) for child in before)
    assert "configurable-http-proxy" in commands and "ipykernel_launcher" in commands

    try:
        hub.restart()
        assert hub.leftovers == [], "JupyterHub left processes for the harness to kill"
        assert not [child for child in before if child.is_running()]

        stopped = get(hub, "/user/alice/api/kernelspecs", hub.alice_token)
        assert stopped.status_code == 302, dump(stopped)
        assert stopped.headers["Location"] == "/hub/user/alice/api/kernelspecs"
        hub_says = get(hub, "/hub/user/alice/api/kernelspecs", hub.alice_token)
        assert hub_says.status_code == 424, dump(hub_says)
        assert "/hub/spawn/alice" in hub_says.json()["message"]
    finally:
        hub.start_server("alice")  # leave the session hub as the fixture promised
    response = get(hub, "/user/alice/api/kernelspecs", hub.alice_token)
    assert response.status_code == 200, dump(response)


FAKE_PLUGIN = """
from twisted.application import service
from twisted.application.service import IServiceMaker
from twisted.internet import endpoints, reactor
from twisted.plugin import IPlugin
from twisted.python import usage
from twisted.web import resource, server, static
from zope.interface import implementer


class Options(usage.Options):
    optParameters = [["listen", None, "tcp:0", "where to listen"]]

    def parseOptions(self, options=None):
        # as jds.tap.Options: twistd before Twisted 26 exits 0 on a usage error
        try:
            super().parseOptions(options)
        except usage.UsageError as error:
            print(f"twistd jds-harness-fake: {error}", flush=True)
            raise SystemExit(1) from None


class Fake(service.Service):
    def __init__(self, endpoint):
        self.endpoint = endpoint

    def stopService(self):
        print("fake proxy stopped", flush=True)

    def startService(self):
        root = resource.Resource()
        root.putChild(b"", static.Data(b"fake proxy", "text/plain"))
        site = server.Site(root)
        self.endpoint.listen(site).addCallback(
            lambda port: print(f"http://127.0.0.1:{port.getHost().port}/?token=fake", flush=True)
        )


@implementer(IServiceMaker, IPlugin)
class Maker:
    tapname = "jds-harness-fake"
    description = "stands in for jupyter-dev-server in the harness's own tests"
    options = Options

    def makeService(self, options):
        return Fake(endpoints.serverFromString(reactor, options["listen"]))


maker = Maker()
"""


@pytest.fixture
def fake_plugin_env(tmp_path: Path) -> dict[str, str]:
    """A twistd plugin on PYTHONPATH that prints a ready line like the real proxy."""
    plugins = tmp_path / "fake" / "twisted" / "plugins"
    plugins.mkdir(parents=True)
    (plugins / "jds_harness_fake.py").write_text(textwrap.dedent(FAKE_PLUGIN))
    return {"PYTHONPATH": str(tmp_path / "fake")}


def test_proxy_process_mechanics(
    proxy: ProxyFactory, fake_plugin_env: dict[str, str]
) -> None:
    """ProxyProcess finds the ready line, records the port, and stops by pid."""
    fake = proxy(plugin="jds-harness-fake", env=fake_plugin_env)
    assert fake.token == "fake"
    assert requests.get(fake.url + "/", timeout=10).text == "fake proxy"
    # twistd shuts down cleanly on SIGTERM, then re-raises the signal to exit with it.
    assert fake.stop() == -signal.SIGTERM
    assert "fake proxy stopped" in fake.log_text()

    bad = proxy(
        "--no-such-option", plugin="jds-harness-fake", env=fake_plugin_env, ready=False
    )
    code, output = bad.wait_exit(30)
    assert code != 0 and "no-such-option" in output, output


def test_poll_gives_up_with_a_message() -> None:
    with pytest.raises(RuntimeError, match="waiting for nothing"):
        poll(lambda: None, 0.3, "nothing")
