"""What runs around every request: the chunked-body bound, the API-key check, the readiness
gate, and the request metrics."""
from __future__ import annotations

import io
import time

from flask import Flask, Response, g, request

from .errors import ApiError

#: routes that need neither a key nor a loaded model
OPEN_ROUTES = {"/", "/livez", "/readyz", "/metrics", "/openapi.json"}
#: routes that answer before the model is ready (with a key, when keys are set)
BEFORE_READY = OPEN_ROUTES | {"/info"}


def bound_chunked_body(limit: int) -> None:
    """Read a body sent without Content-Length (chunked) up front, refusing it past ``limit``.

    Werkzeug stops reading such a body at the limit without an error, which would hand a
    truncated image on; reading it here gives the same 413 a declared length gets.
    """
    environ = request.environ
    if request.content_length is not None or environ.get("REQUEST_METHOD") not in ("POST", "PUT", "PATCH"):
        return
    stream, chunks, size = environ["wsgi.input"], [], 0
    while True:
        chunk = stream.read(min(1 << 16, limit + 1 - size))
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
        if size > limit:
            raise ApiError(413, "body_too_large", f"the request body is larger than the limit of {limit} bytes")
    environ["wsgi.input"] = io.BytesIO(b"".join(chunks))
    environ["CONTENT_LENGTH"] = str(size)
    environ.pop("wsgi.input_terminated", None)


def install(app: Flask, service) -> None:
    """Add the before- and after-request hooks for ``service`` to ``app``."""

    @app.before_request
    def _begin():
        g.started = time.perf_counter()
        bound_chunked_body(service.settings.max_body_bytes)
        if request.method == "OPTIONS":
            return
        if request.path not in OPEN_ROUTES and not service.auth.allows(request.headers):
            raise ApiError(401, "unauthorized", "a valid API key is required "
                           "(Authorization: Bearer <key>, or X-API-Key: <key>)",
                           headers={"WWW-Authenticate": "Bearer"})
        if request.path not in BEFORE_READY and not service.ready:
            raise ApiError(503, "not_ready", service.not_ready_reason, headers={"Retry-After": "2"})

    @app.after_request
    def _finish(response: Response):
        rule = request.url_rule.rule if request.url_rule else "unmatched"
        started = g.get("started", time.perf_counter())
        service.metrics.observe_request(rule, request.method, response.status_code, time.perf_counter() - started)
        return response
