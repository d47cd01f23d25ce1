"""
``jupyter-dev-server login``: get a hub API token with the cluster password and keep it for
managed mode, so nobody pastes tokens that expire.

JupyterHub issues a token to ``POST /hub/api/users/<name>/tokens`` whose body carries
``{"auth": {"username", "password"}}`` when its authenticator takes passwords (PAM, LDAP, a shared
password). An OAuth/SSO authenticator cannot check a password, and the hub answers that field with
the same bare 403 as a wrong password; so the hub's login page decides first: a page without a
password field (a "Sign in with ..." button, or a redirect to the identity provider) means single
sign-on, and then the user creates a token on the hub's token page and pastes it here, where it is
verified before it is kept. Not to be confused with :mod:`jds.login`, the daemon's local ``/login``.
"""

from __future__ import annotations

import getpass
import io
import json
import os
import re
import signal
import socket
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from twisted.internet.defer import inlineCallbacks, succeed
from twisted.python import usage
from twisted.python.failure import Failure
from twisted.web.client import FileBodyProducer, readBody
from twisted.web.http_headers import Headers

from jds.cluster_ca import ClusterCAError, ca_beside, fetch_cluster_ca, save_cluster_ca
from jds.commands import parse_subcommand, profile_command
from jds.environment import ENVIRONMENT
from jds.hub import HubAPI
from jds.options import HUB_PARAMETERS, HubOptions, Options, check_server_options, hub_target
from jds.paths import HubTarget, authority, escape_name, listen_address
from jds.profiles import (
    DEFAULT_PROFILE,
    SERVER_OPTIONS,
    SERVER_OPTIONS_TABLE,
    check_profile_name,
    config_path,
    load_profiles,
    save_profile,
)
from jds.proxy import make_agent
from jds.refusal import Refusal
from jds.token_expiry import describe_expiry, held_token_life, parse_expiry
from jds.tokens import TokenFileError, default_hub_token_path, write_private

__all__ = ["LoginError", "LoginOptions", "main", "parse_duration", "request_token"]

DEFAULT_EXPIRES_IN = "30d"
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
# The password input of JupyterHub's login form (templates/login.html).
_PASSWORD_FIELD = re.compile(rb"<input[^>]*\bname=[\"']?password\b", re.IGNORECASE)


class LoginError(Exception):
    """Login cannot go on; the message is one sentence saying what to do."""


def parse_duration(value: str) -> int:
    """Seconds from ``30d``, ``12h``, ``90m``, ``3600s`` or a bare number of days; 0 means never."""
    text = value.strip().lower()
    unit = text[-1:] if text[-1:] in _UNITS else "d"
    number = text[:-1] if text[-1:] in _UNITS else text
    try:
        amount = float(number)
    except ValueError:
        amount = -1.0
    if amount < 0:
        raise usage.UsageError(
            f"--expires-in must be a duration such as 30d, 12h or 90m (0 for no expiry), not {value!r}."
        )
    return int(amount * _UNITS[unit])


class LoginOptions(HubOptions):
    synopsis = "Usage: jupyter-dev-server login [--profile NAME] [--hub HOST[:PORT] --user NAME] [options]"
    longdesc = (
        "Get an API token from the hub with your cluster password (or, on a hub that signs in "
        "through a web page, the token you paste from its token page), save it in a file only you "
        "can read, save the options given here as a profile ($XDG_CONFIG_HOME/jupyter-dev-server/"
        "config.toml; --profile NAME, default 'default'; never the token), and print the command that "
        "runs jupyter-dev-server with it in managed mode. A new profile gets a free --listen port. "
        "Run 'jupyter-dev-server login' again (with --profile NAME for another) to renew the token."
    )
    creates_profile = True
    # JUPYTERHUB_API_TOKEN is a token to use, not where login writes one
    environment = {name: env for name, env in ENVIRONMENT.items() if name != "token-file"}
    optParameters = [
        *HUB_PARAMETERS,
        ["server", None, None, "A named server of yours, saved in the profile (as the daemon's --server)."],
        ["root", None, None, "The daemon's --root, saved in the profile."],
        ["listen", None, None, "The daemon's --listen, saved in the profile. [default: a free port from 8000 up]"],
        ["token-file", None, None,
         "Where to write the token (mode 600). [default: the profile's, else "
         "$XDG_CONFIG_HOME/jupyter-dev-server/hub-token (hub-token-NAME for --profile NAME)]"],
        ["expires-in", None, DEFAULT_EXPIRES_IN,
         "How long the token lives: 30d, 12h, 90m (a bare number is days); 0 asks for no expiry, "
         "which the hub may cap."],
    ]
    optFlags = [
        ["password-stdin", None,
         "Read the password (or, on a single sign-on hub, the token) from the first line of standard "
         "input instead of asking for it, for scripts."],
    ]

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        super().__init__()
        self.environ = os.environ if environ is None else environ

    def postOptions(self) -> None:
        self.apply_profile(self.environ)
        self.saving = check_profile_name(self["profile"] or DEFAULT_PROFILE)
        # as typed (or as the profile had them), before hub_target settles them
        self.raw = {key: self[key] for key in self.profile_keys() if self.get(key) not in (None, "")}
        self["target"] = hub_target(self, self.environ, self["server"] or "")
        self["server-options"] = check_server_options(self.get(SERVER_OPTIONS) or {})
        self["expires-in"] = parse_duration(self["expires-in"])
        path = self["token-file"] or default_hub_token_path(self.environ, self.saving)
        self["token-file"] = Path(path).expanduser().absolute()

    def profile_to_save(self, taken_ports: set[int], free_port: Callable[[set[int]], int]) -> dict[str, Any]:
        """
        The profile as it was, updated with what this login was told: the hub as the daemon must
        reach it, the token file, and every other daemon option given; a new one gets a free port.
        """
        target: HubTarget = self["target"]
        profile = dict(self.profile)
        profile.pop(SERVER_OPTIONS, None)
        base = "" if target.base == "/" else target.base
        profile["hub"] = f"https://{authority(target.host, target.port)}{base}"
        profile["user"] = target.user
        profile.pop("tls-name", None)
        if target.verify_name != target.host.lower():
            profile["tls-name"] = target.verify_name
        if self["ca-cert"]:
            profile["ca-cert"] = self["ca-cert"]
        daemon_keys = set(Options().profile_keys())
        for key in sorted(set(self.raw) & self.given & daemon_keys - {"hub", "user", "tls-name", "ca-cert"}):
            profile[key] = self.raw[key]
        profile.pop(SERVER_OPTIONS, None)
        profile["token-file"] = str(self["token-file"])
        if not profile.get("listen"):
            profile["listen"] = f"tcp:{free_port(taken_ports)}:interface=127.0.0.1"
        if self["server-options"]:
            profile[SERVER_OPTIONS_TABLE] = dict(self["server-options"])
        return profile


