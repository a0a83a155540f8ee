"""int8: the quantized graph, its accuracy gate, its cache, and the service reporting it.

Synthetic IR-18 weights (the gate's figure for IR-101 is measured by ``bench/model.py``). The
calibration folder is built in the test's tmp from the shared data, read in place: the
reference's aligned crops of the shared photos (112×112 PNGs, taken as crops) and two photos
(detected and aligned by the pipeline).
"""
import json
import os
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper
from PIL import Image

from AdaFaceFeature import AdaFaceFeature
from adaface.backends.int8 import RECIPE, int8_backend, lowest_cosine, quantize
from adaface.backends.onnx_runtime import OnnxBackend
from adaface.calibration_set import CalibrationSet
from adaface.model import crops_to_tensor
from conftest import FACEDATA, REFERENCE, shared_available
from test_server import request, start

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not shared_available(), reason="shared reference data not found")]
ARCH = "ir_18"


@pytest.fixture(scope="module")
def calibration(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("calibration")
    for png in sorted((REFERENCE / "expected_ir101").glob("*.face0.png"))[:20]:
        shutil.copy(png, folder / png.name)
    for name in ("img1.jpeg", "img2.jpeg"):
        shutil.copy(FACEDATA / "adaface" / name, folder / name)
    return folder


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")


def extractor(cache: Path, calibration, **kwargs) -> AdaFaceFeature:
    return AdaFaceFeature("synthetic", arch=ARCH, device="cpu", cache_dir=cache, calibration=calibration, **kwargs)


@pytest.fixture(scope="module")
def fp32(cache, calibration):
    return extractor(cache, calibration)


@pytest.fixture(scope="module")
def int8(cache, calibration):
    return extractor(cache, calibration, precision="int8")


def aligned_crops() -> np.ndarray:
    """The shared aligned crops (not in the calibration folder), N×112×112×3 uint8 RGB."""
    return np.stack([np.asarray(Image.open(p).convert("RGB")) for p in sorted((FACEDATA / "aligned").glob("*.jpg"))])


def _op_types(path) -> set:
    return {n.op_type for n in onnx.load(str(path), load_external_data=False).graph.node}


def test_int8_passes_the_gate_and_embeds_like_fp32(fp32, int8, calibration):
    report = int8.model.int8
    assert int8.model.precision == "int8" and report.served and not report.cached
    assert report.min_cosine >= 0.995 and report.threshold == 0.995
    assert report.crops == 22                     # 20 crops + the face of each of the two photos
    assert {"QuantizeLinear", "DequantizeLinear"} <= _op_types(report.path)
    assert Path(report.path).stat().st_size < Path(fp32.backend.path).stat().st_size * 0.7   # int8 weights
    crops = aligned_crops()                       # faces the calibration never saw
    a, _ = fp32.embed_crops(crops)
    b, norms = int8.embed_crops(crops)
    cosines = np.sum(a * b, axis=1)
    assert np.all(cosines >= 0.99) and np.all(cosines < 0.99999), cosines   # close, and really another graph
    np.testing.assert_allclose(np.linalg.norm(b, axis=1), 1, atol=1e-5)
    assert fp32.model.precision == "fp32" and fp32.model.int8 is None
    info = int8.info()
    assert info["precision"] == "int8" and info["int8"]["min_cosine"] == report.min_cosine


def test_a_later_start_reuses_the_graph_and_the_gate(int8, cache, calibration):
    record = Path(int8.model.int8.path).with_suffix(".json")
    before = record.stat().st_mtime_ns, json.loads(record.read_text())
    again = extractor(cache, calibration, precision="int8")
    assert again.model.int8.cached and again.model.precision == "int8"
    assert again.model.int8.min_cosine == int8.model.int8.min_cosine
    assert (record.stat().st_mtime_ns, json.loads(record.read_text())) == before
    strict = extractor(cache, calibration, precision="int8", int8_min_cosine=0.999999)
    assert strict.model.precision == "fp32" and not strict.model.int8.served and strict.model.int8.cached
    assert f"{int8.model.int8.min_cosine:.5f} is below 0.999999" in strict.model.int8.reason


def test_a_refused_int8_serves_fp32_exactly(fp32, cache, calibration):
    strict = extractor(cache, calibration, precision="int8", int8_min_cosine=1.0)
    assert strict.model.precision == "fp32" and strict.info()["precision"] == "fp32"
    crops = aligned_crops()
    np.testing.assert_array_equal(strict.embed_crops(crops)[0], fp32.embed_crops(crops)[0])


def test_the_gate_refuses_a_broken_quantization(fp32, calibration, tmp_path):
    """A quantizer that writes a wrong graph (the first quantized convolution's weight scales off
    by 4×, as a calibration bug would make them) is refused by the gate, and the refusal says why."""
    def broken(fp32_path: Path, out_path: Path, inputs):
        quantize(fp32_path, out_path, inputs)
        graph = onnx.load(str(out_path))
        scales = {i.name: i for i in graph.graph.initializer}
        for node in graph.graph.node:
            if node.op_type == "DequantizeLinear" and numpy_helper.to_array(scales[node.input[1]]).size > 1:
                tensor = scales[node.input[1]]
                tensor.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(tensor) * 4, tensor.name))
                break
        onnx.save(graph, str(out_path))

    local = tmp_path / "graph.onnx"
    shutil.copy(fp32.backend.path, local)
    reference = OnnxBackend(local, 2)
    images = CalibrationSet.from_folder(calibration)
    inputs = crops_to_tensor(fp32.calibration_crops(images), fp32.device).numpy()
    backend, report = int8_backend(reference, images.digest, lambda: inputs, 0.995, 2, 8, quantizer=broken)
    assert backend is None and not report.served and report.min_cosine < 0.995
    assert f"{report.min_cosine:.5f} is below 0.995" in report.reason
    healthy, good = int8_backend(reference, "other", lambda: inputs, 0.995, 2, 8)
    assert healthy is not None and good.served and good.min_cosine > report.min_cosine
    assert lowest_cosine(reference, healthy, inputs) == pytest.approx(good.min_cosine, abs=1e-6)


