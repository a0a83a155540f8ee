"""int8 inference: a statically quantized copy of the exported fp32 ONNX graph, served only when
it embeds face crops as the fp32 graph does (the accuracy gate).

**Recipe** (ONNX Runtime's static quantization, QDQ format): int8 weights per output channel,
uint8 activations whose ranges are the min/max seen on the calibration crops; only convolutions
are quantized, the first convolution and the output layer stay fp32, and so do batch norms,
PReLUs and the residual additions. Measured on IR-101 (README, "int8"): quantizing the additions
and PReLUs too lowers the lowest cosine from 0.998 to 0.971, and keeping the first and last layers
fp32 costs nothing measurable in speed.

**Cache**: the graph is written beside the fp32 graph as ``<fp32 name>.int8-<RECIPE>-<calibration
digest>.onnx`` with a record (``.json``) of the gate: the lowest cosine, the number of crops and
the graph's sha256. A later start with the same weights and calibration folder reads the record
(and checks the graph's hash) instead of calibrating and gating again; workers starting together
take turns on a lock file, so one of them does the work.

**Gate**: every calibration crop is embedded by both graphs; the lowest cosine between a crop's
two embeddings must be at least ``min_cosine``, or int8 is refused and fp32 served.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from .onnx_runtime import OnnxBackend

logger = logging.getLogger(__name__)

#: names the quantization recipe in the cached file's name: change it when the recipe changes
RECIPE = "qdq2"
#: crops per calibration and gate forward
BATCH = 8


@dataclass(frozen=True)
class Int8Report:
    """What became of a request for int8: ``served`` or not, and why (``reason``).

    ``min_cosine`` is the gate's figure (None when it never ran), ``threshold`` the gate's bar,
    ``crops`` how many calibration crops were used, ``cached`` whether the graph and the gate's
    result came from an earlier start.
    """

    served: bool
    reason: str
    threshold: float
    min_cosine: Optional[float] = None
    crops: int = 0
    cached: bool = False
    path: Optional[str] = None

    def as_dict(self) -> dict:
        return asdict(self)


def int8_path(fp32_path: Path, calibration_digest: str) -> Path:
    """Where the quantized graph of ``fp32_path`` for this calibration set lives."""
    return fp32_path.with_name(f"{fp32_path.stem}.int8-{RECIPE}-{calibration_digest}.onnx")


def _record_path(path: Path) -> Path:
    return path.with_suffix(".json")


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@contextmanager
def _locked(path: Path):
    """An exclusive lock on ``path``.lock, held for the block (other workers wait)."""
    lock = path.with_name(path.name + ".lock")
    with open(lock, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


class _Reader:
    """ONNX Runtime's calibration data reader over N×3×112×112 float32 inputs, in batches."""

    def __init__(self, inputs: np.ndarray):
        self.batches = [inputs[i:i + BATCH] for i in range(0, len(inputs), BATCH)]

    def get_next(self):
        return {"input": self.batches.pop(0)} if self.batches else None

    def rewind(self):  # not needed by min/max calibration; part of the reader's interface
        pass


def quantize(fp32_path: Path, out_path: Path, inputs: np.ndarray) -> None:
    """Write the int8 graph of ``fp32_path`` (calibrated on ``inputs``, N×3×112×112 float32 BGR
    scaled to [-1, 1]) to ``out_path``, through a temporary name."""
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quant_pre_process, quantize_static
    tmp = out_path.with_name(f".{out_path.name}.{os.getpid()}")
    prepared = tmp.with_name(tmp.name + ".pre.onnx")
    try:
        quant_pre_process(str(fp32_path), str(prepared))
        graph = onnx.load(str(prepared), load_external_data=False)
        first = [n.name for n in graph.graph.node if n.op_type == "Conv"][:1]
        quantize_static(str(prepared), str(tmp), _Reader(inputs), quant_format=QuantFormat.QDQ,
                        op_types_to_quantize=["Conv", "Gemm"], nodes_to_exclude=first, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        calibrate_method=CalibrationMethod.MinMax)
        os.replace(tmp, out_path)
    finally:
        tmp.unlink(missing_ok=True)
        prepared.unlink(missing_ok=True)


