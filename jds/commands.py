"""
The command line's shared pieces, low in the layers so the commands do not import :mod:`jds.cli`
(which imports them): one way to parse a command's options and say a mistake in one line, and the
commands the product prints for the user to run.

Printed commands must run as printed, in a new shell. That shell does not have the virtual
environment's ``bin/`` on its PATH (``make demo`` adds it only for its own child), so a bare
``jupyter-dev-server`` there is "command not found": they name the console script by its absolute
path instead, and quote every argument for a POSIX shell.
"""

from __future__ import annotations

import shlex
import sys
from pathlib import Path
from typing import Any

from twisted.python import usage

from jds.paths import HubTarget, authority
from jds.via import ViaSpec

__all__ = ["hub_arguments", "login_command", "parse_subcommand", "profile_command", "program"]


def parse_subcommand(options: Any, argv: list[str], name: str) -> int | None:
    """Parse a helper command's options; on a mistake say it in one line and return exit status 2."""
    try:
        options.parseOptions(argv)
    except usage.UsageError as exc:
        print(f"jupyter-dev-server{' ' + name if name else ''}: {exc}", file=sys.stderr)
        return 2
    return None


def program() -> str:
    """The ``jupyter-dev-server`` script next to this interpreter, else the bare name (PATH finds it)."""
    script = Path(sys.executable).parent / "jupyter-dev-server"
    return str(script.absolute()) if script.exists() else "jupyter-dev-server"


def hub_arguments(
    target: HubTarget, ca_cert: str | None, via: ViaSpec | None = None, ssh_command: str = "ssh"
) -> list[str]:
    """
    ``--hub``, ``--user`` and the TLS options that reach ``target`` as the daemon reaches it, and
    ``--via`` when it was given on the command line; never its password (that one belongs in
    ``HTTPS_PROXY``), and not a via the environment chose (the new shell has the same environment).
    An ``ssh://`` via keeps its ``--ssh-command`` (no secret: options and file names).
    """
    base = "" if target.base == "/" else target.base
    args = ["--hub", f"https://{authority(target.host, target.port)}{base}", "--user", target.user]
    if ca_cert:
        args += ["--ca-cert", str(Path(ca_cert).absolute())]
    if target.verify_name != target.host.lower():
        args += ["--tls-name", target.verify_name]
    if via is not None and via.source == "--via" and not via.password:
        args += ["--via", via.url()]
        if via.kind == "ssh" and ssh_command != "ssh":
            args += ["--ssh-command", ssh_command]
    return args


def profile_command(profile: str | None, *command: str) -> str:
    """``jupyter-dev-server [COMMAND]`` on a saved profile: nothing more for the default one."""
    chosen = ["--profile", profile] if profile and profile != "default" else []
    return shlex.join([program(), *command, *chosen])


def login_command(
    target: HubTarget,
    ca_cert: str | None,
    token_file: str | Path | None,
    profile: str | None = None,
    via: ViaSpec | None = None,
    ssh_command: str = "ssh",
) -> str:
    """
    ``login`` for the same hub and user, writing ``token_file`` (its default when ``None``); when
    the token file is a saved profile's, the profile's ``login`` says all that.
    """
    if profile:
        return profile_command(profile, "login")
    args = [program(), "login", *hub_arguments(target, ca_cert, via, ssh_command)]
    if token_file is not None:
        args += ["--token-file", str(Path(token_file).absolute())]
    return shlex.join(args)
