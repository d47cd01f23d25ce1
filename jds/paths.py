"""
Mapping between the IDE's view (a plain Jupyter server at ``/``) and the hub's view (the user's server
at ``[PREFIX]/user/NAME[/SERVER]/``).

Everything here is a pure function of bytes and a :class:`HubTarget`, so it can be tested without a
reactor, and property-tested both ways. The proxy and the WebSocket relay both call into this module,
which is why no Twisted type appears in it.

With ``--root`` (:attr:`HubTarget.root`) the IDE's ``/`` is a folder of the server: contents paths in
URLs (``/api/contents/X``, ``/files/X``, ...) and in the JSON bodies that carry paths (sessions,
terminals, renames) get the folder put in front on the way in and taken off on the way out. Paths
already under the user's prefix (``/user/NAME/...``, what the server's own pages link to) are the
server's coordinates and are left alone. The folder is a view, not a sandbox: a terminal can still
``cd /``.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from functools import cached_property
from urllib.parse import quote, unquote_to_bytes, urlsplit

from hyperlink import URL, URLParseError

from jds.refusal import Refusal

__all__ = [
    "HOP_BY_HOP",
    "HubTarget",
    "ModelHeadMapper",
    "authority",
    "in_ide_view",
    "is_kernel_start",
    "is_kernelspec_path",
    "map_kernelspecs_body",
    "map_location",
    "map_model_head",
    "map_request_path",
    "map_response_headers",
    "map_request_body",
    "map_response_body",
    "map_set_cookie",
    "listen_address",
    "query_args",
    "parse_root",
    "path_into_root",
    "path_out_of_root",
    "redact_query",
    "request_body_kind",
    "response_body_kind",
    "split_authority",
    "upstream_request_headers",
]

# RFC 9110 7.6.1: meaningful only for one connection, never forwarded.
HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
    }
)

_PERCENT = re.compile(rb"%(?![0-9A-Fa-f]{2})")
_TOKEN_PARAM = re.compile(rb"(^|&)token=[^&]*")
_KERNELSPEC_PATH = re.compile(rb"^/api/kernelspecs(?:/[^/]+)?/?$")
# Controls are never meaningful in a URL path and CR/LF/NUL are the usual smuggling tools.
_FORBIDDEN_DECODED = frozenset(range(0x00, 0x20)) | {0x7F}
# A path that needs no decoding, re-encoding or dot-segment work: ASCII path characters, no escapes,
# no backslash (see _plain_path).
_PLAIN_PATH = re.compile(rb"/[A-Za-z0-9/_.~!$&'()*+,;=:@-]*")


def escape_name(name: str) -> str:
    """Escape a user or server name exactly as JupyterHub does (``url_escape_path``)."""
    return quote(name, safe="@~")


def authority(host: str, port: int | None = None, scheme: str = "") -> str:
    """``HOST[:PORT]`` as a URL writes it: an IPv6 address in brackets, the scheme's default port left out."""
    return URL(scheme=scheme, host=host, port=port).authority()


def split_authority(value: str) -> tuple[str, int | None]:
    """
    ``(host, port)`` of a ``HOST[:PORT]`` authority (an IPv6 address in brackets), lower case.

    Anything else (user info, a path, a port that is no number) comes back whole as the host with no
    port, so that it matches no name: a ``Host`` of ``evil@127.0.0.1`` is not ``127.0.0.1``.
    """
    text = value.strip().lower()
    if not re.search(r"[@/?#\\]", text):
        try:
            url = URL.from_text("//" + text)
        except URLParseError:
            pass
        else:
            return url.host, url.port
    return text, None


def listen_address(description: str) -> tuple[str, str | None, str | None]:
    """
    ``(kind, port, interface)`` of a Twisted server endpoint description as given to ``--listen``
    (``tcp:8000:interface=127.0.0.1``, ``tcp6:port=8001:interface=\\:\\:1``; ``\\:`` is an escaped
    colon). Port and interface are None when the description does not name them.
    """
    parts = [part.replace("\\:", ":") for part in re.split(r"(?<!\\):", description)]
    port = interface = None
    for part in parts[1:]:
        key, sep, value = part.partition("=")
        if not sep:
            port = port or key
        elif key == "port":
            port = value
        elif key == "interface":
            interface = value
    return parts[0], port, interface


