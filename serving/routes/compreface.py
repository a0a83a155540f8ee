"""CompreFace's REST API v1 (``/api/v1/...``) over our galleries: what the CompreFace SDKs,
Double Take and the Frigate add-ons call (docs/compatibility.md).

A thin layer: each view translates CompreFace's request into the gallery and embedding calls
the ``/v1`` routes make (same store, model check, keys, scopes, audit trail) and our answer into
CompreFace's shapes. Subjects are identities and face examples are faces of the gallery the key
addresses (:func:`serving.collection.collection`); ``image_id`` is the face id as a UUID
string; ``similarity`` is the cosine similarity (at least 0, 5 decimals). Errors are
CompreFace's ``{"message": ..., "code": N}`` with its codes where it has one (:func:`_translate`).
"""
from __future__ import annotations

import logging
import math
from typing import Optional

import numpy as np
from flask import Blueprint, Response, request
from pydantic import Field, RootModel
from werkzeug.exceptions import HTTPException

from adaface import options as opt
from adaface.errors import NoFaceError
from gallery.errors import GalleryNotFoundError, IdentityExistsError, IdentityNotFoundError

from .. import requests
from ..access import presented_key
from ..collection import collection, face_id, identity_names, image_id, int_box, largest_first
from ..errors import ApiError, client_error
from ..openapi import Reply, document
from ..responses import json_response, note_error
from ..schemas import Answer, EmbedQuery, Query
from ..service import current
from .galleries import _caller, _state, enroll_photos

logger = logging.getLogger(__name__)
blueprint = Blueprint("compreface", __name__, url_prefix="/api/v1")
TAGS = ("CompreFace",)
PLUGINS = ("landmarks", "calculator")          # face_plugins we answer; age, gender, mask, pose are ignored
#: CompreFace's error code for each of ours it has one for (anything else: 0, with our status)
CODES = {"bad_option": 26, "bad_json": 26, "bad_name": 26, "no_image": 34, "empty_body": 34,
         "bad_base64": 21, "not_an_image": 21, "truncated_image": 21, "bad_image": 21, "unsupported_format": 21,
         "no_face": 28, "not_aligned": 28, "identity_not_found": 42, "identity_exists": 43,
         "face_not_found": 44, "crop_not_found": 44}
SERVICES = {"recognition": "Recognition", "detection": "Detection", "verification": "Verification"}
MAX_PAGE_SIZE = opt.LIST_LIMIT.high


# -- options ---------------------------------------------------------------------------------------

class FaceOptions(Query):
    limit: int = Field(0, ge=0, le=opt.MAX_FACES.high, description="at most this many faces, largest first (0: all)")
    det_prob_threshold: Optional[float] = Field(None, ge=0, le=1, allow_inf_nan=False,
                                                description="faces the detector is less sure of are left out")
    face_plugins: str = Field("", description="landmarks, calculator (the embedding); age, gender, mask and "
                                              "pose are ignored")
    status: bool = Field(False, description="add plugins_versions")


class RecognizeOptions(FaceOptions):
    prediction_count: int = Field(1, ge=-1, le=opt.TOP_K.high, description="subjects per face (-1: as many as "
                                                                            f"{opt.TOP_K.high})")
    detect_faces: bool = Field(True, description="false: the image is an aligned 112×112 face crop")


class AddOptions(Query):
    subject: str = Field("", description="the subject the example is added to (created if new)")
    det_prob_threshold: Optional[float] = Field(None, ge=0, le=1, allow_inf_nan=False)


class PageOptions(Query):
    page: int = Field(0, ge=0, le=opt.LIST_OFFSET.high, description="page number, from 0")
    size: int = Field(20, ge=1, le=MAX_PAGE_SIZE, description="examples per page")
    subject: str = Field("", description="only this subject's examples")


class SubjectQuery(Query):
    subject: str = ""


# -- answers ---------------------------------------------------------------------------------------

class Box(Answer):
    probability: float = Field(description="the detector's score, 5 decimals")
    x_max: int
    y_max: int
    x_min: int
    y_min: int


class FaceObject(Answer):
    embedding: Optional[list[float]] = Field(None, description="with face_plugins=calculator")
    box: Box
    landmarks: Optional[list[list[int]]] = Field(None, description="with face_plugins=landmarks: 5 (x, y)")


class Versions(Answer):
    detector: str
    calculator: str


