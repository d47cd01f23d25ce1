"""
``jupyter-dev-server status``: ask a running daemon for its status page (:mod:`jds.status`) and print
it for a person. A command of its own, so that the daemon does not carry its client.
"""

from __future__ import annotations

import json
import os
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from twisted.python import usage

from jds.commands import parse_subcommand
from jds.environment import env_note
from jds.paths import authority, listen_address
from jds.profiles import ProfiledOptions, describe_server_options
from jds.status import STATUS_PATH
from jds.tokens import default_local_token_path

__all__ = ["StatusOptions", "describe", "endpoint_url", "fetch", "main"]

def _size(count: int) -> str:
    value = float(count)
    for unit in ("B", "kB", "MB", "GB"):
        if value < 1000 or unit == "GB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1000
    return f"{count} B"  # pragma: no cover - the loop always returns


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, seconds = divmod(rest, 60)
    if days:
        return f"{days} d {hours} h"
    if hours:
        return f"{hours} h {minutes:02d} min"
    return f"{minutes} min {seconds:02d} s" if minutes else f"{seconds} s"


def _plural(count: int, word: str) -> str:
    return f"{count} {word}{'' if count == 1 else 's'}"


def _root_line(root: str) -> str:
    if not root:
        return "the server's root (no --root)"
    return f"{root}/ (--root: the IDE sees this folder as the server's root)"


def _profile_lines(report: dict[str, Any]) -> list[str]:
    """The profile and the spawn options (a daemon before they were reported says nothing of them)."""
    if "profile" not in report:
        return []
    profile = report["profile"] or "none (its options came from the command line and the environment)"
    options = report.get("server_options") or {}
    spawn = (
        f"--server-options {describe_server_options(options)}" if options
        else "no --server-options (the hub reuses the last start's)"
    )
    return [f"  profile:    {profile}", f"  starts:     with {spawn}"]


def describe(report: dict[str, Any], url: str) -> str:
    """The status document as a few lines for a person."""
    server = f"server {report['server']!r}" if report.get("server") else "default server"
    lines = [
        f"jupyter-dev-server {report['version']} ({report['mode']} mode) at {url}, "
        f"up {_duration(report['uptime_seconds'])} (since {report['started']})",
        f"  hub:        {report['hub']}",
        f"  server:     {report['server_url']} ({report['user']}'s {server}) is {report['server_state']}",
        f"  root:       {_root_line(report.get('root', ''))}",
        *_profile_lines(report),
        f"  relayed:    {_plural(report['requests'], 'request')}, {_size(report['bytes_in'])} from the IDE, "
        f"{_size(report['bytes_out'])} to the IDE, {_plural(report['websockets'], 'WebSocket')}"
        + (f"; {report['retried_requests']} retried after a lost hub link" if report.get("retried_requests") else ""),
        f"  open now:   {_plural(report['open_http'], 'HTTP request')}, "
        f"{_plural(report['open_websockets'], 'WebSocket')}",
    ]
    via = report.get("via")
    if via and via.get("kind") != "direct":
        lines.append(f"  via:        {_via_line(via)}")
    link = report.get("hub_link")
    if link:
        outage = link.get("outage")
        now = (
            f"down since {outage['since']} ({_duration(outage['seconds'])}), "
            f"{_plural(outage['websockets_holding'], 'WebSocket')} holding"
            + (f", requests failing: {outage['requests_failing']}" if outage.get("requests_failing") else "")
            if outage else "up"
        )
        lines.append(
            f"  hub link:   {now}; {_plural(link['reconnected'], 'WebSocket')} reconnected, "
            f"{link['gave_up']} given up"
        )
    error = report.get("last_error")
    if error:
        lines.append(
            f"  last error: {error['time']} {error['status']} {error['reason']}: {error['message']}"
        )
    else:
        lines.append("  last error: none")
    expires = report.get("hub_token_expires")
    if expires:
        said = {"never": "never expires", "unknown": "expiry unknown (the hub would not say)"}
        lines.append(f"  hub token:  {said.get(expires, f'expires {expires}')}")
    if report.get("hub_token_warning"):
        lines.append(f"  warning:    {report['hub_token_warning']}")
    if report["server_state"] == "unknown" and report["mode"] == "pass-through":
        lines.append("  (the server's state is only known in managed mode, with --token-file)")
    return "\n".join(lines)


