"""Starting up: bad settings and unloadable models on the command line, ``make run`` without
weights, and the gunicorn server's own folder, control socket and error answers.

The command line runs in a subprocess, as a user runs it. The servers are real gunicorn masters
with ``gunicorn.conf.py`` on loopback (synthetic IR-18 weights, no warm-up), each with the
temporary folder and home of its test, so that what they leave behind can be seen.
"""
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

import net
from adaface.options import ARCH_NAMES
from config import DEFAULT_WEIGHTS, DOWNLOADED_WEIGHTS
from conftest import REPO
from serving.errors import STATUS
from serving.gunicorn_worker import GUNICORN_CODES
from test_server import Server, free_port, request

#: what the three ways forward without weights say
THREE_WAYS = ("make weights", "pretrained/adaface_ir101_webface12m.ckpt", "ADAFACE_WEIGHTS=synthetic make run")
#: seconds a check without network may take at most (the Hub client's retries took 23 s)
FAST = 8.0


def clean_env(**extra) -> dict:
    """A small environment without ADAFACE_*, proxies or Hugging Face settings, plus ``extra``."""
    keep = ("PATH", "HOME", "LANG", "LC_ALL", "SYSTEMROOT")
    return {**{k: os.environ[k] for k in keep if k in os.environ}, **extra}


def run_cli(*args, **env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "AdaFaceFeature.py", *args], cwd=REPO, env=clean_env(**env),
                          capture_output=True, text=True, timeout=180)


def assert_one_line_error(result: subprocess.CompletedProcess, *words) -> None:
    assert "Traceback" not in result.stderr, result.stderr
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for word in words:
        assert word in lines[0], result.stderr


# --------------------------------------------------------------------------------------------
# The command line
# --------------------------------------------------------------------------------------------


def test_the_settings_and_the_network_agree_on_the_architectures():
    assert tuple(net.ARCHS) == ARCH_NAMES


@pytest.mark.parametrize("variable, value, words", [
    ("ADAFACE_ARCH", "ir_1000", ("ADAFACE_ARCH='ir_1000'", "ir_18, ir_34, ir_50, ir_101")),
    ("ADAFACE_DEVICE", "gpu", ("ADAFACE_DEVICE='gpu'", "auto, cpu, cuda or cuda:N")),
    ("ADAFACE_DEVICE", "cuda:x", ("ADAFACE_DEVICE='cuda:x'", "cuda:N")),
    ("ADAFACE_MAX_QUEUE", "0", ("ADAFACE_MAX_QUEUE=0", "more than 0")),
    ("ADAFACE_MAX_QUEUE", "abc", ("ADAFACE_MAX_QUEUE='abc'", "not a valid int")),
])
def test_a_bad_model_setting_is_one_line_on_the_command_line(variable, value, words):
    result = run_cli("embed", "face.jpg", ADAFACE_WEIGHTS="synthetic", **{variable: value})
    assert_one_line_error(result, *words)


def test_a_device_that_is_not_there_is_one_line():
    """No CUDA, or fewer than 100 GPUs: either way a ValueError at load, told in one line."""
    result = run_cli("embed", "face.jpg", ADAFACE_WEIGHTS="synthetic", ADAFACE_DEVICE="cuda:99")
    assert_one_line_error(result, "cuda:99")


def test_missing_or_corrupt_weights_are_one_line(tmp_path):
    missing = tmp_path / "missing.ckpt"
    assert_one_line_error(run_cli("embed", "face.jpg", ADAFACE_WEIGHTS=str(missing)), str(missing))
    corrupt = tmp_path / "corrupt.ckpt"
    corrupt.write_bytes(b"not a checkpoint" * 64)
    assert_one_line_error(run_cli("embed", "face.jpg", "--weights", str(corrupt)), str(corrupt))


def test_an_unknown_arch_option_is_refused_by_the_parser():
    result = run_cli("embed", "--arch", "ir_1000", "face.jpg", ADAFACE_WEIGHTS="synthetic")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "invalid choice: 'ir_1000'" in result.stderr


# --------------------------------------------------------------------------------------------
# Without weights: make run, make weights, the server
# --------------------------------------------------------------------------------------------


def closed_port() -> int:
    """A loopback port nothing listens on (connecting is refused at once)."""
    return free_port()


def timed(args, env, cwd=REPO) -> tuple:
    """(CompletedProcess, seconds) of a command."""
    start = time.monotonic()
    result = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=120)
    return result, time.monotonic() - start


def assert_three_ways(text: str) -> None:
    for way in THREE_WAYS:
        assert way in text, text


