"""
The two tokens of managed mode: the user's hub API token (read, never shown) and the proxy's own
local token (made once, kept in a 0600 file so the URL saved in the IDE stays valid across restarts).
"""

from __future__ import annotations

import os
import secrets
import stat
import sys
from collections.abc import Mapping
from pathlib import Path

__all__ = [
    "TokenFileError", "default_hub_token_path", "default_local_token_path", "load_local_token",
    "read_hub_token", "rotate_local_token", "rotate_main", "url_file_path", "write_private",
]


class TokenFileError(ValueError):
    """A token file that cannot be used; the message says how to fix it."""


def _per_profile(name: str, profile: str | None) -> str:
    """One file per saved profile, so daemons side by side keep their own; the default keeps the plain name."""
    return name if profile in (None, "default") else f"{name}-{profile}"


def default_local_token_path(environ: Mapping[str, str], profile: str | None = None) -> Path:
    state = environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    return Path(state) / "jupyter-dev-server" / _per_profile("local-token", profile)


def default_hub_token_path(environ: Mapping[str, str], profile: str | None = None) -> Path:
    """Where ``jupyter-dev-server login`` keeps the hub token: configuration the user made, not state."""
    config = environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    return Path(config) / "jupyter-dev-server" / _per_profile("hub-token", profile)


def write_private(path: Path, text: str) -> None:
    """
    Replace ``path`` by a file only its owner can read (0600, parent 0700), atomically: a reader
    sees the old content or the new, and a running daemon sees a new file (inode) when it changes.
    """
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    partial = path.with_name(f".{path.name}.{secrets.token_hex(4)}")
    fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        os.replace(partial, path)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise


def _private(path: Path, what: str) -> None:
    """A credential readable by others on a shared login node is a leaked credential."""
    mode = path.stat().st_mode
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise TokenFileError(
            f"{what} {path} is readable by other users (mode {stat.S_IMODE(mode):o}); "
            f"run 'chmod 600 {path}' and start again."
        )


def read_hub_token(path: str | os.PathLike[str]) -> str:
    token_path = Path(path).expanduser()
    try:
        _private(token_path, "The token file")
        token = token_path.read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise TokenFileError(
            f"Cannot read the token file {token_path} given with --token-file: {exc.strerror}."
        ) from None
    if not token or any(c.isspace() for c in token):
        raise TokenFileError(
            f"The token file {token_path} must hold exactly one JupyterHub API token "
            "(create one on the hub's Token page, /hub/token)."
        )
    return token


def load_local_token(path: str | os.PathLike[str]) -> str:
    """Reuse the local token at ``path``, or create it there (0600, parent 0700) on first use."""
    token_path = Path(path).expanduser()
    if token_path.exists():
        _private(token_path, "The local token file")
        token = token_path.read_text(encoding="utf-8").strip()
        if token:
            return token
    token = secrets.token_hex(24)
    write_private(token_path, token + "\n")
    return token


def url_file_path(token_path: str | os.PathLike[str]) -> Path:
    """Where the daemon writes its URL with the local token (0600), next to the token itself."""
    path = Path(token_path).expanduser()
    return path.with_name(path.name + ".url")


def rotate_local_token(path: str | os.PathLike[str]) -> str:
    """
    A new local token at ``path``: a running daemon notices the new file on its next request and
    from then on refuses the old token and ends every cookie session. The URL file is updated too.
    """
    token_path = Path(path).expanduser()
    old = token_path.read_text(encoding="utf-8").strip() if token_path.exists() else ""
    token = secrets.token_hex(24)
    write_private(token_path, token + "\n")
    url_path = url_file_path(token_path)
    if old and url_path.exists():
        write_private(url_path, url_path.read_text(encoding="utf-8").replace(old, token))
    return token


def rotate_main(argv: list[str]) -> int:
    """``jupyter-dev-server rotate-token``: a new local token; the old one and every login end."""
    from jds.profiles import ProfiledOptions  # lazy load: only for this command

    class RotateOptions(ProfiledOptions):
        synopsis = "[--profile NAME] [--local-token-file PATH]"
        longdesc = (
            "Replace managed mode's local token by a new one. A running jupyter-dev-server takes it at "
            "its next request: the old token stops working and every browser or IDE login (the "
            "jds-auth cookie) ends. Paste the new URL (in the .url file next to the token) into your IDE. "
            "With no options it is the default profile's daemon (--profile NAME: another's)."
        )

        def postOptions(self) -> None:  # noqa: N802 - usage.Options
            self.apply_profile(os.environ)
        optParameters = [
            ["local-token-file", None, None,
             "The daemon's --local-token-file. [default: $XDG_STATE_HOME/jupyter-dev-server/local-token]"],
        ]

    from jds.commands import parse_subcommand  # lazy load: only for this command

    options = RotateOptions()
    failed = parse_subcommand(options, argv, "rotate-token")
    if failed is not None:
        return failed
    path = Path(options["local-token-file"] or default_local_token_path(os.environ, options.profile_name)).expanduser()
    try:
        if path.exists():
            _private(path, "The local token file")
        rotate_local_token(path)
    except (OSError, TokenFileError) as exc:
        print(f"jupyter-dev-server rotate-token: cannot write {path}: {exc}", file=sys.stderr)
        return 1
    url = url_file_path(path)
    where = f"the URL with it is in {url}" if url.exists() else f"the token is in {path}"
    print(f"New local token written; {where}. Every previous login has ended.")
    return 0
