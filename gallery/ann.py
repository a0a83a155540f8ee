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
  the knob that trades time for recall: 1.8 ms a probe at recall@1 0.997 in a million faces; ten
  million faces need more (docs/galleries.md). usearch never walks with fewer than the
  candidates asked for.
- ``dtype`` ``i8``: half the memory of ``f16`` (ten million faces fit in about 8 GB instead of
  13) and cheaper distances; its coarser scores only steer the walk, the rescoring is float32.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from adaface.options import DEFAULT_ANN_EXPANSION_SEARCH, DEFAULT_ANN_MIN_FACES, EMBEDDING_SIZE

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
    (0: all cores).
    """

    ann_min_faces: int = DEFAULT_ANN_MIN_FACES
    connectivity: int = 16
    expansion_add: int = 96
    expansion_search: int = DEFAULT_ANN_EXPANSION_SEARCH
    dtype: str = "i8"
    candidates: int = 64
    build_threads: int = 0

    def __post_init__(self):
        if self.dtype not in GRAPH_DTYPES:
            raise ValueError(f"graph dtype {self.dtype!r}: use one of {', '.join(GRAPH_DTYPES)}")
        if self.ann_min_faces < 0 or self.build_threads < 0:
            raise ValueError("ann_min_faces and build_threads must be 0 or more")
        for name in ("connectivity", "expansion_add", "expansion_search", "candidates"):
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
    """One gallery's faces in a usearch HNSW index, keyed by face id.

    Not locked: :class:`gallery.index.SearchIndex` serialises the calls. usearch releases the
    GIL while it adds and searches, so a build in a native thread leaves the others running.
    """

    def __init__(self, params: SearchParams):
        from usearch.index import Index
        self.params = params
        self._index = Index(ndim=EMBEDDING_SIZE, metric="cos", dtype=params.dtype,
                            connectivity=params.connectivity, expansion_add=params.expansion_add,
                            expansion_search=params.expansion_search)

    def __len__(self) -> int:
        return len(self._index)

    @property
    def nbytes(self) -> int:
        """Memory the graph says it holds (vectors, links and allocator slack), in bytes."""
        return int(self._index.memory_usage)

    def add(self, face_ids: np.ndarray, vectors: np.ndarray) -> None:
        """Insert faces (ids int64 (k,), float32 (k, 512)); ids already held are skipped. The
        first :data:`SERIAL_FACES` go in with one thread, the rest with ``build_threads``."""
        keys = np.asarray(face_ids, np.int64).astype(np.uint64)
        if len(keys) == 0:
            return
        new = ~self.holds(face_ids)
        if not new.any():
            return
        keys, vectors = keys[new], np.ascontiguousarray(np.asarray(vectors)[new], np.float32)
        small = min(len(keys), max(0, SERIAL_FACES - len(self._index)))
        if small:
            self._index.add(keys[:small], vectors[:small], threads=1)
        if small < len(keys):
            self._index.add(keys[small:], vectors[small:], threads=self.params.build_threads)

    def holds(self, face_ids: np.ndarray) -> np.ndarray:
        """bool (k,): whether each face id is in the graph."""
        keys = np.asarray(face_ids, np.int64).astype(np.uint64)
        return np.asarray(self._index.contains(keys), bool).reshape(-1) if len(keys) else np.zeros(0, bool)

    def remove(self, face_ids: np.ndarray) -> None:
        """Drop faces by id (ids not held are ignored); the graph keeps routing around them."""
        keys = np.asarray(face_ids, np.int64).astype(np.uint64)
        if len(keys):
            self._index.remove(keys)

    def search(self, probes: np.ndarray, count: int, expansion: int) -> list:
        """For each probe (float32 (m, 512)) up to ``count`` nearby face ids (int64), nearest first;
        ``expansion`` is the walk's candidate list (ef; usearch uses ``count`` when that is more)."""
        count = min(count, len(self._index))
        if count == 0:
            return [np.zeros(0, np.int64) for _ in probes]
        if self._index.expansion_search != expansion:
            self._index.expansion_search = expansion
        found = self._index.search(np.ascontiguousarray(probes, np.float32), count, threads=1)
        if len(probes) == 1 and not hasattr(found, "counts"):   # one query: usearch answers Matches
            return [np.asarray(found.keys, np.int64)]
        return [found.keys[j, :found.counts[j]].astype(np.int64) for j in range(len(probes))]
