"""Gallery routes through the Flask test client, against SQLite and a real PostgreSQL."""
import base64
import io
import re

import pytest
from PIL import Image

from AdaFaceFeature import AdaFaceFeature
from config import Settings
from conftest import FACEDATA, require_shared
from flask_http_server import create_app
from test_gallery_support import BACKENDS, crop_png, grey_png, store_url


@pytest.fixture(scope="module")
def extractor():
    return AdaFaceFeature("synthetic", arch="ir_18", device="cpu")


def _app(extractor, url, **overrides):
    settings = Settings(weights="synthetic", arch="ir_18", device="cpu", warmup=False, gallery_url=url, **{"open_galleries": True, **overrides})
    return create_app(settings, extractor=extractor)


@pytest.fixture(params=BACKENDS)
def app(request, tmp_path, extractor):
    app = _app(extractor, store_url(request.param, tmp_path))
    yield app
    app.extensions["adaface_gallery"].close()


@pytest.fixture
def client(app):
    return app.test_client()


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def test_gallery_lifecycle(client):
    assert client.get("/v1/galleries").get_json() == {"galleries": []}
    r = client.post("/v1/galleries", json={"name": "staff"})
    assert r.status_code == 201 and r.get_json()["name"] == "staff"
    r = client.post("/v1/galleries", json={"name": "staff"})
    assert r.status_code == 409 and r.get_json()["error"]["code"] == "gallery_exists"
    assert client.post("/v1/galleries", json={"name": "no spaces"}).status_code == 400
    assert client.post("/v1/galleries", data=b"x").get_json()["error"]["code"] == "bad_json"
    info = client.get("/v1/galleries/staff").get_json()
    assert (info["identities"], info["faces"]) == (0, 0)
    assert client.delete("/v1/galleries/staff").get_json() == {"deleted": "staff"}
    r = client.get("/v1/galleries/staff")
    assert r.status_code == 404 and r.get_json()["error"]["code"] == "gallery_not_found"


def test_enroll_identify_and_manage_identities(client):
    client.post("/v1/galleries", json={"name": "staff"})
    alice, bob, stranger = crop_png(1), crop_png(2), crop_png(3)
    r = client.post("/v1/galleries/staff/identities/alice/faces", data=alice)
    body = r.get_json()
    assert r.status_code == 201 and body["added"] == 1 and body["results"][0]["status"] == "added"
    face_id = body["results"][0]["face_id"]
    # the same photo again, as base64 JSON this time: already enrolled
    r = client.post("/v1/galleries/staff/identities/alice/faces", json={"image": _b64(alice)})
    assert r.status_code == 200 and r.get_json()["results"][0] == {**body["results"][0], "status": "exists"}
    # a batch with metadata: one good photo, one that is not an image
    r = client.post("/v1/galleries/staff/identities/bob/faces",
                    json={"images": [_b64(bob), _b64(b"not an image")], "metadata": {"dept": "ops"}})
    body = r.get_json()
    assert r.status_code == 201 and body["added"] == 1 and body["identity"]["metadata"] == {"dept": "ops"}
    assert body["results"][1]["error"]["code"] == "not_an_image"
    # identify: alice's own photo is alice at ~1.0, a stranger is unknown at a strict threshold
    r = client.post("/v1/galleries/staff/identify?top_k=2", data=alice)
    [face] = r.get_json()["faces"]
    assert r.status_code == 200 and face["decision"] == "match" and face["identity"] == "alice"
    assert face["similarity"] > 0.999 and [c["identity"] for c in face["candidates"]] == ["alice", "bob"]
    assert face["candidates"][0]["similarity"] >= face["candidates"][1]["similarity"]
    r = client.post("/v1/galleries/staff/identify?threshold=0.99", data=stranger)
    [face] = r.get_json()["faces"]
    assert face["decision"] == "unknown" and face["identity"] is None and len(face["candidates"]) == 2
    assert r.get_json()["threshold"] == 0.99
    # list, rename, delete
    names = [i["name"] for i in client.get("/v1/galleries/staff/identities").get_json()["identities"]]
    assert names == ["alice", "bob"]
    r = client.patch("/v1/galleries/staff/identities/alice", json={"name": "alicia"})
    assert r.status_code == 200 and r.get_json()["name"] == "alicia" and r.get_json()["faces"][0]["id"] == face_id
    assert client.patch("/v1/galleries/staff/identities/alicia", json={"name": "bob"}).status_code == 409
    assert client.patch("/v1/galleries/staff/identities/alicia", json={"nom": "x"}).status_code == 400
    r = client.post("/v1/galleries/staff/identify", json={"image": _b64(alice)})
    assert r.get_json()["faces"][0]["identity"] == "alicia"
    assert client.delete(f"/v1/galleries/staff/faces/{face_id}").get_json() == {"deleted": face_id}
    assert client.delete(f"/v1/galleries/staff/faces/{face_id}").status_code == 404
    r = client.post("/v1/galleries/staff/identify", data=alice)
    assert [c["identity"] for c in r.get_json()["faces"][0]["candidates"]] == ["bob"]
    assert client.delete("/v1/galleries/staff/identities/bob").get_json() == {"deleted": "bob", "faces_removed": 1}
    assert client.get("/v1/galleries/staff/identities/bob").status_code == 404
    r = client.post("/v1/galleries/staff/identify", data=alice)
    assert r.get_json()["faces"][0] == {**r.get_json()["faces"][0], "decision": "unknown", "candidates": []}


