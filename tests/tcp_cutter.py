"""A TCP relay on 127.0.0.1 that a test controls, to put network faults between the proxy and the hub.

Point the proxy at ``https://127.0.0.1:<cutter.port>`` (with ``--tls-name`` the hub's name): TLS
passes through untouched, byte for byte. The test can then

- :meth:`TcpCutter.cut` every open connection with a reset, both ways (a crashed hub or a dead
  network path mid-response: no TLS close, no FIN);
- set ``mode = "blackhole"``: new connections are accepted and then never answered nor forwarded
  (a half-open or wedged peer); ``"reset"``: accepted and reset at once (a load balancer with no
  backend); ``"refuse"``: not accepted, the port refuses them (a hub that is down);
- set ``silent = True``: open connections stop moving bytes either way, with no FIN and no reset
  (dead Wi-Fi, a suspended peer); ``False`` lets them flow again;
- set ``rate`` to throttle what flows from the target to the proxy (a slow response);
- set ``hold_after`` to stop relaying the target's bytes to the proxy on each connection once that
  many more bytes went to the target (the hub got a request; its answer waits in the cutter);
- set ``cut_after`` to reset each connection once that many more bytes went from the target to
  the proxy (a hub dying mid-response at a known point: the proxy gets at most that many bytes,
  counted from when it was set, so a pooled connection's earlier traffic does not count);
- see every connection it relayed (:meth:`TcpCutter.connections`): bytes each way, whether and
  which side closed it, to observe the proxy releasing an upstream connection.

One thread runs a ``selectors`` loop; the test's calls reach it through a queue and return once the
loop has acted on them. :meth:`TcpCutter.stop` closes every socket and joins the thread.
"""

from __future__ import annotations

import itertools
import queue
import selectors
import socket
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

__all__ = ["Connection", "TcpCutter"]

T = TypeVar("T")

# Bytes buffered per direction before the cutter stops reading that side (backpressure).
_BUFFER = 256 * 1024
_CHUNK = 64 * 1024
_RESET = struct.pack("ii", 1, 0)  # SO_LINGER on, 0 s: close() sends RST
_MODES = ("forward", "blackhole", "reset", "refuse")


@dataclass(frozen=True)
class Connection:
    """
    A snapshot of one relayed connection. ``closed_by`` is "proxy", "target", "cut", "stop", or
    "reset" for one that mode "reset" turned away.
    """

    number: int
    mode: str
    up: int  # bytes from the proxy to the target
    down: int  # bytes from the target to the proxy
    opened: float  # time.monotonic()
    closed: float | None
    closed_by: str | None

    @property
    def is_open(self) -> bool:
        return self.closed is None


def _listen(port: int) -> socket.socket:
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", port))
    listener.listen(128)
    listener.setblocking(False)
    return listener


class _Pipe:
    """One accepted socket and, unless black-holed, its socket to the target."""

    def __init__(self, number: int, client: socket.socket, server: socket.socket | None, mode: str) -> None:
        self.number = number
        self.client = client
        self.server = server
        self.mode = mode
        self.to_client = bytearray()
        self.to_server = bytearray()
        self.up = 0
        self.down = 0
        self.opened = time.monotonic()
        self.closed: float | None = None
        self.closed_by: str | None = None
        self.budget = 0.0
        self.eof_from: str | None = None
        self.cut_at: int | None = None  # ``down`` at which the connection is reset
        self.hold_at: int | None = None  # ``up`` from which the target's bytes are held

    @property
    def held(self) -> bool:
        return self.hold_at is not None and self.up >= self.hold_at

    def snapshot(self) -> Connection:
        return Connection(
            self.number, self.mode, self.up, self.down, self.opened, self.closed, self.closed_by
        )


