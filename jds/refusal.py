"""
The one shape of every answer the proxy gives itself instead of the hub's: a :class:`Refusal`.

A bad path, a server that would not start, a hub certificate or connection that failed: each is a
status, a ``message`` the IDE shows (a sentence about the user's setup), a short ``reason`` code and
a ``hint`` for the log line (which option or page fixes it). Pure, so :mod:`jds.paths` can raise it;
:func:`jds.errors.render_refusal` writes it as Jupyter's ``{"message", "reason"}`` JSON.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # typing only: this module stays pure
    from twisted.python.failure import Failure

__all__ = ["Refusal", "leaf_failures"]


class Refusal(Exception):
    """A request the proxy answers itself with ``status``; raised, or returned by ``explain()``."""

    def __init__(self, status: int, message: str, reason: str, hint: str = "") -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.reason = reason
        self.hint = hint

    def __repr__(self) -> str:
        return f"Refusal({self.status!r}, {self.message!r}, {self.reason!r}, hint={self.hint!r})"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Refusal):
            return NotImplemented
        return (self.status, self.message, self.reason, self.hint) == (other.status, other.message, other.reason, other.hint)

    __hash__ = Exception.__hash__


def leaf_failures(failure: Failure) -> list[Failure]:
    """
    The causes a failed hub connection is explained from: the hub client wraps them, as Agent does,
    in ResponseNeverReceived / RequestTransmissionFailed lists (``reasons``), any number deep.
    """
    reasons = getattr(failure.value, "reasons", None)
    if not reasons:
        return [failure]
    return [leaf for reason in reasons for leaf in leaf_failures(reason)]
