"""
jds.tls's reads from pyOpenSSL's memory BIOs that return instead of raising WantReadError: the
same bytes and the same other exceptions as pyOpenSSL's own ``recv`` and ``bio_read``, checked on a
real TLS session between two in-memory connections.
"""

from __future__ import annotations

import os

import pytest
import trustme
from OpenSSL import SSL, crypto

from jds.tls import quiet_bio_read, quiet_recv


def _pump(source: SSL.Connection, target: SSL.Connection) -> bytes:
    """Move what ``source`` has to send into ``target``; returns the bytes moved."""
    moved = b""
    while True:
        try:
            data = source.bio_read(2**16)
        except SSL.WantReadError:
            return moved
        target.bio_write(data)
        moved += data


@pytest.fixture
def pair() -> tuple[SSL.Connection, SSL.Connection]:
    ca = trustme.CA()
    leaf = ca.issue_cert("hub.test")
    server_ctx = SSL.Context(SSL.TLS_METHOD)
    # PEM through pyOpenSSL's own loaders: trustme's configure_cert hands the oldest pyOpenSSL a key it refuses
    server_ctx.use_certificate(crypto.load_certificate(crypto.FILETYPE_PEM, leaf.cert_chain_pems[0].bytes()))
    server_ctx.use_privatekey(crypto.load_privatekey(crypto.FILETYPE_PEM, leaf.private_key_pem.bytes()))
    client_ctx = SSL.Context(SSL.TLS_METHOD)
    ca.configure_trust(client_ctx)
    client_ctx.set_verify(SSL.VERIFY_PEER, lambda *args: True)  # a callback, as jds's: pyOpenSSL's helper
    server, client = SSL.Connection(server_ctx, None), SSL.Connection(client_ctx, None)
    server.set_accept_state()
    client.set_connect_state()
    for _ in range(10):
        for conn in (client, server):
            try:
                conn.do_handshake()
            except SSL.WantReadError:
                pass
        if not (_pump(client, server) or _pump(server, client)):
            break
    client.do_handshake()
    server.do_handshake()
    # TLS 1.3 session tickets: let the client read them now, as it would with its first data
    while quiet_recv(client) is not None:
        pass
    return server, client


def test_recv_returns_none_where_pyopenssl_raises(pair: tuple[SSL.Connection, SSL.Connection]) -> None:
    server, client = pair
    assert quiet_recv(client) is None
    with pytest.raises(SSL.WantReadError):
        client.recv(2**16)


def test_recv_reads_every_record_in_order(pair: tuple[SSL.Connection, SSL.Connection]) -> None:
    server, client = pair
    sent = [os.urandom(size) for size in (1, 420, 16384, 40000, 3)]
    for data in sent:
        server.sendall(data)
    _pump(server, client)
    chunks = []
    while (chunk := quiet_recv(client)) is not None:
        chunks.append(chunk)
    assert b"".join(chunks) == b"".join(sent)
    assert len(chunks) >= len(sent)  # one record per call, as recv
    assert all(len(chunk) <= 16384 for chunk in chunks)


def test_recv_of_a_partial_record_waits_for_the_rest(pair: tuple[SSL.Connection, SSL.Connection]) -> None:
    server, client = pair
    server.sendall(b"x" * 1000)
    record = server.bio_read(2**16)
    client.bio_write(record[:500])
    assert quiet_recv(client) is None
    client.bio_write(record[500:])
    assert quiet_recv(client) == b"x" * 1000
    assert quiet_recv(client) is None


def test_recv_raises_what_pyopenssl_raises(pair: tuple[SSL.Connection, SSL.Connection]) -> None:
    server, client = pair
    server.shutdown()
    _pump(server, client)
    with pytest.raises(SSL.ZeroReturnError):
        quiet_recv(client)


def test_recv_raises_on_garbage(pair: tuple[SSL.Connection, SSL.Connection]) -> None:
    server, client = pair
    client.bio_write(b"\x17\x03\x03\x00\x20" + b"\x00" * 32)  # an application record that does not decrypt
    with pytest.raises(SSL.Error) as raised:
        quiet_recv(client)
    assert not isinstance(raised.value, SSL.WantReadError)


def test_bio_read_empty_and_full(pair: tuple[SSL.Connection, SSL.Connection]) -> None:
    server, client = pair
    assert quiet_bio_read(client) == b""
    with pytest.raises(SSL.WantReadError):
        client.bio_read(2**15)
    client.sendall(b"y" * 50000)
    first = quiet_bio_read(client)
    assert 0 < len(first) <= 2**15  # at most Twisted's 32 KiB per call, as bio_read
    rest = b""
    while chunk := quiet_bio_read(client):
        rest += chunk
    server.bio_write(first + rest)
    got = b""
    while (chunk := quiet_recv(server)) is not None:
        got += chunk
    assert got == b"y" * 50000


class _Public:
    """A connection with only pyOpenSSL's public methods: the fallback."""

    def __init__(self, conn: SSL.Connection) -> None:
        self.recv, self.bio_read = conn.recv, conn.bio_read


def test_fallback_without_internals(pair: tuple[SSL.Connection, SSL.Connection]) -> None:
    server, client = pair
    public = _Public(client)
    assert quiet_recv(public) is None  # type: ignore[arg-type]
    assert quiet_bio_read(public) == b""  # type: ignore[arg-type]
    server.sendall(b"z" * 100)
    _pump(server, client)
    assert quiet_recv(public) == b"z" * 100  # type: ignore[arg-type]
