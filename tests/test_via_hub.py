"""
The hub reached through real proxies: proxy.py (an HTTP CONNECT proxy with Basic credentials, also
spoken to over TLS) and pproxy (a SOCKS5 server), both from PyPI, started here and stopped by pid.

The daemon is given a hub name this machine cannot resolve, ``hub.cluster.invalid``; the proxies
resolve it to 127.0.0.1 through a ``sitecustomize`` that only they load (the site's DNS, as seen
from the far side). So a request that gets an answer went through the via, and nothing else.
"""

from __future__ import annotations

import base64
import json
import socket
import subprocess
import textwrap
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
import requests
import test_faults_hub
from hub import (
    JupyterHubProcess,
    ProxyFactory,
    ProxyProcess,
    clean_environ,
    dump,
    free_port,
    poll,
    run_in_kernel,
    saved_profiles,
    stop_pid,
    tail,
    venv_script,
)
from test_faults_hub import start_kernel
from test_reconnect_hub import Fault, forty_lines_through, kernel_socket

FAR_NAME = "hub.cluster.invalid"
USER, PASSWORD = "jds", "pa:ss@w%rd"
PROXY_URL_PASSWORD = "pa%3Ass%40w%25rd"  # PASSWORD percent-encoded, as it goes in a proxy URL
SECRETS = (PASSWORD, PROXY_URL_PASSWORD, base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode())

SHIM = f"""
import socket

_getaddrinfo = socket.getaddrinfo


def _far_side(host, *args, **kwargs):
    # The site's DNS: only this process knows the hub's name.
    if host in ({FAR_NAME!r}, {FAR_NAME.encode()!r}):
        host = "127.0.0.1"
    return _getaddrinfo(host, *args, **kwargs)


socket.getaddrinfo = _far_side
"""


class ProxyServer:
    """A proxy server process from PyPI on 127.0.0.1, with the far side's DNS; stopped by its pid."""

    def __init__(self, directory: Path, name: str, command: list[str], port: int) -> None:
        self.directory = directory
        self.name = name
        self.command = command
        self.port = port
        self.log_path = directory / f"{name}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 60) -> ProxyServer:
        shim = self.directory / "far-dns"
        shim.mkdir(exist_ok=True)
        (shim / "sitecustomize.py").write_text(textwrap.dedent(SHIM))
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                self.command, cwd=self.directory, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                env=clean_environ({"PYTHONPATH": str(shim)}),
            )

        def listening() -> bool | None:
            if self.proc.poll() is not None:
                raise AssertionError(f"{self.name} exited with {self.proc.returncode}:\n{self.log()}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
            except OSError:
                return None
            return True

        poll(listening, timeout, f"{self.name} to listen on {self.port}", 0.1, self.log)
        return self

    def log(self) -> str:
        return tail(self.log_path.read_text(errors="replace")) if self.log_path.exists() else ""

    def stop(self) -> None:
        if self.proc is None:
            return
        try:
            children = psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            children = []
        stop_pid(self.proc, 15)
        for child in children:  # proxy.py's acceptor process, by its own pid
            try:
                child.wait(10)
            except psutil.TimeoutExpired:
                child.kill()
            except psutil.NoSuchProcess:
                pass


kernels = test_faults_hub.kernels  # the fixture: kernels a test started, deleted on the hub afterwards


def test_this_machine_cannot_resolve_the_hubs_name() -> None:
    with pytest.raises(socket.gaierror):
        socket.getaddrinfo(FAR_NAME, 443)


@pytest.fixture(scope="module")
def http_proxy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProxyServer]:
    """proxy.py with Basic credentials; threaded, one acceptor process."""
    port = free_port()
    server = ProxyServer(
        tmp_path_factory.mktemp("proxy-py"), "proxy.py",
        [venv_script("proxy"), "--hostname", "127.0.0.1", "--port", str(port), "--basic-auth",
         f"{USER}:{PASSWORD}", "--threaded", "--num-acceptors", "1"],
        port,
    )  # fmt: skip
    try:
        yield server.start()
    finally:
        server.stop()


@pytest.fixture(scope="module")
def socks_proxy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProxyServer]:
    """pproxy as a SOCKS5 server without authentication, as ``ssh -D`` is."""
    port = free_port()
    server = ProxyServer(
        tmp_path_factory.mktemp("pproxy"), "pproxy",
        [venv_script("pproxy"), "-l", f"socks5://127.0.0.1:{port}"], port,
    )
    try:
        yield server.start()
    finally:
        server.stop()


