"""
The daemon's log as another user of the machine, or a client with no token, would meet it (issue 20):
the local token only ever on the terminal of a foreground run (1), and a log that a flood of refused
requests cannot grow without bound (8). Real ``twistd`` processes in front of the real hub.
"""

from __future__ import annotations

import contextlib
import os
import pty
import re
import select
import signal
import socket
import stat
import subprocess
import time
from pathlib import Path

import requests
from hub import JupyterHubProcess, ProxyProcess, clean_environ, poll, stop_pid, tail, venv_script

from jds.logs import LOG_FILES_KEPT, LOG_ROTATE_BYTES, QUOTE_LIMIT

LISTEN = "tcp:0:interface=127.0.0.1"


def daemon_args(hub: JupyterHubProcess) -> list[str]:
    return ["--hub", hub.url, "--user", "alice", "--ca-cert", str(hub.ca_path), "--tls-name", hub.tls_name,
            "--listen", LISTEN]  # fmt: skip


def daemon_env(hub: JupyterHubProcess, state: Path) -> dict[str, str]:
    """Managed mode (the hub token in JupyterHub's variable), the local token under ``state``."""
    return clean_environ({ProxyProcess.TOKEN_ENV: hub.alice_token, "XDG_STATE_HOME": str(state)})


def url_in(state: Path) -> str:
    path = state / "jupyter-dev-server" / "local-token.url"
    return poll(lambda: path.exists() and path.read_text().strip() or None, 60, f"the URL file {path}")


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with contextlib.suppress(OSError):  # a zombie nobody reaps yet is gone too
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] != "Z"
    return True


def stop_daemon(pid: int, timeout: float = 20) -> None:
    """SIGTERM the daemon by its pid (it is not our child: twistd forked it away), SIGKILL if it stays."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)  # poll: a deadline loop for a process that is not our child
    if alive(pid):
        os.kill(pid, signal.SIGKILL)
        raise AssertionError(f"the daemon {pid} did not stop on SIGTERM within {timeout} s")


# -- 1. the local token ------------------------------------------------------------------------


def test_a_daemon_with_no_logfile_keeps_the_token_out_of_twistd_log(hub: JupyterHubProcess, tmp_path: Path) -> None:
    """``umask 022; twistd --pidfile p jupyter-dev-server ...``: twistd's own ``./twistd.log``."""
    folder, state = tmp_path / "run", tmp_path / "state"
    folder.mkdir()
    command = [venv_script("twistd"), "--pidfile", str(folder / "jds.pid"), "jupyter-dev-server", *daemon_args(hub)]
    launched = subprocess.run(
        ["sh", "-c", 'umask 022; exec "$@"', "sh", *command], cwd=folder, env=daemon_env(hub, state),
        stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60,
    )
    assert launched.returncode == 0, launched.stdout + launched.stderr
    pid = int(poll(lambda: (folder / "jds.pid").exists() and (folder / "jds.pid").read_text().strip() or None,
                   30, "the pidfile"))  # fmt: skip
    try:
        url = url_in(state)
        token = url.partition("?token=")[2]
        log = folder / "twistd.log"
        text = poll(lambda: log.exists() and "check kernelspecs" in log.read_text() and log.read_text() or None,
                    60, "the start-up checks in twistd.log", describe=lambda: log.read_text() if log.exists() else "")  # fmt: skip
        assert stat.S_IMODE(log.stat().st_mode) == 0o600
        assert token and token not in text
        assert f"is in {state / 'jupyter-dev-server' / 'local-token.url'} (readable only by you)" in text
        assert requests.get(url.replace("/?", "/api/status?"), timeout=30).status_code == 200
        assert token not in log.read_text()
    finally:
        stop_daemon(pid)


def test_a_foreground_run_on_a_terminal_shows_the_url(hub: JupyterHubProcess, tmp_path: Path) -> None:
    """``twistd -n`` (what the ``jupyter-dev-server`` command runs) on a terminal: the user sees the URL."""
    state = tmp_path / "state"
    main, secondary = pty.openpty()
    proc = subprocess.Popen(
        [venv_script("twistd"), "-n", "--pidfile=", "jupyter-dev-server", *daemon_args(hub)], cwd=tmp_path,
        env=daemon_env(hub, state), stdin=secondary, stdout=secondary, stderr=secondary,
    )
    os.close(secondary)
    seen = bytearray()

    def read() -> bytes:
        while select.select([main], [], [], 0)[0]:
            try:
                chunk = os.read(main, 65536)
            except OSError:  # EIO: the process closed the terminal
                break
            if not chunk:
                break
            seen.extend(chunk)
        return bytes(seen)

    try:
        shown = poll(lambda: re.search(rb"Paste this URL into your IDE as an existing Jupyter server: (\S+)", read()),
                     60, "the URL on the terminal", describe=lambda: tail(bytes(seen).decode(errors="replace")))  # fmt: skip
        assert shown.group(1).decode() == url_in(state)
        assert b"(readable only by you)" in seen, "the log line (on the same terminal) names the URL file"
    finally:
        stop_pid(proc, 20)
        os.close(main)