@dataclass(frozen=True)
class HubTarget:
    """
    Where the user's server lives on the hub, how the proxy names itself to it, and which folder
    of the server the IDE sees as its root (``--root``).
    """

    host: str
    port: int
    user: str
    server: str = ""
    base_path: str = "/"
    tls_name: str = ""
    # The folder the IDE sees as the server's root, relative to it, "/"-separated, without
    # leading or trailing "/" ("" for the server's root); see parse_root.
    root: str = ""

    @property
    def verify_name(self) -> str:
        # lower case: jupyter_server compares a lower-cased Origin with Host
        return (self.tls_name or self.host).lower()

    @cached_property  # built with hyperlink (~10 µs); every request needs it twice
    def netloc(self) -> str:
        """``Host`` value for the hub: the verified name, as a browser would send it."""
        return authority(self.verify_name, self.port, "https")

    @cached_property
    def netloc_bytes(self) -> bytes:
        """:attr:`netloc` as the ``Host`` header the hub gets."""
        return self.netloc.encode("ascii")

    @cached_property
    def origin(self) -> bytes:
        return f"https://{self.netloc}".encode("ascii")

    @property
    def base(self) -> str:
        base = "/" + self.base_path.strip("/")
        return base if base == "/" else base + "/"

    @cached_property
    def prefix_bytes(self) -> bytes:
        """:attr:`user_prefix`, as it goes into request paths."""
        return self.user_prefix.encode("ascii")

    @cached_property
    def user_prefix(self) -> str:
        """The hub path of the user's server, always ending in ``/``."""
        prefix = f"{self.base}user/{escape_name(self.user)}/"
        if self.server:
            prefix += f"{escape_name(self.server)}/"
        return prefix

    @cached_property
    def prefix_segments(self) -> list[bytes]:
        """The decoded segments of :attr:`user_prefix`, which every request path is compared with."""
        return _decoded_prefix_segments(self.user_prefix)

    @cached_property
    def root_segments(self) -> list[bytes]:
        """The folder as percent-encoded path segments, as put into request paths."""
        return [quote(part, safe="@~!$&'()*+,;=:").encode("ascii") for part in self.root.split("/") if part]

    @property
    def url(self) -> str:
        return f"https://{self.netloc}{self.base}"

    @property
    def server_url(self) -> str:
        return f"https://{self.netloc}{self.user_prefix}"


def _segments(path: bytes) -> list[bytes]:
    return path.split(b"/")[1:]


def _decoded(segment: bytes) -> bytes:
    return unquote_to_bytes(segment)


# Routes whose remaining path names a file or folder of the server, by first segment: the second
# segment (b"" for a one-segment route, None for any) and whether an empty remaining path means the
# root folder (it does for listings; /nbconvert/FORMAT without a path is the POST that converts a
# notebook sent in the body).
_CONTENTS_ROUTES: dict[bytes, tuple[bytes | None, bool]] = {
    b"api": (b"contents", True),
    b"tree": (b"", True),
    b"lab": (b"tree", True),
    b"files": (b"", False),
    b"view": (b"", False),
    b"edit": (b"", False),
    b"notebooks": (b"", False),
    b"nbconvert": (None, False),
}


def _contents_route(decoded: list[bytes]) -> tuple[int, bool] | None:
    """``(segments in the route, empty path is the root)`` of the contents route a path is on."""
    route = _CONTENTS_ROUTES.get(decoded[0]) if decoded else None
    if route is None:
        return None
    second, empty_is_root = route
    if second == b"":
        return 1, empty_is_root
    if len(decoded) < 2 or second is not None and decoded[1] != second:
        return None
    return 2, empty_is_root


def _at_folder_top(out: list[bytes]) -> bool:
    """Whether ``out`` is a contents route's top: one more '..' would leave the --root folder."""
    route = _contents_route([_decoded(s) for s in out[:2]])
    return route is not None and len(out) <= route[0]


