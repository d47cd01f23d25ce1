"""
``make bench``: start a TLS jupyter_server at ``/user/alice/`` (certificate from a throwaway CA),
jupyter-dev-server in front of it (and configurable-http-proxy, the hub's own proxy, if npm has
installed it), run every workload direct and through each proxy, interleaved round by round, and
print a table of medians with ratios against direct and the targets of issue 22.

The floors of :mod:`benchmarks.floors` run in the same rounds: ``floor-agent`` (twisted.web +
``Agent``, no jds code) beside the REST and download workloads, ``floor-wsrelay`` (an autobahn
server/client pair, no jds code) beside the kernel WebSocket; the table's *floor* column is theirs,
and jds's cells say how far above it jds is.

The load generators run in separate processes (:mod:`benchmarks.client`); this process only starts
and stops the servers, starts the clients and summarises. Every process is stopped by its pid.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

from benchmarks.floors import start_floors
from benchmarks.procfs import snapshot
from benchmarks.servers import REPO, Fleet
from benchmarks.spread import main as spread_main
from benchmarks.via import run_via, summarise_via

MiB = 1 << 20

# Rounds and sizes of each workload, for the full run and for --quick.
PLAN = {
    "full": {
        "rest": {"warmup": 50, "rounds": 7, "requests": 400},
        "kernel_ws": {"warmup": 20, "rounds": 7, "requests": 150, "burst": 100, "bursts": 3},
        "download": {"rounds": 5, "size": 256 * MiB},
        "upload": {"rounds": 5, "size": 64 * MiB},
        "idle": {"step": 80, "steps": 3, "reps": 3, "settle": 2.0},
        "mixed": {"kernels": 10, "rounds": 2, "one_duration": 3.0, "many_duration": 6.0, "one_period": 0.02,
                  "many": 50, "per_process": 10, "many_period": 2.0},
        "wan": {"rounds": 7, "idle": 6.0, "notebook_bytes": 2 * MiB, "delay": 0.010},
        "via": {"warmup": 30, "rounds": 7, "requests": 300, "ws_requests": 150},
    },
    "quick": {
        "rest": {"warmup": 20, "rounds": 3, "requests": 200},
        "kernel_ws": {"warmup": 10, "rounds": 3, "requests": 50, "burst": 100, "bursts": 2},
        "download": {"rounds": 1, "size": 64 * MiB},
        "upload": {"rounds": 1, "size": 16 * MiB},
        "idle": {"step": 20, "steps": 3, "reps": 1, "settle": 1.0},
        "mixed": {"kernels": 4, "rounds": 1, "one_duration": 2.0, "many_duration": 3.0, "one_period": 0.02,
                  "many": 20, "per_process": 10, "many_period": 1.0},
        "wan": {"rounds": 2, "idle": 6.0, "notebook_bytes": 2 * MiB, "delay": 0.010},
        "via": {"warmup": 10, "rounds": 3, "requests": 100, "ws_requests": 50},
    },
}


def _client(job: dict, timeout: float = 600) -> dict:
    """Run one job in a fresh load-generator process and return its JSON answer."""
    env = dict(os.environ, PYTHONPATH=str(REPO))
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.client"], input=json.dumps(job), capture_output=True,
        text=True, cwd=REPO, env=env, timeout=timeout,
    )
    try:
        result = json.loads(done.stdout)
    except ValueError:
        raise RuntimeError(f"load generator for {job['workload']} failed:\n{done.stderr[-3000:]}") from None
    if "failed" in result:
        raise RuntimeError(f"{job['workload']}: {result['failed']}\n{result.get('traceback', '')}")
    return result


def _clients(jobs: list[dict], timeout: float = 600) -> list[dict]:
    """Run several load-generator processes at once (for the concurrent workload)."""
    env = dict(os.environ, PYTHONPATH=str(REPO))
    procs = [
        subprocess.Popen([sys.executable, "-m", "benchmarks.client"], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO, env=env)
        for _ in jobs
    ]
    results = []
    try:
        for proc, job in zip(procs, jobs, strict=True):  # every job is handed out before any is awaited
            proc.stdin.write(json.dumps(job))
            proc.stdin.close()
        for proc, job in zip(procs, jobs, strict=True):
            out, err = proc.stdout.read(), proc.stderr.read()
            proc.wait(timeout)
            try:
                results.append(json.loads(out))
            except ValueError:
                raise RuntimeError(f"load generator for {job['workload']} failed:\n{err[-3000:]}") from None
    finally:
        for proc in procs:  # on any failure, no load generator outlives the run
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
    return results


def _median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def _p(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))] if ordered else float("nan")


class Table:
    """Rows of the final table: what, direct, then each proxy's value, ratio and verdict."""

    def __init__(self, proxies: list[str], floors: bool = False) -> None:
        self.proxies = proxies
        self.floors = floors
        self.rows: list[list[str]] = []
        self.verdicts: list[tuple[str, bool]] = []
        self.unmeasured: list[str] = []

    def add(self, what: str, direct: str, cells: dict[str, str], target: str = "",
            met: bool | str | None = None, floor: str = "") -> None:
        """``met``: True/False against the target, "n/a" when it could not be measured, None for none."""
        row = [what, direct] + [cells.get(p, "—") for p in self.proxies] + ([floor] if self.floors else []) + [target]
        row.append({None: "", True: "**met**", False: "**NOT met**"}.get(met, str(met)))  # type: ignore[arg-type]
        self.rows.append(row)
        if isinstance(met, bool):
            self.verdicts.append((what, met))
        elif met is not None:
            self.unmeasured.append(what)

    def as_dict(self) -> dict:
        """What :mod:`benchmarks.spread` needs to set several runs side by side."""
        return {"proxies": self.proxies, "floors": self.floors, "rows": self.rows,
                "verdicts": self.verdicts, "unmeasured": self.unmeasured}

    def render(self) -> str:
        names = {"jds": "jupyter-dev-server", "chp": "configurable-http-proxy"}
        head = (["workload", "direct"] + [names.get(p, p) for p in self.proxies]
                + (["floor (no jds code)"] if self.floors else []) + ["target (jds, issue 22)", "jds"])
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        lines += ["| " + " | ".join(row) + " |" for row in self.rows]
        return "\n".join(lines)


