"""
What the proxy knows about JupyterHub itself: how a stopped server shows in the hub's answers, how
to ask for the server's state, and how to start it and follow its progress.

The original tool's users restarted servers by hand after a cryptic redirect or 503. Here a request
that meets a stopped server waits while the proxy starts it (one spawn, however many requests wait)
and is then replayed, so the IDE only sees a slow first answer.
"""

from __future__ import annotations

import io
import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from twisted.internet.defer import CancelledError, Deferred, inlineCallbacks, succeed
from twisted.internet.protocol import Protocol
from twisted.internet.task import deferLater
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import FileBodyProducer, readBody
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgent, IResponse

from jds.hublink import HubLink
from jds.hubversions import DEAD_TOKEN_CODES, LOGIN_PAGES, STOPPED_SERVER_CODES
from jds.paths import HubTarget, escape_name
from jds.profiles import describe_server_options
from jds.refusal import Refusal

log = Logger(namespace="jds.hub")

__all__ = [
    "HubAPI", "Progress", "ServerStarter", "ServerState", "looks_stopped", "may_be_dead_token", "server_not_running",
]

# Hub answers that mean "the server is not running here", before any confirmation: a redirect to the
# spawn pages, or one of STOPPED_SERVER_CODES (which differ by release, see jds.hubversions); a stopped
# *named* server's paths fall through to the default server, which says 404.
_REDIRECT_CODES = {301, 302, 303, 307}


def _location_path(location: bytes) -> bytes:
    """The path of a Location header, absolute or not, without its query."""
    path = location.split(b"?", 1)[0]
    if b"://" in path:
        path = b"/" + path.split(b"://", 1)[1].partition(b"/")[2]
    return path


def may_be_dead_token(code: int, location: bytes | None, target: HubTarget) -> bool:
    """
    Whether the answer is what a user's server gives a token the hub no longer takes (a 401/403, or
    on a page a redirect into the hub's login): then ask the hub whether the token still works.
    """
    if code in DEAD_TOKEN_CODES:
        return True
    if code not in _REDIRECT_CODES or not location:
        return False
    path = _location_path(location)
    return any(path == f"{target.base}{page}".encode("ascii") for page in LOGIN_PAGES)


def looks_stopped(code: int, location: bytes | None, target: HubTarget) -> bool | None:
    """
    ``True`` if the hub's answer certainly means the server is stopped or starting, ``None`` if it
    might (a 405, 424 or 503 also happens for other reasons: ask the hub's API), ``False`` if not.
    """
    if code in _REDIRECT_CODES and location:
        hub = f"{target.base}hub/".encode("ascii")
        user = escape_name(target.user).encode("ascii")
        path = _location_path(location)
        for stem in (b"user/", b"spawn-pending/", b"spawn/"):
            if path.startswith(hub + stem + user + b"/") or path == hub + stem + user:
                return True
        return False
    if code in STOPPED_SERVER_CODES or (code == 404 and target.server):
        return None
    return False


def server_not_running(target: HubTarget, no_spawn: bool = False) -> Refusal:
    """
    The one wording for a stopped server the proxy will not start: without a hub token (it
    could, given ``--token-file``) or because of ``--no-spawn``.
    """
    if no_spawn:
        message = (
            f"Your server at {target.server_url} is not running, and this proxy was started with "
            f"--no-spawn. Start it at {target.url}hub/home, then retry."
        )
    else:
        message = (
            f"Your server at {target.server_url} is not running. Start it at {target.url}hub/home, "
            "or run jupyter-dev-server with --token-file so that it starts the server itself."
        )
    return Refusal(503, message, "server-not-running")


@dataclass(frozen=True)
class ServerState:
    ready: bool
    pending: str | None

    @property
    def word(self) -> str:
        if self.ready:
            return "running"
        if self.pending:
            return f"pending {self.pending}"
        return "stopped"


