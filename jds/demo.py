"""
``jupyter-dev-server demo``: try an IDE against the proxy with no cluster at hand.

It starts a throwaway but real JupyterHub on loopback (TLS from a fresh CA, a local user ``demo``
with a running server and an API token, from :mod:`jds._demohub`, the hub the end-to-end tests
build on) and the proxy in front of it in managed mode, exactly as a user runs it
(``twistd -n jupyter-dev-server ...``). Then it prints the URL to paste into the IDE and a ``curl``
line that lists kernelspecs through the proxy, and waits. Ctrl-C (or SIGTERM) stops the proxy and
the hub by their own pids (the hub stops its proxy and servers) and removes the temporary directory.

The hub and the proxy run in sessions of their own: a Ctrl-C on the terminal reaches only the demo,
which then stops them in order, proxy first, instead of everything dying at once.
"""

from __future__ import annotations

import importlib.util
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import FrameType
from typing import Any

from twisted.python import usage

from jds.commands import parse_subcommand, program
from jds.tokens import load_local_token, write_private

__all__ = ["DemoOptions", "main"]

DEFAULT_PORT = 8000
# The Python packages the demo's hub and servers run on (the ``demo`` extra).
_NEEDED = ("jupyterhub", "jupyter_server", "ipykernel", "notebook", "trustme", "requests", "psutil")


class DemoOptions(usage.Options):
    synopsis = "Usage: jupyter-dev-server demo [--port PORT] [--user NAME]"
    longdesc = (
        "Start a throwaway JupyterHub on 127.0.0.1 (TLS from a fresh CA, a user with a running "
        "server) and jupyter-dev-server in front of it in managed mode; print the URL for the IDE. "
        "Ctrl-C stops both and removes every temporary file."
    )
    optParameters = [
        ["port", "p", str(DEFAULT_PORT),
         f"Local port for the IDE; 0 picks a free one. If {DEFAULT_PORT} is taken, a free one is used."],
        ["user", None, "demo", "The hub user whose server the demo starts."],
    ]

    def postOptions(self) -> None:
        try:
            self["port"] = int(self["port"])
        except ValueError:
            self["port"] = -1
        if not 0 <= self["port"] < 65536:
            raise usage.UsageError("--port must be a port number from 0 to 65535.")
        if not self["user"] or not self["user"].replace("-", "").isalnum() or not self["user"][0].isalpha():
            raise usage.UsageError("--user must be a simple name: letters, digits and '-', starting with a letter.")


def _say(text: str = "") -> None:
    print(text, flush=True)


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _interrupt(signum: int, frame: FrameType | None) -> None:
    """
    SIGINT and SIGTERM both stop the demo. Installed explicitly: a shell starts background jobs
    with SIGINT ignored, and Python then leaves it ignored.
    """
    raise KeyboardInterrupt


