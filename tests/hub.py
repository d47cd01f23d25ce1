"""Real processes for end-to-end tests: a TLS JupyterHub and the proxy under test.

The proxy's job is to talk to a real hub, so the end-to-end tests run a real ``jupyterhub``
(with configurable-http-proxy from ``tests/node`` terminating TLS, and real single-user servers)
and start the proxy as ``twistd jupyter-dev-server``, exactly as a user would.
Everything listens on 127.0.0.1 only. Nothing here needs Twisted.

Every process is started and stopped by its own pid; waiting is done by polling with deadlines.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import psutil
import requests
import trustme

REPO_ROOT = Path(__file__).resolve().parent.parent
NODE_BIN = REPO_ROOT / "tests" / "node" / "node_modules" / ".bin"
TLS_NAME = "hub.jds.test"
ADMIN_SERVICE = "jds-test"
# Enough for the test service to create users, start/stop their servers, mint their tokens and
# reach their servers (JupyterHub 6 split `start:servers` out of `servers`; admin:servers has both).
ADMIN_SCOPES = ["admin:users", "admin:servers", "tokens", "access:servers", "read:hub"]

T = TypeVar("T")


class HarnessError(RuntimeError):
    """A test process did not start, answer or stop in time; the message carries its log."""


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that was free a moment ago (good enough for tests)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def escape_name(name: str) -> str:
    """Escape a user or server name for a URL path the way JupyterHub does."""
    return urllib.parse.quote(name, safe="@~")


def poll(
    check: Callable[[], T | None],
    timeout: float,
    what: str,
    interval: float = 0.1,
    describe: Callable[[], str] = lambda: "",
) -> T:
    """Call ``check`` until it returns something other than None, or fail after ``timeout`` s.

    This is the only way the harness waits, so every wait has a deadline and a message.
    """
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result is not None:
            return result
        if time.monotonic() >= deadline:
            raise HarnessError(
                f"timed out after {timeout:.0f} s waiting for {what}\n{describe()}"
            )
        time.sleep(interval)  # poll


def tail(text: str, lines: int = 60) -> str:
    """The end of a log, for error messages."""
    return "\n".join(text.splitlines()[-lines:])


def venv_script(name: str) -> str:
    """A console script installed next to the running interpreter (the venv's bin/)."""
    candidate = Path(sys.executable).parent / name
    if candidate.exists():
        return str(candidate)
    found = shutil.which(name)
    if found is None:
        raise HarnessError(
            f"{name} not found next to {sys.executable} or on PATH; run `make test`"
        )
    return found


def configurable_http_proxy() -> str:
    """The CHP that ``tests/node`` installs; the hub needs it to serve TLS."""
    chp = NODE_BIN / "configurable-http-proxy"
    if not chp.exists():
        raise HarnessError(
            f"{chp} is missing: run `make test` (or `npm install` in tests/node) first"
        )
    return str(chp)


def clean_environ(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The test process's environment without Jupyter settings that would leak into a child."""
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("JUPYTERHUB_", "JUPYTER_", "CONFIGPROXY_"))
    }
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra or {})
    return env


