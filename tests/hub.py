"""Real processes for end-to-end tests: a TLS JupyterHub and the proxy under test.

The hub is the demo's (:mod:`jds._demohub`, so ``jupyter-dev-server demo`` and the tests start the
very same hub); this module adds what only tests need: an unrelated CA for negative tests, hub
restarts, stopping servers, timings, running a cell over a kernel's WebSocket, and the proxy under
test, started as ``twistd jupyter-dev-server`` exactly as a user would. Tests write
``from hub import ...``; ``make bench``/``make soak`` reach it through ``benchmarks/__init__.py``.
Everything listens on 127.0.0.1 only. Nothing here needs Twisted.

Every process is started and stopped by its own pid; waiting is done by polling with deadlines.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import requests
import trustme
import websocket

from jds import _demohub
from jds._demohub import (
    ADMIN_SCOPES,
    ADMIN_SERVICE,
    TLS_NAME,
    HarnessError,
    clean_environ,
    dump,
    free_port,
    free_ports,
    poll,
    stop_pid,
    tail,
    venv_script,
)
from jds.hubversions import HubRelease, release_of
from jds.paths import escape_name

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

__all__ = [
    "ADMIN_SCOPES",
    "ADMIN_SERVICE",
    "NODE_BIN",
    "REPO_ROOT",
    "TLS_NAME",
    "HarnessError",
    "JupyterHubProcess",
    "ProxyFactory",
    "ProxyProcess",
    "TestCA",
    "clean_environ",
    "configurable_http_proxy",
    "dump",
    "escape_name",
    "execute_in_kernel",
    "free_port",
    "free_ports",
    "poll",
    "run_in_kernel",
    "stop_pid",
    "tail",
    "venv_script",
]

REPO_ROOT = Path(__file__).resolve().parent.parent
# `make test-compat` points this at another virtualenv (its root, as in .compat/hub-3.1): the hub and the
# single-user servers it starts run from there, pytest and the proxy under test from this one.
HUB_PREFIX_ENV = "JDS_TEST_HUB_PREFIX"
# `make test` installs the Node tools (configurable-http-proxy, the @jupyterlab/services client) here.
NODE_BIN = REPO_ROOT / "tests" / "node" / "node_modules" / ".bin"


def configurable_http_proxy() -> str:
    """The CHP the test hub runs: the checkout's ``tests/node`` one, else the one on PATH."""
    chp = NODE_BIN / "configurable-http-proxy"
    return str(chp) if chp.exists() else _demohub.configurable_http_proxy()


class TestCA(_demohub.HubCA):
    """The demo hub's CA and certificate, plus an unrelated CA (``wrong_ca_path``) for negative tests."""

    def __init__(self, directory: Path) -> None:
        super().__init__(directory)
        self.wrong_ca_path = directory / "wrong-ca.pem"
        trustme.CA().cert_pem.write_to_path(str(self.wrong_ca_path))