def _listen_port(listen: object) -> int | None:
    kind, port, _ = listen_address(str(listen or ""))
    return int(port) if kind in ("tcp", "tcp6") and port and port.isdigit() else None


def free_listen_port(taken: set[int], first: int = 8000, last: int = 8099) -> int:
    """The first port from ``first`` that no other profile uses and that 127.0.0.1 can bind now."""
    for port in range(first, last + 1):
        if port in taken:
            continue
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                continue
        return port
    raise LoginError(f"No free port from {first} to {last} for the daemon; give one with --listen tcp:PORT:interface=127.0.0.1.")


def _secret(prompt: str, from_stdin: bool) -> str:
    """
    A password or token, never echoed. The reactor waits meanwhile (login has nothing else to do);
    Ctrl-C must interrupt the prompt, not wait for Enter, so Python's own SIGINT handler is back
    for the duration, and getpass restores the terminal on the way out.
    """
    if from_stdin or not sys.stdin.isatty():
        line = sys.stdin.readline()
        if not line:
            raise LoginError("Standard input ended before a line was read.")
        return line.rstrip("\r\n")
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        return getpass.getpass(prompt)
    except KeyboardInterrupt:
        raise LoginError("Interrupted; nothing was saved.") from None
    finally:
        signal.signal(signal.SIGINT, previous)


def _hub_message(body: bytes) -> str:
    try:
        document = json.loads(body)
    except ValueError:
        return ""
    message = document.get("message") if isinstance(document, dict) else None
    return str(message) if message else ""


@inlineCallbacks
def request_token(
    reactor: Any,
    policy: Any,
    target: HubTarget,
    expires_in: int,
    ask: Callable[[str], str],
    say: Callable[[str], None],
):
    """
    Fires with ``(token, expires_at)`` from the hub, by password or by a pasted token; fails with
    :class:`LoginError`. ``ask(prompt)`` reads a secret, ``say`` tells the user something.
    """
    agent = make_agent(reactor, policy, persistent=False)
    host = Headers({b"Host": [target.netloc.encode("ascii")], b"Accept": [b"application/json, text/html"]})

    def call(method: bytes, path: str, body: dict[str, Any] | None = None):
        headers = host.copy()
        producer = None
        if body is not None:
            headers.setRawHeaders(b"Content-Type", [b"application/json"])
            producer = FileBodyProducer(io.BytesIO(json.dumps(body).encode("utf-8")))
        d = agent.request(method, f"{target.url}{path}".encode("ascii"), headers, producer)
        return d.addCallback(lambda response: readBody(response).addCallback(lambda data: (response, data)))

    try:
        response, body = yield call(b"GET", "hub/api")
    except Exception:
        refusal = policy.explain(Failure())
        raise LoginError(f"{refusal.message} {refusal.hint}".strip()) from None
    if response.code != 200 or b'"version"' not in body:
        raise LoginError(
            f"{target.url}hub/api answered HTTP {response.code}, not JupyterHub: check --hub "
            "(https://HOST:PORT/PREFIX/)."
        )
    response, page = yield call(b"GET", "hub/login")
    if response.code == 200 and _PASSWORD_FIELD.search(page):
        password = ask(f"Password for {target.user} on {target.host}: ")
        body = {
            "auth": {"username": target.user, "password": password},
            "note": f"jupyter-dev-server on {socket.gethostname()}",
        }
        if expires_in:
            body["expires_in"] = expires_in
        response, answer = yield call(b"POST", f"hub/api/users/{escape_name(target.user)}/tokens", body)
        if response.code == 403:
            raise LoginError(f"The hub did not accept this password for {target.user}; run login again.")
        if response.code != 201:
            said = _hub_message(answer)
            raise LoginError(
                f"The hub refused to issue a token (HTTP {response.code}{': ' + said if said else ''})."
            )
        model = json.loads(answer)
        return model["token"], parse_expiry(model.get("expires_at"))
    say(
        f"This hub signs in through its web page (single sign-on), not with a password. Create a "
        f"token at {target.url}hub/token (choose an expiry), then paste it here."
    )
    token = ask("Token: ").strip()
    if not token or any(c.isspace() for c in token):
        raise LoginError("That is not a JupyterHub API token (one word, no spaces); run login again.")
    api = HubAPI(agent, target, token)
    code, me = yield api.json(b"GET", "user")
    if code != 200 or not isinstance(me, dict):
        raise LoginError(f"The hub does not accept that token (HTTP {code}); create a new one at {target.url}hub/token.")
    if me.get("name") != target.user:
        raise LoginError(f"That token belongs to {me.get('name')!r}, not {target.user!r}; create one as {target.user}.")
    life = yield held_token_life(api)
    return token, life.expires_at if life is not None else None


