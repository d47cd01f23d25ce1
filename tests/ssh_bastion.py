"""
The ``--via ssh://`` tests' bastion: ``tests/sshd.py`` as its own process, a client key made with
``ssh-keygen``, and an ssh_config for the system's ``ssh`` that trusts nothing of the user's (no agent,
no ~/.ssh/known_hosts, only the test key), handed to the proxy as ``--ssh-command "ssh -F CONFIG"``.

Started and stopped by its pid; ``restart()`` keeps its port and host key, as a rebooted bastion does.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from hub import HarnessError, free_port, poll, stop_pid, tail

__all__ = ["HUB_NAME", "SSHBastion"]

SSHD = Path(__file__).resolve().parent / "sshd.py"
# A name this machine cannot resolve (.invalid is reserved); the bastion's "site DNS" knows it.
HUB_NAME = "hub.cluster.invalid"
ALIAS = "login-node"


def _keygen(path: Path) -> str:
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", path.name, "-f", str(path)],
        check=True, stdin=subprocess.DEVNULL, capture_output=True,
    )  # fmt: skip
    return path.with_suffix(".pub").read_text()


class SSHBastion:
    """One bastion for one test; ``ssh_command`` is what the proxy gets with ``--ssh-command``."""

    def __init__(self, directory: Path, certs: Path | None = None, authorise: bool = True, known: bool = True) -> None:
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        self.host_key = directory / "host_key"
        host_public = _keygen(self.host_key)
        self.client_key = directory / "client_key"
        client_public = _keygen(self.client_key)
        self.authorized_keys = directory / "authorized_keys"
        # not authorised: the file holds another key (asyncssh refuses an empty one)
        self.authorized_keys.write_text(client_public if authorise else _keygen(directory / "other_key"))
        self.logins_path = directory / "logins"
        self.logins_path.write_text("")
        self.certs = certs
        self.port = free_port()
        self.known_hosts = directory / "known_hosts"
        self.known_hosts.write_text(f"[127.0.0.1]:{self.port} {host_public}" if known else "")
        self.config = directory / "ssh_config"
        self.config.write_text(
            f"Host {ALIAS}\n"
            f"  HostName 127.0.0.1\n"
            f"  Port {self.port}\n"
            f"  User bastion-user\n"
            f"Host *\n"
            f"  IdentityFile {self.client_key}\n"
            f"  IdentitiesOnly yes\n"
            f"  IdentityAgent none\n"
            f"  UserKnownHostsFile {self.known_hosts}\n"
            f"  GlobalKnownHostsFile /dev/null\n"
            f"  StrictHostKeyChecking yes\n"
            f"  PasswordAuthentication no\n"
            f"  KbdInteractiveAuthentication no\n"
        )
        self.ssh_command = f"ssh -F {self.config}"
        self.log_path = directory / "sshd.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def via(self) -> str:
        return f"ssh://{ALIAS}"

    def start(self, timeout: float = 30) -> SSHBastion:
        command = [
            sys.executable, str(SSHD), "--port", str(self.port), "--host-key", str(self.host_key),
            "--authorized-keys", str(self.authorized_keys), "--logins", str(self.logins_path),
            "--resolve", f"{HUB_NAME}=127.0.0.1",
        ]  # fmt: skip
        if self.certs is not None:
            command += ["--certs", str(self.certs)]
        with open(self.log_path, "ab") as log:
            proc = self.proc = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
        mark = f"listening on {self.port}"

        def ready() -> bool | None:
            if proc.poll() is not None:
                raise HarnessError(f"sshd.py exited with {proc.returncode}:\n{tail(self.log_text())}")
            return self.log_text().count(mark) >= self.starts or None

        self.starts = getattr(self, "starts", 0) + 1
        poll(ready, timeout, "the test bastion to listen", 0.05, lambda: tail(self.log_text()))
        return self

    def stop(self, timeout: float = 10) -> None:
        if self.proc is not None and self.proc.poll() is None:
            stop_pid(self.proc, timeout)

    def kill(self) -> None:
        """A bastion that goes away at once (SIGKILL): its TCP connections are reset or closed."""
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(10)

    def restart(self) -> SSHBastion:
        self.stop()
        return self.start()

    @property
    def logins(self) -> int:
        return sum(line.startswith("login ") for line in self.logins_path.read_text().splitlines())

    @property
    def connections(self) -> int:
        """Every ssh connection made to it, logged in or refused."""
        return self.logins_path.read_text().splitlines().count("connect")

    @property
    def commands(self) -> list[str]:
        return [line[5:] for line in self.logins_path.read_text().splitlines() if line.startswith("exec ")]

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""
