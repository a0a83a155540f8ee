"""Gallery routes: create, list and delete galleries; enroll, list, rename and delete identities
and faces; identify the people in a photo (``POST /v1/galleries/{gallery}/identify``).

They go through the same API-key check, readiness gate and JSON errors as the rest, embed photos
with the service's runner (the shared micro-batcher), and reach the store through
``app.extensions["adaface_gallery"]`` (:class:`serving.gallery_state.GalleryState`).
"""
from __future__ import annotations

from datetime import datetime, timezone
from typing import Literal, Optional, Union
from urllib.parse import unquote_to_bytes, urlsplit

import numpy as np
import orjson
from flask import Blueprint, Response, current_app, g, request
from pydantic import Field

from adaface import options as opt
from adaface.decode import decode_base64, looks_like_image
from adaface.errors import NoFaceError
from gallery.errors import BadNameError
from gallery.galleries import decide, photo_sha256
from gallery.reembed import crop_png
from gallery.store import NewFace, check_metadata

from .. import requests
from ..errors import ApiError, error_entry
from ..openapi import Reply, document
from ..responses import json_response
from ..schemas import (BASE64_IMAGE, FILES, RAW_IMAGE, Answer, EmbedQuery, EmbedRequest, Error, FaceGeometry, Query,
                       ThresholdQuery, VerifyQuery)
from ..service import current

blueprint = Blueprint("galleries", __name__, url_prefix="/v1/galleries")

GALLERY = {"gallery": "gallery name: letters, digits, '_', '.', '-' (1 to 64)"}
GALLERY_IDENTITY = {**GALLERY, "identity": "identity name: 1 to 200 characters of UTF-8 (percent-encoded), no '/' "
                                           "(not even as %2F), no control characters"}
IMAGE_BODY = {"application/octet-stream": RAW_IMAGE, "text/plain": BASE64_IMAGE,
              "application/json": EmbedRequest, "multipart/form-data": FILES}


# -- models ----------------------------------------------------------------------------------------

class ListQuery(Query):
    limit: int = Field(opt.DEFAULT_LIST_LIMIT, ge=opt.LIST_LIMIT.low, le=opt.LIST_LIMIT.high,
                       description="identities per page")
    offset: int = Field(0, ge=opt.LIST_OFFSET.low, le=opt.LIST_OFFSET.high, description="identities skipped")


class EnrollQuery(EmbedQuery):
    faces: Optional[Literal[tuple(m for m in opt.FACE_MODES if m != "all")]] = Field(
        None, description="which face of each photo is enrolled: the largest (default) or the most confident")


class IdentifyQuery(EmbedQuery, ThresholdQuery):
    top_k: int = Field(opt.DEFAULT_TOP_K, ge=opt.TOP_K.low, le=opt.TOP_K.high, description="candidates per face")


class NewGallery(Answer):
    name: str


class IdentityChange(Answer):
    name: Optional[str] = Field(None, description="the new name")
    metadata: Optional[dict] = Field(None, description="replaces the identity's metadata")


class ModelOut(Answer):
    arch: str
    fingerprint: str = Field(description="sha256 of the backbone's weights (the same in any file format)")
    synthetic: bool
    name: str


class GalleryOut(Answer):
    name: str
    identities: int
    faces: int
    version: int
    created_at: str
    model: Optional[ModelOut] = Field(description="the network that made its embeddings (none before the first enroll)")


class GalleryList(Answer):
    galleries: list[GalleryOut]


class FaceOut(Answer):
    id: int
    norm: float
    photo_sha256: str
    created_at: str


class IdentityOut(Answer):
    name: str
    metadata: Optional[dict]
    face_count: int
    created_at: str
    faces: Optional[list[FaceOut]] = None


class IdentityList(Answer):
    gallery: str
    limit: int
    offset: int
    identities: list[IdentityOut]


class Deleted(Answer):
    deleted: Union[int, str]
    faces_removed: Optional[int] = None


class EnrolledFace(FaceGeometry):
    face_id: int
    photo_sha256: str
    status: Literal["added", "exists"]


class Enrollment(Answer):
    gallery: str
    identity: Optional[IdentityOut]
    added: int
    results: list[Union[EnrolledFace, Error]]


class CandidateOut(Answer):
    identity: str
    similarity: float
    face_id: int
    photo_sha256: str
    metadata: Optional[dict]


