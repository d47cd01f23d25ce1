"""
jds's own cost per small REST GET, without the hub, TLS or the network: ``python -m benchmarks.localside``
drives ``GET /api/status`` (pass-through, ``Authorization: token``, as ``make bench``) into the daemon's
local side in one process: ``ConnectionLimit`` → ``LocalSite`` (guard, access line to a file) →
``HubProxyResource``, with an agent that answers at once with jupyter_server's headers and body.
``--floor`` runs the same bytes through the ``floor-agent`` program's resource (twisted.web, no jds).

Two measures: CPU per request (``time.process_time``, best of the repeats), and with ``--instructions``
the instructions per request counted by valgrind (``cachegrind``, the difference between two request
counts, so start-up cancels out). Instruction counts do not move with the machine's load, which
makes them the measure of a single change on a shared machine (±1 % between runs); they leave out
what the kernel does (the log file's write, the sockets), and Agent, TLS and the network entirely.
``--pythonpath DIR`` measures another copy of ``jds``.
"""

from __future__ import annotations

import argparse
import io
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REQUEST = (
    b"GET /api/status HTTP/1.1\r\nHost: 127.0.0.1:8000\r\nAccept-Encoding: identity\r\n"
    b"Authorization: token 0123456789abcdef0123456789abcdef\r\n\r\n"
)
BODY = (
    b'{"started": "2026-01-01T00:00:00.000000Z", "last_activity": "2026-01-01T00:00:00.000000Z", '
    b'"connections": 0, "kernels": 0}'
)
# What jupyter_server answers /api/status with (a fresh _xsrf cookie each time: the client sends none).
HEADERS = {
    b"Server": [b"TornadoServer/6.4.1"], b"Content-Type": [b"application/json"],
    b"Date": [b"Sun, 06 Dec 2026 23:00:00 GMT"], b"X-Content-Type-Options": [b"nosniff"],
    b"Content-Security-Policy": [b"frame-ancestors 'self'; report-uri /user/alice/api/security/csp-report"],
    b"Etag": [b'"0123456789abcdef0123456789abcdef01234567"'], b"Content-Length": [b"%d" % len(BODY)],
    b"Set-Cookie": [b"_xsrf=2|aabbccdd|00112233445566778899aabbccddeeff|1765000000; "
                    b"expires=Tue, 05 Jan 2027 23:00:00 GMT; Path=/user/alice/"],
}


def _driver(floor: bool, log_path: Path):
    """A function that serves one request, with everything set up as the daemon sets it up."""
    sys.stdout = io.TextIOWrapper(open(log_path, "wb", buffering=0), write_through=True)  # noqa: SIM115
    from twisted.internet import reactor
    from twisted.internet.address import IPv4Address
    from twisted.internet.defer import succeed
    from twisted.internet.testing import StringTransport
    from twisted.logger import globalLogBeginner
    from twisted.python.failure import Failure
    from twisted.web.client import ResponseDone
    from twisted.web.http_headers import Headers
    from twisted.web.iweb import IResponse
    from zope.interface import implementer

    from jds.auth import Credentials
    from jds.connections import ConnectionLimit
    from jds.guard import Limits, LocalGuard
    from jds.hub import HubAPI, ServerStarter
    from jds.logs import text_observer_for
    from jds.paths import HubTarget
    from jds.site import build_site
    from jds.tls import HubTLSPolicy

    globalLogBeginner.beginLoggingTo([text_observer_for({"nodaemon": True})], redirectStandardIO=False)

    class Upstream:
        def pauseProducing(self) -> None:
            pass

        def resumeProducing(self) -> None:
            pass

        def stopProducing(self) -> None:
            pass

    @implementer(IResponse)
    class Answer:
        version, code, phrase, request, previousResponse = (b"HTTP", 1, 1), 200, b"OK", None, None

        def __init__(self) -> None:
            self.headers, self.length = Headers(HEADERS), len(BODY)

        def deliverBody(self, protocol) -> None:  # noqa: N802
            protocol.makeConnection(Upstream())
            protocol.dataReceived(BODY)
            protocol.connectionLost(Failure(ResponseDone()))

        def setPreviousResponse(self, response) -> None:  # noqa: N802
            pass

    class AnsweringAgent:
        def request(self, method, uri, headers=None, bodyProducer=None):  # noqa: N803
            return succeed(Answer())

    agent = AnsweringAgent()
    target = HubTarget(host="127.0.0.1", port=8443, user="alice", tls_name="hub.jds.test")
    if floor:
        from benchmarks.floors import minimal_proxy_site

        factory = minimal_proxy_site(agent, b"https://hub.jds.test:8443/user/alice")
    else:
        policy = HubTLSPolicy(reactor, target.host, target.port, target.verify_name, None)
        guard, limits = LocalGuard.build([], []), Limits()
        site = build_site(target, policy, reactor, Credentials(), ServerStarter(HubAPI(agent, target, None), reactor),
                          guard=guard, limits=limits)
        site.resource.proxy.agent = agent
        guard.listening("127.0.0.1", 8000)
        factory = ConnectionLimit(site, limits.connections_per_client, limits.connections)
    peer = IPv4Address("TCP", "127.0.0.1", 50000)
    connection = factory.buildProtocol(peer)
    transport = StringTransport(hostAddress=IPv4Address("TCP", "127.0.0.1", 8000), peerAddress=peer)
    connection.makeConnection(transport)

    def serve(count: int) -> None:
        for _ in range(count):
            connection.dataReceived(REQUEST)
            reactor.runUntilCurrent()  # a reactor turn: due timers run, cancelled ones are cleared
            transport.clear()

    connection.dataReceived(REQUEST)
    if not transport.value().startswith(b"HTTP/1.1 200 "):
        raise RuntimeError(f"the local side did not answer 200: {transport.value()[:300]!r}")
    transport.clear()
    return serve