def _normalise(raw_path: bytes, floored: bool = False) -> list[bytes]:
    """
    Resolve dot segments (also percent-encoded ones) the way RFC 3986 5.2.4 does, refusing any that
    would climb above the root instead of clamping: a clamped path would silently mean something
    else than what the client asked for. ``floored`` (with --root) also refuses climbing out of a
    contents route (``/api/contents/..``): that would leave the folder the IDE sees as its root.
    """
    if not raw_path.startswith(b"/"):
        raise Refusal(400, "The request path must start with '/'.", "bad-path")
    if _PERCENT.search(raw_path):
        raise Refusal(400, "The request path has an invalid percent-escape.", "bad-path")
    out: list[bytes] = []
    segments = _segments(raw_path)
    for index, segment in enumerate(segments):
        decoded = _decoded(segment)
        if _FORBIDDEN_DECODED.intersection(decoded):
            raise Refusal(400, "The request path contains control characters.", "bad-path")
        last = index == len(segments) - 1
        if decoded == b".":
            if last:
                out.append(b"")
            continue
        if decoded == b"..":
            if not out:
                raise Refusal(
                    400, "The request path climbs above the server root with '..'.", "bad-path"
                )
            if floored and _at_folder_top(out):
                raise _outside_root()
            out.pop()
            if last:
                out.append(b"")
            continue
        # A segment that only becomes a dot segment once an encoded or back slash is read as a
        # separator is how traversal slips past proxies that decode later than we do.
        parts = decoded.replace(b"\\", b"/").split(b"/")
        if len(parts) > 1 and (b".." in parts or b"." in parts):
            if floored and _leaves_folder(out, parts):
                raise _outside_root()
            raise Refusal(
                400, "The request path hides '..' behind an escaped slash or backslash.", "bad-path"
            )
        out.append(_reencode(segment))
    return out


def _outside_root() -> Refusal:
    return Refusal(400, "The request path climbs out of the --root folder with '..'.", "outside-root")


def _leaves_folder(out: list[bytes], parts: list[bytes]) -> bool:
    """
    Whether ``parts`` (a segment split at its escaped slashes and backslashes), read as segments
    after ``out``, climb out of the --root folder. Such a path is refused either way; with --root
    the IDE's user is told what it would have meant (``outside-root``, widen --root), as for a
    plain ``..``, rather than only that it was written strangely (``bad-path``).
    """
    resolved = list(out)
    for part in parts:
        if part == b"..":
            if not resolved:
                return False  # above the server's root: a bad path, --root or not
            if _at_folder_top(resolved):
                return True
            resolved.pop()
        elif part != b".":
            resolved.append(quote(part, safe="").encode("ascii"))
    return False


def _reencode(segment: bytes) -> bytes:
    """Percent-encode raw non-ASCII bytes, which are not valid in a request line."""
    if segment.isascii():
        return segment
    return quote(segment, safe="/%!$&'()*+,;=:@~-._").encode("ascii")


def _decoded_prefix_segments(prefix: str) -> list[bytes]:
    return [_decoded(s) for s in prefix.encode("ascii").split(b"/")[1:-1]]


def map_request_path(raw_path: bytes, target: HubTarget) -> bytes:
    """
    Map the percent-encoded path of a local request onto the hub.

    ``/X`` becomes ``<user prefix>X``, and with --root a contents path ``/api/contents/X`` becomes
    ``<user prefix>api/contents/<root>/X``. A path already under the user's prefix (however its
    name is escaped) passes as it is, so a browser following JupyterLab's own base URL keeps working.
    ``/hub`` and ``/hub/...`` are refused with 404: the VS Code extension probes ``/hub/api`` and
    gives up on a URL where a hub answers.
    """
    if not target.root and _plain_path(raw_path, target):
        return target.prefix_bytes + raw_path[1:]
    segments = _normalise(raw_path, floored=bool(target.root))
    if segments[:1] == [b"hub"]:
        raise Refusal(
            404,
            "jupyter-dev-server serves your Jupyter server, not the hub: /hub/ is not forwarded.",
            "hub-path",
        )
    inside = _under_prefix(segments, target)
    if inside is not None:
        segments = inside
    elif target.root:
        segments = _into_root(segments, target)
    return target.user_prefix.encode("ascii") + b"/".join(segments)


def _plain_path(raw_path: bytes, target: HubTarget) -> bool:
    """
    Whether :func:`map_request_path` maps ``raw_path`` by putting the prefix in front and nothing
    else (what nearly every request needs; ``test_paths`` checks it against the whole mapping): no
    escape to decode, no byte to re-encode, no segment that starts with a dot, and a first segment
    that is neither ``hub`` nor the prefix's first (a path under the prefix passes as it is).
    """
    if _PLAIN_PATH.fullmatch(raw_path) is None or b"/." in raw_path:
        return False
    first = raw_path[1:].partition(b"/")[0]
    return first != b"hub" and first != target.prefix_segments[0]


