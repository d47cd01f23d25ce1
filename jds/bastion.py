"""
``--via ssh://[user@]host[:port]``: every hub connection through one OpenSSH session to a bastion.

One ``ssh`` child (:func:`jds.openssh.master_command`) logs in once and holds a forward from a Unix
socket, in a directory only this user can enter, to the hub as the bastion sees it (the bastion's
DNS resolves the hub's name); each hub connection is a new channel of that session, so twenty
requests and a kernel are one login. The child starts at the first need, is watched for as long as
the daemon runs, and when it dies (a bastion reboot, a network change, or ServerAlive noticing a
silent link) it is started again on :func:`jds.reconnect.backoff`, while the relay holds the
kernels' sockets as in any hub-link outage. A start that fails (a refused login, an unknown host
key) is not retried by itself, so a wrong key does not knock at the bastion every ten seconds: the
next need tries again, no sooner than the backoff allows, and meanwhile gets the same sentence. Such
a refusal is also ``final`` (:func:`jds.retry.may_retry`): the requests that met it get their 502 at
once instead of being sent again, each retry starting ssh for the same refusal; a network failure
(the bastion unreachable) is retried on the backoff as before.

Readiness is the forward's socket appearing (ssh creates it only after the login), polled with a
deadline; the stale file of a previous child is removed first.
"""

from __future__ import annotations

import os
import shutil
import stat
import tempfile
from collections import deque
from typing import Any

from twisted.internet import error as net_error
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.endpoints import UNIXClientEndpoint
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.internet.protocol import Factory, ProcessProtocol, Protocol
from twisted.internet.utils import getProcessOutputAndValue
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from jds.openssh import (
    SSHDestination,
    base_command,
    by_hand,
    describe_ssh_failure,
    forward_command,
    last_stderr_line,
    master_command,
    remote_command,
)
from jds.reconnect import backoff
from jds.refusal import Refusal, leaf_failures
from jds.stats import iso_time

__all__ = ["SSHVia", "SSHViaError"]

log = Logger(namespace="jds")

# Environment variables never handed to ssh (nor so to ProxyCommands it runs): the hub token and friends.
_SECRET_WORDS = ("TOKEN", "PASSWORD", "SECRET")
# ssh's failures that no new attempt within a request's retry window can change: only the user can.
_FINAL_REASONS = frozenset({"via-login-refused", "via-host-key"})
# A channel failure ssh reported this recently explains a hub connection that closed at once.
_CHANNEL_FRESH = 5.0
# A hub connection closed within this many seconds may be a failed channel, whose reason ssh
# writes to stderr separately; its end waits up to _CHANNEL_NEWS seconds for that line.
_SHORT_LIVED = 1.0
# How long check's probe waits for ssh to close a channel the bastion could not open.
_PROBE = 1.0
_AGAIN = "Once that works, the next request starts ssh again: no need to restart jupyter-dev-server."
_CHANNEL_NEWS = 0.25


class SSHViaError(net_error.ConnectError):
    """
    The ssh session is not there; ``sentence`` quotes ssh and says what to run by hand. ``final``
    when the bastion refused the login or the host key (see :func:`jds.retry.may_retry`).
    """

    def __init__(self, sentence: str, reason: str) -> None:
        super().__init__(string=sentence)
        self.sentence = sentence
        self.reason = reason
        self.final = reason in _FINAL_REASONS

    def __str__(self) -> str:
        return self.sentence


def _child_environment() -> dict[str, str]:
    return {name: value for name, value in os.environ.items() if not any(word in name.upper() for word in _SECRET_WORDS)}


def _is_socket(path: str) -> bool:
    try:
        return stat.S_ISSOCK(os.stat(path).st_mode)
    except OSError:
        return False


class _SSHChild(ProcessProtocol):
    """One run of the ssh master: its stderr lines go to the via, and so does its end."""

    def __init__(self, via: SSHVia) -> None:
        self.via = via
        self.pending = b""

    def connectionMade(self) -> None:  # noqa: N802 - Twisted's name
        self.transport.closeStdin()  # type: ignore[union-attr]

    def errReceived(self, data: bytes) -> None:  # noqa: N802 - Twisted's name
        *lines, self.pending = (self.pending + data).split(b"\n")
        for line in lines:
            self.via._stderr(self, line.decode("utf-8", "replace"))

    def processEnded(self, reason: Failure) -> None:  # noqa: N802 - Twisted's name
        if self.pending:
            self.via._stderr(self, self.pending.decode("utf-8", "replace"))
        self.via._ended(self, getattr(reason.value, "exitCode", None))


