"""Operations: ``/`` (index), ``/livez``, ``/readyz``, ``/info``, ``/metrics``, ``/openapi.json``."""
from __future__ import annotations

import platform
from typing import Literal, Optional

import torch
from flask import Blueprint, Response, current_app, redirect, request
from pydantic import Field

from ..errors import error_response
from ..openapi import Reply, build_spec, document
from ..responses import json_response
from ..schemas import Answer, Error
from ..service import current

blueprint = Blueprint("ops", __name__)

PACKAGES = ("torch", "numpy", "pillow", "opencv-python-headless", "flask", "gunicorn", "gevent")
TITLE = "AdaFace embedding service"
VERSION = "1.0.0"


class Index(Answer):
    service: Literal["adaface"]
    model: str
    openapi: str


class Alive(Answer):
    status: Literal["alive"]


class Ready(Answer):
    status: Literal["ready"]
    model: str


class Batching(Answer):
    max_batch: int
    max_wait_ms: float
    max_queue: int


class Defaults(Answer):
    faces: str
    align: str
    max_faces: int
    min_face_size: float
    detect_max_side: int
    verify_threshold: float


class Limits(Answer):
    max_body_bytes: int
    max_pixels: int
    max_images: int


class Int8(Answer):
    served: bool = Field(description="whether the int8 graph answers (else fp32 does)")
    reason: str = Field(description="why: the gate passed, or why int8 was refused")
    threshold: float = Field(description="the gate's lowest accepted cosine (ADAFACE_INT8_MIN_COSINE)")
    min_cosine: Optional[float] = Field(description="the lowest cosine int8 to fp32 over the calibration crops")
    crops: int = Field(description="calibration crops the gate measured")
    cached: bool = Field(description="the graph and the gate's figure came from an earlier start")
    path: Optional[str] = Field(description="the int8 graph file")


class Auth(Answer):
    keys: int = Field(description="API keys configured (the made admin key counts)")
    keyless_scopes: list = Field(description="what a request without a key may do")


class Info(Answer):
    arch: str
    weights: str
    weights_sha256: Optional[str]
    weights_fingerprint: str = Field(description="sha256 over the backbone's tensors: the model a gallery records")
    synthetic: bool
    device: str
    backend: str
    precision: str = Field(description="fp32 or int8: the precision served")
    int8: Optional[Int8] = Field(description="what became of ADAFACE_PRECISION=int8 (null when not asked)")
    embedding_size: int
    max_batch: int
    model: str
    ready: bool
    threads: int
    batching: Batching
    defaults: Defaults
    limits: Limits
    auth: Auth
    versions: dict[str, str]


def _versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version
    found = {"python": platform.python_version()}
    for package in PACKAGES:
        try:
            found[package] = version(package)
        except PackageNotFoundError:
            pass
    return found


@blueprint.get("/")
@document("Service index", {200: Reply("name, model and where this description is", Index)},
          description="A browser (Accept preferring text/html) is sent to the web console at /ui/ (303).")
def index():
    service = current()
    if request.accept_mimetypes.best_match(["application/json", "text/html"]) == "text/html":
        return redirect("/ui/", code=303)       # a browser: the console; API clients keep the JSON
    return json_response({"service": "adaface", "model": service.model, "openapi": "/openapi.json"})


@blueprint.get("/livez")
@document("Liveness: the process answers (never waits for inference)", {200: Reply("alive", Alive)})
def livez():
    return json_response({"status": "alive"})


@blueprint.get("/readyz")
@document("Readiness: the model is loaded and a warm-up embedding succeeded", {200: Reply("ready", Ready)},
          errors=(503,))
def readyz():
    service = current()
    if service.ready:
        weights = {"X-AdaFace-Weights": "synthetic"} if service.extractor.synthetic else {}
        return json_response({"status": "ready", "model": service.model}, headers=weights)
    return error_response(503, "not_ready", service.not_ready_reason, {"Retry-After": "2"})


@blueprint.get("/info")
@document("Model, weights (path and sha256), device, precision, threads, batching, limits, versions",
          {200: Reply("info", Info)}, errors=(401,))
def info():
    service = current()
    s, runner = service.settings, service.runner
    return json_response({
        **service.extractor.info(), "max_batch": runner.max_batch, "model": service.model, "ready": service.ready,
        "threads": torch.get_num_threads(),
        "batching": {"max_batch": runner.max_batch, "max_wait_ms": s.max_wait_ms, "max_queue": s.max_queue},
        "defaults": {"faces": s.faces, "align": s.align, "max_faces": s.max_faces,
                     "min_face_size": s.min_face_size, "detect_max_side": s.detect_max_side,
                     "verify_threshold": s.verify_threshold},
        "limits": {"max_body_bytes": s.max_body_bytes, "max_pixels": s.max_pixels, "max_images": s.max_images},
        "auth": {"keys": len(service.access.ring.keys), "keyless_scopes": sorted(service.access.keyless)},
        "versions": _versions()})


@blueprint.get("/metrics")
@document("Prometheus metrics", {200: Reply("text exposition format", {"type": "string"}, "text/plain")})
def metrics():
    body, content_type = current().metrics.exposition()
    return Response(body, content_type=content_type)


@blueprint.get("/openapi.json")
@document("This description", {200: Reply("OpenAPI 3.1 document", {"type": "object"})})
def openapi():
    service = current()
    if service.openapi is None:
        description = ("Face photos in, 512-d AdaFace IR-101 embeddings out (cosine similarity compares them; "
                       f"default same-person threshold {service.settings.verify_threshold}).")
        service.openapi = build_spec(current_app, TITLE, VERSION, description, Error)
    return json_response(service.openapi)