@dataclass
class Progress:
    percent: int | None = None
    message: str = ""
    ready: bool = False
    failed: bool = False


class _EventStream(Protocol):
    """Reads a ``text/event-stream`` and calls ``on_event`` with each ``data:`` JSON object."""

    def __init__(self, on_event: Callable[[dict[str, Any]], None], done: Deferred) -> None:
        self._buffer = b""
        self._on_event = on_event
        self._done = done

    def dataReceived(self, data: bytes) -> None:
        self._buffer += data
        while b"\n" in self._buffer:
            line, self._buffer = self._buffer.split(b"\n", 1)
            line = line.rstrip(b"\r")
            if line.startswith(b"data:"):
                try:
                    event = json.loads(line[5:].strip())
                except ValueError:
                    continue
                if isinstance(event, dict):
                    self._on_event(event)

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        if not self._done.called:
            self._done.callback(None)


class HubAPI:
    """
    The few hub REST calls the proxy makes, all over the pinned hub client (:mod:`jds.hubclient`)
    with a token of the user's: the one the proxy holds (managed mode), or the one an IDE's request
    carried (pass-through, :meth:`with_token`). ``holder`` names it in error messages. Each call reports
    to ``link``, when given, as the proxy's requests do: a spawn or token check that cannot reach the
    hub is an outage.
    """

    def __init__(
        self,
        agent: IAgent,
        target: HubTarget,
        hub_token: str | None,
        holder: str = "this proxy holds",
        user_options: dict[str, Any] | None = None,
        link: HubLink | None = None,
    ) -> None:
        self.agent = agent
        self.link = link
        self.target = target
        self._token = hub_token
        self.holder = holder
        # --server-options: what a spawn form would have sent, for every start in either mode
        self.user_options = dict(user_options or {})

    @property
    def has_token(self) -> bool:
        return bool(self._token)

    def with_token(self, token: str) -> HubAPI:
        """The same calls with the token an IDE's request carried."""
        return HubAPI(
            self.agent, self.target, token, holder="the IDE sent", user_options=self.user_options, link=self.link
        )

    def _url(self, path: str) -> bytes:
        return f"https://{self.target.netloc}{self.target.base}hub/api/{path}".encode("ascii")

    def _server_path(self) -> str:
        user = escape_name(self.target.user)
        if self.target.server:
            return f"users/{user}/servers/{escape_name(self.target.server)}"
        return f"users/{user}/server"

    def request(self, method: bytes, path: str, body: object = None) -> Deferred:
        headers = Headers(
            {
                b"Authorization": [b"token " + (self._token or "").encode()],
                b"Accept": [b"application/json"],
                b"Host": [self.target.netloc.encode("ascii")],
            }
        )
        producer = None
        if body is not None:
            headers.setRawHeaders(b"Content-Type", [b"application/json"])
            producer = FileBodyProducer(io.BytesIO(json.dumps(body).encode("utf-8")))
        call = self.agent.request(method, self._url(path), headers, producer)
        return call if self.link is None else self.link.watch(call)

    @inlineCallbacks
    def json(self, method: bytes, path: str, body: object = None):
        response: IResponse = yield self.request(method, path, body)
        body = yield readBody(response)
        try:
            document = json.loads(body) if body else None
        except ValueError:
            document = None
        return response.code, document

    def token_accepted(self) -> Deferred:
        """Fires with ``False`` when the hub refuses the token outright (expired, revoked)."""
        return self.request(b"GET", "user").addCallback(_drain_code).addCallback(lambda code: code not in (401, 403))

    @inlineCallbacks
    def server_state(self):
        code, user = yield self.json(b"GET", f"users/{escape_name(self.target.user)}")
        if code != 200 or not isinstance(user, dict):
            yield self._refused(code, user, "read your server's state")
        server = (user.get("servers") or {}).get(self.target.server)
        if not server:
            return ServerState(ready=False, pending=None)
        return ServerState(ready=bool(server.get("ready")), pending=server.get("pending"))

    @inlineCallbacks
    def server_model(self):
        """The hub's model of the server, stopped or not (``None`` if it has none): its ``user_options``."""
        code, user = yield self.json(b"GET", f"users/{escape_name(self.target.user)}?include_stopped_servers=1")
        if code != 200 or not isinstance(user, dict):
            yield self._refused(code, user, "read your server's state")
        model = (user.get("servers") or {}).get(self.target.server)
        return model if isinstance(model, dict) else None

    @inlineCallbacks
    def start(self):
        """
        The hub's answer code once it accepted (201 started, 202 pending, 400 already running or
        stopping). The body is the user_options themselves: JupyterHub 6 reads a body without its
        own fields that way, and older releases only that way; no body lets the hub reuse the
        options of the server's last start.
        """
        code, body = yield self.json(b"POST", self._server_path(), self.user_options or None)
        said = body.get("message", "") if isinstance(body, dict) else ""
        if code in (201, 202) or code == 400 and ("already running" in said or " is pending " in said):
            return code
        if code in (400, 422, 500) and said:
            raise options_refusal(said, self.user_options)
        yield self._refused(code, body, "start your server")

    @inlineCallbacks
    def _refused(self, code: int, body: object, what: str):
        """Raise the error for a refused API call; a 401/403 is either a dead token or a missing scope."""
        token_dead = code in (401, 403) and not (yield self.token_accepted())
        raise _api_refusal(401 if token_dead else code, body, self.target, what, self.holder)

    def follow_progress(self, on_event: Callable[[dict[str, Any]], None]) -> Deferred:
        """Fires when the hub closes the progress stream; events arrive through ``on_event``."""
        d = self.request(b"GET", self._server_path() + "/progress")

        def stream(response: IResponse) -> Deferred | None:
            if response.code != 200:
                response.deliverBody(_EventStream(lambda e: None, Deferred()))
                return None
            done: Deferred = Deferred()
            response.deliverBody(_EventStream(on_event, done))
            return done

        return d.addCallback(stream)


