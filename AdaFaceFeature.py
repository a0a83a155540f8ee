"""AdaFace face embeddings: image -> faces -> 512-d embeddings, as the reference pipeline makes them.

Pipeline per image: decode to RGB (:mod:`image_decode`), find faces with MTCNN and cut 112×112
crops (:mod:`face_alignment`), flip to BGR, scale as ``(x / 255 - 0.5) / 0.5`` and run the IR
backbone (:mod:`net`) on all crops in one batched forward.

As a library::

    extractor = AdaFaceFeature.from_settings()          # ADAFACE_* settings, see config.py
    faces = extractor.embed_image(open("photo.jpg", "rb").read())
    faces[0].embedding                                   # float32 (512,), unit length

From the command line (``python AdaFaceFeature.py --help``)::

    python AdaFaceFeature.py IMG...                      # one JSON line per image
    python AdaFaceFeature.py compare IMG...              # cosine-similarity matrix
    python AdaFaceFeature.py embed-dir DIR --out vectors.npz
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

import net
from backends import make_backend
from config import REPO_DIR, Settings
from face_alignment import CROP_SIZE, MTCNN, AlignmentError, DetectorParams, align
from image_decode import decode_any, decode_image

logger = logging.getLogger(__name__)

ALIGN_MODES = ("auto", "always", "never")
FACE_MODES = ("largest", "score", "all")
EMBEDDING_SIZE = 512
SYNTHETIC = "synthetic"


class FaceInputError(ValueError):
    """The image is valid but gives no embedding under the requested options (HTTP 4xx)."""

    code = "bad_request"
    status = 400


class NoFaceError(FaceInputError):
    code = "no_face"
    status = 422

    def __init__(self, message: str = "no face was found in the image"):
        super().__init__(message)


class NotAlignedError(FaceInputError):
    code = "not_aligned"
    status = 422


class BadOptionError(FaceInputError):
    code = "bad_option"
    status = 400


@dataclass
class Face:
    """One embedded face.

    embedding: float32 (512,), L2-normalised; norm: its length before normalisation (AdaFace's
    image-quality proxy: low for blurry or non-face crops); box: (x1, y1, x2, y2) pixels in the
    decoded image, score: MTCNN's O-Net confidence, landmarks: float32 5×2 (x, y) for left eye,
    right eye, nose, left and right mouth corner. box, score and landmarks are None for an input
    taken as an already-aligned crop.
    """

    embedding: np.ndarray
    norm: float
    box: Optional[np.ndarray] = None
    score: Optional[float] = None
    landmarks: Optional[np.ndarray] = None

    def to_dict(self) -> dict:
        """JSON-ready dict (NumPy arrays kept; serialise with orjson's numpy option)."""
        return {"embedding": self.embedding, "norm": self.norm,
                "box": None if self.box is None else np.round(self.box, 2),
                "score": self.score,
                "landmarks": None if self.landmarks is None else np.round(self.landmarks, 2)}


@dataclass
class FaceCrop:
    """A face ready for the network: crop is 112×112×3 uint8 RGB; the rest as in :class:`Face`."""

    crop: np.ndarray
    box: Optional[np.ndarray] = None
    score: Optional[float] = None
    landmarks: Optional[np.ndarray] = None

    def with_embedding(self, embedding: np.ndarray, norm: float) -> Face:
        return Face(embedding, float(norm), self.box, self.score, self.landmarks)


@dataclass
class PreparedImage:
    """An image decoded and cut into face crops; ``aligned`` is True when taken as is."""

    width: int
    height: int
    crops: list = field(default_factory=list)
    aligned: bool = False


def resolve_device(name: str) -> torch.device:
    """``auto`` -> CUDA when available, else CPU; ``cpu``, ``cuda``, ``cuda:N`` checked."""
    name = (name or "auto").strip().lower()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"unknown device {name!r}: use auto, cpu, cuda or cuda:N") from None
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"unsupported device {name!r}: use auto, cpu, cuda or cuda:N")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {name!r} requested but CUDA is not available on this machine")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"device {name!r} requested but only {torch.cuda.device_count()} GPU(s) exist")
    return device


def crops_to_tensor(crops: np.ndarray, device: torch.device) -> torch.Tensor:
    """N×112×112×3 uint8 RGB -> N×3×112×112 float32 BGR scaled as (x / 255 - 0.5) / 0.5."""
    t = torch.from_numpy(np.require(crops, np.uint8, ("C", "W"))).to(device)
    return t.flip(-1).permute(0, 3, 1, 2).float().div_(255.0).sub_(0.5).div_(0.5)


