"""gunicorn's gevent worker, with gunicorn's own error answers in the service's JSON.

gunicorn refuses some requests before the app sees them: a malformed request line or header
(400), a request line over ``limit_request_line`` (414), header fields over
``limit_request_field_size`` or more than ``limit_request_fields`` of them (431), and a few
rarer cases. Its worker writes those as HTML. :class:`JsonGeventWorker` lets gunicorn decide
and log as usual, then writes the same status with ``{"error": {"code", "message"}}``, the body
every error of the app has. ``gunicorn.conf.py`` names it as the worker class.

Nothing here imports Flask: gunicorn's master loads this module to find the worker class.
"""
from __future__ import annotations

import json

from gunicorn import util
from gunicorn.workers.ggevent import GeventWorker

#: code of each status gunicorn answers by itself (``serving.errors.STATUS`` has each code)
GUNICORN_CODES = {400: "bad_request", 403: "forbidden", 414: "uri_too_long", 417: "expectation_failed",
                  431: "headers_too_large", 500: "internal_error", 501: "not_implemented"}
#: characters of gunicorn's description kept in a message (it may quote the request)
MESSAGE_LIMIT = 200


class _Captured:
    """Stands in for the client socket while gunicorn writes its error answer: keeps the bytes,
    and hands every other attribute to the real socket."""

    def __init__(self, client):
        self._client = client
        self.data = b""

    def __getattr__(self, name):
        return getattr(self._client, name)

    def gettimeout(self) -> float:
        return 0.0

    def setblocking(self, flag) -> None:
        pass

    def sendall(self, data: bytes) -> None:
        self.data += data

    def status_line(self):
        """(status, reason) of the answer written, or None if nothing was."""
        first = self.data.split(b"\r\n", 1)[0].decode("latin-1").split(" ", 2)
        if len(first) < 2 or not first[1].isdigit():
            return None
        return int(first[1]), first[2] if len(first) > 2 else ""


def error_message(status: int, reason: str, exc: BaseException) -> str:
    """The message of gunicorn's error: its reason and what the exception says, cut short."""
    if status == 500:
        return "internal server error (logged)"
    detail = str(exc).strip()
    if len(detail) > MESSAGE_LIMIT:
        detail = detail[:MESSAGE_LIMIT] + "..."
    return f"{reason}: {detail}" if detail else reason


def json_answer(status: int, reason: str, code: str, message: str) -> bytes:
    """A complete HTTP/1.1 answer that closes the connection, with a JSON error body."""
    body = json.dumps({"error": {"code": code, "message": message}}).encode()
    head = (f"HTTP/1.1 {status} {reason}\r\nConnection: close\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n")
    return head.encode("latin-1") + body


class JsonGeventWorker(GeventWorker):
    """The gevent worker; requests gunicorn refuses are answered in JSON, with gunicorn's status."""

    def handle_error(self, req, client, addr, exc):
        captured = _Captured(client)
        super().handle_error(req, captured, addr, exc)  # gunicorn logs, and picks the status
        line = captured.status_line()
        if line is None:
            return
        status, reason = line
        answer = json_answer(status, reason, GUNICORN_CODES.get(status, "http_error"),
                             error_message(status, reason, exc))
        try:
            util.write_nonblock(client, answer)
        except Exception:  # the client is gone: nothing more to tell it
            self.log.debug("Failed to send error message.")
