"""What docs/compatibility.md promises of the CompreFace and DeepStack layers beyond what their
clients exercise (tests/test_compat_clients.py): the errors that keep this service's status
(409 ``model_mismatch``, 413), the refusals of keys, the options that are ignored or filter, the
settings that change an answer (``ADAFACE_STORE_CROPS``, ``ADAFACE_MAX_IMAGES``, bare
``ADAFACE_API_KEYS``) and the audit trail of writes made through both APIs.

Two real gunicorn servers on one SQLite gallery database, started together: ``main`` (synthetic
IR-18, the keys below, no stored crops, a 3 MiB body limit, 2 images per request) and ``other``
(synthetic IR-34 on the same database: every gallery ``main`` filled is another model's to it).
"""
import hashlib

import pytest
import requests

from conftest import require_shared
from test_compat_clients import _photo, _request, _two_faces
from test_gallery_server import Server
from test_gallery_support import store_url

pytestmark = [pytest.mark.server, pytest.mark.slow]

FRIGATE = "00000000-0000-0000-0000-000000000010"
AUDITOR = "auditor-key"
HA = "ha-key"
DETECTOR = "detector-key"
SEVERAL = "several-key"
PLAIN = "plain-bare-key"
KEYS = f"""
{FRIGATE} name=double-take galleries=home scopes=embed,gallery:read,gallery:write
{AUDITOR} name=auditor
{HA} name=ha galleries=house scopes=embed,gallery:read,gallery:write
{DETECTOR} name=detector scopes=embed
{SEVERAL} name=several galleries=first,second scopes=embed,gallery:read,gallery:write
"""
BODY_LIMIT = 3 * 1024 * 1024
MAX_IMAGES = 2


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    """``(main, other)``: the two servers, started at once and waited for together."""
    require_shared()
    root = tmp_path_factory.mktemp("compat-errors")
    (root / "keys.txt").write_text(KEYS)
    common = {"ADAFACE_OPEN_GALLERIES": "false", "ADAFACE_API_KEYS_FILE": str(root / "keys.txt"),
              "ADAFACE_API_KEYS": PLAIN, "ADAFACE_COMPAT_GALLERY": "shared"}
    url = store_url("sqlite", root)
    started = [Server(url, root / "main.log", env={**common, "ADAFACE_STORE_CROPS": "false",
                                                    "ADAFACE_MAX_BODY_BYTES": str(BODY_LIMIT),
                                                    "ADAFACE_MAX_IMAGES": str(MAX_IMAGES)}),
               Server(url, root / "other.log", env={**common, "ADAFACE_ARCH": "ir_34"})]
    try:
        yield tuple(s.wait_ready() for s in started)
    finally:
        for s in started:
            s.kill()


@pytest.fixture(scope="module")
def main(servers):
    return servers[0].port


@pytest.fixture(scope="module")
def other(servers):
    return servers[1].port


def _file(name: str = "deepface/img2.jpg") -> dict:
    return {"file": ("a.jpg", _photo(name))}


def _ds(port, route, key, files=None, **fields):
    """(status, JSON) of a DeepStack call with the key as its form field ``api_key``."""
    return _request(port, "POST", f"/v1/vision/face{route}", data={"api_key": key, **fields}, files=files)


def _bare_key_name(key: str) -> str:
    """The name a key without ``name=`` gets (serving/keys.py): ``key-`` and its sha256's first 8 hex digits."""
    return "key-" + hashlib.sha256(key.encode()).hexdigest()[:8]


# -- 409 model_mismatch and 413: this service's status, CompreFace code 0 --------------------------

