"""The request options and answer shapes the routes share, as pydantic models.

Query models parse the query string (:func:`serving.requests.parse_query`); answer models
describe what the routes write and are checked against real answers by the tests, with
``extra="forbid"`` so a field added to an answer and not here fails them. Choices, bounds and
defaults come from :mod:`adaface.options`. A route group's own models sit beside its routes.
"""
from __future__ import annotations

from typing import Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, RootModel

from adaface import options as opt

#: request bodies that carry one image
RAW_IMAGE = {"type": "string", "format": "binary",
             "description": "the image file's bytes (JPEG, PNG, WebP, BMP, GIF, TIFF)"}
BASE64_IMAGE = {"type": "string", "description": "the image as base64 (a data: prefix is allowed)"}
FILES = {"type": "object", "additionalProperties": {"type": "string", "format": "binary"},
         "description": "one image file per field (several: a batch)"}
FLOAT32_BYTES = {"type": "string", "format": "binary",
                 "description": "little-endian float32 values: numpy.frombuffer(body, '<f4')"}
EMBEDDING_HEADERS = ("X-Embedding-Dim", "X-Embedding-Norm", "X-Face-Box")


class Answer(BaseModel):
    """An answer shape: no field beyond those declared."""

    model_config = ConfigDict(extra="forbid")


class Query(BaseModel):
    """Query options: unknown ones are ignored, as they always were."""

    model_config = ConfigDict(extra="ignore")


def _bounded(bound: opt.Bound, kind: type, description: str):
    return Field(None, ge=kind(bound.low), le=kind(bound.high), description=description)


class EmbedQuery(Query):
    faces: Optional[Literal[opt.FACE_MODES]] = Field(
        None, description="which faces: the largest (default), the most confident, or all")
    align: Optional[Literal[opt.ALIGN_MODES]] = Field(
        None, description="auto: a 112×112 image is taken as an aligned crop; always: detect; never: must be a crop")
    max_faces: Optional[int] = _bounded(opt.MAX_FACES, int, "at most this many faces with faces=all")
    min_face_size: Optional[int] = _bounded(opt.MIN_FACE_SIZE, int, "smallest face to detect, in pixels")


class EmbedCropQuery(EmbedQuery):
    crops: bool = Field(False, description="also each face's aligned 112×112 crop (what was embedded), as "
                                           "base64 PNG in `crop` (about 20 KB per face; JSON answers only)")


class ThresholdQuery(Query):
    threshold: Optional[float] = Field(None, ge=opt.SIMILARITY.low, le=opt.SIMILARITY.high, allow_inf_nan=False,
                                       description="cosine similarity at or above which it is the same person "
                                                   "(default: the configured one)")


class VerifyQuery(EmbedQuery, ThresholdQuery):
    pass


# -- bodies ------------------------------------------------------------------------------------

class ImageRequest(BaseModel):
    image: Optional[str] = Field(None, description="one image as base64")


class EmbedRequest(ImageRequest):
    images: Optional[list[str]] = Field(None, description="a batch: one base64 image per entry")


class VerifyRequest(BaseModel):
    image1: Optional[str] = None
    image2: Optional[str] = None
    images: Optional[list[str]] = Field(None, min_length=2, max_length=2)


# -- answers -----------------------------------------------------------------------------------

class ErrorBody(Answer):
    code: str = Field(description="stable machine-readable code (the README's error table)")
    message: str
    status: Optional[int] = Field(None, description="the HTTP status, in a batch answer's per-image entry")


class Error(Answer):
    error: ErrorBody


Vector = list[float]


class Face(Answer):
    embedding: Vector = Field(min_length=opt.EMBEDDING_SIZE, max_length=opt.EMBEDDING_SIZE,
                              description="unit length; compare two by their dot product (cosine similarity)")
    norm: float = Field(description="length before normalisation: AdaFace's quality proxy")
    box: Optional[Vector] = Field(description="x1, y1, x2, y2 pixels; null for an aligned crop")
    score: Optional[float] = Field(description="the detector's confidence; null for an aligned crop")
    landmarks: Optional[list[Vector]] = Field(
        description="5 (x, y): left eye, right eye, nose, left and right mouth corner")
    crop: Optional[str] = Field(None, description="with ?crops=true: the aligned 112×112 RGB crop as base64 PNG")


class ImageResult(Answer):
    width: int
    height: int
    aligned_input: bool
    faces: list[Face]


class EmbedOne(ImageResult):
    model: str
    dim: int


class EmbedBatch(Answer):
    model: str
    dim: int
    results: list[Union[ImageResult, Error]]


class EmbedAnswer(RootModel[Union[EmbedOne, EmbedBatch]]):
    """One image's answer, or a batch's."""


class FaceGeometry(Answer):
    box: Optional[Vector]
    score: Optional[float]
    norm: float


class Verification(Answer):
    model: str
    similarity: float
    same_person: bool
    threshold: float
    faces: list[FaceGeometry]
