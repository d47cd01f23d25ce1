"""
Seeing into a running daemon: what it serves, whether the server is up, and what has passed.

A daemon in the background is otherwise a black box: the IDE says "cannot connect" and the user
cannot tell whether the proxy, the hub or their server is at fault. :class:`Stats` counts what the
local site relays (fed by :mod:`jds.service`, :mod:`jds.errors` and the WebSocket relay),
:class:`StatusResource` answers ``GET /_jds/status`` with it as JSON (behind the local token in
managed mode, like everything else), and ``jupyter-dev-server status``
(:mod:`jds.status_command`, which the daemon does not import) prints it for a person.
"""

from __future__ import annotations

import json
from typing import Any

from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from jds import __version__
from jds.auth import Credentials, needs_local_token
from jds.errors import Refusal, render_refusal
from jds.paths import HubTarget
from jds.stats import Stats

__all__ = ["STATUS_PATH", "StatusResource"]

STATUS_PATH = "/_jds/status"
# The status page must answer promptly even when the hub does not; the state is then "unknown".
STATE_TIMEOUT = 5.0


class StatusResource(Resource):
    """
    ``GET /_jds/status``: the daemon's identity (with the saved ``profile`` it runs, if any, and
    the ``--server-options`` a start sends), the server's state (asked of the hub when this daemon
    holds a hub token, else ``"unknown"``) and :class:`Stats`. Mounted at ``/_jds`` as a leaf; any
    other ``/_jds/...`` path is a JSON 404. Nothing in it is a secret: no token, no proxy password.
    """

    isLeaf = True

    def __init__(
        self,
        stats: Stats,
        target: HubTarget,
        credentials: Credentials,
        api: Any = None,
        reactor: Any = None,
        token_watch: Any = None,
        via: Any = None,
        profile: str | None = None,
        server_options: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.profile = profile
        self.server_options = dict(server_options or {})
        self.via = via
        self.token_watch = token_watch
        self.stats = stats
        self.target = target
        self.credentials = credentials
        self.api = api
        self.reactor = reactor

    def render_GET(self, request: Request) -> bytes | int:
        if request.postpath not in ([b"status"], [b"status", b""]):
            return render_refusal(request, Refusal(
                404,
                f"jupyter-dev-server has no page {request.path.decode('latin-1')}; its status is at {STATUS_PATH}.",
                "not-found",
            ))
        query = request.uri.partition(b"?")[2]
        headers = {name.lower(): values for name, values in request.requestHeaders.getAllRawHeaders()}
        if not self.credentials.check(request.method, query, headers).allowed:
            return render_refusal(
                request, needs_local_token(
                    "jupyter-dev-server status reads the local token from its file.", request.getHost()
                )
            )
        request.setHeader(b"content-type", b"application/json; charset=utf-8")
        request.setHeader(b"cache-control", b"no-store")
        if self.api is None:
            return self.document("unknown")
        d = self.api.server_state()
        if self.reactor is not None:
            d.addTimeout(STATE_TIMEOUT, self.reactor)
        d.addCallbacks(lambda state: state.word, lambda failure: "unknown")
        d.addCallback(lambda word: self._finish(request, self.document(word)))
        return NOT_DONE_YET

    def document(self, server_state: str) -> bytes:
        report = {
            "version": __version__,
            "mode": "managed" if self.credentials.managed else "pass-through",
            "hub": self.target.url,
            "user": self.target.user,
            "server": self.target.server,
            "server_url": self.target.server_url,
            "root": self.target.root,
            "profile": self.profile,
            "server_options": self.server_options,
            "server_state": server_state,
            **({"via": self.via.status()} if self.via is not None else {}),
            **(self.token_watch.report() if self.token_watch is not None else {}),
            **self.stats.snapshot(),
        }
        return json.dumps(report, indent=2).encode("utf-8") + b"\n"

    @staticmethod
    def _finish(request: Request, body: bytes) -> None:
        if request.finished or getattr(request, "_disconnected", False):
            return
        request.setHeader(b"content-length", b"%d" % len(body))
        request.write(body)
        request.finish()
