"""
Saved profiles without a hub: the TOML writer read back by ``tomllib``, the order option >
environment > profile > default, ``--server-options`` as typed, and the file's permissions.
"""

from __future__ import annotations

import json
import stat
import sys
from pathlib import Path
from typing import Any

import pytest
import trustme
from hypothesis import given
from hypothesis import strategies as st
from twisted.python import usage

from jds.config_command import ConfigOptions, settings
from jds.options import NO_HUB, Options
from jds.profiles import (
    ProfileError,
    config_path,
    dump_toml,
    load_profiles,
    parse_server_option,
    save_profile,
)
from jds.tokens import default_local_token_path, write_private

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

text = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=30)
scalars = st.one_of(
    text, st.booleans(), st.integers(min_value=-(2**63), max_value=2**63 - 1),
    st.floats(allow_nan=False, allow_infinity=False),
)  # fmt: skip
values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(text.filter(bool), inner, max_size=3),
    max_leaves=8,
)
profiles = st.dictionaries(
    st.from_regex(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,10}", fullmatch=True),
    st.dictionaries(text.filter(bool), values, max_size=5),
    max_size=3,
)


@given(profiles)
def test_the_writer_round_trips_through_tomllib(document: dict[str, Any]) -> None:
    written = dump_toml({"profiles": document})
    assert tomllib.loads(written) == {"profiles": document}


def test_the_writer_on_a_profile() -> None:
    profile = {
        "hub": "https://hub.example.org:8443/j/", "user": 'o"brien\\', "listen": "tcp:8001:interface=127.0.0.1",
        "server_options": {"partition": "gpu", "gpus": 2, "exclusive": True, "modules": ["a", "b"], "del": "x\x7fy"},
    }  # fmt: skip
    written = dump_toml({"profiles": {"default": profile}})
    assert "[profiles.default]\n" in written and "[profiles.default.server_options]\n" in written
    assert tomllib.loads(written) == {"profiles": {"default": profile}}


def test_the_writer_refuses_what_toml_cannot_hold() -> None:
    with pytest.raises(ProfileError):
        dump_toml({"a": None})
    with pytest.raises(ProfileError, match="not UTF-8"):
        dump_toml({"a": "bytes\udcff"})


def test_save_keeps_other_profiles_and_is_private(tmp_path: Path) -> None:
    path = config_path({"XDG_CONFIG_HOME": str(tmp_path / "config")})
    save_profile(path, "default", {"hub": "h", "user": "u"}, write_private)
    save_profile(path, "gpu", {"hub": "h2", "user": "u", "token": "SECRET", "server_options": {"a": 1}}, write_private)
    save_profile(path, "default", {"hub": "h3", "user": "u"}, write_private)
    assert load_profiles(path) == {
        "default": {"hub": "h3", "user": "u"}, "gpu": {"hub": "h2", "user": "u", "server_options": {"a": 1}},
    }  # fmt: skip
    assert "SECRET" not in path.read_text()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700


