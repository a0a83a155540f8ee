"""Galleries on real gunicorn servers (``-c gunicorn.conf.py``, gevent workers) on loopback.

SQLite: two workers share the file; an enroll acknowledged by the API survives ``kill -9`` of
the whole server. PostgreSQL: two servers are two replicas; an enroll on one is identified by
the other within 1 s, and survives ``kill -9`` of the server that acknowledged it.
"""
import http.client
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO
from test_gallery_support import crop_png, free_port, store_url

pytestmark = [pytest.mark.server, pytest.mark.slow]

GUNICORN = str(Path(sys.executable).parent / "gunicorn")
READY_TIMEOUT = 120.0


def call(port: int, method: str, path: str, body=None, timeout: float = 60.0, headers=None):
    """(status, parsed JSON body) of one request on a fresh connection."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        headers = dict(headers or {})
        if isinstance(body, dict):
            body = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        conn.request(method, path, body=body, headers=headers)
        r = conn.getresponse()
        return r.status, json.loads(r.read() or b"null")
    finally:
        conn.close()


class Server:
    """``gunicorn -c gunicorn.conf.py flask_http_server:app`` in its own process group."""

    def __init__(self, url: str, log: Path, workers: int = 1, log_level: str = "info", env=None):
        extra = dict(env or {})
        self.port, self.log = free_port(), log
        env = {k: v for k, v in os.environ.items()
               if not k.startswith("ADAFACE_") and k.lower() != "prometheus_multiproc_dir"}
        env.update({"ADAFACE_WEIGHTS": "synthetic", "ADAFACE_ARCH": "ir_18", "ADAFACE_DEVICE": "cpu",
                    "ADAFACE_OPEN_GALLERIES": "true",
                    "ADAFACE_GALLERY_URL": url, "ADAFACE_BIND": f"127.0.0.1:{self.port}",
                    "ADAFACE_WORKERS": str(workers), "ADAFACE_THREADS": "1", "ADAFACE_WARMUP": "false",
                    "ADAFACE_LOG_LEVEL": log_level,
                    # its run folder (control socket, metrics) beside the log: a kill -9 leaves it there
                    "TMPDIR": str(log.parent), **extra})
        with open(log, "ab") as out:
            self.proc = subprocess.Popen([GUNICORN, "-c", "gunicorn.conf.py", "flask_http_server:app"], cwd=REPO,
                                         env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)

    def wait_ready(self) -> "Server":
        deadline = time.monotonic() + READY_TIMEOUT
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"gunicorn exited with {self.proc.returncode}:\n{self.log.read_text()[-4000:]}")
            try:
                if call(self.port, "GET", "/readyz", timeout=5)[0] == 200:
                    return self
            except OSError:
                pass
            time.sleep(0.2)
        self.kill()
        pytest.fail(f"gunicorn not ready in {READY_TIMEOUT} s:\n{self.log.read_text()[-4000:]}")

    def kill(self) -> None:
        """``kill -9`` of the master and every worker (the process group)."""
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(timeout=30)


@pytest.fixture
def servers():
    started = []
    yield started
    for server in started:
        server.kill()


def _start(servers: list, url: str, log: Path, workers: int = 1, log_level: str = "info", env=None) -> Server:
    server = Server(url, log, workers, log_level, env)
    servers.append(server)
    return server.wait_ready()


def _enroll(port: int, identity: str, photo: bytes) -> int:
    status, body = call(port, "POST", f"/v1/galleries/g/identities/{identity}/faces", photo)
    assert status == 201, body
    return body["results"][0]["face_id"]


def _identified(port: int, photo: bytes) -> str | None:
    status, body = call(port, "POST", "/v1/galleries/g/identify", photo)
    assert status == 200, body
    return body["faces"][0]["identity"]


def test_sqlite_workers_share_writes_and_survive_kill_9(tmp_path, servers):
    url = store_url("sqlite", tmp_path)
    server = _start(servers, url, tmp_path / "server.log", workers=2)
    assert call(server.port, "POST", "/v1/galleries", {"name": "g"})[0] == 201
    photos = [crop_png(i) for i in range(4)]
    for i, photo in enumerate(photos):
        _enroll(server.port, f"person{i}", photo)
        # whichever worker answers has the new face (each request may go to either)
        assert [_identified(server.port, p) for p in photos[:i + 1]] == [f"person{k}" for k in range(i + 1)]
    server.kill()
    restarted = _start(servers, url, tmp_path / "server.log")
    status, body = call(restarted.port, "GET", "/v1/galleries/g/identities")
    assert status == 200 and [i["name"] for i in body["identities"]] == [f"person{i}" for i in range(4)]
    assert _identified(restarted.port, photos[3]) == "person3"


def test_postgres_replicas_see_writes_within_a_second_and_survive_kill_9(tmp_path, servers):
    url = store_url("postgresql", tmp_path)
    a = _start(servers, url, tmp_path / "a.log")
    b = _start(servers, url, tmp_path / "b.log", log_level="debug")
    assert call(a.port, "POST", "/v1/galleries", {"name": "g"})[0] == 201
    photo = crop_png(7)
    assert _identified(b.port, photo) is None                 # b holds the gallery's (empty) index
    _enroll(a.port, "alice", photo)
    began = time.monotonic()
    while _identified(b.port, photo) != "alice" and time.monotonic() - began < 5:
        time.sleep(0.02)
    elapsed = time.monotonic() - began
    print(f"replica B identified A's enroll after {elapsed * 1000:.0f} ms")
    assert elapsed < 1.0
    deadline = time.monotonic() + 5                           # and b's listener thread got the NOTIFY
    while "gallery g: notified of version 1 " not in (tmp_path / "b.log").read_text() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert "gallery g: notified of version 1 " in (tmp_path / "b.log").read_text()
    a.kill()
    restarted = _start(servers, url, tmp_path / "a.log")
    assert call(restarted.port, "GET", "/v1/galleries/g/identities/alice")[0] == 200
    assert _identified(restarted.port, photo) == "alice"