class SubjectScore(Answer):
    subject: str
    similarity: float = Field(description="cosine similarity, at least 0, 5 decimals")


class RecognizedFace(FaceObject):
    subjects: list[SubjectScore]


class Recognition(Answer):
    result: list[RecognizedFace]
    plugins_versions: Optional[Versions] = Field(None, description="with status=true")


class Detection(Answer):
    result: list[FaceObject]
    plugins_versions: Optional[Versions] = None


class ExampleMatch(FaceObject):
    subject: str
    similarity: float


class ExampleVerification(Answer):
    result: list[ExampleMatch]
    plugins_versions: Optional[Versions] = None


class FaceMatch(FaceObject):
    similarity: float


class VerificationEntry(Answer):
    source_image_face: FaceObject
    face_matches: list[FaceMatch]
    plugins_versions: Optional[Versions] = None


class Verification(Answer):
    result: list[VerificationEntry]


class EmbeddingRanking(Answer):
    embedding: list[float]
    similarities: list[SubjectScore]


class EmbeddingRecognition(Answer):
    result: list[EmbeddingRanking]


class EmbeddingScore(Answer):
    embedding: list[float]
    similarity: float


class EmbeddingVerification(Answer):
    result: list[EmbeddingScore]


class SubjectOut(Answer):
    subject: str


class SubjectList(Answer):
    subjects: list[str]


class Updated(Answer):
    updated: bool


class DeletedCount(Answer):
    deleted: int


class Example(Answer):
    image_id: str = Field(description="a UUID string")
    subject: str


class Examples(RootModel[list[Example]]):
    pass


class ExamplePage(Answer):
    faces: list[Example]
    page_number: int
    page_size: int
    total_pages: int
    total_elements: int


# -- errors ----------------------------------------------------------------------------------------

def _service_name() -> str:
    part = request.path.split("/")[3] if request.path.count("/") >= 3 else "recognition"
    return SERVICES.get(part, "Recognition")


def _translate(exc: BaseException) -> tuple:
    """(HTTP status, CompreFace code, message) for an exception, or None for a bug."""
    known = client_error(exc)
    if known is None:
        return None
    status, code, message = known
    note_error(code)
    if code == "unauthorized":
        if presented_key(request.headers) is None:
            return 400, 20, "Missing header: x-api-key"
        return 404, 10, f"{_service_name()} service with this API Key not found"
    if code == "forbidden":
        return 404, 10, f"{_service_name()} service with this API Key not found: {message}"
    if code == "no_face":
        return 400, 28, "No face is found in the given image"
    if code == "identity_not_found":
        return 404, 42, f"Subject {getattr(exc, 'name', '')} not found"
    if code == "gallery_not_found":             # nothing was added to the key's gallery yet
        args = request.view_args or {}
        if "image" in args:
            return 404, 44, f"Image {args['image']} not found"
        return 404, 42, f"Subject {args.get('subject', request.args.get('subject', ''))} not found"
    if code == "identity_exists":
        return 400, 43, "Subject already exists"
    if code in CODES:
        return (404 if CODES[code] in (42, 44) else 400), CODES[code], message
    return status, 0, message


@blueprint.errorhandler(Exception)
def _error(exc: Exception):
    if isinstance(exc, HTTPException):
        return json_response({"message": exc.description or exc.name, "code": 0}, exc.code or 500)
    translated = _translate(exc)
    if translated is None:
        logger.exception("unhandled error")
        note_error("internal_error")
        return json_response({"message": "Something went wrong, please try again (logged)", "code": 0}, 500)
    status, code, message = translated
    return json_response({"message": message, "code": code}, status, headers=getattr(exc, "headers", None))


# -- requests and answers --------------------------------------------------------------------------

def _collection() -> str:
    return collection(_caller(), current().settings.compat_gallery)


def _image(field: str = "file"):
    """The one image of a request: the multipart part ``field``, or JSON ``{field: base64}``."""
    if request.mimetype == "multipart/form-data":
        part = request.files.get(field)
        if part is None:
            raise ApiError(400, "no_image", f"Required part {field} is missing")
        return part.read()
    if requests.is_json(request):
        value = requests.json_object(request).get(field)
        if not isinstance(value, str) or not value:
            raise ApiError(400, "no_image", f"Field {field} cannot be empty: send base64 text")
        return value
    raise ApiError(415, "unsupported_media_type", f"send the image as a multipart part {field!r} or as JSON "
                   f'{{"{field}": "<base64>"}}')


