"""The path and header mapping, both ways, including a property test that nothing leaves the prefix."""

from __future__ import annotations

import json
import posixpath
from urllib.parse import quote, quote_from_bytes, unquote

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from jds.paths import (
    MODEL_HEAD_LIMIT,
    HubTarget,
    ModelHeadMapper,
    authority,
    in_ide_view,
    is_kernelspec_path,
    listen_address,
    local_path,
    map_kernelspecs_body,
    map_location,
    map_model_head,
    map_request_body,
    map_request_path,
    map_response_body,
    map_response_headers,
    map_set_cookie,
    parse_root,
    path_into_root,
    path_out_of_root,
    query_args,
    redact_query,
    request_body_kind,
    response_body_kind,
    split_authority,
    split_token,
    upstream_request_headers,
)
from jds.refusal import Refusal

ALICE = HubTarget(host="10.0.0.5", port=8000, user="alice", tls_name="hub.example.org")
NAMED = HubTarget(host="hub.example.org", port=443, user="a.b@c+d e", server="gpu 1", base_path="/jupyter/")


@pytest.mark.parametrize(
    ("local", "hub"),
    [
        (b"/", b"/user/alice/"),
        (b"/api/kernels", b"/user/alice/api/kernels"),
        (b"/api/contents/dir%2Ffile.ipynb", b"/user/alice/api/contents/dir%2Ffile.ipynb"),
        (b"/nbextensions/widgets/x.js", b"/user/alice/nbextensions/widgets/x.js"),
        (b"/user/alice/api/status", b"/user/alice/api/status"),
        (b"/user/alice", b"/user/alice/"),
        (b"/user/bob/api", b"/user/alice/user/bob/api"),
        (b"/api/./kernels/../sessions", b"/user/alice/api/sessions"),
        (b"/api/%2e%2E/api/x", b"/user/alice/api/x"),
        (b"/api/..", b"/user/alice/"),
        (b"/files/caf\xc3\xa9.txt", b"/user/alice/files/caf%C3%A9.txt"),
    ],
)
def test_map_request_path(local: bytes, hub: bytes) -> None:
    assert map_request_path(local, ALICE) == hub


def test_named_server_and_escaped_names() -> None:
    assert NAMED.user_prefix == "/jupyter/user/a.b@c%2Bd%20e/gpu%201/"
    assert map_request_path(b"/api/status", NAMED) == b"/jupyter/user/a.b@c%2Bd%20e/gpu%201/api/status"
    # the same prefix, escaped differently by the client, is still recognised as the prefix
    assert (
        map_request_path(b"/jupyter/user/a.b%40c%2bd%20e/gpu%201/lab", NAMED)
        == b"/jupyter/user/a.b@c%2Bd%20e/gpu%201/lab"
    )


@pytest.mark.parametrize(
    ("path", "status"),
    [
        (b"/..", 400),
        (b"/api/../../hub/api", 400),
        (b"/%2e%2e/user/bob/", 400),
        (b"/api/..%2f..%2fuser", 400),
        (b"/api/..\\..\\x", 400),
        (b"/api/%00", 400),
        (b"/api/%0d%0aSet-Cookie:x", 400),
        (b"/api/%zz", 400),
        (b"/api/%4", 400),
        (b"api/kernels", 400),
        (b"/hub/api", 404),
        (b"/hub", 404),
        (b"/api/../hub/api", 404),
    ],
)
def test_refused_paths(path: bytes, status: int) -> None:
    with pytest.raises(Refusal) as refused:
        map_request_path(path, ALICE)
    assert refused.value.status == status
    assert refused.value.message


segment = st.one_of(
    st.sampled_from(["..", ".", "%2e%2e", "%2E.", "", "hub", "user", "alice", "bob", "%2f", "\\", "%5c"]),
    st.text(alphabet="abc./%\\2eEfF5cC@~", max_size=8),
)


