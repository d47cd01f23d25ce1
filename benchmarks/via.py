"""
The via workload of ``make bench`` (issue 19): the cost of ``--via ssh://`` against what users do by
hand today, an ``ssh -N -L`` TCP tunnel, both through the same bastion on loopback
(``tests/sshd.py``, asyncssh) and the same system ``ssh``, in one run, interleaved round by round.

Two more jupyter-dev-servers: ``via`` reaches the server as ``hub.cluster.invalid`` (which only the
bastion resolves) with ``--via ssh://login-node``; ``tunnel`` reaches it at a local port that a
hand-made ``ssh -N -L 127.0.0.1:PORT:hub.cluster.invalid:PORT login-node`` forwards. The target:
REST p50 and the kernel round trip through ``--via`` within 1.1× of the tunnel's.
"""

from __future__ import annotations

import shutil
import socket
import statistics
from typing import Any

from ssh_bastion import ALIAS, HUB_NAME, SSHBastion

from benchmarks.servers import Fleet, _poll, _Proc

__all__ = ["run_via", "summarise_via"]


def _start_routes(fleet: Fleet) -> dict[str, dict]:
    bastion = SSHBastion(fleet.directory / "bastion").start()
    assert bastion.proc is not None
    fleet.procs.append(_Proc("bastion", bastion.proc, bastion.log_path))
    via = fleet.start_jds(
        name="via", hub_host=HUB_NAME, extra=("--via", bastion.via, "--ssh-command", bastion.ssh_command)
    )
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    tunnel_ssh = fleet._start("ssh-tunnel", [
        "ssh", "-F", str(bastion.config), "-N", "-T", "-o", "BatchMode=yes", "-o", "ExitOnForwardFailure=yes",
        "-L", f"127.0.0.1:{port}:{HUB_NAME}:{fleet.server_port}", ALIAS,
    ])  # fmt: skip

    def forwarding() -> bool | None:
        fleet._check_running(tunnel_ssh)
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return True
        except OSError:
            return None

    _poll(forwarding, 30, "the ssh -L tunnel", tunnel_ssh.log)
    tunnel = fleet.start_jds(name="tunnel", hub_port=port)
    return {"direct": fleet.paths["direct"].as_dict(), "via": via.as_dict(), "tunnel": tunnel.as_dict()}


def run_via(fleet: Fleet, plan: dict, kernel: str, client: Any) -> dict:
    """``client`` runs one load-generator job (``benchmarks.run._client``)."""
    if shutil.which("ssh") is None:
        return {"skipped": "no ssh client on this machine"}
    routes = _start_routes(fleet)
    common = {"routes": routes, "token": fleet.token, "server_pid": fleet.server_pid}
    rest = client({"workload": "rest", **common, "warmup": plan["warmup"], "rounds": plan["rounds"],
                   "requests": plan["requests"]})  # fmt: skip
    ws = client({"workload": "kernel_ws", **common, "kernel": kernel, "warmup": plan["warmup"],
                 "rounds": plan["rounds"], "requests": plan["ws_requests"], "burst": 100, "bursts": 1})  # fmt: skip
    return {"rest": rest, "kernel_ws": ws}


def _compare(rounds: dict) -> tuple[float, float, float]:
    """Median p50 of the via and of the tunnel, and the median of their per-round ratio."""
    via = [r["p50"] for r in rounds["via"]]
    tunnel = [r["p50"] for r in rounds["tunnel"]]
    ratio = statistics.median(v / t for v, t in zip(via, tunnel, strict=False))
    return statistics.median(via), statistics.median(tunnel), ratio


def summarise_via(table: Any, result: dict) -> dict[str, float]:
    """Rows in the ``jds`` column: ``--via ssh://`` against the hand-made tunnel, target ≤ 1.1×."""
    if "skipped" in result:
        table.add("--via ssh:// vs ssh -L tunnel", "—", {"jds": f"not measured: {result['skipped']}"})
        return {}
    ratios: dict[str, float] = {}
    rows = (("rest", "via: small REST GET p50, ssh:// vs ssh -L"), ("kernel_ws", "via: kernel_info round trip p50"))
    for key, what in rows:
        outcome = result[key]
        if outcome.get("errors", {}).get("via") or outcome.get("errors", {}).get("tunnel"):
            table.add(what, "—", {"jds": f"failed: {outcome['errors']}"}, "≤ 1.1× the tunnel's", False)
            continue
        via, tunnel, ratio = _compare(outcome["rounds"])
        direct = statistics.median(r["p50"] for r in outcome["rounds"]["direct"])
        ratios[key] = ratio
        table.add(what, f"{direct * 1e3:.2f} ms",
                  {"jds": f"{via * 1e3:.2f} ms vs {tunnel * 1e3:.2f} ms ({ratio:.2f}×)"},
                  "≤ 1.1× the tunnel's", ratio <= 1.1)  # fmt: skip
    return ratios
