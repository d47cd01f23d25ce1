"""
When the hub token a daemon holds runs out, and the warning a week before it does.

Tokens from ``jupyter-dev-server login`` expire (30 days by default); unwarned, that shows up as a
401 in the IDE one morning. The hub tells a token's expiry only in its token model: ``GET
/hub/api/user`` names the token that asks (``token_id``, JupyterHub 5+) and ``GET
/hub/api/users/<name>/tokens/<id>`` carries ``expires_at``. Both are within the scopes a user's own
token has (``read:tokens!user``); with a narrower token the expiry is simply unknown, never an error.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass
from typing import Any

from twisted.application import service
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from jds.paths import escape_name

log = Logger(namespace="jds.token")

__all__ = ["RENEW_BEFORE", "TokenExpiryWatch", "TokenLife", "describe_expiry", "held_token_life", "parse_expiry",
           "renewal_warning"]

RENEW_BEFORE = datetime.timedelta(days=7)


@dataclass(frozen=True)
class TokenLife:
    """``expires_at`` is ``None`` for a token that never expires."""

    expires_at: datetime.datetime | None


def parse_expiry(value: object) -> datetime.datetime | None:
    """The hub's ``expires_at`` (ISO 8601, ``Z`` for UTC; ``None`` for never) as an aware datetime."""
    if not isinstance(value, str) or not value:
        return None
    stamp = datetime.datetime.fromisoformat(value.replace("Z", "+00:00"))
    return stamp if stamp.tzinfo else stamp.replace(tzinfo=datetime.timezone.utc)


def describe_expiry(expires_at: datetime.datetime | None) -> str:
    if expires_at is None:
        return "never expires"
    return "expires " + expires_at.astimezone(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def renewal_warning(expires_at: datetime.datetime | None, now: datetime.datetime, renew: str) -> str | None:
    """A sentence saying how to renew the token, when it expires within :data:`RENEW_BEFORE`."""
    if expires_at is None or expires_at - now > RENEW_BEFORE:
        return None
    left = expires_at - now
    if left <= datetime.timedelta(0):
        when = f"expired on {describe_expiry(expires_at)[len('expires '):]}"
    elif left < datetime.timedelta(days=1):
        when = f"{describe_expiry(expires_at)} (within a day)"
    else:
        when = f"{describe_expiry(expires_at)} (in {left.days} day{'' if left.days == 1 else 's'})"
    return f"The hub token this proxy holds {when}: renew it with `{renew}`, then restart jupyter-dev-server."


@inlineCallbacks
def held_token_life(api: Any):
    """Fires with the :class:`TokenLife` of ``api``'s token, or ``None`` when the hub will not say."""
    code, me = yield api.json(b"GET", "user")
    if code != 200 or not isinstance(me, dict) or not me.get("token_id") or not me.get("name"):
        return None
    code, model = yield api.json(b"GET", f"users/{escape_name(me['name'])}/tokens/{escape_name(me['token_id'])}")
    if code != 200 or not isinstance(model, dict):
        return None
    try:
        return TokenLife(parse_expiry(model.get("expires_at")))
    except ValueError:
        return None


class TokenExpiryWatch(service.Service):
    """
    Asks the hub for the held token's expiry at start and once a day, and logs a warning with the
    ``login`` command that renews it once it is within a week; the status page shows the same.
    """

    interval = 86400.0

    def __init__(self, api: Any, renew_command: str, reactor: Any) -> None:
        self.api = api
        self.renew_command = renew_command
        self.reactor = reactor
        self.life: TokenLife | None = None
        self.warning: str | None = None
        self._loop: LoopingCall | None = None

    def startService(self) -> None:
        super().startService()
        self._loop = LoopingCall(self.refresh)
        self._loop.clock = self.reactor
        self._loop.start(self.interval, now=True).addErrback(lambda failure: None)

    def stopService(self) -> Deferred | None:
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        return super().stopService()

    def refresh(self) -> Deferred:
        d = held_token_life(self.api)
        d.addCallbacks(self._learned, lambda failure: None)
        return d

    def _learned(self, life: TokenLife | None) -> None:
        self.life = life
        if life is None:
            self.warning = None
            return
        now = datetime.datetime.fromtimestamp(self.reactor.seconds(), datetime.timezone.utc)
        self.warning = renewal_warning(life.expires_at, now, self.renew_command)
        if self.warning:
            log.warn("{warning}", warning=self.warning)

    def report(self) -> dict[str, Any]:
        """What the status page says about the token."""
        if self.life is None:
            return {"hub_token_expires": "unknown", "hub_token_warning": None}
        stamp = self.life.expires_at
        return {
            "hub_token_expires": stamp.isoformat(timespec="seconds") if stamp else "never",
            "hub_token_warning": self.warning,
        }