def test_a_broken_file_is_one_sentence(tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    path.write_text("[profiles.default\nhub = 1\n")
    with pytest.raises(ProfileError, match=f"Cannot read {path}"):
        load_profiles(path)
    with pytest.raises(ProfileError, match="--profile"):
        save_profile(path, "no/slash", {}, write_private)


@pytest.mark.parametrize(
    ("typed", "expected"),
    [
        ("partition=gpu", ("partition", "gpu")),
        ("gpus=2", ("gpus", "2")),  # a string stays a string: nothing is guessed
        ("flag=true", ("flag", "true")),
        ("empty=", ("empty", "")),
        ("expr=a=b", ("expr", "a=b")),
        ("gpus:=2", ("gpus", 2)),
        ("exclusive:=true", ("exclusive", True)),
        ("modules:=[\"a\", 1]", ("modules", ["a", 1])),
        ("profile:={\"slug\": \"small\"}", ("profile", {"slug": "small"})),
        ("quoted:=\"2\"", ("quoted", "2")),
    ],
)
def test_server_options_as_typed(typed: str, expected: tuple[str, Any]) -> None:
    assert parse_server_option(typed) == expected


@pytest.mark.parametrize("typed", ["novalue", "=x", "gpus:=two", "none:=null"])
def test_server_options_mistakes(typed: str) -> None:
    with pytest.raises(usage.UsageError, match="--server-options"):
        parse_server_option(typed)


@pytest.fixture
def ca_file(tmp_path: Path) -> str:
    path = tmp_path / "ca.pem"
    trustme.CA().cert_pem.write_to_path(str(path))
    return str(path)


def _environ(tmp_path: Path, **extra: str) -> dict[str, str]:
    return {"XDG_CONFIG_HOME": str(tmp_path / "config"), "XDG_STATE_HOME": str(tmp_path / "state"), **extra}


def _save(tmp_path: Path, name: str, profile: dict[str, Any]) -> Path:
    path = config_path(_environ(tmp_path))
    save_profile(path, name, profile, write_private)
    return path


def parse(argv: list[str], environ: dict[str, str], kind: type = Options) -> Any:
    options = kind(environ=environ)
    options.parseOptions(argv)
    return options


def test_the_profile_fills_what_nothing_else_gives(tmp_path: Path, ca_file: str) -> None:
    _save(tmp_path, "default", {
        "hub": "https://hub.example.org:8443/", "user": "me", "ca-cert": ca_file, "tls-name": "jupyterhub",
        "listen": "tcp:8123:interface=127.0.0.1", "root": "work/proj", "spawn-timeout": 60,
        "server_options": {"partition": "gpu", "gpus": 2},
    })  # fmt: skip
    options = parse([], _environ(tmp_path))
    target = options["target"]
    assert (target.host, target.port, target.user, target.verify_name, target.root) == (
        "hub.example.org", 8443, "me", "jupyterhub", "work/proj")
    assert options["listen"] == "tcp:8123:interface=127.0.0.1"
    assert options["spawn-timeout"] == 60
    assert options["server-options"] == {"partition": "gpu", "gpus": 2}
    assert options.origins["hub"].startswith("profile default in ")
    assert options.origins["connect-timeout"] == "default"


def test_option_beats_environment_beats_profile(tmp_path: Path) -> None:
    _save(tmp_path, "default", {"hub": "profile-hub", "user": "profile-user", "root": "p",
                                "server_options": {"a": "1", "b": "2"}})  # fmt: skip
    environ = _environ(tmp_path, JUPYTER_USERNAME="env-user", JUPYTER_DEV_SERVER_ROOT="e")
    options = parse(["--root", "o", "--server-options", "c=3"], environ)
    target = options["target"]
    assert (target.host, target.user, target.root) == ("profile-hub", "env-user", "o")
    assert options["server-options"] == {"c": "3"}  # the command line's replace the profile's
    assert options.origins["hub"].startswith("profile default")
    assert options.origins["user"] == "env JUPYTER_USERNAME"
    assert options.origins["root"] == "option"
    assert options.origins["server-options"] == "option"


def test_an_environment_token_beats_the_profile_token_file(tmp_path: Path) -> None:
    token_file = tmp_path / "hub-token"
    write_private(token_file, "FILE-TOKEN\n")
    _save(tmp_path, "default", {"hub": "h", "user": "u", "token-file": str(token_file)})
    assert parse([], _environ(tmp_path))["hub-token"] == "FILE-TOKEN"
    assert parse([], _environ(tmp_path, JUPYTERHUB_API_TOKEN="ENV-TOKEN"))["hub-token"] == "ENV-TOKEN"


def test_named_profiles_and_their_own_local_token(tmp_path: Path) -> None:
    _save(tmp_path, "default", {"hub": "a", "user": "u"})
    _save(tmp_path, "gpu", {"hub": "b", "user": "u", "server": "gpu"})
    assert parse([], _environ(tmp_path))["target"].host == "a"
    gpu = parse(["--profile", "gpu"], _environ(tmp_path))
    assert (gpu["target"].host, gpu["target"].server) == ("b", "gpu")
    assert gpu.local_token_default() == default_local_token_path(_environ(tmp_path), "gpu")
    assert gpu.local_token_default().name == "local-token-gpu"
    assert parse([], _environ(tmp_path)).local_token_default().name == "local-token"


def test_no_profile_and_no_hub_is_the_one_sentence(tmp_path: Path) -> None:
    with pytest.raises(usage.UsageError) as caught:
        parse([], _environ(tmp_path))
    assert str(caught.value) == NO_HUB
    assert "login" in NO_HUB and "--hub" in NO_HUB
    with pytest.raises(usage.UsageError, match="There is no profile 'nope' in .*login --profile nope"):
        parse(["--profile", "nope"], _environ(tmp_path))


def test_config_says_where_each_setting_came_from(tmp_path: Path) -> None:
    path = _save(tmp_path, "default", {"hub": "h", "user": "u", "server_options": {"gpus": 2}, "hubb": "typo"})
    environ = _environ(tmp_path, JUPYTERHUB_API_TOKEN="SECRET-TOKEN", JUPYTER_PROXY_PORT="9001")
    found = settings(parse(["--user", "v"], environ, ConfigOptions))
    assert found["hub"] == {"value": "h", "origin": f"profile default in {path}"}
    assert found["user"] == {"value": "v", "origin": "option"}
    assert found["listen"] == {"value": "tcp:9001:interface=127.0.0.1", "origin": "env JUPYTER_PROXY_PORT"}
    assert found["server-options"] == {"value": {"gpus": 2}, "origin": f"profile default in {path}"}
    assert found["spawn-timeout"] == {"value": "600", "origin": "default"}
    assert found["token-file"]["origin"] == "env JUPYTERHUB_API_TOKEN"
    assert "SECRET-TOKEN" not in json.dumps(found)
    assert parse([], environ, ConfigOptions).ignored_keys == ["hubb"]


def test_rotate_token_uses_the_profiles_local_token(tmp_path: Path) -> None:
    import subprocess

    from hub import clean_environ, venv_script

    _save(tmp_path, "gpu", {"hub": "h", "user": "u"})
    kept = tmp_path / "kept-local-token"
    _save(tmp_path, "demo", {"hub": "h", "user": "u", "local-token-file": str(kept)})
    env = clean_environ(_environ(tmp_path))
    for argv, written in ((["--profile", "gpu"], tmp_path / "state" / "jupyter-dev-server" / "local-token-gpu"),
                          (["--profile", "demo"], kept),
                          ([], tmp_path / "state" / "jupyter-dev-server" / "local-token")):  # fmt: skip
        done = subprocess.run([venv_script("jupyter-dev-server"), "rotate-token", *argv], capture_output=True,
                              text=True, timeout=60, env=env)  # fmt: skip
        assert done.returncode == 0, done.stderr
        assert written.exists() and stat.S_IMODE(written.stat().st_mode) == 0o600
    missing = subprocess.run([venv_script("jupyter-dev-server"), "rotate-token", "--profile", "nope"],
                             capture_output=True, text=True, timeout=60, env=env)  # fmt: skip
    assert missing.returncode == 2 and "There is no profile 'nope'" in missing.stderr