@implementer(IStreamClientEndpoint)
class _ForwardEndpoint:
    """A hub connection: a new channel of the session, reached through the forward's Unix socket."""

    def __init__(self, via: SSHVia, host: str, port: int, timeout: float) -> None:
        self._via, self._host, self._port, self._timeout = via, host, port, timeout

    def connect(self, protocolFactory):  # noqa: N803 - interface name
        via = self._via
        started = via.reactor.seconds()

        def connected(protocol: Any) -> Any:
            # ssh accepts on the socket before the bastion has tried the hub; when it cannot reach
            # the hub it closes the connection and says why on stderr, maybe a moment later. A
            # connection that ends that soon waits briefly for the words, so explain() can name them.
            lost = protocol.connectionLost

            def connection_lost(reason: Failure) -> None:
                if via.reactor.seconds() - started < _SHORT_LIVED and via.state == "up":
                    via._after_channel_news(lambda: lost(reason))
                else:
                    lost(reason)

            protocol.connectionLost = connection_lost
            return protocol

        return via._socket_for(self._host, self._port).addCallback(
            lambda path: UNIXClientEndpoint(via.reactor, path, timeout=self._timeout).connect(protocolFactory)
        ).addCallback(connected)


class SSHVia:
    """The ``ssh://`` via: one ssh session, its forwards, its state and its failures in words."""

    kind = "ssh"

    def __init__(
        self, reactor: Any, spec: Any, ssh_command: str = "ssh", ready_timeout: float = 30.0, connect_timeout: float = 10.0
    ) -> None:
        """
        ``spec``: the parsed ``--via`` (:class:`jds.via.ViaSpec`). Port 22, the default of an
        ``ssh://`` URL, is left to ssh, so that a ``Port`` line of the user's ssh config still applies.
        """
        self.reactor = reactor
        self.spec = spec
        port = getattr(spec, "port", None)
        self.destination = SSHDestination(spec.host, getattr(spec, "user", None) or None, port if port != 22 else None)
        self.base = base_command(ssh_command)
        self.ready_timeout = ready_timeout
        self.connect_timeout = connect_timeout
        self.manual = by_hand(self.base, self.destination)
        self.restarts = 0
        self._state = "idle"
        self._since: str | None = None  # when the state last changed, ISO 8601 UTC
        self.error: str | None = None  # the sentence of the last failure, until a session is up
        self._error_reason = "via-failed"
        self._dir: str | None = None
        self._forwards: dict[tuple[str, int], str] = {}
        self._child: _SSHChild | None = None
        self._stderr_lines: deque[str] = deque(maxlen=20)
        self._channel_failure: tuple[float, str] | None = None
        self._waiters: list[tuple[tuple[str, int], Deferred]] = []
        self._delays = backoff()
        self._not_before = 0.0
        self._calls: dict[str, Any] = {}
        self._logged: str | None = None
        self._ended_waiters: list[Deferred] = []
        self._started_once = False
        self._shutdown_trigger: Any = None
        self._timed_out: _SSHChild | None = None
        self._news_waiting: list[Any] = []

    @property
    def state(self) -> str:
        """idle (nothing asked yet), starting, up, down (ended or failed), stopped."""
        return self._state

    @state.setter
    def state(self, value: str) -> None:
        if value != self._state:
            self._state = value
            self._since = iso_time(self.reactor.seconds())

    # the via interface -----------------------------------------------------------------------

    def endpoint(self, host: str, port: int) -> IStreamClientEndpoint:
        return _ForwardEndpoint(self, host, port, self.connect_timeout)

    def status(self) -> dict[str, Any]:
        child = self._child
        pid = getattr(getattr(child, "transport", None), "pid", None) if child is not None else None
        url = getattr(self.spec, "url", None)
        return {
            "kind": self.kind,
            "address": url() if callable(url) else f"ssh://{self.destination.display}",
            "source": getattr(self.spec, "source", ""),
            "destination": self.destination.display,
            "state": self.state,
            "since": self._since,
            "restarts": self.restarts,
            "pid": pid,
            "last_error": self.error,
        }

    def explain(self, failure: Failure) -> Refusal | None:
        """The 502 for a failure of ours: the session is not up, or the bastion could not reach the hub."""
        leaves = leaf_failures(failure)
        for leaf in leaves:
            if isinstance(leaf.value, SSHViaError):
                # the sentence says what to run; the hint, that the daemon need not be restarted after
                status = 503 if leaf.value.reason == "shutting-down" else 502
                return Refusal(status, leaf.value.sentence, leaf.value.reason, hint=_AGAIN)
        if any(isinstance(leaf.value, Refusal) for leaf in leaves):
            return None
        recent = self._channel_failure
        if recent is not None and self.reactor.seconds() - recent[0] <= _CHANNEL_FRESH:
            sentence, reason = self._describe(recent[1], None)
            return Refusal(502, sentence, reason, hint="The hub's address is dialled by the bastion, not by this machine.")
        return None

    def check(self, host: str, port: int) -> Deferred:
        """
        ``check``'s via line once the session is up and the bastion has opened a channel to
        ``host:port``; fails with the :class:`Refusal` (a channel ssh closes at once is named too:
        ssh accepts on the socket before the bastion has tried the hub).
        """

        def closed(_: object) -> None:
            refusal = self.explain(Failure(net_error.ConnectionDone()))
            raise refusal or SSHViaError(
                f"ssh to {self.destination.display} closed the connection to {host}:{port} at once.", "via-failed"
            )

        def probed(still_open: bool) -> str | Deferred:
            if not still_open:  # ssh's reason may follow on stderr a moment later
                news: Deferred = Deferred()
                self._after_channel_news(lambda: news.callback(None))
                return news.addCallback(closed)
            return (
                f"ssh to {self.destination.display} logged in (pid {self.status()['pid']}); "
                f"its channel to {host}:{port} (a name the bastion resolves) is open"
            )

        def failed(failure: Failure) -> Failure:
            refusal = self.explain(failure)
            return Failure(refusal) if refusal is not None else failure

        up = self._socket_for(host, port).addCallback(lambda path: _still_open(self.reactor, path, _PROBE))
        return up.addCallback(probed).addErrback(failed)

    def stop(self) -> Deferred:
        """End the ssh child (SIGTERM, then SIGKILL after 5 s); fires once it has exited."""
        self.state = "stopped"
        for call in self._calls.values():
            if call.active():
                call.cancel()
        self._calls.clear()
        self._fail_waiters(SSHViaError("jupyter-dev-server is shutting down.", "shutting-down"))
        self._channel_news()
        child = self._child
        done: Deferred = succeed(None)
        if child is not None and child.transport is not None and child.transport.pid is not None:
            done = Deferred()
            self._ended_waiters.append(done)
            _signal(child, "TERM")
            kill = self.reactor.callLater(5.0, _signal, child, "KILL")
            done.addBoth(lambda result: (kill.cancel() if kill.active() else None, result)[1])
        return done.addBoth(lambda result: (self._remove_dir(), result)[1])

    # over the same session, for login ---------------------------------------------------------

    def run(self, argv: list[str]) -> Deferred:
        """Run ``argv`` on the bastion over the session; fires with ``(stdout, stderr, exit code)``."""

        def go(_: object) -> Deferred:
            command = remote_command(self.base, self.destination, self._control(), argv)
            return getProcessOutputAndValue(
                _executable(command[0]), command[1:], env=_child_environment(), reactor=self.reactor
            )

        return self._ensure_up().addCallback(go)

    # the session -------------------------------------------------------------------------------

    def _ensure_up(self) -> Deferred:
        """The session, forwarding to the hub asked for first (``login``'s commands need only the session)."""
        key = next(iter(self._forwards), None)
        if key is None:
            return fail(SSHViaError("No hub address was asked for yet.", "via-failed"))
        return self._socket_for(*key)

    def _socket_for(self, host: str, port: int) -> Deferred:
        key = (host, port)
        if self.state == "stopped":
            return _fail_soon(self.reactor, SSHViaError("jupyter-dev-server is shutting down.", "shutting-down"))
        if key not in self._forwards:
            self._forwards[key] = os.path.join(self._directory(), f"hub{len(self._forwards)}.sock")
            if self.state == "up":
                return self._add_forward(key)
        if self.state == "up":
            return succeed(self._forwards[key])
        must_start = self.state == "idle" or (self.state == "down" and "restart" not in self._calls)
        if must_start and self.reactor.seconds() < self._not_before and self.error is not None:
            return _fail_soon(self.reactor, SSHViaError(self.error, self._error_reason))
        waiter: Deferred = Deferred(lambda d: self._waiters.remove((key, d)) if (key, d) in self._waiters else None)
        self._waiters.append((key, waiter))
        if must_start:
            self._start()
        return waiter

    def _add_forward(self, key: tuple[str, int]) -> Deferred:
        path = self._forwards[key]
        command = forward_command(self.base, self.destination, self._control(), path, *key)
        try:
            program = _executable(command[0])
        except SSHViaError as exc:
            return _fail_soon(self.reactor, exc)
        asked = getProcessOutputAndValue(program, command[1:], env=_child_environment(), reactor=self.reactor)

        def answered(result: tuple[bytes, bytes, int]) -> str:
            if result[2] != 0 or not _is_socket(path):
                sentence, reason = self._describe(last_stderr_line(result[1].decode("utf-8", "replace")), result[2])
                raise SSHViaError(sentence, reason)
            return path

        return asked.addCallback(answered)

    def _start(self) -> None:
        if self._started_once:
            self.restarts += 1
        self._started_once = True
        self._not_before = self.reactor.seconds() + next(self._delays)
        for path in [*self._forwards.values(), self._control()]:
            if os.path.lexists(path):
                os.unlink(path)
        forwards = [(path, host, port) for (host, port), path in self._forwards.items()]
        command = master_command(self.base, self.destination, self._control(), forwards)
        self._stderr_lines.clear()
        child = self._child = _SSHChild(self)
        self.state = "starting"
        try:
            self.reactor.spawnProcess(child, _executable(command[0]), command, env=_child_environment())
        except (OSError, SSHViaError) as exc:
            self._child = None
            self.state = "down"
            message = exc.sentence if isinstance(exc, SSHViaError) else f"Cannot run {command[0]}: {exc}."
            # on the next turn: the waiters must not fail synchronously (see _fail_soon)
            self.reactor.callLater(0, self._failed, message, "via-ssh-missing")
            return
        if self._shutdown_trigger is None:
            self._shutdown_trigger = self.reactor.addSystemEventTrigger("before", "shutdown", self.stop)
        self._calls["deadline"] = self.reactor.callLater(self.ready_timeout, self._too_slow, child)
        self._poll(child, 0.02)

    def _poll(self, child: _SSHChild, interval: float) -> None:
        if child is not self._child or self.state != "starting":
            return
        if all(_is_socket(path) for path in self._forwards.values()):
            self._became_up()
            return
        self._calls["poll"] = self.reactor.callLater(interval, self._poll, child, min(interval * 2, 0.2))

    def _became_up(self) -> None:
        self.state = "up"
        self.error = None
        self._delays = backoff()
        self._cancel("deadline", "poll")
        pid = self.status()["pid"]
        if self._logged is not None or self.restarts:
            log.info("via: ssh session to {dest} is up again (pid {pid}, restart {n})", dest=self.destination.display, pid=pid, n=self.restarts)
        self._logged = None
        waiters, self._waiters = self._waiters, []
        for key, waiter in waiters:
            waiter.callback(self._forwards[key])

    def _too_slow(self, child: _SSHChild) -> None:
        if child is not self._child or self.state != "starting":
            return
        said = last_stderr_line("\n".join(self._stderr_lines))
        sentence = (
            f"ssh to {self.destination.display} did not set up its forward within {self.ready_timeout:g} s"
            + (f' (ssh said "{said}")' if said else "")
            + f"; run '{self.manual}' once in a terminal to see where it stops."
        )
        self._timed_out = child
        self._failed(sentence, "via-timeout")
        _signal(child, "TERM")

    def _stderr(self, child: _SSHChild, line: str) -> None:
        line = line.strip()
        if not line:
            return
        self._stderr_lines.append(line)
        if line.startswith("channel ") and " open failed: " in line:
            # not logged here: the request or socket it failed logs explain()'s sentence once
            self._channel_failure = (self.reactor.seconds(), line)
            self._channel_news()

    def _after_channel_news(self, then: Any) -> None:
        self._news_waiting.append(then)
        if "news" not in self._calls:
            self._calls["news"] = self.reactor.callLater(_CHANNEL_NEWS, self._channel_news)

    def _channel_news(self) -> None:
        self._cancel("news")
        waiting, self._news_waiting = self._news_waiting, []
        for then in waiting:
            then()

    def _ended(self, child: _SSHChild, code: int | None) -> None:
        if child is not self._child:
            return
        self._child = None
        waiters, self._ended_waiters = self._ended_waiters, []
        for waiter in waiters:
            waiter.callback(None)
        if self.state == "stopped":
            return
        was_up = self.state == "up"
        self._cancel("deadline", "poll")
        self.state = "down"
        sentence, reason = self._describe(last_stderr_line("\n".join(self._stderr_lines)), code)
        if was_up:
            delay = next(self._delays)
            log.warn(
                "via: the ssh session to {dest} ended ({sentence}); starting it again in {delay:g} s",
                dest=self.destination.display, sentence=sentence, delay=delay,
            )
            self.error = sentence
            self._error_reason = reason
            self._calls["restart"] = self.reactor.callLater(delay, self._restart)
            return
        if self._timed_out is not child:
            self._failed(sentence, reason)

    def _restart(self) -> None:
        self._calls.pop("restart", None)
        if self.state == "down":
            self._start()

    def _failed(self, sentence: str, reason: str) -> None:
        """A start that failed. Logged here only when no request or socket waits (they log it)."""
        self.error = sentence
        self._error_reason = reason
        if not self._waiters and sentence != self._logged:
            log.error("via: {sentence}", sentence=sentence)
        self._logged = sentence
        self._fail_waiters(SSHViaError(sentence, reason))

    def _fail_waiters(self, error: SSHViaError) -> None:
        waiters, self._waiters = self._waiters, []
        for _, waiter in waiters:
            waiter.errback(Failure(error))

    def _describe(self, line: str, code: int | None) -> tuple[str, str]:
        hubs = ", ".join(f"{host}:{port}" for host, port in self._forwards) or "the hub"
        return describe_ssh_failure(line, self.destination, self.manual, hubs, code)

    def _cancel(self, *names: str) -> None:
        for name in names:
            call = self._calls.pop(name, None)
            if call is not None and call.active():
                call.cancel()

    def _directory(self) -> str:
        if self._dir is None:
            # mkdtemp makes it 0700: the forward's socket is this user's alone. Short, for sun_path.
            self._dir = tempfile.mkdtemp(prefix="jds-ssh-")
        return self._dir

    def _control(self) -> str:
        return os.path.join(self._directory(), "ctl")

    def _remove_dir(self) -> None:
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None