def test_another_models_gallery_is_409_through_both_apis(main, other):
    status, added = _request(main, "POST", "/api/v1/recognition/faces?subject=ann", FRIGATE, files=_file())
    assert status == 201
    assert _ds(main, "/register", HA, files={"image": ("a.jpg", _photo("deepface/img3.jpg"))}, userid="ben") == \
        (200, {"success": True, "message": "face added"})

    for method, path, kwargs in (
            ("POST", "/api/v1/recognition/recognize", {"files": _file()}),
            ("POST", "/api/v1/recognition/faces?subject=ann", {"files": _file("deepface/img3.jpg")}),
            ("POST", f"/api/v1/recognition/faces/{added['image_id']}/verify", {"files": _file()}),
            ("POST", "/api/v1/recognition/embeddings/recognize", {"body": {"embeddings": [[1.0] * 512]}})):
        status, body = _request(other, method, path, FRIGATE, **kwargs)
        assert (status, body["code"]) == (409, 0), (path, body)
        assert "ir_18" in body["message"] and "ir_34" in body["message"], body
    for route, fields in (("/register", {"userid": "ben"}), ("/recognize", {})):
        status, body = _ds(other, route, HA, files={"image": ("a.jpg", _photo("deepface/img3.jpg"))}, **fields)
        assert (status, body["success"]) == (409, False), (route, body)
        assert "ir_18" in body["error"] and "ir_34" in body["error"], body
    # nothing was added by the refused writes; the model that filled the galleries still uses them
    status, listed = _request(main, "GET", "/api/v1/recognition/faces?subject=ann", FRIGATE)
    assert listed["total_elements"] == 1
    status, found = _request(main, "POST", "/api/v1/recognition/recognize", FRIGATE, files=_file())
    assert status == 200 and found["result"][0]["subjects"][0] == {"subject": "ann", "similarity": 1.0}
    assert _ds(main, "/recognize", HA, files={"image": ("a.jpg", _photo("deepface/img3.jpg"))})[1][
        "predictions"][0]["userid"] == "ben"


def test_a_body_over_the_limit_is_413_code_0(main):
    big = {"file": ("big.jpg", b"\0" * (BODY_LIMIT + 1))}
    status, body = _request(main, "POST", "/api/v1/recognition/recognize", FRIGATE, files=big)
    assert (status, body["code"]) == (413, 0) and str(BODY_LIMIT) in body["message"], body
    status, body = _request(main, "POST", "/api/v1/recognition/faces?subject=big", FRIGATE,
                            body={"file": "A" * BODY_LIMIT})
    assert (status, body["code"]) == (413, 0), body
    status, body = _request(main, "POST", "/api/v1/recognition/recognize", FRIGATE, files=_file())
    assert status == 200, body                                 # under the limit: answered
    # DeepStack, the key in the form: its 413, in its shape
    status, body = _ds(main, "/recognize", HA, files={"image": big["file"]})
    assert (status, body["success"]) == (413, False) and str(BODY_LIMIT) in body["error"], body


# -- CompreFace -------------------------------------------------------------------------------------

def test_compreface_deletes_renames_plugins_and_missing_crops(main):
    port = main
    photo = _file("deepface/img14.jpg")
    status, added = _request(port, "POST", "/api/v1/recognition/faces?subject=cleo", FRIGATE, files=photo)
    assert status == 201
    # without a subject: refused, nothing deleted
    for query in ("", "?subject="):
        status, body = _request(port, "DELETE", "/api/v1/recognition/faces" + query, FRIGATE)
        assert (status, body["code"]) == (400, 26), (query, body)
    assert _request(port, "GET", "/api/v1/recognition/faces?subject=cleo", FRIGATE)[1]["total_elements"] == 1

    # the plugins there are no models for: ignored, the answer is the same as without them
    status, found = _request(port, "POST", "/api/v1/recognition/recognize?face_plugins=age,gender,mask,pose",
                             FRIGATE, files=photo)
    assert status == 200 and found["result"][0]["subjects"][0]["subject"] == "cleo"
    assert set(found["result"][0]) == {"box", "subjects"}, found
    assert _request(port, "POST", "/api/v1/recognition/recognize", FRIGATE, files=photo) == (200, found)
    status, detected = _request(port, "POST", "/api/v1/detection/detect?face_plugins=age,gender,mask,pose,landmarks",
                                DETECTOR, files=_file())
    assert status == 200 and set(detected["result"][0]) == {"box", "landmarks"}, detected

    # ADAFACE_STORE_CROPS=false: the example has no image
    status, body = _request(port, "GET", f"/api/v1/recognition/faces/{added['image_id']}/img", FRIGATE)
    assert (status, body["code"]) == (404, 44), body

    # a rename to an empty name changes nothing
    for new in ("", None):
        assert _request(port, "PUT", "/api/v1/recognition/subjects/cleo", FRIGATE, body={"subject": new}) == \
            (200, {"updated": False})
    assert "cleo" in _request(port, "GET", "/api/v1/recognition/subjects", FRIGATE)[1]["subjects"]

    # deleting a subject's examples deletes the subject here
    assert _request(port, "DELETE", "/api/v1/recognition/faces?subject=cleo", FRIGATE) == (200, {"deleted": 1})
    assert "cleo" not in _request(port, "GET", "/api/v1/recognition/subjects", FRIGATE)[1]["subjects"]

    # CompreFace's direct download by key and id is not a route here
    r = requests.get(f"http://127.0.0.1:{port}/api/v1/static/{FRIGATE}/images/{added['image_id']}", timeout=60)
    assert r.status_code == 404 and r.headers["Content-Type"] != "image/png"


