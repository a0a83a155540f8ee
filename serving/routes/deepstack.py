"""DeepStack's face API (``/v1/vision/face...``) over our galleries: what Home Assistant's
deepstack integrations, Double Take and CodeProject.AI clients call (docs/compatibility.md).

A thin layer, as :mod:`.compreface` is: a DeepStack ``userid`` is an identity of the gallery the
key addresses (:func:`serving.collection.collection`). The key may come as DeepStack sends it,
the form field ``api_key`` (or ``admin_key``), read from the first bytes of the body before the
rest is accepted (:func:`serving.hooks.peek_form_key`), or as a header like every other route.

``confidence`` and ``similarity`` are DeepStack's ``(cosine + 1) / 2``. A recognized face is a
match when its cosine is at or above ``ADAFACE_IDENTIFY_THRESHOLD`` *and* its confidence at or
above ``min_confidence``: DeepStack clients send 0.45 by default, a cosine of -0.1, which would
name everyone. Answers are ``{"success": true, ...}``; errors ``{"success": false, "error": ...}``
with DeepStack's status (400 for the request, 401 for a key).
"""
from __future__ import annotations

import logging
from typing import Optional

import numpy as np
from flask import Blueprint, request
from pydantic import Field, ValidationError
from werkzeug.exceptions import HTTPException

from adaface.errors import NoFaceError
from gallery.errors import GalleryNotFoundError, IdentityNotFoundError

from ..collection import collection, identity_names, int_box, largest_first
from ..errors import ApiError, client_error
from ..openapi import Reply, document
from ..responses import json_response, note_error
from ..schemas import Answer, EmbedQuery, Query
from ..service import current
from .galleries import _caller, _state, enroll_photos

logger = logging.getLogger(__name__)
blueprint = Blueprint("deepstack", __name__, url_prefix="/v1/vision/face")
TAGS = ("DeepStack",)
#: DeepStack's defaults: the detector's threshold on /face, the match threshold on /recognize
DETECT_CONFIDENCE, RECOGNIZE_CONFIDENCE = 0.55, 0.67
#: DeepStack's own error texts, for our codes that have one
MESSAGES = {"no_image": "No valid image file found", "no_face": "no face detected", "not_aligned": "no face detected",
            "bad_base64": "invalid image", "not_an_image": "invalid image", "truncated_image": "invalid image",
            "bad_image": "invalid image", "unsupported_format": "invalid image", "unauthorized": "Incorrect api key"}
FORM = {"multipart/form-data": {"type": "object", "properties": {
    "image": {"type": "string", "format": "binary"}, "userid": {"type": "string"},
    "min_confidence": {"type": "number"}, "api_key": {"type": "string"}}}}


class Prediction(Answer):
    confidence: float = Field(description="the detector's score (detect); (cosine + 1) / 2, 0 for unknown (recognize)")
    y_min: int
    x_min: int
    y_max: int
    x_max: int


class Recognized(Prediction):
    userid: str = Field(description='the identity, or "unknown"')


class Detected(Answer):
    success: bool
    predictions: list[Prediction]


class RecognizedFaces(Answer):
    success: bool
    predictions: list[Recognized]


class Registered(Answer):
    success: bool
    message: str = Field(description='"face added" (a new userid) or "face updated"')


class Listed(Answer):
    success: bool
    faces: list[str]


class Done(Answer):
    success: bool


class Matched(Answer):
    success: bool
    similarity: float = Field(description="(cosine + 1) / 2")


class Confidence(Query):
    min_confidence: Optional[float] = Field(None, ge=0, le=1, allow_inf_nan=False)


@blueprint.errorhandler(Exception)
def _error(exc: Exception):
    if isinstance(exc, HTTPException):
        return json_response({"success": False, "error": exc.description or exc.name}, exc.code or 500)
    known = client_error(exc)
    if known is None:
        logger.exception("unhandled error")
        note_error("internal_error")
        return json_response({"success": False, "error": "error occurred on the server (logged)"}, 500)
    status, code, message = known
    note_error(code)
    if code in MESSAGES and (code == "unauthorized" or not isinstance(exc, ApiError)):
        status, message = (401 if code == "unauthorized" else 400), MESSAGES[code]
    elif status == 403:
        status = 401
    return json_response({"success": False, "error": message}, status, headers=getattr(exc, "headers", None))


def _collection() -> str:
    return collection(_caller(), current().settings.compat_gallery)


def _confidence(default: float) -> float:
    """``min_confidence`` from the form (or the query); DeepStack's messages when it is bad."""
    raw = request.form.get("min_confidence", request.args.get("min_confidence", ""))
    if raw == "":
        return default
    try:
        value = Confidence.model_validate({"min_confidence": raw}).min_confidence
    except ValidationError:
        try:
            bad = float(raw) > 1
        except ValueError:
            bad = False
        raise ApiError(400, "bad_option", "min_confidence cannot be greater than 1" if bad
                       else "Invalid value for min_confidence") from None
    return default if value is None else value


