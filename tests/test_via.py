"""``--via`` and the proxy variables: parsing, NO_PROXY, which one wins, and what a person sees of them."""

from __future__ import annotations

import pytest
import trustme
from twisted.internet.testing import MemoryReactorClock
from twisted.python import usage

from jds.options import Options
from jds.reach import DirectVia, ProxyVia, make_via
from jds.via import ViaSpec, choose_via, no_proxy_matches, parse_via, proxy_from_environment


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("direct", ViaSpec("direct", source="--via")),
        ("DIRECT", ViaSpec("direct", source="--via")),
        ("http://proxy.example:3128", ViaSpec("http", "proxy.example", 3128, source="--via")),
        ("http://proxy.example", ViaSpec("http", "proxy.example", 80, source="--via")),
        ("http://proxy.example:3128/", ViaSpec("http", "proxy.example", 3128, source="--via")),
        ("proxy.example:3128", ViaSpec("http", "proxy.example", 3128, source="--via")),
        ("https://proxy.example", ViaSpec("https", "proxy.example", 443, source="--via")),
        ("socks5://127.0.0.1:1080", ViaSpec("socks5", "127.0.0.1", 1080, source="--via")),
        ("socks5h://127.0.0.1", ViaSpec("socks5", "127.0.0.1", 1080, source="--via")),
        ("ssh://login-node", ViaSpec("ssh", "login-node", 22, source="--via")),
        ("ssh://me@login-node:2222", ViaSpec("ssh", "login-node", 2222, "me", source="--via")),
        ("http://[::1]:8080", ViaSpec("http", "::1", 8080, source="--via")),
    ],
)
def test_parse_via(value: str, expected: ViaSpec) -> None:
    assert parse_via(value) == expected


def test_credentials_are_percent_decoded_and_never_shown() -> None:
    spec = parse_via("http://j%40doe:p%3Ass%40w0rd@proxy.example:3128", "HTTPS_PROXY")
    assert (spec.user, spec.password) == ("j@doe", "p:ss@w0rd")
    for shown in (spec.describe(), spec.url(), repr(spec)):
        assert "p:ss@w0rd" not in shown and "p%3Ass" not in shown
    assert spec.describe() == "the HTTP proxy at proxy.example:3128 (from HTTPS_PROXY)"
    assert spec.url() == "http://proxy.example:3128"


def test_describe() -> None:
    assert parse_via("ssh://me@login-node").describe() == "the SSH bastion at me@login-node:22 (from --via)"
    assert parse_via("socks5://127.0.0.1:1080").url() == "socks5://127.0.0.1:1080"
    assert parse_via("http://[::1]:8080").address == "[::1]:8080"
    assert ViaSpec("direct", source="NO_PROXY exempts hub").describe() == "no proxy (NO_PROXY exempts hub)"
    assert ViaSpec("direct", source="NO_PROXY exempts hub").how() == "directly (NO_PROXY exempts hub)"
    assert parse_via("direct").how() == "directly (from --via)"
    assert parse_via("socks5://p:1").how() == "through the SOCKS5 proxy at p:1 (from --via)"


@pytest.mark.parametrize(
    ("value", "says"),
    [
        ("", "is empty"),
        ("socks4://proxy:1080", "socks4://, which jupyter-dev-server cannot go through"),
        ("ftp://proxy", "ftp://"),
        ("http://", "names no host"),
        ("http://proxy:99999", "not a valid proxy address"),
        ("http://proxy:3128/path", "without a path"),
        ("ssh://me:secret@login-node", "carries a password"),
    ],
)
def test_bad_values_are_one_sentence(value: str, says: str) -> None:
    with pytest.raises(usage.UsageError) as raised:
        parse_via(value, "--via")
    message = str(raised.value)
    assert says in message
    assert message.startswith("--via ") and message.endswith(".")
    assert "secret" not in message


def test_a_bad_password_bearing_variable_is_named_without_its_password() -> None:
    with pytest.raises(usage.UsageError) as raised:
        parse_via("gopher://bob:hunter2@proxy:70", "HTTPS_PROXY")
    assert "HTTPS_PROXY" in str(raised.value)
    assert "hunter2" not in str(raised.value)
    assert "bob:***@proxy:70" in str(raised.value)


@pytest.mark.parametrize(
    ("no_proxy", "host", "matches"),
    [
        ("*", "hub.example.org", True),
        ("example.org", "hub.example.org", True),
        (".example.org", "hub.example.org", True),
        (".example.org", "example.org", True),
        ("example.org", "example.org", True),
        ("ample.org", "hub.example.org", False),
        ("hub.example.org:8443", "hub.example.org", True),
        ("other.org, example.org", "HUB.Example.Org", True),
        ("other.org example.org", "hub.example.org", True),
        ("localhost,127.0.0.1", "127.0.0.1", True),
        ("10.0.0.0/8", "10.1.2.3", True),
        ("10.0.0.0/8", "11.1.2.3", False),
        ("10.0.0.0/8", "ten.example", False),
        ("192.168.1.7", "192.168.1.70", False),
        ("::1", "::1", True),
        ("[::1]:8000", "::1", True),
        ("fd00::/8", "fd12::1", True),
        ("fd00::/8", "10.0.0.1", False),
        ("", "hub.example.org", False),
        (" , ", "hub.example.org", False),
        ("hub.example.org.", "hub.example.org", True),
    ],
)
def test_no_proxy(no_proxy: str, host: str, matches: bool) -> None:
    assert no_proxy_matches(no_proxy, host) is matches


