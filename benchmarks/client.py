"""
The load generator: ``python -m benchmarks.client`` reads one JSON job on stdin, runs it against the
routes it names (direct, jds, chp) interleaved round by round, and writes one JSON result on stdout.

It runs in its own process, never in a server's. Around each route's share of a round it reads the
in-between process's CPU time and memory from ``/proc`` (see :mod:`benchmarks.procfs`), so CPU per
request and RSS growth belong to exactly the requests that route served.
"""

from __future__ import annotations

import http.client
import json
import random
import select
import ssl
import statistics
import sys
import threading
import time
import traceback
from collections.abc import Callable
from typing import Any

from benchmarks.kernelws import KernelSocket
from benchmarks.procfs import nodelay_report, reset_peak, snapshot
from benchmarks.wan import wan

__all__ = ["main"]


def _connection(route: dict, timeout: float = 120.0) -> http.client.HTTPConnection:
    host_port = route["origin"].split("://", 1)[1]
    host, port = host_port.rsplit(":", 1)
    if route["ca"]:
        context = ssl.create_default_context(cafile=route["ca"])
        return http.client.HTTPSConnection(host, int(port), timeout=timeout, context=context)
    return http.client.HTTPConnection(host, int(port), timeout=timeout)


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def _order(names: list[str], round_no: int) -> list[str]:
    """Rotate which route goes first, so no route always follows the same one."""
    shift = round_no % len(names)
    return names[shift:] + names[:shift]


class _Measured:
    """
    CPU and memory of a route's in-between process around one piece of work, and the CPU of the
    load generator itself and of the upstream server (``SERVER_PID``, when the job names one).
    """

    server_pid: int | None = None

    def __init__(self, route: dict, peak: bool = False) -> None:
        self.pid = route["pid"]
        self.peak = peak

    def __enter__(self) -> _Measured:
        self.client_cpu = time.process_time()
        self.server = snapshot(self.server_pid) if self.server_pid else None
        if self.pid:
            self.peak_reset = reset_peak(self.pid) if self.peak else False
            self.before = snapshot(self.pid)
        return self

    def __exit__(self, *exc: object) -> None:
        self.client_cpu = time.process_time() - self.client_cpu
        if self.server is not None:
            self.server_cpu = snapshot(self.server_pid).cpu_since(self.server)
        if self.pid:
            self.after = snapshot(self.pid)

    def result(self) -> dict:
        out: dict[str, Any] = {"client_cpu": self.client_cpu}
        if self.server is not None:
            out["server_cpu"] = self.server_cpu
        if self.pid:
            out["proxy_cpu"] = self.after.cpu_since(self.before)
            out["proxy_sys"] = self.after.system - self.before.system
            out["rss_before_kib"] = self.before.rss_kib
            out["rss_after_kib"] = self.after.rss_kib
            if self.peak:
                out["peak_growth_kib"] = self.after.hwm_kib - self.before.rss_kib
                out["peak_reset"] = self.peak_reset
        return out


def _why(exc: Exception) -> str:
    """One short line for a failure: the status and the proxy's JSON message for a refused handshake."""
    status = getattr(exc, "status_code", None)
    if status is not None:
        body = getattr(exc, "resp_body", b"") or b""
        try:
            message = json.loads(body).get("message", "")
        except (ValueError, AttributeError):
            message = body[:80].decode("latin-1", "replace")
        return f"handshake answered {status}: {message}"[:160]
    return f"{type(exc).__name__}: {exc}"[:160]


def _get(conn: http.client.HTTPConnection, path: str, headers: dict) -> bytes:
    conn.request("GET", path, headers=headers)
    response = conn.getresponse()
    body = response.read()
    if response.status != 200:
        raise RuntimeError(f"GET {path} -> {response.status}: {body[:200]!r}")
    return body


# -- workloads ----------------------------------------------------------------------------------


