"""
``make soak``: does jupyter-dev-server give back what it takes?

A real JupyterHub on loopback (``tests/hub.py``), the proxy as a real ``twistd`` process in
pass-through mode, and between them a TCP relay this script controls (``tests/tcp_cutter.py``).
Then a number of cycles (1,000 by default), each an HTTP request and a kernel WebSocket opened and
closed through the proxy; one cycle in ten (``--abort-every``) is instead aborted abruptly, in turn:

- the client resets its connection in the middle of a download;
- the client resets its connection in the middle of an upload;
- the client resets an open WebSocket;
- the hub side is cut (reset) in the middle of a download;
- the hub side is cut under an open kernel WebSocket (the proxy reconnects it: it must carry on).

Before and after, once the proxy's idle hub connections have timed out, it reads the proxy's open
file descriptors (``/proc/PID/fd``) and resident memory (``VmRSS``), prints both and fails (exit 1)
unless they came back to where they started, give or take ``--fd-slack`` and ``--rss-slack-mb``.
It also fails if a cycle that was not aborted did not work, or an aborted one was not seen as such.

Every process, thread and socket it starts is stopped by it, processes by their own pid.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import json
import os
import re
import shutil
import socket
import struct
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import requests
import websocket
from hub import JupyterHubProcess, ProxyProcess, TestCA, poll  # tests/hub.py, see benchmarks/__init__.py
from tcp_cutter import TcpCutter

from benchmarks.procfs import snapshot

MB = 1 << 20
USER = "soak"
DOWNLOAD = 4 * MB


@dataclass
class Figures:
    """What the proxy process held at one moment."""

    fds: int
    rss_kib: int
    threads: int

    @classmethod
    def of(cls, pid: int) -> Figures:
        with open(f"/proc/{pid}/status") as handle:
            threads = next(int(line.split()[1]) for line in handle if line.startswith("Threads:"))
        return cls(len(os.listdir(f"/proc/{pid}/fd")), snapshot(pid).rss_kib, threads)


@dataclass
class Tally:
    cycles: int = 0
    outcomes: Counter[str] = field(default_factory=Counter)
    problems: list[str] = field(default_factory=list)

    def problem(self, cycle: int, what: str) -> None:
        self.outcomes["problem"] += 1
        if len(self.problems) < 20:
            self.problems.append(f"cycle {cycle}: {what}")


class Soak:
    def __init__(self, directory: Path, args: argparse.Namespace) -> None:
        self.directory = directory
        self.args = args
        self.hub = JupyterHubProcess(directory / "hub", TestCA(directory / "tls"))
        self.cutter: TcpCutter | None = None
        self.proxy: ProxyProcess | None = None
        self.token = ""
        self.kernel = ""
        self.file = f"soak-{uuid.uuid4().hex[:8]}.bin"
        self.session = requests.Session()

    # -- set-up and tear-down ------------------------------------------------------------------

    def start(self) -> None:
        started = time.monotonic()
        self.hub.start()
        self.hub.create_user(USER)
        self.hub.start_server(USER)
        self.token = self.hub.new_token(USER)
        self.cutter = TcpCutter(self.hub.port).start()
        self.proxy = ProxyProcess(
            ["--hub", f"https://{self.cutter.address}", "--user", USER, "--ca-cert", str(self.hub.ca_path),
             "--tls-name", self.hub.tls_name],
            directory=self.directory / "proxy",
        ).start()  # fmt: skip
        self.session.headers["Authorization"] = f"token {self.token}"
        payload = base64.b64encode(os.urandom(DOWNLOAD)).decode()
        put = self.session.put(
            self.url(f"/api/contents/{self.file}"), json={"type": "file", "format": "base64", "content": payload}
        )
        put.raise_for_status()
        created = self.session.post(self.url("/api/kernels"), json={"name": "python3"})
        created.raise_for_status()
        self.kernel = created.json()["id"]
        print(f"hub, server, proxy and kernel up in {time.monotonic() - started:.1f} s", flush=True)

    def stop(self) -> None:
        self.session.close()
        if self.kernel or self.file:
            with contextlib.suppress(Exception):
                direct = f"{self.hub.url}/user/{USER}/api"
                headers = {"Authorization": f"token {self.token}"}
                if self.kernel:
                    requests.delete(f"{direct}/kernels/{self.kernel}", headers=headers, verify=self.hub.ca_path, timeout=30)
                requests.delete(f"{direct}/contents/{self.file}", headers=headers, verify=self.hub.ca_path, timeout=30)
        if self.proxy is not None:
            self.proxy.stop()
        if self.cutter is not None:
            self.cutter.stop()
        self.hub.stop()

    # -- helpers -------------------------------------------------------------------------------

    def url(self, path: str) -> str:
        assert self.proxy is not None
        return self.proxy.url + path

    @property
    def port(self) -> int:
        assert self.proxy is not None and self.proxy.port is not None
        return self.proxy.port

    @property
    def pid(self) -> int:
        assert self.proxy is not None and self.proxy.proc is not None
        return self.proxy.proc.pid

    def head(self, line: str, *extra: str) -> bytes:
        lines = [line, f"Host: 127.0.0.1:{self.port}", f"Authorization: token {self.token}", *extra]
        return ("\r\n".join(lines) + "\r\n\r\n").encode()

    def kernel_socket(self) -> websocket.WebSocket:
        return websocket.create_connection(
            f"ws://127.0.0.1:{self.port}/api/kernels/{self.kernel}/channels?session_id={uuid.uuid4().hex}",
            header=[f"Authorization: token {self.token}"], timeout=30, suppress_origin=True,
        )  # fmt: skip

    def download(self) -> tuple[socket.socket, bytes]:
        """
        A raw GET of the 4 MB file with a small receive window; returns once the body started (or
        the connection ended before that).
        """
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
        sock.settimeout(15)
        sock.connect(("127.0.0.1", self.port))
        sock.sendall(self.head(f"GET /files/{self.file} HTTP/1.1"))
        got = b""
        with contextlib.suppress(ConnectionResetError):
            while len(got) < 256 * 1024:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                got += chunk
        return sock, got

    # -- the cycles ----------------------------------------------------------------------------

    def normal(self, cycle: int, tally: Tally) -> None:
        response = self.session.get(self.url("/api/contents"), params={"content": "0"}, timeout=30)
        if response.status_code != 200:
            tally.problem(cycle, f"GET /api/contents -> {response.status_code} {response.text[:200]}")
        ws = self.kernel_socket()
        try:
            ws.close(timeout=5)
        finally:
            ws.shutdown()
        tally.outcomes["normal"] += 1

    def client_resets_download(self, cycle: int, tally: Tally) -> None:
        sock, got = self.download()
        if not got.startswith(b"HTTP/1.1 200 "):
            tally.problem(cycle, f"download answered {got[:100]!r}")
        _reset(sock)

    def client_resets_upload(self, cycle: int, tally: Tally) -> None:
        sock = socket.create_connection(("127.0.0.1", self.port), timeout=15)
        body = b"x" * (100 * 1024)
        sock.sendall(self.head(
            f"PUT /api/contents/never-{uuid.uuid4().hex[:8]}.txt HTTP/1.1", "Content-Type: application/json",
            f"Content-Length: {MB}",
        ) + body)  # fmt: skip
        _reset(sock)

    def client_resets_socket(self, cycle: int, tally: Tally) -> None:
        ws = self.kernel_socket()
        _reset(ws.sock)
        ws.shutdown()

    def hub_cut_download(self, cycle: int, tally: Tally) -> None:
        """
        The hub side is reset once it has sent 1 MB of the 4 MB file: the client must see an abort.
        The cut is made at a byte count, not at a moment: cut at a moment, it raced the download, as
        on loopback all 4 MB can pass the proxy into socket buffers first, and that download then
        rightly ends whole, on a connection kept open for the next request.
        """
        assert self.cutter is not None
        self.cutter.cut_after = MB
        try:
            sock, got = self.download()
            head, body, ending = _read_response(sock, got)
        finally:
            self.cutter.cut_after = None
        if not head.startswith(b"HTTP/1.1 200 "):
            tally.problem(cycle, f"download answered {head[:100]!r}")
        elif ending == "whole":
            tally.problem(cycle, "a download cut on the hub side arrived whole")
        elif ending == "hanging":
            tally.problem(cycle, f"a download cut on the hub side was left hanging after {body} bytes")

    def hub_cut_socket(self, cycle: int, tally: Tally) -> None:
        assert self.cutter is not None
        ws = self.kernel_socket()
        try:
            self.cutter.cut()
            if not _kernel_info(ws, 30):
                tally.problem(cycle, "a kernel WebSocket cut on the hub side did not carry on after the reconnect")
            ws.close(timeout=5)
        finally:
            ws.shutdown()

    def run(self, cycles: int, abort_every: int) -> Tally:
        aborts: list[Callable[[int, Tally], None]] = [
            self.client_resets_download, self.client_resets_upload, self.client_resets_socket,
            self.hub_cut_download, self.hub_cut_socket,
        ]  # fmt: skip
        tally = Tally()
        started = time.monotonic()
        for cycle in range(cycles):
            try:
                if abort_every and cycle % abort_every == abort_every - 1:
                    kind = aborts[(cycle // abort_every) % len(aborts)]
                    kind(cycle, tally)
                    tally.outcomes[kind.__name__] += 1
                else:
                    self.normal(cycle, tally)
            except Exception as exc:  # counted, and the soak goes on
                tally.problem(cycle, f"{type(exc).__name__}: {exc}")
            tally.cycles += 1
            if cycle and cycle % 200 == 0:
                print(f"  {cycle} cycles, {time.monotonic() - started:.0f} s", flush=True)
        return tally

    def settled(self, timeout: float = 30) -> Figures:
        """
        Figures once the proxy is idle: no connection to the hub left (its pool drops idle ones
        after 4 s) and the descriptor count steady over half a second.
        """
        assert self.cutter is not None
        cutter = self.cutter
        previous: list[Figures] = []

        def steady() -> Figures | None:
            if cutter.open_connections():
                return None
            now = Figures.of(self.pid)
            if previous and previous[-1].fds == now.fds:
                return now
            previous.append(now)
            return None

        return poll(steady, timeout, "the proxy to settle", 0.5)


def _read_response(sock: socket.socket, got: bytes) -> tuple[bytes, int, str]:
    """
    Read the rest of one response with a Content-Length: its head, the body bytes received, and how
    it ended: "whole" (the body complete; the connection may stay open for the next request),
    "aborted" (closed or reset before that) or "hanging" (nothing for the socket's timeout).
    """
    buffer = bytearray(got)
    length: int | None = None
    ending = "hanging"
    try:
        while True:
            if length is None and b"\r\n\r\n" in buffer:
                found = re.search(rb"(?im)^content-length:\s*(\d+)\s*$", buffer.partition(b"\r\n\r\n")[0])
                length = int(found.group(1)) if found else -1
            if length is not None and length >= 0 and len(buffer) - buffer.index(b"\r\n\r\n") - 4 >= length:
                ending = "whole"
                break
            chunk = sock.recv(65536)
            if not chunk:
                ending = "aborted"
                break
            buffer += chunk
    except (ConnectionResetError, BrokenPipeError):
        ending = "aborted"
    except TimeoutError:
        pass
    finally:
        sock.close()
    head, _, body = bytes(buffer).partition(b"\r\n\r\n")
    return head, len(body), ending


def _reset(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def _kernel_info(ws: websocket.WebSocket, timeout: float) -> bool:
    """
    A kernel_info round trip. A request written while the proxy has not yet noticed the cut goes
    into the dead connection and is lost (the proxy never sends one again on a guess), so it is
    asked again every 5 s, as an IDE asks for kernel_info again; True once a reply arrives.
    """
    deadline = time.monotonic() + timeout
    asked: set[str] = set()
    next_ask = 0.0
    while (now := time.monotonic()) < deadline:
        if now >= next_ask:
            msg_id = uuid.uuid4().hex
            asked.add(msg_id)
            ws.send(json.dumps({
                "channel": "shell", "parent_header": {}, "metadata": {}, "content": {}, "buffers": [],
                "header": {"msg_id": msg_id, "msg_type": "kernel_info_request", "session": msg_id,
                           "username": "soak", "version": "5.3"},
            }))  # fmt: skip
            next_ask = now + 5
        ws.settimeout(max(0.05, min(next_ask, deadline) - time.monotonic()))
        try:
            frame = ws.recv_data_frame(control_frame=True)[1]
        except websocket.WebSocketTimeoutException:
            continue
        except (websocket.WebSocketException, OSError):
            return False
        if frame.opcode == websocket.ABNF.OPCODE_CLOSE:
            return False
        if frame.opcode == websocket.ABNF.OPCODE_TEXT:
            msg = json.loads(frame.data)
            if msg.get("msg_type") == "kernel_info_reply" and msg.get("parent_header", {}).get("msg_id") in asked:
                return True
    return False


def main() -> int:
    parser = argparse.ArgumentParser(prog="make soak", description=__doc__.split("\n\n")[1])
    parser.add_argument("--cycles", type=int, default=1000, help="cycles to run (default 1000)")
    parser.add_argument("--warmup", type=int, default=50, help="cycles before the baseline (default 50)")
    parser.add_argument("--abort-every", type=int, default=10, help="every Nth cycle is aborted (default 10)")
    parser.add_argument("--fd-slack", type=int, default=2, help="open files allowed above the baseline")
    parser.add_argument("--rss-slack-mb", type=float, default=10.0, help="MB of RSS allowed above the baseline")
    parser.add_argument("--json", action="store_true", help="print the figures as one JSON object too")
    args = parser.parse_args()
    started = time.monotonic()
    directory = Path(tempfile.mkdtemp(prefix="jds-soak-"))
    soak = Soak(directory, args)
    try:
        soak.start()
        warm = soak.run(args.warmup, args.abort_every)
        before = soak.settled()
        print(f"baseline after {args.warmup} warm-up cycles: {before.fds} open files, "
              f"{before.rss_kib / 1024:.1f} MB RSS, {before.threads} threads", flush=True)  # fmt: skip
        soaked = time.monotonic()
        tally = soak.run(args.cycles, args.abort_every)
        took = time.monotonic() - soaked
        after = soak.settled()
        status = requests.get(soak.url("/_jds/status"), timeout=10)
        counters = status.json() if status.status_code == 200 else {}
        log = soak.proxy.log_text() if soak.proxy else ""
    finally:
        soak.stop()
        shutil.rmtree(directory, ignore_errors=True)
    rss_growth = (after.rss_kib - before.rss_kib) / 1024
    print(f"{tally.cycles} cycles in {took:.1f} s ({took / max(1, tally.cycles) * 1000:.0f} ms each): "
          + ", ".join(f"{name} {count}" for name, count in sorted(tally.outcomes.items())))  # fmt: skip
    print(f"open files: {before.fds} -> {after.fds} ({after.fds - before.fds:+d}, allowed +{args.fd_slack})")
    print(f"RSS:        {before.rss_kib / 1024:.1f} MB -> {after.rss_kib / 1024:.1f} MB "
          f"({rss_growth:+.1f} MB, allowed +{args.rss_slack_mb:g})")  # fmt: skip
    print(f"threads:    {before.threads} -> {after.threads}")
    if counters:
        print(f"/_jds/status: {counters['requests']} requests relayed, {counters['open_http']} open now, "
              f"{counters['open_websockets']} WebSockets open")  # fmt: skip
    tracebacks = log.count("Traceback")
    print(f"proxy log:  {len(log.splitlines())} lines, {tracebacks} tracebacks; total {time.monotonic() - started:.0f} s")
    failures = [*warm.problems, *tally.problems]
    for problem in failures:
        print(f"  problem: {problem}")
    if args.json:
        print(json.dumps({
            "cycles": tally.cycles, "seconds": round(took, 1), "outcomes": dict(tally.outcomes),
            "fds": [before.fds, after.fds], "rss_kib": [before.rss_kib, after.rss_kib],
            "threads": [before.threads, after.threads], "tracebacks": tracebacks, "problems": failures,
            "status": {k: counters.get(k) for k in ("requests", "open_http", "open_websockets", "websockets")},
        }))  # fmt: skip
    ok = (
        after.fds <= before.fds + args.fd_slack
        and rss_growth <= args.rss_slack_mb
        and not failures
        and tracebacks == 0
        and counters.get("open_http", 0) == 0
        and counters.get("open_websockets", 0) == 0
    )
    print("soak: OK" if ok else "soak: FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
