"""
twistd dropin: ``twistd jupyter-dev-server --hub ... --user ...``.

The service module is named by string, as Twisted's own dropins do, so scanning plugins imports no
jds module and no reactor.
"""

from twisted.application.service import ServiceMaker

jupyterDevServer = ServiceMaker(
    "jupyter-dev-server",
    "jds.tap",
    "Serve your JupyterHub server to a local IDE as a plain Jupyter server.",
    "jupyter-dev-server",
)
