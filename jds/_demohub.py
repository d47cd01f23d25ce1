"""
The throwaway JupyterHub that ``jupyter-dev-server demo`` starts on loopback; private to the demo.

TLS from a fresh CA, configurable-http-proxy (found on PATH) terminating it, DummyAuthenticator,
local single-user servers, and an admin service token to create a user, start its server and mint
its token. It needs only the ``demo`` extra; the daemon never imports it. The end-to-end tests'
harness (``tests/hub.py``) extends this hub rather than keeping a second copy of it.

Every process is started and stopped by its own pid; every wait is a poll with a deadline.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import psutil
import requests
import trustme

from jds.paths import escape_name

TLS_NAME = "hub.jds.test"
ADMIN_SERVICE = "jds-test"
EXIT_GRACE = 5.0  # seconds the hub's former children get to finish exiting on their own
# Enough for the service to create users, start/stop their servers, mint their tokens and reach
# their servers (JupyterHub 6 split `start:servers` out of `servers`; admin:servers has both).
ADMIN_SCOPES = ["admin:users", "admin:servers", "tokens", "access:servers", "read:hub"]

T = TypeVar("T")


class HarnessError(RuntimeError):
    """A process did not start, answer or stop in time; the message carries its log."""


def free_ports(count: int) -> list[int]:
    """
    ``count`` distinct TCP ports on 127.0.0.1 that were free a moment ago. They are held open
    together while chosen: asked one by one, the kernel may hand out the same port twice.
    """
    sockets = [socket.socket(socket.AF_INET, socket.SOCK_STREAM) for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (good enough on a loopback)."""
    return free_ports(1)[0]


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
            raise HarnessError(f"timed out after {timeout:.0f} s waiting for {what}\n{describe()}")
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
        raise HarnessError(f"{name} not found next to {sys.executable} or on PATH; run `make test`")
    return found


def configurable_http_proxy() -> str:
    """The CHP the hub needs to serve TLS, from PATH (``make demo`` puts its ``tests/node`` one there)."""
    found = shutil.which("configurable-http-proxy")
    if found is None:
        raise HarnessError(
            "configurable-http-proxy is missing: run `make demo` in a checkout "
            "(it installs it in tests/node), or `npm install -g configurable-http-proxy`."
        )
    return found


_PROXY_VARIABLES = {"https_proxy", "http_proxy", "all_proxy", "no_proxy"}


def clean_environ(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """
    This process's environment without Jupyter settings that would leak into a child, nor proxy
    variables: everything here is on 127.0.0.1, and the daemon would send it through ``HTTPS_PROXY``.
    """
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("JUPYTERHUB_", "JUPYTER_", "CONFIGPROXY_")) and key.lower() not in _PROXY_VARIABLES
    }
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra or {})
    return env


def stop_pid(proc: subprocess.Popen[bytes], timeout: float, sig: int = signal.SIGTERM) -> int:
    """Signal a child we started (SIGTERM by default), wait, then SIGKILL it; return its exit code."""
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout)
    return proc.returncode


