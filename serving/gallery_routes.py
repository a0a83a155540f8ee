"""HTTP routes for galleries: create, list and delete galleries; enroll, list, rename and delete
identities and faces; identify the people in a photo (``POST /v1/galleries/{gallery}/identify``).

``register(app, service)`` adds them to the app made by ``flask_http_server.create_app``: they go
through the same API-key check, readiness gate and JSON errors as the rest, and embed photos with
``service.runner`` (the shared micro-batcher). The store named by ``ADAFACE_GALLERY_URL`` is opened
on the first gallery request; its calls run in native threads, off the gevent loop.
"""
from __future__ import annotations

from datetime import datetime, timezone

import numpy as np
from flask import Flask, request

from AdaFaceFeature import NoFaceError
from gallery.galleries import Galleries, decide, photo_sha256
from gallery.store import NewFace, check_url
from image_decode import decode_base64, looks_like_image

from . import payload
from .errors import ApiError, client_error, json_response
from .native import Offloader, allocate_lock

DEFAULT_TOP_K = 5
MAX_TOP_K = 100
MAX_LIST = 1000


class GalleryState:
    """The process's :class:`Galleries`, opened on first use (after gunicorn's fork)."""

    def __init__(self, url: str):
        self.url = check_url(url)  # a bad URL stops the app at start (a ValueError)
        self._galleries = None
        self._lock = allocate_lock()
        self.offloader = Offloader(size=4)

    def _open(self) -> Galleries:
        with self._lock:
            if self._galleries is None:
                self._galleries = Galleries.open(self.url)
            return self._galleries

    def call(self, method: str, *args):
        """Run ``Galleries.<method>`` (or ``Galleries.store.<method>``) in a native thread."""
        def work():
            galleries = self._open()
            target = getattr(galleries, method, None) or getattr(galleries.store, method)
            return target(*args)
        return self.offloader.call(work)

    def close(self) -> None:
        with self._lock:
            if self._galleries is not None:
                self._galleries.close()
                self._galleries = None


# -- JSON forms ---------------------------------------------------------------------------------

def _time(ts: float) -> str:
    return datetime.fromtimestamp(ts, timezone.utc).isoformat(timespec="milliseconds")


def _gallery_dict(g) -> dict:
    return {"name": g.name, "identities": g.identities, "faces": g.faces, "version": g.version,
            "created_at": _time(g.created_at)}


def _face_dict(f) -> dict:
    return {"id": f.id, "norm": f.norm, "photo_sha256": f.photo_sha256, "created_at": _time(f.created_at)}


def _identity_dict(i, with_faces: bool = False) -> dict:
    out = {"name": i.name, "metadata": i.metadata, "face_count": i.face_count, "created_at": _time(i.created_at)}
    if with_faces:
        out["faces"] = [_face_dict(f) for f in i.faces]
    return out


def _face_geometry(face) -> dict:
    return {"box": None if face.box is None else np.round(face.box, 2), "score": face.score, "norm": face.norm}


# -- request parsing ----------------------------------------------------------------------------

def _json_object() -> dict:
    body = request.get_json(silent=True)
    if not isinstance(body, dict):
        raise ApiError(400, "bad_json", "the body must be a JSON object")
    return body


def _int_arg(name: str, default: int, low: int, high: int) -> int:
    return payload.int_arg(request.args, name, low, high, default)


def _metadata_arg():
    """``metadata`` from a JSON body's field or a multipart form field holding JSON text."""
    if payload.is_json(request):
        metadata = (request.get_json(silent=True) or {}).get("metadata")
    elif request.mimetype == "multipart/form-data" and request.form.get("metadata"):
        import orjson
        try:
            metadata = orjson.loads(request.form["metadata"])
        except orjson.JSONDecodeError:
            raise ApiError(400, "bad_json", "the metadata form field is not valid JSON") from None
    else:
        return None
    if metadata is not None and not isinstance(metadata, dict):
        raise ApiError(400, "bad_json", "metadata must be a JSON object")
    return metadata


