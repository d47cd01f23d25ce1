"""The pure pieces of ``login`` and the token-expiry warning, without a hub."""

from __future__ import annotations

import datetime
import shlex
import sys
from pathlib import Path

import pytest
from twisted.internet.defer import succeed
from twisted.internet.task import Clock
from twisted.python import usage

from jds.commands import daemon_command, login_command, program
from jds.hublogin import LoginOptions, parse_duration
from jds.paths import HubTarget
from jds.token_expiry import TokenExpiryWatch, parse_expiry, renewal_warning
from jds.tokens import default_hub_token_path, write_private
from jds.via import parse_via

NOW = datetime.datetime(2026, 12, 1, 12, 0, tzinfo=datetime.timezone.utc)
TARGET = HubTarget(host="10.0.0.5", port=8443, user="alice", base_path="/jh/", tls_name="hub.cluster")


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("30d", 30 * 86400), ("12h", 43200), ("90m", 5400), ("3600s", 3600), ("2", 172800), ("0", 0), ("1.5d", 129600)],
)
def test_parse_duration(text: str, seconds: int) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "soon", "-1d", "d"])
def test_parse_duration_refuses(text: str) -> None:
    with pytest.raises(usage.UsageError, match="--expires-in must be a duration"):
        parse_duration(text)


def test_renewal_warning_only_within_a_week() -> None:
    renew = "jupyter-dev-server login --hub x"
    assert renewal_warning(None, NOW, renew) is None
    assert renewal_warning(NOW + datetime.timedelta(days=8), NOW, renew) is None
    soon = renewal_warning(NOW + datetime.timedelta(days=3, hours=2), NOW, renew)
    assert soon == (
        "The hub token this proxy holds expires 2026-12-04 14:00 UTC (in 3 days): renew it with "
        "`jupyter-dev-server login --hub x`, then restart jupyter-dev-server."
    )
    assert "(within a day)" in renewal_warning(NOW + datetime.timedelta(hours=5), NOW, renew)
    assert "expired on 2026-11-30 12:00 UTC" in renewal_warning(NOW - datetime.timedelta(days=1), NOW, renew)


def test_parse_expiry_reads_the_hubs_format() -> None:
    assert parse_expiry("2026-12-04T14:00:00.123000Z") == datetime.datetime(
        2026, 12, 4, 14, 0, 0, 123000, tzinfo=datetime.timezone.utc
    )
    assert parse_expiry(None) is None


class FakeAPI:
    def __init__(self, answers: dict[str, tuple[int, object]]) -> None:
        self.answers = answers
        self.asked: list[str] = []

    def json(self, method: bytes, path: str):
        self.asked.append(path)
        return succeed(self.answers.get(path, (404, None)))


def test_expiry_watch_reads_the_token_model_and_rechecks_daily() -> None:
    clock = Clock()
    clock.advance(NOW.timestamp())
    api = FakeAPI({
        "user": (200, {"name": "alice", "token_id": "a12"}),
        "users/alice/tokens/a12": (200, {"expires_at": "2026-12-03T12:00:00Z"}),
    })  # fmt: skip
    watch = TokenExpiryWatch(api, "renew-me", clock)
    watch.startService()
    assert watch.report() == {
        "hub_token_expires": "2026-12-03T12:00:00+00:00",
        "hub_token_warning": watch.warning,
    }
    assert "(in 2 days)" in watch.warning and "`renew-me`" in watch.warning
    clock.advance(86400)
    assert api.asked.count("user") == 2
    watch.stopService()


def test_expiry_unknown_when_the_hub_will_not_say() -> None:
    watch = TokenExpiryWatch(FakeAPI({"user": (200, {"name": "alice", "token_id": "a12"})}), "renew", Clock())
    watch.startService()
    assert watch.report() == {"hub_token_expires": "unknown", "hub_token_warning": None}
    watch.stopService()


