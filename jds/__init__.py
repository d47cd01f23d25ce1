"""jupyter-dev-server: a JupyterHub user's server, served to a local IDE as a plain Jupyter server."""

__version__ = "0.1.0"
