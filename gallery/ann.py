"""Approximate search for large galleries: an inverted file of product-quantised faces (faiss), and its parameters.

Above :attr:`SearchParams.ann_min_faces` faces a gallery's index holds its faces in an
:class:`InvertedFile` instead of a float16 matrix: faiss's IVF-PQ "fast scan" index, keyed by
face id.

- **Lists.** k-means splits the unit sphere into ``lists`` cells (up to :attr:`SearchParams.max_lists`,
  4,096), trained once on the first faces the index is given (:data:`TRAIN_PER_LIST` per cell;
  159,744 faces for 4,096 cells). Every face goes to the list of its nearest centre.
- **Codes.** Each face is kept as 32 bytes: product quantisation (64 sub-vectors of 8 values,
  16 centres each, 4 bits per sub-vector; faiss's ``PQ64x4fs``), laid out in blocks that AVX2
  scans with in-register lookup tables.
- **Search.** A probe (float32 (512,)) scores the centres, scans the :attr:`SearchParams.nprobe`
  nearest lists and keeps the :func:`candidate_count` best faces by approximate inner product;
  the caller then computes their exact float32 similarities from the store
  (:mod:`gallery.index`), so the scores answered are exact and only the choice of candidates is
  approximate.

The defaults were chosen with ``bench/gallery.py`` on a 2-core machine without AVX-512
(docs/galleries.md): ``nprobe`` 32 (``ADAFACE_ANN_NPROBE``) found the exact first identity for
every one of 1,000 probes both in a million and in ten million faces, at about 1.1 ms and 2.2 ms
a probe with the float32 rescoring; 4,096 lists keep the centres' scoring (8 MiB of float32) in the CPU's cache while leaving
about 2,400 faces a list at ten million. Memory is about 40 bytes a face (the code and the id):
ten million faces in about 400 MiB. Ten million faces were built in 478 s on two cores, a
minute of it the training.

The lists are trained once: a gallery first built small (a low ``ADAFACE_ANN_MIN_FACES``) keeps
its few lists as it grows, which makes each probe scan a larger share of it; the next load (a
restart) trains again for its size. A warning is logged when that is due.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from adaface.options import DEFAULT_ANN_MIN_FACES, DEFAULT_ANN_NPROBE, EMBEDDING_SIZE

logger = logging.getLogger(__name__)

#: training faces per list: faiss's k-means asks for at least 39 points a centre
TRAIN_PER_LIST = 39
#: the fewest faces the lists are trained on: the product quantiser's 16 centres per sub-vector
#: need 16 x 39; below it the faces are kept as float32 rows and searched exhaustively
MIN_TRAIN_FACES = 16 * TRAIN_PER_LIST
#: faiss's product quantiser: 64 sub-vectors of 4 bits (32 bytes a face), fast-scan layout
CODE = "PQ64x4fs"
#: a gallery this many times larger than the faces its lists were trained on logs a warning
RETRAIN_GROWTH = 16


@dataclass(frozen=True)
class SearchParams:
    """How the in-memory search runs (see the module docstring for the defaults' reasons).

    ``ann_min_faces``: faces at or above which the index becomes an :class:`InvertedFile` (0:
    never; the float16 scan serves every size). ``nprobe``: lists a probe scans. ``max_lists``:
    the most lists the faces are split into. ``candidates``: faces rescored in float32 per probe,
    at least (``8 * top_k`` when that is more). ``build_threads``: threads training and adding
    faces (0: all cores).
    """

    ann_min_faces: int = DEFAULT_ANN_MIN_FACES
    nprobe: int = DEFAULT_ANN_NPROBE
    max_lists: int = 4096
    candidates: int = 64
    build_threads: int = 0

    def __post_init__(self):
        if self.ann_min_faces < 0 or self.build_threads < 0:
            raise ValueError("ann_min_faces and build_threads must be 0 or more")
        for name in ("nprobe", "max_lists", "candidates"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1")

    def wants_ann(self, faces: int) -> bool:
        """Whether a gallery of ``faces`` faces is searched through an :class:`InvertedFile`."""
        return self.ann_min_faces > 0 and faces >= self.ann_min_faces

    @property
    def train_faces(self) -> int:
        """Faces an index gathers before it trains its lists (fewer only when it is told to)."""
        return max(self.max_lists * TRAIN_PER_LIST, MIN_TRAIN_FACES)


def candidate_count(top_k: int, params: SearchParams) -> int:
    """Faces to rescore per probe for ``top_k`` identities: a few times ``top_k``, so that
    identities with several faces near the probe still leave ``top_k`` distinct ones."""
    return max(params.candidates, 8 * top_k)


class InvertedFile:
    """One gallery's faces in a faiss IVF-PQ fast-scan index, keyed by face id.

    Until it is trained it gathers the faces as float32 rows (searched exhaustively): once
    :attr:`SearchParams.train_faces` are in, or :meth:`finish` is called with at least
    :data:`MIN_TRAIN_FACES`, it trains ``lists = min(max_lists, faces // 39)`` lists on them and
    moves them into the index. A face id must not be added while it is held (the owning
    :class:`gallery.index.SearchIndex` removes a face before adding it again).

    Not locked: :class:`gallery.index.SearchIndex` serialises the calls. faiss releases the GIL
    while it trains, adds and searches, so a build in a native thread leaves the others running.
    """

    def __init__(self, params: SearchParams):
        self.params = params
        self._index = None                       # the faiss index once trained
        self._trained_on = 0
        self._finished = False
        self._warned = False
        self._pending: list = []                 # (ids int64 (k,), float32 (k, 512)) before training
        self._held = _SortedIds()

    def __len__(self) -> int:
        return len(self._held)

    @property
    def trained(self) -> bool:
        """Whether the lists are trained (before, the faces are searched exhaustively)."""
        return self._index is not None

    @property
    def lists(self) -> int:
        """How many lists the faces are split into (0 before training)."""
        return int(self._index.nlist) if self._index is not None else 0

    @property
    def nbytes(self) -> int:
        """Memory the faces take here (codes, ids, centres, or the float32 rows before
        training, and the sorted ids), in bytes."""
        held = self._held.nbytes + sum(ids.nbytes + rows.nbytes for ids, rows in self._pending)
        if self._index is not None:
            # codes (half a byte per sub-vector) and ids per face, the centres, the lookup tables
            held += len(self._held) * (self._index.code_size + 8) + self.lists * EMBEDDING_SIZE * 4
        return held

    def add(self, face_ids: np.ndarray, vectors: np.ndarray) -> None:
        """Insert faces (ids int64 (k,) not held, float32 (k, 512) unit rows)."""
        ids = np.asarray(face_ids, np.int64)
        if len(ids) == 0:
            return
        vectors = np.ascontiguousarray(vectors, np.float32).reshape(len(ids), EMBEDDING_SIZE)
        self._held.add(ids)
        if self._index is not None:
            self._threads()
            self._index.add_with_ids(vectors, ids)
            self._warn_if_outgrown()
            return
        self._pending.append((ids.copy(), vectors.copy()))
        gathered = sum(len(p) for p, _ in self._pending)
        if gathered >= self.params.train_faces or (self._finished and gathered >= MIN_TRAIN_FACES):
            self._train()

    def finish(self) -> None:
        """Say that the bulk of the faces is in: train now on what was gathered, if there are at
        least :data:`MIN_TRAIN_FACES` (else as soon as there are). Slow (about a minute for
        160,000 faces): call it outside any lock that searches wait for."""
        self._finished = True
        if self._index is None and sum(len(p) for p, _ in self._pending) >= MIN_TRAIN_FACES:
            self._train()

    def holds(self, face_ids: np.ndarray) -> np.ndarray:
        """bool (k,): whether each face id is held."""
        return self._held.holds(np.asarray(face_ids, np.int64))

    def remove(self, face_ids: np.ndarray) -> None:
        """Drop faces by id (ids not held are ignored). Scans every list: tens of milliseconds at
        ten million faces."""
        ids = np.asarray(face_ids, np.int64)
        ids = ids[self._held.holds(ids)]
        if len(ids) == 0:
            return
        self._held.remove(ids)
        if self._index is not None:
            self._index.remove_ids(np.unique(ids))
            return
        self._pending = [(p[keep], rows[keep]) for p, rows in self._pending
                         for keep in [~np.isin(p, ids)] if keep.any()]

    def search(self, probes: np.ndarray, count: int) -> list:
        """For each probe (float32 (m, 512) unit rows) up to ``count`` face ids (int64), the most
        similar first by the approximate (quantised) inner product."""
        probes = np.ascontiguousarray(probes, np.float32).reshape(-1, EMBEDDING_SIZE)
        count = min(count, len(self))
        if count == 0:
            return [np.zeros(0, np.int64) for _ in probes]
        if self._index is None:
            return self._search_pending(probes, count)
        self._index.nprobe = min(self.params.nprobe, self.lists)
        _, found = self._index.search(probes, count)
        return [row[row >= 0].astype(np.int64) for row in found]

    def _search_pending(self, probes: np.ndarray, count: int) -> list:
        ids = np.concatenate([p for p, _ in self._pending])
        scores = np.concatenate([rows @ probes.T for _, rows in self._pending])       # (n, m)
        best = np.argpartition(-scores, count - 1, axis=0)[:count] if count < len(ids) else \
            np.repeat(np.arange(len(ids))[:, None], len(probes), axis=1)
        return [ids[rows[np.argsort(-scores[rows, j], kind="stable")]] for j, rows in enumerate(best.T)]

    def _train(self) -> None:
        """Train the lists and the quantiser on the gathered faces, then move them in."""
        import faiss

        ids = np.concatenate([p for p, _ in self._pending])
        rows = np.concatenate([r for _, r in self._pending])
        lists = max(1, min(self.params.max_lists, len(ids) // TRAIN_PER_LIST))
        index = faiss.index_factory(EMBEDDING_SIZE, f"IVF{lists},{CODE}", faiss.METRIC_INNER_PRODUCT)
        self._threads()
        index.train(rows[:lists * TRAIN_PER_LIST] if lists == self.params.max_lists else rows)
        index.add_with_ids(rows, ids)
        self._index, self._pending, self._trained_on = index, [], len(ids)
        logger.info("trained %d lists on %d faces", lists, len(ids))

    def _threads(self) -> None:
        """Build on ``build_threads`` threads (OpenMP's count is per calling thread)."""
        if self.params.build_threads:
            import faiss
            faiss.omp_set_num_threads(self.params.build_threads)

    def _warn_if_outgrown(self) -> None:
        if (not self._warned and self.lists < self.params.max_lists
                and len(self) > RETRAIN_GROWTH * self._trained_on):
            self._warned = True
            logger.warning("a gallery of %d faces is searched through %d lists trained on %d faces: each probe "
                           "scans a large share of it; it is trained again for its size when next loaded",
                           len(self), self.lists, self._trained_on)


class _SortedIds:
    """A set of int64 ids: appended in pieces, sorted together when asked (not locked)."""

    def __init__(self):
        self._sorted = np.zeros(0, np.int64)
        self._parts: list = []
        self._count = 0

    def __len__(self) -> int:
        return self._count

    @property
    def nbytes(self) -> int:
        return self._count * 8

    def add(self, ids: np.ndarray) -> None:
        self._parts.append(np.asarray(ids, np.int64).copy())
        self._count += len(ids)

    def _merged(self) -> np.ndarray:
        if self._parts:
            self._sorted = np.sort(np.concatenate([self._sorted, *self._parts]))
            self._parts = []
        return self._sorted

    def holds(self, ids: np.ndarray) -> np.ndarray:
        held = self._merged()
        at = np.minimum(np.searchsorted(held, ids), max(len(held) - 1, 0))
        return held[at] == ids if len(held) else np.zeros(len(ids), bool)

    def remove(self, ids: np.ndarray) -> None:
        held = self._merged()
        keep = ~np.isin(held, ids)
        self._sorted, self._count = held[keep], int(keep.sum())
