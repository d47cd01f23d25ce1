"""
Saved profiles: what ``jupyter-dev-server login`` was told, so that the next morning the bare
command (and ``check``, ``status``, ``login`` to renew, ``rotate-token``) needs no options.

One file, ``$XDG_CONFIG_HOME/jupyter-dev-server/config.toml`` (0600 in a 0700 folder)::

    [profiles.default]
    hub = "https://hub.example.org:8443/"
    user = "me"
    listen = "tcp:8000:interface=127.0.0.1"

    [profiles.default.server_options]
    partition = "gpu"

A profile key is the long name of one of the daemon's options, so a new option can be saved without
a change here; :data:`NEVER_SAVED` lists the few that never are (a token never is: tokens stay in
their own 0600 files). An option given on the command line beats its environment variable, which
beats the profile, which beats the default: :class:`ProfiledOptions` applies that order and
remembers where each value came from, for ``jupyter-dev-server config``.

The file is read with the standard library's ``tomllib`` (``tomli`` before Python 3.11) and written
by :func:`dump_toml`, which knows exactly what profiles hold: strings, numbers, booleans, arrays and
tables. No reactor, no sockets here.
"""

from __future__ import annotations

import json
import math
import os
import re
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from twisted.python import reflect, usage

from jds.environment import ENVIRONMENT, environment_value

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

__all__ = [
    "DEFAULT_PROFILE", "NEVER_SAVED", "ProfileError", "ProfiledOptions", "config_path", "dump_toml",
    "load_profiles", "parse_server_option", "remove_profile", "save_profile",
]

DEFAULT_PROFILE = "default"
# The table of spawn options inside a profile, and the option that fills it.
SERVER_OPTIONS_TABLE = "server_options"
SERVER_OPTIONS = "server-options"
# Options never written to or read from a profile: secrets, and the choice of profile itself.
NEVER_SAVED = frozenset({"profile", "token", "password", "local-token", "hub-token"})
_HEADER = (
    "# jupyter-dev-server profiles, written by `jupyter-dev-server login`. A key is a long option\n"
    "# of the daemon; `jupyter-dev-server config --profile NAME` shows what is in effect. No tokens here.\n"
)
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")


class ProfileError(usage.UsageError):
    """The configuration file or a profile cannot be used; the message says what to do."""


def config_path(environ: Mapping[str, str]) -> Path:
    config = environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    return Path(config) / "jupyter-dev-server" / "config.toml"


def check_profile_name(name: str) -> str:
    if not _NAME.fullmatch(name):
        raise ProfileError(
            f"--profile {name!r} is not a profile name: use letters, digits, '.', '_' and '-' (up to 64)."
        )
    return name


def load_profiles(path: Path) -> dict[str, dict[str, Any]]:
    """Every profile in ``path`` by name; none when the file does not exist."""
    try:
        with path.open("rb") as file:
            document = tomllib.load(file)
    except FileNotFoundError:
        return {}
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ProfileError(f"Cannot read {path}: {exc}. Fix or remove it, then run login again.") from None
    profiles = document.get("profiles", {})
    if not isinstance(profiles, dict) or not all(isinstance(p, dict) for p in profiles.values()):
        raise ProfileError(f"{path}: 'profiles' must hold tables ([profiles.NAME]); fix or remove the file.")
    return profiles


def save_profile(path: Path, name: str, profile: Mapping[str, Any], write_private: Callable[[Path, str], None]) -> None:
    """
    Create or replace one profile, keeping the others, with ``write_private`` (the file 0600, its
    folder 0700: :func:`jds.tokens.write_private`, passed in because ``rotate-token``, in that module,
    reads profiles).
    """
    check_profile_name(name)
    profiles = load_profiles(path)
    profiles[name] = {key: value for key, value in profile.items() if key not in NEVER_SAVED}
    write_private(path, _HEADER + dump_toml({"profiles": profiles}))


def remove_profile(path: Path, name: str, write_private: Callable[[Path, str], None]) -> None:
    """Remove one profile (the demo's, when it stops), keeping the others."""
    profiles = load_profiles(path)
    if profiles.pop(name, None) is not None:
        write_private(path, _HEADER + dump_toml({"profiles": profiles}))


def _key(key: str) -> str:
    return key if _BARE_KEY.fullmatch(key) else _string(key)


def _string(value: str) -> str:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ProfileError(f"{value!r} is not text (it holds bytes that are not UTF-8).") from None
    # JSON's string escapes are TOML's basic-string escapes (\uXXXX, \", \\, \n...), but for
    # DEL, which TOML wants escaped too
    return json.dumps(value, ensure_ascii=False).replace("\x7f", "\\u007f")


def _value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            return ("-" if value < 0 else "") + ("inf" if math.isinf(value) else "nan")
        return repr(value)
    if isinstance(value, str):
        return _string(value)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_value(item) for item in value) + "]"
    if isinstance(value, Mapping):
        return "{" + ", ".join(f"{_key(k)} = {_value(v)}" for k, v in value.items()) + "}"
    raise ProfileError(f"A profile cannot hold {value!r} ({type(value).__name__}): only strings, numbers, "
                       "true/false, lists and tables.")


def dump_toml(document: Mapping[str, Any], _path: tuple[str, ...] = ()) -> str:
    """
    TOML for ``document``: plain values first, then each table under its own header. Only what
    profiles hold; a ``None`` (TOML has no null) is refused rather than dropped.
    """
    plain = [(key, value) for key, value in document.items() if not isinstance(value, Mapping)]
    text = "".join(f"{_key(key)} = {_value(value)}\n" for key, value in plain)
    for key, table in document.items():
        if not isinstance(table, Mapping):
            continue
        path = (*_path, key)
        has_plain = not table or any(not isinstance(value, Mapping) for value in table.values())
        header = f"\n[{'.'.join(_key(part) for part in path)}]\n" if has_plain else ""
        text += header + dump_toml(table, path)
    return text if _path else text.lstrip("\n")