def test_a_quantizer_that_fails_refuses_int8(fp32, calibration, tmp_path):
    def failing(fp32_path, out_path, inputs):
        raise RuntimeError("no space left for the graph")

    local = tmp_path / "graph.onnx"
    shutil.copy(fp32.backend.path, local)
    backend, report = int8_backend(OnnxBackend(local, 2), "x", lambda: np.zeros((8, 3, 112, 112), np.float32),
                                   0.995, 2, 8, quantizer=failing)
    assert backend is None and not report.served and "no space left for the graph" in report.reason
    assert {p.name for p in tmp_path.iterdir()} == {"graph.onnx", f"graph.int8-{RECIPE}-x.onnx.lock"}


def test_a_record_of_other_kernels_or_another_fp32_graph_is_measured_again(int8, cache, calibration):
    record_path = Path(int8.model.int8.path).with_suffix(".json")
    record = json.loads(record_path.read_text())
    assert record["fp32_sha256"] and record["onnxruntime"] and "cpu" in record
    record["onnxruntime"] = "0.0.1"                 # as if measured with another ONNX Runtime
    record_path.write_text(json.dumps(record))
    again = extractor(cache, calibration, precision="int8")
    assert not again.model.int8.cached and again.model.precision == "int8"
    assert json.loads(record_path.read_text())["onnxruntime"] != "0.0.1"


def test_an_unreadable_calibration_folder_refuses_int8(cache, tmp_path):
    folder = tmp_path / "odd"
    folder.mkdir()
    fd = os.open(os.fsencode(folder) + b"/\xff.png", os.O_CREAT | os.O_WRONLY)   # a name that is not UTF-8
    os.close(fd)
    model = extractor(cache, folder, precision="int8").model
    assert model.precision == "fp32" and "cannot be read" in model.int8.reason