@settings(max_examples=500)
@given(st.lists(segment, max_size=8))
@example(["..", "user", "bob"])
@example(["user", "alice", "..", "..", "hub"])
def test_mapped_paths_stay_inside_the_prefix(segments: list[str]) -> None:
    raw = ("/" + "/".join(segments)).encode("latin-1")
    try:
        hub = map_request_path(raw, ALICE)
    except Refusal as refused:
        assert refused.status in (400, 404)
        return
    assert hub.startswith(b"/user/alice/")
    # however a server decodes and normalises the path afterwards, it stays under the prefix
    decoded = unquote(hub.decode("ascii")).replace("\\", "/")
    normalised = posixpath.normpath(decoded)
    assert normalised == "/user/alice" or normalised.startswith("/user/alice/")


def _mapped(raw: bytes, target: HubTarget) -> bytes | tuple[int, str]:
    try:
        return map_request_path(raw, target)
    except Refusal as refused:
        return refused.status, refused.reason


@settings(max_examples=500)
@given(
    st.lists(st.one_of(segment, st.sampled_from(["jupyter", "a.b@c+d%20e", "x:y;z=1", "caf\xe9", "!$&'()*+,", "-_~"])), max_size=6),
    st.sampled_from([ALICE, NAMED]),
)
@example(["user", "alicex"], ALICE)
@example(["hubs"], ALICE)
@example(["jupyter", "user"], NAMED)
def test_plain_paths_take_the_short_way_to_the_same_mapping(segments: list[str], target: HubTarget) -> None:
    """The prefix put in front of a path that needs nothing else is what the whole mapping gives."""
    from unittest import mock

    import jds.paths

    raw = ("/" + "/".join(segments)).encode("latin-1")
    with mock.patch.object(jds.paths, "_plain_path", lambda raw_path, target: False):
        whole = _mapped(raw, target)
    assert _mapped(raw, target) == whole


names = st.text(alphabet=st.characters(codec="utf-8", exclude_categories=("Cs", "Cc")), min_size=1, max_size=10)


@given(names, st.lists(st.text(alphabet="abcXYZ019-_.~", min_size=1, max_size=6).filter(lambda s: s not in (".", "..")), max_size=5))
def test_request_and_location_mapping_are_inverse(user: str, parts: list[str]) -> None:
    target = HubTarget(host="hub", port=8000, user=user)
    local = ("/" + "/".join(parts)).encode("ascii")
    if local.split(b"/")[1:2] == [b"hub"]:
        return
    hub = map_request_path(local, target)
    assert local_path(hub, target) == local
    assert map_location(hub, target) == local
    assert map_location(b"https://hub:8000" + hub + b"?a=1#f", target) == local + b"?a=1#f"


def test_map_location() -> None:
    assert map_location(b"/user/alice/api/sessions/1", ALICE) == b"/api/sessions/1"
    assert map_location(b"https://hub.example.org:8000/user/alice/lab?x=1", ALICE) == b"/lab?x=1"
    assert map_location(b"https://10.0.0.5:8000/user/alice/tree", ALICE) == b"/tree"
    assert (
        map_location(b"/hub/spawn-pending/alice", ALICE)
        == b"https://hub.example.org:8000/hub/spawn-pending/alice"
    )
    assert map_location(b"https://elsewhere.org/user/alice/x", ALICE) == b"https://elsewhere.org/user/alice/x"
    assert map_location(b"https://hub.example.org:9999/user/alice/x", ALICE) == b"https://hub.example.org:9999/user/alice/x"
    assert map_location(b"relative/path", ALICE) == b"relative/path"
    assert map_location(b"/user/alice", ALICE) == b"/"


def test_map_set_cookie() -> None:
    cookie = b"_xsrf=abc; expires=Sat, 26 Dec 2026 12:17:39 GMT; Path=/user/alice/; Domain=hub.example.org; Secure"
    assert map_set_cookie(cookie, ALICE) == b"_xsrf=abc; expires=Sat, 26 Dec 2026 12:17:39 GMT; Path=/; Secure"
    assert map_set_cookie(b"a=b; path=/user/alice/lab", ALICE) == b"a=b; Path=/lab"
    assert map_set_cookie(b"a=b; Path=/hub/", ALICE) == b"a=b; Path=/hub/"
    assert map_set_cookie(b"a=b", ALICE) == b"a=b"