def test_enroll_and_identify_errors(client):
    client.post("/v1/galleries", json={"name": "g"})
    r = client.post("/v1/galleries/missing/identities/a/faces", data=crop_png(1))
    assert r.status_code == 404 and r.get_json()["error"]["code"] == "gallery_not_found"
    r = client.post("/v1/galleries/g/identities/a/faces", data=grey_png())
    assert r.status_code == 422 and r.get_json()["error"]["code"] == "no_face"
    r = client.post("/v1/galleries/g/identities/a/faces?faces=all", data=crop_png(1))
    assert r.status_code == 400 and r.get_json()["error"]["code"] == "bad_option"
    r = client.post("/v1/galleries/g/identities/a/faces", json={"images": [_b64(grey_png())]})
    assert r.status_code == 200 and r.get_json()["identity"] is None and r.get_json()["added"] == 0
    assert client.get("/v1/galleries/g/identities/a").status_code == 404
    assert client.post("/v1/galleries/g/identify?top_k=0", data=crop_png(1)).status_code == 400
    assert client.post("/v1/galleries/g/identify?threshold=2", data=crop_png(1)).status_code == 400
    assert client.post("/v1/galleries/g/identify", data=grey_png()).status_code == 422
    assert client.post("/v1/galleries/missing/identify", data=crop_png(1)).status_code == 404


def test_gallery_routes_need_the_api_key(tmp_path, extractor):
    app = _app(extractor, f"sqlite:///{tmp_path}/g.db", api_keys="secret", open_galleries=False)
    client = app.test_client()
    assert client.get("/v1/galleries").status_code == 401
    assert client.post("/v1/galleries/g/identify", data=crop_png(1)).status_code == 401
    assert client.get("/v1/galleries", headers={"Authorization": "Bearer secret"}).status_code == 200


def test_every_gallery_route_is_documented(tmp_path, extractor):
    app = _app(extractor, f"sqlite:///{tmp_path}/g.db")
    routes = {}
    for rule in app.url_map.iter_rules():
        if rule.rule.startswith("/v1/galleries"):
            path = re.sub(r"<(?:[^:<>]+:)?([^<>]+)>", r"{\1}", rule.rule)
            routes.setdefault(path, set()).update(m for m in rule.methods if m not in {"HEAD", "OPTIONS"})
    spec = app.test_client().get("/openapi.json").get_json()
    galleries = {p: item for p, item in spec["paths"].items() if p.startswith("/v1/galleries")}
    documented = {p: {m.upper() for m in item} for p, item in galleries.items()}
    assert routes == documented
    for path, item in galleries.items():
        for method, op in item.items():
            assert op["summary"] and any(s.startswith("2") for s in op["responses"]), (path, method)
            names = {p["name"] for p in op.get("parameters", []) if p["in"] == "path"}
            assert names == set(re.findall(r"{(\w+)}", path)), (path, method)


def _group_photo() -> bytes:
    """Two deepface photos side by side: a photo with two people in it."""
    photos = [Image.open(FACEDATA / "deepface" / name).convert("RGB") for name in ("img3.jpg", "img8.jpg")]
    photos = [p.resize((int(p.width * 360 / p.height), 360)) for p in photos]
    group = Image.new("RGB", (sum(p.width for p in photos) + 40, 360), (200, 200, 200))
    group.paste(photos[0], (0, 0))
    group.paste(photos[1], (photos[0].width + 40, 0))
    buf = io.BytesIO()
    group.save(buf, "PNG")
    return buf.getvalue()


def _cut(png: bytes, box, margin: float = 0.6) -> bytes:
    im = Image.open(io.BytesIO(png))
    x1, y1, x2, y2 = box
    w, h = x2 - x1, y2 - y1
    region = im.crop((max(0, x1 - margin * w), max(0, y1 - margin * h), min(im.width, x2 + margin * w),
                      min(im.height, y2 + margin * h)))
    buf = io.BytesIO()
    region.save(buf, "PNG")
    return buf.getvalue()


def test_identify_every_face_of_a_group_photo(tmp_path, extractor):
    require_shared()
    client = _app(extractor, f"sqlite:///{tmp_path}/g.db").test_client()
    group = _group_photo()
    faces = client.post("/v1/embed?faces=all", data=group).get_json()["faces"]
    assert len(faces) >= 2
    faces = sorted(faces, key=lambda f: f["box"][0])[:1] + sorted(faces, key=lambda f: -f["box"][0])[:1]
    client.post("/v1/galleries", json={"name": "g"})
    for name, face in zip(("left", "right"), faces):
        r = client.post(f"/v1/galleries/g/identities/{name}/faces", data=_cut(group, face["box"]))
        assert r.status_code == 201, r.get_json()
    found = client.post("/v1/galleries/g/identify?faces=all&top_k=2", data=group).get_json()["faces"]
    by_side = {("left" if f["box"][0] < faces[1]["box"][0] - 10 else "right"): f for f in found}
    assert set(by_side) == {"left", "right"}
    for side, face in by_side.items():
        assert face["decision"] == "match" and face["identity"] == side, face
        print(f"{side}: similarity {face['similarity']:.4f}")
        assert face["similarity"] > 0.8


def test_enroll_multipart_with_metadata(client):
    client.post("/v1/galleries", json={"name": "g"})
    data = {"images": [(io.BytesIO(crop_png(1)), "a_1.png"), (io.BytesIO(crop_png(2)), "a_2.png")],
            "metadata": '{"badge": 1041}'}
    r = client.post("/v1/galleries/g/identities/alice/faces", data=data, content_type="multipart/form-data")
    body = r.get_json()
    assert r.status_code == 201 and body["added"] == 2 and body["identity"]["metadata"] == {"badge": 1041}
    r = client.post("/v1/galleries/g/identities/alice/faces", data={"metadata": "{not json", "image": (
        io.BytesIO(crop_png(3)), "a_3.png")}, content_type="multipart/form-data")
    assert r.status_code == 400 and r.get_json()["error"]["code"] == "bad_json"