class TcpCutter:
    """
    ``TcpCutter(target_port)`` relays ``127.0.0.1:<port>`` to ``target_host:target_port``. Use as a
    context manager, or ``start()`` / ``stop()``.
    """

    def __init__(self, target_port: int, target_host: str = "127.0.0.1", mode: str = "forward") -> None:
        if mode not in _MODES:
            raise ValueError(f"mode must be one of {', '.join(_MODES)}, not {mode!r}")
        self.target = (target_host, target_port)
        self._mode = mode
        self._rate: float | None = None
        self._cut_after: int | None = None
        self._hold_after: int | None = None
        self._silent = False
        self._listener: socket.socket | None = _listen(0)
        self.port: int = self._listener.getsockname()[1]
        self._selector = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._commands: queue.Queue[tuple[Callable[[], Any], queue.Queue[Any]]] = queue.Queue()
        self._pipes: list[_Pipe] = []  # open ones
        self._closed: list[Connection] = []
        self._numbers = itertools.count(1)
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._running = False
        self._interest: dict[socket.socket, int] = {}

    # -- the test's side -----------------------------------------------------------------------

    def start(self) -> TcpCutter:
        self._running = True
        self._thread = threading.Thread(target=self._loop, name=f"tcp-cutter-{self.port}", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 10) -> None:
        """Reset every connection, stop listening and join the thread."""
        if self._thread is None:
            return
        if self._thread.is_alive():
            self._call(self._stop_now)
            self._thread.join(timeout)
            if self._thread.is_alive():
                raise RuntimeError(f"the cutter on port {self.port} did not stop within {timeout} s")
        self._thread = None

    def __enter__(self) -> TcpCutter:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def mode(self) -> str:
        return self._mode

    @mode.setter
    def mode(self, mode: str) -> None:
        """Applies to connections accepted from now on."""
        if mode not in _MODES:
            raise ValueError(f"mode must be one of {', '.join(_MODES)}, not {mode!r}")
        self._call(lambda: self._set_mode(mode))

    @property
    def hold_after(self) -> int | None:
        return self._hold_after

    @hold_after.setter
    def hold_after(self, size: int | None) -> None:
        """Hold the target's bytes on each connection once it relayed ``size`` more bytes to the target."""
        self._call(lambda: self._set_hold_after(size))

    @property
    def rate(self) -> float | None:
        return self._rate

    @rate.setter
    def rate(self, bytes_per_second: float | None) -> None:
        """Throttle target-to-proxy bytes, per connection; ``None`` for no limit."""
        self._call(lambda: setattr(self, "_rate", bytes_per_second))

    @property
    def cut_after(self) -> int | None:
        return self._cut_after

    @cut_after.setter
    def cut_after(self, size: int | None) -> None:
        """Reset each connection once it relayed ``size`` more bytes to the proxy; ``None`` never."""
        self._call(lambda: self._set_cut_after(size))

    @property
    def silent(self) -> bool:
        return self._silent

    @silent.setter
    def silent(self, silent: bool) -> None:
        """While True, open connections neither read nor write (and see no close)."""
        self._call(lambda: setattr(self, "_silent", silent))

    def cut(self) -> int:
        """Reset every open connection on both sides now; return how many were cut."""
        return self._call(self._cut_all)

    def connections(self) -> list[Connection]:
        with self._lock:
            return sorted(self._closed + [pipe.snapshot() for pipe in self._pipes], key=lambda c: c.number)

    def open_connections(self) -> list[Connection]:
        return [c for c in self.connections() if c.is_open]

    def _call(self, function: Callable[[], T], timeout: float = 10) -> T:
        if self._thread is None or not self._thread.is_alive():
            return function()
        answer: queue.Queue[Any] = queue.Queue()
        self._commands.put((function, answer))
        self._wake_w.send(b"x")
        ok, value = answer.get(timeout=timeout)
        if not ok:
            raise value
        return value

    # -- the loop's side -----------------------------------------------------------------------

    def _loop(self) -> None:
        if self._listener is not None:
            self._selector.register(self._listener, selectors.EVENT_READ, ("accept", None))
        self._selector.register(self._wake_r, selectors.EVENT_READ, ("wake", None))
        last = time.monotonic()
        try:
            while self._running:
                throttled = bool(self._rate) and any(p.server is not None for p in self._pipes)
                events = self._selector.select(0.02 if throttled else 0.5)
                now = time.monotonic()
                self._refill(now - last)
                last = now
                for key, mask in events:
                    kind, pipe = key.data
                    if kind == "accept":
                        self._accept()
                    elif kind == "wake":
                        self._run_commands()
                    elif pipe.closed is None:
                        self._service(pipe, key.fileobj, mask)
                self._update_interest()
        finally:
            self._close_everything()

    def _run_commands(self) -> None:
        try:
            while True:
                self._wake_r.recv(4096)
        except BlockingIOError:
            pass
        while True:
            try:
                function, answer = self._commands.get_nowait()
            except queue.Empty:
                return
            try:
                answer.put((True, function()))
            except Exception as exc:  # handed back to the caller
                answer.put((False, exc))

    def _accept(self) -> None:
        while self._listener is not None:
            try:
                client, _ = self._listener.accept()
            except BlockingIOError:
                return
            if self._mode == "reset":
                pipe = _Pipe(next(self._numbers), client, None, "reset")
                with self._lock:
                    self._pipes.append(pipe)
                self._close(pipe, "reset", reset=True)
                continue
            client.setblocking(False)
            client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            server = None
            if self._mode == "forward":
                try:
                    server = socket.create_connection(self.target, timeout=5)
                except OSError:
                    self._reset(client)
                    continue
                server.setblocking(False)
                server.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            pipe = _Pipe(next(self._numbers), client, server, self._mode)
            pipe.cut_at = self._cut_after
            pipe.hold_at = self._hold_after
            with self._lock:
                self._pipes.append(pipe)

    def _refill(self, elapsed: float) -> None:
        rate = self._rate
        for pipe in self._pipes:
            if rate:
                pipe.budget = min(pipe.budget + rate * elapsed, max(rate / 10, _CHUNK))
            else:
                pipe.budget = float("inf")

    def _service(self, pipe: _Pipe, sock: Any, mask: int) -> None:
        from_client = sock is pipe.client
        if mask & selectors.EVENT_READ:
            if from_client:
                self._read(pipe, pipe.client, pipe.to_server, "proxy")
            else:
                self._read(pipe, pipe.server, pipe.to_client, "target")
        if pipe.closed is None and mask & selectors.EVENT_WRITE and not (from_client and pipe.held):
            self._flush(pipe, sock, pipe.to_client if from_client else pipe.to_server)
        if pipe.closed is None and pipe.cut_at is not None and pipe.down >= pipe.cut_at:
            self._close(pipe, "cut", reset=True)
        if pipe.closed is None and pipe.eof_from and not pipe.to_client and not pipe.to_server:
            self._close(pipe, pipe.eof_from, reset=False)

    def _read(self, pipe: _Pipe, sock: socket.socket | None, buffer: bytearray, side: str) -> None:
        if sock is None:
            return
        size = _CHUNK
        if side == "target" and self._rate:
            size = min(size, int(pipe.budget))
        if side == "target" and pipe.cut_at is not None:
            size = min(size, pipe.cut_at - pipe.down)
        if size <= 0:
            return
        try:
            data = sock.recv(size)
        except BlockingIOError:
            return
        except OSError:
            self._close(pipe, side, reset=True)
            return
        if not data:
            pipe.eof_from = side
            if not pipe.to_client and not pipe.to_server:
                self._close(pipe, side, reset=False)
            return
        if pipe.server is not None:
            buffer += data
        with self._lock:
            if side == "proxy":
                pipe.up += len(data)
            else:
                pipe.down += len(data)
                pipe.budget -= len(data)

    def _flush(self, pipe: _Pipe, sock: socket.socket, buffer: bytearray) -> None:
        if not buffer:
            return
        try:
            sent = sock.send(buffer)
        except BlockingIOError:
            return
        except OSError:
            self._close(pipe, "proxy" if sock is pipe.client else "target", reset=True)
            return
        del buffer[:sent]

    def _wanted(self, pipe: _Pipe) -> dict[socket.socket, int]:
        client = 0
        server = 0
        if pipe.server is None:
            client |= selectors.EVENT_READ  # a black hole swallows what comes, and sees it close
        elif pipe.eof_from is None:
            if len(pipe.to_server) < _BUFFER:
                client |= selectors.EVENT_READ
            limited = pipe.cut_at is not None and pipe.down >= pipe.cut_at
            if len(pipe.to_client) < _BUFFER and pipe.budget >= 1 and not limited and not pipe.held:
                server |= selectors.EVENT_READ
        if pipe.to_client and not pipe.held:
            client |= selectors.EVENT_WRITE
        if pipe.to_server:
            server |= selectors.EVENT_WRITE
        wanted = {pipe.client: client}
        if pipe.server is not None:
            wanted[pipe.server] = server
        return wanted

    def _update_interest(self) -> None:
        for pipe in list(self._pipes):
            for sock, events in self._wanted(pipe).items():
                if self._silent:
                    events = 0
                current = self._interest.get(sock, 0)
                if events == current:
                    continue
                if current and events:
                    self._selector.modify(sock, events, ("pipe", pipe))
                elif events:
                    self._selector.register(sock, events, ("pipe", pipe))
                else:
                    self._selector.unregister(sock)
                self._interest[sock] = events

    def _reset(self, sock: socket.socket) -> None:
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _RESET)
        except OSError:
            pass
        sock.close()

    def _close(self, pipe: _Pipe, by: str, reset: bool) -> None:
        """Recorded as closed first, so a test that sees the socket go also sees the record."""
        if pipe.closed is not None:
            return
        with self._lock:
            pipe.closed = time.monotonic()
            pipe.closed_by = by
            self._pipes.remove(pipe)
            self._closed.append(pipe.snapshot())
        pipe.to_client.clear()
        pipe.to_server.clear()
        for sock in (pipe.client, pipe.server):
            if sock is None:
                continue
            if self._interest.pop(sock, 0):
                self._selector.unregister(sock)
            if reset:
                self._reset(sock)
            else:
                sock.close()

    def _cut_all(self) -> int:
        pipes = list(self._pipes)
        for pipe in pipes:
            self._close(pipe, "cut", reset=True)
        return len(pipes)

    def _set_mode(self, mode: str) -> None:
        """"refuse" closes the listening socket; any other mode opens it again on the same port."""
        in_loop = threading.current_thread() is self._thread
        if mode == "refuse" and self._listener is not None:
            if in_loop:
                self._selector.unregister(self._listener)
            self._listener.close()
            self._listener = None
        elif mode != "refuse" and self._listener is None:
            self._listener = _listen(self.port)
            if in_loop:
                self._selector.register(self._listener, selectors.EVENT_READ, ("accept", None))
        self._mode = mode

    def _set_hold_after(self, size: int | None) -> None:
        self._hold_after = size
        for pipe in self._pipes:
            pipe.hold_at = None if size is None else pipe.up + size

    def _set_cut_after(self, size: int | None) -> None:
        self._cut_after = size
        for pipe in self._pipes:
            pipe.cut_at = None if size is None else pipe.down + size

    def _stop_now(self) -> None:
        self._running = False

    def _close_everything(self) -> None:
        for pipe in list(self._pipes):
            self._close(pipe, "stop", reset=True)
        for sock in (self._listener, self._wake_r, self._wake_w):
            if sock is not None:
                sock.close()
        self._selector.close()
