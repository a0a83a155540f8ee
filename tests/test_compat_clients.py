"""CompreFace's and DeepStack's APIs, called by their real client libraries and directly over
HTTP, against a real gunicorn server (gevent worker, synthetic IR-18 weights, SQLite gallery).

The clients: ``compreface-sdk`` (installed with ``--no-deps`` beside requests-toolbelt 1.0,
requirements-dev-nodeps.txt) and ``deepstack-python`` (what Home Assistant's integration uses). Every
SDK method, on the shared photos; enrolled photos come back as themselves (the same photo, the
same embedding: similarity 1 whatever the weights). Keys: a CompreFace-style UUID limited to the
gallery ``home``, a detection-only key, a DeepStack key limited to ``house``, a key for every
gallery (it uses ``ADAFACE_COMPAT_GALLERY``).
"""
import base64
import io
import json
import uuid

import pytest
from PIL import Image

from conftest import FACEDATA, require_shared
from test_gallery_server import Server, call
from test_gallery_support import store_url

pytestmark = [pytest.mark.server, pytest.mark.slow]

RECOGNITION = "00000000-0000-0000-0000-000000000002"
DETECTION = "00000000-0000-0000-0000-000000000003"
DEEPSTACK = "ds-key"
EVERYWHERE = "all-galleries-key"
KEYS = f"""
{RECOGNITION} name=frigate galleries=home scopes=embed,gallery:read,gallery:write
{DETECTION} name=detector scopes=embed
{DEEPSTACK} name=ha galleries=house scopes=embed,gallery:read,gallery:write
{EVERYWHERE} name=ops
reader name=reader galleries=home scopes=gallery:read
fresh-key name=fresh galleries=untouched scopes=gallery:read,gallery:write
"""


def _photo(name: str) -> bytes:
    return (FACEDATA / name).read_bytes()


