"""Re-embedding a gallery with another model, from its stored crops.

A model change (synthetic weights to real ones, IR-50 to IR-101) makes every stored embedding
useless: :func:`reembed` runs each stored 112×112 crop through the new model in batches, keeps
the new vectors beside the old ones (``stage_embeddings``), and when every face with a crop has
one, switches the gallery in one transaction (``finish_reembed``): every face takes its new
vector and the gallery its new model. Until then searches use the old vectors (a server running
the new model is refused with ``model_mismatch``), so no search ever mixes the two. An
interrupted run resumes where it stopped: the staged vectors are kept. Faces without a crop
(enrolled with crops off) cannot be re-embedded: they are removed at the switch, and listed.
"""
from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
from PIL import Image

from adaface.identity import ModelIdentity
from adaface.options import CROP_SIZE

from .audit import Actor
from .store import GalleryStore

#: crops per forward and per staged write
BATCH = 64


@dataclass(frozen=True)
class ReembedResult:
    """What a re-embed did: faces re-embedded in this run, in all, and the faces left out (no
    crop) as (face id, identity name); ``switched`` is False when the gallery was already on the model."""

    gallery: str
    model: ModelIdentity
    embedded_now: int
    faces: int
    left_out: list
    switched: bool = True


def crop_png(crop: np.ndarray) -> bytes:
    """A 112×112×3 uint8 RGB crop as lossless PNG bytes (about 20 to 30 kB)."""
    out = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(crop, np.uint8), "RGB").save(out, "PNG")
    return out.getvalue()


def crop_from_png(data: bytes) -> np.ndarray:
    """A stored crop back as 112×112×3 uint8 RGB."""
    with Image.open(io.BytesIO(data)) as im:
        crop = np.asarray(im.convert("RGB"), np.uint8)
    if crop.shape != (CROP_SIZE, CROP_SIZE, 3):
        raise ValueError(f"a stored crop is {crop.shape}, not {CROP_SIZE}×{CROP_SIZE}×3")
    return crop


def reembed(store: GalleryStore, gallery: str, model: ModelIdentity, embed: Callable[[np.ndarray], tuple],
            progress: Optional[Callable[[int, int], None]] = None, batch: int = BATCH,
            actor: Optional[Actor] = None) -> ReembedResult:
    """Re-embed ``gallery`` with ``model``: ``embed(crops N×112×112×3 uint8 RGB) -> (float32
    N×512 unit embeddings, norms N)`` is that model's forward; ``progress(done, total)`` is
    called after each batch; ``actor`` is who the switch is recorded for in the audit trail."""
    current = store.get_gallery(gallery).model
    if current is not None and (current.arch, current.fingerprint) == (model.arch, model.fingerprint):
        return ReembedResult(gallery, model, 0, store.get_gallery(gallery).faces, [], switched=False)
    done_now = 0
    while True:
        state = store.reembed_state(gallery, model)
        if progress:
            progress(state.staged, state.with_crop)
        pending = store.reembed_pending(gallery, model, batch)
        if not pending:
            left_out = store.finish_reembed(gallery, model, actor)
            if left_out is not None:
                return ReembedResult(gallery, model, done_now, store.get_gallery(gallery).faces, left_out)
            continue  # a face enrolled meanwhile: embed it too
        crops = np.stack([crop_from_png(png) for _, png in pending])
        embeddings, norms = embed(crops)
        store.stage_embeddings(gallery, model, [(face_id, embeddings[i], norms[i])
                                                for i, (face_id, _) in enumerate(pending)])
        done_now += len(pending)