def rest(job: dict) -> dict:
    """Small REST GETs on one persistent HTTP/1.1 connection per route."""
    routes, auth = job["routes"], {"Authorization": f"token {job['token']}"}
    path = job.get("path", "/api/status")
    conns = {name: _connection(route) for name, route in routes.items()}
    for name, conn in conns.items():
        for _ in range(job["warmup"]):
            _get(conn, routes[name]["prefix"] + path, auth)
    rounds: dict[str, list] = {name: [] for name in routes}
    for round_no in range(job["rounds"]):
        for name in _order(list(routes), round_no):
            conn, url = conns[name], routes[name]["prefix"] + path
            if conn.sock is not None and select.select([conn.sock], [], [], 0)[0]:
                # Idle while the other routes ran, longer than CHP's 5 s keep-alive on a busy
                # machine: the server closed it. Reconnect outside the measured requests.
                conn.close()
                _get(conn, url, auth)
            latencies = []
            deadline = time.perf_counter() + job.get("deadline", 1e9)
            with _Measured(routes[name]) as measured:
                began = time.perf_counter()
                for _ in range(job["requests"]):
                    started = time.perf_counter()
                    _get(conn, url, auth)
                    latencies.append(time.perf_counter() - started)
                    if started > deadline:
                        break
                elapsed = time.perf_counter() - began
            rounds[name].append({
                "n": len(latencies), "seconds": elapsed, "p50": statistics.median(latencies),
                "p99": _percentile(latencies, 0.99), **measured.result(),
            })
    sockets = {name: nodelay_report(route["pid"]) for name, route in routes.items() if route["pid"]}
    for conn in conns.values():
        conn.close()
    return {"rounds": rounds, "nodelay": sockets}


def kernel_ws(job: dict) -> dict:
    """kernel_info round trips and pipelined bursts, one fresh kernel socket per route and round."""
    routes, token, kernel = job["routes"], job["token"], job["kernel"]
    rounds: dict[str, list] = {name: [] for name in routes}
    errors: dict[str, str] = {}
    sockets: dict[str, Any] = {}
    for round_no in range(job["rounds"]):
        for name in _order(list(routes), round_no):
            if name in errors:
                continue
            route = routes[name]
            try:
                ks = KernelSocket(route, kernel, token)
            except Exception as exc:  # the relay may not be there yet: report, do not stop
                errors[name] = _why(exc)
                continue
            try:
                for _ in range(job["warmup"]):
                    ks.round_trip()
                with _Measured(route) as measured:
                    latencies = [ks.round_trip() for _ in range(job["requests"])]
                bursts = [ks.burst(job["burst"]) for _ in range(job["bursts"])]
                if route["pid"] and name not in sockets:
                    sockets[name] = nodelay_report(route["pid"])
                rounds[name].append({
                    "n": len(latencies), "p50": statistics.median(latencies),
                    "p99": _percentile(latencies, 0.99),
                    "burst_rate": job["burst"] / statistics.median(bursts),
                    "subprotocol": ks.subprotocol, **measured.result(),
                })
            except Exception as exc:
                errors[name] = _why(exc)
            finally:
                try:
                    ks.close()
                except Exception:
                    pass
    return {"rounds": rounds, "errors": errors, "nodelay": sockets}


def download(job: dict) -> dict:
    """GET a large file through ``/files/``, reading it into one reused buffer."""
    routes, auth = job["routes"], {"Authorization": f"token {job['token']}"}
    buffer = memoryview(bytearray(1 << 20))
    rounds: dict[str, list] = {name: [] for name in routes}
    for round_no in range(job["rounds"]):
        for name in _order(list(routes), round_no):
            route = routes[name]
            conn = _connection(route)
            total = 0
            with _Measured(route, peak=True) as measured:
                started = time.perf_counter()
                conn.request("GET", route["prefix"] + job["path"], headers=auth)
                response = conn.getresponse()
                while True:
                    got = response.readinto(buffer)
                    if not got:
                        break
                    total += got
                elapsed = time.perf_counter() - started
            conn.close()
            if response.status != 200 or total != job["size"]:
                raise RuntimeError(f"{name}: GET {job['path']} -> {response.status}, {total} bytes")
            rounds[name].append({"seconds": elapsed, "mib_s": total / elapsed / (1 << 20), **measured.result()})
    return {"rounds": rounds}


def upload(job: dict) -> dict:
    """PUT a large text file through ``/api/contents`` (one JSON body of ``size`` bytes)."""
    routes = job["routes"]
    filler = job["size"] - len(json.dumps({"type": "file", "format": "text", "content": ""}))
    body = json.dumps({"type": "file", "format": "text", "content": "x" * filler}).encode()
    headers = {"Authorization": f"token {job['token']}", "Content-Type": "application/json"}
    rounds: dict[str, list] = {name: [] for name in routes}
    for round_no in range(job["rounds"]):
        for name in _order(list(routes), round_no):
            route = routes[name]
            conn = _connection(route)
            url = f"{route['prefix']}/api/contents/upload-{name}.txt"
            with _Measured(route, peak=True) as measured:
                started = time.perf_counter()
                conn.request("PUT", url, body=body, headers=headers)
                response = conn.getresponse()
                answer = response.read()
                elapsed = time.perf_counter() - started
            conn.close()
            if response.status not in (200, 201):
                raise RuntimeError(f"{name}: PUT {url} -> {response.status}: {answer[:300]!r}")
            rounds[name].append({"seconds": elapsed, "mib_s": len(body) / elapsed / (1 << 20), **measured.result()})
    return {"rounds": rounds}


