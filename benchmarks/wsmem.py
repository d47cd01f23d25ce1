"""
``python -m benchmarks.wsmem``: what one idle relayed kernel WebSocket costs a proxy, and in jds
where it goes.

It starts the benchmark's jupyter_server and kernel (:class:`benchmarks.servers.Fleet`), jds (and
configurable-http-proxy with ``--chp``, scratch copies of ``jds`` with ``--variant``), then for each
proxy, ``--reps`` times, opens kernel sockets ``--step`` at a time up to ``--steps`` steps (8
handshakes at once, as ``make bench``'s ``idle_sockets``), reading the proxy's RSS after each step
has settled. Two figures per repetition:

- *from idle* (``make bench``'s method): (RSS with ``2 × step`` open − RSS before the first) / ``2 × step``;
- *slope*: (RSS with ``3 × step`` open − RSS with ``step`` open) / ``2 × step``: the first step's
  one-off costs (first use of a code path, a pool's first growth) and whatever freed memory the
  process had kept from earlier work and hands to the first sockets stay out of it.

``--fresh`` starts every proxy anew before each repetition, so no repetition reuses what the
sockets of the previous one freed (without it, repetitions after the first measure partly reused
memory). Every proxy is measured the same way, in rotating order.

``--census`` then opens ``--census-count`` sockets through jds once more, with
:mod:`tracemalloc` switched on in the daemon just before (``benchmarks/wsmem_hook``, loaded only
into the daemon this script starts), and prints what each socket keeps: live Python bytes by
allocation site, the growth of the garbage collector's census by type, and malloc's in-use bytes
that Python did not allocate (OpenSSL's, mostly); before and after a full collection.

The client reads every socket (answers pings, drains what the server broadcasts), as an IDE does.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import select
import shutil
import signal
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

from benchmarks.kernelws import KernelSocket
from benchmarks.procfs import snapshot
from benchmarks.servers import Fleet, Route, _poll

HOOK = Path(__file__).resolve().parent / "wsmem_hook"


class Holder:
    """Kernel sockets held open on one route, read by one thread (pings answered, broadcasts drained)."""

    def __init__(self, route: Route | dict, kernel: str, token: str) -> None:
        self.route = route.as_dict() if isinstance(route, Route) else route
        self.kernel = kernel
        self.token = token
        self.sockets: list[KernelSocket] = []
        self.frames = 0
        self.lost = 0  # sockets closed by the other end while held
        self.failures: list[str] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def open(self, count: int) -> None:
        def one(_: int) -> None:
            try:
                ks = KernelSocket(self.route, self.kernel, self.token)
            except Exception as exc:  # noqa: BLE001 - reported, not raised
                self.failures.append(f"{type(exc).__name__}: {exc}")
                return
            ks.ws.sock.setblocking(True)
            with self._lock:
                self.sockets.append(ks)

        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            list(pool.map(one, range(count)))

    def _read(self) -> None:
        while not self._stop.is_set():
            with self._lock:
                by_fd = {ks.ws.sock.fileno(): ks for ks in self.sockets if ks.ws.sock is not None}
            if not by_fd:
                time.sleep(0.05)  # poll: nothing open yet
                continue
            readable, _, _ = select.select(list(by_fd), [], [], 0.2)
            for fd in readable:
                ks = by_fd[fd]
                try:
                    ks.ws.recv_data_frame(True)
                    self.frames += 1
                except Exception:  # noqa: BLE001 - a socket closing under us
                    with self._lock:
                        if ks in self.sockets:
                            self.sockets.remove(ks)
                            self.lost += 1

    def close(self) -> None:
        with self._lock:
            sockets, self.sockets = self.sockets, []

        def one(ks: KernelSocket) -> None:
            try:
                ks.close()
            except Exception:  # noqa: BLE001 - closing anyway
                pass

        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            list(pool.map(one, sockets))

    def stop(self) -> None:
        self.close()
        self._stop.set()
        self._reader.join(5)


class Daemon:
    """Talks to ``benchmarks/wsmem_hook`` inside the jds process it was started with."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)

    def ask(self, pid: int, command: str) -> dict:
        answer = self.directory / "answer"
        answer.unlink(missing_ok=True)
        (self.directory / "command").write_text(command)
        os.kill(pid, signal.SIGUSR2)
        _poll(lambda: answer.exists() or None, 300, f"the daemon to answer {command!r}")
        return json.loads(answer.read_text())


def _settle(pid: int, seconds: float) -> int:
    time.sleep(seconds)  # let the proxy finish what each open left behind, as idle_sockets does
    return snapshot(pid).rss_kib


