"""Galleries that survive a model change: the model a gallery records, 409 ``model_mismatch``,
stored crops (served, and really gone when deleted), re-embedding (atomic, resumable, also after
``kill -9`` of the command line) and identity-level verify, on SQLite and a real PostgreSQL."""
import base64
import io
import os
import signal
import sqlite3
import subprocess
import sys
import time

import numpy as np
import psycopg
import pytest
import torch
from PIL import Image

import net
from adaface.identity import ModelIdentity
from AdaFaceFeature import AdaFaceFeature
from config import Settings
from conftest import REPO
from flask_http_server import create_app
from gallery.errors import ModelMismatchError
from gallery.galleries import Galleries
from gallery.open import open_store
from gallery.reembed import crop_from_png, crop_png as encode_crop, reembed
from gallery.store import NewFace
from test_gallery_support import BACKENDS, crop_png, store_url, unit_vectors


@pytest.fixture(scope="module")
def model_a():
    return AdaFaceFeature("synthetic", arch="ir_18", device="cpu", backend="torch")


@pytest.fixture(scope="module")
def model_b():
    return AdaFaceFeature("synthetic", arch="ir_34", device="cpu", backend="torch")


def _app(extractor, url, **overrides):
    settings = Settings(open_galleries=True, weights="synthetic", arch=extractor.arch, device="cpu", warmup=False, gallery_url=url,
                        **overrides)
    return create_app(settings, extractor=extractor)


@pytest.fixture(params=BACKENDS)
def url(request, tmp_path):
    return store_url(request.param, tmp_path)


def _pixels(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))


def _error(r, status, code):
    assert r.status_code == status, r.get_data(as_text=True)
    body = r.get_json()["error"]
    assert body["code"] == code
    return body["message"]


# -- the model a gallery records ------------------------------------------------------------------

def test_the_fingerprint_is_the_weights_not_the_file(tmp_path):
    backbone = net.synthetic_backbone("ir_18", seed=5)
    plain = tmp_path / "plain.pth"
    torch.save(backbone.state_dict(), plain)
    lightning = tmp_path / "release.ckpt"
    torch.save({"state_dict": {f"model.{k}": v for k, v in backbone.state_dict().items()},
                "hyper_parameters": {}}, lightning)
    first, second = net.load_backbone(plain), net.load_backbone(lightning)
    assert plain.read_bytes() != lightning.read_bytes()
    assert net.weights_fingerprint(first) == net.weights_fingerprint(second) == net.weights_fingerprint(backbone)
    with torch.no_grad():
        next(second.parameters()).view(-1)[0] += 1e-3
    assert net.weights_fingerprint(second) != net.weights_fingerprint(first)


def test_a_gallery_of_another_model_is_refused(url, model_a, model_b):
    a, b = _app(model_a, url).test_client(), _app(model_b, url).test_client()
    try:
        a.post("/v1/galleries", json={"name": "g"})
        assert a.get("/v1/galleries/g").get_json()["model"] is None
        assert a.post("/v1/galleries/g/identities/alice/faces", data=crop_png(1)).status_code == 201
        model = a.get("/v1/galleries/g").get_json()["model"]
        assert model == {**model_a.identity.to_dict()} and model["arch"] == "ir_18" and model["synthetic"]
        for path in ("/v1/galleries/g/identities/bob/faces", "/v1/galleries/g/identify",
                     "/v1/galleries/g/identities/alice/verify"):
            message = _error(b.post(path, data=crop_png(2)), 409, "model_mismatch")
            assert model_a.identity.name in message and model_b.identity.name in message
        assert a.post("/v1/galleries/g/identify", data=crop_png(1)).status_code == 200
        assert [i["name"] for i in a.get("/v1/galleries/g/identities").get_json()["identities"]] == ["alice"]
    finally:
        a.application.extensions["adaface_gallery"].close()
        b.application.extensions["adaface_gallery"].close()


