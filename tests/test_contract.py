"""The answers match their declared models, the document is valid OpenAPI 3.1, and the forward
is cut to size in one place (``ADAFACE_MAX_BATCH`` honoured up to its value).

Every route is called with a request that succeeds, and its JSON answer is validated against the
pydantic model its ``@document`` declares for that status: the same declaration the OpenAPI
document is built from. The models forbid extra fields, so an answer that gains or loses a field
without its model fails here.
"""
import base64
import io
import re

import numpy as np
import pytest
from openapi_spec_validator import validate

from AdaFaceFeature import AdaFaceFeature
from config import Settings
from conftest import photo
from flask_http_server import create_app
from serving.openapi import openapi_path
from test_gallery_support import crop_png, grey_png

EMBED_ROUTES = ("/b64_represent_json", "/byte_represent_json", "/represent_json")


@pytest.fixture(scope="module")
def extractor():
    return AdaFaceFeature("synthetic", arch="ir_18", device="cpu")


@pytest.fixture
def app(tmp_path, extractor):
    settings = Settings(open_galleries=True, weights="synthetic", arch="ir_18", device="cpu", warmup=False,
                        gallery_url=f"sqlite:///{tmp_path}/g.db")
    app = create_app(settings, extractor=extractor)
    yield app
    app.extensions["adaface_gallery"].close()


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _calls(face: bytes, group: bytes):
    """(method, path, request keyword arguments) reaching every route with a success."""
    return [
        ("GET", "/", {}), ("GET", "/livez", {}), ("GET", "/readyz", {}), ("GET", "/info", {}),
        ("GET", "/metrics", {}), ("GET", "/openapi.json", {}), ("GET", "/ui/", {}), ("GET", "/ui/js/main.js", {}),
        ("POST", "/b64_represent_json", {"data": _b64(face)}), ("POST", "/byte_represent_json", {"data": face}),
        ("POST", "/b64_represent_byte", {"data": _b64(face)}), ("POST", "/byte_represent_byte", {"data": face}),
        ("POST", "/represent_json", {"json": {"image": _b64(face)}}), ("POST", "/represent_bytes", {"data": face}),
        ("POST", "/v1/embed?faces=all", {"data": group}),
        ("POST", "/v1/embed", {"json": {"images": [_b64(face), _b64(grey_png())]}}),
        ("POST", "/v1/verify", {"json": {"image1": _b64(face), "image2": _b64(group)}}),
        ("POST", "/v1/galleries", {"json": {"name": "g"}}),
        ("GET", "/v1/galleries", {}), ("GET", "/v1/galleries/g", {}),
        ("POST", "/v1/galleries/g/identities/a/faces", {"json": {"images": [_b64(crop_png(1)), _b64(grey_png())],
                                                                 "metadata": {"team": "x"}}}),
        ("POST", "/v1/galleries/g/identities/a/faces", {"data": crop_png(1)}),
        ("GET", "/v1/galleries/g/identities", {}), ("GET", "/v1/galleries/g/identities/a", {}),
        ("POST", "/v1/galleries/g/identify?faces=all", {"data": crop_png(1)}),
        ("POST", "/v1/galleries/g/identify?exact=true", {"data": crop_png(1)}),
        ("GET", "/v1/galleries/g/faces/1/crop", {}),
        ("POST", "/v1/galleries/g/identities/a/verify", {"data": crop_png(1)}),
        ("POST", "/v1/galleries/g/reembed", {}), ("GET", "/v1/galleries/g/reembed", {}),
        ("PATCH", "/v1/galleries/g/identities/a", {"json": {"name": "b"}}),
        ("DELETE", "/v1/galleries/g/faces/1", {}),
        ("DELETE", "/v1/galleries/g/identities/b", {}),
        ("DELETE", "/v1/galleries/g", {}),
        ("GET", "/v1/audit?gallery=g&limit=5", {}),
        *_compat_calls(face, group),
    ]


def _file(data: bytes, name: str = "a.jpg") -> tuple:
    return io.BytesIO(data), name