def _embed_query(detect: bool = True, all_faces: bool = True) -> EmbedQuery:
    return EmbedQuery.model_validate({"faces": "all" if all_faces else "largest",
                                      **({} if detect else {"align": "never"})})


def _faces(data, options, detect: bool = True, all_faces: bool = True) -> tuple:
    """(faces, width, height) of one image: detected, those the detector is less sure of than
    ``det_prob_threshold`` left out, largest first, at most ``limit`` (0: all); 400 code 28
    when none is left."""
    result = current().embed([data], _embed_query(detect, all_faces))[0]
    faces = result.require_faces()
    threshold = options.det_prob_threshold
    if threshold is not None:
        faces = [f for f in faces if f.score is None or f.score >= threshold]
    if not faces:
        raise NoFaceError()
    faces = largest_first(faces)
    limit = getattr(options, "limit", 0)
    return (faces[:limit] if limit else faces), result.width, result.height


def _similarity(value: float) -> float:
    return round(max(0.0, float(value)), 5)


def _face_object(face, options, width: int, height: int) -> dict:
    """CompreFace's face: ``box`` (integer corners, the detector's ``probability``), and with
    the plugins ``landmarks`` (5 integer points) and ``embedding``."""
    plugins = {p.strip() for p in options.face_plugins.split(",")}
    x1, y1, x2, y2 = int_box(face, width, height)
    out = {}
    if "calculator" in plugins:
        out["embedding"] = face.embedding
    out["box"] = {"probability": round(1.0 if face.score is None else float(face.score), 5),
                  "x_max": x2, "y_max": y2, "x_min": x1, "y_min": y1}
    if "landmarks" in plugins and face.landmarks is not None:
        out["landmarks"] = [[int(round(float(x))), int(round(float(y)))] for x, y in np.asarray(face.landmarks)]
    return out


def _answer(body: dict, options) -> Response:
    if options.status:
        body["plugins_versions"] = _versions()
    return json_response(body)


def _versions() -> dict:
    return {"detector": "mtcnn", "calculator": current().model}


def _subject_arg(value) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ApiError(400, "bad_option", "Subject name is empty")
    return value


def _example(gallery: str, image: str) -> tuple:
    """(face id, subject, its embedding float32 (512,)) of an example of ``gallery``; 404 code 44."""
    fid = face_id(image)
    if fid is not None:
        described = _state().call("describe_faces", [fid]).get(fid)
        if described is not None:
            try:
                ids, vectors = _state().call("identity_vectors", gallery, described[1])
            except (GalleryNotFoundError, IdentityNotFoundError):
                ids = []
            for i, fid_ in enumerate(ids):
                if int(fid_) == fid:
                    return fid, described[1], vectors[i]
    raise ApiError(404, "face_not_found", f"Image {image} not found")


def _embeddings(body: dict, key: str) -> np.ndarray:
    """``body[key]``: a list of 512-float vectors, as unit rows float32 (k, 512)."""
    value = body.get(key)
    if not isinstance(value, list) or not value:
        raise ApiError(400, "bad_json", f"Field {key} cannot be empty: a list of {opt.EMBEDDING_SIZE}-number lists")
    return np.stack([_unit(v, f"{key}[{i}]") for i, v in enumerate(value)])


def _unit(vector, where: str) -> np.ndarray:
    try:
        v = np.asarray(vector, np.float64)
    except (TypeError, ValueError):
        v = np.zeros(0)
    norm = np.linalg.norm(v) if v.shape == (opt.EMBEDDING_SIZE,) and np.all(np.isfinite(v)) else 0.0
    if not (np.isfinite(norm) and norm > 0):
        raise ApiError(400, "bad_json", f"{where}: {opt.EMBEDDING_SIZE} finite numbers, not all 0, were expected")
    return (v / norm).astype(np.float32)


def _ranked(gallery: str, probes: np.ndarray, count: int) -> list:
    """Per probe row, the ``count`` best subjects (-1: the most allowed) as CompreFace's
    ``[{"subject", "similarity"}]``; empty lists when the gallery does not exist yet."""
    top_k = opt.TOP_K.high if count == -1 else count
    model = current().extractor.identity
    try:
        per_probe = _state().call("identify", gallery, probes, top_k, False, model)
    except GalleryNotFoundError:
        return [[] for _ in range(len(probes))]
    return [[{"subject": c.identity, "similarity": _similarity(c.similarity)} for c in found]
            for found in per_probe]