def measure(route: Route | dict, kernel: str, token: str, step: int, steps: int, settle: float,
            daemon: Daemon | None = None) -> dict:
    """
    ``route``: a :class:`Route` or its ``as_dict()`` (``make bench``'s load generator gets the latter).
    ``daemon``: also ask the hook what ``malloc_trim`` would give back with every socket open (after the reading).
    """
    holder = Holder(route, kernel, token)
    pid = holder.route["pid"]
    trimmed = None
    try:
        levels = [_settle(pid, settle)]
        counts = [0]
        for _ in range(steps):
            holder.open(step)
            levels.append(_settle(pid, settle))
            counts.append(len(holder.sockets))  # open now: a socket the proxy closed does not count
        opened = len(holder.sockets)
        if daemon is not None:
            trimmed = daemon.ask(pid, "trim")
    finally:
        holder.stop()
    result = {"levels_kib": levels, "counts": counts, "opened": opened, "failures": holder.failures[:3],
              "frames": holder.frames, "lost": holder.lost, "after_close_kib": _settle(pid, settle),
              "trim": trimmed}
    if steps >= 2:
        result["from_idle"] = (levels[2] - levels[0]) / max(1, counts[2] - counts[0])
    if steps >= 3:
        result["slope"] = (levels[3] - levels[1]) / max(1, counts[3] - counts[1])
    return result


def census(daemon: Daemon, route: Route, kernel: str, token: str, base: int, count: int, settle: float,
           frames: int) -> dict:
    """``base`` sockets first (their one-off costs stay out), then ``count`` more, whose cost is reported."""
    holder = Holder(route, kernel, token)
    try:
        holder.open(base)
        time.sleep(settle)
        daemon.ask(route.pid, f"start {frames}")
        lost, first = holder.lost, len(holder.sockets)
        holder.open(count)
        time.sleep(settle)
        added = len(holder.sockets) - first
        answer = daemon.ask(route.pid, f"dump {max(1, added)}")
        answer["lost"] = holder.lost - lost
    finally:
        holder.stop()
    answer["opened"] = max(1, added)
    return answer


def _print_census(answer: dict) -> None:
    print(f"\n## census of {answer['opened']} sockets (per socket; {answer['lost']} closed by the far end meanwhile)")
    start = answer["mallinfo_start"]
    for phase in ("live", "after_collect"):
        part = answer[phase]
        info = part["mallinfo"]
        malloc = (info.get("uordblks", 0) + info.get("hblkhd", 0) - start.get("uordblks", 0) - start.get("hblkhd", 0))
        per = answer["opened"]
        print(f"RSS {part['rss_kib'] / 1024:.1f} MiB; malloc in use +{malloc / per / 1024:.1f} KiB, free in its heap "
              f"{info.get('fordblks', 0) / 1024:.0f} KiB (at start {start.get('fordblks', 0) / 1024:.0f} KiB)")
        print(f"\n### {phase}" + (f" (gc.collect() freed {answer['collected']} objects)" if phase != "live" else ""))
        print(f"Python, traced: {part['traced_per'] / 1024:.1f} KiB (of which blocks > 512 B, from malloc: "
              f"{part['traced_over_512_per'] / 1024:.1f} KiB); malloc in use grew {malloc / per / 1024:.1f} KiB, "
              f"so not Python's: {(malloc / per - part['traced_over_512_per']) / 1024:.1f} KiB")
        if part.get("files"):
            print("\n| bytes | blocks | allocated in |\n|---|---|---|")
            for entry in part["files"][:25]:
                print(f"| {entry['bytes_per']:.0f} | {entry['blocks_per']:.1f} | {entry['file']} |")
        print("\n| bytes | blocks | allocated at | from jds at |\n|---|---|---|---|")
        for site in part["sites"][:60]:
            print(f"| {site['bytes_per']:.0f} | {site['blocks_per']:.1f} | {site['site']} | {site['via']} |")
        print("\n| objects | bytes (with __dict__) | type |\n|---|---|---|")
        for kind in part["census"][:30]:
            print(f"| {kind['count_per']:.2f} | {kind['bytes_per']:.0f} | {kind['type']} |")


