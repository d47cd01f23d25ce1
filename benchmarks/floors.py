"""
What the stack itself costs, without jupyter-dev-server: ``python -m benchmarks.floors`` runs the
small-REST workload (as ``make bench`` does) direct, through three minimal Twisted programs and
through jds, and prints added p50 and CPU per request for each:

- ``static``: twisted.web answering a small JSON body itself (no hub, no access log): the cost of
  twisted.web's request handling alone;
- ``forwarder``: plain TCP in, pinned TLS (pyOpenSSL) out, bytes copied both ways with no HTTP
  parsing at all: the floor of *any* Twisted + pyOpenSSL proxy;
- ``agent``: twisted.web + ``Agent`` over a pooled, pinned TLS endpoint, with no header mapping and
  no log: the floor of the architecture jds uses for REST;
- ``wsrelay``: an autobahn WebSocket server on plain TCP whose every connection opens an autobahn
  client over pinned TLS to the same path and relays each message as it is (no twisted.web, no jds
  code): the floor of the kernel WebSocket relay.

``make bench`` runs ``agent`` and ``wsrelay`` beside jds in the same rounds (:func:`start_floors`) and
prints jds's cost above them. ``python -m benchmarks.floors serve KIND PORT CA`` runs one of them.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from benchmarks.servers import Fleet, Route

# The floor processes import only what their stack needs, as the daemon does: their idle RSS is the
# floor of jds's, so nothing of the harness (trustme, the test helpers) is imported at module level.
TLS_NAME = "hub.jds.test"  # benchmarks.servers.TLS_NAME

_BODY = b'{"started": "2026-01-01T00:00:00.000000Z", "last_activity": "x", "connections": 0, "kernels": 1}'


def serve(kind: str, upstream_port: int, ca: str) -> None:
    from twisted.internet import reactor
    from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
    from twisted.internet.protocol import Factory, Protocol
    from twisted.internet.ssl import Certificate, optionsForClientTLS
    from twisted.web.client import Agent, HTTPConnectionPool, _HTTP11ClientFactory
    from twisted.web.resource import Resource
    from twisted.web.server import Site

    options = optionsForClientTLS(TLS_NAME, Certificate.loadPEM(Path(ca).read_bytes()))
    endpoint = wrapClientTLS(options, HostnameEndpoint(reactor, "127.0.0.1", upstream_port))

    class Static(Resource):
        isLeaf = True

        def render_GET(self, request):  # noqa: N802
            request.setHeader(b"content-type", b"application/json")
            return _BODY

    class Quiet(_HTTP11ClientFactory):
        noisy = False

    class OneEndpoint:
        def endpointForURI(self, uri):  # noqa: N802
            return endpoint

    pool = HTTPConnectionPool(reactor)
    pool._factory = Quiet
    pool.maxPersistentPerHost = 16
    agent = Agent.usingEndpointFactory(reactor, OneEndpoint(), pool=pool)
    origin = b"https://%s:%d/user/alice" % (TLS_NAME.encode(), upstream_port)

    class Upstream(Protocol):
        def __init__(self, down) -> None:
            self.down = down

        def connectionMade(self) -> None:  # noqa: N802
            self.down.up = self
            for data in self.down.pending:
                self.transport.write(data)

        def dataReceived(self, data: bytes) -> None:  # noqa: N802
            self.down.transport.write(data)

        def connectionLost(self, reason=None) -> None:  # noqa: N802
            self.down.transport.loseConnection()

    class Downstream(Protocol):
        up = None

        def connectionMade(self) -> None:  # noqa: N802
            self.pending: list[bytes] = []
            self.transport.setTcpNoDelay(True)
            endpoint.connect(Factory.forProtocol(lambda: Upstream(self)))

        def dataReceived(self, data: bytes) -> None:  # noqa: N802
            if self.up is None:
                self.pending.append(data)
            else:
                self.up.transport.write(data)

        def connectionLost(self, reason=None) -> None:  # noqa: N802
            if self.up is not None:
                self.up.transport.loseConnection()

    if kind == "forwarder":
        factory = Factory.forProtocol(Downstream)
    elif kind == "wsrelay":
        factory = _ws_relay_factory(reactor, endpoint, upstream_port)
    elif kind == "static":
        factory = Site(Static())
        factory.log = lambda request: None
    else:
        factory = minimal_proxy_site(agent, origin)
    factory.noisy = False
    port = reactor.listenTCP(0, factory, interface="127.0.0.1")
    print(f"http://127.0.0.1:{port.getHost().port}/", flush=True)
    reactor.run()


def minimal_proxy_site(agent, origin: bytes):
    """
    The ``agent`` floor's site: twisted.web relaying every request to ``origin`` + its URI through
    ``agent``, the Authorization header only, the answer's headers as they come, no access log
    (``benchmarks.localside --floor`` uses it with an agent that answers at once).
    """
    from twisted.internet.protocol import Protocol
    from twisted.web.http_headers import Headers
    from twisted.web.resource import Resource
    from twisted.web.server import NOT_DONE_YET, Site

    class Relay(Protocol):
        def __init__(self, request) -> None:
            self.request = request

        def dataReceived(self, data: bytes) -> None:  # noqa: N802
            self.request.write(data)

        def connectionLost(self, reason=None) -> None:  # noqa: N802
            self.request.finish()

    class MinimalProxy(Resource):
        isLeaf = True

        def render(self, request):
            headers = Headers({b"authorization": request.requestHeaders.getRawHeaders(b"authorization") or []})

            def relay(response):
                request.setResponseCode(response.code)
                for name, values in response.headers.getAllRawHeaders():
                    if name.lower() not in (b"content-length", b"connection", b"transfer-encoding"):
                        request.responseHeaders.setRawHeaders(name, values)
                response.deliverBody(Relay(request))

            agent.request(request.method, origin + request.uri, headers).addCallback(relay)
            return NOT_DONE_YET

    site = Site(MinimalProxy())
    site.log = lambda request: None
    return site


def _ws_relay_factory(reactor, endpoint, upstream_port: int):
    """
    The autobahn pair, relaying frame by frame with autobahn's own streaming API (as jds relays, but
    with none of its code): the IDE's side answers its handshake only once the hub's side is open.
    """
    from urllib.parse import urlencode

    from autobahn.twisted.websocket import (
        WebSocketClientFactory,
        WebSocketClientProtocol,
        WebSocketServerFactory,
        WebSocketServerProtocol,
    )
    from twisted.internet.defer import Deferred

    options = {"openHandshakeTimeout": 30, "closeHandshakeTimeout": 5, "tcpNoDelay": True,
               "maxFramePayloadSize": 0, "maxMessagePayloadSize": 0}

    class Frames:
        """Each frame goes on as it arrives; a message that comes before the peer is open is held whole."""

        peer = None
        held: list | None = None

        def connectionMade(self) -> None:  # noqa: N802
            self.transport.setTcpNoDelay(True)  # autobahn's own tcpNoDelay is read before it is configured
            self.early: list = []
            super().connectionMade()

        def onOpen(self) -> None:  # noqa: N802
            for payload, is_binary in self.early:
                self.sendMessage(payload, is_binary)
            self.early.clear()

        def onMessageBegin(self, is_binary: bool) -> None:  # noqa: N802
            self.is_binary = is_binary
            if self.peer is not None and self.peer.state == self.peer.STATE_OPEN:
                self.held = None
                self.peer.beginMessage(isBinary=is_binary)
            else:
                self.held = []

        def onMessageFrameBegin(self, length: int) -> None:  # noqa: N802
            if self.held is None:
                self.peer.beginMessageFrame(length)

        def onMessageFrameData(self, payload: bytes) -> None:  # noqa: N802
            if self.held is None:
                self.peer.sendMessageFrameData(payload)
            else:
                self.held.append(payload)

        def onMessageFrameEnd(self) -> None:  # noqa: N802
            pass

        def onMessageEnd(self) -> None:  # noqa: N802
            if self.held is None:
                self.peer.endMessage()
            else:
                self.peer.early.append((b"".join(self.held), self.is_binary))

        def onClose(self, was_clean, code, reason) -> None:  # noqa: N802
            if self.peer is not None:
                self.peer.sendClose()

    class HubSide(Frames, WebSocketClientProtocol):
        def onOpen(self) -> None:  # noqa: N802
            super().onOpen()
            self.factory.opened.callback(self)

        def onClose(self, was_clean, code, reason) -> None:  # noqa: N802
            if not self.factory.opened.called:
                self.factory.opened.errback(ConnectionError(reason or "hub refused"))
            super().onClose(was_clean, code, reason)

    class IdeSide(Frames, WebSocketServerProtocol):
        def onConnect(self, request):  # noqa: N802
            query = urlencode({k: v[0] for k, v in request.params.items()})
            hub = WebSocketClientFactory(f"wss://{TLS_NAME}:{upstream_port}{request.path}?{query}",
                                         protocols=request.protocols,
                                         headers={"Authorization": request.headers.get("authorization", "")})
            hub.setProtocolOptions(**options)
            hub.protocol, hub.noisy, hub.opened = HubSide, False, Deferred()
            endpoint.connect(hub).addCallback(self._pair).addErrback(hub.opened.errback)

            def chosen(side):
                return side.websocket_protocol_in_use

            return hub.opened.addCallback(chosen)

        def _pair(self, side) -> None:
            self.peer, side.peer = side, self

    factory = WebSocketServerFactory()
    factory.protocol = IdeSide
    factory.setProtocolOptions(webStatus=False, **options)
    return factory


def start_floors(fleet: Fleet, kinds: tuple[str, ...] = ("agent", "wsrelay")) -> dict[str, Route]:
    """Start each floor in front of ``fleet``'s server as a route named ``floor-KIND``."""
    import re

    from benchmarks.servers import REPO, Route, _poll

    started = {}
    for kind in kinds:
        prefix = "" if kind in ("static", "agent") else "/user/alice"
        name = f"floor-{kind}"
        proc = fleet._start(name, [sys.executable, "-m", "benchmarks.floors", "serve", kind,
                                   str(fleet.server_port), str(fleet.ca_path)], {"PYTHONPATH": str(REPO)})

        def listening(proc=proc) -> int | None:
            found = re.search(r"127\.0\.0\.1:(\d+)/", proc.log.read_text())
            return int(found.group(1)) if found else None

        port = _poll(listening, 20, f"the {kind} floor to listen", proc.log)
        started[name] = fleet.paths[name] = Route(name, f"http://127.0.0.1:{port}", prefix, proc.popen.pid, None)
    return started


