"""Hostile and careless input: each test is one way an attacker or a new user found to get a
500, pin memory, or hold up other clients, on a real gunicorn + gevent server where the server's
own behaviour (its reader, its sockets) is what matters, and on the app otherwise."""
import base64
import io
import socket
import threading
import time

import numpy as np
import pytest
from PIL import Image

from adaface.options import DEFAULT_MIN_FACE_SIZE, EmbedOptions
from adaface.threads import PixelBudget, start_new_thread
from AdaFaceFeature import AdaFaceFeature
from config import Settings
from flask_http_server import create_app
from serving.runner import InferenceRunner
from conftest import photo
from test_http import check_error, wait_ready
from test_server import metric_samples, request, start

KEY = "hardening-key-5a1e"


def _png(width: int, height: int, value: int = 0) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (width, height), (value,) * 3).save(out, "PNG")
    return out.getvalue()


@pytest.fixture(scope="module")
def extractor():
    return AdaFaceFeature("synthetic", arch="ir_18", device="cpu")


def _app(extractor, **overrides):
    settings = Settings(**{"open_galleries": True, "weights": "synthetic", "arch": "ir_18", "device": "cpu", **overrides})
    return wait_ready(create_app(settings, extractor=extractor))


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """IR-18 synthetic weights, API keys on, a 2-second body deadline."""
    s = start(tmp_path_factory.mktemp("hardening"), "synthetic", ADAFACE_ARCH="ir_18", ADAFACE_API_KEYS=KEY,
              ADAFACE_BODY_TIMEOUT="2", ADAFACE_LOG_LEVEL="info")
    try:
        yield s.wait_ready()
    finally:
        s.stop()


def _raw(port: int, head: bytes, timeout: float = 10.0) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    sock.sendall(head)
    return sock


def _answer(sock: socket.socket) -> bytes:
    """One HTTP answer (head and Content-Length body) read off ``sock``, or what came before
    the server closed the connection."""
    data = b""
    try:
        while b"\r\n\r\n" not in data:
            chunk = sock.recv(65536)
            if not chunk:
                return data
            data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        length = next((int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                       if line.lower().startswith(b"content-length:")), 0)
        while len(body) < length:
            chunk = sock.recv(65536)
            if not chunk:
                break
            body += chunk
        return head + b"\r\n\r\n" + body
    except (socket.timeout, ConnectionResetError):
        return data


def _status(answer: bytes) -> int:
    return int(answer.split(b" ", 2)[1])


# -- 1. large images: a lane of their own, a pixel budget, a floor on min_face_size ------------

def test_pixel_budget_lets_one_oversize_holder_in_and_keeps_arrival_order():
    budget = PixelBudget(100)
    order, done = [], threading.Event()
    with budget.held(150):  # alone over the capacity: still admitted
        assert budget.in_use == 150

        def wait(name, amount):
            with budget.held(amount):
                order.append(f"{name} in")
                time.sleep(0.2)
                order.append(f"{name} out")
            if len(order) == 4:
                done.set()

        start_new_thread(wait, ("large", 95))
        while not budget._waiting:
            time.sleep(0.01)
        start_new_thread(wait, ("small", 10))  # fits now, beside the holder: must not overtake
        time.sleep(0.2)
        assert order == []
    assert done.wait(5)
    assert order == ["large in", "large out", "small in", "small out"] and budget.in_use == 0


def test_small_requests_do_not_wait_behind_large_images(extractor):
    app = _app(extractor, large_image=0.1, pixel_budget=0.1)
    runner = app.extensions["adaface"].runner
    large = _png(600, 600, 90)  # 0.36 Mpx of detection work: the large lane
    assert runner.cost(large, EmbedOptions()) == 360_000
    held, release, answers = threading.Event(), threading.Event(), {}

    def hold_budget():
        with runner.budget.held(1.0):
            held.set()
            release.wait(30)

    def post_large():
        answers["large"] = app.test_client().post("/v1/embed", data=large).status_code

    threading.Thread(target=hold_budget).start()
    assert held.wait(5)
    blocked = threading.Thread(target=post_large)
    blocked.start()
    time.sleep(0.3)
    try:
        assert blocked.is_alive()  # queued in the large lane, behind the budget's holder
        began = time.perf_counter()
        r = app.test_client().post("/v1/embed", data=photo("img1_aligned.jpg"))
        assert r.status_code == 200 and time.perf_counter() - began < 10
        assert blocked.is_alive() and "large" not in answers
    finally:
        release.set()
    blocked.join(30)
    assert answers["large"] == 422  # processed once the budget was free (a grey image: no face)


def test_detection_cost_counts_small_min_face_sizes():
    image = _png(600, 600)

    class _Extractor:
        max_pixels = 52_000_000

    runner = object.__new__(InferenceRunner)
    runner.extractor = _Extractor()
    assert runner.cost(image, EmbedOptions(min_face_size=DEFAULT_MIN_FACE_SIZE)) == 360_000
    assert runner.cost(image, EmbedOptions(min_face_size=12)) == pytest.approx(360_000 * (20 / 12) ** 2)
    assert runner.cost(image, EmbedOptions(min_face_size=40)) == 360_000
    assert runner.cost(image, EmbedOptions(max_pixels=1000)) == 0  # refused at once, in no lane
    assert runner.cost(b"not an image", EmbedOptions()) == 0


