"""The audit trail: one row per gallery write, in the write's transaction, on every backend;
readable over HTTP (admin) and with ``gallery audit``; kept when the biometric data goes; and
present after ``kill -9`` right after an acknowledged write."""
import getpass
import json
from contextlib import closing

import numpy as np
import pytest

import AdaFaceFeature
from adaface.identity import ModelIdentity
from gallery.audit import Actor
from gallery.errors import IdentityNotFoundError
from gallery.galleries import Galleries
from gallery.open import open_store
from gallery.reembed import reembed
from gallery.store import NewFace
from gallery.transfer import export_gallery
from test_gallery_server import Server, call
from test_gallery_support import BACKENDS, crop_png, store_url, unit_vectors

CAM = Actor("door-cam", "10.0.0.7")
OLD = ModelIdentity("ir_18", "a" * 64, True)
NEW = ModelIdentity("ir_18", "b" * 64, True)


@pytest.fixture(params=BACKENDS)
def store(request, tmp_path):
    s = open_store(store_url(request.param, tmp_path))
    yield s
    s.close()


def _faces(seed: int, count: int = 2, crop: bool = True) -> list:
    vectors = unit_vectors(count, seed)
    return [NewFace(v, 20.0, f"{seed}-{i}", crop_png(seed * 10 + i) if crop else None) for i, v in enumerate(vectors)]


def _rows(store, **filters) -> list:
    return [(e.action, e.actor, e.address, e.gallery, e.identity) for e in store.audit_events(**filters)]


def test_every_write_kind_has_its_row(store):
    store.create_gallery("g", actor=CAM)
    enrolled = store.enroll("g", "alice", _faces(1), {"team": "a"}, OLD, actor=CAM)
    ids = [r.id for r, _ in enrolled.faces]
    store.enroll("g", "alice", _faces(1), model=OLD, actor=CAM)          # the same photos: nothing written
    store.update_identity("g", "alice", new_name="alicia", actor=Actor("admin", "10.0.0.1"))
    store.update_identity("g", "alicia", metadata={"team": "b"}, actor=CAM)
    store.delete_face("g", ids[0], actor=CAM)
    bob = store.enroll("g", "bob", _faces(2, 1), model=OLD, actor=CAM)
    assert store.delete_identity("g", "alicia", actor=CAM) == 1
    with pytest.raises(IdentityNotFoundError):
        store.delete_identity("g", "alicia", actor=CAM)                  # refused: no row
    reembed(store, "g", NEW, lambda crops: (unit_vectors(len(crops), 9), np.full(len(crops), 20.0)), actor=CAM)
    store.ensure_gallery("h")                                            # no actor: recorded as local
    store.ensure_gallery("h", actor=CAM)                                 # already there: nothing written
    store.delete_gallery("g", actor=CAM)
    events = store.audit_events()
    assert [(e.action, e.identity) for e in events] == [
        ("gallery.delete", None), ("gallery.create", None), ("gallery.reembed", None),
        ("identity.delete", "alicia"), ("identity.enroll", "bob"), ("face.delete", "alicia"),
        ("identity.update", "alicia"), ("identity.update", "alicia"), ("identity.enroll", "alice"),
        ("gallery.create", None)]
    by_action = {e.action: e for e in events}                            # the oldest of each kind
    enroll = by_action["identity.enroll"]
    assert enroll.face_ids == tuple(ids) and enroll.detail["created"] and enroll.detail["metadata_replaced"]
    assert (enroll.actor, enroll.address) == ("door-cam", "10.0.0.7")
    renamed = events[7]
    assert renamed.detail == {"renamed_from": "alice", "metadata_replaced": False} and renamed.actor == "admin"
    assert events[5].face_ids == (ids[0],) and events[3].face_ids == (ids[1],)
    assert events[2].detail["model"] == NEW.name and events[2].detail["faces_reembedded"] == 1
    assert events[1].actor == "local" and events[1].gallery == "h"
    assert events[0].detail == {"identities_removed": 1, "faces_removed": 1}
    assert bob.identity.name == "bob"
    assert all(e.at > 1.7e9 for e in events)


