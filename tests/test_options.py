"""Option parsing: command line over environment over default, and one clear sentence per mistake."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import pytest
import trustme
from twisted.python import usage

from jds.environment import VARIABLES, env_note
from jds.options import Options, parse_hub


@pytest.fixture(scope="module")
def ca_file(tmp_path_factory: pytest.TempPathFactory) -> str:
    path = tmp_path_factory.mktemp("ca") / "ca.pem"
    trustme.CA().cert_pem.write_to_path(str(path))
    return str(path)


def parse(argv: list[str], env: dict[str, str] | None = None) -> Options:
    # no saved profile of whoever runs the tests fills in what a test leaves out
    options = Options(environ={"XDG_CONFIG_HOME": "/nonexistent/jds-tests", **(env or {})})
    options.parseOptions(argv)
    return options


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("1.2.3.4", ("1.2.3.4", 8000, "/")),
        ("hub.example.org:443", ("hub.example.org", 443, "/")),
        ("https://hub.example.org", ("hub.example.org", 8000, "/")),
        ("https://hub.example.org:8443/jupyter/", ("hub.example.org", 8443, "/jupyter/")),
        ("[::1]:8443", ("::1", 8443, "/")),
    ],
)
def test_parse_hub(value: str, expected: tuple[str, int, str]) -> None:
    assert parse_hub(value, 8000) == expected


@pytest.mark.parametrize("value", ["http://hub.example.org", "ws://hub", "https://", "hub:99999", "https://h/?x=1"])
def test_parse_hub_refuses(value: str) -> None:
    with pytest.raises(usage.UsageError):
        parse_hub(value, 8000)


def test_command_line(ca_file: str) -> None:
    options = parse(["--hub", "https://hub.example.org:8443/j/", "--user", "a@b", "--server", "gpu",
                     "--tls-name", "jupyterhub", "--ca-cert", ca_file, "--listen", "tcp:0:interface=127.0.0.1"])
    target = options["target"]
    assert (target.host, target.port, target.base, target.user, target.server) == (
        "hub.example.org", 8443, "/j/", "a@b", "gpu")
    assert target.verify_name == "jupyterhub"
    assert options["listen"] == "tcp:0:interface=127.0.0.1"
    assert options["ca-cert"] == ca_file


def test_environment_of_the_original_tool(ca_file: str) -> None:
    env = {
        "JUPYTER_SERVER_IP_OR_NAME": "1.2.3.4",
        "JUPYTER_SERVER_PORT": "8443",
        "JUPYTER_SERVER_NAME": "jupyterhub",
        "JUPYTER_USERNAME": "myname",
        "JUPYTER_CLUSTER_CA_CERT": ca_file,
        "JUPYTER_PROXY_IP_OR_NAME": "127.0.0.2",
        "JUPYTER_PROXY_PORT": "9000",
    }
    options = parse([], env)
    target = options["target"]
    assert (target.host, target.port, target.user, target.verify_name) == ("1.2.3.4", 8443, "myname", "jupyterhub")
    assert options["listen"] == "tcp:9000:interface=127.0.0.2"
    # the command line wins
    options = parse(["--user", "other", "--hub", "h:1", "--listen", "unix:/tmp/jds.sock"], env)
    assert (options["target"].user, options["target"].host, options["target"].port) == ("other", "h", 1)
    assert options["listen"] == "unix:/tmp/jds.sock"


def test_root_folder() -> None:
    assert parse(["--hub", "h", "--user", "u", "--root", "/work/proj/"])["target"].root == "work/proj"
    from_env = parse(["--hub", "h", "--user", "u"], {"JUPYTER_DEV_SERVER_ROOT": "work"})
    assert from_env["target"].root == "work"
    wins = parse(["--hub", "h", "--user", "u", "--root", "other"], {"JUPYTER_DEV_SERVER_ROOT": "work"})
    assert wins["target"].root == "other"


def test_defaults() -> None:
    options = parse(["--hub", "hub", "--user", "u"])
    assert options["target"].root == ""
    assert options["listen"] == "tcp:8000:interface=127.0.0.1"
    assert options["target"].verify_name == "hub"
    assert options["target"].port == 8000
    assert options["ca-cert"] is None
    assert options["reconnect-window"] == 900.0
    assert options["reconnect-buffer"] == 64 << 20


def test_reconnect_options() -> None:
    options = parse(["--hub", "hub", "--user", "u", "--reconnect-window", "0", "--reconnect-buffer", "0.5"])
    assert options["reconnect-window"] == 0.0
    assert options["reconnect-buffer"] == 512 << 10


@pytest.mark.parametrize(
    ("argv", "env", "words"),
    [
        (["--hub", "h"], {}, "--user"),
        (["--user", "u"], {}, "--hub"),
        (["--hub", "http://h", "--user", "u"], {}, "https"),
        (["--hub", "h", "--user", "u", "--ca-cert", "/nonexistent/ca.pem"], {}, "Cannot read"),
        (["--hub", "h", "--user", "u", "--listen", "bogus:1"], {}, "--listen"),
        (["--hub", "h", "--user", "u", "--connect-timeout", "x"], {}, "--connect-timeout"),
        (["--hub", "h", "--user", "u", "--connect-timeout", "0"], {}, "number of seconds above 0"),
        (["--hub", "h", "--user", "u", "--reconnect-window", "-1"], {}, "--reconnect-window must be a number of seconds 0 or more"),
        (["--hub", "h", "--user", "u", "--reconnect-window", "nan"], {}, "--reconnect-window"),
        (["--hub", "h", "--user", "u", "--reconnect-buffer", "0"], {}, "--reconnect-buffer must be a number of MiB above 0"),
        (["--hub", "h", "--user", "u"], {"JUPYTER_PROXY_PORT": "eighty"}, "JUPYTER_PROXY_PORT"),
        (["--hub", "h", "--user", "u"], {"JUPYTER_SERVER_PORT": "0"}, "JUPYTER_SERVER_PORT"),
        (["--hub", "h", "--user", "u", "--root", "../elsewhere"], {}, "--root"),
        (["--hub", "h", "--user", "u"], {"JUPYTER_DEV_SERVER_ROOT": "a/../../b"}, "--root"),
    ],
)
def test_mistakes_are_named(argv: list[str], env: dict[str, str], words: str) -> None:
    with pytest.raises(usage.UsageError) as error:
        parse(argv, env)
    assert words in str(error.value)


def test_ca_file_that_is_not_pem(tmp_path: Path) -> None:
    bad = tmp_path / "ca.pem"
    bad.write_text("not a certificate\n")
    with pytest.raises(usage.UsageError, match="no PEM certificate"):
        parse(["--hub", "h", "--user", "u", "--ca-cert", str(bad)])
    broken = tmp_path / "broken.pem"
    broken.write_text("-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n")
    with pytest.raises(usage.UsageError, match="invalid certificate"):
        parse(["--hub", "h", "--user", "u", "--ca-cert", str(broken)])


def test_ca_bundle(tmp_path: Path) -> None:
    bundle = tmp_path / "bundle.pem"
    bundle.write_bytes(trustme.CA().cert_pem.bytes() + trustme.CA().cert_pem.bytes())
    assert parse(["--hub", "h", "--user", "u", "--ca-cert", str(bundle)])["ca-cert"] == str(bundle)


def test_other_machines_need_managed_mode(tmp_path: Path) -> None:
    for listen in ("tcp:8000", "tcp:8000:interface=0.0.0.0", "tcp:8000:interface=192.0.2.7"):
        with pytest.raises(usage.UsageError, match="managed mode"):
            parse(["--hub", "h", "--user", "u", "--listen", listen])
    token = tmp_path / "token"
    token.write_text("abc\n")
    token.chmod(0o600)
    env = {"XDG_STATE_HOME": str(tmp_path / "state")}
    options = parse(["--hub", "h", "--user", "u", "--listen", "tcp:8000", "--token-file", str(token)], env)
    assert options["interface"] == "0.0.0.0" and options["hub-token"] == "abc"


def test_token_files(tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text("abc\n")
    token.chmod(0o644)
    with pytest.raises(usage.UsageError, match="chmod 600"):
        parse(["--hub", "h", "--user", "u", "--token-file", str(token)])
    token.chmod(0o600)
    env = {"XDG_STATE_HOME": str(tmp_path / "state")}
    first = parse(["--hub", "h", "--user", "u", "--token-file", str(token)], env)
    again = parse(["--hub", "h", "--user", "u"], {**env, "JUPYTERHUB_API_TOKEN": "abc"})
    assert first["local-token"] == again["local-token"] != "abc"
    stored = tmp_path / "state" / "jupyter-dev-server" / "local-token"
    assert stored.stat().st_mode & 0o777 == 0o600
    assert parse(["--hub", "h", "--user", "u"], env)["local-token"] is None


def _readme_variables() -> set[str]:
    """The variables README's Options table documents: its environment column."""
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text(encoding="utf-8")
    section = readme.split("\n## Options\n", 1)[1].split("\n## ", 1)[0]
    found: set[str] = set()
    for row in (line for line in section.splitlines() if line.startswith("| `--")):
        environment = row.split(" | ")[1]
        found.update(re.findall(r"`([A-Z][A-Z0-9_]+)`", environment))
    return found