def _via_line(via: dict[str, Any]) -> str:
    """``http://proxy:3128 (from HTTPS_PROXY): up since ..., 12 tunnels`` (a via's status has no credentials)."""
    source = f" (from {via['source']})" if via.get("source") and " " not in via["source"] else ""
    state = via.get("state", "unknown")
    if via.get("since"):
        state += f" since {via['since']}"
    parts = [state]
    if via.get("pid"):
        parts.append(f"pid {via['pid']}")
    if via.get("restarts"):
        parts.append(_plural(via["restarts"], "restart"))
    if "tunnels" in via:
        parts.append(_plural(via["tunnels"], "tunnel"))
    line = f"{via.get('address', '')}{source}: {', '.join(parts)}"
    if via.get("last_error"):
        line += f"; last error: {via['last_error']}"
    return line


def endpoint_url(listen: str) -> str:
    """``http://HOST:PORT`` for a ``tcp:`` / ``tcp6:`` endpoint description as given to --listen."""
    kind, port, interface = listen_address(listen)
    if kind not in ("tcp", "tcp6"):
        raise usage.UsageError(
            f"--listen {listen!r} is not a TCP endpoint; give the daemon's address with --url."
        )
    if interface in (None, "", "0.0.0.0", "::"):
        interface = "127.0.0.1"
    return f"http://{authority(interface)}:{port or 8000}"


class StatusOptions(ProfiledOptions):
    synopsis = (
        "Usage: jupyter-dev-server status [--profile NAME] [--url URL | --listen ENDPOINT] [--token TOKEN] [--json]"
    )
    longdesc = (
        "Ask a running jupyter-dev-server what it serves, whether your server is running, and how "
        "much it has relayed. It reads the local token from the same file the daemon keeps it in. "
        "With no options it asks the daemon of the default profile (--profile NAME: another's)."
    )
    optParameters = [
        ["url", None, None, "The daemon's address. [default: from --listen, else http://127.0.0.1:8000]"],
        ["listen", None, None,
         f"The --listen endpoint the daemon was started with. [{env_note('listen')}]"],
        ["token", None, None, "The daemon's local token (managed mode). [default: read from --local-token-file]"],
        ["local-token-file", None, None,
         "Where the daemon keeps its local token. [default: $XDG_STATE_HOME/jupyter-dev-server/local-token]"],
    ]
    optFlags = [["json", None, "Print the status document as it came (JSON)."]]

    def __init__(self, environ: dict[str, str] | None = None) -> None:
        super().__init__()
        self.environ = os.environ if environ is None else environ

    def postOptions(self) -> None:
        self.apply_profile(self.environ)
        url = self["url"] or (endpoint_url(self["listen"]) if self["listen"] else "http://127.0.0.1:8000")
        self["url"] = url.rstrip("/")
        self["token-source"] = "--token"
        if self["token"] is None:
            default = default_local_token_path(self.environ, self.profile_name)
            path = Path(self["local-token-file"] or default).expanduser()
            try:
                self["token"] = path.read_text(encoding="utf-8").strip() or None
            except OSError:
                self["token"] = None
            self["token-source"] = str(path)


def fetch(url: str, token: str | None, timeout: float = 15.0) -> tuple[int, bytes]:
    """``(HTTP status, body)`` of ``GET url/_jds/status``; raises OSError when nothing answers."""
    request = urllib.request.Request(url + STATUS_PATH, headers={"Accept": "application/json"})
    if token:
        request.add_header("Authorization", f"token {token}")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:  # noqa: S310 - our own URL
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def main(argv: list[str]) -> int:
    options = StatusOptions()
    failed = parse_subcommand(options, argv, "status")
    if failed is not None:
        return failed
    url = options["url"]
    try:
        code, body = fetch(url, options["token"])
    except (OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        print(
            f"jupyter-dev-server status: nothing answers at {url} ({reason}). Is jupyter-dev-server "
            "running? Give its address with --url or --listen.",
            file=sys.stderr,
        )
        return 1
    try:
        report = json.loads(body)
    except ValueError:
        report = None
    if code == 403 and isinstance(report, dict) and report.get("reason") == "no-token":
        source = options["token-source"]
        if not options["token"]:
            hint = f"there is none in {source}"
        elif source == "--token":
            hint = "it refused the one given with --token"
        else:
            hint = f"it refused the one in {source}"
        print(
            f"jupyter-dev-server status: {url} needs its local token ({hint}). Pass --token, or "
            "--local-token-file with the file the daemon was started with.",
            file=sys.stderr,
        )
        return 1
    if code != 200 or not isinstance(report, dict) or "version" not in report:
        print(
            f"jupyter-dev-server status: {url}{STATUS_PATH} answered HTTP {code}, not a status "
            "document: is that a jupyter-dev-server (0.1.0 or later)?",
            file=sys.stderr,
        )
        return 1
    print(json.dumps(report, indent=2) if options["json"] else describe(report, url))
    return 0