def photo_bytes(data) -> bytes:
    """The photo file's bytes, however it was sent (raw or base64), so its sha256 is the same."""
    try:
        if isinstance(data, str):
            return decode_base64(data)
        data = bytes(data)
        return data if looks_like_image(data) else decode_base64(data)
    except ValueError:
        return bytes(data, "utf-8") if isinstance(data, str) else bytes(data)


# -- handlers -----------------------------------------------------------------------------------

def _enroll(service, state: GalleryState, gallery: str, identity: str):
    inputs, batch = payload.image_inputs(request, service.settings.max_images)
    metadata = _metadata_arg()
    options = payload.embed_options(request.args, service.settings)
    if options["faces"] == "all":
        raise ApiError(400, "bad_option", "enroll takes one face per photo: use faces=largest or faces=score")
    state.call("get_gallery", gallery)  # a missing gallery fails before any embedding work
    results = service.runner.embed(inputs, options)
    if not batch:
        if isinstance(results[0], Exception):
            raise results[0]
        if not results[0].faces:
            raise NoFaceError()
    entries, faces = [], []
    for data, result in zip(inputs, results):
        if isinstance(result, Exception):
            status, code, message = client_error(result)
            entries.append({"error": {"code": code, "message": message, "status": status}})
        elif not result.faces:
            entries.append({"error": {"code": NoFaceError.code, "message": str(NoFaceError()),
                                      "status": NoFaceError.status}})
        else:
            face = result.faces[0]
            faces.append(NewFace(face.embedding, face.norm, photo_sha256(photo_bytes(data))))
            entries.append(_face_geometry(face))
    if not faces:
        return json_response({"gallery": gallery, "identity": None, "added": 0, "results": entries})
    enrolled = state.call("enroll", gallery, identity, faces, metadata)
    records = iter(enrolled.faces)
    for entry in entries:
        if "error" not in entry:
            record, new = next(records)
            entry.update({"face_id": record.id, "photo_sha256": record.photo_sha256,
                          "status": "added" if new else "exists"})
    body = {"gallery": gallery, "identity": _identity_dict(enrolled.identity), "added": enrolled.added,
            "results": entries}
    return json_response(body, status=201 if enrolled.added else 200)


def _identify(service, state: GalleryState, gallery: str):
    inputs, _ = payload.image_inputs(request, 1)
    options = payload.embed_options(request.args, service.settings)
    top_k = _int_arg("top_k", DEFAULT_TOP_K, 1, MAX_TOP_K)
    threshold = payload.threshold_arg(request.args, service.settings.identify_threshold)
    state.call("get_gallery", gallery)
    result = service.runner.embed(inputs, options)[0]
    if isinstance(result, Exception):
        raise result
    if not result.faces:
        raise NoFaceError()
    probes = np.stack([f.embedding for f in result.faces])
    per_face = state.call("identify", gallery, probes, top_k)
    faces = []
    for face, candidates in zip(result.faces, per_face):
        decision, best = decide(candidates, threshold)
        faces.append({**_face_geometry(face), "decision": decision,
                      "identity": best.identity if best else None,
                      "similarity": candidates[0].similarity if candidates else None,
                      "candidates": [c.to_dict() for c in candidates]})
    return json_response({"model": service.model, "gallery": gallery, "threshold": threshold, "top_k": top_k,
                          "faces": faces}, headers=service.embedding_headers())