def main() -> int:
    if sys.argv[1:2] == ["serve"]:
        serve(sys.argv[2], int(sys.argv[3]), sys.argv[4])
        return 0
    import json
    import os
    import shutil
    import statistics
    import subprocess
    import tempfile

    from benchmarks.servers import REPO, Fleet
    fleet = Fleet(Path(tempfile.mkdtemp(prefix="jds-floors-")))
    try:
        fleet.start_jupyter_server()
        start_floors(fleet, ("static", "forwarder", "agent"))
        fleet.start_jds()
        routes = {name: route.as_dict() for name, route in fleet.paths.items()}
        job = {"workload": "rest", "routes": routes, "token": fleet.token, "warmup": 100, "rounds": 7,
               "requests": 500}
        done = subprocess.run([sys.executable, "-m", "benchmarks.client"], input=json.dumps(job), text=True,
                              capture_output=True, cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO)))
        rounds = json.loads(done.stdout)["rounds"]
        print("| path | p50 | added p50 | CPU per request (system) |\n|---|---|---|---|")
        for name, results in rounds.items():
            p50 = statistics.median(r["p50"] for r in results)
            added = statistics.median(r["p50"] - d["p50"] for r, d in zip(results, rounds["direct"], strict=True))
            n = sum(r["n"] for r in results)
            cpu = (f"{sum(r['proxy_cpu'] for r in results) / n * 1e6:,.0f} µs "
                   f"({sum(r['proxy_sys'] for r in results) / n * 1e6:,.0f} µs)") if "proxy_cpu" in results[0] else "—"
            print(f"| {name} | {p50 * 1e6:,.0f} µs | {added * 1e6:+,.0f} µs | {cpu} |")
    finally:
        fleet.stop()
        shutil.rmtree(fleet.directory, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
