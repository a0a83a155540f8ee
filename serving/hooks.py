"""What runs around every request: access (key, scope, gallery, rate: :mod:`serving.access`),
reading the body (bounded in size and time), the readiness gate, the request metrics, and
handing memory back after large bodies.

Access is checked before a byte of the body is read (on DeepStack's routes, whose clients send
the key as a form field, after at most :data:`PEEK_BYTES` of it), so a client without a key
cannot make the worker hold its upload (what it sends after the answer is discarded as it arrives, by gunicorn,
within its keep-alive timeout).
"""
from __future__ import annotations

import contextlib
import io
import time
from typing import Optional
from urllib.parse import parse_qsl

from flask import Flask, Response, current_app, g, request
from werkzeug.sansio.multipart import Data, Epilogue, Field, File, MultipartDecoder, NeedData

from adaface.threads import gevent_active, start_new_thread

from .access import CALLER_KEY, FORM_KEY_ENDPOINTS, FORM_KEY_FIELDS, presented_key, route_scope
from .errors import ApiError
from .memory import release_free_heap
from .requests import BODY_KEY, JSON_KEY

#: routes that need neither a key nor a loaded model
OPEN_ROUTES = {"/", "/livez", "/readyz", "/metrics", "/openapi.json"}
#: routes that answer before the model is ready (with a key, when keys are set)
BEFORE_READY = OPEN_ROUTES | {"/info"}
#: the web console's pages and files (serving/routes/console.py) also load before the model is ready
CONSOLE_PREFIX = "/ui"
#: methods whose body is read up front; others are labelled as they are in the metrics
BODY_METHODS = ("POST", "PUT", "PATCH")
#: the methods the metrics label by name; any other is ``other`` (a made-up method must not
#: add a series)
KNOWN_METHODS = {"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"}
#: bodies at least this large hand the freed heap back to the system after their answer
LARGE_BODY_BYTES = 8 * 1024 * 1024
READ_BYTES = 1 << 16
#: bytes of a body read to find a key sent in the form (DeepStack's api_key) before the rest
PEEK_BYTES = 1 << 16


def _has_body(environ) -> bool:
    """True when the request declares a body (a length above 0, or chunked)."""
    length = environ.get("CONTENT_LENGTH") or ""
    chunked = "chunked" in environ.get("HTTP_TRANSFER_ENCODING", "").lower()
    return chunked or (length.strip() not in ("", "0"))


def read_body(environ, limit: int, timeout: float) -> int:
    """Read the whole request body before the view runs, so that every view sees it in memory:
    refused past ``limit`` bytes (413) or when it takes over ``timeout`` seconds (408, also when
    the client goes silent), or 400 when it ends early or its chunked encoding is broken.
    Returns its size in bytes; ``wsgi.input`` is then an in-memory stream of it."""
    declared = request.content_length
    if declared is not None and declared > limit:
        raise _body_error(413, "body_too_large", f"the request body is larger than the limit of {limit} bytes")
    want = limit + 1 if declared is None else declared
    chunks, size = _read(environ, environ["wsgi.input"], want, timeout)
    if size > limit:
        raise _body_error(413, "body_too_large", f"the request body is larger than the limit of {limit} bytes")
    if declared is not None and size < declared:
        raise _body_error(400, "bad_request", f"the request body ended after {size} of {declared} bytes")
    body = b"".join(chunks)
    environ[BODY_KEY] = body
    environ["wsgi.input"] = io.BytesIO(body)
    environ["CONTENT_LENGTH"] = str(size)
    environ.pop("wsgi.input_terminated", None)
    environ.pop("HTTP_TRANSFER_ENCODING", None)      # else werkzeug takes the length as unknown: no form
    request.__dict__.pop("content_length", None)     # a cached property, read above
    return size


def _read(environ, stream, want: int, timeout: float) -> tuple:
    """``(chunks, size)``: up to ``want`` bytes of ``stream``, within ``timeout`` seconds (408
    ``body_timeout``, also when the client goes silent); 400 ``bad_request`` when it cannot be read."""
    chunks, size = [], 0
    sock = environ.get("gunicorn.socket")
    previous = sock.gettimeout() if sock is not None else None
    deadline = time.monotonic() + timeout
    try:
        with _deadline(timeout):
            while size < want:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError
                if sock is not None:
                    sock.settimeout(remaining)  # a silent client times out the read itself
                chunk = stream.read(min(READ_BYTES, want - size))
                if not chunk:
                    break
                chunks.append(chunk)
                size += len(chunk)
                _let_others_run()
    except TimeoutError:
        raise _body_error(408, "body_timeout", f"the request body did not arrive within {timeout:g} s") from None
    except ApiError:
        raise
    except Exception as exc:  # noqa: BLE001 - the server's reader: a client that left, a bad chunk size
        raise _body_error(400, "bad_request", f"the request body could not be read: {exc or type(exc).__name__}") from None
    finally:
        if sock is not None:
            sock.settimeout(previous)
    return chunks, size


class _Prefixed(io.RawIOBase):
    """A stream that gives ``prefix`` (bytes already read from ``stream``), then the rest."""

    def __init__(self, prefix: bytes, stream):
        self._prefix, self._stream = memoryview(prefix), stream

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        if self._prefix:
            n = len(self._prefix) if size is None or size < 0 else min(size, len(self._prefix))
            head, self._prefix = bytes(self._prefix[:n]), self._prefix[n:]
            return head
        return self._stream.read(size) if size is not None and size >= 0 else self._stream.read()


