"""AdaFace face embeddings: image -> faces -> 512-d embeddings, as the reference pipeline makes them.

As a library::

    from AdaFaceFeature import AdaFaceFeature
    extractor = AdaFaceFeature.from_settings()          # ADAFACE_* settings, see config.py
    faces = extractor.embed_image(open("photo.jpg", "rb").read())
    faces[0].embedding                                   # float32 (512,), unit length

``AdaFaceFeature`` is :class:`adaface.pipeline.Extractor` built from the settings; the pipeline
itself (decode, detect, align, embed) lives in the :mod:`adaface` package.

From the command line (``python AdaFaceFeature.py --help``; the commands are in :mod:`cli`)::

    python AdaFaceFeature.py IMG...                      # one JSON line per image
    python AdaFaceFeature.py compare IMG...              # cosine-similarity matrix
    python AdaFaceFeature.py embed-dir DIR --out vectors.npz
    python AdaFaceFeature.py gallery build DIR           # and identify, export, import, list
    python AdaFaceFeature.py calibrate PAIRS.csv
"""
from __future__ import annotations

import sys
from typing import Sequence

import torch

import cli
import net
from adaface.backends import BackendError
from adaface.device import resolve_device
from adaface.errors import BadOptionError, InputError, NoFaceError, NotAlignedError
from adaface.faces import Face, FaceCrop, PreparedImage
from adaface.model import crops_to_tensor
from adaface.options import ALIGN_MODES, EMBEDDING_SIZE, FACE_MODES, SYNTHETIC
from adaface.pipeline import Extractor
from config import Settings, SettingsError
from face_alignment import DetectorParams

#: the old name of :class:`adaface.errors.InputError`
FaceInputError = InputError

__all__ = ["ALIGN_MODES", "EMBEDDING_SIZE", "FACE_MODES", "SYNTHETIC", "AdaFaceFeature", "BadOptionError",
           "Face", "FaceCrop", "FaceInputError", "NoFaceError", "NotAlignedError", "PreparedImage",
           "crops_to_tensor", "main", "resolve_device"]


class AdaFaceFeature(Extractor):
    """The extractor (see :class:`adaface.pipeline.Extractor` for the arguments), and how the
    settings build it."""

    @classmethod
    def from_settings(cls, settings: Settings | None = None) -> "AdaFaceFeature":
        """Build from :class:`config.Settings` (``ADAFACE_*`` environment variables by default)."""
        s = settings or Settings.from_env()
        if s.threads > 0:
            torch.set_num_threads(s.threads)
        weights = SYNTHETIC if s.weights == SYNTHETIC else s.weights_path()
        params = DetectorParams(min_face_size=s.min_face_size, max_side=s.detect_max_side or None)
        return cls(weights, arch=s.arch or None, device=s.device, detector_params=params,
                   max_faces=s.max_faces, max_pixels=s.max_pixels, max_batch=s.max_batch or None,
                   backend=s.backend, cache_dir=s.cache_path(), precision=s.precision,
                   calibration=s.calibration_path(), int8_min_cosine=s.int8_min_cosine)


def _load_extractor(**overrides) -> AdaFaceFeature:
    """The model of the settings with the command line's ``overrides``; a bad setting is a
    :class:`SettingsError`, weights, a device or a backend that cannot be used a
    :class:`cli.ModelLoadError` (a ValueError here is a device that does not exist)."""
    settings = Settings.from_env(**overrides)
    try:
        return AdaFaceFeature.from_settings(settings)
    except (net.WeightsError, BackendError, ValueError) as exc:
        raise cli.ModelLoadError(str(exc)) from exc


def _context() -> cli.Context:
    """What the commands may know of the settings: read here, at the entry point, only."""
    return cli.Context(settings=Settings.from_env, extractor=_load_extractor)


def main(argv: Sequence[str] | None = None) -> int:
    """``python AdaFaceFeature.py ...``; the exit status (2 for a bad setting)."""
    try:
        return cli.main(sys.argv[1:] if argv is None else argv, _context())
    except SettingsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