def _under_prefix(segments: list[bytes], target: HubTarget) -> list[bytes] | None:
    """The segments after the user's prefix, or ``None`` for a path not under it."""
    prefix = target.prefix_segments
    if [_decoded(s) for s in segments[: len(prefix)]] != prefix:
        return None
    return segments[len(prefix) :] or [b""]


def in_ide_view(raw_path: bytes, target: HubTarget) -> bool:
    """
    Whether a request path that :func:`map_request_path` accepted is in the IDE's view, which
    --root maps, rather than under the user's prefix: the server's own view, which its pages use.
    """
    return _under_prefix(_normalise(raw_path), target) is None


def _into_root(segments: list[bytes], target: HubTarget) -> list[bytes]:
    """Put the --root folder after the contents route a local path is on, if it is on one."""
    route = _contents_route([_decoded(s) for s in segments[:2]])
    if route is None:
        return segments
    length, empty_is_root = route
    rest = segments[length:]
    if rest in ([], [b""]):
        if not empty_is_root:
            return segments
        rest = []
    return segments[:length] + target.root_segments + rest


def _out_of_root(local: bytes, target: HubTarget) -> bytes | None:
    """
    The IDE's path for a server path in local form (the inverse of :func:`_into_root`); ``None``
    for a contents path outside the folder, which the IDE cannot name.
    """
    segments = _segments(local)
    decoded = [_decoded(s) for s in segments]
    route = _contents_route(decoded[:2])
    if route is None:
        return local
    length, empty_is_root = route
    if decoded[length:] in ([], [b""]) and not empty_is_root:
        return local
    root = [_decoded(s) for s in target.root_segments]
    if decoded[length : length + len(root)] != root:
        return None
    return b"/" + b"/".join(segments[:length] + segments[length + len(root) :])


def local_path(hub_path: bytes, target: HubTarget) -> bytes | None:
    """The local path for a hub path under the user's prefix; ``None`` for any other hub path."""
    prefix = target.prefix_bytes
    if hub_path == prefix[:-1]:
        return b"/"
    if hub_path.startswith(prefix):
        return b"/" + hub_path[len(prefix) :]
    segments = hub_path.split(b"/")
    want = target.prefix_segments
    if len(segments) > len(want) and [_decoded(s) for s in segments[1 : len(want) + 1]] == want:
        return b"/" + b"/".join(segments[len(want) + 1 :])
    return None


def map_location(location: bytes, target: HubTarget) -> bytes:
    """
    Map a ``Location`` (or any URL the hub hands out) to what the IDE should follow.

    URLs under the user's prefix, on the hub or path-absolute, become local path-absolute URLs
    (contents URLs relative to the --root folder); other hub URLs, and contents URLs outside the
    folder, become absolute hub URLs, because only the hub can answer them; relative references and
    foreign hosts are left alone: they resolve the same on both sides.
    """
    try:
        parts = urlsplit(location)
    except ValueError:
        return location
    if parts.netloc:
        if parts.scheme not in (b"https", b"wss", b"") or not _is_hub_netloc(parts.netloc, target):
            return location
    elif not parts.path.startswith(b"/"):
        return location
    mapped = local_path(parts.path, target)
    if mapped is not None and target.root:
        mapped = _out_of_root(mapped, target)
    tail = b""
    if parts.query:
        tail += b"?" + parts.query
    if parts.fragment:
        tail += b"#" + parts.fragment
    if mapped is not None:
        return mapped + tail
    return b"https://" + target.netloc.encode("ascii") + parts.path + tail


def _is_hub_netloc(netloc: bytes, target: HubTarget) -> bool:
    host, port = split_authority(netloc.decode("latin-1"))
    return host in {target.host.lower(), target.verify_name} and (port or 443) == target.port


