"""Image -> faces -> embeddings: decode, detect and align, then one forward for every crop.

Pipeline per image: decode to RGB (:mod:`adaface.decode`), find faces with MTCNN and cut
112×112 crops (:mod:`face_alignment`), flip to BGR, scale as ``(x / 255 - 0.5) / 0.5`` and run
the IR backbone (:mod:`net`) on all crops together.

The forward is a dependency: :meth:`Extractor.embed_prepared` takes any
``forward(crops N×112×112×3 uint8 RGB) -> (float32 N×512, float32 N)``. The command line uses
the extractor's own (:meth:`Extractor.embed_crops`, chunked to ``max_batch``); the service
passes its micro-batcher, which gathers crops of concurrent requests into shared forwards.
Regrouping the embeddings by image and turning per-image errors into results happen here only.
"""
from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np

from face_alignment import MTCNN, AlignmentError, DetectorParams, align

from .calibration_set import MAX_CROPS, CalibrationSet
from .decode import decode_any, decode_image
from .errors import NotAlignedError, code_of
from .faces import FaceCrop, ImageFaces, PreparedImage
from .model import Model
from .options import (CROP_SIZE, DEFAULT_BACKEND, DEFAULT_DEVICE, DEFAULT_INT8_MIN_COSINE, DEFAULT_MAX_FACES,
                      DEFAULT_PRECISION, EMBEDDING_SIZE, MAX_PIXELS, PRECISIONS, SYNTHETIC, EmbedOptions, choice,
                      default_max_batch)

#: ``forward(crops) -> (embeddings, norms)``
Forward = Callable[[np.ndarray], tuple]


def forward_in_chunks(forward: Forward, crops: np.ndarray, max_batch: int,
                      observe: Optional[Callable[[int, float], None]] = None) -> tuple:
    """Run ``forward`` on ``crops`` in pieces of at most ``max_batch``; ``observe(size, seconds)``
    after each forward. Returns (float32 N×512, float32 N)."""
    if len(crops) == 0:
        return np.zeros((0, EMBEDDING_SIZE), np.float32), np.zeros(0, np.float32)
    embeddings, norms = [], []
    for start in range(0, len(crops), max_batch):
        chunk = crops[start:start + max_batch]
        began = time.perf_counter()
        emb, norm = forward(chunk)
        if observe is not None:
            observe(len(chunk), time.perf_counter() - began)
        embeddings.append(emb)
        norms.append(norm)
    if len(embeddings) == 1:
        return embeddings[0], norms[0]
    return np.concatenate(embeddings), np.concatenate(norms)


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


