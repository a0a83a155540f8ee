"""The HTTP API through Flask's test client: every endpoint, every error code, the auth matrix.

One synthetic IR-18 extractor (random weights, CPU) is built per module and shared by every app
the tests create, so an app costs only its warm-up embedding. Photos are read in place from
``../shared/facedata``; tests that need a face skip where it is absent.
"""
import base64
import copy
import functools
import io
import re
import time

import numpy as np
import pytest
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from AdaFaceFeature import AdaFaceFeature
from config import Settings
from adaface.options import SCOPES
from flask_http_server import OPEN_ROUTES, create_app
from conftest import photo

COMPAT_JSON = ("/b64_represent_json", "/byte_represent_json", "/represent_json")
COMPAT_BYTES = ("/b64_represent_byte", "/byte_represent_byte", "/represent_bytes")
B64_ROUTES = ("/b64_represent_json", "/b64_represent_byte")
IMAGE_ROUTES = COMPAT_JSON + COMPAT_BYTES + ("/v1/embed",)
POST_ROUTES = IMAGE_ROUTES + ("/v1/verify",)
OCTET = "application/octet-stream"
FORM = "application/x-www-form-urlencoded"
K1, K2 = "k1-5ecret-7f3a9c", "k2-5ecret-91bc02"


# -- images ------------------------------------------------------------------------------------



def encode(arr: np.ndarray, fmt: str = "JPEG") -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, fmt)
    return buf.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


GREY = encode(np.full((480, 640, 3), 128, np.uint8))  # a valid photo without a face


def two_faces() -> bytes:
    """img1 and img2 pasted side by side on a grey canvas (two different-sized faces)."""
    left, right = (Image.open(io.BytesIO(photo(n))).convert("RGB") for n in ("img1.jpeg", "img2.jpeg"))
    canvas = Image.new("RGB", (left.width + right.width, max(left.height, right.height)), (128, 128, 128))
    canvas.paste(left, (0, 0))
    canvas.paste(right, (left.width, 0))
    buf = io.BytesIO()
    canvas.save(buf, "PNG")
    return buf.getvalue()


# -- apps ----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def extractor():
    return AdaFaceFeature("synthetic", arch="ir_18", device="cpu")


def wait_ready(app, timeout: float = 60.0):
    client = app.test_client()
    deadline = time.monotonic() + timeout
    while client.get("/readyz").status_code != 200:
        assert time.monotonic() < deadline, client.get("/readyz").get_json()
        time.sleep(0.02)
    return app


@pytest.fixture(scope="module")
def make_app(extractor):
    """Factory: an app with synthetic IR-18 settings plus ``overrides``, ready to serve."""
    def make(extractor_=None, **overrides):
        settings = Settings(**{"open_galleries": True, "weights": "synthetic", "arch": "ir_18", "device": "cpu", **overrides})
        return wait_ready(create_app(settings, extractor=extractor_ or extractor))
    return make


@pytest.fixture(scope="module")
def app(make_app):
    return make_app()


@pytest.fixture
def client(app):
    return app.test_client()


def check_error(response, status: int, code: str) -> dict:
    """The response is ``{"error": {"code", "message"}}`` JSON with ``status``; returns the error."""
    text = response.get_data(as_text=True)
    assert response.status_code == status, text
    assert response.mimetype == "application/json", text
    assert "Traceback" not in text
    error = response.get_json()["error"]
    assert error["code"] == code, text
    assert isinstance(error["message"], str) and error["message"]
    return error


def embedding_of(extractor, image: bytes, **options) -> np.ndarray:
    faces = extractor.embed_image(image, **options)
    assert faces
    return faces[0].embedding


# -- the original service's endpoints ----------------------------------------------------------

def compat_body(route: str, image: bytes):
    return b64(image) if route in B64_ROUTES else image


@pytest.mark.parametrize("route", COMPAT_JSON)
def test_compat_json(client, extractor, route):
    image = photo("img1.jpeg")
    r = client.post(route, data=compat_body(route, image))
    assert r.status_code == 200, r.get_data(as_text=True)
    assert r.mimetype == "application/json"
    body = r.get_json()
    assert isinstance(body, list) and len(body) == 1 and len(body[0]) == 512
    np.testing.assert_allclose(np.float32(body[0]), embedding_of(extractor, image), atol=1e-6)


