"""
A small SSH bastion for the ``--via ssh://`` tests and the via benchmark, run as its own process
(``python tests/sshd.py ...``) and stopped by its pid; the client side is the system's real ``ssh``.

- Public-key logins only, against an ``authorized_keys`` file; each successful login appends a line
  to ``--logins`` (the tests count them), and so does each connection, refused ones included (``connect``).
- Commands run are appended there too (``exec ...``). Forwards (``direct-tcpip``) to any host, resolving ``--resolve NAME=ADDRESS`` itself: the site's DNS,
  which knows a hub name this machine cannot resolve. A refused or unresolvable destination fails the
  channel with the reason, as OpenSSH's sshd does.
- ``cat`` and ``ls`` of the cluster CA folder, ``/cm/local/apps/jupyter/current/conf/certs/``, served
  from ``--certs``; any other command exits 127.

It prints ``listening on PORT`` once it accepts connections.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import shlex
import socket
import sys

import asyncssh

CERTS_FOLDER = "/cm/local/apps/jupyter/current/conf/certs"


class _Bastion(asyncssh.SSHServer):
    def __init__(self, options: argparse.Namespace) -> None:
        self.options = options
        self.conn: asyncssh.SSHServerConnection | None = None

    def connection_made(self, conn: asyncssh.SSHServerConnection) -> None:
        self.conn = conn
        with open(self.options.logins, "a") as out:
            out.write("connect\n")

    def begin_auth(self, username: str) -> bool:
        return True

    def password_auth_supported(self) -> bool:
        return False

    def auth_completed(self) -> None:
        with open(self.options.logins, "a") as out:
            out.write(f"login {self.conn.get_extra_info('username') if self.conn else '?'}\n")

    def connection_requested(self, dest_host: str, dest_port: int, orig_host: str, orig_port: int):
        address = self.options.names.get(dest_host.lower(), dest_host)
        return self._forward(address, dest_port)

    async def _forward(self, address: str, port: int):
        assert self.conn is not None
        try:
            return await self.conn.forward_connection(address, port)
        except asyncssh.ChannelOpenError as exc:
            # OpenSSH's words ("Connection refused"), not asyncssh's "[Errno 111] Connect call failed ..."
            words = "Connection refused" if "Connect call failed" in exc.reason else re.sub(r"^\[Errno -?\d+\] ", "", exc.reason)
            raise asyncssh.ChannelOpenError(asyncssh.OPEN_CONNECT_FAILED, words) from None


def _local(path: str, certs: str) -> str | None:
    normal = os.path.normpath(path)
    if normal == CERTS_FOLDER:
        return certs
    if normal.startswith(CERTS_FOLDER + "/"):
        return os.path.join(certs, normal[len(CERTS_FOLDER) + 1 :])
    return None


def _session(options: argparse.Namespace):
    async def handle(process: asyncssh.SSHServerProcess) -> None:
        words = shlex.split(process.command or "")
        with open(options.logins, "a") as out:
            out.write(f"exec {process.command}\n")
        status = 127
        if words and words[0] in ("cat", "ls"):
            paths = [word for word in words[1:] if not word.startswith("-")]
            local = [_local(path, options.certs) for path in paths]
            status = 0
            for path, mapped in zip(paths, local, strict=True):
                try:
                    if mapped is None:
                        raise FileNotFoundError
                    if words[0] == "ls":
                        process.stdout.write("".join(f"{name}\n" for name in sorted(os.listdir(mapped))))
                    else:
                        with open(mapped) as handle:
                            process.stdout.write(handle.read())
                except OSError:
                    process.stderr.write(f"{words[0]}: {path}: No such file or directory\n")
                    status = 1
        else:
            process.stderr.write(f"sh: {words[0] if words else ''}: not found\n")
        process.exit(status)

    return handle


async def _serve(options: argparse.Namespace) -> None:
    server = await asyncssh.listen(
        "127.0.0.1",
        options.port,
        server_host_keys=[options.host_key],
        authorized_client_keys=options.authorized_keys,
        server_factory=lambda: _Bastion(options),
        process_factory=_session(options),
        encoding="utf-8",
        allow_scp=False,
        keepalive_interval=0,
        reuse_address=True,
    )
    port = server.sockets[0].getsockname()[1]
    print(f"listening on {port}", flush=True)
    await asyncio.Event().wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--host-key", required=True)
    parser.add_argument("--authorized-keys", required=True)
    parser.add_argument("--logins", required=True)
    parser.add_argument("--certs", default=os.devnull)
    parser.add_argument("--resolve", action="append", default=[], help="NAME=ADDRESS, the site's DNS")
    options = parser.parse_args()
    options.names = dict(item.lower().split("=", 1) for item in options.resolve)
    socket.setdefaulttimeout(30)
    try:
        asyncio.run(_serve(options))
    except KeyboardInterrupt:
        sys.exit(0)


if __name__ == "__main__":
    main()
