"""Gallery hardening: what a client sends can neither poison a gallery nor crash a route.

One test (or group) per problem: metadata that could be stored but not answered (too deep, too
large, non-finite numbers), face ids beyond 64 bits, a rename answering 404 after it committed,
tracebacks logged for client errors, and names in the path that werkzeug would decode lossily
(invalid UTF-8, an encoded '/'). Through the Flask test client against SQLite and a real
PostgreSQL, the store directly, and one real gunicorn server with gevent workers.
"""
import base64
import io
import json
import threading
import time
from contextlib import contextmanager

import pytest

from AdaFaceFeature import AdaFaceFeature
from config import Settings
from flask_http_server import create_app
from gallery import errors as gallery_errors
from gallery.errors import BadMetadataError, FaceNotFoundError, GalleryError
from gallery.galleries import Galleries
from gallery.store import (MAX_METADATA_BYTES, MAX_METADATA_DEPTH, NewFace, check_identity_name,
                           check_metadata)
from serving.errors import STATUS
from test_gallery_server import Server, call
from test_gallery_support import BACKENDS, crop_png, store_url, unit_vectors

@pytest.fixture(scope="module")
def extractor():
    return AdaFaceFeature("synthetic", arch="ir_18", device="cpu")


@pytest.fixture(params=BACKENDS)
def app(request, tmp_path, extractor):
    settings = Settings(open_galleries=True, weights="synthetic", arch="ir_18", device="cpu", warmup=False,
                        gallery_url=store_url(request.param, tmp_path))
    app = create_app(settings, extractor=extractor)
    yield app
    app.extensions["adaface_gallery"].close()


@pytest.fixture
def client(app):
    client = app.test_client()
    assert client.post("/v1/galleries", json={"name": "g"}).status_code == 201
    return client


@pytest.fixture(params=BACKENDS)
def galleries(request, tmp_path):
    galleries = Galleries.open(store_url(request.param, tmp_path))
    galleries.store.create_gallery("g")
    yield galleries
    galleries.close()


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _nested(depth: int) -> dict:
    """A JSON object ``depth`` levels deep: {"a": {"a": ... {} ...}}."""
    value = {}
    for _ in range(depth - 1):
        value = {"a": value}
    return value


def _face(seed: int, sha: str) -> NewFace:
    return NewFace(unit_vectors(1, seed)[0], 20.0, sha)


# -- 1. metadata is checked before it is stored ----------------------------------------------------

#: metadata as JSON text no encoder can answer with (or that is not an object); each 400
BAD_METADATA = {
    "300 deep": json.dumps(_nested(300)),
    "one level too deep": json.dumps(_nested(MAX_METADATA_DEPTH + 1)),
    "too large": json.dumps({"text": "x" * MAX_METADATA_BYTES}),
    "NaN": '{"a": NaN}',
    "Infinity": '{"a": -Infinity}',
    "1e400": '{"a": 1e400}',
    "lone surrogate": '{"a": "\\ud800"}',
    "a list": "[1, 2]",
    "a string": '"text"',
}


def _assert_gallery_healthy(client, faces: int) -> None:
    """Listing, reading and identifying still answer, and nothing was added."""
    r = client.get("/v1/galleries/g/identities")
    assert r.status_code == 200 and [i["name"] for i in r.get_json()["identities"]] == ["alice"]
    assert client.get("/v1/galleries/g/identities/alice").status_code == 200
    r = client.post("/v1/galleries/g/identify", data=crop_png(1))
    assert r.status_code == 200 and r.get_json()["faces"][0]["identity"] == "alice"
    assert client.get("/v1/galleries/g").get_json()["faces"] == faces
    assert client.get("/v1/galleries/g/identities/bob").status_code == 404