# -- 8. a flood of refused requests ------------------------------------------------------------


class FileLoggingProxy(ProxyProcess):
    """The proxy as the README's daemon recipe runs it, with ``--logfile`` in a folder of its own."""

    def __init__(self, *args, log_file: Path, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.log_file = log_file

    @property
    def command(self) -> list[str]:
        return [venv_script("twistd"), "-n", "--pidfile=", f"--logfile={self.log_file}", self.plugin, *self.args]

    def log_text(self) -> str:
        logged = self.log_file.read_text(errors="replace") if self.log_file.exists() else ""
        return super().log_text() + logged


def refuse_many(port: int, heads: list[bytes], batch: int = 50) -> int:
    """Send the request heads pipelined on one connection, ``batch`` at a time; count the 403s."""
    answered = 0
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        for start in range(0, len(heads), batch):
            chunk = heads[start : start + batch]
            sock.sendall(b"".join(chunk))
            received = b""
            while received.count(b"HTTP/1.1 403 ") < len(chunk):
                data = sock.recv(1 << 20)
                assert data, f"the proxy closed the connection after {answered} answers"
                received += data
            answered += received.count(b"HTTP/1.1 403 ")
    return answered


def test_refused_requests_cannot_fill_the_disk(hub: JupyterHubProcess, tmp_path: Path) -> None:
    logs = tmp_path / "logs"
    logs.mkdir()
    for number in range(1, 31):  # what an older version left behind: rotated files never deleted
        (logs / f"jds.log.{number}").write_text("old\n")
    proxy = FileLoggingProxy.for_hub(hub, "alice", hub.alice_token, directory=tmp_path / "daemon",
                                     log_file=logs / "jds.log")  # fmt: skip
    proxy.start(60)
    try:
        host = f"Host: 127.0.0.1:{proxy.port}\r\n\r\n".encode()
        same = b"GET /api/contents/" + b"s" * 15_000 + b" HTTP/1.1\r\n" + host
        varied = [b"GET /api/contents/%06d" % n + b"v" * 15_000 + b" HTTP/1.1\r\n" + host for n in range(2000)]
        started = time.monotonic()
        assert refuse_many(proxy.port, [same] * 2000) == 2000
        assert refuse_many(proxy.port, varied) == 2000
        seconds = time.monotonic() - started

        def refusal_lines() -> list[str]:
            text = "".join(f.read_text(errors="replace") for f in sorted(logs.iterdir()))
            return [line for line in text.splitlines() if "GET /api/contents/" in line]

        def burst_count() -> int | None:
            counts = [re.search(r"the same refusal \(no-token\) (\d+) more time", line) for line in refusal_lines()]
            total = sum(int(found.group(1)) for found in counts if found)
            return total if total >= 1997 else None

        # the burst of identical refusals: its first three lines, then a line with the count per 10 s
        assert poll(burst_count, 30, "the burst's count", describe=lambda: tail(proxy.log_text(), 5)) == 1997
        lines = refusal_lines()
        burst = [line for line in lines if "/api/contents/sss" in line]
        assert 4 <= len(burst) <= 4 + seconds / 10, burst
        # one line for each of the others
        assert len([line for line in lines if re.search(r"GET /api/contents/\d{6}v", line)]) == 2000
        files = sorted(logs.iterdir())
        assert len(files) <= LOG_FILES_KEPT + 1, [f.name for f in files]
        assert all(stat.S_IMODE(f.stat().st_mode) == 0o600 for f in files if f.read_text() != "old\n")
        assert max(len(line) for line in lines) < QUOTE_LIMIT + 600, "a line quotes about 1 KiB at most"
        size = sum(f.stat().st_size for f in files)
        assert size <= (LOG_FILES_KEPT + 1) * (LOG_ROTATE_BYTES + 4096)
        print(f"\n4000 refused 15 kB requests in {seconds:.1f} s ({4000 / seconds:.0f}/s): "
              f"{len(files)} log files, {size / 1e6:.1f} MB, longest line {max(len(line) for line in lines)} chars")  # fmt: skip
    finally:
        proxy.stop()
