"""
Reading a WebSocket message with a deadline that holds whatever the other end does.

websocket-client's blocking reads restart their timeout on every byte and answer pings inside
``recv``: the proxy pings every 30 s and keeps an IDE's kernel socket open through a hub outage (up
to ``--reconnect-window``, 15 min), so ``ws.recv()`` under a socket timeout, or a poll around it,
can wait far past its deadline (the 64 MiB kernel-reply test once hung 8 minutes that way). Here
pings come back to the loop, and a message still arriving at the deadline is cut off there: the
socket is shut down under the read.
"""

from __future__ import annotations

import socket
import threading
import time

import websocket

__all__ = ["receive_by"]


def _shut(ws: websocket.WebSocket) -> None:
    try:
        ws.sock.shutdown(socket.SHUT_RDWR)
    except (AttributeError, OSError):  # already closed
        pass


def receive_by(ws: websocket.WebSocket, deadline: float, what: str = "a message") -> bytes:
    """The next text or binary message's payload; AssertionError at ``deadline`` (``time.monotonic``)
    or on a close, never later. The socket is unusable after a timeout."""
    watchdog = threading.Timer(max(deadline - time.monotonic(), 0.0), _shut, (ws,))
    watchdog.daemon = True
    watchdog.start()
    try:
        while (left := deadline - time.monotonic()) > 0:
            ws.settimeout(left)
            try:
                opcode, data = ws.recv_data(control_frame=True)
            except (websocket.WebSocketException, OSError) as exc:
                if time.monotonic() >= deadline - 0.05:
                    break
                raise AssertionError(f"the socket failed while waiting for {what}: {exc!r}") from exc
            if opcode in (websocket.ABNF.OPCODE_TEXT, websocket.ABNF.OPCODE_BINARY):
                return data
            if opcode == websocket.ABNF.OPCODE_CLOSE:
                raise AssertionError(f"closed ({data!r}) while waiting for {what}")
    finally:
        watchdog.cancel()
    raise AssertionError(f"no {what} by the deadline")
