"""Request parsing: where the image(s) are in a request, and the embedding options.

One image: a raw image body, a base64 text body (told apart by content), JSON
``{"image": "<base64>"}`` or a multipart form with one file. A batch: JSON
``{"images": ["<base64>", ...]}`` or a multipart form with several files (or a field named
``images``). Base64 may carry a ``data:image/...;base64,`` prefix.
"""
from flask import Request

from .errors import ApiError

FACES = ("largest", "score", "all")
ALIGN = ("auto", "always", "never")


def _json_body(request: Request):
    body = request.get_json(silent=True)
    if body is None:
        raise ApiError(400, "bad_json", "the body is not valid JSON")
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
        inputs, batch = [request.get_data(cache=False)], False
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


def _number_arg(args, name: str, kind: type, low, high, default):
    """Query option ``name`` parsed as ``kind`` within [low, high], or ``default`` when absent."""
    raw = args.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = kind(raw)
    except ValueError:
        noun = "an integer" if kind is int else "a number"
        raise ApiError(400, "bad_option", f"{name} must be {noun}; got {raw!r}") from None
    if not low <= value <= high:
        raise ApiError(400, "bad_option", f"{name} must be between {low} and {high}; got {value}")
    return value


def int_arg(args, name: str, low: int, high: int, default=None):
    """Integer query option ``name`` within [low, high], or ``default`` when absent."""
    return _number_arg(args, name, int, low, high, default)


def _choice_arg(args, name: str, allowed: tuple, default: str) -> str:
    value = args.get(name) or default
    if value not in allowed:
        raise ApiError(400, "bad_option", f"{name} must be one of {', '.join(allowed)}; got {value!r}")
    return value


def embed_options(args, settings) -> dict:
    """Query-string options over the settings' defaults -> keyword arguments of
    ``AdaFaceFeature.prepare`` (the settings' limits apply to every request)."""
    max_faces = int_arg(args, "max_faces", 1, 1000)
    min_face = int_arg(args, "min_face_size", 1, 10000)
    return {"faces": _choice_arg(args, "faces", FACES, settings.faces),
            "align_mode": _choice_arg(args, "align", ALIGN, settings.align),
            "max_faces": max_faces or settings.max_faces,
            "min_face_size": float(min_face) if min_face is not None else settings.min_face_size,
            "max_pixels": settings.max_pixels,
            "detect_max_side": settings.detect_max_side}


def threshold_arg(args, default: float) -> float:
    """The ``threshold`` query option (a cosine similarity, -1 to 1), or ``default``."""
    return _number_arg(args, "threshold", float, -1.0, 1.0, default)
