"""twistd dropin: ``twistd jupyter-dev-server --hub ... --user ...``."""

from jds.service import JupyterDevServerMaker

jupyterDevServer = JupyterDevServerMaker()
