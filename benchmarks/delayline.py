"""
``python -m benchmarks.delayline --listen PORT --target HOST:PORT --delay 0.010``: a user-space delay
line, the WAN of the WAN workload. Every byte is delivered in order, none is lost, each direction
``--delay`` seconds after it was sent; a new connection's first bytes wait one round trip more, the
SYN / SYN-ACK a real TCP connection costs before the client may send; a FIN (the far end closing an
idle keep-alive connection) travels with the same delay.

Both of its TCP legs are loopback, so TCP itself sees no delay (no slow start, no delayed ACK across
it): what the delay line models is the round trips an application protocol makes, which is what a
proxy can change.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import socket
import sys


async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, delay: float, gate: float) -> None:
    """Copy one direction, each chunk ``delay`` after it was read (and not before ``gate``)."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

    async def deliver() -> None:
        while True:
            due, data = await queue.get()
            wait = due - loop.time()
            if wait > 0:
                await asyncio.sleep(wait)
            if not data:
                with contextlib.suppress(OSError):
                    writer.write_eof()
                return
            writer.write(data)
            await writer.drain()

    sender = asyncio.ensure_future(deliver())
    try:
        while True:
            data = await reader.read(1 << 18)
            queue.put_nowait((max(loop.time(), gate) + delay, data))
            if not data:
                break
        await sender
    finally:
        sender.cancel()


async def _serve(delay: float, target: tuple[str, int], client_r, client_w) -> None:  # noqa: ANN001
    loop = asyncio.get_running_loop()
    accepted = loop.time()
    try:
        far_r, far_w = await asyncio.open_connection(*target)
    except OSError:
        client_w.close()
        return
    for w in (client_w, far_w):
        w.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    # The client's first bytes leave after the handshake's round trip; replies follow naturally.
    up = asyncio.ensure_future(_pump(client_r, far_w, delay, accepted + 2 * delay))
    down = asyncio.ensure_future(_pump(far_r, client_w, delay, accepted))
    try:
        await asyncio.gather(up, down)
    except (OSError, asyncio.IncompleteReadError):
        pass
    finally:
        up.cancel()
        down.cancel()
        for w in (client_w, far_w):
            w.close()


async def _main(port: int, target: tuple[str, int], delay: float) -> None:
    server = await asyncio.start_server(
        lambda r, w: _serve(delay, target, r, w), "127.0.0.1", port, limit=1 << 20
    )
    print(f"delay line on 127.0.0.1:{port} -> {target[0]}:{target[1]}, {delay * 1e3:.0f} ms each way", flush=True)
    async with server:
        await server.serve_forever()


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.delayline", description=__doc__)
    parser.add_argument("--listen", type=int, required=True)
    parser.add_argument("--target", required=True, help="HOST:PORT")
    parser.add_argument("--delay", type=float, default=0.010, help="seconds, each way")
    args = parser.parse_args()
    host, port = args.target.rsplit(":", 1)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_main(args.listen, (host, int(port)), args.delay))
    return 0


if __name__ == "__main__":
    sys.exit(main())