def test_min_face_size_has_a_floor(extractor):
    client = _app(extractor).test_client()
    error = check_error(client.post("/v1/embed?min_face_size=1", data=photo("img1.jpeg")), 400, "bad_option")
    assert "between 12 and 10000" in error["message"]
    assert client.post("/v1/embed?min_face_size=12", data=photo("img1.jpeg")).status_code == 200


# -- 3. no memory pinned without a key; slow bodies cut off ---------------------------------------

@pytest.mark.server
def test_keyless_chunked_upload_is_refused_before_its_body(server):
    head = (b"POST /v1/embed HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
            b"Content-Type: application/octet-stream\r\n\r\n" + b"10000\r\n" + b"\0" * 1000)
    began = time.perf_counter()
    answer = _answer(_raw(server.port, head))  # the rest of the body is never sent
    assert _status(answer) == 401 and b'"unauthorized"' in answer
    assert time.perf_counter() - began < 5  # not after the body deadline: the body was never read


@pytest.mark.server
def test_silent_and_slow_bodies_get_408(server):
    auth = f"Authorization: Bearer {KEY}\r\n".encode()
    head = b"POST /v1/embed HTTP/1.1\r\nHost: x\r\nContent-Length: 5000\r\n" + auth + b"\r\n" + b"\xff\xd8\xff"
    began = time.perf_counter()
    answer = _answer(_raw(server.port, head))  # then silence
    assert _status(answer) == 408 and b'"body_timeout"' in answer
    assert 1.5 < time.perf_counter() - began < 6
    sock = _raw(server.port, b"POST /v1/embed HTTP/1.1\r\nHost: x\r\nContent-Length: 5000\r\n" + auth + b"\r\n")
    began, first = time.perf_counter(), b""
    sock.settimeout(0.5)
    while not first and time.perf_counter() - began < 20:
        sock.sendall(b"0" * 10)  # 20 bytes a second: every read returns, the whole never arrives
        try:
            first = sock.recv(1)
        except socket.timeout:
            pass
    answered = time.perf_counter() - began
    sock.settimeout(10)
    answer = first + _answer(sock)
    assert _status(answer) == 408 and 1.5 < answered < 6


# -- 4. no 500s -----------------------------------------------------------------------------------

@pytest.mark.server
def test_broken_chunked_bodies_are_400_not_500(server):
    auth = f"Authorization: Bearer {KEY}\r\n".encode()
    head = b"POST /v1/embed HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n" + auth + b"\r\n"
    answer = _answer(_raw(server.port, head + b"zz\r\nhello\r\n0\r\n\r\n"))
    assert _status(answer) == 400 and b'"bad_request"' in answer
    sock = _raw(server.port, head + b"1000\r\n" + b"a" * 100)
    sock.close()  # the client leaves in the middle of a chunk
    time.sleep(0.5)
    assert request(server.port, "GET", "/livez")[0] == 200
    log = server.output()
    assert "unhandled error" not in log and "Traceback" not in log


@pytest.mark.parametrize("route", ["/v1/embed", "/v1/verify", "/v1/galleries"])
def test_deep_json_is_400(extractor, route):
    client = _app(extractor).test_client()
    deep = b"[" * 100_000 + b"]" * 100_000
    body = b'{"image": ' + deep + b"}"
    error = check_error(client.post(route, data=body, content_type="application/json"), 400, "bad_json")
    assert "depth" in error["message"] or "deep" in error["message"]
    for literal in (b"NaN", b"1e400"):
        check_error(client.post(route, data=b'{"x": ' + literal + b"}", content_type="application/json"),
                    400, "bad_json")


# -- 8. metric labels -----------------------------------------------------------------------------

@pytest.mark.server
def test_made_up_methods_share_one_label(server):
    def size():
        return len(request(server.port, "GET", "/metrics")[2])

    for i in range(30):
        request(server.port, f"XQ{i:04d}", "/livez")
    before = size()
    for i in range(30, 230):
        status = request(server.port, f"XQ{i:04d}", "/livez")[0]
        assert status in (400, 405)
    samples = metric_samples(server.port)
    methods = {dict(labels).get("method") for name, labels in samples if name == "adaface_requests_total"}
    assert "other" in methods and not any(m and m.startswith("XQ") for m in methods)
    assert size() - before < 2_000


# -- 10. the contract's gaps ----------------------------------------------------------------------

def test_too_many_form_parts_says_so(extractor):
    client = _app(extractor).test_client()
    boundary = "b0undary"
    parts = "".join(f'--{boundary}\r\nContent-Disposition: form-data; name="f{i}"\r\n\r\nx\r\n' for i in range(1500))
    body = (parts + f"--{boundary}--\r\n").encode()
    r = client.post("/v1/embed", data=body, content_type=f"multipart/form-data; boundary={boundary}")
    error = check_error(r, 413, "form_too_large")
    assert "1000 parts" in error["message"] and "33554432" not in error["message"]


def test_image_too_large_names_the_limit(extractor):
    client = _app(extractor).test_client()
    error = check_error(client.post("/v1/embed", data=_png(8000, 7000)), 413, "image_too_large")
    assert error["message"] == "image is 8000x7000 = 56000000 pixels, over the limit of 52000000"


def test_a_request_larger_than_the_queue_runs_on_an_idle_server(extractor):
    client = _app(extractor, max_queue=1).test_client()
    crop = base64.b64encode(photo("img1_aligned.jpg")).decode()
    r = client.post("/v1/verify", json={"image1": crop, "image2": crop})
    assert r.status_code == 200, r.get_json()
    assert np.isclose(r.get_json()["similarity"], 1.0, atol=1e-4)