def _hub_args(hub: JupyterHubProcess, host: str = FAR_NAME) -> list[str]:
    return ["--hub", f"https://{host}:{hub.port}", "--user", "alice", "--ca-cert", str(hub.ca_path),
            "--tls-name", hub.tls_name]  # fmt: skip


def _auth(hub: JupyterHubProcess) -> dict[str, str]:
    return {"Authorization": f"token {hub.alice_token}"}


def _status(daemon: ProxyProcess) -> dict:
    response = requests.get(f"{daemon.url}/_jds/status", timeout=30)
    assert response.status_code == 200, dump(response)
    return response.json()


def _check(args: list[str], env: dict[str, str] | None = None) -> tuple[int, str, str]:
    done = subprocess.run(
        [venv_script("jupyter-dev-server"), "check", *args], capture_output=True, text=True, timeout=120,
        env=clean_environ(env), stdin=subprocess.DEVNULL,
    )
    return done.returncode, done.stdout, done.stderr


def _assert_no_secret(*texts: str) -> None:
    for text in texts:
        for secret in SECRETS:
            assert secret not in text


def _rest_and_kernel(hub: JupyterHubProcess, daemon: ProxyProcess) -> None:
    specs = requests.get(f"{daemon.url}/api/kernelspecs", headers=_auth(hub), timeout=60)
    assert specs.status_code == 200, dump(specs)
    assert "python3" in specs.json()["kernelspecs"]
    assert run_in_kernel(daemon.url, hub.alice_token, "print(6 * 7)") == "42\n"


def test_http_proxy_from_the_environment_carries_rest_and_a_kernel(
    hub: JupyterHubProcess, proxy: ProxyFactory, http_proxy: ProxyServer
) -> None:
    hub.start_server("alice")
    env = {"HTTPS_PROXY": f"http://{USER}:{PROXY_URL_PASSWORD}@127.0.0.1:{http_proxy.port}"}
    daemon = proxy(*_hub_args(hub), env=env)
    _rest_and_kernel(hub, daemon)

    report = _status(daemon)
    via = report["via"]
    assert via["kind"] == "http" and via["address"] == f"http://127.0.0.1:{http_proxy.port}"
    assert via["source"] == "HTTPS_PROXY" and via["state"] == "up" and via["tunnels"] >= 2
    assert f"CONNECT {FAR_NAME}:{hub.port}" in http_proxy.log_path.read_text()

    status = subprocess.run(
        [venv_script("jupyter-dev-server"), "status", "--url", daemon.url], capture_output=True, text=True,
        timeout=60, env=clean_environ(),
    )
    assert status.returncode == 0, status.stderr
    assert f"via:        http://127.0.0.1:{http_proxy.port} (from HTTPS_PROXY): up since" in status.stdout

    process = psutil.Process(daemon.proc.pid)
    command_lines = [" ".join(p.cmdline()) for p in [process, *process.children(recursive=True)]]
    _assert_no_secret(daemon.log_text(), json.dumps(report), status.stdout, *command_lines)
    assert f"reached through the HTTP proxy at 127.0.0.1:{http_proxy.port} (from HTTPS_PROXY)" in daemon.log_text()


def test_wrong_and_missing_credentials_are_named(
    hub: JupyterHubProcess, proxy: ProxyFactory, http_proxy: ProxyServer
) -> None:
    wrong = f"http://{USER}:wrong-{PROXY_URL_PASSWORD}@127.0.0.1:{http_proxy.port}"
    daemon = proxy(*_hub_args(hub), "--via", wrong)
    answer = requests.get(f"{daemon.url}/api/status", headers=_auth(hub), timeout=60)
    assert answer.status_code == 502, dump(answer)
    message = answer.json()["message"]
    assert message == (
        f"The HTTP proxy at 127.0.0.1:{http_proxy.port} (from --via) refused the credentials given for {USER}: "
        "it answered 'HTTP/1.1 407 Proxy Authentication Required'."
    )
    assert answer.json()["reason"] == "via-auth-refused"
    log = daemon.log_text()
    assert message in log
    assert "put the proxy URL in HTTPS_PROXY in the environment instead" in log  # the password on the command line
    _assert_no_secret(log, answer.text, json.dumps(_status(daemon)))

    code, out, _ = _check(_hub_args(hub), {"HTTPS_PROXY": f"http://127.0.0.1:{http_proxy.port}"})
    assert code == 1, out
    lines = out.splitlines()
    assert lines[0] == (
        f"FAIL  via          The HTTP proxy at 127.0.0.1:{http_proxy.port} (from HTTPS_PROXY) wants credentials: "
        "it answered 'HTTP/1.1 407 Proxy Authentication Required'."
    )
    assert lines[1].startswith("      fix: Put them in the proxy URL in the environment: HTTPS_PROXY=http://USER:PASSWORD@")