class IdentifiedFace(FaceGeometry):
    decision: Literal["match", "unknown"]
    identity: Optional[str]
    similarity: Optional[float]
    candidates: list[CandidateOut]


class SearchQuery(IdentifyQuery):
    exact: bool = Field(False, description="an exhaustive float32 search instead of the index's (slower, exact)")


class IdentityVerification(FaceGeometry):
    model: str
    gallery: str
    identity: str
    threshold: float
    same_person: bool
    similarity: Optional[float] = Field(description="the best cosine similarity over the identity's faces")
    mean_similarity: Optional[float]
    best_face_id: Optional[int]
    faces_compared: int


class ReembedOut(Answer):
    gallery: str
    model: ModelOut
    status: Literal["running", "done", "interrupted", "not_started", "failed"]
    embedded: int = Field(description="faces with a crop embedded by the running model so far")
    with_crop: int
    without_crop: int = Field(description="faces without a stored crop: removed when the gallery switches")
    left_out: Optional[list[dict]] = Field(None, description="faces removed at the switch: face_id, identity")
    error: Optional[str] = None


class Identification(Answer):
    model: str
    gallery: str
    threshold: float
    top_k: int
    faces: list[IdentifiedFace]


# -- JSON forms ------------------------------------------------------------------------------------

def _time(ts: float) -> str:
    return datetime.fromtimestamp(ts, timezone.utc).isoformat(timespec="milliseconds")


def _gallery_dict(g) -> dict:
    return {"name": g.name, "identities": g.identities, "faces": g.faces, "version": g.version,
            "created_at": _time(g.created_at), "model": g.model.to_dict() if g.model else None}


def _face_dict(f) -> dict:
    return {"id": f.id, "norm": f.norm, "photo_sha256": f.photo_sha256, "created_at": _time(f.created_at)}


def _identity_dict(i, with_faces: bool = False) -> dict:
    out = {"name": i.name, "metadata": i.metadata, "face_count": i.face_count, "created_at": _time(i.created_at)}
    if with_faces:
        out["faces"] = [_face_dict(f) for f in i.faces]
    return out


def _geometry(face) -> dict:
    return {**face.geometry(), "norm": face.norm}


# -- request parsing -------------------------------------------------------------------------------

def _metadata_arg():
    """``metadata`` from a JSON body's field or a multipart form field holding JSON text, checked
    as the store checks it (400 ``bad_metadata``), before any embedding work."""
    if requests.is_json(request):
        metadata = requests.json_object(request).get("metadata")
    elif request.mimetype == "multipart/form-data" and request.form.get("metadata"):
        try:
            metadata = orjson.loads(request.form["metadata"])
        except orjson.JSONDecodeError:
            raise ApiError(400, "bad_json", "the metadata form field is not valid JSON") from None
    else:
        return None
    check_metadata(metadata)
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


def _state():
    return current_app.extensions["adaface_gallery"]


def _caller():
    """Who sent the request (:class:`serving.access.Caller`, set by the access check)."""
    return g.caller


# -- names in the path -----------------------------------------------------------------------------

def _raw_segments(environ) -> tuple:
    """``(segments, encoded)``: the path's segments as bytes, percent-encoded as the client sent
    them (``RAW_URI`` or ``REQUEST_URI``) and ``encoded`` True; or, where the server gives neither,
    the decoded ``PATH_INFO`` (an encoded '/' is then a '/') and False."""
    raw = environ.get("RAW_URI") or environ.get("REQUEST_URI")
    if raw:
        path = raw.split("?", 1)[0] if raw.startswith("/") else urlsplit(raw).path
        try:
            return path.encode("latin-1").split(b"/"), True
        except UnicodeEncodeError:
            pass
    return environ.get("PATH_INFO", "").encode("latin-1", "replace").split(b"/"), False


