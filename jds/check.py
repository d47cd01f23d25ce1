"""
``jupyter-dev-server check``: walk the chain an IDE's request takes and say, for the first link that
fails, the one thing to change. It replaces the original README's page of trial-and-error advice.

the via (a proxy or bastion, when one is used) → address → TLS (which CA, which names, days left) →
hub API → token (owner, scopes, expiry) → server state → kernelspecs through the proxy's own mapping,
served in-process over an in-memory connection → the --root folder, listed through that same mapping.
"""

from __future__ import annotations

import datetime
import json
import sys
from dataclasses import asdict, dataclass
from typing import Any

from twisted.internet.address import IPv4Address
from twisted.internet.defer import inlineCallbacks, succeed
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.internet.protocol import Protocol
from twisted.protocols.loopback import loopbackAsync
from twisted.python.failure import Failure
from twisted.web.client import readBody
from twisted.web.http_headers import Headers
from zope.interface import implementer

from jds.auth import Credentials
from jds.commands import login_command, parse_subcommand
from jds.hub import HubAPI, ServerStarter
from jds.hubclient import HubClient
from jds.hubversions import OLDEST, START_SCOPES, UnsupportedHub, release_of
from jds.options import Options
from jds.paths import HubTarget, authority
from jds.profiles import describe_server_options
from jds.proxy import make_agent
from jds.reach import closing_probe
from jds.refusal import Refusal
from jds.site import build_site
from jds.tls import HubTLSPolicy
from jds.token_expiry import describe_expiry, held_token_life, renewal_warning

__all__ = ["CheckOptions", "Step", "run_checks", "main"]

# The scope a token needs to reach the server; those that start it differ by release (jds.hubversions).
_ACCESS = "access:servers"


@implementer(IStreamClientEndpoint)
class _InProcess:
    """
    The proxy's own site, reached through an in-memory connection instead of a loopback port: in
    the daemon's start-up log, a second listener (its start, its close, an access line) read as if
    the daemon listened twice.
    """

    def __init__(self, site: Any) -> None:
        self.site = site

    def connect(self, protocolFactory: Any):  # noqa: N803 - IStreamClientEndpoint
        address = IPv4Address("TCP", "127.0.0.1", 0)
        client = protocolFactory.buildProtocol(address)
        loopbackAsync(self.site.buildProtocol(address), _Pausable(client))
        return succeed(client)


class _Pausable(Protocol):
    """
    Gives the HTTP client the producer methods a socket has (its body reader may pause and stop
    it); the in-memory pump needs no flow control for one small answer.
    """

    def __init__(self, inner: Protocol) -> None:
        self.inner = inner

    def makeConnection(self, transport: Any) -> None:
        super().makeConnection(transport)
        transport.pauseProducing = transport.resumeProducing = lambda: None
        transport.stopProducing = transport.loseConnection
        self.inner.makeConnection(transport)

    def dataReceived(self, data: bytes) -> None:
        self.inner.dataReceived(data)

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self.inner.connectionLost(reason)


@dataclass
class Step:
    name: str
    ok: bool | None  # None: not checked
    detail: str
    fix: str = ""

    def line(self) -> str:
        mark = {True: "PASS", False: "FAIL", None: "SKIP"}[self.ok]
        text = f"{mark}  {self.name:<12} {self.detail}"
        return text + (f"\n      fix: {self.fix}" if self.fix else "")


class CheckOptions(Options):
    synopsis = "check [--profile NAME] [--hub HOST[:PORT] --user NAME] [options]"
    longdesc = (
        "Check every link from this machine to your server on the hub; exit 0 only if an IDE would work. "
        "It takes the daemon's options, and with none checks the default profile's settings."
    )
    optFlags = [*Options.optFlags, ["json", None, "Print the steps as JSON."]]


