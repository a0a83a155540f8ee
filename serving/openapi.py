"""The OpenAPI 3 description of every endpoint (served at ``/openapi.json``).

A test checks that every route of the app is described here with its methods and nothing else.
"""

_IMAGE_BODY_TYPES = {
    "application/octet-stream": {"schema": {"type": "string", "format": "binary"},
                                 "description": "the image file's bytes (JPEG, PNG, WebP, BMP, GIF, TIFF)"},
    "text/plain": {"schema": {"type": "string"}, "description": "the image as base64 (a data: prefix is allowed)"},
}
_ERROR = {"$ref": "#/components/schemas/Error"}


def _errors(*statuses: int) -> dict:
    text = {400: "bad input (empty body, bad base64, not an image, bad option)", 401: "missing or wrong API key",
            413: "body over the size limit, image over the pixel limit, or too many images",
            415: "image format not supported", 422: "no face found, or not 112×112 with align=never",
            503: "not ready yet, or at capacity (Retry-After)"}
    return {str(s): {"description": text[s], "content": {"application/json": {"schema": _ERROR}}} for s in statuses}


_QUERY = [
    {"name": "faces", "in": "query", "schema": {"type": "string", "enum": ["largest", "score", "all"]},
     "description": "which faces: the largest (default), the most confident, or all"},
    {"name": "align", "in": "query", "schema": {"type": "string", "enum": ["auto", "always", "never"]},
     "description": "auto: a 112×112 image is taken as an aligned crop; always: detect; never: must be a crop"},
    {"name": "max_faces", "in": "query", "schema": {"type": "integer", "minimum": 1, "maximum": 1000}},
    {"name": "min_face_size", "in": "query", "schema": {"type": "integer", "minimum": 1, "maximum": 10000},
     "description": "smallest face to detect, in pixels"},
]
_EMBED_ERRORS = _errors(400, 401, 413, 415, 422, 503)