def test_check_through_the_http_proxy(hub: JupyterHubProcess, http_proxy: ProxyServer) -> None:
    url = f"http://{USER}:{PROXY_URL_PASSWORD}@127.0.0.1:{http_proxy.port}"
    code, out, err = _check([*_hub_args(hub), "--via", url])
    assert code == 0, out + err
    assert out.splitlines()[:2] == [
        f"PASS  via          the HTTP proxy at 127.0.0.1:{http_proxy.port} (from --via) opened a tunnel to "
        f"{FAR_NAME}:{hub.port}",
        f"PASS  connect      {FAR_NAME}:{hub.port} answers through the HTTP proxy at 127.0.0.1:{http_proxy.port} "
        "(from --via)",
    ]
    assert "PASS  tls" in out and "PASS  hub" in out
    assert "--via carries a password" in err
    _assert_no_secret(out, err)


def test_socks5_carries_rest_and_a_kernel_and_check(
    hub: JupyterHubProcess, proxy: ProxyFactory, socks_proxy: ProxyServer
) -> None:
    hub.start_server("alice")
    via = f"socks5://127.0.0.1:{socks_proxy.port}"
    daemon = proxy(*_hub_args(hub), "--via", via)
    _rest_and_kernel(hub, daemon)
    report = _status(daemon)["via"]
    assert (report["kind"], report["address"], report["state"]) == ("socks5", via, "up")

    code, out, err = _check([*_hub_args(hub)], {"JUPYTER_DEV_SERVER_VIA": via})
    assert code == 0, out + err
    assert out.splitlines()[0] == (
        f"PASS  via          the SOCKS5 proxy at 127.0.0.1:{socks_proxy.port} (from JUPYTER_DEV_SERVER_VIA) "
        f"opened a tunnel to {FAR_NAME}:{hub.port}"
    )


def test_no_proxy_goes_direct_past_a_dead_proxy(hub: JupyterHubProcess, proxy: ProxyFactory) -> None:
    hub.start_server("alice")
    dead = f"http://127.0.0.1:{free_port()}"
    daemon = proxy(*_hub_args(hub, "127.0.0.1"), env={"HTTPS_PROXY": dead, "NO_PROXY": "localhost,127.0.0.0/8"})
    response = requests.get(f"{daemon.url}/api/status", headers=_auth(hub), timeout=60)
    assert response.status_code == 200, dump(response)
    via = _status(daemon)["via"]
    assert via["kind"] == "direct" and via["source"] == "NO_PROXY exempts 127.0.0.1"

    code, out, _ = _check(_hub_args(hub, "127.0.0.1"), {"HTTPS_PROXY": dead})
    assert code == 1
    assert out.splitlines()[0] == (
        f"FAIL  via          The HTTP proxy at {dead[7:]} (from HTTPS_PROXY) refused the connection: nothing listens there."
    )


def test_a_socks_proxy_restarted_in_the_middle_of_a_cell_is_a_hub_link_outage(
    hub: JupyterHubProcess, proxy: ProxyFactory, kernels: list[str], tmp_path: Path
) -> None:
    """Every line of the cell arrives once and in order, and the next cell runs on the same socket."""
    port = free_port()
    command = [venv_script("pproxy"), "-l", f"socks5://127.0.0.1:{port}"]
    servers = [ProxyServer(tmp_path, "pproxy", command, port).start()]
    try:
        hub.start_server("alice")
        daemon = proxy(*_hub_args(hub), "--via", f"socks5://127.0.0.1:{port}").wait_checked()
        ide = kernel_socket(daemon, start_kernel(daemon.url, hub.alice_token, kernels), hub.alice_token)

        def restart() -> None:
            servers.append(ProxyServer(tmp_path, "pproxy", command, port).start())

        forty_lines_through(ide, Fault(servers[0].stop, restart, 3.0), 90)
        ide.ws.close()
        log = daemon.log_text()
        assert "hub link lost" in log and "reconnected after" in log
        via = _status(daemon)["via"]
        assert via["state"] == "up"  # again; the attempts while it was down met the via's own refusal:
        assert via["last_error"] == (
            f"The SOCKS5 proxy at 127.0.0.1:{port} (from --via) refused the connection: nothing listens there."
        )
    finally:
        for server in servers:
            server.stop()


