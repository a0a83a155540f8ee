"""The in-memory search: the float16 scan with float32 rescoring, the HNSW graph, exact search.

Galleries here have structure (identities with several noisy faces around a centre, as in
``bench/gallery.py``) where recall is measured, and are isotropic noise where exactness is: there a
graph finds little, so only an exact search can agree with the float64 brute force. The store
cases run against SQLite and a real PostgreSQL without pgvector (with it, the database searches).
"""
import math
import tracemalloc

import numpy as np
import pytest

import gallery.index as index_module
from config import Settings, SettingsError
from gallery import Galleries, NewFace
from gallery.ann import Graph, SearchParams
from gallery.index import Indexes, SearchIndex
from gallery.open import open_store
from gallery.rescore import MemoryVectors
from gallery.store import DROPPED, Rows
from serving.gallery_state import GalleryState
from test_gallery_support import BACKENDS, store_url, unit_vectors

FLOAT16 = SearchParams(ann_min_faces=0)
#: the backends whose searches run in this process (with pgvector the database searches itself)
IN_MEMORY = [b for b in BACKENDS if b != "pgvector"]


def graph_params(min_faces: int) -> SearchParams:
    return SearchParams(ann_min_faces=min_faces)


def normalise(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def structured(identities: int, per_identity: int, probes: int, seed: int = 0, rank: int = 32) -> tuple:
    """(face ids, identity ids, faces float32 (n, 512), probe identity ids, probes float32 (m, 512)):
    centres in a ``rank``-dimensional part of the sphere, faces and probes noisy copies of them
    (same-identity cosine 0.5 to 0.7)."""
    rng = np.random.default_rng(seed)
    basis = np.linalg.qr(rng.standard_normal((512, rank)))[0]
    centres = normalise(rng.standard_normal((identities, rank)) @ basis.T)

    def noisy(c):
        s = rng.uniform(0.65, 1.0, (len(c), 1))
        return normalise(c + s * rng.standard_normal(c.shape) / math.sqrt(512))

    owners = np.repeat(np.arange(1, identities + 1), per_identity)
    faces = noisy(centres[owners - 1])
    chosen = rng.choice(identities, probes, replace=False) + 1
    return np.arange(1, len(owners) + 1), owners, faces, chosen, noisy(centres[chosen - 1])


def brute_force(face_ids, identity_ids, faces, probe, top_k: int) -> list:
    """(identity id, face id, similarity) of the ``top_k`` best identities, in float64."""
    scores = faces.astype(np.float64) @ probe.astype(np.float64)
    best = {}
    for row in np.argsort(-scores, kind="stable"):
        best.setdefault(int(identity_ids[row]), (int(identity_ids[row]), int(face_ids[row]), float(scores[row])))
        if len(best) == top_k:
            break
    return list(best.values())


def assert_exact(hits, expected) -> None:
    assert [(h.identity_id, h.face_id) for h in hits] == [(i, f) for i, f, _ in expected]
    assert np.allclose([h.similarity for h in hits], [s for _, _, s in expected], atol=1e-6)


def loaded(params: SearchParams, face_ids, identity_ids, faces, source=None) -> SearchIndex:
    """An index loaded as the service loads a snapshot (a graph, if any, built and swapped in)."""
    index = SearchIndex(1, source=source, params=params)
    index.load(Rows(1, face_ids, identity_ids, faces))
    assert index.wait_built(120)
    return index


@pytest.mark.slow
@pytest.mark.parametrize("segment_faces", [None, 6_000], ids=["one-segment", "four-segments"])
def test_graph_recall_against_exact_search(segment_faces):
    face_ids, owners, faces, _, probes = structured(5000, 4, 200)
    params = graph_params(1000) if segment_faces is None else SearchParams(ann_min_faces=1000,
                                                                           segment_faces=segment_faces)
    index = SearchIndex(1, params=params)
    index.load_chunks(1, [(face_ids[s:s + 5000], owners[s:s + 5000], faces[s:s + 5000])
                          for s in range(0, len(faces), 5000)], len(faces))
    assert index.kind == "hnsw" and len(index) == 20_000 and len(index.graph) == 20_000
    assert index.graph.segments == (1 if segment_faces is None else 4)
    found = index.search(probes, top_k=5)
    expected = [brute_force(face_ids, owners, faces, p, 5) for p in probes]
    recall = np.mean([f[0].identity_id == e[0][0] for f, e in zip(found, expected)])
    assert recall >= 0.99, recall
    for hits, probe in zip(found, probes):
        assert len({h.identity_id for h in hits}) == 5
        exact = faces[[h.face_id - 1 for h in hits]] @ probe          # float32, as rescored
        assert np.allclose([h.similarity for h in hits], exact, atol=1e-6)


def test_float16_scan_answers_float32_similarities():
    face_ids, owners, faces, _, probes = structured(1000, 4, 50, seed=1)
    index = loaded(FLOAT16, face_ids, owners, faces)
    assert index.kind == "float16"
    for hits, probe in zip(index.search(probes, top_k=5), probes):
        rows = [h.face_id - 1 for h in hits]
        assert np.allclose([h.similarity for h in hits], faces[rows] @ probe, atol=1e-6)   # not float16's
        assert_exact(hits, brute_force(face_ids, owners, faces, probe, 5))


@pytest.mark.parametrize("params", [FLOAT16, graph_params(500)], ids=["float16", "hnsw"])
def test_exact_search_equals_a_float64_brute_force(params):
    faces = unit_vectors(3000, seed=3)
    face_ids = np.arange(10, 3010)
    owners = np.arange(3000) // 3 + 100                      # three faces per identity
    probes = normalise(np.concatenate([faces[:10] + unit_vectors(10, seed=4), unit_vectors(10, seed=5)]))
    index = loaded(params, face_ids, owners, faces)
    assert index.kind == ("float16" if params.ann_min_faces == 0 else "hnsw")
    for top_k in (1, 5, 40):
        for hits, probe in zip(index.search(probes, top_k, exact=True), probes):
            assert_exact(hits, brute_force(face_ids, owners, faces, probe, top_k))


class CountingSource:
    """A vector source that remembers how many vectors each call asked for."""

    def __init__(self, face_ids, faces):
        self.memory = MemoryVectors()
        self.memory.put(face_ids, faces)
        self.asked = []

    def vectors(self, face_ids):
        self.asked.append(len(face_ids))
        return self.memory.vectors(face_ids)


def test_float16_scan_widens_the_candidates_when_float16_cannot_tell_them_apart():
    # 3,000 faces within 1e-4 of cosine 0.5 to the probe: float16 rounds them alike, so its 64
    # best are a lottery; the exact best (the last face, 5e-5 ahead of the rest) must come back.
    rng = np.random.default_rng(6)
    probe = unit_vectors(1, seed=7)[0]
    other = rng.standard_normal((3000, 512))
    other -= np.outer(other @ probe, probe)
    other /= np.linalg.norm(other, axis=1, keepdims=True)
    cosines = np.append(0.5 + rng.uniform(0, 5e-5, 2999), 0.5 + 1e-4)
    faces = normalise(cosines[:, None] * probe + np.sqrt(1 - cosines[:, None] ** 2) * other)
    face_ids, owners = np.arange(1, 3001), np.arange(1, 3001)
    source = CountingSource(face_ids, faces)
    index = loaded(FLOAT16, face_ids, owners, faces, source=source)
    hits = index.search(probe[None], top_k=1)[0]
    assert_exact(hits, brute_force(face_ids, owners, faces, probe, 1))
    assert source.asked[0] == 64 and source.asked[-1] > 64          # the candidates were widened


@pytest.fixture(params=IN_MEMORY)
def url(request, tmp_path):
    return store_url(request.param, tmp_path)


def enroll_structured(store, gallery: str, identities: int, per_identity: int, seed: int = 0) -> tuple:
    """Enroll a structured gallery; returns (probes, the identity name each probe belongs to)."""
    _, owners, faces, chosen, probes = structured(identities, per_identity, 20, seed=seed)
    store.ensure_gallery(gallery)
    for person in range(1, identities + 1):
        rows = np.flatnonzero(owners == person)
        store.enroll(gallery, f"p{person}", [NewFace(faces[r], 20.0, f"{gallery}-{r}") for r in rows])
    return probes, [f"p{c}" for c in chosen]


def exact_reference(store, gallery: str, probe: np.ndarray, top_k: int) -> list:
    rows = store.snapshot(store.get_gallery(gallery).id)
    return brute_force(rows.face_ids, rows.identity_ids, rows.vectors, probe, top_k)


def test_a_snapshot_in_pieces_is_the_snapshot(url):
    store = open_store(url)
    try:
        enroll_structured(store, "g", 30, 3)
        gallery_id = store.get_gallery("g").id
        whole = store.snapshot(gallery_id)
        pieces = store.snapshot_chunks(gallery_id, rows=7)
        assert next(pieces) == (whole.version, 90)
        rows = list(pieces)
        assert [len(r.face_ids) for r in rows] == [7] * 12 + [6]
        assert all(r.version == whole.version for r in rows)
        for name in ("face_ids", "identity_ids", "vectors"):
            assert np.array_equal(np.concatenate([getattr(r, name) for r in rows]), getattr(whole, name))
        store.delete_gallery("g")
        assert list(store.snapshot_chunks(gallery_id)) == [(DROPPED, 0)]
    finally:
        store.close()


def test_a_gallery_loads_without_holding_all_its_float32_vectors(tmp_path):
    """The service loads a gallery's faces piece by piece into the float16 rows: ten million faces
    are 20 GB of float32, which a replica never holds at once (numpy's arrays are traced)."""
    store = open_store(f"sqlite:///{tmp_path}/g.db")
    try:
        probes, names = enroll_structured(store, "g", 10_000, 4)
        float32_bytes = 40_000 * 512 * 4
        indexes = Indexes(store, FLOAT16)
        tracemalloc.start()
        try:
            index = indexes.index("g")
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert len(index) == 40_000 and index.kind == "float16"
        assert 40_000 * 512 * 2 < peak < float32_bytes, peak           # the float16 rows, not float32
        assert [hits[0].identity_id for hits in index.search(probes, 1)] == \
            [store.get_identity("g", name).id for name in names]
    finally:
        store.close()


@pytest.mark.parametrize("min_faces", [0, 100], ids=["float16", "hnsw"])
def test_changes_reach_both_kinds_of_index(url, min_faces):
    galleries = Galleries(open_store(url), graph_params(min_faces))
    try:
        probes, names = enroll_structured(galleries.store, "g", 50, 3)
        first = galleries.identify("g", probes, top_k=3)
        index = galleries.indexes.loaded("g")
        assert index.wait_built(60) and index.kind == ("float16" if min_faces == 0 else "hnsw")
        assert [c[0].identity for c in galleries.identify("g", probes, top_k=3)] == names
        assert len(first) == len(probes)
        newcomer = unit_vectors(1, seed=11)[0]
        added = galleries.store.enroll("g", "newcomer", [NewFace(newcomer, 20.0, "new-1")])
        hit = galleries.identify("g", newcomer[None], top_k=1)[0][0]
        assert hit.identity == "newcomer" and hit.similarity > 0.9999
        extra = galleries.store.enroll("g", names[0], [NewFace(newcomer * -1, 20.0, "extra-1")]).faces[0][0].id
        assert galleries.identify("g", -newcomer[None], top_k=1)[0][0].face_id == extra
        galleries.store.delete_face("g", extra)
        assert galleries.identify("g", -newcomer[None], top_k=1)[0][0].face_id != extra
        galleries.store.delete_identity("g", names[1])
        after = galleries.identify("g", probes, top_k=3)
        assert all(c.identity != names[1] for per in after for c in per)
        assert after[0][0].identity == names[0]
        assert added.faces[0][0].id in index.face_ids() and extra not in index.face_ids()
        if index.graph is not None:                       # removed from the graph, not only hidden
            assert index.graph.holds(np.array([added.faces[0][0].id])).all()
            assert not index.graph.holds(np.array([extra])).any()
            assert len(index.graph) == len(index)
        assert len(index) == galleries.store.get_gallery("g").faces
        for hits, probe in zip(galleries.search("g", probes, top_k=3, exact=True), probes):
            assert_exact(hits, exact_reference(galleries.store, "g", probe, 3))
    finally:
        galleries.close()


def test_a_gallery_growing_past_the_threshold_switches_to_the_graph(url):
    galleries = Galleries(open_store(url), graph_params(300))
    try:
        probes, names = enroll_structured(galleries.store, "g", 80, 3)        # 240 faces
        assert [c[0].identity for c in galleries.identify("g", probes, 1)] == names
        index = galleries.indexes.loaded("g")
        assert index.kind == "float16" and not index.building
        store = galleries.store
        _, owners, faces, _, _ = structured(40, 3, 1, seed=9)
        for person in range(1, 41):
            rows = np.flatnonzero(owners == person)
            store.enroll("g", f"q{person}", [NewFace(faces[r], 20.0, f"q-{r}") for r in rows])   # 360 faces
        during = galleries.identify("g", probes, 1)     # applies the delta: the build starts here
        assert [c[0].identity for c in during] == names
        assert index.wait_built(60) and index.kind == "hnsw" and len(index.graph) == 360
        assert [c[0].identity for c in galleries.identify("g", probes, 1)] == names
        for hits, probe in zip(galleries.search("g", probes, top_k=5, exact=True), probes):
            assert_exact(hits, exact_reference(store, "g", probe, 5))
    finally:
        galleries.close()


def test_changes_made_while_the_graph_is_built_are_kept(monkeypatch):
    faces = unit_vectors(402, seed=12)
    face_ids, owners = np.arange(1, 401), np.arange(1, 401)
    index = SearchIndex(1, params=graph_params(200))
    changes = [Rows(2, np.array([401, 7]), np.array([401, 7]), faces[[400, 401]], touched=np.array([5, 7, 390, 401]))]

    class Interrupted(Graph):
        def add(self, ids, vectors):
            super().add(ids, vectors)
            if changes:           # the first chunk is in: now remove, replace and add faces
                index.apply(changes.pop())

    monkeypatch.setattr(index_module, "BUILD_CHUNK", 64)
    monkeypatch.setattr(index_module, "Graph", Interrupted)
    index.load(Rows(1, face_ids, owners, faces[:400]))
    assert index.wait_built(60) and index.kind == "hnsw" and not changes
    expected = sorted(set(range(1, 402)) - {5, 390})
    assert sorted(index.face_ids().tolist()) == expected
    assert index.graph.holds(np.array(expected)).all() and not index.graph.holds(np.array([5, 390])).any()
    assert index.graph.search(faces[401:402], 1, 64)[0][0] == 7              # face 7's new vector
    for face_id in (400, 399, 401):                                          # moved into holes, or new
        vector = faces[face_id - 1] if face_id != 401 else faces[400]
        assert index.search(vector[None], 1)[0][0].face_id == face_id


def test_every_face_of_a_small_graph_is_reachable():
    """Parallel insertion into a small usearch graph leaves some faces where no walk reaches
    them (about 0.5% of 300 random faces); the graph adds its first faces with one thread."""
    missed = 0
    for seed in range(20):
        faces = unit_vectors(300, seed=100 + seed)
        graph = Graph(SearchParams(ann_min_faces=1))
        graph.add(np.arange(1, 301), faces)
        found = graph.search(faces, 10, 128)
        missed += sum(face_id not in row for face_id, row in zip(range(1, 301), found))
    assert missed == 0


def test_a_graph_holds_its_faces_in_segments():
    """Past ``segment_faces`` a graph opens another segment; a probe walks every segment, and a
    removal or a re-added face reaches the segment that holds it."""
    faces = unit_vectors(1300, seed=21)
    graph = Graph(SearchParams(ann_min_faces=1, segment_faces=500))
    graph.add(np.arange(1, 701), faces[:700])
    graph.add(np.arange(650, 1301), faces[649:])            # 650..700 already held: skipped
    assert graph.segments == 3 and len(graph) == 1300
    assert [len(segment) for segment in graph._segments] == [500, 500, 300]
    found = graph.search(faces, 5, 64)
    assert all(row[0] == face_id for face_id, row in zip(range(1, 1301), found))
    gone = np.array([10, 600, 1250])
    graph.remove(np.concatenate([gone, [5000]]))            # 5000 was never held
    assert len(graph) == 1297 and not graph.holds(gone).any() and graph.holds(np.array([11, 601])).all()
    assert not any(np.isin(row, gone).any() for row in graph.search(faces[gone - 1], 5, 64))
    moved = unit_vectors(1, seed=22)
    graph.add(np.array([600]), moved)                       # back, with another vector, in the last segment
    assert graph.holds(np.array([600])).all() and graph.search(moved, 1, 64)[0][0] == 600
    assert [len(segment) for segment in graph._segments] == [499, 499, 300]
    assert graph.nbytes >= sum(int(segment.memory_usage) for segment in graph._segments[:1]) > 0
    with pytest.raises(ValueError):
        SearchParams(segment_faces=0)
    with pytest.raises(ValueError):
        SearchParams(search_threads=-1)


def test_a_delta_naming_new_faces_during_a_build_removes_nothing_from_the_graph(monkeypatch):
    """A delta's ``touched`` lists the faces it adds too; while a graph is built, only faces the
    index held count as removed, so the swap does not take new faces out of the graph and put
    them back (usearch re-inserts a removed key less well)."""
    faces = unit_vectors(230, seed=13)
    index = SearchIndex(1, params=graph_params(200))
    removed, pending = [], [Rows(2, np.arange(201, 231), np.arange(201, 231), faces[200:],
                                 touched=np.arange(201, 231))]

    class Watched(Graph):
        def add(self, ids, vectors):
            super().add(ids, vectors)
            if pending:
                index.apply(pending.pop())

        def remove(self, ids):
            removed.extend(np.asarray(ids).tolist())
            super().remove(ids)

    monkeypatch.setattr(index_module, "Graph", Watched)
    index.load(Rows(1, np.arange(1, 201), np.arange(1, 201), faces[:200]))
    assert index.wait_built(60) and index.kind == "hnsw" and not pending
    assert removed == [] and index.graph.holds(np.arange(1, 231)).all() and len(index.graph) == 230


def test_the_threshold_is_a_setting_the_server_passes_on(tmp_path):
    assert Settings.from_env({}).ann_min_faces == 200_000
    assert Settings.from_env({"ADAFACE_ANN_MIN_FACES": "1000"}).ann_min_faces == 1000
    with pytest.raises(SettingsError):
        Settings.from_env({"ADAFACE_ANN_MIN_FACES": "-1"})
    state = GalleryState(f"sqlite:///{tmp_path}/g.db", ann_min_faces=1000)
    try:
        assert state.call("list_galleries") == []
        assert state._open().indexes.params.ann_min_faces == 1000
    finally:
        state.close()


def test_empty_and_tiny_galleries():
    index = SearchIndex(1, params=graph_params(2))
    assert index.search(unit_vectors(1)[0], 5) == [[]]
    faces = unit_vectors(3, seed=13)
    index.load(Rows(1, np.array([1, 2, 3]), np.array([1, 1, 2]), faces))
    assert index.wait_built(30) and index.kind == "hnsw"
    hits = index.search(faces[:1], top_k=5)[0]
    assert [(h.identity_id, h.face_id) for h in hits] == [(1, 1), (2, 3)]    # two identities in all
    assert [(h.identity_id, h.face_id) for h in index.search(faces[:1], 5, exact=True)[0]] == [(1, 1), (2, 3)]