def test_split_token_keeps_everything_else() -> None:
    assert split_token(b"session_id=1&token=s%2Fcret&x=&token2=y") == (b"session_id=1&x=&token2=y", b"s/cret")
    assert split_token(b"1638511749274") == (b"1638511749274", None)
    assert split_token(b"") == (b"", None)


def test_redact_query() -> None:
    assert redact_query(b"/api/k?token=abc&a=1") == b"/api/k?token=[redacted]&a=1"
    assert redact_query(b"/x?a=1&token=abc") == b"/x?a=1&token=[redacted]"
    assert redact_query(b"/x?mytoken=abc") == b"/x?mytoken=abc"
    assert redact_query(b"/x") == b"/x"


def test_upstream_request_headers() -> None:
    headers = [
        (b"Host", b"127.0.0.1:8000"),
        (b"Connection", b"keep-alive, X-Secret"),
        (b"X-Secret", b"hop"),
        (b"Keep-Alive", b"timeout=5"),
        (b"Accept", b"application/json"),
        (b"Cookie", b"a=1"),
        (b"Cookie", b"b=2"),
        (b"X-Forwarded-For", b"10.1.1.1"),
        (b"Content-Length", b"5"),
    ]
    out = upstream_request_headers(headers, ALICE, "127.0.0.1", b"127.0.0.1:8000", b"T")
    names = [n.lower() for n, _ in out]
    assert b"connection" not in names and b"x-secret" not in names and b"keep-alive" not in names
    assert b"content-length" not in names
    assert (b"Host", b"hub.example.org:8000") in out
    assert (b"Authorization", b"token T") in out
    assert [v for n, v in out if n == b"Cookie"] == [b"a=1", b"b=2"]
    assert (b"X-Forwarded-For", b"10.1.1.1, 127.0.0.1") in out
    assert (b"X-Forwarded-Proto", b"http") in out
    assert (b"X-Forwarded-Host", b"127.0.0.1:8000") in out
    # a client's own Authorization wins over a query token
    out = upstream_request_headers([(b"Authorization", b"bearer X")], ALICE, "127.0.0.1", None, b"T")
    assert [v for n, v in out if n.lower() == b"authorization"] == [b"bearer X"]


def test_map_response_headers_keeps_every_value() -> None:
    headers = [
        (b"Set-Cookie", b"a=1; Path=/user/alice/"),
        (b"Set-Cookie", b"b=2; Path=/user/alice/api"),
        (b"Location", b"/user/alice/api/kernels/k"),
        (b"Transfer-Encoding", b"chunked"),
        (b"Content-Length", b"10"),
        (b"X-Custom", b"1"),
    ]
    assert map_response_headers(headers, ALICE) == [
        (b"Set-Cookie", b"a=1; Path=/"),
        (b"Set-Cookie", b"b=2; Path=/api"),
        (b"Location", b"/api/kernels/k"),
        (b"X-Custom", b"1"),
    ]


def test_kernelspecs_body() -> None:
    assert is_kernelspec_path(b"/api/kernelspecs") and is_kernelspec_path(b"/api/kernelspecs/python3")
    assert not is_kernelspec_path(b"/api/kernelspecs/python3/logo") and not is_kernelspec_path(b"/api/kernels")
    prefix = NAMED.user_prefix
    listing = {
        "default": "python3",
        "kernelspecs": {
            "python3": {
                "name": "python3",
                "spec": {"display_name": "Python 3"},
                "resources": {"logo-64x64": f"{prefix}kernelspecs/python3/logo-64x64.png"},
            }
        },
    }
    mapped = json.loads(map_kernelspecs_body(json.dumps(listing).encode(), NAMED))
    assert mapped["kernelspecs"]["python3"]["resources"] == {"logo-64x64": "/kernelspecs/python3/logo-64x64.png"}
    assert mapped["kernelspecs"]["python3"]["spec"] == {"display_name": "Python 3"}
    single = listing["kernelspecs"]["python3"]
    mapped = json.loads(map_kernelspecs_body(json.dumps(single).encode(), NAMED))
    assert mapped["resources"]["logo-64x64"] == "/kernelspecs/python3/logo-64x64.png"
    for body in (b"not json", b"[1, 2]", b'{"kernelspecs": 3}'):
        assert map_kernelspecs_body(body, NAMED) == body