# what each variable does when set on its own, over a saved profile that says otherwise
_EFFECTS: dict[str, tuple[str, Callable[[Options], object], object]] = {
    "JUPYTER_SERVER_IP_OR_NAME": ("env-hub", lambda o: o["target"].host, "env-hub"),
    "JUPYTER_SERVER_PORT": ("8443", lambda o: o["target"].port, 8443),
    "JUPYTER_USERNAME": ("env-user", lambda o: o["target"].user, "env-user"),
    "JUPYTER_SERVER_NAME": ("env-name", lambda o: o["target"].verify_name, "env-name"),
    "JUPYTER_CLUSTER_CA_CERT": ("{ca}", lambda o: o["ca-cert"], "{ca}"),
    "JUPYTER_PROXY_IP_OR_NAME": ("127.0.0.3", lambda o: o["listen"], "tcp:8000:interface=127.0.0.3"),
    "JUPYTER_PROXY_PORT": ("9001", lambda o: o["listen"], "tcp:9001:interface=127.0.0.1"),
    "JUPYTERHUB_API_TOKEN": ("ENV-TOKEN", lambda o: o["hub-token"], "ENV-TOKEN"),
    "JUPYTER_DEV_SERVER_ROOT": ("env/root", lambda o: o["target"].root, "env/root"),
    "JUPYTER_DEV_SERVER_VIA": ("socks5://127.0.0.1:1081", lambda o: (o["via"].kind, o["via"].port), ("socks5", 1081)),
    "JUPYTER_DEV_SERVER_SSH_COMMAND": ("ssh -v", lambda o: o["ssh-command"], "ssh -v"),
}


