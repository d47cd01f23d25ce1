"""
The processes a benchmark run measures: a TLS jupyter_server at ``/user/<name>/`` (the shape of a
JupyterHub single-user server), jupyter-dev-server in front of it, and optionally
configurable-http-proxy (the hub's own proxy) in front of it too.

Every process is started with its own pid recorded and stopped by that pid (then its leftover
children, such as kernels, by theirs). Every wait polls with a deadline.
"""

from __future__ import annotations

import compileall
import contextlib
import json
import os
import re
import secrets
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import trustme
from hub import free_ports  # tests/hub.py, see benchmarks/__init__.py

__all__ = ["Fleet", "Route", "ServerError"]

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
TLS_NAME = "hub.jds.test"
CHP_CANDIDATES = (
    REPO / "tests" / "node" / "node_modules" / ".bin" / "configurable-http-proxy",
    Path("/tmp/npmtest/node_modules/.bin/configurable-http-proxy"),
)
T = TypeVar("T")


class ServerError(RuntimeError):
    """A process did not start or answer in time; the message carries the end of its log."""


def _poll(check: Callable[[], T | None], timeout: float, what: str, log: Path | None = None) -> T:
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result is not None:
            return result
        if time.monotonic() > deadline:
            tail = "\n".join(log.read_text(errors="replace").splitlines()[-30:]) if log else ""
            raise ServerError(f"timed out after {timeout:.0f} s waiting for {what}\n{tail}")
        time.sleep(0.1)  # poll


@dataclass
class Route:
    """One way for a client to reach the user's server: direct, through jds, through CHP."""

    name: str
    origin: str  # scheme://host:port
    prefix: str  # path prefix the client adds ("" behind jds, "/user/NAME" otherwise)
    pid: int | None  # the process in between, whose /proc we read (None for direct)
    ca: str | None  # CA file for https, None for plain http

    def as_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass
class _Proc:
    name: str
    popen: subprocess.Popen
    log: Path


