"""The original service's endpoints: the body is the image; the answer is the primary face.

``/b64_represent_json``, ``/byte_represent_json`` -> ``[[f1, ..., f512]]``;
``/b64_represent_byte``, ``/byte_represent_byte`` -> 512 little-endian float32 (2,048 bytes);
``/represent_json``, ``/represent_bytes`` take either form (and JSON or a one-file form).
"""
from __future__ import annotations

from flask import Blueprint, Response, request
from pydantic import Field, RootModel

from adaface.options import EMBEDDING_SIZE

from .. import requests
from ..errors import ApiError
from ..openapi import Reply, document
from ..responses import OCTET, embedding_bytes, json_response
from ..schemas import BASE64_IMAGE, EMBEDDING_HEADERS, FILES, FLOAT32_BYTES, RAW_IMAGE, EmbedQuery, ImageRequest
from ..service import current

blueprint = Blueprint("compat", __name__)

ERRORS = (400, 401, 413, 415, 422, 503)


class CompatEmbedding(RootModel[list[list[float]]]):
    """The primary face's embedding, as the original service wrote it: one row of 512."""

    root: list[list[float]] = Field(min_length=1, max_length=1)


_JSON_REPLY = {200: Reply("the primary face's embedding as [[f1, ..., f512]]", CompatEmbedding,
                          headers=EMBEDDING_HEADERS)}
_BYTES_REPLY = {200: Reply(f"{EMBEDDING_SIZE} little-endian float32 values ({EMBEDDING_SIZE * 4:,} bytes)",
                           FLOAT32_BYTES, OCTET, EMBEDDING_HEADERS)}
_EITHER = {OCTET: RAW_IMAGE, "text/plain": BASE64_IMAGE, "application/json": ImageRequest,
           "multipart/form-data": FILES}


def _primary(data):
    """The primary face of one input, with the request's options (raises its error or no_face)."""
    service = current()
    return service.embed([data], requests.parse_query(EmbedQuery, request.args))[0].require_faces()[0]


def _as_json(data) -> Response:
    face = _primary(data)
    return json_response([face.embedding], headers=current().embedding_headers(face))


def _as_bytes(data) -> Response:
    face = _primary(data)
    return Response(embedding_bytes(face.embedding), mimetype=OCTET, headers=current().embedding_headers(face))


def _body() -> bytes:
    return requests.body_bytes(request)


def _single_input():
    inputs, batch = requests.image_inputs(request, current().settings.max_images)
    if batch:
        raise ApiError(400, "one_image_only", "this endpoint embeds one image; send batches to /v1/embed")
    return inputs[0]


@blueprint.post("/b64_represent_json")
@document("Original API: base64 body, JSON embedding", _JSON_REPLY, query=EmbedQuery,
          body={"text/plain": BASE64_IMAGE}, errors=ERRORS)
def b64_represent_json():
    return _as_json(_body())


@blueprint.post("/byte_represent_json")
@document("Original API: image bytes body, JSON embedding", _JSON_REPLY, query=EmbedQuery,
          body={OCTET: RAW_IMAGE}, errors=ERRORS)
def byte_represent_json():
    return _as_json(_body())


@blueprint.post("/b64_represent_byte")
@document("Original API: base64 body, float32 bytes", _BYTES_REPLY, query=EmbedQuery,
          body={"text/plain": BASE64_IMAGE}, errors=ERRORS)
def b64_represent_byte():
    return _as_bytes(_body())


@blueprint.post("/byte_represent_byte")
@document("Original API: image bytes body, float32 bytes", _BYTES_REPLY, query=EmbedQuery,
          body={OCTET: RAW_IMAGE}, errors=ERRORS)
def byte_represent_byte():
    return _as_bytes(_body())


@blueprint.post("/represent_json")
@document("Image bytes or base64 (told apart by content), JSON embedding", _JSON_REPLY, query=EmbedQuery,
          body=_EITHER, errors=ERRORS)
def represent_json():
    return _as_json(_single_input())


@blueprint.post("/represent_bytes")
@document("Image bytes or base64 (told apart by content), float32 bytes", _BYTES_REPLY, query=EmbedQuery,
          body=_EITHER, errors=ERRORS)
def represent_bytes():
    return _as_bytes(_single_input())
