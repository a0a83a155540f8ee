"""The error model of the HTTP service: every error is JSON ``{"error": {"code", "message"}}``.

Library errors carry a stable ``code`` and no status (:mod:`adaface.errors`, the decoder's,
the galleries'); :data:`STATUS` maps each code to its HTTP status, here only. :class:`ApiError`
is the service's own error, with its status. Werkzeug's HTTP errors are mapped; anything else
is a bug: logged with its traceback and answered as a bare 500 with no detail.
"""
from __future__ import annotations

import logging

from flask import Flask, request
from werkzeug.exceptions import HTTPException

from adaface.errors import code_of

from .responses import error_response, image_entry

logger = logging.getLogger(__name__)

#: HTTP status of every error code a client can cause (the README's error table)
STATUS = {
    # the request
    "bad_request": 400, "empty_body": 400, "bad_base64": 400, "not_an_image": 400, "truncated_image": 400,
    "bad_image": 400, "bad_json": 400, "bad_option": 400, "no_image": 400, "need_two_images": 400,
    "one_image_only": 400, "bad_name": 400, "bad_metadata": 400,
    "unauthorized": 401,
    "forbidden": 403,
    "not_found": 404, "gallery_not_found": 404, "identity_not_found": 404, "face_not_found": 404,
    "crop_not_found": 404,
    "method_not_allowed": 405,
    "body_timeout": 408,
    "gallery_exists": 409, "identity_exists": 409, "conflict": 409, "model_mismatch": 409,
    "body_too_large": 413, "image_too_large": 413, "too_many_images": 413, "form_too_large": 413,
    "uri_too_long": 414,
    "unsupported_format": 415, "unsupported_media_type": 415,
    "expectation_failed": 417,
    "rate_limited": 429,
    "headers_too_large": 431,
    # the image
    "no_face": 422, "not_aligned": 422,
    # the server's state
    "not_ready": 503, "busy": 503, "store_unavailable": 503, "unavailable": 503,
    "internal_error": 500, "not_implemented": 501,
}
#: code for werkzeug's own HTTP errors, by status
HTTP_CODES = {400: "bad_request", 401: "unauthorized", 404: "not_found", 405: "method_not_allowed",
              413: "body_too_large", 415: "unsupported_media_type", 503: "unavailable"}


class ApiError(Exception):
    """An error for the client, with its HTTP status and a short machine-readable code."""

    def __init__(self, status: int, code: str, message: str, headers=None):
        super().__init__(message)
        self.status, self.code, self.message = status, code, message
        self.headers = headers or {}


def client_error(exc: BaseException):
    """(status, code, message) of an exception a client caused, or None for anything else (a bug)."""
    if isinstance(exc, ApiError):
        return exc.status, exc.code, exc.message
    code = code_of(exc)
    if code is None or code not in STATUS or code == "internal_error":
        return None
    return STATUS[code], code, getattr(exc, "message", None) or str(exc)


def error_entry(exc: Exception) -> dict:
    """One input's error inside a batch answer: ``{"error": {"code", "message", "status"}}``;
    an exception no client causes is re-raised."""
    known = client_error(exc)
    if known is None:
        raise exc
    status, code, message = known
    return {"error": {"code": code, "message": message, "status": status}}


def entry_or_error(result) -> dict:
    """A batch answer's entry for one :class:`adaface.faces.ImageFaces`: its image entry, or its
    error (no face included)."""
    failure = result.failure()
    return error_entry(failure) if failure is not None else image_entry(result)


def codes_for(status: int) -> list:
    """The codes answered with ``status``, sorted (for the OpenAPI descriptions)."""
    return sorted(code for code, s in STATUS.items() if s == status)


def _too_large(app: Flask) -> tuple:
    """(code, message) of werkzeug's 413: the body is read and bounded before any view runs,
    so within the body limit it is the multipart parser's own limits."""
    limit = app.config.get("MAX_CONTENT_LENGTH")
    if request.content_length is not None and limit is not None and request.content_length <= limit:
        return "form_too_large", (f"the multipart form has more than {app.config.get('MAX_FORM_PARTS')} parts "
                                  f"or a text field over {app.config.get('MAX_FORM_MEMORY_SIZE')} bytes")
    return "body_too_large", f"the request body is larger than the limit of {limit} bytes"


def register(app: Flask) -> None:
    """Install the JSON error handlers on ``app``."""

    @app.errorhandler(HTTPException)
    def _http_error(exc: HTTPException):
        status = exc.code or 500
        message = exc.description or exc.name
        code = HTTP_CODES.get(status, "http_error")
        if status == 413:
            code, message = _too_large(app)
        response = error_response(status, code, message)
        if status == 405 and exc.valid_methods:
            response.headers["Allow"] = ", ".join(exc.valid_methods)
        return response

    @app.errorhandler(Exception)
    def _error(exc: Exception):
        known = client_error(exc)
        if known:
            return error_response(*known, headers=getattr(exc, "headers", None))
        logger.exception("unhandled error")
        return error_response(500, "internal_error", "internal server error (logged)")