def parse_server_option(text: str) -> tuple[str, Any]:
    """
    ``KEY=VALUE`` sends the string ``VALUE`` as it is; ``KEY:=JSON`` sends a JSON value (a number,
    ``true``, a list, an object), as HTTPie does. Nothing is guessed: ``gpus=2`` is the string "2".
    """
    key, equals, value = text.partition("=")
    if not equals or not key.strip(" :"):
        raise usage.UsageError(f"--server-options {text!r} must be KEY=VALUE (a string) or KEY:=JSON.")
    if not key.endswith(":"):
        return key.strip(), value
    key = key[:-1].strip()
    try:
        parsed = json.loads(value)
    except ValueError:
        raise usage.UsageError(
            f"--server-options {text!r}: {value!r} is not JSON; for a string use {key}={value}."
        ) from None
    try:
        _value(parsed)
    except ProfileError:
        raise usage.UsageError(f"--server-options {text!r}: null cannot be saved or sent; leave the option out.") from None
    return key, parsed


def describe_server_options(options: Mapping[str, Any]) -> str:
    """``a=1, b:=2`` as they would be typed again."""
    return ", ".join(
        f"{key}={value}" if isinstance(value, str) else f"{key}:={json.dumps(value)}" for key, value in options.items()
    )


class ProfiledOptions(usage.Options):
    """
    Options that can come from a saved profile: ``--profile NAME`` and the order option >
    environment variable > profile > default. The variables are :mod:`jds.environment`'s (a subclass
    may leave some out: :attr:`environment`); a subclass calls :meth:`apply_profile` first in
    ``postOptions``. ``origins`` then says where each setting came from.
    """

    environment: Mapping[str, tuple[str, ...]] = ENVIRONMENT
    # login makes the profile it names; every other command needs it to exist
    creates_profile = False
    optParameters = [
        ["profile", None, None,
         f"The saved profile to use ('login --profile NAME' saves one). [default: {DEFAULT_PROFILE}, when saved]"],
    ]

    def parseOptions(self, options: list[str] | None = None) -> None:  # noqa: N802 - usage.Options
        self.given: set[str] = set()
        self._recording = True
        super().parseOptions(options)

    def __setitem__(self, key: str, value: Any) -> None:
        if getattr(self, "_recording", False):
            self.given.add(key)
        super().__setitem__(key, value)

    def parseArgs(self, *args: str) -> None:  # noqa: N802 - usage.Options
        self._recording = False  # every option is dispatched before the arguments
        super().parseArgs(*args)

    def profile_keys(self) -> list[str]:
        """The options of this command a profile may set: its parameters, and the spawn options."""
        parameters: list[list[Any]] = []
        reflect.accumulateClassList(self.__class__, "optParameters", parameters)
        spawn = {SERVER_OPTIONS} if hasattr(self, "opt_server_options") else set()
        return sorted({row[0] for row in parameters} - NEVER_SAVED | spawn)

    def add_server_option(self, text: str) -> None:
        """One ``--server-options``: the first on the command line replaces the profile's table."""
        key, value = parse_server_option(text)
        if SERVER_OPTIONS not in self.given:
            self.given.add(SERVER_OPTIONS)
            dict.__setitem__(self, SERVER_OPTIONS, {})
        self[SERVER_OPTIONS][key] = value

    def apply_profile(self, environ: Mapping[str, str]) -> dict[str, Any]:
        """
        Fill what the command line did not give from its environment variable, else from the
        profile; fails when ``--profile NAME`` names none. Returns the profile (empty if none).
        """
        path = config_path(environ)
        asked = self.get("profile")
        name = check_profile_name(asked) if asked else DEFAULT_PROFILE
        profile = dict(load_profiles(path).get(name) or {})
        if asked and not profile and not self.creates_profile:
            raise ProfileError(
                f"There is no profile {name!r} in {path}: save it with 'jupyter-dev-server login --profile "
                f"{name} --hub HOST --user NAME'."
            )
        if SERVER_OPTIONS_TABLE in profile:
            profile[SERVER_OPTIONS] = profile.pop(SERVER_OPTIONS_TABLE)
        self.profile_name = name if profile else None
        # keys no option of this command has (for `config`, of the daemon: a typo, or a newer release's)
        self.ignored_keys = sorted(set(profile) - set(self.profile_keys()))
        self.profile_path = path
        self.profile = profile
        self.origins: dict[str, str] = {}
        keys = set(self.profile_keys())
        for key in keys:
            variables = [v for v in self.environment.get(key, ()) if environ.get(v, "").strip()]
            if key in self.given:
                self.origins[key] = "option"
            elif variables:
                self.origins[key] = "env " + ", ".join(variables)
                value = environment_value(environ, key)
                if value is not None:
                    dict.__setitem__(self, key, value)
            elif key in profile and key not in NEVER_SAVED:
                value = profile[key]
                if key == SERVER_OPTIONS:
                    if not isinstance(value, dict):
                        raise ProfileError(f"{path}: [profiles.{name}.{SERVER_OPTIONS_TABLE}] must be a table.")
                    value = dict(value)
                elif not isinstance(value, str | int | float) or isinstance(value, bool):
                    raise ProfileError(f"{path}: profile {name!r} key {key!r} must be a string, not {value!r}.")
                else:
                    value = str(value)
                dict.__setitem__(self, key, value)
                self.origins[key] = f"profile {name} in {path}"
            else:
                self.origins[key] = "default"
        return profile