def _compat_calls(face: bytes, group: bytes) -> list:
    """CompreFace's and DeepStack's routes; ``{image_id}`` is the last ``image_id`` answered."""
    cf, vector = "/api/v1/recognition", [0.05] * 512
    return [
        ("POST", f"{cf}/subjects", {"json": {"subject": "s"}}), ("GET", f"{cf}/subjects", {}),
        ("POST", f"{cf}/faces?subject=s", {"data": {"file": _file(face)}}),
        ("GET", f"{cf}/faces", {}), ("GET", f"{cf}/faces/{{image_id}}/img", {}),
        ("POST", f"{cf}/faces/{{image_id}}/verify?face_plugins=landmarks,calculator&status=true",
         {"data": {"file": _file(face)}}),
        ("POST", f"{cf}/faces?subject=s", {"json": {"file": _b64(group)}}),
        ("POST", f"{cf}/recognize?face_plugins=landmarks,calculator&status=true&prediction_count=2",
         {"data": {"file": _file(group)}}),
        ("POST", f"{cf}/embeddings/recognize", {"json": {"embeddings": [vector]}}),
        ("POST", f"{cf}/embeddings/faces/{{image_id}}/verify", {"json": {"embeddings": [vector]}}),
        ("POST", "/api/v1/detection/detect?status=true&face_plugins=landmarks", {"data": {"file": _file(group)}}),
        ("POST", "/api/v1/verification/verify?status=true",
         {"data": {"source_image": _file(face), "target_image": _file(group)}}),
        ("POST", "/api/v1/verification/embeddings/verify", {"json": {"source": vector, "targets": [vector]}}),
        ("PUT", f"{cf}/subjects/s", {"json": {"subject": "t"}}),
        ("DELETE", f"{cf}/faces/{{image_id}}", {}),
        ("POST", f"{cf}/faces/delete", {"json": ["{image_id}"]}),
        ("DELETE", f"{cf}/faces?subject=t", {}),
        ("POST", f"{cf}/subjects", {"json": {"subject": "u"}}), ("DELETE", f"{cf}/subjects/u", {}),
        ("DELETE", f"{cf}/subjects", {}),
        ("POST", "/v1/vision/face", {"data": {"image": _file(group)}}),
        ("POST", "/v1/vision/face/", {"data": {"image": _file(group), "min_confidence": "0.5"}}),
        ("POST", "/v1/vision/face/register", {"data": {"userid": "d", "image": _file(face)}}),
        ("POST", "/v1/vision/face/recognize", {"data": {"image": _file(face)}}),
        ("POST", "/v1/vision/face/list", {}),
        ("POST", "/v1/vision/face/match", {"data": {"image1": _file(face), "image2": _file(group)}}),
        ("POST", "/v1/vision/face/delete", {"data": {"userid": "d"}}),
    ]


def _declared(app, method: str, path: str):
    """The view's declared operation for a request path."""
    adapter = app.url_map.bind("localhost")
    endpoint, _ = adapter.match(path.split("?")[0], method=method)
    return app.view_functions[endpoint].openapi


def test_every_answer_matches_its_declared_model(app):
    client = app.test_client()
    face, group = photo("img1_aligned.jpg"), photo("img2.jpeg")
    seen, image_id = set(), None
    for method, path, kwargs in _calls(face, group):
        path = path.replace("{image_id}", str(image_id))
        if kwargs.get("json") == ["{image_id}"]:
            kwargs = {"json": [image_id]}
        r = client.open(path, method=method, **kwargs)
        if r.is_json and isinstance(r.get_json(), dict) and "image_id" in r.get_json():
            image_id = r.get_json()["image_id"]
        assert 200 <= r.status_code < 300, (method, path, r.get_data(as_text=True)[:300])
        reply = _declared(app, method, path).replies[r.status_code]
        if reply.content_type == "application/json" and hasattr(reply.model, "model_validate"):
            reply.model.model_validate(r.get_json())  # raises on a missing, extra or mistyped field
        assert r.mimetype == reply.content_type or reply.content_type == "*/*"
        rule = app.url_map.bind("localhost").match(path.split("?")[0], method=method, return_rule=True)[0]
        seen.add((openapi_path(rule.rule), method))
    documented = {(p, m.upper()) for p, item in client.get("/openapi.json").get_json()["paths"].items() for m in item}
    assert documented == seen  # every route was called