@blueprint.before_app_request
def check_path_names():
    """400 ``bad_name`` for a gallery path holding an encoded '/' (``%2F``) or a name that is not
    valid UTF-8: werkzeug would decode the first as a separator and the second with replacement
    characters, so two different names would reach the same identity.

    Registered for the whole app and limited to paths under the prefix: a hook of the blueprint
    alone would not run where the decoded '/' leaves a path that no route matches. CompreFace's
    subject paths (``/api/v1/recognition/subjects/<subject>``) are checked the same way."""
    if not request.path.startswith((blueprint.url_prefix + "/", "/api/v1/recognition/")):  # and CompreFace's
        return None
    segments, encoded = _raw_segments(request.environ)
    for segment in segments:
        if encoded and b"%2f" in segment.lower():
            raise BadNameError("a gallery or identity name cannot contain '/', also not sent as %2F")
        try:
            (unquote_to_bytes(segment) if encoded else segment).decode("utf-8")
        except UnicodeDecodeError:
            raise BadNameError("gallery and identity names in the path must be UTF-8 (percent-encoded); "
                               f"got {segment.decode('latin-1')!r}") from None
    return None


# -- galleries -------------------------------------------------------------------------------------

@blueprint.get("")
@document("List galleries with identity and face counts", {200: Reply("galleries", GalleryList)},
          errors=(401, 503))
def list_galleries():
    caller = _caller()
    return json_response({"galleries": [_gallery_dict(g) for g in _state().call("list_galleries")
                                        if caller.sees(g.name)]})


@blueprint.post("")
@document("Create a gallery", {201: Reply("the new gallery", GalleryOut)}, body={"application/json": NewGallery},
          errors=(400, 401, 409, 503))
def create_gallery():
    name, caller = requests.json_object(request).get("name"), _caller()
    if isinstance(name, str) and not caller.sees(name):
        raise ApiError(403, "forbidden", f"the key {caller.name!r} may only create the galleries it names")
    return json_response(_gallery_dict(_state().call("create_gallery", name, actor=caller.actor)), status=201)


@blueprint.get("/<gallery>")
@document("A gallery's counts and version", {200: Reply("gallery", GalleryOut)}, path_params=GALLERY,
          errors=(401, 404, 503))
def get_gallery(gallery):
    return json_response(_gallery_dict(_state().call("get_gallery", gallery)))


@blueprint.delete("/<gallery>")
@document("Delete a gallery and everything in it", {200: Reply("deleted", Deleted)}, path_params=GALLERY,
          errors=(401, 404, 503))
def delete_gallery(gallery):
    _state().call("delete_gallery", gallery, actor=_caller().actor)
    return json_response({"deleted": gallery})


# -- identities and faces --------------------------------------------------------------------------

@blueprint.get("/<gallery>/identities")
@document("List identities by name", {200: Reply("identities with face counts", IdentityList)}, query=ListQuery,
          path_params=GALLERY, errors=(400, 401, 404, 503))
def list_identities(gallery):
    query = requests.parse_query(ListQuery, request.args)
    found = _state().call("list_identities", gallery, query.limit, query.offset)
    return json_response({"gallery": gallery, "limit": query.limit, "offset": query.offset,
                          "identities": [_identity_dict(i) for i in found]})


@blueprint.get("/<gallery>/identities/<identity>")
@document("An identity with its faces", {200: Reply("identity", IdentityOut)}, path_params=GALLERY_IDENTITY,
          errors=(401, 404, 503))
def get_identity(gallery, identity):
    return json_response(_identity_dict(_state().call("get_identity", gallery, identity), with_faces=True))


@blueprint.patch("/<gallery>/identities/<identity>")
@document("Rename an identity and/or replace its metadata", {200: Reply("the updated identity", IdentityOut)},
          body={"application/json": IdentityChange}, path_params=GALLERY_IDENTITY,
          errors=(400, 401, 404, 409, 503))
def update_identity(gallery, identity):
    body = requests.json_object(request)
    if set(body) - set(IdentityChange.model_fields) or not body:
        raise ApiError(400, "bad_json", 'send {"name": "<new name>"} and/or {"metadata": {...}}')
    updated = _state().call("update_identity", gallery, identity, body.get("name"), body.get("metadata"),
                            actor=_caller().actor)
    return json_response(_identity_dict(updated, with_faces=True))


@blueprint.delete("/<gallery>/identities/<identity>")
@document("Delete an identity and its faces", {200: Reply("deleted", Deleted)}, path_params=GALLERY_IDENTITY,
          errors=(401, 404, 503))
def delete_identity(gallery, identity):
    removed = _state().call("delete_identity", gallery, identity, actor=_caller().actor)
    return json_response({"deleted": identity, "faces_removed": removed})


