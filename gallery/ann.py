"""Approximate search for large galleries: an HNSW graph (usearch) over the faces, and its parameters.

Above :attr:`SearchParams.ann_min_faces` faces a gallery's index holds its faces in a
:class:`Graph` instead of a float16 matrix: usearch's HNSW (hierarchical navigable small world)
graph, keyed by face id, each vector kept as 512 int8 values (``i8``; ``f16`` keeps 1,024
bytes). A probe walks the graph to :func:`candidate_count` nearby faces, whose exact float32
similarities the caller then computes from the store (:mod:`gallery.index`), so the scores
answered are exact and only the choice of candidates is approximate.

The defaults were chosen with ``bench/gallery.py`` on a 2-core machine (docs/galleries.md):

- ``connectivity`` 16 (HNSW's M; 32 links per face on the bottom layer): 12 lost recall at a
  million faces (0.96 against 0.99 at the same ``expansion_search``), and more links cost memory
  and build time (each insertion re-sorts its neighbours' lists, about M² distances).
- ``expansion_add`` 96 (efConstruction): a better graph for a slower build. At a million faces
  it took recall@1 at ``expansion_search`` 64 from about 0.95 (``expansion_add`` 40) to 0.990, and
  the build from 281 s to 629 s on two cores (it runs in the background while the float16 scan
  serves).
- ``expansion_search`` 80 (ef; ``ADAFACE_ANN_EXPANSION_SEARCH``): the search's candidate list,
  the knob that trades time for recall: 1.8 ms a probe at recall@1 0.997 in a million faces; 13.5 ms
  at 0.994 in ten million (ten segments; docs/galleries.md). usearch never walks with fewer than the
  candidates asked for.
- ``dtype`` ``i8``: half the memory of ``f16`` (ten million faces fit in about 8 GB instead of
  13) and cheaper distances; its coarser scores only steer the walk, the rescoring is float32.
- ``segment_faces`` 1,000,000: a graph holds its faces in segments of at most this many, each
  its own usearch index, searched together (one probe's segments on all cores, the candidates
  merged by distance). A million-face graph's working set (775 MiB) stays in the CPU's caches
  far better than one of ten million: adding a face to a single ten-million-face graph cost 2.8
  times as much as to a million-face one (1,290 against 3,560 faces/s, two cores), so segments
  build about as fast at any size, and each keeps the recall measured at a million faces.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from adaface.options import (DEFAULT_ANN_EXPANSION_SEARCH, DEFAULT_ANN_MIN_FACES, DEFAULT_ANN_SEGMENT_FACES,
                             EMBEDDING_SIZE)

#: how the graph may hold its vectors
GRAPH_DTYPES = ("i8", "f16")
#: a graph smaller than this takes its faces one thread at a time: usearch's parallel insertion
#: into a small graph leaves some faces unreachable (about 0.5% of 300 random unit vectors, none
#: with one thread; at 20,000 the two differ little), and one thread adds 4,096 faces in ~0.3 s
SERIAL_FACES = 4_096


@dataclass(frozen=True)
class SearchParams:
    """How the in-memory search runs (see the module docstring for the defaults' reasons).

    ``ann_min_faces``: faces at or above which the index becomes an HNSW graph (0: never; the
    float16 scan serves every size). ``candidates``: faces rescored in float32 per probe, at
    least (``8 * top_k`` when that is more). ``build_threads``: threads adding faces to a graph
    (0: all cores). ``segment_faces``: the most faces one segment of a graph holds (a probe
    walks every segment, on ``search_threads`` threads: 0, all cores).
    """

    ann_min_faces: int = DEFAULT_ANN_MIN_FACES
    connectivity: int = 16
    expansion_add: int = 96
    expansion_search: int = DEFAULT_ANN_EXPANSION_SEARCH
    dtype: str = "i8"
    candidates: int = 64
    build_threads: int = 0
    segment_faces: int = DEFAULT_ANN_SEGMENT_FACES
    search_threads: int = 0

    def __post_init__(self):
        if self.dtype not in GRAPH_DTYPES:
            raise ValueError(f"graph dtype {self.dtype!r}: use one of {', '.join(GRAPH_DTYPES)}")
        if self.ann_min_faces < 0 or self.build_threads < 0 or self.search_threads < 0:
            raise ValueError("ann_min_faces, build_threads and search_threads must be 0 or more")
        for name in ("connectivity", "expansion_add", "expansion_search", "candidates", "segment_faces"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1")

    def wants_graph(self, faces: int) -> bool:
        """Whether a gallery of ``faces`` faces is searched through a graph."""
        return self.ann_min_faces > 0 and faces >= self.ann_min_faces


def candidate_count(top_k: int, params: SearchParams) -> int:
    """Faces to rescore per probe for ``top_k`` identities: a few times ``top_k``, so that
    identities with several faces near the probe still leave ``top_k`` distinct ones."""
    return max(params.candidates, 8 * top_k)


class Graph:
    """One gallery's faces in usearch HNSW indexes, keyed by face id: segments of at most
    ``params.segment_faces`` faces, new faces going to the last one.

    Not locked: :class:`gallery.index.SearchIndex` serialises the calls. usearch releases the
    GIL while it adds and searches, so a build in a native thread leaves the others running.
    """

    def __init__(self, params: SearchParams):
        self.params = params
        self._segments: list = []
        self._together = None          # usearch's Indexes over every segment, made on first search

    def _new_segment(self):
        from usearch.index import Index
        segment = Index(ndim=EMBEDDING_SIZE, metric="cos", dtype=self.params.dtype,
                        connectivity=self.params.connectivity, expansion_add=self.params.expansion_add,
                        expansion_search=self.params.expansion_search)
        self._segments.append(segment)
        self._together = None
        return segment

    def __len__(self) -> int:
        return sum(len(segment) for segment in self._segments)

    @property
    def segments(self) -> int:
        """How many segments hold the faces."""
        return len(self._segments)

    @property
    def nbytes(self) -> int:
        """Memory the segments say they hold (vectors, links and allocator slack), in bytes."""
        return sum(int(segment.memory_usage) for segment in self._segments)

    def add(self, face_ids: np.ndarray, vectors: np.ndarray) -> None:
        """Insert faces (ids int64 (k,), float32 (k, 512)); ids already held are skipped. The last
        segment takes them up to ``segment_faces``, then a new one; the first
        :data:`SERIAL_FACES` of a segment go in with one thread, the rest with ``build_threads``."""
        keys = np.asarray(face_ids, np.int64).astype(np.uint64)
        if len(keys) == 0:
            return
        new = ~self.holds(face_ids)
        if not new.any():
            return
        keys, vectors = keys[new], np.ascontiguousarray(np.asarray(vectors)[new], np.float32)
        while len(keys):
            segment = self._segments[-1] if self._segments else None
            if segment is None or len(segment) >= self.params.segment_faces:
                segment = self._new_segment()
            room = self.params.segment_faces - len(segment)
            self._add_to(segment, keys[:room], vectors[:room])
            keys, vectors = keys[room:], vectors[room:]

    def _add_to(self, segment, keys: np.ndarray, vectors: np.ndarray) -> None:
        small = min(len(keys), max(0, SERIAL_FACES - len(segment)))
        if small:
            segment.add(keys[:small], vectors[:small], threads=1)
        if small < len(keys):
            segment.add(keys[small:], vectors[small:], threads=self.params.build_threads)

    def holds(self, face_ids: np.ndarray) -> np.ndarray:
        """bool (k,): whether each face id is in the graph."""
        keys = np.asarray(face_ids, np.int64).astype(np.uint64)
        held = np.zeros(len(keys), bool)
        if len(keys):
            for segment in self._segments:
                held |= np.asarray(segment.contains(keys), bool).reshape(-1)
        return held

    def remove(self, face_ids: np.ndarray) -> None:
        """Drop faces by id (ids not held are ignored); the graph keeps routing around them."""
        keys = np.asarray(face_ids, np.int64).astype(np.uint64)
        if len(keys) == 0:
            return
        for segment in self._segments:
            held = np.asarray(segment.contains(keys), bool).reshape(-1)
            if held.any():
                segment.remove(keys[held])

    def search(self, probes: np.ndarray, count: int, expansion: int) -> list:
        """For each probe (float32 (m, 512)) up to ``count`` nearby face ids (int64), nearest first
        over all segments; ``expansion`` is each segment's walk's candidate list (ef; usearch uses
        ``count`` when that is more)."""
        count = min(count, len(self))
        if count == 0:
            return [np.zeros(0, np.int64) for _ in probes]
        for segment in self._segments:
            if segment.expansion_search != expansion:
                segment.expansion_search = expansion
        probes = np.ascontiguousarray(probes, np.float32)
        if len(self._segments) == 1:
            found = self._segments[0].search(probes, count, threads=1)
        else:
            if self._together is None:
                from usearch.index import Indexes
                self._together = Indexes(indexes=self._segments)
            found = self._together.search(probes, count, threads=self.params.search_threads)
        if len(probes) == 1 and not hasattr(found, "counts"):   # one query: usearch answers Matches
            return [np.asarray(found.keys, np.int64)]
        return [found.keys[j, :found.counts[j]].astype(np.int64) for j in range(len(probes))]