def test_make_run_checks_the_weights_before_gunicorn():
    result = subprocess.run(["make", "-n", "-o", ".venv/.installed", "run"], cwd=REPO, env=clean_env(),
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    check = next(i for i, line in enumerate(lines) if "tools/check_weights.py" in line)
    serve = next(i for i, line in enumerate(lines) if "gunicorn" in line and "flask_http_server:app" in line)
    assert check < serve, result.stdout


def test_make_run_with_missing_weights_stops_before_gunicorn(tmp_path):
    missing = tmp_path / "missing.ckpt"
    result, seconds = timed(["make", "--no-print-directory", "-o", ".venv/.installed", "run"],
                            clean_env(ADAFACE_WEIGHTS=str(missing)))
    out = result.stdout + result.stderr
    assert result.returncode != 0, out
    assert "Listening at" not in out and "Starting gunicorn" not in out, out
    assert str(missing) in out
    assert_three_ways(out)
    assert seconds < FAST, seconds


@pytest.mark.parametrize("endpoint", ["http://127.0.0.1:{port}", "https://adaface-weights.invalid"],
                         ids=["refused", "unresolvable"])
def test_make_weights_without_network_fails_at_once_with_the_ways(tmp_path, endpoint):
    out = tmp_path / "model.safetensors"
    env = clean_env(HF_ENDPOINT=endpoint.format(port=closed_port()), HF_HOME=str(tmp_path / "hf"))
    result, seconds = timed([sys.executable, "tools/fetch_weights.py", "--out", str(out)], env)
    assert result.returncode == 1, result.stderr
    assert "could not download the weights from Hugging Face" in result.stderr
    assert_three_ways(result.stderr)
    assert "Traceback" not in result.stderr
    assert seconds < FAST, seconds
    assert not out.exists()


def test_the_weights_check_downloads_the_default_and_fails_fast(tmp_path):
    """No ADAFACE_WEIGHTS and no weights in pretrained/: the check tries the download, which
    fails at once here (a port that refuses), and says what to do."""
    if (REPO / DEFAULT_WEIGHTS).exists() or (REPO / DOWNLOADED_WEIGHTS).exists():
        pytest.skip("weights are present in pretrained/: the check has nothing to download")
    env = clean_env(HF_ENDPOINT=f"http://127.0.0.1:{closed_port()}", HF_HOME=str(tmp_path / "hf"))
    result, seconds = timed([sys.executable, "tools/check_weights.py"], env)
    assert result.returncode == 1, result.stderr
    assert "127.0.0.1" in result.stderr
    assert_three_ways(result.stderr)
    assert seconds < FAST, seconds
    assert not (REPO / DOWNLOADED_WEIGHTS).exists()


def test_the_weights_check_passes_synthetic_and_existing_weights(tmp_path):
    present = tmp_path / "weights.ckpt"
    present.write_bytes(b"x")
    for weights in ("synthetic", str(present)):
        result = subprocess.run([sys.executable, "tools/check_weights.py"], cwd=REPO,
                                env=clean_env(ADAFACE_WEIGHTS=weights), capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stderr


def test_the_server_without_weights_names_the_three_ways(tmp_path):
    env = clean_env(ADAFACE_WEIGHTS=str(tmp_path / "missing.ckpt"), ADAFACE_WARMUP="false")
    result = subprocess.run([sys.executable, "-c", "import flask_http_server; flask_http_server.app"], cwd=REPO,
                            env=env, capture_output=True, text=True, timeout=180)
    assert result.returncode == 4, result.stderr
    assert "cannot start" in result.stderr
    assert_three_ways(result.stderr)


# --------------------------------------------------------------------------------------------
# gunicorn: its folder, its control socket, its own error answers
# --------------------------------------------------------------------------------------------


@pytest.fixture
def short_tmp():
    """A temporary folder with a short path (a Unix socket's path has at most 107 bytes)."""
    with tempfile.TemporaryDirectory(prefix="adaface-test-") as folder:
        yield Path(folder)


def start(root: Path, name: str, **env) -> Server:
    """gunicorn with ``gunicorn.conf.py``, its temporary folder and home under ``root``."""
    port = free_port()
    (root / "tmp").mkdir(exist_ok=True)
    (root / "home").mkdir(exist_ok=True)
    env = {"ADAFACE_WEIGHTS": "synthetic", "ADAFACE_ARCH": "ir_18", "ADAFACE_DEVICE": "cpu",
           "ADAFACE_BACKEND": "torch", "ADAFACE_WARMUP": "false", "ADAFACE_THREADS": "1", "ADAFACE_OPEN_GALLERIES": "true",
           "ADAFACE_LOG_LEVEL": "info", "ADAFACE_BIND": f"127.0.0.1:{port}",
           "TMPDIR": str(root / "tmp"), "HOME": str(root / "home"), "XDG_RUNTIME_DIR": str(root / "home"), **env}
    return Server(["-c", "gunicorn.conf.py", "flask_http_server:app"], env, root / f"{name}.log", port)


def control_socket(server: Server, timeout: float = 20.0) -> Path:
    """The control socket's path, as the server logged it."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = re.search(r"Control socket listening at (\S+)", server.output())
        if found:
            return Path(found.group(1))
        time.sleep(0.1)
    pytest.fail(f"no control socket logged:\n{server.output()}")


def terminate(server: Server) -> int:
    """SIGTERM to the master alone, as a process manager sends it; its exit status."""
    os.kill(server.proc.pid, signal.SIGTERM)
    return server.proc.wait(timeout=60)


def run_folders(root: Path) -> list:
    return sorted((root / "tmp").glob("adaface-gunicorn-*"))


@pytest.fixture
def servers(short_tmp):
    started = []

    def make(name: str, **env) -> Server:
        started.append(start(short_tmp, name, **env))
        return started[-1]

    yield make
    for server in started:
        server.stop()


def parse_answer(answer: bytes):
    """(status, headers, body) of a complete HTTP answer with a Content-Length, else None."""
    head, found, body = answer.partition(b"\r\n\r\n")
    if not found:
        return None
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    if len(body) < int(headers.get("content-length", 0)):
        return None
    return int(lines[0].split()[1]), headers, body


def raw_request(port: int, data: bytes) -> tuple:
    """Send ``data`` as is; (status, headers, body) of the answer. gunicorn closes the
    connection with the rest of the request unread, so the answer may be followed by a reset."""
    answer = b""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as conn:
        conn.sendall(data)
        while parse_answer(answer) is None:
            try:
                chunk = conn.recv(65536)
            except ConnectionResetError:
                break
            if not chunk:
                break
            answer += chunk
    parsed = parse_answer(answer)
    assert parsed is not None, answer[:300]
    return parsed


@pytest.fixture(scope="module")
def server():
    with tempfile.TemporaryDirectory(prefix="adaface-test-") as folder:
        s = start(Path(folder), "errors")
        try:
            yield s.wait_ready()
        finally:
            s.stop()


def test_every_code_of_gunicorns_errors_is_in_the_status_table():
    assert {code: STATUS.get(code) for code in GUNICORN_CODES.values()} == {c: s for s, c in GUNICORN_CODES.items()}


@pytest.mark.server
@pytest.mark.parametrize("data, status, code", [
    (b"GET /" + b"a" * 10_000 + b" HTTP/1.1\r\nHost: x\r\n\r\n", 414, "uri_too_long"),
    (b"GET /livez HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 10_000 + b"\r\n\r\n", 431, "headers_too_large"),
    (b"GET /livez HTTP/1.1\r\nHost: x\r\n" + b"".join(b"X-H%d: 1\r\n" % i for i in range(150)) + b"\r\n", 431,
     "headers_too_large"),
    (b"NOT HTTP AT ALL\r\n\r\n", 400, "bad_request"),
    (b"GET /livez HTTP/1.1\r\nHost: x\r\nExpect: a-miracle\r\n\r\n", 417, "expectation_failed"),
    (b"POST /b64_represent_json HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: br\r\n\r\n", 501, "not_implemented"),
], ids=["long-request-line", "huge-header", "too-many-headers", "malformed", "expect", "transfer-coding"])
def test_requests_gunicorn_refuses_are_answered_in_json(server, data, status, code):
    got, headers, body = raw_request(server.port, data)
    assert got == status, body[:300]
    assert headers["content-type"] == "application/json"
    assert int(headers["content-length"]) == len(body)
    error = json.loads(body)["error"]
    assert error["code"] == code and STATUS[code] == status
    assert error["message"] and len(error["message"]) < 300
    assert request(server.port, "GET", "/livez")[0] == 200


def wait_for(condition, timeout: float = 60.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.2)
    return False


@pytest.mark.server
def test_the_servers_folder_outlives_a_reload_and_is_gone_after_sigterm(servers, short_tmp):
    server = servers("one").wait_ready()
    assert request(server.port, "GET", "/livez")[0] == 200  # the worker writes its metrics
    (folder,) = run_folders(short_tmp)
    assert (folder / "metrics").is_dir() and any((folder / "metrics").iterdir())
    assert control_socket(server) == folder / "gunicorn.ctl"

    os.kill(server.proc.pid, signal.SIGHUP)  # gunicorn reads its config again, new workers
    assert wait_for(lambda: server.output().count("Booting worker") == 2), server.output()
    server.wait_ready()
    assert run_folders(short_tmp) == [folder] and (folder / "gunicorn.ctl").is_socket()

    assert terminate(server) == 0, server.output()
    assert run_folders(short_tmp) == [], server.output()


@pytest.mark.server
def test_two_servers_have_their_own_control_socket(servers, short_tmp):
    """Both would take $XDG_RUNTIME_DIR/gunicorn.ctl by gunicorn's default; each has its own.
    The second is given its metrics folder, which is the caller's and stays."""
    given = short_tmp / "given-metrics"
    given.mkdir()
    first = servers("first").wait_ready()
    second = servers("second", PROMETHEUS_MULTIPROC_DIR=str(given)).wait_ready()
    sockets = control_socket(first), control_socket(second)
    assert sockets[0] != sockets[1] and all(s.is_socket() for s in sockets)
    assert not (short_tmp / "home" / "gunicorn.ctl").exists()

    assert terminate(first) == 0, first.output()
    assert not sockets[0].exists() and sockets[1].is_socket()
    from gunicorn.ctl.client import ControlClient
    with ControlClient(str(sockets[1]), timeout=10) as client:
        workers = client.send_command("show workers")
    assert len(workers["workers"]) == 1, workers
    assert request(second.port, "GET", "/livez")[0] == 200

    assert terminate(second) == 0, second.output()
    assert run_folders(short_tmp) == []
    assert given.is_dir()
