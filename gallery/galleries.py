"""Galleries as the service and the command line use them: a store plus its search indexes.

``Galleries.open(url)`` opens the store named by ``ADAFACE_GALLERY_URL``; writes go straight to
the store (durable when they return) and :meth:`Galleries.identify` searches the in-memory index,
brought up to date first (see :mod:`gallery.index`).
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from adaface.identity import ModelIdentity

from .errors import GalleryNotFoundError
from .index import Indexes, SearchParams
from .open import open_store
from .store import GalleryStore, check_gallery_name


@dataclass(frozen=True)
class Candidate:
    """A candidate identity for a probe face: its best stored face and their cosine similarity."""

    identity: str
    similarity: float
    face_id: int
    photo_sha256: str
    metadata: Optional[dict] = None

    def to_dict(self) -> dict:
        return {"identity": self.identity, "similarity": self.similarity, "face_id": self.face_id,
                "photo_sha256": self.photo_sha256, "metadata": self.metadata}


@dataclass(frozen=True)
class IdentityMatch:
    """A probe against one identity: the best and the mean cosine similarity over its faces
    (None when it has none), the best face's id, and how many faces were compared."""

    identity: str
    best: Optional[float]
    mean: Optional[float]
    best_face_id: Optional[int]
    faces: int


def decide(candidates: list, threshold: float) -> tuple:
    """("match", best candidate) when the best similarity is at or above ``threshold``, else
    ("unknown", None)."""
    if candidates and candidates[0].similarity >= threshold:
        return "match", candidates[0]
    return "unknown", None


def photo_sha256(data: bytes) -> str:
    """Hex sha256 of a photo's bytes as uploaded (the key that makes enrolling idempotent)."""
    return hashlib.sha256(data).hexdigest()


class Galleries:
    """A store and one process's search indexes over it."""

    def __init__(self, store: GalleryStore, search: Optional[SearchParams] = None):
        self.store = store
        self.indexes = Indexes(store, search)

    @classmethod
    def open(cls, url: str, base: Optional[Path] = None) -> "Galleries":
        return cls(open_store(url, base))

    def search(self, gallery: str, probes: np.ndarray, top_k: int, exact: bool = False) -> list:
        """For each probe (float32 (m, 512) unit rows) up to ``top_k`` :class:`gallery.index.Hit`,
        best identity first: in the database where it searches itself, else in this process's
        index; ``exact`` asks for an exhaustive float32 search."""
        state = self.store.gallery_state(check_gallery_name(gallery))
        if state is None:
            raise GalleryNotFoundError(gallery)
        hits = self.store.search(state[0], probes, top_k, exact)
        return hits if hits is not None else self.indexes.search(gallery, probes, top_k, exact=exact)

    def identify(self, gallery: str, probes: np.ndarray, top_k: int, exact: bool = False,
                 model: Optional[ModelIdentity] = None) -> list:
        """For each probe (float32 (m, 512) unit rows) up to ``top_k`` :class:`Candidate`, best
        first; with ``model`` (the network that made the probes) ModelMismatchError when another
        one filled the gallery."""
        if model is not None:
            self.store.check_model(gallery, model)
        hits = self.search(gallery, probes, top_k, exact)
        described = self.store.describe_faces([h.face_id for per_probe in hits for h in per_probe])
        results = []
        for per_probe in hits:
            found = []
            for h in per_probe:
                if h.face_id in described:  # a face deleted since the search is left out
                    sha, name, metadata = described[h.face_id]
                    found.append(Candidate(name, h.similarity, h.face_id, sha, metadata))
            results.append(found)
        return results

    def verify_identity(self, gallery: str, name: str, probe: np.ndarray,
                        model: Optional[ModelIdentity] = None) -> IdentityMatch:
        """How close a probe (float32 (512,) unit) is to one identity's faces."""
        if model is not None:
            self.store.check_model(gallery, model)
        face_ids, vectors = self.store.identity_vectors(gallery, name)
        if len(face_ids) == 0:
            return IdentityMatch(name, None, None, None, 0)
        scores = np.clip(vectors @ np.asarray(probe, np.float32), -1.0, 1.0)
        best = int(np.argmax(scores))
        return IdentityMatch(name, float(scores[best]), float(scores.mean()), int(face_ids[best]), len(face_ids))

    def close(self) -> None:
        self.store.close()
