"""
How the bytes reach the hub: ``--via`` and the proxy variables of the environment, read once into a
frozen :class:`ViaSpec`, and the :class:`Via` interface every kind implements.

Pure: no reactor and no sockets, so parsing and the ``NO_PROXY`` rules are tested without Twisted.
The kinds themselves live in :mod:`jds.reach` (direct, HTTP CONNECT, SOCKS5) and :mod:`jds.bastion`
(ssh); :class:`jds.tls.HubTLSPolicy` puts TLS on top of whichever one the user chose, so the hub's
certificate is verified end to end and the via only ever carries encrypted bytes.

The environment is read as curl reads it: ``https_proxy``/``HTTPS_PROXY`` for an https URL, then
``all_proxy``/``ALL_PROXY``, the lower-case name winning where both are set; ``no_proxy``/``NO_PROXY``
lists names (a leading dot or none: the domain and its subdomains), IP addresses, CIDR blocks and
``*``; ports are not matched. ``--via`` (or ``JUPYTER_DEV_SERVER_VIA``, read by :mod:`jds.options`)
overrides all of it.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol
from urllib.parse import unquote, urlsplit

from twisted.python.usage import UsageError

if TYPE_CHECKING:  # typing only: this module needs no reactor
    from twisted.internet.defer import Deferred
    from twisted.internet.interfaces import IStreamClientEndpoint
    from twisted.python.failure import Failure

    from jds.refusal import Refusal

__all__ = [
    "KINDS", "Via", "ViaChoice", "ViaSpec", "choose_via", "no_proxy_matches", "parse_via", "proxy_from_environment",
]

# The kinds, with the port each uses when the URL names none (curl's for socks5; http and https as
# requests and a browser's proxy settings use them).
KINDS: dict[str, int] = {"direct": 0, "http": 80, "https": 443, "socks5": 1080, "ssh": 22}
_NAMES = {"direct": "no proxy", "http": "HTTP proxy", "https": "HTTPS proxy", "socks5": "SOCKS5 proxy", "ssh": "SSH bastion"}
# Schemes read as another kind: curl's socks5h (names resolved by the proxy) is what socks5 always does here.
_ALIASES = {"socks5h": "socks5", "socks": "socks5"}


@dataclass(frozen=True)
class ViaSpec:
    """
    One way to the hub, as parsed. ``password`` never appears in :meth:`describe`, :meth:`url` or
    ``repr``; ``source`` says where it came from (``--via``, ``HTTPS_PROXY``, ...) for messages.
    """

    kind: str
    host: str = ""
    port: int = 0
    user: str = ""
    password: str = field(default="", repr=False)
    source: str = ""

    @property
    def direct(self) -> bool:
        return self.kind == "direct"

    @property
    def address(self) -> str:
        """``host:port`` (brackets around an IPv6 address), or ``""`` for direct."""
        if self.direct:
            return ""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    def url(self) -> str:
        """The via as a URL without its password (an ssh or proxy user name is kept: it is no secret)."""
        if self.direct:
            return "direct"
        user = f"{self.user}@" if self.user and self.kind == "ssh" else ""
        return f"{self.kind}://{user}{self.address}"

    def describe(self) -> str:
        """For a person: ``the HTTP proxy at proxy.example:3128 (from HTTPS_PROXY)``, ``no proxy (from --via)``;
        never a password."""
        origin = ""
        if self.source:
            origin = f" (from {self.source})" if " " not in self.source else f" ({self.source})"
        if self.direct:
            return f"no proxy{origin}"
        where = f"{self.user}@{self.address}" if self.kind == "ssh" and self.user else self.address
        return f"the {_NAMES[self.kind]} at {where}{origin}"

    def how(self) -> str:
        """For the start-up line: ``directly (NO_PROXY exempts hub)``, ``through the SOCKS5 proxy at ...``."""
        return "directly" + self.describe()[len("no proxy"):] if self.direct else f"through {self.describe()}"

    @property
    def name(self) -> str:
        """``HTTP proxy``, ``SOCKS5 proxy``, ``SSH bastion``."""
        return _NAMES[self.kind]


@dataclass(frozen=True)
class ViaChoice:
    """:func:`choose_via`'s answer: the spec and, at most, one warning to log (never a credential)."""

    spec: ViaSpec
    warning: str = ""


class Via(Protocol):
    """
    What every via kind implements (:mod:`jds.reach`'s ``DirectVia`` and ``ProxyVia``,
    :mod:`jds.bastion`'s ``SSHVia``). Only :class:`jds.tls.HubTLSPolicy` opens connections through
    it; ``check``, ``/_jds/status`` and the daemon's shutdown use the rest.
    """

    spec: ViaSpec

    def endpoint(self, host: str, port: int) -> IStreamClientEndpoint:
        """A stream to ``host:port`` as the far side resolves and dials it (TLS goes on top)."""

    def status(self) -> dict[str, Any]:
        """For ``/_jds/status``: ``kind``, ``address`` (no credentials), ``source``, ``state``, ``restarts``,
        ``last_error`` and, for ssh, ``pid``. JSON-serialisable."""

    def explain(self, failure: Failure) -> Refusal | None:
        """The via's own sentence for one leaf failure of a hub connection, or None if not the via's."""

    def check(self, host: str, port: int) -> Deferred:
        """For ``check``'s via line: fires with a sentence once the via carried a connection to
        ``host:port`` (then closed), or fails with a :class:`Refusal` in the via's own words."""

    def stop(self) -> Deferred | None:
        """The daemon is shutting down: end what the via runs (an ssh process); idempotent."""


def _refuse(source: str, value: str, why: str) -> UsageError:
    shown = _without_password(value)
    return UsageError(f"{source} {shown!r} {why}")