def test_an_https_proxy_is_spoken_to_over_tls(hub: JupyterHubProcess, proxy: ProxyFactory, tmp_path: Path) -> None:
    """
    proxy.py speaking TLS to its clients with a certificate for 127.0.0.1 (the hub's, from the test CA);
    the daemon trusts it through the system trust store, here OpenSSL's ``SSL_CERT_FILE``.
    """
    port = free_port()
    server = ProxyServer(
        tmp_path, "proxy.py-tls",
        [venv_script("proxy"), "--hostname", "127.0.0.1", "--port", str(port), "--basic-auth", f"{USER}:{PASSWORD}",
         "--threaded", "--num-acceptors", "1", "--cert-file", str(hub.ca.cert_path), "--key-file",
         str(hub.ca.key_path)],
        port,
    ).start()  # fmt: skip
    try:
        hub.start_server("alice")
        env = {"HTTPS_PROXY": f"https://{USER}:{PROXY_URL_PASSWORD}@127.0.0.1:{port}", "SSL_CERT_FILE": str(hub.ca_path)}
        daemon = proxy(*_hub_args(hub), env=env)
        specs = requests.get(f"{daemon.url}/api/kernelspecs", headers=_auth(hub), timeout=60)
        assert specs.status_code == 200, dump(specs)
        assert _status(daemon)["via"]["address"] == f"https://127.0.0.1:{port}"

        code, out, _ = _check(_hub_args(hub), {**env, "SSL_CERT_FILE": str(hub.wrong_ca_path)})
        assert code == 1
        assert out.splitlines()[0].startswith(
            f"FAIL  via          TLS with the HTTPS proxy at 127.0.0.1:{port} (from HTTPS_PROXY) failed:"
        ), out
    finally:
        server.stop()


def test_login_token_expiry_and_spawning_go_through_the_via(
    hub: JupyterHubProcess, proxy: ProxyFactory, socks_proxy: ProxyServer, tmp_path: Path
) -> None:
    """
    ``login`` gets a token through the SOCKS proxy (the test hub's DummyAuthenticator takes any password)
    and prints a daemon command that keeps ``--via``; that daemon, in managed mode, checks the token's
    expiry and starts the stopped server through it too.
    """
    via = f"socks5://127.0.0.1:{socks_proxy.port}"
    token_file = tmp_path / "hub-token"
    config_home = tmp_path / "config"
    done = subprocess.run(
        [venv_script("jupyter-dev-server"), "login", *_hub_args(hub), "--via", via, "--password-stdin",
         "--token-file", str(token_file), "--expires-in", "2d"],
        input="any password\n", capture_output=True, text=True, timeout=120,
        env=clean_environ({"XDG_CONFIG_HOME": str(config_home)}),
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    profile = saved_profiles(config_home)["default"]
    assert profile["via"] == via and profile["hub"] == f"https://{FAR_NAME}:{hub.port}", profile

    hub.stop_server("alice")
    try:
        # the saved profile, run under twistd as the harness runs it (its --listen beats the profile's)
        daemon = proxy("--spawn-timeout", "90", env={"XDG_CONFIG_HOME": str(config_home)})
        # the expiry is read through the via; JupyterHub before 5 does not say which token asked
        expiry = "The hub token this proxy holds expires" if hub.release.token_id else "expiry unknown (JupyterHub"
        poll(lambda: expiry in daemon.log_text() or None, 60,
             "the token-expiry check", 0.2, lambda: tail(daemon.log_text()))  # fmt: skip
        local = {"Authorization": f"token {daemon.token}"}
        listing = requests.get(f"{daemon.url}/api/contents", headers=local, timeout=120)
        assert listing.status_code == 200, dump(listing)
        assert hub.server_model("alice") is not None
        assert "check via: the SOCKS5 proxy at" in daemon.log_text()
    finally:
        hub.start_server("alice")