def _drain_code(response: IResponse) -> Deferred:
    return readBody(response).addBoth(lambda _: response.code)


def _named_options(said: str, user_options: dict[str, Any]) -> dict[str, Any]:
    """
    The options the hub's message is about: those it names as an option is named (``gpus:``,
    ``gpus=``, ``'gpus'``), else those it names as a word (a message may say "partition" in passing).
    """

    def find(pattern: str) -> dict[str, Any]:
        return {
            key: value for key, value in user_options.items()
            if re.search(pattern.format(key=re.escape(key)), said, re.IGNORECASE)
        }  # fmt: skip

    return find(r"(?<![\w-]){key}\s*[:=]|['\"`]{key}['\"`]") or find(r"(?<![\w-]){key}(?![\w-])")


def options_refusal(said: str, user_options: dict[str, Any]) -> Refusal:
    """
    A start the hub refused, with its reason: naming the --server-options it is about when its
    words name one, all of them when not, and that there were none when none were given (a hub
    whose spawn form needs a choice refuses an empty one).
    """
    if not user_options:
        return Refusal(
            503,
            f"The hub refused to start your server with no --server-options (hub says: {said}). If your "
            "hub's spawn page asks for choices, give them with --server-options KEY=VALUE (login "
            "--server-options saves them in the profile).",
            "spawn-refused",
        )
    named = _named_options(said, user_options)
    which = describe_server_options(named or user_options) + ("" if named else " (the hub names none of them)")
    return Refusal(503, f"The hub refused to start your server with --server-options {which}: {said}", "spawn-refused")


