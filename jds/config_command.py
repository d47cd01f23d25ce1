"""
``jupyter-dev-server config``: the settings the daemon would run with and where each came from (an
option, an environment variable, a saved profile, the default), as ``git config --show-origin``
shows them. It only reads: no file is checked, no hub reached. A token is never printed.
"""

from __future__ import annotations

import json
import sys
from typing import Any

from jds.commands import parse_subcommand
from jds.options import DEFAULT_LISTEN, Options
from jds.profiles import SERVER_OPTIONS, describe_server_options

__all__ = ["ConfigOptions", "main", "settings"]


class ConfigOptions(Options):
    synopsis = "Usage: jupyter-dev-server config [--profile NAME] [daemon options] [--json]"
    longdesc = (
        "Print the settings jupyter-dev-server would run with (with the same options and environment) "
        "and where each comes from: 'option' (the command line), 'env VAR' (an environment variable), "
        "'profile NAME in FILE' (a saved profile) or 'default'. In that order the first one wins. "
        "Tokens are never printed."
    )
    optFlags = [*Options.optFlags, ["json", None, "Print the settings as JSON, for scripts."]]

    def postOptions(self) -> None:
        # Only the layers: the daemon checks and opens everything when it starts.
        self.apply_profile(self.environ)


def _shown(options: ConfigOptions, key: str) -> Any:
    origin = options.origins[key]
    if origin.startswith("env "):
        if key == "token-file":
            return f"(none: the token itself is in {origin[4:]}, not shown)"
    value = options.get(key)
    if key == SERVER_OPTIONS:
        return dict(value or {})
    if key == "local-token-file" and not value:
        return str(options.local_token_default())
    if key == "listen" and not value:
        return DEFAULT_LISTEN
    return value


def settings(options: ConfigOptions) -> dict[str, dict[str, Any]]:
    """``{option: {"value", "origin"}}`` for every option a profile may hold."""
    return {key: {"value": _shown(options, key), "origin": options.origins[key]} for key in options.profile_keys()}


def main(argv: list[str]) -> int:
    options = ConfigOptions()
    failed = parse_subcommand(options, argv, "config")
    if failed is not None:
        return failed
    found = settings(options)
    name = options["profile"] or "default"
    if options["json"]:
        document = {
            "profile": options.profile_name, "file": str(options.profile_path), "settings": found,
            "ignored": options.ignored_keys,
        }
        print(json.dumps(document, indent=2))
        return 0
    if options.profile_name:
        print(f"Profile {name!r} in {options.profile_path}:")
    else:
        print(f"No profile {name!r} in {options.profile_path} ('jupyter-dev-server login' saves one):")
    width = max(len(key) for key in found)
    for key, setting in found.items():
        value = setting["value"]
        if key == SERVER_OPTIONS:
            value = describe_server_options(value)
        shown = "" if value is None else str(value)
        print(f"  {key:<{width}}  {shown or '-'}    ({setting['origin']})")
    for key in options.ignored_keys:
        print(f"  {key:<{width}}  ignored: not an option of this jupyter-dev-server    (profile {name} in "
              f"{options.profile_path})")
    if not options["hub"] and "env " not in options.origins["hub"]:
        print("No hub: run 'jupyter-dev-server login --hub HOST[:PORT] --user NAME', or give --hub.", file=sys.stderr)
        return 2
    return 0