def test_rows_outlive_the_biometric_data(store):
    store.create_gallery("g", actor=CAM)
    face_ids = [r.id for r, _ in store.enroll("g", "alice", _faces(3), actor=CAM).faces]
    store.delete_identity("g", "alice", actor=CAM)
    assert store.vectors(face_ids)[0].size == 0                          # vectors gone
    assert _rows(store, identity="alice") == [("identity.delete", "door-cam", "10.0.0.7", "g", "alice"),
                                              ("identity.enroll", "door-cam", "10.0.0.7", "g", "alice")]
    text = json.dumps([e.to_dict() for e in store.audit_events()])
    assert "embedding" not in text and "png" not in text and "3-0" not in text   # no vectors, crops or photo hashes


def test_filters_and_pages(store):
    for name in ("a", "b"):
        store.create_gallery(name, actor=CAM)
        for n in range(3):
            store.enroll(name, f"p{n}", _faces(n + 10, 1), actor=CAM)
    assert len(store.audit_events()) == 8
    assert {e.gallery for e in store.audit_events(galleries=["b"])} == {"b"}
    assert store.audit_events(galleries=[]) == []
    assert len(store.audit_events(action="gallery.create")) == 2
    first = store.audit_events(limit=3)
    rest = store.audit_events(before=first[-1].id, limit=100)
    assert [e.id for e in first + rest] == sorted((e.id for e in first + rest), reverse=True) and len(rest) == 5


def test_the_command_line_reads_the_trail_and_signs_its_writes(tmp_path, capsys):
    url = f"sqlite:///{tmp_path}/g.db"
    with closing(Galleries.open(url)) as galleries:
        galleries.store.create_gallery("g", actor=CAM)
        galleries.store.enroll("g", "alice", _faces(4), actor=CAM)
        export_gallery(galleries.store, "g", tmp_path / "g.npz")
    assert AdaFaceFeature.main(["gallery", "import", str(tmp_path / "g.npz"), "--url", url, "--gallery", "copy"]) == 0
    capsys.readouterr()
    assert AdaFaceFeature.main(["gallery", "audit", "--url", url, "--json"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["action"] for r in rows] == ["identity.enroll", "gallery.create", "identity.enroll", "gallery.create"]
    assert rows[0]["actor"] == f"cli:{getpass.getuser()}" and rows[0]["address"] == "local"
    assert rows[-1]["actor"] == "door-cam"
    assert AdaFaceFeature.main(["gallery", "audit", "--url", url, "--gallery", "g", "--action", "identity.enroll"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 1 and "door-cam@10.0.0.7\tidentity.enroll\tg/alice faces " in lines[0]


@pytest.mark.server
@pytest.mark.slow
@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_an_acknowledged_write_has_its_row_after_kill_9(backend, tmp_path):
    url = store_url(backend, tmp_path)
    keys = tmp_path / "keys.txt"
    keys.write_text("cam-key-0123456789 name=door-cam scopes=gallery:read,gallery:write\nroot-key-0123 name=root\n")
    server = Server(url, tmp_path / "server.log", env={"ADAFACE_API_KEYS_FILE": str(keys),
                                                        "ADAFACE_OPEN_GALLERIES": "false"})
    cam = {"Authorization": "Bearer cam-key-0123456789"}
    try:
        server.wait_ready()
        assert call(server.port, "POST", "/v1/galleries", {"name": "g"}, headers=cam)[0] == 201
        status, body = call(server.port, "POST", "/v1/galleries/g/identities/alice/faces", crop_png(5), headers=cam)
        assert status == 201, body
        face_id = body["results"][0]["face_id"]
        status, page = call(server.port, "GET", "/v1/audit", headers={"X-API-Key": "root-key-0123"})
        assert status == 200 and page["events"][0]["face_ids"] == [face_id]
        assert call(server.port, "GET", "/v1/audit", headers=cam)[0] == 403
        status, _ = call(server.port, "DELETE", "/v1/galleries/g/identities/alice", headers=cam)
        assert status == 200
    finally:
        server.kill()                                                    # kill -9 right after the answer
    with closing(Galleries.open(url)) as galleries:
        events = galleries.store.audit_events(galleries=["g"])
    assert [(e.action, e.actor, e.address, e.identity) for e in events] == [
        ("identity.delete", "door-cam", "127.0.0.1", "alice"), ("identity.enroll", "door-cam", "127.0.0.1", "alice"),
        ("gallery.create", "door-cam", "127.0.0.1", None)]
    assert events[0].face_ids == (face_id,)
