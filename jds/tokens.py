"""
The two tokens of managed mode: the user's hub API token (read, never shown) and the proxy's own
local token (made once, kept in a 0600 file so the URL saved in the IDE stays valid across restarts).
"""

from __future__ import annotations

import os
import secrets
import stat
from collections.abc import Mapping
from pathlib import Path

__all__ = [
    "TokenFileError",
    "default_hub_token_path",
    "default_local_token_path",
    "load_local_token",
    "read_hub_token",
    "write_private",
]


class TokenFileError(ValueError):
    """A token file that cannot be used; the message says how to fix it."""


def default_local_token_path(environ: Mapping[str, str]) -> Path:
    state = environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    return Path(state) / "jupyter-dev-server" / "local-token"


def default_hub_token_path(environ: Mapping[str, str]) -> Path:
    """Where ``jupyter-dev-server login`` keeps the hub token: configuration the user made, not state."""
    config = environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    return Path(config) / "jupyter-dev-server" / "hub-token"


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
