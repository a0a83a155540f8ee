"""The face images an int8 graph is calibrated and gated on (:mod:`adaface.backends.int8`).

A calibration set is a folder of images, read recursively in name order: 112×112 images are taken
as aligned crops, other photos give the crops the pipeline makes of every face in them. Its
``digest`` (sha256 over each file's relative path and bytes) names the quantized graph it made, so
the same weights and the same folder reuse it and a changed folder makes a new one. The files are
read here; the crops are made by :class:`adaface.pipeline.Extractor`, which has the detector.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

#: image files a calibration folder may hold (others are ignored)
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff")
#: at most this many crops are used (the first ones in file order); more add time, not accuracy
MAX_CROPS = 256
#: fewer usable crops than this and int8 is refused: too few faces to set the activations' ranges
MIN_CROPS = 8


@dataclass(frozen=True)
class CalibrationSet:
    """The image files of a calibration folder and their digest (16 hex: a file-name part)."""

    folder: Path | None
    files: tuple = ()
    digest: str = "empty"

    @classmethod
    def from_folder(cls, folder: str | Path | None) -> "CalibrationSet":
        """The images under ``folder`` (recursively, in path order); none when it is None or absent."""
        if folder is None or not Path(folder).is_dir():
            return cls(Path(folder) if folder is not None else None)
        root = Path(folder)
        files = tuple(sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES))
        if not files:
            return cls(root)
        digest = hashlib.sha256()
        for path in files:
            digest.update(str(path.relative_to(root)).encode() + b"\0")
            digest.update(hashlib.sha256(path.read_bytes()).digest())
        return cls(root, files, digest.hexdigest()[:16])

    def keyed(self, *parts: str) -> str:
        """The digest combined with ``parts`` (what else decides the crops), 16 hex."""
        if not self.files:
            return self.digest
        return hashlib.sha256("\0".join((self.digest, *parts)).encode()).hexdigest()[:16]

    def describe(self) -> str:
        """Where the set is, for log lines and refusals."""
        if self.folder is None:
            return "no calibration folder"
        if not self.folder.is_dir():
            return f"calibration folder {self.folder} does not exist"
        return f"{len(self.files)} images in {self.folder}"
