"""
``jupyter-dev-server``: the daemon in the foreground, as ``twistd -n jupyter-dev-server`` would run it,
without leaving a ``twistd.pid`` behind in the current directory; and its three helpers:
``check`` (is the chain to the hub sound?), ``status`` (what is a running daemon doing?) and
``demo`` (a throwaway hub on loopback with the daemon in front, to try an IDE against).
"""

from __future__ import annotations

import sys
from typing import Any

__all__ = ["main", "parse_subcommand"]


def parse_subcommand(options: Any, argv: list[str], name: str) -> int | None:
    """Parse a helper command's options; on a mistake say it in one line and return exit status 2."""
    from twisted.python import usage

    try:
        options.parseOptions(argv)
    except usage.UsageError as exc:
        print(f"jupyter-dev-server{' ' + name if name else ''}: {exc}", file=sys.stderr)
        return 2
    return None


def main(argv: list[str] | None = None) -> int:
    from twisted.scripts import twistd

    from jds.service import ListenError

    args = sys.argv[1:] if argv is None else argv
    if args[:1] == ["check"]:
        from jds.check import main as check

        return check(args[1:])
    if args[:1] == ["status"]:
        from jds.status import main as status

        return status(args[1:])
    if args[:1] == ["demo"]:
        from jds.demo import main as demo

        return demo(args[1:])
    if not {"--help", "-h", "--version"} & set(args):
        # twistd would print its whole usage text before the one sentence that matters
        from jds.options import Options

        failed = parse_subcommand(Options(), args, "")
        if failed is not None:
            return failed
    sys.argv = ["jupyter-dev-server", "--nodaemon", "--pidfile=", "jupyter-dev-server", *args]
    try:
        twistd.run()
    except ListenError as exc:
        print(f"jupyter-dev-server: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
