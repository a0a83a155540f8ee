"""Gallery storage and search, the same suite against SQLite and a real PostgreSQL.

Two :class:`Galleries` on one store stand for two gunicorn workers (SQLite) or two replicas
(PostgreSQL): each sees the other's writes, PostgreSQL's within 1 s by NOTIFY alone.
"""
import time

import numpy as np
import pytest

from gallery import Galleries, NewFace, decide
from gallery.errors import (BadNameError, FaceNotFoundError, GalleryExistsError, GalleryNotFoundError,
                            IdentityExistsError, IdentityNotFoundError)
from gallery.index import SearchIndex
from gallery.store import Rows
from gallery.transfer import export_gallery, import_gallery
from test_gallery_support import BACKENDS, near, store_url, unit_vectors


@pytest.fixture(params=BACKENDS)
def url(request, tmp_path):
    return store_url(request.param, tmp_path)


@pytest.fixture
def galleries(url):
    g = Galleries.open(url)
    yield g
    g.close()


def _face(vector, sha: str, norm: float = 20.0) -> NewFace:
    return NewFace(vector, norm, sha)


def test_gallery_crud(galleries):
    store = galleries.store
    created = store.create_gallery("staff")
    assert (created.name, created.identities, created.faces) == ("staff", 0, 0)
    with pytest.raises(GalleryExistsError):
        store.create_gallery("staff")
    assert store.ensure_gallery("staff").id == created.id
    store.create_gallery("visitors")
    assert [g.name for g in store.list_galleries()] == ["staff", "visitors"]
    store.delete_gallery("visitors")
    with pytest.raises(GalleryNotFoundError):
        store.get_gallery("visitors")
    with pytest.raises(GalleryNotFoundError):
        store.delete_gallery("visitors")
    for bad in ("", "a b", "-x", "x" * 65, "a/b"):
        with pytest.raises(BadNameError):
            store.create_gallery(bad)


def test_enroll_is_idempotent_per_photo(galleries):
    store = galleries.store
    store.create_gallery("g")
    v = unit_vectors(3)
    first = store.enroll("g", "alice", [_face(v[0], "sha-a"), _face(v[1], "sha-b")], {"team": "red"})
    assert first.added == 2 and first.created_identity and first.identity.metadata == {"team": "red"}
    again = store.enroll("g", "alice", [_face(v[0], "sha-a"), _face(v[2], "sha-c")])
    assert again.added == 1 and not again.created_identity
    assert [new for _, new in again.faces] == [False, True]
    assert again.faces[0][0].id == first.faces[0][0].id
    assert store.get_identity("g", "alice").face_count == 3
    assert store.get_identity("g", "alice").metadata == {"team": "red"}   # kept when not given
    # the same photo for another identity is that identity's face
    assert store.enroll("g", "bob", [_face(v[0], "sha-a")]).added == 1
    assert store.photo_hashes("g") == {"sha-a", "sha-b", "sha-c"}
    gallery = store.get_gallery("g")
    assert (gallery.identities, gallery.faces) == (2, 4)
    with pytest.raises(GalleryNotFoundError):
        store.enroll("nope", "alice", [_face(v[0], "x")])
    for bad in ("", " padded", "a/b", "tab\there"):
        with pytest.raises(BadNameError):
            store.enroll("g", bad, [_face(v[0], "x")])


def test_identify_orders_identities_and_decides(galleries):
    store = galleries.store
    store.create_gallery("g")
    v = unit_vectors(4, seed=3)
    probe = v[0]
    # alice's best face is 0.9 from the probe, bob's 0.7, carol's 0.5; dave is unrelated
    store.enroll("g", "alice", [_face(near(probe, 0.9, 11), "a1"), _face(near(probe, 0.2, 12), "a2")])
    store.enroll("g", "bob", [_face(near(probe, 0.7, 13), "b1")])
    store.enroll("g", "carol", [_face(near(probe, 0.5, 14), "c1"), _face(near(probe, 0.45, 15), "c2")])
    store.enroll("g", "dave", [_face(v[3], "d1")])
    [candidates] = galleries.identify("g", probe[None], top_k=3)
    assert [c.identity for c in candidates] == ["alice", "bob", "carol"]
    assert [round(c.similarity, 4) for c in candidates] == [0.9, 0.7, 0.5]
    assert candidates[0].photo_sha256 == "a1"
    assert decide(candidates, 0.35) == ("match", candidates[0])
    assert decide(candidates, 0.95) == ("unknown", None)
    assert decide([], 0.35) == ("unknown", None)
    # several probes at once, each with its own ranking; top_k beyond the gallery gives all
    both = galleries.identify("g", np.stack([probe, v[3]]), top_k=10)
    assert len(both[0]) == 4 and both[1][0].identity == "dave" and both[1][0].similarity > 0.999