def test_target_names() -> None:
    v6 = HubTarget(host="::1", port=8443, user="u")
    assert v6.netloc == "[::1]:8443"
    assert NAMED.netloc == "hub.example.org"
    assert quote("a.b@c+d e", safe="@~") in NAMED.user_prefix


# -- addresses ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("host", "port", "scheme", "text"),
    [
        ("hub.example.org", 8000, "", "hub.example.org:8000"),
        ("::1", 8000, "", "[::1]:8000"),
        ("::1", None, "", "[::1]"),
        ("hub.example.org", 443, "https", "hub.example.org"),
        ("2001:db8::7", 443, "https", "[2001:db8::7]"),
        ("2001:db8::7", 8443, "https", "[2001:db8::7]:8443"),
    ],
)
def test_authority_brackets_ipv6_and_drops_the_default_port(host: str, port: int | None, scheme: str, text: str) -> None:
    assert authority(host, port, scheme) == text
    assert split_authority(text) == (host, None if scheme and port == 443 else port)


@pytest.mark.parametrize(
    ("value", "split"),
    [
        ("LocalHost:8000", ("localhost", 8000)),
        ("[::1]:8000", ("::1", 8000)),
        ("127.0.0.1", ("127.0.0.1", None)),
        ("evil@127.0.0.1:8000", ("evil@127.0.0.1:8000", None)),
        ("127.0.0.1:8000/x", ("127.0.0.1:8000/x", None)),
        ("127.0.0.1:http", ("127.0.0.1:http", None)),
    ],
)
def test_split_authority_keeps_anything_but_host_and_port_whole(value: str, split: tuple[str, int | None]) -> None:
    assert split_authority(value) == split


@pytest.mark.parametrize(
    ("description", "parsed"),
    [
        ("tcp:8000:interface=127.0.0.1", ("tcp", "8000", "127.0.0.1")),
        ("tcp:port=9000", ("tcp", "9000", None)),
        ("tcp6:8001:interface=\\:\\:1", ("tcp6", "8001", "::1")),
        ("unix:/tmp/jds.sock", ("unix", "/tmp/jds.sock", None)),
    ],
)
def test_listen_address_reads_kind_port_and_interface(description: str, parsed: tuple[str, str | None, str | None]) -> None:
    assert listen_address(description) == parsed


# -- --root ------------------------------------------------------------------------------------

ROOTED = HubTarget(host="10.0.0.5", port=8000, user="alice", tls_name="hub.example.org", root="work/my proj")


@pytest.mark.parametrize(
    ("local", "hub"),
    [
        (b"/api/contents", b"/user/alice/api/contents/work/my%20proj"),
        (b"/api/contents/", b"/user/alice/api/contents/work/my%20proj"),
        (b"/api/contents/a.ipynb", b"/user/alice/api/contents/work/my%20proj/a.ipynb"),
        (b"/api/contents/d/", b"/user/alice/api/contents/work/my%20proj/d/"),
        (b"/api/contents/a.ipynb/checkpoints/c1", b"/user/alice/api/contents/work/my%20proj/a.ipynb/checkpoints/c1"),
        (b"/files/data.csv", b"/user/alice/files/work/my%20proj/data.csv"),
        (b"/view/p.png", b"/user/alice/view/work/my%20proj/p.png"),
        (b"/edit/x.py", b"/user/alice/edit/work/my%20proj/x.py"),
        (b"/notebooks/n.ipynb", b"/user/alice/notebooks/work/my%20proj/n.ipynb"),
        (b"/tree", b"/user/alice/tree/work/my%20proj"),
        (b"/tree/d", b"/user/alice/tree/work/my%20proj/d"),
        (b"/lab/tree/n.ipynb", b"/user/alice/lab/tree/work/my%20proj/n.ipynb"),
        (b"/nbconvert/html/n.ipynb", b"/user/alice/nbconvert/html/work/my%20proj/n.ipynb"),
        # converting a notebook sent in the body has no path; nor do other routes
        (b"/nbconvert/html", b"/user/alice/nbconvert/html"),
        (b"/files", b"/user/alice/files"),
        (b"/api/sessions", b"/user/alice/api/sessions"),
        (b"/api/kernels/k/channels", b"/user/alice/api/kernels/k/channels"),
        (b"/lab", b"/user/alice/lab"),
        (b"/api/contentsX/a", b"/user/alice/api/contentsX/a"),
        # dot segments that stay inside the folder, and the server's own view, left alone
        (b"/api/contents/d/../a.ipynb", b"/user/alice/api/contents/work/my%20proj/a.ipynb"),
        (b"/api/contents/a%2Fb", b"/user/alice/api/contents/work/my%20proj/a%2Fb"),
        (b"/user/alice/api/contents/other.ipynb", b"/user/alice/api/contents/other.ipynb"),
    ],
)
def test_root_request_paths(local: bytes, hub: bytes) -> None:
    assert map_request_path(local, ROOTED) == hub


