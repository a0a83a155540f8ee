"""How answers are written: JSON through orjson, per-image entries, packed float32 bytes."""
from __future__ import annotations

import numpy as np
import orjson
from flask import Response, g, has_request_context

from adaface.options import EMBEDDING_SIZE

OCTET = "application/octet-stream"


def json_response(payload, status: int = 200, headers=None) -> Response:
    """Serialise with orjson (NumPy arrays written natively, float32 as shortest float32 text)."""
    body = orjson.dumps(payload, option=orjson.OPT_SERIALIZE_NUMPY)
    return Response(body, status=status, mimetype="application/json", headers=headers)


def error_payload(code: str, message: str) -> dict:
    return {"error": {"code": code, "message": message}}


def error_response(status: int, code: str, message: str, headers=None) -> Response:
    note_error(code)
    return json_response(error_payload(code, message), status, headers)


def note_error(code: str) -> None:
    """Record the error code of this request's answer (the ``adaface_errors_total`` label)."""
    if has_request_context():
        g.error_code = code


def image_entry(result) -> dict:
    """An :class:`adaface.faces.ImageFaces` with faces as its JSON entry."""
    return {"width": result.width, "height": result.height, "aligned_input": result.aligned,
            "faces": [f.to_dict() for f in result.faces]}


def embedding_bytes(vectors) -> bytes:
    """Embeddings (512,) or N×512 as little-endian float32 bytes."""
    return np.ascontiguousarray(vectors, dtype="<f4").tobytes()


def packed_embeddings(results: list) -> tuple:
    """(bytes of every face's embedding N×512 float32, faces per input) of per-input results."""
    faces = [f for r in results for f in r.faces]
    counts = [len(r.faces) for r in results]
    matrix = np.stack([f.embedding for f in faces]) if faces else np.zeros((0, EMBEDDING_SIZE), np.float32)
    return embedding_bytes(matrix), counts