def main() -> int:
    from benchmarks.run import _client, _warm  # here: make bench's load generator imports this module

    parser = argparse.ArgumentParser(prog="python -m benchmarks.wsmem", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--step", type=int, default=100)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--settle", type=float, default=2.0)
    parser.add_argument("--fresh", action="store_true", help="start the proxies anew before each repetition")
    parser.add_argument("--chp", action="store_true", help="measure configurable-http-proxy too")
    parser.add_argument("--variant", action="append", default=[], metavar="NAME=DIR",
                        help="a directory holding a changed copy of the jds package")
    parser.add_argument("--trim", action="store_true",
                        help="after each jds repetition's last step, what malloc_trim(0) gives back (then it goes on)")
    parser.add_argument("--census", action="store_true", help="the per-socket breakdown inside jds")
    parser.add_argument("--census-count", type=int, default=100)
    parser.add_argument("--json", metavar="FILE", help="write the raw results here")
    args = parser.parse_args()
    variants = dict(v.split("=", 1) for v in args.variant)
    directory = Path(tempfile.mkdtemp(prefix="jds-wsmem-", dir="/dev/shm" if Path("/dev/shm").is_dir() else None))
    fleet = Fleet(directory)
    daemon = Daemon(directory / "hook")
    results: dict = {}

    def start(name: str) -> Route:
        if name == "chp":
            route = fleet.start_chp()
            if route is None:
                raise SystemExit("configurable-http-proxy is not installed (run `make test` once)")
        else:
            path = variants.get(name)
            pythonpath = os.pathsep.join(p for p in (path, str(HOOK)) if p)
            # the defaults (256 per client, 512 in all) would refuse the last step's sockets
            route = fleet.start_jds(name=name, pythonpath=path, extra=("--max-connections-per-client", "2000", "--max-connections", "2000"), env={"PYTHONPATH": pythonpath,
                                                                     "JDS_WSMEM_DIR": str(daemon.directory)})
        _warm(route.as_dict(), fleet.token)
        return route

    def restart(name: str) -> Route:
        fleet.stop_one(name)
        return start(name)

    try:
        fleet.start_jupyter_server()
        kernel = fleet.start_kernel()
        _client({"workload": "kernels_ready", "route": fleet.paths["direct"].as_dict(), "token": fleet.token,
                 "kernels": [kernel]})
        proxies = ["jds", *variants, *(["chp"] if args.chp else [])]
        routes = {name: start(name) for name in proxies}
        time.sleep(1)
        for rep in range(args.reps):
            shift = rep % len(proxies)
            for name in proxies[shift:] + proxies[:shift]:
                if args.fresh and rep:
                    routes[name] = restart(name)
                    time.sleep(1)
                hooked = daemon if args.trim and name != "chp" else None
                result = measure(routes[name], kernel, fleet.token, args.step, args.steps, args.settle, hooked)
                results.setdefault(name, []).append(result)
                print(f"{name} rep {rep + 1}: RSS {' → '.join(f'{k / 1024:.1f}' for k in result['levels_kib'])} MiB"
                      f" ({'/'.join(map(str, result['counts']))} open, {result['lost']} closed by the far end, {result['frames']} "
                      f"frames read), from idle "
                      f"{result.get('from_idle', 0):.1f} KiB, slope {result.get('slope', 0):.1f} KiB; after close "
                      f"{result['after_close_kib'] / 1024:.1f} MiB {result['failures'] or ''}", flush=True)
                if result["trim"]:
                    trim = result["trim"]
                    print(f"  malloc_trim(0) with {result['opened']} open: RSS {trim['rss_before_kib'] / 1024:.1f} → "
                          f"{trim['rss_kib'] / 1024:.1f} MiB", flush=True)
        if not results:
            pass
        print("\n| proxy | from idle, KiB per socket (each rep) | median | slope, KiB per socket (each rep) | median |")
        print("|---|---|---|---|---|")
        for name, reps in results.items():
            idle = [r["from_idle"] for r in reps if "from_idle" in r]
            slope = [r["slope"] for r in reps if "slope" in r]
            print(f"| {name} | {', '.join(f'{v:.1f}' for v in idle)} | {statistics.median(idle) if idle else 0:.1f} | "
                  f"{', '.join(f'{v:.1f}' for v in slope)} | {statistics.median(slope) if slope else 0:.1f} |")
        if args.census:
            for name in proxies:
                if name == "chp":
                    continue
                for frames in (0, 30):
                    answer = census(daemon, restart(name), kernel, fleet.token, args.step, args.census_count,
                                    args.settle, frames)
                    results[f"census-{name}-{frames}"] = answer
                    print(f"\n# {name}, " + (f"tracemalloc keeping {frames} frames" if frames else "without tracemalloc"))
                    _print_census(answer)
        if args.json:
            Path(args.json).write_text(json.dumps(results, indent=1))
    finally:
        for note in fleet.stop():
            print(f"cleanup: {note}", file=sys.stderr)
        shutil.rmtree(directory, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