@pytest.mark.parametrize(
    ("path", "reason"),
    [
        (b"/api/contents/..", "outside-root"),
        (b"/api/contents/../secret", "outside-root"),
        (b"/api/contents/%2e%2e/secret", "outside-root"),
        (b"/api/contents/%2E./secret", "outside-root"),
        (b"/files/d/../../secret", "outside-root"),
        (b"/nbconvert/html/..", "outside-root"),
        (b"/tree/..", "outside-root"),
        # behind an escaped slash or backslash, a climb out of the folder is still that (issue 20, 13)
        (b"/api/contents/..%2Fsecret", "outside-root"),
        (b"/api/contents/d%2F..%2F..%2Fsecret", "outside-root"),
        (b"/files/..%5csecret", "outside-root"),
        (b"/api/contents%2F..", "outside-root"),
        # one that stays inside the folder is still refused, for how it is written
        (b"/api/contents/d%2F..%2Fa.ipynb", "bad-path"),
    ],
)
def test_root_escapes_are_refused(path: bytes, reason: str) -> None:
    with pytest.raises(Refusal) as refused:
        map_request_path(path, ROOTED)
    assert (refused.value.status, refused.value.reason) == (400, reason)
    # without --root, the same paths mean what RFC 3986 says (or are refused as before)
    try:
        map_request_path(path, ALICE)
    except Refusal as before:
        assert before.reason == "bad-path"


route = st.sampled_from(["api/contents", "files", "view", "edit", "notebooks", "tree", "lab/tree", "nbconvert/html"])


@settings(max_examples=500)
@given(route, st.lists(segment, max_size=8))
@example("api/contents", ["..", "x"])
@example("files", ["%2e%2e", "%2e%2e", "secret"])
@example("nbconvert/html", ["a", "..", "..", "b"])
def test_rooted_contents_paths_stay_inside_the_folder(route: str, segments: list[str]) -> None:
    raw = ("/" + route + "/" + "/".join(segments)).encode("latin-1")
    try:
        hub = map_request_path(raw, ROOTED)
    except Refusal as refused:
        assert refused.status == 400
        return
    normalised = posixpath.normpath(unquote(hub.decode("ascii")).replace("\\", "/"))
    top = f"/user/alice/{route}"
    if normalised == top and route not in ("api/contents", "tree", "lab/tree"):
        return  # /files/ and the like without a path name nothing, and are not mapped
    if normalised.startswith(top):
        # a contents path: whatever the server decodes, it is in the folder
        assert (normalised + "/").startswith(f"/user/alice/{route}/work/my proj/"), (raw, hub)


parts = st.lists(
    st.text(alphabet=st.characters(codec="utf-8", exclude_categories=("Cs", "Cc"), exclude_characters="/\\%?#"), min_size=1, max_size=6)
    .filter(lambda s: s not in (".", "..")),
    min_size=1,
    max_size=4,
)


@given(st.sampled_from(["api/contents", "files", "notebooks", "nbconvert/pdf", "tree"]), parts, parts)
def test_root_locations_and_requests_are_inverse(route: str, root: list[str], names: list[str]) -> None:
    target = HubTarget(host="hub", port=8000, user="alice", root="/".join(root))
    local = ("/" + route + "/" + "/".join(quote(n, safe="") for n in names)).encode("ascii")
    hub = map_request_path(local, target)
    assert in_ide_view(local, target) and not in_ide_view(hub, target)
    assert map_location(hub, target) == local
    assert map_location(b"https://hub:8000" + hub + b"?a=1", target) == local + b"?a=1"