def stop_pid(proc: subprocess.Popen[bytes], timeout: float) -> int:
    """SIGTERM a child we started, wait, then SIGKILL it; return its exit code."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout)
    return proc.returncode


class TestCA:
    """A throwaway CA, a server certificate for the hub, and an unrelated CA for negative tests.

    The certificate names ``hub.jds.test`` (the name the proxy is told to verify), ``localhost``
    and ``127.0.0.1`` (so plain ``requests`` calls to https://127.0.0.1 verify too).
    """

    __test__ = False  # not a pytest test class

    def __init__(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.ca = trustme.CA()
        self.server_cert = self.ca.issue_cert(TLS_NAME, "localhost", "127.0.0.1")
        self.ca_path = directory / "ca.pem"
        self.cert_path = directory / "hub-cert.pem"
        self.key_path = directory / "hub-key.pem"
        self.wrong_ca_path = directory / "wrong-ca.pem"
        self.ca.cert_pem.write_to_path(str(self.ca_path))
        self.server_cert.private_key_pem.write_to_path(str(self.key_path))
        self.server_cert.cert_chain_pems[0].write_to_path(str(self.cert_path))
        for pem in self.server_cert.cert_chain_pems[1:]:
            pem.write_to_path(str(self.cert_path), append=True)
        trustme.CA().cert_pem.write_to_path(str(self.wrong_ca_path))


class JupyterHubProcess:
    """A real JupyterHub on https://127.0.0.1:<port>, with dummy auth and local user servers.

    The test service ``jds-test`` holds an admin token (``admin_token``) used by ``api()`` to
    create users, start servers and mint user tokens.
    """

    def __init__(
        self, directory: Path, ca: TestCA | None = None, extra_config: str = ""
    ) -> None:
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        self.ca = ca or TestCA(directory / "tls")
        self.extra_config = extra_config
        self.admin_token = secrets.token_hex(32)
        self.port = free_port()
        self.hub_port = free_port()
        self.proxy_api_port = free_port()
        self.config_path = directory / "jupyterhub_config.py"
        self.log_path = directory / "jupyterhub.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.timings: dict[str, float] = {}
        self.leftovers: list[str] = []
        self.alice_token = ""  # set by the session fixture in conftest.py

    # -- addresses --------------------------------------------------------------------------
    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    @property
    def ca_path(self) -> Path:
        return self.ca.ca_path

    @property
    def wrong_ca_path(self) -> Path:
        return self.ca.wrong_ca_path

    @property
    def tls_name(self) -> str:
        return TLS_NAME

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def server_url(self, user: str, server_name: str = "") -> str:
        """Public URL prefix of a user's server, ending in a slash."""
        path = f"/user/{escape_name(user)}/"
        if server_name:
            path += f"{escape_name(server_name)}/"
        return self.url + path

    # -- lifecycle --------------------------------------------------------------------------
    def write_config(self) -> None:
        """Write jupyterhub_config.py; every path and port is in this object's directory."""
        # jupyter_server refuses to run as root without --allow-root (CI runs as root).
        args = ["--allow-root"] if os.geteuid() == 0 else []
        home = self.directory / "home" / "{username}"
        config = f"""\
c = get_config()  # noqa
c.JupyterHub.bind_url = {self.url + "/"!r}
c.JupyterHub.ssl_cert = {str(self.ca.cert_path)!r}
c.JupyterHub.ssl_key = {str(self.ca.key_path)!r}
c.JupyterHub.hub_ip = '127.0.0.1'
c.JupyterHub.hub_port = {self.hub_port}
c.JupyterHub.db_url = {"sqlite:///" + str(self.directory / "jupyterhub.sqlite")!r}
c.JupyterHub.cookie_secret_file = {str(self.directory / "jupyterhub_cookie_secret")!r}
c.JupyterHub.pid_file = {str(self.directory / "jupyterhub.pid")!r}
c.JupyterHub.cleanup_servers = True
c.JupyterHub.cleanup_proxy = True
c.JupyterHub.allow_named_servers = True
c.JupyterHub.authenticator_class = 'dummy'
c.Authenticator.allow_all = True
c.JupyterHub.spawner_class = 'simple'
c.SimpleLocalProcessSpawner.home_dir_template = {str(home)!r}
c.Spawner.cmd = [{venv_script("jupyterhub-singleuser")!r}]
c.Spawner.args = {args!r}
c.Spawner.ip = '127.0.0.1'
c.Spawner.start_timeout = 120
c.Spawner.http_timeout = 120
c.JupyterHub.proxy_class = 'configurable-http-proxy'
c.ConfigurableHTTPProxy.api_url = 'http://127.0.0.1:{self.proxy_api_port}'
c.ConfigurableHTTPProxy.command = [{configurable_http_proxy()!r}]
c.ConfigurableHTTPProxy.pid_file = {str(self.directory / "proxy.pid")!r}
c.JupyterHub.services = [{{'name': {ADMIN_SERVICE!r}, 'api_token': {self.admin_token!r}}}]
c.JupyterHub.load_roles = [
    {{'name': 'jds-test-admin', 'scopes': {ADMIN_SCOPES!r}, 'services': [{ADMIN_SERVICE!r}]}},
]
{self.extra_config}
"""
        self.config_path.write_text(config)

    def start(self, timeout: float = 60) -> None:
        """Start the hub and wait until ``/hub/api`` answers over verified TLS."""
        if self.proc is not None and self.proc.poll() is None:
            raise HarnessError("hub already running")
        self.write_config()
        started = time.monotonic()
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "jupyterhub", "-f", str(self.config_path)],
                cwd=self.directory,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=clean_environ(),
            )
        proc = self.proc

        def answered() -> dict[str, Any] | None:
            if proc.poll() is not None:
                raise HarnessError(
                    f"jupyterhub exited with {proc.returncode}\n{tail(self.log_text())}"
                )
            try:
                response = requests.get(
                    f"{self.url}/hub/api", verify=self.ca_path, timeout=5
                )
            except requests.ConnectionError:
                return None
            if response.status_code != 200:
                return None  # CHP answers 404 until the hub has added its route
            return response.json()

        try:
            poll(
                answered, timeout, "jupyterhub to answer /hub/api", 0.2, self._log_tail
            )
        except BaseException:
            self.stop()
            raise
        self.timings["hub_start"] = time.monotonic() - started

    def stop(self, timeout: float = 30) -> int | None:
        """Stop the hub by its pid and make sure CHP and the user servers went with it.

        JupyterHub stops them itself on SIGTERM (cleanup_servers/cleanup_proxy); whatever of
        its process tree is still alive afterwards is killed by pid.
        """
        proc = self.proc
        if proc is None:
            return None
        children: list[psutil.Process] = []
        with contextlib.suppress(psutil.Error):
            children = psutil.Process(proc.pid).children(recursive=True)
        code = stop_pid(proc, timeout)
        leftovers = [child for child in children if _alive(child)]
        self.leftovers = [f"{child.pid} {_cmdline(child)}" for child in leftovers]
        for child in leftovers:
            with contextlib.suppress(psutil.Error):
                child.terminate()
        _, still = psutil.wait_procs(leftovers, timeout=10)
        for child in still:
            with contextlib.suppress(psutil.Error):
                child.kill()
        psutil.wait_procs(still, timeout=10)
        self.proc = None
        return code

    def restart(self, timeout: float = 60) -> None:
        """Stop and start on the same ports, database and cookie secret."""
        self.stop()
        self.start(timeout)

    def log_text(self) -> str:
        """Everything the hub (and CHP, and the user servers) printed so far."""
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def _log_tail(self) -> str:
        # Leave out the harness's own successful polls, which would fill the tail.
        noise = f" ({ADMIN_SERVICE}@127.0.0.1)"
        lines = [
            line
            for line in self.log_text().splitlines()
            if not (" 200 " in line and noise in line)
        ]
        return "jupyterhub log tail:\n" + "\n".join(lines[-60:])

    # -- REST API ---------------------------------------------------------------------------
    def api(self, method: str, path: str, **kw: Any) -> requests.Response:
        """Call ``/hub/api/<path>`` as the admin service, over TLS verified with the test CA."""
        headers = {
            "Authorization": f"token {self.admin_token}",
            **kw.pop("headers", {}),
        }
        kw.setdefault("timeout", 30)
        return requests.request(
            method,
            f"{self.url}/hub/api/{path.lstrip('/')}",
            headers=headers,
            verify=self.ca_path,
            **kw,
        )

    def _checked(
        self, method: str, path: str, ok: Sequence[int], **kw: Any
    ) -> requests.Response:
        response = self.api(method, path, **kw)
        if response.status_code not in ok:
            raise HarnessError(
                f"{method} /hub/api/{path} -> {response.status_code}: {response.text}\n"
                + self._log_tail()
            )
        return response

    def user_model(self, user: str) -> dict[str, Any]:
        """``GET /hub/api/users/<user>`` (includes ``servers`` for this admin token)."""
        return self._checked("GET", f"users/{escape_name(user)}", (200,)).json()

    def create_user(self, name: str) -> dict[str, Any]:
        """Create a user (or return the existing one)."""
        response = self._checked("POST", f"users/{escape_name(name)}", (201, 409))
        return response.json() if response.status_code == 201 else self.user_model(name)

    def _server_path(self, user: str, server_name: str) -> str:
        if server_name:
            return f"users/{escape_name(user)}/servers/{escape_name(server_name)}"
        return f"users/{escape_name(user)}/server"

    def server_model(self, user: str, server_name: str = "") -> dict[str, Any] | None:
        """The hub's model of one server, or None if it is not running or pending."""
        return self.user_model(user).get("servers", {}).get(server_name)

    def start_server(
        self, user: str, server_name: str = "", timeout: float = 90
    ) -> dict[str, Any]:
        """Start a server (201 started, 202 pending, 400 already running) and wait until ready.

        JupyterHub 6 only accepts new server names that are slugs: ``[a-z][a-z0-9-]*``, 30 max.
        """
        started = time.monotonic()
        path = self._server_path(user, server_name)
        response = self.api("POST", path)
        already = response.status_code == 400 and self.server_model(user, server_name)
        if response.status_code not in (201, 202) and not already:
            raise HarnessError(
                f"POST /hub/api/{path} -> {dump(response)}\n{self._log_tail()}"
            )

        def ready() -> dict[str, Any] | None:
            model = self.server_model(user, server_name)
            return model if model and model.get("ready") else None

        what = f"server {user}/{server_name} to be ready"
        model = poll(ready, timeout, what, 0.2, self._log_tail)
        self.timings["spawn"] = time.monotonic() - started
        return model

    def stop_server(
        self, user: str, server_name: str = "", timeout: float = 60
    ) -> None:
        """Stop a server (204 stopped, 202 pending) and wait until the hub forgets it."""
        path = self._server_path(user, server_name)
        body = {"remove": False} if server_name else None
        self._checked("DELETE", path, (202, 204, 400), json=body)

        def gone() -> bool | None:
            return True if self.server_model(user, server_name) is None else None

        poll(gone, timeout, f"server {user}/{server_name} to stop", 0.2, self._log_tail)

    def new_token(
        self, user: str, scopes: Sequence[str] | None = None, note: str = "jds tests"
    ) -> str:
        """Mint an API token for ``user``; with no scopes it inherits the user's permissions."""
        body: dict[str, Any] = {"note": note}
        if scopes is not None:
            body["scopes"] = list(scopes)
        response = self._checked(
            "POST", f"users/{escape_name(user)}/tokens", (201,), json=body
        )
        return response.json()["token"]


