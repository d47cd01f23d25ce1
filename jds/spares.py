"""
Hub connections opened ahead of need, the moment the IDE becomes active.

After the IDE has been idle, every pooled hub connection is gone (ours close after 4 s, the hub's proxy
drops idle ones after 5). The first request then needs a new TCP + TLS connection, two round trips
before it can be sent, and so does everything the IDE opens next beside it: a second request in
parallel, the kernel WebSocket a moment later. So when a request finds no connection ready, the
policy opens a few more *in parallel with it*; the IDE's next connections find one ready or already on
its way, and pay no round trip for it. Nothing is sent on a spare: it is a TLS connection and no HTTP
request, so the hub's idle culler sees no activity, and one not taken within ``keep`` seconds is
closed. None is opened while the IDE is idle.

A spare is handed over by putting the taker's protocol inside the spare's TLS connection, exactly as
the endpoint would have on a fresh connection; its certificate was checked by the same policy.
"""

from __future__ import annotations

from collections.abc import Callable

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IProtocolFactory, IReactorTime, IStreamClientEndpoint
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.python.failure import Failure
from zope.interface import implementer

__all__ = ["SpareConnections"]


class _Holder(Protocol):
    """What sits in a spare until it is taken; the hub has nothing to say on it."""

    def __init__(self, spare: _Spare) -> None:
        self.spare = spare

    def dataReceived(self, data: bytes) -> None:  # noqa: N802 - Twisted interface name
        self.transport.loseConnection()

    def connectionLost(self, reason: Failure = connectionDone) -> None:  # noqa: N802
        self.spare.lost()


class _QuietFactory(Factory):
    noisy = False  # no "Starting factory" line per spare


class _Spare:
    """One connection on its way or ready; at most one taker."""

    def __init__(self, store: SpareConnections, endpoint: IStreamClientEndpoint, keep: float) -> None:
        self._store = store
        self._holder: _Holder | None = None
        self._taker: tuple[IProtocolFactory, Deferred, Callable[[], Deferred]] | None = None
        self._keep = keep
        self._closing = False
        self._expiry: IDelayedCall | None = store.reactor.callLater(keep, self.expire)
        self._connecting: Deferred | None = endpoint.connect(_QuietFactory.forProtocol(lambda: _Holder(self)))
        self._connecting.addCallbacks(self._connected, self._failed)

    def _stop_expiry(self) -> None:
        if self._expiry is not None and self._expiry.active():
            self._expiry.cancel()
        self._expiry = None

    def _connected(self, holder: _Holder) -> None:
        self._connecting = None
        self._holder = holder
        if self._closing:
            holder.transport.loseConnection()
        elif self._taker is not None:
            self._hand_over()

    def _failed(self, failure: Failure) -> None:
        self._connecting = None
        self._store.forget(self)
        self._stop_expiry()
        if self._taker is not None:
            factory, handed, fresh = self._taker
            self._taker = None
            fresh().chainDeferred(handed)  # the taker gets a connection of its own, or its error

    def lost(self) -> None:
        self._store.forget(self)
        self._stop_expiry()

    def expire(self) -> None:
        """Close it unused; one still on its way is closed when it arrives."""
        self._stop_expiry()
        self._store.forget(self)
        self._closing = True
        if self._holder is not None:
            self._holder.transport.loseConnection()

    def take(self, factory: IProtocolFactory, fresh: Callable[[], Deferred]) -> Deferred:
        """The connection for ``factory``'s protocol, as ``endpoint.connect(factory)`` would give it."""
        self._stop_expiry()

        def cancel(_: Deferred) -> None:
            # The taker went away (the IDE closed during the handshake): the spare stays a spare.
            self._taker = None
            self._expiry = self._store.reactor.callLater(self._keep, self.expire)
            self._store.give_back(self)

        handed: Deferred = Deferred(cancel)
        self._taker = (factory, handed, fresh)
        if self._holder is not None:
            self._hand_over()
        return handed

    def _hand_over(self) -> None:
        assert self._taker is not None and self._holder is not None
        factory, handed, fresh = self._taker
        self._taker = None
        tls = self._holder.transport
        if tls is None or getattr(tls, "disconnected", False):
            fresh().chainDeferred(handed)
            return
        protocol = factory.buildProtocol(tls.getPeer())
        tls.wrappedProtocol = protocol  # the TLS layer now delivers to the taker
        protocol.makeConnection(tls)
        handed.callback(protocol)


@implementer(IStreamClientEndpoint)
class _SpareEndpoint:
    def __init__(self, store: SpareConnections, inner: IStreamClientEndpoint) -> None:
        self._store = store
        self._inner = inner

    def connect(self, protocolFactory: IProtocolFactory) -> Deferred:  # noqa: N803 - interface name
        return self._store.connect(self._inner, protocolFactory)


class SpareConnections:
    """
    Up to ``count`` spare hub connections, opened when a connection is asked for and none is ready,
    each closed unused after ``keep`` seconds.
    """

    def __init__(self, reactor: IReactorTime, count: int, keep: float) -> None:
        self.reactor = reactor
        self.count = count
        self.keep = keep
        self._ready: list[_Spare] = []

    def endpoint(self, inner: IStreamClientEndpoint) -> IStreamClientEndpoint:
        """``inner`` (the policy's TLS endpoint), but served from the spares when one is there."""
        return _SpareEndpoint(self, inner)

    def connect(self, inner: IStreamClientEndpoint, factory: IProtocolFactory) -> Deferred:
        if self._ready:
            return self._ready.pop(0).take(factory, lambda: inner.connect(factory))
        # The IDE is active and nothing is ready: this connection, and spares for what follows it.
        fresh = inner.connect(factory)
        for _ in range(self.count - len(self._ready)):
            self._ready.append(_Spare(self, inner, self.keep))
        return fresh

    def give_back(self, spare: _Spare) -> None:
        self._ready.append(spare)

    def forget(self, spare: _Spare) -> None:
        if spare in self._ready:
            self._ready.remove(spare)

    @property
    def ready(self) -> int:
        """Spares open or on their way (for tests and the log)."""
        return len(self._ready)

    def close(self) -> None:
        for spare in list(self._ready):
            spare.expire()