def test_root_locations() -> None:
    assert map_location(b"/user/alice/api/contents/work/my%20proj/a/checkpoints/1", ROOTED) == b"/api/contents/a/checkpoints/1"
    assert map_location(b"/user/alice/api/contents/work/my%20proj", ROOTED) == b"/api/contents"
    assert map_location(b"/user/alice/notebooks/work/my%20proj/n.ipynb", ROOTED) == b"/notebooks/n.ipynb"
    assert map_location(b"/user/alice/api/sessions/s1", ROOTED) == b"/api/sessions/s1"
    # contents outside the folder have no local name: only the hub can answer them
    assert map_location(b"/user/alice/api/contents/other.ipynb", ROOTED) == (
        b"https://hub.example.org:8000/user/alice/api/contents/other.ipynb"
    )
    assert map_location(b"/user/alice/api/contents/work/my%20projX/a", ROOTED).startswith(b"https://")


@pytest.mark.parametrize(
    ("text", "root"),
    [("", ""), ("/", ""), ("work", "work"), ("/work/proj/", "work/proj"), ("work//./proj", "work/proj"), ("a\\b", "a/b")],
)
def test_parse_root(text: str, root: str) -> None:
    assert parse_root(text) == root


@pytest.mark.parametrize("text", ["..", "work/../..", "a/../b", "x\x00y"])
def test_parse_root_refuses(text: str) -> None:
    with pytest.raises(ValueError, match="--root"):
        parse_root(text)


contents_path = st.lists(
    st.text(alphabet="ab.é \\", min_size=1, max_size=4).filter(lambda s: s not in (".", "..") and ".." not in s.split("\\")),
    max_size=4,
).map("/".join)


@given(st.sampled_from(["proj", "a/b c", "é/x"]), contents_path)
def test_body_paths_both_ways(root: str, path: str) -> None:
    server = path_into_root(path, root)
    assert server == root or server.startswith(root + "/")
    assert path_out_of_root(server, root) == path.strip("/")
    assert path_into_root(path, "") == path_out_of_root(path, "") == path


@given(st.lists(st.sampled_from(["a", "b", "..", ".", "", "x\\..", "%2e%2e"]), max_size=6).map("/".join))
def test_body_paths_never_leave_the_folder(path: str) -> None:
    try:
        server = path_into_root(path, "proj")
    except Refusal as refused:
        assert (refused.status, refused.reason) == (400, "outside-root")
        return
    assert server == "proj" or server.startswith("proj/")
    assert ".." not in server.split("/")


def test_path_out_of_root_outside_the_folder() -> None:
    assert path_out_of_root("other/n.ipynb", "work/proj") == "../../other/n.ipynb"
    assert path_out_of_root("work/n.ipynb", "work/proj") == "../n.ipynb"
    assert path_out_of_root("work/proj", "work/proj") == ""
    assert path_out_of_root("", "work/proj") == "../.."


@pytest.mark.parametrize(
    ("method", "local", "kind"),
    [
        (b"POST", b"/api/sessions", "sessions"),
        (b"PATCH", b"/api/sessions/s1", "sessions"),
        (b"GET", b"/api/sessions", None),
        (b"POST", b"/api/terminals", "terminals"),
        (b"POST", b"/api/terminals/1", None),
        (b"PATCH", b"/api/contents/work/a.txt", "contents"),
        (b"POST", b"/api/contents/work", "contents"),
        (b"PUT", b"/api/contents/work/a.txt", None),
        (b"POST", b"/api/kernels", "kernels"),
        (b"POST", b"/api/kernels/", "kernels"),
        (b"POST", b"/api/kernels/k1/restart", None),
        (b"GET", b"/api/kernels", None),
    ],
)
def test_request_body_kind(method: bytes, local: bytes, kind: str | None) -> None:
    assert request_body_kind(method, local) == kind


