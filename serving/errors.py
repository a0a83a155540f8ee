"""JSON errors: ``{"error": {"code": "...", "message": "..."}}`` with the right HTTP status.

Every exception a client can cause carries ``code`` and ``status`` (ours, the image decoder's and
the extractor's); werkzeug's HTTP errors are mapped; anything else is a bug: logged with its
traceback and answered as a bare 500 with no detail.
"""
import logging

from flask import Flask, Response
from werkzeug.exceptions import HTTPException

import orjson

logger = logging.getLogger(__name__)

HTTP_CODES = {400: "bad_request", 401: "unauthorized", 404: "not_found", 405: "method_not_allowed",
              413: "body_too_large", 415: "unsupported_media_type", 503: "unavailable"}


class ApiError(Exception):
    """An error for the client, with its HTTP status and a short machine-readable code."""

    def __init__(self, status: int, code: str, message: str, headers=None):
        super().__init__(message)
        self.status, self.code, self.message = status, code, message
        self.headers = headers or {}


def json_response(payload, status: int = 200, headers=None) -> Response:
    """Serialise with orjson (NumPy arrays written natively, float32 as shortest float32 text)."""
    body = orjson.dumps(payload, option=orjson.OPT_SERIALIZE_NUMPY)
    return Response(body, status=status, mimetype="application/json", headers=headers)


def error_payload(code: str, message: str) -> dict:
    return {"error": {"code": code, "message": message}}


def error_response(status: int, code: str, message: str, headers=None) -> Response:
    return json_response(error_payload(code, message), status, headers)


def client_error(exc: Exception):
    """(status, code, message) of an exception a client caused, or None for anything else."""
    status, code = getattr(exc, "status", None), getattr(exc, "code", None)
    if isinstance(status, int) and 400 <= status < 600 and isinstance(code, str):
        return status, code, getattr(exc, "message", None) or str(exc)
    return None


def register(app: Flask) -> None:
    """Install the JSON error handlers on ``app``."""

    @app.errorhandler(ApiError)
    def _api_error(exc: ApiError):
        return error_response(exc.status, exc.code, exc.message, exc.headers)

    @app.errorhandler(HTTPException)
    def _http_error(exc: HTTPException):
        status = exc.code or 500
        message = exc.description or exc.name
        if status == 413:
            message = f"the request body is larger than the limit of {app.config.get('MAX_CONTENT_LENGTH')} bytes"
        response = error_response(status, HTTP_CODES.get(status, "http_error"), message)
        if status == 405 and exc.valid_methods:
            response.headers["Allow"] = ", ".join(exc.valid_methods)
        return response

    @app.errorhandler(Exception)
    def _unexpected(exc: Exception):
        known = client_error(exc)
        if known:
            return error_response(*known)
        logger.exception("unhandled error")
        return error_response(500, "internal_error", "internal server error (logged)")