# -- DeepStack --------------------------------------------------------------------------------------

def test_deepstack_option_image_count_and_scope_errors(main):
    port, one = main, _photo("deepface/img2.jpg")
    for bad in ("abc", "-0.5", "nan"):
        assert _ds(port, "/recognize", HA, files={"image": ("a.jpg", one)}, min_confidence=bad) == \
            (400, {"success": False, "error": "Invalid value for min_confidence"}), bad
    assert _ds(port, "", HA, files={"image": ("a.jpg", one)}, min_confidence="x") == \
        (400, {"success": False, "error": "Invalid value for min_confidence"})
    three = {f"image{i}": (f"{i}.jpg", one) for i in (1, 2, 3)}
    assert _ds(port, "/match", HA, files=three) == (400, {"success": False, "error": "only two images allowed"})
    status, body = _ds(port, "/register", HA, files=three, userid="dan")
    assert (status, body["success"]) == (413, False) and f"the limit is {MAX_IMAGES}" in body["error"], body
    assert "dan" not in _ds(port, "/list", HA)[1]["faces"]
    two = {f"image{i}": (f"{i}.jpg", one) for i in (1, 2)}
    assert _ds(port, "/register", HA, files=two, userid="dan") == (200, {"success": True, "message": "face added"})
    # a key without the route's scope: 401, the message naming the scope
    for route, scope in (("/register", "gallery:write"), ("/recognize", "gallery:read"), ("/list", "gallery:read"),
                         ("/delete", "gallery:write")):
        status, body = _ds(port, route, DETECTOR, files={"image": ("a.jpg", one)}, userid="dan")
        assert (status, body["success"]) == (401, False) and scope in body["error"], (route, body)
    assert _ds(port, "/match", DETECTOR, files=two) == (200, {"success": True, "similarity": 1.0})
    assert "dan" in _ds(port, "/list", HA)[1]["faces"]


def test_deepstack_detect_min_confidence_filters_faces(main):
    pair = {"image": ("two.jpg", _two_faces())}
    status, every = _ds(main, "", DETECTOR, files=pair, min_confidence="0")
    assert status == 200 and len(every["predictions"]) == 2
    low, high = sorted(p["confidence"] for p in every["predictions"])
    assert low < high, every                       # the photo must tell the faces apart
    status, kept = _ds(main, "", DETECTOR, files=pair, min_confidence=str((low + high) / 2))
    assert status == 200 and [p["confidence"] for p in kept["predictions"]] == [high]
    assert [p for p in every["predictions"] if p["confidence"] == high] == kept["predictions"]
    assert len(_ds(main, "", DETECTOR, files=pair, min_confidence=str(low - 1e-6))[1]["predictions"]) == 2


# -- which gallery a key uses ---------------------------------------------------------------------