def test_printed_commands_name_the_script_by_absolute_path(tmp_path: Path) -> None:
    script = Path(sys.executable).parent / "jupyter-dev-server"
    assert program() == (str(script.absolute()) if script.exists() else "jupyter-dev-server")
    command = shlex.split(daemon_command(TARGET, "ca.pem", tmp_path / "tok"))
    assert command[1:] == [
        "--hub", "https://10.0.0.5:8443/jh/", "--user", "alice", "--ca-cert", str(Path("ca.pem").absolute()),
        "--tls-name", "hub.cluster", "--token-file", str(tmp_path / "tok"),
    ]  # fmt: skip
    login = shlex.split(login_command(HubTarget(host="hub", port=8000, user="bob"), None, None))
    assert login[1:] == ["login", "--hub", "https://hub:8000", "--user", "bob"]


def test_printed_commands_carry_a_via_given_on_the_command_line_but_no_password(tmp_path: Path) -> None:
    bob = HubTarget(host="hub", port=8000, user="bob")
    login = shlex.split(login_command(bob, None, None, parse_via("ssh://me@login-node")))
    assert login[-2:] == ["--via", "ssh://me@login-node:22"]
    direct = shlex.split(daemon_command(bob, None, tmp_path / "tok", parse_via("direct")))
    assert direct[-4:-2] == ["--via", "direct"]
    for via in (parse_via("http://u:secret@proxy:3128"), parse_via("http://proxy:3128", "HTTPS_PROXY")):
        assert "--via" not in shlex.split(login_command(bob, None, None, via))


def test_login_options_share_the_daemons_environment_defaults(tmp_path: Path) -> None:
    options = LoginOptions(environ={
        "JUPYTER_SERVER_IP_OR_NAME": "10.0.0.5", "JUPYTER_SERVER_PORT": "8443", "JUPYTER_USERNAME": "alice",
        "JUPYTER_SERVER_NAME": "hub.cluster", "XDG_CONFIG_HOME": str(tmp_path),
    })  # fmt: skip
    options.parseOptions([])
    assert options["target"] == HubTarget(host="10.0.0.5", port=8443, user="alice", tls_name="hub.cluster")
    assert options["token-file"] == tmp_path / "jupyter-dev-server" / "hub-token"
    assert options["expires-in"] == 30 * 86400
    assert default_hub_token_path({}) == Path.home() / ".config" / "jupyter-dev-server" / "hub-token"


def test_write_private_replaces_the_token_owner_only(tmp_path: Path) -> None:
    path = tmp_path / "new" / "hub-token"
    write_private(path, "one\n")
    write_private(path, "two\n")
    assert path.read_text() == "two\n"
    assert path.stat().st_mode & 0o777 == 0o600
    assert path.parent.stat().st_mode & 0o777 == 0o700
    assert sorted(p.name for p in path.parent.iterdir()) == ["hub-token"]


def test_status_document_and_text_carry_the_expiry_warning() -> None:
    import json as _json

    from jds.auth import Credentials
    from jds.stats import Stats
    from jds.status import StatusResource
    from jds.status_command import describe

    clock = Clock()
    clock.advance(NOW.timestamp())
    api = FakeAPI({
        "user": (200, {"name": "alice", "token_id": "a12"}),
        "users/alice/tokens/a12": (200, {"expires_at": "2026-12-03T12:00:00Z"}),
    })  # fmt: skip
    watch = TokenExpiryWatch(api, "jupyter-dev-server login --hub x", clock)
    watch.startService()
    resource = StatusResource(Stats(), TARGET, Credentials("hub", "local"), token_watch=watch)
    report = _json.loads(resource.document("running"))
    assert report["hub_token_expires"] == "2026-12-03T12:00:00+00:00"
    text = describe(report, "http://127.0.0.1:8000")
    assert "  hub token:  expires 2026-12-03T12:00:00+00:00" in text
    assert "  warning:    The hub token this proxy holds expires 2026-12-03 12:00 UTC (in 2 days): renew it with " \
           "`jupyter-dev-server login --hub x`, then restart jupyter-dev-server." in text
    watch.stopService()
    never = describe({**report, "hub_token_expires": "never", "hub_token_warning": None}, "http://127.0.0.1:8000")
    assert "  hub token:  never expires" in never and "warning" not in never