class JupyterHubProcess(_demohub.JupyterHubProcess):
    """The demo's hub, plus what tests do to it: restart it, stop servers, time it, configure it more.

    ``extra_config`` is appended to jupyterhub_config.py; ``timings`` records how long the hub took
    to start and the last server to spawn; ``alice_token`` is set by the session fixture.
    """

    alice_token = ""  # set by the session fixture in conftest.py

    def __init__(
        self,
        directory: Path,
        ca: TestCA | None = None,
        extra_config: str = "",
        own_session: bool = False,
    ) -> None:
        super().__init__(directory, ca or TestCA(directory / "tls"), own_session)
        self.extra_config = extra_config
        self.timings: dict[str, float] = {}

    @property
    def wrong_ca_path(self) -> Path:
        return self.ca.wrong_ca_path

    def server_url(self, user: str, server_name: str = "") -> str:
        """Public URL prefix of a user's server, ending in a slash."""
        path = f"/user/{escape_name(user)}/"
        if server_name:
            path += f"{escape_name(server_name)}/"
        return self.url + path

    def config_text(self) -> str:
        return super().config_text() + self.extra_config + "\n"

    def hub_program(self, name: str) -> str:
        """From ``$JDS_TEST_HUB_PREFIX/bin`` when set (``make test-compat``), else from this venv."""
        prefix = os.environ.get(HUB_PREFIX_ENV)
        if not prefix:
            return super().hub_program(name)
        candidate = Path(prefix) / "bin" / name
        if not candidate.exists():
            raise HarnessError(f"{candidate} is missing: ${HUB_PREFIX_ENV} must name a virtualenv with JupyterHub")
        return str(candidate)

    @property
    def release(self) -> HubRelease:
        """This hub's row in :mod:`jds.hubversions` (what it does where releases differ)."""
        return release_of(self.version)

    @property
    def version(self) -> str:
        """The version ``/hub/api`` reports (of the hub under ``$JDS_TEST_HUB_PREFIX`` in compat runs)."""
        return requests.get(f"{self.url}/hub/api", verify=self.ca_path, timeout=30).json()["version"]

    _event_socket: bool | None = None

    def has_event_socket(self) -> bool:
        """Whether the single-user servers have jupyter_server 2's ``/api/events/subscribe``, a
        WebSocket that needs no kernel (1.x, JupyterHub 3.1's era, has none); asked once."""
        if self._event_socket is None:
            self.start_server("alice")  # a no-op when it runs
            self._event_socket = self.serves("alice", "api/events/subscribe")
        return self._event_socket

    def serves(self, user: str, path: str) -> bool:
        """Whether the user's running server has ``path`` (``api/me`` is jupyter_server 2 only)."""
        response = requests.get(
            f"{self.server_url(user)}{path}", headers={"Authorization": f"token {self.admin_token}"},
            verify=self.ca_path, timeout=30, allow_redirects=False,
        )  # fmt: skip
        return response.status_code != 404

    def configurable_http_proxy(self) -> str:
        return configurable_http_proxy()

    def start(self, timeout: float = 60) -> None:
        started = time.monotonic()
        super().start(timeout)
        self.timings["hub_start"] = time.monotonic() - started

    def restart(self, timeout: float = 60) -> None:
        """Stop and start on the same ports, database and cookie secret."""
        self.stop()
        self.start(timeout)

    def start_server(self, user: str, server_name: str = "", timeout: float = 90) -> dict[str, Any]:
        started = time.monotonic()
        model = super().start_server(user, server_name, timeout)
        self.timings["spawn"] = time.monotonic() - started
        return model

    def stop_server(self, user: str, server_name: str = "", timeout: float = 60) -> None:
        """Stop a server (204 stopped, 202 pending) and wait until the hub forgets it."""
        path = self._server_path(user, server_name)
        body = {"remove": False} if server_name else None
        self._checked("DELETE", path, (202, 204, 400), json=body)

        def gone() -> bool | None:
            return True if self.server_model(user, server_name) is None else None

        poll(gone, timeout, f"server {user}/{server_name} to stop", 0.2, self._log_tail)


class ProxyProcess:
    """The proxy under test, run as ``twistd -n jupyter-dev-server ...`` in its own directory.

    ``start()`` waits for the line that says where the IDE connects (see :func:`ready_address`);
    ``spawn()`` + ``wait_exit()`` are for runs expected to fail on bad options.
    """

    READY_LINE = re.compile(
        r"http://127\.0\.0\.1:(\d+)/(?:\?token=(\S*)|\. The URL to paste .*? is in (\S+) \(readable only by you\))"
    )
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
        # managed mode's local token goes into this proxy's own directory, and no saved profile
        # of the machine's user fills in what a test leaves out.
        self.env = clean_environ({
            "XDG_STATE_HOME": str(self.directory / "state"), "XDG_CONFIG_HOME": str(self.directory / "config"),
            **(env or {}),
        })  # fmt: skip
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
        self.port, self.token = ready_address(match)
        return self

    def wait_checked(self, timeout: float = 60) -> ProxyProcess:
        """
        Wait for the start-up checks (a log line each, the last on kernelspecs): in managed mode they
        start a stopped server, and their lines should not mix with a test's.
        """
        poll(lambda: "check kernelspecs" in self.log_text() or None, timeout, "the proxy's start-up checks", 0.05)
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