@pytest.mark.parametrize("route", COMPAT_BYTES)
def test_compat_bytes(client, extractor, route):
    image = photo("img1.jpeg")
    r = client.post(route, data=compat_body(route, image))
    assert r.status_code == 200, r.get_data(as_text=True)
    assert r.mimetype == OCTET
    assert len(r.data) == 2048
    values = np.frombuffer(r.data, "<f4")
    twin = client.post(route.replace("_bytes", "_json").replace("_byte", "_json"), data=compat_body(route, image))
    np.testing.assert_array_equal(values, np.float32(twin.get_json()[0]))
    np.testing.assert_allclose(values, embedding_of(extractor, image), atol=1e-6)


@pytest.mark.parametrize("route", COMPAT_JSON + COMPAT_BYTES)
def test_compat_headers(client, extractor, route):
    image = photo("img2.jpeg")
    face = extractor.embed_image(image)[0]
    r = client.post(route, data=compat_body(route, image))
    assert r.status_code == 200
    assert r.headers["X-Embedding-Dim"] == "512"
    assert float(r.headers["X-Embedding-Norm"]) == pytest.approx(face.norm, abs=1e-3)
    box = [float(v) for v in r.headers["X-Face-Box"].split(",")]
    np.testing.assert_allclose(box, face.box, atol=0.06)
    assert r.headers["X-AdaFace-Weights"] == "synthetic"


@pytest.mark.parametrize("route", ("/represent_json", "/represent_bytes"))
def test_represent_takes_raw_and_base64(client, route):
    image = photo("img1.jpeg")
    raw = client.post(route, data=image, content_type=OCTET)
    text = client.post(route, data=b64(image), content_type="text/plain")
    assert raw.status_code == text.status_code == 200
    assert raw.data == text.data


@pytest.mark.parametrize("route", ("/b64_represent_json", "/represent_json"))
def test_base64_variants(client, route):
    image = photo("img1.jpeg")
    expected = client.post(route, data=b64(image)).get_json()
    wrapped = base64.encodebytes(image).decode()  # 76-character lines
    assert "\n" in wrapped
    for body in ("data:image/jpeg;base64," + b64(image), wrapped, wrapped.replace("\n", "\r\n"),
                 "data:image/jpeg;base64,\n" + wrapped):
        r = client.post(route, data=body)
        assert r.status_code == 200, r.get_data(as_text=True)
        assert r.get_json() == expected


@pytest.mark.parametrize("route", B64_ROUTES + ("/represent_json", "/v1/embed"))
def test_form_urlencoded_base64_body(client, extractor, route):
    """The original clients: requests.post(url, data=<base64 text>) or curl --data-raw."""
    image = photo("img1.jpeg")
    text = b64(image)
    assert "+" in text or "/" in text  # characters a form parser would mangle
    r = client.post(route, data=text, content_type=FORM)
    assert r.status_code == 200, r.get_data(as_text=True)
    if r.mimetype == OCTET:
        values = np.frombuffer(r.data, "<f4")
    else:
        body = r.get_json()
        values = np.float32(body[0] if isinstance(body, list) else body["faces"][0]["embedding"])
    np.testing.assert_allclose(values, embedding_of(extractor, image), atol=1e-6)


# -- /v1/embed -------------------------------------------------------------------------------------

def test_embed_single_forms_agree(client, extractor):
    image = photo("img1.jpeg")
    answers = [
        client.post("/v1/embed", data=image, content_type=OCTET),
        client.post("/v1/embed", data=b64(image), content_type="text/plain"),
        client.post("/v1/embed", json={"image": b64(image)}),
        client.post("/v1/embed", data={"file": (io.BytesIO(image), "img1.jpeg")}, content_type="multipart/form-data"),
    ]
    bodies = []
    for r in answers:
        assert r.status_code == 200, r.get_data(as_text=True)
        bodies.append(r.get_json())
    assert all(b == bodies[0] for b in bodies)
    body = bodies[0]
    assert body["model"] == "adaface-ir_18" and body["dim"] == 512
    assert (body["width"], body["height"]) == (259, 194)
    assert body["aligned_input"] is False
    [face] = body["faces"]
    assert set(face) == {"embedding", "norm", "box", "score", "landmarks"}
    want = extractor.embed_image(image)[0]
    np.testing.assert_allclose(np.float32(face["embedding"]), want.embedding, atol=1e-6)
    assert face["norm"] == pytest.approx(want.norm, rel=1e-5)
    assert np.linalg.norm(face["embedding"]) == pytest.approx(1.0, abs=1e-4)
    assert len(face["box"]) == 4 and 0 < face["score"] <= 1
    assert np.shape(face["landmarks"]) == (5, 2)
    assert answers[0].headers["X-Embedding-Dim"] == "512"
    assert answers[0].headers["X-AdaFace-Weights"] == "synthetic"


