"""
The environment variables that stand for options: the original ``proxy.py``'s ``JUPYTER_*`` ones
(so its users' shell configurations keep working) and a few of ours, in one table.

The table drives everything that reads them: the order option > environment > profile > default
(:class:`jds.profiles.ProfiledOptions` fills an option from here when the command line did not
give it), where ``config`` says a setting came from, and the ``[env ...]`` notes in ``--help``. A
new variable is one more row. No reactor, no sockets here.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from twisted.python import usage

__all__ = [
    "ENVIRONMENT", "VARIABLES", "Variable", "env_note", "environment_value", "environment_token", "hub_default_port", "read",
]

DEFAULT_HUB_PORT = 8000
DEFAULT_LISTEN_PORT = 8000


@dataclass(frozen=True)
class Variable:
    """
    One variable. ``sets`` is false for a variable that only refines its option's value (the hub's
    port when ``--hub`` names none) rather than standing for the option.
    """

    name: str
    option: str
    means: str
    sets: bool = True


VARIABLES: tuple[Variable, ...] = (
    Variable("JUPYTER_SERVER_IP_OR_NAME", "hub", "the hub's address, as --hub takes it"),
    Variable("JUPYTER_SERVER_PORT", "hub", "the hub's port when the address names none", sets=False),
    Variable("JUPYTER_USERNAME", "user", "your user name on the hub"),
    Variable("JUPYTER_SERVER_NAME", "tls-name", "the name verified in the hub's certificate"),
    Variable("JUPYTER_CLUSTER_CA_CERT", "ca-cert", "the cluster CA's PEM file"),
    Variable("JUPYTER_PROXY_IP_OR_NAME", "listen", "the interface the IDE connects to"),
    Variable("JUPYTER_PROXY_PORT", "listen", "the port the IDE connects to"),
    # the token itself, not a file: it never becomes the option's value (nor a line of `config`)
    Variable("JUPYTERHUB_API_TOKEN", "token-file", "your hub token itself"),
    Variable("JUPYTER_DEV_SERVER_ROOT", "root", "the folder the IDE sees as the server's root"),
    Variable("JUPYTER_DEV_SERVER_VIA", "via", "how the hub is reached"),
    Variable("JUPYTER_DEV_SERVER_SSH_COMMAND", "ssh-command", "the ssh program for --via ssh://"),
)

# option -> the variables that stand for it (any of them set: the option comes from the environment)
ENVIRONMENT: dict[str, tuple[str, ...]] = {}
for _row in VARIABLES:
    if _row.sets:
        ENVIRONMENT[_row.option] = (*ENVIRONMENT.get(_row.option, ()), _row.name)
del _row

# options whose variables hold something other than the option's value
_NOT_A_VALUE = frozenset({"token-file"})


def read(environ: Mapping[str, str], name: str) -> str | None:
    """A variable's value, ``None`` when unset or blank (the original tool's ``VAR=`` means unset)."""
    return environ.get(name, "").strip() or None


def env_note(option: str) -> str:
    """``env A, B`` for an option's help, from the table (every variable of the option)."""
    return "env " + ", ".join(row.name for row in VARIABLES if row.option == option)


def _port(environ: Mapping[str, str], name: str, default: int) -> int:
    value = read(environ, name)
    if value is None:
        return default
    try:
        port = int(value)
    except ValueError:
        port = -1
    if not 0 < port < 65536:
        raise usage.UsageError(f"{name} must be a port number from 1 to 65535, not {value!r}.")
    return port


def hub_default_port(environ: Mapping[str, str]) -> int:
    """The hub's port when ``--hub`` (or its variable, or the profile) names none."""
    return _port(environ, "JUPYTER_SERVER_PORT", DEFAULT_HUB_PORT)


def _listen(environ: Mapping[str, str]) -> str | None:
    address = read(environ, "JUPYTER_PROXY_IP_OR_NAME")
    if address is None and read(environ, "JUPYTER_PROXY_PORT") is None:
        return None
    port = _port(environ, "JUPYTER_PROXY_PORT", DEFAULT_LISTEN_PORT)
    interface = (address or "127.0.0.1").replace(":", "\\:")
    return f"tcp:{port}:interface={interface}"


def environment_token(environ: Mapping[str, str]) -> str | None:
    """The hub token the environment holds (``--token-file``'s variable), if any."""
    return next((value for name in ENVIRONMENT["token-file"] if (value := read(environ, name))), None)


def environment_value(environ: Mapping[str, str], option: str) -> str | None:
    """
    The value the environment gives ``option``, as it would be typed on the command line; ``None``
    when none of its variables is set, or when they hold something else (``JUPYTERHUB_API_TOKEN`` is
    the token that ``--token-file`` would hold: :func:`read` it where the token is wanted).
    """
    if option == "listen":
        return _listen(environ)
    if option in _NOT_A_VALUE:
        return None
    for name in ENVIRONMENT.get(option, ()):
        value = read(environ, name)
        if value is not None:
            return value
    return None