def _us(seconds: float) -> str:
    return f"{seconds * 1e6:,.0f} µs"


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.2f} ms"


def _ratio_rounds(rounds: dict, name: str, key: str) -> float:
    """Median over rounds of route/direct for ``key``: each ratio compares neighbours in time."""
    pairs = zip(rounds[name], rounds["direct"], strict=False)
    return _median([mine[key] / direct[key] for mine, direct in pairs])


def _above(jds: float, floor: float, unit) -> str:
    """jds's own cost: how far above the floor measured in the same rounds."""
    return f"{'+' if jds >= floor else '−'}{unit(abs(jds - floor))} above the floor, {jds / floor:.2f}×"


def summarise_rest(table: Table, result: dict) -> None:
    rounds = result["rounds"]
    floor = "floor-agent" if "floor-agent" in rounds else None
    direct_p50 = _median([r["p50"] for r in rounds["direct"]])
    cells, cpu_cells, client_cells, p99_cells = {}, {}, {}, {}
    added: dict[str, float] = {}
    cpu: dict[str, float] = {}
    for name in table.proxies + ([floor] if floor else []):
        if name not in rounds:
            continue
        added[name] = _median([m["p50"] - d["p50"] for m, d in zip(rounds[name], rounds["direct"], strict=False)])
        cpu[name] = sum(r["proxy_cpu"] for r in rounds[name]) / sum(r["n"] for r in rounds[name])
        cells[name] = f"{_ms(_median([r['p50'] for r in rounds[name]]))} (+{_us(added[name])})"
        cpu_cells[name] = _us(cpu[name])
        p99_cells[name] = _ms(_median([r["p99"] for r in rounds[name]]))
    for name in ["direct", *table.proxies]:
        if name in rounds:
            client_cells[name] = _us(sum(r["client_cpu"] for r in rounds[name]) / sum(r["n"] for r in rounds[name]))
    met_p50 = met_cpu = None
    if "jds" in added and "chp" in added:
        cells["jds"] += f", {added['jds'] / added['chp']:.2f}× CHP's"
        met_p50 = added["jds"] <= added["chp"]
    if "jds" in cpu and "chp" in cpu:
        cpu_cells["jds"] += f" ({cpu['jds'] / cpu['chp']:.2f}× CHP's"
        cpu_cells["jds"] += f"; {_above(cpu['jds'], cpu[floor], _us)})" if floor else ")"
        met_cpu = cpu["jds"] <= 0.9 * cpu["chp"] and (floor is None or cpu["jds"] <= 1.1 * cpu[floor])
    if floor and "jds" in added:
        cells["jds"] += f"; {_above(added['jds'], added[floor], _us)}"
    table.add("small REST GET p50 (+added)", _ms(direct_p50), cells, "added ≤ 1.0× CHP's", met_p50,
              floor=cells.get(floor, ""))
    table.add("small REST GET p99", _ms(_median([r["p99"] for r in rounds["direct"]])), p99_cells,
              floor=p99_cells.get(floor, ""))
    table.add("proxy CPU per small REST request", "—", cpu_cells, "≤ 0.9× CHP's and ≤ 1.1× the floor", met_cpu,
              floor=cpu_cells.get(floor, ""))
    table.add("client CPU per request (same client)", client_cells.pop("direct"), client_cells,
              "(direct includes the client's TLS)")