def _check_option(name: str, value: str, allowed: Sequence[str]) -> str:
    if value not in allowed:
        raise BadOptionError(f"{name} must be one of {', '.join(allowed)}; got {value!r}")
    return value


def _pick(detections, faces: str, max_faces: int) -> list:
    """Indices of the faces to keep: the largest box, the top score, or all (score order)."""
    if len(detections) == 0:
        return []
    if faces == "all":
        return list(range(min(len(detections), max_faces)))
    if faces == "score":
        return [0]
    b = detections.boxes
    return [int(np.argmax((b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])))]


class AdaFaceFeature:
    """The backbone and the detector, loaded once; embeds lists of images in one forward.

    ``weights`` is a checkpoint path (any form :func:`net.load_backbone` reads) or ``"synthetic"``
    for deterministic random weights (for trying things out; the embeddings mean nothing).
    ``backend`` is ``torch``, ``onnx`` or ``auto`` (see :mod:`backends`).
    """

    def __init__(self, weights: str | Path = SYNTHETIC, arch: str | None = None, device: str = "auto",
                 detector_params: DetectorParams = DetectorParams(), max_faces: int = 20,
                 max_pixels: int = 89_478_485, batch_size: int = 32, backend: str = "torch",
                 cache_dir: str | Path = REPO_DIR / "data" / "cache"):
        self.device = resolve_device(device)
        self.synthetic = str(weights) == SYNTHETIC
        if self.synthetic:
            self.arch = arch or "ir_101"
            self.backbone = net.synthetic_backbone(self.arch, device=self.device)
            self.weights_path, self.weights_sha256 = None, None
            logger.warning("using SYNTHETIC random weights: embeddings are meaningless")
        else:
            self.weights_path = net.resolve_weights_path(weights)
            self.backbone = net.load_backbone(self.weights_path, arch=arch or None, device=self.device)
            self.arch = next(n for n, d in net.ARCHS.items() if d == self.backbone.units_per_stage)
            self.weights_sha256 = net.file_sha256(self.weights_path)
        key = f"{self.arch}-seed0-torch{torch.__version__.split('+')[0]}" if self.synthetic else self.weights_sha256[:16]
        self.forward = make_backend(backend, self.backbone, self.device, key, self.weights_path,
                                    Path(cache_dir), torch.get_num_threads())
        if self.forward.name != "torch":
            self.backbone = None  # the backend holds its own copy of the weights
        self.detector = MTCNN(self.device, detector_params)
        self.max_faces = max_faces
        self.max_pixels = max_pixels
        self.batch_size = batch_size

    @classmethod
    def from_settings(cls, settings: Settings | None = None) -> "AdaFaceFeature":
        """Build from :class:`config.Settings` (``ADAFACE_*`` environment variables by default)."""
        s = settings or Settings.from_env()
        if s.threads > 0:
            torch.set_num_threads(s.threads)
        weights = SYNTHETIC if s.weights == SYNTHETIC else s.weights_path()
        params = DetectorParams(min_face_size=s.min_face_size, max_side=s.detect_max_side or None)
        return cls(weights, arch=s.arch or None, device=s.device, detector_params=params,
                   max_faces=s.max_faces, max_pixels=s.max_pixels, backend=s.backend, cache_dir=s.cache_path())

    # -- preprocessing ---------------------------------------------------------------------

    def decode(self, image, max_pixels: int | None = None) -> np.ndarray:
        """Bytes (raw or base64), base64 str, PIL image or array -> H×W×3 uint8 RGB."""
        limit = max_pixels or self.max_pixels
        if isinstance(image, (bytes, bytearray, memoryview, str)):
            return decode_any(bytes(image) if not isinstance(image, str) else image, max_pixels=limit)
        return decode_image(image, max_pixels=limit)

    def prepare(self, image, faces: str = "largest", align_mode: str = "auto",
                max_faces: int | None = None, min_face_size: float | None = None,
                max_pixels: int | None = None, detect_max_side: int | None = None) -> PreparedImage:
        """Decode, detect and align: the CPU work before the network. No face gives no crops.

        ``align_mode``: ``auto`` takes a 112×112 image as an already-aligned crop and detects
        in anything else; ``always`` detects; ``never`` requires a 112×112 crop. ``None`` options
        take the extractor's own settings; ``detect_max_side=0`` detects at full resolution.
        """
        _check_option("faces", faces, FACE_MODES)
        _check_option("align", align_mode, ALIGN_MODES)
        if max_faces is not None and not 1 <= max_faces <= 1000:
            raise BadOptionError(f"max_faces must be between 1 and 1000; got {max_faces}")
        rgb = self.decode(image, max_pixels)
        height, width = rgb.shape[:2]
        is_crop = (height, width) == (CROP_SIZE, CROP_SIZE)
        if align_mode == "never" and not is_crop:
            raise NotAlignedError(f"align=never needs a {CROP_SIZE}×{CROP_SIZE} aligned crop; got {width}×{height}")
        if align_mode == "never" or (align_mode == "auto" and is_crop):
            return PreparedImage(width, height, [FaceCrop(np.ascontiguousarray(rgb))], aligned=True)
        params = self._detector_params(min_face_size, detect_max_side)
        return PreparedImage(width, height, self._detect_crops(rgb, faces, max_faces, params))

    def _detector_params(self, min_face_size, detect_max_side) -> DetectorParams:
        params = self.detector.params
        if min_face_size is not None:
            if not 1 <= min_face_size <= 10_000:
                raise BadOptionError(f"min_face_size must be between 1 and 10000 pixels; got {min_face_size}")
            params = dataclasses.replace(params, min_face_size=float(min_face_size))
        if detect_max_side is not None:
            params = dataclasses.replace(params, max_side=detect_max_side or None)
        return params

    def _detect_crops(self, rgb: np.ndarray, faces: str, max_faces, params: DetectorParams) -> list:
        detections = self.detector.detect(rgb, params)
        crops = []
        for i in _pick(detections, faces, max_faces or self.max_faces):
            try:
                crop = align(rgb, detections.landmarks[i])
            except AlignmentError:
                continue
            crops.append(FaceCrop(crop, detections.boxes[i], float(detections.scores[i]), detections.landmarks[i]))
        return crops

    # -- the network -------------------------------------------------------------------------

    @torch.inference_mode()
    def embed_crops(self, crops: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """N×112×112×3 uint8 RGB crops -> (float32 N×512 unit embeddings, float32 N norms)."""
        if len(crops) == 0:
            return np.zeros((0, EMBEDDING_SIZE), np.float32), np.zeros(0, np.float32)
        outputs, norms = [], []
        for start in range(0, len(crops), self.batch_size):
            emb, norm = self.forward(crops_to_tensor(crops[start:start + self.batch_size], self.device))
            outputs.append(emb)
            norms.append(norm)
        return np.concatenate(outputs), np.concatenate(norms)

    def embed_prepared(self, prepared: Sequence[PreparedImage]) -> list:
        """Embed every crop of several prepared images in one batched forward; a list of face lists."""
        crops = [c for p in prepared for c in p.crops]
        if not crops:
            return [[] for _ in prepared]
        embeddings, norms = self.embed_crops(np.stack([c.crop for c in crops]))
        results, i = [], 0
        for p in prepared:
            results.append([c.with_embedding(embeddings[i + k], norms[i + k]) for k, c in enumerate(p.crops)])
            i += len(p.crops)
        return results

    def embed(self, images: Sequence, **options) -> list:
        """Embed a list of images (any input :meth:`prepare` takes); returns a list of face lists.

        An image with no face gives an empty list; bad input raises its typed error.
        """
        return self.embed_prepared([self.prepare(image, **options) for image in images])

    def embed_image(self, image, **options) -> list:
        """Faces of one image (see :meth:`embed`)."""
        return self.embed([image], **options)[0]

    def info(self) -> dict:
        """What is loaded: architecture, weights file and sha256, device."""
        return {"arch": self.arch, "weights": SYNTHETIC if self.synthetic else str(self.weights_path),
                "weights_sha256": self.weights_sha256, "synthetic": self.synthetic,
                "device": str(self.device), "backend": self.forward.name, "embedding_size": EMBEDDING_SIZE}


# -- command line ----------------------------------------------------------------------------

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}


