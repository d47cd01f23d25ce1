"""
The OpenSSH command lines ``--via ssh://`` runs, and what ssh's last stderr line means to a user.

The system's ``ssh`` is the transport, as git, rsync and VS Code Remote-SSH use it, so the user's
``~/.ssh/config`` (ProxyJump, User, IdentityFile, certificates, Kerberos), agent and known_hosts work
as they already do. The proxy adds only what makes ssh a good child process: never a prompt
(BatchMode, no terminal, stdin closed), a forward to a Unix socket in a private directory (never a
TCP port other users of the machine could reach), exit when that forward cannot be set up, notice a
silent link (ServerAlive), and a control master of its own so that a command (``login`` reading the
cluster CA) runs over the same login. Options given on ssh's command line win over the config file,
so the user's ``ControlPersist`` or ``LocalForward`` lines cannot turn this process into a daemon.

Pure: strings in, argument lists and sentences out; :mod:`jds.bastion` runs them.
"""

from __future__ import annotations

import os
import re
import shlex
from dataclasses import dataclass

__all__ = [
    "SSHDestination",
    "base_command",
    "by_hand",
    "describe_ssh_failure",
    "forward_command",
    "last_stderr_line",
    "master_command",
    "remote_command",
]

# What makes ssh a child process that never waits for anyone (see the module docstring).
_CHILD_OPTIONS = (
    "BatchMode=yes",
    "ExitOnForwardFailure=yes",
    "ServerAliveInterval=15",
    "ServerAliveCountMax=3",
    "StreamLocalBindUnlink=yes",
    "ControlMaster=yes",
    "ControlPersist=no",
    "ConnectTimeout=15",
    # ssh's default, whatever the user's config says: a failed channel ("open failed") is an INFO line
    "LogLevel=INFO",
)

_CHANNEL_FAILED = re.compile(r"^channel \d+: open failed: (.*)$")


@dataclass(frozen=True)
class SSHDestination:
    """``[user@]host[:port]`` of ``--via ssh://``; ``host`` may be an alias of the user's ssh config."""

    host: str
    user: str | None = None
    port: int | None = None

    @property
    def target(self) -> str:
        """ssh's destination argument: ``user@host`` or ``host`` (the port goes in ``-p``)."""
        return f"{self.user}@{self.host}" if self.user else self.host

    @property
    def display(self) -> str:
        """The destination as the user wrote it, for logs, ``status`` and ``check``."""
        return self.target + (f":{self.port}" if self.port else "")

    def args(self) -> list[str]:
        return (["-p", str(self.port)] if self.port else []) + [self.target]


def base_command(ssh_command: str) -> list[str]:
    """
    ``--ssh-command`` split as a shell would (``ssh -F ~/work/ssh_config -i key``), with a leading
    ``~`` expanded in each word as the shell would have; ``ValueError`` when it is empty or unbalanced.
    """
    words = shlex.split(ssh_command)
    if not words:
        raise ValueError("--ssh-command is empty: give the ssh program, such as 'ssh' or '/usr/bin/ssh -F FILE'.")
    return [os.path.expanduser(word) if word.startswith("~") else word for word in words]


def _forward_spec(socket_path: str, host: str, port: int) -> str:
    far = f"[{host}]" if ":" in host else host
    return f"{socket_path}:{far}:{port}"


def master_command(
    base: list[str], dest: SSHDestination, control: str, forwards: list[tuple[str, str, int]]
) -> list[str]:
    """
    The one long-lived ssh: a control master (``control`` is its socket) holding each
    ``(socket_path, hub_host, hub_port)`` forward; ``hub_host`` is resolved by the bastion.
    """
    args = [*base, "-N", "-T", "-n", "-M", "-S", control]
    for option in _CHILD_OPTIONS:
        args += ["-o", option]
    for socket_path, host, port in forwards:
        args += ["-L", _forward_spec(socket_path, host, port)]
    return [*args, *dest.args()]


def _client(base: list[str], dest: SSHDestination, control: str) -> list[str]:
    """An ssh that only talks to the running master, never logs in by itself."""
    return [*base, "-S", control, "-o", "ControlMaster=no", "-o", "BatchMode=yes", "-o", "LogLevel=ERROR"]


def forward_command(base: list[str], dest: SSHDestination, control: str, socket_path: str, host: str, port: int) -> list[str]:
    """Ask the running master for one more forward (a second hub address, rare)."""
    return [*_client(base, dest, control), "-O", "forward", "-L", _forward_spec(socket_path, host, port), *dest.args()]


def remote_command(base: list[str], dest: SSHDestination, control: str, argv: list[str]) -> list[str]:
    """Run ``argv`` on the bastion over the master's session: no second login."""
    return [*_client(base, dest, control), "-T", "-n", *dest.args(), "--", shlex.join(argv)]


def by_hand(base: list[str], dest: SSHDestination) -> str:
    """The command a user runs once in a terminal to answer what ssh would have asked."""
    return shlex.join([*base, *dest.args()])


def last_stderr_line(text: str) -> str:
    """ssh's reason: the last non-empty line, ``ssh: `` dropped, warnings only if nothing else."""
    lines = [line.strip() for line in text.replace("\r", "\n").splitlines() if line.strip()]
    lines = [line[5:] if line.startswith("ssh: ") else line for line in lines]
    meaningful = [line for line in lines if not line.lower().startswith("warning:")]
    chosen = meaningful or lines
    return chosen[-1] if chosen else ""


def describe_ssh_failure(line: str, dest: SSHDestination, manual: str, hub: str, exit_code: int | None = None) -> tuple[str, str]:
    """
    ``(sentence, reason)`` for ssh's last stderr ``line``: the sentence quotes ssh and says what to
    do, the same words in the IDE's 502, ``check`` and the log. ``manual`` is :func:`by_hand`'s.
    """
    said = f'ssh to {dest.display} failed: "{line}"' if line else (
        f"ssh to {dest.display} exited" + (f" with status {exit_code}" if exit_code is not None else "")
        + " without saying why"
    )
    lower = line.lower()
    channel = _CHANNEL_FAILED.match(line)
    if channel:
        return (
            f'The bastion {dest.display} cannot reach the hub at {hub}: ssh says "{line}"; check --hub '
            f"(the address is resolved and dialled by {dest.host}).",
            "via-hub-unreachable",
        )
    if "host key verification failed" in lower or "remote host identification has changed" in lower:
        return (
            f"{said}: ssh does not know (or no longer trusts) {dest.host}'s host key; run "
            f"'{manual}' once in a terminal, check the fingerprint, and accept it.",
            "via-host-key",
        )
    if "permission denied" in lower or "too many authentication failures" in lower:
        return (
            f"{said}: run '{manual}' once in a terminal to see which login works; a key with a "
            "passphrase must be loaded into the agent with 'ssh-add' (jupyter-dev-server never types one).",
            "via-login-refused",
        )
    if "could not resolve hostname" in lower:
        return (
            f"{said}: check the host in --via (or its Host entry in your ssh config) with '{manual}'.",
            "via-unresolvable",
        )
    if any(words in lower for words in ("connection refused", "timed out", "no route to host", "network is unreachable",
                                        "connection closed", "connection reset", "broken pipe")):
        return (
            f"{said}: the bastion is not reachable from here (network, VPN, or the bastion is down); "
            f"try '{manual}'.",
            "via-unreachable",
        )
    return (f"{said}; run '{manual}' once in a terminal to see why.", "via-failed")