def idle_sockets(job: dict) -> dict:
    """
    Kernel sockets through one freshly started proxy, ``step`` at a time for ``steps`` steps, read as
    an IDE reads them (pings answered, the kernel's broadcasts drained); the proxy's RSS after each
    step has settled. The figure is the slope between the first step and the last
    (:func:`benchmarks.wsmem.measure`): the first sockets' one-off costs and memory the process had
    kept from earlier work stay out of it, for every proxy alike.
    """
    from benchmarks.wsmem import measure

    return measure(job["route"], job["kernel"], job["token"], job["step"], job["steps"], job["settle"])


def mixed(job: dict) -> dict:
    """
    ``threads`` clients, each with its own HTTP connection and kernel socket, alternating a REST
    GET and a kernel_info round trip at random intervals around ``period`` seconds, from
    ``start_at`` (wall clock, shared by every process of the run) for ``duration`` seconds.
    """
    route, auth = job["route"], {"Authorization": f"token {job['token']}"}
    url = route["prefix"] + "/api/status"
    rest_lat: list[float] = []
    ws_lat: list[float] = []
    series: list[tuple] | None = [] if job.get("series") else None
    began = time.perf_counter() + max(0.0, job["start_at"] - time.time())
    errors: list[str] = []
    lock = threading.Lock()

    def client(index: int) -> None:
        kernel = job["kernels"][index % len(job["kernels"])]
        rng = random.Random(index)
        try:
            conn = _connection(route, timeout=60)
            _get(conn, url, auth)
            ks = KernelSocket(route, kernel, job["token"])
            ks.round_trip()
        except Exception as exc:
            with lock:
                errors.append(f"setup: {_why(exc)}")
            return
        mine_rest, mine_ws = [], []
        now = time.time()
        if job["start_at"] > now:
            time.sleep(job["start_at"] - now)  # every client of every process starts together
        end = time.perf_counter() + job["duration"]
        due = time.perf_counter() + rng.uniform(0, job["period"])
        try:
            while True:
                pause = due - time.perf_counter()
                if pause > 0:
                    time.sleep(pause)  # pacing: the load generator's think time
                if time.perf_counter() >= end:
                    break
                started = time.perf_counter()
                _get(conn, url, auth)
                mine_rest.append(time.perf_counter() - started)
                mine_ws.append(ks.round_trip())
                if series is not None:
                    series.append((index, started - began, mine_rest[-1], mine_ws[-1]))
                due += job["period"] * rng.uniform(0.5, 1.5)
        except Exception as exc:
            with lock:
                errors.append(_why(exc))
        finally:
            try:
                ks.close()
                conn.close()
            except Exception:
                pass
            with lock:
                rest_lat.extend(mine_rest)
                ws_lat.extend(mine_ws)

    threads = [threading.Thread(target=client, args=(i + job["first"],)) for i in range(job["threads"])]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    out = {"rest": rest_lat, "ws": ws_lat, "errors": errors}
    if series is not None:
        out["series"] = series  # (client, seconds since start, REST latency, kernel_info latency)
    return out


def kernels_ready(job: dict) -> dict:
    """Wait until every kernel answers on its socket, so start-up CPU does not leak into a workload."""
    for kernel in job["kernels"]:
        ks = KernelSocket(job["route"], kernel, job["token"], timeout=120)
        try:
            ks.round_trip()
        finally:
            ks.close()
    return {}


WORKLOADS: dict[str, Callable[[dict], dict]] = {
    "rest": rest, "kernel_ws": kernel_ws, "download": download, "upload": upload,
    "idle_sockets": idle_sockets, "mixed": mixed, "kernels_ready": kernels_ready, "wan": wan,
}


def main() -> int:
    job = json.load(sys.stdin)
    _Measured.server_pid = job.get("server_pid")
    try:
        result = WORKLOADS[job["workload"]](job)
    except Exception as exc:
        result = {"failed": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()}
    json.dump(result, sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