def map_set_cookie(value: bytes, target: HubTarget) -> bytes:
    """
    Re-scope a hub cookie to the local server: its ``Path`` under the user's prefix becomes the
    local path, and its ``Domain`` (the hub's, which a browser would refuse for 127.0.0.1) goes.
    """
    attributes = value.split(b";")
    out = [attributes[0]]
    for attribute in attributes[1:]:
        name, _, val = attribute.strip().partition(b"=")
        lowered = name.lower()
        if lowered == b"domain":
            continue
        if lowered == b"path":
            mapped = local_path(val.strip(), target)
            if mapped is not None:
                attribute = b" Path=" + mapped
        out.append(attribute)
    return b";".join(out)


def split_token(query: bytes) -> tuple[bytes, bytes | None]:
    """
    Take ``token=`` out of a query string, keeping every other parameter byte for byte.

    JupyterHub 5+ ignores ``?token=`` on HTTP requests, so the proxy sends it as a header instead.
    """
    if not query:
        return query, None
    token: bytes | None = None
    kept = []
    for param in query.split(b"&"):
        if param.startswith(b"token="):
            token = _decoded(param[len(b"token=") :])
            continue
        kept.append(param)
    return b"&".join(kept), token


def query_args(query: bytes) -> dict[bytes, list[bytes]]:
    """
    A query string (or urlencoded form) as bytes names to bytes values, blanks kept, bytes as sent.

    ``urllib.parse.parse_qs`` given bytes decodes them as ASCII and encodes its result back the same
    way, so ``?q=%C3%A9`` or ``?next=/lab%ff`` raised in the middle of a request and the client's
    connection was dropped unanswered; a proxy has no reason to read any character set into them.
    """
    args: dict[bytes, list[bytes]] = {}
    for field in query.split(b"&"):
        if not field:
            continue
        name, _, value = field.partition(b"=")
        args.setdefault(unquote_to_bytes(name.replace(b"+", b" ")), []).append(
            unquote_to_bytes(value.replace(b"+", b" "))
        )
    return args


def redact_query(uri: bytes) -> bytes:
    """A request URI fit for a log line: every ``token=`` value replaced."""
    path, sep, query = uri.partition(b"?")
    if not sep:
        return uri
    return path + b"?" + _TOKEN_PARAM.sub(rb"\1token=[redacted]", query)


# A client may name any header in ``Connection``, but not these: in managed mode the proxy puts its
# own ``Authorization`` (the hub token) into the list it then filters, and must not lose it.
_NEVER_HOP_BY_HOP = frozenset({b"authorization", b"host"})


# What every request and every response drops; the headers ``Connection`` names are added to it.
_DROPPED_UPSTREAM = HOP_BY_HOP | {b"host", b"content-length", b"x-forwarded-proto", b"x-forwarded-host"}
_DROPPED_DOWNSTREAM = HOP_BY_HOP | {b"content-length"}


def _lowered(headers: list[tuple[bytes, bytes]], always: frozenset[bytes]) -> tuple[list[bytes], frozenset[bytes]]:
    """
    Each header's name in lower case (computed once for the two passes), and the names to drop:
    ``always`` and the headers named in ``Connection``, hop-by-hop too (RFC 9110 7.6.1).
    """
    names = [name.lower() for name, _ in headers]
    if b"connection" not in names:
        return names, always
    named = set()
    for lowered, (_, value) in zip(names, headers, strict=True):
        if lowered == b"connection":
            named.update(v.strip().lower() for v in value.split(b","))
    return names, always | (named - _NEVER_HOP_BY_HOP)


def upstream_request_headers(
    headers: list[tuple[bytes, bytes]],
    target: HubTarget,
    client_ip: str,
    local_host: bytes | None,
    query_token: bytes | None,
) -> list[tuple[bytes, bytes]]:
    """
    The headers to send to the hub for a client's request: hop-by-hop headers dropped, ``Host`` the
    hub's, a query token turned into ``Authorization`` unless the client sent one, and
    ``X-Forwarded-*`` describing the client's side.
    """
    names, drop = _lowered(headers, _DROPPED_UPSTREAM)
    out: list[tuple[bytes, bytes]] = []
    forwarded_for: list[bytes] = []
    has_authorization = False
    for lowered, header in zip(names, headers, strict=True):
        if lowered in drop:
            continue
        if lowered == b"x-forwarded-for":
            forwarded_for.append(header[1])
            continue
        if lowered == b"authorization":
            has_authorization = True
        out.append(header)
    out.append((b"Host", target.netloc_bytes))
    if query_token is not None and not has_authorization:
        out.append((b"Authorization", b"token " + query_token))
    forwarded_for.append(client_ip.encode("ascii"))
    out.append((b"X-Forwarded-For", b", ".join(forwarded_for)))
    out.append((b"X-Forwarded-Proto", b"http"))
    if local_host:
        out.append((b"X-Forwarded-Host", local_host))
    return out


