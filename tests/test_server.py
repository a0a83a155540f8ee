"""A real gunicorn server with gevent workers on loopback, started as the README says.

Checkpoints are written by the tests: a synthetic IR-101 checkpoint in the released Lightning
layout (needs ``../shared``) for the parity check, and a small IR-18 state dict for the rest.
Each server runs in its own process group, which teardown always terminates.
"""
import base64
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

import net
from AdaFaceFeature import AdaFaceFeature
from conftest import REPO, photo

pytestmark = pytest.mark.server

GUNICORN = str(Path(sys.executable).parent / "gunicorn")
READY_TIMEOUT = 120.0
MAX_BODY = 1_000_000  # bytes, for the IR-18 server; every test photo is smaller




def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def request(port: int, method: str, path: str, body: bytes = None, headers=None, timeout: float = 120.0):
    """One HTTP request on a fresh connection: (status, headers dict, body bytes)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        r = conn.getresponse()
        return r.status, dict(r.getheaders()), r.read()
    finally:
        conn.close()


class Server:
    """A gunicorn process group; ``output()`` is everything it printed so far."""

    def __init__(self, args: list, env: dict, log: Path, port: int):
        self.port, self.log = port, log
        base = {k: v for k, v in os.environ.items()
                if not k.startswith("ADAFACE_") and k.lower() != "prometheus_multiproc_dir"}
        with open(log, "wb") as out:
            self.proc = subprocess.Popen([GUNICORN, *args], cwd=REPO, env={**base, **env}, stdout=out,
                                         stderr=subprocess.STDOUT, start_new_session=True)

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_ready(self, timeout: float = READY_TIMEOUT) -> "Server":
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"gunicorn exited with {self.proc.returncode}:\n{self.output()}")
            try:
                if request(self.port, "GET", "/readyz", timeout=5)[0] == 200:
                    return self
            except OSError:
                pass
            time.sleep(0.25)
        pytest.fail(f"gunicorn not ready after {timeout:.0f} s:\n{self.output()}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)
            except ProcessLookupError:
                pass


def start(tmp_path: Path, weights, args=None, bind=True, **env) -> Server:
    """Start gunicorn (``-c gunicorn.conf.py`` unless ``args`` says otherwise) with these weights."""
    port = free_port()
    metrics = tmp_path / f"metrics-{port}"
    metrics.mkdir()
    env = {"ADAFACE_WEIGHTS": str(weights), "ADAFACE_LOG_LEVEL": "warning", "ADAFACE_OPEN_GALLERIES": "true",
           "PROMETHEUS_MULTIPROC_DIR": str(metrics), **env}
    if bind:
        env["ADAFACE_BIND"] = f"127.0.0.1:{port}"
    args = [a.replace("{port}", str(port)) for a in (args or ["-c", "gunicorn.conf.py", "flask_http_server:app"])]
    return Server(args, env, tmp_path / f"gunicorn-{port}.log", port)


@pytest.fixture
def server_factory(tmp_path):
    servers = []

    def make(*args, **kwargs) -> Server:
        servers.append(start(tmp_path, *args, **kwargs))
        return servers[-1]

    yield make
    for s in servers:
        s.stop()


@pytest.fixture(scope="module")
def ir18_ckpt(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("ir18") / "adaface_ir18_synthetic.pth"
    torch.save(net.synthetic_backbone("ir_18", seed=3).state_dict(), path)
    return path


@pytest.fixture(scope="module")
def ir18_extractor(ir18_ckpt):
    return AdaFaceFeature(ir18_ckpt, device="cpu")


@pytest.fixture(scope="module")
def server18(ir18_ckpt, tmp_path_factory):
    server = start(tmp_path_factory.mktemp("server18"), ir18_ckpt, ADAFACE_MAX_BODY_BYTES=str(MAX_BODY))
    try:
        yield server.wait_ready()
    finally:
        server.stop()


def cosine(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


def metric_samples(port: int) -> dict:
    status, headers, body = request(port, "GET", "/metrics")
    assert status == 200
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(body.decode()) for s in family.samples}


# -- tests -----------------------------------------------------------------------------------------

def test_ir101_lightning_checkpoint_matches_the_extractor(synthetic_ckpt, server_factory):
    ckpt = synthetic_ckpt("ir_101", "lightning")
    server = server_factory(ckpt)
    image = photo("img1.jpeg")
    extractor = AdaFaceFeature(ckpt, device="cpu")  # loads while the server starts
    want = extractor.embed_image(image)[0].embedding
    server.wait_ready()
    status, headers, body = request(server.port, "POST", "/b64_represent_json", base64.b64encode(image),
                                    {"Content-Type": "application/x-www-form-urlencoded"})
    assert status == 200, body
    assert "X-AdaFace-Weights" not in headers
    assert cosine(np.float32(json.loads(body)[0]), want) >= 0.99999
    status, headers, body = request(server.port, "POST", "/byte_represent_byte", image)
    assert status == 200 and len(body) == 2048
    assert cosine(np.frombuffer(body, "<f4"), want) >= 0.99999
    status, _, body = request(server.port, "GET", "/info")
    info = json.loads(body)
    assert info["arch"] == "ir_101" and info["synthetic"] is False
    assert info["weights"] == str(ckpt) and info["weights_sha256"] == extractor.weights_sha256


def test_concurrent_requests_batch_and_livez_stays_fast(server18, ir18_extractor):
    port = server18.port
    names = ["img1.jpeg", "img2.jpeg", "img1_aligned.jpg", "img3.jpeg"]
    images = {n: photo(n) for n in names}
    want = {n: ir18_extractor.embed_image(images[n])[0].embedding for n in names}
    before = metric_samples(port)
    jobs = [names[i % len(names)] for i in range(8)]
    results, errors = {}, []
    start_together = threading.Barrier(len(jobs) + 1)

    def send(i: int, name: str) -> None:
        start_together.wait()
        try:
            for round_ in range(2):
                results[(i, round_)] = (name, *request(port, "POST", "/byte_represent_byte", images[name]))
        except Exception as exc:  # reported below
            errors.append(repr(exc))

    threads = [threading.Thread(target=send, args=(i, n)) for i, n in enumerate(jobs)]
    for t in threads:
        t.start()
    start_together.wait()
    probes = []
    while any(t.is_alive() for t in threads):
        began = time.perf_counter()
        status, _, _ = request(port, "GET", "/livez", timeout=10)
        probes.append(time.perf_counter() - began)
        assert status == 200
        time.sleep(0.05)
    for t in threads:
        t.join()
    assert not errors, errors
    assert len(results) == 2 * len(jobs)
    by_image = {}
    for name, status, headers, body in results.values():
        assert status == 200, body
        by_image.setdefault(name, []).append(np.frombuffer(body, "<f4"))
    for name, vectors in by_image.items():
        for v in vectors:
            assert cosine(v, want[name]) >= 0.99999, name
    assert len(probes) >= 3, f"the load ended too soon to probe /livez ({len(probes)} probes)"
    assert max(probes) < 1.0, probes
    after = metric_samples(port)
    count = after[("adaface_batch_size_count", ())] - before.get(("adaface_batch_size_count", ()), 0)
    total = after[("adaface_batch_size_sum", ())] - before.get(("adaface_batch_size_sum", ()), 0)
    assert count > 0
    assert total > count, f"no forward had more than one face: {count} forwards of {total} faces"
    key = ("adaface_requests_total", (("method", "POST"), ("route", "/byte_represent_byte"), ("status", "200")))
    assert after[key] - before.get(key, 0) == 2 * len(jobs)


def test_server_info_metrics_and_errors(server18, ir18_ckpt):
    port = server18.port
    status, _, body = request(port, "GET", "/info")
    info = json.loads(body)
    assert status == 200 and info["arch"] == "ir_18" and info["weights"] == str(ir18_ckpt)
    assert info["device"] == "cpu" and info["ready"] is True and info["threads"] >= 1
    status, _, body = request(port, "POST", "/v1/embed", b"")
    assert status == 400 and b"empty_body" in body
    status, _, body = request(port, "GET", "/nope")
    assert status == 404 and b"not_found" in body
    status, _, body = request(port, "GET", "/metrics")
    text = body.decode()
    for name in ("adaface_requests_total", "adaface_batch_size", "adaface_faces_per_image", "adaface_queue_depth"):
        assert name in text
    assert 'route="/v1/embed"' in text


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_body_over_limit_is_refused(server18, chunked):
    """A valid JPEG followed by padding, over ADAFACE_MAX_BODY_BYTES: 413, however it is sent."""
    body = photo("img3.jpeg") + bytes(MAX_BODY + 200_000)
    payload = iter([body[i:i + 65536] for i in range(0, len(body), 65536)]) if chunked else body
    status, _, answer = request(server18.port, "POST", "/byte_represent_json", payload)
    assert status == 413, answer[:300]
    assert json.loads(answer)["error"]["code"] == "body_too_large"
    assert request(server18.port, "GET", "/livez")[0] == 200


def test_missing_weights_stop_the_server_with_a_hint(tmp_path):
    server = start(tmp_path, "/nonexistent/file.ckpt")
    try:
        code = server.proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        server.stop()
        pytest.fail(f"gunicorn kept running without weights:\n{server.output()}")
    out = server.output()
    assert code != 0, out
    assert "/nonexistent/file.ckpt" in out
    assert "minchul/cvlface_adaface_ir101_webface12m" in out or "mk-minchul/AdaFace" in out, out
    assert "Traceback" not in out


def test_original_command_line(ir18_ckpt, ir18_extractor, server_factory):
    """The original service's command, without -c (gunicorn still reads gunicorn.conf.py here)."""
    server = server_factory(ir18_ckpt, args=["--worker-class", "gevent", "-b", "127.0.0.1:{port}", "--timeout", "300",
                                             "flask_http_server:app"], bind=False)
    server.wait_ready()
    image = photo("img2.jpeg")
    status, headers, body = request(server.port, "POST", "/b64_represent_json", base64.b64encode(image))
    assert status == 200, body
    got = np.float32(json.loads(body)[0])
    assert cosine(got, ir18_extractor.embed_image(image)[0].embedding) >= 0.99999
    assert headers["X-Embedding-Dim"] == "512"
