"""In-memory search over a gallery's faces, kept in step with the store.

:class:`SearchIndex` holds one gallery's faces in one of two forms, and either way only picks
candidates: their similarities are computed exactly, in float32, from the vectors the store
keeps (:meth:`gallery.store.GalleryStore.vectors`, :mod:`gallery.rescore`). Each identity counts
once, with its best face.

- **float16 scan** (below :attr:`SearchParams.ann_min_faces` faces): a float16 matrix
  (:class:`gallery.half.HalfMatrix`, 1 KiB per face) scored against the probe in one pass; the
  best :func:`gallery.ann.candidate_count` faces are rescored. The float16 scores are within a
  known bound of the float32 ones (:data:`gallery.half.SCORE_ERROR`), so the rescored answer is
  checked against it, and when a face outside the candidates could still belong in the answer,
  every face that could is rescored too: the answer is the exact float32 one.
- **inverted file** (from :attr:`SearchParams.ann_min_faces` faces): faiss's IVF-PQ index
  (:class:`gallery.ann.InvertedFile`, about 40 bytes per face: a 32-byte code and the id; the
  ``nprobe`` nearest of its lists scanned for each probe) gives the candidates; approximate
  (recall against the exact answer measured in docs/galleries.md). When a float16 index grows to
  the threshold, the inverted file is trained and filled in a native thread while the float16
  scan keeps serving, then takes its place and the matrix is freed.
- ``exact=True`` returns the exact float32 answer from either: the float16 scan already does; an
  inverted-file index reads every vector from the store in chunks and scores them all
  (:func:`gallery.rescore.exhaustive`; seconds per million faces, see docs/galleries.md).

:class:`Indexes` keeps one index per gallery and brings it up to date from the store's change
log: before each search it reads the gallery's version (one indexed row) and loads only the
changes after the version it holds, so several gunicorn workers (SQLite) or replicas
(PostgreSQL) see each other's writes; where the store has notifications (PostgreSQL), a listener
thread applies deltas as they are committed, so searches rarely find anything to load.
"""
from __future__ import annotations

import logging
import time
from typing import Iterable, Iterator, Optional

import numpy as np

from adaface.threads import allocate_lock, start_new_thread

from .ann import InvertedFile, SearchParams, candidate_count
from .errors import GalleryNotFoundError
from .half import HalfMatrix
from .members import Members
from .ranking import Hit, kth_similarity, top_indices
from .rescore import MemoryVectors, exhaustive, rescore
from .store import DROPPED, GalleryStore, Rows, check_gallery_name

logger = logging.getLogger(__name__)

__all__ = ["Hit", "Indexes", "SearchIndex", "SearchParams"]

#: float16 rows copied into the inverted file per step of a background build (16 MiB)
BUILD_CHUNK = 16_384
#: the most candidates an inverted-file search asks for while looking for ``top_k`` distinct identities
MAX_ANN_CANDIDATES = 4_096


