"""
What differs between the JupyterHub releases the proxy supports (3.1 to 6.x), in one table.

Clusters upgrade slowly, so one proxy meets them all. It does not branch on the hub's version: where
releases answer differently it accepts every supported release's answer (the sets below are the union
of the table), and it only reads the version to word its advice (``release_of``). Each row is checked
against the real hub by ``make test-compat``, whose tests read their expectations from here too.

=====================  =============  ============  ============  ============
fact                   3.1            4.1           5.x           6.x
=====================  =============  ============  ============  ============
scope to start         servers        servers       servers       start:servers (servers has it)
``?token=``, server    accepted       accepted [1]  refused [2]   refused [2]
``?token=``, hub API   refused        refused       refused       refused
non-GET, stopped srv   405            403 [4]       403 [4]       403 [4]
dead token             403 on /api/, 302 to /hub/api/oauth2/authorize on pages (every release)
progress URL field     progress_url   progress_url  progress_url, full_progress_url [3]
ready event            ``url`` (the server's path) in every release
named server names     any            any           any           slugs: [a-z][a-z0-9-]*
token's own expiry     unknown [5]    unknown [5]   read          read
=====================  =============  ============  ============  ============

[1] 4.1 added ``HubAuth.allow_token_in_url`` (default on). [2] Except on a WebSocket handshake that
sends ``Sec-Fetch-Mode: websocket``, which non-browser clients never do; the proxy always sends the
token as an ``Authorization`` header instead. [3] ``full_progress_url`` is null unless the hub sets
``public_url``; the proxy follows progress at ``progress_url``'s path on the hub it dials (``--hub``),
which is right whatever public name the hub believes it has. [4] The hub's XSRF check, from 4.1 on,
refuses it before the "not running" page would. [5] ``GET /hub/api/user`` names the token it was
called with (``token_id``) from 5.0 on; before, the proxy cannot tell which of the user's tokens it
holds, so ``check`` and the status page say the expiry is unknown.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

__all__ = [
    "OLDEST",
    "RELEASES",
    "START_SCOPES",
    "STOPPED_SERVER_CODES",
    "DEAD_TOKEN_CODES",
    "LOGIN_PAGES",
    "HubRelease",
    "UnsupportedHub",
    "release_of",
]


@dataclass(frozen=True)
class HubRelease:
    """How one JupyterHub release line behaves where releases differ (see the module's table)."""

    since: tuple[int, int]
    start_scope: str  # the scope POST /hub/api/users/NAME/server needs
    token_in_url: bool  # ``?token=`` accepted on a plain HTTP request to a user's server (never by the hub's API)
    stopped_post_code: int  # what a non-GET request to a stopped server's path gets
    full_progress_url: bool  # the server model has full_url / full_progress_url
    slug_server_names: bool  # new named servers must be slugs
    token_id: bool  # GET /hub/api/user says which token asked (token_id), so its expiry can be read

    @property
    def name(self) -> str:
        return f"{self.since[0]}.{self.since[1]}"


RELEASES: tuple[HubRelease, ...] = (
    HubRelease((3, 1), "servers", token_in_url=True, stopped_post_code=405, full_progress_url=False, slug_server_names=False, token_id=False),
    HubRelease((4, 1), "servers", token_in_url=True, stopped_post_code=403, full_progress_url=False, slug_server_names=False, token_id=False),
    HubRelease((5, 0), "servers", token_in_url=False, stopped_post_code=403, full_progress_url=True, slug_server_names=False, token_id=True),
    HubRelease((6, 0), "start:servers", token_in_url=False, stopped_post_code=403, full_progress_url=True, slug_server_names=True, token_id=True),
)  # fmt: skip
OLDEST = RELEASES[0]

# Scopes that let a token start its owner's server on some supported release (admin:servers holds both).
START_SCOPES: frozenset[str] = frozenset({r.start_scope for r in RELEASES} | {"servers", "admin:servers"})
# Answers that may mean "this server is not running" and need the hub's API to tell: a non-GET to a
# stopped server (per release), 424 from the hub's own "server not running" page for API paths, 503 from
# the hub's proxy while a server's route is gone.
STOPPED_SERVER_CODES: frozenset[int] = frozenset({r.stopped_post_code for r in RELEASES} | {424, 503})

# How a user's server answers a token the hub no longer accepts, in every release: 403 on /api/ paths,
# and on pages a redirect into the hub's login (OAuth), which a client holding a token cannot follow.
DEAD_TOKEN_CODES: frozenset[int] = frozenset({401, 403})
LOGIN_PAGES: tuple[str, ...] = ("hub/api/oauth2/authorize", "hub/login")


class UnsupportedHub(ValueError):
    """The hub's version is older than the oldest release this proxy is tested with."""


def release_of(version: str) -> HubRelease:
    """The table row for a version string from ``GET /hub/api`` (``"5.5.4"``, ``"6.0.0b1"``)."""
    match = re.match(r"(\d+)\.(\d+)", version)
    if match is None:
        raise UnsupportedHub(f"JupyterHub version {version!r} is not a version")
    wanted = (int(match.group(1)), int(match.group(2)))
    rows = [row for row in RELEASES if row.since <= wanted]
    if not rows:
        raise UnsupportedHub(
            f"JupyterHub {version} is older than {OLDEST.name}, the oldest release jupyter-dev-server is tested with"
        )
    return rows[-1]