class HubCA:
    """A throwaway CA and the hub's certificate, signed by it.

    The certificate names ``hub.jds.test`` (the name the proxy is told to verify), ``localhost``
    and ``127.0.0.1`` (so plain ``requests`` calls to https://127.0.0.1 verify too).
    """

    def __init__(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.ca = trustme.CA()
        self.server_cert = self.ca.issue_cert(TLS_NAME, "localhost", "127.0.0.1")
        self.ca_path = directory / "ca.pem"
        self.cert_path = directory / "hub-cert.pem"
        self.key_path = directory / "hub-key.pem"
        self.ca.cert_pem.write_to_path(str(self.ca_path))
        self.server_cert.private_key_pem.write_to_path(str(self.key_path))
        self.server_cert.cert_chain_pems[0].write_to_path(str(self.cert_path))
        for pem in self.server_cert.cert_chain_pems[1:]:
            pem.write_to_path(str(self.cert_path), append=True)


class JupyterHubProcess:
    """A real JupyterHub on https://127.0.0.1:<port>, with dummy auth and local user servers.

    The service ``jds-test`` holds an admin token (``admin_token``) used by ``api()`` to create
    users, start servers and mint user tokens. ``own_session`` starts the hub in a session of its
    own, so a Ctrl-C on the terminal reaches only the process that started it (the demo), which
    then stops the hub in order instead of every process dying at once.
    """

    def __init__(self, directory: Path, ca: HubCA, own_session: bool = False) -> None:
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        self.ca = ca
        self.own_session = own_session
        self.admin_token = secrets.token_hex(32)
        self.port, self.hub_port, self.proxy_api_port = free_ports(3)
        self.config_path = directory / "jupyterhub_config.py"
        self.log_path = directory / "jupyterhub.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.leftovers: list[str] = []

    # -- addresses --------------------------------------------------------------------------
    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    @property
    def ca_path(self) -> Path:
        return self.ca.ca_path

    @property
    def tls_name(self) -> str:
        return TLS_NAME

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    # -- lifecycle --------------------------------------------------------------------------
    def config_text(self) -> str:
        """jupyterhub_config.py; every path and port is in this object's directory."""
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
c.Spawner.cmd = [{self.hub_program("jupyterhub-singleuser")!r}]
c.Spawner.args = {args!r}
c.Spawner.ip = '127.0.0.1'
c.Spawner.start_timeout = 120
c.Spawner.http_timeout = 120
c.JupyterHub.proxy_class = 'configurable-http-proxy'
c.ConfigurableHTTPProxy.api_url = 'http://127.0.0.1:{self.proxy_api_port}'
c.ConfigurableHTTPProxy.command = [{self.configurable_http_proxy()!r}]
c.ConfigurableHTTPProxy.pid_file = {str(self.directory / "proxy.pid")!r}
c.JupyterHub.services = [{{'name': {ADMIN_SERVICE!r}, 'api_token': {self.admin_token!r}}}]
c.JupyterHub.load_roles = [
    {{'name': 'jds-test-admin', 'scopes': {ADMIN_SCOPES!r}, 'services': [{ADMIN_SERVICE!r}]}},
]
"""
        return config

    def configurable_http_proxy(self) -> str:
        """The CHP this hub runs (a subclass may prefer another one)."""
        return configurable_http_proxy()

    def hub_program(self, name: str) -> str:
        """
        A program of the hub's side (``python`` to run ``-m jupyterhub``, ``jupyterhub-singleuser``):
        this interpreter's venv here; the tests' subclass can take them from another venv.
        """
        return sys.executable if name == "python" else venv_script(name)

    def start(self, timeout: float = 60) -> None:
        """Start the hub and wait until ``/hub/api`` answers over verified TLS."""
        if self.proc is not None and self.proc.poll() is None:
            raise HarnessError("hub already running")
        self.config_path.write_text(self.config_text())
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [self.hub_program("python"), "-m", "jupyterhub", "-f", str(self.config_path)],
                cwd=self.directory,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                # the hub's own bin first on PATH, so the servers and kernels it starts match it
                env=clean_environ({"PATH": os.pathsep.join([str(Path(self.hub_program("python")).parent), os.environ.get("PATH", "")])}),
                start_new_session=self.own_session,
            )
        proc = self.proc

        def answered() -> dict[str, Any] | None:
            if proc.poll() is not None:
                raise HarnessError(f"jupyterhub exited with {proc.returncode}\n{tail(self.log_text())}")
            try:
                response = requests.get(f"{self.url}/hub/api", verify=self.ca_path, timeout=5)
            except requests.ConnectionError:
                return None
            if response.status_code != 200:
                return None  # CHP answers 404 until the hub has added its route
            return response.json()

        try:
            poll(answered, timeout, "jupyterhub to answer /hub/api", 0.2, self._log_tail)
        except BaseException:
            self.stop()
            raise

    def stop(self, timeout: float = 30) -> int | None:
        """Stop the hub by its pid and make sure CHP and the user servers went with it.

        JupyterHub stops them itself on SIGTERM (cleanup_servers/cleanup_proxy); whatever of
        its process tree is still alive afterwards is killed by pid.
        """
        proc = self.proc
        if proc is None:
            return None
        children: dict[int, psutil.Process] = {}

        def look() -> None:
            with contextlib.suppress(psutil.Error):
                children.update((c.pid, c) for c in psutil.Process(proc.pid).children(recursive=True))

        look()
        before = set(children)
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        # JupyterHub 3.1's proxy check restarts a CHP that its own shutdown just stopped: a child
        # born after SIGTERM would outlive the hub unseen, so keep looking until the hub is gone.
        deadline = time.monotonic() + timeout
        while proc.poll() is None and time.monotonic() < deadline:
            look()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(0.05)  # poll
        code = stop_pid(proc, timeout)
        # A kernel told to shut down by its server can outlive the hub by a moment (ipykernel
        # notices its parent's exit once a second); only what is still running after that is left.
        _, leftovers = psutil.wait_procs([child for child in children.values() if _alive(child)], timeout=EXIT_GRACE)
        # what the hub started during its shutdown is stopped here too, but it is not the hub's
        # failure to stop what it ran (the harness's test of that)
        self.leftovers = [f"{child.pid} {_cmdline(child)}" for child in leftovers if child.pid in before]
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

    def log_text(self) -> str:
        """Everything the hub (and CHP, and the user servers) printed so far."""
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def _log_tail(self) -> str:
        # Leave out the harness's own successful polls, which would fill the tail.
        noise = f" ({ADMIN_SERVICE}@127.0.0.1)"
        lines = [line for line in self.log_text().splitlines() if not (" 200 " in line and noise in line)]
        return "jupyterhub log tail:\n" + "\n".join(lines[-60:])

    # -- REST API ---------------------------------------------------------------------------
    def api(self, method: str, path: str, **kw: Any) -> requests.Response:
        """Call ``/hub/api/<path>`` as the admin service, over TLS verified with the test CA."""
        headers = {"Authorization": f"token {self.admin_token}", **kw.pop("headers", {})}
        kw.setdefault("timeout", 30)
        return requests.request(
            method, f"{self.url}/hub/api/{path.lstrip('/')}", headers=headers, verify=self.ca_path, **kw
        )

    def _checked(self, method: str, path: str, ok: Sequence[int], **kw: Any) -> requests.Response:
        response = self.api(method, path, **kw)
        if response.status_code not in ok:
            raise HarnessError(
                f"{method} /hub/api/{path} -> {response.status_code}: {response.text}\n" + self._log_tail()
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

    def start_server(self, user: str, server_name: str = "", timeout: float = 90) -> dict[str, Any]:
        """Start a server (201 started, 202 pending, 400 already running) and wait until ready.

        JupyterHub 6 only accepts new server names that are slugs: ``[a-z][a-z0-9-]*``, 30 max.
        """
        path = self._server_path(user, server_name)
        response = self.api("POST", path)
        already = response.status_code == 400 and self.server_model(user, server_name)
        if response.status_code not in (201, 202) and not already:
            raise HarnessError(f"POST /hub/api/{path} -> {dump(response)}\n{self._log_tail()}")

        def ready() -> dict[str, Any] | None:
            model = self.server_model(user, server_name)
            return model if model and model.get("ready") else None

        what = f"server {user}/{server_name} to be ready"
        return poll(ready, timeout, what, 0.2, self._log_tail)

    def new_token(self, user: str, scopes: Sequence[str] | None = None, note: str = "jds tests") -> str:
        """Mint an API token for ``user``; with no scopes it inherits the user's permissions."""
        body: dict[str, Any] = {"note": note}
        if scopes is not None:
            body["scopes"] = list(scopes)
        response = self._checked("POST", f"users/{escape_name(user)}/tokens", (201,), json=body)
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


def dump(response: requests.Response) -> str:
    """One line describing a response, for assertion messages."""
    body = response.text[:300]
    with contextlib.suppress(ValueError):
        body = json.dumps(response.json())[:300]
    return f"{response.status_code} {response.headers.get('Location', '')} {body}"