def test_response_body_kind() -> None:
    assert response_body_kind(b"GET", b"/api/kernelspecs", False) == "kernelspecs"
    assert response_body_kind(b"GET", b"/api/contents/x", False) is None
    assert response_body_kind(b"GET", b"/api/contents/x", True) == "contents"
    assert response_body_kind(b"PATCH", b"/api/contents/x", True) == "contents"
    assert response_body_kind(b"POST", b"/api/sessions", True) == "sessions"
    assert response_body_kind(b"DELETE", b"/api/sessions/s", True) is None
    assert response_body_kind(b"GET", b"/api/kernels", True) is None


def test_request_bodies() -> None:
    vscode = {"path": "n-jvsc-1b2c.ipynb", "type": "notebook", "name": "n.ipynb", "kernel": {"name": "python3"}}
    mapped = json.loads(map_request_body("sessions", json.dumps(vscode).encode(), ROOTED))
    assert mapped == {**vscode, "path": "work/my proj/n-jvsc-1b2c.ipynb"}
    old_style = json.loads(map_request_body("sessions", b'{"notebook": {"path": "/sub/n.ipynb"}}', ROOTED))
    assert old_style == {"notebook": {"path": "work/my proj/sub/n.ipynb"}}
    assert json.loads(map_request_body("terminals", b"", ROOTED)) == {"cwd": "work/my proj"}
    assert json.loads(map_request_body("terminals", b"{}", ROOTED)) == {"cwd": "work/my proj"}
    assert json.loads(map_request_body("terminals", b'{"cwd": "sub"}', ROOTED)) == {"cwd": "work/my proj/sub"}
    rename = json.loads(map_request_body("contents", b'{"path": "new/name.txt"}', ROOTED))
    assert rename == {"path": "work/my proj/new/name.txt"}
    copy = json.loads(map_request_body("contents", b'{"copy_from": "a.ipynb"}', ROOTED))
    assert copy == {"copy_from": "work/my proj/a.ipynb"}
    # what is not the JSON object expected goes as it came: the server explains
    for body in (b"not json", b"[1]", b'{"path": 3}', b'{"kernel": {"name": "x"}}'):
        assert map_request_body("sessions", body, ROOTED) == body
    assert map_request_body("terminals", b"{", ROOTED) == b"{"
    # and without --root nothing is touched
    assert map_request_body("terminals", b"", ALICE) == b""
    assert map_request_body("sessions", json.dumps(vscode).encode(), ALICE) == json.dumps(vscode).encode()
    with pytest.raises(Refusal) as refused:
        map_request_body("sessions", b'{"path": "../n.ipynb"}', ROOTED)
    assert (refused.value.status, refused.value.reason) == (400, "outside-root")
    with pytest.raises(Refusal):
        map_request_body("terminals", b'{"cwd": "a/../.."}', ROOTED)
    # a kernel starts where its path says, inside the folder; without one, in the folder itself
    assert json.loads(map_request_body("kernels", b'{"name": "python3", "path": "sub"}', ROOTED)) == {
        "name": "python3", "path": "work/my proj/sub"}
    assert json.loads(map_request_body("kernels", b"", ROOTED)) == {"path": "work/my proj"}
    assert json.loads(map_request_body("kernels", b'{"name": "python3"}', ROOTED)) == {
        "name": "python3", "path": "work/my proj"}
    with pytest.raises(Refusal) as refused:
        map_request_body("kernels", b'{"name": "python3", "path": "../.."}', ROOTED)
    assert refused.value.reason == "outside-root"


def test_response_bodies() -> None:
    listing = {
        "name": "my proj", "path": "work/my proj", "type": "directory", "format": "json",
        "content": [
            {"name": "a.ipynb", "path": "work/my proj/a.ipynb", "type": "notebook", "content": None},
            {"name": "d", "path": "work/my proj/d", "type": "directory", "content": None},
        ],
    }  # fmt: skip
    mapped = json.loads(map_response_body("contents", json.dumps(listing).encode(), ROOTED))
    assert (mapped["name"], mapped["path"]) == ("", "")
    assert [c["path"] for c in mapped["content"]] == ["a.ipynb", "d"]
    assert [c["name"] for c in mapped["content"]] == ["a.ipynb", "d"]
    session = {
        "id": "s", "path": "work/my proj/n-jvsc-1.ipynb", "name": "n.ipynb", "type": "notebook",
        "kernel": {"id": "k", "name": "python3"}, "notebook": {"path": "work/my proj/n-jvsc-1.ipynb", "name": "n.ipynb"},
    }  # fmt: skip
    mapped = json.loads(map_response_body("sessions", json.dumps([session]).encode(), ROOTED))
    assert mapped[0]["path"] == mapped[0]["notebook"]["path"] == "n-jvsc-1.ipynb"
    assert mapped[0]["kernel"] == session["kernel"]
    # a checkpoint model has no path, so its body is passed as it came
    checkpoints = b'[{"id": "checkpoint", "last_modified": "2026-12-01T00:00:00Z"}]'
    assert map_response_body("contents", checkpoints, ROOTED) == checkpoints
    assert map_response_body("contents", b"<html>", ROOTED) == b"<html>"