def ready_address(match: re.Match[str]) -> tuple[int, str]:
    """
    The port and token of a :attr:`ProxyProcess.READY_LINE`: in pass-through mode the line has the
    whole URL (its token is a placeholder); in managed mode the local token is never in the log,
    which names the URL file (mode 600) it is in instead.
    """
    port, token, url_file = int(match.group(1)), match.group(2), match.group(3)
    if url_file is not None:
        token = Path(url_file).read_text(encoding="utf-8").strip().partition("?token=")[2]
    return port, token or ""


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
def run_in_kernel(base_url: str, token: str, code: str, timeout: float = 60) -> str:
    """
    Do what an IDE does to run a cell: start a ``python3`` kernel at a Jupyter server URL (such as
    the proxy's), run ``code`` over the kernel's WebSocket, and return what it printed. The kernel
    is deleted afterwards. Uses the JSON message framing every jupyter_server speaks; a kernel
    error raises :class:`HarnessError` with the traceback.
    """
    base = base_url.rstrip("/")
    auth = {"Authorization": f"token {token}"}
    started = requests.post(f"{base}/api/kernels", json={"name": "python3"}, headers=auth, timeout=timeout)
    if started.status_code != 201:
        raise HarnessError(f"POST {base}/api/kernels -> {dump(started)}")
    kernel = started.json()["id"]
    try:
        return execute_in_kernel(base, token, kernel, code, timeout)
    finally:
        requests.delete(f"{base}/api/kernels/{kernel}", headers=auth, timeout=timeout)


def execute_in_kernel(base_url: str, token: str, kernel: str, code: str, timeout: float = 60) -> str:
    """Run ``code`` in a running kernel (by id) over its WebSocket and return what it printed."""
    base = base_url.rstrip("/")
    session = uuid.uuid4().hex
    ws = websocket.create_connection(
        f"ws{base[4:]}/api/kernels/{kernel}/channels?session_id={session}",
        header=[f"Authorization: token {token}"],
        timeout=timeout,
        suppress_origin=True,
    )
    try:
        msg_id = uuid.uuid4().hex
        ws.send(json.dumps({
            "channel": "shell",
            "header": {
                "msg_id": msg_id, "msg_type": "execute_request", "session": session,
                "username": "jds", "version": "5.3",
                "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            },
            "parent_header": {}, "metadata": {}, "buffers": [],
            "content": {
                "code": code, "silent": False, "store_history": False, "user_expressions": {},
                "allow_stdin": False, "stop_on_error": True,
            },
        }))  # fmt: skip
        return _collect_stdout(ws, msg_id, timeout)
    finally:
        ws.close()


def _collect_stdout(ws: Any, msg_id: str, timeout: float) -> str:
    """The ``stream`` output of one execution, up to the kernel going idle."""
    out: list[str] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        opcode, data = ws.recv_data()
        if opcode != websocket.ABNF.OPCODE_TEXT:
            continue
        msg = json.loads(data)
        if msg.get("parent_header", {}).get("msg_id") != msg_id:
            continue
        kind, content = msg["header"]["msg_type"], msg["content"]
        if kind == "stream" and content.get("name") == "stdout":
            out.append(content["text"])
        elif kind == "error":
            raise HarnessError("the kernel raised:\n" + "\n".join(content.get("traceback", [])))
        elif kind == "status" and content.get("execution_state") == "idle":
            return "".join(out)
    raise HarnessError(f"the kernel did not finish within {timeout:g} s; output so far: {''.join(out)!r}")


def saved_profiles(config_home: Path) -> dict[str, dict[str, Any]]:
    """The profiles ``login`` saved under ``config_home`` (an ``XDG_CONFIG_HOME``), read as TOML."""
    with (config_home / "jupyter-dev-server" / "config.toml").open("rb") as file:
        return tomllib.load(file)["profiles"]