def summarise_ws(table: Table, result: dict, nodelay: dict) -> None:
    rounds, errors = result["rounds"], result["errors"]
    if "direct" in errors or not rounds["direct"]:
        table.add("kernel WebSocket: direct failed", errors.get("direct", "no data"), {})
        return
    p50, burst = {}, {}
    met_p50 = None
    floor = "floor-wsrelay" if rounds.get("floor-wsrelay") and "floor-wsrelay" not in errors else None
    for name in table.proxies + ([floor] if floor else []):
        if name in errors or not rounds.get(name):
            p50[name] = burst[name] = f"n/a ({errors.get(name, 'no data')})"
            if name == "jds":
                met_p50 = "n/a"
            continue
        ratio = _ratio_rounds(rounds, name, "p50")
        p50[name] = f"{_ms(_median([r['p50'] for r in rounds[name]]))} ({ratio:.2f}×)"
        rate_ratio = _ratio_rounds(rounds, name, "burst_rate")
        burst[name] = f"{_median([r['burst_rate'] for r in rounds[name]]):,.0f}/s ({rate_ratio:.2f}×)"
        if name == "jds":
            met_p50 = ratio <= 1.15
    table.add("kernel_info round trip p50 (× direct)", _ms(_median([r["p50"] for r in rounds["direct"]])),
              p50, "≤ 1.15×", met_p50, floor=p50.get(floor, ""))
    table.add("100 pipelined kernel_info, msgs/s (× direct)",
              f"{_median([r['burst_rate'] for r in rounds['direct']]):,.0f}/s", burst, floor=burst.get(floor, ""))
    cpu = {name: sum(r["proxy_cpu"] for r in rounds[name]) / sum(r["n"] for r in rounds[name])
           for name in table.proxies + ([floor] if floor else []) if name not in errors and rounds.get(name)}
    cpu_cells = {n: _us(c) for n, c in cpu.items()}
    met_cpu = None
    if "jds" in cpu and "chp" in cpu:
        cpu_cells["jds"] += f" ({cpu['jds'] / cpu['chp']:.2f}× CHP's"
        cpu_cells["jds"] += f"; {_above(cpu['jds'], cpu[floor], _us)})" if floor else ")"
        met_cpu = cpu["jds"] <= 1.3 * cpu["chp"] and (floor is None or cpu["jds"] <= 1.15 * cpu[floor])
    table.add("proxy CPU per kernel_info round trip", "—", cpu_cells, "≤ 1.3× CHP's and ≤ 1.15× the floor",
              met_cpu, floor=cpu_cells.get(floor, ""))
    cells, met = {}, None
    for name, seen in nodelay.items():
        counts = [c for c in seen if c is not None]
        if not counts:
            cells[name] = "cannot inspect"
            continue
        on, total = sum(c[0] for c in counts), sum(c[1] for c in counts)
        cells[name] = f"{on} of {total} sockets"
        if name == "jds":
            met = on == total and total > 0
    table.add("TCP_NODELAY on the proxy's connections", "—", cells, "all", met)