def _check_model(gallery: str) -> None:
    try:
        _state().call("check_model", gallery, current().extractor.identity)
    except GalleryNotFoundError:
        pass


# -- subjects --------------------------------------------------------------------------------------

@blueprint.post("/recognition/subjects")
@document("CompreFace: add a subject", {201: Reply("the subject", SubjectOut)}, tags=TAGS, errors=(400, 401, 404))
def add_subject():
    name = _subject_arg(requests.json_object(request).get("subject"))
    gallery, caller = _collection(), _caller()
    _state().call("ensure_gallery", gallery, actor=caller.actor)
    try:
        _state().call("get_identity", gallery, name)
    except IdentityNotFoundError:
        _state().call("enroll", gallery, name, [], actor=caller.actor)
        return json_response({"subject": name}, status=201)
    raise IdentityExistsError(gallery, name)


@blueprint.get("/recognition/subjects")
@document("CompreFace: list subjects", {200: Reply("the subjects by name", SubjectList)}, tags=TAGS, errors=(400, 401, 404))
def list_subjects():
    return json_response({"subjects": identity_names(_state(), _collection())})


@blueprint.put("/recognition/subjects/<subject>")
@document("CompreFace: rename a subject (into an existing one: merge)", {200: Reply("whether it changed", Updated)},
          tags=TAGS, errors=(400, 401, 404))
def rename_subject(subject):
    new = requests.json_object(request).get("subject")
    gallery, caller = _collection(), _caller()
    if not isinstance(new, str) or not new or new == subject:
        _state().call("get_identity", gallery, subject)
        return json_response({"updated": False})
    try:
        _state().call("get_identity", gallery, new)
    except IdentityNotFoundError:
        _state().call("update_identity", gallery, subject, new, actor=caller.actor)
    else:
        _state().call("merge_identity", gallery, subject, new, actor=caller.actor)
    return json_response({"updated": True})


@blueprint.delete("/recognition/subjects/<subject>")
@document("CompreFace: delete a subject and its examples", {200: Reply("the deleted subject", SubjectOut)}, tags=TAGS,
          errors=(400, 401, 404))
def delete_subject(subject):
    _state().call("delete_identity", _collection(), subject, actor=_caller().actor)
    return json_response({"subject": subject})


@blueprint.delete("/recognition/subjects")
@document("CompreFace: delete every subject", {200: Reply("how many subjects were deleted", DeletedCount)}, tags=TAGS,
          errors=(400, 401, 404))
def delete_all_subjects():
    gallery = _collection()
    try:
        count = _state().call("get_gallery", gallery).identities
        _state().call("delete_gallery", gallery, actor=_caller().actor)
    except GalleryNotFoundError:
        count = 0
    return json_response({"deleted": count})


# -- face examples ---------------------------------------------------------------------------------

@blueprint.post("/recognition/faces")
@document("CompreFace: add a face example to a subject (an image, or an embedding)",
          {201: Reply("the new example", Example)}, query=AddOptions, tags=TAGS,
          description="multipart part file, JSON {\"file\": base64}, or JSON {\"embedding\": [512 numbers]} (no crop "
                      "is kept for it); the largest face is stored.",
          errors=(400, 401, 404, 409, 413, 415))
def add_example():
    options = requests.parse_query(AddOptions, request.args)
    subject = _subject_arg(options.subject)
    gallery, caller = _collection(), _caller()
    _state().call("ensure_gallery", gallery, actor=caller.actor)
    if requests.is_json(request) and "embedding" in requests.json_object(request):
        record = _add_embedding(gallery, subject, _unit(requests.json_object(request)["embedding"], "embedding"))
    else:
        threshold = options.det_prob_threshold
        enrolled, _ = enroll_photos(gallery, subject, [_image()], EmbedQuery(faces="largest"),
                                    accept=lambda f: threshold is None or f.score is None or f.score >= threshold)
        record = enrolled.faces[0][0]
    return json_response({"image_id": image_id(record.id), "subject": subject}, status=201)


