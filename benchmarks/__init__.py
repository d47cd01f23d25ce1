"""`make bench`: jupyter-dev-server against direct access and configurable-http-proxy (see README.md)."""