def test_embed_batch_json_reports_each_image(client):
    image = photo("img1.jpeg")
    r = client.post("/v1/embed", json={"images": [b64(image), "not base64 at all!", b64(GREY)]})
    assert r.status_code == 200, r.get_data(as_text=True)
    good, bad, empty = r.get_json()["results"]
    single = client.post("/v1/embed", data=image).get_json()
    assert "error" not in good and good["faces"] == single["faces"]
    assert bad == {"error": {"code": "bad_base64", "message": bad["error"]["message"], "status": 400}}
    assert "faces" not in bad
    assert empty["error"]["code"] == "no_face" and empty["error"]["status"] == 422


def test_embed_multipart_files_make_a_batch(client):
    files = {"a": (io.BytesIO(photo("img1.jpeg")), "a.jpeg"), "b": (io.BytesIO(photo("img2.jpeg")), "b.jpeg"),
             "c": (io.BytesIO(b"garbage"), "c.txt")}
    r = client.post("/v1/embed", data=files, content_type="multipart/form-data")
    assert r.status_code == 200, r.get_data(as_text=True)
    results = r.get_json()["results"]
    assert [len(x.get("faces", [])) for x in results] == [1, 1, 0]
    assert results[2]["error"]["code"] in ("bad_base64", "not_an_image")
    one = client.post("/v1/embed", data={"images": (io.BytesIO(photo("img1.jpeg")), "a.jpeg")},
                      content_type="multipart/form-data")
    assert len(one.get_json()["results"]) == 1  # a field named "images" is a batch of one


def test_embed_faces_all_and_max_faces(client):
    image = two_faces()
    every = client.post("/v1/embed?faces=all", data=image).get_json()["faces"]
    assert len(every) == 2
    assert every[0]["score"] >= every[1]["score"]
    assert len(client.post("/v1/embed?faces=all&max_faces=1", data=image).get_json()["faces"]) == 1
    largest = client.post("/v1/embed", data=image).get_json()["faces"]
    assert len(largest) == 1
    areas = [(f["box"][2] - f["box"][0]) * (f["box"][3] - f["box"][1]) for f in every]
    assert largest[0]["box"] == every[int(np.argmax(areas))]["box"]
    top = client.post("/v1/embed?faces=score", data=image).get_json()["faces"]
    assert top[0]["box"] == every[0]["box"]


def test_embed_align_modes(client, extractor):
    crop = photo("img1_aligned.jpg")
    r = check_error(client.post("/v1/embed?align=never", data=photo("img1.jpeg")), 422, "not_aligned")
    assert "112" in r["message"]
    body = client.post("/v1/embed?align=auto", data=crop).get_json()
    assert body["aligned_input"] is True and (body["width"], body["height"]) == (112, 112)
    [face] = body["faces"]
    assert face["box"] is None and face["score"] is None and face["landmarks"] is None
    np.testing.assert_allclose(np.float32(face["embedding"]), embedding_of(extractor, crop), atol=1e-6)
    never = client.post("/v1/embed?align=never", data=crop).get_json()
    assert never["faces"][0]["embedding"] == face["embedding"]
    r = client.post("/b64_represent_json?align=never", data=b64(crop))
    assert r.status_code == 200 and "X-Face-Box" not in r.headers


def test_embed_crops_are_what_the_network_embedded(client):
    """crops=true: each face's aligned 112x112 crop as base64 PNG; embedding that crop again (as an
    aligned input) gives the same embedding. Without it no crop is sent."""
    every = client.post("/v1/embed?faces=all&crops=true", data=two_faces()).get_json()["faces"]
    assert len(every) == 2
    for face in every:
        crop = base64.b64decode(face["crop"], validate=True)
        assert crop[:8] == b"\x89PNG\r\n\x1a\n"
        assert Image.open(io.BytesIO(crop)).size == (112, 112)
        [again] = client.post("/v1/embed?align=never", data=crop).get_json()["faces"]
        assert float(np.dot(again["embedding"], face["embedding"])) > 0.9999
    assert every[0]["crop"] != every[1]["crop"]
    assert "crop" not in client.post("/v1/embed?faces=all", data=two_faces()).get_json()["faces"][0]
    batch = client.post("/v1/embed?crops=true", json={"images": [b64(photo("img1.jpeg")), "!!"]}).get_json()
    assert batch["results"][0]["faces"][0]["crop"] and "error" in batch["results"][1]
    check_error(client.post("/v1/embed?crops=maybe", data=photo("img1.jpeg")), 400, "bad_option")