class SearchIndex:
    """One gallery's faces in memory; ``version`` is the store version it reflects.

    ``source`` gives the exact float32 vectors (the store); without one the index keeps them
    itself (:class:`gallery.rescore.MemoryVectors`, 2 KiB more per face). All methods are
    thread-safe (one native lock: a search and a delta never overlap).
    """

    def __init__(self, gallery_id: int, version: int = 0, source=None, params: Optional[SearchParams] = None):
        self.gallery_id = gallery_id
        self.version = version
        self.params = params or SearchParams()
        self._own = MemoryVectors() if source is None else None
        self.source = self._own if source is None else source
        self._members = Members()
        self._half: Optional[HalfMatrix] = HalfMatrix()
        self._ann: Optional[InvertedFile] = None
        self._job: Optional[_Build] = None
        self._build_failed = False
        self._loading = False
        self._closed = False
        self._identity_count: Optional[int] = None
        self._lock = allocate_lock()

    def __len__(self) -> int:
        return len(self._members)

    @property
    def kind(self) -> str:
        """``"ivf"`` or ``"float16"``: how candidates are found now."""
        return "ivf" if self._ann is not None else "float16"

    @property
    def ann(self) -> Optional[InvertedFile]:
        """The inverted file once there is one (read-only use: the index serialises changes)."""
        return self._ann

    @property
    def building(self) -> bool:
        """Whether an inverted file is being built in the background."""
        return self._job is not None

    @property
    def nbytes(self) -> int:
        """Memory held by the index (matrix or inverted file, ids, and its own vectors if any), in bytes."""
        with self._lock:
            held = self._members.nbytes + (self._half.nbytes if self._half is not None else 0)
            held += self._ann.nbytes if self._ann is not None else 0
            return held + (self._own.nbytes if self._own is not None else 0)

    def face_ids(self) -> np.ndarray:
        with self._lock:
            return self._members.face_ids.copy()

    def reserve(self, total: int) -> None:
        """Make room for ``total`` faces at once (bulk loads avoid repeated growth)."""
        with self._lock:
            if self._half is not None:
                self._half.reserve(total)

    # -- changes -----------------------------------------------------------------------------

    def add(self, face_ids, identity_ids, vectors) -> None:
        """Add faces: ids int64 (k,), vectors float32 (k, 512) unit rows."""
        with self._lock:
            self._add(np.asarray(face_ids, np.int64), np.asarray(identity_ids, np.int64),
                      np.asarray(vectors, np.float32))

    def load(self, rows: Rows) -> None:
        """Replace everything with a snapshot; from the threshold on, an inverted file is built in
        the background while the float16 scan serves."""
        self.load_chunks(rows.version, [(rows.face_ids, rows.identity_ids, rows.vectors)], len(rows.face_ids),
                         ann_now=False)

    def load_snapshot(self, pieces: Iterator) -> None:
        """Replace everything with a snapshot read in pieces (:meth:`GalleryStore.snapshot_chunks`:
        ``(version, count)``, then :class:`Rows`): the float16 rows fill as the pieces arrive,
        so only one piece of float32 is held at a time, then from the threshold on an inverted
        file is built in the background while the float16 scan serves."""
        try:
            version, count = next(pieces)
            self.load_chunks(version, ((r.face_ids, r.identity_ids, r.vectors) for r in pieces), count,
                             ann_now=False)
        finally:
            pieces.close()                   # ends the store's read at once, also on an error

    def load_chunks(self, version: int, chunks: Iterable, total: int, ann_now: bool = True) -> None:
        """Replace everything with ``chunks`` of (face ids, identity ids, float32 vectors), about
        ``total`` faces in all. With ``ann_now`` and ``total`` at the threshold or above, the
        inverted file is built here from the chunks, without a float16 copy (the way to load ten
        million faces: only the inverted file, the training faces and one chunk are ever held);
        otherwise the chunks fill the float16 rows and an inverted file, if due, is built in the
        background once they are in."""
        with self._lock:
            self._reset()
            if ann_now and self.params.wants_ann(total):
                self._ann, self._half = InvertedFile(self.params), None
            else:
                self._half.reserve(total)
            self._loading = True
            try:
                for face_ids, identity_ids, vectors in chunks:
                    self._add(np.asarray(face_ids, np.int64), np.asarray(identity_ids, np.int64),
                              np.asarray(vectors, np.float32))
                if self._ann is not None:
                    self._ann.finish()
            finally:
                self._loading = False
            self.version = version
            self._build_if_due()

    def apply(self, delta: Rows) -> bool:
        """Apply a delta from :meth:`GalleryStore.delta` unless this index is already as new.

        Every touched face is removed, then those that still exist are added back: the same
        delta applied twice, or an older one after a newer one, changes nothing.
        """
        with self._lock:
            if delta.version <= self.version:
                return False
            self._remove(np.asarray(delta.touched, np.int64))
            self._add(np.asarray(delta.face_ids, np.int64), np.asarray(delta.identity_ids, np.int64),
                      np.asarray(delta.vectors, np.float32))
            self.version = delta.version
            return True

    def close(self) -> None:
        """Stop a background build (the index is no longer used)."""
        self._closed = True

    def wait_built(self, timeout: float = -1) -> bool:
        """Wait for a background build to finish (``timeout`` seconds, -1: as long as it takes);
        True when none is running."""
        job = self._job
        if job is None or job.done.acquire(True, timeout):
            if job is not None:
                job.done.release()
            return True
        return False

    def _reset(self) -> None:
        self._members, self._half, self._ann = Members(), HalfMatrix(), None
        self._job = None                       # a running build sees this and stops
        self._identity_count = None
        if self._own is not None:
            self._own = self.source = MemoryVectors()

    def _add(self, face_ids: np.ndarray, identity_ids: np.ndarray, vectors: np.ndarray) -> None:
        if len(face_ids) == 0:
            return
        self._members.add(face_ids, identity_ids)
        self._identity_count = None
        if self._own is not None:
            self._own.put(face_ids, vectors)
        if self._ann is not None:
            self._ann.add(face_ids, vectors)
            return
        self._half.add(face_ids, vectors)
        self._build_if_due()

    def _build_if_due(self) -> None:
        """Start the background build once the float16 rows reach the threshold (lock held; not
        while a load is still adding them)."""
        if (self._half is not None and not self._loading and self._job is None and not self._build_failed
                and self.params.wants_ann(len(self._half))):
            self._start_build()

    def _remove(self, face_ids: np.ndarray) -> None:
        if len(face_ids) == 0 or len(self._members) == 0:
            return
        face_ids = face_ids[self._members.positions(face_ids) >= 0]    # a delta also names new faces
        if len(face_ids) == 0:
            return
        self._members.remove(face_ids)
        self._identity_count = None
        if self._own is not None:
            self._own.drop(face_ids)
        if self._ann is not None:
            self._ann.remove(face_ids)
            return
        self._half.remove(face_ids)
        if self._job is not None:
            self._job.removed.append(face_ids)

    # -- the background build ----------------------------------------------------------------

    def _start_build(self) -> None:
        """Start building an inverted file from the float16 rows in a native thread (lock held)."""
        if self._closed:
            return
        self._job = job = _Build()
        logger.info("gallery %d: building an inverted file of %d faces in the background", self.gallery_id,
                    len(self._half))
        start_new_thread(self._build, (job,))

    def _build(self, job: "_Build") -> None:
        """Copy the rows into a new inverted file a chunk at a time (the lock held only to copy),
        train it once they are in (without the lock), then swap it in; a reset or :meth:`close`
        meanwhile ends the build."""
        began = time.monotonic()
        try:
            ann, built, start, finished = InvertedFile(self.params), [], 0, False
            while True:
                with self._lock:
                    if self._closed or self._job is not job:
                        return
                    if start >= len(self._half) and finished:
                        self._swap(ann, np.concatenate(built) if built else np.zeros(0, np.int64), job)
                        break
                    face_ids, vectors = self._half.rows(start, start + BUILD_CHUNK)
                if len(face_ids) == 0:
                    ann.finish()             # rows added meanwhile are copied on the next turn
                    finished = True
                    continue
                ann.add(face_ids, vectors)
                built.append(face_ids)
                start += len(face_ids)
            logger.info("gallery %d: inverted file of %d faces in %d lists built in %.1f s", self.gallery_id,
                        len(ann), ann.lists, time.monotonic() - began)
        except Exception:
            logger.exception("gallery %d: building the inverted file failed; the float16 scan goes on serving",
                             self.gallery_id)
            self._build_failed = True
        finally:
            with self._lock:
                if self._job is job:
                    self._job = None
            job.done.release()

    def _swap(self, ann: InvertedFile, built: np.ndarray, job: "_Build") -> None:
        """Bring the inverted file level with the float16 rows, then serve from it (lock held).

        Rows a removal moved into an already copied place were never copied, and faces removed
        during the build (perhaps added back with another vector) may be in it as they were.
        """
        current = self._half.face_ids
        removed = np.concatenate(job.removed) if job.removed else np.zeros(0, np.int64)
        ann.remove(built[~np.isin(built, current) | np.isin(built, removed)])
        missing = current[~np.isin(current, built) | np.isin(current, removed)]
        ann.add(*self._half.rows_of(missing))
        self._ann, self._half, self._job = ann, None, None

    # -- search ------------------------------------------------------------------------------

    def search(self, probes: np.ndarray, top_k: int, exact: bool = False) -> list:
        """For each probe (float32 (m, 512) unit rows) the ``top_k`` best identities as :class:`Hit`,
        with exact float32 similarities; ``exact`` makes the choice of identities exact too."""
        probes = np.ascontiguousarray(np.atleast_2d(probes), np.float32)
        with self._lock:
            if len(self._members) == 0:
                return [[] for _ in probes]
            if self._ann is None:
                return [self._search_half(probe, top_k) for probe in probes]
            if not exact:
                return self._search_ann(probes, top_k)
            face_ids, identity_ids = self._members.face_ids, self._members.identity_ids
        # the exhaustive scan reads the store without the lock (arrays are replaced, never changed)
        return exhaustive(self.source, face_ids, identity_ids, probes, top_k)

    def _distinct(self, top_k: int) -> int:
        """``top_k``, or the number of identities held when that is smaller."""
        if self._identity_count is None:
            self._identity_count = len(np.unique(self._members.identity_ids))
        return min(top_k, self._identity_count)

    def _search_half(self, probe: np.ndarray, top_k: int) -> list:
        """The exact answer from the float16 scan: the best candidates rescored, then, where the
        float16 error bound leaves room for a face outside them, every face that could enter."""
        scores = self._half.scores(probe[None])[:, 0]
        face_ids, n = self._half.face_ids, len(self._half)
        margin, wanted = self._half.error(probe), self._distinct(top_k)
        count = candidate_count(top_k, self.params)
        while True:
            rows = top_indices(scores, count)
            hits = self._rescore([face_ids[rows]], probe[None], top_k)[0]
            floor = kth_similarity(hits, wanted)
            if len(rows) == n or scores[rows[-1]] + margin < floor:
                return hits              # no face outside the candidates scores above the k-th
            if floor > -np.inf:
                return self._rescore([face_ids[scores >= floor - margin]], probe[None], top_k)[0]
            count *= 4                   # too few identities among the candidates

    def _search_ann(self, probes: np.ndarray, top_k: int) -> list:
        """Candidates from the inverted file, rescored; more of them while a probe's candidates
        hold fewer than ``top_k`` distinct identities."""
        count, wanted = candidate_count(top_k, self.params), self._distinct(top_k)
        results = self._ann_hits(probes, count, top_k)
        while count < min(len(self._ann), MAX_ANN_CANDIDATES):
            short = [j for j, hits in enumerate(results) if len(hits) < wanted]
            if not short:
                break
            count *= 4
            for j, hits in zip(short, self._ann_hits(probes[short], count, top_k)):
                results[j] = hits
        return results

    def _ann_hits(self, probes: np.ndarray, count: int, top_k: int) -> list:
        return self._rescore(self._ann.search(probes, count), probes, top_k)

    def _rescore(self, candidates: list, probes: np.ndarray, top_k: int) -> list:
        return rescore(self.source, candidates, self._members.identities, probes, top_k)


