"""
What twistd loads for ``twistd jupyter-dev-server``: the options and the service maker.

The plugin (``twisted/plugins/jds_plugin.py``) names this module by string, so scanning plugins
imports nothing of jds; ``--help`` imports only :mod:`jds.options`, and the daemon itself is
imported when twistd makes the service.
"""

from __future__ import annotations

from twisted.application.service import IService

from jds.options import Options

__all__ = ["Options", "makeService"]


def makeService(options: Options) -> IService:
    # lazy load: the proxy, relay and TLS stack only when the daemon runs, not for --help
    from jds.service import make_service

    return make_service(options)
