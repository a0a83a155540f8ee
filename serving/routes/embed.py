"""``/v1/embed`` (one image or a batch, JSON or packed float32) and ``/v1/verify`` (two photos,
same person?)."""
from __future__ import annotations

import base64

import numpy as np
from flask import Blueprint, Response, request

from adaface.options import EMBEDDING_SIZE
from gallery.reembed import crop_png

from .. import requests
from ..errors import ApiError, client_error, entry_or_error
from ..openapi import Reply, document
from ..responses import OCTET, image_entry, json_response, packed_embeddings
from ..schemas import (BASE64_IMAGE, EMBEDDING_HEADERS, FILES, FLOAT32_BYTES, RAW_IMAGE, EmbedAnswer,
                       EmbedCropQuery, EmbedRequest, Verification, VerifyQuery, VerifyRequest)
from ..service import current

blueprint = Blueprint("embed", __name__)

ERRORS = (400, 401, 413, 415, 422, 503)


def _wants_bytes() -> bool:
    """True when the client asks for octet-stream explicitly, at least as much as for JSON."""
    quality = {mime: q for mime, q in request.accept_mimetypes}
    return quality.get(OCTET, 0) > 0 and quality.get(OCTET, 0) >= quality.get("application/json", 0)


def _packed(service, results: list) -> Response:
    body, counts = packed_embeddings(results)
    headers = service.embedding_headers()
    headers.update({"X-Embedding-Count": str(sum(counts)), "X-Faces-Per-Image": ",".join(map(str, counts))})
    return Response(body, mimetype=OCTET, headers=headers)


@blueprint.post("/v1/embed")
@document("Embed the faces of one image or a batch",
          {200: Reply("one image: its faces with embedding, norm, box, score, landmarks; a batch: one entry "
                      "per image. With Accept: application/octet-stream, every embedding packed as N×"
                      f"{EMBEDDING_SIZE} float32 (X-Embedding-Count, X-Faces-Per-Image)", EmbedAnswer,
                      headers=EMBEDDING_HEADERS)},
          description="One image: raw or base64 body, JSON {\"image\"}, or one multipart file. A batch: JSON "
                      "{\"images\": [...]} or several multipart files; a bad image is an error entry.",
          query=EmbedCropQuery, errors=ERRORS,
          body={OCTET: RAW_IMAGE, "text/plain": BASE64_IMAGE, "application/json": EmbedRequest,
                "multipart/form-data": FILES})
def embed():
    service = current()
    inputs, batch = requests.image_inputs(request, service.settings.max_images)
    query = requests.parse_query(EmbedCropQuery, request.args)
    results = service.embed(inputs, query)
    if not batch:
        results[0].require_faces()
    if _wants_bytes():
        return _packed(service, results)
    head = {"model": service.model, "dim": EMBEDDING_SIZE}
    entries = [entry_or_error(r) for r in results] if batch else [image_entry(results[0])]
    if query.crops:
        _add_crops(service, entries, results)
    if batch:
        return json_response({**head, "results": entries}, headers=service.embedding_headers())
    return json_response({**head, **entries[0]}, headers=service.embedding_headers(results[0].faces[0]))


def _add_crops(service, entries: list, results: list) -> None:
    """Each face's aligned crop as base64 PNG under ``crop``, encoded in a native thread (up to
    ``max_images`` × ``max_faces`` PNGs: not on the event loop)."""
    pairs = [(face, out) for entry, result in zip(entries, results) if "faces" in entry
             for face, out in zip(result.faces, entry["faces"])]
    encoded = service.runner.intake.call(_encode_crops, [face.crop for face, _ in pairs])
    for (_, out), crop in zip(pairs, encoded):
        out["crop"] = crop


def _encode_crops(crops: list) -> list:
    """112×112×3 uint8 RGB crops (or None) -> base64 PNG text (or None)."""
    return [None if c is None else base64.b64encode(crop_png(c)).decode("ascii") for c in crops]


@blueprint.post("/v1/verify")
@document("Are two photos the same person? Cosine similarity against a threshold",
          {200: Reply("similarity and decision", Verification)},
          query=VerifyQuery, errors=ERRORS,
          body={"application/json": VerifyRequest, "multipart/form-data": FILES})
def verify():
    service = current()
    inputs = requests.pair_inputs(request)
    query = requests.parse_query(VerifyQuery, request.args)
    threshold = service.settings.verify_threshold if query.threshold is None else query.threshold
    if query.faces == "all" or (query.faces is None and service.settings.faces == "all"):
        query = query.model_copy(update={"faces": "largest"})
    results = service.embed(inputs, query)
    for i, result in enumerate(results, start=1):
        failure = result.failure()
        if failure is not None:
            status, code, message = client_error(failure)
            raise ApiError(status, code, f"image{i}: {message}")
    a, b = results[0].faces[0], results[1].faces[0]
    similarity = float(np.dot(a.embedding, b.embedding))
    return json_response({"model": service.model, "similarity": similarity,
                          "same_person": similarity >= threshold, "threshold": threshold,
                          "faces": [{**f.geometry(), "norm": f.norm} for f in (a, b)]},
                         headers=service.embedding_headers())
