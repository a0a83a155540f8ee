"""The in-memory search: the float16 scan with float32 rescoring, the inverted file, exact search.

Galleries here have structure (identities with several noisy faces around a centre, as in
``bench/gallery.py``) where recall is measured, and are isotropic noise where exactness is: there an
approximate index finds little, so only an exact search can agree with the float64 brute force. The store
cases run against SQLite and a real PostgreSQL without pgvector (with it, the database searches).
"""
import importlib.util
import json
import math
import tracemalloc
from pathlib import Path

import numpy as np
import pytest

import gallery.index as index_module
from config import Settings, SettingsError
from gallery import Galleries, NewFace
from gallery.ann import MIN_TRAIN_FACES, InvertedFile, SearchParams
from gallery.index import Indexes, SearchIndex
from gallery.open import open_store
from gallery.rescore import MemoryVectors
from gallery.store import DROPPED, Rows
from serving.gallery_state import GalleryState
from test_gallery_support import BACKENDS, store_url, unit_vectors

FLOAT16 = SearchParams(ann_min_faces=0)
#: the backends whose searches run in this process (with pgvector the database searches itself)
IN_MEMORY = [b for b in BACKENDS if b != "pgvector"]


def ann_params(min_faces: int) -> SearchParams:
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
    """An index loaded as the service loads a snapshot (an inverted file, if any, built and swapped in)."""
    index = SearchIndex(1, source=source, params=params)
    index.load(Rows(1, face_ids, identity_ids, faces))
    assert index.wait_built(120)
    return index


