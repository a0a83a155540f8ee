"""Every vocabulary, bound and default of the library, in one place.

The settings (``config.py``), the HTTP query models (``serving/schemas.py``) and the command
line take their choices, limits and defaults from here, so a value means the same everywhere.
"""
from __future__ import annotations

from dataclasses import dataclass

from .errors import BadOptionError

#: length of an AdaFace embedding
EMBEDDING_SIZE = 512
#: side of an aligned face crop, pixels
CROP_SIZE = 112

#: which faces of an image to embed: the largest box, the most confident (the reference's
#: choice), or all of them in score order
FACE_MODES = ("largest", "score", "all")
#: auto: a 112×112 image is an already-aligned crop, anything else is detected; always: detect;
#: never: the image must be a 112×112 crop
ALIGN_MODES = ("auto", "always", "never")
#: auto: ONNX Runtime on CPU, PyTorch on CUDA
BACKENDS = ("auto", "torch", "onnx")
#: fp32: the exported graph as it is; int8: its statically quantized copy, served only when it
#: passes the accuracy gate (adaface/backends/int8.py), on the onnx backend
PRECISIONS = ("fp32", "int8")
DEVICE_FORMS = "auto, cpu, cuda or cuda:N"
#: the device names :func:`adaface.device.resolve_device` takes (case-insensitive)
DEVICE_PATTERN = r"auto|cpu|cuda(:[0-9]+)?"
#: the IR backbones ``net.ARCHS`` builds, smallest first
ARCH_NAMES = ("ir_18", "ir_34", "ir_50", "ir_101")
#: the weights value that builds deterministic random weights (embeddings mean nothing)
SYNTHETIC = "synthetic"
#: what an API key may do (docs/galleries.md, "Keys, scopes and the audit trail"): embed and
#: verify photos; read galleries (list, identify, identity verify, crops); change them (create,
#: enroll, rename, delete, re-embed); and everything, with /info and the audit trail
SCOPES = ("embed", "gallery:read", "gallery:write", "admin")
#: what an API key's name may be (it shows in logs, metrics and the audit trail)
KEY_NAME_PATTERN = r"[A-Za-z0-9_.:@-]{1,64}"


@dataclass(frozen=True)
class Bound:
    """An inclusive range of a numeric option."""

    low: float
    high: float

    def check(self, name: str, value):
        """``value`` if within [low, high], else a BadOptionError naming ``name``."""
        if not self.low <= value <= self.high:
            raise BadOptionError(f"{name} must be between {self.low} and {self.high}; got {value}")
        return value


MAX_FACES = Bound(1, 1000)              # faces per image with faces=all
#: smallest face MTCNN looks for, pixels. The floor is P-Net's 12-pixel window: below it every
#: pyramid level is the photo enlarged, and detection costs grow as (12 / min_face_size)²
MIN_FACE_SIZE = Bound(12, 10_000)
SIMILARITY = Bound(-1.0, 1.0)           # a cosine-similarity threshold
GATE_COSINE = Bound(0.9, 1.0)           # the int8 gate's lowest accepted cosine to fp32 (below 0.9 it would gate nothing)
TOP_K = Bound(1, 100)                   # identify candidates per face
LIST_LIMIT = Bound(1, 1000)             # rows per page of a listing
LIST_OFFSET = Bound(0, 2 ** 62)         # rows skipped; below SQLite's signed 64-bit integers

DEFAULT_FACES = "largest"
DEFAULT_ALIGN = "auto"
DEFAULT_BACKEND = "auto"
DEFAULT_PRECISION = "fp32"
#: the int8 graph is served only when every calibration crop's embedding has at least this cosine
#: to its fp32 embedding
DEFAULT_INT8_MIN_COSINE = 0.995
DEFAULT_DEVICE = "auto"
DEFAULT_MAX_FACES = 20
DEFAULT_MIN_FACE_SIZE = 20.0            # the reference's value
#: decoded image size limit, pixels: a 50-megapixel phone photo (8192×6144 = 50.3 Mpx) and a
#: little more; larger ones are refused from their header, before any pixel is decoded
MAX_PIXELS = 52_000_000
#: the most a pixel limit can be: Pillow refuses images over twice its ``MAX_IMAGE_PIXELS``
PIXEL_CEILING = Bound(1, 178_956_970)
DEFAULT_VERIFY_THRESHOLD = 0.35
DEFAULT_IDENTIFY_THRESHOLD = 0.35
DEFAULT_TOP_K = 5
#: gallery faces from which search goes through an inverted file (IVF-PQ) instead of the float16 scan
DEFAULT_ANN_MIN_FACES = 200_000
#: the inverted file's lists scanned per probe (gallery/ann.py): more is slower and finds more of
#: the true nearest faces (docs/galleries.md)
DEFAULT_ANN_NPROBE = 32
DEFAULT_LIST_LIMIT = 100
#: faces per network forward when none is configured, by device type
DEFAULT_MAX_BATCH = {"cpu": 8, "cuda": 32}


def choice(name: str, value: str, allowed: tuple) -> str:
    """``value`` if it is one of ``allowed``, else a BadOptionError listing them."""
    if value not in allowed:
        raise BadOptionError(f"{name} must be one of {', '.join(allowed)}; got {value!r}")
    return value


def default_max_batch(device_type: str) -> int:
    """Faces per forward for a device type (``cpu``, ``cuda``) when none is configured."""
    return DEFAULT_MAX_BATCH.get(device_type, DEFAULT_MAX_BATCH["cpu"])


@dataclass(frozen=True)
class EmbedOptions:
    """How one image is turned into crops (see :meth:`adaface.pipeline.Extractor.prepare`).

    ``None`` fields take the extractor's own values; ``detect_max_side=0`` detects at full
    resolution. :meth:`checked` raises BadOptionError for a value outside its vocabulary or bound.
    """

    faces: str = DEFAULT_FACES
    align_mode: str = DEFAULT_ALIGN
    max_faces: int | None = None
    min_face_size: float | None = None
    max_pixels: int | None = None
    detect_max_side: int | None = None

    def checked(self) -> "EmbedOptions":
        choice("faces", self.faces, FACE_MODES)
        choice("align", self.align_mode, ALIGN_MODES)
        if self.max_faces is not None:
            MAX_FACES.check("max_faces", self.max_faces)
        if self.min_face_size is not None:
            MIN_FACE_SIZE.check("min_face_size", self.min_face_size)
        return self