def _alive(process: psutil.Process) -> bool:
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _cmdline(process: psutil.Process) -> str:
    try:
        return " ".join(process.cmdline())
    except psutil.Error:
        return "?"


class ProxyProcess:
    """The proxy under test, run as ``twistd -n jupyter-dev-server ...`` in its own directory.

    ``start()`` waits for the ``http://127.0.0.1:<port>/?token=...`` line the proxy prints for
    the IDE; ``spawn()`` + ``wait_exit()`` are for runs expected to fail on bad options.
    """

    READY_LINE = re.compile(r"http://127\.0\.0\.1:(\d+)/\?token=(\S*)")
    # How for_hub() hands the user's hub token to the proxy: the standard JupyterHub variable.
    TOKEN_ENV = "JUPYTERHUB_API_TOKEN"

    def __init__(
        self,
        args: Sequence[str] = (),
        directory: Path | None = None,
        env: Mapping[str, str] | None = None,
        plugin: str = "jupyter-dev-server",
    ) -> None:
        self.args = list(args)
        if not any(
            arg == "--listen" or arg.startswith("--listen=") for arg in self.args
        ):
            self.args += ["--listen", "tcp:0:interface=127.0.0.1"]
        self.directory = directory or Path(tempfile.mkdtemp(prefix="jds-proxy-"))
        self.directory.mkdir(parents=True, exist_ok=True)
        # Hermetic: no JUPYTER*_ variables from the caller (pass them in ``env`` to test them),
        # and managed mode's local token goes into this proxy's own directory.
        self.env = clean_environ(
            {"XDG_STATE_HOME": str(self.directory / "state"), **(env or {})}
        )
        self.plugin = plugin
        self.log_path = self.directory / "proxy.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.port: int | None = None
        self.token: str | None = None

    @classmethod
    def for_hub(
        cls,
        hub: JupyterHubProcess,
        user: str,
        token: str | None = None,
        extra_args: Sequence[str] = (),
        **kw: Any,
    ) -> ProxyProcess:
        """A proxy pointed at ``hub`` for ``user``, trusting the test CA and verifying its name."""
        args = [
            "--hub", hub.url,
            "--user", user,
            "--ca-cert", str(hub.ca_path),
            "--tls-name", hub.tls_name,
            *extra_args,
        ]  # fmt: skip
        env = dict(kw.pop("env", None) or {})
        if token is not None:
            env[cls.TOKEN_ENV] = token
        return cls(args, env=env, **kw)

    @property
    def command(self) -> list[str]:
        return [venv_script("twistd"), "-n", "--pidfile=", self.plugin, *self.args]

    @property
    def url(self) -> str:
        if self.port is None:
            raise HarnessError("proxy has not printed its URL yet")
        return f"http://127.0.0.1:{self.port}"

    def spawn(self) -> ProxyProcess:
        """Start the process without waiting for anything."""
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                self.command,
                cwd=self.directory,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self.env,
            )
        return self

    def start(self, timeout: float = 30) -> ProxyProcess:
        """Start and wait until the proxy prints the URL for the IDE; record its port."""
        self.spawn()
        return self.wait_ready(timeout)

    def wait_ready(self, timeout: float = 30) -> ProxyProcess:
        """Wait for the ready line; fail early with the log if the process exits instead."""
        proc = self.proc
        assert proc is not None, "spawn() first"

        def ready() -> re.Match[str] | None:
            match = self.READY_LINE.search(self.log_text())
            if match is None and proc.poll() is not None:
                raise HarnessError(
                    f"proxy exited with {proc.returncode} before printing its URL:\n"
                    f"{' '.join(self.command)}\n{tail(self.log_text())}"
                )
            return match

        def describe() -> str:
            return "proxy log:\n" + tail(self.log_text())

        match = poll(ready, timeout, "the proxy to print its URL", 0.1, describe)
        self.port, self.token = int(match.group(1)), match.group(2)
        return self

    def wait_exit(self, timeout: float = 30) -> tuple[int, str]:
        """Wait for a process expected to exit by itself; return (exit code, output)."""
        proc = self.proc
        assert proc is not None, "spawn() first"
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            output = self.log_text()
            self.stop()
            raise HarnessError(
                f"proxy still running after {timeout} s:\n{tail(output)}"
            ) from None
        return proc.returncode, self.log_text()

    def stop(self, timeout: float = 15) -> int | None:
        """SIGTERM the proxy by its pid, SIGKILL if it does not exit; return the exit code."""
        if self.proc is None:
            return None
        return stop_pid(self.proc, timeout)

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""


