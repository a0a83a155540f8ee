"""Exact float32 similarities from a vector source: rescoring candidates, and the exhaustive scan.

A *source* is anything with the store's ``vectors(face_ids) -> (face ids int64 (k,) ascending,
float32 (k, 512))``, answering the faces of ``face_ids`` that exist: the store itself
(:meth:`gallery.store.GalleryStore.vectors`), or :class:`MemoryVectors` for an index used without
one. The in-memory index only chooses candidates; their similarities, and so the ranking of
the answer, come from here.
"""
from __future__ import annotations

import numpy as np

from adaface.options import EMBEDDING_SIZE

from .ranking import best_identities, top_rows

#: faces read from the source per step of the exhaustive scan (40 MiB of float32)
SCAN_CHUNK = 20_000


class MemoryVectors:
    """float32 vectors kept in memory by face id: the source of an index without a store.

    Exact like the store, at 2 KiB per face on top of the index itself. Changes replace the
    arrays (one tuple, swapped at once), so a reader never sees ids and vectors of two states;
    the index that owns it serialises the changes."""

    def __init__(self):
        self._data = (np.zeros(0, np.int64), np.zeros((0, EMBEDDING_SIZE), np.float32))

    @property
    def nbytes(self) -> int:
        return self._data[0].nbytes + self._data[1].nbytes

    def put(self, face_ids: np.ndarray, vectors: np.ndarray) -> None:
        """Keep faces (ids int64 (k,), float32 (k, 512)), replacing any held under the same id."""
        face_ids = np.asarray(face_ids, np.int64)
        if len(face_ids) == 0:
            return
        self.drop(face_ids)
        held_ids, held = self._data
        ids = np.concatenate([held_ids, face_ids])
        order = np.argsort(ids, kind="stable")
        self._data = ids[order], np.concatenate([held, np.asarray(vectors, np.float32)])[order]

    def drop(self, face_ids: np.ndarray) -> None:
        ids, vectors = self._data
        keep = ~np.isin(ids, np.asarray(face_ids, np.int64))
        if not keep.all():
            self._data = ids[keep], vectors[keep]

    def vectors(self, face_ids) -> tuple:
        ids, vectors = self._data
        wanted = np.unique(np.asarray(face_ids, np.int64))
        at = _present(ids, wanted)
        return ids[at], vectors[at]


def rescore(source, candidates: list, identities, probes: np.ndarray, top_k: int) -> list:
    """For each probe its ``top_k`` best identities among its candidate face ids, scored exactly.

    ``candidates``: one int64 array of face ids per probe; ``identities(face_ids)`` gives each
    one's identity id (-1 where the index no longer holds it). One call to the source serves
    every probe; a candidate the source no longer has (deleted since) is left out. Returns one
    list of :class:`Hit` per probe.
    """
    wanted = np.unique(np.concatenate(candidates)) if candidates else np.zeros(0, np.int64)
    if len(wanted) == 0:
        return [[] for _ in probes]
    ids, vectors = source.vectors(wanted)
    owners = identities(ids)
    held = owners >= 0
    ids, vectors, owners = ids[held], vectors[held], owners[held]
    results = []
    for probe, mine in zip(probes, candidates):
        rows = _present(ids, mine)
        results.append(best_identities(ids[rows], owners[rows], vectors[rows] @ probe, top_k))
    return results


def _present(ids: np.ndarray, wanted: np.ndarray) -> np.ndarray:
    """Positions in ``ids`` (ascending) of those of ``wanted`` it holds."""
    at = np.searchsorted(ids, wanted)
    ok = at < len(ids)
    ok[ok] = ids[at[ok]] == wanted[ok]
    return np.unique(at[ok])


def exhaustive(source, face_ids: np.ndarray, identity_ids: np.ndarray, probes: np.ndarray, top_k: int,
               chunk: int = SCAN_CHUNK) -> list:
    """The exact answer: every face read from the source in chunks and scored in float32.

    ``face_ids`` (ascending) and ``identity_ids`` int64 (n,) say which faces to read and whose
    they are; memory stays at one chunk. Cost: the source's read of every vector (the store's
    ``vectors`` by id lists) plus a float32 product per chunk. Returns one list of :class:`Hit`
    per probe.
    """
    kept = [(np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32)) for _ in probes]
    for start in range(0, len(face_ids), chunk):
        ids, vectors = source.vectors(face_ids[start:start + chunk])
        if len(ids) == 0:
            continue
        owners = identity_ids[start:start + chunk][_present(face_ids[start:start + chunk], ids)]
        scores = vectors @ probes.T                                   # (k, m) float32
        for j in range(len(probes)):
            rows = top_rows(np.ascontiguousarray(scores[:, j]), owners, top_k)
            old_ids, old_owners, old_scores = kept[j]
            merged = (np.concatenate([old_ids, ids[rows]]), np.concatenate([old_owners, owners[rows]]),
                      np.concatenate([old_scores, scores[rows, j]]))
            best = best_identities(*merged, top_k)
            keep = np.isin(merged[0], [h.face_id for h in best])
            kept[j] = tuple(a[keep] for a in merged)
    return [best_identities(*k, top_k) for k in kept]
