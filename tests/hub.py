"""Real processes for end-to-end tests: a TLS JupyterHub and the proxy under test.

The hub harness lives in :mod:`jds.testing` (``jupyter-dev-server demo`` starts the same hub);
it is re-exported here so tests keep writing ``from hub import ...``. What only tests need stays
here: the proxy under test, started as ``twistd jupyter-dev-server`` exactly as a user would.
Everything listens on 127.0.0.1 only. Nothing here needs Twisted.

Every process is started and stopped by its own pid; waiting is done by polling with deadlines.
"""

from __future__ import annotations

import re
import subprocess
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from jds import testing
from jds.testing import (
    ADMIN_SCOPES,
    ADMIN_SERVICE,
    NODE_BIN,
    TLS_NAME,
    HarnessError,
    TestCA,
    clean_environ,
    configurable_http_proxy,
    dump,
    escape_name,
    free_port,
    poll,
    run_in_kernel,
    stop_pid,
    tail,
    venv_script,
)

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
    "free_port",
    "poll",
    "run_in_kernel",
    "stop_pid",
    "tail",
    "venv_script",
]

REPO_ROOT = Path(__file__).resolve().parent.parent


class JupyterHubProcess(testing.JupyterHubProcess):
    """:class:`jds.testing.JupyterHubProcess`, plus the token the session fixture mints for alice."""

    alice_token = ""  # set by the session fixture in conftest.py


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