def _embed(backend, inputs: np.ndarray) -> np.ndarray:
    import torch
    return np.concatenate([backend(torch.from_numpy(inputs[i:i + BATCH]))[0] for i in range(0, len(inputs), BATCH)])


def lowest_cosine(reference, candidate, inputs: np.ndarray) -> float:
    """The lowest cosine between ``reference``'s and ``candidate``'s embedding of each input."""
    a, b = _embed(reference, inputs), _embed(candidate, inputs)
    cosines = np.sum(a * b, axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    return float(np.min(cosines))


def _read_record(path: Path, digest: str) -> Optional[dict]:
    """The gate's record of an earlier start, if it is for this graph file as it is now."""
    try:
        record = json.loads(_record_path(path).read_text())
        if record.get("recipe") == RECIPE and record.get("calibration") == digest and path.exists() \
                and record.get("graph_sha256") == _file_sha256(path):
            return record
    except (OSError, ValueError, AttributeError):
        pass
    return None


def _calibrate_and_gate(fp32: OnnxBackend, path: Path, digest: str, inputs: np.ndarray, threads: int,
                        quantizer: Callable) -> dict:
    began = time.monotonic()
    logger.info("quantizing the backbone to int8 on %d crops (once for these weights and crops)", len(inputs))
    quantizer(Path(fp32.path), path, inputs)
    cosine = lowest_cosine(fp32, OnnxBackend(path, threads), inputs)
    record = {"recipe": RECIPE, "calibration": digest, "crops": int(len(inputs)), "min_cosine": cosine,
              "graph_sha256": _file_sha256(path), "seconds": round(time.monotonic() - began, 1)}
    tmp = _record_path(path).with_name(f".{_record_path(path).name}.{os.getpid()}")
    tmp.write_text(json.dumps(record, indent=1))
    os.replace(tmp, _record_path(path))
    return record


def int8_backend(fp32: OnnxBackend, digest: str, make_inputs: Callable[[], np.ndarray], min_cosine: float,
                 threads: int, min_crops: int, source: str = "the calibration set",
                 quantizer: Callable = quantize) -> tuple:
    """(the int8 backend or None, :class:`Int8Report`) for the fp32 graph ``fp32`` and the
    calibration set named ``digest``; ``make_inputs()`` gives its crops as N×3×112×112 float32
    network inputs, and is called only when no earlier start left a graph and a gate record.
    ``quantizer(fp32_path, out_path, inputs)`` writes the int8 graph (:func:`quantize`)."""
    path = int8_path(Path(fp32.path), digest)
    try:
        with _locked(path):
            record, cached = _read_record(path, digest), True
            if record is None:
                inputs, cached = make_inputs(), False
                if len(inputs) < min_crops:
                    return None, Int8Report(False, f"{len(inputs)} face crops from {source}: at least {min_crops} "
                                                   "are needed to calibrate int8", min_cosine, crops=len(inputs))
                record = _calibrate_and_gate(fp32, path, digest, inputs, threads, quantizer)
    except Exception as exc:   # a failed quantization refuses int8; fp32 still serves
        logger.exception("int8 quantization failed")
        return None, Int8Report(False, f"quantization failed: {exc}", min_cosine)
    figure, crops = record["min_cosine"], record["crops"]
    if not figure >= min_cosine:
        return None, Int8Report(False, f"lowest cosine to fp32 {figure:.5f} is below {min_cosine}", min_cosine,
                                figure, crops, cached, str(path))
    return OnnxBackend(path, threads), Int8Report(True, "passed the accuracy gate", min_cosine, figure, crops,
                                                  cached, str(path))