class Demo:
    """One run: the temporary directory, the hub and the proxy, and how to stop them."""

    def __init__(self, port: int, user: str) -> None:
        self.wanted_port = port
        self.user = user
        self.directory: Path | None = None
        self.hub: Any = None
        self.proxy: subprocess.Popen[bytes] | None = None

    def run(self) -> int:
        # lazy load: needs the demo extra, which _missing() checks first
        from jds._demohub import HarnessError

        previous = {sig: signal.signal(sig, _interrupt) for sig in (signal.SIGINT, signal.SIGTERM)}
        code = 0
        try:
            self.directory = Path(tempfile.mkdtemp(prefix="jds-demo-"))
            self._start()
            code = self._watch()
        except KeyboardInterrupt:
            _say()
        except HarnessError as exc:
            print(f"jupyter-dev-server demo: {exc}", file=sys.stderr, flush=True)
            code = 1
        finally:
            # A second Ctrl-C must not cut the clean-up short and leave processes behind.
            for sig in previous:
                signal.signal(sig, signal.SIG_IGN)
            try:
                self._stop()
            finally:
                for sig, handler in previous.items():
                    signal.signal(sig, handler)
        return code

    def _start(self) -> None:
        # lazy load: needs the demo extra, which _missing() checks first
        from jds import _demohub

        assert self.directory is not None
        started = time.monotonic()
        _say(f"Creating a CA and the hub's certificate in {self.directory} ...")
        ca = _demohub.HubCA(self.directory / "tls")
        self.hub = hub = _demohub.JupyterHubProcess(self.directory / "hub", ca, own_session=True)
        _say("Starting JupyterHub on 127.0.0.1 (takes a few seconds) ...")
        hub.start(timeout=120)
        _say(f"Starting {self.user}'s server on the hub ...")
        hub.create_user(self.user)
        hub.start_server(self.user, timeout=180)
        token_file = self.directory / "hub-token"
        write_private(token_file, hub.new_token(self.user, note="jupyter-dev-server demo") + "\n")
        self.local_token_file = local_token_file = self.directory / "local-token"
        self.local_token = load_local_token(local_token_file)

        port = self.wanted_port
        if port == 0:
            port = _demohub.free_port()
        elif not _port_free(port):
            taken, port = port, _demohub.free_port()
            _say(f"Port {taken} is taken; the proxy listens on {port} instead.")
        self.port = port
        self.proxy_args = [
            "--hub", hub.url, "--user", self.user, "--ca-cert", str(ca.ca_path),
            "--tls-name", hub.tls_name, "--token-file", str(token_file), "--via", "direct",
            "--local-token-file", str(local_token_file),
        ]  # fmt: skip
        command = [
            _demohub.venv_script("twistd"), "-n", "--pidfile=", "jupyter-dev-server",
            *self.proxy_args, "--listen", f"tcp:{port}:interface=127.0.0.1",
        ]  # fmt: skip
        _say("Starting jupyter-dev-server in managed mode; its log follows.")
        # Its log goes to the terminal, so the user sees each request the IDE makes.
        self.proxy = subprocess.Popen(
            command, cwd=self.directory, env=_demohub.clean_environ(), stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        self._wait_for_proxy()
        self._announce(time.monotonic() - started)

    def _wait_for_proxy(self) -> None:
        import requests

        # lazy load: needs the demo extra, which _missing() checks first
        from jds._demohub import HarnessError, poll

        proxy = self.proxy
        assert proxy is not None
        url = f"http://127.0.0.1:{self.port}/api/kernelspecs"

        def answered() -> bool | None:
            if proxy.poll() is not None:
                raise HarnessError(
                    f"jupyter-dev-server exited with {proxy.returncode} before it answered; its log is above."
                )
            try:
                response = requests.get(
                    url, headers={"Authorization": f"token {self.local_token}"}, timeout=10
                )
            except requests.ConnectionError:
                return None
            return True if response.status_code == 200 else None

        poll(answered, 60, f"jupyter-dev-server to serve {url}", 0.2)

    def _announce(self, seconds: float) -> None:
        assert self.directory is not None and self.proxy is not None
        base = f"http://127.0.0.1:{self.port}"
        hub = self.hub
        _say(f"""
jupyter-dev-server demo is ready ({seconds:.0f} s).

  JupyterHub          {hub.url}/  pid {hub.pid}, user {self.user} with a running server
  jupyter-dev-server  {base}/  pid {self.proxy.pid}, managed mode (it holds the hub token)

Paste this URL into VS Code ("Select Kernel" > "Existing Jupyter Server") or PyCharm
("Configure Jupyter Server" > "Configured Server"):

  IDE URL: {base}/?token={self.local_token}

Or try it from a shell (any shell: the commands need no PATH and read the tokens from their files):

  curl -s '{base}/api/kernelspecs?token={self.local_token}'
  {shlex.join([program(), "status", "--url", base, "--local-token-file", str(self.local_token_file)])}
  {shlex.join([program(), "check", *self.proxy_args])}

Temporary files: {self.directory}
Press Ctrl-C to stop the proxy and the hub and remove the temporary files.
""")

    def _watch(self) -> int:
        """Wait for Ctrl-C; if the proxy or the hub dies first, say so and stop the other."""
        # lazy load: needs the demo extra, which _missing() checks first
        from jds._demohub import tail

        proxy, hub = self.proxy, self.hub
        assert proxy is not None and hub is not None and hub.proc is not None
        while True:
            try:
                code = proxy.wait(timeout=1.0)
            except subprocess.TimeoutExpired:
                if hub.proc.poll() is not None:
                    print(
                        f"jupyter-dev-server demo: JupyterHub exited with {hub.proc.returncode}:\n"
                        + tail(hub.log_text()), file=sys.stderr, flush=True,
                    )
                    return 1
                continue
            print(f"jupyter-dev-server demo: jupyter-dev-server exited with {code}; its log is above.",
                  file=sys.stderr, flush=True)
            return 1

    def _stop(self) -> None:
        # lazy load: needs the demo extra, which _missing() checks first
        from jds._demohub import stop_pid

        if self.proxy is not None:
            _say(f"Stopping jupyter-dev-server (pid {self.proxy.pid}) ...")
            stop_pid(self.proxy, 15)
        if self.hub is not None and self.hub.proc is not None:
            _say(f"Stopping JupyterHub (pid {self.hub.pid}) and the servers it started ...")
            self.hub.stop()
            if self.hub.leftovers:
                _say("  (had to stop these by pid: " + "; ".join(self.hub.leftovers) + ")")
        if self.directory is not None:
            shutil.rmtree(self.directory, ignore_errors=True)
            if self.directory.exists():
                print(f"jupyter-dev-server demo: could not remove {self.directory}; remove it by hand.",
                      file=sys.stderr, flush=True)
            else:
                _say(f"Stopped; removed {self.directory}.")


def _missing() -> str | None:
    """What the demo cannot run without, as a sentence saying how to get it."""
    absent = [name for name in _NEEDED if importlib.util.find_spec(name) is None]
    if absent:
        return (
            f"the demo needs {', '.join(absent)}: run `make demo` in a checkout, or "
            "pip install 'jupyter-dev-server[demo]'."
        )
    # lazy load: needs the demo extra, which _missing() checks first
    from jds._demohub import HarnessError, configurable_http_proxy

    try:
        configurable_http_proxy()
    except HarnessError as exc:
        return str(exc)
    return None


def main(argv: list[str]) -> int:
    options = DemoOptions()
    failed = parse_subcommand(options, argv, "demo")
    if failed is not None:
        return failed
    problem = _missing()
    if problem:
        print(f"jupyter-dev-server demo: {problem}", file=sys.stderr)
        return 2
    return Demo(options["port"], options["user"]).run()
