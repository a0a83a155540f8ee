"""The AdaFace embedding service: Flask app, served by gunicorn with gevent workers.

    gunicorn -c gunicorn.conf.py flask_http_server:app                  # tuned defaults
    gunicorn --worker-class gevent -b 0.0.0.0:30035 --timeout 300 flask_http_server:app
    python flask_http_server.py                                         # development server

``create_app(config=None)`` builds an app (tests pass their own settings); the module attribute
``app`` is created from the ``ADAFACE_*`` environment on first access, which is when gunicorn
imports it, so the model is loaded once per worker before it serves.

Routes: the original service's ``/b64_represent_json``, ``/byte_represent_json``,
``/b64_represent_byte``, ``/byte_represent_byte``; ``/represent_json``, ``/represent_bytes``;
``/v1/embed``, ``/v1/verify``; ``/livez``, ``/readyz``, ``/info``, ``/metrics``, ``/openapi.json``.
"""
from __future__ import annotations

import io
import logging
import platform
import sys
import time

import numpy as np
import torch
from flask import Flask, Response, g, request

import net
from AdaFaceFeature import EMBEDDING_SIZE, AdaFaceFeature, NoFaceError
from config import Settings, SettingsError
from serving import errors, gallery_routes, memory, openapi, payload
from serving.auth import ApiKeyAuth
from serving.errors import ApiError, error_response, json_response
from serving.metrics import Metrics
from serving.native import start_new_thread
from serving.runner import InferenceRunner

logger = logging.getLogger("adaface")

OPEN_ROUTES = {"/", "/livez", "/readyz", "/metrics", "/openapi.json"}
OCTET = "application/octet-stream"


class Service:
    """What the routes share: settings, extractor, runner, metrics, auth and readiness."""

    def __init__(self, settings: Settings, extractor: AdaFaceFeature):
        self.settings = settings
        self.extractor = extractor
        self.metrics = Metrics()
        self.runner = InferenceRunner(extractor, settings, self.metrics)
        self.auth = ApiKeyAuth(settings.api_key_list())
        self.model = f"adaface-{extractor.arch}"
        self.ready = False
        self.not_ready_reason = "warming up: running the first embedding"

    def start_warm_up(self) -> None:
        if not self.settings.warmup:
            self.ready = True
            return
        start_new_thread(self._warm_up, ())

    def _warm_up(self) -> None:
        try:
            began = time.perf_counter()
            self.runner.warm_up()
            logger.info("warm-up embedding done in %.2f s; ready", time.perf_counter() - began)
            self.ready = True
        except Exception as exc:  # the reason is served by /readyz
            logger.exception("warm-up failed")
            self.not_ready_reason = f"warm-up failed: {exc}"

    def embedding_headers(self, face=None) -> dict:
        headers = {"X-Embedding-Dim": str(EMBEDDING_SIZE)}
        if face is not None:
            headers["X-Embedding-Norm"] = f"{face.norm:.4f}"
            if face.box is not None:
                headers["X-Face-Box"] = ",".join(f"{v:.1f}" for v in face.box)
        if self.extractor.synthetic:
            headers["X-AdaFace-Weights"] = "synthetic"
        return headers


def _settings_from(config) -> Settings:
    if isinstance(config, Settings):
        return config
    return Settings.from_env(**(config or {}))


def create_app(config: Settings | dict | None = None, extractor: AdaFaceFeature | None = None) -> Flask:
    """Build the app: ``config`` is a :class:`Settings`, a dict of overrides of the environment's
    settings, or None (the environment alone). ``extractor`` reuses an already-loaded model."""
    settings = _settings_from(config)
    memory.limit_arenas(settings.malloc_arenas)
    memory.set_onednn_cache(settings.onednn_cache)  # before the model's first convolution
    if settings.threads > 0:
        torch.set_num_threads(settings.threads)
    extractor = extractor or AdaFaceFeature.from_settings(settings)
    app = Flask(__name__)
    app.config["MAX_CONTENT_LENGTH"] = settings.max_body_bytes
    service = Service(settings, extractor)
    app.extensions["adaface"] = service
    errors.register(app)
    _install_hooks(app, service)
    _compat_routes(app, service)
    _v1_routes(app, service)
    _ops_routes(app, service)
    gallery_routes.register(app, service)
    service.start_warm_up()
    return app


def _bound_chunked_body(limit: int) -> None:
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