def _compat(summary: str, output: str, body_types: dict) -> dict:
    if output == "json":
        ok = {"description": "the primary face's embedding as [[f1, ..., f512]]",
              "content": {"application/json": {"schema": {"type": "array", "items": {
                  "type": "array", "items": {"type": "number"}, "minItems": 512, "maxItems": 512}}}}}
    else:
        ok = {"description": "512 little-endian float32 values (2,048 bytes): numpy.frombuffer(body, '<f4')",
              "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}}
    ok["headers"] = {h: {"schema": {"type": "string"}} for h in ("X-Embedding-Dim", "X-Embedding-Norm", "X-Face-Box")}
    return {"post": {"summary": summary, "parameters": _QUERY,
                     "requestBody": {"required": True, "content": body_types},
                     "responses": {"200": ok, **_EMBED_ERRORS}}}


def _get(summary: str, description: str, content_type: str = "application/json", extra=None) -> dict:
    responses = {"200": {"description": description, "content": {content_type: {"schema": {"type": "object"}
                                                                                 if content_type == "application/json"
                                                                                 else {"type": "string"}}}}}
    responses.update(extra or {})
    return {"get": {"summary": summary, "responses": responses}}


def _paths() -> dict:
    from .gallery_routes import OPENAPI_PATHS
    b64 = {"text/plain": _IMAGE_BODY_TYPES["text/plain"]}
    raw = {"application/octet-stream": _IMAGE_BODY_TYPES["application/octet-stream"]}
    either = {**_IMAGE_BODY_TYPES, "application/json": {"schema": {
        "type": "object", "properties": {"image": {"type": "string"}}}}}
    multi = {**either,
             "application/json": {"schema": {"$ref": "#/components/schemas/EmbedRequest"}},
             "multipart/form-data": {"schema": {"type": "object", "additionalProperties": {
                 "type": "string", "format": "binary"}}}}
    return {
        "/b64_represent_json": _compat("Original API: base64 body, JSON embedding", "json", b64),
        "/byte_represent_json": _compat("Original API: image bytes body, JSON embedding", "json", raw),
        "/b64_represent_byte": _compat("Original API: base64 body, float32 bytes", "bytes", b64),
        "/byte_represent_byte": _compat("Original API: image bytes body, float32 bytes", "bytes", raw),
        "/represent_json": _compat("Image bytes or base64 (told apart by content), JSON embedding", "json", either),
        "/represent_bytes": _compat("Image bytes or base64 (told apart by content), float32 bytes", "bytes", either),
        "/v1/embed": {"post": {
            "summary": "Embed the faces of one image or a batch",
            "description": "One image: raw or base64 body, JSON {\"image\"}, or one multipart file. A batch: "
                           "JSON {\"images\": [...]} or several multipart files; a bad image is an error entry. "
                           "Accept: application/octet-stream returns all embeddings packed as N×512 float32.",
            "parameters": _QUERY, "requestBody": {"required": True, "content": multi},
            "responses": {"200": {"description": "faces with embedding, norm, box, score, landmarks",
                                  "content": {"application/json": {"schema": {"$ref": "#/components/schemas/EmbedResponse"}},
                                              "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}},
                          **_EMBED_ERRORS}}},
        "/v1/verify": {"post": {
            "summary": "Are two photos the same person? Cosine similarity against a threshold",
            "parameters": _QUERY + [{"name": "threshold", "in": "query", "schema": {"type": "number"},
                                     "description": "overrides ADAFACE_VERIFY_THRESHOLD"}],
            "requestBody": {"required": True, "content": {
                "application/json": {"schema": {"$ref": "#/components/schemas/VerifyRequest"}},
                "multipart/form-data": {"schema": {"type": "object"}}}},
            "responses": {"200": {"description": "similarity and decision", "content": {"application/json": {
                "schema": {"$ref": "#/components/schemas/VerifyResponse"}}}}, **_EMBED_ERRORS}}},
        "/": _get("Service index", "name, model and where this description is"),
        "/livez": _get("Liveness: the process answers (never waits for inference)", "alive"),
        "/readyz": _get("Readiness: the model is loaded and a warm-up embedding succeeded", "ready",
                        extra=_errors(503)),
        "/info": _get("Model, weights (path and sha256), device, threads, batching, limits, versions", "info",
                      extra=_errors(401)),
        "/metrics": _get("Prometheus metrics", "text exposition format", "text/plain"),
        "/openapi.json": _get("This description", "OpenAPI 3 document"),
        **OPENAPI_PATHS,
    }


_SCHEMAS = {
    "Error": {"type": "object", "required": ["error"], "properties": {"error": {
        "type": "object", "required": ["code", "message"],
        "properties": {"code": {"type": "string"}, "message": {"type": "string"}}}}},
    "Face": {"type": "object", "properties": {
        "embedding": {"type": "array", "items": {"type": "number"}, "minItems": 512, "maxItems": 512},
        "norm": {"type": "number", "description": "pre-normalisation norm: AdaFace's quality proxy"},
        "box": {"type": "array", "nullable": True, "items": {"type": "number"}, "description": "x1, y1, x2, y2"},
        "score": {"type": "number", "nullable": True},
        "landmarks": {"type": "array", "nullable": True, "items": {"type": "array", "items": {"type": "number"}}}}},
    "ImageResult": {"type": "object", "properties": {
        "width": {"type": "integer"}, "height": {"type": "integer"}, "aligned_input": {"type": "boolean"},
        "faces": {"type": "array", "items": {"$ref": "#/components/schemas/Face"}},
        "error": {"type": "object"}}},
    "EmbedRequest": {"type": "object", "properties": {
        "image": {"type": "string"}, "images": {"type": "array", "items": {"type": "string"}}}},
    "EmbedResponse": {"type": "object", "properties": {
        "model": {"type": "string"}, "dim": {"type": "integer"},
        "faces": {"type": "array", "items": {"$ref": "#/components/schemas/Face"}},
        "results": {"type": "array", "items": {"$ref": "#/components/schemas/ImageResult"}}}},
    "VerifyRequest": {"type": "object", "properties": {
        "image1": {"type": "string"}, "image2": {"type": "string"},
        "images": {"type": "array", "items": {"type": "string"}, "minItems": 2, "maxItems": 2}}},
    "VerifyResponse": {"type": "object", "properties": {
        "similarity": {"type": "number"}, "same_person": {"type": "boolean"}, "threshold": {"type": "number"},
        "faces": {"type": "array", "items": {"type": "object"}}}},
}


def spec(settings) -> dict:
    """The OpenAPI 3.0 document for this service."""
    return {
        "openapi": "3.0.3",
        "info": {"title": "AdaFace embedding service", "version": "1.0.0",
                 "description": "Face photos in, 512-d AdaFace IR-101 embeddings out (cosine similarity "
                                f"compares them; default same-person threshold {settings.verify_threshold})."},
        "paths": _paths(),
        "components": {"schemas": _SCHEMAS, "securitySchemes": {
            "bearer": {"type": "http", "scheme": "bearer"},
            "apiKey": {"type": "apiKey", "in": "header", "name": "X-API-Key"}}},
        "security": [{"bearer": []}, {"apiKey": []}, {}],
    }