def test_embed_octet_stream_packs_every_face(client):
    images = [b64(photo("img1.jpeg")), "!!", b64(two_faces())]
    as_json = client.post("/v1/embed?faces=all", json={"images": images}).get_json()["results"]
    r = client.post("/v1/embed?faces=all", json={"images": images}, headers={"Accept": OCTET})
    assert r.status_code == 200 and r.mimetype == OCTET
    assert r.headers["X-Embedding-Count"] == "3"
    assert r.headers["X-Faces-Per-Image"] == "1,0,2"
    assert r.headers["X-Embedding-Dim"] == "512"
    packed = np.frombuffer(r.data, "<f4").reshape(-1, 512)
    expected = [f["embedding"] for x in as_json for f in x.get("faces", [])]
    np.testing.assert_array_equal(packed, np.float32(expected))
    one = client.post("/v1/embed", data=photo("img2.jpeg"), headers={"Accept": OCTET})
    assert one.headers["X-Faces-Per-Image"] == "1" and len(one.data) == 2048


# -- /v1/verify ------------------------------------------------------------------------------------

def test_verify_forms_and_similarity(client):
    a, b = photo("img1.jpeg"), photo("img2.jpeg")
    answers = [
        client.post("/v1/verify", json={"image1": b64(a), "image2": b64(b)}),
        client.post("/v1/verify", json={"images": [b64(a), b64(b)]}),
        client.post("/v1/verify", data={"image1": (io.BytesIO(a), "a.jpeg"), "image2": (io.BytesIO(b), "b.jpeg")},
                    content_type="multipart/form-data"),
    ]
    for r in answers:
        assert r.status_code == 200, r.get_data(as_text=True)
    bodies = [r.get_json() for r in answers]
    assert all(x == bodies[0] for x in bodies)
    ea, eb = (np.float32(client.post("/v1/embed", data=x).get_json()["faces"][0]["embedding"]) for x in (a, b))
    body = bodies[0]
    assert body["similarity"] == pytest.approx(float(np.dot(ea, eb)), abs=1e-5)
    assert body["threshold"] == 0.35
    assert body["same_person"] is (body["similarity"] >= 0.35)
    assert body["model"] == "adaface-ir_18" and len(body["faces"]) == 2


def test_verify_threshold_query(client):
    pair = {"image1": b64(photo("img1.jpeg")), "image2": b64(photo("img2.jpeg"))}
    similarity = client.post("/v1/verify", json=pair).get_json()["similarity"]
    below, above = max(-1.0, round(similarity - 0.01, 4)), min(1.0, round(similarity + 0.01, 4))
    low = client.post(f"/v1/verify?threshold={below}", json=pair).get_json()
    high = client.post(f"/v1/verify?threshold={above}", json=pair).get_json()
    assert (low["threshold"], low["same_person"]) == (below, True)
    assert (high["threshold"], high["same_person"]) == (above, False)
    self_pair = client.post("/v1/verify?threshold=0.99", json={"images": [pair["image1"]] * 2}).get_json()
    assert self_pair["similarity"] == pytest.approx(1.0, abs=1e-5) and self_pair["same_person"] is True


def test_verify_errors(client):
    face = b64(photo("img1.jpeg"))
    error = check_error(client.post("/v1/verify", json={"image1": face, "image2": b64(GREY)}), 422, "no_face")
    assert "image2" in error["message"]
    error = check_error(client.post("/v1/verify", json={"image1": "@@@", "image2": face}), 400, "bad_base64")
    assert "image1" in error["message"]
    check_error(client.post("/v1/verify", json={"images": [face]}), 400, "need_two_images")
    check_error(client.post("/v1/verify", json={"images": [face] * 3}), 400, "need_two_images")
    r = client.post("/v1/verify", data={"image1": (io.BytesIO(photo("img1.jpeg")), "a.jpeg")},
                    content_type="multipart/form-data")
    check_error(r, 400, "need_two_images")
    assert client.post("/v1/verify", json={"image1": face}).status_code == 400
    check_error(client.post("/v1/verify", data=photo("img1.jpeg"), content_type=OCTET), 415, "unsupported_media_type")


