"""/openapi.json describes exactly the app's routes and methods, and only statuses it can return."""
import base64
import io
import re

import numpy as np
import pytest
from PIL import Image

from AdaFaceFeature import AdaFaceFeature
from config import Settings
from flask_http_server import create_app

IGNORED_METHODS = {"HEAD", "OPTIONS"}


def _jpeg(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "JPEG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def extractor():
    return AdaFaceFeature("synthetic", arch="ir_18", device="cpu")


def _app(extractor, **overrides):
    settings = Settings(weights="synthetic", arch="ir_18", device="cpu", warmup=False, **{"open_galleries": True, **overrides})
    return create_app(settings, extractor=extractor)


@pytest.fixture(scope="module")
def app(extractor):
    return _app(extractor)


@pytest.fixture(scope="module")
def spec(app):
    r = app.test_client().get("/openapi.json")
    assert r.status_code == 200 and r.mimetype == "application/json"
    return r.get_json()


def _openapi_path(rule: str) -> str:
    """Flask's ``/a/<int:b>/<c>`` as OpenAPI's ``/a/{b}/{c}``."""
    return re.sub(r"<(?:\w+(?:\([^)]*\))?:)?(\w+)>", r"{\1}", rule)


def _app_routes(app) -> dict:
    routes = {}
    for rule in app.url_map.iter_rules():
        if rule.endpoint != "static":
            methods = {m for m in rule.methods if m not in IGNORED_METHODS}
            routes.setdefault(_openapi_path(rule.rule), set()).update(methods)
    return routes


def _documented(spec) -> dict:
    return {path: {m.upper() for m in item if m.lower() in ("get", "post", "put", "patch", "delete")}
            for path, item in spec["paths"].items()}


def test_document_header(spec):
    assert spec["openapi"].startswith("3.")
    assert spec["info"]["title"] and spec["info"]["version"]
    assert "Error" in spec["components"]["schemas"]
    assert set(spec["components"]["securitySchemes"]) == {"bearer", "apiKey"}


def test_every_route_is_documented_with_its_methods(app, spec):
    routes, documented = _app_routes(app), _documented(spec)
    assert routes == documented


def test_path_parameters_are_declared(spec):
    for path, item in spec["paths"].items():
        names = set(re.findall(r"{(\w+)}", path))
        for method, operation in item.items():
            declared = {p["name"] for p in operation.get("parameters", []) + item.get("parameters", [])
                        if p.get("in") == "path"}
            assert names == declared, (path, method)


def test_schema_references_resolve(spec):
    schemas = spec["components"]["schemas"]

    def walk(node):
        if isinstance(node, dict):
            ref = node.get("$ref")
            if ref is not None:
                assert ref.startswith("#/components/schemas/") and ref.rsplit("/", 1)[1] in schemas, ref
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(spec)


def test_every_operation_has_responses(spec):
    for path, item in spec["paths"].items():
        for method, operation in item.items():
            assert operation.get("summary"), (path, method)
            assert any(s.startswith("2") for s in operation["responses"]), (path, method)


def _trigger(status: int, extractor, app):
    """A request to /v1/embed that returns ``status``: (app, kwargs) for ``client.post``."""
    grey = _jpeg(np.full((240, 320, 3), 128, np.uint8))
    crop = _jpeg(np.full((112, 112, 3), 128, np.uint8))
    if status == 200:
        return app, {"data": crop}
    if status == 400:
        return app, {"data": b""}
    if status == 401:
        return _app(extractor, api_keys="secret-key"), {"data": crop}
    if status == 403:
        return _app(extractor, api_keys="secret-key scopes=gallery:read"), {"data": crop,
                                                                           "headers": {"X-API-Key": "secret-key"}}
    if status == 429:
        limited = _app(extractor, api_keys="secret-key rate=1/h")
        limited.test_client().post("/v1/embed", data=crop, headers={"X-API-Key": "secret-key"})
        return limited, {"data": crop, "headers": {"X-API-Key": "secret-key"}}
    if status == 413:
        return app, {"json": {"images": [base64.b64encode(crop).decode()] * 33}}
    if status == 415:
        return app, {"data": b"%PDF-1.7\n"}
    if status == 422:
        return app, {"data": grey}
    if status == 503:
        full = _app(extractor, max_queue=1)
        full.extensions["adaface"].runner._admit(1)  # another request's image in flight
        return full, {"data": crop}
    raise AssertionError(f"/v1/embed documents status {status}; add a request that produces it")


def test_documented_embed_statuses_are_returned(app, spec, extractor):
    documented = sorted(int(s) for s in spec["paths"]["/v1/embed"]["post"]["responses"])
    assert {200, 400, 413, 422}.issubset(documented)
    for status in documented:
        target, kwargs = _trigger(status, extractor, app)
        r = target.test_client().post("/v1/embed", **kwargs)
        assert r.status_code == status, (status, r.get_data(as_text=True))
        if status != 200:
            assert set(r.get_json()["error"]) == {"code", "message"}


def test_error_schema_matches_an_error(app, spec):
    body = app.test_client().post("/v1/embed", data=b"").get_json()
    schemas = spec["components"]["schemas"]
    schema = schemas["Error"]
    assert set(schema["required"]) <= set(body)
    inner = schema["properties"]["error"]
    inner = schemas[inner["$ref"].rsplit("/", 1)[1]] if "$ref" in inner else inner
    assert set(inner["required"]) <= set(body["error"])
