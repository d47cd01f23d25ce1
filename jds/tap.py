"""
What twistd loads for ``twistd jupyter-dev-server``: the options and the service maker.

The plugin (``twisted/plugins/jds_plugin.py``) names this module by string, so scanning plugins
imports nothing of jds; ``--help`` imports only :mod:`jds.options`, and the daemon itself is
imported when twistd makes the service.
"""

from __future__ import annotations

import sys

from twisted.application.service import IService
from twisted.python.usage import UsageError

from jds import options

__all__ = ["Options", "makeService"]


class Options(options.Options):
    """:class:`jds.options.Options` as twistd parses them, with a failing exit status on bad options."""

    def parseOptions(self, options: list[str] | None = None) -> None:
        try:
            super().parseOptions(options)
        except UsageError as error:
            # twistd before Twisted 26 prints the error and exits 0: a daemon that did not start
            # must not look as if it had (systemd, scripts). The one sentence that matters, then 1.
            print(f"twistd jupyter-dev-server: {error}", file=sys.stderr)
            raise SystemExit(1) from None


def makeService(options: Options) -> IService:
    # lazy load: the proxy, relay and TLS stack only when the daemon runs, not for --help
    from jds.service import make_service

    return make_service(options)
