"""
``python -m benchmarks.ab --variant NAME=DIR [--variant ...]``: the committed ``jds`` against scratch
copies with a change, every one in front of the same jupyter_server and measured round by round in
the same run, so a change is judged against its neighbours in time rather than against another day's
table. ``make bench`` answers "are the targets met"; this answers "did this change help".
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.floors import start_floors
from benchmarks.procfs import snapshot
from benchmarks.run import (
    PLAN,
    MiB,
    Table,
    _client,
    _median,
    _warm,
    print_wan_steps,
    start_wan,
    summarise_rest,
    summarise_transfer,
    summarise_wan,
    summarise_ws,
)
from benchmarks.servers import Fleet

WORKLOADS = ("rest", "kernel_ws", "download", "upload", "wan")


def _cpu_row(table: Table, result: dict, what: str) -> None:
    cells = {}
    for name in table.proxies:
        rounds = result["rounds"].get(name)
        if rounds:
            cells[name] = f"{_median([r['proxy_cpu'] for r in rounds]):.3f} s"
    table.add(f"{what}, proxy CPU per transfer (median)", "—", cells)


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.ab", description=__doc__)
    parser.add_argument(
        "--variant",
        action="append",
        default=[],
        metavar="NAME=DIR",
        help="a directory holding a changed copy of the jds package",
    )
    parser.add_argument("--only", action="append", choices=WORKLOADS, help="run just these workloads")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--wan-tls", metavar="VERSION", help="the WAN far end speaks only this, e.g. TLSv1_2")
    parser.add_argument("--download-mib", type=int, default=256)
    parser.add_argument("--upload-mib", type=int, default=64)
    parser.add_argument("--references", action="store_true",
                        help="also configurable-http-proxy and the twisted.web + Agent floor, in the same rounds "
                             "(for rest and download: the floor relays no WebSocket)")
    args = parser.parse_args()
    variants = dict(v.split("=", 1) for v in args.variant)
    only = set(args.only or WORKLOADS)
    directory = Path(
        tempfile.mkdtemp(prefix="jds-ab-", dir="/dev/shm" if Path("/dev/shm").is_dir() else None)
    )
    fleet = Fleet(directory)
    try:
        fleet.start_jupyter_server()
        kernel = fleet.start_kernel()
        _client(
            {
                "workload": "kernels_ready",
                "route": fleet.paths["direct"].as_dict(),
                "token": fleet.token,
                "kernels": [kernel],
            }
        )
        fleet.start_jds()
        for name, path in variants.items():
            fleet.start_jds(name=name, pythonpath=path)
        if args.references:
            fleet.start_chp()
            start_floors(fleet, ("agent",))
        proxies = ["jds", *variants, *(["chp"] if "chp" in fleet.paths else [])]
        routes = {name: route.as_dict() for name, route in fleet.paths.items()}
        for name in [*proxies, *(["floor-agent"] if "floor-agent" in routes else [])]:
            _warm(routes[name], fleet.token)
        time.sleep(1)  # let start-up garbage settle before reading idle RSS
        table = Table(proxies, floors="floor-agent" in routes)
        table.add(
            "proxy RSS at idle",
            "—",
            {n: f"{snapshot(routes[n]['pid']).rss_kib / 1024:.1f} MiB" for n in proxies},
        )
        common = {
            "routes": routes,
            "token": fleet.token,
            "server_pid": fleet.server_pid,
            "rounds": args.rounds,
        }
        if "rest" in only:
            summarise_rest(table, _client({"workload": "rest", **PLAN["full"]["rest"], **common}))
        if "kernel_ws" in only:
            ws = _client({"workload": "kernel_ws", **PLAN["full"]["kernel_ws"], **common, "kernel": kernel})
            summarise_ws(table, ws, {})
        if "download" in only:
            fleet.make_file("big.bin", args.download_mib * MiB)
            down = _client(
                {"workload": "download", **common, "path": "/files/big.bin", "size": args.download_mib * MiB}
            )
            summarise_transfer(table, down, f"{args.download_mib} MiB GET", 0.75)
            _cpu_row(table, down, f"{args.download_mib} MiB GET")
        if "upload" in only:
            up = _client({"workload": "upload", **common, "size": args.upload_mib * MiB})
            summarise_transfer(table, up, f"{args.upload_mib} MiB PUT", 0.85)
            _cpu_row(table, up, f"{args.upload_mib} MiB PUT")
        if "wan" in only:
            w = dict(PLAN["full"]["wan"], rounds=args.rounds)
            wan_routes = start_wan(fleet, {"jds": None, **variants}, w["delay"], w["notebook_bytes"], chp=False,
                                   tls_version=args.wan_tls)
            wan = _client({"workload": "wan", "routes": wan_routes, "token": fleet.token, **w}, timeout=900)
            summarise_wan(table, wan, w["delay"])
            for name, errors in wan["errors"].items():
                for error in errors:
                    print(f"WAN, {name} failed: {error}")
            print_wan_steps(wan)
        print(table.render())
    finally:
        for note in fleet.stop():
            print(f"cleanup: {note}", file=sys.stderr)
        shutil.rmtree(directory, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
