"""PyTorch eager inference of the IR backbone, on the model's device, under inference mode."""
from __future__ import annotations

import torch


class TorchBackend:
    """N×3×112×112 float32 BGR tensors scaled as (x / 255 - 0.5) / 0.5 -> (float32 N×512 unit
    embeddings, float32 N norms) as NumPy arrays."""

    name = "torch"

    def __init__(self, model: torch.nn.Module):
        self.model = model

    @torch.inference_mode()
    def __call__(self, batch: torch.Tensor) -> tuple:
        emb, norm = self.model(batch)
        return emb.float().cpu().numpy(), norm[:, 0].float().cpu().numpy()
