"""
Command-line options, shared by ``twistd jupyter-dev-server`` and the ``jupyter-dev-server`` script.

The original tool was configured only through environment variables; they keep working under the
options (command line wins over environment, environment over a saved profile, the profile over the
default; the variables are :mod:`jds.environment`'s table). Every check that can fail runs here,
before anything listens, and fails with one sentence naming what to change.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from twisted.internet.endpoints import serverFromString
from twisted.python import usage

from jds.cluster_ca import ca_beside
from jds.environment import ENVIRONMENT, env_note, environment_token, hub_default_port
from jds.guard import is_loopback
from jds.openssh import base_command
from jds.paths import HubTarget, listen_address, parse_root
from jds.profiles import SERVER_OPTIONS, ProfiledOptions
from jds.reach import make_via
from jds.tls import HubTLSPolicy, TLSConfigError, load_trust_root
from jds.tokens import (
    TokenFileError,
    default_hub_token_path,
    default_local_token_path,
    load_local_token,
    read_hub_token,
)
from jds.via import Via, choose_via

__all__ = ["HUB_PARAMETERS", "HubOptions", "Options", "hub_target", "parse_hub"]

DEFAULT_LISTEN = "tcp:8000:interface=127.0.0.1"


def parse_hub(value: str, default_port: int) -> tuple[str, int, str]:
    """
    ``(host, port, base path)`` from ``HOST``, ``HOST:PORT`` or ``https://HOST[:PORT][/PREFIX/]``.

    ``http://`` is refused outright: the hub is only ever reached over verified TLS.
    """
    text = value.strip()
    if "://" not in text:
        text = "https://" + text
    try:
        parts = urlsplit(text)
        port = parts.port
    except ValueError as exc:
        raise usage.UsageError(f"--hub {value!r} is not a valid address: {exc}.") from None
    if parts.scheme != "https":
        raise usage.UsageError(
            f"--hub {value!r} uses {parts.scheme}://; jupyter-dev-server only talks to the hub "
            "over verified TLS: give an https:// URL or a bare HOST[:PORT]."
        )
    if not parts.hostname:
        raise usage.UsageError(f"--hub {value!r} names no host.")
    if parts.query or parts.fragment:
        raise usage.UsageError(f"--hub {value!r} must not have a query or fragment.")
    return parts.hostname, port or default_port, parts.path or "/"


def listen_interface(description: str) -> str:
    """The address a listen endpoint binds; a UNIX socket counts as loopback."""
    kind, _, interface = listen_address(description)
    if kind.lower() == "unix":
        return "127.0.0.1"
    return "0.0.0.0" if interface is None else interface


_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}


def _checked(value: str, name: str, convert, valid, what: str):
    """``convert(value)`` if ``valid`` says it is, else the one sentence that names the option."""
    try:
        number = convert(value)
    except (TypeError, ValueError, KeyError, IndexError):
        number = None
    if number is None or not valid(number):
        raise usage.UsageError(f"--{name} must be {what}, not {value!r}.")
    return number


def _bytes(value: str) -> int:
    text = str(value).strip().upper().removesuffix("IB").removesuffix("B")
    number, unit = (text[:-1], text[-1]) if text[-1:] in _UNITS and text[-1:] else (text, "")
    return int(float(number) * _UNITS[unit])


def parse_size(value: str, name: str) -> int:
    """Bytes from ``123``, ``64K``, ``256M``, ``1G`` (also ``MiB``, ``MB``: all powers of 1024)."""
    return _checked(value, name, _bytes, lambda size: size >= 0, "a size in bytes (like 1048576, 64K, 256M)")


def _count(value: str, name: str) -> int:
    return _checked(value, name, int, lambda count: count >= 0, "a whole number (0: no limit)")


def _seconds(value: str, name: str, unit: str = "seconds", allow_zero: bool = False) -> float:
    floor = "0 or more" if allow_zero else "above 0"
    return _checked(
        value, name, float, lambda seconds: (seconds >= 0 if allow_zero else seconds > 0) and seconds != float("inf"),
        f"a number of {unit} {floor}",
    )


# The options that say where the hub is and how to trust it, shared by the daemon, ``check`` and
# ``login`` (which must reach the hub exactly as the daemon will).
HUB_PARAMETERS = [
    ["hub", None, None,
     "The hub: HOST, HOST:PORT or https://HOST[:PORT][/PREFIX/] (port 8000 if not given). "
     f"[{env_note('hub')}]"],
    ["user", None, None, f"Your user name on the hub. [{env_note('user')}]"],
    ["tls-name", None, None,
     "The name to verify in the hub's certificate, when it differs from the address in --hub "
     f"(e.g. connecting by IP). [{env_note('tls-name')}; default: the host of --hub]"],
    ["ca-cert", None, None,
     "PEM file with the cluster's CA certificate (or a bundle) that signs the hub's "
     "certificate; with --via ssh://, ssh:PATH reads it from the login node ('login' saves it beside "
     f"the token). [{env_note('ca-cert')}; default: with --via ssh://, the CA 'login' saved "
     "(cluster-ca.pem beside the token file), else the system trust store]"],
    ["connect-timeout", None, "10", "Seconds to wait for a connection to the hub."],
    ["via", None, None,
     "How to reach the hub: direct, http://[USER:PASSWORD@]HOST:PORT or https://... (an HTTP proxy's "
     "CONNECT), socks5://HOST:PORT (the proxy resolves the hub's name; e.g. ssh -D 1080), or "
     "ssh://[USER@]HOST[:PORT] (an SSH bastion). Put a proxy password in HTTPS_PROXY, not here: "
     f"command lines are visible in ps. [{env_note('via')}; default: HTTPS_PROXY, then "
     "ALL_PROXY, unless NO_PROXY names the hub; else direct]"],
    ["ssh-command", None, None,
     "The ssh program, with options, for --via ssh:// (like git's core.sshCommand), e.g. "
     f"\"ssh -F ~/work/ssh_config\". [{env_note('ssh-command')}; default: ssh]"],
]

# What a command says when it has no hub at all: the user has not run login yet.
NO_HUB = (
    "No hub given and no saved profile: run 'jupyter-dev-server login --hub HOST[:PORT] --user NAME' "
    "once (it saves the default profile), or give --hub."
)


def hub_target(options: usage.Options, environ: Mapping[str, str], server: str = "") -> HubTarget:
    """
    The hub, user and TLS name from ``options`` (as :data:`HUB_PARAMETERS` defines them; their
    environment variables already applied by :meth:`ProfiledOptions.apply_profile`); also settles
    ``ca-cert``, ``connect-timeout``, ``via`` (a :class:`ViaSpec`; ``via-warning`` a sentence to show,
    or "") and ``ssh-command``.
    """
    hub = options["hub"]
    if not hub:
        raise usage.UsageError(NO_HUB)
    host, port, base = parse_hub(hub, hub_default_port(environ))

    user = options["user"]
    if not user:
        raise usage.UsageError(f"No user given: pass --user NAME or set {ENVIRONMENT['user'][0]}.")

    tls_name = options["tls-name"] or host
    options["connect-timeout"] = _seconds(options["connect-timeout"], "connect-timeout")
    origin = getattr(options, "origins", {}).get("via", "")
    if origin.startswith("profile"):
        source = f"profile {options.profile_name}"
    else:
        source = origin.removeprefix("env ") if origin.startswith("env ") else "--via"
    choice = choose_via(options["via"] or None, environ, host, source)
    options["via"], options["via-warning"] = choice.spec, choice.warning
    options["ssh-command"] = options["ssh-command"] or "ssh"
    _settle_ca(options, environ, options["ca-cert"])
    return HubTarget(host=host, port=port, user=user, server=server, base_path=base, tls_name=tls_name)


def check_server_options(options: dict[str, Any]) -> dict[str, Any]:
    """
    The spawn options, refused when the hub would read them as something else: JupyterHub 6 takes a
    body with a ``user_options`` or ``display_name`` key as its own fields, and older releases the
    whole body as the options, so only the body itself is sent and those two names cannot be options.
    """
    for reserved in ("user_options", "display_name"):
        if reserved in options:
            raise usage.UsageError(
                f"--server-options cannot set {reserved!r}: the hub reads that name as its own field."
            )
    return options


def _settle_ca(options: usage.Options, environ: Mapping[str, str], given: str | None) -> None:
    """
    ``ca-cert``: the file given, or through an SSH bastion with none given, the cluster CA that
    ``login`` read from the login node and saved beside the token file (:mod:`jds.cluster_ca`).
    ``ca-cert-remote``: the login node's path of ``--ca-cert ssh:PATH`` ("" for its default folder
    when none is given), for ``login`` to read; ``None`` when there is nothing to read over ssh.
    """
    over_ssh = options["via"].kind == "ssh"
    options["ca-cert-remote"] = None
    if over_ssh:
        try:
            base_command(options["ssh-command"])
        except ValueError as exc:
            raise usage.UsageError(f"--ssh-command {options['ssh-command']!r}: {exc}") from None
    if given and given.startswith("ssh:"):
        if not over_ssh:
            raise usage.UsageError(
                f"--ca-cert {given}: reading the CA from the login node needs --via ssh://LOGIN-NODE."
            )
        options["ca-cert-remote"] = given[4:]
        given = None
    elif not given and over_ssh:
        options["ca-cert-remote"] = ""
    if not given and over_ssh:
        saved = ca_beside(options.get("token-file") or default_hub_token_path(environ))
        given = str(saved) if saved.exists() else None
    options["ca-cert"] = os.path.abspath(os.path.expanduser(given)) if given else None
    try:
        load_trust_root(options["ca-cert"])
    except TLSConfigError as exc:
        raise usage.UsageError(str(exc)) from None


class HubOptions(ProfiledOptions):
    """
    What every command that reaches the hub (the daemon, ``check``, ``login``) makes of
    :data:`HUB_PARAMETERS`, each of them also from a saved profile (``--profile``).
    """

    environment = ENVIRONMENT

    def opt_server_options(self, text: str) -> None:
        """A spawn option, KEY=VALUE (a string, as typed) or KEY:=JSON (a number, true, a list), repeatable: the user_options the proxy sends when it starts your server, as the hub's spawn form would. Replaces the profile's server_options."""
        self.add_server_option(text)

    def hub_policy(self, reactor: Any, spares: int = 0, spare_seconds: float = 4.0) -> HubTLSPolicy:
        """
        The one way to the hub these options describe: its address, verified name, CA and timeout.
        The daemon asks for ``spares`` (see :mod:`jds.spares`); one-shot commands such as ``check`` do not.
        """
        target: HubTarget = self["target"]
        return HubTLSPolicy(
            reactor, target.host, target.port, target.verify_name, self["ca-cert"],
            connect_timeout=self["connect-timeout"], spares=spares, spare_seconds=spare_seconds,
            via=self.via(reactor),
        )

    def via(self, reactor: Any) -> Via:
        """
        The via these options name, made once: every policy built from the same options shares it,
        so the daemon and its start-up check use one ssh session, not two.
        """
        made = getattr(self, "_via", None)
        if made is None:
            made = self._via = make_via(reactor, self["via"], self["ssh-command"], self["connect-timeout"])
        return made


class Options(HubOptions):
    synopsis = "[--profile NAME] [--hub HOST[:PORT] --user NAME] [options]"
    longdesc = (
        "Serve your server on a JupyterHub to a local IDE as a plain Jupyter server. Configure the "
        "IDE with the 'existing Jupyter server' URL printed at start-up. 'jupyter-dev-server login "
        "--hub HOST --user NAME' saves a profile; then 'jupyter-dev-server' alone runs it (another "
        "profile: --profile NAME). Each setting comes from, in this order: the option on the command "
        "line, the environment variable of the original jupyter-dev-server script named in its help, "
        "the profile, the default; 'jupyter-dev-server config' shows which. "
        "Helpers: 'jupyter-dev-server check' (test the chain to your server), 'jupyter-dev-server "
        "status' (ask a running daemon), 'jupyter-dev-server login' (get a hub token with your "
        "password and save the profile), 'jupyter-dev-server config' (the settings in effect and where "
        "each came from), 'jupyter-dev-server rotate-token' (a new local token, ending every "
        "login), 'jupyter-dev-server demo' (a throwaway hub to try an IDE on); "
        "each takes --help."
    )
    optParameters = [
        *HUB_PARAMETERS[:2],
        ["server", None, "", "A named server of yours (/user/NAME/SERVER/); default: your default server."],
        ["root", None, None,
         "A folder of your server, relative to its root, that the IDE sees as the server's root: "
         f"files, notebooks' kernels and new terminals start there. [{env_note('root')}; "
         "default: the server's root]"],
        *HUB_PARAMETERS[2:],
        ["listen", None, None,
         f"Twisted endpoint to serve the IDE on. [{env_note('listen')}; default: {DEFAULT_LISTEN}]"],
        ["token-file", None, None,
         "Managed mode: a file (mode 600) with your hub API token, as 'jupyter-dev-server login' writes "
         "it. The proxy then holds the token, starts your server when needed and gives the IDE a local "
         f"token instead. [{env_note('token-file')} holds the token itself]"],
        ["local-token-file", None, None,
         "Where managed mode keeps its local token, reused across restarts. "
         "[default: $XDG_STATE_HOME/jupyter-dev-server/local-token]"],
        ["spawn-timeout", None, "600", "Seconds to wait for your server to start (batch queues are slow)."],
        ["response-timeout", None, "300",
         "Seconds to wait for the hub's answer to a request before the IDE gets a 504."],
        ["kernel-start-timeout", None, "1800",
         "Seconds to wait for the answer to a kernel start (POST /api/sessions, /api/kernels, a kernel "
         "restart): kernels that run as batch jobs or pods may queue for minutes."],
        ["stall-timeout", None, "60",
         "Seconds a response body from the hub may make no progress before the IDE's connection is "
         "dropped (a hub gone silent mid-download); time the IDE itself is slow to read does not count."],
        ["ping-interval", None, "30",
         "Seconds between WebSocket pings that keep idle kernels connected. A hub link that goes "
         "silent is noticed within this plus 15 s (45 s by default)."],
        ["reconnect-window", None, "900",
         "Seconds (awake time: a suspended laptop's sleep does not count) that a kernel, terminal "
         "or event WebSocket waits for a broken hub link to come back before the IDE is told (close "
         "1011); 0 closes it at once."],
        ["reconnect-buffer", None, "64",
         "MiB of the IDE's messages held for the hub while the link is down; past that the IDE's "
         "WebSocket is closed (1011)."],
        ["header-timeout", None, "30", "Seconds a client has to send a request's headers (against slowloris)."],
        ["body-timeout", None, "60",
         "Seconds a request body may pause before the request is dropped with 408 (against slowloris)."],
        ["max-body-size", None, "0",
         "Largest request body accepted, in bytes (K, M, G suffixes: 1024s); larger ones get 413. "
         "0: no limit (bodies are only accepted with the local token, or any in pass-through mode)."],
        ["held-body-size", None, "1M",
         "Largest request body kept while your server starts, to send it once the server is up; "
         "a larger one gets 503 'retry' instead."],
        ["max-connections-per-client", None, "256",
         "Open connections (WebSockets included) one client address may hold. At the limit a new one "
         "takes the place of the oldest that has not shown the local token (in pass-through mode: the "
         "oldest not being served); only when there is none does it get 503."],
        ["max-connections", None, "512",
         "Open connections of all clients together, bounded as per client; 0: as many as the open-files "
         "limit (ulimit -n) allows, which also caps it (each connection may need a second one to the hub)."],
        ["max-message-size", None, "256M",
         "Largest WebSocket message relayed (each is held whole); a larger one closes the socket with 1009."],
        ["cookie-max-age", None, str(7 * 24 * 3600),
         "Managed mode: seconds a login (the jds-auth cookie) lasts. 'jupyter-dev-server rotate-token' "
         "ends every login at once."],
        ["log-format", None, "text",
         "How log events are written: 'text' (one line each: time, [namespace#level], message) or "
         "'json' (one object per line: time, level, namespace, message, fields)."],
    ]
    optFlags = [
        ["no-spawn", None, "Never start your server; say how to start it instead."],
    ]

    def opt_allow_origin(self, origin: str) -> None:
        """A web page origin allowed to use the proxy (repeatable), e.g. http://localhost:3000."""
        self.setdefault("allow-origin", []).append(origin.rstrip("/"))

    def opt_allow_host(self, host: str) -> None:
        """A Host name the proxy answers to besides localhost, 127.0.0.1 and [::1] (repeatable)."""
        self.setdefault("allow-host", []).append(host.strip().lower())

    def __init__(self, environ: dict[str, str] | None = None) -> None:
        super().__init__()
        self.environ = os.environ if environ is None else environ

    def postOptions(self) -> None:
        self.apply_profile(self.environ)
        target = hub_target(self, self.environ, self["server"] or "")
        self["server-options"] = check_server_options(self.get(SERVER_OPTIONS) or {})

        for name in ("spawn-timeout", "response-timeout", "kernel-start-timeout", "ping-interval", "header-timeout",
                     "body-timeout", "cookie-max-age", "stall-timeout"):
            self[name] = _seconds(self[name], name)
        self["reconnect-window"] = _seconds(self["reconnect-window"], "reconnect-window", allow_zero=True)
        self["reconnect-buffer"] = int(_seconds(self["reconnect-buffer"], "reconnect-buffer", "MiB") * (1 << 20))
        for name in ("max-body-size", "held-body-size", "max-message-size"):
            self[name] = parse_size(self[name], name)
        for name in ("max-connections-per-client", "max-connections"):
            self[name] = _count(self[name], name)
        if self["max-message-size"] == 0:
            raise usage.UsageError("--max-message-size must be above 0: every WebSocket message is held whole.")
        self.setdefault("allow-origin", [])
        self.setdefault("allow-host", [])
        if self["log-format"] not in ("text", "json"):
            raise usage.UsageError(f"--log-format must be 'text' or 'json', not {self['log-format']!r}.")
        self._tokens()

        self["listen"] = self["listen"] or DEFAULT_LISTEN
        # The reactor only once options are parsed: twistd installs the one --reactor names first,
        # and --help never reaches here.
        from twisted.internet import reactor

        try:
            serverFromString(reactor, self["listen"])
        except (ValueError, KeyError, TypeError) as exc:
            raise usage.UsageError(
                f"--listen {self['listen']!r} is not a Twisted endpoint description ({exc}); "
                f"for example {DEFAULT_LISTEN}."
            ) from None

        self["interface"] = listen_interface(self["listen"])
        if not is_loopback(self["interface"]) and not self["hub-token"]:
            raise usage.UsageError(
                f"--listen {self['listen']!r} is reachable from other machines; that needs managed mode "
                "(--token-file), so that every request must carry the local token."
            )

        try:
            root = parse_root(self["root"] or "")
        except ValueError as exc:
            raise usage.UsageError(str(exc)) from None
        self["target"] = dataclasses.replace(target, root=root)

    def renewal_profile(self) -> str | None:
        """The saved profile whose ``login`` renews the hub token in use, if it came from one."""
        origin = getattr(self, "origins", {}).get("token-file", "")
        return self.profile_name if origin.startswith("profile ") else None

    def local_token_default(self) -> Path:
        """The local token's file when --local-token-file is not given: one per saved profile."""
        return default_local_token_path(self.environ, getattr(self, "profile_name", None))

    def _tokens(self) -> None:
        """Managed mode when a hub token is given: read it now, so a bad file stops start-up."""
        hub_token = None
        if self["token-file"]:
            try:
                hub_token = read_hub_token(self["token-file"])
            except TokenFileError as exc:
                raise usage.UsageError(str(exc)) from None
        else:
            hub_token = environment_token(self.environ)
        self["hub-token"] = hub_token
        self["local-token"] = None
        self["local-token-path"] = None
        if hub_token:
            path = Path(self["local-token-file"] or self.local_token_default()).expanduser()
            self["local-token-path"] = path
            try:
                self["local-token"] = load_local_token(path)
            except (OSError, TokenFileError) as exc:
                raise usage.UsageError(
                    f"Cannot use the local token file {path}: {exc}. Choose another with --local-token-file."
                ) from None