def _scope_covers(scopes: list[str], wanted: str, target: HubTarget) -> bool:
    user = target.user
    for scope in scopes:
        base, _, _ = scope.partition("!")
        if base == wanted or base == "admin:servers" and wanted != _ACCESS:
            if scope == base or scope in (f"{base}!user={user}", f"{base}!user", f"{base}!server={user}/{target.server}"):
                return True
    return False


@inlineCallbacks
def run_checks(reactor: Any, options: Options, policy: HubTLSPolicy | None = None):
    """
    The links in order, each a list of steps, up to the first step that is not a pass. Without a
    ``policy``, the options make one; it shares their via with every other policy they make (one ssh
    session for the daemon and its start-up check), but not the daemon's spare connections.
    """
    chain = _Chain(reactor, options, policy)
    steps: list[Step] = []
    links = (chain.connect, chain.tls, chain.hub, chain.token, chain.server, chain.kernelspecs)
    if not chain.policy.via.spec.direct:
        links = (chain.via, *links)
    for link in links:
        found: list[Step] = yield link()
        steps.extend(found)
        if found[-1].ok is not True:
            break
    return steps


class _Chain:
    """One run of the checks: one method per link, and what a link learns that a later one needs."""

    def __init__(self, reactor: Any, options: Options, policy: HubTLSPolicy | None = None) -> None:
        self.reactor = reactor
        self.options = options
        self.target: HubTarget = options["target"]
        self.policy = policy if policy is not None else options.hub_policy(reactor)
        self.agent = make_agent(reactor, self.policy)
        self.api = HubAPI(self.agent, self.target, options["hub-token"] or "")
        self.hub_code = 0
        self.hub_body = b""
        self.can_start = False
        self.release = OLDEST  # the hub's row in jds.hubversions, once the hub link has read its version

    @inlineCallbacks
    def via(self):
        """The proxy or bastion, in its own words: it opens a stream to the hub, or says why not."""
        via = self.policy.via
        try:
            detail = yield via.check(self.target.host, self.target.port)
        except Exception:
            failure = Failure()
            refusal = failure.value if failure.check(Refusal) else self.policy.explain(failure)
            return [Step("via", False, refusal.message, refusal.hint)]
        return [Step("via", True, detail)]

    @inlineCallbacks
    def connect(self):
        target = self.target
        try:
            protocol = yield self.policy.inner_endpoint().connect(closing_probe())
        except Exception:
            refusal = self.policy.explain(Failure())
            return [Step("connect", False, refusal.message, refusal.hint)]
        where = authority(target.host, target.port)
        spec = self.policy.via.spec
        if not spec.direct:
            return [Step("connect", True, f"{where} answers through {spec.describe()}")]
        peer = protocol.transport.getPeer()
        return [Step("connect", True, f"{where} answers (at {peer.host})")]

    @inlineCallbacks
    def tls(self):
        target = self.target
        try:
            response = yield self.agent.request(
                b"GET", f"{target.url}hub/api".encode(), Headers({b"Accept": [b"application/json"]})
            )
            self.hub_body = yield readBody(response)
        except Exception:
            refusal = self.policy.explain(Failure())
            return [Step("tls", False, refusal.message, refusal.hint)]
        self.hub_code = response.code
        cert = self.policy.creator.last_peer
        days = cert.days_left(datetime.datetime.now(datetime.timezone.utc)) if cert else None
        return [Step(
            "tls", True,
            f"verified {target.verify_name} by {self.policy.ca_source}; certificate for "
            f"{cert.names if cert else '?'}, issued by {cert.issuer if cert else '?'}, "
            f"{days if days is not None else '?'} days left",
            "" if days is None or days > 14 else "The hub's certificate expires soon: tell the cluster administrators.",
        )]

    def hub(self) -> list[Step]:
        target = self.target
        try:
            version = json.loads(self.hub_body).get("version")
        except (ValueError, AttributeError):
            version = None
        if self.hub_code != 200 or not version:
            return [Step(
                "hub", False, f"{target.url}hub/api answered HTTP {self.hub_code}, not a JupyterHub version",
                "Check the path prefix in --hub (https://HOST:PORT/PREFIX/) and the port.",
            )]
        try:
            self.release = release_of(version)
            tested = f"tested release {self.release.name}"
        except UnsupportedHub as exc:
            tested = f"untested: {exc}"
        return [Step("hub", True, f"JupyterHub {version} at {target.url} ({tested})")]

    @inlineCallbacks
    def token(self):
        target = self.target
        if not self.options["hub-token"]:
            return [
                Step(name, None, "not checked: no --token-file or JUPYTERHUB_API_TOKEN (the IDE brings its own token)")
                for name in ("token", "server", "kernelspecs", *(("root",) if target.root else ()))
            ]
        code, me = yield self.api.json(b"GET", "user")
        if code != 200 or not isinstance(me, dict):
            return [Step(
                "token", False, f"the hub refused the token (HTTP {code})",
                f"Create a new token at {target.url}hub/token and put it in the --token-file.",
            )]
        scopes = [str(s) for s in me.get("scopes", [])]
        owner = me.get("name", "?")
        life = yield held_token_life(self.api)
        if life is not None:
            expires = describe_expiry(life.expires_at)
        elif not self.release.token_id:
            expires = f"expiry unknown (JupyterHub {self.release.name} does not say which token this is)"
        else:
            expires = "expiry unknown"
        renew = None
        if life is not None:
            now = datetime.datetime.fromtimestamp(self.reactor.seconds(), datetime.timezone.utc)
            command = login_command(
                target, self.options["ca-cert"], self.options["token-file"], self.options.renewal_profile(),
                self.options["via"], self.options["ssh-command"],
            )
            renew = renewal_warning(life.expires_at, now, command)
        problems = []
        if owner != target.user and me.get("kind") == "user" and not me.get("admin"):
            problems.append(f"the token belongs to {owner}, not {target.user}")
        if scopes and not _scope_covers(scopes, _ACCESS, target):
            problems.append(f"it lacks the scope {_ACCESS}!user={target.user}")
        self.can_start = not scopes or any(_scope_covers(scopes, s, target) for s in START_SCOPES)
        detail = f"owner {owner}, {expires}, {len(scopes)} scopes"
        if problems:
            return [Step("token", False, detail + "; " + "; ".join(problems),
                         f"Create a token for {target.user} at {target.url}hub/token.")]
        cannot = f"; cannot start servers (no '{self.release.start_scope}' scope)"
        return [Step("token", True, detail + ("" if self.can_start else cannot), renew or "")]

    @inlineCallbacks
    def server(self):
        target = self.target
        try:
            state = yield self.api.server_state()
            model = yield self.api.server_model()
        except Exception as exc:
            return [Step("server", False, getattr(exc, "message", str(exc)))]
        options = _options_step(self.options["server-options"], model, state.ready)
        if not state.ready:
            how = "the proxy will start it when needed" if self.can_start else f"start it at {target.url}hub/home"
            return [*options, Step(
                "server", False, f"{target.server_url} is {state.word}",
                f"Start your server: {how}." if not state.pending else "Wait for it to finish starting.",
            )]
        return [*options, Step("server", True, f"{target.server_url} is running")]

    @inlineCallbacks
    def kernelspecs(self):
        """The kernelspecs, and the --root folder, through the proxy's own mapping."""
        reactor = self.reactor
        credentials = Credentials(self.options["hub-token"], self.options["local-token"] or "check")
        site = build_site(self.target, self.policy, reactor, credentials, ServerStarter(self.api, reactor, allowed=False))
        site.access_log = False
        agent = HubClient(reactor, _InProcess(site), persistent=False)
        headers = Headers({b"Authorization": [f"token {credentials.local_token}".encode()]})

        def get(path: str):
            return agent.request(b"GET", f"http://127.0.0.1{path}".encode(), headers).addCallback(
                lambda response: readBody(response).addCallback(lambda body: (response.code, body))
            )

        code, body = yield get("/api/kernelspecs")
        root_answer = (yield get("/api/contents?content=0")) if self.target.root else None
        try:
            names = sorted(json.loads(body)["kernelspecs"])
        except (ValueError, KeyError, TypeError):
            names = []
        if code != 200 or not names:
            steps = [Step("kernelspecs", False, f"/api/kernelspecs through the proxy answered HTTP {code}",
                          "Run the daemon and read its log for the request.")]
        else:
            steps = [Step("kernelspecs", True, "kernels an IDE will offer: " + ", ".join(names))]
        if root_answer is not None:
            steps.append(_root_step(self.target, *root_answer))
        return steps