def summarise_transfer(table: Table, result: dict, what: str, ratio_target: float) -> None:
    rounds = result["rounds"]
    cells, mem = {}, {}
    met_rate = met_mem = None
    floor = "floor-agent" if "floor-agent" in rounds else None
    for name in table.proxies + ([floor] if floor else []):
        if name not in rounds:
            continue
        ratio = _ratio_rounds(rounds, name, "mib_s")
        cells[name] = f"{_median([r['mib_s'] for r in rounds[name]]):.0f} MiB/s ({ratio:.2f}×)"
        growth = max(r["peak_growth_kib"] for r in rounds[name])
        mem[name] = f"{growth / 1024:.1f} MiB"
        if name == "jds":
            met_rate, met_mem = ratio >= ratio_target, growth <= 16 * 1024
    direct = f"{_median([r['mib_s'] for r in rounds['direct']]):.0f} MiB/s"
    table.add(f"{what}, throughput (× direct)", direct, cells, f"≥ {ratio_target}×", met_rate,
              floor=cells.get(floor, ""))
    table.add(f"{what}, proxy peak RSS growth (worst round)", "—", mem, "≤ 16 MiB (issue 15)", met_mem,
              floor=mem.get(floor, ""))


def summarise_idle(table: Table, idle: dict, idle_rss: dict, plan: dict) -> None:
    cells, per_socket = {}, {}
    for name, reps in idle.items():
        slopes = [r["slope"] for r in reps if "slope" in r and not r["failures"]]
        failures = [f for r in reps for f in r["failures"]]
        if not slopes:
            cells[name] = f"n/a ({failures[0] if failures else 'no data'})"
            continue
        per_socket[name] = _median(slopes)
        lost = sum(r["lost"] for r in reps)
        cells[name] = (f"{per_socket[name]:.0f} KiB ({', '.join(f'{v:.0f}' for v in slopes)}"
                       f"{f'; {lost} closed by the far end' if lost else ''})")
    met = None
    if "jds" in per_socket and "chp" in per_socket:
        cells["jds"] += f", {per_socket['jds'] / per_socket['chp']:.2f}× CHP's"
        met = per_socket["jds"] <= 0.5 * per_socket["chp"]
    elif "jds" in idle:
        met = "n/a"  # the target is relative to CHP's
    what = (f"proxy RSS per idle kernel WebSocket ({plan['step']} → {plan['step'] * plan['steps']} open, "
            f"median of {plan['reps']} fresh processes)")
    table.add(what, "—", cells, "≤ 0.5× CHP's", met)
    cells = {name: f"{kib / 1024:.1f} MiB" for name, kib in idle_rss.items()}
    floor = idle_rss.get("floor-agent")
    if floor and "jds" in idle_rss:
        cells["jds"] += f" ({_above(idle_rss['jds'], floor, lambda kib: f'{kib / 1024:.1f} MiB')})"
    table.add("proxy RSS at idle", "—", cells, "≤ 52 MiB",
              idle_rss["jds"] <= 52 * 1024 if "jds" in idle_rss else None, floor=cells.get("floor-agent", ""))


def summarise_mixed(table: Table, mixed: dict, many: int) -> None:
    """``mixed[route]``: one ``(1 client, many clients)`` pair of windows per round."""
    direct = mixed.get("direct")
    if not direct:
        return

    def cell(pairs: list, kind: str) -> tuple[str, float | None]:
        errors = [e for one, lots in pairs for e in one["errors"] + lots["errors"]]
        if errors or not all(one[kind] and lots[kind] for one, lots in pairs):
            return f"n/a ({len(errors)} errors: {errors[0] if errors else 'no samples'})", None
        ratio = _median([_p(lots[kind], 0.99) / _p(one[kind], 0.99) for one, lots in pairs])
        p99_one = _median([_p(one[kind], 0.99) for one, _ in pairs])
        p99_lots = _median([_p(lots[kind], 0.99) for _, lots in pairs])
        return f"{_ms(p99_one)} → {_ms(p99_lots)} ({ratio:.1f}×)", ratio

    for kind, label in (("rest", "REST"), ("ws", "kernel_info")):
        cells, met = {}, None
        for name in table.proxies:
            if name not in mixed:
                cells[name] = "n/a (no kernel WebSocket through it, see above)"
                met = "n/a" if name == "jds" else met
                continue
            cells[name], ratio = cell(mixed[name], kind)
            if name == "jds":
                met = ratio is not None and ratio <= 3
        table.add(f"{label} p99, 1 → {many} concurrent clients (× 1 client)", cell(direct, kind)[0], cells,
                  "≤ 3×, no error", met)
    counts = {name: f"{sum(len(lots['rest']) for _, lots in pairs)} + {sum(len(lots['ws']) for _, lots in pairs)}"
              for name, pairs in mixed.items()}
    table.add(f"samples at {many} clients (REST + kernel_info)", counts.pop("direct"), counts)