def test_environment_order_lower_case_wins_as_curl() -> None:
    env = {"HTTPS_PROXY": "http://upper:1", "https_proxy": "http://lower:2", "ALL_PROXY": "socks5://all:3"}
    assert proxy_from_environment(env, "hub") == ViaSpec("http", "lower", 2, source="https_proxy")
    env = {"HTTPS_PROXY": "http://upper:1", "ALL_PROXY": "socks5://all:3"}
    assert proxy_from_environment(env, "hub").source == "HTTPS_PROXY"
    env = {"ALL_PROXY": "socks5://all:3", "all_proxy": "socks5://lowerall:4"}
    assert proxy_from_environment(env, "hub") == ViaSpec("socks5", "lowerall", 4, source="all_proxy")
    assert proxy_from_environment({"HTTP_PROXY": "http://plain:1"}, "hub").direct


def test_no_proxy_exempts_the_hub() -> None:
    env = {"HTTPS_PROXY": "http://proxy:3128", "NO_PROXY": ".cluster.internal", "no_proxy": "hub.site"}
    assert proxy_from_environment(env, "hub.site").direct  # lower case wins
    assert proxy_from_environment(env, "hub.cluster.internal").kind == "http"
    exempt = proxy_from_environment({"HTTPS_PROXY": "http://proxy:3128", "NO_PROXY": "*"}, "hub")
    assert exempt.direct and exempt.describe() == "no proxy (NO_PROXY exempts hub)"


def test_a_via_given_wins_over_the_proxy_variables() -> None:
    env = {"HTTPS_PROXY": "http://proxy:3128"}
    assert choose_via("direct", env, "hub").spec.direct
    assert choose_via(None, env, "hub").spec.source == "HTTPS_PROXY"
    assert choose_via("  ", env, "hub").spec.source == "HTTPS_PROXY"
    # an explicit via is not subject to NO_PROXY
    assert choose_via("http://proxy:1", {"NO_PROXY": "*"}, "hub").spec.kind == "http"


def test_a_password_on_the_command_line_is_warned_about_without_being_shown() -> None:
    choice = choose_via("http://bob:hunter2@proxy:3128", {}, "hub")
    assert choice.spec.password == "hunter2"
    assert "HTTPS_PROXY" in choice.warning and "ps" in choice.warning
    assert "hunter2" not in choice.warning
    assert choose_via(None, {"HTTPS_PROXY": "http://bob:hunter2@proxy:3128"}, "hub").warning == ""
    assert choose_via("http://bob:hunter2@proxy:3128", {}, "hub", "JUPYTER_DEV_SERVER_VIA").warning == ""
    assert choose_via("http://proxy:3128", {}, "hub").warning == ""


@pytest.fixture(scope="module")
def ca_file(tmp_path_factory: pytest.TempPathFactory) -> str:
    path = tmp_path_factory.mktemp("ca") / "ca.pem"
    trustme.CA().cert_pem.write_to_path(str(path))
    return str(path)


def _options(argv: list[str], env: dict[str, str], ca_file: str) -> Options:
    options = Options(environ=env)
    options.parseOptions(["--hub", "hub.example.org:443", "--user", "a", "--ca-cert", ca_file,
                          "--listen", "tcp:0:interface=127.0.0.1", *argv])
    return options


def test_options_settle_the_via_and_the_ssh_command(ca_file: str) -> None:
    options = _options([], {"https_proxy": "http://proxy:3128"}, ca_file)
    assert options["via"] == ViaSpec("http", "proxy", 3128, source="https_proxy")
    assert options["ssh-command"] == "ssh"
    options = _options(["--via", "direct"], {"https_proxy": "http://proxy:3128",
                                             "JUPYTER_DEV_SERVER_SSH_COMMAND": "ssh -F cfg"}, ca_file)
    assert options["via"].direct and options["ssh-command"] == "ssh -F cfg"
    options = _options(["--ssh-command", "ssh -v"], {"JUPYTER_DEV_SERVER_SSH_COMMAND": "ssh -F cfg"}, ca_file)
    assert options["ssh-command"] == "ssh -v"
    env = {"JUPYTER_DEV_SERVER_VIA": "socks5://tunnel:1080", "HTTPS_PROXY": "http://proxy:3128"}
    assert _options([], env, ca_file)["via"] == ViaSpec("socks5", "tunnel", 1080, source="JUPYTER_DEV_SERVER_VIA")
    assert _options(["--via", "direct"], env, ca_file)["via"].direct
    options = _options(["--via", "http://bob:hunter2@proxy:3128"], {}, ca_file)
    assert options["via"].password == "hunter2" and "HTTPS_PROXY" in options["via-warning"]
    with pytest.raises(usage.UsageError, match="--via 'socks4://x:1' uses socks4://"):
        _options(["--via", "socks4://x:1"], {}, ca_file)
    with pytest.raises(usage.UsageError, match="HTTPS_PROXY"):
        _options([], {"HTTPS_PROXY": "ftp://x"}, ca_file)


def test_every_policy_of_one_options_shares_its_via(ca_file: str) -> None:
    options = _options(["--via", "socks5://127.0.0.1:1080"], {}, ca_file)
    reactor = MemoryReactorClock()
    first, second = options.hub_policy(reactor), options.hub_policy(reactor, spares=2)
    assert isinstance(first.via, ProxyVia)
    assert first.via is second.via


def test_make_via_maps_kinds() -> None:
    reactor = MemoryReactorClock()
    assert isinstance(make_via(reactor, parse_via("direct")), DirectVia)
    assert isinstance(make_via(reactor, parse_via("http://p:1")), ProxyVia)
    assert isinstance(make_via(reactor, parse_via("socks5://p:1")), ProxyVia)
    assert DirectVia(reactor).status() == {
        "kind": "direct", "address": "", "source": "", "state": "direct", "restarts": 0,
    }