def _two_faces() -> bytes:
    """Two shared photos side by side: one image with two faces, the left one larger."""
    a = Image.open(io.BytesIO(_photo("deepface/img1.jpg"))).convert("RGB")
    b = Image.open(io.BytesIO(_photo("deepface/img3.jpg"))).convert("RGB")
    b = b.resize((b.width * a.height // b.height // 2, a.height // 2))
    out = Image.new("RGB", (a.width + b.width, a.height), "white")
    out.paste(a, (0, 0))
    out.paste(b, (a.width, a.height // 4))
    buf = io.BytesIO()
    out.save(buf, "JPEG", quality=92)
    return buf.getvalue()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    require_shared()
    root = tmp_path_factory.mktemp("compat")
    (root / "keys.txt").write_text(KEYS)
    server = Server(store_url("sqlite", root), root / "server.log",
                    env={"ADAFACE_OPEN_GALLERIES": "false", "ADAFACE_API_KEYS_FILE": str(root / "keys.txt"),
                         "ADAFACE_COMPAT_GALLERY": "shared"})
    try:
        yield server.wait_ready()
    finally:
        server.kill()


@pytest.fixture(scope="module")
def compreface(server):
    from compreface import CompreFace
    return CompreFace("http://127.0.0.1", str(server.port))


def _files(tmp_path, *names) -> list:
    """Shared photos copied under ``tmp_path`` (the SDK sends a path's basename as the file name)."""
    paths = []
    for name in names:
        path = tmp_path / name.replace("/", "_")
        path.write_bytes(_photo(name) if not name.startswith("two") else _two_faces())
        paths.append(str(path))
    return paths


def _request(port, method, path, key=None, body=None, files=None, data=None):
    """(status, JSON) through requests, which the clients use."""
    import requests
    headers = {"x-api-key": key} if key else {}
    r = requests.request(method, f"http://127.0.0.1:{port}{path}", headers=headers, json=body, files=files,
                         data=data, timeout=60)
    return r.status_code, r.json()


# -- the CompreFace SDK ----------------------------------------------------------------------------

def test_compreface_sdk_subjects_examples_recognize_verify(compreface, server, tmp_path):
    one, two, other, pair = _files(tmp_path, "deepface/img1.jpg", "deepface/img2.jpg", "deepface/img3.jpg", "two.jpg")
    recognition = compreface.init_face_recognition(RECOGNITION)
    subjects, examples = recognition.get_subjects(), recognition.get_face_collection()

    assert subjects.add("alice") == {"subject": "alice"}
    assert subjects.add("alice") == {"message": "Subject already exists", "code": 43}
    assert subjects.list() == {"subjects": ["alice"]}

    added = examples.add(one, "alice")
    assert added["subject"] == "alice" and uuid.UUID(added["image_id"])
    assert examples.add(two, "alice", {"det_prob_threshold": 0.5})["subject"] == "alice"
    bob = examples.add(other, "bob")                                   # a new subject, made by its example
    assert subjects.list() == {"subjects": ["alice", "bob"]}
    listed = examples.list()
    assert listed["total_elements"] == 3 and listed["page_size"] == 20 and listed["total_pages"] == 1
    assert {(f["image_id"], f["subject"]) for f in listed["faces"]} >= {(added["image_id"], "alice"),
                                                                        (bob["image_id"], "bob")}

    found = recognition.recognize(one, {"limit": 0, "prediction_count": 2, "face_plugins": "landmarks,calculator",
                                        "status": True})
    face = found["result"][0]
    assert face["subjects"][0] == {"subject": "alice", "similarity": 1.0}
    assert len(face["subjects"]) == 2 and face["subjects"][1]["similarity"] <= 1.0
    assert set(face["box"]) == {"probability", "x_max", "y_max", "x_min", "y_min"}
    assert all(isinstance(face["box"][k], int) for k in ("x_max", "y_max", "x_min", "y_min"))
    assert len(face["landmarks"]) == 5 and all(isinstance(v, int) for p in face["landmarks"] for v in p)
    assert len(face["embedding"]) == 512 and found["plugins_versions"]["detector"] == "mtcnn"
    plain = recognition.recognize(one)
    assert "plugins_versions" not in plain and "embedding" not in plain["result"][0]
    assert "landmarks" not in plain["result"][0] and len(plain["result"][0]["subjects"]) == 1

    group = recognition.recognize(pair, {"limit": 0})
    assert len(group["result"]) == 2 and group["result"][0]["subjects"][0]["subject"] == "alice"
    assert len(recognition.recognize(pair, {"limit": 1})["result"]) == 1

    verified = examples.verify(one, added["image_id"])
    assert verified["result"][0]["similarity"] == 1.0 and verified["result"][0]["subject"] == "alice"
    assert examples.verify(one, str(uuid.uuid4()))["code"] == 44

    assert subjects.update("bob", "robert") == {"updated": True}
    assert subjects.update("robert", "alice") == {"updated": True}        # onto an existing subject: merged
    assert subjects.list() == {"subjects": ["alice"]}
    assert recognition.recognize(other)["result"][0]["subjects"][0] == {"subject": "alice", "similarity": 1.0}

    assert examples.delete(bob["image_id"]) == {"image_id": bob["image_id"], "subject": "alice"}
    assert examples.delete(bob["image_id"])["code"] == 44
    assert examples.delete_all("alice") == {"deleted": 2}
    assert subjects.list() == {"subjects": []}
    examples.add(one, "carol")
    examples.add(other, "dave")
    assert subjects.delete("carol") == {"subject": "carol"}
    assert subjects.delete("carol") == {"message": "Subject carol not found", "code": 42}
    assert subjects.delete_all() == {"deleted": 1}
    assert subjects.list() == {"subjects": []}


def test_compreface_sdk_detection_and_verification(compreface, tmp_path):
    one, two, pair = _files(tmp_path, "deepface/img1.jpg", "deepface/img2.jpg", "two.jpg")
    detection = compreface.init_face_detection(DETECTION)
    detected = detection.detect(pair, {"status": True, "face_plugins": "landmarks"})
    boxes = [f["box"] for f in detected["result"]]
    assert len(boxes) == 2 and (boxes[0]["x_max"] - boxes[0]["x_min"]) > (boxes[1]["x_max"] - boxes[1]["x_min"])
    assert all(0.5 < b["probability"] <= 1 for b in boxes) and "plugins_versions" in detected
    low, high = sorted(b["probability"] for b in boxes)
    if high - low > 1e-4:                               # a threshold between the two leaves one face
        assert len(detection.detect(pair, {"det_prob_threshold": (low + high) / 2})["result"]) == 1

    verification = compreface.init_face_verification(DETECTION)
    same = verification.verify(one, one)
    [entry] = same["result"]
    assert entry["face_matches"][0]["similarity"] == 1.0 and "box" in entry["source_image_face"]
    versus = verification.verify(one, pair, {"status": True})["result"][0]
    # the same face, found again in another image: nearly the same crop
    assert len(versus["face_matches"]) == 2 and versus["face_matches"][0]["similarity"] > 0.9
    assert "plugins_versions" in versus


def test_compreface_sdk_wrong_keys_and_bad_images(compreface, server, tmp_path):
    from compreface import CompreFace
    [one] = _files(tmp_path, "deepface/img1.jpg")
    blank = tmp_path / "blank.png"
    Image.new("RGB", (300, 300), "grey").save(blank)
    junk = tmp_path / "junk.jpg"
    junk.write_bytes(b"this is not an image")
    wrong = CompreFace("http://127.0.0.1", str(server.port)).init_face_recognition(str(uuid.uuid4()))
    assert wrong.get_subjects().list() == {"message": "Recognition service with this API Key not found", "code": 10}
    assert wrong.recognize(one)["code"] == 10
    # a detection-only key cannot use the recognition service, nor a reader write
    assert compreface.init_face_recognition(DETECTION).get_subjects().list()["code"] == 10
    assert compreface.init_face_recognition("reader").get_subjects().add("x")["code"] == 10
    recognition = compreface.init_face_recognition(RECOGNITION)
    assert recognition.recognize(str(blank)) == {"message": "No face is found in the given image", "code": 28}
    assert recognition.get_face_collection().add(str(blank), "x")["code"] == 28
    assert recognition.get_face_collection().add(str(junk), "x")["code"] == 21
    assert compreface.init_face_detection(DETECTION).detect(str(blank))["code"] == 28
    assert recognition.get_subjects().list() == {"subjects": []}     # nothing was half-added


# -- CompreFace over HTTP: the fields the SDK does not send ----------------------------------------

def test_compreface_http_json_bodies_paging_several_deletes_and_download(server):
    port, key = server.port, RECOGNITION
    b64 = base64.b64encode(_photo("deepface/img1.jpg")).decode()
    status, added = _request(port, "POST", "/api/v1/recognition/faces?subject=erin", key, body={"file": b64})
    assert status == 201 and added["subject"] == "erin"
    ids = [added["image_id"]]
    for name in ("deepface/img2.jpg", "deepface/img3.jpg"):
        status, more = _request(port, "POST", "/api/v1/recognition/faces?subject=erin", key,
                                files={"file": ("p.jpg", _photo(name))})
        assert status == 201
        ids.append(more["image_id"])
    status, page = _request(port, "GET", "/api/v1/recognition/faces?page=1&size=2&subject=erin", key)
    assert status == 200 and page["page_number"] == 1 and page["page_size"] == 2
    assert page["total_pages"] == 2 and page["total_elements"] == 3 and len(page["faces"]) == 1
    assert _request(port, "GET", "/api/v1/recognition/faces?subject=nobody", key)[1]["code"] == 42

    import requests
    r = requests.get(f"http://127.0.0.1:{port}/api/v1/recognition/faces/{ids[0]}/img", headers={"x-api-key": key})
    assert r.status_code == 200 and r.headers["Content-Type"] == "image/png"
    assert Image.open(io.BytesIO(r.content)).size == (112, 112)
    assert _request(port, "GET", f"/api/v1/recognition/faces/{uuid.uuid4()}/img", key)[1]["code"] == 44

    status, recognized = _request(port, "POST", "/api/v1/recognition/recognize?face_plugins=calculator", key,
                                  body={"file": b64})
    embedding = recognized["result"][0]["embedding"]
    status, ranked = _request(port, "POST", "/api/v1/recognition/embeddings/recognize?prediction_count=-1", key,
                              body={"embeddings": [embedding]})
    assert status == 200 and ranked["result"][0]["similarities"][0]["subject"] == "erin"
    assert ranked["result"][0]["similarities"][0]["similarity"] == 1.0
    status, versus = _request(port, "POST", f"/api/v1/recognition/embeddings/faces/{ids[0]}/verify", key,
                              body={"embeddings": [embedding, [1.0] * 512]})
    assert status == 200 and versus["result"][0]["similarity"] == 1.0 and len(versus["result"]) == 2
    status, both = _request(port, "POST", "/api/v1/verification/embeddings/verify", DETECTION,
                            body={"source": embedding, "targets": [embedding]})
    assert status == 200 and both["result"][0]["similarity"] == 1.0
    assert _request(port, "POST", "/api/v1/verification/embeddings/verify", DETECTION,
                    body={"source": [1, 2], "targets": [embedding]}) [0] == 400
    status, by_vector = _request(port, "POST", "/api/v1/recognition/faces?subject=frank", key,
                                 body={"embedding": embedding})
    assert status == 201 and by_vector["subject"] == "frank"

    status, deleted = _request(port, "POST", "/api/v1/recognition/faces/delete", key,
                               body=[ids[0], ids[1], str(uuid.uuid4())])
    assert status == 200 and sorted(d["image_id"] for d in deleted) == sorted(ids[:2])
    assert _request(port, "GET", "/api/v1/recognition/faces?subject=erin", key)[1]["total_elements"] == 1
    assert _request(port, "DELETE", "/api/v1/recognition/faces?subject=erin", key)[1] == {"deleted": 1}
    assert _request(port, "DELETE", "/api/v1/recognition/faces?subject=erin", key)[1] == {"deleted": 0}
    _request(port, "DELETE", "/api/v1/recognition/subjects", key)


def test_compreface_http_errors(server):
    port, key = server.port, RECOGNITION
    assert _request(port, "GET", "/api/v1/recognition/subjects") == (400, {"message": "Missing header: x-api-key",
                                                                           "code": 20})
    status, body = _request(port, "POST", "/api/v1/recognition/subjects", key, body={"subject": ""})
    assert (status, body["code"]) == (400, 26)
    status, body = _request(port, "POST", "/api/v1/recognition/recognize?limit=-1", key,
                            files={"file": ("a.jpg", _photo("deepface/img1.jpg"))})
    assert (status, body["code"]) == (400, 26) and "limit" in body["message"]
    status, body = _request(port, "POST", "/api/v1/recognition/recognize?prediction_count=0", key,
                            files={"file": ("a.jpg", _photo("deepface/img1.jpg"))})
    assert (status, body["code"]) == (400, 26)
    status, body = _request(port, "POST", "/api/v1/recognition/recognize", key, files={"other": ("a.jpg", b"x")})
    assert (status, body["code"]) == (400, 34)
    status, body = _request(port, "POST", "/api/v1/recognition/faces?subject=x", key, body={"file": "%%%"})
    assert (status, body["code"]) == (400, 21)
    status, body = _request(port, "POST", "/api/v1/recognition/faces", key,
                            files={"file": ("a.jpg", _photo("deepface/img1.jpg"))})
    assert (status, body["code"]) == (400, 26)
    status, body = _request(port, "PUT", "/api/v1/recognition/subjects/nobody", key, body={"subject": "x"})
    assert (status, body["code"]) == (404, 42)
    status, body = _request(port, "DELETE", f"/api/v1/recognition/faces/{uuid.uuid4()}", key)
    assert (status, body["code"]) == (404, 44)
    # the key for every gallery addresses ADAFACE_COMPAT_GALLERY; the galleries stay apart
    _request(port, "POST", "/api/v1/recognition/subjects", EVERYWHERE, body={"subject": "in-shared"})
    assert _request(port, "GET", "/api/v1/recognition/subjects", EVERYWHERE)[1] == {"subjects": ["in-shared"]}
    assert "in-shared" not in _request(port, "GET", "/api/v1/recognition/subjects", key)[1]["subjects"]
    assert call(port, "GET", "/v1/galleries/shared/identities", headers={"X-API-Key": EVERYWHERE})[0] == 200


def test_compreface_http_ids_stay_in_their_gallery_merges_and_edge_cases(server, tmp_path):
    port = server.port
    one = _photo("deepface/img1.jpg")
    status, added = _request(port, "POST", "/api/v1/recognition/faces?subject=gina", RECOGNITION,
                             files={"file": ("a.jpg", one)})
    assert status == 201
    image = added["image_id"]
    # the same id through a key of another gallery: not found, nothing deleted
    for method, path in (("GET", f"/api/v1/recognition/faces/{image}/img"),
                         ("DELETE", f"/api/v1/recognition/faces/{image}")):
        assert _request(port, method, path, EVERYWHERE)[1]["code"] == 44, path
    status, body = _request(port, "POST", f"/api/v1/recognition/faces/{image}/verify", EVERYWHERE,
                            files={"file": ("a.jpg", one)})
    assert (status, body["code"]) == (404, 44)
    assert _request(port, "POST", "/api/v1/recognition/faces/delete", EVERYWHERE, body=[image]) == (200, [])
    assert _request(port, "GET", "/api/v1/recognition/faces?subject=gina", RECOGNITION)[1]["total_elements"] == 1
    # a gallery nothing was written to yet: its subjects and examples are not found, with their codes
    assert _request(port, "DELETE", "/api/v1/recognition/subjects/x", "fresh-key") == \
        (404, {"message": "Subject x not found", "code": 42})
    assert _request(port, "GET", f"/api/v1/recognition/faces/{image}/img", "fresh-key")[1]["code"] == 44
    assert _request(port, "GET", "/api/v1/recognition/subjects", "fresh-key") == (200, {"subjects": []})
    # merging two subjects that share a photo keeps it once
    _request(port, "POST", "/api/v1/recognition/faces?subject=gina2", RECOGNITION, files={"file": ("a.jpg", one)})
    _request(port, "POST", "/api/v1/recognition/faces?subject=gina2", RECOGNITION,
             files={"file": ("b.jpg", _photo("deepface/img2.jpg"))})
    assert _request(port, "PUT", "/api/v1/recognition/subjects/gina2", RECOGNITION,
                    body={"subject": "gina", "api_endpoint": "gina2"}) == (200, {"updated": True})
    listed = _request(port, "GET", "/api/v1/recognition/faces?subject=gina", RECOGNITION)[1]
    assert listed["total_elements"] == 2
    assert _request(port, "PUT", "/api/v1/recognition/subjects/gina", RECOGNITION, body={"subject": "gina"}) == \
        (200, {"updated": False})
    # bad values: clear 400s
    for query in ("page=4611686018427387903&size=1000", "status=maybe", "page=-1"):
        status, body = _request(port, "GET" if "page" in query else "POST",
                                "/api/v1/recognition/" + ("faces?" if "page" in query else "recognize?") + query,
                                RECOGNITION, files=None if "page" in query else {"file": ("a.jpg", one)})
        assert (status, body["code"]) == (400, 26), (query, body)
    status, body = _request(port, "POST", "/api/v1/recognition/embeddings/recognize", RECOGNITION,
                            body={"embeddings": [[1e200] * 512]})
    assert (status, body["code"]) == (400, 26)
    assert _request(port, "GET", "/api/v1/recognition/subjects/%FF", RECOGNITION)[0] in (400, 405)
    assert _request(port, "DELETE", "/api/v1/recognition/subjects/%FF", RECOGNITION)[1]["code"] == 26
    # an aligned crop with detect_faces=false; the verification service with JSON bodies
    crop = (FACEDATA / "aligned" / "img1_aligned.jpg").read_bytes()
    status, body = _request(port, "POST", "/api/v1/recognition/recognize?detect_faces=false", RECOGNITION,
                            files={"file": ("c.jpg", crop)})
    assert status == 200 and body["result"][0]["box"] == {"probability": 1.0, "x_max": 112, "y_max": 112,
                                                          "x_min": 0, "y_min": 0}
    b64 = base64.b64encode(one).decode()
    status, body = _request(port, "POST", "/api/v1/verification/verify", DETECTION,
                            body={"source_image": b64, "target_image": b64})
    assert status == 200 and body["result"][0]["face_matches"][0]["similarity"] == 1.0
    _request(port, "DELETE", "/api/v1/recognition/subjects", RECOGNITION)


def test_compreface_routes_are_in_the_openapi_document(server):
    status, spec = call(server.port, "GET", "/openapi.json")
    paths = set(spec["paths"])
    for path in ("/api/v1/recognition/recognize", "/api/v1/recognition/faces", "/api/v1/recognition/subjects",
                 "/api/v1/recognition/subjects/{subject}", "/api/v1/recognition/faces/{image}/img",
                 "/api/v1/recognition/faces/{image}/verify", "/api/v1/recognition/embeddings/recognize",
                 "/api/v1/detection/detect", "/api/v1/verification/verify", "/v1/vision/face",
                 "/v1/vision/face/register", "/v1/vision/face/recognize", "/v1/vision/face/list",
                 "/v1/vision/face/delete", "/v1/vision/face/match"):
        assert path in paths, path


# -- DeepStack -------------------------------------------------------------------------------------

def test_deepstack_python_client_detect_register_recognize_list(server):
    from deepstack.core import DeepstackException, DeepstackFace, get_recognized_faces
    face = DeepstackFace(ip="127.0.0.1", port=server.port, api_key=DEEPSTACK, timeout=60)
    one, two, other = _photo("deepface/img1.jpg"), _photo("deepface/img2.jpg"), _photo("deepface/img3.jpg")
    [detected] = face.detect(one)
    assert set(detected) == {"confidence", "x_min", "y_min", "x_max", "y_max"}
    assert all(isinstance(detected[k], int) for k in ("x_min", "y_min", "x_max", "y_max"))
    assert len(face.detect(_two_faces())) == 2
    assert face.register("alice", one) == "face added"
    assert face.register("alice", two) == "face updated"
    assert face.register("bob", other) == "face added"
    assert face.get_registered_faces() == ["alice", "bob"]
    [known] = face.recognize(one)
    assert known["userid"] == "alice" and known["confidence"] == 1.0
    both = get_recognized_faces(face.recognize(_two_faces()))      # found again in another image
    assert set(both) == {"alice", "bob"} and min(both.values()) > 90
    with pytest.raises(DeepstackException, match="400"):
        face.register("carol", _blank())                               # no face: 400, as DeepStack answers
    with pytest.raises(DeepstackException, match="401"):
        DeepstackFace(ip="127.0.0.1", port=server.port, api_key="wrong", timeout=60).recognize(one)
    with pytest.raises(DeepstackException, match="401"):
        DeepstackFace(ip="127.0.0.1", port=server.port, timeout=60).register("x", one)   # keys are configured
    assert face.recognize(_blank()) == []


def _blank() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (300, 300), "grey").save(buf, "PNG")
    return buf.getvalue()


def test_deepstack_http_fields_and_errors(server):
    port = server.port
    import requests
    boundary = "ch0nked"
    chunked = (_form_start(DEEPSTACK, boundary).replace(b'name="image"; filename="a.jpg"', b'name="userid"')
               + b"chunky\r\n" + f"--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; "
               f"filename=\"a.jpg\"\r\n\r\n".encode() + _photo("deepface/img5.jpg") + f"\r\n--{boundary}--\r\n".encode())
    r = requests.post(f"http://127.0.0.1:{port}/v1/vision/face/register", data=iter([chunked[:1000], chunked[1000:]]),
                      headers={"Content-Type": f"multipart/form-data; boundary={boundary}"}, timeout=60)
    assert (r.status_code, r.json()) == (200, {"success": True, "message": "face added"})     # a chunked upload
    one, other = _photo("deepface/img1.jpg"), _photo("deepface/img3.jpg")
    form = {"api_key": DEEPSTACK}
    status, body = _request(port, "POST", "/v1/vision/face/register", data={**form, "userid": "dora"},
                            files={"image1": ("a.jpg", one), "image2": ("b.jpg", _blank())})
    assert (status, body) == (200, {"success": True, "message": "face added"})
    assert _request(port, "POST", "/v1/vision/face/register", data=form, files={"image": ("a.jpg", one)}) == \
        (400, {"success": False, "error": "userid not specified"})
    assert _request(port, "POST", "/v1/vision/face/register", data={**form, "userid": "x"}) == \
        (400, {"success": False, "error": "No valid image file found"})
    assert _request(port, "POST", "/v1/vision/face/recognize", data=form, files={"image": ("a.jpg", b"junk")}) == \
        (400, {"success": False, "error": "invalid image"})
    status, body = _request(port, "POST", "/v1/vision/face/recognize", data={**form, "min_confidence": "2"},
                            files={"image": ("a.jpg", one)})
    assert (status, body) == (400, {"success": False, "error": "min_confidence cannot be greater than 1"})
    status, body = _request(port, "POST", "/v1/vision/face/recognize", data={**form, "min_confidence": "1"},
                            files={"image": ("a.jpg", _photo("deepface/img4.jpg"))})
    assert status == 200 and body["predictions"][0]["userid"] == "unknown"
    assert body["predictions"][0]["confidence"] == 0
    status, body = _request(port, "POST", "/v1/vision/face/", data=form, files={"image": ("a.jpg", one)})
    assert status == 200 and len(body["predictions"]) == 1
    status, body = _request(port, "POST", "/v1/vision/face/match", data=form,
                            files={"image1": ("a.jpg", one), "image2": ("b.jpg", one)})
    assert (status, body) == (200, {"success": True, "similarity": 1.0})
    status, body = _request(port, "POST", "/v1/vision/face/match", data=form, files={"image1": ("a.jpg", one)})
    assert (status, body["success"]) == (400, False) and "two" in body["error"]
    status, body = _request(port, "POST", "/v1/vision/face/match", data=form,
                            files={"image1": ("a.jpg", one), "image2": ("b.jpg", _blank())})
    assert (status, body) == (400, {"success": False, "error": "no face found"})
    # the key in a header works as on every route; admin_key as well as api_key
    listed = _request(port, "POST", "/v1/vision/face/list", key=DEEPSTACK)[1]["faces"]
    assert "dora" in listed and listed == sorted(listed)
    assert _request(port, "POST", "/v1/vision/face/list", data={"admin_key": DEEPSTACK})[1]["faces"] == listed
    assert _request(port, "POST", "/v1/vision/face/delete", data={**form, "userid": "dora"}) == (200, {"success": True})
    assert _request(port, "POST", "/v1/vision/face/delete", data={**form, "userid": "dora"}) == (200, {"success": True})
    assert _request(port, "POST", "/v1/vision/face/list", data=form) == \
        (200, {"success": True, "faces": [n for n in listed if n != "dora"]})
    assert _request(port, "POST", "/v1/vision/face/list", data={"api_key": "wrong"}) == \
        (401, {"success": False, "error": "Incorrect api key"})


def _form_start(key: str, boundary: str = "b0undary") -> bytes:
    return (f"--{boundary}\r\nContent-Disposition: form-data; name=\"api_key\"\r\n\r\n{key}\r\n"
            f"--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"a.jpg\"\r\n\r\n").encode()


def _send_start(port: int, key: str, sock) -> None:
    """A recognize request declaring a 20 MB multipart body, of which the key field and 100 kB are sent."""
    head = _form_start(key)
    sock.sendall((f"POST /v1/vision/face/recognize HTTP/1.1\r\nHost: x\r\nContent-Length: {len(head) + (20 << 20)}"
                  "\r\nContent-Type: multipart/form-data; boundary=b0undary\r\n\r\n").encode() + head + b"\0" * 100_000)


def test_deepstack_key_in_the_body_is_found_before_the_rest_is_read(server):
    """The form's ``api_key`` decides before the upload is accepted: a valid one makes the server
    wait for the rest of the 20 MB (no answer yet), a wrong one is refused at once with most of
    it unsent."""
    import socket
    with socket.create_connection(("127.0.0.1", server.port), timeout=3) as sock:
        _send_start(server.port, DEEPSTACK, sock)
        with pytest.raises(socket.timeout):
            sock.recv(65536)                      # accepted: waiting for the body
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
        _send_start(server.port, "wrong", sock)
        answer = b""
        while b"\r\n\r\n" not in answer or len(answer.split(b"\r\n\r\n", 1)[1]) < _length(answer):
            chunk = sock.recv(65536)
            assert chunk, f"the server closed the connection: {answer!r}"
            answer += chunk
    head, body = answer.decode("latin-1").split("\r\n\r\n", 1)
    assert head.startswith("HTTP/1.1 401") and json.loads(body) == {"success": False, "error": "Incorrect api key"}


def _length(answer: bytes) -> int:
    for line in answer.split(b"\r\n\r\n", 1)[0].split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            return int(line.split(b":", 1)[1])
    return 0
