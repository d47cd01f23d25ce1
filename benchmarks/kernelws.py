"""
A minimal kernel WebSocket client, as an IDE uses it: subprotocol ``v1.kernel.websocket.jupyter.org``
(binary frames with an offset table), falling back to the legacy JSON text frames if the server does
not choose v1. Only what the benchmark needs: ``kernel_info_request`` on the shell channel.
"""

from __future__ import annotations

import json
import ssl
import time
import uuid
from datetime import datetime, timezone

import websocket

__all__ = ["V1", "KernelSocket"]

V1 = "v1.kernel.websocket.jupyter.org"


def _encode_v1(channel: str, parts: list[bytes]) -> bytes:
    channel_bytes = channel.encode()
    offsets = [8 * (1 + 1 + len(parts) + 1)]
    offsets.append(offsets[-1] + len(channel_bytes))
    for part in parts:
        offsets.append(offsets[-1] + len(part))
    head = len(offsets).to_bytes(8, "little") + b"".join(o.to_bytes(8, "little") for o in offsets)
    return head + channel_bytes + b"".join(parts)


def _decode_v1(frame: bytes) -> tuple[str, list[bytes]]:
    count = int.from_bytes(frame[:8], "little")
    offsets = [int.from_bytes(frame[8 * (i + 1) : 8 * (i + 2)], "little") for i in range(count)]
    channel = frame[offsets[0] : offsets[1]].decode()
    return channel, [frame[offsets[i] : offsets[i + 1]] for i in range(1, count - 1)]


class KernelSocket:
    """One ``/api/kernels/<id>/channels`` connection on a route (see :mod:`benchmarks.servers`)."""

    def __init__(self, route: dict, kernel_id: str, token: str, timeout: float = 60.0) -> None:
        origin = route["origin"]
        scheme = "wss" if origin.startswith("https") else "ws"
        self.session = uuid.uuid4().hex
        url = (
            f"{scheme}{origin[origin.index(':'):]}{route['prefix']}/api/kernels/{kernel_id}/channels"
            f"?session_id={self.session}"
        )
        sslopt = {"ca_certs": route["ca"], "cert_reqs": ssl.CERT_REQUIRED} if route["ca"] else None
        # No Origin header, like the Node-based IDEs; the token as a header, like them too.
        self.ws = websocket.create_connection(
            url,
            header=[f"Authorization: token {token}"],
            subprotocols=[V1],
            sslopt=sslopt,
            suppress_origin=True,
            timeout=timeout,
        )
        self.subprotocol = self.ws.getsubprotocol()
        self.v1 = self.subprotocol == V1

    def close(self) -> None:
        self.ws.close(timeout=2)

    def send_kernel_info(self) -> str:
        return self.send_request("kernel_info_request", {})

    def send_request(self, msg_type: str, content: dict) -> str:
        """Send a shell request; returns its ``msg_id``."""
        msg_id = uuid.uuid4().hex
        header = {
            "msg_id": msg_id,
            "session": self.session,
            "username": "bench",
            "msg_type": msg_type,
            "version": "5.3",
            "date": datetime.now(timezone.utc).isoformat(),
        }
        if self.v1:
            parts = [json.dumps(header).encode(), b"{}", b"{}", json.dumps(content).encode()]
            self.ws.send_bytes(_encode_v1("shell", parts))
        else:
            message = {"channel": "shell", "header": header, "parent_header": {}, "metadata": {},
                       "content": content, "buffers": []}
            self.ws.send(json.dumps(message))
        return msg_id

    def read_message(self) -> tuple[str, str, str | None]:
        """Read one message: its channel, ``msg_type`` and the ``msg_id`` it answers."""
        frame = self.ws.recv()
        if self.v1:
            if isinstance(frame, str):
                frame = frame.encode()
            channel, parts = _decode_v1(frame)
            header, parent = json.loads(parts[0]), json.loads(parts[1])
            return channel, header.get("msg_type", ""), parent.get("msg_id")
        message = json.loads(frame)
        return (message.get("channel", ""), message.get("header", {}).get("msg_type", ""),
                message.get("parent_header", {}).get("msg_id"))

    def _shell_reply_parent(self) -> str | None:
        """Read one frame; the ``msg_id`` its shell reply answers, or None for anything else."""
        frame = self.ws.recv()
        if self.v1:
            if isinstance(frame, str):
                frame = frame.encode()
            channel, parts = _decode_v1(frame)
            if channel != "shell":
                return None
            return json.loads(parts[1]).get("msg_id")
        message = json.loads(frame)
        if message.get("channel") != "shell":
            return None
        return message.get("parent_header", {}).get("msg_id")

    def round_trip(self) -> float:
        """Seconds from sending a kernel_info_request to reading its reply."""
        started = time.perf_counter()
        msg_id = self.send_kernel_info()
        while self._shell_reply_parent() != msg_id:
            pass
        return time.perf_counter() - started

    def burst(self, count: int) -> float:
        """Seconds to send ``count`` requests back to back and read all their replies."""
        started = time.perf_counter()
        pending = {self.send_kernel_info() for _ in range(count)}
        while pending:
            pending.discard(self._shell_reply_parent())
        return time.perf_counter() - started
