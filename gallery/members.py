"""Which faces an index holds and whose they are: face ids and identity ids, sorted by face id.

Face ids grow as faces are enrolled, so appending keeps the order almost always; a batch that
breaks it is merged in with one sort. Lookups are binary searches (``np.searchsorted``).
"""
from __future__ import annotations

import numpy as np


class Members:
    """Face id -> identity id for one index: two int64 arrays sorted by face id (not locked)."""

    def __init__(self):
        self.face_ids = np.zeros(0, np.int64)
        self.identity_ids = np.zeros(0, np.int64)

    def __len__(self) -> int:
        return len(self.face_ids)

    @property
    def nbytes(self) -> int:
        return self.face_ids.nbytes + self.identity_ids.nbytes

    def add(self, face_ids: np.ndarray, identity_ids: np.ndarray) -> None:
        """Add faces (int64 (k,) each); a face id already held takes the new identity."""
        face_ids = np.asarray(face_ids, np.int64)
        identity_ids = np.asarray(identity_ids, np.int64)
        if len(face_ids) == 0:
            return
        self.remove(face_ids)
        order = np.argsort(face_ids, kind="stable")
        face_ids, identity_ids = face_ids[order], identity_ids[order]
        if len(self.face_ids) == 0 or face_ids[0] > self.face_ids[-1]:
            self.face_ids = np.concatenate([self.face_ids, face_ids])
            self.identity_ids = np.concatenate([self.identity_ids, identity_ids])
            return
        merged = np.concatenate([self.face_ids, face_ids])
        order = np.argsort(merged, kind="stable")
        self.face_ids = merged[order]
        self.identity_ids = np.concatenate([self.identity_ids, identity_ids])[order]

    def positions(self, face_ids: np.ndarray) -> np.ndarray:
        """Index into :attr:`face_ids` of each of ``face_ids``, -1 where not held."""
        face_ids = np.asarray(face_ids, np.int64)
        at = np.searchsorted(self.face_ids, face_ids)
        found = at < len(self.face_ids)
        found[found] = self.face_ids[at[found]] == face_ids[found]
        return np.where(found, at, -1)

    def remove(self, face_ids: np.ndarray) -> None:
        """Drop faces by id (ids not held are ignored)."""
        at = self.positions(face_ids)
        at = at[at >= 0]
        if len(at):
            self.face_ids = np.delete(self.face_ids, at)
            self.identity_ids = np.delete(self.identity_ids, at)

    def identities(self, face_ids: np.ndarray) -> np.ndarray:
        """The identity id of each of ``face_ids`` (int64, aligned), -1 where not held."""
        at = self.positions(face_ids)
        return np.where(at >= 0, self.identity_ids[np.maximum(at, 0)] if len(self.identity_ids) else -1, -1)
