"""int8 inference: a statically quantized copy of the exported fp32 ONNX graph, served only when
it embeds face crops as the fp32 graph does (the accuracy gate).

**Recipe** (ONNX Runtime's static quantization, QDQ format): int8 weights per output channel,
uint8 activations whose ranges are the min/max seen on the calibration crops. The convolutions
and the output layer are quantized; the first convolution stays fp32, and so do the batch norms
in front of convolutions (those behind one are folded into it by the pre-processing), the PReLUs
and the residual additions. Measured on IR-101 (README, "int8 on CPU"): the first convolution
quantized too lowers the lowest cosine from 0.997 to 0.973, the additions 0.988.

**Cache**: the graph is written beside the fp32 graph as ``<fp32 name>.int8-<RECIPE>-<calibration
digest>.onnx`` with a record (``.json``) of the gate: the lowest cosine, the number of crops, the
int8 and fp32 graphs' sha256, ONNX Runtime's version and the CPU's int8 instructions (the kernels
the figure was measured with). A later start whose record matches all of them reads it instead of
calibrating and gating again; a mismatch does both again. Workers starting together take turns on
a lock file, so one of them does the work (``python AdaFaceFeature.py prepare``, which gunicorn's
master runs before it starts workers, does it first).

**Gate**: every calibration crop is embedded by both graphs; the lowest cosine between a crop's
two embeddings must be at least ``min_cosine``, or int8 is refused and fp32 served. The crops are
the ones the ranges were set on, as the gate's purpose is to catch a quantization that does not
fit these weights; unseen faces may differ a little more (README).
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


def cpu_int8_features() -> str:
    """The CPU's instructions that decide ONNX Runtime's int8 kernels (Linux; empty elsewhere)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                return ",".join(f for f in ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8") if f in flags)
    except OSError:
        pass
    return ""


def _context(fp32_path: Path) -> dict:
    """What a gate record must match besides its own graph: the fp32 graph and the kernels."""
    import onnxruntime
    return {"fp32_sha256": _file_sha256(fp32_path), "onnxruntime": onnxruntime.__version__,
            "cpu": cpu_int8_features()}


def _read_record(path: Path, digest: str, context: dict) -> Optional[dict]:
    """The gate's record of an earlier start, if it is for this graph file as it is now, made
    from this fp32 graph with these kernels."""
    try:
        record = json.loads(_record_path(path).read_text())
        if record.get("recipe") == RECIPE and record.get("calibration") == digest and path.exists() \
                and all(record.get(k) == v for k, v in context.items()) \
                and record.get("graph_sha256") == _file_sha256(path):
            return record
    except (OSError, ValueError, AttributeError):
        pass
    return None


def _calibrate_and_gate(fp32: OnnxBackend, path: Path, digest: str, inputs: np.ndarray, threads: int,
                        quantizer: Callable, context: dict) -> dict:
    began = time.monotonic()
    logger.info("quantizing the backbone to int8 on %d crops (once for these weights and crops)", len(inputs))
    quantizer(Path(fp32.path), path, inputs)
    cosine = lowest_cosine(fp32, OnnxBackend(path, threads), inputs)
    record = {"recipe": RECIPE, "calibration": digest, "crops": int(len(inputs)), "min_cosine": cosine,
              "graph_sha256": _file_sha256(path), **context, "seconds": round(time.monotonic() - began, 1)}
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
        context = _context(Path(fp32.path))
        record, cached = _read_record(path, digest, context), True   # a read-only cache needs no lock
        if record is None:
            with _locked(path):
                record = _read_record(path, digest, context)          # another worker may have made it
                if record is None:
                    inputs, cached = make_inputs(), False
                    if len(inputs) < min_crops:
                        return None, Int8Report(False, f"{len(inputs)} face crops from {source}: at least "
                                                       f"{min_crops} are needed to calibrate int8", min_cosine,
                                                crops=len(inputs))
                    record = _calibrate_and_gate(fp32, path, digest, inputs, threads, quantizer, context)
        figure, crops = record["min_cosine"], record["crops"]
        if not figure >= min_cosine:
            return None, Int8Report(False, f"lowest cosine to fp32 {figure:.5f} is below {min_cosine}", min_cosine,
                                    figure, crops, cached, str(path))
        backend = OnnxBackend(path, threads)
    except Exception as exc:   # a failed quantization or an int8 graph that cannot load refuses int8
        logger.exception("int8 quantization failed")
        return None, Int8Report(False, f"quantization failed: {exc}", min_cosine)
    return backend, Int8Report(True, "passed the accuracy gate", min_cosine, figure, crops, cached, str(path))