def start_wan(fleet: Fleet, proxies: dict[str, str | None], delay: float, notebook_bytes: int,
              chp: bool = True, tls_version: str | None = None) -> dict[str, dict]:
    """
    The WAN setup: a hub-like far end (configurable-http-proxy over TLS in front of the server),
    :mod:`benchmarks.delayline` in front of it, and the routes through that link: ``direct`` (the
    IDE over the link), each jds of ``proxies`` (name: its PYTHONPATH) and a local CHP as a prefix
    proxy, both with the link between them and the far end.
    """
    from benchmarks.wan import NOTEBOOK, make_notebook

    (fleet.root_dir / NOTEBOOK).write_text(json.dumps(make_notebook(notebook_bytes)))
    far = fleet.start_chp(name="far-end", tls=True, tls_version=tls_version)
    if far is None:
        raise RuntimeError("the WAN workload needs configurable-http-proxy: run `make test` once (its npm step)")
    far_port = int(far.origin.rsplit(":", 1)[1])
    link = fleet.start_delay_line(far_port, delay)
    routes = {"direct": {**far.as_dict(), "name": "direct", "origin": f"https://127.0.0.1:{link}", "pid": None}}
    for name, pythonpath in proxies.items():
        routes[name] = fleet.start_jds(name=f"wan-{name}", pythonpath=pythonpath, hub_port=link).as_dict()
    if chp:
        local = fleet.start_chp(name="wan-chp", target_port=link)
        if local is not None:
            routes["chp"] = local.as_dict()
    return routes


def summarise_wan(table: Table, result: dict, delay: float) -> None:
    rounds, errors = result["rounds"], result["errors"]
    rtt = f"{2 * delay * 1e3:.0f} ms"
    if not rounds["direct"]:
        table.add(f"WAN ({rtt} RTT): direct failed", "; ".join(errors["direct"][:1]), {})
        return
    for key, what, target in (("first_output", "time to first output", 0.95),
                              ("total", "whole sequence", 0.9)):
        cells, met = {}, None
        for name in table.proxies:
            mine = rounds.get(name) or []
            failed = errors.get(name) or []
            if not mine:
                cells[name] = f"failed {len(failed)} of {len(failed)}: {failed[0] if failed else 'no data'}"
                met = "n/a" if name == "jds" else met
                continue
            ratio = _ratio_rounds(rounds, name, key) if len(mine) == len(rounds["direct"]) else float("nan")
            note = f"; failed {len(failed)} of {len(failed) + len(mine)}: {failed[0]}" if failed else ""
            cells[name] = f"{_ms(_median([r[key] for r in mine]))} ({ratio:.2f}×){note}"
            if name == "jds":
                met = ratio <= target and not failed
        table.add(f"WAN ({rtt} RTT), open a notebook and run a cell after 6 s idle: {what} (× direct)",
                  _ms(_median([r[key] for r in rounds["direct"]])), cells, f"≤ {target}×", met)
    cells = {n: f"{_median([r['connections'] for r in rounds[n]]):.0f}" for n in table.proxies if rounds.get(n)}
    table.add("WAN: new connections the IDE opened per sequence", f"{_median([r['connections'] for r in rounds['direct']]):.0f}",
              cells)


def print_wan_steps(result: dict) -> None:
    """Where each route's WAN sequence spends its time: medians of each step's duration."""
    for name, rounds in result["rounds"].items():
        if rounds:
            steps, before = [], 0.0
            for key in rounds[0]["phases"]:
                end = _median([r["phases"][key] for r in rounds])
                steps.append(f"{key} {(end - before) * 1e3:.0f}")
                before = end
            steps.append(f"PUT {(_median([r['total'] for r in rounds]) - before) * 1e3:.0f}")
            print(f"  WAN steps through {name}, ms (medians): {', '.join(steps)}")


def _machine_busy() -> tuple[float, float]:
    """CPU-seconds the whole machine has been busy, and stolen by the hypervisor, since boot."""
    with open("/proc/stat") as handle:
        fields = [int(v) for v in handle.readline().split()[1:]]
    tick = os.sysconf("SC_CLK_TCK")
    idle = fields[3] + fields[4]
    steal = fields[7] if len(fields) > 7 else 0
    return (sum(fields[:8]) - idle - steal) / tick, steal / tick