class ProxyFactory:
    """Starts proxies for one test and stops every one of them at teardown."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.started: list[ProxyProcess] = []

    def _launch(self, proxy: ProxyProcess, ready: bool) -> ProxyProcess:
        self.started.append(proxy)
        return proxy.start() if ready else proxy.spawn()

    def _next_dir(self) -> Path:
        return self.directory / f"proxy-{len(self.started)}"

    def __call__(
        self,
        *args: str,
        ready: bool = True,
        env: Mapping[str, str] | None = None,
        plugin: str = "jupyter-dev-server",
    ) -> ProxyProcess:
        """Run ``twistd jupyter-dev-server *args``; wait for its URL unless ``ready=False``."""
        return self._launch(ProxyProcess(args, self._next_dir(), env, plugin), ready)

    def for_hub(
        self,
        hub: JupyterHubProcess,
        user: str = "alice",
        token: str | None = None,
        extra_args: Sequence[str] = (),
        ready: bool = True,
    ) -> ProxyProcess:
        """Like ``ProxyProcess.for_hub`` but owned (and stopped) by this factory."""
        proxy = ProxyProcess.for_hub(
            hub, user, token, extra_args, directory=self._next_dir()
        )
        return self._launch(proxy, ready)

    def stop_all(self) -> None:
        for proxy in self.started:
            proxy.stop()


def dump(response: requests.Response) -> str:
    """One line describing a response, for assertion messages."""
    body = response.text[:300]
    with contextlib.suppress(ValueError):
        body = json.dumps(response.json())[:300]
    return f"{response.status_code} {response.headers.get('Location', '')} {body}"