@inlineCallbacks
def _cluster_ca(reactor: Any, options: LoginOptions):
    """
    With ``--via ssh://`` and no local ``--ca-cert``: the cluster CA read from the login node over
    the same ssh session (:mod:`jds.cluster_ca`), saved beside the token, and used from here on.
    """
    via = options.via(reactor)
    target: HubTarget = options["target"]
    try:
        yield via.check(target.host, target.port)
        ca = yield fetch_cluster_ca(via, options["ca-cert-remote"] or None)
    except Refusal as refusal:
        raise LoginError(refusal.message) from None
    except ClusterCAError as exc:
        raise LoginError(str(exc)) from None
    path = ca_beside(options["token-file"])
    try:
        save_cluster_ca(ca, path)
    except OSError as exc:
        raise LoginError(f"Cannot write the cluster CA to {path}: {exc.strerror}; choose another --token-file.") from None
    print(f"The cluster CA, read over ssh from {via.destination.display} (ssh verified that host's key first):")
    for found in ca.describe():
        print("  " + found.replace("\n", "\n  "))
    print(f"Saved it in {path}; the daemon, check and login use it from there.", flush=True)
    options["ca-cert"] = str(path)


def main(argv: list[str]) -> int:
    from twisted.internet.task import react

    options = LoginOptions()
    failed = parse_subcommand(options, argv, "login")
    if failed is not None:
        return failed
    if options["via-warning"]:
        print(f"jupyter-dev-server login: warning: {options['via-warning']}", file=sys.stderr)
    result: dict[str, Any] = {}

    def go(reactor: Any):
        d = _cluster_ca(reactor, options) if options["ca-cert-remote"] is not None else succeed(None)
        d.addCallback(lambda _: request_token(
            reactor, options.hub_policy(reactor), options["target"],
            options["expires-in"], lambda prompt: _secret(prompt, options["password-stdin"]),
            lambda text: print(text, file=sys.stderr, flush=True),
        ))  # fmt: skip
        return d.addCallbacks(
            lambda obtained: result.__setitem__("token", obtained),
            lambda failure: result.__setitem__("failure", failure),
        )

    try:
        react(go, [])
    except SystemExit:
        pass
    failure = result.get("failure")
    if failure is not None:
        message = failure.getErrorMessage() if failure.check(LoginError) else f"login failed: {failure.getErrorMessage()}"
        print(f"jupyter-dev-server login: {message}", file=sys.stderr)
        return 1
    token, expires_at = result["token"]
    path: Path = options["token-file"]
    try:
        write_private(path, token + "\n")
    except (OSError, TokenFileError) as exc:
        print(f"jupyter-dev-server login: cannot write {path}: {exc}; choose another with --token-file.", file=sys.stderr)
        return 1
    target = options["target"]
    print(f"Saved a hub token for {target.user} ({describe_expiry(expires_at)}) in {path}.")
    config = config_path(options.environ)
    try:
        others = {name: p for name, p in load_profiles(config).items() if name != options.saving}
        taken = {port for p in others.values() if (port := _listen_port(p.get("listen"))) is not None}
        profile = options.profile_to_save(taken, free_listen_port)
        save_profile(config, options.saving, profile, write_private)
    except (OSError, TokenFileError, LoginError, usage.UsageError) as exc:
        print(f"jupyter-dev-server login: cannot save the profile in {config}: {exc}", file=sys.stderr)
        return 1
    print(f"Saved the profile {options.saving!r} in {config} (listening on {profile['listen']}).")
    print("Start jupyter-dev-server with it (restart it if it runs), then paste the URL it prints into your IDE:")
    print(f"  {profile_command(options.saving)}")
    return 0