def _api_refusal(code: int, body: object, target: HubTarget, what: str, holder: str) -> Refusal:
    hub_message = body.get("message", "") if isinstance(body, dict) else ""
    if code == 403:
        return Refusal(
            503,
            f"Your server at {target.server_url} is not running, and the token {holder} "
            f"may not {what} (missing scope; hub says: {hub_message or 'forbidden'}). Start it at "
            f"{target.url}hub/home or use a token with the 'servers' scope.",
            "missing-scope",
        )
    if code == 401:
        return Refusal(
            401,
            f"The hub refused the token {holder} ({hub_message or 'unauthorized'}): it may "
            f"have expired or been revoked. Create a new one at {target.url}hub/token.",
            "hub-token-refused",
        )
    return Refusal(
        503,
        f"The hub could not {what} (HTTP {code}{': ' + hub_message if hub_message else ''}).",
        "hub-error",
    )


class ServerStarter:
    """
    Starts the user's server at most once at a time; everyone who needs it running waits on the
    same spawn. ``on_progress`` sees each progress event (for the terminal's progress bar).

    In managed mode it starts the server with the token the proxy holds. In pass-through mode
    (``api`` without a token) it uses the token of the request that met the stopped server: a token
    from the hub's token page has the user's scopes, so the IDE's own token can start its server.
    Requests that arrive during that spawn wait for it, whatever token they carry, and are then
    sent again with their own: waiting grants nothing a token does not.
    """

    def __init__(
        self,
        api: HubAPI,
        reactor: Any,
        timeout: float = 600.0,
        allowed: bool = True,
        on_progress: Callable[[Progress], bool] | None = None,
    ) -> None:
        self.api = api
        self.reactor = reactor
        self.timeout = timeout
        self.allowed = allowed
        self.on_progress = on_progress
        self.progress = Progress()
        self._waiters: list[Deferred] = []
        self._timer = None
        self._spawning_api = api

    def api_for(self, authorization: bytes | str | None) -> HubAPI | None:
        """
        The API to start the server with for a request whose upstream ``Authorization`` header is
        ``authorization``: the proxy's own in managed mode, else one with the request's token, or
        ``None`` when the request carries none (it came with a cookie, or nothing).
        """
        if self.api.has_token:
            return self.api
        if isinstance(authorization, str):
            authorization = authorization.encode("latin-1", "replace")
        scheme, _, credential = (authorization or b"").strip().partition(b" ")
        token = credential.strip().decode("latin-1")
        if scheme.lower() not in (b"token", b"bearer") or not token:
            return None
        return self.api.with_token(token)

    def recover(
        self,
        code: int,
        location: bytes | None,
        on_stopped: Callable[[], object] | None = None,
        authorization: bytes | str | None = None,
    ) -> Deferred:
        """
        The hub answered ``code`` (and ``location``): if that means the server is stopped, start it.
        ``authorization`` is the request's upstream ``Authorization`` header (see :meth:`api_for`);
        without a token to start it with, a certainly stopped server is a :class:`Refusal`.

        Fires ``True`` once the server runs and the request should be sent again, ``False`` when
        the answer is not a stopped server (the caller passes it on as it is), or fails with a
        :class:`Refusal` saying why the server is not running. ``on_stopped`` is called once the
        server is known to be stopped, before the wait (to let go of the hub's answer).
        When the hub's API cannot say whether the server runs, the answer stands (``False``)
        unless the API gave a reason about the proxy's own token (a :class:`Refusal`: a dead token,
        a missing scope).
        """
        stopped = looks_stopped(code, location, self.api.target)
        if stopped is False:
            return succeed(False)
        api = self.api_for(authorization)
        if api is None:
            return _failed(server_not_running(self.api.target)) if stopped else succeed(False)
        known = succeed(True) if stopped else self.confirm_stopped(api)

        def unknown(failure: Failure) -> Failure | bool:
            # The proxy's own token failing is news for the user; an IDE's token failing is not:
            # the hub's answer to the IDE's request says it already.
            reasons = (Refusal, CancelledError) if api is self.api else (CancelledError,)
            return failure if failure.check(*reasons) else False

        def start(is_stopped: bool) -> Deferred | bool:
            if not is_stopped:
                return False
            if on_stopped is not None:
                on_stopped()
            return self.ensure_running(api).addCallback(lambda _: True)

        return known.addErrback(unknown).addCallback(start)

    def confirm_stopped(self, api: HubAPI | None = None) -> Deferred:
        """Fires with ``True`` when the hub's API says the server is not ready."""
        return (api or self.api).server_state().addCallback(lambda state: not state.ready)

    def ensure_running(self, api: HubAPI | None = None) -> Deferred:
        """
        Fires (with ``None``) when the server is ready; fails with :class:`Refusal`. A spawn that
        is not yet under way starts with ``api`` (default: the proxy's own).
        """
        if not self.allowed:
            return _failed(server_not_running(self.api.target, no_spawn=True))
        waiter: Deferred = Deferred()
        self._waiters.append(waiter)
        if len(self._waiters) == 1:
            self._spawning_api = api or self.api
            self._timer = self.reactor.callLater(self.timeout, self._timed_out)
            self._spawn().addBoth(self._finish)
        return waiter

    @inlineCallbacks
    def _spawn(self):
        self.progress = Progress()
        api = self._spawning_api
        state = yield api.server_state()
        while state.pending == "stop" and self._waiters:
            # the hub refuses to start a server it is still stopping; the spawn timeout bounds this
            yield deferLater(self.reactor, 0.5, lambda: None)
            state = yield api.server_state()
        if state.ready:
            return None
        log.info("Starting your server {url} on the hub.", url=api.target.server_url)
        if state.pending != "spawn":
            code = yield api.start()
            if code == 201:
                return None
        while self._waiters:
            yield api.follow_progress(self._event)
            if self.progress.failed:
                if _named_options(self.progress.message, api.user_options):
                    raise options_refusal(self.progress.message, api.user_options)
                raise Refusal(
                    503,
                    f"The hub failed to start your server: {self.progress.message or 'no reason given'}.",
                    "spawn-failed",
                )
            state = yield api.server_state()
            if state.ready:
                return None
            if not state.pending:
                raise Refusal(
                    503,
                    "The hub stopped starting your server"
                    f"{': ' + self.progress.message if self.progress.message else ''}.",
                    "spawn-failed",
                )
        return None

    def _event(self, event: dict[str, Any]) -> None:
        progress = self.progress
        if isinstance(event.get("progress"), int | float):
            progress.percent = int(event["progress"])
        if event.get("message"):
            progress.message = str(event["message"])
        progress.ready = bool(event.get("ready"))
        progress.failed = bool(event.get("failed"))
        drawn = self.on_progress(progress) if self.on_progress is not None else False
        if not drawn:  # a progress bar on the terminal says it already; log lines would garble it
            log.info(
                "Server start: {percent}% {message}",
                percent=progress.percent if progress.percent is not None else "?",
                message=progress.message,
            )

    def _timed_out(self) -> None:
        self._timer = None
        last = self.progress.message or "no progress reported"
        self._release(
            Failure(
                Refusal(
                    504,
                    f"Your server did not start within {self.timeout:g} s (--spawn-timeout). "
                    f"The hub's last word: {last}.",
                    "spawn-timeout",
                )
            )
        )

    def _finish(self, result: object) -> None:
        if isinstance(result, Failure) and not result.check(Refusal):
            result = Failure(Refusal(503, f"Starting your server failed: {result.getErrorMessage()}", "spawn-failed"))
        if isinstance(result, Failure):
            log.warn("Starting your server failed: {message}", message=result.value.message)
        else:
            log.info("Your server is ready.")
        self._release(result)

    def _release(self, result: object) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        self._spawning_api = self.api  # an IDE's token is held no longer than its spawn
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            if isinstance(result, Failure):
                waiter.errback(result)
            else:
                waiter.callback(None)


def _failed(error: Exception) -> Deferred:
    d: Deferred = Deferred()
    d.errback(Failure(error))
    return d