def _extractor(args) -> AdaFaceFeature:
    overrides = {k: v for k, v in (("weights", args.weights), ("arch", args.arch), ("device", args.device))
                 if v is not None}
    return AdaFaceFeature.from_settings(Settings.from_env(**overrides))


def _embed_path(extractor: AdaFaceFeature, path: Path, args) -> list:
    return extractor.embed_image(path.read_bytes(), faces=args.faces, align_mode=args.align)


def cmd_embed(args) -> int:
    import orjson
    extractor = _extractor(args)
    status = 0
    for name in args.images:
        record = {"image": name}
        try:
            faces = _embed_path(extractor, Path(name), args)
            record["faces"] = [f.to_dict() for f in faces]
            if not faces:
                record["error"] = "no face found"
                status = 1
        except (OSError, ValueError) as exc:
            record["error"] = str(exc)
            status = 1
        sys.stdout.buffer.write(orjson.dumps(record, option=orjson.OPT_SERIALIZE_NUMPY) + b"\n")
    return status


def cosine_matrix(embeddings: np.ndarray) -> np.ndarray:
    """Cosine similarities of N unit embeddings (N×512) -> N×N."""
    return embeddings @ embeddings.T


def cmd_compare(args) -> int:
    extractor = _extractor(args)
    names, vectors = [], []
    for name in args.images:
        faces = _embed_path(extractor, Path(name), args)
        if not faces:
            print(f"{name}: no face found", file=sys.stderr)
            return 1
        names.append(Path(name).name)
        vectors.append(faces[0].embedding)
    sims = cosine_matrix(np.stack(vectors))
    width = max(len(n) for n in names)
    print(" " * width + "".join(f"{n[:9]:>10}" for n in names))
    for name, row in zip(names, sims):
        print(f"{name:<{width}}" + "".join(f"{v:10.4f}" for v in row))
    return 0


