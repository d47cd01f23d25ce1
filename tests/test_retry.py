"""
Which failed hub requests may be sent again, the waits between attempts, and the outage log: in
memory, with ``task.Clock`` for time.
"""

from __future__ import annotations

import pytest
from twisted.internet import error as net_error
from twisted.internet.defer import CancelledError, TimeoutError
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.web.client import (
    RequestNotSent,
    RequestTransmissionFailed,
    ResponseFailed,
    ResponseNeverReceived,
)

from jds.refusal import Refusal
from jds.retry import FIRST_DELAY, RETRY_WINDOW, RetryPlan, link_broken, may_retry, never_sent


def lost_under(wrapper: type[Exception], leaf: Exception) -> Failure:
    return Failure(wrapper([Failure(leaf)]))


NEVER_SENT = [
    Failure(net_error.ConnectionRefusedError()),
    Failure(net_error.TCPTimedOutError()),
    Failure(net_error.TimeoutError()),  # the connect timed out
    Failure(net_error.DNSLookupError("hub.example.org")),
    Failure(net_error.ConnectionLost()),  # lost during the TLS handshake: the endpoint fails the connect
    Failure(RequestNotSent()),
]
MAY_HAVE_REACHED_THE_HUB = [
    lost_under(ResponseNeverReceived, net_error.ConnectionLost()),
    lost_under(ResponseNeverReceived, net_error.ConnectionDone()),
    lost_under(RequestTransmissionFailed, net_error.ConnectionLost()),
    lost_under(ResponseFailed, net_error.ConnectionLost()),
]
NOT_THE_LINK = [
    Failure(TimeoutError()),  # the hub took the request and did not answer in time
    Failure(CancelledError()),  # the IDE went away
    Failure(Refusal(502, "The hub's certificate is not signed by the CA.", "unknown-ca", hint="--ca-cert")),
    lost_under(ResponseNeverReceived, CancelledError()),
    lost_under(ResponseFailed, ValueError("bad response head")),
]


@pytest.mark.parametrize("failure", NEVER_SENT, ids=lambda f: f.type.__name__)
def test_a_request_never_sent_is_retried_whatever_its_method(failure: Failure) -> None:
    assert never_sent(failure) and link_broken(failure)
    for method in (b"GET", b"POST", b"PUT", b"PATCH", b"DELETE"):
        assert may_retry(method, failure)


@pytest.mark.parametrize("failure", MAY_HAVE_REACHED_THE_HUB, ids=lambda f: f.type.__name__)
def test_a_request_that_may_have_reached_the_hub_is_retried_only_if_safe(failure: Failure) -> None:
    assert link_broken(failure) and not never_sent(failure)
    for method in (b"GET", b"HEAD", b"OPTIONS"):
        assert may_retry(method, failure)
    for method in (b"POST", b"PUT", b"PATCH", b"DELETE"):
        assert not may_retry(method, failure)


@pytest.mark.parametrize("failure", NOT_THE_LINK, ids=lambda f: f.type.__name__)
def test_failures_that_are_not_a_broken_link_are_never_retried(failure: Failure) -> None:
    assert not link_broken(failure)
    assert not may_retry(b"GET", failure)


def test_a_failure_marked_final_is_never_retried_even_if_never_sent() -> None:
    """An ssh login or host key the bastion refused: no attempt within the window can change it."""
    from jds.bastion import SSHViaError

    refused = SSHViaError('ssh to login-node failed: "Permission denied (publickey)."', "via-login-refused")
    unknown_key = SSHViaError('ssh to login-node failed: "Host key verification failed."', "via-host-key")
    unreachable = SSHViaError('ssh to login-node failed: "Connection refused"', "via-unreachable")
    for error, retried in ((refused, False), (unknown_key, False), (unreachable, True)):
        for failure in (Failure(error), lost_under(ResponseNeverReceived, error)):
            assert may_retry(b"GET", failure) is retried, (error.reason, failure)


def test_waits_double_from_half_a_second_and_end_with_the_window() -> None:
    clock = Clock()
    plan = RetryPlan(clock)
    waits = []
    while (wait := plan.next_delay()) is not None:
        waits.append(wait)
        clock.advance(wait)
    assert waits[0] == FIRST_DELAY
    assert waits == [0.5, 1.0, 2.0, 4.0, 2.5]
    assert clock.seconds() == RETRY_WINDOW
    assert plan.attempts == 6


def test_time_an_attempt_takes_counts_against_the_window() -> None:
    clock = Clock()
    plan = RetryPlan(clock)
    assert plan.next_delay() == 0.5
    clock.advance(9.8)  # that attempt hung until its connect timed out
    assert plan.next_delay() == pytest.approx(0.2)
    clock.advance(0.2)
    assert plan.next_delay() is None
