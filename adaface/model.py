"""The IR backbone loaded from weights, with the backend that runs it.

:class:`Model` turns N×112×112×3 uint8 RGB crops into embeddings in one forward; splitting a
large batch into forwards is the caller's business (:func:`adaface.pipeline.forward_in_chunks`).
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

import net

from .backends import make_backend
from .backends.int8 import Int8Report, int8_backend
from .calibration_set import MIN_CROPS
from .device import resolve_device
from .identity import ModelIdentity
from .options import DEFAULT_BACKEND, DEFAULT_DEVICE, DEFAULT_INT8_MIN_COSINE, EMBEDDING_SIZE, SYNTHETIC

logger = logging.getLogger(__name__)


def crops_to_tensor(crops: np.ndarray, device: torch.device) -> torch.Tensor:
    """N×112×112×3 uint8 RGB -> N×3×112×112 float32 BGR scaled as (x / 255 - 0.5) / 0.5."""
    t = torch.from_numpy(np.require(crops, np.uint8, ("C", "W"))).to(device)
    return t.flip(-1).permute(0, 3, 1, 2).float().div_(255.0).sub_(0.5).div_(0.5)


def default_cache_dir() -> Path:
    """Where exported graphs go when the weights' folder is read-only and none is given."""
    import tempfile
    return Path(tempfile.gettempdir()) / "adaface-cache"


class Model:
    """The backbone and its backend, loaded once.

    ``weights`` is a checkpoint path (any form :func:`net.load_backbone` reads) or ``"synthetic"``
    for deterministic random weights (the embeddings mean nothing). ``backend`` is one of
    :data:`adaface.options.BACKENDS`; ``cache_dir`` holds the exported ONNX graph when the
    weights' folder is read-only (default: :func:`default_cache_dir`).
    """

    def __init__(self, weights: str | Path = SYNTHETIC, arch: str | None = None, device: str = DEFAULT_DEVICE,
                 backend: str = DEFAULT_BACKEND, cache_dir: str | Path | None = None):
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
        self.identity = ModelIdentity(self.arch, net.weights_fingerprint(self.backbone), self.synthetic)
        key = (f"{self.arch}-seed0-torch{torch.__version__.split('+')[0]}" if self.synthetic
               else self.weights_sha256[:16])
        cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        self.backend = make_backend(backend, self.backbone, self.device, key, self.weights_path, cache,
                                    torch.get_num_threads())
        if self.backend.name != "torch":
            self.backbone = None  # the backend holds its own copy of the weights
        self.precision = "fp32"
        self.int8: Int8Report | None = None   # what became of a request for int8 (None: not asked)

    def use_int8(self, digest: str, make_crops, min_cosine: float = DEFAULT_INT8_MIN_COSINE,
                 min_crops: int = MIN_CROPS, source: str = "the calibration set") -> Int8Report:
        """Serve the int8 graph if it passes the gate (:mod:`adaface.backends.int8`); else keep fp32.

        ``digest`` names the calibration set; ``make_crops()`` gives its N×112×112×3 uint8 RGB
        crops, and is called only when no earlier start calibrated on that set. The report says
        what happened, and is kept as ``self.int8``.
        """
        if self.backend.name != "onnx":
            return self.refuse_int8(f"int8 runs on the onnx backend (CPU); this model runs on {self.backend.name}",
                                    min_cosine)

        def inputs():
            return crops_to_tensor(make_crops(), torch.device("cpu")).numpy()
        backend, report = int8_backend(self.backend, digest, inputs, min_cosine, torch.get_num_threads(),
                                       min_crops, source)
        if backend is not None:
            self.backend, self.precision = backend, "int8"
        return self._report_int8(report)

    def refuse_int8(self, reason: str, min_cosine: float = DEFAULT_INT8_MIN_COSINE) -> Int8Report:
        """Keep fp32, saying why int8 was not tried."""
        return self._report_int8(Int8Report(False, reason, min_cosine))

    def _report_int8(self, report: Int8Report) -> Int8Report:
        log = logger.info if report.served else logger.warning
        log("int8 %s: %s%s", "served" if report.served else "refused, serving fp32", report.reason,
            " (gate result of an earlier start)" if report.cached else "")
        self.int8 = report
        return report

    @torch.inference_mode()
    def forward(self, crops: np.ndarray) -> tuple:
        """N×112×112×3 uint8 RGB crops -> (float32 N×512 unit embeddings, float32 N norms), one forward."""
        if len(crops) == 0:
            return np.zeros((0, EMBEDDING_SIZE), np.float32), np.zeros(0, np.float32)
        return self.backend(crops_to_tensor(crops, self.device))

    def info(self) -> dict:
        """What is loaded: architecture, weights file and sha256, device, backend."""
        return {"arch": self.arch, "weights": SYNTHETIC if self.synthetic else str(self.weights_path),
                "weights_sha256": self.weights_sha256, "weights_fingerprint": self.identity.fingerprint,
                "synthetic": self.synthetic,
                "device": str(self.device), "backend": self.backend.name, "embedding_size": EMBEDDING_SIZE,
                "precision": self.precision, "int8": None if self.int8 is None else self.int8.as_dict()}
