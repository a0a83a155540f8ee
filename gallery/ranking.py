"""From scores to answers: the top rows of a score vector, and the best identities among faces.

Each identity counts once, with its best face: :func:`best_identities` orders scored faces by
similarity and keeps the first face of each identity, up to ``top_k``.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

BLOCK = 256


@dataclass(frozen=True)
class Hit:
    """One candidate identity for one probe: its best face and that face's cosine similarity."""

    identity_id: int
    face_id: int
    similarity: float


def top_indices(scores: np.ndarray, k: int) -> np.ndarray:
    """Indices of the ``k`` largest of ``scores`` (float32 (n,)), largest first.

    Exact and about 1 ms for a million scores: the k largest lie in the k blocks (of
    :data:`BLOCK`) with the largest maxima, so only those blocks are sorted.
    """
    n = len(scores)
    k = min(k, n)
    if n <= 8 * BLOCK or k * BLOCK * 4 >= n:
        part = np.argpartition(scores, n - k)[n - k:] if k < n else np.arange(n)
        return part[np.argsort(-scores[part], kind="stable")]
    blocks = -(-n // BLOCK)
    padded = np.full(blocks * BLOCK, -np.inf, np.float32)
    padded[:n] = scores
    maxima = padded.reshape(blocks, BLOCK).max(axis=1)
    best = np.argpartition(maxima, blocks - k)[blocks - k:]
    candidates = (best[:, None] * BLOCK + np.arange(BLOCK)).reshape(-1)
    candidates = candidates[candidates < n]
    part = candidates[np.argpartition(scores[candidates], len(candidates) - k)[len(candidates) - k:]]
    return part[np.argsort(-scores[part], kind="stable")]


def top_rows(scores: np.ndarray, identity_ids: np.ndarray, top_k: int) -> np.ndarray:
    """Rows of the ``top_k`` best distinct identities for one probe's scores (n,), best first:
    the best face of each (identity ids int64 (n,) aligned with the scores)."""
    n = len(scores)
    k = min(n, max(4 * top_k, 32))
    while True:
        rows = top_indices(scores, k)
        _, first = np.unique(identity_ids[rows], return_index=True)
        if len(first) >= top_k or k == n:
            return rows[np.sort(first)[:top_k]]
        k = min(n, k * 4)


def best_identities(face_ids: np.ndarray, identity_ids: np.ndarray, scores: np.ndarray, top_k: int) -> list:
    """The ``top_k`` best distinct identities among scored faces, as :class:`Hit`, best first.

    ``face_ids``, ``identity_ids`` int64 (k,) and ``scores`` float32 (k,) are aligned; ties go to
    the lower face id, so the answer does not depend on the order the faces came in.
    """
    if len(face_ids) == 0:
        return []
    order = np.lexsort((face_ids, -scores.astype(np.float64)))
    _, first = np.unique(identity_ids[order], return_index=True)
    chosen = order[np.sort(first)[:top_k]]
    return [Hit(int(identity_ids[i]), int(face_ids[i]), min(1.0, float(scores[i]))) for i in chosen]


def kth_similarity(hits: list, top_k: int) -> float:
    """The similarity of the ``top_k``-th hit, or -inf when there are fewer (any face could enter)."""
    return hits[top_k - 1].similarity if len(hits) >= top_k else -np.inf