def _files(names: Optional[tuple] = None) -> list:
    """The uploaded files' bytes (only the fields ``names``, when given), in the form's order."""
    found = [f.read() for key in request.files if names is None or key in names for f in request.files.getlist(key)]
    if not found:
        raise ApiError(400, "no_image", "No valid image file found")
    return found


def _userid() -> str:
    userid = request.form.get("userid", "")
    if not userid:
        raise ApiError(400, "bad_option", "userid not specified")
    return userid


def _faces(data) -> list:
    """Every face of one image, largest first ([] when there is none)."""
    result = current().embed([data], EmbedQuery(faces="all"))[0]
    if result.error is not None:
        raise result.error
    return largest_first(result.faces)


def _box(face) -> dict:
    x1, y1, x2, y2 = int_box(face)
    return {"y_min": y1, "x_min": x1, "y_max": y2, "x_max": x2}


def _confidence_of(cosine: float) -> float:
    return round((float(cosine) + 1) / 2, 6)


# -- routes ----------------------------------------------------------------------------------------

@blueprint.post("")
@blueprint.post("/")
@document("DeepStack: detect faces", {200: Reply("the faces", Detected)},
          body=FORM, tags=TAGS, errors=(400, 401))
def detect():
    threshold = _confidence(DETECT_CONFIDENCE)
    faces = _faces(_files(("image",))[0])
    predictions = [{"confidence": round(1.0 if f.score is None else float(f.score), 6), **_box(f)}
                   for f in faces if f.score is None or f.score >= threshold]
    return json_response({"success": True, "predictions": predictions})


@blueprint.post("/register")
@document("DeepStack: register the face of one or more images for a userid",
          {200: Reply("registered", Registered)}, body=FORM, tags=TAGS,
          errors=(400, 401, 409))
def register():
    images = _files()
    userid = _userid()
    limit = current().settings.max_images
    if len(images) > limit:
        raise ApiError(413, "too_many_images", f"{len(images)} images in one request; the limit is {limit}")
    gallery, caller = _collection(), _caller()
    _state().call("ensure_gallery", gallery, actor=caller.actor)
    enrolled, _ = enroll_photos(gallery, userid, images, EmbedQuery(faces="largest"), require=False)
    if enrolled is None:
        raise NoFaceError()
    return json_response({"success": True, "message": "face added" if enrolled.created_identity else "face updated"})


@blueprint.post("/recognize")
@document("DeepStack: who are the faces in this image?",
          {200: Reply("userid (\"unknown\" below the thresholds), confidence, box per face", RecognizedFaces)},
          body=FORM, tags=TAGS, errors=(400, 401, 409))
def recognize():
    threshold = _confidence(RECOGNIZE_CONFIDENCE)
    service, gallery = current(), _collection()
    try:
        _state().call("check_model", gallery, service.extractor.identity)    # before any embedding work
        exists = True
    except GalleryNotFoundError:
        exists = False
    faces = _faces(_files(("image",))[0])
    best = [[] for _ in faces]
    if faces and exists:
        try:
            best = _state().call("identify", gallery, np.stack([f.embedding for f in faces]), 1, False,
                                 service.extractor.identity)
        except GalleryNotFoundError:
            pass
    predictions = []
    for face, candidates in zip(faces, best):
        top = candidates[0] if candidates else None
        known = (top is not None and top.similarity >= service.settings.identify_threshold
                 and _confidence_of(top.similarity) >= threshold)
        predictions.append({"confidence": _confidence_of(top.similarity) if known else 0,
                            "userid": top.identity if known else "unknown", **_box(face)})
    return json_response({"success": True, "predictions": predictions})


@blueprint.post("/list")
@document("DeepStack: the registered userids", {200: Reply("the userids", Listed)}, tags=TAGS, errors=(401,))
def list_faces():
    return json_response({"success": True, "faces": identity_names(_state(), _collection())})


@blueprint.post("/delete")
@document("DeepStack: delete a userid and its faces (success also when it did not exist)",
          {200: Reply("deleted", Done)}, body=FORM, tags=TAGS, errors=(400, 401))
def delete():
    userid = _userid()
    try:
        _state().call("delete_identity", _collection(), userid, actor=_caller().actor)
    except (GalleryNotFoundError, IdentityNotFoundError):
        pass
    return json_response({"success": True})


@blueprint.post("/match")
@document("DeepStack: are the faces of two images the same person?",
          {200: Reply("(cosine + 1) / 2 of their largest faces", Matched)}, body=FORM, tags=TAGS,
          errors=(400, 401))
def match():
    images = _files()
    if len(images) != 2:
        raise ApiError(400, "need_two_images", "expected two image files, only one found" if len(images) == 1
                       else "only two images allowed")
    results = current().embed(images, EmbedQuery(faces="largest"))
    for result in results:
        if result.error is not None:
            raise result.error
        if not result.faces:
            raise ApiError(400, "no_face", "no face found")
    a, b = results[0].faces[0], results[1].faces[0]
    return json_response({"success": True, "similarity": _confidence_of(np.dot(a.embedding, b.embedding))})
