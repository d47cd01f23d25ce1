# The benchmark's upstream Jupyter server configuration, loaded with `jupyter-server --config=...`.
#
# Stock jupyter_server (2.x, tornado) leaves Nagle's algorithm on for kernel WebSockets. A kernel
# answers a request with several small frames (status busy, the reply, status idle); the second
# small write then waits for the client's delayed ACK, which adds ~40 ms to every round trip on
# *any* path (direct, nginx, configurable-http-proxy, this proxy) and hides what the proxy costs.
# JupyterHub deployments run the same stock server, so real users see those 40 ms too; the
# benchmark turns Nagle off on the upstream kernel WebSocket to measure the proxy, not the server.
from jupyter_server.services.kernels.websocket import KernelWebsocketHandler

_stock_open = KernelWebsocketHandler.open


async def _open_without_nagle(self, kernel_id):
    self.set_nodelay(True)
    await _stock_open(self, kernel_id)


KernelWebsocketHandler.open = _open_without_nagle

c = get_config()  # noqa: F821 - provided by traitlets when it loads this file
# Atomic writing fsyncs every saved file: a 64 MiB upload then measures the disk, not the network
# path, and varies 4x from run to run. The benchmark turns it off on every path alike.
c.FileContentsManager.use_atomic_writing = False
# Kernels talk to the server over Unix sockets, not TCP: jupyter_client picks free TCP ports and
# binds them later, and on a machine where other servers start kernels too, a kernel sometimes
# finds its port taken ("Address already in use") and never answers. The proxy is not involved.
c.KernelManager.transport = "ipc"