@pytest.mark.parametrize("case", list(BAD_METADATA))
def test_bad_metadata_is_refused_before_anything_is_stored(client, case):
    text = BAD_METADATA[case]
    r = client.post("/v1/galleries/g/identities/alice/faces", json={"image": _b64(crop_png(1)),
                                                                    "metadata": {"team": "a"}})
    assert r.status_code == 201
    enroll = '{"image": "%s", "metadata": %s}' % (_b64(crop_png(2)), text)
    r = client.post("/v1/galleries/g/identities/bob/faces", data=enroll, content_type="application/json")
    assert r.status_code == 400 and r.get_json()["error"]["code"] in ("bad_metadata", "bad_json"), r.get_json()
    r = client.post("/v1/galleries/g/identities/bob/faces", content_type="multipart/form-data",
                    data={"image": (io.BytesIO(crop_png(2)), "b.png"), "metadata": text})
    assert r.status_code == 400 and r.get_json()["error"]["code"] in ("bad_metadata", "bad_json"), r.get_json()
    r = client.patch("/v1/galleries/g/identities/alice", data='{"metadata": %s}' % text,
                     content_type="application/json")
    assert r.status_code == 400 and r.get_json()["error"]["code"] in ("bad_metadata", "bad_json"), r.get_json()
    _assert_gallery_healthy(client, faces=1)
    assert client.get("/v1/galleries/g/identities/alice").get_json()["metadata"] == {"team": "a"}


def test_metadata_within_the_limits_is_stored_and_answered(client):
    deepest = _nested(MAX_METADATA_DEPTH)
    r = client.post("/v1/galleries/g/identities/alice/faces", json={"image": _b64(crop_png(1)),
                                                                    "metadata": deepest})
    assert r.status_code == 201 and r.get_json()["identity"]["metadata"] == deepest
    assert client.get("/v1/galleries/g/identities/alice").get_json()["metadata"] == deepest
    r = client.patch("/v1/galleries/g/identities/alice", json={"metadata": {"big": 2 ** 63 - 1, "é": [1.5e308]}})
    assert r.status_code == 200 and r.get_json()["metadata"] == {"big": 2 ** 63 - 1, "é": [1.5e308]}
    candidates = client.post("/v1/galleries/g/identify", data=crop_png(1)).get_json()["faces"][0]["candidates"]
    assert candidates[0]["metadata"] == {"big": 2 ** 63 - 1, "é": [1.5e308]}