@pytest.mark.parametrize("max_lists", [4096, 64], ids=["trained-at-the-end", "trained-on-the-first-faces"])
def test_inverted_file_recall_against_exact_search(max_lists):
    """20,000 faces loaded in chunks: trained once all are in (512 lists), or on the first 2,496
    faces (64 lists) with the rest added to the trained lists."""
    face_ids, owners, faces, _, probes = structured(5000, 4, 200)
    index = SearchIndex(1, params=SearchParams(ann_min_faces=1000, max_lists=max_lists))
    index.load_chunks(1, [(face_ids[s:s + 2000], owners[s:s + 2000], faces[s:s + 2000])
                          for s in range(0, len(faces), 2000)], len(faces))
    assert index.kind == "ivf" and len(index) == 20_000 and len(index.ann) == 20_000
    assert index.ann.trained and index.ann.lists == min(max_lists, 20_000 // 39)
    assert index.params.nprobe < index.ann.lists              # a probe scans only some of the lists
    found = index.search(probes, top_k=5)
    expected = [brute_force(face_ids, owners, faces, p, 5) for p in probes]
    recall = np.mean([f[0].identity_id == e[0][0] for f, e in zip(found, expected)])
    assert recall >= 0.99, recall
    for hits, probe in zip(found, probes):
        assert len({h.identity_id for h in hits}) == 5
        exact = faces[[h.face_id - 1 for h in hits]] @ probe          # float32, as rescored
        assert np.allclose([h.similarity for h in hits], exact, atol=1e-6)
    assert index.ann.nbytes < 20_000 * 512                    # codes of 32 bytes, not float rows


def test_float16_scan_answers_float32_similarities():
    face_ids, owners, faces, _, probes = structured(1000, 4, 50, seed=1)
    index = loaded(FLOAT16, face_ids, owners, faces)
    assert index.kind == "float16"
    for hits, probe in zip(index.search(probes, top_k=5), probes):
        rows = [h.face_id - 1 for h in hits]
        assert np.allclose([h.similarity for h in hits], faces[rows] @ probe, atol=1e-6)   # not float16's
        assert_exact(hits, brute_force(face_ids, owners, faces, probe, 5))


@pytest.mark.parametrize("params", [FLOAT16, ann_params(500)], ids=["float16", "ivf"])
def test_exact_search_equals_a_float64_brute_force(params):
    faces = unit_vectors(3000, seed=3)
    face_ids = np.arange(10, 3010)
    owners = np.arange(3000) // 3 + 100                      # three faces per identity
    probes = normalise(np.concatenate([faces[:10] + unit_vectors(10, seed=4), unit_vectors(10, seed=5)]))
    index = loaded(params, face_ids, owners, faces)
    assert index.kind == ("float16" if params.ann_min_faces == 0 else "ivf")
    assert params.ann_min_faces == 0 or index.ann.trained
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


@pytest.mark.parametrize("min_faces", [0, 100], ids=["float16", "ivf"])
def test_changes_reach_both_kinds_of_index(url, min_faces):
    galleries = Galleries(open_store(url), ann_params(min_faces))
    try:
        probes, names = enroll_structured(galleries.store, "g", 250, 3)          # 750 faces: trained
        first = galleries.identify("g", probes, top_k=3)
        index = galleries.indexes.loaded("g")
        assert index.wait_built(60) and index.kind == ("float16" if min_faces == 0 else "ivf")
        assert min_faces == 0 or index.ann.trained
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
        if index.ann is not None:                         # removed from the lists, not only hidden
            assert index.ann.holds(np.array([added.faces[0][0].id])).all()
            assert not index.ann.holds(np.array([extra])).any()
            assert len(index.ann) == len(index)
        assert len(index) == galleries.store.get_gallery("g").faces
        for hits, probe in zip(galleries.search("g", probes, top_k=3, exact=True), probes):
            assert_exact(hits, exact_reference(galleries.store, "g", probe, 3))
    finally:
        galleries.close()


def test_a_gallery_growing_past_the_threshold_switches_to_the_inverted_file(url):
    galleries = Galleries(open_store(url), ann_params(700))
    try:
        probes, names = enroll_structured(galleries.store, "g", 200, 3)        # 600 faces
        assert [c[0].identity for c in galleries.identify("g", probes, 1)] == names
        index = galleries.indexes.loaded("g")
        assert index.kind == "float16" and not index.building
        store = galleries.store
        _, owners, faces, _, _ = structured(40, 3, 1, seed=9)
        for person in range(1, 41):
            rows = np.flatnonzero(owners == person)
            store.enroll("g", f"q{person}", [NewFace(faces[r], 20.0, f"q-{r}") for r in rows])   # 720 faces
        during = galleries.identify("g", probes, 1)     # applies the delta: the build starts here
        assert [c[0].identity for c in during] == names
        assert index.wait_built(60) and index.kind == "ivf" and len(index.ann) == 720 and index.ann.trained
        assert [c[0].identity for c in galleries.identify("g", probes, 1)] == names
        for hits, probe in zip(galleries.search("g", probes, top_k=5, exact=True), probes):
            assert_exact(hits, exact_reference(store, "g", probe, 5))
    finally:
        galleries.close()


def test_changes_made_while_the_inverted_file_is_built_are_kept(monkeypatch):
    faces = unit_vectors(1002, seed=12)
    face_ids, owners = np.arange(1, 1001), np.arange(1, 1001)
    index = SearchIndex(1, params=ann_params(200))
    changes = [Rows(2, np.array([1001, 7]), np.array([1001, 7]), faces[[1000, 1001]],
                    touched=np.array([5, 7, 990, 1001]))]

    class Interrupted(InvertedFile):
        def add(self, ids, vectors):
            super().add(ids, vectors)
            if changes:           # the first chunk is in: now remove, replace and add faces
                index.apply(changes.pop())

    monkeypatch.setattr(index_module, "BUILD_CHUNK", 64)
    monkeypatch.setattr(index_module, "InvertedFile", Interrupted)
    index.load(Rows(1, face_ids, owners, faces[:1000]))
    assert index.wait_built(60) and index.kind == "ivf" and index.ann.trained and not changes
    expected = sorted(set(range(1, 1002)) - {5, 990})
    assert sorted(index.face_ids().tolist()) == expected and len(index.ann) == len(expected)
    assert index.ann.holds(np.array(expected)).all() and not index.ann.holds(np.array([5, 990])).any()
    assert index.ann.search(faces[1001:1002], 1)[0][0] == 7                 # face 7's new vector
    for face_id in (1000, 999, 1001):                                       # moved into holes, or new
        vector = faces[face_id - 1] if face_id != 1001 else faces[1000]
        assert index.search(vector[None], 1)[0][0].face_id == face_id


def test_an_inverted_file_searches_exhaustively_until_it_is_trained():
    """Below :data:`MIN_TRAIN_FACES` the faces stay float32 rows, searched exhaustively, even once
    told the bulk is in; the add that reaches it then trains the lists (the faiss index)."""
    faces = unit_vectors(MIN_TRAIN_FACES + 100, seed=23)
    ids = np.arange(1, len(faces) + 1)
    ann = InvertedFile(SearchParams(ann_min_faces=1))
    ann.add(ids[:300], faces[:300])
    ann.finish()
    assert not ann.trained and ann.lists == 0 and len(ann) == 300
    assert [row[0] for row in ann.search(faces[:300], 3)] == list(range(1, 301))
    ann.remove(np.array([2, 4000]))                                        # 4000 was never held
    assert len(ann) == 299 and 2 not in np.concatenate(ann.search(faces[:5], 10))
    ann.add(ids[300:], faces[300:])                                        # past MIN_TRAIN_FACES
    assert ann.trained and ann.lists == (len(faces) - 1) // 39 and len(ann) == len(faces) - 1
    found = ann.search(faces, 5)
    assert all(row[0] == face_id for face_id, row in zip(ids, found) if face_id != 2)
    assert all(len(row) == 5 for row in found)


def test_an_inverted_file_trains_on_its_first_faces_and_removes_from_its_lists():
    faces = unit_vectors(1500, seed=21)
    ann = InvertedFile(SearchParams(ann_min_faces=1, max_lists=16))          # trains at 16 x 39 -> 624 faces
    ann.add(np.arange(1, 501), faces[:500])
    assert not ann.trained
    ann.add(np.arange(501, 1301), faces[500:1300])                          # 1,300 gathered: trained
    assert ann.trained and ann.lists == 16
    ann.add(np.arange(1301, 1501), faces[1300:])                            # into the trained lists
    assert len(ann) == 1500 and ann.holds(np.arange(1, 1501)).all() and not ann.holds(np.array([0, 1501])).any()
    found = ann.search(faces, 5)
    assert sum(row[0] == face_id for face_id, row in zip(range(1, 1501), found)) >= 1495
    gone = np.array([10, 600, 1450])
    ann.remove(np.concatenate([gone, [5000]]))                              # 5000 was never held
    assert len(ann) == 1497 and not ann.holds(gone).any() and ann.holds(np.array([11, 601])).all()
    assert not any(np.isin(row, gone).any() for row in ann.search(faces[gone - 1], 5))
    moved = unit_vectors(1, seed=22)
    ann.add(np.array([600]), moved)                                         # back, with another vector
    assert ann.holds(np.array([600])).all() and ann.search(moved, 1)[0][0] == 600
    assert 1498 * 40 <= ann.nbytes < 1498 * 512                             # about 40 bytes a face
    for bad in ({"nprobe": 0}, {"max_lists": 0}, {"candidates": 0}, {"build_threads": -1}, {"ann_min_faces": -1}):
        with pytest.raises(ValueError):
            SearchParams(**bad)


def test_a_delta_naming_new_faces_during_a_build_removes_nothing_from_the_inverted_file(monkeypatch):
    """A delta's ``touched`` lists the faces it adds too; while an inverted file is built, only
    faces the index held count as removed, so the swap does not take new faces out and put them
    back (each removal scans every list)."""
    faces = unit_vectors(730, seed=13)
    index = SearchIndex(1, params=ann_params(200))
    removed, pending = [], [Rows(2, np.arange(701, 731), np.arange(701, 731), faces[700:],
                                 touched=np.arange(701, 731))]

    class Watched(InvertedFile):
        def add(self, ids, vectors):
            super().add(ids, vectors)
            if pending:
                index.apply(pending.pop())

        def remove(self, ids):
            removed.extend(np.asarray(ids).tolist())
            super().remove(ids)

    monkeypatch.setattr(index_module, "InvertedFile", Watched)
    index.load(Rows(1, np.arange(1, 701), np.arange(1, 701), faces[:700]))
    assert index.wait_built(60) and index.kind == "ivf" and index.ann.trained and not pending
    assert removed == [] and index.ann.holds(np.arange(1, 731)).all() and len(index.ann) == 730


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
    index = SearchIndex(1, params=ann_params(2))
    assert index.search(unit_vectors(1)[0], 5) == [[]]
    faces = unit_vectors(3, seed=13)
    index.load(Rows(1, np.array([1, 2, 3]), np.array([1, 1, 2]), faces))
    assert index.wait_built(30) and index.kind == "ivf" and not index.ann.trained
    hits = index.search(faces[:1], top_k=5)[0]
    assert [(h.identity_id, h.face_id) for h in hits] == [(1, 1), (2, 3)]    # two identities in all
    assert [(h.identity_id, h.face_id) for h in index.search(faces[:1], 5, exact=True)[0]] == [(1, 1), (2, 3)]


def test_the_gallery_bench_runs_and_measures_recall(tmp_path, capsys):
    """``bench/gallery.py`` end to end on a small gallery: the inverted file is built from its
    chunks, scanning every list finds every probe's identity, and exact search agrees."""
    spec = importlib.util.spec_from_file_location("gallery_bench", Path(__file__).parent.parent / "bench" / "gallery.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert bench.main(["--sizes", "3000", "--min-faces", "1000", "--probes", "30", "--nprobe", "4,100",
                       "--folder", str(tmp_path), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)["results"][0]
    assert result["kind"] == "ivf" and result["lists"] == 3000 // 39
    assert [row["nprobe"] for row in result["searches"]] == [4, 100]
    assert result["searches"][1]["recall_at_1"] == 1.0 and result["exact_agrees"] == 1.0
    assert list(tmp_path.iterdir()) == []                  # its vectors file is gone