def test_rename_and_deletes_keep_search_consistent(galleries):
    store = galleries.store
    store.create_gallery("g")
    v = unit_vectors(3, seed=5)
    store.enroll("g", "alice", [_face(v[0], "a1"), _face(v[1], "a2")])
    store.enroll("g", "bob", [_face(v[2], "b1")])
    assert galleries.identify("g", v[:1], 1)[0][0].identity == "alice"
    renamed = store.update_identity("g", "alice", "alicia", {"badge": 7})
    assert renamed.name == "alicia" and renamed.metadata == {"badge": 7} and renamed.face_count == 2
    assert galleries.identify("g", v[:1], 1)[0][0].identity == "alicia"
    with pytest.raises(IdentityExistsError):
        store.update_identity("g", "alicia", "bob")
    with pytest.raises(IdentityNotFoundError):
        store.update_identity("g", "alice", "x")
    face_id = store.get_identity("g", "alicia").faces[0].id
    store.delete_face("g", face_id)
    with pytest.raises(FaceNotFoundError):
        store.delete_face("g", face_id)
    [[top]] = [galleries.identify("g", v[:1], 1)[0]]
    assert top.face_id != face_id and top.similarity < 0.5
    assert galleries.identify("g", v[1:2], 1)[0][0].identity == "alicia"
    assert store.delete_identity("g", "alicia") == 1
    assert [c.identity for c in galleries.identify("g", v[1:2], 5)[0]] == ["bob"]
    with pytest.raises(IdentityNotFoundError):
        store.get_identity("g", "alicia")
    store.delete_gallery("g")
    with pytest.raises(GalleryNotFoundError):
        galleries.identify("g", v[:1], 1)
    store.create_gallery("g")                       # same name, new gallery: empty
    assert galleries.identify("g", v[:1], 1) == [[]]


def test_merge_list_and_delete_several_faces_keep_search_consistent(galleries):
    """What the CompreFace layer needs: rename onto an existing name merges, faces listed in
    pages across the gallery, several faces deleted at once; search follows each change."""
    store = galleries.store
    store.create_gallery("g")
    v = unit_vectors(4, seed=9)
    store.enroll("g", "ann", [_face(v[0], "p0"), _face(v[1], "shared")])
    store.enroll("g", "anne", [_face(v[2], "p2"), _face(v[3], "shared")])
    assert galleries.identify("g", v[:1], 1)[0][0].identity == "ann"
    merged = store.merge_identity("g", "ann", "anne")
    assert merged.name == "anne" and merged.face_count == 3        # the photo both had is kept once
    with pytest.raises(IdentityNotFoundError):
        store.get_identity("g", "ann")
    assert {c.identity for c in galleries.identify("g", v, 5)[0]} == {"anne"}
    assert store.get_gallery("g").faces == 3
    with pytest.raises(IdentityNotFoundError):
        store.merge_identity("g", "ann", "anne")
    assert store.merge_identity("g", "anne", "anne").face_count == 3

    store.enroll("g", "bo", [_face(near(v[0], 0.3, 21), "b1")])
    page, total = store.list_faces("g", limit=2)
    assert total == 4 and len(page) == 2 and [p[0].id for p in page] == sorted(p[0].id for p in page)
    rest, _ = store.list_faces("g", limit=2, offset=2)
    assert {p[1] for p in page + rest} == {"anne", "bo"} and len({p[0].id for p in page + rest}) == 4
    only, count = store.list_faces("g", "bo")
    assert count == 1 and only[0][1] == "bo"
    with pytest.raises(IdentityNotFoundError):
        store.list_faces("g", "nobody")

    ids = [f.id for f in store.get_identity("g", "anne").faces]
    deleted = store.delete_faces("g", [ids[0], ids[1], 10 ** 30, -5, only[0][0].id])
    assert [d[0].id for d in deleted] == sorted([ids[0], ids[1], only[0][0].id])
    assert store.delete_faces("g", [ids[0]]) == []
    assert [f.id for f in store.get_identity("g", "anne").faces] == [ids[2]]
    assert [c.face_id for c in galleries.identify("g", v, 5)[0]] == [ids[2]]
    assert [e.action for e in store.audit_events(["g"], limit=3)][:2] == ["faces.delete", "identity.enroll"]


def test_two_processes_see_each_others_writes(url):
    """Two workers/replicas: writes through either are seen by the other's next search."""
    a, b = Galleries.open(url), Galleries.open(url)
    try:
        a.store.create_gallery("g")
        v = unit_vectors(3, seed=7)
        assert b.identify("g", v[:1], 1) == [[]]
        a.store.enroll("g", "alice", [_face(v[0], "a1")])
        assert b.identify("g", v[:1], 1)[0][0].identity == "alice"
        b.store.enroll("g", "bob", [_face(v[1], "b1")])
        b.store.delete_identity("g", "alice")
        assert [c.identity for c in a.identify("g", v[:1], 5)[0]] == ["bob"]
        a.store.delete_gallery("g")
        with pytest.raises(GalleryNotFoundError):
            b.identify("g", v[:1], 1)
    finally:
        a.close()
        b.close()