def _install_hooks(app: Flask, service: Service) -> None:
    @app.before_request
    def _begin():
        g.started = time.perf_counter()
        _bound_chunked_body(service.settings.max_body_bytes)
        if request.method == "OPTIONS":
            return
        if request.path not in OPEN_ROUTES and not service.auth.allows(request.headers):
            raise ApiError(401, "unauthorized", "a valid API key is required "
                           "(Authorization: Bearer <key>, or X-API-Key: <key>)",
                           headers={"WWW-Authenticate": "Bearer"})
        if request.path not in OPEN_ROUTES and request.path != "/info" and not service.ready:
            raise ApiError(503, "not_ready", service.not_ready_reason, headers={"Retry-After": "2"})

    @app.after_request
    def _finish(response: Response):
        rule = request.url_rule.rule if request.url_rule else "unmatched"
        started = g.get("started", time.perf_counter())
        service.metrics.observe_request(rule, request.method, response.status_code, time.perf_counter() - started)
        return response


# -- embedding helpers ---------------------------------------------------------------------------

def _one(service: Service, data) -> object:
    """Embed one input with the request's options; raises its client error, or NoFaceError."""
    result = service.runner.embed([data], payload.embed_options(request.args, service.settings))[0]
    if isinstance(result, Exception):
        raise result
    if not result.faces:
        raise NoFaceError()
    return result


def _compat_json(service: Service, data) -> Response:
    face = _one(service, data).faces[0]
    return json_response([face.embedding], headers=service.embedding_headers(face))


def _compat_bytes(service: Service, data) -> Response:
    face = _one(service, data).faces[0]
    body = np.ascontiguousarray(face.embedding, dtype="<f4").tobytes()
    return Response(body, mimetype=OCTET, headers=service.embedding_headers(face))


def _body() -> bytes:
    return request.get_data(cache=False)


def _compat_routes(app: Flask, service: Service) -> None:
    """The original service's endpoints: the body is the image; the answer is the primary face."""
    app.add_url_rule("/b64_represent_json", "b64_represent_json",
                     lambda: _compat_json(service, _body()), methods=["POST"])
    app.add_url_rule("/byte_represent_json", "byte_represent_json",
                     lambda: _compat_json(service, _body()), methods=["POST"])
    app.add_url_rule("/b64_represent_byte", "b64_represent_byte",
                     lambda: _compat_bytes(service, _body()), methods=["POST"])
    app.add_url_rule("/byte_represent_byte", "byte_represent_byte",
                     lambda: _compat_bytes(service, _body()), methods=["POST"])

    def single_input():
        inputs, batch = payload.image_inputs(request, service.settings.max_images)
        if batch:
            raise ApiError(400, "one_image_only", "this endpoint embeds one image; send batches to /v1/embed")
        return inputs[0]

    app.add_url_rule("/represent_json", "represent_json",
                     lambda: _compat_json(service, single_input()), methods=["POST"])
    app.add_url_rule("/represent_bytes", "represent_bytes",
                     lambda: _compat_bytes(service, single_input()), methods=["POST"])


# -- /v1 ---------------------------------------------------------------------------------------

def _image_entry(result) -> dict:
    return {"width": result.width, "height": result.height, "aligned_input": result.aligned,
            "faces": [f.to_dict() for f in result.faces]}


def _entry_or_error(result) -> dict:
    if isinstance(result, Exception):
        status, code, message = errors.client_error(result)
        return {"error": {"code": code, "message": message, "status": status}}
    if not result.faces:
        return {"error": {"code": NoFaceError.code, "message": str(NoFaceError()), "status": NoFaceError.status}}
    return _image_entry(result)


def _wants_bytes() -> bool:
    """True when the client asks for octet-stream explicitly, at least as much as for JSON."""
    quality = {mime: q for mime, q in request.accept_mimetypes}
    return quality.get(OCTET, 0) > 0 and quality.get(OCTET, 0) >= quality.get("application/json", 0)


def _packed(service: Service, results: list) -> Response:
    faces = [f for r in results if not isinstance(r, Exception) for f in r.faces]
    counts = [0 if isinstance(r, Exception) else len(r.faces) for r in results]
    matrix = np.stack([f.embedding for f in faces]) if faces else np.zeros((0, EMBEDDING_SIZE), np.float32)
    headers = service.embedding_headers()
    headers.update({"X-Embedding-Count": str(len(faces)), "X-Faces-Per-Image": ",".join(map(str, counts))})
    return Response(np.ascontiguousarray(matrix, dtype="<f4").tobytes(), mimetype=OCTET, headers=headers)


def _embed_route(service: Service) -> Response:
    inputs, batch = payload.image_inputs(request, service.settings.max_images)
    options = payload.embed_options(request.args, service.settings)
    results = service.runner.embed(inputs, options)
    if not batch:
        result = results[0]
        if isinstance(result, Exception):
            raise result
        if not result.faces:
            raise NoFaceError()
    if _wants_bytes():
        return _packed(service, results)
    head = {"model": service.model, "dim": EMBEDDING_SIZE}
    if batch:
        return json_response({**head, "results": [_entry_or_error(r) for r in results]},
                             headers=service.embedding_headers())
    face = results[0].faces[0]
    return json_response({**head, **_image_entry(results[0])}, headers=service.embedding_headers(face))


