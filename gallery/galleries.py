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

from .index import Indexes
from .open import open_store
from .store import GalleryStore


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

    def __init__(self, store: GalleryStore):
        self.store = store
        self.indexes = Indexes(store)

    @classmethod
    def open(cls, url: str, base: Optional[Path] = None) -> "Galleries":
        return cls(open_store(url, base))

    def identify(self, gallery: str, probes: np.ndarray, top_k: int) -> list:
        """For each probe (float32 (m, 512) unit rows) up to ``top_k`` :class:`Candidate`, best first."""
        hits = self.indexes.search(gallery, probes, top_k)
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

    def close(self) -> None:
        self.store.close()