def test_random_writes_leave_every_index_equal_to_the_store(url):
    a, b = Galleries.open(url), Galleries.open(url)
    try:
        a.store.create_gallery("g")
        rng = np.random.default_rng(0)
        vectors = unit_vectors(60, seed=9)
        for step in range(60):
            writer = (a, b)[step % 2]
            if rng.random() < 0.7 or step < 5:
                writer.store.enroll("g", f"p{rng.integers(8)}", [_face(vectors[step], f"s{step}")])
            else:
                faces = [f.id for i in writer.store.list_identities("g") for f in writer.store.get_identity("g", i.name).faces]
                writer.store.delete_face("g", int(rng.choice(faces)))
            if step % 7 == 0:
                (b, a)[step % 2].identify("g", vectors[:1], 1)   # the other one catches up midway
        stored = a.store.snapshot(a.store.get_gallery("g").id)
        for g in (a, b):
            index = g.indexes.index("g")
            assert sorted(index.face_ids()) == sorted(stored.face_ids.tolist())
            assert index.version == stored.version
        hits = b.identify("g", stored.vectors, top_k=1)
        assert all(h[0].face_id == fid and h[0].similarity > 0.999 for h, fid in zip(hits, stored.face_ids))
    finally:
        a.close()
        b.close()


def test_postgres_notify_updates_other_replicas_within_a_second(tmp_path):
    url = store_url("postgresql", tmp_path)
    a, b = Galleries.open(url), Galleries.open(url)
    try:
        assert b.indexes.notified
        a.store.create_gallery("g")
        v = unit_vectors(2, seed=4)
        b.identify("g", v[:1], 1)                          # b now holds the (empty) index
        index = b.indexes.loaded("g")
        deadline = time.monotonic() + 5
        while not b.store._listener.listening and time.monotonic() < deadline:
            time.sleep(0.01)
        began = time.monotonic()
        enrolled = a.store.enroll("g", "alice", [_face(v[0], "a1")])
        face_id = enrolled.faces[0][0].id
        while face_id not in index.face_ids() and time.monotonic() - began < 5:
            time.sleep(0.005)                              # no search on b: only NOTIFY moves it
        elapsed = time.monotonic() - began
        print(f"NOTIFY latency: {elapsed * 1000:.1f} ms")
        assert face_id in index.face_ids() and elapsed < 1.0
        a.store.delete_gallery("g")
        began = time.monotonic()
        while b.indexes.loaded("g") is not None and time.monotonic() - began < 5:
            time.sleep(0.005)
        assert b.indexes.loaded("g") is None and time.monotonic() - began < 1.0
    finally:
        a.close()
        b.close()


def test_search_index_deltas_are_idempotent_and_compact():
    v = unit_vectors(6, seed=2)
    index = SearchIndex(gallery_id=1)
    index.load(Rows(3, np.arange(1, 6), np.array([1, 1, 2, 2, 3]), v[:5]))
    removal = Rows(4, np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros((0, 512), np.float32),
                   touched=np.array([2, 4]))
    assert index.apply(removal) and not index.apply(removal)
    assert sorted(index.face_ids()) == [1, 3, 5] and len(index) == 3
    stale = Rows(4, np.array([2]), np.array([1]), v[1:2], touched=np.array([2]))
    assert not index.apply(stale)                          # older than the index: ignored
    hits = index.search(v[[0, 2, 4]], top_k=1)
    assert [h[0].face_id for h in hits] == [1, 3, 5]
    index.add(np.array([6]), np.array([4]), v[5:6])
    assert index.search(v[5:6], 1)[0][0].identity_id == 4


def test_export_import_round_trip(galleries, tmp_path):
    store = galleries.store
    store.create_gallery("g")
    v = unit_vectors(3, seed=8)
    store.enroll("g", "alice", [_face(v[0], "a1", 21.5), _face(v[1], "a2")], {"id": 1})
    store.enroll("g", "bob", [_face(v[2], "b1")])
    other = Galleries.open(f"sqlite:///{tmp_path}/other.db")
    try:
        for name in ("g.npz", "g.parquet"):
            path = tmp_path / name
            assert export_gallery(store, "g", path) == 3
            target = name.replace(".", "_")
            assert import_gallery(other.store, target, path) == (3, 0)
            assert import_gallery(other.store, target, path) == (0, 3)        # idempotent
            alice = other.store.get_identity(target, "alice")
            assert alice.metadata == {"id": 1} and alice.face_count == 2
            assert sorted(f.norm for f in alice.faces) == [20.0, 21.5]
            [[top]] = other.identify(target, v[2:3], 1)
            assert top.identity == "bob" and top.similarity > 0.9999
    finally:
        other.close()