def _without_password(value: str) -> str:
    """``value`` with any ``:password@`` of a URL replaced by ``:***@``, for messages."""
    scheme, sep, rest = value.partition("://")
    if not sep:
        scheme, rest = "", value
    userinfo, at, hostpart = rest.rpartition("@")
    if not at or ":" not in userinfo:
        return value
    user = userinfo.split(":", 1)[0]
    return f"{scheme}{sep}{user}:***@{hostpart}"


def parse_via(value: str, source: str = "--via") -> ViaSpec:
    """
    A :class:`ViaSpec` from ``direct``, ``http://[USER:PASSWORD@]HOST[:PORT]``, ``https://...``,
    ``socks5://[USER:PASSWORD@]HOST[:PORT]`` (``socks5h://`` is the same: names are always resolved
    by the proxy), ``ssh://[USER@]HOST[:PORT]``, or a bare ``HOST:PORT`` (an HTTP proxy, as curl
    reads one). User and password are percent-decoded. Raises :class:`UsageError` with one sentence.
    """
    text = value.strip()
    if text.lower() == "direct":
        return ViaSpec("direct", source=source)
    if not text:
        raise _refuse(source, value, "is empty: give direct, http://HOST:PORT, socks5://HOST:PORT or ssh://HOST.")
    if "://" not in text:
        text = "http://" + text
    try:
        parts = urlsplit(text)
        port = parts.port
    except ValueError as exc:
        raise _refuse(source, value, f"is not a valid proxy address: {exc}.") from None
    scheme = _ALIASES.get(parts.scheme.lower(), parts.scheme.lower())
    if scheme not in KINDS or scheme == "direct":
        raise _refuse(
            source, value,
            f"uses {parts.scheme}://, which jupyter-dev-server cannot go through: give direct, http://, "
            "https://, socks5:// or ssh://.",
        )
    if not parts.hostname:
        raise _refuse(source, value, "names no host.")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise _refuse(source, value, "must be only a scheme, host and port, without a path or query.")
    user = unquote(parts.username) if parts.username is not None else ""
    password = unquote(parts.password) if parts.password is not None else ""
    if scheme == "ssh" and parts.password is not None:
        raise _refuse(
            source, value,
            "carries a password: ssh logs in with your keys, agent or Kerberos as configured in "
            "~/.ssh/config, never a password given here.",
        )
    if scheme == "ssh" and source in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        raise _refuse(source, value, "is an ssh:// address; give it with --via instead.")
    return ViaSpec(scheme, parts.hostname, port or KINDS[scheme], user, password, source)


def no_proxy_matches(no_proxy: str, host: str) -> bool:
    """
    Whether ``NO_PROXY``'s list exempts ``host``: ``*``; a name, with or without a leading dot,
    matching the host or any name under it; an IP address; a CIDR block holding the host's address.
    Ports in entries are ignored (not matched), as curl does.
    """
    name = host.strip().strip("[]").rstrip(".").lower()
    try:
        address = ipaddress.ip_address(name)
    except ValueError:
        address = None
    for raw in no_proxy.replace(" ", ",").split(","):
        entry = _entry_host(raw.strip().lower())
        if not entry:
            continue
        if entry == "*":
            return True
        if "/" in entry:
            try:
                network = ipaddress.ip_network(entry, strict=False)
            except ValueError:
                continue
            if address is not None and address.version == network.version and address in network:
                return True
            continue
        try:
            if ipaddress.ip_address(entry) == address:
                return True
            continue
        except ValueError:
            pass
        domain = entry.lstrip(".").rstrip(".")
        if domain and (name == domain or name.endswith("." + domain)):
            return True
    return False


def _entry_host(entry: str) -> str:
    """A ``NO_PROXY`` entry without its port: ``host:80`` → ``host``; ``[::1]:80`` → ``::1``; ``::1`` stays."""
    if entry.startswith("["):
        return entry[1:].partition("]")[0]
    if entry.count(":") == 1:
        return entry.partition(":")[0]
    return entry


def _first(environ: Mapping[str, str], *names: str) -> tuple[str, str]:
    for name in names:
        value = environ.get(name, "").strip()
        if value:
            return name, value
    return "", ""


def proxy_from_environment(environ: Mapping[str, str], hub_host: str) -> ViaSpec:
    """The via the proxy variables choose for the hub at ``hub_host`` (``direct`` when none applies)."""
    name, value = _first(environ, "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY")
    if not value:
        return ViaSpec("direct", source="no proxy variable set")
    no_name, no_proxy = _first(environ, "no_proxy", "NO_PROXY")
    if no_proxy and no_proxy_matches(no_proxy, hub_host):
        return ViaSpec("direct", source=f"{no_name} exempts {hub_host}")
    spec = parse_via(value, name)
    if spec.direct:
        return ViaSpec("direct", source=f"{name}=direct")
    return spec


def choose_via(value: str | None, environ: Mapping[str, str], hub_host: str, source: str = "--via") -> ViaChoice:
    """
    ``value`` (``--via``, or ``JUPYTER_DEV_SERVER_VIA`` with ``source`` naming it) if given, else the
    proxy variables. A password on the command line is accepted with a warning: every user of the
    machine can read it in ``ps``.
    """
    if value is None or not value.strip():
        return ViaChoice(proxy_from_environment(environ, hub_host))
    spec = parse_via(value, source)
    warning = ""
    if spec.password and source == "--via":
        warning = (
            f"--via carries a password for {spec.describe()}, and every user of this machine can "
            "read a command line (ps): put the proxy URL in HTTPS_PROXY in the environment instead."
        )
    return ViaChoice(spec, warning)
