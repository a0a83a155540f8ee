"""Request parsing: where the image(s) are in a request, JSON bodies, and query options.

One image: a raw image body, a base64 text body (told apart by content), JSON
``{"image": "<base64>"}`` or a multipart form with one file. A batch: JSON
``{"images": ["<base64>", ...]}`` or a multipart form with several files (or a field named
``images``). Base64 may carry a ``data:image/...;base64,`` prefix.

Query options are parsed by the route's pydantic model (:mod:`serving.schemas`), the same model
the OpenAPI document describes; a bad value is a 400 ``bad_option`` naming the option.
"""
from __future__ import annotations

import typing

import orjson
import pydantic
from flask import Request

from adaface.options import EmbedOptions
from adaface.threads import Offloader

from .errors import ApiError


#: JSON bodies at least this large are parsed in a native thread, not on the event loop
OFFLOAD_JSON_BYTES = 1 << 20
#: where the body read up front (``serving.hooks.read_body``) and its parsed JSON are kept in
#: the WSGI environ
BODY_KEY, JSON_KEY = "adaface.body", "adaface.json"
_parser = Offloader(size=2)


def _loads(data: bytes):
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        raise ApiError(400, "bad_json", f"the body is not valid JSON: {exc}") from None


def body_bytes(request: Request) -> bytes:
    """The request body: as read up front (:func:`serving.hooks.read_body`), without a copy."""
    body = request.environ.get(BODY_KEY)
    return body if body is not None else request.get_data(cache=True)


def parse_json(request: Request):
    """The body parsed as JSON (orjson: UTF-8, at most 1,024 levels deep, no NaN or infinite
    numbers), or a 400 ``bad_json`` saying why; a large body is parsed off the event loop."""
    if JSON_KEY in request.environ:  # parsed already (an enroll reads images and metadata)
        return request.environ[JSON_KEY]
    data = body_bytes(request)
    if not data:
        raise ApiError(400, "bad_json", "the body is empty; send a JSON object")
    value = _parser.call(_loads, data) if len(data) >= OFFLOAD_JSON_BYTES else _loads(data)
    request.environ[JSON_KEY] = value
    return value


def json_object(request: Request) -> dict:
    """The body as a JSON object, or a 400 ``bad_json``."""
    body = parse_json(request)
    if not isinstance(body, dict):
        raise ApiError(400, "bad_json", "the body must be a JSON object")
    return body


def _json_body(request: Request):
    body = parse_json(request)
    if not isinstance(body, dict):
        raise ApiError(400, "bad_json", 'the JSON body must be an object such as {"image": "<base64>"}')
    return body


def _check_text(value, where: str) -> str:
    if not isinstance(value, str):
        raise ApiError(400, "bad_json", f"{where} must be a base64 string")
    return value


def _form_files(request: Request) -> tuple:
    files = [(key, f) for key in request.files for f in request.files.getlist(key)]
    if not files:
        raise ApiError(400, "no_image", "the multipart form has no file field")
    return [f.read() for _, f in files], len(files) > 1 or files[0][0] == "images"


def is_json(request: Request) -> bool:
    """application/json, text/json or any +json type."""
    return request.is_json or request.mimetype == "text/json"


def image_inputs(request: Request, max_images: int) -> tuple:
    """Return ``(inputs, is_batch)``: the images as bytes or base64 text, and whether the request
    was a batch (then the answer has one entry per image)."""
    if request.mimetype == "multipart/form-data":
        inputs, batch = _form_files(request)
    elif is_json(request):
        body = _json_body(request)
        if "images" in body:
            if not isinstance(body["images"], list) or not body["images"]:
                raise ApiError(400, "bad_json", '"images" must be a non-empty list of base64 strings')
            inputs = [_check_text(v, f"images[{i}]") for i, v in enumerate(body["images"])]
            batch = True
        elif "image" in body:
            inputs, batch = [_check_text(body["image"], '"image"')], False
        else:
            raise ApiError(400, "bad_json", 'the JSON body needs "image" (one base64 image) or "images" (a list)')
    else:
        inputs, batch = [body_bytes(request)], False
    if len(inputs) > max_images:
        raise ApiError(413, "too_many_images", f"{len(inputs)} images in one request; the limit is {max_images}")
    return inputs, batch


def pair_inputs(request: Request) -> list:
    """The two images of a verify request: JSON ``image1``/``image2`` or ``images`` [a, b], or a
    multipart form with two files."""
    if request.mimetype == "multipart/form-data":
        inputs, _ = _form_files(request)
    elif is_json(request):
        body = _json_body(request)
        if "images" in body:
            if not isinstance(body["images"], list):
                raise ApiError(400, "bad_json", '"images" must be a list of two base64 strings')
            inputs = [_check_text(v, f"images[{i}]") for i, v in enumerate(body["images"])]
        else:
            inputs = [_check_text(body.get(k), f'"{k}"') for k in ("image1", "image2")]
    else:
        raise ApiError(415, "unsupported_media_type",
                       "send the two images as JSON {\"image1\": ..., \"image2\": ...} or as a multipart form")
    if len(inputs) != 2:
        raise ApiError(400, "need_two_images", f"verify compares exactly two images; got {len(inputs)}")
    return inputs


def _bad_option(model: type, error: dict) -> ApiError:
    """Our message for pydantic's first error on a query model."""
    name = str(error["loc"][0]) if error.get("loc") else "query"
    raw = error.get("input")
    field = model.model_fields.get(name)
    kind = error.get("type", "")
    if kind == "literal_error" and field is not None:
        allowed = [a for arg in typing.get_args(field.annotation) for a in (typing.get_args(arg) or [arg])
                   if isinstance(a, str)]
        return ApiError(400, "bad_option", f"{name} must be one of {', '.join(allowed)}; got {raw!r}")
    if kind.endswith("_parsing") or kind.endswith("_type"):
        noun = {"int": "an integer", "bool": "true or false"}.get(kind.split("_")[0], "a number")
        return ApiError(400, "bad_option", f"{name} must be {noun}; got {raw!r}")
    if field is not None and kind in ("greater_than_equal", "less_than_equal", "finite_number"):
        low = next((m.ge for m in field.metadata if getattr(m, "ge", None) is not None), None)
        high = next((m.le for m in field.metadata if getattr(m, "le", None) is not None), None)
        return ApiError(400, "bad_option", f"{name} must be between {low} and {high}; got {raw}")
    return ApiError(400, "bad_option", f"{name}: {error.get('msg', 'invalid value')}")


def parse_query(model: type, args):
    """The query string as ``model`` (a pydantic model); empty values count as absent."""
    values = {k: v for k, v in args.items() if v != "" and k in model.model_fields}
    try:
        return model.model_validate(values)
    except pydantic.ValidationError as exc:
        raise _bad_option(model, exc.errors()[0]) from None


def embed_options(query, settings) -> EmbedOptions:
    """An embedding query over the settings' defaults -> the pipeline's options (the settings'
    limits apply to every request)."""
    return EmbedOptions(faces=query.faces or settings.faces, align_mode=query.align or settings.align,
                        max_faces=query.max_faces or settings.max_faces,
                        min_face_size=float(query.min_face_size) if query.min_face_size is not None
                        else settings.min_face_size,
                        max_pixels=settings.max_pixels, detect_max_side=settings.detect_max_side)
