"""What the pipeline hands from step to step: crops, embedded faces and per-image results."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from .errors import NoFaceError


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
    crop: Optional[np.ndarray] = field(default=None, repr=False)  # the 112×112×3 uint8 RGB crop embedded

    def to_dict(self) -> dict:
        """JSON-ready dict (NumPy arrays kept; serialise with orjson's numpy option)."""
        return {"embedding": self.embedding, "norm": self.norm, **self.geometry(),
                "landmarks": None if self.landmarks is None else np.round(self.landmarks, 2)}

    def geometry(self) -> dict:
        """Where the face was and how sure the detector is: ``box`` (rounded to 0.01 px), ``score``."""
        return {"box": None if self.box is None else np.round(self.box, 2), "score": self.score}


@dataclass
class FaceCrop:
    """A face ready for the network: crop is 112×112×3 uint8 RGB; the rest as in :class:`Face`."""

    crop: np.ndarray
    box: Optional[np.ndarray] = None
    score: Optional[float] = None
    landmarks: Optional[np.ndarray] = None

    def with_embedding(self, embedding: np.ndarray, norm: float) -> Face:
        return Face(embedding, float(norm), self.box, self.score, self.landmarks, self.crop)


@dataclass
class PreparedImage:
    """An image decoded and cut into face crops; ``aligned`` is True when taken as is."""

    width: int
    height: int
    crops: list = field(default_factory=list)
    aligned: bool = False


@dataclass
class ImageFaces:
    """One input's outcome: its decoded size and faces (possibly none), or the error it caused."""

    width: int = 0
    height: int = 0
    aligned: bool = False
    faces: list = field(default_factory=list)
    error: Optional[Exception] = None

    def require_faces(self) -> list:
        """The faces; raises the input's error, or :class:`NoFaceError` when none was found."""
        failure = self.failure()
        if failure is not None:
            raise failure
        return self.faces

    def failure(self) -> Optional[Exception]:
        """The error this input gives (its own, or NoFaceError), or None when it has faces."""
        if self.error is not None:
            return self.error
        return None if self.faces else NoFaceError()