def test_a_gallery_filled_before_models_were_recorded_adopts_the_running_one(url, model_a, caplog):
    store = open_store(url)
    try:
        store.create_gallery("old")
        store.enroll("old", "alice", [NewFace(unit_vectors(1)[0], 30.0, "a" * 64)])  # no model given
        assert store.get_gallery("old").model is None
        app = _app(model_a, url)
        with caplog.at_level("WARNING"):
            assert app.test_client().post("/v1/galleries/old/identify", data=crop_png(1)).status_code == 200
        assert store.get_gallery("old").model == model_a.identity
        assert "stored before models were recorded" in caplog.text
        app.extensions["adaface_gallery"].close()
    finally:
        store.close()


# -- stored crops ---------------------------------------------------------------------------------

def test_crops_are_stored_served_and_can_be_turned_off(url, model_a):
    app = _app(model_a, url)
    client = app.test_client()
    try:
        client.post("/v1/galleries", json={"name": "g"})
        face_id = client.post("/v1/galleries/g/identities/alice/faces", data=crop_png(1)).get_json()[
            "results"][0]["face_id"]
        r = client.get(f"/v1/galleries/g/faces/{face_id}/crop")
        assert r.status_code == 200 and r.mimetype == "image/png"
        assert np.array_equal(_pixels(r.data), _pixels(crop_png(1)))  # a 112×112 input is the crop itself
        _error(client.get("/v1/galleries/g/faces/999999/crop"), 404, "face_not_found")
    finally:
        app.extensions["adaface_gallery"].close()
    off = _app(model_a, url, store_crops=False)
    try:
        c = off.test_client()
        face_id = c.post("/v1/galleries/g/identities/bob/faces", data=crop_png(2)).get_json()["results"][0]["face_id"]
        _error(c.get(f"/v1/galleries/g/faces/{face_id}/crop"), 404, "crop_not_found")
    finally:
        off.extensions["adaface_gallery"].close()