def _add_embedding(gallery: str, subject: str, vector: np.ndarray):
    from gallery.galleries import photo_sha256
    from gallery.store import NewFace
    model = current().extractor.identity
    enrolled = _state().call("enroll", gallery, subject, [NewFace(vector, 1.0, photo_sha256(vector.tobytes()))],
                             None, model, actor=_caller().actor)
    return enrolled.faces[0][0]


@blueprint.get("/recognition/faces")
@document("CompreFace: list face examples, a page at a time", {200: Reply("a page of examples", ExamplePage)},
          query=PageOptions, tags=TAGS, errors=(400, 401, 404))
def list_examples():
    options = requests.parse_query(PageOptions, request.args)
    if options.page * options.size > opt.LIST_OFFSET.high:
        raise ApiError(400, "bad_option", f"page {options.page} of {options.size} is beyond the last possible page")
    try:
        faces, total = _state().call("list_faces", _collection(), options.subject or None, options.size,
                                     options.page * options.size)
    except GalleryNotFoundError:
        faces, total = [], 0
    return json_response({"faces": [{"image_id": image_id(r.id), "subject": name} for r, name in faces],
                          "page_number": options.page, "page_size": options.size,
                          "total_pages": math.ceil(total / options.size), "total_elements": total})


@blueprint.delete("/recognition/faces")
@document("CompreFace: delete a subject's examples (and the subject)", {200: Reply("how many examples were deleted", DeletedCount)},
          query=SubjectQuery, tags=TAGS, errors=(400, 401, 404))
def delete_examples_of_subject():
    subject = _subject_arg(requests.parse_query(SubjectQuery, request.args).subject)
    try:
        removed = _state().call("delete_identity", _collection(), subject, actor=_caller().actor)
    except (GalleryNotFoundError, IdentityNotFoundError):
        removed = 0
    return json_response({"deleted": removed})


@blueprint.delete("/recognition/faces/<image>")
@document("CompreFace: delete one face example", {200: Reply("the deleted example", Example)}, tags=TAGS,
          errors=(400, 401, 404))
def delete_example(image):
    deleted = _delete(_collection(), [image])
    if not deleted:
        raise ApiError(404, "face_not_found", f"Image {image} not found")
    return json_response(deleted[0])


@blueprint.post("/recognition/faces/delete")
@document("CompreFace: delete several face examples (unknown ids are skipped)",
          {200: Reply("the deleted examples", Examples)}, tags=TAGS, errors=(400, 401, 404))
def delete_examples():
    ids = requests.parse_json(request)
    if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
        raise ApiError(400, "bad_json", "send a JSON list of image_id strings")
    return json_response(_delete(_collection(), ids))


def _delete(gallery: str, images: list) -> list:
    ids = [i for i in (face_id(image) for image in images) if i is not None]
    if not ids:
        return []
    try:
        deleted = _state().call("delete_faces", gallery, ids, actor=_caller().actor)
    except GalleryNotFoundError:
        return []
    return [{"image_id": image_id(r.id), "subject": name} for r, name in deleted]


@blueprint.get("/recognition/faces/<image>/img")
@document("CompreFace: a face example's image (the stored aligned 112×112 crop, PNG)",
          {200: Reply("PNG", {"type": "string", "format": "binary"}, "image/png")}, tags=TAGS,
          errors=(401, 404))
def example_image(image):
    fid = face_id(image)
    if fid is None:
        raise ApiError(404, "face_not_found", f"Image {image} not found")
    png = _state().call("face_crop", _collection(), fid)
    return Response(png, mimetype="image/png", headers={"Cache-Control": "no-store"})


@blueprint.post("/recognition/faces/<image>/verify")
@document("CompreFace: compare the faces of an image with one face example", {200: Reply("each face against the example", ExampleVerification)},
          query=FaceOptions, tags=TAGS, errors=(400, 401, 404, 409, 413, 415))
def verify_example(image):
    options = requests.parse_query(FaceOptions, request.args)
    gallery = _collection()
    _check_model(gallery)
    _, subject, vector = _example(gallery, image)
    faces, width, height = _faces(_image(), options)
    result = [{**_face_object(f, options, width, height), "subject": subject,
               "similarity": _similarity(np.dot(f.embedding, vector))} for f in faces]
    return _answer({"result": result}, options)


# -- recognize -------------------------------------------------------------------------------------