def _verify_route(service: Service) -> Response:
    inputs = payload.pair_inputs(request)
    threshold = payload.threshold_arg(request.args, service.settings.verify_threshold)
    options = payload.embed_options(request.args, service.settings)
    if options["faces"] == "all":
        options["faces"] = "largest"
    results = service.runner.embed(inputs, options)
    for i, result in enumerate(results, start=1):
        if isinstance(result, Exception):
            status, code, message = errors.client_error(result)
            raise ApiError(status, code, f"image{i}: {message}")
        if not result.faces:
            raise ApiError(NoFaceError.status, NoFaceError.code, f"image{i}: no face was found")
    a, b = results[0].faces[0], results[1].faces[0]
    similarity = float(np.dot(a.embedding, b.embedding))
    faces = [{"norm": f.norm, "box": None if f.box is None else np.round(f.box, 2), "score": f.score} for f in (a, b)]
    return json_response({"model": service.model, "similarity": similarity,
                          "same_person": similarity >= threshold, "threshold": threshold, "faces": faces},
                         headers=service.embedding_headers())


def _v1_routes(app: Flask, service: Service) -> None:
    app.add_url_rule("/v1/embed", "v1_embed", lambda: _embed_route(service), methods=["POST"])
    app.add_url_rule("/v1/verify", "v1_verify", lambda: _verify_route(service), methods=["POST"])


# -- operations ----------------------------------------------------------------------------------

def _versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version
    found = {"python": platform.python_version()}
    for package in ("torch", "numpy", "pillow", "opencv-python-headless", "flask", "gunicorn", "gevent"):
        try:
            found[package] = version(package)
        except PackageNotFoundError:
            pass
    return found


def _info(service: Service) -> dict:
    s, runner = service.settings, service.runner
    return {**service.extractor.info(), "model": service.model, "ready": service.ready,
            "threads": torch.get_num_threads(),
            "batching": {"max_batch": runner.max_batch, "max_wait_ms": s.max_wait_ms, "max_queue": s.max_queue},
            "defaults": {"faces": s.faces, "align": s.align, "max_faces": s.max_faces,
                         "min_face_size": s.min_face_size, "detect_max_side": s.detect_max_side,
                         "verify_threshold": s.verify_threshold},
            "limits": {"max_body_bytes": s.max_body_bytes, "max_pixels": s.max_pixels, "max_images": s.max_images},
            "auth": service.auth.enabled, "versions": _versions()}


def _ops_routes(app: Flask, service: Service) -> None:
    app.add_url_rule("/", "index", lambda: json_response(
        {"service": "adaface", "model": service.model, "openapi": "/openapi.json"}), methods=["GET"])
    app.add_url_rule("/livez", "livez", lambda: json_response({"status": "alive"}), methods=["GET"])

    def readyz():
        if service.ready:
            return json_response({"status": "ready", "model": service.model})
        return error_response(503, "not_ready", service.not_ready_reason, {"Retry-After": "2"})

    def metrics():
        body, content_type = service.metrics.exposition()
        return Response(body, content_type=content_type)

    app.add_url_rule("/readyz", "readyz", readyz, methods=["GET"])
    app.add_url_rule("/info", "info", lambda: json_response(_info(service)), methods=["GET"])
    app.add_url_rule("/metrics", "metrics", metrics, methods=["GET"])
    app.add_url_rule("/openapi.json", "openapi", lambda: json_response(openapi.spec(service.settings)),
                     methods=["GET"])


# -- entry points ----------------------------------------------------------------------------------

def _app_from_environment() -> Flask:
    """Create the app from ``ADAFACE_*``; on missing or bad weights, say why and exit at once."""
    try:
        settings = Settings.from_env()
    except SettingsError as exc:
        logger.error("%s", exc)
        sys.exit(4)  # gunicorn's "application failed to load": the master stops instead of retrying
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return create_app(settings)
    except (net.WeightsError, ValueError) as exc:
        logger.error("cannot start: %s", exc)
        sys.exit(4)


def __getattr__(name: str):
    """``flask_http_server.app`` is built on first access (gunicorn's import), not on import."""
    if name == "app":
        globals()["app"] = _app_from_environment()
        return globals()["app"]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


if __name__ == "__main__":
    import os
    port = int(os.environ.get("PORT", "30035"))
    _app_from_environment().run(host="0.0.0.0", port=port, threaded=True)