def _ours() -> float:
    """CPU-seconds used by this run: this process and every child it has waited for."""
    self_usage = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return self_usage.ru_utime + self_usage.ru_stime + children.ru_utime + children.ru_stime


def _mixed_window(route: dict, token: str, kernels: list[str], clients: int, period: float, duration: float,
                  per_process: int) -> dict:
    """``clients`` clients in processes of ``per_process`` threads, all starting at the same moment."""
    start_at = time.time() + 1.5 + clients / 40  # time to start the processes and open every socket
    jobs = [
        {"workload": "mixed", "route": route, "token": token, "kernels": kernels,
         "threads": min(per_process, clients - first), "first": first, "start_at": start_at,
         "duration": duration, "period": period}
        for first in range(0, clients, per_process)
    ]
    parts = _clients(jobs)
    return {key: sum((p[key] for p in parts), []) for key in ("rest", "ws", "errors")}


def _git_state() -> str:
    try:
        head = subprocess.run(["git", "log", "-1", "--format=%h %s"], cwd=REPO, capture_output=True,
                              text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "jds"], cwd=REPO,
                               capture_output=True, text=True, timeout=10).stdout.split("\n")
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    changed = [line[3:] for line in dirty if line.strip()]
    return head + (f" (+ uncommitted: {', '.join(changed)})" if changed else "")


def _warm(route: dict, token: str) -> None:
    request = urllib.request.Request(f"{route['origin']}{route['prefix']}/api/status",
                                     headers={"Authorization": f"token {token}"})
    with urllib.request.urlopen(request, timeout=30) as response:
        response.read()


def _run_wan(fleet: Fleet, plan: dict, args: argparse.Namespace, table: Table | None) -> dict:
    """The WAN workload on its own processes; with ``table``, print it alone (``--wan-only``)."""
    w = plan["wan"]
    routes = start_wan(fleet, {"jds": args.jds_pythonpath}, w["delay"], w["notebook_bytes"], chp=not args.no_chp)
    result = _client({"workload": "wan", "routes": routes, "token": fleet.token, **w}, timeout=900)
    if table is not None:
        table.proxies = [p for p in table.proxies if p in routes]
        summarise_wan(table, result, w["delay"])
        print(table.render())
        for name, errors in result["errors"].items():
            for error in errors:
                print(f"  {name} failed: {error}")
        print_wan_steps(result)
    return result


def _run_idle(fleet: Fleet, plan: dict, proxies: list[str], kernel: str, step) -> dict[str, list[dict]]:
    """
    Idle kernel sockets, each repetition through a proxy started for it alone (a process that has
    done the other workloads hands their freed memory to the first sockets: CHP's figure moved from
    21 to 178 KiB that way), in rotating order; the same for every proxy.
    """
    idle: dict[str, list[dict]] = {}
    last = plan["step"] * plan["steps"]
    for rep in range(plan["reps"]):
        for name in proxies[rep % len(proxies):] + proxies[: rep % len(proxies)]:
            step(f"{plan['step']} → {last} idle kernel WebSockets through a fresh {name}, "
                 f"{rep + 1} of {plan['reps']}")
            route = fleet.start_jds(name="idle-jds") if name == "jds" else fleet.start_chp(name="idle-chp")
            try:
                _warm(route.as_dict(), fleet.token)
                time.sleep(1)  # start-up's own allocations settle before the first reading
                idle.setdefault(name, []).append(_client({
                    "workload": "idle_sockets", "route": route.as_dict(), "token": fleet.token, "kernel": kernel,
                    **{k: plan[k] for k in ("step", "steps", "settle")}}))
            finally:
                fleet.stop_one(f"idle-{name}")
    return idle