def _list_images(folder: Path) -> list:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def save_vectors(out: Path, names: list, vectors: np.ndarray, norms: np.ndarray) -> None:
    """Write names and float32 vectors (N×512) to ``.npz`` or ``.parquet`` (needs pyarrow)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix == ".parquet":
        try:
            import pyarrow as pa
            import pyarrow.parquet as pq
        except ImportError:
            raise SystemExit("writing parquet needs pyarrow: pip install pyarrow (or use a .npz file)")
        table = pa.table({"name": names, "norm": norms,
                          "embedding": pa.FixedSizeListArray.from_arrays(vectors.reshape(-1), EMBEDDING_SIZE)})
        pq.write_table(table, out)
    else:
        np.savez(out, names=np.array(names), embeddings=vectors, norms=norms)


def cmd_embed_dir(args) -> int:
    from tqdm import tqdm
    extractor = _extractor(args)
    folder = Path(args.dir)
    paths = _list_images(folder)
    names, vectors, norms, skipped = [], [], [], []
    for path in tqdm(paths, desc="embedding", unit="img"):
        try:
            faces = _embed_path(extractor, path, args)
        except (OSError, ValueError) as exc:
            skipped.append(f"{path.relative_to(folder)}: {exc}")
            continue
        if not faces:
            skipped.append(f"{path.relative_to(folder)}: no face found")
        for face in faces:
            names.append(str(path.relative_to(folder)))
            vectors.append(face.embedding)
            norms.append(face.norm)
    matrix = np.stack(vectors) if vectors else np.zeros((0, EMBEDDING_SIZE), np.float32)
    save_vectors(Path(args.out), names, matrix, np.asarray(norms, np.float32))
    print(f"wrote {len(names)} embeddings from {len(paths)} images to {args.out}")
    for line in skipped:
        print(f"skipped {line}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--weights", help="checkpoint file or folder, or 'synthetic' (default: ADAFACE_WEIGHTS)")
    common.add_argument("--arch", help="ir_18 | ir_34 | ir_50 | ir_101 (default: from the weights)")
    common.add_argument("--device", help="auto | cpu | cuda | cuda:N (default: ADAFACE_DEVICE or auto)")
    common.add_argument("--faces", default="largest", choices=FACE_MODES)
    common.add_argument("--align", default="auto", choices=ALIGN_MODES)
    parser = argparse.ArgumentParser(prog="AdaFaceFeature.py", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command")
    p = sub.add_parser("embed", parents=[common], help="print each image's faces as JSON lines")
    p.add_argument("images", nargs="+")
    p.set_defaults(func=cmd_embed)
    p = sub.add_parser("compare", parents=[common], help="print the cosine-similarity matrix")
    p.add_argument("images", nargs="+")
    p.set_defaults(func=cmd_compare)
    p = sub.add_parser("embed-dir", parents=[common], help="embed a folder into a vector file")
    p.add_argument("dir")
    p.add_argument("--out", required=True, help="output .npz or .parquet")
    p.set_defaults(func=cmd_embed_dir)
    from gallery.cli import add_commands as add_gallery_commands
    add_gallery_commands(sub, common)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    commands = {"embed", "compare", "embed-dir", "gallery", "calibrate", "-h", "--help"}
    if argv and argv[0] not in commands:
        argv.insert(0, "embed")  # `python AdaFaceFeature.py IMG...`, as the original's test run
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except net.WeightsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