def register(app: Flask, service) -> GalleryState:
    """Add the gallery routes to ``app``; the returned state is also ``app.extensions["adaface_gallery"]``."""
    state = GalleryState(service.settings.gallery_url)
    app.extensions["adaface_gallery"] = state
    base = "/v1/galleries"

    def list_galleries():
        return json_response({"galleries": [_gallery_dict(g) for g in state.call("list_galleries")]})

    def create_gallery():
        name = _json_object().get("name")
        return json_response(_gallery_dict(state.call("create_gallery", name)), status=201)

    def get_gallery(gallery):
        return json_response(_gallery_dict(state.call("get_gallery", gallery)))

    def delete_gallery(gallery):
        state.call("delete_gallery", gallery)
        return json_response({"deleted": gallery})

    def list_identities(gallery):
        limit = _int_arg("limit", 100, 1, MAX_LIST)
        offset = _int_arg("offset", 0, 0, 2 ** 62)
        found = state.call("list_identities", gallery, limit, offset)
        return json_response({"gallery": gallery, "limit": limit, "offset": offset,
                              "identities": [_identity_dict(i) for i in found]})

    def get_identity(gallery, identity):
        return json_response(_identity_dict(state.call("get_identity", gallery, identity), with_faces=True))

    def update_identity(gallery, identity):
        body = _json_object()
        unknown = set(body) - {"name", "metadata"}
        if unknown or not body:
            raise ApiError(400, "bad_json", 'send {"name": "<new name>"} and/or {"metadata": {...}}')
        updated = state.call("update_identity", gallery, identity, body.get("name"), body.get("metadata"))
        return json_response(_identity_dict(updated, with_faces=True))

    def delete_identity(gallery, identity):
        removed = state.call("delete_identity", gallery, identity)
        return json_response({"deleted": identity, "faces_removed": removed})

    def delete_face(gallery, face_id):
        state.call("delete_face", gallery, face_id)
        return json_response({"deleted": face_id})

    routes = [
        ("", "gallery_list", list_galleries, ["GET"]),
        ("", "gallery_create", create_gallery, ["POST"]),
        ("/<gallery>", "gallery_get", get_gallery, ["GET"]),
        ("/<gallery>", "gallery_delete", delete_gallery, ["DELETE"]),
        ("/<gallery>/identities", "gallery_identities", list_identities, ["GET"]),
        ("/<gallery>/identities/<identity>", "gallery_identity_get", get_identity, ["GET"]),
        ("/<gallery>/identities/<identity>", "gallery_identity_update", update_identity, ["PATCH"]),
        ("/<gallery>/identities/<identity>", "gallery_identity_delete", delete_identity, ["DELETE"]),
        ("/<gallery>/identities/<identity>/faces", "gallery_enroll",
         lambda gallery, identity: _enroll(service, state, gallery, identity), ["POST"]),
        ("/<gallery>/faces/<int:face_id>", "gallery_face_delete", delete_face, ["DELETE"]),
        ("/<gallery>/identify", "gallery_identify", lambda gallery: _identify(service, state, gallery), ["POST"]),
    ]
    for path, endpoint, view, methods in routes:
        app.add_url_rule(base + path, endpoint, view, methods=methods)
    return state


# -- OpenAPI ------------------------------------------------------------------------------------

_ERROR = {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}
_ERROR_TEXT = {400: "bad name, body or option", 401: "missing or wrong API key",
               404: "no such gallery, identity or face", 409: "the name is taken",
               413: "body over the size limit or too many images", 415: "image format not supported",
               422: "no face found", 503: "not ready, at capacity, or the gallery database is unavailable"}


def _errors(*statuses: int) -> dict:
    return {str(s): {"description": _ERROR_TEXT[s], "content": _ERROR} for s in statuses}


def _ok(description: str, status: str = "200") -> dict:
    return {status: {"description": description, "content": {"application/json": {"schema": {"type": "object"}}}}}


def _param(name: str, kind: str = "string", where: str = "path", description: str = "") -> dict:
    p = {"name": name, "in": where, "required": where == "path", "schema": {"type": kind}}
    if description:
        p["description"] = description
    return p


_GALLERY = _param("gallery", description="gallery name: letters, digits, '_', '.', '-' (1 to 64)")
_IDENTITY = _param("identity", description="identity name (no '/')")
_EMBED_QUERY = [
    {"name": "align", "in": "query", "schema": {"type": "string", "enum": ["auto", "always", "never"]}},
    {"name": "min_face_size", "in": "query", "schema": {"type": "integer", "minimum": 1, "maximum": 10000}},
]
_IMAGE_BODY = {
    "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
    "text/plain": {"schema": {"type": "string"}, "description": "base64"},
    "application/json": {"schema": {"type": "object", "properties": {
        "image": {"type": "string"}, "images": {"type": "array", "items": {"type": "string"}},
        "metadata": {"type": "object"}}}},
    "multipart/form-data": {"schema": {"type": "object", "properties": {
        "metadata": {"type": "string", "description": "JSON object"}},
        "additionalProperties": {"type": "string", "format": "binary"}}},
}