def test_a_changed_folder_or_graph_calibrates_again(int8, cache, calibration, tmp_path):
    folder = tmp_path / "more"
    shutil.copytree(calibration, folder)
    shutil.copy(FACEDATA / "adaface" / "img3.jpeg", folder / "img3.jpeg")
    more = extractor(cache, folder, precision="int8")
    assert not more.model.int8.cached and more.model.int8.crops == 23
    assert more.model.int8.path != int8.model.int8.path
    graph = Path(more.model.int8.path)
    data = bytearray(graph.read_bytes())
    data[-1] ^= 0xFF                              # the graph changed on disk: its record no longer vouches for it
    graph.write_bytes(bytes(data))
    again = extractor(cache, folder, precision="int8")
    assert not again.model.int8.cached and again.model.precision == "int8"


@pytest.mark.parametrize("case", ["missing", "too few"])
def test_without_enough_faces_int8_is_refused(cache, tmp_path, case):
    folder = tmp_path / "few"
    if case == "too few":
        folder.mkdir()
        for png in sorted((REFERENCE / "expected_ir101").glob("*.face0.png"))[:3]:
            shutil.copy(png, folder / png.name)
    model = extractor(cache, folder, precision="int8").model
    assert model.precision == "fp32" and not model.int8.served and model.int8.min_cosine is None
    assert "at least 8 are needed" in model.int8.reason
    assert ("does not exist" if case == "missing" else "3 face crops from 3 images") in model.int8.reason


def test_int8_needs_the_onnx_backend(cache, calibration):
    model = extractor(cache, calibration, precision="int8", backend="torch").model
    assert model.precision == "fp32" and "onnx backend" in model.int8.reason


@pytest.mark.server
def test_the_server_reports_the_precision_served(int8, cache, calibration, tmp_path):
    server = start(tmp_path, "synthetic", ADAFACE_ARCH=ARCH, ADAFACE_PRECISION="int8",
                   ADAFACE_CALIBRATION_DIR=str(calibration), ADAFACE_CACHE_DIR=str(cache))
    try:
        server.wait_ready()
        status, _, body = request(server.port, "GET", "/info")
        info = json.loads(body)
        assert status == 200 and info["precision"] == "int8"
        assert info["int8"]["served"] and info["int8"]["cached"]
        assert info["int8"]["min_cosine"] == int8.model.int8.min_cosine
        metrics = request(server.port, "GET", "/metrics")[2].decode()
        assert 'adaface_precision{precision="int8"} 1.0' in metrics
        assert 'adaface_precision{precision="fp32"} 0.0' in metrics
        assert f"adaface_int8_min_cosine {int8.model.int8.min_cosine}" in metrics
        path = REFERENCE / "expected_ir101" / "img1.jpeg.face0.png"
        status, _, body = request(server.port, "POST", "/v1/embed", path.read_bytes())
        expected = int8.embed_crops(np.asarray(Image.open(path).convert("RGB"))[None])[0][0]
        assert status == 200
        assert float(np.dot(json.loads(body)["faces"][0]["embedding"], expected)) > 0.99999
    finally:
        server.stop()


@pytest.mark.server
def test_two_workers_on_a_cold_cache_start_from_one_calibration(calibration, tmp_path):
    """gunicorn's master prepares the int8 graph before the workers start (gunicorn.conf.py): both
    workers load it from the cache, and nothing but the graphs, the record and the lock is left."""
    cold = tmp_path / "cold"
    cold.mkdir()
    server = start(tmp_path, "synthetic", ADAFACE_ARCH=ARCH, ADAFACE_PRECISION="int8", ADAFACE_WORKERS="2",
                   ADAFACE_CALIBRATION_DIR=str(calibration), ADAFACE_CACHE_DIR=str(cold),
                   ADAFACE_LOG_LEVEL="info")
    try:
        server.wait_ready()
        answers = [json.loads(request(server.port, "GET", "/info")[2]) for _ in range(6)]
        assert all(a["precision"] == "int8" and a["int8"]["cached"] for a in answers)
        [prepared] = [line for line in server.output().splitlines() if "int8 prepared" in line]
        assert '"served":true' in prepared and '"cached":false' in prepared    # the master's run calibrated
    finally:
        server.stop()
    names = sorted(p.name for p in cold.iterdir())
    assert [n for n in names if n.startswith(".")] == []          # no temporary files left
    assert len([n for n in names if n.endswith(".onnx")]) == 2 and len([n for n in names if n.endswith(".json")]) == 1