def _options_step(given: dict[str, Any], model: dict[str, Any] | None, running: bool) -> list[Step]:
    """
    The spawn options the proxy will send, against those the hub keeps from the server's last
    start. JupyterHub tells a token nothing of the spawner's form itself (its REST models have no
    form, and its spawn page takes only the browser's cookie, and starts the server when there is
    no form); the last start's ``user_options`` are what it tells: the form's fields, once a start
    from the spawn page (or with --server-options) has used them.
    """
    recorded = (model or {}).get("user_options") or {}
    recorded = recorded if isinstance(recorded, dict) else {}
    if given:
        detail = f"the proxy starts your server with --server-options {describe_server_options(given)}"
        if running and recorded != given:
            before = describe_server_options(recorded) if recorded else "none"
            detail += f"; the running server was started with {before}: yours apply at its next start"
        return [Step("options", True, detail)]
    if not recorded:
        return []
    fields = ", ".join(recorded)
    example = " ".join(f"--server-options {key}=..." for key in recorded)
    return [Step(
        "options", True,
        f"your hub's spawner takes options: the server's last start (from the hub's spawn form, or "
        f"options given then) chose {fields}; no --server-options are given, so when the proxy starts it "
        f"the hub reuses those ({describe_server_options(recorded)})",
        f"To choose them yourself, give {example} (login --server-options saves them in the profile).",
    )]