def run(args: argparse.Namespace) -> int:
    plan = PLAN["quick" if args.quick else "full"]
    started = time.monotonic()
    busy_before, steal_before = _machine_busy()
    ours_before = _ours()
    # Files the server serves and saves live in memory when it can: the disk is not under test.
    shm = "/dev/shm"
    in_memory = os.path.isdir(shm) and shutil.disk_usage(shm).free > 2 * plan["download"]["size"] + (1 << 30)
    directory = Path(tempfile.mkdtemp(prefix="jds-bench-", dir=shm if in_memory else None))
    fleet = Fleet(directory)
    failed = True
    print(f"jupyter-dev-server bench: {'quick' if args.quick else 'full'} run in {directory}", flush=True)
    print(f"code: {args.jds_pythonpath or _git_state()}", flush=True)
    try:
        fleet.start_jupyter_server()
        kernels = [fleet.start_kernel() for _ in range(plan["mixed"]["kernels"])]
        _client({"workload": "kernels_ready", "route": fleet.paths["direct"].as_dict(), "token": fleet.token,
                 "kernels": kernels})
        if args.wan_only:
            _run_wan(fleet, plan, args, Table(["jds"] if args.no_chp else ["jds", "chp"]))
            failed = False
            return 0
        if args.via_only:
            table = Table(["jds"])
            via_result = run_via(fleet, plan["via"], kernels[0], _client)
            summarise_via(table, via_result)
            print(table.render())
            if args.json:
                Path(args.json).write_text(json.dumps({"via": via_result, "plan": plan}, indent=1))
            failed = False
            return 0
        fleet.start_jds(pythonpath=args.jds_pythonpath)
        if not args.no_chp and fleet.start_chp() is None:
            print("configurable-http-proxy not installed (run `make test` once): no comparison column")
        proxies = [name for name in ("jds", "chp") if name in fleet.paths]
        routes = {name: route.as_dict() for name, route in fleet.paths.items()}
        floors = {name: route.as_dict() for name, route in start_floors(fleet).items()}
        # Idle: after start-up and one request each (imports done, pools warm), nothing else yet.
        for name in [*proxies, "floor-agent"]:
            _warm({**routes, **floors}[name], fleet.token)
        time.sleep(1)
        idle_rss = {name: snapshot({**routes, **floors}[name]["pid"]).rss_kib for name in [*proxies, "floor-agent"]}
        fleet.make_file("big.bin", plan["download"]["size"])
        common = {"routes": routes, "token": fleet.token, "server_pid": fleet.server_pid}
        with_agent = {**common, "routes": {**routes, "floor-agent": floors["floor-agent"]}}
        with_relay = {**common, "routes": {**routes, "floor-wsrelay": floors["floor-wsrelay"]}}

        def step(label: str) -> None:
            print(f"[{time.monotonic() - started:5.0f} s] {label}", flush=True)

        step("small REST GETs")
        rest = _client({"workload": "rest", **with_agent, **plan["rest"]})
        step("kernel WebSocket round trips and bursts")
        ws = _client({"workload": "kernel_ws", **with_relay, "kernel": kernels[0], **plan["kernel_ws"]})
        step(f"{plan['download']['size'] // MiB} MiB downloads")
        down = _client({"workload": "download", **with_agent, "path": "/files/big.bin", **plan["download"]})
        step(f"{plan['upload']['size'] // MiB} MiB uploads")
        up = _client({"workload": "upload", **common, **plan["upload"]})
        idle = _run_idle(fleet, plan["idle"], proxies, kernels[0], step)
        mixed: dict[str, list[tuple[dict, dict]]] = {}
        m = plan["mixed"]
        ws_ok = [name for name in routes if name not in ws["errors"]]
        for round_no in range(m["rounds"]):
            for name in ws_ok[round_no % len(ws_ok):] + ws_ok[: round_no % len(ws_ok)]:
                windows = []
                for clients, period, duration in ((1, m["one_period"], m["one_duration"]),
                                                  (m["many"], m["many_period"], m["many_duration"])):
                    step(f"{clients} concurrent client(s) through {name}, round {round_no + 1} of {m['rounds']}")
                    windows.append(_mixed_window(routes[name], fleet.token, kernels, clients, period, duration,
                                                 m["per_process"]))
                mixed.setdefault(name, []).append((windows[0], windows[1]))
        end_rss = {name: snapshot(routes[name]["pid"]).rss_kib for name in proxies}
        step(f"WAN: open a notebook and run a cell after {plan['wan']['idle']:.0f} s idle, "
             f"{plan['wan']['rounds']} rounds")
        table = Table(proxies, floors=True)
        wan_result = _run_wan(fleet, plan, args, None)
        step("through an SSH bastion: --via ssh:// against a hand-made ssh -L tunnel")
        via_result = run_via(fleet, plan["via"], kernels[0], _client)

        summarise_rest(table, rest)
        summarise_ws(table, ws, {n: [rest["nodelay"].get(n), ws["nodelay"].get(n)] for n in proxies})
        summarise_transfer(table, down, f"{plan['download']['size'] // MiB} MiB GET /files/", 0.8)
        summarise_transfer(table, up, f"{plan['upload']['size'] // MiB} MiB PUT /api/contents", 0.9)
        summarise_idle(table, idle, idle_rss, plan["idle"])
        summarise_mixed(table, mixed, m["many"])
        summarise_wan(table, wan_result, plan["wan"]["delay"])
        summarise_via(table, via_result)
        table.add("proxy RSS after the whole run", "—",
                  {name: f"{kib / 1024:.1f} MiB" for name, kib in end_rss.items()})
        raw = {"rest": rest, "kernel_ws": ws, "download": down, "upload": up, "idle": idle,
               "idle_rss_kib": idle_rss, "end_rss_kib": end_rss, "mixed": mixed, "wan": wan_result, "via": via_result,
               "plan": plan, "table": table.as_dict()}
        (directory / "results.json").write_text(json.dumps(raw, indent=1))
        if args.json:
            Path(args.json).write_text(json.dumps(raw, indent=1))
        print()
        print(table.render())
        print()
        met = sum(1 for _, ok in table.verdicts if ok)
        print(f"jupyter-dev-server meets {met} of {len(table.verdicts)} targets; "
              f"run took {time.monotonic() - started:.0f} s on {os.cpu_count()} CPUs.")
        for what, ok in table.verdicts:
            if not ok:
                print(f"  not met: {what}")
        for what in table.unmeasured:
            print(f"  not measured: {what} (see the row for why; run again once that is fixed)")
        failed = False
    finally:
        notes = fleet.stop()
        for note in notes:
            print(f"cleanup: {note}")
        busy_after, steal_after = _machine_busy()
        elapsed = time.monotonic() - started
        others = max(0.0, (busy_after - busy_before) - (_ours() - ours_before))
        print(f"other processes on this machine used {others:.0f} CPU-seconds during the run "
              f"({100 * others / (elapsed * (os.cpu_count() or 1)):.0f}% of its capacity); "
              f"the hypervisor stole {steal_after - steal_before:.1f} s. Busy neighbours widen the spread "
              "between rounds; the medians and ratios of interleaved rounds are what to compare.")
        if failed or args.keep:
            (directory / "big.bin").unlink(missing_ok=True)
            (fleet.root_dir / "big.bin").unlink(missing_ok=True)
            print(f"logs kept in {directory}")
        else:
            shutil.rmtree(directory, ignore_errors=True)
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(prog="make bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer rounds and smaller files (~1 min)")
    parser.add_argument("--no-chp", action="store_true", help="leave configurable-http-proxy out")
    parser.add_argument("--keep", action="store_true", help="keep the run directory (logs, results.json)")
    parser.add_argument("--json", metavar="FILE", help="also write the raw results to FILE")
    parser.add_argument("--wan-only", action="store_true", help="run the WAN workload alone (~2 min)")
    parser.add_argument("--via-only", action="store_true",
                        help="run the via workload alone: --via ssh:// against an ssh -L tunnel (~1 min)")
    parser.add_argument("--jds-pythonpath", metavar="DIR",
                        help="benchmark the jds package in DIR (a scratch copy with a change) instead")
    parser.add_argument("--runs", type=int, default=1, metavar="N",
                        help="N full runs one after the other, then each target's spread across them")
    args = parser.parse_args()
    if args.runs > 1 and (args.wan_only or args.via_only):
        parser.error("--runs goes with the full run only")

    def stop(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt  # unwinds into run()'s finally, which stops every process by pid

    signal.signal(signal.SIGTERM, stop)
    if args.runs == 1:
        return run(args)
    # Several full runs, each with its own servers, then their spread (issue 22 asks for three).
    stem = args.json or str(Path(tempfile.gettempdir()) / f"jds-bench-{os.getpid()}")
    paths = []
    for number in range(1, args.runs + 1):
        print(f"\n=== run {number} of {args.runs} ===", flush=True)
        args.json = f"{stem}.run{number}.json"
        paths.append(args.json)
        run(args)
    print(f"\n=== {args.runs} runs ({', '.join(paths)}) ===")
    return spread_main(paths)


if __name__ == "__main__":
    sys.exit(main())