def test_a_key_limited_to_several_other_galleries_is_refused(main):
    status, body = _request(main, "GET", "/api/v1/recognition/subjects", SEVERAL)
    assert (status, body["code"]) == (404, 10) and "Recognition service with this API Key not found" in body["message"]
    status, body = _request(main, "POST", "/api/v1/recognition/faces?subject=x", SEVERAL, files=_file())
    assert (status, body["code"]) == (404, 10)
    for route in ("/list", "/register", "/recognize"):
        status, body = _ds(main, route, SEVERAL, files={"image": ("a.jpg", _photo("deepface/img2.jpg"))}, userid="x")
        assert (status, body["success"]) == (401, False) and "shared" in body["error"], (route, body)
    # the embed routes need no gallery: the same key detects
    assert _ds(main, "", SEVERAL, files={"image": ("a.jpg", _photo("deepface/img2.jpg"))})[0] == 200


def test_a_bare_api_keys_key_uses_the_compat_gallery(main):
    status, added = _request(main, "POST", "/api/v1/recognition/faces?subject=plain-one", PLAIN,
                             files=_file("deepface/img5.jpg"))
    assert status == 201 and added["subject"] == "plain-one"
    status, found = _request(main, "POST", "/api/v1/recognition/recognize", PLAIN, files=_file("deepface/img5.jpg"))
    assert status == 200 and found["result"][0]["subjects"][0] == {"subject": "plain-one", "similarity": 1.0}
    assert _ds(main, "/register", PLAIN, files={"image": ("a.jpg", _photo("deepface/img5.jpg"))},
               userid="plain-two") == (200, {"success": True, "message": "face added"})
    [known] = _ds(main, "/recognize", PLAIN, files={"image": ("a.jpg", _photo("deepface/img5.jpg"))})[1]["predictions"]
    assert known["userid"] in ("plain-one", "plain-two") and known["confidence"] == 1.0
    # it is ADAFACE_COMPAT_GALLERY: the gallery API shows both there
    status, listed = _request(main, "GET", "/v1/galleries/shared/identities", PLAIN)
    assert status == 200 and {"plain-one", "plain-two"} <= {i["name"] for i in listed["identities"]}


# -- the audit trail --------------------------------------------------------------------------------

def _audit(port, gallery):
    status, page = _request(port, "GET", f"/v1/audit?gallery={gallery}&limit=1000", AUDITOR)
    assert status == 200, page
    return [(e["action"], e["actor"], e["identity"]) for e in page["events"]][::-1]     # oldest first


def test_writes_through_both_apis_are_in_the_audit_trail(main):
    port = main
    status, added = _request(port, "POST", "/api/v1/recognition/faces?subject=eve", FRIGATE,
                             files=_file("deepface/img4.jpg"))
    assert status == 201
    _request(port, "POST", "/api/v1/recognition/faces?subject=eve", FRIGATE, files=_file("deepface/img5.jpg"))
    assert _request(port, "PUT", "/api/v1/recognition/subjects/eve", FRIGATE, body={"subject": "eva"})[1] == \
        {"updated": True}
    assert _request(port, "DELETE", f"/api/v1/recognition/faces/{added['image_id']}", FRIGATE)[0] == 200
    assert _request(port, "DELETE", "/api/v1/recognition/subjects/eva", FRIGATE)[0] == 200
    trail = _audit(port, "home")
    start = trail.index(("identity.enroll", "double-take", "eve"))
    assert trail[start:] == [("identity.enroll", "double-take", "eve"), ("identity.enroll", "double-take", "eve"),
                             ("identity.update", "double-take", "eva"), ("faces.delete", "double-take", "eva"),
                             ("identity.delete", "double-take", "eva")], trail

    assert _ds(port, "/register", HA, files={"image": ("a.jpg", _photo("deepface/img4.jpg"))}, userid="fay")[0] == 200
    assert _ds(port, "/delete", HA, userid="fay")[0] == 200
    trail = _audit(port, "house")
    assert trail[-2:] == [("identity.enroll", "ha", "fay"), ("identity.delete", "ha", "fay")], trail

    assert _request(port, "POST", "/api/v1/recognition/subjects", PLAIN, body={"subject": "gus"})[0] == 201
    assert _audit(port, "shared")[-1] == ("identity.enroll", _bare_key_name(PLAIN), "gus")