@blueprint.post("/<gallery>/identities/<identity>/faces")
@document("Enroll one or more photos for an identity (created if new)",
          {200: Reply("every photo was already enrolled (status \"exists\"), or none gave a face", Enrollment),
           201: Reply("faces added", Enrollment)},
          description="One photo: raw or base64 body, JSON {\"image\"}, or one multipart file; several: JSON "
                      "{\"images\": [...]} or several files (a bad photo is an error entry). The chosen face of "
                      "each photo is stored; a photo (same sha256) already enrolled for the identity is not "
                      "stored again. Optional metadata (a JSON field, or a form field of JSON text) replaces "
                      "the identity's.",
          query=EnrollQuery, body=IMAGE_BODY, path_params=GALLERY_IDENTITY,
          errors=(400, 401, 404, 409, 413, 415, 422, 503))
def enroll(gallery, identity):
    service = current()
    inputs, batch = requests.image_inputs(request, service.settings.max_images)
    metadata = _metadata_arg()
    query = requests.parse_query(EnrollQuery, request.args)
    enrolled, entries = enroll_photos(gallery, identity, inputs, query, metadata, require=not batch)
    if enrolled is None:
        return json_response({"gallery": gallery, "identity": None, "added": 0, "results": entries})
    body = {"gallery": gallery, "identity": _identity_dict(enrolled.identity), "added": enrolled.added,
            "results": entries}
    return json_response(body, status=201 if enrolled.added else 200)


def enroll_photos(gallery: str, identity: str, inputs: list, query, metadata=None, require: bool = True,
                  accept=None) -> tuple:
    """Embed ``inputs`` (photos as bytes or base64) and store each one's chosen face for
    ``identity`` (created if new): ``(enrolled, entries)``, the store's
    :class:`gallery.store.Enrolled` (None when no photo gave a face) and one entry per photo
    (its face's geometry with ``face_id``, ``photo_sha256``, ``status``; or its error). With
    ``require`` the first photo's error is raised instead; ``accept(face)`` False counts as no
    face. The gallery's model is checked before any embedding work."""
    service, state = current(), _state()
    if query.faces is None and service.settings.faces == "all":
        query = query.model_copy(update={"faces": "largest"})
    state.call("check_model", gallery, service.extractor.identity)  # before any embedding work
    results = service.embed(inputs, query)
    entries, faces = [], []
    for data, result in zip(inputs, results):
        failure = result.failure()
        if failure is None and accept is not None and not accept(result.faces[0]):
            failure = NoFaceError()
        if failure is not None:
            if require:
                raise failure
            entries.append(error_entry(failure))
            continue
        face = result.faces[0]
        png = crop_png(face.crop) if service.settings.store_crops and face.crop is not None else None
        faces.append(NewFace(face.embedding, face.norm, photo_sha256(photo_bytes(data)), png))
        entries.append(_geometry(face))
    if not faces:
        return None, entries
    enrolled = state.call("enroll", gallery, identity, faces, metadata, service.extractor.identity,
                          actor=_caller().actor)
    records = iter(enrolled.faces)
    for entry in entries:
        if "error" not in entry:
            record, new = next(records)
            entry.update({"face_id": record.id, "photo_sha256": record.photo_sha256,
                          "status": "added" if new else "exists"})
    return enrolled, entries


@blueprint.delete("/<gallery>/faces/<int:face_id>")
@document("Delete one face", {200: Reply("deleted", Deleted)},
          path_params={**GALLERY, "face_id": "the face's id (from enroll or the identity)"}, errors=(401, 404, 503))
def delete_face(gallery, face_id):
    _state().call("delete_face", gallery, face_id, actor=_caller().actor)
    return json_response({"deleted": face_id})


# -- identify --------------------------------------------------------------------------------------

@blueprint.post("/<gallery>/identify")
@document("Who is in this photo? Top-k identities by cosine similarity, match or unknown",
          {200: Reply("per face: decision, identity, similarity, candidates", Identification)},
          description="faces=all identifies every face of a group photo; threshold overrides "
                      "ADAFACE_IDENTIFY_THRESHOLD.",
          query=SearchQuery, body=IMAGE_BODY, path_params=GALLERY, errors=(400, 401, 404, 409, 413, 415, 422, 503))
