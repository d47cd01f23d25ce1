"""
An IDE's request body sent on to the hub while it arrives, instead of read whole first.

twisted.web reads a request's whole body before it renders the request: into memory, or past 100 KB
into a temporary file. The proxy then sent it on from there, so a 64 MiB upload was received, written
to disk, read back and sent, one step after the other, and its bytes lay on the disk meanwhile. Here
the hub request starts once the request's headers are accepted, and each piece of the body goes on as
it comes: the request feeds a :class:`StreamedBody` (``feed``, ``end``, ``abort``), and each attempt
at the hub request takes its bytes through a producer from :meth:`StreamedBody.producer`. Flow control
runs end to end: while the hub's connection cannot take more, the IDE's connection is not read (the
body's ``reader`` is paused), so a slow hub makes the proxy hold at most :data:`HIGH_WATER` bytes.

A body can go to the hub a second time only while it is still whole here: before any byte of it was
written (a connection that failed before its TLS handshake, see :mod:`jds.retry`), or, after a stopped
server was started, when it was no larger than ``keep`` (``--held-body-size``), the copy kept of it as
it passed. A body that was written once is otherwise never sent again.
"""

from __future__ import annotations

from collections import deque
from typing import Protocol

from twisted.internet.defer import Deferred, fail
from twisted.internet.interfaces import IConsumer
from twisted.python.failure import Failure
from twisted.web.iweb import UNKNOWN_LENGTH, IBodyProducer
from zope.interface import implementer

__all__ = ["HIGH_WATER", "BodyReader", "StreamedBody", "SupersededError"]

# Bytes of a body waiting for the hub's connection (not open yet, or full) before the IDE is paused.
HIGH_WATER = 256 << 10


class BodyReader(Protocol):
    """Where the body comes from (the IDE's connection): paused while the hub cannot take more."""

    def pause_body(self) -> None: ...

    def resume_body(self) -> None: ...


class SupersededError(Exception):
    """An attempt whose body was taken over by a newer attempt was asked to produce."""


@implementer(IBodyProducer)
class _Attempt:
    """The body as one attempt at the hub request sees it (the hub client's ``bodyProducer``)."""

    def __init__(self, body: StreamedBody) -> None:
        self._body = body
        self.length = body.length
        self.consumer: IConsumer | None = None
        self.paused = False
        self._done: Deferred | None = None

    def startProducing(self, consumer: IConsumer) -> Deferred:  # noqa: N802 - IBodyProducer
        if self._body._attempt is not self:
            return fail(SupersededError())
        self.consumer = consumer
        done = self._done = Deferred(lambda _: self._body._detach(self))
        self._body._flush()
        return done

    def pauseProducing(self) -> None:  # noqa: N802 - IPushProducer
        self.paused = True
        if self._body._attempt is self:
            self._body._pause_reader()

    def resumeProducing(self) -> None:  # noqa: N802
        self.paused = False
        if self._body._attempt is self:
            self._body._flush()

    def stopProducing(self) -> None:  # noqa: N802
        """The hub client gave up on the request (answered, cancelled, connection lost): its Deferred never fires."""
        self._done = None
        self._body._detach(self)

    def finished(self, failure: Failure | None = None) -> None:
        done, self._done = self._done, None
        if done is None:
            return
        if failure is None:
            done.callback(None)
        else:
            done.errback(failure)


class StreamedBody:
    """
    One request's body on its way to the hub. ``length`` is the declared Content-Length (``None`` for
    a chunked body, sent on chunked); ``keep`` bounds the copy kept to send it again (0: no bound).
    """

    def __init__(self, length: int | None, reader: BodyReader, keep: int) -> None:
        self.length = UNKNOWN_LENGTH if length is None else length
        self.received = 0
        self.complete = False
        self._reader = reader
        self._reader_paused = False
        self._keep = keep
        self._kept: list[bytes] | None = []
        self._waiting: deque[bytes] = deque()
        self._waiting_size = 0
        self._attempt: _Attempt | None = None
        self._failed: Failure | None = None
        self.spent = False  # some byte of it was written to a hub connection

    @property
    def size(self) -> int:
        """The declared length, or what arrived so far of a chunked body."""
        return self.received if self.length is UNKNOWN_LENGTH else self.length  # type: ignore[return-value]

    def can_send_again(self) -> bool:
        """Whether the whole body can still go to the hub (once more, after a stopped server started)."""
        if self._failed is not None:
            return False
        return not self.spent or self._kept is not None

    def producer(self) -> IBodyProducer | None:
        """
        The body for a new attempt at the hub request, the previous one's left behind; ``None`` when
        it can no longer be sent whole.
        """
        if not self.can_send_again():
            return None
        if self._attempt is not None:
            self._attempt._done = None  # left behind: its Deferred never fires
        if self.spent:
            assert self._kept is not None
            self._waiting = deque(self._kept)
            self._waiting_size = sum(map(len, self._kept))
        self._attempt = _Attempt(self)
        return self._attempt

    # From the IDE's request

    def feed(self, data: bytes) -> None:
        if not data or self._failed is not None:
            return
        self.received += len(data)
        if self._kept is not None:
            if self._keep and self.received > self._keep:
                self._kept = None
            else:
                self._kept.append(data)
        if self._attempt is None:
            return  # nobody is sending it now: only the copy kept for another attempt matters
        self._waiting.append(data)
        self._waiting_size += len(data)
        self._flush()

    def end(self) -> None:
        """The whole body has arrived."""
        self.complete = True
        self._flush()

    def abort(self, reason: Failure) -> None:
        """The body will not arrive whole (the IDE left, or was refused in mid-body): the hub request fails."""
        if self.complete or self._failed is not None:
            return
        self._failed = reason
        self._kept = None
        attempt = self._drop_attempt()
        if attempt is not None:
            attempt.finished(reason)

    def discard(self) -> None:
        """The request was answered: what still arrives is read and dropped."""
        self._kept = None
        self._drop_attempt()

    # Between the two

    def _drop_attempt(self) -> _Attempt | None:
        attempt, self._attempt = self._attempt, None
        self._waiting.clear()
        self._waiting_size = 0
        self._resume_reader()
        return attempt

    def _detach(self, attempt: _Attempt) -> None:
        if attempt is self._attempt:
            self._drop_attempt()

    def _flush(self) -> None:
        attempt = self._attempt
        if attempt is None or attempt.consumer is None:
            if self._waiting_size > HIGH_WATER:
                self._pause_reader()
            return
        waiting = self._waiting
        while waiting and not attempt.paused:
            chunk = waiting.popleft()
            self._waiting_size -= len(chunk)
            self.spent = True
            attempt.consumer.write(chunk)
            if attempt is not self._attempt:
                return  # the write ended the attempt
        if waiting:
            if self._waiting_size > HIGH_WATER:
                self._pause_reader()
            return
        if self.complete:
            attempt.finished()
        elif not attempt.paused:
            self._resume_reader()

    def _pause_reader(self) -> None:
        if not self._reader_paused and not self.complete:
            self._reader_paused = True
            self._reader.pause_body()

    def _resume_reader(self) -> None:
        if self._reader_paused:
            self._reader_paused = False
            self._reader.resume_body()