@blueprint.post("/recognition/recognize")
@document("CompreFace: who are the faces in this image?", {200: Reply("box and subjects per face", Recognition)},
          query=RecognizeOptions, tags=TAGS, errors=(400, 401, 404, 409, 413, 415))
def recognize():
    options = requests.parse_query(RecognizeOptions, request.args)
    if options.prediction_count == 0:
        raise ApiError(400, "bad_option", "prediction_count should be equal or greater than 1, or -1")
    gallery = _collection()
    _check_model(gallery)
    faces, width, height = _faces(_image(), options, detect=options.detect_faces)
    ranked = _ranked(gallery, np.stack([f.embedding for f in faces]), options.prediction_count)
    result = [{**_face_object(f, options, width, height), "subjects": subjects} for f, subjects in zip(faces, ranked)]
    return _answer({"result": result}, options)


class EmbeddingCount(Query):
    prediction_count: int = Field(1, ge=-1, le=opt.TOP_K.high)


@blueprint.post("/recognition/embeddings/recognize")
@document("CompreFace: the nearest subjects of embeddings", {200: Reply("the nearest subjects per embedding", EmbeddingRecognition)},
          query=EmbeddingCount, tags=TAGS, errors=(400, 401, 404, 409))
def recognize_embeddings():
    count = requests.parse_query(EmbeddingCount, request.args).prediction_count
    if count == 0:
        raise ApiError(400, "bad_option", "prediction_count should be equal or greater than 1, or -1")
    gallery = _collection()
    _check_model(gallery)
    body = requests.json_object(request)
    probes = _embeddings(body, "embeddings")
    ranked = _ranked(gallery, probes, count)
    return json_response({"result": [{"embedding": e, "similarities": s} for e, s in zip(body["embeddings"], ranked)]})


@blueprint.post("/recognition/embeddings/faces/<image>/verify")
@document("CompreFace: embeddings against one face example", {200: Reply("similarity per embedding", EmbeddingVerification)},
          tags=TAGS, errors=(400, 401, 404, 409))
def verify_embeddings_with_example(image):
    gallery = _collection()
    _check_model(gallery)
    _, _, vector = _example(gallery, image)
    body = requests.json_object(request)
    probes = _embeddings(body, "embeddings")
    return json_response({"result": [{"embedding": e, "similarity": _similarity(np.dot(p, vector))}
                                     for e, p in zip(body["embeddings"], probes)]})


# -- detection and verification services -----------------------------------------------------------

@blueprint.post("/detection/detect")
@document("CompreFace: detect faces", {200: Reply("the faces", Detection)},
          query=FaceOptions, tags=TAGS, errors=(400, 401, 404, 413, 415))
def detect():
    options = requests.parse_query(FaceOptions, request.args)
    faces, width, height = _faces(_image(), options)
    return _answer({"result": [_face_object(f, options, width, height) for f in faces]}, options)


@blueprint.post("/verification/verify")
@document("CompreFace: the face of a source image against every face of a target image",
          {200: Reply("the source face and each target face's similarity", Verification)}, query=FaceOptions, tags=TAGS,
          description="multipart parts source_image and target_image, or JSON with both as base64; the source's "
                      "largest face is compared.",
          errors=(400, 401, 404, 413, 415))
def verify_images():
    options = requests.parse_query(FaceOptions, request.args)
    source_faces, sw, sh = _faces(_image("source_image"), options, all_faces=False)
    target_faces, tw, th = _faces(_image("target_image"), options)
    source = source_faces[0]
    matches = [{**_face_object(f, options, tw, th), "similarity": _similarity(np.dot(f.embedding, source.embedding))}
               for f in target_faces]
    entry = {"source_image_face": _face_object(source, options, sw, sh), "face_matches": matches}
    if options.status:
        entry["plugins_versions"] = _versions()
    return json_response({"result": [entry]})


@blueprint.post("/verification/embeddings/verify")
@document("CompreFace: one embedding against several", {200: Reply("similarity per target", EmbeddingVerification)},
          tags=TAGS, errors=(400, 401, 404))
def verify_embeddings():
    body = requests.json_object(request)
    source = _embeddings({"source": [body.get("source")]}, "source")[0]
    targets = _embeddings(body, "targets")
    return json_response({"result": [{"embedding": e, "similarity": _similarity(np.dot(t, source))}
                                     for e, t in zip(body["targets"], targets)]})