class Extractor:
    """The backbone and the detector, loaded once; embeds lists of images in shared forwards.

    ``weights``, ``arch``, ``device``, ``backend`` and ``cache_dir`` are those of
    :class:`adaface.model.Model`; ``max_faces`` and ``max_pixels`` are the defaults of
    :meth:`prepare`; ``max_batch`` is the most faces in one forward (default by device,
    :func:`adaface.options.default_max_batch`).

    ``precision="int8"`` asks for the quantized graph, calibrated on the images of the folder
    ``calibration`` (:mod:`adaface.calibration_set`) and served only when its lowest cosine to
    fp32 on them is at least ``int8_min_cosine``; otherwise fp32 is served, and
    ``model.int8`` says why.
    """

    def __init__(self, weights: str | Path = SYNTHETIC, arch: str | None = None, device: str = DEFAULT_DEVICE,
                 detector_params: DetectorParams = DetectorParams(), max_faces: int = DEFAULT_MAX_FACES,
                 max_pixels: int = MAX_PIXELS, max_batch: int | None = None, backend: str = DEFAULT_BACKEND,
                 cache_dir: str | Path | None = None, precision: str = DEFAULT_PRECISION,
                 calibration: str | Path | None = None, int8_min_cosine: float = DEFAULT_INT8_MIN_COSINE):
        choice("precision", precision, PRECISIONS)
        self.model = Model(weights, arch=arch, device=device, backend=backend, cache_dir=cache_dir)
        self.detector = MTCNN(self.model.device, detector_params)
        self.max_faces = max_faces
        self.max_pixels = max_pixels
        self.max_batch = max_batch or default_max_batch(self.model.device.type)
        if precision == "int8":
            self._use_int8(calibration, int8_min_cosine)

    def _use_int8(self, folder, min_cosine: float) -> None:
        """Ask the model for int8 calibrated on ``folder`` (a folder that cannot be read refuses it)."""
        try:
            images = CalibrationSet.from_folder(folder)
        except (OSError, UnicodeError) as exc:
            self.model.refuse_int8(f"calibration folder {folder} cannot be read: {exc}", min_cosine)
            return
        # the crops depend on the detector's settings too: they are part of the set's name
        digest = images.keyed(repr(self.detector.params), str(self.max_pixels))
        self.model.use_int8(digest, lambda: self.calibration_crops(images), min_cosine, source=images.describe())

    def calibration_crops(self, images: CalibrationSet) -> np.ndarray:
        """Every face crop of a calibration set, at most :data:`MAX_CROPS`: N×112×112×3 uint8 RGB.
        A 112×112 image is one crop; a photo gives each face the detector finds; an image that
        cannot be read or has no face gives none."""
        crops = []
        for path in images.files:
            prepared = self.try_prepare(path.read_bytes(), faces="all")
            if not isinstance(prepared, Exception):
                crops += [c.crop for c in prepared.crops]
            if len(crops) >= MAX_CROPS:
                break
        return np.stack(crops[:MAX_CROPS]) if crops else np.zeros((0, CROP_SIZE, CROP_SIZE, 3), np.uint8)

    # what callers read of the model
    device = property(lambda self: self.model.device)
    arch = property(lambda self: self.model.arch)
    synthetic = property(lambda self: self.model.synthetic)
    weights_path = property(lambda self: self.model.weights_path)
    weights_sha256 = property(lambda self: self.model.weights_sha256)
    backend = property(lambda self: self.model.backend)
    identity = property(lambda self: self.model.identity)

    def info(self) -> dict:
        """What is loaded (see :meth:`adaface.model.Model.info`) and the forward's batch limit."""
        return {**self.model.info(), "max_batch": self.max_batch}

    # -- preprocessing ---------------------------------------------------------------------

    def decode(self, image, max_pixels: int | None = None) -> np.ndarray:
        """Bytes (raw or base64), base64 str, PIL image or array -> H×W×3 uint8 RGB."""
        limit = max_pixels or self.max_pixels
        if isinstance(image, (bytes, bytearray, memoryview, str)):
            return decode_any(bytes(image) if not isinstance(image, str) else image, max_pixels=limit)
        return decode_image(image, max_pixels=limit)

    def prepare(self, image, options: EmbedOptions | None = None, **fields) -> PreparedImage:
        """Decode, detect and align: the CPU work before the network. No face gives no crops.

        ``options`` (or its fields as keywords: ``faces``, ``align_mode``, ``max_faces``,
        ``min_face_size``, ``max_pixels``, ``detect_max_side``) say how; see
        :class:`adaface.options.EmbedOptions`. ``align_mode``: ``auto`` takes a 112×112 image as
        an already-aligned crop and detects in anything else; ``always`` detects; ``never``
        requires a 112×112 crop.
        """
        options = (options or EmbedOptions(**fields)).checked()
        rgb = self.decode(image, options.max_pixels)
        height, width = rgb.shape[:2]
        is_crop = (height, width) == (CROP_SIZE, CROP_SIZE)
        if options.align_mode == "never" and not is_crop:
            raise NotAlignedError(f"align=never needs a {CROP_SIZE}×{CROP_SIZE} aligned crop; got {width}×{height}")
        if options.align_mode == "never" or (options.align_mode == "auto" and is_crop):
            return PreparedImage(width, height, [FaceCrop(np.ascontiguousarray(rgb))], aligned=True)
        params = self._detector_params(options)
        return PreparedImage(width, height, self._detect_crops(rgb, options.faces, options.max_faces, params))

    def _detector_params(self, options: EmbedOptions) -> DetectorParams:
        params = self.detector.params
        if options.min_face_size is not None:
            params = dataclasses.replace(params, min_face_size=float(options.min_face_size))
        if options.detect_max_side is not None:
            params = dataclasses.replace(params, max_side=options.detect_max_side or None)
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

    def try_prepare(self, image, options: EmbedOptions | None = None, **fields):
        """:meth:`prepare`, with a caller's error returned instead of raised (a bug still raises)."""
        try:
            return self.prepare(image, options, **fields)
        except Exception as exc:
            if code_of(exc) is None:
                raise
            return exc

    # -- the network -------------------------------------------------------------------------

    def embed_crops(self, crops: np.ndarray) -> tuple:
        """N×112×112×3 uint8 RGB crops -> (float32 N×512 unit embeddings, float32 N norms), in
        forwards of at most ``max_batch``."""
        return forward_in_chunks(self.model.forward, crops, self.max_batch)

    def embed_prepared(self, prepared: Sequence, forward: Forward | None = None) -> list:
        """One :class:`ImageFaces` per entry of ``prepared`` (a :class:`PreparedImage`, or the
        exception preparing it raised), every crop through ``forward`` in one call (default:
        :meth:`embed_crops`)."""
        crops = [c for p in prepared if isinstance(p, PreparedImage) for c in p.crops]
        if crops:
            embeddings, norms = (forward or self.embed_crops)(np.stack([c.crop for c in crops]))
        results, i = [], 0
        for p in prepared:
            if not isinstance(p, PreparedImage):
                results.append(ImageFaces(error=p))
                continue
            faces = [c.with_embedding(embeddings[i + k], norms[i + k]) for k, c in enumerate(p.crops)]
            i += len(p.crops)
            results.append(ImageFaces(p.width, p.height, p.aligned, faces))
        return results

    def embed(self, images: Sequence, **options) -> list:
        """Embed a list of images (any input :meth:`prepare` takes); returns a list of face lists.

        An image with no face gives an empty list; bad input raises its typed error.
        """
        return [r.faces for r in self.embed_prepared([self.prepare(image, **options) for image in images])]

    def embed_image(self, image, **options) -> list:
        """Faces of one image (see :meth:`embed`)."""
        return self.embed([image], **options)[0]
