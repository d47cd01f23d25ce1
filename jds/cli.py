"""
``jupyter-dev-server``: the daemon in the foreground, as ``twistd -n jupyter-dev-server`` would run it,
without leaving a ``twistd.pid`` behind in the current directory and without twistd's scan of every
installed plugin; and its helpers: ``check`` (is the chain to the hub sound?), ``status`` (what is a
running daemon doing?), ``login`` (a hub token from the cluster password, for managed mode),
``config`` (the settings in effect and where each came from), ``rotate-token`` (a new local
token, ending every login) and ``demo`` (a throwaway hub on loopback
with the daemon in front, to try an IDE against).
"""

from __future__ import annotations

import importlib.util
import sys

__all__ = ["main"]


_HELPERS = ("check", "status", "login", "rotate-token", "demo")


def leave_out_system_openssl() -> None:
    """
    The daemon does TLS with pyOpenSSL, whose cryptography wheel carries its own OpenSSL. The
    standard library's ``ssl`` and ``_hashlib`` would map the system's libssl and libcrypto as well:
    ``ssl`` comes in through asyncio (which ``twisted.internet.defer`` imports) and ``_hashlib``
    through ``urllib.request`` (``twisted.python.compat``), and both only *try* those imports. Left
    out, the idle daemon is ~5 MiB smaller (``benchmarks/HISTORY.md``). ``hashlib`` then uses
    Python's own SHA-1 and SHA-256 (the WebSocket handshake and the XSRF value need no others), so
    ``_hashlib`` stays when this Python was built without them. Call it before anything imports
    Twisted; the helper commands do not (``demo`` runs JupyterHub, which needs ``ssl``).
    """
    if "ssl" not in sys.modules:
        sys.modules["ssl"] = None  # type: ignore[assignment]
    builtin_sha256 = importlib.util.find_spec("_sha256") or importlib.util.find_spec("_sha2")
    if "_hashlib" not in sys.modules and importlib.util.find_spec("_sha1") and builtin_sha256:
        sys.modules["_hashlib"] = None  # type: ignore[assignment]


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args[:1] not in [[name] for name in _HELPERS]:
        leave_out_system_openssl()
    # lazy loads, here and below: each command imports only what it runs
    from jds.service import ListenError

    if args[:1] == ["check"]:
        # lazy load: only for this command
        from jds.check import main as check

        return check(args[1:])
    if args[:1] == ["status"]:
        # lazy load: only for this command
        from jds.status_command import main as status

        return status(args[1:])
    if args[:1] == ["login"]:
        # lazy load: only for this command
        from jds.hublogin import main as login

        return login(args[1:])
    if args[:1] == ["config"]:
        # lazy load: only for this command
        from jds.config_command import main as config

        return config(args[1:])
    if args[:1] == ["rotate-token"]:
        # lazy load: only for this command
        from jds.tokens import rotate_main

        return rotate_main(args[1:])
    if args[:1] == ["demo"]:
        # lazy load: only for this command
        from jds.demo import main as demo

        return demo(args[1:])
    if not {"--help", "-h", "--version"} & set(args):
        # twistd would print its whole usage text before the one sentence that matters
        from jds.commands import parse_subcommand  # lazy load, as above
        from jds.options import Options  # lazy load, as above

        failed = parse_subcommand(Options(), args, "")
        if failed is not None:
            return failed
    sys.argv = ["jupyter-dev-server", "--nodaemon", "--pidfile=", "jupyter-dev-server", *args]
    from twisted.application import app
    from twisted.scripts import twistd

    try:
        app.run(twistd.runApp, _server_options())
    except ListenError as exc:
        print(f"jupyter-dev-server: {exc}", file=sys.stderr)
        return 1
    return 0


def _server_options() -> type:
    """
    twistd's own options (every twistd flag works as with ``twistd``) that know one sub-command,
    this daemon. twistd's would import every installed ``IServiceMaker`` plugin to list them
    (conch, mail, names, words, autobahn's, with trial's and cred's interfaces from the plugin
    cache): about 1 MiB of modules the running daemon would keep and never use.
    """
    from twisted.application.service import IServiceMaker
    from twisted.scripts import twistd

    class ServerOptions(twistd.ServerOptions):
        @staticmethod
        def _getPlugins(interface: type) -> list:  # noqa: N802 - twistd's name
            if interface is not IServiceMaker:
                return list(twistd.ServerOptions._getPlugins(interface))
            from twisted.plugins.jds_plugin import jupyterDevServer

            return [jupyterDevServer]

    return ServerOptions


if __name__ == "__main__":
    sys.exit(main())