class _Probe(Protocol):
    def __init__(self, closed: Deferred) -> None:
        self.closed = closed

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]  # noqa: N802
        if not self.closed.called:
            self.closed.callback(False)


def _still_open(reactor: Any, path: str, seconds: float) -> Deferred:
    """Whether a connection to the forward at ``path`` is still open after ``seconds`` (then closed)."""
    closed: Deferred = Deferred()
    factory = Factory.forProtocol(lambda: _Probe(closed))
    factory.noisy = False

    def connected(probe: _Probe) -> Deferred:
        def waited() -> None:
            if not closed.called:
                closed.callback(True)
                probe.transport.loseConnection()  # type: ignore[union-attr]

        reactor.callLater(seconds, waited)
        return closed

    return UNIXClientEndpoint(reactor, path, timeout=seconds).connect(factory).addCallback(connected)


def _fail_soon(reactor: Any, error: SSHViaError) -> Deferred:
    """
    A failed connect, on the next reactor turn as a TCP connect's would be: the proxy's callers
    were written for endpoints that never fail synchronously (a synchronous failure left a
    kernelspecs request waiting for ever).
    """
    failing: Deferred = Deferred()
    reactor.callLater(0, failing.errback, Failure(error))
    return failing


def _executable(program: str) -> str:
    found = shutil.which(program)
    if found is None:
        raise SSHViaError(
            f"The ssh program {program!r} (from --ssh-command) is not installed or not on PATH.", "via-ssh-missing"
        )
    return found


def _signal(child: _SSHChild, name: str) -> None:
    try:
        child.transport.signalProcess(name)  # type: ignore[union-attr]
    except (net_error.ProcessExitedAlready, AttributeError):
        pass