def identify(gallery):
    service, state = current(), _state()
    inputs, _ = requests.image_inputs(request, 1)
    query = requests.parse_query(SearchQuery, request.args)
    threshold = service.settings.identify_threshold if query.threshold is None else query.threshold
    model = service.extractor.identity
    state.call("check_model", gallery, model)  # before any embedding work
    found = service.embed(inputs, query)[0].require_faces()
    per_face = state.call("identify", gallery, np.stack([f.embedding for f in found]), query.top_k, query.exact,
                          model)
    faces = []
    for face, candidates in zip(found, per_face):
        decision, best = decide(candidates, threshold)
        faces.append({**_geometry(face), "decision": decision, "identity": best.identity if best else None,
                      "similarity": candidates[0].similarity if candidates else None,
                      "candidates": [c.to_dict() for c in candidates]})
    return json_response({"model": service.model, "gallery": gallery, "threshold": threshold,
                          "top_k": query.top_k, "faces": faces}, headers=service.embedding_headers())


@blueprint.get("/<gallery>/faces/<int:face_id>/crop")
@document("A face's stored aligned crop", {200: Reply("the 112×112 crop the embedding was made from, as PNG",
                                                      {"type": "string", "format": "binary"}, "image/png")},
          path_params={**GALLERY, "face_id": "the face's id"}, errors=(401, 404, 503))
def face_crop(gallery, face_id):
    return Response(_state().call("face_crop", gallery, face_id), mimetype="image/png",
                    headers={"Cache-Control": "no-store"})


@blueprint.post("/<gallery>/identities/<identity>/verify")
@document("Is the person in this photo this identity? Best and mean similarity over its faces",
          {200: Reply("the similarity and the decision", IdentityVerification)},
          description="The photo's largest face against every face of the identity; same_person when the best "
                      "similarity is at or above the threshold (ADAFACE_VERIFY_THRESHOLD, or ?threshold=).",
          query=VerifyQuery, body=IMAGE_BODY, path_params=GALLERY_IDENTITY,
          errors=(400, 401, 404, 409, 413, 415, 422, 503))
def verify_identity(gallery, identity):
    service, state = current(), _state()
    inputs, _ = requests.image_inputs(request, 1)
    query = requests.parse_query(VerifyQuery, request.args)
    if query.faces == "all" or (query.faces is None and service.settings.faces == "all"):
        query = query.model_copy(update={"faces": "largest"})
    threshold = service.settings.verify_threshold if query.threshold is None else query.threshold
    model = service.extractor.identity
    state.call("check_model", gallery, model)
    state.call("get_identity", gallery, identity)  # a missing identity fails before any embedding work
    face = service.embed(inputs, query)[0].require_faces()[0]
    match = state.call("verify_identity", gallery, identity, face.embedding, model)
    return json_response({**_geometry(face), "model": service.model, "gallery": gallery, "identity": identity,
                          "threshold": threshold,
                          "same_person": match.best is not None and match.best >= threshold,
                          "similarity": match.best, "mean_similarity": match.mean,
                          "best_face_id": match.best_face_id, "faces_compared": match.faces},
                         headers=service.embedding_headers(face))


@blueprint.post("/<gallery>/reembed")
@document("Re-embed the gallery's stored crops with the running model, then switch it over",
          {202: Reply("started (or still running)", ReembedOut), 200: Reply("already on the running model", ReembedOut)},
          description="Runs in the background in this worker; GET the same path for progress. Searches use the "
                      "old vectors until the switch, which is one transaction; a server running the new model "
                      "gets model_mismatch until then. Faces without a stored crop are removed at the switch. "
                      "An interrupted job resumes where it stopped when posted again.",
          path_params=GALLERY, errors=(401, 404, 503))
def start_reembed(gallery):
    service = current()
    status = _state().offloader.call(_jobs().start, gallery, service.extractor.identity,
                                     service.runner.batcher.submit, _caller().actor)
    return json_response(status, status=200 if status["status"] == "done" else 202)


@blueprint.get("/<gallery>/reembed")
@document("How far a re-embed with the running model has come", {200: Reply("progress", ReembedOut)},
          path_params=GALLERY, errors=(401, 404, 503))
def reembed_status(gallery):
    return json_response(_state().offloader.call(_jobs().status, gallery, current().extractor.identity))


def _jobs():
    return current_app.extensions["adaface_reembed"]
