"""
jds.hubversions: the table of what differs between JupyterHub releases, read as a pure function and
checked row by row against the real hub (``make test-compat`` runs it against each supported release).
"""

from __future__ import annotations

import uuid

import pytest
import requests
from hub import JupyterHubProcess, dump

from jds.hub import looks_stopped, may_be_dead_token
from jds.hubversions import OLDEST, RELEASES, START_SCOPES, STOPPED_SERVER_CODES, UnsupportedHub, release_of
from jds.paths import HubTarget


@pytest.mark.parametrize(
    ("version", "since"),
    [("3.1.1", (3, 1)), ("4.0.2", (3, 1)), ("4.1.6", (4, 1)), ("5.5.4", (5, 0)), ("6.0.0b1", (6, 0)), ("7.2.0", (6, 0))],
)
def test_a_version_finds_its_row(version: str, since: tuple[int, int]) -> None:
    assert release_of(version).since == since


@pytest.mark.parametrize("version", ["3.0.0", "2.3.1", "1.5", "dev", ""])
def test_older_or_odd_versions_are_refused_by_name(version: str) -> None:
    with pytest.raises(UnsupportedHub, match=version or "not a version"):
        release_of(version)


def test_the_unions_cover_every_row() -> None:
    assert OLDEST is RELEASES[0] and list(RELEASES) == sorted(RELEASES, key=lambda r: r.since)
    assert {r.start_scope for r in RELEASES} <= START_SCOPES
    assert {r.stopped_post_code for r in RELEASES} <= STOPPED_SERVER_CODES


PREFIXED = HubTarget(host="hub.example.org", port=443, user="alice", base_path="/jupyter/")


@pytest.mark.parametrize(
    ("code", "location", "dead"),
    [
        (403, None, True),
        (401, None, True),
        (302, b"/jupyter/hub/api/oauth2/authorize?client_id=jupyterhub-user-alice&state=x", True),
        (302, b"https://hub.example.org/jupyter/hub/login?next=%2Fjupyter%2Fuser%2Falice%2Flab", True),
        (302, b"/hub/api/oauth2/authorize?client_id=x", False),  # not this hub's prefix
        (302, b"/jupyter/hub/user/alice/lab", False),  # a stopped server, not a token
        (302, b"/jupyter/user/alice/lab/tree", False),
        (404, None, False),
        (200, None, False),
    ],
)
def test_dead_token_answers_of_every_release(code: int, location: bytes | None, dead: bool) -> None:
    assert may_be_dead_token(code, location, PREFIXED) is dead


@pytest.mark.parametrize("code", sorted(STOPPED_SERVER_CODES))
def test_every_releases_stopped_answer_is_asked_about(code: int) -> None:
    assert looks_stopped(code, None, PREFIXED) is None


def _get(hub: JupyterHubProcess, path: str, token: str | None = None, method: str = "GET") -> requests.Response:
    headers = {"Authorization": f"token {token}"} if token else {}
    return requests.request(
        method, hub.url + path, headers=headers, verify=str(hub.ca_path), timeout=60, allow_redirects=False
    )


def test_the_hub_behaves_as_its_row_says(hub: JupyterHubProcess) -> None:
    row = hub.release
    hub.start_server("alice")
    # ?token= on a plain HTTP request
    by_url = _get(hub, f"/user/alice/api/status?token={hub.alice_token}")
    assert by_url.status_code == (200 if row.token_in_url else 403), dump(by_url)
    # the progress URL fields of the server model
    model = hub.server_model("alice") or {}
    assert model.get("progress_url") == "/hub/api/users/alice/server/progress", model
    assert ("full_progress_url" in model) == row.full_progress_url, model
    # whether GET /hub/api/user names the token that asked (what the token's expiry is read through)
    me = _get(hub, "/hub/api/user", hub.alice_token).json()
    assert bool(me.get("token_id")) == row.token_id, me
    # a non-GET request to a user's stopped server
    user = f"jds-{uuid.uuid4().hex[:8]}"
    hub.create_user(user)
    token = hub.new_token(user)
    posted = _get(hub, f"/user/{user}/api/contents", token, "POST")
    assert posted.status_code == row.stopped_post_code, dump(posted)
    # the scope that starts a server is enough on its own: the hub starts it (201, or 202 pending)
    starter = hub.new_token(user, scopes=[f"{row.start_scope}!user={user}"])
    started = _get(hub, f"/hub/api/users/{user}/server", starter, "POST")
    assert started.status_code in (201, 202), dump(started)
    hub.start_server(user)  # waits for a pending spawn to finish: the hub refuses to stop one
    hub.stop_server(user)


def test_a_dead_token_gets_403_on_the_api_and_a_login_redirect_on_pages(hub: JupyterHubProcess) -> None:
    hub.start_server("alice")
    token = hub.new_token("alice", note="jds dead token")
    tokens = hub.api("GET", "users/alice/tokens").json()["api_tokens"]
    for listed in tokens:
        if listed.get("note") == "jds dead token":
            assert hub.api("DELETE", f"users/alice/tokens/{listed['id']}").status_code == 204
    api = _get(hub, "/user/alice/api/status", token)
    assert api.status_code == 403, dump(api)
    page = _get(hub, "/user/alice/lab", token)
    assert page.status_code == 302 and "/hub/api/oauth2/authorize?" in page.headers["Location"], dump(page)