def peek_form_key(environ, fields: tuple, limit: int, timeout: float) -> Optional[str]:
    """The first non-empty value of the form ``fields`` (DeepStack's ``api_key``) in the body's
    first ``limit`` bytes, or None: a key sent in the body is found before the rest of the body
    is accepted, so a client without a valid key makes the worker hold at most ``limit`` bytes.
    Multipart text fields before the first file are read (clients put their fields first), and
    ``application/x-www-form-urlencoded`` pairs. ``wsgi.input`` then gives the bytes read again."""
    declared = request.content_length
    want = limit if declared is None else min(limit, declared)
    chunks, _ = _read(environ, environ["wsgi.input"], want, timeout)
    prefix = b"".join(chunks)
    environ["wsgi.input"] = _Prefixed(prefix, environ["wsgi.input"])
    complete = len(prefix) < want or (declared is not None and len(prefix) >= declared)
    if request.mimetype == "multipart/form-data":
        found = form_fields(prefix, request.mimetype_params.get("boundary", ""), fields)
    elif request.mimetype == "application/x-www-form-urlencoded":
        text = prefix if complete else prefix[:prefix.rfind(b"&") + 1]
        found = {k: v for k, v in parse_qsl(text.decode("latin-1"), keep_blank_values=True) if k in fields}
    else:
        return None
    return next((found[f] for f in fields if found.get(f)), None)


def form_fields(data: bytes, boundary: str, fields: tuple) -> dict:
    """The text ``fields`` of a multipart body's start ``data``, up to its first file part."""
    found, name, value = {}, None, []
    if not boundary:
        return found
    decoder = MultipartDecoder(boundary.encode("latin-1", "replace"))
    decoder.receive_data(data)
    try:
        while True:
            event = decoder.next_event()
            if isinstance(event, (NeedData, Epilogue, File)):
                return found
            if isinstance(event, Field):
                name, value = event.name, []
            elif isinstance(event, Data) and name in fields:
                value.append(event.data)
                if not event.more_data:
                    found[name] = b"".join(value).decode("utf-8", "replace").strip()
    except ValueError:          # a malformed part: what was found before it
        return found


def _let_others_run() -> None:
    """Under gevent, let the other greenlets run between two reads: on a fast link the reads of
    a large body never wait for the socket, and would hold the event loop until the end."""
    if gevent_active():
        import gevent
        gevent.sleep(0)


def _deadline(seconds: float):
    """Under gevent, a timer that interrupts the reading greenlet after ``seconds`` with
    TimeoutError: a client that sends a byte now and then never times out a single read, whose
    loop waits for all it asked for. Elsewhere the socket's own timeout bounds each read."""
    if not gevent_active():
        return contextlib.nullcontext()
    import gevent
    return gevent.Timeout(seconds, TimeoutError)


def _body_error(status: int, code: str, message: str) -> ApiError:
    """An error answered before the body was read through."""
    return ApiError(status, code, message)


def _release_heap_later() -> None:
    """``malloc_trim`` in a native thread of its own: with a large heap it takes a while, and
    the answer's greenlet is on the event loop."""
    start_new_thread(release_free_heap, ())


def method_label(method: str) -> str:
    """The metrics label of an HTTP method: its name if standard, else ``other``."""
    return method if method in KNOWN_METHODS else "other"


def install(app: Flask, service) -> None:
    """Add the before- and after-request hooks for ``service`` to ``app``."""
    settings = service.settings

    @app.before_request
    def _begin():
        g.started = time.perf_counter()
        scope = route_scope(current_app, request)
        if scope is not None:
            g.caller_label = "refused"                  # until the key is found
            in_form = None
            if (request.endpoint in FORM_KEY_ENDPOINTS and request.method in BODY_METHODS
                    and presented_key(request.headers) is None and _has_body(request.environ)):
                in_form = peek_form_key(request.environ, FORM_KEY_FIELDS, PEEK_BYTES, settings.body_timeout)
            g.caller = service.access.caller(request.headers, request.remote_addr or "", in_form)
            g.caller_label = request.environ[CALLER_KEY] = g.caller.name
            service.access.check(g.caller, scope, (request.view_args or {}).get("gallery"))
        if request.method == "OPTIONS":
            return
        if request.method in BODY_METHODS and _has_body(request.environ):
            g.body_bytes = read_body(request.environ, settings.max_body_bytes, settings.body_timeout)
        if not service.ready and request.path not in BEFORE_READY and not _is_console(request.path):
            raise ApiError(503, "not_ready", service.not_ready_reason, headers={"Retry-After": "2"})

    @app.after_request
    def _finish(response: Response):
        rule = request.url_rule.rule if request.url_rule else "unmatched"
        started = g.get("started", time.perf_counter())
        service.metrics.observe_request(rule, method_label(request.method), response.status_code,
                                        time.perf_counter() - started, g.get("caller_label", "open"))
        if response.status_code >= 400:
            service.metrics.observe_error(g.get("error_code") or "http_error", response.status_code)
        if g.get("body_bytes", 0) >= LARGE_BODY_BYTES:
            response.call_on_close(_release_heap_later)
        return response

    @app.teardown_request
    def _drop_body(_exc):
        if g.get("body_bytes", 0) >= LARGE_BODY_BYTES:
            request.environ["wsgi.input"] = io.BytesIO()  # the body goes with the request
            request.environ.pop(BODY_KEY, None)
            request.environ.pop(JSON_KEY, None)


def _is_console(path: str) -> bool:
    return path == CONSOLE_PREFIX or path.startswith(CONSOLE_PREFIX + "/")
