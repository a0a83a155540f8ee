"""Inference backends for the IR backbone, and the factory that picks one.

Every backend takes N×3×112×112 float32 BGR tensors scaled as (x / 255 - 0.5) / 0.5 and returns
(float32 N×512 unit embeddings, float32 N norms) as NumPy arrays; ``name`` says which it is.

- :mod:`.torch_eager`: PyTorch eager on the model's device (CPU or CUDA).
- :mod:`.onnx_runtime`: ONNX Runtime on CPU, over a graph exported once and cached.

This module is the factory: it imports the implementations, they never import it.
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch

from ..options import BACKENDS, choice
from .errors import BackendError
from .onnx_runtime import onnx_backend
from .torch_eager import TorchBackend

logger = logging.getLogger(__name__)

__all__ = ["BackendError", "TorchBackend", "make_backend"]


def make_backend(name: str, model: torch.nn.Module, device: torch.device, cache_key: str,
                 weights_path: Path | None, cache_dir: Path, threads: int):
    """The backend ``name`` (one of :data:`adaface.options.BACKENDS`) for ``model``: ``auto`` is
    ONNX Runtime on CPU when it works, else PyTorch. ``cache_key`` names the weights (e.g. the
    first 16 hex of their sha256) for the exported graph's file name."""
    choice("backend", name, BACKENDS)
    if name == "torch" or (name == "auto" and device.type != "cpu"):
        return TorchBackend(model)
    if device.type != "cpu":
        raise BackendError("the onnx backend runs on CPU only; use the torch backend on CUDA")
    try:
        return onnx_backend(model, cache_key, weights_path, cache_dir, threads)
    except Exception as exc:
        if name == "onnx":
            raise BackendError(f"the onnx backend failed: {exc}") from exc
        logger.warning("ONNX Runtime unavailable (%s); using PyTorch", exc)
        return TorchBackend(model)