def map_response_headers(
    headers: list[tuple[bytes, bytes]], target: HubTarget
) -> list[tuple[bytes, bytes]]:
    """The hub's response headers as the IDE should see them: every value kept, prefixes mapped."""
    names, drop = _lowered(headers, _DROPPED_DOWNSTREAM)
    out = []
    for lowered, header in zip(names, headers, strict=True):
        if lowered in drop:
            continue
        if lowered == b"set-cookie":
            header = (header[0], map_set_cookie(header[1], target))
        elif lowered == b"location" or lowered == b"content-location":
            header = (header[0], map_location(header[1], target))
        out.append(header)
    return out


def is_kernelspec_path(local: bytes) -> bool:
    """Kernelspec answers carry ``resources`` URLs under the user's prefix and need mapping."""
    return _KERNELSPEC_PATH.match(local) is not None


# Requests that start a kernel: a new session or kernel, or a restart. A kernel that runs as a batch
# job or a pod is answered only once it runs, which may be many minutes after the request.
_KERNEL_START_PATH = re.compile(rb"^/api/(?:sessions|kernels|kernels/[^/?]+/restart)/?$")


def is_kernel_start(method: bytes, local: bytes) -> bool:
    """Whether a local request (method, path without query) asks the server to start a kernel."""
    return method == b"POST" and _KERNEL_START_PATH.match(local) is not None


def map_kernelspecs_body(body: bytes, target: HubTarget) -> bytes:
    """
    Map the ``resources`` URLs of ``/api/kernelspecs`` or ``/api/kernelspecs/NAME`` to local
    paths. Anything that is not the JSON we expect passes unchanged.
    """
    try:
        document = json.loads(body)
    except ValueError:
        return body
    if not isinstance(document, dict):
        return body
    specs = document.get("kernelspecs")
    changed = False
    for spec in specs.values() if isinstance(specs, dict) else [document]:
        resources = spec.get("resources") if isinstance(spec, dict) else None
        if not isinstance(resources, dict):
            continue
        for key, url in resources.items():
            if isinstance(url, str):
                mapped = map_location(url.encode("utf-8"), target).decode("utf-8")
                changed |= mapped != url
                resources[key] = mapped
    if not changed:
        return body
    return json.dumps(document).encode("utf-8")


# -- --root: contents paths inside JSON bodies -------------------------------------------------

# Bodies are rewritten in memory. A larger answer streams, its leading members mapped on the way
# (ModelHeadMapper); a larger request body that needs mapping is refused (body_too_large_to_map).
MAX_REWRITTEN_BODY = 8 * 1024 * 1024


def body_too_large_to_map(size: int | None) -> Refusal:
    """
    The 413 for a request body whose paths must go into the --root folder but that is too large to
    be read whole: passed unmapped, its server-root paths would reach outside the folder.
    """
    declared = f" ({size} bytes)" if size is not None else ""
    return Refusal(
        413,
        f"With --root the proxy puts the paths in this request's JSON body into the folder, and it reads "
        f"such a body whole, up to {MAX_REWRITTEN_BODY} bytes; this one is larger{declared}.",
        "body-too-large",
        "Renames, copies, sessions, kernels and terminals carry a few paths; check the client that sent this one.",
    )


def parse_root(text: str) -> str:
    """
    The --root folder in :attr:`HubTarget.root` form: ``"/"``-separated, no empty or ``.``
    segments, no leading or trailing ``"/"``; ``""`` for the server's root. Raises ValueError
    with a sentence for a folder that would not be one folder under the server's root.
    """
    parts = [part for part in text.strip().replace("\\", "/").split("/") if part not in ("", ".")]
    if ".." in parts:
        raise ValueError(f"--root {text!r} climbs with '..': give a folder inside your server's root.")
    if any(ord(char) < 0x20 or char == "\x7f" for char in text):
        raise ValueError(f"--root {text!r} contains control characters.")
    return "/".join(parts)