def _remaining_bytes(url: str, png: bytes) -> bool:
    """Whether a piece of ``png`` is anywhere in the store: the SQLite file and its log, or the
    PostgreSQL crops table."""
    piece = png[len(png) // 2:len(png) // 2 + 48]
    if url.startswith("sqlite:///"):
        path = url[len("sqlite:///"):]
        return any(os.path.exists(p) and piece in open(p, "rb").read() for p in (path, path + "-wal"))
    with psycopg.connect(url) as conn:
        return conn.execute("SELECT count(*) FROM adaface_crops").fetchone()[0] > 0


@pytest.mark.parametrize("delete", ["face", "identity", "gallery"])
def test_deleting_a_face_deletes_its_crop_for_real(url, model_a, delete):
    store = open_store(url)
    try:
        store.create_gallery("g")
        crop = np.random.default_rng(7).integers(0, 256, (112, 112, 3), dtype=np.uint8)
        png = encode_crop(crop)
        enrolled = store.enroll("g", "alice", [NewFace(unit_vectors(1)[0], 30.0, "b" * 64, png)],
                                model=model_a.identity)
        face_id = enrolled.faces[0][0].id
        assert store.face_crop("g", face_id) == png
        store.close()
        assert _remaining_bytes(url, png)  # the check can see it while it is stored
        store = open_store(url)
        if delete == "face":
            store.delete_face("g", face_id)
        elif delete == "identity":
            store.delete_identity("g", "alice")
        else:
            store.delete_gallery("g")
    finally:
        store.close()
    assert not _remaining_bytes(url, png)


# -- re-embedding ---------------------------------------------------------------------------------

def _enroll_crops(store, model, count: int, without_crop: int = 0) -> list:
    """``count`` faces with crops (embedded by ``model``) and ``without_crop`` faces without."""
    crops = [np.random.default_rng(100 + i).integers(0, 256, (112, 112, 3), dtype=np.uint8)
             for i in range(count + without_crop)]
    embeddings, norms = model.embed_crops(np.stack(crops))
    for i, crop in enumerate(crops):
        png = encode_crop(crop) if i < count else None
        store.enroll("g", f"person{i % 5}", [NewFace(embeddings[i], float(norms[i]), f"{i:064x}", png)],
                     model=model.identity)
    return crops


def _face_ids(store) -> list:
    return sorted(f.id for i in store.list_identities("g") for f in store.get_identity("g", i.name).faces)


def test_reembed_switches_at_once_and_resumes(url, model_a, model_b):
    store = open_store(url)
    galleries = Galleries(store)
    try:
        store.create_gallery("g")
        crops = _enroll_crops(store, model_a, 10, without_crop=2)
        before_ids, before = store.vectors(_face_ids(store))
        calls = []

        def interrupted(batch):
            calls.append(len(batch))
            if len(calls) > 1:
                raise KeyboardInterrupt  # the process stops after the first batch was staged
            return model_b.embed_crops(batch)

        with pytest.raises(KeyboardInterrupt):
            reembed(store, "g", model_b.identity, interrupted, batch=4)
        assert store.get_gallery("g").model == model_a.identity  # not switched: old vectors only
        assert store.reembed_state("g", model_b.identity).staged == 4
        with pytest.raises(ModelMismatchError):
            galleries.identify("g", unit_vectors(1), 3, model=model_b.identity)
        ids, vectors = store.vectors(before_ids)
        assert np.array_equal(vectors, before)
        assert galleries.identify("g", before[:1], 1, model=model_a.identity)[0][0].face_id == before_ids[0]

        result = reembed(store, "g", model_b.identity, model_b.embed_crops, batch=4)
        assert result.switched and result.embedded_now == 6 and len(result.left_out) == 2
        assert store.get_gallery("g").model == model_b.identity and store.get_gallery("g").faces == 10
        ids, vectors = store.vectors(before_ids)
        want, _ = model_b.embed_crops(np.stack(crops[:10]))
        assert np.allclose(vectors, want, atol=1e-5)
        hit = galleries.identify("g", want[3:4], 1, model=model_b.identity)[0][0]
        assert hit.face_id == ids[3] and hit.similarity > 0.999
        assert reembed(store, "g", model_b.identity, model_b.embed_crops).switched is False
    finally:
        store.close()


def test_reembed_over_http(url, model_a, model_b):
    a, b = _app(model_a, url), _app(model_b, url)
    try:
        ca, cb = a.test_client(), b.test_client()
        ca.post("/v1/galleries", json={"name": "g"})
        for i in range(6):
            assert ca.post(f"/v1/galleries/g/identities/p{i % 2}/faces", data=crop_png(10 + i)).status_code == 201
        assert cb.get("/v1/galleries/g/reembed").get_json()["status"] == "not_started"
        r = cb.post("/v1/galleries/g/reembed")
        assert r.status_code == 202 and r.get_json()["status"] == "running"
        deadline = time.monotonic() + 60
        while (status := cb.get("/v1/galleries/g/reembed").get_json())["status"] == "running":
            assert time.monotonic() < deadline
            time.sleep(0.1)
        assert status["status"] == "done" and status["embedded"] == 6 and status["left_out"] == []
        assert cb.post("/v1/galleries/g/identify", data=crop_png(10)).get_json()["faces"][0]["similarity"] > 0.999
        _error(ca.post("/v1/galleries/g/identify", data=crop_png(10)), 409, "model_mismatch")
        assert cb.post("/v1/galleries/g/reembed").status_code == 200
    finally:
        a.extensions["adaface_gallery"].close()
        b.extensions["adaface_gallery"].close()


def _cli(args, env, **kwargs):
    return subprocess.run([sys.executable, "AdaFaceFeature.py", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300, **kwargs)


@pytest.mark.slow
def test_cli_reembed_resumes_after_kill(tmp_path):
    photos = tmp_path / "photos"
    for i in range(48):
        folder = photos / f"person{i % 6}"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{i}.png").write_bytes(crop_png(200 + i))
    db = tmp_path / "g.db"
    env = {k: v for k, v in os.environ.items() if not k.startswith("ADAFACE_")}
    env.update(ADAFACE_WEIGHTS="synthetic", ADAFACE_DEVICE="cpu", ADAFACE_BACKEND="torch",
               ADAFACE_GALLERY_URL=f"sqlite:///{db}", ADAFACE_THREADS="1")
    built = _cli(["gallery", "build", str(photos), "--gallery", "g", "--arch", "ir_18"], env)
    assert built.returncode == 0, built.stderr
    listed = _cli(["gallery", "list"], env)
    assert "48 faces" in listed.stdout and "adaface-ir_18/" in listed.stdout

    first = subprocess.Popen([sys.executable, "AdaFaceFeature.py", "gallery", "reembed", "g", "--arch", "ir_34",
                              "--batch", "2"], cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL, start_new_session=True)
    staged, deadline = 0, time.monotonic() + 240
    while staged < 6 and first.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
        try:
            with sqlite3.connect(db, timeout=1) as conn:
                staged = conn.execute("SELECT count(*) FROM adaface_reembed").fetchone()[0]
        except sqlite3.OperationalError:
            pass
    os.killpg(first.pid, signal.SIGKILL)
    first.wait()
    assert 0 < staged < 48, "the first re-embed should have been killed midway"
    identify = _cli(["gallery", "identify", str(photos / "person0" / "0.png"), "--gallery", "g", "--arch", "ir_34"],
                    env)
    assert identify.returncode == 2 and "holds embeddings of adaface-ir_18" in identify.stderr
    assert "Traceback" not in identify.stderr

    second = _cli(["gallery", "reembed", "g", "--arch", "ir_34"], env)
    assert second.returncode == 0, second.stderr
    done_now = int(second.stdout.split("; ")[1].split()[0])
    assert 0 < done_now <= 48 - staged and "now embedded by adaface-ir_34/" in second.stdout
    old = _cli(["gallery", "identify", str(photos / "person0" / "0.png"), "--gallery", "g", "--arch", "ir_18"], env)
    assert old.returncode == 2 and "holds embeddings of adaface-ir_34" in old.stderr
    new = _cli(["gallery", "identify", str(photos / "person0" / "0.png"), "--gallery", "g", "--arch", "ir_34",
                "--json"], env)
    assert new.returncode == 0 and '"identity":"person0"' in new.stdout


# -- identity-level verify -----------------------------------------------------------------------

def test_verify_against_one_identity(url, model_a):
    app = _app(model_a, url)
    client = app.test_client()
    try:
        client.post("/v1/galleries", json={"name": "g"})
        client.post("/v1/galleries/g/identities/alice/faces", json={"images": [base64.b64encode(crop_png(i)).decode()
                                                                               for i in (1, 2)]})
        r = client.post("/v1/galleries/g/identities/alice/verify", data=crop_png(1))
        body = r.get_json()
        assert r.status_code == 200 and body["same_person"] is True and body["faces_compared"] == 2
        assert body["similarity"] > 0.999 and body["mean_similarity"] < body["similarity"]
        e1, e2 = model_a.embed_crops(np.stack([crop_from_png(crop_png(1)), crop_from_png(crop_png(2))]))[0]
        assert body["mean_similarity"] == pytest.approx((1 + float(e1 @ e2)) / 2, abs=1e-4)
        other = client.post("/v1/galleries/g/identities/alice/verify?threshold=0.99", data=crop_png(3)).get_json()
        assert other["threshold"] == 0.99 and other["similarity"] < 0.99 and other["same_person"] is False
        _error(client.post("/v1/galleries/g/identities/nobody/verify", data=crop_png(1)), 404, "identity_not_found")
    finally:
        app.extensions["adaface_gallery"].close()


@pytest.mark.parametrize("suffix", [".npz", ".parquet"])
def test_export_carries_the_model_and_import_checks_it(url, tmp_path, model_a, model_b, suffix):
    from gallery.transfer import export_gallery, import_gallery
    store = open_store(url)
    try:
        store.create_gallery("g")
        _enroll_crops(store, model_a, 3)
        path = tmp_path / f"g{suffix}"
        assert export_gallery(store, "g", path) == 3
        assert import_gallery(store, "copy", path) == (3, 0)
        assert store.get_gallery("copy").model == model_a.identity
        store.create_gallery("other")
        store.enroll("other", "x", [NewFace(unit_vectors(1)[0], 1.0, "c" * 64)], model=model_b.identity)
        with pytest.raises(ModelMismatchError):
            import_gallery(store, "other", path)
        assert store.get_gallery("other").faces == 1
    finally:
        store.close()
