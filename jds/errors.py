"""
Errors the proxy answers itself, in the shape Jupyter clients display: ``{"message", "reason"}``.

The IDE shows ``message`` to the user, so it is a sentence about their setup; the log line adds the
``hint`` (which option or page fixes it) once, with the request it concerned, token redacted. That
line is the request's only one (no access line follows it), quotes at most ``QUOTE_LIMIT`` of the
path, and the same refusal of the same request again and again is a few lines and a count
(:func:`log_refusal`): a client with no token at all must not be able to fill the disk.
"""

from __future__ import annotations

import json
from typing import Any

from twisted.logger import Logger
from twisted.web.server import Request

from jds.logs import clip, quoted
from jds.refusal import Refusal

log = Logger(namespace="jds")

__all__ = ["Refusal", "error_body", "log_refusal", "render_refusal", "write_refusal"]


def error_body(message: str, reason: str) -> bytes:
    return json.dumps({"message": message, "reason": reason}).encode("utf-8")


def render_refusal(request: Request, refusal: Refusal) -> bytes:
    """Set up ``request`` for a JSON error and return the body, for ``render`` to return."""
    status, message, reason = refusal.status, refusal.message, refusal.reason
    body = error_body(message, reason)
    request.setResponseCode(status)
    request.responseHeaders.setRawHeaders(b"content-type", [b"application/json; charset=UTF-8"])
    request.responseHeaders.setRawHeaders(b"content-length", [b"%d" % len(body)])
    request.responseHeaders.removeHeader(b"content-encoding")
    # The status page's "last error": the site's Stats, when the request came through one.
    stats = getattr(getattr(request, "site", None), "stats", None)
    if stats is not None:
        stats.error(status, message, reason)
    request.refused = True  # type: ignore[attr-defined]  # the site writes no access line for it
    log_refusal(getattr(request, "site", None), request.method, request.uri, refusal)
    return body


def log_refusal(site: Any, method: bytes, uri: bytes, refusal: Refusal, note: str = "") -> None:
    """
    The one log line of a refused request: its token redacted, what it quotes clipped, and (when
    ``site`` has a ``repeats`` counter) a burst of the same refusal of the same request collapsed.
    """
    fields = {
        "method": clip(method.decode("latin-1"), 32),
        "uri": quoted(uri),
        "status": refusal.status,
        "reason": refusal.reason,
    }
    repeats = getattr(site, "repeats", None)
    if repeats is not None:
        kind = (fields["method"], fields["uri"], refusal.status, refusal.reason, refusal.message)

        def summary(count: int, seconds: float) -> None:
            log.warn(
                "{method} {uri} -> {status}: the same refusal ({reason}) {count} more time(s) in {seconds:.0f} s.",
                count=count, seconds=seconds, **fields,
            )

        if not repeats.first(kind, summary):
            return
    log.warn(
        "{method} {uri} -> {status}: {explanation}{hint}{note}",
        explanation=clip(refusal.message), hint=f" {clip(refusal.hint)}" if refusal.hint else "", note=note, **fields,
    )


def write_refusal(request: Request, refusal: Refusal) -> None:
    """:func:`render_refusal` for a request already handed back as ``NOT_DONE_YET``."""
    if request.finished or getattr(request, "_disconnected", False):
        return
    request.responseHeaders = type(request.responseHeaders)()
    request.write(render_refusal(request, refusal))
    request.finish()