def test_every_documented_variable_is_in_the_one_table() -> None:
    documented = _readme_variables()
    assert "JUPYTER_SERVER_IP_OR_NAME" in documented and "JUPYTER_DEV_SERVER_SSH_COMMAND" in documented
    assert documented == {row.name for row in VARIABLES}
    assert set(_EFFECTS) == documented
    for row in VARIABLES:  # and --help names each with its option
        assert row.name in env_note(row.option)


@pytest.mark.parametrize("name", sorted(_EFFECTS))
def test_every_variable_takes_effect_over_the_profile(name: str, tmp_path: Path, ca_file: str) -> None:
    from jds.profiles import config_path, save_profile
    from jds.tokens import write_private

    other_ca = tmp_path / "profile-ca.pem"
    trustme.CA().cert_pem.write_to_path(str(other_ca))
    token_file = tmp_path / "hub-token"
    write_private(token_file, "FILE-TOKEN\n")
    environ = {"XDG_CONFIG_HOME": str(tmp_path / "config"), "XDG_STATE_HOME": str(tmp_path / "state")}
    save_profile(config_path(environ), "default", {
        "hub": "profile-hub", "user": "profile-user", "tls-name": "profile-name", "ca-cert": str(other_ca),
        "listen": "tcp:8123:interface=127.0.0.1", "token-file": str(token_file), "root": "profile/root",
        "via": "direct", "ssh-command": "ssh -q",
    }, write_private)  # fmt: skip
    value, effect, expected = _EFFECTS[name]
    value, expected = (v.replace("{ca}", ca_file) if isinstance(v, str) else v for v in (value, expected))
    before = Options(environ=dict(environ))
    before.parseOptions([])
    assert effect(before) != expected
    options = Options(environ={**environ, name: value})
    options.parseOptions([])
    assert effect(options) == expected
    row = next(row for row in VARIABLES if row.name == name)
    if row.sets:
        assert options.origins[row.option] == f"env {name}"
