"""
A test's WebSocket read fails at its deadline (``ws_deadline.receive_by``), against a raw-socket
server on 127.0.0.1 that does what the proxy does for an IDE whose hub link is lost: keeps the
socket open and pings it, or is cut in the middle of a large message.
"""

from __future__ import annotations

import base64
import hashlib
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import pytest
import websocket
from ws_deadline import receive_by

_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


@contextmanager
def fake_server(behave: Callable[[socket.socket, threading.Event], None]) -> Iterator[int]:
    """A one-connection WebSocket server: the handshake, then ``behave`` until the test is over."""
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(10)
    over = threading.Event()

    def serve() -> None:
        try:
            conn, _ = listener.accept()
        except OSError:
            return
        with conn:
            request = b""
            while b"\r\n\r\n" not in request:
                chunk = conn.recv(4096)
                if not chunk:
                    return
                request += chunk
            key = next(line.split(b":", 1)[1].strip() for line in request.split(b"\r\n")
                       if line.lower().startswith(b"sec-websocket-key:"))  # fmt: skip
            accept = base64.b64encode(hashlib.sha1(key + _GUID).digest())
            conn.sendall(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                         b"Sec-WebSocket-Accept: " + accept + b"\r\n\r\n")  # fmt: skip
            try:
                behave(conn, over)
            except OSError:
                pass

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield listener.getsockname()[1]
    finally:
        over.set()
        listener.close()
        thread.join(10)
        assert not thread.is_alive(), "the fake server did not stop"


def pings(conn: socket.socket, over: threading.Event) -> None:
    """A socket held open through an outage: pings, and nothing else."""
    while not over.wait(0.2):
        conn.sendall(b"\x89\x00")


def trickle(conn: socket.socket, over: threading.Event) -> None:
    """A 1 MiB message whose bytes stop coming: a few at a time, then none, the socket left open."""
    conn.sendall(b"\x82\x7f" + struct.pack("!Q", 1 << 20))
    while not over.wait(0.1):
        conn.sendall(b"y")


@pytest.mark.parametrize("behave", [pings, trickle])
def test_a_read_fails_at_its_deadline_whatever_the_peer_does(behave: Callable) -> None:
    with fake_server(behave) as port:
        ws = websocket.create_connection(f"ws://127.0.0.1:{port}/api/kernels/k/channels", timeout=10,
                                         suppress_origin=True)  # fmt: skip
        try:
            started = time.monotonic()
            with pytest.raises(AssertionError, match="the execute_reply"):
                receive_by(ws, started + 2, "the execute_reply")
            assert time.monotonic() - started < 3.5
        finally:
            ws.close(timeout=0)


def test_a_message_that_arrives_in_time_is_returned() -> None:
    def one(conn: socket.socket, over: threading.Event) -> None:
        conn.sendall(b"\x89\x00\x81\x05hello")
        over.wait(10)

    with fake_server(one) as port:
        ws = websocket.create_connection(f"ws://127.0.0.1:{port}/", timeout=10, suppress_origin=True)
        try:
            assert receive_by(ws, time.monotonic() + 5) == b"hello"
        finally:
            ws.close(timeout=0)