class _Build:
    """A background build: the faces removed while it runs, and a lock held until it ends."""

    def __init__(self):
        self.removed: list = []
        self.done = allocate_lock()
        self.done.acquire()


class Indexes:
    """The search indexes of one process over one store, loaded on first use and kept in step.

    ``params`` says when an index becomes an inverted file and how (the settings' ``ann_min_faces``).
    """

    def __init__(self, store: GalleryStore, params: Optional[SearchParams] = None):
        self.store = store
        self.params = params or SearchParams()
        self._by_name: dict = {}
        self._lock = allocate_lock()
        self.notified = store.subscribe(self._on_change, self._on_reconnect)

    def index(self, name: str) -> SearchIndex:
        """The gallery's index, brought up to the store's current version (raises when absent)."""
        check_gallery_name(name)
        with self._lock:
            state = self.store.gallery_state(name)
            index = self._by_name.get(name)
            if state is None:
                self._drop(name)
                raise GalleryNotFoundError(name)
            gallery_id, version = state
            if index is None or index.gallery_id != gallery_id:
                self._drop(name)
                index = SearchIndex(gallery_id, source=self.store, params=self.params)
                index.load_snapshot(self.store.snapshot_chunks(gallery_id))
                self._by_name[name] = index
            elif index.version < version:
                index.apply(self.store.delta(gallery_id, index.version))
            return index

    def search(self, name: str, probes: np.ndarray, top_k: int, exact: bool = False) -> list:
        """For each probe (float32 (m, 512) unit rows) up to ``top_k`` :class:`Hit`, best first."""
        return self.index(name).search(probes, top_k, exact=exact)

    def loaded(self, name: str) -> Optional[SearchIndex]:
        """The index held for ``name`` as it is, without checking the store (None if not loaded)."""
        return self._by_name.get(name)

    def _drop(self, name: str) -> None:
        index = self._by_name.pop(name, None)
        if index is not None:
            index.close()

    def _on_change(self, gallery_id: int, version: int) -> None:
        with self._lock:
            for name, index in list(self._by_name.items()):
                if index.gallery_id != gallery_id:
                    continue
                logger.debug("gallery %s: notified of version %d (holding %d)", name, version, index.version)
                if version == DROPPED:
                    self._drop(name)
                elif version > index.version:
                    index.apply(self.store.delta(gallery_id, index.version))

    def _on_reconnect(self) -> None:
        with self._lock:
            for index in list(self._by_name.values()):
                index.apply(self.store.delta(index.gallery_id, index.version))
