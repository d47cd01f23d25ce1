"""
Errors the proxy answers itself, in the shape Jupyter clients display: ``{"message", "reason"}``.

The IDE shows ``message`` to the user, so it is a sentence about their setup; the log line adds the
``hint`` (which option or page fixes it) once, with the request it concerned, token redacted.
"""

from __future__ import annotations

import json

from twisted.logger import Logger
from twisted.web.server import Request

from jds.paths import redact_query
from jds.refusal import Refusal

log = Logger(namespace="jds")

__all__ = ["Refusal", "error_body", "render_refusal", "write_refusal"]


def error_body(message: str, reason: str) -> bytes:
    return json.dumps({"message": message, "reason": reason}).encode("utf-8")


def render_refusal(request: Request, refusal: Refusal) -> bytes:
    """Set up ``request`` for a JSON error and return the body, for ``render`` to return."""
    status, message, reason, hint = refusal.status, refusal.message, refusal.reason, refusal.hint
    body = error_body(message, reason)
    request.setResponseCode(status)
    request.responseHeaders.setRawHeaders(b"content-type", [b"application/json; charset=UTF-8"])
    request.responseHeaders.setRawHeaders(b"content-length", [b"%d" % len(body)])
    request.responseHeaders.removeHeader(b"content-encoding")
    # The status page's "last error": the site's Stats, when the request came through one.
    stats = getattr(getattr(request, "site", None), "stats", None)
    if stats is not None:
        stats.error(status, message, reason)
    log.warn(
        "{method} {uri} -> {status}: {message}{hint}",
        method=request.method.decode("latin-1"),
        uri=redact_query(request.uri).decode("latin-1"),
        status=status,
        message=message,
        hint=f" {hint}" if hint else "",
    )
    return body


def write_refusal(request: Request, refusal: Refusal) -> None:
    """:func:`render_refusal` for a request already handed back as ``NOT_DONE_YET``."""
    if request.finished or getattr(request, "_disconnected", False):
        return
    request.responseHeaders = type(request.responseHeaders)()
    request.write(render_refusal(request, refusal))
    request.finish()