def _op(summary: str, params: list, responses: dict, **extra) -> dict:
    op = {"summary": summary, "responses": responses, **extra}
    if params:
        op["parameters"] = params
    return op


_G, _GI = [_GALLERY], [_GALLERY, _IDENTITY]

OPENAPI_PATHS = {
    "/v1/galleries": {
        "get": _op("List galleries with identity and face counts", [], {**_ok("galleries"), **_errors(401, 503)}),
        "post": _op("Create a gallery", [], {**_ok("the new gallery", "201"), **_errors(400, 401, 409, 503)},
                    requestBody={"required": True, "content": {"application/json": {"schema": {
                        "type": "object", "required": ["name"], "properties": {"name": {"type": "string"}}}}}}),
    },
    "/v1/galleries/{gallery}": {
        "get": _op("A gallery's counts and version", _G, {**_ok("gallery"), **_errors(401, 404, 503)}),
        "delete": _op("Delete a gallery and everything in it", _G, {**_ok("deleted"), **_errors(401, 404, 503)}),
    },
    "/v1/galleries/{gallery}/identities": {
        "get": _op("List identities by name",
                   _G + [_param("limit", "integer", "query", "1 to 1000, default 100"),
                         _param("offset", "integer", "query")],
                   {**_ok("identities with face counts"), **_errors(400, 401, 404, 503)}),
    },
    "/v1/galleries/{gallery}/identities/{identity}": {
        "get": _op("An identity with its faces", _GI, {**_ok("identity"), **_errors(401, 404, 503)}),
        "patch": _op("Rename an identity and/or replace its metadata", _GI,
                     {**_ok("the updated identity"), **_errors(400, 401, 404, 409, 503)},
                     requestBody={"required": True, "content": {"application/json": {"schema": {
                         "type": "object", "properties": {"name": {"type": "string"}, "metadata": {"type": "object"}}}}}}),
        "delete": _op("Delete an identity and its faces", _GI, {**_ok("deleted"), **_errors(401, 404, 503)}),
    },
    "/v1/galleries/{gallery}/identities/{identity}/faces": {
        "post": _op("Enroll one or more photos for an identity (created if new)",
                    _GI + _EMBED_QUERY + [{"name": "faces", "in": "query", "schema": {
                        "type": "string", "enum": ["largest", "score"]}}],
                    {**_ok("every photo was already enrolled (status \"exists\"), or none gave a face"),
                     **_ok("faces added", "201"), **_errors(400, 401, 404, 413, 415, 422, 503)},
                    description="One photo: raw or base64 body, JSON {\"image\"}, or one multipart file; several: "
                                "JSON {\"images\": [...]} or several files (a bad photo is an error entry). The "
                                "largest face of each photo is stored; a photo (same sha256) already enrolled for "
                                "the identity is not stored again. Optional metadata replaces the identity's.",
                    requestBody={"required": True, "content": _IMAGE_BODY}),
    },
    "/v1/galleries/{gallery}/faces/{face_id}": {
        "delete": _op("Delete one face", [_GALLERY, _param("face_id", "integer")],
                      {**_ok("deleted"), **_errors(401, 404, 503)}),
    },
    "/v1/galleries/{gallery}/identify": {
        "post": _op("Who is in this photo? Top-k identities by cosine similarity, match or unknown",
                    _G + _EMBED_QUERY + [
                        {"name": "faces", "in": "query", "schema": {"type": "string", "enum": ["largest", "score", "all"]},
                         "description": "all: identify every face of a group photo"},
                        _param("top_k", "integer", "query", "candidates per face, 1 to 100, default 5"),
                        _param("threshold", "number", "query", "overrides ADAFACE_IDENTIFY_THRESHOLD")],
                    {**_ok("per face: decision, identity, similarity, candidates"),
                     **_errors(400, 401, 404, 413, 415, 422, 503)},
                    requestBody={"required": True, "content": _IMAGE_BODY}),
    },
}
