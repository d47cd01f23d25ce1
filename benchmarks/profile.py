"""
Where does the proxy's CPU go on small REST requests? ``python -m benchmarks.profile`` starts the
same TLS jupyter_server and jupyter-dev-server as ``make bench``, drives small GETs through the proxy
from a separate process, and prints the proxy's CPU per request, the functions that use the most CPU
themselves and, inclusively, the code paths of this project and of Twisted that account for it.

Two samplers: ``--sampler cpu`` (default) runs twistd under :mod:`benchmarks.cpusampler`, which
samples per unit of CPU time; ``--sampler py-spy`` attaches py-spy (``pip install py-spy``; needs
ptrace rights) and also writes a flame graph, but samples wall-clock time. ``--pythonpath DIR``
profiles another copy of ``jds`` (a scratch copy with a change under test).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.procfs import snapshot
from benchmarks.servers import REPO, Fleet


def _py_spy() -> str | None:
    for candidate in (Path(sys.executable).parent / "py-spy", Path("/tmp/venv/bin/py-spy")):
        if candidate.exists():
            return str(candidate)
    return shutil.which("py-spy")


def _frame_name(frame: str) -> str:
    """``func (path/to/module.py:12)`` -> ``dir/module.py:func``."""
    func, _, where = frame.partition(" (")
    path = where.rstrip(")").rsplit(":", 1)[0]
    parts = Path(path).parts
    short = "/".join(parts[-2:]) if parts else path
    return f"{short}:{func}"


def summarise(raw: Path, top: int) -> str:
    """Self and inclusive shares of the samples in a collapsed-stacks file."""
    own: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [_frame_name(f) for f in stack.split(";") if f and not f.startswith("process ")]
        if not frames:
            continue
        total += count
        own[frames[-1]] += count
        for name in set(frames):
            inclusive[name] += count
    if not total:
        return "no samples"
    lines = [f"{total} samples", "", "self (the function itself):"]
    lines += [f"  {100 * n / total:5.1f}%  {name}" for name, n in own.most_common(top)]
    lines += ["", "inclusive (the function and what it calls), jds and Twisted only:"]
    interesting = [(name, n) for name, n in inclusive.most_common()
                   if name.startswith(("jds/", "web/", "internet/", "protocols/", "logger/"))]
    lines += [f"  {100 * n / total:5.1f}%  {name}" for name, n in interesting[: top * 2]]
    return "\n".join(lines)


def _job(args: argparse.Namespace, fleet: Fleet, route: dict) -> dict:
    common = {"workload": args.workload, "routes": {"jds": route}, "token": fleet.token}
    if args.workload == "rest":
        return {**common, "warmup": 200, "rounds": 1, "requests": 10**7, "deadline": args.seconds}
    if args.workload == "download":
        fleet.make_file("big.bin", 256 << 20)
        return {**common, "rounds": 6, "path": "/files/big.bin", "size": 256 << 20}
    if args.workload == "upload":
        return {**common, "rounds": 8, "size": 64 << 20}
    return {**common, "kernel": fleet.start_kernel(), "warmup": 20, "rounds": 4, "requests": 500,
            "burst": 100, "bursts": 10}


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.profile", description=__doc__.split("\n\n")[0])
    parser.add_argument("--workload", choices=("rest", "download", "upload", "kernel_ws"), default="rest",
                        help="what to drive through the proxy (default: small REST GETs)")
    parser.add_argument("--seconds", type=float, default=20.0, help="how long to load the proxy (default 20)")
    parser.add_argument("--sampler", choices=("cpu", "py-spy"), default="cpu")
    parser.add_argument("--pythonpath", help="run the jds package found in this directory instead")
    parser.add_argument("--out", help="directory for the stacks (and py-spy's flame graph); default: a new temporary one")
    parser.add_argument("--top", type=int, default=25)
    args = parser.parse_args()
    out = Path(args.out).resolve() if args.out else Path(tempfile.mkdtemp(prefix="jds-profile-out-"))
    out.mkdir(parents=True, exist_ok=True)
    raw = out / "stacks.txt"
    raw.unlink(missing_ok=True)
    spy = _py_spy() if args.sampler == "py-spy" else None
    if args.sampler == "py-spy" and spy is None:
        parser.error("py-spy not found: `pip install py-spy`, or use --sampler cpu")
    launcher = (sys.executable, "-m", "benchmarks.cpusampler", str(raw)) if args.sampler == "cpu" else None
    fleet = Fleet(Path(tempfile.mkdtemp(prefix="jds-profile-")))
    env_path = os.pathsep.join(p for p in (args.pythonpath, str(REPO)) if p)
    try:
        fleet.start_jupyter_server()
        route = fleet.start_jds(pythonpath=env_path if args.sampler == "cpu" else args.pythonpath,
                                launcher=launcher).as_dict()
        job = _job(args, fleet, route)
        before = snapshot(route["pid"])
        client = subprocess.Popen([sys.executable, "-m", "benchmarks.client"], stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, text=True, cwd=REPO,
                                  env=dict(os.environ, PYTHONPATH=str(REPO)))
        client.stdin.write(json.dumps(job))
        client.stdin.close()
        if spy:
            time.sleep(2)  # past the warm-up
            common = [spy, "record", "--pid", str(route["pid"]), "--duration", str(int(args.seconds) - 3),
                      "--rate", "250", "--nonblocking"]
            # Two samplers at once (neither stops the process): text stacks and a flame graph.
            flame = subprocess.Popen([*common, "-o", str(out / "profile.svg")], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
            subprocess.run([*common, "--format", "raw", "-o", str(raw)], check=True,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            flame.wait(30)
        result = json.loads(client.stdout.read())
        client.wait(30)
        after = snapshot(route["pid"])
        if "failed" in result:
            raise RuntimeError(result["failed"])
        cpu, system = after.cpu_since(before), after.system - before.system
        if args.workload == "rest":
            done = result["rounds"]["jds"][0]
            requests = done["n"] + job["warmup"]
            print(f"{done['n'] / done['seconds']:,.0f} requests/s through the proxy, p50 {done['p50'] * 1e6:,.0f} µs; "
                  f"proxy CPU {cpu / requests * 1e6:,.0f} µs per request "
                  f"(system {system / requests * 1e6:,.0f} µs), sampler included")
        else:
            print(f"proxy CPU {cpu:.2f} s (system {system:.2f} s) for: "
                  + json.dumps(result["rounds"]["jds"])[:600])
    finally:
        fleet.stop()  # the CPU sampler writes its stacks when twistd stops
        shutil.rmtree(fleet.directory, ignore_errors=True)
    print(summarise(raw, args.top))
    print(f"\nstacks: {raw}" + (f"\nflame graph: {out / 'profile.svg'}" if spy else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