def streamed(body: bytes, sizes: list[int]) -> bytes:
    """``body`` through a :class:`ModelHeadMapper` in pieces of the given sizes (the rest at once)."""
    mapper = ModelHeadMapper(ROOTED)
    out, at = [], 0
    for size in [*sizes, len(body)]:
        out.append(mapper.feed(body[at : at + size]))
        at += size
    return b"".join(out) + mapper.flush()


file_models = st.fixed_dictionaries(
    {
        "name": st.text(max_size=5),
        "path": st.one_of(contents_path.map(lambda p: f"work/my proj/{p}"), contents_path),
        "last_modified": st.text(max_size=5),
    },
    optional={"size": st.integers(), "writable": st.booleans()},
).map(lambda model: {**model, "content": "x" * 50, "format": "text", "type": "file"})


@given(file_models, st.lists(st.integers(min_value=0, max_value=40), max_size=8), st.booleans())
def test_large_models_stream_mapped_as_a_whole_one_would_be(model: dict, sizes: list[int], ascii: bool) -> None:
    body = json.dumps(model, ensure_ascii=ascii).encode()
    assert json.loads(streamed(body, sizes)) == json.loads(map_response_body("contents", body, ROOTED))


@given(st.binary(max_size=200), st.lists(st.integers(min_value=0, max_value=40), max_size=4))
@example(b'{"path": "work/my proj/a", "content": 1', [])
@example(b'{"path": "work/my proj/a" "content": 1}', [])
def test_anything_else_streams_as_a_whole_body_would(body: bytes, sizes: list[int]) -> None:
    out = streamed(body, sizes)
    if out != map_response_body("contents", body, ROOTED):
        # a body cut short or broken after its head: only the members before "content" were mapped
        assert b'"content"' in body and out[out.index(b'"content"') :] == body[body.index(b'"content"') :]


def test_model_head() -> None:
    body = b'{"name": "big.txt", "path": "work/my proj/big.txt", "content": "yyyy'
    replacement, replaced = map_model_head(body, ROOTED)
    assert replacement + body[replaced:] == b'{"name": "big.txt", "path": "big.txt", "content": "yyyy'
    assert map_model_head(b'{"name": "big.txt", "path": "work/my', ROOTED) is None
    assert map_model_head(b'{"path": "other/x", "content": "', ROOTED) == (b'{"path": "../../other/x", ', 20)
    assert map_model_head(b'["path"', ROOTED) == (b"", 0)
    # a head that never reaches "content" is given up at the limit, and passes as it came
    endless = b'{"name": "' + b"n" * MODEL_HEAD_LIMIT
    assert streamed(endless, [100] * 10) == endless


@given(st.lists(st.tuples(st.binary(min_size=1, max_size=8), st.binary(max_size=8)), max_size=6))
def test_query_args_are_the_bytes_sent(pairs: list[tuple[bytes, bytes]]) -> None:
    """Issue 20 (7): any escapes, ASCII text or not, come back as the bytes they stand for."""
    query = b"&".join(quote_from_bytes(n).encode() + b"=" + quote_from_bytes(v).encode() for n, v in pairs)
    expected: dict[bytes, list[bytes]] = {}
    for name, value in pairs:
        expected.setdefault(name, []).append(value)
    assert query_args(query) == expected
    assert query_args(b"a=%C3%A9&b=%ff+x&c") == {b"a": [b"\xc3\xa9"], b"b": [b"\xff x"], b"c": [b""]}