def _root_step(target: HubTarget, code: int, body: bytes) -> Step:
    """Whether the --root folder is a folder of the server, from its contents model."""
    where = f"{target.root}/ on {target.server_url}"
    try:
        kind = json.loads(body).get("type")
    except (ValueError, AttributeError):
        kind = None
    if code == 200 and kind == "directory":
        return Step("root", True, f"the IDE sees {where} as the server's root")
    fix = "Create that folder on your server, or give --root a folder relative to your server's root."
    if code == 404:
        return Step("root", False, f"--root {target.root}: there is no such folder ({where})", fix)
    if code == 200:
        return Step("root", False, f"--root {target.root} is a {kind or 'file'}, not a folder ({where})", fix)
    return Step("root", False, f"--root {target.root}: listing it answered HTTP {code}",
                "Run the daemon and read its log for the request.")


def main(argv: list[str]) -> int:
    from twisted.internet.task import react

    options = CheckOptions()
    failed = parse_subcommand(options, argv, "check")
    if failed is not None:
        return failed
    if options["via-warning"]:
        print(f"jupyter-dev-server check: warning: {options['via-warning']}", file=sys.stderr)
    result: dict[str, int] = {}

    def go(reactor_: Any):
        def report(steps: list[Step]) -> None:
            if options["json"]:
                print(json.dumps([asdict(step) for step in steps], indent=2))
            else:
                for step in steps:
                    print(step.line())
            result["code"] = 0 if steps and all(step.ok is not False for step in steps) else 1

        return run_checks(reactor_, options).addCallback(report)

    try:
        react(go, [])
    except SystemExit:
        pass
    return result.get("code", 1)
