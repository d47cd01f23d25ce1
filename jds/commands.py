"""
What the helper commands (``check``, ``status``, ``demo``) share with the daemon's own front end: one
way to parse a command's options and say a mistake in one line. Low in the layers so the commands do
not import :mod:`jds.cli`, which imports them.
"""

from __future__ import annotations

import sys
from typing import Any

from twisted.python import usage

__all__ = ["parse_subcommand"]


def parse_subcommand(options: Any, argv: list[str], name: str) -> int | None:
    """Parse a helper command's options; on a mistake say it in one line and return exit status 2."""
    try:
        options.parseOptions(argv)
    except usage.UsageError as exc:
        print(f"jupyter-dev-server{' ' + name if name else ''}: {exc}", file=sys.stderr)
        return 2
    return None