def _run(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory(prefix="jds-localside-") as scratch:
        serve = _driver(args.floor, Path(scratch) / "access.log")
        import jds

        if not args.serve_only:
            sys.__stdout__.write(f"jds from {Path(jds.__file__).parent}\n")
        serve(200)
        import gc

        gc.collect()
        gc.freeze()  # what start-up left is not the requests' garbage
        if args.serve_only:
            serve(args.requests)
            return
        best = []
        for _ in range(args.repeats):
            began = time.process_time()
            serve(args.requests)
            best.append((time.process_time() - began) / args.requests * 1e6)
        sys.__stdout__.write(f"{min(best):.1f} µs CPU per request (best of {args.repeats} × {args.requests}; "
                             f"median {sorted(best)[len(best) // 2]:.1f})\n")


def _instructions(args: argparse.Namespace) -> int:
    """Instructions per request: cachegrind's total for 3N requests minus that for N, over 2N."""
    def total(count: int) -> int:
        command = ["valgrind", "--tool=cachegrind", "--cache-sim=no", "--cachegrind-out-file=/dev/null",
                   sys.executable, "-m", "benchmarks.localside", "--serve-only", "--requests", str(count),
                   *(["--floor"] if args.floor else []), *(["--pythonpath", args.pythonpath] if args.pythonpath else [])]
        env = dict(os.environ, PYTHONHASHSEED="0")
        done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=Path(__file__).parent.parent)
        found = re.search(r"I\s+refs:\s+([\d,]+)", done.stderr)
        if found is None:
            raise RuntimeError(f"valgrind said no instruction count:\n{done.stderr[-2000:]}")
        return int(found.group(1).replace(",", ""))

    count = args.requests
    return (total(3 * count) - total(count)) // (2 * count)


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.localside", description=__doc__.split("\n\n")[0])
    parser.add_argument("--floor", action="store_true", help="the floor-agent program's resource instead of jds")
    parser.add_argument("--pythonpath", help="measure the jds package found in this directory")
    parser.add_argument("--requests", type=int, default=5000)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--instructions", action="store_true", help="count instructions with valgrind instead")
    parser.add_argument("--serve-only", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.pythonpath:
        sys.path.insert(0, str(Path(args.pythonpath).resolve()))  # before this checkout's own jds
    if args.instructions:
        if args.requests == 5000:
            args.requests = 500  # valgrind runs Python some 60 times slower
        print(f"{_instructions(args):,} instructions per request")
        return 0
    _run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
