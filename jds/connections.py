"""
How many connections the local port holds, and which one goes when it is full.

A connection costs a file descriptor (and often a second one, its hub side) from the moment it is
accepted, before the client has said a word; so any process on the machine could fill the port with
silent connections and keep the IDE out, and a limit per client address alone does not bound the
total (127.0.0.2, .3, ... are loopback too). So the port is bounded per client address and in total,
and when either bound is reached a new connection does not get a 503: the connection that has waited
longest without being *protected* is dropped to make room for it. A connection is protected once a
request on it has shown the local token (managed mode), or, in pass-through mode where there is no
local token, while a request whose headers are complete is being served. Only when every connection
is protected (the token holder's own) is a new one refused, with a 503 that names the option.

The total leaves file descriptors for each connection's hub side and the daemon's own files
(:func:`connection_cap`): a connection the kernel holds for lack of a descriptor is never accepted,
so it could not be made room for.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.protocols.policies import ProtocolWrapper, WrappingFactory

from jds.errors import error_body
from jds.logs import RepeatCounter

__all__ = ["ConnectionLimit", "ConnectionSlot", "connection_cap", "descriptor_limit", "total_connections"]

log = Logger(namespace="jds")

# Descriptors kept for the daemon itself: log and token files, the listening socket, spare hub connections.
_RESERVED_DESCRIPTORS = 64


def connection_cap(requested: int, descriptors: int) -> int:
    """
    The total of open connections: ``requested`` (0: as many as the descriptors allow), at most
    what ``descriptors`` (the process's soft limit) leave once each connection has its hub side.
    """
    allowed = max(1, (descriptors - _RESERVED_DESCRIPTORS) // 2)
    return min(requested, allowed) if requested else allowed


def descriptor_limit(wanted: int) -> int:
    """
    The process's soft limit on open files, raised towards ``wanted`` (as far as the hard limit
    lets it) when it is lower: a desktop's soft limit is often 1024 while its hard limit is not.
    """
    try:
        import resource
    except ImportError:  # not a POSIX system
        return wanted
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        raised = wanted if hard == resource.RLIM_INFINITY else min(hard, wanted)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (raised, hard))
            soft = raised
        except (ValueError, OSError):
            pass
    return wanted if soft == resource.RLIM_INFINITY else soft


def total_connections(requested: int) -> int:
    """``--max-connections`` as this process can hold it (see :func:`connection_cap`); a line if it cannot."""
    wanted = 2 * requested + _RESERVED_DESCRIPTORS if requested else 1 << 16
    cap = connection_cap(requested, descriptor_limit(wanted))
    if requested and cap < requested:
        log.warn(
            "--max-connections {requested} needs {wanted} open files and this process may open fewer; "
            "holding at most {cap} connections. Raise the limit (ulimit -n) to hold more.",
            requested=requested, wanted=wanted, cap=cap,
        )
    return cap


class ConnectionSlot(ProtocolWrapper):
    """
    One connection as the limit sees it; the HTTP channel says when it is protected (its ``slot``).
    A WebSocket the relay takes over keeps the slot, and the protection its request had.
    """

    host: str | None = None
    protected = False
    for_good = False
    vouched_by: str | None = None  # the local token it showed (managed mode)
    counted = False

    def protect(self, for_good: bool = False) -> None:
        """Never dropped to make room: until :meth:`unprotect`, or for good (the local token was shown)."""
        self.for_good = self.for_good or for_good
        if not self.protected:
            self.protected = True
            self.factory.protected(self)

    def unprotect(self) -> None:
        """The request is answered and the connection waits for the next one: it holds nothing now."""
        if self.protected and not self.for_good:
            self.protected = False
            self.factory.unprotected(self)

    def revoke(self) -> None:
        """The token it was protected for good by has been replaced (``rotate-token``)."""
        self.for_good = False
        self.vouched_by = None
        self.unprotect()


class _TooMany(Protocol):
    """Answers a connection over a limit with a 503 and closes it, reading nothing."""

    def __init__(self, message: str) -> None:
        self.message = message

    def connectionMade(self) -> None:
        body = error_body(self.message, "too-many-connections")
        self.transport.write(
            b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json; charset=UTF-8\r\n"
            b"Content-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(body), body)
        )
        self.transport.loseConnection()


class ConnectionLimit(WrappingFactory):
    """
    Wraps the site to count open connections, per client address and in total (0: no bound),
    WebSockets included (the relay takes a connection over from the HTTP channel, but it stays this
    wrapper's connection), and to drop unprotected ones to make room (see the module docstring).
    """

    protocol = ConnectionSlot
    noisy = False

    def __init__(self, site: Any, per_client: int, total: int = 0, repeats: RepeatCounter | None = None) -> None:
        super().__init__(site)
        self.per_client = per_client
        self.total = total
        self.open: dict[str, int] = {}
        self.held = 0
        # Unprotected connections, the one unprotected longest first (dicts keep insertion order).
        self._droppable: dict[ConnectionSlot, None] = {}
        # a flood of connections is a few lines and a count, as a burst of refusals is (jds.logs)
        self._repeats = repeats if repeats is not None else site.repeats
        self.guard = getattr(site, "guard", None)  # the listener tells it the port

    def buildProtocol(self, addr: Any) -> Any:
        host = getattr(addr, "host", None)
        if host is not None and self.per_client and self.open.get(host, 0) >= self.per_client:
            if not self._make_room(host):
                return self._refuse(
                    f"Too many open connections from {host} (the limit is {self.per_client}, all of them "
                    "in use by requests that showed the local token); close some, or start "
                    "jupyter-dev-server with a larger --max-connections-per-client."
                )
        if self.total and self.held >= self.total and not self._make_room(None):
            return self._refuse(
                f"Too many open connections (the limit is {self.total}, all of them in use by requests "
                "that showed the local token); close some, or start jupyter-dev-server with a larger "
                "--max-connections."
            )
        slot = super().buildProtocol(addr)
        slot.wrappedProtocol.slot = slot
        return slot

    def registerProtocol(self, p: ConnectionSlot) -> None:
        super().registerProtocol(p)
        host = getattr(p.transport.getPeer(), "host", None) if p.transport is not None else None
        p.host = host
        p.counted = True
        self.held += 1
        if host is not None:
            self.open[host] = self.open.get(host, 0) + 1
        if not p.protected:
            self._droppable[p] = None

    def unregisterProtocol(self, p: ConnectionSlot) -> None:
        super().unregisterProtocol(p)
        self._uncount(p)

    def protected(self, p: ConnectionSlot) -> None:
        self._droppable.pop(p, None)

    def unprotected(self, p: ConnectionSlot) -> None:
        if p.counted:
            self._droppable[p] = None

    def _uncount(self, p: ConnectionSlot) -> None:
        self._droppable.pop(p, None)
        if not p.counted:
            return
        p.counted = False
        self.held -= 1
        host = p.host
        if host is not None:
            left = self.open.get(host, 1) - 1
            if left > 0:
                self.open[host] = left
            else:
                self.open.pop(host, None)

    def _make_room(self, host: str | None) -> bool:
        """Drop the unprotected connection (of ``host``, or anyone's) that waited longest; whether there was one."""
        victim = next((p for p in self._droppable if host is None or p.host == host), None)
        if victim is None:
            return False
        self._uncount(victim)  # now, not when the reactor reports it closed: the next arrival counts right
        if victim.transport is not None:
            victim.transport.abortConnection()
        self._say(("connection-dropped",), lambda what: log.warn(
            "Dropped {what} that had not shown the local token (or, in pass-through mode, were between "
            "requests) to make room for new ones (--max-connections-per-client {per_client}, "
            "--max-connections {total}); a process on this machine may be holding connections open.",
            what=what, per_client=self.per_client, total=self.total,
        ))
        return True

    def _refuse(self, message: str) -> _TooMany:
        self._say(("too-many-connections", message), lambda what: log.warn(
            "Refused {what}: {message}", what=what, message=message,
        ))
        return _TooMany(message)

    def _say(self, kind: tuple[str, ...], line: Any) -> None:
        """``line(what)``: the first few of a burst as they come, then one a while with its count."""

        def summary(count: int, seconds: float) -> None:
            line(f"{count} more connection(s) in {seconds:.0f} s")

        if self._repeats.first(kind, summary):
            line("a connection")