# -- errors ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("route", IMAGE_ROUTES)
def test_client_errors_on_image_routes(client, route):
    check_error(client.post(route, data=b""), 400, "empty_body")
    check_error(client.post(route, data="this is not base64!"), 400, "bad_base64")
    check_error(client.post(route, data=b64(b"plain text, no image here " * 4)), 400, "not_an_image")
    check_error(client.post(route, data=bytes(range(128, 256)) * 4), 400, "not_an_image")
    check_error(client.post(route, data=b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n1 0 obj\n"), 415, "unsupported_format")
    svg = b'<?xml version="1.0"?><svg xmlns="http://www.w3.org/2000/svg" width="8" height="8"/>'
    check_error(client.post(route, data=svg), 415, "unsupported_format")
    check_error(client.post(route, data=GREY), 422, "no_face")
    check_error(client.post(route + "?faces=xyz", data=GREY), 400, "bad_option")
    check_error(client.post(route + "?max_faces=0", data=GREY), 400, "bad_option")
    check_error(client.post(route + "?align=sideways", data=GREY), 400, "bad_option")


@pytest.mark.parametrize("body", ["{not json", "[1, 2]", '{"images": "x"}', '{"images": []}', '{"images": [1]}',
                                  '{"image": null}', '{"other": 1}'])
def test_bad_json(client, body):
    check_error(client.post("/v1/embed", data=body, content_type="application/json"), 400, "bad_json")


def test_bad_options(client):
    pair = {"images": [b64(photo("img1.jpeg"))] * 2}
    for query in ("threshold=5", "threshold=-1.5", "threshold=abc", "faces=xyz", "max_faces=0", "max_faces=x",
                  "min_face_size=0"):
        check_error(client.post(f"/v1/verify?{query}", json=pair), 400, "bad_option")
    check_error(client.post("/v1/embed?max_faces=1001", data=photo("img1.jpeg")), 400, "bad_option")


def test_unknown_route_and_wrong_method(client):
    check_error(client.get("/nope"), 404, "not_found")
    check_error(client.post("/v2/embed", data=b"x"), 404, "not_found")
    for route in POST_ROUTES:
        r = check_error(client.get(route), 405, "method_not_allowed")
        assert "POST" in client.get(route).headers["Allow"]
    check_error(client.post("/livez"), 405, "method_not_allowed")


def test_body_over_limit(make_app):
    client = make_app(max_body_bytes=4096).test_client()
    big = photo("img2.jpeg")
    assert len(big) > 4096
    for route in IMAGE_ROUTES:
        check_error(client.post(route, data=big, content_type=OCTET), 413, "body_too_large")
    check_error(client.post("/v1/embed", json={"image": b64(big)}), 413, "body_too_large")
    check_error(client.post("/v1/verify", json={"images": [b64(big)] * 2}), 413, "body_too_large")
    r = client.post("/v1/embed", data={"f": (io.BytesIO(big), "a.jpeg")}, content_type="multipart/form-data")
    check_error(r, 413, "body_too_large")


def test_image_over_pixel_limit(make_app, extractor):
    small = copy.copy(extractor)  # the same model with a lower decode limit
    small.max_pixels = 20_000
    client = make_app(small, max_pixels=20_000).test_client()
    image = photo("img1.jpeg")  # 259×194 = 50,246 pixels; a 112×112 crop is 12,544
    for route in IMAGE_ROUTES:
        error = check_error(client.post(route, data=compat_body(route, image)), 413, "image_too_large")
        assert "20000" in error["message"]
    assert client.post("/v1/embed", data=photo("img1_aligned.jpg")).status_code == 200


def test_settings_max_pixels_applies_with_a_shared_extractor(make_app):
    """create_app(settings, extractor=...) must enforce settings.max_pixels, which /info reports."""
    app = make_app(max_pixels=10_000)
    client = app.test_client()
    assert client.get("/info").get_json()["limits"]["max_pixels"] == 10_000
    check_error(client.post("/v1/embed", data=photo("img1.jpeg")), 413, "image_too_large")


def test_too_many_images(make_app):
    client = make_app(max_images=2).test_client()
    crop = b64(photo("img1_aligned.jpg"))
    assert client.post("/v1/embed", json={"images": [crop] * 2}).status_code == 200
    error = check_error(client.post("/v1/embed", json={"images": [crop] * 3}), 413, "too_many_images")
    assert "2" in error["message"]
    files = {k: (io.BytesIO(photo("img1_aligned.jpg")), f"{k}.jpg") for k in "abc"}
    check_error(client.post("/v1/embed", data=files, content_type="multipart/form-data"), 413, "too_many_images")


def test_not_ready(make_app):
    app = make_app(warmup=False)
    app.extensions["adaface"].ready = False
    client = app.test_client()
    error = check_error(client.get("/readyz"), 503, "not_ready")
    assert "warming up" in error["message"]
    assert client.get("/readyz").headers["Retry-After"] == "2"
    for route in POST_ROUTES:
        r = client.post(route, data=GREY)
        check_error(r, 503, "not_ready")
        assert r.headers["Retry-After"]
    assert client.get("/livez").status_code == 200
    assert client.get("/metrics").status_code == 200
    info = client.get("/info")
    assert info.status_code == 200 and info.get_json()["ready"] is False


def test_failed_warm_up_is_reported_by_readyz(extractor):
    broken = copy.copy(extractor)

    def fail(crops):
        raise RuntimeError("simulated forward failure")

    broken.model = copy.copy(extractor.model)
    broken.model.forward = fail  # the forward every embedding goes through
    client = create_app(Settings(open_galleries=True, weights="synthetic", arch="ir_18"), extractor=broken).test_client()
    deadline = time.monotonic() + 30
    while "failed" not in client.get("/readyz").get_json()["error"]["message"]:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    error = check_error(client.get("/readyz"), 503, "not_ready")
    assert "simulated forward failure" in error["message"]
    check_error(client.post("/v1/embed", data=GREY), 503, "not_ready")


def test_busy(make_app):
    crop = b64(photo("img1_aligned.jpg"))
    app = make_app(max_queue=2)
    client, runner = app.test_client(), app.extensions["adaface"].runner
    # more images than the queue holds, on an idle server: the request runs alone, never "busy"
    assert client.post("/v1/embed", json={"images": [crop, crop, crop]}).status_code == 200
    runner._admit(2)  # other requests' images in flight: the queue is full
    try:
        for route in POST_ROUTES:
            body = {"images": [crop, crop]} if route == "/v1/verify" else {"image": crop}
            r = client.post(route, json=body)
            check_error(r, 503, "busy")
            assert r.headers["Retry-After"]
    finally:
        runner._release(2)
    runner._admit(1)
    try:
        check_error(client.post("/v1/embed", json={"images": [crop, crop]}), 503, "busy")  # 1 + 2 > 2
        assert client.post("/v1/embed", json={"image": crop}).status_code == 200           # 1 + 1 fits
    finally:
        runner._release(1)
    assert client.post("/v1/verify", json={"images": [crop, crop]}).status_code == 200


def _png_1x1() -> bytes:
    return encode(np.zeros((1, 1, 3), np.uint8), "PNG")


@functools.lru_cache(maxsize=1)
def garbage_bodies() -> dict:
    rng = np.random.default_rng(7)
    jpeg = encode(rng.integers(0, 256, (240, 320, 3), dtype=np.uint8))
    return {
        "random": rng.integers(0, 256, 4096, dtype=np.uint8).tobytes(),
        "huge_base64": base64.b64encode(rng.integers(0, 256, 3_000_000, dtype=np.uint8).tobytes()),
        "truncated_jpeg": jpeg[: len(jpeg) // 2],
        "jpeg_header_only": jpeg[:20],
        "png_1x1": _png_1x1(),
        "png_10000x1": encode(np.full((1, 10000, 3), 200, np.uint8), "PNG"),
        "png_1x10000": encode(np.full((10000, 1, 3), 200, np.uint8), "PNG"),
        "black_jpeg": encode(np.zeros((480, 640, 3), np.uint8)),
        "zero_bytes": bytes(2048),
        "empty_data_url": b"data:image/png;base64,",
        "padding_only": b"====",
        "non_ascii_text": "\u00e9t\u00e9".encode(),
        "json_text": b'{"image": 1}',
    }


@pytest.mark.parametrize("name", list(garbage_bodies()))
def test_garbage_never_gives_a_server_error(client, name):
    body = garbage_bodies()[name]
    requests = [(route, {"data": body}) for route in IMAGE_ROUTES]
    requests += [(route, {"data": body, "content_type": FORM}) for route in ("/b64_represent_json", "/v1/embed")]
    requests += [("/v1/verify", {"data": body}), ("/v1/verify", {"data": body, "content_type": "application/json"}),
                 ("/v1/verify", {"json": {"image1": b64(body), "image2": b64(body)}}),
                 ("/v1/verify?align=never", {"json": {"images": [b64(body), b64(body)]}}),
                 ("/v1/embed?align=never", {"data": body}), ("/v1/embed?faces=all", {"data": body}),
                 ("/v1/embed", {"data": {"f": (io.BytesIO(body), "x")}, "content_type": "multipart/form-data"})]
    for route, kwargs in requests:
        r = client.post(route, **kwargs)
        text = r.get_data(as_text=True)
        assert r.status_code < 500, (route, text)
        assert "Traceback" not in text
        if r.status_code != 200:
            error = r.get_json()["error"]
            assert error["code"] and error["message"], (route, text)
    r = client.post("/v1/embed", json={"images": [b64(body), b64(body)]})
    assert r.status_code == 200
    for entry in r.get_json()["results"]:
        assert "faces" in entry or entry["error"]["status"] < 500


# -- auth ------------------------------------------------------------------------------------------

def route_requests(app) -> dict:
    """A valid request for each route this file knows: {rule: (method, kwargs)}."""
    crop = photo("img1_aligned.jpg")
    known = {"/": ("GET", {}), "/livez": ("GET", {}), "/readyz": ("GET", {}), "/metrics": ("GET", {}),
             "/openapi.json": ("GET", {}), "/info": ("GET", {}),
             "/v1/embed": ("POST", {"data": crop}),
             "/v1/verify": ("POST", {"json": {"images": [b64(crop), b64(crop)]}})}
    known.update({r: ("POST", {"data": compat_body(r, crop)}) for r in COMPAT_JSON + COMPAT_BYTES})
    rules = {rule.rule for rule in app.url_map.iter_rules() if rule.endpoint != "static"}
    assert set(known) <= rules, "a route was removed: update route_requests"
    return known


def every_route(app) -> list:
    """(url, method) for every rule and method of ``app``, path variables filled with sample values."""
    def fill(match):
        return "1" if match.group(1) == "int" else "sample"

    found = []
    for rule in app.url_map.iter_rules():
        if rule.endpoint == "static":
            continue
        url = re.sub(r"<(?:(\w+)(?:\([^)]*\))?:)?\w+>", fill, rule.rule)
        found += [(rule.rule, url, m) for m in sorted(rule.methods - {"HEAD", "OPTIONS"})]
    return found


@pytest.fixture(scope="module")
def auth_app(make_app):
    return make_app(api_keys=f"{K1},{K2}", open_galleries=False)


def test_auth_matrix(auth_app):
    client = auth_app.test_client()
    accepted = [{"Authorization": f"Bearer {K1}"}, {"Authorization": K2}, {"X-API-Key": K1},
                {"Authorization": f"bearer  {K2} "}, {"Authorization": "Bearer wrong", "X-API-Key": K2}]
    rejected = [{}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {K1}"}, {"X-API-Key": K1[:-1]},
                {"Authorization": f"Bearer {K1}x"}, {"X-API-Key": f"{K1},{K2}"}, {"Authorization": "Bearer"},
                {"Authorization": f"Bearer {K1[:4]}"}]
    for rule, url, method in every_route(auth_app):  # galleries and later routes included
        for headers in rejected:
            r = client.open(url, method=method, headers=headers, data=b"")
            if rule in OPEN_ROUTES:
                assert r.status_code == 200, (rule, headers)
            elif rule.startswith("/ui/"):                # the console's files are open (no such file: 404)
                assert r.status_code == (200 if url == "/ui/" else 404), (rule, headers)
            elif rule.startswith("/api/v1/"):            # CompreFace's answers (tests/test_compat_clients.py)
                from serving.access import presented_key
                keyless = presented_key(headers) is None
                assert (r.status_code, r.get_json()["code"]) == ((400, 20) if keyless else (404, 10)), (rule, headers)
            elif rule.startswith("/v1/vision/"):         # DeepStack's
                assert (r.status_code, r.get_json()) == (401, {"success": False, "error": "Incorrect api key"})
            else:
                check_error(r, 401, "unauthorized")
                assert r.headers["WWW-Authenticate"] == "Bearer"
    for rule, (method, kwargs) in route_requests(auth_app).items():
        for headers in accepted:
            r = client.open(rule, method=method, headers=headers, **kwargs)
            assert r.status_code == 200, (rule, headers, r.get_data(as_text=True))


def test_auth_comes_before_other_errors(auth_app):
    client = auth_app.test_client()
    check_error(client.post("/v1/embed", data=b""), 401, "unauthorized")
    check_error(client.post("/v1/embed?faces=xyz", data=b"garbage"), 401, "unauthorized")
    check_error(client.get("/no/such/route"), 404, "not_found")   # no route: nothing to protect
    check_error(client.post("/v1/embed", data=b"", headers={"X-API-Key": K1}), 400, "empty_body")


def test_keys_are_never_echoed(auth_app):
    client = auth_app.test_client()
    responses = [client.get("/info", headers={"X-API-Key": K1}), client.get("/openapi.json"), client.get("/"),
                 client.get("/metrics"), client.post("/v1/embed", data=b"", headers={"Authorization": f"Bearer {K2}x"}),
                 client.post("/v1/embed", data=GREY, headers={"X-API-Key": K2})]
    for r in responses:
        text = r.get_data(as_text=True) + "".join(f"{k}: {v}\n" for k, v in r.headers.items())
        assert K1 not in text and K2 not in text
        assert K1[:8] not in text and K2[:8] not in text
    info = responses[0].get_json()
    assert info["auth"] == {"keys": 2, "keyless_scopes": []}
    assert not any("key" in k.lower() for k in info if k != "auth")


def test_api_keys_file(make_app, tmp_path):
    keys = tmp_path / "keys.txt"
    keys.write_text("# service keys\nfile-key-one\n\n   file-key-two  \n#file-key-commented\n")
    client = make_app(api_keys_file=str(keys), api_keys="env-key").test_client()
    for key in ("file-key-one", "file-key-two", "env-key"):
        assert client.get("/info", headers={"Authorization": f"Bearer {key}"}).status_code == 200
    for key in ("# service keys", "#file-key-commented", "file-key-commented", ""):
        check_error(client.get("/info", headers={"X-API-Key": key}), 401, "unauthorized")


def test_api_keys_file_indented_comment_is_not_a_key(make_app, tmp_path):
    keys = tmp_path / "keys.txt"
    keys.write_text("real-key\n  # indented comment\n")
    client = make_app(api_keys_file=str(keys)).test_client()
    assert client.get("/info", headers={"X-API-Key": "real-key"}).status_code == 200
    check_error(client.get("/info", headers={"X-API-Key": "# indented comment"}), 401, "unauthorized")


def test_no_keys_and_open_galleries_means_open(client):
    assert client.get("/info").get_json()["auth"] == {"keys": 0, "keyless_scopes": sorted(SCOPES)}
    assert client.post("/v1/embed", data=GREY).status_code == 422


# -- operations ------------------------------------------------------------------------------------

def test_gallery_search_settings_reach_the_galleries(make_app):
    search = make_app(ann_nprobe=33, ann_min_faces=1234).extensions["adaface_gallery"].search
    assert (search.nprobe, search.ann_min_faces) == (33, 1234)


def test_livez_readyz_index(client):
    assert client.get("/livez").get_json() == {"status": "alive"}
    ready = client.get("/readyz")
    assert ready.status_code == 200 and ready.get_json() == {"status": "ready", "model": "adaface-ir_18"}
    index = client.get("/").get_json()
    assert index["openapi"] == "/openapi.json" and index["model"] == "adaface-ir_18"


def test_info(client):
    r = client.get("/info")
    assert r.status_code == 200
    info = r.get_json()
    assert info["arch"] == "ir_18" and info["weights"] == "synthetic" and info["synthetic"] is True
    assert info["device"] == "cpu" and info["embedding_size"] == 512 and info["ready"] is True
    assert isinstance(info["threads"], int) and info["threads"] >= 1
    assert set(info["batching"]) == {"max_batch", "max_wait_ms", "max_queue"}
    assert info["batching"]["max_batch"] == 8
    for package in ("python", "torch", "numpy", "flask"):
        assert info["versions"][package]
    assert info["defaults"]["verify_threshold"] == 0.35
    assert info["limits"]["max_images"] == 32


def metric_samples(client) -> dict:
    r = client.get("/metrics")
    assert r.status_code == 200 and r.mimetype == "text/plain"
    return {s.name + str(sorted(s.labels.items())): s.value
            for family in text_string_to_metric_families(r.get_data(as_text=True)) for s in family.samples}


def test_metrics(make_app):
    client = make_app().test_client()
    crop = photo("img1_aligned.jpg")
    for _ in range(2):
        assert client.post("/v1/embed", data=crop).status_code == 200
    assert client.post("/v1/embed", json={"images": [b64(crop)] * 3}).status_code == 200
    assert client.post("/v1/embed", data=b"").status_code == 400
    assert client.post("/b64_represent_json", data=b64(crop)).status_code == 200
    client.get("/nope")
    samples = metric_samples(client)

    def requests_total(route, method, status):
        return samples.get("adaface_requests_total" + str(sorted({"route": route, "method": method,
                                                                    "status": status}.items())), 0)

    assert requests_total("/v1/embed", "POST", "200") == 3
    assert requests_total("/v1/embed", "POST", "400") == 1
    assert requests_total("/b64_represent_json", "POST", "200") == 1
    assert requests_total("unmatched", "GET", "404") == 1
    assert samples["adaface_batch_size_count[]"] >= 4  # the warm-up forward and ours
    assert samples["adaface_batch_size_sum[]"] >= samples["adaface_batch_size_count[]"] + 2  # the batch of 3
    assert samples["adaface_faces_per_image_count[]"] >= 6
    assert samples["adaface_queue_depth[]"] == 0
    assert "adaface_request_seconds_count[('route', '/v1/embed')]" in samples
    assert "adaface_forward_seconds_count[]" in samples