@dataclass
class Fleet:
    """Everything one run starts, in one directory; ``stop()`` undoes all of it."""

    directory: Path
    user: str = "alice"
    token: str = field(default_factory=lambda: secrets.token_hex(24))
    procs: list[_Proc] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        self.root_dir = self.directory / "notebooks"
        self.root_dir.mkdir(exist_ok=True)
        ca = trustme.CA()
        cert = ca.issue_cert(TLS_NAME, "127.0.0.1", "localhost")
        self.ca_path = self.directory / "ca.pem"
        self.cert_path = self.directory / "server-cert.pem"
        self.key_path = self.directory / "server-key.pem"
        ca.cert_pem.write_to_path(str(self.ca_path))
        cert.private_key_pem.write_to_path(str(self.key_path))
        for i, pem in enumerate(cert.cert_chain_pems):
            pem.write_to_path(str(self.cert_path), append=i > 0)
        self.server_port = 0
        self.paths: dict[str, Route] = {}

    # -- files the workloads use ---------------------------------------------------------------
    def make_file(self, name: str, size: int) -> None:
        """A file of ``size`` incompressible bytes under the server's root."""
        block = os.urandom(1 << 20)
        with open(self.root_dir / name, "wb") as handle:
            for _ in range(size >> 20):
                handle.write(block)
            handle.write(block[: size & ((1 << 20) - 1)])

    # -- processes -------------------------------------------------------------------------------
    def _start(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> _Proc:
        log = self.directory / f"{name}.log"
        base = {k: v for k, v in os.environ.items() if not k.startswith(("JUPYTER", "CONFIGPROXY"))}
        base.update(env or {})
        base["PYTHONUNBUFFERED"] = "1"
        with open(log, "wb") as out:
            popen = subprocess.Popen(
                argv, cwd=self.directory, stdin=subprocess.DEVNULL, stdout=out,
                stderr=subprocess.STDOUT, env=base,
            )
        proc = _Proc(name, popen, log)
        self.procs.append(proc)
        return proc

    def _check_running(self, proc: _Proc) -> None:
        if proc.popen.poll() is not None:
            tail = "\n".join(proc.log.read_text(errors="replace").splitlines()[-30:])
            raise ServerError(f"{proc.name} exited with status {proc.popen.returncode}\n{tail}")

    def start_jupyter_server(self) -> Route:
        self.server_port = free_ports(1)[0]
        jupyter_dirs = self.directory / "jupyter"
        env = {
            "JUPYTER_CONFIG_DIR": str(jupyter_dirs / "config"),
            "JUPYTER_DATA_DIR": str(jupyter_dirs / "data"),
            "JUPYTER_RUNTIME_DIR": str(jupyter_dirs / "runtime"),
            "IPYTHONDIR": str(jupyter_dirs / "ipython"),
        }
        argv = [
            str(BIN / "jupyter-server"),
            f"--config={Path(__file__).parent / 'jupyter_server_config.py'}",
            "--ServerApp.allow_remote_access=True",
            f"--ServerApp.base_url=/user/{self.user}/",
            f"--IdentityProvider.token={self.token}",
            f"--ServerApp.certfile={self.cert_path}",
            f"--ServerApp.keyfile={self.key_path}",
            "--ip=127.0.0.1",
            f"--port={self.server_port}",
            "--port-retries=0",
            "--no-browser",
            f"--ServerApp.root_dir={self.root_dir}",
        ]
        if os.geteuid() == 0:
            argv.append("--allow-root")
        proc = self._start("jupyter-server", argv, env)
        self.server_pid = proc.popen.pid
        context = ssl.create_default_context(cafile=str(self.ca_path))
        url = f"https://127.0.0.1:{self.server_port}/user/{self.user}/api/status"

        def ready() -> bool | None:
            self._check_running(proc)
            request = urllib.request.Request(url, headers={"Authorization": f"token {self.token}"})
            try:
                with urllib.request.urlopen(request, context=context, timeout=5) as response:
                    return True if response.status == 200 else None
            except OSError:
                return None

        _poll(ready, 60, "jupyter-server to answer /api/status over TLS", proc.log)
        path = Route("direct", f"https://127.0.0.1:{self.server_port}", f"/user/{self.user}", None,
                     str(self.ca_path))
        self.paths["direct"] = path
        return path

    def start_jds(
        self, name: str = "jds", pythonpath: str | None = None, launcher: tuple[str, ...] | None = None,
        hub_port: int | None = None, hub_host: str = "127.0.0.1", extra: tuple[str, ...] = (),
        env: dict[str, str] | None = None,
    ) -> Route:
        """
        jupyter-dev-server in pass-through mode, started as the README and the systemd unit start
        it (the ``jupyter-dev-server`` command: ``twistd -n jupyter-dev-server`` without twistd's
        plugin scan); ``pythonpath`` runs another copy of ``jds``, ``launcher`` runs twistd's
        arguments under another command instead (e.g. with a profiler around twistd),
        ``hub_port`` puts something else (the WAN far end) in the server's place, ``hub_host`` and
        ``extra`` (more options) reach it another way (the via workload: a name only a bastion resolves);
        ``env`` adds to its environment (and replaces the ``PYTHONPATH`` that ``pythonpath`` sets).

        The package is byte-compiled first, as ``pip install`` leaves it: a process that compiles
        its modules from source at every start keeps the compiler's garbage (~1 MiB of RSS), and
        ``PYTHONDONTWRITEBYTECODE`` (set on some machines) would make that every start.
        """
        package = Path(pythonpath) / "jds" if pythonpath else REPO / "jds"
        compileall.compile_dir(str(package), quiet=1)
        command = [*launcher, "-n", "--pidfile=", "jupyter-dev-server"] if launcher else [str(BIN / "jupyter-dev-server")]
        argv = [
            *command,
            "--hub", f"https://{hub_host}:{hub_port or self.server_port}",
            "--user", self.user,
            "--ca-cert", str(self.ca_path),
            "--tls-name", TLS_NAME,
            "--listen", "tcp:0:interface=127.0.0.1",
            *extra,
        ]
        proc = self._start(name, argv, {**({"PYTHONPATH": pythonpath} if pythonpath else {}), **(env or {})})
        pattern = re.compile(r"http://127\.0\.0\.1:(\d+)/\?token=")

        def listening() -> int | None:
            self._check_running(proc)
            found = pattern.search(proc.log.read_text(errors="replace"))
            return int(found.group(1)) if found else None

        port = _poll(listening, 30, "jupyter-dev-server to log its URL", proc.log)
        path = Route(name, f"http://127.0.0.1:{port}", "", proc.popen.pid, None)
        self.paths[name] = path
        return path

    def start_chp(self, name: str = "chp", target_port: int | None = None, tls: bool = False,
                  tls_version: str | None = None) -> Route | None:
        """
        configurable-http-proxy as JupyterHub runs it, if npm installed it: plain HTTP in front
        (``tls``: HTTPS with the server's certificate, as a hub's public side, ``tls_version`` only),
        forwarding to the
        server or to ``target_port`` (the WAN far end). Node's HTTP server closes keep-alive
        connections idle for 5 s, as a real hub's proxy does.
        """
        binary = next((p for p in CHP_CANDIDATES if p.exists()), None)
        if binary is None:
            return None
        port, api_port = free_ports(2)
        argv = [
            str(binary), "--ip", "127.0.0.1", "--port", str(port),
            "--api-ip", "127.0.0.1", "--api-port", str(api_port),
            "--default-target", f"https://127.0.0.1:{target_port or self.server_port}",
            "--log-level", "warn",
        ]
        if tls:
            argv += ["--ssl-key", str(self.key_path), "--ssl-cert", str(self.cert_path),
                     "--keep-alive-timeout", "5000"]
            if tls_version:  # e.g. TLSv1_2: a hub that does not speak TLS 1.3
                argv += ["--ssl-protocol", tls_version]
        env = {"CONFIGPROXY_AUTH_TOKEN": secrets.token_hex(16), "NODE_EXTRA_CA_CERTS": str(self.ca_path)}
        proc = self._start(name, argv, env)
        scheme = "https" if tls else "http"
        url = f"{scheme}://127.0.0.1:{port}/user/{self.user}/api/status"
        context = ssl.create_default_context(cafile=str(self.ca_path)) if tls else None

        def ready() -> bool | None:
            self._check_running(proc)
            request = urllib.request.Request(url, headers={"Authorization": f"token {self.token}"})
            try:
                with urllib.request.urlopen(request, timeout=5, context=context) as response:
                    return True if response.status == 200 else None
            except OSError:
                return None

        _poll(ready, 30, f"configurable-http-proxy ({name}) to forward /api/status", proc.log)
        # The bin script is `#!/usr/bin/env node`: the pid we started is node itself.
        path = Route(name, f"{scheme}://127.0.0.1:{port}", f"/user/{self.user}", proc.popen.pid,
                     str(self.ca_path) if tls else None)
        self.paths[name] = path
        return path

    def start_delay_line(self, target_port: int, delay: float) -> int:
        """:mod:`benchmarks.delayline` in front of ``target_port``; returns the port it listens on."""
        port = free_ports(1)[0]
        argv = [sys.executable, "-m", "benchmarks.delayline", "--listen", str(port),
                "--target", f"127.0.0.1:{target_port}", "--delay", str(delay)]
        proc = self._start(f"delayline-{port}", argv, {"PYTHONPATH": str(REPO)})

        def listening() -> bool | None:
            self._check_running(proc)
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
                return True
            return None

        _poll(listening, 30, "the delay line to listen", proc.log)
        return port

    def start_kernel(self) -> str:
        """A python3 kernel on the server (the workloads share it); returns its id."""
        context = ssl.create_default_context(cafile=str(self.ca_path))
        request = urllib.request.Request(
            f"https://127.0.0.1:{self.server_port}/user/{self.user}/api/kernels",
            data=json.dumps({"name": "python3"}).encode(), method="POST",
            headers={"Authorization": f"token {self.token}", "Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, context=context, timeout=60) as response:
            return json.load(response)["id"]

    def log_of(self, name: str) -> Path:
        return self.directory / f"{name}.log"

    def stop(self) -> list[str]:
        """SIGTERM each process we started (newest first), then SIGKILL; then its leftover children."""
        notes = []
        for proc in reversed(self.procs):
            notes += _stop(proc)
        self.procs.clear()
        return notes

    def stop_one(self, name: str) -> list[str]:
        """Stop the process started as ``name`` (as :meth:`stop` does), so that it can be started anew."""
        proc = next(p for p in self.procs if p.name == name)
        self.procs.remove(proc)
        self.paths.pop(name, None)
        return _stop(proc)


def _stop(proc: _Proc) -> list[str]:
    notes = []
    children = _descendants(proc.popen.pid)
    if proc.popen.poll() is None:
        proc.popen.send_signal(signal.SIGTERM)
        try:
            proc.popen.wait(15)
        except subprocess.TimeoutExpired:
            notes.append(f"{proc.name} ({proc.popen.pid}) ignored SIGTERM; killed")
            proc.popen.kill()
            proc.popen.wait(10)
    # Kernels and other children normally go with their parent; any that did not, by pid.
    for sig in (signal.SIGTERM, signal.SIGKILL):
        alive = [pid for pid in children if _alive(pid)]
        if not alive:
            break
        for pid in alive:
            notes.append(f"{proc.name}'s child {pid} outlived it: {sig.name}")
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.monotonic() + 5
        while any(_alive(pid) for pid in alive) and time.monotonic() < deadline:
            time.sleep(0.1)  # poll
    return notes


def _descendants(pid: int) -> list[int]:
    """Every process below ``pid``, from /proc (children are recorded per thread)."""
    found: list[int] = []
    pending = [pid]
    while pending:
        parent = pending.pop()
        try:
            tasks = os.listdir(f"/proc/{parent}/task")
        except OSError:
            continue
        for task in tasks:
            try:
                with open(f"/proc/{parent}/task/{task}/children") as handle:
                    kids = [int(k) for k in handle.read().split()]
            except OSError:
                continue
            found += kids
            pending += kids
    return found


def _alive(pid: int) -> bool:
    """Running and not a zombie (a zombie child of ours is reaped by its parent, not us)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as handle:
            stat = handle.read()
    except OSError:
        return False
    return stat[stat.rindex(b")") + 2 : stat.rindex(b")") + 3] != b"Z"