def _refuse_outside(path: str) -> Refusal:
    return Refusal(
        400, f"The path {path!r} climbs out of the --root folder with '..'.", "outside-root"
    )


def path_into_root(path: str, root: str) -> str:
    """
    A contents path as the IDE means it (relative to the folder) as the server means it.
    Dot segments are resolved; one that climbs out of the folder raises :class:`Refusal`.
    """
    if not root:
        return path
    kept: list[str] = []
    for part in path.split("/"):
        if part in ("", "."):
            continue
        if part == ".." or ".." in part.split("\\"):
            if part != ".." or not kept:
                raise _refuse_outside(path)
            kept.pop()
            continue
        kept.append(part)
    return "/".join([root, *kept])


def path_out_of_root(path: str, root: str) -> str:
    """
    A server's contents path as the IDE sees it: relative to the folder. A path outside the folder
    (a session a browser opened elsewhere) is given relative to it too, with ``..``, so the IDE
    never mistakes it for a file in the folder; opening it is then refused.
    """
    if not root:
        return path
    parts = [part for part in path.split("/") if part]
    top = root.split("/")
    common = 0
    while common < min(len(parts), len(top)) and parts[common] == top[common]:
        common += 1
    return "/".join([".."] * (len(top) - common) + parts[common:])


def request_body_kind(method: bytes, local: bytes) -> str | None:
    """
    Which request bodies carry contents paths (local path in the IDE's view): a rename
    (``PATCH /api/contents``, ``path``) or copy (``POST``, ``copy_from``), a session's ``path``
    (``POST/PATCH /api/sessions``), a new terminal's ``cwd``, a new kernel's ``path`` (where
    jupyter_server starts it).
    """
    segments = [_decoded(s) for s in _segments(local)]
    if segments[:2] == [b"api", b"contents"] and method in (b"POST", b"PATCH"):
        return "contents"
    if segments[:2] == [b"api", b"sessions"] and method in (b"POST", b"PATCH"):
        return "sessions"
    if method == b"POST" and segments[2:] in ([], [b""]):
        if segments[:2] == [b"api", b"terminals"]:
            return "terminals"
        if segments[:2] == [b"api", b"kernels"]:
            return "kernels"
    return None


def response_body_kind(method: bytes, local: bytes, rooted: bool) -> str | None:
    """Which JSON answers carry paths to map: kernelspec resource URLs always, models with --root."""
    if method == b"GET" and is_kernelspec_path(local):
        return "kernelspecs"
    if not rooted or method in (b"DELETE", b"HEAD"):
        return None
    segments = [_decoded(s) for s in _segments(local)]
    if segments[:2] == [b"api", b"contents"]:
        return "contents"
    if segments[:2] == [b"api", b"sessions"]:
        return "sessions"
    return None


def _map_fields(document: object, kind: str, into: bool, root: str) -> bool:
    """Map the path fields of one decoded body in place; whether anything changed."""
    mapped = path_into_root if into else path_out_of_root
    items = document if isinstance(document, list) else [document]
    changed = False

    def field(holder: object, key: str) -> None:
        nonlocal changed
        if isinstance(holder, dict) and isinstance(holder.get(key), str):
            new = mapped(holder[key], root)
            changed |= new != holder[key]
            holder[key] = new

    for item in items:
        if not isinstance(item, dict):
            continue
        if kind == "contents":
            field(item, "path")
            field(item, "copy_from")
            if not into and item.get("path") == "" and item.get("type") == "directory":
                item["name"] = ""  # the folder is the IDE's root, which has no name
            if not into and isinstance(item.get("content"), list):
                changed |= _map_fields(item["content"], kind, into, root)
        elif kind == "sessions":
            field(item, "path")
            field(item.get("notebook"), "path")
        elif kind in ("terminals", "kernels"):
            # where it starts: without one (or with null) the server's root, outside the folder
            where = "cwd" if kind == "terminals" else "path"
            if item.get(where) is None:
                item[where] = ""
            field(item, where)
    return changed


