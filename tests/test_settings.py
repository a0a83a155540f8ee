"""Settings: defaults from the library's one home, bad values and misspelt names refused at start."""
import subprocess
import sys

import pytest

from adaface import options as opt
from config import Settings, SettingsError
from conftest import REPO
from flask_http_server import _bind_address


def test_defaults_come_from_the_library():
    s = Settings()
    assert (s.faces, s.align, s.backend, s.device) == (opt.DEFAULT_FACES, opt.DEFAULT_ALIGN, opt.DEFAULT_BACKEND,
                                                       opt.DEFAULT_DEVICE)
    assert (s.max_faces, s.min_face_size, s.max_pixels) == (opt.DEFAULT_MAX_FACES, opt.DEFAULT_MIN_FACE_SIZE,
                                                            opt.MAX_PIXELS)
    assert (s.verify_threshold, s.identify_threshold) == (opt.DEFAULT_VERIFY_THRESHOLD, opt.DEFAULT_IDENTIFY_THRESHOLD)
    assert (s.precision, s.int8_min_cosine) == (opt.DEFAULT_PRECISION, opt.DEFAULT_INT8_MIN_COSINE)


@pytest.mark.parametrize("variable, value, words", [
    ("ADAFACE_FACES", "larget", "largest, score, all"),
    ("ADAFACE_ALIGN", "AUTO", "auto, always, never"),
    ("ADAFACE_BACKEND", "tensorrt", "auto, torch, onnx"),
    ("ADAFACE_MAX_FACES", "0", "between 1 and 1000"),
    ("ADAFACE_MIN_FACE_SIZE", "11", "between 12 and 10000"),
    ("ADAFACE_MAX_PIXELS", "200000000", "between 1 and 178956970"),
    ("ADAFACE_MAX_QUEUE", "0", "more than 0"),
    ("ADAFACE_PIXEL_BUDGET", "0", "more than 0"),
    ("ADAFACE_BODY_TIMEOUT", "-1", "more than 0"),
    ("ADAFACE_VERIFY_THRESHOLD", "1.5", "between -1.0 and 1.0"),
    ("ADAFACE_MAX_BATCH", "-1", "0 or more"),
    ("ADAFACE_WORKERS", "0", "more than 0"),
    ("ADAFACE_MAX_BATCH", "eight", "not a valid int"),
    ("ADAFACE_LOG_LEVEL", "LOUD", "INFO"),
    ("ADAFACE_PRECISION", "fp16", "fp32, int8"),
    ("ADAFACE_ANN_NPROBE", "0", "more than 0"),
    ("ADAFACE_INT8_MIN_COSINE", "0.5", "between 0.9 and 1.0"),
])
def test_bad_values_are_refused_naming_the_variable(variable, value, words):
    with pytest.raises(SettingsError) as info:
        Settings.from_env({variable: value})
    assert variable in str(info.value) and words in str(info.value)


@pytest.mark.parametrize("typo, meant", [("ADAFACE_MAX_BACH", "ADAFACE_MAX_BATCH"),
                                         ("ADAFACE_WEIGTHS", "ADAFACE_WEIGHTS"),
                                         ("ADAFACE_API_KEY", "ADAFACE_API_KEYS")])
def test_a_misspelt_setting_is_refused(typo, meant):
    with pytest.raises(SettingsError) as info:
        Settings.from_env({typo: "1"})
    assert typo in str(info.value) and f"did you mean {meant}" in str(info.value)


def test_other_adaface_variables_are_ignored(caplog):
    assert Settings.from_env({"ADAFACE_TEST_DATA": "/x", "ADAFACE_SOMETHING_ELSE": "1"}) == Settings()
    assert "ADAFACE_SOMETHING_ELSE is not a setting" in caplog.text
    assert "ADAFACE_TEST_DATA" not in caplog.text


def test_relative_sqlite_gallery_urls_are_from_the_repository():
    assert Settings().gallery_store_url() == f"sqlite:///{REPO / 'data' / 'gallery.db'}"
    assert Settings(gallery_url="sqlite:////tmp/g.db").gallery_store_url() == "sqlite:////tmp/g.db"
    url = "postgresql://u:p@127.0.0.1:5432/d"
    assert Settings(gallery_url=url).gallery_store_url() == url


def test_development_server_listens_on_adaface_bind():
    assert _bind_address("0.0.0.0:30035") == ("0.0.0.0", 30035)
    assert _bind_address("127.0.0.1:8080") == ("127.0.0.1", 8080)
    assert _bind_address("[::1]:9000") == ("::1", 9000)
    assert _bind_address(":9000") == ("0.0.0.0", 9000)


def test_the_server_stops_at_once_on_a_misspelt_setting():
    env = {"PATH": "/usr/bin:/bin", "ADAFACE_WEIGHTS": "synthetic", "ADAFACE_MAX_BACH": "48"}
    result = subprocess.run([sys.executable, "-c", "import flask_http_server; flask_http_server.app"], cwd=REPO,
                            env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 4
    assert "ADAFACE_MAX_BACH is not a setting: did you mean ADAFACE_MAX_BATCH?" in result.stderr


def test_the_command_line_stops_on_a_bad_setting(tmp_path):
    env = {"PATH": "/usr/bin:/bin", "ADAFACE_FACES": "everyone"}
    result = subprocess.run([sys.executable, "AdaFaceFeature.py", "gallery", "list", "--url",
                             f"sqlite:///{tmp_path}/g.db"], cwd=REPO, env=env, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 2 and "ADAFACE_FACES='everyone'" in result.stderr


@pytest.mark.parametrize("variable, value, words", [
    ("ADAFACE_ARCH", "ir_1000", "ir_18, ir_34, ir_50, ir_101"),
    ("ADAFACE_ARCH", "IR_18", "ir_18, ir_34, ir_50, ir_101"),
    ("ADAFACE_DEVICE", "gpu", "auto, cpu, cuda or cuda:N"),
    ("ADAFACE_DEVICE", "cuda:x", "auto, cpu, cuda or cuda:N"),
    ("ADAFACE_DEVICE", "cuda:", "auto, cpu, cuda or cuda:N"),
    ("ADAFACE_MAX_QUEUE", "0", "more than 0"),
    ("ADAFACE_MAX_QUEUE", "abc", "not a valid int"),
])
def test_bad_model_settings_are_refused_at_start(variable, value, words):
    with pytest.raises(SettingsError) as info:
        Settings.from_env({variable: value})
    message = str(info.value)
    assert variable in message and words in message and "\n" not in message


@pytest.mark.parametrize("device", ["auto", "cpu", "cuda", "cuda:0", "cuda:12", "CUDA:1", "Cpu"])
def test_every_device_form_is_accepted(device):
    assert Settings.from_env({"ADAFACE_DEVICE": device}).device == device


@pytest.mark.parametrize("arch", ["", *opt.ARCH_NAMES])
def test_every_architecture_name_is_accepted(arch):
    assert Settings(arch=arch).arch == arch