def test_a_wrong_answer_fails_its_model(app):
    """The check above can fail: an answer with a field the model does not declare."""
    client = app.test_client()
    body = client.post("/v1/embed", data=photo("img1_aligned.jpg")).get_json()
    model = _declared(app, "POST", "/v1/embed").replies[200].model
    model.model_validate(body)
    with pytest.raises(ValueError):
        model.model_validate({**body, "surprise": 1})
    with pytest.raises(ValueError):
        model.model_validate({k: v for k, v in body.items() if k != "faces"})


def test_document_is_valid_openapi_31(app):
    spec = app.test_client().get("/openapi.json").get_json()
    assert spec["openapi"] == "3.1.0"
    validate(spec)


def test_query_parameters_come_from_the_models(app):
    spec = app.test_client().get("/openapi.json").get_json()
    params = {p["name"]: p for p in spec["paths"]["/v1/galleries/{gallery}/identify"]["post"]["parameters"]}
    assert params["top_k"]["schema"] == {"type": "integer", "minimum": 1, "maximum": 100}
    assert params["faces"]["schema"]["enum"] == ["largest", "score", "all"]
    enroll = spec["paths"]["/v1/galleries/{gallery}/identities/{identity}/faces"]["post"]["parameters"]
    assert {p["name"]: p for p in enroll}["faces"]["schema"]["enum"] == ["largest", "score"]


# -- one embed path: the forward is cut to size once --------------------------------------------

class Recorder:
    """The real forward, with the size of each call written down."""

    def __init__(self, forward):
        self.forward, self.sizes = forward, []

    def __call__(self, crops):
        self.sizes.append(len(crops))
        return self.forward(crops)


def _crops(n: int) -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (n, 112, 112, 3), dtype=np.uint8)


@pytest.mark.parametrize("max_batch, expected", [(48, [48]), (20, [20, 20, 8])])
def test_library_path_forwards_at_most_max_batch(max_batch, expected):
    extractor = AdaFaceFeature("synthetic", arch="ir_18", device="cpu", backend="torch", max_batch=max_batch)
    extractor.model.forward = recorder = Recorder(extractor.model.forward)
    embeddings, norms = extractor.embed_crops(_crops(48))
    assert recorder.sizes == expected and embeddings.shape == (48, 512) and norms.shape == (48,)


def test_service_runs_a_48_face_forward(extractor):
    """ADAFACE_MAX_BATCH=48: one request of 48 crops is one forward of 48 (it used to be 32 + 16)."""
    settings = Settings(open_galleries=True, weights="synthetic", arch="ir_18", device="cpu", warmup=False, max_batch=48, max_images=48)
    app = create_app(settings, extractor=extractor)
    service = app.extensions["adaface"]
    recorder = Recorder(service.runner.batcher.embed)
    service.runner.batcher.embed = recorder
    crops = [_b64(crop_png(i)) for i in range(48)]
    r = app.test_client().post("/v1/embed", json={"images": crops})
    assert r.status_code == 200 and len(r.get_json()["results"]) == 48
    assert recorder.sizes == [48]
    batches = app.test_client().get("/metrics").get_data(as_text=True)
    assert "adaface_batch_size_sum 48.0" in batches
    assert app.test_client().get("/info").get_json()["batching"]["max_batch"] == 48


def test_the_readme_lists_every_error_code_with_its_status():
    from conftest import REPO
    from serving.errors import STATUS
    rows = {}
    for line in (REPO / "README.md").read_text().splitlines():
        if line.startswith("| ") and line[2:5].isdigit():
            statuses = [int(part) for part in line.split("|")[1].replace("/", " ").split()]
            for code in re.findall(r"`([a-z0-9_]+)`", line.split("|")[2]):
                rows[code] = statuses
    missing = {code: status for code, status in STATUS.items() if status not in rows.get(code, ())}
    assert missing == {}