def map_request_body(kind: str, body: bytes, target: HubTarget) -> bytes:
    """
    A request body of :func:`request_body_kind` with its paths put under the folder. A body that
    is not the JSON object expected passes unchanged (the server then says what is wrong); a path
    that climbs out of the folder raises :class:`Refusal`. A terminal without ``cwd`` gets the
    folder as its ``cwd``, a kernel without ``path`` the folder as its ``path``.
    """
    if not target.root:
        return body
    if kind in ("terminals", "kernels") and not body.strip():
        body = b"{}"
    try:
        document = json.loads(body)
    except ValueError:
        return body
    if not isinstance(document, dict) or not _map_fields(document, kind, True, target.root):
        return body
    return json.dumps(document).encode("utf-8")


def map_response_body(kind: str, body: bytes, target: HubTarget) -> bytes:
    """
    An answer of :func:`response_body_kind` as the IDE should see it: kernelspec resource URLs
    local, model paths relative to the folder (directory listings' ``content`` included). Anything
    that is not the JSON expected, or needs no change, is returned as it came.
    """
    if kind == "kernelspecs":
        return map_kernelspecs_body(body, target)
    try:
        document = json.loads(body)
    except ValueError:
        return body
    if not _map_fields(document, kind, False, target.root):
        return body
    return json.dumps(document).encode("utf-8")



# A large model's leading members (name, path, dates: jupyter_server writes them before "content")
# arrive within this many bytes.
MODEL_HEAD_LIMIT = 64 * 1024
_DECODER = json.JSONDecoder()
_WHITESPACE = re.compile(r"[ \t\n\r]*")


def _utf8_prefix(head: bytes) -> str | None:
    """``head`` decoded, without a character cut at its end; ``None`` if it is not UTF-8."""
    try:
        return head.decode("utf-8")
    except UnicodeDecodeError as error:
        if error.start < len(head) - 3:
            return None
        return head[: error.start].decode("utf-8")


def map_model_head(head: bytes, target: HubTarget) -> tuple[bytes, int] | None:
    """
    For a contents model too large to rewrite whole: its members before ``content`` mapped as
    :func:`map_response_body` would, as ``(replacement, bytes of head it replaces)``. ``None``
    while ``head`` does not reach ``content`` yet; ``(b"", 0)`` when there is nothing to replace.
    """
    text = _utf8_prefix(head)
    if text is None or text.lstrip(" \t\n\r")[:1] not in ("{", ""):
        return b"", 0
    index = _WHITESPACE.match(text).end() + 1
    members: list[tuple[str, object]] = []
    try:
        while True:
            index = _WHITESPACE.match(text, index).end()
            if text[index : index + 1] == "}":
                return None  # the whole model is in head: the end of the body maps it whole
            key, after = _DECODER.raw_decode(text, index)
            after = _WHITESPACE.match(text, after).end()
            if after >= len(text):
                return None
            if not isinstance(key, str) or text[after] != ":":
                return b"", 0
            if key == "content":
                break
            value, after = _DECODER.raw_decode(text, _WHITESPACE.match(text, after + 1).end())
            members.append((key, value))
            after = _WHITESPACE.match(text, after).end()
            if after >= len(text) or text[after] == "}":
                return None  # more to come, or the whole model is in head: mapped whole at the end
            if text[after] != ",":
                return b"", 0
            index = after + 1
    except ValueError:
        return None  # a member not complete yet
    model = dict(members)
    if not _map_fields(model, "contents", False, target.root):
        return b"", 0
    mapped = "".join(f"{json.dumps(key)}: {json.dumps(value)}, " for key, value in model.items())
    return ("{" + mapped).encode("utf-8"), len(text[:index].encode("utf-8"))


class ModelHeadMapper:
    """
    Maps the head of a large contents model as it streams (``feed``/``flush``, like
    :class:`jds.auth.StreamScrubber`): at most :data:`MODEL_HEAD_LIMIT` bytes are held back.
    """

    def __init__(self, target: HubTarget) -> None:
        self._target = target
        self._held = b""
        self._done = False

    def feed(self, data: bytes) -> bytes:
        if self._done:
            return data
        self._held += data
        found = map_model_head(self._held, self._target)
        if found is None and len(self._held) < MODEL_HEAD_LIMIT:
            return b""
        self._done = True
        held, self._held = self._held, b""
        replacement, replaced = found or (b"", 0)
        return replacement + held[replaced:]

    def flush(self) -> bytes:
        held, self._held = self._held, b""
        return held if self._done else map_response_body("contents", held, self._target)