@pytest.mark.parametrize("metadata", [
    {"a": float("nan")}, {"a": float("inf")}, {"a": 2 ** 64}, {"a": -2 ** 63 - 1}, {"a": "\ud800"},
    {"\ud800": 1}, {1: "a"}, {"a": {1, 2}}, {"a": b"bytes"}, _nested(MAX_METADATA_DEPTH + 1),
    {"a": [[[[[[[[[[[[[[[[1]]]]]]]]]]]]]]]]}, {"a": "é" * (MAX_METADATA_BYTES // 2)}, [1], "text",
], ids=lambda m: repr(m)[:24])
def test_the_store_refuses_bad_metadata_for_every_caller(galleries, metadata):
    """The command line and import reach the store without the HTTP layer: the store checks."""
    with pytest.raises(BadMetadataError):
        galleries.store.enroll("g", "bob", [_face(1, "a" * 64)], metadata)
    galleries.store.enroll("g", "alice", [_face(2, "b" * 64)], {"ok": True})
    with pytest.raises(BadMetadataError):
        galleries.store.update_identity("g", "alice", metadata=metadata)
    assert [i.name for i in galleries.store.list_identities("g")] == ["alice"]
    assert galleries.store.get_identity("g", "alice").metadata == {"ok": True}
    assert galleries.store.get_gallery("g").faces == 1


def test_check_metadata_limits_are_exact():
    assert check_metadata(None) is None
    assert json.loads(check_metadata(_nested(MAX_METADATA_DEPTH))) == _nested(MAX_METADATA_DEPTH)
    padding = MAX_METADATA_BYTES - len('{"t":""}')
    assert len(check_metadata({"t": "x" * padding}).encode()) == MAX_METADATA_BYTES
    with pytest.raises(BadMetadataError):
        check_metadata({"t": "x" * (padding + 1)})
    assert check_metadata({"a": [2 ** 63 - 1, -2 ** 63, 1e308, "", None, True]})


def test_metadata_stored_before_the_checks_does_not_break_the_gallery(app, client):
    """A row written by an older version (300 levels deep, NaN) is answered as null."""
    assert client.post("/v1/galleries/g/identities/alice/faces", data=crop_png(1)).status_code == 201
    store = app.extensions["adaface_gallery"]._open().store
    for poisoned in (json.dumps(_nested(300)), '{"a": NaN}', "[" * 5000 + "]" * 5000):
        with store._write() as tx:
            tx.run("UPDATE adaface_identities SET metadata = %s WHERE name = %s", (poisoned, "alice"))
        _assert_gallery_healthy(client, faces=1)
        assert client.get("/v1/galleries/g/identities/alice").get_json()["metadata"] is None
    r = client.patch("/v1/galleries/g/identities/alice", json={"metadata": {"fixed": 1}})
    assert r.status_code == 200 and r.get_json()["metadata"] == {"fixed": 1}


# -- 2. face ids beyond 64 bits --------------------------------------------------------------------

@pytest.mark.parametrize("face_id", ["99999999999999999999", str(2 ** 63), str(2 ** 64)])
def test_a_face_id_beyond_64_bits_is_not_found(client, face_id):
    r = client.delete(f"/v1/galleries/g/faces/{face_id}")
    assert r.status_code == 404 and r.get_json()["error"]["code"] == "face_not_found", r.get_json()
    assert client.get(f"/v1/galleries/g/faces/{face_id}").status_code == 405
    r = client.delete(f"/v1/galleries/missing/faces/{face_id}")
    assert r.status_code == 404 and r.get_json()["error"]["code"] == "gallery_not_found"


def test_the_store_treats_huge_face_ids_as_missing(galleries):
    for face_id in (2 ** 63, 2 ** 70, -2 ** 63 - 1):
        with pytest.raises(FaceNotFoundError):
            galleries.store.delete_face("g", face_id)


# -- 3. a committed rename never answers 404 -------------------------------------------------------

def test_a_rename_answers_what_it_committed_even_if_renamed_again_at_once(app, client, monkeypatch):
    """Another rename commits between the rename's commit and anything read after it."""
    assert client.post("/v1/galleries/g/identities/a/faces", data=crop_png(1)).status_code == 201
    store = app.extensions["adaface_gallery"]._open().store
    original, pending = store._write, ["interfere"]

    @contextmanager
    def write_then_rename_again():
        with original() as tx:
            yield tx
        if pending:
            pending.pop()
            store.update_identity("g", "b", "c")

    monkeypatch.setattr(store, "_write", write_then_rename_again)
    r = client.patch("/v1/galleries/g/identities/a", json={"name": "b"})
    assert r.status_code == 200, r.get_json()
    assert r.get_json()["name"] == "b" and len(r.get_json()["faces"]) == 1
    assert client.get("/v1/galleries/g/identities/c").status_code == 200


def test_concurrent_renames_and_reads_never_answer_404_for_a_committed_rename(app, client):
    assert client.post("/v1/galleries/g/identities/n0/faces", data=crop_png(1)).status_code == 201
    answers, statuses, stop = [], [], threading.Event()

    def rename(worker: int) -> None:
        own = app.test_client()
        for k in range(12):
            listed = own.get("/v1/galleries/g/identities").get_json()["identities"]
            source, target = listed[0]["name"], f"w{worker}-{k}"
            r = own.patch(f"/v1/galleries/g/identities/{source}", json={"name": target})
            answers.append((source, target, r.status_code, (r.get_json() or {}).get("name")))

    def read() -> None:
        own = app.test_client()
        while not stop.is_set():
            listed = own.get("/v1/galleries/g/identities")
            statuses.append(listed.status_code)
            for identity in listed.get_json()["identities"]:
                statuses.append(own.get(f"/v1/galleries/g/identities/{identity['name']}").status_code)

    workers = [threading.Thread(target=rename, args=(w,)) for w in range(4)]
    reader = threading.Thread(target=read)
    for t in [reader, *workers]:
        t.start()
    for t in workers:
        t.join(120)
    stop.set()
    reader.join(30)
    assert len(answers) == 48 and all(status in (200, 404) for _, _, status, _ in answers), answers
    assert set(statuses) <= {200, 404}, statuses
    final = client.get("/v1/galleries/g/identities").get_json()["identities"]
    assert len(final) == 1 and final[0]["face_count"] == 1
    # a name that existed after a rename (renamed from later, or the final one) was committed:
    # its rename must have answered 200 with that name
    committed = {source for source, _, status, _ in answers if status == 200} | {final[0]["name"]}
    by_target = {target: (status, name) for _, target, status, name in answers}
    for name in committed - {"n0"}:
        assert by_target[name] == (200, name), (name, by_target[name])
    print(f"{sum(1 for a in answers if a[2] == 200)} of {len(answers)} renames committed")


# -- 4. client errors log no traceback -------------------------------------------------------------

def _all_subclasses(cls) -> list:
    return [c for sub in cls.__subclasses__() for c in (sub, *_all_subclasses(sub))]


def test_every_gallery_error_code_has_a_status():
    """A code missing from STATUS would be answered as a 500 and logged with its traceback."""
    codes = {GalleryError.code} | {c.code for c in _all_subclasses(GalleryError)}
    assert "bad_metadata" in codes and codes <= set(STATUS), codes - set(STATUS)
    assert all(STATUS[c] < 500 or c == "store_unavailable" for c in codes)
    assert gallery_errors.BadMetadataError("x").code == "bad_metadata"


@pytest.mark.server
@pytest.mark.slow
def test_client_errors_on_a_gevent_server_log_no_traceback(tmp_path):
    """gunicorn with gevent workers: gallery 4xx (store errors raised in native threads, path and
    metadata checks) answer their codes and add at most one short line each to the log."""
    log = tmp_path / "server.log"
    server = Server(store_url("sqlite", tmp_path), log)
    try:
        server.wait_ready()
        assert call(server.port, "POST", "/v1/galleries", {"name": "g"})[0] == 201
        assert call(server.port, "POST", "/v1/galleries/g/identities/alice/faces", crop_png(1))[0] == 201
        time.sleep(0.5)
        before = log.read_text()
        expected = [
            ("GET", "/v1/galleries/missing", None, 404, "gallery_not_found"),
            ("GET", "/v1/galleries/g/identities/nobody", None, 404, "identity_not_found"),
            ("DELETE", "/v1/galleries/g/faces/99999999999999999999", None, 404, "face_not_found"),
            ("DELETE", "/v1/galleries/g/faces/12345", None, 404, "face_not_found"),
            ("POST", "/v1/galleries", {"name": "g"}, 409, "gallery_exists"),
            ("POST", "/v1/galleries", {"name": "no/slash"}, 400, "bad_name"),
            ("PATCH", "/v1/galleries/g/identities/alice", {"name": "a\u0085b"}, 400, "bad_name"),
            ("PATCH", "/v1/galleries/g/identities/alice", {"metadata": _nested(300)}, 400, None),
            ("POST", "/v1/galleries/g/identities/bob/faces",
             {"image": _b64(crop_png(2)), "metadata": _nested(MAX_METADATA_DEPTH + 1)}, 400, "bad_metadata"),
            ("GET", "/v1/galleries/g/identities/%FF", None, 400, "bad_name"),
            ("GET", "/v1/galleries/g/identities/%FE", None, 400, "bad_name"),
            ("GET", "/v1/galleries/g/identities/a%2Fb", None, 400, "bad_name"),
            ("GET", "/v1/galleries/g%2Fidentities/alice", None, 400, "bad_name"),
        ]
        for method, path, body, status, code in expected:
            got, answer = call(server.port, method, path, body)
            assert got == status, (method, path, answer)
            assert code is None or answer["error"]["code"] == code, (method, path, answer)
        status, answer = call(server.port, "GET", "/v1/galleries/g/identities")
        assert status == 200 and [i["name"] for i in answer["identities"]] == ["alice"]
        time.sleep(0.5)
        added = log.read_text()[len(before):]
        assert "Traceback" not in added, added[-4000:]
        lines = [line for line in added.splitlines() if line.strip()]   # the access log: one per request
        assert len(lines) <= len(expected) + 1 and all(len(line) < 400 for line in lines), added[-4000:]
    finally:
        server.kill()


# -- 5. names in the path and in bodies ------------------------------------------------------------

def test_invalid_utf8_in_path_names_is_refused_not_merged(client):
    for name in ("%FF", "%FE", "a%C3", "%C0%AF"):
        r = client.post(f"/v1/galleries/g/identities/{name}/faces", data=crop_png(1))
        assert r.status_code == 400 and r.get_json()["error"]["code"] == "bad_name", (name, r.get_json())
        for method in (client.get, client.delete):
            r = method(f"/v1/galleries/g/identities/{name}")
            assert r.status_code == 400 and r.get_json()["error"]["code"] == "bad_name", (name, r.get_json())
        r = client.patch(f"/v1/galleries/g/identities/{name}", json={"name": "x"})
        assert r.status_code == 400 and r.get_json()["error"]["code"] == "bad_name"
    assert client.get("/v1/galleries/%FF").get_json()["error"]["code"] == "bad_name"
    assert client.get("/v1/galleries/g").get_json()["identities"] == 0
    # valid UTF-8, percent-encoded, is a name like any other
    r = client.post("/v1/galleries/g/identities/%C3%A9l%C3%A9a/faces", data=crop_png(1))
    assert r.status_code == 201 and r.get_json()["identity"]["name"] == "éléa"
    assert client.get("/v1/galleries/g/identities/%C3%A9l%C3%A9a").get_json()["name"] == "éléa"
    assert client.get("/v1/galleries/g/identities/100%25").get_json()["error"]["code"] == "identity_not_found"


@pytest.mark.parametrize("path", [
    "/v1/galleries/g/identities/a%2Fb", "/v1/galleries/g/identities/a%2fb/faces", "/v1/galleries/g/identities/%2F",
    "/v1/galleries/g%2Fidentities/a", "/v1/galleries/g/faces%2F1",
])
def test_an_encoded_slash_in_a_path_is_a_bad_name(client, path):
    for method in ("GET", "POST", "PATCH", "DELETE"):
        r = client.open(path, method=method, data=crop_png(1))
        assert r.status_code == 400 and r.get_json()["error"]["code"] == "bad_name", (method, path, r.get_json())


def test_without_a_raw_uri_the_decoded_path_is_checked(client):
    """Servers that give only PATH_INFO (bytes as latin-1): invalid UTF-8 is still refused."""
    overrides = {"RAW_URI": "", "REQUEST_URI": "", "PATH_INFO": "/v1/galleries/g/identities/\xff"}
    r = client.get("/", environ_overrides=overrides)
    assert r.status_code == 400 and r.get_json()["error"]["code"] == "bad_name"
    overrides["PATH_INFO"] = "/v1/galleries/g/identities/" + "é".encode().decode("latin-1")
    assert client.get("/", environ_overrides=overrides).get_json()["error"]["code"] == "identity_not_found"


@pytest.mark.parametrize("name", [
    "a/b", "", " a", "a ", "\t", "a\x00b", "a\x1fb", "a\x7fb", "a\u0085b", "a\u009fb", ".", "..", "x" * 201, 5,
    ["a"], None,
], ids=repr)
def test_names_in_bodies_are_checked(client, name):
    assert client.post("/v1/galleries/g/identities/alice/faces", data=crop_png(1)).status_code == 201
    if name is not None:
        r = client.patch("/v1/galleries/g/identities/alice", json={"name": name})
        assert r.status_code == 400 and r.get_json()["error"]["code"] == "bad_name", (name, r.get_json())
    r = client.post("/v1/galleries", json={"name": name})
    assert r.status_code == 400 and r.get_json()["error"]["code"] == "bad_name", (name, r.get_json())
    assert [i["name"] for i in client.get("/v1/galleries/g/identities").get_json()["identities"]] == ["alice"]


def test_a_lone_surrogate_name_is_refused(client):
    assert client.post("/v1/galleries/g/identities/alice/faces", data=crop_png(1)).status_code == 201
    r = client.patch("/v1/galleries/g/identities/alice", data='{"name": "a\\ud800"}', content_type="application/json")
    assert r.status_code == 400 and r.get_json()["error"]["code"] in ("bad_name", "bad_json")
    with pytest.raises(gallery_errors.BadNameError):
        check_identity_name("a\ud800")
    for fine in ("x" * 200, "Zoë O'Brien-Smith (2)", "...", "李小龙", "a b"):
        assert check_identity_name(fine) == fine
