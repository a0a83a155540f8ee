"""A gallery's faces as a float16 matrix: the scan that finds the candidates of smaller galleries.

:class:`HalfMatrix` keeps one float16 row (1,024 bytes) per face, with its face id, and scores
every row against a probe in one pass (torch's float16 matrix product, which accumulates in
float32; about 80 ms per probe per million faces on a 2-core machine, bound by memory).

The scores differ from the float32 ones by at most :data:`SCORE_ERROR` (times the probe's and
the rows' norms): rounding the row, the probe and the score to float16 each moves a cosine of
unit vectors by at most 2^-11 (4.9e-4), and the float32 sum over 512 terms by about 3e-5. The
caller relies on that bound to know which candidates it must rescore (:mod:`gallery.index`).
"""
from __future__ import annotations

import numpy as np

from adaface.options import EMBEDDING_SIZE

#: the largest |float16 score - float32 score| for unit vectors: 3 * 2^-11 + the float32 sum's
#: error (1.5e-3), with room to spare
SCORE_ERROR = 2e-3
GROWTH = 1.25


class HalfMatrix:
    """float16 rows with their face ids; removal fills the holes from the end (not locked)."""

    def __init__(self):
        self._rows = np.zeros((0, EMBEDDING_SIZE), np.float16)
        self._face_ids = np.zeros(0, np.int64)
        self._n = 0
        self.max_norm = 0.0

    def __len__(self) -> int:
        return self._n

    @property
    def nbytes(self) -> int:
        return self._rows.nbytes + self._face_ids.nbytes

    @property
    def face_ids(self) -> np.ndarray:
        """Face id of each row (a view: copy it before the matrix changes)."""
        return self._face_ids[:self._n]

    def rows(self, start: int, end: int) -> tuple:
        """Copies of rows ``start:end`` (of those held): (face ids int64, float32 (k, 512))."""
        end = min(end, self._n)
        return self._face_ids[start:end].copy(), self._rows[start:end].astype(np.float32)

    def rows_of(self, face_ids: np.ndarray) -> tuple:
        """(face ids, float32 rows) of those of ``face_ids`` held."""
        where = np.flatnonzero(np.isin(self.face_ids, face_ids))
        return self._face_ids[where].copy(), self._rows[where].astype(np.float32)

    def reserve(self, total: int) -> None:
        """Make room for ``total`` rows at once."""
        if total <= len(self._rows):
            return
        capacity = max(total, int(len(self._rows) * GROWTH))
        rows = np.empty((capacity, EMBEDDING_SIZE), np.float16)
        rows[:self._n] = self._rows[:self._n]
        ids = np.empty(capacity, np.int64)
        ids[:self._n] = self._face_ids[:self._n]
        self._rows, self._face_ids = rows, ids

    def add(self, face_ids: np.ndarray, vectors: np.ndarray) -> None:
        """Append rows: ids int64 (k,), vectors float32 (k, 512)."""
        count = len(face_ids)
        if count == 0:
            return
        self.reserve(self._n + count)
        end = self._n + count
        self._rows[self._n:end] = vectors
        self._face_ids[self._n:end] = face_ids
        self._n = end
        squared = np.einsum("ij,ij->i", vectors, vectors)      # no (k, 512) temporary
        self.max_norm = max(self.max_norm, float(np.sqrt(squared.max())))

    def remove(self, face_ids: np.ndarray) -> None:
        """Drop the rows of ``face_ids``, moving rows from the end into the holes."""
        if self._n == 0 or len(face_ids) == 0:
            return
        gone = np.flatnonzero(np.isin(self._face_ids[:self._n], face_ids))
        if len(gone) == 0:
            return
        keep_n = self._n - len(gone)
        holes = gone[gone < keep_n]
        tail = np.arange(keep_n, self._n)
        movers = tail[~np.isin(tail, gone)]
        self._rows[holes] = self._rows[movers]
        self._face_ids[holes] = self._face_ids[movers]
        self._n = keep_n

    def scores(self, probes: np.ndarray) -> np.ndarray:
        """float32 (n, m): every row's float16 cosine with each probe (float32 (m, 512))."""
        import torch
        rows = torch.from_numpy(self._rows[:self._n])
        columns = torch.from_numpy(np.ascontiguousarray(probes.T, np.float16))
        return (rows @ columns).float().numpy()

    def error(self, probe: np.ndarray) -> float:
        """The bound on |float16 score - float32 score| of any row for this probe."""
        return SCORE_ERROR * max(1.0, self.max_norm) * max(1.0, float(np.linalg.norm(probe)))
